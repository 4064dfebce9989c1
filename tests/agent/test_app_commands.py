"""Commands on a running station: a refusal's reason never breaks the status schema, and a slow cmd/model holds
up neither the short commands nor the shutdown.

Real parts: the agent with its threads, a tiny ONNX model on ONNX Runtime, the SQLite outbox, the status.v1
schema. The one stand-in is the bundle fetch of cmd/model, held open until the test lets it go (a download
that takes minutes), then refused.
"""

from __future__ import annotations

import json
import logging
import threading

import pytest
from agent_support import EndedCamera, as_config, make_onnx_bundle, station_config, validate_message

import agent.app as app
from agent.app import MODEL_UPDATE_QUEUE, REASON_MAX_CHARS, Agent, reason_text
from contract.bundle import BundleError

STATUS_FIELD = {"thresholds": "last_thresholds_update", "capture-empty": "last_capture_empty",
                "expect": "last_expect_update", "model": "last_model_update"}


@pytest.fixture
def station(tmp_path):
    bundle = make_onnx_bundle(tmp_path / "m")
    cfg = as_config(station_config(tmp_path, bundle, "ended", 1, frames={"enabled": True},
                                   model={"download_dir": str(tmp_path / "downloads")}))
    agent = Agent(cfg, source_factory=lambda cam: EndedCamera())
    agent.start()
    yield agent
    if not agent.stop_event.is_set():       # a test that shut it down itself
        agent.shutdown(0)


def status(agent: Agent) -> dict:
    """The status as the publisher sends it (MqttPublisher._publish_status), checked against status.v1."""
    body = dict(agent.status_body("online"), seq=agent.outbox.next_seq())
    validate_message("status.v1", body)
    return body


class Calls:
    """One of the agent's handlers, wrapped: counts the calls that returned, so a test waits for them."""

    def __init__(self, agent: Agent, name: str) -> None:
        real = getattr(agent, name)
        self.n = 0
        self.done = threading.Condition()

        def counted(*args):
            try:
                return real(*args)
            finally:
                with self.done:
                    self.n += 1
                    self.done.notify_all()

        setattr(agent, name, counted)

    def wait(self, n: int = 1, timeout: float = 30) -> bool:
        with self.done:
            return self.done.wait_for(lambda: self.n >= n, timeout)


class HeldFetch:
    """Stands for cmd/model's bundle fetch: records each bundle asked for; a fetch waits until ``release`` (set
    once by the test), then is refused. A fetch that starts while another is under way is noted in
    ``overlapped`` and refused at once."""

    def __init__(self, monkeypatch) -> None:
        self.asked: list[str] = []
        self.overlapped = False
        self.fetching = threading.Event()
        self.release = threading.Event()
        self._busy = False
        self._lock = threading.Lock()
        monkeypatch.setattr(app, "fetch_verified", self.fetch)

    def fetch(self, cmd, *_args, **_kwargs):
        with self._lock:
            self.asked.append(cmd.bundle)
            if self._busy:
                self.overlapped = True
                raise BundleError(f"{cmd.bundle}: fetched while another fetch was under way")
            self._busy = True
        try:
            self.fetching.set()
            assert self.release.wait(60), "the test never released the fetch"
            raise BundleError(f"{cmd.bundle}: refused by the test")
        finally:
            with self._lock:
                self._busy = False


def model_command(n: int) -> bytes:
    return json.dumps({"bundle": bundle_url(n)}).encode()


def bundle_url(n: int) -> str:
    return f"http://central.example/bundles/{n}/"


# ------------------------------------------------------------------ reasons fit the status

@pytest.mark.parametrize("verb, payload, says", [
    ("thresholds", {"camera": "A" * 60_000}, "field camera: 'AAAA"),
    ("thresholds", {"min_confidence": "x" * 60_000}, "field min_confidence"),
    ("capture-empty", {"count": "x" * 60_000}, "field count"),
    ("capture-empty", {"cameras": [f"cam-{i}-" + "B" * 60 for i in range(800)]}, "and 790 more"),
    ("expect", {"shipment": "s" * 60_000}, "field shipment"),
])
def test_a_refused_command_s_reason_is_cut_so_the_status_stays_valid(station, verb, payload, says):
    station._run_command(verb, json.dumps(payload).encode())
    refused = status(station)[STATUS_FIELD[verb]]
    assert refused["ok"] is False and says in refused["reason"] and len(refused["reason"]) <= REASON_MAX_CHARS


def test_a_refused_model_update_s_reason_is_cut_so_the_status_stays_valid(station):
    assert not station.reload_model(json.dumps({"bundle": "/nonexistent/" + "C" * 2000}).encode())
    refused = status(station)["last_model_update"]
    assert refused["ok"] is False and "/nonexistent/CCC" in refused["reason"]
    assert len(refused["reason"]) <= REASON_MAX_CHARS


def test_a_cut_reason_says_how_much_was_left_out():
    cut = reason_text("y" * 10_000)
    assert len(cut) <= REASON_MAX_CHARS and cut.endswith(f"({10_000 - (REASON_MAX_CHARS - 40)} characters more)")
    assert reason_text("short") == "short" and reason_text(None) is None


# ------------------------------------------------------------------ cmd/model on its own thread

def test_short_commands_are_served_while_a_model_update_is_downloading(station, monkeypatch):
    fetch = HeldFetch(monkeypatch)
    expected, updated = Calls(station, "expect"), Calls(station, "reload_model")
    station._enqueue_command("model", model_command(1))
    try:
        assert fetch.fetching.wait(30)
        station._enqueue_command("thresholds", b'{"min_confidence": 0.9}')
        station._enqueue_command("expect", json.dumps({"shipment": "S1", "lines": {"class-0": 3}}).encode())
        assert expected.wait(timeout=30), "cmd/expect waited behind the cmd/model being downloaded"
        assert station.last_thresholds["ok"] and station.last_expect["ok"] and station.last_update is None
    finally:
        fetch.release.set()
    # the update's own outcome is still published when it ends
    assert updated.wait(timeout=30)
    update = status(station)["last_model_update"]
    assert update["ok"] is False and f"{bundle_url(1)}: refused by the test" in update["reason"]


def test_model_updates_run_one_at_a_time_in_order_and_too_many_waiting_are_refused(station, monkeypatch):
    fetch = HeldFetch(monkeypatch)
    updated = Calls(station, "reload_model")
    station._enqueue_command("model", model_command(0))
    try:
        assert fetch.fetching.wait(30)
        for n in range(1, MODEL_UPDATE_QUEUE + 2):      # MODEL_UPDATE_QUEUE wait; the one after them cannot
            station._run_command("model", model_command(n))     # as the command thread hands each on
        refused = status(station)["last_model_update"]
        assert refused["ok"] is False and "dropped" in refused["reason"]
        assert station.metrics.counter("commands_dropped_total") == 1
        assert fetch.asked == [bundle_url(0)] and not fetch.overlapped     # one update at a time
    finally:
        fetch.release.set()
    assert updated.wait(MODEL_UPDATE_QUEUE + 1, timeout=60)
    assert fetch.asked == [bundle_url(n) for n in range(MODEL_UPDATE_QUEUE + 1)] and not fetch.overlapped
    assert bundle_url(MODEL_UPDATE_QUEUE) in status(station)["last_model_update"]["reason"]


def command_threads(agent: Agent) -> list[threading.Thread]:
    return [t for t in agent._threads if t.name in ("commands", "model-updates")]


def test_shutdown_ends_the_command_threads(station):
    assert len(command_threads(station)) == 2
    station.shutdown(0)
    assert not any(t.is_alive() for t in command_threads(station))


def test_shutdown_does_not_wait_for_a_model_update_still_downloading(station, monkeypatch, caplog):
    fetch = HeldFetch(monkeypatch)
    monkeypatch.setattr(app, "COMMAND_JOIN_S", 0.1)
    station._enqueue_command("model", model_command(1))
    try:
        assert fetch.fetching.wait(30)
        with caplog.at_level(logging.WARNING, logger="agent.app"):
            station.shutdown(0)
        assert "thread model-updates still running a command" in caplog.text
        assert station.model.current.bundle.version == "1"
    finally:
        fetch.release.set()


# ------------------------------------------------------------------ last_model_update names the command it answers

def sha256_of(bundle) -> str:
    from contract.events import manifest_sha256

    return manifest_sha256(bundle)


def test_every_model_update_outcome_names_the_command_it_answers(station, tmp_path):
    """Given cmd/model commands that switch, refuse, find the bundle running, then when each is done the status's
    last_model_update.request names that command (bundle, sha256 in lower case, version), valid by status.v1: a
    rollout tells its own command's answer from a late one to an earlier command (before: no request)."""
    v2 = make_onnx_bundle(tmp_path / "m2", version="2")
    switch = {"bundle": str(v2), "sha256": sha256_of(v2).upper(), "version": "2"}
    assert station.reload_model(json.dumps(switch).encode())
    switched = status(station)["last_model_update"]
    assert switched["ok"] is True and switched["running"]["version"] == "2"
    assert switched["request"] == {"bundle": str(v2), "sha256": sha256_of(v2), "version": "2"}

    again = {"bundle": "http://central.example/elsewhere/2/", "sha256": sha256_of(v2), "version": "2"}
    assert station.reload_model(json.dumps(again).encode())
    running = status(station)["last_model_update"]
    assert running["reason"] == f"already running {station.model.current.bundle.name} 2"
    assert running["request"] == again

    missing = {"bundle": str(tmp_path / "nowhere" / "3"), "version": "3"}
    assert not station.reload_model(json.dumps(missing).encode())
    refused = status(station)["last_model_update"]
    assert refused["ok"] is False and refused["request"] == {**missing, "sha256": None}


@pytest.mark.parametrize("payload, named", [
    (b"not json", None),
    (b'["a list"]', None),
    (json.dumps({"bundle": "x" * 3000}).encode(), None),                  # longer than cmd-model.v1 allows
    (json.dumps({"bundle": "/b/1", "sha256": "xyz", "version": "1 2"}).encode(),
     {"bundle": "/b/1", "sha256": None, "version": None}),                # refused for those: null, never echoed
    (json.dumps({"bundle": "/b/1", "extra": True}).encode(), {"bundle": "/b/1", "sha256": None, "version": None}),
])
def test_a_model_update_refused_as_unreadable_names_what_could_be_read_and_the_status_stays_valid(station, payload,
                                                                                                  named):
    assert not station.reload_model(payload)
    refused = status(station)["last_model_update"]
    assert refused["ok"] is False and refused["request"] == named


def test_a_dropped_model_update_names_the_command_dropped(station, monkeypatch):
    fetch = HeldFetch(monkeypatch)
    station._enqueue_command("model", model_command(0))
    try:
        assert fetch.fetching.wait(30)
        for n in range(1, MODEL_UPDATE_QUEUE + 2):
            station._run_command("model", model_command(n))
        refused = status(station)["last_model_update"]
        assert refused["ok"] is False and "dropped" in refused["reason"]
        assert refused["request"] == {"bundle": bundle_url(MODEL_UPDATE_QUEUE + 1), "sha256": None, "version": None}
    finally:
        fetch.release.set()
