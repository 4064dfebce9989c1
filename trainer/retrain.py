"""Retrain and gate: the next version from the base data plus the reviewed frames, promoted only if it earns it.

``retrain`` (``python -m trainer retrain``) holds out images neither model trains on, trains
the candidate with the trainer's own ``Trainer`` (optionally starting from the current
version's checkpoint), exports it with ``export_bundle``, evaluates both bundles' ONNX models
with ONNX Runtime on the same held-out images, and applies the gate rule (``gate_decision``):

- overall top-1 on the held-out images at least the current's, within ``--overall-tolerance``
  points (default 0.0) plus the noise of the paired comparison (``--overall-confidence``, default a
  one-sided 95% bound: 1.645 standard errors of the per-image difference between the two models), and
- top-1 on held-out reviewed frames (never trained on) strictly higher than the current's (and, with
  ``--reviewed-confidence`` above 0.5, by more than that one-sided bound of the comparison's noise, counted
  by item: a station's frames of one item are not independent evidence).

The decision is written beside the bundle (``gate.json``, plus a line in
``models/<name>/gate-log.jsonl``): ``central publish`` never publishes a rejected version and
``central rollout`` never sends one. A report (JSON and Markdown) gives the figures.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Iterable, Mapping, Sequence

from contract.broker import BrokerSettings
from contract.events import (
    RolloutError,
    make_event,
    manifest_sha256,
    publish_event_once,
    utc_now,
    write_gate,
    write_json_atomic,
)

log = logging.getLogger(__name__)

REPORT_SCHEMA = "retrain-report.v1"
REVIEWED_CSV = "reviewed.csv"             # what 'python -m central labels export' writes (central/review/labels.py)


class RetrainError(ValueError):
    """A retrain that cannot run as asked; the message names the file or flag."""


# ---------------------------------------------------------------- the rule (pure)

@dataclass(frozen=True)
class Score:
    """Top-1 of one model on one image set, as counts so that two models compare exactly."""

    correct: int
    images: int

    @property
    def top1(self) -> float:
        return self.correct / self.images if self.images else 0.0


@dataclass(frozen=True)
class Paired:
    """How two models' answers on the same images differ: what the candidate lost and gained.

    ``groups`` (optional) holds, per item the images show (frames of one item: ``item_key``), the candidate's net
    gain on it and its frame count. Frames of one item are decided alike, so they are not independent evidence:
    with groups the noise is the item-clustered one, without it every image is its own item.
    """

    lost: int       # the current right, the candidate wrong
    gained: int     # the current wrong, the candidate right
    groups: tuple[tuple[int, int], ...] = ()     # (net gain, frames) per item; empty: one item per image

    @classmethod
    def of(cls, truth: Sequence[str], current: Sequence[str], candidate: Sequence[str],
           groups: Sequence[Any] | None = None) -> "Paired":
        if not len(truth) == len(current) == len(candidate) or (groups is not None and len(groups) != len(truth)):
            raise ValueError("paired predictions must cover the same images")
        diffs = [(t == b) - (t == a) for t, a, b in zip(truth, current, candidate)]
        per_item: dict[Any, list[int]] = {}
        for key, d in zip(groups if groups is not None else (), diffs):   # none: one item per image, as counted
            net_frames = per_item.setdefault(key, [0, 0])
            net_frames[0] += d
            net_frames[1] += 1
        return cls(diffs.count(-1), diffs.count(1), tuple((net, n) for net, n in per_item.values()))

    @property
    def items(self) -> int | None:
        return len(self.groups) if self.groups else None

    def sign_p(self) -> float:
        """One-sided sign test over items: the chance that, among the items whose net gain is not zero, at least
        this many would gain were each as likely to gain as to lose (each image its own item without groups).
        The standard error alone is 0 for one item, or for a few items that all gained alike."""
        nets = [net for net, _ in self.groups] if self.groups else [1] * self.gained + [-1] * self.lost
        wins, n = sum(net > 0 for net in nets), sum(net != 0 for net in nets)
        return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n

    def standard_error_points(self, images: int) -> float:
        """Standard error of the paired top-1 difference, in points: the per-item net gains' spread around the
        mean gain (the cluster-robust sandwich, with every image its own item: the per-image differences' spread
        / sqrt n)."""
        if images == 0:
            return 0.0
        mean = (self.gained - self.lost) / images
        if self.groups:
            spread = sum((net - frames * mean) ** 2 for net, frames in self.groups)
        else:
            spread = (self.gained + self.lost) - images * mean * mean
        return 100.0 * math.sqrt(max(spread, 0.0)) / images


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reasons: list[str]
    noise: dict[str, Any] = field(default_factory=dict)    # the comparisons' standard errors (points), item count

    @property
    def decision(self) -> str:
        return "promoted" if self.promoted else "rejected"

    @property
    def summary(self) -> str:
        return f"{self.decision}: " + "; ".join(self.reasons)


def check_gate_settings(overall_tolerance_points: float, overall_confidence: float,
                        reviewed_confidence: float) -> None:
    """ValueError naming the flag for a gate setting out of range (checked before any training, and by the rule)."""
    if not (math.isfinite(overall_tolerance_points) and overall_tolerance_points >= 0):
        raise ValueError(f"--overall-tolerance: must be >= 0 points, got {overall_tolerance_points}")
    for flag, confidence in (("--overall-confidence", overall_confidence),
                             ("--reviewed-confidence", reviewed_confidence)):
        if not 0.5 <= confidence < 1.0:
            raise ValueError(f"{flag}: must be in [0.5, 1), got {confidence}")


def gate_decision(current_overall: Score, candidate_overall: Score, current_reviewed: Score,
                  candidate_reviewed: Score, *, overall_tolerance_points: float = 0.0,
                  overall_pairs: Paired | None = None, overall_confidence: float = 0.95,
                  reviewed_pairs: Paired | None = None, reviewed_confidence: float = 0.5) -> GateDecision:
    """Promote only if no worse overall (within the tolerance and the comparison's noise) AND better on the
    reviewed frames.

    Both models must have been scored on the same images (same counts). With ``overall_pairs`` (the two
    models' disagreements on those images) the candidate may also lose the one-sided ``overall_confidence``
    bound of the paired difference's noise: a retrain that changes a few hundred answers of ten thousand
    moves top-1 by a few tenths of a point by chance, and a gate below that noise rejects real improvements.

    On the reviewed frames the candidate must be right on more of them; with ``reviewed_pairs`` (by item) the
    reason also gives that comparison's noise, and a ``reviewed_confidence`` above 0.5 makes the gain clear its
    one-sided bound too (0.5, the default: more frames right is enough).
    """
    if current_overall.images != candidate_overall.images or current_reviewed.images != candidate_reviewed.images:
        raise ValueError("the gate compares two models on the same images; the image counts differ")
    check_gate_settings(overall_tolerance_points, overall_confidence, reviewed_confidence)
    overall_error = overall_pairs.standard_error_points(current_overall.images) if overall_pairs else None
    reviewed_error = reviewed_pairs.standard_error_points(current_reviewed.images) if reviewed_pairs else None
    reasons, ok = [], True
    if current_overall.images == 0:
        ok = False
        reasons.append("no held-out images to compare overall accuracy on")
    else:
        delta = (candidate_overall.correct - current_overall.correct) * 100.0 / current_overall.images
        z = NormalDist().inv_cdf(overall_confidence)
        allowed = overall_tolerance_points + (z * overall_error if overall_error is not None else 0.0)
        overall_ok = delta >= -allowed - 1e-9
        ok &= overall_ok
        how = (f"{allowed:.2f} = {overall_tolerance_points:.2f} + {z:.3f} x {overall_error:.2f} paired standard error"
               if overall_error is not None and z > 0 else f"{allowed:.2f}")
        reasons.append(f"overall top-1 {candidate_overall.top1:.2%} vs {current_overall.top1:.2%} "
                       f"({delta:+.2f} points; may lose at most {how}): " + ("ok" if overall_ok else "worse"))
    if current_reviewed.images == 0:
        ok = False
        reasons.append("no held-out reviewed frames, so 'better on the reviewed frames' cannot be shown "
                       "(more reviewed frames, or a larger --reviewed-holdout-fraction)")
    else:
        frames = current_reviewed.images
        delta = (candidate_reviewed.correct - current_reviewed.correct) * 100.0 / frames
        z = NormalDist().inv_cdf(reviewed_confidence)
        error = reviewed_error if reviewed_error is not None else 0.0
        reviewed_ok = candidate_reviewed.correct > current_reviewed.correct and delta > z * error + 1e-9
        # above 0.5 the gain must also not be a few items' luck: a standard error of 0 (one item, or a few that
        # all gained alike) would let a frame or two through
        sign_p = reviewed_pairs.sign_p() if reviewed_pairs and z > 0 else None
        reviewed_ok &= sign_p is None or sign_p <= 1.0 - reviewed_confidence + 1e-12
        ok &= reviewed_ok
        items = f", {reviewed_pairs.items} items" if reviewed_pairs and reviewed_pairs.items else ""
        spread = f"; paired standard error {error:.2f} points" if reviewed_error is not None else ""
        must = f"must be higher by more than {z:.3f} x {error:.2f}" if z > 0 else "must be higher"
        if sign_p is not None:
            must += f", and the items' sign test p {sign_p:.3f} at most {1 - reviewed_confidence:.3f}"
        reasons.append(f"reviewed frames top-1 {candidate_reviewed.top1:.2%} vs {current_reviewed.top1:.2%} "
                       f"on {frames} held-out frames{items} ({delta:+.2f} points{spread}; {must}): "
                       + ("ok" if reviewed_ok else "not better"))
    noise = {"overall_standard_error_points": round(overall_error, 4) if overall_error is not None else None,
             "reviewed_standard_error_points": round(reviewed_error, 4) if reviewed_error is not None else None,
             "reviewed_holdout_items": reviewed_pairs.items if reviewed_pairs else None,
             "reviewed_sign_p": round(reviewed_pairs.sign_p(), 6) if reviewed_pairs else None}
    return GateDecision(ok, reasons, noise)


def refuse_non_finite(decision: GateDecision, candidate: Mapping[str, "Evaluation"]) -> GateDecision:
    """``decision``, rejected where the candidate's logits held NaN or infinity on held-out images (``candidate``:
    its evaluations by side, overall and reviewed): counted wrong, they may still leave it ahead, and a station
    running it would get no class for such frames."""
    bad = [f"{e.non_finite_images} of {e.score.images} {side}" for side, e in candidate.items() if e.non_finite_images]
    if not bad:
        return decision
    return GateDecision(False, [*decision.reasons, "candidate gives non-finite logits (NaN or infinity) on "
                                + " and ".join(bad) + " held-out images: not deployable"], decision.noise)


# ---------------------------------------------------------------- configuration

@dataclass
class ExportSettings:
    models_dir: Path = Path("models")
    version: str | None = None
    calibration_images: int = 512
    calibration_method: str = "percentile"
    gate_margin_points: float = 1.0
    parity_images: int = 256
    tensorrt: str = "auto"
    sign_key: Path | None = None


@dataclass
class RetrainConfig:
    base_data: Path
    reviewed: Path
    current: Path
    report: Path
    train: Any                                   # TrainConfig; ``data`` is replaced by the combined dataset
    export: ExportSettings = field(default_factory=ExportSettings)
    name: str | None = None                      # default: the current bundle's name
    holdout: Path | None = None
    holdout_fraction: float = 0.1                # of the base data, when neither --holdout nor the current's split
    reviewed_holdout_fraction: float = 0.3
    overall_tolerance_points: float = 0.0
    overall_confidence: float = 0.95             # one-sided bound on the paired difference's noise (0.5: none)
    reviewed_confidence: float = 0.5             # the reviewed frames' gain must clear this bound (0.5: none)
    finetune_from_current: bool = False
    prefer_int8: bool = True                     # evaluate what a station runs (agent default)
    public_key: Path | None = None
    mqtt: BrokerSettings | None = None           # publish the gate event there


@dataclass
class RetrainResult:
    decision: GateDecision
    bundle_dir: Path
    report: dict[str, Any]
    report_json: Path
    report_md: Path


# ---------------------------------------------------------------- data

@dataclass(frozen=True)
class Item:
    path: Path
    label: str
    source: str                 # base | reviewed | holdout
    extra: dict[str, str] = field(default_factory=dict)


def _read_items(path: Path, source: str) -> tuple[list[Item], list[dict[str, str]]]:
    """Images and labels in any trainer layout, unreadable ones dropped and listed; no class-count rules
    (a reviewed set may hold a single class)."""
    from trainer import data as data_mod

    if path.is_dir() and (path / REVIEWED_CSV).is_file():
        path = path / REVIEWED_CSV           # a 'labels export' folder: its CSV carries the provenance columns
    layout = data_mod.detect_layout(path)
    scan = {"csv": data_mod.read_csv, "folders": data_mod.scan_class_folders,
            "prefixed": data_mod.scan_prefixed_files}[layout]
    dataset = data_mod.drop_unreadable(scan(path))
    extra = _csv_extra_columns(path) if layout == "csv" else {}
    items = [Item(s.path, dataset.classes[s.label], source, extra.get(str(s.path.resolve()), {}))
             for s in dataset.samples]
    return items, dataset.skipped


def _csv_extra_columns(csv_path: Path) -> dict[str, dict[str, str]]:
    """Provenance columns beside path,label (frame id, station, reviewer, ...), by resolved image path. Read as
    ``trainer.data.read_csv`` reads the file (utf-8-sig): with a spreadsheet's byte order mark the first column
    would be named "\\ufeffpath", every row would lose its columns, and the reviewed frames (their ``track``) would
    be split frame by frame, an item's frames on both sides of the gate."""
    out = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            rel = Path(row.get("path") or "")
            image = rel if rel.is_absolute() else csv_path.parent / rel
            out[str(image.resolve())] = {k: v for k, v in row.items() if k not in ("path", "label") and v}
    return out


def _split_items(items: Sequence[Item], groups: Sequence, fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(train, held out): ``trainer.data.grouped_split`` over the items' labels, each group wholly on one side."""
    from trainer.data import grouped_split

    if not items:
        return [], []
    index = {name: i for i, name in enumerate(sorted({i.label for i in items}))}
    train_idx, held_idx = grouped_split([index[i.label] for i in items], groups, fraction, seed)
    return [items[i] for i in train_idx], [items[i] for i in held_idx]


def _stratified(items: Sequence[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    return _split_items(items, range(len(items)), fraction, seed)


def item_key(item: Item) -> tuple[str, str]:
    """The item a frame shows: its track (the export's ``track`` column, the id the station's tracker gave it), or
    the frame itself when it has none."""
    track = item.extra.get("track")
    return ("track", track) if track else ("frame", str(item.path))


def reviewed_split(items: Sequence[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Reviewed frames (train, held out) by item (``item_key``): the frames of one item all on one side, so the
    gate's held-out frames show items the candidate never trained on."""
    return _split_items(items, [item_key(i) for i in items], fraction, seed)


def item_count(items: Sequence[Item]) -> int:
    """How many items the frames show (``item_key``)."""
    return len({item_key(i) for i in items})


def overall_holdout(cfg: RetrainConfig, current, base: list[Item], seed: int) -> tuple[list[Item], str, list[dict]]:
    """Images neither model trains on: --holdout, else the current version's validation split, else a
    seeded share of the base data (which the current version may have trained on: said in the report)."""
    if cfg.holdout is not None:
        items, skipped = _read_items(cfg.holdout, "holdout")
        return items, f"--holdout {cfg.holdout}", skipped
    provenance = current.manifest.get("provenance") or {}
    split_path = Path(provenance.get("run_dir") or "/nonexistent") / "split.json"
    if split_path.is_file():
        try:
            split = json.loads(split_path.read_text())
            root, classes = Path(split["root"]), split["classes"]
            # a label that is no class index (-1 read as the last class) would score the models on wrong labels
            bad = next(((rel, label) for rel, label in split["val"] if not isinstance(rel, str)
                        or type(label) is not int or not 0 <= label < len(classes)), None)
            if bad is not None:
                raise ValueError(f"row {list(bad)!r}; expected [path, class index 0..{len(classes) - 1}]")
            items = [Item(root / rel, classes[label], "holdout") for rel, label in split["val"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise RetrainError(f"{split_path}: not the current version's split ({type(exc).__name__}: {exc}); "
                               f"pass --holdout") from None
        present = [i for i in items if i.path.is_file()]
        if present:
            note = f"the current version's validation split ({split_path})"
            if len(present) < len(items):
                note += f"; {len(items) - len(present)} of its images are no longer on disk"
            return present, note, []
    _, held = _stratified(base, cfg.holdout_fraction, seed)
    return ([Item(i.path, i.label, "holdout") for i in held],
            f"a seeded {cfg.holdout_fraction:.0%} of --base-data (the current version's split is not available, "
            "so it may have trained on some of these images, which favours it)", [])


def write_training_csv(path: Path, items: Sequence[Item]) -> None:
    """The combined dataset in the trainer's CSV layout (absolute paths), plus where each row came from. A reviewed
    frame is the item crop a station sent: ``view=station`` trains it as it is; rendering it onto another surface
    as a station view would shrink the crop, its own surface included, into the middle of a new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "source", "view"])
        for item in items:
            writer.writerow([str(item.path.resolve()), item.label, item.source,
                             "station" if item.source == "reviewed" else "canvas"])
    tmp.replace(path)


# ---------------------------------------------------------------- models

def current_checkpoint(bundle, probe_inputs) -> Path:
    """The current version's training checkpoint, checked to be the one its ONNX model was exported from.

    Bundles hold ONNX models, not trainable weights; the manifest records the checkpoint it came from
    (``provenance.checkpoint``), which exists only on the machine (and while the run folder) it was
    trained on.
    """
    import numpy as np

    from contract.bundle import ROLE_FP32
    from trainer.engine import load_checkpoint_model, predict_logits
    from trainer.evaluate import onnx_logits

    manifest = bundle.root / "manifest.json"
    recorded = (bundle.manifest.get("provenance") or {}).get("checkpoint")
    if not recorded:
        raise RetrainError(f"{manifest}: field provenance/checkpoint: absent, so {bundle.name} {bundle.version} cannot "
                           "be fine-tuned from (bundles hold ONNX, not trainable weights); retrain without "
                           "--finetune-from-current (ImageNet start) or pass --weights PATH")
    path = Path(recorded)
    if not path.is_file():
        raise RetrainError(f"{path}: the checkpoint {bundle.name} {bundle.version} was exported from "
                           f"({manifest}: provenance/checkpoint) is not on this machine; bundles hold ONNX, not "
                           "trainable weights, so retrain without --finetune-from-current or pass --weights PATH")
    try:
        model, ckpt = load_checkpoint_model(path)
    except ValueError as exc:
        raise RetrainError(str(exc)) from exc
    # the model's own labels: a class enrolled into the bundle later is a row on its embedding, not in the checkpoint
    if ckpt["classes"] != bundle.model_labels or ckpt["config"].get("arch") != bundle.manifest.get("architecture"):
        raise RetrainError(f"{path}: classes or architecture differ from {manifest}; it is not this version's checkpoint")
    fp32 = bundle.artifact(ROLE_FP32)
    if fp32 is not None and len(probe_inputs):
        import torch

        torch_logits = predict_logits(model, torch.as_tensor(probe_inputs), torch.device("cpu")).numpy()
        diff = float(np.abs(torch_logits - onnx_logits(fp32.path, probe_inputs)).max())
        if diff > 1e-2:
            raise RetrainError(f"{path}: its outputs differ from {fp32.path} by up to {diff:.3g} on "
                               f"{len(probe_inputs)} images; it is not the checkpoint this version was exported from")
    return path


@dataclass
class Evaluation:
    score: Score
    macro_f1: float
    per_class_recall: dict[str, float]
    per_class_support: dict[str, int]
    artifact: str
    predictions: list[str | None]       # None: no class (the model's logits were not finite on that image)
    non_finite_images: int = 0          # images whose logits hold NaN or infinity: counted wrong


def evaluate_bundle(bundle, items: Sequence[Item], classes: Sequence[str], *, prefer_int8: bool = True,
                    workers: int = 2, chunk_images: int | None = None) -> Evaluation:
    """The bundle's deployable ONNX model in ONNX Runtime on ``items``, with the station's preprocessing, the images
    streamed ``chunk_images`` at a time (default ``trainer.evaluate.CHUNK_IMAGES``).

    Classes the bundle does not have (a class new in the reviewed frames) count as never predicted. An image whose
    logits hold NaN or infinity predicts no class (None) and counts as wrong, as in ``compute_metrics``: the argmax
    of a NaN row is its first column, and the gate scored such an image right whenever its label came first.
    """
    import numpy as np

    from trainer.data import Sample
    from trainer.evaluate import CHUNK_IMAGES, ImageFileInputs, compute_metrics, onnx_outputs

    artifact = bundle.pick_onnx(prefer_int8)
    if not items:
        return Evaluation(Score(0, 0), 0.0, {}, {}, artifact.path.name, [])
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(item.path, index[item.label]) for item in items]
    # read and preprocessed a chunk at a time, run batch by batch: the held-out set is never held whole
    x = ImageFileInputs(samples, bundle.input_spec, workers=workers, chunk=chunk_images or CHUNK_IMAGES,
                        desc=f"preprocess for {bundle.version}")
    outputs = onnx_outputs(artifact.path, x)
    # one logit per label of the bundle, as a station has them: the model's, then its enrolled classes'
    logits = (bundle.open_set.full_logits(outputs[0], outputs[1] if len(outputs) > 1 else None)
              if bundle.open_set is not None else outputs[0])
    full = np.full((len(items), len(classes)), -1e9)
    full[:, [index[label] for label in bundle.labels]] = logits
    truth = x.labels
    metrics = compute_metrics(full, truth, list(classes))
    finite = np.isfinite(full).all(axis=1)
    pred = np.where(finite, full.argmax(1), -1)          # -1: no class
    if not finite.all():
        log.warning("%s %s (%s): non-finite logits (NaN or infinity) on %d of %d images, counted wrong (e.g. %s)",
                    bundle.name, bundle.version, artifact.path.name, int((~finite).sum()), len(items),
                    [str(items[i].path) for i in np.flatnonzero(~finite)[:3]])
    present = [c for c, v in metrics["per_class"].items() if v["support"] > 0]
    return Evaluation(
        score=Score(int((pred == truth).sum()), len(items)),
        macro_f1=float(np.mean([metrics["per_class"][c]["f1"] for c in present])),
        per_class_recall={c: metrics["per_class"][c]["recall"] for c in present},
        per_class_support={c: metrics["per_class"][c]["support"] for c in present},
        artifact=artifact.path.name,
        predictions=[classes[i] if i >= 0 else None for i in pred],
        non_finite_images=int((~finite).sum()),
    )


# ---------------------------------------------------------------- the whole step

RECIPE_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "scale": (("augment", "scale"),),
    "hflip": (("augment", "hflip"),),
    "plain_rotation": (("augment", "rotation"),),
    "rotation": (("augment", "station_view", "rotation"),),
    "jitter": (("augment", "brightness"), ("augment", "contrast"), ("augment", "saturation")),
    "erasing": (("augment", "erasing"),),
    "station_view_share": (("augment", "station_view", "share"),),
    "label_smoothing": (("label_smoothing",),),
}
"""The training recipe a retrain may leave open (``trainer train`` option -> its places in the config dict):
fine-tuning takes the current run's, so the next version learns under the augmentation its weights were
trained for; otherwise the training defaults."""


def _get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def open_recipe(train: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``train`` (a config dict) with the recipe options ``names`` (``RECIPE_FIELDS`` keys) left open (None)."""
    out = json.loads(json.dumps(train))
    for name in names:
        for path in RECIPE_FIELDS[name]:
            _set_path(out, path, None)
    return out


def checkpoint_config(path: str | Path) -> dict[str, Any] | None:
    """The training config a checkpoint of ours records; None when it records none."""
    import torch

    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    return config if isinstance(config, dict) else None


def recorded_config(bundle) -> dict[str, Any] | None:
    """The training config of the run a bundle was exported from, where its checkpoint
    (``provenance.checkpoint``) is on this machine and readable; None otherwise (the recipe then falls back to
    the training defaults)."""
    recorded = (bundle.manifest.get("provenance") or {}).get("checkpoint")
    if not recorded or not Path(recorded).is_file():
        return None
    try:
        return checkpoint_config(recorded)
    except Exception as exc:  # noqa: BLE001 -- an unreadable checkpoint only costs the recipe, said in the log
        log.warning("%s: cannot read its training config (%s); the recipe is the training defaults", recorded, exc)
        return None


def resolve_train_config(cfg_train, current, *, weights: str | None, current_config: Mapping[str, Any] | None = None):
    """Fill what the user left open from the current version: architecture and input (the next
    version of the same model), weights (ImageNet, or the current's checkpoint when fine-tuning), the
    learning rate (``FINETUNE_LR`` when fine-tuning, else training's) and the recipe (``RECIPE_FIELDS``: the
    current run's ``current_config`` where it is known, else the training defaults)."""
    from trainer.config import TrainConfig

    defaults = TrainConfig(data="").to_dict()
    spec = current.input_spec
    arch = cfg_train.get("arch") or current.manifest.get("architecture")
    if cfg_train.get("arch") and weights and cfg_train["arch"] != current.manifest.get("architecture"):
        raise RetrainError(f"--arch {cfg_train['arch']}: --finetune-from-current needs the current's architecture "
                           f"{current.manifest.get('architecture')}")
    out = json.loads(json.dumps(cfg_train))
    out["arch"] = arch
    if out.get("lr") is None:
        out["lr"] = FINETUNE_LR if weights else OPEN_FIELDS["lr"]
    for paths in RECIPE_FIELDS.values():
        for path in paths:
            if _get_path(out, path) is None:
                inherited = _get_path(current_config, path) if current_config else None
                _set_path(out, path, inherited if inherited is not None else _get_path(defaults, path))
    if not out.get("image_size"):
        out["image_size"] = spec.height
        out["resize_shorter"] = out.get("resize_shorter") or spec.resize_shorter
        out["interpolation"] = out.get("interpolation") or spec.interpolation
    out["interpolation"] = out.get("interpolation") or "bilinear"
    if weights:
        if out.get("weights") not in (None, "imagenet"):
            raise RetrainError("--weights and --finetune-from-current both name the starting weights; pass one")
        out["weights"] = weights
    else:
        out["weights"] = out.get("weights") or "imagenet"
    return out


def check_signing(sign_key: Path | None, public_key) -> None:
    """RetrainError, before any training, where the candidate could not be signed, or would fail its own
    verification against ``public_key`` (the loaded ``--public-key``) after hours of training and its export: a
    ``--sign-key`` that cannot be read or is no unencrypted ed25519 private key, one that is not the private half of
    ``--public-key``, or none where ``--public-key`` is given (the candidate is verified with it, and an unsigned
    bundle is refused)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from trainer.signing import check_private_key

    if sign_key is None:
        if public_key is not None:
            raise RetrainError("--public-key given without --sign-key: the candidate is verified with that key, and "
                               "an unsigned one is refused (after training); pass the private key as --sign-key")
        return
    try:
        key = check_private_key(sign_key, "--sign-key")
    except ValueError as exc:
        raise RetrainError(str(exc)) from None
    if public_key is not None:
        raw = (Encoding.Raw, PublicFormat.Raw)
        if key.public_key().public_bytes(*raw) != public_key.public_bytes(*raw):
            raise RetrainError(f"--sign-key {sign_key}: not the private key of --public-key; the candidate would "
                               "fail its verification with it (after training)")


def retrain(cfg: RetrainConfig) -> RetrainResult:
    """Train, export, evaluate both, decide, record; see the module docstring."""
    from contract.bundle import BundleError, check_name_version, load_bundle, load_public_key
    from trainer.config import TrainConfig
    from trainer.data import spread
    from trainer.engine import Trainer, eval_inputs
    from trainer.export.bundle import ExportConfig, export_bundle
    from trainer.export.quantize import QuantizeConfig

    started = time.perf_counter()
    try:
        check_gate_settings(cfg.overall_tolerance_points, cfg.overall_confidence, cfg.reviewed_confidence)
        check_name_version(cfg.name or "x", cfg.export.version)  # before training, not at the export's end
    except ValueError as exc:
        raise RetrainError(str(exc)) from None
    for flag, fraction in (("--holdout-fraction", cfg.holdout_fraction),
                           ("--reviewed-holdout-fraction", cfg.reviewed_holdout_fraction)):
        if not (isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0):
            raise RetrainError(f"{flag}: expected a share in (0, 1), got {fraction!r}")
    key = load_public_key(cfg.public_key) if cfg.public_key else None
    check_signing(cfg.export.sign_key, key)
    try:
        current = load_bundle(cfg.current, key)
    except BundleError as exc:
        raise RetrainError(f"--current: {exc}") from exc
    train = dict(cfg.train) if isinstance(cfg.train, dict) else cfg.train.to_dict()
    seed = int(train.get("seed") or 0)
    name = cfg.name or current.name
    version = cfg.export.version or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if name == current.name and version == current.version:
        raise RetrainError(f"--version {version}: that is the current version; the next one needs another")
    if (Path(cfg.export.models_dir) / name / version).exists():
        raise RetrainError(f"{Path(cfg.export.models_dir) / name / version}: bundle version already exists; "
                           "pass another --version")
    run_dir = Path(train.get("out_dir") or "runs") / f"{name}-{version}"
    if (run_dir / "last.pt").exists():
        raise RetrainError(f"{run_dir}: already holds a training run; pass another --version")

    augment = train.get("augment") or {}
    augment = augment if isinstance(augment, dict) else augment.to_dict()
    backgrounds = backgrounds_info((augment.get("station_view") or {}).get("backgrounds"))
    base, base_skipped = _read_items(cfg.base_data, "base")
    if train.get("limit_per_class"):
        base = _limit(base, int(train["limit_per_class"]), seed)
    reviewed, reviewed_skipped = _read_items(cfg.reviewed, "reviewed")
    if not reviewed:
        raise RetrainError(f"--reviewed {cfg.reviewed}: no readable reviewed frames")
    holdout, holdout_source, holdout_skipped = overall_holdout(cfg, current, base, seed)
    held = {str(i.path.resolve()) for i in holdout}
    base_train = [i for i in base if str(i.path.resolve()) not in held]
    reviewed_train, reviewed_held = reviewed_split(reviewed, cfg.reviewed_holdout_fraction, seed)
    reviewed_train = [i for i in reviewed_train if str(i.path.resolve()) not in held]
    _refuse_dropping_enrolled(cfg, current, base_train + reviewed_train)
    classes = sorted({i.label for i in base_train + reviewed_train} | set(current.labels)
                     | {i.label for i in holdout + reviewed_held})

    weights = None
    if cfg.finetune_from_current:
        pool = holdout or reviewed_held         # 16 drawn over every class (the list is by class)
        probe = [pool[i] for i in spread(len(pool), 16)]
        probe_x = eval_inputs([_sample(i, classes) for i in probe], current.input_spec, 0, desc="checkpoint probe")[0]
        weights = str(current_checkpoint(current, probe_x.numpy()))
    resolved = resolve_train_config(train, current, weights=weights,
                                    current_config=checkpoint_config(weights) if weights else recorded_config(current))
    run_dir.mkdir(parents=True, exist_ok=True)
    data_csv = run_dir / "retrain-data.csv"
    write_training_csv(data_csv, base_train + reviewed_train)
    resolved.update(data=str(data_csv), name=run_dir.name, out_dir=str(run_dir.parent), limit_per_class=None)
    train_cfg = TrainConfig(**resolved)
    log.info("training %s %s on %d base + %d reviewed images (%s)", name, version, len(base_train),
             len(reviewed_train), f"from {weights}" if weights else f"from {train_cfg.weights}")
    workers = train_cfg.workers
    # the current bundle first: a bundle it cannot be scored on fails here, before a candidate version exists
    current_ev = {"overall": evaluate_bundle(current, holdout, classes, prefer_int8=cfg.prefer_int8, workers=workers),
                  "reviewed": evaluate_bundle(current, reviewed_held, classes, prefer_int8=cfg.prefer_int8,
                                              workers=workers)}
    fit = Trainer(train_cfg, run_dir).fit()
    e = cfg.export
    exported = export_bundle(ExportConfig(
        checkpoint=run_dir / "best.pt", models_dir=e.models_dir, name=name, version=version,
        parity_images=e.parity_images, gate_margin_points=e.gate_margin_points, tensorrt=e.tensorrt,
        quantize=QuantizeConfig(calibration_images=e.calibration_images, method=e.calibration_method),
        sign_key=e.sign_key, workers=train_cfg.workers))
    try:
        candidate = load_bundle(exported.bundle_dir, key)
        ev = {"current": current_ev,
              "candidate": {"overall": evaluate_bundle(candidate, holdout, classes, prefer_int8=cfg.prefer_int8,
                                                       workers=workers),
                            "reviewed": evaluate_bundle(candidate, reviewed_held, classes,
                                                        prefer_int8=cfg.prefer_int8, workers=workers)}}
    except BaseException:       # no gate record could be written: the half-judged version goes, its number is free
        shutil.rmtree(exported.bundle_dir, ignore_errors=True)
        raise
    decision = gate_decision(ev["current"]["overall"].score, ev["candidate"]["overall"].score,
                             ev["current"]["reviewed"].score, ev["candidate"]["reviewed"].score,
                             overall_tolerance_points=cfg.overall_tolerance_points,
                             overall_pairs=Paired.of([i.label for i in holdout], ev["current"]["overall"].predictions,
                                                     ev["candidate"]["overall"].predictions),
                             overall_confidence=cfg.overall_confidence,
                             reviewed_pairs=Paired.of([i.label for i in reviewed_held],
                                                      ev["current"]["reviewed"].predictions,
                                                      ev["candidate"]["reviewed"].predictions,
                                                      [item_key(i) for i in reviewed_held]),
                             reviewed_confidence=cfg.reviewed_confidence)
    decision = refuse_non_finite(decision, ev["candidate"])
    report = build_report(cfg, current, candidate, decision, ev, holdout=holdout, holdout_source=holdout_source,
                          reviewed=reviewed, reviewed_train=reviewed_train, reviewed_held=reviewed_held,
                          base_train=base_train, skipped=base_skipped + reviewed_skipped + holdout_skipped,
                          run_dir=run_dir, weights=weights, train_cfg=train_cfg, fit=fit,
                          seconds=time.perf_counter() - started, backgrounds=backgrounds)
    write_gate(candidate.root, {
        "decision": decision.decision, "name": name, "version": version,
        "manifest_sha256": manifest_sha256(candidate.root), "reason": decision.summary,
        "current": {"name": current.name, "version": current.version}, "report": str(cfg.report),
        "figures": report["figures_short"], "ts": utc_now()})
    write_json_atomic(run_dir / "reviewed-split.json", {
        "seed": seed, "fraction": cfg.reviewed_holdout_fraction,
        "train": [_row(i) for i in reviewed_train], "holdout": [_row(i) for i in reviewed_held]})
    report_json, report_md = write_report(cfg.report, report)
    publish_event_once(cfg.mqtt, make_event("gate", {"name": name, "version": version}, ok=decision.promoted,
                                            reason=decision.summary, figures=report["figures_short"]))
    log.info("%s %s %s", name, version, decision.summary)
    return RetrainResult(decision, candidate.root, report, report_json, report_md)


def _refuse_dropping_enrolled(cfg: RetrainConfig, current, train_items: Sequence[Item]) -> None:
    """RetrainError naming the classes enrolled into the current version (``trainer enroll``) that no training image
    shows: the candidate would be trained without them, and neither held-out set has their images (the current
    run's split predates them), so the gate could not see them go and stations would lose the products."""
    enrolled = current.labels[len(current.model_labels):]
    trained = {item.label for item in train_items}
    missing = [label for label in enrolled if label not in trained]
    if missing:
        raise RetrainError(f"--current {cfg.current}: enrolled class(es) {', '.join(map(repr, missing))} have no "
                           f"training images in --base-data {cfg.base_data} or --reviewed {cfg.reviewed} (beyond "
                           "its held-out share); the new version would not know them and the gate could not see it: "
                           "add their images (a class folder, or the review page's frames of them: python -m "
                           "central labels export)")


def backgrounds_info(folder: str | None) -> dict[str, Any] | None:
    """What ``--backgrounds`` gave the station views (for the report): the folder, its images, and the
    cameras they came from when ``central backgrounds export`` wrote it. Checked before any training, so a
    wrong folder stops the run at once."""
    if not folder:
        return None
    from trainer.backgrounds import BACKGROUND_EXTENSIONS

    path = Path(folder)
    if not path.is_dir():
        raise RetrainError(f"--backgrounds {folder}: not a folder")
    images = sum(1 for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BACKGROUND_EXTENSIONS)
    if not images:
        raise RetrainError(f"--backgrounds {folder}: no {'/'.join(sorted(BACKGROUND_EXTENSIONS))} images in it")
    info: dict[str, Any] = {"folder": str(path.resolve()), "images": images}
    summary = path / "backgrounds.json"
    if summary.is_file():
        try:
            info["by_camera"] = json.loads(summary.read_text()).get("by_camera")
        except ValueError:
            pass
    return info


def _sample(item: Item, classes: Sequence[str]):
    from trainer.data import Sample

    return Sample(item.path, list(classes).index(item.label))


def _limit(items: list[Item], limit: int, seed: int) -> list[Item]:
    import random

    by_label: dict[str, list[Item]] = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    rng = random.Random(seed)
    kept = []
    for label in sorted(by_label):
        group = by_label[label]
        kept.extend(rng.sample(group, min(limit, len(group))))
    return sorted(kept, key=lambda i: str(i.path))


def _row(item: Item) -> dict[str, Any]:
    return {"path": str(item.path), "label": item.label, **item.extra}


def _counts(items: Sequence[Item]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item.label] = out.get(item.label, 0) + 1
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- report

def _figures(e: Evaluation) -> dict[str, Any]:
    return {"top1": round(e.score.top1, 6), "correct": e.score.correct, "images": e.score.images,
            "macro_f1": round(e.macro_f1, 6), "per_class_recall": {c: round(v, 6) for c, v in e.per_class_recall.items()},
            "artifact": e.artifact, "non_finite_images": e.non_finite_images}


def build_report(cfg: RetrainConfig, current, candidate, decision: GateDecision, ev: dict, *, holdout, holdout_source,
                 reviewed, reviewed_train, reviewed_held, base_train, skipped, run_dir, weights, train_cfg, fit,
                 seconds, backgrounds=None) -> dict[str, Any]:
    figures = {side: {who: _figures(ev[who][side]) for who in ("current", "candidate")}
               for side in ("overall", "reviewed")}
    short = {
        "current_version": current.version,
        "overall_top1": {"current": figures["overall"]["current"]["top1"],
                         "candidate": figures["overall"]["candidate"]["top1"]},
        "overall_macro_f1": {"current": figures["overall"]["current"]["macro_f1"],
                             "candidate": figures["overall"]["candidate"]["macro_f1"]},
        "reviewed_top1": {"current": figures["reviewed"]["current"]["top1"],
                          "candidate": figures["reviewed"]["candidate"]["top1"]},
        "holdout_images": len(holdout), "reviewed_holdout_frames": len(reviewed_held),
        "overall_tolerance_points": cfg.overall_tolerance_points,
        "overall_confidence": cfg.overall_confidence,
        "reviewed_confidence": cfg.reviewed_confidence,
        **decision.noise,
    }
    return {
        "schema": REPORT_SCHEMA,
        "decision": decision.decision,
        "promoted": decision.promoted,
        "reasons": decision.reasons,
        "rule": ("promoted only if overall top-1 on the held-out images is at least the current's minus "
                 f"{cfg.overall_tolerance_points:.2f} points and minus the one-sided {cfg.overall_confidence:.0%} bound "
                 "of the paired difference's noise, AND top-1 on the held-out reviewed frames is higher"
                 + (f" by more than the one-sided {cfg.reviewed_confidence:.0%} bound of its noise (by item)"
                    if cfg.reviewed_confidence > 0.5 else "")),
        "current": {"name": current.name, "version": current.version, "bundle": str(current.root)},
        "candidate": {"name": candidate.name, "version": candidate.version, "bundle": str(candidate.root),
                      "manifest_sha256": manifest_sha256(candidate.root)},
        "figures": figures,
        "figures_short": short,
        "data": {
            "holdout": {"source": holdout_source, "images": len(holdout), "per_class": _counts(holdout)},
            "reviewed": {"source": str(cfg.reviewed), "frames": len(reviewed), "train": len(reviewed_train),
                         "holdout": len(reviewed_held), "holdout_fraction": cfg.reviewed_holdout_fraction,
                         "items": item_count(reviewed), "train_items": item_count(reviewed_train),
                         "holdout_items": item_count(reviewed_held), "split_by": "item",
                         "seed": train_cfg.seed, "per_class_train": _counts(reviewed_train),
                         "per_class_holdout": _counts(reviewed_held), "split_file": str(run_dir / "reviewed-split.json")},
            "base": {"source": str(cfg.base_data), "train_images": len(base_train), "per_class": _counts(base_train)},
            "skipped_images": skipped,
            "backgrounds": backgrounds,
        },
        "training": {"run_dir": str(run_dir), "dataset_csv": str(run_dir / "retrain-data.csv"),
                     "start": weights or train_cfg.weights, "finetuned_from_current": weights is not None,
                     "epochs_run": fit.epochs_run, "best_epoch": fit.best_epoch,
                     "config": train_cfg.to_dict()},
        "evaluated_with": "ONNX Runtime (CPU) on each bundle's deployable ONNX model, station preprocessing",
        "seconds": round(seconds, 1),
        "ts": utc_now(),
    }


def render_markdown(report: dict[str, Any]) -> str:
    f, d = report["figures"], report["data"]
    cur, cand = report["current"], report["candidate"]
    lines = [f"# Retrain gate: {cand['name']} {cand['version']} **{report['decision'].upper()}**", "",
             f"Current: {cur['name']} {cur['version']}. Rule: {report['rule']}.", ""]
    lines += [f"- {r}" for r in report["reasons"]]
    lines += ["", "| | current | candidate |", "|---|---|---|"]

    def pct(x: float) -> str:
        return f"{x * 100:.2f}%"

    o, r = f["overall"], f["reviewed"]
    lines += [f"| overall top-1 ({d['holdout']['images']} held-out images) | {pct(o['current']['top1'])} | "
              f"{pct(o['candidate']['top1'])} |",
              f"| overall macro-F1 | {o['current']['macro_f1']:.4f} | {o['candidate']['macro_f1']:.4f} |",
              f"| reviewed frames top-1 ({d['reviewed']['holdout']} held out) | {pct(r['current']['top1'])} | "
              f"{pct(r['candidate']['top1'])} |",
              f"| ONNX model evaluated | {o['current']['artifact']} | {o['candidate']['artifact']} |", "",
              "Per-class recall on the held-out images:", "", "| class | images | current | candidate |",
              "|---|---|---|---|"]
    for c, n in d["holdout"]["per_class"].items():
        lines.append(f"| {c} | {n} | {pct(o['current']['per_class_recall'].get(c, 0.0))} | "
                     f"{pct(o['candidate']['per_class_recall'].get(c, 0.0))} |")
    t = report["training"]
    lines += ["", f"Held-out images: {d['holdout']['source']}.",
              f"Reviewed frames: {d['reviewed']['frames']} from {d['reviewed']['source']}; {d['reviewed']['train']} "
              f"trained on, {d['reviewed']['holdout']} held out; split by item, {d['reviewed']['train_items']} "
              f"items trained on and {d['reviewed']['holdout_items']} others held out (a frame without a track is "
              f"an item of its own; stratified by label, seed {d['reviewed']['seed']}, listed in "
              f"{d['reviewed']['split_file']}).",
              f"Training: {d['base']['train_images']} base + {d['reviewed']['train']} reviewed images, started from "
              f"{t['start']}, {t['epochs_run']} epoch(s), run folder {t['run_dir']}.",
              f"Skipped unreadable images: {len(d['skipped_images'])}. Took {report['seconds']:.0f} s."]
    if d.get("backgrounds"):
        b = d["backgrounds"]
        lines.insert(-1, f"Station-view backgrounds: {b['images']} image(s) from {b['folder']}"
                         + (f" ({', '.join(b['by_camera'])})." if b.get("by_camera") else "."))
    return "\n".join(lines) + "\n"


def write_report(path: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    path = Path(path)
    json_path = path if path.suffix == ".json" else path.with_suffix(".json")
    md_path = json_path.with_suffix(".md")
    write_json_atomic(json_path, report)
    tmp = md_path.with_name(f".{md_path.name}.tmp")
    tmp.write_text(render_markdown(report))
    tmp.replace(md_path)
    return json_path, md_path


def train_settings(**overrides: Any) -> dict[str, Any]:
    """TrainConfig fields for ``RetrainConfig.train``; arch, input and weights left None come from the current."""
    from trainer.config import TrainConfig

    out = open_recipe(TrainConfig(data="").to_dict(), RECIPE_FIELDS)
    out.update({k: None for k in OPEN_FIELDS}, name=None, resize_shorter=None)
    out.update(overrides)
    return out


OPEN_FIELDS = {"arch": "resnet50", "image_size": 224, "weights": "imagenet", "interpolation": "bilinear", "lr": 1e-3}
FINETUNE_LR = 1e-4
"""The learning rate left open with --finetune-from-current: a tenth of training's. The current model has
converged (its schedule ended near zero); at the training rate, 2 epochs on a tenth of the base data lost
2.6 points of it and the gate refused the round, at this rate they lost 0.2 (within the noise) while the
reviewed frames gained 12 points (docs/notes/benchmark-history.md, the retraining loop)."""


__all__ = ["RetrainConfig", "RetrainError", "RetrainResult", "Score", "GateDecision", "gate_decision", "retrain",
           "train_settings", "evaluate_bundle", "current_checkpoint", "render_markdown", "RolloutError"]
