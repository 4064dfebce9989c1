"""A folder of images, read in sorted name order: a camera for tests and replays.

Each file is taken as it comes: one that cannot be read, is not an image, declares more than
``MAX_FRAME_SIDE`` pixels on a side in its header (checked before anything is decoded: a 1 MB PNG can
declare 20000 x 20000 pixels, 1.2 GB once decoded) or fails to decode in any way is skipped, logged and
counted (``on_skip``: the camera thread counts it in ``camera_errors_total{kind="file"}``), and the next
file is served. The position is kept across a reconnect (``open`` again): the folder is never replayed
from its start because something went wrong in the middle.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from agent.config import MAX_FRAME_SIDE
from agent.sources.base import EndOfStream, SourceError
from contract.dataset import IMAGE_EXTENSIONS
from contract.preprocess import decode_image

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 256 << 20      # an image file of a camera folder; a 16384 x 16384 camera frame compresses far below

# JPEG start-of-frame markers (SOF0..SOF15 but DHT C4, JPG C8 and DAC CC) carry the size; TEM and RSTn have no length
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


class ImageHeaderError(ValueError):
    """An image file whose header declares no size this source accepts; the message names the file."""


def image_size(fh: BinaryIO, what: str) -> tuple[int, int]:
    """(width, height) that the header of a JPEG, PNG, BMP, WebP or TIFF file declares, read without decoding
    (only the header's bytes); ImageHeaderError naming ``what`` when there is no such header."""
    head = fh.read(32)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(fh, what)
    if head[:2] == b"BM" and len(head) >= 26:
        dib = struct.unpack("<I", head[14:18])[0]
        if dib == 12:                                       # BITMAPCOREHEADER: 16-bit sides
            return struct.unpack("<HH", head[18:22])
        width, height = struct.unpack("<ii", head[18:26])
        return width, abs(height)                           # a negative height: rows stored top-down
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        return _webp_size(head, what)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(fh, "<" if head[:2] == b"II" else ">", what)
    raise ImageHeaderError(f"{what}: no JPEG, PNG, BMP, WebP or TIFF header (not an image, or a format a camera "
                           "folder does not read)")


def _jpeg_size(fh: BinaryIO, what: str) -> tuple[int, int]:
    """The markers after SOI, skipped by their lengths up to the frame header (APPn segments may be large)."""
    fh.seek(2)
    while True:
        marker = fh.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            break
        kind = marker[1]
        while kind == 0xFF:                                 # fill bytes before the marker
            nxt = fh.read(1)
            if not nxt:
                break
            kind = nxt[0]
        if kind in _JPEG_STANDALONE:
            continue
        if kind in (0xD9, 0xDA):                            # end of image, or a scan before any frame header
            break
        raw = fh.read(2)
        if len(raw) < 2 or int.from_bytes(raw, "big") < 2:
            break
        length = int.from_bytes(raw, "big")
        if kind in _JPEG_SOF:
            body = fh.read(5)
            if len(body) < 5:
                break
            height, width = struct.unpack(">HH", body[1:5])
            return width, height
        fh.seek(length - 2, os.SEEK_CUR)
    raise ImageHeaderError(f"{what}: a JPEG without a readable frame header (truncated or corrupt)")


def _webp_size(head: bytes, what: str) -> tuple[int, int]:
    chunk = head[12:16]
    if chunk == b"VP8X":                                    # extended: 24-bit canvas width-1 and height-1
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if chunk == b"VP8L" and head[20] == 0x2F:               # lossless: 14-bit width-1 and height-1
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":   # lossy: 14-bit sides after the start code
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    raise ImageHeaderError(f"{what}: a WebP without a readable VP8/VP8L/VP8X header")


def _tiff_size(fh: BinaryIO, order: str, what: str) -> tuple[int, int]:
    """ImageWidth (256) and ImageLength (257) of the first image file directory (the page OpenCV decodes)."""
    fh.seek(4)
    ifd = struct.unpack(order + "I", fh.read(4))[0]
    fh.seek(ifd)
    raw = fh.read(2)
    if len(raw) < 2:
        raise ImageHeaderError(f"{what}: a TIFF whose first directory lies outside the file")
    sides: dict[int, int] = {}
    for _ in range(min(struct.unpack(order + "H", raw)[0], 4096)):
        entry = fh.read(12)
        if len(entry) < 12:
            break
        tag, kind, count = struct.unpack(order + "HHI", entry[:8])
        if tag in (256, 257) and count == 1 and kind in (3, 4):     # SHORT or LONG
            value = entry[8:10] if kind == 3 else entry[8:12]
            sides[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), value)[0]
    if len(sides) < 2:
        raise ImageHeaderError(f"{what}: a TIFF whose first directory has no ImageWidth/ImageLength")
    return sides[256], sides[257]


def read_bounded_image(path: Path, max_side: int = MAX_FRAME_SIDE) -> np.ndarray:
    """The image file as HxWx3 uint8 RGB, its header checked before it is decoded: ImageHeaderError for a file
    too large, without an image header, or declaring a side of 0 or more than ``max_side`` pixels; whatever the
    decoder raises (ImageDecodeError, cv2.error) otherwise."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise ImageHeaderError(f"{path}: {size} bytes, more than {MAX_FILE_BYTES}")
        width, height = image_size(fh, str(path))
        if not (1 <= width <= max_side and 1 <= height <= max_side):
            raise ImageHeaderError(f"{path}: its header declares {width}x{height} pixels; expected sides of 1 to "
                                   f"{max_side} (refused before decoding)")
        fh.seek(0)
        data = fh.read(MAX_FILE_BYTES + 1)
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
                return read_bounded_image(path), path.name
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
