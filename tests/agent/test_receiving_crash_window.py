"""A station killed (SIGKILL) after a batch's decisions are stored in the outbox and before station-state.json is
saved after them: after the restart the shipment counts each of them once, also when the broker had already
taken them off the outbox, and never counts a decision the outbox did not store.

Before the batch was saved with the tally (``ReceivingDesk.stage``), the state file was saved only before a
receipt: a kill between the outbox's commit and that save restarted on a tally without the batch's items, whose
decisions were stored and published (with ``receipt_interval_s`` above 0, every item since the last receipt).

Real parts: a station process (the real Agent on the tiny ONNX bundle, its SQLite outbox and state file) that
kills itself with SIGKILL at the exact point, and a second station started on the same folder. No broker
listens, so every message stays in the outbox, where the test reads them in seq order; the broker's PUBACKs are
the outbox's own ``ack_many``. The stand-in: items are decided from probability rows (``Inferred`` handed to the
inference stage), as in test_receipt_crash.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from agent_support import as_config, station_config
from test_receipt_crash import counts, start, stored

from agent.demo import free_port
from agent.outbox import Outbox

REPO = Path(__file__).resolve().parents[2]

# The station process: PO-1 opened, two Trousers decided (each its own batch), then a batch of ``n`` Trousers
# (argv) whose storing is cut at POINT: after the save before it ("after-pending-saved"), after the outbox
# committed it ("after-batch-stored"), or between two of its outbox transactions ("between-chunks": a batch of
# more messages than one transaction stores, CHUNK_ROWS).
CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path
import numpy as np
from test_receipt_crash import LABELS, item, start
from test_receiving_crash_window import station
from agent.outbox import Outbox
from agent.pipeline import Inferred
from agent.sources.base import Frame
from agent.state import StationState

folder, bundle, point, interval, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]), \
    int(sys.argv[5])
agent = start(station(folder, bundle, interval))
assert agent.expect(json.dumps({"shipment": "PO-1", "lines": {"Trouser": 20, "Dress": 1}}).encode())
item(agent, "Trouser", 1)
item(agent, "Trouser", 2)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
put_many, insert, save = Outbox.put_many, Outbox._insert, StationState.save
inserts = []

def put_and_die(self, messages):
    messages = list(messages)
    records = put_many(self, messages)
    if point == "after-batch-stored" and sum(m.kind == "decision" for m in messages) == n:
        die()
    return records

def insert_and_die(self, chunk, now):
    if point == "between-chunks" and any(i.message.kind == "decision" for i in chunk):
        inserts.append(len(chunk))
        if len(inserts) == 2:       # the first chunk of the batch is committed, this one never is
            die()
    return insert(self, chunk, now)

def save_and_die(self):
    save(self)
    if point == "after-pending-saved" and len((self.shipment or {}).get("pending", [])) == n:
        die()

Outbox.put_many, Outbox._insert, StationState.save = put_and_die, insert_and_die, save_and_die
probs = np.full((n, len(LABELS)), 0.1 / (len(LABELS) - 1))
probs[:, LABELS.index("Trouser")] = 0.9
frames = [Frame("cam-a", 3 + i, time.time(), time.monotonic(), np.zeros((28, 28, 3), np.uint8)) for i in range(n)]
agent.inference.decide(Inferred(frames, agent.model.current, probs, {"preprocess": 0.0, "inference": 0.0},
                                time.monotonic(), list(range(n))))
print("not killed", flush=True)
"""


def station(folder: Path, bundle: Path, interval: float = 0.0):
    return as_config(station_config(
        folder, bundle, "none", free_port(), frames={"enabled": False},
        decisions={"presence": {"mode": "empty_class", "empty_class": "Bag", "min_frames": 1, "max_frames": 1,
                                "gap_frames": 1},
                   "receiving": {"expected_weight": 2.0, "max_refs": 5, "receipt_interval_s": interval}}))


def killed_station(tmp_path: Path, bundle: Path, point: str, interval: float, n: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(bundle), point, str(interval), str(n)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stdout[-2000:], child.stderr[-4000:])


def acknowledge_everything(cfg) -> None:
    """The broker took every message before the kill: PUBACKed, deleted from the outbox (its seq stays used)."""
    outbox = Outbox(cfg.outbox.path, max_bytes=cfg.outbox.max_bytes, max_age_s=cfg.outbox.max_age_s)
    try:
        outbox.ack_many(r.seq for r in outbox.pending(limit=10_000))
        assert outbox.depth() == 0
    finally:
        outbox.close()


def restart_and_close(cfg) -> tuple[dict[str, int], list[dict], list[dict]]:
    """The station started again on the folder: the tally it restored; then PO-1 closed. The receipts and the
    decisions stored after the restart."""
    agent = start(cfg)
    try:
        restored = dict(agent.inference.receiving.shipment.received)
        assert agent.expect(json.dumps({"shipment": "PO-1", "close": True}).encode()), agent.last_expect
    finally:
        agent.shutdown(0.5)
    receipts, decisions = stored(cfg)
    return restored, receipts, decisions


@pytest.mark.parametrize("point, interval, n, trousers", [
    ("after-batch-stored", 0.0, 1, 3),          # a receipt after every item: the one item stored before its save
    ("after-batch-stored", 3600.0, 1, 3),       # one receipt an hour: every item since the opening's receipt
    ("after-batch-stored", 0.0, 4, 6),
    ("after-pending-saved", 0.0, 1, 2),         # killed before the outbox stored the batch: not counted
    ("between-chunks", 0.0, 12, None),          # 24 messages: the decisions of the first 16 stored, the rest not
])
def test_a_kill_after_a_batch_is_stored_and_before_the_state_is_saved_counts_each_of_its_items_once(
        point, interval, n, trousers, tiny_bundle, tmp_path):
    killed_station(tmp_path, tiny_bundle, point, interval, n)
    cfg = station(tmp_path, tiny_bundle, interval)
    before, decisions_before = stored(cfg)
    stored_trousers = len(decisions_before)
    assert trousers is None and 2 < stored_trousers < 2 + n or stored_trousers == trousers

    restored, receipts, decisions = restart_and_close(cfg)

    # each decision stored while PO-1 was open counted once, none the outbox did not store
    assert restored == {"Trouser": stored_trousers}
    final = receipts[-1]
    assert final["final"] and final["items"] == stored_trousers == len(decisions)
    refs = [ref["decision"] for line in final["lines"] for ref in line["refs"]]
    assert len(refs) == len(set(refs)) and set(refs) <= {d["id"] for d in decisions}
    # never backwards: every count of each receipt at least the one before it
    for earlier, later in zip(receipts, receipts[1:]):
        assert all(counts(later).get(k, 0) >= v for k, v in counts(earlier).items()), \
            [(r["seq"], counts(r), r["final"]) for r in receipts]


def test_a_batch_the_broker_took_before_the_kill_is_counted_after_the_restart(tiny_bundle, tmp_path):
    """The publisher had sent the batch and the broker acknowledged it (the outbox deleted it) before the kill:
    the decision is in no outbox any more, and the restart counts it all the same (by its seq, not its row)."""
    killed_station(tmp_path, tiny_bundle, "after-batch-stored", 3600.0, 1)
    cfg = station(tmp_path, tiny_bundle, 3600.0)
    _, decisions = stored(cfg)
    assert len(decisions) == 3
    acknowledge_everything(cfg)

    restored, receipts, _ = restart_and_close(cfg)

    assert restored == {"Trouser": 3}
    final = receipts[-1]
    assert final["final"] and final["items"] == 3
    assert {ref["decision"] for line in final["lines"] for ref in line["refs"]} <= {d["id"] for d in decisions}


def test_a_second_restart_before_any_save_counts_the_batch_once(tiny_bundle, tmp_path):
    """The restart counts the batch being stored at the kill and saves the tally without it before anything else
    is stored: a second kill right after that restart neither counts the batch again nor drops it."""
    killed_station(tmp_path, tiny_bundle, "after-batch-stored", 3600.0, 1)
    cfg = station(tmp_path, tiny_bundle, 3600.0)
    state = Path(cfg.outbox.path).parent / "station-state.json"
    saved = json.loads(state.read_text())["shipment"]
    assert saved["received"] == {"Trouser": 2} and [p["ref"]["label"] for p in saved["pending"]] == ["Trouser"]

    agent = start(cfg)          # restarts, counts the batch, and stops without storing anything more
    try:
        assert agent.inference.receiving.shipment.received == {"Trouser": 3}
        resaved = json.loads(state.read_text())["shipment"]
        assert resaved["received"] == {"Trouser": 3} and "pending" not in resaved
    finally:
        agent.shutdown(0.5)

    restored, receipts, _ = restart_and_close(cfg)
    assert restored == {"Trouser": 3} and receipts[-1]["items"] == 3


# ------------------------------------------------------------------ the desk alone (no pipeline, no process)

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def decision(n: int, label: str = "Trouser", low_confidence: bool = False, vouched: bool = False):
    from agent.decide import ItemDecision
    return ItemDecision("cam", n, label, LABELS.index(label), 0.9, 1.0, 1, 1.0, 1.0, "default", low_confidence, (),
                        ((label, 0.9),), (n, n), vouched=vouched)


def desk_with_saves(next_seq: list[int]):
    """A desk whose saves are kept (as station-state.json would hold them) and whose outbox seq is ``next_seq[0]``."""
    from agent.config import ExpectCommand, ReceivingConfig
    from agent.receiving import ReceivingDesk

    desk = ReceivingDesk(ReceivingConfig(max_refs=5), clock=lambda: 1_700_000_000.0)
    saves: list[dict] = []
    desk.persist = lambda: saves.append(json.loads(json.dumps(desk.saved())))
    desk.next_seq = lambda: next_seq[0]
    desk.open(ExpectCommand(shipment="PO-1", lines={"Trouser": 5}), LABELS)
    return desk, saves


def test_a_batch_is_saved_pending_before_it_is_stored_and_a_restart_counts_what_the_outbox_seq_shows_stored():
    """The saved pending batch names each decision with the seq its message gets; a restart counts those whose seq
    the outbox has handed out, once, whatever the outbox still holds."""
    from agent.receiving import Shipment

    seq = [41]
    desk, saves = desk_with_saves(seq)
    counted = [(decision(1), "11111111-1111-4111-8111-111111111111"),
               (decision(2, low_confidence=True), "22222222-2222-4222-8222-222222222222"),
               (decision(3, vouched=True), "33333333-3333-4333-8333-333333333333")]
    # a batch: a result, decision 1, a result, decision 2, decision 3
    desk.stage(counted, [None, counted[0][1], None, counted[1][1], counted[2][1]])
    saved = saves[-1]
    assert saved["received"] == {} and [p["seq"] for p in saved["pending"]] == [42, 44, 45]
    assert [(p["review"], p["vouched"]) for p in saved["pending"]] == [(False, False), (True, False), (False, True)]

    # the restart after a kill: the outbox stored the batch's first 4 messages (seq 41-44), or all, or none
    for below, received, review in [(45, {"Trouser": 1}, 1), (46, {"Trouser": 2}, 1), (41, {}, 0)]:
        again, _ = desk_with_saves([below])
        again.shipment = None
        again.restore(Shipment.from_json(saved))
        shipment = again.shipment
        assert (shipment.received, shipment.review, shipment.pending) == (received, review, [])
        assert sum(shipment.refs_seen.values()) == sum(received.values()) + review
        assert again.saved().get("pending") is None


def test_a_batch_stored_as_saved_needs_no_save_before_its_receipt_and_one_stored_otherwise_is_saved_again():
    """Stored as saved (each decision under the seq saved): the saved state gives the tally at a restart, so its
    receipt is stored without another save. A decision not stored (the write failed) or stored under another seq
    (a message before it refused): saved again at once, before a later message moves the outbox's seq past it."""
    seq = [10]
    desk, saves = desk_with_saves(seq)
    one = [(decision(1), "11111111-1111-4111-8111-111111111111")]
    desk.stage(one, [one[0][1]])
    desk.record(*one[0], seq=10)
    desk.settle()
    assert len(saves) == 1 and desk.saved().get("pending") is None
    desk.save_for_receipt()
    assert len(saves) == 1          # no second save for its receipt

    seq[0] = 11
    two = [(decision(2), "22222222-2222-4222-8222-222222222222"), (decision(3), "33333333-3333-4333-8333-333333333333")]
    desk.stage(two, [two[0][1], two[1][1]])
    desk.record(*two[0], seq=11)        # the second never stored
    desk.settle()
    assert len(saves) == 3 and saves[-1]["received"] == {"Trouser": 2} and "pending" not in saves[-1]
    desk.save_for_receipt()
    assert len(saves) == 3

    seq[0] = 13
    three = [(decision(4), "44444444-4444-4444-8444-444444444444")]
    desk.stage(three, [None, three[0][1]])
    desk.record(*three[0], seq=13)      # the message before it refused: stored under seq 13, not 14
    desk.settle()
    assert len(saves) == 5 and saves[-1]["received"] == {"Trouser": 3}
    desk.record(decision(5), "55555555-5555-4555-8555-555555555555")     # counted outside a saved batch
    desk.save_for_receipt()
    assert len(saves) == 6 and saves[-1]["received"] == {"Trouser": 4}


def test_a_pending_batch_save_that_fails_stores_the_batch_and_saves_before_the_next_one():
    """The saves fail (a full disk): the batch is stored and counted all the same; a pending batch saved but not
    stored as saved, whose save after it failed, is saved before the next batch however few decisions it has."""
    from agent.receiving import ReceiptSaveError

    seq = [20]
    desk, saves = desk_with_saves(seq)
    full = [True]

    def persist():
        if full[0]:
            raise ReceiptSaveError("station-state.json: No space left on device")
        saves.append(json.loads(json.dumps(desk.saved())))
    desk.persist = persist
    batch = [(decision(1), "11111111-1111-4111-8111-111111111111")]
    desk.stage(batch, [batch[0][1]])           # fails: logged, nothing raised
    desk.record(*batch[0], seq=20)
    desk.settle()
    assert desk.shipment.received == {"Trouser": 1} and saves == []
    with pytest.raises(ReceiptSaveError):
        desk.save_for_receipt()

    full[0] = False
    seq[0] = 21
    batch = [(decision(2), "22222222-2222-4222-8222-222222222222")]
    desk.stage(batch, [batch[0][1]])
    full[0] = True
    desk.settle()           # never stored, and the save after it fails: the saved pending batch is stale
    full[0] = False
    desk.stage([], [None])          # a batch of results only: saved first all the same
    assert saves[-1]["received"] == {"Trouser": 1} and "pending" not in saves[-1]


@pytest.mark.parametrize("bad, field", [
    ({"pending": {"seq": 1}}, "shipment.pending"),
    ({"pending": [{"seq": -1, "review": False, "vouched": False, "ref": {}}]}, r"shipment.pending\[0\]"),
    ({"pending": [{"seq": 1, "review": "no", "vouched": False, "ref": {}}]}, r"shipment.pending\[0\]"),
    ({"pending": [{"seq": 1, "review": False, "vouched": False, "ref": {"decision": "x"}}]},
     r"shipment.pending\[0\].ref"),
    ({"pending": [{"seq": 1, "review": False, "vouched": False, "ref": "LABEL-EMPTY"}]},
     r"shipment.pending\[0\].ref.label"),
    ({"pending": [{"seq": 1, "review": False, "vouched": False, "ref": "OK"}], "closed_at": 1.0,
      "final_receipt": {"id": "11111111-1111-4111-8111-111111111111", "ts": 1.0}}, "shipment.pending"),
])
def test_a_saved_pending_batch_that_is_not_one_is_refused_naming_the_field(bad, field):
    from agent.receiving import Shipment, ShipmentError, item_ref

    seq = [1]
    desk, saves = desk_with_saves(seq)
    ref = item_ref(decision(1), "11111111-1111-4111-8111-111111111111")
    saved = desk.saved()
    pending = bad.get("pending")
    if isinstance(pending, list) and pending[0]["ref"] in ("OK", "LABEL-EMPTY"):
        pending[0]["ref"] = {**ref, "label": ""} if pending[0]["ref"] == "LABEL-EMPTY" else ref
    with pytest.raises(ShipmentError, match=f"field {field}"):
        Shipment.from_json({**saved, **bad})
    assert Shipment.from_json({**saved, "pending": []}).pending == []


def test_no_status_or_stats_seq_is_taken_between_the_pending_save_and_the_batch_it_predicts(tiny_bundle, tmp_path):
    """Given a stats message wanting a seq (another thread) right after the decide thread saved a batch pending with
    the seqs its messages will get, when the batch is stored, then the stats waits for the store: the seqs saved are
    the seqs the batch got (before: the stats took the first one, and a crash before the store committed made a
    restart count a decision that was never stored, its predicted seq handed out)."""
    import threading

    from test_receipt_crash import item as decide_item

    agent = start(station(tmp_path, tiny_bundle))
    desk, outbox = agent.inference.receiving, agent.outbox
    try:
        assert agent.expect(json.dumps({"shipment": "PO-1", "lines": {"Trouser": 3}}).encode())
        seen: dict[str, object] = {}
        stats_done = threading.Event()
        real_stage, real_put_many = desk.stage, outbox.put_many

        def stage_then_stats(counted, batch_ids):
            real_stage(counted, batch_ids)
            if counted:
                seen["pending"] = [p["seq"] for p in desk.shipment.pending]
                threading.Thread(target=lambda: (outbox.next_seq(), stats_done.set()), daemon=True).start()
                stats_done.wait(2)      # with the fix it waits for the store; without, the stats seq is taken now

        def put_many(messages):
            records = real_put_many(messages)
            if any(r.kind == "decision" for r in records):
                seen["got"] = [r.seq for r in records if r.kind == "decision"]
            return records

        desk.stage, outbox.put_many = stage_then_stats, put_many
        decide_item(agent, "Trouser", 1)
        assert stats_done.wait(30), "the stats seq was never handed out"
        assert seen["pending"] == seen["got"], seen
    finally:
        del desk.stage, outbox.put_many
        agent.shutdown(0)
