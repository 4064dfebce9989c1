"""Train augmentation (batched, on the training device) and the eval transform.

Training images are decoded once to a small uint8 "canvas" (shorter side
resized to ``resize_shorter``, centre square), so the expensive part of a step
is the model, not PIL. Augmentation then runs on whole batches. A share of each
batch (``StationViewConfig.share``) is rendered as the station's item crop would
show it (``trainer.station_view``); the rest takes the plain path: one affine
warp per batch does random-resized-crop, flip and rotation together, followed
by colour jitter and random erasing as tensor arithmetic. The same code runs on
CPU and CUDA.

The eval transform is the bundle's preprocessing (``contract.preprocess``), so
validation figures are the figures a station will see.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from contract.dataset import MASK_SUFFIX
from contract.preprocess import (
    INTERPOLATIONS,
    CropPolicy,
    ImageDecodeError,
    InputSpec,
    Preprocessor,
    read_image,
    read_image_bytes,
    resized_size,
)
from trainer.station_view import StationView, StationViewConfig, _is_number, _is_pair

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _station_view_off() -> StationViewConfig:
    return StationViewConfig(enabled=False)


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation; defaults suit product photos (upright objects, varied lighting).

    The fields before ``station_view`` are the plain path's. ``station_view`` is off in a bare
    ``AugmentConfig()`` (library callers, old runs' configs keep what they did); ``python -m trainer
    train`` turns it on by default (``--station-view on|off``).
    """

    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rotation: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    erasing: float = 0.0
    station_view: StationViewConfig = field(default_factory=_station_view_off)

    def __post_init__(self) -> None:
        """ValueError naming the field for a number that is not finite or out of range (a NaN trains "fine"
        and leaves a run that can never be exported)."""
        for name, low, high in (("hflip", 0.0, 1.0), ("rotation", 0.0, 180.0), ("brightness", 0.0, 1.0),
                                ("contrast", 0.0, 1.0), ("saturation", 0.0, 1.0), ("erasing", 0.0, 1.0)):
            value = getattr(self, name)
            if not (_is_number(value) and low <= value <= high):
                raise ValueError(f"augment.{name}: expected a finite number in [{low:g}, {high:g}], got {value!r}")
        for name in ("scale", "ratio"):
            pair = getattr(self, name)  # a config.json's "scale": 0.5 or ["a", 1] must be named, not a TypeError
            if not (_is_pair(pair) and all(_is_number(v) and v > 0 for v in pair) and pair[0] <= pair[1]):
                raise ValueError(f"augment.{name}: expected two finite numbers > 0, low first, got {pair!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "AugmentConfig":
        """From config.json: lists back to tuples; a config from before station views trains without them.
        Unknown keys are an error naming them (as ``StationViewConfig.from_dict``)."""
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"augment: unknown field(s) {unknown}")
        aug = dict(raw)
        for key in ("scale", "ratio"):
            if isinstance(aug.get(key), list):
                aug[key] = tuple(aug[key])
        station = aug.get("station_view")
        aug["station_view"] = StationViewConfig.from_dict(station) if isinstance(station, Mapping) else (
            station or _station_view_off())
        return cls(**aug)


def eval_spec(image_size: int, resize_shorter: int | None = None, interpolation: str = "bilinear",
              crop: CropPolicy | None = None) -> InputSpec:
    """The manifest's input block for a square model input; ``crop`` is what the station feeds it."""
    return InputSpec(
        height=image_size,
        width=image_size,
        resize_shorter=resize_shorter or image_size,
        interpolation=interpolation,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop=crop or CropPolicy(),
    )


def mask_path(path: str | Path) -> Path:
    """``<stem>.mask.png`` beside an image: its item mask for station views."""
    path = Path(path)
    return path.with_name(path.stem + MASK_SUFFIX)


def _square(rgb: np.ndarray, spec: InputSpec, interpolation: int) -> np.ndarray:
    side = spec.resize_shorter
    new_h, new_w = resized_size(rgb.shape[0], rgb.shape[1], side)
    if (new_h, new_w) != rgb.shape[:2]:
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - side) // 2, (new_w - side) // 2
    return rgb[top : top + side, left : left + side]


def load_canvas(path, spec: InputSpec, with_mask: bool = False) -> np.ndarray:
    """Decode an image to the uint8 training canvas: 3 x S x S, S = resize_shorter.

    ``with_mask`` adds a 4th channel: the image's mask file (``mask_path``, any non-zero pixel is
    the item) resized the same way, or zeros when it has none (the renderer then finds the mask).
    """
    full = read_image(path)
    rgb = _square(full, spec, INTERPOLATIONS[spec.interpolation])
    planes = [rgb.transpose(2, 0, 1)]
    if with_mask:
        mask_file = mask_path(path)
        mask = np.zeros(rgb.shape[:2], np.uint8)
        if mask_file.exists():
            item = _read_mask(mask_file, full.shape[:2])
            if item is not None:
                mask = _square(np.where(item, 255, 0).astype(np.uint8), spec, cv2.INTER_LINEAR)
        planes.append(mask[None])
    return np.ascontiguousarray(np.concatenate(planes))


_MASKS_WARNED: set[str] = set()     # mask files already reported (one line each, not one per epoch)


def _mask_pixels(mask_file: Path) -> np.ndarray:
    """HxW bool, the item's pixels in a mask file: non-zero at the file's own bit depth (a 16-bit mask of 0 and 1
    is a mask; read as 8-bit RGB, as read_image gives it, it was all zero), and never where an alpha channel is
    transparent (a cut-out's background). ImageDecodeError naming the file, with read_image's checks before
    decoding (size, header, sides)."""
    data = read_image_bytes(mask_file)
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        raw = None
    if raw is None:
        raise ImageDecodeError(f"{mask_file}: not a decodable image (corrupt or unsupported format)")
    raw = raw.reshape(raw.shape[0], raw.shape[1], -1)
    with_alpha = raw.shape[2] in (2, 4)
    item = (raw[..., :-1] if with_alpha else raw).any(axis=2)
    return item & (raw[..., -1] != 0) if with_alpha else item


def _read_mask(mask_file: Path, image_hw: tuple[int, int]) -> np.ndarray | None:
    """A mask file's item pixels (``_mask_pixels``), or None with a warning naming it when it cannot be used (does
    not decode, is not its image's size, or marks no pixel): the image is still a good sample, and the renderer
    then finds its mask as for an image without one. One damaged mask among thousands must not stop a training run
    (in the middle of an epoch when the images stream from disk)."""
    try:
        item = _mask_pixels(mask_file)
        problem = None if item.shape == image_hw else (
            f"mask is {item.shape[1]}x{item.shape[0]}, its image {image_hw[1]}x{image_hw[0]}")
        if problem is None and not item.any():
            problem = "mask marks no pixel as the item (every pixel zero or transparent)"
    except ValueError as exc:           # ImageDecodeError: names the file and what is wrong
        item, problem = None, str(exc).removeprefix(f"{mask_file}: ")
    if problem is None:
        return item
    if str(mask_file) not in _MASKS_WARNED:
        _MASKS_WARNED.add(str(mask_file))
        log.warning("%s: %s; mask file ignored, the item's mask is found from the image", mask_file, problem)
    return None


def load_eval(path, preprocessor: Preprocessor) -> np.ndarray:
    """The exact model input a station computes for this image (3 x H x W float32)."""
    return preprocessor(read_image(path))


class BatchAugment:
    """Random augmentation of a uint8 canvas batch into a normalized float batch.

    With ``config.station_view.enabled`` each image is either rendered as a station view
    (probability ``station_view.share``) or takes the plain path; the choice is one of the draws.
    """

    def __init__(self, config: AugmentConfig, spec: InputSpec, generator: torch.Generator) -> None:
        self.config = config
        self.spec = spec
        self.generator = generator
        self.mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std).view(1, 3, 1, 1)
        sv = config.station_view
        self.station = StationView(sv, spec, generator, hflip=config.hflip) if sv.enabled else None

    def _rand(self, n: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) * (high - low) + low

    def _affine(self, n: int) -> torch.Tensor:
        """Per-sample 2x3 matrices (normalized coords) for crop + flip + rotation."""
        cfg = self.config
        area = self._rand(n, *cfg.scale)
        log_ratio = self._rand(n, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
        ratio = torch.exp(log_ratio)
        # Crop width/height as fractions of the canvas, clamped inside it.
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (self._rand(n) * 2 - 1) * (1 - w)
        cy = (self._rand(n) * 2 - 1) * (1 - h)
        angle = self._rand(n, -cfg.rotation, cfg.rotation) * math.pi / 180
        flip = torch.where(self._rand(n) < cfg.hflip, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = w * cos * flip
        theta[:, 0, 1] = -h * sin
        theta[:, 1, 0] = w * sin * flip
        theta[:, 1, 1] = h * cos
        theta[:, 0, 2] = cx
        theta[:, 1, 2] = cy
        return theta

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """All random draws for a batch of ``n``, so that shards of one batch see the same draws."""
        cfg = self.config
        params = {"theta": self._affine(n)}
        for name in ("brightness", "contrast", "saturation"):
            strength = getattr(cfg, name)
            params[name] = self._rand(n, 1 - strength, 1 + strength) if strength else torch.ones(n)
        if cfg.erasing:
            params["erase"] = self._rand(n) < cfg.erasing
            params["erase_area"] = self._rand(n, 0.02, 0.25)
            params["erase_ratio"] = torch.exp(self._rand(n, math.log(0.3), math.log(3.3)))
            params["erase_top"], params["erase_left"] = self._rand(n), self._rand(n)
            params["erase_noise"] = torch.rand((n, 3, self.spec.height, self.spec.width), generator=self.generator)
        if self.station is not None:
            params["station"] = self._rand(n) < cfg.station_view.share
            params.update(self.station.sample(n))
        return params

    @staticmethod
    def _jitter(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        shape = (x.shape[0], 1, 1, 1)
        x = x * p["brightness"].view(shape).to(x)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * p["contrast"].view(shape).to(x) + mean
        gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        x = (x - gray) * p["saturation"].view(shape).to(x) + gray
        return x.clamp(0.0, 1.0)

    @staticmethod
    def _erase(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        n, _, h, w = x.shape
        area, ratio = p["erase_area"], p["erase_ratio"]
        eh = (torch.sqrt(area / ratio) * h).clamp(1, h).long()
        ew = (torch.sqrt(area * ratio) * w).clamp(1, w).long()
        top = (p["erase_top"] * (h - eh + 1).float()).long()
        left = (p["erase_left"] * (w - ew + 1).float()).long()
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        mask = (
            (rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
            & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1))
            & p["erase"].view(n, 1, 1)
        )
        return torch.where(mask.unsqueeze(1).to(x.device), p["erase_noise"].to(x), x)

    def __call__(self, canvas: torch.Tensor, shard: tuple[int, int] = (0, 1), total: int | None = None,
                 as_seen: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 N x 3|4 x S x S (any device; a 4th channel is a mask file's mask) -> float N x 3 x H x W, normalized.

        With ``shard=(rank, world)``, ``canvas`` holds rows rank, rank+world, ... of a batch
        of ``total``: the draws are made for the whole batch, so every process of a
        distributed run (and a single process) augments each image the same way.
        ``as_seen`` (N booleans): rows that are a station's view already (``Sample.as_seen``) take the plain path
        whatever their draw; the draws stay the same, so a batch without such rows is augmented as before.
        """
        rank, world = shard
        params = self.sample(total or canvas.shape[0])
        params = {k: v[rank::world] for k, v in params.items()}
        if as_seen is not None and "station" in params:
            params["station"] = params["station"] & ~as_seen.to(params["station"].device, torch.bool)
        x = canvas.float().div_(255.0)
        if self.station is None:
            out = self.plain(x[:, :3], params)
        else:
            out = torch.empty(x.shape[0], 3, self.spec.height, self.spec.width, device=x.device)
            routes = ((~params["station"], self.plain), (params["station"], self.station))
            for chosen, path in routes:
                rows = chosen.nonzero().squeeze(1)
                if len(rows):
                    dev_rows = rows.to(x.device)
                    out[dev_rows] = path(x[dev_rows], {k: v[rows] for k, v in params.items()})
        return (out - self.mean.to(out.device)) / self.std.to(out.device)

    def plain(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The plain path on float canvases (0..1): crop/flip/rotate warp, colour jitter, erasing."""
        n = x.shape[0]
        grid = F.affine_grid(params["theta"].to(x.device), [n, 3, self.spec.height, self.spec.width], align_corners=False)
        x = F.grid_sample(x[:, :3], grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        x = self._jitter(x, params)
        if self.config.erasing:
            x = self._erase(x, params)
        return x


def center_canvas(canvas: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Deterministic view of a canvas batch (centre crop, normalized): for quick train-set checks."""
    side = canvas.shape[-1]
    top, left = (side - spec.height) // 2, (side - spec.width) // 2
    x = canvas[:, :3, top : top + spec.height, left : left + spec.width].float().div_(255.0)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
