"""What cmd/model and cmd/thresholds changed survives a restart (agent/state.py), and a bad state never
stops a station: it falls back to the configured bundle and says why."""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from agent_support import as_config, make_onnx_bundle, station_config
from test_reload import ROOT, bundle_version, last_status, send, sha

from agent.app import Agent
from agent.demo import Subscriber
from agent.state import STATE_FILE


def config(tmp_path, bundle, video, port=1, **extra):
    return as_config(station_config(tmp_path, bundle, str(video), port,
                                    model={"download_dir": str(tmp_path / "downloads")}, **extra))


def restarted(cfg) -> Agent:
    agent = Agent(cfg)
    agent.load_model()
    return agent


def update(agent: Agent, bundle, version: str, location: str | None = None) -> bool:
    return agent.reload_model(json.dumps({"bundle": location or str(bundle), "sha256": sha(bundle),
                                          "version": version}).encode())


def test_a_model_installed_by_cmd_model_runs_again_after_a_restart(tiny_bundle, fmnist_video, tmp_path):
    cfg = config(tmp_path, tiny_bundle, fmnist_video)
    v2 = bundle_version(tiny_bundle, tmp_path / "v2", "tiny-2")
    first = restarted(cfg)
    assert update(first, v2, "tiny-2")
    assert restarted(cfg).model.current.bundle.version == "tiny-2"
    # a rollback is a model update like any other, and is kept too
    assert update(restarted(cfg), tiny_bundle, "tiny-1")
    assert restarted(cfg).model.current.bundle.version == "tiny-1"


def test_a_new_config_bundle_wins_over_the_old_state(tiny_bundle, fmnist_video, tmp_path, caplog):
    cfg = config(tmp_path, tiny_bundle, fmnist_video)
    assert update(restarted(cfg), bundle_version(tiny_bundle, tmp_path / "v2", "tiny-2"), "tiny-2")
    redeployed = bundle_version(tiny_bundle, tmp_path / "v9", "tiny-9")   # the operator ships a new config
    agent = restarted(config(tmp_path, redeployed, fmnist_video))
    assert agent.model.current.bundle.version == "tiny-9"
    assert "made for another configured bundle" in caplog.text
    assert (agent.state.path.parent / f"{STATE_FILE}.previous").exists()


def test_a_damaged_state_or_a_vanished_bundle_falls_back_to_the_config(tiny_bundle, fmnist_video, tmp_path, caplog):
    cfg = config(tmp_path, tiny_bundle, fmnist_video)
    v2 = bundle_version(tiny_bundle, tmp_path / "v2", "tiny-2")
    agent = restarted(cfg)
    assert update(agent, v2, "tiny-2")
    state_path = agent.state.path
    # the installed bundle is tampered with while the station is off: it must not run
    onnx = v2 / "model.fp32.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\x00")
    again = restarted(cfg)
    assert again.model.current.bundle.version == "tiny-1"
    assert "cannot run" in caplog.text and str(onnx) in caplog.text
    assert json.loads(state_path.read_text())["model"] is None     # not retried on every start
    # a state file that is not JSON is set aside, never deleted, and the station starts
    state_path.write_text("{not json")
    assert restarted(cfg).model.current.bundle.version == "tiny-1"
    assert (state_path.parent / f"{STATE_FILE}.bad").read_text() == "{not json"


def serve_folder(www):
    """``www`` over HTTP on a free port, as a bundle server would: (the server, its base URL)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_a_refused_download_leaves_the_installed_copy_of_that_version_intact(tiny_bundle, fmnist_video, tmp_path):
    www = tmp_path / "www"
    served = bundle_version(tiny_bundle, www / "tiny-2", "tiny-2")
    server, base = serve_folder(www)
    url = f"{base}/tiny-2/"
    try:
        cfg = config(tmp_path, tiny_bundle, fmnist_video)
        agent = restarted(cfg)
        assert update(agent, served, "tiny-2", url)
        installed = tmp_path / "downloads" / "tiny" / "tiny-2"
        before = (installed / "model.fp32.onnx").read_bytes()
        # the same version again, but the server's copy was tampered with: refused, and the running
        # model's files on disk are untouched
        onnx = served / "model.fp32.onnx"
        onnx.write_bytes(onnx.read_bytes()[:-1] + b"\x00")
        ok = agent.reload_model(json.dumps({"bundle": url, "version": "tiny-2"}).encode())
        assert not ok and "model.fp32.onnx" in agent.last_update["reason"]
        assert (installed / "model.fp32.onnx").read_bytes() == before
        assert [p.name for p in (tmp_path / "downloads").iterdir()] == ["tiny"]     # no partial download left
        assert restarted(cfg).model.current.bundle.version == "tiny-2"
    finally:
        server.shutdown()


@pytest.mark.mqtt
def test_a_bundle_refused_at_warm_up_never_replaces_an_installed_one_nor_runs_after_a_restart(tiny_bundle,
                                                                                              fmnist_video, tmp_path):
    """A download verifies, but its model fails the warm-up (NaN logits): it is refused, and it was never installed
    over the running copy of the same version (another model, onnx-tiny, of version tiny-2 here). Installed
    bundles are kept per name and version, and a restart runs what the state's manifest sha256 pinned."""
    www = tmp_path / "www"
    good = bundle_version(tiny_bundle, www / "tiny" / "tiny-2", "tiny-2")
    bad = make_onnx_bundle(www, nan="always", version="tiny-2")              # www/onnx-tiny/tiny-2
    server, url = serve_folder(www)
    try:
        cfg = config(tmp_path, tiny_bundle, fmnist_video)
        agent = restarted(cfg)
        assert agent.reload_model(json.dumps({"bundle": f"{url}/tiny/tiny-2/", "sha256": sha(good),
                                              "version": "tiny-2"}).encode())
        installed = tmp_path / "downloads" / "tiny" / "tiny-2"
        before = (installed / "manifest.json").read_bytes()
        ok = agent.reload_model(json.dumps({"bundle": f"{url}/onnx-tiny/tiny-2/", "sha256": sha(bad),
                                            "version": "tiny-2"}).encode())
        assert not ok and "non-finite" in agent.last_update["reason"]
        assert (installed / "manifest.json").read_bytes() == before
        assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == ["tiny"]    # the refused one: gone
        again = restarted(cfg)
        assert (again.model.current.bundle.name, again.model.current.bundle.version) == ("tiny", "tiny-2")
        # a third and a fourth version: the station keeps the running bundle and the one before, no more
        for n in (3, 4):
            served = bundle_version(tiny_bundle, www / "tiny" / f"tiny-{n}", f"tiny-{n}")
            assert again.reload_model(json.dumps({"bundle": f"{url}/tiny/tiny-{n}/", "sha256": sha(served),
                                                  "version": f"tiny-{n}"}).encode())
        (tmp_path / "downloads" / ".incoming-x-left-by-a-crash").mkdir()
        served = bundle_version(tiny_bundle, www / "tiny" / "tiny-5", "tiny-5")
        assert again.reload_model(json.dumps({"bundle": f"{url}/tiny/tiny-5/", "sha256": sha(served),
                                              "version": "tiny-5"}).encode())
        assert sorted(p.name for p in (tmp_path / "downloads" / "tiny").iterdir()) == ["tiny-4", "tiny-5"]
        assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == ["tiny"]
        installed = tmp_path / "downloads" / "tiny" / "tiny-5"
        before = (installed / "manifest.json").read_bytes()
        assert restarted(cfg).model.current.bundle.version == "tiny-5"
        # the installed folder replaced behind the station's back (another manifest): not run after a restart
        (installed / "manifest.json").write_bytes(before.replace(b'"tiny-5"', b'"tiny-5" ', 1))
        assert restarted(cfg).model.current.bundle.version == "tiny-1"
    finally:
        server.shutdown()


def test_thresholds_set_by_command_survive_a_restart(broker, tiny_bundle, fmnist_video, tmp_path):
    cfg = config(tmp_path, tiny_bundle, fmnist_video, broker.port,
                 cameras=[{"id": "cam-a", "uri": str(fmnist_video), "loop": True, "fps": 25,
                           "backpressure": "drop_oldest"}],
                 health={"prometheus_port": None})
    dashboard = Subscriber(broker.host, broker.port, ROOT)
    agent = Agent(cfg)
    agent.start()
    try:
        assert dashboard.wait_for(lambda d: len(d.of("result")) >= 3, 20)
        assert json.loads(dashboard.of("result")[-1].payload)["low_confidence"] is True   # random-weight model
        send(broker, "thresholds", {"camera": "cam-a", "min_confidence": 0.0, "min_margin": 0.0})
        send(broker, "thresholds", {"max_entropy": 100.0})     # all cameras, one field: merges, keeps the others
        assert dashboard.wait_for(lambda d: (last_status(d).get("last_thresholds_update") or {}).get("applied", {})
                                  .get("max_entropy") == 100.0, 10)
    finally:
        agent.shutdown(5)
    dashboard.close()
    assert json.loads(agent.state.path.read_text())["thresholds"] == {
        "cam-a": {"min_confidence": 0.0, "min_margin": 0.0, "max_entropy": 100.0}}

    dashboard = Subscriber(broker.host, broker.port, ROOT)
    again = Agent(cfg)
    again.start()
    try:
        assert dashboard.wait_for(lambda d: len(d.of("result")) >= 5, 20)
        assert all(json.loads(m.payload)["low_confidence"] is False for m in dashboard.of("result")[-3:])
    finally:
        again.shutdown(5)
        dashboard.close()


def test_the_largest_shipment_a_station_may_hold_is_saved_and_read_back(tmp_path):
    """1,000 expected lines (cmd/expect's most) with 50 refs each (max_refs' default): the writer wrote it
    indented, past the reader's limit, so the next start set the whole state aside (model, thresholds, shipment)."""
    import uuid

    from agent.state import STATE_FILE, StationState

    (tmp_path / "manifest.json").write_text("{}")
    state = StationState.load(tmp_path / STATE_FILE, tmp_path / "manifest.json")
    labels = [f"sku-{i:04d}" for i in range(1000)]

    def ref(label):
        return {"decision": str(uuid.uuid4()), "camera": "cam-a", "item_seq": 123456, "label": label,
                "confidence": 0.987654, "lane": "accept", "frames": {"first_seq": 1000, "last_seq": 1010, "count": 11},
                "unknown_score": 3.21}

    shipment = {"id": "PO-1", "expected": {label: 60 for label in labels}, "opened_at": 1.0,
                "received": {label: 50 for label in labels}, "review": 0, "unknown": 0,
                "refs": {label: [ref(label) for _ in range(50)] for label in labels},
                "refs_seen": {label: 50 for label in labels}, "line_refs_ranked": True, "vouched": 0,
                "vouched_refs": []}
    state.set_shipment(shipment)
    again = StationState.load(tmp_path / STATE_FILE, tmp_path / "manifest.json")
    assert again.shipment == shipment and not (tmp_path / f"{STATE_FILE}.bad").exists()


def test_a_metrics_port_another_process_holds_is_a_startup_error_before_any_thread_starts(tiny_bundle, fmnist_video,
                                                                                          tmp_path):
    """Bound before the threads (cameras, MQTT) start: a taken port is a named startup error (exit 2), not a
    traceback after the cameras opened (and a restart loop under systemd)."""
    import socket

    from agent.app import StartupError

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        agent = Agent(config(tmp_path, tiny_bundle, fmnist_video,
                             health={"prometheus_port": port, "prometheus_host": "127.0.0.1"}))
        with pytest.raises(StartupError, match=f"health.prometheus_port: cannot listen on 127.0.0.1:{port}"):
            agent.start()
        assert agent._threads == [] and agent.workers == []
    finally:
        holder.close()
