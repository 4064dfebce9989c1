"""Station-view scenes: Fashion-MNIST *test* items as a station camera sees them (demo, benchmark, tests).

Torch-free (numpy + OpenCV) and deterministic: a scene is planned once from ``(seed, scene)``, and
frame ``t`` is rendered from the plan plus its own generator ``default_rng([seed, scene, t])``, so
the same seed gives the same JPEG bytes in any order and on any machine with the same OpenCV.

Two scenes, each a camera frame larger than the station's ROI:

* ``belt``: a dark textured conveyor whose ribs move with it; items ride across the ROI at belt
  speed, rotated, with a soft shadow; light uneven across the frame and slowly drifting; sensor
  noise; now and then a motion-blurred frame; 2-8 empty-belt frames between items, sometimes none.
* ``bench``: a light wooden bench under a tilted camera (the bench plane is warped by a
  homography); an item slides in, rests for 8-15 frames with slight jitter, and is taken away.

Why not the trainer's compositor: the demo and benchmark must not grade the trainer on its own generator, so
textures, light and motion are chosen here independently.

The truth of a frame is computed from the very masks that were composited: an item is *visible*
when any of its mask pixels lies in the ROI and *fully in* when all of them do.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from contract.dataset import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR

SCENES = ("belt", "bench")
TRUTH_VERSION = 1
MASK_LEVEL = 0.5          # alpha above this is "the item" for the truth
LEAD_EMPTY_FRAMES = 6     # the station learns its empty background from the first frames


# ---------------------------------------------------------------- data

def read_idx(path: Path) -> np.ndarray:
    """A (gzip) IDX file as an array: images N x 28 x 28 uint8, labels N."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_test_split(root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The t10k images and labels: the only split a benchmark may show the model."""
    images = read_idx(root / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} test images but {len(labels)} labels")
    return images, labels


def pick_items(labels: np.ndarray, n: int, seed: int, scene: str, exclude: Iterable[int] = ()) -> list[int]:
    """``n`` test indices, classes balanced (round robin), disjoint between scenes of one seed.

    Every scene draws from its own stretch of one seeded permutation, so scene A's items are never
    scene B's: the loop can train on A and measure on B. Two draws of one scene (other seeds) may
    share items; ``exclude`` skips given test indices (the loop's same-station scene B skips A's).
    """
    skip = {int(i) for i in exclude}
    order = np.random.default_rng(seed).permutation(len(labels))
    stretch = order[SCENES.index(scene) * (len(labels) // len(SCENES)):][: len(labels) // len(SCENES)]
    quota = math.ceil(n / len(FASHION_MNIST_CLASSES))
    taken: dict[int, int] = {}
    out: list[int] = []
    for idx in stretch.tolist():
        label = int(labels[idx])
        if idx not in skip and taken.get(label, 0) < quota:
            taken[label] = taken.get(label, 0) + 1
            out.append(idx)
            if len(out) == n:
                break
    rng = np.random.default_rng([seed, SCENES.index(scene), 7])
    return [out[i] for i in rng.permutation(len(out))]


# ---------------------------------------------------------------- items

def item_mask28(img: np.ndarray) -> np.ndarray:
    """The item's silhouette in the 28 px image: Fashion-MNIST items lie on black, holes filled."""
    mask = (img > 12).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    flood = np.pad(mask, 1).copy()
    cv2.floodFill(flood, None, (0, 0), 2)
    return ((flood[1:-1, 1:-1] != 2)).astype(np.float32)


@dataclass(frozen=True)
class Patch:
    """An item ready to composite: RGB (float32 0..255), alpha 0..1, both h x w."""

    rgb: np.ndarray
    alpha: np.ndarray

    @property
    def area(self) -> int:
        return int((self.alpha > MASK_LEVEL).sum())


def make_patch(img: np.ndarray, width: int, angle: float, tint: tuple[float, float, float]) -> Patch:
    """The 28 px image upscaled to ``width``, tinted, rotated by ``angle`` degrees, cropped to its alpha."""
    gray = np.clip(cv2.resize(img.astype(np.float32), (width, width), interpolation=cv2.INTER_CUBIC), 0, 255)
    alpha = cv2.resize(item_mask28(img), (width, width), interpolation=cv2.INTER_LINEAR)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 1.2)
    side = int(math.ceil(width * math.sqrt(2))) + 4
    pad = (side - width) // 2
    rot = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    stack = np.dstack([gray[..., None] * np.asarray(tint, np.float32), alpha])
    stack = cv2.copyMakeBorder(stack, pad, side - width - pad, pad, side - width - pad, cv2.BORDER_CONSTANT, value=0)
    stack = cv2.warpAffine(stack, rot, (side, side), flags=cv2.INTER_LINEAR, borderValue=0)
    ys, xs = np.nonzero(stack[..., 3] > 0.02)
    stack = stack[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    return Patch(np.clip(stack[..., :3], 0, 255), np.clip(stack[..., 3], 0, 1))


def random_tint(rng: np.random.Generator) -> tuple[float, float, float]:
    """A garment colour: a random hue at low-to-mid saturation, brightness 0.65-1.1."""
    hue = rng.uniform(0, 2 * math.pi)
    sat = rng.uniform(0.0, 0.3)
    gain = rng.uniform(0.65, 1.1)
    return tuple(float(gain * (1 + sat * math.cos(hue + k * 2 * math.pi / 3))) for k in range(3))


def composite(canvas: np.ndarray, patch: Patch, x: int, y: int, shadow: tuple[int, int, float] | None = None
              ) -> np.ndarray:
    """Alpha-blend ``patch`` with its top-left at (x, y), clipped; returns the item mask in canvas coordinates."""
    h, w = canvas.shape[:2]
    if shadow is not None:
        dx, dy, strength = shadow
        soft = cv2.GaussianBlur(patch.alpha, (0, 0), 6)
        region = _clip_box(x + dx, y + dy, soft.shape, (h, w))
        if region is not None:
            (cy0, cy1, cx0, cx1), (py0, py1, px0, px1) = region
            canvas[cy0:cy1, cx0:cx1] *= (1 - strength * soft[py0:py1, px0:px1])[..., None]
    mask = np.zeros((h, w), bool)
    region = _clip_box(x, y, patch.alpha.shape, (h, w))
    if region is None:
        return mask
    (cy0, cy1, cx0, cx1), (py0, py1, px0, px1) = region
    a = patch.alpha[py0:py1, px0:px1, None]
    canvas[cy0:cy1, cx0:cx1] = canvas[cy0:cy1, cx0:cx1] * (1 - a) + patch.rgb[py0:py1, px0:px1] * a
    mask[cy0:cy1, cx0:cx1] = patch.alpha[py0:py1, px0:px1] > MASK_LEVEL
    return mask


def _clip_box(x: int, y: int, shape: tuple[int, ...], bounds: tuple[int, int]):
    """Canvas and patch slices of a patch at (x, y) clipped to the canvas; None when it misses."""
    ph, pw = shape[:2]
    h, w = bounds
    cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + pw, w), min(y + ph, h)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return (cy0, cy1, cx0, cx1), (cy0 - y, cy1 - y, cx0 - x, cx1 - x)


# ---------------------------------------------------------------- scene plans

@dataclass(frozen=True)
class Roi:
    x: int
    y: int
    width: int
    height: int

    def contains(self, mask: np.ndarray) -> tuple[bool, bool]:
        """(any mask pixel in the ROI, every mask pixel in the ROI)."""
        inside = int(mask[self.y:self.y + self.height, self.x:self.x + self.width].sum())
        return inside > 0, inside > 0 and inside == int(mask.sum())


@dataclass(frozen=True)
class ItemPlan:
    """One physical item: which test image, how it looks, and where it is in every frame it is in."""

    item: int
    test_index: int
    label: int
    width: int
    angle: float
    tint: tuple[float, float, float]
    poses: dict[int, tuple[float, float, float]] = field(repr=False)   # frame -> (x, y, extra angle)


@dataclass
class ScenePlan:
    scene: str
    seed: int
    frame_size: tuple[int, int]          # width, height
    roi: Roi
    n_frames: int
    jpeg_quality: int
    items: list[ItemPlan]
    params: dict


def _item_looks(rng: np.random.Generator, n: int) -> list[tuple[int, float, tuple[float, float, float]]]:
    return [(int(rng.integers(170, 231)), float(rng.uniform(-20, 20)), random_tint(rng)) for _ in range(n)]


def _gap(rng: np.random.Generator) -> int:
    """Empty frames before the next item: 2-8, or none (back to back) one time in five."""
    return 0 if rng.random() < 0.2 else int(rng.integers(2, 9))


def plan_belt(images: np.ndarray, labels: np.ndarray, indices: list[int], seed: int) -> ScenePlan:
    """Items ride the belt left to right; each enters the ROI the frame after the planned gap."""
    rng = np.random.default_rng([seed, 0, 1])
    roi = Roi(90, 50, 300, 300)
    speed = float(rng.uniform(17, 23))       # px per frame
    items, frame = [], LEAD_EMPTY_FRAMES
    for k, (idx, (width, angle, tint)) in enumerate(zip(indices, _item_looks(rng, len(indices)))):
        patch = make_patch(images[idx], width, angle, tint)
        ph, pw = patch.alpha.shape
        cols = np.nonzero((patch.alpha > MASK_LEVEL).any(axis=0))[0]
        phase = float(rng.uniform(1, speed - 1))  # margin for rounding to whole pixels
        x0 = roi.x - cols[-1] + phase             # the mask's right edge just inside the ROI at ``frame``
        y = roi.y + roi.height / 2 - ph / 2 + float(rng.uniform(-12, 12))
        poses, t = {}, frame - int(math.ceil(roi.x / speed)) - 1   # from where it enters the camera frame
        while True:
            x = x0 + speed * (t - frame)
            if x >= 480:
                break
            if x + pw > 0:
                poses[t] = (x, y, 0.0)
            t += 1
        last_in_roi = frame + int(math.ceil((roi.x + roi.width - cols[0] - x0) / speed)) - 1
        items.append(ItemPlan(k, int(idx), int(labels[idx]), width, angle, tint, poses))
        frame = last_in_roi + 1 + _gap(rng)
    params = {"speed_px_per_frame": round(speed, 3), "rib_period_px": 56, "blur_probability": 0.06}
    return ScenePlan("belt", seed, (480, 400), roi, frame + LEAD_EMPTY_FRAMES, int(rng.integers(78, 91)), items, params)


def plan_bench(images: np.ndarray, labels: np.ndarray, indices: list[int], seed: int) -> ScenePlan:
    """Each item slides in from the near edge, rests with slight jitter, and is taken away sideways."""
    rng = np.random.default_rng([seed, 1, 1])
    roi = Roi(110, 60, 300, 300)
    centre = _bench_roi_centre(roi)
    items, frame = [], LEAD_EMPTY_FRAMES
    for k, (idx, (width, angle, tint)) in enumerate(zip(indices, _item_looks(rng, len(indices)))):
        patch = make_patch(images[idx], width, angle, tint)
        ph, pw = patch.alpha.shape
        rest = (centre[0] - pw / 2 + rng.uniform(-12, 12), centre[1] - ph / 2 + rng.uniform(-12, 12))
        n_in, n_stay, n_out = int(rng.integers(2, 5)), int(rng.integers(8, 16)), int(rng.integers(1, 4))
        side = 1 if rng.random() < 0.5 else -1
        poses: dict[int, tuple[float, float, float]] = {}
        for i in range(n_in):                                  # slides in from the near (bottom) edge
            poses[frame + i] = (rest[0], rest[1] + 260 * (n_in - i) / (n_in + 1), 0.0)
        for i in range(n_stay):
            poses[frame + n_in + i] = (rest[0] + rng.normal(0, 1.2), rest[1] + rng.normal(0, 1.2),
                                       float(rng.normal(0, 0.7)))
        for i in range(n_out):                                 # taken away to one side
            poses[frame + n_in + n_stay + i] = (rest[0] + side * 300 * (i + 1) / (n_out + 1), rest[1], 0.0)
        items.append(ItemPlan(k, int(idx), int(labels[idx]), width, angle, tint, poses))
        frame += n_in + n_stay + n_out + _gap(rng)
    params = {"plane_size": list(BENCH_PLANE)}
    return ScenePlan("bench", seed, (480, 400), roi, frame + LEAD_EMPTY_FRAMES, int(rng.integers(80, 93)), items, params)


def plan_scene(scene: str, n_items: int, seed: int, root: Path = FASHION_MNIST_DIR,
               exclude: Iterable[int] = ()) -> ScenePlan:
    images, labels = load_test_split(root)
    indices = pick_items(labels, n_items, seed, scene, exclude)
    if scene == "belt":
        return plan_belt(images, labels, indices, seed)
    if scene == "bench":
        return plan_bench(images, labels, indices, seed)
    raise ValueError(f"scene: expected one of {', '.join(SCENES)}, got {scene!r}")


# ---------------------------------------------------------------- rendering

BENCH_PLANE = (500, 420)      # bench plane, px (width, height)
# Plane corners -> camera points: the camera looks down the bench at a tilt (far edge narrower).
BENCH_CORNERS_CAMERA = np.float32([[40, -30], [450, -20], [560, 430], [-80, 420]])


def bench_homography() -> np.ndarray:
    w, h = BENCH_PLANE
    plane = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    return cv2.getPerspectiveTransform(plane, BENCH_CORNERS_CAMERA)


def _bench_roi_centre(roi: Roi) -> tuple[float, float]:
    """The ROI's centre mapped back onto the bench plane."""
    inv = np.linalg.inv(bench_homography())
    pt = cv2.perspectiveTransform(np.float32([[[roi.x + roi.width / 2, roi.y + roi.height / 2]]]), inv)
    return float(pt[0, 0, 0]), float(pt[0, 0, 1])


EFFECTS = ("shadow", "light", "blur", "noise", "colour", "rotation")
"""Camera effects a diagnostic can switch off (``Renderer(off=...)``); JPEG is the caller's (``encode_jpeg``)."""


class Renderer:
    """Renders frames of one plan; textures and item patches are made once.

    ``off``: effects of ``EFFECTS`` left out (benchmarks/station_view_gap.py measures what each one costs);
    the default renders them all, as the demo and the benchmark do.
    """

    def __init__(self, plan: ScenePlan, images: np.ndarray, off: frozenset[str] = frozenset()) -> None:
        unknown = set(off) - set(EFFECTS)
        if unknown:
            raise ValueError(f"off: unknown effects {sorted(unknown)}; expected some of {', '.join(EFFECTS)}")
        self.plan = plan
        self.images = images
        self.off = frozenset(off)
        w, h = plan.frame_size
        self.xn, self.yn = np.meshgrid(np.linspace(-1, 1, w, dtype=np.float32), np.linspace(-1, 1, h, dtype=np.float32))
        tex_rng = np.random.default_rng([plan.seed, SCENES.index(plan.scene), 2])
        self.texture = belt_texture(tex_rng, h, int(plan.params.get("rib_period_px", 56))) if plan.scene == "belt" \
            else bench_texture(tex_rng)
        self.patches = {p.item: self._patch(p, 0.0) for p in plan.items}
        self.H = bench_homography() if plan.scene == "bench" else None

    def _patch(self, item: ItemPlan, extra_angle: float) -> Patch:
        angle = 0.0 if "rotation" in self.off else item.angle + extra_angle
        tint = (1.0, 1.0, 1.0) if "colour" in self.off else item.tint
        return make_patch(self.images[item.test_index], item.width, angle, tint)

    def render(self, t: int) -> tuple[np.ndarray, dict[int, np.ndarray], bool]:
        """Frame ``t`` as uint8 RGB, the masks (camera coordinates) of the items in it, and whether it is blurred."""
        rng = np.random.default_rng([self.plan.seed, SCENES.index(self.plan.scene), 1000 + t])
        canvas, masks = (self._belt(t) if self.plan.scene == "belt" else self._bench(t))
        if "light" not in self.off:
            canvas = canvas * self._light(t)[..., None] * self._tint()
        blurred = self.plan.scene == "belt" and rng.random() < self.plan.params["blur_probability"]
        if blurred and "blur" not in self.off:
            n = int(rng.integers(7, 16))
            canvas = cv2.filter2D(canvas, -1, np.full((1, n), 1.0 / n, np.float32))
        noise = rng.normal(0, 3.0, canvas.shape).astype(np.float32) \
            + np.sqrt(np.clip(canvas, 0, None)) * rng.normal(0, 0.35, canvas.shape).astype(np.float32)
        if "noise" not in self.off:
            canvas = canvas + noise
        return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), masks, blurred and "blur" not in self.off

    def _belt(self, t: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        w, h = self.plan.frame_size
        speed = self.plan.params["speed_px_per_frame"]
        offset = int(round(speed * t))
        cols = (np.arange(w) - offset) % self.texture.shape[1]
        canvas = self.texture[:, cols].copy()
        masks = {}
        for item in self.plan.items:
            if t in item.poses:
                x, y, _ = item.poses[t]
                # the item moves with the belt: same rounding as the texture offset
                xi = int(round(x - speed * t)) + offset
                masks[item.item] = composite(canvas, self.patches[item.item], xi, int(round(y)),
                                             None if "shadow" in self.off else (7, 9, 0.45))
        return canvas, masks

    def _bench(self, t: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        w, h = self.plan.frame_size
        plane = self.texture.copy()
        masks = {}
        for item in self.plan.items:
            if t in item.poses:
                x, y, extra = item.poses[t]
                patch = self.patches[item.item] if extra == 0 else self._patch(item, extra)
                plane_mask = composite(plane, patch, int(round(x)), int(round(y)),
                                       None if "shadow" in self.off else (-6, 10, 0.35))
                warped = cv2.warpPerspective(plane_mask.astype(np.float32), self.H, (w, h), flags=cv2.INTER_LINEAR)
                masks[item.item] = warped > MASK_LEVEL
        canvas = cv2.warpPerspective(plane, self.H, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                     borderValue=(70, 72, 78))
        return canvas, masks

    def _light(self, t: int) -> np.ndarray:
        """Illumination gain per pixel: belt = gradient + vignette; bench = a drifting overhead spot."""
        s = self.plan.seed % 97
        if self.plan.scene == "belt":
            theta = 0.6 + s + 0.004 * t
            grad = 1 + (0.22 + 0.08 * math.sin(t / 45 + s)) * (math.cos(theta) * self.xn + math.sin(theta) * self.yn)
            vignette = 1 - 0.28 * (self.xn ** 2 + self.yn ** 2)
            return (1 + 0.08 * math.sin(t / 70 + s)) * grad * vignette
        cx, cy = 0.3 * math.sin(t / 90 + s), -0.2 + 0.15 * math.cos(t / 120 + s)
        spot = np.exp(-((self.xn - cx) ** 2 + (self.yn - cy) ** 2) / (2 * 0.55 ** 2))
        flicker = 1 + 0.025 * math.sin(t * 2.1)
        return flicker * (0.72 + 0.38 * spot)

    def _tint(self) -> np.ndarray:
        return np.float32([1.06, 1.0, 0.9]) if self.plan.scene == "belt" else np.float32([0.95, 1.0, 1.07])


def belt_texture(rng: np.random.Generator, height: int, rib_period: int, length: int = 56 * 28) -> np.ndarray:
    """A dark rubber belt (grain + mottling) with ribs across it, between two metal side rails; wraps in x."""
    coarse = cv2.resize(rng.normal(0, 1, (height // 16, length // 16)).astype(np.float32), (length, height),
                        interpolation=cv2.INTER_CUBIC)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (height, length)).astype(np.float32), (0, 0), 0.8)
    base = 52 + 5 * coarse + 4 * grain
    x = np.arange(length) % rib_period
    rib = np.where(x < 5, 13.0, 0.0) + np.where((x >= 5) & (x < 8), -9.0, 0.0)
    belt = base + rib[None, :].astype(np.float32)
    y = np.arange(height)
    rail = (y < 24) | (y >= height - 24)
    belt[rail] = (118 + 30 * np.cos(np.pi * ((y[rail] % 24) / 24.0 - 0.5)))[:, None] + 2 * grain[rail]
    return np.dstack([belt, belt * 1.01, belt * 1.04]).astype(np.float32)


def bench_texture(rng: np.random.Generator) -> np.ndarray:
    """A light wooden bench top: wavy grain along x, a few darker scuffs."""
    w, h = BENCH_PLANE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = cv2.resize(rng.normal(0, 1, (h // 40, w // 40)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    grain = np.sin((yy + 9 * warp) * 2 * np.pi / 13) * 0.5 + np.sin((yy + 14 * warp) * 2 * np.pi / 37) * 0.5
    lum = 168 + 9 * grain + 2.5 * rng.normal(0, 1, (h, w)).astype(np.float32)
    for _ in range(12):
        cx, cy, ax = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(6, 30))
        cv2.ellipse(lum, (cx, cy), (ax, max(2, ax // 5)), float(rng.uniform(0, 180)), 0, 360, 150.0, -1)
    lum = cv2.GaussianBlur(lum, (0, 0), 0.7)
    return np.dstack([lum * 1.05, lum * 0.93, lum * 0.78]).astype(np.float32)


# ---------------------------------------------------------------- writing

def frame_name(t: int) -> str:
    return f"frame_{t:06d}.jpg"


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return buf.tobytes()


def render_frames(plan: ScenePlan, images: np.ndarray, frames: range | None = None
                  ) -> Iterator[tuple[int, bytes, dict[int, np.ndarray], bool]]:
    """(frame index, JPEG bytes, item masks, blurred) for each frame."""
    renderer = Renderer(plan, images)
    for t in frames if frames is not None else range(plan.n_frames):
        rgb, masks, blurred = renderer.render(t)
        yield t, encode_jpeg(rgb, plan.jpeg_quality), masks, blurred


def frame_truth(plan: ScenePlan, t: int, masks: dict[int, np.ndarray], blurred: bool) -> dict:
    visible, full = [], []
    for item, mask in sorted(masks.items()):
        seen, whole = plan.roi.contains(mask)
        if seen:
            visible.append(item)
        if whole:
            full.append(item)
    return {"frame": t, "file": frame_name(t), "visible": visible, "full": full, "blurred": blurred}


def renderer_fingerprint() -> str:
    """Hash of this file: a scene folder rendered by other code is re-rendered, not reused."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def truth_document(plan: ScenePlan, frames: list[dict], digest: str, exclude: Iterable[int] = ()) -> dict:
    """truth.json: the plan, and per item and per frame what the ROI shows (and the test indices the draw skipped)."""
    items = []
    for item in plan.items:
        vis = [f["frame"] for f in frames if item.item in f["visible"]]
        full = [f["frame"] for f in frames if item.item in f["full"]]
        items.append({"item": item.item, "test_index": item.test_index, "label": item.label,
                      "label_name": FASHION_MNIST_CLASSES[item.label], "width_px": item.width,
                      "angle_deg": round(item.angle, 2), "visible_frames": vis, "full_frames": full})
    return {"version": TRUTH_VERSION, "scene": plan.scene, "seed": plan.seed, "source": "fashion-mnist t10k",
            "frame_size": list(plan.frame_size), "roi": asdict(plan.roi), "n_frames": plan.n_frames,
            "jpeg_quality": plan.jpeg_quality, "params": plan.params, "frames_sha256": digest,
            "renderer": renderer_fingerprint(),
            **({"excluded_test_indices": sorted({int(i) for i in exclude})} if exclude else {}),
            "items": items, "frames": frames}


def write_scene(scene: str, out: Path, n_items: int, seed: int, root: Path = FASHION_MNIST_DIR,
                exclude: Iterable[int] = ()) -> dict:
    """Render ``scene`` into ``out/<scene>/`` (JPEG frames + truth.json); returns the truth document.

    ``exclude``: test indices the scene must not show (see ``pick_items``).
    """
    exclude = sorted({int(i) for i in exclude})
    plan = plan_scene(scene, n_items, seed, root, exclude)
    images, _ = load_test_split(root)
    folder = out / scene
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("frame_*.jpg"):
        old.unlink()
    sha = hashlib.sha256()
    frames = []
    for t, jpeg, masks, blurred in render_frames(plan, images):
        (folder / frame_name(t)).write_bytes(jpeg)
        sha.update(jpeg)
        frames.append(frame_truth(plan, t, masks, blurred))
    truth = truth_document(plan, frames, sha.hexdigest(), exclude)
    (folder / "truth.json").write_text(json.dumps(truth, separators=(",", ":")))
    return truth
