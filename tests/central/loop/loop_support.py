"""Helpers for the store/ingest/review tests: real agent frame messages and an ingest process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

TESTS = Path(__file__).resolve().parents[2]
REPO = TESTS.parent
if str(TESTS / "agent") not in sys.path:
    sys.path.append(str(TESTS / "agent"))

from agent.demo import fashion_mnist_test  # noqa: E402
from agent.outbox import Record  # noqa: E402

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def real_frames(n: int, *, site: str = "ber1", station: str = "receiving-01", camera: str = "dock-a",
                version: str = "1", start: int = 0) -> list[Record]:
    """``frames`` outbox records as the agent stores them: real Fashion-MNIST images as JPEG, frame.v1 metadata."""
    images, labels = fashion_mnist_test(n=start + n)
    records = []
    for i in range(start, start + n):
        bgr = cv2.cvtColor(cv2.resize(images[i], (64, 64)), cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        jpeg = buf.tobytes()
        probs = np.full(len(LABELS), 0.3 / (len(LABELS) - 1))
        guess = (int(labels[i]) + 1) % len(LABELS)          # a wrong, unsure guess: why it was sent back
        probs[guess] = 0.45
        probs[int(labels[i])] = 0.25
        probs /= probs.sum()
        top = np.argsort(-probs)[:3]
        frame_id = f"00000000-0000-4000-8000-{i:012d}"
        body = {"schema": "frame.v1", "id": frame_id, "seq": i + 1, "ts": 1_795_000_000.0 + i,
                "site": site, "station": station, "camera": camera, "frame_seq": i + 1,
                "captured_at": 1_795_000_000.0 + i,
                "model": {"name": "fashion-mnist", "version": version, "backend": "onnxruntime", "precision": "fp32"},
                "label": LABELS[guess], "confidence": float(probs[guess]),
                "top_k": [{"label": LABELS[int(k)], "p": float(probs[k])} for k in top],
                "selected_because": [f"confidence {probs[guess]:.3f} < 0.6"], "source_ref": f"item_{i:04d}.png",
                "jpeg": {"width": 64, "height": 64, "quality": 90, "bytes": len(jpeg), "roi_crop": False}}
        records.append(Record(seq=i + 1, id=frame_id, kind="frame", text=json.dumps(body), blob=jpeg,
                              created=time.time()))
    return records


def truth_of(record: Record) -> str:
    """The ground-truth class of a record made by ``real_frames``."""
    return LABELS[(LABELS.index(record.body["label"]) - 1) % len(LABELS)]


def ingest_process(store: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "central", "ingest", "--store", str(store), "--mqtt-host", "127.0.0.1",
                             "--mqtt-port", str(port), *extra], cwd=REPO, stdout=open(log, "a"), stderr=subprocess.STDOUT)


def belt_view(seed: int = 0) -> np.ndarray:
    """An empty station scene as a camera's ROI sees it (a moving ribbed belt, uneven light, noise)."""
    from scenes import Scene

    return Scene(size=160, seed=seed).render(seed)[0]


def empty_scene_records(n: int, *, site: str = "ber1", station: str = "receiving-01", camera: str = "dock-a",
                        start: int = 0) -> list[Record]:
    """``frames`` outbox records of kind empty-scene, as the agent's inference stage writes them."""
    from agent.pipeline import encode_jpeg

    records = []
    for i in range(start, start + n):
        jpeg = encode_jpeg(belt_view(i), 90)
        frame_id = f"00000000-0000-4000-9000-{i:012d}"
        body = {"schema": "frame.v1", "kind": "empty-scene", "trigger": "command" if i % 2 else "schedule",
                "id": frame_id, "seq": 1000 + i, "ts": 1_795_000_000.0 + i, "site": site, "station": station,
                "camera": camera, "frame_seq": 500 + i, "captured_at": 1_795_000_000.0 + i,
                "model": {"name": "fashion-mnist", "version": "1", "backend": "onnxruntime", "precision": "fp32"},
                "source_ref": None,
                "jpeg": {"width": 160, "height": 160, "quality": 90, "bytes": len(jpeg), "roi_crop": True,
                         "item_crop": False}}
        records.append(Record(seq=1000 + i, id=frame_id, kind="frame", text=json.dumps(body), blob=jpeg,
                              created=time.time()))
    return records


def with_context(record: Record, roi_jpeg_b64: str | None = None) -> Record:
    """The record as an item crop with its ROI context (the agent's thumbnail of a belt view unless given)."""
    from agent.pipeline import thumbnail_b64

    body = json.loads(record.text)
    body["jpeg"]["item_crop"] = True
    body["context"] = {"crop_box": [40, 30, 104, 94], "roi_width": 160, "roi_height": 160,
                       "roi_jpeg_b64": roi_jpeg_b64 if roi_jpeg_b64 is not None else thumbnail_b64(belt_view(), 160, 70)}
    return Record(seq=record.seq, id=record.id, kind="frame", text=json.dumps(body), blob=record.blob,
                  created=record.created)
