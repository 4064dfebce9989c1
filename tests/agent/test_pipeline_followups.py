"""The inference stage and the agent's start at the edges a review found.

- a periodic receipt whose station state cannot be saved first is not stored, and that is all: its batch (stored
  and counted) is not logged as failed nor counted in inference_errors_total, and at the end of the input the
  decide thread does not die on it;
- a final receipt stored again after a restart, whose save after it fails, does not fail the batch it goes with;
- a start that fails other than by StartupError (an outbox.path that is a folder) exits 2 with one line naming
  the config file and the field, and a start that fails after its threads started leaves nothing running.

Real parts: the Agent on the tiny ONNX bundle (ONNX Runtime), its SQLite outbox and state file, its threads and
its Prometheus server. Stand-ins: items are decided from probability rows (as test_receipt_crash.py does); a full
disk is the state file's path turned into a folder (its rename fails with a real OSError); a disk that fails under
the outbox at the end is an outbox ``put`` that raises sqlite3's "disk I/O error"; a process out of threads is the
metrics server's ``start`` raising what ``threading`` raises then.
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
from pathlib import Path

import pytest
from agent_support import as_config, station_config
from test_app_followups import expect, item, received
from test_receipt_crash import LABELS, start, station, stored

from agent import app
from agent.demo import free_port
from agent.health import PrometheusServer
from agent.state import STATE_FILE

UNREACHABLE_CAMERA = "rtsp://127.0.0.1:1/none"     # a live camera that never opens: its thread retries until stopped


def state_path(cfg) -> Path:
    return Path(cfg.outbox.path).parent / STATE_FILE


# ------------------------------------------------------------------ a receipt whose save fails

def test_a_receipt_whose_save_fails_leaves_its_batch_stored_and_not_counted_as_failed(tiny_bundle, tmp_path,
                                                                                     caplog):
    """The StateSaveError went up through InferenceStage._store to the batch's guard: "decide failed on a batch
    ...; skipped" and inference_errors_total, for a batch whose decisions were stored and counted."""
    cfg = station(tmp_path, tiny_bundle)
    path = state_path(cfg)
    agent = start(cfg)
    try:
        assert expect(agent, shipment="PO-1", lines={"Trouser": 3})
        item(agent, "Trouser", 1)
        path.unlink()
        path.mkdir()        # the state cannot be saved (a full disk)
        caplog.set_level(logging.INFO, logger="agent")
        item(agent, "Trouser", 2)
        # the batch is stored; its receipt is not (its tally could not be saved), and nothing says the batch failed
        receipts, decisions = stored(cfg)
        assert len(decisions) == 2 and max(received(r, "Trouser") for r in receipts) == 1
        assert agent.metrics.counter("state_save_errors_total") == 2    # the save before the batch, and its receipt's
        assert agent.metrics.counter("inference_errors_total") == 0
        assert "decide failed" not in caplog.text and "cannot save the shipment's tally" in caplog.text
        # the decision was counted: the receipt due goes out with the next batch once the state can be saved
        path.rmdir()
        item(agent, "Trouser", 3)
        assert received(stored(cfg)[0][-1], "Trouser") == 3
    finally:
        agent.shutdown(0)


def end_of_input(agent) -> list[str]:
    """The decide thread at the end of the input (its queue ends: the items still open and the receipt due are
    stored), run on a thread of its own; what ended that thread with an exception."""
    died: list[str] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: died.append(f"{args.exc_type.__name__}: {args.exc_value}")
    try:
        agent.inference._inferred.put(None)
        decider = threading.Thread(target=agent.inference._decide_loop, name="decide")
        decider.start()
        decider.join(60)
        assert not decider.is_alive()
    finally:
        threading.excepthook = hook
    return died


def test_a_receipt_whose_save_fails_at_the_end_of_the_input_is_logged_not_the_end_of_the_decide_thread(
        tiny_bundle, tmp_path, caplog):
    """The decide thread's last step (_flush_items) ended it with a StateSaveError traceback."""
    cfg = replace_receipt_interval(station(tmp_path, tiny_bundle))
    path = state_path(cfg)
    agent = start(cfg)
    try:
        assert expect(agent, shipment="PO-1", lines={"Trouser": 3})
        path.unlink()
        path.mkdir()
        item(agent, "Trouser", 1)       # counted, not saved with its batch; its receipt waits for the interval
        caplog.set_level(logging.INFO, logger="agent")
        agent.inference.clock = lambda: 4_000_000_000.0     # the interval is over: the receipt is due at the end
        assert end_of_input(agent) == []
        assert "cannot save the shipment's tally" in caplog.text
        assert agent.metrics.counter("inference_errors_total") == 0
        assert all(not r["final"] and received(r, "Trouser") == 0 for r in stored(cfg)[0])    # the first only
    finally:
        path.rmdir()
        agent.shutdown(0)
    assert json.loads(path.read_text())["shipment"]["received"] == {"Trouser": 1}     # saved at the shutdown


def replace_receipt_interval(cfg, seconds: float = 3600.0):
    return cfg.model_copy(update={"decisions": cfg.decisions.model_copy(update={
        "receiving": cfg.decisions.receiving.model_copy(update={"receipt_interval_s": seconds})})})


def test_an_error_at_the_end_of_the_input_is_logged_and_counted_not_the_end_of_the_decide_thread(tiny_bundle,
                                                                                                tmp_path, caplog):
    """Any error of the decide thread's last step ended it with a traceback; a batch's is logged and counted."""
    cfg = replace_receipt_interval(station(tmp_path, tiny_bundle))
    agent = start(cfg)
    try:
        assert expect(agent, shipment="PO-1", lines={"Trouser": 3})
        item(agent, "Trouser", 1)
        agent.inference.clock = lambda: 4_000_000_000.0

        def failing_disk():
            raise sqlite3.OperationalError("disk I/O error")
        agent.inference.receiving.flush_closing = failing_disk      # the last step's first call
        caplog.set_level(logging.ERROR, logger="agent")
        assert end_of_input(agent) == []
        assert "deciding the items still open at the end of the input failed" in caplog.text
        assert "disk I/O error" in caplog.text
        assert agent.metrics.counter("inference_errors_total") == 1
    finally:
        del agent.inference.receiving.flush_closing
        agent.shutdown(0)


def test_a_final_receipt_stored_again_whose_save_after_it_fails_is_logged_and_not_raised(caplog):
    """ReceivingDesk.flush_closing raised the save's error after the final receipt was stored: the batch it went
    with was logged as failed (or, at the start, the error was swallowed by the caller)."""
    from agent.config import ExpectCommand, ReceivingConfig
    from agent.receiving import ReceiptSaveError, ReceivingDesk, Shipment

    desk = ReceivingDesk(ReceivingConfig(), clock=lambda: 1_700_000_000.0)
    desk.open(ExpectCommand(shipment="PO-1", lines={"Trouser": 1}), LABELS)
    closed = desk.close("PO-1")
    saved = Shipment.from_json(json.loads(json.dumps(closed.to_json())))
    finals: list[str] = []
    desk = ReceivingDesk(ReceivingConfig(), clock=lambda: 1_700_000_001.0)

    def full_disk() -> None:
        raise ReceiptSaveError("station-state.json: No space left on device")
    desk.persist = full_disk
    desk.store_final = lambda shipment: finals.append(shipment.final_id)
    caplog.set_level(logging.ERROR, logger="agent")
    desk.restore(saved)     # stores the final receipt, then cannot save that it did
    assert finals == [saved.final_id] and desk.closing is None
    assert desk.last_closed is not None and desk.last_closed.id == "PO-1"
    assert "its final receipt is stored, but the station state could not be saved after it" in caplog.text
    desk.flush_closing()        # nothing left to store
    assert finals == [saved.final_id]


# ------------------------------------------------------------------ a start that fails

def agent_threads(before: set[int]) -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.ident not in before and t.is_alive())


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_an_outbox_path_that_is_a_folder_is_one_line_naming_the_file_and_the_field(tiny_bundle, tmp_path, caplog):
    """agent.app.run caught only StartupError: the OutboxError went up as a traceback (exit 1)."""
    (tmp_path / "outbox.sqlite").mkdir()
    port = free_port()
    cfg = as_config(station_config(tmp_path, tiny_bundle, UNREACHABLE_CAMERA, free_port(),
                                   health={"prometheus_port": port, "prometheus_host": "127.0.0.1"}))
    before = {t.ident for t in threading.enumerate()}
    caplog.set_level(logging.ERROR, logger="agent")
    assert app.run(cfg, exit_at_end=True, flush_s=0, config_path=Path("station.yaml")) == 2
    [line] = [r.getMessage() for r in caplog.records if "station.yaml" in r.getMessage()]
    assert line == (f"cannot start: station.yaml: field outbox.path: {tmp_path / 'outbox.sqlite'}: is a folder, not "
                    f"a database file")
    assert agent_threads(before) == [] and port_free(port)


def open_files(path: str) -> list[str]:
    """The outbox's files (the database, its -wal and -shm) this process holds open (Linux /proc)."""
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:     # closed meanwhile
            continue
        if target.startswith(str(Path(path).resolve())):
            held.append(target)
    return held


def no_thread_left(self) -> None:
    raise RuntimeError("can't start new thread")


def test_a_start_that_fails_after_its_threads_started_stops_them_and_frees_what_it_held(tiny_bundle, tmp_path,
                                                                                         monkeypatch):
    """The error went up with the camera, inference, decide, MQTT, stats, command and watchdog threads running,
    the metrics port bound and the outbox open; run() left them so, and Agent.shutdown() could not be called on
    threads that never started."""
    port = free_port()
    cfg = as_config(station_config(tmp_path, tiny_bundle, UNREACHABLE_CAMERA, free_port(),
                                   health={"prometheus_port": port, "prometheus_host": "127.0.0.1"}))
    monkeypatch.setattr(PrometheusServer, "start", no_thread_left)     # the last step of the start
    before = {t.ident for t in threading.enumerate()}
    agent = app.Agent(cfg)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        agent.start()
    assert agent_threads(before) == [] and port_free(port) and open_files(cfg.outbox.path) == []
    agent.shutdown(0)       # after a failed start: nothing more to do, and it returns
    # the same through run(): an unexpected error still shows its traceback, with nothing left running
    with pytest.raises(RuntimeError, match="can't start new thread"):
        app.run(cfg, exit_at_end=True, flush_s=0, config_path=Path("station.yaml"))
    assert agent_threads(before) == [] and port_free(port) and open_files(cfg.outbox.path) == []
