"""Unknown items and enrolled classes: what a bundle's embedding output is used for (docs/open-set.md).

A bundle's model gives two outputs per image: the logits, one per trained label, and the embedding: the
backbone's pooled features, those the classifier reads and (bundles exported since 2026-12-05) before them
those of earlier stages, each part of unit length (trainer.model.WithEmbedding). This module is the numpy side
of both uses:

- **The unknown score**: how far an image is from everything the bundle knows; higher is more unknown. The
  bundle names its score and carries a threshold calibrated on validation images of the known classes, so
  that a stated share of them (``keep``, e.g. 95%) score below it. Scores (``SCORES``): ``msp`` (one minus the
  top softmax probability, the baseline), ``max_logit`` and ``energy`` (from the logits), ``mahalanobis``
  (the smallest distance to a class mean under the shared covariance of the classes), ``cosine`` (one minus
  the largest cosine between the centred embedding and a centred class mean) and ``knn`` (one minus the
  cosine to the k-th nearest training embedding of the nearest class).
- **Enrolled classes**: a class added after training (``python -m trainer enroll``), without touching the
  backbone: one more row of the classifier, ``w . embedding + b``, fitted on a few examples' embeddings, and
  its class mean for the distance scores. Its logit is appended to the model's, so every consumer sees one
  logit per label.

The statistics live in the bundle's ``open_set.npz`` (read with ``allow_pickle=False``: arrays only), its
hash in the manifest like every artifact. Everything here is numpy (float64; the knn cosines float32, against a
bank stored as float16) and torch-free, so the station, the trainer and the central side compute the same numbers.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

SCORES = ("msp", "max_logit", "energy", "mahalanobis", "cosine", "knn")
EMBEDDING_SCORES = ("mahalanobis", "cosine", "knn")
UNKNOWN_LABEL = "unknown"
DEFAULT_KEEP = 0.95
DEFAULT_SCORE = "mahalanobis"   # the score a bundle carries unless export says (docs/open-set.md: chosen by measurement)
MAX_COMPONENTS = 512        # principal directions kept of the shared covariance (the rest: one mean variance)
KNN_K = 10
KNN_BANK_PER_CLASS = 200    # training embeddings kept per class for the knn score
NPZ_MAX_BYTES = 256 << 20
KEEP_CURVE = (0.9, 0.95, 0.975, 0.99, 0.995, 0.999, 1.0)   # shares of known items the export lists thresholds for
MAX_CURVE_POINTS = 64
NPZ_KINDS = "biuf"          # dtype kinds an npz may hold: real numbers (and booleans); never complex, text or records
MAX_ABS = 1e6               # class means, centre, directions and bank: embeddings are unit-length parts, so far less
MAX_ABS_WEIGHT = 1e12       # enrolled rows and bias: a whitened row mapped back may be long, never this long
MIN_VARIANCE = 1e-30        # fit_embedding_stats keeps at least 1e-12; below this a distance may become infinite
MAX_VARIANCE = 1e30
SCORE_LIMIT = 1e12          # an unknown score as a message carries it, and a threshold's magnitude (carried_score)


class OpenSetError(ValueError):
    """Statistics that cannot be used; the message names the file and the problem."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[:, 0]


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class EmbeddingStats:
    """Class means and the shared covariance's principal directions, from training embeddings.

    ``means``: one row per label (trained and enrolled); ``centre``: the mean of the class means;
    ``components`` (D x K) and ``variances`` (K) the covariance's top directions, ``rest_variance`` the mean
    variance of the directions left out (so the distance still counts them). ``bank``: unit-length training
    embeddings with ``bank_labels``, for the knn score (may be empty)."""

    means: np.ndarray
    centre: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    rest_variance: float
    bank: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    bank_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    class_scale: np.ndarray | None = None   # per class, what its Mahalanobis distances are multiplied by (None: 1s)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def mahalanobis(self, emb: np.ndarray) -> np.ndarray:
        """Squared distances to every class mean, N x C, under the shared covariance.

        Expanded so that no N x C x D array is made: the projections ``(x - m) P = xP - mP`` and the squared
        lengths ``|x - m|^2 = |x|^2 - 2 x.m + |m|^2`` (this runs on every frame a station classifies).
        An enrolled class's distances are scaled by its ``class_scale`` (``enrolled_scale``)."""
        emb = np.asarray(emb, dtype=np.float64)
        means_proj, means_sq = self._means_projected
        proj = (emb @ self.components)[:, None, :] - means_proj[None, :, :]   # N x C x K
        sq = (emb * emb).sum(1)[:, None] - 2.0 * emb @ self.means.T + means_sq[None, :]
        inside = (proj ** 2 / self.variances).sum(-1)
        rest = (sq - (proj ** 2).sum(-1)).clip(min=0) / self.rest_variance
        distances = inside + rest
        return distances if self.class_scale is None else distances * self.class_scale[None, :]

    @cached_property
    def _means_projected(self) -> tuple[np.ndarray, np.ndarray]:
        return self.means @ self.components, (self.means * self.means).sum(1)

    def cosines(self, emb: np.ndarray) -> np.ndarray:
        """Cosine of the centred embedding with every centred class mean, N x C."""
        return unit(np.asarray(emb, np.float64) - self.centre) @ unit(self.means - self.centre).T

    def knn_distance(self, emb: np.ndarray, k: int = KNN_K) -> np.ndarray:
        """One minus the cosine to the k-th nearest bank embedding of the nearest class, k scaled to the class's
        share of the bank (the fullest class uses ``k``, an enrolled class of 5 examples among 200 its nearest): the
        k-th neighbour's distance measures density only among equally many samples.

        The cosines are float32 against the bank grouped by class (``_knn_index``): the bank is stored as float16,
        so float64 adds nothing but time, and this runs on every frame a station classifies."""
        if not len(self.bank):
            raise OpenSetError("the knn score needs a bank of training embeddings, and this bundle has none")
        bank_t, blocks = self._knn_index
        sims = unit(emb).astype(np.float32) @ bank_t                         # N x bank, grouped by class
        best = np.full(len(sims), np.inf)
        fullest = max(n for _, _, n in blocks)
        for start, stop, n in blocks:
            kc = min(n, max(1, int(round(k * n / fullest))))
            own = sims[:, start:stop]
            kth = np.partition(own, n - kc, axis=1)[:, n - kc]              # the kc-th largest cosine
            best = np.minimum(best, 1.0 - kth.astype(np.float64))
        return best

    @cached_property
    def _knn_index(self) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """(D x bank float32 bank, columns grouped by class; (start, stop, count) of each class's columns)."""
        order = np.argsort(self.bank_labels, kind="stable")
        _, starts, counts = np.unique(self.bank_labels[order], return_index=True, return_counts=True)
        bank_t = np.ascontiguousarray(np.asarray(self.bank, np.float32)[order].T)
        return bank_t, [(int(s), int(s + n), int(n)) for s, n in zip(starts, counts)]

    def with_class(self, mean: np.ndarray, examples: np.ndarray | None = None, scale: float = 1.0) -> "EmbeddingStats":
        """These statistics with one more class mean (an enrolled class; the covariance is the old one), its
        Mahalanobis distances multiplied by ``scale`` (``enrolled_scale``)."""
        means = np.vstack([self.means, np.asarray(mean, np.float64)[None, :]])
        bank, bank_labels = self.bank, self.bank_labels
        if examples is not None and len(bank):
            bank = np.vstack([bank, unit(examples)])
            bank_labels = np.concatenate([bank_labels, np.full(len(examples), len(self.means))])
        old_scale = self.class_scale if self.class_scale is not None else np.ones(len(self.means))
        class_scale = None if scale == 1.0 and self.class_scale is None else np.append(old_scale, float(scale))
        return replace(self, means=means, bank=bank, bank_labels=bank_labels, class_scale=class_scale)

    def distances_to(self, emb: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances of ``emb`` to one ``mean`` under these statistics' covariance."""
        one = replace(self, means=np.asarray(mean, np.float64)[None, :], class_scale=None)
        return one.mahalanobis(emb)[:, 0]


def enrolled_scale(stats: EmbeddingStats, examples: np.ndarray, known: np.ndarray, known_labels: np.ndarray) -> float:
    """What an enrolled class's Mahalanobis distances are multiplied by, so that its items are as near their
    class as known items are to theirs (at most 1: never stricter than a trained class).

    The covariance is the trained classes': a new class spreads in directions they hardly vary in, so its own
    items lie far from its mean and the ``mahalanobis`` score would reject most of them as unknown. Its typical
    distance is estimated leave-one-out from the examples (each against the mean of the others, corrected by
    ``(n + 1)(n - 1) / n^2`` to a new item against the mean of all ``n``), the known items' as the median
    distance of ``known`` (labelled images of the trained classes) to their own class mean."""
    examples = np.asarray(examples, np.float64)
    n = len(examples)
    if n < 2:
        return 1.0
    total = examples.sum(0)
    loo = np.array([stats.distances_to(examples[i:i + 1], (total - examples[i]) / (n - 1))[0] for i in range(n)])
    typical_new = float(np.median(loo)) * (n + 1) * (n - 1) / n ** 2
    own = stats.mahalanobis(known)[np.arange(len(known)), np.asarray(known_labels, np.int64)]
    typical_known = float(np.median(own))
    if not (np.isfinite(typical_new) and typical_new > 0 and np.isfinite(typical_known)):
        return 1.0
    return float(min(1.0, typical_known / typical_new))


def fit_embedding_stats(emb: np.ndarray, labels: np.ndarray, classes: int, *, max_components: int = MAX_COMPONENTS,
                        bank_per_class: int = KNN_BANK_PER_CLASS, seed: int = 0) -> EmbeddingStats:
    """Class means and shared covariance (shrunk a little towards its mean variance) of labelled embeddings."""
    emb = np.asarray(emb, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if emb.ndim != 2 or len(emb) != len(labels) or not len(emb):
        raise OpenSetError(f"embeddings {emb.shape} and labels {labels.shape} do not match")
    if not np.isfinite(emb).all():
        raise OpenSetError("embeddings are not all finite")
    missing = [c for c in range(classes) if not (labels == c).any()]
    if missing:
        raise OpenSetError(f"no embedding of class(es) {missing}")
    means = np.stack([emb[labels == c].mean(0) for c in range(classes)])
    within = emb - means[labels]
    cov = within.T @ within / max(1, len(emb) - classes)
    mean_var = float(np.trace(cov)) / cov.shape[0]
    cov = 0.9 * cov + 0.1 * mean_var * np.eye(cov.shape[0])                    # shrinkage: few images, many dims
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    k = min(max_components, len(values))
    kept, rest = order[:k], order[k:]
    rest_var = float(values[rest].mean()) if len(rest) else float(values[kept].min())
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:bank_per_class] for c in range(classes)])
    return EmbeddingStats(means, means.mean(0), vectors[:, kept], np.maximum(values[kept], 1e-12),
                          max(rest_var, 1e-12), unit(emb[pick]) if bank_per_class else np.zeros((0, emb.shape[1])),
                          labels[pick] if bank_per_class else np.zeros(0, np.int64))


def unknown_scores(kind: str, logits: np.ndarray, emb: np.ndarray | None = None,
                   stats: EmbeddingStats | None = None) -> np.ndarray:
    """The unknown score of each row (higher: more unknown)."""
    if kind == "msp":
        return 1.0 - _softmax(logits).max(-1)
    if kind == "max_logit":
        return -np.asarray(logits, np.float64).max(-1)
    if kind == "energy":
        return -_logsumexp(logits)
    if kind not in EMBEDDING_SCORES:
        raise OpenSetError(f"unknown score {kind!r}: expected one of {', '.join(SCORES)}")
    if emb is None or stats is None:
        raise OpenSetError(f"the {kind} score needs the model's embedding and the bundle's statistics")
    if kind == "mahalanobis":
        return stats.mahalanobis(emb).min(-1)
    if kind == "cosine":
        return 1.0 - stats.cosines(emb).max(-1)
    return stats.knn_distance(emb)


def carried_score(score: float) -> float:
    """An unknown score as a message carries it: rounded to 6 places and within +-SCORE_LIMIT. A score beyond
    the limit (an embedding far off every class, its distance scaled by a variance near the 1e-12 floor) is carried
    as the limit: unknown at every threshold a bundle may hold, so no decision reads differently; the message stays
    within its schema and within what every reader's float holds."""
    return round(min(max(float(score), -SCORE_LIMIT), SCORE_LIMIT), 6)


def threshold_for_keep(known_scores: np.ndarray, keep: float = DEFAULT_KEEP) -> float:
    """The score below which ``keep`` of the known items fall (they are kept; above it: unknown)."""
    scores = np.asarray(known_scores, np.float64)
    if not len(scores) or not np.isfinite(scores).all():
        raise OpenSetError("no finite known-item scores to calibrate on")
    if not 0.0 < keep <= 1.0:
        raise OpenSetError(f"keep: expected a share in (0, 1], got {keep!r}")
    return float(np.quantile(scores, keep, method="higher"))


def keep_curve(known_scores: np.ndarray, keeps: Sequence[float] = KEEP_CURVE) -> tuple[tuple[float, float], ...]:
    """(keep, threshold) for each share in ``keeps``: the calibration set's thresholds beyond the bundle's own, so
    a station can judge with another share kept (receiving: an item its shipment expects) without the images."""
    return tuple((float(k), threshold_for_keep(known_scores, k)) for k in keeps)


def _finite_scores(scores: np.ndarray, what: str) -> np.ndarray:
    """``scores`` as float64, or OpenSetError naming ``what`` and how many are not finite: a NaN would sort as
    the most unknown and flatter the figure, an infinity is no score a bundle carries (``carried_score``)."""
    out = np.asarray(scores, np.float64)
    bad = ~np.isfinite(out)
    if bad.any():
        raise OpenSetError(f"{what}: {int(bad.sum())} of {out.size} scores are not finite "
                           f"(first at index {int(np.flatnonzero(bad.ravel())[0])}: {out.ravel()[bad.ravel()][0]})")
    return out


def auroc(known_scores: np.ndarray, unknown_scores_: np.ndarray) -> float:
    """Probability that an unknown item scores above a known one (ties count half); NaN when either side is
    empty. A score that is not finite is refused (OpenSetError naming the side), never ranked."""
    known = _finite_scores(known_scores, "known-item scores")
    unknown = _finite_scores(unknown_scores_, "unknown-item scores")
    if not len(known) or not len(unknown):
        return float("nan")
    both = np.concatenate([known, unknown])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[len(known):].sum() - len(unknown) * (len(unknown) + 1) / 2.0
    return float(u / (len(known) * len(unknown)))


def false_accept_rate(known_scores: np.ndarray, unknown_scores_: np.ndarray, keep: float = DEFAULT_KEEP) -> float:
    """Share of unknown items scoring below the threshold that keeps ``keep`` of the known ones. A score that is
    not finite is refused (OpenSetError naming the side): a NaN unknown score would count as rejected."""
    t = threshold_for_keep(_finite_scores(known_scores, "known-item scores"), keep)
    return float((_finite_scores(unknown_scores_, "unknown-item scores") <= t).mean())


@dataclass(frozen=True)
class EnrolledHead:
    """Rows appended to the model's classifier: one logit per enrolled class, ``emb @ weights.T + bias``."""

    labels: tuple[str, ...] = ()
    weights: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    bias: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def logits(self, emb: np.ndarray) -> np.ndarray:
        if not self.labels:
            return np.zeros((len(emb), 0))
        return np.asarray(emb, np.float64) @ self.weights.T + self.bias

    def with_class(self, label: str, weight: np.ndarray, bias: float) -> "EnrolledHead":
        w = np.asarray(weight, np.float64)[None, :]
        weights = w if not self.labels else np.vstack([self.weights, w])
        return EnrolledHead(self.labels + (label,), weights, np.append(self.bias, float(bias)))


@dataclass(frozen=True)
class OpenSet:
    """A bundle's unknown score and enrolled classes: the manifest's ``open_set`` block and its npz."""

    score: str
    threshold: float              # calibrated on the FP32 model's scores (FP32 and FP16 artifacts use it)
    keep: float
    stats: EmbeddingStats | None
    enrolled: EnrolledHead = field(default_factory=EnrolledHead)
    int8_threshold: float | None = None   # calibrated on the INT8 model's own scores, the same share kept
    keep_thresholds: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)  # "fp32", "int8"

    def threshold_for(self, precision: str) -> float:
        """The threshold of the artifact a station runs: an INT8 model's scores shift a little, so it has its own."""
        return self.int8_threshold if precision == "int8" and self.int8_threshold is not None else self.threshold

    def threshold_at(self, keep: float, precision: str) -> float | None:
        """The threshold that kept at least ``keep`` of the calibration set's known items: the listed share nearest
        at or above ``keep`` (``keep_thresholds``, the INT8 model's own when it runs); None for a bundle exported
        without the list, or when no listed share reaches ``keep``."""
        curve = self.keep_thresholds.get("int8" if precision == "int8" else "fp32") or self.keep_thresholds.get("fp32")
        return next((t for k, t in curve or () if k >= keep - 1e-12), None)

    @property
    def needs_embedding(self) -> bool:
        return self.score in EMBEDDING_SCORES or bool(self.enrolled.labels)

    def full_logits(self, logits: np.ndarray, emb: np.ndarray | None) -> np.ndarray:
        """The model's logits with the enrolled classes' appended (one per label of the bundle)."""
        if not self.enrolled.labels:
            return np.asarray(logits)
        if emb is None:
            raise OpenSetError("enrolled classes need the model's embedding output")
        return np.concatenate([np.asarray(logits, np.float64), self.enrolled.logits(emb)], axis=1)

    def scores(self, full_logits: np.ndarray, emb: np.ndarray | None) -> np.ndarray:
        return unknown_scores(self.score, full_logits, emb, self.stats)


def save_npz(path: Path, openset: OpenSet) -> None:
    """The arrays of ``openset`` (statistics and enrolled rows) as an npz, float32 to keep bundles small."""
    arrays: dict[str, np.ndarray] = {}
    if openset.stats is not None:
        s = openset.stats
        arrays.update(means=s.means, centre=s.centre, components=s.components, variances=s.variances,
                      rest_variance=np.array([s.rest_variance]), bank=s.bank, bank_labels=s.bank_labels)
        if s.class_scale is not None:
            arrays["class_scale"] = s.class_scale
    if openset.enrolled.labels:
        arrays.update(enrolled_weights=openset.enrolled.weights, enrolled_bias=openset.enrolled.bias)
    small = {k: (v.astype(np.float16 if k == "bank" else np.float32) if v.dtype.kind == "f" else v)
             for k, v in arrays.items()}       # the bank holds unit vectors: float16 is exact enough, half the size
    buf = io.BytesIO()
    np.savez(buf, **small)
    Path(path).write_bytes(buf.getvalue())


def load(block: Mapping, npz_path: Path | None, labels: Sequence[str], dim: int | None = None) -> OpenSet:
    """The manifest's ``open_set`` block with its npz, checked against the bundle's labels; OpenSetError names the
    file and what is wrong."""
    where = str(npz_path) if npz_path is not None else "manifest open_set"
    score = block.get("score")
    if score not in SCORES:
        raise OpenSetError(f"{where}: score {score!r} is not one of {', '.join(SCORES)}")
    threshold, keep = block.get("threshold"), block.get("keep", DEFAULT_KEEP)
    int8_threshold = block.get("threshold_int8")
    for name, value in (("threshold", threshold), ("threshold_int8", int8_threshold)):     # manifest fields
        if (value is not None or name == "threshold") and not _finite_number(value):
            raise OpenSetError(f"manifest open_set: {name} {_show(value)} is not a finite number")
        if value is not None and abs(float(value)) > SCORE_LIMIT:
            raise OpenSetError(f"manifest open_set: {name} {_show(value)} is beyond +-{SCORE_LIMIT:g}, the largest "
                               "unknown score a message carries")
    if not (_finite_number(keep) and 0.0 < float(keep) <= 1.0):
        raise OpenSetError(f"manifest open_set: keep {_show(keep)} is not a share in (0, 1]")
    curves = _keep_thresholds(block.get("keep_thresholds"), "manifest open_set")  # a manifest field, not the npz's
    enrolled_labels = tuple(block.get("enrolled", ()))
    stats, enrolled = None, EnrolledHead()
    if npz_path is not None:
        arrays = _read_npz(npz_path)
        stats = _stats_from(arrays, npz_path, len(labels)) if "means" in arrays else None
        if enrolled_labels:
            enrolled = _enrolled_from(arrays, npz_path, enrolled_labels, stats.dim if stats is not None else dim)
    elif enrolled_labels:
        raise OpenSetError(f"{where}: enrolled classes without their npz")
    if score in EMBEDDING_SCORES and stats is None:
        raise OpenSetError(f"{where}: the {score} score needs class statistics, and there are none")
    if stats is not None:
        if dim is not None and stats.dim != dim:
            raise OpenSetError(f"{npz_path}: statistics of {stats.dim}-d embeddings, the model gives {dim}-d")
        if score == "knn" and not len(stats.bank):
            raise OpenSetError(f"{npz_path}: the knn score needs a bank of training embeddings")
    if enrolled_labels and tuple(labels[len(labels) - len(enrolled_labels):]) != enrolled_labels:
        raise OpenSetError(f"{where}: enrolled labels {list(enrolled_labels)} are not the last of the bundle's labels")
    return OpenSet(score, float(threshold), float(keep), stats, enrolled,
                   float(int8_threshold) if int8_threshold is not None else None, curves)


def _keep_thresholds(raw, where: str) -> dict[str, tuple[tuple[float, float], ...]]:
    """The manifest's ``keep_thresholds`` ({"fp32": [[keep, threshold], ...], "int8": [...]}; absent in bundles
    exported before it): shares in (0, 1] rising, thresholds finite and not falling."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw or set(raw) - {"fp32", "int8"}:
        raise OpenSetError(f"{where}: keep_thresholds must map fp32 and/or int8 to [[keep, threshold], ...]")
    out = {}
    for name, points in raw.items():
        field_name = f"keep_thresholds.{name}"
        if not isinstance(points, list) or not 0 < len(points) <= MAX_CURVE_POINTS:
            raise OpenSetError(f"{where}: {field_name} must be a list of 1 to {MAX_CURVE_POINTS} "
                               "[keep, threshold] pairs")
        pairs = []
        for i, point in enumerate(points):
            if not (isinstance(point, list) and len(point) == 2 and all(_finite_number(v) for v in point)):
                raise OpenSetError(f"{where}: {field_name}[{i}] {_show(point)} is not a pair of finite numbers")
            keep, threshold = float(point[0]), float(point[1])
            if not 0.0 < keep <= 1.0:
                raise OpenSetError(f"{where}: {field_name}[{i}]: keep {keep!r} is not a share in (0, 1]")
            if abs(threshold) > SCORE_LIMIT:
                raise OpenSetError(f"{where}: {field_name}[{i}]: threshold {threshold!r} is beyond "
                                   f"+-{SCORE_LIMIT:g}, the largest unknown score a message carries")
            if pairs and (keep <= pairs[-1][0] or threshold < pairs[-1][1]):
                raise OpenSetError(f"{where}: {field_name}[{i}]: shares must rise and thresholds not fall")
            pairs.append((keep, threshold))
        out[name] = tuple(pairs)
    return out


def _finite_number(value) -> bool:
    """A JSON number (not a bool) that is finite as a float: an integer literal like 10**400 is not (no float holds
    it; ``np.isfinite`` would raise TypeError on it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _show(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a 400-digit integer in an error message helps nobody)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > NPZ_MAX_BYTES:
            raise OpenSetError(f"{path}: {size} bytes, more than {NPZ_MAX_BYTES}")
        # the bound holds for the arrays as read, not only the file: 1 MB of deflated zeros is 1 GB of array.
        # zipfile reads no member past the size its directory declares, so the declared sizes bound the memory
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
        if inflated > NPZ_MAX_BYTES:
            raise OpenSetError(f"{path}: its arrays take {inflated} bytes once inflated, more than {NPZ_MAX_BYTES}")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except OpenSetError:
        raise
    except Exception as exc:  # zipfile, numpy and OS errors: any of them means "not our npz"
        raise OpenSetError(f"{path}: cannot read as an npz of arrays ({type(exc).__name__}: {exc})") from exc
    for name, arr in arrays.items():
        # numbers only: complex numbers (which the finite check below would not look at, and which every score
        # would turn into NaN), text, bytes, dates and records are no statistics
        if arr.dtype.kind not in NPZ_KINDS:
            raise OpenSetError(f"{path}: array {name} is of type {arr.dtype}, expected real numbers")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise OpenSetError(f"{path}: array {name} holds NaN or infinity")
    return arrays


def _array(arrays: Mapping[str, np.ndarray], name: str, path: Path, ndim: int, *, limit: float = MAX_ABS,
           kinds: str = "fiu") -> np.ndarray:
    """The npz's array ``name`` as float64, checked: ``ndim`` dimensions, numbers of ``kinds``, every value's
    magnitude at most ``limit`` (finite statistics of that size give finite scores)."""
    arr = arrays.get(name)
    if arr is None:
        raise OpenSetError(f"{path}: array {name} is missing")
    if arr.ndim != ndim:
        raise OpenSetError(f"{path}: array {name} has shape {arr.shape}, expected {ndim} dimension(s)")
    if arr.dtype.kind not in kinds:
        raise OpenSetError(f"{path}: array {name} is of type {arr.dtype}, expected real numbers")
    out = arr.astype(np.float64)
    if out.size and not np.abs(out).max() <= limit:
        raise OpenSetError(f"{path}: array {name} holds a value of magnitude {np.abs(out).max():.3g}, "
                           f"more than {limit:.0g}")
    return out


def _stats_from(arrays: Mapping[str, np.ndarray], path: Path, classes: int | None = None) -> EmbeddingStats:
    """The class statistics of the npz, each array's shape and values checked against the others (the means
    against ``classes``, the bundle's label count): OpenSetError naming the file and the array otherwise, never
    an array that fails only at the first frame."""
    means = _array(arrays, "means", path, 2)
    c, d = means.shape
    if classes is not None and c != classes:
        raise OpenSetError(f"{path}: {c} class means for {classes} labels")
    if d < 1:
        raise OpenSetError(f"{path}: array means has shape {means.shape}, expected one row of at least 1 number "
                           "per class")
    centre = _array(arrays, "centre", path, 1)
    components = _array(arrays, "components", path, 2)
    variances = _array(arrays, "variances", path, 1, limit=MAX_VARIANCE)
    raw_rest = arrays.get("rest_variance")
    rest = _array(arrays, "rest_variance", path, 0 if raw_rest is not None and raw_rest.ndim == 0 else 1,
                  limit=MAX_VARIANCE)
    if centre.shape != (d,):
        raise OpenSetError(f"{path}: array centre has shape {centre.shape}, expected ({d},) (means {means.shape})")
    if components.shape[0] != d:
        raise OpenSetError(f"{path}: array components has shape {components.shape}, expected ({d}, K) "
                           f"(means {means.shape})")
    k = components.shape[1]
    if variances.shape != (k,):
        raise OpenSetError(f"{path}: array variances has shape {variances.shape}, expected ({k},) "
                           f"(components {components.shape})")
    if rest.size != 1:
        raise OpenSetError(f"{path}: array rest_variance has shape {rest.shape}, expected one number")
    for name, values in (("variances", variances), ("rest_variance", rest)):
        if values.size and not values.min() >= MIN_VARIANCE:
            raise OpenSetError(f"{path}: array {name} holds {values.min():.3g}, expected variances of at least "
                               f"{MIN_VARIANCE:.0g}")
    if "bank" in arrays:
        bank = _array(arrays, "bank", path, 2)
        bank_labels = _array(arrays, "bank_labels", path, 1, kinds="iuf")
    else:
        bank, bank_labels = np.zeros((0, d)), np.zeros(0)
    if len(bank) and bank.shape[1] != d:
        raise OpenSetError(f"{path}: array bank has shape {bank.shape}, expected (n, {d}) (means {means.shape})")
    if bank_labels.shape != (len(bank),):
        raise OpenSetError(f"{path}: array bank_labels has shape {bank_labels.shape}, expected ({len(bank)},) "
                           f"(bank {bank.shape})")
    if len(bank_labels) and not (np.array_equal(bank_labels, np.round(bank_labels))
                                 and bank_labels.min() >= 0 and bank_labels.max() < c):
        raise OpenSetError(f"{path}: array bank_labels holds values other than class indices 0..{c - 1} "
                           f"(means {means.shape})")
    class_scale = None
    if "class_scale" in arrays:
        class_scale = _array(arrays, "class_scale", path, 1)
        if class_scale.shape != (c,) or not (class_scale > 0).all():
            raise OpenSetError(f"{path}: class statistics of inconsistent shapes or values (array class_scale "
                               f"{class_scale.shape}, expected ({c},) of positive numbers; means {means.shape})")
    return EmbeddingStats(means, centre, components, variances, float(rest.reshape(-1)[0]),
                          bank if len(bank) else np.zeros((0, d)), bank_labels.astype(np.int64), class_scale)


def _enrolled_from(arrays: Mapping[str, np.ndarray], path: Path, labels: tuple[str, ...],
                   dim: int | None) -> EnrolledHead:
    """The enrolled rows of the npz: weights ``(len(labels), dim)`` (``dim``: the statistics' or the manifest's
    embedding_dim; any width where neither is known), bias ``(len(labels),)``."""
    n = len(labels)
    if "enrolled_weights" not in arrays or "enrolled_bias" not in arrays:
        raise OpenSetError(f"{path}: enrolled rows do not match the {n} enrolled label(s) (array enrolled_weights "
                           "or enrolled_bias is missing)")
    w = _array(arrays, "enrolled_weights", path, 2, limit=MAX_ABS_WEIGHT)
    b = _array(arrays, "enrolled_bias", path, 1, limit=MAX_ABS_WEIGHT)
    want = f"({n}, {dim})" if dim is not None else f"({n}, D)"
    if w.shape[0] != n or w.shape[1] < 1 or (dim is not None and w.shape[1] != dim):
        raise OpenSetError(f"{path}: enrolled rows do not match the {n} enrolled label(s): array enrolled_weights "
                           f"has shape {w.shape}, expected {want} (the embedding's size)")
    if b.shape != (n,):
        raise OpenSetError(f"{path}: enrolled rows do not match the {n} enrolled label(s): array enrolled_bias "
                           f"has shape {b.shape}, expected ({n},)")
    return EnrolledHead(labels, w, b)
