"""The agent's receiving commands, its station state and its metrics at the edges a review found.

- a shipment saved as closed is logged as closed at the restart (its final receipt stored again), not as open;
- a station-state.json that cannot be saved keeps the receipt after it out of the outbox: a stored receipt always
  has its tally saved;
- a close sent twice is answered as done, a close of a shipment never opened is still refused;
- /metrics carries the engine cache's count of engines TensorRT rejected;
- a start that fails after the metrics port was bound does not hang the shutdown;
- a close sent again after a restart is done already (the shipment closed last is saved in station-state.json).

Real parts: the Agent on the tiny ONNX bundle (ONNX Runtime), its SQLite outbox and state file, its Prometheus
server scraped over HTTP, the engine cache. Stand-ins: items are decided from probability rows handed to the
inference stage (as test_receipt_crash.py does), a full disk is the state file's path turned into a folder for a
moment (its rename then fails with a real OSError), and TensorRT (cannot run here) is a builder and a loader that
rejects every engine, handed to the real engine cache.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from agent_support import EndedCamera, as_config, make_tiny_bundle, station_config, validate_message
from test_receipt_crash import LABELS, start, station, stored

from agent.app import Agent, EngineCachePolicy
from agent.demo import free_port
from agent.engine_cache import DeviceInfo, EngineCacheError, EngineRejected, ensure_engine, load_failures
from agent.pipeline import Inferred
from agent.sources.base import Frame
from agent.state import STATE_FILE


def expect(agent: Agent, **body) -> bool:
    return agent.expect(json.dumps(body).encode())


def item(agent: Agent, label: str, seq: int) -> None:
    """One item of one frame decided sure on ``label``, run as the decide thread runs a batch (its guard logs and
    counts a batch that fails, and the thread goes on)."""
    probs = np.full(len(LABELS), 0.1 / (len(LABELS) - 1))
    probs[LABELS.index(label)] = 0.9
    frame = Frame("cam-a", seq, time.time(), time.monotonic(), np.zeros((28, 28, 3), np.uint8))
    inferred = Inferred([frame], agent.model.current, np.array([probs]), {"preprocess": 0.0, "inference": 0.0},
                        time.monotonic(), [0])
    agent.inference._guarded(agent.inference.decide, inferred, inferred.batch)


def received(receipt: dict, label: str) -> int:
    return {line["label"]: line["received"] for line in receipt["lines"]}[label]


def status(agent: Agent) -> dict:
    body = dict(agent.status_body("online"), seq=agent.outbox.next_seq())
    validate_message("status.v1", body)
    return body


# ------------------------------------------------------------------ a shipment saved as closed

def test_a_shipment_saved_as_closed_is_logged_as_closed_and_its_close_sent_again_is_done(tiny_bundle, tmp_path,
                                                                                       caplog):
    """It was logged as "restored ... until the shipment is closed", with a warning about labels the model lacks,
    for a shipment that is closed and stays closed."""
    # given: a station stopped after saving PO-1's close (with its final receipt's id), before the saved state
    # knew that receipt stored; one of its lines is a label the running model lacks (the model changed since)
    cfg = station(tmp_path, tiny_bundle)
    agent = start(cfg)
    try:
        assert expect(agent, shipment="PO-1", lines={"Trouser": 2})
        item(agent, "Trouser", 1)
    finally:
        agent.shutdown(0)
    path = Path(cfg.outbox.path).parent / STATE_FILE
    state = json.loads(path.read_text())
    final_id, closed_at = str(uuid.uuid4()), time.time()
    state["shipment"].update(expected={"Trouser": 2, "Gone": 1}, closed_at=closed_at,
                             final_receipt={"id": final_id, "ts": closed_at})
    path.write_text(json.dumps(state))

    # when: it starts again
    caplog.set_level(logging.INFO, logger="agent")
    agent = start(cfg)
    try:
        # then: the log says it was closed and its final receipt is stored again, and nothing else of it
        assert "shipment PO-1 was closed before the restart; its final receipt is stored again" in caplog.text
        assert "restored from cmd/expect" not in caplog.text and "lacks" not in caplog.text
        assert agent.inference.receiving.shipment is None
        # and: the close sent again (the operator's, after the restart) is done already, nothing stored again
        assert expect(agent, shipment="PO-1", close=True), agent.last_expect
        assert "already closed" in status(agent)["last_expect_update"]["reason"]
    finally:
        agent.shutdown(0)
    receipts, _ = stored(cfg)
    assert [r["id"] for r in receipts if r["final"]] == [final_id]


# ------------------------------------------------------------------ a state file that cannot be saved

def test_a_receipt_is_not_stored_while_its_tally_cannot_be_saved_and_goes_out_with_the_next_batch(tiny_bundle,
                                                                                                tmp_path, caplog):
    """The failed save was logged and swallowed, and the receipt stored right after it: a crash then restored a
    tally older than a stored receipt (its next receipts counted fewer items than that one)."""
    cfg = station(tmp_path, tiny_bundle)
    path = Path(cfg.outbox.path).parent / STATE_FILE
    agent = start(cfg)
    try:
        assert expect(agent, shipment="PO-1", lines={"Trouser": 3})
        item(agent, "Trouser", 1)
        # given: station-state.json cannot be written (its path a folder: the rename fails, as on a full disk)
        path.unlink()
        path.mkdir()
        # when: the next item is decided
        item(agent, "Trouser", 2)
        # then: its decision is stored, but no receipt counting it: its tally is not saved
        receipts, decisions = stored(cfg)
        assert len(decisions) == 2 and max(received(r, "Trouser") for r in receipts) == 1
        assert agent.metrics.counter("state_save_errors_total") >= 1
        assert "cannot save the shipment's tally" in caplog.text
        # when: the disk has room again and the next item is decided
        path.rmdir()
        item(agent, "Trouser", 3)
        # then: the receipt due goes out counting both items, its tally saved first
        receipts, _ = stored(cfg)
        assert received(receipts[-1], "Trouser") == 3
        # saved before its batch was stored, the third item pending: counted by its seq at a restart
        saved = json.loads(path.read_text())["shipment"]
        assert saved["received"] == {"Trouser": 2} and [p["ref"]["label"] for p in saved["pending"]] == ["Trouser"]
    finally:
        agent.shutdown(0)


def test_an_open_whose_state_cannot_be_saved_is_refused_naming_the_state_and_stores_no_receipt(tiny_bundle,
                                                                                             tmp_path):
    cfg = station(tmp_path, tiny_bundle)
    path = Path(cfg.outbox.path).parent / STATE_FILE
    agent = start(cfg)
    try:
        path.unlink(missing_ok=True)
        path.mkdir()
        assert not expect(agent, shipment="PO-2", lines={"Dress": 1})
        reason = status(agent)["last_expect_update"]["reason"]
        assert "the station state could not be saved" in reason and str(path) in reason
        assert agent.inference.receiving.shipment is None and stored(cfg)[0] == []
        path.rmdir()
        assert expect(agent, shipment="PO-2", lines={"Dress": 1}), agent.last_expect     # sent again: it goes
        assert json.loads(path.read_text())["shipment"]["id"] == "PO-2"
    finally:
        agent.shutdown(0)


# ------------------------------------------------------------------ a close sent twice

def test_a_close_sent_twice_is_done_once_and_a_close_of_a_shipment_never_opened_is_refused(tiny_bundle, tmp_path):
    """The second close was refused ("'PO-1' is not open") and that refusal replaced the close's success in the
    status."""
    cfg = station(tmp_path, tiny_bundle)
    agent = start(cfg)
    try:
        assert expect(agent, shipment="PO-1", lines={"Trouser": 2})
        item(agent, "Trouser", 1)
        assert expect(agent, shipment="PO-1", close=True)
        receipts_total = agent.metrics.counter("receipts_total")

        # when: the same close arrives again (QoS 1 redelivery, an operator resending it)
        assert expect(agent, shipment="PO-1", close=True)
        # then: done already: ok, the status says so, nothing stored again
        last = status(agent)["last_expect_update"]
        assert last["ok"] and last["shipment"] == {"id": "PO-1", "state": "closed", "lines": 1}
        assert "'PO-1' was already closed" in last["reason"]
        assert agent.metrics.counter("receipts_total") == receipts_total
        assert agent.metrics.counter("commands_rejected_total", command="expect") == 0

        # and: a shipment never opened is still refused
        assert not expect(agent, shipment="PO-9", close=True)
        assert "'PO-9' is not open" in status(agent)["last_expect_update"]["reason"]

        # and: with the next shipment open, PO-1's close is still done already, and PO-2 closes as usual
        assert expect(agent, shipment="PO-2", lines={"Dress": 1})
        assert expect(agent, shipment="PO-1", close=True) and agent.inference.receiving.shipment.id == "PO-2"
        assert expect(agent, shipment="PO-2", close=True) and agent.last_expect["reason"] is None
        assert not expect(agent, shipment="PO-1", close=True)       # no longer the one closed last
        # and: the same id opened again is a new shipment, closed as usual
        assert expect(agent, shipment="PO-1", lines={"Trouser": 1})
        assert expect(agent, shipment="PO-1", close=True) and agent.last_expect["reason"] is None
    finally:
        agent.shutdown(0)
    receipts, _ = stored(cfg)
    assert [r["shipment"] for r in receipts if r["final"]] == ["PO-1", "PO-2", "PO-1"]


# ------------------------------------------------------------------ engines TensorRT rejected, on /metrics

ORIN = DeviceInfo(tensorrt_version="10.3.0", compute_capability="8.7")


def build(request) -> bytes:
    """Stands for ``build_with_tensorrt`` (needs TensorRT and a GPU)."""
    return b"plan " + request.key.digest().encode()


def reject(engine: Path) -> None:
    """Stands for ``check_with_tensorrt``: a TensorRT that loads none of these engines (built under another one)."""
    raise EngineRejected("stand-in TensorRT: cannot deserialize the plan")


def rejected_build(bundle_dir: Path, cache: Path) -> None:
    """What the start-up and cmd/model's lookup do with this TensorRT: build, fail to load, count, give up."""
    from contract.bundle import load_bundle

    with pytest.raises(EngineCacheError, match="cannot load the engine it has just built"):
        ensure_engine(load_bundle(bundle_dir), cache, max_batch=4, device=ORIN, builder=build, check=reject)


class RejectingTensorRT(EngineCachePolicy):
    """cmd/model's engine lookup on a device whose TensorRT rejects every engine: the engine cache's own
    ensure_engine with the stand-ins above; no engine, so ONNX Runtime runs (``backend: auto``)."""

    def engine_for(self, cfg, bundle, **_ignored):
        rejected_build(Path(bundle.root), self.cache_dir)
        return None


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {name: float(value) for name, _, value in (line.partition(" ") for line in text.splitlines())
            if name.startswith("agent_engine_cache")}


def test_engines_tensorrt_rejected_are_a_gauge_set_at_the_start_and_at_each_model_update(tmp_path):
    """The engine cache counted them (``load_failures``), and nothing showed them: a station that rebuilt an
    engine at every start looked healthy."""
    from test_reload import sha

    first, second = make_tiny_bundle(tmp_path / "m1"), make_tiny_bundle(tmp_path / "m2", version="tiny-2")
    cache = tmp_path / "engines"
    rejected_build(first, cache)        # the start-up's lookup, before the agent runs
    assert load_failures(cache) == 1
    cfg = as_config(station_config(tmp_path, first, "ended", free_port(),
                                   model={"backend": "auto", "download_dir": str(tmp_path / "downloads")},
                                   health={"prometheus_port": 0, "prometheus_host": "127.0.0.1"}))
    agent = Agent(cfg, source_factory=lambda cam: EndedCamera(), engine_cache=RejectingTensorRT(cache))
    agent.start()
    try:
        assert scrape(agent.prometheus.port) == {"agent_engine_cache_load_failures": 1.0}
        # when: cmd/model brings a bundle whose engine TensorRT rejects too
        assert agent.reload_model(json.dumps({"bundle": str(second), "sha256": sha(second),
                                              "version": "tiny-2"}).encode()), agent.last_update
        # then: the gauge says so (the update itself runs on ONNX Runtime)
        assert load_failures(cache) == 2
        assert scrape(agent.prometheus.port) == {"agent_engine_cache_load_failures": 2.0}
    finally:
        agent.shutdown(0)


def test_no_engine_cache_no_gauge(tiny_bundle, tmp_path):
    cfg = as_config(station_config(tmp_path, tiny_bundle, "ended", free_port(),
                                   health={"prometheus_port": 0, "prometheus_host": "127.0.0.1"}))
    agent = Agent(cfg, source_factory=lambda cam: EndedCamera())
    agent.start()
    try:
        assert scrape(agent.prometheus.port) == {}
    finally:
        agent.shutdown(0)


# ------------------------------------------------------------------ a start that fails after the metrics port

def test_shutdown_after_a_start_that_failed_past_the_metrics_port_returns_and_frees_the_port(tiny_bundle, tmp_path):
    """The metrics server was bound, never started: Agent.shutdown() waited for its serve loop for good."""
    port = free_port()
    (tmp_path / "outbox.sqlite").mkdir()        # the outbox cannot be opened: the start fails after the port
    cfg = as_config(station_config(tmp_path, tiny_bundle, "ended", free_port(),
                                   health={"prometheus_port": port, "prometheus_host": "127.0.0.1"}))
    agent = Agent(cfg, source_factory=lambda cam: EndedCamera())
    with pytest.raises(Exception, match="outbox.sqlite"):
        agent.start()
    assert agent.prometheus is not None         # the port was bound before the failure
    stopping = threading.Thread(target=agent.shutdown, args=(0,), daemon=True)
    stopping.start()
    stopping.join(60)       # a hang detector: it returns at once or never
    assert not stopping.is_alive(), "Agent.shutdown() hangs after a start that failed past the metrics port"
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


# ------------------------------------------------------------------ a close sent again after a restart

def test_a_close_sent_again_after_a_restart_is_done_already(tiny_bundle, tmp_path):
    """The shipment closed last was kept in memory only: after a restart its close, sent again (a QoS 1
    redelivery, an operator resending it), was refused as "'PO-1' is not open" and counted as rejected."""
    cfg = station(tmp_path, tiny_bundle)
    path = Path(cfg.outbox.path).parent / STATE_FILE
    agent = start(cfg)
    try:
        assert expect(agent, shipment="PO-1", lines={"Trouser": 2, "Dress": 1})
        item(agent, "Trouser", 1)
        assert expect(agent, shipment="PO-1", close=True)
        final_id = agent.inference.receiving.last_closed.final_id
    finally:
        agent.shutdown(0)
    assert json.loads(path.read_text())["last_closed"] == {"id": "PO-1", "final_receipt": final_id, "lines": 2}

    # when: the station starts again and the close arrives again
    agent = start(cfg)
    try:
        assert expect(agent, shipment="PO-1", close=True), agent.last_expect
        # then: done already, as before the restart; nothing stored again
        last = status(agent)["last_expect_update"]
        assert last["shipment"] == {"id": "PO-1", "state": "closed", "lines": 2}
        assert f"'PO-1' was already closed (final receipt {final_id})" in last["reason"]
        assert agent.metrics.counter("commands_rejected_total", command="expect") == 0
        # and: with the next shipment open and saved, still so after another restart
        assert expect(agent, shipment="PO-2", lines={"Dress": 1})
    finally:
        agent.shutdown(0)
    agent = start(cfg)
    try:
        assert expect(agent, shipment="PO-1", close=True) and agent.inference.receiving.shipment.id == "PO-2"
        assert expect(agent, shipment="PO-2", close=True) and agent.last_expect["reason"] is None
        assert not expect(agent, shipment="PO-1", close=True)       # no longer the one closed last
    finally:
        agent.shutdown(0)
    receipts, _ = stored(cfg)
    assert [r["shipment"] for r in receipts if r["final"]] == ["PO-1", "PO-2"]


def test_a_shipment_closed_before_a_restart_whose_final_receipt_was_stored_again_is_remembered_after_the_next(
        tiny_bundle, tmp_path):
    """A close saved before its final receipt was known stored: the restart stores that receipt again, and the
    shipment is then the one closed last, saved as such for the start after."""
    cfg = station(tmp_path, tiny_bundle)
    agent = start(cfg)
    try:
        assert expect(agent, shipment="PO-1", lines={"Trouser": 2})
    finally:
        agent.shutdown(0)
    path = Path(cfg.outbox.path).parent / STATE_FILE
    state = json.loads(path.read_text())
    final_id, closed_at = str(uuid.uuid4()), time.time()
    state["shipment"].update(closed_at=closed_at, final_receipt={"id": final_id, "ts": closed_at})
    path.write_text(json.dumps(state))
    for _ in range(2):
        agent = start(cfg)
        try:
            assert expect(agent, shipment="PO-1", close=True), agent.last_expect
            assert final_id in agent.last_expect["reason"]
        finally:
            agent.shutdown(0)
    receipts, _ = stored(cfg)
    assert [r["id"] for r in receipts if r["final"]] == [final_id]
