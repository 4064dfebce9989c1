"""Fleet-scale MQTT load: N simulated stations publish QoS 1 results; ingest workers count, dedupe, time them.

Each station is its own MQTT v5 client (client id ``agent-<site>-<station>``, topic
``inventory/<site>/<station>/result``, as the agent does) publishing ``--rate``
result-sized JSON messages per second at QoS 1. Stations are spread over
``--publishers`` processes, each multiplexing its clients on one selector (paho's
external-loop API), so a thousand stations fit on two cores. ``--subscribers``
ingest workers share ``$share/ingest/inventory/+/+/result`` (one worker: a plain
subscription). Reported: delivered messages/s, end-to-end latency (publish call ->
subscriber callback, both on this machine's monotonic clock) p50/p99/max, and lost
messages: ids whose PUBACK a station received but no worker ever saw (must be 0).
Duplicates (QoS 1 redeliveries) are counted and dropped by id.

Without ``--host`` a local mosquitto is started on a free port (plain TCP, anonymous:
this measures the broker and the topic design, not TLS). The open-files limit is
raised to the hard limit first: every station is a socket in the broker.

    .venv/bin/python benchmarks/mqtt_load.py --stations 100 --rate 2 --duration 30
    .venv/bin/python benchmarks/mqtt_load.py --stations 1000 --rate 2 --duration 30 --json
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import multiprocessing as mp
import os
import queue
import resource
import selectors
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mqtt_load")


@dataclass(frozen=True)
class LoadConfig:
    host: str
    port: int
    stations: int
    rate: float
    duration: float
    payload_bytes: int
    publishers: int
    subscribers: int
    stations_per_site: int
    drain_s: float


def station_name(index: int, per_site: int) -> tuple[str, str]:
    return f"site-{index // per_site:03d}", f"st-{index % per_site:03d}"


# ---------------------------------------------------------------- stations (publisher processes)

class StationGroup:
    """Many paho clients on one selector: no thread per station."""

    def __init__(self, cfg: LoadConfig, indices: list[int]) -> None:
        import paho.mqtt.client as mqtt

        self.cfg = cfg
        self.sel = selectors.DefaultSelector()
        self.clients: list[Any] = []
        self.topics: list[str] = []
        self.names: list[str] = []
        self.connected = 0
        self.refused = 0
        self.in_flight: dict[tuple[int, int], str] = {}
        self.acked_ids: list[str] = []
        self.publish_errors = 0
        for i in indices:
            site, station = station_name(i, cfg.stations_per_site)
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"agent-{site}-{station}",
                                 protocol=mqtt.MQTTv5)
            client.max_inflight_messages_set(64)
            slot = len(self.clients)
            client.on_connect = self._on_connect
            client.on_publish = lambda c, u, mid, reason, props, slot=slot: self._on_publish(slot, mid, reason)
            self.clients.append(client)
            self.topics.append(f"inventory/{site}/{station}/result")
            self.names.append(f"{site}/{station}")

    def _on_connect(self, client, userdata, flags, reason, props) -> None:
        if reason.is_failure:
            self.refused += 1
        else:
            self.connected += 1

    def _on_publish(self, slot: int, mid: int, reason) -> None:
        msg_id = self.in_flight.pop((slot, mid), None)
        if msg_id is not None and not reason.is_failure:
            self.acked_ids.append(msg_id)

    def connect_all(self, timeout: float) -> float:
        start = time.monotonic()
        for client in self.clients:
            client.connect(self.cfg.host, self.cfg.port, keepalive=60)
            self.sel.register(client.socket(), selectors.EVENT_READ, client)
            self.service(0)
        deadline = start + timeout
        while self.connected + self.refused < len(self.clients) and time.monotonic() < deadline:
            self.service(0.05)
        if self.connected < len(self.clients):
            raise RuntimeError(f"{self.connected}/{len(self.clients)} stations connected ({self.refused} refused)")
        return time.monotonic() - start

    def service(self, timeout: float) -> None:
        """Read what arrived (CONNACK, PUBACK), flush what paho could not write at once."""
        for key, _ in self.sel.select(timeout):
            key.data.loop_read()
        for client in self.clients:
            if client.want_write():
                client.loop_write()

    def keepalive(self) -> None:
        for client in self.clients:
            client.loop_misc()

    def publish(self, slot: int, seq: int, pad: str) -> None:
        msg_id = uuid.uuid4().hex
        body = json.dumps({"id": msg_id, "seq": seq, "station": self.names[slot], "t": time.monotonic(), "pad": pad})
        info = self.clients[slot].publish(self.topics[slot], body, qos=1)
        if info.rc != 0:
            self.publish_errors += 1
            return
        self.in_flight[(slot, info.mid)] = msg_id

    def disconnect_all(self) -> None:
        for client in self.clients:
            client.disconnect()


def run_stations(cfg: LoadConfig, indices: list[int], start_at: Any, go: Any, out: Any) -> None:
    group = StationGroup(cfg, indices)
    connect_s = group.connect_all(timeout=120)
    out.put(("ready", os.getpid(), connect_s))
    while not go.is_set():
        group.service(0.05)
    start = start_at.value
    end = start + cfg.duration
    period = 1.0 / cfg.rate
    pad = "x" * max(0, cfg.payload_bytes - 120)
    schedule = [(start + period * ((i * 0.6180339887) % 1.0), slot, 0) for slot, i in enumerate(indices)]
    heapq.heapify(schedule)
    published, behind_max, last_misc = 0, 0.0, time.monotonic()
    while schedule and schedule[0][0] < end:
        now = time.monotonic()
        while schedule and schedule[0][0] <= now and schedule[0][0] < end:
            due, slot, seq = heapq.heappop(schedule)
            behind_max = max(behind_max, now - due)
            group.publish(slot, seq, pad)
            published += 1
            heapq.heappush(schedule, (due + period, slot, seq + 1))
        group.service(max(0.0, min(schedule[0][0] - time.monotonic(), 0.02)) if schedule else 0)
        if now - last_misc > 5:
            group.keepalive()
            last_misc = now
    drain_end = time.monotonic() + cfg.drain_s
    while group.in_flight and time.monotonic() < drain_end:
        group.service(0.05)
    group.disconnect_all()
    out.put(("done", os.getpid(), {"published": published, "acked_ids": group.acked_ids,
                                   "unacked": len(group.in_flight), "errors": group.publish_errors,
                                   "behind_max_s": behind_max}))


# ---------------------------------------------------------------- ingest workers (subscriber processes)

def run_ingest(cfg: LoadConfig, index: int, ready: Any, stop: Any, counter: Any, out: Any) -> None:
    import paho.mqtt.client as mqtt

    topic = "inventory/+/+/result"
    if cfg.subscribers > 1:
        topic = f"$share/ingest/{topic}"
    ids: list[str] = []
    latencies: list[float] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ingest-{index}", protocol=mqtt.MQTTv5)

    def on_connect(c, userdata, flags, reason, props):
        c.subscribe(topic, options=mqtt.SubscribeOptions(qos=1))

    def on_message(c, userdata, msg):
        body = json.loads(msg.payload)
        latencies.append(msg.timestamp - body["t"])   # paho stamps msg.timestamp with time.monotonic()
        ids.append(body["id"])
        with counter.get_lock():
            counter.value += 1

    client.on_connect = on_connect
    client.on_subscribe = lambda c, u, mid, codes, props: ready.set()
    client.on_message = on_message
    client.connect(cfg.host, cfg.port, keepalive=60)
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()
    out.put(("ingest", index, {"ids": ids, "latencies": latencies}))


# ---------------------------------------------------------------- the broker

def raise_open_files_limit() -> int:
    """Every station is a socket in the broker and in this benchmark: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "max_connections -1",
             "max_queued_messages 0",      # 0 = unlimited: a lagging ingest worker queues, it is not dropped
             "max_inflight_messages 64", "persistence false", f"log_dest file {workdir / 'mosquitto.log'}"]
    if os.geteuid() == 0:
        lines.insert(0, "user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {proc.stderr.read().decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- orchestration

def wait_for(q: Any, kind: str, n: int, timeout: float) -> list[tuple]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n:
        try:
            item = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty as exc:
            raise RuntimeError(f"waited {timeout:.0f} s for {n} '{kind}' reports, got {len(got)}") from exc
        if item[0] != kind:
            raise RuntimeError(f"expected '{kind}', got {item[0]!r}")
        got.append(item)
    return got


def run_load(cfg: LoadConfig, broker_pid: int | None = None) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    out, stop, go = ctx.Queue(), ctx.Event(), ctx.Event()
    counter, start_at = ctx.Value("q", 0), ctx.Value("d", 0.0)
    ready = [ctx.Event() for _ in range(cfg.subscribers)]
    ingest = [ctx.Process(target=run_ingest, args=(cfg, i, ready[i], stop, counter, out), daemon=True)
              for i in range(cfg.subscribers)]
    for p in ingest:
        p.start()
    for event in ready:
        if not event.wait(30):
            raise RuntimeError("an ingest worker did not subscribe within 30 s")
    slices = [list(range(cfg.stations))[k::cfg.publishers] for k in range(cfg.publishers)]
    stations = [ctx.Process(target=run_stations, args=(cfg, s, start_at, go, out), daemon=True) for s in slices if s]
    for p in stations:
        p.start()
    connects = wait_for(out, "ready", len(stations), 180)
    cpu0 = cpu_seconds(broker_pid) if broker_pid else None
    start_at.value = time.monotonic() + 0.5
    go.set()
    done = wait_for(out, "done", len(stations), cfg.duration + cfg.drain_s + 120)
    acked = {i for _, _, report in done for i in report["acked_ids"]}
    deadline = time.monotonic() + cfg.drain_s
    while counter.value < len(acked) and time.monotonic() < deadline:
        time.sleep(0.05)
    window = time.monotonic() - start_at.value
    cpu1 = cpu_seconds(broker_pid) if broker_pid else None
    stop.set()
    reports = wait_for(out, "ingest", cfg.subscribers, 60)
    for p in ingest + stations:
        p.join(10)
    return summarize(cfg, connects, done, reports, acked, window, (cpu1 - cpu0) if cpu0 is not None else None)


def summarize(cfg: LoadConfig, connects: list, done: list, reports: list, acked: set[str], window: float,
              broker_cpu_s: float | None) -> dict[str, Any]:
    import numpy as np

    received = [i for _, _, r in reports for i in r["ids"]]
    unique = set(received)
    lat_ms = np.asarray([x for _, _, r in reports for x in r["latencies"]]) * 1000.0
    published = sum(r["published"] for _, _, r in done)
    p50, p99 = (np.percentile(lat_ms, [50, 99]) if len(lat_ms) else (float("nan"),) * 2)
    return {
        "config": asdict(cfg),
        "published": published,
        "acked": len(acked),
        "unacked": sum(r["unacked"] for _, _, r in done),
        "publish_errors": sum(r["errors"] for _, _, r in done),
        "received_unique": len(unique),
        "duplicates": len(received) - len(unique),
        "lost": len(acked - unique),
        "target_msgs_per_s": cfg.stations * cfg.rate,
        "delivered_msgs_per_s": round(len(unique) / cfg.duration, 1),
        "latency_ms": {"p50": round(float(p50), 2), "p99": round(float(p99), 2),
                       "max": round(float(lat_ms.max()), 2) if len(lat_ms) else None},
        "publisher_behind_max_s": round(max(r["behind_max_s"] for _, _, r in done), 3),
        "connect_all_s": round(max(c[2] for c in connects), 2),
        "window_s": round(window, 1),
        "broker_cpu_percent": round(100 * broker_cpu_s / window, 1) if broker_cpu_s is not None else None,
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default=None, help="broker host; default: start a local mosquitto")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--stations", type=int, default=100)
    p.add_argument("--rate", type=float, default=2.0, help="results per second per station")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of publishing")
    p.add_argument("--payload-bytes", type=int, default=600, help="size of one result message (the agent's are ~0.5-1 KB)")
    p.add_argument("--publishers", type=int, default=2, help="station processes (one selector loop each)")
    p.add_argument("--subscribers", type=int, default=1, help="ingest workers; >1 uses $share/ingest/...")
    p.add_argument("--stations-per-site", type=int, default=50)
    p.add_argument("--drain", type=float, default=30.0, help="seconds to wait for PUBACKs and deliveries at the end")
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the summary, with this command, as JSON (e.g. benchmarks/results/mqtt_load_1000x2.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    nofile = raise_open_files_limit()
    if args.stations + 100 > nofile:
        log.error("open-files limit %d is below %d stations; raise the hard limit (ulimit -Hn)", nofile, args.stations)
        return 2
    broker, workdir = None, None
    host, port = args.host, args.port
    if host is None:
        workdir = Path(tempfile.mkdtemp(prefix="mqtt-load-"))
        broker, port = start_mosquitto(workdir)
        host = "127.0.0.1"
    cfg = LoadConfig(host, port, args.stations, args.rate, args.duration, args.payload_bytes,
                     min(args.publishers, args.stations), args.subscribers, args.stations_per_site, args.drain)
    log.info("%d stations x %.1f msg/s for %.0f s -> %s:%d (open files %d)", cfg.stations, cfg.rate, cfg.duration,
             host, port, nofile)
    try:
        result = run_load(cfg, broker.pid if broker else None)
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(10)
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "mqtt_load", "command": "python benchmarks/mqtt_load.py "
                                        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
                                        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        **result}, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        lat = result["latency_ms"]
        print(f"stations={cfg.stations} rate={cfg.rate}/s/station duration={cfg.duration:.0f}s "
              f"published={result['published']} acked={result['acked']} received={result['received_unique']} "
              f"duplicates={result['duplicates']} lost={result['lost']} "
              f"msgs/s={result['delivered_msgs_per_s']} (target {result['target_msgs_per_s']:.0f}) "
              f"latency p50={lat['p50']}ms p99={lat['p99']}ms max={lat['max']}ms "
              f"broker_cpu={result['broker_cpu_percent']}% connect_all={result['connect_all_s']}s")
    return 0 if result["lost"] == 0 and result["unacked"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
