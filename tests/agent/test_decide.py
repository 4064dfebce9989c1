"""Pure decision logic: exact, with clocks and inputs given by the test."""

from __future__ import annotations

import numpy as np
import pytest

from agent.config import PresenceConfig, QcConfig, SortingConfig, Thresholds
from agent.decide import (
    ItemTracker,
    LaneMap,
    LowConfidencePolicy,
    Observation,
    PolicyThresholds,
    QcAlerter,
    UploadGate,
    classify,
    consensus,
    dhash,
    entropy,
    hamming,
    item_present,
    roi_edges,
    softmax,
)

LABELS = ["a", "b", "c"]


def cls_of(p, policy=None):
    return classify(np.asarray(p, dtype=np.float64), LABELS, 2, policy or LowConfidencePolicy(PolicyThresholds()))


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0]]))
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(p[0], [0.5, 0.5, 0.0]) and np.allclose(p[1], 1 / 3)


def test_classify_top_k_margin_entropy():
    c = cls_of([0.7, 0.2, 0.1])
    assert (c.label, c.class_id) == ("a", 0)
    assert c.top_k == (("a", 0.7), ("b", 0.2))
    assert c.margin == pytest.approx(0.5)
    assert c.entropy == pytest.approx(entropy(np.array([0.7, 0.2, 0.1])))
    assert not c.low_confidence


@pytest.mark.parametrize("probs, expected", [
    ([0.5, 0.4, 0.1], ["confidence", "margin"]),
    ([0.9, 0.05, 0.05], []),
    ([0.34, 0.33, 0.33], ["confidence", "margin", "entropy"]),
])
def test_low_confidence_policy_names_each_reason(probs, expected):
    policy = LowConfidencePolicy(PolicyThresholds(min_confidence=0.6, min_margin=0.2, max_entropy=1.0))
    reasons = cls_of(probs, policy).reasons
    assert [r.split()[0] for r in reasons] == expected


def test_thresholds_default_from_bundle_and_override_per_camera():
    bundle = {"min_confidence": 0.62, "min_margin": 0.21, "max_entropy": 0.95}
    assert PolicyThresholds.resolve(bundle) == PolicyThresholds(0.62, 0.21, 0.95)
    resolved = PolicyThresholds.resolve(bundle, Thresholds(min_confidence=0.8))
    assert resolved == PolicyThresholds(0.8, 0.21, 0.95)


def test_presence_comes_from_the_localizer_the_empty_class_or_both():
    off = PresenceConfig(mode="off")
    background = PresenceConfig(mode="background")
    by_class = PresenceConfig(mode="empty_class", empty_class="empty")
    both = PresenceConfig(mode="both", empty_class="empty")
    assert item_present(off, True, "a") is None
    assert [item_present(background, seen, label) for seen, label in [(True, "a"), (False, None), (None, "a")]] == [
        True, False, False]
    assert [item_present(by_class, None, label) for label in ("a", "empty")] == [True, False]
    # both: the localizer must see an item and the model must not call it empty
    assert [item_present(both, seen, label) for seen, label in [(True, "a"), (True, "empty"), (False, None)]] == [
        True, False, False]


def test_a_frame_without_an_item_ends_an_item_without_an_observation():
    t = _tracker()
    t.update(obs(1, [0.9, 0.05, 0.05]), True)
    t.update(obs(2, [0.9, 0.05, 0.05]), True)
    assert t.update(None, False) is None
    d = t.update(None, False)
    assert d is not None and d.frames == 2


def _tracker(**presence):
    cfg = PresenceConfig(mode="background", min_frames=2, gap_frames=2, **presence)
    lanes = LaneMap(SortingConfig(lanes={"a": "lane-1"}, default_lane="lane-9", review_lane="review", min_agreement=0.6))
    policy = LowConfidencePolicy(PolicyThresholds(min_confidence=0.5))
    return ItemTracker("cam", LABELS, cfg, lanes, policy, top_k=2)


def obs(i, p):
    return Observation(i, 100.0 + i, cls_of(p))


def test_one_decision_per_item_from_consensus_mapped_to_lane():
    t = _tracker()
    seen = [t.update(obs(1, [0.9, 0.05, 0.05]), True), t.update(obs(2, [0.4, 0.5, 0.1]), True),
            t.update(obs(3, [0.8, 0.1, 0.1]), True), t.update(obs(4, [1, 0, 0]), False)]
    assert seen == [None] * 4
    d = t.update(obs(5, [1, 0, 0]), False)
    assert d is not None and (d.label, d.lane, d.frames, d.item_seq) == ("a", "lane-1", 3, 1)
    assert d.confidence == pytest.approx((0.9 + 0.4 + 0.8) / 3)
    assert d.agreement == pytest.approx(2 / 3, abs=1e-4)
    assert (d.first_seen, d.last_seen) == (101.0, 103.0)
    assert t.update(obs(6, [1, 0, 0]), False) is None     # no second decision for the same item


def test_short_blips_are_noise_and_uncertain_items_go_to_review():
    t = _tracker()
    t.update(obs(1, [0.9, 0.05, 0.05]), True)
    t.update(obs(2, [0, 0, 1]), False)
    assert t.update(obs(3, [0, 0, 1]), False) is None and t.noise_items == 1
    t.update(obs(4, [0.4, 0.35, 0.25]), True)
    t.update(obs(5, [0.2, 0.45, 0.35]), True)
    d = t.flush()
    assert d is not None and d.lane == "review" and d.low_confidence
    assert any(r.startswith("confidence") for r in d.reasons)


def test_item_longer_than_max_frames_is_decided_anyway():
    t = _tracker(max_frames=3)
    results = [t.update(obs(i, [0, 0.9, 0.1]), True) for i in range(3)]
    assert results[:2] == [None, None] and results[2].label == "b" and results[2].lane == "lane-9"


def boxed(i, p, box, roi=300):
    """A frame of an item whose box is ``box`` in a ``roi`` px square ROI (the edges it reaches follow)."""
    return Observation(i, 100.0 + i, cls_of(p), box, roi_edges(box, roi, roi))


def test_an_item_whose_box_jumps_is_another_item_even_without_an_empty_frame():
    """One item taken away as the next is put down elsewhere: two decisions; an item that moves or grows
    as it enters (its boxes overlap) stays one."""
    t = _tracker()
    moving = [(0, 0, 40, 40), (10, 0, 60, 40), (30, 0, 90, 40)]           # overlaps 0.75, 0.67 of the smaller
    assert [t.update(boxed(i, [0.9, 0.05, 0.05], b), True) for i, b in enumerate(moving)] == [None] * 3
    first = t.update(boxed(3, [0.05, 0.9, 0.05], (150, 150, 200, 200)), True)
    assert first is not None and (first.label, first.frames) == ("a", 3)
    t.update(boxed(4, [0.05, 0.9, 0.05], (150, 150, 200, 200)), True)
    second = t.flush()
    assert second is not None and (second.label, second.frames, second.item_seq) == ("b", 2, 2)
    never = _tracker(split_overlap=0.0)
    decisions = [never.update(boxed(i, [0.9, 0.05, 0.05], b), True)
                 for i, b in enumerate([(0, 0, 40, 40), (150, 150, 200, 200)])]
    assert decisions == [None, None] and never.flush().frames == 2


def test_every_frame_of_an_item_is_given_the_items_track_and_the_next_item_another():
    # given: tracks numbered in order, an item of 3 frames, an empty frame, a noise blip, then two items back to
    # back (the box jumps) and one cut by max_frames
    ids = iter(f"track-{n}" for n in range(1, 10))
    t = _tracker(max_frames=3)
    t._new_track = lambda: next(ids)
    seen = []
    for i, (box, present) in enumerate([((0, 0, 40, 40), True), ((5, 0, 45, 40), True), ((10, 0, 50, 40), True),
                                         (None, False), (None, False), ((0, 0, 40, 40), True), (None, False),
                                         (None, False), ((0, 0, 40, 40), True), ((0, 0, 40, 40), True),
                                         ((150, 150, 200, 200), True), ((150, 150, 200, 200), True)], start=1):
        o = boxed(i, [0.9, 0.05, 0.05], box) if box is not None else None
        d = t.update(o, present)
        seen.append((t.track, d.track if d is not None else None))
    # then: each frame is told its item's track (an empty frame none), and each decision carries the track its
    # frames were given: the third frame closes its own item (max_frames), a jump closes the item before
    assert seen == [("track-1", None), ("track-1", None), ("track-1", "track-1"), (None, None), (None, None),
                    ("track-2", None), (None, None), (None, None),        # a one-frame blip: noise, no decision
                    ("track-3", None), ("track-3", None), ("track-4", "track-3"), ("track-4", None)]
    assert t.flush().track == "track-4"
    # by default a track is a fresh UUID for each item
    u = _tracker()
    u.update(obs(1, [0.9, 0.05, 0.05]), True)
    first = u.track
    u.update(obs(2, [0.9, 0.05, 0.05]), True)
    assert u.track == first and u.flush().track == first
    u.update(obs(3, [0.9, 0.05, 0.05]), True)
    assert u.track != first and len(u.track) == 36 and u.track.count("-") == 4


# The bench benchmark's two merges (localizer boxes in a 300 px ROI, margin 0): a bag at rest against the
# bottom edge, taken out over the right edge while a shirt comes in over the bottom one, no empty frame between.
BAG_OUT_SHIRT_IN = [((36, 45, 249, 300), "a"), ((36, 48, 246, 300), "a"), ((198, 48, 300, 300), "a"),
                    ((87, 258, 258, 300), "b"), ((72, 192, 273, 300), "b"), ((54, 129, 279, 300), "b"),
                    ((48, 27, 276, 300), "b"), ((48, 27, 276, 300), "b")]
PROBS = {"a": [0.9, 0.05, 0.05], "b": [0.05, 0.9, 0.05]}


def test_an_item_going_out_as_the_next_comes_in_at_the_edge_is_two_items():
    # given boxes that overlap from frame to frame (the split by overlap does not fire) but shrink to a sliver
    # over a new edge and grow again
    t = _tracker()
    decisions = [t.update(boxed(i, PROBS[label], box), True) for i, (box, label) in enumerate(BAG_OUT_SHIRT_IN)]
    # then the bag is decided when the shirt has grown back over a quarter of the bag, and the shirt alone after
    first = [d for d in decisions if d is not None]
    assert len(first) == 1 and (first[0].label, first[0].frames) == ("a", 4)
    second = t.flush()
    assert second is not None and (second.label, second.frames, second.item_seq) == ("b", 4, 2)
    # and with regrow_split 0 they are one item, as before the rule
    off = _tracker(regrow_split=0.0)
    assert [off.update(boxed(i, PROBS[label], box), True) for i, (box, label) in enumerate(BAG_OUT_SHIRT_IN)] \
        == [None] * 8
    assert off.flush().frames == 8


@pytest.mark.parametrize("boxes", [
    # an item in full view whose mask flickers to a third and back
    [(50, 50, 250, 250), (120, 120, 240, 240), (50, 50, 250, 250)],
    # ... and then moves on to the edge: its small frame was in full view, not an item going out
    [(50, 50, 250, 250), (120, 120, 240, 240), (100, 50, 300, 250)],
    # a pale shirt resting against the bottom edge whose mask falls to a quarter for a frame (bench benchmark):
    # cut by the edge it always reached, it is not going out
    [(36, 33, 255, 300), (171, 108, 255, 300), (36, 30, 255, 300), (36, 30, 252, 300)],
    # an item pushed mostly out of view, pulled back into full view, then against the edge
    [(50, 50, 250, 250), (200, 50, 300, 250), (260, 50, 300, 250), (90, 50, 290, 250), (100, 50, 300, 250)],
    # an item going out whose sliver flickers (x2) but never gets back to a quarter of the item
    [(50, 50, 250, 250), (200, 50, 300, 250), (280, 50, 300, 250), (260, 50, 300, 250), (280, 50, 300, 250)],
])
def test_a_flickering_or_leaving_item_stays_one_item(boxes):
    t = _tracker()
    seen = [t.update(boxed(i, [0.9, 0.05, 0.05], box), True) for i, box in enumerate(boxes)]
    assert seen == [None] * len(boxes) and t.flush().frames == len(boxes)


def test_an_item_is_decided_on_the_frames_that_show_all_of_it():
    frames = [boxed(1, [0.1, 0.8, 0.1], (0, 0, 30, 30)),      # half out of view: looks like "b"
              boxed(2, [0.1, 0.8, 0.1], (0, 0, 60, 60)),
              boxed(3, [0.1, 0.8, 0.1], (0, 0, 90, 90)),
              boxed(4, [0.7, 0.2, 0.1], (10, 10, 100, 100)), boxed(5, [0.7, 0.2, 0.1], (12, 10, 102, 100))]
    t = _tracker()
    for o in frames:
        t.update(o, True)
    d = t.flush()
    assert (d.label, d.frames, d.first_seen, d.last_seen) == ("a", 5, 101.0, 105.0)
    assert d.confidence == pytest.approx(0.7) and d.agreement == 1.0
    every = _tracker(whole_views=False)
    for o in frames:
        every.update(o, True)
    assert every.flush().label == "b"                                      # all five frames: "b" wins


def test_consensus_uses_mean_probability_not_votes():
    frames = [obs(1, [0.51, 0.49, 0]), obs(2, [0.51, 0.49, 0]), obs(3, [0.0, 1.0, 0])]
    class_id, conf, agreement, top = consensus(frames, LABELS, 2)
    assert LABELS[class_id] == "b" and agreement == pytest.approx(1 / 3) and top[0][0] == "b"


def test_qc_alert_for_defect_class_with_cooldown():
    qc = QcAlerter(QcConfig(defect_classes=["c"], min_confidence=0.6, cooldown_s=10))
    defect, weak, other = cls_of([0.1, 0.1, 0.8]), cls_of([0.3, 0.2, 0.5]), cls_of([0.8, 0.1, 0.1])
    assert qc.check("cam", other, 0.0) is False
    assert qc.check("cam", weak, 0.0) is False
    assert qc.check("cam", defect, 0.0) is True
    assert qc.check("cam", defect, 5.0) is False
    assert qc.check("cam2", defect, 5.0) is True
    assert qc.check("cam", defect, 10.0) is True
    assert qc.check("cam", defect, 10.0 - 3600) is True     # the clock stepped back an hour (NTP): not muted


def test_a_clock_stepped_back_never_holds_uploads_or_empty_scenes_for_the_size_of_the_step():
    from agent.empty_scene import EmptySceneCapture

    gate = UploadGate(min_interval_s=1.0, dedupe_bits=0, window=0)
    assert gate.admit("cam", 1, 5000.0) is None
    assert gate.admit("cam", 2, 5000.5) == "rate"
    assert gate.admit("cam", 3, 1400.0) is None                # an hour back: due, not an hour of "rate"
    assert gate.admit("cam", 4, 1400.5) == "rate"
    capture = EmptySceneCapture(["cam"], interval_s=60.0, wait_s=10.0, spacing_s=1.0, now=5000.0)
    assert capture.offer("cam", True, 5061.0).trigger == "schedule"       # due again at 5121
    assert capture.offer("cam", True, 1500.0).trigger is None             # an hour back: due within one interval
    assert capture.offer("cam", True, 1561.0).trigger == "schedule"


def test_dhash_sees_near_duplicates_and_upload_gate_limits():
    rng = np.random.default_rng(0)
    base = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    noisy = np.clip(base.astype(int) + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
    other = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    assert hamming(dhash(base), dhash(noisy)) <= 6 < hamming(dhash(base), dhash(other))
    gate = UploadGate(min_interval_s=1.0, dedupe_bits=6, window=4)
    assert gate.admit("cam", dhash(base), 0.0) is None
    assert gate.admit("cam", dhash(other), 0.5) == "rate"
    assert gate.admit("cam", dhash(noisy), 2.0) == "duplicate"
    assert gate.admit("cam", dhash(other), 2.0) is None
    assert gate.admit("cam2", dhash(base), 2.0) is None


def test_an_items_one_best_view_is_its_largest_frame_in_full_view_and_goes_with_its_decision():
    # given: an item coming in over the left edge (edge-cut, then bigger than any whole view), resting whole,
    # whole and larger once, then going out; then a second item seen only edge-cut
    t = _tracker(split_overlap=0.0, regrow_split=0.0)
    seen = [((0, 50, 90, 150), "enter"), ((0, 40, 160, 160), "big but cut"), ((20, 50, 120, 150), "whole"),
            ((20, 45, 125, 155), "whole, larger"), ((22, 50, 122, 150), "whole"), ((0, 50, 60, 150), "leave")]
    for i, (box, view) in enumerate(seen, start=1):
        assert t.update(Observation(i, 100.0 + i, cls_of([0.4, 0.35, 0.25]), box, roi_edges(box, 300, 300), view),
                        True) is None
    # then: only the best view is kept with its payload; the frames the item is decided on keep none
    assert all(o.view is None for o in t._frames)
    d = t.flush()
    assert d.low_confidence and (d.view, d.view_seq) == ("whole, larger", 4)
    # a second item never whole: its largest edge-cut frame (the first of equals), nothing of the first item
    for i, box in enumerate([(0, 0, 40, 100), (0, 0, 80, 100), (0, 0, 80, 100)], start=10):
        t.update(Observation(i, 100.0 + i, cls_of([0.9, 0.05, 0.05]), box, roi_edges(box, 300, 300), f"v{i}"), True)
    d = t.flush()
    assert (d.view, d.view_seq) == ("v11", 11) and not d.low_confidence
    # frames without a box (no localizer) keep the first frame
    t.update(Observation(20, 120.0, cls_of([0.9, 0.05, 0.05]), view="first"), True)
    t.update(Observation(21, 121.0, cls_of([0.9, 0.05, 0.05]), view="second"), True)
    assert t.flush().view == "first"


def test_an_item_view_skips_the_rate_limit_but_not_the_duplicate_check():
    rng = np.random.default_rng(3)
    base, other, third = ((rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(3))
    gate = UploadGate(min_interval_s=10.0, dedupe_bits=6, window=4)
    assert gate.admit("cam", dhash(base), 0.0) is None
    assert gate.admit("cam", dhash(other), 1.0) == "rate"
    assert gate.admit("cam", dhash(other), 1.0, rate_limited=False) is None     # an item's view goes
    assert gate.admit("cam", dhash(base), 2.0, rate_limited=False) == "duplicate"
    # it did not restart the rate limit's clock, and it is remembered as a recent upload
    assert gate.admit("cam", dhash(third), 10.5) is None
    assert gate.admit("cam", dhash(other), 30.0) == "duplicate"


def test_a_classification_keeps_its_own_row_not_a_view_of_the_batch():
    """A tracker keeps up to max_frames classifications per camera; a view into the batch's array would keep
    every batch it came from alive (8 cameras in a batch: 8 times the memory)."""
    from agent.decide import classify_batch

    probs = np.full((8, 1000), 1e-3)
    probs[:, 0] = 0.001 + 1 - probs.sum(axis=1)
    policy = LowConfidencePolicy(PolicyThresholds(min_confidence=0.5))
    rows = classify_batch(probs, [f"c{i}" for i in range(1000)], 3, [policy] * 8)
    assert all(r.probs.base is None and r.probs.shape == (1000,) for r in rows)
    np.testing.assert_array_equal(rows[3].probs, probs[3])


def test_classify_batch_equals_classify_row_by_row():
    from agent.decide import classify_batch

    probs = softmax(np.random.default_rng(1).standard_normal((6, 3)) * 3)
    policies = [LowConfidencePolicy(PolicyThresholds(min_confidence=0.6, min_margin=0.2, max_entropy=0.8))] * 6
    batch = classify_batch(probs, LABELS, 2, policies)
    for row, got in zip(probs, batch):
        want = classify(row, LABELS, 2, policies[0])
        assert (got.class_id, got.top_k, got.reasons) == (want.class_id, want.top_k, want.reasons)
        assert got.margin == pytest.approx(want.margin) and got.entropy == pytest.approx(want.entropy)


def _decide_item(t: ItemTracker, top: float, start: int):
    rest = (1.0 - top) / 2
    t.update(obs(start, [top, rest, rest]), True)
    t.update(obs(start + 1, [top, rest, rest]), True)
    return t.flush()


def test_the_review_budget_sends_only_the_least_certain_share_of_recent_items_to_review():
    # given: a scene where every item is below the 0.5 threshold, at confidences spread 0.36-0.49
    cfg = PresenceConfig(mode="background", min_frames=2, gap_frames=2)
    policy = LowConfidencePolicy(PolicyThresholds(min_confidence=0.5))
    confidences = np.random.default_rng(0).permutation(np.linspace(0.36, 0.49, 100))
    plain = ItemTracker("cam", LABELS, cfg, LaneMap(SortingConfig(review_lane="review", review_budget=None)), policy)
    budget = ItemTracker("cam", LABELS, cfg, LaneMap(SortingConfig(review_lane="review", review_window=50)), policy)
    assert SortingConfig().review_budget == 0.1          # on by default; null turns it off
    # when
    without = [_decide_item(plain, c, 10 * i) for i, c in enumerate(confidences)]
    within = [_decide_item(budget, c, 10 * i) for i, c in enumerate(confidences)]
    # then: without a budget all 100 go to review; with one, the first 10 (too few seen to rank) and then about
    # a tenth, each less certain than 90% of the 50 items before it
    assert all(d.lane == "review" for d in without)
    reviewed = [d for d in within if d.lane == "review"]
    assert all(d.low_confidence and d.reasons for d in reviewed)
    assert all(not d.low_confidence and not d.reasons and d.lane == "default" for d in within if d not in reviewed)
    later = [d for d in within[10:] if d.lane == "review"]
    assert 3 <= len(later) <= 18 and budget.spared == 100 - len(reviewed)
    for i, d in enumerate(within[10:], start=10):
        recent = confidences[max(0, i - 50):i]
        assert (d.lane == "review") == (np.mean(recent < confidences[i]) < 0.1)
    # a confident item is never sent to review, budget or not
    assert _decide_item(budget, 0.95, 5000).lane == "default"
