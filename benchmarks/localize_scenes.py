"""The localizer's presence errors on rendered station-view scenes (benchmarks/scenes.py output folders).

A fresh ``Localizer(LocalizerSettings(), CropPolicy('foreground'))`` runs over every frame of each scene, cut
to the truth's ROI, and counts (a) frames with no visible item reported present, (b) frames with an item
fully in the ROI reported not present, (c) mean IoU of its box with the item's box on fully-in frames. The
truth has no boxes: the item's box is taken from the difference between the frame and the nearest empty
frame (at most ``--near`` frames away; the light drifts slowly), full resolution, threshold 30.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/localize_scenes.py /tmp/svb/scenes60/bench /tmp/svb/scenes60/belt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.localize import Localizer, LocalizerSettings  # noqa: E402
from contract.preprocess import CropPolicy  # noqa: E402


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def diff_box(image: np.ndarray, empty: np.ndarray):
    diff = cv2.absdiff(cv2.GaussianBlur(image, (9, 9), 0), cv2.GaussianBlur(empty, (9, 9), 0)).max(axis=2)
    mask = cv2.morphologyEx((diff > 30).astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    if count < 2:
        return None
    big = stats[1:][stats[1:, cv2.CC_STAT_AREA] >= 200]
    if not len(big):
        return None
    x0, y0 = big[:, 0].min(), big[:, 1].min()
    x1, y1 = (big[:, 0] + big[:, 2]).max(), (big[:, 1] + big[:, 3]).max()
    return int(x0), int(y0), int(x1), int(y1)


def run(folder: Path, near: int) -> dict:
    truth = json.loads((folder / "truth.json").read_text())
    r = truth["roi"]
    frames = truth["frames"]
    loc = Localizer(LocalizerSettings(), CropPolicy("foreground"))
    images = {}

    def load(i: int) -> np.ndarray:
        if i not in images:
            bgr = cv2.imread(str(folder / frames[i]["file"]))
            images[i] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[r["y"]:r["y"] + r["height"], r["x"]:r["x"] + r["width"]]
        return images[i]

    empties = [i for i, f in enumerate(frames) if not f["visible"]]
    a = b = n_empty = n_full = 0
    ious, a_frames, b_frames = [], [], []
    for i, f in enumerate(frames):
        got = loc.update(load(i))
        if not f["visible"]:
            n_empty += 1
            if got.present:
                a += 1
                a_frames.append((i, got.box, round(got.fg_fraction, 3)))
        elif f["full"]:
            n_full += 1
            if not got.present:
                b += 1
                b_frames.append(i)
            else:
                j = min(empties, key=lambda e: abs(e - i))
                box = diff_box(load(i), load(j)) if abs(j - i) <= near else None
                if box is not None:
                    ious.append(iou(got.box, box))
        images.pop(i - 2 * near, None)
    return {"scene": folder.name, "frames": len(frames), "empty": n_empty, "full": n_full,
            "a_empty_present": a, "b_full_missed": b, "c_mean_iou": round(float(np.mean(ious)), 3) if ious else None,
            "c_min_iou": round(float(np.min(ious)), 3) if ious else None, "c_n": len(ious),
            "a_frames": a_frames[:12], "b_frames": b_frames[:20]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--near", type=int, default=12)
    args = ap.parse_args()
    for folder in args.folders:
        print(json.dumps(run(folder, args.near)))


if __name__ == "__main__":
    main()
