"""A station killed (SIGKILL) at any point between storing a receipt and saving station-state.json: after the
restart its receipts never go backwards, no item is counted twice or lost, and a close's final receipt is
stored exactly once (a copy with the same id at most) and never followed by an open one.

Real parts: a station process (the real Agent on the tiny ONNX bundle, its SQLite outbox and state file) that
kills itself with SIGKILL at the exact point, and a second station started on the same folder. No broker
listens, so every receipt stays in the outbox, where the test reads them in seq order. The stand-in: items are
decided from probability rows (``Inferred`` handed to the inference stage), as in test_receiving.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from agent_support import EndedCamera, as_config, station_config

from agent.app import Agent
from agent.demo import free_port
from agent.outbox import Outbox
from agent.pipeline import Inferred
from agent.sources.base import Frame

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
REPO = Path(__file__).resolve().parents[2]

# The station process: PO-1 opened, two Trousers decided, then killed at POINT (argv) on the third Trouser
# (periodic receipt; "after-state-saved": the save with its batch pending, before the batch is stored) or on the
# close (final receipt). A kill after the batch is stored and before its receipt: test_receiving_crash_window.py.
CHILD = r"""
import json, os, signal, sys
from pathlib import Path
from test_receipt_crash import item, start, station
from agent.outbox import Outbox
from agent.state import StationState

folder, bundle, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
agent = start(station(folder, bundle))
assert agent.expect(json.dumps({"shipment": "PO-1", "lines": {"Trouser": 2, "Dress": 1}}).encode())
item(agent, "Trouser", 1)
item(agent, "Trouser", 2)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
put, save = Outbox.put, StationState.save

def put_and_die(self, message):
    final = message.kind == "receipt" and message.body["final"]
    if point == "before-final-receipt" and final:
        die()
    record = put(self, message)
    if (point == "after-final-receipt" and final) or (point == "after-receipt" and message.kind == "receipt"):
        die()
    return record

def save_and_die(self):
    save(self)
    shipment = self.shipment or {}
    pending = [p for p in shipment.get("pending", []) if p["ref"]["label"] == "Trouser"]
    if point == "after-state-saved" and shipment.get("received", {}).get("Trouser", 0) + len(pending) == 3:
        die()       # the third Trouser saved (pending: before its batch is stored, which it never is)

Outbox.put, StationState.save = put_and_die, save_and_die
if point.endswith("final-receipt"):
    agent.expect(json.dumps({"shipment": "PO-1", "close": True}).encode())
else:
    item(agent, "Trouser", 3)
print("not killed", flush=True)
"""


def station(folder: Path, bundle: Path):
    return as_config(station_config(
        folder, bundle, "none", free_port(), frames={"enabled": False},
        decisions={"presence": {"mode": "empty_class", "empty_class": "Bag", "min_frames": 1, "max_frames": 1,
                                "gap_frames": 1}, "receiving": {"expected_weight": 2.0, "max_refs": 5}}))


def start(cfg) -> Agent:
    agent = Agent(cfg, source_factory=lambda cam: EndedCamera())
    agent.start()
    assert agent.inference.finished.wait(60), "the stage's threads did not finish after the source ended"
    return agent


def item(agent: Agent, label: str, seq: int) -> None:
    """One item of one frame, decided sure on ``label`` by the station's own inference stage."""
    probs = np.full(len(LABELS), 0.1 / (len(LABELS) - 1))
    probs[LABELS.index(label)] = 0.9
    frame = Frame("cam-a", seq, time.time(), time.monotonic(), np.zeros((28, 28, 3), np.uint8))
    agent.inference.decide(Inferred([frame], agent.model.current, np.array([probs]),
                                    {"preprocess": 0.0, "inference": 0.0}, time.monotonic(), [0]))


def stored(cfg) -> tuple[list[dict], list[dict]]:
    """The receipts and decisions in the outbox, in seq order."""
    outbox = Outbox(cfg.outbox.path, max_bytes=cfg.outbox.max_bytes, max_age_s=cfg.outbox.max_age_s)
    try:
        records = outbox.pending(limit=10_000)
    finally:
        outbox.close()
    return ([r.body for r in records if r.kind == "receipt"], [r.body for r in records if r.kind == "decision"])


def counts(receipt: dict) -> dict[str, int]:
    got = {line["label"]: line["received"] for line in receipt["lines"]}
    return {**got, "items": receipt["items"], "review": receipt["review"]["count"],
            "unknown": receipt["unknown"]["count"]}


@pytest.mark.parametrize("point", ["after-receipt", "after-state-saved", "before-final-receipt",
                                   "after-final-receipt"])
def test_receipts_never_go_backwards_after_a_kill_between_the_receipt_and_the_state_file(point, tiny_bundle,
                                                                                         tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(tiny_bundle), point], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stdout[-2000:], child.stderr[-4000:])

    # the station starts again on the same folder, decides a Dress, and closes PO-1 (if it is still open)
    cfg = station(tmp_path, tiny_bundle)
    agent = start(cfg)
    try:
        item(agent, "Dress", 4)
        closing = agent.inference.receiving.shipment is not None
        if closing:
            assert agent.expect(json.dumps({"shipment": "PO-1", "close": True}).encode()), agent.last_expect
    finally:
        agent.shutdown(0.5)
    receipts, decisions = stored(cfg)

    # never backwards: every count of each receipt at least the one before it
    for before, after in zip(receipts, receipts[1:]):
        assert all(counts(after).get(k, 0) >= n for k, n in counts(before).items()), \
            [(r["seq"], counts(r), r["final"]) for r in receipts]
    # one final receipt (a copy stored again after the restart has its id and body), none open after it
    finals = [r for r in receipts if r["final"]]
    assert finals and len({r["id"] for r in finals}) == 1, [(r["seq"], r["id"], r["final"]) for r in receipts]
    assert all(r["final"] for r in receipts[receipts.index(finals[0]):]), \
        [(r["seq"], counts(r), r["final"]) for r in receipts]
    assert all({k: v for k, v in r.items() if k != "seq"} == {k: v for k, v in finals[0].items() if k != "seq"}
               for r in finals)
    # no item counted twice nor lost: the final receipt counts each decision stored while PO-1 was open, once
    final = finals[0]
    counted = [d for d in decisions if d["ts"] <= final["closed_at"]]
    assert final["items"] == len(counted) == {"after-receipt": 4, "after-state-saved": 3}.get(point, 2)
    refs = [ref["decision"] for line in final["lines"] for ref in line["refs"]]
    assert len(refs) == len(set(refs)) and set(refs) <= {d["id"] for d in counted}
    expected = {4: {"Trouser": 3, "Dress": 1}, 3: {"Trouser": 2, "Dress": 1}}.get(final["items"],
                                                                                 {"Trouser": 2, "Dress": 0})
    assert {line["label"]: line["received"] for line in final["lines"]} == expected


def test_a_saved_closed_shipment_keeps_its_final_receipt_and_a_bad_one_is_refused_by_name():
    """A close is saved with its final receipt's id and ts (restored, it is the same message); a saved close
    whose fields are not one is refused naming the field, and a state from before them restores an open one."""
    from agent.config import ExpectCommand, ReceivingConfig
    from agent.receiving import ReceivingDesk, Shipment, ShipmentError

    desk = ReceivingDesk(ReceivingConfig(), clock=lambda: 1_700_000_000.0)
    desk.open(ExpectCommand(shipment="PO-1", lines={"Trouser": 1}), LABELS)
    saves = []
    desk.persist = lambda: saves.append(json.loads(json.dumps(desk.saved())))
    with desk.expecting(ExpectCommand(shipment="PO-1", close=True), LABELS) as closed:
        saved = saves[-1]       # saved before the block stores the final receipt
    assert desk.saved() is None and desk.shipment is None        # stored: nothing left to save
    assert saved["closed_at"] == 1_700_000_000.0 and saved["final_receipt"]["id"] == closed.final_id
    again = Shipment.from_json(saved)
    assert desk.receipt_of(again) == desk.receipt_of(closed) and desk.receipt_of(again)["id"] == closed.final_id
    for bad, field in [({"closed_at": "soon"}, "closed_at"), ({"final_receipt": None}, "final_receipt"),
                       ({"final_receipt": {"id": "x", "ts": 1.0}}, "final_receipt.id"),
                       ({"final_receipt": {"id": closed.final_id, "ts": True}}, "final_receipt")]:
        with pytest.raises(ShipmentError, match=f"field shipment.{field}"):
            Shipment.from_json({**saved, **bad})
    older = {k: v for k, v in saved.items() if k not in ("closed_at", "final_receipt")}
    assert Shipment.from_json(older).closed_at is None
