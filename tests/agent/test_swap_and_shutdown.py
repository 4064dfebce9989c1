"""A model swap does not split an item or reuse its number, and a stop classifies the frames already queued.

Real parts: tiny ONNX models run by ONNX Runtime, the station's own background localizer, the SQLite outbox, the
agent's real threads. The one stand-in holds the inference thread's model run until the stage is told to stop,
so frames are certainly queued at that moment.
"""

from __future__ import annotations

import threading

import numpy as np
from agent_support import as_config, inference_stage, make_onnx_bundle, station_config

import agent.app as app
from agent.app import Agent, build_runtime
from agent.health import Metrics
from agent.outbox import Outbox
from agent.pipeline import InferenceStage, ModelHolder
from agent.sources.base import EndOfStream, Frame
from agent.sources.camera import FrameHub
from contract.bundle import load_bundle

BELT = np.full((64, 64, 3), 30, np.uint8)
ITEM = BELT.copy()
ITEM[16:48, 16:48] = (200, 60, 60)


def belt_config(tmp_path, bundle):
    """Items found by the background localizer, decided after 2 frames without them."""
    return as_config(station_config(tmp_path, bundle, str(tmp_path), 1, frames={"enabled": False},
                                    decisions={"presence": {"mode": "background", "min_frames": 2, "gap_frames": 2},
                                               "sorting": {"review_budget": None}}))


class Belt:
    """Hands the stage one frame at a time, numbered in order, as a camera thread would."""

    def __init__(self, stage: InferenceStage) -> None:
        self.stage = stage
        self.seq = 0

    def show(self, image: np.ndarray, frames: int) -> None:
        for _ in range(frames):
            self.seq += 1
            self.stage.process([Frame("cam-a", self.seq, 1000.0 + self.seq, float(self.seq), image)])


def decisions(outbox: Outbox) -> list[dict]:
    return [r.body for r in outbox.pending(limit=1000) if r.kind == "decision"]


# ------------------------------------------------------------------ a model swap with an item in view

def test_an_item_in_view_across_a_swap_to_a_model_with_the_same_labels_is_one_decision(tmp_path):
    # given: a station running model A, and model B with the same labels (a routine rollout)
    first = make_onnx_bundle(tmp_path / "A", version="A")
    stage, outbox, _, _ = inference_stage(belt_config(tmp_path, first), first)
    same_labels = build_runtime(stage.cfg, load_bundle(make_onnx_bundle(tmp_path / "B", version="B")))
    belt = Belt(stage)
    # when: an item is in view for 4 frames, B is swapped in, the item stays 4 frames more and leaves
    belt.show(BELT, 3)
    belt.show(ITEM, 4)
    stage.model.swap(same_labels)
    belt.show(ITEM, 4)
    belt.show(BELT, 3)
    # and another item passes
    belt.show(ITEM, 3)
    belt.show(BELT, 3)
    # then: one decision per item, numbered 1 and 2, the first on all 8 of its frames, named after the model
    # that decided it
    got = [(d["item_seq"], d["frames"], d["model"]["version"]) for d in decisions(outbox)]
    assert got == [(1, 8, "B"), (2, 3, "B")]
    outbox.close()


def test_item_numbers_go_on_across_a_swap_to_a_model_with_other_labels(tmp_path):
    # given: a station running model A (4 labels), and model C with 5
    first = make_onnx_bundle(tmp_path / "A", version="A")
    stage, outbox, _, _ = inference_stage(belt_config(tmp_path, first), first)
    other_labels = build_runtime(stage.cfg, load_bundle(make_onnx_bundle(tmp_path / "C", classes=5, version="C")))
    belt = Belt(stage)
    # when: C is swapped in while an item is in view
    belt.show(BELT, 3)
    belt.show(ITEM, 4)
    stage.model.swap(other_labels)
    belt.show(ITEM, 4)
    belt.show(BELT, 3)
    # then: A decides the frames it classified, C the rest, and the second decision is item 2, not item 1 again
    got = [(d["item_seq"], d["frames"], d["model"]["version"]) for d in decisions(outbox)]
    assert got == [(1, 4, "A"), (2, 4, "C")]
    outbox.close()


# ------------------------------------------------------------------ a stop with frames queued

def queued_stage(tmp_path, frames: int, **stage_args) -> tuple[InferenceStage, Outbox, Metrics]:
    """A stage whose camera is still running (so only the stop ends it), with ``frames`` frames queued."""
    bundle = make_onnx_bundle(tmp_path / "m")
    cfg = as_config(station_config(tmp_path, bundle, str(tmp_path), 1, frames={"enabled": False}))
    metrics = Metrics()
    hub = FrameHub(metrics)
    hub.add_camera("cam-a", 64, "block")
    never = threading.Event()
    for seq in range(frames):
        hub.put(Frame("cam-a", seq, 1000.0 + seq, 0.0, ITEM), never)
    outbox = Outbox(cfg.outbox.path, max_bytes=cfg.outbox.max_bytes, max_age_s=cfg.outbox.max_age_s)
    runtime = build_runtime(cfg, load_bundle(bundle))
    stage = InferenceStage(cfg, hub, ModelHolder(runtime), outbox, metrics, cameras_done=lambda: False,
                           **stage_args)
    return stage, outbox, metrics


def results(outbox: Outbox) -> list[int]:
    return sorted(r.body["frame_seq"] for r in outbox.pending(limit=1000) if r.kind == "result")


def test_frames_queued_when_the_stage_is_stopped_are_classified_before_it_ends(tmp_path):
    stage, outbox, metrics = queued_stage(tmp_path, 10)
    stage.stop()            # before its first batch: every frame is still queued
    stage.start()
    assert stage.finished.wait(60)
    stage.join(5)
    assert results(outbox) == list(range(10))
    assert stage.hub.depths() == {"cam-a": 0} and metrics.counter("frames_dropped_total", camera="cam-a") == 0
    outbox.close()


def test_frames_the_drain_has_no_time_for_are_dropped_and_counted(tmp_path):
    stage, outbox, metrics = queued_stage(tmp_path, 10, drain_s=0.0)
    stage.stop()
    stage.start()
    assert stage.finished.wait(60)
    stage.join(5)
    assert results(outbox) == []
    assert stage.hub.depths() == {"cam-a": 0} and metrics.counter("frames_dropped_total", camera="cam-a") == 10
    outbox.close()


def test_a_frame_a_full_blocking_queue_refuses_at_the_stop_is_counted_as_dropped():
    metrics = Metrics()
    hub = FrameHub(metrics)
    hub.add_camera("cam-a", 2, "block")
    stop = threading.Event()
    for seq in range(2):
        hub.put(Frame("cam-a", seq, 1000.0, 0.0, ITEM), stop)
    stop.set()
    hub.put(Frame("cam-a", 2, 1000.0, 0.0, ITEM), stop)     # returns at once: the camera thread is stopping
    assert hub.depths() == {"cam-a": 2} and metrics.counter("frames_dropped_total", camera="cam-a") == 1


class FramesThenStop:
    """A camera that delivers ``frames`` frames, then, at its next read (each of them is queued or in the model's
    hands by then), says so and waits for the agent's stop, when its input ends."""

    name, finite = "frames-then-stop", True

    def __init__(self, frames: int, stop: threading.Event) -> None:
        self.left = frames
        self.stop = stop
        self.all_handed = threading.Event()

    def open(self) -> None: ...

    def read(self):
        if self.left == 0:
            self.all_handed.set()
            self.stop.wait(60)
            raise EndOfStream("stopped")
        self.left -= 1
        return ITEM.copy(), None

    def close(self) -> None: ...


class HeldUntilStageStops:
    """The real backend; a run on the inference thread waits until the inference stage is told to stop (the
    warm-up and checks, on other threads, run at once)."""

    def __init__(self, backend, stage_stopping) -> None:
        self.backend = backend
        self.name, self.precision = backend.name, backend.precision
        self.stage_stopping = stage_stopping

    def warmup(self, *args) -> None:
        self.backend.warmup(*args)

    def run_outputs(self, inputs):
        if threading.current_thread().name == "inference":
            assert self.stage_stopping().wait(60), "the inference stage was never stopped"
        return self.backend.run_outputs(inputs)


def test_agent_shutdown_classifies_the_frames_queued_when_it_stopped(tmp_path, monkeypatch):
    # given: a running station whose model is busy with its first batch while the camera queues 11 more frames
    bundle = make_onnx_bundle(tmp_path / "m")
    cfg = as_config(station_config(tmp_path, bundle, "held", 1, frames={"enabled": False},
                                   cameras=[{"id": "cam-a", "uri": "held", "backpressure": "block",
                                             "queue_size": 64}]))
    agent: Agent | None = None
    real_create = app.create_backend
    monkeypatch.setattr(app, "create_backend", lambda *a, **k: HeldUntilStageStops(
        real_create(*a, **k), lambda: agent.inference.stop_event))
    camera = FramesThenStop(12, threading.Event())
    agent = Agent(cfg, source_factory=lambda cam: camera)
    camera.stop = agent.stop_event
    agent.start()
    try:
        assert camera.all_handed.wait(60)
    finally:
        # when: the station is stopped (SIGTERM)
        agent.shutdown(0)
    # then: every frame the camera delivered was decided, none dropped
    decided = (agent.metrics.counter("frames_classified_total", camera="cam-a")
               + agent.metrics.counter("frames_empty_total", camera="cam-a"))
    assert decided == 12 and agent.metrics.counter("frames_dropped_total", camera="cam-a") == 0
    assert not agent.inference.is_alive()

