"""What an inference backend is: a batch of NCHW float32 in, logits out."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class BackendError(Exception):
    """A backend that cannot be created or run; the message says which and why."""


class Backend(Protocol):
    name: str          # e.g. "onnxruntime:CPUExecutionProvider"
    precision: str     # fp32, fp16, int8

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def warmup(self, batch_size: int, runs: int) -> None: ...


def check_warmup_outputs(where: str, outputs: np.ndarray, batch_size: int) -> None:
    """A warm-up run's outputs: one row of finite logits per image, else the model is not used."""
    shape = tuple(np.shape(outputs))
    if len(shape) != 2 or shape[0] != batch_size:
        raise BackendError(f"{where}: outputs shape {shape} on a warm-up batch of {batch_size}, expected "
                           f"({batch_size}, classes)")
    if not np.isfinite(outputs).all():
        raise BackendError(f"{where}: non-finite outputs (NaN or infinity) on the warm-up batch")
