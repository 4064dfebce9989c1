"""Enrolment from the review page's API: reviewed frames of a new class become a new bundle version.

Real frames (Fashion-MNIST test images as the agent sends them) are reviewed over HTTP as a new product,
"Tote", and ``POST /api/enrol`` enrols it into the real bundle (trainer export, real ONNX Runtime). The product
is Bag images under another name: enough for the plumbing (frames -> examples -> verified version); that an
enrolled class is recognised is tests/trainer/test_enroll.py's."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from loop_support import LABELS, real_frames, truth_of

from central.review.api import ReviewServer
from central.review.enrol import EnrolSettings, ReviewEnroller
from central.review.store import FrameStore, StoreError
from contract.bundle import check_model_runs, load_bundle

TOKEN = "enrol-test-token"


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 method="POST" if body is not None else "GET")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def reviewed(tmp_path, real_bundle, fmnist_dir):
    """A review server with enrolment into a copy of the real bundle's models dir, and the Bag frames."""
    import shutil

    models = tmp_path / "models"
    shutil.copytree(real_bundle.parent.parent, models)
    source = models / real_bundle.parent.name / real_bundle.name
    store = FrameStore(tmp_path / "store", labels=LABELS)
    records = real_frames(150)
    for r in records:
        store.add(r.body, r.blob)
    enroller = ReviewEnroller(store, EnrolSettings(bundle=source, gate_data=fmnist_dir / "test", max_drop_points=1.5,
                                                   max_drop_limit=3.0))
    srv = ReviewServer(store, "127.0.0.1", 0, token=TOKEN, enroller=enroller).start()
    bags = [r for r in records if truth_of(r) == "Bag"]
    assert len(bags) >= 8
    yield srv, store, bags, source, models
    srv.stop()
    store.close()


def _review_as_tote(srv, frames) -> None:
    first, *rest = frames
    status, _ = call(srv.url + f"api/frames/{first.id}/review", {"action": "new_class", "label": "Tote", "reviewer": "ana"})
    assert status == 200
    for r in rest:
        status, _ = call(srv.url + f"api/frames/{r.id}/review", {"action": "label", "label": "Tote", "reviewer": "ana"})
        assert status == 200


def _versions(models, name) -> list[str]:
    return sorted(p.name for p in (models / name).iterdir())


def test_reviewed_frames_of_a_new_class_enrol_into_a_new_verified_version(reviewed):
    srv, store, bags, source, models = reviewed
    _review_as_tote(srv, bags[:4])
    before = _versions(models, source.parent.name)
    status, body = call(srv.url + "api/enrol", {"label": "Tote", "reviewer": "ana"})
    assert status == 400 and "'Tote' has 4 reviewed frame(s), at least 5" in body["error"]
    assert _versions(models, source.parent.name) == before

    _review_as_tote(srv, bags[4:8])
    status, dry = call(srv.url + "api/enrol", {"label": "Tote", "reviewer": "ana", "dry_run": True})
    assert status == 200, dry
    assert dry["written"] is False and dry["frames"] == 8 and _versions(models, source.parent.name) == before
    assert dry["allowance"] == {"used": 1.5, "default": 1.5, "limit": 3.0}
    assert [c["max_drop_points"] for c in dry["figures"]["allowances"]] == [0.5, 1.0, 1.5, 2.0, 5.0]

    status, body = call(srv.url + "api/enrol", {"label": "Tote", "reviewer": "ana"})
    assert status == 200, body
    assert body["written"] is True and body["allowance"]["used"] == 1.5
    for key in ("recall_leave_one_out", "gate", "allowances"):       # the preview said what enrolling does
        assert dry["figures"][key] == body["figures"][key], key
    assert body["frames"] == 8 and body["figures"]["examples"] == 8 and body["labels"][-1] == "Tote"
    gate = body["figures"]["gate"]               # the server's allowance (--enrol-max-drop), not the default 0.5
    assert gate["max_drop_points"] == 1.5 and body["figures"]["bias"]["cap_drop_points"] == pytest.approx(0.6)
    assert gate["drop_points"] <= 1.5
    bundle = load_bundle(body["bundle"])
    check_model_runs(bundle)
    assert bundle.labels == load_bundle(source).labels + ["Tote"]
    assert bundle.manifest["open_set"]["enrolled"] == ["Tote"]
    assert bundle.root.parent == source.parent and bundle.version == body["version"]

    status, body = call(srv.url + "api/enrol", {"label": "Tote"})
    assert status == 400 and "labels already has 'Tote'" in body["error"]  # the next enrolment builds on it


def test_enrol_requests_that_cannot_be_served_are_refused_by_field(reviewed, tmp_path):
    srv, store, _bags, source, _models = reviewed
    assert call(srv.url + "api/enrol", {"reviewer": "ana"}) == (400, {"error": "field label: missing"})
    status, body = call(srv.url + "api/enrol", {"label": "Tote", "colour": "red"})
    assert status == 400 and "unknown field(s) colour" in body["error"]
    status, body = call(srv.url + "api/enrol", {"label": "Sock"})
    assert status == 400 and "'Sock' has 0 reviewed frame(s)" in body["error"]
    for asked in (3.5, 0.0, -1.0, "2"):           # over the server's limit, out of range, not a number
        status, body = call(srv.url + "api/enrol", {"label": "Tote", "max_drop_points": asked})
        assert status == 400 and "max_drop_points" in body["error"], (asked, body)
    status, body = call(srv.url + "api/enrol", {"label": "Tote", "dry_run": "yes"})
    assert status == 400 and "dry_run" in body["error"]

    status, body = call(srv.url + "api/enrol")          # what the page offers
    assert status == 200 and body["enabled"] is True and body["min_examples"] == 5
    assert body["allowance"] == {"default": 1.5, "limit": 3.0} and body["bundle"].endswith(str(source))
    plain = ReviewServer(FrameStore(tmp_path / "plain", labels=LABELS), "127.0.0.1", 0, token=TOKEN).start()
    try:
        assert call(plain.url + "api/enrol") == (200, {"enabled": False})
        status, body = call(plain.url + "api/enrol", {"label": "Tote"})
        assert status == 409 and "--enrol-bundle" in body["error"]
    finally:
        plain.stop()
        plain.store.close()


@pytest.mark.parametrize("absent", [("trainer",), ("onnxruntime",), ("trainer", "onnxruntime")])
def test_a_host_without_the_trainer_or_onnxruntime_is_told_at_start_what_enrolment_needs(tmp_path, real_bundle,
                                                                                       monkeypatch, absent):
    """The central image ships neither (deploy/central/Dockerfile): a server started there with --enrol-bundle
    said only "pip install onnxruntime", and after that failed at the first enrolment importing trainer.enroll.
    Both are named at start (the image cannot be built here: the modules are hidden from the finder instead)."""
    import importlib.util

    import central.review.enrol as enrol_module

    real = importlib.util.find_spec
    monkeypatch.setattr(enrol_module.importlib.util, "find_spec",
                        lambda name, *a: None if name in absent else real(name, *a))
    store = FrameStore(tmp_path / "store", labels=LABELS)
    try:
        with pytest.raises(StoreError, match="--enrol-bundle: enrolment runs the bundle's model") as err:
            ReviewEnroller(store, EnrolSettings(bundle=real_bundle))
        assert ("trainer package" in str(err.value)) == ("trainer" in absent)
        assert ("pip install onnxruntime" in str(err.value)) == ("onnxruntime" in absent)
    finally:
        store.close()


@pytest.mark.parametrize("allowance", [0.0, -1.0, 100.0, float("nan"), float("inf")])
def test_an_allowance_out_of_range_is_refused_when_the_server_starts(tmp_path, real_bundle, allowance):
    store = FrameStore(tmp_path / "store", labels=LABELS)
    try:
        with pytest.raises(StoreError, match=r"--enrol-max-drop: expected points in \(0, 100\)"):
            ReviewEnroller(store, EnrolSettings(bundle=real_bundle, max_drop_points=allowance))
    finally:
        store.close()


def test_a_reviewer_enrols_at_an_allowance_up_to_the_servers_limit(reviewed):
    srv, _store, bags, source, _models = reviewed
    _review_as_tote(srv, bags[:8])
    status, body = call(srv.url + "api/enrol", {"label": "Tote", "reviewer": "ana", "max_drop_points": 3.0})
    assert status == 200, body
    gate = body["figures"]["gate"]
    assert gate["max_drop_points"] == 3.0 and body["figures"]["bias"]["cap_drop_points"] == pytest.approx(1.2)
    assert body["allowance"] == {"used": 3.0, "default": 1.5, "limit": 3.0}
    manifest = load_bundle(body["bundle"]).manifest
    assert manifest["quality"]["enrolment"]["Tote"]["gate"]["max_drop_points"] == 3.0


@pytest.mark.parametrize("limit", [1.0, 100.0, float("nan")])
def test_a_limit_below_the_allowance_or_out_of_range_is_refused_when_the_server_starts(tmp_path, real_bundle, limit):
    store = FrameStore(tmp_path / "store", labels=LABELS)
    try:
        with pytest.raises(StoreError, match=r"--enrol-max-drop-limit: expected points in \[--enrol-max-drop 1.5, "):
            ReviewEnroller(store, EnrolSettings(bundle=real_bundle, max_drop_points=1.5, max_drop_limit=limit))
    finally:
        store.close()


def test_a_refused_enrolment_answers_with_its_figures(reviewed, monkeypatch):
    """The gate's refusal is faked here (the report is a real dry run's, marked failed): the bias is capped on all
    gate images at 0.4 of the allowance, so the held-out half (about half of them) loses at most about 0.8 of it
    and a real enrolment does not fail the gate. What is tested is the answer, should it ever refuse."""
    import trainer.enroll as enroll_module

    srv, _store, bags, source, models = reviewed
    _review_as_tote(srv, bags[:6])
    status, dry = call(srv.url + "api/enrol", {"label": "Tote", "dry_run": True})
    assert status == 200, dry
    report = {**dry["figures"], "gate": {**dry["figures"]["gate"], "passed": False}}

    def refuse(cfg):
        raise enroll_module.EnrolError("gate: the old classes lose 9.99 points; 'Tote' not enrolled", report)
    monkeypatch.setattr(enroll_module, "enroll", refuse)
    before = _versions(models, source.parent.name)
    status, body = call(srv.url + "api/enrol", {"label": "Tote", "max_drop_points": 2.0})
    assert status == 400 and "'Tote' not enrolled" in body["error"]
    assert body["figures"]["allowances"] == dry["figures"]["allowances"] and body["figures"]["gate"]["passed"] is False
    assert body["allowance"] == {"used": 2.0, "default": 1.5, "limit": 3.0}
    assert _versions(models, source.parent.name) == before


def test_a_restarted_server_enrols_onto_the_newest_version_it_enrolled_before(tmp_path):
    """The head of the enrolled chain was kept in memory only: after a restart with the same --enrol-bundle the
    next class went onto the first bundle, and the newest version lacked the class enrolled before."""
    import json

    from central.review.enrol import latest_enrolled

    def version(v, parent=None):
        folder = tmp_path / "models" / "fashion" / v
        folder.mkdir(parents=True)
        provenance = {"enrolled_from": {"name": "fashion", "version": parent, "label": "x"}} if parent else {}
        (folder / "manifest.json").write_text(json.dumps({"name": "fashion", "version": v, "provenance": provenance}))
        return folder

    first = version("1")
    assert latest_enrolled(first, None) == first
    version("20261206-101500", "1")
    newest = version("20261206-111500", "20261206-101500")
    version("2", None)                                   # a retrained version: not on the enrolled chain
    assert latest_enrolled(first, None) == newest
    assert latest_enrolled(tmp_path / "nowhere", None) == tmp_path / "nowhere"


def test_the_newest_enrolled_version_is_found_past_broken_hidden_and_oddly_numbered_folders(tmp_path, caplog):
    """One unreadable manifest under models/<name>/ made the server forget the chain (the next class went onto the
    first bundle, the classes enrolled before lost), a manifest that is a JSON list stopped it starting, a
    half-written ``.<version>.partial-*`` folder was taken, and "9" came after "10"."""
    import json

    from central.review.enrol import latest_enrolled

    models = tmp_path / "models" / "fashion"

    def version(folder, v, parent=None, created_at=None):
        (models / folder).mkdir(parents=True)
        manifest = {"name": "fashion", "version": v,
                    "provenance": {"enrolled_from": {"name": "fashion", "version": parent, "label": "x"}} if parent
                    else {}}
        if created_at:
            manifest["created_at"] = created_at
        (models / folder / "manifest.json").write_text(json.dumps(manifest))
        return models / folder

    first = version("1", "1")
    second = version("2", "2", "1", "2026-12-06T10:00:00+00:00")
    (models / "old-backup").mkdir()
    (models / "old-backup" / "manifest.json").write_text('{"name": "fashion", ')      # a copy cut short
    (models / "listed").mkdir()
    (models / "listed" / "manifest.json").write_text("[]")
    version(".3.partial-host-999999-abcd", "3", "2", "2026-12-06T12:00:00+00:00")     # a killed enrolment's
    caplog.set_level("WARNING", logger="central.review.enrol")
    assert latest_enrolled(first, None) == second
    assert "old-backup/manifest.json: not read" in caplog.text
    assert "listed/manifest.json: not a JSON object" in caplog.text

    nine = version("9", "9", "2", "2026-12-06T11:00:00+00:00")
    ten = version("10", "10", "2", "2026-12-06T11:00:00+00:00")      # the same second: the version decides
    assert latest_enrolled(first, None) == ten
    eleven = version("11", "11", "2", "2026-12-06T09:00:00+00:00")   # a higher version written earlier
    assert latest_enrolled(first, None) == ten and eleven.is_dir() and nine.is_dir()


# ---------------------------------------------------------------- the colour bundle (tests/agent/agent_support.py)

class FolderEnroller(ReviewEnroller):
    """The review enroller with the frames reviewed as a class read from a folder of that name: the store's part
    is test_reviewed_frames_of_a_new_class_enrol_into_a_new_verified_version's."""

    def __init__(self, store: FrameStore, settings: EnrolSettings, frames) -> None:
        super().__init__(store, settings)
        self.frames = frames

    def examples(self, label: str) -> list:
        folder = self.frames / label
        return sorted(folder.glob("*.png")) if folder.is_dir() else []


def _colour_frames(folder, rgb, count: int, seed: int):
    """``count`` 16 px PNG frames of one colour, each a little off it (seeded)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        colour = np.clip(np.asarray(rgb, float) + rng.normal(0, 10.0, 3), 0, 255)
        pixels = np.tile(colour, (16, 16, 1)) + rng.integers(0, 3, (16, 16, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture
def colours(tmp_path):
    """The colour bundle (belt, red, green, blue), 150 gate images of each, and frames of yellow and of gold (a
    product that looks like yellow), 10 each; a store for the enroller."""
    from agent_support import OPEN_SET_COLOURS, make_open_set_bundle

    bundle = make_open_set_bundle(tmp_path / "models")
    gate = tmp_path / "gate"
    for k, (name, rgb) in enumerate(OPEN_SET_COLOURS.items()):
        _colour_frames(gate / name, rgb, 150, seed=k + 10)
    frames = tmp_path / "frames"
    _colour_frames(frames / "yellow", (230, 220, 40), 10, seed=99)
    _colour_frames(frames / "gold", (240, 210, 60), 10, seed=8)
    store = FrameStore(tmp_path / "store", labels=list(OPEN_SET_COLOURS))
    yield bundle, gate, frames, store
    store.close()


def test_a_second_class_is_gated_on_the_frames_reviewed_as_the_class_enrolled_before(colours):
    """The run's validation split (the page's default gate) has no images of a class enrolled from the page: the
    frames reviewed as it are its gate images, else the second enrolment is refused naming it."""
    import shutil

    bundle, gate, frames, store = colours
    enroller = FolderEnroller(store, EnrolSettings(bundle=bundle, gate_data=gate), frames)
    assert enroller.enrol("yellow", "ana")["labels"][-1] == "yellow"
    second = enroller.enrol("gold", "ana")
    assert second["labels"][-2:] == ["yellow", "gold"]
    gate_figures = second["figures"]["gate"]
    assert gate_figures["images"] == 610 and "10 of 'yellow'" in gate_figures["source"]

    shutil.rmtree(frames / "yellow")        # enrolled, then its frames gone from the store: refused, by name
    shutil.copytree(frames / "gold", frames / "amber")
    with pytest.raises(StoreError, match="0 gate image\\(s\\) of 'yellow', a class enrolled before"):
        enroller.enrol("amber", "ana")


def test_enrolling_onto_a_version_the_retrain_gate_rejected_is_refused_with_400(colours):
    from contract.events import manifest_sha256, utc_now, write_gate

    bundle, gate, frames, store = colours
    write_gate(bundle, {"decision": "rejected", "name": "colours", "version": "1",
                        "manifest_sha256": manifest_sha256(bundle), "reason": "overall top-1 worse",
                        "current": {"name": "colours", "version": "0"}, "report": None, "figures": {},
                        "ts": utc_now()})
    srv = ReviewServer(store, "127.0.0.1", 0, token=TOKEN,
                       enroller=FolderEnroller(store, EnrolSettings(bundle=bundle, gate_data=gate), frames)).start()
    try:
        status, body = call(srv.url + "api/enrol", {"label": "yellow", "reviewer": "ana"})
    finally:
        srv.stop()
    assert status == 400 and "rejected by the retrain gate (overall top-1 worse)" in body["error"], body
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["1", "gate-log.jsonl"]


def test_a_signing_key_that_cannot_sign_stops_the_server_at_start(colours, tmp_path):
    """It was read only when the first enrolment had computed everything, and answered 404 'image file missing'
    (or 500 for a file that is no key)."""
    bundle, gate, _frames, store = colours
    not_a_key = tmp_path / "not.key"
    not_a_key.write_text("not a key\n")
    for key, match in ((tmp_path / "missing.key", "--enrol-sign-key .*missing.key: cannot read the private key"),
                       (not_a_key, "--enrol-sign-key: .*not.key: not an unencrypted ed25519 private key")):
        with pytest.raises(StoreError, match=match):
            ReviewEnroller(store, EnrolSettings(bundle=bundle, gate_data=gate, sign_key=key))


def test_a_key_pair_that_would_sign_versions_stations_refuse_stops_the_server_at_start(colours, tmp_path):
    """The page enrolled with an --enrol-sign-key that is not the private half of --enrol-public-key, and onto a
    signed bundle without any key: every version it wrote was refused by the stations configured with the public
    key, at rollout. Now the server does not start, naming the flags; with the site's key pair it enrols a version
    a station takes."""
    from contract.bundle import load_public_key
    from trainer.signing import generate_keypair, sign_bundle

    bundle, gate, frames, store = colours
    generate_keypair(tmp_path / "site.key", tmp_path / "site.pub")
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    sign_bundle(bundle, tmp_path / "site.key")
    for settings, match in (
            (dict(sign_key=tmp_path / "other.key", public_key=tmp_path / "site.pub"),
             "--enrol-sign-key .*other.key: not the private key of --enrol-public-key .*site.pub"),
            (dict(), "source bundle .* is signed .* no --enrol-sign-key is given"),
            (dict(public_key=tmp_path / "site.pub"), "is signed .* no --enrol-sign-key is given"),
            (dict(sign_key=tmp_path / "site.key", public_key=tmp_path / "missing.pub"),
             "--enrol-public-key: .*missing.pub: cannot read public key")):
        with pytest.raises(StoreError, match=match):
            ReviewEnroller(store, EnrolSettings(bundle=bundle, gate_data=gate, **settings))

    enroller = FolderEnroller(store, EnrolSettings(bundle=bundle, gate_data=gate, sign_key=tmp_path / "site.key",
                                                   public_key=tmp_path / "site.pub"), frames)
    written = enroller.enrol("yellow", "ana")
    assert load_bundle(written["bundle"], load_public_key(tmp_path / "site.pub")).signed


def test_a_class_enrolled_meanwhile_with_trainer_enroll_is_built_on_and_a_removed_version_is_stepped_over(colours):
    """The server kept the version it enrolled last in memory: a class enrolled onto that version meanwhile with
    ``trainer enroll`` (same models dir) was left out of the page's next version, and out of the chain a restarted
    server follows; and once an operator removed the version it enrolled last, every enrolment was refused
    ("bundle folder does not exist") until a restart. /tmp/central-ingest/repro_enrol_chain.py."""
    import shutil
    from pathlib import Path

    from central.review.enrol import latest_enrolled
    from trainer.enroll import EnrolConfig, enroll

    bundle, gate, frames, store = colours
    _colour_frames(frames / "magenta", (220, 40, 220), 10, seed=7)
    _colour_frames(frames / "cyan", (40, 220, 220), 10, seed=5)
    page = FolderEnroller(store, EnrolSettings(bundle=bundle, gate_data=gate, max_drop_points=3.0), frames)
    yellow = page.enrol("yellow", "ana")
    cli = enroll(EnrolConfig(bundle=yellow["bundle"], label="magenta", images=frames / "magenta", gate_data=gate,
                             max_drop_points=3.0,
                             enrolled_gate={"yellow": sorted((frames / "yellow").glob("*.png"))}))
    assert page.describe()["bundle"] == str(cli.bundle_dir)              # the page offers the newest version
    cyan = page.enrol("cyan", "ana")
    assert cyan["labels"][-3:] == ["yellow", "magenta", "cyan"]
    assert str(latest_enrolled(bundle, None)) == cyan["bundle"]          # and a restarted server goes on from it

    shutil.rmtree(cyan["bundle"])              # a bad class: its version removed by hand, the server still running
    again = page.enrol("cyan", "ana")
    assert again["labels"][-3:] == ["yellow", "magenta", "cyan"] and Path(again["bundle"]).is_dir()
