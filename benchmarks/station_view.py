"""Station-view benchmark: the real agent on rendered station scenes, scored per item and per frame.

Renders Fashion-MNIST *test* items as a station camera sees them (agent/sim/scenes.py: a moving
belt, a tilted bench), runs ``python -m agent run --config <generated yaml> --exit-at-end`` on each
scene's JPEG folder against a throwaway mosquitto, collects the station's result, decision and stats
messages, and scores them against the scene's truth.json (agent/sim/score.py):

* items: decided correctly (exactly one decision, with the item's label), missed (no decision),
  split (more than one), merged decisions (one decision over two items), phantom decisions (over no
  item's frames), share sent to manual review, decisions auto-sorted and wrong (every decision not sent to
  review, a split item's each and phantoms included: wrong when not its item's label or over no item);
* frames: accuracy where the item is fully inside the ROI, where it is partly in, and results on
  frames with no item that still name a product (an empty belt reported as a product);
* the camera: frames captured, dropped by the hub, classified (the folder camera is run with
  ``backpressure: block`` so the hub waits for the pipeline instead of dropping). The counts are the last
  stats message's: the agent sends a final one at its stop with the final counts; ``camera.last_stats_stale``
  flags a run where none arrived or it predates the scene's end (runs before 2026-12-07), and then no drop
  count for the whole scene is printed.

Decisions are matched to items by frame span: a decision's first_seen/last_seen are the captured_at
of its first/last frame, results map captured_at -> source_ref (the file name) -> frame -> item.

    python benchmarks/station_view.py --bundle models/fashion-mnist/<version> [--scenes belt bench]
        [--items 60] [--seed 0] [--out benchmarks/results] [--tag NAME] [--set KEY=VALUE ...]
    python benchmarks/station_view.py --bundle ... --scenes A B --loop [--measure-seed N] [--measure-items N]
    python benchmarks/station_view.py render --out DIR [--scenes ...] [--items 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.sim.scenes import SCENES, TRUTH_VERSION, renderer_fingerprint, write_scene  # noqa: E402
from agent.sim.score import score_scene  # noqa: E402

log = logging.getLogger("station_view")

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
DEFAULT_RETRAIN_ARGS = ("--epochs 2 --limit-per-class 1000 --batch-size 64 "
                        "--calibration-images 256 --parity-images 64")

# ================================================================ broker and collector

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mosquitto(workdir: Path) -> Iterator[int]:
    """A throwaway mosquitto on 127.0.0.1 (anonymous, no persistence); yields its port."""
    port = free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(proc, port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {proc.stderr.read().decode(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{port}")


class Collector:
    """Subscribes (QoS 1) to a station's result, decision, stats and receipt topics; drops redeliveries by id."""

    KINDS = ("result", "decision", "stats", "receipt")

    def __init__(self, port: int, root: str) -> None:
        import paho.mqtt.client as paho

        self.root = root
        self.messages: dict[str, list[dict]] = {k: [] for k in self.KINDS}
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self.last_message = time.monotonic()
        subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"station-view-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(f"{root}/{k}", 1) for k in self.KINDS])
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError(f"could not subscribe to {root}/# on 127.0.0.1:{port}")

    def _on_message(self, client, userdata, msg) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        try:
            body = json.loads(msg.payload)
        except ValueError:
            log.warning("%s: payload is not JSON; ignored", msg.topic)
            return
        with self._lock:
            self.last_message = time.monotonic()
            if body.get("id") in self._ids:
                return
            self._ids.add(body.get("id"))
            self.messages[kind].append(body)

    def settle(self, quiet_s: float = 1.0, timeout_s: float = 10.0) -> None:
        """Wait until nothing arrived for ``quiet_s`` (the last PUBACK'd messages are delivered)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and time.monotonic() - self.last_message < quiet_s:
            time.sleep(0.1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ================================================================ running the agent

def agent_config(scene_dir: Path, truth: dict, bundle: Path, workdir: Path, port: int) -> dict[str, Any]:
    """The station config for one scene: a folder camera paced by backpressure (no frame dropped)."""
    return {
        "site": "bench", "station": f"sv-{truth['scene']}", "role": "sorting",
        "model": {"bundle": str(bundle.resolve()), "backend": "onnxruntime", "batch_size": 8, "warmup_runs": 1,
                  "intra_op_threads": 1},
        "cameras": [{"id": "cam0", "uri": str(scene_dir.resolve()), "roi": truth["roi"],
                     "backpressure": "block", "queue_size": 8, "stall_timeout_s": 60}],
        "mqtt": {"host": "127.0.0.1", "port": port},
        "outbox": {"path": str(workdir / "outbox.sqlite")},
        "decisions": {"presence": {"mode": "background"}},
        "frames": {"enabled": False},
        "health": {"stats_interval_s": 0.5},
        "shutdown_flush_s": 30,
    }


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merged key by key (``over`` wins); anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(cfg: dict[str, Any], pairs: Sequence[str]) -> dict[str, Any]:
    """``a.b.c=VALUE`` (VALUE read as YAML) set into the config; cameras.* sets every camera."""
    import yaml

    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. decisions.presence.gap_frames=1")
        value = yaml.safe_load(raw)
        parts = key.split(".")
        targets = cfg["cameras"] if parts[0] == "cameras" else [cfg]
        parts = parts[1:] if parts[0] == "cameras" else parts
        for node in targets:
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
    return cfg


@dataclass
class AgentRun:
    returncode: int
    wall_s: float
    outbox_left: int
    messages: dict[str, list[dict]] = field(repr=False)
    log_tail: str = field(repr=False, default="")


def run_agent(cfg: dict[str, Any], workdir: Path, port: int, timeout_s: float) -> AgentRun:
    """``python -m agent run --config FILE --exit-at-end`` as a subprocess, with a collector subscribed first."""
    import yaml

    config_path = workdir / "station.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    collector = Collector(port, f"inventory/{cfg['site']}/{cfg['station']}")
    cmd = [sys.executable, "-m", "agent", "run", "--config", str(config_path), "--exit-at-end"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        log.error("the agent ran past %.0fs and was killed", timeout_s)
        rc, err = 124, exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    wall = time.monotonic() - start
    collector.settle()
    collector.close()
    left = re.search(r"(\d+) message\(s\) stay in the outbox", err or "")
    return AgentRun(rc, round(wall, 2), int(left.group(1)) if left else 0, collector.messages, (err or "")[-3000:])


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / "manifest.json" if bundle.is_dir() else bundle
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: cannot read the bundle manifest ({exc})")


def bundle_summary(bundle: Path) -> dict[str, Any]:
    m = read_manifest(bundle)
    quality = m.get("quality") or {}
    return {"path": str(bundle), "name": m.get("name"), "version": m.get("version"),
            "architecture": m.get("architecture"), "val_accuracy": quality.get("val_accuracy"),
            "val_images": quality.get("val_images"), "crop": (m.get("input") or {}).get("crop"),
            "labels": m.get("labels")}


# ================================================================ scenes on disk

def ensure_scene(scene: str, root: Path, items: int, seed: int, exclude: Sequence[int] = ()) -> dict:
    """``root/<scene>`` rendered for (items, seed, exclude), reused when its truth.json already says so."""
    truth_path = root / scene / "truth.json"
    excluded = sorted({int(i) for i in exclude})
    if truth_path.exists():
        truth = json.loads(truth_path.read_text())
        same = (truth.get("version"), truth.get("renderer"), truth.get("seed"), len(truth.get("items", [])),
                truth.get("excluded_test_indices", []))
        if same == (TRUTH_VERSION, renderer_fingerprint(), seed, items, excluded) \
                and len(list((root / scene).glob("frame_*.jpg"))) == truth["n_frames"]:
            return truth
    log.info("rendering %s: %d items, seed %d -> %s", scene, items, seed, root / scene)
    return write_scene(scene, root, items, seed, exclude=excluded)


def open_shipment(truth: dict, bundle: Path, workdir: Path) -> dict[str, int]:
    """A shipment listing exactly the scene's items (label -> count), open when the station starts: written into
    its station-state.json, as a station restarting with a shipment open finds it (agent/state.py)."""
    from agent.receiving import Shipment
    from agent.state import STATE_FILE, StationState, manifest_sha256

    lines: dict[str, int] = {}
    for item in truth["items"]:
        lines[item["label_name"]] = lines.get(item["label_name"], 0) + 1
    shipment = Shipment(f"sv-{truth['scene']}", lines, time.time())
    StationState(workdir / STATE_FILE, manifest_sha256(bundle.resolve()), shipment=shipment.to_json()).save()
    return lines


def shipment_summary(lines: dict[str, int], run: "AgentRun") -> dict[str, Any]:
    """The shipment's last receipt's totals and the decisions it vouched for."""
    receipts = sorted(run.messages["receipt"], key=lambda m: m.get("seq", 0))
    return {"lines": lines, "receipts": len(receipts), "totals": receipts[-1]["totals"] if receipts else None,
            "vouched_items": sum(1 for d in run.messages["decision"] if d.get("vouched"))}


def measure(truth: dict, scene_dir: Path, bundle: Path, overrides: Sequence[str], port: int,
            extra: dict[str, Any] | None = None, shipment: bool = False) -> dict[str, Any]:
    """One agent run on a rendered scene against the broker on ``port``, scored: the scene's JSON document.

    ``extra`` is merged into the generated config before the ``--set`` overrides (the loop turns uploads on).
    ``shipment``: the station starts with a shipment of exactly the scene's items open (``open_shipment``).
    """
    with tempfile.TemporaryDirectory(prefix=f"station-view-{truth['scene']}-") as tmp:
        workdir = Path(tmp)
        cfg = merged(agent_config(scene_dir, truth, bundle, workdir, port), extra or {})
        cfg = apply_overrides(cfg, overrides)
        lines = open_shipment(truth, bundle, workdir) if shipment else None
        run = run_agent(cfg, workdir, port, timeout_s=120 + 0.5 * truth["n_frames"])
    if run.returncode != 0:
        log.error("agent exited with %d on %s:\n%s", run.returncode, truth["scene"], run.log_tail)
    review_lane = cfg.get("decisions", {}).get("sorting", {}).get("review_lane", "manual-review")
    scores = score_scene(truth, run.messages["result"], run.messages["decision"], run.messages["stats"],
                         review_lane=review_lane)
    stats = max(run.messages["stats"], key=lambda m: m.get("seq", 0)) if run.messages["stats"] else {}
    return {"benchmark": "station_view", "command": command_line(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bundle": bundle_summary(bundle), "scene": scene_summary(truth),
            "agent": {"returncode": run.returncode, "wall_s": run.wall_s, "outbox_left": run.outbox_left,
                      "overrides": list(overrides), "presence": cfg["decisions"]["presence"],
                      "frames_uploaded_last_stats": stats.get("frames_uploaded"),
                      "model": (run.messages["result"][0]["model"] if run.messages["result"] else None)},
            **({"shipment": shipment_summary(lines, run)} if lines is not None else {}),
            **scores}


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def scene_summary(truth: dict) -> dict[str, Any]:
    return {"name": truth["scene"], "seed": truth["seed"], "items": len(truth["items"]), "frames": truth["n_frames"],
            "frames_sha256": truth["frames_sha256"], "renderer": truth["renderer"], "roi": truth["roi"],
            "params": truth["params"], "frames_with_item_fully_in": sum(1 for f in truth["frames"] if f["full"]),
            "frames_empty": sum(1 for f in truth["frames"] if not f["visible"])}


def bench_scene(scene: str, args: argparse.Namespace, scenes_root: Path) -> dict[str, Any]:
    """Render (or reuse), run the agent on its own throwaway broker, score."""
    truth = ensure_scene(scene, scenes_root, args.items, args.seed)
    with tempfile.TemporaryDirectory(prefix="station-view-broker-") as tmp, mosquitto(Path(tmp)) as port:
        return measure(truth, scenes_root / scene, args.bundle, args.set, port, shipment=args.shipment)


# ================================================================ output

def table(doc: dict[str, Any]) -> str:
    """A human summary of one scene's document."""
    it, fr, cam = doc["items"], doc["frames"], doc["camera"]
    pct = lambda v: "-" if v is None else f"{100 * v:5.1f}%"  # noqa: E731
    b = doc["bundle"]
    rows = [
        f"scene {doc['scene']['name']}: {it['items']} items, {doc['scene']['frames']} frames   "
        f"bundle {b['name']}/{b['version']} (val acc {pct(b['val_accuracy'])}, crop {(b['crop'] or {}).get('mode')})",
        f"  item accuracy          {pct(it['item_accuracy'])}  ({it['correct']}/{it['items'] - it['never_visible']}"
        + (f" visible; {it['never_visible']} never in view" if it["never_visible"] else "")
        + (f"; 95% CI {pct(it['item_accuracy_ci95'][0]).strip()}-{pct(it['item_accuracy_ci95'][1]).strip()})"
           if it.get("item_accuracy_ci95") else ")"),
        f"  missed / split         {it['missed']} / {it['split']}    merged decisions {it['merged_decisions']}",
        f"  phantom decisions      {it['phantom_decisions']} of {it['decisions']} decisions",
        f"  sent to review         {pct(it['review_share'])}    {auto_sorted(it)}",
        f"  frame acc, fully in    {pct(fr['full']['accuracy'])}  ({fr['full']['correct']}/{fr['full']['frames']}, "
        f"{fr['full']['results']} published)",
        f"  frame acc, partly in   {pct(fr['partial']['accuracy'])}  ({fr['partial']['correct']}/{fr['partial']['frames']})",
        f"  empty frames as product {fr['empty']['products']}/{fr['empty']['frames']} ({pct(fr['empty']['product_rate'])})",
        f"  camera: {camera_counts(cam)}, "
        f"results {cam['results_received']}/{cam['frames_in_scene']}; agent rc {doc['agent']['returncode']}, "
        f"{doc['agent']['wall_s']} s, outbox left {doc['agent']['outbox_left']}",
    ]
    return "\n".join(rows)


def auto_sorted(it: dict[str, Any]) -> str:
    """Decisions auto-sorted and wrong (a split item's each and phantoms included); a document written before
    2026-12-07 has only the items with exactly one decision, named as such."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    if "auto_sorted_decisions" in it:
        return (f"auto-sorted decisions {it['auto_wrong_decisions']} wrong of {it['auto_sorted_decisions']} "
                f"(accuracy {pct(it['auto_sorted_decision_accuracy'])})")
    return (f"auto-sorted items with one decision {it['auto_wrong']} wrong of {it['auto_sorted']} "
            f"(accuracy {pct(it['auto_sorted_accuracy'])}; split items and phantoms not counted)")


def camera_counts(cam: dict[str, Any]) -> str:
    """Captured and dropped frames as the last stats message counted them; a message sent before the scene's end
    (fewer frames captured than the scene has) says nothing of the drops after it, so no drop figure is given."""
    captured, frames = cam["frames_captured_last_stats"], cam["frames_in_scene"]
    stale = cam.get("last_stats_stale", captured is None or captured < frames)
    if stale:
        return f"last stats before the scene's end (captured {captured} of {frames} frames then): drops not known"
    return f"captured {captured}, dropped {cam['frames_dropped_last_stats']}"


def result_path(out: Path, scene: str, tag: str | None) -> Path:
    return out / f"station_view_{scene}{'_' + tag if tag else ''}.json"


# ================================================================ CLI

def _scene_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenes", nargs="+", default=list(SCENES), choices=list(SCENES))
    p.add_argument("--items", type=int, default=60, help="items per scene (default 60)")
    p.add_argument("--seed", type=int, default=0)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/station_view.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path, help="model bundle folder, e.g. models/fashion-mnist/<version>")
    _scene_args(p)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder of the JSON results")
    p.add_argument("--tag", default=None, help="suffix of the result files: station_view_<scene>_<tag>.json")
    p.add_argument("--scenes-dir", type=Path, default=None,
                   help="render scenes here and reuse them next time (default: a temporary folder)")
    p.add_argument("--shipment", action="store_true",
                   help="start the station with a shipment of exactly the scene's items open (receiving: its prior "
                        "and, with decisions.unknown_items on, its vouching for sure items it still expects)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="agent config override, YAML value, e.g. decisions.presence.gap_frames=1 (repeatable)")
    loop = p.add_argument_group("loop (--loop: the first scene teaches through uploads, review and retrain; "
                                "the second measures before/after)")
    loop.add_argument("--loop", action="store_true")
    loop.add_argument("--label-budget", type=int, default=300,
                      help="frames a reviewer labels, least certain first, class by class (0: every uploaded frame)")
    loop.add_argument("--base-data", type=Path, default=REPO / "data" / "fashion-mnist" / "train",
                      help="the retrain's base dataset (default: what 'trainer demo' imported)")
    loop.add_argument("--models-dir", type=Path, default=REPO / "models", help="where the retrained bundle goes")
    loop.add_argument("--retrain-args", default=DEFAULT_RETRAIN_ARGS,
                      help=f"more 'trainer retrain' options, one string (default: {DEFAULT_RETRAIN_ARGS!r})")
    loop.add_argument("--measure-seed", type=int, default=None,
                      help="seed of the measured scene (default: --seed when the two scenes differ, --seed + 1 when "
                           "they are the same station, so B shows other items)")
    loop.add_argument("--measure-items", type=int, default=None, help="items in the measured scene (default: --items)")
    loop.add_argument("--station-backgrounds", type=int, default=0, metavar="N",
                      help="the station sends empty scenes during scene A, and the retrain draws its station views on "
                           "the newest N (central backgrounds export --per-camera N; retrain --backgrounds); 0: off")
    clean = REPO / "data" / "fashion-mnist" / "test"
    loop.add_argument("--clean-test", type=Path, default=clean if clean.is_dir() else None,
                      help="a clean test split both bundles are scored on, to compare with scene B (default: "
                           "data/fashion-mnist/test where it is)")
    return p


def get_render_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/station_view.py render", description="render scenes only")
    _scene_args(p)
    p.add_argument("--out", type=Path, required=True, help="folder: <out>/<scene>/frame_*.jpg + truth.json")
    return p


def render_main(argv: list[str]) -> int:
    args = get_render_parser().parse_args(argv)
    for scene in args.scenes:
        truth = write_scene(scene, args.out, args.items, args.seed)
        print(f"{args.out / scene}: {truth['n_frames']} frames, {len(truth['items'])} items, "
              f"{sum(1 for f in truth['frames'] if f['full'])} frames with an item fully in the ROI")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["render"]:
        return render_main(argv[1:])
    args = get_args_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="station-view-scenes-") as tmp:
        scenes_root = args.scenes_dir or Path(tmp)
        if args.loop:
            return loop_main(args, scenes_root)
        for scene in args.scenes:
            doc = bench_scene(scene, args, scenes_root)
            path = result_path(args.out, scene, args.tag)
            path.write_text(json.dumps(doc, indent=1) + "\n")
            print(table(doc))
            print(f"  -> {path}")
    return 0


def loop_main(args: argparse.Namespace, scenes_root: Path) -> int:
    from benchmarks.station_view_loop import run_loop

    doc = run_loop(args, scenes_root)
    doc["command"] = command_line()
    for key in ("teach", "before", "after"):
        print(f"[{key}]\n{table(doc[key])}")
    up, rt = doc["uploads"], doc["retrain"]
    print(f"uploads: {up['stored']} stored, {up['labelled']} labelled, {up['skipped']} skipped; retrain exit "
          f"{rt['exit_code']}, promoted {rt['promoted']}: {rt['reasons']}")
    if rt.get("reviewed_split"):
        print(f"reviewed split: {rt['reviewed_split']}")
    if doc.get("clean_test"):
        print(f"clean test split: {doc['clean_test']}")
    path = args.out / f"station_view_loop_{args.scenes[0]}-{args.scenes[1]}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
