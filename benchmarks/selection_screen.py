"""Screen labelling rules for active learning in seconds, on cached backbone features (a stand-in, not the benchmark).

``benchmarks/active_learning.py`` measures a rule the way stations and the trainer run it (a bundle per round,
INT8 on ONNX Runtime, the agent's own code, trainer runs): 20-25 minutes per seed on two cores. This script
screens rules before that. The ImageNet MobileNetV2 backbone's features of every Fashion-MNIST image are
computed once: the station's input for the pool and the test split, and ``--views`` random views of every
training image under the trainer's own augmentation (``trainer.augment``). Each round then retrains only the
classifier (Dropout 0.2 + Linear, as ``--train head`` does: Adam, 0.2 warmup epochs then cosine, label
smoothing, batch 32, a random view of each image every epoch) on those features. The benchmark's
``draw_split`` draws the same seed, validation and pool images for a seed, and its ``rank_for_labelling``
orders the pool, from the FP32 head's softmax (no thresholds here: no frame counts as flagged, so the order
is the margin order alone).

What it leaves out, so what it cannot show: INT8, the bundle's thresholds, backbone features that change
(full fine-tuning), and the seed model (here a head trained on cached features, not the trainer's run).
On the same seeds it has been more favourable to least certain first than the benchmark (docs/active_learning.md).

    python benchmarks/selection_screen.py features --out /tmp/fashion_mnist_features.npz       # once, ~5 min
    python benchmarks/selection_screen.py run --features /tmp/fashion_mnist_features.npz \\
        --rank margin balanced --seeds 0 1 2 3 4 5 6 7 --json /tmp/screen.json               # ~45 s per seed and rule
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.active_learning import (  # noqa: E402
    LOW_CONFIDENCE,
    RANDOM,
    BenchConfig,
    LabelState,
    RoundResult,
    draw_split,
    rank_for_labelling,
    summarize,
)
from trainer.config import TrainConfig  # noqa: E402
from trainer.engine import make_schedule  # noqa: E402


@dataclass(frozen=True)
class Scored:
    """What ``rank_for_labelling`` reads of a frame's classification."""

    class_id: int
    margin: float
    low_confidence: bool = False


def features(args: argparse.Namespace) -> int:
    from trainer import data as data_mod
    from trainer.augment import AugmentConfig, BatchAugment, eval_spec, load_canvas
    from trainer.engine import ImageFiles, eval_inputs, materialize
    from trainer.model import build_model

    torch.set_num_threads(args.threads)
    train = data_mod.load_dataset(args.data / "train", check_images=False)
    test = data_mod.load_dataset(args.data / "test", train.classes, check_images=False)
    spec = eval_spec(args.image_size, args.image_size)
    model = build_model("mobilenet_v2", len(train.classes)).eval()

    @torch.inference_mode()
    def embed(batches) -> np.ndarray:
        return np.concatenate([torch.flatten(torch.nn.functional.adaptive_avg_pool2d(model.features(x), 1), 1).numpy()
                               for x in batches])

    def chunks(x: torch.Tensor, fn=lambda b: b):
        return (fn(x[i : i + 1000]) for i in range(0, len(x), 1000))

    start = time.time()
    train_x, train_y = eval_inputs(train.samples, spec, 0, desc="preprocess train images")
    test_x, test_y = eval_inputs(test.samples, spec, 0, desc="preprocess test images")
    canvas, _ = materialize(ImageFiles(train.samples, lambda p: load_canvas(p, spec)), 0, "decode train canvases")
    out = {"train": embed(chunks(train_x)), "test": embed(chunks(test_x)),
           "train_labels": train_y.numpy(), "test_labels": test_y.numpy()}
    augment = BatchAugment(AugmentConfig(), spec, torch.Generator().manual_seed(0))
    out["views"] = np.stack([embed(chunks(canvas, augment)).astype(np.float16) for _ in range(args.views)])
    np.savez(args.out, **out)
    print(f"{args.out}: {len(train_y)} train x {args.views} views + {len(test_y)} test features "
          f"({time.time() - start:.0f} s)")
    return 0


class Screen:
    def __init__(self, path: Path, cfg: BenchConfig, lr: float, epochs: int, label_smoothing: float) -> None:
        d = np.load(path)
        self.train, self.views = torch.from_numpy(d["train"]), torch.from_numpy(d["views"].astype(np.float32))
        self.test, self.test_y = torch.from_numpy(d["test"]), torch.from_numpy(d["test_labels"].astype(np.int64))
        self.labels = d["train_labels"].astype(np.int64)
        self.cfg, self.lr, self.epochs, self.smoothing = cfg, lr, epochs, label_smoothing

    def train_head(self, idx: list[int], epochs: int) -> torch.nn.Module:
        g = torch.Generator().manual_seed(self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        head = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(self.train.shape[1], int(self.labels.max()) + 1))
        opt = torch.optim.Adam(head.parameters(), lr=self.lr)
        index = torch.tensor(idx)
        y = torch.from_numpy(self.labels)[index]
        per_epoch = math.ceil(len(idx) / 32)
        schedule = make_schedule(opt, TrainConfig(data="", epochs=epochs, warmup_epochs=0.2), per_epoch)  # the trainer's
        for _ in range(epochs):
            order = torch.randperm(len(idx), generator=g)
            view = torch.randint(0, len(self.views), (len(idx),), generator=g)
            for b in range(per_epoch):
                j = order[b * 32 : (b + 1) * 32]
                loss = torch.nn.functional.cross_entropy(head(self.views[view[j], index[j]]), y[j],
                                                         label_smoothing=self.smoothing)
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
        return head.eval()

    @torch.no_grad()
    def accuracy(self, head: torch.nn.Module) -> float:
        return (head(self.test).argmax(1) == self.test_y).float().mean().item()

    @torch.no_grad()
    def scored(self, head: torch.nn.Module, pool: list[int]) -> list[Scored]:
        probs = torch.softmax(head(self.train[pool]), 1)
        top2 = probs.topk(2, 1)
        return [Scored(int(c), float(m)) for c, m in zip(top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1])]

    def curves(self, ranks: list[str]) -> dict[str, list[RoundResult]]:
        cfg = self.cfg
        seed, val, pool0 = draw_split(self.labels, cfg)
        start = self.train_head(list(seed), cfg.seed_epochs)
        first = RoundResult(0, len(seed) + len(val), 0, self.accuracy(start))
        out = {}
        for rank in [*ranks, RANDOM]:
            rng = np.random.default_rng(cfg.seed + 1)
            state, head, curve = LabelState(seed, pool0), start, [first]
            for r in range(1, cfg.rounds + 1):
                if rank == RANDOM:
                    pick = rng.choice(len(state.pool), cfg.budget_per_round, replace=False).tolist()
                else:
                    pick = rank_for_labelling(self.scored(head, list(state.pool)),
                                              balanced=rank == "balanced")[: cfg.budget_per_round]
                state = state.label(pick)
                head = self.train_head(list(state.labelled), self.epochs)
                curve.append(RoundResult(r, len(state.labelled) + len(val), len(pick), self.accuracy(head)))
            out[rank] = curve
        return out


def ratio(curve: list[RoundResult], rnd: list[RoundResult], interpolate: bool = False) -> float | None:
    """The benchmark's ratio: labels to first reach random's final top-1, over the labels random first needed."""
    summary = summarize({LOW_CONFIDENCE: curve, RANDOM: rnd})
    return summary["interpolated_ratio" if interpolate else "ratio"]


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    results = {}
    for s in args.seeds:
        cfg = BenchConfig(seed=s, seed_per_class=args.seed_per_class, val_per_class=args.val_per_class, pool=args.pool,
                          rounds=args.rounds, budget_per_round=args.budget_per_round, seed_epochs=args.seed_epochs)
        started = time.time()
        curves = Screen(args.features, cfg, args.lr, args.epochs, args.label_smoothing).curves(args.rank)
        results[s] = curves
        reached = {rank: ratio(c, curves[RANDOM]) for rank, c in curves.items() if rank != RANDOM}
        print(f"seed {s} ({time.time() - started:.0f} s): " + ", ".join(
            f"{rank} {r:.2f}" if r else f"{rank} not reached" for rank, r in reached.items()), flush=True)
    labels = [r.labels for r in results[args.seeds[0]][RANDOM]]
    mean = {rank: [RoundResult(i, n, 0, float(np.mean([results[s][rank][i].accuracy for s in args.seeds])))
                   for i, n in enumerate(labels)] for rank in [*args.rank, RANDOM]}
    print(f"\nmean of {len(args.seeds)} seeds, top-1 % by labels:")
    print("labels " + " ".join(f"{n:>6}" for n in labels))
    for rank, curve in mean.items():
        print(f"{rank:>6} " + " ".join(f"{100 * r.accuracy:6.2f}" for r in curve))
    summary = {}
    for rank in args.rank:
        per_seed = [ratio(results[s][rank], results[s][RANDOM]) for s in args.seeds]
        summary[rank] = {"per_seed": per_seed, "mean_curve": ratio(mean[rank], mean[RANDOM]),
                         "mean_curve_interpolated": ratio(mean[rank], mean[RANDOM], interpolate=True),
                         "seeds_at_or_under_0.6": sum(r is not None and r <= 0.6 for r in per_seed)}
        print(f"{rank}: ratio per seed {per_seed}, mean curve {summary[rank]['mean_curve']:.2f} "
              f"({summary[rank]['mean_curve_interpolated']:.2f} interpolated)")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "summary": summary, "curves": {
            s: {rank: [r.__dict__ for r in c] for rank, c in curves.items()} for s, curves in results.items()}}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features", help="compute and cache the backbone features")
    f.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--views", type=int, default=4, help="augmented views of every training image")
    f.add_argument("--image-size", type=int, default=BenchConfig.image_size)
    f.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("run", help="screen rules against random selection")
    r.add_argument("--features", type=Path, required=True)
    r.add_argument("--rank", nargs="+", choices=("margin", "balanced"), default=["margin", "balanced"])
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--seed-per-class", type=int, default=BenchConfig.seed_per_class)
    r.add_argument("--val-per-class", type=int, default=BenchConfig.val_per_class)
    r.add_argument("--pool", type=int, default=BenchConfig.pool)
    r.add_argument("--rounds", type=int, default=BenchConfig.rounds)
    r.add_argument("--budget-per-round", type=int, default=BenchConfig.budget_per_round)
    r.add_argument("--seed-epochs", type=int, default=20)
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--lr", type=float, default=0.01)
    r.add_argument("--label-smoothing", type=float, default=BenchConfig.label_smoothing)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    return features(args) if args.cmd == "features" else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
