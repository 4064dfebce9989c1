"""cmd/model installing a bundle of the same name and version as an installed one, with other content: the
installed folder is swapped with the new one in one step (renameat2 RENAME_EXCHANGE), so a power cut at any point
leaves ``<name>/<version>`` holding the old bundle or the new one whole (the state file may name it).

Real parts: real bundles (a tiny ONNX model), the real install on this machine's file system and the C library's
renameat2. A power cut cannot happen in a test: it is an exception raised in place of one step of the install
(nothing after it runs, as after a cut); the file system refusing the exchange is a patched errno.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from agent_support import make_onnx_bundle
from test_reload import sha

from agent import update as agent_update
from agent.update import install_bundle, installed_by_cmd_model, prune_installed
from contract.bundle import MANIFEST, load_bundle


class PowerCut(BaseException):
    """Stands for a power cut: nothing of the install runs after it (no except OSError catches it)."""


def exchange_works(where: Path) -> bool:
    """Whether this C library, kernel and file system swap two folders (renameat2 RENAME_EXCHANGE), asked directly."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    a, b = where / "probe-a", where / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return renameat2 is not None and renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0
    finally:
        shutil.rmtree(a)
        shutil.rmtree(b)


@pytest.fixture
def templates(tmp_path):
    """The installed bundle's source and another bundle of the same name and version (other content)."""
    old = make_onnx_bundle(tmp_path / "old", version="v1")
    new = make_onnx_bundle(tmp_path / "new", version="v1")
    manifest = json.loads((new / MANIFEST).read_text())
    (new / MANIFEST).write_text(json.dumps({**manifest, "created_at": "2030-01-01T00:00:00+00:00"}))
    assert sha(old) != sha(new)
    return old, new


def installed_and_incoming(templates, root: Path) -> tuple[Path, Path]:
    """``root``: a download folder with the old bundle installed by cmd/model, and the new one downloaded."""
    old, new = templates
    downloads = root / "downloads"
    downloads.mkdir(parents=True)
    staged = downloads / f".incoming-{os.getpid()}-v1-first"
    shutil.copytree(old, staged)
    install_bundle(staged, downloads, "onnx-tiny", "v1")
    incoming = downloads / f".incoming-{os.getpid()}-v1-second"
    shutil.copytree(new, incoming)
    return downloads, incoming


def cut_at(monkeypatch, step: int) -> list[str]:
    """A power cut in place of the install's ``step``-th step (a rename, an exchange, a directory sync, the removal
    of the old copy); returns the steps seen."""
    seen: list[str] = []

    def counted(what, real):
        def run(*args, **kwargs):
            seen.append(what)
            if len(seen) == step:
                raise PowerCut(f"power cut in place of step {step} ({what})")
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(os, "rename", counted("rename", os.rename))
    monkeypatch.setattr(agent_update, "fsync_dir", counted("fsync_dir", agent_update.fsync_dir))
    monkeypatch.setattr(shutil, "rmtree", counted("rmtree", shutil.rmtree))
    real_call = getattr(agent_update, "_renameat2_call", None)
    if real_call is not None:
        monkeypatch.setattr(agent_update, "_renameat2_call", counted("renameat2", real_call))
    return seen


def test_a_power_cut_at_any_step_of_a_replacement_leaves_the_version_folder_whole(templates, tmp_path, monkeypatch):
    if not exchange_works(tmp_path):
        pytest.skip(f"{tmp_path}: this file system refuses renameat2 RENAME_EXCHANGE (the fallback is tested below)")
    old_sha, new_sha = (sha(t) for t in templates)
    step, done = 0, False
    while not done:
        step += 1
        # given: the old bundle installed, the new one (same name and version) downloaded
        downloads, incoming = installed_and_incoming(templates, tmp_path / f"cut-{step}")
        target = downloads / "onnx-tiny" / "v1"
        # when: the power goes in place of one step of the install (or never, once every step is passed)
        with monkeypatch.context() as m:
            seen = cut_at(m, step)
            try:
                install_bundle(incoming, downloads, "onnx-tiny", "v1")
                done = True
            except PowerCut:
                pass
        # then: the version folder is there, holding one of the two bundles whole and marked as cmd/model's
        assert target.is_dir(), f"no {target} after a power cut in place of step {step} of {seen}"
        assert load_bundle(target, None).manifest_sha256 in (old_sha, new_sha) and installed_by_cmd_model(target)
        if "renameat2" in seen[:step - 1] or done:
            assert sha(target) == new_sha, f"the old bundle back after step {step} of {seen}"
        # and the next clean-up leaves nothing else behind (the old copy, wherever the cut left it)
        prune_installed(downloads, [target])
        assert sorted(p.name for p in downloads.iterdir()) == ["onnx-tiny"]
        assert [p.name for p in (downloads / "onnx-tiny").iterdir()] == ["v1"]
    assert "renameat2" in seen and seen.count("rename") == 1, seen     # one exchange, the old copy to .old-*


def test_a_crash_after_the_exchange_leaves_the_new_bundle_in_place_and_the_old_one_for_the_clean_up(
        templates, tmp_path, monkeypatch):
    if not exchange_works(tmp_path):
        pytest.skip(f"{tmp_path}: this file system refuses renameat2 RENAME_EXCHANGE (the fallback is tested below)")
    old_sha, new_sha = (sha(t) for t in templates)
    for crash in ("right after the exchange", "before the clean-up"):
        # given: the old bundle installed, the new one downloaded
        downloads, incoming = installed_and_incoming(templates, tmp_path / crash.replace(" ", "-"))
        target = downloads / "onnx-tiny" / "v1"
        # when: the install dies right after the exchange, or once the old copy is under .old-*
        with monkeypatch.context() as m:
            if crash == "right after the exchange":
                real = agent_update._exchange

                def exchange_then_crash(a, b):
                    assert real(a, b)
                    raise PowerCut(crash)
                m.setattr(agent_update, "_exchange", exchange_then_crash)
            else:
                def crash_instead(path, *args, **kwargs):
                    raise PowerCut(crash)
                m.setattr(shutil, "rmtree", crash_instead)
            with pytest.raises(PowerCut):
                install_bundle(incoming, downloads, "onnx-tiny", "v1")
        # then: the new bundle is in place, whole and marked; the old one lies whole outside any version folder
        assert load_bundle(target, None).manifest_sha256 == new_sha and installed_by_cmd_model(target)
        left = [p for p in downloads.iterdir() if p.name != "onnx-tiny"]
        assert len(left) == 1 and sha(left[0]) == old_sha
        if crash == "before the clean-up":
            assert left[0].name.startswith(".old-onnx-tiny-v1-")
        else:                           # still under the download's name: the next clean-up's leftover too
            assert left[0] == incoming
        # and the next clean-up removes it, keeping the new one
        assert prune_installed(downloads, [target]) == left
        assert sorted(p.name for p in downloads.iterdir()) == ["onnx-tiny"] and sha(target) == new_sha


@pytest.mark.parametrize("refusal", ["EINVAL", "ENOSYS", "no renameat2"])
def test_where_the_exchange_is_refused_the_bundle_is_replaced_by_two_renames_logged(templates, tmp_path,
                                                                                     monkeypatch, caplog, refusal):
    # given: the old bundle installed, the new one downloaded, and a file system (EINVAL), a kernel (ENOSYS) or a
    # C library (no renameat2) without the exchange
    downloads, incoming = installed_and_incoming(templates, tmp_path)
    target = downloads / "onnx-tiny" / "v1"
    calls = []

    def refuse(old, new, flags):
        calls.append(flags)
        return getattr(errno, refusal)
    monkeypatch.setattr(agent_update, "_renameat2_call", None if refusal == "no renameat2" else refuse)
    # when
    with caplog.at_level(logging.WARNING, logger="agent.update"):
        assert install_bundle(incoming, downloads, "onnx-tiny", "v1") == target
    # then: the new bundle is installed and marked, nothing else is left, and the log says it was not atomic
    assert calls == ([] if refusal == "no renameat2" else [agent_update.RENAME_EXCHANGE])
    assert load_bundle(target, None).manifest_sha256 == sha(templates[1]) and installed_by_cmd_model(target)
    assert sorted(p.name for p in downloads.iterdir()) == ["onnx-tiny"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{target}: replaced by two renames, not atomically")


def test_an_exchange_that_fails_otherwise_changes_nothing(templates, tmp_path, monkeypatch):
    # given: the old bundle installed, the new one downloaded, and an exchange that fails (EACCES: no fallback)
    downloads, incoming = installed_and_incoming(templates, tmp_path)
    target = downloads / "onnx-tiny" / "v1"
    monkeypatch.setattr(agent_update, "_renameat2_call", lambda old, new, flags: errno.EACCES)
    # when / then: the error names the folders, and both bundles are where they were
    with pytest.raises(PermissionError, match="Permission denied"):
        install_bundle(incoming, downloads, "onnx-tiny", "v1")
    assert sha(target) == sha(templates[0]) and installed_by_cmd_model(target)
    assert sha(incoming) == sha(templates[1])
