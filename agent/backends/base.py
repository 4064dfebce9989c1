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
