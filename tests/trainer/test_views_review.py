"""Review of the training views: mask files of every PNG kind, settings of the wrong type, augmentation output
ranges, and INT8 calibration that refuses non-finite images and activations."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from contract.preprocess import CropPolicy, Preprocessor, read_image
from trainer.augment import AugmentConfig, BatchAugment, eval_spec, load_canvas
from trainer.export.quantize import CalibrationError, QuantizeConfig, quantize_qdq
from trainer.station_view import StationViewConfig

SPEC = eval_spec(32)


def _image_with_mask(folder: Path, mask: np.ndarray) -> Path:
    """A 64 x 64 photo (grey item on a textured background, so the border rule finds nothing) and its mask file."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image[16:48, 16:48] = 200
    path = folder / "item.png"
    assert cv2.imwrite(str(path), image) and cv2.imwrite(str(folder / "item.mask.png"), mask)
    return path


def _item_pixels(canvas: np.ndarray) -> int:
    return int((canvas[3] > 127).sum())


@pytest.mark.parametrize("value", [1, 200, 65535], ids=["label-1", "under-256", "full"])
def test_a_16_bit_mask_file_marks_its_non_zero_pixels(tmp_path, value):
    # given: a 16-bit mask, item = ``value`` (label masks are often 0 and 1), background 0
    mask = np.zeros((64, 64), np.uint16)
    mask[16:48, 16:48] = value
    path = _image_with_mask(tmp_path, mask)
    # when: the training canvas is loaded with its mask
    canvas = load_canvas(path, SPEC, with_mask=True)
    # then: the item's square (32 of 64 px -> 16 of 32 px) is the mask; before, a value under 256 read as 8-bit
    # RGB was 0 and the mask file was silently ignored
    assert _item_pixels(canvas) == 16 * 16


def test_an_rgba_mask_files_transparent_pixels_are_not_the_item(tmp_path):
    # given: a cut-out mask: opaque white item, the rest transparent white (as image editors export it)
    mask = np.full((64, 64, 4), 255, np.uint8)
    mask[..., 3] = 0
    mask[16:48, 16:48, 3] = 255
    path = _image_with_mask(tmp_path, mask)
    # then: only the opaque square is the item (before: the alpha was dropped, every pixel was the item)
    assert _item_pixels(load_canvas(path, SPEC, with_mask=True)) == 16 * 16


def test_a_mask_file_that_marks_no_pixel_is_named_in_a_warning(tmp_path, caplog):
    # given: a mask file with no non-zero pixel
    path = _image_with_mask(tmp_path, np.zeros((64, 64), np.uint8))
    # when
    with caplog.at_level(logging.WARNING, logger="trainer.augment"):
        canvas = load_canvas(path, SPEC, with_mask=True)
    # then: the renderer finds the mask from the image (no mask channel) and the file is named, not silently unused
    assert _item_pixels(canvas) == 0
    assert any(str(tmp_path / "item.mask.png") in r.getMessage() and "no pixel" in r.getMessage()
               for r in caplog.records), caplog.text


@pytest.mark.parametrize("raw, field", [
    ({"scale": 0.5}, "augment.scale"), ({"scale": ["0.5", "1"]}, "augment.scale"), ({"ratio": None}, "augment.ratio"),
    ({"hflip": True}, "augment.hflip"), ({"hfilp": 0.5}, "unknown field(s) ['hfilp']"),
])
def test_a_config_json_augment_setting_of_the_wrong_type_or_name_is_refused_by_name(raw, field):
    # a run's config.json, edited by hand, reaches AugmentConfig.from_dict on --resume: before, these gave a
    # TypeError naming no setting (or, for a bool, trained with it)
    with pytest.raises(ValueError, match=re.escape(field)):
        AugmentConfig.from_dict(raw)


def test_augmentation_gives_finite_pixels_in_range_at_the_settings_extremes():
    """The most extreme accepted settings, on canvases that are all black, all white, a one-pixel item and a mask
    channel of one faint pixel: every output pixel is finite and, un-normalized, inside 0..1."""
    extreme = StationViewConfig(
        share=1.0, rotation=180, scale_jitter=1.0, position_jitter=0.5, out_of_view=1.0,
        out_of_view_fraction=(0.99, 0.99), tilt=0.49, gain=(0.01, 100.0), white_balance=0.99, item_colour=0.99,
        item_gain=(0.01, 100.0), shadow=1.0, shadow_strength=(1.0, 1.0), shadow_offset_px=250.0,
        shadow_softness_px=250.0, shadow_in_box=1.0, gradient=0.99, noise=1.0, blur=1.0, motion_blur_px=250.0,
        defocus_px=250.0, jpeg=1.0, jpeg_quality=(1, 1))
    x = torch.randint(0, 256, (12, 4, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[0], x[1], x[:, 3] = 0, 255, 0
    x[2, :3] = 0
    x[2, :3, 20, 20] = 255
    x[3, 3] = 255
    x[4, 3, 0, 0] = 100
    for margin in (0.0, 1.0):
        spec = eval_spec(32, 40, crop=CropPolicy("foreground", margin))
        for station in (extreme, StationViewConfig(enabled=False)):
            aug = BatchAugment(AugmentConfig(scale=(0.01, 1.0), erasing=1.0, rotation=180, brightness=1.0,
                                             contrast=1.0, saturation=1.0, station_view=station), spec,
                               torch.Generator().manual_seed(1))
            out = aug(x)
            pixels = out * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
            assert torch.isfinite(out).all()
            assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


class _SmallNet(torch.nn.Module):
    """Logits and an embedding, as the trainer's models export them."""

    def __init__(self, weight: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 1), torch.nn.Linear(4, 10)
        if weight is not None:      # activations that overflow float32 on ordinary images
            torch.nn.init.constant_(self.a.weight, weight)
            torch.nn.init.constant_(self.b.weight, weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3))
        return self.head(embedding), embedding


def _onnx(model: torch.nn.Module, path: Path) -> Path:
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits", "embedding"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def real_inputs(fmnist_dir) -> np.ndarray:
    paths = sorted((fmnist_dir / "test").glob("*/*.png"))[::50][:12]
    return Preprocessor(SPEC).batch([read_image(p) for p in paths])


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_calibration_image_with_nan_or_infinity_is_refused_naming_it(real_inputs, tmp_path, method, bad):
    # given: 12 real calibration images, the 7th with one non-finite pixel
    images = real_inputs.copy()
    images[6, 1, 5, 5] = bad
    out = tmp_path / "int8.onnx"
    # then: no INT8 model, and the image is named (before: MinMax wrote an infinite input scale, NaN was left out
    # of every range without a word, the histogram methods raised numpy's "range ... is not finite")
    with pytest.raises(CalibrationError, match=r"calibration image 7 of 12 holds NaN or infinity"):
        quantize_qdq(_onnx(_SmallNet(), tmp_path / "fp32.onnx"), out, images, QuantizeConfig(method=method,
                                                                                             batch_size=4))
    assert not out.exists()


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_a_model_whose_activations_overflow_gets_no_int8_model(real_inputs, tmp_path, method):
    # given: a model whose activations reach infinity on real (finite) images
    fp32 = _onnx(_SmallNet(weight=1e20), tmp_path / "fp32.onnx")
    out = tmp_path / "int8.onnx"
    # then: a CalibrationError naming the tensor (before: MinMax wrote a model with 13 infinite scales)
    with pytest.raises(CalibrationError, match=r"activation '.+'.*not finite|activation '.+'.*NaN or infinity"):
        quantize_qdq(fp32, out, real_inputs, QuantizeConfig(method=method, batch_size=4))
    assert not out.exists()


def test_calibration_on_fewer_images_than_a_batch_writes_both_outputs(real_inputs, tmp_path):
    # given: 5 real images, batch 8
    fp32 = _onnx(_SmallNet(), tmp_path / "fp32.onnx")
    out = tmp_path / "int8.onnx"
    info = quantize_qdq(fp32, out, real_inputs[:5], QuantizeConfig(method="percentile", batch_size=8))
    # then: the QDQ model keeps both outputs, logits in float, every scale finite, both outputs finite
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"] and info["float_outputs"] == ["logits"]
    scales = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer if t.name.endswith("_scale")]
    assert scales and all(np.isfinite(s).all() and (s > 0).all() for s in scales)
    logits, embedding = session.run(None, {"input": real_inputs})
    assert logits.shape == (12, 10) and embedding.shape == (12, 4)
    assert np.isfinite(logits).all() and np.isfinite(embedding).all()
