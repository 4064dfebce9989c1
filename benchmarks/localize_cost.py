"""What localizing the item costs a camera thread, against preprocessing alone, at a 300x300 px ROI.

Per frame, on synthetic belt views (moving ribs, noise, uneven light) with real Fashion-MNIST items
(tests/agent/scenes.py, the localizer tests' scenes):

1. preprocess: the station's Preprocessor on the whole ROI (what a ``roi`` bundle costs today);
2. localize + crop + preprocess: ``Localizer.update`` then the Preprocessor on the item's crop
   (what a ``foreground`` bundle costs), empty frames included as on a belt (they skip preprocessing);
3. the localizer alone, with its defaults and with the grow off (``background_grow_threshold`` 0): what
   growing a dark item's box from its bright parts costs.

Prints ms per frame of both and their ratio, for a 224 px model input (resize 256) and the 28 px one of
the test bundles. With ``--model-ms`` (the bare model's time per image on the target) it also prints the
agent's throughput bound with localization serial on the model's core: model / (model + localize),
the figure the >= 90% target is about. Writes benchmarks/results/localize_cost.json.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/localize_cost.py --frames 600 --model-ms 5.0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.demo import fashion_mnist_test  # noqa: E402
from agent.localize import Localizer, LocalizerSettings, model_view  # noqa: E402
from contract.preprocess import CropPolicy, InputSpec, Preprocessor  # noqa: E402


def load_scenes():
    spec = importlib.util.spec_from_file_location("scenes", ROOT / "tests" / "agent" / "scenes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def belt_views(n: int, seed: int = 0) -> list[np.ndarray]:
    """n frames: empty ones first, then items riding across (most frames hold one), gaps between them."""
    scenes = load_scenes()
    scene = scenes.Scene(seed=seed)
    images, _ = fashion_mnist_test(n=32)
    rng = np.random.default_rng(seed)
    frames = [scene.render(t)[0] for t in range(3)]        # the station starts with its belt empty (warm-up)
    t, k = 3, 0
    while len(frames) < n:
        sprite = scenes.make_sprite(images[k % len(images)], int(rng.integers(170, 231)),
                                    float(rng.uniform(-20, 20)), (0.9, 0.8, 0.7))
        k += 1
        for left in range(-100, 200, 40):
            frames.append(scene.render(t, [(sprite, left, 40)])[0])
            t += 1
        for _ in range(3):
            frames.append(scene.render(t)[0])
            t += 1
    return frames[:n]


def per_frame_ms(fn, frames: list[np.ndarray], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for frame in frames:
            fn(frame)
        best = min(best, (time.perf_counter() - start) / len(frames))
    return best * 1000


def measure(spec: InputSpec, frames: list[np.ndarray], repeats: int) -> dict[str, float]:
    pre = Preprocessor(spec)
    policy = CropPolicy(mode="foreground")
    whole = per_frame_ms(pre, frames, repeats)

    def localized(frame: np.ndarray, loc: list[Localizer]) -> None:
        located = loc[0].update(frame, policy)
        if located.present:
            pre(model_view(frame, located.crop_box, policy))

    best = float("inf")
    for _ in range(repeats):
        loc = [Localizer()]
        start = time.perf_counter()
        for frame in frames:
            localized(frame, loc)
        best = min(best, (time.perf_counter() - start) / len(frames))
    localize_ms, no_grow_ms = float("inf"), float("inf")
    for _ in range(repeats):          # interleaved, so a slow spell of the machine hits both alike
        for settings in (LocalizerSettings(), LocalizerSettings(grow_threshold=0.0)):
            loc = Localizer(settings)
            ms = per_frame_ms(lambda f: loc.update(f, policy), frames, 1)
            if settings.grow_threshold:
                localize_ms = min(localize_ms, ms)
            else:
                no_grow_ms = min(no_grow_ms, ms)
    return {"preprocess_ms": round(whole, 4), "localize_ms": round(localize_ms, 4),
            "localize_without_grow_ms": round(no_grow_ms, 4), "grow_ratio": round(localize_ms / no_grow_ms, 3),
            "localize_crop_preprocess_ms": round(best * 1000, 4), "ratio": round(best * 1000 / whole, 3)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model-ms", type=float, default=None,
                   help="the bare model's ms per image on the target, for the throughput bound")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "localize_cost.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    frames = belt_views(args.frames)
    checker = Localizer()
    share = float(np.mean([checker.update(f).present for f in frames]))
    report = {"roi": [300, 300], "frames": len(frames), "item_share": round(share, 3),
              "host": platform.processor() or platform.machine(), "python": platform.python_version()}
    for name, spec in {"224": InputSpec(height=224, width=224, resize_shorter=256),
                       "28": InputSpec(height=28, width=28, resize_shorter=28)}.items():
        row = measure(spec, frames, args.repeats)
        report[f"input_{name}"] = row
        print(f"input {name:>3} px: preprocess {row['preprocess_ms']:.3f} ms/frame, localize {row['localize_ms']:.3f} "
              f"(without the grow {row['localize_without_grow_ms']:.3f}: x{row['grow_ratio']:.2f}), "
              f"localize+crop+preprocess {row['localize_crop_preprocess_ms']:.3f} (ratio {row['ratio']:.2f})")
    if args.model_ms:
        bound = args.model_ms / (args.model_ms + report["input_224"]["localize_ms"])
        report["model_ms"] = args.model_ms
        report["throughput_bound_serial"] = round(bound, 4)
        print(f"throughput kept if localization ran serially on the model's core: {bound:.1%} "
              f"(model {args.model_ms} ms/image)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
