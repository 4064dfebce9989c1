"""How many station messages per second the central dashboard takes in, against baselines from the same run.

Messages are the real agent's: the agent runs over a short Fashion-MNIST video against a
local mosquitto and everything a dashboard subscription receives is recorded (status,
result, decision, alert, stats). They are then spread over ``--stations`` stations (same
bodies, new ids), in the recorded mix, ``--messages`` in all.

1. In process, one thread, nothing else running:
   - ``json.loads`` of every payload (the floor: nothing can be cheaper than parsing),
   - ``WarehouseState.ingest`` with the jsonschema engine (the reference implementation),
   - ``WarehouseState.ingest`` with the fastjsonschema engine (the dashboard's default).
2. Over the broker: ``python -m central dashboard`` (its own process) and a bare paho subscriber
   that only counts (the baseline) both subscribe; a publisher process sends every message
   with QoS 1 as fast as the broker takes them. Rates are messages over the time from the
   first publish to the last message counted by each.

    .venv/bin/python benchmarks/dashboard_ingest.py --stations 50 --messages 20000
    .venv/bin/python benchmarks/dashboard_ingest.py --bundle models/fashion-mnist/<version> --json out.json

Without ``--bundle`` a small random-weight bundle is exported with torch (trainer extra): the
messages do not depend on what the model has learnt.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.demo import (  # noqa: E402
    Subscriber,
    fashion_mnist_test,
    free_port,
    local_mosquitto,
    write_video,
)
from central.dashboard.state import WarehouseState  # noqa: E402

KINDS = ("status", "result", "decision", "alert", "stats")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: a random-weight one)")
    parser.add_argument("--stations", type=int, default=50, help="stations the recorded messages are spread over")
    parser.add_argument("--messages", type=int, default=20000, help="messages in all")
    parser.add_argument("--images", type=int, default=20, help="Fashion-MNIST test images in the recorded video")
    parser.add_argument("--skip-broker", action="store_true", help="only the in-process measurements")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


# ---------------------------------------------------------------- real messages

def tiny_bundle(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests" / "agent"))
    from agent_support import make_tiny_bundle

    return make_tiny_bundle(root, "bench-1")


def record(bundle: Path, workdir: Path, images: int) -> list[tuple[str, bytes]]:
    """What a dashboard subscription receives while the real agent processes a short video."""
    from agent.app import Agent
    from agent.config import AgentConfig

    pics, _ = fashion_mnist_test(n=images)
    video = workdir / "sample.avi"
    write_video(pics, video, size=64, repeat=3, blank_between=2, lead_blank=2)
    labels = json.loads((bundle / "manifest.json").read_text())["labels"]
    with local_mosquitto(workdir) as port:
        cfg = AgentConfig.model_validate({
            "site": "bench", "station": "st-0",
            "model": {"bundle": str(bundle), "batch_size": 4, "warmup_runs": 1, "backend": "onnxruntime"},
            "cameras": [{"id": "cam-a", "uri": str(video), "backpressure": "block", "queue_size": 8, "fps": 30.0}],
            "mqtt": {"host": "127.0.0.1", "port": port},
            "outbox": {"path": str(workdir / "outbox.sqlite")},
            "decisions": {"presence": {"mode": "background", "min_frames": 2, "gap_frames": 1},
                          "qc": {"defect_classes": labels, "min_confidence": 0.0, "cooldown_s": 0.5}},
            "health": {"stats_interval_s": 0.5}, "shutdown_flush_s": 20})
        subscriber = Subscriber("127.0.0.1", port, cfg.topic_root)
        agent = Agent(cfg)
        agent.start()
        agent.wait(exit_at_end=True)
        agent.shutdown(cfg.shutdown_flush_s)
        time.sleep(0.5)
        subscriber.close()
    return [(m.topic, m.payload) for m in subscriber.messages if m.topic.rsplit("/", 1)[-1] in KINDS]


def fleet(recorded: list[tuple[str, bytes]], stations: int, total: int) -> list[tuple[str, bytes]]:
    """``total`` messages: the recording replayed round-robin by ``stations`` stations, each with a new id."""
    bodies = [(topic.rsplit("/", 1)[-1], json.loads(payload)) for topic, payload in recorded]
    out = []
    i = 0
    while len(out) < total:
        kind, body = bodies[i % len(bodies)]
        station = f"st-{(i // len(bodies)) % stations}"
        body = dict(body, station=station, id=str(uuid.uuid4()))
        out.append((f"inventory/bench/{station}/{kind}", json.dumps(body).encode()))
        i += 1
    return out


# ---------------------------------------------------------------- in process

def in_process(messages: list[tuple[str, bytes]]) -> dict[str, Any]:
    t = time.perf_counter()
    for _, payload in messages:
        json.loads(payload)
    rates = {"json.loads": len(messages) / (time.perf_counter() - t)}
    for engine in ("jsonschema", "fastjsonschema"):
        state = WarehouseState(engine=engine)
        state.ingest(*messages[0])           # compile the schemas outside the timing
        t = time.perf_counter()
        for topic, payload in messages[1:]:
            state.ingest(topic, payload)
        rates[f"ingest ({engine})"] = (len(messages) - 1) / (time.perf_counter() - t)
        counters = state.counters.as_dict()
        assert counters["malformed"] == 0 and counters["applied"] == len(messages), counters
    return rates


# ---------------------------------------------------------------- over the broker

def _publish(port: int, messages: list[tuple[str, bytes]], started: Any) -> None:
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-publisher", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(256)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started.value = time.time()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def unbounded_mosquitto(workdir: Path):
    """A local mosquitto that queues without limit for a slow subscriber, so the slower side is measured,
    not the broker's drop policy (mosquitto's default drops beyond 1000 queued messages per client)."""
    return local_mosquitto(workdir, "max_queued_messages 0\nmax_queued_bytes 0\n")


def over_broker(messages: list[tuple[str, bytes]], workdir: Path) -> dict[str, Any]:
    with unbounded_mosquitto(workdir) as port:
        http_port = free_port()
        log = open(workdir / "dashboard.log", "w")
        dash = subprocess.Popen([sys.executable, "-m", "central", "dashboard", "--mqtt-port", str(port), "--port", str(http_port),
                                 "--log-level", "WARNING"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{http_port}/healthz"       # the counters, without the whole state
            counters = lambda: json.load(urllib.request.urlopen(url, timeout=30))["counters"]  # noqa: E731
            deadline = time.monotonic() + 60
            while True:
                try:
                    counters()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            bare = Subscriber("127.0.0.1", port, "inventory/+/+")
            time.sleep(1.0)                   # both subscriptions in place
            started = mp.Value("d", 0.0)
            publisher = mp.Process(target=_publish, args=(port, messages, started))
            publisher.start()
            n = len(messages)
            bare_done = dash_done = None
            progress, last_change = (0, 0), time.monotonic()
            while (bare_done is None or dash_done is None) and time.monotonic() - last_change < 30:
                now = (len(bare.messages), counters()["received"])
                if bare_done is None and now[0] >= n:
                    bare_done = time.time()
                if dash_done is None and now[1] >= n:
                    dash_done = time.time()
                if now != progress:
                    progress, last_change = now, time.monotonic()
                time.sleep(0.05)
            publisher.join(120)
            bare.close()
            final = counters()
        finally:
            dash.terminate()
            dash.wait(30)
            log.close()
    if bare_done is None or dash_done is None:
        raise RuntimeError(f"not everything arrived in time: bare {len(bare.messages)}, dashboard {final}")
    return {"bare paho subscriber": n / (bare_done - started.value), "python -m central dashboard": n / (dash_done - started.value),
            "dashboard counters": final}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("agent").setLevel(logging.ERROR)     # the recording run logs every QC alert
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        workdir = Path(tmp)
        bundle = args.bundle or tiny_bundle(workdir / "models")
        recorded = record(bundle, workdir, args.images)
        mix = {k: sum(t.endswith(f"/{k}") for t, _ in recorded) for k in KINDS}
        messages = fleet(recorded, args.stations, args.messages)
        print(f"recorded {len(recorded)} real agent messages {mix}; replayed as {len(messages)} messages "
              f"from {args.stations} stations", flush=True)
        figures: dict[str, Any] = {"messages": len(messages), "stations": args.stations, "recorded_mix": mix,
                                   "in_process_msgs_per_s": in_process(messages)}
        if not args.skip_broker:
            figures["over_broker_msgs_per_s"] = over_broker(messages, workdir)
    rates = figures["in_process_msgs_per_s"]
    floor = rates["json.loads"]
    print("\nin process (one thread):")
    for name, rate in rates.items():
        print(f"  {name:28s} {rate:10.0f} msg/s   {rate / floor:6.3f} x json.loads")
    print(f"  fastjsonschema / jsonschema: {rates['ingest (fastjsonschema)'] / rates['ingest (jsonschema)']:.1f}x")
    if "over_broker_msgs_per_s" in figures:
        b = figures["over_broker_msgs_per_s"]
        print("\nover the broker (QoS 1, one publisher):")
        print(f"  bare paho subscriber         {b['bare paho subscriber']:10.0f} msg/s")
        print(f"  python -m central dashboard          {b['python -m central dashboard']:10.0f} msg/s   "
              f"{b['python -m central dashboard'] / b['bare paho subscriber']:6.3f} x bare")
        print(f"  dashboard counters: {b['dashboard counters']}")
    if args.json:
        command = "python benchmarks/dashboard_ingest.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        args.json.write_text(json.dumps({"benchmark": "dashboard_ingest", "command": command,
                                         "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                         **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
