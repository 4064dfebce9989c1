"""A fleet over days, as the dashboard's state sees it (schema-valid station messages on an exact clock): retained
messages the broker sends again at every reconnect, a station taken out of service or renamed, an agent that
restarts and counts from zero, a station that refuses an update without saying why, and refused messages whose
reasons quote a megabyte."""

from __future__ import annotations

import datetime as dt
import json

from dashboard_support import rollout_event
from fleet_messages import FleetStation

from central.dashboard.state import MAX_REASON_CHARS, StateLimits, WarehouseState

UTC = dt.timezone.utc
NOON = dt.datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp()


def fresh(**limits) -> WarehouseState:
    return WarehouseState(clock=lambda: NOON, tz=UTC, limits=StateLimits(**limits))


def test_a_retained_status_and_rollout_event_sent_again_after_the_dedupe_window_change_nothing():
    """At a thousand stations the 100,000 ids remembered last seconds; the broker resends every retained status and
    the last rollout event at each reconnect of the dashboard. Applied again, every station's uptime restarted,
    an offline one was "offline since" the reconnect, and the rollout event was listed twice."""
    state = fresh(seen_ids=100)
    dock, gone, busy = FleetStation("ber1", "dock-01"), FleetStation("ber1", "dock-02"), FleetStation("ber1", "sort")
    retained = [dock.message("status", dock.status(NOON, uptime_s=100.0)),
                gone.message("status", gone.status(NOON, state="offline")),
                ("inventory/_central/rollout", json.dumps(rollout_event("rollout", True, None, [dock.key])).encode())]
    for topic, payload in retained:
        assert state.ingest(topic, payload, received_at=NOON) == "applied"
    for i in range(150):                                   # the ids of the retained messages leave the window
        state.ingest(*busy.message("decision", busy.decision(NOON + 1, "Coat")), received_at=NOON + 1)

    later = NOON + 7200                                    # the dashboard's connection drops and comes back
    assert [state.ingest(t, p, received_at=later) for t, p in retained] == ["duplicate"] * 3

    views = {s["key"]: s for s in state.snapshot(later)["stations"]}
    assert views[dock.key]["uptime_now_s"] == 7300.0
    assert views[gone.key]["status_received_at"] == NOON                 # offline since noon, not the reconnect
    assert len(state.snapshot(later)["rollout"]) == 1
    # a new status of the same station is applied as before
    assert state.ingest(*dock.message("status", dock.status(later, uptime_s=5.0)), received_at=later) == "applied"
    assert state.station_card(dock.key, later)["uptime_now_s"] == 5.0


def test_a_station_whose_retained_status_is_cleared_is_forgotten_with_its_open_shipment():
    """Taking a station out of service (or renaming one) ends with its retained status cleared: an empty retained
    message, which every subscriber receives. It was counted as malformed ("not JSON") and the station stayed in
    the list, offline and degraded, for the life of the dashboard."""
    from test_dashboard_shipments import mixed_shipment, receipt

    state = fresh()
    old, kept = FleetStation("ber1", "receiving-01"), FleetStation("ber1", "dock-02")
    for st in (old, kept):
        state.ingest(*st.message("status", st.status(NOON - 60)), received_at=NOON - 60)
    state.ingest(*old.message("decision", old.decision(NOON - 30, "Coat")), received_at=NOON - 30)
    state.ingest(old.topic("receipt"), json.dumps(receipt(mixed_shipment(), seq=50)).encode(), received_at=NOON - 20)
    state.ingest(*old.message("status", old.status(NOON - 10, state="offline")), received_at=NOON - 10)
    state.ingest(*kept.message("stats", kept.stats(NOON - 5)), received_at=NOON - 5)
    assert state.overview(NOON)["fleet"]["degraded"] == 1 and state.shipments.counts()["open"] == 1
    state.drain_changes(NOON)

    assert state.ingest(old.topic("status"), b"", received_at=NOON) == "applied"

    overview = state.overview(NOON)
    assert overview["fleet"]["stations"] == 1 and overview["fleet"]["degraded"] == 0
    assert overview["counters"]["malformed"] == 0
    assert [r["key"] for r in state.rows(NOON)] == [kept.key] and state.station_card(old.key, NOON) is None
    assert state.shipments.counts()["open"] == 0
    assert overview["sites"][0]["decided_hour"] == 1            # what it decided stays in its site's figures
    assert old.key in state.drain_changes(NOON).stations         # an open card of it says it is gone
    # clearing it again, or clearing a station never seen, changes nothing
    assert state.ingest(old.topic("status"), b"", received_at=NOON) == "ignored"
    # a station that comes back is a new station
    assert state.ingest(*old.message("status", old.status(NOON + 5)), received_at=NOON + 5) == "applied"
    assert state.station_card(old.key, NOON + 5)["health"] == "online"


def test_after_an_agent_restart_its_counters_count_from_zero_and_no_rate_passes_100_percent():
    """The agent's frames_classified / frames_low_confidence count since it started. Its first stats after a restart
    could hold more than its last stats before it (the old process ran briefly): the difference was taken as the
    interval's frames, a low-confidence rate of 130% (65 low of 50)."""
    state = fresh()
    st = FleetStation("ber1", "dock-01")
    state.ingest(*st.message("status", st.status(NOON, uptime_s=1.0)), received_at=NOON)
    state.ingest(*st.message("stats", st.stats(NOON + 10, frames=100, low=10)), received_at=NOON + 10)
    st.classified = st.low = 0                                # the process dies; a new one starts at NOON + 13
    state.ingest(*st.message("status", st.status(NOON + 14, uptime_s=1.0)), received_at=NOON + 14)
    state.ingest(*st.message("stats", st.stats(NOON + 24, frames=150, low=75)), received_at=NOON + 24)

    last = state.stations[st.key].history[-1]
    assert (last["recent_frames"], last["recent_low_confidence_rate"], last["recent_source"]) == (150, 0.5, "stats")
    assert state.station_card(st.key, NOON + 24)["tally"]["frames_hour"] == 150

    # a status of the same process (a command's answer) changes nothing: its uptime covers the last stats
    state.ingest(*st.message("status", st.status(NOON + 30, uptime_s=17.0)), received_at=NOON + 30)
    state.ingest(*st.message("stats", st.stats(NOON + 34, frames=10, low=1)), received_at=NOON + 34)
    assert state.stations[st.key].history[-1]["recent_frames"] == 10
    # nor does a negative uptime (status.v1 sets no minimum): the counters go on from the last stats
    state.ingest(*st.message("status", st.status(NOON + 40, uptime_s=-5.0)), received_at=NOON + 40)
    state.ingest(*st.message("stats", st.stats(NOON + 44, frames=10, low=1)), received_at=NOON + 44)
    assert state.stations[st.key].history[-1]["recent_frames"] == 10


def test_counters_that_restarted_unseen_give_no_figure_rather_than_an_impossible_one():
    state = fresh()
    st = FleetStation("ber1", "dock-01")
    state.ingest(*st.message("stats", st.stats(NOON, frames=100, low=10)), received_at=NOON)
    st.classified, st.low = 0, 0                              # restarted, and its status never came
    state.ingest(*st.message("stats", st.stats(NOON + 10, frames=110, low=80)), received_at=NOON + 10)
    last = state.stations[st.key].history[-1]
    assert last["recent_source"] == "results" and last["recent_low_confidence_rate"] is None
    series = state.station_card(st.key, NOON + 10)["tally"]["low_confidence_series"]
    assert all(r is None or 0 <= r <= 1 for r in series)


def test_a_refused_update_without_a_reason_says_so():
    """status.v1 lets last_model_update.reason be null: the list and the card said "model update refused: None"."""
    state = fresh()
    st = FleetStation("ber1", "dock-01")
    refused = {"ok": False, "reason": None, "ts": NOON, "running": {}}
    state.ingest(*st.message("status", st.status(NOON, update=refused)), received_at=NOON)
    [row] = state.rows(NOON)
    assert row["reasons"] == ["update-refused"]
    assert row["reason"] == "model update refused: the station gave no reason"


def test_a_refused_messages_reason_is_kept_short_whatever_it_quotes():
    """A schema engine quotes the offending value or key: a 1 MiB key made a 1 MiB reason, 20 of them kept and
    the newest 5 in the overview pushed to every page at every change (2.9 MB with the jsonschema engine), and the
    same in the log."""
    for engine in ("fastjsonschema", "jsonschema"):
        state = WarehouseState(clock=lambda: NOON, engine=engine)
        st = FleetStation("ber1", "dock-01")
        body = st.decision(NOON, "Coat")
        body["x" * 900_000] = 1
        assert state.ingest(st.topic("decision"), json.dumps(body).encode(), received_at=NOON) == "malformed"
        [kept] = state.malformed
        assert kept["reason"].startswith(f"{st.topic('decision')}: ")
        assert len(kept["reason"]) < MAX_REASON_CHARS + 100 and "characters in all" in kept["reason"]
        assert len(json.dumps(state.overview(NOON))) < 20_000, engine


def test_a_status_is_kept_as_far_as_it_is_shown_whatever_its_open_objects_hold():
    """status.v1 leaves last_model_update.running and last_thresholds_update.applied open objects, and lets
    artifact_choice carry 256 skip reasons of 16 kB. Kept whole, one status under the 1 MiB limit held 9 MB for its
    station (/tmp/dashboard/measure_status_size.py) and made its card 0.9 MB."""
    state = fresh()
    st = FleetStation("ber1", "dock-01")
    update = {"ok": True, "reason": None, "ts": NOON,
              "running": {"name": "fashion-mnist", "version": "2", "blob": [[i, i] for i in range(30_000)]}}
    body = st.status(NOON, update=update)
    body["last_thresholds_update"] = {"ok": True, "reason": None, "ts": NOON,
                                      "applied": {f"camera-{i}": {"min_confidence": 0.5} for i in range(5000)}}
    body["artifact_choice"] = {"mode": "auto", "precision": "int8", "batch": 1, "ms_per_batch": {"int8": 2.0},
                               "skipped": {f"fp32-{i}": "x" * 2000 for i in range(100)}}
    payload = json.dumps(body).encode()
    assert len(payload) > 700_000
    assert state.ingest(st.topic("status"), payload, received_at=NOON) == "applied"

    assert len(json.dumps(state.stations[st.key].status)) < 5_000
    card = state.station_card(st.key, NOON)
    assert len(json.dumps(card)) < 20_000
    assert card["last_model_update"]["running"] == {"name": "fashion-mnist", "version": "2"}
    assert card["last_thresholds_update"]["applied"] is None
    assert card["last_thresholds_update"]["applied_chars"] > 100_000 and card["model_version"] == "1"
    # an ordinary status is kept as sent, as far as the views show it
    small = {"ok": True, "reason": None, "ts": NOON, "applied": {"min_confidence": 0.6}}
    body = {**st.status(NOON + 1), "last_thresholds_update": small}
    assert state.ingest(st.topic("status"), json.dumps(body).encode(), received_at=NOON + 1) == "applied"
    assert state.station_card(st.key, NOON + 1)["last_thresholds_update"] == small
