"""FrameStore: durable, deduplicated, quota'd, and reviews that name what was wrong."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import pytest
from loop_support import LABELS, real_frames, truth_of

from central.review.store import DB_NAME, FrameStore, StoreError, UnknownFrame


def test_frames_are_stored_once_and_survive_a_reopen(tmp_path):
    records = real_frames(5)
    store = FrameStore(tmp_path / "s", labels=LABELS)
    assert [store.add(r.body, r.blob).outcome for r in records] == ["stored"] * 5
    assert store.add(records[2].body, records[2].blob).outcome == "duplicate"     # a QoS 1 redelivery
    store.close()
    again = FrameStore(tmp_path / "s", labels=LABELS)
    frames, total = again.list(limit=10)
    assert total == 5 and [f["id"] for f in frames] == [r.id for r in records]
    first = again.get(records[0].id)
    assert first["station"] == "receiving-01" and first["model_version"] == "1" and first["status"] == "pending"
    assert first["top_k"][0]["label"] == records[0].body["label"]
    assert again.image_path(records[0].id).read_bytes() == records[0].blob
    assert again.stats()["counters"] == {"stored": 5, "duplicates": 1}


def test_an_interrupted_write_leaves_no_trace_after_reopen(tmp_path, caplog):
    store = FrameStore(tmp_path / "s")
    [record] = real_frames(1)
    store.add(record.body, record.blob)
    orphan = tmp_path / "s" / "images" / "ber1" / "receiving-01" / "20261127" / "lost.jpg"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(record.blob)           # a file written, the process died before its row committed
    half = orphan.with_name(".incoming-abc")
    half.write_bytes(record.blob[:100])       # died while writing the temporary file
    store.close()
    with caplog.at_level(logging.WARNING):
        again = FrameStore(tmp_path / "s")
    assert not orphan.exists() and not half.exists() and again.reconciled["orphan_images_removed"] == 2
    assert "removed 2 image file(s) without an index row" in caplog.text
    assert again.list()[1] == 1 and again.image_path(record.id).is_file()
    again.image_path(record.id).unlink()      # a file lost behind the store's back: reported, the row kept
    with caplog.at_level(logging.ERROR):
        assert FrameStore(tmp_path / "s").reconciled["rows_without_image"] == 1
    assert "lost their image file" in caplog.text


def test_opening_beside_a_writer_never_takes_its_files(tmp_path):
    """The review server opens the store while ingest writes: its reconcile must not see a write in progress
    as a crash leftover (every add holds the write lock from its file to its commit)."""
    records = real_frames(40)
    writer = FrameStore(tmp_path / "s")
    done = threading.Event()
    errors: list[BaseException] = []
    opened = threading.Semaphore(0)

    def write() -> None:
        try:
            for r in records:
                opened.acquire(timeout=10)      # interleave: at least one open between two adds
                writer.add(r.body, r.blob)
        except BaseException as exc:        # surfaced below
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=write, daemon=True).start()
    opens = 0
    while not done.is_set():
        other = FrameStore(tmp_path / "s")      # a second handle: its own connection, SQLite's locking
        assert other.reconciled == {"orphan_images_removed": 0, "rows_without_image": 0}
        other.close()
        opens += 1
        opened.release()
    assert not errors and opens >= len(records)
    frames, total = writer.list(limit=100)
    assert total == 40 and all((tmp_path / "s" / f["image"]).read_bytes() == r.blob
                               for f, r in zip(frames, records))
    assert writer.stats()["bytes"] == sum(len(r.blob) for r in records)


def test_a_new_store_opens_while_another_process_is_writing_to_it(tmp_path):
    """The review server and ingest open a new store together: while one is in a write transaction on it
    (still in SQLite's first journal mode), the other's switch to WAL is refused at once, without SQLite's busy
    wait; the open waits for the write to end instead of failing with "database is locked"."""
    tmp_path.mkdir(exist_ok=True)
    other = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE other_process(a)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO other_process VALUES (1)")
    ended = threading.Event()

    def finish() -> None:
        other.execute("COMMIT")
        ended.set()

    timer = threading.Timer(0.3, finish)
    timer.start()
    started = time.monotonic()
    store = FrameStore(tmp_path, labels=LABELS)
    assert ended.is_set() and time.monotonic() - started >= 0.25      # it waited for the other's commit
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT count(*) FROM other_process").fetchone()[0] == 1
    timer.join()
    other.close()


def test_quota_warns_then_refuses_and_never_deletes(tmp_path, caplog):
    records = real_frames(6)
    size = len(records[0].blob)
    store = FrameStore(tmp_path / "s", max_bytes=int(size * 3.5), warn_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        outcomes = [store.add(r.body, r.blob).outcome for r in records]
    assert outcomes[:3] == ["stored"] * 3 and "refused" in outcomes[3:]
    assert "storage at" in caplog.text and "storage quota reached" in caplog.text
    stats = store.stats()
    assert stats["quota"]["warning"] is True and stats["counters"]["refused_quota"] == outcomes.count("refused")
    assert stats["frames"] == outcomes.count("stored")
    assert all((tmp_path / "s" / f["image"]).is_file() for f in store.list()[0])
    other = FrameStore(tmp_path / "s", max_bytes=int(size * 3.5))   # a second worker on the same store
    assert other.stats()["quota"]["used_bytes"] == stats["bytes"] == sum(len(r.blob) for r in records[:3])
    assert other.add(records[5].body, records[5].blob).outcome == "refused"
    other.close()
    store.close()
    with caplog.at_level(logging.WARNING):
        reviewer_side = FrameStore(tmp_path / "s")     # no quota given: the one ingest set is kept and shown
    assert reviewer_side.stats()["quota"]["max_bytes"] == int(size * 3.5)
    assert reviewer_side.stats()["quota"]["warning"] is True and reviewer_side.warn_fraction == 0.5
    assert FrameStore(tmp_path / "s", max_bytes=0).stats()["quota"] is None       # 0 removes it
    assert reviewer_side.stats()["quota"] is None              # an open handle sees the change at once
    FrameStore(tmp_path / "s", max_bytes=size)                  # another worker sets a lower quota ...
    assert reviewer_side.add(records[4].body, records[4].blob).outcome == "refused"   # ... enforced here too
    assert len(list((tmp_path / "s" / "images").rglob("*.jpg"))) == 3


def test_bad_frames_are_refused_with_the_reason(tmp_path):
    store = FrameStore(tmp_path / "s")
    [record] = real_frames(1)
    with pytest.raises(StoreError, match="not a decodable JPEG"):
        store.add(record.body, b"\xff\xd8 not really a jpeg")
    with pytest.raises(StoreError, match="field station"):
        store.add({**record.body, "station": ""}, record.blob)
    assert store.list()[1] == 0


def test_reviews_filters_and_errors(tmp_path):
    store = FrameStore(tmp_path / "s", labels=LABELS)
    records = real_frames(4) + real_frames(2, station="qc-02", version="2", start=4)
    for r in records:
        store.add(r.body, r.blob)
    assert store.list(station="qc-02")[1] == 2 and store.list(model_version="1")[1] == 4
    a, b, c, d = (r.id for r in records[:4])
    assert store.review(a, "label", label=truth_of(records[0]), reviewer="ana")["status"] == "labelled"
    assert store.review(b, "skip")["status"] == "skipped"
    assert store.review(c, "new_class", label="Scarf")["label"] == "Scarf"
    assert "Scarf" in store.labels()["new_classes"]
    assert store.review(d, "label", label="Scarf")["status"] == "labelled"     # a new class, once accepted
    assert store.review(records[4].id, "defect", label="torn")["defect"] == "torn"
    assert store.list(status="pending")[1] == 1
    with pytest.raises(StoreError, match="field label: 'Hat' is not a known class"):
        store.review(records[5].id, "label", label="Hat")
    with pytest.raises(StoreError, match="field label: 'Bag' is already a class"):
        store.review(records[5].id, "new_class", label="Bag")
    with pytest.raises(StoreError, match="field action"):
        store.review(records[5].id, "approve")
    with pytest.raises(UnknownFrame, match="no such frame"):
        store.review("nope", "skip")
    with pytest.raises(StoreError, match="field status"):
        store.list(status="done")
    assert store.review(b, "undo")["status"] == "pending" and store.get(b)["reviewer"] is None


def test_a_class_name_is_one_kind_and_review_text_is_valid_bounded_unicode(tmp_path):
    """A defect class and a new product class train as separate class folders (central.review.labels): one name
    is never both, nor a defect a model class. Fields that are not valid Unicode text (a lone surrogate passes
    JSON) or are too long are refused naming the field; the frame keeps its review."""
    store = FrameStore(tmp_path / "s", labels=LABELS)
    records = real_frames(4)
    for r in records:
        store.add(r.body, r.blob)
    a, b, c, d = (r.id for r in records)
    store.review(a, "defect", label="Torn-Box")
    with pytest.raises(StoreError, match="field label: 'Torn-Box' is already a defect class"):
        store.review(b, "new_class", label="Torn-Box")
    store.review(b, "new_class", label="Scarf")
    for taken in ("Scarf", LABELS[0]):
        with pytest.raises(StoreError, match=f"field label: '{taken}' is a product class"):
            store.review(c, "defect", label=taken)
    assert store.labels()["new_classes"] == ["Scarf"] and store.labels()["defects"] == ["Torn-Box"]
    for field, value, why in (("label", "Hat\ud800", "not valid Unicode"), ("note", "\udfff", "not valid Unicode"),
                              ("reviewer", "ana\udc00", "not valid Unicode"), ("label", "x" * 129, "more than 128"),
                              ("reviewer", "r" * 257, "more than 256"), ("note", "n" * 4097, "more than 4096"),
                              ("label", "Tote\x07", "control characters")):   # the trainer would refuse it later
        action = "new_class" if field == "label" else "skip"
        with pytest.raises(StoreError, match=f"frame {d}: field {field}: .*{why}"):
            store.review(d, action, **{field: value})
    assert store.get(d)["status"] == "pending" and store.labels()["new_classes"] == ["Scarf"]
    with pytest.raises(StoreError, match=f"frame {d}: field label: 'Dent\\\\n1' is empty or holds control"):
        store.review(d, "defect", label="Dent\n1")
    assert store.review(d, "new_class", label="x" * 128, note="n" * 4096)["label"] == "x" * 128


def test_the_open_walks_the_images_without_the_write_lock_and_keeps_what_commits_meanwhile(tmp_path, monkeypatch):
    """A large store's walk takes seconds: other workers keep writing meanwhile (the walk does not hold SQLite's
    write lock), and a file whose row another worker commits during the walk is kept. The commit is made to
    happen at the end of the walk by wrapping Path.rglob; the write itself is a real second connection."""
    from pathlib import Path

    [record] = real_frames(1)
    FrameStore(tmp_path / "s").close()
    rel = "images/ber1/receiving-01/20261127/late.jpg"
    (tmp_path / "s" / rel).parent.mkdir(parents=True)
    (tmp_path / "s" / rel).write_bytes(record.blob)          # written; its row not committed yet
    real_rglob = Path.rglob
    committed = []

    def walk_then_commit(self, pattern):
        yield from real_rglob(self, pattern)
        other = sqlite3.connect(tmp_path / "s" / "frames.sqlite", isolation_level=None, timeout=2)
        other.execute("BEGIN IMMEDIATE")                    # fails ("database is locked") if the walk held it
        other.execute("INSERT INTO frames(id, site, station, camera, meta, received_at, image, bytes, sha256) "
                      "VALUES ('late', 'ber1', 'receiving-01', 'dock-a', '{}', 0, ?, ?, 'x')",
                      (rel, len(record.blob)))
        other.execute("COMMIT")
        other.close()
        committed.append(rel)

    monkeypatch.setattr(Path, "rglob", walk_then_commit)
    store = FrameStore(tmp_path / "s")
    assert committed == [rel]
    assert (tmp_path / "s" / rel).read_bytes() == record.blob
    assert store.reconciled == {"orphan_images_removed": 0, "rows_without_image": 0}
    assert store.get("late")["image"] == rel


def with_margin(record, top: float, second: float) -> dict:
    """The record's frame message with its top-2 probabilities set (the rest of its top-k below them)."""
    body = dict(record.body)
    body["top_k"] = [{"label": k["label"], "p": p} for k, p in zip(record.body["top_k"], (top, second, 0.01))]
    return body


def test_least_certain_first_orders_pending_frames_by_margin(tmp_path):
    records = real_frames(5)
    margins = [(0.50, 0.20), (0.40, 0.38), (0.90, 0.05), (0.45, 0.30), (0.34, 0.33)]   # 0.30 .02 .85 .15 .01
    store = FrameStore(tmp_path / "s", labels=LABELS)
    for r, (top, second) in zip(records, margins):
        store.add(with_margin(r, top, second), r.blob)
    extra = real_frames(6)[5]
    no_top_k = dict(extra.body, top_k=[])
    store.add(no_top_k, extra.blob)                             # no margin: last
    frames, total = store.list(order="least-certain")
    assert total == 6 and [f["id"] for f in frames] == [records[i].id for i in (4, 1, 3, 0, 2)] + [no_top_k["id"]]
    assert frames[0]["margin"] == pytest.approx(0.01)
    store.review(records[4].id, "label", label=truth_of(records[4]))
    pending, _ = store.list(status="pending", order="least-certain", limit=2)
    assert [f["id"] for f in pending] == [records[1].id, records[3].id]
    assert [f["id"] for f in store.list(order="newest")[0]][:1] == [no_top_k["id"]]
    with pytest.raises(StoreError, match="field order: 'random' is not one of oldest, newest, least-certain, least-certain-by-class"):
        store.list(order="random")


def test_least_certain_by_class_lets_every_predicted_class_take_a_turn(tmp_path):
    # given: the model predicts Shirt for most of its unsure frames, with the smallest margins
    records = real_frames(8)
    plan = [("Shirt", 0.40, 0.39), ("Shirt", 0.40, 0.38), ("Shirt", 0.40, 0.37), ("Coat", 0.40, 0.30),
            ("Coat", 0.50, 0.30), ("Bag", 0.40, 0.35), ("Shirt", 0.40, 0.36)]     # margins .01 .02 .03 .10 .20 .05 .04
    store = FrameStore(tmp_path / "s", labels=LABELS)
    for r, (label, top, second) in zip(records, plan):
        body = dict(r.body, label=label, top_k=[{"label": label, "p": top}, {"label": "Pullover", "p": second}])
        store.add(body, r.blob)
    no_margin = dict(records[7].body, label="Bag", top_k=[])
    store.add(no_margin, records[7].blob)
    ids = [r.id for r in records]

    # when / then: turn 1 is each class's least certain frame (lowest margin first), then turn 2, ...
    frames, total = store.list(order="least-certain-by-class")
    assert total == 8
    assert [f["id"] for f in frames] == [ids[0], ids[5], ids[3], ids[1], ids[4], ids[2], ids[6], no_margin["id"]]
    assert "turn" not in frames[0] and frames[0]["predicted"] == "Shirt"
    # plain least certain first would spend a budget of 4 on Shirt only
    assert {f["predicted"] for f in store.list(order="least-certain", limit=4)[0]} == {"Shirt"}
    assert {f["predicted"] for f in frames[:3]} == {"Shirt", "Bag", "Coat"}

    # turns are counted among the frames that match: once Bag's frame is labelled, the pending queue is
    # Shirt .01, Coat .10 | Shirt .02, Coat .20 | Shirt .03 | Shirt .04 | Bag's frame without a margin
    store.review(ids[5], "label", label="Bag")
    pending, total = store.list(status="pending", order="least-certain-by-class", limit=3, offset=1)
    assert total == 7 and [f["id"] for f in pending] == [ids[3], ids[1], ids[4]]
    only_coat, _ = store.list(predicted="Coat", order="least-certain-by-class")
    assert [f["id"] for f in only_coat] == [ids[3], ids[4]]


def test_a_store_from_before_the_margin_column_gets_it_filled_on_open(tmp_path):
    records = real_frames(3)
    store = FrameStore(tmp_path / "s", labels=LABELS)
    for r, (top, second) in zip(records, [(0.6, 0.1), (0.4, 0.35), (0.5, 0.3)]):
        store.add(with_margin(r, top, second), r.blob)
    store.close()
    db = sqlite3.connect(tmp_path / "s" / "frames.sqlite")     # the schema as it was: no margin column
    for index in ("frames_margin", "frames_certainty", "frames_class_certainty"):     # the indexes on margin
        db.execute(f"DROP INDEX {index}")
    db.execute("ALTER TABLE frames DROP COLUMN margin")
    db.commit()
    db.close()
    again = FrameStore(tmp_path / "s", labels=LABELS)
    frames, total = again.list(order="least-certain")
    assert total == 3 and [f["id"] for f in frames] == [records[i].id for i in (1, 2, 0)]
    assert [round(f["margin"], 3) for f in frames] == [0.05, 0.2, 0.5]
    assert again.get(records[0].id)["top_k"][0]["p"] == 0.6      # nothing else changed
    again.close()
    FrameStore(tmp_path / "s", labels=LABELS).close()           # a second open finds the column and adds nothing


def test_a_context_too_large_or_not_a_jpeg_is_refused_and_counted_and_the_frame_kept(tmp_path, caplog):
    import base64

    import cv2
    import numpy as np
    from loop_support import with_context

    rng = np.random.default_rng(0)
    noisy = cv2.imencode(".jpg", rng.integers(0, 256, (400, 400, 3), dtype=np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 100])[1]
    huge = cv2.imencode(".jpg", np.zeros((1200, 1300, 3), np.uint8))[1]
    cases = {"more than 65536": noisy.tobytes(), "1300x1200 px, larger than 1024": huge.tobytes(),
             "not a decodable JPEG": b"\xff\xd8\xff\xe0 cut"}
    store = FrameStore(tmp_path / "s")
    records = [with_context(r, base64.b64encode(data).decode()) for r, data in zip(real_frames(3), cases.values())]
    records.append(with_context(real_frames(1, start=3)[0], "%%% not base64"))
    with caplog.at_level(logging.WARNING):
        assert [store.add(r.body, r.blob).outcome for r in records] == ["stored"] * 4
    assert all(store.context_path(r.id) is None for r in records)
    assert store.counters()["context_refused"] == 4
    for why in [*cases, "not base64"]:
        assert why in caplog.text


TRACK_A, TRACK_B = "6f1c0f8e-1d2b-4c3a-9e8f-0a1b2c3d4e5f", "0d9e8f7a-6b5c-4d3e-8f1a-2b3c4d5e6f7a"


def tracked(record, track, **fields):
    return {**record.body, **fields, **({"track": track} if track else {})}


def test_an_item_is_decided_in_one_review_and_undone_in_one(tmp_path):
    # given: item A's four frames (one already skipped), item B's frame, a frame with A's track from another
    # camera (another item: tracks are per station camera), and a frame of no item
    records = real_frames(7)
    store = FrameStore(tmp_path / "s", labels=LABELS)
    layout = [(TRACK_A, {}), (TRACK_A, {}), (TRACK_A, {}), (TRACK_A, {}), (TRACK_B, {}),
              (TRACK_A, {"camera": "dock-b"}), (None, {})]
    for r, (track, fields) in zip(records, layout):
        assert store.add(tracked(r, track, **fields), r.blob).outcome == "stored"
    a = [r.id for r in records[:4]]
    store.review(a[3], "skip", reviewer="ana")
    frames = {f["id"]: f for f in store.list(limit=10, status="pending")[0]}
    assert [frames[i]["item_pending"] for i in a[:3]] == [3, 3, 3]
    assert frames[records[4].id]["item_pending"] == 1 and frames[records[6].id]["item_pending"] == 0
    # when: the first frame of A is labelled for its whole item
    done = store.review(a[0], "label", label="Bag", reviewer="bo", item=True)
    # then: A's pending frames take the label and the reviewer; the skipped one, B and the other camera do not
    assert done["status"] == "labelled" and done["item_frames"] == a[1:3] and done["item_pending"] == 0
    assert [store.get(i)["label"] for i in a[:3]] == ["Bag"] * 3
    assert {(store.get(i)["reviewer"], store.get(i)["reviewed_at"]) for i in a[:3]} == {("bo", done["reviewed_at"])}
    assert store.get(a[3])["status"] == "skipped"
    assert [store.get(r.id)["status"] for r in records[4:]] == ["pending"] * 3
    assert store.stats()["counters"]["reviews:label"] == 3
    # undo for the item: back to pending, the skipped frame left as it was
    undone = store.review(a[1], "undo", item=True)
    assert sorted(undone["item_frames"]) == sorted([a[0], a[2]])
    assert [store.get(i)["status"] for i in a] == ["pending", "pending", "pending", "skipped"]
    # without item, one frame; a frame of no item decides only itself
    assert store.review(a[0], "label", label="Bag")["item_frames"] == []
    assert store.get(a[1])["status"] == "pending"
    assert store.review(records[6].id, "label", label="Bag", item=True)["item_frames"] == []
    store.close()


def test_a_track_that_is_not_an_id_is_refused_and_an_old_store_gets_the_column_on_open(tmp_path):
    records = real_frames(3)
    store = FrameStore(tmp_path / "s", labels=LABELS)
    with pytest.raises(StoreError, match=r"field track: '\.\./etc' is not an item's track id"):
        store.add(tracked(records[0], "../etc"), records[0].blob)
    with pytest.raises(StoreError, match="field track: 'int' is not"):
        store.add(tracked(records[0], 7), records[0].blob)
    for r, track in zip(records, [TRACK_A, TRACK_A, None]):
        store.add(tracked(r, track), r.blob)
    store.close()
    db = sqlite3.connect(tmp_path / "s" / "frames.sqlite")     # the schema as it was: no track column, and a
    db.execute("DROP INDEX frames_track")                       # metadata track no schema checked
    db.execute("ALTER TABLE frames DROP COLUMN track")
    db.execute("UPDATE frames SET meta = json_set(meta, '$.track', 'not-an-id') WHERE id = ?", (records[2].id,))
    db.commit()
    db.close()
    again = FrameStore(tmp_path / "s", labels=LABELS)
    assert [again.get(r.id)["track"] for r in records] == [TRACK_A, TRACK_A, None]
    assert again.get(records[0].id)["item_pending"] == 2
    again.close()
