"""Outbox: ids and sequence numbers, ack, order across reopen, quotas that count what they drop."""

from __future__ import annotations

import json
import uuid

import pytest

from agent.outbox import Message, Outbox


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def open_outbox(tmp_path, clock=None, **quota):
    return Outbox(tmp_path / "ob.sqlite", max_bytes=quota.get("max_bytes", 10**9),
                  max_age_s=quota.get("max_age_s", 3600), clock=clock or Clock())


def test_put_assigns_uuid_and_increasing_seq_and_ack_deletes(tmp_path):
    ob = open_outbox(tmp_path)
    recs = ob.put_many([Message("result", {"n": i}) for i in range(3)])
    assert [r.seq for r in recs] == [1, 2, 3]
    assert all(uuid.UUID(r.id) and r.body["id"] == r.id and r.body["seq"] == r.seq for r in recs)
    assert ob.ack(2) is True and ob.ack(2) is False
    assert [r.body["n"] for r in ob.pending()] == [0, 2]
    assert ob.depth() == 2


def test_backlog_and_sequence_survive_reopen(tmp_path):
    ob = open_outbox(tmp_path)
    ob.put_many([Message("result", {"n": i}) for i in range(5)])
    ob.ack(1)
    status_seq = ob.next_seq()
    ob.close()
    again = open_outbox(tmp_path)
    assert [r.seq for r in again.pending()] == [2, 3, 4, 5]
    assert again.put(Message("decision", {})).seq == status_seq + 1
    assert [r.seq for r in again.pending(after_seq=3, limit=2)] == [4, 5]


def test_frames_keep_their_jpeg_blob(tmp_path):
    ob = open_outbox(tmp_path)
    ob.put(Message("frame", {"camera": "a"}, b"\xff\xd8jpeg"))
    rec = ob.pending()[0]
    assert rec.kind == "frame" and rec.blob == b"\xff\xd8jpeg" and rec.body["camera"] == "a"


def test_byte_quota_drops_frames_first_then_oldest_and_counts(tmp_path):
    ob = open_outbox(tmp_path, max_bytes=3000)
    ob.put(Message("result", {"n": 0}))
    ob.put(Message("frame", {"n": 1}, b"x" * 1500))
    ob.put(Message("frame", {"n": 2}, b"x" * 1500))      # over: frame 1 goes
    assert [r.body["n"] for r in ob.pending()] == [0, 2]
    assert ob.dropped() == {"bytes:frame": 1}
    for n in range(3, 60):
        ob.put(Message("result", {"n": n, "pad": "y" * 40}))
    kept = [r.body["n"] for r in ob.pending()]
    assert 2 not in kept and kept == sorted(kept) and kept[-1] == 59
    dropped = ob.dropped()
    assert dropped["bytes:frame"] == 2 and dropped["bytes:result"] == 60 - len(kept) - 2
    assert ob.bytes <= 3000


def test_age_quota_drops_old_messages_and_counts_persistently(tmp_path):
    clock = Clock()
    ob = open_outbox(tmp_path, clock, max_age_s=60)
    ob.put(Message("result", {"n": 0}))
    clock.t += 61
    ob.put(Message("alert", {"n": 1}))
    assert [r.body["n"] for r in ob.pending()] == [1]
    ob.close()
    assert open_outbox(tmp_path, clock).dropped() == {"age:result": 1}


def test_a_non_finite_body_is_refused_alone_and_counted(tmp_path):
    """NaN or infinity never enters the outbox (no subscriber could parse it); the rest of the batch is stored."""
    ob = Outbox(tmp_path / "outbox.db", max_bytes=1 << 20, max_age_s=3600)
    stored = ob.put_many([Message("result", {"n": 1, "confidence": 0.9}),
                          Message("result", {"n": 2, "confidence": float("nan")}),
                          Message("decision", {"n": 3, "scores": [1.0, float("inf")]}),
                          Message("result", {"n": 4, "confidence": 0.8})])
    assert [json.loads(r.text)["n"] for r in stored] == [1, 4]
    assert ob.depth() == 2
    assert ob.dropped() == {"non-finite:result": 1, "non-finite:decision": 1}
    with pytest.raises(ValueError, match="result message refused: a non-finite number"):
        ob.put(Message("result", {"confidence": float("-inf")}))
    assert ob.put(Message("result", {"n": 5})).seq == stored[-1].seq + 1     # and the next good one is stored
    ob.close()


def test_a_failed_write_rolls_back_and_the_outbox_keeps_working(tmp_path):
    """One failed delete (a full disk, an I/O error: injected with a trigger) must not leave the connection inside
    a transaction: before, every later put, ack and next_seq failed for good ("cannot start a transaction within
    a transaction") and the publisher thread died."""
    ob = open_outbox(tmp_path)
    for n in range(3):
        ob.put(Message("result", {"n": n}))
    ob._db.executescript("CREATE TEMP TABLE flag(x); INSERT INTO flag VALUES (1); "
                         "CREATE TEMP TRIGGER boom BEFORE DELETE ON main.messages WHEN (SELECT count(*) FROM temp.flag) "
                         "> 0 BEGIN SELECT RAISE(ABORT, 'injected disk error'); END;")
    with pytest.raises(Exception, match="injected disk error"):
        ob.ack_many([1, 2])
    assert not ob._db.in_transaction and ob.depth() == 3 and ob.bytes == sum(len(r.text) for r in ob.pending())
    ob._db.execute("DELETE FROM temp.flag")             # the disk recovers
    assert ob.put(Message("result", {"n": 3})).seq == 4 and ob.ack(1) and ob.next_seq() == 5
    assert [r.body["n"] for r in ob.pending()] == [1, 2, 3]


def test_a_message_larger_than_the_outbox_is_refused_alone_and_counted(tmp_path):
    """Stored first, it pushed every older message out and then itself (20 decisions gone for one receipt)."""
    ob = open_outbox(tmp_path, max_bytes=4096)
    for n in range(20):
        ob.put(Message("decision", {"n": n}))
    with pytest.raises(ValueError, match="larger than the outbox's 4096 bytes"):
        ob.put(Message("receipt", {"lines": "x" * 5000}))
    assert [r.body["n"] for r in ob.pending()] == list(range(20)) and ob.dropped() == {"too-large:receipt": 1}
    stored = ob.put_many([Message("frame", {"n": 20}, b"j" * 5000), Message("decision", {"n": 21})])
    assert [r.kind for r in stored] == ["decision"] and ob.depth() == 21


def test_a_wall_clock_step_forward_ages_nothing_that_is_not_old(tmp_path):
    """A station without a clock battery stores offline at a wrong time; NTP steps the clock 26 years forward.
    Measured against the monotonic clock the backlog is minutes old: kept. Real age still drops it."""
    wall, mono = Clock(946_684_800.0), Clock(100.0)
    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=10**9, max_age_s=3600, clock=wall, monotonic=mono)
    for n in range(50):
        ob.put(Message("result", {"n": n}))
        wall.t += 10
        mono.t += 10
    wall.t += 820_000_000                                   # the step: the monotonic clock does not move
    ob.put(Message("result", {"n": 50}))
    assert ob.depth() == 51 and ob.dropped() == {}
    wall.t += 3595
    mono.t += 3595                                          # an hour passes for real: the backlog is older
    ob.put(Message("result", {"n": 51}))
    assert [r.body["n"] for r in ob.pending()] == [50, 51] and ob.dropped() == {"age:result": 50}
