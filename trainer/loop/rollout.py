"""Publish promoted bundles, serve them to stations, and roll them out: canary, the rest, rollback.

The steps, each a plain function the CLI and the tests call:

- ``publish_bundle``: copy a bundle into a served tree ``<root>/<name>/<version>/`` after the
  agent's own verification (``contract.bundle.load_bundle``) and the gate record written by
  ``python -m trainer retrain`` (``gate.json``): a rejected version is refused, always.
- ``BundleServer``: that tree over HTTP (standard library), which is what ``cmd/model`` URLs name.
- ``run_rollout``: ``cmd/model`` to a canary, wait for its retained status to report the new
  version (or its rejection), watch its stats, then the rest; ``run_rollback`` sends stations
  back to an earlier version. A ``RolloutHistory`` file records who ran what, from which URL.

Every step publishes a ``rollout-event.v1`` event (``trainer/loop/schemas``) on
``<topic root>/_central/rollout`` (retained, QoS 1) for the dashboard. Stations verify
hashes and signatures themselves; the rollout only reads what they report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import unquote, urljoin, urlparse

from contract.broker import (BrokerError, BrokerSettings, BrokerSettingsError, add_broker_args, connect,
                             settings_from_args)
from contract.messages import CENTRAL_SITE, ROLLOUT_SCHEMA as EVENT_SCHEMA, checker, rollout_topic, station_topic

log = logging.getLogger(__name__)

GATE_FILE = "gate.json"
GATE_LOG = "gate-log.jsonl"
INDEX_FILE = "index.json"
PUBLISHABLE = ("promoted", "baseline")
FETCH_TIMEOUT_S = 30


class RolloutError(ValueError):
    """A publish, rollout or rollback that cannot go ahead; the message names the file, URL or station."""


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- events

def validate_event(event: dict[str, Any]) -> None:
    """Raise RolloutError naming the field when ``event`` breaks ``rollout-event.v1``."""
    checker(EVENT_SCHEMA, "jsonschema").check(EVENT_SCHEMA, event, RolloutError)


def make_event(action: str, model: dict[str, str], *, ok: bool, reason: str | None = None,
               stations: Sequence[str] = (), figures: dict[str, Any] | None = None) -> dict[str, Any]:
    event = {"schema": EVENT_SCHEMA, "id": str(uuid.uuid4()), "ts": utc_now(),
             "model": {"name": model["name"], "version": model["version"]}, "action": action, "ok": ok,
             "reason": reason, "stations": sorted(stations), "figures": figures or {}}
    validate_event(event)
    return event


# ---------------------------------------------------------------- MQTT connection

def add_mqtt_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    add_broker_args(p, required=required, default_host=None,
                    title="broker" + ("" if required else " (events are published when --mqtt-host is given)"))


def mqtt_connect(options: BrokerSettings, purpose: str, *, on_connect: Callable[[Any], None] | None = None,
                 on_message: Callable[[Any, Any], None] | None = None):
    """A connected paho (2.x, MQTT v5) client with its network loop running; RolloutError if refused."""
    try:
        return connect(options, f"trainer-{purpose}", on_connect=on_connect, on_message=on_message)
    except (BrokerError, BrokerSettingsError) as exc:
        raise RolloutError(str(exc)) from None


def mqtt_publish(client, topic: str, payload: dict[str, Any], *, retain: bool = False, timeout_s: float = 15.0) -> None:
    """QoS 1 and wait for the PUBACK, so "sent" means the broker has it."""
    info = client.publish(topic, json.dumps(payload).encode(), qos=1, retain=retain)
    try:
        info.wait_for_publish(timeout_s)
    except (RuntimeError, ValueError) as exc:
        raise RolloutError(f"{topic}: publish failed ({exc})") from exc
    if not info.is_published():
        raise RolloutError(f"{topic}: no PUBACK from the broker within {timeout_s:.0f} s")


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
    path = Path(bundle_dir) / GATE_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
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
    with open(bundle_dir.parent / GATE_LOG, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def rejected_in_log(bundle_dir: Path, sha: str) -> dict[str, Any] | None:
    """A rejection of this exact manifest in the model's gate log, even if gate.json went missing."""
    path = Path(bundle_dir).parent / GATE_LOG
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("manifest_sha256") == sha and record.get("decision") == "rejected":
            return record
    return None


# ---------------------------------------------------------------- publish

@dataclass(frozen=True)
class PublishResult:
    name: str
    version: str
    path: Path
    url_path: str          # relative to the served root: "<name>/<version>/"
    sha256: str            # of manifest.json: what cmd/model carries
    decision: str
    already: bool = False


def _check_publishable(bundle_dir: Path, sha: str, root: Path, name: str, baseline: bool) -> dict[str, Any]:
    gate = read_gate(bundle_dir)
    logged = rejected_in_log(bundle_dir, sha)
    if (gate is not None and gate["decision"] == "rejected") or logged is not None:
        why = (gate or logged or {}).get("reason") or "see the retrain report"
        raise RolloutError(f"{bundle_dir}: rejected by the retrain gate ({why}); a rejected version is never published")
    if gate is not None:
        if gate.get("manifest_sha256") != sha:
            raise RolloutError(f"{bundle_dir / GATE_FILE}: field manifest_sha256: {gate.get('manifest_sha256')} "
                               f"is not the sha256 of this manifest.json ({sha}); the bundle changed after the gate")
        return gate
    if not baseline:
        raise RolloutError(f"{bundle_dir}: no {GATE_FILE}: only a version promoted by 'python -m trainer retrain' is "
                           "published (pass --baseline for the first version of a model, exported by 'trainer export')")
    others = [p.name for p in (root / name).iterdir() if p.is_dir() and not p.name.startswith(".")] \
        if (root / name).is_dir() else []
    if others:
        raise RolloutError(f"{bundle_dir}: --baseline is only for the first version of {name!r}, and {root / name} "
                           f"already holds {', '.join(sorted(others))}; later versions go through the retrain gate")
    return {"decision": "baseline", "manifest_sha256": sha, "name": name,
            "reason": "first version of the model, exported by 'trainer export' (not gated)", "ts": utc_now()}


def publish_bundle(bundle_dir: str | Path, root: str | Path, *, baseline: bool = False,
                   public_key: Path | None = None) -> PublishResult:
    """Copy a verified, promoted bundle into ``root/<name>/<version>/``; nothing appears there half-copied."""
    from contract.bundle import MANIFEST, SIGNATURE, BundleError, load_bundle, load_public_key

    bundle_dir, root = Path(bundle_dir), Path(root)
    try:
        bundle = load_bundle(bundle_dir, load_public_key(public_key) if public_key else None)
    except BundleError as exc:
        raise RolloutError(f"refusing to publish an unverifiable bundle: {exc}") from exc
    bundle_dir = bundle.root
    sha = manifest_sha256(bundle_dir)
    gate = _check_publishable(bundle_dir, sha, root, bundle.name, baseline)
    target = root / bundle.name / bundle.version
    url_path = f"{bundle.name}/{bundle.version}/"
    if target.exists():
        if (target / MANIFEST).exists() and manifest_sha256(target) == sha:
            return PublishResult(bundle.name, bundle.version, target, url_path, sha, gate["decision"], already=True)
        raise RolloutError(f"{target}: version {bundle.version} is already published with another manifest; "
                           "a published version is never replaced (export a new version)")
    partial = target.parent / f".{bundle.version}.partial-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir(parents=True)
        files = [MANIFEST] + ([SIGNATURE] if (bundle_dir / SIGNATURE).exists() else [])
        files += [a.path.relative_to(bundle_dir).as_posix() for a in bundle.artifacts]
        for rel in files:
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle_dir / rel, partial / rel)
        write_json_atomic(partial / GATE_FILE, gate)
        load_bundle(partial, load_public_key(public_key) if public_key else None)   # the copy, checked again
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _update_index(root / bundle.name, bundle.version, sha, gate["decision"])
    log.info("published %s %s at %s", bundle.name, bundle.version, target)
    return PublishResult(bundle.name, bundle.version, target, url_path, sha, gate["decision"])


def _update_index(model_dir: Path, version: str, sha: str, decision: str) -> None:
    path = model_dir / INDEX_FILE
    index = json.loads(path.read_text()) if path.exists() else {"versions": {}}
    index["versions"][version] = {"path": f"{version}/", "manifest_sha256": sha, "decision": decision,
                                  "published_at": utc_now()}
    write_json_atomic(path, index)


# ---------------------------------------------------------------- serve

class _BundleHandler(SimpleHTTPRequestHandler):
    """Files of the served tree, GET/HEAD only; no directory listings, nothing hidden (half-copied bundles)."""

    server_version = "inventory-bundles/1"

    def send_head(self):  # noqa: D401 (http.server API)
        parts = [p for p in unquote(urlparse(self.path).path).split("/") if p]
        if any(p.startswith(".") for p in parts):
            self.send_error(404, "not found")
            return None
        return super().send_head()

    def list_directory(self, path):  # noqa: ARG002 (http.server API)
        self.send_error(404, "no directory listings")
        return None

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s " + fmt, self.address_string(), *args)


class BundleServer:
    """The served tree over HTTP(S) with the standard library, in a background thread."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                 tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise RolloutError(f"{self.root}: served folder does not exist (publish a bundle into it first)")
        handler = functools.partial(_BundleHandler, directory=str(self.root))
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.scheme = "http"
        if tls_cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls_cert), str(tls_key) if tls_key else None)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="bundle-server", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"{self.scheme}://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}/"

    def start(self) -> "BundleServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- the bundle a rollout sends

@dataclass(frozen=True)
class RemoteBundle:
    """A published bundle as stations will fetch it: its location, identity and manifest sha256."""

    location: str
    name: str
    version: str
    sha256: str
    gate: dict[str, Any]

    @property
    def model(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}

    def command(self) -> dict[str, Any]:
        """The cmd/model payload (contract/schemas/mqtt/cmd-model.v1.json)."""
        return {"bundle": self.location, "sha256": self.sha256, "version": self.version}


def _read_location(location: str, rel: str, *, optional: bool = False) -> bytes | None:
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        base = location if location.endswith("/") else location + "/"
        url = urljoin(base, rel)
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            if optional and exc.code == 404:
                return None
            raise RolloutError(f"{url}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise RolloutError(f"{url}: cannot fetch ({exc})") from exc
    if parsed.scheme not in ("", "file"):
        raise RolloutError(f"{location}: unsupported bundle location (a path, file://, http:// or https://)")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else location) / rel
    if not path.exists():
        if optional:
            return None
        raise RolloutError(f"{path}: does not exist")
    return path.read_bytes()


def resolve_bundle(location: str) -> RemoteBundle:
    """Read a published bundle's manifest and gate record where stations will fetch it.

    Refuses a version the gate rejected, one without a gate record (not published by
    ``trainer publish``), and one whose manifest changed after the gate.
    """
    raw = _read_location(location, "manifest.json")
    assert raw is not None
    try:
        manifest = json.loads(raw)
        name, version = manifest["name"], manifest["version"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RolloutError(f"{location}: manifest.json is not a bundle manifest ({exc})") from exc
    sha = hashlib.sha256(raw).hexdigest()
    gate_raw = _read_location(location, GATE_FILE, optional=True)
    if gate_raw is None:
        raise RolloutError(f"{location}: no {GATE_FILE}; roll out only bundles published by 'python -m trainer publish'")
    try:
        gate = json.loads(gate_raw)
    except json.JSONDecodeError as exc:
        raise RolloutError(f"{location}{GATE_FILE}: not valid JSON ({exc})") from exc
    if gate.get("decision") not in PUBLISHABLE:
        raise RolloutError(f"{location}: {name} {version} was {gate.get('decision')} by the retrain gate "
                           f"({gate.get('reason')}); it is never rolled out")
    if gate.get("manifest_sha256") != sha:
        raise RolloutError(f"{location}: manifest.json (sha256 {sha}) is not the one the gate decided on "
                           f"({gate.get('manifest_sha256')})")
    return RemoteBundle(location, name, version, sha, gate)


def sibling_location(location: str, version: str) -> str:
    """The same model's ``version`` in the same served tree (``<root>/<name>/<version>/``)."""
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        base = location if location.endswith("/") else location + "/"
        return urljoin(base, f"../{version}/")
    return str(Path(unquote(parsed.path) if parsed.scheme == "file" else location).parent / version)


# ---------------------------------------------------------------- stations over MQTT

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
            body = json.loads(msg.payload)
        except (UnicodeDecodeError, ValueError):
            log.warning("%s: not JSON; ignored", msg.topic)
            return
        if not isinstance(body, dict):
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


# ---------------------------------------------------------------- the canary watch (pure)

@dataclass(frozen=True)
class WatchPolicy:
    """What the canary must show on the new version before the rest get it."""

    watch_s: float = 120.0
    max_low_conf_rate: float | None = None       # absolute cap on the new model's rate, 0..1
    max_low_conf_increase: float = 0.05          # allowed rise over the rate before the update, 0..1
    max_errors: int = 0                          # inference errors after the command was sent
    min_frames: int = 20                         # frames the new model must classify to be judged
    baseline_s: float = 30.0                     # stats gathered before the command, for the "before" rate


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str | None
    figures: dict[str, Any]


def _counts(stats: dict[str, Any]) -> tuple[int, int, int] | None:
    keys = ("frames_classified", "frames_low_confidence", "inference_errors")
    if not all(isinstance(stats.get(k), int) for k in keys):
        return None
    return stats["frames_classified"], stats["frames_low_confidence"], stats["inference_errors"]


def rate_over(stats: Sequence[dict[str, Any]]) -> tuple[float | None, int]:
    """Low-confidence rate and frames between the first and last stats message (cumulative counters).

    With one message (or an agent without the counters) it is the rate since the agent started.
    """
    if not stats:
        return None, 0
    first, last = _counts(stats[0]), _counts(stats[-1])
    if first is not None and last is not None and len(stats) > 1 and last[0] - first[0] > 0:
        frames = last[0] - first[0]
        return (last[1] - first[1]) / frames, frames
    if last is not None and last[0] > 0:
        return last[1] / last[0], last[0]
    rate = stats[-1].get("low_confidence_rate")
    return (float(rate) if isinstance(rate, (int, float)) else None), 0


def judge_canary(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], version: str,
                 policy: WatchPolicy) -> Verdict:
    """Does the canary's stats show the new version behaving? ``before``: stats up to the command;
    ``after``: stats received since. Counters are cumulative since the agent started."""
    new = [s for s in after if s.get("model_version") == version]
    counted = [c for c in map(_counts, new) if c is not None]
    if len(counted) >= 2 and any(b[0] < a[0] for a, b in zip(counted, counted[1:])):
        return Verdict(False, "the canary's counters went back during the watch (the agent restarted)",
                       {"stats_messages": len(new)})
    rate_before, frames_before = rate_over(before)
    if len(counted) >= 2:
        frames = counted[-1][0] - counted[0][0]
        rate_after = (counted[-1][1] - counted[0][1]) / frames if frames else None
    else:
        frames, rate_after = 0, None
    # Errors count from the last stats before the command (else the first on the new version): every
    # failure after the command is the new model's, including those before its first stats message.
    base = (_counts(before[-1]) if before else None) or (counted[0] if counted else None)
    last = counted[-1] if counted else None
    errors = max(0, last[2] - base[2]) if last and base else 0
    figures = {"low_confidence_rate_before": _round(rate_before), "frames_before": frames_before,
               "low_confidence_rate_after": _round(rate_after), "frames_after": frames,
               "inference_errors": errors, "stats_messages": len(new), "watch_s": policy.watch_s}
    if errors > policy.max_errors:
        return Verdict(False, f"{errors} inference error(s) on the canary since the command "
                              f"(at most {policy.max_errors} allowed)", figures)
    if frames < policy.min_frames or rate_after is None:
        return Verdict(False, f"the canary classified {frames} frame(s) with {version} during the watch "
                              f"({len(new)} stats message(s)); at least {policy.min_frames} are needed to judge it "
                              "(a longer --watch-s, or --min-frames 0 to accept an idle canary)", figures) \
            if policy.min_frames > 0 else Verdict(True, "idle canary accepted (--min-frames 0)", figures)
    if policy.max_low_conf_rate is not None and rate_after > policy.max_low_conf_rate:
        return Verdict(False, f"low-confidence rate {rate_after:.1%} on {version} is above --max-low-conf-rate "
                              f"{policy.max_low_conf_rate:.1%}", figures)
    if rate_before is not None and rate_after > rate_before + policy.max_low_conf_increase + 1e-12:
        return Verdict(False, f"low-confidence rate rose from {rate_before:.1%} to {rate_after:.1%} on {version} "
                              f"(+{(rate_after - rate_before) * 100:.1f} points; at most "
                              f"{policy.max_low_conf_increase * 100:.1f} allowed)", figures)
    before_txt = f"{rate_before:.1%} before" if rate_before is not None else "no rate before"
    return Verdict(True, f"{frames} frames on {version}: low-confidence rate {rate_after:.1%} ({before_txt}), "
                         f"{errors} inference errors", figures)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# ---------------------------------------------------------------- history

class RolloutHistory:
    """Per station, every version sent and where it came from; written atomically after each change."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise RolloutError(f"{self.path}: rollout history is not valid JSON ({exc})") from exc
            if not isinstance(self.data, dict) or self.data.get("schema") != "rollout-history.v1":
                raise RolloutError(f"{self.path}: field schema: expected rollout-history.v1")
        else:
            self.data = {"schema": "rollout-history.v1", "bundles": {}, "stations": {}}

    def record(self, station: str, *, action: str, bundle: RemoteBundle, from_version: str | None, ok: bool,
               reason: str | None) -> None:
        self.data["bundles"][f"{bundle.name}/{bundle.version}"] = {
            "name": bundle.name, "version": bundle.version, "bundle": bundle.location, "sha256": bundle.sha256}
        self.data["stations"].setdefault(station, []).append({
            "ts": utc_now(), "action": action, "name": bundle.name, "version": bundle.version,
            "from_version": from_version, "bundle": bundle.location, "sha256": bundle.sha256, "ok": ok,
            "reason": reason})
        write_json_atomic(self.path, self.data)

    def entries(self, station: str) -> list[dict[str, Any]]:
        return list(self.data["stations"].get(station, []))

    def previous_version(self, station: str, current: str | None) -> str | None:
        """What the station ran before ``current`` (the from_version of the switch that installed it)."""
        for entry in reversed(self.entries(station)):
            if entry["ok"] and entry["version"] == current and entry["from_version"] not in (None, current):
                return entry["from_version"]
        return None

    def location_of(self, version: str, station: str | None = None) -> str | None:
        """Where ``version`` was published: recorded directly, else beside a version of the same tree."""
        for info in self.data["bundles"].values():
            if info["version"] == version:
                return info["bundle"]
        entries = self.entries(station) if station else [e for es in self.data["stations"].values() for e in es]
        return sibling_location(entries[-1]["bundle"], version) if entries else None


# ---------------------------------------------------------------- rollout and rollback

@dataclass
class StationOutcome:
    station: str
    before: str | None
    after: str | None
    ok: bool
    reason: str | None
    role: str = "rest"     # canary | rest


@dataclass
class Summary:
    action: str
    bundle: RemoteBundle
    outcomes: list[StationOutcome] = field(default_factory=list)
    halted: str | None = None
    canary: Verdict | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.halted is None and all(o.ok for o in self.outcomes)

    def table(self) -> str:
        rows = [("station", "role", "before", "now", "outcome")]
        for o in self.outcomes:
            rows.append((o.station, o.role, o.before or "-", o.after or "-",
                         "ok" if o.ok else f"FAILED: {o.reason}"))
        for station, why in sorted(self.skipped.items()):
            rows.append((station, "-", "-", "-", f"skipped: {why}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        head = f"{self.action} {self.bundle.name} {self.bundle.version}: " + (
            f"HALTED: {self.halted}" if self.halted else ("done" if self.ok else "finished with failures"))
        return "\n".join([head, *lines])


@dataclass(frozen=True)
class RolloutPlan:
    bundle: RemoteBundle
    stations: list[str]
    canary: str | None
    policy: WatchPolicy | None           # None: no watch (a rollback by default)
    update_timeout_s: float = 300.0
    rollback_canary: bool = True
    action: str = "rollout"              # rollout | rollback


def select_stations(link: StationLink, *, stations: Sequence[str] = (), group: Path | None = None,
                    all_stations: bool = False) -> tuple[list[str], dict[str, str]]:
    """The stations named, listed in a group file (one <site>/<station> a line, # comments), or every
    station with a retained status (online ones; offline ones are returned as skipped)."""
    chosen: list[str] = list(stations)
    if group is not None:
        try:
            lines = Path(group).read_text().splitlines()
        except OSError as exc:
            raise RolloutError(f"{group}: cannot read the station group ({exc.strerror or exc})") from exc
        for n, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if line:
                if line.count("/") != 1:
                    raise RolloutError(f"{group}:{n}: expected <site>/<station>, got {line!r}")
                chosen.append(line)
    skipped: dict[str, str] = {}
    if all_stations:
        for station in link.known_stations():
            if link.snapshot(station).online:
                chosen.append(station)
            else:
                skipped[station] = "offline (its retained status says so); it gets no command"
    for station in chosen:
        if station.count("/") != 1 or not all(station.split("/")):
            raise RolloutError(f"station {station!r}: expected <site>/<station>")
    seen: dict[str, None] = dict.fromkeys(chosen)
    if not seen:
        raise RolloutError("no stations: name them (--stations), list them (--group FILE) or use --all")
    return list(seen), skipped


class Rollout:
    """Runs a plan over a StationLink; emits events and writes the history as it goes."""

    def __init__(self, link: StationLink, plan: RolloutPlan, history: RolloutHistory, events: EventSink) -> None:
        self.link, self.plan, self.history, self.events = link, plan, history, events
        self.summary = Summary(plan.action, plan.bundle)

    def _emit(self, action: str, ok: bool, reason: str | None, stations: Sequence[str], figures=None,
              model: dict[str, str] | None = None) -> None:
        self.events.emit(make_event(action, model or self.plan.bundle.model, ok=ok, reason=reason,
                                    stations=stations, figures=figures))

    def run(self) -> Summary:
        plan = self.plan
        if plan.policy is not None and plan.canary:
            self.link.follow_stats([plan.canary])
            self._baseline = self._gather_baseline(plan.canary, plan.policy.baseline_s)
        rest = [s for s in plan.stations if s != plan.canary]
        if plan.canary:
            if not self._canary(plan.canary):
                return self.summary
        outcomes = self._switch(rest, "rest")
        failed = [o for o in outcomes if not o.ok]
        all_done = [o.station for o in self.summary.outcomes]
        figures = {"versions": {o.station: o.after for o in self.summary.outcomes},
                   "failed": {o.station: o.reason for o in failed}}
        reason = (f"{len(all_done) - len(failed)} of {len(all_done)} station(s) run {plan.bundle.version}"
                  + (f"; failed: {', '.join(o.station for o in failed)}" if failed else ""))
        self._emit(plan.action, not failed, reason, all_done, figures)
        return self.summary

    def _gather_baseline(self, canary: str, seconds: float) -> list[dict[str, Any]]:
        if seconds > 0:
            log.info("gathering %.0f s of %s stats before the update", seconds, canary)
            time.sleep(seconds)
        return [s for _, s in self.link.snapshot(canary).stats]

    def _canary(self, canary: str) -> bool:
        plan = self.plan
        sent_at = self.link.clock()
        [outcome] = self._switch([canary], "canary")
        if not outcome.ok:
            self._halt(f"canary {canary}: {outcome.reason}", [canary])
            return False
        self._emit("canary", True, f"{canary} runs {plan.bundle.version}"
                   + (f"; watching it for {plan.policy.watch_s:.0f} s" if plan.policy else ""), [canary],
                   {"before": outcome.before, "after": outcome.after})
        if plan.policy is None:
            return True
        verdict = self._watch(canary, sent_at)
        self.summary.canary = verdict
        if not verdict.ok:
            reason = f"canary {canary}: {verdict.reason}"
            rolled = self._rollback_canary(canary, outcome.before) if plan.rollback_canary else None
            self._halt(reason + (f"; {rolled}" if rolled else ""), [canary], verdict.figures)
            return False
        self._emit("canary", True, f"{canary} passed the watch: {verdict.reason}", [canary], verdict.figures)
        return True

    def _watch(self, canary: str, sent_at: float) -> Verdict:
        policy = self.plan.policy
        assert policy is not None
        deadline = self.link.clock() + policy.watch_s
        while self.link.clock() < deadline:
            view = self.link.snapshot(canary)
            if not view.online:
                return Verdict(False, "went offline during the watch", {"watch_s": policy.watch_s})
            if view.version != self.plan.bundle.version:
                return Verdict(False, f"reports version {view.version} during the watch", {})
            after = [s for t, s in view.stats if t >= sent_at]
            early = judge_canary(self._baseline, after, self.plan.bundle.version,
                                 WatchPolicy(policy.watch_s, None, 1.0, policy.max_errors, 0))
            if not early.ok:              # too many errors: no need to wait for the end
                return early
            time.sleep(min(0.25, max(0.0, deadline - self.link.clock())))
        after = [s for t, s in self.link.snapshot(canary).stats if t >= sent_at]
        return judge_canary(self._baseline, after, self.plan.bundle.version, policy)

    def _rollback_canary(self, canary: str, before: str | None) -> str:
        if before is None:
            return "its previous version is unknown: roll it back with 'python -m trainer rollback'"
        try:
            location = self.history.location_of(before, canary) or sibling_location(self.plan.bundle.location, before)
            previous = resolve_bundle(location)
            if previous.version != before:
                raise RolloutError(f"{location} holds {previous.version}, not {before}")
        except RolloutError as exc:
            return f"could not roll it back to {before} ({exc}); use 'python -m trainer rollback --to {before}'"
        back = _SwitchTo(self, previous, "rollback").run([canary], "canary")[0]
        self._emit("rollback", back.ok, f"canary {canary} back on {before}" if back.ok else back.reason, [canary],
                   {"before": back.before, "after": back.after}, model=previous.model)
        return f"rolled back to {before}" if back.ok else f"rollback to {before} failed: {back.reason}"

    def _halt(self, reason: str, stations: Sequence[str], figures: dict[str, Any] | None = None) -> None:
        self.summary.halted = reason
        untouched = [s for s in self.plan.stations if s not in stations]
        self._emit("halt", False, reason + (f"; not sent to {', '.join(untouched)}" if untouched else ""),
                   stations, {**(figures or {}), "not_sent": untouched})

    def _switch(self, stations: Sequence[str], role: str) -> list[StationOutcome]:
        outcomes = _SwitchTo(self, self.plan.bundle, self.plan.action).run(stations, role)
        self.summary.outcomes.extend(outcomes)
        return outcomes


class _SwitchTo:
    """Send one bundle to some stations at once, then wait for each to report it (or refuse it)."""

    def __init__(self, rollout: Rollout, bundle: RemoteBundle, action: str) -> None:
        self.r, self.bundle, self.action = rollout, bundle, action

    def run(self, stations: Sequence[str], role: str) -> list[StationOutcome]:
        link, version = self.r.link, self.bundle.version
        before = {s: link.snapshot(s) for s in stations}
        outcomes: dict[str, StationOutcome] = {}
        for s in stations:
            view = before[s]
            if view.status is None:
                outcomes[s] = StationOutcome(s, None, None, False, "no retained status: unknown or never connected", role)
            elif view.version == version:
                outcomes[s] = StationOutcome(s, view.version, view.version, True, None, role)
        pending = [s for s in stations if s not in outcomes]
        for s in pending:
            link.send_model(s, self.bundle)
            log.info("cmd/model %s -> %s", version, s)
        deadline = link.clock() + self.r.plan.update_timeout_s
        for s in pending:
            answer = link.wait_until(lambda s=s: self._answer(s, before[s]), max(0.0, deadline - link.clock()))
            view = link.snapshot(s)
            if answer is None:
                outcomes[s] = StationOutcome(s, before[s].version, view.version, False,
                                             f"no status reporting {version} within {self.r.plan.update_timeout_s:.0f} s "
                                             f"(state {(view.status or {}).get('state')}, version {view.version})", role)
            else:
                ok, reason = answer
                outcomes[s] = StationOutcome(s, before[s].version, view.version, ok, reason, role)
            o = outcomes[s]
            self.r.history.record(s, action=self.action, bundle=self.bundle, from_version=o.before, ok=o.ok,
                                  reason=o.reason)
        return [outcomes[s] for s in stations]

    def _answer(self, station: str, before: StationView) -> tuple[bool, str | None] | None:
        view = self.r.link.views.get(station)       # called under the link's lock
        if view is None or view.status is None:
            return None
        if view.online and view.version == self.bundle.version:
            return True, None
        update = view.last_update
        if update and update != before.last_update and update.get("ok") is False:
            return False, f"the station refused {self.bundle.version}: {update.get('reason')}"
        return None


def run_rollout(link: StationLink, plan: RolloutPlan, history: RolloutHistory, events: EventSink) -> Summary:
    return Rollout(link, plan, history, events).run()


def rollback_targets(link: StationLink, history: RolloutHistory, stations: Sequence[str], to: str,
                     bundle_location: str | None) -> tuple[dict[str, RemoteBundle], dict[str, str]]:
    """Per station, the published bundle to go back to: ``to`` a version, or ``previous`` from the history."""
    targets: dict[str, RemoteBundle] = {}
    problems: dict[str, str] = {}
    resolved: dict[str, RemoteBundle] = {}
    for s in stations:
        current = link.snapshot(s).version
        version = history.previous_version(s, current) if to == "previous" else to
        if version is None:
            problems[s] = (f"the history {history.path} has no version before {current} for this station; "
                           "name one with --to VERSION")
            continue
        location = bundle_location or history.location_of(version, s)
        if location is None:
            problems[s] = f"no published location of {version} in {history.path}; pass --bundle-url"
            continue
        try:
            bundle = resolved.get(location) or resolve_bundle(location)
        except RolloutError as exc:
            problems[s] = str(exc)
            continue
        resolved[location] = bundle
        if bundle.version != version:
            problems[s] = f"{location} holds version {bundle.version}, not {version}"
            continue
        targets[s] = bundle
    return targets, problems


def run_rollback(link: StationLink, history: RolloutHistory, events: EventSink, stations: Sequence[str], to: str,
                 *, bundle_location: str | None = None, update_timeout_s: float = 300.0) -> list[Summary]:
    """Send stations back to an earlier version, one group per target bundle.

    A station whose target cannot be found (no history, not published) gets no command: a halt
    event says why, and it is listed as failed in the last summary.
    """
    targets, problems = rollback_targets(link, history, stations, to, bundle_location)
    groups: dict[str, list[str]] = {}
    for station, bundle in targets.items():
        groups.setdefault(bundle.location, []).append(station)
    summaries = []
    for members in groups.values():
        plan = RolloutPlan(targets[members[0]], members, None, None, update_timeout_s, action="rollback")
        summaries.append(Rollout(link, plan, history, events).run())
    if problems:
        model = {"name": next(iter(targets.values())).name if targets else "unknown", "version": to}
        events.emit(make_event("halt", model, ok=False, stations=sorted(problems), figures={"problems": problems},
                               reason="rollback not sent to " + "; ".join(f"{s}: {why}" for s, why in problems.items())))
        failed = summaries[-1] if summaries else Summary("rollback", RemoteBundle("", model["name"], to, "", {}))
        failed.outcomes.extend(StationOutcome(s, link.snapshot(s).version, link.snapshot(s).version, False, why)
                               for s, why in problems.items())
        if not summaries:
            summaries.append(failed)
    return summaries


# ---------------------------------------------------------------- CLI

def add_rollout_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="copy a promoted bundle into the served tree stations fetch from")
    p.add_argument("bundle", type=Path, help="models/<name>/<version>")
    p.add_argument("--root", type=Path, required=True, help="the served tree (what serve-bundles serves)")
    p.add_argument("--baseline", action="store_true",
                   help="the first version of a model, exported by 'trainer export' (never gated)")
    p.add_argument("--public-key", type=Path, default=None, help="check the bundle's signature with this key")
    p.add_argument("--base-url", default=None, help="URL of the served root, to print the bundle's URL")
    add_mqtt_args(p, required=False)

    p = sub.add_parser("serve-bundles", help="serve the published tree over HTTP for cmd/model")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--host", default="0.0.0.0", help="address to bind")
    p.add_argument("--port", type=int, default=8070)
    p.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", type=Path, default=None)

    for verb in ("rollout", "rollback"):
        p = sub.add_parser(verb, help="send cmd/model to a canary, watch it, then the rest" if verb == "rollout"
                           else "send stations back to an earlier published version")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--stations", default=None, help="comma-separated <site>/<station>")
        who.add_argument("--group", type=Path, default=None, help="file: one <site>/<station> a line")
        who.add_argument("--all", dest="all_stations", action="store_true",
                         help="every station with an online retained status")
        if verb == "rollout":
            p.add_argument("--bundle-url", required=True, help="published bundle: http(s)://.../<name>/<version>/ or path")
            p.add_argument("--canary", default=None, help="<site>/<station> first (default: the first station)")
            p.add_argument("--no-canary", action="store_true", help="send to every station at once, no watch")
            p.add_argument("--watch-s", type=float, default=120.0, help="how long the canary is watched")
            p.add_argument("--baseline-s", type=float, default=30.0,
                           help="stats gathered before the command for the 'before' low-confidence rate")
            p.add_argument("--max-low-conf-rate", type=float, default=None, help="halt above this rate (0..1)")
            p.add_argument("--max-low-conf-increase", type=float, default=0.05,
                           help="halt when the rate rises more than this over the rate before (0..1)")
            p.add_argument("--max-errors", type=int, default=0, help="inference errors the canary may have")
            p.add_argument("--min-frames", type=int, default=20, help="frames the canary must classify to be judged")
            p.add_argument("--rollback-canary", action=argparse.BooleanOptionalAction, default=True,
                           help="send a canary that failed its watch back to its previous version")
        else:
            p.add_argument("--to", default="previous", help="VERSION, or 'previous' (per station, from the history)")
            p.add_argument("--bundle-url", default=None, help="where that version is published (default: history)")
        p.add_argument("--update-timeout-s", type=float, default=300.0,
                       help="how long a station may take to fetch, verify and switch")
        p.add_argument("--history", type=Path, default=Path("rollout-history.json"),
                       help="per-station record of versions and bundle URLs")
        add_mqtt_args(p, required=True)


def cmd_publish(args: argparse.Namespace) -> int:
    result = publish_bundle(args.bundle, args.root, baseline=args.baseline, public_key=args.public_key)
    url = urljoin(args.base_url if args.base_url.endswith("/") else args.base_url + "/", result.url_path) \
        if args.base_url else result.url_path
    print(f"{'already published' if result.already else 'published'} {result.name} {result.version} "
          f"({result.decision}) at {result.path}")
    print(f"bundle URL  {url}\nsha256      {result.sha256}  (of manifest.json)")
    if not result.already:
        publish_event_once(settings_from_args(args), make_event(
            "publish", {"name": result.name, "version": result.version}, ok=True,
            reason=f"published ({result.decision}) as {url}",
            figures={"manifest_sha256": result.sha256, "decision": result.decision}))
    return 0


def cmd_serve_bundles(args: argparse.Namespace) -> int:
    server = BundleServer(args.root, args.host, args.port, tls_cert=args.tls_cert, tls_key=args.tls_key)
    print(f"serving {args.root} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


def _connect_link(args) -> tuple[StationLink, EventSink]:
    options = settings_from_args(args)
    assert options is not None
    link = StationLink(options).connect()
    link.settle()
    return link, EventSink(link.client, rollout_topic(options.topic_root))


def cmd_rollout(args: argparse.Namespace) -> int:
    bundle = resolve_bundle(args.bundle_url)
    link, events = _connect_link(args)
    try:
        stations, skipped = select_stations(link, stations=_split(args.stations), group=args.group,
                                            all_stations=args.all_stations)
        canary = None if args.no_canary else (args.canary or stations[0])
        if canary is not None and canary not in stations:
            stations.insert(0, canary)
        policy = None if args.no_canary else WatchPolicy(args.watch_s, args.max_low_conf_rate,
                                                         args.max_low_conf_increase, args.max_errors,
                                                         args.min_frames, args.baseline_s)
        plan = RolloutPlan(bundle, stations, canary, policy, args.update_timeout_s, args.rollback_canary)
        summary = run_rollout(link, plan, RolloutHistory(args.history), events)
        summary.skipped.update(skipped)
    finally:
        link.close()
    print(summary.table())
    return 0 if summary.ok else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    link, events = _connect_link(args)
    try:
        stations, skipped = select_stations(link, stations=_split(args.stations), group=args.group,
                                            all_stations=args.all_stations)
        summaries = run_rollback(link, RolloutHistory(args.history), events, stations, args.to,
                                 bundle_location=args.bundle_url, update_timeout_s=args.update_timeout_s)
    finally:
        link.close()
    for summary in summaries:
        summary.skipped.update(skipped)
        print(summary.table())
    return 0 if summaries and all(s.ok for s in summaries) else 1


def _split(value: str | None) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()] if value else []
