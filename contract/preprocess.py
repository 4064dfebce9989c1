"""Eval preprocessing from a bundle manifest, in numpy and OpenCV only.

This is the single implementation of the bundle's ``input`` contract
(docs/bundle.md). The trainer's eval transform calls it too, so the numbers a
station feeds its model are the numbers the model was validated on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from contract.image_header import ImageHeaderError, image_size

INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}
CROP_MODES = ("roi", "foreground")
MIN_STD = 1e-6          # input.std below this (as float32) scales a pixel step past float32's range
MAX_NORM = 1e6          # input.mean and input.std magnitudes: a pixel's mean and spread are a few units at most
MAX_IMAGE_SIDE = 16384  # pixels on a side of an image file read_image decodes: more than any camera or product photo
MAX_IMAGE_BYTES = 256 << 20   # an image file read_image reads; a 16384 x 16384 photo compresses far below


@dataclass(frozen=True)
class CropPolicy:
    """The manifest's ``input.crop`` block: what part of the camera's ROI the model is fed.

    ``roi``: the whole ROI (a product photo, or an item that fills the view). ``foreground``: the
    station finds the item's box in the ROI (its background model, ``agent.localize``), grows it by
    ``margin`` of its longer side on every side, makes it square and keeps it inside the ROI; a box
    whose longer side is under ``min_size`` pixels of the ROI is no item. The trainer renders and
    evaluates station views through the same policy, so train/serve parity holds by construction.
    """

    mode: str = "roi"
    margin: float = 0.1
    min_size: int = 16

    def __post_init__(self) -> None:
        if self.mode not in CROP_MODES:
            raise ValueError(f"input.crop.mode: expected one of {list(CROP_MODES)}, got {self.mode!r}")
        if not (isinstance(self.margin, (int, float)) and 0.0 <= float(self.margin) <= 1.0):
            raise ValueError(f"input.crop.margin: expected a number in 0..1, got {self.margin!r}")
        if not (isinstance(self.min_size, int) and not isinstance(self.min_size, bool) and self.min_size >= 1):
            raise ValueError(f"input.crop.min_size: expected an integer >= 1, got {self.min_size!r}")

    @classmethod
    def from_manifest(cls, block: Mapping[str, Any] | None) -> "CropPolicy":
        """Older bundles have no crop block: they classify the whole ROI."""
        if block is None:
            return cls()
        if not isinstance(block, Mapping):
            raise ValueError(f"input.crop: expected an object, got {type(block).__name__}")
        unknown = sorted(set(block) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"input.crop: unknown field(s) {unknown}")
        return cls(**dict(block))

    def to_manifest(self) -> dict[str, Any]:
        return {"mode": self.mode, "margin": float(self.margin), "min_size": int(self.min_size)}


class ImageDecodeError(ValueError):
    """An image file or buffer that cannot be decoded; the message names it."""


@dataclass(frozen=True)
class InputSpec:
    """The manifest's ``input`` block."""

    height: int
    width: int
    resize_shorter: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"
    input_name: str = "input"
    output_name: str = "logits"
    crop: CropPolicy = CropPolicy()

    def __post_init__(self) -> None:
        for name in ("height", "width", "resize_shorter"):
            value = getattr(self, name)
            # the manifest schema's "integer" takes 224.0 too (JSON Schema counts a float without a fraction as
            # an integer): a float side loaded, then every frame failed in cv2.resize or numpy with a TypeError
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"input.{name}: expected a whole number of pixels >= 1 (written without a "
                                 f"fraction or exponent), got {str(value)[:40]}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"input.interpolation: expected one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.resize_shorter < max(self.height, self.width):
            # the shorter side of the resized image is resize_shorter; a crop side longer than that (a square
            # frame, a wide crop) would be cut short and the model fed a smaller tensor than its input
            raise ValueError(
                f"input.resize_shorter ({self.resize_shorter}) must be >= the crop size "
                f"({self.height}x{self.width}), its longer side included"
            )
        _check_normalization("input.mean", self.mean, lambda v: abs(v) <= MAX_NORM,
                             f"a finite number of magnitude at most {MAX_NORM:.0g}")
        _check_normalization("input.std", self.std, lambda v: MIN_STD <= v <= MAX_NORM,
                             f"a number from {MIN_STD:.0g} to {MAX_NORM:.0g}")
        if self.channel_order != "RGB" or self.layout != "NCHW" or self.dtype != "float32":
            raise ValueError("input: only channel_order=RGB, layout=NCHW, dtype=float32 are supported")

    @classmethod
    def from_manifest(cls, block: Mapping[str, Any]) -> "InputSpec":
        fields = {k: block[k] for k in cls.__dataclass_fields__ if k in block}
        for key in ("mean", "std"):
            if key in fields:
                try:
                    fields[key] = tuple(float(v) for v in fields[key])
                except (TypeError, ValueError, OverflowError) as exc:
                    raise ValueError(f"input.{key}: expected 3 finite numbers, got {str(fields[key])[:80]} "
                                     f"({exc})") from None
        fields["crop"] = CropPolicy.from_manifest(block.get("crop"))
        return cls(**fields)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "width": self.width,
            "resize_shorter": self.resize_shorter,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": self.channel_order,
            "layout": self.layout,
            "dtype": self.dtype,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "crop": self.crop.to_manifest(),
        }


def _check_normalization(name: str, values: object, ok, expected: str) -> None:
    """``values``: 3 real numbers, each ``ok`` as the float32 the Preprocessor computes with (a std of 1e-50 is
    0 there, and its scale infinite), else ValueError naming the field."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != 3:
        raise ValueError(f"{name}: expected 3 numbers (one per channel), got {str(values)[:80]}")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ValueError(f"{name}/{i}: expected a number, got {str(value)[:80]!r}")
        try:
            with np.errstate(over="ignore"):
                as32 = float(np.float32(value))
        except OverflowError:     # an integer no float holds
            as32 = float("nan")
        if not (np.isfinite(as32) and ok(as32)):
            raise ValueError(f"{name}/{i}: expected {expected}, got {str(value)[:80]}")


def to_rgb(image: np.ndarray, *, bgr: bool = False) -> np.ndarray:
    """Return an HxWx3 RGB array from gray, gray+alpha, RGB(A) or BGR(A) input: uint8 for uint8 input and for
    16-bit input (shifted down to 8 bits, as ``decode_image`` does). Other pixel types keep their type, for the
    caller to refuse as a frame (``agent.sources.camera.frame_problem`` counts it): a ValueError here would end
    the source's read instead."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an HxW or HxWxC image with C in 1..4, got shape {image.shape}")
    channels = image.shape[2]
    if channels in (1, 2):
        return np.repeat(image[:, :, :1], 3, axis=2)
    if image.dtype == np.uint8:
        # OpenCV's channel swap is several times faster than a numpy reversed-stride copy (camera threads
        # run it on every frame).
        if channels == 3:
            return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(image)
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    rgb = image[:, :, :3]
    if bgr:
        rgb = rgb[:, :, ::-1]
    return np.ascontiguousarray(rgb)


def decode_image(data: bytes | np.ndarray, *, name: str = "<buffer>") -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, BMP, WebP, TIFF) to HxWx3 uint8 RGB."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buf.size == 0:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:     # e.g. a header that declares more pixels than OpenCV decodes
        reason = (str(exc).strip().splitlines() or ["OpenCV error"])[-1][:200]
        raise ImageDecodeError(f"{name}: not a decodable image ({reason})") from None
    if image is None:
        raise ImageDecodeError(f"{name}: not a decodable image (corrupt or unsupported format)")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ImageDecodeError(f"{name}: unsupported pixel type {image.dtype}")
    return to_rgb(image, bgr=image.ndim == 3 and image.shape[2] >= 3)


def read_image(path: str | Path, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Read an image file to HxWx3 uint8 RGB, its header checked before anything is decoded (a 1 MB PNG can
    declare 60000 x 60000 pixels, 10 GB once decoded); raises ImageDecodeError naming the file for a file that
    cannot be read, is over MAX_IMAGE_BYTES, has no JPEG/PNG/BMP/WebP/TIFF header, declares a side of 0 or more
    than ``max_side`` pixels, or does not decode."""
    return decode_image(read_image_bytes(path, max_side), name=str(path))


def read_image_bytes(path: str | Path, max_side: int = MAX_IMAGE_SIDE) -> bytes:
    """An image file's bytes, with ``read_image``'s checks before anything is decoded (size, header, sides), for a
    reader that decodes them its own way (a mask at its own bit depth)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_IMAGE_BYTES:
                raise ImageDecodeError(f"{path}: {size} bytes, more than {MAX_IMAGE_BYTES} (not read)")
            data = fh.read(MAX_IMAGE_BYTES + 1)
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not data:
        raise ImageDecodeError(f"{path}: empty file")
    try:
        width, height = image_size(data, str(path))
    except ImageHeaderError as exc:
        raise ImageDecodeError(str(exc)) from None
    if not (1 <= width <= max_side and 1 <= height <= max_side):
        raise ImageDecodeError(f"{path}: its header declares {width}x{height} pixels; expected sides of 1 to "
                               f"{max_side} (refused before decoding)")
    return data


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(new_height, new_width) with the shorter side equal to ``shorter``."""
    if height <= width:
        return shorter, max(shorter, int(round(width * shorter / height)))
    return max(shorter, int(round(height * shorter / width))), shorter


def resize_and_crop(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Steps 1-3 of the contract: float32 HxWx3 in 0..255, resized and center-cropped."""
    image = rgb.astype(np.float32, copy=False)
    new_h, new_w = resized_size(image.shape[0], image.shape[1], spec.resize_shorter)
    if (new_h, new_w) != image.shape[:2]:
        image = cv2.resize(image, (new_w, new_h), interpolation=INTERPOLATIONS[spec.interpolation])
    top = (new_h - spec.height) // 2
    left = (new_w - spec.width) // 2
    return image[top : top + spec.height, left : left + spec.width]


class Preprocessor:
    """Turns RGB uint8 frames into the model's NCHW float32 input."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        mean = np.asarray(spec.mean, dtype=np.float32) * 255.0
        std = np.asarray(spec.std, dtype=np.float32) * 255.0
        # (x/255 - mean)/std == (x - 255*mean) / (255*std): one subtract and one multiply.
        self._offset = mean.reshape(1, 1, 3)
        self._scale = (1.0 / std).reshape(1, 1, 3)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """One image (HxWx3 uint8 RGB) to a 3xHxW float32 array."""
        image = resize_and_crop(rgb, self.spec)
        image = (image - self._offset) * self._scale
        return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)

    def batch(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Several images to an Nx3xHxW float32 batch."""
        # Same arithmetic as __call__, with the normalisation and transpose done once for the batch.
        hwc = np.empty((len(frames), self.spec.height, self.spec.width, 3), dtype=np.float32)
        for i, frame in enumerate(frames):
            hwc[i] = resize_and_crop(frame, self.spec)
        hwc -= self._offset
        hwc *= self._scale
        return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
