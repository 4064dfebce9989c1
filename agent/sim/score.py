"""Scoring a station's messages against a rendered scene's truth (agent/sim/scenes.py): pure functions.

Used by ``python -m agent demo`` (its summary) and ``benchmarks/station_view.py`` (its JSON documents);
nothing here touches a broker, a model or torch.

* items: decided correctly (exactly one decision, with the item's label), wrong (exactly one, with
  another label, auto-sorted or sent to review), missed (no decision), split (more than one) or never
  visible (no frame shows it): these five outcomes partition the items; besides them, merged decisions
  (one decision over two items), phantom decisions (over no item's frames), share sent to manual review;
* decisions auto-sorted and wrong (``auto_sorted_decisions``, ``auto_wrong_decisions``): every decision not sent
  to review, each decision of a split item and each phantom among them; wrong when its item's label differs or
  it has no item (a phantom sorted as a product). ``auto_sorted``/``auto_wrong`` (kept: the JSON of runs before
  2026-12-07 and ``agent demo`` read them) count only items with exactly one decision, so a split item's
  decision sorted to a wrong lane and a sorted phantom were left out;
* frames: accuracy where the item is fully inside the ROI, where it is partly in, and results on
  frames with no item that still name a product (an empty belt reported as a product);
* the camera: frames captured, dropped by the hub, classified, from the last stats message: the agent sends
  one every ``health.stats_interval_s`` and a final one at a clean stop; a run where that final one did not
  arrive (or one before 2026-12-07, when there was none) may end on one that predates the scene's end
  (``last_stats_stale``: it counted fewer frames captured than the scene has); its drop count then says nothing
  of the frames after it.

Decisions are matched to items by frame span: a decision's first_seen/last_seen are the captured_at
of its first/last frame, results map captured_at -> source_ref (the file name) -> frame -> item.
"""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

EMPTY_LABELS = frozenset({"", "empty", "background", "none", "no item"})


@dataclass(frozen=True)
class FrameClock:
    """captured_at -> frame index, learnt from results (they carry both captured_at and source_ref).

    A time with no result of its own (a frame the station did not publish) is placed by linear
    interpolation between its neighbours: frames are captured in order, one camera, one clock. A time before
    the first result or after the last is placed only within one frame's time of it: further out nothing tells
    which frame it was (snapped to the edge, a decision over empty frames before the first result was scored
    against the first item instead of as unplaced).
    """

    times: tuple[float, ...]
    frames: tuple[int, ...]

    @classmethod
    def from_results(cls, results: Sequence[dict], frame_of_file: dict[str, int]) -> "FrameClock":
        pairs = sorted({(round(float(r["captured_at"]), 6), frame_of_file[r["source_ref"]])
                        for r in results if r.get("source_ref") in frame_of_file})
        return cls(tuple(t for t, _ in pairs), tuple(f for _, f in pairs))

    def frame_at(self, ts: float) -> int | None:
        if not self.times:
            return None
        ts = round(float(ts), 6)
        i = bisect.bisect_left(self.times, ts)
        if i < len(self.times) and self.times[i] == ts:
            return self.frames[i]
        if i == 0 or i == len(self.times):
            edge = 0 if i == 0 else -1
            return self.frames[edge] if abs(ts - self.times[edge]) <= self._frame_time() else None
        t0, t1, f0, f1 = self.times[i - 1], self.times[i], self.frames[i - 1], self.frames[i]
        return int(round(f0 + (f1 - f0) * (ts - t0) / (t1 - t0)))

    def _frame_time(self) -> float:
        """The time from one frame to the next (the median over the results; 0 with a single result)."""
        steps = [(t1 - t0) / (f1 - f0) for t0, t1, f0, f1 in zip(self.times, self.times[1:], self.frames,
                                                                  self.frames[1:]) if f1 > f0]
        return statistics.median_high(steps) if steps else 0.0


def decision_spans(decisions: Sequence[dict], clock: FrameClock) -> list[tuple[int, int] | None]:
    """Each decision's (first frame, last frame); None where the clock cannot place it."""
    spans = []
    for d in decisions:
        a, b = clock.frame_at(d["first_seen"]), clock.frame_at(d["last_seen"])
        spans.append(None if a is None or b is None else (min(a, b), max(a, b)))
    return spans


def overlaps(span: tuple[int, int], visible: dict[int, frozenset[int]]) -> dict[int, int]:
    """Item -> how many of its visible frames lie in the span (items with none left out)."""
    a, b = span
    out = {}
    for item, frames in visible.items():
        n = sum(1 for f in frames if a <= f <= b)
        if n:
            out[item] = n
    return out


def match_decisions(spans: Sequence[tuple[int, int] | None], visible: dict[int, frozenset[int]]
                    ) -> list[int | None]:
    """Each decision's item: the one whose visible frames it overlaps most (ties: the earlier item);
    None: a phantom (it overlaps no item's frames, or could not be placed)."""
    out: list[int | None] = []
    for span in spans:
        hits = overlaps(span, visible) if span is not None else {}
        out.append(min(hits, key=lambda item: (-hits[item], item)) if hits else None)
    return out


def is_review(decision: dict, review_lane: str) -> bool:
    return bool(decision.get("low_confidence")) or decision.get("lane") == review_lane


def score_items(items: Sequence[dict], decisions: Sequence[dict], spans: Sequence[tuple[int, int] | None],
                review_lane: str = "manual-review", merge_min_frames: int = 3) -> dict[str, Any]:
    """Per-item figures from truth items (item, label_name, visible_frames) and matched decisions.

    Each item has exactly one outcome: correct + wrong + missed + split + never_visible == items.
    ``auto_sorted_decisions``/``auto_wrong_decisions``: decisions not sent to review, and those of them with
    another label than their item's or with no item (a phantom); ``auto_sorted``/``auto_wrong``: the items
    with exactly one decision, auto-sorted, and those of them wrong (a part of ``wrong``)."""
    visible = {it["item"]: frozenset(it["visible_frames"]) for it in items}
    owner = match_decisions(spans, visible)
    label_of = {it["item"]: it["label_name"] for it in items}
    sorted_decisions = [(d, o) for d, o in zip(decisions, owner) if not is_review(d, review_lane)]
    sorted_wrong = sum(1 for d, o in sorted_decisions if o is None or d["label"] != label_of[o])
    by_item: dict[int, list[dict]] = {it["item"]: [] for it in items}
    for d, item in zip(decisions, owner):
        if item is not None:
            by_item[item].append(d)
    counts = dict(correct=0, wrong=0, missed=0, split=0, review=0, auto_sorted=0, auto_wrong=0, never_visible=0)
    for it in items:
        mine = by_item[it["item"]]
        if not it["visible_frames"]:          # no camera could decide it: neither missed nor in the shares
            counts["never_visible"] += 1
            continue
        counts["missed"] += not mine
        counts["split"] += len(mine) > 1
        counts["review"] += any(is_review(d, review_lane) for d in mine)
        if len(mine) == 1:
            counts["correct"] += mine[0]["label"] == it["label_name"]
            counts["wrong"] += mine[0]["label"] != it["label_name"]
            if not is_review(mine[0], review_lane):
                counts["auto_sorted"] += 1
                counts["auto_wrong"] += mine[0]["label"] != it["label_name"]
    n = len(items) - counts["never_visible"]
    merged = sum(1 for s in spans if s is not None and sum(
        k >= min(merge_min_frames, len(visible[i])) for i, k in overlaps(s, visible).items()) >= 2)
    phantoms = sum(1 for o in owner if o is None)
    return {"items": len(items), "decisions": len(decisions), **counts, "phantom_decisions": phantoms,
            "merged_decisions": merged, "unplaced_decisions": sum(1 for s in spans if s is None),
            "item_accuracy": _ratio(counts["correct"], n), "item_accuracy_ci95": wilson(counts["correct"], n),
            "review_share": _ratio(counts["review"], n),
            "missed_share": _ratio(counts["missed"], n), "split_share": _ratio(counts["split"], n),
            "wrong_share": _ratio(counts["wrong"], n),
            "auto_sorted_accuracy": _ratio(counts["auto_sorted"] - counts["auto_wrong"], counts["auto_sorted"]),
            "auto_sorted_decisions": len(sorted_decisions), "auto_wrong_decisions": sorted_wrong,
            "auto_sorted_decision_accuracy": _ratio(len(sorted_decisions) - sorted_wrong, len(sorted_decisions))}


def score_frames(truth_frames: Sequence[dict], items: Sequence[dict], results: Sequence[dict],
                 empty_labels: frozenset[str] = EMPTY_LABELS) -> dict[str, Any]:
    """Per-frame figures: accuracy on fully-in and partly-in frames, and products reported on empty frames."""
    label_of = {it["item"]: it["label_name"] for it in items}
    result_of = {}
    for r in results:
        result_of.setdefault(r.get("source_ref"), r)
    full = dict(frames=0, results=0, correct=0)
    partial = dict(frames=0, results=0, correct=0)
    empty = dict(frames=0, results=0, products=0)
    for f in truth_frames:
        r = result_of.get(f["file"])
        if len(f["full"]) == 1:
            _tally(full, r, {label_of[f["full"][0]]})
        elif f["visible"] and not f["full"]:
            _tally(partial, r, {label_of[i] for i in f["visible"]})
        elif not f["visible"]:
            empty["frames"] += 1
            empty["results"] += r is not None
            empty["products"] += r is not None and (r.get("label") or "").strip().lower() not in empty_labels
    return {"full": {**full, "accuracy": _ratio(full["correct"], full["frames"]),
                     "accuracy_of_published": _ratio(full["correct"], full["results"])},
            "partial": {**partial, "accuracy": _ratio(partial["correct"], partial["frames"])},
            "empty": {**empty, "product_rate": _ratio(empty["products"], empty["frames"])}}


def _tally(acc: dict[str, int], result: dict | None, labels: set[str]) -> None:
    acc["frames"] += 1
    if result is not None:
        acc["results"] += 1
        acc["correct"] += result.get("label") in labels


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def wilson(successes: int, n: int, z: float = 1.96) -> list[float] | None:
    """The Wilson score interval of a proportion (95% by default): what ``successes`` of ``n`` items say about
    the rate over all items. 60 items leave about +-9 points around 85%, so a scene's figure is read with it."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def camera_counts(truth: dict, results: Sequence[dict], stats: Sequence[dict], camera: str) -> dict[str, Any]:
    """Frames in the scene vs captured, dropped and classified (last stats message) and results received.

    ``last_stats_stale``: the last stats message counted fewer frames captured than the scene has (or none came):
    it was sent before the scene's end, and its drop count covers only the frames captured until then."""
    last = max(stats, key=lambda s: s.get("seq", 0)) if stats else {}
    seqs = sorted({int(r["frame_seq"]) for r in results})
    captured = (last.get("frames_captured") or {}).get(camera)
    return {"frames_in_scene": truth["n_frames"], "results_received": len(results),
            "max_frame_seq": seqs[-1] if seqs else 0,
            "frames_captured_last_stats": captured,
            "frames_dropped_last_stats": (last.get("frames_dropped") or {}).get(camera, 0) if last else None,
            "frames_classified_last_stats": last.get("frames_classified"),
            "last_stats_stale": captured is None or captured < truth["n_frames"]}


def item_details(items: Sequence[dict], decisions: Sequence[dict], spans: Sequence[tuple[int, int] | None]
                 ) -> dict[str, list]:
    """Per item its visible span and the decisions matched to it; the phantom decisions: for reading a run."""
    owner = match_decisions(spans, {it["item"]: frozenset(it["visible_frames"]) for it in items})
    brief = lambda d, s: {"span": list(s) if s else None, "label": d["label"], "lane": d["lane"],  # noqa: E731
                          "confidence": d["confidence"], "frames": d["frames"]}
    per_item = [{"item": it["item"], "test_index": it["test_index"], "label": it["label_name"],
                 "visible": [it["visible_frames"][0], it["visible_frames"][-1]] if it["visible_frames"] else None,
                 "full_frames": len(it["full_frames"]),
                 "decisions": [brief(d, s) for d, s, o in zip(decisions, spans, owner) if o == it["item"]]}
                for it in items]
    phantoms = [brief(d, s) for d, s, o in zip(decisions, spans, owner) if o is None]
    return {"per_item": per_item, "phantoms": phantoms}


def score_scene(truth: dict, results: Sequence[dict], decisions: Sequence[dict], stats: Sequence[dict] = (),
                camera: str = "cam0", review_lane: str = "manual-review") -> dict[str, Any]:
    """Everything the benchmark reports for one scene, from truth.json and the station's messages."""
    frame_of_file = {f["file"]: f["frame"] for f in truth["frames"]}
    clock = FrameClock.from_results(results, frame_of_file)
    spans = decision_spans(decisions, clock)
    return {"items": score_items(truth["items"], decisions, spans, review_lane),
            "frames": score_frames(truth["frames"], truth["items"], results),
            "camera": camera_counts(truth, results, stats, camera),
            "details": item_details(truth["items"], decisions, spans)}
