"""Which items a shipment counts: only those whose decision is stored, each in the shipment that weighed it.

Real parts: ONNX Runtime (the tiny bundle, built and checked by the station), the SQLite outbox and SQLite's
own "database or disk is full" (``PRAGMA max_page_count``: the file may grow no more), mosquitto for the
station tests, station-state.json across a restart. The stand-in, as in test_receiving.py: items are decided
from probability rows the test writes (``Inferred``), because a random-weight model cannot be made to produce
a sure Dress or a borderline Coat/Dress on demand. Threads are held with events, never with sleeps.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time

import numpy as np
from agent_support import as_config, inference_stage, make_tiny_bundle, station_config
from test_receiving import start

from agent.app import Agent
from agent.config import ExpectCommand
from agent.demo import Subscriber
from agent.outbox import Message, Outbox
from agent.pipeline import Inferred
from agent.sources.base import Frame
from contract.messages import loads_finite

ROOT = "inventory/test/st-01"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def row(**probs: float) -> np.ndarray:
    """A probability row over LABELS: the named labels, the rest shared evenly."""
    rest = (1.0 - sum(probs.values())) / (len(LABELS) - len(probs))
    return np.array([probs.get(label, rest) for label in LABELS])


SURE_DRESS = row(Dress=0.9)
UNSURE = row(Coat=0.2, Pullover=0.19)
BORDERLINE_COAT = row(Coat=0.42, Dress=0.38)     # Coat alone; Dress (0.76 against 0.42) with Dress expected


def decisions_config(tmp_path, bundle, port: int = 1, **receiving):
    return as_config(station_config(
        tmp_path, bundle, "none", port, frames={"enabled": True, "min_interval_s": 0.0, "dedupe_bits": 0},
        decisions={"presence": {"mode": "empty_class", "empty_class": "Bag", "min_frames": 1, "max_frames": 1,
                                "gap_frames": 1},
                   "receiving": {"expected_weight": 2.0, "max_refs": 5, **receiving}}))


def inferred(runtime, rows: list[np.ndarray], seq: int, images: list[np.ndarray] | None = None) -> Inferred:
    """One item per row (max_frames: 1), from camera cam-a, frames numbered from ``seq``."""
    images = images or [np.zeros((28, 28, 3), np.uint8)] * len(rows)
    frames = [Frame("cam-a", seq + i, time.time(), time.monotonic(), image) for i, image in enumerate(images)]
    return Inferred(frames, runtime, np.array(rows), {"preprocess": 0.0, "inference": 0.0}, time.monotonic(),
                    list(range(len(rows))))


def fill(outbox: Outbox) -> None:
    """SQLite's own full disk: the outbox file may grow no more, and its pages are filled with results."""
    with outbox._lock:
        pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
        outbox._db.execute(f"PRAGMA max_page_count = {pages}")
    for n in range(100_000):
        try:
            outbox.put(Message("result", {"schema": "filler", "n": n}))
        except sqlite3.OperationalError as exc:
            assert "full" in str(exc)
            return
    raise AssertionError("the outbox stored 100,000 results in a file that may not grow")


def make_room(outbox: Outbox) -> None:
    with outbox._lock:
        outbox._db.execute("PRAGMA max_page_count = 1073741823")


def stored(outbox: Outbox, kind: str) -> list[dict]:
    return [r.body for r in outbox.pending(limit=10_000) if r.kind == kind]


def test_a_batch_whose_messages_are_not_stored_counts_none_of_its_items_in_the_receipt(tmp_path):
    """A receipt counts an item once its decision message is in the outbox: a batch whose write fails
    (the disk is full) or whose step fails on an odd frame after items were decided (a 2-channel image: its
    upload cannot be encoded) stores no decision, and counts none of its items. They counted before: the Dress
    line read matched on one stored decision of three, and the receipt named decisions no subscriber ever got."""
    bundle = make_tiny_bundle(tmp_path / "models")
    stage, outbox, metrics, runtime = inference_stage(decisions_config(tmp_path, bundle), bundle)
    stage.receiving.open(ExpectCommand(shipment="S-1", lines={"Dress": 3}), LABELS)

    # when: a batch meets a full disk, and another fails on its second frame, after both its items were decided
    fill(outbox)
    full = inferred(runtime, [SURE_DRESS], 1)
    assert stage._guarded(stage.decide, full, full.batch) is None
    make_room(outbox)
    odd = inferred(runtime, [SURE_DRESS, UNSURE], 2, [np.zeros((28, 28, 3), np.uint8), np.zeros((28, 28, 2), np.uint8)])
    assert stage._guarded(stage.decide, odd, odd.batch) is None
    assert metrics.counter("inference_errors_total") == 2
    assert stored(outbox, "decision") == [] and stage.receiving.shipment.received == {}
    # and a good item after them
    stage.decide(inferred(runtime, [SURE_DRESS], 4))

    # then: the receipt counts the one stored decision, and names only stored decisions
    decisions = {d["id"]: d for d in stored(outbox, "decision")}
    receipt = stored(outbox, "receipt")[-1]
    assert len(decisions) == 1 and receipt["items"] == 1
    assert receipt["lines"][0] == {**receipt["lines"][0], "label": "Dress", "received": 1, "status": "short"}
    assert receipt["review"]["count"] == 0 and receipt["totals"]["short"] == 2
    assert metrics.counter("receipts_total") == 1
    saved = stage.receiving.saved()
    assert saved["received"] == {"Dress": 1} and saved["refs_seen"] == {"Dress": 1}
    assert all(ref["decision"] in decisions for refs in saved["refs"].values() for ref in refs)


def test_a_receipt_the_outbox_cannot_store_is_due_again_with_the_next_batch(tmp_path, caplog):
    """The batch's decision is stored and counted, then its receipt's write fails (an SQLite error injected with a
    trigger on receipts only): the next batch sends that receipt, though no item was decided since and the
    interval (an hour) has not passed; the receipt comes after the decisions it counts. The failure is what it is,
    a receipt not stored (``receipt_store_errors_total``, a log line naming the shipment, the outbox and the error),
    not a failed batch: it was logged "decide failed on a batch ...; skipped" and counted in inference_errors_total,
    for a batch whose decisions were stored and counted."""
    bundle = make_tiny_bundle(tmp_path / "models")
    stage, outbox, metrics, runtime = inference_stage(decisions_config(tmp_path, bundle, receipt_interval_s=3600),
                                                      bundle)
    stage.receiving.open(ExpectCommand(shipment="S-1", lines={"Dress": 3}), LABELS)
    stage.clock = lambda: time.time() + 7200          # two hours after the opening: the next receipt is due
    outbox._db.executescript("CREATE TEMP TRIGGER no_receipts BEFORE INSERT ON main.messages WHEN NEW.kind = "
                             "'receipt' BEGIN SELECT RAISE(ABORT, 'injected disk error'); END;")
    dress = inferred(runtime, [SURE_DRESS], 1)
    caplog.set_level(logging.ERROR, logger="agent")
    stage.decide(dress)         # raises nothing: the batch is stored
    assert len(stored(outbox, "decision")) == 1 and stored(outbox, "receipt") == []
    assert stage.receiving.shipment.received == {"Dress": 1} and metrics.counter("inference_errors_total") == 0
    assert metrics.counter("receipt_store_errors_total") == 1 and metrics.counter("receipts_total") == 0
    assert "decide failed" not in caplog.text
    assert f"shipment S-1: its receipt could not be stored in the outbox {outbox.path}" in caplog.text
    assert "injected disk error" in caplog.text and "due again with the next batch" in caplog.text

    outbox._db.execute("DROP TRIGGER temp.no_receipts")
    stage.decide(inferred(runtime, [row(Bag=0.9)], 2))          # an empty frame (Bag: the empty class), no item
    receipt = stored(outbox, "receipt")
    assert [r["items"] for r in receipt] == [1] and receipt[0]["seq"] > stored(outbox, "decision")[0]["seq"]
    assert metrics.counter("receipts_total") == 1


def test_a_batch_stored_in_chunks_counts_the_decisions_of_the_chunks_stored_before_a_write_fails(tmp_path):
    """A batch of more messages than one outbox transaction holds is stored chunk by chunk; when a later chunk's
    write fails (an SQLite error injected with a trigger from the second chunk's first sequence number on), the
    decisions of the chunks already committed are stored and will be published: the shipment counts exactly
    those, none of the failed chunk's."""
    bundle = make_tiny_bundle(tmp_path / "models")
    stage, outbox, metrics, runtime = inference_stage(decisions_config(tmp_path, bundle), bundle)
    stage.receiving.open(ExpectCommand(shipment="S-1", lines={"Dress": 40}), LABELS)
    first_seq = outbox.last_seq + 1
    outbox._db.executescript(f"CREATE TEMP TRIGGER second_chunk BEFORE INSERT ON main.messages WHEN NEW.seq >= "
                             f"{first_seq + 16} BEGIN SELECT RAISE(ABORT, 'injected disk error'); END;")
    batch = inferred(runtime, [SURE_DRESS] * 20, 1)
    assert stage._guarded(stage.decide, batch, batch.batch) is None

    decisions = {d["id"] for d in stored(outbox, "decision")}
    assert 0 < len(decisions) < 20                  # the first chunk's decisions are in the outbox, not the rest
    assert stage.receiving.shipment.received == {"Dress": len(decisions)}
    saved = stage.receiving.saved()
    assert {ref["decision"] for refs in saved["refs"].values() for ref in refs} <= decisions


def item(agent: Agent, probs: np.ndarray, seq: int) -> None:
    agent.inference.decide(inferred(agent.model.current, [probs], seq))


def receipts(dash: Subscriber) -> list[dict]:
    return sorted((loads_finite(m.payload) for m in dash.of("receipt")), key=lambda r: r["seq"])


def test_an_item_decided_while_cmd_expect_closes_and_opens_is_counted_in_the_shipment_that_weighed_it(
        broker, tmp_path, monkeypatch):
    """The decide thread weighs an item with S-1's prior (a borderline Coat becomes the expected Dress) and then
    counts it; cmd/expect closes S-1 and opens S-2 on the command thread in between. Before, the close and open
    went through, and the item was counted in S-2 (where Dress is unexpected), S-1's final receipt missing it;
    with only the close, in no shipment at all. Now cmd/expect waits for the batch being decided."""
    bundle = make_tiny_bundle(tmp_path / "models")
    cfg = decisions_config(tmp_path, bundle, broker.port)
    dash = Subscriber(broker.host, broker.port, ROOT)
    agent = start(cfg, dash)
    try:
        desk = agent.inference.receiving
        assert agent.expect(b'{"shipment": "S-1", "lines": {"Dress": 1}}')
        weighed, go = threading.Event(), threading.Event()
        real_prior = desk.prior

        def held_prior(labels):
            weights = real_prior(labels)
            if threading.current_thread() is decider:
                weighed.set()
                assert go.wait(30)
            return weights

        monkeypatch.setattr(desk, "prior", held_prior)     # the tracker asks it when it decides the item
        decider = threading.Thread(target=item, args=(agent, BORDERLINE_COAT, 1))
        decider.start()
        assert weighed.wait(30), "the item was not decided"
        # while the item is being decided, cmd/expect cannot open or close: it waits for the batch
        assert not desk.storing.acquire(blocking=False), "cmd/expect could change the shipment mid-decision"
        done: list[bool] = []
        commands = threading.Thread(target=lambda: done.extend(
            [agent.expect(b'{"shipment": "S-1", "close": true}'),
             agent.expect(b'{"shipment": "S-2", "lines": {"Coat": 1}}')]))
        commands.start()
        go.set()
        decider.join(30)
        commands.join(30)
        assert done == [True, True]

        assert dash.wait_for(lambda d: any(r["shipment"] == "S-2" for r in receipts(d)), 20), receipts(dash)
        assert dash.wait_for(lambda d: len(d.of("decision")) == 1, 20)
        decision = loads_finite(dash.of("decision")[0].payload)
        assert decision["label"] == "Dress"              # weighed by S-1's prior
        final = next(r for r in receipts(dash) if r["shipment"] == "S-1" and r["final"])
        assert final["items"] == 1 and final["lines"][0]["received"] == 1 and final["lines"][0]["status"] == "matched"
        assert decision["seq"] < final["seq"]
        second = [r for r in receipts(dash) if r["shipment"] == "S-2"]
        assert [r["items"] for r in second] == [0] and desk.shipment.id == "S-2" and desk.shipment.received == {}
    finally:
        agent.shutdown(10)
        dash.close()


def test_a_close_or_open_whose_receipt_cannot_be_stored_is_undone_refused_and_can_be_sent_again(broker, tmp_path):
    """cmd/expect close when the outbox cannot store the final receipt (the disk is full): before, the desk had
    closed the shipment anyway, the final receipt was lost, a second close was refused ('not open'), and
    station-state.json still said open, so a restart reopened it. Now the close is refused naming the outbox,
    counted, and undone; sent again once the disk has room, it stores the final receipt. The same for an open."""
    bundle = make_tiny_bundle(tmp_path / "models")
    cfg = decisions_config(tmp_path, bundle, broker.port)
    dash = Subscriber(broker.host, broker.port, ROOT)
    agent = start(cfg, dash)
    try:
        desk = agent.inference.receiving
        assert agent.expect(b'{"shipment": "S-1", "lines": {"Dress": 2}}')
        item(agent, SURE_DRESS, 1)
        broker.stop()                    # nothing is acknowledged from here: the outbox keeps what it stores
        fill(agent.outbox)
        rejected = agent.metrics.counter("commands_rejected_total", command="expect")

        assert agent.expect(b'{"shipment": "S-1", "close": true}') is False
        reason = agent.last_expect["reason"]
        assert "final receipt could not be stored in the outbox" in reason and str(agent.outbox.path) in reason
        assert "database or disk is full" in reason and "open: 'S-1'" in reason
        assert desk.shipment is not None and desk.shipment.id == "S-1" and desk.shipment.closed_at is None
        assert desk.shipment.received == {"Dress": 1}
        assert agent.metrics.counter("commands_rejected_total", command="expect") == rejected + 1
        assert json.loads((tmp_path / "station-state.json").read_text())["shipment"]["id"] == "S-1"

        make_room(agent.outbox)
        assert agent.expect(b'{"shipment": "S-1", "close": true}'), agent.last_expect
        final = [r for r in stored(agent.outbox, "receipt") if r["final"]]
        assert [(r["shipment"], r["items"], r["state"]) for r in final] == [("S-1", 1, "closed")]

        fill(agent.outbox)
        assert agent.expect(b'{"shipment": "S-2", "lines": {"Coat": 1}}') is False
        assert "first receipt could not be stored" in agent.last_expect["reason"] and desk.shipment is None
        make_room(agent.outbox)
        assert agent.expect(b'{"shipment": "S-2", "lines": {"Coat": 1}}') and desk.shipment.id == "S-2"
        assert stored(agent.outbox, "receipt")[-1]["shipment"] == "S-2"
    finally:
        agent.shutdown(5)
        dash.close()


def test_items_decided_since_the_last_receipt_survive_a_clean_restart(broker, tmp_path):
    """With receipt_interval_s above 0 the items since the last receipt were saved nowhere: station-state.json
    is written with each receipt, and a clean shutdown wrote nothing, so after the restart the tally had lost
    items whose decisions were published. The shutdown saves the open shipment."""
    bundle = make_tiny_bundle(tmp_path / "models")
    cfg = decisions_config(tmp_path, bundle, broker.port, receipt_interval_s=3600)
    dash = Subscriber(broker.host, broker.port, ROOT)
    agent = start(cfg, dash)
    try:
        assert agent.expect(b'{"shipment": "S-1", "lines": {"Dress": 3}}')
        item(agent, SURE_DRESS, 1)
        item(agent, SURE_DRESS, 2)
        assert [r["items"] for r in receipts(dash)] in ([], [0])     # the interval holds the next receipt back
    finally:
        agent.shutdown(10)
    assert json.loads((tmp_path / "station-state.json").read_text())["shipment"]["received"] == {"Dress": 2}
    agent = start(cfg, dash)
    try:
        assert agent.inference.receiving.shipment.received == {"Dress": 2}
        assert agent.expect(b'{"shipment": "S-1", "close": true}')
        assert dash.wait_for(lambda d: any(r["final"] for r in receipts(d)), 20), receipts(dash)
        final = next(r for r in receipts(dash) if r["final"])
        assert final["items"] == 2 and final["lines"][0]["received"] == 2
    finally:
        agent.shutdown(10)
        dash.close()
