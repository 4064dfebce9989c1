"""Commands that only read the frame store open it read-only (``FrameStore.open_read_only``), as ``labels export``
does: ``backgrounds export`` and ``quarantine`` run on a store folder they cannot write (another user's, a read-only
mount, a backup) and change no file in it.

Until 2026-12-07 both opened the store for writing (create, migrate, reconcile) and stopped on such a folder: "the
frame store cannot be opened (OperationalError: attempt to write a readonly database)"
(/tmp/enrol-lock/repro_read_only.py). A real store of real empty scenes and a quarantined message, the real CLI in a
subprocess; as root a folder's mode binds only without CAP_DAC_OVERRIDE (``setpriv``)."""

from __future__ import annotations

import json

import pytest
from loop_support import empty_scene_records
from test_review_followups import central, snapshot, without_dac_override

from central.review.backgrounds import SUMMARY
from central.review.store import FrameStore


@pytest.fixture
def read_only_store(tmp_path):
    """A store of three empty scenes and one quarantined message, its folders made read-only for the test."""
    root = tmp_path / "store"
    store = FrameStore(root)
    for record in empty_scene_records(3):
        store.add(record.body, record.blob)
    store.quarantine("inventory/ber1/receiving-01/frames", b"not json", [("k", "v")], "payload: not JSON")
    store.close()
    folders = [root, *(p for p in root.rglob("*") if p.is_dir())]
    for folder in folders:
        folder.chmod(0o555)
    yield root
    for folder in folders:
        folder.chmod(0o755)


def test_a_backgrounds_export_from_a_store_folder_that_cannot_be_written_runs_and_changes_nothing(
        read_only_store, tmp_path):
    prefix = without_dac_override()
    before = snapshot(read_only_store)
    done = central(["backgrounds", "export", "--store", str(read_only_store), "--out", str(tmp_path / "bg")],
                   prefix=prefix)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exported 3 empty scenes" in done.stdout
    summary = json.loads((tmp_path / "bg" / SUMMARY).read_text())
    assert summary["images"] == 3 and summary["image_file_missing"] == 0
    assert len(list((tmp_path / "bg").rglob("*.jpg"))) == 3
    assert snapshot(read_only_store) == before


def test_the_quarantine_listing_from_a_store_folder_that_cannot_be_written_runs_and_changes_nothing(read_only_store):
    prefix = without_dac_override()
    before = snapshot(read_only_store)
    done = central(["quarantine", "--store", str(read_only_store)], prefix=prefix)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 frame message(s) refused, the newest 1 kept in quarantine" in done.stdout
    assert "payload: not JSON" in done.stdout
    done = central(["quarantine", "--store", str(read_only_store), "--json"], prefix=prefix)
    assert done.returncode == 0, done.stdout + done.stderr
    [entry] = [json.loads(line) for line in done.stdout.splitlines()]
    assert entry["reason"] == "payload: not JSON" and entry["properties"] == [["k", "v"]]
    assert snapshot(read_only_store) == before


@pytest.mark.parametrize("argv", [["backgrounds", "export", "--out", "{tmp}/bg"], ["quarantine"]])
def test_a_folder_that_is_no_store_is_refused_and_nothing_is_made_there(tmp_path, argv):
    missing = tmp_path / "nothing-here"
    done = central([*(a.format(tmp=tmp_path) for a in argv), "--store", str(missing)])
    assert done.returncode == 2 and f"--store {missing}: no frames.sqlite (not a frame store)" in done.stderr, \
        done.stderr
    assert not missing.exists() and not (tmp_path / "bg").exists()
