"""The deployment path end to end: `python -m agent.startup start` -> the real agent -> the shipped central
broker config (TLS, password, ACL) -> the central ingest user. Shows the agent's real topics fit the ACL:
every result arrives and the broker rejects nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from deploy_support import REPO, USERS, connected, make_runnable_bundle

pytestmark = pytest.mark.mqtt
IMAGES = 6


def write_images(folder, n: int) -> None:
    import cv2
    import numpy as np

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_a_station_publishes_through_the_shipped_broker_config(tmp_path, central_broker, connect):
    pytest.importorskip("torch", reason="the runnable test bundle is exported with torch (trainer extra)")
    bundle = make_runnable_bundle(tmp_path / "models")
    write_images(tmp_path / "images", IMAGES)
    config = tmp_path / "station.yaml"
    config.write_text(yaml.safe_dump({
        "site": "ber1", "station": "receiving-01",
        "model": {"bundle": str(bundle), "backend": "onnxruntime", "batch_size": 2, "warmup_runs": 1,
                  "download_dir": str(tmp_path / "state" / "bundles")},
        "cameras": [{"id": "dock-a", "uri": str(tmp_path / "images"), "backpressure": "block"}],
        "mqtt": {"host": "127.0.0.1", "port": central_broker.tls_port, "protocol": "v5",
                 "username": "ber1/receiving-01", "password_env": "MQTT_PASSWORD",
                 "tls": {"ca_file": str(central_broker.pki.ca_cert)},
                 "reconnect": {"initial_s": 0.2, "max_s": 1.0}},
        "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite")},
        "frames": {"min_interval_s": 0.0, "dedupe_bits": 0},
        "health": {"stats_interval_s": 0.5},
    }))
    central = connected(connect("central-ingest"))
    central.subscribe("inventory/#")

    proc = subprocess.run(
        [sys.executable, "-m", "agent.startup", "start", "--config", str(config),
         "--engine-cache", str(tmp_path / "engines"), "--", "--exit-at-end", "--flush-timeout", "20"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MQTT_PASSWORD": USERS["ber1/receiving-01"]})

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rejected" not in proc.stderr and "Denied" not in central_broker.log()
    messages = central.wait_until(lambda got: any(is_offline(m) for m in got))   # the agent's last message
    assert all(m.topic.startswith("inventory/ber1/receiving-01/") for m in messages)
    kinds = {m.topic.rsplit("/", 1)[-1] for m in messages}
    assert {"status", "result", "frames"} <= kinds, kinds          # low-confidence JPEGs pass the ACL and size limit
    results = {json.loads(m.payload)["id"] for m in messages if m.topic.endswith("/result")}
    assert len(results) == IMAGES
    statuses = [json.loads(m.payload)["state"] for m in messages if m.topic.endswith("/status")]
    assert statuses[0] == "online" and statuses[-1] == "offline", statuses


def is_offline(msg) -> bool:
    return msg.topic.endswith("/status") and json.loads(msg.payload)["state"] == "offline"
