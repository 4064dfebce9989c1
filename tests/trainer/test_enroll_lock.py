"""An enrolment that writes: one at a time per models folder, and verified as a station verifies it
(trainer/enroll.py ``models_dir_lock``, ``check_signing``; docs/enrol.md).

Until 2026-12-07 ``python -m trainer enroll`` took no lock: beside a review server's page enrolment (which holds
``<models dir>/.enrol.lock`` from choosing the version it builds on until its version is in place) it built on the
same version, the chain followed one of the two and the other's class was lost
(/tmp/enrol-lock/repro_cli_ignores_lock.py). And the new version was verified without a public key: one signed with
a key the stations do not trust was reported "verified, signed" (/tmp/enrol-lock/repro_unverified_signature.py).

The overlap of two enrolments is made, not timed: the first waits inside its enrolment (when its model first runs)
until the second has ended. The bundle is the colour bundle of tests/agent/agent_support.py (a real two-output ONNX
model in ONNX Runtime); the CLI runs in a subprocess exactly as the docs run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_enroll import YELLOW, _colour_images, colour_setup

import trainer.enroll as enroll_module
from contract.bundle import SIGNATURE, load_bundle, load_public_key
from trainer.enroll import LOCK_FILE, EnrolConfig, EnrolError, enroll
from trainer.signing import generate_keypair, sign_bundle

REPO = Path(__file__).resolve().parents[2]
MAGENTA = (220, 40, 220)


@pytest.fixture
def colours(tmp_path):
    """The colour bundle (version 1), its gate images, 10 yellow and 10 magenta examples."""
    _, bundle, gate, yellow = colour_setup(tmp_path)
    magenta = _colour_images(tmp_path / "magenta", MAGENTA, 10, seed=7)[0].parent
    return bundle, gate, yellow, magenta


def cli_enroll(bundle: Path, label: str, images: Path, gate: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "enroll", "--bundle", str(bundle), "--class", label,
                           "--images", str(images), "--gate-data", str(gate), "--max-drop", "3", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


class Paused:
    """Runs ``fn`` in a thread that stops when the model first runs (the lock held, the source chosen) until
    ``release()``; ``result`` is what it returned or raised."""

    def __init__(self, monkeypatch, fn) -> None:
        self.inside, self.go, self.result = threading.Event(), threading.Event(), None
        real, me = enroll_module.model_outputs, self

        def model_outputs(*args, **kwargs):
            if threading.current_thread() is me.thread and not me.inside.is_set():
                me.inside.set()
                assert me.go.wait(300), "never released"
            return real(*args, **kwargs)

        monkeypatch.setattr(enroll_module, "model_outputs", model_outputs)
        self.thread = threading.Thread(target=self._run, args=(fn,))
        self.thread.start()
        assert self.inside.wait(300), "the paused enrolment never ran its model"

    def _run(self, fn) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.result = exc

    def release(self):
        self.go.set()
        self.thread.join(300)
        return self.result


def _manifest(bundle_dir: Path) -> dict:
    return json.loads((Path(bundle_dir) / "manifest.json").read_text())


def _versions(bundle: Path) -> list[str]:
    return sorted(p.name for p in bundle.parent.iterdir() if p.is_dir())


# ---------------------------------------------------------------- one enrolment at a time per models folder

def test_a_cli_enrolment_beside_another_is_refused_naming_the_lock_and_the_next_try_builds_one_chain(
        colours, monkeypatch):
    bundle, gate, yellow, magenta = colours
    lock = bundle.parent.parent / LOCK_FILE
    first = Paused(monkeypatch, lambda: enroll(EnrolConfig(bundle=bundle, label="yellow", images=yellow,
                                                           gate_data=gate, max_drop_points=3.0, version="2")))
    try:
        second = cli_enroll(bundle, "magenta", magenta, gate, "--version", "3")
        dry = cli_enroll(bundle, "magenta", magenta, gate, "--dry-run")    # writes nothing: neither waits nor holds
    finally:
        result = first.release()
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"another enrolment is writing into {bundle.parent.parent} (it holds {lock}" in second.stderr
    assert "try again when it has finished" in second.stderr
    assert dry.returncode == 0 and "dry run" in dry.stdout, dry.stdout + dry.stderr
    assert not isinstance(result, BaseException), result
    assert _versions(bundle) == ["1", "2"]          # the refused one wrote nothing

    gate2 = gate.parent / "gate-with-yellow"      # the gate needs images of yellow, enrolled before
    for folder in gate.iterdir():
        (gate2 / folder.name).mkdir(parents=True)
        for image in folder.iterdir():
            (gate2 / folder.name / image.name).symlink_to(image)
    _colour_images(gate2 / "yellow", YELLOW, 20, seed=5)
    again = cli_enroll(result.bundle_dir, "magenta", magenta, gate2, "--version", "3")
    assert again.returncode == 0, again.stdout + again.stderr
    chain = _manifest(bundle.parent / "3")
    assert chain["labels"][-2:] == ["yellow", "magenta"]
    assert chain["provenance"]["enrolled_from"]["version"] == "2"


def test_a_review_enrolment_beside_a_cli_enrolment_is_told_busy_then_builds_on_its_version(
        colours, tmp_path, monkeypatch):
    """The page's lock and the CLI's are one: while a CLI enrolment (here in a thread of this process, as
    ``enroll`` runs for the CLI) writes into the models folder, the review server's enrolment is told busy (409 on
    the page); its next try builds on the CLI's version, so the chain holds both classes."""
    from central.review.enrol import EnrolBusy, EnrolSettings, ReviewEnroller, latest_enrolled
    from central.review.store import FrameStore

    bundle, gate, yellow, magenta = colours

    class FolderEnroller(ReviewEnroller):       # the frames reviewed as a class: a folder of that name
        def examples(self, label: str) -> list[Path]:
            return sorted((tmp_path / label).glob("*.png"))

    store = FrameStore(tmp_path / "store")
    try:
        page = FolderEnroller(store, EnrolSettings(bundle=bundle, gate_data=gate, max_drop_points=3.0))
        cli = Paused(monkeypatch, lambda: enroll(EnrolConfig(bundle=bundle, label="yellow", images=yellow,
                                                             gate_data=gate, max_drop_points=3.0)))
        try:
            with pytest.raises(EnrolBusy, match="another enrolment is writing into") as busy:
                page.enrol("magenta", "ana")
            assert str(bundle.parent.parent / LOCK_FILE) in str(busy.value)
        finally:
            result = cli.release()
        assert not isinstance(result, BaseException), result
        answer = page.enrol("magenta", "ana")
    finally:
        store.close()
    assert _manifest(answer["bundle"])["provenance"]["enrolled_from"]["version"] == result.bundle_dir.name
    assert answer["labels"][-2:] == ["yellow", "magenta"]
    assert str(latest_enrolled(bundle, None)) == answer["bundle"]


def test_the_lock_is_released_when_an_enrolment_fails_and_is_taken_again_by_its_own_thread(colours, tmp_path):
    """A refused enrolment leaves nothing behind: no lock file, no models folder made for it."""
    bundle, gate, yellow, _magenta = colours
    with pytest.raises(EnrolError, match="labels already has 'red'"):
        enroll(EnrolConfig(bundle=bundle, label="red", images=yellow, gate_data=gate, max_drop_points=3.0))
    elsewhere = tmp_path / "new" / "models"
    with pytest.raises(EnrolError, match="labels already has 'red'"):
        enroll(EnrolConfig(bundle=bundle, label="red", images=yellow, gate_data=gate, max_drop_points=3.0,
                           models_dir=elsewhere))
    assert not (tmp_path / "new").exists() and not (bundle.parent.parent / LOCK_FILE).exists()
    with enroll_module.models_dir_lock(bundle.parent.parent) as lock:      # free again; the holder may nest
        result = enroll(EnrolConfig(bundle=bundle, label="yellow", images=yellow, gate_data=gate,
                                    max_drop_points=3.0))
        assert lock == bundle.parent.parent / LOCK_FILE and lock.exists()
    assert result.manifest["labels"][-1] == "yellow"
    assert not lock.exists()


# ---------------------------------------------------------------- verified with the key the stations check

@pytest.fixture
def signed(colours, tmp_path):
    """The colour bundle signed with the site's key (site.key / site.pub), and another key pair."""
    bundle, gate, yellow, _magenta = colours
    generate_keypair(tmp_path / "site.key", tmp_path / "site.pub")
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    sign_bundle(bundle, tmp_path / "site.key")
    return bundle, gate, yellow, tmp_path


def test_a_sign_key_that_did_not_sign_the_source_is_refused_without_a_public_key(signed):
    """Without --public-key the stations' key is the one the source was signed with: a version signed with another
    was written and reported "verified, signed", and every station that takes the source refused it."""
    bundle, gate, yellow, keys = signed
    done = cli_enroll(bundle, "yellow", yellow, gate, "--version", "2", "--sign-key", str(keys / "other.key"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f"--sign-key {keys / 'other.key'}: the source bundle's signature ({bundle / SIGNATURE}) was not made "
            f"with this key") in done.stderr
    assert "would refuse the new version" in done.stderr
    assert _versions(bundle) == ["1"]

    done = cli_enroll(bundle, "yellow", yellow, gate, "--version", "2", "--sign-key", str(keys / "site.key"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert load_bundle(bundle.parent / "2", load_public_key(keys / "site.pub")).signed


@pytest.mark.parametrize("with_public_key", [True, False])
def test_a_version_whose_signature_the_stations_refuse_is_never_reported_enrolled(signed, monkeypatch,
                                                                                  with_public_key):
    """The sign key was replaced while the enrolment computed (a key rotated on the host): the version is signed
    with a key the stations do not trust. Its final check now uses the stations' key (--public-key, else the sign
    key as it was when the enrolment began) and refuses it; nothing is written."""
    bundle, gate, yellow, keys = signed
    real = enroll_module.model_outputs

    def model_outputs(*args, **kwargs):
        (keys / "site.key").write_bytes((keys / "other.key").read_bytes())
        return real(*args, **kwargs)

    monkeypatch.setattr(enroll_module, "model_outputs", model_outputs)
    cfg = EnrolConfig(bundle=bundle, label="yellow", images=yellow, gate_data=gate, max_drop_points=3.0,
                      version="2", sign_key=keys / "site.key",
                      public_key=keys / "site.pub" if with_public_key else None)
    with pytest.raises(EnrolError) as info:
        enroll(cfg)
    message = str(info.value)
    assert f"{bundle.parent / '2'}: the new version does not verify" in message, message
    assert "signature does not match" in message and "changed since the enrolment began?" in message
    assert _versions(bundle) == ["1"]
    assert not any(p.name.startswith(".2.") for p in bundle.parent.iterdir())
