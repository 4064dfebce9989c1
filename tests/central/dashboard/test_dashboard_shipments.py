"""Shipments on the dashboard: receipt.v1 messages as the agent builds them (agent/receiving.py), kept per
(station, shipment) by seq, bounded, shown in /api/shipments, the overview and the station card."""

from __future__ import annotations

import dataclasses
import json

import pytest
from dashboard_support import get_json, publish, wait_until

from agent.decide import ItemDecision
from agent.receiving import Shipment, receipt_body
from central.dashboard.feed import dashboard_topics
from central.dashboard.server import Dashboard
from central.dashboard.shipments import ShipmentBook
from central.dashboard.state import StateLimits, WarehouseState
from contract.broker import BrokerSettings
from contract.messages import ENGINES, checker, dumps_finite

SITE, STATION = "ber1", "receiving-01"
TOPIC = f"inventory/{SITE}/{STATION}/receipt"


def item(label: str, n: int, *, low: bool = False) -> ItemDecision:
    return ItemDecision("cam-1", n, label, 0, 0.55 if low else 0.93, 1.0, 3, 1.0, 1.0,
                        "manual-review" if low else "default", low, (), ((label, 0.93),), (3 * n, 3 * n + 2))


def decision_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def receipt(shipment: Shipment, seq: int, *, site: str = SITE, station: str = STATION, final: bool = False,
            ts: float = 1000.0) -> dict:
    """A receipt.v1 body exactly as the agent sends it (the outbox adds seq), checked against the schema."""
    body = {**receipt_body(shipment.receipt(), site=site, station=station, ts=ts, final=final), "seq": seq}
    checker("receipt.v1").check("test receipt", body)
    return body


def payload(body: dict) -> bytes:
    return dumps_finite(body).encode()


def mixed_shipment(name: str = "PO-1") -> Shipment:
    """Coats over by one, a dress short, a shirt matched, a bag nobody expected and one item for review."""
    shipment = Shipment(name, {"Coat": 2, "Dress": 1, "Shirt": 1}, opened_at=900.0)
    for n, label in enumerate(["Coat", "Coat", "Coat", "Shirt", "Bag"], start=1):
        shipment.record(item(label, n), decision_id(n), max_refs=100)
    shipment.record(item("Sandal", 6, low=True), decision_id(6), max_refs=100)
    return shipment


@pytest.mark.parametrize("engine", ENGINES)
def test_unexpected_lines_a_station_left_off_its_receipt_count_in_the_shipments_lines(engine):
    """A receipt too large for the broker lists fewer unexpected lines (agent Shipment.receipt, its
    lines_left_off): the dashboard counts them in lines_total and lines_left_off, and the totals stay whole."""
    shipment = mixed_shipment()
    for n, label in enumerate(["Hat", "Hat", "Scarf", "Belt"], start=7):
        shipment.record(item(label, n), decision_id(n), max_refs=100)
    whole = shipment.receipt()
    cut = shipment.receipt(max_bytes=0)           # nothing fits: the expected lines alone
    assert [line["label"] for line in cut["lines"]] == ["Coat", "Dress", "Shirt"] and cut["lines_left_off"] == 4
    assert cut["totals"] == whole["totals"]
    body = {**receipt_body(cut, site=SITE, station=STATION, ts=1000.0, final=False), "seq": 4}
    checker("receipt.v1").check("test receipt", body)
    state = WarehouseState(engine=engine)
    assert state.ingest(TOPIC, payload(body), received_at=1001.0) == "applied"
    shown = state.shipment_list()["shipments"][0]
    assert shown["lines_total"] == len(whole["lines"]) == 7
    assert len(shown["lines"]) + shown["lines_left_off"] == 6          # the discrepant lines: all but Shirt
    assert shown["totals"]["unexpected"] == 5


@pytest.mark.parametrize("engine", ENGINES)
def test_an_open_shipment_shows_its_discrepant_lines_with_the_decisions_behind_them(engine):
    state = WarehouseState(engine=engine)
    assert state.ingest(TOPIC, payload(receipt(mixed_shipment(), seq=4)), received_at=1001.0) == "applied"

    listing = state.shipment_list()
    assert (listing["open"], listing["open_with_discrepancies"], listing["closed"]) == (1, 1, 0)
    shown = listing["shipments"][0]
    assert (shown["station"], shown["shipment"], shown["state"], shown["seq"]) == (f"{SITE}/{STATION}", "PO-1",
                                                                                  "open", 4)
    assert shown["totals"] == {"matched": 3, "over": 1, "short": 1, "unexpected": 1, "review": 1,
                               "unknown": 0, "discrepancies": 4}
    assert (shown["items"], shown["lines_total"], shown["expected_total"]) == (6, 4, 4)
    lines = {line["label"]: line for line in shown["lines"]}
    assert {label: line["status"] for label, line in lines.items()} == {"Coat": "over", "Dress": "short",
                                                                        "Bag": "unexpected"}
    # the decisions behind an over or unexpected line, newest first; a short line has none (nothing came)
    assert [r["decision"] for r in lines["Coat"]["refs"]] == [decision_id(3), decision_id(2), decision_id(1)]
    assert [r["decision"] for r in lines["Bag"]["refs"]] == [decision_id(5)] and lines["Dress"]["refs"] == []
    assert shown["review"] == {"count": 1, "refs_left_off": 0, "refs": [
        {"decision": decision_id(6), "camera": "cam-1", "item_seq": 6, "label": "Sandal", "confidence": 0.55,
         "lane": "manual-review", "unknown_score": None}]}
    # the overview's figure and panel, and the station's card
    overview = state.overview(now=1002.0)["shipments"]
    assert (overview["open"], overview["open_with_discrepancies"], overview["hidden"]) == (1, 1, 0)
    assert overview["listed"][0]["shipment"] == "PO-1" and overview["listed"][0]["review_count"] == 1
    assert "refs" not in overview["listed"][0]["lines"][0]
    card = state.station_card(f"{SITE}/{STATION}", now=1002.0)
    assert card["shipment"]["shipment"] == "PO-1" and card["shipment"]["totals"]["discrepancies"] == 4
    assert card["counts"]["result"] == 0 and card["counts"]["receipt"] == 1     # counted as its own kind
    json.loads(dumps_finite(state.snapshot(now=1002.0)))                       # strict JSON all through


def test_items_the_shipment_vouched_for_are_shown_apart_from_its_discrepancies():
    shipment = Shipment("PO-5", {"Coat": 3}, opened_at=900.0)
    shipment.record(item("Coat", 1), decision_id(1), max_refs=100)
    for n in (2, 3):
        shipment.record(dataclasses.replace(item("Coat", n), vouched=True), decision_id(n), max_refs=100)
    state = WarehouseState()
    assert state.ingest(TOPIC, payload(receipt(shipment, seq=1))) == "applied"
    shown = state.shipment_list()["shipments"][0]
    assert shown["totals"]["matched"] == 3 and shown["discrepant"] is False and shown["lines"] == []
    assert shown["vouched"]["count"] == 2 and shown["vouched"]["refs_left_off"] == 0
    assert [r["decision"] for r in shown["vouched"]["refs"]] == [decision_id(3), decision_id(2)]   # newest first
    assert state.overview()["shipments"]["listed"][0]["vouched_count"] == 2
    assert state.station_card(f"{SITE}/{STATION}")["shipment"]["vouched_count"] == 2
    assert "vouched" not in state.overview()["shipments"]["listed"][0]                      # no refs in the brief
    # a receipt from a station before the block: none vouched
    older = receipt(shipment, seq=2)
    older.pop("vouched")
    assert state.ingest(TOPIC, payload(older)) == "applied"
    assert state.shipment_list()["shipments"][0]["vouched"] == {"count": 0, "refs": [], "refs_left_off": 0}


def test_the_newest_receipt_by_seq_replaces_the_earlier_and_a_late_or_repeated_one_changes_nothing():
    state = WarehouseState()
    shipment = Shipment("PO-2", {"Coat": 2}, opened_at=900.0)
    first = receipt(shipment, seq=5)                         # every line short: sent when the shipment opens
    shipment.record(item("Coat", 1), decision_id(1), 100)
    late = receipt(shipment, seq=6)
    shipment.record(item("Coat", 2), decision_id(2), 100)
    newest = receipt(shipment, seq=7)

    assert state.ingest(TOPIC, payload(first)) == "applied"
    assert state.ingest(TOPIC, payload(newest)) == "applied"
    assert state.ingest(TOPIC, payload(late)) == "applied"           # valid, but older than the one kept
    assert state.ingest(TOPIC, payload(newest)) == "duplicate"       # QoS 1 redelivery, by id
    listing = state.shipment_list()
    assert len(listing["shipments"]) == 1 and listing["superseded"] == 1
    shown = listing["shipments"][0]
    assert shown["seq"] == 7 and shown["totals"]["matched"] == 2 and shown["discrepant"] is False
    assert shown["lines"] == [] and listing["open_with_discrepancies"] == 0
    assert state.counters.duplicates == 1


def test_a_final_receipt_closes_the_shipment_and_open_ones_are_listed_first():
    state = WarehouseState()
    done = mixed_shipment("PO-3")
    state.ingest("inventory/ber1/receiving-02/receipt", payload(receipt(done, seq=10, station="receiving-02")))
    state.ingest(TOPIC, payload(receipt(mixed_shipment("PO-4"), seq=3)))
    done.closed_at = 1500.0
    final = receipt(done, seq=11, station="receiving-02", final=True)
    assert final["state"] == "closed"
    state.ingest("inventory/ber1/receiving-02/receipt", payload(final))
    # a late open receipt of the closed shipment does not reopen it
    state.ingest("inventory/ber1/receiving-02/receipt", payload(receipt(done, seq=9, station="receiving-02")))

    listing = state.shipment_list()
    assert [(s["shipment"], s["state"]) for s in listing["shipments"]] == [("PO-4", "open"), ("PO-3", "closed")]
    assert (listing["open"], listing["closed"], listing["superseded"]) == (1, 1, 1)
    assert listing["shipments"][1]["closed_at"] == 1500.0 and listing["shipments"][1]["final"] is True
    assert state.station_card("ber1/receiving-02")["shipment"] is None
    assert state.station_card(f"{SITE}/{STATION}")["shipment"]["shipment"] == "PO-4"
    assert state.overview()["shipments"]["open"] == 1


def test_a_late_open_receipt_does_not_reopen_a_shipment_whose_closing_is_no_longer_kept():
    book = ShipmentBook(closed_kept=2)
    first = Shipment("PO-A", {"Coat": 1}, opened_at=900.0)
    late = receipt(first, seq=4, ts=1000.0)                   # resent minutes later, after a reconnect
    first.record(item("Coat", 1), decision_id(1), 100)
    first.closed_at = 1010.0
    assert book.on_receipt(receipt(first, seq=5, ts=1010.0, final=True), 1010.0)
    for n in range(3):                                       # other docks close theirs: PO-A's closing rolls out
        other = Shipment(f"PO-{n}", {"Coat": 1}, 900.0, closed_at=1020.0)
        book.on_receipt(receipt(other, seq=1, station=f"receiving-1{n}", ts=1020.0, final=True), 1020.0)
    assert f"{SITE}/{STATION}/PO-A" not in book.closed

    assert book.on_receipt(late, 1100.0) is False
    assert book.counts()["open"] == 0 and book.superseded == 1 and book.open_at(f"{SITE}/{STATION}") is None
    following = Shipment("PO-B", {"Dress": 1}, opened_at=1030.0)          # the station's next shipment counts
    assert book.on_receipt(receipt(following, seq=6, ts=1030.0), 1030.0)
    assert book.open_at(f"{SITE}/{STATION}")["shipment"] == "PO-B"
    # a station whose outbox was replaced starts its seq again: newer by ts, its receipts count
    other_station = Shipment("PO-C", {"Bag": 1}, opened_at=900.0, closed_at=950.0)
    book.on_receipt(receipt(other_station, seq=40, station="receiving-20", ts=950.0, final=True), 950.0)
    again = Shipment("PO-D", {"Bag": 2}, opened_at=2000.0)
    assert book.on_receipt(receipt(again, seq=1, station="receiving-20", ts=2000.0), 2000.0)
    assert book.open_at(f"{SITE}/receiving-20")["shipment"] == "PO-D" and book.counts()["open"] == 2


def test_a_shipment_whose_final_receipt_never_came_stops_counting_open_when_its_station_opens_the_next():
    """The agent opens one shipment at a time. A final receipt dropped from a full outbox (or a station that lost
    its state) left the shipment open on the dashboard for good: two open for one dock, the overview's count
    creeping up by one per lost receipt, and a late resend of the old shipment's open receipt applied as well."""
    state = WarehouseState()
    first = Shipment("PO-A", {"Coat": 3}, opened_at=900.0)
    state.ingest(TOPIC, payload(receipt(first, seq=5, ts=1000.0)))
    late = payload(receipt(first, seq=6, ts=1001.0))              # resent after a reconnect, minutes later
    # PO-A's final receipt (seq 7) never arrives; the dock opens PO-B
    following = Shipment("PO-B", {"Dress": 1}, opened_at=2000.0)
    assert state.ingest(TOPIC, payload(receipt(following, seq=8, ts=2000.0))) == "applied"
    state.ingest(TOPIC, late)

    listing = state.shipment_list()
    assert [s["shipment"] for s in listing["shipments"]] == ["PO-B"]
    assert (listing["open"], listing["abandoned"], listing["superseded"]) == (1, 1, 1)
    assert state.overview()["shipments"]["open"] == 1
    assert state.station_card(f"{SITE}/{STATION}")["shipment"]["shipment"] == "PO-B"
    # other docks' shipments are their own; PO-A's final receipt, should it come after all, closes it
    other = Shipment("PO-C", {"Bag": 1}, opened_at=2100.0)
    state.ingest(f"inventory/{SITE}/receiving-02/receipt", payload(receipt(other, seq=1, station="receiving-02")))
    first.closed_at = 1500.0
    state.ingest(TOPIC, payload(receipt(first, seq=7, ts=1500.0, final=True)))
    listing = state.shipment_list()
    assert [(s["shipment"], s["state"]) for s in listing["shipments"]] == [("PO-C", "open"), ("PO-B", "open"),
                                                                          ("PO-A", "closed")]
    # the next open receipt of PO-B is not taken for a resend older than PO-A's closing
    following.record(item("Dress", 1), decision_id(1), 100)
    assert state.ingest(TOPIC, payload(receipt(following, seq=9, ts=2010.0))) == "applied"
    assert state.shipment_list()["shipments"][0]["items"] == 1 and state.shipment_list()["open"] == 2


def test_malformed_receipts_are_refused_and_counted_and_keep_nothing():
    state = WarehouseState()
    good = receipt(mixed_shipment(), seq=2)
    no_totals = {k: v for k, v in good.items() if k != "totals"}
    extra = {**good, "note": "x"}
    wrong_station = {**good, "station": "receiving-09"}
    bad_status = {**good, "lines": [{**good["lines"][0], "status": "lost"}]}
    zero_seq = {**good, "seq": 0}
    bodies = [payload(b) for b in (no_totals, extra, wrong_station, bad_status, zero_seq)]
    nan = payload(good).replace(b'"items": 6', b'"items": NaN')
    assert nan != payload(good)
    bodies += [nan, b"[1, 2]", b"{not json"]
    for body in bodies:
        assert state.ingest(TOPIC, body) == "malformed", body[:80]
    assert state.counters.malformed == len(bodies) and state.counters.malformed_by_kind == {"receipt": len(bodies)}
    assert state.shipment_list()["shipments"] == [] and state.overview()["shipments"]["open"] == 0
    assert state.ingest(TOPIC, payload(good)) == "applied"


def test_the_shipments_kept_are_bounded_and_a_huge_receipt_is_trimmed():
    state = WarehouseState(limits=StateLimits(shipments_open_kept=3, shipments_open_counted=3,
                                              shipments_closed_kept=2, shipments_shown=2))
    for n in range(5):             # five docks (a station has one shipment open at a time)
        state.ingest(f"inventory/{SITE}/dock-{n}/receipt",
                     payload(receipt(Shipment(f"open-{n}", {"Coat": 1}, 900.0), seq=n + 1, station=f"dock-{n}")))
    for n in range(4):
        closed = Shipment(f"closed-{n}", {"Coat": 1}, 900.0, closed_at=950.0)
        state.ingest(TOPIC, payload(receipt(closed, seq=100 + n, final=True)))
    listing = state.shipment_list()
    assert [s["shipment"] for s in listing["shipments"]] == ["open-4", "open-3", "open-2", "closed-3", "closed-2"]
    assert listing["dropped"] == 2
    overview = state.overview()["shipments"]
    assert [s["shipment"] for s in overview["listed"]] == ["open-4", "open-3"] and overview["hidden"] == 1
    assert [s["shipment"] for s in overview["closed_recent"]] == ["closed-3", "closed-2"]     # most recent first
    assert "refs" not in overview["closed_recent"][0]["lines"][0]

    book = ShipmentBook(lines_shown=50, refs_shown=10)
    big = Shipment("PO-big", {}, 900.0)
    for n in range(1, 61):
        big.record(item(f"label-{n:02d}", n), decision_id(n), 100)
    for n in range(61, 81):
        big.record(item("label-01", n), decision_id(n), 100)
    book.on_receipt(receipt(big, seq=1), 1000.0)
    view = book.listing()["shipments"][0]
    assert len(view["lines"]) == 50 and view["lines_left_off"] == 10
    first = view["lines"][0]          # the line with the most items first, its 10 newest refs
    assert first["label"] == "label-01" and first["unexpected"] == 21
    assert len(first["refs"]) == 10 and first["refs_left_off"] == 11 and first["refs"][0]["decision"] == decision_id(80)


def test_an_over_line_shows_its_most_doubtful_decisions_and_an_older_stations_its_newest():
    """A station's receipt ranks a line's refs (agent/receiving.py, ``line_refs: most_doubtful``): the dashboard
    shows its first ``refs_shown`` as they come. A receipt without ``line_refs`` (a station before the ranking)
    lists them newest last: the dashboard shows the newest, newest first, as before."""
    shipment = Shipment("PO-9", {"Coat": 1}, opened_at=900.0)
    for n, (confidence, score) in enumerate([(0.9, 2.0), (0.6, 7.0), (0.95, 1.0), (0.7, 5.0)], start=1):
        shipment.record(dataclasses.replace(item("Coat", n), confidence=confidence, unknown_score=score),
                        decision_id(n), max_refs=100)
    book = ShipmentBook(lines_shown=50, refs_shown=2)
    body = receipt(shipment, seq=1)
    book.on_receipt(body, 1000.0)
    line = book.listing()["shipments"][0]["lines"][0]
    assert [(r["item_seq"], r["unknown_score"]) for r in line["refs"]] == [(2, 7.0), (4, 5.0)]
    assert line["refs_left_off"] == 2

    older = json.loads(json.dumps(body))
    del older["line_refs"]
    for part in ("lines", ):
        for kept in older[part]:
            kept["refs"] = [{k: v for k, v in ref.items() if k != "unknown_score"}
                            for ref in sorted(kept["refs"], key=lambda r: r["item_seq"])]
    older["seq"], older["shipment"] = 2, "PO-8"
    checker("receipt.v1").check("a receipt from a station before the ranking", older)
    book.on_receipt(older, 1001.0)
    line = next(s for s in book.listing()["shipments"] if s["shipment"] == "PO-8")["lines"][0]
    assert [(r["item_seq"], r["unknown_score"]) for r in line["refs"]] == [(4, None), (3, None)]


def test_an_open_shipments_short_lines_are_awaited_and_become_discrepancies_when_it_closes():
    """Two coats and a dress expected, one coat in so far: open, it is not discrepant (2 items still awaited),
    so neither red nor counted in the top bar; closed like that, it is (short 2). An open one with an item for
    review is discrepant at once."""
    state = WarehouseState()
    shipment = Shipment("PO-5", {"Coat": 2, "Dress": 1}, opened_at=900.0)
    shipment.record(item("Coat", 1), decision_id(1), max_refs=100)
    state.ingest(TOPIC, payload(receipt(shipment, seq=1)))
    shown = state.shipment_list()["shipments"][0]
    assert (shown["discrepant"], shown["awaiting"], shown["totals"]["discrepancies"]) == (False, 2, 2)
    assert state.overview()["shipments"]["open_with_discrepancies"] == 0
    assert state.station_card(f"{SITE}/{STATION}")["shipment"]["discrepant"] is False
    shipment.closed_at = 990.0
    state.ingest(TOPIC, payload(receipt(shipment, seq=2, final=True)))
    closed = state.shipment_list()["shipments"][0]
    assert (closed["state"], closed["discrepant"], closed["awaiting"]) == ("closed", True, 0)
    other = Shipment("PO-6", {"Coat": 2}, opened_at=900.0)
    other.record(item("Coat", 3, low=True), decision_id(3), max_refs=100)
    state.ingest(TOPIC, payload(receipt(other, seq=3)))
    assert state.overview()["shipments"]["open_with_discrepancies"] == 1


def test_the_open_shipments_needing_attention_come_most_wrong_first_and_hold_still():
    """``listed``: the open shipments with discrepancies first, the most wrong items so far first, ties by key (not
    by receipt time, so the panel does not reorder at every receipt; awaited short lines do not count), then the
    newest receipts of the others."""
    state = WarehouseState(limits=StateLimits(shipments_shown=5))
    wrong = {"dock-a": 1, "dock-b": 3, "dock-c": 0, "dock-d": 1, "dock-e": 2}
    for n, (dock, extra) in enumerate(wrong.items()):
        shipment = Shipment(f"PO-{dock}", {"Coat": 5}, opened_at=900.0)
        for k in range(1, 2 + extra):             # one coat, then `extra` bags nobody expected
            shipment.record(item("Coat" if k == 1 else "Bag", k), decision_id(k), max_refs=100)
        state.ingest(f"inventory/{SITE}/{dock}/receipt",
                     payload(receipt(shipment, seq=1 + n, station=dock, ts=1000.0 + n)))
    shipments = state.overview()["shipments"]
    assert [s["shipment"] for s in shipments["listed"]] == ["PO-dock-b", "PO-dock-e", "PO-dock-a", "PO-dock-d",
                                                             "PO-dock-c"]
    assert [s["wrong_so_far"] for s in shipments["listed"]] == [3, 2, 1, 1, 0]
    assert shipments["open_with_discrepancies"] == 4 and shipments["hidden"] == 0
    fewer = state.shipments.overview(shown=2, closed_shown=0)
    assert [s["shipment"] for s in fewer["listed"]] == ["PO-dock-b", "PO-dock-e"] and fewer["hidden"] == 3


def test_more_open_shipments_than_listed_in_full_stay_counted_and_on_their_station_cards():
    """A dock fleet has more open shipments than the dashboard lists in full (``shipments_open_kept``): the
    older ones stay counted in the overview (open, with discrepancies), on their station's card and in the
    seq check (a late older receipt changes nothing); only their refs leave /api/shipments. Over
    ``shipments_open_counted`` the one with the oldest receipt is dropped and counted."""
    state = WarehouseState(limits=StateLimits(shipments_open_kept=2, shipments_open_counted=4, shipments_shown=3))
    for n in range(5):
        state.ingest(f"inventory/{SITE}/dock-{n}/receipt",
                     payload(receipt(mixed_shipment(f"PO-{n}"), seq=10, station=f"dock-{n}", ts=1000.0 + n)))
    listing = state.shipment_list()
    assert [s["shipment"] for s in listing["shipments"]] == ["PO-4", "PO-3"]          # in full, refs and all
    assert (listing["open"], listing["open_listed"], listing["open_with_discrepancies"], listing["dropped"]) == \
        (4, 2, 4, 1)
    overview = state.overview()["shipments"]
    assert overview["open"] == 4 and overview["open_with_discrepancies"] == 4
    # all four as wrong as each other (mixed_shipment): by key, so the panel holds still
    assert [s["shipment"] for s in overview["listed"]] == ["PO-1", "PO-2", "PO-3"] and overview["hidden"] == 1
    card = state.station_card(f"{SITE}/dock-1")
    assert card["shipment"]["shipment"] == "PO-1" and card["shipment"]["totals"]["discrepancies"] == 4
    assert "refs" not in card["shipment"]["lines"][0]
    assert state.station_card(f"{SITE}/dock-0")["shipment"] is None           # dropped: over 4 counted
    late = receipt(mixed_shipment("PO-1"), seq=9, station="dock-1")
    assert state.ingest(f"inventory/{SITE}/dock-1/receipt", payload(late)) == "applied"
    assert state.shipment_list()["superseded"] == 1 and state.shipment_list()["open"] == 4
    with pytest.raises(ValueError, match="open_counted"):
        ShipmentBook(open_kept=10, open_counted=5)


def test_the_dashboard_subscribes_to_receipts_and_serves_them(broker):
    settings = BrokerSettings(port=broker.port)
    assert "inventory/+/+/receipt" in dashboard_topics(settings)
    dash = Dashboard(settings, port=0, push_interval_s=0.1, no_auth=True)
    dash.start()
    try:
        host, port = dash.address
        publish(broker.port, [(TOPIC, payload(receipt(mixed_shipment(), seq=1)))])
        body = wait_until(lambda: (lambda b: b if b["shipments"] else None)(
            get_json(f"http://{host}:{port}/api/shipments")), 30, "the receipt in /api/shipments")
        assert body["schema"] == "dashboard-shipments.v1" and body["open_with_discrepancies"] == 1
        assert body["shipments"][0]["shipment"] == "PO-1"
        assert {line["label"] for line in body["shipments"][0]["lines"]} == {"Coat", "Dress", "Bag"}
        assert get_json(f"http://{host}:{port}/api/overview")["shipments"]["open"] == 1
        card = get_json(f"http://{host}:{port}/api/stations/{SITE}/{STATION}")
        assert card["shipment"]["shipment"] == "PO-1"
    finally:
        dash.stop()
