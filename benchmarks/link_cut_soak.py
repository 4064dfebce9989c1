"""Link-cut soak: a real station publishes through a proxy that cuts its broker link every 1-4 s.

The link-cut test of paho's interoperability suite, applied to the agent: a real mosquitto, the
cutting proxy of ``benchmarks/cutting_proxy.py`` between it and the station (50 ms one-way delay, so
messages are on the way when a cut comes; every open connection aborted at random 1-4 s intervals
from a seeded RNG, and after a quarter of the cuts no listener at all for 0.2-2 s), and a real station in this process (looped Fashion-MNIST video camera -> localizer ->
ONNX Runtime -> decisions -> SQLite outbox -> MQTT QoS 1) with the agent's default reconnect
settings. A subscriber connected straight to the broker (never cut) counts every message by its id.

After ``--duration-s`` the cameras stop, the outbox drains (the cuts go on), and the station shuts
down. Reported, per outbox kind (result, decision, frame): produced (the agent's own counters of
messages written to its outbox), delivered unique, duplicates before dedupe, lost (produced minus
delivered unique); and the link: cuts, refusals, the station's reconnects, outages measured at the
proxy (end of a connection to the broker's first byte on the next). Exit status 1 when anything is
lost or left in the outbox (a gate), 2 when the soak could not run.

    .venv/bin/python benchmarks/link_cut_soak.py --duration-s 600 --json benchmarks/results/link_cut_soak.json
    .venv/bin/python benchmarks/link_cut_soak.py --duration-s 60 --cut-every 1 2 --seed 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cutting_proxy import CutPlan, CuttingProxy, LinkStats  # noqa: E402

from agent.app import Agent  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.demo import fashion_mnist_test, local_mosquitto, write_video  # noqa: E402

log = logging.getLogger("link_cut_soak")

KINDS = ("result", "decision", "frame")
TOPIC_KIND = {"result": "result", "decision": "decision", "frames": "frame"}


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 600.0
    fps: float = 20.0
    plan: CutPlan = field(default_factory=CutPlan)
    drain_timeout_s: float = 300.0
    deliver_timeout_s: float = 60.0
    progress_every_s: float = 30.0


def station_config(bundle: Path, video: Path, workdir: Path, proxy_port: int, fps: float) -> AgentConfig:
    """A station as deployed (default MQTT reconnect, keepalive, in-flight window), its broker behind the proxy.

    Every frame gives one result (empty ones too), every low-confidence frame an upload, every item a decision.
    """
    return AgentConfig.model_validate({
        "site": "soak", "station": "st-01",
        "model": {"bundle": str(bundle), "backend": "onnxruntime", "batch_size": 4, "warmup_runs": 1},
        "cameras": [{"id": "cam-a", "uri": str(video), "loop": True, "fps": fps, "backpressure": "block",
                     "queue_size": 8}],
        "mqtt": {"host": "127.0.0.1", "port": proxy_port},
        "outbox": {"path": str(workdir / "outbox.sqlite")},
        "decisions": {"presence": {"mode": "background", "min_frames": 1, "gap_frames": 1},
                      "empty_frames": "publish"},
        "frames": {"min_interval_s": 0.0, "dedupe_bits": 0},
        "health": {"stats_interval_s": 1.0},
        "shutdown_flush_s": 10,
    })


class IdCounter:
    """A dashboard stand-in straight on the broker: counts every result, decision and frame by its id (QoS 1)."""

    def __init__(self, host: str, port: int, root: str) -> None:
        import paho.mqtt.client as paho

        self.root = root
        self.received: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
        self.result_frames: set[int] = set()
        self.offline_status = 0
        self.unparsed = 0
        self.frame_formats: Counter[str] = Counter()
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"soak-counter-{os.getpid()}",
                                  protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{root}/#", qos=1) if not rc.is_failure else None
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError(f"the counting subscriber could not subscribe on {host}:{port}")

    def _on_message(self, client, userdata, msg) -> None:
        leaf = msg.topic[len(self.root) + 1:]
        kind = TOPIC_KIND.get(leaf)
        meta = dict(getattr(msg.properties, "UserProperty", None) or []).get("meta")
        try:
            if kind == "frame" and meta is not None:        # MQTT v5: the JPEG, metadata in user properties
                body = json.loads(meta)
            elif kind == "frame":                           # MQTT 3.1.1: a JSON envelope around the JPEG
                body = json.loads(msg.payload)["meta"]
            elif kind is not None or leaf == "status":
                body = json.loads(msg.payload)
            else:
                return
            body["id"]
        except (ValueError, KeyError, TypeError):
            with self._lock:
                self.unparsed += 1
            return
        with self._lock:
            if kind == "frame":
                self.frame_formats["v5" if meta is not None else "v311-envelope"] += 1
            if kind is None:
                self.offline_status += body.get("state") == "offline"
                return
            self.received[kind][body["id"]] += 1
            if kind == "result":
                self.result_frames.add(int(body["frame_seq"]))

    def unique(self) -> dict[str, int]:
        with self._lock:
            return {kind: len(ids) for kind, ids in self.received.items()}

    def total(self) -> dict[str, int]:
        with self._lock:
            return {kind: sum(ids.values()) for kind, ids in self.received.items()}

    def wait_for(self, wanted: dict[str, int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.unique()
            if all(got[k] >= n for k, n in wanted.items()):
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def produced(agent: Agent) -> dict[str, int]:
    """What the station wrote to its outbox, by its own counters (one result per frame: empty frames publish)."""
    m = agent.metrics

    def total(name: str) -> int:
        return int(sum(m.counters_by(name, "camera").values()))

    return {"result": total("frames_classified_total") + total("frames_empty_total"),
            "decision": total("items_decided_total"),
            "frame": total("frames_uploaded_total")
            + int(sum(m.counters_by("empty_scenes_sent_total", "trigger").values()))}   # one camera


def outbox_left(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        db.close()


def stop_cameras(agent: Agent) -> None:
    """Cameras, then the frames already queued (Agent.shutdown's first half); the publisher keeps running."""
    agent.stop_event.set()
    for worker in agent.workers:
        worker.join(timeout=30)
    assert agent.inference is not None
    agent.inference.stop_event.set()
    agent.inference.join(timeout=60)


def wait_drained(agent: Agent, timeout: float) -> bool:
    assert agent.outbox is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.outbox.depth() == 0:
            return True
        time.sleep(0.2)
    return agent.outbox.depth() == 0


def run_station(cfg: AgentConfig, counter: IdCounter, proxy: CuttingProxy, soak: SoakConfig,
                progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the station for the soak's duration, stop its cameras, drain; its counts and the drain time."""
    agent = Agent(cfg)
    agent.start()
    assert agent.publisher is not None
    try:
        started = time.monotonic()
        next_report = started + soak.progress_every_s
        while (now := time.monotonic()) < started + soak.duration_s:
            if now >= next_report:
                next_report += soak.progress_every_s
                progress(f"{now - started:6.0f}s  produced {produced(agent)}  delivered {counter.unique()}  "
                         f"cuts {proxy.stats().cuts}  connects {agent.publisher.state.connects}")
            time.sleep(min(1.0, started + soak.duration_s - now))
        stop_cameras(agent)
        made = produced(agent)
        drain_start = time.monotonic()
        drained = wait_drained(agent, soak.drain_timeout_s)
        drain_s = time.monotonic() - drain_start
        progress(f"cameras stopped; produced {made}; outbox {'drained' if drained else 'NOT drained'} "
                 f"in {drain_s:.1f}s")
        frames = int(sum(agent.metrics.counters_by("frames_captured_total", "camera").values()))
        dropped = int(sum(agent.metrics.counters_by("frames_dropped_total", "camera").values()))
        connects = agent.publisher.state.connects
        protocol = agent.publisher.state.protocol
        failures = int(agent.metrics.counter("mqtt_connect_failures_total"))
        inference_errors = int(agent.metrics.counter("inference_errors_total"))
        outbox_dropped = agent.outbox.dropped() if agent.outbox is not None else {}
    finally:
        agent.shutdown(cfg.shutdown_flush_s)
    return {"produced": made, "drained": drained, "drain_s": drain_s, "frames_captured": frames,
            "frames_dropped": dropped, "connects": connects, "protocol": protocol, "connect_failures": failures,
            "inference_errors": inference_errors, "outbox_dropped": outbox_dropped,
            "outbox_left": outbox_left(Path(cfg.outbox.path))}


def link_figures(stats: LinkStats) -> dict[str, Any]:
    outages = sorted(stats.outages())
    return {"cuts": stats.cuts, "connections_cut": stats.connections_cut, "idle_cuts": stats.idle_cuts,
            "refusals": stats.refusals, "refused_s": round(stats.refused_s, 3), "accepted": stats.accepted,
            "upstream_failures": stats.upstream_failures, "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
            "outages": len(outages), "longest_outage_s": round(outages[-1], 3) if outages else 0.0,
            "median_outage_s": round(outages[len(outages) // 2], 3) if outages else 0.0}


def run_soak(bundle: Path, video: Path, workdir: Path, soak: SoakConfig,
             progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """The whole soak against a fresh mosquitto in ``workdir``; the figures (``lost_total`` must be 0)."""
    with local_mosquitto(workdir) as broker_port:
        proxy = CuttingProxy("127.0.0.1", broker_port, soak.plan).start()
        try:
            cfg = station_config(bundle, video, workdir, proxy.port, soak.fps)
            counter = IdCounter("127.0.0.1", broker_port, cfg.topic_root)
            try:
                try:
                    station = run_station(cfg, counter, proxy, soak, progress)
                finally:
                    link = link_figures(proxy.stop())     # the station is down: its link's figures end here
                counter.wait_for(station["produced"], soak.deliver_timeout_s)
            finally:
                counter.close()
        finally:
            proxy.stop()
    return summarize(station, counter, link)


def summarize(station: dict[str, Any], counter: IdCounter, link: dict[str, Any]) -> dict[str, Any]:
    made, unique, total = station["produced"], counter.unique(), counter.total()
    lost = {k: max(0, made[k] - unique[k]) for k in KINDS}
    missing = sorted(set(range(1, station["frames_captured"] + 1)) - counter.result_frames)
    return {
        "produced": made, "delivered_unique": unique, "received_total": total,
        "duplicates": {k: total[k] - unique[k] for k in KINDS},
        "unexpected": {k: max(0, unique[k] - made[k]) for k in KINDS},
        "lost": lost, "lost_total": sum(lost.values()),
        "results_missing_frame_seqs": missing[:50], "results_missing_count": len(missing),
        "outbox_drained": station["drained"], "outbox_left": station["outbox_left"],
        "outbox_dropped": station["outbox_dropped"], "drain_s": round(station["drain_s"], 3),
        "frames_captured": station["frames_captured"], "frames_dropped": station["frames_dropped"],
        "inference_errors": station["inference_errors"],
        "station_connects": station["connects"], "reconnects": max(0, station["connects"] - 1),
        "connect_failures": station["connect_failures"], "offline_wills_and_status": counter.offline_status,
        "protocol_at_end": station["protocol"], "frames_by_format": dict(counter.frame_formats),
        "unparsed_messages": counter.unparsed,
        "link": link,
    }


def failed(res: dict[str, Any]) -> list[str]:
    """Why the gate fails: anything lost, anything the subscriber got that the station never made, a backlog."""
    why = []
    if res["lost_total"]:
        why.append(f"lost {res['lost']}")
    if any(res["unexpected"].values()):
        why.append(f"delivered but not counted as produced {res['unexpected']}")
    if res["outbox_left"] or not res["outbox_drained"]:
        why.append(f"{res['outbox_left']} message(s) left in the outbox")
    if res["outbox_dropped"]:
        why.append(f"outbox quota drops {res['outbox_dropped']}")
    return why


def tiny_bundle(root: Path) -> Path:
    """A small random-weight CNN bundle (the agent tests' own), when no --bundle is given."""
    sys.path.insert(0, str(REPO / "tests" / "agent"))
    from agent_support import make_tiny_bundle

    return make_tiny_bundle(root, "soak-1")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="model bundle (default: a small random-weight one)")
    p.add_argument("--duration-s", type=float, default=600.0, help="seconds the cameras run (default 10 minutes)")
    p.add_argument("--fps", type=float, default=20.0, help="frames per second of the looped video camera")
    p.add_argument("--images", type=int, default=60, help="Fashion-MNIST test images in the looped video")
    p.add_argument("--cut-every", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"),
                   help="seconds between cuts, drawn uniformly (default 1 4)")
    p.add_argument("--refuse-chance", type=float, default=0.25, help="chance that a cut also stops the listener")
    p.add_argument("--refuse-for", type=float, nargs=2, default=(0.2, 2.0), metavar=("MIN", "MAX"),
                   help="seconds without a listener after such a cut (default 0.2 2)")
    p.add_argument("--delay-s", type=float, default=0.05,
                   help="one-way delay of the link, so messages are on the way when a cut comes (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cut schedule")
    p.add_argument("--drain-timeout-s", type=float, default=300.0, help="longest wait for the outbox to drain")
    p.add_argument("--json", type=Path, default=None, help="also write the figures (with this command) here")
    p.add_argument("--verbose", action="store_true", help="also log the station's expected reconnect errors")
    return p


def print_report(res: dict[str, Any]) -> None:
    link = res["link"]
    for kind in KINDS:
        print(f"{kind:9s} produced {res['produced'][kind]:7d}  delivered unique {res['delivered_unique'][kind]:7d}  "
              f"duplicates {res['duplicates'][kind]:5d}  lost {res['lost'][kind]}")
    print(f"link      {link['cuts']} cuts ({link['connections_cut']} connections), {link['refusals']} refusals "
          f"({link['refused_s']:.1f}s without a listener), {res['reconnects']} reconnects, "
          f"{res['connect_failures']} failed connects")
    print(f"outages   {link['outages']}, median {link['median_outage_s']:.2f}s, longest {link['longest_outage_s']:.2f}s")
    print(f"drain     {res['drain_s']:.1f}s after the cameras stopped; left in the outbox {res['outbox_left']}")
    print(f"protocol  MQTT {res['protocol_at_end']} at the end; frames received as {res['frames_by_format']}; "
          f"{res['unparsed_messages']} unparsed")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("agent").setLevel(logging.WARNING)
    if not args.verbose:     # every cut logs a disconnect and often a failed connect: expected here
        logging.getLogger("agent.mqtt").setLevel(logging.CRITICAL)
    plan = CutPlan(cut_every_s=tuple(args.cut_every), refuse_chance=args.refuse_chance,
                   refuse_for_s=tuple(args.refuse_for), delay_s=args.delay_s, seed=args.seed)
    soak = SoakConfig(duration_s=args.duration_s, fps=args.fps, plan=plan, drain_timeout_s=args.drain_timeout_s)
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="link-cut-soak-") as tmp:
        workdir = Path(tmp)
        bundle = args.bundle or tiny_bundle(workdir / "models")
        images, _ = fashion_mnist_test(n=args.images)
        video = workdir / "soak.avi"
        write_video(images, video, size=64)
        res = run_soak(bundle, video, workdir, soak)
    print_report(res)
    why = failed(res)
    print("PASS: nothing lost" if not why else "FAIL: " + "; ".join(why))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "started_at": started.isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "bundle": str(args.bundle) if args.bundle else "random-weight tiny CNN",
            "config": {**asdict(soak), "images": args.images}, "passed": not why, "failures": why, **res},
            indent=1) + "\n")
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
