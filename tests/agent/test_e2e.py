"""End to end through the CLI, exactly as a station runs it: video -> agent -> real mosquitto -> dashboard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_support import (
    Broker,
    same_predictions,
    station_config,
    validate_message,
    video_frames,
    write_yaml,
)

from agent.demo import Subscriber
from contract.bundle import load_bundle

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.mqtt


def agent_cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def run_cli(*args: str, timeout: float = 120) -> tuple[int, str]:
    proc = agent_cli(*args)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def dedupe(messages):
    seen, out = set(), []
    for m in messages:
        body = m.json()
        if body["id"] not in seen:
            seen.add(body["id"])
            out.append(body)
    return out


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "real_bundle"])
def test_every_result_arrives_validates_and_matches_the_bundle(bundle_fixture, request, broker, fmnist_video,
                                                               tmp_path):
    bundle = request.getfixturevalue(bundle_fixture)
    cfg = station_config(tmp_path, bundle, str(fmnist_video), broker.port,
                         decisions={"presence": {"mode": "background", "min_frames": 1, "gap_frames": 1},
                                    "empty_frames": "publish"})
    config = write_yaml(tmp_path / "station.yaml", cfg)
    dashboard = Subscriber(broker.host, broker.port, "inventory/test/st-01")
    rc, out = run_cli("run", "--config", str(config), "--exit-at-end")
    assert rc == 0, out
    assert dashboard.wait_for(lambda d: any(json.loads(m.payload)["state"] == "offline" for m in d.of("status")), 10)
    dashboard.close()

    for msg in dashboard.messages:
        body = msg.json()
        validate_message(body["schema"], body)
    results = dedupe(dashboard.of("result"))
    assert len(results) == len(dashboard.of("result")) == 60
    assert sorted(r["frame_seq"] for r in results) == list(range(1, 61))
    # the first frame is the localizer's warm-up (taken as the empty scene): published with present false
    ordered = sorted(results, key=lambda r: r["frame_seq"])
    assert [r["present"] for r in ordered] == [False] + [True] * 59 and ordered[0]["label"] is None
    # an unknown frame (its score above the bundle's open_set threshold) is compared by the model's top label
    published = [r["top_k"][0]["label"] if r["label"] == "unknown" else r["label"] for r in ordered[1:]]
    open_set = load_bundle(bundle).open_set
    assert all(r["unknown_score"] > open_set.threshold for r in ordered[1:] if r["label"] == "unknown")
    assert same_predictions(published, bundle, video_frames(fmnist_video)[1:]) == []
    seqs = [m.json()["seq"] for m in dashboard.messages if not m.topic.endswith(("/stats", "/status"))]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    uploads = dashboard.of("frames")
    # every low-confidence frame, and the best view of items decided unsure, each naming its decision
    assert len([f for f in uploads if "item" not in f.json()]) == sum(r["low_confidence"] for r in results)
    unsure = {d["id"] for d in dedupe(dashboard.of("decision")) if d["low_confidence"]}
    views = [f.json()["item"]["decision"] for f in uploads if "item" in f.json()]
    assert views and set(views) <= unsure and len(set(views)) == len(views)
    for frame in uploads:
        assert frame.payload[:2] == b"\xff\xd8" and frame.json()["jpeg"]["bytes"] == len(frame.payload)


def test_bad_config_missing_and_tampered_bundles_name_the_file(tmp_path, tiny_bundle, fmnist_video):
    bad = write_yaml(tmp_path / "bad.yaml", station_config(tmp_path, tiny_bundle, str(fmnist_video), 1883,
                                                           mqtt={"port": "eighty"}))
    rc, out = run_cli("run", "--config", str(bad))
    assert rc == 2 and f"{bad}: field mqtt.port: Input should be a valid integer" in out

    missing = write_yaml(tmp_path / "missing.yaml",
                         station_config(tmp_path, tmp_path / "no-such-bundle", str(fmnist_video), 1883))
    rc, out = run_cli("run", "--config", str(missing))
    assert rc == 2 and f"{tmp_path / 'no-such-bundle'}: bundle folder does not exist" in out

    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    onnx = tampered / "model.fp32.onnx"
    data = bytearray(onnx.read_bytes())
    data[-10] ^= 0xFF
    onnx.write_bytes(bytes(data))
    cfg = write_yaml(tmp_path / "t.yaml", station_config(tmp_path, tampered, str(fmnist_video), 1883))
    rc, out = run_cli("run", "--config", str(cfg))
    assert rc == 2 and f"{onnx}: sha256" in out and "tampered" in out


def test_sigterm_stops_cameras_flushes_and_publishes_offline(broker, tiny_bundle, fmnist_video, tmp_path):
    cfg = station_config(tmp_path, tiny_bundle, str(fmnist_video), broker.port,
                         cameras=[{"id": "cam-a", "uri": str(fmnist_video), "loop": True, "fps": 30}])
    config = write_yaml(tmp_path / "station.yaml", cfg)
    dashboard = Subscriber(broker.host, broker.port, "inventory/test/st-01")
    proc = agent_cli("run", "--config", str(config))
    assert dashboard.wait_for(lambda d: len(d.of("result")) >= 10, 30), proc.stdout
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert dashboard.wait_for(lambda d: json.loads(d.of("status")[-1].payload)["state"] == "offline", 5)
    dashboard.close()
    db = sqlite3.connect(tmp_path / "outbox.sqlite")
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    assert "received SIGTERM" in out


def outbox_rows(path: Path) -> list[tuple[int, str]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT seq, id FROM messages ORDER BY seq").fetchall()
    finally:
        db.close()


def stored(path: Path) -> int:
    """Rows in the outbox so far; 0 while the agent is still creating the database."""
    try:
        return len(outbox_rows(path)) if path.exists() else 0
    except sqlite3.OperationalError:
        return 0


def test_kill_9_mid_run_loses_nothing_in_the_outbox(mosquitto_bin, tiny_bundle, fmnist_video, tmp_path):
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")            # not started yet: the station runs into an outage
    cfg = station_config(tmp_path, tiny_bundle, str(fmnist_video), broker.port,
                         cameras=[{"id": "cam-a", "uri": str(fmnist_video), "fps": 30, "backpressure": "block"}])
    config = write_yaml(tmp_path / "station.yaml", cfg)
    proc = agent_cli("run", "--config", str(config), "--exit-at-end")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and stored(tmp_path / "outbox.sqlite") < 20:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    at_kill = outbox_rows(tmp_path / "outbox.sqlite")
    assert len(at_kill) >= 20

    broker.start()
    try:
        dashboard = Subscriber(broker.host, broker.port, "inventory/test/st-01")
        rc, out = run_cli("run", "--config", str(config), "--exit-at-end")
        assert rc == 0, out
        wanted = {i for _, i in at_kill}
        assert dashboard.wait_for(lambda d: wanted <= {m.json()["id"] for m in list(d.messages)}, 10)
        dashboard.close()
    finally:
        broker.stop()
    received = {m.json()["id"]: m.json() for m in dashboard.messages if not m.topic.endswith("/status")}
    assert {i for _, i in at_kill} <= set(received), "a message in the outbox at kill -9 never arrived"
    first_run = sorted(b["frame_seq"] for b in received.values() if b["seq"] <= at_kill[-1][0] and
                       b["schema"] == "result.v1")
    assert first_run == list(range(1, len(first_run) + 1))
    assert outbox_rows(tmp_path / "outbox.sqlite") == []


def test_demo_command_runs_the_station_on_a_belt_scene_and_scores_it(mosquitto_bin, tiny_bundle, tmp_path):
    # given a belt scene of 4 items with empty belt between them (seed 1), kept in tmp_path
    rc, out = run_cli("demo", "--bundle", str(tiny_bundle), "--items", "4", "--seed", "1",
                      "--scene-dir", str(tmp_path), "--json", timeout=240)
    # then the run succeeds and every message the dashboard got is valid under its schema
    assert rc == 0, out
    truth = json.loads((tmp_path / "belt" / "truth.json").read_text())
    lines = [line for line in out.splitlines() if line.startswith("inventory/demo/receiving-01/")]
    bodies = [json.loads(line.split("  ", 1)[1]) for line in lines]
    for body in bodies:
        validate_message(body["schema"], body)
    results = [b for b in bodies if b["schema"] == "result.v1"]
    decisions = [b for b in bodies if b["schema"] == "decision.v1"]
    # no result on an empty belt: presence by the localizer skips frames with no item in the ROI
    visible = {f["file"] for f in truth["frames"] if f["visible"]}
    assert results and {r["source_ref"] for r in results} <= visible
    # one decision per item: the localizer separates the items by the empty belt between them
    assert len(decisions) == len(truth["items"]) == 4
    # and the summary scores exactly these messages against the scene's truth
    summary = out[out.index("received: "):].splitlines()
    assert "decision=4" in summary[0] and f"result={len(results)}" in summary[0]
    assert summary[1].startswith(f"scene belt (seed 1): 4 Fashion-MNIST test items, {truth['n_frames']} frames")
    assert "missed / split        0 / 0" in out and "phantom decisions     0 of 4 decisions" in out
    empty = sum(1 for f in truth["frames"] if not f["visible"])
    assert f"empty frames published as products  0 of {empty}" in out
