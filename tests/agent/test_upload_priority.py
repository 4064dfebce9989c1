"""Which low-confidence frame goes back for retraining when the rate limit (frames.min_interval_s) holds most back:
per camera, the least certain one of each interval, not the first (agent/decide.py ``UploadGate.offer``).

Real parts: the gate itself, and the inference stage on a bundle run by ONNX Runtime, real Fashion-MNIST frames and
the SQLite outbox. The clock is the stage's own injected clock (set by the test), so no test waits on time.
"""

from __future__ import annotations

import json

from agent_support import as_config, inference_stage, station_config, validate_message

from agent.decide import UploadGate
from agent.sources.base import Frame


def offered(gate: UploadGate, camera: str, frames: list[tuple[float, float, int]]) -> tuple[list, list]:
    """(what was sent, why each frame held back was) for (time, confidence, hash) offered in turn."""
    sent, back = [], []
    for t, confidence, frame_hash in frames:
        outcome = gate.offer(camera, confidence, frame_hash, t, confidence)
        sent += outcome.send
        back += outcome.held_back
    return sent, back


def test_the_least_certain_frame_of_each_interval_goes_not_the_first():
    # given: a 2 s budget, and the frames of the report: 0.49 first, then 0.05, 0.10; 0.48 then 0.02
    gate = UploadGate(min_interval_s=2.0, dedupe_bits=0, window=0)
    frames = [(0.0, 0.49, 0x1), (0.5, 0.05, 0x2), (1.0, 0.10, 0x3), (2.1, 0.48, 0x4), (2.4, 0.02, 0x5)]
    # when: they are offered, and the input ends
    sent, back = offered(gate, "cam-a", frames)
    end = gate.flush("cam-a")
    # then: 0.05 went when its interval ended (at 2.1), 0.02 at the end; every other frame counted once as 'rate'
    assert sent == [0.05] and end.send == (0.02,)
    assert back == ["rate"] * 3 and end.held_back == ()
    assert gate.flush("cam-a").send == ()        # nothing is held twice


def test_a_held_frame_goes_when_its_interval_ends_without_another_candidate():
    gate = UploadGate(min_interval_s=2.0, dedupe_bits=0, window=0)
    assert gate.offer("cam-a", 0.3, 0x1, 10.0, "a").send == ()
    assert gate.sweep("cam-a", 11.9).send == ()             # its interval runs to 12.0
    assert gate.sweep("cam-a", 12.0).send == ("a",)
    assert gate.sweep("cam-a", 20.0).send == ()
    # a clock stepped back (NTP) releases it rather than holding it for the size of the step
    gate.offer("cam-a", 0.3, 0x2, 5000.0, "b")
    assert gate.sweep("cam-a", 1400.0).send == ("b",)


def test_cameras_never_share_a_slot_or_an_interval():
    # given: cam-a offers very uncertain frames all the time, cam-b one mildly uncertain frame
    gate = UploadGate(min_interval_s=2.0, dedupe_bits=0, window=0)
    sent_a, _ = offered(gate, "cam-a", [(t / 10, 0.01, t) for t in range(30)])
    sent_b, back_b = offered(gate, "cam-b", [(0.5, 0.45, 0x99)])
    # then: cam-b's frame goes at the end of its own interval, whatever cam-a holds
    assert back_b == [] and gate.sweep("cam-b", 2.5).send == (0.45,)
    assert sent_a == [0.01]                    # cam-a: one per interval (0..2 s), its second interval still held
    assert len(gate._held) == 1                 # one slot per camera at most (only cam-a holds one now)


def test_a_near_duplicate_of_a_recent_upload_never_takes_the_slot():
    # given: a frame uploaded, then a less certain near-duplicate of it (a stuck item) and a different frame
    gate = UploadGate(min_interval_s=1.0, dedupe_bits=6, window=4)
    assert gate.offer("cam", 0.4, 0b1111, 0.0, "first").send == ()
    assert gate.sweep("cam", 1.0).send == ("first",)
    other = 0xFFFF_0000_FFFF_0000
    sent, back = offered(gate, "cam", [(1.5, 0.3, other), (1.6, 0.1, 0b1110)])
    # then: the duplicate is held back as such, and the different (more certain) frame stays in the slot
    assert back == ["duplicate"] and sent == []
    assert gate.flush("cam").send == (0.3,)


def test_an_items_view_still_skips_the_rate_limit():
    gate = UploadGate(min_interval_s=10.0, dedupe_bits=6, window=4)
    gate.offer("cam", 0.2, 0x0F0F, 0.0, "held")
    assert gate.admit("cam", 0xF0F0_0000_0000, 1.0, rate_limited=False) is None
    assert gate.flush("cam").send == ("held",)


def test_with_no_interval_every_frame_goes_at_once():
    gate = UploadGate(min_interval_s=0.0, dedupe_bits=0, window=0)
    sent, back = offered(gate, "cam", [(0.0, 0.4, 1), (0.0, 0.5, 2), (0.1, 0.1, 3)])
    assert sent == [0.4, 0.5, 0.1] and back == []


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_station_sends_each_cameras_least_certain_frame_of_the_interval(tmp_path, tiny_bundle,
                                                                            fmnist_test_images):
    # given: a station of two cameras, every frame low-confidence (a random-weight model, strict thresholds),
    # one frame back per camera per 10 s, no dedupe
    strict = {"min_confidence": 0.99}
    cfg = as_config(station_config(
        tmp_path, tiny_bundle, str(tmp_path), 1,
        cameras=[{"id": "cam-a", "uri": str(tmp_path), "thresholds": strict},
                 {"id": "cam-b", "uri": str(tmp_path), "thresholds": strict}],
        frames={"min_interval_s": 10.0, "dedupe_bits": 0, "dedupe_window": 0, "empty_scene_interval_s": 0}))
    stage, outbox, metrics, _ = inference_stage(cfg, tiny_bundle)
    stage.clock = clock = Clock(1000.0)
    images = fmnist_test_images[0]

    def frame(camera: str, i: int) -> Frame:
        image = images[i]
        rgb = image if image.ndim == 3 else image[..., None].repeat(3, axis=2)
        return Frame(camera, i, clock.now, 0.0, rgb)

    # when: cam-a sees 6 frames within one interval, cam-b one, then only cam-b goes on after the interval
    for i in range(6):
        clock.now = 1000.0 + i
        stage.process([frame("cam-a", i)])
    clock.now = 1005.5
    stage.process([frame("cam-b", 50)])
    records = outbox.pending(limit=1000)
    assert [r for r in records if r.kind == "frame"] == []      # held until the intervals end
    clock.now = 1010.0
    stage.process([frame("cam-b", 51)])         # cam-a's interval (1000..1010) ended: its held frame goes
    clock.now = 1016.0
    stage._flush_items()                        # the end of the input: cam-b's held frame is not lost

    # then: cam-a sent its least certain frame of the interval, with the message a frame always had
    records = outbox.pending(limit=1000)
    results = {(r.body["camera"], r.body["frame_seq"]): r.body for r in records if r.kind == "result"}
    frames = [r.body for r in records if r.kind == "frame"]
    least_a = min((b for (cam, _), b in results.items() if cam == "cam-a"), key=lambda b: b["confidence"])
    assert all(b["low_confidence"] for b in results.values())
    assert [(f["camera"], f["frame_seq"]) for f in frames] == [("cam-a", least_a["frame_seq"]),
                                                              ("cam-b", min((50, 51), key=lambda s:
                                                                            results[("cam-b", s)]["confidence"]))]
    sent = frames[0]
    validate_message("frame.v1", sent)
    assert sent["confidence"] == least_a["confidence"] and sent["label"] == least_a["label"]
    assert sent["top_k"] == least_a["top_k"] and sent["selected_because"] == least_a["reasons"]
    assert sent["captured_at"] == least_a["captured_at"] and sent["model"] == least_a["model"]
    assert json.loads(json.dumps(sent))["jpeg"]["bytes"] > 0
    # and: every low-confidence frame is counted once, sent or held back
    assert metrics.counter("frames_uploaded_total", camera="cam-a") == 1
    assert metrics.counter("frames_upload_suppressed_total", camera="cam-a", why="rate") == 5
    assert metrics.counter("frames_uploaded_total", camera="cam-b") == 1
    assert metrics.counter("frames_upload_suppressed_total", camera="cam-b", why="rate") == 1
