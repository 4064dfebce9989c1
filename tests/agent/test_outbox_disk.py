"""Outbox on disk: its three files (database, -wal, -shm) stay within outbox.max_bytes, and a write's cost does not
grow with the backlog.

Every SQLite statement of the outbox is measured (``DiskMeter``): the size of each file before and after it. Within
one statement a file is at most the larger of the two (a commit only grows the WAL; a checkpoint grows the database,
then truncates the WAL), so the sum of those maxima bounds what the files took at any moment, with no timing.
Messages are real: result bodies as the station writes them and JPEGs of rendered station views (real
Fashion-MNIST items on a belt) at several sizes and qualities."""

from __future__ import annotations

import logging
import random
import sqlite3
from pathlib import Path

import cv2
import pytest
from scenes import Scene, make_sprite

from agent.mqtt import wire_bytes
from agent.outbox import Message, Outbox

DAY_S = 86400.0
MAX_MESSAGE = 4 * 1024 * 1024       # mqtt.max_message_bytes (the deploy broker's limit)


def files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


class DiskMeter:
    """Wraps ``sqlite3.connect`` so that the outbox's connections measure their three files around each statement."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.peak = 0
        meter, connect = self, sqlite3.connect

        class Measured(sqlite3.Connection):
            def execute(self, *args):
                return meter.around(self.db_path, super().execute, *args)

            def executescript(self, *args):
                return meter.around(self.db_path, super().executescript, *args)

        def measured_connect(database, *args, **kwargs):
            db = connect(database, *args, factory=Measured, **kwargs)
            db.db_path = str(database).split("?")[0].removeprefix("file:")
            return db

        monkeypatch.setattr(sqlite3, "connect", measured_connect)

    @staticmethod
    def sizes(path: str) -> list[int]:
        out = []
        for name in (path, f"{path}-wal", f"{path}-shm"):
            try:
                out.append(Path(name).stat().st_size)
            except FileNotFoundError:
                out.append(0)
        return out

    def around(self, path: str, call, *args):
        before = self.sizes(path)
        try:
            return call(*args)
        finally:
            self.peak = max(self.peak, sum(map(max, before, self.sizes(path))))


@pytest.fixture(scope="module")
def jpegs(fmnist_test_images) -> list[bytes]:
    """36 JPEGs of station views: 300 px renders scaled 0.5x to 4x, quality 70 to 95 (about 3 kB to 270 kB)."""
    images = fmnist_test_images[0]
    scene = Scene(300, seed=3)
    out = []
    for i in range(36):
        sprite = make_sprite(images[i], 200, angle=10.0 * i, colour=(1.0, 0.9, 0.8))
        frame, _ = scene.render(i, [(sprite, 40 + i, 50)])
        scale = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)[i % 6]
        frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, (70, 85, 95)[i % 3]])
        assert ok
        out.append(buf.tobytes())
    return out


def result(rng: random.Random, camera: str, n: int) -> dict:
    """A result body as the station publishes it (result.v1: top-5, latencies)."""
    labels = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
    top = rng.sample(range(10), 5)
    return {"schema": "result.v1", "ts": 1_796_000_000.0 + n, "site": "site-a", "station": "dock-3",
            "camera": camera, "frame_seq": n, "captured_at": 1_796_000_000.0 + n - 0.02,
            "model": {"name": "fmnist-resnet50", "version": "2026.05.09-1", "precision": "int8"},
            "label": labels[top[0]], "class_id": top[0], "confidence": round(rng.random(), 6),
            "top_k": [{"label": labels[c], "class_id": c, "confidence": round(rng.random(), 6)} for c in top],
            "low_confidence": rng.random() < 0.3, "reasons": ["margin"] if rng.random() < 0.3 else [],
            "latency_ms": {"queue": round(rng.random() * 3, 3), "preprocess": 2.5, "inference": 7.1}}


def batch(rng: random.Random, jpegs: list[bytes], n: int, frame_share: float) -> list[Message]:
    """One inference batch of 4 cameras: their results, now and then a low-confidence frame or a decision."""
    out = [Message("result", result(rng, f"cam{c}", n)) for c in range(4)]
    if rng.random() < frame_share:
        out.append(Message("frame", {"schema": "frame.v1", "camera": "cam0", "frame_seq": n}, rng.choice(jpegs)))
    if rng.random() < 0.1:
        out.append(Message("decision", {"schema": "decision.v1", "camera": "cam1", "label": "coat", "n": n}))
    return out


def as_published(record) -> int:
    return max(wire_bytes(record, True), wire_bytes(record, False))


def stored_bytes(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0]
    finally:
        db.close()


def test_the_files_stay_within_max_bytes_when_filled_three_times_over(tmp_path, monkeypatch, jpegs):
    """The quota counted the messages' bytes only: SQLite's pages, its indexes and the WAL (up to 4 MB between
    checkpoints) came on top, 1.3 times max_bytes on disk at 20 MB. A user sizing a partition to it ran it full."""
    # given a 6 MB outbox, measured around every statement, whose broker is away
    meter = DiskMeter(monkeypatch)
    path, quota = tmp_path / "ob.sqlite", 6_000_000
    ob = Outbox(path, max_bytes=quota, max_age_s=DAY_S)
    ob.limit_messages(MAX_MESSAGE, as_published)
    rng, stored, acked, n = random.Random(5), [], 0, 0

    # when 18 MB of results and JPEG frames are stored; past 9 MB the broker is back, slower than the cameras
    written = 0
    while written < 3 * quota:
        n += 1
        messages = batch(rng, jpegs, n, frame_share=0.35)
        stored += ob.put_many(messages)
        written += sum(len(m.blob or b"") + 700 for m in messages)
        if written > 1.5 * quota and n % 5 == 0:
            acked += ob.ack_many(r.seq for r in ob.pending(limit=10))

    # then the three files never held more than max_bytes, not even inside a statement
    assert meter.peak <= quota, f"{meter.peak} bytes on disk, quota {quota}"
    # and the quota is used, not given away: messages fill most of it, the newest batch is kept
    assert ob.bytes > 0.45 * quota, ob.bytes
    assert [r.seq for r in ob.pending(after_seq=stored[-1].seq - len(messages), limit=100)] == \
        [r.seq for r in stored[-len(messages):]]
    # and every message stored is still there, acknowledged, or counted as dropped by the byte quota (frames first)
    dropped = ob.dropped()
    assert set(dropped) <= {"bytes:frame", "bytes:result", "bytes:decision"} and dropped["bytes:frame"] > 0, dropped
    assert ob.depth() + acked + sum(dropped.values()) == len(stored)
    kept = [r.seq for r in ob.pending(limit=10**6)]
    assert kept == sorted(kept) and ob.bytes == stored_bytes(path)

    # and after a restart the count and the bound still hold
    depth = ob.depth()
    ob.close()
    again = Outbox(path, max_bytes=quota, max_age_s=DAY_S)
    assert again.depth() == depth and again.bytes == stored_bytes(path) and files_bytes(path) <= quota
    again.close()
    assert meter.peak <= quota


def test_a_clock_step_on_a_full_outbox_writes_no_copy_of_it(tmp_path, monkeypatch):
    """NTP setting the clock of a station without a battery moved every stored time with one UPDATE: every page of
    the table went through the WAL, 1.8 times max_bytes on disk for a moment (and a full partition)."""
    # given a 6 MB outbox of results stored offline at a clock near 2000
    meter = DiskMeter(monkeypatch)

    class Clock:
        t = 946_684_800.0

        def __call__(self):
            return self.t

    wall, boot = Clock(), Clock()
    path, quota = tmp_path / "ob.sqlite", 6_000_000
    ob = Outbox(path, max_bytes=quota, max_age_s=7 * DAY_S, clock=wall, monotonic=boot, boot_id="boot-a")
    rng, n = random.Random(7), 0
    while ob.bytes < 0.5 * quota and n < 2000:
        ob.put_many([Message("result", result(rng, f"cam{c % 4}", n)) for c in range(16)])
        wall.t += 1
        boot.t += 1
        n += 1
    assert ob.dropped() == {}

    # when NTP steps the wall clock 26 years forward and the next result is stored
    wall.t += 820_000_000
    ob.put(Message("result", {"n": "after the step"}))

    # then the backlog keeps its real ages, and the files never passed max_bytes
    assert ob.dropped() == {} and ob.pending()[0].created == pytest.approx(wall.t - n, abs=1e-3)
    assert meter.peak <= quota, f"{meter.peak} bytes on disk, quota {quota}"


def test_acknowledging_frames_does_not_write_them_again(tmp_path, monkeypatch, jpegs):
    """Debian's and Ubuntu's SQLite overwrite deleted content with zeros by default (secure_delete): every JPEG the
    broker acknowledged went through the WAL a second time, and a window of acks could take the files past
    max_bytes (and doubled the outbox's writes to the station's flash)."""
    # given a 6 MB outbox holding 14 frames of 260 kB, its broker back
    meter = DiskMeter(monkeypatch)
    path, quota = tmp_path / "ob.sqlite", 6_000_000
    ob = Outbox(path, max_bytes=quota, max_age_s=DAY_S)
    big = [j for j in jpegs if len(j) > 250_000]
    stored = ob.put_many([Message("frame", {"n": n}, big[n % len(big)]) for n in range(14)])
    assert ob.depth() == 14 and ob.dropped() == {}
    before, meter.peak = files_bytes(path), 0

    # when the publisher acknowledges all of them at once (one window of PUBACKs)
    assert ob.ack_many(r.seq for r in stored) == 14

    # then the deletions wrote little: the files never grew past where they were, nor past max_bytes
    assert meter.peak <= quota and meter.peak <= before + 600_000, (before, meter.peak)
    ob.close()


def test_a_lowered_max_bytes_shrinks_the_files_as_messages_are_stored(tmp_path, jpegs, caplog):
    # given an outbox filled under a 12 MB quota
    path = tmp_path / "ob.sqlite"
    rng, n = random.Random(9), 0
    ob = Outbox(path, max_bytes=12_000_000, max_age_s=DAY_S)
    while files_bytes(path) < 8_000_000 and n < 2000:
        n += 1
        ob.put_many(batch(rng, jpegs, n, frame_share=0.5))
    assert files_bytes(path) >= 8_000_000
    ob.close()

    # when the station restarts with 6 MB, which the files pass, and goes on storing (3 MB more)
    caplog.set_level(logging.WARNING, "agent.outbox")
    ob = Outbox(path, max_bytes=6_000_000, max_age_s=DAY_S)
    for _ in range(150):
        n += 1
        ob.put_many(batch(rng, jpegs, n, frame_share=0.5))

    # then the files have shrunk within it, what is stored is counted right, and the start said why they were over
    assert files_bytes(path) <= 6_000_000 and ob.bytes == stored_bytes(path)
    assert "more than outbox.max_bytes 6000000" in caplog.text
    ob.close()


def test_an_outbox_file_from_before_is_rebuilt_to_shrink_once_it_is_empty(tmp_path, jpegs):
    """A file written before the pages were counted has no incremental auto-vacuum: SQLite never gives its free
    pages back. Rebuilt once it holds no message (a drained backlog), it is small and can shrink from then on."""
    # given a 9 MB outbox file as an earlier version wrote it (no auto-vacuum), whose backlog is then sent and acked
    path = tmp_path / "ob.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE messages (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, "
               "body TEXT NOT NULL, blob BLOB, created REAL NOT NULL, size INTEGER NOT NULL, captured REAL)")
    for seq in range(1, 301):
        jpeg = jpegs[seq % len(jpegs)]
        db.execute("INSERT INTO messages VALUES (?, ?, 'frame', ?, ?, ?, ?, NULL)",
                   (seq, f"id-{seq}", f'{{"seq":{seq}}}', jpeg, 1_796_000_000.0, len(jpeg) + 10))
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('next_seq', 301)")
    db.commit()
    db.close()
    assert files_bytes(path) > 8_000_000
    ob = Outbox(path, max_bytes=64_000_000, max_age_s=DAY_S, clock=lambda: 1_796_000_100.0)
    ob.ack_many(r.seq for r in ob.pending(limit=10**6))

    # then the file is small again, and new messages are stored and read as before
    assert ob.depth() == 0 and files_bytes(path) < 500_000
    assert ob.put(Message("result", {"n": 1})).seq == 301 and [r.body["n"] for r in ob.pending()] == [1]
    ob.close()


def test_a_batch_larger_than_one_transaction_is_stored_whole_and_in_order(tmp_path, jpegs):
    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=64_000_000, max_age_s=DAY_S)
    messages = [Message("result", {"n": i}) for i in range(40)] + [Message("frame", {"n": 40 + i}, jpegs[i % 6 + 24])
                                                                  for i in range(6)]
    stored = ob.put_many(messages)
    assert [r.seq for r in stored] == list(range(1, 47))
    assert [r.body["n"] for r in ob.pending(limit=100)] == list(range(46)) and ob.last_seq == 46
    ob.close()


def test_a_put_costs_the_same_whatever_the_backlog(tmp_path, jpegs):
    """The age check read every stored row at each put, the JPEG bytes included (the time is stored after them):
    with 256 MB waiting, each batch read 256 MB. Measured in SQLite's steps, so no timing: a put of 4 results on a
    backlog of 4000 messages takes about as many as on a backlog of 400."""
    def steps_of_one_put(backlog: int) -> int:
        ob = Outbox(tmp_path / f"ob{backlog}.sqlite", max_bytes=10**9, max_age_s=DAY_S)
        rng = random.Random(backlog)
        for n in range(backlog // 5):
            ob.put_many(batch(rng, jpegs, n, frame_share=1.0)[:5])
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        ob._db.set_progress_handler(count, 100)     # called every 100 virtual machine steps
        ob.put_many([Message("result", result(rng, f"cam{c}", 0)) for c in range(4)])
        ob.close()
        return steps[0]

    small, large = steps_of_one_put(400), steps_of_one_put(4000)
    assert large <= 2 * small + 20, (small, large)
