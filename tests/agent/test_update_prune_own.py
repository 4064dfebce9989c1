"""The clean-up after a cmd/model swap removes only what cmd/model installed: a site whose model.download_dir is its
models folder keeps the bundles it copied there by hand (and those installed before the install mark existed),
and cmd/model never installs over one of them; what cmd/model installs stays bounded to the kept bundles.

Real parts: the station (agent.app.Agent, ONNX Runtime), bundles downloaded over HTTP from a local server and
installed under model.download_dir, as a bundle server would serve them.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from agent_support import make_onnx_bundle
from test_reload import bundle_version, sha
from test_station_state import config, restarted, serve_folder, update

from agent import update as agent_update
from agent.update import INSTALLED_MARK, ModelCommand, fetch_verified, installed_by_cmd_model, prune_installed
from contract.bundle import MANIFEST, BundleError, artifact_entry


def versions(models):
    return sorted(str(p.relative_to(models)) for p in models.glob("*/*") if (p / MANIFEST).is_file())


def test_bundles_copied_by_hand_into_the_download_folder_outlive_every_update(tiny_bundle, fmnist_video, tmp_path,
                                                                             caplog):
    # given: a site whose model.download_dir is its models folder, holding bundles copied there by hand (one of the
    # same model, one of another, one of the same model installed by a station before the mark existed) and an
    # empty folder of its own
    models = tmp_path / "downloads"
    bundle_version(tiny_bundle, models / "tiny" / "hand-7", "hand-7")
    bundle_version(tiny_bundle, models / "other" / "v1", "v1")
    bundle_version(tiny_bundle, models / "tiny" / "tiny-0", "tiny-0")
    (models / "spare").mkdir()
    www = tmp_path / "www"
    server, url = serve_folder(www)
    caplog.set_level(logging.INFO, logger="agent.update")
    try:
        agent = restarted(config(tmp_path, tiny_bundle, fmnist_video))
        # when: three updates arrive by URL
        for n in (2, 3, 4):
            served = bundle_version(tiny_bundle, www / "tiny" / f"tiny-{n}", f"tiny-{n}")
            assert update(agent, served, f"tiny-{n}", f"{url}/tiny/tiny-{n}/"), agent.last_update
    finally:
        server.shutdown()
    # then: every hand copy is still there, and of cmd/model's own only the running one and the one before it
    assert versions(models) == ["other/v1", "tiny/hand-7", "tiny/tiny-0", "tiny/tiny-3", "tiny/tiny-4"]
    assert (models / "spare").is_dir()
    assert installed_by_cmd_model(models / "tiny" / "tiny-4") and not installed_by_cmd_model(models / "tiny" / "hand-7")
    # and each folder left alone is logged once, naming it, however many clean-ups ran
    left_alone = [r.getMessage() for r in caplog.records if r.getMessage().startswith("left alone: ")]
    for folder in ("tiny/hand-7", "other/v1", "tiny/tiny-0"):
        assert sum(str(models / folder) + " " in m for m in left_alone) == 1, left_alone


def test_a_folder_cmd_model_installed_whose_manifest_was_replaced_by_hand_is_left_alone(tmp_path):
    # given: two versions cmd/model installed (marked), and the older one's manifest later replaced by hand
    downloads = tmp_path / "downloads"
    old, running = (make_onnx_bundle(downloads, version=v) for v in ("v1", "v2"))
    for folder in (old, running):
        agent_update.mark_installed(folder)
    manifest = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**manifest, "created_at": "2030-01-01T00:00:00+00:00"}))
    spare = make_onnx_bundle(downloads, version="v0")
    agent_update.mark_installed(spare)
    # when: a swap's clean-up keeps only the running one
    gone = prune_installed(downloads, [running])
    # then: the marked, unchanged one went; the one changed by hand stays
    assert gone == [spare] and versions(downloads) == ["onnx-tiny/v1", "onnx-tiny/v2"]


def test_cmd_model_never_installs_over_a_folder_copied_by_hand(tiny_bundle, fmnist_video, tmp_path):
    # given: tiny-2 copied by hand into the download folder, and another tiny-2 (re-exported) served by URL
    models = tmp_path / "downloads"
    hand = bundle_version(tiny_bundle, models / "tiny" / "tiny-2", "tiny-2")
    before = {p.name: p.read_bytes() for p in hand.iterdir()}
    www = tmp_path / "www"
    served = bundle_version(tiny_bundle, www / "tiny" / "tiny-2", "tiny-2")
    manifest = json.loads((served / MANIFEST).read_text())
    (served / MANIFEST).write_text(json.dumps({**manifest, "created_at": "2030-01-01T00:00:00+00:00"}))
    server, url = serve_folder(www)
    try:
        agent = restarted(config(tmp_path, tiny_bundle, fmnist_video))
        # when: cmd/model sends it
        ok = update(agent, served, "tiny-2", f"{url}/tiny/tiny-2/")
    finally:
        server.shutdown()
    # then: refused, naming the folder; the hand copy is byte for byte as it was, and no download is left behind
    assert not ok and agent.last_update["reason"].startswith(f"{hand}: holds a bundle cmd/model did not install")
    assert {p.name: p.read_bytes() for p in hand.iterdir()} == before
    assert sorted(p.name for p in models.iterdir()) == ["tiny"] and agent.model.current.bundle.version == "tiny-1"


def test_a_bundle_whose_artifact_is_named_as_the_install_mark_is_refused_before_it_is_fetched(tmp_path):
    # given: a served bundle listing an artifact at the install mark's path (the mark would overwrite it)
    bundle = make_onnx_bundle(tmp_path / "www", version="v2")
    (bundle / INSTALLED_MARK).write_text('{"manifest_sha256": "0"}')
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["artifacts"].append(artifact_entry(bundle / INSTALLED_MARK, bundle, role="open-set",
                                                   precision="fp32", deployable=False))
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    server, url = serve_folder(tmp_path / "www")
    try:
        cmd = ModelCommand(f"{url}/onnx-tiny/v2/", sha(bundle), "v2")
        # when / then
        with pytest.raises(BundleError, match=rf"artifacts/1/path: '{INSTALLED_MARK}' leaves the bundle"):
            fetch_verified(cmd, tmp_path / "downloads", None, deadline_s=30)
    finally:
        server.shutdown()
    assert list((tmp_path / "downloads").iterdir()) == []


def test_a_folder_copied_by_hand_with_its_mark_is_not_taken_for_cmd_models(tmp_path):
    # given: a bundle cmd/model installed at one station, copied by hand (the mark comes along) into another
    # station's download folder, unchanged, and once more under another version, edited
    installed = make_onnx_bundle(tmp_path / "station-a", version="v1")
    agent_update.mark_installed(installed)
    downloads = tmp_path / "station-b"
    copy = downloads / "onnx-tiny" / "v1"
    edited = downloads / "onnx-tiny" / "v1-edited"
    shutil.copytree(installed, copy)
    shutil.copytree(installed, edited)
    manifest = json.loads((edited / MANIFEST).read_text())
    (edited / MANIFEST).write_text(json.dumps({**manifest, "version": "v1-edited"}))
    # then: only the folder the mark was written for, with its manifest, is cmd/model's; the copies stay
    assert installed_by_cmd_model(installed)
    assert not installed_by_cmd_model(copy) and not installed_by_cmd_model(edited)
    assert prune_installed(downloads, []) == [] and versions(downloads) == ["onnx-tiny/v1", "onnx-tiny/v1-edited"]
