"""The trainer's eval transform equals a plain numpy reading of the manifest's input contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contract.preprocess import InputSpec, Preprocessor, read_image
from trainer.augment import (
    AugmentConfig,
    BatchAugment,
    eval_spec,
    load_canvas,
    load_eval,
)


def numpy_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and edge clamping, written from the contract."""
    in_h, in_w = image.shape[:2]

    def axis(out_n: int, in_n: int):
        src = (np.arange(out_n) + 0.5) * (in_n / out_n) - 0.5
        src = np.clip(src, 0, in_n - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, in_n - 1)
        return lo, hi, (src - lo)

    y0, y1, wy = axis(out_h, in_h)
    x0, x1, wx = axis(out_w, in_w)
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - wx)[None, :, None] + img[y0][:, x1] * wx[None, :, None]
    bottom = img[y1][:, x0] * (1 - wx)[None, :, None] + img[y1][:, x1] * wx[None, :, None]
    return top * (1 - wy)[:, None, None] + bottom * wy[:, None, None]


def manifest_preprocess(rgb: np.ndarray, block: dict) -> np.ndarray:
    """docs/bundle.md steps 1-5 in plain numpy, from the manifest's input block."""
    h, w = rgb.shape[:2]
    s = block["resize_shorter"]
    new_h, new_w = (s, round(w * s / h)) if h <= w else (round(h * s / w), s)
    img = numpy_bilinear(rgb, new_h, new_w) if (new_h, new_w) != (h, w) else rgb.astype(np.float64)
    top, left = (new_h - block["height"]) // 2, (new_w - block["width"]) // 2
    img = img[top : top + block["height"], left : left + block["width"]]
    img = (img / 255.0 - np.array(block["mean"])) / np.array(block["std"])
    return img.transpose(2, 0, 1)


@pytest.mark.parametrize("size,shorter", [(32, 32), (32, 40), (48, 55), (24, 24)])
def test_eval_transform_matches_numpy_manifest(fmnist_dir, tmp_path, size, shorter):
    spec = eval_spec(size, shorter)
    block = json.loads(json.dumps(spec.to_manifest()))  # as a station reads it from manifest.json
    pre = Preprocessor(InputSpec.from_manifest(block))
    paths = sorted((fmnist_dir / "train").rglob("*.png"))[:40]
    for path in paths:
        ours = load_eval(path, pre)
        ref = manifest_preprocess(read_image(path), block)
        assert ours.shape == (3, size, size) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)


def test_non_square_and_downscaled_images_match(fmnist_dir):
    """A wide shelf shot (two products side by side, upscaled) and a downscale both follow the contract."""
    paths = sorted((fmnist_dir / "train").rglob("*.png"))
    wide = np.concatenate([read_image(paths[0]), read_image(paths[1]), read_image(paths[2])], axis=1)  # 28 x 84
    big = np.kron(read_image(paths[3]), np.ones((5, 4, 1), dtype=np.uint8))  # 140 x 112, then downscaled
    for rgb, spec in ((wide, eval_spec(32, 36)), (big, eval_spec(48, 56))):
        block = spec.to_manifest()
        np.testing.assert_allclose(Preprocessor(spec)(rgb), manifest_preprocess(rgb, block), atol=2e-4, rtol=0)


def test_train_canvas_center_equals_eval_crop_region(fmnist_dir):
    """The train canvas is the eval resize; augmentation never changes the model input's shape or scale."""
    spec = eval_spec(32, 40)
    path = sorted((fmnist_dir / "train").rglob("*.png"))[5]
    canvas = load_canvas(path, spec)
    assert canvas.shape == (3, 40, 40) and canvas.dtype == np.uint8
    import torch

    aug = BatchAugment(AugmentConfig(erasing=0.5), spec, torch.Generator().manual_seed(0))
    out = aug(torch.from_numpy(np.stack([canvas] * 8)))
    assert out.shape == (8, 3, 32, 32)
    assert torch.isfinite(out).all()
    # different samples in a batch get different augmentations
    assert (out[0] - out[1]).abs().max() > 0.1
    # with the full canvas, no rotation, flip or jitter, augmentation is a plain resize of the canvas
    still = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation=0.0, brightness=0.0, contrast=0.0, saturation=0.0)
    batch = torch.from_numpy(np.stack([canvas] * 2))
    plain = BatchAugment(AugmentConfig(hflip=0.0, **still), spec, torch.Generator().manual_seed(0))(batch)
    resized = torch.nn.functional.interpolate(batch.float() / 255, size=(32, 32), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(plain, (resized - mean) / std, atol=1e-4, rtol=0)
    mirrored = BatchAugment(AugmentConfig(hflip=1.0, **still), spec, torch.Generator().manual_seed(0))(batch)
    torch.testing.assert_close(mirrored, plain.flip(-1), atol=1e-4, rtol=0)


def test_input_spec_rejects_bad_manifest_values():
    with pytest.raises(ValueError, match="interpolation"):
        InputSpec(height=32, width=32, resize_shorter=32, interpolation="nearest")
    with pytest.raises(ValueError, match="resize_shorter"):
        InputSpec(height=32, width=32, resize_shorter=16)
