"""The retraining loop on station views: scene A teaches, scene B (other items) measures before/after.

Scene B is another scene, or the same station with other items (``--scenes belt belt``: another
seed, ``--measure-seed``, ``--measure-items``).

1. The agent runs on scene A with its bundle and low-confidence uploads on (``frames.enabled``, no rate
   limit); the real ``python -m central ingest`` stores what it uploads.
2. Stored frames are labelled through the real review server (``python -m central review``,
   ``POST /api/frames/<id>/review``) from scene A's truth.json, in the review queue's least-certain-by-class
   order until ``--label-budget`` frames are labelled (default 300): the one item in view, or skipped where
   none, two, or only a sliver of one is in view (what a reviewer could not label either).
3. ``python -m central labels export`` and ``python -m trainer retrain`` (fine-tuned from the current
   checkpoint, gated) make the next bundle.
4. The agent runs on scene B with the old and then the new bundle; both are scored like any scene.

Called by ``benchmarks/station_view.py --loop``; nothing here imports torch (the trainer runs as processes).
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks.station_view import REPO, ensure_scene, measure, mosquitto

log = logging.getLogger("station_view.loop")

EDGE_FRAMES = 3      # the first/last frames of an item's pass show a sliver: not labelled unless fully in


def label_for(frame: dict, items: dict[int, dict]) -> str | None:
    """What a reviewer labels a frame of the scene: the one item in view, else nothing (skip)."""
    if len(frame["visible"]) != 1:
        return None
    item = items[frame["visible"][0]]
    vis = item["visible_frames"]
    inner = vis[0] + EDGE_FRAMES <= frame["frame"] <= vis[-1] - EDGE_FRAMES
    return item["label_name"] if frame["full"] or inner else None


class Service:
    """A ``python -m central ...`` service process with its log file."""

    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "central", *args], cwd=REPO, stdout=out,
                                         stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.log_path.name}: the service exited:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def wait_until(what: str, predicate: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")


class Review:
    """The review server's HTTP API."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token

    def api(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json",
                                                                               "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def up(self) -> bool:
        try:
            self.api("/api/stats")
            return True
        except OSError:
            return False

    def pending(self) -> list[dict]:
        """Pending frames in the review page's least-certain-by-class order (what a reviewer works down)."""
        out: list[dict] = []
        while True:
            page = self.api(f"/api/frames?limit=500&offset={len(out)}&status=pending&order=least-certain-by-class")
            out += page["frames"]
            if not page["frames"] or len(out) >= page["total"]:
                return out

    def label_from_truth(self, truth: dict, budget: int | None = None) -> tuple[int, int]:
        """Label pending frames from the truth (by their source_ref) in queue order, until ``budget`` frames
        are labelled (None: all); returns (labelled, skipped)."""
        frames = {f["file"]: f for f in truth["frames"]}
        items = {it["item"]: it for it in truth["items"]}
        labelled = skipped = 0
        for frame in self.pending():
            if budget is not None and labelled >= budget:
                break
            scene_frame = frames.get(frame.get("source_ref"))
            label = label_for(scene_frame, items) if scene_frame else None
            body = {"action": "label", "label": label, "reviewer": "station-view"} if label else {"action": "skip"}
            self.api(f"/api/frames/{frame['id']}/review", body)
            labelled += bool(label)
            skipped += not label
        return labelled, skipped


def stable_count(review: Review, quiet_s: float = 3.0, timeout_s: float = 120.0) -> int:
    """The store's frame count once it stopped growing for ``quiet_s``."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = int(review.api("/api/stats")["frames"])
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return n
        time.sleep(0.3)
    return last


EMPTY_SCENE_INTERVAL_S = 0.5      # scene A plays in seconds to a minute: a few empty scenes a second at most


def retrain(args, work: Path, reviewed: Path, backgrounds: Path | None = None) -> tuple[Path, dict, int]:
    """``trainer retrain`` from the current bundle (its station views drawn on ``backgrounds`` too, when given);
    returns (new bundle, gate report, exit code)."""
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    version = f"{manifest['version']}-sv-{args.scenes[0]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    report = work / "retrain-report.json"
    cmd = [sys.executable, "-m", "trainer", "retrain", "--base-data", str(args.base_data), "--reviewed", str(reviewed),
           "--current", str(args.bundle), "--finetune-from-current", "--report", str(report),
           "--models-dir", str(args.models_dir), "--version", version, "--tensorrt", "off", "--workers", "0",
           "--out-dir", str(work / "runs"), *(["--backgrounds", str(backgrounds)] if backgrounds else []),
           *shlex.split(args.retrain_args)]
    log.info("retraining: %s", " ".join(cmd))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (work / "retrain.log").write_text(done.stdout + done.stderr)
    if not report.exists():
        raise RuntimeError(f"trainer retrain wrote no report (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return Path(args.models_dir) / manifest["name"] / version, json.loads(report.read_text()), done.returncode


def measured_scene(args, scenes_root: Path) -> tuple[Path, int, int]:
    """Where scene B renders, its seed and its item count.

    The same scene twice is one station: B is then another draw (``--seed + 1`` unless
    ``--measure-seed`` says) that skips A's items, in a folder of its own so it never overwrites A's frames.
    """
    scene_a, scene_b = args.scenes
    same_station = scene_a == scene_b
    seed = args.measure_seed if args.measure_seed is not None else args.seed + (1 if same_station else 0)
    return (scenes_root / "measure" if same_station else scenes_root), seed, args.measure_items or args.items


def run_loop(args, scenes_root: Path) -> dict[str, Any]:
    """Scene A with uploads -> ingest -> review from truth -> retrain -> scene B before and after."""
    if len(args.scenes) != 2:
        raise SystemExit("--loop needs two scenes: --scenes A B (A teaches, B measures)")
    scene_a, scene_b = args.scenes
    truth_a = ensure_scene(scene_a, scenes_root, args.items, args.seed)
    root_b, seed_b, items_b = measured_scene(args, scenes_root)
    same_station = scene_a == scene_b
    truth_b = ensure_scene(scene_b, root_b, items_b, seed_b,
                           exclude=[item["test_index"] for item in truth_a["items"]] if same_station else ())
    uploads: dict[str, Any] = {"frames": {"enabled": True, "min_interval_s": 0.0}}
    if args.station_backgrounds:          # the station's empty scenes, on its schedule, for the retrain to draw on
        uploads["frames"]["empty_scene_interval_s"] = EMPTY_SCENE_INTERVAL_S
    with tempfile.TemporaryDirectory(prefix="station-view-loop-") as tmp, mosquitto(Path(tmp)) as port:
        work = Path(tmp)
        services = start_services(work, port, args.bundle)
        try:
            review = services[2]
            on_a = measure(truth_a, scenes_root / scene_a, args.bundle, args.set, port, uploads)
            stored = stable_count(review)
            labelled, skipped = review.label_from_truth(truth_a, args.label_budget or None)
        finally:
            for service in services[:2]:
                service.stop()
        export = subprocess.run([sys.executable, "-m", "central", "labels", "export", "--store", str(work / "frames"),
                                 "--out", str(work / "reviewed")], cwd=REPO, capture_output=True, text=True)
        if export.returncode != 0:
            raise RuntimeError(f"central labels export failed:\n{export.stderr[-3000:]}")
        backgrounds = station_backgrounds(work, args.station_backgrounds) if args.station_backgrounds else None
        scenes = json.loads((backgrounds / "backgrounds.json").read_text())["images"] if backgrounds else None
        new_bundle, gate, rc = retrain(args, work, work / "reviewed", backgrounds)
        split = reviewed_split(gate)            # the split file lives in this temporary folder
        before = measure(truth_b, root_b / scene_b, args.bundle, args.set, port)
        after = measure(truth_b, root_b / scene_b, new_bundle, args.set, port)
    # uploaded_last_stats: frames_uploaded of the agent's last stats on scene A, the final one it sends at a clean
    # stop (after its cameras and inference stopped), so it counts every upload of the run. Results written before
    # 2026-12-07 took the last periodic stats instead, which could predate the scene's end and undercount.
    return {"benchmark": "station_view_loop", "teach_scene": scene_a, "measure_scene": scene_b,
            "uploads": {"uploaded_last_stats": on_a["agent"]["frames_uploaded_last_stats"], "stored": stored,
                        "labelled": labelled, "skipped": skipped,
                        "backgrounds": scenes},
            "retrain": {"exit_code": rc, "promoted": gate.get("promoted"), "reasons": gate.get("reasons"),
                        "bundle": str(new_bundle), "reviewed_split": split},
            "teach": on_a, "before": before, "after": after,
            "clean_test": clean_test(args.clean_test, args.bundle, new_bundle, after,
                                     [item["test_index"] for item in truth_a["items"]]) if args.clean_test else None}


def clean_test(data: Path, current: Path, candidate: Path, after: dict, teach: Sequence[int] = ()) -> dict[str, Any]:
    """Both bundles' top-1 on the clean test split (the INT8 model where deployable, with the station's
    preprocessing, as ``trainer retrain`` evaluates), against the new bundle's item accuracy on scene B: the
    camera should cost it at most a point. ``teach``: the test indices scene A showed (the candidate trained on
    their frames), left out, as ``import-fashion-mnist`` names them (``test_<index>.png``); before 2026-12-06
    they were scored too, which flattered the candidate's clean top-1 by at most their share of the split."""
    from contract.bundle import load_bundle
    from trainer.data import load_dataset
    from trainer.retrain import Item, evaluate_bundle

    dataset = load_dataset(data)
    taught = {f"test_{int(i):05d}" for i in teach}
    items = [Item(s.path, dataset.classes[s.label], "holdout") for s in dataset.samples
             if Path(s.path).stem not in taught]
    out: dict[str, Any] = {"data": str(data), "images": len(items),
                           "left_out_as_taught": len(dataset.samples) - len(items)}
    for who, path in (("before", current), ("after", candidate)):
        if not (path / "manifest.json").is_file():
            continue                # a rejected candidate that the retrain did not keep
        bundle = load_bundle(path)
        ev = evaluate_bundle(bundle, items, dataset.classes, prefer_int8=True, workers=0)
        out[who] = {"artifact": ev.artifact, "top1": round(ev.score.top1, 4)}
    if "after" in out:
        scene_b = after["items"]["item_accuracy"]
        out["scene_b_after"] = scene_b
        out["gap_points"] = round((out["after"]["top1"] - scene_b) * 100, 2)
        out["within_1_point"] = out["gap_points"] <= 1.0
    return out


def station_backgrounds(work: Path, per_camera: int) -> Path:
    """The empty scenes the station sent during scene A, as ``central backgrounds export`` writes them."""
    out = work / "backgrounds"
    done = subprocess.run([sys.executable, "-m", "central", "backgrounds", "export", "--store", str(work / "frames"),
                           "--out", str(out), "--per-camera", str(per_camera)], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"central backgrounds export failed:\n{done.stderr[-3000:]}")
    return out


def reviewed_split(gate: dict) -> dict[str, Any]:
    """How the retrain split the labelled frames: frames and items each side, and what the split file shows:
    frames without a track, and items (tracks) with frames on both sides (0 when the split is by item)."""
    data = (gate.get("data") or {}).get("reviewed") or {}
    out = {k: data.get(k) for k in ("split_by", "frames", "items", "train", "train_items", "holdout",
                                    "holdout_items")}
    path = Path(data.get("split_file") or "/nonexistent")
    if path.is_file():
        split = json.loads(path.read_text())
        tracks = {side: {row.get("track") for row in split[side]} - {None, ""} for side in ("train", "holdout")}
        out["frames_without_track"] = sum(not row.get("track") for side in ("train", "holdout") for row in split[side])
        out["items_on_both_sides"] = len(tracks["train"] & tracks["holdout"])
    return out


def start_services(work: Path, port: int, bundle: Path) -> tuple[Service, Service, Review]:
    """``central ingest`` on the broker and ``central review`` on a free port, both ready."""
    from benchmarks.station_view import free_port

    store = work / "frames"
    ingest = Service(work, "ingest", "ingest", "--store", str(store), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(port),
                     "--client-id", "station-view-ingest")
    http_port = free_port()
    token = "station-view-review-token"
    (work / "review.token").write_text(token + "\n")
    server = Service(work, "review", "review", "--store", str(store), "--labels-from", str(bundle),
                     "--host", "127.0.0.1", "--port", str(http_port), "--token-file", str(work / "review.token"))
    review = Review(f"http://127.0.0.1:{http_port}", token)
    wait_until("the review server", lambda: server.check() or review.up(), 60)
    wait_until("the ingest service", lambda: ingest.check() or "ingest: storing frames" in ingest.log(), 60)
    return ingest, server, review
