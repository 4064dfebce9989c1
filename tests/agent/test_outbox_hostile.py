"""Outbox against a hostile host: a full disk mid-write, a wall clock stepped across a restart or a reboot, a
backlog that ages while nothing new is stored."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.outbox import Message, Outbox

REPO = Path(__file__).resolve().parents[2]
DAY_S = 86400.0

# Runs in its own process: RLIMIT_FSIZE makes every write past the limit fail with EFBIG, which SQLite reports as
# a full disk (or an I/O error) after it has rolled the transaction back itself.
DISK_FULL = r"""
import json, os, resource, signal, sys
from pathlib import Path
from agent.outbox import Message, Outbox

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
folder = Path(sys.argv[1])
ob = Outbox(folder / "ob.sqlite", max_bytes=2_000_000, max_age_s=3600)

def state():
    stored = ob._db.execute("SELECT COALESCE(SUM(size), 0) FROM messages").fetchone()[0]
    return {"counted": ob.bytes, "stored": stored, "depth": ob.depth(), "dropped": ob.dropped(),
            "in_transaction": ob._db.in_transaction}

for n in range(20):
    ob.put(Message("result", {"n": n, "pad": "p" * 500}))
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(folder / "ob.sqlite-wal") + 20_000, hard))
errors = []
for i in range(40):
    try:
        ob.put_many([Message("frame", {"i": i}, os.urandom(30_000)) for _ in range(3)])
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
full = dict(state(), errors=sorted(set(errors)), failed=len(errors))
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
for n in range(100):
    ob.put_many([Message("frame", {"n": n}, os.urandom(20_000))]
                + [Message("result", {"n": n, "pad": "p" * 500}) for _ in range(8)])
print(json.dumps({"full": full, "after": state()}))
"""


def test_a_full_disk_keeps_the_real_error_and_the_byte_count_and_later_writes_are_kept(tmp_path):
    """SQLite rolls a transaction back itself on a full disk; a second ROLLBACK raised "cannot rollback - no
    transaction is active" over the real error, and the byte total kept every failed put's bytes: once the disk had
    room again the outbox thought itself full and dropped nearly everything it was given."""
    # given an outbox of 20 results whose disk fills up, so that 40 puts of 90 kB fail
    run = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    full, after = json.loads(run.stdout.splitlines()[-1]).values()

    # then each failed put raised the disk's own error, and left the outbox as it was
    assert full["failed"] > 0 and full["errors"], full
    assert all("disk" in e and "cannot rollback" not in e for e in full["errors"]), full["errors"]
    assert not full["in_transaction"] and full["depth"] == 20 and full["dropped"] == {}
    assert full["counted"] == full["stored"]
    # and when the disk has room again, 100 batches (~2.4 MB, quota 2 MB) lose frames only, as the quota says
    assert after["counted"] == after["stored"] <= 2_000_000
    frames_dropped = after["dropped"].get("bytes:frame", 0)
    assert set(after["dropped"]) <= {"bytes:frame"} and frames_dropped < 40, after
    assert after["depth"] == 20 + 100 * 9 - frames_dropped


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def offline_backlog(path: Path, boot_id: str, n: int = 100) -> tuple[Clock, Clock]:
    """A station without a clock battery boots at 2000-01-01 and stores ``n`` results offline, one every 10 s."""
    wall, mono = Clock(946_684_800.0), Clock(100.0)
    ob = Outbox(path, max_bytes=10**9, max_age_s=7 * DAY_S, clock=wall, monotonic=mono, boot_id=boot_id)
    for i in range(n):
        ob.put(Message("result", {"n": i}))
        wall.t += 10
        mono.t += 10
    ob.close()          # the agent restarts, is killed or the station reboots here
    return wall, mono


def test_a_clock_step_while_the_agent_was_down_is_measured_and_ages_nothing(tmp_path):
    # given a backlog stored at the wrong time, and an agent restarted 5 minutes later, after NTP set the clock
    _, mono = offline_backlog(tmp_path / "ob.sqlite", "boot-a")
    wall, mono = Clock(1_796_000_000.0), Clock(mono.t + 300)
    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=10**9, max_age_s=7 * DAY_S, clock=wall, monotonic=mono,
                boot_id="boot-a")

    # when it stores its first message
    ob.put(Message("result", {"n": 100}))

    # then nothing is dropped, and every message has its real age (the first was stored 1,300 s ago)
    assert ob.depth() == 101 and ob.dropped() == {}
    first, last = ob.pending(limit=1000)[0], ob.pending(limit=1000)[-1]
    assert first.created == pytest.approx(wall.t - 1300, abs=1e-3) and last.created == wall.t
    # and real age still counts: a week later the backlog is old
    wall.t += 7 * DAY_S - 605
    mono.t += 7 * DAY_S - 605
    ob.put(Message("result", {"n": 101}))
    assert [r.body["n"] for r in ob.pending(limit=1000)][:2] == [70, 71] and ob.dropped() == {"age:result": 70}


@pytest.mark.parametrize("first", ["put", "read"])
def test_a_clock_step_across_a_reboot_drops_no_backlog_for_a_wrong_clock(tmp_path, first):
    """Nothing measures a step across a reboot (the boot clock starts again): a last put 26 years before now is
    a wrong clock, not a real age. The last put counts as just now; the backlog keeps its ages among itself.
    ``read``: the publisher reads the backlog for sending before anything new is stored."""
    # given a backlog stored at 2000-01-01 in one boot, and the next boot with the clock set by NTP
    offline_backlog(tmp_path / "ob.sqlite", "boot-a")
    wall, mono = Clock(1_796_000_000.0), Clock(5.0)
    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=10**9, max_age_s=7 * DAY_S, clock=wall, monotonic=mono,
                boot_id="boot-b")

    # when the first thing it does is store a message, or read the backlog
    if first == "put":
        ob.put(Message("result", {"n": 100}))
    pending = ob.pending(limit=1000)

    # then the whole backlog is kept, its newest at now and its oldest 990 s before
    assert len(pending) == (101 if first == "put" else 100) and ob.dropped() == {}
    assert pending[99].created == wall.t and pending[0].created == pytest.approx(wall.t - 990, abs=1e-3)
    # and it ages from there: a week later it is dropped, at the next read
    wall.t += 7 * DAY_S + 1
    mono.t += 7 * DAY_S + 1
    assert ob.pending() == [] and ob.dropped() == {"age:result": len(pending)}


def test_a_reboot_with_a_right_clock_leaves_the_times_as_they_are(tmp_path):
    """A station with a clock battery, off for an hour: its times are right and nothing moves them."""
    wall, mono = Clock(1_796_000_000.0), Clock(100.0)
    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=10**9, max_age_s=7 * DAY_S, clock=wall, monotonic=mono,
                boot_id="boot-a")
    stored = ob.put(Message("result", {"n": 0}))
    ob.close()
    wall.t += 3600
    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=10**9, max_age_s=7 * DAY_S, clock=wall, monotonic=Clock(20.0),
                boot_id="boot-b")
    ob.put(Message("result", {"n": 1}))
    assert [(r.body["n"], r.created) for r in ob.pending()] == [(0, stored.created), (1, wall.t)]


def test_after_a_reboot_a_backlog_that_waits_out_the_age_quota_is_dropped_as_old(tmp_path):
    """The times are judged once, when the outbox is opened after the reboot: a station that then stores and sends
    nothing for longer than max_age_s must not take its backlog's real age for a wrong clock."""
    # given a station with a right clock, rebooted an hour after storing 3 results
    wall, mono = Clock(1_796_000_000.0), Clock(100.0)
    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=10**9, max_age_s=7 * DAY_S, clock=wall, monotonic=mono,
                boot_id="boot-a")
    ob.put_many([Message("result", {"n": n}) for n in range(3)])
    ob.close()
    wall.t += 3600
    mono = Clock(20.0)
    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=10**9, max_age_s=7 * DAY_S, clock=wall, monotonic=mono,
                boot_id="boot-b")

    # when a week passes with nothing stored and nothing sent (cameras and broker away)
    wall.t += 7 * DAY_S
    mono.t += 7 * DAY_S

    # then the backlog is old, and dropped when it is read for sending
    assert ob.pending() == [] and ob.dropped() == {"age:result": 3}


def test_an_outbox_written_before_the_clocks_were_kept_keeps_its_backlog_after_a_step(tmp_path):
    """An outbox from an agent that kept no clock marks: its newest message stands for the last put."""
    offline_backlog(tmp_path / "ob.sqlite", "boot-a", n=10)
    db = sqlite3.connect(tmp_path / "ob.sqlite")
    db.execute("DROP TABLE clock")
    db.close()
    wall = Clock(1_796_000_000.0)
    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=10**9, max_age_s=7 * DAY_S, clock=wall, monotonic=Clock(5.0),
                boot_id="boot-a")
    ob.put(Message("result", {"n": 10}))
    assert ob.depth() == 11 and ob.dropped() == {}


def test_messages_past_the_age_quota_are_dropped_when_read_for_sending(tmp_path):
    """A station that stops producing (night, a stopped line) while its broker is away: the age quota applied only
    when a message was stored, so the stale backlog was sent when the broker came back."""
    # given 5 results stored, then more than max_age_s without a new one
    clock = Clock(1_796_000_000.0)
    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=10**9, max_age_s=60, clock=clock)
    ob.put_many([Message("result", {"n": n}) for n in range(5)])
    assert len(ob.pending()) == 5
    clock.t += 61

    # when the publisher reads what to send, then none of them, and they are counted
    assert ob.pending() == [] and ob.depth() == 0 and ob.dropped() == {"age:result": 5}
    # and a new message is read as usual
    ob.put(Message("result", {"n": 5}))
    assert [r.body["n"] for r in ob.pending()] == [5]


def damaged_outbox(path: Path, n: int) -> bytes:
    """An outbox of ``n`` results whose 6th page is overwritten (flash wear, a power cut on an SD card); returns the
    damaged file's bytes."""
    ob = Outbox(path, max_bytes=10**8, max_age_s=3600)
    for i in range(0, n, 10):
        ob.put_many([Message("result", {"n": i + j, "pad": "x" * 300}) for j in range(10)])
    ob._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ob.close()
    with open(path, "r+b") as f:
        f.seek(4096 * 5)
        f.write(b"\xff" * 4096)          # no valid b-tree page starts with 0xff
    return path.read_bytes()


def test_a_damaged_outbox_is_set_aside_and_a_new_one_started_after_its_numbers(tmp_path, caplog):
    """A damaged database made the agent exit 2 at every start: a restart loop under systemd, results of the
    running cameras lost with it. One bad file never stops the station."""
    # given an outbox whose file is damaged
    path = tmp_path / "ob.sqlite"
    damaged = damaged_outbox(path, 500)

    # when the agent opens it
    ob = Outbox(path, max_bytes=10**8, max_age_s=3600)

    # then a new outbox runs, the loss is logged and counted, and numbers go on after the damaged one's
    assert ob.depth() == 0 and ob.dropped() == {"corrupt:outbox-file": 1}
    assert ob.put(Message("result", {"n": 500})).seq == 501
    assert "is damaged" in caplog.text and "set aside as ob.sqlite.bad." in caplog.text
    # and the damaged file is kept as it was found, beside it
    (kept,) = [p for p in tmp_path.glob("ob.sqlite.bad.*") if not p.name.endswith(("-wal", "-shm"))]
    assert kept.read_bytes() == damaged
    ob.close()


def test_only_the_newest_damaged_outboxes_are_kept(tmp_path):
    path = tmp_path / "ob.sqlite"
    for _ in range(5):
        damaged_outbox(path, 200)
    Outbox(path, max_bytes=10**8, max_age_s=3600).close()
    kept = [p for p in tmp_path.glob("ob.sqlite.bad.*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == 3


def test_a_damaged_page_found_while_running_sets_the_outbox_aside_and_the_batch_is_stored(tmp_path, caplog):
    """The open reads the messages table, not every index: a damaged page of the index of ids was found only by
    the next write. Every put failed from then on, and after every restart: the station stored nothing again."""
    # given an outbox whose index of ids has a damaged page, opened as if nothing were wrong
    path = tmp_path / "ob.sqlite"
    ob = Outbox(path, max_bytes=10**8, max_age_s=3600)
    ob.put_many([Message("result", {"n": n, "pad": "x" * 300}) for n in range(200)])
    ob.close()
    db = sqlite3.connect(path)
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_messages_1'").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        f.seek(4096 * (root - 1))
        f.write(b"\xff" * 4096)
    ob = Outbox(path, max_bytes=10**8, max_age_s=3600)

    # when the next batch is stored
    stored = ob.put_many([Message("result", {"n": 200}), Message("decision", {"n": 201})])

    # then it is stored, in a new outbox numbered after the damaged one, and the loss is logged and counted
    assert [r.seq for r in stored] == [201, 202] and [r.body["n"] for r in ob.pending()] == [200, 201]
    assert ob.dropped() == {"corrupt:outbox-file": 1} and "is damaged" in caplog.text
    assert len([p for p in tmp_path.glob("ob.sqlite.bad.*") if not p.name.endswith(("-wal", "-shm"))]) == 1
    # and the station goes on after a restart
    ob.close()
    assert Outbox(path, max_bytes=10**8, max_age_s=3600).put(Message("result", {"n": 202})).seq == 203
