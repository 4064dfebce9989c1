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


def _agent_support():
    """tests/agent/agent_support.py: the agent tests' small real ONNX bundles (an open-set one among them)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "agent" / "agent_support.py"
    spec = importlib.util.spec_from_file_location("agent_support_for_open_set_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _colour_inputs(rgbs, n: int, rng, size: int = 16):
    """``n`` frames of each colour (pixel noise), normalized as the open-set bundle's input (mean 0.5, std 0.25)."""
    import numpy as np

    frames = [np.clip(np.asarray(rgb, float) + rng.normal(0, 12, (size, size, 3)), 0, 255)
              for rgb in rgbs for _ in range(n)]
    return ((np.stack(frames) / 255.0 - 0.5) / 0.25).transpose(0, 3, 1, 2).astype(np.float32)


@pytest.fixture(scope="module")
def colour_bundle(tmp_path_factory):
    from contract.bundle import load_bundle

    support = _agent_support()
    folder = support.make_open_set_bundle(tmp_path_factory.mktemp("open-set-bench"))
    return support, load_bundle(folder)


def test_receiving_writes_each_shipment_item_so_a_later_rule_can_be_recomputed(colour_bundle):
    """Each item of the simulated shipment is in the JSON with its kind, true and decided label and its place on
    the station's list (line and rank); the receipt's lines with status and over. Recomputing what the receipt
    names from them alone (the rule of ``singled_out``) gives the reported figures back."""
    import numpy as np

    support, bundle = colour_bundle
    rng = np.random.default_rng(5)
    known = [support.OPEN_SET_COLOURS[c] for c in bundle.labels]
    ks_logits, ks_emb = bench.bundle_outputs(bundle, _colour_inputs(known, 60, rng))
    # unknown items of a dark red: under the unknown threshold, decided sure as red, so red's line is over
    us_logits, us_emb = bench.bundle_outputs(bundle, _colour_inputs([(200, 50, 50)], 20, rng))
    outputs = {"ks_y": np.repeat(np.arange(len(known)), 60), "ks_logits": ks_logits, "ks_emb": ks_emb,
               "us_y": np.zeros(20, int), "us_logits": us_logits, "us_emb": us_emb}
    result = bench.receiving(bundle, outputs, bundle.labels, np.random.default_rng(0), items=100)
    items, lines = result["shipment_items"], result["receipt_lines"]
    json.dumps(items + lines)                                            # plain JSON
    assert len(items) == 100
    assert [sum(i["kind"] == k for i in items) for k in ("expected", "unexpected", "unknown")] == [90, 5, 5]
    assert all(i["line"] is not None and i["rank"] >= 0 for i in items)
    assert all((i["label"] is None) == (i["kind"] == "unknown") for i in items)
    status = {line["label"]: line for line in lines}
    over = [line for line in lines if line["status"] == "over"]
    assert result["over_lines"] == len(over) >= 1
    for line in over:       # every item of the line listed once, ranked 0..received-1
        assert sorted(i["rank"] for i in items if i["line"] == line["label"]) == list(range(line["received"]))
    line_of = {i["ref"]: status.get(i["line"]) for i in items}
    named = {i["ref"] for i in items
             if i["line"] in ("review", "unknown")
             or (line_of[i["ref"]] or {}).get("status") == "unexpected"
             or ((line_of[i["ref"]] or {}).get("status") == "over" and i["rank"] < line_of[i["ref"]]["over"])}
    assert result["unknown_reported"] == sum(i["ref"] in named for i in items if i["kind"] == "unknown")
    assert result["unexpected_reported"] == sum(i["ref"] in named for i in items if i["kind"] == "unexpected")
    assert result["false_discrepancies_on_confident_expected"] == sum(
        i["ref"] in named for i in items if i["kind"] == "expected" and i["sure_right"])
    assert result["confident_expected_items"] == sum(i["kind"] == "expected" and i["sure_right"] for i in items)


def test_fold_outputs_kept_for_one_bundle_are_computed_again_for_another(colour_bundle, tmp_path):
    """outputs.npz under --work is reused for the bundle it came from (its manifest's sha256), and computed again
    when the fold's bundle is another (exported afresh): before, any earlier outputs.npz was returned as it was."""
    import argparse

    import cv2
    import numpy as np

    support, bundle = colour_bundle
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for name, rgb in [*support.OPEN_SET_COLOURS.items(), ("purple", (150, 40, 200))]:
        folder = data / "test" / name
        folder.mkdir(parents=True)
        for n in range(2):
            image = np.clip(np.asarray(rgb, float) + rng.normal(0, 12, (28, 28, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(folder / f"{n}.png"), image[:, :, ::-1])
    args = argparse.Namespace(work=tmp_path / "work", data=data, test_per_class=2, station_per_class=2)
    (args.work / "fold0").mkdir(parents=True)
    cache = args.work / "fold0" / "outputs.npz"
    stale = {k: np.zeros(1) for k in ("k_y", "u_y", "k_logits", "k_emb", "u_logits", "u_emb", "ks_y", "us_y",
                                      "ks_logits", "ks_emb", "us_logits", "us_emb")}
    np.savez(cache, **stale)                                   # an earlier run's, of another bundle
    out = bench.fold_outputs(0, bundle, bundle.labels, ["purple"], args)
    assert out["k_logits"].shape == (2 * len(bundle.labels), len(bundle.labels))
    again = bench.fold_outputs(0, bundle, bundle.labels, ["purple"], args)     # the same bundle: read back
    assert set(again) == set(out) and all(np.array_equal(again[k], out[k]) for k in out)
    np.savez(cache, **stale, manifest_sha256=np.array("0" * 64))
    assert bench.fold_outputs(0, bundle, bundle.labels, ["purple"], args)["k_logits"].shape == out["k_logits"].shape
