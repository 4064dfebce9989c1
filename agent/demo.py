"""``python -m agent demo``: the whole station on a laptop, in one command.

Makes a sample video from real Fashion-MNIST test images, starts a local
mosquitto when no broker is given, runs the agent over the video with
--exit-at-end semantics, and returns what a dashboard subscribed to the
station's topics received.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """A (gzip) IDX file as a numpy array (images: N x 28 x 28 uint8; labels: N)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_test(root: Path = FASHION_MNIST_DIR, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(root / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz")
    return (images[:n], labels[:n]) if n else (images, labels)


def write_video(images: np.ndarray, path: Path, *, size: int = 112, fps: float = 10.0,
                repeat: int = 1, blank_between: int = 0, lead_blank: int = 0) -> list[int | None]:
    """MJPG .avi of gray images scaled to ``size``; returns, per video frame, the image index (None: blank).

    ``lead_blank`` empty frames first: background presence learns the empty scene from the first frame.
    """
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write MJPG video")
    blank = np.zeros((size, size, 3), np.uint8)
    for _ in range(lead_blank):
        writer.write(blank)
    index: list[int | None] = [None] * lead_blank
    for i, image in enumerate(images):
        frame = cv2.cvtColor(cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
        for _ in range(repeat):
            writer.write(frame)
            index.append(i)
        for _ in range(blank_between):
            writer.write(blank)
            index.append(None)
    writer.release()
    return index


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_mosquitto(workdir: Path, extra_conf: str = "") -> Iterator[int]:
    """A throwaway mosquitto on 127.0.0.1 (anonymous, persistence off; ``extra_conf``: more config lines)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise RuntimeError("no broker given and mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra_conf}")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


@dataclass
class Received:
    topic: str
    payload: bytes
    user_properties: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        if "meta" in self.user_properties:
            return json.loads(self.user_properties["meta"])
        return json.loads(self.payload)


class Subscriber:
    """A dashboard stand-in: collects everything under a topic root (QoS 1)."""

    def __init__(self, host: str, port: int, root: str, *, client_id: str | None = None, clean: bool = True,
                 v5: bool = True) -> None:
        import paho.mqtt.client as paho

        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or f"dash-{os.getpid()}-{id(self)}",
                                  protocol=paho.MQTTv5 if v5 else paho.MQTTv311, clean_session=None if v5 else clean)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.root = root
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{root}/#", qos=1) if not rc.is_failure else None
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if clean else 3600   # a persistent session survives a broker restart
            self.client.connect(host, port, clean_start=clean, properties=props)
        else:
            self.client.connect(host, port)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError(f"subscriber could not subscribe on {host}:{port}")

    def _on_message(self, client, userdata, msg) -> None:
        props = dict(getattr(msg.properties, "UserProperty", []) or []) if msg.properties else {}
        with self.lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), props))

    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return predicate(self)

    def of(self, kind: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic == f"{self.root}/{kind}"]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def demo_config(bundle: Path, video: Path, workdir: Path, host: str, port: int) -> dict[str, Any]:
    return {
        "site": "demo", "station": "receiving-01", "role": "receiving",
        "model": {"bundle": str(bundle), "batch_size": 8, "warmup_runs": 1, "backend": "onnxruntime"},
        "cameras": [{"id": "dock-a", "uri": str(video), "backpressure": "block", "queue_size": 16}],
        "mqtt": {"host": host, "port": port},
        "outbox": {"path": str(workdir / "outbox.sqlite")},
        "decisions": {"presence": {"mode": "background", "min_frames": 2, "gap_frames": 1}},
        "frames": {"min_interval_s": 0.0},
        "health": {"stats_interval_s": 1.0},
        "shutdown_flush_s": 20,
    }


def run_demo(bundle: Path, *, host: str | None = None, port: int = 1883, images: int = 20) -> list[Received]:
    """Everything the dashboard received while the agent processed the sample video."""
    from agent.app import Agent
    from agent.config import AgentConfig

    with tempfile.TemporaryDirectory(prefix="agent-demo-") as tmp:
        workdir = Path(tmp)
        pics, _ = fashion_mnist_test(n=images)
        video = workdir / "sample.avi"
        write_video(pics, video, repeat=3, blank_between=2, lead_blank=2)
        with (local_mosquitto(workdir) if host is None else _given(port)) as broker_port:
            broker_host = host or "127.0.0.1"
            cfg = AgentConfig.model_validate(demo_config(bundle, video, workdir, broker_host, broker_port))
            dashboard = Subscriber(broker_host, broker_port, cfg.topic_root)
            agent = Agent(cfg)
            agent.start()
            agent.wait(exit_at_end=True)
            agent.shutdown(cfg.shutdown_flush_s)
            time.sleep(0.5)
            dashboard.close()
            return dashboard.messages


@contextmanager
def _given(port: int) -> Iterator[int]:
    yield port
