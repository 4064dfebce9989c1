"""The warehouse at fleet scale: simulated stations -> the deployed broker -> the real dashboard and ingest.

Started as users deploy them: mosquitto with the shipped deploy/central/mosquitto/{mosquitto.conf,acl}
(TLS listener with a throw-away CA, a password per station from ``mosquitto_passwd``, the ACL; only the
paths and ports are moved into a temporary folder and the per-message debug log of the tests is left
out), ``python -m central dashboard`` (user ``dashboard``, web password) and ``python -m central ingest``
(user ``central-ingest``). The stations are ``python -m agent.sim.fleet run`` in ``--procs`` processes
(agent/sim/fleet.py: the agent's own message code, a password per station, retained status and will,
results, decisions, stats, QC alerts, low-confidence JPEGs, a rollout, some stations offline or stale).

Reported (and written to ``--out`` with the command line): messages published per kind and acknowledged
by the broker; what the dashboard applied per kind (``/api/state``: each station's ``counts``, and the
``counters``: applied, duplicates, malformed); frames stored by ingest (its store) and quarantined;
**lost** = per station and kind, acknowledged (or left as a will) but never applied by the dashboard or
stored by ingest; CPU seconds and peak RSS of mosquitto, the dashboard, ingest and the simulator, also
per 1,000 stations; end-to-end latency from a result's publish to its id appearing on the dashboard's
``/events`` stream (an SSE client here; p50/p95). Exit status 1 when anything is lost or malformed.
Stats are QoS 0 (as the agent sends them): they are counted, and a missing one is reported apart.

    .venv/bin/python benchmarks/fleet.py --sites 5 --per-site 20 --duration 60 --out benchmarks/results/fleet_100.json
    .venv/bin/python benchmarks/fleet.py --sites 25 --per-site 40 --duration 60 --out benchmarks/results/fleet_1000.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "deploy")]

from deploy_support import MOSQUITTO_PASSWD, CentralBroker, free_port, make_pki  # noqa: E402

from agent.sim.fleet import FleetConfig, troubled, write_credentials  # noqa: E402

log = logging.getLogger("fleet")
ID = re.compile(rb'"id":"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"')
DASHBOARD_KINDS = ("status", "result", "decision", "alert", "stats", "receipt")
CENTRAL_USERS = {"central-ingest": "pw-ingest-fleet", "dashboard": "pw-dashboard-fleet"}
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class FleetBroker(CentralBroker):
    """The shipped broker config with the fleet's password file, logging as deployed (no per-message debug)."""

    passwd: Path | None = None

    def write_config(self) -> Path:
        conf = super().write_config()
        if self.passwd is not None:
            shutil.copyfile(self.passwd, self.workdir / "passwd")
            os.chmod(self.workdir / "passwd", 0o600)
        conf.write_text(conf.read_text().replace("\nlog_type all", ""))
        return conf


# ---------------------------------------------------------------- processes and what they cost

def proc_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) and peak RSS (MiB) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    peak = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    return {"cpu_s": cpu, "peak_rss_mib": round(peak / 1024, 1)}


def central_cmd(verb: str, broker: FleetBroker, user: str, secrets: Path, *more: str) -> list[str]:
    password = secrets / f"{user}.password"
    password.write_text(CENTRAL_USERS[user] + "\n")
    os.chmod(password, 0o600)
    return [sys.executable, "-m", "central", verb, "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.tls_port),
            "--tls-ca", str(broker.pki.ca_cert), "--username", user, "--password-file", str(password), *more]


def wait_for(what: str, done, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


class EventStream(threading.Thread):
    """A page with one station's card open: reads ``/events?station=<key>`` and notes when each message id
    first appears (a server that sends every station's view on the stream ignores the query; then every id
    counts)."""

    def __init__(self, url: str, auth: tuple[str, str], first_seen: dict[str, float]) -> None:
        super().__init__(name="sse", daemon=True)
        self.url, self.auth, self.first_seen = url, auth, first_seen
        self.connects = 0
        self.bytes = 0
        self.stop = threading.Event()
        self.open = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with httpx.stream("GET", self.url, auth=self.auth, timeout=httpx.Timeout(30.0, connect=5.0)) as r:
                    r.raise_for_status()
                    self.connects += 1
                    for line in r.iter_lines():
                        self.open.set()
                        now = time.time()
                        self.bytes += len(line)
                        for match in ID.finditer(line.encode()):
                            self.first_seen.setdefault(match.group(1).decode(), now)
                        if self.stop.is_set():
                            return
            except httpx.HTTPError as exc:
                log.warning("events stream: %s; reconnecting", exc)
                time.sleep(0.5)


def watched_stations(cfg: FleetConfig, n: int) -> list[str]:
    """``n`` stations that stay online, on different sites: the cards the benchmark's pages keep open."""
    trouble = troubled(cfg)
    keys = [f"site-{i % cfg.sites:02d}/st-{i // cfg.sites:03d}" for i in range(cfg.stations)]
    return [k for k in keys if k not in trouble][:n]


# ---------------------------------------------------------------- the run

def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cfg = FleetConfig(sites=args.sites, per_site=args.per_site, offline=args.offline, stale=args.stale,
                      shipment_items=args.shipment_items)
    secrets = work / "secrets"
    plain, passwd = write_credentials(cfg, secrets, CENTRAL_USERS, MOSQUITTO_PASSWD)
    broker = FleetBroker(work / "broker", make_pki(work / "pki"), passwd=passwd)
    broker.workdir.mkdir()
    broker.start()
    web_password = secrets / "web.password"
    web_password.write_text("fleet-viewer\n")
    port = free_port()
    store = work / "store"
    logs = {name: open(work / f"{name}.log", "w") for name in ("dashboard", "ingest", "fleet")}
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["dashboard"] = subprocess.Popen(
            central_cmd("dashboard", broker, "dashboard", secrets, "--host", "127.0.0.1", "--port", str(port),
                        "--web-password-file", str(web_password), "--log-level", "WARNING"),
            cwd=REPO, stdout=logs["dashboard"], stderr=subprocess.STDOUT)
        procs["ingest"] = subprocess.Popen(central_cmd("ingest", broker, "central-ingest", secrets, "--store", str(store)),
                                           cwd=REPO, stdout=logs["ingest"], stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        wait_for("dashboard connected to the broker", lambda: _health(base).get("broker_connected"), 60,
                 procs["dashboard"])
        wait_for("ingest subscribed", lambda: "subscribed to" in (work / "ingest.log").read_text(), 60, procs["ingest"])
        first_seen: dict[str, float] = {}
        watch = watched_stations(cfg, args.watch)
        streams = [EventStream(f"{base}/events?" + urlencode({"station": key}), ("viewer", "fleet-viewer"), first_seen)
                   for key in watch]
        for stream in streams:
            stream.start()
            wait_for("the events stream open", stream.open.is_set, 30)
        return _measure(args, cfg, work, plain, broker, procs, logs, base, store, streams, watch)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        broker.stop()
        for fh in logs.values():
            fh.close()


def _measure(args, cfg, work, plain, broker, procs, logs, base, store, streams, watch) -> dict[str, Any]:
    watched = {"mosquitto": broker.proc.pid, "dashboard": procs["dashboard"].pid, "ingest": procs["ingest"].pid}
    before = {name: proc_usage(pid) for name, pid in watched.items()}
    reports = [work / f"fleet-{k}.json" for k in range(args.procs)]
    fleet_cmd = [sys.executable, "-m", "agent.sim.fleet", "run", "--sites", str(args.sites), "--per-site",
                 str(args.per_site), "--credentials", str(plain), "--mqtt-host", "127.0.0.1", "--mqtt-port",
                 str(broker.tls_port), "--tls-ca", str(broker.pki.ca_cert), "--duration", str(args.duration),
                 "--results-per-s", str(args.results_per_s), "--stats-interval", str(args.stats_interval),
                 "--offline", str(args.offline), "--stale", str(args.stale), "--trouble-after",
                 str(args.duration / 3), "--rollout-share", str(args.rollout_share), "--parts", str(args.procs),
                 "--shipment-items", str(args.shipment_items), "--receipt-interval", str(args.receipt_interval)]
    for key in watch:                # only the stations whose cards are open: their result times, nobody else's
        fleet_cmd += ["--latency-of", key]
    began = time.monotonic()
    sims = [subprocess.Popen(fleet_cmd + ["--part", str(k), "--report", str(reports[k])], cwd=REPO,
                             stdout=logs["fleet"], stderr=subprocess.STDOUT) for k in range(args.procs)]
    sim_usage = [proc_usage(p.pid) for p in sims]
    trouble = troubled(cfg)
    health_before_end: dict[str, Any] = {}
    while any(p.poll() is None for p in sims):
        if not health_before_end and time.monotonic() - began > args.duration - 2:
            health_before_end = {key: _card_health(base, key) for key in trouble}
        for k, p in enumerate(sims):
            if p.poll() is None:
                try:
                    sim_usage[k] = proc_usage(p.pid)
                except (FileNotFoundError, ProcessLookupError, StopIteration):
                    pass
        time.sleep(0.5)
    fleet_wall = time.monotonic() - began
    failed = [k for k, p in enumerate(sims) if p.returncode != 0]
    published = _merge([json.loads(r.read_text()) for r in reports if r.exists()])
    expected = _expected(published)
    frames_expected = published["acked"].get("frame", 0)
    wait_for("dashboard and ingest caught up", lambda: _caught_up(base, store, expected, frames_expected), 120)
    after = {name: proc_usage(pid) for name, pid in watched.items()}
    for stream in streams:
        stream.stop.set()
    state = httpx.get(f"{base}/api/state", auth=("viewer", "fleet-viewer"), timeout=60).json()
    shipments = _shipments(base, published)
    procs["ingest"].terminate()
    procs["ingest"].wait(30)
    stored = _store_stats(store)
    lost = _lost(published, state, stored)
    first_seen = streams[0].first_seen if streams else {}
    latency = _latency(published["result_times"], first_seen,
                       sum(published["per_station"].get(k, {}).get("acked", {}).get("result", 0) for k in watch))
    usage = {name: {"cpu_s": round(after[name]["cpu_s"] - before[name]["cpu_s"], 2),
                    "peak_rss_mib": after[name]["peak_rss_mib"]} for name in watched}
    usage["simulator"] = {"cpu_s": round(sum(u["cpu_s"] for u in sim_usage), 2),
                          "peak_rss_mib": round(sum(u["peak_rss_mib"] for u in sim_usage), 1),
                          "processes": args.procs}
    per_1000 = {name: {"cpu_s_per_s": round(u["cpu_s"] / args.duration * 1000 / cfg.stations, 3)}
                for name, u in usage.items()}
    counters = state["counters"]
    health = {s["key"]: s["health"] for s in state["stations"]}
    return {
        "benchmark": "fleet", "stations": cfg.stations, "sites": cfg.sites, "per_site": cfg.per_site,
        "duration_s": args.duration, "fleet_wall_s": round(fleet_wall, 1), "results_per_s_per_station": args.results_per_s,
        "published": {"sent": published["sent"], "acked": published["acked"], "refused": published["refused"],
                      "wills": published["wills"]},
        "connect_s": published["connect_s"], "simulator_failed": failed, "simulator_errors": published["errors"][:10],
        "dashboard": {"counters": counters, "applied_by_kind": _applied(state), "stations": len(state["stations"]),
                      "offline_by_will": sorted(k for k, v in trouble.items() if v == "offline"),
                      "stale": sorted(k for k, v in trouble.items() if v == "stale"),
                      "troubled_health_before_the_end": health_before_end,
                      "troubled_health_after_goodbye": {k: health.get(k) for k in trouble}},
        "shipments": shipments,
        "ingest": {"stored": stored["frames"], "expected": frames_expected, "malformed": stored["malformed"]},
        "malformed": counters["malformed"] + stored["malformed"], "lost": lost,
        "lost_total": sum(lost["qos1"].values()) + lost["frames"],
        "latency_publish_to_events_ms": latency, "events_streams": {
            "cards_open": watch, "connects": sum(s.connects for s in streams),
            "mib": round(sum(s.bytes for s in streams) / 2**20, 1), "ids_seen": len(first_seen),
            "result_times_kept": len(published["result_times"])},
        "cost": usage, "cost_per_1000_stations": per_1000,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}, "code": _code(),
    }


def _code() -> dict[str, Any]:
    """The commit measured, and whether the dashboard or ingest code had changes not yet committed."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout.rstrip("\n")

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": git("status", "--porcelain", "central", "agent", "contract").splitlines()}


def _health(base: str) -> dict[str, Any]:
    try:
        return httpx.get(f"{base}/healthz", timeout=5).json()
    except httpx.HTTPError:
        return {}


def _card_health(base: str, key: str) -> str | None:
    """A station's health from its card (``/api/stations/<site>/<station>``); None where there is no such API."""
    try:
        r = httpx.get(f"{base}/api/stations/{key}", auth=("viewer", "fleet-viewer"), timeout=10)
        return r.json().get("health") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _shipments(base: str, published: dict[str, Any]) -> dict[str, Any]:
    """The docks' shipments as the simulator opened them, and as the dashboard's book holds them (bounded:
    ``/api/shipments``' open, closed, superseded and dropped, and the open ones with discrepancies)."""
    book = httpx.get(f"{base}/api/shipments", auth=("viewer", "fleet-viewer"), timeout=60).json()
    return {"docks": published["docks"], "opened": published["shipments"], "open_at_the_end": published["docks_open"],
            "dashboard": {k: book.get(k) for k in ("open", "open_with_discrepancies", "open_listed", "closed",
                                                   "superseded", "dropped", "open_kept", "open_counted",
                                                   "closed_kept")}}


def _merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"sent": {}, "acked": {}, "refused": {}, "wills": 0, "errors": [], "per_station": {},
                           "result_times": [], "connect_s": max((r["connect_s"] for r in reports), default=None),
                           "shipments": 0, "docks": 0, "docks_open": 0}
    for r in reports:
        for key in ("sent", "acked", "refused"):
            for kind, n in r[key].items():
                out[key][kind] = out[key].get(kind, 0) + n
        out["wills"] += r["wills"]
        out["shipments"] += r.get("shipments", 0)
        out["docks"] += r.get("docks", 0)
        out["docks_open"] += r.get("docks_open", 0)
        out["errors"] += r["errors"]
        out["per_station"].update(r["per_station"])
        out["result_times"] += r["result_times"]
    return out


def _expected(published: dict[str, Any]) -> int:
    """Messages the dashboard must apply: everything of its kinds the broker acknowledged, plus the wills."""
    return sum(published["acked"].get(k, 0) for k in DASHBOARD_KINDS) + published["wills"]


def _caught_up(base: str, store: Path, expected: int, frames: int) -> bool:
    counters = _health(base).get("counters", {})
    return counters.get("applied", 0) + counters.get("malformed", 0) >= expected and _stored(store) >= frames


def _stored(store: Path) -> int:
    try:
        with sqlite3.connect(f"file:{store / 'frames.sqlite'}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
    except sqlite3.Error:
        return 0


def _store_stats(store: Path) -> dict[str, Any]:
    from central.review.store import FrameStore

    fs = FrameStore(store)
    try:
        stats = fs.stats()
    finally:
        fs.close()
    return {"frames": stats["frames"], "by_station": stats["by_station"],
            "malformed": stats["counters"].get("malformed", 0)}


def _applied(state: dict[str, Any]) -> dict[str, int]:
    total: dict[str, int] = {}
    for s in state["stations"]:
        for kind in DASHBOARD_KINDS:
            total[kind] = total.get(kind, 0) + s.get("counts", {}).get(kind, 0)
    return total


def _lost(published: dict[str, Any], state: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """Per station and kind: acknowledged by the broker (status: plus the will) but not applied / not stored."""
    counts = {s["key"]: s.get("counts", {}) for s in state["stations"]}
    qos1 = {k: 0 for k in DASHBOARD_KINDS if k != "stats"}
    stats_missing = 0
    frames = 0
    for key, sent in published["per_station"].items():
        got = counts.get(key, {})
        for kind in qos1:
            want = sent["acked"].get(kind, 0) + (sent["wills"] if kind == "status" else 0)
            qos1[kind] += max(0, want - got.get(kind, 0))
        stats_missing += max(0, sent["acked"].get("stats", 0) - got.get("stats", 0))
        frames += max(0, sent["acked"].get("frame", 0) - stored["by_station"].get(key, 0))
    return {"qos1": qos1, "frames": frames, "stats_qos0_not_applied": stats_missing}


def _latency(result_times: list[list], first_seen: dict[str, float], watched_results: int) -> dict[str, Any]:
    """Publish -> first seen on a page's stream, for the results of the stations whose cards are open."""
    gaps = [first_seen[i] - t for i, t in result_times if i in first_seen]
    if not gaps:
        return {"n": 0, "of": watched_results}
    p50, p95, p99 = np.percentile(np.asarray(gaps) * 1000, [50, 95, 99])
    return {"n": len(gaps), "of": watched_results, "p50": round(float(p50), 1), "p95": round(float(p95), 1),
            "p99": round(float(p99), 1), "max": round(max(gaps) * 1000, 1)}


# ---------------------------------------------------------------- command line

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--per-site", type=int, default=20)
    p.add_argument("--duration", type=float, default=60.0, help="seconds the stations publish (default 60)")
    p.add_argument("--results-per-s", type=float, default=1.0, help="results per station per second (default 1)")
    p.add_argument("--stats-interval", type=float, default=10.0, help="stats every this many seconds (default 10)")
    p.add_argument("--offline", type=int, default=2, help="stations that drop off (will) a third into the run")
    p.add_argument("--stale", type=int, default=2, help="stations that stop publishing a third into the run")
    p.add_argument("--rollout-share", type=float, default=0.25, help="share of stations moved to the new model")
    p.add_argument("--watch", type=int, default=4, help="pages open on the dashboard, each on one station's card")
    p.add_argument("--procs", type=int, default=None, help="simulator processes (default: 1 per 500 stations)")
    p.add_argument("--shipment-items", type=int, default=0,
                   help="receiving stations are docks receiving shipments of this many items (default 0: none)")
    p.add_argument("--receipt-interval", type=float, default=0.0,
                   help="a dock's receipts: at most one per this many seconds (default 0: after every item)")
    p.add_argument("--out", type=Path, default=None, help="write the figures and the command here (JSON)")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (logs, store)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stations = args.sites * args.per_site
    args.procs = args.procs or max(1, -(-stations // 500))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))     # every station is a socket in the broker
    if hard < stations * 2 + 100:
        raise SystemExit(f"open-files limit {hard} is too low for {stations} stations")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
            result = run(args, Path(tmp))
    result["command"] = "python benchmarks/fleet.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    bad = result["lost_total"] or result["malformed"] or result["simulator_failed"] or \
        result["published"]["refused"]
    if bad:
        print(f"FAILED: lost {result['lost_total']}, malformed {result['malformed']}, "
              f"simulator failures {result['simulator_failed']}, refused {result['published']['refused']}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
