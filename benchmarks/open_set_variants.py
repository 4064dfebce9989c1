"""Other unknown scores on a finished ``benchmarks/open_set.py`` run: is it the score or the embedding?

Reads each fold's cached outputs (``<work>/fold<N>/outputs.npz``: the INT8 model's logits and embeddings of the
known and held-out classes, test split and station views) and its bundle's ``open_set.npz`` (the 200 training
embeddings per class the ``knn`` score keeps), and scores them in ways the product does not ship:

* ``knn`` as shipped (10th neighbour of the nearest class), with the 1st or 3rd neighbour, over the whole bank
  instead of the nearest class, and with the bank centred on its mean before the cosine;
* ViM (energy plus the norm of the embedding outside the bank's top D principal directions, scaled to the
  logits; the classifier's rows recovered from the known items' logits by least squares);
* knn + energy, each z-scored on the known items.

``--imagenet-folds`` also scores the ImageNet MobileNetV2's own pooled features (no training on these classes)
with knn on 200 training images per class: the embedding before any fine-tuning.

    PYTHONPATH=. .venv/bin/python benchmarks/open_set_variants.py --work runs/open-set \\
        --out benchmarks/results/open_set_variants.json [--imagenet-folds 0,3]
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
from contract.bundle import load_bundle  # noqa: E402


def kth_cosine(emb: np.ndarray, bank: np.ndarray, k: int, centre: np.ndarray | None = None) -> np.ndarray:
    """One minus the cosine to the k-th nearest of ``bank`` (any class), both centred on ``centre`` first."""
    c = 0.0 if centre is None else centre
    sims = openset.unit(emb - c) @ openset.unit(bank - c).T
    return 1.0 - np.sort(sims, axis=1)[:, -k]


def fold_variants(work: Path, fold: int) -> dict:
    bundle = load_bundle(work / f"fold{fold}" / "models" / f"fold{fold}" / "1")
    out = dict(np.load(work / f"fold{fold}" / "outputs.npz"))
    stats = bundle.open_set.stats
    bank = np.asarray(stats.bank, np.float64)
    result = {}
    for view, (k_key, u_key) in {"test_split": ("k", "u"), "station_view": ("ks", "us")}.items():
        kl, ke, ul, ue = out[f"{k_key}_logits"], out[f"{k_key}_emb"], out[f"{u_key}_logits"], out[f"{u_key}_emb"]
        wb = np.linalg.lstsq(np.hstack([ke, np.ones((len(ke), 1))]), kl, rcond=None)[0]
        w, b = wb[:-1].T, wb[-1]
        origin = -np.linalg.pinv(w) @ b
        scale = np.median(np.linalg.norm(ke, axis=1))          # the bank is unit length: back to the features' size
        centre = bank.mean(0)
        known_energy, known_knn = openset.unknown_scores("energy", kl), stats.knn_distance(ke)
        scores = {
            "knn": lambda lg, e: stats.knn_distance(e),
            "knn_k1": lambda lg, e: stats.knn_distance(e, 1),
            "knn_k3": lambda lg, e: stats.knn_distance(e, 3),
            "knn_whole_bank": lambda lg, e: kth_cosine(e, bank, 10),
            "knn_centred": lambda lg, e: kth_cosine(e, bank, 10, centre),
            "knn+energy": lambda lg, e: ((stats.knn_distance(e) - known_knn.mean()) / known_knn.std()
                                         + (openset.unknown_scores("energy", lg) - known_energy.mean())
                                         / known_energy.std()),
        }
        for dims in (64, 128, 256):
            feats = bank * scale - origin
            rest = np.linalg.svd(feats, full_matrices=False)[2][dims:].T
            alpha = (bank * scale @ w.T + b).max(1).mean() / np.linalg.norm(feats @ rest, axis=1).mean()
            scores[f"vim_{dims}"] = (lambda lg, e, rest=rest, alpha=alpha:
                                     alpha * np.linalg.norm((e - origin) @ rest, axis=1) - openset._logsumexp(lg))
        result[view] = {name: round(openset.auroc(fn(kl, ke), fn(ul, ue)), 4) for name, fn in scores.items()}
    return result


def imagenet_knn(data: Path, fold: int, size: int = 48, bank_per_class: int = 200, per_class: int = 300) -> dict:
    """knn AUROC on the ImageNet MobileNetV2's pooled features (the weights the recipe starts from)."""
    import cv2
    import torch

    from contract.preprocess import read_image
    from trainer.model import build_model

    model = build_model("mobilenet_v2", 1000, weights="imagenet").eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    def features(paths: list[Path]) -> np.ndarray:
        rows = []
        for i in range(0, len(paths), 256):
            imgs = [cv2.resize(read_image(p), (size, size), interpolation=cv2.INTER_AREA) for p in paths[i:i + 256]]
            x = (torch.tensor(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255 - mean) / std
            with torch.no_grad():
                rows.append(model.features(x).mean((2, 3)).numpy())
        return np.concatenate(rows)

    held = [open_set.CLASSES[i] for i in open_set.FOLDS[fold]]
    known = [c for c in open_set.CLASSES if c not in held]
    bank = features(open_set.test_samples(data, known, bank_per_class, split="train")[0])
    k = features(open_set.test_samples(data, known, per_class)[0])
    u = features(open_set.test_samples(data, held, per_class)[0])
    out = {}
    for name, centre in (("raw", None), ("centred", bank.mean(0))):
        for n in (1, 10):
            out[f"{name}_k{n}"] = round(openset.auroc(kth_cosine(k, bank, n, centre), kth_cosine(u, bank, n, centre)), 4)
    return {"held_out": held, "test_split": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/open-set"), help="the --work of a finished open_set.py run")
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    p.add_argument("--imagenet-folds", default="", help="folds to score ImageNet features on (e.g. 0,3)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/open_set_variants.json"))
    args = p.parse_args(argv)
    folds = {int(f): fold_variants(args.work, int(f)) for f in args.folds.split(",")}
    summary = {view: {name: round(float(np.mean([f[view][name] for f in folds.values()])), 4)
                      for name in next(iter(folds.values()))[view]} for view in ("test_split", "station_view")}
    out = {"command": "python " + " ".join(sys.argv), "mean_auroc": summary, "folds": folds}
    if args.imagenet_folds:
        out["imagenet_features"] = {int(f): imagenet_knn(args.data, int(f)) for f in args.imagenet_folds.split(",")}
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["mean_auroc"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
