"""Receiving against a shipment's expected lines: cmd/expect, the prior on item decisions, receipt.v1.

Real parts: mosquitto, ONNX Runtime (the tiny bundle, built and checked by the agent; one item classified by
it), the SQLite outbox, station-state.json across a restart. The stand-in: most items are decided from
probability rows the test writes (``Inferred`` handed to the inference stage), because a random-weight model
cannot be made to produce a borderline Shirt/T-shirt item or a sure Trouser on demand. The camera's source
ends at once, so the stage's own threads are idle and only the test's items are decided.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import numpy as np
import pytest
from agent_support import EndedCamera, Operator, as_config, station_config, validate_message

from agent.app import COMMAND_LIMITS, COMMAND_MAX_BYTES, EXPECT_MAX_LINE_BYTES, Agent, command_json
from agent.config import ExpectCommand, PresenceConfig, ReceivingConfig, SortingConfig
from agent.decide import (
    ItemDecision,
    ItemTracker,
    LaneMap,
    LowConfidencePolicy,
    Observation,
    PolicyThresholds,
    classify,
)
from agent.demo import Subscriber
from agent.pipeline import Inferred
from agent.receiving import (
    MAX_RECEIPT_LINE_REFS,
    MAX_RECEIPT_LINES,
    AlreadyClosed,
    ReceivingDesk,
    Shipment,
    ShipmentError,
    item_ref,
    receipt_body,
    refs_share,
)
from agent.sources.base import Frame
from agent.state import STATE_FILE, StationState, manifest_sha256
from contract.messages import ENGINES, checker, dumps_finite, loads_finite
from contract.openset import UNKNOWN_LABEL

ROOT = "inventory/test/st-01"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def row(**probs: float) -> np.ndarray:
    """A probability row over LABELS: the named labels (underscores for '/' and '-'), the rest shared evenly."""
    named = {label: probs[key] for label in LABELS if (key := label.replace("/", "_").replace("-", "_")) in probs}
    rest = (1.0 - sum(named.values())) / (len(LABELS) - len(named))
    return np.array([named.get(label, rest) for label in LABELS])


SURE_SHIRT = row(Shirt=0.9, T_shirt_top=0.05)
BORDERLINE_SHIRT = row(Shirt=0.42, T_shirt_top=0.38)


# ------------------------------------------------------------------ the prior, on the tracker alone

def decide_one(probs: np.ndarray, prior: np.ndarray | None):
    tracker = ItemTracker("cam", LABELS, PresenceConfig(min_frames=1, max_frames=1), LaneMap(SortingConfig()),
                          LowConfidencePolicy(PolicyThresholds()), prior=lambda labels: prior)
    cls = classify(probs, LABELS, 3, tracker.policy)
    return tracker.update(Observation(1, 1.0, cls), True)


def test_the_prior_moves_a_borderline_item_to_the_expected_label_but_not_a_sure_other_one():
    desk = ReceivingDesk(ReceivingConfig(expected_weight=2.0))
    desk.open(ExpectCommand(shipment="S-1", lines={"T-shirt/top": 1}), LABELS)
    prior = desk.prior(LABELS)
    assert decide_one(BORDERLINE_SHIRT, None).label == "Shirt"
    assert decide_one(BORDERLINE_SHIRT, prior).label == "T-shirt/top"
    assert decide_one(SURE_SHIRT, prior).label == "Shirt"
    decided = decide_one(BORDERLINE_SHIRT, prior)
    assert decided.prior and decided.confidence == pytest.approx(0.76 / 1.38, abs=1e-6)
    desk.record(decided, "00000000-0000-4000-8000-000000000001")
    assert desk.prior(LABELS) is not None and not (desk.prior(LABELS) != 1).any(), \
        "a line already received in full weighs no more than any other label"


def test_a_shipment_vouches_only_for_a_sure_item_on_a_label_it_still_expects():
    """The looser unknown threshold (20 here; the camera's is 10) holds for an item decided sure on a label the
    open shipment still expects, and for nothing else: an unsure item, another label, a line received in full, a
    score beyond it, a station with expected_unknown_keep null."""
    desk = ReceivingDesk(ReceivingConfig())
    desk.open(ExpectCommand(shipment="S-1", lines={"Shirt": 1}), LABELS)
    policy = LowConfidencePolicy(PolicyThresholds(min_confidence=0.8, max_unknown_score=10.0))
    tracker = ItemTracker("cam", LABELS, PresenceConfig(min_frames=1, max_frames=1), LaneMap(SortingConfig()), policy,
                          prior=desk.prior,
                          vouched_threshold=lambda label: 20.0 if desk.vouches(label) else None)

    def decide(probs: np.ndarray, score: float):
        return tracker.update(Observation(1, 1.0, classify(probs, LABELS, 3, policy, score)), True)

    vouched = decide(SURE_SHIRT, 15.0)
    assert (vouched.label, vouched.vouched) == ("Shirt", True)
    assert decide(SURE_SHIRT, 5.0).vouched is False                # below the camera's own threshold anyway
    unsure = decide(row(Shirt=0.4, Coat=0.3), 15.0)          # 0.57 after the prior: flagged, so not vouched for
    assert unsure.label == "unknown" and unsure.reasons[0] == "unknown score 15 (median of 1 frames) > 10"
    beyond = decide(SURE_SHIRT, 25.0)
    assert beyond.label == "unknown" and beyond.reasons == ("unknown score 25 (median of 1 frames) > 20",)
    assert decide(row(Trouser=0.95), 15.0).label == "unknown"    # not on the shipment
    desk.record(decide(SURE_SHIRT, 15.0), "00000000-0000-4000-8000-000000000002")
    assert decide(SURE_SHIRT, 15.0).label == "unknown"           # the Shirt line is received in full
    # the receipt counts the vouched item on its line and names it apart; a restart keeps both
    for shipment in (desk.shipment, Shipment.from_json(json.loads(json.dumps(desk.shipment.to_json())))):
        receipt = shipment.receipt()
        assert receipt["lines"][0]["received"] == 1 and receipt["vouched"]["count"] == 1
        assert [r["decision"] for r in receipt["vouched"]["refs"]] == ["00000000-0000-4000-8000-000000000002"]
    saved = desk.shipment.to_json()
    for bad in ({"vouched": -1}, {"vouched": 0}, {"vouched_refs": "x"}):
        with pytest.raises(ShipmentError, match="field shipment.vouched"):
            Shipment.from_json({**saved, **bad})
    older = {k: v for k, v in saved.items() if k not in ("vouched", "vouched_refs")}   # saved before the count
    assert Shipment.from_json(older).receipt()["vouched"] == {"count": 0, "refs": [], "refs_left_off": 0}
    off = ReceivingDesk(ReceivingConfig(expected_unknown_keep=None))
    off.open(ExpectCommand(shipment="S-2", lines={"Shirt": 1}), LABELS)
    assert not off.vouches("Shirt") and desk.vouches("Shirt") is False
    assert not ReceivingDesk(ReceivingConfig()).vouches("Shirt")                # no shipment open


# ------------------------------------------------------------------ a running station

def station_cfg(tmp_path, broker, tiny_bundle, fmnist_video):
    return as_config(station_config(
        tmp_path, tiny_bundle, str(fmnist_video), broker.port, frames={"enabled": False},
        decisions={"presence": {"mode": "empty_class", "empty_class": "Bag", "min_frames": 1, "max_frames": 1,
                                "gap_frames": 1},
                   "receiving": {"expected_weight": 2.0, "max_refs": 5}}))


def start(cfg, dash: Subscriber) -> Agent:
    """A station whose camera ends at once, online: it subscribes to cmd/# before it publishes "online" on the same
    connection, so a command sent after that status is never lost to a late connect on a loaded machine."""
    seen = len(dash.of("status"))
    agent = Agent(cfg, source_factory=lambda cam: EndedCamera())
    agent.start()
    assert agent.inference.finished.wait(30), "the stage's threads did not finish after the source ended"
    assert dash.wait_for(lambda d: any(json.loads(m.payload).get("state") == "online" for m in d.of("status")[seen:]),
                         60), "the station never came online"
    return agent


def item(agent: Agent, probs: np.ndarray, seq: int) -> None:
    """One item of one frame (max_frames: 1), decided from ``probs`` by the station's own inference stage."""
    frame = Frame("cam-a", seq, time.time(), time.monotonic(), np.zeros((28, 28, 3), np.uint8))
    agent.inference.decide(Inferred([frame], agent.model.current, np.array([probs]),
                                    {"preprocess": 0.0, "inference": 0.0}, time.monotonic(), [0]))


def real_item(agent: Agent, images: np.ndarray, seq: int) -> None:
    """One item classified by the real model (ONNX Runtime): the first Fashion-MNIST image it does not take for
    the empty class (Bag), which would be no item at all."""
    for image in images[:50]:
        rgb = np.repeat(image[:, :, None], 3, axis=2)
        inferred = agent.inference.infer([Frame("cam-a", seq, time.time(), time.monotonic(), rgb)])
        if LABELS[int(np.argmax(inferred.probs[0]))] != "Bag":
            agent.inference.decide(inferred)
            return
    raise AssertionError("the model took 50 images for the empty class")


def bodies(d: Subscriber, leaf: str) -> list[dict]:
    return [loads_finite(m.payload) for m in d.of(leaf)]


def last_expect(d: Subscriber) -> dict:
    status = bodies(d, "status")
    return (status[-1].get("last_expect_update") or {}) if status else {}


def receipt_with(d: Subscriber, test, timeout: float = 20) -> dict:
    assert d.wait_for(lambda s: any(test(r) for r in bodies(s, "receipt")), timeout), bodies(d, "receipt")[-1:]
    return [r for r in bodies(d, "receipt") if test(r)][-1]


def lines_of(receipt: dict) -> dict[str, tuple[int, int, str]]:
    return {line["label"]: (line["expected"], line["received"], line["status"]) for line in receipt["lines"]}


def check_receipt(body: dict) -> None:
    validate_message("receipt.v1", body)
    for engine in ENGINES:
        checker("receipt.v1", engine).check("receipt", body)


def test_a_shipment_over_mqtt_receipts_count_every_class_and_survive_a_restart(broker, tiny_bundle, fmnist_video,
                                                                                fmnist_test_images, tmp_path):
    cfg = station_cfg(tmp_path, broker, tiny_bundle, fmnist_video)
    dash = Subscriber(broker.host, broker.port, ROOT)
    operator = Operator(broker, ROOT)
    agent = start(cfg, dash)
    try:
        # given: a shipment opened over MQTT (the command checked against its schema)
        opening = {"shipment": "PO-4711", "lines": {"T-shirt/top": 2, "Trouser": 1, "Dress": 2}}
        validate_message("cmd-expect.v1", opening)
        operator.send("expect", opening)
        assert dash.wait_for(lambda d: last_expect(d).get("ok") is True, 20), last_expect(dash)
        assert last_expect(dash)["shipment"] == {"id": "PO-4711", "state": "open", "lines": 3}
        first = receipt_with(dash, lambda r: r["items"] == 0)
        check_receipt(first)
        assert lines_of(first) == {"T-shirt/top": (2, 0, "short"), "Trouser": (1, 0, "short"),
                                   "Dress": (2, 0, "short")} and first["totals"]["short"] == 5
        validate_message("status.v1", bodies(dash, "status")[-1])

        # when: items are decided
        item(agent, SURE_SHIRT, 1)                       # sure of Shirt while T-shirt is expected: stays Shirt
        item(agent, row(T_shirt_top=0.91), 2)
        item(agent, BORDERLINE_SHIRT, 3)                 # borderline: the prior makes it the expected T-shirt
        item(agent, row(Trouser=0.92), 4)
        item(agent, row(Trouser=0.93), 5)                # one Trouser more than expected
        item(agent, row(Sneaker=0.95), 6)                # not on the shipment
        item(agent, row(Coat=0.2, Pullover=0.19), 7)     # unsure: the review lane
        receipt = receipt_with(dash, lambda r: r["items"] == 7)
        check_receipt(receipt)

        # then: every line has its class and the decisions behind each discrepancy are named
        assert lines_of(receipt) == {"T-shirt/top": (2, 2, "matched"), "Trouser": (1, 2, "over"),
                                     "Dress": (2, 0, "short"), "Shirt": (0, 1, "unexpected"),
                                     "Sneaker": (0, 1, "unexpected")}
        assert receipt["totals"] == {"matched": 3, "over": 1, "short": 2, "unexpected": 2, "review": 1,
                                     "unknown": 0, "discrepancies": 6}
        assert receipt["state"] == "open" and receipt["final"] is False and receipt["shipment"] == "PO-4711"
        assert dash.wait_for(lambda d: len(d.of("decision")) >= 7, 20)
        decisions = {d["id"]: d for d in bodies(dash, "decision")}
        by_label = {line["label"]: line for line in receipt["lines"]}
        trouser_refs = [ref["decision"] for ref in by_label["Trouser"]["refs"]]
        assert len(trouser_refs) == 2 and all(decisions[r]["label"] == "Trouser" for r in trouser_refs)
        assert [decisions[r["decision"]]["label"] for r in by_label["Sneaker"]["refs"]] == ["Sneaker"]
        assert by_label["Dress"]["refs"] == [] and by_label["T-shirt/top"]["refs"] == []
        review = receipt["review"]["refs"]
        assert receipt["review"]["count"] == 1 and decisions[review[0]["decision"]]["low_confidence"] is True
        assert review[0]["frames"] == {"first_seq": 7, "last_seq": 7, "count": 1}
        borderline = next(d for d in decisions.values() if d["item_seq"] == 3)
        assert borderline["label"] == "T-shirt/top" and borderline["low_confidence"] is False

        # an item the real model classifies is counted where its decision says
        real_item(agent, fmnist_test_images[0], 8)
        receipt = receipt_with(dash, lambda r: r["items"] == 8)
        check_receipt(receipt)
        real = next(d for d in bodies(dash, "decision") if d["item_seq"] == 8)
        if real["low_confidence"]:
            assert receipt["review"]["count"] == 2
        else:
            before = {"T-shirt/top": 2, "Trouser": 2, "Shirt": 1, "Sneaker": 1}.get(real["label"], 0)
            assert lines_of(receipt)[real["label"]][1] == before + 1
        counts_before_restart = lines_of(receipt)
    finally:
        agent.shutdown(10)

    # the open shipment survives a restart: counting goes on from the last receipt
    state = json.loads((tmp_path / "station-state.json").read_text())
    assert state["shipment"]["id"] == "PO-4711"
    agent = start(cfg, dash)
    try:
        assert agent.inference.receiving.shipment is not None and agent.inference.receiving.shipment.id == "PO-4711"
        item(agent, row(Dress=0.9), 9)
        receipt = receipt_with(dash, lambda r: r["items"] == 9)
        check_receipt(receipt)
        assert lines_of(receipt)["Dress"] == (2, 1, "short")
        assert {k: v for k, v in lines_of(receipt).items() if k != "Dress"} == \
            {k: v for k, v in counts_before_restart.items() if k != "Dress"}

        # a bad cmd/expect is refused by name and counted; the open shipment stays as it was
        for bad, field in [({"shipment": "PO-4711", "lines": {"Jacket": 1}}, "field lines.Jacket"),
                           ({"shipment": "PO 9", "lines": {"Dress": 1}}, "field shipment"),
                           ({"shipment": "PO-9", "lines": {"Dress": 0}}, "field lines.Dress"),
                           ({"shipment": "PO-9", "lines": {"Dress": 1}}, "field shipment: 'PO-4711' is open"),
                           ({"shipment": "PO-9", "close": True}, "field shipment: 'PO-9' is not open"),
                           ({"shipment": "PO-4711", "lines": {"Dress": 1}, "close": True}, "field lines"),
                           ({"shipment": "PO-4711", "extra": 1}, "field extra")]:
            operator.send("expect", bad)
            assert dash.wait_for(lambda d: field in (last_expect(d).get("reason") or ""), 20), \
                (bad, last_expect(dash))
            assert last_expect(dash)["ok"] is False and last_expect(dash)["shipment"] is None
        operator.send("expect", b'{"shipment": "PO-4711", "lines": {"Dress": NaN}}')
        assert dash.wait_for(lambda d: "field lines.Dress: not a finite number" in
                             (last_expect(d).get("reason") or ""), 20), last_expect(dash)
        operator.send("expect", b'{"shipment": "PO-9", "lines": {"Dress": 1, "Dress": 2}}')   # which count?
        assert dash.wait_for(lambda d: "field lines: label 'Dress' given twice" in
                             (last_expect(d).get("reason") or ""), 20), last_expect(dash)
        operator.send("expect", {"shipment": "PO-9", "lines": {"Dress": True}})
        assert dash.wait_for(lambda d: "field lines.Dress: Value error, expected an integer, not a boolean" in
                             (last_expect(d).get("reason") or ""), 20), last_expect(dash)
        assert agent.metrics.counter("commands_rejected_total", command="expect") == 10
        validate_message("status.v1", bodies(dash, "status")[-1])
        assert agent.inference.receiving.shipment.id == "PO-4711"

        # closing publishes the final receipt, and the station has no shipment open after another restart
        operator.send("expect", {"shipment": "PO-4711", "close": True})
        final = receipt_with(dash, lambda r: r["final"] is True)
        check_receipt(final)
        assert final["state"] == "closed" and final["closed_at"] >= final["opened_at"] and final["items"] == 9
        assert lines_of(final)["Dress"] == (2, 1, "short")
        assert dash.wait_for(lambda d: last_expect(d).get("shipment") == {"id": "PO-4711", "state": "closed", "lines": 3},
                             20), last_expect(dash)     # the status after the close may land after the final receipt
    finally:
        agent.shutdown(10)
    assert json.loads((tmp_path / "station-state.json").read_text())["shipment"] is None
    agent = start(cfg, dash)
    try:
        assert agent.inference.receiving.shipment is None
        receipts = len(dash.of("receipt"))
        item(agent, row(Dress=0.9), 10)                  # no shipment: decided as ever, no receipt
        assert dash.wait_for(lambda d: len(d.of("decision")) >= 10, 20)
        assert bodies(dash, "decision")[-1]["label"] == "Dress" and len(dash.of("receipt")) == receipts
    finally:
        agent.shutdown(10)
        operator.close()
        dash.close()


def test_a_receipt_worked_out_before_a_close_is_never_stored_after_the_final_one(broker, tiny_bundle, fmnist_video,
                                                                                 tmp_path, monkeypatch):
    """The decide thread works out a receipt, then stores it with its batch; a cmd/expect close in between must
    not store the final receipt first (the dashboard keeps the highest seq: the shipment would show open for
    good). The decide thread's write is held (as a slow fsync would) until the close has had its chance."""
    cfg = station_cfg(tmp_path, broker, tiny_bundle, fmnist_video)
    dash = Subscriber(broker.host, broker.port, ROOT)
    agent = start(cfg, dash)
    try:
        assert agent.expect(json.dumps({"shipment": "PO-1", "lines": {"Dress": 2}}).encode())
        outbox, held, go = agent.outbox, threading.Event(), threading.Event()
        real_put_many = outbox.put_many

        def slow_put_many(messages):
            if threading.current_thread() is decider and any(m.kind == "receipt" for m in messages):
                held.set()
                assert go.wait(30)
            return real_put_many(messages)

        monkeypatch.setattr(outbox, "put_many", slow_put_many)
        decider = threading.Thread(target=item, args=(agent, row(Dress=0.9), 1))
        decider.start()
        assert held.wait(30), "the decide thread stored no receipt"
        closed = []
        closer = threading.Thread(target=lambda: closed.append(agent.expect(b'{"shipment": "PO-1", "close": true}')))
        closer.start()
        closer.join(0.5)
        assert closer.is_alive(), "the close stored its final receipt while an earlier receipt was being stored"
        go.set()
        decider.join(30)
        closer.join(30)
        assert closed == [True]
        final = receipt_with(dash, lambda r: r["final"] is True)
        assert final["items"] == 1 and final["state"] == "closed"
        receipts = [r for r in bodies(dash, "receipt") if r["shipment"] == "PO-1"]
        assert [r["final"] for r in sorted(receipts, key=lambda r: r["seq"])] == [False, False, True], receipts
    finally:
        agent.shutdown(10)
        dash.close()


def test_a_saved_shipment_is_a_copy_and_a_bad_one_is_refused_by_name():
    """station-state.json gets a copy made under the desk's lock (the decide thread records on while it is
    written out); a saved shipment with numbers no float holds, or a time that is not one, is refused naming
    the field, never an OverflowError at start-up."""
    desk = ReceivingDesk(ReceivingConfig())
    desk.open(ExpectCommand(shipment="S-1", lines={"Shirt": 1}), LABELS)
    saved = desk.saved()
    shirt = ItemDecision("cam", 1, "Shirt", 6, 0.9, 1.0, 1, 1.0, 1.0, "default", False, (), (("Shirt", 0.9),), (1, 1))
    desk.record(shirt, "00000000-0000-4000-8000-000000000001")
    desk.record(coat(2, 0.9, None), "00000000-0000-4000-8000-000000000002")
    assert saved["received"] == {} and saved["refs"] == {} and desk.saved()["received"] == {"Shirt": 1, "Coat": 1}
    good = desk.saved()
    assert Shipment.from_json(good).receipt()["items"] == 2
    ref = good["refs"]["Coat"][0]
    for bad, field in (({"opened_at": 10 ** 400}, "opened_at"), ({"opened_at": True}, "opened_at"),
                       ({"opened_at": -5.0}, "opened_at"), ({"opened_at": "today"}, "opened_at"),
                       ({"refs": {**good["refs"], "Coat": [{**ref, "confidence": 10 ** 400}]}}, "refs.Coat")):
        with pytest.raises(ShipmentError, match=f"field shipment.{field}"):
            Shipment.from_json({**good, **bad})


def test_a_close_delivered_twice_is_done_already_and_one_never_opened_is_refused():
    """A close delivered twice (QoS 1) was refused as "not open"; the desk now knows the shipment it closed last,
    also one closed before a restart whose final receipt it stores again."""
    desk = ReceivingDesk(ReceivingConfig())
    desk.open(ExpectCommand(shipment="S-1", lines={"Shirt": 1}), LABELS)
    with desk.expecting(ExpectCommand(shipment="S-1", close=True), LABELS) as closed:
        pass
    with pytest.raises(AlreadyClosed, match="'S-1' was already closed") as again:
        desk.close("S-1")
    assert (again.value.closed.id, again.value.closed.final_id, again.value.closed.lines) == ("S-1", closed.final_id, 1)
    assert desk.shipment is None and desk.saved() is None        # nothing changed, nothing to save
    with pytest.raises(ShipmentError, match="'S-9' is not open") as never:
        desk.close("S-9")
    assert not isinstance(never.value, AlreadyClosed)
    # a close whose final receipt could not be stored is undone: not closed, so a close of it is no repeat
    desk.open(ExpectCommand(shipment="S-2", lines={"Shirt": 1}), LABELS)
    with pytest.raises(OSError):
        with desk.expecting(ExpectCommand(shipment="S-2", close=True), LABELS):
            raise OSError("the outbox's disk is full")
    assert desk.shipment.id == "S-2" and desk.last_closed.id == "S-1"
    # restored as closed (saved at its close before a restart): its final receipt stored again, then done already
    restarted, finals = ReceivingDesk(ReceivingConfig()), []
    restarted.store_final = finals.append
    restarted.restore(Shipment.from_json(closed.to_json()))
    assert [s.final_id for s in finals] == [closed.final_id]
    with pytest.raises(AlreadyClosed):
        restarted.close("S-1")


def test_a_receipt_lists_at_most_max_refs_per_line_and_counts_the_rest():
    shipment = Shipment("S-1", dict(ExpectCommand(shipment="S-1", lines={"Dress": 1}).lines), 1.0)
    for n in range(1, 9):
        shipment.record(ItemDecision("cam", n, "Coat", 4, 0.9, 1.0, 1, 1.0, 1.0, "default", False, (), (("Coat", 0.9),),
                                     (n, n)), f"00000000-0000-4000-8000-{n:012d}", max_refs=5)
    body = {"schema": "receipt.v1", "id": "00000000-0000-4000-8000-000000000000", "seq": 1, "ts": 2.0,
            "site": "test", "station": "st-01", "final": False, **shipment.receipt()}
    check_receipt(body)
    coat = next(line for line in body["lines"] if line["label"] == "Coat")
    assert coat["status"] == "unexpected" and coat["received"] == 8
    # all as doubtful as each other (same confidence, no unknown score): the newest first
    assert [r["item_seq"] for r in coat["refs"]] == [8, 7, 6, 5, 4] and coat["refs_left_off"] == 3
    assert Shipment.from_json(json.loads(json.dumps(shipment.to_json()))).receipt() == shipment.receipt()


def coat(n: int, confidence: float, score: float | None) -> ItemDecision:
    return ItemDecision("cam", n, "Coat", 4, confidence, 1.0, 1, 1.0, 1.0, "default", False, (), (("Coat", 0.9),),
                        (n, n), unknown_score=score)


def test_an_over_line_lists_its_most_doubtful_items_first_not_the_newest():
    """Six coats where two were expected, at most three refs: the three least confident (the items a dock checks
    first), whatever their order; between equally confident ones the higher unknown score first. A restart keeps
    the ranking; a state saved before it (refs newest last, no scores) is ranked when it is read; a saved ref
    without a finite confidence or score is refused, naming the line."""
    items = {1: (0.95, 1.0), 2: (0.70, 2.0), 3: (0.90, 9.0), 4: (0.80, 1.0), 5: (0.99, 8.0), 6: (0.80, 3.0)}
    shipment = Shipment("S-1", {"Coat": 2}, 1.0)
    for n, (confidence, score) in items.items():
        shipment.record(coat(n, confidence, score), f"00000000-0000-4000-8000-{n:012d}", max_refs=3)
    body = {"schema": "receipt.v1", "id": "00000000-0000-4000-8000-000000000000", "seq": 1, "ts": 2.0,
            "site": "test", "station": "st-01", "final": False, **shipment.receipt()}
    check_receipt(body)
    line = body["lines"][0]
    assert (line["status"], line["over"], body["line_refs"]) == ("over", 4, "most_doubtful")
    assert [(r["item_seq"], r["unknown_score"]) for r in line["refs"]] == [(2, 2.0), (6, 3.0), (4, 1.0)]
    assert line["refs_left_off"] == 3
    assert Shipment.from_json(json.loads(json.dumps(shipment.to_json()))).receipt() == shipment.receipt()

    unscored = Shipment("S-2", {"Coat": 1}, 1.0)
    for n, confidence in ((1, 0.97), (2, 0.81), (3, 0.99), (4, 0.86), (5, 0.86)):
        unscored.record(coat(n, confidence, None), f"00000000-0000-4000-8000-{n:012d}", max_refs=3)
    assert [r["item_seq"] for r in unscored.receipt()["lines"][0]["refs"]] == [2, 5, 4]   # equals: the newest first

    older = shipment.to_json()
    del older["line_refs_ranked"]
    older["refs"] = {"Coat": [{k: v for k, v in ref.items() if k != "unknown_score"}
                              for ref in sorted(older["refs"]["Coat"], key=lambda r: r["item_seq"])]}
    restored = Shipment.from_json(older).receipt()["lines"][0]["refs"]
    assert [r["item_seq"] for r in restored] == [2, 6, 4]      # 4 and 6 equal without scores: the newest first
    for bad in ({"confidence": float("nan")}, {"confidence": "high"}, {"unknown_score": float("inf")}):
        broken = json.loads(json.dumps(shipment.to_json()))
        broken["refs"]["Coat"][1].update(bad)
        with pytest.raises(ShipmentError, match="field shipment.refs.Coat"):
            Shipment.from_json(broken)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_cmd_expect_schema_and_the_agent_agree_on_what_a_command_is(engine):
    good = [{"shipment": "PO-4711", "lines": {"T-shirt/top": 2, "Dress": 1}},
            {"shipment": "PO-4711", "lines": {"Dress": 1}, "close": False},
            {"shipment": "PO-4711", "close": True},
            {"shipment": "PO-4711", "lines": {"Dress": 3.0}}]     # JSON Schema's integer: 3.0 is one
    bad = [{"shipment": "PO 9", "lines": {"Dress": 1}}, {"shipment": "PO-9", "lines": {"Dress": 0}},
           {"shipment": "PO-9", "lines": {}}, {"shipment": "PO-9"}, {"shipment": "PO-9", "close": False},
           {"shipment": "PO-9", "lines": {"Dress": 1}, "close": True}, {"shipment": "PO-9", "close": True, "x": 1},
           {"shipment": "x" * 65, "close": True}, {"shipment": "PO-9", "lines": {"": 1}},
           {"shipment": "PO-9", "lines": {"Dress": 1_000_001}},
           # what pydantic's lax mode would turn into 3, 1 and true
           {"shipment": "PO-9", "lines": {"Dress": "3"}}, {"shipment": "PO-9", "lines": {"Dress": True}},
           {"shipment": "PO-9", "lines": {"Dress": 2.5}}, {"shipment": "PO-9", "close": "true"},
           {"shipment": "PO-9", "close": 1}, {"shipment": "PO-9", "lines": {"Dress": 1}, "close": 0}]
    check = checker("cmd-expect.v1", engine)
    for body in good:
        assert check.error(body) is None, body
        ExpectCommand.model_validate(body)
        ExpectCommand.model_validate(command_json("expect", json.dumps(body).encode()))
    for body in bad:
        assert check.error(body) is not None, body
        with pytest.raises(ValueError):
            ExpectCommand.model_validate(body)
        with pytest.raises(ValueError):
            ExpectCommand.model_validate(command_json("expect", json.dumps(body).encode()))
    # a key given twice: the schema sees only what a parser kept (the last), so the agent refuses it as it parses
    for raw, field in [(b'{"shipment": "PO-9", "lines": {"Dress": 3, "Dress": 5}}', "field lines: label 'Dress' given"),
                       (b'{"shipment": "PO-9", "lines": {"Dress": 3, "Coat": 1, "Dress": 3}}', "label 'Dress' given"),
                       (b'{"shipment": "PO-9", "shipment": "PO-8", "close": true}', "field shipment: given twice"),
                       (b'{"shipment": "PO-9", "close": true, "close": false}', "field close: given twice")]:
        with pytest.raises(ValueError, match=field):
            command_json("expect", raw)
    # as is a key given twice in any command's payload
    for verb, raw, field in [("thresholds", b'{"min_confidence": 0.5, "min_confidence": 0.9}',
                              "field min_confidence: given twice"),
                             ("thresholds", b'{"camera": "cam-1", "min_margin": 0.1, "camera": "cam-2"}',
                              "field camera: given twice"),
                             ("capture-empty", b'{"count": 1, "count": 5}', "field count: given twice")]:
        with pytest.raises(ValueError, match=field):
            command_json(verb, raw)
    # and still no NaN, infinity or 1e999, nor nesting deeper than the parser goes
    for raw, field in [(b'{"shipment": "PO-9", "lines": {"Dress": NaN}}', "field lines.Dress: not a finite"),
                       (b'{"shipment": "PO-9", "lines": {"Dress": 1e999}}', "field lines.Dress: not a finite"),
                       (b'{"shipment": "PO-9", "lines": {"Dress": -Infinity}}', "field lines.Dress: not a finite"),
                       (b'{"shipment": "PO-9", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "payload: not JSON")]:
        with pytest.raises(ValueError, match=field):
            command_json("expect", raw)


def test_receipts_come_at_most_once_per_interval_and_only_after_new_items():
    now = [100.0]
    desk = ReceivingDesk(ReceivingConfig(receipt_interval_s=10), clock=lambda: now[0])
    desk.open(ExpectCommand(shipment="S-1", lines={"Dress": 2}), LABELS)
    dress = ItemDecision("cam", 1, "Dress", 3, 0.9, 1.0, 1, 1.0, 1.0, "default", False, (), (("Dress", 0.9),), (1, 1))
    assert desk.due_receipt(now[0]) is None                      # the opening's receipt is the command's (Agent.expect)
    desk.record(dress, "00000000-0000-4000-8000-000000000001")
    assert desk.due_receipt(105.0) is None                       # within the interval: folded into the next
    assert desk.due_receipt(110.0)["lines"][0]["received"] == 1
    assert desk.due_receipt(200.0) is None                       # nothing new since
    closed = desk.close("S-1")
    assert closed.receipt()["state"] == "closed" and desk.due_receipt(300.0) is None and desk.prior(LABELS) is None


def test_receipts_go_on_after_the_wall_clock_steps_back():
    """NTP steps a clock that ran ahead back an hour: the next item's receipt is due at once and the interval is
    counted from it. Before, no receipt was due (with the default interval 0 too) until the clock was back past
    the last receipt's time: an hour of items with no receipt, and no station-state.json saved."""
    for interval in (0.0, 60.0):
        desk = ReceivingDesk(ReceivingConfig(receipt_interval_s=interval))
        desk.open(ExpectCommand(shipment="S-1", lines={"Dress": 5}), LABELS)
        due = []
        for n, now in enumerate([desk.shipment.opened_at + 70, desk.shipment.opened_at - 3530], start=1):
            desk.record(ItemDecision("cam", n, "Dress", 3, 0.9, 1.0, 1, 1.0, 1.0, "default", False, (),
                                     (("Dress", 0.9),), (n, n)), f"00000000-0000-4000-8000-{n:012d}")
            due.append(desk.due_receipt(now))
        assert [r["items"] if r else None for r in due] == [1, 2], interval
        desk.record(ItemDecision("cam", 3, "Dress", 3, 0.9, 1.0, 1, 1.0, 1.0, "default", False, (),
                                 (("Dress", 0.9),), (3, 3)), "00000000-0000-4000-8000-000000000003")
        after = desk.shipment.opened_at - 3520       # 10 s after the step back
        assert (desk.due_receipt(after) is None) is (interval == 60.0)


# ------------------------------------------------------------------ receipts and commands at the schema's limits

def test_a_shipment_line_shares_a_receipt_wide_refs_budget_equally_and_never_gets_more_than_it_has():
    assert refs_share([3, 2], 10) == [3, 2]                               # under the budget: all of them
    assert refs_share([1, 50, 50, 2], 20) == [1, 9, 8, 2]                 # the small keep theirs, the rest share
    assert refs_share([100] * 3, 10) == [4, 3, 3]                         # what an equal split leaves: the first
    assert refs_share([5] * 30, 10) == [1] * 10 + [0] * 20
    for wanted, budget in (([7, 0, 3, 100, 100, 1], 50), ([2] * 2000, 1000), ([100] * 2000, 1000)):
        share = refs_share(wanted, budget)
        assert sum(share) == min(budget, sum(wanted)) and all(0 <= s <= w for s, w in zip(share, wanted))


def decided(n: int, label: str, confidence: float = 0.9, camera: str = "cam-a", lane: str = "default") -> ItemDecision:
    return ItemDecision(camera, n, label, 1, confidence, 1.0, 3, 1.0, 2.0, lane, False, (), ((label, confidence),),
                        (n, n + 2), unknown_score=1.5)


def receipt_message(shipment: Shipment) -> tuple[dict, int]:
    """A whole receipt.v1 as the outbox sends it (its largest seq and station fields) and its size on the wire."""
    body = {**receipt_body(shipment.receipt(), site="s" * 64, station="t" * 64, ts=1e9, final=True),
            "seq": 9007199254740991}
    return body, len(dumps_finite(body, separators=(",", ":")).encode())


def test_a_receipt_stays_within_the_schema_and_the_broker_whatever_the_shipment():
    """1,000 expected lines each one over and 1,600 labels not on the shipment: the receipt lists every expected
    line and the 1,000 unexpected ones with the most items (2,000 lines, the schema's maxItems), at most
    MAX_RECEIPT_LINE_REFS refs over all of them (refs_left_off counts the rest, line by line), totals and items
    still count every item; it follows the schema and stays well under 1 MiB. At the schema's limits (256-character
    labels and lanes, 100 refs kept per label) it stays under the broker's 4 MiB message_size_limit."""
    expected = {f"SKU-{i:05d} Brand Product 42 Blue": 1 for i in range(1000)}
    shipment = Shipment("PO-4711", expected, 1.0)
    n = 0
    for label in expected:                        # two of each: one over
        for _ in range(2):
            n += 1
            shipment.record(decided(n, label, 0.9 - n * 1e-6), f"00000000-0000-4000-8000-{n:012d}", max_refs=50)
    others = [f"OTHER-{i:05d} Brand Product 42 Red" for i in range(1600)]
    for i, label in enumerate(others):            # the first 1,000 of them twice, the rest once
        for _ in range(2 if i < 1000 else 1):
            n += 1
            shipment.record(decided(n, label), f"00000000-0000-4000-8000-{n:012d}", max_refs=50)
    body, size = receipt_message(shipment)
    check_receipt(body)
    lines = body["lines"]
    assert len(lines) == MAX_RECEIPT_LINES == 2000
    assert [line["label"] for line in lines[:1000]] == list(expected)
    assert {line["label"] for line in lines[1000:]} == set(others[:1000])          # the smallest left off
    assert sum(len(line["refs"]) for line in lines) == MAX_RECEIPT_LINE_REFS
    for line in lines:
        assert len(line["refs"]) + line["refs_left_off"] == line["received"] == 2
    assert body["items"] == n == 2000 + 2000 + 600
    assert (body["totals"]["unexpected"], body["totals"]["over"], body["totals"]["matched"]) == (2600, 1000, 1000)
    assert body["totals"]["unexpected"] - sum(line["unexpected"] for line in lines) == 600   # the lines left off
    assert body["lines_left_off"] == 600
    assert size < 768 * 1024, size                   # about 550 kB
    assert Shipment.from_json(json.loads(json.dumps(shipment.to_json()))).receipt() == shipment.receipt()

    # the schema's limits: every string as long as it may be, every count as large, max_refs 100 everywhere
    def ref(k: int, label: str) -> dict:
        return item_ref(decided(10 ** 15 + k, label, 0.123456789, camera="c" * 64, lane="l" * 256),
                        f"00000000-0000-4000-8000-{k:012d}")
    label = lambda i: f"{i:05d}".ljust(256, "x")     # noqa: E731
    huge = Shipment("S" * 64, {label(i): 1_000_000 for i in range(1000)}, 1e9)
    for i in range(2600):
        huge.received[label(i)] = huge.refs_seen[label(i)] = 10 ** 12      # the sums stay within 2**53
        huge.refs[label(i)] = [ref(k, label(i)) for k in range(100)]
    for key in ("", UNKNOWN_LABEL):
        huge.refs[key], huge.refs_seen[key] = [ref(k, label(0)) for k in range(100)], 10 ** 12
    huge.review = huge.unknown = huge.vouched = 10 ** 12
    huge.vouched_refs = [ref(k, label(0)) for k in range(100)]
    body, size = receipt_message(huge)
    for engine in ENGINES:
        checker("receipt.v1", engine).check("receipt", body)
    assert len(body["lines"]) == 2000 and sum(len(line["refs"]) for line in body["lines"]) == 1000
    assert size < 2 * 1024 * 1024, size            # the broker's limit is 4 MiB


def test_a_receipt_of_non_ascii_labels_at_the_schemas_limits_still_fits_the_broker():
    """Labels and lanes of 256 characters outside the BMP, which the outbox writes as 12-byte escapes: listed
    whole, the receipt below is about 10 MB, and the broker (4 MiB) would refuse it, so it would never arrive.
    The refs are left off first (the line refs, then review, unknown and vouched), then the unexpected lines
    with the fewest items (``lines_left_off``): it follows the schema, fits RECEIPT_MAX_BYTES, lists every
    expected line, and its counts still cover every item."""
    from agent.receiving import RECEIPT_MAX_BYTES

    def ref(k: int, label: str) -> dict:
        return item_ref(decided(10 ** 15 + k, label, 0.5 - k * 1e-4, camera="c" * 64, lane="\U0001F69A" * 256),
                        f"00000000-0000-4000-8000-{k:012d}")
    label = lambda i: (f"{i:05d}" + "\U0001F4E6" * 256)[:256]      # noqa: E731
    wide = Shipment("S" * 64, {label(i): 1 for i in range(1000)}, 1e9)
    for i in range(2000):                                               # 1,000 expected, 1,000 unexpected lines
        wide.received[label(i)] = wide.refs_seen[label(i)] = 2 + (i >= 1000) * (i % 7)
        wide.refs[label(i)] = [ref(k, label(i)) for k in range(2)]
    for key in ("", UNKNOWN_LABEL):
        wide.refs[key], wide.refs_seen[key] = [ref(k, label(0)) for k in range(100)], 100
    wide.review = wide.unknown = wide.vouched = 100
    wide.vouched_refs = [ref(k, label(0)) for k in range(100)]
    whole = wide.receipt(max_bytes=10 ** 9)
    assert len(dumps_finite(whole, separators=(",", ":"))) > 8 * 1024 * 1024      # what the station sent before
    body, size = receipt_message(wide)
    for engine in ENGINES:
        checker("receipt.v1", engine).check("receipt", body)
    assert size <= RECEIPT_MAX_BYTES + 1024 < 4 * 1024 * 1024, size
    lines = body["lines"]
    assert [line["label"] for line in lines[:1000]] == [label(i) for i in range(1000)]
    assert sum(len(line["refs"]) for line in lines) == 0 and all(line["refs_left_off"] == line["received"]
                                                                  for line in lines if line["status"] != "matched")
    assert body["lines_left_off"] == 1000 - (len(lines) - 1000) > 0
    listed = [wide.received[line["label"]] for line in lines[1000:]]
    left = sorted(wide.received[label(i)] for i in range(1000, 2000))[:body["lines_left_off"]]
    assert not listed or min(listed) >= max(left)                          # the fewest items were left off
    assert (body["items"], body["totals"]["unexpected"]) == (whole["items"], whole["totals"]["unexpected"])
    assert body["totals"] == whole["totals"]
    for key in ("review", "unknown", "vouched"):
        assert body[key]["count"] == 100 and len(body[key]["refs"]) + body[key]["refs_left_off"] == 100
    # a receipt that fits is listed whole, as before
    small = Shipment("PO-1", {label(0): 1}, 1.0)
    small.record(decided(1, label(0)), "00000000-0000-4000-8000-000000000001", max_refs=50)
    assert small.receipt() == small.receipt(max_bytes=10 ** 9) and small.receipt()["lines_left_off"] == 0


def test_the_largest_cmd_expect_the_schema_allows_is_read_and_one_byte_more_is_refused():
    """1,000 lines of 256-character labels, each expecting 1,000,000: with ASCII labels about 270 kB, with labels of
    characters outside the BMP written as JSON escapes (12 bytes each) about 3 MB; both are read. The other
    commands keep their 64 KiB."""
    check = checker("cmd-expect.v1")
    for char in ("x", "\U0001F600"):
        lines = {(f"{i:04d}" + char * 256)[:256]: 1_000_000 for i in range(1000)}
        body = {"shipment": "S" * 64, "lines": lines, "close": False}
        assert check.error(body) is None
        raw = json.dumps(body).encode()
        cmd = ExpectCommand.model_validate(command_json("expect", raw))
        assert cmd.lines == lines
    assert len(raw) > 3_000_000 and 1000 * EXPECT_MAX_LINE_BYTES < COMMAND_LIMITS["expect"] < 4 * 1024 * 1024
    too_big = b'{"shipment": "S", "close": true' + b" " * (COMMAND_LIMITS["expect"] - 31) + b"}"
    assert len(too_big) == COMMAND_LIMITS["expect"] + 1
    with pytest.raises(ValueError, match=f"payload: {len(too_big)} bytes, more than {COMMAND_LIMITS['expect']}"):
        command_json("expect", too_big)
    assert ExpectCommand.model_validate(command_json("expect", too_big[:-2] + b"}")).close is True
    with pytest.raises(ValueError, match=f"more than {COMMAND_MAX_BYTES}"):
        command_json("thresholds", b'{"min_confidence": 0.5' + b" " * COMMAND_MAX_BYTES + b"}")


def test_a_saved_shipment_with_a_boolean_count_too_few_refs_seen_or_an_empty_label_is_refused_by_name():
    desk = ReceivingDesk(ReceivingConfig())
    desk.open(ExpectCommand(shipment="S-1", lines={"Dress": 1}), LABELS)
    for n in (1, 2):
        desk.record(coat(n, 0.9, None), f"00000000-0000-4000-8000-{n:012d}")
    desk.record(ItemDecision("cam", 3, "Coat", 4, 0.3, 1.0, 1, 1.0, 1.0, "manual-review", True, ("low",),
                             (("Coat", 0.3),), (3, 3)), "00000000-0000-4000-8000-000000000003")
    good = json.loads(json.dumps(desk.saved()))
    assert Shipment.from_json(good).receipt() == desk.shipment.receipt()
    for bad, field in [({"received": {"Dress": True, "Coat": 2}}, "field shipment.received: expected label -> count"),
                       ({"received": {"Coat": 2.0}}, "field shipment.received"),
                       ({"received": {"": 3, "Coat": 2}}, "field shipment.received: '' is not a label"),
                       ({"received": {"x" * 257: 1, "Coat": 2}}, "field shipment.received: 'xxx"),
                       ({"received": {UNKNOWN_LABEL: 1, "Coat": 2}}, "field shipment.received: 'unknown'"),
                       ({"refs_seen": {"Coat": 1, "": 1}}, "field shipment.refs_seen.Coat: 1 is fewer than the 2"),
                       ({"refs_seen": {"Coat": 2, "": 0}}, "field shipment.refs_seen.: 0 is fewer than the 1"),
                       ({"refs_seen": {"Coat": True, "": 1}}, "field shipment.refs_seen: expected label -> count"),
                       ({"review": True}, "field shipment.review"), ({"vouched": False}, "field shipment.vouched"),
                       ({"expected": {"Dress": True}}, "field shipment: not a shipment")]:
        with pytest.raises(ShipmentError, match=re.escape(field)):
            Shipment.from_json({**good, **bad})


def test_a_restored_shipment_naming_labels_the_model_lacks_is_kept_and_warned_about(broker, tiny_bundle,
                                                                                    fmnist_video, tmp_path, caplog):
    """A shipment saved under another model (opened before a cmd/model, say) is restored as saved, its tally
    intact, with a warning naming the labels the running model lacks."""
    cfg = station_cfg(tmp_path, broker, tiny_bundle, fmnist_video)
    shipment = Shipment("PO-7", {"Dress": 2, "Jacket": 1}, 100.0)
    shipment.record(decided(1, "Dress"), "00000000-0000-4000-8000-000000000001", max_refs=5)
    shipment.record(decided(2, "Scarf"), "00000000-0000-4000-8000-000000000002", max_refs=5)
    StationState(tmp_path / STATE_FILE, manifest_sha256(tiny_bundle), shipment=shipment.to_json()).save()
    dash = Subscriber(broker.host, broker.port, ROOT)
    caplog.set_level(logging.INFO, logger="agent.app")
    agent = start(cfg, dash)
    try:
        restored = agent.inference.receiving.shipment
        assert restored is not None and restored.receipt() == shipment.receipt()
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "PO-7" in r.getMessage()]
        assert len(warned) == 1 and "2 label(s)" in warned[0] and "'Jacket', 'Scarf'" in warned[0], warned
        assert "'Dress'" not in warned[0]
    finally:
        agent.shutdown(10)
        dash.close()


def test_a_station_whose_broker_takes_less_holds_its_receipts_under_that(tmp_path, tiny_bundle):
    """mqtt.max_message_bytes below the 4 MiB default (a broker with a smaller message_size_limit): the outbox
    refuses anything larger, so receipts are worked out under it, with the same room for the station's fields."""
    from agent_support import inference_stage

    from agent.receiving import RECEIPT_ROOM_BYTES, ReceivingDesk

    cfg = as_config(station_config(tmp_path, tiny_bundle, "unused", 1, mqtt={"max_message_bytes": 256 * 1024}))
    stage, outbox, _, _ = inference_stage(cfg, tiny_bundle)
    outbox.close()
    assert stage.receiving.receipt_max_bytes == 256 * 1024 - RECEIPT_ROOM_BYTES
    desk = ReceivingDesk(ReceivingConfig(), clock=lambda: 0.0, receipt_max_bytes=64 * 1024)
    desk.open(ExpectCommand(shipment="PO-1", lines={"Coat": 1}), ["Coat", "Dress"])
    for n in range(1, 2001):
        desk.record(decided(n, f"OTHER-{n:05d} " + "x" * 100), f"00000000-0000-4000-8000-{n:012d}")
    body = desk.due_receipt(1.0)
    assert len(dumps_finite(body, separators=(",", ":"))) <= 64 * 1024 and body["lines_left_off"] > 0
    assert body["totals"]["unexpected"] == 2000
