"""The dashboard's one MQTT subscription: every station's topics and the central rollout events.

paho-mqtt 2.x, MQTT v5, QoS 1, over TCP or websockets, with TLS and a user name
and password as the central broker requires (deploy/central). paho's own network
thread reconnects with backoff; every (re)connect subscribes again, and the
broker resends the retained status of each station and the last rollout event
(the state drops what it has already seen, by message id).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import paho.mqtt.client as paho

from agent.secrets import SecretFileError, first_line
from dashboard.state import CENTRAL_SITE, STATION_KINDS, WarehouseState

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A setting the dashboard cannot start with; the text names the flag or file."""


@dataclass(frozen=True)
class MqttSettings:
    """How to reach the broker; see ``python -m dashboard --help``."""

    host: str = "127.0.0.1"
    port: int = 1883
    transport: str = "tcp"              # tcp | websockets
    ws_path: str = "/mqtt"
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tls_enabled: bool = False           # TLS with the system's CA certificates (implied by tls_ca)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure: bool = False
    topic_root: str = "inventory"
    client_id: str | None = None
    keepalive_s: int = 30

    def check(self) -> None:
        """Every file the connection needs exists and the password is readable: fail at start, not in a retry loop."""
        if self.transport not in ("tcp", "websockets"):
            raise SettingsError(f"--transport: {self.transport!r} is not tcp or websockets")
        for flag, path in (("--password-file", self.password_file), ("--tls-ca", self.tls_ca),
                           ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path is not None and not Path(path).is_file():
                raise SettingsError(f"{flag}: {path}: no such file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("--tls-cert and --tls-key go together (client certificate and its key)")
        self.password()

    def password(self) -> str | None:
        if self.password_file is not None:
            try:
                return first_line(self.password_file)
            except SecretFileError as exc:
                raise SettingsError(f"--password-file: {exc}") from None
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if not value:
                raise SettingsError(f"--password-env: environment variable {self.password_env} is not set")
            return value
        return None

    @property
    def tls(self) -> bool:
        return self.tls_enabled or self.tls_ca is not None or self.tls_cert is not None

    def topics(self) -> list[str]:
        root = self.topic_root.rstrip("/")
        return [f"{root}/+/+/{kind}" for kind in STATION_KINDS] + [f"{root}/{CENTRAL_SITE}/rollout"]

    def where(self) -> str:
        scheme = {("tcp", False): "mqtt", ("tcp", True): "mqtts", ("websockets", False): "ws",
                  ("websockets", True): "wss"}[(self.transport, self.tls)]
        return f"{scheme}://{self.host}:{self.port}"


class StationFeed:
    """Subscribes and hands every message to ``state.ingest``; reports the connection to ``state.set_broker``."""

    def __init__(self, settings: MqttSettings, state: WarehouseState,
                 client_factory: Callable[..., paho.Client] = paho.Client) -> None:
        self.settings = settings
        self.state = state
        client_id = settings.client_id or f"dashboard-{socket.gethostname()}-{os.getpid()}"
        self._stopping = False
        self.client = client_factory(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                                     transport=settings.transport)
        self._configure()

    def _configure(self) -> None:
        s, client = self.settings, self.client
        client.reconnect_delay_set(0.5, 30)
        if s.transport == "websockets":
            client.ws_set_options(path=s.ws_path)
        if s.tls:
            client.tls_set(ca_certs=str(s.tls_ca) if s.tls_ca else None,
                           certfile=str(s.tls_cert) if s.tls_cert else None,
                           keyfile=str(s.tls_key) if s.tls_key else None, cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(s.tls_insecure)
        password = s.password()
        if s.username or password:
            client.username_pw_set(s.username, password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message

    def start(self) -> None:
        log.info("dashboard: connecting to %s as %s", self.settings.where(), self.settings.username or "(anonymous)")
        self.client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive_s)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------ paho callbacks (paho's network thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        where = self.settings.where()
        if reason_code.is_failure:
            detail = f"connection refused by {where}: {reason_code} (reason code {reason_code.value})"
            log.error("dashboard: %s", detail)
            self.state.set_broker(False, detail)
            return
        client.subscribe([(topic, paho.SubscribeOptions(qos=1)) for topic in self.settings.topics()])
        self.state.set_broker(True, f"connected to {where}")
        log.info("dashboard: connected to %s; subscribing to %s", where, ", ".join(self.settings.topics()))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for topic, code in zip(self.settings.topics(), reason_codes):
            if code.is_failure:
                log.error("dashboard: subscription to %s refused: %s", topic, code)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._stopping:
            self.state.set_broker(False, "stopped")
            return
        detail = f"disconnected from {self.settings.where()}: {reason_code}; reconnecting"
        log.warning("dashboard: %s", detail)
        self.state.set_broker(False, detail)

    def _on_connect_fail(self, client, userdata) -> None:
        detail = f"cannot reach {self.settings.where()}; retrying"
        log.warning("dashboard: %s", detail)
        self.state.set_broker(False, detail)

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        self.state.ingest(message.topic, bytes(message.payload))
