"""Memory of the review service's reads of all reviewed frames: the labels export and the page's enrolment.

Before, ``FrameStore.iter_reviewed`` fetched every reviewed row at once (about 3 kB each: 284 MB more at 100k
frames), the export kept every CSV row until the end, and an enrolment read every reviewed frame to pick one
class's. Now the rows come a page at a time from one snapshot and the CSV is written as they come; an enrolment
reads only its class's rows. The bounds are asserted on what is counted (rows fetched from SQLite, bytes
allocated), not on a time.

A store of thousands of reviewed frames through ``FrameStore.add`` would take minutes (a fsync per frame): the
stores here hold real frames, added and reviewed as ingest and the page do, and then copies of those rows made
in SQL (each with its own id and decision), all naming the real JPEG.
"""

from __future__ import annotations

import csv
import sqlite3
import tracemalloc

import pytest
from loop_support import LABELS, real_frames

from central.review import store as store_module
from central.review.enrol import EnrolSettings, ReviewEnroller
from central.review.labels import CSV_NAME, export_reviewed
from central.review.store import FrameStore

NOTE = 4000            # characters of each copy's note (a reviewer's note holds up to 4096)
PAGE = 100             # rows a read fetches at a time, here


def grown_store(root, copies: int, *, tote: int = 10) -> FrameStore:
    """A store with 3 real frames (one left pending) and ``copies`` reviewed copies of the first: the first ``tote``
    marked as the new class "Tote", the rest labelled ``LABELS[0]``, each with a ``NOTE``-character note."""
    store = FrameStore(root, labels=LABELS)
    records = real_frames(3)
    for record in records:
        store.add(record.body, record.blob)
    store.review(records[1].id, "label", label=LABELS[1], reviewer="ana")
    columns = [row[1] for row in store._db.execute("PRAGMA table_info(frames)")]
    made = {"id": "f.id || '-copy-' || n.i", "status": f"CASE WHEN n.i <= {tote} THEN 'new_class' ELSE 'labelled' END",
            "label": f"CASE WHEN n.i <= {tote} THEN 'Tote' ELSE '{LABELS[0]}' END",
            "note": f"printf('%.{NOTE}c', 'n')", "reviewer": "'ana'", "reviewed_at": "f.received_at - 100000 + n.i"}
    store._db.execute(
        f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {copies}) "
        f"INSERT INTO frames({', '.join(columns)}) SELECT {', '.join(made.get(c, f'f.{c}') for c in columns)} "
        f"FROM frames AS f, n WHERE f.id = ?", (records[0].id,))
    store.review(records[2].id, "new_class", label="Tote", reviewer="ana")     # the newest decision: last
    return store


def count_fetched_rows(store: FrameStore, monkeypatch) -> list[int]:
    """[rows fetched from SQLite so far], on the store's own connection and on any it opens to read."""
    fetched = [0]

    def counting(cursor, row):
        fetched[0] += 1
        return sqlite3.Row(cursor, row)

    store._db.row_factory = counting
    real_reader = getattr(store, "_reader", None)

    def reader():
        connection = real_reader()
        connection.row_factory = counting
        return connection

    monkeypatch.setattr(store, "_reader", reader, raising=False)
    return fetched


def test_reviewed_frames_are_read_a_page_at_a_time_and_all_of_them_in_order(tmp_path, monkeypatch):
    """Given 2,000 reviewed frames, when they are iterated, then at no point are more than one page of rows fetched
    beyond those handed out (before: all 2,000 before the first), and every reviewed frame comes once, in the order
    they were decided."""
    store = grown_store(tmp_path / "store", 2000)
    try:
        monkeypatch.setattr(store_module, "REVIEWED_PAGE", PAGE, raising=False)
        fetched = count_fetched_rows(store, monkeypatch)
        handed = 0
        ids = []
        for frame in store.iter_reviewed():
            handed += 1
            assert fetched[0] - handed < PAGE, (fetched[0], handed)
            ids.append(frame["id"])
        assert handed == 2002 and len(set(ids)) == 2002
        store._db.row_factory = sqlite3.Row
        expected = [r[0] for r in store._db.execute("SELECT id FROM frames WHERE status != 'pending' "
                                                    "ORDER BY reviewed_at, id")]
        assert ids == expected and store.get(ids[-1])["label"] == "Tote"
    finally:
        store.close()


def test_the_export_memory_stays_flat_and_the_dataset_is_whole(tmp_path, monkeypatch):
    """Given 6,000 reviewed frames with 4,000-character notes (24 MB of notes), when they are exported, then the
    export allocates at most half of that at its peak (a page of 32 rows, ~0.6 MB, and Python's own tables, which
    grow by megabytes at a time after other tests ran in the same process: 2.5 MB alone, 8.3 MB seen after the
    review API tests; before, every row twice over, 44 MB), and every frame is in the CSV and the folders with
    its label."""
    monkeypatch.setattr(store_module, "REVIEWED_PAGE", 32, raising=False)
    store = grown_store(tmp_path / "store", 6000)
    try:
        tracemalloc.start()
        try:
            summary = export_reviewed(store, tmp_path / "out")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        store.close()
    assert peak < 6000 * NOTE / 2, f"peak {peak / 1e6:.1f} MB"
    assert summary["frames"] == 6002 and summary["by_label"] == {LABELS[0]: 5990, LABELS[1]: 1, "Tote": 11}
    with open(tmp_path / "out" / CSV_NAME, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6002 and all((tmp_path / "out" / row["path"]).is_file() for row in rows)
    assert rows[-1]["label"] == "Tote" and rows[0]["note"] == "n" * NOTE


def test_an_enrolment_reads_only_the_frames_of_the_class_it_enrols(tmp_path, monkeypatch):
    """Given 2,000 reviewed frames of which 11 are the new class "Tote", when the page's enrolment gathers its
    examples, then only those 11 rows are fetched from the store (before: all 2,000) and the examples are the same
    image files, in the same order, as before."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")          # examples() reads the store only, never the bundle
    store = grown_store(tmp_path / "store", 2000)
    try:
        expected = [store.image_path(f["id"]) for f in store.iter_reviewed()
                    if f["status"] in ("labelled", "new_class") and f["label"] == "Tote"]
        enroller = ReviewEnroller(store, EnrolSettings(bundle=bundle))
        fetched = count_fetched_rows(store, monkeypatch)
        examples = enroller.examples("Tote")
        assert examples == expected and len(examples) == 11
        assert fetched[0] == 11, fetched
    finally:
        store.close()


@pytest.mark.parametrize("during", ["review", "undo"])
def test_a_decision_made_while_an_export_reads_neither_doubles_nor_blocks_it(tmp_path, during):
    """Given an export half way through its pages, when a reviewer decides (or undoes) a frame the export already
    wrote, then the decision is stored at once (the export holds no lock) and the export keeps the snapshot it
    began with: every frame once, none twice under its old and new label."""
    store = grown_store(tmp_path / "store", 600, tote=0)
    try:
        reading = store.iter_reviewed()
        first = [next(reading) for _ in range(300)]
        target = first[0]["id"]
        if during == "review":
            store.review(target, "label", label=LABELS[2], reviewer="bo")
        else:
            store.review(target, "undo")
        rest = list(reading)
        ids = [f["id"] for f in first + rest]
        assert len(ids) == len(set(ids)) == 602
        assert store.get(target)["status"] == ("labelled" if during == "review" else "pending")
    finally:
        store.close()
