"""Durable outbox: every message is on disk before it is published, and removed on PUBACK.

SQLite in WAL mode. The per-station sequence number lives in the same database
and is taken in the same transaction as the insert, so numbers are unique and
increasing across restarts and crashes. Quotas (bytes, age) drop the
lowest-value data first (frames, then the oldest messages) and count every drop.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from contract.messages import dumps_finite

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq      INTEGER PRIMARY KEY,
    id       TEXT NOT NULL UNIQUE,
    kind     TEXT NOT NULL,
    body     TEXT NOT NULL,
    blob     BLOB,
    created  REAL NOT NULL,
    size     INTEGER NOT NULL,
    captured REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(Exception):
    """The outbox database cannot be opened where it is configured; the message names the path."""


def check_outbox_path(path: str | Path) -> None:
    """Fail before anything starts when the database cannot live at ``path``: its folder cannot be created or
    written (SQLite writes its -wal and -shm files beside it), or the path is not a regular file."""
    path = Path(path)
    folder = path.parent
    if path.exists() and not path.is_file():
        raise OutboxError(f"{path}: is a {'folder' if path.is_dir() else 'special file'}, not a database file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutboxError(f"{path}: cannot create the folder {folder} (a file of that name is in the way)") from None
    except OSError as exc:
        raise OutboxError(f"{path}: cannot create the folder {folder} ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutboxError(f"{path}: the folder {folder} is not writable by uid {os.getuid()}")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise OutboxError(f"{path}: not readable and writable by uid {os.getuid()}")


@dataclass
class Record:
    seq: int
    id: str
    kind: str           # result, decision, alert, frame
    text: str           # the JSON body exactly as stored (published as is)
    blob: bytes | None
    created: float
    captured: float | None = None   # the frame's capture time, for capture->PUBACK latency

    @cached_property
    def body(self) -> dict[str, Any]:
        return json.loads(self.text)


@dataclass(frozen=True)
class Message:
    """What a producer hands to the outbox; id and seq are added by ``put``."""

    kind: str
    body: dict[str, Any]
    blob: bytes | None = None


STEP_S = 60.0       # a wall clock ahead of the monotonic one by more than this since the last put: a step (NTP)


class Outbox:
    def __init__(self, path: str | Path, *, max_bytes: int, max_age_s: float, synchronous: str = "normal",
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] | None = None) -> None:
        """``monotonic``: the clock a wall-clock step is measured against (default: time.monotonic with the real
        clock; a test's own ``clock`` stands for both, so it never steps)."""
        self.path = Path(path)
        check_outbox_path(self.path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.clock = clock
        self.monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self._last_put: tuple[float, float] | None = None      # (wall, monotonic) at the last put
        self._lock = threading.Lock()
        self.changed = threading.Condition()
        self._db = self._open(synchronous)

    def _open(self, synchronous: str) -> sqlite3.Connection:
        """Connect and read the totals; a file that is not our database is refused, never overwritten."""
        db = None
        try:
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            db.executescript(SCHEMA)
            self._bytes = db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0]
            row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                db.close()
            raise OutboxError(f"{self.path}: cannot open the outbox database ({exc})") from exc
        self._last_seq = (row[0] if row else 1) - 1
        return db

    # ------------------------------------------------------------ writing

    def put(self, message: Message) -> Record:
        """Store one message; ValueError when its body holds NaN or an infinity (counted as dropped, non-finite)
        or it is larger than the whole outbox may hold (counted as dropped, too-large)."""
        stored = self.put_many([message])
        if not stored:
            raise ValueError(f"outbox: {message.kind} message refused: a non-finite number in its body, or larger "
                             f"than the outbox's {self.max_bytes} bytes")
        return stored[0]

    def put_many(self, messages: Iterable[Message]) -> list[Record]:
        """Give each message an id and the next sequence number, and store them in one transaction.

        A message whose body holds NaN or an infinity is left out (logged, counted as dropped ``non-finite``):
        no subscriber can parse it, and it must not cost the other messages of the batch."""
        now = self.clock()
        records = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                mark = self._rebase_after_clock_step(now)
                seq = self._meta("next_seq", 1)
                for msg in messages:
                    body = {"id": str(uuid.uuid4()), "seq": seq, **msg.body}
                    try:
                        text = dumps_finite(body, separators=(",", ":"))
                    except ValueError as exc:     # NaN or infinity: never stored, never sent; the rest are
                        self._count_drop("non-finite", msg.kind, 1)
                        log.error("outbox: %s message refused: %s", msg.kind, exc)
                        continue
                    size = len(text) + len(msg.blob or b"")
                    if size > self.max_bytes:   # stored first, it would push every other message out, then itself
                        self._count_drop("too-large", msg.kind, 1)
                        log.error("outbox: %s message of %d bytes refused: more than the outbox's %d", msg.kind,
                                  size, self.max_bytes)
                        continue
                    captured = body.get("captured_at")
                    self._db.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?)",
                                     (seq, body["id"], msg.kind, text, msg.blob, now, size, captured))
                    self._bytes += size
                    records.append(Record(seq, body["id"], msg.kind, text, msg.blob, now, captured))
                    seq += 1
                self._set_meta("next_seq", seq)
                self._enforce_quota(now)
                self._db.execute("COMMIT")
                self._last_seq = seq - 1
                self._last_put = mark
            except BaseException:
                self._db.execute("ROLLBACK")
                self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0]
                raise
        self._notify()
        return records

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: a failed write never leaves the connection inside
        a transaction (every later put would fail with "cannot start a transaction within a transaction")."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0]
            raise

    def next_seq(self) -> int:
        """A sequence number for a message that is not stored (status, stats): same counter."""
        with self._lock, self._transaction():
            seq = self._meta("next_seq", 1)
            self._set_meta("next_seq", seq + 1)
            self._last_seq = seq
        return seq

    def ack(self, seq: int) -> bool:
        """The broker has it: delete. False when it was already gone (a duplicate PUBACK or dropped)."""
        return self.ack_many([seq]) == 1

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete several acknowledged messages in one transaction; returns how many were still there."""
        seqs = list(seqs)
        if not seqs:
            return 0
        with self._lock, self._transaction():
            gone = 0
            for seq in seqs:
                row = self._db.execute("DELETE FROM messages WHERE seq=? RETURNING size", (seq,)).fetchone()
                if row:
                    self._bytes -= row[0]
                    gone += 1
        self._notify()
        return gone

    # ------------------------------------------------------------ reading

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[Record]:
        """Unacknowledged messages in sequence order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, id, kind, body, blob, created, captured FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit)).fetchall()
        return [Record(*r) for r in rows]

    @property
    def last_seq(self) -> int:
        """The highest sequence number handed out so far (0: none); kept in memory, cheap to poll."""
        return self._last_seq

    def depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    @property
    def bytes(self) -> int:
        return self._bytes

    def dropped(self) -> dict[str, int]:
        """Persistent drop counters by reason and kind, e.g. {'bytes:frame': 3, 'age:result': 1}."""
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM meta WHERE key LIKE 'dropped:%'").fetchall()
        return {k[len("dropped:"):]: v for k, v in rows}

    def wait_changed(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait(timeout)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ internals

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                         (key, value))

    def _count_drop(self, reason: str, kind: str, n: int) -> None:
        if n:
            key = f"dropped:{reason}:{kind}"
            self._set_meta(key, self._meta(key, 0) + n)
            if reason != "non-finite":
                log.warning("outbox: dropped %d %s message(s) over the %s quota", n, kind, reason)

    def _delete(self, where: str, args: tuple, reason: str) -> None:
        rows = self._db.execute(f"DELETE FROM messages WHERE {where} RETURNING kind, size", args).fetchall()
        for kind in {r[0] for r in rows}:
            self._count_drop(reason, kind, sum(1 for r in rows if r[0] == kind))
        self._bytes -= sum(r[1] for r in rows)

    def _rebase_after_clock_step(self, now: float) -> tuple[float, float]:
        """A wall clock that stepped forward (a station without a clock battery boots near 2000, stores offline,
        and NTP sets the clock later) would age out the whole backlog stored before the step. The step is the
        wall clock's advance since the last put beyond the monotonic clock's; the backlog's times move by it, so
        each message keeps its real age."""
        mono, last = self.monotonic(), self._last_put
        if last is not None and (step := (now - last[0]) - (mono - last[1])) > STEP_S:
            self._db.execute("UPDATE messages SET created = created + ?", (step,))
            log.warning("outbox: the wall clock stepped %.0f s forward; the stored messages' times moved with it "
                        "(none dropped for an age they do not have)", step)
        return now, mono            # the caller keeps it once the put commits (a rolled-back put moved nothing)

    def _enforce_quota(self, now: float) -> None:
        """Age first; then bytes: frames (largest, re-capturable) before results, oldest first."""
        self._delete("created < ?", (now - self.max_age_s,), "age")
        for kind_clause in ("kind = 'frame'", "1"):
            while self._bytes > self.max_bytes:
                row = self._db.execute(f"SELECT seq FROM messages WHERE {kind_clause} ORDER BY seq LIMIT 1").fetchone()
                if row is None:
                    break
                self._delete("seq = ?", (row[0],), "bytes")
