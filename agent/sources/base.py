"""What every camera source is: open, read one RGB frame, close."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class SourceError(Exception):
    """A source that cannot be opened or read; the message names it."""


class EndOfStream(Exception):
    """A finite source (file, folder) has no more frames."""


@dataclass(frozen=True)
class Frame:
    """One captured frame; frozen so stages can share it without copies."""

    camera_id: str
    seq: int
    captured_at: float          # wall clock (time.time()), travels in payloads
    captured_mono: float        # time.monotonic(), for in-process latencies
    image: np.ndarray = field(repr=False)   # HxWx3 uint8 RGB, ROI applied
    source_ref: str | None = None           # e.g. the file name of a folder source
    full_image: np.ndarray | None = field(default=None, repr=False)  # before ROI, kept only when uploads want it
    prepared: Any = field(default=None, repr=False, compare=False)   # (key, model input) made on the camera thread


class FrameSource(Protocol):
    """A camera. ``read`` blocks for the next frame; raises EndOfStream or SourceError."""

    name: str
    finite: bool

    def open(self) -> None: ...

    def read(self) -> tuple[np.ndarray, str | None]: ...

    def close(self) -> None: ...
