"""Shipments as the dashboard sees them: the newest ``receipt.v1`` of each (station, shipment).

A station publishes the whole tally of its open shipment now and then (agent/receiving.py), and once more
with ``final: true`` when the shipment is closed. Each receipt replaces the one before it: the dashboard keeps,
per (station, shipment), only the receipt with the highest ``seq`` (the station's outbox sequence), so a
receipt that arrives late (the outbox resends after a reconnect) never undoes a newer one; duplicates are
dropped by ``id`` before this (WarehouseState). What is kept is the trimmed view (``shipment_view``), never
the receipt (up to 2,000 lines with 100 refs each): the book's memory is bounded by its limits, not by the
stations.

Bounds, two tiers for open shipments: every open shipment up to ``open_counted`` is counted and kept brief
(totals and its first lines, no refs: the overview's figures and panel and its station's card read these),
and the newest ``open_kept`` of them in full (``/api/shipments``). A dock fleet easily has more open than
``open_kept`` (900 docks in the fleet benchmark): the older ones then stay counted and on their station's card,
only their refs are not listed. Over ``open_counted`` the shipment with the oldest receipt is dropped, logged
and counted; ``closed_kept`` closed ones (the most recently closed) are kept in full.

A station has one shipment open at a time (the agent refuses to open another), so an open receipt of a newer
shipment ends the station's open one whose final receipt never came (dropped from a full outbox, or lost with
the station's state): it is no longer counted open (``abandoned``, logged), and a late open receipt of it is
``superseded``. Without this every lost final receipt stayed open for good.
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

DISCREPANT = ("over", "short", "unexpected")


def _ref_view(ref: dict[str, Any]) -> dict[str, Any]:
    return {"decision": ref["decision"], "camera": ref["camera"], "item_seq": ref["item_seq"],
            "label": ref["label"], "confidence": ref["confidence"], "lane": ref["lane"],
            "unknown_score": ref.get("unknown_score")}


def _refs(refs: list[dict[str, Any]], left_off: int, shown: int, ranked: bool = False) -> dict[str, Any]:
    """The first ``shown`` refs of a ``ranked`` list (a line's most doubtful, most doubtful first), else the newest
    ``shown`` (the agent appends, so the newest are last) newest first; and how many are left off."""
    kept = (refs[:shown] if ranked else list(reversed(refs[-shown:]))) if shown else []
    return {"refs": [_ref_view(r) for r in kept], "refs_left_off": left_off + len(refs) - len(kept)}


def _counted(block: dict[str, Any] | None, shown: int) -> dict[str, Any]:
    """A receipt's counted list (review, unknown, vouched) with its newest refs; absent (stations before it): none."""
    block = block or {"count": 0, "refs": [], "refs_left_off": 0}
    return {"count": block["count"], **_refs(block["refs"], block["refs_left_off"], shown)}


def shipment_view(body: dict[str, Any], received_at: float, *, lines_shown: int = 50,
                  refs_shown: int = 10) -> dict[str, Any]:
    """What the API and the page show of one receipt: its totals; whether it is ``discrepant`` (open: an over,
    unexpected, review or unknown item so far, ``wrong_so_far``; closed: any discrepancy, short lines included)
    and how many items an open one is still ``awaiting``; its discrepant lines (over, short, unexpected; the most
    items first) with their most doubtful decision refs (the newest from stations before the ranking); the
    review/unknown items with their newest; and the items the shipment vouched for (received on an expected line
    though scored beyond the unknown threshold: not discrepancies, but what a dock checks first if a line looks
    wrong)."""
    ranked = body.get("line_refs") == "most_doubtful"       # absent (stations before it): the newest
    discrepant = [line for line in body["lines"] if line["status"] in DISCREPANT]
    discrepant.sort(key=lambda line: (-(line["over"] + line["short"] + line["unexpected"]), line["label"]))
    lines = [{"label": line["label"], "status": line["status"], "expected": line["expected"],
              "received": line["received"], "over": line["over"], "short": line["short"],
              "unexpected": line["unexpected"], **_refs(line["refs"], line["refs_left_off"], refs_shown, ranked)}
             for line in discrepant[:lines_shown]]
    totals = {"unknown": 0, **body["totals"]}
    # while a shipment is open, a short line is still arriving: it flags the shipment only once it is closed;
    # over, unexpected, review and unknown items are wrong whatever comes next
    still_open = not is_closed(body)
    wrong_now = totals["over"] + totals["unexpected"] + totals["review"] + totals["unknown"]
    return {"key": f"{body['site']}/{body['station']}/{body['shipment']}", "station": f"{body['site']}/{body['station']}",
            "site": body["site"], "shipment": body["shipment"], "state": body["state"], "final": body["final"],
            "seq": body["seq"], "ts": body["ts"], "received_at": received_at, "opened_at": body["opened_at"],
            "closed_at": body["closed_at"], "items": body["items"],
            "lines_total": len(body["lines"]) + body.get("lines_left_off", 0),   # with those the station left off
            "expected_total": sum(line["expected"] for line in body["lines"]), "totals": totals,
            "discrepant": (wrong_now if still_open else totals["discrepancies"]) > 0, "wrong_so_far": wrong_now,
            "awaiting": totals["short"] if still_open else 0, "lines": lines,
            "lines_left_off": max(0, len(discrepant) - lines_shown) + body.get("lines_left_off", 0),
            "review": _counted(body["review"], refs_shown), "unknown": _counted(body.get("unknown"), refs_shown),
            "vouched": _counted(body.get("vouched"), refs_shown)}


def brief_view(view: dict[str, Any], lines: int = 5) -> dict[str, Any]:
    """A shipment for the overview and the station card: totals and its first discrepant lines, no refs."""
    return {**{k: v for k, v in view.items() if k not in ("lines", "review", "unknown", "vouched")},
            "review_count": view["review"]["count"], "unknown_count": view["unknown"]["count"],
            "vouched_count": view["vouched"]["count"],
            "lines": [{k: v for k, v in line.items() if k not in ("refs", "refs_left_off")}
                      for line in view["lines"][:lines]],
            "lines_left_off": view["lines_left_off"] + max(0, len(view["lines"]) - lines)}


def is_closed(body: dict[str, Any]) -> bool:
    return bool(body["final"]) or body["state"] == "closed"


def _older(body: dict[str, Any], seq: int, ts: float) -> bool:
    """Whether receipt ``body`` was sent before the station's receipt (``seq``, ``ts``): a lower seq and no later
    ``ts``, both the station's own (a station whose outbox was replaced starts its seq again; newer by ``ts``)."""
    return body["seq"] < seq and body["ts"] <= ts


class ShipmentBook:
    """The newest receipt's view of each (station, shipment); not thread-safe (WarehouseState's lock)."""

    def __init__(self, *, open_kept: int = 200, open_counted: int = 5000, closed_kept: int = 50,
                 lines_shown: int = 50, refs_shown: int = 10) -> None:
        if open_counted < open_kept:
            raise ValueError(f"open_counted ({open_counted}) below open_kept ({open_kept})")
        self.open_kept, self.open_counted, self.closed_kept = open_kept, open_counted, closed_kept
        self.lines_shown, self.refs_shown = lines_shown, refs_shown
        self.open: OrderedDict[str, dict[str, Any]] = OrderedDict()     # key -> brief, oldest receipt first
        self.detail: OrderedDict[str, dict[str, Any]] = OrderedDict()   # the newest open_kept: key -> view
        self.closed: OrderedDict[str, dict[str, Any]] = OrderedDict()   # key -> view, oldest closing first
        self.superseded = 0                # receipts older (by seq) than the one kept, or than their station's
        #                                    newest closing (``_closed_since``): not applied
        # station -> (seq, ts) of its newest closing receipt applied: a station has one shipment open at a time, so
        # an open receipt older than that (a late resend) is of a shipment already closed, kept or not
        self.station_closed: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.dropped = 0                   # open shipments dropped over open_counted
        self.station_open: dict[str, str] = {}      # station -> the key of its open shipment (one at a time)
        self.abandoned = 0                 # open shipments ended by a newer one of their station, never closed

    def on_receipt(self, body: dict[str, Any], received_at: float) -> bool:
        """Keep ``body`` (a checked receipt.v1) if it is the newest of its shipment; False when it is older."""
        station = f"{body['site']}/{body['station']}"
        key = f"{station}/{body['shipment']}"
        kept = self.open.get(key) or self.closed.get(key)
        if body["seq"] <= kept["seq"] if kept is not None else self._closed_since(station, body):
            self.superseded += 1
            return False
        other_key = None if is_closed(body) else self.station_open.get(station)
        if other_key is not None and other_key != key:
            other = self.open[other_key]
            if _older(body, other["seq"], other["ts"]):     # a late resend of a shipment the station has left
                self.superseded += 1
                return False
            self._abandon(other)
        view = shipment_view(body, received_at, lines_shown=self.lines_shown, refs_shown=self.refs_shown)
        self._remove_open(key)
        self.closed.pop(key, None)
        if is_closed(body):
            self.closed[key] = view
            while len(self.closed) > self.closed_kept:
                self.closed.popitem(last=False)
            self.station_closed.pop(station, None)
            self.station_closed[station] = (body["seq"], body["ts"])
            while len(self.station_closed) > self.open_counted:
                self.station_closed.popitem(last=False)
            return True
        self.open[key] = brief_view(view)
        self.detail[key] = view
        self.station_open[station] = key
        while len(self.detail) > self.open_kept:      # still open, counted and on its card: only its refs go
            self.detail.popitem(last=False)
        while len(self.open) > self.open_counted:
            gone, old = next(iter(self.open.items()))
            self._remove_open(gone)
            self.dropped += 1
            log.warning("shipment %s dropped from the dashboard: over %d open shipments (its last receipt "
                        "came at %.0f)", gone, self.open_counted, old["received_at"])
        return True

    def _remove_open(self, key: str) -> dict[str, Any] | None:
        brief = self.open.pop(key, None)
        self.detail.pop(key, None)
        if brief is not None and self.station_open.get(brief["station"]) == key:
            del self.station_open[brief["station"]]
        return brief

    def _abandon(self, brief: dict[str, Any]) -> None:
        self._remove_open(brief["key"])
        self.abandoned += 1
        log.warning("shipment %s no longer counted open: its station opened a newer one and its final receipt never "
                    "came (last receipt seq %d, %d items of %d expected)", brief["key"], brief["seq"], brief["items"],
                    brief["expected_total"])

    def forget_station(self, station: str) -> str | None:
        """Drop ``station``'s open shipment (the station is out of service); its id, or None when it had none."""
        self.station_closed.pop(station, None)
        key = self.station_open.get(station)
        brief = self._remove_open(key) if key is not None else None
        return brief["shipment"] if brief is not None else None

    def _closed_since(self, station: str, body: dict[str, Any]) -> bool:
        """Whether ``body``, an open receipt of a shipment the book does not hold, is older than its station's newest
        closing: a resend of a shipment closed since, whose closing receipt is no longer among the ``closed_kept``
        (at a thousand docks, within seconds). Older means a lower seq and an earlier ``ts``, both the station's
        own: a station whose outbox was replaced starts its seq again, and its receipts are newer by ``ts``."""
        last = self.station_closed.get(station)
        return last is not None and not is_closed(body) and _older(body, *last)

    def listing(self) -> dict[str, Any]:
        """``/api/shipments``: the newest ``open_kept`` open shipments in full (newest receipt first), then the
        recently closed (newest first); ``open`` counts them all."""
        return {"schema": "dashboard-shipments.v1", **self.counts(),
                "shipments": list(reversed(self.detail.values())) + list(reversed(self.closed.values()))}

    def counts(self) -> dict[str, int]:
        return {"open": len(self.open), "open_with_discrepancies": sum(v["discrepant"] for v in self.open.values()),
                "open_listed": len(self.detail), "closed": len(self.closed), "superseded": self.superseded,
                "dropped": self.dropped, "abandoned": self.abandoned, "open_kept": self.open_kept,
                "open_counted": self.open_counted, "closed_kept": self.closed_kept}

    def overview(self, shown: int = 10, closed_shown: int = 5) -> dict[str, Any]:
        """The overview's figures and the page's panel (brief views, what the page shows and no more: at a
        thousand docks the overview goes to every page at every change): ``listed``, the ``shown`` open
        shipments, those that need attention first (discrepant, the most wrong items so far first; ties by
        key, so they hold still while receipts come in), then the newest receipts; and ``closed_recent``, the
        ``closed_shown`` most recently closed (their final receipts)."""
        attention = heapq.nsmallest(shown, (v for v in self.open.values() if v["discrepant"]),
                                    key=lambda v: (-v["wrong_so_far"], v["key"]))
        first = {v["key"] for v in attention}
        newest = (v for v in reversed(self.open.values()) if v["key"] not in first)
        listed = attention + [v for _, v in zip(range(shown - len(attention)), newest)]
        closed = [brief_view(v) for _, v in zip(range(closed_shown), reversed(self.closed.values()))]
        return {**self.counts(), "listed": listed, "closed_recent": closed,
                "hidden": max(0, len(self.open) - len(listed))}

    def open_at(self, station_key: str) -> dict[str, Any] | None:
        """The station's open shipment (its newest receipt, if it had several open), brief; None if none."""
        for brief in reversed(self.open.values()):
            if brief["station"] == station_key:
                return brief
        return None
