"""Paths in a station config: every relative path (bundle, outbox, keys, and file and folder cameras) is relative
to the file that sets it, never to the working folder the agent was started in; and a download folder that can
never be made is found at start without making anything.

Real parts: the real loader and schema, real image files and folders, the real ``agent.startup`` and
``python -m agent run`` (in a subprocess, started from another folder than the config's).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_support import station_config, write_yaml

from agent.config import ConfigError, ModelConfig, camera_uri_from, load_config
from agent.sources import ImageFolderSource, check_finite_source, open_source
from agent.startup import main as startup_main

REPO = Path(__file__).resolve().parents[2]
NO_BROKER = 1       # a port nothing listens on: the station keeps its messages in the outbox


def _images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((32, 32, 3), 60 * i, np.uint8))
    return folder


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """The process works in another folder than the config's, as under systemd (WorkingDirectory) or Docker."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


# ---------------------------------------------------------------- camera paths

def test_a_relative_folder_camera_is_relative_to_the_config_like_the_bundle(tmp_path, elsewhere):
    """It was relative to the working folder: the folder beside the config was not found (read as a video file
    named ``frames``), while the bundle named beside it in the same file was."""
    conf = tmp_path / "conf"
    frames = _images(conf / "frames")
    path = conf / "station.yaml"
    path.write_text("site: s\nstation: t\nmodel: {bundle: bundle}\ncameras: [{id: a, uri: frames}]\n")
    cfg = load_config(path)
    assert cfg.model.bundle == conf / "bundle"
    assert cfg.cameras[0].uri == str(frames)
    source = open_source(cfg.cameras[0].uri, name="a")
    assert isinstance(source, ImageFolderSource) and source.finite
    check_finite_source(cfg.cameras[0].uri, name="a")       # what run and agent.startup do at start


@pytest.mark.parametrize("uri, expected", [
    ("belt.mp4", "{conf}/belt.mp4"),
    ("./videos/belt.mp4", "{conf}/videos/belt.mp4"),
    ("../shared/belt.mp4", "{conf}/../shared/belt.mp4"),
    ("file:belt.mp4", "file://{conf}/belt.mp4"),
    ("file:videos/a%20b.mp4", "file://{conf}/videos/a%20b.mp4"),
    ("/data/belt.mp4", "/data/belt.mp4"),
    ("file:///data/belt.mp4", "file:///data/belt.mp4"),
    ("0", "0"),
    ("usb://1", "usb://1"),
    ("v4l2:///dev/video0", "v4l2:///dev/video0"),
    ("rtsp://10.20.1.11:554/stream1", "rtsp://10.20.1.11:554/stream1"),
    ("csi://0", "csi://0"),
    ("gst://videotestsrc ! appsink", "gst://videotestsrc ! appsink"),
])
def test_only_relative_file_and_folder_cameras_are_resolved(tmp_path, elsewhere, uri, expected):
    conf = tmp_path / "conf"
    conf.mkdir()
    path = conf / "station.yaml"
    path.write_text(f"site: s\nstation: t\nmodel: {{bundle: b}}\ncameras: [{{id: a, uri: '{uri}'}}]\n")
    assert load_config(path).cameras[0].uri == expected.format(conf=conf)


def test_a_file_uri_keeps_its_meaning_when_the_config_folder_needs_quoting(tmp_path):
    """The config's folder goes into a file: URI quoted (a space, a '#', a '%'), and comes out as that folder."""
    conf = tmp_path / "odd dir #1 %"
    video = conf / "belt.mp4"
    uri = camera_uri_from("file:belt.mp4", conf)
    assert uri.startswith("file:///") and " " not in uri and "#" not in uri
    source = open_source(uri, name="a")
    assert source.target == str(video)


def test_a_camera_in_a_parent_layer_is_relative_to_that_layer(tmp_path, elsewhere):
    """``extends``: each file's relative paths are its own, cameras as well as the bundle."""
    frames = _images(tmp_path / "fleet" / "frames")
    (tmp_path / "fleet" / "defaults.yaml").write_text("model: {bundle: models/current}\n"
                                                      "cameras: [{id: a, uri: frames}]\n")
    station = tmp_path / "fleet" / "stations" / "s1.yaml"
    station.parent.mkdir()
    station.write_text("extends: ../defaults.yaml\nsite: s\nstation: t\n")
    cfg = load_config(station)
    assert cfg.cameras[0].uri == str(frames)
    assert cfg.model.bundle == tmp_path / "fleet" / "models" / "current"


def test_startup_finds_a_relative_folder_camera_from_another_working_folder(tmp_path, elsewhere, tiny_bundle):
    """``agent.startup`` opens every file and folder camera once: from the systemd unit's working folder it
    refused a folder beside the config ("video file does not exist")."""
    conf = tmp_path / "conf"
    _images(conf / "frames")
    config = write_yaml(conf / "station.yaml", station_config(
        tmp_path, tiny_bundle, "frames", NO_BROKER, model={"download_dir": str(tmp_path / "dl")}))
    assert startup_main(["start", "--dry-run", "--config", str(config), "--engine-cache", str(tmp_path / "e")],
                        tensorrt_present=False) == 0


def test_run_reads_a_relative_folder_camera_beside_its_config(tmp_path, tiny_bundle):
    """``python -m agent run`` started in the repository (not the config's folder) classifies the folder that the
    config names beside itself, to its end (``--exit-at-end``), exit 0."""
    conf = tmp_path / "conf"
    _images(conf / "frames", n=4)
    config = write_yaml(conf / "station.yaml", station_config(
        tmp_path, tiny_bundle, "frames", NO_BROKER, shutdown_flush_s=0,
        cameras=[{"id": "cam-a", "uri": "frames", "backpressure": "block", "queue_size": 8}]))
    assert Path.cwd() != conf
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config), "--exit-at-end",
                           "--flush-timeout", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = sqlite3.connect(f"file:{tmp_path / 'outbox.sqlite'}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT COUNT(*) FROM messages WHERE kind = 'result'").fetchone()[0] == 4
    finally:
        db.close()


# ---------------------------------------------------------------- the download folder

def test_a_download_folder_behind_a_file_is_refused_naming_the_field(tmp_path):
    """``agent.startup`` refused it (cannot create); ``run`` started and then refused every cmd/model."""
    (tmp_path / "a-file").write_text("in the way\n")
    for where in (tmp_path / "a-file" / "bundles", tmp_path / "a-file" / "deeper" / "bundles", tmp_path / "a-file"):
        with pytest.raises(ConfigError) as exc:
            ModelConfig(bundle="b", download_dir=where).check_download_dir()
        assert str(exc.value).startswith(f"model.download_dir: cannot create {where} ({tmp_path / 'a-file'} is not "
                                         f"a folder)")


def test_a_download_folder_behind_a_dangling_link_is_refused(tmp_path):
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="is a dangling link"):
        ModelConfig(bundle="b", download_dir=tmp_path / "gone" / "bundles").check_download_dir()


def test_a_download_folder_that_can_be_made_passes_and_is_not_made(tmp_path):
    """The check creates nothing (validate-config and run read a config; agent.startup makes the folder)."""
    (tmp_path / "there").mkdir()
    ModelConfig(bundle="b", download_dir=tmp_path / "there").check_download_dir()
    ModelConfig(bundle="b", download_dir=tmp_path / "a" / "b" / "c").check_download_dir()
    assert not (tmp_path / "a").exists()


def test_loading_and_checking_a_config_makes_no_folder(tmp_path, elsewhere):
    path = tmp_path / "station.yaml"
    path.write_text("site: s\nstation: t\nmodel: {bundle: b, download_dir: dl/bundles}\n"
                    "outbox: {path: ob/outbox.sqlite}\ncameras: [{id: a, uri: 'rtsp://10.0.0.1/x'}]\n")
    cfg = load_config(path)
    cfg.model.check_download_dir()
    assert cfg.model.download_dir == tmp_path / "dl" / "bundles"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "station.yaml"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any folder")
def test_a_download_folder_this_user_cannot_write_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=f"{folder} is not writable by uid"):
        ModelConfig(bundle="b", download_dir=folder).check_download_dir()
    with pytest.raises(ConfigError, match=f"cannot create {folder / 'bundles'} \\({folder} is not writable"):
        ModelConfig(bundle="b", download_dir=folder / "bundles").check_download_dir()


def test_run_refuses_a_download_folder_that_cannot_be_made_as_the_startup_does(tmp_path, tiny_bundle):
    """``agent.startup`` refused it; ``run`` started, and refused every cmd/model after."""
    (tmp_path / "a-file").write_text("in the way\n")
    dl = tmp_path / "a-file" / "bundles"
    images = _images(tmp_path / "images")
    config = write_yaml(tmp_path / "station.yaml", station_config(tmp_path, tiny_bundle, str(images), NO_BROKER,
                                                                  model={"download_dir": str(dl)}))
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config), "--exit-at-end",
                           "--flush-timeout", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"cannot start: {config}: field model.download_dir: cannot create {dl} ({tmp_path / 'a-file'} is not "
            f"a folder)") in proc.stderr
    assert not dl.exists()
