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

    # -- connection
    def connect(self) -> "StationLink":
        self.client = mqtt_connect(self.options, "rollout", on_connect=self._subscribe, on_message=self._on_message)
        return self

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

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
    def send_model(self, station: str, bundle: RemoteBundle) -> None:
        payload = bundle.command()
        checker("cmd-model.v1").check(f"cmd/model for {station}", payload, RolloutError)
        mqtt_publish(self.client, station_topic(station, "cmd/model", self.options.topic_root), payload)
