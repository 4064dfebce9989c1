"""MQTT publisher: drains the outbox with QoS 1, deletes on PUBACK, owns status and commands.

One thread owns the paho client and runs its network loop by hand, so nothing
else touches the socket and no paho auto-reconnect can resend messages behind
the outbox's back. Each connection attempt uses a fresh client: what was in
flight when a connection died is simply re-sent from the outbox (the subscriber
drops duplicates by id). A refused CONNACK is logged with its reason code and
retried with backoff; only a successful CONNACK counts as connected. The backoff
starts again from its first delay only after a session that proved itself (a
record acknowledged, or up for ``STABLE_SESSION_S``): a message the broker
answers by dropping the connection costs a growing pause, never a reconnect storm. Each pause is drawn between
half the backoff's delay and the delay, so a fleet that lost one broker (a restart) does not come back in step.
No more QoS 1 messages, the status included, wait for a PUBACK than ``mqtt.max_inflight`` and than the Receive
Maximum a v5 broker announces in its CONNACK.

A message larger than the broker takes (``mqtt.max_message_bytes``) is never
sent: the outbox refuses it when it is stored, and one stored before (an older
agent, another limit) is dropped when its turn comes, counted as ``too-large``
either way. On MQTT v5 the broker would refuse it at every try (mosquitto's
answer even ends the connection) and hold up everything behind it; on 3.1.1 it
would acknowledge it and throw it away unseen. 3.1.1 has no failure code in a
PUBACK at all: a publish the broker denies (an ACL) is acknowledged like any
other, and deleted from the outbox as delivered; only v5 can see it.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentConfig, ConfigError, MqttConfig
from agent.health import Metrics
from agent.outbox import Outbox, Record
from agent.priority import lower_this_thread
from agent.sources.camera import backoff_delays
from contract.broker import BrokerSettingsError
from contract.messages import Topics, dumps_finite

log = logging.getLogger(__name__)

UNSUPPORTED_PROTOCOL = (1, 132)      # 3.1.1 return code / v5 reason code
CONNACK_TIMEOUT_S = 10.0
STABLE_SESSION_S = 10.0              # a session up this long proved itself, acknowledged or not: the backoff resets
REFUSED_RETRY_S = (5.0, 300.0)       # a refused message sent again after 5 s, doubling to 5 min while refusals go on


@dataclass
class ConnectionState:
    connected: bool = False
    protocol: str = "v5"                 # of the next connection attempt (and the current connection)
    v5_accepted: bool = False            # this broker has accepted a v5 CONNECT: it speaks v5
    v311_latched: bool = False           # auto: the broker refused v5 with "unsupported protocol version"
    connects: int = 0
    refusals: int = 0
    last_error: str | None = None
    history: list[str] = field(default_factory=list)


def jittered(delays: Iterator[float], rng: random.Random) -> Iterator[float]:
    """Each exponential delay drawn between its half and itself: stations that lost one broker at the same moment
    (a restart) do not all come back in the same millisecond, again at every step of their backoff."""
    for delay in delays:
        yield rng.uniform(delay / 2, delay)


def nulled_non_finite(value: Any, where: str = "") -> tuple[Any, list[str]]:
    """``value`` with each NaN or infinity replaced by None, and the paths (``/uptime_s``) where that was done."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [where or "/"]
    if isinstance(value, dict):
        pairs = [(k, nulled_non_finite(v, f"{where}/{k}")) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, [w for _, (_, ws) in pairs for w in ws]
    if isinstance(value, (list, tuple)):
        items = [nulled_non_finite(v, f"{where}/{i}") for i, v in enumerate(value)]
        return [v for v, _ in items], [w for _, ws in items for w in ws]
    return value, []


def frame_envelope(record: Record, jpeg_b64: str | None = None) -> bytes:
    """MQTT 3.1.1 has no user properties: JSON with the metadata and the JPEG in base64."""
    if jpeg_b64 is None:
        jpeg_b64 = base64.b64encode(record.blob or b"").decode()
    return json.dumps({"envelope": "frame.v1", "meta": record.body, "jpeg_b64": jpeg_b64}).encode()


def frame_properties(record: Record) -> Properties:
    """A frame's v5 properties: its metadata travel beside the JPEG."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "image/jpeg"
    props.UserProperty = [("id", record.id), ("seq", str(record.seq)), ("meta", record.text)]
    return props


def encode(record: Record, v5: bool) -> tuple[bytes, Properties | None]:
    """Payload and v5 properties of an outbox record for its topic."""
    if record.kind != "frame":
        return record.text.encode(), None     # JSON; no properties (paho builds them in Python, per message)
    if not v5:
        return frame_envelope(record), None
    return record.blob or b"", frame_properties(record)


def wire_bytes(record: Record, v5: bool) -> int:
    """The size of a record as ``encode`` publishes it, against the broker's limit: the payload, and on v5 a
    frame's properties too (the metadata; a broker limiting whole packets counts them). Without encoding the
    JPEG: base64 is 4 characters for every 3 bytes started, none escaped in JSON."""
    if record.kind != "frame":
        return len(record.text.encode())
    jpeg = len(record.blob or b"")
    if v5:
        return jpeg + len(frame_properties(record).pack())
    return len(frame_envelope(record, "")) + 4 * ((jpeg + 2) // 3)


class MqttPublisher(threading.Thread):
    """Connect, publish status, drain the outbox, hand commands to ``on_command``; reconnect forever."""

    def __init__(self, cfg: AgentConfig, outbox: Outbox, metrics: Metrics,
                 status_body: Callable[[str], dict[str, Any]],
                 on_command: Callable[[str, bytes], None] | None = None) -> None:
        super().__init__(name="mqtt-publisher", daemon=True)
        self.cfg: MqttConfig = cfg.mqtt
        self.nice = cfg.model.pipeline_nice
        self.client_id = cfg.client_id
        self.topics = Topics(cfg.topic_root)
        self.outbox = outbox
        self.metrics = metrics
        self.status_body = status_body
        self.on_command = on_command
        self.state = ConnectionState(protocol="v311" if self.cfg.protocol == "v311" else "v5")
        self.connected = threading.Event()
        self._stop_at: float | None = None
        self._stopped = threading.Event()
        self._stats: deque[str] = deque(maxlen=8)
        self._status_dirty = False
        self._inflight: dict[int, Record] = {}
        self._acked: list[Record] = []
        # a message the broker refused (a PUBACK with a failure code: an ACL, a quota) stays in the outbox and is
        # sent again from the lowest refused seq once the window is empty, after a growing pause
        self._refused_seq: int | None = None
        self._retry_at = 0.0
        self._retry_delay = REFUSED_RETRY_S[0]
        self._connack: Any = None
        self._receive_maximum: int | None = None     # the v5 broker's Receive Maximum, from its CONNACK
        self._window = self.cfg.max_inflight         # QoS 1 publishes unacknowledged at once, the status included
        self._status_info: paho.MQTTMessageInfo | None = None     # the newest status, until its PUBACK
        self._session_acked = 0              # records acknowledged in this session
        self._session_since = 0.0            # when this session's CONNACK came (monotonic)
        self._v5_dropped = False             # auto: the last attempt's v5 CONNECT was dropped unanswered
        self._rng = random.Random()          # the reconnect jitter: its own, so stations never draw in step
        outbox.limit_messages(self.cfg.max_message_bytes, self._largest_wire_bytes)

    def _largest_wire_bytes(self, record: Record) -> int:
        """A record's size as published by this station: with ``protocol: auto``, by either protocol (which one
        the broker will speak when it is sent is not known when it is stored)."""
        v5_or_not = {"v5": (True,), "v311": (False,)}.get(self.cfg.protocol, (True, False))
        return max(wire_bytes(record, v5) for v5 in v5_or_not)

    # ------------------------------------------------------------ API for other threads

    def publish_stats(self, body: dict[str, Any]) -> None:
        """QoS 0, not stored: when offline, the newest few wait and older ones are counted as dropped.

        Serialized here, in the caller's thread: a body with NaN or an infinity raises ValueError there,
        never invalid JSON on the wire and never an exception in the MQTT thread."""
        text = dumps_finite(body)
        if len(self._stats) == self._stats.maxlen:
            self.metrics.inc("stats_dropped_total")
        self._stats.append(text)

    def request_status(self) -> None:
        self._status_dirty = True

    def stop(self, flush_s: float) -> None:
        """Drain what can be sent within ``flush_s``, publish offline, disconnect; returns when done."""
        self._stop_at = time.monotonic() + flush_s
        self.join(flush_s + CONNACK_TIMEOUT_S + 5)

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    # ------------------------------------------------------------ thread

    @property
    def _stopping(self) -> bool:
        return self._stop_at is not None

    def run(self) -> None:
        lower_this_thread(self.nice)
        delays = jittered(backoff_delays(self.cfg.reconnect), self._rng)
        while not self._stopping:
            try:
                proven = self._session()
            except Exception as exc:     # noqa: BLE001 - the outbox's disk or database: never the end of the thread
                self.metrics.inc("mqtt_session_errors_total")
                log.exception("mqtt: the session ended on an error (%s); reconnecting", exc)
                proven = False
            self._next_protocol()
            if proven:
                delays = jittered(backoff_delays(self.cfg.reconnect), self._rng)
            if self._stopping:
                break
            delay = next(delays)
            log.info("mqtt: reconnecting to %s:%d in %.1fs", self.cfg.host, self.cfg.port, delay)
            self._sleep(delay)
        self._stopped.set()

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < end:
            time.sleep(max(0.0, min(0.05, end - time.monotonic())))

    def _make_client(self) -> paho.Client:
        v5 = self.state.protocol == "v5"
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                             clean_session=None if v5 else True, reconnect_on_failure=False)
        client.max_inflight_messages_set(self.cfg.max_inflight)
        client.max_queued_messages_set(0)
        try:
            self.cfg.broker_settings().check().configure(client)
        except BrokerSettingsError as exc:
            raise ConfigError(str(exc)) from None
        client.will_set(self.topics.status, self._status_json("offline"), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _session(self) -> bool:
        """One connection, from CONNECT to its end. True when it proved itself: connected, and a record was
        acknowledged or it lasted ``STABLE_SESSION_S``."""
        where = f"{self.cfg.host}:{self.cfg.port}"
        try:
            client = self._make_client()
        except ConfigError as exc:
            return self._failed(str(exc))
        except (OSError, ValueError) as exc:      # e.g. a TLS file that is missing or not PEM
            return self._failed(f"cannot set up the connection to {where}: {exc}")
        self._connack = None
        self._receive_maximum = None
        try:
            client.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive_s)
        except ssl.SSLError as exc:
            return self._failed(f"TLS handshake with {where} failed: {exc.reason or exc}")
        except OSError as exc:
            return self._failed(f"cannot reach broker {where}: {exc.strerror or exc}")
        if not self._await_connack(client, where):
            return False
        try:
            self._on_connected(client)
            self._pump(client)
        finally:
            self._disconnect(client)
        return self._session_acked > 0 or time.monotonic() - self._session_since >= STABLE_SESSION_S

    def _failed(self, message: str) -> bool:
        self.state.last_error = message
        self.state.history.append(message)
        self.metrics.inc("mqtt_connect_failures_total")
        log.error("mqtt: %s", message)
        return False

    def _await_connack(self, client: paho.Client, where: str) -> bool:
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while self._connack is None and time.monotonic() < deadline and not self._stopping:
            if client.loop(0.05) != paho.MQTT_ERR_SUCCESS:
                break
        rc = self._connack
        if rc is not None and not rc.is_failure:
            return True
        client.disconnect()
        if rc is None:
            self._maybe_fall_back(None)
            return self._failed(f"no CONNACK from {where} (connection closed or timed out)")
        self.state.refusals += 1
        self.metrics.inc("mqtt_connect_refused_total")
        self._maybe_fall_back(rc.value)
        return self._failed(f"connection refused by {where}: {rc} (reason code {rc.value})")

    def _maybe_fall_back(self, code: int | None) -> None:
        """auto: a broker that does not speak v5 refuses or drops a v5 CONNECT; try 3.1.1 next.

        Only a CONNACK "unsupported protocol version" settles it for the life of the process. A connection
        closed before the CONNACK may be anything (a proxy in front of a broker still starting, a link cut):
        the next attempt tries 3.1.1, the one after v5 again (``_next_protocol``); a broker that has accepted
        v5 once is not tried with 3.1.1 for a drop at all."""
        if self.cfg.protocol != "auto" or self.state.protocol != "v5":
            return
        if code in UNSUPPORTED_PROTOCOL:
            log.warning("mqtt: broker refused MQTT v5 (reason code %d); using 3.1.1 from now on", code)
            self.state.v311_latched = True
            self.state.protocol = "v311"
        elif code is None and not self.state.v5_accepted:
            self._v5_dropped = True

    def _next_protocol(self) -> None:
        """auto, between two attempts: after a v5 CONNECT dropped unanswered, try 3.1.1; after an attempt with
        3.1.1 that no refusal of v5 settled, v5 again. A station that fell back for a dropped connection does not
        stay on 3.1.1 (where the broker's refusals of a publish cannot be seen) for the rest of its life."""
        dropped, self._v5_dropped = self._v5_dropped, False
        if self.cfg.protocol != "auto" or self.state.v311_latched:
            return
        if dropped:
            log.warning("mqtt: connection closed before a v5 CONNACK; trying 3.1.1 next, then v5 again")
            self.state.protocol = "v311"
        elif self.state.protocol == "v311":
            self.state.protocol = "v5"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = reason_code
        self._receive_maximum = getattr(properties, "ReceiveMaximum", None) if properties is not None else None

    def _on_connected(self, client: paho.Client) -> None:
        self.state.connected = True
        self.state.connects += 1
        self.state.v5_accepted = self.state.v5_accepted or self.state.protocol == "v5"
        self.state.last_error = None
        self.state.history.append("connected")
        self._session_acked = 0
        self._session_since = time.monotonic()
        self.connected.set()
        self.metrics.set("mqtt_connected", 1)
        # MQTT 5: never more unacknowledged QoS 1 publishes (the status included) than the broker's Receive Maximum;
        # a broker that enforces it ends the connection (0x93), at every try while a backlog lasts
        self._window = min(self.cfg.max_inflight, self._receive_maximum or self.cfg.max_inflight)
        self._status_info = None
        if self._window < self.cfg.max_inflight:
            log.info("mqtt: the broker takes %d unacknowledged messages at once (its Receive Maximum), fewer than "
                     "mqtt.max_inflight %d", self._window, self.cfg.max_inflight)
        log.info("mqtt: connected to %s:%d as %s (MQTT %s)", self.cfg.host, self.cfg.port, self.client_id,
                 self.state.protocol)
        client.subscribe(self.topics.cmd(), qos=1)
        self._publish_status(client, "online")
        self._inflight.clear()

    def _disconnect(self, client: paho.Client) -> None:
        if self.state.connected and not self._stopping:
            log.warning("mqtt: disconnected from %s:%d", self.cfg.host, self.cfg.port)
        self.state.connected = False
        self.connected.clear()
        self.metrics.set("mqtt_connected", 0)
        try:
            client.disconnect()
        except Exception:  # the socket may already be gone
            pass

    def _publish_status(self, client: paho.Client, state: str) -> paho.MQTTMessageInfo:
        self._status_dirty = False
        self._status_info = client.publish(self.topics.status, self._status_json(state), qos=1, retain=True)
        return self._status_info

    def _room(self) -> int:
        """How many more QoS 1 publishes the window takes now: the records in flight and a status not yet
        acknowledged count."""
        status = self._status_info is not None and self._status_info.rc == paho.MQTT_ERR_SUCCESS \
            and not self._status_info.is_published()
        return self._window - len(self._inflight) - int(status)

    def _status_json(self, state: str) -> str:
        """The status (or the will) as JSON, with the next sequence number. A NaN or an infinity in it is sent as
        null, logged with where it was and counted: neither invalid JSON on the wire nor, raised here, a session
        ended right after every connect with nothing of the outbox delivered."""
        body = dict(self.status_body(state), seq=self.outbox.next_seq())
        try:
            return dumps_finite(body)
        except ValueError:
            body, where = nulled_non_finite(body)
        self.metrics.inc("mqtt_status_non_finite_total")
        log.error("mqtt: the %s status had a non-finite number at %s; sent as null", state, ", ".join(where))
        return dumps_finite(body)

    # ------------------------------------------------------------ the drain loop

    def _pump(self, client: paho.Client) -> None:
        last_sent = 0
        while True:
            rc = client.loop(0.01)
            self._commit_acks()
            if rc != paho.MQTT_ERR_SUCCESS:
                return
            if self._stopping and self._flush_done():
                self._send_stats(client)     # the final stats, handed over just before the stop: before offline
                self._go_offline(client)
                return
            if self._refused_seq is not None and not self._inflight and time.monotonic() >= self._retry_at:
                last_sent = min(last_sent, self._refused_seq - 1)       # the refused ones, and on from there
                self._refused_seq = None
            if self._status_dirty and self._room() > 0:      # before the records: a full window never starves it
                self._publish_status(client, "online")
            last_sent = self._fill_window(client, last_sent)
            self._send_stats(client)

    def _send_stats(self, client: paho.Client) -> None:
        while self._stats:
            client.publish(self.topics.stats, self._stats.popleft(), qos=0)

    def _flush_done(self) -> bool:
        return time.monotonic() >= (self._stop_at or 0) or (not self._inflight and self.outbox.depth() == 0)

    def _fill_window(self, client: paho.Client, last_sent: int) -> int:
        room = self._room()
        if room <= 0 or self.outbox.last_seq <= last_sent:
            return last_sent
        v5 = self.state.protocol == "v5"
        for record in self.outbox.pending(after_seq=last_sent, limit=room):
            payload, props = encode(record, v5)
            if len(payload) + (len(props.pack()) if props is not None else 0) > self.cfg.max_message_bytes:
                self._drop_too_large(record, v5)
                last_sent = record.seq
                continue
            info = client.publish(self.topics.for_kind(record.kind), payload, qos=1, properties=props)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                break
            self._inflight[info.mid] = record
            last_sent = record.seq
        return last_sent

    def _drop_too_large(self, record: Record, v5: bool) -> None:
        """A stored message the broker would never take (stored before this limit applied): dropped, counted as
        ``too-large``, so it neither holds up the rest (v5) nor is taken for delivered (3.1.1)."""
        self.outbox.discard(record.seq, "too-large")
        log.error("mqtt: %s seq %d dropped: %d bytes as published over MQTT %s, more than the broker takes "
                  "(mqtt.max_message_bytes %d)", record.kind, record.seq, wire_bytes(record, v5),
                  "v5" if v5 else "3.1.1", self.cfg.max_message_bytes)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        record = self._inflight.pop(mid, None)
        if record is None:
            return
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            self.metrics.inc("mqtt_publish_rejected_total", kind=record.kind)
            first = self._refused_seq is None
            self._refused_seq = record.seq if first else min(self._refused_seq, record.seq)
            if first:
                self._retry_at = time.monotonic() + self._retry_delay
                self._retry_delay = min(self._retry_delay * 2, REFUSED_RETRY_S[1])
            log.error("mqtt: broker rejected %s seq %d: %s; kept in the outbox, sent again in %.0f s", record.kind,
                      record.seq, reason_code, max(0.0, self._retry_at - time.monotonic()))
            return
        self._retry_delay = REFUSED_RETRY_S[0] if self._refused_seq is None else self._retry_delay
        self._acked.append(record)

    def _commit_acks(self) -> None:
        """PUBACKs of one loop turn, deleted from the outbox in one transaction."""
        if not self._acked:
            return
        acked, self._acked = self._acked, []
        self.outbox.ack_many(r.seq for r in acked)
        self._session_acked += len(acked)
        now = time.time()
        for record in acked:
            self.metrics.inc("mqtt_published_total", kind=record.kind)
            self.metrics.observe("publish", max(0.0, now - record.created))
            if record.captured is not None:
                self.metrics.observe("capture_to_ack", max(0.0, now - record.captured))

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        """Commands go to ``on_command``; whatever a message holds, the network loop goes on."""
        try:
            prefix = self.topics.cmd("")
            topic = message.topic
            if topic.startswith(prefix) and self.on_command is not None:
                self.on_command(topic[len(prefix):], message.payload)
        except Exception:
            self.metrics.inc("commands_rejected_total", command="unreadable")
            log.exception("mqtt: message on %r not handed to the command thread", message._topic[:200])

    def _go_offline(self, client: paho.Client) -> None:
        """Retained offline status, then a clean disconnect (so the broker does not also send the will).

        The status waits for room in the window. When none comes before the deadline (a broker that stopped
        acknowledging), it could not be sent, and a clean DISCONNECT would discard the will and leave the retained
        status ``online`` for good: the connection is ended without one instead, and the broker sends the will."""
        deadline = time.monotonic() + 2.0
        while self._room() <= 0 and time.monotonic() < deadline:
            if client.loop(0.05) != paho.MQTT_ERR_SUCCESS:
                return
            self._commit_acks()
        if self._room() <= 0:
            self._end_with_will(client)
            return
        info = self._publish_status(client, "offline")
        while not info.is_published() and time.monotonic() < deadline:
            rc = client.loop(0.05)
            self._commit_acks()
            if rc != paho.MQTT_ERR_SUCCESS:
                break
        if not info.is_published():
            self._end_with_will(client)
            return
        log.info("mqtt: published offline status; outbox depth %d", self.outbox.depth())

    def _end_with_will(self, client: paho.Client) -> None:
        log.warning("mqtt: the broker did not acknowledge in time; leaving without a DISCONNECT, so that it "
                    "publishes the will (offline status); outbox depth %d", self.outbox.depth())
        sock = client.socket()
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
