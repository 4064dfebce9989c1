"""Which MobileNetV2 blocks should the embedding pool? The Mahalanobis unknown score on other block sets.

The bundle's embedding is the pooled, unit-length features of MobileNetV2's blocks 13 and 16 and of the
classifier's input (block 18) (``trainer.model.MOBILENET_V2_TAPS``; docs/open-set.md). This scores other sets
of blocks on a finished ``benchmarks/open_set.py`` run, without exporting anything: each fold's checkpoint
(``<work>/fold<N>/run/best.pt``) in PyTorch (FP32), every block's feature map average-pooled, each part scaled
to unit length and joined as the bundle does; class statistics fitted as the export fits them
(``contract.openset.fit_embedding_stats``) on 250 training images per known class of the fold's own data; the
Mahalanobis score's AUROC of the known against the held-out classes, on the test split (500 images per class,
as open_set.py) and as a station sees them (100 per class through ``trainer.station_eval``).

    PYTHONPATH=. .venv/bin/python benchmarks/open_set_taps.py --work runs/open-set \\
        --out benchmarks/results/open_set_taps.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import open_set  # noqa: E402

from contract import openset  # noqa: E402
from contract.dataset import folder_name  # noqa: E402

BLOCK_SETS = {            # 18: the classifier's input (the last feature map); "13,16,18" is what bundles carry
    "13,16,18": (13, 16, 18), "18": (18,), "16,18": (16, 18), "13,18": (13, 18), "13,16": (13, 16),
    "10,16,18": (10, 16, 18), "10,13,16": (10, 13, 16), "10,13,16,18": (10, 13, 16, 18),
    "6,13,16,18": (6, 13, 16, 18), "6,10,13,16,18": (6, 10, 13, 16, 18), "3,6,10,13,16,18": (3, 6, 10, 13, 16, 18),
}
FIT_PER_CLASS = 250


def pooled_blocks(model, inputs: np.ndarray, batch: int = 256) -> dict[int, np.ndarray]:
    """Every block's average-pooled feature map, per image."""
    import torch

    out: dict[int, list[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, len(inputs), batch):
            h = torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch], dtype=np.float32))
            for i, layer in enumerate(model.features):
                h = layer(h)
                out.setdefault(i, []).append(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1).numpy())
    return {i: np.concatenate(parts) for i, parts in out.items()}


def joined(blocks: dict[int, np.ndarray], taps: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([openset.unit(blocks[t]) for t in taps], axis=1)


def fold_aurocs(work: Path, data: Path, fold: int, test_per_class: int, station_per_class: int) -> dict:
    from contract.bundle import load_bundle
    from trainer.engine import load_checkpoint_model
    from trainer.station_eval import station_views

    held = open_set.CLASSES[2 * fold: 2 * fold + 2]
    bundle = load_bundle(work / f"fold{fold}" / "models" / f"fold{fold}" / "1")
    known = list(bundle.labels)
    model, _ = load_checkpoint_model(work / f"fold{fold}" / "run" / "best.pt")
    model.eval()
    spec = bundle.input_spec
    rng = np.random.default_rng(0)
    fit_paths, fit_y = [], []
    for c, name in enumerate(known):
        files = sorted((work / f"fold{fold}" / "data" / folder_name(name)).iterdir())
        fit_paths += [files[i] for i in rng.permutation(len(files))[:FIT_PER_CLASS]]
        fit_y += [c] * min(FIT_PER_CLASS, len(files))
    fit = pooled_blocks(model, open_set.preprocessed(spec, fit_paths))
    k_paths, k_y = open_set.test_samples(data, known, test_per_class)
    u_paths, u_y = open_set.test_samples(data, held, test_per_class)
    step = max(1, test_per_class // station_per_class)
    views = {
        "test_split": (open_set.preprocessed(spec, k_paths), open_set.preprocessed(spec, u_paths)),
        "station_view": (station_views(k_paths[::step], k_y[::step], spec).inputs,
                         station_views(u_paths[::step], u_y[::step], spec).inputs),
    }
    stats = {name: openset.fit_embedding_stats(joined(fit, taps), np.array(fit_y), len(known), bank_per_class=0)
             for name, taps in BLOCK_SETS.items()}            # one fit per block set, for both views
    out: dict = {"held_out": held}
    for view, (k_in, u_in) in views.items():
        k_blocks, u_blocks = pooled_blocks(model, k_in), pooled_blocks(model, u_in)
        out[view] = {}
        for name, taps in BLOCK_SETS.items():
            k = stats[name].mahalanobis(joined(k_blocks, taps)).min(-1)
            u = stats[name].mahalanobis(joined(u_blocks, taps)).min(-1)
            out[view][name] = round(openset.auroc(k, u), 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/open-set"), help="the --work of a finished open_set.py run")
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    p.add_argument("--test-per-class", type=int, default=500)
    p.add_argument("--station-per-class", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/open_set_taps.json"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    folds = {int(f): fold_aurocs(args.work, args.data, int(f), args.test_per_class, args.station_per_class)
             for f in args.folds.split(",")}
    mean = {view: {name: round(float(np.mean([f[view][name] for f in folds.values()])), 4) for name in BLOCK_SETS}
            for view in ("test_split", "station_view")}
    out = {"command": "python " + " ".join(sys.argv), "score": "mahalanobis", "precision": "fp32 (PyTorch)",
           "mean_auroc": mean, "folds": folds}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(mean, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
