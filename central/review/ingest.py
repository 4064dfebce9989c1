"""The ingest service: every station's low-confidence frames from MQTT into the FrameStore.

``python -m central ingest --store DIR --mqtt-host H --mqtt-port P``. MQTT v5, QoS 1, a persistent session
(fixed client id, ``clean_start=False``, a session expiry), so frames published while the service is
down are queued by the broker and arrive when it is back. A message is acknowledged (PUBACK) only
after it is stored (paho's ``manual_ack``): a crash before the commit means the broker sends it again,
and the store's message-id key makes that redelivery a no-op.

A message refused for what it holds is quarantined: its topic, payload (the first 64 kB), user
properties (64 k characters of them) and the reason go to the store's quarantine (``FrameStore.quarantine``:
the newest 1,000 kept, every one counted as ``malformed``), it is logged, and acknowledged, so that it never comes
back. That is every exception while reading or storing one message except a storage failure: bad
metadata (not JSON, NaN or 1e999, the schema, a ``seq`` beyond 64 bits), a payload or user properties
over ``--max-payload-bytes``, a JPEG whose header declares more than ``--max-pixels`` (refused before
anything decodes it) or that does not decode, topic and station disagreeing, and anything the
parser did not foresee. ``python -m central quarantine --store DIR`` and the review API's
``/api/quarantine`` list them. A message refused by the storage quota is acknowledged (counted,
with a logged error), because holding it would only stall every station.

A storage failure (``OSError``: disk full, permissions; a SQLite error that is not about the values
bound) is not acknowledged and stops the service (``failed`` is set; the CLI exits with status 1 for its
supervisor to restart it): the broker keeps the message in the session and sends it again when ingest
is back, so it is stored, not lost.

Both wire forms of docs/agent.md are read: v5 (JPEG payload, metadata in the ``meta`` user
property) and the 3.1.1 envelope (``frame-envelope.v1`` JSON with ``jpeg_b64``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import signal
import sqlite3
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from central.review.checks import MAX_JPEG_BYTES, MAX_PIXELS
from central.review.store import FrameStore, StoreError
from contract.broker import (
    BrokerSettings,
    BrokerSettingsError,
    add_broker_args,
    settings_from_args,
)
from contract.messages import checker, fleet_subscription, loads_finite
from contract.secrets import SecretFileError, first_line

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600   # the broker keeps our queue for a week of downtime
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024   # a frame message (the JPEG, or its base64 envelope), read before parsing


class MalformedFrame(ValueError):
    pass


class SubscriptionError(ValueError):
    """A --topic or --shared-group the broker cannot take as this service's subscription; names the flag."""


def check_subscription(topic: str, shared_group: str | None) -> None:
    """SubscriptionError naming the flag, before anything connects, where ``topic`` is no MQTT topic filter or
    ``shared_group`` no share name. Both failed unseen: paho refused the filter inside on_connect (an exception
    counted in hook_errors, the service subscribed to nothing and stored nothing, and said nothing more), and a
    share name with a '/' made another subscription (``$share/a/b/...``: share ``a``, topic ``b/...``)."""
    if shared_group is not None and (not shared_group or any(c in shared_group for c in "/+#\x00")):
        raise SubscriptionError(f"--shared-group {shared_group[:200]!r}: a share name is one topic level: not "
                                "empty, no '/', '+', '#' or NUL")
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        raise SubscriptionError(f"--topic {topic[:200]!r}: not UTF-8") from None
    levels = topic.split("/")
    if (not topic or size > 65535 or "\x00" in topic or "#" in levels[:-1]
            or any(("+" in level and level != "+") or ("#" in level and level != "#") for level in levels)):
        raise SubscriptionError(f"--topic {topic[:200]!r}: not an MQTT topic filter ('+' stands alone in its "
                                "level, '#' alone in the last one; no NUL; at most 65,535 bytes)")


def is_storage_failure(exc: BaseException) -> bool:
    """The store could not write (disk, permissions, the database itself): the message is not to blame.
    SQLite's errors about the values bound (DataError, IntegrityError, InterfaceError) are the message's."""
    if isinstance(exc, (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.InterfaceError)):
        return False
    return isinstance(exc, (OSError, sqlite3.Error))


def describe(exc: BaseException) -> str:
    """The reason a message was refused: our own refusals as written, anything else with its type."""
    try:
        text = str(exc)
    except Exception:       # a hostile value can make even the message fail to render
        text = "(no message)"
    return text if isinstance(exc, (MalformedFrame, StoreError)) else f"{type(exc).__name__}: {text}"


def _json(text: str | bytes, what: str) -> object:
    try:
        return loads_finite(text)
    except (ValueError, RecursionError) as exc:     # RecursionError: nesting deeper than the parser goes
        raise MalformedFrame(f"{what}: not JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


def parse_frame(topic: str, payload: bytes, properties: Properties | None) -> tuple[dict[str, Any], bytes]:
    """(frame.v1 metadata, JPEG bytes) of one ``frames`` message, or MalformedFrame saying why."""
    user = dict(getattr(properties, "UserProperty", None) or []) if properties is not None else {}
    if "meta" in user:
        meta = _json(user["meta"], "user property meta")
        jpeg = bytes(payload)
    else:
        try:
            envelope = loads_finite(payload)
        except (ValueError, RecursionError) as exc:
            raise MalformedFrame("no 'meta' user property (MQTT v5) and the payload is not a frame-envelope.v1 "
                                 f"JSON envelope (MQTT 3.1.1): {type(exc).__name__}: {str(exc)[:200]}") from None
        if not isinstance(envelope, dict) or envelope.get("envelope") != "frame.v1":
            raise MalformedFrame("field envelope: expected 'frame.v1'")
        meta = envelope.get("meta")
        encoded = envelope.get("jpeg_b64")
        if not isinstance(encoded, str):
            raise MalformedFrame(f"field jpeg_b64: expected a base64 string, got {type(encoded).__name__}")
        try:
            jpeg = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:      # ValueError: non-ASCII characters
            raise MalformedFrame(f"field jpeg_b64: not base64 ({exc})") from None
    if not isinstance(meta, dict):
        raise MalformedFrame("field meta: not a JSON object")
    checker("frame.v1").check("frame.v1", meta, MalformedFrame)
    if "id" in user and user["id"] != meta["id"]:
        raise MalformedFrame(f"user property id {user['id']!r} but the frame's field id is {meta['id']!r}")
    parts = topic.split("/")
    if len(parts) >= 3 and (parts[-3], parts[-2]) != (meta["site"], meta["station"]):
        raise MalformedFrame(f"the topic names station {parts[-3]}/{parts[-2]} but the frame says "
                             f"{meta['site']}/{meta['station']}")
    if meta["jpeg"]["bytes"] != len(jpeg):
        raise MalformedFrame(f"field jpeg.bytes: {meta['jpeg']['bytes']} but the JPEG has {len(jpeg)} bytes")
    return meta, jpeg


class IngestService:
    """Subscribe, store, acknowledge; reconnect forever. ``connected``: subscribed (the broker sent its SUBACK)."""

    def __init__(self, store: FrameStore, broker: BrokerSettings, *, topic: str | None = None,
                 shared_group: str | None = None, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self.store = store
        self.max_payload_bytes = max_payload_bytes
        self.broker = broker.check()
        self.host, self.port, self.keepalive_s = broker.host, broker.port, broker.keepalive_s
        topic = topic or fleet_subscription("frames", broker.topic_root)
        check_subscription(topic, shared_group)
        self.subscription = f"$share/{shared_group}/{topic}" if shared_group else topic
        self.connected = threading.Event()
        self.stopped = threading.Event()
        self.failed = threading.Event()          # a frame could not be stored: stop, it stays unacknowledged
        self.failure: str | None = None
        self._last_connect_fail = float("-inf")
        self._errors_counted: dict[str, int] = {}     # callback errors already added to the store's counters
        self._count_failed = False
        self._counting = threading.Thread(target=self._count_errors_every_second, name="ingest-callback-errors",
                                          daemon=True)
        self.client = broker.new_client("central-ingest", default_id="central-ingest", manual_ack=True)
        self.client.reconnect_delay_set(0.5, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        log.info("ingest: connecting to %s:%d, storing into %s", self.host, self.port, self.store.root)
        self.client.connect_async(self.host, self.port, self.keepalive_s, clean_start=False, properties=props)
        self.client.loop_start()
        self._counting.start()

    def stop(self) -> None:
        self.stopped.set()
        self.client.disconnect()
        self.client.loop_stop()
        if self._counting.is_alive():
            self._counting.join()
        self.count_callback_errors()
        if errors := self.callback_errors():
            log.warning("ingest: %d exception(s) in MQTT callbacks while running, by callback: %s (each logged with "
                        "its traceback when it happened)", sum(errors.values()), errors)

    def callback_errors(self) -> dict[str, int]:
        """Exceptions raised in this service's MQTT callbacks, by callback name (``contract.broker.guard_hooks``
        logged each with its traceback and paho's network thread went on): each is a defect to report."""
        return dict(self.client.hook_errors)      # one copy in C, under the GIL: no lock needed

    def count_callback_errors(self) -> None:
        """Add the callback errors not yet counted to the store's counters (``FrameStore.count_callback_errors``):
        the review server reads the store, not this process, and its page says so when ingest's callbacks fail.
        Runs every second on the service's own thread and when it stops; a store that cannot take the count is
        logged (once until it can again), never raised: the count is tried again."""
        errors = self.callback_errors()
        new = {hook: n - self._errors_counted.get(hook, 0) for hook, n in errors.items()
               if n > self._errors_counted.get(hook, 0)}
        if not new:
            return
        try:
            self.store.count_callback_errors(new)
        except Exception as exc:
            if not self._count_failed:
                log.warning("ingest: %d MQTT callback error(s) not counted in the store (%s: %s); tried again",
                            sum(new.values()), type(exc).__name__, exc)
            self._count_failed = True
            return
        self._count_failed = False
        self._errors_counted.update({hook: errors[hook] for hook in new})

    def _count_errors_every_second(self) -> None:
        while not self.stopped.wait(1.0):
            self.count_callback_errors()

    def stats(self) -> dict[str, Any]:
        """This process's view, beside the store's counters (``FrameStore.stats``): subscribed or not, why it
        stopped, and ``mqtt_callback_errors``."""
        return {"connected": self.connected.is_set(), "failure": self.failure,
                "mqtt_callback_errors": self.callback_errors()}

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("ingest: connection refused by %s:%d: %s (reason code %s)", self.host, self.port, reason_code,
                      reason_code.value)
            return
        # ``connected`` waits for the SUBACK: until the broker has the subscription, a new session gets nothing
        log.info("ingest: connected (session %s); subscribing to %s",
                 "resumed" if flags.session_present else "new", self.subscription)
        client.subscribe(self.subscription, options=paho.SubscribeOptions(qos=1))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            log.error("ingest: subscription to %s refused: %s", self.subscription, refused[0])
            return
        self.connected.set()
        log.info("ingest: subscribed to %s", self.subscription)

    def _on_connect_fail(self, client, userdata) -> None:
        """The broker cannot be reached (a wrong --mqtt-host, a broker down): said, at most once a minute."""
        now = time.monotonic()
        if now - self._last_connect_fail >= 60.0:
            self._last_connect_fail = now
            log.warning("ingest: cannot reach the broker at %s:%d; retrying", self.host, self.port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self.stopped.is_set():
            log.warning("ingest: disconnected from %s:%d (%s); reconnecting", self.host, self.port, reason_code)

    def handle(self, topic: str, payload: bytes, properties: Properties | None) -> str:
        """Store one frame message, or quarantine it: ``stored``, ``duplicate``, ``refused`` (the quota) or
        ``quarantined``. Raises only for a storage failure (``is_storage_failure``)."""
        try:
            if len(payload) > self.max_payload_bytes:
                raise MalformedFrame(f"the payload has {len(payload)} bytes, more than --max-payload-bytes "
                                     f"{self.max_payload_bytes}")
            # the broker's message_size_limit bounds the payload only: the metadata (user property meta) too
            if (size := _properties_size(properties)) > self.max_payload_bytes:
                raise MalformedFrame(f"the user properties have {size} characters, more than --max-payload-bytes "
                                     f"{self.max_payload_bytes}")
            meta, jpeg = parse_frame(topic, payload, properties)
            result = self.store.add(meta, jpeg)
        except Exception as exc:
            if is_storage_failure(exc):
                raise
            reason = describe(exc)
            log.error("ingest: %s: frame message quarantined: %s", topic, reason)
            user = list(getattr(properties, "UserProperty", None) or []) if properties is not None else []
            self.store.quarantine(topic, payload, user, reason)
            return "quarantined"
        if result.outcome == "stored":
            log.debug("ingest: stored %s %s from %s", meta.get("kind", "low-confidence"), result.frame_id, topic)
        return result.outcome

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        if self.failed.is_set():       # stopping after a failed write: take nothing more
            return
        # Nothing may escape this callback: paho would end its network thread and the service would sit
        # connected but deaf. Whatever cannot be recorded (the frame, or the quarantine of a refused one)
        # stays unacknowledged and stops the service.
        topic = _topic(message)
        try:
            self.handle(topic, message.payload, message.properties)
        except Exception as exc:   # disk or database: never acknowledged, so the broker sends it again
            self.failure = f"{topic}: could not store the frame ({type(exc).__name__}: {exc})"
            log.exception("ingest: %s; it stays unacknowledged and the service stops (restart it: the broker "
                          "sends the frame again)", self.failure)
            self.failed.set()
            return
        client.ack(message.mid, message.qos)


def _properties_size(properties: Properties | None) -> int:
    """Characters of a message's MQTT user properties, keys and values."""
    user = getattr(properties, "UserProperty", None) or [] if properties is not None else []
    return sum(len(key) + len(value) for key, value in user)


def _topic(message: paho.MQTTMessage) -> str:
    """The message's topic as text, whatever bytes it came with."""
    try:
        return message.topic
    except UnicodeDecodeError:
        return bytes(message._topic).decode("utf-8", "backslashreplace")


def add_ingest_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="store every station's low-confidence frames from MQTT (a long-running service)")
    p.add_argument("--store", required=True, type=Path, help="store folder (images + frames.sqlite)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="storage quota in bytes, kept in the store (default: the store's setting, none at first; "
                        "0 removes it)")
    p.add_argument("--warn-fraction", type=float, default=None, help="warn above this share of the quota (0.9)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"refuse (quarantine) a JPEG whose header declares more pixels, before decoding it "
                        f"(default {MAX_PIXELS}: 8192x8192)")
    p.add_argument("--max-payload-bytes", type=int, default=MAX_PAYLOAD_BYTES,
                   help=f"refuse (quarantine) a frame message whose payload, or user properties, are larger than this "
                        f"(default {MAX_PAYLOAD_BYTES}); "
                        f"its JPEG may have at most {MAX_JPEG_BYTES} bytes")
    p.add_argument("--topic", default=None,
                   help=f"subscription (default {fleet_subscription('frames')}, under --topic-root)")
    p.add_argument("--shared-group", default=None,
                   help="subscribe as $share/<group>/<topic>, to spread the load over several ingest processes")
    add_broker_args(p, client_id_help="fixed, so the broker keeps the session (default central-ingest)")


def read_secret(path: Path | None, option: str = "--password-file") -> str | None:
    """The secret in a file named by a command-line option; exits with a message naming both."""
    if path is None:
        return None
    try:
        return first_line(path)
    except SecretFileError as exc:
        raise SystemExit(f"{option}: {exc}") from None


def cmd_ingest(args) -> int:
    try:
        broker = settings_from_args(args).check()
    except BrokerSettingsError as exc:
        raise SystemExit(str(exc)) from None
    if args.max_bytes is not None and not 0 <= args.max_bytes < 2 ** 63:    # SQLite's integers
        raise SystemExit(f"--max-bytes {args.max_bytes}: expected bytes from 0 to 2^63 - 1")
    try:
        check_subscription(args.topic or fleet_subscription("frames", broker.topic_root), args.shared_group)
    except SubscriptionError as exc:
        raise SystemExit(str(exc)) from None
    if args.max_pixels < 1 or args.max_payload_bytes < 1:
        raise SystemExit(f"--max-pixels {args.max_pixels}, --max-payload-bytes {args.max_payload_bytes}: "
                         f"must be positive")
    store = FrameStore(args.store, max_bytes=args.max_bytes, warn_fraction=args.warn_fraction,
                       max_pixels=args.max_pixels)
    service = IngestService(store, broker, topic=args.topic, shared_group=args.shared_group,
                            max_payload_bytes=args.max_payload_bytes)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    service.start()
    print(f"ingest: storing frames from {broker.where()} ({service.subscription}) into {args.store}", flush=True)
    while not done.wait(0.5) and not service.failed.is_set():
        pass
    service.stop()
    stats = store.stats()
    print(f"ingest: stopped; {stats['frames']} frames stored, counters {stats['counters']}, MQTT callback errors "
          f"{service.callback_errors()}", flush=True)
    store.close()
    if service.failed.is_set():
        print(f"ingest: {service.failure}; exiting with status 1 (the frame stays with the broker)", file=sys.stderr,
              flush=True)
        return 1
    return 0


def add_quarantine_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quarantine", help="the frame messages ingest refused and kept (newest first)")
    p.add_argument("--store", required=True, type=Path, help="store folder (as written by 'ingest')")
    p.add_argument("--limit", type=int, default=20, help="how many to show (1..1000, default 20)")
    p.add_argument("--json", action="store_true", help="one JSON object per line, with the kept payload in base64")


def cmd_quarantine(args) -> int:
    if not (args.store / "frames.sqlite").is_file():
        raise StoreError(f"--store {args.store}: no frames.sqlite (not a frame store)")
    store = FrameStore.open_read_only(args.store)   # listing writes nothing (a store folder of another user, read-only)
    try:
        entries, kept = store.list_quarantine(limit=args.limit, payload=args.json)
        refused = store.counters().get("malformed", 0)
    finally:
        store.close()
    if args.json:
        for entry in entries:
            print(json.dumps(entry))
        return 0
    print(f"{args.store}: {refused} frame message(s) refused, the newest {kept} kept in quarantine")
    for e in entries:
        when = datetime.fromtimestamp(e["received_at"], timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        print(f"#{e['seq']} {when} {e['topic']} ({e['bytes']} bytes): {e['reason']}")
    return 0
