"""A station's answer is the one to the rollout's own command: ``last_model_update.request`` names the
``cmd/model`` it answers, and the rollout judges only an answer naming its command.

Before, the rollout took any new ``last_model_update`` with ``ok: false`` after its command as the station's
refusal of it: a late refusal of an earlier command (one queued before it on the station, a QoS 1 redelivery,
another operator's rollout) halted the rollout with that other command's reason.

Real parts: mosquitto (``mosquitto``), the rollout's own ``StationLink`` on it, stand-in stations over MQTT
(``CommandedStation``: the test says what each answers, and when), bundles published into a real served tree and
read back by ``resolve_bundle``; and one real ``python -m agent run`` station updated through the CLI.
The rollout's link records every answer its wait judged (``JudgedLink``), so a test publishes the station's next
status only once the rollout has judged the one before: no timing luck either way.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from rollout_support import (
    CommandedStation,
    Recorder,
    Station,
    cli,
    image_folder,
    promote,
    tiny_versions,
    wait_online,
    wait_until,
)

from central.rollout import (
    BundleServer,
    EventSink,
    RolloutHistory,
    RolloutPlan,
    StationLink,
    publish_bundle,
    resolve_bundle,
    run_rollout,
)
from central.rollout.link import StationView
from contract.broker import BrokerSettings
from contract.messages import checker

pytestmark = pytest.mark.mqtt

STATION = "s/a"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-tree")
    tiny = tiny_versions(root / "models", ["v1", "v2", "v3"])
    publish_bundle(tiny["v1"], root / "served", baseline=True)
    for version in ("v2", "v3"):
        promote(tiny[version])
        publish_bundle(tiny[version], root / "served")
    return {"tree": root / "served", "bundles": tiny}


class JudgedLink(StationLink):
    """The rollout's real link; every ``last_model_update`` its waits judged is kept (under the link's lock, as
    the rollout reads it), so the test knows the rollout has seen an answer before it publishes the next."""

    def __init__(self, options: BrokerSettings) -> None:
        super().__init__(options)
        self.judged: list[dict[str, Any] | None] = []

    def wait_until(self, predicate, timeout_s):
        def judged():
            result = predicate()
            self.judged.extend(v.last_update for v in self.views.values())
            return result
        return super().wait_until(judged, timeout_s)

    def has_judged(self, update: dict[str, Any]) -> bool:
        with self._cond:
            return any(u is not None and u.get("ts") == update["ts"] for u in self.judged)


class RolloutInThread:
    """``run_rollout`` of one bundle to STATION (no canary) on its own thread, as the CLI runs it."""

    def __init__(self, port: int, bundle, tmp_path, timeout_s: float = 120.0) -> None:
        self.link = JudgedLink(BrokerSettings("127.0.0.1", port)).connect()
        self.link.settle()
        plan = RolloutPlan(bundle, [STATION], None, None, timeout_s)
        self.summary = None
        self.thread = threading.Thread(target=self._run, args=(plan, RolloutHistory(tmp_path / "h.json")))
        self.thread.start()

    def _run(self, plan, history) -> None:
        self.summary = run_rollout(self.link, plan, history, EventSink())

    def join(self):
        self.thread.join(300)
        assert not self.thread.is_alive(), "the rollout did not end"
        self.link.close()
        return self.summary


def answer(ok: bool, reason: str | None, running: tuple[str, str], request: Any = "absent") -> dict[str, Any]:
    """A last_model_update as the agent writes it; ``request`` left out when "absent" (an agent before it)."""
    import time

    update = {"ok": ok, "reason": reason, "ts": round(time.time(), 6),
              "running": {"name": running[0], "version": running[1]}}
    if request != "absent":
        update["request"] = request
    return update


def other_commands(served) -> dict[str, Any]:
    """Commands other than the rollout's tiny v2, as a station's ``request`` names them."""
    v2 = resolve_bundle(str(served["tree"] / "tiny" / "v2")).command()
    v3 = resolve_bundle(str(served["tree"] / "tiny" / "v3")).command()
    return {"another version": v3,
            "the same version, another manifest": {**v2, "sha256": "0" * 64},
            "the same bundle from another location": {**v2, "bundle": "http://other.example/tiny/v2/"},
            "a command the station could not read": None}


@pytest.mark.parametrize("other", ["another version", "the same version, another manifest",
                                   "the same bundle from another location", "a command the station could not read"])
def test_a_late_refusal_of_another_command_does_not_halt_the_rollout(served, broker, tmp_path, caplog, other):
    """Given a station on v1, when after the rollout's cmd/model it publishes a refusal naming another command
    (the rollout judges it), then its success for v2, then the rollout succeeds and logs the other answer at info
    (before: it halted with 'the station refused v2: <the other command's reason>')."""
    bundle = resolve_bundle(str(served["tree"] / "tiny" / "v2"))
    station = CommandedStation(broker.port, STATION, "tiny", "v1")
    try:
        with caplog.at_level(logging.INFO, logger="central.rollout.run"):
            rollout = RolloutInThread(broker.port, bundle, tmp_path)
            try:
                wait_until(station.received, 60, "the rollout's cmd/model")
                late = station.report(answer(False, "earlier command: sha256 does not match (tampered)",
                                             ("tiny", "v1"), other_commands(served)[other]))["last_model_update"]
                wait_until(lambda: rollout.link.has_judged(late), 60, "the rollout to judge the late refusal")
                station.report(answer(True, None, ("tiny", "v2"), station.received()[0]), model=("tiny", "v2"))
            finally:
                summary = rollout.join()
    finally:
        station.close()
    assert station.received() == [bundle.command()]
    [outcome] = summary.outcomes
    assert summary.ok and summary.halted is None, (summary.halted, outcome.reason)
    assert (outcome.ok, outcome.before, outcome.after, outcome.reason) == (True, "v1", "v2", None)
    assert "last_model_update answers another cmd/model" in caplog.text and "not tiny v2 sent by this rollout" \
        in caplog.text


def test_a_refusal_naming_this_command_halts_with_the_station_s_reason(served, broker, tmp_path):
    bundle = resolve_bundle(str(served["tree"] / "tiny" / "v2"))
    station = CommandedStation(broker.port, STATION, "tiny", "v1")
    try:
        rollout = RolloutInThread(broker.port, bundle, tmp_path)
        try:
            [command] = wait_until(station.received, 60, "the rollout's cmd/model")
            station.report(answer(False, "model.fp32.onnx: sha256 does not match (tampered)", ("tiny", "v1"),
                                  command))
        finally:
            summary = rollout.join()
    finally:
        station.close()
    [outcome] = summary.outcomes
    assert not summary.ok and outcome.after == "v1"
    assert outcome.reason == "the station refused v2: model.fp32.onnx: sha256 does not match (tampered)"


def test_only_another_command_s_refusal_ends_in_the_usual_timeout(served, broker, tmp_path):
    """The timeout is kept: a station that answers only another command is 'no status reporting' after it."""
    bundle = resolve_bundle(str(served["tree"] / "tiny" / "v2"))
    station = CommandedStation(broker.port, STATION, "tiny", "v1")
    try:
        rollout = RolloutInThread(broker.port, bundle, tmp_path, timeout_s=3.0)
        try:
            wait_until(station.received, 60, "the rollout's cmd/model")
            station.report(answer(False, "earlier command refused", ("tiny", "v1"), other_commands(served)[
                "another version"]))
        finally:
            summary = rollout.join()
    finally:
        station.close()
    [outcome] = summary.outcomes
    assert not summary.ok and outcome.reason.startswith("no status reporting tiny v2 within 3 s"), outcome.reason


@pytest.mark.parametrize("ok", [True, False])
def test_an_answer_without_a_request_is_judged_as_before(served, broker, tmp_path, ok):
    """A station before 2026-12-07 names no request: its switch is a success and its new refusal halts, as
    always."""
    bundle = resolve_bundle(str(served["tree"] / "tiny" / "v2"))
    station = CommandedStation(broker.port, STATION, "tiny", "v1")
    try:
        rollout = RolloutInThread(broker.port, bundle, tmp_path)
        try:
            wait_until(station.received, 60, "the rollout's cmd/model")
            if ok:
                station.report(answer(True, None, ("tiny", "v2")), model=("tiny", "v2"))
            else:
                station.report(answer(False, "download failed", ("tiny", "v1")))
        finally:
            summary = rollout.join()
    finally:
        station.close()
    [outcome] = summary.outcomes
    assert (summary.ok, outcome.ok, outcome.after) == ((True, True, "v2") if ok else (False, False, "v1"))
    assert outcome.reason == (None if ok else "the station refused v2: download failed")


def test_a_real_station_s_status_names_the_rollout_s_command(served, broker, tmp_path):
    """A real agent updated through the CLI: its retained status's last_model_update.request is the cmd/model
    the rollout sent (bundle, sha256, version), and the rollout judged it."""
    server = BundleServer(served["tree"]).start()
    url = f"{server.url}tiny/v2/"
    recorder = Recorder(broker.port, ["inventory/#"])
    station = Station(tmp_path / "stations", served["bundles"]["v1"], image_folder(tmp_path / "camera", count=5),
                      broker.port)
    try:
        wait_online(recorder, station, "v1")
        done = cli("rollout", "--bundle-url", url, "--stations", station.key, "--no-canary",
                   "--update-timeout-s", "120", "--history", str(tmp_path / "h.json"), "--mqtt-host", "127.0.0.1",
                   "--mqtt-port", str(broker.port))
        assert done.returncode == 0, done.stdout + done.stderr
        [sent] = [m.json() for m in recorder.of(f"/{station.key}/cmd/model")]
        update = wait_until(lambda: (recorder.status(station.key) or {}).get("last_model_update"), 60,
                            f"{station.key}'s status with its last_model_update")
    finally:
        station.stop()
        recorder.close()
        server.stop()
    assert update["ok"] is True and update["request"] == sent
    assert sent["version"] == "v2" and sent["bundle"] == url


def test_the_documented_request_example_is_a_valid_last_model_update():
    """docs/agent.md "Model updates" shows a last_model_update with its request: valid by status.v1 (the docs
    examples test checks whole messages only), and what the rollout matches to its command."""
    text = (Path(__file__).resolve().parents[3] / "docs" / "agent.md").read_text()
    block = re.search(r"A station switched by a rollout publishes, for example:\n\n```json\n(.*?)\n```", text, re.S)
    update = json.loads(block.group(1))
    body = {"schema": "status.v1", "id": "0" * 8 + "-0000-0000-0000-" + "0" * 12, "seq": 1, "ts": 1.0, "site": "s",
            "station": "a", "state": "online", "model": None, "last_model_update": update}
    for engine in ("fastjsonschema", "jsonschema"):
        checker("status.v1", engine).check("docs/agent.md", body)
    for bad in ({**update["request"], "extra": 1}, {**update["request"], "bundle": "x" * 2049},
                {**update["request"], "sha256": "A" * 64}):
        with pytest.raises(ValueError, match="last_model_update"):
            checker("status.v1").check("status", {**body, "last_model_update": {**update, "request": bad}})
    command = update["request"]
    assert StationView(body).update_answers(command) is True
    assert StationView(body).update_answers({**command, "version": "other"}) is False
    assert StationView({**body, "last_model_update": {k: v for k, v in update.items() if k != "request"}}) \
        .update_answers(command) is None
