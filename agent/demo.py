"""``python -m agent demo``: the whole station on a laptop, in one command.

Renders a conveyor scene of real Fashion-MNIST test items (agent/sim/scenes.py: a moving belt seen by a
camera larger than the station's ROI, uneven light, noise, motion blur, empty belt between items), starts
a local mosquitto when no broker is given, runs the agent over the scene's frames with --exit-at-end
semantics and background presence (the station localizes the item before classifying it), and returns
what a dashboard subscribed to the station's topics received, scored against the scene's truth
(agent/sim/score.py): the figures a station's owner would ask for, per item and per frame.

What a new user gets wrong (a bundle path that is not a bundle, a bundle not trained on Fashion-MNIST, no
mosquitto, a broker that cannot be reached, a station that cannot start) is a ``DemoError`` naming the option and
what was wrong, before anything is rendered where it can be. Whatever ends the run (Ctrl-C included), the agent
is shut down and the broker the demo started is stopped before the scene's folder goes.
"""

from __future__ import annotations

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

from agent.sim.scenes import FASHION_MNIST_DIR, read_idx, write_scene
from agent.sim.score import score_scene

log = logging.getLogger(__name__)

DEMO_SCENE = "belt"
DEMO_CAMERA = "dock-a"
INTERRUPTED_FLUSH_S = 2.0       # after Ctrl-C: the outbox is not waited for (the demo's results are not kept)


class DemoError(RuntimeError):
    """Why the demo cannot run, in one line naming the option or file at fault."""


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
        raise DemoError("no broker given (--host) and mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra_conf}")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise DemoError(f"{binary} -c {conf}: the local broker did not start on port {port} "
                                    f"(exit status {proc.poll()}); give one with --host") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def demo_config(bundle: Path, scene_dir: Path, truth: dict, workdir: Path, host: str, port: int) -> dict[str, Any]:
    """The station for the demo scene: a folder camera with the scene's ROI, paced by backpressure (no frame
    dropped), presence by the localizer's background model (as benchmarks/station_view.py runs it)."""
    return {
        "site": "demo", "station": "receiving-01", "role": "receiving",
        "model": {"bundle": str(bundle.resolve()), "batch_size": 8, "warmup_runs": 1, "backend": "onnxruntime"},
        "cameras": [{"id": DEMO_CAMERA, "uri": str(scene_dir), "roi": truth["roi"], "backpressure": "block",
                     "queue_size": 8, "stall_timeout_s": 60}],
        "mqtt": {"host": host, "port": port},
        "outbox": {"path": str(workdir / "outbox.sqlite")},
        "decisions": {"presence": {"mode": "background"}},
        "frames": {"min_interval_s": 0.0},       # every low-confidence frame (near-duplicates aside) goes to review
        "health": {"stats_interval_s": 1.0},
        "shutdown_flush_s": 20,
    }


@dataclass
class DemoRun:
    """What the dashboard received, the scene it was run on (truth.json) and the scores against it."""

    messages: list[Received]
    truth: dict[str, Any]
    scores: dict[str, Any]


def bodies(messages: list[Received], kind: str) -> list[dict]:
    """The payloads of one kind (result, decision, stats, ...), redeliveries (same id) dropped."""
    seen: set[str] = set()
    out = []
    for msg in messages:
        if msg.topic.rsplit("/", 1)[-1] != kind:
            continue
        body = msg.json()
        if body.get("id") not in seen:
            seen.add(body.get("id"))
            out.append(body)
    return out


def check_demo_bundle(bundle: Path) -> None:
    """The bundle the demo runs: a verified bundle that knows Fashion-MNIST's classes (the scene's items); else
    DemoError naming ``--bundle``. Checked before the scene is rendered and a broker started."""
    from contract.bundle import MANIFEST, BundleError, load_bundle
    from contract.dataset import FASHION_MNIST_CLASSES

    try:
        loaded = load_bundle(bundle)
    except BundleError as exc:
        versions = sorted(p.parent.name for p in Path(bundle).glob(f"*/{MANIFEST}")) if Path(bundle).is_dir() else []
        hint = (f"it holds the versions {', '.join(versions[:5])}: give one of them" if versions else
                "give a bundle folder such as models/fashion-mnist/<version> (python -m trainer train writes one)")
        raise DemoError(f"--bundle {bundle}: not a model bundle ({exc}); {hint}") from exc
    known = set(FASHION_MNIST_CLASSES)
    if not known.intersection(loaded.labels):
        shown = ", ".join(map(repr, loaded.labels[:5])) + (" ..." if len(loaded.labels) > 5 else "")
        raise DemoError(f"--bundle {bundle}: bundle {loaded.name} {loaded.version} has none of the Fashion-MNIST "
                        f"classes the demo scene shows (its labels: {shown}); every item would be scored wrong. "
                        "Give a bundle trained on Fashion-MNIST")


def _check_demo_args(items: int, port: int) -> None:
    if not 1 <= items <= 10_000:
        raise DemoError(f"--items {items}: expected 1 to 10000 items on the belt")
    if not 1 <= port <= 65535:
        raise DemoError(f"--port {port}: expected a TCP port, 1 to 65535")


def run_scene_demo(bundle: Path, *, host: str | None = None, port: int = 1883, items: int = 20, seed: int = 0,
                   scene_dir: Path | None = None) -> DemoRun:
    """Render the belt scene (into ``scene_dir`` when given, kept), run the agent on it, score what arrived.

    DemoError (one line naming the option at fault) when the demo cannot run: checked before rendering where it
    can be (the bundle, Fashion-MNIST, the arguments)."""
    _check_demo_args(items, port)
    check_demo_bundle(bundle)
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        raise DemoError(f"{FASHION_MNIST_DIR}: the Fashion-MNIST test split (t10k-*-idx*-ubyte.gz) is not installed; "
                        "the demo scene is made of its items")
    with tempfile.TemporaryDirectory(prefix="agent-demo-") as tmp:
        workdir = Path(tmp)
        root = scene_dir or workdir
        log.info("rendering a %s scene: %d Fashion-MNIST test items, seed %d -> %s", DEMO_SCENE, items, seed,
                 root / DEMO_SCENE)
        truth = write_scene(DEMO_SCENE, root, items, seed)
        messages = _run_agent(bundle, root / DEMO_SCENE, truth, workdir, host, port)
    scores = score_scene(truth, bodies(messages, "result"), bodies(messages, "decision"), bodies(messages, "stats"),
                         camera=DEMO_CAMERA)
    return DemoRun(messages, truth, scores)


def run_demo(bundle: Path, *, host: str | None = None, port: int = 1883, items: int = 20,
             seed: int = 0) -> list[Received]:
    """Everything the dashboard received while the agent processed the demo scene."""
    return run_scene_demo(bundle, host=host, port=port, items=items, seed=seed).messages


def _run_agent(bundle: Path, scene_dir: Path, truth: dict, workdir: Path, host: str | None,
               port: int) -> list[Received]:
    from agent.app import Agent, StartupError
    from agent.config import AgentConfig

    with (local_mosquitto(workdir) if host is None else _given(port)) as broker_port:
        broker_host = host or "127.0.0.1"
        cfg = AgentConfig.model_validate(demo_config(bundle, scene_dir, truth, workdir, broker_host, broker_port))
        try:
            dashboard = Subscriber(broker_host, broker_port, cfg.topic_root)
        except (OSError, RuntimeError) as exc:
            raise DemoError(f"--host {broker_host} --port {broker_port}: cannot subscribe to the broker "
                            f"({exc})") from exc
        agent = Agent(cfg)
        flush_s = INTERRUPTED_FLUSH_S       # any way out but the end of the scene: do not wait on the outbox
        try:
            try:
                agent.start()
            except StartupError as exc:
                raise DemoError(f"the demo station cannot start: {exc}") from exc
            agent.wait(exit_at_end=True)
            flush_s = cfg.shutdown_flush_s
        finally:
            # Ctrl-C, an error: the cameras, the model and the MQTT threads stop before the scene's folder and the
            # broker go (else the camera threads report every vanished frame, and the process may not end)
            agent.shutdown(flush_s)
            time.sleep(0.5 if flush_s == cfg.shutdown_flush_s else 0)
            dashboard.close()
        return dashboard.messages


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_lines(run: DemoRun) -> list[str]:
    """The demo's scorecard: how the station did on the scene, per item and per frame."""
    truth, it, fr = run.truth, run.scores["items"], run.scores["frames"]
    roi = truth["roi"]
    return [
        f"scene {truth['scene']} (seed {truth['seed']}): {it['items']} Fashion-MNIST test items, "
        f"{truth['n_frames']} frames, ROI {roi['width']}x{roi['height']} at ({roi['x']},{roi['y']})",
        f"items decided right   {it['correct']} of {it['items'] - it['never_visible']} ({_pct(it['item_accuracy'])})"
        + (f"; {it['never_visible']} never in view" if it['never_visible'] else ""),
        f"missed / split        {it['missed']} / {it['split']}   (merged decisions, one over two items: "
        f"{it['merged_decisions']})",
        f"phantom decisions     {it['phantom_decisions']} of {it['decisions']} decisions",
        f"sent to review        {it['review']} of {it['items']} items ({_pct(it['review_share'])}); "
        f"auto-sorted {it['auto_sorted_decisions']}, {it['auto_wrong_decisions']} of them wrong",
        f"frame accuracy, item fully in view  {_pct(fr['full']['accuracy'])} "
        f"({fr['full']['correct']} of {fr['full']['frames']} frames, {fr['full']['results']} published)",
        f"empty frames published as products  {fr['empty']['products']} of {fr['empty']['frames']}",
    ]


@contextmanager
def _given(port: int) -> Iterator[int]:
    yield port
