"""Model reload over cmd/model while cameras run; stats topic and the Prometheus endpoint."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import threading
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from agent_support import as_config, station_config, validate_message

from agent.app import Agent
from agent.demo import Subscriber
from contract.bundle import MANIFEST

pytestmark = pytest.mark.mqtt
ROOT = "inventory/test/st-01"


def bundle_version(src: Path, dest: Path, version: str) -> Path:
    """A copy of a bundle under another version (same weights), as the trainer would publish it."""
    shutil.copytree(src, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["version"] = version
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return dest


def sha(path: Path) -> str:
    return hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()


def send(broker, verb: str, body: dict) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="operator")
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(f"{ROOT}/cmd/{verb}", json.dumps(body), qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def last_status(d: Subscriber) -> dict:
    return json.loads(d.of("status")[-1].payload) if d.of("status") else {}


@pytest.fixture
def live_agent(broker, tiny_bundle, fmnist_video, tmp_path):
    cfg = as_config(station_config(
        tmp_path, tiny_bundle, str(fmnist_video), broker.port,
        cameras=[{"id": "cam-a", "uri": str(fmnist_video), "loop": True, "fps": 25, "backpressure": "drop_oldest"}],
        model={"download_dir": str(tmp_path / "downloads")},
        health={"prometheus_port": 0, "stats_interval_s": 0.3}))
    dashboard = Subscriber(broker.host, broker.port, ROOT)
    agent = Agent(cfg)
    agent.start()
    # The station subscribes to cmd/# before it publishes "online" on the same connection: once the status is
    # here a command cannot arrive before the subscription (a loaded machine connects late otherwise).
    assert dashboard.wait_for(lambda d: last_status(d).get("state") == "online", 60), "the station never came online"
    yield agent, dashboard
    agent.shutdown(5)
    dashboard.close()


def test_update_swaps_model_without_stopping_cameras_and_bad_updates_keep_it(live_agent, broker, tiny_bundle,
                                                                                tmp_path):
    agent, dashboard = live_agent
    assert dashboard.wait_for(lambda d: len(d.of("result")) >= 5, 20)
    v2 = bundle_version(tiny_bundle, tmp_path / "v2", "tiny-2")
    send(broker, "model", {"bundle": str(v2), "sha256": sha(v2), "version": "tiny-2"})
    assert dashboard.wait_for(lambda d: (last_status(d).get("model") or {}).get("version") == "tiny-2", 20)
    assert last_status(dashboard)["last_model_update"]["ok"] is True
    n = len(dashboard.of("result"))
    assert dashboard.wait_for(lambda d: len(d.of("result")) >= n + 5, 10)
    assert json.loads(dashboard.of("result")[-1].payload)["model"]["version"] == "tiny-2"

    tampered = bundle_version(tiny_bundle, tmp_path / "v3", "tiny-3")
    onnx = tampered / "model.fp32.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\x00")
    send(broker, "model", {"bundle": f"file://{tampered}", "sha256": sha(tampered), "version": "tiny-3"})
    assert dashboard.wait_for(lambda d: last_status(d).get("last_model_update", {}).get("ok") is False, 20)
    status = last_status(dashboard)
    assert str(onnx) in status["last_model_update"]["reason"] and "tampered" in status["last_model_update"]["reason"]
    assert status["model"]["version"] == "tiny-2" and agent.model.current.bundle.version == "tiny-2"
    validate_message("status.v1", status)

    send(broker, "model", {"bundle": str(v2), "sha256": "0" * 64, "version": "tiny-2"})
    assert dashboard.wait_for(lambda d: "does not match the command's" in
                              (last_status(d).get("last_model_update") or {}).get("reason", ""), 20)
    n = len(dashboard.of("result"))
    assert dashboard.wait_for(lambda d: len(d.of("result")) >= n + 5, 10)
    assert json.loads(dashboard.of("result")[-1].payload)["model"]["version"] == "tiny-2"
    assert agent.metrics.counter("camera_reconnects_total", camera="cam-a") == 0


def test_update_from_an_http_url(live_agent, broker, tiny_bundle, tmp_path):
    agent, dashboard = live_agent
    served = bundle_version(tiny_bundle, tmp_path / "www" / "tiny" / "tiny-4", "tiny-4")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tiny/tiny-4/"
        send(broker, "model", {"bundle": url, "sha256": sha(served), "version": "tiny-4"})
        assert dashboard.wait_for(lambda d: (last_status(d).get("model") or {}).get("version") == "tiny-4", 60), \
            last_status(dashboard)
    finally:
        server.shutdown()
    assert (tmp_path / "downloads" / "tiny" / "tiny-4" / "model.fp32.onnx").exists()


def test_stats_topic_and_prometheus_endpoint(live_agent):
    agent, dashboard = live_agent
    def counted(d) -> list[dict]:
        """Stats messages published after the agent had classified at least 10 frames."""
        return [s for s in (json.loads(m.payload) for m in d.of("stats")) if s["frames_classified"] >= 10]

    assert dashboard.wait_for(lambda d: len(d.of("stats")) >= 2 and counted(d) and len(d.of("result")) >= 10, 20)
    stats = counted(dashboard)[-1]
    validate_message("stats.v1", stats)
    assert stats["fps"]["cam-a"] > 0 and stats["model_version"] == "tiny-1"
    assert {"queue", "preprocess", "inference"} <= set(stats["latency"])
    assert "outbox" in stats and "camera:cam-a" in stats["queue_depths"]
    assert stats["frames_classified"] >= 10 and 0 <= stats["frames_low_confidence"] <= stats["frames_classified"]
    assert stats["inference_errors"] == 0
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{agent.prometheus.port}/metrics", timeout=5).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("agent_frames_captured_total", (("camera", "cam-a"),))] > 0
    assert samples[("agent_latency_seconds", (("quantile", "0.99"), ("stage", "inference")))] > 0
    assert samples[("agent_model_info", (("model_name", "tiny"), ("model_version", "tiny-1")))] == 1


def test_thresholds_command_changes_the_policy_live_and_bad_ones_are_rejected(live_agent, broker):
    agent, dashboard = live_agent
    assert dashboard.wait_for(lambda d: len(d.of("result")) >= 3, 20)
    assert json.loads(dashboard.of("result")[-1].payload)["low_confidence"] is True   # random-weight model
    body = {"camera": "cam-a", "min_confidence": 0.0, "min_margin": 0.0, "max_entropy": 100.0}
    validate_message("cmd-thresholds.v1", body)
    send(broker, "thresholds", body)
    assert dashboard.wait_for(lambda d: (last_status(d).get("last_thresholds_update") or {}).get("ok") is True, 10)
    n = len(dashboard.of("result"))
    assert dashboard.wait_for(lambda d: len(d.of("result")) >= n + 5, 10)
    assert json.loads(dashboard.of("result")[-1].payload)["low_confidence"] is False

    send(broker, "thresholds", {"camera": "nope", "min_confidence": 0.5})
    assert dashboard.wait_for(lambda d: "field camera: 'nope' is not one of cam-a" in
                              ((last_status(d).get("last_thresholds_update") or {}).get("reason") or ""), 10)
    send(broker, "thresholds", {"min_confidence": 2})
    assert dashboard.wait_for(lambda d: "field min_confidence: Input should be less than or equal to 1" in
                              ((last_status(d).get("last_thresholds_update") or {}).get("reason") or ""), 10)
    validate_message("status.v1", last_status(dashboard))
    n = len(dashboard.of("result"))
    assert dashboard.wait_for(lambda d: len(d.of("result")) >= n + 3, 10)
    assert json.loads(dashboard.of("result")[-1].payload)["low_confidence"] is False


class RecordingEnginePolicy:
    """Stands for the start-up's engine cache (TensorRT cannot run here): records what reload_model asks for.
    ``cache_dir``: the cache's folder, as the real policy has one (the station reads its load-failure count there)."""

    def __init__(self, cache_dir: Path, fail: Exception | None = None) -> None:
        self.asked: list[str] = []
        self.fail = fail
        self.cache_dir = cache_dir

    def engine_for(self, cfg, bundle):
        self.asked.append(bundle.version)
        if self.fail:
            raise self.fail
        return None   # no engine: the new bundle runs on ONNX Runtime


@pytest.mark.parametrize("fail", [None, "model.backend tensorrt: TensorRT could not parse model.fp32.onnx"])
def test_cmd_model_asks_the_engine_cache_before_the_swap(tiny_bundle, fmnist_video, tmp_path, fail):
    from agent.backends import BackendError

    cfg = as_config(station_config(tmp_path, tiny_bundle, str(fmnist_video), 1,
                                   model={"download_dir": str(tmp_path / "downloads")}))
    policy = RecordingEnginePolicy(tmp_path / "engines", BackendError(fail) if fail else None)
    agent = Agent(cfg, engine_cache=policy)
    agent.load_model()
    v2 = bundle_version(tiny_bundle, tmp_path / "v2", "tiny-2")
    ok = agent.reload_model(json.dumps({"bundle": str(v2), "sha256": sha(v2), "version": "tiny-2"}).encode())
    assert policy.asked == ["tiny-2"]
    running = agent.model.current.bundle.version
    if fail:
        assert not ok and running != "tiny-2" and fail in agent.last_update["reason"]
    else:
        assert ok and running == "tiny-2"


class Recorded(SimpleHTTPRequestHandler):
    """Serves a folder and records each path asked for (which files a refused update cost)."""

    asked: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.asked.append(self.path.rsplit("/", 1)[-1])
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    """(folder served over HTTP, its URL, the file names asked for)."""
    www = tmp_path / "www"
    www.mkdir()
    asked: list[str] = []
    handler = type("RecordedHere", (Recorded,), {"asked": asked})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(www)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()


def renamed_class(src: Path, dest: Path, version: str) -> Path:
    """A bundle whose class 'Trouser' was renamed (its labels no longer cover a lane that names it)."""
    bundle = bundle_version(src, dest, version)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["labels"] = ["Trousers" if label == "Trouser" else label for label in manifest["labels"]]
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return bundle


def lane_station(tmp_path, tiny_bundle, fmnist_video, policy=None) -> Agent:
    cfg = as_config(station_config(tmp_path, tiny_bundle, str(fmnist_video), 1,
                                   model={"download_dir": str(tmp_path / "downloads")},
                                   decisions={"sorting": {"lanes": {"Trouser": "lane-2"}}}))
    agent = Agent(cfg, engine_cache=policy)
    agent.load_model()
    return agent


def test_a_download_whose_labels_miss_a_lane_is_refused_on_its_manifest(tiny_bundle, fmnist_video, tmp_path,
                                                                        served):
    # given: a station sorting 'Trouser' to a lane, and a served bundle that renamed that class
    www, base, asked = served
    v2 = renamed_class(tiny_bundle, www / "tiny-2", "tiny-2")
    policy = RecordingEnginePolicy(tmp_path / "engines")
    agent = lane_station(tmp_path, tiny_bundle, fmnist_video, policy)
    # when: it is sent by URL
    ok = agent.reload_model(json.dumps({"bundle": f"{base}/tiny-2/", "sha256": sha(v2)}).encode())
    # then: refused from its manifest, naming the URL and the field, before any artifact byte or engine lookup
    reason = agent.last_update["reason"]
    assert not ok and reason.startswith(f"{base}/tiny-2/manifest.json: config and bundle disagree: "
                                        "field decisions.sorting.lanes.Trouser: label 'Trouser' is not in the bundle")
    assert [name for name in asked if name.endswith(".onnx")] == [] and policy.asked == []
    assert agent.model.current.bundle.version == "tiny-1"
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == []


def test_a_local_bundle_whose_labels_miss_a_lane_is_refused_before_the_engine_cache(tiny_bundle, fmnist_video,
                                                                                    tmp_path):
    # given: the same station, and the renamed bundle on its disk (on a Jetson the lookup builds an engine: minutes)
    policy = RecordingEnginePolicy(tmp_path / "engines")
    agent = lane_station(tmp_path, tiny_bundle, fmnist_video, policy)
    v2 = renamed_class(tiny_bundle, tmp_path / "v2", "tiny-2")
    # when: it is sent by path
    ok = agent.reload_model(json.dumps({"bundle": str(v2), "sha256": sha(v2), "version": "tiny-2"}).encode())
    # then: refused naming its manifest and the field, and the engine cache was never asked
    assert not ok and "field decisions.sorting.lanes.Trouser: label 'Trouser'" in agent.last_update["reason"]
    assert str(v2 / MANIFEST) in agent.last_update["reason"]
    assert policy.asked == [] and agent.model.current.bundle.version == "tiny-1"


def test_the_running_bundle_sent_again_is_answered_without_fetching_or_building(tiny_bundle, fmnist_video, tmp_path,
                                                                              served):
    # given: a station running tiny-1, and the same bundle served by URL
    www, base, asked = served
    bundle_version(tiny_bundle, www / "tiny-1", "tiny-1")
    policy = RecordingEnginePolicy(tmp_path / "engines")
    agent = lane_station(tmp_path, tiny_bundle, fmnist_video, policy)
    running = agent.model.current
    # when: a cmd/model names it with the running manifest's sha256 (a rollout sent twice)
    ok = agent.reload_model(json.dumps({"bundle": f"{base}/tiny-1/", "sha256": sha(tiny_bundle),
                                        "version": "tiny-1"}).encode())
    # then: ok, said so, and nothing fetched, built or swapped
    assert ok and agent.last_update["reason"] == "already running tiny tiny-1"
    assert agent.last_update["running"] == {"name": "tiny", "version": "tiny-1"}
    validate_message("status.v1", {**agent.status_body("online"), "seq": 1})
    assert asked == [] and policy.asked == [] and agent.model.current is running
