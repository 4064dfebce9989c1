"""INT8 post-training quantization with explicit Q/DQ nodes, and the accuracy gate.

The INT8 model is what TensorRT builds its INT8 engine from, so it uses
symmetric INT8 for weights (per channel) and activations: the Q/DQ form
TensorRT's explicit quantization expects. Calibration always uses real images;
without them there is no INT8 model (never random scales).

The logits stay float: the classifier (the one Gemm of every supported architecture)
runs on INT8 inputs and weights, but ONNX Runtime is told not to quantize its output
(``OpTypesToExcludeOutputQuantization``). Rounded logits move in steps of the output
scale (about 0.1 for a small classifier), so many frames get exactly tied top-2 scores:
their margin is 0, their argmax falls to the lower class index, and the agent's
low-confidence ranking cannot tell them apart.

Calibration runs in bounded memory: ONNX Runtime's calibrator, fed through quantize_static, keeps every
intermediate output of every batch (a ResNet50 at 224 px peaked at 9.1 GB with 64 images and was killed
at 24 GB with 512), and its ``CalibMaxIntermediateOutputs`` does not help in 1.32: the histogram methods
ignore it and MinMax throws the cleared batches away. So the ranges are computed here, one batch at a
time (``calibration_ranges``), equal to ORT's one-shot ranges, and handed to quantize_static as its
calibration cache.

The images themselves are streamed too (trainer.evaluate.ModelInputs): read, preprocessed and fed a chunk at a
time on each pass, in the same batches as one array of them would give, so the ranges are the same.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.evaluate import ModelInputs, input_batches

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


class CalibrationError(ValueError):
    """Calibration cannot run (no or unusable images)."""


@dataclass(frozen=True)
class QuantizeConfig:
    calibration_images: int = 512
    method: str = "percentile"
    percentile: float = 99.99
    per_channel: bool = True
    # Images per calibration run, and the most whose intermediate outputs are held at once: the memory bound
    # (a ResNet50 at 224 px has about 100 MB of calibrated activations per image; see calibration_ranges).
    batch_size: int = 8


def calibration_batches(images: np.ndarray | ModelInputs, batch_size: int) -> Iterator[np.ndarray]:
    """``images``, ``batch_size`` at a time (those of the whole array, whatever the chunks of a stream); each is
    calibrated on its own, so a shorter last one is fine. CalibrationError for a batch that is not N x 3 x H x W
    float32, or an image holding NaN or infinity (a stream's chunks are only seen here): an infinite input gave the
    input tensor an infinite scale (MinMax) or a numpy error naming nothing (the histogram methods), and NaN was
    left out of the ranges without a word."""
    start = 0
    for batch in input_batches(images, batch_size):
        if batch.ndim != 4 or batch.dtype != np.float32:
            raise CalibrationError(f"calibration images must be N x 3 x H x W float32, got {batch.shape} {batch.dtype}")
        finite = np.isfinite(batch).reshape(len(batch), -1).all(axis=1)
        if not finite.all():
            first = start + int(np.flatnonzero(~finite)[0])
            raise CalibrationError(f"calibration image {first + 1} of {len(images)} holds NaN or infinity "
                                   f"({int((~finite).sum())} such among images {start + 1}-{start + len(batch)}); "
                                   "not calibrated on (the INT8 ranges must be finite)")
        start += len(batch)
        yield batch


def _check_finite_ranges(ranges, method: str):
    """``ranges`` (ORT TensorsData), or CalibrationError naming the first tensor whose range is not finite: finite
    images whose activations overflow (or turn NaN) in the FP32 model would give that tensor an infinite or NaN
    scale in the INT8 model."""
    for name, data in ranges.data.items():
        if not all(np.isfinite(np.asarray(v, np.float64)).all() for v in data.range_value):
            raise CalibrationError(f"activation {name!r}: its calibrated range ({method}) is not finite "
                                   f"({', '.join(str(v) for v in data.range_value)}): the FP32 model gives NaN or "
                                   "infinity on the calibration images; no INT8 model is written")
    return ranges


def _calibrator_options(cfg: QuantizeConfig) -> dict:
    """The calibrator options quantize_static would derive from our extra options (its defaults otherwise)."""
    return {"percentile": cfg.percentile} if cfg.method == "percentile" else {}


def _tensor_extent(outputs: dict[str, np.ndarray], extent: dict[str, tuple]) -> None:
    """Fold one batch into each tensor's (min, max, smallest |x|, largest |x|)."""
    for name, arr in outputs.items():
        if arr.size == 0:
            continue
        lo, hi = np.min(arr), np.max(arr)     # NaN kept: _stream_histograms refuses a non-finite extent
        absolute = np.abs(arr)
        alo, ahi = np.min(absolute), np.max(absolute)
        if name in extent:
            old = extent[name]
            lo, hi, alo, ahi = min(old[0], lo), max(old[1], hi), min(old[2], alo), max(old[3], ahi)
        extent[name] = (lo, hi, alo, ahi)


def _empty_histogram(extent: tuple, num_bins: int, absolute: bool) -> tuple:
    """The histogram ONNX Runtime would start from had it seen every batch at once: same range, same bins.

    ``absolute``: the symmetric percentile method bins |x| over [min |x|, max |x|] (ORT's collect_absolute_value);
    the others bin x over [-t, t], t = max |x| (collect_value). Merging a batch into a histogram with this range
    never re-bins, so the streamed histogram equals the one-shot one."""
    lo, hi, alo, ahi = extent
    dtype = np.asarray(hi).dtype
    if absolute:
        edges = np.histogram(np.array([alo, ahi], dtype=dtype), bins=num_bins)[1].astype(dtype)
        return np.zeros(num_bins, np.int64), edges, lo, hi
    threshold = np.array(max(abs(lo), abs(hi)), dtype=dtype)
    edges = np.histogram(np.zeros(0, dtype), num_bins, range=(-threshold, threshold))[1]
    return np.zeros(num_bins, np.int64), edges, lo, hi, threshold


def _stream_histograms(calibrator, input_name: str, images: np.ndarray | ModelInputs, batch_size: int) -> None:
    """Histogram calibration one batch at a time, in two passes: the tensors' extents, then their histograms.

    ORT's HistogramCalibrater.collect_data keeps every batch's intermediate outputs until the reader is empty
    (and ignores CalibMaxIntermediateOutputs); fed one batch per call, it re-bins at every merge, which moves
    the percentile ranges slightly and the entropy ones a lot. Knowing each tensor's final extent first
    keeps the bins of the one-shot histogram, so the result is the same, for the price of a second pass."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    session = calibrator.infer_session
    wanted = [o.name for o in session.get_outputs() if o.name in calibrator.tensors_to_calibrate]

    def outputs(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(wanted, session.run(wanted, {input_name: batch})))

    extent: dict[str, tuple] = {}
    for batch in calibration_batches(images, batch_size):
        _tensor_extent(outputs(batch), extent)
    for name, (lo, hi, _, _) in extent.items():
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise CalibrationError(f"activation {name!r}: the FP32 model gives NaN or infinity on the calibration "
                                   f"images (range {lo} to {hi}); its INT8 range cannot be calibrated, no INT8 model "
                                   "is written")
    collector = HistogramCollector(method=calibrator.method, symmetric=calibrator.symmetric,
                                   num_bins=calibrator.num_bins, num_quantized_bins=calibrator.num_quantized_bins,
                                   percentile=calibrator.percentile, scenario=calibrator.scenario)
    absolute = calibrator.method == "percentile" and calibrator.symmetric
    collector.histogram_dict = {name: _empty_histogram(e, calibrator.num_bins, absolute) for name, e in extent.items()}
    for batch in calibration_batches(images, batch_size):
        collector.collect(outputs(batch))
    calibrator.collector = collector


def calibration_ranges(prepared: Path, work_dir: Path, images: np.ndarray | ModelInputs, cfg: QuantizeConfig,
                       input_name: str):
    """Every activation's range (ORT TensorsData), holding one batch's intermediate outputs at a time.

    quantize_static with a reader keeps all of them: 9.0 GB at 64 ResNet50 images of 224 px, killed at
    24 GB with 512 (benchmarks/results/export_memory.json). MinMax folds each batch into running ranges
    (exact); the histogram methods go through _stream_histograms."""
    from onnxruntime.quantization.calibrate import create_calibrator

    calibrator = create_calibrator(prepared, None, augmented_model_path=str(work_dir / "augmented.onnx"),
                                   calibrate_method=ort_calibration_method(cfg.method),
                                   extra_options=_calibrator_options(cfg))
    with _ort_prints_to_log():
        if cfg.method == "minmax":
            for batch in calibration_batches(images, cfg.batch_size):
                calibrator.collect_data(_OneBatch(input_name, batch))
        else:
            _stream_histograms(calibrator, input_name, images, cfg.batch_size)
        return _check_finite_ranges(calibrator.compute_data(), cfg.method)


class _OneBatch:
    """A calibration data reader that yields a single batch."""

    def __init__(self, input_name: str, batch: np.ndarray) -> None:
        self.feed: dict | None = {input_name: batch}

    def get_next(self) -> dict | None:
        feed, self.feed = self.feed, None
        return feed


def ort_calibration_method(method: str):
    """ONNX Runtime's CalibrationMethod for one of CALIBRATION_METHODS."""
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[method]


@contextlib.contextmanager
def _ort_prints_to_log() -> Iterator[None]:
    """ORT's histogram collector prints a line per call; send them to the debug log instead."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    for line in buffer.getvalue().splitlines():
        log.debug("onnxruntime: %s", line)


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: np.ndarray | ModelInputs | None, cfg: QuantizeConfig,
                 input_name: str = "input") -> dict:
    """Write a QDQ INT8 model calibrated on ``calibration`` (N x 3 x H x W float32, preprocessed: an array, or
    ModelInputs read a chunk at a time on each of the calibration's passes)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration is None or len(calibration) == 0:
        raise CalibrationError("INT8 calibration needs real images: none were given (refusing to use random scales)")
    if isinstance(calibration, np.ndarray) and (calibration.ndim != 4 or calibration.dtype != np.float32):
        raise CalibrationError(f"calibration images must be N x 3 x H x W float32, got {calibration.shape} {calibration.dtype}")
    if cfg.method not in CALIBRATION_METHODS:
        raise CalibrationError(f"calibration method: expected one of {CALIBRATION_METHODS}, got {cfg.method!r}")
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise CalibrationError("INT8 export needs onnxruntime whose quantize_static takes calibration_cache_path "
                               "(1.32 does): the ranges are computed here, in bounded memory, and handed over")
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "OpTypesToExcludeOutputQuantization": ["Gemm"]}
    if cfg.method == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    with tempfile.TemporaryDirectory() as tmp:
        prepared, ranges_file = Path(tmp) / "prepared.onnx", Path(tmp) / "ranges.json"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        save_tensors_data(calibration_ranges(prepared, Path(tmp), calibration, cfg, input_name), ranges_file)
        quantize_static(
            str(prepared), str(out_path), None, calibration_cache_path=str(ranges_file),
            quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=ort_calibration_method(cfg.method), extra_options=extra,
        )
    graph = onnx.load(str(out_path)).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    float_outputs = [o.name for o in graph.output if producer.get(o.name) != "DequantizeLinear"]
    log.info("INT8 QDQ model %s calibrated on %d images (%s, %d at a time)", out_path, len(calibration), cfg.method,
             cfg.batch_size)
    return {"calibration_images": int(len(calibration)), "method": cfg.method, "per_channel": cfg.per_channel,
            "batch_size": cfg.batch_size,
            "activations": "int8 symmetric", "weights": "int8 symmetric" + (" per-channel" if cfg.per_channel else ""),
            "float_outputs": float_outputs}


def int8_gate(fp32_accuracy: float, int8_accuracy: float, margin_points: float) -> tuple[bool, str | None]:
    """INT8 is deployable when its top-1 is within ``margin_points`` percentage points of FP32."""
    delta = round((int8_accuracy - fp32_accuracy) * 100, 9)  # 0.89 - 0.90 is not exactly -0.01 in floats
    if delta >= -margin_points:
        return True, None
    return False, (f"INT8 top-1 {int8_accuracy * 100:.2f}% is {-delta:.2f} points below FP32 "
                   f"{fp32_accuracy * 100:.2f}% (gate allows {margin_points:.2f})")
