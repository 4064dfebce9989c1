"""The dashboard end to end: a real mosquitto, the real agent process, ``python -m central dashboard`` as a user runs it,
and its HTTP API. Includes the issue's must-show: a rejected update changes nothing on the station and the
dashboard says why."""

from __future__ import annotations

import json
import signal

import pytest
from dashboard_support import (
    AgentProcess,
    DashboardProcess,
    failed_gate_event,
    manifest_sha256,
    publish,
    publish_event,
    retopic,
    rollout_event,
)

pytestmark = pytest.mark.mqtt


def online_with(version: str):
    return lambda s: s["health"] == "online" and (s["model"] or {}).get("version") == version


def test_a_running_station_is_shown_live_and_goes_offline_when_it_stops(tmp_path, broker, tiny_bundle, video):
    # given the dashboard, then a station starting
    dash = DashboardProcess(tmp_path, broker.port)
    agent = AgentProcess(tmp_path, tiny_bundle, video, broker.port)
    try:
        # then the dashboard shows it online with its model, results, decisions and stats
        view = dash.wait_station(agent.key, lambda s: online_with("tiny-1")(s) and len(s["results"]) >= 3
                                 and len(s["history"]) >= 2 and s["decisions"] and s["cameras_up"] == {"dock-a": True},
                                 "online with results, stats and its camera up")
        assert view["cameras"].keys() == {"dock-a"} and view["role"] == "receiving"
        assert view["uptime_s"] is not None and view["uptime_s"] >= 0
        assert {r["model_version"] for r in view["results"]} == {"tiny-1"}
        assert view["results"][0]["seq"] > view["results"][-1]["seq"]          # newest first
        stats = view["stats"]
        assert stats["fps"].keys() == {"dock-a"} and stats["fps_total"] > 0
        assert {"inference", "capture_to_ack"} <= stats["latency"].keys()
        assert stats["latency"]["inference"]["p50_ms"] <= stats["latency"]["inference"]["p99_ms"]
        assert stats["outbox"]["depth"] >= 0 and stats["model_version"] == "tiny-1"
        assert 0.0 <= view["history"][-1]["low_confidence_rate"] <= 1.0
        # and the counts keep growing while it runs (live, not a one-off)
        seen = view["counts"]["result"]
        dash.wait_station(agent.key, lambda s: s["counts"]["result"] > seen + 3, "more results")
        # when the station stops cleanly
        assert agent.stop() == 0, agent.log()[-3000:]
        # then it is offline
        view = dash.wait_station(agent.key, lambda s: s["health"] == "offline", "offline after SIGTERM")
        assert view["uptime_s"] is None and view["model"]["version"] == "tiny-1"
        assert dash.state()["counters"]["malformed"] == 0
    finally:
        agent.kill()
        assert dash.stop() == 0, dash.log()[-3000:]


def test_a_hung_station_turns_stale_and_a_killed_one_offline_by_its_last_will(tmp_path, broker, tiny_bundle, video):
    dash = DashboardProcess(tmp_path, broker.port, "--stale-factor", "3", "--stale-min-s", "3")
    # keepalive 5 s: the broker publishes the will (offline) about 7.5 s after the last packet
    agent = AgentProcess(tmp_path, tiny_bundle, video, broker.port, mqtt={"keepalive_s": 5})
    try:
        dash.wait_station(agent.key, lambda s: s["health"] == "online" and len(s["history"]) >= 2, "online")
        # when the process hangs (SIGSTOP): no stats, but still connected as far as the broker knows
        agent.signal(signal.SIGSTOP)
        view = dash.wait_station(agent.key, lambda s: s["health"] == "stale", "stale without stats")
        assert view["state"] == "online" and view["stale_after_s"] == pytest.approx(3.0, abs=0.5)
        # when it resumes, stats flow again and it is fresh
        agent.signal(signal.SIGCONT)
        dash.wait_station(agent.key, lambda s: s["health"] == "online", "online again after SIGCONT")
        # when it dies without a word (kill -9), the broker's last will says offline
        agent.kill()
        dash.wait_station(agent.key, lambda s: s["health"] == "offline", "offline by the last will", timeout=60)
    finally:
        agent.kill()
        dash.stop()


def test_a_model_update_with_a_wrong_sha256_changes_nothing_and_the_dashboard_says_why(
        tmp_path, broker, models, video):
    v1, v2 = models / "tiny-1", models / "tiny-2"
    dash = DashboardProcess(tmp_path, broker.port)
    agent = AgentProcess(tmp_path, v1, video, broker.port)
    try:
        dash.wait_station(agent.key, online_with("tiny-1"), "online on tiny-1")
        # when central sends cmd/model for tiny-2 with a sha256 that is not its manifest's
        wrong = "f" * 64
        assert wrong != manifest_sha256(v2)
        publish(broker.port, [(f"{agent.cmd_topic}/model",
                               json.dumps({"bundle": str(v2), "sha256": wrong, "version": "tiny-2"}))])
        # then the dashboard shows the rejection and why, from the station's own status
        view = dash.wait_station(agent.key, lambda s: (s["last_model_update"] or {}).get("ok") is False,
                                 "the rejected update in the status")
        update = view["last_model_update"]
        assert "sha256" in update["reason"] and wrong in update["reason"], update
        assert update["running"] == {"name": "tiny", "version": "tiny-1"}
        # and nothing changed on the station: same model, results still from tiny-1, nothing installed
        assert view["model"]["version"] == "tiny-1"
        last_seq = view["results"][0]["seq"]
        later = dash.wait_station(agent.key, lambda s: s["results"][0]["seq"] > last_seq + 3, "results after it")
        assert {r["model_version"] for r in later["results"] if r["seq"] > last_seq} == {"tiny-1"}
        assert later["health"] == "online" and later["model"]["version"] == "tiny-1"
        assert not list((agent.folder / "downloads").glob("*/tiny-2"))
        # control: the same command with the right sha256 is installed and shown
        publish(broker.port, [(f"{agent.cmd_topic}/model",
                               json.dumps({"bundle": str(v2), "sha256": manifest_sha256(v2), "version": "tiny-2"}))])
        view = dash.wait_station(agent.key, online_with("tiny-2"), "the station on tiny-2")
        assert view["last_model_update"]["ok"] is True and view["last_model_update"]["reason"] is None
    finally:
        agent.kill()
        dash.stop()


def test_a_failed_gate_and_a_halted_rollout_are_listed_with_their_reasons(tmp_path, broker, recorded):
    dash = DashboardProcess(tmp_path, broker.port)
    try:
        status = next(m for m in recorded if m.kind == "status" and m.json()["state"] == "online")
        publish(broker.port, [(status.topic, status.payload)], retain=True)
        dash.wait_station("test/st-01", lambda s: s["health"] == "online", "the station")
        # when central publishes a failed gate (retrain's own rule and event code), then a canary halted by
        # the station's refusal (retained, QoS 1, as the central tools send them)
        gate = failed_gate_event()
        halt = rollout_event("halt", False, "test/st-01 rejected the update: sha256 mismatch", ["test/st-01"])
        for event in (gate, halt):
            publish_event(broker.port, event)
        # then both are listed, newest first, with their reasons, and the station's card names the halt
        snap = dash.wait_state(lambda s: len(s["rollout"]) == 2, "two rollout events")
        assert [(e["action"], e["ok"], e["reason"]) for e in snap["rollout"]] == [
            ("halt", False, halt["reason"]), ("gate", False, gate["reason"])]
        assert snap["rollout"][1]["figures"] == gate["figures"]
        assert snap["stations"][0]["rollout"]["id"] == halt["id"]
        # a dashboard started later gets the retained (latest) event from the broker
        late = DashboardProcess(tmp_path, broker.port)
        try:
            snap = late.wait_state(lambda s: bool(s["rollout"]), "the retained event")
            assert [e["id"] for e in snap["rollout"]] == [halt["id"]]
        finally:
            late.stop()
    finally:
        dash.stop()


def test_duplicates_and_malformed_messages_over_the_broker_are_counted_and_the_server_keeps_going(
        tmp_path, broker, recorded):
    dash = DashboardProcess(tmp_path, broker.port)
    try:
        result = next(m for m in recorded if m.kind == "result")
        good = retopic(result, "test", "st-09")
        # when the same result arrives twice (a redelivery keeps its id), then garbage, then a bad field
        bad_field = retopic(result, "test", "st-09")
        body = bad_field.json() | {"confidence": "high"}
        publish(broker.port, [(good.topic, good.payload), (good.topic, good.payload),
                              ("inventory/test/st-09/result", b"not json at all"),
                              (bad_field.topic, json.dumps(body))])
        # then one result is shown, one duplicate and two malformed messages are counted with their reasons
        snap = dash.wait_state(lambda s: s["counters"]["received"] >= 4, "four messages")
        assert snap["counters"]["duplicates"] == 1 and snap["counters"]["malformed"] == 2
        assert [r["id"] for r in snap["stations"][0]["results"]] == [good.json()["id"]]
        reasons = [m["reason"] for m in snap["malformed"]]
        assert any("field confidence" in r for r in reasons) and any("not JSON" in r for r in reasons), reasons
        assert "malformed message" in dash.log()
        # and the server goes on: the next good message is applied
        nxt = retopic(result, "test", "st-09")
        publish(broker.port, [(nxt.topic, nxt.payload)])
        dash.wait_station("test/st-09", lambda s: s["counts"]["result"] == 2, "the next result")
    finally:
        assert dash.stop() == 0
