"""Helpers for the retrain/rollout tests: real station processes, an MQTT recorder, tiny and weak bundles.

The broker and bundle helpers of tests/agent/agent_support.py are reused (that folder is put on
sys.path here, as the agent's own tests import it by name).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

TESTS = Path(__file__).resolve().parents[2]
REPO = TESTS.parent
if str(TESTS / "agent") not in sys.path:
    sys.path.append(str(TESTS / "agent"))

from agent_support import (  # noqa: E402
    make_tiny_bundle,
    station_config,
    write_yaml,
)

T = TypeVar("T")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def wait_until(probe: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- MQTT recorder

@dataclass(frozen=True)
class Message:
    at: float          # time.monotonic() on receipt
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Recorder:
    """A plain paho subscriber that keeps every message it receives (what a dashboard would see)."""

    def __init__(self, port: int, topics: list[str]) -> None:
        import paho.mqtt.client as paho

        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"recorder-{uuid.uuid4().hex[:6]}",
                                  protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._ready.wait(10), "recorder did not subscribe"

    def _on_message(self, _c, _u, msg) -> None:
        with self._lock:
            self.messages.append(Message(time.monotonic(), msg.topic, bytes(msg.payload), bool(msg.retain)))

    def of(self, suffix: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def status(self, station: str) -> dict[str, Any] | None:
        found = self.of(f"/{station}/status")
        return found[-1].json() if found else None

    def version(self, station: str) -> str | None:
        return ((self.status(station) or {}).get("model") or {}).get("version")

    def events(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.of("/_central/rollout")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------- stations

class Station:
    """``python -m agent run --config FILE``: a real station process on a looping folder of real images."""

    def __init__(self, workdir: Path, bundle: Path, images: Path, port: int, *, site: str = "test",
                 station: str = "st-a", fps: float = 10.0, cameras: dict[str, Path] | None = None,
                 **sections: Any) -> None:
        self.folder = workdir / f"{site}-{station}"
        self.folder.mkdir(parents=True)
        cfg = station_config(self.folder, bundle, str(images), port, **sections)
        cfg.update(site=site, station=station)
        cfg["cameras"] = [{"id": cam, "uri": str(folder), "loop": True, "fps": fps, "queue_size": 2}
                          for cam, folder in (cameras or {"cam-a": images}).items()]
        cfg["model"]["download_dir"] = str(self.folder / "downloads")
        self.config = write_yaml(self.folder / "station.yaml", cfg)
        self.key = f"{site}/{station}"
        self.log_path = self.folder / "agent.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                                         cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def wait_online(recorder: Recorder, station: Station, version: str, timeout: float = 90.0) -> None:
    def probe():
        assert station.proc.poll() is None, f"{station.key} exited:\n{station.log()[-3000:]}"
        status = recorder.status(station.key)
        return status and status["state"] == "online" and status["model"]["version"] == version
    wait_until(probe, timeout, f"{station.key} online on {version}")


def image_folder(folder: Path, count: int = 20, start: int = 0) -> Path:
    """``count`` real Fashion-MNIST test images as PNG files (a folder camera)."""
    import cv2

    from agent.demo import fashion_mnist_test

    images, _ = fashion_mnist_test(n=start + count)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images[start:], start):
        cv2.imwrite(str(folder / f"img_{i:05d}.png"), image)
    return folder


def tiny_versions(root: Path, versions: list[str], thresholds: dict[str, dict[str, float]] | None = None) -> dict[str, Path]:
    """Small random-weight bundles (agent_support.make_tiny_bundle), optionally with other suggested thresholds."""
    out = {}
    for version in versions:
        folder = make_tiny_bundle(root, version)
        if thresholds and version in thresholds:
            manifest = json.loads((folder / "manifest.json").read_text())
            manifest["quality"]["thresholds"] = thresholds[version]
            (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        out[version] = folder
    return out


def promote(bundle: Path, why: str = "stand-in gate record for a rollout test (the gate itself: test_retrain.py)") -> None:
    """A promoted gate record, as retrain writes it, for a bundle that was not trained here."""
    from contract.events import manifest_sha256, utc_now, write_gate

    manifest = json.loads((bundle / "manifest.json").read_text())
    write_gate(bundle, {"decision": "promoted", "name": manifest["name"], "version": manifest["version"],
                        "manifest_sha256": manifest_sha256(bundle), "reason": why, "ts": utc_now()})


def cli(*args: str, timeout: float = 600.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m central <verb> ...`` or ``python -m trainer retrain ...`` exactly as a user runs them."""
    package = "trainer" if args[0] == "retrain" else "central"
    return subprocess.run([sys.executable, "-m", package, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- a real model that is weak on one class

WEAK_CLASS = "Trouser"   # distinct enough that the reviewed frames teach it clearly


@dataclass
class WeakBase:
    """A real MobileNetV2 fine-tuned (32 px, ImageNet start) on real Fashion-MNIST images, with only a
    handful of ``WEAK_CLASS`` images, exported as a bundle; and real images it never saw."""

    base: Path            # its training data: class folders (symlinks)
    bundle: Path          # models/fmnist/1
    models: Path
    pool: dict[str, list[Path]]      # unseen train images per class (the stations' items, the reviewed frames)
    holdout: Path         # held-out test images, class folders
    run_dir: Path


_WEAK: dict[str, WeakBase] = {}


def weak_base(fmnist_dir: Path, root: Path, *, per_class: int = 25, weak: int = 3, weak_class: str = WEAK_CLASS,
              epochs: int = 3) -> WeakBase:
    """Built once per test session (the retrain and the end-to-end tests share it)."""
    if "weak" in _WEAK:
        return _WEAK["weak"]
    from trainer.config import TrainConfig
    from trainer.engine import Trainer
    from trainer.export.bundle import ExportConfig, export_bundle
    from trainer.export.quantize import QuantizeConfig

    train = fmnist_dir / "train"
    names = json.loads((train / "labels.json").read_text())          # folder -> class name
    base = root / "base"
    pool: dict[str, list[Path]] = {}
    for folder, label in names.items():
        files = sorted((train / folder).glob("*.png"))
        keep = weak if label == weak_class else per_class
        (base / folder).mkdir(parents=True)
        for f in files[:keep]:
            (base / folder / f.name).symlink_to(f)
        pool[label] = files[keep:]
    shutil.copy(train / "labels.json", base / "labels.json")
    run_dir = root / "runs" / "fmnist-1"
    cfg = TrainConfig(data=str(base), name="fmnist-1", arch="mobilenet_v2", weights="imagenet", image_size=32,
                      resize_shorter=32, epochs=epochs, batch_size=16, lr=2e-3, val_fraction=0.1, workers=0, seed=0)
    Trainer(cfg, run_dir).fit()
    models = root / "models"
    result = export_bundle(ExportConfig(checkpoint=run_dir / "best.pt", models_dir=models, name="fmnist", version="1",
                                        parity_images=32, quantize=QuantizeConfig(calibration_images=64),
                                        tensorrt="off", workers=0))
    _WEAK["weak"] = WeakBase(base, result.bundle_dir, models, pool, fmnist_dir / "test", run_dir)
    return _WEAK["weak"]


def class_recall(bundle: Path, folder: Path, label: str) -> tuple[float, int]:
    """Top-1 recall of the bundle's deployable ONNX model on one class's held-out images (ONNX Runtime)."""
    from contract.bundle import load_bundle
    from trainer.retrain import Item, evaluate_bundle

    names = json.loads((folder / "labels.json").read_text())
    sub = next(k for k, v in names.items() if v == label)
    items = [Item(p, label, "holdout") for p in sorted((folder / sub).glob("*.png"))]
    loaded = load_bundle(bundle)
    ev = evaluate_bundle(loaded, items, sorted(set(loaded.labels) | {label}), workers=0)
    return ev.score.top1, ev.score.images


# ---------------------------------------------------------------- a stand-in station the test answers for

class CommandedStation:
    """A stand-in station on a real broker: a retained status.v1, the ``cmd/model`` commands it receives, and a new
    retained status each time the test calls ``report`` (what an agent publishes after a model update). The test
    decides what it answers and when: an answer to an earlier command after this one, no ``request`` (an agent
    before 2026-12-07), or nothing at all."""

    def __init__(self, port: int, key: str, name: str, version: str) -> None:
        import paho.mqtt.client as paho

        self.key, self.model = key, {"name": name, "version": version, "backend": "onnxruntime", "precision": "fp32"}
        self.commands: list[dict[str, Any]] = []
        self._seq = 0
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"stand-in-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv5)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(f"inventory/{key}/cmd/model", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_command
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "stand-in station: no SUBACK"
        self.report(None)

    def _on_command(self, _c, _u, msg) -> None:
        with self._lock:
            self.commands.append(json.loads(msg.payload))

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.commands)

    def report(self, last_model_update: dict[str, Any] | None, model: tuple[str, str] | None = None) -> dict:
        """Publish a retained status (QoS 1, waited for) with this ``last_model_update``; ``model``: (name, version)
        it runs from now on. The body is checked against status.v1 first, as a real agent's would be."""
        from contract.messages import checker

        if model is not None:
            self.model = {**self.model, "name": model[0], "version": model[1]}
        self._seq += 1
        site, station = self.key.split("/")
        body = {"schema": "status.v1", "id": str(uuid.uuid4()), "seq": self._seq, "ts": time.time(), "site": site,
                "station": station, "state": "online", "model": dict(self.model),
                "last_model_update": last_model_update}
        checker("status.v1").check(f"stand-in status of {self.key}", body)
        self.client.publish(f"inventory/{self.key}/status", json.dumps(body), qos=1, retain=True).wait_for_publish(10)
        return body

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
