"""A new product from a few examples: one more class in a bundle, without training the backbone (docs/enrol.md).

The bundle's model gives an embedding beside its logits. An enrolled class is one more classifier row on that
embedding (``contract.openset.EnrolledHead``): its logit is computed in numpy and appended to the model's, so the
ONNX models and TensorRT engines of the bundle serve unchanged, byte for byte. The row is imprinted from the
examples' mean in whitened embedding space (scaled like the model's own rows), then fitted by gradient descent on
softmax cross-entropy over [old logits, new logit] with the examples (and their mirror images, for a model trained
with flips) and half of the gate images (labelled images of the old classes), pulled lightly towards the imprint.
Its bias is then set at the cap: the largest at which the gate images lose at most ``CAP_SHARE`` of
``max_drop_points`` of accuracy to the new class. The gate: the old classes' accuracy on the half the row was not
fitted on may drop by at most ``max_drop_points``, else nothing is written; where the bundle has a deployable INT8
model (what a station with VNNI runs, and INT8 TensorRT engines are built from), the same holds for the old classes'
accuracy on it, the row's logit computed from the INT8 model's embedding as such a station computes it. Classes
enrolled before are old classes too: without gate images of them the enrolment is refused (the run's validation
split has none).

One enrolment at a time per models folder: an enrolment that writes holds ``<models dir>/.enrol.lock`` (``flock``,
``models_dir_lock``) from loading the version it builds on until its version is in place, whether it runs from the
CLI or from a review server's page; a second one is refused at once, naming the lock file (two enrolments onto one
version: the chain follows one of them and the other's class is lost). The new version is verified with the key the
stations check it with (``--public-key``, else the public half of ``--sign-key``) before it is reported enrolled.

Torch-free (numpy, OpenCV, ONNX Runtime and ``contract``) so the central side can enrol from reviewed frames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from contract import openset
from contract.bundle import (
    MANIFEST,
    ROLE_FP32,
    ROLE_INT8,
    ROLE_OPEN_SET,
    SIGNATURE,
    Bundle,
    BundleError,
    artifact_entry,
    check_model_runs,
    check_name_version,
    load_bundle,
    load_public_key,
    partial_dir,
    sweep_partials,
)
from contract.dataset import class_name_problem, is_sample_image
from contract.messages import dumps_finite
from contract.preprocess import ImageDecodeError, Preprocessor, read_image
from trainer.evaluate import ChainedInputs, ModelInputs, input_batches

log = logging.getLogger(__name__)

FIT_STEPS = 300
FIT_L2 = 5e-4            # pull of the fitted row towards the imprinted one (on unit-scale embeddings); 0.05 kept
#                          the row so near the imprint that most of what the examples teach went unused
#                          (docs/notes/benchmark-history.md, "Enrolment fitted, not imprinted")
CAP_SHARE = 0.4          # the bias is set where the gate images lose this share of max_drop_points
ALLOWANCE_CURVE = (0.5, 1.0, 2.0, 5.0)   # allowances (points) the report also gives recall and loss at: for a
#                          product like a trained one the allowance decides the recall more than the examples do
#                          (docs/enrol.md, "How much to allow")
BATCH = 256
MAX_FIT_EXAMPLES = 256   # examples the row is fitted on (more: that many, evenly spread): a fit costs FIT_STEPS x
#                          (views + gate images / 2)^2, and the review page hands over every frame of a class; 256
#                          keeps the 250 examples of docs/notes/benchmark-history.md ("The allowance binds") whole
LOO_FOLDS = 20           # up to this many fitted examples, leave-one-out; more: this many folds, each example decided
#                          by a row fitted without its fold. One fit per example took 300 examples to 95 s
MIN_GATE_ROWS_ENROLLED = 2   # gate images of each class enrolled before: one in each half (fit and gate)
LOCK_FILE = ".enrol.lock"    # in the models folder: held by the enrolment writing into it (CLI or review server)


class EnrolError(ValueError):
    """An enrolment that cannot be done or did not pass its gate; the message names the file or field and what
    was wrong. ``report`` holds the figures when the gate refused it (else None)."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


class EnrolBusy(EnrolError):
    """Another enrolment (another process, or another thread of this one) holds the models folder's lock."""


@dataclass
class EnrolConfig:
    bundle: Path
    label: str
    images: Path | list[Path]          # a folder of images, or the files (what the station sees: item crops)
    models_dir: Path | None = None     # default: the bundle's own models dir (bundle.root.parent.parent)
    version: str | None = None         # default: a UTC timestamp
    sign_key: Path | None = None
    public_key: Path | None = None     # verify the source bundle's signature
    unsigned: bool = False             # from a signed source, an unsigned version on purpose (--unsigned): stations
    #                                    configured with a public key refuse it; without, such an enrolment is refused
    gate_data: Path | None = None      # labelled images of the old classes (class folders); default: the validation
    #                                    rows of the run named in the bundle's provenance (run_dir/split.json)
    gate_images: int = 2000
    max_drop_points: float = 0.5
    min_examples: int = 5
    seed: int = 0
    mirror: bool | None = None         # fit on the examples' mirror images too; None: when the bundle's model was
    #                                    trained with flips (provenance.training_config.augment.hflip > 0)
    dry_run: bool = False              # measure and report only: no version written, a failed gate not raised
    enrolled_gate: Mapping[str, Sequence[Path]] | None = None   # images of classes enrolled before (label -> files),
    #                                    gate images of their class beside gate_data's: the run's validation split has
    #                                    none of them (the review page passes the frames reviewed as them)


@dataclass
class EnrolResult:
    bundle_dir: Path | None            # None for a dry run
    manifest: dict | None
    report: dict = field(default_factory=dict)


# ---------------------------------------------------------------- inputs

def _source_bundle(cfg: EnrolConfig) -> Bundle:
    try:
        bundle = load_bundle(cfg.bundle, load_public_key(cfg.public_key) if cfg.public_key else None)
        check_model_runs(bundle)
    except BundleError as exc:
        raise EnrolError(f"source bundle: {exc}") from exc
    where = bundle.root / MANIFEST
    if bundle.open_set is None or bundle.open_set.stats is None:
        raise EnrolError(f"{where}: no field open_set (the model's embedding and class statistics): enrolment needs "
                         f"them; export the bundle again with this version (python -m trainer export)")
    label = cfg.label.strip() if isinstance(cfg.label, str) else cfg.label
    if not label or label != cfg.label:
        raise EnrolError(f"--class: expected a non-empty label without surrounding spaces, got {cfg.label!r}")
    problem = class_name_problem(label)     # published in every decision of a station: the dataset's rule
    if problem is not None:
        raise EnrolError(f"--class: {label[:80]!r} {problem}")
    if label in bundle.labels or label == openset.UNKNOWN_LABEL:
        raise EnrolError(f"{where}: field labels already has {label!r}" if label in bundle.labels
                         else f"--class: {label!r} is the unknown verdict, not a product")
    if bundle.artifact(ROLE_FP32) is None:
        raise EnrolError(f"{where}: no FP32 ONNX model to compute embeddings with")
    _refuse_rejected(bundle)
    return bundle


def _refuse_rejected(bundle: Bundle) -> None:
    """EnrolError for a source the retrain gate rejected (its gate.json, or a line of the model's gate log for
    this manifest), as ``central publish`` refuses it: the enrolled version links the same model files and gets a
    promoted gate record of its own, so it would publish the rejected models."""
    from contract.events import RolloutError, manifest_sha256, read_gate, rejected_in_log

    try:
        gate = read_gate(bundle.root)
        logged = rejected_in_log(bundle.root, manifest_sha256(bundle.root))
    except (RolloutError, OSError) as exc:
        raise EnrolError(f"source bundle {bundle.root}: its gate record cannot be read ({exc})") from None
    rejection = gate if gate is not None and gate["decision"] == "rejected" else logged
    if rejection is not None:
        why = str(rejection.get("reason") or "see its retrain report")[:300]
        raise EnrolError(f"source bundle {bundle.root}: rejected by the retrain gate ({why}); a rejected version is "
                         f"never published, nor a class enrolled onto it: enrol onto a promoted version")


def image_files(images: Path | Sequence[Path]) -> list[Path]:
    """The example images: the image files of a folder (sorted), or the given files."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise EnrolError(f"{folder}: not a folder of images")
        return sorted(p for p in folder.iterdir() if is_sample_image(p))
    return [Path(p) for p in images]


class ImageStream:
    """The preprocessed inputs of image files (``trainer.evaluate.ModelInputs``), read ``BATCH`` readable ones at a
    time on each pass, never all at once: the review page hands over every frame of a class, and the gate reads up
    to ``gate_images`` (2,000 at 224 px: 1.2 GB held at once before). A pass records the files that read (``kept``:
    their indices) and a line per one that did not (``bad``); ``mirrored()`` passes over the kept ones, mirrored."""

    def __init__(self, paths: Sequence[Path], pre: Preprocessor) -> None:
        self.paths = list(paths)
        self.pre = pre
        self.kept: list[int] = []
        self.bad: list[str] = []

    def __len__(self) -> int:          # the files; the rows a pass gives are those that read (``kept``)
        return len(self.paths)

    def chunks(self) -> Iterator[np.ndarray]:
        self.kept, self.bad = [], []
        batch = []
        for i, path in enumerate(self.paths):
            try:
                batch.append(self.pre(read_image(path)))
            except (ImageDecodeError, ValueError) as exc:
                self.bad.append(str(exc))
                continue
            self.kept.append(i)
            if len(batch) == BATCH:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    def mirrored(self) -> "MirroredImages":
        return MirroredImages(self)


class MirroredImages:
    """The mirror images (NCHW: the width reversed) of the files an ``ImageStream`` pass read, in its order."""

    def __init__(self, stream: ImageStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream.kept)

    def chunks(self) -> Iterator[np.ndarray]:
        batch = []
        for i in list(self.stream.kept):
            path = self.stream.paths[i]
            try:
                batch.append(np.ascontiguousarray(self.stream.pre(read_image(path))[..., ::-1]))
            except (ImageDecodeError, ValueError) as exc:
                raise EnrolError(f"{path}: read a moment ago, unreadable now ({exc}); was it changed? Run the "
                                 "enrolment again") from None
            if len(batch) == BATCH:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)


def _resolve(path: str, bases: Sequence[Path]) -> Path | None:
    p = Path(path)
    if p.is_absolute():
        return p if p.exists() else None
    return next((b / p for b in bases if (b / p).exists()), None)


def _split_gate_rows(bundle: Bundle) -> tuple[list[Path], list[int], str]:
    """Validation rows of the run the bundle was exported from (labels index the model's labels)."""
    run_dir = bundle.manifest.get("provenance", {}).get("run_dir")
    hint = "pass --gate-data (class folders of the old classes' images)"
    if not isinstance(run_dir, str):
        raise EnrolError(f"{bundle.root / MANIFEST}: field provenance.run_dir missing; {hint}")
    bases = [Path.cwd(), bundle.root.parent.parent.parent]   # where `python -m trainer` ran (models/<name>/<version>)
    found = _resolve(run_dir, bases)
    split_path = found / "split.json" if found is not None else None
    if split_path is None or not split_path.is_file():
        raise EnrolError(f"{run_dir}/split.json (provenance.run_dir of {bundle.root / MANIFEST}): not found here; {hint}")
    try:
        split = json.loads(split_path.read_text())
        root, classes, rows = split["root"], split["classes"], split["val"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EnrolError(f"{split_path}: not a run's split ({exc}); {hint}") from exc
    if classes != bundle.model_labels:
        raise EnrolError(f"{split_path}: field classes {classes} differ from the bundle's model labels; {hint}")
    # a damaged row (a label that is no class index: -1 or 99 was taken as a class the image is not, "x" stopped
    # the enrolment with an error naming no file) would judge the gate on wrong labels
    bad = next((row for row in (rows if isinstance(rows, list) else [rows])
                if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and type(row[1]) is int
                        and 0 <= row[1] < len(classes))), None)
    if bad is not None or not isinstance(root, str):
        what = f"field val: row {bad!r}" if bad is not None else f"field root {root!r}"
        raise EnrolError(f"{split_path}: {what}; expected rows [path, class index 0..{len(classes) - 1}] and a "
                         f"root folder; {hint}")
    data_root = _resolve(root, [found.parent.parent, *bases])
    if data_root is None:
        raise EnrolError(f"{split_path}: field root {root!r} not found here; {hint}")
    return [data_root / p for p, _ in rows], [c for _, c in rows], str(split_path)


def _folder_names(folder: Path) -> dict[str, str]:
    """The optional ``labels.json`` of a class-folder dataset (folder -> class name, as the trainer reads it:
    class names such as ``T-shirt/top`` cannot be folder names)."""
    path = folder / "labels.json"
    if not path.is_file():
        return {}
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EnrolError(f"{path}: not readable as JSON ({exc})") from exc
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise EnrolError(f"{path}: expected a mapping folder -> class name")
    return names


def _folder_gate_rows(folder: Path, bundle: Bundle, new_label: str) -> tuple[list[Path], list[int], str]:
    if not folder.is_dir():
        raise EnrolError(f"{folder}: --gate-data is not a folder of class folders")
    names = _folder_names(folder)
    paths, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        name = names.get(sub.name, sub.name)
        if name == new_label:
            log.info("%s: the new class's folder is not gate data; skipped", sub)
            continue
        if name not in bundle.labels:
            raise EnrolError(f"{sub}: class {name!r} is not one of the bundle's labels {bundle.labels}")
        files = sorted(p for p in sub.iterdir() if is_sample_image(p))
        paths += files
        labels += [bundle.labels.index(name)] * len(files)
    return paths, labels, str(folder)


def _enrolled_gate_rows(cfg: EnrolConfig, bundle: Bundle) -> tuple[list[Path], list[int], str]:
    """``cfg.enrolled_gate``: images of classes the bundle has (enrolled before), as gate rows of their class."""
    paths, labels, named = [], [], []
    for label, files in (cfg.enrolled_gate or {}).items():
        if label not in bundle.labels:       # the new label is not (_source_bundle refused it)
            raise EnrolError(f"enrolled_gate: {label!r} is not one of the bundle's labels {bundle.labels}")
        files = [Path(f) for f in files]
        paths += files
        labels += [bundle.labels.index(label)] * len(files)
        named.append(f"{len(files)} of {label!r}")
    return paths, labels, f" (and images of classes enrolled before: {', '.join(named)})" if named else ""


def _gate_rows(cfg: EnrolConfig, bundle: Bundle) -> tuple[list[Path], np.ndarray, str]:
    """Up to ``gate_images`` labelled images of the bundle's classes (files and label indices), not read yet. Those
    of classes enrolled before come first: they are few, and without them the gate cannot see a new class take an
    enrolled one's items."""
    paths, labels, source = (_folder_gate_rows(Path(cfg.gate_data), bundle, cfg.label) if cfg.gate_data is not None
                             else _split_gate_rows(bundle))
    more_paths, more_labels, more = _enrolled_gate_rows(cfg, bundle)
    paths, labels, source = paths + more_paths, labels + more_labels, source + more
    enrolled = np.isin(labels, [bundle.labels.index(label) for label in bundle.open_set.enrolled.labels])
    order = np.random.default_rng(cfg.seed).permutation(len(paths))
    order = order[np.argsort(~enrolled[order], kind="stable")][: cfg.gate_images]   # unchanged without enrolled
    return [paths[i] for i in order], np.asarray([labels[i] for i in order], np.int64), source


def gate_images_needed(max_drop_points: float) -> float:
    """Gate images needed to measure a drop of ``max_drop_points``: two halves in which one image is at most that
    many points (infinite where ``100 / max_drop_points`` overflows a float)."""
    per_half = 100.0 / max_drop_points
    return float(2 * math.ceil(per_half)) if math.isfinite(per_half) else math.inf


def _check_gate_rows(labels: np.ndarray, cfg: EnrolConfig, bundle: Bundle, source: str) -> None:
    """EnrolError when the gate images could not judge the enrolment: too few to measure the allowance, or too
    few of a class enrolled before (the run's validation split has none: a new class could take all its items
    and the gate would report nothing lost)."""
    need = gate_images_needed(cfg.max_drop_points)
    if len(labels) < need:
        raise EnrolError(f"{source}: {len(labels)} usable gate image(s); at least {need:.0f} needed to measure a drop "
                         f"of {cfg.max_drop_points} points (two halves, one image at most that much of each)")
    for label in bundle.open_set.enrolled.labels:
        have = int((labels == bundle.labels.index(label)).sum())
        if have < MIN_GATE_ROWS_ENROLLED:
            raise EnrolError(
                f"{source}: {have} gate image(s) of {label!r}, a class enrolled before; at least "
                f"{MIN_GATE_ROWS_ENROLLED} needed (one in each half) so that the gate sees whether {cfg.label!r} "
                f"takes its items: add a folder of its images to --gate-data (the review server's --enrol-gate-data; "
                f"named {label!r} or mapped to it in labels.json), or on the review page review frames as it")


def model_outputs(model_path: Path, inputs: np.ndarray | ModelInputs, embedding_name: str, logits_name: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and embeddings of ``inputs`` (an array, or ``ModelInputs`` read a chunk at a time) from an ONNX model
    in ONNX Runtime (CPU), ``BATCH`` rows at a time; no rows: two empty arrays."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits, emb = [], []
    for batch in input_batches(inputs, BATCH):
        out = session.run([logits_name, embedding_name], {name: batch})
        logits.append(out[0])
        emb.append(out[1])
    if not logits:
        return np.zeros((0, 0)), np.zeros((0, 0))
    return np.concatenate(logits).astype(np.float64), np.concatenate(emb).astype(np.float64)


def int8_model(bundle: Bundle) -> Path | None:
    """The bundle's deployable INT8 ONNX model, the one a station on a CPU with VNNI runs (and INT8 TensorRT engines
    are built from), or None: the gate measures the enrolment on it too."""
    art = bundle.artifact(ROLE_INT8)
    return art.path if art is not None and art.deployable else None


# ---------------------------------------------------------------- the new row

@dataclass(frozen=True)
class Whitening:
    """``u = Sigma^-1/2 (emb - centre) / scale`` under the bundle's shared covariance, ``scale`` making the fit
    images' mean square length 1. The classes are round here: the new class's mean direction is its
    discriminant (the raw embedding's mean direction is dominated by high-variance directions every class shares,
    and an enrolled Trouser row imprinted there catches no Trouser), and gradient descent is well conditioned."""

    centre: np.ndarray
    components: np.ndarray
    inv_sqrt_var: np.ndarray
    inv_sqrt_rest: float
    scale: float = 1.0

    @classmethod
    def of(cls, stats: openset.EmbeddingStats, fit_emb: np.ndarray) -> "Whitening":
        w = cls(stats.centre, stats.components, 1.0 / np.sqrt(stats.variances), 1.0 / math.sqrt(stats.rest_variance))
        u = w(fit_emb)
        return replace(w, scale=float(np.sqrt(np.mean(np.sum(u * u, 1)))) or 1.0)

    def _linear(self, v: np.ndarray) -> np.ndarray:
        p = v @ self.components
        return ((p * self.inv_sqrt_var) @ self.components.T + (v - p @ self.components.T) * self.inv_sqrt_rest) \
            / self.scale

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        return self._linear(np.asarray(emb, np.float64) - self.centre)

    def row(self, w: np.ndarray, b: float) -> tuple[np.ndarray, float]:
        """A row on ``u`` as a row on raw embeddings (the map is symmetric): ``w.u + b = weight.emb + bias``."""
        weight = self._linear(w)
        return weight, float(b - self.centre @ weight)


@dataclass(frozen=True)
class FitHalf:
    """The gate images a row is fitted on (``u``: whitened embeddings; ``old``: their full old logits).

    ``row_norm``: the model's rows' typical length on ``u`` (least squares from the images' own logits);
    ``top``: their mean top logit. ``gram``: ``u @ u.T``; gradient descent runs in its span (``w = w0 + u.T @ a``:
    the same iterates as in the embedding space, N x N instead of N x D)."""

    u: np.ndarray
    old: np.ndarray
    labels: np.ndarray
    row_norm: float
    top: float
    gram: np.ndarray

    @classmethod
    def of(cls, u: np.ndarray, old: np.ndarray, labels: np.ndarray, model_logits: np.ndarray) -> "FitHalf":
        gram = u @ u.T
        # model logits ~ u @ W.T + b, ridge in the dual (bias: a column of ones); |W_c|^2 = coef_c . gram . coef_c
        coef = np.linalg.solve(gram + 1.0 + 1e-3 * len(u) * np.eye(len(u)), model_logits)
        row_norm = float(np.median(np.sqrt(np.maximum(np.sum(coef * (gram @ coef), 0), 0.0))))
        return cls(u, old, labels, row_norm, float(model_logits.max(1).mean()), gram)


def _fit_row(u_new: np.ndarray, old_new: np.ndarray, half: FitHalf, steps: int = FIT_STEPS
             ) -> tuple[np.ndarray, float]:
    """w, b from the imprint (the examples' mean direction at the model's row length, the bias putting the
    examples' logit at the typical top logit), then class-balanced softmax cross-entropy over [old logits,
    u.w + b] (examples: the new class; gate images: their own) plus ``FIT_L2 * |w - w0|^2 / 2``, by Nesterov
    gradient descent."""
    w0 = half.row_norm * openset.unit(u_new.mean(0))
    b = float(half.top - (u_new @ w0).mean())
    u = np.vstack([u_new, half.u])
    cross = u_new @ half.u.T
    gram = np.block([[u_new @ u_new.T, cross], [cross.T, half.gram]])
    z0 = u @ w0
    old_lse = openset._logsumexp(np.vstack([old_new, half.old]))
    target = np.concatenate([np.ones(len(u_new)), np.zeros(len(half.u))])
    weight = np.concatenate([np.full(len(u_new), 0.5 / len(u_new)), np.full(len(half.u), 0.5 / len(half.u))])
    lr = 1.0 / (0.25 * float((weight * (np.diag(gram) + 1)).sum()) + FIT_L2)
    a, va, vb = np.zeros(len(u)), np.zeros(len(u)), 0.0
    for _ in range(steps):
        la, lb = a + 0.9 * va, b + 0.9 * vb
        z = z0 + gram @ la + lb
        p_new = 1.0 / (1.0 + np.exp(np.clip(old_lse - z, -50, 50)))      # softmax share of the new logit
        g = weight * (p_new - target)
        va, vb = 0.9 * va - lr * (g + FIT_L2 * la), 0.9 * vb - lr * float(g.sum())
        a, b = a + va, b + vb
    return w0 + u.T @ a, b


def bias_cap(z_wo_bias: np.ndarray, old_logits: np.ndarray, labels: np.ndarray, max_drop_points: float) -> float:
    """The largest bias at which at most ``max_drop_points`` of these images, decided right by the old logits,
    are decided as the new class instead (new logit strictly above the old top one; ties stay old)."""
    right = old_logits.argmax(1) == labels
    margins = np.sort(old_logits.max(1)[right] - z_wo_bias[right])   # lost when bias > margin
    allowed = int(math.floor(max_drop_points / 100.0 * len(labels) + 1e-9))
    return float(margins[allowed]) if allowed < len(margins) else float("inf")


@dataclass(frozen=True)
class CapSet:
    """Gate images the bias is capped on (all of them: the more images, the less the cap's noise)."""

    u: np.ndarray
    old: np.ndarray
    labels: np.ndarray


def _capped_bias(z_caps: np.ndarray, fitted_bias: float, caps: CapSet, max_drop_points: float) -> float:
    """The bias at the cap for this allowance (``z_caps``: the row's logits on ``caps`` without bias), or the
    fitted bias where no finite cap exists."""
    cap = bias_cap(z_caps, caps.old, caps.labels, max_drop_points * CAP_SHARE)
    return cap if math.isfinite(cap) else fitted_bias


def fit_row(u_new: np.ndarray, old_new: np.ndarray, half: FitHalf, caps: CapSet, max_drop_points: float
            ) -> tuple[np.ndarray, float, float]:
    """The enrolled row on whitened embeddings (w, bias, fitted bias) from the examples' ``u`` and full old logits,
    fitted on ``half``, its bias set at the cap: the largest at which ``caps`` loses at most ``CAP_SHARE`` of
    ``max_drop_points`` (the fitted bias where no finite cap exists).

    At the cap, not below it: the fitted bias balances a few examples against hundreds of gate images and leaves
    recall that the old classes' allowance would pay for. A share of the allowance: the cap is the k-th smallest margin of images
    that include those the row was fitted on, a noisy and optimistic estimate; at the full allowance the old
    classes lost 0.6-0.8 points of test images."""
    w, b = _fit_row(u_new, old_new, half)
    return w, _capped_bias(caps.u @ w, b, caps, max_drop_points), b


def _decide(old_logits: np.ndarray, new_logit: np.ndarray) -> np.ndarray:
    return np.hstack([old_logits, new_logit[:, None]]).argmax(1)


def leave_one_out_recalls(u_new: np.ndarray, old_new: np.ndarray, half: FitHalf, caps: CapSet,
                          allowances: Sequence[float], examples: int | None = None) -> list[float]:
    """Share of the examples decided as the new class by a row fitted without them, at each of ``allowances``
    (points, as ``max_drop_points``): the fit does not depend on the allowance, only the bias cap does, so each
    row is fitted once. Up to ``LOO_FOLDS`` examples each is left out on its own (leave-one-out); more are left
    out in ``LOO_FOLDS`` folds (example ``i`` in fold ``i % LOO_FOLDS``), so the cost stops growing with them.
    With ``examples`` = n, the rows are n examples followed by views of them (row ``k`` is a view of example
    ``k % n``): each example is left out with its views, and decided on its own row."""
    n = len(u_new) if examples is None else examples
    hits = _leave_one_out_hits(u_new, old_new, half, caps, allowances, n, [(u_new[:n], old_new[:n])])[0]
    return [float(h) / n for h in hits]


def _leave_one_out_hits(u_new: np.ndarray, old_new: np.ndarray, half: FitHalf, caps: CapSet,
                        allowances: Sequence[float], n: int, judged: Sequence[tuple[np.ndarray, np.ndarray]]
                        ) -> list[np.ndarray]:
    """``leave_one_out_recalls``' hits (examples decided as the new class, per allowance), for each of ``judged``:
    the ``n`` examples as one model gives them (whitened embeddings and full old logits; the FP32 model's, the INT8
    model's), each decided by the rows fitted without it. A row that is not finite is no hit."""
    of = np.arange(len(u_new)) % n
    folds = min(n, LOO_FOLDS)
    hits = [np.zeros(len(allowances), np.int64) for _ in judged]
    for fold in range(folds):
        rest = of % folds != fold
        own = np.flatnonzero(np.arange(n) % folds == fold)        # the fold's examples as taken, not their views
        w, fitted = _fit_row(u_new[rest], old_new[rest], half)
        z_caps = caps.u @ w
        biases = [_capped_bias(z_caps, fitted, caps, allowance) for allowance in allowances]
        for (u, old), got in zip(judged, hits):
            z_own = u[own] @ w
            for j, bias in enumerate(biases):
                got[j] += _new_class_hits(old[own], z_own + bias)
    return hits


def _new_class_hits(old_logits: np.ndarray, new_logit: np.ndarray) -> int:
    """Rows decided as the new class (the last logit): a row with a logit that is not finite is none."""
    finite = np.isfinite(old_logits).all(1) & np.isfinite(new_logit)
    return int(((_decide(old_logits, new_logit) == old_logits.shape[1]) & finite).sum())


def _accuracy(old: np.ndarray, new_logit: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    return float((old.argmax(1) == labels).mean()), float((_decide(old, new_logit) == labels).mean())


@dataclass(frozen=True)
class GateFit:
    """The gate images (old-class images, labelled) as a row is fitted and judged on them: split in two halves
    (``_halves``), the whitening and the fit from one, the bias cap on all (``caps``), the gate on the other
    (``held``: its indices). ``enroll`` and ``benchmarks/enrol_allowance.py`` both build it here."""

    white: Whitening
    half: FitHalf
    caps: CapSet
    held: np.ndarray

    @classmethod
    def of(cls, stats: openset.EmbeddingStats, emb: np.ndarray, model_logits: np.ndarray, old: np.ndarray,
           labels: np.ndarray, seed: int) -> "GateFit":
        """``model_logits``: the model's own; ``old``: full old logits (enrolled classes' appended)."""
        fit_idx, held_idx = _halves(labels, seed)
        white = Whitening.of(stats, emb[fit_idx])
        u = white(emb)
        return cls(white, FitHalf.of(u[fit_idx], old[fit_idx], labels[fit_idx], model_logits[fit_idx]),
                   CapSet(u, old, labels), held_idx)

    def held_accuracy(self, z: np.ndarray, bias: float) -> tuple[float, float]:
        """The old classes' accuracy on the held half before and after a row (``z``: its logits on every gate
        image without bias) is added."""
        h = self.held
        return _accuracy(self.caps.old[h], z[h] + bias, self.caps.labels[h])


def _int8_report(bundle: Bundle, model: Path, gf: GateFit, w: np.ndarray, bias: float, fitted_bias: float,
                 allowances: Sequence[float], max_drop_points: float, source: str, *, old_int8_gate: np.ndarray,
                 u_int8_gate: np.ndarray, recall: float, loos: list[float]) -> dict:
    """The enrolment's figures on the bundle's INT8 model, as the FP32 ones (``report["int8"]``): the same gate
    images, halves and row (its bias set on the FP32 model), the old logits and the embedding the INT8 model gives.
    Gate images whose INT8 outputs are not finite are left out of its figures (counted in ``images``); none left
    in the held half: EnrolError, the gate could not judge the INT8 model."""
    finite = np.isfinite(old_int8_gate).all(1) & np.isfinite(u_int8_gate).all(1)
    held = gf.held[finite[gf.held]]
    name = str(model.relative_to(bundle.root))
    if len(held) == 0:
        raise EnrolError(f"{bundle.root / name}: the INT8 model's outputs are not finite on any held-out gate image; "
                         f"the gate cannot judge what stations running it would decide")
    labels, z = gf.caps.labels, u_int8_gate @ w

    def held_accuracy(at_bias: float) -> tuple[float, float]:
        return _accuracy(old_int8_gate[held], z[held] + at_bias, labels[held])

    before, after = held_accuracy(bias)
    all_before, all_after = _accuracy(old_int8_gate[finite], z[finite] + bias, labels[finite])
    drop = round((before - after) * 100.0, 9)
    z_caps = gf.caps.u @ w
    curve = [{"max_drop_points": allowance, "recall_leave_one_out": recall_at,
              "drop_points": round((before - held_accuracy(_capped_bias(z_caps, fitted_bias, gf.caps, allowance))[1])
                                   * 100.0, 9)}
             for allowance, recall_at in zip(allowances, loos)]
    loo = loos[list(allowances).index(max_drop_points)]
    return {"model": name, "recall_examples": recall, "recall_leave_one_out": loo,
            "gate": {"source": source, "images": int(finite.sum()), "held_out_images": int(len(held)),
                     "accuracy_before": before, "accuracy_after": after, "drop_points": drop,
                     "all_accuracy_before": all_before, "all_accuracy_after": all_after,
                     "max_drop_points": max_drop_points, "passed": bool(drop <= max_drop_points)},
            "allowances": curve}


# ---------------------------------------------------------------- one enrolment at a time per models folder

_held: dict[tuple[int, int], int] = {}      # (st_dev, st_ino) of a lock file held here -> the holding thread
_held_guard = threading.Lock()


@contextlib.contextmanager
def models_dir_lock(models_dir: Path) -> Iterator[Path]:
    """Hold ``models_dir``'s enrolment lock (``flock`` on ``LOCK_FILE``: released by the kernel when the process
    ends, however it ends; yields the lock file), or EnrolBusy at once naming the file where another enrolment holds
    it (another process, another thread); EnrolError naming the file where it cannot be opened. The thread that
    holds it may take it again (a review server holds it from choosing the version it builds on, then calls
    ``enroll``, which takes it too). On release the lock file (and a models folder made for it) is removed again: a
    refused enrolment leaves nothing behind."""
    path = Path(models_dir) / LOCK_FILE
    made = _missing_folders(path.parent)
    fd, key = _open_lock(path, made)
    if fd is None:                      # this thread holds it already
        yield path
        return
    try:
        yield path
    finally:
        with _held_guard:
            _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(path)             # while held: whoever opened this file meanwhile sees it gone and opens anew
        os.close(fd)                    # releases the lock
        _remove_empty(made)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:              # innermost first; one that another enrolment wrote into is kept
        try:
            folder.rmdir()
        except OSError:
            return


def _open_lock(path: Path, made: list[Path]) -> tuple[int | None, tuple[int, int] | None]:
    """(descriptor holding the lock on ``path``, its key), or (None, None) where this thread holds it already."""
    me = threading.get_ident()
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            _remove_empty(made)
            raise EnrolError(f"{path}: cannot open the enrolment lock ({exc.strerror or exc}); enrolment writes into "
                             f"{path.parent} and needs to write there") from None
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        with _held_guard:
            again = _held.get(key) == me
        if again:
            os.close(fd)                # another descriptor: closing it leaves this thread's lock held
            return None, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EnrolBusy(f"another enrolment is writing into {path.parent} (it holds {path}: a review server's "
                            f"page or another trainer enroll); two enrolments onto one version keep only one of "
                            f"their classes in the chain: try again when it has finished, onto the newest "
                            f"version") from None
        except OSError as exc:          # a file system without locks
            os.close(fd)
            _remove_empty(made)
            raise EnrolError(f"{path}: cannot lock it ({exc.strerror or exc}); one enrolment at a time per models "
                             f"folder needs a file system with flock") from None
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == key:
            with _held_guard:
                _held[key] = me
            return fd, key
        os.close(fd)                    # removed by the enrolment that held it before: lock the file there now


def enrol_models_dir(cfg: EnrolConfig) -> Path:
    """The models folder the new version goes into (``<name>/<version>`` under it): ``cfg.models_dir``, else the
    source bundle's own."""
    if cfg.models_dir is not None:
        return Path(cfg.models_dir)
    source = Path(cfg.bundle)
    return (source.parent if source.name == MANIFEST else source).parent.parent


# ---------------------------------------------------------------- writing the new version

def _new_manifest(bundle: Bundle, cfg: EnrolConfig, version: str, artifacts: list[dict], report: dict) -> dict:
    m = json.loads(json.dumps(bundle.manifest))
    m["version"] = version
    m["created_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    m["labels"] = bundle.labels + [cfg.label]
    m["artifacts"] = artifacts
    m["open_set"]["enrolled"] = list(m["open_set"].get("enrolled", [])) + [cfg.label]
    enrolment = dict(m["quality"].get("enrolment") or {})
    enrolment[cfg.label] = dict(report)
    m["quality"]["enrolment"] = enrolment
    m["provenance"]["enrolled_from"] = {"name": bundle.name, "version": bundle.version, "label": cfg.label}
    return m


def _unused_version(folder: Path, stamp: str) -> str:
    """The default version: the UTC time to the second, with ``-2``, ``-3``, ... where that is taken (two
    enrolments from the review page within one second: the second was refused, "bundle version already exists")."""
    version, n = stamp, 1
    while (folder / version).exists():
        n += 1
        version = f"{stamp}-{n}"
    return version


def _write(bundle: Bundle, cfg: EnrolConfig, new_open_set: openset.OpenSet, report: dict, station_key: Any
           ) -> tuple[Path, dict]:
    """The new version in ``<models_dir>/<name>/<version>``: the model files linked (same bytes, same hashes),
    the new open_set.npz and manifest, signed when a key is given, verified (its signature with ``station_key``, the
    key stations check it with: ``check_signing``), then moved into place."""
    models_dir = Path(cfg.models_dir) if cfg.models_dir is not None else bundle.root.parent.parent
    version = cfg.version or _unused_version(models_dir / bundle.name,
                                             dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S"))
    final_dir = models_dir / bundle.name / version
    if final_dir.exists():
        raise EnrolError(f"{final_dir}: bundle version already exists; pass another --version")
    sweep_partials(final_dir.parent)        # what enrolments killed before their clean-up left here
    tmp_dir = partial_dir(final_dir)        # its own: never another enrolment's, in this process or another
    tmp_dir.mkdir(parents=True)
    try:
        artifacts = []
        for entry in bundle.manifest["artifacts"]:
            src = bundle.root / entry["path"]
            dst = tmp_dir / entry["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            if entry["role"] == ROLE_OPEN_SET:
                openset.save_npz(dst, new_open_set)
                artifacts.append({**entry, **artifact_entry(dst, tmp_dir)})
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            artifacts.append(dict(entry))
        manifest = _new_manifest(bundle, cfg, version, artifacts, report)
        (tmp_dir / MANIFEST).write_text(dumps_finite(manifest, indent=1))
        if cfg.sign_key:
            from trainer.signing import sign_bundle

            try:
                sign_bundle(tmp_dir, cfg.sign_key)
            except (OSError, ValueError, TypeError) as exc:     # checked at the start; changed since
                raise EnrolError(f"--sign-key {cfg.sign_key}: cannot sign with it ({exc})") from None
        try:        # as a station checks it: a signature its key refuses is never reported as enrolled
            check_model_runs(load_bundle(tmp_dir, station_key))
        except BundleError as exc:
            raise EnrolError(f"{final_dir}: the new version does not verify ({exc}); not enrolled"
                             + (f" (signed with --sign-key {cfg.sign_key}: changed since the enrolment began?)"
                                if cfg.sign_key and SIGNATURE in str(exc) else "")) from None
        try:
            os.rename(tmp_dir, final_dir)      # never onto a version another enrolment wrote meanwhile
        except OSError as exc:
            raise EnrolError(f"{final_dir}: written by another enrolment at the same moment ({exc.strerror}); "
                             f"run it again") from None
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return final_dir, manifest


def _record_gate(bundle_dir: Path, source: Bundle, label: str, report: dict) -> None:
    """The gate's decision beside the new version, as ``trainer retrain`` writes it: ``central publish`` publishes
    only a version with a promoted gate record, and the canary rollout takes it from there (docs/enrol.md)."""
    from contract.events import manifest_sha256, utc_now, write_gate

    gate, int8 = report["gate"], report.get("int8")
    on_int8 = (f"; on the INT8 model {int8['gate']['accuracy_before']:.2%} -> {int8['gate']['accuracy_after']:.2%}"
               if int8 else "")
    write_gate(bundle_dir, {
        "decision": "promoted", "name": source.name, "version": bundle_dir.name,
        "manifest_sha256": manifest_sha256(bundle_dir),
        "reason": f"enrolled {label!r}: old classes {gate['accuracy_before']:.2%} -> {gate['accuracy_after']:.2%} "
                  f"on {gate['held_out_images']} held-out gate images{on_int8} (at most {gate['max_drop_points']} "
                  f"points lost)",
        "current": {"name": source.name, "version": source.version}, "report": None,
        "figures": {"enrolled": label, "examples": report["examples"],
                    "recall_leave_one_out": report["recall_leave_one_out"], "old_drop_points": gate["drop_points"],
                    "old_drop_points_int8": int8["gate"]["drop_points"] if int8 else None},
        "ts": utc_now()})


# ---------------------------------------------------------------- the whole enrolment

def _mirrors(cfg: EnrolConfig, bundle: Bundle) -> bool:
    """Whether to fit on the examples' mirror images too: asked for, or the model was trained with flips (a
    mirror image is then a view it was taught to decide alike, and 10 examples become 20)."""
    if cfg.mirror is not None:
        return bool(cfg.mirror)
    training = bundle.manifest.get("provenance", {}).get("training_config")
    augment = training.get("augment") if isinstance(training, dict) else None
    hflip = augment.get("hflip") if isinstance(augment, dict) else None
    return isinstance(hflip, (int, float)) and not isinstance(hflip, bool) and hflip > 0


def _halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the gate images, each class split evenly: fit (row and bias cap) and gate."""
    rng = np.random.default_rng(seed + 1)
    fit = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fit[idx[: (len(idx) + 1) // 2]] = True
    return np.flatnonzero(fit), np.flatnonzero(~fit)


def _check_settings(cfg: EnrolConfig) -> Any:
    """EnrolError naming the field or flag for settings no enrolment could be judged or written with: checked
    before anything is read or computed. Returns the public key the new version is verified with
    (``check_signing``)."""
    if not 0.0 < cfg.max_drop_points < 100.0:
        raise EnrolError(f"max_drop_points: expected points in (0, 100), got {cfg.max_drop_points!r}")
    if cfg.min_examples < 2:        # leave-one-out needs one example left to fit on
        raise EnrolError(f"--min-examples: expected at least 2, got {cfg.min_examples!r}")
    if cfg.gate_images < 1:
        raise EnrolError(f"--gate-images: expected at least 1, got {cfg.gate_images!r}")
    need = gate_images_needed(cfg.max_drop_points)
    if need > cfg.gate_images:
        shown = f"at least {need:.0f}" if need < 1e12 else "more than any gate holds"
        raise EnrolError(f"max_drop_points (--max-drop) {cfg.max_drop_points!r}: too small to measure on at most "
                         f"{cfg.gate_images} gate images (--gate-images): a drop of that many points needs {shown} "
                         f"(two halves, one image at most that much of each)")
    try:
        check_name_version("x", cfg.version)
    except ValueError as exc:
        raise EnrolError(str(exc)) from None
    return check_signing(Path(cfg.bundle), cfg.sign_key, cfg.public_key, unsigned=cfg.unsigned)


def check_signing(source: Path, sign_key: Path | None, public_key: Path | None, *, unsigned: bool = False,
                  sign_flag: str = "--sign-key", public_flag: str = "--public-key",
                  unsigned_flag: str | None = "--unsigned") -> Any:
    """EnrolError naming the flags, before anything is read or computed (and when the review server starts), where
    the new version would be refused by the stations that take the source (``source``: its folder): retrain's rule
    (``trainer.retrain.check_signing``: a key that cannot sign, or is not the private half of ``public_key``), and a
    signed source with no ``sign_key`` (also where ``public_key`` is given: it verifies only the source, and
    ``load_bundle`` refuses an unsigned source with it), unless ``unsigned`` (``unsigned_flag``; None: the caller has
    no such flag) asks for an unsigned version on purpose. Until 2026-12-07 both wrote a version every station
    configured with a public key refused, seen only when the canary failed. Without ``public_key``, a signed source
    whose signature the sign key's public half does not verify is refused too: the stations that take the source
    trust another key (until 2026-12-07 such a version was written and reported "verified, signed").

    Returns the public key the new version is verified with before it is reported enrolled, as a station checks
    it: ``public_key``'s, else the sign key's public half (read now: a key file changed before the version is signed
    fails that check); None for an unsigned version."""
    from trainer.retrain import RetrainError
    from trainer.retrain import check_signing as check_retrain_signing

    if unsigned and sign_key is not None:
        raise EnrolError(f"{unsigned_flag} and {sign_flag} {sign_key}: an unsigned version and a signed one asked "
                         f"for; pass one of them")
    if sign_key is not None:
        signing_key = check_sign_key(Path(sign_key), sign_flag)
        if public_key is None:
            return _signed_by(source, signing_key.public_key(), sign_key, sign_flag, public_flag)
        try:
            key = load_public_key(public_key)
        except BundleError as exc:
            raise EnrolError(f"{public_flag}: {exc}") from None
        try:        # the key itself passed check_sign_key: what retrain's rule still refuses is the pair
            check_retrain_signing(Path(sign_key), key)
        except RetrainError:
            raise EnrolError(f"{sign_flag} {sign_key}: not the private key of {public_flag} {public_key}; the new "
                             f"version would be signed with a key the stations that trust {public_flag} do not trust, "
                             f"and refused at rollout: pass the private key of {public_flag} as {sign_flag}") from None
        return key
    signature = Path(source) / SIGNATURE
    if not signature.exists():
        return None            # an unsigned source (with public_key given, load_bundle refuses it by name)
    if unsigned:
        log.warning("%s: the source bundle is signed; the new version is written unsigned (%s): stations configured "
                    "with a public key refuse it", signature, unsigned_flag)
        return None
    only_source = f" ({public_flag} {public_key} checks only the source)" if public_key is not None else ""
    opt_out = f", or {unsigned_flag} for an unsigned version on purpose" if unsigned_flag else ""
    raise EnrolError(f"source bundle {source} is signed ({signature}) and no {sign_flag} is given{only_source}: the "
                     f"new version would be unsigned, and every station configured with a public key refuses it at "
                     f"rollout; pass the private key as {sign_flag}{opt_out}")


def _signed_by(source: Path, key: Any, sign_key: Path, sign_flag: str, public_flag: str) -> Any:
    """``key`` (the sign key's public half), or EnrolError naming the files where the source is signed and ``key``
    does not verify its signature: the stations that take the source trust the key it was signed with, and would
    refuse a version signed with another."""
    from cryptography.exceptions import InvalidSignature

    root = Path(source).parent if Path(source).name == MANIFEST else Path(source)
    signature = root / SIGNATURE
    if not signature.exists():
        return key             # an unsigned source: the stations' key is not known; the new version is signed
    try:
        key.verify(signature.read_bytes(), (root / MANIFEST).read_bytes())
    except OSError as exc:
        raise EnrolError(f"source bundle {root}: cannot read its signature ({exc.strerror or exc})") from None
    except InvalidSignature:
        raise EnrolError(f"{sign_flag} {sign_key}: the source bundle's signature ({signature}) was not made with this "
                         f"key: the stations that take the source trust another key and would refuse the new version "
                         f"at rollout; pass the site's private key as {sign_flag} (and its public key as "
                         f"{public_flag})") from None
    return key


def check_sign_key(path: Path, flag: str = "--sign-key") -> Any:
    """The private key in ``path``, or EnrolError naming ``flag`` and the file unless it holds an unencrypted
    ed25519 private key: checked before an enrolment computes anything (and when the review server starts), not
    when the new version is signed."""
    from trainer.signing import check_private_key

    try:
        return check_private_key(path, flag)
    except ValueError as exc:
        raise EnrolError(str(exc)) from None


def _fit_rows(examples: int, views: int) -> tuple[np.ndarray, int]:
    """Rows of the examples' outputs (``views`` blocks of ``examples``: as taken, then mirrored) the row is fitted
    on, and how many examples they are: all of them up to ``MAX_FIT_EXAMPLES``, else that many evenly spread (the
    same on every run: the dry run's figures are the enrolment's)."""
    if examples <= MAX_FIT_EXAMPLES:
        return np.arange(examples * views), examples
    picked = np.unique(np.linspace(0, examples - 1, MAX_FIT_EXAMPLES).round().astype(np.int64))
    return np.concatenate([picked + v * examples for v in range(views)]), len(picked)


def _finite_rows(logits: np.ndarray, emb: np.ndarray) -> np.ndarray:
    return np.isfinite(logits).all(1) & np.isfinite(emb).all(1)


def _example_outputs(cfg: EnrolConfig, bundle: Bundle, pre: Preprocessor, mirror: bool
                     ) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """The model's logits and embeddings of the examples (then of their mirror images), and the examples kept,
    read and run a batch at a time (``ImageStream``). Fewer than ``min_examples`` readable: EnrolError naming the
    unreadable ones (else they are logged). An example whose outputs (or its mirror image's) are not finite is
    skipped and named, like an unreadable one; a NaN would make the row NaN and the gate refuse for a loss the old
    classes never had."""
    all_paths = image_files(cfg.images)
    stream = ImageStream(all_paths, pre)
    logits, emb = model_outputs(bundle.artifact(ROLE_FP32).path,
                                ChainedInputs(stream, stream.mirrored()) if mirror else stream,
                                bundle.embedding_name, bundle.input_spec.output_name)
    if len(stream.kept) < cfg.min_examples:
        source = cfg.images if isinstance(cfg.images, (str, Path)) else f"{len(all_paths)} files"
        detail = f"; unreadable: {'; '.join(stream.bad)}" if stream.bad else ""
        raise EnrolError(f"{source}: {len(stream.kept)} readable image(s) of {cfg.label!r}, at least "
                         f"{cfg.min_examples} needed{detail}")
    if stream.bad:
        log.warning("%d example image(s) skipped: %s", len(stream.bad), "; ".join(stream.bad))
    paths = [all_paths[i] for i in stream.kept]
    finite = _finite_rows(logits, emb).reshape(-1, len(paths)).all(0)
    if finite.all():
        return logits, emb, paths
    bad = [f"{paths[i]}: the model's embedding or logits are not finite" for i in np.flatnonzero(~finite)]
    kept = [p for p, ok in zip(paths, finite) if ok]
    if len(kept) < cfg.min_examples:
        source = cfg.images if isinstance(cfg.images, (str, Path)) else f"{len(paths)} readable files"
        raise EnrolError(f"{source}: {len(kept)} usable image(s) of {cfg.label!r}, at least {cfg.min_examples} "
                         f"needed; {'; '.join(bad)}")
    log.warning("%d example image(s) skipped: %s", len(bad), "; ".join(bad))
    rows = np.tile(finite, len(logits) // len(paths))
    return logits[rows], emb[rows], kept


def _gate_outputs(cfg: EnrolConfig, bundle: Bundle, pre: Preprocessor, all_paths: list[Path],
                  all_labels: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Path]]:
    """The model's logits and embeddings of the gate images (``_gate_rows``), read and run a batch at a time
    (``ImageStream``), their labels and files. Unreadable ones are skipped (logged); too few readable, EnrolError
    (``_check_gate_rows``). An image whose outputs are not finite is skipped and named, like an unreadable one (its
    NaN would take the bias cap with it)."""
    stream = ImageStream(all_paths, pre)
    logits, emb = model_outputs(bundle.artifact(ROLE_FP32).path, stream, bundle.embedding_name,
                                bundle.input_spec.output_name)
    if stream.bad:
        log.warning("%s: %d gate image(s) unreadable, skipped (first: %s)", source, len(stream.bad), stream.bad[0])
    labels = all_labels[stream.kept]
    paths = [all_paths[i] for i in stream.kept]
    _check_gate_rows(labels, cfg, bundle, source)
    finite = _finite_rows(logits, emb)
    if finite.all():
        return logits, emb, labels, paths
    first = paths[int(np.flatnonzero(~finite)[0])]
    log.warning("%s: %d gate image(s) skipped: the model's embedding or logits are not finite (first: %s)", source,
                int((~finite).sum()), first)
    _check_gate_rows(labels[finite], cfg, bundle, source)
    return logits[finite], emb[finite], labels[finite], [p for p, ok in zip(paths, finite) if ok]


def _int8_outputs(model: Path, bundle: Bundle, pre: Preprocessor, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The INT8 model's logits and embeddings of ``paths`` (examples or gate images the FP32 model has just run on),
    a batch at a time, row for row. A file unreadable since: EnrolError (the rows would no longer match)."""
    stream = ImageStream(paths, pre)
    logits, emb = model_outputs(model, stream, bundle.embedding_name, bundle.input_spec.output_name)
    if stream.bad:
        raise EnrolError(f"{stream.bad[0]}: read a moment ago, unreadable now; was it changed? Run the enrolment "
                         "again")
    return logits, emb


def enroll(cfg: EnrolConfig) -> EnrolResult:
    """Add ``cfg.label`` to a bundle from a few images of it; the new bundle version, or EnrolError (nothing
    written). With ``cfg.dry_run``: the report alone (the gate's verdict in ``report["gate"]["passed"]``, and on the
    INT8 model in ``report["int8"]["gate"]["passed"]``; ``report["int8"]`` is None for a bundle without a
    deployable one), nothing written; the figures are those the real enrolment at the same allowance gives."""
    started = time.monotonic()
    station_key = _check_settings(cfg)
    if cfg.dry_run:         # writes nothing: neither waits for nor holds up an enrolment that writes
        return _enroll(cfg, station_key, started)
    with models_dir_lock(enrol_models_dir(cfg)):        # from loading the source until its version is in place
        return _enroll(cfg, station_key, started)


def _enroll(cfg: EnrolConfig, station_key: Any, started: float) -> EnrolResult:
    """``enroll`` once its settings are checked (and, where it writes, the models folder's lock is held)."""
    bundle = _source_bundle(cfg)
    pre = Preprocessor(bundle.input_spec)
    os_ = bundle.open_set
    mirror = _mirrors(cfg, bundle)
    gate_paths, gate_labels, gate_source = _gate_rows(cfg, bundle)      # listed (and refused) before any is read
    # images read and run a batch at a time: only their outputs (logits, embedding) are held
    model_ex, emb_ex, ex_paths = _example_outputs(cfg, bundle, pre, mirror)
    n_ex = len(ex_paths)
    model_gate, emb_gate, y_gate, gate_kept = _gate_outputs(cfg, bundle, pre, gate_paths, gate_labels, gate_source)
    int8_path = int8_model(bundle)          # what a station with VNNI (or an INT8 engine) runs: measured too
    int8 = (None if int8_path is None else
            (_int8_outputs(int8_path, bundle, pre, ex_paths), _int8_outputs(int8_path, bundle, pre, gate_kept)))
    old_ex, old_gate = os_.full_logits(model_ex, emb_ex), os_.full_logits(model_gate, emb_gate)
    gf = GateFit.of(os_.stats, emb_gate, model_gate, old_gate, y_gate, cfg.seed)
    if len(gf.held) == 0:       # the old classes' loss could not be measured: NaN, which no comparison refuses
        raise EnrolError(f"{gate_source}: {len(y_gate)} gate image(s) leave none held out to judge the old classes "
                         f"on; give more labelled images of them")
    u_ex = gf.white(emb_ex)
    fit_rows, fitted_examples = _fit_rows(n_ex, len(u_ex) // n_ex)
    u_fit, old_fit = u_ex[fit_rows], old_ex[fit_rows]
    w, bias, fitted_bias = fit_row(u_fit, old_fit, gf.half, gf.caps, cfg.max_drop_points)
    weight, raw_bias = gf.white.row(w, bias)
    new_index = len(bundle.labels)
    recall = float((_decide(old_ex[:n_ex], u_ex[:n_ex] @ w + bias) == new_index).mean())
    allowances = sorted({*ALLOWANCE_CURVE, cfg.max_drop_points})
    judged = [(u_fit[:fitted_examples], old_fit[:fitted_examples])]     # the fitted examples as taken
    if int8 is not None:                    # ... and as the INT8 model gives them: decided by the same rows
        u8_ex, old8_ex = gf.white(int8[0][1]), os_.full_logits(*int8[0])
        picked = fit_rows[:fitted_examples]
        judged.append((u8_ex[picked], old8_ex[picked]))
    hits = _leave_one_out_hits(u_fit, old_fit, gf.half, gf.caps, allowances, fitted_examples, judged)
    loos = [float(h) / fitted_examples for h in hits[0]]
    loo = loos[allowances.index(cfg.max_drop_points)]
    z_gate = gf.caps.u @ w
    before, after = gf.held_accuracy(z_gate, bias)
    curve = []
    for allowance, recall_at in zip(allowances, loos):
        at = gf.held_accuracy(z_gate, _capped_bias(z_gate, fitted_bias, gf.caps, allowance))[1]
        curve.append({"max_drop_points": allowance, "recall_leave_one_out": recall_at,
                      "drop_points": round((before - at) * 100.0, 9)})
    all_before, all_after = _accuracy(old_gate, z_gate + bias, y_gate)
    drop = round((before - after) * 100.0, 9)
    decided_as = np.bincount(old_ex[:n_ex].argmax(1), minlength=len(bundle.labels))
    report = {
        "examples": len(ex_paths), "fitted_examples": fitted_examples, "mirrored": mirror,
        "recall_examples": recall, "recall_leave_one_out": loo,
        "examples_decided_before_as": bundle.labels[int(decided_as.argmax())],
        "gate": {"source": gate_source, "images": int(len(y_gate)), "held_out_images": int(len(gf.held)),
                 "accuracy_before": before, "accuracy_after": after, "drop_points": drop,
                 "all_accuracy_before": all_before, "all_accuracy_after": all_after,
                 "max_drop_points": cfg.max_drop_points, "passed": bool(drop <= cfg.max_drop_points)},
        "allowances": curve,
        "bias": {"value": raw_bias, "capped": bool(bias < fitted_bias), "raised": bool(bias > fitted_bias),
                 "cap_drop_points": cfg.max_drop_points * CAP_SHARE},
        "how": "row imprinted from the examples' whitened mean, fitted with half the gate images (the other half "
               f"held out){' and the examples mirrored' if mirror else ''}; bias set at the cap on all gate images, "
               f"{CAP_SHARE:g} of the allowance (trainer/enroll.py, docs/enrol.md)",
    }
    report["int8"] = None if int8 is None else _int8_report(
        bundle, int8_path, gf, w, bias, fitted_bias, allowances, cfg.max_drop_points, gate_source,
        old_int8_gate=os_.full_logits(*int8[1]), u_int8_gate=gf.white(int8[1][1]),
        recall=_new_class_hits(old8_ex[:n_ex], u8_ex[:n_ex] @ w + bias) / n_ex,
        loos=[float(h) / fitted_examples for h in hits[1]])
    if cfg.dry_run:                         # a preview: the same figures, nothing written (the review page's)
        report["seconds"] = time.monotonic() - started
        return EnrolResult(None, None, report)
    if not drop <= cfg.max_drop_points:
        raise EnrolError(f"{gate_source}: the old classes lose {drop:.2f} points on the {len(gf.held)} held-out gate "
                         f"images (at most {cfg.max_drop_points} allowed); {cfg.label!r} not enrolled", report)
    if report["int8"] is not None and not report["int8"]["gate"]["passed"]:
        g8 = report["int8"]["gate"]
        raise EnrolError(f"{gate_source}: on the bundle's INT8 model ({report['int8']['model']}, what stations with "
                         f"VNNI or an INT8 TensorRT engine run) the old classes lose {g8['drop_points']:.2f} points on "
                         f"the {g8['held_out_images']} held-out gate images (at most {cfg.max_drop_points} allowed; "
                         f"the FP32 model: {drop:.2f}); {cfg.label!r} not enrolled", report)
    if loo < 0.5:
        log.warning("%r is recognised in only %.0f%% of its examples (leave-one-out) within the old classes' "
                    "allowance; before enrolment they were mostly decided as %r: it may look like that class, or "
                    "the examples may differ from what stations see", cfg.label, loo * 100,
                    report["examples_decided_before_as"])
    own = emb_ex[:n_ex]                     # the class statistics from the examples as taken, as before mirroring
    scale = openset.enrolled_scale(os_.stats, own, emb_gate, y_gate)
    report["mahalanobis_scale"] = scale
    new_open_set = dataclasses.replace(os_, stats=os_.stats.with_class(own.mean(0), own, scale),
                                       enrolled=os_.enrolled.with_class(cfg.label, weight, raw_bias))
    bundle_dir, manifest = _write(bundle, cfg, new_open_set, report, station_key)
    try:
        _record_gate(bundle_dir, bundle, cfg.label, report)
    except BaseException:   # a full disk: a version without its gate record is never published; its number is free
        shutil.rmtree(bundle_dir, ignore_errors=True)
        raise
    report["seconds"] = time.monotonic() - started
    log.info("enrolled %r into %s: recall %.1f%% on its examples (leave-one-out %.1f%%), old classes %.2f%% -> "
             "%.2f%% on %d held-out images, %.1f s", cfg.label, bundle_dir, recall * 100, loo * 100,
             report["gate"]["accuracy_before"] * 100, report["gate"]["accuracy_after"] * 100, len(gf.held),
             report["seconds"])
    return EnrolResult(bundle_dir, manifest, report)
