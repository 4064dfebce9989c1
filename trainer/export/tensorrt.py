"""TensorRT engines (FP16 from the FP32 ONNX, INT8 from the QDQ ONNX) where TensorRT imports.

TensorRT is imported lazily: on a machine without it, ``tensorrt_available()``
is False and the exporter records why no engine was built. Engines are only
valid for the TensorRT version and GPU compute capability they were built
with; both go into the manifest and the file name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from agent.engine_cache import EngineCacheError, serialize_engine

log = logging.getLogger(__name__)


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a CUDA GPU) is not present on this machine."""


def _trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed (pip install tensorrt, or use a JetPack/L4T image); no engine built"
        ) from exc
    return trt


def tensorrt_available() -> bool:
    try:
        _trt()
    except TensorRTUnavailable:
        return False
    return True


def require_tensorrt_gpu() -> None:
    """Raise TensorRTUnavailable unless both TensorRT and a CUDA GPU are here."""
    _trt()
    compute_capability()


def compute_capability() -> str:
    """'major.minor' of GPU 0, from torch (the trainer has it) or cuda-python."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except ImportError:
        pass
    raise TensorRTUnavailable("no CUDA GPU visible; a TensorRT engine must be built on (or for) its target GPU")


@dataclass(frozen=True)
class EngineSpec:
    precision: str  # "fp16" or "int8"
    height: int
    width: int
    max_batch: int = 32
    opt_batch: int = 8
    workspace_mib: int = 1024


def engine_filename(precision: str, cc: str, trt_version: str) -> str:
    return f"model.{precision}.sm{cc.replace('.', '')}.trt{trt_version}.engine"


def build_engine(onnx_path: Path, out_dir: Path, spec: EngineSpec, input_name: str = "input") -> dict:
    """Parse ``onnx_path`` and serialize an engine (the station's own build, ``agent.engine_cache.serialize_engine``);
    returns the manifest fields for it. The profile is set on the network's input (``input_name`` is its name in
    the manifest, kept for callers)."""
    trt = _trt()
    cc = compute_capability()
    try:
        serialized = serialize_engine(trt, onnx_path, spec.precision, spec.height, spec.width,
                                      opt_batch=spec.opt_batch, max_batch=spec.max_batch,
                                      workspace_mib=spec.workspace_mib)
    except EngineCacheError as exc:
        raise RuntimeError(str(exc)) from None
    out = out_dir / engine_filename(spec.precision, cc, trt.__version__)
    out.write_bytes(serialized)
    log.info("TensorRT %s engine %s (TensorRT %s, sm %s)", spec.precision, out, trt.__version__, cc)
    return {"path": out, "precision": spec.precision, "tensorrt_version": trt.__version__, "compute_capability": cc,
            "max_batch": spec.max_batch}
