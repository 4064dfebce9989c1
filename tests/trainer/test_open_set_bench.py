"""benchmarks/open_set.py's reference recalls taken from an earlier result (``--reference-from``), for a machine
that does not hold the reference bundle: the recalls come back as measured, and a file without them is refused
by name."""

from __future__ import annotations

import json

import pytest
from benchmark_script import load

bench = load("open_set")


def test_reference_recalls_come_from_an_earlier_result(tmp_path):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"reference_recall_all_data": {"Bag": 0.994, "Shirt": 0.778}, "folds": []}))
    assert bench.reference_from(earlier) == {"Bag": 0.994, "Shirt": 0.778}


@pytest.mark.parametrize("body", [
    '{"reference_recall_all_data": null}',                         # a run made without --reference-bundle
    '{"reference_recall_all_data": {"Bag": 1.5}}',                  # not a share
    '{"reference_recall_all_data": {"Bag": "0.9"}}',
    '[1, 2]',
    'not json',
])
def test_a_result_without_reference_recalls_is_refused_by_name(tmp_path, body):
    path = tmp_path / "result.json"
    path.write_text(body)
    with pytest.raises(SystemExit) as info:
        bench.reference_from(path)
    assert str(path) in str(info.value)


def test_a_missing_file_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit) as info:
        bench.reference_from(tmp_path / "absent.json")
    assert "absent.json" in str(info.value)


def test_a_receipt_names_the_first_k_refs_of_a_line_over_by_k_not_the_whole_line():
    """The receiving simulation counted every item listed on an over line as reported, right ones included: an
    unknown item decided sure as an expected product, behind a right one on a line over by 1, was "named". A
    dock checks the first k refs (most doubtful first); the rest of the line is not singled out."""
    from agent.decide import ItemDecision
    from agent.receiving import Shipment

    def decided(n: int, label: str, confidence: float) -> ItemDecision:
        return ItemDecision("cam", n, label, 0, confidence, 1.0, 1, 0.0, 0.0, label, False, (), ((label, confidence),),
                            (n, n), unknown_score=1.0)

    shipment = Shipment("PO-1", {"Coat": 2, "Bag": 1}, 0.0)
    for n, (label, confidence) in enumerate([("Coat", 0.95), ("Coat", 0.6), ("Coat", 0.97),   # over by 1
                                              ("Bag", 0.99), ("Shirt", 0.9)], start=1):       # matched, unexpected
        shipment.record(decided(n, label, confidence), f"d{n}", max_refs=100)
    named = bench.singled_out(shipment.receipt())
    assert named == {"d2", "d5"}            # the most doubtful Coat (over by 1) and the unexpected Shirt
