"""Native TensorRT 10 engine backend, imported lazily: only Jetson images have tensorrt.

Buffers are managed with cuda-python (``cuda.bindings.runtime`` or the older ``cuda.cudart``), which the
Jetson image installs; without it the backend is a BackendError (``backend: auto`` then runs ONNX Runtime).

The batch the engine takes is its optimization profile's largest (``get_tensor_profile_shape``), never more
than ``model.batch_size``: a larger batch is run in chunks, not refused by ``set_input_shape``.

Every output tensor of the engine gets a device buffer (TensorRT 10 needs an address for each I/O tensor
before ``execute_async_v3``). The logits are the manifest's ``output_name`` (else the first output that is
not the embedding); with an ``embedding_name`` (a bundle with ``open_set``) that tensor is copied back too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from agent.backends.base import BackendError, check_warmup_outputs
from contract.preprocess import InputSpec

log = logging.getLogger(__name__)


def _import_tensorrt():
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BackendError(
            "backend 'tensorrt' chosen but the tensorrt Python package is not installed "
            "(it ships with JetPack / the TensorRT wheels); use backend: onnxruntime or auto"
        ) from exc
    return trt


class _CudaRuntime:
    """The few CUDA calls needed: malloc, free, async copies, a stream."""

    def __init__(self) -> None:
        try:
            try:
                from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
            except ImportError:
                from cuda import cudart  # type: ignore[import-not-found]
        except ImportError as exc:
            raise BackendError("backend 'tensorrt' needs cuda-python (pip install cuda-python)") from exc
        self.rt = cudart
        self.stream = self._check(cudart.cudaStreamCreate())

    def _check(self, result):
        """cuda-python returns (error, value...) tuples; anything but success is a BackendError naming it."""
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise BackendError(f"backend 'tensorrt': CUDA call failed: {getattr(err, 'name', err)} (is a GPU with a matching driver present?)")
        return rest[0] if len(rest) == 1 else rest

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream))

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream))

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream))


class TensorRTBackend:
    """Deserializes an engine built for this GPU and runs it with execute_async_v3."""

    def __init__(self, engine_path: Path, spec: InputSpec, *, precision: str, max_batch: int,
                 embedding_name: str | None = None) -> None:
        trt = _import_tensorrt()
        self.trt = trt
        self.engine_path = Path(engine_path)
        self.spec = spec
        self.precision = precision
        self.name = f"tensorrt:{trt.__version__}"
        self.d_outputs: dict[str, int] = {}
        self.cuda = _CudaRuntime()
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BackendError(f"{engine_path}: TensorRT cannot deserialize the engine (built for another GPU/version?)")
        self.context = self.engine.create_execution_context()
        if self.context is None:        # TensorRT logs the cause (GPU out of memory) and returns no context
            raise BackendError(f"{engine_path}: TensorRT could not create an execution context (GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == mode)
        outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.output_name = self._logits_name(engine_path, outputs, embedding_name)
        self.embedding_name = embedding_name
        shape = list(self.engine.get_tensor_shape(self.input_name))
        if len(shape) != 4 or [d for d in shape[1:] if d > 0] != [d for d, s in zip((3, spec.height, spec.width),
                                                                                      shape[1:]) if s > 0]:
            raise BackendError(f"{engine_path}: engine input {self.input_name!r} has shape {shape}, but the "
                               f"manifest's field input says (N, 3, {spec.height}, {spec.width})")
        self.max_batch = min(max_batch, self._profile_max_batch(engine_path, shape))
        self.d_input = self.cuda.malloc(3 * spec.height * spec.width * 4 * max_batch)
        self.context.set_tensor_address(self.input_name, self.d_input)
        self.per_image: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for name in outputs:
            dims = tuple(int(d) for d in self.engine.get_tensor_shape(name))[1:]
            if any(d < 1 for d in dims):
                raise BackendError(f"{engine_path}: engine output {name!r} has shape {dims} per image; only the "
                                   "batch dimension may be dynamic")
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            self.per_image[name] = (dims, dtype)
            self.d_outputs[name] = self.cuda.malloc(int(np.prod(dims, dtype=np.int64)) * dtype.itemsize * max_batch)
            self.context.set_tensor_address(name, self.d_outputs[name])
        self.num_classes = int(self.per_image[self.output_name][0][-1])

    def _profile_max_batch(self, engine_path: Path, shape: list[int]) -> int:
        """The largest batch the engine's first optimization profile takes (a static batch: that one)."""
        if shape[0] > 0:
            return int(shape[0])
        try:
            largest = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        except Exception as exc:  # noqa: BLE001 - whatever the binding raises, the engine cannot be sized
            raise BackendError(f"{engine_path}: cannot read the engine's optimization profile ({exc})") from exc
        if largest < 1:
            raise BackendError(f"{engine_path}: the engine's optimization profile takes batches of up to {largest}")
        return largest

    def _logits_name(self, engine_path: Path, outputs: list[str], embedding_name: str | None) -> str:
        if embedding_name is not None and embedding_name not in outputs:
            raise BackendError(f"{engine_path}: no output {embedding_name!r} for the embedding the manifest's field "
                               f"open_set names; the engine's outputs are {outputs}")
        if self.spec.output_name in outputs and self.spec.output_name != embedding_name:
            return self.spec.output_name
        others = [n for n in outputs if n != embedding_name]
        if not others:
            raise BackendError(f"{engine_path}: the engine has no logits output (outputs: {outputs})")
        return others[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch."""
        return self._run(batch, (self.output_name,))[0]

    def run_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and embedding for a batch from one execution; no embedding without ``embedding_name``."""
        if self.embedding_name is None:
            return self.run(batch), None
        logits, embedding = self._run(batch, (self.output_name, self.embedding_name))
        return logits, embedding

    def _run(self, batch: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        """The named outputs (float32) for a batch, in chunks of at most ``max_batch`` images."""
        parts: list[list[np.ndarray]] = []
        for start in range(0, len(batch), self.max_batch):
            chunk = np.ascontiguousarray(batch[start:start + self.max_batch], dtype=np.float32)
            if not self.context.set_input_shape(self.input_name, tuple(chunk.shape)):   # outside the profile
                raise BackendError(f"TensorRT engine {self.engine_path}: input shape {tuple(chunk.shape)} is outside its "
                                   f"optimization profile (a batch size larger than it was built for?)")
            outs = [np.empty((len(chunk), *self.per_image[n][0]), self.per_image[n][1]) for n in names]
            self.cuda.to_device(self.d_input, chunk)
            if not self.context.execute_async_v3(int(self.cuda.stream)):    # TensorRT takes the raw handle
                raise BackendError("TensorRT execute_async_v3 failed")
            for name, out in zip(names, outs):
                self.cuda.to_host(out, self.d_outputs[name])
            self.cuda.synchronize()
            parts.append([out.astype(np.float32, copy=False) for out in outs])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]

    def warmup(self, batch_size: int, runs: int) -> None:
        dummy = np.zeros((batch_size, 3, self.spec.height, self.spec.width), np.float32)
        for _ in range(runs):
            logits, embedding = self.run_outputs(dummy)
            check_warmup_outputs(f"{self.name} engine", logits, batch_size, embedding)

    def __del__(self) -> None:
        cuda = getattr(self, "cuda", None)
        if cuda is not None:
            for ptr in (getattr(self, "d_input", None), *getattr(self, "d_outputs", {}).values()):
                if ptr:
                    cuda.free(ptr)
            cuda.rt.cudaStreamDestroy(cuda.stream)     # each model swap made one; none is left behind
