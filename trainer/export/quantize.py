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
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    batch_size: int = 32


class ArrayCalibrationReader:
    """Feeds preprocessed calibration images to ONNX Runtime's calibrator, batch by batch."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int) -> None:
        self.input_name = input_name
        # Equal batches: ONNX Runtime's calibrator stacks the intermediate outputs of every batch and fails
        # on a shorter last one, so the largest size <= batch_size that divides the image count is used.
        size = max(b for b in range(1, max(1, min(batch_size, len(images))) + 1) if len(images) % b == 0)
        self.batches = [images[i : i + size] for i in range(0, len(images), size)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        batch = self.batches[self.position]
        self.position += 1
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.position = 0


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: np.ndarray | None, cfg: QuantizeConfig,
                 input_name: str = "input") -> dict:
    """Write a QDQ INT8 model calibrated on ``calibration`` (N x 3 x H x W float32, preprocessed)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration is None or len(calibration) == 0:
        raise CalibrationError("INT8 calibration needs real images: none were given (refusing to use random scales)")
    if calibration.ndim != 4 or calibration.dtype != np.float32:
        raise CalibrationError(f"calibration images must be N x 3 x H x W float32, got {calibration.shape} {calibration.dtype}")
    if cfg.method not in CALIBRATION_METHODS:
        raise CalibrationError(f"calibration method: expected one of {CALIBRATION_METHODS}, got {cfg.method!r}")
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[cfg.method]
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "OpTypesToExcludeOutputQuantization": ["Gemm"]}
    if cfg.method == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(out_path), ArrayCalibrationReader(input_name, calibration, cfg.batch_size),
            quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=method, extra_options=extra,
        )
    graph = onnx.load(str(out_path)).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    float_outputs = [o.name for o in graph.output if producer.get(o.name) != "DequantizeLinear"]
    log.info("INT8 QDQ model %s calibrated on %d images (%s)", out_path, len(calibration), cfg.method)
    return {"calibration_images": int(len(calibration)), "method": cfg.method, "per_channel": cfg.per_channel,
            "activations": "int8 symmetric", "weights": "int8 symmetric" + (" per-channel" if cfg.per_channel else ""),
            "float_outputs": float_outputs}


def int8_gate(fp32_accuracy: float, int8_accuracy: float, margin_points: float) -> tuple[bool, str | None]:
    """INT8 is deployable when its top-1 is within ``margin_points`` percentage points of FP32."""
    delta = round((int8_accuracy - fp32_accuracy) * 100, 9)  # 0.89 - 0.90 is not exactly -0.01 in floats
    if delta >= -margin_points:
        return True, None
    return False, (f"INT8 top-1 {int8_accuracy * 100:.2f}% is {-delta:.2f} points below FP32 "
                   f"{fp32_accuracy * 100:.2f}% (gate allows {margin_points:.2f})")
