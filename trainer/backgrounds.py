"""Backgrounds for station-view training: procedural surfaces and crops of captured empty scenes.

A station sees its items on a few kinds of surface. Rather than ship images, the trainer draws
them once per run from a seed: a dark conveyor belt (ribs across the belt, rubber grain, wear
streaks), a light wooden or laminate bench (grain, plank seams), a plastic tote (one saturated
colour, a soft gradient, stippling) and cardboard (fibres, blotches, corrugation, sometimes tape).
A folder of empty-scene frames captured at the station (``--backgrounds DIR``) adds random
square crops of the real thing. Everything is a bank of uint8 ``3 x side x side`` tiles; the
renderer (``trainer.station_view``) samples windows of them with its own warp.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from contract.preprocess import read_image
from trainer.data import spread

log = logging.getLogger(__name__)

BACKGROUND_EXTENSIONS = {".jpg", ".jpeg", ".png"}


def _smooth_noise(rng: np.random.Generator, side: int, sigma_x: float, sigma_y: float | None = None) -> np.ndarray:
    """Gaussian noise blurred to a feature size, rescaled to unit std (side x side float32)."""
    field = rng.standard_normal((side, side)).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=sigma_x, sigmaY=sigma_y or sigma_x, borderType=cv2.BORDER_REFLECT)
    return field / (field.std() + 1e-6)


def _rgb(base: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """A colour plus a per-pixel brightness offset -> uint8 3 x H x W."""
    image = base.reshape(3, 1, 1) + shade[None]
    return np.clip(image, 0, 255).round().astype(np.uint8)


def belt(rng: np.random.Generator, side: int) -> np.ndarray:
    """Dark rubber conveyor belt: raised ribs across it, grain, streaks along the run."""
    y = np.arange(side, dtype=np.float32)[:, None]
    period = side * rng.uniform(0.05, 0.12)
    ribs = np.clip(np.sin(2 * np.pi * (y / period + rng.uniform())) * 3, -1, 1)
    base = rng.uniform(22, 60) * (1 + rng.uniform(-0.08, 0.08, 3))
    shade = (rng.uniform(6, 16) * ribs + rng.uniform(3, 7) * _smooth_noise(rng, side, 0.7)
             + rng.uniform(2, 6) * _smooth_noise(rng, side, side / 6, 0.8))
    return _rgb(base, np.broadcast_to(shade, (side, side)))


def bench(rng: np.random.Generator, side: int) -> np.ndarray:
    """Light wood or laminate bench top: grain lines warped by low-frequency noise, plank seams."""
    palette = np.array([[205, 172, 130], [220, 198, 160], [214, 210, 200], [190, 160, 120]], np.float32)
    base = palette[rng.integers(len(palette))] * rng.uniform(0.9, 1.08)
    y = np.arange(side, dtype=np.float32)[:, None]
    warp = _smooth_noise(rng, side, side / 5, side / 10) * rng.uniform(2, 6)
    grain = np.sin(2 * np.pi * (y + warp) / rng.uniform(2.5, 6))
    shade = rng.uniform(4, 12) * grain + rng.uniform(2, 5) * _smooth_noise(rng, side, side / 4, 0.8)
    plank = side * rng.uniform(0.35, 0.7)
    seams = (np.mod(y + rng.uniform(0, plank), plank) < 1.2).astype(np.float32)
    shade = shade - rng.uniform(20, 45) * seams * (rng.uniform() < 0.6)
    return _rgb(base, shade)


def tote(rng: np.random.Generator, side: int) -> np.ndarray:
    """Coloured plastic tote floor: one saturated colour, a soft linear gradient, fine stippling."""
    palette = np.array([[40, 90, 170], [180, 45, 40], [225, 190, 45], [50, 140, 70], [120, 125, 130],
                        [35, 36, 42], [235, 235, 232]], np.float32)
    base = palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.1)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) * rng.uniform(20, 50)
    return _rgb(base, ramp + rng.uniform(2, 5) * _smooth_noise(rng, side, 0.8))


def cardboard(rng: np.random.Generator, side: int) -> np.ndarray:
    """Brown cardboard: fibres, blotches, faint corrugation, sometimes a strip of tape."""
    base = np.array([178, 138, 92], np.float32) * rng.uniform(0.8, 1.1) * (1 + rng.uniform(-0.05, 0.05, 3))
    x = np.arange(side, dtype=np.float32)[None, :]
    corrugation = np.sin(2 * np.pi * x / rng.uniform(5, 9)) * rng.uniform(1, 4)
    shade = (rng.uniform(4, 9) * _smooth_noise(rng, side, 1.2, 0.6) + rng.uniform(6, 14) * _smooth_noise(rng, side, side / 8)
             + corrugation)
    if rng.uniform() < 0.35:
        lo = int(rng.uniform(0.1, 0.7) * side)
        shade[lo : lo + int(side * rng.uniform(0.1, 0.2)), :] += rng.uniform(-25, 25)
    return _rgb(base, shade)


TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "belt": belt, "bench": bench, "tote": tote, "cardboard": cardboard,
}


def procedural_tiles(side: int, per_kind: int, seed: int, kinds: tuple[str, ...] = tuple(TEXTURES)) -> np.ndarray:
    """``len(kinds) * per_kind`` tiles, uint8 K x 3 x side x side, the same for the same seed."""
    unknown = sorted(set(kinds) - set(TEXTURES))
    if unknown:
        raise ValueError(f"station_view.textures: unknown kind(s) {unknown}; expected some of {sorted(TEXTURES)}")
    rng = np.random.default_rng(seed)
    return np.stack([TEXTURES[kind](rng, side) for kind in kinds for _ in range(per_kind)])


def folder_tiles(folder: str | Path, side: int, per_file: int, seed: int, limit: int = 64) -> np.ndarray:
    """Random square crops (30-100% of the shorter side) of the jpg/png frames in ``folder`` (at most ``limit`` of
    them, drawn at random over all its subfolders). Hidden names (``._frame.jpg``, the resource forks a Mac
    leaves on a copy; a ``.thumbnails`` folder) are not frames.

    Raises ValueError naming the folder when it holds no such image, and ImageDecodeError naming
    the file when one cannot be decoded (a half-copied frame should stop a run, not thin the bank).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--backgrounds {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in BACKGROUND_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))   # a Mac's ._frame.jpg
    if not files:
        raise ValueError(f"--backgrounds {folder}: no {'/'.join(sorted(BACKGROUND_EXTENSIONS))} images in it")
    files = [files[i] for i in spread(len(files), limit, seed + 1)]     # sorted by path, the first are one camera's
    rng = np.random.default_rng(seed)
    per_file = max(1, min(per_file, limit // len(files)))
    tiles = []
    for path in files:
        rgb = read_image(path)
        short = min(rgb.shape[:2])
        for _ in range(per_file):
            crop = max(1, int(short * rng.uniform(0.3, 1.0)))      # a frame of a few px still gives a tile
            top = rng.integers(0, rgb.shape[0] - crop + 1)
            left = rng.integers(0, rgb.shape[1] - crop + 1)
            window = rgb[top : top + crop, left : left + crop]
            interp = cv2.INTER_AREA if crop > side else cv2.INTER_LINEAR
            tiles.append(cv2.resize(window, (side, side), interpolation=interp).transpose(2, 0, 1))
    log.info("backgrounds: %d crops from %d frames in %s", len(tiles), len(files), folder)
    return np.ascontiguousarray(np.stack(tiles))
