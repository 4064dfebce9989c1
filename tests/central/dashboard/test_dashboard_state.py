"""The dashboard's state model fed with real messages: recorded from the real agent over a real broker.

The clock is an argument, so the stale rule and the views are exact.
"""

from __future__ import annotations

import base64
import json

import pytest
from dashboard_support import Recorded, failed_gate_event, retopic, rollout_event

from central.dashboard.state import StateLimits, WarehouseState
from contract.messages import ENGINES, SchemaError, checker

KEY = "test/st-01"
pytestmark = pytest.mark.mqtt


def replay(state: WarehouseState, messages: list[Recorded], start: float = 1000.0, step: float = 0.01) -> float:
    now = start
    for message in messages:
        state.ingest(message.topic, message.payload, received_at=now)
        now += step
    return now


def of_kind(messages: list[Recorded], kind: str) -> list[Recorded]:
    return [m for m in messages if m.kind == kind]


def test_the_recording_has_every_kind_of_message(recorded):
    # given what the real agent sent (the fixture validated each against the agent's schemas)
    kinds = {m.kind for m in recorded}
    assert kinds == {"status", "result", "decision", "alert", "stats"}, kinds
    states = [m.json()["state"] for m in of_kind(recorded, "status")]
    assert states[0] == "online" and states[-1] == "offline", states


def test_a_replayed_session_shows_the_station_with_what_it_sent(recorded):
    state = WarehouseState(limits=StateLimits(recent=5, alerts=3))
    replay(state, recorded)
    view = state.snapshot(now=2000.0)["stations"][0]

    results = of_kind(recorded, "result")
    decisions = of_kind(recorded, "decision")
    alerts = of_kind(recorded, "alert")
    stats = of_kind(recorded, "stats")
    assert view["key"] == KEY and view["role"] == "receiving"
    assert view["health"] == "offline" and view["uptime_s"] is None
    assert view["model"] == results[-1].json()["model"]
    assert view["counts"] == {"status": len(of_kind(recorded, "status")), "result": len(results),
                              "decision": len(decisions), "alert": len(alerts), "stats": len(stats),
                              "receipt": len(of_kind(recorded, "receipt")),
                              "low_confidence": sum(r.json()["low_confidence"] for r in results)}
    # the most recent N, newest first, each as the agent sent it
    assert [r["id"] for r in view["results"]] == [m.json()["id"] for m in results[::-1][:5]]
    newest = results[-1].json()
    shown = view["results"][0]
    assert (shown["label"], shown["seq"], shown["confidence"], shown["camera"], shown["low_confidence"],
            shown["reasons"]) == (newest["label"], newest["seq"], newest["confidence"], newest["camera"],
                                  newest["low_confidence"], newest["reasons"])
    assert [d["id"] for d in view["decisions"]] == [m.json()["id"] for m in decisions[::-1][:5]]
    assert view["decisions"][0]["lane"] == decisions[-1].json()["lane"]
    assert [a["id"] for a in view["alerts"]] == [m.json()["id"] for m in alerts[::-1][:3]]
    thumb = view["alerts"][0]["thumbnail_jpeg_b64"]
    assert base64.b64decode(thumb)[:2] == b"\xff\xd8"           # the JPEG evidence, shown on the page
    # the latest stats, and one history point per stats message
    last = stats[-1].json()
    assert view["stats"]["fps"] == last["fps"] and view["stats"]["outbox"]["depth"] == last["outbox"]["depth"]
    assert view["stats"]["latency"]["inference"] == last["latency"]["inference"]
    assert [p["low_confidence_rate"] for p in view["history"]] == [s.json()["low_confidence_rate"] for s in stats]
    assert state.counters.as_dict()["applied"] == len(recorded) and state.counters.malformed == 0


def test_the_rejected_update_is_shown_with_its_reason(recorded):
    # the agent was told to install a bundle with a wrong sha256 while it ran
    state = WarehouseState()
    rejected = next(m for m in of_kind(recorded, "status") if (m.json()["last_model_update"] or {}).get("ok") is False)
    replay(state, recorded[:recorded.index(rejected) + 1])
    view = state.snapshot()["stations"][0]
    update = view["last_model_update"]
    assert update["ok"] is False and "sha256" in update["reason"], update
    assert update["running"]["version"] == "tiny-1" and view["model"]["version"] == "tiny-1"
    assert view["health"] == "online"


def test_the_low_confidence_chart_has_the_rate_per_stats_interval(recorded):
    state = WarehouseState()
    replay(state, recorded)
    history = state.snapshot()["stations"][0]["history"]
    # expected: from the station's cumulative counters between two stats; before the first stats the
    # dashboard saw, the share of low-confidence results that arrived before it
    stats = [m.json() for m in of_kind(recorded, "stats")]
    first = recorded.index(of_kind(recorded, "stats")[0])
    before = [m.json()["low_confidence"] for m in of_kind(recorded[:first], "result")]
    expected = [round(sum(before) / len(before), 4) if before else None]
    for a, b in zip(stats, stats[1:]):
        frames = b["frames_classified"] - a["frames_classified"]
        expected.append(round((b["frames_low_confidence"] - a["frames_low_confidence"]) / frames, 4) if frames else None)
    assert [p["recent_low_confidence_rate"] for p in history] == expected
    assert [p["recent_source"] for p in history] == ["results"] + ["stats"] * (len(stats) - 1)
    assert any(v is not None for v in expected[1:])


def test_without_counters_in_the_stats_the_chart_counts_the_results_in_between(recorded):
    # an agent from before frames_classified/frames_low_confidence were in stats.v1 (they are optional)
    state = WarehouseState()
    expected, low, total = [], 0, 0
    for message in recorded:
        if message.kind == "stats":
            body = {k: v for k, v in message.json().items() if k not in ("frames_classified", "frames_low_confidence")}
            state.ingest(message.topic, json.dumps(body).encode())
            expected.append(round(low / total, 4) if total else None)
            low = total = 0
            continue
        state.ingest(message.topic, message.payload)
        if message.kind == "result":
            total += 1
            low += message.json()["low_confidence"]
    history = state.snapshot()["stations"][0]["history"]
    assert [p["recent_low_confidence_rate"] for p in history] == expected
    assert {p["recent_source"] for p in history} == {"results"} and any(v is not None for v in expected)


def test_redelivered_messages_are_counted_once(recorded):
    # given a replayed session, when the broker redelivers all of it (QoS 1 after lost PUBACKs)
    state = WarehouseState()
    replay(state, recorded)
    before = state.snapshot(now=5000.0)
    outcomes = {state.ingest(m.topic, m.payload) for m in recorded}
    # then nothing changes and every copy is counted as a duplicate
    after = state.snapshot(now=5000.0)
    assert outcomes == {"duplicate"}
    assert after["stations"] == before["stations"]
    assert after["counters"]["duplicates"] == len(recorded) and after["counters"]["applied"] == len(recorded)



def test_a_stations_resend_after_a_long_link_cut_is_a_duplicate_however_busy_the_fleet():
    """The agent resends what the broker did not acknowledge when its link is back, minutes later maybe; by then
    the rest of a thousand-station fleet has pushed its ids out of the fleet-wide window (100,000 ids: a minute or
    two; 300 here) and the resent decision, result and alert were counted twice. Each station's own newest ids
    are remembered too (``station_ids``, a bounded ring of hashes)."""
    from fleet_messages import LABELS, FleetStation

    state = WarehouseState(limits=StateLimits(seen_ids=300, station_ids=64))
    cut = FleetStation("site-0", "cut", role="qc")
    sent = [cut.message("decision", cut.decision(1000.0, "Coat")), cut.message("alert", cut.alert(1000.0))]
    assert [state.ingest(*m, received_at=1000.0) for m in sent] == ["applied", "applied"]
    others = [FleetStation("site-1", f"st-{i:02d}") for i in range(40)]
    for k in range(10):                                  # 400 ids of other stations
        for st in others:
            state.ingest(*st.message("decision", st.decision(1001.0 + k, LABELS[k])), received_at=1001.0 + k)
    before = state.station_card(cut.key, 1200.0)
    assert [state.ingest(*m, received_at=1200.0) for m in sent] == ["duplicate", "duplicate"]
    after = state.station_card(cut.key, 1200.0)
    assert after["counts"] == before["counts"] and after["tally"] == before["tally"]
    assert after["counts"]["decision"] == 1
    assert after["tally"]["decided_hour"] == 1 and after["tally"]["alerts_hour"] == 1
    # bounded: after 64 newer messages of its own, the station remembers no more than 64
    for k in range(64):
        state.ingest(*cut.message("decision", cut.decision(1300.0 + k, LABELS[k % 10])), received_at=1300.0 + k)
    assert len(state.stations[cut.key].recent_ids) == 64
    assert state.ingest(*sent[0], received_at=1400.0) == "applied"     # out of both windows: counted again

MUTATIONS = {
    "not json": ("not JSON",),
    "array": ("expected a JSON object",),
    "future schema": ("field schema: 'result.v2'",),
    "missing label": ("field (message)", "label"),
    "confidence > 1": ("field confidence",),
    "unknown field": ("field (message)", "colour"),
    "bad id": ("field id",),
    "other station": ("does not match the topic's test/st-02",),
    "huge": ("over the 1048576 byte limit",),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", list(MUTATIONS))
def test_a_malformed_message_is_counted_with_its_reason_and_changes_nothing(recorded, case, engine):
    expected = MUTATIONS[case]
    state = WarehouseState(engine=engine)
    replay(state, recorded)
    before = state.snapshot(now=5000.0)["stations"]
    result = of_kind(recorded, "result")[0]
    body = result.json() | {"id": "0d2f9b8e-5c1a-4f7e-9a51-0c6f2d1e7b3a"}
    topic = result.topic
    payload = {
        "not json": b"\x00garbage{",
        "array": b"[1, 2]",
        "future schema": json.dumps(body | {"schema": "result.v2"}).encode(),
        "missing label": json.dumps({k: v for k, v in body.items() if k != "label"}).encode(),
        "confidence > 1": json.dumps(body | {"confidence": 1.5}).encode(),
        "unknown field": json.dumps(body | {"colour": "red"}).encode(),
        "bad id": json.dumps(body | {"id": "not-a-uuid"}).encode(),
        "other station": json.dumps(body).encode(),
        "huge": b" " * (1 << 20) + json.dumps(body).encode(),
    }[case]
    if case == "other station":
        topic = "inventory/test/st-02/result"
    assert state.ingest(topic, payload) == "malformed"
    snap = state.snapshot(now=5000.0)
    assert snap["counters"]["malformed"] == 1 and snap["counters"]["malformed_by_kind"] == {"result": 1}
    reason = snap["malformed"][0]["reason"]
    assert snap["malformed"][0]["topic"] == topic and all(e in reason for e in expected), reason
    assert snap["stations"] == before
    # and the next good message is applied as usual
    fresh = retopic(result, "test", "st-01")
    assert state.ingest(fresh.topic, fresh.payload) == "applied"


def test_topics_the_dashboard_does_not_show_are_ignored(recorded):
    state = WarehouseState()
    status = of_kind(recorded, "status")[0]
    for topic in ["inventory/test/st-01/frames", "inventory/_central/st-01/status", "other/test/st-01/status",
                  "inventory/test/st-01/cmd/model", "inventory/_central/other"]:
        assert state.ingest(topic, status.payload) == "ignored", topic
    assert state.snapshot()["stations"] == [] and state.counters.ignored == 5


def test_a_station_goes_stale_without_stats_and_fresh_again_with_them(recorded):
    # given a station online, sending stats every 0.5 s (its own clock says so)
    limits = StateLimits(stale_factor=3.0, stale_min_s=1.0)
    state = WarehouseState(limits=limits)
    online = of_kind(recorded, "status")[0]
    stats = of_kind(recorded, "stats")[:3]
    state.ingest(online.topic, online.payload, received_at=100.0)
    for i, s in enumerate(stats):
        body = s.json() | {"ts": 50.0 + 0.5 * i}
        state.ingest(s.topic, json.dumps(body).encode(), received_at=100.0 + 0.5 * i)
    station = state.stations[KEY]
    assert station.stats_interval_s() == pytest.approx(0.5)
    last = 101.0
    # then it is fresh up to 3 intervals after the last stats, stale after
    assert state.refresh(now=last + 1.5) == [] and station.health == "online"
    assert state.refresh(now=last + 1.51) == [KEY] and station.health == "stale"
    assert state.snapshot(now=last + 2)["stations"][0]["health"] == "stale"
    # when stats arrive again it is fresh; an offline station is never stale
    again = retopic(stats[0], "test", "st-01", ts=52.0)
    state.ingest(again.topic, again.payload, received_at=last + 3)
    assert station.health == "online"
    offline = next(m for m in of_kind(recorded, "status") if m.json()["state"] == "offline")
    state.ingest(offline.topic, offline.payload, received_at=last + 4)
    assert state.refresh(now=last + 1000) == [] and station.health == "offline"


def test_stale_never_comes_sooner_than_the_minimum(recorded):
    # no stats yet: the agent's default interval (10 s) x 0.5 = 5 s, raised to the 10 s minimum
    state = WarehouseState(limits=StateLimits(stale_factor=0.5, stale_min_s=10.0))
    online = of_kind(recorded, "status")[0]
    state.ingest(online.topic, online.payload, received_at=0.0)
    assert state.refresh(now=9.9) == [] and state.refresh(now=10.1) == [KEY]


def test_a_failed_gate_and_a_halted_canary_are_listed_with_their_reasons(recorded):
    state = WarehouseState()
    replay(state, recorded)
    gate = failed_gate_event()
    halt = rollout_event("halt", False, "test/st-01: sha256 mismatch (tampered)", [KEY])
    for event in (gate, halt, gate):          # the gate event arrives twice (QoS 1 redelivery)
        state.ingest("inventory/_central/rollout", json.dumps(event).encode())
    snap = state.snapshot()
    assert [(e["action"], e["ok"], e["reason"]) for e in snap["rollout"]] == [
        ("halt", False, halt["reason"]), ("gate", False, gate["reason"])]
    assert snap["rollout"][1]["figures"] == gate["figures"]
    assert snap["counters"]["duplicates"] == 1
    assert snap["stations"][0]["rollout"]["id"] == halt["id"]     # the station's card shows it too


@pytest.mark.parametrize("change, expected", [
    ({"action": "deploy"}, "field action"),
    ({"ok": "yes"}, "field ok"),
    ({"stations": "test/st-01"}, "field stations"),
    ({"schema": "rollout-event.v0"}, "field schema"),
])
def test_a_malformed_rollout_event_is_counted(change, expected):
    state = WarehouseState()
    event = rollout_event("gate", True, None, []) | change
    assert state.ingest("inventory/_central/rollout", json.dumps(event).encode()) == "malformed"
    assert expected in state.snapshot()["malformed"][0]["reason"]
    assert state.snapshot()["rollout"] == []


def test_changes_are_drained_once_per_station(recorded):
    state = WarehouseState()
    replay(state, recorded[:10])
    changes = state.drain_changes(now=1000.5)
    assert changes.stations == {KEY} and changes.meta and not changes.rollout
    assert not state.drain_changes(now=1000.6)            # nothing new, nothing pushed
    event = rollout_event("canary", True, None, [KEY])
    state.ingest("inventory/_central/rollout", json.dumps(event).encode())
    changes = state.drain_changes(now=1000.7)
    assert changes.rollout and changes.stations == {KEY}  # the event names the station: its card changes
    # nobody watching: the changes are forgotten (a new page starts from fresh views)
    replay(state, recorded[10:20], start=1001.0)
    assert not state.drain_changes(now=1002.0, watched=lambda: False)
    assert not state.drain_changes(now=1002.1)


def test_an_alert_thumbnail_that_is_not_a_jpeg_is_not_passed_to_the_page(recorded):
    state = WarehouseState()
    alert = of_kind(recorded, "alert")[0].json()
    alert["evidence"]["thumbnail_jpeg_b64"] = base64.b64encode(b"<svg onload=alert(1)>").decode()
    state.ingest(of_kind(recorded, "alert")[0].topic, json.dumps(alert).encode())
    assert state.snapshot()["stations"][0]["alerts"][0]["thumbnail_jpeg_b64"] is None


def test_a_camera_that_opened_after_the_status_is_up_by_its_frame_rate(recorded):
    # the agent publishes its status on connect, often before the camera opened: cameras {"cam-a": false}
    state = WarehouseState()
    status = next(m for m in of_kind(recorded, "status") if m.json()["state"] == "online")
    stats = next(m for m in of_kind(recorded, "stats") if m.json()["fps"].get("cam-a", 0) > 0)
    state.ingest(status.topic, retopic(status, "test", "st-01", cameras={"cam-a": False}).payload, received_at=1.0)
    assert state.snapshot()["stations"][0]["cameras_up"] == {"cam-a": False}
    state.ingest(stats.topic, stats.payload, received_at=2.0)
    view = state.snapshot()["stations"][0]
    assert view["cameras_up"] == {"cam-a": True} and view["cameras"] == {"cam-a": False}
    stopped = retopic(stats, "test", "st-01", fps={"cam-a": 0.0})
    state.ingest(stopped.topic, stopped.payload, received_at=3.0)
    assert state.snapshot()["stations"][0]["cameras_up"] == {"cam-a": False}


def test_both_schema_engines_accept_and_refuse_the_same_messages(recorded):
    # fastjsonschema (draft 7) checks the fleet's messages; jsonschema (2020-12) is the reference

    from contract.messages import mqtt_schema

    bodies = [(m.json()["schema"], m.json()) for m in recorded]
    mutated = []
    for name, body in bodies[:40]:
        for key in mqtt_schema(name)["required"]:
            mutated.append((name, {k: v for k, v in body.items() if k != key}))     # each required field missing
        mutated += [(name, body | change) for change in ({"seq": 0}, {"ts": "now"}, {"extra": 1}, {"site": "a b"})]
    verdicts = {}
    for engine in ENGINES:
        outcome = []
        for name, body in bodies + mutated:
            try:
                checker(name, engine).check("t", body)
                outcome.append(True)
            except SchemaError:
                outcome.append(False)
        verdicts[engine] = outcome
    assert verdicts["fastjsonschema"] == verdicts["jsonschema"]
    assert all(verdicts["jsonschema"][:len(bodies)]) and not any(verdicts["jsonschema"][len(bodies):])


def test_the_whole_state_is_built_outside_the_lock_from_a_copy_taken_under_it(monkeypatch):
    """``/api/state`` at a thousand stations held the state's lock for the whole build (0.2-0.5 s of views and
    finite checks), holding up every message meanwhile. Given stations with every kind of message, when the
    snapshot is built and a message comes for a station while its view is being built, then no view is built
    and nothing is checked or encoded under the lock, the snapshot is what a build under the lock gave (the
    message that came meanwhile is not in it, and nothing broke), and the next snapshot has that message."""
    from fleet_messages import LABELS, FleetStation

    import central.dashboard.state as state_module

    state = WarehouseState()
    fleet = [FleetStation(f"site-{i % 3}", f"st-{i:02d}", role="qc" if i % 4 == 0 else "receiving")
             for i in range(12)]
    for k in range(8):
        for st in fleet:
            ts = 1000.0 + 10 * k
            messages = [("status", st.status(ts))] if k == 0 else []
            messages += [("stats", st.stats(ts, frames=20, low=k % 3)), ("decision", st.decision(ts, LABELS[k]))]
            messages += [("alert", st.alert(ts))] if st.role == "qc" else []
            for kind, body in messages:
                state.ingest(*st.message(kind, body), received_at=ts)
    state.ingest("inventory/_central/rollout", json.dumps(rollout_event("rollout", True, None, [fleet[0].key]))
                 .encode(), received_at=1050.0)
    now = 1100.0
    with state._lock:                       # the snapshot as it was built before: every view under the lock
        before = {"stations": [state.station_view(state.stations[k], now) for k in sorted(state.stations)],
                  "rollout": list(state.rollout), "shipments": state.shipments.listing()}
    under_lock: list[str] = []
    late = fleet[5]
    view, check = state_module.Station.view, state_module.finite

    def watched_view(station, at):
        if state._lock.locked():
            under_lock.append(f"view of {station.key}")
        elif station.key == late.key:        # the MQTT thread gets in while the views are built
            assert state.ingest(*late.message("decision", late.decision(1090.0, "Coat")), received_at=1090.0) \
                == "applied"
        return view(station, at)

    def watched_finite(value, what):
        if state._lock.locked():
            under_lock.append(f"finite check of {what}")
        return check(value, what)

    monkeypatch.setattr(state_module.Station, "view", watched_view)
    monkeypatch.setattr(state_module, "finite", watched_finite)
    snap = state.snapshot(now)
    assert under_lock == []
    assert {k: snap[k] for k in before} == before
    assert snap["version"] == state.version - 1 and len(snap["stations"]) == 12
    after = next(v for v in state.snapshot(now)["stations"] if v["key"] == late.key)
    assert after["decisions"][0]["label"] == "Coat" and after["counts"]["decision"] == 9
