"""Reviewed frames -> a dataset: the trainer reads the export as it is (CSV with provenance, or the class folders),
and a real training run on it learns the classes reviewers gave, new ones included."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import datetime

import pytest
from loop_support import LABELS, REPO, real_frames, truth_of

from central.review import labels as dataset_mod
from central.review.labels import COLUMNS, export_reviewed
from central.review.store import FrameStore, StoreError
from trainer.data import load_dataset, read_csv


@pytest.fixture
def reviewed_store(tmp_path):
    """20 real frames from two stations: labelled, a new class, defects with and without a class, skipped, pending."""
    store = FrameStore(tmp_path / "store", labels=LABELS)
    records = real_frames(14) + real_frames(6, station="qc-02", camera="belt", version="2", start=14)
    for r in records:
        store.add(r.body, r.blob)
    for r in records[:12]:
        store.review(r.id, "label", label=truth_of(r), reviewer="ana",
                     note="checked twice" if r is records[0] else None)
    for r in records[12:15]:
        store.review(r.id, "new_class", label="Scarf/shawl", reviewer="bo")
    store.review(records[15].id, "defect", label="torn", reviewer="bo", note="seam open")
    store.review(records[16].id, "defect", reviewer="bo")        # no defect class: nothing to learn it as
    store.review(records[17].id, "skip", reviewer="ana")
    yield store, records                                          # 18, 19: still pending
    store.close()


def rows(csv_path):
    with open(csv_path, newline="") as fh:
        return {row["frame_id"]: row for row in csv.DictReader(fh)}


def test_the_export_carries_each_frames_label_and_provenance(reviewed_store, tmp_path):
    store, records = reviewed_store
    summary = export_reviewed(store, tmp_path / "reviewed")
    assert summary["frames"] == 16
    assert summary["left_out"] == {"skipped": 1, "defect without a class": 1}        # pending frames are not reviewed
    assert summary["by_label"]["Scarf/shawl"] == 3 and summary["by_label"]["torn"] == 1

    by_id = rows(tmp_path / "reviewed" / "reviewed.csv")
    assert list(next(iter(by_id.values()))) == COLUMNS
    assert set(by_id) == {r.id for r in records[:16]}
    for r in records[:12]:
        assert by_id[r.id]["label"] == truth_of(r) and by_id[r.id]["status"] == "labelled"
    assert {by_id[r.id]["label"] for r in records[12:15]} == {"Scarf/shawl"}
    assert by_id[records[15].id]["label"] == "torn" and by_id[records[15].id]["note"] == "seam open"

    first, belt = by_id[records[0].id], by_id[records[15].id]
    stored = store.get(records[0].id)
    assert (first["site"], first["station"], first["camera"]) == ("ber1", "receiving-01", "dock-a")
    assert (belt["station"], belt["camera"], belt["model_version"]) == ("qc-02", "belt", "2")
    assert first["model_name"] == "fashion-mnist" and first["model_version"] == "1"
    assert first["predicted"] == records[0].body["label"] != first["label"]     # the model was wrong: why we label
    assert float(first["confidence"]) == pytest.approx(records[0].body["confidence"])
    assert first["selected_because"] == records[0].body["selected_because"][0]
    assert first["reviewer"] == "ana" and first["note"] == "checked twice" and belt["reviewer"] == "bo"
    assert datetime.fromisoformat(first["reviewed_at"].replace("Z", "+00:00")).timestamp() == \
        pytest.approx(stored["reviewed_at"], abs=0.002)
    assert datetime.fromisoformat(first["captured_at"].replace("Z", "+00:00")).timestamp() == \
        pytest.approx(records[0].body["captured_at"], abs=0.002)
    assert first["sha256"] == stored["sha256"]
    image = tmp_path / "reviewed" / first["path"]
    assert image.read_bytes() == records[0].blob and image.parent.name != "T-shirt/top"

    report = json.loads((tmp_path / "reviewed" / "export.json").read_text())
    assert report["frames"] == 16 and report["store"] == str(store.root.resolve())


def test_the_export_names_the_item_each_frame_shows(tmp_path):
    # given: frames of two items as a station names them (frame.v1 track), and one from an older agent (no track)
    store = FrameStore(tmp_path / "store", labels=LABELS)
    first, second = "6f1c0f8e-1d2b-4c3a-9e8f-0a1b2c3d4e5f", "0d9e8f7a-6b5c-4d3e-8f1a-2b3c4d5e6f7a"
    tracks = [first, first, second, None]
    records = real_frames(len(tracks))
    for r, track in zip(records, tracks):
        body = {**r.body, **({"track": track} if track is not None else {})}
        store.add(body, r.blob)
        store.review(r.id, "label", label=truth_of(r), reviewer="ana")
    export_reviewed(store, tmp_path / "reviewed")
    store.close()
    # then: the track column names each frame's item, empty where the station named none
    by_id = rows(tmp_path / "reviewed" / "reviewed.csv")
    assert [by_id[r.id]["track"] for r in records] == [first, first, second, ""]


def test_the_trainer_reads_the_export_as_csv_and_as_class_folders(reviewed_store, tmp_path):
    store, records = reviewed_store
    export_reviewed(store, tmp_path / "reviewed")
    expected = sorted((f"{r.id}.jpg", truth_of(r)) for r in records[:12]) + \
        [(f"{r.id}.jpg", "Scarf/shawl") for r in records[12:15]] + [(f"{records[15].id}.jpg", "torn")]
    as_csv = load_dataset(tmp_path / "reviewed" / "reviewed.csv")      # path,label; provenance columns ignored
    assert sorted((s.path.name, as_csv.classes[s.label]) for s in as_csv.samples) == sorted(expected)
    as_folders = load_dataset(tmp_path / "reviewed")                  # class folders + labels.json
    assert sorted((s.path.name, as_folders.classes[s.label]) for s in as_folders.samples) == sorted(expected)
    # a class name with a slash became a folder name; labels.json maps it back
    folders = json.loads((tmp_path / "reviewed" / "labels.json").read_text())
    assert folders["Scarf_shawl"] == "Scarf/shawl" and (tmp_path / "reviewed" / "Scarf_shawl").is_dir()
    assert read_csv(tmp_path / "reviewed" / "reviewed.csv").classes == as_csv.classes


def test_a_real_training_run_reads_the_export(reviewed_store, tmp_path):
    """``python -m trainer train --data <out>/reviewed.csv``: tiny (32 px, one short epoch), but the real trainer."""
    store, _ = reviewed_store
    export_reviewed(store, tmp_path / "reviewed")
    run = subprocess.run([sys.executable, "-m", "trainer", "train",
                          "--data", str(tmp_path / "reviewed" / "reviewed.csv"),
                          "--out-dir", str(tmp_path / "runs"), "--name", "from-reviewed", "--arch", "mobilenet_v2",
                          "--image-size", "32", "--resize-shorter", "32", "--epochs", "1", "--batch-size", "8",
                          "--workers", "0", "--val-fraction", "0.2", "--max-steps-per-epoch", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run_dir = tmp_path / "runs" / "from-reviewed"
    assert (run_dir / "best.pt").is_file()
    import torch

    classes = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)["classes"]
    assert "Scarf/shawl" in classes and "torn" in classes


def test_an_export_never_leaves_half_a_dataset(reviewed_store, tmp_path, monkeypatch):
    store, records = reviewed_store
    out = tmp_path / "reviewed"
    export_reviewed(store, out)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(StoreError, match="already exists .*--force"):
        export_reviewed(store, out)
    store.review(records[18].id, "label", label=truth_of(records[18]), reviewer="ana")

    def broken(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataset_mod.json, "dumps", broken)        # fails after the images and the CSV are written
    with pytest.raises(StoreError, match="could not be written .*No space left.*earlier export is kept"):
        export_reviewed(store, out, force=True)
    monkeypatch.undo()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before      # the old export, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".reviewed")] == []  # no leftovers
    assert export_reviewed(store, out, force=True)["frames"] == 17
    assert records[18].id in rows(out / "reviewed.csv")


def test_the_labels_cli(reviewed_store, tmp_path):
    store, _ = reviewed_store
    cli = [sys.executable, "-m", "central", "labels", "export"]
    done = subprocess.run(cli + ["--store", str(store.root), "--out", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exported 16 reviewed frames" in done.stdout and "'skipped': 1" in done.stdout
    assert len(rows(tmp_path / "out" / "reviewed.csv")) == 16
    again = subprocess.run(cli + ["--store", str(store.root), "--out", str(tmp_path / "out")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
    (tmp_path / "empty").mkdir()
    wrong = subprocess.run(cli + ["--store", str(tmp_path / "empty"), "--out", str(tmp_path / "out2")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "--store" in wrong.stderr and "not a frame store" in wrong.stderr
    assert not (tmp_path / "empty" / "frames.sqlite").exists() and not (tmp_path / "out2").exists()
