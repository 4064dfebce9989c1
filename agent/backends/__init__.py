"""Inference backends and the factory that picks one for a bundle."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from agent.backends.base import Backend, BackendError, outputs_of
from agent.config import ModelConfig
from contract.bundle import Artifact, Bundle, sample_input

log = logging.getLogger(__name__)

__all__ = ["Backend", "BackendError", "create_backend", "outputs_of"]


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def compatible_engines(engines: list[Artifact], tensorrt_version: str | None,
                       compute_capability: str | None = None) -> list[Artifact]:
    """Engines built for this TensorRT major.minor (and GPU, when known): others fail to deserialize. Those built
    with exactly this version come first: TensorRT deserializes an engine of another patch release only when it
    was built version-compatible, so of two shipped engines the exact one is the one that runs."""
    if tensorrt_version is None:
        return []
    want = tensorrt_version.split(".")[:2]
    usable = [e for e in engines if (e.tensorrt_version or "").split(".")[:2] == want
              and (compute_capability is None or e.compute_capability == compute_capability)]
    return sorted(usable, key=lambda e: e.tensorrt_version != tensorrt_version)      # stable: manifest order next


def _compute_capability() -> str | None:
    """This device's GPU ("8.7"), or None where it cannot be probed (no TensorRT, no CUDA)."""
    if not tensorrt_available():
        return None
    try:
        from agent.engine_cache import probe_device

        return probe_device().compute_capability
    except Exception:   # noqa: BLE001 - no GPU to ask: no shipped engine is taken on a guess
        return None


def _installed_tensorrt_version() -> str | None:
    if not tensorrt_available():
        return None
    import tensorrt  # type: ignore[import-not-found]

    return str(tensorrt.__version__)


def _engine_backend(path: Path, bundle: Bundle, cfg: ModelConfig, precision: str) -> Backend:
    """A TensorRT engine backend, run once on the bundle's sample batch as every ONNX candidate is; any failure of
    the binding (a null context, an AttributeError, a RuntimeError), outputs that are not finite (an FP16 engine
    whose activations overflow) or not of the manifest's size is a BackendError, which ``backend: auto`` answers
    with ONNX Runtime. Left to the warm-up after the choice, such an engine stopped the start under ``auto`` too,
    at every restart."""
    from agent.backends.artifact_choice import check_candidate
    from agent.backends.tensorrt import TensorRTBackend

    try:
        backend = TensorRTBackend(path, bundle.input_spec, precision=precision, max_batch=cfg.batch_size,
                                  embedding_name=bundle.embedding_name)
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001 - a binding's own error (AttributeError, RuntimeError, ...)
        raise BackendError(f"{path}: TensorRT cannot run the engine ({type(exc).__name__}: {exc})") from exc
    try:
        check_candidate(bundle, backend, sample_input(bundle.input_spec, cfg.batch_size), path.name)
    except BackendError as exc:
        raise BackendError(f"{path}: {exc}") from exc
    return backend


def create_backend(bundle: Bundle, cfg: ModelConfig, engine: Path | None = None,
                   engine_precision: str | None = None) -> Backend:
    """TensorRT engine when chosen (or auto and present), else ONNX Runtime on the INT8 or FP32 artifact
    ``model.precision`` picks (auto: the faster one here, measured at load; agent/backends/artifact_choice.py).

    A bundle with ``open_set`` gets a backend that also gives its embedding output (``run_outputs``).

    ``engine``: an engine for this device made outside the bundle (``agent.startup`` builds or reuses it
    from its cache and passes it in ``INVENTORY_AGENT_ENGINE``); it wins over the bundle's engines.
    """
    if engine is not None and cfg.backend != "onnxruntime":
        if cfg.backend == "tensorrt" or tensorrt_available():
            try:
                return _engine_backend(engine, bundle, cfg, engine_precision or "fp16")
            except Exception as exc:  # noqa: BLE001 - auto: whatever the engine does, ONNX Runtime runs instead
                if cfg.backend == "tensorrt":
                    raise
                log.warning("%s: the device's engine cannot run here (%s); using ONNX Runtime", engine, exc)
        else:
            log.warning("%s: engine given but tensorrt is not importable; using ONNX Runtime", engine)
    engines = bundle.engines()
    if engines and cfg.backend in ("auto", "tensorrt"):
        gpu = _compute_capability()          # an engine built for another GPU does not deserialize
        usable = compatible_engines(engines, _installed_tensorrt_version(), gpu)
        if cfg.backend == "auto" and gpu is None:
            usable = []                      # the GPU is not known: auto takes no chance on a shipped engine
        if cfg.backend == "tensorrt" and tensorrt_available() and not usable:
            raise BackendError(f"{bundle.root}: no engine built for TensorRT {_installed_tensorrt_version()} "
                               f"(bundle has {', '.join(str(e.tensorrt_version) for e in engines)})")
        engines = usable or (engines if cfg.backend == "tensorrt" else [])
    if cfg.backend == "tensorrt" or (cfg.backend == "auto" and engines and tensorrt_available()):
        if not engines:
            raise BackendError(f"{bundle.root}: backend 'tensorrt' chosen but the bundle has no deployable engine")
        engine = engines[0]
        try:
            return _engine_backend(engine.path, bundle, cfg, engine.precision)
        except Exception as exc:  # noqa: BLE001 - auto: whatever the engine does, ONNX Runtime runs instead
            if cfg.backend == "tensorrt":
                raise
            log.warning("%s: the bundle's engine cannot run here (%s); using ONNX Runtime", engine.path, exc)
    from agent.backends.artifact_choice import choose_onnx_backend
    from agent.backends.onnxruntime import OnnxRuntimeBackend

    def build(artifact: Artifact) -> Backend:
        return OnnxRuntimeBackend(artifact.path, bundle.input_spec, precision=artifact.precision,
                                  providers=cfg.providers, intra_op_threads=cfg.intra_op_threads,
                                  tune_batch=cfg.batch_size, embedding_name=bundle.embedding_name)

    return choose_onnx_backend(bundle, cfg.onnx_precision, cfg.batch_size, build)
