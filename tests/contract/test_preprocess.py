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


@pytest.mark.parametrize("field, values, reason", [
    ("std", (1e-50, 0.25, 0.25), r"input\.std/0: expected a number from 1e-06"),       # 0 as float32: scale inf
    ("std", (0.25, 1e-7, 0.25), r"input\.std/1: expected a number from 1e-06"),
    ("std", (0.25, 0.25, 1e300), r"input\.std/2: expected a number from"),
    ("mean", (1e300, 0.5, 0.5), r"input\.mean/0: expected a finite number of magnitude at most"),   # -inf input
    ("mean", (0.5, float("nan"), 0.5), r"input\.mean/1: expected a finite number"),
    ("mean", (0.5, 0.5), r"input\.mean: expected 3 numbers"),
])
def test_input_spec_refuses_a_normalization_that_gives_non_finite_model_input(field, values, reason):
    with pytest.raises(ValueError, match=reason):
        InputSpec(height=16, width=16, resize_shorter=16, **{field: values})


def test_a_manifest_normalization_that_gives_non_finite_model_input_is_a_bundle_error(tmp_path):
    """Through the manifest (the schema only says std > 0), naming the manifest and the field."""
    from contract.bundle import BundleError, load_bundle
    from tests.agent.agent_support import make_onnx_bundle

    bundle = make_onnx_bundle(tmp_path)
    text = (bundle / "manifest.json").read_text()
    for literal, reason in (("1e-50", r"field input: input\.std/0"), ("1" + "0" * 400, r"field input: input\.std")):
        (bundle / "manifest.json").write_text(text.replace('"std": [\n      0.25', f'"std": [\n      {literal}', 1))
        with pytest.raises(BundleError, match=f"{bundle / 'manifest.json'}: {reason}"):
            load_bundle(bundle)
    (bundle / "manifest.json").write_text(text)
    spec = load_bundle(bundle).input_spec
    out = Preprocessor(spec)(np.full((20, 20, 3), 255, np.uint8))
    assert np.isfinite(out).all()


def test_resize_shorter_must_cover_the_longer_side_of_the_crop():
    """The resized image's shorter side is resize_shorter: a 16x24 crop from a square frame resized to 16 would be
    16x16, and the model fed (3, 16, 16) for its (3, 16, 24)."""
    with pytest.raises(ValueError, match=r"input\.resize_shorter \(16\) must be >= the crop size \(16x24\)"):
        InputSpec(height=16, width=24, resize_shorter=16)
    with pytest.raises(ValueError, match=r"input\.resize_shorter \(20\) must be >= the crop size \(24x16\)"):
        InputSpec(height=24, width=16, resize_shorter=20)
    spec = InputSpec(height=16, width=24, resize_shorter=24)
    for frame in (np.zeros((40, 40, 3), np.uint8), np.zeros((30, 90, 3), np.uint8), np.zeros((90, 30, 3), np.uint8)):
        assert Preprocessor(spec)(frame).shape == (3, 16, 24)
        assert Preprocessor(spec).batch([frame]).shape == (1, 3, 16, 24)
    # what the trainer writes: a square input, resize_shorter at least its side
    assert eval_spec(32).resize_shorter == 32 and eval_spec(224, 256).resize_shorter == 256


def test_a_16_bit_frame_is_shifted_to_8_bits_like_a_decoded_16_bit_image():
    """decode_image shifts 16-bit pixels down to 8 bits; to_rgb (what an OpenCV source's frames go through) does
    the same, so a 16-bit camera frame is the picture the model saw in training, not 257 times brighter."""
    import cv2

    from contract.preprocess import decode_image, to_rgb

    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    wide = rgb.astype(np.uint16) * 257                       # the same picture in 16 bits
    ok, png = cv2.imencode(".png", cv2.cvtColor(wide, cv2.COLOR_RGB2BGR))
    assert ok
    decoded = decode_image(png.tobytes())
    for got in (to_rgb(wide), to_rgb(wide[:, :, ::-1], bgr=True), to_rgb(np.dstack([wide, wide[:, :, :1]]))):
        assert got.dtype == np.uint8 and np.array_equal(got, rgb) and np.array_equal(got, decoded)
    gray = to_rgb(wide[:, :, 0])
    assert gray.dtype == np.uint8 and np.array_equal(gray[:, :, 1], rgb[:, :, 0])
    # other pixel types are left for the caller to refuse as a frame (the camera counts it, it does not reconnect)
    assert to_rgb(rgb.astype(np.float32)).dtype == np.float32


def test_an_image_whose_header_declares_more_pixels_than_opencv_decodes_is_an_image_decode_error(tmp_path):
    """cv2.imdecode raises cv2.error (not None) for a PNG declaring 60000 x 60000: every reader of images (a
    dataset, a camera folder, enrolment) must get the one error it skips and counts, naming the file."""
    import struct
    import zlib

    from contract.preprocess import ImageDecodeError, decode_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with pytest.raises(ImageDecodeError, match=f"{bomb}: not a decodable image"):
        decode_image(bomb.read_bytes(), name=str(bomb))     # read_image refuses it from its header, before this
    with pytest.raises(ImageDecodeError, match=f"{bomb}: its header declares 60000x60000 pixels"):
        read_image(bomb)
