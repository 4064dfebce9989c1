"""What a receipt.v1 costs the dashboard, by the size of its shipment, against a decision.v1 in the same run.

A dock sends the whole tally of its open shipment after every decided item
(``decisions.receiving.receipt_interval_s: 0``, the default), so a receipt grows with the shipment until its
refs are capped (``max_refs`` per line and per list). Receipts here are built by the agent's own code
(``agent.receiving.Shipment``, ``receipt_body``) from decisions in a dock's mix: 80% on the expected lines,
10% to review, 5% unknown, 5% a label nobody expected, over 5 expected lines. The baseline is a decision.v1
as a simulated station publishes it (``agent.sim.fleet.StationSim``). Each message is given a new id and a
higher seq, and ``WarehouseState.ingest`` (the dashboard's whole path: strict JSON, schema, dedupe, apply)
takes ``--repeat`` of them, in one thread, for each schema engine; the figure is the median of ``--rounds``.
Last, the size of the overview every open page gets at every change, with ``--overview-docks`` docks each
holding an open 60-item shipment and 10 shipments closed.

    .venv/bin/python benchmarks/receipt_cost.py --out benchmarks/results/receipt_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.decide import ItemDecision  # noqa: E402
from agent.receiving import Shipment, receipt_body  # noqa: E402
from central.dashboard.state import WarehouseState  # noqa: E402
from contract.messages import ENGINES, dumps_finite  # noqa: E402

SITE, STATION = "ber1", "receiving-01"
LINES = ("Coat", "Dress", "Shirt", "Bag", "Sandal")
OTHERS = ("Trouser", "Sneaker", "Pullover")


def receipt_of(items: int, rng: np.random.Generator, max_refs: int = 50) -> dict:
    """The receipt a dock sends after the ``items``-th item of a shipment of ``items`` expected, 5 lines."""
    shipment = Shipment("PO-4711", {label: max(1, items // len(LINES)) for label in LINES}, opened_at=1.0)
    for k in range(1, items + 1):
        r = rng.random()
        low = r < 0.15
        label = ("unknown" if r < 0.05 else OTHERS[rng.integers(len(OTHERS))] if r >= 0.95
                 else LINES[rng.integers(len(LINES))])
        decision = ItemDecision("dock-a", k, label, None if label == "unknown" else 0,
                                float(rng.uniform(0.4 if low else 0.8, 0.7 if low else 1.0)), 1.0, 4, 1.0, 1.0,
                                "manual-review" if low else "lane-1", low, ("low confidence",) if low else (),
                                ((label, 0.9),), (4 * k, 4 * k + 3), unknown_score=float(rng.uniform(0.0, 20.0)))
        shipment.record(decision, str(uuid.uuid4()), max_refs)
    return receipt_body(shipment.receipt(), site=SITE, station=STATION, ts=2.0, final=False)


def decision_body() -> dict:
    """One decision.v1 as a simulated receiving station publishes it (the agent's ItemTracker behind it)."""
    from agent.sim.fleet import FleetConfig, ItemImages, StationSim, classify

    cfg = FleetConfig(sites=1, per_site=1, qc_every=0)
    sim = StationSim(cfg, SITE, STATION, 0, ItemImages(cfg.labels, cfg.jpeg_side), np.random.default_rng(0))
    while True:
        cls = classify([sim], [sim.next_logits(sim.cameras[0])], cfg.labels)[0]
        for kind, body, _ in sim.frame_messages(sim.cameras[0], cls):
            if kind == "decision":
                return body


def per_message_us(body: dict, kind: str, engine: str, repeat: int, rounds: int) -> float:
    """Median over ``rounds`` of the time ``WarehouseState.ingest`` takes per message, in microseconds."""
    topic = f"inventory/{SITE}/{STATION}/{kind}"
    times = []
    for _ in range(rounds):
        state = WarehouseState(engine=engine)
        payloads = [dumps_finite({**body, "id": str(uuid.uuid4()), "seq": n + 1}).encode() for n in range(repeat + 1)]
        state.ingest(topic, payloads.pop(0), received_at=3.0)      # the station's first: its state is created
        began = time.perf_counter()
        for payload in payloads:
            if state.ingest(topic, payload, received_at=3.0) != "applied":
                raise SystemExit(f"a {kind} was not applied: the benchmark's message is not what a station sends")
        times.append((time.perf_counter() - began) / repeat * 1e6)
    return statistics.median(times)


def overview_bytes(docks: int, items: int, closed: int, rng: np.random.Generator) -> dict:
    """The dashboard overview's size (what every open page gets at every change) with ``docks`` docks each
    holding an open shipment of ``items`` items and ``closed`` of them closed since: all of it and its
    shipments part."""
    state = WarehouseState()
    for n in range(docks + closed):
        dock = n % docks
        body = {**receipt_of(items, rng), "station": f"dock-{dock:04d}", "shipment": f"PO-{n}", "seq": n + 1}
        if n < closed:
            body.update(final=True, state="closed", closed_at=2.0)
        if state.ingest(f"inventory/{SITE}/dock-{dock:04d}/receipt", dumps_finite(body).encode(), 3.0) != "applied":
            raise SystemExit("a receipt was not applied")
    overview = state.overview(now=4.0)
    return {"docks": docks, "items": items, "closed": closed, "overview_bytes": len(dumps_finite(overview)),
            "shipments_bytes": len(dumps_finite(overview["shipments"])),
            "listed": len(overview["shipments"]["listed"]),
            "closed_listed": len(overview["shipments"]["closed_recent"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", default="20,100,500,2000", help="shipment sizes (items), comma-separated")
    p.add_argument("--repeat", type=int, default=300, help="messages ingested per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--overview-docks", type=int, default=900, help="docks for the overview's size (default 900)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    decision = {k: v for k, v in decision_body().items() if k not in ("id", "seq")}
    rows = []
    base = {engine: per_message_us(decision, "decision", engine, args.repeat, args.rounds) for engine in ENGINES}
    rows.append({"message": "decision.v1", "bytes": len(dumps_finite(decision)),
                 **{f"{e}_us": round(base[e], 1) for e in ENGINES}, **{f"{e}_ratio": 1.0 for e in ENGINES}})
    for items in (int(x) for x in args.items.split(",")):
        receipt = {k: v for k, v in receipt_of(items, rng).items() if k != "id"}
        us = {engine: per_message_us(receipt, "receipt", engine, args.repeat, args.rounds) for engine in ENGINES}
        rows.append({"message": f"receipt.v1 after {items} items", "bytes": len(dumps_finite(receipt)),
                     **{f"{e}_us": round(us[e], 1) for e in ENGINES},
                     **{f"{e}_ratio": round(us[e] / base[e], 2) for e in ENGINES}})
    for row in rows:
        print(f"{row['message']:28s} {row['bytes']:7d} B  " + "  ".join(
            f"{e} {row[f'{e}_us']:8.1f} us ({row[f'{e}_ratio']:.2f}x a decision)" for e in ENGINES), flush=True)
    size = overview_bytes(args.overview_docks, 60, 10, rng)
    print(f"overview with {size['docks']} docks' open 60-item shipments and 10 closed: {size['overview_bytes']} B "
          f"({size['shipments_bytes']} B of shipments: {size['listed']} open and {size['closed_listed']} closed "
          "listed)")
    if args.out is not None:
        args.out.write_text(json.dumps({"benchmark": "receipt_cost", "rows": rows, "overview": size,
                                        "repeat": args.repeat,
                                        "rounds": args.rounds,
                                        "command": "python benchmarks/receipt_cost.py " + " ".join(argv or sys.argv[1:])},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
