"""Station-view validation: what a station feeds the model, made by the station's own code.

Export evaluates the model, and calibrates its INT8 twin, on two sets: the clean validation images
(the dataset as it is), and the same images as a station camera shows them. For the second set each
validation image is placed on a surface at a station's ROI size, rotated, in its own colour, sometimes
with a shadow, under uneven light, with sensor noise, sometimes motion blur, through JPEG (a *scene*), next to the same surface under the same light without the item (its *empty
twin*, what a station's background model holds). The agent's ``foreground_box`` then finds the item
against the twin, ``crop_box`` and ``model_view`` cut it out under the bundle's ``CropPolicy``, and
the ``Preprocessor`` makes the model input. Those are the functions a station's camera thread runs
(``agent.prepare``), so the figure is what the crop policy gives at a station, by construction: a
localizer that misses, or a margin the model was not trained for, shows up here.

The surfaces are the trainer's procedural backgrounds (``trainer.backgrounds``) from a seed of their
own, not the training tiles; a station's captured empty scenes are not used here (they are few, and
they are training material).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import torch

from agent.localize import crop_box, foreground_box, model_view
from contract.preprocess import InputSpec, Preprocessor, read_image
from trainer.backgrounds import procedural_tiles
from trainer.station_view import _is_int, _is_number, _is_pair, item_mask


@dataclass(frozen=True, kw_only=True)
class SceneConfig:
    """A station's view of one item: the camera ROI and how the item lies in it."""

    roi: int = 300                                    # ROI side, px
    item_fraction: tuple[float, float] = (0.57, 0.77)  # item's longer side / ROI side (170-230 px of 300)
    rotation: float = 20.0                            # max degrees either way
    gain: tuple[float, float] = (0.75, 1.25)          # overall light
    gradient: float = 0.25                            # light change across the ROI, either way
    noise: float = 3.0                                # sensor noise std (0..255), on the scene only
    item_gain: tuple[float, float] = (0.65, 1.15)     # the product's own brightness...
    item_colour: float = 0.3                          # ...and colour (saturation of a random hue)
    shadow: float = 0.5                               # probability of a drop shadow beside the item
    shadow_offset: tuple[float, float] = (4.0, 14.0)  # px, in a random direction
    shadow_strength: tuple[float, float] = (0.2, 0.5)
    shadow_softness: float = 6.0                      # Gaussian sigma, px
    blur: float = 0.1                                 # probability of a motion-blurred frame
    blur_px: tuple[int, int] = (7, 15)                # its length, px
    jpeg_quality: tuple[int, int] = (75, 95)          # the camera stream's JPEG (scene and twin); (0, 0): none
    seed: int = 1234

    def __post_init__(self) -> None:
        """ValueError naming ``SceneConfig.<field>`` for a value that is not finite, of the wrong kind or out of
        range: a NaN renders every scene as NaN, an item larger than the ROI is no longer all in view, a zero
        blur length divides by zero, and each would otherwise surface mid-export, unnamed."""
        if not (_is_int(self.roi) and self.roi > 0):
            raise ValueError(f"SceneConfig.roi: expected a whole number of pixels > 0, got {self.roi!r}")
        _check_range("item_fraction", self.item_fraction, 0.0, 1.0, low_open=True,
                     what=" (the item's longer side over the ROI side: the item lies in the ROI)")
        _check_number("rotation", self.rotation, 0.0, 180.0, what="degrees either way")
        _check_range("gain", self.gain, 0.0, math.inf)
        _check_number("gradient", self.gradient, 0.0, 1.0, what="a light change across the ROI, either way")
        _check_number("noise", self.noise, 0.0, 255.0, what="a std in 0..255 pixel units")
        _check_range("item_gain", self.item_gain, 0.0, math.inf, low_open=True)
        _check_number("item_colour", self.item_colour, 0.0, 1.0, what="a saturation")
        for name in ("shadow", "blur"):
            _check_number(name, getattr(self, name), 0.0, 1.0, what="a probability")
        _check_range("shadow_offset", self.shadow_offset, 0.0, float(self.roi), what=" (px, at most roi)")
        _check_range("shadow_strength", self.shadow_strength, 0.0, 1.0)
        _check_number("shadow_softness", self.shadow_softness, 0.0, float(self.roi), what="px, at most roi")
        b = self.blur_px
        if not (_is_pair(b) and all(_is_int(v) for v in b) and 1 <= b[0] <= b[1] <= self.roi):
            raise ValueError(f"SceneConfig.blur_px: expected two whole numbers, 1 <= low <= high <= roi "
                             f"({self.roi}), got {b!r}")
        q = self.jpeg_quality
        if not (_is_pair(q) and all(_is_int(v) for v in q) and (tuple(q) == (0, 0) or 1 <= q[0] <= q[1] <= 100)):
            raise ValueError(f"SceneConfig.jpeg_quality: expected two whole numbers, 1 <= low <= high <= 100, or "
                             f"(0, 0) for no JPEG, got {q!r}")
        if not (_is_int(self.seed) and self.seed >= 0):
            raise ValueError(f"SceneConfig.seed: expected a whole number >= 0, got {self.seed!r}")


def _check_number(name: str, value: Any, low: float, high: float, *, what: str) -> None:
    """ValueError naming ``SceneConfig.<name>`` unless ``value`` is a finite number in [low, high]."""
    if not (_is_number(value) and low <= value <= high):
        raise ValueError(f"SceneConfig.{name}: expected a finite number in [{low:g}, {high:g}] ({what}), "
                         f"got {value!r}")


def _check_range(name: str, pair: Any, low: float, high: float, *, low_open: bool = False, what: str = "") -> None:
    """ValueError naming ``SceneConfig.<name>`` unless ``pair`` is (lo, hi), finite, lo <= hi, both in the bounds."""
    inside = _is_pair(pair) and all(_is_number(v) for v in pair) and pair[0] <= pair[1] \
        and (low < pair[0] if low_open else low <= pair[0]) and pair[1] <= high
    if not inside:
        bound = f"{low:g} {'<' if low_open else '<='} low <= high" + (f" <= {high:g}" if math.isfinite(high) else "")
        raise ValueError(f"SceneConfig.{name}: expected two finite numbers, {bound}{what}, got {pair!r}")


@dataclass(frozen=True)
class StationViews:
    """Model inputs of the station-view set, their labels, and how often the localizer found the item."""

    inputs: np.ndarray          # N x 3 x H x W float32
    labels: np.ndarray          # N int64
    found: int                  # scenes where the station would see an item (a crop_box under the crop policy)

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self) -> Iterator[np.ndarray]:
        """The inputs as one chunk (trainer.evaluate.ModelInputs)."""
        if len(self.inputs):
            yield self.inputs


class StationViewInputs:
    """The model inputs ``station_views`` makes, rendered again ``chunk`` scenes at a time on every pass
    (trainer.evaluate.ModelInputs): the same scenes in the same order (each pass starts from the seed), without
    holding the whole set (1,000 scenes at 224 px are 600 MB). ``found`` is set by each complete pass."""

    def __init__(self, paths: Sequence, labels: Sequence[int], spec: InputSpec, cfg: SceneConfig = SceneConfig(),
                 chunk: int = 64) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, np.int64)
        self.spec = spec
        self.cfg = cfg
        self.chunk = max(1, int(chunk))
        self.found: int | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def chunks(self) -> Iterator[np.ndarray]:
        cfg, spec = self.cfg, self.spec
        rng = np.random.default_rng(cfg.seed)
        surfaces = _surfaces(256, cfg.seed)
        preprocessor = Preprocessor(spec)
        found = 0
        for start in range(0, len(self.paths), self.chunk):
            part = self.paths[start : start + self.chunk]
            inputs = np.empty((len(part), 3, spec.height, spec.width), np.float32)
            for i, path in enumerate(part):
                scene, empty = render_scene(read_image(path), surfaces[rng.integers(len(surfaces))], rng, cfg)
                box = foreground_box(scene, empty).box      # the light estimated, as a station does
                crop = crop_box(box, scene.shape[:2], spec.crop)
                found += crop is not None        # a box under the policy's min_size is no item at a station
                inputs[i] = preprocessor(model_view(scene, crop, spec.crop))
            yield inputs
        self.found = found


def _surfaces(side: int, seed: int) -> np.ndarray:
    """HxWx3 uint8 surfaces, from the procedural kinds, on a seed apart from the training tiles'."""
    return procedural_tiles(side, per_kind=4, seed=seed + 7919).transpose(0, 2, 3, 1)


def _light(side: int, rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """A gain field: overall light times a linear gradient in a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * np.linspace(-1, 1, side)[None, :] + np.sin(angle) * np.linspace(-1, 1, side)[:, None]
    field = rng.uniform(*cfg.gain) * (1 + cfg.gradient * rng.uniform(-1, 1) * ramp / np.sqrt(2))
    return field.astype(np.float32)[..., None]


def _placed_item(rgb: np.ndarray, rng: np.random.Generator, cfg: SceneConfig) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The item scaled and rotated, its alpha, and its top-left corner in the ROI (fully inside).

    The rotated item's window is the image's diagonal (any angle fits), so it can be larger than the ROI (with a
    square image, for items over ~70% of the ROI side: a third of the default draws). It is then cut to the ROI
    around its centre, where the item is: what does not fit is lost evenly on every side, and the item stays
    centred (until 2026-12-07 it was cut at its right and bottom and moved towards the bottom-right)."""
    canvas = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    alpha = item_mask(canvas)[0, 0].numpy()
    longer = cfg.roi * rng.uniform(*cfg.item_fraction)
    scale = longer / max(rgb.shape[:2])
    angle = rng.uniform(-cfg.rotation, cfg.rotation)
    h, w = rgb.shape[:2]
    side = int(np.ceil(np.hypot(h, w) * scale)) + 2
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    matrix[:, 2] += (side / 2 - w / 2, side / 2 - h / 2)
    item = cv2.warpAffine(rgb, matrix, (side, side), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    alpha = cv2.warpAffine(alpha, matrix, (side, side), flags=cv2.INTER_LINEAR, borderValue=0)
    if side > cfg.roi:
        start = (side - cfg.roi) // 2
        side = cfg.roi
        window = (slice(start, start + side), slice(start, start + side))
        item, alpha = item[window], alpha[window]
    top, left = (int(rng.integers(0, cfg.roi - side + 1)) for _ in range(2))
    return item, alpha, top, left


def _tint(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """Per-channel factors: the item's own brightness times a random hue at a low saturation."""
    hue, sat = rng.uniform(0, 2 * np.pi), rng.uniform(0, cfg.item_colour)
    gain = np.exp(rng.uniform(np.log(cfg.item_gain[0]), np.log(cfg.item_gain[1])))
    return (gain * (1 + sat * np.cos(hue + np.arange(3) * 2 * np.pi / 3))).astype(np.float32)


def _shade(scene: np.ndarray, alpha: np.ndarray, top: int, left: int, rng: np.random.Generator,
           cfg: SceneConfig) -> None:
    """Darken the surface under the item's silhouette moved by a random offset and softened (in place)."""
    length, angle = rng.uniform(*cfg.shadow_offset), rng.uniform(0, 2 * np.pi)
    dy, dx = int(round(length * np.sin(angle))), int(round(length * np.cos(angle)))
    strength = rng.uniform(*cfg.shadow_strength)
    pad = int(3 * cfg.shadow_softness) + 1
    soft = cv2.GaussianBlur(np.pad(alpha, pad), (0, 0), cfg.shadow_softness)
    y0, x0 = top + dy - pad, left + dx - pad
    ys, xs = slice(max(y0, 0), min(y0 + soft.shape[0], cfg.roi)), slice(max(x0, 0), min(x0 + soft.shape[1], cfg.roi))
    if ys.start < ys.stop and xs.start < xs.stop:
        part = soft[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        scene[ys, xs] *= (1 - strength * part)[..., None]


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not JPEG-encode a station-view scene")
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def render_scene(rgb: np.ndarray, surface: np.ndarray, rng: np.random.Generator,
                 cfg: SceneConfig) -> tuple[np.ndarray, np.ndarray]:
    """(scene, empty twin): ``rgb`` (HxWx3 uint8, a product on a plain background) lying on ``surface``.

    The product takes its own brightness and colour, sometimes casts a soft shadow, the frame is lit
    unevenly, noisy, sometimes motion-blurred, and both frames come through the camera's JPEG; the twin
    has the same surface and light without the item (what the station's background model holds).
    """
    light = _light(cfg.roi, rng, cfg)
    ground = cv2.resize(surface, (cfg.roi, cfg.roi), interpolation=cv2.INTER_AREA).astype(np.float32)
    scene = ground.copy()
    item, alpha, top, left = _placed_item(rgb, rng, cfg)
    item = item.astype(np.float32) * _tint(rng, cfg)
    if rng.random() < cfg.shadow:
        _shade(scene, alpha, top, left, rng, cfg)
    window = scene[top : top + item.shape[0], left : left + item.shape[1]]
    window[:] = alpha[..., None] * item + (1 - alpha[..., None]) * window
    scene = scene * light
    if rng.random() < cfg.blur:
        n = int(rng.integers(cfg.blur_px[0], cfg.blur_px[1] + 1))
        scene = cv2.filter2D(scene, -1, np.full((1, n), 1.0 / n, np.float32), borderType=cv2.BORDER_REFLECT)
    scene = scene + rng.normal(0, cfg.noise, scene.shape).astype(np.float32)
    frames = [np.clip(f, 0, 255).round().astype(np.uint8) for f in (scene, ground * light)]
    if cfg.jpeg_quality[1] > 0:
        quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        frames = [_jpeg(f, quality) for f in frames]
    return frames[0], frames[1]


def station_views(paths: Sequence, labels: Sequence[int], spec: InputSpec, cfg: SceneConfig = SceneConfig()) -> StationViews:
    """The station's model inputs for these images seen at a station (see the module docstring), all at once."""
    stream = StationViewInputs(paths, labels, spec, cfg, chunk=max(1, len(paths)))
    chunks = list(stream.chunks())      # one: the whole set
    inputs = chunks[0] if chunks else np.empty((0, 3, spec.height, spec.width), np.float32)
    return StationViews(inputs, stream.labels, stream.found)
