"""What an inference backend is: a batch of NCHW float32 in, logits (and the embedding, where the bundle has
one) out."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class BackendError(Exception):
    """A backend that cannot be created or run; the message says which and why."""


class Backend(Protocol):
    name: str          # e.g. "onnxruntime:CPUExecutionProvider"
    precision: str     # fp32, fp16, int8

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The logits, one row per image."""
        ...

    def run_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The logits and the embedding (N x D) from one run; None where the backend was built without an
        embedding output (a bundle without ``open_set``)."""
        ...

    def warmup(self, batch_size: int, runs: int) -> None: ...


def outputs_of(backend: Any, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits and embedding of one run. A backend that only has ``run`` (a wrapper that counts or records
    batches, a benchmark's stand-in) gives logits and no embedding."""
    run_outputs = getattr(backend, "run_outputs", None)
    if run_outputs is None:
        return np.asarray(backend.run(batch)), None
    logits, embedding = run_outputs(batch)
    return np.asarray(logits), None if embedding is None else np.asarray(embedding)


def check_warmup_outputs(where: str, outputs: np.ndarray, batch_size: int,
                         embedding: np.ndarray | None = None) -> None:
    """A warm-up run's outputs: one row of finite logits per image (and, when given, one finite embedding
    vector per image), else the model is not used."""
    shape = tuple(np.shape(outputs))
    if len(shape) != 2 or shape[0] != batch_size:
        raise BackendError(f"{where}: outputs shape {shape} on a warm-up batch of {batch_size}, expected "
                           f"({batch_size}, classes)")
    if not np.isfinite(outputs).all():
        raise BackendError(f"{where}: non-finite outputs (NaN or infinity) on the warm-up batch")
    if embedding is None:
        return
    shape = tuple(np.shape(embedding))
    if len(shape) != 2 or shape[0] != batch_size or shape[1] < 1:
        raise BackendError(f"{where}: embedding shape {shape} on a warm-up batch of {batch_size}, expected "
                           f"({batch_size}, dim)")
    if not np.isfinite(embedding).all():
        raise BackendError(f"{where}: non-finite embedding (NaN or infinity) on the warm-up batch")
