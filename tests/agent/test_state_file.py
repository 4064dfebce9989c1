"""station-state.json on its own (agent/state.py): a configured bundle that cannot be read at start proves no change
of config, and a state set aside never replaces one set aside before. Real files in a temp folder."""

from __future__ import annotations

import json
import logging

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
