"""A (re)started dashboard reads a station's retained status as old as the status says, not as old as the start.

The broker hands a new subscription the retained status of every station: sent when the station connected
(online) or left (offline), hours ago maybe. Taken as arriving now, a station up for days showed the minutes since
the dashboard started and an offline one "offline since" the start. The status carries its own ``ts`` and
``uptime_s``; the station's clock is bounded by the arrival (never in the future) and, once its live stats come,
moved by the offset they show.
"""

from __future__ import annotations

import time

import pytest
from dashboard_support import publish, wait_until
from fleet_messages import FleetStation

from central.dashboard.feed import StationFeed
from central.dashboard.state import WarehouseState
from contract.broker import BrokerSettings

pytestmark = pytest.mark.mqtt


def view_of(state: WarehouseState, key: str, now: float | None = None) -> dict:
    return next(v for v in state.snapshot(now)["stations"] if v["key"] == key)


def row_of(state: WarehouseState, key: str, now: float | None = None) -> dict:
    return next(r for r in state.rows(now) if r["key"] == key)


def test_a_started_dashboard_takes_the_retained_statuses_as_old_as_they_say(broker):
    """Given a station that connected an hour ago after 600 s up and one that said offline two hours ago, both
    retained on a real mosquitto, when a dashboard subscribes, then the first shows 600 s + an hour of uptime, the
    second is offline since two hours ago, and neither was last seen at the dashboard's start; a live status
    after that counts from its arrival."""
    now = time.time()
    up, down = FleetStation("site-a", "st-up"), FleetStation("site-a", "st-down")
    up_status, down_status = up.status(now - 3600, uptime_s=600.0), down.status(now - 7200, "offline")
    publish(broker.port, [up.message("status", up_status), down.message("status", down_status)], retain=True)
    state = WarehouseState()
    feed = StationFeed(BrokerSettings(host="127.0.0.1", port=broker.port), state)
    feed.start()
    try:
        wait_until(lambda: len(state.stations) == 2, 60, "both retained statuses")
        at = time.time()
        shown = view_of(state, up.key, at)
        assert shown["status_at"] == up_status["ts"] and shown["status_time_from"] == "station clock"
        assert shown["uptime_now_s"] == pytest.approx(600.0 + at - up_status["ts"], abs=0.01)   # ~4200, not ~600
        assert shown["status_received_at"] > up_status["ts"] + 3000          # what it was taken from before
        gone = view_of(state, down.key, at)
        assert gone["health"] == "offline" and gone["status_at"] == down_status["ts"]
        assert row_of(state, down.key, at)["last_seen"] == down_status["ts"]
        assert row_of(state, up.key, at)["last_seen"] == up_status["ts"]

        live = up.status(time.time(), uptime_s=5.0)         # the station restarted: its new status comes live
        publish(broker.port, [up.message("status", live)], retain=True)
        wait_until(lambda: (state.stations[up.key].status or {}).get("id") == live["id"], 60, "the live status")
        shown = view_of(state, up.key)
        assert shown["status_time_from"] == "arrival" and shown["status_at"] == shown["status_received_at"]
    finally:
        feed.stop()


def test_a_station_clock_ahead_or_behind_is_bounded_and_then_corrected_by_its_stats():
    """A retained status from a station whose clock is an hour ahead is taken as sent no later than it arrived
    (uptime never below what it said, nothing "since" the future); one whose clock is an hour behind is taken at
    its word until its live stats show the offset (the least of their arrival - ts: a stats sent late only adds to
    it), then both are moved by it."""
    arrival = 100_000.0
    state = WarehouseState(clock=lambda: arrival + 30)
    ahead, behind = FleetStation("s", "ahead"), FleetStation("s", "behind")
    # truth: both sent their status 1000 s before the dashboard started, after 200 s up
    state.ingest(*ahead.message("status", ahead.status(arrival - 1000 + 3600, uptime_s=200.0)),
                 received_at=arrival, retained=True)
    state.ingest(*behind.message("status", behind.status(arrival - 1000 - 3600, uptime_s=200.0)),
                 received_at=arrival, retained=True)
    now = arrival + 30
    assert view_of(state, ahead.key, now)["uptime_now_s"] == pytest.approx(230.0)         # bounded: not negative
    assert view_of(state, behind.key, now)["uptime_now_s"] == pytest.approx(200.0 + 4630.0)   # its word, for now
    for k in range(3):                       # live stats: arrival - ts shows each clock's offset
        t = arrival + 10 * k
        state.ingest(*ahead.message("stats", ahead.stats(t + 3600)), received_at=t + 0.05)
        state.ingest(*behind.message("stats", behind.stats(t - 3600)), received_at=t + 0.05)
    # stats the agent held while its link was down come late at its reconnect: they do not move the offset
    state.ingest(*ahead.message("stats", ahead.stats(arrival + 20 + 3600)), received_at=arrival + 90)
    state.ingest(*behind.message("stats", behind.stats(arrival + 20 - 3600)), received_at=arrival + 90)
    for station in (ahead, behind):
        view = view_of(state, station.key, now)
        assert view["status_time_from"] == "station clock, offset by stats"
        assert view["status_at"] == pytest.approx(arrival - 1000 + 0.05)
        assert view["uptime_now_s"] == pytest.approx(200.0 + 1030.0 - 0.05)

