"""Damaged outboxes set aside (``<name>.bad.<UTC time>``) count in outbox.max_bytes: they are kept while there is
room, and the oldest goes (logged) before any message is dropped for room, so all the outbox's files on disk stay
within the bound.

The files are measured around every SQLite statement of the outbox (as in test_outbox_disk.py): within one statement
a file is at most the larger of its sizes before and after, and a set-aside file only ever shrinks (it is removed
between statements), so the sum bounds what the files took at any moment, with no timing."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import pytest

from agent.outbox import Message, Outbox

DAY_S = 86400.0


def aside_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(f"{path.name}.bad."))


def aside_names(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir()
                  if p.name.startswith(f"{path.name}.bad.") and not p.name.endswith(("-wal", "-shm")))


class DiskMeter:
    """Wraps ``sqlite3.connect``: the outbox's three files and the set-aside ones, measured around each statement."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
        self.peak, self.path = 0, path
        meter, connect = self, sqlite3.connect

        class Measured(sqlite3.Connection):
            def execute(self, *args):
                return meter.around(super().execute, *args)

            def executescript(self, *args):
                return meter.around(super().executescript, *args)

        monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: connect(*a, factory=Measured, **kw))

    def sizes(self) -> list[int]:
        out = []
        for name in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            try:
                out.append(name.stat().st_size)
            except FileNotFoundError:
                out.append(0)
        return out

    def around(self, call, *args):
        before, aside = self.sizes(), aside_bytes(self.path)
        try:
            return call(*args)
        finally:
            self.peak = max(self.peak, sum(map(max, before, self.sizes())) + aside)


def damaged_outbox(path: Path, frames: int) -> int:
    """An outbox of results and ``frames`` frames of 20 kB whose 6th page is overwritten (flash wear, a power cut
    on an SD card); returns its size on disk."""
    ob = Outbox(path, max_bytes=10**8, max_age_s=DAY_S)
    ob.put_many([Message("result", {"n": n, "pad": "x" * 300}) for n in range(200)])
    for i in range(frames):
        ob.put(Message("frame", {"i": i}, os.urandom(20_000)))
    ob._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ob.close()
    with open(path, "r+b") as f:
        f.seek(4096 * 5)
        f.write(b"\xff" * 4096)          # no valid b-tree page starts with 0xff
    return path.stat().st_size


def test_a_damaged_outbox_set_aside_is_kept_while_there_is_room_and_goes_before_any_message(tmp_path, monkeypatch,
                                                                                              caplog):
    """The set-aside files were not counted: three damaged outboxes and a full new one took four times max_bytes
    on a partition sized to it."""
    # given: a 6 MB outbox whose file was damaged while it held 2.5 MB, opened again (measured from here)
    path, quota = tmp_path / "ob.sqlite", 6_000_000
    size = damaged_outbox(path, frames=120)
    assert size > 2_400_000
    meter = DiskMeter(monkeypatch, path)
    caplog.set_level(logging.WARNING, logger="agent.outbox")
    ob = Outbox(path, max_bytes=quota, max_age_s=DAY_S)
    # then: it is set aside and kept, as there is room for it
    assert len(aside_names(path)) == 1 and aside_bytes(path) >= size

    # when: the broker stays away and 18 MB of results and frames come
    n = 0
    while n < 900:
        ob.put_many([Message("result", {"n": n, "pad": "r" * 400}), Message("frame", {"n": n}, os.urandom(20_000))])
        n += 1

    # then: the files on disk, the set-aside ones with them, never passed max_bytes, not even inside a statement
    assert meter.peak <= quota, f"{meter.peak} bytes on disk, quota {quota}"
    # and: the damaged outbox went (logged) before the first message was dropped for room
    assert aside_names(path) == []
    messages = [r.getMessage() for r in caplog.records]
    removed = next(i for i, m in enumerate(messages) if "removed the damaged outbox set aside" in m)
    first_drop = next(i for i, m in enumerate(messages) if "over the bytes quota" in m)
    assert removed < first_drop
    # and: the quota is used by messages, not given away
    assert ob.bytes > 0.45 * quota and ob.dropped()["corrupt:outbox-file"] == 1
    ob.close()


def test_set_aside_files_left_from_before_are_trimmed_to_the_bound_at_open_oldest_first(tmp_path, caplog):
    # given: three damaged outboxes of 2 MB set aside by earlier runs (the last two in the same second)
    path, quota = tmp_path / "ob.sqlite", 6_000_000
    names = ["ob.sqlite.bad.20260101T000000Z", "ob.sqlite.bad.20260101T000001Z-2", "ob.sqlite.bad.20260101T000001Z-10"]
    for name in names:
        (tmp_path / name).write_bytes(os.urandom(2_000_000))
    # when: the outbox opens
    with caplog.at_level(logging.WARNING, logger="agent.outbox"):
        ob = Outbox(path, max_bytes=quota, max_age_s=DAY_S)
    # then: the set-aside files count in the outbox's files, the oldest went (logged, by name) so that they fit, the
    # two newest stay
    assert ob.disk_bytes() >= 4_000_000
    assert sorted(aside_names(path)) == sorted(names[1:])
    assert f"removed the damaged outbox set aside as {names[0]}" in caplog.text
    assert ob.disk_bytes() <= quota
    # and: the first messages stored push the next oldest out, never the messages
    for n in range(40):
        ob.put(Message("frame", {"n": n}, os.urandom(20_000)))
    assert aside_names(path) == [names[2]] and ob.depth() == 40 and ob.disk_bytes() <= quota
    ob.close()
