"""The ingest service: every station's low-confidence frames from MQTT into the FrameStore.

``python -m central ingest --store DIR --mqtt-host H --mqtt-port P``. MQTT v5, QoS 1, a persistent session
(fixed client id, ``clean_start=False``, a session expiry), so frames published while the service is
down are queued by the broker and arrive when it is back. A message is acknowledged (PUBACK) only
after it is stored (paho's ``manual_ack``): a crash before the commit means the broker sends it again,
and the store's message-id key makes that redelivery a no-op. A malformed message (bad metadata,
not a JPEG, topic and station disagree) is logged with its topic and reason, counted, and
acknowledged so that it does not come back forever; a message refused by the storage quota is also
acknowledged (counted, with a logged error), because holding it would only stall every station.
A failure to write (disk full, database error) is not acknowledged and stops the service
(``failed`` is set; the CLI exits with status 1 for its supervisor to restart it): the broker keeps
the message in the session and sends it again when ingest is back, so it is stored, not lost.

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
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from central.review.store import FrameStore, StoreError
from contract.broker import (
    BrokerSettings,
    BrokerSettingsError,
    add_broker_args,
    settings_from_args,
)
from contract.messages import checker, fleet_subscription
from contract.secrets import SecretFileError, first_line

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600   # the broker keeps our queue for a week of downtime


class MalformedFrame(ValueError):
    pass


def parse_frame(topic: str, payload: bytes, properties: Properties | None) -> tuple[dict[str, Any], bytes]:
    """(frame.v1 metadata, JPEG bytes) of one ``frames`` message, or MalformedFrame saying why."""
    user = dict(getattr(properties, "UserProperty", None) or []) if properties is not None else {}
    if "meta" in user:
        try:
            meta = json.loads(user["meta"])
        except ValueError as exc:
            raise MalformedFrame(f"user property meta: not JSON ({exc})") from None
        jpeg = bytes(payload)
    else:
        try:
            envelope = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise MalformedFrame("no 'meta' user property (MQTT v5) and the payload is not a frame-envelope.v1 "
                                 "JSON envelope (MQTT 3.1.1)") from None
        if not isinstance(envelope, dict) or envelope.get("envelope") != "frame.v1":
            raise MalformedFrame("field envelope: expected 'frame.v1'")
        meta = envelope.get("meta")
        try:
            jpeg = base64.b64decode(envelope.get("jpeg_b64") or "", validate=True)
        except (binascii.Error, TypeError) as exc:
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
                 shared_group: str | None = None) -> None:
        self.store = store
        self.broker = broker.check()
        self.host, self.port, self.keepalive_s = broker.host, broker.port, broker.keepalive_s
        topic = topic or fleet_subscription("frames", broker.topic_root)
        self.subscription = f"$share/{shared_group}/{topic}" if shared_group else topic
        self.connected = threading.Event()
        self.stopped = threading.Event()
        self.failed = threading.Event()          # a frame could not be stored: stop, it stays unacknowledged
        self.failure: str | None = None
        self.client = broker.new_client("central-ingest", default_id="central-ingest", manual_ack=True)
        self.client.reconnect_delay_set(0.5, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        log.info("ingest: connecting to %s:%d, storing into %s", self.host, self.port, self.store.root)
        self.client.connect_async(self.host, self.port, self.keepalive_s, clean_start=False, properties=props)
        self.client.loop_start()

    def stop(self) -> None:
        self.stopped.set()
        self.client.disconnect()
        self.client.loop_stop()

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

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self.stopped.is_set():
            log.warning("ingest: disconnected from %s:%d (%s); reconnecting", self.host, self.port, reason_code)

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        if self.failed.is_set():       # stopping after a failed write: take nothing more
            return
        # Nothing may escape this callback: paho would end its network thread and the service would sit
        # connected but deaf. Whatever cannot be recorded (the frame, or the count of a malformed one) stays
        # unacknowledged and stops the service.
        try:
            try:
                meta, jpeg = parse_frame(message.topic, message.payload, message.properties)
                result = self.store.add(meta, jpeg)
            except (MalformedFrame, StoreError) as exc:
                log.error("ingest: %s: malformed frame message dropped: %s", message.topic, exc)
                self.store.count("malformed")
            else:
                if result.outcome == "stored":
                    log.debug("ingest: stored %s %s from %s", meta.get("kind", "low-confidence"), result.frame_id,
                              message.topic)
        except Exception as exc:   # disk or database: never acknowledged, so the broker sends it again
            self.failure = f"{message.topic}: could not store the frame ({type(exc).__name__}: {exc})"
            log.exception("ingest: %s; it stays unacknowledged and the service stops (restart it: the broker "
                          "sends the frame again)", self.failure)
            self.failed.set()
            return
        client.ack(message.mid, message.qos)


def add_ingest_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="store every station's low-confidence frames from MQTT (a long-running service)")
    p.add_argument("--store", required=True, type=Path, help="store folder (images + frames.sqlite)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="storage quota in bytes, kept in the store (default: the store's setting, none at first; "
                        "0 removes it)")
    p.add_argument("--warn-fraction", type=float, default=None, help="warn above this share of the quota (0.9)")
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
    store = FrameStore(args.store, max_bytes=args.max_bytes, warn_fraction=args.warn_fraction)
    service = IngestService(store, broker, topic=args.topic, shared_group=args.shared_group)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    service.start()
    print(f"ingest: storing frames from {broker.where()} ({service.subscription}) into {args.store}", flush=True)
    while not done.wait(0.5) and not service.failed.is_set():
        pass
    service.stop()
    stats = store.stats()
    print(f"ingest: stopped; {stats['frames']} frames stored, counters {stats['counters']}", flush=True)
    store.close()
    if service.failed.is_set():
        print(f"ingest: {service.failure}; exiting with status 1 (the frame stays with the broker)", file=sys.stderr,
              flush=True)
        return 1
    return 0
