"""What a station-sent frame must be before the store spends memory, disk or a database row on it.

A frame message comes from one station, and whatever it says is taken as a hostile value: its JPEG's
header is read before anything decodes it (a 2 kB JPEG can declare 40000 x 40000 pixels, 4.8 GB once
decoded), and every value bound to a SQLite column is checked for its type and range first (a ``seq``
beyond 64 bits, a string with a lone surrogate or a float that overflows would otherwise raise from
deep inside the database driver, where it reads like a storage failure). Each refusal is a StoreError
that names the frame and the field.

Rows written before these checks may hold NaN or an infinity in their JSON; ``finite`` turns those into
``null`` on the way out, so one old row never makes a whole page of the review queue invalid JSON.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from contract.image_header import jpeg_dimensions

log = logging.getLogger(__name__)

MAX_PIXELS = 8192 * 8192            # declared width x height of a frame's JPEG, checked before it is decoded
MAX_JPEG_BYTES = 8 * 1024 * 1024    # a frame's JPEG (stations send ROI crops of a few to a few hundred kB)
MAX_TEXT = 4096                      # a text column (label, model name, source_ref ...)
SQLITE_INT_MIN, SQLITE_INT_MAX = -(2 ** 63), 2 ** 63 - 1


class FrameCheckError(ValueError):
    """A frame value the store refuses; the store re-raises it as its StoreError."""


def check_jpeg_header(data: bytes, what: str, *, max_pixels: int, max_bytes: int) -> tuple[int, int]:
    """(width, height) of a JPEG whose size and header are within bounds; FrameCheckError naming ``what``."""
    if len(data) > max_bytes:
        raise FrameCheckError(f"{what}: {len(data)} bytes, more than {max_bytes}")
    size = jpeg_dimensions(data)
    if size is None:
        raise FrameCheckError(f"{what}: not a decodable JPEG image (no frame header; {len(data)} bytes)")
    width, height = size
    if width < 1 or height < 1:
        raise FrameCheckError(f"{what}: the JPEG header declares {width}x{height} px")
    if width * height > max_pixels:
        raise FrameCheckError(f"{what}: the JPEG header declares {width}x{height} px, more than {max_pixels} pixels; "
                              f"refused before decoding")
    return width, height


def decoded_shape(data: bytes, what: str) -> tuple[int, int]:
    """(height, width) of a JPEG that decodes; call ``check_jpeg_header`` first, which bounds what this costs."""
    import cv2
    import numpy as np

    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise FrameCheckError(f"{what}: not a decodable JPEG image ({len(data)} bytes; {exc.msg})") from None
    if image is None:
        raise FrameCheckError(f"{what}: not a decodable JPEG image ({len(data)} bytes)")
    return int(image.shape[0]), int(image.shape[1])


# ---------------------------------------------------------------- column values

def integer(value: Any, field: str) -> int | None:
    """An integer column: None, or an int SQLite can hold."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise FrameCheckError(f"field {field}: expected an integer, got {type(value).__name__}")
    if not SQLITE_INT_MIN <= value <= SQLITE_INT_MAX:
        raise FrameCheckError(f"field {field}: an integer of {value.bit_length()} bits, outside the 64-bit range "
                              f"the store holds")
    return value


def real(value: Any, field: str) -> float | None:
    """A REAL column: None, or a finite number."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise FrameCheckError(f"field {field}: expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise FrameCheckError(f"field {field}: a number too large for a float") from None
    if not math.isfinite(number):
        raise FrameCheckError(f"field {field}: {number} is not a finite number")
    return number


def text(value: Any, field: str, max_length: int = MAX_TEXT) -> str | None:
    """A TEXT column: None, or a string of valid Unicode (no lone surrogates) and bounded length."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise FrameCheckError(f"field {field}: expected a string, got {type(value).__name__}")
    if len(value) > max_length:
        raise FrameCheckError(f"field {field}: {len(value)} characters, more than {max_length}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FrameCheckError(f"field {field}: not valid Unicode text (it holds a lone surrogate)") from None
    return value


TRACK = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def track(value: Any, field: str = "track") -> str | None:
    """The item a frame shows (``frame.v1`` ``track``): None, or the id a station's tracker gave it (a UUID)."""
    if value is None:
        return None
    if not isinstance(value, str) or not TRACK.fullmatch(value):
        shown = value[:64] if isinstance(value, str) else type(value).__name__
        raise FrameCheckError(f"field {field}: {shown!r} is not an item's track id (a lower-case UUID)")
    return value


def json_text(value: Any, field: str) -> str:
    """A JSON column: the value as strict JSON (no NaN or infinities, no lone surrogates, no cycles)."""
    try:
        out = json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as exc:
        raise FrameCheckError(f"field {field}: cannot be kept as JSON ({exc})") from None
    return out


def mapping(value: Any, field: str) -> dict[str, Any]:
    """An optional JSON object of the metadata (``model``): {} when absent."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FrameCheckError(f"field {field}: expected an object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- reading rows back

def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (in nested lists and objects too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def stored_json(raw: str | None, default: Any, where: str) -> Any:
    """A JSON column read back for a page: non-finite numbers as null; ``default`` (logged) when it is not
    JSON, so one bad row never fails a whole listing."""
    if raw is None:
        return default
    try:
        return finite(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        log.error("%s: stored JSON unreadable (%s); shown as %r", where, exc, default)
        return default
