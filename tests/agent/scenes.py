"""Synthetic station views for the localizer tests: a moving ribbed belt (or a light bench), real items.

A scene is what a station camera's ROI sees: a dark textured belt whose ribs move a few pixels per frame,
uneven light, sensor noise, now and then a motion-blurred frame, and real Fashion-MNIST items (upscaled
to about 200 px, rotated, pasted with their own mask) riding across. ``render`` returns the frame and
the true box of every item in view, in ROI pixels (x0, y0, x1, y1), x1/y1 exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Sprite:
    """An item as pasted: RGB pixels and its 0/1 mask, same size."""

    rgb: np.ndarray
    mask: np.ndarray


def make_sprite(gray28: np.ndarray, size: int, angle: float, colour: tuple[float, float, float]) -> Sprite:
    """A Fashion-MNIST image upscaled to ``size`` px, tinted, rotated by ``angle`` degrees (canvas grows)."""
    big = cv2.resize(gray28, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    mask = (big > 25).astype(np.uint8)
    rgb = np.stack([(70 + 0.72 * big) * c for c in colour], axis=2)
    diag = int(np.ceil(size * 1.42))
    pad = (diag - size) // 2
    rgb = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    mask = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    centre = (rgb.shape[1] / 2, rgb.shape[0] / 2)
    rot = cv2.getRotationMatrix2D(centre, angle, 1.0)
    rgb = cv2.warpAffine(rgb, rot, (rgb.shape[1], rgb.shape[0]), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(mask, rot, (mask.shape[1], mask.shape[0]), flags=cv2.INTER_NEAREST)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return Sprite(rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1])


class Scene:
    """A station view of ``size`` px: belt (``light=False``) or bench, with the light's unevenness built in."""

    def __init__(self, size: int = 300, *, light: bool = False, rib_period: int = 12, speed: int = 3,
                 noise: float = 4.0, blur_every: int = 37, seed: int = 0) -> None:
        self.size, self.speed, self.noise, self.blur_every = size, speed, noise, blur_every
        self.rng = np.random.default_rng(seed)
        base = np.array([190.0, 186.0, 178.0] if light else [46.0, 43.0, 40.0], np.float32)
        # one rib period of texture: a raised rib plus per-column grain, repeated along the belt
        period = np.zeros((size, rib_period), np.float32)
        period[:, : max(1, rib_period // 3)] += 10.0 if light else 24.0
        period += self.rng.normal(0, 3.0, (size, rib_period)).astype(np.float32)
        self.tile = period
        self.base = base
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        # uneven light: brighter towards one corner (a lamp, or a tilted camera over a bench)
        self.light = (0.75 + 0.35 * (1 - xx) * (0.6 + 0.4 * yy)).astype(np.float32)
        # sensor noise: a bank of fields drawn once (drawing 270k normals per frame would dominate the tests)
        self.noise_bank = [self.rng.normal(0, noise, (size, size, 3)).astype(np.float32) for _ in range(7)]

    def belt(self, t: int) -> np.ndarray:
        reps = self.size // self.tile.shape[1] + 2
        strip = np.tile(self.tile, (1, reps))
        shift = (t * self.speed) % self.tile.shape[1]
        texture = strip[:, shift : shift + self.size]
        return self.base[None, None, :] + texture[:, :, None]

    def render(self, t: int, items: list[tuple[Sprite, int, int]] = (), gain: float | np.ndarray = 1.0
               ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        """Frame ``t`` with each (sprite, left, top) pasted; the true boxes of the items in view. ``gain``:
        the light on top of the scene's own unevenness, one number or an HxWx1 field (a spot light)."""
        image = self.belt(t)
        boxes = []
        for sprite, left, top in items:
            box = paste(image, sprite, left, top)
            if box is not None:
                boxes.append(box)
        image = image * self.light[:, :, None] * gain
        if self.noise:
            image += self.noise_bank[t % len(self.noise_bank)]
        if self.blur_every and t % self.blur_every == self.blur_every - 1:
            kernel = np.zeros((1, 9), np.float32)
            kernel[0, :] = 1 / 9
            image = cv2.filter2D(image, -1, kernel)
        return np.clip(image, 0, 255).astype(np.uint8), boxes


def paste(image: np.ndarray, sprite: Sprite, left: int, top: int) -> tuple[int, int, int, int] | None:
    """Paste in place where the sprite's mask is set, clipped to the image; its visible box or None."""
    h, w = sprite.mask.shape
    H, W = image.shape[:2]
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + w, W), min(top + h, H)
    if x1 <= x0 or y1 <= y0:
        return None
    mask = sprite.mask[y0 - top : y1 - top, x0 - left : x1 - left].astype(bool)
    region = image[y0:y1, x0:x1]
    region[mask] = sprite.rgb[y0 - top : y1 - top, x0 - left : x1 - left][mask]
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area else 0.0
