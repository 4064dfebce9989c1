"""An image's size as its header declares it, read without decoding (no OpenCV, no numpy).

A few kB can declare 20000 x 20000 pixels, 1.2 GB once decoded: whoever decodes an image it did not make
(central ingest, a station's image folder) checks the declared size first. JPEG, PNG, BMP, WebP and TIFF.
"""

from __future__ import annotations

import struct

# JPEG start-of-frame markers (SOF0..SOF15 but DHT C4, JPG C8 and DAC CC) carry the size; TEM and RSTn have no length
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


class ImageHeaderError(ValueError):
    """An image whose header declares no size; the message names the file."""


def jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) that a JPEG's frame header (SOFn) declares, read from the markers without decoding;
    None when the data is not a JPEG or has no frame header before its first scan."""
    if data[:2] != b"\xff\xd8":
        return None
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                      # a fill byte before the marker
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):              # end of image, or a scan before any frame header
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return None
        if marker in _SOF:
            if i + 9 > end:
                return None
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return width, height
        i += 2 + length
    return None


def image_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) that the header of a JPEG, PNG, BMP, WebP or TIFF file declares; ImageHeaderError naming
    ``what`` when there is no such header."""
    head = data[:32]
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:2] == b"\xff\xd8":
        size = jpeg_dimensions(data)
        if size is None:
            raise ImageHeaderError(f"{what}: a JPEG without a readable frame header (truncated or corrupt)")
        return size
    if head[:2] == b"BM" and len(head) >= 26:
        dib = struct.unpack("<I", head[14:18])[0]
        if dib == 12:                                       # BITMAPCOREHEADER: 16-bit sides
            return struct.unpack("<HH", head[18:22])
        width, height = struct.unpack("<ii", head[18:26])
        return width, abs(height)                           # a negative height: rows stored top-down
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        return _webp_size(head, what)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(data, "<" if head[:2] == b"II" else ">", what)
    raise ImageHeaderError(f"{what}: no JPEG, PNG, BMP, WebP or TIFF header (not an image, or a format a camera "
                           "folder does not read)")


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


def _tiff_size(data: bytes, order: str, what: str) -> tuple[int, int]:
    """ImageWidth (256) and ImageLength (257) of the first image file directory (the page OpenCV decodes)."""
    if len(data) < 8:                       # the offset of the first directory is cut off
        raise ImageHeaderError(f"{what}: a TIFF of {len(data)} bytes, too short for its header (truncated)")
    ifd = struct.unpack(order + "I", data[4:8])[0]
    raw = data[ifd:ifd + 2]
    if len(raw) < 2:
        raise ImageHeaderError(f"{what}: a TIFF whose first directory lies outside the file")
    sides: dict[int, int] = {}
    for n in range(min(struct.unpack(order + "H", raw)[0], 4096)):
        entry = data[ifd + 2 + 12 * n:ifd + 14 + 12 * n]
        if len(entry) < 12:
            break
        tag, kind, count = struct.unpack(order + "HHI", entry[:8])
        if tag in (256, 257) and count == 1 and kind in (3, 4):     # SHORT or LONG
            value = entry[8:10] if kind == 3 else entry[8:12]
            sides[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), value)[0]
    if len(sides) < 2:
        raise ImageHeaderError(f"{what}: a TIFF whose first directory has no ImageWidth/ImageLength")
    return sides[256], sides[257]
