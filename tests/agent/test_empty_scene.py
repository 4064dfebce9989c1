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
from agent_support import as_config, station_config, validate_message
from scenes import Scene, make_sprite

from agent.backends import create_backend
from agent.empty_scene import EmptySceneCapture
from agent.health import Metrics
from agent.mqtt import frame_envelope
from agent.outbox import Outbox
from agent.pipeline import InferenceStage, ModelHolder, ModelRuntime
from agent.prepare import camera_preparer
from agent.sources.base import Frame
from contract.broker import BrokerSettings
from contract.bundle import load_bundle
from contract.preprocess import Preprocessor

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
    from central.review.ingest import parse_frame

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
    # a camera named three times in one command is asked once
    from agent.config import CaptureEmptyCommand

    command = CaptureEmptyCommand.model_validate({"count": 1, "cameras": ["a", "a", "b", "a"]})
    assert command.cameras == ["a", "b"]
    capture.request(command.cameras, command.count, now=40.0)
    assert capture.pending("a") == 1 and capture.pending("b") == 1


def send(broker, verb: str, payload: bytes) -> None:
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="operator")
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(f"inventory/test/st-01/cmd/{verb}", payload, qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


@pytest.mark.mqtt
def test_cmd_capture_empty_end_to_end_and_bad_payloads_are_refused(broker, tiny_bundle, busy_then_empty, tmp_path):
    """A real agent on a folder camera (a belt: empty, an item, empty, looping), a real mosquitto, the real
    central ingest: the command's frames arrive in the store's empty scenes; bad payloads are refused in the
    status and the command thread goes on."""
    from agent.app import Agent
    from agent.demo import Subscriber
    from central.review.ingest import IngestService
    from central.review.store import FrameStore

    folder = tmp_path / "camera"
    folder.mkdir()
    for i, (_, image) in enumerate(busy_then_empty):
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    store = FrameStore(tmp_path / "store")
    ingest = IngestService(store, BrokerSettings(host=broker.host, port=broker.port, client_id="ingest-test"))
    ingest.start()
    assert ingest.connected.wait(10)
    cfg = as_config(station_config(tmp_path, tiny_bundle, str(folder), broker.port,
                                   cameras=[{"id": "cam-a", "uri": str(folder), "loop": True, "fps": 20,
                                             "backpressure": "drop_oldest"}],
                                   frames={"empty_scene_interval_s": 0, "empty_scene_spacing_s": 0.2}))
    dashboard = Subscriber(broker.host, broker.port, "inventory/test/st-01")
    agent = Agent(cfg)
    agent.start()
    try:
        def status() -> dict:
            return (json.loads(dashboard.of("status")[-1].payload).get("last_capture_empty") or {}) \
                if dashboard.of("status") else {}

        # online: the agent subscribed to cmd/# before it published that status (one connection, in order)
        assert dashboard.wait_for(lambda d: any(json.loads(m.payload).get("state") == "online"
                                                for m in d.of("status")), 30)
        bad = [(b"not json", "payload: not JSON"), (b'{"count": 0}', "field count: Input should be greater than or equal to 1"),
               (b'{"cameras": ["cam-z"]}', "field cameras: 'cam-z' not among cam-a"),
               (b'{"colour": "red"}', "field colour: Extra inputs are not permitted"),
               (b'{"cameras": []}', "field cameras: List should have at least 1 item")]
        for payload, reason in bad:
            send(broker, "capture-empty", payload)
            assert dashboard.wait_for(lambda d: reason in (status().get("reason") or ""), 10), (reason, status())
            assert status()["ok"] is False and status()["requested"] is None
            validate_message("status.v1", json.loads(dashboard.of("status")[-1].payload))
        body = {"count": 2, "cameras": ["cam-a"]}
        validate_message("cmd-capture-empty.v1", body)
        send(broker, "capture-empty", json.dumps(body).encode())
        assert dashboard.wait_for(lambda d: status().get("ok") is True, 10)
        assert status()["requested"] == {"count": 2, "cameras": ["cam-a"]}
        assert wait_until(lambda: len(store.list_empty_scenes()) == 2, 30), store.stats()
        send(broker, "capture-empty", b"")                  # an empty payload: one frame from every camera
        assert wait_until(lambda: len(store.list_empty_scenes()) == 3, 30)
    finally:
        agent.shutdown(5)
        dashboard.close()
        ingest.stop()
    scenes = store.list_empty_scenes(station="st-01", camera="cam-a")
    for scene in scenes:
        validate_message("frame.v1", scene["meta"])       # the metadata as the real broker delivered it (v5)
        assert scene["meta"]["kind"] == "empty-scene" and (scene["width"], scene["height"]) == (300, 300)
    assert [s["trigger"] for s in scenes] == ["command"] * 3
    assert store.list()[1] == store.stats()["counters"].get("stored", 0)   # none of them entered the review queue
    assert not {s["id"] for s in scenes} & {f["id"] for f in store.list(limit=1000)[0]}
    # what was sent is an empty belt: it matches the empty frames of the scene, not the ones with the item
    empties = [img for kind, img in busy_then_empty if kind == EMPTY]
    items = [img for kind, img in busy_then_empty if kind == ITEM]
    for scene in scenes:
        sent = cv2.cvtColor(cv2.imread(str(store.root / scene["image"])), cv2.COLOR_BGR2RGB).astype(np.float32)
        near_empty = min(np.abs(sent - e).mean() for e in empties)
        near_item = min(np.abs(sent - i).mean() for i in items)
        assert near_empty < near_item
    snapshot = agent.metrics.snapshot()
    assert snapshot["empty_scenes_sent"] == 3
    validate_message("stats.v1", {"schema": "stats.v1", "id": "00000000-0000-4000-8000-000000000000", "seq": 1,
                                  "ts": 1.0, "site": "test", "station": "st-01", **snapshot})
    store.close()


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()
