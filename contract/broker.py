"""How every part reaches the MQTT broker: one settings type, one set of flags, one connect.

The station (agent config ``mqtt:``), ingest, the rollout commands and the dashboard all describe
the broker with ``BrokerSettings``. Command-line tools take the same flags from ``add_broker_args``
(``--mqtt-host``, ``--mqtt-port``, ``--transport``, ``--username``, ``--password-file`` ...) and
build their paho client with ``BrokerSettings.new_client``: TLS, websockets and credentials are
set up in one place. ``connect`` is the blocking variant for short-lived tools (publish, rollout):
it returns a connected client with its network loop running, or raises ``BrokerError`` naming the
broker and the reason.

Every client ``new_client`` builds runs its callbacks guarded (``guard_hooks``): an exception in one (a
subscription list that cannot be built, a message a service cannot take) is logged with its traceback and
counted in ``client.hook_errors``, and paho's network thread goes on, where it would otherwise end, leaving a
client that reads as connected but receives nothing, acknowledges nothing and never reconnects. ``connect``
reports an ``on_connect`` hook that fails on the first connection as that (BrokerError), not as a missing
CONNACK.

``BrokerSettings.check`` is the strictest of the checks the parts used to make on their own: every
file exists and can be read, a client certificate comes with its key, the password can be read,
and each error names the flag (or config key) and the file.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import ssl
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from contract.messages import TOPIC_ROOT
from contract.secrets import SecretFileError, first_line

TRANSPORTS = ("tcp", "websockets")

log = logging.getLogger(__name__)


class BrokerSettingsError(ValueError):
    """Broker settings that cannot work (a missing file, an unset password variable); names the flag."""


class BrokerError(RuntimeError):
    """The broker could not be reached or refused the connection; names the broker and why."""


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to authenticate; ``flags`` maps field names to what the user typed."""

    host: str = "127.0.0.1"
    port: int = 1883
    transport: str = "tcp"
    ws_path: str = "/mqtt"
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tls: bool = False                  # TLS with the system's CA certificates (implied by tls_ca / tls_cert)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure: bool = False
    topic_root: str = TOPIC_ROOT
    client_id: str | None = None
    keepalive_s: int = 30
    connect_timeout_s: float = 15.0
    flags: tuple[tuple[str, str], ...] = ()   # (field, name to show in errors); default: the command-line flag

    def _name(self, field: str) -> str:
        return dict(self.flags).get(field, "--" + field.replace("_", "-"))

    @property
    def use_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def check(self) -> "BrokerSettings":
        """Raise BrokerSettingsError naming the flag when a connection with these settings cannot work."""
        if self.transport not in TRANSPORTS:
            raise BrokerSettingsError(f"{self._name('transport')}: {self.transport!r} is not tcp or websockets")
        root = self.topic_root.rstrip("/") if isinstance(self.topic_root, str) else ""
        if not root or len(root) > 200 or any(c in root for c in "+#\x00") or "" in root.split("/"):
            # every topic and subscription is built under it: a wildcard made each publish a ValueError in paho and
            # each subscription fail inside on_connect, reported as "no CONNACK" after the timeout. The rule of a
            # station's mqtt.topic_root (agent/config.py), whose topics a central root must match
            raise BrokerSettingsError(f"{self._name('topic_root')}: {str(self.topic_root)[:80]!r} is not a topic root "
                                      "(levels of text between single '/', no '+', '#' or NUL, at most 200 "
                                      "characters)")
        if not 1 <= int(self.port) <= 65535:
            raise BrokerSettingsError(f"{self._name('port')}: {self.port} is not a port number (1-65535)")
        for field in ("password_file", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, field)
            if path is not None and not (Path(path).is_file() and os.access(path, os.R_OK)):
                raise BrokerSettingsError(f"{self._name(field)}: {path}: no such file, or it cannot be read")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise BrokerSettingsError(f"{self._name('tls_cert')} and {self._name('tls_key')} go together "
                                      "(client certificate and its key)")
        if self.password_file is not None and self.password_env is not None:
            raise BrokerSettingsError(f"{self._name('password_file')} and {self._name('password_env')}: "
                                      "give one password source, not both")
        self.password()
        return self

    def password(self) -> str | None:
        """The password from its file (first line) or environment variable; None without either."""
        if self.password_file is not None:
            try:
                return first_line(self.password_file)
            except SecretFileError as exc:
                raise BrokerSettingsError(f"{self._name('password_file')}: {exc}") from None
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if not value:
                raise BrokerSettingsError(f"{self._name('password_env')}: environment variable {self.password_env} "
                                          "is not set")
            return value
        return None

    def where(self) -> str:
        scheme = {("tcp", False): "mqtt", ("tcp", True): "mqtts", ("websockets", False): "ws",
                  ("websockets", True): "wss"}[(self.transport, self.use_tls)]
        return f"{scheme}://{self.host}:{self.port}"

    def configure(self, client: Any) -> Any:
        """Set up TLS, websockets and credentials on a paho client (any protocol version); returns it."""
        if self.transport == "websockets":
            client.ws_set_options(path=self.ws_path)
        if self.use_tls:
            client.tls_set(ca_certs=str(self.tls_ca) if self.tls_ca else None,
                           certfile=str(self.tls_cert) if self.tls_cert else None,
                           keyfile=str(self.tls_key) if self.tls_key else None, cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(self.tls_insecure)
        password = self.password()
        if self.username or password:
            client.username_pw_set(self.username, password)
        return client

    def new_client(self, purpose: str, *, default_id: str | None = None, factory: Callable[..., Any] | None = None,
                   **paho_kwargs: Any) -> Any:
        """A configured paho 2.x MQTT v5 client (not connected); the client id is the settings', else
        ``default_id``, else ``<purpose>-<random>``."""
        import paho.mqtt.client as paho

        make = factory or paho.Client
        paho_kwargs.setdefault("protocol", paho.MQTTv5)
        client = make(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id or default_id or f"{purpose}-{uuid.uuid4().hex[:8]}",
                      transport=self.transport, **paho_kwargs)
        return self.configure(guard_hooks(client, purpose))

    def with_(self, **changes: Any) -> "BrokerSettings":
        return replace(self, **changes)


# ---------------------------------------------------------------- callbacks that never end paho's thread

def _hook_failed(client: Any, hook: str, purpose: str) -> None:
    """Log the exception being handled (with its traceback) as raised by ``hook`` and count it."""
    with client._hook_lock:
        client.hook_errors[hook] += 1
    log.exception("MQTT client %s: its %s callback raised; logged and counted (hook_errors), paho's network "
                  "thread goes on", purpose, hook)


def _guarded_hook(client: Any, hook: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception:
            _hook_failed(client, hook, client._hook_purpose)
            return None

    return guarded


@functools.lru_cache(maxsize=None)
def _guarded_class(cls: type) -> type:
    """``cls`` with each ``on_*`` callback property wrapping what is assigned to it in ``_guarded_hook``."""

    def guarded_property(hook: str, base: property) -> property:
        def fset(client: Any, func: Callable[..., Any] | None) -> None:
            base.fset(client, None if func is None else _guarded_hook(client, hook, func))

        return property(base.fget, fset, doc=base.__doc__)

    hooks = {name: guarded_property(name, attr) for name in dir(cls) if name.startswith("on_")
             and isinstance(attr := getattr(cls, name, None), property) and attr.fset is not None}
    return type(f"Guarded{cls.__name__}", (cls,), hooks)


def guard_hooks(client: Any, purpose: str) -> Any:
    """Make every callback assigned to ``client`` from now on (``on_connect``, ``on_message`` ...) log an
    exception with its traceback and count it in ``client.hook_errors`` (a Counter by callback name) instead of
    raising it into paho, whose network thread ends on it (``suppress_exceptions`` would hide it: paho logs the
    text only, and only to a logger it was given). Returns ``client``."""
    if not hasattr(client, "hook_errors"):
        client.hook_errors = Counter()
        client._hook_lock = threading.Lock()
        client._hook_purpose = purpose
        client.__class__ = _guarded_class(type(client))
    return client


def add_broker_args(parser: argparse.ArgumentParser, *, required: bool = False, default_host: str | None = "127.0.0.1",
                    title: str = "MQTT broker", client_id_help: str = "MQTT client id") -> None:
    """The broker flags every command-line tool takes (read back with ``settings_from_args``)."""
    g = parser.add_argument_group(title)
    g.add_argument("--mqtt-host", required=required, default=None if required else default_host,
                   help="broker host" + (f" (default {default_host})" if default_host and not required else ""))
    g.add_argument("--mqtt-port", type=int, default=1883,
                   help="1883 plain, 8883 TLS, 8884 secure websockets on the central broker (default 1883)")
    g.add_argument("--transport", choices=TRANSPORTS, default="tcp",
                   help="MQTT over TCP or over websockets (the central broker's 8884 listener)")
    g.add_argument("--ws-path", default="/mqtt", help="websocket path (default /mqtt)")
    g.add_argument("--username", default=None, help="MQTT user")
    g.add_argument("--password-file", type=Path, default=None, help="file whose first line is the password")
    g.add_argument("--password-env", default=None, help="environment variable holding the password")
    g.add_argument("--tls", action="store_true", help="TLS with the system's CA certificates (implied by --tls-ca)")
    g.add_argument("--tls-ca", type=Path, default=None, help="CA certificate of the broker; enables TLS")
    g.add_argument("--tls-cert", type=Path, default=None, help="client certificate (mutual TLS)")
    g.add_argument("--tls-key", type=Path, default=None, help="client private key (mutual TLS)")
    g.add_argument("--tls-insecure", action=argparse.BooleanOptionalAction, default=False,
                   help="do not check the broker's host name (lab use only)")
    g.add_argument("--topic-root", default=TOPIC_ROOT, help=f"first topic level(s) (default {TOPIC_ROOT})")
    g.add_argument("--client-id", default=None, help=client_id_help)


_FLAG_FIELDS = {"mqtt_host": "host", "mqtt_port": "port", "transport": "transport", "ws_path": "ws_path",
                "username": "username", "password_file": "password_file", "password_env": "password_env",
                "tls": "tls", "tls_ca": "tls_ca", "tls_cert": "tls_cert", "tls_key": "tls_key",
                "tls_insecure": "tls_insecure", "topic_root": "topic_root", "client_id": "client_id"}


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> BrokerSettings | None:
    """The settings ``add_broker_args`` parsed; None when no host was given (the broker is optional there)."""
    if getattr(args, "mqtt_host", None) is None:
        return None
    values = {field: getattr(args, dest) for dest, field in _FLAG_FIELDS.items() if hasattr(args, dest)}
    values.update(overrides)
    values["flags"] = (("host", "--mqtt-host"), ("port", "--mqtt-port"))
    return BrokerSettings(**values)


def connect(settings: BrokerSettings, purpose: str, *, on_connect: Callable[[Any], None] | None = None,
            on_message: Callable[[Any, Any], None] | None = None, factory: Callable[..., Any] | None = None) -> Any:
    """A connected paho client (MQTT v5) with its network loop running; BrokerError when refused or unreachable.

    ``on_connect(client)`` runs on every (re)connect, so subscriptions come back after a broker restart. When it
    raises on the first connection, BrokerError says so (the connection is closed: what it set up is missing);
    on a reconnect, the exception is logged with its traceback, counted in ``client.hook_errors["on_connect"]``
    and the connection kept.
    """
    try:
        client = settings.check().new_client(purpose, factory=factory)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"MQTT broker {settings.where()}: cannot set up the connection ({exc})") from exc
    answered = threading.Event()
    outcome: dict[str, Any] = {}

    def connected(c: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if not answered.is_set():
            outcome["rc"] = reason_code
        try:
            if not reason_code.is_failure and on_connect is not None:
                on_connect(c)
        except Exception as exc:
            _hook_failed(c, "on_connect", purpose)
            if not answered.is_set():
                outcome["hook_error"] = exc
        finally:
            answered.set()

    client.on_connect = connected
    if on_message is not None:
        client.on_message = on_message
    where = settings.where()
    try:
        client.connect(settings.host, settings.port, settings.keepalive_s)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"MQTT broker {where}: cannot connect ({exc})") from exc
    client.loop_start()
    if not answered.wait(settings.connect_timeout_s):
        client.loop_stop()
        raise BrokerError(f"MQTT broker {where}: no CONNACK within {settings.connect_timeout_s:.0f} s")
    if outcome["rc"].is_failure:
        client.loop_stop()
        raise BrokerError(f"MQTT broker {where}: connection refused ({outcome['rc']})")
    if "hook_error" in outcome:
        client.disconnect()
        client.loop_stop()
        exc = outcome["hook_error"]
        raise BrokerError(f"MQTT broker {where}: connected, but setting up the connection failed in {purpose}'s "
                          f"on_connect ({type(exc).__name__}: {exc}); the traceback is in the log") from exc
    return client
