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
