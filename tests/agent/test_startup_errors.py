"""``python -m agent run --config FILE`` when the station cannot start: one line naming the config file and the
field, exit 2, no traceback, whatever step fails (bundle, model, camera, outbox, metrics port, secrets); and a
file or folder camera under ``--exit-at-end`` that cannot be opened ends the run instead of being retried for good.

Real parts: the real CLI in a subprocess, a real ONNX bundle (one with an ONNX file that does not load), a real
video and real image files. No broker is needed: the station never gets that far, or runs with its outbox only.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_support import station_config, write_yaml

from agent.startup import main as startup_main
from contract.bundle import artifact_entry

REPO = Path(__file__).resolve().parents[2]
NO_BROKER = 1       # a port nothing listens on: the station keeps its messages in the outbox


def run_cli(*args: str, timeout_s: float = 120) -> tuple[int, str]:
    """The agent CLI's exit status and its whole output; a run still going after ``timeout_s`` fails the test."""
    proc = subprocess.Popen([sys.executable, "-m", "agent", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"python -m agent {' '.join(args)} still running after {timeout_s}s:\n{out[-3000:]}")
    return proc.returncode, out


def unloadable_bundle(tiny_bundle: Path, folder: Path) -> Path:
    """The tiny bundle with an ONNX file that ONNX Runtime cannot load, hashed as it is (it verifies)."""
    shutil.copytree(tiny_bundle, folder)
    (folder / "model.fp32.onnx").write_bytes(b"not an ONNX model " * 20)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"] = [artifact_entry(folder / "model.fp32.onnx", folder, role="onnx-fp32", precision="fp32",
                                            deployable=True)]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def taken_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


CASES = ["bundle that does not exist", "model that does not load", "public key that does not exist",
         "video file that does not exist", "file that is no video", "folder without images",
         "empty-scene image that does not exist", "password file that does not exist", "metrics port in use",
         "outbox folder that cannot be created", "TLS CA file without a certificate"]


@pytest.mark.parametrize("case", CASES)
def test_every_start_up_failure_is_one_line_naming_the_config_file_and_the_field(case, tmp_path, tiny_bundle,
                                                                                fmnist_video):
    sections: dict = {}
    camera = str(fmnist_video)
    held = None
    if case == "bundle that does not exist":
        sections, field, what = {"model": {"bundle": str(tmp_path / "no-such-bundle")}}, "model.bundle", \
            "bundle folder does not exist"
    elif case == "model that does not load":
        bundle = unloadable_bundle(tiny_bundle, tmp_path / "bundle")
        sections, field, what = {"model": {"bundle": str(bundle)}}, "model.bundle", "ONNX Runtime cannot load"
    elif case == "public key that does not exist":
        sections, field, what = {"model": {"public_key": str(tmp_path / "none.pub")}}, "model.public_key", \
            "cannot read public key"
    elif case == "video file that does not exist":
        camera, field = "file:///no/such/belt.mp4", "cameras[0].uri"
        what = "/no/such/belt.mp4: video file does not exist"
    elif case == "file that is no video":
        (tmp_path / "belt.mp4").write_bytes(b"not a video" * 100)
        camera, field, what = str(tmp_path / "belt.mp4"), "cameras[0].uri", "cannot open file source"
    elif case == "folder without images":
        (tmp_path / "images").mkdir()
        camera, field, what = str(tmp_path / "images"), "cameras[0].uri", "no images"
    elif case == "empty-scene image that does not exist":
        sections = {"decisions": {"presence": {"empty_images": {"cam-a": str(tmp_path / "empty.png")}}}}
        field, what = "decisions.presence.empty_images.cam-a", "cannot read"
    elif case == "password file that does not exist":
        sections, field, what = {"mqtt": {"password_file": str(tmp_path / "pw")}}, "mqtt.password_file", \
            "no such file"
    elif case == "metrics port in use":
        held, port = taken_port()
        sections, field, what = {"health": {"prometheus_port": port}}, "health.prometheus_port", "cannot listen"
    elif case == "TLS CA file without a certificate":
        # before: the station ran, and every connect failed for good ("cannot set up the connection")
        (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        sections = {"mqtt": {"tls": {"ca_file": str(tmp_path / "ca.crt")}}}
        field, what = "mqtt.tls.ca_file", "no PEM CA certificate in it"
    else:
        (tmp_path / "blocker").write_text("a file where the outbox's folder should be")
        sections = {"outbox": {"path": str(tmp_path / "blocker" / "outbox.sqlite")}}
        field, what = "outbox.path", "cannot create the folder"
    config = write_yaml(tmp_path / "station.yaml", station_config(tmp_path, tiny_bundle, camera, NO_BROKER, **sections))
    try:
        rc, out = run_cli("run", "--config", str(config), "--exit-at-end", "--flush-timeout", "0")
    finally:
        if held is not None:
            held.close()
    assert rc == 2, out
    assert "Traceback" not in out, out
    [line] = [line for line in out.splitlines() if str(config) in line]
    assert f"{config}: field {field}: " in line and what in line, out


def test_a_label_the_bundle_lacks_is_one_line_naming_the_config_file_and_the_field(tmp_path, tiny_bundle,
                                                                                   fmnist_video):
    config = write_yaml(tmp_path / "station.yaml", station_config(
        tmp_path, tiny_bundle, str(fmnist_video), NO_BROKER, decisions={"qc": {"defect_classes": ["Scratch"]}}))
    rc, out = run_cli("run", "--config", str(config), "--exit-at-end", "--flush-timeout", "0")
    assert rc == 2 and "Traceback" not in out, out
    [line] = [line for line in out.splitlines() if str(config) in line]
    assert (f"cannot start: {config}: {tiny_bundle}: config and bundle disagree: "
            "field decisions.qc.defect_classes[0]: label 'Scratch' is not in the bundle") in line


def test_the_container_start_up_refuses_a_file_camera_that_does_not_exist(tmp_path, tiny_bundle, caplog):
    """``python -m agent.startup start`` checks the same before an engine build of minutes."""
    config = write_yaml(tmp_path / "station.yaml", station_config(
        tmp_path, tiny_bundle, str(tmp_path / "belt.mp4"), NO_BROKER, model={"download_dir": str(tmp_path / "dl")}))
    rc = startup_main(["start", "--dry-run", "--config", str(config), "--engine-cache", str(tmp_path / "engines")],
                      tensorrt_present=False)
    assert rc == 2
    assert f"{config}: field cameras[0].uri: {tmp_path / 'belt.mp4'}: video file does not exist" in caplog.text


def test_a_folder_camera_removed_while_running_ends_a_run_with_exit_at_end(tmp_path, tiny_bundle):
    """A looping folder camera is read for good, until its folder goes: then its camera thread cannot open it again,
    and with --exit-at-end the run ends (exit 1: not all of its input was processed) instead of retrying it."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        cv2.imwrite(str(images / f"{i:03d}.png"), np.full((32, 32, 3), 40 * i, np.uint8))
    config = write_yaml(tmp_path / "station.yaml", station_config(
        tmp_path, tiny_bundle, str(images), NO_BROKER,
        cameras=[{"id": "cam-a", "uri": str(images), "loop": True, "fps": 20,
                  "reconnect": {"initial_s": 0.1, "max_s": 0.5}}]))
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config), "--exit-at-end",
                             "--flush-timeout", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not stored_results(tmp_path / "outbox.sqlite"):       # the camera was opened and read
            assert proc.poll() is None and time.monotonic() < deadline, "no result stored"
            time.sleep(0.2)
        shutil.rmtree(images)
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the run did not end after its folder was removed:\n{out[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out
    assert f"camera cam-a: its input ended early: {images}: image folder does not exist" in out
    assert "Traceback" not in out
    # the station_config default: role receiving, presence off (warned about, not refused)
    assert "role receiving with decisions.presence.mode off: no item is ever decided" in out


def stored_results(path: Path) -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT COUNT(*) FROM messages WHERE kind = 'result'").fetchone()[0]
    except sqlite3.OperationalError:    # the table is not made yet
        return 0
    finally:
        db.close()


def test_a_receiving_station_without_presence_is_warned_about_at_the_start(tmp_path, tiny_bundle, fmnist_video,
                                                                         caplog):
    """role receiving and presence off are both defaults, so not refused; but such a station never decides an item,
    and a shipment opened by cmd/expect never counts one: the start-up says so."""
    config = write_yaml(tmp_path / "station.yaml", station_config(
        tmp_path, tiny_bundle, str(fmnist_video), NO_BROKER, role="receiving",
        model={"download_dir": str(tmp_path / "dl")}))
    with caplog.at_level(logging.WARNING):
        rc = startup_main(["start", "--dry-run", "--config", str(config), "--engine-cache", str(tmp_path / "e")],
                          tensorrt_present=False)
    assert rc == 0
    assert "role receiving with decisions.presence.mode off: no item is ever decided" in caplog.text


def test_an_in_process_wait_for_the_end_of_input_ends_when_a_folder_camera_is_gone(tmp_path, tiny_bundle):
    """``Agent.wait(exit_at_end=True)`` (the demo's and the tests' way) ends the same way as ``run --exit-at-end``,
    whether or not the Agent was made with ``exit_at_end``."""
    import threading

    from agent.app import Agent
    from agent.config import AgentConfig

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"{i:03d}.png"), np.full((32, 32, 3), 60 * i, np.uint8))
    cfg = AgentConfig.model_validate(station_config(
        tmp_path, tiny_bundle, str(images), NO_BROKER, shutdown_flush_s=0,
        cameras=[{"id": "cam-a", "uri": str(images), "loop": True, "fps": 20,
                  "reconnect": {"initial_s": 0.1, "max_s": 0.5}}]))
    agent = Agent(cfg)
    agent.start()
    try:
        deadline = time.monotonic() + 60
        while not agent.metrics.counter("frames_captured_total", camera="cam-a"):
            assert time.monotonic() < deadline, "no frame captured"
            time.sleep(0.05)
        shutil.rmtree(images)
        waiting = threading.Thread(target=agent.wait, args=(True,), daemon=True)
        waiting.start()
        waiting.join(60)
        assert not waiting.is_alive(), "wait(exit_at_end=True) goes on after the folder camera's input is gone"
        assert agent.workers[0].unopenable == f"{images}: image folder does not exist"
    finally:
        agent.shutdown(0)
