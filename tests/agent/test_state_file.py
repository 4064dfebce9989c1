"""station-state.json on its own (agent/state.py): a configured bundle that cannot be read at start proves no change
of config, and a state set aside never replaces one set aside before. Real files in a temp folder."""

from __future__ import annotations

import json
import logging
import re

import pytest

from agent.state import KEEP_SET_ASIDE, STATE_FILE, StationState, manifest_sha256


def make_bundle(folder, name="b"):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": name}))
    return folder


def test_an_unreadable_configured_bundle_leaves_the_state_as_it_is(tmp_path, caplog):
    """A volume not mounted yet at start: before, the missing manifest's sha (None) differed from the recorded one,
    the state went to .previous "as the config changed", and the rolled-out model was lost."""
    bundle = make_bundle(tmp_path / "bundle")
    path = tmp_path / STATE_FILE
    StationState.load(path, bundle).set_model(tmp_path / "installed" / "v7", "v7")
    written = path.read_bytes()
    (tmp_path / "bundle").rename(tmp_path / "bundle.off")
    with caplog.at_level(logging.WARNING):
        during = StationState.load(path, bundle)
    assert during.model is not None and during.model["version"] == "v7"
    assert during.configured_sha256 == manifest_sha256(tmp_path / "bundle.off")      # kept, for the next save
    assert path.read_bytes() == written and not (tmp_path / f"{STATE_FILE}.previous").exists()
    assert f"{path}: the configured bundle's manifest ({bundle}) cannot be read" in caplog.text
    assert "could not be checked" in caplog.text
    during.set_thresholds({"cam": {"min_confidence": 0.4}})        # a save meanwhile keeps the recorded sha
    (tmp_path / "bundle.off").rename(tmp_path / "bundle")
    after = StationState.load(path, bundle)
    assert after.model is not None and after.model["version"] == "v7" and after.thresholds == {
        "cam": {"min_confidence": 0.4}}


def test_a_changed_configured_bundle_still_sets_the_state_aside(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    path = tmp_path / STATE_FILE
    StationState.load(path, bundle).set_model(tmp_path / "v7", "v7")
    other = make_bundle(tmp_path / "other", name="other")
    assert StationState.load(path, other).model is None
    assert (tmp_path / f"{STATE_FILE}.previous").exists() and not path.exists()


def test_a_state_set_aside_never_replaces_an_earlier_one_and_only_the_newest_are_kept(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    path = tmp_path / STATE_FILE
    bodies = [f"{{damaged copy {i}".encode() for i in range(KEEP_SET_ASIDE + 3)]
    for i, body in enumerate(bodies):
        path.write_bytes(body)
        StationState.load(path, bundle)
        kept = sorted(p for p in tmp_path.iterdir() if p.name.startswith(f"{STATE_FILE}.bad"))
        assert len(kept) == min(i + 1, KEEP_SET_ASIDE)
    assert (tmp_path / f"{STATE_FILE}.bad").read_bytes() == bodies[-1]           # the newest under its plain name
    stamped = sorted(p for p in tmp_path.iterdir() if p.name.startswith(f"{STATE_FILE}.bad."))
    assert [p.read_bytes() for p in stamped] == bodies[-KEEP_SET_ASIDE:-1]       # the ones before it, oldest first
    assert all(p.name[len(f"{STATE_FILE}.bad."):][:8].isdigit() and p.name.endswith("Z") for p in stamped)


def test_previous_states_are_kept_the_same_way(tmp_path):
    path = tmp_path / STATE_FILE
    for i in range(3):
        bundle = make_bundle(tmp_path / f"bundle{i}", name=f"b{i}")
        StationState.load(path, bundle).set_model(tmp_path / f"v{i}", f"v{i}")
    make_bundle(tmp_path / "bundle3", name="b3")
    StationState.load(path, tmp_path / "bundle3")
    previous = sorted(p for p in tmp_path.iterdir() if p.name.startswith(f"{STATE_FILE}.previous"))
    versions = sorted(json.loads(p.read_text())["model"]["version"] for p in previous)
    assert versions == ["v0", "v1", "v2"]


def saved_shipment() -> dict:
    """An open shipment as the station saves it: 2 Trousers received, one item sent to review."""
    from agent.config import ExpectCommand, ReceivingConfig
    from agent.decide import ItemDecision
    from agent.receiving import ReceivingDesk

    desk = ReceivingDesk(ReceivingConfig(), clock=lambda: 1_700_000_000.0)
    desk.open(ExpectCommand(shipment="PO-1", lines={"Trouser": 3}), ["Trouser", "Dress"])
    for n, (label, unsure) in enumerate([("Trouser", False), ("Trouser", False), ("Dress", True)], start=1):
        desk.record(ItemDecision(camera_id="cam-a", item_seq=n, label=label, class_id=0, confidence=0.9,
                                 agreement=1.0, frames=1, first_seen=1.0, last_seen=1.0, lane="default",
                                 low_confidence=unsure, reasons=("x",) if unsure else (), top_k=(),
                                 frame_seqs=(n, n)), f"00000000-0000-4000-8000-00000000000{n}")
    return json.loads(json.dumps(desk.saved()))


def test_a_saved_shipment_that_is_refused_is_kept_in_a_copy_and_the_rest_of_the_state_is_used(tmp_path, caplog):
    """Before, a shipment refused at start (here a boolean count) was logged, and the next save (the first
    receipt, or the shutdown) wrote the state without it: its tally was gone with no copy."""
    bundle = make_bundle(tmp_path / "bundle")
    path = tmp_path / STATE_FILE
    state = StationState.load(path, bundle)
    state.set_model(tmp_path / "installed" / "v7", "v7")
    state.set_shipment({**saved_shipment(), "review": True})
    written = path.read_bytes()
    with caplog.at_level(logging.ERROR):
        loaded = StationState.load(path, bundle)
    assert loaded.shipment is None and loaded.model is not None and loaded.model["version"] == "v7"
    assert "open shipment not restored: field shipment.review or shipment.unknown" in caplog.text
    assert (tmp_path / f"{STATE_FILE}.bad").read_bytes() == written
    loaded.set_shipment(None)                       # the next save: the tally stays in the copy
    assert json.loads((tmp_path / f"{STATE_FILE}.bad").read_text())["shipment"]["received"] == {"Trouser": 2}
    good = StationState.load(path, bundle)
    good.set_shipment(saved_shipment())
    assert StationState.load(path, bundle).shipment == saved_shipment()      # a good one is restored as saved


def test_a_saved_shipment_with_a_ref_no_receipt_takes_is_refused_by_name(tmp_path, caplog):
    """Before, a saved review (or line, unknown, vouched) ref that receipt.v1 does not take was restored, and every
    receipt of the shipment from then on broke the schema: its subscribers refused all of them."""
    from agent.receiving import Shipment, ShipmentError

    saved = saved_shipment()
    Shipment.from_json(saved)
    for where, bad in [("refs[''][0]", {**saved, "refs": {**saved["refs"], "": [{"decision": "x"}]}}),
                       ("refs['Trouser'][1]", {**saved, "refs": {**saved["refs"], "Trouser": [
                           saved["refs"]["Trouser"][0], {**saved["refs"]["Trouser"][1], "lane": ""}]}}),
                       ("vouched_refs[0]", {**saved, "vouched": 1, "vouched_refs": [{"decision": 1}]})]:
        with pytest.raises(ShipmentError, match=re.escape(f"field shipment.{where}: not a receipt ref")):
            Shipment.from_json(bad)
    bundle = make_bundle(tmp_path / "bundle")
    path = tmp_path / STATE_FILE
    StationState.load(path, bundle).set_shipment({**saved, "refs": {**saved["refs"], "": [{"decision": "x"}]}})
    with caplog.at_level(logging.ERROR):
        assert StationState.load(path, bundle).shipment is None
    assert "field shipment.refs[''][0]: not a receipt ref" in caplog.text and (tmp_path / f"{STATE_FILE}.bad").exists()


def test_the_shipment_closed_last_is_kept_and_a_bad_one_is_refused_by_name(tmp_path, caplog):
    """The shipment closed last (its close sent again after a restart is done already) is saved with the state; one
    that is not one is dropped naming the field, a copy of the file kept, the rest used; an older state file
    without it loads as before."""
    from agent.receiving import ClosedShipment, ShipmentError

    bundle = make_bundle(tmp_path / "bundle")
    path = tmp_path / STATE_FILE
    closed = {"id": "PO-1", "final_receipt": "6f1c1e4e-6c8c-4f0a-9d55-0f6c1c3a2b10", "lines": 2}
    state = StationState.load(path, bundle)
    state.closed_source = lambda: closed
    state.set_model(tmp_path / "installed" / "v7", "v7")
    assert StationState.load(path, bundle).last_closed == closed
    assert ClosedShipment.from_json(closed) == ClosedShipment("PO-1", closed["final_receipt"], 2)
    for bad, field in [("PO-1", "last_closed"), ({**closed, "id": "x" * 65}, "last_closed.id"),
                       ({**closed, "id": None}, "last_closed.id"),
                       ({**closed, "final_receipt": "not-a-uuid"}, "last_closed.final_receipt"),
                       ({**closed, "final_receipt": 7}, "last_closed.final_receipt"),
                       ({**closed, "lines": True}, "last_closed.lines"),
                       ({**closed, "lines": 1001}, "last_closed.lines")]:
        with pytest.raises(ShipmentError, match=f"field {re.escape(field)}: "):
            ClosedShipment.from_json(bad)
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "last_closed": {**closed, "lines": -1}}))
    written = path.read_bytes()
    with caplog.at_level(logging.ERROR):
        loaded = StationState.load(path, bundle)
    assert loaded.last_closed is None and loaded.model is not None and loaded.model["version"] == "v7"
    assert "the shipment closed last is not restored: field last_closed.lines" in caplog.text
    assert (tmp_path / f"{STATE_FILE}.bad").read_bytes() == written
    # a state saved before the shipment closed last was kept: loads, without it
    path.write_text(json.dumps({k: v for k, v in raw.items() if k != "last_closed"}))
    older = StationState.load(path, bundle)
    assert older.last_closed is None and older.model["version"] == "v7"
