"""benchmarks/receipt_cost.py: the receipts it times are what a dock sends (the agent's Shipment, valid
receipt.v1 with both schema engines), their refs are capped so a receipt grows with its discrepant lines, not
with its items, and the script writes every row with its ratio to a decision and its command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from benchmark_script import load

from contract.messages import ENGINES, checker, dumps_finite

REPO = Path(__file__).resolve().parents[3]


def test_the_receipts_are_a_docks_and_stop_growing_at_the_refs_cap(tmp_path):
    bench = load("receipt_cost")
    rng = np.random.default_rng(1)
    sizes = {}
    for items in (100, 2000, 4000):
        body = {**bench.receipt_of(items, rng), "seq": 1}
        for engine in ENGINES:
            checker("receipt.v1", engine).check(f"receipt after {items} items", body)
        assert body["items"] == items and sum(line["expected"] for line in body["lines"]) == items
        assert all(len(block["refs"]) <= 50 for block in [*body["lines"], body["review"], body["unknown"]])
        sizes[items] = len(dumps_finite(body))
    # it grows with the refs, 50 at most per line and list, not with the items: 4,000 items are not twice 2,000
    assert sizes[100] < sizes[2000] and sizes[4000] < 1.5 * sizes[2000]

    out = tmp_path / "cost.json"
    assert bench.main(["--items", "20", "--repeat", "3", "--rounds", "1", "--overview-docks", "12",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["message"] for row in result["rows"]] == ["decision.v1", "receipt.v1 after 20 items"]
    assert all(row[f"{e}_us"] > 0 and row[f"{e}_ratio"] > 0 for row in result["rows"] for e in ENGINES)
    assert result["command"].startswith("python benchmarks/receipt_cost.py --items 20")
    # the overview lists 10 open shipments of the 12 and 5 closed, whatever the number of docks
    assert (result["overview"]["listed"], result["overview"]["closed_listed"]) == (10, 5)
    assert 0 < result["overview"]["shipments_bytes"] < result["overview"]["overview_bytes"]
