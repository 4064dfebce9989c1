"""What every camera source is: open, read one RGB frame, close."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from agent.config import MAX_FRAME_SIDE

if TYPE_CHECKING:
    from agent.localize import Located


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s]*)@")      # scheme://user:password@ (up to the last @)
_SECRET_FIELD = re.compile(r"(?i)(\b(?:user-pw|password|passwd|pwd|pw|token|secret|auth)\s*=\s*)[^&\s!]+")


def redact_uri(text: str) -> str:
    """A camera URI (or a GStreamer pipeline holding one) fit for logs and errors: the password of a
    ``scheme://user:password@host`` (a whole ``token@`` without a colon) and the values of password/token query
    fields and ``user-pw=`` properties replaced by ``***``. An RTSP camera's credentials can only be given in its
    URI; they must not reach the journal or a message."""
    def userinfo(match: re.Match[str]) -> str:
        user, colon, _ = match.group(2).partition(":")
        return f"{match.group(1)}{user}:***@" if colon else f"{match.group(1)}***@"
    return _SECRET_FIELD.sub(r"\1***", _USERINFO.sub(userinfo, text))


# Pixels in one frame a source may hand on: 64 Mpx, 192 MB as 8-bit RGB. More than the largest picture H.264, H.265
# and AV1 can code (8192 x 4352) and three times an 8K frame, so only a damaged or crafted file comes near it; a
# 16000 x 16000 frame (under MAX_FRAME_SIDE on each side) would take 768 MB, and its RGB copy as much again.
MAX_FRAME_PIXELS = 8192 * 8192


def frame_size_problem(width: float, height: float) -> str | None:
    """Why a frame of ``width`` x ``height`` pixels is too large to decode or hand on (a side over
    ``MAX_FRAME_SIDE``, or more than ``MAX_FRAME_PIXELS`` in all), or None when it is not."""
    if width > MAX_FRAME_SIDE or height > MAX_FRAME_SIDE:
        return f"{width:.0f}x{height:.0f} pixels, a side over {MAX_FRAME_SIDE}"
    if width * height > MAX_FRAME_PIXELS:
        return f"{width:.0f}x{height:.0f} pixels, more than {MAX_FRAME_PIXELS} ({MAX_FRAME_PIXELS / 1e6:.0f} Mpx)"
    return None


class SourceError(Exception):
    """A source that cannot be opened or read; the message names it."""


class EndOfStream(Exception):
    """A finite source (file, folder) has no more frames."""


@dataclass(frozen=True)
class Prepared:
    """What a camera thread made of a frame for the model (so the inference thread need not)."""

    key: Any                        # the preprocessor it was made for; compared by identity after a swap
    input: np.ndarray | None        # the model input; None: the frame needs no model run (presence saw no item)
    seconds: float                  # time spent localizing and preprocessing
    located: "Located | None" = None
    scene_empty: bool | None = None  # the localizer, settled, sees nothing in view (None: not localized)


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
    prepared: Prepared | None = field(default=None, repr=False, compare=False)   # made on the camera thread
    located: "Located | None" = field(default=None, compare=False)   # the item in the ROI (agent.localize)


class FrameSource(Protocol):
    """A camera. ``read`` blocks for the next frame; raises EndOfStream or SourceError."""

    name: str
    finite: bool

    def open(self) -> None: ...

    def read(self) -> tuple[np.ndarray, str | None]: ...

    def close(self) -> None: ...
