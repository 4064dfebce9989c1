"""The warehouse as the dashboard sees it, built only from MQTT messages.

``WarehouseState.ingest(topic, payload)`` takes one message as the broker
delivered it. Station messages are checked against the agent's JSON Schemas
(contract/schemas/mqtt/*.json) and central rollout events against the
``rollout-event.v1`` contract; a message that fails is counted and kept in a
short list of recent problems, never raised to the caller. Numbers are finite
going in and coming out: a message with NaN, Infinity or 1e999 (valid JSON to
most parsers) is refused like any malformed one, and a view that would still
hold a non-finite number (a sum or a gap of huge ones) shows null there, so the
page's JSON is always valid and one station never blanks the others. Messages are
deduplicated by their ``id`` (QoS 1 redelivers after a lost PUBACK), so a
redelivered result is counted once; a retained status or rollout event the broker
sends again at a reconnect is a duplicate of the one kept however many ids came
since. A refused message's reason is kept short (it is shown on every page).

A station is forgotten when its retained status is cleared (an empty retained
message on ``.../status``, the MQTT way to take a station out of service or to drop
the old name of a renamed one): it leaves the list, its card and the counts of
stations, and its open shipment with it.

The state is pure: the clock is an argument, so the stale rule and the views are
exact in tests. It is thread-safe: the MQTT thread writes, HTTP threads read.
Changes are collected as "dirty" marks that the server drains and pushes to the
browsers (``drain_changes``).
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime as dt
import logging
import math
import statistics
import threading
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from central.dashboard.overview import (
    FleetTally,
    build_overview,
    degraded_reasons,
    model_version,
    rollout_brief,
    row_order,
    select_rows,
    shortened,
    station_row,
    station_tally_view,
)
from central.dashboard.shipments import ShipmentBook
from contract.messages import CENTRAL_SITE, ENGINES, ROLLOUT_SCHEMA, checker, dumps_finite, loads_finite
from contract.messages import DASHBOARD_KINDS as STATION_KINDS

RECEIPT_KIND = "receipt"                      # receipt.v1: kept per shipment (shipments.py), not per station
FOLLOWED_KINDS = STATION_KINDS + (RECEIPT_KIND,)

log = logging.getLogger(__name__)

ROLLOUT_ACTIONS = ("gate", "publish", "canary", "rollout", "rollback", "halt")
MAX_PAYLOAD_BYTES = 1 << 20          # an alert with its thumbnail is a few KB; anything near this is wrong
MAX_THUMBNAIL_B64 = 96 * 1024        # alert thumbnails kept for the page (128 px JPEG: ~5 KB)
LATENCY_STAGES = ("queue", "preprocess", "inference", "decide", "publish", "capture_to_ack")
MAX_REASON_CHARS = 500               # a refused message's reason as kept and logged (a schema engine may quote a
#                                      whole 1 MiB value or key: 20 kept, 5 in every overview push)
MAX_TOPIC_CHARS = 200
STATUS_OPEN_CHARS = 4096             # last_thresholds_update.applied kept up to this much JSON (status_kept)
CLOCK_SAMPLES = 6                    # live stats whose arrival - ts gives a station's clock offset (the least)


class MessageError(ValueError):
    """A message the dashboard cannot use; the text names the topic and the field."""


@dataclass(frozen=True)
class StateLimits:
    """How much the dashboard keeps and when a quiet station counts as stale."""

    recent: int = 20                 # results and decisions kept per station
    alerts: int = 10                 # QC alerts kept per station
    history: int = 120               # stats points per station (the low-confidence chart)
    rollout_events: int = 50         # central rollout events kept
    malformed_kept: int = 20         # recent malformed messages shown on the page
    seen_ids: int = 100_000          # message ids remembered for deduplication (the whole fleet's newest)
    station_ids: int = 256           # ... and each station's own newest (its resends after a link cut: the agent's
    #                                  in-flight window, mqtt.max_inflight, 64 by default)
    stale_factor: float = 3.0        # online, but no stats for this many stats intervals: stale
    stale_min_s: float = 5.0         # ... and never sooner than this
    default_stats_interval_s: float = 10.0   # the agent's default, until two stats show the real one
    # the degraded rule (central/dashboard/overview.py, docs/dashboard.md)
    outbox_backlog: int = 1000       # outbox depth at or over this
    low_confidence_rate: float = 0.25   # low-confidence share of the rolling hour's frames at or over this ...
    low_confidence_min_frames: int = 200    # ... over at least this many frames
    qc_alerts: int = 1               # QC alerts in the rolling hour
    # what the overview keeps and shows (bounded whatever the fleet size)
    lanes_kept: int = 32             # distinct lanes counted per site (more: "(other)")
    labels_kept: int = 500           # distinct labels counted per site per day
    sites_shown: int = 100
    models_shown: int = 20
    labels_shown: int = 60
    events_shown: int = 10
    # shipments (receipt.v1, central/dashboard/shipments.py)
    shipments_open_kept: int = 200   # open shipments kept in full, refs and all (the newest receipts)
    shipments_open_counted: int = 5000   # open shipments counted and kept brief (overview, station cards)
    shipments_closed_kept: int = 50  # closed shipments kept (the most recently closed)
    shipments_shown: int = 10        # open shipments in the overview's panel
    shipments_closed_shown: int = 5  # recently closed shipments in it


# ---------------------------------------------------------------- validation

def parse_json(topic: str, payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError(f"{topic}: payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES} byte limit")
    try:
        body = loads_finite(payload)
    except (UnicodeDecodeError, ValueError) as exc:       # NaN, Infinity and 1e999 included
        raise MessageError(f"{topic}: not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise MessageError(f"{topic}: expected a JSON object, got {type(body).__name__}")
    return body


def validate_station_message(topic: str, kind: str, site: str, station: str, body: dict[str, Any],
                             engine: str = "fastjsonschema") -> None:
    expected = f"{kind}.v1"
    if body.get("schema") != expected:
        raise MessageError(f"{topic}: field schema: {body.get('schema')!r}, this dashboard reads {expected}")
    checker(expected, engine).check(topic, body, MessageError)
    if (body["site"], body["station"]) != (site, station):
        raise MessageError(f"{topic}: fields site/station: {body['site']}/{body['station']} "
                           f"does not match the topic's {site}/{station}")


def validate_rollout_event(topic: str, body: dict[str, Any], engine: str = "fastjsonschema") -> None:
    if body.get("schema") != ROLLOUT_SCHEMA:
        raise MessageError(f"{topic}: field schema: {body.get('schema')!r}, this dashboard reads {ROLLOUT_SCHEMA}")
    checker(ROLLOUT_SCHEMA, engine).check(topic, body, MessageError)


def non_finite_at(value: Any, where: str = "") -> str | None:
    """The path (``/stats/fps_total``) of the first NaN or infinity in ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "/")
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite_at(item, f"{where}/{key}")
        if found:
            return found
    return None


def finite(value: Any, what: str) -> Any:
    """``value`` with every NaN or infinity replaced by None (logged, naming ``what`` and the path)."""
    try:
        dumps_finite(value)
        return value
    except ValueError:
        pass
    log.warning("%s: non-finite number at %s shown as null", what, non_finite_at(value))

    def clean(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {k: clean(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item

    return clean(value)


# ---------------------------------------------------------------- per-station views

def _top_k(items: list[dict[str, Any]], n: int = 3) -> list[dict[str, Any]]:
    return [{"label": t["label"], "p": t["p"]} for t in items[:n]]


def result_view(body: dict[str, Any]) -> dict[str, Any]:
    """A product result (an item in view, or presence off); ``present: false`` results never get here."""
    return {"id": body["id"], "seq": body["seq"], "ts": body["ts"], "camera": body["camera"],
            "frame_seq": body["frame_seq"], "label": body["label"], "confidence": body["confidence"],
            "low_confidence": body["low_confidence"], "reasons": list(body["reasons"]),
            "model_version": body["model"]["version"], "top_k": _top_k(body["top_k"]),
            "latency_ms": dict(body["latency_ms"]), "crop_box": body.get("crop_box")}


def decision_view(body: dict[str, Any]) -> dict[str, Any]:
    return {"id": body["id"], "seq": body["seq"], "ts": body["ts"], "camera": body["camera"],
            "item_seq": body["item_seq"], "label": body["label"], "confidence": body["confidence"],
            "agreement": body["agreement"], "frames": body["frames"], "lane": body["lane"],
            "low_confidence": body["low_confidence"], "reasons": list(body["reasons"]),
            "model_version": (body.get("model") or {}).get("version")}


def _thumbnail(b64: str) -> str | None:
    """The alert's JPEG thumbnail when it is one (base64 of bytes starting with the JPEG SOI marker)."""
    if len(b64) > MAX_THUMBNAIL_B64:
        return None
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    return b64 if raw[:2] == b"\xff\xd8" else None


def alert_view(body: dict[str, Any]) -> dict[str, Any]:
    evidence = body["evidence"]
    return {"id": body["id"], "seq": body["seq"], "ts": body["ts"], "camera": body["camera"],
            "defect": body["defect"], "confidence": body["confidence"], "frame_seq": body["frame_seq"],
            "model_version": body["model"]["version"], "top_k": _top_k(evidence["top_k"]),
            "source_ref": evidence.get("source_ref"), "thumbnail_jpeg_b64": _thumbnail(evidence["thumbnail_jpeg_b64"])}


def stats_view(body: dict[str, Any]) -> dict[str, Any]:
    outbox = body["outbox"]
    return {"ts": body["ts"], "fps": dict(body["fps"]), "fps_total": round(sum(body["fps"].values()), 3),
            "frames_dropped": dict(body["frames_dropped"]),
            "frames_dropped_total": int(sum(body["frames_dropped"].values())),
            "camera_reconnects": dict(body.get("camera_reconnects", {})),
            "latency": {stage: dict(body["latency"][stage]) for stage in LATENCY_STAGES if stage in body["latency"]},
            "queue_depths": dict(body["queue_depths"]),
            "outbox": {"depth": outbox["depth"], "bytes": outbox["bytes"], "dropped": dict(outbox["dropped"]),
                       "dropped_total": int(sum(outbox["dropped"].values()))},
            "low_confidence_rate": body["low_confidence_rate"], "frames_uploaded": body.get("frames_uploaded"),
            "frames_classified": body.get("frames_classified"),
            "frames_low_confidence": body.get("frames_low_confidence"), "frames_empty": body.get("frames_empty"),
            "inference_errors": body.get("inference_errors"), "model_version": body["model_version"]}


def status_kept(body: dict[str, Any]) -> dict[str, Any]:
    """What the dashboard keeps of a status: what it shows, bounded. status.v1 leaves
    ``last_model_update.running`` and ``last_thresholds_update.applied`` open objects, and ``artifact_choice`` may
    hold 256 skip reasons of 16 kB: kept whole, one status within the 1 MiB limit held 10 MB for its station and
    made its card 1 MB. Kept: ``running``'s name and version (what the agent sends), ``applied`` up to
    ``STATUS_OPEN_CHARS`` of JSON (else null, with ``applied_chars`` saying how much was left off); not kept: the
    fields no view shows (``artifact_choice``, ``last_capture_empty``, ``last_expect_update``)."""
    kept = {k: v for k, v in body.items() if k not in ("artifact_choice", "last_capture_empty", "last_expect_update")}
    update = kept.get("last_model_update")
    if update and isinstance(update.get("running"), dict):
        running = update["running"]
        kept["last_model_update"] = {**update, "running": {k: shortened(running[k], 256) for k in ("name", "version")
                                                           if isinstance(running.get(k), str)}}
    thresholds = kept.get("last_thresholds_update")
    if thresholds and thresholds.get("applied") is not None:
        size = len(dumps_finite(thresholds["applied"]))
        if size > STATUS_OPEN_CHARS:
            kept["last_thresholds_update"] = {**thresholds, "applied": None, "applied_chars": size}
    return kept


def rollout_view(body: dict[str, Any], received_at: float) -> dict[str, Any]:
    return {"id": body["id"], "ts": body["ts"], "received_at": received_at,
            "model": {"name": body["model"]["name"], "version": body["model"]["version"]},
            "action": body["action"], "ok": body["ok"], "reason": body.get("reason"),
            "stations": list(body["stations"]), "figures": body.get("figures") or {}}


def interval_counts(station: "Station", stats: dict[str, Any]) -> tuple[int, int, str]:
    """Low-confidence and classified frames since the station's previous stats: (low, frames, where from).

    From the station's own cumulative counters when this and the previous stats carry them (exact, even
    with ``publish_results`` off); else from the low_confidence flags of the results received in between.
    When a status said the agent started after the previous stats (``_apply_status``), its counters count from
    zero. A counter that went down, or more low-confidence frames than frames, means the agent restarted
    unseen: that interval has no stats-based figure (a difference across a restart is no count: it made a
    low-confidence rate of 130%).
    """
    low_results, all_results = station.window
    station.window = [0, 0]
    now = (stats.get("frames_low_confidence"), stats.get("frames_classified"))
    before, station.counted = station.counted, now if None not in now else None
    if (before is not None and None not in now and now[1] >= before[1] and now[0] >= before[0]
            and now[0] - before[0] <= now[1] - before[1]):
        return now[0] - before[0], now[1] - before[1], "stats"
    return low_results, all_results, "results"


@dataclass
class Station:
    """Everything known about one station; ``view`` is what the API and the page get."""

    site: str
    station: str
    limits: StateLimits
    state: str = "unknown"               # online | offline | unknown (no status seen yet)
    status: dict[str, Any] | None = None
    status_received_at: float | None = None
    online_since: float | None = None    # receipt time of the status that said online (the stale rule)
    status_retained: bool = False        # the status came as the broker's retained copy (at a (re)subscribe)
    stats: dict[str, Any] | None = None
    stats_received_at: float | None = None
    stale: bool = False
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in FOLLOWED_KINDS} | {"low_confidence": 0})
    results: deque = field(init=False)
    decisions: deque = field(init=False)
    alerts: deque = field(init=False)
    history: deque = field(init=False)
    stats_ts: deque = field(default_factory=lambda: deque(maxlen=6))
    window: list[int] = field(default_factory=lambda: [0, 0])   # [low-confidence, all] results since the last stats
    counted: tuple[int, int] | None = None   # the last stats' cumulative (frames_low_confidence, frames_classified)
    empty_frames: int = 0                    # present:false results received (no item in view)
    last_message_at: float | None = None     # receipt time of its newest message of any kind
    clock_offsets: deque = field(default_factory=lambda: deque(maxlen=CLOCK_SAMPLES))   # arrival - ts, live stats
    recent_ids: array = field(default_factory=lambda: array("q"))   # hashes of its newest ids (limits.station_ids)
    recent_next: int = 0                     # where the next one goes once ``recent_ids`` is full (a ring)

    def __post_init__(self) -> None:
        self.results = deque(maxlen=self.limits.recent)
        self.decisions = deque(maxlen=self.limits.recent)
        self.alerts = deque(maxlen=self.limits.alerts)
        self.history = deque(maxlen=self.limits.history)

    def seen(self, message_id: str) -> bool:
        return hash(message_id) in self.recent_ids        # a C scan of 256 machine words: a microsecond

    def remember(self, message_id: str) -> None:
        """Keep ``message_id`` among the station's newest: as its 64-bit hash in a flat array, 2 kB a station (a
        set of the strings took 44 kB)."""
        kept = self.limits.station_ids
        if len(self.recent_ids) < kept:
            self.recent_ids.append(hash(message_id))
        elif kept > 0:
            self.recent_ids[self.recent_next] = hash(message_id)
            self.recent_next = (self.recent_next + 1) % kept

    @property
    def key(self) -> str:
        return f"{self.site}/{self.station}"

    def stats_interval_s(self) -> float:
        """The median gap between the station's last stats (its own clock), else the agent's default."""
        gaps = [b - a for a, b in zip(self.stats_ts, list(self.stats_ts)[1:]) if b > a]
        return statistics.median(gaps) if gaps else self.limits.default_stats_interval_s

    def stale_after_s(self) -> float:
        return max(self.limits.stale_factor * self.stats_interval_s(), self.limits.stale_min_s)

    def is_stale(self, now: float) -> bool:
        """Online, yet no stats for a few stats intervals: the process hangs or its uplink is cut."""
        if self.state != "online":
            return False
        last = max(t for t in (self.stats_received_at, self.online_since, self.status_received_at, 0.0)
                   if t is not None)
        return now - last > self.stale_after_s()

    def cameras_up(self) -> dict[str, bool]:
        """Per camera: connected by the last status, or delivering frames by stats newer than it.

        The agent publishes its status when it connects and on a command, not when a camera (re)connects,
        so a camera that opened after the status still shows "false" there; its frame rate tells.
        """
        up = dict((self.status or {}).get("cameras", {}))
        if self.stats is not None and self.state == "online" and (self.stats_received_at or 0) >= (
                self.status_received_at or 0):
            for camera, fps in self.stats["fps"].items():
                up[camera] = up.get(camera, False) or fps > 0
        return up

    @property
    def health(self) -> str:
        return "stale" if self.stale else self.state

    def clock_offset_s(self) -> float | None:
        """How far the station's clock is behind the dashboard's: arrival minus ``ts`` of its live stats, the
        smallest of the last few (stats go out at once, QoS 0, but the agent holds its newest few while it is
        offline and sends them late at its reconnect: lateness only adds to the difference); None before any."""
        return min(self.clock_offsets) if self.clock_offsets else None

    def status_at(self) -> float | None:
        """When the station sent its status, on the dashboard's clock: the arrival of a live one; for the broker's
        retained copy (the one a (re)started dashboard gets first, maybe hours old), the status's own ``ts``,
        moved by the station's clock offset once its live stats have shown it, and never later than the copy
        arrived (a clock ahead cannot put it in the future). The arrival time made a station up for days "up
        since the restart" and an offline one "offline since" the restart."""
        if self.status_received_at is None or self.status is None:
            return self.status_received_at
        if not self.status_retained:
            return self.status_received_at
        return min(self.status_received_at, self.status["ts"] + (self.clock_offset_s() or 0.0))

    def status_time_from(self) -> str | None:
        """Where ``status_at`` comes from: ``arrival``, ``station clock`` or ``station clock, offset by stats``."""
        if self.status is None:
            return None
        if not self.status_retained:
            return "arrival"
        return "station clock, offset by stats" if self.clock_offsets else "station clock"

    def copy_for_view(self) -> "Station":
        """A copy that later messages do not change, taken under the state's lock so that ``view`` (the slow
        part at a thousand stations) can run outside it. Shallow: the status, stats and the kept views are
        replaced by a new message, never changed in place; the containers that are changed are copied."""
        twin = copy.copy(self)
        for name in ("results", "decisions", "alerts", "history", "stats_ts", "clock_offsets"):
            setattr(twin, name, copy.copy(getattr(self, name)))
        twin.counts, twin.window = dict(self.counts), list(self.window)
        return twin

    def view(self, now: float) -> dict[str, Any]:
        status = self.status or {}
        online = self.state == "online"
        uptime = status.get("uptime_s")
        status_at = self.status_at()
        return {
            "key": self.key, "site": self.site, "station": self.station, "role": status.get("role"),
            "health": self.health, "state": self.state, "stale": self.stale,
            "stale_after_s": round(self.stale_after_s(), 3),
            "stats_interval_s": round(self.stats_interval_s(), 3),
            "agent_version": status.get("agent_version"),
            "status_ts": status.get("ts"), "status_received_at": self.status_received_at,
            "status_at": status_at, "status_time_from": self.status_time_from(),
            "uptime_s": uptime if online else None,
            "uptime_now_s": round(uptime + now - status_at, 3)
            if online and uptime is not None and status_at is not None else None,
            "model": status.get("model"),
            "cameras": status.get("cameras", {}),
            "cameras_up": self.cameras_up(),
            "last_model_update": status.get("last_model_update"),
            "last_thresholds_update": status.get("last_thresholds_update"),
            "stats": self.stats, "stats_received_at": self.stats_received_at,
            "history": list(self.history),
            "results": list(self.results), "decisions": list(self.decisions), "alerts": list(self.alerts),
            "counts": dict(self.counts), "empty_frames": self.empty_frames,
        }


# ---------------------------------------------------------------- the warehouse

@dataclass
class Counters:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    malformed: int = 0
    ignored: int = 0
    malformed_by_kind: dict[str, int] = field(default_factory=dict)
    # exceptions in the MQTT client's callbacks by callback name (contract.broker.guard_hooks logs and counts each,
    # and paho's network thread goes on): read from the client when asked, the feed hands over how (/healthz)
    mqtt_callback_errors: Callable[[], dict[str, int]] = dict

    def as_dict(self) -> dict[str, Any]:
        return {"received": self.received, "applied": self.applied, "duplicates": self.duplicates,
                "malformed": self.malformed, "ignored": self.ignored,
                "malformed_by_kind": dict(self.malformed_by_kind)}


class WarehouseState:
    """Stations, their live data and the central rollout events, from ``ingest``ed MQTT messages."""

    def __init__(self, *, topic_root: str = "inventory", limits: StateLimits | None = None,
                 clock: Callable[[], float] | None = None, engine: str = "fastjsonschema",
                 tz: dt.tzinfo | None = None) -> None:
        """``tz``: where "today" starts for the overview's daily counts (None: the local time zone)."""
        import time

        if engine not in ENGINES:
            raise ValueError(f"schema engine {engine!r} is not one of {', '.join(ENGINES)}")
        self.engine = engine
        self.topic_root = topic_root.rstrip("/")
        self.limits = limits or StateLimits()
        self.clock = clock or time.time
        self.stations: dict[str, Station] = {}
        self.rollout: deque[dict[str, Any]] = deque(maxlen=self.limits.rollout_events)
        self.rollout_by_station: dict[str, dict[str, Any]] = {}
        self.counters = Counters()
        self.malformed: deque[dict[str, Any]] = deque(maxlen=self.limits.malformed_kept)
        self.broker: dict[str, Any] = {"connected": False, "detail": "not connected yet", "since": None}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._new_rollout: list[dict[str, Any]] = []
        self._meta_dirty = False
        self.version = 0
        self.shipments = ShipmentBook(open_kept=self.limits.shipments_open_kept,
                                      open_counted=self.limits.shipments_open_counted,
                                      closed_kept=self.limits.shipments_closed_kept)
        self.tally = FleetTally(lanes_kept=self.limits.lanes_kept, labels_kept=self.limits.labels_kept, tz=tz)

    # ------------------------------------------------------------ input

    def ingest(self, topic: str, payload: bytes, received_at: float | None = None, *, retained: bool = False) -> str:
        """Apply one message; returns "applied", "duplicate", "malformed" or "ignored". Never raises on bad input.

        ``retained``: the broker sent its stored copy (the MQTT retain flag on delivery, set only for what a
        subscription gets when it is made), so the message is older than its arrival."""
        now = self.clock() if received_at is None else received_at
        with self._lock:
            self.counters.received += 1
            self._meta_dirty = True
            try:
                outcome = self._apply(topic, payload, now, retained)
            except MessageError as exc:
                self._malformed(topic, str(exc), now)
                return "malformed"
            except Exception as exc:   # noqa: BLE001 - a message must never take the dashboard down
                self._malformed(topic, f"{topic}: {type(exc).__name__}: {exc}", now, unexpected=exc)
                return "malformed"
            if outcome == "applied":
                self.counters.applied += 1
                self.version += 1
            elif outcome == "duplicate":
                self.counters.duplicates += 1
            else:
                self.counters.ignored += 1
            return outcome

    def set_broker(self, connected: bool, detail: str) -> None:
        with self._lock:
            self.broker = {"connected": connected, "detail": detail, "since": self.clock()}
            self._meta_dirty = True

    def _apply(self, topic: str, payload: bytes, now: float, retained: bool = False) -> str:
        parts = topic.split("/")
        root = self.topic_root.split("/")
        if parts[:len(root)] != root:
            return "ignored"
        rest = parts[len(root):]
        if rest == [CENTRAL_SITE, "rollout"]:
            return self._apply_rollout(topic, parse_json(topic, payload), now)
        if len(rest) != 3 or rest[2] not in FOLLOWED_KINDS or rest[0] == CENTRAL_SITE:
            return "ignored"
        site, station_id, kind = rest
        if kind == "status" and not payload:     # its retained status cleared: the station is out of service
            return self._forget(f"{site}/{station_id}")
        body = parse_json(topic, payload)
        validate_station_message(topic, kind, site, station_id, body, self.engine)
        where = non_finite_at(stats_view(body)) if kind == "stats" else None
        if where:              # finite parts whose sum is not (fps 1e308 on two cameras): refused, nothing kept
            raise MessageError(f"{topic}: field {where.lstrip('/')}: not a finite number")
        if self._status_kept(f"{site}/{station_id}", kind, body) or self._seen_before(body["id"],
                                                                                     f"{site}/{station_id}"):
            return "duplicate"
        station = self._station(site, station_id)
        station.remember(body["id"])
        self._dirty.add(station.key)
        if kind == RECEIPT_KIND:
            self.shipments.on_receipt(body, now)     # an older seq than the one kept changes nothing
        elif kind in ("status", "stats"):
            getattr(self, f"_apply_{kind}")(station, body, now, retained)
        else:
            getattr(self, f"_apply_{kind}")(station, body, now)
        heard = station.status_at() if kind == "status" else now      # a retained status is as old as it says
        station.last_message_at = max(station.last_message_at or heard, heard)
        station.counts[kind] += 1
        return "applied"

    def _seen_before(self, message_id: str, key: str | None = None) -> bool:
        """Whether ``message_id`` came already: among the fleet's newest ids, or among the newest of station ``key``.
        The fleet's window alone lasts a minute or two at a thousand stations, while a station whose link was cut
        resends its unacknowledged messages when it is back, minutes later: they were counted twice."""
        station = self.stations.get(key) if key is not None else None
        if message_id in self._seen or (station is not None and station.seen(message_id)):
            return True
        self._seen[message_id] = None
        if len(self._seen) > self.limits.seen_ids:
            self._seen.popitem(last=False)
        return False

    def _status_kept(self, key: str, kind: str, body: dict[str, Any]) -> bool:
        """Whether ``body`` is the status the station already shows: the broker resends the retained status at
        every reconnect, by then long out of the dedupe window at a thousand stations (100,000 ids: seconds).
        Applied again, it restarted the uptime and moved "offline since" to the reconnect."""
        station = self.stations.get(key)
        return kind == "status" and station is not None and (station.status or {}).get("id") == body["id"]

    def _forget(self, key: str) -> str:
        """Drop a station whose retained status was cleared, with its counts and open shipment; what it decided
        stays in its site's figures."""
        station = self.stations.pop(key, None)
        if station is None:
            return "ignored"
        self.tally.stations.pop(key, None)
        self.rollout_by_station.pop(key, None)
        dropped = self.shipments.forget_station(key)
        self._dirty.add(key)
        log.info("station %s forgotten: its retained status was cleared%s", key,
                 f" (its open shipment {dropped} no longer counted)" if dropped else "")
        return "applied"

    def _station(self, site: str, station_id: str) -> Station:
        key = f"{site}/{station_id}"
        if key not in self.stations:
            self.stations[key] = Station(site, station_id, self.limits)
            log.info("station %s appeared", key)
        return self.stations[key]

    def _apply_status(self, station: Station, body: dict[str, Any], now: float, retained: bool = False) -> None:
        was = station.state
        station.status = status_kept(body)
        station.state = body["state"]
        station.status_received_at = now
        station.status_retained = retained
        sent_at = station.status_at()
        if station.state == "online" and (was != "online" or station.online_since is None):
            station.online_since = now
        if station.state != "online":
            station.online_since = None
            station.stale = False
        uptime = body.get("uptime_s")
        if (station.state == "online" and uptime is not None and station.stats_received_at is not None
                and 0 <= uptime < sent_at - station.stats_received_at):      # status.v1 sets no minimum
            station.counted = (0, 0)       # the agent started after its last stats: its counters start from zero
        update = body.get("last_model_update")
        if update and not update["ok"]:
            log.warning("station %s rejected a model update: %s", station.key,
                        shortened(update["reason"] or "no reason given", MAX_REASON_CHARS))
        if was != station.state:
            log.info("station %s is %s", station.key, station.state)

    def _apply_result(self, station: Station, body: dict[str, Any], now: float) -> None:
        if body.get("present") is False:
            # An empty belt (decisions.empty_frames: publish): counted, but no product and no confidence.
            station.empty_frames += 1
            return
        station.results.appendleft(result_view(body))
        station.window[1] += 1
        if body["low_confidence"]:
            station.window[0] += 1
            station.counts["low_confidence"] += 1

    def _apply_decision(self, station: Station, body: dict[str, Any], now: float) -> None:
        station.decisions.appendleft(decision_view(body))
        self.tally.on_decision(station.site, station.key, (station.status or {}).get("role"), body, now)

    def _apply_alert(self, station: Station, body: dict[str, Any], now: float) -> None:
        station.alerts.appendleft(alert_view(body))
        self.tally.on_alert(station.site, station.key, body, now)

    def _apply_stats(self, station: Station, body: dict[str, Any], now: float, retained: bool = False) -> None:
        station.stats = stats_view(body)
        station.stats_received_at = now
        if not retained:           # a stats message is never retained; one that is says nothing of the clock
            station.clock_offsets.append(now - body["ts"])
        station.stats_ts.append(body["ts"])
        low, frames, source = interval_counts(station, body)
        rate = round(low / frames, 4) if frames else None
        self.tally.on_frames(station.site, station.key, float(body["ts"]), low, frames, now)
        station.history.append({"ts": body["ts"], "low_confidence_rate": body["low_confidence_rate"],
                                "recent_low_confidence_rate": rate, "recent_frames": frames, "recent_source": source,
                                "fps_total": station.stats["fps_total"], "outbox_depth": body["outbox"]["depth"]})
        if station.stale:
            station.stale = False
            log.info("station %s sends stats again", station.key)

    def _apply_rollout(self, topic: str, body: dict[str, Any], now: float) -> str:
        validate_rollout_event(topic, body, self.engine)
        # the retained event comes again at every reconnect, maybe out of the dedupe window: listed once
        if any(event["id"] == body["id"] for event in self.rollout) or self._seen_before(body["id"]):
            return "duplicate"
        event = rollout_view(body, now)
        self.rollout.appendleft(event)
        self._new_rollout.append(event)
        for key in event["stations"]:
            self.rollout_by_station[key] = event
            if key in self.stations:
                self._dirty.add(key)
        (log.info if event["ok"] else log.warning)("rollout %s %s %s: %s", event["action"],
                                                   shortened(event["model"]["version"], MAX_TOPIC_CHARS),
                                                   "ok" if event["ok"] else "FAILED",
                                                   shortened(event["reason"] or "-", MAX_REASON_CHARS))
        return "applied"

    def _malformed(self, topic: str, reason: str, now: float, unexpected: Exception | None = None) -> None:
        """Count and keep a refused message; ``unexpected``: an error no check named (logged with its traceback)."""
        self.counters.malformed += 1
        kind = topic.rsplit("/", 1)[-1]
        self.counters.malformed_by_kind[kind] = self.counters.malformed_by_kind.get(kind, 0) + 1
        topic, reason = shortened(topic, MAX_TOPIC_CHARS), shortened(reason, MAX_REASON_CHARS)
        self.malformed.appendleft({"at": now, "topic": topic, "reason": reason})
        n = self.counters.malformed
        if n <= 20 or n % 100 == 0:      # a flood of bad messages must not flood the log
            if unexpected is not None:
                log.error("malformed message #%d ignored, unexpected error while applying it: %s", n, reason,
                          exc_info=unexpected)
            else:
                log.warning("malformed message #%d ignored: %s", n, reason)

    # ------------------------------------------------------------ time

    def refresh(self, now: float | None = None) -> list[str]:
        """Re-evaluate the stale rule; returns the stations whose health changed."""
        now = self.clock() if now is None else now
        changed = []
        with self._lock:
            for station in self.stations.values():
                stale = station.is_stale(now)
                if stale != station.stale:
                    station.stale = stale
                    changed.append(station.key)
                    self._dirty.add(station.key)
                    (log.warning if stale else log.info)(
                        "station %s is %s", station.key,
                        f"stale (no stats for over {station.stale_after_s():.1f} s)" if stale else "fresh again")
        return changed

    # ------------------------------------------------------------ output

    def station_view(self, station: Station, now: float) -> dict[str, Any]:
        view = station.view(now)
        view["rollout"] = self.rollout_by_station.get(station.key)
        return finite(view, f"station {station.key}")

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The whole state as JSON-ready data (``/api/state``)."""
        now = self.clock() if now is None else now
        with self._lock:     # copies only: building the views of a thousand stations held it for 0.2-0.5 s
            head = {"schema": "dashboard-state.v1", "server_time": now, "version": self.version,
                    "topic_root": self.topic_root, "broker": dict(self.broker),
                    "counters": self.counters.as_dict(), "malformed": list(self.malformed)}
            stations = [(self.stations[k].copy_for_view(), self.rollout_by_station.get(k))
                        for k in sorted(self.stations)]
            tail = {"rollout": list(self.rollout), "shipments": self.shipments.listing()}
        views = []
        for station, rollout in stations:
            view = station.view(now)
            view["rollout"] = rollout
            views.append(finite(view, f"station {station.key}"))
        return {**head, "stations": views, **tail}

    def health(self) -> dict[str, Any]:
        """The broker connection and the message counters: cheap, for /healthz and monitoring."""
        callback_errors = self.counters.mqtt_callback_errors()      # the client's counter: not under our lock
        with self._lock:
            return {"broker_connected": self.broker["connected"], "stations": len(self.stations),
                    "counters": {**self.counters.as_dict(), "mqtt_callback_errors": callback_errors}}

    def rows(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every station's list row, degraded first (``overview.row_order``)."""
        now = self.clock() if now is None else now
        with self._lock:
            return self._rows(now)

    def _rows(self, now: float) -> list[dict[str, Any]]:
        rows = [station_row(st, self.tally.stations.get(key), now, self.limits) for key, st in self.stations.items()]
        rows.sort(key=row_order)
        return rows

    def overview(self, now: float | None = None, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The fleet summary (``/api/overview``): per site, models, rollout progress, received labels today."""
        now = self.clock() if now is None else now
        with self._lock:
            rows = self._rows(now) if rows is None else rows
            body = build_overview(rows=rows, stations=self.stations, tally=self.tally, now=now,
                                  rollout=list(self.rollout), limits=self.limits)
            body.update(version=self.version, topic_root=self.topic_root, broker=dict(self.broker),
                        counters=self.counters.as_dict(), malformed=list(self.malformed)[:5],
                        shipments=self.shipments.overview(self.limits.shipments_shown,
                                                          self.limits.shipments_closed_shown))
            return finite(body, "the overview")

    def shipment_list(self) -> dict[str, Any]:
        """``/api/shipments``: open shipments first (newest receipt first), then the recently closed."""
        with self._lock:
            return finite(self.shipments.listing(), "the shipments")

    def station_page(self, query: dict[str, Any], now: float | None = None,
                     rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """One page of the station list (``/api/stations``); ``query`` from ``overview.parse_query``."""
        return select_rows(self.rows(now) if rows is None else rows, query)

    def station_card(self, key: str, now: float | None = None) -> dict[str, Any] | None:
        """One station's whole view plus its degraded reasons and rolling-hour figures; None if unknown."""
        now = self.clock() if now is None else now
        with self._lock:
            station = self.stations.get(key)
            if station is None:
                return None
            tally = self.tally.stations.get(key)
            hour = tally.hour(now) if tally else [0] * 5
            reasons = degraded_reasons(station, hour, self.limits)
            view = station.view(now)
            view.update(rollout=rollout_brief(self.rollout_by_station.get(key)), degraded=bool(reasons),
                        reasons=reasons, model_version=model_version(station), tally=station_tally_view(tally, now),
                        shipment=self.shipments.open_at(key))
            return finite(view, f"station {key}")

    def drain_changes(self, now: float | None = None, *, watched: Callable[[], bool] = lambda: True) -> "Changes":
        """What changed since the last call: the stations, whether rollout events or counters did.

        When ``watched()`` says nobody is watching, the changes are forgotten. It is asked under the state's
        lock, which a new watcher's first views also take: a change is either in them or reported after.
        """
        now = self.clock() if now is None else now
        self.refresh(now)
        with self._lock:
            changes = Changes(stations=self._dirty, rollout=bool(self._new_rollout), meta=self._meta_dirty)
            self._new_rollout, self._dirty, self._meta_dirty = [], set(), False
            return changes if watched() else Changes()


@dataclass
class Changes:
    """What ``drain_changes`` found: the keys of the stations that changed, and whether anything else did."""

    stations: set[str] = field(default_factory=set)
    rollout: bool = False
    meta: bool = False

    def __bool__(self) -> bool:
        return bool(self.stations) or self.rollout or self.meta
