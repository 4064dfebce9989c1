"""Pure decision logic: probabilities, low-confidence policy, items, lanes, QC alerts.

Nothing here reads a clock, a camera or the network: times are arguments, so
tests are exact and the pipeline stays the only place with side effects.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np

from agent.config import PresenceConfig, QcConfig, SortingConfig, Thresholds
from contract.openset import UNKNOWN_LABEL, carried_score


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, numerically stable (float64 so entropy of near-certain rows is exact enough)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(probs: np.ndarray) -> float:
    """Natural-log entropy of one probability row."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum())


@dataclass(frozen=True)
class PolicyThresholds:
    min_confidence: float | None = None
    min_margin: float | None = None
    max_entropy: float | None = None
    max_unknown_score: float | None = None     # None: no unknown verdict (a bundle without open_set)

    @classmethod
    def resolve(cls, bundle: Mapping[str, float], override: Thresholds | None = None,
                unknown_threshold: float | None = None) -> "PolicyThresholds":
        """Per-camera override wins over the bundle's suggestion, field by field.

        ``unknown_threshold``: the bundle's calibrated open_set threshold; None for a bundle without open_set,
        which has no unknown score, so an override of it is ignored too."""
        def pick(name: str, default: float | None) -> float | None:
            value = getattr(override, name, None) if override is not None else None
            return value if value is not None else default

        unknown = pick("max_unknown_score", unknown_threshold) if unknown_threshold is not None else None
        return cls(pick("min_confidence", bundle.get("min_confidence")), pick("min_margin", bundle.get("min_margin")),
                   pick("max_entropy", bundle.get("max_entropy")), unknown)


@dataclass(frozen=True)
class Classification:
    class_id: int | None              # None when the frame is decided unknown
    label: str                        # the top-1 label, or UNKNOWN_LABEL
    confidence: float                 # the top-1 probability (also for an unknown frame)
    margin: float
    entropy: float
    top_k: tuple[tuple[str, float], ...]
    reasons: tuple[str, ...]          # why it is low-confidence; empty when confident
    probs: np.ndarray = field(repr=False, compare=False)
    unknown_score: float | None = None    # the bundle's unknown score; None without open_set

    @property
    def low_confidence(self) -> bool:
        return bool(self.reasons)

    @property
    def top_label(self) -> str:
        """The model's most probable label, also when the frame is decided unknown (presence reads it)."""
        return self.top_k[0][0]


class LowConfidencePolicy:
    """A frame is low-confidence when any configured threshold says so (docs/bundle.md)."""

    def __init__(self, thresholds: PolicyThresholds) -> None:
        self.thresholds = thresholds

    def reasons(self, confidence: float, margin: float, ent: float) -> tuple[str, ...]:
        t = self.thresholds
        out = []
        if t.min_confidence is not None and confidence < t.min_confidence:
            out.append(f"confidence {confidence:.3f} < {t.min_confidence:g}")
        if t.min_margin is not None and margin < t.min_margin:
            out.append(f"margin {margin:.3f} < {t.min_margin:g}")
        if t.max_entropy is not None and ent > t.max_entropy:
            out.append(f"entropy {ent:.3f} > {t.max_entropy:g}")
        return tuple(out)

    def unknown(self, score: float | None, what: str = "", at_least: float | None = None) -> str | None:
        """Why a frame (or an item, ``what`` says how its score was made) is unknown: its score is above the
        threshold (raised to ``at_least``: an item its shipment vouches for); None when it is not, or there is no
        score or threshold."""
        limit = self.thresholds.max_unknown_score
        if limit is not None and at_least is not None:
            limit = max(limit, at_least)
        if score is None or limit is None or not score > limit:
            return None
        return f"unknown score {score:.4g}{what} > {limit:.4g}"


def entropies(probs: np.ndarray) -> np.ndarray:
    """Row-wise natural-log entropy of a batch of probability rows."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def classify_batch(probs: np.ndarray, labels: Sequence[str], k: int, policies: Sequence[LowConfidencePolicy],
                   unknown_scores: Sequence[float] | None = None) -> list[Classification]:
    """``classify`` for every row, with the sorting and entropy done once for the batch."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :max(k, 2)]
    ents = entropies(probs)
    scores = [None] * len(probs) if unknown_scores is None else [float(x) for x in unknown_scores]
    out = []
    for row, idx, ent, policy, score in zip(probs, order.tolist(), ents.tolist(), policies, scores):
        confidence = float(row[idx[0]])
        margin = confidence - (float(row[idx[1]]) if len(idx) > 1 else 0.0)
        top_k = tuple((labels[i], round(float(row[i]), 6)) for i in idx[:k])
        # its own copy: a tracker keeps up to max_frames rows, and a view would keep the whole batch alive
        out.append(_verdict(idx[0], labels, confidence, margin, ent, top_k, policy, row.copy(), score))
    return out


def _verdict(top: int, labels: Sequence[str], confidence: float, margin: float, ent: float,
             top_k: tuple[tuple[str, float], ...], policy: LowConfidencePolicy, probs: np.ndarray,
             score: float | None) -> Classification:
    """The frame's classification: its top-1 label, or unknown (no class, sent for labelling) when its unknown
    score is above the threshold."""
    reasons = policy.reasons(confidence, margin, ent)
    unknown = policy.unknown(score)
    if unknown is not None:
        return Classification(None, UNKNOWN_LABEL, confidence, margin, ent, top_k, (unknown, *reasons), probs, score)
    return Classification(top, labels[top], confidence, margin, ent, top_k, reasons, probs, score)


def classify(probs: np.ndarray, labels: Sequence[str], k: int, policy: LowConfidencePolicy,
             unknown_score: float | None = None) -> Classification:
    """Top-k and the policy's verdict for one probability row."""
    order = np.argsort(-probs, kind="stable")
    top = int(order[0])
    confidence = float(probs[top])
    margin = confidence - (float(probs[order[1]]) if len(order) > 1 else 0.0)
    ent = entropy(probs)
    top_k = tuple((labels[int(i)], round(float(probs[int(i)]), 6)) for i in order[:k])
    return _verdict(top, labels, confidence, margin, ent, top_k, policy, probs, unknown_score)


# ---------------------------------------------------------------- items

def item_present(cfg: PresenceConfig, localized: bool | None, label: str | None) -> bool | None:
    """Is an item in view? None when presence is off.

    ``localized``: the localizer's verdict (None when the frame was not localized); ``label``: the model's
    top-1 (None when the model did not run, which only happens when the localizer saw no item).
    """
    mode = cfg.mode
    if mode == "off":
        return None
    by_class = label is not None and label != cfg.empty_class
    if mode == "empty_class":
        return by_class
    by_background = bool(localized)
    return by_background if mode == "background" else (by_background and by_class)


@dataclass(frozen=True)
class Observation:
    """One frame of an item, as the tracker needs it."""

    frame_seq: int
    captured_at: float
    classification: Classification
    box: tuple[int, int, int, int] | None = None      # the item's box in the ROI, where the localizer found one
    edges: frozenset[str] = frozenset()               # the ROI edges the box reaches: left, top, right, bottom
    view: Any = field(default=None, compare=False, repr=False)   # the caller's frame, kept for the item's best view

    @property
    def whole(self) -> bool:
        """The box stays off the ROI's edge: all of the item is in view."""
        return not self.edges

    def view_rank(self) -> tuple[bool, int]:
        """How well this frame shows the item to a reviewer: all of it in view first, then the larger box."""
        return self.whole, box_area(self.box) if self.box is not None else 0


def roi_edges(box: tuple[int, int, int, int], width: int, height: int) -> frozenset[str]:
    """The edges of a ``width`` x ``height`` ROI that ``box`` reaches."""
    x0, y0, x1, y1 = box
    return frozenset(name for name, reached in (("left", x0 <= 0), ("top", y0 <= 0), ("right", x1 >= width),
                                                ("bottom", y1 >= height)) if reached)


def box_area(box: tuple[int, int, int, int]) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def box_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area: 1 when one box holds the other (an item entering grows)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min(box_area(a), box_area(b))
    return iw * ih / smaller if smaller > 0 else 0.0


@dataclass(frozen=True)
class ItemDecision:
    camera_id: str
    item_seq: int
    label: str                                    # UNKNOWN_LABEL when the item's unknown score is above the threshold
    class_id: int | None                          # None for an unknown item
    confidence: float
    agreement: float
    frames: int
    first_seen: float
    last_seen: float
    lane: str
    low_confidence: bool
    reasons: tuple[str, ...]
    top_k: tuple[tuple[str, float], ...]
    frame_seqs: tuple[int, int] | None = None     # the first and last frame the item was seen in
    prior: bool = False                           # decided with a shipment's expected-label weights
    unknown_score: float | None = None            # median unknown score of the deciding frames; None without open_set
    view: Any = field(default=None, compare=False, repr=False)   # the best view's payload (Observation.view)
    view_seq: int | None = None                   # the frame the best view is of
    vouched: bool = False                         # not unknown only because the open shipment vouched for it
    track: str | None = None                      # the id every frame of this item was given (ItemTracker.track)


def weighted(probs: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
    """Probability rows times ``prior`` (per label), renormalized; the rows unchanged without a prior."""
    if prior is None:
        return probs
    out = np.asarray(probs, dtype=np.float64) * prior
    return out / out.sum(axis=-1, keepdims=True)


def consensus(observations: Sequence[Observation], labels: Sequence[str], k: int = 3,
              prior: np.ndarray | None = None) -> tuple[int, float, float, tuple[tuple[str, float], ...]]:
    """Mean probability over the item's frames: (class id, its mean prob, share of frames agreeing, top-k).

    ``prior`` (per-label weights, agent/receiving.py) weighs every frame's probabilities before the mean, so
    the agreement counts frames whose weighted top-1 is the winner."""
    rows = weighted(np.array([o.classification.probs for o in observations]), prior)
    mean = rows.mean(axis=0)
    winner = int(np.argmax(mean))
    agreement = float((rows.argmax(axis=1) == winner).sum()) / len(observations)
    order = np.argsort(-mean, kind="stable")[:k]
    return winner, float(mean[winner]), agreement, tuple((labels[int(i)], round(float(mean[i]), 6)) for i in order)


class LaneMap:
    def __init__(self, cfg: SortingConfig) -> None:
        self.cfg = cfg

    def lane_for(self, label: str, needs_review: bool) -> str:
        if needs_review:
            return self.cfg.review_lane
        return self.cfg.lanes.get(label, self.cfg.default_lane)


REVIEW_BUDGET_MIN_ITEMS = 10     # recent items the review budget needs before it ranks


@dataclass(frozen=True)
class _Verdict:
    """What an item's frames say (ItemTracker._verdict): its label (UNKNOWN_LABEL when ``unknown``), the consensus,
    and the reasons to review it before the review budget."""

    label: str
    class_id: int
    confidence: float
    agreement: float
    top_k: tuple[tuple[str, float], ...]
    reasons: tuple[str, ...]
    score: float | None
    unknown: str | None
    vouched: bool
    prior: bool


class ItemTracker:
    """Groups one camera's frames into items and decides each item once, when it leaves."""

    def __init__(self, camera_id: str, labels: Sequence[str], presence: PresenceConfig,
                 lanes: LaneMap, policy: LowConfidencePolicy, top_k: int = 3,
                 prior: Callable[[Sequence[str]], np.ndarray | None] | None = None,
                 vouched_threshold: Callable[[str], float | None] | None = None,
                 new_track: Callable[[], str] | None = None) -> None:
        self.camera_id = camera_id
        self.labels = list(labels)
        self.cfg = presence
        self.lanes = lanes
        self.policy = policy
        self.top_k = top_k
        self.prior = prior               # per-label weights of the open shipment, asked once per item
        self.vouched_threshold = vouched_threshold   # label -> the open shipment's looser unknown threshold, or None
        self.items_seen = 0
        self.noise_items = 0
        self.spared = 0                  # flagged items the review budget sorted by their label
        self._recent: deque[float] = deque(maxlen=lanes.cfg.review_window)   # decided items' confidences
        self._frames: list[Observation] = []
        self._gap = 0
        self._peak: tuple[int, frozenset[str]] = (0, frozenset())   # the current item's largest box: area, edges
        self._low_area: int | None = None  # its smallest edge-cut area since it began to go out (None: it has not)
        self._best: Observation | None = None   # the current item's best view (Observation.view_rank), its view kept
        self._last_box: tuple[int, int, int, int] | None = None    # the current item's box in its last frame
        self._decided = False            # the current item was decided at max_frames and is still in view
        self._stay_label: str | None = None   # that item's label when it has no box and presence is by label alone
        self._new_track = new_track or (lambda: str(uuid.uuid4()))
        self._track: str | None = None   # the current item's id, given at its first frame
        self.track: str | None = None    # the id of the item the last frame given to update() belongs to (None: none)

    def update(self, obs: Observation | None, present: bool) -> ItemDecision | None:
        """One frame; ``obs`` may be None for a frame without an item (the model did not run).

        A frame whose box hardly overlaps the last one's (``split_overlap``), or that grows again at the ROI's
        edge after the item shrank there (``regrow_split``), starts another item: the one before is decided
        now, so two items with no empty frame between them are two decisions.

        Each item gets an id (``track``) at its first frame; after the call, ``self.track`` is the id of the item
        this frame belongs to (None for a frame without one), so the frames a station uploads can be told apart
        by item, as the item's decision is.

        An item still in view at ``max_frames`` is decided then. A localized one (its frame has a box) stays that
        item, decided, until it ends as any item does (empty frames, a jump, a regrow): a belt stopped with an
        item under the camera is one decision, not one every ``max_frames``. Its later frames are not kept.

        An item without a box seen by its label alone (presence ``empty_class``, ``max_frames`` over 1) cannot be
        told from the next one with no empty frame between but by its label: it stays that item, decided once,
        while each later run of ``max_frames`` frames comes to the same label; a run that comes to another label
        is another item, decided then with a track of its own (the run's earlier frames were given the one before:
        nothing tells where in the run it changed), and so is the rest of the stay at its end (``min_frames`` at
        least). Only ``max_frames`` frames are kept. With ``max_frames`` 1 every frame is an item (a camera
        triggered once per item). Without a box in another mode, the item ends at ``max_frames`` and the next
        frame starts another.
        """
        self.track = None
        if present and obs is not None:
            decision = self._close() if self._another_item(obs) or self._regrown(obs) else None
            if self._track is None:
                self._track = self._new_track()
            self.track = self._track
            self._last_box = obs.box
            self._track_area(obs)
            self._gap = 0
            if self._decided and self._stay_label is None:
                return decision
            self._keep_view(obs)
            self._frames.append(replace(obs, view=None) if obs.view is not None else obs)
            if decision is None and len(self._frames) >= self.cfg.max_frames:
                if self._stay_label is not None or (obs.box is None and self._stays_by_label()):
                    return self._decide_stay()
                if obs.box is None:
                    return self._close()
                self._decided = True
                return self._decision(*self._take())
            return decision
        if self._track is None:
            return None
        self._gap += 1
        return self._close() if self._gap >= self.cfg.gap_frames else None

    def _stays_by_label(self) -> bool:
        """An item without a box stays one item, decided once, while its label does not change (update)."""
        return self.cfg.mode == "empty_class" and self.cfg.max_frames > 1

    def _decide_stay(self) -> ItemDecision | None:
        """``max_frames`` frames of an item known by its label alone: decided at the first run; a later run that
        comes to the stay's label adds nothing, one that comes to another is the next item."""
        frames, best, track = self._take()
        if self._stay_label is not None:
            if self._verdict(frames).label == self._stay_label:
                return None
            track = self._track = self.track = self._new_track()
        self._decided = True
        decision = self._decision(frames, best, track)
        self._stay_label = decision.label
        return decision

    def _another_item(self, obs: Observation) -> bool:
        last = self._last_box
        if last is None or obs.box is None or self.cfg.split_overlap <= 0:
            return False
        return box_overlap(last, obs.box) < self.cfg.split_overlap

    def _regrown(self, obs: Observation) -> bool:
        """Another item coming in where one is going out: one box follows both, and no frame is empty.

        The item going out shrinks at the ROI's edge; the one coming in grows there. The box overlaps from
        frame to frame, so only its area tells them apart. The item begins to go out when its box, under half
        its largest area, reaches an edge that its largest box did not (it crosses that edge); from then on the
        smallest edge-cut area is kept, and a box ``regrow_split`` times that, back over a quarter of the
        largest, is the next item. An item moved about in full view, or whose mask flickers (even one that
        rests against an edge: it reaches no new one), never begins to go out; a sliver flickering on its way
        out never gets back to a quarter of the item."""
        ratio = self.cfg.regrow_split
        if ratio <= 0 or obs.box is None or obs.whole or self._low_area is None:
            return False
        area = box_area(obs.box)
        return area >= ratio * self._low_area and area >= self._peak[0] / 4

    def _keep_view(self, obs: Observation) -> None:
        """Keep the frame that shows the item best (the first of equals): the one view of it kept in memory, the
        one a reviewer is sent when the item is decided unsure. The other frames are kept without their view."""
        if self._best is None or obs.view_rank() > self._best.view_rank():
            self._best = obs

    def _track_area(self, obs: Observation) -> None:
        if obs.box is None:
            return
        area = box_area(obs.box)
        if area > self._peak[0]:
            self._peak = (area, obs.edges)
        if obs.whole:
            self._low_area = None
        elif self._low_area is not None:
            self._low_area = min(self._low_area, area)
        elif area <= self._peak[0] / 2 and obs.edges - self._peak[1]:
            self._low_area = area

    def flush(self) -> ItemDecision | None:
        """End of input: decide an item still in view."""
        return self._close() if self._track is not None else None

    def _deciding(self, frames: list[Observation]) -> list[Observation]:
        """The frames an item is decided on: those that show all of it (``whole_views``), when there are any.

        A frame of an item half out of view is a guess about another shape; averaged in, a few of them turn a
        sure decision into a review."""
        whole = [o for o in frames if o.whole] if self.cfg.whole_views else frames
        return whole or frames

    def _over_budget(self, confidence: float) -> bool:
        """With ``review_budget``: is this flagged item more certain than the budget's share of recent items?

        The thresholds say which items are unsure; the budget keeps the review lane to about that share of the
        station's own items, the least certain first (a scene less certain than the export's validation set
        would otherwise send most items to review). Until ``REVIEW_BUDGET_MIN_ITEMS`` items are seen, the
        thresholds alone decide."""
        budget = self.lanes.cfg.review_budget
        if budget is None or len(self._recent) < REVIEW_BUDGET_MIN_ITEMS:
            return False
        less_certain = sum(c < confidence for c in self._recent) / len(self._recent)
        return less_certain >= budget

    def _take(self) -> tuple[list[Observation], Observation | None, str | None]:
        """The current item's frames, best view and track; its frames and best view are let go."""
        frames, self._frames = self._frames, []
        best, self._best = self._best, None
        return frames, best, self._track

    def _close(self) -> ItemDecision | None:
        """The current item ends: its decision, or None when it is noise or was decided at ``max_frames``."""
        frames, best, track = self._take()
        decided, self._decided = self._decided, False
        stay, self._stay_label = self._stay_label, None
        self._gap, self._track, self._last_box = 0, None, None
        self._peak, self._low_area = (0, frozenset()), None
        if stay is not None:        # the rest of an item known by its label: another item only by another label
            if len(frames) < self.cfg.min_frames or self._verdict(frames).label == stay:
                return None
            return self._decision(frames, best, self._new_track())
        if decided:
            return None
        if len(frames) < self.cfg.min_frames:
            self.noise_items += 1
            return None
        return self._decision(frames, best, track)

    def _verdict(self, frames: list[Observation]) -> _Verdict:
        """What an item's frames say, before the review budget; nothing is counted or remembered."""
        frames = self._deciding(frames)
        prior = self.prior(self.labels) if self.prior is not None else None
        class_id, confidence, agreement, top_k = consensus(frames, self.labels, self.top_k, prior)
        mean = weighted(np.array([o.classification.probs for o in frames]), prior).mean(axis=0)
        ranked = np.sort(mean)[::-1]
        reasons = self.policy.reasons(confidence, float(ranked[0] - ranked[1]), entropy(mean))
        if agreement < self.lanes.cfg.min_agreement:
            reasons = reasons + (f"agreement {agreement:.2f} < {self.lanes.cfg.min_agreement:g}",)
        score = median_unknown_score(frames)
        # decided sure on a label the open shipment still expects: judged at the shipment's looser threshold
        at_least = (self.vouched_threshold(self.labels[class_id])
                    if self.vouched_threshold is not None and not reasons else None)
        unknown = self.policy.unknown(score, f" (median of {len(frames)} frames)", at_least)
        vouched = unknown is None and at_least is not None and self.policy.unknown(score) is not None
        label = UNKNOWN_LABEL if unknown is not None else self.labels[class_id]
        return _Verdict(label, class_id, confidence, agreement, top_k, reasons, score, unknown, vouched,
                        prior is not None)

    def _decision(self, frames: list[Observation], best: Observation | None, track: str | None) -> ItemDecision:
        """The consensus of an item's frames, its lane and reasons (counted as a seen item)."""
        self.items_seen += 1
        verdict = self._verdict(frames)
        confidence, reasons, unknown = verdict.confidence, verdict.reasons, verdict.unknown
        if unknown is not None:
            reasons = (unknown, *reasons)       # never spared by the review budget: no label's lane fits it
        elif reasons and self._over_budget(confidence):
            self.spared += 1
            reasons = ()
        self._recent.append(confidence)
        label, score = verdict.label, verdict.score
        return ItemDecision(
            camera_id=self.camera_id, item_seq=self.items_seen, label=label,
            class_id=None if unknown is not None else verdict.class_id,
            confidence=round(confidence, 6), agreement=round(verdict.agreement, 4), frames=len(frames),
            first_seen=frames[0].captured_at, last_seen=frames[-1].captured_at,
            lane=self.lanes.lane_for(label, bool(reasons)), low_confidence=bool(reasons), reasons=reasons,
            top_k=verdict.top_k, frame_seqs=(frames[0].frame_seq, frames[-1].frame_seq), prior=verdict.prior,
            unknown_score=carried_score(score) if score is not None else None,
            view=best.view if best is not None else None, view_seq=best.frame_seq if best is not None else None,
            vouched=verdict.vouched, track=track,
        )


def median_unknown_score(frames: Sequence[Observation]) -> float | None:
    """The item's unknown score: the median of its frames' (one odd frame, a hand or a glare, does not make a
    known item unknown, nor the reverse); None when its frames have no score (a bundle without open_set)."""
    scores = [o.classification.unknown_score for o in frames]
    if not scores or any(x is None for x in scores):
        return None
    return float(np.median(scores))


# ---------------------------------------------------------------- QC and uploads

class QcAlerter:
    """A defect class seen with enough confidence raises an alert, at most once per cooldown."""

    def __init__(self, cfg: QcConfig) -> None:
        self.cfg = cfg
        self._last: dict[tuple[str, str], float] = {}

    def check(self, camera_id: str, cls: Classification, now: float) -> bool:
        if cls.label not in self.cfg.defect_classes or cls.confidence < self.cfg.min_confidence:
            return False
        key = (camera_id, cls.label)
        last = self._last.get(key)
        if last is not None and 0 <= now - last < self.cfg.cooldown_s:     # < 0: the clock stepped back (NTP)
            return False
        self._last[key] = now
        return True


def dhash(image: np.ndarray, size: int = 8) -> int:
    """64-bit difference hash: near-identical frames differ in few bits."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(gray, (size + 1, size), interpolation=cv2.INTER_AREA)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count() if hasattr(int, "bit_count") else bin(a ^ b).count("1")


@dataclass(frozen=True)
class HeldFrame:
    """The one low-confidence frame a camera holds in its current interval (``UploadGate.offer``): the least
    certain so far. ``frame``: what the caller sends when it is released (the gate never looks inside it)."""

    confidence: float
    frame_hash: int
    since: float            # when the interval began: its first candidate
    frame: Any


@dataclass(frozen=True)
class GateOutcome:
    """What an offer or a sweep decided: the held frames now due to be sent (``send``, the callers' objects), and
    one reason per frame held back for good (``held_back``: 'rate' or 'duplicate'), for the counters."""

    send: tuple[Any, ...] = ()
    held_back: tuple[str, ...] = ()

    def __add__(self, other: "GateOutcome") -> "GateOutcome":
        return GateOutcome(self.send + other.send, self.held_back + other.held_back)


class UploadGate:
    """Per camera: a rate limit and near-duplicate suppression, so a stuck item does not flood the uplink.

    Low-confidence frames (``offer``): per camera, at most one per ``min_interval_s``, and the one sent is the
    least certain (lowest confidence) of its interval, not the first: the first candidate opens an interval, each
    candidate less certain than the one held replaces it (one slot per camera: memory bounded by the cameras),
    and the held one is sent once the interval has ended (``offer`` or ``sweep`` at or after its end; ``flush``
    at the end of the input). A candidate within ``dedupe_bits`` of one of the last ``window`` uploads is held
    back as a duplicate, checked when it would take the slot and again when it is released. Cameras never share
    a slot or an interval. ``admit``: an item's one best view (only the duplicate check), and the first-come
    rate limit this gate had before (kept for callers that send at once).
    """

    def __init__(self, min_interval_s: float, dedupe_bits: int, window: int) -> None:
        self.min_interval_s = min_interval_s
        self.dedupe_bits = dedupe_bits
        self.window = window
        self._last: dict[str, float] = {}
        self._hashes: dict[str, list[int]] = {}
        self._held: dict[str, HeldFrame] = {}

    def admit(self, camera_id: str, frame_hash: int | Callable[[], int], now: float,
              rate_limited: bool = True) -> str | None:
        """None when the frame may go; else why it is held back ('rate' or 'duplicate').

        ``frame_hash`` may be a callable, so the hash is only computed for frames the rate limit lets through.
        ``rate_limited=False`` (an item's one best view): only a near-duplicate is held back, and the frame does
        not count towards the rate limit.
        """
        last = self._last.get(camera_id)
        if rate_limited and last is not None and 0 <= now - last < self.min_interval_s:   # < 0: clock stepped back
            return "rate"
        if callable(frame_hash):
            frame_hash = frame_hash()
        if self._duplicate(camera_id, frame_hash):
            return "duplicate"
        if rate_limited:
            self._last[camera_id] = now
        self._remember(camera_id, frame_hash)
        return None

    def offer(self, camera_id: str, confidence: float, frame_hash: int | Callable[[], int], now: float,
              frame: Any) -> GateOutcome:
        """A low-confidence frame: held when it is the least certain of its camera's interval (the one it replaces
        is held back, 'rate'), else held back ('rate', or 'duplicate' of a recent upload). What the camera held
        from an interval that has ended is released first; with ``min_interval_s`` 0 every frame goes at once.
        ``frame_hash`` may be a callable: computed only for a frame that would take the slot."""
        outcome = self._release(camera_id, now, due_only=True)
        held = self._held.get(camera_id)
        if held is not None and not confidence < held.confidence:     # the held one is as uncertain: it stays
            return outcome + GateOutcome(held_back=("rate",))
        if callable(frame_hash):
            frame_hash = frame_hash()
        if self._duplicate(camera_id, frame_hash):
            return outcome + GateOutcome(held_back=("duplicate",))
        self._held[camera_id] = HeldFrame(confidence, frame_hash, held.since if held else now, frame)
        displaced = GateOutcome(held_back=("rate",)) if held is not None else GateOutcome()
        return outcome + displaced + self._release(camera_id, now, due_only=True)

    def sweep(self, camera_id: str, now: float) -> GateOutcome:
        """The camera's held frame when its interval has ended (the caller runs it with each batch, so a camera
        that sees no more low-confidence frames still sends the one it holds)."""
        return self._release(camera_id, now, due_only=True)

    def flush(self, camera_id: str) -> GateOutcome:
        """The camera's held frame, its interval ended or not (the end of the input: none is lost)."""
        return self._release(camera_id, 0.0, due_only=False)

    def _release(self, camera_id: str, now: float, *, due_only: bool) -> GateOutcome:
        held = self._held.get(camera_id)
        if held is None:
            return GateOutcome()
        if due_only and 0 <= now - held.since < self.min_interval_s:      # < 0: the clock stepped back: due
            return GateOutcome()
        del self._held[camera_id]
        if self._duplicate(camera_id, held.frame_hash):     # an item's view like it went meanwhile
            return GateOutcome(held_back=("duplicate",))
        self._remember(camera_id, held.frame_hash)
        return GateOutcome(send=(held.frame,))

    def _duplicate(self, camera_id: str, frame_hash: int) -> bool:
        recent = self._hashes.get(camera_id, [])
        return bool(self.window) and any(hamming(frame_hash, h) <= self.dedupe_bits for h in recent)

    def _remember(self, camera_id: str, frame_hash: int) -> None:
        recent = self._hashes.setdefault(camera_id, [])
        recent.append(frame_hash)
        del recent[:-self.window or None]
