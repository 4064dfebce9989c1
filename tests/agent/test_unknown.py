"""Unknown items at the station: a frame or an item whose unknown score is above the threshold is ``unknown``.

Real parts: mosquitto, ONNX Runtime on a real two-output ONNX model (agent_support.make_open_set_bundle: the
embedding is a frame's normalized colour, the head a nearest-mean classifier over belt, red, green and blue),
open_set.npz fitted with contract.openset on colour embeddings and its threshold calibrated to keep 95% of
them, the station's own inference stage, outbox and publisher. The camera's source ends at once; the test hands
frames of one colour to the stage (``InferenceStage.process``), which runs the model on them as on camera
frames, so what is decided is known exactly: a known colour keeps its label, a far one (grey, magenta) is
unknown, an enrolled one (yellow) gets its appended logit.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager

import numpy as np
import pytest
from agent_support import (
    ENROLLED_COLOUR,
    OPEN_SET_COLOURS,
    EndedCamera,
    Operator,
    as_config,
    bundle_predictions,
    inference_stage,
    make_onnx_bundle,
    make_open_set_bundle,
    station_config,
    validate_message,
)

from agent.app import Agent, build_runtime
from agent.config import (
    CameraConfig,
    ConfigError,
    ExpectCommand,
    PresenceConfig,
    ReceivingConfig,
    SortingConfig,
    Thresholds,
    ThresholdsCommand,
    load_config,
)
from agent.decide import ItemTracker, LaneMap, LowConfidencePolicy, Observation, PolicyThresholds, classify
from agent.demo import Subscriber
from agent.health import Metrics
from agent.pipeline import ModelRuntime, camera_policy, vouched_threshold
from agent.receiving import ReceivingDesk
from agent.sources.base import Frame
from contract.bundle import Bundle, load_bundle
from contract.messages import ENGINES, checker, loads_finite
from contract.openset import UNKNOWN_LABEL

ROOT = "inventory/test/st-01"
GREY, MAGENTA, WHITE = (128, 128, 128), (220, 40, 220), (255, 255, 255)


def image(rgb: tuple[int, int, int], side: int = 32) -> np.ndarray:
    return np.tile(np.asarray(rgb, np.uint8), (side, side, 1))


# ------------------------------------------------------------------ a running station

def colour_station(tmp_path, broker, bundle):
    """Two cameras; presence by the bundle's belt class, so a belt frame ends an item; every low-confidence
    frame uploaded (no rate limit, no duplicate check: the test's frames are identical on purpose)."""
    return as_config(station_config(
        tmp_path, bundle, "unused", broker.port,
        cameras=[{"id": "cam-a", "uri": "unused"}, {"id": "cam-b", "uri": "unused"}],
        frames={"enabled": True, "min_interval_s": 0, "dedupe_window": 0, "empty_scene_interval_s": 0},
        decisions={"presence": {"mode": "empty_class", "empty_class": "belt", "min_frames": 1, "gap_frames": 1},
                   "sorting": {"lanes": {"red": "lane-red"}, "review_lane": "manual-review"},
                   "unknown_items": True}))


def start(cfg, dash: Subscriber) -> Agent:
    seen = len(dash.of("status"))
    agent = Agent(cfg, source_factory=lambda cam: EndedCamera())
    agent.start()
    assert agent.inference.finished.wait(30), "the stage's threads did not finish after the source ended"
    assert dash.wait_for(lambda d: any(loads_finite(m.payload).get("state") == "online" for m in d.of("status")[seen:]),
                         60), "the station never came online"
    return agent


class Feeder:
    """Frames of one colour to one camera, run through the station's model and decisions."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.seq = 0

    def show(self, camera: str, rgb: tuple[int, int, int], n: int = 1) -> list[int]:
        seqs = []
        for _ in range(n):
            self.seq += 1
            seqs.append(self.seq)
            self.agent.inference.process([Frame(camera, self.seq, time.time(), time.monotonic(), image(rgb))])
        return seqs

    def item(self, camera: str, rgb: tuple[int, int, int], frames: int = 3) -> list[int]:
        """An item in view for ``frames`` frames, then the empty belt (which decides it)."""
        seqs = self.show(camera, rgb, frames)
        self.show(camera, OPEN_SET_COLOURS["belt"])
        return seqs


@contextmanager
def colour_agent(tmp_path, broker, bundle_dir, shipment: dict | None = None):
    """The colour station running over mosquitto: (dashboard, operator, agent, feeder), stopped after; with
    ``shipment`` ({"shipment", "lines"}) opened over cmd/expect first (its first receipt seen)."""
    dash = Subscriber(broker.host, broker.port, ROOT)
    operator = Operator(broker, ROOT)
    agent = start(colour_station(tmp_path, broker, bundle_dir), dash)
    try:
        if shipment is not None:
            operator.send("expect", shipment)
            assert dash.wait_for(lambda d: any(r["items"] == 0 for r in bodies(d, "receipt")), 20)
        yield dash, operator, agent, Feeder(agent)
    finally:
        agent.shutdown(10)
        operator.close()
        dash.close()


def bodies(d: Subscriber, leaf: str) -> list[dict]:
    """The bodies published on a leaf, each once (QoS 1 may deliver a message twice)."""
    seen: dict[str, dict] = {}
    for m in d.of(leaf):
        body = loads_finite(m.payload)
        seen.setdefault(body["id"], body)
    return list(seen.values())


def check(body: dict) -> None:
    """The body against its schema, with jsonschema and with both engines the services use."""
    validate_message(body["schema"], body)
    for engine in ENGINES:
        checker(body["schema"], engine).check(body["schema"], body)


def results_for(d: Subscriber, camera: str, seqs: list[int], timeout: float = 20) -> list[dict]:
    def found(s):
        return {b["frame_seq"] for b in bodies(s, "result") if b["camera"] == camera} >= set(seqs)
    assert d.wait_for(found, timeout), f"results of {camera} frames {seqs} did not arrive"
    return sorted((b for b in bodies(d, "result") if b["camera"] == camera and b["frame_seq"] in seqs),
                  key=lambda b: b["frame_seq"])


def last_status(d: Subscriber) -> dict:
    return loads_finite(d.of("status")[-1].payload) if d.of("status") else {}


def last_thresholds(d: Subscriber) -> dict:
    return last_status(d).get("last_thresholds_update") or {}


# ------------------------------------------------------------------ tests over mosquitto

def test_a_far_colour_is_unknown_sent_to_review_uploaded_and_counted_in_the_receipt(broker, tmp_path):
    bundle_dir = make_open_set_bundle(tmp_path / "models")
    threshold = load_bundle(bundle_dir).open_set.threshold
    # given: a shipment expecting one red and one green item
    with colour_agent(tmp_path, broker, bundle_dir, {"shipment": "S-1", "lines": {"red": 1, "green": 1}}) as (
            dash, operator, agent, feed):
        # when: a red item, then a grey one (no class of the bundle is near grey)
        red = feed.item("cam-a", OPEN_SET_COLOURS["red"])
        grey = feed.item("cam-a", GREY)

        # then: the red frames keep their label and carry a score below the threshold
        for body in results_for(dash, "cam-a", red):
            check(body)
            assert body["label"] == "red" and body["class_id"] == 1 and body["low_confidence"] is False
            assert 0 <= body["unknown_score"] < threshold
        # the grey frames are unknown: no class, the top probability and the known labels, low confidence
        for body in results_for(dash, "cam-a", grey):
            check(body)
            assert body["label"] == UNKNOWN_LABEL and body["class_id"] is None and body["low_confidence"] is True
            assert body["unknown_score"] > threshold
            assert body["reasons"][0] == f"unknown score {body['unknown_score']:.4g} > {threshold:.4g}"
            assert body["confidence"] == pytest.approx(body["top_k"][0]["p"], abs=1e-6)
            assert {k["label"] for k in body["top_k"]} <= set(OPEN_SET_COLOURS)

        # their frames go back for labelling, with the score, and so does the item's one view (no box here: its
        # first frame); the red ones are not uploaded
        assert dash.wait_for(lambda d: len({m.json()["id"] for m in d.of("frames")}) >= 4, 20)
        uploads = {m.json()["id"]: m for m in dash.of("frames")}.values()
        assert sorted(m.json()["frame_seq"] for m in uploads if "item" not in m.json()) == grey
        views = [m.json() for m in uploads if "item" in m.json()]
        assert [v["frame_seq"] for v in views] == grey[:1]
        for m in uploads:
            meta = m.json()
            check(meta)
            assert meta["label"] == UNKNOWN_LABEL and meta["unknown_score"] > threshold
            assert meta["selected_because"][0].startswith("unknown score")
            assert m.payload[:2] == b"\xff\xd8" and meta["jpeg"]["bytes"] == len(m.payload)

        # one decision per item: red sorted to its lane, grey unknown in the review lane
        assert dash.wait_for(lambda d: len(bodies(d, "decision")) >= 2, 20)
        red_item, grey_item = sorted(bodies(dash, "decision"), key=lambda b: b["item_seq"])
        for body in (red_item, grey_item):
            check(body)
        assert (red_item["label"], red_item["class_id"], red_item["lane"]) == ("red", 1, "lane-red")
        assert red_item["low_confidence"] is False and red_item["unknown_score"] < threshold
        assert (grey_item["label"], grey_item["class_id"], grey_item["lane"]) == (UNKNOWN_LABEL, None, "manual-review")
        assert grey_item["low_confidence"] is True and grey_item["unknown_score"] > threshold
        assert grey_item["reasons"][0].startswith("unknown score") and "(median of 3 frames)" in grey_item["reasons"][0]
        assert grey_item["top_k"][0]["label"] in OPEN_SET_COLOURS
        assert views[0]["item"] == {"decision": grey_item["id"], "item_seq": grey_item["item_seq"], "frames": 3}

        # the receipt counts the grey item as unknown (a discrepancy of its own), never as a received label
        assert dash.wait_for(lambda d: any(r["items"] == 2 for r in bodies(d, "receipt")), 20)
        receipt = [r for r in bodies(dash, "receipt") if r["items"] == 2][-1]
        check(receipt)
        lines = {line["label"]: (line["received"], line["status"]) for line in receipt["lines"]}
        assert lines == {"red": (1, "matched"), "green": (0, "short")}
        assert receipt["unknown"]["count"] == 1 and receipt["totals"]["unknown"] == 1
        assert receipt["review"]["count"] == 0 and receipt["totals"]["discrepancies"] == 2   # green short, grey
        ref = receipt["unknown"]["refs"][0]
        assert (ref["decision"], ref["label"], ref["lane"]) == (grey_item["id"], UNKNOWN_LABEL, "manual-review")
        assert agent.metrics.counter("items_unknown_total", camera="cam-a") == 1
        assert agent.metrics.counter("frames_unknown_total", camera="cam-a") == 3


OFF_RED, ORANGE = (220, 72, 40), (220, 96, 40)    # red for the model, sure; beyond the 95% threshold, far beyond


def test_a_shipment_vouches_for_a_sure_item_it_still_expects_and_no_further(broker, tmp_path):
    """While a shipment expects red, a sure red item scored beyond the bundle's threshold (95% of known items kept)
    but within the one keeping 99.9% is red, not unknown: the usual threshold rejects about one known item in
    twenty, each a false discrepancy on the receipt. Once the red line is full, or far beyond, it is unknown."""
    bundle_dir = make_open_set_bundle(tmp_path / "models")
    open_set = load_bundle(bundle_dir).open_set
    threshold, looser = open_set.threshold, open_set.threshold_at(0.999, "fp32")
    with colour_agent(tmp_path, broker, bundle_dir, {"shipment": "S-2", "lines": {"red": 1, "green": 1}}) as (
            dash, operator, agent, feed):
        # when: an orange item while red is expected, then an off-red one, then another once red is received
        feed.item("cam-a", ORANGE)
        off_red = feed.item("cam-a", OFF_RED)
        feed.item("cam-a", OFF_RED)

        # then: each frame on its own is unknown at the camera's threshold (the shipment vouches for items)
        for body in results_for(dash, "cam-a", off_red):
            assert body["label"] == UNKNOWN_LABEL and threshold < body["unknown_score"] <= looser
        assert dash.wait_for(lambda d: len(bodies(d, "decision")) >= 3, 20)
        orange, vouched, over = sorted(bodies(dash, "decision"), key=lambda b: b["item_seq"])
        for body in (orange, vouched, over):
            check(body)
        # far beyond even the looser threshold: unknown though red is expected
        assert orange["label"] == UNKNOWN_LABEL and orange["unknown_score"] > looser
        assert orange["reasons"][0].endswith(f"> {looser:.4g}")
        # the expected, sure off-red item is red, sorted to its lane
        assert (vouched["label"], vouched["lane"], vouched["low_confidence"]) == ("red", "lane-red", False)
        assert threshold < vouched["unknown_score"] <= looser and vouched["vouched"] is True
        assert "vouched" not in orange and "vouched" not in over
        assert agent.metrics.counter("items_vouched_total", camera="cam-a") == 1
        # the same again, with the red line received in full: the camera's own threshold decides
        assert over["label"] == UNKNOWN_LABEL and threshold < over["unknown_score"] <= looser
        assert over["reasons"][0].endswith(f"> {threshold:.4g}")

        assert dash.wait_for(lambda d: any(r["items"] == 3 for r in bodies(d, "receipt")), 20)
        receipt = [r for r in bodies(dash, "receipt") if r["items"] == 3][-1]
        check(receipt)
        assert {line["label"]: line["status"] for line in receipt["lines"]} == {"red": "matched", "green": "short"}
        assert [ref["decision"] for ref in receipt["unknown"]["refs"]] == [orange["id"], over["id"]]
        # the vouched item is received on its line, and the receipt names it apart, not as a discrepancy
        assert receipt["vouched"]["count"] == 1 and receipt["vouched"]["refs_left_off"] == 0
        assert [ref["decision"] for ref in receipt["vouched"]["refs"]] == [vouched["id"]]
        assert receipt["totals"]["discrepancies"] == 3          # green short, orange and the second off-red


def test_the_looser_threshold_comes_from_the_bundle_keep_list_and_only_when_it_can_apply(tmp_path):
    bundle_dir = make_open_set_bundle(tmp_path / "models")
    bundle = load_bundle(bundle_dir)
    desk = ReceivingDesk(ReceivingConfig())
    desk.open(ExpectCommand(shipment="S-1", lines={"red": 2}), bundle.labels)

    def config(**decisions):
        return as_config(station_config(tmp_path, bundle_dir, "unused", 1883, decisions=decisions))

    vouched = vouched_threshold(bundle, config(unknown_items=True), desk, "fp32")
    assert vouched("red") == bundle.open_set.threshold_at(0.999, "fp32") > bundle.open_set.threshold
    assert vouched("green") is None
    keep_99 = vouched_threshold(bundle, config(unknown_items=True, receiving={"expected_unknown_keep": 0.99}), desk,
                                "fp32")
    assert keep_99("red") == bundle.open_set.threshold_at(0.99, "fp32") < vouched("red")
    assert vouched_threshold(bundle, config(unknown_items=False), desk, "fp32") is None        # no unknown verdict
    assert vouched_threshold(bundle, config(unknown_items=True, receiving={"expected_unknown_keep": None}), desk,
                             "fp32") is None
    assert vouched_threshold(bundle, config(unknown_items=True), None, "fp32") is None
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    del manifest["open_set"]["keep_thresholds"]                      # a bundle exported before the list
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    assert vouched_threshold(load_bundle(bundle_dir), config(unknown_items=True), desk, "fp32") is None


def test_cmd_thresholds_moves_the_unknown_threshold_of_one_camera_and_a_bundle_swap_keeps_it(broker, tmp_path):
    bundle_dir = make_open_set_bundle(tmp_path / "models")
    cfg = colour_station(tmp_path, broker, bundle_dir)
    dash = Subscriber(broker.host, broker.port, ROOT)
    operator = Operator(broker, ROOT)
    agent = start(cfg, dash)
    feed = Feeder(agent)
    try:
        grey_a, grey_b = feed.show("cam-a", GREY), feed.show("cam-b", GREY)
        score = results_for(dash, "cam-a", grey_a)[0]["unknown_score"]
        assert [b["label"] for b in results_for(dash, "cam-b", grey_b)] == [UNKNOWN_LABEL]

        # when: cam-b accepts scores up to one and a half times grey's (the command checked against its schema)
        command = {"camera": "cam-b", "max_unknown_score": round(1.5 * score, 3)}
        check_command(command)
        operator.send("thresholds", command)
        assert dash.wait_for(lambda d: (last_thresholds(d).get("applied") or {}).get("max_unknown_score")
                             == command["max_unknown_score"], 20), last_thresholds(dash)
        validate_message("status.v1", last_status(dash))

        # then: grey is decided by its top label on cam-b only
        grey_a, grey_b = feed.show("cam-a", GREY), feed.show("cam-b", GREY)
        assert [b["label"] for b in results_for(dash, "cam-a", grey_a)] == [UNKNOWN_LABEL]
        known = results_for(dash, "cam-b", grey_b)[0]
        check(known)
        assert known["label"] == known["top_k"][0]["label"] and known["class_id"] is not None
        assert known["unknown_score"] == pytest.approx(score, abs=1e-6) and "unknown score" not in str(known["reasons"])
        # and a magenta frame, farther than that, is still unknown there
        magenta = results_for(dash, "cam-b", feed.show("cam-b", MAGENTA))[0]
        assert magenta["unknown_score"] > command["max_unknown_score"] and magenta["label"] == UNKNOWN_LABEL

        # the override is saved for a restart, and a new bundle keeps it
        state = json.loads((tmp_path / "station-state.json").read_text())
        assert state["thresholds"]["cam-b"] == {"max_unknown_score": command["max_unknown_score"]}
        swapped = build_runtime(cfg, load_bundle(make_open_set_bundle(tmp_path / "models-2", version="2")))
        agent.model.swap(swapped)
        grey_a, grey_b = feed.show("cam-a", GREY), feed.show("cam-b", GREY)
        after = results_for(dash, "cam-b", grey_b)[0]
        assert after["model"]["version"] == "2" and after["label"] != UNKNOWN_LABEL
        assert [b["label"] for b in results_for(dash, "cam-a", grey_a)] == [UNKNOWN_LABEL]

        # a threshold that is not a finite number of a sane size is refused by name, and counted
        for payload, reason in [(b'{"max_unknown_score": 1e12}', "field max_unknown_score: Input should be less"),
                                (b'{"max_unknown_score": NaN}', "field max_unknown_score: not a finite number"),
                                (b'{"max_unknown_score": "high"}', "field max_unknown_score: Input should be a valid")]:
            operator.send("thresholds", payload)
            assert dash.wait_for(lambda d: reason in (last_thresholds(d).get("reason") or ""), 20), \
                (payload, last_thresholds(dash))
        assert agent.metrics.counter("commands_rejected_total", command="thresholds") == 3
        assert agent.inference.threshold_overrides["cam-b"].max_unknown_score == command["max_unknown_score"]
    finally:
        agent.shutdown(10)
        operator.close()
        dash.close()


def test_cmd_thresholds_sets_a_share_kept_that_is_looked_up_again_in_the_next_bundle(broker, tmp_path):
    bundle_dir = make_open_set_bundle(tmp_path / "models")
    open_set = load_bundle(bundle_dir).open_set
    with colour_agent(tmp_path, broker, bundle_dir) as (dash, operator, agent, feed):
        # when: cam-b keeps 99.9% of known items, whatever score that is in the running bundle
        command = {"camera": "cam-b", "unknown_keep": 0.999}
        check_command(command)
        operator.send("thresholds", command)
        assert dash.wait_for(lambda d: (last_thresholds(d).get("applied") or {}).get("unknown_keep") == 0.999, 20), \
            last_thresholds(dash)

        # then: an off-red frame, beyond the bundle's 95% threshold, is red on cam-b and unknown on cam-a
        off_a, off_b = feed.show("cam-a", OFF_RED), feed.show("cam-b", OFF_RED)
        on_b = results_for(dash, "cam-b", off_b)[0]
        assert on_b["label"] == "red"
        assert open_set.threshold < on_b["unknown_score"] <= open_set.threshold_at(0.999, "fp32")
        assert [b["label"] for b in results_for(dash, "cam-a", off_a)] == [UNKNOWN_LABEL]
        saved = json.loads((tmp_path / "station-state.json").read_text())["thresholds"]
        assert saved["cam-b"] == {"unknown_keep": 0.999}

        # a new bundle whose calibration keeps 99.9% at its 95% threshold: the share is looked up there, so
        # off-red is unknown on cam-b too (a raw score would have carried the old bundle's number over)
        second = make_open_set_bundle(tmp_path / "models-2", version="2")
        manifest = json.loads((second / "manifest.json").read_text())
        curve = manifest["open_set"]["keep_thresholds"]["fp32"]
        manifest["open_set"]["keep_thresholds"]["fp32"] = [[k, t if k < 0.95 else manifest["open_set"]["threshold"]]
                                                           for k, t in curve]
        (second / "manifest.json").write_text(json.dumps(manifest))
        agent.model.swap(build_runtime(colour_station(tmp_path, broker, bundle_dir), load_bundle(second)))
        after = results_for(dash, "cam-b", feed.show("cam-b", OFF_RED))[0]
        assert after["model"]["version"] == "2" and after["label"] == UNKNOWN_LABEL

        # a score set later replaces the share, and both at once are refused by name
        operator.send("thresholds", {"camera": "cam-b", "max_unknown_score": 1e5})
        assert dash.wait_for(lambda d: (last_thresholds(d).get("applied") or {}).get("max_unknown_score") == 1e5, 20)
        assert agent.inference.threshold_overrides["cam-b"].unknown_keep is None
        assert results_for(dash, "cam-b", feed.show("cam-b", GREY))[0]["label"] != UNKNOWN_LABEL
        operator.send("thresholds", {"camera": "cam-b", "unknown_keep": 0.99, "max_unknown_score": 3.0})
        assert dash.wait_for(lambda d: "field unknown_keep: not with max_unknown_score" in
                             (last_thresholds(d).get("reason") or ""), 20), last_thresholds(dash)
        assert agent.inference.threshold_overrides["cam-b"].max_unknown_score == 1e5


def test_an_enrolled_class_is_decided_by_its_appended_logit(broker, tmp_path):
    bundle_dir = make_open_set_bundle(tmp_path / "models", enrolled=True)
    bundle = load_bundle(bundle_dir)
    name, rgb = ENROLLED_COLOUR
    assert bundle.labels[-1] == name and name not in bundle.model_labels
    dash = Subscriber(broker.host, broker.port, ROOT)
    agent = start(colour_station(tmp_path, broker, bundle_dir), dash)
    feed = Feeder(agent)
    try:
        yellow = feed.item("cam-a", rgb)
        for body in results_for(dash, "cam-a", yellow):
            check(body)
            assert body["label"] == name and body["class_id"] == len(bundle.labels) - 1
            assert body["top_k"][0]["label"] == name and body["unknown_score"] < bundle.open_set.threshold
        assert dash.wait_for(lambda d: len(d.of("decision")) >= 1, 20)
        decided = bodies(dash, "decision")[0]
        check(decided)
        assert (decided["label"], decided["class_id"], decided["lane"]) == (name, 4, "default")
        # the trained classes still decide as before, and a far colour is still unknown
        red = results_for(dash, "cam-a", feed.show("cam-a", OPEN_SET_COLOURS["red"]))[0]
        grey = results_for(dash, "cam-a", feed.show("cam-a", GREY))[0]
        assert red["label"] == "red" and grey["label"] == UNKNOWN_LABEL
    finally:
        agent.shutdown(10)
        dash.close()


def test_a_bundle_without_open_set_decides_as_before_with_no_unknown_score(broker, tmp_path):
    """Every frame its model's top label (as plain ONNX Runtime gives it), no score, never unknown, though the
    camera's config sets a threshold every score would be above: a bundle without open_set has no score."""
    bundle_dir = make_onnx_bundle(tmp_path / "models", classes=4)
    cfg = as_config(station_config(
        tmp_path, bundle_dir, "unused", broker.port, frames={"enabled": True, "dedupe_window": 0},
        cameras=[{"id": "cam-a", "uri": "unused", "thresholds": {"max_unknown_score": -1e5}}],
        decisions={"presence": {"mode": "empty_class", "empty_class": "class-0", "min_frames": 1,
                                "max_frames": 1}}))
    colours = [GREY, MAGENTA, (200, 200, 40), (40, 40, 200), (40, 200, 200), (200, 40, 40), WHITE]
    expected = bundle_predictions(bundle_dir, [image(rgb) for rgb in colours])
    items = [(rgb, label) for rgb, label in zip(colours, expected) if label != "class-0"]
    assert len(items) >= 2, expected
    dash = Subscriber(broker.host, broker.port, ROOT)
    agent = start(cfg, dash)
    feed = Feeder(agent)
    try:
        seqs = [feed.show("cam-a", rgb)[0] for rgb, _ in items]
        for body, (_, label) in zip(results_for(dash, "cam-a", seqs), items):
            check(body)
            assert "unknown_score" not in body and (body["label"], body["class_id"]) == (label, int(label[-1]))
            assert not any("unknown" in r for r in body["reasons"])
        assert dash.wait_for(lambda d: len(bodies(d, "decision")) >= len(items), 20)
        for body, (_, label) in zip(sorted(bodies(dash, "decision"), key=lambda b: b["item_seq"]), items):
            check(body)
            assert "unknown_score" not in body and body["label"] == label
        assert all("unknown_score" not in m.json() for m in dash.of("frames"))
        assert agent.metrics.counter("frames_unknown_total", camera="cam-a") == 0
    finally:
        agent.shutdown(10)
        dash.close()


# ------------------------------------------------------------------ the inference stage alone

def run_two_frames(tmp_path, **decisions) -> tuple[dict, dict, Bundle, ModelRuntime, Metrics]:
    """A far colour (grey) and a known one (red) through the inference stage alone: their results."""
    bundle_dir = make_open_set_bundle(tmp_path / "models")
    cfg = as_config(station_config(tmp_path, bundle_dir, "unused", 1, frames={"enabled": False},
                                   **({"decisions": decisions} if decisions else {})))
    assert cfg.decisions.unknown_items is False
    stage, outbox, metrics, runtime = inference_stage(cfg, bundle_dir)
    stage.process([Frame("cam-a", 1, 1000.0, 0.0, image(GREY)), Frame("cam-a", 2, 1001.0, 0.0,
                                                                         image(OPEN_SET_COLOURS["red"]))])
    grey, red = [r.body for r in outbox.pending(limit=10) if r.kind == "result"]
    outbox.close()
    return grey, red, runtime.bundle, runtime, metrics


def test_with_unknown_items_off_the_score_is_not_computed_and_decides_nothing(tmp_path):
    """The default (decisions.unknown_items and unknown_score false): a far colour keeps the model's top label,
    is not made low-confidence, and no result carries a score (none was computed)."""
    grey, red, _, _, metrics = run_two_frames(tmp_path)
    assert grey["label"] != UNKNOWN_LABEL and grey["class_id"] is not None and red["label"] == "red"
    assert "unknown_score" not in grey and "unknown_score" not in red
    assert not any(reason.startswith("unknown score") for reason in grey["reasons"])
    assert metrics.counter("frames_unknown_total", camera="cam-a") == 0


def test_with_unknown_score_on_the_score_is_published_and_decides_nothing(tmp_path):
    """decisions.unknown_score with unknown_items off: the far colour's result carries its score, above the
    threshold, and still keeps the model's top label."""
    grey, red, bundle, runtime, metrics = run_two_frames(tmp_path, unknown_score=True)
    threshold = bundle.open_set.threshold_for(runtime.backend.precision)
    assert grey["label"] != UNKNOWN_LABEL and grey["class_id"] is not None and grey["unknown_score"] > threshold
    assert not any(reason.startswith("unknown score") for reason in grey["reasons"])
    assert red["label"] == "red" and red["unknown_score"] < threshold
    assert metrics.counter("frames_unknown_total", camera="cam-a") == 0


def test_a_score_beyond_the_carried_limit_is_published_as_the_limit_and_still_decides_unknown(tmp_path):
    """A Mahalanobis score divides by the bundle's variances, which may be floored at 1e-12: an embedding far off
    every class can score past 1e12 (here the variances are shrunk in place so the grey frame does). Its result
    carries the schema's bound (SCORE_LIMIT, a number every reader's float holds), within result.v1, and the
    frame is still decided unknown on its raw score."""
    from contract.openset import SCORE_LIMIT

    bundle_dir = make_open_set_bundle(tmp_path / "models")
    cfg = as_config(station_config(tmp_path, bundle_dir, "unused", 1, frames={"enabled": False},
                                   decisions={"unknown_items": True}))
    stage, outbox, metrics, runtime = inference_stage(cfg, bundle_dir)
    runtime.bundle.open_set.stats.variances[:] = 1e-12
    stage.process([Frame("cam-a", 1, 1000.0, 0.0, image(GREY))])
    grey = [r.body for r in outbox.pending(limit=10) if r.kind == "result"][0]
    outbox.close()
    assert grey["unknown_score"] == SCORE_LIMIT and grey["label"] == UNKNOWN_LABEL     # equal: cut at the limit
    validate_message("result.v1", grey)
    body = dict(grey, unknown_score=SCORE_LIMIT * 10)
    with pytest.raises(Exception, match="1e|greater than"):
        validate_message("result.v1", body)


def test_a_frame_whose_embedding_is_not_finite_is_an_inference_error(tmp_path):
    """A model whose logits are finite but whose embedding is NaN on some frames (here: white ones): those
    frames are counted as inference errors and never published; the others are classified with a score."""
    bundle_dir = make_open_set_bundle(tmp_path / "models", nan_embedding_when_bright=True)
    cfg = as_config(station_config(tmp_path, bundle_dir, "unused", 1, frames={"enabled": False},
                                   decisions={"unknown_items": True}))
    stage, outbox, metrics, _ = inference_stage(cfg, bundle_dir)    # the warm-up passes: NaN only on bright frames
    colours = [OPEN_SET_COLOURS["red"], WHITE, GREY, WHITE]
    frames = [Frame("cam-a", i + 1, 1000.0 + i, 0.0, image(rgb)) for i, rgb in enumerate(colours)]
    stage.process(frames[:2])
    stage.process(frames[2:])
    stage.process([frames[1]])           # a batch of nothing but bad frames
    results = [r.body for r in outbox.pending(limit=100) if r.kind == "result"]
    assert [(b["frame_seq"], b["label"]) for b in results] == [(1, "red"), (3, UNKNOWN_LABEL)]
    assert all(math.isfinite(b["unknown_score"]) for b in results)
    assert metrics.counter("inference_errors_total") == 3
    outbox.close()


def test_a_backend_without_the_embedding_is_refused_for_an_open_set_bundle(tmp_path):
    """The model must give the embedding the manifest names, else the bundle is refused at load by name."""
    from agent.backends import BackendError
    from agent.backends.onnxruntime import OnnxRuntimeBackend

    bundle = load_bundle(make_open_set_bundle(tmp_path / "models"))
    with pytest.raises(BackendError, match="no output 'features'"):
        OnnxRuntimeBackend(bundle.pick_onnx().path, bundle.input_spec, precision="fp32", intra_op_threads=1,
                           embedding_name="features")
    backend = OnnxRuntimeBackend(bundle.pick_onnx().path, bundle.input_spec, precision="fp32", intra_op_threads=1,
                                 embedding_name="embedding")
    logits, emb = backend.run_outputs(np.zeros((5, 3, 16, 16), np.float32))
    assert logits.shape == (5, 4) and emb.shape == (5, 3) and np.isfinite(emb).all()
    assert backend.run(np.zeros((2, 3, 16, 16), np.float32)).shape == (2, 4)


# ------------------------------------------------------------------ thresholds and the item's median

def check_command(body: dict) -> None:
    for engine in ENGINES:
        checker("cmd-thresholds.v1", engine).check("cmd/thresholds", body)
    ThresholdsCommand.model_validate(body)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_cmd_thresholds_schema_and_the_agent_agree_on_the_unknown_threshold(engine):
    check = checker("cmd-thresholds.v1", engine)
    for good in [{"max_unknown_score": 37.5}, {"max_unknown_score": -8.25, "camera": "cam-a"},
                 {"max_unknown_score": None}, {"max_unknown_score": 0}, {"max_unknown_score": -1e6},
                 {"unknown_keep": 0.99}, {"unknown_keep": 1}, {"unknown_keep": None, "max_unknown_score": 3.0},
                 {"unknown_keep": 0.975, "max_unknown_score": None}]:
        assert check.error(good) is None, good
        ThresholdsCommand.model_validate(good)
    for bad in [{"max_unknown_score": 1e12}, {"max_unknown_score": -1e7}, {"max_unknown_score": "high"},
                {"max_unknown_score": True}, {"unknown_keep": 0}, {"unknown_keep": 1.01}, {"unknown_keep": "0.9"},
                {"unknown_keep": True}, {"unknown_keep": 0.99, "max_unknown_score": 3.0}]:
        assert check.error(bad) is not None, bad
        with pytest.raises(ValueError):
            ThresholdsCommand.model_validate(bad)


def test_a_camera_config_sets_its_own_unknown_threshold_and_bad_ones_are_refused_by_name(tmp_path):
    bundle = load_bundle(make_open_set_bundle(tmp_path / "models"))
    plain = CameraConfig(id="cam-a", uri="x")
    own = CameraConfig(id="cam-b", uri="x", thresholds={"max_unknown_score": -3.5})
    assert camera_policy(bundle, plain, None).thresholds.max_unknown_score == bundle.open_set.threshold
    assert camera_policy(bundle, own, None).thresholds.max_unknown_score == -3.5
    assert camera_policy(bundle, own, Thresholds(max_unknown_score=99.0)).thresholds.max_unknown_score == 99.0
    assert camera_policy(bundle, own, Thresholds(min_confidence=0.9)).thresholds.max_unknown_score == -3.5
    no_open_set = load_bundle(make_onnx_bundle(tmp_path / "plain"))
    assert camera_policy(no_open_set, own, None).thresholds.max_unknown_score is None
    # decisions.unknown_items off: no verdict, whatever the camera says
    assert camera_policy(bundle, own, None, unknown_items=False).thresholds.max_unknown_score is None
    # as a share kept: the bundle's threshold at that share; the newer form of the two replaces the other
    kept = CameraConfig(id="cam-c", uri="x", thresholds={"unknown_keep": 0.99})
    at_99 = bundle.open_set.threshold_at(0.99, "fp32")
    assert at_99 > bundle.open_set.threshold
    assert camera_policy(bundle, kept, None).thresholds.max_unknown_score == at_99
    assert camera_policy(bundle, kept, Thresholds(max_unknown_score=2.0)).thresholds.max_unknown_score == 2.0
    assert camera_policy(bundle, own, Thresholds(unknown_keep=0.99)).thresholds.max_unknown_score == at_99
    both = camera_policy(bundle, own, Thresholds(unknown_keep=0.99, min_confidence=0.5)).thresholds
    assert (both.min_confidence, both.max_unknown_score) == (0.5, at_99)
    manifest = json.loads((bundle.root / "manifest.json").read_text())
    del manifest["open_set"]["keep_thresholds"]                   # exported before the list: its own threshold
    (bundle.root / "manifest.json").write_text(json.dumps(manifest))
    assert camera_policy(load_bundle(bundle.root), kept, None).thresholds.max_unknown_score == bundle.open_set.threshold
    for value, reason in [(".nan", "max_unknown_score"), (".inf", "max_unknown_score"), ("1e12", "max_unknown_score"),
                          ("0", "unknown_keep"), ("1.5", "unknown_keep"), ("'0.9'", "unknown_keep")]:
        path = tmp_path / f"bad-{reason}-{value}.yaml"
        path.write_text(f"site: s\nstation: t\nmodel: {{bundle: {tmp_path}}}\ncameras:\n"
                        f"  - {{id: cam-a, uri: x, thresholds: {{{reason}: {value}}}}}\n")
        with pytest.raises(ConfigError, match=rf"field cameras\.0\.thresholds\.{reason}"):
            load_config(path)


def tracked(probs: np.ndarray, score: float, policy: LowConfidencePolicy) -> Observation:
    return Observation(1, 1.0, classify(probs, ["a", "b"], 2, policy, score))


def test_an_item_is_unknown_when_the_median_of_its_frames_scores_is_above_the_threshold():
    """One odd frame does not decide an item: two known frames and one unknown make a known item, and the
    reverse; the review budget may sort a flagged item by its label, never an unknown one."""
    policy = LowConfidencePolicy(PolicyThresholds(min_confidence=0.95, max_unknown_score=10.0))
    lanes = LaneMap(SortingConfig(lanes={"a": "lane-a"}, review_budget=0.5, review_window=10))
    tracker = ItemTracker("cam", ["a", "b"], PresenceConfig(min_frames=1, max_frames=3), lanes, policy)

    def item(probs: np.ndarray, scores: tuple[float, ...]):
        decided = [tracker.update(tracked(probs, s, policy), True) for s in scores]
        assert decided[:-1] == [None] * (len(scores) - 1)
        return decided[-1]

    for _ in range(10):                  # less certain items than the next ones: the budget would spare those
        item(np.array([0.6, 0.4]), (1.0, 1.0, 1.0))
    sure_a = np.array([0.9, 0.1])        # flagged by min_confidence 0.95, more certain than the recent items
    known, unknown = item(sure_a, (1.0, 50.0, 2.0)), item(sure_a, (50.0, 1.0, 60.0))
    assert (known.label, known.class_id, known.lane, known.unknown_score) == ("a", 0, "lane-a", 2.0)
    assert known.reasons == () and tracker.spared == 1
    assert (unknown.label, unknown.class_id, unknown.lane) == (UNKNOWN_LABEL, None, "manual-review")
    assert unknown.low_confidence and unknown.unknown_score == 50.0 and tracker.spared == 1
    assert unknown.reasons == ("unknown score 50 (median of 3 frames) > 10", "confidence 0.900 < 0.95")

    # a frame on its own: above the threshold it is unknown, at it it is not
    frames = LowConfidencePolicy(PolicyThresholds(max_unknown_score=10.0))
    assert classify(sure_a, ["a", "b"], 2, frames, 10.0).label == "a"
    frame = classify(sure_a, ["a", "b"], 2, frames, 10.5)
    assert (frame.label, frame.class_id, frame.confidence, frame.top_label) == (UNKNOWN_LABEL, None, 0.9, "a")
    assert frame.reasons == ("unknown score 10.5 > 10",) and frame.unknown_score == 10.5
    # no threshold (a bundle without open_set): the score is carried, never a verdict
    assert classify(sure_a, ["a", "b"], 2, LowConfidencePolicy(PolicyThresholds()), 1e5).label == "a"
