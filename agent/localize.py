"""Where is the item? A per-camera background model of the empty scene, and the item's box in the ROI.

The station classifies the item, not the belt: each camera thread runs a ``Localizer`` on its ROI before
preprocessing, and with a bundle whose ``input.crop.mode`` is ``foreground`` the model is fed the square
crop ``crop_box`` makes of the item's box (the rule of ``contract.preprocess.CropPolicy``).

How a box is found (``foreground_box``, a pure function the trainer calls with a known background):

1. Both the frame and the background are shrunk to a working copy (longer side ``work_size`` px, area
   averaging) and blurred with a box filter about one belt texture period wide (``texture_px`` ROI px),
   so a moving ribbed belt and sensor noise average out and do not count as foreground.
2. Light changes are divided out as a smooth gain field (``estimate_light``): the global level is the
   frame/background brightness ratio most pixels agree on (the mode of the per-pixel ratio, which the
   belt owns; an item's ratios scatter), within ``1/max_gain .. max_gain``; a quadratic in x, y of the
   log ratio is then fitted by least squares on the pixels near the field (refitted three times with a
   narrowing band, so an item's pixels drop out), and kept within ``1/max_local_gain .. max_local_gain``
   of the global level. A spot light that moved or a gradient that turned since the background learned
   is light, not an item; ``max_local_gain`` 1 is one global gain.
3. A pixel is foreground where its largest per-channel difference from ``field x background`` is over
   ``threshold`` (0..255), or over ``grow_threshold`` where it connects to a foreground part that is an
   item by itself (hysteresis: a dark item's dim body joins its bright collar); the mask is opened (specks)
   and closed (holes), and connected components under ``min_area`` of the ROI are dropped.
4. The box is the largest component's, joined with the components within ``join_px`` ROI px of it (an
   item the threshold cut in two). Items back to back further apart than that stay apart: the larger
   one's box is reported, the other is seen when it is the larger (documented rule: largest wins).
   The ``Localizer`` follows the item it reported in the last frame: a component that overlaps that box
   (``FOLLOW_OVERLAP``) and is at least ``FOLLOW_SHARE`` of the largest one's area is taken instead, so two
   items of about one size in view together do not swap from frame to frame (each swap would be a new item
   to the tracker); the other is seen once the followed one is gone or far the smaller.
5. The box is mapped back to ROI pixels as ``(x0, y0, x1, y1)``, x1/y1 exclusive (slice bounds).

The ``Localizer`` keeps the background: the first ``warmup_frames`` frames are taken as the empty scene
(start a station with its belt empty, or give it a captured empty-scene image); afterwards the
background learns at ``alpha`` while the scene is empty and at ``busy_alpha`` outside the item's grown box
while an item is in view, so slow changes are followed without learning the item. An item in view for
``relearn_frames`` frames in a row is taken as a changed scene (something left on the belt, or a start
with an item in view): the background restarts from the current frame. The background it replaced is
kept (one working copy) until the next relearn: while an item is in view where the relearned one stood
and the view is closer there to the replaced background than to the current one, the frame is also
localized against the replaced one, and if that shows nothing at all (the thing left was taken away: the
view is the old empty scene again) the replaced background is restored and the frame is empty. Without
that the empty scene read as an item, where the thing had stood, until the next relearn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from agent.decide import box_overlap
from contract.preprocess import CropPolicy

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]          # x0, y0, x1, y1 in ROI pixels; x1, y1 exclusive


@dataclass(frozen=True)
class Located:
    """One frame's localization: is an item in view, its box and the square crop the model is fed."""

    present: bool
    box: Box | None              # the item's foreground box in ROI pixels
    crop_box: Box | None         # box grown/squared/kept inside the ROI by the crop policy (None: no item)
    fg_fraction: float           # share of the ROI that differs from the background (all kept components)
    settled: bool = True         # False during the warm-up: "no item" then means "taken as the empty scene"

    @property
    def scene_empty(self) -> bool:
        """Nothing at all in view by a settled background: no item and no foreground part (empty-scene uploads)."""
        return self.settled and not self.present and self.fg_fraction == 0.0

    def to_json(self) -> dict[str, Any]:
        return {"present": self.present, "box": list(self.box) if self.box else None,
                "crop_box": list(self.crop_box) if self.crop_box else None,
                "fg_fraction": round(self.fg_fraction, 4)}


@dataclass(frozen=True)
class Foreground:
    """What ``foreground_box`` found: the box (None: nothing), the foreground share and the gain used."""

    box: Box | None
    fg_fraction: float
    gain: float


def crop_box(box: Box | None, roi_hw: tuple[int, int], policy: CropPolicy) -> Box | None:
    """The square the model sees for an item box (the CropPolicy rule; ``policy.mode`` is not consulted).

    Grows the box by ``margin`` x its longer side on every side, centred on the box, as a square; a square
    larger than the ROI's shorter side becomes that side; the square is shifted to lie inside the ROI.
    None for no box, or one whose longer side is under ``min_size`` pixels.
    """
    if box is None:
        return None
    x0, y0, x1, y1 = box
    height, width = roi_hw
    longer = max(x1 - x0, y1 - y0)
    if longer < policy.min_size:
        return None
    side = min(int(round(longer * (1.0 + 2.0 * policy.margin))), height, width)
    left = _place(x0 + x1, side, width)
    top = _place(y0 + y1, side, height)
    return left, top, left + side, top + side


def _place(twice_centre: int, side: int, limit: int) -> int:
    """Start of a ``side`` long span centred at ``twice_centre / 2``, shifted into ``0..limit``."""
    start = int(np.floor((twice_centre - side) / 2.0 + 0.5))
    return min(max(start, 0), limit - side)


def cut(image: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1]


def model_view(roi_image: np.ndarray, crop: Box | None, policy: CropPolicy) -> np.ndarray:
    """What the model is fed before preprocessing: the item's square crop with a ``foreground`` policy,
    else (``roi`` policy, or no item found) the whole ROI."""
    if policy.mode == "foreground" and crop is not None:
        return cut(roi_image, crop)
    return roi_image


def work_copy(image: np.ndarray, work_size: int, texture_px: float) -> tuple[np.ndarray, float]:
    """(float32 shrunk and blurred copy, shrink factor): what the background model compares.

    The shrink is by a whole factor (the one that brings the longer side nearest ``work_size``): OpenCV's
    area averaging has a fast path for whole factors, about 3x faster than 300 -> 96 px, on every frame of
    every camera. The last ``factor - 1`` rows and columns at most are left out.
    """
    height, width = image.shape[:2]
    factor = max(1, int(round(max(height, width) / work_size)))
    factor = min(factor, height, width)
    scale = 1.0 / factor
    small = image
    if factor > 1:
        rows, cols = height // factor, width // factor
        small = cv2.resize(image[: rows * factor, : cols * factor], (cols, rows), interpolation=cv2.INTER_AREA)
    small = small.astype(np.float32)
    kernel = int(round(texture_px * scale))
    if kernel >= 2:
        small = cv2.blur(small, (kernel, kernel), borderType=cv2.BORDER_REFLECT)
    return small, scale


def log_ratio(frame: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per-pixel log brightness ratio frame/background of two working copies (+4 keeps black finite)."""
    f = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
    b = cv2.cvtColor(background, cv2.COLOR_RGB2GRAY) if background.ndim == 3 else background
    return np.log((f + 4.0) / (b + 4.0))


def _mode_log(ratio: np.ndarray, max_gain: float) -> float | None:
    """The log ratio most values share, within +-log(max_gain); None when too few values are in range."""
    bound = float(np.log(max_gain))
    step = 0.01
    n_bins = max(1, int(2 * bound / step))
    bins = np.floor((ratio.ravel() + bound) / step).astype(np.int64)
    inside = (bins >= 0) & (bins < n_bins)
    if int(inside.sum()) < 16:
        return None
    hist = np.convolve(np.bincount(bins[inside], minlength=n_bins), np.ones(3), mode="same")
    peak = (int(hist.argmax()) + 0.5) * step - bound
    near = ratio[np.abs(ratio - peak) <= 3 * step]
    return float(np.median(near)) if near.size else peak


def estimate_gain(frame: np.ndarray, background: np.ndarray, max_gain: float,
                  where: np.ndarray | None = None) -> float:
    """Frame/background brightness ratio shared by most pixels (the empty scene's), within 1/max..max."""
    ratio = log_ratio(frame, background)
    level = _mode_log(ratio[where] if where is not None else ratio, max_gain)
    return float(np.exp(level)) if level is not None else 1.0


FIT_STEP = 2                        # the field is fitted on every 2nd row and column (a quarter of the pixels)
FIT_BANDS = (0.15, 0.08, 0.05)      # log-ratio band around the field of the pixels each refit uses
QUADRATIC_SUPPORT = 0.5             # share of the working copy that must fit a quadratic for its shape to count
PLANE_SUPPORT = 0.2                 # ... a plane (else one global gain)


@lru_cache(maxsize=8)
def _basis(height: int, width: int, step: int = 1) -> np.ndarray:
    """(rows*cols, 6) float32 quadratic terms 1, x, y, x^2, xy, y^2 of every ``step``-th row and column,
    coordinates scaled to -1..1 over the whole working copy."""
    y, x = np.mgrid[0:height:step, 0:width:step].astype(np.float32)
    x = (2 * x - (width - 1)) / max(width - 1, 1)
    y = (2 * y - (height - 1)) / max(height - 1, 1)
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1).reshape(-1, 6)


@lru_cache(maxsize=8)
def _products(height: int, width: int, step: int, n_terms: int) -> np.ndarray:
    """(rows*cols, n_terms^2) float32 products of each grid pixel's terms: a weighted sum of its rows is
    the least-squares normal matrix of the pixels weighted, with no per-frame selection."""
    terms = _basis(height, width, step)[:, :n_terms]
    return (terms[:, :, None] * terms[:, None, :]).reshape(len(terms), -1)


def _fit(points: np.ndarray, valid: np.ndarray | None, level: float, n_terms: int,
         hw: tuple[int, int]) -> tuple[np.ndarray | None, int]:
    """(coefficients, pixels that fit them) of the log ratio on the ``FIT_STEP`` grid by least squares on
    the (``valid``) pixels within each narrowing band of the last fit, starting from the global level;
    None when too few pixels fit. ``hw``: the working copy's size (``points`` is its grid)."""
    terms = _basis(hw[0], hw[1], FIT_STEP)[:, :n_terms]
    products = _products(hw[0], hw[1], FIT_STEP, n_terms)
    values = points.ravel()
    fitted = np.full(values.shape, level, np.float32)
    allowed = valid.ravel() if valid is not None else None
    coef, count = None, 0
    for band in FIT_BANDS:
        use = np.abs(values - fitted) <= band
        if allowed is not None:
            use &= allowed
        weight = use.astype(np.float32)
        if float(weight.sum()) < max(32, values.size // 10):
            break
        normal = (weight @ products).reshape(n_terms, n_terms).astype(np.float64)
        ok, solved = cv2.solve(normal, ((weight * values) @ terms).astype(np.float64).reshape(-1, 1),
                               flags=cv2.DECOMP_CHOLESKY)
        if not ok:
            return None, 0
        coef = solved.ravel().astype(np.float32)
        fitted = terms @ coef
        near = np.abs(values - fitted) <= FIT_BANDS[-1]
        count = int((near & allowed).sum() if allowed is not None else near.sum())
    return coef, count


def estimate_light(frame: np.ndarray, background: np.ndarray, max_gain: float, max_local_gain: float,
                   where: np.ndarray | None = None,
                   prior: np.ndarray | None = None) -> tuple[float, np.ndarray | None]:
    """(global gain, HxW float32 gain field or None): the smooth light change from background to frame.

    The global gain is ``estimate_gain``'s; the field is a quadratic in x, y of the log ratio, fitted on
    the pixels (``where``, if given: away from the last item) within a narrowing band of the current
    field, starting from the global level, so the empty scene's pixels fit it and an item's fall out.
    A quadratic fitted on a strip (an item covering most of the view) would be wild elsewhere, so its
    shape counts only when ``QUADRATIC_SUPPORT`` of the whole working copy fits it; else the ``prior``
    field (the last frame's) keeps its shape and only its level follows, or without one a plane (on
    ``PLANE_SUPPORT``) or the global gain alone. The field stays within ``1/max_local_gain ..
    max_local_gain`` of the global gain and ``1/max_gain .. max_gain`` overall. None: the global gain
    alone (``max_local_gain`` 1, or too few pixels fit).
    """
    ratio = log_ratio(frame, background)
    height, width = ratio.shape
    points = ratio[::FIT_STEP, ::FIT_STEP]              # a quarter of the pixels: plenty for 6 terms, 4x cheaper
    sub = where[::FIT_STEP, ::FIT_STEP] if where is not None else None
    level = _mode_log(points[sub] if sub is not None else points, max_gain)
    if level is None:
        return 1.0, None
    if max_local_gain <= 1.0:
        return float(np.exp(level)), None
    total = points.size
    local = float(np.log(max_local_gain))
    coef, count = _fit(points, sub, level, 6, (height, width))
    if coef is None or count < QUADRATIC_SUPPORT * total:
        if prior is not None:
            shift = np.log(prior[::FIT_STEP, ::FIT_STEP])
            shift = _mode_log((points - shift)[sub] if sub is not None else points - shift, max_local_gain)
            return float(np.exp(level)), prior * np.float32(np.exp(shift)) if shift is not None else prior
        coef, count = _fit(points, sub, level, 3, (height, width))
        if coef is None or count < PLANE_SUPPORT * total:
            return float(np.exp(level)), None
        coef = np.concatenate([coef, np.zeros(3, np.float32)])
    bound = float(np.log(max_gain))
    field = np.clip(_quadratic(coef, height, width), max(level - local, -bound), min(level + local, bound))
    return float(np.exp(level)), np.exp(field)


def _quadratic(coef: np.ndarray, height: int, width: int) -> np.ndarray:
    """HxW float32 c0 + c1 x + c2 y + c3 x^2 + c4 xy + c5 y^2 (the ``_basis`` coordinates), by rows and columns."""
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32) if width > 1 else np.zeros(1, np.float32)
    y = (np.linspace(-1.0, 1.0, height, dtype=np.float32) if height > 1 else np.zeros(1, np.float32))[:, None]
    c = coef.astype(np.float32)
    return (c[0] + c[1] * x + c[3] * x * x) + y * (c[2] + c[4] * x) + c[5] * y * y


GROW_THRESHOLD = 12.0          # decisions.presence.background_grow_threshold's default (0: off)
GROW_RELATIVE = 0.12           # decisions.presence.background_grow_relative's default
NOISE_QUANTILE = 0.25          # of the difference image: the belt's own, while an item covers under 3/4 of the ROI
HALF_NORMAL_Q25 = 0.3186       # the 25th percentile of |N(0, 1)|


def noise_threshold(diff: np.ndarray, threshold: float, noise_k: float, min_threshold: float) -> float:
    """The threshold this frame needs: ``noise_k`` x the scene's own residual noise (sigma from the lower
    quartile of the difference image, which the empty scene owns), between ``min_threshold`` and ``threshold``.
    A dark, quiet belt gets a low threshold (a dark item differs from it by little), a bright or busy scene
    keeps the full one. ``noise_k`` 0: the fixed ``threshold``."""
    if noise_k <= 0:
        return threshold
    sigma = float(np.quantile(diff, NOISE_QUANTILE)) / HALF_NORMAL_Q25
    return float(min(threshold, max(min_threshold, noise_k * sigma)))


def grow(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """uint8 0/1: the 8-connected parts of ``weak`` that hold a pixel of ``strong`` (hysteresis)."""
    count, labels = cv2.connectedComponents(weak, connectivity=8)
    keep = np.zeros(count, np.uint8)
    keep[labels[strong.astype(bool)]] = 1
    keep[0] = 0
    return keep[labels]


def foreground_mask(frame: np.ndarray, background: np.ndarray, gain: float, threshold: float,
                    open_px: int = 3, close_px: int = 5, field: np.ndarray | None = None,
                    noise_k: float = 0.0, min_threshold: float = 8.0, grow_threshold: float = 0.0,
                    bridge_px: int = 0, seed_px: float = 0.0, grow_relative: float = 0.0) -> np.ndarray:
    """uint8 0/1 mask of the working copy: largest per-channel difference from the lit background over
    threshold (or over ``noise_threshold``'s when ``noise_k`` > 0); lit by ``field`` (HxW gains) when given,
    else by the one ``gain``. With ``grow_threshold`` (below the threshold), the parts over it that touch a
    foreground part of at least ``seed_px`` pixels (after the opening), or come within ``bridge_px`` of one,
    are foreground too: a dark item's dim parts join its bright ones, while dim differences with no bright
    part that would count as an item by itself (noise, light residue, specks) stay background, so growing
    never makes an item out of an empty scene. (Between an item's parts brighter and darker than the
    background the blurred difference passes through zero, hence the bridge.) ``grow_relative``: a pixel
    grows only where its difference is also over this share of the lit background's brightness there
    (light residue is proportional to the light: on a light bench a 10% light error is as large as the
    grow threshold, on a dark belt it is a third of it)."""
    if field is not None:
        lit = background * (field[:, :, None] if background.ndim == 3 else field)
    else:
        lit = background * np.float32(gain) if gain != 1.0 else background
    diff = cv2.absdiff(frame, lit)
    if diff.ndim == 3:
        diff = cv2.max(cv2.max(diff[:, :, 0], diff[:, :, 1]), diff[:, :, 2])
    level = noise_threshold(diff, threshold, noise_k, min_threshold)
    mask = (diff > level).astype(np.uint8)
    if open_px > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((open_px, open_px), np.uint8))
    if 0 < grow_threshold < level and mask.any():
        floor = grow_threshold
        if grow_relative > 0:
            bright = cv2.max(cv2.max(lit[:, :, 0], lit[:, :, 1]), lit[:, :, 2]) if lit.ndim == 3 else lit
            floor = np.maximum(floor, np.float32(grow_relative) * bright)
        weak = (diff > floor).astype(np.uint8)
        if open_px > 1:
            weak = cv2.morphologyEx(weak, cv2.MORPH_OPEN, np.ones((open_px, open_px), np.uint8)) | mask
        seeds = mask
        if seed_px > 0:
            count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            big = (stats[:, cv2.CC_STAT_AREA] >= seed_px).astype(np.uint8)
            big[0] = 0
            seeds = big[labels]
        if bridge_px > 0:
            seeds = cv2.dilate(seeds, np.ones((2 * bridge_px + 1,) * 2, np.uint8))
        mask = grow(seeds & weak, weak) | mask
    if close_px > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((close_px, close_px), np.uint8))
    return mask


FOLLOW_OVERLAP = 0.5           # of the smaller box (decide.box_overlap): a component is the item the last frame showed
FOLLOW_SHARE = 0.25            # ... and is followed while at least this share of the largest component's area


def item_box(mask: np.ndarray, min_area_px: float, join_px: float,
             follow: tuple[int, int, int, int] | None = None) -> tuple[tuple[int, int, int, int] | None, int]:
    """(box of the largest component joined with those within ``join_px``, pixels of kept components).

    ``follow``: the box the last frame reported; the largest component that overlaps it (``FOLLOW_OVERLAP``)
    and is at least ``FOLLOW_SHARE`` of the largest one's area is taken instead of the largest, so two items
    of about one size in view together do not take turns. Boxes here are in mask pixels, x1/y1 exclusive.
    """
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    parts = [stats[i] for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area_px]
    if not parts:
        return None, 0
    parts.sort(key=lambda s: -int(s[cv2.CC_STAT_AREA]))
    first = _followed(parts, follow) if follow is not None else 0
    x, y, w, h = (int(v) for v in parts[first][:4])
    box = (x, y, x + w, y + h)
    rest, changed = parts[:first] + parts[first + 1:], True
    while changed:                      # a joined part may bring another within reach
        changed, keep = False, []
        for part in rest:
            px, py, pw, ph = (int(v) for v in part[:4])
            if max(px - box[2], box[0] - (px + pw), py - box[3], box[1] - (py + ph)) <= join_px:
                box = (min(box[0], px), min(box[1], py), max(box[2], px + pw), max(box[3], py + ph))
                changed = True
            else:
                keep.append(part)
        rest = keep
    return box, int(sum(int(s[cv2.CC_STAT_AREA]) for s in parts))


def _followed(parts: list[np.ndarray], follow: tuple[int, int, int, int]) -> int:
    """Index in ``parts`` (largest first) of the component that is the followed item; 0 (the largest) when
    none overlaps ``follow`` enough or is large enough."""
    least = FOLLOW_SHARE * int(parts[0][cv2.CC_STAT_AREA])
    for i, part in enumerate(parts):
        if int(part[cv2.CC_STAT_AREA]) < least:
            break
        x, y, w, h = (int(v) for v in part[:4])
        if box_overlap((x, y, x + w, y + h), follow) >= FOLLOW_OVERLAP:
            return i
    return 0


def to_roi(box: tuple[int, int, int, int], scale: float, roi_hw: tuple[int, int],
           work_hw: tuple[int, int] | None = None) -> Box:
    """A working-copy box in ROI pixels (outward rounding, clipped); a box that reaches the working copy's
    last row or column reaches the ROI's (the rows and columns the whole-factor shrink left out)."""
    height, width = roi_hw
    x0, y0, x1, y1 = box
    x1 = width if work_hw is not None and x1 >= work_hw[1] else x1 / scale
    y1 = height if work_hw is not None and y1 >= work_hw[0] else y1 / scale
    return (max(0, int(np.floor(x0 / scale))), max(0, int(np.floor(y0 / scale))),
            min(width, int(np.ceil(x1))), min(height, int(np.ceil(y1))))


def foreground_box(image: np.ndarray, background: np.ndarray, *, work_size: int = 96, texture_px: float = 12.0,
                   threshold: float = 25.0, min_area: float = 0.005, join_px: float = 8.0, max_gain: float = 1.6,
                   gain: float | None = None, max_local_gain: float = 1.4, noise_k: float = 0.0,
                   min_threshold: float = 8.0, grow_threshold: float = GROW_THRESHOLD,
                   grow_relative: float = GROW_RELATIVE) -> Foreground:
    """The item's box in ``image`` (HxWx3 uint8 RGB ROI) against ``background`` (the empty scene, same size).

    The station's ``Localizer`` calls the same steps with its learned background; the trainer calls this
    with a known background to crop exactly as the station does. ``gain``: the frame/background light
    ratio when known (1.0 for a rendered scene: no light change at all); None estimates it, as a smooth
    field when ``max_local_gain`` > 1 (``estimate_light``). Parameters are those of
    ``decisions.presence`` (docs/agent.md), with the same defaults.
    """
    if image.shape != background.shape:
        raise ValueError(f"foreground_box: image {image.shape} and background {background.shape} differ in shape")
    frame, scale = work_copy(image, work_size, texture_px)
    back, _ = work_copy(background, work_size, texture_px)
    field = None
    if gain is None:
        gain, field = estimate_light(frame, back, max_gain, max_local_gain)
    return _locate(frame, back, scale, image.shape[:2], threshold=threshold, min_area=min_area, join_px=join_px,
                   gain=gain, field=field, noise_k=noise_k, min_threshold=min_threshold,
                   grow_threshold=grow_threshold, grow_relative=grow_relative)[0]


def _locate(frame: np.ndarray, back: np.ndarray, scale: float, roi_hw: tuple[int, int], *, threshold: float,
            min_area: float, join_px: float, gain: float, field: np.ndarray | None = None,
            noise_k: float = 0.0, min_threshold: float = 8.0, grow_threshold: float = 0.0,
            grow_relative: float = 0.0, follow: Box | None = None) -> tuple[Foreground, np.ndarray]:
    """``foreground_box``'s steps on working copies; ``follow``: the ROI box the last frame reported (``item_box``)."""
    mask = foreground_mask(frame, back, gain, threshold, field=field, noise_k=noise_k, min_threshold=min_threshold,
                           grow_threshold=grow_threshold, bridge_px=int(round(join_px * scale)) + 1,
                           seed_px=min_area * frame.shape[0] * frame.shape[1], grow_relative=grow_relative)
    work = None
    if follow is not None:
        work = (int(follow[0] * scale), int(follow[1] * scale),
                int(np.ceil(follow[2] * scale)), int(np.ceil(follow[3] * scale)))
    box, fg_pixels = item_box(mask, min_area * mask.size, join_px * scale, work)
    fraction = fg_pixels / float(mask.size)
    return Foreground(to_roi(box, scale, roi_hw, mask.shape[:2]) if box else None, fraction, gain), mask


STANDING_OVERLAP = 0.5         # of the run's first box (decide.box_overlap): an item standing still, not riding by
REPLACED_CLOSER = 0.5          # where the relearned item stood, the view's mean difference from the replaced
                               # background under this share of that from the current one: check the replaced one
BLANK_SPREAD = 6.0             # working-copy max - min under which a dark or saturated view shows nothing
BLANK_DARK, BLANK_BRIGHT = 12.0, 243.0     # (0..255) the darkest scene the benchmarks light is 17 at gain 0.4


def blank_view(frame: np.ndarray) -> bool:
    """A working copy that shows nothing: all but black (lights off, a covered lens) or all but white (a
    flash, a saturated sensor). Neither an item nor the empty scene: it is not localized and not learned."""
    low, high = float(frame.min()), float(frame.max())
    return high - low < BLANK_SPREAD and (high <= BLANK_DARK or low >= BLANK_BRIGHT)


@dataclass(frozen=True)
class LocalizerSettings:
    """The localizer's knobs (``decisions.presence``, see agent/config.py for their meaning and bounds)."""

    work_size: int = 96
    texture_px: float = 12.0
    threshold: float = 25.0
    noise_k: float = 0.0
    min_threshold: float = 8.0
    grow_threshold: float = GROW_THRESHOLD
    grow_relative: float = GROW_RELATIVE
    min_area: float = 0.005
    join_px: float = 8.0
    max_gain: float = 1.6
    max_local_gain: float = 1.4
    alpha: float = 0.05
    busy_alpha: float = 0.005
    warmup_frames: int = 1
    relearn_frames: int = 1800

    @classmethod
    def from_config(cls, presence: Any) -> "LocalizerSettings":
        return cls(work_size=presence.work_size, texture_px=presence.texture_px,
                   threshold=presence.background_threshold, noise_k=presence.background_noise_k,
                   min_threshold=presence.background_min_threshold,
                   grow_threshold=presence.background_grow_threshold,
                   grow_relative=presence.background_grow_relative, min_area=presence.min_area, join_px=presence.join_px,
                   max_gain=presence.max_gain, max_local_gain=presence.max_local_gain,
                   alpha=presence.background_alpha, busy_alpha=presence.busy_alpha,
                   warmup_frames=presence.warmup_frames, relearn_frames=presence.relearn_frames)


class Localizer:
    """One camera's background model and item finder; state lives in the camera's own thread."""

    def __init__(self, settings: LocalizerSettings = LocalizerSettings(), policy: CropPolicy = CropPolicy(),
                 empty_scene: np.ndarray | None = None) -> None:
        self.settings = settings
        self.policy = policy
        self.background: np.ndarray | None = None
        self.gain = 1.0
        self.light: np.ndarray | None = None     # the last frame's gain field (None: the one ``gain``)
        self._seen = 0                  # warm-up frames averaged into the background so far
        self._busy = 0                  # consecutive frames with an item standing where the run's first box was
        self._busy_box: Box | None = None
        self._last: Box | None = None
        self._empty_scene = empty_scene
        self._blank = False
        self._replaced: np.ndarray | None = None    # the background the last relearn replaced (restorable)
        self._replaced_at: tuple[int, int, int, int] = (0, 0, 0, 0)   # where the relearned item stood (work px)
        self._replaced_rest = 0.0       # the replaced background's sum outside ``_replaced_at`` (0: none there)
        self.relearned = 0
        self.restored = 0               # relearns undone: the view showed the replaced background again
        self.blank_frames = 0           # frames that showed nothing (blank_view), counted

    def update(self, roi_image: np.ndarray, policy: CropPolicy | None = None) -> Located:
        """Localize the item in one ROI frame and let the background learn from it."""
        s = self.settings
        policy = policy or self.policy
        frame, scale = work_copy(roi_image, s.work_size, s.texture_px)
        roi_hw = roi_image.shape[:2]
        if self.background is None or self.background.shape != frame.shape:
            self._start(frame, roi_image)
        if self._blanked(frame):
            return self._blank_frame(frame)
        if self._blank:
            log.info("localizer: the view shows the scene again after %d blank frames", self.blank_frames)
            self._blank = False
        if self._seen < s.warmup_frames:
            self._seen += 1
            self.background += (frame - self.background) / self._seen
            return Located(False, None, None, 0.0, settled=False)
        self.gain, self.light = self._light(frame, scale)
        found, mask = self._find(frame, scale, roi_hw, self.gain, self.light, self._last)
        crop = crop_box(found.box, roi_hw, policy)
        present = crop is not None
        if present and self._replaced is not None and self._shows_replaced(frame):
            restored = self._restore(frame, scale, roi_hw)
            if restored is not None:
                return restored
        self._learn(frame, present, found.box, scale, mask)
        self._last = found.box if present else None
        return Located(present, found.box if present else None, crop, found.fg_fraction)

    def _blanked(self, frame: np.ndarray) -> bool:
        """A blank view (``blank_view``) of a scene that is not itself blank: a scene learned black and
        featureless (items shown on black) is its own empty view. During the warm-up there is no scene yet."""
        if self._seen < self.settings.warmup_frames or not blank_view(frame):
            return False
        back = self.background
        assert back is not None
        return not (blank_view(back) and abs(float(back.mean()) - float(frame.mean())) < BLANK_SPREAD)

    def _blank_frame(self, frame: np.ndarray) -> Located:
        """No item and no scene to learn from: the item in view (if any) ends, the background stays as it was."""
        self.blank_frames += 1
        if not self._blank:
            log.warning("localizer: the view is blank (mean %.0f of 255: lights off, a covered lens or a saturated "
                        "sensor); no item is looked for until it shows the scene again", float(frame.mean()))
            self._blank = True
        self._busy, self._busy_box, self._last = 0, None, None
        return Located(False, None, None, 0.0, settled=False)

    def _start(self, frame: np.ndarray, roi_image: np.ndarray) -> None:
        """A new (or resized) scene: the captured empty image when it fits, else the coming warm-up frames."""
        scene = self._empty_scene
        if scene is not None and scene.shape[:2] != roi_image.shape[:2]:
            # stretched to the ROI it would be another scene, read as an item everywhere it differs
            log.warning("localizer: the empty-scene image is %dx%d px, the ROI %dx%d px; it is not used, the "
                        "first frames are taken as the empty scene (capture it at the camera's resolution)",
                        scene.shape[1], scene.shape[0], roi_image.shape[1], roi_image.shape[0])
            scene = self._empty_scene = None
        if scene is not None:
            self.background = work_copy(scene, self.settings.work_size, self.settings.texture_px)[0]
            self._seen = self.settings.warmup_frames
        else:
            self.background = np.zeros_like(frame)
            self._seen = 0
        self._busy, self._busy_box, self._last, self.gain, self.light = 0, None, None, 1.0, None
        self._replaced = None

    def _light(self, frame: np.ndarray, scale: float) -> tuple[float, np.ndarray | None]:
        """Light change (global gain, field), from the pixels away from the last item; kept when too few
        of them are left."""
        assert self.background is not None
        where = None
        if self._last is not None:
            where = np.ones(frame.shape[:2], bool)
            x0, y0, x1, y1 = self._grown(self._last, scale, frame.shape[:2])
            where[y0:y1, x0:x1] = False
            if where.mean() < 0.15:
                return self._kept_light(frame, scale)
        return estimate_light(frame, self.background, self.settings.max_gain, self.settings.max_local_gain, where,
                              self.light)

    def _kept_light(self, frame: np.ndarray, scale: float) -> tuple[float, np.ndarray | None]:
        """The last light while the last item hid nearly all the scene, unless a fresh estimate on the whole
        frame explains it with no item at all: the item has gone. Without that, a plain item that filled the
        view in the frame it arrived (its brightness ratio taken for the light) kept the wrong light after it
        left, and the empty scene read as an item until the background was relearned."""
        s = self.settings
        assert self.background is not None
        gain, light = estimate_light(frame, self.background, s.max_gain, s.max_local_gain, None, self.light)
        found, _ = self._find(frame, scale, frame.shape[:2], gain, light)
        return (gain, light) if found.box is None else (self.gain, self.light)

    def _find(self, frame: np.ndarray, scale: float, roi_hw: tuple[int, int], gain: float,
              light: np.ndarray | None, follow: Box | None = None,
              background: np.ndarray | None = None) -> tuple[Foreground, np.ndarray]:
        """``_locate`` against the learned background (or ``background``) with these settings, under the given
        light, following the item at ``follow`` (the last frame's box) when it is still there."""
        s = self.settings
        back = self.background if background is None else background
        assert back is not None
        return _locate(frame, back, scale, roi_hw, threshold=s.threshold, min_area=s.min_area,
                       join_px=s.join_px, gain=gain, field=light, noise_k=s.noise_k, min_threshold=s.min_threshold,
                       grow_threshold=s.grow_threshold, grow_relative=s.grow_relative, follow=follow)

    def _shows_replaced(self, frame: np.ndarray) -> bool:
        """Cheap test before localizing against the replaced background: where the relearned item stood, the
        view differs from the replaced background by well under what it differs from the current one (the
        thing left there is gone, or something like the old scene covers it). The current background under
        the current light, the replaced one under the light the view's mean brightness elsewhere gives it
        (the replaced background learned nothing since, the light may have changed)."""
        assert self.background is not None and self._replaced is not None
        x0, y0, x1, y1 = self._replaced_at
        view = frame[y0:y1, x0:x1]
        old_gain = self.gain
        if self._replaced_rest > 0:
            old_gain = (float(frame.sum()) - float(view.sum())) / self._replaced_rest
            old_gain = min(max(old_gain, 1.0 / self.settings.max_gain), self.settings.max_gain)
        old = float(cv2.absdiff(view, self._replaced[y0:y1, x0:x1] * np.float32(old_gain)).mean())
        new = float(cv2.absdiff(view, self.background[y0:y1, x0:x1] * np.float32(self.gain)).mean())
        return old < REPLACED_CLOSER * new

    def _restore(self, frame: np.ndarray, scale: float, roi_hw: tuple[int, int]) -> Located | None:
        """The replaced background back, when the frame localized against it (under its own light) shows
        nothing at all: the frame is then empty and learned from. None (nothing changed) when it shows
        anything: an item, or a part too small to be one."""
        s = self.settings
        back = self._replaced
        assert back is not None
        gain, light = estimate_light(frame, back, s.max_gain, s.max_local_gain)
        found, mask = self._find(frame, scale, roi_hw, gain, light, background=back)
        if found.box is not None:
            return None
        log.info("localizer: the view shows the background the last relearn replaced (what was left in view "
                 "has been taken away); restoring it")
        self.background, self._replaced = back, None
        self.gain, self.light = gain, light
        self.restored += 1
        self._learn(frame, False, None, scale, mask)
        self._last = None
        return Located(False, None, None, found.fg_fraction)

    def _grown(self, box: Box, scale: float, hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """An ROI box in working-copy pixels, grown by the join distance and the blur."""
        pad = (self.settings.join_px + self.settings.texture_px) * scale + 1
        x0, y0, x1, y1 = box
        return (max(0, int(x0 * scale - pad)), max(0, int(y0 * scale - pad)),
                min(hw[1], int(np.ceil(x1 * scale + pad))), min(hw[0], int(np.ceil(y1 * scale + pad))))

    def _learn(self, frame: np.ndarray, present: bool, box: Box | None, scale: float, mask: np.ndarray) -> None:
        """Follow the empty scene, never quickly where something differs from it.

        Foreground that is not the item (the next item entering, the last one leaving, anything under
        ``min_area`` or ``min_size``) is learned only at ``busy_alpha``, and only while no item is in view:
        learned at the full rate it would leave a ghost of itself in the background, a ghost reads as an
        item in every later frame, and an item never ends. While an item is in view the background
        learns only away from it and from any other foreground, slowly.
        """
        s = self.settings
        assert self.background is not None
        pad = int(np.ceil(s.join_px * scale)) + 1
        quiet = cv2.dilate(mask, np.ones((2 * pad + 1, 2 * pad + 1), np.uint8)) == 0
        if not present:
            self._busy, self._busy_box = 0, None
            if quiet.all():
                cv2.accumulateWeighted(frame, self.background, s.alpha)
                return
            cv2.accumulateWeighted(frame, self.background, s.alpha, mask=quiet.astype(np.uint8))
            if s.busy_alpha > 0:
                cv2.accumulateWeighted(frame, self.background, s.busy_alpha, mask=(~quiet).astype(np.uint8))
            return
        # Only something standing still counts towards a relearn: items back to back on a running belt, never
        # an empty frame between them, are not a changed scene (a relearn then would learn one of them).
        if self._busy_box is None or box is None or box_overlap(box, self._busy_box) < STANDING_OVERLAP:
            self._busy, self._busy_box = 0, box
        self._busy += 1
        if s.relearn_frames and self._busy >= s.relearn_frames:
            log.warning("localizer: an item has been in view for %d frames; taking the scene as the new empty "
                        "background", self._busy)
            # the scene before is kept: if the item is taken away, the view is that scene again (``_restore``)
            at = self._grown(box, scale, frame.shape[:2]) if box is not None else (0, 0, frame.shape[1], frame.shape[0])
            self._replaced, self._replaced_at = self.background, at
            rest = float(self.background.sum()) - float(self.background[at[1]:at[3], at[0]:at[2]].sum())
            self._replaced_rest = rest if rest > 1.0 else 0.0
            self.background = frame.copy()
            self._busy, self._busy_box, self._last, self.gain, self.light = 0, None, None, 1.0, None
            self.relearned += 1
            return
        if s.busy_alpha > 0 and box is not None:
            outside = quiet.astype(np.uint8)
            x0, y0, x1, y1 = self._grown(box, scale, frame.shape[:2])
            outside[y0:y1, x0:x1] = 0
            cv2.accumulateWeighted(frame, self.background, s.busy_alpha, mask=outside)
