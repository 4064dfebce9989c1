"""The warehouse at a glance: per-site and per-station tallies, the degraded rule, the station list and the overview.

Counts are kept as messages arrive (``FleetTally.on_*``: O(1) per message, in fixed-size buckets, see
``tally``); the overview and the station list are built from them and from each station's latest status
and stats when asked (O(stations), once per push, shared by every open page).

Time: a decision, an alert or a stats interval is counted at its own ``ts`` (the station's clock), never
later than the moment it arrived, so a backlog delivered after a link cut lands in the minutes it was
decided; one older than the buckets (two hours for the rolling figures, 25 clock hours for today's) is
counted as ``late`` only. "Today" starts at midnight in the dashboard's time zone.

A station is **degraded** when one of these holds (``REASONS``, worst first; the list puts it first):
offline (its status or last will said so), stale (online, no stats for ``stale_after_s``), update-refused
(its last model update was refused), camera-down (online with a camera reported down and no frames from
it since), outbox-backlog (``outbox.depth`` at or over ``limits.outbox_backlog``), low-confidence (over the
rolling hour, at least ``limits.low_confidence_min_frames`` frames and a low-confidence share at or over
``limits.low_confidence_rate``), qc-alerts (at least ``limits.qc_alerts`` QC alerts in the rolling hour).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, Iterable

from central.dashboard.tally import Buckets, DayCounts, KeyedBuckets, add_into, day_start, ratio, summed

DECIDED, REVIEW, FRAMES, LOW, ALERTS = range(5)
FIELDS = 5
REASONS = ("offline", "stale", "update-refused", "camera-down", "outbox-backlog", "low-confidence", "qc-alerts")
HEALTH_FILTERS = ("online", "stale", "offline", "unknown", "degraded")
SERIES_STEP_S = 300          # the low-confidence trend: twelve five-minute points over the rolling hour
SERIES_POINTS = 12


class StationTally:
    """One station's counts in five-minute buckets over two hours (rolling hour and the hour before)."""

    __slots__ = ("five", "lanes", "late")

    def __init__(self, lanes_kept: int) -> None:
        self.five = Buckets(2 * SERIES_POINTS, SERIES_STEP_S, FIELDS)
        self.lanes = KeyedBuckets(SERIES_POINTS, SERIES_STEP_S, lanes_kept)
        self.late = 0

    def hour(self, now: float, ago: int = 0) -> list[int]:
        return self.five.total(now, SERIES_POINTS, ago=ago)


class SiteTally:
    """One site's counts: per minute over two hours, per clock hour over 25 hours, received labels today."""

    __slots__ = ("minute", "lanes_minute", "hours", "lanes_hour", "received", "late")

    def __init__(self, lanes_kept: int, labels_kept: int) -> None:
        self.minute = Buckets(120, 60, FIELDS)
        self.lanes_minute = KeyedBuckets(60, 60, lanes_kept)
        self.hours = Buckets(25, 3600, FIELDS)
        self.lanes_hour = KeyedBuckets(25, 3600, lanes_kept)
        self.received = DayCounts(labels_kept)
        self.late = 0


class FleetTally:
    """The counts behind the overview, per station and per site; fed by ``WarehouseState`` under its lock."""

    def __init__(self, *, lanes_kept: int, labels_kept: int, tz: dt.tzinfo | None) -> None:
        self.lanes_kept, self.labels_kept, self.tz = lanes_kept, labels_kept, tz
        self.stations: dict[str, StationTally] = {}
        self.sites: dict[str, SiteTally] = {}

    def _of(self, site: str, key: str) -> tuple[SiteTally, StationTally]:
        if key not in self.stations:
            self.stations[key] = StationTally(min(self.lanes_kept, 16))
        if site not in self.sites:
            self.sites[site] = SiteTally(self.lanes_kept, self.labels_kept)
        return self.sites[site], self.stations[key]

    def _count(self, site: SiteTally, station: StationTally, at: float, field: int, n: int = 1,
               now: float | None = None) -> None:
        """``now``: a count from before the windows ending now is late, not counted into a slot no view shows."""
        if not station.five.add(at, field, n, now):
            station.late += n
        site.hours.add(at, field, n, now)
        if not site.minute.add(at, field, n, now):
            site.late += n

    def on_decision(self, site: str, key: str, role: str | None, body: dict[str, Any], now: float) -> None:
        at = min(float(body["ts"]), now)
        s, st = self._of(site, key)
        self._count(s, st, at, DECIDED, now=now)
        st.lanes.add(at, body["lane"], now=now)
        s.lanes_minute.add(at, body["lane"], now=now)
        s.lanes_hour.add(at, body["lane"], now=now)
        if body["low_confidence"]:       # the agent sends exactly these items to its review lane
            self._count(s, st, at, REVIEW, now=now)
        if role == "receiving":
            s.received.add(day_start(at, self.tz), body["label"])

    def on_alert(self, site: str, key: str, body: dict[str, Any], now: float) -> None:
        s, st = self._of(site, key)
        self._count(s, st, min(float(body["ts"]), now), ALERTS, now=now)

    def on_frames(self, site: str, key: str, ts: float, low: int, frames: int, now: float) -> None:
        """A stats interval's classified and low-confidence frames (from the station's counters or results)."""
        if frames <= 0:
            return
        s, st = self._of(site, key)
        at = min(ts, now)
        self._count(s, st, at, FRAMES, frames, now=now)
        self._count(s, st, at, LOW, low, now=now)


# ---------------------------------------------------------------- per station: the degraded rule and the row

def model_version(station: Any) -> str | None:
    model = (station.status or {}).get("model")
    if model:
        return model["version"]
    return station.stats["model_version"] if station.stats else None


def degraded_reasons(station: Any, hour: list[int], limits: Any) -> list[dict[str, str]]:
    """Why ``station`` needs a look, worst first (codes in ``REASONS``); empty when it does not."""
    out = []
    status = station.status or {}
    if station.state == "offline":
        out.append(("offline", "offline (status or last will)"))
    if station.stale:
        out.append(("stale", f"no stats for over {station.stale_after_s():.0f} s"))
    update = status.get("last_model_update")
    if update and not update["ok"]:
        out.append(("update-refused", f"model update refused: {update['reason'] or 'the station gave no reason'}"))
    if station.state == "online":
        down = sorted(c for c, up in station.cameras_up().items() if not up)
        if down:
            out.append(("camera-down", f"camera down: {', '.join(down)}"))
    stats = station.stats
    if stats and station.state == "online" and stats["outbox"]["depth"] >= limits.outbox_backlog:
        out.append(("outbox-backlog", f"outbox backlog of {stats['outbox']['depth']} messages"))
    frames, low = hour[FRAMES], hour[LOW]
    if frames >= limits.low_confidence_min_frames and low / frames >= limits.low_confidence_rate:
        out.append(("low-confidence", f"{100 * low / frames:.0f}% low-confidence frames over the last hour"))
    if hour[ALERTS] >= limits.qc_alerts:
        out.append(("qc-alerts", f"{hour[ALERTS]} QC alert{'s' if hour[ALERTS] != 1 else ''} in the last hour"))
    return [{"code": code, "text": text} for code, text in out]


def station_row(station: Any, tally: StationTally | None, now: float, limits: Any) -> dict[str, Any]:
    """What the station list shows of one station (small: a thousand of them fit in a page's memory)."""
    hour = tally.hour(now) if tally else [0] * FIELDS
    reasons = degraded_reasons(station, hour, limits)
    stats = station.stats
    return {"key": station.key, "site": station.site, "station": station.station,
            "role": (station.status or {}).get("role"), "health": station.health,
            "degraded": bool(reasons), "reasons": [r["code"] for r in reasons],
            "reason": reasons[0]["text"] if reasons else None, "model_version": model_version(station),
            "decided_hour": hour[DECIDED], "review_share_hour": ratio(hour[REVIEW], hour[DECIDED]),
            "low_confidence_rate_hour": ratio(hour[LOW], hour[FRAMES]), "alerts_hour": hour[ALERTS],
            "fps_total": _finite_or_none(stats["fps_total"]) if stats else None,
            "outbox_depth": stats["outbox"]["depth"] if stats else None,
            "last_seen": max((t for t in (station.stats_received_at, station.status_at(),
                                          station.last_message_at) if t is not None), default=None)}


def _finite_or_none(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def row_order(row: dict[str, Any]) -> tuple:
    """Degraded first (worst reason, then most reasons), then by site and station."""
    if row["reasons"]:
        return (0, REASONS.index(row["reasons"][0]), -len(row["reasons"]), row["key"])
    return (1, 0, 0, row["key"])


def station_tally_view(tally: StationTally | None, now: float) -> dict[str, Any]:
    """The rolling-hour figures on a station's card."""
    if tally is None:
        tally = StationTally(1)
    hour, before = tally.hour(now), tally.hour(now, ago=SERIES_POINTS)
    return {"decided_hour": hour[DECIDED], "review_hour": hour[REVIEW],
            "review_share_hour": ratio(hour[REVIEW], hour[DECIDED]),
            "lanes_hour": tally.lanes.total(now, SERIES_POINTS), "alerts_hour": hour[ALERTS],
            "frames_hour": hour[FRAMES], "low_confidence_rate_hour": ratio(hour[LOW], hour[FRAMES]),
            "low_confidence_rate_prev_hour": ratio(before[LOW], before[FRAMES]),
            "low_confidence_series": [ratio(p[LOW], p[FRAMES]) for p in tally.five.series(now, SERIES_POINTS)],
            "late": tally.late}


# ---------------------------------------------------------------- per site and the fleet

def _site_figures(tally: SiteTally | None, now: float, today: float) -> dict[str, Any]:
    if tally is None:
        tally = SiteTally(1, 1)
    hour, before = tally.minute.total(now, 60), tally.minute.total(now, 60, ago=60)
    series = [summed(tally.minute.series(now - SERIES_STEP_S * (SERIES_POINTS - 1 - i), 5), FIELDS)
              for i in range(SERIES_POINTS)]
    hours_today = max(1, int((now - today) // 3600) + 1)
    by_hour = tally.hours.series(now, min(hours_today, 25))
    return {"hour": hour, "before": before, "series": series, "lanes_hour": tally.lanes_minute.total(now, 60),
            "hours": by_hour, "lanes_by_hour": tally.lanes_hour.by_period(now, min(hours_today, 25)),
            "received": tally.received.today(today), "late": tally.late}


def _figures_view(f: dict[str, Any], *, lanes_by_hour: bool = False) -> dict[str, Any]:
    hour, before = f["hour"], f["before"]
    extra = {"lanes_by_hour": {str(k): v for k, v in sorted(f["lanes_by_hour"].items())}} if lanes_by_hour else {}
    return {**extra, "decided_hour": hour[DECIDED], "review_hour": hour[REVIEW],
            "review_share_hour": ratio(hour[REVIEW], hour[DECIDED]), "lanes_hour": f["lanes_hour"],
            "frames_hour": hour[FRAMES], "low_confidence_rate_hour": ratio(hour[LOW], hour[FRAMES]),
            "low_confidence_rate_prev_hour": ratio(before[LOW], before[FRAMES]),
            "low_confidence_series": [ratio(p[LOW], p[FRAMES]) for p in f["series"]],
            "alerts_hour": hour[ALERTS], "decided_by_hour": [h[DECIDED] for h in f["hours"]],
            "review_by_hour": [h[REVIEW] for h in f["hours"]], "late": f["late"]}


def _health_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts = {"stations": 0, "online": 0, "stale": 0, "offline": 0, "unknown": 0, "degraded": 0}
    for row in rows:
        counts["stations"] += 1
        counts[row["health"]] += 1
        counts["degraded"] += row["degraded"]
    return counts


def _merge(figures: list[dict[str, Any]]) -> dict[str, Any]:
    n = max((len(f["hours"]) for f in figures), default=0)
    return {"hour": summed((f["hour"] for f in figures), FIELDS),
            "before": summed((f["before"] for f in figures), FIELDS),
            "series": [summed((f["series"][i] for f in figures), FIELDS) for i in range(SERIES_POINTS)],
            "lanes_hour": _sum_dicts(f["lanes_hour"] for f in figures),
            "hours": [summed((f["hours"][i] for f in figures if len(f["hours"]) == n), FIELDS) for i in range(n)],
            "lanes_by_hour": _merge_by_hour(f["lanes_by_hour"] for f in figures), "received": _sum_dicts(f["received"] for f in figures),
            "late": sum(f["late"] for f in figures)}


def _merge_by_hour(tables: Iterable[dict[int, dict[str, int]]]) -> dict[int, dict[str, int]]:
    total: dict[int, dict[str, int]] = {}
    for table in tables:
        for start, counts in table.items():
            add_into(total.setdefault(start, {}), counts)
    return total


def _sum_dicts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        add_into(total, d)
    return total


def models_in_fleet(rows: list[dict[str, Any]], stations: dict[str, Any], shown: int) -> list[dict[str, Any]]:
    """How many stations report each model (name, version), most first; "no model" included."""
    counts: dict[tuple[str | None, str | None], list[int]] = {}
    for row in rows:
        model = (stations[row["key"]].status or {}).get("model") or {}
        name = model.get("name")
        entry = counts.setdefault((name, row["model_version"]), [0, 0])
        entry[0] += 1
        entry[1] += row["health"] == "online"
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1][0], str(kv[0])))
    return [{"name": name, "version": version, "stations": n, "online": on}
            for (name, version), (n, on) in ordered[:shown]]


PROGRESS_ACTIONS = ("canary", "rollout", "rollback", "halt")
EVENT_STATIONS_SHOWN = 20      # a rollout event as the overview and a card show it (``rollout_brief``)
EVENT_FIGURES_SHOWN = 20
EVENT_TEXT_CHARS = 2000


def shortened(text: str, limit: int) -> str:
    """``text``, cut to ``limit`` characters and saying so."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters in all)"


def _cut(text: str | None) -> str | None:
    return None if text is None else shortened(text, EVENT_TEXT_CHARS)


def rollout_brief(event: dict[str, Any] | None) -> dict[str, Any] | None:
    """A rollout event as the page shows it: the first stations named (``stations_total`` counts them all), its
    scalar figures (the page shows numbers and words, not per-station tables) and its reason cut to a few kB.

    A rollout over a thousand stations names each one, with their versions and failures: whole, the 10 events in
    the overview, pushed to every page at every change, were half a megabyte and the station card 50 kB.
    ``/api/state`` keeps the events whole."""
    if event is None:
        return None
    scalars = [(k, _cut(v) if isinstance(v, str) else v) for k, v in event["figures"].items()
               if v is None or isinstance(v, (bool, int, float, str))]
    return {**event, "reason": _cut(event["reason"]), "stations": event["stations"][:EVENT_STATIONS_SHOWN],
            "stations_total": len(event["stations"]), "figures": dict(scalars[:EVENT_FIGURES_SHOWN])}


def rollout_progress(events: Iterable[dict[str, Any]], rows: list[dict[str, Any]],
                     stations: dict[str, Any]) -> dict[str, Any] | None:
    """The newest canary/rollout/rollback/halt event's version and how many stations run it now, per site.

    The stations counted are those reporting a model of the same name (the fleet that model serves).
    """
    event = next((e for e in events if e["action"] in PROGRESS_ACTIONS), None)
    if event is None:
        return None
    name, version = event["model"]["name"], event["model"]["version"]
    fleet = [r for r in rows if ((stations[r["key"]].status or {}).get("model") or {}).get("name") == name]
    sites: dict[str, list[int]] = {}
    for row in fleet:
        entry = sites.setdefault(row["site"], [0, 0])
        entry[0] += row["model_version"] == version
        entry[1] += 1
    on = sum(v[0] for v in sites.values())
    return {"model": {"name": name, "version": version}, "action": event["action"], "ok": event["ok"],
            "reason": _cut(event["reason"]), "ts": event["ts"], "event_id": event["id"],
            "stations_on_target": on, "stations_with_model": len(fleet), "share": ratio(on, len(fleet)),
            "sites": [{"site": s, "on_target": v[0], "stations": v[1]} for s, v in sorted(sites.items())]}


def build_overview(*, rows: list[dict[str, Any]], stations: dict[str, Any], tally: FleetTally, now: float,
                   rollout: list[dict[str, Any]], limits: Any) -> dict[str, Any]:
    """The fleet summary the page opens on; its size depends on the sites, models and labels shown, not on
    the number of stations."""
    today = day_start(now, tally.tz)
    by_site: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_site.setdefault(row["site"], []).append(row)
    figures = {site: _site_figures(tally.sites.get(site), now, today) for site in by_site}
    sites = []
    for site, site_rows in by_site.items():
        reasons: dict[str, int] = {}
        for row in site_rows:
            for code in row["reasons"]:
                reasons[code] = reasons.get(code, 0) + 1
        sites.append({"site": site, **_health_counts(site_rows), "reasons": reasons,
                      **_figures_view(figures[site])})
    sites.sort(key=lambda s: (-s["degraded"], s["site"]))
    fleet = _merge(list(figures.values()))
    received = sorted(fleet["received"].items(), key=lambda kv: (-kv[1], kv[0]))
    reasons_total = {code: sum(s["reasons"].get(code, 0) for s in sites) for code in REASONS}
    return {"schema": "dashboard-overview.v1", "server_time": now,
            "fleet": {**_health_counts(rows), "reasons": reasons_total, "sites": len(sites),
                      **_figures_view(fleet, lanes_by_hour=True),
                      "hour_starts": [int((now // 3600 - len(fleet["hours"]) + 1 + i) * 3600)
                                      for i in range(len(fleet["hours"]))]},
            "sites": sites[:limits.sites_shown], "sites_hidden": max(0, len(sites) - limits.sites_shown),
            "models": models_in_fleet(rows, stations, limits.models_shown),
            "rollout": rollout_progress(rollout, rows, stations),
            "rollout_events": [rollout_brief(e) for e in rollout[:limits.events_shown]],
            "received_today": {"day_start": today, "total": sum(fleet["received"].values()),
                               "labels": [{"label": k, "count": n} for k, n in received[:limits.labels_shown]],
                               "labels_hidden": max(0, len(received) - limits.labels_shown)},
            "series_step_s": SERIES_STEP_S}


# ---------------------------------------------------------------- the station list

class QueryError(ValueError):
    """A station-list parameter out of range; the text names the parameter."""


def parse_query(params: dict[str, str]) -> dict[str, Any]:
    """``site``, ``state``, ``model``, ``q``, ``limit`` (1..500, default 50), ``offset`` (0..1,000,000)."""
    query: dict[str, Any] = {"site": params.get("site") or None, "state": params.get("state") or None,
                             "model": params.get("model") or None, "q": (params.get("q") or "").strip().lower()}
    if query["state"] is not None and query["state"] not in HEALTH_FILTERS:
        raise QueryError(f"parameter state: {query['state'][:40]!r} is not one of {', '.join(HEALTH_FILTERS)}")
    for name, default, low, high in (("limit", 50, 1, 500), ("offset", 0, 0, 1_000_000)):
        raw = params.get(name)
        try:
            value = default if raw in (None, "") else int(raw)
        except ValueError:
            raise QueryError(f"parameter {name}: {raw[:40]!r} is not an integer") from None
        if not low <= value <= high:
            raise QueryError(f"parameter {name}: {value} is not within {low}..{high}")
        query[name] = value
    for name in ("site", "model", "q"):
        if query[name] and len(query[name]) > 256:
            raise QueryError(f"parameter {name}: longer than 256 characters")
    return query


def select_rows(rows: list[dict[str, Any]], query: dict[str, Any]) -> dict[str, Any]:
    """One page of the (already ordered) rows that match ``query``, with the number that match."""
    def keep(row: dict[str, Any]) -> bool:
        if query["site"] and row["site"] != query["site"]:
            return False
        state = query["state"]
        if state and not (row["degraded"] if state == "degraded" else row["health"] == state):
            return False
        if query["model"] and row["model_version"] != query["model"]:
            return False
        return not query["q"] or query["q"] in row["key"].lower()

    matching = [row for row in rows if keep(row)]
    page = matching[query["offset"]:query["offset"] + query["limit"]]
    return {"total": len(matching), "offset": query["offset"], "limit": query["limit"], "stations": page,
            "query": {k: query[k] for k in ("site", "state", "model", "q")}}
