"""How many low-confidence frames per second one ingest process stores, against baselines from the same run.

Frames are real Fashion-MNIST test images, scaled to ``--size`` px and JPEG-encoded with the
agent's own encoder (quality 90, as the agent's default), in the agent's own wire format
(``agent.mqtt.encode``: MQTT v5, JPEG payload, metadata in the ``meta`` user property).

1. In process, one thread, no broker: ``FrameStore.add`` (JPEG check, file written, fsynced and
   renamed, SQLite row committed with synchronous=FULL) against the floor of writing each JPEG
   to a file with fsync and nothing else.
2. Over a local mosquitto (max_inflight_messages 64 and max_queued_messages 10000, as the shipped
   central broker): a publisher process sends ``--frames`` frames with QoS 1 as fast as the
   broker takes them, received once by a bare paho subscriber that only counts (the baseline),
   once by ``python -m central ingest`` (its own process, acknowledging each frame only after
   its row committed). Rates are frames over the time from the first publish to the last frame
   counted (subscriber) or committed (ingest, polled in the store's index).

    .venv/bin/python benchmarks/ingest.py --frames 2000 --size 224
    .venv/bin/python benchmarks/ingest.py --frames 2000 --size 224 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.demo import fashion_mnist_test, local_mosquitto  # noqa: E402
from agent.mqtt import encode  # noqa: E402
from agent.outbox import Record  # noqa: E402
from agent.pipeline import encode_jpeg  # noqa: E402

LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
STATIONS = 20


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=2000, help="frames sent over the broker (at most 10000)")
    parser.add_argument("--store-frames", type=int, default=500, help="frames for the in-process measurement")
    parser.add_argument("--size", type=int, default=224, help="frame side in px (the ROI crop the agent sends)")
    parser.add_argument("--skip-broker", action="store_true", help="only the in-process measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


def make_records(n: int, size: int) -> list[Record]:
    """Frame messages as the agent's outbox holds them, spread over STATIONS stations."""
    import cv2
    import numpy as np

    images, labels = fashion_mnist_test(n=min(n, 10000))
    records = []
    for i in range(n):
        gray = cv2.resize(images[i % len(images)], (size, size), interpolation=cv2.INTER_LINEAR)
        rgb = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2)) if gray.ndim == 2 else gray
        jpeg = encode_jpeg(rgb, 90)
        guess = (int(labels[i % len(labels)]) + 1) % len(LABELS)
        frame_id = f"00000000-0000-4000-8000-{i:012d}"
        body = {"schema": "frame.v1", "id": frame_id, "seq": i + 1, "ts": time.time(), "site": "ber1",
                "station": f"receiving-{i % STATIONS:02d}", "camera": "dock-a", "frame_seq": i + 1,
                "captured_at": time.time(),
                "model": {"name": "fashion-mnist", "version": "1", "backend": "onnxruntime", "precision": "int8"},
                "label": LABELS[guess], "confidence": 0.41,
                "top_k": [{"label": LABELS[guess], "p": 0.41}, {"label": LABELS[guess - 1], "p": 0.33}],
                "selected_because": ["confidence 0.410 < 0.6"], "source_ref": None,
                "jpeg": {"width": size, "height": size, "quality": 90, "bytes": len(jpeg), "roi_crop": True}}
        records.append(Record(seq=i + 1, id=frame_id, kind="frame", text=json.dumps(body), blob=jpeg,
                              created=time.time()))
    return records


# ---------------------------------------------------------------- 1. in process

def bench_store(records: list[Record], workdir: Path) -> dict[str, Any]:
    from central.review.store import FrameStore

    floor_dir = workdir / "floor"
    floor_dir.mkdir()
    start = time.perf_counter()
    for r in records:
        with open(floor_dir / f"{r.id}.jpg", "wb") as fh:
            fh.write(r.blob)
            fh.flush()
            os.fsync(fh.fileno())
    floor_s = time.perf_counter() - start

    store = FrameStore(workdir / "store")
    start = time.perf_counter()
    outcomes = [store.add(r.body, r.blob).outcome for r in records]
    store_s = time.perf_counter() - start
    store.close()
    assert outcomes == ["stored"] * len(records), set(outcomes)
    return {"frames": len(records), "fsync_write_per_s": len(records) / floor_s,
            "store_add_per_s": len(records) / store_s, "store_vs_fsync_write": floor_s / store_s}


# ---------------------------------------------------------------- 2. over the broker

def broker(workdir: Path):
    """A local mosquitto with room for the whole burst (the agent's own demo broker, more queue)."""
    return local_mosquitto(workdir, "max_inflight_messages 64\nmax_queued_messages 10000\n")


def publisher(port: int, messages: list[tuple[str, bytes, list[tuple[str, str]]]], ready, go, out) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(64)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    prepared = []
    for topic, payload, user in messages:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = user
        prepared.append((topic, payload, props))
    ready.set()
    go.wait()
    start = time.time()
    infos = [client.publish(topic, payload, qos=1, properties=props) for topic, payload, props in prepared]
    for info in infos:
        info.wait_for_publish(120)
    out.put({"start": start, "published": time.time()})
    client.loop_stop()
    client.disconnect()


def wire(records: list[Record]) -> list[tuple[str, bytes, list[tuple[str, str]]]]:
    out = []
    for r in records:
        payload, props = encode(r, True)
        out.append((f"inventory/{r.body['site']}/{r.body['station']}/frames", bytes(payload),
                    list(props.UserProperty)))
    return out


def run_publisher(port: int, messages) -> tuple[mp.Process, Any, Any, Any]:
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=publisher, args=(port, messages, ready, go, out), daemon=True)
    proc.start()
    if not ready.wait(120):
        raise RuntimeError("publisher did not start")
    return proc, go, out, ready


def bench_bare_subscriber(port: int, messages) -> dict[str, Any]:
    import paho.mqtt.client as paho

    n = len(messages)
    count, done, last = [0], threading.Event(), [0.0]

    def on_message(client, userdata, msg) -> None:
        count[0] += 1
        if count[0] == n:
            last[0] = time.time()
            done.set()

    subscribed = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=paho.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe("inventory/+/+/frames", qos=1)
    subscribed.wait(10)
    proc, go, out, _ = run_publisher(port, messages)
    go.set()
    if not done.wait(600):
        raise RuntimeError(f"bare subscriber got {count[0]} of {n}")
    times = out.get(timeout=60)
    proc.join(30)
    client.loop_stop()
    client.disconnect()
    return {"frames": n, "per_s": n / (last[0] - times["start"])}


def bench_ingest(port: int, messages, workdir: Path) -> dict[str, Any]:
    store = workdir / "ingest-store"
    log = workdir / "ingest.log"
    ingest = subprocess.Popen([sys.executable, "-m", "central", "ingest", "--store", str(store), "--mqtt-host", "127.0.0.1",
                               "--mqtt-port", str(port), "--client-id", "bench-ingest"], cwd=REPO,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "subscribed to" not in log.read_text():
            if time.monotonic() > deadline or ingest.poll() is not None:
                raise RuntimeError(f"ingest did not start:\n{log.read_text()}")
            time.sleep(0.1)
        n = len(messages)
        proc, go, out, _ = run_publisher(port, messages)
        db = sqlite3.connect(store / "frames.sqlite", timeout=30)
        go.set()
        deadline = time.monotonic() + 1200
        while True:
            stored = db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
            if stored >= n:
                last = time.time()
                break
            if time.monotonic() > deadline or ingest.poll() is not None:
                raise RuntimeError(f"ingest stored {stored} of {n}:\n{log.read_text()[-2000:]}")
            time.sleep(0.02)
        times = out.get(timeout=60)
        proc.join(30)
        db.close()
        return {"frames": n, "per_s": n / (last - times["start"])}
    finally:
        ingest.terminate()
        ingest.wait(30)


def main() -> int:
    args = get_args_parser().parse_args()
    if args.frames > 10000:
        raise SystemExit("--frames: at most 10000 (the broker's max_queued_messages, as shipped)")
    workdir = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    figures: dict[str, Any] = {"size_px": args.size, "cpus": os.cpu_count()}
    try:
        records = make_records(max(args.frames, args.store_frames), args.size)
        figures["mean_jpeg_bytes"] = round(sum(len(r.blob) for r in records) / len(records))
        print(f"{len(records)} frames, {args.size}x{args.size} px, mean JPEG {figures['mean_jpeg_bytes']} bytes, "
              f"{STATIONS} stations")
        s = bench_store(records[:args.store_frames], workdir)
        figures["store"] = s
        print(f"in process: fsync'd file write {s['fsync_write_per_s']:.0f} frames/s; FrameStore.add "
              f"{s['store_add_per_s']:.0f} frames/s ({s['store_vs_fsync_write']:.2f}x the bare write)")
        if not args.skip_broker:
            messages = wire(records[:args.frames])
            with broker(workdir) as port:
                bare = bench_bare_subscriber(port, messages)
            with broker(workdir) as port:
                ing = bench_ingest(port, messages, workdir)
            figures["broker"] = {"bare_subscriber_per_s": bare["per_s"], "ingest_per_s": ing["per_s"],
                                 "ingest_vs_bare": ing["per_s"] / bare["per_s"], "frames": args.frames}
            print(f"over mosquitto, {args.frames} frames QoS 1: bare subscriber {bare['per_s']:.0f} frames/s; "
                  f"python -m central ingest {ing['per_s']:.0f} frames/s stored "
                  f"({ing['per_s'] / bare['per_s']:.2f}x the bare subscriber)")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
