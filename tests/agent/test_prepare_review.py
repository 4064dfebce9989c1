"""Review follow-ups of the station's edges: the empty-scene image a camera's localizer starts from
(``decisions.presence.empty_images``), and the demo a new user runs first (``python -m agent demo``).

Real parts: the demo's own code path (agent.demo.run_scene_demo: the rendered belt scene of real Fashion-MNIST
items, a real local mosquitto it starts, the real agent on ONNX Runtime). The one stand-in: Ctrl-C, injected as the
KeyboardInterrupt Python raises for SIGINT, at a fixed point of the run (the agent started, its scene under way), so
the test does not depend on when a signal lands.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_support import as_config, make_onnx_bundle, station_config

import agent.demo as demo
from agent.app import Agent
from agent.config import ConfigError
from agent.demo import DemoError, run_scene_demo
from agent.prepare import load_empty_scene


def empty_image_config(tmp_path: Path, image: np.ndarray, roi: dict[str, int]):
    path = tmp_path / "empty.png"
    cv2.imwrite(str(path), image)
    data = station_config(tmp_path, tmp_path / "bundle", "rtsp://10.0.0.1/x", 1883)
    data["cameras"][0]["roi"] = roi
    data["decisions"] = {"presence": {"mode": "background", "empty_images": {data["cameras"][0]["id"]: str(path)}}}
    cfg = as_config(data)
    return cfg, cfg.cameras[0], path


def test_an_empty_scene_image_that_cannot_hold_the_roi_is_refused_naming_the_field(tmp_path):
    # given: a whole frame captured at another resolution (160x120): the ROI (x 100, width 64) runs off its edge
    gradient = np.tile(np.arange(160, dtype=np.uint8), (120, 1))
    cfg, cam, path = empty_image_config(tmp_path, np.dstack([gradient] * 3), {"x": 100, "y": 10, "width": 64,
                                                                             "height": 64})
    # when / then: refused at the start, naming the field, the file, both sizes (it was passed on whole, and the
    # localizer dropped it at the first frame with a warning: the station learned the scene from its first frames)
    with pytest.raises(ConfigError) as refused:
        load_empty_scene(cfg, cam)
    assert str(refused.value) == (f"decisions.presence.empty_images.{cam.id}: {path}: the image is 160x120 px; "
                                  "expected the camera's ROI (64x64) or a whole frame that holds the ROI x=100 y=10 "
                                  "width=64 height=64 (capture it at the camera's resolution)")


def test_an_empty_scene_image_of_the_roi_or_a_whole_frame_is_taken(tmp_path):
    gradient = np.dstack([np.tile(np.arange(160, dtype=np.uint8), (120, 1))] * 3)
    roi = {"x": 90, "y": 10, "width": 64, "height": 64}
    cfg, cam, _ = empty_image_config(tmp_path, gradient, roi)             # a whole frame: cut to the ROI
    scene = load_empty_scene(cfg, cam)
    assert scene.shape == (64, 64, 3) and int(scene[0, 0, 0]) == 90
    cfg, cam, _ = empty_image_config(tmp_path, gradient[:64, :64], roi)   # the ROI itself: taken as it is
    scene = load_empty_scene(cfg, cam)
    assert scene.shape == (64, 64, 3) and int(scene[0, 0, 0]) == 0


def test_demo_with_a_missing_bundle_says_so_before_rendering_anything(tmp_path, mosquitto_bin):
    # given: a new user's mistakes: a path that does not exist, and the model's folder instead of a version's
    scene_dir = tmp_path / "scene"
    for wrong, says in [(tmp_path / "models" / "fashion-mnist" / "nope", "bundle folder does not exist"),
                        (tmp_path / "models", "manifest.json: cannot read")]:
        wrong.mkdir(parents=True, exist_ok=True) if wrong.name == "models" else None
        # when: the demo is run on it
        with pytest.raises(DemoError) as refused:
            run_scene_demo(wrong, items=2, scene_dir=scene_dir)
        # then: one line naming --bundle and what is wrong, and nothing was rendered (no scene, no broker)
        assert str(refused.value).startswith(f"--bundle {wrong}: not a model bundle (") and says in str(refused.value)
        assert not scene_dir.exists()


def test_demo_names_the_versions_of_a_models_folder(tmp_path, mosquitto_bin):
    make_onnx_bundle(tmp_path / "models", version="7")
    with pytest.raises(DemoError, match=r"--bundle .*onnx-tiny: not a model bundle .*it holds the versions 7"):
        run_scene_demo(tmp_path / "models" / "onnx-tiny", items=2, scene_dir=tmp_path / "scene")


def test_demo_refuses_a_bundle_that_knows_no_fashion_mnist_class(tmp_path, mosquitto_bin):
    # given: a valid bundle whose labels are not the scene's (every item would be scored wrong, silently)
    bundle = make_onnx_bundle(tmp_path / "models", classes=4)
    # when / then: refused before the scene is rendered, naming the bundle and its labels
    with pytest.raises(DemoError, match=r"--bundle .*/onnx-tiny/1: bundle onnx-tiny 1 has none of the Fashion-MNIST "
                                        r"classes .*'class-0', 'class-1'"):
        run_scene_demo(bundle, items=2, scene_dir=tmp_path / "scene")
    assert not (tmp_path / "scene").exists()


def test_ctrl_c_during_the_demo_stops_the_station_and_its_broker(tmp_path, tiny_bundle, fmnist_test_images,
                                                                  monkeypatch, mosquitto_bin):
    # given: the demo's station started on its scene; Ctrl-C arrives while it waits for the scene's end
    started: dict[str, object] = {}
    real_start = Agent.start

    def start(agent: Agent) -> None:
        real_start(agent)
        started["agent"] = agent

    def interrupted(agent: Agent, exit_at_end: bool) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Agent, "start", start)
    monkeypatch.setattr(Agent, "wait", interrupted)
    popen = demo.subprocess.Popen
    brokers = []
    monkeypatch.setattr(demo.subprocess, "Popen", lambda *a, **k: brokers.append(popen(*a, **k)) or brokers[-1])
    # when: the demo runs
    with pytest.raises(KeyboardInterrupt):
        run_scene_demo(tiny_bundle, items=3, scene_dir=tmp_path / "scene")
    # then: the station was shut down (its threads ended, its outbox closed, offline published) before the scene
    # and the broker went, and the broker process the demo started is gone
    agent = started["agent"]
    assert isinstance(agent, Agent)
    assert agent.stop_event.is_set()
    assert not any(w.is_alive() for w in agent.workers)
    assert agent.inference is not None and not agent.inference.is_alive()
    assert len(brokers) == 1 and brokers[0].poll() is not None
    assert Path(tmp_path / "scene" / "belt").is_dir()       # the scene the user asked to keep is kept


@pytest.mark.parametrize("items", [0, -1])
def test_demo_refuses_a_belt_without_items(items, tmp_path, tiny_bundle):
    with pytest.raises(DemoError, match=rf"--items {items}: expected 1 to 10000 items on the belt"):
        run_scene_demo(tiny_bundle, items=items, scene_dir=tmp_path / "scene")
    assert not (tmp_path / "scene").exists()


def test_demo_with_a_broker_that_is_not_there_says_which(tmp_path, tiny_bundle, fmnist_test_images):
    port = demo.free_port()         # nothing listens there
    with pytest.raises(DemoError, match=rf"--host 127\.0\.0\.1 --port {port}: cannot subscribe to the broker \("):
        run_scene_demo(tiny_bundle, host="127.0.0.1", port=port, items=1, scene_dir=tmp_path / "scene")


def test_the_demo_command_with_a_missing_bundle_is_one_line_and_exit_2(tmp_path):
    """``python -m agent demo --bundle <nothing>``, as a new user mistypes it: one line naming the bundle, exit 2,
    no traceback (before: a StartupError traceback, after a scene was rendered and a broker started)."""
    import subprocess
    import sys

    missing = tmp_path / "no-such-bundle"
    proc = subprocess.run([sys.executable, "-m", "agent", "demo", "--bundle", str(missing)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and str(missing) in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m agent demo: ")
