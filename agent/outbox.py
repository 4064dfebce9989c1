"""Durable outbox: every message is on disk before it is published, and removed on PUBACK.

SQLite in WAL mode. The per-station sequence number lives in the same database
and is taken in the same transaction as the insert, so numbers are unique and
increasing across restarts and crashes. Quotas (bytes, age) drop the
lowest-value data first (frames, then the oldest messages) and count every drop.

Age is real age. The wall and boot clocks of the last put are kept in the database with the
kernel's boot id, so a wall-clock step (NTP setting a clock that started near 2000) is measured
and the stored times move with it (one offset kept in ``meta``, added to every stored time, so a
step rewrites no row), within one process or across a restart. Across a reboot
nothing measures it: stored times older than the age quota, or ahead of now, are then taken for a
wrong clock, and the last put counts as just now (the time the station was off is not counted).
The age quota applies when a message is stored and when messages are read for sending.

The files on disk (the database, its -wal and -shm) stay within ``max_bytes`` (``DISK_FLOOR`` at the
least): the quota counts the pages SQLite uses, not only the messages' bytes. ``DiskBudget`` shares it: the WAL
is truncated once a commit leaves it over its share, and one transaction writes a bounded amount (at most one
chunk of messages, ``DELETE_ROWS`` deletions), so room for one transaction's WAL is all that is kept aside. Room
for a chunk is made before it is stored, in the order the quota drops, so the database file never grows past its
share; with ``auto_vacuum=incremental`` (new files, and older ones the first time they are empty) a file over its
share (a lowered ``max_bytes``) gives pages back, ``VACUUM_PAGES`` per write. A batch larger than one chunk is
stored in several transactions, each committed before ``put_many`` returns.

A write that fails (a full disk, an I/O error) leaves the database, the byte total and the
connection as they were before its transaction, and raises its own error.

A database SQLite finds damaged when it is opened, or later at a read or write (a page the open
did not read; flash wear, a power cut on an SD card) does not stop the station: it is set aside
with its WAL as ``<name>.bad.<UTC time>`` (the newest ``KEEP_DAMAGED`` kept), logged, counted as
dropped ``corrupt:outbox-file``, and a new outbox starts, its sequence numbers after the damaged
one's where they can still be read; a batch being stored when the damage is found is stored in the
new one. A file that is not an SQLite database is refused as before, never touched.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, wraps
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
CREATE INDEX IF NOT EXISTS messages_frames ON messages (seq) WHERE kind = 'frame';
CREATE INDEX IF NOT EXISTS messages_created ON messages (created);
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

DISK_FLOOR = 4 << 20     # the least the files are bounded by: a smaller max_bytes bounds the messages' bytes only
CHUNK_ROWS = 16          # messages one transaction stores: a larger batch takes several
DELETE_ROWS = 16         # rows one transaction deletes (quota, age, acks), so its WAL stays small
VACUUM_PAGES = 16        # pages one transaction gives back to the file system
ROW_BYTES = 80           # a stored message's columns beside its JSON and JPEG, with the record's header
INDEX_BYTES = 110        # its entries in the indexes: of ids (random ids leave pages about 70% full), of times
SHM_BLOCK = 32768        # the -shm file grows by this for each 4096 WAL frames
NEW_FILE_PAGES = 16      # pages of a new outbox database before its first message (its tables and indexes)
SQLITE_PAGE = 4096       # SQLite's default page size


def row_bytes(size: int, page: int) -> float:
    """The bytes of pages one stored message of ``size`` (JSON and JPEG) takes, on the high side: its overflow
    pages (SQLite fills them), its share of a table page (whole cells per page), its id's index entry."""
    record, usable = size + ROW_BYTES, page
    max_local, min_local = usable - 35, (usable - 12) * 32 // 255 - 23
    local, overflow = record, 0
    if record > max_local:
        local = min_local + (record - min_local) % (usable - 4)
        local = local if local <= max_local else min_local
        overflow = -(-(record - local) // (usable - 4))
    cells = max(1, (usable - 8) // (local + 16))
    return overflow * page + (usable - 8) / cells + INDEX_BYTES


def pages_for(sizes: Iterable[int], page: int) -> int:
    """Pages a chunk of messages of these sizes adds to the database, with a margin for the b-trees' splits."""
    return int(sum(row_bytes(s, page) for s in sizes) * 1.02 / page) + 2


@dataclass(frozen=True)
class DiskBudget:
    """How ``max_bytes`` is shared by the database file, its WAL and the WAL's index (-shm).

    The WAL is truncated after a commit that leaves it over ``wal_rest``; one transaction then adds at most one
    chunk (``largest`` bytes of messages, ``CHUNK_ROWS`` rows), ``DELETE_ROWS`` deletions and ``VACUUM_PAGES``
    moved pages to it. What is left is the database file's: ``db_pages``."""

    page: int
    largest: int        # the most bytes of messages one transaction stores: the largest message taken
    wal_rest: int
    wal: int            # the most the WAL holds: wal_rest and one transaction
    shm: int
    db_pages: int

    @classmethod
    def of(cls, max_bytes: int, page: int, wire_limit: int | None = None) -> DiskBudget:
        total = max(max_bytes, DISK_FLOOR)
        largest = min(total // 8, (wire_limit or total) + (16 << 10))     # a frame's JSON is not all on the wire
        wal_rest = min(max(total // 32, 64 << 10), 4 << 20)
        txn_pages = pages_for([largest], page) + 2 * CHUNK_ROWS + 3 * DELETE_ROWS + 3 * VACUUM_PAGES + 16
        wal = wal_rest + 32 + txn_pages * (page + 24)
        frames = wal // (page + 24)
        shm = SHM_BLOCK * (2 + max(0, frames - 4062) // 4096)
        return cls(page, largest, wal_rest, wal, shm, (total - wal - shm) // page)


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


@dataclass
class _Staged:
    """A message checked and waiting for its transaction: its id, and its body's JSON without id and seq."""

    message: Message
    id: str
    json: str
    kept: bool = True       # False: dropped by the byte quota before it was stored

    @property
    def size(self) -> int:
        """About its size as stored (with its id and seq): what chunks and the pages it takes are judged by."""
        return len(self.json) + 60 + len(self.message.blob or b"")

    def record(self, seq: int, now: float) -> Record:
        """The record as stored: the JSON of ``{"id": ..., "seq": ..., **body}``, written around the body's."""
        body = self.message.body
        if "id" in body or "seq" in body:
            text = dumps_finite({"id": self.id, "seq": seq, **body}, separators=(",", ":"))
        else:
            text = f'{{"id":"{self.id}","seq":{seq}' + ("}" if self.json == "{}" else "," + self.json[1:])
        return Record(seq, body.get("id", self.id), self.message.kind, text, self.message.blob, now,
                      body.get("captured_at"))


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


def _outlives_damage(method: Callable[..., Any]) -> Callable[..., Any]:
    """An outbox method that finds the database damaged sets it aside, starts a new outbox (``_outlive_damage``)
    and runs once more there: a batch then is stored, a read answers from the new outbox."""
    @wraps(method)
    def guarded(self: Outbox, *args: Any, **kwargs: Any) -> Any:
        database = self._generation
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if not self._outlive_damage(exc, database):
                raise
            return method(self, *args, **kwargs)
    return guarded


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
        # held by a writer that predicted the seqs its next put will give (agent/receiving.py ReceivingDesk.stage)
        # until that put returns: a status or stats seq (next_seq) taken meanwhile would shift them
        self.seq_hold = threading.RLock()
        self.changed = threading.Condition()
        self._deletes_left = DELETE_ROWS            # what the current transaction may still delete
        self._generation = 0                        # how many times a damaged database was replaced while running
        self._busy_logged = False
        self._aside: list[tuple[Path, int]] = []    # damaged outboxes set aside beside it, oldest first, with bytes
        self._db = self._open(synchronous)
        self._tidy()
        self._settle_clock()
        self._aside = self._scan_aside()
        try:        # damaged outboxes left from before: within the bound from the start
            self._fit_aside(self._page_count())
        except sqlite3.Error as exc:
            log.error("outbox: %s: the damaged outboxes set aside not checked against outbox.max_bytes at open (%s); "
                      "the first write checks them", self.path, exc)
        if (disk := self.disk_bytes()) > max(max_bytes, DISK_FLOOR):
            log.warning("outbox: %s: its files take %d bytes, more than outbox.max_bytes %d (written by an earlier "
                        "version or under a larger max_bytes): they shrink to it as messages are stored%s", self.path,
                        disk, max_bytes, "" if self._incremental else ", from the first time the outbox is empty")

    def _open(self, synchronous: str) -> sqlite3.Connection:
        """Connect and read the totals; a file that is not our database is refused, never overwritten, and our
        database damaged is set aside for a new one."""
        self._synchronous = synchronous
        try:
            return self._connect(synchronous)
        except OutboxError as exc:
            if not self._damaged(exc.__cause__):
                raise
            return self._start_over(exc.__cause__, 1)

    def _start_over(self, problem: BaseException, next_seq: int) -> sqlite3.Connection:
        """Our database damaged: set aside, and a new outbox started with its sequence numbers after the old."""
        next_seq = max(next_seq, self._salvage_next_seq())
        target = self._set_aside_damaged()
        self._aside = self._scan_aside()
        self._fit_aside(NEW_FILE_PAGES)     # before the new files are made: the bound holds while they are
        self._db = self._connect(self._synchronous)
        with self._transaction():
            self._set_meta("next_seq", next_seq)
            self._count_drop("corrupt", "outbox-file", 1)
        self._last_seq = next_seq - 1
        log.error("outbox: %s is damaged (%s); set aside as %s, a new outbox started from seq %d: the messages the "
                  "damaged one held are not sent (counted as dropped corrupt:outbox-file)", self.path, problem,
                  target.name, next_seq)
        self._fit_aside(self._page_count())
        return self._db

    def _outlive_damage(self, exc: sqlite3.DatabaseError, database: int) -> bool:
        """SQLite finds the database damaged while running (a page the open did not read, flash wearing out): it is
        set aside and a new outbox started, as at open, so that the next write is stored; else every write to the
        end of the process, and after every restart, failed. False: not damage (the caller raises its error).
        ``database``: the outbox's generation the error came from (another thread may have replaced it since)."""
        with self._lock:
            if database != self._generation:
                return True
            if not self._damaged(exc):
                return False
            self._generation += 1
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._start_over(exc, self._last_seq + 1)
            self._tidy()
        self._notify()
        return True

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
        copies = self._scan_aside()
        for old, _ in copies[:max(0, len(copies) - KEEP_DAMAGED)]:
            self._remove_aside(old)
        return target

    def _scan_aside(self) -> list[tuple[Path, int]]:
        """The damaged outboxes set aside beside this one, oldest first, each with its bytes (with its -wal, -shm)."""
        prefix = f"{self.path.name}.bad."
        sizes: dict[str, int] = {}
        try:
            names = [p.name for p in self.path.parent.iterdir() if p.name.startswith(prefix)]
        except OSError:
            return []
        for name in names:
            base = name[:-4] if name.endswith(("-wal", "-shm")) else name
            try:
                size = os.path.getsize(self.path.parent / name)
            except OSError:
                continue
            sizes[base] = sizes.get(base, 0) + size

        def order(base: str) -> tuple[str, int]:      # <stamp>, then <stamp>-1, <stamp>-2, ... <stamp>-10
            stamp, _, n = base[len(prefix):].partition("-")
            return stamp, int(n) if n.isdigit() else 0
        return [(self.path.parent / b, sizes[b]) for b in sorted(sizes, key=order)]

    @staticmethod
    def _remove_aside(base: Path) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{base}{suffix}").unlink(missing_ok=True)

    def _fit_aside(self, pages: int) -> None:
        """The damaged outboxes set aside count in ``max_bytes`` too: when the database file's ``pages`` and theirs
        pass its share, the oldest go (logged), before any message is dropped for room. Their messages were counted
        as dropped (``corrupt:outbox-file``) when they were set aside; the files are kept only while room allows."""
        page = getattr(self, "_page", SQLITE_PAGE)      # set aside at open, before any database was read
        budget = getattr(self, "_budget", None) or DiskBudget.of(self.max_bytes, page)
        if not self._aside or pages + self._aside_pages(page) <= budget.db_pages:
            return
        self._aside = self._scan_aside()        # an operator may have moved some away
        while self._aside and pages + self._aside_pages(page) > budget.db_pages:
            base, size = self._aside.pop(0)
            try:
                self._remove_aside(base)
            except OSError as exc:
                log.error("outbox: %s: cannot remove the damaged outbox set aside (%s); the files may pass "
                          "outbox.max_bytes %d", base, exc.strerror or exc, self.max_bytes)
                return
            log.warning("outbox: removed the damaged outbox set aside as %s (%d bytes): the outbox's files are kept "
                        "within outbox.max_bytes %d", base.name, size, self.max_bytes)

    def _aside_pages(self, page: int) -> int:
        return -(-sum(size for _, size in self._aside) // page)

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        db = None
        try:
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            if db.execute("PRAGMA page_count").fetchone()[0] == 0:     # a new file: before its first page
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")            # (on a file written, it writes to it)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            # a deleted message's pages are not overwritten with zeros (Debian's and Ubuntu's SQLite do by default):
            # that wrote every acknowledged or dropped JPEG a second time, into the WAL
            db.execute("PRAGMA secure_delete=FAST")
            db.executescript(SCHEMA)
            self._page = db.execute("PRAGMA page_size").fetchone()[0]
            self._incremental = db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
            self._bytes = db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0]
            oldest, newest = db.execute("SELECT MIN(created), MAX(created) FROM messages").fetchone()   # by index
            row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            offset = db.execute("SELECT value FROM meta WHERE key='created_offset'").fetchone()
            mark = db.execute("SELECT wall, boot, boot_id FROM clock").fetchone()
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                db.close()
            raise OutboxError(f"{self.path}: cannot open the outbox database ({exc})") from exc
        self._last_seq = (row[0] if row else 1) - 1
        self._offset = float(offset[0]) if offset else 0.0
        self._oldest = None if oldest is None else oldest + self._offset
        # an outbox written before the clocks were kept: its newest message stands for the last put, of no boot
        self._mark = ClockMark(*mark) if mark else None if newest is None else ClockMark(newest + self._offset, 0.0, "")
        self._set_budget()
        return db

    def _set_budget(self) -> None:
        limit = self._wire_limit
        self._budget = DiskBudget.of(self.max_bytes, self._page, limit[0] if limit is not None else None)

    def disk_bytes(self) -> int:
        """What the outbox's files (the database, its -wal and -shm, and the damaged ones set aside) take now."""
        total = sum(size for _, size in self._scan_aside())
        for f in self._files():
            try:
                total += os.path.getsize(f)
            except FileNotFoundError:
                pass
        return total

    def _files(self) -> tuple[Path, Path, Path]:
        return self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")

    def limit_messages(self, max_bytes: int, wire_bytes: Callable[[Record], int]) -> None:
        """Refuse at store time what the publisher could never deliver: a message whose ``wire_bytes`` (its size
        as published) is over ``max_bytes`` (the broker's limit). It is counted as dropped ``too-large`` and logged,
        once; stored, it would be refused by the broker at every try (MQTT v5) or acknowledged and thrown away
        unseen (3.1.1). Nothing larger is written in one transaction, so less room is kept for the WAL."""
        with self._lock:
            self._wire_limit = (max_bytes, wire_bytes)
            self._set_budget()

    # ------------------------------------------------------------ writing

    def put(self, message: Message) -> Record:
        """Store one message; ValueError when its body holds NaN or an infinity (counted as dropped, non-finite)
        or it is larger than the outbox takes in one message or the broker takes (counted as dropped, too-large)."""
        stored = self.put_many([message])
        if not stored:
            raise ValueError(f"outbox: {message.kind} message refused: a non-finite number in its body, or larger "
                             f"than the outbox's {self.max_bytes} bytes allow for one message or the broker's limit")
        return stored[0]

    def put_many(self, messages: Iterable[Message]) -> list[Record]:
        """Give each message an id and the next sequence number, and store them: in one transaction, or in one per
        chunk (``CHUNK_ROWS`` messages, ``DiskBudget.largest`` bytes) for a larger batch.

        A message whose body holds NaN or an infinity is left out (logged, counted as dropped ``non-finite``):
        no subscriber can parse it, and it must not cost the other messages of the batch."""
        return self._put_list(list(messages), self.clock(), self.monotonic())

    @_outlives_damage
    def _put_list(self, messages: list[Message], now: float, mono: float) -> list[Record]:
        with self._lock:
            staged, refused = self._stage(messages, now)
            records = self._store(staged, refused, now, mono)
        self._notify()
        return records

    def _stage(self, messages: Iterable[Message], now: float) -> tuple[list[_Staged], list[tuple[str, str]]]:
        """Each message's JSON and size checked before any is stored; the refused as (reason, kind), logged."""
        staged: list[_Staged] = []
        refused: list[tuple[str, str]] = []
        for msg in messages:
            try:
                item = _Staged(msg, str(uuid.uuid4()), dumps_finite(msg.body, separators=(",", ":")))
            except ValueError as exc:     # NaN or infinity: never stored, never sent; the rest are
                refused.append(("non-finite", msg.kind))
                log.error("outbox: %s message refused: %s", msg.kind, exc)
                continue
            record = item.record(self._last_seq + 1 + len(staged), now)
            if self._too_large(record):
                refused.append(("too-large", msg.kind))
                continue
            staged.append(item)
        return staged, refused

    def _store(self, staged: list[_Staged], refused: list[tuple[str, str]], now: float, mono: float) -> list[Record]:
        """The age check first (its clock mark, the refused counted), then each chunk once room is made for it; every
        transaction deletes at most ``DELETE_ROWS`` rows, so a large age-out or eviction takes several."""
        chunks, records = deque(self._chunks(staged)), []
        try:
            self._store_chunks(chunks, records, refused, now, mono)
        except BaseException as exc:    # the chunks committed before it are stored: the caller can tell which
            exc.stored_records = records    # type: ignore[attr-defined]
            raise
        return records

    def _store_chunks(self, chunks: deque, records: list[Record], refused: list[tuple[str, str]], now: float,
                      mono: float) -> None:
        first, aging = True, True
        while first or aging or chunks:
            stored = None
            with self._transaction():
                if first:
                    for reason, kind in refused:
                        self._count_drop(reason, kind, 1)
                    step, aging = self._age_out(now, mono)
                elif aging:
                    aging = self._delete_aged(now)
                if not aging and chunks and self._make_room(chunks[0]):
                    stored = self._insert(chunks[0], now)
            if first:
                self._committed(now, mono, step)
                first = False
            if stored is not None:
                chunks.popleft()
                records += stored
                self._last_seq = stored[-1].seq
                if self._oldest is None or now < self._oldest:
                    self._oldest = now

    def _chunks(self, staged: list[_Staged]) -> Iterator[list[_Staged]]:
        chunk: list[_Staged] = []
        size = 0
        for item in staged:
            if chunk and (len(chunk) == CHUNK_ROWS or size + item.size > self._budget.largest):
                yield chunk
                chunk, size = [], 0
            chunk.append(item)
            size += item.size
        if chunk:
            yield chunk

    def _make_room(self, chunk: list[_Staged]) -> bool:
        """In a transaction, before a chunk is stored: delete in the quota's order (the oldest frame, then a frame
        of the chunk itself, never stored, then the oldest message) until the chunk's pages fit in the database
        file's share, so that the file never grows past it. False: this transaction may delete no more."""
        need = pages_for((item.size for item in chunk if item.kept), self._page)
        if self._aside:         # damaged outboxes set aside go before any message
            self._fit_aside(max(self._page_count(), self._used_pages() + need))
        while self._used_pages() + need > self._budget.db_pages:
            seq = self._oldest_seq("kind = 'frame'")
            if seq is None and (frame := next((i for i in chunk if i.kept and i.message.kind == "frame"), None)):
                frame.kept = False
                self._count_drop("bytes", "frame", 1)
                need = pages_for((item.size for item in chunk if item.kept), self._page)
                continue
            if seq is None and (seq := self._oldest_seq("1")) is None:
                break
            if self._deletes_left <= 0:
                return False
            self._delete("seq = ?", (seq,), "bytes")
        return True

    def _insert(self, chunk: list[_Staged], now: float) -> list[Record]:
        """In a transaction: the chunk with the next sequence numbers (a frame the quota dropped takes its number,
        as one stored and dropped would), then the byte quota and the file's share."""
        seq = self._meta("next_seq", 1)
        records = []
        for item in chunk:
            record = item.record(seq, now)
            if item.kept:
                size = len(record.text) + len(record.blob or b"")
                self._db.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?)", (seq, record.id, record.kind,
                                 record.text, record.blob, now - self._offset, size, record.captured))
                self._bytes += size
            records.append(record)
            seq += 1
        self._set_meta("next_seq", seq)
        self._enforce_byte_quota()
        self._fit_file()
        return records

    def _fit_file(self) -> None:
        """A database file over its share (pages under-estimated, a lowered max_bytes, a file from before): delete
        in the quota's order until what is used fits, and give free pages at its end back, ``VACUUM_PAGES`` at
        most (only a file with incremental auto-vacuum can)."""
        if self._aside:
            self._fit_aside(self._page_count())
        over = self._page_count() - self._budget.db_pages
        if over <= 0:
            return
        while self._used_pages() > self._budget.db_pages and self._deletes_left > 0:
            seq = self._oldest_seq("kind = 'frame'") or self._oldest_seq("1")
            if seq is None:
                break
            self._delete("seq = ?", (seq,), "bytes")
        if self._incremental:
            for _ in range(min(over, VACUUM_PAGES)):
                self._db.execute("PRAGMA incremental_vacuum(1)")      # one page a statement, as Python steps it

    def _too_large(self, record: Record) -> bool:
        """Larger than the whole outbox (stored first, it would push every other message out, then itself), than
        the room kept on disk to write one message (an eighth of the files' bound), or than the broker takes:
        refused alone, logged (the caller counts it)."""
        limit = self._wire_limit
        size = len(record.text) + len(record.blob or b"")
        eighth = max(self.max_bytes, DISK_FLOOR) // 8
        if size > self.max_bytes:
            why = f"{size} bytes, more than the outbox's {self.max_bytes}"
        elif size > eighth:
            why = (f"{size} bytes, more than an eighth of the outbox's {max(self.max_bytes, DISK_FLOOR)} ({eighth}: "
                   f"the room kept on disk to write one message)")
        elif limit is not None and (wire := limit[1](record)) > limit[0]:
            why = f"{wire} bytes as published, more than the broker takes (mqtt.max_message_bytes {limit[0]})"
        else:
            return False
        log.error("outbox: %s message refused: %s", record.kind, why)
        return True

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: a failed write never leaves the connection inside
        a transaction (every later put would fail with "cannot start a transaction within a transaction")."""
        self._db.execute("BEGIN IMMEDIATE")
        before, offset = self._bytes, self._offset
        self._deletes_left = DELETE_ROWS
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._offset = offset
            self._recover(before)
            raise
        self._tidy()

    def _tidy(self) -> None:
        """After a commit: the WAL truncated once over its share, and a database without incremental auto-vacuum
        (written by an earlier version) rebuilt with it once it holds no message (cheap then). A failure is logged:
        what was committed stands."""
        try:
            wal = self._files()[1]
            if wal.exists() and wal.stat().st_size > self._budget.wal_rest:
                busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if busy and not self._busy_logged:     # another connection reads the outbox (an operator's sqlite3)
                    self._busy_logged = True
                    log.warning("outbox: %s: the WAL cannot be truncated while another connection reads the outbox; "
                                "its files may pass outbox.max_bytes until it closes", self.path)
            if self._incremental is False and self._bytes == 0:
                self._incremental = None        # tried once in this process, whatever comes of it
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                self._db.execute("VACUUM")
                self._incremental = self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (sqlite3.Error, OSError) as exc:
            log.error("outbox: %s: after a write, the WAL not truncated or the file not rebuilt (%s)", self.path, exc)

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

    @_outlives_damage
    def next_seq(self) -> int:
        """A sequence number for a message that is not stored (status, stats): same counter. Waits while a writer
        holds ``seq_hold``."""
        with self.seq_hold, self._lock, self._transaction():
            seq = self._meta("next_seq", 1)
            self._set_meta("next_seq", seq + 1)
            self._last_seq = seq
        return seq

    def ack(self, seq: int) -> bool:
        """The broker has it: delete. False when it was already gone (a duplicate PUBACK or dropped)."""
        return self.ack_many([seq]) == 1

    @_outlives_damage
    def ack_many(self, seqs: Iterable[int]) -> int:
        """Delete several acknowledged messages in one transaction; returns how many were still there."""
        seqs = list(seqs)
        if not seqs:
            return 0
        gone = 0
        with self._lock:
            for start in range(0, len(seqs), DELETE_ROWS):     # a transaction's WAL stays small
                with self._transaction():
                    for seq in seqs[start:start + DELETE_ROWS]:
                        row = self._db.execute("DELETE FROM messages WHERE seq=? RETURNING size", (seq,)).fetchone()
                        if row:
                            self._bytes -= row[0]
                            gone += 1
        self._notify()
        return gone

    # ------------------------------------------------------------ reading

    @_outlives_damage
    def pending(self, after_seq: int = 0, limit: int = 100) -> list[Record]:
        """Unacknowledged messages in sequence order; first, those past the age quota are dropped (counted), so
        a backlog that waited out a long outage with nothing new stored is not sent stale."""
        with self._lock:
            self._expire_if_due()
            rows = self._db.execute(
                "SELECT seq, id, kind, body, blob, created, captured FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit)).fetchall()
        return [Record(seq, id_, kind, text, blob, created + self._offset, captured)
                for seq, id_, kind, text, blob, created, captured in rows]

    @property
    def last_seq(self) -> int:
        """The highest sequence number handed out so far (0: none); kept in memory, cheap to poll."""
        return self._last_seq

    @_outlives_damage
    def depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    @property
    def bytes(self) -> int:
        return self._bytes

    @_outlives_damage
    def discard(self, seq: int, reason: str) -> bool:
        """Delete a stored message that can never be delivered, counted as dropped ``reason`` (the publisher's
        check, at send time, of a message stored before the limit it breaks was known). False: already gone."""
        with self._lock, self._transaction():
            found = self._delete("seq = ?", (seq,), reason)
        self._notify()
        return found > 0

    @_outlives_damage
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
        self._deletes_left -= len(rows)
        return len(rows)

    def _oldest_seq(self, where: str) -> int | None:
        row = self._db.execute(f"SELECT seq FROM messages WHERE {where} ORDER BY seq LIMIT 1").fetchone()
        return row[0] if row else None

    def _page_count(self) -> int:
        return self._db.execute("PRAGMA page_count").fetchone()[0]

    def _used_pages(self) -> int:
        return self._page_count() - self._db.execute("PRAGMA freelist_count").fetchone()[0]

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

    def _age_out(self, now: float, mono: float) -> tuple[float, bool]:
        """In a transaction: move the stored times by a wall-clock step, drop what is past the age quota and mark
        the clocks, so the next check measures from here. Returns the step (0.0: none), and whether more past the
        quota may be left (this transaction's deletions spent)."""
        step = self._clock_step(now, mono)
        if step:        # one number, not every row rewritten: a full outbox's pages would all go through the WAL
            self._offset += step
            self._set_meta("created_offset", self._offset)
            measured = self._same_boot(mono)
            log.warning("outbox: the wall clock stepped %+.0f s (%s); the stored messages' times moved with it "
                        "(none dropped for an age they do not have)", step,
                        "measured" if measured else "across a reboot: the last put counts as just now")
        more = self._delete_aged(now)
        self._db.execute("INSERT INTO clock VALUES (1, ?, ?, ?) ON CONFLICT(one) DO UPDATE SET wall=excluded.wall, "
                         "boot=excluded.boot, boot_id=excluded.boot_id", (now, mono, self.boot_id))
        return step, more

    def _delete_aged(self, now: float) -> bool:
        """In a transaction: drop what is past the age quota, as much as it may delete; True: more may be left."""
        limit = self._deletes_left
        if limit <= 0:
            return True
        return self._delete("seq IN (SELECT seq FROM messages WHERE created < ? ORDER BY created LIMIT ?)",
                            (now - self.max_age_s - self._offset, limit), "age") >= limit

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
            step, more = self._age_out(now, mono)
        self._committed(now, mono, step)
        while more:
            with self._transaction():
                more = self._delete_aged(now)
        oldest = self._db.execute("SELECT MIN(created) FROM messages").fetchone()[0]
        self._oldest = None if oldest is None else oldest + self._offset
        self._notify()

    def _enforce_byte_quota(self) -> None:
        """Frames (largest, re-capturable) before results, oldest first."""
        for kind_clause in ("kind = 'frame'", "1"):     # frames: through their own index, never a scan of all
            while self._bytes > self.max_bytes:
                seq = self._oldest_seq(kind_clause)
                if seq is None:
                    break
                self._delete("seq = ?", (seq,), "bytes")
