"""Scoring a station's decisions against a scene's truth (agent/sim/score.py): every item has one outcome."""

from __future__ import annotations

import random

from agent.sim.score import score_items

OUTCOMES = ("correct", "wrong", "missed", "split", "never_visible")


def decision(label: str, low: bool = False) -> dict:
    return {"label": label, "low_confidence": low, "lane": "manual-review" if low else "lane-1"}


def test_the_outcomes_of_items_partition_them_a_single_wrong_decision_included():
    """One item of each kind: right; one decision with another label, sent to review; the same auto-sorted; no
    decision; two decisions; no frame in view. Each falls in exactly one outcome, and the outcomes add up to the
    items; a wrong decision in review is wrong, not missing from every count."""
    items = [{"item": i, "label_name": "Coat", "visible_frames": [10 * i + 1, 10 * i + 2, 10 * i + 3]}
             for i in range(5)] + [{"item": 5, "label_name": "Bag", "visible_frames": []}]
    decisions = [decision("Coat"), decision("Dress", low=True), decision("Dress"), decision("Coat"), decision("Bag")]
    spans = [(1, 3), (11, 13), (21, 23), (41, 41), (42, 43)]
    s = score_items(items, decisions, spans)
    assert {k: s[k] for k in OUTCOMES} == {"correct": 1, "wrong": 2, "missed": 1, "split": 1, "never_visible": 1}
    assert sum(s[k] for k in OUTCOMES) == s["items"] == 6
    assert (s["auto_wrong"], s["auto_sorted"], s["review"]) == (1, 2, 1)      # auto_wrong: the part of wrong sorted
    assert s["wrong_share"] == 0.4 and s["item_accuracy"] == 0.2


def test_the_outcomes_partition_the_items_whatever_the_decisions():
    """Random decisions (any label, in review or not, over any frames: splits, merges and phantoms among them)
    over items, some never in view: each item is counted in exactly one outcome."""
    rng = random.Random(7)
    labels = ("Coat", "Bag", "Dress")
    for _ in range(300):
        items = [{"item": i, "label_name": rng.choice(labels),
                  "visible_frames": [] if rng.random() < 0.1 else list(range(10 * i, 10 * i + rng.randint(1, 8)))}
                 for i in range(rng.randint(1, 8))]
        decisions = [decision(rng.choice(labels), rng.random() < 0.3) for _ in range(rng.randint(0, 12))]
        spans = [None if rng.random() < 0.05 else tuple(sorted((rng.randint(0, 90), rng.randint(0, 90))))
                 for _ in decisions]
        s = score_items(items, decisions, spans)
        assert sum(s[o] for o in OUTCOMES) == s["items"] == len(items), (items, decisions, spans, s)
        assert s["auto_wrong"] <= s["wrong"]
        # per decision: every decision not in review, a split item's each and phantoms included
        assert s["auto_wrong"] <= s["auto_wrong_decisions"] <= s["auto_sorted_decisions"]
        assert s["auto_sorted_decisions"] == sum(not d["low_confidence"] for d in decisions)
