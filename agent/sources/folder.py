"""A folder of images, read in sorted name order: a camera for tests and replays."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from agent.sources.base import EndOfStream, SourceError
from contract.dataset import IMAGE_EXTENSIONS
from contract.preprocess import ImageDecodeError, read_image

log = logging.getLogger(__name__)



class ImageFolderSource:
    def __init__(self, folder: str | Path, *, name: str, loop: bool = False) -> None:
        self.folder = Path(folder)
        self.name = name
        self.loop = loop
        self.finite = True
        self._files: list[Path] = []
        self._index = 0

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"{self.folder}: image folder does not exist")
        self._files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self._files:
            raise SourceError(f"{self.folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")

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
            try:
                return read_image(path), path.name
            except ImageDecodeError as exc:
                skipped += 1
                log.warning("camera %s: skipping %s", self.name, exc)

    def close(self) -> None:
        pass
