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



@pytest.mark.parametrize("count", [True, "3", 2.0])
def test_capture_empty_takes_the_count_as_the_schema_types_it(count):
    """cmd-capture-empty.v1 says integer; pydantic's lax reading took ``true`` as 1 and ``"3"`` as 3."""
    from pydantic import ValidationError

    from agent.config import CaptureEmptyCommand

    with pytest.raises(ValidationError, match="count"):
        CaptureEmptyCommand.model_validate({"count": count})


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


def parked_then_gone(images: np.ndarray, parked: int, gone: int, passing: int = 0, after: int = 0,
                     seed: int = 31) -> list[tuple[str, np.ndarray]]:
    """An item standing still in view for ``parked`` frames (there when the station starts), then ``gone`` frames of
    the belt without it; then another item riding through for ``passing`` frames and ``after`` frames of empty belt."""
    scene = Scene(seed=seed)
    still = make_sprite(images[0], 200, 5.0, (0.9, 0.8, 0.7))
    rider = make_sprite(images[1], 200, -10.0, (0.9, 0.8, 0.7))
    views = [(ITEM, [(still, 60, 30)])] * parked + [(EMPTY, [])] * gone
    views += [(ITEM, [(rider, 10 + 6 * k, 30)]) for k in range(passing)] + [(EMPTY, [])] * after
    return [(kind, scene.render(t, sprites)[0]) for t, (kind, sprites) in enumerate(views)]


def test_an_item_in_view_when_the_station_starts_is_never_sent_as_its_empty_scene(tmp_path, tiny_bundle,
                                                                                  fmnist_test_images):
    # given: a station started with an item standing in view (its localizer learns the first frame as the scene)
    frames = parked_then_gone(fmnist_test_images[0], parked=12, gone=20, passing=12, after=8)
    station = Station(tmp_path, tiny_bundle, frames={"empty_scene_interval_s": 0, "empty_scene_spacing_s": 0,
                                                     "empty_scene_wait_s": 600},
                      decisions={"presence": {"relearn_frames": 15}})
    # when: empty-scene frames are asked for while the item still stands there; it is taken away (the localizer
    # relearns the belt where it stood), then another item rides through
    for seq, (_, image) in enumerate(frames, start=1):
        if seq == 5:
            station.stage.empty_scenes.request(["cam-a"], 2, station.clock())
        station.feed(image)
    # then: no frame showing the parked item went back as the empty scene: the first ones are of the empty belt
    # after an item was seen in front of the background (the background is then known to be the belt)
    sent = [r.body["frame_seq"] for r in station.empty_scenes()]
    assert len(sent) == 2 and all(seq > 12 + 20 + 12 for seq in sent), sent


def test_a_captured_empty_scene_image_is_trusted_from_the_first_frame(tmp_path, tiny_bundle, fmnist_test_images):
    # given: a station whose background is a captured empty-scene image (decisions.presence.empty_images)
    frames = parked_then_gone(fmnist_test_images[0], parked=0, gone=6)
    station = Station(tmp_path, tiny_bundle, frames={"empty_scene_interval_s": 0, "empty_scene_spacing_s": 0})
    station.prepare = camera_preparer(station.holder, station.cfg.decisions.presence, frames[0][1].copy(),
                                      watch_empty=True)
    # when: empty-scene frames are asked for at once
    station.stage.empty_scenes.request(["cam-a"], 2, station.clock())
    for _, image in frames:
        station.feed(image)
    # then: the first two frames go (no item has to pass first)
    assert [r.body["frame_seq"] for r in station.empty_scenes()] == [1, 2]


def test_a_frame_that_could_not_be_stored_is_wanted_again():
    # given: a requested frame and a scheduled one, each taken by offer, whose batch the outbox could not store
    capture = EmptySceneCapture(["cam-a"], interval_s=60, wait_s=30, spacing_s=5, now=0.0)
    capture.request(["cam-a"], 1, now=1.0)
    assert capture.offer("cam-a", True, now=2.0).trigger == "command"
    assert capture.pending("cam-a") == 0
    # when: the pipeline hands it back (the outbox's disk was full)
    capture.unsent("cam-a", "command", now=2.5)
    # then: it is wanted again, from the very next empty frame (the spacing does not hold it back), and only once
    assert capture.pending("cam-a") == 1
    assert capture.offer("cam-a", True, now=3.0).trigger == "command"
    assert capture.offer("cam-a", True, now=30.0).trigger is None
    # and: a scheduled frame handed back goes with the next empty frame, not an interval later
    assert capture.offer("cam-a", True, now=70.0).trigger == "schedule"
    capture.unsent("cam-a", "schedule", now=70.5)
    assert capture.offer("cam-a", True, now=71.0).trigger == "schedule"
    assert capture.offer("cam-a", True, now=72.0).trigger is None



def test_a_requested_empty_scene_whose_batch_the_outbox_could_not_store_is_sent_with_the_next_empty_frame(
        tmp_path, tiny_bundle, fmnist_test_images):
    """A full disk lost the frame an operator asked for by cmd/capture-empty, and the request was used up. The
    outbox here is the real one; only its write is made to fail once, as a full disk fails it."""
    import sqlite3

    frames = scene_frames(fmnist_test_images[0], [(EMPTY, 4), (ITEM, 12), (EMPTY, 8)])
    station = Station(tmp_path, tiny_bundle, frames={"empty_scene_interval_s": 0, "empty_scene_spacing_s": 0})
    real, full = station.outbox.put_many, {"on": False}

    def put_many(messages):
        if full["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        return real(messages)

    station.outbox.put_many = put_many
    failed = []
    for seq, (_, image) in enumerate(frames, start=1):
        if seq == 6:
            station.stage.empty_scenes.request(["cam-a"], 1, station.clock())
        full["on"] = seq == 17              # the first empty frame after the item: its batch is not stored
        try:
            station.feed(image)
        except sqlite3.OperationalError:
            failed.append(seq)
            station.clock.t += 1
    assert failed == [17]
    assert [r.body["frame_seq"] for r in station.empty_scenes()] == [18]
    assert station.metrics.counter("empty_scenes_unsent_total", camera="cam-a", trigger="command") == 1
    assert station.stage.empty_scenes.pending("cam-a") == 0


@pytest.mark.parametrize("count", [0, -3])
def test_a_request_for_no_frames_is_refused(count):
    capture = EmptySceneCapture(["cam-a"], interval_s=0, wait_s=30, spacing_s=0, now=0.0)
    with pytest.raises(ValueError, match=f"empty-scene frames requested: {count}, expected at least 1"):
        capture.request(["cam-a"], count, now=1.0)
    assert capture.pending("cam-a") == 0 and capture.offer("cam-a", True, now=2.0).trigger is None
