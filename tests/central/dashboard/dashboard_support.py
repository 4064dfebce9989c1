"""Helpers for the dashboard and browser tests (imported by name, like agent_support and deploy_support).

Messages come from the agent's own code: ``record_agent_session`` runs the real
``agent.app.Agent`` over real Fashion-MNIST images against a real mosquitto and
keeps what a subscriber received. Processes (``python -m central dashboard``,
``python -m agent run``) are started exactly as docs/dashboard.md and
docs/agent.md run them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from agent_support import Broker, station_config, validate_message, write_yaml

from agent.demo import Subscriber, fashion_mnist_test, free_port, write_video

REPO = Path(__file__).resolve().parents[3]
DASHBOARD_KINDS = ("status", "result", "decision", "alert", "stats")
T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout: float = 60.0, what: str = "condition", interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; generous timeouts for a loaded 2-core machine."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (OSError, urllib.error.URLError, KeyError, IndexError, TypeError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}; last: {str(last)[:2000]}")


# ---------------------------------------------------------------- real messages from the real agent

@dataclass(frozen=True)
class Recorded:
    topic: str
    payload: bytes

    @property
    def kind(self) -> str:
        return self.topic.rsplit("/", 1)[-1]

    def json(self) -> dict[str, Any]:
        return json.loads(self.payload)


def fmnist_video(path: Path, images: int = 12, **kw: Any) -> Path:
    """Real Fashion-MNIST test images as an MJPG video, with empty frames between items (presence decisions)."""
    pics, _ = fashion_mnist_test(n=images)
    write_video(pics, path, size=64, **{"repeat": 3, "blank_between": 2, "lead_blank": 2, **kw})
    return path


def agent_sections(**extra: Any) -> dict[str, Any]:
    """Decisions that make every kind of message: items (background presence) and QC alerts."""
    labels = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
              "Ankle boot"]
    return {"decisions": {"presence": {"mode": "background", "min_frames": 2, "gap_frames": 1},
                          "qc": {"defect_classes": labels, "min_confidence": 0.0, "cooldown_s": 0.5}},
            **extra}


def record_agent_session(workdir: Path, bundle: Path, video: Path) -> list[Recorded]:
    """Everything a dashboard subscription receives while the real agent runs over ``video``.

    The agent is told once, mid-run, to install a bundle whose sha256 is wrong, so the
    recording holds a real rejected-update status; it ends with the agent's offline status.
    """
    from agent_support import as_config

    from agent.app import Agent

    (workdir / "broker").mkdir(parents=True)
    broker = Broker(workdir / "broker").start()
    try:
        cfg = as_config(station_config(workdir, bundle, str(video), broker.port, **agent_sections(
            model={"download_dir": str(workdir / "downloads")}, health={"stats_interval_s": 0.3},
            # paced like a camera (about 3 s of video), so the run spans several stats intervals
            cameras=[{"id": "cam-a", "uri": str(video), "backpressure": "block", "queue_size": 8, "fps": 20.0}])))
        subscriber = Subscriber("127.0.0.1", broker.port, cfg.topic_root)
        agent = Agent(cfg)
        agent.start()
        try:
            # online first, so the first online status is a clean one and a later one carries the refusal
            wait_until(lambda: any(json.loads(m.payload)["state"] == "online" for m in subscriber.of("status")), 60,
                       "the agent's online status")
            agent.reload_model(json.dumps({"bundle": str(bundle), "sha256": "0" * 64,
                                           "version": "never-installed"}).encode())
            agent.wait(exit_at_end=True)
        finally:
            agent.shutdown(15)
        wait_until(lambda: any(m.topic.endswith("/status") and json.loads(m.payload)["state"] == "offline"
                               for m in subscriber.of("status")), 30, "the agent's offline status")
        subscriber.close()
        recorded = [Recorded(m.topic, m.payload) for m in subscriber.messages
                    if m.topic.rsplit("/", 1)[-1] in DASHBOARD_KINDS]
    finally:
        broker.stop()
    for message in recorded:              # real, and valid against the agent's schemas
        validate_message(message.json()["schema"], message.json())
    return recorded


def retopic(message: Recorded, site: str, station: str, **changes: Any) -> Recorded:
    """A recorded message as another station would send it (new id unless given): same agent-built body."""
    body = {**message.json(), "site": site, "station": station, "id": str(uuid.uuid4()), **changes}
    validate_message(body["schema"], body)
    return Recorded(f"inventory/{site}/{station}/{message.kind}", json.dumps(body).encode())


# ---------------------------------------------------------------- central rollout events

def rollout_event(action: str, ok: bool, reason: str | None, stations: list[str], *, version: str = "2",
                  name: str = "fashion-mnist", figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """A rollout event as the central tools build it (central.rollout.make_event, rollout-event.v1)."""
    from central.rollout import make_event

    return make_event(action, {"name": name, "version": version}, ok=ok, reason=reason, stations=stations,
                      figures=figures)


def failed_gate_event(version: str = "2") -> dict[str, Any]:
    """The gate event ``python -m trainer retrain`` publishes for a candidate that is not better on the reviewed
    frames: its own rule (trainer.retrain.gate_decision) on counts, without the training."""
    from trainer.retrain import Score, gate_decision

    decision = gate_decision(Score(880, 1000), Score(884, 1000), Score(44, 100), Score(41, 100))
    assert not decision.promoted
    return rollout_event("gate", False, decision.summary, [], version=version,
                         figures={"overall_top1_current": 0.88, "overall_top1_candidate": 0.884,
                                  "reviewed_top1_current": 0.44, "reviewed_top1_candidate": 0.41})


def publish_event(port: int, event: dict[str, Any]) -> None:
    """On the central rollout topic, the way the central tools send it (retained, QoS 1, PUBACK awaited)."""
    from central.rollout import publish_event_once
    from contract.broker import BrokerSettings

    publish_event_once(BrokerSettings(host="127.0.0.1", port=port), event)


def publish(port: int, messages: list[tuple[str, bytes | str]], *, retain: bool = False, **auth: Any) -> None:
    """QoS 1 publishes that return once the broker has acknowledged every one."""
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    if auth.get("username"):
        client.username_pw_set(auth["username"], auth.get("password"))
    if auth.get("ca"):
        client.tls_set(ca_certs=str(auth["ca"]))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1, retain=retain) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published(), f"publish to port {port} not acknowledged"
    finally:
        client.disconnect()
        client.loop_stop()


def manifest_sha256(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


# ---------------------------------------------------------------- processes

def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


class DashboardProcess:
    """``python -m central dashboard`` as a user runs it, on a free port."""

    def __init__(self, workdir: Path, mqtt_port: int, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = workdir / f"dashboard-{self.port}.log"
        self.command = [sys.executable, "-m", "central", "dashboard", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt_port),
                        "--host", "127.0.0.1", "--port", str(self.port), "--push-interval", "0.1", *args]
        if "--web-password-file" not in args and "--web-password-out" not in args:
            self.command.append("--no-auth")      # these tests read the page's JSON; auth: test_hostile_dashboard
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        wait_until(self._healthy, 60, f"the dashboard to serve on port {self.port}")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"dashboard exited with {self.proc.returncode}:\n{self.log()}")
        return get_json(f"{self.url}healthz", 2)["ok"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def state(self) -> dict[str, Any]:
        return get_json(f"{self.url}api/state")

    def station(self, key: str) -> dict[str, Any] | None:
        return next((s for s in self.state()["stations"] if s["key"] == key), None)

    def wait_state(self, predicate: Callable[[dict[str, Any]], bool], what: str,
                   timeout: float = 60.0) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            snap = self.state()
            return snap if predicate(snap) else None
        try:
            return wait_until(probe, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ndashboard log:\n{self.log()[-3000:]}") from None

    def wait_station(self, key: str, predicate: Callable[[dict[str, Any]], bool], what: str,
                     timeout: float = 60.0) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            view = self.station(key)
            return view if view is not None and predicate(view) else None
        try:
            return wait_until(probe, timeout, f"{key}: {what}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstation now: {json.dumps(self.station(key))[:3000]}\n"
                                 f"dashboard log:\n{self.log()[-3000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class AgentProcess:
    """``python -m agent run --config FILE``, the station as it runs in the field."""

    def __init__(self, workdir: Path, bundle: Path, video: Path, mqtt_port: int, *, name: str = "agent",
                 site: str = "test", station: str = "st-01", **sections: Any) -> None:
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        cfg = station_config(folder, bundle, str(video), mqtt_port, **agent_sections(**sections))
        cfg.update(site=site, station=station)
        cfg["cameras"] = [{"id": "dock-a", "uri": str(video), "loop": True, "fps": 6.0, "queue_size": 2}]
        cfg["model"]["download_dir"] = str(folder / "downloads")
        self.folder = folder
        self.config = write_yaml(folder / "station.yaml", cfg)
        self.key = f"{site}/{station}"
        self.cmd_topic = f"inventory/{site}/{station}/cmd"
        self.log_path = folder / "agent.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                                         cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
