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

While a shipment is open, cmd/model refuses a bundle whose labels lack one of its expected lines (``lacking``):
on its manifest, before any artifact is fetched, and once more right before the swap (under ``storing``, so a
shipment opened while the update downloaded is checked too).

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
they are stored in the order they describe (never an open receipt after the final one). The open shipment and
its tally are saved in station-state.json (``persist``) before each receipt is stored, and at shutdown: a crash
(kill -9, power cut) between the two leaves a saved tally at least as far as every stored receipt, so a
receipt after a restart never counts fewer items than one before it. Before a batch whose decisions it counts
is stored, the tally is saved with them pending (``stage``), each with the outbox seq its message gets (the
outbox takes seqs in order, in the transaction that stores the messages): a restart counts those whose seq the
outbox has handed out since (``restore``), so a crash after the outbox stored the batch and before the next
save neither loses its items nor counts them twice, and one before it counts none. A batch stored as saved needs
no save before its receipt (``save_for_receipt``); one stored otherwise (a write failed, a message refused) is
saved again at once (``settle``), before a later message moves the outbox's seq past the decisions it lacks.
A close saves the closed shipment with its final receipt's id and time before that receipt is stored; a restart
that finds it stores that final receipt again (the same id, ts and body: a subscriber drops the duplicate by id)
and keeps no shipment open,
so a crash never loses the final receipt nor reopens a shipment whose final receipt was sent. A save that fails
(``ReceiptSaveError``: a full disk) keeps the receipt after it out of the outbox: a periodic one stays due (its
batch's decisions are stored and counted), an open or close is undone; a save after a final receipt was stored
that fails is logged (the next start stores that receipt again). A close of the shipment closed last (sent
again: QoS 1 may redeliver it) is done already (``AlreadyClosed``): nothing is stored again, and a close of a
shipment neither open nor closed last is refused. The shipment closed last is saved too (``saved_closed``), so a
close sent again after a restart is done already as well.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from agent.config import MAX_SHIPMENT_LINES, ExpectCommand, ReceivingConfig
from agent.decide import ItemDecision
from contract.messages import SchemaCheck, dumps_finite, mqtt_schema
from contract.openset import UNKNOWN_LABEL  # the label of an item the unknown score rejects (never sorted)

log = logging.getLogger(__name__)

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


class ReceiptSaveError(OSError):
    """The desk's state could not be saved (``ReceivingDesk.persist``) before a receipt, so that receipt is not
    stored: a periodic one stays due (the batch's decisions are stored and counted all the same), an open or a
    close is undone. Whoever saves logs and counts it (agent/app.py ``StateSaveError`` derives from it)."""


@dataclass(frozen=True)
class ClosedShipment:
    """What the desk remembers of the shipment it closed last: enough to answer its close sent again, also after
    a restart (saved in station-state.json: ``ReceivingDesk.saved_closed``)."""

    id: str
    final_id: str | None
    lines: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "final_receipt": self.final_id, "lines": self.lines}

    @classmethod
    def from_json(cls, raw: Any) -> "ClosedShipment":
        """A closed shipment saved in station-state.json; ShipmentError naming the field when it is not one."""
        if not isinstance(raw, dict):
            raise ShipmentError("field last_closed: expected an object with id, final_receipt and lines")
        try:
            ExpectCommand.model_validate({"shipment": raw.get("id"), "close": True})
        except ValueError:
            raise ShipmentError(f"field last_closed.id: {str(raw.get('id'))[:40]!r} is not a shipment id") from None
        final_id, lines = raw.get("final_receipt"), raw.get("lines")
        if final_id is not None:
            try:
                if not isinstance(final_id, str) or str(uuid.UUID(final_id)) != final_id.lower():
                    raise ValueError
            except ValueError:
                raise ShipmentError(f"field last_closed.final_receipt: {str(final_id)[:40]!r} is not a uuid "
                                    f"string or null") from None
        if not is_count(lines) or lines > MAX_SHIPMENT_LINES:
            raise ShipmentError(f"field last_closed.lines: {str(lines)[:40]} is not a count of lines (0 to "
                                f"{MAX_SHIPMENT_LINES})")
        return cls(raw["id"], final_id, lines)


class AlreadyClosed(ShipmentError):
    """A close of the shipment the station closed last (QoS 1 redelivered it, an operator sent it again): done
    already, nothing to store again. ``closed``: that shipment."""

    def __init__(self, closed: ClosedShipment) -> None:
        super().__init__(f"shipment {closed.id!r} was already closed (final receipt {closed.final_id}); nothing "
                         f"stored again")
        self.closed = closed


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


@lru_cache(maxsize=1)
def ref_check() -> SchemaCheck:
    """receipt.v1's ref (the same for a line's, review, unknown and vouched), checked by jsonschema (what a station
    installs): a saved ref must be one to be listed in a receipt."""
    receipt = mqtt_schema("receipt.v1")
    return SchemaCheck(receipt["properties"]["lines"]["items"]["properties"]["refs"]["items"], "jsonschema")


def check_saved_refs(refs: dict[str, list[Any]], vouched_refs: list[Any]) -> None:
    """ShipmentError naming the field when a saved ref is not one receipt.v1 takes: restored, it would make every
    receipt of the shipment one its subscribers refuse."""
    kept = [(f"refs[{key[:40]!r}]", kept) for key, kept in refs.items()] + [("vouched_refs", vouched_refs)]
    for where, listed in kept:
        for i, ref in enumerate(listed):
            problem = ref_check().error(ref)
            if problem is not None:
                raise ShipmentError(f"field shipment.{where}[{i}]: not a receipt ref ({problem[0]}: "
                                    f"{str(problem[1])[:80]})")


def doubt(ref: dict[str, Any]) -> tuple[float, float]:
    """How doubtful a received item is, for ranking a line's refs (higher: more): one minus its confidence, then
    its unknown score (None: below every score). Confidence first, by measurement: among the items that reach a
    line (sure, and under the unknown threshold) it puts the wrongly decided ones, unknown products included,
    first far better than the unknown score does (docs/notes/benchmark-history.md, "Which received items a receipt
    lists")."""
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
    final_id: str | None = None     # once closed: its final receipt's id and ts, saved before it is stored
    final_ts: float | None = None
    # the batch being stored (ReceivingDesk.stage), saved with the tally before its messages are: each decision it
    # counts once stored ({"seq", "review", "vouched", "ref"}: the highest outbox seq its message can get); emptied
    # when the batch is stored, and counted at a restart as far as the outbox's seq shows it stored
    pending: list[dict[str, Any]] = field(default_factory=list)

    def still_expected(self) -> set[str]:
        return {label for label, n in self.expected.items() if self.received.get(label, 0) < n}

    def record(self, decision: ItemDecision, decision_id: str, max_refs: int) -> None:
        self.count(is_review(decision), item_ref(decision, decision_id), decision.vouched, max_refs)

    def count(self, review: bool, ref: dict[str, Any], vouched: bool, max_refs: int) -> None:
        """One item: on the review lane (``review``), else on its label's line (``unknown`` counted apart)."""
        key = "" if review else ref["label"]
        if key == UNKNOWN_LABEL:
            self.unknown += 1
        elif key:
            self.received[key] = self.received.get(key, 0) + 1
        else:
            self.review += 1
        refs = self.refs.setdefault(key, [])
        if received_line(key):
            add_ranked(refs, ref, max_refs)
        else:
            refs.append(ref)
            del refs[:-max_refs]
        self.refs_seen[key] = self.refs_seen.get(key, 0) + 1
        if vouched:
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
        saved = {"id": self.id, "expected": dict(self.expected), "opened_at": self.opened_at,
                 "received": dict(self.received), "review": self.review, "unknown": self.unknown,
                 "refs": {k: list(v) for k, v in self.refs.items()}, "refs_seen": dict(self.refs_seen),
                 "line_refs_ranked": True, "vouched": self.vouched, "vouched_refs": list(self.vouched_refs)}
        if self.closed_at is not None:      # closed, its final receipt not known to be stored (ReceivingDesk)
            saved["closed_at"] = self.closed_at
            saved["final_receipt"] = {"id": self.final_id, "ts": self.final_ts}
        if self.pending:        # saved before its batch is stored (ReceivingDesk.stage)
            saved["pending"] = list(self.pending)
        return saved

    def final_fields(self) -> dict[str, Any]:
        """A closed shipment's final receipt's id and ts, fixed when it was closed (empty while it is open): the
        final receipt stored again after a crash is the same message."""
        if self.closed_at is None or self.final_id is None or self.final_ts is None:
            return {}
        return {"id": self.final_id, "ts": round(self.final_ts, 6)}

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
        closed_at, final_id, final_ts = closed_fields(raw, float(opened))
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
        check_saved_refs(refs, vouched_refs)
        pending = pending_decisions(raw.get("pending"), closed_at is not None)
        return cls(cmd.shipment, dict(cmd.lines or {}), float(opened), closed_at, dict(received), review,
                   refs, dict(seen), unknown, vouched, list(vouched_refs), final_id, final_ts, pending)


MAX_PENDING = 100_000       # decisions of one batch being stored: far above any batch's (a frame decides one item)


def pending_decisions(raw: Any, closed: bool) -> list[dict[str, Any]]:
    """A saved shipment's batch being stored (``Shipment.pending``; absent: none, or saved before it was kept);
    ShipmentError naming the field when it is not one. A closed shipment has none: it is closed between batches."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_PENDING or (raw and closed):
        raise ShipmentError(f"field shipment.pending: expected a list of at most {MAX_PENDING} decisions, and none "
                            f"for a closed shipment")
    for i, item in enumerate(raw):
        if not (isinstance(item, dict) and is_count(item.get("seq")) and isinstance(item.get("review"), bool)
                and isinstance(item.get("vouched"), bool)):
            raise ShipmentError(f"field shipment.pending[{i}]: expected seq (a count), review and vouched (booleans) "
                                f"and ref")
        ref = item.get("ref")
        problem = ref_check().error(ref)
        if problem is not None:
            raise ShipmentError(f"field shipment.pending[{i}].ref: not a receipt ref ({problem[0]}: "
                                f"{str(problem[1])[:80]})")
        if not item["review"] and not ref["label"]:     # the schema bounds its length, numbers and their range
            raise ShipmentError(f"field shipment.pending[{i}].ref.label: empty (a received item has its label)")
    return [{"seq": p["seq"], "review": p["review"], "vouched": p["vouched"], "ref": p["ref"]} for p in raw]


def closed_fields(raw: dict[str, Any], opened: float) -> tuple[float | None, str | None, float | None]:
    """A saved shipment's closed_at and its final receipt's id and ts (all None for an open one, and for one saved
    before they were); ShipmentError naming the field when they are not a close."""
    closed, final = raw.get("closed_at"), raw.get("final_receipt")
    if closed is None and final is None:
        return None, None, None
    if isinstance(closed, bool) or not isinstance(closed, (int, float)) or not (0 <= closed < 1e11):
        raise ShipmentError(f"field shipment.closed_at: {str(closed)[:40]} is not a time in seconds")
    if not isinstance(final, dict):
        raise ShipmentError("field shipment.final_receipt: expected an object with id and ts")
    final_id, ts = final.get("id"), final.get("ts")
    try:
        uuid.UUID(str(final_id))
    except ValueError:
        raise ShipmentError(f"field shipment.final_receipt.id: {str(final_id)[:40]} is not a uuid") from None
    if not isinstance(final_id, str) or isinstance(ts, bool) or not isinstance(ts, (int, float)) \
            or not (0 <= ts < 1e11):
        raise ShipmentError("field shipment.final_receipt: expected a uuid string id and a time in seconds ts")
    return float(closed), final_id, float(ts)


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
        # the shipment just closed, until its final receipt is stored (saved as such: a restart stores it again)
        self.closing: Shipment | None = None
        # saves the desk as it is now into station-state.json (set by the inference stage): called before a
        # receipt is stored, never under the desk's lock
        self.persist: Callable[[], None] | None = None
        # stores a restored closed shipment's final receipt (set by the inference stage): ``restore``
        self.store_final: Callable[[Shipment], None] | None = None
        # the shipment closed last, once its final receipt is stored: its close sent again is done already
        self.last_closed: ClosedShipment | None = None
        # the outbox's next sequence number (set by the inference stage): a batch's decisions are saved with the
        # highest seq each can get before it is stored (``stage``), and a restart counts those below it (``restore``)
        self.next_seq: Callable[[], int] | None = None
        self._staged: Shipment | None = None    # the shipment whose pending batch is being stored, and
        self._staged_saved = False              # whether it was saved with it
        self._stored: dict[str, int | None] = {}    # its decisions stored so far: id -> the seq they got
        # the saved pending batch is not what its batch stored (a write failed, a message was refused) and saving
        # the tally after it failed: saved before the next batch however few decisions it has
        self._stale = False
        # the state saved last gives the tally as it is now at a restart (its pending batch stored as saved): a
        # periodic receipt needs no save of its own (``save_for_receipt``)
        self._current = False

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
            self._current = False
            self._dirty, self._last_receipt = False, self.shipment.opened_at   # its first receipt: Agent.expect
            return self.shipment

    def lacking(self, labels: Sequence[str]) -> tuple[str, list[str]] | None:
        """The open shipment's id and its expected lines (in the command's order) whose label is not in ``labels``
        (a model about to run: cmd/model refuses it, else receiving could never match those lines); None when no
        shipment is open or every line's label is there."""
        known = set(labels)
        with self._lock:
            if self.shipment is None:
                return None
            missing = [label for label in self.shipment.expected if label not in known]
            return (self.shipment.id, missing) if missing else None

    def close(self, shipment_id: str) -> Shipment:
        """Close the open shipment ``shipment_id``; AlreadyClosed when it is the one closed last (and not opened
        again since), ShipmentError when it is neither."""
        with self._lock:
            if self.shipment is None or self.shipment.id != shipment_id:
                last = self.last_closed if self.closing is None else _closed(self.closing)
                if last is not None and last.id == shipment_id:
                    raise AlreadyClosed(last)
                open_now = repr(self.shipment.id) if self.shipment else "none"
                raise ShipmentError(f"field shipment: {shipment_id!r} is not open (open: {open_now})")
            closed, self.shipment = self.shipment, None
            self._current = False
            closed.closed_at = self.clock()
            closed.final_id, closed.final_ts = str(uuid.uuid4()), closed.closed_at
            return closed

    @contextmanager
    def expecting(self, cmd: ExpectCommand, labels: Sequence[str]) -> Iterator[Shipment]:
        """``cmd`` applied (open, or close), for a block that stores its receipt (the caller holds ``storing``);
        undone if the block raises: a shipment whose first or final receipt was not stored is as it was, and the
        same command can be sent again. ShipmentError as ``open`` and ``close`` raise it."""
        with self._lock:
            before, dirty, last, closing = self.shipment, self._dirty, self._last_receipt, self.closing
        shipment = self.close(cmd.shipment) if cmd.close else self.open(cmd, labels)
        try:
            if cmd.close:
                with self._lock:
                    self.closing = shipment     # saved as closed until its final receipt is stored
            self._persist()         # saved first: a crash after the receipt is stored never finds the state older
            yield shipment
        except BaseException:
            with self._lock:
                if cmd.close:
                    shipment.closed_at = shipment.final_id = shipment.final_ts = None
                self.shipment, self._dirty, self._last_receipt, self.closing = before, dirty, last, closing
            self._persist()
            raise
        with self._lock:
            if self.closing is shipment:    # its final receipt is stored
                self.closing = None
            if cmd.close:
                self.last_closed = _closed(shipment)

    def _persist(self) -> None:
        if self.persist is not None:
            self.persist()
            self._stale = False

    def restore(self, shipment: Shipment) -> None:
        """The shipment saved in station-state.json. An open one saved with a batch being stored (the station
        stopped while it stored one, or before the save after it) counts the batch's decisions the outbox stored
        (``settle_restored``). A closed one (the station stopped after saving its close and before the saved state
        knew its final receipt stored) is not opened again: its final receipt, the same message, is stored again
        now (``store_final``)."""
        counted = -1
        with self._lock:
            self._current = False
            if shipment.closed_at is not None:
                self.closing = shipment
            else:
                self.shipment = shipment
                counted = self._settle_restored(shipment)
                self._dirty = self._dirty or counted > 0
        if shipment.closed_at is not None:
            self.flush_closing()
        elif counted >= 0:
            self._save_settled(shipment)

    def stage(self, counted: Sequence[tuple[ItemDecision, str]], batch_ids: Sequence[str | None]) -> None:
        """Before a batch's messages are stored (the caller holds ``storing``): the decisions the open shipment
        counts once they are stored (``counted``: each decision and its message's id; ``batch_ids``: the batch's
        message ids in order) are saved with its tally as its pending batch, each with the highest seq its message
        can get (the outbox's next seq plus its place in the batch). So a crash after the outbox stored the batch
        and before the next save neither loses its items nor counts them twice: a restart counts those whose seq
        the outbox has handed out since (``restore``). ``record`` each decision stored with its seq, then
        ``settle``. A save that fails is logged (the saver counts it): the batch is stored and counted all the
        same, and only a crash before the next save leaves its items out of the tally."""
        if self.next_seq is None or not (counted or self._stale):
            return
        self._current = False
        first = self.next_seq()
        place = {message_id: i for i, message_id in enumerate(batch_ids)}
        with self._lock:
            shipment = self.shipment
            if shipment is None:
                return
            shipment.pending = [{"seq": first + place[decision_id], "review": is_review(decision),
                                 "vouched": decision.vouched, "ref": item_ref(decision, decision_id)}
                                for decision, decision_id in counted if decision_id in place]
            self._staged, self._staged_saved, self._stored = shipment, False, {}
        try:
            self._persist()
        except ReceiptSaveError as exc:
            log.error("shipment %s: the tally with the batch being stored could not be saved first (%s); the batch is "
                      "stored and counted all the same, but a crash before the next save leaves its %d item(s) out of "
                      "the tally", shipment.id, exc, len(shipment.pending))
            return
        with self._lock:
            self._staged_saved = self._staged is shipment

    def save_for_receipt(self) -> None:
        """Before a periodic receipt is stored: the tally saved (ReceiptSaveError as ``persist`` raises it), unless
        the state saved with the batch just stored gives that tally at a restart already (``stage``, ``settle``):
        one save per batch, as before the batch was saved with it."""
        if self._current:
            return
        self._persist()
        self._current = True

    def settle(self) -> None:
        """The batch ``stage`` saved is stored (or its write failed): it is no longer pending. When the saved
        pending batch is not what the outbox stored (a decision not stored: the write failed, the outbox refused
        it; one stored under another seq than saved: a message before it was refused), the tally is saved again
        now, before anything else is stored: a restart would judge that batch by a seq later messages move on."""
        with self._lock:
            shipment, saved, stored = self._staged, self._staged_saved, self._stored
            self._staged, self._staged_saved, self._stored = None, False, {}
            if shipment is None:
                return
            pending, shipment.pending = shipment.pending, []
            exact = all(stored.get(p["ref"]["decision"], -1) == p["seq"] for p in pending)
            self._current = saved and exact and len(stored) == len(pending)
        if not saved or exact:      # not saved: the state file is the one before, behind the tally, never ahead
            return
        try:
            self._persist()
            self._current = True
        except ReceiptSaveError as exc:
            self._stale = True
            log.error("shipment %s: the tally could not be saved after a batch the outbox did not store as saved (%s); "
                      "saved again before the next batch", shipment.id, exc)

    def _settle_restored(self, shipment: Shipment) -> int:
        """A restored shipment's pending batch: each decision whose seq the outbox has handed out is stored (the
        outbox takes a seq in the transaction that stores its message, and a batch's messages in order) and
        counted, the others never were. How many were counted; -1 when none was pending. Under the lock."""
        pending, shipment.pending = shipment.pending, []
        if not pending:
            return -1
        if self.next_seq is None:
            log.error("shipment %s: %d decision(s) of the batch being stored when the station stopped are not counted: "
                      "the outbox's seq cannot be read", shipment.id, len(pending))
            return 0
        below = self.next_seq()
        stored = [p for p in pending if p["seq"] < below]
        for p in stored:
            shipment.count(p["review"], p["ref"], p["vouched"], self.cfg.max_refs)
        log.warning("shipment %s: the station stopped while it stored a batch; %d of its %d decision(s) are in the "
                    "outbox (seq below %d) and counted, %d never were stored", shipment.id, len(stored), len(pending),
                    below, len(pending) - len(stored))
        return len(stored)

    def _save_settled(self, shipment: Shipment) -> None:
        """The restored tally saved without its pending batch, before anything else is stored: the seq a restart
        judges that batch by moves on with new messages."""
        try:
            self._persist()
        except ReceiptSaveError as exc:
            log.error("shipment %s: the restored tally could not be saved (%s); saved with the next receipt",
                      shipment.id, exc)

    def flush_closing(self) -> None:
        """Store the final receipt of a shipment closed before a restart, if one is still waiting (``restore``);
        one the outbox cannot store waits for the next call (the inference stage calls it with each receipt)."""
        with self.storing:
            closing = self.closing
            if closing is None or self.store_final is None:
                return
            try:
                self.store_final(closing)
            except Exception as exc:    # kept (and saved): the next receipt, or the next start, tries again
                log.error("shipment %s: its final receipt could not be stored (%s: %s); tried again with the next "
                          "receipt", closing.id, type(exc).__name__, exc)
                return
            with self._lock:
                if self.closing is closing:
                    self.closing = None
                self.last_closed = _closed(closing)
                self._current = False
            try:
                self._persist()
            except ReceiptSaveError as exc:     # stored already: the state still names it closed, not stored
                log.error("shipment %s: its final receipt is stored, but the station state could not be saved "
                          "after it (%s); the next start stores that receipt once more (a duplicate a subscriber "
                          "drops by id)", closing.id, exc)

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

    def record(self, decision: ItemDecision, decision_id: str, seq: int | None = None) -> None:
        """Count a decision the outbox stored (``seq``: the seq its message got; None: not known)."""
        with self._lock:
            if self.shipment is not None:
                self.shipment.record(decision, decision_id, self.cfg.max_refs)
                self._dirty = True
                if self._staged is self.shipment:
                    self._stored[decision_id] = seq
                else:
                    self._current = False

    def receipt_of(self, shipment: Shipment) -> dict[str, Any]:
        """``shipment``'s receipt now (the open one's, or one just closed: with its final receipt's id and ts, as
        saved), read under the desk's lock."""
        with self._lock:
            return {**shipment.receipt(self.receipt_max_bytes), **shipment.final_fields()}

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
        """What station-state.json keeps: the open shipment, else one closed whose final receipt is not stored yet
        (a restart stores it), else nothing."""
        with self._lock:
            shipment = self.shipment if self.shipment is not None else self.closing
            return shipment.to_json() if shipment is not None else None

    def saved_closed(self) -> dict[str, Any] | None:
        """What station-state.json keeps of the shipment closed last (its close sent again after a restart is done
        already), None when there is none."""
        with self._lock:
            return self.last_closed.to_json() if self.last_closed is not None else None


def _closed(shipment: Shipment) -> ClosedShipment:
    return ClosedShipment(shipment.id, shipment.final_id, len(shipment.expected))


def receipt_body(receipt: dict[str, Any], *, site: str, station: str, ts: float, final: bool) -> dict[str, Any]:
    """A receipt.v1 body (the outbox adds seq; id is set here so a caller can name it, unless ``receipt`` names
    its own id and ts: a final receipt's, ``ReceivingDesk.receipt_of``)."""
    return {"schema": "receipt.v1", "id": str(uuid.uuid4()), "ts": round(ts, 6), "site": site, "station": station,
            "final": final, **receipt}
