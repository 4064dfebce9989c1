"""What an enrolled row can reach on a fold's frozen embedding: by examples, and by the old classes' allowance.

Issue 17 asks two things of enrolment at once: a new class's recall from 10 examples within 10 points of its
recall when trained with all its data, and the old classes losing at most 0.5 points. This script measures
how far apart those are, on a finished ``benchmarks/open_set.py`` run, with the product's own row fitting
(``trainer.enroll``: ``GateFit``, ``fit_row``, the bias set at ``CAP_SHARE`` of the allowance) on the fold's
cached INT8 outputs (``<work>/fold<N>/outputs.npz``), without exporting anything:

* each held-out class's 500 test images are split: up to 250 are the examples (``--shots``, several random
  draws), the other 250 measure its recall;
* the gate is the fold's known classes' test images (500 a class): halves as ``enroll`` splits them, the row
  fitted on one, the bias capped on all, the loss measured on the other;
* for each number of examples and each allowance (``--allowances``, the points ``enroll --max-drop-points``
  takes), the class's mean recall over the draws and the old classes' mean loss;
* beside it, what training a class in with all its data costs the old classes: the reference bundle's mean
  recall on the fold's eight known classes (``--reference-from``, a 10-class bundle's per-class recalls)
  against the fold's 8-class model on the same classes. Like for like only where the fold was trained like
  the reference (``open_set.py --limit-per-class 6000 --epochs 10``).

The examples are test images here, not training images as in ``open_set.py``'s enrolment, and they are not
mirrored (the cache holds embeddings, not images), so recalls lean a little low against ``enroll`` itself.

    PYTHONPATH=. .venv/bin/python benchmarks/enrol_allowance.py --work runs/open-set-stages \\
        --reference-from benchmarks/results/open_set_stages.json --out benchmarks/results/enrol_allowance.json
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

from contract.bundle import load_bundle  # noqa: E402
from trainer import enroll  # noqa: E402

POOL = 250          # of each held-out class's test images: examples drawn from the first POOL, recall on the rest
WITHIN_POINTS = 10.0


def fold_allowances(work: Path, fold: int, shots: list[int], allowances: list[float], draws: int) -> dict:
    run = work / f"fold{fold}"
    bundle = load_bundle(run / "models" / f"fold{fold}" / "1")
    os_ = bundle.open_set
    out = dict(np.load(run / "outputs.npz"))
    k_emb, k_model, k_y = out["k_emb"], out["k_logits"].astype(np.float64), out["k_y"].astype(np.int64)
    u_emb, u_model, u_y = out["u_emb"], out["u_logits"].astype(np.float64), out["u_y"].astype(np.int64)
    old_k, old_u = os_.full_logits(k_model, k_emb), os_.full_logits(u_model, u_emb)
    gf = enroll.GateFit.of(os_.stats, k_emb, k_model, old_k, k_y, 0)
    u_u = gf.white(u_emb)
    new_index = old_k.shape[1]
    held_names = [open_set.CLASSES[i] for i in open_set.FOLDS[fold]]
    classes = {}
    for c, name in enumerate(held_names):
        pool = np.flatnonzero(u_y == c)
        rows = []
        for n in shots:
            recalls: dict[float, list[float]] = {a: [] for a in allowances}
            drops: dict[float, list[float]] = {a: [] for a in allowances}
            for draw in range(draws if n < POOL else 1):
                order = np.random.default_rng(1000 * fold + 10 * c + draw).permutation(pool)
                ex, ev = order[:n], order[POOL:]
                # the row does not depend on the allowance, only its bias (the cap) does: one fit per draw
                w, _, fitted = enroll.fit_row(u_u[ex], old_u[ex], gf.half, gf.caps, allowances[0])
                z_gate, z_ev = gf.caps.u @ w, u_u[ev] @ w
                for allowance in allowances:
                    bias = enroll._capped_bias(z_gate, fitted, gf.caps, allowance)
                    recalls[allowance].append(float((enroll._decide(old_u[ev], z_ev + bias) == new_index).mean()))
                    before, after = gf.held_accuracy(z_gate, bias)
                    drops[allowance].append((before - after) * 100.0)
            for allowance in allowances:
                got = recalls[allowance]
                rows.append({"examples": n, "allowance_points": allowance, "draws": len(got),
                             "recall": round(float(np.mean(got)), 4),
                             "recall_range": [round(min(got), 4), round(max(got), 4)],
                             "old_classes_lost_points": round(float(np.mean(drops[allowance])), 3)})
        classes[name] = rows
    known_names = [n for i, n in enumerate(open_set.CLASSES) if i not in open_set.FOLDS[fold]]
    return {"fold": fold, "held_out": held_names, "known": known_names,
            "known_test_accuracy": round(float((k_model.argmax(1) == k_y).mean()), 4), "classes": classes}


def summarise(folds: list[dict], reference: dict | None) -> dict:
    table: dict[str, dict] = {}
    for f in folds:
        for name, rows in f["classes"].items():
            for r in rows:
                key = f"{r['examples']} examples, {r['allowance_points']:g} points"
                cell = table.setdefault(key, {"examples": r["examples"], "allowance_points": r["allowance_points"],
                                              "recall": {}, "worst_old_classes_lost_points": 0.0})
                cell["recall"][name] = r["recall"]
                cell["worst_old_classes_lost_points"] = max(cell["worst_old_classes_lost_points"],
                                                            r["old_classes_lost_points"])
    if reference:
        for cell in table.values():
            within = [n for n, rec in cell["recall"].items()
                      if n in reference and (reference[n] - rec) * 100.0 <= WITHIN_POINTS]
            cell["within_10_points_of_all_data"] = {"count": len(within), "of": len(cell["recall"]),
                                                    "classes": sorted(within)}
            cell["mean_recall"] = round(float(np.mean(list(cell["recall"].values()))), 4)
        for f in folds:
            known = [reference[n] for n in f["known"] if n in reference]
            if len(known) == len(f["known"]):
                ref_known = float(np.mean(known))
                f["training_in_costs_old_classes"] = {
                    "reference_recall_on_these_known_classes": round(ref_known, 4),
                    "fold_model_accuracy": f["known_test_accuracy"],
                    "points": round((f["known_test_accuracy"] - ref_known) * 100.0, 2)}
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a finished benchmarks/open_set.py --work folder")
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--shots", default="5,10,20,250", help=f"examples per class, at most {POOL}")
    p.add_argument("--allowances", default="0.5,1,2", help="the old classes' allowance in points (max_drop_points)")
    p.add_argument("--draws", type=int, default=5, help="random draws of the examples (one at the whole pool)")
    p.add_argument("--reference-from", type=Path, default=None,
                   help="an open_set.py result whose reference_recall_all_data gives the all-data recalls")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    shots = [int(s) for s in args.shots.split(",")]
    if not all(0 < s <= POOL for s in shots):
        p.error(f"--shots: each between 1 and {POOL}")
    allowances = [float(a) for a in args.allowances.split(",")]
    reference = json.loads(args.reference_from.read_text())["reference_recall_all_data"] \
        if args.reference_from else None
    folds = []
    for fold in (int(f) for f in args.folds.split(",")):
        folds.append(fold_allowances(args.work, fold, shots, allowances, args.draws))
        print(json.dumps({"fold": fold, "classes": {n: [(r["examples"], r["allowance_points"], r["recall"],
                                                         r["old_classes_lost_points"]) for r in rows]
                                                     for n, rows in folds[-1]["classes"].items()}}), flush=True)
    table = summarise(folds, reference)
    result = {"command": "python " + " ".join(sys.argv), "pool_per_class": POOL, "reference_recall_all_data": reference,
              "summary": table, "folds": folds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for key, cell in table.items():
        within = cell.get("within_10_points_of_all_data", {})
        print(f"{key}: mean recall {cell.get('mean_recall', float('nan')):.3f}, within 10 points "
              f"{within.get('count', '?')}/{within.get('of', '?')}, worst old-class loss "
              f"{cell['worst_old_classes_lost_points']:.2f}")


if __name__ == "__main__":
    main()
