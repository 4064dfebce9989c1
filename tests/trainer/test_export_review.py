"""Export review (2026-12-07): the signing key is checked before an export does any work, and a private key every
user of the host can read is refused."""

from __future__ import annotations

import pytest

from contract.bundle import load_public_key
from trainer.export import bundle as bundle_module
from trainer.export.bundle import ExportConfig, export_bundle
from trainer.signing import generate_keypair, load_private_key, sign_bundle


def _no_work(*_args, **_kwargs):
    raise AssertionError("the export started its work before refusing")


@pytest.mark.parametrize("case", ["missing", "not a key", "public key", "world-readable", "encrypted"])
def test_a_sign_key_that_cannot_sign_is_refused_before_any_work(tmp_path, monkeypatch, case):
    """Given a --sign-key that is missing, no key, the public half, open to every user, or encrypted, when the
    export starts, then it stops at once naming --sign-key and the file (it was read only after the whole export
    had run: ONNX, calibration, gates and open-set statistics thrown away), and nothing is written."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    key, needle = {"missing": (tmp_path / "missing.key", "cannot read the private key"),
                   "not a key": (tmp_path / "junk.key", "not an unencrypted ed25519 private key"),
                   "public key": (tmp_path / "k.pub", "not an unencrypted ed25519 private key"),
                   "world-readable": (tmp_path / "k.key", "open to every user of this host"),
                   "encrypted": (tmp_path / "enc.key", "not an unencrypted ed25519 private key")}[case]
    (tmp_path / "junk.key").write_text("not a key\n")
    (tmp_path / "enc.key").write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    (tmp_path / "enc.key").chmod(0o600)
    if case == "world-readable":
        key.chmod(0o644)
    monkeypatch.setattr(bundle_module, "load_checkpoint_model", _no_work)
    models = tmp_path / "models"
    with pytest.raises(ValueError, match="--sign-key") as caught:
        export_bundle(ExportConfig(checkpoint=tmp_path / "run" / "best.pt", models_dir=models, name="tiny",
                                   version="1", tensorrt="off", sign_key=key))
    assert key.name in str(caught.value) and needle in str(caught.value)
    assert not models.exists()


def test_a_private_key_open_to_every_user_is_refused_and_one_of_the_owner_or_group_signs(tmp_path):
    """Given a key file mode 0644 or 0606 (anyone on the host could sign bundles every station accepts), signing
    names the file and the chmod; modes 0600 (keygen's) and 0640 (a service group) sign."""
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    key = tmp_path / "k.key"
    for mode in (0o644, 0o606, 0o604):
        key.chmod(mode)
        with pytest.raises(ValueError, match=f"k.key: private key open to every user.*{mode:04o}.*chmod 600"):
            load_private_key(key)
    b = tmp_path / "b"
    b.mkdir()
    (b / "manifest.json").write_text('{"name": "tiny"}')
    for mode in (0o600, 0o640, 0o400):
        key.chmod(mode)
        assert load_public_key(tmp_path / "k.pub").verify(sign_bundle(b, key).read_bytes(),
                                                          (b / "manifest.json").read_bytes()) is None


def test_a_second_export_of_a_version_being_exported_stops_before_any_work(trained_run, tmp_path, monkeypatch):
    """Given an export of tiny/1 in progress on this host (its partial folder, its process alive), when a second
    export of tiny/1 starts, then it stops at once naming the version and the other process, and leaves the other's
    folder alone. Before, both ran to the end; the second then failed, after overwriting the first's reports in the
    run's export-1 folder with its own figures (repro: /tmp/export/review/repro_two_exports.py)."""
    import subprocess
    import sys

    from contract.bundle import partial_dir

    final = tmp_path / "models" / "tiny" / "1"
    final.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        mine = partial_dir(final).name
        head, _pid, rand = mine.rsplit("-", 2)
        running = final.parent / f"{head}-{other.pid}-{rand}"
        running.mkdir()
        (running / "model.fp32.onnx").write_bytes(b"being written")
        monkeypatch.setattr(bundle_module, "export_onnx", _no_work)
        with pytest.raises(FileExistsError, match=f"another export of this version is running \\(process {other.pid}"):
            export_bundle(ExportConfig(checkpoint=trained_run / "best.pt", models_dir=tmp_path / "models",
                                       name="tiny", version="1", tensorrt="off", workers=0))
        assert sorted(p.name for p in final.parent.iterdir()) == [running.name]    # its work untouched, no other
        assert (running / "model.fp32.onnx").read_bytes() == b"being written"
    finally:
        other.kill()
        other.wait()
