"""Rollout events and gate records: what the trainer, the rollout and the dashboard agree on.

``make_event`` builds a ``rollout-event.v1`` event (contract/schemas/rollout-event.v1.json) and checks it;
``EventSink`` logs it and publishes it retained, QoS 1, on ``<topic root>/_central/rollout``;
``publish_event_once`` does that on a short connection of its own (retrain's gate, publish).
The gate record (``gate.json`` beside a bundle, one line per decision in the model's
``gate-log.jsonl``) is written by ``retrain`` and read by ``publish``: a rejected version is never
published.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from contract.broker import BrokerError, BrokerSettings, BrokerSettingsError, connect
from contract.messages import ROLLOUT_SCHEMA as EVENT_SCHEMA
from contract.messages import checker, dumps_finite, loads_finite, rollout_topic

log = logging.getLogger(__name__)

GATE_FILE = "gate.json"
GATE_LOG = "gate-log.jsonl"
GATE_MAX_BYTES = 1 << 20      # a gate record is a few kB; more is not one (and is not read into memory)


class RolloutError(ValueError):
    """A publish, rollout or rollback that cannot go ahead; the message names the file, URL or station."""


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    text = dumps_finite(data, indent=1)      # a record with NaN or an infinity is refused, never written
    with open(tmp, "w") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path, *, strict: bool = False) -> None:
    """A rename or a new file survives a power cut only once its folder is synced too. ``strict`` raises
    the OSError; by default a folder that cannot be synced (some network file systems) is left as it is."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------- events

def validate_event(event: dict[str, Any]) -> None:
    """Raise RolloutError naming the field when ``event`` breaks ``rollout-event.v1`` or holds NaN or an
    infinity (no dashboard could read it)."""
    checker(EVENT_SCHEMA, "jsonschema").check(EVENT_SCHEMA, event, RolloutError)
    try:
        dumps_finite(event)
    except ValueError as exc:
        raise RolloutError(f"{EVENT_SCHEMA}: a figure is not finite ({exc})") from None


def make_event(action: str, model: dict[str, str], *, ok: bool, reason: str | None = None,
               stations: Sequence[str] = (), figures: dict[str, Any] | None = None) -> dict[str, Any]:
    event = {"schema": EVENT_SCHEMA, "id": str(uuid.uuid4()), "ts": utc_now(),
             "model": {"name": model["name"], "version": model["version"]}, "action": action, "ok": ok,
             "reason": reason, "stations": sorted(stations), "figures": figures or {}}
    validate_event(event)
    return event


_PUBACK_CODES = "_rollout_puback_codes"      # the attribute of a paho client that holds its PUBACK reason codes
_PUBACK_KEEP = 1024                           # codes of publishes nobody waited for are dropped past this many


def _puback_codes(client: Any) -> dict[int, Any]:
    """The PUBACK reason codes of this client's publishes by message id, kept by an ``on_publish`` hook installed
    once (chaining any hook already there). paho calls ``on_publish`` before it marks the message published, so
    a publish whose wait ended finds its code here."""
    codes = getattr(client, _PUBACK_CODES, None)
    if codes is None:
        codes = {}
        chained = client.on_publish

        def on_publish(c: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
            if len(codes) >= _PUBACK_KEEP:
                codes.pop(next(iter(codes)), None)
            codes[mid] = reason_code
            if chained is not None:
                chained(c, userdata, mid, reason_code, properties)

        setattr(client, _PUBACK_CODES, codes)
        client.on_publish = on_publish
    return codes


def mqtt_publish(client, topic: str, payload: dict[str, Any], *, retain: bool = False, timeout_s: float = 15.0) -> None:
    """QoS 1 and wait for the PUBACK, so "sent" means the broker has it; RolloutError naming the topic when the
    broker refuses it (MQTT v5 reason code 0x80 or above, e.g. 0x87 Not authorized from its ACL): a refused
    command reaches no station, and waiting for the station to switch would blame it for the broker."""
    codes = _puback_codes(client)
    info = client.publish(topic, dumps_finite(payload).encode(), qos=1, retain=retain)
    try:
        info.wait_for_publish(timeout_s)
    except (RuntimeError, ValueError) as exc:
        raise RolloutError(f"{topic}: publish failed ({exc})") from exc
    if not info.is_published():
        raise RolloutError(f"{topic}: no PUBACK from the broker within {timeout_s:.0f} s")
    code = codes.pop(info.mid, None)
    if code is not None and getattr(code, "is_failure", False):
        raise RolloutError(f"{topic}: the broker refused the publish ({code}, reason code {code.value:#04x}); "
                           "check that this MQTT user may write the topic (the broker's ACL)")


class EventSink:
    """Where events go: the broker's central rollout topic when one is configured, and always the log."""

    def __init__(self, client=None, topic: str | None = None) -> None:
        self.client = client
        self.topic = topic
        self.sent: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        validate_event(event)
        (log.info if event["ok"] else log.warning)(
            "event %s %s %s ok=%s: %s", event["action"], event["model"]["name"], event["model"]["version"],
            event["ok"], event["reason"])
        if self.client is not None and self.topic is not None:
            mqtt_publish(self.client, self.topic, event, retain=True)
        self.sent.append(event)


def mqtt_connect(options: BrokerSettings, purpose: str, *, on_connect: Callable[[Any], None] | None = None,
                 on_message: Callable[[Any, Any], None] | None = None) -> Any:
    """A connected paho (2.x, MQTT v5) client with its network loop running (client id ``trainer-<purpose>-<random>``
    unless the settings name one); RolloutError naming the broker when it cannot be reached or refuses."""
    try:
        return connect(options, f"trainer-{purpose}", on_connect=on_connect, on_message=on_message)
    except (BrokerError, BrokerSettingsError) as exc:
        raise RolloutError(str(exc)) from None


def publish_event_once(options: BrokerSettings | None, event: dict[str, Any]) -> None:
    """One event on its own short connection (retrain's gate, publish); only logged without a broker."""
    if options is None:
        EventSink().emit(event)
        return
    client = mqtt_connect(options, "events")
    try:
        EventSink(client, rollout_topic(options.topic_root)).emit(event)
    finally:
        client.disconnect()
        client.loop_stop()


# ---------------------------------------------------------------- gate records

def read_gate(bundle_dir: Path) -> dict[str, Any] | None:
    """The gate record beside a bundle, or None where there is none; RolloutError naming the file when it
    cannot be read, is not UTF-8 JSON (NaN, infinities and nesting past the parser's depth included) or names
    no decision, is not a regular file (a FIFO would block the read for good, a link to /dev/zero never end it) or
    is larger than ``GATE_MAX_BYTES``."""
    from contract.bundle import BundleError, read_small_file  # numpy and OpenCV: only once a record is read

    path = Path(bundle_dir) / GATE_FILE
    if not path.exists():
        return None
    try:
        record = loads_finite(read_small_file(path, GATE_MAX_BYTES, "a gate record").decode("utf-8"))
    except OSError as exc:
        raise RolloutError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except BundleError as exc:      # "<path>: not a regular file" / "<path>: more than a gate record's ... bytes"
        raise RolloutError(f"{path}: cannot read ({str(exc).removeprefix(f'{path}: ')})") from None
    except UnicodeDecodeError as exc:
        raise RolloutError(f"{path}: not UTF-8 (byte {exc.start}: {exc.reason})") from exc
    except ValueError as exc:       # JSONDecodeError, NonFiniteError, NestingError
        raise RolloutError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or record.get("decision") not in ("promoted", "rejected", "baseline"):
        raise RolloutError(f"{path}: field decision: expected promoted, rejected or baseline")
    return record


def manifest_sha256(bundle_dir: Path) -> str:
    return hashlib.sha256((Path(bundle_dir) / "manifest.json").read_bytes()).hexdigest()


def write_gate(bundle_dir: Path, record: dict[str, Any]) -> None:
    """The gate decision beside the bundle, and one line in the model's append-only gate log."""
    bundle_dir = Path(bundle_dir)
    write_json_atomic(bundle_dir / GATE_FILE, record)
    line = dumps_finite(record) + "\n"
    with open(bundle_dir.parent / GATE_LOG, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)          # two retrains of one model append whole lines, one at a time
        fh.seek(0, os.SEEK_END)
        if fh.tell():
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":            # a line torn by a crash: this record starts on a line of its own
                line = "\n" + line
        fh.write(line.encode())
        fh.flush()
        os.fsync(fh.fileno())


def rejected_in_log(bundle_dir: Path, sha: str) -> dict[str, Any] | None:
    """A rejection of this exact manifest in the model's gate log, even if gate.json went missing."""
    path = Path(bundle_dir).parent / GATE_LOG
    if not path.exists():
        return None
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise RolloutError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    for n, line in enumerate(text.splitlines(), 1):
        try:
            record = loads_finite(line)
        except ValueError:      # JSONDecodeError, NonFiniteError (NaN), NestingError ("[[[[...")
            # a line a crash tore (an older writer glued the next record to it) or that is no record: a rejection
            # of this manifest in it still counts, whatever else the line holds
            if sha in line and '"rejected"' in line:
                log.warning("%s:%d: not a whole JSON line; it names %s as rejected", path, n, sha[:12])
                return {"decision": "rejected", "manifest_sha256": sha, "reason": f"{path}:{n} (a torn line)"}
            continue
        if isinstance(record, dict) and record.get("manifest_sha256") == sha and record.get("decision") == "rejected":
            return record
    return None
