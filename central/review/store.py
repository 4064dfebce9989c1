"""Durable store of low-confidence frames: JPEG files plus a SQLite index with their metadata and review.

Layout under the store folder::

    frames.sqlite                          index (WAL): one row per frame message id
    images/<site>/<station>/<YYYYMMDD>/<id>.jpg           a low-confidence frame (the review queue)
    images/<site>/<station>/<YYYYMMDD>/<id>.context.jpg   its ROI context, when the station sent one
    empty-scenes/<site>/<station>/<camera>/<YYYYMMDD>/<id>.jpg   an empty scene (a background, never reviewed)

``<id>`` is ``file_stem(id)``: the id itself where it is a plain name (every UUID), else a plain form and a
hash of it, so that two ids never share a file. Each row keeps its file's path: a file is found by its row,
never by computing its name again (stores written before the hash was added keep their names).

A frame is written inside one write transaction (``BEGIN IMMEDIATE``: SQLite's write lock, held across
processes): the duplicate and quota checks, the JPEG to a temporary name, fsync, rename, its folder fsynced
(and any folder made for it, in its parent), then the row, commit: once the commit returns (and the ingest
service acknowledges the message), a power cut loses neither the row nor the file it names. A crash in
between leaves at most an image without a row; ``FrameStore`` removes such orphans when it opens (the ingest
service has not acknowledged that message, so the broker sends it again). The open walks the folders without
the lock (other workers go on writing) and checks the files it found without a row again under it, so it
never takes a file that another process (a second ingest worker, the review server beside the ingest
service) is still writing. Duplicates (a QoS 1 redelivery carries the same message id) are stored once. A
byte quota, kept in the store: above ``warn_fraction`` a warning is logged and flagged in ``stats()``; at
the quota new frames are refused and counted, and nothing already stored is ever deleted to make room.

Each row also keeps the frame's margin (top-1 minus top-2 probability of its ``top_k``), so a
reviewer with a limited labelling budget can take the least certain frames first
(``list(order="least-certain")``), or the same with the predicted classes taking turns
(``order="least-certain-by-class"``: every class's least certain frame, then every class's second, ...),
so that one confusion the model makes often does not use up the whole budget. Stores written before the
column existed get it, filled from their ``top_k``, the first time they are opened.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from central.review import checks
from central.review.checks import MAX_JPEG_BYTES, MAX_PIXELS, FrameCheckError
from contract.dataset import CLASS_NAME_MAX, class_name_problem
from contract.events import fsync_dir

log = logging.getLogger(__name__)

DB_NAME = "frames.sqlite"
STATUSES = ("pending", "labelled", "skipped", "new_class", "defect")
ACTIONS = ("label", "skip", "new_class", "defect", "undo")
MAX_CLASS_NAME = CLASS_NAME_MAX  # characters of a new class's or a defect's name (an exported dataset's folder name)
# the pending frames of a frame's item (its station, camera and track; this frame too while pending); 0 without one
ITEM_PENDING = ("(SELECT COUNT(*) FROM frames AS g WHERE f.track IS NOT NULL AND g.site = f.site AND "
                "g.station = f.station AND g.camera = f.camera AND g.track = f.track AND g.status = 'pending') "
                "AS item_pending")
INTERNAL_COUNTERS = ("bytes_stored",)
# the ingest service's MQTT callback errors (``contract.broker.guard_hooks``), one counter per callback:
# ``mqtt_callback_errors:on_message``; the time of the last one recorded in settings
CALLBACK_ERRORS = "mqtt_callback_errors"
FILTERS = ("status", "site", "station", "camera", "model_version", "predicted")
FACETS = ("site", "station", "camera", "model_version", "predicted")   # the filters ``facets()`` lists values of
FACET_LIMIT = 200                  # values listed per facet, the busiest (a list a reviewer can still read)
MAX_FACET_LIMIT = 1000
ORDERS = ("oldest", "newest", "least-certain", "least-certain-by-class")
BY_MARGIN = "margin IS NULL, margin ASC, received_at ASC, id"      # least certain first; no margin last, oldest first
# A page of the queue, the facets and the stats are read from indexes alone (the page asks for all three every
# 3 s, at 100k frames a scan of the table each): the queue's orders (a page's ids, with the rows it skips at an
# offset never read), and each facet's distinct values.
QUEUE_INDEXES = (("frames_queue", "status, received_at, id"), ("frames_certainty", f"status, {BY_MARGIN}"),
                 ("frames_class_certainty", f"status, predicted, {BY_MARGIN}"),
                 *((f"frames_by_{c}", c) for c in ("station", "camera", "model_version", "predicted", "label")))
EMPTY_SCENES_DIR = "empty-scenes"
LOCK_WAIT_S = 60                   # how long an open or a write waits for another process's lock on the store
MAX_CONTEXT_BYTES = 64 * 1024      # the ROI context JPEG (the station sends at most 160 px, a few kB)
MAX_CONTEXT_SIDE = 1024
REVIEWED_PAGE = 256                # reviewed frames read at a time by iter_reviewed (an export, an enrolment)
EMPTY_SCENES_PAGE = 256            # empty scenes read at a time by iter_empty_scenes (a backgrounds export)
QUARANTINE_MAX_ROWS = 1000         # the newest refused messages kept; older ones go (the counter keeps counting)
QUARANTINE_MAX_PAYLOAD = 64 * 1024  # bytes of each refused payload kept (its full size is recorded)
QUARANTINE_MAX_PROPERTY = 16 * 1024  # characters of each of its MQTT user property values kept
QUARANTINE_MAX_PROPERTIES = 64 * 1024  # characters of all its user properties kept (MQTT bounds neither count
                                       # nor size of them)
NAME_PART_BYTES = 120              # a folder named after a site, station or camera (file systems: 255 at most)
PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")   # a frame id that names its files as it is (``file_stem``)

SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id TEXT PRIMARY KEY,
    seq INTEGER, site TEXT NOT NULL, station TEXT NOT NULL, camera TEXT NOT NULL, frame_seq INTEGER,
    captured_at REAL, ts REAL,
    model_name TEXT, model_version TEXT, predicted TEXT, confidence REAL,
    top_k TEXT, selected_because TEXT, source_ref TEXT, meta TEXT NOT NULL,
    received_at REAL NOT NULL, image TEXT NOT NULL, bytes INTEGER NOT NULL, sha256 TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', label TEXT, defect TEXT, reviewer TEXT, reviewed_at REAL, note TEXT,
    margin REAL
);
CREATE INDEX IF NOT EXISTS frames_status ON frames(status, received_at);
CREATE INDEX IF NOT EXISTS frames_station ON frames(site, station);
CREATE TABLE IF NOT EXISTS empty_scenes (
    id TEXT PRIMARY KEY,
    seq INTEGER, site TEXT NOT NULL, station TEXT NOT NULL, camera TEXT NOT NULL, frame_seq INTEGER,
    captured_at REAL, ts REAL, model_name TEXT, model_version TEXT, trigger TEXT, source_ref TEXT,
    meta TEXT NOT NULL, received_at REAL NOT NULL, image TEXT NOT NULL, bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL, width INTEGER, height INTEGER
);
CREATE INDEX IF NOT EXISTS empty_scenes_camera ON empty_scenes(site, station, camera, captured_at);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value NOT NULL);
CREATE TABLE IF NOT EXISTS classes (name TEXT PRIMARY KEY, kind TEXT NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
    bytes INTEGER NOT NULL, payload BLOB NOT NULL, properties TEXT NOT NULL
);
"""


class StoreError(ValueError):
    """Bad input to the store: names the frame or field and what was wrong."""


class UnknownFrame(StoreError):
    pass


class ReviewConflict(StoreError):
    """A decision given for a frame as it was (``expect``) that has been decided otherwise meanwhile (another
    reviewer); nothing was changed."""


@dataclass(frozen=True)
class AddResult:
    outcome: str            # stored | duplicate | refused
    frame_id: str
    reason: str | None = None


def context_jpeg(meta: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """(the ROI context JPEG a frame carries in ``context.roi_jpeg_b64``, why it was refused); (None, None)
    when the frame has none. Checked like the frame's own JPEG: base64, size, header size, decodable."""
    context = meta.get("context")
    if not isinstance(context, dict) or context.get("roi_jpeg_b64") in (None, ""):
        return None, None
    what = "field context.roi_jpeg_b64"
    try:
        data = base64.b64decode(context["roi_jpeg_b64"], validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        return None, f"{what}: not base64 ({exc})"
    try:
        # the side bounds the pixels (MAX_CONTEXT_SIDE squared) before anything decodes
        width, height = checks.check_jpeg_header(data, what, max_pixels=2 ** 32, max_bytes=MAX_CONTEXT_BYTES)
        if max(width, height) > MAX_CONTEXT_SIDE:
            return None, f"{what}: {width}x{height} px, larger than {MAX_CONTEXT_SIDE} px"
        checks.decoded_shape(data, what)
    except FrameCheckError as exc:
        return None, str(exc)
    return data, None


def make_folders(folder: Path) -> None:
    """``mkdir -p folder``, each folder it made synced into its parent: a frame is acknowledged once its row is
    committed, and a power cut must not then lose the new day's (or station's) folder that holds its file."""
    made = []
    while not folder.is_dir() and folder.parent != folder:
        made.append(folder)
        folder = folder.parent
    if not made:
        return
    made[0].mkdir(parents=True, exist_ok=True)
    for new in made:            # deepest first: each new folder's entry in its parent
        fsync_dir(new.parent)


def _safe(part: str) -> str:
    """A folder name from station-supplied text: no separators, no dot names, at most ``NAME_PART_BYTES`` bytes
    (a file system refuses a name over 255). Two values may share one (``cam:1``, ``cam_1``); the files in it do
    not (``file_stem``)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in part)
    cleaned = cleaned.encode("utf-8")[:NAME_PART_BYTES].decode("utf-8", "ignore").strip(".")
    return cleaned or "_"


def file_stem(frame_id: str) -> str:
    """The name of a frame's files (``<stem>.jpg``, ``<stem>.context.jpg``) and of its exported copy: the id itself
    when it is a plain name (letters, digits, ``-``, ``_``; at most 64: every UUID a station sends), else its
    first 64 characters made plain, ``~`` and 16 hex digits of the id's SHA-256. Two ids never share a name
    (until 2026-12-07 ``frame:1`` and ``frame_1`` did, and the second frame's JPEG replaced the first's), and no
    stem holds a dot, so a frame's image is never another frame's context image."""
    return frame_id if PLAIN_ID.fullmatch(frame_id) else _hashed_stem(frame_id)


def _hashed_stem(frame_id: str) -> str:
    plain = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in frame_id[:64])
    return f"{plain}~{hashlib.sha256(frame_id.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


class FrameStore:
    def __init__(self, root: str | Path, *, max_bytes: int | None = None, warn_fraction: float | None = None,
                 labels: list[str] | None = None, max_pixels: int = MAX_PIXELS,
                 max_jpeg_bytes: int = MAX_JPEG_BYTES) -> None:
        """``max_bytes``/``warn_fraction``: the quota, kept in the store for every process that opens it
        (the review server shows what the ingest service enforces); ``None`` keeps the stored setting,
        ``max_bytes=0`` removes the quota. ``max_pixels``/``max_jpeg_bytes``: the largest frame JPEG taken
        (its header's width x height, checked before decoding; its size)."""
        if max_bytes is not None and max_bytes < 0:
            raise StoreError(f"max_bytes must be positive (0: no quota), got {max_bytes}")
        if warn_fraction is not None and not 0 < warn_fraction <= 1:
            raise StoreError(f"warn_fraction must be in (0, 1], got {warn_fraction}")
        if max_pixels < 1 or max_jpeg_bytes < 1:
            raise StoreError(f"max_pixels and max_jpeg_bytes must be positive, got {max_pixels}, {max_jpeg_bytes}")
        self.max_pixels, self.max_jpeg_bytes = max_pixels, max_jpeg_bytes
        self.root = Path(root)
        self.images = self.root / "images"
        self.base_labels = list(labels or [])
        self._lock = threading.RLock()
        self._warned = False
        self.read_only, self._read_only_uri = False, ""
        try:
            make_folders(self.root)
            # timeout: how long to wait for another process's write lock (a busy store shared by several workers)
            self._db = sqlite3.connect(self.root / DB_NAME, check_same_thread=False, isolation_level=None,
                                       timeout=LOCK_WAIT_S)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(self._cannot_open(exc)) from exc
        self._db.row_factory = sqlite3.Row
        try:
            self._open(max_bytes, warn_fraction)
        except (OSError, sqlite3.Error) as exc:
            self._db.close()
            if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.OperationalError):
                raise StoreError(self._cannot_open(exc)) from exc      # locked, disk, permissions: not the content
            # "file is not a database", "database disk image is malformed": said with the file, which is kept
            raise StoreError(f"{self.root / DB_NAME}: not a readable frame store index ({exc}); nothing was changed "
                             f"in it (restore it from a backup, or move it away to start an empty store)") from None

    @classmethod
    def open_read_only(cls, root: str | Path) -> "FrameStore":
        """The store opened to read it only (``labels export``): nothing in its folder is created, migrated,
        reconciled or checkpointed, so a folder this user cannot write (the ingest service's, a read-only mount, a
        backup) can be read, and every file in it is left as it was. SQLite's ``mode=ro``: a writer's committed
        frames still in its WAL are read; where the folder cannot be written and no writer has the store open
        (no ``frames.sqlite-wal`` to read), the index is read as the file holds it (``immutable``). StoreError
        naming the file where there is no store, or one written before a column it reads (open it once with
        ingest or review, which add it). Any write on it fails ("attempt to write a readonly database")."""
        self = cls.__new__(cls)
        self.max_pixels, self.max_jpeg_bytes = MAX_PIXELS, MAX_JPEG_BYTES
        self.root = Path(root)
        self.images = self.root / "images"
        self.base_labels, self._lock, self._warned, self.read_only = [], threading.RLock(), False, True
        self.reconciled = {"orphan_images_removed": 0, "rows_without_image": 0}     # a reader reconciles nothing
        db = self.root / DB_NAME
        if not db.is_file():
            raise StoreError(f"{db}: no such file; {self.root} is not a frame store (the --store folder of "
                             f"'python -m central ingest')")
        self._read_only_uri = f"file:{urllib.parse.quote(str(db.absolute()))}?mode=ro"
        try:
            try:
                self._db = self._read_only_connection(probe=True)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorname not in ("SQLITE_READONLY_DIRECTORY", "SQLITE_CANTOPEN") \
                        or db.with_name(DB_NAME + "-wal").exists():
                    raise
                # a folder we cannot write and no writer's WAL in it: the index file is the whole store
                self._read_only_uri += "&immutable=1"
                self._db = self._read_only_connection(probe=True)
        except sqlite3.OperationalError as exc:
            raise StoreError(f"{self.root}: the frame store cannot be opened to read ({type(exc).__name__}: {exc}); "
                             f"it needs read permission on {DB_NAME} (and, while a writer has the store open, on "
                             f"{DB_NAME}-wal and -shm) and a file-size limit (ulimit -f) above the 32 kB of "
                             f"{DB_NAME}-shm") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{db}: not a readable frame store index ({exc}); nothing was changed in it") from None
        try:
            self._check_columns(db)
            # a damaged page may answer some queries with nothing rather than an error (the writable open reads
            # every row as it reconciles and so meets it); SQLite's quick check reads every page once
            checked = self._db.execute("PRAGMA quick_check(1)").fetchone()
            if checked is None or checked[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {checked[0] if checked else 'no answer'}")
            self._read_quota()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"{db}: not a readable frame store index ({exc}); nothing was changed in it") from None
        except BaseException:
            self._db.close()
            raise
        return self

    def _read_only_connection(self, probe: bool = False) -> sqlite3.Connection:
        """A connection of ``open_read_only``'s; ``probe``: read the schema once (SQLite opens lazily), closing it
        again where that fails."""
        db = sqlite3.connect(self._read_only_uri, uri=True, check_same_thread=False, isolation_level=None,
                             timeout=LOCK_WAIT_S)
        db.row_factory = sqlite3.Row
        if probe:
            try:
                db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            except BaseException:
                db.close()
                raise
        return db

    def _check_columns(self, db: Path) -> None:
        """StoreError naming ``db`` where the index lacks a column this version reads (a read-only open adds none)."""
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(frames)")}
        if not columns:
            raise StoreError(f"{db}: not a frame store index (it has no frames table)")
        missing = [c for c in ("margin", "context_image", "context_bytes", "track") if c not in columns]
        if missing:
            raise StoreError(f"{db}: written by an older version (no column {', '.join(missing)}); open it once with "
                             f"'python -m central ingest' or 'review' (which add it), then read it again")

    def _cannot_open(self, exc: BaseException) -> str:
        """Why the store could not be opened, in one line: SQLite's own words ("disk I/O error", "unable to open
        database file", "attempt to write a readonly database") name neither the store nor what to check."""
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        hint = (f"another process held its write lock for {LOCK_WAIT_S} s" if "locked" in cause else
                "it needs a folder it can write in, room on its disk and a file-size limit (ulimit -f) above its files")
        return f"{self.root}: the frame store cannot be opened ({type(exc).__name__}: {cause}); {hint}"

    def _open(self, max_bytes: int | None, warn_fraction: float | None) -> None:
        self._wal(deadline=time.monotonic() + LOCK_WAIT_S)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._add_columns()
        self.max_bytes, self.warn_fraction = self._quota_settings(max_bytes, warn_fraction)
        self.reconciled = self._reconcile()
        self._check_quota(self.used_bytes())

    def _wal(self, deadline: float) -> None:
        """Switch the store to WAL, waiting for another process's write to end: SQLite refuses the switch at
        once ("database is locked", no busy wait) while another connection is in a write transaction on a
        store still in its first journal mode, e.g. the review server and ingest opening a new store together."""
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _quota_settings(self, max_bytes: int | None, warn_fraction: float | None) -> tuple[int | None, float]:
        with self._lock, self._write():
            if max_bytes == 0:
                self._db.execute("DELETE FROM settings WHERE name = 'max_bytes'")
            elif max_bytes is not None:
                self._db.execute("INSERT OR REPLACE INTO settings(name, value) VALUES ('max_bytes', ?)", (max_bytes,))
            if warn_fraction is not None:
                self._db.execute("INSERT OR REPLACE INTO settings(name, value) VALUES ('warn_fraction', ?)",
                                 (warn_fraction,))
        return self._read_quota()

    def _read_quota(self) -> tuple[int | None, float]:
        """The quota as last set by any process on this store (another ingest worker may have changed it)."""
        stored = {r["name"]: r["value"] for r in self._db.execute("SELECT name, value FROM settings")}
        self.max_bytes = int(stored["max_bytes"]) if "max_bytes" in stored else None
        self.warn_fraction = float(stored.get("warn_fraction", 0.9))
        return self.max_bytes, self.warn_fraction

    def _add_columns(self) -> None:
        """Stores from before a column: add it, once, under the write lock (so two processes opening the same old
        store do not both try); a column filled from another is computed from each stored row (None stays NULL):
        ``margin`` from the row's top_k, ``track`` from its metadata where that holds a track id. Then the indexes."""
        added = (("margin", "REAL", ("top_k", lambda raw: top_k_margin(json.loads(raw or "[]")))),
                 ("context_image", "TEXT", None), ("context_bytes", "INTEGER", None),
                 ("track", "TEXT", ("meta", _stored_track)))
        with self._lock, self._write():
            columns = {r["name"] for r in self._db.execute("PRAGMA table_info(frames)")}
            for name, kind, filled_from in added:
                if name in columns:
                    continue
                self._db.execute(f"ALTER TABLE frames ADD COLUMN {name} {kind}")
                if filled_from is not None:
                    source, compute = filled_from
                    rows = self._db.execute(f"SELECT id, {source} FROM frames").fetchall()
                    values = [(v, r["id"]) for r in rows if (v := compute(r[source])) is not None]
                    self._db.executemany(f"UPDATE frames SET {name} = ? WHERE id = ?", values)
                    log.info("%s: added the %s column, filled for %d of %d stored frames", self.root, name,
                             len(values), len(rows))
            self._db.execute("CREATE INDEX IF NOT EXISTS frames_margin ON frames(status, margin)")
            self._db.execute("CREATE INDEX IF NOT EXISTS frames_track ON frames(site, station, camera, track)")
            for name, columns in QUEUE_INDEXES:
                self._db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON frames({columns})")

    def _known_files(self) -> set[str]:
        """Every file a row names: frames, their context images, empty scenes."""
        rows = self._db.execute("SELECT image FROM frames UNION ALL SELECT context_image FROM frames "
                                "WHERE context_image IS NOT NULL UNION ALL SELECT image FROM empty_scenes")
        return {row[0] for row in rows}

    # ------------------------------------------------------------ integrity

    def _reconcile(self) -> dict[str, int]:
        """Images without a row (a crash between file and commit) are removed; rows without an image are reported.

        The folders are walked without the write lock (a large store takes seconds, and other workers keep
        writing meanwhile); only the files found without a row are checked again under it. Every writer holds
        the lock from before its file until its commit, so a file that still has no row once we hold the lock
        belongs to no write in progress: it is a crash's leftover."""
        with self._lock:
            known = self._known_files()
        candidates = [p for folder in (self.images, self.root / EMPTY_SCENES_DIR) if folder.is_dir()
                      for p in folder.rglob("*") if p.is_file() and p.relative_to(self.root).as_posix() not in known]
        orphans = 0
        with self._lock, self._write():
            for path in candidates:
                rel = path.relative_to(self.root).as_posix()
                if path.is_file() and not self._db.execute(
                        "SELECT 1 FROM frames WHERE image = ?1 OR context_image = ?1 "
                        "UNION ALL SELECT 1 FROM empty_scenes WHERE image = ?1", (rel,)).fetchone():
                    path.unlink(missing_ok=True)
                    orphans += 1
            if self._db.execute("SELECT 1 FROM counters WHERE name = 'bytes_stored'").fetchone() is None:
                self._bump("bytes_stored", int(self._db.execute(
                    "SELECT (SELECT COALESCE(SUM(bytes) + SUM(COALESCE(context_bytes, 0)), 0) FROM frames) + "
                    "(SELECT COALESCE(SUM(bytes), 0) FROM empty_scenes)").fetchone()[0]))
        # rows are never deleted and their files never removed, so this needs no lock
        with self._lock:
            rows = self._db.execute("SELECT id, image FROM frames UNION ALL "
                                    "SELECT id, image FROM empty_scenes").fetchall()
        missing = [row["id"] for row in rows if not (self.root / row["image"]).is_file()]
        if orphans:
            log.warning("%s: removed %d image file(s) without an index row (an interrupted write; the broker "
                        "redelivers those frames)", self.root, orphans)
        if missing:
            log.error("%s: %d indexed frame(s) have lost their image file, e.g. %s", self.root, len(missing),
                      missing[0])
        return {"orphan_images_removed": orphans, "rows_without_image": len(missing)}

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction holding SQLite's write lock (shared with other processes on this store)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------ counters

    def _bump(self, name: str, by: int = 1) -> None:
        self._db.execute("INSERT INTO counters(name, value) VALUES (?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, by))

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {r["name"]: r["value"] for r in self._db.execute("SELECT name, value FROM counters")
                    if r["name"] not in INTERNAL_COUNTERS}

    def used_bytes(self) -> int:
        """Bytes of JPEG stored, as committed by every process writing to this store."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = 'bytes_stored'").fetchone()
        return int(row[0]) if row else 0

    def count(self, name: str, by: int = 1) -> None:
        """Count an event outside ``add``."""
        with self._lock, self._write():
            self._bump(name, by)

    def count_callback_errors(self, new: dict[str, int]) -> None:
        """Add the ingest service's new MQTT callback errors (callback name -> how many since it last counted) and
        note when: the review server, another process, shows them (``stats()["mqtt_callback_errors"]``)."""
        with self._lock, self._write():
            for hook, n in new.items():
                self._bump(f"{CALLBACK_ERRORS}:{hook}", n)
            self._db.execute("INSERT OR REPLACE INTO settings(name, value) VALUES (?, ?)",
                             (f"{CALLBACK_ERRORS}_at", time.time()))

    def callback_errors(self) -> dict[str, Any]:
        """The ingest service's MQTT callback errors counted in this store: ``total``, ``by_callback`` and
        ``last_at`` (Unix seconds of the last count, None when none). Each is a defect (logged with its traceback
        in ingest's log): a message callback that raised left its message unstored and unacknowledged."""
        prefix = f"{CALLBACK_ERRORS}:"
        with self._lock:
            by_callback = {r["name"][len(prefix):]: r["value"] for r in self._db.execute(
                "SELECT name, value FROM counters WHERE substr(name, 1, ?) = ? ORDER BY name", (len(prefix), prefix))}
            last = self._db.execute("SELECT value FROM settings WHERE name = ?", (f"{CALLBACK_ERRORS}_at",)).fetchone()
        return {"total": sum(by_callback.values()), "by_callback": by_callback,
                "last_at": float(last[0]) if last is not None else None}

    # ------------------------------------------------------------ quarantine

    def quarantine(self, topic: str, payload: bytes, properties: list[tuple[str, str]], reason: str) -> int:
        """Keep a refused message (its topic, the first ``QUARANTINE_MAX_PAYLOAD`` bytes of its payload, its
        user properties up to ``QUARANTINE_MAX_PROPERTIES`` characters in all, why) and count it (``malformed``);
        the newest ``QUARANTINE_MAX_ROWS`` are kept. Returns its number in the quarantine."""
        kept = _kept_properties(properties)
        with self._lock, self._write():
            seq = self._db.execute(
                "INSERT INTO quarantine(received_at, topic, reason, bytes, payload, properties) VALUES (?,?,?,?,?,?)",
                (time.time(), _printable(topic, 1024), _printable(reason, 4096), len(payload),
                 bytes(payload[:QUARANTINE_MAX_PAYLOAD]), json.dumps(kept))).lastrowid
            self._db.execute("DELETE FROM quarantine WHERE seq <= ?", (seq - QUARANTINE_MAX_ROWS,))
            self._bump("malformed")
        return int(seq)

    def list_quarantine(self, *, limit: int = 50, offset: int = 0,
                        payload: bool = False) -> tuple[list[dict[str, Any]], int]:
        """The quarantined messages kept, newest first, and how many are kept in all (the ``malformed``
        counter counts every one ever refused). ``payload``: include the kept bytes as ``payload_b64``."""
        if not 1 <= limit <= 1000 or offset < 0:
            raise StoreError("field limit: 1..1000, offset: >= 0")
        with self._lock:
            total = self._db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
            rows = self._db.execute("SELECT * FROM quarantine ORDER BY seq DESC LIMIT ? OFFSET ?",
                                    (limit, offset)).fetchall()
        out = []
        for row in rows:
            entry = {"seq": row["seq"], "received_at": row["received_at"], "topic": row["topic"],
                     "reason": row["reason"], "bytes": row["bytes"], "kept_bytes": len(row["payload"]),
                     "properties": checks.stored_json(row["properties"], [], f"quarantine {row['seq']}")}
            if payload:
                entry["payload_b64"] = base64.b64encode(row["payload"]).decode()
            out.append(entry)
        return out, int(total)

    # ------------------------------------------------------------ add

    def add(self, meta: dict[str, Any], jpeg: bytes) -> AddResult:
        """Store one frame message (``frame.v1`` metadata + JPEG bytes); idempotent by message id.

        A low-confidence frame goes to the review queue, with its ROI context (``context.roi_jpeg_b64``) as
        a file beside it; a context that fails the checks is left out, logged and counted
        (``context_refused``), and the frame is stored without it. An empty-scene frame (``kind:
        empty-scene``) is kept apart (``list_empty_scenes``): it is never reviewed."""
        if not isinstance(meta, dict):
            raise StoreError(f"frame metadata: expected an object, got {type(meta).__name__}")
        frame_id = meta.get("id")
        if not isinstance(frame_id, str) or not frame_id:
            raise StoreError("frame metadata: field id: missing or not a string")
        try:
            checks.text(frame_id, "id", 128)
            for name in ("site", "station", "camera"):
                if not checks.text(meta.get(name), name, 256):
                    raise StoreError(f"frame {frame_id}: field {name}: missing or not a string")
            shape = self._checked_jpeg(meta, jpeg)
            common = self._common_values(meta)
        except FrameCheckError as exc:
            raise StoreError(f"frame {frame_id}: {exc}") from None
        if meta.get("kind") == "empty-scene":
            return self._add_empty_scene(frame_id, meta, jpeg, shape, common)
        try:
            label = checks.text(meta.get("label"), "label")
            confidence = checks.real(meta.get("confidence"), "confidence")
            top_k = checks.json_text(meta.get("top_k") or [], "top_k")
            selected_because = checks.json_text(meta.get("selected_because") or [], "selected_because")
            margin = checks.real(top_k_margin(meta.get("top_k")), "top_k")
            track = checks.track(meta.get("track"))
        except FrameCheckError as exc:
            raise StoreError(f"frame {frame_id}: {exc}") from None
        day = time.strftime("%Y%m%d", time.gmtime())
        folder = Path("images") / _safe(meta["site"]) / _safe(meta["station"]) / day
        context, problem = context_jpeg(meta)
        if problem:
            log.warning("frame %s from %s/%s: ROI context refused, the frame is stored without it: %s", frame_id,
                        meta["site"], meta["station"], problem)
        try:
            kept = checks.json_text(_without_context_jpeg(meta), "meta")
        except FrameCheckError as exc:
            raise StoreError(f"frame {frame_id}: {exc}") from None
        seq, frame_seq, captured_at, ts, model_name, model_version, source_ref = common

        def insert(files: list[tuple[Path, bytes]]) -> None:
            rel, context_rel = files[0][0], files[1][0] if len(files) > 1 else None
            self._db.execute(
                "INSERT INTO frames(id, seq, site, station, camera, frame_seq, captured_at, ts, model_name, "
                "model_version, predicted, confidence, top_k, selected_because, source_ref, meta, "
                "received_at, image, bytes, sha256, margin, context_image, context_bytes, track) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (frame_id, seq, meta["site"], meta["station"], meta["camera"], frame_seq, captured_at, ts,
                 model_name, model_version, label, confidence, top_k, selected_because, source_ref, kept,
                 time.time(), rel.as_posix(), len(jpeg), hashlib.sha256(jpeg).hexdigest(), margin,
                 context_rel.as_posix() if context_rel else None, len(context) if context is not None else None,
                 track))
            self._bump("stored")
            if problem:
                self._bump("context_refused")

        def files(stem: str) -> list[tuple[Path, bytes]]:
            return [(folder / f"{stem}.jpg", jpeg)] + ([(folder / f"{stem}.context.jpg", context)]
                                                       if context is not None else [])

        return self._add_files("frames", frame_id, meta, files, insert)

    def _checked_jpeg(self, meta: dict[str, Any], jpeg: bytes) -> tuple[int, int]:
        """(height, width) of the frame's JPEG: its size and header bounded, its header agreeing with the
        metadata's ``jpeg.width``/``jpeg.height``, then decoded (only once all that holds)."""
        width, height = checks.check_jpeg_header(jpeg, "the payload", max_pixels=self.max_pixels,
                                                 max_bytes=self.max_jpeg_bytes)
        declared = meta.get("jpeg")
        if isinstance(declared, dict) and "width" in declared and "height" in declared \
                and (declared["width"], declared["height"]) != (width, height):
            raise FrameCheckError(f"field jpeg.width/height: {declared['width']!r}x{declared['height']!r} but the "
                                  f"JPEG's header declares {width}x{height} px")
        return checks.decoded_shape(jpeg, "the payload")

    @staticmethod
    def _common_values(meta: dict[str, Any]) -> tuple[Any, ...]:
        """seq, frame_seq, captured_at, ts, model name, model version, source_ref: checked for their columns."""
        model = checks.mapping(meta.get("model"), "model")
        return (checks.integer(meta.get("seq"), "seq"), checks.integer(meta.get("frame_seq"), "frame_seq"),
                checks.real(meta.get("captured_at"), "captured_at"), checks.real(meta.get("ts"), "ts"),
                checks.text(model.get("name"), "model.name"), checks.text(model.get("version"), "model.version"),
                checks.text(meta.get("source_ref"), "source_ref"))

    def _add_empty_scene(self, frame_id: str, meta: dict[str, Any], jpeg: bytes, shape: tuple[int, int],
                         common: tuple[Any, ...]) -> AddResult:
        """An empty scene of a station's camera: a background for training, never in the review queue."""
        try:
            trigger = checks.text(meta.get("trigger"), "trigger")
            kept = checks.json_text(meta, "meta")
        except FrameCheckError as exc:
            raise StoreError(f"frame {frame_id}: {exc}") from None
        seq, frame_seq, captured_at, ts, model_name, model_version, source_ref = common
        day = time.strftime("%Y%m%d", time.gmtime())
        folder = Path(EMPTY_SCENES_DIR) / _safe(meta["site"]) / _safe(meta["station"]) / _safe(meta["camera"]) / day

        def insert(files: list[tuple[Path, bytes]]) -> None:
            rel = files[0][0]
            self._db.execute(
                "INSERT INTO empty_scenes(id, seq, site, station, camera, frame_seq, captured_at, ts, model_name, "
                "model_version, trigger, source_ref, meta, received_at, image, bytes, sha256, width, height) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (frame_id, seq, meta["site"], meta["station"], meta["camera"], frame_seq, captured_at, ts, model_name,
                 model_version, trigger, source_ref, kept, time.time(), rel.as_posix(), len(jpeg),
                 hashlib.sha256(jpeg).hexdigest(), shape[1], shape[0]))
            self._bump("empty_scenes_stored")

        return self._add_files("empty_scenes", frame_id, meta, lambda stem: [(folder / f"{stem}.jpg", jpeg)], insert)

    def _add_files(self, table: str, frame_id: str, meta: dict[str, Any],
                   named: Callable[[str], list[tuple[Path, bytes]]],
                   insert: Callable[[list[tuple[Path, bytes]]], None]) -> AddResult:
        """Duplicate and quota checks, the files (fsynced, renamed) and the row, in one write transaction.
        ``named``: the files (relative path, bytes) under a stem; ``insert``: the row, given the files written."""
        files = named(file_stem(frame_id))
        size = sum(len(data) for _, data in files)
        written: list[Path] = []
        with self._lock:
            try:
                with self._write():
                    if self._db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (frame_id,)).fetchone():
                        self._bump("duplicates")
                        return AddResult("duplicate", frame_id)
                    used = self._stored_bytes()
                    self._read_quota()
                    if self.max_bytes is not None and used + size > self.max_bytes:
                        self._bump("refused_quota")
                        reason = (f"{self.root}: storage quota reached ({used} of {self.max_bytes} bytes used); "
                                  f"frame {frame_id} from {meta['site']}/{meta['station']} refused. Review and "
                                  f"export frames, or raise --max-bytes")
                        log.error(reason)
                        return AddResult("refused", frame_id, reason)
                    files = self._free_names(frame_id, files, named)
                    for rel, data in files:
                        self._write_atomic(self.root / rel, data)
                        written.append(rel)
                    for folder in {(self.root / rel).parent for rel, _ in files}:
                        fsync_dir(folder)       # the renames: on disk before the commit the ingest acknowledges
                    insert(files)
                    self._bump("bytes_stored", size)
            except BaseException:
                for rel in written:     # still under our lock: nobody else has committed a row for this file
                    (self.root / rel).unlink(missing_ok=True)
                raise
            self._check_quota(used + size)
            return AddResult("stored", frame_id)

    def _free_names(self, frame_id: str, files: list[tuple[Path, bytes]],
                    named: Callable[[str], list[tuple[Path, bytes]]]) -> list[tuple[Path, bytes]]:
        """``files``, or where a stored frame's file already has one of their names (a store written before
        ``file_stem``: its ``frame:1`` is ``frame_1.jpg``), the same files under the id's hashed stem. Never
        replaces a stored frame's file: StoreError when both are taken. Called under the write lock, so a file
        without a row is a crash's leftover, free to replace."""
        for candidate in (files, named(_hashed_stem(frame_id))):
            if not any((self.root / rel).exists() and self._names_file(rel) for rel, _ in candidate):
                return candidate
        raise StoreError(f"frame {frame_id}: its image file {files[0][0].as_posix()} already holds another frame's "
                         f"image; refused, nothing stored was replaced")

    def _names_file(self, rel: Path) -> bool:
        """Whether a stored row names the file ``rel`` (relative to the store)."""
        return self._db.execute("SELECT 1 FROM frames WHERE image = ?1 OR context_image = ?1 UNION ALL "
                                "SELECT 1 FROM empty_scenes WHERE image = ?1 LIMIT 1",
                                (rel.as_posix(),)).fetchone() is not None

    def _stored_bytes(self) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = 'bytes_stored'").fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        """``data`` at ``path``: written to a temporary name, fsynced, renamed. The rename (and any folder made for
        it) is durable only once its folder is fsynced too: the caller does that before its commit."""
        make_folders(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _check_quota(self, used: int) -> None:
        if self.max_bytes is None:
            return
        if used >= self.warn_fraction * self.max_bytes and not self._warned:
            log.warning("%s: storage at %.0f%% of its quota (%d of %d bytes); at 100%% new frames are refused",
                        self.root, 100 * used / self.max_bytes, used, self.max_bytes)
            self._warned = True
        elif used < self.warn_fraction * self.max_bytes:
            self._warned = False

    # ------------------------------------------------------------ read

    def get(self, frame_id: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute(f"SELECT *, {ITEM_PENDING} FROM frames AS f WHERE id = ?", (frame_id,)).fetchone()
        if row is None:
            raise UnknownFrame(f"frame {frame_id!r}: no such frame in {self.root}")
        return _public(row)

    def image_path(self, frame_id: str) -> Path:
        return self.root / self.get(frame_id)["image"]

    def context_path(self, frame_id: str) -> Path | None:
        """The frame's ROI context JPEG (what the station's crop was cut from); None when it has none."""
        rel = self.get(frame_id).get("context_image")
        return self.root / rel if rel else None

    def list_empty_scenes(self, *, site: str | None = None, station: str | None = None,
                          camera: str | None = None) -> list[dict[str, Any]]:
        """The stored empty scenes (backgrounds), oldest capture first, optionally of one site/station/camera."""
        return list(self.iter_empty_scenes(site=site, station=station, camera=camera))

    def iter_empty_scenes(self, *, site: str | None = None, station: str | None = None, camera: str | None = None,
                          per_camera: int | None = None) -> Iterator[dict[str, Any]]:
        """``list_empty_scenes``, read ``EMPTY_SCENES_PAGE`` rows at a time from one snapshot on a connection of
        its own (a backgrounds export of thousands of scenes holds a page, not every row). ``per_camera``: only
        each camera's newest that many (latest capture)."""
        where, args = [], []
        for key, value in (("site", site), ("station", station), ("camera", camera)):
            if value not in (None, ""):
                where.append(f"{key} = ?")
                args.append(value)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        query = f"SELECT * FROM empty_scenes{clause} ORDER BY captured_at, id"
        if per_camera:
            query = (f"SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY site, station, camera "
                     f"ORDER BY captured_at DESC, id DESC) AS newest FROM empty_scenes{clause}) "
                     f"WHERE newest <= ? ORDER BY captured_at, id")
            args.append(per_camera)
        reader = self._reader()
        try:
            reader.execute("BEGIN")         # one snapshot for all the pages (WAL: writers go on meanwhile)
            cursor = reader.execute(query, args)
            while rows := cursor.fetchmany(EMPTY_SCENES_PAGE):
                for row in rows:
                    scene = {k: row[k] for k in row.keys() if k != "newest"}
                    yield checks.finite({**scene, "meta": checks.stored_json(row["meta"], {},
                                                                             f"empty scene {row['id']}")})
        finally:
            reader.close()

    def list(self, *, limit: int = 50, offset: int = 0, order: str = "oldest",
             **filters: Any) -> tuple[list[dict], int]:
        """Frames matching the filters (``FILTERS``) and how many match in all.

        ``order``: ``oldest`` first (received), ``newest`` first, ``least-certain``: lowest margin first,
        the order that spends a labelling budget where the model is least sure, or ``least-certain-by-class``:
        the predicted classes take turns, each giving its least certain frame not yet listed (the matching
        frames of each class are ranked by margin; rank 1 of every class comes first, lowest margin first,
        then rank 2, ...). Frames without a margin (no usable ``top_k``) come last, oldest first.
        """
        unknown = set(filters) - set(FILTERS)
        if unknown:
            raise StoreError(f"unknown filter(s) {', '.join(sorted(unknown))}; known: {', '.join(FILTERS)}")
        if filters.get("status") not in (None, *STATUSES):
            raise StoreError(f"field status: {filters['status']!r} is not one of {', '.join(STATUSES)}")
        if not 1 <= limit <= 1000 or offset < 0:
            raise StoreError("field limit: 1..1000, offset: >= 0")
        if order not in ORDERS:
            raise StoreError(f"field order: {order!r} is not one of {', '.join(ORDERS)}")
        where, args = [], []
        for key, value in filters.items():
            if value not in (None, ""):
                where.append(f"{key} = ?")
                args.append(value)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        if order == "least-certain-by-class":
            # the turn is counted among the frames that match the filters (the window runs after WHERE); a frame on
            # this page has a turn of at most offset + limit (every turn before its own is taken by a frame of its
            # class listed before it), so only those are sorted
            page = (f"SELECT id FROM (SELECT id, margin, received_at, ROW_NUMBER() OVER (PARTITION BY predicted "
                    f"ORDER BY {BY_MARGIN}) AS turn FROM frames{clause}) WHERE turn <= ? "
                    f"ORDER BY margin IS NULL, turn, {BY_MARGIN} LIMIT ? OFFSET ?")
            page_args = [*args, offset + limit, limit, offset]
        else:
            sort = {"oldest": "received_at ASC, id", "newest": "received_at DESC, id",
                    "least-certain": BY_MARGIN}[order]
            page, page_args = f"SELECT id FROM frames{clause} ORDER BY {sort} LIMIT ? OFFSET ?", [*args, limit, offset]
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM frames{clause}", args).fetchone()[0]
            ids = [r[0] for r in self._db.execute(page, page_args)]
            rows = {r["id"]: r for r in self._db.execute(f"SELECT *, {ITEM_PENDING} FROM frames AS f WHERE id IN "
                                                          f"({','.join('?' * len(ids))})", ids)}
        return [_public(rows[i]) for i in ids], int(total)

    def iter_reviewed(self, *, label: str | None = None,
                      statuses: tuple[str, ...] | None = None) -> Iterator[dict[str, Any]]:
        """The reviewed frames (every status but pending) in the order they were decided; ``label``, ``statuses``:
        only the frames with that label, in those statuses.

        Read from one snapshot of the index, ``REVIEWED_PAGE`` rows at a time, on a connection of its own: an
        export of 100k frames holds a page of rows, not the table (it held every row, ~3 kB each, at once), a
        decision made meanwhile neither shows a frame twice nor waits for the export, and the review server's
        own connection stays free for its other requests while an enrolment reads its examples."""
        where, args = ["status != 'pending'"], []
        if label is not None:
            where.append("label = ?")
            args.append(label)
        if statuses is not None:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        reader = self._reader()
        try:
            reader.execute("BEGIN")         # one snapshot for all the pages (WAL: writers go on meanwhile)
            cursor = reader.execute(f"SELECT * FROM frames WHERE {' AND '.join(where)} ORDER BY reviewed_at, id",
                                    args)
            while rows := cursor.fetchmany(REVIEWED_PAGE):
                for row in rows:
                    yield _public(row)
        finally:
            reader.close()

    def _reader(self) -> sqlite3.Connection:
        """A read-only connection of its own to the index (a long read never holds ``self._lock``)."""
        if self.read_only:
            return self._read_only_connection()
        reader = sqlite3.connect(self.root / DB_NAME, isolation_level=None, timeout=LOCK_WAIT_S,
                                 check_same_thread=False)
        reader.row_factory = sqlite3.Row
        reader.execute("PRAGMA query_only = ON")
        return reader

    def facets(self, limit: int | None = None) -> dict[str, Any]:
        """The values the review page's filters offer, bounded: for each of ``FACETS`` at most ``limit`` (default
        ``FACET_LIMIT``) distinct values, those with the most frames (ties: in value order), listed in value order;
        ``more``: for each, how many other distinct values it has, not listed (0: the list is whole).

        Unbounded, a store of many stations (or a station sending a new camera or model version with every frame)
        answered every value every 3 s, and the page built a list of each: 43k stations in 100k frames were
        580 kB per refresh. The busiest values come first: a stream of one-frame values never pushes out the
        stations that send the frames."""
        limit = FACET_LIMIT if limit is None else limit
        if not 1 <= limit <= MAX_FACET_LIMIT:
            raise StoreError(f"field limit: {limit} is not in 1..{MAX_FACET_LIMIT}")
        out: dict[str, Any] = {}
        more = {}
        with self._lock:
            for key in FACETS:
                rows = self._db.execute(f"SELECT {key} FROM frames WHERE {key} IS NOT NULL GROUP BY {key} "
                                        f"ORDER BY COUNT(*) DESC, {key} LIMIT ?", (limit + 1,)).fetchall()
                out[key] = sorted((r[0] for r in rows[:limit]), key=str)
                more[key] = 0 if len(rows) <= limit else self._db.execute(
                    f"SELECT COUNT(DISTINCT {key}) FROM frames WHERE {key} IS NOT NULL").fetchone()[0] - limit
        return {**out, "more": more}

    def labels(self) -> dict[str, list[str]]:
        """Classes a reviewer can assign: the model's, plus new classes and defect classes accepted so far."""
        with self._lock:
            extra = self._db.execute("SELECT name, kind FROM classes ORDER BY added_at, name").fetchall()
        return {"labels": list(self.base_labels), "new_classes": [r["name"] for r in extra if r["kind"] == "new_class"],
                "defects": [r["name"] for r in extra if r["kind"] == "defect"]}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_status = {s: 0 for s in STATUSES}
            by_status.update({r[0]: r[1] for r in self._db.execute(
                "SELECT status, COUNT(*) FROM frames GROUP BY status")})
            by_station = {f"{r[0]}/{r[1]}": r[2] for r in self._db.execute(
                "SELECT site, station, COUNT(*) FROM frames GROUP BY site, station")}
            by_model = {str(r[0]): r[1] for r in self._db.execute(
                "SELECT model_version, COUNT(*) FROM frames GROUP BY model_version")}
            by_label = {str(r[0]): r[1] for r in self._db.execute(
                "SELECT label, COUNT(*) FROM frames WHERE label IS NOT NULL GROUP BY label")}
            by_camera = {f"{r[0]}/{r[1]}/{r[2]}": r[3] for r in self._db.execute(
                "SELECT site, station, camera, COUNT(*) FROM empty_scenes GROUP BY site, station, camera")}
        used = self.used_bytes()
        with self._lock:
            self._read_quota()
        quota = None
        if self.max_bytes is not None:
            fraction = used / self.max_bytes
            quota = {"max_bytes": self.max_bytes, "used_bytes": used, "fraction": round(fraction, 4),
                     "warning": fraction >= self.warn_fraction, "full": used >= self.max_bytes}
        return {"frames": sum(by_status.values()), "by_status": by_status, "by_station": by_station,
                "by_model_version": by_model, "by_label": by_label, "bytes": used, "quota": quota,
                "empty_scenes": {"total": sum(by_camera.values()), "by_camera": by_camera},
                "counters": self.counters(), "reconciled": self.reconciled,
                CALLBACK_ERRORS: self.callback_errors()}

    # ------------------------------------------------------------ review

    def review(self, frame_id: str, action: str, *, label: str | None = None, reviewer: str | None = None,
               note: str | None = None, item: bool = False, expect: str | None = None) -> dict[str, Any]:
        """Apply a reviewer's decision. ``label``: a known class (label), a new class name (new_class), or the
        defect class (defect, optional). ``undo`` puts the frame back to pending.

        ``expect``: the status the decision was made on (the review page sends ``pending``); a frame with another
        status by the time the decision arrives (another reviewer decided it) is left as it is: ReviewConflict,
        naming who decided it. Without it, a decision replaces any earlier one (a relabel).

        ``item``: the same decision for every other frame of the frame's item (same station, camera and track)
        that is still pending; with ``undo``, every other frame of the item that carries the frame's decision
        goes back to pending too. The frame is returned with ``item_frames``: the other frames decided."""
        if action not in ACTIONS:
            raise StoreError(f"field action: {action!r} is not one of {', '.join(ACTIONS)}")
        if expect is not None and expect not in STATUSES:
            raise StoreError(f"field expect: {str(expect)[:40]!r} is not one of {', '.join(STATUSES)}")
        try:        # stored as text and exported as folder names and CSV cells: valid Unicode, bounded
            label = checks.text(label, "label", MAX_CLASS_NAME)
            reviewer, note = checks.text(reviewer, "reviewer", 256), checks.text(note, "note")
        except FrameCheckError as exc:
            raise StoreError(f"frame {frame_id}: {exc}") from None
        label = label.strip() if isinstance(label, str) else label
        if action in ("new_class", "defect") and label and (problem := class_name_problem(label)) is not None:
            # it becomes a class of the next model, published in every decision: the trainer's rule, here
            raise StoreError(f"frame {frame_id}: field label: {label[:80]!r} {problem}")
        with self._lock:
            frame = self.get(frame_id)
            known = self.labels()
            if action == "label":
                if not label or label not in known["labels"] + known["new_classes"]:
                    raise StoreError(f"frame {frame_id}: field label: {label!r} is not a known class "
                                     f"({', '.join(known['labels'] + known['new_classes'])}); use action new_class "
                                     f"for a class the model does not have")
                status = "labelled"
            elif action == "new_class":
                if not label:
                    raise StoreError(f"frame {frame_id}: field label: a new class needs a name")
                if label in known["labels"]:
                    raise StoreError(f"frame {frame_id}: field label: {label!r} is already a class of the model; "
                                     f"use action label")
                if label in known["defects"]:
                    raise StoreError(f"frame {frame_id}: field label: {label!r} is already a defect class; a new "
                                     f"product needs another name")
                status = "new_class"
            elif action == "defect":
                # a defect class trains as its own class (central.review.labels): never a product's name
                if label and label in known["labels"] + known["new_classes"]:
                    raise StoreError(f"frame {frame_id}: field label: {label!r} is a product class; a defect class "
                                     f"needs a name of its own")
                status = "defect"
            elif action == "skip":
                status, label = "skipped", None
            else:
                status, label = "pending", None
            with self._write():
                if expect is not None:      # read again under the write lock: another process may have decided it
                    self._check_expected(frame_id, expect, action)
                if action == "new_class":
                    self._db.execute("INSERT OR IGNORE INTO classes(name, kind, added_at) VALUES (?, 'new_class', ?)",
                                     (label, time.time()))
                if action == "defect" and label:
                    self._db.execute("INSERT OR IGNORE INTO classes(name, kind, added_at) VALUES (?, 'defect', ?)",
                                     (label, time.time()))
                undo = action == "undo"
                others = self._item_frames(frame, undo) if item else []
                now = time.time()           # one decision: one time for all its frames
                self._db.executemany(
                    "UPDATE frames SET status = ?, label = ?, defect = ?, reviewer = ?, reviewed_at = ?, note = ? "
                    "WHERE id = ?",
                    [(status, label if action in ("label", "new_class") else None,
                      (label or "defect") if action == "defect" else None,
                      None if undo else reviewer, None if undo else now, None if undo else note, fid)
                     for fid in [frame_id, *others]])
                self._bump(f"reviews:{action}", 1 + len(others))
        return {**self.get(frame_id), "item_frames": others}

    def _check_expected(self, frame_id: str, expect: str, action: str) -> None:
        now = self._db.execute("SELECT status, label, defect, reviewer FROM frames WHERE id = ?",
                               (frame_id,)).fetchone()
        if now["status"] != expect:
            what = now["label"] or now["defect"]
            raise ReviewConflict(f"frame {frame_id}: {now['status']}" + (f" {what!r}" if what else "")
                                 + (f" by {now['reviewer']}" if now["reviewer"] else "")
                                 + f" meanwhile, not {expect} as this {action} expected; nothing changed")

    def _item_frames(self, frame: dict[str, Any], undo: bool) -> list[str]:
        """The other frames of ``frame``'s item an item-wide decision applies to: the pending ones, or for undo
        those that carry this frame's decision. None without a track."""
        if frame["track"] is None:
            return []
        same = ("status = 'pending'" if not undo else
                "status = ? AND label IS ? AND defect IS ? AND status != 'pending'")
        args = [] if not undo else [frame["status"], frame["label"], frame["defect"]]
        rows = self._db.execute(
            f"SELECT id FROM frames WHERE site = ? AND station = ? AND camera = ? AND track = ? AND id != ? AND {same} "
            "ORDER BY received_at, id", [frame["site"], frame["station"], frame["camera"], frame["track"], frame["id"],
                                         *args]).fetchall()
        return [r["id"] for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def top_k_margin(top_k: Any) -> float | None:
    """Top-1 minus top-2 probability of a frame message's ``top_k`` (a list of ``{"label", "p"}``); with one
    entry, its probability. ``None`` when there is no usable list."""
    if not isinstance(top_k, list):
        return None
    probs = sorted((p for p in (_probability(e) for e in top_k) if p is not None), reverse=True)
    if not probs:
        return None
    return probs[0] - (probs[1] if len(probs) > 1 else 0.0)


def _probability(entry: Any) -> float | None:
    """A ``top_k`` entry's finite ``p``, else None."""
    p = entry.get("p") if isinstance(entry, dict) else None
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        return None
    try:
        return checks.real(p, "top_k.p")
    except FrameCheckError:
        return None


def _stored_track(meta_text: str | None) -> str | None:
    """The track id in a stored row's metadata, or None (none, or not an id)."""
    try:
        meta = json.loads(meta_text or "{}")
        return checks.track(meta.get("track")) if isinstance(meta, dict) else None
    except (ValueError, FrameCheckError):
        return None


def _without_context_jpeg(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata as kept in the index: the ROI context JPEG lives in its own file, not in the JSON."""
    context = meta.get("context")
    if not isinstance(context, dict) or "roi_jpeg_b64" not in context:
        return meta
    return {**meta, "context": {k: v for k, v in context.items() if k != "roi_jpeg_b64"}}


def _kept_properties(properties: list[tuple[str, str]]) -> list[list[str]]:
    """A refused message's user properties as the quarantine keeps them: each key and value cut to its limit, and
    no more than ``QUARANTINE_MAX_PROPERTIES`` characters in all; a last ``["(not kept)", ...]`` pair says how many
    were left out. A message may carry thousands of them (MQTT bounds only the whole packet, and the broker's
    ``message_size_limit`` only the payload): without the bound, a thousand refused messages would keep gigabytes."""
    kept: list[list[str]] = []
    budget = QUARANTINE_MAX_PROPERTIES
    for i, (key, value) in enumerate(properties):
        key = _printable(key, 256)
        pair = [key, _printable(value, max(0, min(QUARANTINE_MAX_PROPERTY, budget - len(key))))]
        budget -= len(pair[0]) + len(pair[1])
        if budget < 0:
            kept.append(["(not kept)", f"{len(properties) - i} more user properties"])
            break
        kept.append(pair)
    return kept


def _printable(value: str, limit: int) -> str:
    """Station-sent text kept for people to read: at most ``limit`` characters, lone surrogates escaped."""
    value = str(value)[:limit]
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _public(row: sqlite3.Row) -> dict[str, Any]:
    """A frame row as the API shows it: strict JSON whatever an older version stored (NaN becomes null)."""
    out = checks.finite(dict(row))
    where = f"frame {out.get('id')}"
    out["top_k"] = checks.stored_json(out["top_k"] or "[]", [], where)
    out["selected_because"] = checks.stored_json(out["selected_because"] or "[]", [], where)
    out["meta"] = checks.stored_json(out["meta"], {}, where)
    return out
