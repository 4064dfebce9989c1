"""Empty-scene frames: the station sends its ROI with nothing in view, on cmd/capture-empty and on a schedule,
through the real inference stage (real localizer, real ONNX Runtime, real outbox) and, end to end, a real
mosquitto and the real central ingest. The scenes are synthetic belt views with real Fashion-MNIST items.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.backends import create_backend
from agent.bundle import load_bundle
from agent.empty_scene import EmptySceneCapture
from agent.health import Metrics
from agent.mqtt import frame_envelope
from agent.outbox import Outbox
from agent.pipeline import InferenceStage, ModelHolder, ModelRuntime
from agent.prepare import camera_preparer
from agent.preprocess import Preprocessor
from agent.sources.base import Frame
from agent_support import as_config, station_config, validate_message
from scenes import Scene, make_sprite

EMPTY, ITEM = "empty", "item"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def scene_frames(images: np.ndarray, plan: list[tuple[str, int]], seed: int = 31) -> list[tuple[str, np.ndarray]]:
    """Belt views following ``plan``: (EMPTY, n) n empty frames, (ITEM, n) one item riding n frames."""
    scene, rng = Scene(seed=seed), np.random.default_rng(seed)
    out, t, item = [], 0, 0
    for kind, n in plan:
        sprite = make_sprite(images[item], 200, float(rng.uniform(-20, 20)), (0.9, 0.8, 0.7)) if kind == ITEM else None
        item += kind == ITEM
        for k in range(n):
            out.append((kind, scene.render(t, [(sprite, 10 + 6 * k, 30)] if sprite else [])[0]))
            t += 1
    return out


class Station:
    """The inference stage of one camera, fed frames prepared by the camera thread's own function."""

    def __init__(self, tmp_path: Path, bundle_dir: Path, **sections) -> None:
        self.cfg = as_config(station_config(tmp_path, bundle_dir, str(tmp_path), 1883, **sections))
        bundle = load_bundle(bundle_dir)
        runtime = ModelRuntime(bundle, create_backend(bundle, self.cfg.model), Preprocessor(bundle.input_spec))
        self.holder = ModelHolder(runtime)
        self.prepare = camera_preparer(self.holder, self.cfg.decisions.presence, watch_empty=self.cfg.frames.enabled)
        self.outbox = Outbox(tmp_path / "outbox.sqlite", max_bytes=self.cfg.outbox.max_bytes, max_age_s=3600)
        self.metrics = Metrics()
        self.clock = Clock()
        self.stage = InferenceStage(self.cfg, hub=None, model=self.holder, outbox=self.outbox, metrics=self.metrics,
                                    cameras_done=lambda: True, clock=self.clock)
        self.seq = 0

    def feed(self, image: np.ndarray, seconds: float = 1.0) -> None:
        self.seq += 1
        prepared = self.prepare(image)
        self.stage.process([Frame("cam-a", self.seq, self.clock.t, 0.0, image, None, None, prepared,
                                  prepared.located)])
        self.clock.t += seconds

    def empty_scenes(self) -> list:
        return [r for r in self.outbox.pending(limit=10_000) if r.kind == "frame" and r.body.get("kind") == "empty-scene"]


@pytest.fixture(scope="module")
def busy_then_empty(fmnist_test_images):
    return scene_frames(fmnist_test_images[0], [(EMPTY, 4), (ITEM, 12), (EMPTY, 8)])


def test_a_request_made_while_the_scene_is_busy_waits_for_the_next_empty_frames(tmp_path, tiny_bundle,
                                                                                busy_then_empty):
    from trainer.loop.ingest import parse_frame

    # given: a station (presence off, a whole-ROI bundle: the localizer runs only to watch for empty scenes)
    station = Station(tmp_path, tiny_bundle, frames={"empty_scene_interval_s": 0, "empty_scene_spacing_s": 2.0})
    kinds = [k for k, _ in busy_then_empty]
    # when: two empty-scene frames are asked for while an item rides through
    for seq, (kind, image) in enumerate(busy_then_empty, start=1):
        if seq == 6:
            assert kind == ITEM
            station.stage.empty_scenes.request(["cam-a"], 2, station.clock())
        station.feed(image)
    sent = station.empty_scenes()
    # then: two frames, both of the empty belt after the item, at least the spacing apart
    assert [r.body["frame_seq"] for r in sent] == [17, 19]
    assert all(kinds[r.body["frame_seq"] - 1] == EMPTY for r in sent)
    for record in sent:
        body = record.body
        validate_message("frame.v1", body)
        assert (body["kind"], body["trigger"]) == ("empty-scene", "command")
        assert not {"label", "confidence", "top_k", "selected_because", "context"} & set(body)
        image = cv2.imdecode(np.frombuffer(record.blob, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == busy_then_empty[0][1].shape and body["jpeg"]["bytes"] == len(record.blob)
        meta, jpeg = parse_frame("inventory/test/st-01/frames", frame_envelope(record), None)
        assert meta["kind"] == "empty-scene" and jpeg == record.blob
    assert station.metrics.counter("empty_scenes_sent_total", camera="cam-a", trigger="command") == 2
    assert station.metrics.snapshot()["empty_scenes_sent"] == 2
    # the low-confidence uploads and results are what they were: no localization fields appear
    results = [r.body for r in station.outbox.pending(limit=10_000) if r.kind == "result"]
    assert len(results) == len(kinds) and not any("item_box" in r for r in results)


def test_a_scene_that_stays_busy_sends_nothing_and_the_wait_is_bounded(tmp_path, tiny_bundle, fmnist_test_images):
    frames = scene_frames(fmnist_test_images[0], [(EMPTY, 2), (ITEM, 20)])
    station = Station(tmp_path, tiny_bundle, frames={"empty_scene_interval_s": 0, "empty_scene_wait_s": 5})
    for seq, (_, image) in enumerate(frames, start=1):
        if seq == 3:
            station.stage.empty_scenes.request(["cam-a"], 3, station.clock())
        station.feed(image)
    assert station.empty_scenes() == []
    assert station.metrics.counter("empty_scenes_given_up_total", camera="cam-a") == 3
    assert station.stage.empty_scenes.pending("cam-a") == 0


def test_the_schedule_sends_one_empty_scene_per_interval(tmp_path, tiny_bundle, busy_then_empty):
    station = Station(tmp_path, tiny_bundle, frames={"empty_scene_interval_s": 5})
    for _, image in busy_then_empty:
        station.feed(image)
    sent = station.empty_scenes()
    kinds = [k for k, _ in busy_then_empty]
    # due at t=5 s (frame 6, an item is in view until frame 16): the first empty frame after it, then 5 s later
    assert [r.body["frame_seq"] for r in sent] == [17, 22]
    assert {r.body["trigger"] for r in sent} == {"schedule"}
    assert all(kinds[r.body["frame_seq"] - 1] == EMPTY for r in sent)


def test_no_empty_scenes_without_uploads(tmp_path, tiny_bundle, busy_then_empty):
    station = Station(tmp_path, tiny_bundle, frames={"enabled": False, "empty_scene_interval_s": 1})
    for _, image in busy_then_empty:
        station.feed(image)
    assert station.stage.empty_scenes is None and station.empty_scenes() == []


def test_the_capture_rules_on_their_own():
    capture = EmptySceneCapture(["a", "b"], interval_s=0, wait_s=10, spacing_s=3, now=0.0)
    capture.request(["a"], 2, now=0.0)
    assert capture.offer("b", True, 1.0).trigger is None          # only the camera asked
    assert capture.offer("a", None, 1.0).trigger is None          # not localized: never taken
    assert capture.offer("a", False, 1.0).trigger is None         # busy
    assert capture.offer("a", True, 2.0).trigger == "command"
    assert capture.offer("a", True, 4.0).trigger is None          # spacing
    assert capture.offer("a", True, 5.0).trigger == "command"
    assert capture.offer("a", True, 9.0).trigger is None          # done
    capture.request(["a"], 100, now=20.0)
    assert capture.pending("a") == 50
    assert capture.offer("a", False, 31.0).given_up == 50
