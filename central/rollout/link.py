"""Stations over MQTT: every station's retained status, the chosen stations' stats, ``cmd/model`` out."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from central.rollout.remote import RemoteBundle
from contract.broker import BrokerSettings
from contract.events import RolloutError, mqtt_connect, mqtt_publish
from contract.messages import CENTRAL_SITE, checker, loads_finite, station_topic

log = logging.getLogger(__name__)

RECONNECT_WAIT_S = 30.0     # how long a command waits for a lost broker connection to come back before it is not sent
RECONNECT_MAX_DELAY_S = 5   # paho's retry delay doubles up to this (its default, 120 s, outlasts an update's wait)


class CommandPending(RolloutError):
    """``cmd/model`` handed to the MQTT client but not acknowledged: the connection dropped, and the client sends
    it again once it reconnects. The station may still get it: it is waited for as one that was sent."""


@dataclass
class StationView:
    status: dict[str, Any] | None = None
    status_at: float = 0.0
    stats: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    @property
    def online(self) -> bool:
        return bool(self.status) and self.status.get("state") == "online"

    @property
    def version(self) -> str | None:
        return ((self.status or {}).get("model") or {}).get("version")

    @property
    def model_name(self) -> str | None:
        return ((self.status or {}).get("model") or {}).get("name")

    @property
    def model(self) -> tuple[str, str] | None:
        """(name, version) of the model the station reports: two models may share a version string."""
        name, version = self.model_name, self.version
        return (name, version) if name is not None and version is not None else None

    def runs(self, bundle: RemoteBundle) -> bool:
        """Whether the station reports this bundle's model: its name and its version, never the version alone."""
        return self.model == (bundle.name, bundle.version)

    def describe(self) -> str:
        """The model as a person reads it in a reason: "shelf v2", or "no model"."""
        return f"{self.model_name} {self.version}" if self.model else "no model"

    @property
    def last_update(self) -> dict[str, Any] | None:
        return (self.status or {}).get("last_model_update")

    def update_answers(self, command: dict[str, Any]) -> bool | None:
        """Whether the station's ``last_model_update`` answers ``command`` (a cmd/model payload), by the ``request``
        it names: the same bundle, sha256 (in any case) and version. None when it names none (a station before
        2026-12-07): then it cannot tell. A null request answers a command whose bundle the station could not read,
        never one a rollout sent (each is checked against cmd-model.v1 before it goes)."""
        update = self.last_update
        if not isinstance(update, dict) or "request" not in update:
            return None
        request, sha = update["request"], command.get("sha256")
        if not isinstance(request, dict):
            return False
        return (request.get("bundle") == command.get("bundle") and request.get("version") == command.get("version")
                and request.get("sha256") == (sha.lower() if isinstance(sha, str) else None))


class StationLink:
    """One MQTT connection: every station's retained status, the chosen stations' stats, commands out."""

    def __init__(self, options: BrokerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.clock = clock
        self.views: dict[str, StationView] = {}
        self._stats_for: set[str] = set()
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._subscribed_at = 0.0
        self.client = None
        self.refused = 0         # station messages refused: not strict JSON, against the schema, or misaddressed
        self.disconnects = 0     # broker connections lost since connect(): what was seen meanwhile may be stale

    # -- connection
    def connect(self) -> "StationLink":
        self.client = mqtt_connect(self.options, "rollout", on_connect=self._subscribe, on_message=self._on_message)
        self.client.reconnect_delay_set(1, RECONNECT_MAX_DELAY_S)
        self.client.on_disconnect = self._on_disconnect
        return self

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties=None) -> None:
        self.disconnects += 1
        log.warning("MQTT broker %s: connection lost (%s); reconnecting", self.options.where(), reason_code)

    @property
    def lost(self) -> bool:
        """The connection was made and is down now: every station's status and stats seen are the last ones."""
        return self.client is not None and not self.client.is_connected()

    def connected(self) -> bool:
        return self.client is not None and self.client.is_connected()

    def wait_connected(self, timeout_s: float) -> bool:
        """Whether the broker connection is up, waiting up to ``timeout_s`` for paho to bring a lost one back."""
        deadline = self.clock() + timeout_s
        while not self.connected():
            if self.clock() >= deadline:
                return False
            time.sleep(0.1)
        return True

    @property
    def callback_errors(self) -> dict[str, int]:
        """Exceptions in this link's MQTT callbacks by callback name (``contract.broker.guard_hooks`` logged each
        with its traceback, and paho's network thread went on): reported beside ``refused``."""
        return dict(self.client.hook_errors) if self.client is not None else {}    # one copy in C, under the GIL

    def counts(self) -> dict[str, Any]:
        """What went wrong on this link: station messages refused, MQTT callback errors, connections lost."""
        return {"refused": self.refused, "mqtt_callback_errors": self.callback_errors,
                "disconnects": self.disconnects}

    def close(self) -> None:
        if self.client is not None:
            self.client.on_disconnect = None      # our own disconnect: not a lost connection
            self.client.disconnect()
            self.client.loop_stop()
            if self.refused or self.callback_errors:
                log.warning("MQTT broker %s: %d station message(s) refused, MQTT callback errors %s (each logged "
                            "when it happened)", self.options.where(), self.refused, self.callback_errors)

    def _subscribe(self, client) -> None:
        topics = [(station_topic("+/+", "status", self.options.topic_root), 1)]
        topics += [(station_topic(s, "stats", self.options.topic_root), 0) for s in sorted(self._stats_for)]
        def subscribed(*_a) -> None:
            self._subscribed_at = self.clock()
            self._subscribed.set()

        client.on_subscribe = subscribed
        client.subscribe(topics)

    def follow_stats(self, stations: Iterable[str]) -> None:
        new = set(stations) - self._stats_for
        self._stats_for |= new
        if new and self.client is not None:
            self.client.subscribe([(station_topic(s, "stats", self.options.topic_root), 0) for s in sorted(new)])

    def _on_message(self, _client, _userdata, msg) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 4 or parts[-3] == CENTRAL_SITE:
            return
        station, leaf = f"{parts[-3]}/{parts[-2]}", parts[-1]
        if not msg.payload:          # a cleared retained status
            return
        if leaf == "stats" and getattr(msg, "retain", False):
            # stats are never retained (stats.v1); one the broker kept is from whenever it was sent, and given a
            # time of now (on subscribing, and again on every reconnect) it would read as the newest counters
            self.refused += 1
            log.warning("%s: retained stats message refused (stats are never retained: it is stale)", msg.topic)
            return
        try:
            body = loads_finite(msg.payload)       # NaN, Infinity, 1e999 and non-UTF-8 refused too
            checker(f"{leaf}.v1").check(msg.topic, body)
            if (body.get("site"), body.get("station")) != (parts[-3], parts[-2]):
                raise ValueError(f"{msg.topic}: fields site/station name another station")
        except (KeyError, ValueError) as exc:     # one station's bad message never reaches the canary's arithmetic
            self.refused += 1
            log.warning("%s: message refused (%s)", msg.topic, exc)
            return
        with self._cond:
            view = self.views.setdefault(station, StationView())
            if leaf == "status":
                view.status, view.status_at = body, self.clock()
            elif leaf == "stats":
                view.stats.append((self.clock(), body))
            self._cond.notify_all()

    # -- reading
    def settle(self, quiet_s: float = 0.5, timeout_s: float = 10.0) -> None:
        """Wait for the subscription and the burst of retained statuses that follows it."""
        if not self._subscribed.wait(timeout_s):
            raise RolloutError(f"MQTT broker {self.options.where()}: no SUBACK within {timeout_s:.0f} s")
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            with self._cond:
                last = max((v.status_at for v in self.views.values()), default=self._subscribed_at)
            if self.clock() - max(last, self._subscribed_at) >= quiet_s:
                return
            time.sleep(0.05)

    def view(self, station: str) -> StationView:
        with self._cond:
            return self.views.setdefault(station, StationView())

    def snapshot(self, station: str) -> StationView:
        with self._cond:
            v = self.views.get(station, StationView())
            return StationView(v.status, v.status_at, list(v.stats))

    def known_stations(self) -> list[str]:
        with self._cond:
            return sorted(s for s, v in self.views.items() if v.status is not None)

    def wait_until(self, predicate: Callable[[], Any], timeout_s: float) -> Any:
        deadline = self.clock() + timeout_s
        with self._cond:
            while True:
                result = predicate()
                if result:
                    return result
                left = deadline - self.clock()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    # -- commands
    def send_model(self, station: str, bundle: RemoteBundle, reconnect_wait_s: float = RECONNECT_WAIT_S) -> None:
        """Publish ``cmd/model`` and wait for its PUBACK. With the broker connection lost, it waits up to
        ``reconnect_wait_s`` for it to come back, and when it does not, the command is not handed to the client at
        all (a queued one would go out after the rollout reported it not sent). CommandPending when the connection
        dropped after the hand-over; RolloutError when it was never sent or the broker refused it."""
        payload = bundle.command()
        topic = station_topic(station, "cmd/model", self.options.topic_root)
        checker("cmd-model.v1").check(f"cmd/model for {station}", payload, RolloutError)
        if not self.wait_connected(reconnect_wait_s):
            raise RolloutError(f"{topic}: not sent: no connection to the MQTT broker {self.options.where()} "
                               f"(lost, and not back within {reconnect_wait_s:g} s)")
        try:
            mqtt_publish(self.client, topic, payload)
        except RolloutError as exc:
            if self.connected():       # refused by the broker (its ACL): that command is done with, never resent
                raise
            raise CommandPending(f"{topic}: the connection to the MQTT broker {self.options.where()} dropped before "
                                 f"its PUBACK ({exc}); the command goes out again when it reconnects") from exc
