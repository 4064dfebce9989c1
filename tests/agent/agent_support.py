"""Helpers for the agent tests (imported by name: a module called conftest would clash with other test folders)."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import pytest

from agent.config import AgentConfig
from agent.demo import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

def broker_port() -> int:
    """A free 127.0.0.1 port for a test broker. Under pytest-xdist (bin/test runs two workers) each worker draws
    from its own 2,000 ports below the kernel's ephemeral range (32768 and up), so a broker a test stops and starts
    again on its port never finds it taken by another worker's bind(0) or an outgoing connection meanwhile."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return free_port()
    base = 12000 + 2000 * (int(worker[2:]) % 10)
    rng = random.Random(f"{worker}-{os.getpid()}-{time.monotonic_ns()}")
    for _ in range(200):
        port = rng.randrange(base, base + 2000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return free_port()


class Broker:
    """A mosquitto process on a fixed 127.0.0.1 port that tests can stop and start again."""

    def __init__(self, workdir: Path, extra_conf: str = "", persistence: bool = True) -> None:
        self.workdir = workdir
        self.port = broker_port()
        self.host = "127.0.0.1"
        self.conf = workdir / "mosquitto.conf"
        (workdir / "mosq-data").mkdir(exist_ok=True)
        lines = [f"listener {self.port} 127.0.0.1"]
        if os.geteuid() == 0:
            lines.append("user root")     # else mosquitto drops to 'mosquitto' and cannot read the test's files
        lines += [extra_conf] if extra_conf else ["allow_anonymous true"]
        if persistence:
            lines += ["persistence true", f"persistence_location {workdir / 'mosq-data'}/", "autosave_interval 1"]
        lines += [f"log_dest file {workdir / 'mosquitto.log'}", "log_type all"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    """The real broker's program; the test is skipped where it is not installed."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); these tests need a real broker")
    return MOSQUITTO


@pytest.fixture
def broker(mosquitto_bin, tmp_path) -> Iterator[Broker]:
    """A real mosquitto per test (every test folder's conftest imports this one fixture by name)."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    b = Broker(workdir).start()
    yield b
    b.stop()


def video_frames(path: Path) -> list[np.ndarray]:
    """The RGB frames OpenCV decodes from a video: exactly what a file camera hands the agent."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def bundle_logits(bundle_dir: Path, frames: list[np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Labels and logits of the bundle's deployable ONNX model on these frames, one at a time with plain ORT."""
    import onnxruntime as ort

    from contract.bundle import load_bundle
    from contract.preprocess import Preprocessor

    bundle = load_bundle(bundle_dir)
    session = ort.InferenceSession(str(bundle.pick_onnx().path), providers=["CPUExecutionProvider"])
    x = Preprocessor(bundle.input_spec).batch(frames)
    logits = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i:i + 1]})[0]
                             for i in range(len(x))])
    return bundle.labels, logits


def bundle_predictions(bundle_dir: Path, frames: list[np.ndarray]) -> list[str]:
    """Labels the bundle's deployable ONNX model gives these frames, with plain ORT (no agent code path)."""
    labels, logits = bundle_logits(bundle_dir, frames)
    return [labels[i] for i in logits.argmax(axis=1)]


def same_predictions(got: list[str], bundle_dir: Path, frames: list[np.ndarray], tie: float = 1e-3) -> list[int]:
    """Frames whose label differs from the bundle's, ignoring exact near-ties (top-2 logits within ``tie``),
    where batch size may legitimately flip the argmax of an INT8 model."""
    labels, logits = bundle_logits(bundle_dir, frames)
    bad = []
    for i, (label, row) in enumerate(zip(got, logits)):
        top2 = np.argsort(-row)[:2]
        if label != labels[top2[0]] and not (label == labels[top2[1]] and row[top2[0]] - row[top2[1]] < tie):
            bad.append(i)
    return bad


def station_config(tmp_path: Path, bundle: Path, uri: str, port: int, **sections: Any) -> dict[str, Any]:
    """A device config as a station would have it, for the real AgentConfig schema."""
    cfg: dict[str, Any] = {
        "site": "test", "station": "st-01",
        "model": {"bundle": str(bundle), "batch_size": 4, "warmup_runs": 1, "backend": "onnxruntime"},
        "cameras": [{"id": "cam-a", "uri": uri, "backpressure": "block", "queue_size": 8}],
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect": {"initial_s": 0.2, "max_s": 1.0}},
        "outbox": {"path": str(tmp_path / "outbox.sqlite")},
        "frames": {"min_interval_s": 0.0, "dedupe_bits": 0},
        "health": {"stats_interval_s": 0.5},
        "shutdown_flush_s": 15,
    }
    from agent.config import deep_merge

    return deep_merge(cfg, sections)


def inference_stage(cfg: AgentConfig, bundle_dir: Path) -> tuple[Any, Any, Any, Any]:
    """The station's inference stage alone, on a real runtime of the bundle (its warm-up run), with no camera:
    (stage, outbox, metrics, runtime). A test hands ``stage.process`` its frames and reads ``outbox.pending``."""
    from agent.app import build_runtime
    from agent.health import Metrics
    from agent.outbox import Outbox
    from agent.pipeline import InferenceStage, ModelHolder
    from agent.sources.camera import FrameHub
    from contract.bundle import load_bundle

    runtime = build_runtime(cfg, load_bundle(bundle_dir))
    outbox = Outbox(cfg.outbox.path, max_bytes=cfg.outbox.max_bytes, max_age_s=cfg.outbox.max_age_s)
    metrics = Metrics()
    stage = InferenceStage(cfg, FrameHub(metrics), ModelHolder(runtime), outbox, metrics, cameras_done=lambda: True)
    return stage, outbox, metrics, runtime


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(json.loads(json.dumps(data))))
    return path


def validate_message(schema_name: str, body: dict[str, Any]) -> None:
    import jsonschema

    from contract.messages import mqtt_schema

    jsonschema.Draft202012Validator(mqtt_schema(schema_name)).validate(body)


def as_config(data: dict[str, Any]) -> AgentConfig:
    return AgentConfig.model_validate(data)


def make_tiny_bundle(root: Path, version: str = "tiny-1") -> Path:
    """A small random-weight CNN bundle per docs/bundle.md, for tests that need a bundle but not a trained one."""
    import datetime

    import torch

    from contract.bundle import artifact_entry

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    folder = root / "tiny" / version
    folder.mkdir(parents=True)
    onnx_path = folder / "model.fp32.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 28, 28), str(onnx_path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    labels = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    manifest = {
        "schema_version": 1, "name": "tiny", "version": version,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(), "architecture": "tiny-cnn",
        "frameworks": {"torch": torch.__version__}, "labels": labels,
        "input": {"height": 28, "width": 28, "resize_shorter": 28, "interpolation": "bilinear",
                  "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channel_order": "RGB", "layout": "NCHW",
                  "dtype": "float32", "input_name": "input", "output_name": "logits"},
        "artifacts": [artifact_entry(onnx_path, folder, role="onnx-fp32", precision="fp32", deployable=True)],
        "quality": {"thresholds": {"min_confidence": 0.5, "min_margin": 0.1, "max_entropy": 1.5}},
        "provenance": {"code_version": "test"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def _nan_when_bright(source: str, out: str, inits: list, nodes: list) -> None:
    """Nodes for ``out = source + 0 * log(1 - mean(flat))``: ``source`` for frames whose mean normalized pixel is
    below 1, NaN above (a white frame); finite for warm-up and sample batches."""
    from onnx import helper, numpy_helper

    inits += [numpy_helper.from_array(np.array([1.0], np.float32), "one"),
              numpy_helper.from_array(np.array([0.0], np.float32), "zero")]
    nodes += [helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
              helper.make_node("Sub", ["one", "mean"], ["room"]),
              helper.make_node("Log", ["room"], ["log"]),
              helper.make_node("Mul", ["log", "zero"], ["poison"]),
              helper.make_node("Add", [source, "poison"], [out])]


def make_onnx_bundle(root: Path, *, classes: int = 4, labels: int | None = None, size: int = 16,
                     model_size: int | None = None, nan: str | None = None, version: str = "1") -> Path:
    """A bundle around a tiny real ONNX model built with onnx.helper: global average pool, then a linear head.

    ``labels``: how many labels the manifest lists (default: ``classes``, the model's outputs);
    ``model_size``: the model's fixed input height and width (default: the manifest's ``size``);
    ``nan``: ``"always"`` adds NaN to every logit; ``"bright"`` gives NaN only for frames whose mean
    normalized pixel is above 1 (a white frame), finite for the warm-up and sample batches."""
    import datetime

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from contract.bundle import artifact_entry

    side = model_size or size
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(3, classes)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(classes, np.float32), "b")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["head" if nan else "logits"])]
    inits = [weights, bias]
    if nan == "always":
        inits.append(numpy_helper.from_array(np.array([np.nan], np.float32), "nan"))
        nodes.append(helper.make_node("Add", ["head", "nan"], ["logits"]))
    elif nan == "bright":
        _nan_when_bright("head", "logits", inits, nodes)
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["batch", 3, side, side])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder = root / "onnx-tiny" / version
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.fp32.onnx"))
    manifest = {
        "schema_version": 1, "name": "onnx-tiny", "version": version,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(), "architecture": "gap-linear",
        "labels": [f"class-{i}" for i in range(classes if labels is None else labels)],
        "input": {"height": size, "width": size, "resize_shorter": size, "interpolation": "bilinear",
                  "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channel_order": "RGB", "layout": "NCHW",
                  "dtype": "float32", "input_name": "input", "output_name": "logits"},
        "artifacts": [artifact_entry(folder / "model.fp32.onnx", folder, role="onnx-fp32", precision="fp32",
                                     deployable=True)],
        "quality": {"thresholds": {"min_confidence": 0.5}},
        "provenance": {"code_version": "test"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


OPEN_SET_COLOURS = {"belt": (30, 30, 30), "red": (220, 40, 40), "green": (40, 200, 60),   # the known classes
                    "blue": (40, 60, 220)}
ENROLLED_COLOUR = ("yellow", (230, 220, 40))          # a class added after training (an EnrolledHead row)


def colour_embeddings(rgb: tuple[int, int, int], n: int, rng: np.random.Generator, jitter: float = 10.0) -> np.ndarray:
    """Embeddings of ``n`` frames of one colour (pixel noise ``jitter``) as the open-set bundle's model gives them:
    the channel means normalized with mean 0.5 and std 0.25."""
    pixels = np.clip(np.asarray(rgb, np.float64) + rng.normal(0, jitter, (n, 3)), 0, 255) / 255.0
    return (pixels - 0.5) / 0.25


def make_open_set_bundle(root: Path, *, score: str = "mahalanobis", keep: float = 0.95, enrolled: bool = False,
                         size: int = 16, version: str = "1", nan_embedding_when_bright: bool = False) -> Path:
    """A bundle around a real two-output ONNX model (onnx.helper): global average pool -> ``embedding`` (N x 3,
    the normalized colour) -> linear head -> ``logits`` (nearest class mean over OPEN_SET_COLOURS), with an
    ``open_set`` block: class statistics fitted with contract.openset.fit_embedding_stats on synthetic colour
    embeddings of the known classes, the threshold from threshold_for_keep on other ones and, as the exporter
    writes them, the thresholds at the other shares of ``keep_curve``.

    ``enrolled``: ENROLLED_COLOUR is added as an enrolled class (its label appended to the bundle's labels, an
    EnrolledHead row and its class mean), as ``trainer enroll`` would. ``nan_embedding_when_bright``: the
    embedding (not the logits) is NaN for frames whose mean normalized pixel is above 1 (a white frame), finite
    for the warm-up and sample batches."""
    import datetime

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from contract import openset
    from contract.bundle import ROLE_OPEN_SET, artifact_entry

    labels = list(OPEN_SET_COLOURS)
    means = np.stack([colour_embeddings(OPEN_SET_COLOURS[c], 1, np.random.default_rng(0), 0)[0] for c in labels])
    weights, bias = means.T.astype(np.float32), (-0.5 * (means ** 2).sum(1)).astype(np.float32)
    inits = [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])]
    if nan_embedding_when_bright:
        _nan_when_bright("flat", "embedding", inits, nodes)
    else:
        nodes.append(helper.make_node("Identity", ["flat"], ["embedding"]))
    graph = helper.make_graph(
        nodes, "colour", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(labels)]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)

    rng = np.random.default_rng(1)
    fit = np.concatenate([colour_embeddings(OPEN_SET_COLOURS[c], 300, rng) for c in labels])
    stats = openset.fit_embedding_stats(fit, np.repeat(np.arange(len(labels)), 300), len(labels))
    head = openset.EnrolledHead()
    if enrolled:
        name, rgb = ENROLLED_COLOUR
        examples = colour_embeddings(rgb, 10, rng)
        mean = examples.mean(0)
        stats = stats.with_class(mean, examples)
        head = head.with_class(name, mean, -0.5 * float(mean @ mean))
        labels.append(name)
    held_out = np.concatenate([colour_embeddings(OPEN_SET_COLOURS[c], 200, rng) for c in OPEN_SET_COLOURS])
    trained = held_out @ weights + bias
    known = openset.OpenSet(score, 0.0, keep, stats, head)
    known_scores = known.scores(known.full_logits(trained, held_out), held_out)
    threshold = openset.threshold_for_keep(known_scores, keep)

    folder = root / "colours" / version
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.fp32.onnx"))
    openset.save_npz(folder / "open_set.npz", openset.OpenSet(score, threshold, keep, stats, head))
    manifest = {
        "schema_version": 1, "name": "colours", "version": version,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(), "architecture": "gap-linear",
        "labels": labels,
        "input": {"height": size, "width": size, "resize_shorter": size, "interpolation": "bilinear",
                  "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channel_order": "RGB", "layout": "NCHW",
                  "dtype": "float32", "input_name": "input", "output_name": "logits"},
        "artifacts": [artifact_entry(folder / "model.fp32.onnx", folder, role="onnx-fp32", precision="fp32",
                                     deployable=True),
                      artifact_entry(folder / "open_set.npz", folder, role=ROLE_OPEN_SET, precision="fp32",
                                     deployable=True)],
        "open_set": {"score": score, "threshold": threshold, "keep": keep, "embedding_name": "embedding",
                     "embedding_dim": 3, "enrolled": list(head.labels),
                     "keep_thresholds": {"fp32": [list(point) for point in openset.keep_curve(known_scores)]}},
        "quality": {"thresholds": {"min_confidence": 0.3}},
        "provenance": {"code_version": "test"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


class EndedCamera:
    """A source that ends at once: the station runs, and only the frames or items a test hands it directly
    reach the model and the decisions."""

    name, finite = "ended", True

    def open(self) -> None: ...

    def read(self):
        from agent.sources.base import EndOfStream

        raise EndOfStream("no frames in this test")

    def close(self) -> None: ...


class Operator:
    """Sends commands to a station over a real broker: ``send("expect", body)`` publishes ``<root>/cmd/expect``."""

    def __init__(self, broker, root: str) -> None:
        import paho.mqtt.client as paho

        self.root = root
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="operator")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, verb: str, body: dict | bytes) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.client.publish(f"{self.root}/cmd/{verb}", payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
