"""A folder of images, read in sorted name order: a camera for tests and replays.

Each file is taken as it comes: one that cannot be read, is not an image, declares more than
``MAX_FRAME_SIDE`` pixels on a side or ``MAX_FRAME_PIXELS`` in all in its header (checked before anything is
decoded: a 1 MB PNG can declare 16000 x 16000 pixels, 768 MB once decoded) or fails to decode in any way is
skipped, logged and counted (``on_skip``: the camera thread counts it in ``camera_errors_total{kind="file"}``),
and the next file is served. The position is kept across a reconnect (``open`` again): the folder is never replayed
from its start because something went wrong in the middle.
"""

from __future__ import annotations

import bisect
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from agent.config import MAX_FRAME_SIDE
from agent.sources.base import EndOfStream, SourceError, frame_size_problem
from contract.dataset import IMAGE_EXTENSIONS
from contract.image_header import image_size
from contract.preprocess import ImageDecodeError, decode_image, read_image_bytes

log = logging.getLogger(__name__)


def read_frame(path: Path) -> np.ndarray:
    """An image file as an RGB frame, its declared size checked against the frame bounds before it is decoded
    (ImageDecodeError naming the file otherwise)."""
    data = read_image_bytes(path, MAX_FRAME_SIDE)
    problem = frame_size_problem(*image_size(data, str(path)))
    if problem is not None:
        raise ImageDecodeError(f"{path}: its header declares {problem} (refused before decoding)")
    return decode_image(data, name=str(path))


class ImageFolderSource:
    def __init__(self, folder: str | Path, *, name: str, loop: bool = False,
                 on_skip: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.name = name
        self.loop = loop
        self.finite = True
        self.on_skip = on_skip      # called with the reason for each skipped file (the camera thread counts it)
        self._files: list[Path] = []
        self._index = 0
        self._last: str | None = None   # the name of the last file taken (served or skipped): where a re-open resumes

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"{self.folder}: image folder does not exist")
        try:
            self._files = sorted((p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
                                 key=lambda p: p.name)
        except OSError as exc:
            raise SourceError(f"{self.folder}: cannot list the image folder ({exc.strerror or exc})") from None
        if not self._files:
            raise SourceError(f"{self.folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        # A re-open (the camera thread reconnects) continues after the last file taken, not at the first.
        self._index = 0 if self._last is None else bisect.bisect_right([p.name for p in self._files], self._last)

    def read(self) -> tuple[np.ndarray, str | None]:
        skipped = 0
        while True:
            if self._index >= len(self._files):
                if not self.loop:
                    raise EndOfStream(self.name)
                self._index = 0
            if skipped >= len(self._files):     # a whole pass without one readable image: not a camera
                raise SourceError(f"{self.folder}: none of its {len(self._files)} image(s) can be read")
            path = self._files[self._index]
            self._index += 1
            self._last = path.name
            try:
                return read_frame(path), path.name
            except Exception as exc:  # noqa: BLE001 (one file, whatever the decoder raises: skipped, counted)
                skipped += 1
                self._skip(path, exc)

    def _skip(self, path: Path, exc: Exception) -> None:
        text = " ".join(str(exc).split())[:300]      # cv2.error's text runs over several lines
        reason = f"skipped {text}" if str(path) in text else f"skipped {path}: {type(exc).__name__}: {text}"
        if self.on_skip is None:
            log.warning("camera %s: %s", self.name, reason)
            return
        try:
            self.on_skip(reason)
        except Exception:  # noqa: BLE001 (the counter's failure must not stop the folder)
            log.exception("camera %s: %s (and counting it failed)", self.name, reason)

    def close(self) -> None:
        pass
