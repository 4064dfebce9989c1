"""Stations' empty scenes -> a backgrounds folder: what ``central backgrounds export`` writes is what
``trainer train --backgrounds`` draws items on (the real folder reader and a real, tiny training run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from loop_support import REPO, empty_scene_records, real_frames

from central.cli import main
from central.review.backgrounds import export_backgrounds
from central.review.store import FrameStore, StoreError
from trainer.backgrounds import folder_tiles
from trainer.retrain import RetrainError, backgrounds_info


@pytest.fixture
def scene_store(tmp_path):
    """Empty scenes of three cameras at two stations, beside low-confidence frames under review."""
    store = FrameStore(tmp_path / "store")
    records = (empty_scene_records(4) + empty_scene_records(3, camera="dock-b", start=4)
               + empty_scene_records(2, station="qc-02", camera="belt", start=7) + real_frames(3))
    for r in records:
        assert store.add(r.body, r.blob).outcome == "stored"
    yield store, records
    store.close()


def test_the_export_writes_every_scene_and_the_trainer_reads_the_folder(scene_store, tmp_path):
    store, records = scene_store
    summary = export_backgrounds(store, tmp_path / "bg")
    files = sorted((tmp_path / "bg").rglob("*.jpg"))
    assert len(files) == summary["images"] == 9
    assert summary["by_camera"] == {"ber1/qc-02/belt": 2, "ber1/receiving-01/dock-a": 4,
                                    "ber1/receiving-01/dock-b": 3}
    by_id = {r.id: r.blob for r in records}
    assert all(f.read_bytes() == by_id[f.stem] for f in files)        # the JPEGs as the stations sent them
    assert json.loads((tmp_path / "bg" / "backgrounds.json").read_text())["images"] == 9
    tiles = folder_tiles(tmp_path / "bg", side=64, per_file=2, seed=0)
    assert tiles.shape == (18, 3, 64, 64)
    assert backgrounds_info(str(tmp_path / "bg"))["images"] == 9


def test_filters_and_the_newest_per_camera(scene_store, tmp_path):
    store, records = scene_store
    one = export_backgrounds(store, tmp_path / "one", station="receiving-01", camera="dock-b")
    assert one["by_camera"] == {"ber1/receiving-01/dock-b": 3}
    newest = export_backgrounds(store, tmp_path / "newest", per_camera=1)
    assert sorted(p.stem for p in (tmp_path / "newest").rglob("*.jpg")) == sorted(
        [records[3].id, records[6].id, records[8].id])
    assert newest["images"] == 3
    with pytest.raises(StoreError, match="no empty scenes stored for {'station': 'nowhere'}"):
        export_backgrounds(store, tmp_path / "none", station="nowhere")
    with pytest.raises(StoreError, match="already exists"):
        export_backgrounds(store, tmp_path / "one")
    assert not (tmp_path / "none").exists()


def test_an_out_folder_is_never_the_store_nor_a_folder_that_is_not_an_export(scene_store, tmp_path):
    """``--force`` replaces an earlier export or an empty folder; never the store, a folder holding it or one
    inside it, nor a folder of other files (the labels export follows the same rule)."""
    from central.review.labels import export_reviewed

    store, records = scene_store
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for export, summary in ((export_backgrounds, "backgrounds.json"), (export_reviewed, "export.json")):
        for out in (store.root, store.root.parent, store.root / "images", tmp_path / "store" / "new"):
            with pytest.raises(StoreError, match="is, holds or lies inside the frame store"):
                export(store, out, force=True)
        with pytest.raises(StoreError, match=f"is not an earlier export \\(no {summary} in it\\)"):
            export(store, mine, force=True)
        (tmp_path / f"empty-{summary}").mkdir()
        export(store, tmp_path / f"empty-{summary}", force=True)
        export(store, tmp_path / f"empty-{summary}", force=True)         # an earlier export: replaced
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert len(store.list_empty_scenes()) == 9 and store.list()[1] == 3
    assert all((store.root / s["image"]).is_file() for s in store.list_empty_scenes())


def test_the_backgrounds_cli(scene_store, tmp_path, capsys):
    store, _ = scene_store
    out = tmp_path / "bg"
    assert main(["backgrounds", "export", "--store", str(store.root), "--out", str(out), "--station",
                 "receiving-01"]) == 0
    assert "exported 7 empty scenes" in capsys.readouterr().out
    assert main(["backgrounds", "export", "--store", str(store.root), "--out", str(out)]) == 2
    assert main(["backgrounds", "export", "--store", str(store.root), "--out", str(out), "--force"]) == 0
    assert len(list(out.rglob("*.jpg"))) == 9
    assert main(["backgrounds", "export", "--store", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrainError, match="no .* images in it"):
        backgrounds_info(str(tmp_path / "empty"))
    with pytest.raises(RetrainError, match="not a folder"):
        backgrounds_info(str(tmp_path / "missing"))


def test_train_draws_on_the_exported_backgrounds(scene_store, fmnist_dir, tmp_path):
    """``python -m trainer train --backgrounds <export>``: tiny (32 px, two steps), but the real trainer."""
    store, _ = scene_store
    export_backgrounds(store, tmp_path / "bg")
    run = subprocess.run([sys.executable, "-m", "trainer", "train", "--data", str(fmnist_dir / "train"),
                          "--backgrounds", str(tmp_path / "bg"), "--station-view-share", "1.0",
                          "--limit-per-class", "4", "--out-dir", str(tmp_path / "runs"), "--name", "bg",
                          "--arch", "mobilenet_v2", "--weights", "none", "--image-size", "32",
                          "--resize-shorter", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                          "--val-fraction", "0.25", "--max-steps-per-epoch", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    config = json.loads((tmp_path / "runs" / "bg" / "config.json").read_text())
    assert config["augment"]["station_view"]["backgrounds"] == str(tmp_path / "bg")
    assert f"crops from 9 frames in {tmp_path / 'bg'}" in run.stdout + run.stderr


def _grown(store: FrameStore, n: int, *, ref_chars: int = 4000) -> None:
    """``n`` more scenes of the store's first one (its image, a later capture each, a long source_ref), copied in
    SQL: a store of thousands of empty scenes without thousands of fsync'd writes."""
    cols = [r[1] for r in store._db.execute("PRAGMA table_info(empty_scenes)")]
    values = ", ".join({"id": "s.id || '-copy-' || n.i", "source_ref": f"printf('%.{ref_chars}c', 'x')",
                        "captured_at": "s.captured_at + 100 + n.i"}.get(c, f"s.{c}") for c in cols)
    first = store._db.execute("SELECT id FROM empty_scenes ORDER BY captured_at, id LIMIT 1").fetchone()[0]
    store._db.execute(f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) "
                      f"INSERT INTO empty_scenes({', '.join(cols)}) SELECT {values} FROM empty_scenes AS s, n "
                      f"WHERE s.id = ?", (first,))


def test_the_export_holds_a_page_of_scenes_not_all_of_them(scene_store, tmp_path, monkeypatch):
    """1,000 stored scenes whose rows hold 40 kB each (40 MB in all): the export reads them 8 at a time, so it
    holds about 1 MB of them at once (it held every row at once: a peak of 46 MB), and it still writes every
    scene. The bound, half the rows, leaves room for what else allocates meanwhile (pathlib interns every file
    name, and its table grows by megabytes at a time in a long test session)."""
    import tracemalloc

    import central.review.store as store_module

    monkeypatch.setattr(store_module, "EMPTY_SCENES_PAGE", 8)
    store, records = scene_store
    _grown(store, 1000, ref_chars=40_000)
    tracemalloc.start()
    try:
        summary = export_backgrounds(store, tmp_path / "bg")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["images"] == 1009 and summary["by_camera"]["ber1/receiving-01/dock-a"] == 1004
    assert len(list((tmp_path / "bg").rglob("*.jpg"))) == 1009
    assert peak < 1000 * 40_000 / 2, f"peak {peak} bytes while exporting 1000 scenes of 40 kB"
    newest = export_backgrounds(store, tmp_path / "newest", per_camera=2)      # the newest, chosen in the query
    assert sorted(p.stem for p in (tmp_path / "newest" / "ber1" / "receiving-01" / "dock-a").glob("*.jpg")) == [
        f"{records[0].id}-copy-1000", f"{records[0].id}-copy-999"]
    assert newest["by_camera"] == {"ber1/qc-02/belt": 2, "ber1/receiving-01/dock-a": 2, "ber1/receiving-01/dock-b": 2}


def test_scene_ids_that_share_a_folder_name_are_both_exported(tmp_path):
    """``scene:1`` and ``scene_1`` of one camera: two files in the export (one replaced the other before)."""
    store = FrameStore(tmp_path / "store")
    a, b = empty_scene_records(2)
    assert store.add({**a.body, "id": "scene:1"}, a.blob).outcome == "stored"
    assert store.add({**b.body, "id": "scene_1"}, b.blob).outcome == "stored"
    summary = export_backgrounds(store, tmp_path / "bg")
    files = sorted(p.read_bytes() for p in (tmp_path / "bg").rglob("*.jpg"))
    assert summary["images"] == 2 and files == sorted([a.blob, b.blob])
    store.close()
