"""Where the station-view accuracy goes: the same scene frames through the station's crop, a perfect crop,
and the clean test image, with each camera effect switched off in turn.

benchmarks/station_view.py measures the agent end to end; this script takes the frames where one item
is fully inside the ROI and asks, per frame, with the bundle's own model (ONNX Runtime) and preprocessing:

* ``station``: the crop the station feeds (agent.localize.Localizer over the scene's frames in order,
  as a camera thread runs it, then the bundle's crop policy);
* ``truth crop``: the same crop policy around the item's true box (the rendered mask): what a perfect
  localizer would feed;
* ``clean``: the item's Fashion-MNIST test image as the dataset shows it (the plain path's view).

``station`` below ``truth crop`` is the localizer's cost; ``truth crop`` below ``clean`` is what the
camera's look costs a model trained on the bundle's recipe. Each ``--without`` variant re-renders the
scene with that effect off (agent/sim/scenes.py ``EFFECTS``; ``jpeg`` feeds the raw frame), so the
difference to the full scene is what that effect costs.

    python benchmarks/station_view_gap.py --bundle models/<name>/<version> [--scenes belt bench]
        [--items 60] [--seed 0] [--without shadow light blur noise colour rotation jpeg all] [--tag NAME]

Writes benchmarks/results/station_view_gap_<tag>.json (with the command) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.config import PresenceConfig  # noqa: E402
from agent.localize import Localizer, LocalizerSettings, crop_box, cut  # noqa: E402
from agent.sim.scenes import (  # noqa: E402
    EFFECTS,
    SCENES,
    Renderer,
    encode_jpeg,
    load_test_split,
    plan_scene,
)
from contract.bundle import load_bundle  # noqa: E402
from contract.preprocess import Preprocessor, decode_image  # noqa: E402

VARIANTS = ("shadow", "light", "blur", "noise", "colour", "rotation", "jpeg", "all")


class Model:
    """The bundle's FP32 (or INT8) ONNX model with its own preprocessing."""

    def __init__(self, bundle_dir: Path, int8: bool) -> None:
        import onnxruntime as ort

        bundle = load_bundle(bundle_dir)
        self.labels = bundle.labels
        self.preprocess = Preprocessor(bundle.input_spec)
        self.policy = bundle.input_spec.crop
        artifact = bundle.pick_onnx(prefer_int8=int8)
        self.artifact = artifact.path.name
        self.session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, views: list[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(views), 64):
            batch = self.preprocess.batch(views[start:start + 64])
            out.append(np.argmax(self.session.run(None, {self.input_name: batch})[0], axis=1))
        return np.concatenate(out) if out else np.zeros(0, int)


def true_box(mask: np.ndarray, roi) -> tuple[int, int, int, int]:
    sub = mask[roi.y:roi.y + roi.height, roi.x:roi.x + roi.width]
    ys, xs = np.nonzero(sub)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def measure(model: Model, scene: str, items: int, seed: int, without: str, images: np.ndarray,
            settings: LocalizerSettings, margins: Sequence[float] = ()) -> dict[str, Any]:
    plan = plan_scene(scene, items, seed)
    off = frozenset(EFFECTS) if without == "all" else frozenset({without} & set(EFFECTS))
    renderer = Renderer(plan, images, off=off)
    roi = plan.roi
    localizer = Localizer(settings, model.policy)
    station, truth, labels, clean_idx, found = [], [], [], [], 0
    kept_views: list[tuple[np.ndarray, tuple[int, int, int, int], Any]] = []     # for --margins
    label_of = {p.item: p.label for p in plan.items}
    index_of = {p.item: p.test_index for p in plan.items}
    for t in range(plan.n_frames):
        rgb, masks, _ = renderer.render(t)
        if without not in ("jpeg", "all"):
            rgb = decode_image(encode_jpeg(rgb, plan.jpeg_quality))
        view = np.ascontiguousarray(rgb[roi.y:roi.y + roi.height, roi.x:roi.x + roi.width])
        located = localizer.update(view, model.policy)
        inside = [k for k, m in masks.items() if roi.contains(m)[1]]
        seen = [k for k, m in masks.items() if roi.contains(m)[0]]
        if len(inside) != 1 or len(seen) != 1:
            continue
        item = inside[0]
        item_box = true_box(masks[item], roi)
        truth.append(cut(view, crop_box(item_box, view.shape[:2], model.policy)))
        if margins:
            kept_views.append((view, item_box, located.box))
        if located.crop_box is not None:
            found += 1
            station.append(cut(view, located.crop_box))
        else:                                  # no item found: the station would not classify; count it wrong
            station.append(None)
        labels.append(label_of[item])
        clean_idx.append(index_of[item])
    names = list(model.labels)
    # bundle labels are sorted class names; the scene's labels are Fashion-MNIST ids
    from agent.sim.scenes import FASHION_MNIST_CLASSES
    want = np.array([names.index(FASHION_MNIST_CLASSES[k]) for k in labels])
    kept = [v for v in station if v is not None]
    pred_station = np.full(len(station), -1)
    pred_station[[i for i, v in enumerate(station) if v is not None]] = model.predict(kept)
    pred_truth = model.predict(truth)
    clean_views = [np.repeat(images[i][..., None], 3, axis=2) for i in clean_idx]
    pred_clean = model.predict(clean_views)
    n = len(labels)
    row = {"scene": scene, "without": without, "frames": n, "station_found": found,
           "station": round(float((pred_station == want).mean()), 4) if n else None,
           "truth_crop": round(float((pred_truth == want).mean()), 4) if n else None,
           "clean": round(float((pred_clean == want).mean()), 4) if n else None}
    if margins and n:
        row["margins"] = margin_sweep(model, kept_views, want, margins)
    return row


def margin_sweep(model: Model, kept: list[tuple[np.ndarray, Any, Any]], want: np.ndarray,
                 margins: Sequence[float]) -> dict[str, dict[str, float]]:
    """Frame accuracy through the crop policy with other margins, around the true box and the station's box
    (a frame whose item the station did not find counts wrong): how much the crop's margin costs or gains."""
    out = {}
    found = [i for i, (_, _, box) in enumerate(kept) if box is not None]
    for margin in margins:
        policy = replace(model.policy, margin=margin)
        truth = [cut(view, crop_box(box, view.shape[:2], policy)) for view, box, _ in kept]
        pred = np.full(len(kept), -1)
        if found:
            pred[found] = model.predict([cut(kept[i][0], crop_box(kept[i][2], kept[i][0].shape[:2], policy))
                                         for i in found])
        out[f"{margin:g}"] = {"truth_crop": round(float((model.predict(truth) == want).mean()), 4),
                              "station": round(float((pred == want).mean()), 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--scenes", nargs="+", default=list(SCENES), choices=list(SCENES))
    p.add_argument("--items", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--without", nargs="*", default=[], choices=list(VARIANTS),
                   help="also measure with each of these effects off (one at a time; all: every effect off)")
    p.add_argument("--int8", action="store_true", help="the INT8 model (default: FP32)")
    p.add_argument("--margins", nargs="*", type=float, default=[],
                   help="also classify the scene as benchmarked through crops of these margins (0..1), around the "
                        "true box and the station's box")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    model = Model(args.bundle, args.int8)
    images, _ = load_test_split()
    settings = LocalizerSettings.from_config(PresenceConfig(mode="background"))
    rows = []
    for scene in args.scenes:
        for without in ["none", *args.without]:
            start = time.monotonic()
            row = measure(model, scene, args.items, args.seed, without, images, settings,
                          args.margins if without == "none" else ())
            row["seconds"] = round(time.monotonic() - start, 1)
            rows.append(row)
            print(f"{scene:6s} without {without:9s} frames {row['frames']:4d}  station {row['station']:.3f}  "
                  f"truth crop {row['truth_crop']:.3f}  clean {row['clean']:.3f}", flush=True)
            for margin, figures in row.get("margins", {}).items():
                print(f"{scene:6s}   crop margin {margin:5s}  station {figures['station']:.3f}  "
                      f"truth crop {figures['truth_crop']:.3f}", flush=True)
    doc = {"benchmark": "station_view_gap",
           "command": "python benchmarks/station_view_gap.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "bundle": str(args.bundle), "artifact": model.artifact, "rows": rows}
    if args.tag:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"station_view_gap_{args.tag}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
