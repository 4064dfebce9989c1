"""Presence by the model's empty class alone (no box): one decision per stay of an item, unless its label changes.

An item that rests in view longer than max_frames was decided again every max_frames frames, each time with a
new track: one item, several decisions (and its frames split between tracks). The tracker alone first, with exact
inputs; then the station's own inference stage on a real ONNX Runtime bundle (agent_support.make_onnx_bundle),
frames of flat colours the model tells apart.
"""

from __future__ import annotations

import numpy as np
import pytest
from agent_support import as_config, bundle_predictions, inference_stage, make_onnx_bundle, station_config

from agent.config import PresenceConfig, SortingConfig
from agent.decide import ItemTracker, LaneMap, LowConfidencePolicy, Observation, PolicyThresholds, classify
from agent.sources.base import Frame

LABELS = ["empty", "a", "b"]
POLICY = LowConfidencePolicy(PolicyThresholds())


def tracker(**presence) -> ItemTracker:
    cfg = PresenceConfig(**{"mode": "empty_class", "empty_class": "empty", "min_frames": 2, "gap_frames": 2,
                            **presence})
    ids = iter(f"track-{n}" for n in range(1, 1000))
    return ItemTracker("cam", LABELS, cfg, LaneMap(SortingConfig()), POLICY, new_track=lambda: next(ids))


def frame(i: int, label: str, sure: float = 0.9) -> Observation:
    probs = np.full(len(LABELS), (1 - sure) / 2)
    probs[LABELS.index(label)] = sure
    return Observation(i, i / 30, classify(probs, LABELS, 2, POLICY))


def feed(t: ItemTracker, labels: list[str | None]):
    """One frame per label (None: the model says empty, no item): (decisions, the track each frame was given)."""
    decisions, tracks = [], []
    for i, label in enumerate(labels):
        d = t.update(frame(i, label), True) if label is not None else t.update(None, False)
        decisions += [d] if d is not None else []
        tracks.append(t.track)
    return decisions, tracks


def test_an_item_resting_past_max_frames_is_one_decision_and_one_track():
    # given: an item in view for 700 frames (max_frames 300), then two empty frames and the next item
    t = tracker(max_frames=300)
    decisions, tracks = feed(t, ["a"] * 700 + [None, None] + ["b"] * 3)
    decisions += [t.flush()]
    # then: the resting item is decided once, at max_frames, every frame of it given its one track
    assert [(d.label, d.item_seq, d.frames, d.frame_seqs, d.track) for d in decisions] == [
        ("a", 1, 300, (0, 299), "track-1"), ("b", 2, 3, (702, 704), "track-2")]
    assert set(tracks[:700]) == {"track-1"} and tracks[700:702] == [None, None]
    assert t.items_seen == 2 and t.noise_items == 0


def test_a_resting_item_keeps_at_most_max_frames_frames():
    t = tracker(max_frames=5)
    for i in range(53):
        t.update(frame(i, "a"), True)
        assert len(t._frames) < 5
    assert t.flush() is None and t._frames == [] and t._best is None


def test_a_flickering_frame_of_another_label_does_not_make_another_item():
    # given: an item whose frames now and then read as the other label (1 in 5), for 4 runs of max_frames
    t = tracker(max_frames=10)
    decisions, _ = feed(t, ["b" if i % 5 == 4 else "a" for i in range(43)])
    assert t.flush() is None
    assert [(d.label, d.frames) for d in decisions] == [("a", 10)]


def test_another_label_with_no_empty_frame_between_is_another_item():
    # given: item a rests 23 frames, item b takes its place with no empty frame between and rests 27 frames
    t = tracker(max_frames=10)
    decisions, tracks = feed(t, ["a"] * 23 + ["b"] * 27 + [None, None])
    # then: two decisions; b is decided on the first run of max_frames that comes to its label (frames 20-29, 3 of
    # them still a's: nothing tells where in the run it changed), with a track of its own, given from the frame
    # that ends that run on (the run's earlier frames were given a's: they went out before the run was decided)
    assert [(d.label, d.frame_seqs, d.track) for d in decisions] == [("a", (0, 9), "track-1"),
                                                                     ("b", (20, 29), "track-2")]
    assert set(tracks[:29]) == {"track-1"} and set(tracks[29:50]) == {"track-2"}
    assert t.items_seen == 2 and t.flush() is None


@pytest.mark.parametrize("rest, expected", [
    (["a"] * 4, [("a", 10)]),                          # the rest of the stay: nothing more
    (["b"] * 4, [("a", 10), ("b", 4)]),                # another item came in and left before max_frames
    (["b"], [("a", 10)]),                              # one frame of another label: under min_frames
], ids=["same", "other", "blip"])
def test_the_rest_of_a_stay_is_another_decision_only_with_another_label(rest, expected):
    t = tracker(max_frames=10)
    decisions, _ = feed(t, ["a"] * 10 + rest + [None, None])
    assert [(d.label, d.frames) for d in decisions] == expected
    assert len({d.track for d in decisions}) == len(decisions)


def test_with_max_frames_1_every_frame_is_still_an_item():
    """A camera triggered once per item (max_frames 1, as the receiving desk's stations run): same labels in a
    row are as many items."""
    t = tracker(max_frames=1, min_frames=1)
    decisions, tracks = feed(t, ["a", "a", "a", "b"])
    assert [d.label for d in decisions] == ["a", "a", "a", "b"] and len(set(tracks)) == 4


def test_background_presence_without_a_box_is_cut_at_max_frames_as_before():
    """Only presence by the empty class alone stays an item by its label; the other modes are as they were."""
    cfg = PresenceConfig(mode="background", min_frames=2, gap_frames=2, max_frames=3)
    t = ItemTracker("cam", LABELS, cfg, LaneMap(SortingConfig()), POLICY)
    decisions = [d for i in range(7) if (d := t.update(frame(i, "a"), True)) is not None]
    assert [d.frames for d in decisions] == [3, 3]


# ---------------------------------------------------------------- the station's inference stage, real bundle

PALETTE = [(128, 128, 128), (220, 40, 220), (255, 255, 255), (200, 200, 40), (40, 40, 200), (40, 200, 200),
           (200, 40, 40), (20, 20, 20), (40, 200, 40)]


def flat(rgb: tuple[int, int, int], side: int = 32) -> np.ndarray:
    return np.tile(np.asarray(rgb, np.uint8), (side, side, 1))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A real bundle and three colours it gives three labels: (bundle, empty colour, empty label, a, b)."""
    bundle_dir = make_onnx_bundle(tmp_path_factory.mktemp("models"), classes=4)
    labels = bundle_predictions(bundle_dir, [flat(rgb) for rgb in PALETTE])
    first = {}
    for rgb, label in zip(PALETTE, labels):
        first.setdefault(label, rgb)
    assert len(first) >= 3, labels
    (empty_label, empty), (_, a), (_, b) = list(first.items())[:3]
    return bundle_dir, empty, empty_label, a, b


def run_station(tmp_path, scene, colours: list[str]) -> list[dict]:
    """Frames of the named colours (``empty``, ``a``, ``b``) through the inference stage: the decisions stored."""
    bundle_dir, empty, empty_label, a, b = scene
    rgb = {"empty": empty, "a": a, "b": b}
    cfg = as_config(station_config(
        tmp_path, bundle_dir, "unused", 1, frames={"enabled": False},
        decisions={"presence": {"mode": "empty_class", "empty_class": empty_label, "min_frames": 2,
                                "gap_frames": 2, "max_frames": 5}}))
    stage, outbox, _, _ = inference_stage(cfg, bundle_dir)
    try:
        frames = [Frame("cam-a", seq, 1000.0 + seq, float(seq), flat(rgb[c])) for seq, c in enumerate(colours, 1)]
        for start in range(0, len(frames), 4):
            stage.process(frames[start:start + 4])
        return [r.body for r in outbox.pending(limit=1000) if r.kind == "decision"]
    finally:
        outbox.close()


def test_a_station_decides_an_item_resting_in_view_once(tmp_path, scene):
    # given: an item in view for 23 frames (max_frames 5), the empty belt, the next item, the empty belt
    decisions = run_station(tmp_path, scene, ["empty"] * 2 + ["a"] * 23 + ["empty"] * 2 + ["b"] * 4 + ["empty"] * 2)
    # then: two decisions (before: five for the resting item, one every max_frames frames)
    _, _, _, a, b = scene
    assert [(d["frames"], d["item_seq"]) for d in decisions] == [(5, 1), (4, 2)]
    assert decisions[0]["label"] != decisions[1]["label"] and decisions[0]["track"] != decisions[1]["track"]


def test_a_station_decides_the_next_item_put_in_with_no_empty_frame_between(tmp_path, scene):
    decisions = run_station(tmp_path, scene, ["a"] * 12 + ["b"] * 12 + ["empty"] * 2)
    assert len(decisions) == 2 and decisions[0]["label"] != decisions[1]["label"]
    assert decisions[0]["track"] != decisions[1]["track"]
