"""Enrolment and signing (trainer/enroll.py ``check_signing``, docs/enrol.md): the new version of a signed bundle is
signed with the key the stations trust, or the enrolment is refused before the model runs.

Until 2026-12-07 an enrolment from a signed bundle without --sign-key wrote an unsigned version, and one with a
--sign-key that is not the private half of --public-key a version signed with a key no station trusts: both were
written, verified (without a key) and published, and every station configured with the public key refused them at
rollout, so the canary failed late. The bundle is the colour bundle of tests/agent/agent_support.py (a real
two-output ONNX model in ONNX Runtime), signed with trainer.signing as ``trainer export --sign-key`` signs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_enroll import _refused as refused
from test_enroll import colour_setup

import trainer.enroll as enroll_module
from contract.bundle import SIGNATURE, BundleError, load_bundle, load_public_key
from trainer.enroll import EnrolConfig, enroll
from trainer.signing import generate_keypair, sign_bundle


@pytest.fixture
def signed(tmp_path):
    """The colour bundle signed with the site's key (site.key / site.pub), another key pair, gate images of its four
    classes and 10 yellow examples."""
    _, bundle, gate, yellow = colour_setup(tmp_path)
    generate_keypair(tmp_path / "site.key", tmp_path / "site.pub")
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    sign_bundle(bundle, tmp_path / "site.key")
    load_bundle(bundle, load_public_key(tmp_path / "site.pub"))         # a station with the site's key takes it
    return bundle, gate, yellow, tmp_path


@pytest.fixture
def no_model(monkeypatch):
    """The model must not run: the signing flags are checked before anything is read or computed."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model ran before the signing flags were checked")

    monkeypatch.setattr(enroll_module, "model_outputs", refuse)


def _refused(cfg: EnrolConfig, *needles: str) -> str:
    return refused(cfg, Path(cfg.bundle).parent.parent, *needles)


def _station_refuses(bundle_dir: Path, public_key: Path) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir, load_public_key(public_key))
    return str(info.value)


def test_a_signed_bundle_without_a_sign_key_is_refused_before_the_model_runs(signed, no_model):
    bundle, gate, yellow, keys = signed
    base = dict(bundle=bundle, label="yellow", images=yellow, gate_data=gate, version="2")
    _refused(EnrolConfig(**base), f"source bundle {bundle} is signed ({bundle / SIGNATURE})",
             "no --sign-key is given", "every station configured with a public key refuses it",
             "--unsigned for an unsigned version on purpose")
    # --public-key checks the source only: without --sign-key the new version would still be unsigned
    _refused(EnrolConfig(**base, public_key=keys / "site.pub"), "is signed", "no --sign-key is given",
             f"--public-key {keys / 'site.pub'} checks only the source")
    _refused(EnrolConfig(**base, dry_run=True), "no --sign-key is given")      # its real run would be refused
    _refused(EnrolConfig(**base, unsigned=True, sign_key=keys / "site.key"),
             "--unsigned and --sign-key", "pass one of them")


def test_a_sign_key_that_is_not_the_private_half_of_the_public_key_is_refused_before_the_model_runs(signed, no_model):
    bundle, gate, yellow, keys = signed
    base = dict(bundle=bundle, label="yellow", images=yellow, gate_data=gate, version="2")
    _refused(EnrolConfig(**base, sign_key=keys / "other.key", public_key=keys / "site.pub"),
             f"--sign-key {keys / 'other.key'}: not the private key of --public-key {keys / 'site.pub'}",
             "refused at rollout")
    _refused(EnrolConfig(**base, sign_key=keys / "site.key", public_key=keys / "missing.pub"),
             "--public-key", "missing.pub", "cannot read public key")
    _refused(EnrolConfig(**base, sign_key=keys / "site.key", public_key=keys / "site.key"),
             "--public-key", "site.key", "not an ed25519 public key")
    # retrain's rule for the key itself, as before
    _refused(EnrolConfig(**base, sign_key=keys / "site.pub", public_key=keys / "site.pub"),
             "--sign-key", "not an unencrypted ed25519 private key")


def test_with_the_sites_key_pair_the_new_version_is_signed_and_a_station_takes_it(signed):
    bundle, gate, yellow, keys = signed
    result = enroll(EnrolConfig(bundle=bundle, label="yellow", images=yellow, gate_data=gate, version="2",
                                sign_key=keys / "site.key", public_key=keys / "site.pub"))
    new = load_bundle(result.bundle_dir, load_public_key(keys / "site.pub"))
    assert new.signed and new.labels[-1] == "yellow"


def test_an_unsigned_version_is_written_only_when_asked_for_and_said(signed, caplog):
    bundle, gate, yellow, keys = signed
    caplog.set_level("WARNING", logger="trainer.enroll")
    result = enroll(EnrolConfig(bundle=bundle, label="yellow", images=yellow, gate_data=gate, version="2",
                                unsigned=True))
    assert not (result.bundle_dir / SIGNATURE).exists()
    assert "the new version is written unsigned (--unsigned)" in caplog.text
    assert "unsigned bundles are refused" in _station_refuses(result.bundle_dir, keys / "site.pub")


def test_an_unsigned_source_still_enrols_without_a_key(tmp_path):
    """The rule is about signed sources: a site without signing enrols as before."""
    _, bundle, gate, yellow = colour_setup(tmp_path)
    result = enroll(EnrolConfig(bundle=bundle, label="yellow", images=yellow, gate_data=gate, version="2"))
    assert load_bundle(result.bundle_dir).labels[-1] == "yellow"


def test_the_cli_refuses_a_signed_bundle_without_sign_key_and_takes_unsigned(signed, capsys):
    from trainer.cli import main

    bundle, gate, yellow, keys = signed
    args = ["enroll", "--bundle", str(bundle), "--class", "yellow", "--images", str(yellow), "--gate-data", str(gate)]
    assert main([*args, "--version", "2"]) == 1
    err = capsys.readouterr().err
    assert "no --sign-key is given" in err and "--unsigned" in err
    assert not (bundle.parent / "2").exists()

    assert main([*args, "--version", "2", "--sign-key", str(keys / "other.key"),
                 "--public-key", str(keys / "site.pub")]) == 1
    assert "not the private key of --public-key" in capsys.readouterr().err

    with pytest.raises(SystemExit) as info:          # both: a usage error
        main([*args, "--unsigned", "--sign-key", str(keys / "site.key")])
    assert info.value.code == 2
    capsys.readouterr()

    assert main([*args, "--version", "3", "--unsigned"]) == 0, capsys.readouterr()
    assert load_bundle(bundle.parent / "3").labels[-1] == "yellow" and not (bundle.parent / "3" / SIGNATURE).exists()
    assert main([*args, "--version", "4", "--sign-key", str(keys / "site.key"),
                 "--public-key", str(keys / "site.pub")]) == 0, capsys.readouterr()
    assert load_bundle(bundle.parent / "4", load_public_key(keys / "site.pub")).signed
