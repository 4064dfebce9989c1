"""The whole loop through real components, as the issue asks for it (must-show 1).

A station (the real agent process) runs a real model that is weak on one class: it was trained
with only three "Trouser" images. Its camera shows real, unseen Fashion-MNIST items, many of
them trousers; its low-confidence frames go over MQTT (a real mosquitto) to the real ingest
service, are labelled through the review server's HTTP API with their ground truth, exported as
a dataset, and the next version is trained from the base data plus those frames
(``python -m trainer retrain``), passes the gate, is published and served over HTTP, and rolled
out by MQTT (``python -m central rollout``). The station reports the new version in its status,
and accuracy on that class's held-out images rises, measured two ways: both bundles evaluated
on the same held-out images of the class, and the station's own results on a second camera
that shows held-out trousers before and after the switch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rollout_support import (  # noqa: F401
    REPO,
    WEAK_CLASS,
    Recorder,
    Station,
    class_recall,
    cli,
    wait_online,
    wait_until,
    weak_base,
)

from central.rollout import validate_event

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]

DOCK_OTHERS = ("Pullover", "T-shirt/top", "Dress", "Bag", "Sneaker")


def camera_folder(folder: Path, images: list[tuple[Path, str]]) -> dict[str, str]:
    """A folder camera of real images under neutral names; returns file name -> ground-truth label."""
    folder.mkdir(parents=True)
    truth = {}
    for i, (image, label) in enumerate(images):
        name = f"{folder.name}_{i:04d}{image.suffix}"
        (folder / name).symlink_to(image)
        truth[name] = label
    return truth


class Service:
    """A ``python -m central ...`` service process with its log."""

    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "central", *args], cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        assert self.proc.poll() is None, f"{self.log_path.name} exited:\n{self.log()[-3000:]}"
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def live_accuracy(recorder: Recorder, camera: str, version: str, truth: dict[str, str]) -> tuple[int, int]:
    """Correct and total results of one camera on one model version, from the station's result messages."""
    correct = total = 0
    for message in recorder.of("/result"):
        body = message.json()
        if body["camera"] == camera and body["model"]["version"] == version and body.get("source_ref") in truth:
            total += 1
            correct += body["label"] == truth[body["source_ref"]]
    return correct, total


@pytest.fixture(scope="module")
def weak(fmnist_dir, tmp_path_factory):
    return weak_base(fmnist_dir, tmp_path_factory.mktemp("weak"))


def test_low_confidence_frames_to_a_better_model_on_the_station(weak, broker, tmp_path):
    started = time.monotonic()
    port = str(broker.port)
    mqtt = ["--mqtt-host", "127.0.0.1", "--mqtt-port", port]
    names = json.loads((weak.holdout / "labels.json").read_text())
    weak_folder = next(k for k, v in names.items() if v == WEAK_CLASS)
    # The dock camera shows unseen items, most of them of the weak class; the check camera shows held-out
    # trousers (test split, never trained on by either version) to measure the station's own results.
    dock = camera_folder(tmp_path / "dock", [(p, WEAK_CLASS) for p in weak.pool[WEAK_CLASS][:60]]
                         + [(p, c) for c in DOCK_OTHERS for p in weak.pool[c][:4]])
    check = camera_folder(tmp_path / "check", [(p, WEAK_CLASS) for p in sorted((weak.holdout / weak_folder).glob("*.png"))])

    served = tmp_path / "served"
    assert cli("publish", str(weak.bundle), "--root", str(served), "--baseline").returncode == 0
    recorder = Recorder(broker.port, ["inventory/#"])
    services: list = []
    station = None
    try:
        loop = LoopCore(tmp_path, broker.port, weak.bundle)
        services += loop.services
        bundles = Service(tmp_path, "serve-bundles", "serve-bundles", "--root", str(served), "--host", "127.0.0.1",
                          "--port", str(free_port := _free_port()))
        services.append(bundles)
        base_url = f"http://127.0.0.1:{free_port}/"
        wait_until(lambda: bundles.alive() and _http_ok(base_url + "fmnist/1/manifest.json"), 60, "the bundle server")

        station = Station(tmp_path / "stations", weak.bundle, tmp_path / "dock", broker.port, site="ber1",
                          station="receiving-01", fps=12.0,
                          cameras={"dock": tmp_path / "dock", "check": tmp_path / "check"},
                          frames={"min_interval_s": 0.0, "dedupe_bits": 0, "dedupe_window": 512},
                          health={"stats_interval_s": 0.5})
        wait_online(recorder, station, "1")

        # 1. one pass of both cameras on version 1; every frame the station uploaded is in the store (uploads
        #    stop after one pass: the dedupe window holds every image), and a reviewer labels the dock's frames
        #    through the HTTP API with their ground truth; the check camera's are skipped (held out)
        wait_until(lambda: _enough(live_accuracy(recorder, "dock", "1", dock), len(dock)), 120,
                   "one pass of the dock camera on version 1")
        before_live = wait_until(lambda: _enough(live_accuracy(recorder, "check", "1", check), len(check)), 120,
                                 "the station's results on the check camera with version 1")
        passed_at = time.monotonic()
        uploaded = wait_until(lambda: _all_stored(recorder, station.key, passed_at, loop), 120,
                              "every uploaded frame in the store")
        labelled, skipped = loop.label_all(lambda f: dock.get(f["source_ref"]) if f["camera"] == "dock" else None)
        reviewed = loop.export(tmp_path / "reviewed")
        frames = loop.frames()
        weak_frames = sum(1 for f in frames if f["camera"] == "dock" and dock[f["source_ref"]] == WEAK_CLASS)
        assert labelled == sum(f["camera"] == "dock" for f in frames) and skipped == len(frames) - labelled
        # What the station must upload: frames it flagged as low confidence, each image once. How many of the
        # weak class get flagged depends on the weak model's arithmetic on this CPU (25-40 seen), so only a
        # floor well under that is asserted; the retrain below must still lift the class.
        flagged = _flagged(recorder, "1")
        refs = [(f["camera"], f["source_ref"]) for f in frames]
        assert set(refs) <= flagged and len(set(refs)) == len(refs)
        assert weak_frames >= 10 and labelled > weak_frames       # many of the weak class, some others

        # 2. the next version, trained from base + reviewed frames, gated. Head only (--freeze-epochs = --epochs):
        #    a full fine-tune of 250 images moved overall top-1 by -11 to +11 points between runs and CPUs, so the
        #    gate's verdict was luck; retraining the classifier on kept features lifts the weak class every time.
        report = tmp_path / "reports" / "fmnist-2.json"
        done = cli("retrain", "--base-data", str(weak.base), "--reviewed", str(reviewed),
                           "--current", str(weak.bundle), "--finetune-from-current", "--holdout", str(weak.holdout),
                           "--epochs", "2", "--freeze-epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--workers", "0",
                           "--out-dir", str(tmp_path / "runs"), "--models-dir", str(tmp_path / "models"), "--version", "2",
                           "--calibration-images", "64", "--parity-images", "32", "--tensorrt", "off",
                           "--report", str(report), *mqtt)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        gate = json.loads(report.read_text())
        assert gate["promoted"] and gate["data"]["reviewed"]["frames"] == labelled

        # 3. published, served, rolled out by MQTT; the station reports the new version
        published = cli("publish", str(tmp_path / "models" / "fmnist" / "2"), "--root", str(served),
                                "--base-url", base_url, *mqtt)
        assert published.returncode == 0, published.stderr
        # The canary's watch runs for real (frames counted, errors, a rise in the low-confidence rate), but
        # with a wide allowed rise: the two versions flag frames by their own suggested thresholds, version 2
        # depends on which frames the station happened to upload, and a 4 s watch sees ~100 frames of a
        # scene made mostly of the weak class; under load its rate rose by 14.5 points once. The rate rule
        # itself is tested in test_rollout.py.
        rolled = cli("rollout", "--bundle-url", base_url + "fmnist/2/", "--stations", station.key,
                             "--canary", station.key, "--watch-s", "4", "--baseline-s", "1", "--min-frames", "10",
                             "--max-low-conf-increase", "0.5",
                             "--update-timeout-s", "120", "--history", str(tmp_path / "history.json"), *mqtt)
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        status = recorder.status(station.key)
        assert status["state"] == "online" and status["model"]["version"] == "2"
        assert status["last_model_update"]["ok"] is True

        # 4. accuracy on the weak class's held-out images rises: both bundles, and the station itself
        [installed] = (station.folder / "downloads").glob("*/2")         # <name>/<version>
        recall_before, n = class_recall(weak.bundle, weak.holdout, WEAK_CLASS)
        recall_after, n_after = class_recall(installed, weak.holdout, WEAK_CLASS)
        after_live = wait_until(lambda: _enough(live_accuracy(recorder, "check", "2", check), len(check)), 120,
                                "the station's results on the check camera with version 2")
    finally:
        if station is not None:
            station.stop()
        for service in services:
            service.stop()
        recorder.close()

    events = recorder.events()
    for event in events:
        validate_event(event)
    assert [e["action"] for e in events] == ["gate", "publish", "canary", "canary", "rollout"]
    figures = {
        "weak class": WEAK_CLASS,
        "frames uploaded by the station / stored by ingest": f"{uploaded}/{len(frames)}",
        "labelled (dock camera)": labelled, "of which " + WEAK_CLASS: weak_frames,
        "skipped (check camera)": skipped,
        "gate": gate["reasons"],
        f"{WEAK_CLASS} recall, held-out images, version 1 -> 2": f"{recall_before:.1%} -> {recall_after:.1%} ({n} images)",
        "station results on held-out trousers, version 1 -> 2":
            f"{before_live[0]}/{before_live[1]} -> {after_live[0]}/{after_live[1]}",
        "overall top-1 (1000 held-out images), version 1 -> 2":
            f"{gate['figures']['overall']['current']['top1']:.1%} -> {gate['figures']['overall']['candidate']['top1']:.1%}",
        "test seconds": round(time.monotonic() - started),
    }
    print("\n" + report.with_suffix(".md").read_text())
    print("LOOP E2E FIGURES " + json.dumps(figures, indent=1))
    assert n == n_after > 50
    assert recall_after >= recall_before + 0.3, figures
    assert after_live[0] / after_live[1] >= before_live[0] / before_live[1] + 0.3, figures


def _flagged(recorder: Recorder, version: str) -> set[tuple[str, str]]:
    """(camera, source_ref) of every result the station flagged as low confidence on a model version."""
    return {(body["camera"], body["source_ref"]) for m in recorder.of("/result")
            if (body := m.json())["model"]["version"] == version and body["low_confidence"] and body.get("source_ref")}


def _free_port() -> int:
    from agent.demo import free_port

    return free_port()


def _http_ok(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _enough(counts: tuple[int, int], n: int) -> tuple[int, int] | None:
    return counts if counts[1] >= n else None


def _all_stored(recorder: Recorder, station: str, since: float, loop: "LoopCore") -> int | None:
    """The station's upload count (its stats, published after ``since``) once the store holds that many frames."""
    stats = [m for m in recorder.of(f"/{station}/stats") if m.at > since]
    if not stats:
        return None
    uploaded = stats[-1].json()["frames_uploaded"]
    return uploaded if uploaded and loop.api("/api/stats")["frames"] == uploaded else None


class LoopCore:
    """The central services of docs/loop.md as processes: ``central ingest`` and ``central review``; labels
    go through the review server's HTTP API, and ``central labels export`` writes the dataset."""

    def __init__(self, workdir: Path, mqtt_port: int, bundle: Path) -> None:
        self.store = workdir / "frames"
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.ingest = Service(workdir, "ingest", "ingest", "--store", str(self.store), "--mqtt-host", "127.0.0.1",
                              "--mqtt-port", str(mqtt_port), "--client-id", "e2e-ingest")
        self.token = "e2e-review-token"
        (workdir / "review.token").write_text(self.token + "\n")
        self.review = Service(workdir, "review", "review", "--store", str(self.store), "--labels-from", str(bundle),
                              "--host", "127.0.0.1", "--port", str(port), "--token-file", str(workdir / "review.token"))
        self.services = [self.ingest, self.review]
        wait_until(lambda: self.review.alive() and self.ingest.alive() and _http_ok(self.url + "/"), 60,
                   "the review server")
        wait_until(lambda: "ingest: storing frames" in self.ingest.log(), 60, "the ingest service")

    def api(self, path: str, body: dict | None = None) -> dict:
        import urllib.request

        request = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def frames(self, status: str | None = None) -> list[dict]:
        out, offset = [], 0
        while True:
            page = self.api(f"/api/frames?limit=500&offset={offset}" + (f"&status={status}" if status else ""))
            out += page["frames"]
            offset += len(page["frames"])
            if not page["frames"] or offset >= page["total"]:
                return out

    def label_all(self, truth) -> tuple[int, int]:
        """Every pending frame: its ground truth as the label, or skipped where ``truth`` gives None."""
        labelled = skipped = 0
        for frame in self.frames("pending"):
            label = truth(frame)
            action = {"action": "label", "label": label, "reviewer": "e2e"} if label else {"action": "skip"}
            done = self.api(f"/api/frames/{frame['id']}/review", action)
            assert done["status"] == ("labelled" if label else "skipped"), done
            labelled += bool(label)
            skipped += not label
        return labelled, skipped

    def export(self, out: Path) -> Path:
        done = cli("labels", "export", "--store", str(self.store), "--out", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        return out

