"""Dark items on a dark belt: how much the station's localizer costs, by item brightness.

Renders Fashion-MNIST *test* items as a station sees them (trainer.station_eval.render_scene: the product in
its own colour and brightness, a drop shadow, uneven light, noise, blur, JPEG) on the benchmark's dark
conveyor belt (agent.sim.scenes.belt_texture), next to the empty twin the station's background model holds.
For each item the bundle's model (ONNX Runtime, the bundle's preprocessing and crop policy) classifies

* the station's crop: ``foreground_box`` against the twin with ``--threshold`` (the agent's
  ``decisions.presence.background_threshold``), then the crop policy;
* the true crop: the same policy around the item's rendered mask.

and the script prints, per brightness band of the item on the belt (mean of its pixels after its own
gain), both accuracies and the localizer's box IoU with the truth. A station crop far below the true crop in
a band is the localizer's cost there.

    python benchmarks/station_view_dark.py --bundle models/<name>/<version> [--items 600] [--threshold 25 15]
        [--noise-k 3 4] [--tag NAME]

Writes benchmarks/results/station_view_dark_<tag>.json (with the command) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.localize import crop_box, foreground_box, model_view  # noqa: E402
from agent.sim.scenes import belt_texture, load_test_split  # noqa: E402
from contract.bundle import load_bundle  # noqa: E402
from contract.dataset import FASHION_MNIST_CLASSES  # noqa: E402
from contract.preprocess import Preprocessor  # noqa: E402

BANDS = ((0, 60), (60, 90), (90, 256))


def belt_surfaces(n: int = 16, seed: int = 3) -> list[np.ndarray]:
    """Windows of the benchmark's belt (ROI-sized), without the side rails."""
    texture = belt_texture(np.random.default_rng(seed), 400, 56)
    rng = np.random.default_rng(seed + 6)
    out = []
    for _ in range(n):
        y, x = int(rng.integers(30, 71)), int(rng.integers(0, texture.shape[1] - 300))
        out.append(np.clip(texture[y:y + 300, x:x + 300], 0, 255).astype(np.uint8))
    return out


def box_iou(a: tuple[int, int, int, int] | None, b: tuple[int, int, int, int]) -> float:
    if a is None:
        return 0.0
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix
    return ix / union if union else 0.0


def run(bundle_dir: Path, items: int, thresholds: list[float], seed: int, noise_ks: tuple[float, ...] = (),
        grows: tuple[float, ...] = ()) -> dict:
    import onnxruntime as ort

    import trainer.station_eval as station_eval

    bundle = load_bundle(bundle_dir)
    spec = bundle.input_spec
    preprocess = Preprocessor(spec)
    session = ort.InferenceSession(str(bundle.pick_onnx(prefer_int8=False).path), providers=["CPUExecutionProvider"])
    images, labels = load_test_split()
    index = np.random.default_rng(seed).permutation(len(labels))[:items]
    class_of = {name: i for i, name in enumerate(bundle.labels)}
    truth = np.array([class_of[FASHION_MNIST_CLASSES[label]] for label in labels[index]])
    surfaces = belt_surfaces()
    # render_scene's own draws, captured: where the item went and the brightness it was given
    seen: dict[str, object] = {}
    placed, tint = station_eval._placed_item, station_eval._tint

    def placed_item(*args):
        seen["placed"] = placed(*args)
        return seen["placed"]

    def item_tint(*args):
        seen["tint"] = tint(*args)
        return seen["tint"]

    station_eval._placed_item, station_eval._tint = placed_item, item_tint
    try:
        rng, cfg = np.random.default_rng(seed + 1), station_eval.SceneConfig()
        scenes, true_boxes, brightness = [], [], np.empty(items)
        for i, j in enumerate(index):
            rgb = np.repeat(images[j][..., None], 3, 2)
            scene, empty = station_eval.render_scene(rgb, surfaces[rng.integers(len(surfaces))], rng, cfg)
            _, alpha, top, left = seen["placed"]
            ys, xs = np.nonzero(alpha > 0.5)
            true_boxes.append((left + int(xs.min()), top + int(ys.min()), left + int(xs.max()) + 1,
                               top + int(ys.max()) + 1))
            brightness[i] = float(images[j][images[j] > 12].mean()) * float(np.mean(seen["tint"]))
            scenes.append((scene, empty))
    finally:
        station_eval._placed_item, station_eval._tint = placed, tint

    def classify(boxes: list) -> np.ndarray:
        batch = np.stack([preprocess(model_view(scene, crop_box(box, scene.shape[:2], spec.crop), spec.crop))
                          for (scene, _), box in zip(scenes, boxes)])
        logits = np.concatenate([session.run(None, {spec.input_name: batch[k:k + 256]})[0]
                                 for k in range(0, len(batch), 256)])
        return logits.argmax(1) == truth

    right_true = classify(true_boxes)
    rows = []
    settings = [(t, 0.0, 0.0) for t in thresholds] + [(thresholds[0], k, 0.0) for k in noise_ks] \
        + [(thresholds[0], 0.0, g) for g in grows]
    for threshold, noise_k, grow in settings:
        found = [foreground_box(scene, empty, threshold=threshold, noise_k=noise_k, grow_threshold=grow).box
                 for scene, empty in scenes]
        right_station = classify(found)
        iou = np.array([box_iou(f, t) for f, t in zip(found, true_boxes)])
        for low, high in (*BANDS, (0, 256)):
            band = (brightness >= low) & (brightness < high)
            if band.any():
                rows.append({"threshold": threshold, "noise_k": noise_k, "grow": grow, "brightness": f"{low}-{high}" if high < 256 or low else "all",
                             "items": int(band.sum()), "station": round(float(right_station[band].mean()), 4),
                             "true_crop": round(float(right_true[band].mean()), 4),
                             "median_iou": round(float(np.median(iou[band])), 3),
                             "iou_below_0.7": round(float((iou[band] < 0.7).mean()), 3)})
    return {"bundle": str(bundle_dir), "items": items, "seed": seed, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--items", type=int, default=600)
    p.add_argument("--threshold", type=float, nargs="+", default=[25.0, 15.0])
    p.add_argument("--noise-k", type=float, nargs="*", default=[],
                   help="also the threshold from the scene's noise (decisions.presence.background_noise_k), each k "
                        "with the first --threshold as its ceiling")
    p.add_argument("--grow", type=float, nargs="*", default=[],
                   help="also hysteresis from each grow threshold (decisions.presence.background_grow_threshold), with "
                        "the first --threshold as the seed threshold")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--tag", default="run")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    started = time.time()
    result = run(args.bundle, args.items, args.threshold, args.seed, tuple(args.noise_k), tuple(args.grow))
    result.update(benchmark="station_view_dark", seconds=round(time.time() - started, 1),
                  created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  command="python benchmarks/station_view_dark.py " + " ".join(
                      shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"station_view_dark_{args.tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'threshold':>9} {'noise k':>7} {'grow':>5} {'brightness':>10} {'items':>5} {'station':>8} {'true crop':>9} {'IoU med':>7} {'IoU<0.7':>7}")
    for r in result["rows"]:
        print(f"{r['threshold']:9.0f} {r['noise_k']:7.1f} {r['grow']:5.0f} {r['brightness']:>10} {r['items']:5d} {r['station']:8.1%} {r['true_crop']:9.1%} "
              f"{r['median_iou']:7.2f} {r['iou_below_0.7']:7.0%}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
