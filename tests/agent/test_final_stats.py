"""A clean stop publishes one final stats message with the final counters, through a real mosquitto.

The periodic stats come every ``health.stats_interval_s``; without a final one, the last stats a subscriber (the
dashboard, the station_view benchmark) sees predates the end of the run and undercounts the frames captured and
dropped. Here the interval is an hour, so the only stats message a run this short sends is the final one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from agent_support import as_config, station_config, validate_message, write_yaml

from agent.app import Agent
from agent.demo import Subscriber

REPO = Path(__file__).resolve().parents[2]
ROOT = "inventory/test/st-01"
HOUR = {"stats_interval_s": 3600}
pytestmark = pytest.mark.mqtt


def offline(dashboard: Subscriber) -> bool:
    return any(m.json()["state"] == "offline" for m in dashboard.of("status"))


def last_stats(dashboard: Subscriber) -> dict:
    stats = [m.json() for m in dashboard.of("stats")]
    assert stats, "no stats message arrived"
    for body in stats:
        validate_message("stats.v1", body)
    return max(stats, key=lambda s: s["seq"])


def test_exit_at_end_sends_final_stats_counting_every_frame(broker, tiny_bundle, fmnist_video, tmp_path):
    # given a station on a 60-frame video whose periodic stats would come only after an hour
    cfg = station_config(tmp_path, tiny_bundle, str(fmnist_video), broker.port, health=HOUR)
    config = write_yaml(tmp_path / "station.yaml", cfg)
    dashboard = Subscriber(broker.host, broker.port, ROOT)
    # when it runs to the end of the video and stops by itself
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config), "--exit-at-end"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert dashboard.wait_for(offline, 10)
    dashboard.close()
    # then one stats message came, before the offline status, and it counts every frame of the input
    kinds = [m.topic.rsplit("/", 1)[1] for m in dashboard.messages]
    assert kinds.count("stats") == 1
    assert kinds.index("stats") < max(i for i, k in enumerate(kinds) if k == "status")
    stats = last_stats(dashboard)
    assert stats["frames_captured"] == {"cam-a": 60}
    assert stats["frames_classified"] == 60 and sum(stats["frames_dropped"].values()) == 0


def test_final_stats_equal_the_counters_after_shutdown(broker, tiny_bundle, fmnist_video, fmnist_test_images,
                                                       tmp_path):
    # given a station with a video camera and a folder camera
    folder = tmp_path / "shelf"
    folder.mkdir()
    for i in range(25):
        cv2.imwrite(str(folder / f"img{i:03d}.png"), fmnist_test_images[0][100 + i])
    cfg = as_config(station_config(tmp_path, tiny_bundle, str(fmnist_video), broker.port, health=HOUR, cameras=[
        {"id": "dock", "uri": str(fmnist_video), "backpressure": "block", "queue_size": 8},
        {"id": "shelf", "uri": f"file://{folder}", "backpressure": "block", "queue_size": 8}]))
    dashboard = Subscriber(broker.host, broker.port, ROOT)
    # when both inputs end and the station shuts down
    agent = Agent(cfg)
    agent.start()
    agent.wait(exit_at_end=True)
    agent.shutdown(10)
    assert dashboard.wait_for(offline, 10)
    dashboard.close()
    # then the last stats received holds the final counters: every frame of both inputs
    stats = last_stats(dashboard)
    assert stats["frames_captured"] == {"dock": 60, "shelf": 25}
    assert stats["frames_captured"] == agent.metrics.counters_by("frames_captured_total", "camera")
    assert stats["frames_dropped"] == agent.metrics.counters_by("frames_dropped_total", "camera")
    assert stats["frames_classified"] == sum(agent.metrics.counters_by("frames_classified_total", "camera").values())
    assert stats["frames_classified"] == 85


def test_sigterm_mid_run_sends_final_stats_with_the_final_counts(broker, tiny_bundle, fmnist_video, tmp_path):
    # given a station on a looping video at 30 frames/s (it never ends by itself)
    cfg = station_config(tmp_path, tiny_bundle, str(fmnist_video), broker.port, health=HOUR, cameras=[
        {"id": "cam-a", "uri": str(fmnist_video), "fps": 30, "loop": True, "backpressure": "block"}])
    config = write_yaml(tmp_path / "station.yaml", cfg)
    dashboard = Subscriber(broker.host, broker.port, ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # when it is stopped by SIGTERM once results flow
        assert dashboard.wait_for(lambda d: len(d.of("result")) >= 10, 120)
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert dashboard.wait_for(offline, 10)
    dashboard.close()
    # then its last stats counts every frame it captured: each one classified (a result arrived for it) or dropped
    stats = last_stats(dashboard)
    results = {m.json()["frame_seq"] for m in dashboard.of("result")}
    captured = stats["frames_captured"]["cam-a"]
    assert stats["frames_classified"] == len(results) >= 10
    assert captured == stats["frames_classified"] + stats["frames_dropped"].get("cam-a", 0) >= max(results)
