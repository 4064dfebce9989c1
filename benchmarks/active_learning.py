"""Active learning on Fashion-MNIST: the agent's low-confidence selection against random selection.

Both strategies start from the same model, trained by the trainer on a small labelled
seed, and the same unlabelled pool (training images outside the seed). Each round:

1. select ``--budget-per-round`` frames from the pool;
2. "label" them from the ground truth (they leave the pool);
3. retrain with the trainer (``trainer.engine.Trainer``: MobileNetV2, the demo recipe,
   same seed, same fixed validation split) on everything labelled so far, continuing
   from the strategy's previous model (``--init previous``) or from ImageNet weights;
4. measure top-1 of the model after its last epoch on the official test split (all
   10,000 images of data/fashion-mnist/test).

Low-confidence selection is what a station does: the round's checkpoint is exported as
a real bundle (``trainer.export.bundle``: ONNX FP32 + INT8, thresholds suggested on the
validation split), loaded and verified with ``contract.bundle``, run through the backend
``agent.backends.create_backend`` picks, on inputs from ``contract.preprocess``; the
agent's ``classify_batch`` and ``LowConfidencePolicy`` (the bundle's thresholds) flag
the frames a station would upload. When more frames are flagged than the budget, the
budget is a uniform draw from the flagged frames (``--rank flagged-random``, as a
rate-limited station sends a sample of what it flags) or the flagged frames with the
lowest margin, top-1 minus top-2 probability (``--rank margin``), or the same with the predicted
classes taking turns (``--rank balanced``). When fewer are
flagged, all of them are labelled and the unflagged frames follow by ascending margin.
Random selection draws the budget uniformly from the pool.

At the end it prints the labels each strategy needed to first reach the random
strategy's final test accuracy, and their ratio (target of the "closing the loop"
work: low-confidence needs at most 60% of random's labels). Labels count everything a
person labelled: the seed (training and validation part) plus the frames selected so far.
Figures and what was tried: docs/active_learning.md.

    python benchmarks/active_learning.py                   # full fine-tunes, about 11 min on 2 cores
    python benchmarks/active_learning.py --train head --seed-epochs 20 --epochs 20 --lr 0.01 --rank balanced --seed 0
                                                           # head-only retraining, least certain first class by class:
                                                           # the target run (0.53 on the mean of seeds 0-7)
    python benchmarks/active_learning.py --rounds 2 --pool 1000 --budget-per-round 50 --seed-per-class 10  # quick look
    python benchmarks/active_learning.py --json docs/figures/active_learning.json --plot docs/figures/active_learning.png
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.decide import Classification  # noqa: E402

log = logging.getLogger("active_learning")

LOW_CONFIDENCE = "low-confidence"
RANDOM = "random"
RANKS = ("margin", "balanced", "flagged-random")


# ------------------------------------------------------------------ selection (pure)

@dataclass(frozen=True)
class Selection:
    """Pool positions chosen for labelling; for the agent's selection also what it saw in the pool."""

    positions: tuple[int, ...]
    flagged_in_pool: int | None = None     # frames the agent flagged as low-confidence
    wrong: int | None = None               # selected frames the model had misclassified


def rank_for_labelling(classifications: Sequence[Classification], *, balanced: bool = False) -> list[int]:
    """Pool positions in labelling order: frames the agent flags first, each group by ascending margin.

    ``balanced``: within each group the predicted classes take turns, each giving its least certain frame
    not yet taken (turn 1: every class's least certain frame, by ascending margin; then turn 2, ...).
    The review queue's ``least-certain-by-class`` order (central/review/store.py) is the same rule.
    Ties (equal margin) keep pool order, so the ranking is deterministic.
    """
    def key(i: int) -> tuple:
        return (not classifications[i].low_confidence, classifications[i].margin, i)

    if not balanced:
        return sorted(range(len(classifications)), key=key)
    turn: dict[int, int] = {}
    seen: dict[tuple[bool, int], int] = {}
    for i in sorted(range(len(classifications)), key=key):
        group = (classifications[i].low_confidence, classifications[i].class_id)
        turn[i] = seen[group] = seen.get(group, -1) + 1
    return sorted(range(len(classifications)),
                  key=lambda i: (not classifications[i].low_confidence, turn[i], classifications[i].margin, i))


def select_low_confidence(classifications: Sequence[Classification], budget: int, *, rank: str = "margin",
                          rng: random.Random | None = None) -> Selection:
    """The ``budget`` frames to label: flagged ones first, topped up by the least certain others.

    ``rank="margin"``: the flagged frames with the lowest margin. ``rank="balanced"``: the same, with the
    predicted classes taking turns (``rank_for_labelling(balanced=True)``), so one confusion does not fill
    the budget. ``rank="flagged-random"``: a uniform draw from the flagged frames (what a rate-limited
    station uploads when it flags more than it may send).
    """
    if rank not in RANKS:
        raise ValueError(f"rank: expected one of {', '.join(RANKS)}, got {rank!r}")
    order = rank_for_labelling(classifications, balanced=rank == "balanced")
    flagged = sum(c.low_confidence for c in classifications)
    if rank == "flagged-random" and flagged > budget:
        if rng is None:
            raise ValueError("rank='flagged-random' needs an rng")
        return Selection(tuple(sorted(rng.sample(order[:flagged], budget))), flagged)
    return Selection(tuple(order[:budget]), flagged)


def select_random(pool_size: int, budget: int, rng: random.Random) -> Selection:
    """``budget`` distinct pool positions drawn uniformly (all of them when the pool is smaller)."""
    return Selection(tuple(sorted(rng.sample(range(pool_size), min(budget, pool_size)))))


@dataclass(frozen=True)
class LabelState:
    """Which training images are labelled (beyond the fixed validation split) and which wait in the pool."""

    labelled: tuple[int, ...]
    pool: tuple[int, ...]

    def label(self, positions: Sequence[int]) -> "LabelState":
        """Move the frames at these pool positions to the labelled set."""
        chosen = set(positions)
        if len(chosen) != len(positions):
            raise ValueError("selection names a pool position twice")
        if any(not 0 <= p < len(self.pool) for p in chosen):
            raise ValueError(f"selection outside the pool of {len(self.pool)} frames")
        picked = tuple(self.pool[p] for p in sorted(chosen))
        return LabelState(self.labelled + picked, tuple(x for p, x in enumerate(self.pool) if p not in chosen))


# ------------------------------------------------------------------ rounds

class Strategy(Protocol):
    name: str

    def select(self, model: Path, state: LabelState, budget: int, round_no: int) -> Selection: ...


@dataclass
class RoundResult:
    round: int
    labels: int                 # everything labelled so far: validation split + training labels
    selected: int               # frames labelled in this round
    accuracy: float             # top-1 on the test split after this round's retraining
    flagged_in_pool: int | None = None
    selected_wrong: int | None = None   # selected frames the previous model had misclassified (low-confidence)
    seconds: float = 0.0


def iter_rounds(strategy: Strategy, start: LabelState, start_model: Path, start_accuracy: float, *, rounds: int,
                budget: int, val_labels: int, train: Callable[[str, int, LabelState], Path],
                evaluate: Callable[[Path], float]) -> Iterator[RoundResult]:
    """Round 0 is the shared seed model; each later round selects, labels, retrains and evaluates."""
    yield RoundResult(0, val_labels + len(start.labelled), 0, start_accuracy)
    state, model = start, start_model
    for round_no in range(1, rounds + 1):
        t0 = time.perf_counter()
        if not state.pool:
            log.warning("%s: the pool is empty after round %d; stopping", strategy.name, round_no - 1)
            return
        selection = strategy.select(model, state, budget, round_no)
        state = state.label(selection.positions)
        model = train(strategy.name, round_no, state)
        result = RoundResult(round_no, val_labels + len(state.labelled), len(selection.positions), evaluate(model),
                             selection.flagged_in_pool, selection.wrong,
                             round(time.perf_counter() - t0, 1))
        log.info("%s round %d: %d labels, test top-1 %.4f (%.0f s)", strategy.name, round_no, result.labels,
                 result.accuracy, result.seconds)
        yield result


def run_rounds(strategy: Strategy, start: LabelState, start_model: Path, start_accuracy: float,
               **kwargs: Any) -> list[RoundResult]:
    """All rounds of one strategy (see ``iter_rounds``)."""
    return list(iter_rounds(strategy, start, start_model, start_accuracy, **kwargs))


def labels_to_reach(curve: Sequence[RoundResult], target: float) -> int | None:
    """Labels at the first round whose test accuracy is at least ``target``; None when no round reaches it."""
    return next((r.labels for r in curve if r.accuracy >= target), None)


def interpolated_labels_to_reach(curve: Sequence[RoundResult], target: float) -> float | None:
    """Like ``labels_to_reach``, linearly interpolated between the round before and the first round at target."""
    for before, after in zip(curve, curve[1:]):
        if before.accuracy >= target:
            return float(before.labels)
        if after.accuracy >= target:
            share = (target - before.accuracy) / (after.accuracy - before.accuracy)
            return before.labels + share * (after.labels - before.labels)
    return float(curve[0].labels) if curve and curve[0].accuracy >= target else None


def summarize(curves: dict[str, list[RoundResult]]) -> dict:
    """Random's final accuracy, the labels each strategy needed to reach it, and the ratios.

    ``ratio`` divides by the labels random needed to first reach its final accuracy (the stricter
    figure when random's curve wobbles); ``ratio_to_random_final_labels`` by all the labels random used.
    """
    target = curves[RANDOM][-1].accuracy
    needed = {name: labels_to_reach(curve, target) for name, curve in curves.items()}
    interpolated = {name: interpolated_labels_to_reach(curve, target) for name, curve in curves.items()}
    low, rnd = needed[LOW_CONFIDENCE], needed[RANDOM]
    ratio = None if low is None or not rnd else low / rnd
    low_i, rnd_i = interpolated[LOW_CONFIDENCE], interpolated[RANDOM]
    return {
        "target_accuracy": target,
        "random_final_labels": curves[RANDOM][-1].labels,
        "labels_needed": needed,
        "ratio": ratio,
        "interpolated_labels_needed": interpolated,
        "interpolated_ratio": None if low_i is None or not rnd_i else low_i / rnd_i,
        "ratio_to_random_final_labels": None if low is None else low / curves[RANDOM][-1].labels,
        "target_ratio": 0.6,
        "target_met": ratio is not None and ratio <= 0.6,
    }


def mean_curves(reports: Sequence[dict], *, source: Sequence[str] | None = None) -> dict[str, list[RoundResult]]:
    """Each strategy's curve averaged over finished runs (e.g. several seeds) of one configuration.

    The runs must have the same labels at every round; the mean curve's summary reads the target off
    random's mean final accuracy, which is steadier than any one run's last round.
    """
    names = list(source or [f"run {i + 1}" for i in range(len(reports))])
    if len(reports) < 2:
        raise ValueError("--mean-of: give at least two runs")
    for name, report in zip(names, reports):
        if report.get("finished") is False:     # files from before the field existed were written at the end
            raise ValueError(f"{name}: the run did not finish (its JSON was written part-way)")
    out: dict[str, list[RoundResult]] = {}
    for strategy in (LOW_CONFIDENCE, RANDOM):
        curves = [[RoundResult(**r) for r in report["curves"][strategy]] for report in reports]
        labels = [[r.labels for r in c] for c in curves]
        for name, other in zip(names[1:], labels[1:]):
            if other != labels[0]:
                raise ValueError(f"{name}: {strategy} labels per round {other} differ from {names[0]}'s {labels[0]}; "
                                 "only runs of the same configuration can be averaged")
        out[strategy] = [RoundResult(round=i, labels=n, selected=curves[0][i].selected,
                                     accuracy=float(np.mean([c[i].accuracy for c in curves])))
                         for i, n in enumerate(labels[0])]
    return out


# ------------------------------------------------------------------ the real parts

@dataclass
class BenchConfig:
    data: Path = Path("data/fashion-mnist")
    seed_per_class: int = 20
    val_per_class: int = 10
    pool: int = 30000
    rounds: int = 10
    budget_per_round: int = 500
    image_size: int = 32
    epochs: int = 2                 # per round; the model carries over between rounds (init="previous")
    seed_epochs: int = 8
    init: str = "previous"          # where each round's training starts: "previous" model or "imagenet"
    rank: str = "flagged-random"    # which flagged frames fill the budget: one of RANKS
    batch_size: int = 32
    lr: float = 1e-3
    label_smoothing: float = 0.1    # the demo recipe's; it flattens the margins the agent's selection ranks by
    seed: int = 0
    threads: int = 1
    arch: str = "mobilenet_v2"
    balance_classes: bool = False   # trainer option: every class equally often per epoch (both strategies)
    device: str = "cpu"             # training and test evaluation: cpu, cuda or auto; the pool is scored on ORT CPU
    train: str = "full"             # "full": fine-tune the whole network; "head": the trainer's linear probe
    work_dir: Path | None = None


@dataclass
class Images:
    """The benchmark's images, decoded once."""

    classes: list[str]
    train_paths: list[Path]
    train_labels: np.ndarray
    seed: LabelState
    val: tuple[int, ...]
    test_x: Any                 # torch.Tensor: the test split as station inputs
    test_y: Any
    pool_rgb: dict[int, np.ndarray] = field(default_factory=dict)


def draw_split(labels: np.ndarray, cfg: BenchConfig) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(seed training images, validation images, pool) as train-set indices, per class for the first two."""
    rng = np.random.default_rng(cfg.seed)
    seed, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        need = cfg.seed_per_class + cfg.val_per_class
        if len(idx) < need:
            raise ValueError(f"class {c}: {len(idx)} images, fewer than --seed-per-class + --val-per-class = {need}")
        seed.extend(idx[: cfg.seed_per_class].tolist())
        val.extend(idx[cfg.seed_per_class : need].tolist())
    rest = np.setdiff1d(np.arange(len(labels)), np.array(seed + val))
    pool = rng.permutation(rest)[: cfg.pool]
    return tuple(sorted(seed)), tuple(sorted(val)), tuple(sorted(pool.tolist()))


def load_images(cfg: BenchConfig) -> Images:
    from contract.preprocess import read_image
    from trainer import data as data_mod
    from trainer.augment import eval_spec
    from trainer.engine import eval_inputs

    train_dir, test_dir = cfg.data / "train", cfg.data / "test"
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise SystemExit(f"{folder}: not found; import Fashion-MNIST first: python -m trainer import-fashion-mnist")
    train = data_mod.load_dataset(train_dir, check_images=False)
    test = data_mod.load_dataset(test_dir, train.classes, check_images=False)
    labels = np.array(train.labels())
    seed, val, pool = draw_split(labels, cfg)
    spec = eval_spec(cfg.image_size, cfg.image_size)
    test_x, test_y = eval_inputs(test.samples, spec, 0, desc="preprocess test images")
    paths = [s.path for s in train.samples]
    pool_rgb = {i: read_image(paths[i]) for i in pool}
    log.info("seed %d + validation %d labelled, pool %d, test %d images", len(seed), len(val), len(pool), len(test_y))
    return Images(train.classes, paths, labels, LabelState(seed, pool), val, test_x, test_y, pool_rgb)


class Lab:
    """Trains, evaluates and exports with the trainer's code, in a scratch folder."""

    def __init__(self, cfg: BenchConfig, images: Images, work_dir: Path) -> None:
        self.cfg = cfg
        self.images = images
        self.work_dir = work_dir
        self.latest: dict[str, Path] = {}      # each strategy's newest model ("seed": the shared start)

    def train_config(self, data: Path, name: str, *, weights: str, epochs: int):
        from trainer.config import TrainConfig

        cfg = self.cfg
        # The demo recipe (trainer.pipeline), at the benchmark's size; workers=0: no extra processes on 2 cores.
        return TrainConfig(data=str(data), out_dir=str(self.work_dir), name=name, arch=cfg.arch, weights=weights,
                           image_size=cfg.image_size, resize_shorter=cfg.image_size, epochs=epochs,
                           batch_size=cfg.batch_size, optimizer="adam", lr=cfg.lr, warmup_epochs=0.2,
                           label_smoothing=cfg.label_smoothing, seed=cfg.seed, workers=0, device=cfg.device,
                           balance_classes=cfg.balance_classes,
                           freeze_epochs=epochs if cfg.train == "head" else 0)

    def train(self, strategy: str, round_no: int, state: LabelState) -> Path:
        """Train on all labels so far; the model after the last epoch (end of the cosine schedule) is the result.

        Round 0 (the seed model) fine-tunes ImageNet MobileNetV2 for ``seed_epochs``. Later rounds fine-tune
        for ``epochs`` from ImageNet (``init="imagenet"``) or from this strategy's previous model
        (``init="previous"``: its backbone; the trainer gives every run a new head).
        """
        from trainer import data as data_mod
        from trainer.engine import Trainer

        cfg = self.cfg
        run_dir = self.work_dir / f"{strategy}-round{round_no}"
        run_dir.mkdir(parents=True)
        images = self.images
        rows = list(state.labelled) + list(images.val)
        csv_path = run_dir / "labelled.csv"
        with open(csv_path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label"])
            writer.writerows([str(images.train_paths[i].resolve()), images.classes[images.train_labels[i]]]
                             for i in rows)
        dataset = data_mod.load_dataset(csv_path, images.classes)
        if dataset.skipped:
            raise SystemExit(f"unreadable labelled images: {'; '.join(s['error'] for s in dataset.skipped[:3])}")
        n_train = len(state.labelled)
        data_mod.save_split(run_dir / "split.json", dataset, list(range(n_train)),
                            list(range(n_train, len(rows))), cfg.seed)
        previous = self.latest.get(strategy, self.latest.get("seed"))
        if round_no == 0:
            weights, epochs = "imagenet", cfg.seed_epochs
        else:
            weights, epochs = (str(previous) if cfg.init == "previous" else "imagenet"), cfg.epochs
        Trainer(self.train_config(csv_path, run_dir.name, weights=weights, epochs=epochs), run_dir).fit()
        model = run_dir / "last.pt"
        if strategy in self.latest and self.latest[strategy].parent != run_dir:
            shutil.rmtree(self.latest[strategy].parent, ignore_errors=True)   # checkpoints are 20 MB each
        self.latest[strategy] = model
        return model

    def evaluate(self, checkpoint: Path) -> float:
        """Top-1 of the checkpoint (PyTorch FP32) on the whole official test split."""
        import torch

        from trainer.engine import load_checkpoint_model, predict_logits, select_device

        model, _ = load_checkpoint_model(checkpoint)
        device = select_device(self.cfg.device)
        model = model.to(device, memory_format=torch.channels_last)
        logits = predict_logits(model, self.images.test_x, device, batch_size=256, channels_last=True).cpu()
        return float((logits.argmax(1) == self.images.test_y).float().mean())

    def export_bundle(self, checkpoint: Path, state: LabelState, round_no: int) -> Path:
        """The bundle a station would receive for this checkpoint (thresholds suggested on the validation split)."""
        from trainer.export.bundle import ExportConfig, export_bundle
        from trainer.export.quantize import QuantizeConfig

        # Whole calibration batches only: ONNX Runtime's histogram calibrator fails on a ragged last batch.
        quantize = QuantizeConfig()
        whole = max(1, len(state.labelled) // quantize.batch_size) * quantize.batch_size
        quantize = dataclasses.replace(quantize, calibration_images=min(quantize.calibration_images, whole))
        models = self.work_dir / "models"
        shutil.rmtree(models, ignore_errors=True)   # only the newest bundle is needed
        return export_bundle(ExportConfig(checkpoint=checkpoint, models_dir=models, name="active-learning",
                                          version=f"round{round_no}", tensorrt="off", workers=0,
                                          quantize=quantize)).bundle_dir


def score_pool(bundle_dir: Path, frames: Sequence[np.ndarray], *, threads: int = 1,
               batch_size: int = 256) -> tuple[list[Classification], dict]:
    """What a station running this bundle decides for each frame (HxWx3 uint8 RGB), and which model ran.

    The agent's own path: verified bundle, the backend a default station config picks (INT8 ONNX when the
    manifest marks it deployable), the manifest's preprocessing, softmax, top-k and the low-confidence
    policy with the bundle's suggested thresholds.
    """
    from agent.backends import create_backend, outputs_of
    from agent.config import ModelConfig
    from agent.decide import (
        LowConfidencePolicy,
        PolicyThresholds,
        classify_batch,
        softmax,
    )
    from contract.bundle import load_bundle
    from contract.preprocess import Preprocessor

    bundle = load_bundle(bundle_dir)
    backend = create_backend(bundle, ModelConfig(bundle=bundle.root, intra_op_threads=threads))
    policy = LowConfidencePolicy(PolicyThresholds.resolve(bundle.thresholds))
    preprocess = Preprocessor(bundle.input_spec)

    def logits(batch: np.ndarray) -> np.ndarray:
        """One logit per bundle label, as the station computes them (enrolled classes appended)."""
        model_logits, emb = outputs_of(backend, batch)
        return bundle.open_set.full_logits(model_logits, emb) if bundle.open_set is not None else model_logits

    probs = np.concatenate([softmax(logits(preprocess.batch(frames[i : i + batch_size])))
                            for i in range(0, len(frames), batch_size)])
    classes = classify_batch(probs, bundle.labels, 3, [policy] * len(frames))
    return classes, {"bundle": bundle.version, "backend": backend.name, "precision": backend.precision,
                     "thresholds": bundle.thresholds}


@dataclass
class LowConfidenceStrategy:
    lab: Lab
    name: str = LOW_CONFIDENCE
    details: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.lab.cfg.seed)

    def select(self, model: Path, state: LabelState, budget: int, round_no: int) -> Selection:
        bundle_dir = self.lab.export_bundle(model, state, round_no)
        frames = [self.lab.images.pool_rgb[i] for i in state.pool]
        classes, info = score_pool(bundle_dir, frames, threads=self.lab.cfg.threads)
        selection = select_low_confidence(classes, budget, rank=self.lab.cfg.rank, rng=self.rng)
        truth = self.lab.images.train_labels
        wrong = sum(classes[p].class_id != truth[state.pool[p]] for p in selection.positions)
        info.update(flagged_in_pool=selection.flagged_in_pool, pool=len(classes), selected_wrong=int(wrong))
        self.details.append({"round": round_no, **info})
        log.info("round %d: the agent (%s, %s) flags %d of %d pool frames; %d of the %d selected were misclassified",
                 round_no, info["backend"], info["precision"], selection.flagged_in_pool, len(classes), wrong,
                 len(selection.positions))
        return Selection(selection.positions, selection.flagged_in_pool, int(wrong))


@dataclass
class RandomStrategy:
    seed: int
    name: str = RANDOM

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def select(self, model: Path, state: LabelState, budget: int, round_no: int) -> Selection:
        return select_random(len(state.pool), budget, self.rng)


# ------------------------------------------------------------------ report

def print_table(curves: dict[str, list[RoundResult]], summary: dict) -> None:
    low, rnd = curves[LOW_CONFIDENCE], curves[RANDOM]
    print()
    print("round | labels | low-confidence top-1 | random top-1 | agent flagged in pool | selected misclassified")
    for a, b in zip(low, rnd):
        flagged = "-" if a.flagged_in_pool is None else str(a.flagged_in_pool)
        wrong = "-" if a.selected_wrong is None else f"{a.selected_wrong}/{a.selected}"
        print(f"{a.round:5d} | {a.labels:6d} | {a.accuracy:20.4f} | {b.accuracy:12.4f} | {flagged:>21} | {wrong:>22}")
    needed = summary["labels_needed"]
    print(f"\nrandom's final test top-1: {summary['target_accuracy']:.4f} with {summary['random_final_labels']} labels")
    for name in (LOW_CONFIDENCE, RANDOM):
        value = needed[name]
        print(f"labels {name} needed to reach it: {value if value is not None else 'not reached'}")
    if summary["ratio"] is not None:
        print(f"ratio low-confidence / random: {summary['ratio']:.2f} (interpolated between rounds: "
              f"{summary['interpolated_ratio']:.2f}); target <= 0.60: {'met' if summary['target_met'] else 'NOT met'}")
        print(f"low-confidence labels / all of random's labels: {summary['ratio_to_random_final_labels']:.2f}")
    else:
        print("ratio: low-confidence selection did not reach random's final accuracy; target NOT met")


def plot(curves: dict[str, list[RoundResult]], summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, style in ((LOW_CONFIDENCE, "o-"), (RANDOM, "s--")):
        curve = curves[name]
        ax.plot([r.labels for r in curve], [r.accuracy * 100 for r in curve], style, label=name)
    ax.axhline(summary["target_accuracy"] * 100, color="gray", lw=0.8, ls=":", label="random's final top-1")
    ax.set(xlabel="labelled images", ylabel="test top-1 (%)", title="Fashion-MNIST: agent selection vs random")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


def write_json(payload: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out)


# ------------------------------------------------------------------ main

def run(cfg: BenchConfig, progress: Callable[[dict], None] | None = None) -> dict:
    import torch

    start = time.perf_counter()
    # One intra-op thread by default: on a small, shared CPU PyTorch's spinning pool slows down 10x under load.
    torch.set_num_threads(cfg.threads)
    if cfg.work_dir is not None and cfg.work_dir.exists() and any(cfg.work_dir.iterdir()):
        raise SystemExit(f"--work-dir {cfg.work_dir}: not empty; give a new or empty folder")
    images = load_images(cfg)
    with tempfile.TemporaryDirectory(prefix="active-learning-") as scratch:
        work_dir = cfg.work_dir or Path(scratch)
        lab = Lab(cfg, images, work_dir)
        t0 = time.perf_counter()
        seed_model = lab.train("seed", 0, images.seed)
        seed_accuracy = lab.evaluate(seed_model)
        log.info("seed model: test top-1 %.4f (%.0f s)", seed_accuracy, time.perf_counter() - t0)
        low = LowConfidenceStrategy(lab)
        strategies = [low, RandomStrategy(cfg.seed)]
        # Both strategies advance round by round, so a run cut short still has comparable curves.
        rounds = [iter_rounds(s, images.seed, seed_model, seed_accuracy, rounds=cfg.rounds,
                              budget=cfg.budget_per_round, val_labels=len(images.val), train=lab.train,
                              evaluate=lab.evaluate) for s in strategies]
        curves: dict[str, list[RoundResult]] = {s.name: [] for s in strategies}
        for results in zip(*rounds):
            for s, result in zip(strategies, results):
                curves[s.name].append(result)
            if progress is not None:
                progress(report(cfg, curves, low.details, start, finished=False))
    return report(cfg, curves, low.details, start, finished=True)


def report(cfg: BenchConfig, curves: dict[str, list[RoundResult]], details: list[dict], start: float, *,
           finished: bool) -> dict:
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    return {"config": config, "curves": {k: [asdict(r) for r in v] for k, v in curves.items()},
            "agent_selection": list(details), "summary": summarize(curves), "finished": finished,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "command": " ".join(["python", "benchmarks/active_learning.py", *sys.argv[1:]])}


def get_args_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=d.data, help="folder with train/ and test/ class folders")
    p.add_argument("--seed-per-class", type=int, default=d.seed_per_class, help="labelled training images per class at the start")
    p.add_argument("--val-per-class", type=int, default=d.val_per_class,
                   help="labelled validation images per class (the bundle's suggested thresholds); counted as labels")
    p.add_argument("--pool", type=int, default=d.pool, help="unlabelled training images to select from")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--budget-per-round", type=int, default=d.budget_per_round, help="frames labelled per round")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of every (re)training")
    p.add_argument("--seed-epochs", type=int, default=d.seed_epochs, help="epochs of the seed model's training")
    p.add_argument("--init", choices=("imagenet", "previous"), default=d.init,
                   help="each round fine-tunes from ImageNet, or from the strategy's previous model")
    p.add_argument("--rank", choices=RANKS, default=d.rank,
                   help="label the flagged frames lowest margin first, lowest margin first with the predicted "
                        "classes taking turns, or a uniform draw of them")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="the trainer's label smoothing (both strategies)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the seed set, the pool, random selection and training")
    p.add_argument("--threads", type=int, default=d.threads, help="PyTorch and ONNX Runtime intra-op threads")
    p.add_argument("--balance-classes", action="store_true",
                   help="train with the trainer's --balance-classes (both strategies): the agent's picks are "
                        "skewed towards the classes it confuses")
    p.add_argument("--train", choices=("full", "head"), default=d.train,
                   help="full: every training fine-tunes the whole network; head: only the classifier head is "
                        "trained, on the frozen ImageNet backbone (the trainer's --freeze-epochs for every epoch)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=d.device,
                   help="where the trainer trains and the test split is evaluated (the pool is scored on the CPU, "
                        "as a station's ONNX Runtime would)")
    p.add_argument("--work-dir", type=Path, default=None, help="keep runs and bundles here (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write all figures here")
    p.add_argument("--plot", type=Path, default=None, help="write the accuracy-vs-labels plot here (PNG)")
    p.add_argument("--mean-of", type=Path, nargs="+", metavar="JSON",
                   help="run nothing: average the curves of these finished runs' --json files (the same "
                        "configuration, e.g. several seeds) and print the table and ratios of the mean curves")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.mean_of:
        return print_mean_of(args.mean_of, args.json, args.plot)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    for name in ("seed_per_class", "val_per_class", "pool", "rounds", "budget_per_round", "epochs", "seed_epochs", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__})
    from trainer.engine import select_device

    try:
        select_device(cfg.device)          # a missing GPU fails now, not after the data is loaded
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    # With --json the figures so far are written after every round: a run cut short keeps them.
    report = run(cfg, progress=(lambda partial: write_json(partial, args.json)) if args.json else None)
    print_table({k: [RoundResult(**r) for r in v] for k, v in report["curves"].items()}, report["summary"])
    print(f"wall time {report['wall_seconds']:.0f} s")
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot({k: [RoundResult(**r) for r in v] for k, v in report["curves"].items()}, report["summary"], args.plot)
    return 0


def print_mean_of(paths: Sequence[Path], json_out: Path | None, plot_out: Path | None) -> int:
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: cannot read a benchmark --json file: {exc}") from None
    try:
        curves = mean_curves(reports, source=[str(p) for p in paths])
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--mean-of: {exc}") from None
    summary = summarize(curves)
    print(f"mean of {len(paths)} runs: {', '.join(str(p) for p in paths)}")
    print_table(curves, summary)
    def two_places(value: float | None) -> str:
        return "not reached" if value is None else f"{value:.2f}"

    print("per run: ratio / to all of random's labels: " + "; ".join(
        f"{two_places(r['summary']['ratio'])} / {two_places(r['summary']['ratio_to_random_final_labels'])}"
        for r in reports))
    if json_out:
        write_json({"mean_of": [str(p) for p in paths], "curves": {k: [asdict(r) for r in v] for k, v in curves.items()},
                    "summary": summary, "per_run_summary": [r["summary"] for r in reports]}, json_out)
    if plot_out:
        plot(curves, summary, plot_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
