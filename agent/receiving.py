"""Receiving against a shipment's expected lines: the prior on decisions and the receipt.

``cmd/expect`` opens a shipment (its id and label -> expected count) or closes it. While one is open,
every item decision (``ItemTracker``) multiplies its consensus probabilities by ``expected_weight`` for
the labels the shipment still expects (1 for every other label), renormalizes and decides as without a
shipment: an item the model is sure is something else stays that, only a borderline one leans towards what
was expected. An item decided sure on a label still expected is judged unknown against the bundle's looser
threshold at ``expected_unknown_keep`` (the shipment vouches for it): the usual threshold rejects about 5% of
known items, and each would be a false discrepancy. Each decided item is tallied; a ``receipt.v1`` message
says, per label, how many were expected and received and whether the line is matched, over, short or
unexpected, with the decisions behind each discrepancy, and how many items went to the review lane (or were
decided ``unknown``). A line's refs are its most doubtful decisions, most doubtful first (``doubt``: the lowest
confidence, then the highest unknown score): when a line is over, the items a dock should check are the ones
the model was least sure were that product, and in a large shipment the newest would leave them off.

Invariants: one shipment at a time per station (opening another closes nothing: it is refused until the
open one is closed; reopening the same id with the same lines is a no-op). The desk is shared by the command
thread (open, close) and the decide thread (prior, vouches, record) under one lock. An item belongs to the
shipment open when the decide thread decides it: the decide thread holds ``storing`` from the first frame of a
batch until the batch's messages are in the outbox, and cmd/expect holds it while it opens or closes, so an
item's prior, its vouching, its count and its receipt all see one shipment, and a close waits for the batch
being decided (its final receipt counts every item decided before it). An item is counted once its
decision message is in the outbox (the decide thread records the decisions the outbox stored): a batch whose
messages are not stored (its step raised, the outbox write failed) counts none of its items, and an open or
close whose receipt is not stored is undone (``expecting``).
Receipts go through the outbox (QoS 1, kept while offline), each worked out and stored under ``storing``, so
they are stored in the order they describe (never an open receipt after the final one); the open shipment
and its tally are saved in station-state.json with each receipt and at shutdown, so a restart goes on
counting from there.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from agent.config import ExpectCommand, ReceivingConfig
from agent.decide import ItemDecision
from contract.messages import dumps_finite
from contract.openset import UNKNOWN_LABEL  # the label of an item the unknown score rejects (never sorted)

# A receipt is bounded whatever the shipment: the broker refuses a message over its message_size_limit (4 MiB,
# deploy/central/mosquitto/mosquitto.conf), and an outbox message it refuses is never delivered.
MAX_RECEIPT_LINES = 2000       # receipt.v1 lines maxItems: the expected lines (at most 1,000) and unexpected ones
MAX_RECEIPT_LINE_REFS = 1000   # refs over all lines of one receipt (review, unknown, vouched: max_refs each)
MAX_LABEL_CHARS = 256          # a line's label in receipt.v1 and cmd-expect.v1
# The receipt body as the outbox writes it (compact JSON, non-ASCII as escapes of 6-12 bytes a character), with
# room for the station's fields (schema, id, seq, ts, site, station, final) under the broker's 4 MiB: refs and
# then unexpected lines are left off until it fits (Shipment.receipt). The expected lines alone always fit: 1,000
# labels of 256 characters outside the BMP written as escapes are about 3.2 MB.
RECEIPT_ROOM_BYTES = 64 * 1024
RECEIPT_MAX_BYTES = 4 * 1024 * 1024 - RECEIPT_ROOM_BYTES    # a lower mqtt.max_message_bytes lowers it (the pipeline)


class ShipmentError(ValueError):
    """A cmd/expect that cannot be applied; the text names the field."""


def is_review(decision: ItemDecision) -> bool:
    """Counted as review, not as a received label: sent to the review lane, and not decided unknown (an unknown
    item is counted apart: a product the model does not know)."""
    return decision.low_confidence and decision.label != UNKNOWN_LABEL


def item_ref(decision: ItemDecision, decision_id: str) -> dict[str, Any]:
    """What a receipt lists behind a discrepancy: the decision message's id and the frames it was decided on."""
    first, last = decision.frame_seqs or (None, None)
    return {"decision": decision_id, "camera": decision.camera_id, "item_seq": decision.item_seq,
            "label": decision.label, "confidence": decision.confidence, "lane": decision.lane,
            "frames": {"first_seq": first, "last_seq": last, "count": decision.frames},
            "unknown_score": decision.unknown_score}


def doubt(ref: dict[str, Any]) -> tuple[float, float]:
    """How doubtful a received item is, for ranking a line's refs (higher: more): one minus its confidence, then
    its unknown score (None: below every score). Confidence first, by measurement: among the items that reach a
    line (sure, and under the unknown threshold) it puts the wrongly decided ones, unknown products included,
    first far better than the unknown score does (docs/benchmarks.md, "Which received items a receipt lists")."""
    score = ref.get("unknown_score")
    return (1.0 - float(ref["confidence"]), -math.inf if score is None else float(score))


def add_ranked(refs: list[dict[str, Any]], ref: dict[str, Any], max_refs: int) -> None:
    """``ref`` into ``refs`` (most doubtful first; among equals the newest first), keeping at most ``max_refs``."""
    rank = doubt(ref)
    refs.insert(next((i for i, r in enumerate(refs) if doubt(r) <= rank), len(refs)), ref)
    del refs[max_refs:]


def ranked(refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refs kept newest last (a station before the ranking saved them so) in ``add_ranked``'s order."""
    return sorted(reversed(refs), key=doubt, reverse=True)


def is_count(value: Any) -> bool:
    """An integer >= 0 as JSON gives one (a boolean is an int in Python, and no count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def received_line(key: str) -> bool:
    """Whether a refs key is a received label's line (not the review lane's "" nor the unknown items')."""
    return key not in ("", UNKNOWN_LABEL)


def refs_share(wanted: Sequence[int], budget: int) -> list[int]:
    """How many refs each line lists when all of them want more than ``budget``: an equal share (``cap``) for each,
    a line that wants less keeps all of its own and leaves the rest to the others; what an equal split leaves
    over goes one more to the first lines (in receipt order) that want more. Never more than a line wants."""
    if sum(wanted) <= budget:
        return list(wanted)
    left, cap = budget, 0
    for i, n in enumerate(sorted(wanted)):
        lines_left = len(wanted) - i
        if n * lines_left > left:
            cap = left // lines_left
            break
        left -= n
    share = [min(n, cap) for n in wanted]
    extra = budget - sum(share)
    for i, n in enumerate(wanted):
        if extra <= 0:
            break
        if n > cap:
            share[i] += 1
            extra -= 1
    return share


def prior_weights(labels: Sequence[str], still_expected: set[str], weight: float) -> np.ndarray:
    """``weight`` for each label still expected, 1 for the others (multiplied into probabilities, renormalized)."""
    return np.array([weight if label in still_expected else 1.0 for label in labels], dtype=np.float64)


@dataclass
class Shipment:
    """One shipment's expected lines and what has been received against them."""

    id: str
    expected: dict[str, int]
    opened_at: float
    closed_at: float | None = None
    received: dict[str, int] = field(default_factory=dict)
    review: int = 0
    # label -> its most doubtful refs, most doubtful first; "" (review) and "unknown" -> the newest, newest last
    refs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    refs_seen: dict[str, int] = field(default_factory=dict)
    unknown: int = 0              # items decided unknown: a product the model does not know
    vouched: int = 0              # items received only because the shipment vouched for them (not discrepancies)
    vouched_refs: list[dict[str, Any]] = field(default_factory=list)   # the newest of them

    def still_expected(self) -> set[str]:
        return {label for label, n in self.expected.items() if self.received.get(label, 0) < n}

    def record(self, decision: ItemDecision, decision_id: str, max_refs: int) -> None:
        key = "" if is_review(decision) else decision.label
        if key == UNKNOWN_LABEL:
            self.unknown += 1
        elif key:
            self.received[key] = self.received.get(key, 0) + 1
        else:
            self.review += 1
        ref = item_ref(decision, decision_id)
        refs = self.refs.setdefault(key, [])
        if received_line(key):
            add_ranked(refs, ref, max_refs)
        else:
            refs.append(ref)
            del refs[:-max_refs]
        self.refs_seen[key] = self.refs_seen.get(key, 0) + 1
        if decision.vouched:
            self.vouched += 1
            self.vouched_refs.append(ref)
            del self.vouched_refs[:-max_refs]

    def lines(self, line_room: int = MAX_RECEIPT_LINES,
              line_refs: int = MAX_RECEIPT_LINE_REFS) -> tuple[list[dict[str, Any]], int]:
        """Per label, expected first (in the command's order), then the unexpected ones by name; and how many
        unexpected lines were left off.

        Bounded (a receipt must fit a broker's message): at most ``line_room`` lines, every expected one and
        the unexpected ones with the most items (the others are left off the list, still counted in the totals
        and in ``items``), and at most ``line_refs`` refs over all lines, shared out by ``refs_share`` (each
        line's most doubtful kept; ``refs_left_off`` counts the rest)."""
        unexpected = sorted(set(self.received) - set(self.expected))
        room = max(0, line_room - len(self.expected))
        left_off = max(0, len(unexpected) - room)
        if left_off:
            kept = set(sorted(unexpected, key=lambda label: (-self.received[label], label))[:room])
            unexpected = [label for label in unexpected if label in kept]
        lines = [self._line(label) for label in [*self.expected, *unexpected]]
        shares = refs_share([len(line["refs"]) for line in lines], line_refs)
        for line, share in zip(lines, shares):
            if share < len(line["refs"]):
                del line["refs"][share:]
                line["refs_left_off"] = self.refs_seen.get(line["label"], 0) - share
        return lines, left_off

    def _line(self, label: str) -> dict[str, Any]:
        expected, received = self.expected.get(label, 0), self.received.get(label, 0)
        if expected == 0:
            status = "unexpected"
        else:
            status = "matched" if received == expected else "over" if received > expected else "short"
        refs = list(self.refs.get(label, [])) if status in ("over", "unexpected") else []
        return {"label": label, "expected": expected, "received": received, "status": status,
                "matched": min(expected, received), "over": max(0, received - expected) if expected else 0,
                "short": max(0, expected - received), "unexpected": received if not expected else 0,
                "refs": refs, "refs_left_off": self.refs_seen.get(label, 0) - len(refs) if refs else 0}

    def totals(self) -> dict[str, int]:
        """matched, over, short and unexpected items over every line, also those a receipt leaves off its list."""
        got = self.received
        return {"matched": sum(min(n, got.get(label, 0)) for label, n in self.expected.items()),
                "over": sum(max(0, got.get(label, 0) - n) for label, n in self.expected.items()),
                "short": sum(max(0, n - got.get(label, 0)) for label, n in self.expected.items()),
                "unexpected": sum(n for label, n in got.items() if label not in self.expected)}

    def receipt(self, max_bytes: int = RECEIPT_MAX_BYTES) -> dict[str, Any]:
        """The body of a receipt.v1 message without the station's fields (id, seq, ts, site, station): at most
        ``max_bytes`` as the outbox writes it. Over that (labels and lanes of hundreds of non-ASCII characters, each
        written as a 6-12 byte escape), the line refs are halved until none is left, then the review, unknown and
        vouched refs, then the unexpected lines with the fewest items (``lines_left_off`` counts them); every
        count and total still covers every item."""
        def fits(body: dict[str, Any]) -> bool:
            return len(dumps_finite(body, separators=(",", ":"))) <= max_bytes

        line_refs, side_refs = MAX_RECEIPT_LINE_REFS, None
        while True:
            body = self._receipt(MAX_RECEIPT_LINES, line_refs, side_refs)
            if fits(body):
                return body
            side = max(len(body[key]["refs"]) for key in ("review", "unknown", "vouched"))
            if line_refs > 0:
                line_refs //= 2
            elif side > 0:
                side_refs = side // 2
            else:
                break
        # no refs left: the most unexpected lines that fit (a search: the size grows with each line listed)
        best, low, high = None, 0, len(body["lines"]) - len(self.expected) - 1
        while low <= high:
            mid = (low + high) // 2
            body = self._receipt(len(self.expected) + mid, 0, 0)
            if fits(body):
                best, low = body, mid + 1
            else:
                high = mid - 1
        return best if best is not None else self._receipt(len(self.expected), 0, 0)  # the expected lines alone

    def _receipt(self, line_room: int, line_refs: int, side_refs: int | None) -> dict[str, Any]:
        lines, left_off = self.lines(line_room, line_refs)
        review_refs, unknown_refs = list(self.refs.get("", [])), list(self.refs.get(UNKNOWN_LABEL, []))
        vouched_refs = list(self.vouched_refs)
        if side_refs is not None:       # the most doubtful first (review, unknown) or the newest (vouched) kept
            review_refs, unknown_refs = review_refs[:side_refs], unknown_refs[:side_refs]
            vouched_refs = vouched_refs[max(0, len(vouched_refs) - side_refs):]
        totals: dict[str, int] = self.totals()
        totals["review"], totals["unknown"] = self.review, self.unknown
        totals["discrepancies"] = totals["over"] + totals["short"] + totals["unexpected"] + self.review + self.unknown
        return {"shipment": self.id, "state": "closed" if self.closed_at is not None else "open",
                "opened_at": round(self.opened_at, 6),
                "closed_at": round(self.closed_at, 6) if self.closed_at is not None else None,
                "items": sum(self.received.values()) + self.review + self.unknown, "lines": lines,
                "lines_left_off": left_off, "line_refs": "most_doubtful",
                "review": {"count": self.review, "refs": review_refs,
                           "refs_left_off": self.refs_seen.get("", 0) - len(review_refs)},
                "unknown": {"count": self.unknown, "refs": unknown_refs,
                            "refs_left_off": self.refs_seen.get(UNKNOWN_LABEL, 0) - len(unknown_refs)},
                "vouched": {"count": self.vouched, "refs": vouched_refs,
                            "refs_left_off": self.vouched - len(vouched_refs)},
                "totals": totals}

    def to_json(self) -> dict[str, Any]:
        """A copy to save (the desk calls it under its lock): the decide thread goes on recording into the live
        dicts while the copy is written out."""
        return {"id": self.id, "expected": dict(self.expected), "opened_at": self.opened_at,
                "received": dict(self.received), "review": self.review, "unknown": self.unknown,
                "refs": {k: list(v) for k, v in self.refs.items()}, "refs_seen": dict(self.refs_seen),
                "line_refs_ranked": True, "vouched": self.vouched, "vouched_refs": list(self.vouched_refs)}

    @classmethod
    def from_json(cls, raw: Any) -> "Shipment":
        """A shipment saved in station-state.json; ShipmentError naming the field when it is not one."""
        if not isinstance(raw, dict):
            raise ShipmentError("field shipment: expected an object")
        try:
            cmd = ExpectCommand.model_validate({"shipment": raw.get("id"), "lines": raw.get("expected")})
        except ValueError as exc:
            raise ShipmentError(f"field shipment: not a shipment ({exc})") from None
        received, refs, seen = raw.get("received") or {}, raw.get("refs") or {}, raw.get("refs_seen") or {}
        review, unknown, opened = raw.get("review", 0), raw.get("unknown", 0), raw.get("opened_at")
        if not (isinstance(received, dict) and all(is_count(v) for v in received.values())):
            raise ShipmentError("field shipment.received: expected label -> count (an integer >= 0, not a boolean)")
        for label in received:      # a received label is a line of the receipt: 1-256 characters, a product's
            if not 0 < len(label) <= MAX_LABEL_CHARS or not received_line(label):
                raise ShipmentError(f"field shipment.received: {label[:40]!r} is not a label (1-{MAX_LABEL_CHARS} "
                                    f"characters; review and {UNKNOWN_LABEL!r} items are counted apart)")
        if not (isinstance(refs, dict) and all(isinstance(v, list) for v in refs.values())):
            raise ShipmentError("field shipment.refs: expected label -> list")
        if not (isinstance(seen, dict) and all(is_count(v) for v in seen.values())):
            raise ShipmentError("field shipment.refs_seen: expected label -> count (an integer >= 0, not a boolean)")
        for key, kept in refs.items():   # refs_left_off is refs_seen - refs: never below 0
            if seen.get(key, 0) < len(kept):
                raise ShipmentError(f"field shipment.refs_seen.{key[:40]}: {seen.get(key, 0)} is fewer than the "
                                    f"{len(kept)} refs kept (expected at least as many)")
        if not all(is_count(n) for n in (review, unknown)):
            raise ShipmentError("field shipment.review or shipment.unknown: expected counts")
        if isinstance(opened, bool) or not isinstance(opened, (int, float)) or not (0 <= opened < 1e11):
            raise ShipmentError(f"field shipment.opened_at: {str(opened)[:40]} is not a time in seconds")
        vouched, vouched_refs = raw.get("vouched", 0), raw.get("vouched_refs") or []   # absent: saved before them
        if not (is_count(vouched) and isinstance(vouched_refs, list) and len(vouched_refs) <= vouched):
            raise ShipmentError("field shipment.vouched or shipment.vouched_refs: expected a count and its refs")
        refs = {k: list(v) for k, v in refs.items()}
        for key, kept in refs.items():
            if not received_line(key):
                continue
            try:        # each ref's doubt: a finite confidence, and a finite score or none (-inf)
                finite = all(math.isfinite(c) and (math.isfinite(u) or u == -math.inf) for c, u in map(doubt, kept))
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError):    # 10**400: no float
                finite = False
            if not finite:
                raise ShipmentError(f"field shipment.refs.{key}: a ref without a finite confidence and unknown score")
            if not raw.get("line_refs_ranked"):    # saved before the ranking (newest last): ranked from now on
                refs[key] = ranked(kept)
        return cls(cmd.shipment, dict(cmd.lines or {}), float(opened), None, dict(received), review,
                   refs, dict(seen), unknown, vouched, list(vouched_refs))


class ReceivingDesk:
    """The station's open shipment, shared by the command thread and the decide thread."""

    def __init__(self, cfg: ReceivingConfig, clock: Callable[[], float] = time.time,
                 receipt_max_bytes: int = RECEIPT_MAX_BYTES) -> None:
        """``receipt_max_bytes``: the largest receipt body (Shipment.receipt), under what the broker takes."""
        self.cfg = cfg
        self.clock = clock
        self.receipt_max_bytes = receipt_max_bytes
        self.shipment: Shipment | None = None
        self._lock = threading.Lock()
        # held by the decide thread from a batch's first frame until its messages and receipt are in the outbox,
        # and by the command thread while it opens or closes and stores that receipt: an item is decided, counted
        # and stored with one shipment, and an open receipt worked out before a close is stored before the final
        # one or not at all, so the final receipt always has the higher seq. Reentrant: a model swap inside a
        # batch decides the items still open and stores them (InferenceStage._flush_items).
        self.storing = threading.RLock()
        self._dirty = False
        self._last_receipt = float("-inf")

    def open(self, cmd: ExpectCommand, labels: Sequence[str]) -> Shipment:
        """Open ``cmd``'s shipment; ShipmentError when another is open or a line names a label the model lacks."""
        lines = dict(cmd.lines or {})
        missing = [label for label in lines if label not in labels]
        if missing:
            raise ShipmentError(f"field lines.{missing[0]}: not a label of the running model "
                                f"({len(missing)} line(s) unknown: {', '.join(map(repr, missing[:5]))})")
        with self._lock:
            if self.shipment is not None:
                if self.shipment.id == cmd.shipment and self.shipment.expected == lines:
                    return self.shipment     # the same command again (QoS 1 may deliver it twice)
                raise ShipmentError(f"field shipment: {self.shipment.id!r} is open; close it before opening "
                                    f"{cmd.shipment!r}")
            self.shipment = Shipment(cmd.shipment, lines, self.clock())
            self._dirty, self._last_receipt = False, self.shipment.opened_at   # its first receipt: Agent.expect
            return self.shipment

    def close(self, shipment_id: str) -> Shipment:
        """Close the open shipment ``shipment_id``; ShipmentError when it is not the one open."""
        with self._lock:
            if self.shipment is None or self.shipment.id != shipment_id:
                open_now = repr(self.shipment.id) if self.shipment else "none"
                raise ShipmentError(f"field shipment: {shipment_id!r} is not open (open: {open_now})")
            closed, self.shipment = self.shipment, None
            closed.closed_at = self.clock()
            return closed

    @contextmanager
    def expecting(self, cmd: ExpectCommand, labels: Sequence[str]) -> Iterator[Shipment]:
        """``cmd`` applied (open, or close), for a block that stores its receipt (the caller holds ``storing``);
        undone if the block raises: a shipment whose first or final receipt was not stored is as it was, and the
        same command can be sent again. ShipmentError as ``open`` and ``close`` raise it."""
        with self._lock:
            before, dirty, last = self.shipment, self._dirty, self._last_receipt
        shipment = self.close(cmd.shipment) if cmd.close else self.open(cmd, labels)
        try:
            yield shipment
        except BaseException:
            with self._lock:
                if cmd.close:
                    shipment.closed_at = None
                self.shipment, self._dirty, self._last_receipt = before, dirty, last
            raise

    def restore(self, shipment: Shipment) -> None:
        with self._lock:
            self.shipment = shipment

    def prior(self, labels: Sequence[str]) -> np.ndarray | None:
        """The weights an item decision multiplies its probabilities by; None when no shipment is open."""
        with self._lock:
            if self.shipment is None or self.cfg.expected_weight == 1:
                return None
            return prior_weights(labels, self.shipment.still_expected(), self.cfg.expected_weight)

    def vouches(self, label: str) -> bool:
        """Whether the open shipment still expects ``label`` and ``expected_unknown_keep`` is set: an item decided
        sure on it is judged unknown against the looser threshold (ItemTracker)."""
        with self._lock:
            return (self.shipment is not None and self.cfg.expected_unknown_keep is not None
                    and label in self.shipment.still_expected())

    def record(self, decision: ItemDecision, decision_id: str) -> None:
        with self._lock:
            if self.shipment is not None:
                self.shipment.record(decision, decision_id, self.cfg.max_refs)
                self._dirty = True

    def receipt_of(self, shipment: Shipment) -> dict[str, Any]:
        """``shipment``'s receipt now (the open one's, or one just closed), read under the desk's lock."""
        with self._lock:
            return shipment.receipt(self.receipt_max_bytes)

    def due_receipt(self, now: float) -> dict[str, Any] | None:
        """The open shipment's receipt when items were recorded and the interval allows one, else None. A clock
        stepped back since the last receipt (NTP) allows one: the interval is counted from then on, never held
        until the clock is back past the last receipt's time."""
        with self._lock:
            since = now - self._last_receipt
            if self.shipment is None or not self._dirty or 0 <= since < self.cfg.receipt_interval_s:
                return None
            self._dirty = False
            self._last_receipt = now
            return self.shipment.receipt(self.receipt_max_bytes)

    @contextmanager
    def receipt_due(self, now: float) -> Iterator[dict[str, Any] | None]:
        """``due_receipt(now)`` for a block that stores it (the caller holds ``storing``); due again if the block
        raises: the items it counts are in the next receipt, whatever the interval."""
        with self._lock:
            dirty, last = self._dirty, self._last_receipt
        receipt = self.due_receipt(now)
        try:
            yield receipt
        except BaseException:
            with self._lock:
                if receipt is not None:
                    self._dirty, self._last_receipt = dirty, last
            raise

    def saved(self) -> dict[str, Any] | None:
        """What station-state.json keeps of the open shipment."""
        with self._lock:
            return self.shipment.to_json() if self.shipment is not None else None


def receipt_body(receipt: dict[str, Any], *, site: str, station: str, ts: float, final: bool) -> dict[str, Any]:
    """A receipt.v1 body (the outbox adds seq; id is set here so a caller can name it)."""
    return {"schema": "receipt.v1", "id": str(uuid.uuid4()), "ts": round(ts, 6), "site": site, "station": station,
            "final": final, **receipt}
