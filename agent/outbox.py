"""Durable outbox: every message is on disk before it is published, and removed on PUBACK.

SQLite in WAL mode. The per-station sequence number lives in the same database
and is taken in the same transaction as the insert, so numbers are unique and
increasing across restarts and crashes. Quotas (bytes, age) drop the
lowest-value data first (frames, then the oldest messages) and count every drop.

Age is real age. The wall and boot clocks of the last put are kept in the database with the
kernel's boot id, so a wall-clock step (NTP setting a clock that started near 2000) is measured
and the stored times move with it, within one process or across a restart. Across a reboot
nothing measures it: stored times older than the age quota, or ahead of now, are then taken for a
wrong clock, and the last put counts as just now (the time the station was off is not counted).
The age quota applies when a message is stored and when messages are read for sending.

A write that fails (a full disk, an I/O error) leaves the database, the byte total and the
connection as they were before it, and raises its own error.

A database SQLite finds damaged when it is opened (flash wear, a power cut on an SD card) does
not stop the station: it is set aside with its WAL as ``<name>.bad.<UTC time>`` (the newest
``KEEP_DAMAGED`` kept), logged, counted as dropped ``corrupt:outbox-file``, and a new outbox
starts, its sequence numbers after the damaged one's where they can still be read. A file that
is not an SQLite database is refused as before, never touched.
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
CREATE TABLE IF NOT EXISTS clock (
    one      INTEGER PRIMARY KEY CHECK (one = 1),
    wall     REAL NOT NULL,
    boot     REAL NOT NULL,
    boot_id  TEXT NOT NULL
);
"""
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
SQLITE_MAGIC = b"SQLite format 3\x00"
DAMAGED = (11, 26)       # SQLITE_CORRUPT, SQLITE_NOTADB: with SQLite's header, our database damaged
KEEP_DAMAGED = 3         # damaged outbox files kept (each up to outbox.max_bytes and more)
_PROCESS_BOOT_ID = f"process-{uuid.uuid4()}"     # where the kernel names no boot: steps measured in this process only


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


STEP_S = 60.0       # the wall clock off the boot clock by more than this since the last put: a step (NTP)


@dataclass(frozen=True)
class ClockMark:
    """The wall and boot clocks at one moment, and the boot they were read in (kept in the ``clock`` table)."""

    wall: float
    boot: float
    boot_id: str


def boot_clock() -> float:
    """Seconds since boot, suspend included (CLOCK_BOOTTIME), where the system has it: one clock for every
    process of a boot, never stepped."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def current_boot_id() -> str:
    """The kernel's id of this boot; without one, an id of this process (a step is then measured only within it)."""
    try:
        return BOOT_ID_FILE.read_text().strip() or _PROCESS_BOOT_ID
    except OSError:
        return _PROCESS_BOOT_ID


class Outbox:
    def __init__(self, path: str | Path, *, max_bytes: int, max_age_s: float, synchronous: str = "normal",
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] | None = None,
                 boot_id: str | None = None) -> None:
        """``monotonic``: the clock a wall-clock step is measured against (default: the boot clock with the real
        clock; a test's own ``clock`` stands for both, so it never steps). ``boot_id``: the boot that clock
        belongs to (default: the kernel's boot id); a different one is a reboot, where nothing measures a step."""
        self.path = Path(path)
        check_outbox_path(self.path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.clock = clock
        self.monotonic = monotonic or (boot_clock if clock is time.time else clock)
        self.boot_id = boot_id or current_boot_id()
        self._mark: ClockMark | None = None         # the clocks at the last put or age check, as stored
        self._oldest: float | None = None           # at most the oldest stored message's time: when an age check is due
        self._wire_limit: tuple[int, Callable[[Record], int]] | None = None
        self._lock = threading.Lock()
        self.changed = threading.Condition()
        self._db = self._open(synchronous)
        self._settle_clock()

    def _open(self, synchronous: str) -> sqlite3.Connection:
        """Connect and read the totals; a file that is not our database is refused, never overwritten, and our
        database damaged is set aside for a new one."""
        try:
            return self._connect(synchronous)
        except OutboxError as exc:
            if not self._damaged(exc.__cause__):
                raise
            problem = exc.__cause__
        next_seq = self._salvage_next_seq()
        target = self._set_aside_damaged()
        self._db = self._connect(synchronous)
        with self._transaction():
            self._set_meta("next_seq", next_seq)
            self._count_drop("corrupt", "outbox-file", 1)
        self._last_seq = next_seq - 1
        log.error("outbox: %s is damaged (%s); set aside as %s, a new outbox started from seq %d: the messages the "
                  "damaged one held are not sent (counted as dropped corrupt:outbox-file)", self.path, problem,
                  target.name, next_seq)
        return self._db

    def _damaged(self, exc: BaseException | None) -> bool:
        """SQLite says corrupt (or not a database) of a file that starts as an SQLite database does."""
        if not isinstance(exc, sqlite3.DatabaseError):
            return False
        code = getattr(exc, "sqlite_errorcode", None)       # Python 3.11+
        if code is None and not any(w in str(exc) for w in ("malformed", "not a database")):
            return False
        if code is not None and code & 0xFF not in DAMAGED:
            return False
        try:
            with open(self.path, "rb") as f:
                return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
        except OSError:
            return False

    def _salvage_next_seq(self) -> int:
        """The damaged database's next sequence number where it can still be read; else one from the clock (ms
        since 1970: above any count a station reaches), so that numbers keep increasing for subscribers."""
        found = []
        db = None
        try:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)     # read-only: as found
            for query in ("SELECT value FROM meta WHERE key='next_seq'", "SELECT MAX(seq) + 1 FROM messages"):
                try:
                    row = db.execute(query).fetchone()
                except sqlite3.Error:
                    continue
                if row and isinstance(row[0], int):
                    found.append(row[0])
        except sqlite3.Error:
            pass
        finally:
            if db is not None:
                db.close()
        return max(found) if found else max(1, int(self.clock() * 1000))

    def _set_aside_damaged(self) -> Path:
        """``<name>`` with its -wal and -shm becomes ``<name>.bad.<UTC time>`` (and its -wal, -shm: SQLite opens
        the copy with its WAL); of those, the newest ``KEEP_DAMAGED`` stay."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target, n = self.path.with_name(f"{self.path.name}.bad.{stamp}"), 1
        while target.exists():
            target, n = self.path.with_name(f"{self.path.name}.bad.{stamp}-{n}"), n + 1
        try:
            for suffix in ("-wal", "-shm", ""):          # the database last: a crash here leaves no stray WAL
                side = Path(f"{self.path}{suffix}")
                if side.exists():
                    os.replace(side, Path(f"{target}{suffix}"))
        except OSError as exc:
            raise OutboxError(f"{self.path}: damaged, and cannot be set aside ({exc.strerror or exc})") from exc
        copies = sorted(p for p in self.path.parent.glob(f"{self.path.name}.bad.*") if not p.name.endswith(
            ("-wal", "-shm")))
        for old in copies[:max(0, len(copies) - KEEP_DAMAGED)]:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{old}{suffix}").unlink(missing_ok=True)
        return target

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        db = None
        try:
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            db.executescript(SCHEMA)
            self._bytes, self._oldest, newest = db.execute(
                "SELECT COALESCE(SUM(size), 0), MIN(created), MAX(created) FROM messages").fetchone()
            row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            mark = db.execute("SELECT wall, boot, boot_id FROM clock").fetchone()
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                db.close()
            raise OutboxError(f"{self.path}: cannot open the outbox database ({exc})") from exc
        self._last_seq = (row[0] if row else 1) - 1
        # an outbox written before the clocks were kept: its newest message stands for the last put, of no boot
        self._mark = ClockMark(*mark) if mark else None if newest is None else ClockMark(newest, 0.0, "")
        return db

    def limit_messages(self, max_bytes: int, wire_bytes: Callable[[Record], int]) -> None:
        """Refuse at store time what the publisher could never deliver: a message whose ``wire_bytes`` (its size
        as published) is over ``max_bytes`` (the broker's limit). It is counted as dropped ``too-large`` and logged,
        once; stored, it would be refused by the broker at every try (MQTT v5) or acknowledged and thrown away
        unseen (3.1.1)."""
        self._wire_limit = (max_bytes, wire_bytes)

    # ------------------------------------------------------------ writing

    def put(self, message: Message) -> Record:
        """Store one message; ValueError when its body holds NaN or an infinity (counted as dropped, non-finite)
        or it is larger than the whole outbox may hold or the broker takes (counted as dropped, too-large)."""
        stored = self.put_many([message])
        if not stored:
            raise ValueError(f"outbox: {message.kind} message refused: a non-finite number in its body, or larger "
                             f"than the outbox's {self.max_bytes} bytes or the broker's limit")
        return stored[0]

    def put_many(self, messages: Iterable[Message]) -> list[Record]:
        """Give each message an id and the next sequence number, and store them in one transaction.

        A message whose body holds NaN or an infinity is left out (logged, counted as dropped ``non-finite``):
        no subscriber can parse it, and it must not cost the other messages of the batch."""
        now, mono = self.clock(), self.monotonic()
        records: list[Record] = []
        with self._lock:
            with self._transaction():
                step = self._age_out(now, mono)
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
                    record = Record(seq, body["id"], msg.kind, text, msg.blob, now, body.get("captured_at"))
                    if self._too_large(record, size):
                        continue
                    self._db.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?)",
                                     (seq, record.id, msg.kind, text, msg.blob, now, size, record.captured))
                    self._bytes += size
                    records.append(record)
                    seq += 1
                self._set_meta("next_seq", seq)
                self._enforce_byte_quota()
            self._committed(now, mono, step)
            self._last_seq = seq - 1
            if records and (self._oldest is None or now < self._oldest):
                self._oldest = now
        self._notify()
        return records

    def _too_large(self, record: Record, size: int) -> bool:
        """Larger than the whole outbox (stored first, it would push every other message out, then itself), or
        than the broker takes: refused alone, counted and logged."""
        limit = self._wire_limit
        if size > self.max_bytes:
            why = f"{size} bytes, more than the outbox's {self.max_bytes}"
        elif limit is not None and (wire := limit[1](record)) > limit[0]:
            why = f"{wire} bytes as published, more than the broker takes (mqtt.max_message_bytes {limit[0]})"
        else:
            return False
        self._count_drop("too-large", record.kind, 1)
        log.error("outbox: %s message refused: %s", record.kind, why)
        return True

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: a failed write never leaves the connection inside
        a transaction (every later put would fail with "cannot start a transaction within a transaction")."""
        self._db.execute("BEGIN IMMEDIATE")
        before = self._bytes
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._recover(before)
            raise

    def _recover(self, before: int) -> None:
        """After a failed write: out of the transaction and the byte total as stored. SQLite has already rolled
        back after a full disk or an I/O error (a ROLLBACK then raises "no transaction is active"); whatever
        fails here is logged, never raised over the error that got here."""
        self._bytes = before
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0]
        except sqlite3.Error as exc:
            log.error("outbox: after a failed write: %s", exc)

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
        """Unacknowledged messages in sequence order; first, those past the age quota are dropped (counted), so
        a backlog that waited out a long outage with nothing new stored is not sent stale."""
        with self._lock:
            self._expire_if_due()
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

    def discard(self, seq: int, reason: str) -> bool:
        """Delete a stored message that can never be delivered, counted as dropped ``reason`` (the publisher's
        check, at send time, of a message stored before the limit it breaks was known). False: already gone."""
        with self._lock, self._transaction():
            found = self._delete("seq = ?", (seq,), reason)
        self._notify()
        return found > 0

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
            if reason in ("bytes", "age"):
                log.warning("outbox: dropped %d %s message(s) over the %s quota", n, kind, reason)

    def _delete(self, where: str, args: tuple, reason: str) -> int:
        rows = self._db.execute(f"DELETE FROM messages WHERE {where} RETURNING kind, size", args).fetchall()
        for kind in {r[0] for r in rows}:
            self._count_drop(reason, kind, sum(1 for r in rows if r[0] == kind))
        self._bytes -= sum(r[1] for r in rows)
        return len(rows)

    def _clock_step(self, now: float, mono: float) -> float:
        """Seconds the wall clock stepped since the last mark (0.0: none seen), the stored times to move by it.

        Within one boot the step is the wall clock's advance beyond the boot clock's (a station without a clock
        battery boots near 2000, stores offline, and NTP sets the clock later, maybe while the agent is down).
        Across a reboot nothing measures it: a last put older than the age quota or ahead of now is taken for a
        wrong clock, not for real age, and counts as just now; nearer ones are taken as they are."""
        last = self._mark
        if last is None:
            return 0.0
        if self._same_boot(mono):
            step = (now - last.wall) - (mono - last.boot)
            return step if abs(step) > STEP_S else 0.0
        if last.wall < now - self.max_age_s or last.wall > now + STEP_S:
            return now - last.wall
        return 0.0

    def _same_boot(self, mono: float) -> bool:
        """The last mark was taken in this boot (a boot clock that went back is another boot, whatever the id)."""
        return self._mark is not None and self._mark.boot_id == self.boot_id and mono >= self._mark.boot

    def _age_out(self, now: float, mono: float) -> float:
        """In a transaction: move the stored times by a wall-clock step, drop what is past the age quota and mark
        the clocks, so the next check measures from here. Returns the step (0.0: none)."""
        step = self._clock_step(now, mono)
        if step:
            self._db.execute("UPDATE messages SET created = created + ?", (step,))
            measured = self._same_boot(mono)
            log.warning("outbox: the wall clock stepped %+.0f s (%s); the stored messages' times moved with it "
                        "(none dropped for an age they do not have)", step,
                        "measured" if measured else "across a reboot: the last put counts as just now")
        self._delete("created < ?", (now - self.max_age_s,), "age")
        self._db.execute("INSERT INTO clock VALUES (1, ?, ?, ?) ON CONFLICT(one) DO UPDATE SET wall=excluded.wall, "
                         "boot=excluded.boot, boot_id=excluded.boot_id", (now, mono, self.boot_id))
        return step

    def _committed(self, now: float, mono: float, step: float) -> None:
        """Once an age check has committed (a rolled-back one moved nothing): its mark, the oldest time's bound."""
        self._mark = ClockMark(now, mono, self.boot_id)
        if self._oldest is not None:
            self._oldest = max(self._oldest + step, now - self.max_age_s)

    def _settle_clock(self) -> None:
        """At open, after a reboot (or from an outbox that kept no clocks): judge the stored times once, now, and
        mark this boot's clocks, so that later checks measure within this boot. Waiting for the first put, a
        station that stores nothing for long after a reboot would take its backlog's real age for a wrong clock.
        A write that fails here is logged; the first put tries again."""
        if self._mark is not None and not self._same_boot(self.monotonic()):
            try:
                self._expire_if_due(force=True)
            except sqlite3.Error as exc:
                log.error("outbox: %s: the stored times not checked at open (%s)", self.path, exc)

    def _expire_if_due(self, force: bool = False) -> None:
        """The age check at read time, when a step is seen or the oldest message may be past the quota."""
        now, mono = self.clock(), self.monotonic()
        if not force and not self._clock_step(now, mono) and (
                self._oldest is None or self._oldest >= now - self.max_age_s):
            return
        with self._transaction():
            step = self._age_out(now, mono)
        self._committed(now, mono, step)
        self._oldest = self._db.execute("SELECT MIN(created) FROM messages").fetchone()[0]
        self._notify()

    def _enforce_byte_quota(self) -> None:
        """Frames (largest, re-capturable) before results, oldest first."""
        for kind_clause in ("kind = 'frame'", "1"):
            while self._bytes > self.max_bytes:
                row = self._db.execute(f"SELECT seq FROM messages WHERE {kind_clause} ORDER BY seq LIMIT 1").fetchone()
                if row is None:
                    break
                self._delete("seq = ?", (row[0],), "bytes")
