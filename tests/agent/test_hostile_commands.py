"""Hostile commands, bundles and downloads: whatever arrives on cmd/model, cmd/thresholds or cmd/capture-empty,
or from a bundle server, the station refuses it in its status, counts it, and its command thread serves the next
command; a model that cannot do its job is refused before the swap, and NaN never leaves as a confidence.

Real parts: mosquitto, ONNX Runtime, real ONNX models (onnx.helper and the torch-exported tiny bundle), a real
HTTP server on localhost that serves oversized, dripping and mismatched bundles.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import paho.mqtt.client as paho
import pytest
from agent_support import as_config, inference_stage, make_onnx_bundle, station_config, validate_message
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.app import COMMAND_QUEUE, Agent
from agent.backends import BackendError
from agent.demo import Subscriber
from agent.sources.base import Frame
from agent.update import ModelCommand, fetch_bundle, verify_command_bundle
from contract.bundle import MANIFEST, BundleError, load_bundle
from contract.messages import ENGINES, checker, loads_finite

ROOT = "inventory/test/st-01"


# ------------------------------------------------------------------ a running station and an operator

class Operator:
    """A paho client that sends raw command payloads, as anyone allowed on cmd/# could."""

    def __init__(self, broker) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="operator")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, verb: str, payload: bytes) -> None:
        self.client.publish(f"{ROOT}/cmd/{verb}", payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def last_status(d: Subscriber) -> dict:
    """The newest status, read with the strict reader: a NaN or an infinity in it fails the test."""
    return loads_finite(d.of("status")[-1].payload) if d.of("status") else {}


def field_of(d: Subscriber, name: str) -> dict:
    return last_status(d).get(name) or {}


def command_thread(agent: Agent) -> threading.Thread:
    return next(t for t in agent._threads if t.name == "commands")


@pytest.fixture
def station(broker, tiny_bundle, fmnist_video, tmp_path):
    cfg = as_config(station_config(
        tmp_path, tiny_bundle, str(fmnist_video), broker.port,
        cameras=[{"id": "cam-a", "uri": str(fmnist_video), "loop": True, "fps": 25, "backpressure": "drop_oldest"}],
        model={"download_dir": str(tmp_path / "downloads")},
        frames={"enabled": True},
        health={"stats_interval_s": 0.3}))
    dashboard = Subscriber(broker.host, broker.port, ROOT)
    agent = Agent(cfg)
    agent.fetch_deadline_s = 5
    agent.start()
    operator = Operator(broker)
    assert dashboard.wait_for(lambda d: last_status(d).get("state") == "online", 20)
    yield agent, dashboard, operator
    operator.close()
    agent.shutdown(5)
    dashboard.close()


class Marker:
    """Good cmd/thresholds with a fresh min_confidence each time: once the status shows it applied, every
    command sent before it has been handled (one thread runs them in order), a cmd/model handed on to the
    model-update thread, which may still be running it."""

    def __init__(self) -> None:
        self.n = 0

    def send_and_wait(self, agent: Agent, dashboard: Subscriber, operator: Operator) -> None:
        self.n += 1
        value = round(0.001 * (self.n % 900 + 1), 3)
        operator.send("thresholds", json.dumps({"camera": "cam-a", "min_confidence": value}).encode())
        applied = lambda d: ((field_of(d, "last_thresholds_update").get("applied") or {})  # noqa: E731
                             .get("min_confidence") == value)
        assert dashboard.wait_for(applied, 30), f"the good cmd/thresholds ({value}) was not applied"
        assert command_thread(agent).is_alive()


# ------------------------------------------------------------------ named probes, one per class

def local_bundles(tmp_path: Path) -> dict[str, Path]:
    return {"labels": make_onnx_bundle(tmp_path / "labels", classes=4, labels=5, version="labels-5"),
            "shape": make_onnx_bundle(tmp_path / "shape", size=16, model_size=8, version="shape-8"),
            "nan": make_onnx_bundle(tmp_path / "nan", nan="always", version="nan-1")}


def test_every_hostile_cmd_model_ends_in_a_rejection_naming_the_field(station, tmp_path, http_bundles):
    agent, dashboard, operator = station
    bundles = local_bundles(tmp_path)
    wrong_type = http_bundles.add_bundle("wrong-type", tmp_path, mutate=lambda m: m["artifacts"][0].update(path=5))
    cases = [
        (b"\xff\xfe\x00", "cmd/model: payload is not UTF-8"),
        (b'{"bundle": 5}', "field bundle"),
        (b'{"bundle": "x", "sha256": 7}', "field sha256"),
        (b'{"bundle": "x", "version": ["a"]}', "field version"),
        (b'{"bundle": "x", "version": "../../etc"}', "field version"),
        (b'{"bundle": "http://[::1/x"}', "field bundle"),
        (b'{"bundle": "x", "sha256": NaN}', "cmd/model: payload is not JSON"),
        (b'{"bundle": "x", "extra": 1e999}', "cmd/model: payload is not JSON"),
        (b'{"bundle": "' + b"a" * 100_000 + b'"}', "more than"),
        (b'{"bundle": "a\\u0000b"}', "field bundle"),
        (json.dumps({"bundle": wrong_type}).encode(), "field artifacts/0/path"),
        (json.dumps({"bundle": str(bundles["shape"])}).encode(), "field input says (N, 3, 16, 16)"),
        (json.dumps({"bundle": str(bundles["labels"])}).encode(), "4 outputs per image but field labels has 5"),
        (json.dumps({"bundle": str(bundles["nan"])}).encode(), "non-finite"),
    ]
    for payload, reason in cases:
        before = agent.metrics.counter("model_updates_rejected_total")
        previous = field_of(dashboard, "last_model_update").get("ts")
        operator.send("model", payload)
        refused = lambda d: (field_of(d, "last_model_update").get("ts") != previous  # noqa: E731
                             and reason in (field_of(d, "last_model_update").get("reason") or ""))
        assert dashboard.wait_for(refused, 30), (payload[:80], field_of(dashboard, "last_model_update"))
        update = field_of(dashboard, "last_model_update")
        assert update["ok"] is False and update["running"] == {"name": "tiny", "version": "tiny-1"}
        assert agent.metrics.counter("model_updates_rejected_total") == before + 1
        validate_message("status.v1", last_status(dashboard))
    assert agent.model.current.bundle.version == "tiny-1" and command_thread(agent).is_alive()
    Marker().send_and_wait(agent, dashboard, operator)


@pytest.mark.parametrize("version", ["v1\n", "", ".hidden", "a/b", "x" * 129])
def test_a_cmd_model_version_the_manifest_schema_would_refuse_is_refused_at_parse(version):
    """The command's version is checked with the manifest's own name rule (contract.bundle.NAME_PATTERN),
    whole: a trailing newline, which ``^...$`` with ``match`` lets through, is refused too."""
    with pytest.raises(BundleError, match="field version"):
        ModelCommand.parse(json.dumps({"bundle": "http://central/b/", "version": version}).encode())
    assert ModelCommand.parse(json.dumps({"bundle": "http://central/b/", "version": "v1.2_rc-3"}).encode()).version


def test_a_cmd_model_giving_a_field_twice_is_refused_at_parse():
    """Two bundle locations in one command: the parser would keep the second, where the sender may have meant
    the first. Refused by name, as every JSON the product reads (contract.messages.loads_finite)."""
    raw = b'{"bundle": "http://central/a/", "version": "v1", "bundle": "http://central/b/"}'
    with pytest.raises(BundleError, match="cmd/model: payload is not JSON \\(key 'bundle' given twice"):
        ModelCommand.parse(raw)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_cmd_model_schema_and_the_agent_agree_on_what_a_command_is(engine):
    """A misspelt field ("sha265") was accepted by both, and the bundle then installed without its hash check."""
    sha = "ab" * 32
    good = [{"bundle": "http://central/b/"}, {"bundle": "/opt/b", "sha256": sha, "version": "v1.2_rc-3"},
            {"bundle": "file:///opt/b", "sha256": sha.upper()}, {"bundle": "x" * 2048}]
    bad = [{"bundle": "http://central/b/", "sha265": sha}, {"bundle": "http://central/b/", "extra": 1},
           {"bundle": ""}, {"bundle": "x" * 2049}, {"bundle": "b", "sha256": "ab"}, {"bundle": "b", "version": "a/b"},
           {"bundle": "b", "version": "v" * 129}, {"sha256": sha}, ["b"]]
    check = checker("cmd-model.v1", engine)
    for body in good:
        assert check.error(body) is None, body
        ModelCommand.parse(json.dumps(body).encode())
    for body in bad:
        assert check.error(body) is not None, body
        with pytest.raises(BundleError, match="cmd/model: "):
            ModelCommand.parse(json.dumps(body).encode())
    with pytest.raises(BundleError, match="cmd/model: field 'sha265': not a field of cmd/model"):
        ModelCommand.parse(json.dumps(bad[0]).encode())


def test_hostile_thresholds_and_capture_empty_are_refused_naming_the_field(station):
    agent, dashboard, operator = station
    cases = [
        ("thresholds", b'{"max_entropy": 1e999}', "field max_entropy: not a finite number"),
        ("thresholds", b'{"min_confidence": NaN}', "field min_confidence: not a finite number"),
        ("thresholds", b'{"camera": "cam-a", "min_margin": -Infinity}', "field min_margin: not a finite number"),
        ("thresholds", b'{"min_confidence": "high"}', "field min_confidence"),
        ("thresholds", b'{"camera": 5}', "field camera"),
        ("thresholds", b"[1, 2]", "(top level)"),
        ("thresholds", b"\xc3\x28", "payload: not UTF-8"),
        ("thresholds", b"{" * 50_000, "payload"),
        ("capture-empty", b'{"count": 1e999}', "field count: not a finite number"),
        ("capture-empty", b'{"count": "many"}', "field count"),
        ("capture-empty", b'{"cameras": [1]}', "field cameras"),
        ("capture-empty", b"\xff", "payload: not UTF-8"),
    ]
    status_field = {"thresholds": "last_thresholds_update", "capture-empty": "last_capture_empty"}
    for verb, payload, reason in cases:
        before = agent.metrics.counter("commands_rejected_total", command=verb)
        previous = field_of(dashboard, status_field[verb]).get("ts")
        operator.send(verb, payload)
        refused = lambda d: (field_of(d, status_field[verb]).get("ts") != previous  # noqa: E731
                             and reason in (field_of(d, status_field[verb]).get("reason") or ""))
        assert dashboard.wait_for(refused, 20), (verb, payload[:60], field_of(dashboard, status_field[verb]))
        assert field_of(dashboard, status_field[verb])["ok"] is False
        assert agent.metrics.counter("commands_rejected_total", command=verb) == before + 1
        validate_message("status.v1", last_status(dashboard))
    # the policy never took a non-finite threshold, and the next good command is served
    assert all(np.isfinite(v) for t in agent.inference.threshold_overrides.values()
               for v in t.model_dump(exclude_none=True).values())
    Marker().send_and_wait(agent, dashboard, operator)


def test_a_command_dropped_because_the_queue_is_full_is_published_as_rejected(tiny_bundle, tmp_path):
    """The MQTT thread never blocks on the command queue; a command it cannot queue is refused in the status."""
    cfg = as_config(station_config(tmp_path, tiny_bundle, str(tmp_path), 1))
    agent = Agent(cfg)          # not started: nothing takes commands off the queue
    for _ in range(COMMAND_QUEUE):
        agent._enqueue_command("thresholds", b'{"min_confidence": 0.5}')
    agent._enqueue_command("thresholds", b'{"min_confidence": 0.6}')
    agent._enqueue_command("model", b'{"bundle": "x"}')
    assert agent.last_thresholds["ok"] is False and "dropped" in agent.last_thresholds["reason"]
    assert agent.last_update["ok"] is False and "dropped" in agent.last_update["reason"]
    assert agent.metrics.counter("commands_dropped_total") == 2


def test_the_stats_thread_survives_a_failing_round(station):
    agent, dashboard, _ = station
    real, calls = agent.stats_body, []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk I/O error")
        return real()

    agent.stats_body = failing_once
    assert dashboard.wait_for(lambda d: len(calls) >= 3 and len(d.of("stats")) > 0, 20)
    n = len(dashboard.of("stats"))
    assert dashboard.wait_for(lambda d: len(d.of("stats")) >= n + 2, 20)
    assert agent.metrics.counter("stats_errors_total") == 1


# ------------------------------------------------------------------ property: any payload, the thread goes on

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
locations = st.sampled_from(["http://[::1", "http://", "ftp://x/y", "file:///nonexistent", "http://127.0.0.1:1/x",
                             "", "\x00", "https://user@:99999/", "/", "."]) | st.text(max_size=20)
model_bodies = st.fixed_dictionaries({}, optional={"bundle": locations | json_values, "sha256": json_values,
                                                   "version": json_values | st.text(max_size=10)})
threshold_bodies = st.fixed_dictionaries({}, optional={
    "camera": json_values | st.just("cam-a"), "min_confidence": json_values | st.floats(),
    "min_margin": st.floats(), "max_entropy": st.floats() | json_values})
capture_bodies = st.fixed_dictionaries({}, optional={"count": json_values | st.integers(-5, 60),
                                                     "cameras": json_values | st.just(["cam-a"])})
raw = st.binary(max_size=120) | st.sampled_from([b'{"max_entropy": 1e999}', b'{"count": 1e999}', b"{" * 5000])
commands = st.one_of(
    st.tuples(st.just("model"), model_bodies.map(lambda b: json.dumps(b).encode()) | raw),
    st.tuples(st.just("thresholds"), threshold_bodies.map(lambda b: json.dumps(b).encode()) | raw),
    st.tuples(st.just("capture-empty"), capture_bodies.map(lambda b: json.dumps(b).encode()) | raw),
    st.tuples(st.sampled_from(["model", "thresholds", "capture-empty", "nope"]),
              json_values.map(lambda v: json.dumps(v).encode())))


@settings(max_examples=25)
@given(batch=st.lists(commands, min_size=1, max_size=6))
@example(batch=[("model", b'{"bundle": "http://[::1"}'), ("model", b'{"bundle": "https://user@:99999/"}'),
                ("thresholds", b'{"max_entropy": 1e999}'), ("model", b'{"bundle": "x", "version": "../.."}')])
def test_any_command_payloads_leave_the_command_thread_serving(station, batch):
    agent, dashboard, operator = station
    marker = getattr(agent, "_test_marker", None) or Marker()
    agent._test_marker = marker
    rejected_before = agent.metrics.counter("model_updates_rejected_total")
    for verb, payload in batch:
        operator.send(verb, payload)
    marker.send_and_wait(agent, dashboard, operator)
    # no random payload names a real bundle: every cmd/model was refused (on the model-update thread, which the
    # marker does not wait for), and said so
    models = sum(1 for verb, _ in batch if verb == "model")
    refused = lambda d: (agent.metrics.counter("model_updates_rejected_total") == rejected_before + models  # noqa: E731
                         and (not models or field_of(d, "last_model_update").get("ok") is False))
    assert dashboard.wait_for(refused, 30), (agent.metrics.counter("model_updates_rejected_total"), rejected_before,
                                             models)
    assert agent.model.current.bundle.version == "tiny-1"
    validate_message("status.v1", last_status(dashboard))


# ------------------------------------------------------------------ the inference thread: no NaN leaves

def test_a_frame_with_non_finite_logits_is_an_inference_error_and_the_next_frame_is_classified(tmp_path):
    """A model that passed its warm-up but gives NaN on some frames (here: bright ones): those frames are
    counted as inference errors, never published with ``confidence: NaN``; the others are classified."""
    bundle_dir = make_onnx_bundle(tmp_path / "models", nan="bright")
    cfg = as_config(station_config(tmp_path, bundle_dir, str(tmp_path), 1, frames={"enabled": False}))
    stage, outbox, metrics, _ = inference_stage(cfg, bundle_dir)    # the warm-up passes: NaN only on bright frames
    white = np.full((32, 32, 3), 255, np.uint8)
    dark = np.full((32, 32, 3), 60, np.uint8)
    frames = [Frame("cam-a", i, 1000.0 + i, 0.0, image) for i, image in enumerate([dark, white, dark, white])]
    stage.process(frames[:2])
    stage.process(frames[2:])
    stage.process([frames[1]])           # a batch of nothing but bad frames
    stage.process([frames[0]])
    results = [r.body for r in outbox.pending(limit=100) if r.kind == "result"]
    assert [b["frame_seq"] for b in results] == [0, 2, 0]
    assert all(np.isfinite(b["confidence"]) for b in results)
    assert metrics.counter("inference_errors_total") == 3
    outbox.close()


def test_a_model_whose_outputs_are_nan_is_refused_at_load_naming_the_bundle(tmp_path):
    from agent.app import build_runtime

    for kwargs, reason in [({"nan": "always"}, "non-finite"), ({"classes": 4, "labels": 6}, "labels has 6"),
                           ({"model_size": 8}, "field input says")]:
        bundle_dir = make_onnx_bundle(tmp_path / str(len(reason)), **kwargs)
        cfg = as_config(station_config(tmp_path, bundle_dir, str(tmp_path), 1))
        with pytest.raises((BundleError, BackendError), match=reason) as err:
            build_runtime(cfg, load_bundle(bundle_dir))
        assert str(bundle_dir) in str(err.value)


# ------------------------------------------------------------------ bounded downloads from a real HTTP server

class BundleSite:
    """A real HTTP server; each path is served by a function of the handler; every request is recorded."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.requests: list[str] = []
        self.sent: dict[str, int] = {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:       # noqa: N802 (http.server's name)
                site.requests.append(self.path)
                route = site.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_bundle(self, name: str, tmp_path: Path, mutate: Callable[[dict], None] | None = None,
                   **kwargs) -> str:
        """A real bundle served under /<name>/ (its manifest changed by ``mutate``); the bundle URL."""
        folder = make_onnx_bundle(tmp_path / "served" / name, version=name, **kwargs)
        if mutate is not None:
            manifest = json.loads((folder / MANIFEST).read_text())
            mutate(manifest)
            (folder / MANIFEST).write_text(json.dumps(manifest))
        for item in folder.iterdir():
            self.routes[f"/{name}/{item.name}"] = functools.partial(serve_bytes, item.read_bytes())
        return f"{self.base}/{name}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_bytes(data: bytes, handler: BaseHTTPRequestHandler, length: int | None = None) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(data) if length is None else length))
    handler.end_headers()
    handler.wfile.write(data)


def serve_forever_bytes(site: BundleSite, key: str, handler: BaseHTTPRequestHandler) -> None:
    """No Content-Length, 64 KiB blocks until the client hangs up (or 64 MiB): a server that never stops."""
    handler.send_response(200)
    handler.end_headers()
    site.sent[key] = 0
    block = b"\0" * 65536
    while site.sent[key] < 64 << 20:
        handler.wfile.write(block)
        site.sent[key] += len(block)


def serve_drip(data: bytes, every_s: float, handler: BaseHTTPRequestHandler) -> None:
    """The right Content-Length, then one byte every ``every_s`` seconds."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    for i in range(len(data)):
        handler.wfile.write(data[i:i + 1])
        handler.wfile.flush()
        time.sleep(every_s)


@pytest.fixture
def http_bundles():
    site = BundleSite()
    yield site
    site.close()


def manifest_sha(site: BundleSite, name: str) -> str:
    route = site.routes[f"/{name}/{MANIFEST}"]
    return hashlib.sha256(route.args[0]).hexdigest()


def command(url: str, sha: str | None = None, version: str | None = None) -> ModelCommand:
    return ModelCommand.parse(json.dumps({"bundle": url, "sha256": sha, "version": version}).encode())


def test_an_artifact_larger_than_the_manifest_says_is_cut_off_at_its_size(http_bundles, tmp_path):
    url = http_bundles.add_bundle("big", tmp_path)
    key = "/big/model.fp32.onnx"
    http_bundles.routes[key] = functools.partial(serve_forever_bytes, http_bundles, key)
    started = time.monotonic()
    with pytest.raises(BundleError, match=r"model.fp32.onnx: more than the \d+ bytes expected"):
        verify_command_bundle(command(url, manifest_sha(http_bundles, "big")), tmp_path / "dl", None, deadline_s=30)
    assert time.monotonic() - started < 10
    assert http_bundles.sent[key] < 16 << 20        # stopped early: socket buffers, not the 64 MiB on offer
    assert not any((tmp_path / "dl").iterdir())       # nothing left behind


def test_a_content_length_above_the_manifest_size_is_refused_before_reading(http_bundles, tmp_path):
    url = http_bundles.add_bundle("announced", tmp_path)
    http_bundles.routes["/announced/model.fp32.onnx"] = functools.partial(serve_bytes, b"\0" * 10, length=300 << 20)
    with pytest.raises(BundleError, match="server announces 314572800 bytes"):
        verify_command_bundle(command(url), tmp_path / "dl", None, deadline_s=30)


def test_a_huge_manifest_is_cut_off(http_bundles, tmp_path):
    url = http_bundles.add_bundle("huge", tmp_path)
    key = f"/huge/{MANIFEST}"
    http_bundles.routes[key] = functools.partial(serve_forever_bytes, http_bundles, key)
    with pytest.raises(BundleError, match=r"manifest.json: more than the 1048576 bytes expected"):
        verify_command_bundle(command(url), tmp_path / "dl", None, deadline_s=30)


def test_the_manifest_hash_is_checked_before_any_artifact_is_fetched(http_bundles, tmp_path):
    url = http_bundles.add_bundle("mismatch", tmp_path)
    with pytest.raises(BundleError, match="does not match the command's 0000.*no artifact fetched"):
        verify_command_bundle(command(url, "0" * 64), tmp_path / "dl", None, deadline_s=30)
    assert http_bundles.requests == [f"/mismatch/{MANIFEST}"]


def test_a_dripping_server_is_cut_off_at_the_deadline(http_bundles, tmp_path):
    url = http_bundles.add_bundle("drip", tmp_path)
    data = http_bundles.routes["/drip/model.fp32.onnx"].args[0]
    http_bundles.routes["/drip/model.fp32.onnx"] = functools.partial(serve_drip, data, 0.2)
    started = time.monotonic()
    with pytest.raises(BundleError, match="not finished within its 1.5 s deadline"):
        verify_command_bundle(command(url, manifest_sha(http_bundles, "drip")), tmp_path / "dl", None, deadline_s=1.5)
    assert time.monotonic() - started < 5      # the deadline, not one timeout per byte


def test_a_stalled_server_is_cut_off_at_the_deadline(http_bundles, tmp_path):
    url = http_bundles.add_bundle("stall", tmp_path)
    http_bundles.routes[f"/stall/{MANIFEST}"] = lambda h: (h.send_response(200), h.send_header("Content-Length", "100"),
                                                            h.end_headers(), time.sleep(10))
    started = time.monotonic()
    with pytest.raises(BundleError, match="stall/manifest.json"):
        fetch_bundle(url, tmp_path / "dl", None, deadline_s=1.5)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("manifest, reason", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"artifacts": [{"path": 5, "size": "big"}]}', "field"),
    (b'{"schema_version": 1, "quality": {"thresholds": {"min_confidence": NaN}}}', "not valid JSON"),
    (b"[]", r"field \(top level\)"),
])
def test_a_served_manifest_that_is_not_a_manifest_is_refused_naming_the_url(http_bundles, tmp_path, manifest, reason):
    url = http_bundles.add_bundle("bad", tmp_path)
    http_bundles.routes[f"/bad/{MANIFEST}"] = functools.partial(serve_bytes, manifest)
    with pytest.raises(BundleError, match=reason) as err:
        verify_command_bundle(command(url), tmp_path / "dl", None, deadline_s=30)
    assert f"{url}{MANIFEST}" in str(err.value)
    assert http_bundles.requests == [f"/bad/{MANIFEST}"]


def test_a_truncated_artifact_is_refused(http_bundles, tmp_path):
    url = http_bundles.add_bundle("short", tmp_path)
    data = http_bundles.routes["/short/model.fp32.onnx"].args[0]
    http_bundles.routes["/short/model.fp32.onnx"] = functools.partial(serve_bytes, data[:-10])
    with pytest.raises(BundleError, match="truncated"):
        verify_command_bundle(command(url), tmp_path / "dl", None, deadline_s=30)


def test_a_good_served_bundle_still_installs(http_bundles, tmp_path):
    url = http_bundles.add_bundle("good", tmp_path)
    bundle = verify_command_bundle(command(url, manifest_sha(http_bundles, "good"), "good"), tmp_path / "dl", None,
                                   deadline_s=30)
    assert bundle.root == tmp_path / "dl" / bundle.name / "good" and bundle.version == "good"
