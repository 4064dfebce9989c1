"""Inference backends and the factory that picks one for a bundle."""

from __future__ import annotations

import importlib.util
import logging

from agent.backends.base import Backend, BackendError
from agent.bundle import Bundle
from agent.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["Backend", "BackendError", "create_backend"]


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def create_backend(bundle: Bundle, cfg: ModelConfig) -> Backend:
    """TensorRT engine when chosen (or auto and present), else ONNX Runtime on the INT8/FP32 pick."""
    engines = bundle.engines()
    if cfg.backend == "tensorrt" or (cfg.backend == "auto" and engines and tensorrt_available()):
        from agent.backends.tensorrt import TensorRTBackend

        if not engines:
            raise BackendError(f"{bundle.root}: backend 'tensorrt' chosen but the bundle has no deployable engine")
        engine = engines[0]
        return TensorRTBackend(engine.path, bundle.input_spec, precision=engine.precision, max_batch=cfg.batch_size)
    from agent.backends.onnxruntime import OnnxRuntimeBackend

    artifact = bundle.pick_onnx(prefer_int8=cfg.prefer_int8)
    return OnnxRuntimeBackend(artifact.path, bundle.input_spec, precision=artifact.precision,
                              providers=cfg.providers, intra_op_threads=cfg.intra_op_threads)
