"""The fleet overview and the station list, from schema-valid station messages on an exact clock: counts per lane,
label and hour, the share sent to review, the low-confidence trend, the degraded rule and its order, stale and
offline, rollout progress, paging and filters, and memory that stays bounded."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from dashboard_support import rollout_event
from fleet_messages import FleetStation

from central.dashboard.overview import QueryError, StationTally, parse_query
from central.dashboard.state import StateLimits, WarehouseState
from central.dashboard.tally import OTHER, Buckets, KeyedBuckets

UTC = dt.timezone.utc
NOON = dt.datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp()     # a clock-hour boundary, mid-day


def fresh(**limits) -> WarehouseState:
    return WarehouseState(clock=lambda: NOON, tz=UTC, limits=StateLimits(**limits))


def send(state: WarehouseState, st: FleetStation, kind: str, body: dict, at: float | None = None) -> None:
    assert state.ingest(*st.message(kind, body), received_at=body["ts"] if at is None else at) == "applied"


def test_decisions_are_counted_per_lane_label_and_clock_hour():
    state = fresh()
    dock, sorter = FleetStation("ber1", "dock-01"), FleetStation("ber1", "sort-01", role="sorting")
    send(state, dock, "status", dock.status(NOON - 7200))
    send(state, sorter, "status", sorter.status(NOON - 7200))
    # 2 hours ago, 20 minutes ago and 2 minutes ago; one item sent to review
    send(state, dock, "decision", dock.decision(NOON - 7000, "Coat"))
    send(state, dock, "decision", dock.decision(NOON - 1200, "Coat"))
    send(state, dock, "decision", dock.decision(NOON - 120, "Bag", review=True))
    send(state, sorter, "decision", sorter.decision(NOON - 60, "Sandal"))

    o = state.overview(NOON)
    fleet = o["fleet"]
    assert fleet["decided_hour"] == 3 and fleet["review_hour"] == 1 and fleet["review_share_hour"] == 0.3333
    assert fleet["lanes_hour"] == {"outerwear": 1, "manual-review": 1, "shoes": 1}
    # per clock hour today (UTC midnight to noon: 13 hours, the last one just begun)
    assert len(fleet["decided_by_hour"]) == 13 and fleet["hour_starts"][0] == NOON - 12 * 3600
    assert fleet["decided_by_hour"][-3:] == [1, 3, 0] and fleet["review_by_hour"][-2] == 1
    assert fleet["lanes_by_hour"][str(int(NOON - 3600))] == {"outerwear": 1, "manual-review": 1, "shoes": 1}
    # received today: only the receiving station's items, per label
    assert o["received_today"]["labels"] == [{"label": "Coat", "count": 2}, {"label": "Bag", "count": 1}]
    assert o["received_today"]["total"] == 3
    [site] = o["sites"]
    assert site["site"] == "ber1" and site["decided_hour"] == 3 and site["stations"] == 2
    card = state.station_card("ber1/dock-01", NOON)
    assert card["tally"]["decided_hour"] == 2 and card["tally"]["lanes_hour"] == {"outerwear": 1, "manual-review": 1}


def test_yesterdays_items_are_not_received_today_and_a_backlog_lands_when_it_was_decided():
    state = fresh()
    dock = FleetStation("ber1", "dock-01")
    send(state, dock, "status", dock.status(NOON - 20 * 3600))
    send(state, dock, "decision", dock.decision(NOON - 13 * 3600, "Coat"), at=NOON)   # yesterday, delivered now
    send(state, dock, "decision", dock.decision(NOON - 1800, "Bag"), at=NOON)         # half an hour late
    send(state, dock, "decision", dock.decision(NOON + 600, "Dress"), at=NOON)       # a clock ahead: counted now
    o = state.overview(NOON)
    assert o["received_today"]["labels"] == [{"label": "Bag", "count": 1}, {"label": "Dress", "count": 1}]
    assert o["fleet"]["decided_hour"] == 2 and o["fleet"]["decided_by_hour"][-2:] == [1, 1]


def test_the_low_confidence_rate_has_a_trend_from_the_stations_counters():
    state = fresh()
    st = FleetStation("ber1", "dock-01")
    send(state, st, "status", st.status(NOON - 7200))
    send(state, st, "stats", st.stats(NOON - 7000))
    send(state, st, "stats", st.stats(NOON - 4000, frames=1000, low=50))      # the hour before: 5%
    send(state, st, "stats", st.stats(NOON - 1000, frames=1000, low=200))     # this hour: 20%
    o = state.overview(NOON)
    assert o["fleet"]["low_confidence_rate_prev_hour"] == 0.05 and o["fleet"]["low_confidence_rate_hour"] == 0.2
    series = o["fleet"]["low_confidence_series"]
    assert len(series) == 12 and series.count(None) == 11 and 0.2 in series
    tally = state.station_card(st.key, NOON)["tally"]
    assert tally["low_confidence_rate_hour"] == 0.2 and tally["low_confidence_rate_prev_hour"] == 0.05


def degraded_fleet() -> tuple[WarehouseState, dict[str, FleetStation]]:
    state = fresh(outbox_backlog=100, low_confidence_rate=0.3, low_confidence_min_frames=50, qc_alerts=2)
    fleet = {name: FleetStation("ber1", name) for name in
             ("fine", "gone", "quiet", "refused", "blind", "backlog", "unsure", "alarm", "worst")}
    for st in fleet.values():
        send(state, st, "status", st.status(NOON - 600))
        send(state, st, "stats", st.stats(NOON - 60))
        send(state, st, "stats", st.stats(NOON - 30, frames=100, low=5))
    t = NOON - 10
    send(state, fleet["gone"], "status", fleet["gone"].status(t, "offline"))
    st = fleet["refused"]
    send(state, st, "status", st.status(t, update=st.refused_update(t, "2")))
    send(state, fleet["blind"], "status", fleet["blind"].status(t, cameras={"dock-a": False}))
    send(state, fleet["blind"], "stats", fleet["blind"].stats(t, frames=10, fps=0.0))
    send(state, fleet["backlog"], "stats", fleet["backlog"].stats(t, outbox_depth=150))
    send(state, fleet["unsure"], "stats", fleet["unsure"].stats(t, frames=100, low=60))
    for _ in range(2):
        send(state, fleet["alarm"], "alert", fleet["alarm"].alert(t))
    worst = fleet["worst"]                       # refused, and a QC alert too, then offline
    send(state, worst, "status", worst.status(t, update=worst.refused_update(t, "2")))
    send(state, worst, "alert", worst.alert(t))
    send(state, worst, "alert", worst.alert(t))
    send(state, worst, "status", worst.status(t + 1, "offline", update=worst.refused_update(t, "2")))
    # "quiet" sends nothing after its stats at NOON - 30: stale once its stats interval (30 s) x 3 has passed
    return state, fleet


def test_degraded_stations_come_first_worst_reason_first():
    state, fleet = degraded_fleet()
    later = NOON + 70           # "quiet": last stats 100 s ago, stale after 3 x 30 s
    state.refresh(later)
    keep_reporting = {"fine": {}, "refused": {}, "blind": {"fps": 0.0}, "backlog": {"outbox_depth": 150},
                      "unsure": {}, "alarm": {}}
    for name, how in keep_reporting.items():
        send(state, fleet[name], "stats", fleet[name].stats(later - 1, frames=1, **how), at=later - 1)
    rows = state.rows(later)
    order = [(r["station"], r["reasons"]) for r in rows]
    assert order == [("worst", ["offline", "update-refused", "qc-alerts"]), ("gone", ["offline"]),
                     ("quiet", ["stale"]), ("refused", ["update-refused"]), ("blind", ["camera-down"]),
                     ("backlog", ["outbox-backlog"]), ("unsure", ["low-confidence"]), ("alarm", ["qc-alerts"]),
                     ("fine", [])], order
    assert "sha256" in rows[3]["reason"] and rows[4]["reason"] == "camera down: dock-a"
    fleet_figures = state.overview(later)["fleet"]
    assert fleet_figures["degraded"] == 8 and fleet_figures["stale"] == 1 and fleet_figures["offline"] == 2
    assert fleet_figures["reasons"]["offline"] == 2 and fleet_figures["reasons"]["qc-alerts"] == 2


def test_the_station_list_filters_searches_and_pages():
    state, fleet = degraded_fleet()
    other = FleetStation("muc2", "dock-77", model={"name": "fashion-mnist", "version": "2", "backend": "onnxruntime-cpu",
                                                   "precision": "fp32"})
    send(state, other, "status", other.status(NOON - 5))
    page = lambda **q: state.station_page(parse_query({k: str(v) for k, v in q.items()}), NOON)  # noqa: E731
    assert page()["total"] == 10
    assert [r["key"] for r in page(site="muc2")["stations"]] == ["muc2/dock-77"]
    assert [r["key"] for r in page(model="2")["stations"]] == ["muc2/dock-77"]
    assert [r["key"] for r in page(q="DOCK-7")["stations"]] == ["muc2/dock-77"]
    assert {r["station"] for r in page(state="offline")["stations"]} == {"gone", "worst"}
    assert page(state="degraded")["total"] == 7          # "quiet" is not stale yet at NOON
    two = page(limit=2, offset=2)
    assert two["total"] == 10 and len(two["stations"]) == 2 and two["stations"][0]["key"] == page()["stations"][2]["key"]
    for bad, named in (({"limit": "0"}, "limit"), ({"limit": "x"}, "limit"), ({"offset": "-1"}, "offset"),
                       ({"state": "sleepy"}, "state"), ({"q": "x" * 300}, "q")):
        with pytest.raises(QueryError, match=f"parameter {named}"):
            parse_query(bad)


def test_rollout_progress_counts_the_stations_on_the_target_version_per_site():
    state = fresh()
    fleet = [FleetStation(site, f"st-{i}") for site in ("ber1", "muc2") for i in range(4)]
    for st in fleet:
        send(state, st, "status", st.status(NOON - 100))
    assert state.overview(NOON)["rollout"] is None
    event = rollout_event("canary", True, "ber1/st-0 runs 2", ["ber1/st-0"], version="2")
    assert state.ingest("inventory/_central/rollout", json.dumps(event).encode(), NOON - 50) == "applied"
    for st in fleet[:3]:                       # three stations of ber1 report version 2
        send(state, st, "status", st.status(NOON - 40, update=st.installed(NOON - 40, "2")))
    o = state.overview(NOON)
    progress = o["rollout"]
    assert progress["model"]["version"] == "2" and progress["action"] == "canary"
    assert (progress["stations_on_target"], progress["stations_with_model"], progress["share"]) == (3, 8, 0.375)
    assert progress["sites"] == [{"site": "ber1", "on_target": 3, "stations": 4},
                                 {"site": "muc2", "on_target": 0, "stations": 4}]
    assert [(m["version"], m["stations"]) for m in o["models"]] == [("1", 5), ("2", 3)]
    assert o["rollout_events"][0]["id"] == event["id"]


def test_a_rollout_over_a_thousand_stations_does_not_grow_the_overview_or_the_card():
    """central/rollout names every station of a rollout, with per-station versions and failures in its figures.
    The overview carried its 10 newest events whole: half a megabyte pushed to every open page at every change
    (its size is meant to be independent of the fleet's), and each station's card 50 kB of it. The page shows the
    stations named, the scalar figures and the reason; /api/state keeps the events whole."""
    state = fresh()
    fleet = [FleetStation(f"site{i % 5}", f"dock-{i:04d}") for i in range(1000)]
    for st in fleet:
        send(state, st, "status", st.status(NOON - 100))
    small = len(json.dumps(state.overview(NOON)))
    keys = [st.key for st in fleet]
    for n in range(10):
        figures = {"versions": dict.fromkeys(keys, "2"), "failed": dict.fromkeys(keys[:100], "sha256 mismatch"),
                   "stations_switched": 900, "note": "canary watched 600 s"}
        reason = f"900 of 1000 station(s) run {n}; failed: " + ", ".join(keys[:100])
        event = rollout_event("rollout", False, reason, keys, version=str(n), figures=figures)
        assert state.ingest("inventory/_central/rollout", json.dumps(event).encode(), NOON - 50) == "applied"

    overview = state.overview(NOON)
    assert len(json.dumps(overview)) < small + 40_000
    shown = overview["rollout_events"][0]
    assert shown["id"] == event["id"] and shown["stations"] == event["stations"][:20]
    assert shown["stations_total"] == 1000
    assert shown["figures"] == {"stations_switched": 900, "note": "canary watched 600 s"}
    assert shown["reason"].startswith("900 of 1000 station(s) run 9; failed: site0/dock-0000")
    assert len(shown["reason"]) < 2100 and overview["rollout"]["reason"] == shown["reason"]
    card = state.station_card(keys[500], NOON)
    assert card["rollout"]["id"] == event["id"] and len(json.dumps(card)) < 10_000
    assert state.snapshot(NOON)["rollout"][0]["figures"] == figures        # whole in /api/state


def test_buckets_keep_a_fixed_size_and_refuse_what_is_older_than_they_hold():
    b = Buckets(slots=4, width_s=60, fields=1)
    for minute in range(1000):
        assert b.add(minute * 60.0, 0)
    assert b.total(999 * 60.0, 4) == [4] and len(b.counts) == 4
    assert not b.add(0.0, 0)                   # a count for minute 0 is older than any slot holds
    keyed = KeyedBuckets(slots=2, width_s=60, max_keys=3)
    for i in range(10):
        keyed.add(0.0, f"lane-{i}")
    assert keyed.total(0.0, 1) == {"lane-0": 1, "lane-1": 1, "lane-2": 1, OTHER: 7}


def test_memory_per_station_is_bounded_whatever_it_sends():
    state = fresh(labels_kept=20, lanes_kept=8)
    st = FleetStation("ber1", "dock-01")
    send(state, st, "status", st.status(NOON - 3600))
    t = NOON - 3000
    for i in range(3000):                     # 50 minutes of items, each with a new lane name
        t += 1.0
        send(state, st, "decision", st.decision(t, "Coat", lane=f"lane-{i}"))
    tally = state.tally.stations[st.key]
    site = state.tally.sites["ber1"]
    assert len(tally.five.counts) == 24 and len(tally.lanes.keys) <= 16
    assert len(site.lanes_minute.keys) == 8 and len(site.minute.counts) == 120 and len(site.hours.counts) == 25
    lanes = state.overview(NOON)["fleet"]["lanes_hour"]
    assert len(lanes) == 9 and lanes[OTHER] > 2900
    assert isinstance(tally, StationTally) and len(state.tally.stations) == 1


def test_a_count_older_than_the_window_is_late_and_old_lanes_free_the_cap():
    """A backlog from before the window ending now landed in an empty slot (or one older still) and was counted
    nowhere, not even as late. And once 32 lane names had ever been seen, every new lane was "(other)" for the
    life of the dashboard, even after the old counts had left every window."""
    from central.dashboard.overview import FleetTally, station_tally_view

    now = 1_700_000_000.0
    tally = FleetTally(lanes_kept=32, labels_kept=500, tz=None)

    def decided(site, key, ts, lane="ok", at=now):
        tally.on_decision(site, key, None, {"ts": ts, "lane": lane, "low_confidence": False, "label": "x"}, at)

    for i in range(10):
        decided("s1", "s1/a", now - 2.5 * 3600 + i)              # before the station's 2 h of five-minute buckets
    decided("s2", "s2/b", now - 3 * 3600)                        # a new station's first item, 3 h old
    assert tally.stations["s1/a"].late == 10 and tally.sites["s1"].late == 10
    assert tally.stations["s2/b"].late == 1 and station_tally_view(tally.stations["s2/b"], now)["decided_hour"] == 0
    buckets = KeyedBuckets(slots=60, width_s=60.0, max_keys=32)
    for n in range(32):
        assert buckets.add(now, f"mistyped-{n}")
    later = now + 3 * 86400 + 7 * 60                               # another slot than the old lanes'
    assert buckets.add(later, "accept") and buckets.total(later, 60) == {"accept": 1}
