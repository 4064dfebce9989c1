"""FrameStore file names (review of 2026-12-07): every frame keeps its own image, whatever its id, and a store
written before the names changed is read as it was and never overwritten.

Ingest takes only UUID ids (frame.v1), so these ids reach the store through ``FrameStore.add`` directly (tests,
benchmarks, any future import); real frames, real JPEGs, a real store on disk."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest
from loop_support import LABELS, empty_scene_records, real_frames, with_context

from central.review.backgrounds import export_backgrounds
from central.review.store import FrameStore, StoreError, file_stem


def _add(store: FrameStore, record, frame_id: str, **fields) -> None:
    assert store.add({**record.body, "id": frame_id, **fields}, record.blob).outcome == "stored"


def _context_bytes(record) -> bytes:
    return base64.b64decode(record.body["context"]["roi_jpeg_b64"])


def test_ids_that_differ_only_in_a_replaced_character_keep_their_own_images(tmp_path):
    """``frame:1``, ``frame/1`` and ``frame_1`` made one file name, and ``y.context``'s image was ``y``'s context
    image: the later frame's JPEG replaced the earlier one's."""
    store = FrameStore(tmp_path / "s", labels=LABELS)
    frames = real_frames(5)
    ctx = with_context(real_frames(1, start=5)[0])
    scenes = empty_scene_records(2)
    ids = ["frame:1", "frame/1", "frame_1", "y.context"]
    for record, frame_id in zip(frames, ids):
        _add(store, record, frame_id)
    _add(store, ctx, "y")
    _add(store, scenes[0], "scene:1")
    _add(store, scenes[1], "scene_1")
    for record, frame_id in zip(frames, ids):
        assert store.image_path(frame_id).read_bytes() == record.blob, frame_id
    assert store.image_path("y").read_bytes() == ctx.blob
    assert store.context_path("y").read_bytes() == _context_bytes(ctx)
    by_id = {s["id"]: (store.root / s["image"]).read_bytes() for s in store.list_empty_scenes()}
    assert by_id == {"scene:1": scenes[0].blob, "scene_1": scenes[1].blob}
    named = [store.get(i)["image"] for i in [*ids, "y"]] + [store.get("y")["context_image"]]
    assert len(set(named)) == len(named)
    assert store.image_path("frame_1").name == "frame_1.jpg"     # a plain id (every UUID) names its file as it is
    store.close()
    again = FrameStore(tmp_path / "s", labels=LABELS)
    assert again.reconciled == {"orphan_images_removed": 0, "rows_without_image": 0}
    assert again.image_path("frame:1").read_bytes() == frames[0].blob
    again.close()


def test_a_stem_is_the_plain_id_or_a_hash_of_the_exact_id():
    uuid = "00000000-0000-4000-8000-000000000001"
    assert file_stem(uuid) == uuid
    stems = {file_stem(i) for i in ("frame:1", "frame/1", "frame_1", "Frame:1", "frame:1 ", "x" * 65, "x" * 66)}
    assert len(stems) == 7 and not any("." in s or "/" in s for s in stems)
    assert max(len(s.encode()) for s in stems) <= 64 + 17


def test_a_store_written_before_the_new_names_is_read_and_never_overwritten(tmp_path, monkeypatch):
    """A store holds ``frame:1`` as ``frame_1.jpg``, ``a.b`` as ``a.b.jpg`` and ``scene:1`` as ``scene_1.jpg`` (the
    old names): it opens with nothing removed or missing, serves and exports those images, and a new ``frame_1``
    or ``scene_1`` the same day takes another name instead of replacing the old frame's file."""
    real_gmtime = time.gmtime
    today = real_gmtime()
    monkeypatch.setattr(time, "gmtime", lambda secs=None: today if secs is None else real_gmtime(secs))
    old_frames, new_frames = real_frames(2), real_frames(1, start=2)
    old_scene, new_scene = empty_scene_records(2)
    store = FrameStore(tmp_path / "s", labels=LABELS)
    _add(store, old_frames[0], "frame:1")
    _add(store, old_frames[1], "a.b")
    _add(store, old_scene, "scene:1")
    for table, frame_id, old_name in (("frames", "frame:1", "frame_1.jpg"), ("frames", "a.b", "a.b.jpg"),
                                      ("empty_scenes", "scene:1", "scene_1.jpg")):
        rel = Path(store._db.execute(f"SELECT image FROM {table} WHERE id = ?", (frame_id,)).fetchone()[0])
        os.rename(store.root / rel, store.root / rel.with_name(old_name))
        store._db.execute(f"UPDATE {table} SET image = ? WHERE id = ?", (rel.with_name(old_name).as_posix(), frame_id))
    store.close()

    store = FrameStore(tmp_path / "s", labels=LABELS)
    assert store.reconciled == {"orphan_images_removed": 0, "rows_without_image": 0}
    assert store.image_path("frame:1").name == "frame_1.jpg"
    assert store.image_path("frame:1").read_bytes() == old_frames[0].blob
    assert store.image_path("a.b").read_bytes() == old_frames[1].blob
    _add(store, new_frames[0], "frame_1")
    _add(store, new_scene, "scene_1")
    assert store.image_path("frame:1").read_bytes() == old_frames[0].blob          # not replaced
    assert store.image_path("frame_1").read_bytes() == new_frames[0].blob
    assert store.image_path("frame_1").parent == store.image_path("frame:1").parent   # the same day's folder
    summary = export_backgrounds(store, tmp_path / "bg")
    exported = sorted(p.read_bytes() for p in (tmp_path / "bg").rglob("*.jpg"))
    assert summary["images"] == 2 and exported == sorted([old_scene.blob, new_scene.blob])
    store.close()


def test_a_name_taken_by_a_stored_frame_is_refused_never_replaced(tmp_path):
    """Both names of an id taken by stored frames' files (only a SHA-256 prefix collision could do it, so the test
    points a row at the name): the frame is refused with the reason and the stored file is kept."""
    store = FrameStore(tmp_path / "s", labels=LABELS)
    first, second = real_frames(2)
    _add(store, first, "frame:1")
    rel = Path(store.get("frame:1")["image"]).with_name(f"{file_stem('frame:2')}.jpg")
    os.rename(store.image_path("frame:1"), store.root / rel)
    store._db.execute("UPDATE frames SET image = ? WHERE id = 'frame:1'", (rel.as_posix(),))
    with pytest.raises(StoreError, match="frame frame:2: its image file .* already holds another frame's image"):
        store.add({**second.body, "id": "frame:2"}, second.blob)
    assert (store.root / rel).read_bytes() == first.blob
    assert store.list()[1] == 1 and store.used_bytes() == len(first.blob)
    store.close()


def test_names_longer_than_a_file_system_takes_are_stored(tmp_path):
    """The store takes a site of 256 characters and an id of 128 (its own checks); as a folder or file name
    that is more than 255 bytes, which failed with a raw OSError (ENAMETOOLONG), read by ingest as a disk failure."""
    store = FrameStore(tmp_path / "s", labels=LABELS)
    a, b = real_frames(2)
    [scene] = empty_scene_records(1)
    _add(store, a, "frame-long-site", site="s" * 256)
    _add(store, b, "é" * 128)
    _add(store, scene, "scene-long-camera", camera="摄" * 200)
    assert store.image_path("frame-long-site").read_bytes() == a.blob
    assert store.image_path("é" * 128).read_bytes() == b.blob
    [stored] = store.list_empty_scenes()
    assert stored["camera"] == "摄" * 200 and (store.root / stored["image"]).read_bytes() == scene.blob
    paths = [store.get("frame-long-site")["image"], store.get("é" * 128)["image"], stored["image"]]
    assert all(len(part.encode()) <= 255 for p in paths for part in Path(p).parts)
    store.close()


@pytest.mark.parametrize("damage", ["not a database", "damaged pages"])
def test_a_damaged_index_is_named_and_left_as_it_was(tmp_path, damage, caplog):
    """``frames.sqlite`` that is not a database, or whose pages a bad disk block overwrote: every command that opens
    the store said only ``sqlite3.DatabaseError`` (a traceback naming no file); now a StoreError names the file
    (the CLI: status 2 and the message) and the file is kept as it was."""
    from central.cli import main

    root = tmp_path / "store"
    root.mkdir()
    db = root / "frames.sqlite"
    if damage == "not a database":
        db.write_bytes(os.urandom(5000))
    else:
        store = FrameStore(root)
        for r in real_frames(30):
            store.add(r.body, r.blob)
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
        data = bytearray(db.read_bytes())
        data[4096:4096 * 4] = b"\x5a" * (4096 * 3)
        db.write_bytes(bytes(data))
    before = db.read_bytes()
    with pytest.raises(StoreError, match=f"{db}: not a readable frame store index"):
        FrameStore(root)
    assert main(["backgrounds", "export", "--store", str(root), "--out", str(tmp_path / "bg")]) == 2
    assert f"{db}: not a readable frame store index" in caplog.text
    assert db.read_bytes() == before


class CommitTraced:
    """The store's SQLite connection, its COMMITs recorded in ``events`` (an add's acknowledgement point)."""

    def __init__(self, db, events: list[tuple]) -> None:
        self._db, self._events = db, events

    def execute(self, sql, *args):
        if sql.strip().upper() == "COMMIT":
            self._events.append(("commit",))
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


def trace_durability(monkeypatch, store: FrameStore) -> list[tuple]:
    """``os.fsync`` (the path synced), ``os.replace`` and ``os.mkdir`` (the path made) and the store's commits, in
    order (as tests/trainer/trainer_support.py traces fsync and rename; a power cut cannot be simulated here)."""
    events: list[tuple] = []
    real_fsync, real_replace, real_mkdir = os.fsync, os.replace, os.mkdir

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        events.append(("replace", str(dst)))

    def mkdir(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        events.append(("mkdir", str(path)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "mkdir", mkdir)
    store._db = CommitTraced(store._db, events)
    return events


def unsynced(events: list[tuple]) -> list[str]:
    """Each new folder entry (a rename's target, a folder made) whose folder was not fsynced after it and before
    the next commit: what a power cut after the acknowledgement could lose."""
    lost = []
    for i, event in enumerate(events):
        if event[0] in ("replace", "mkdir"):
            later = events[i + 1:]
            until = next((j for j, e in enumerate(later) if e[0] == "commit"), len(later))
            if ("fsync", str(Path(event[1]).parent)) not in later[:until]:
                lost.append(f"{event[0]} {event[1]}")
    return lost


def test_a_stored_frames_renames_and_new_folders_are_synced_before_its_commit(tmp_path, monkeypatch):
    """Given a new store, when a frame with its ROI context, then another frame of the same day, then an empty scene
    are added, then every rename and every folder made for them is synced into its folder before the commit that
    the ingest service acknowledges: the folder was never synced, so a power cut after the PUBACK could keep the
    row and lose its file (its frame then reported lost; the station had already dropped it)."""
    store = FrameStore(tmp_path / "s", labels=LABELS)
    events = trace_durability(monkeypatch, store)
    first, second = real_frames(2)
    [scene] = empty_scene_records(1)
    assert store.add(with_context(first).body, first.blob).outcome == "stored"
    made = [Path(e[1]).relative_to(store.root).as_posix() for e in events if e[0] == "mkdir"]
    assert made[0] == "images" and len(made) == 4                    # images/<site>/<station>/<day>
    assert [e[0] for e in events].count("replace") == 2             # the JPEG and its context JPEG
    assert unsynced(events) == []
    del events[:]
    assert store.add(second.body, second.blob).outcome == "stored"
    assert [e[0] for e in events if e[0] != "fsync"] == ["replace", "commit"]
    assert unsynced(events) == []
    del events[:]
    assert store.add(scene.body, scene.blob).outcome == "stored"
    assert unsynced(events) == [] and [e[0] for e in events].count("mkdir") == 5   # empty-scenes/.../<camera>/<day>
    store.close()


def test_a_new_store_folder_is_synced_into_its_parent(tmp_path, monkeypatch):
    first = FrameStore(tmp_path / "first")
    events = trace_durability(monkeypatch, first)
    FrameStore(tmp_path / "a" / "b").close()
    first.close()
    made = [e for e in events if e[0] == "mkdir"]
    assert [Path(e[1]).name for e in made] == ["a", "b"]
    assert ("fsync", str(tmp_path)) in events and ("fsync", str(tmp_path / "a")) in events


def _add_at(store: FrameStore, records, **fields) -> None:
    for record in records:
        assert store.add({**record.body, **fields}, record.blob).outcome == "stored"


def test_the_facets_list_the_busiest_values_and_say_how_many_more(tmp_path, monkeypatch):
    """Given two stations that send the frames and five that sent one each (their names first in order, as a
    stream of made-up station ids would be), when the facets are asked for two values each, then the two busy
    stations are listed (in order), and five more are counted, not listed. Unbounded, every value went out every
    3 s (43k stations in 100k frames: 580 kB an answer, /tmp/review-page/bench_facets.py)."""
    import central.review.store as store_module
    from central.review.api import ReviewServer

    store = FrameStore(tmp_path / "s", labels=LABELS)
    records = iter(real_frames(10))
    _add_at(store, [next(records) for _ in range(3)], station="zz-busy")
    _add_at(store, [next(records) for _ in range(2)], station="yy-busy")
    for i, record in enumerate(records):
        _add_at(store, [record], station=f"aa-{i}")
    facets = store.facets(limit=2)
    assert facets["station"] == ["yy-busy", "zz-busy"] and facets["more"]["station"] == 5
    assert facets["site"] == ["ber1"] and facets["more"]["site"] == 0
    assert set(facets["more"]) == {"site", "station", "camera", "model_version", "predicted"}
    assert len(store.facets()["station"]) == 7 and store.facets()["more"]["station"] == 0
    monkeypatch.setattr(store_module, "FACET_LIMIT", 3)                  # the default, read at each call
    assert store.facets()["station"] == ["aa-0", "yy-busy", "zz-busy"] and store.facets()["more"]["station"] == 4
    with pytest.raises(StoreError, match="field limit: 0 is not in 1..1000"):
        store.facets(limit=0)

    server = ReviewServer(store, "127.0.0.1", 0, no_auth=True).start()
    try:
        import httpx

        answer = httpx.get(server.url + "api/facets?limit=2", timeout=30).json()
        assert answer["station"] == ["yy-busy", "zz-busy"] and answer["more"]["station"] == 5
        assert httpx.get(server.url + "api/facets", timeout=30).json()["more"]["station"] == 4
        for bad in ("0", "1001", "x"):
            refused = httpx.get(server.url + f"api/facets?limit={bad}", timeout=30)
            assert refused.status_code == 400 and "field limit" in refused.json()["error"], refused.text
    finally:
        server.stop()
        store.close()
