"""cmd/model's install path under what a station meets: a bundle server that holds its answer's headers back, a power
cut in the middle of an install or a clean-up, the running bundle sent again, names at the schema's length limit.

Real parts: real ONNX bundles served over HTTP by ``http.server`` (or a raw socket, for a server no HTTP library
would write), the real disk. A power cut cannot be had here: where a test needs one it raises ``PowerCut`` at the
step it cuts (the process ends there: nothing after it runs) and then looks at what the disk holds.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from agent_support import make_onnx_bundle, station_config
from test_reload import bundle_version, sha
from test_station_state import config, restarted, serve_folder
from test_station_state import update as station_update

import agent.update as update
from agent.update import ModelCommand, fetch_bundle, install_bundle, prune_installed, verify_command_bundle
from contract.bundle import MANIFEST, BundleError, artifact_entry


class PowerCut(BaseException):
    """The process ends at this step (nothing after it runs, nothing catches it)."""


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    """``tmp_path/www`` over HTTP: its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "www")))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def command(url: str, sha: str | None = None, version: str | None = None) -> ModelCommand:
    return ModelCommand.parse(json.dumps({"bundle": url, "sha256": sha, "version": version}).encode())


def manifest_sha(folder: Path) -> str:
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()


# ---------------------------------------------------------------- a server that holds its headers back

def slow_header_server(kind: str, seconds: float):
    """A raw socket server that answers every request over ``seconds``: one header line at a time ("headers"), or
    ``100 Continue`` interim answers without end ("continue"); http.client reads either with no limit of time."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def talk(conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            ends = time.monotonic() + seconds
            if kind == "headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
            n = 0
            while time.monotonic() < ends and not stop.is_set():
                conn.sendall(b"X-Slow-%d: y\r\n" % n if kind == "headers" else b"HTTP/1.1 100 Continue\r\n\r\n")
                n += 1
                time.sleep(seconds / 90 if kind == "headers" else 0.2)     # under http.client's 100 headers
        except OSError:
            pass
        finally:
            conn.close()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=talk, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, stop, f"http://127.0.0.1:{srv.getsockname()[1]}/b/"


@pytest.mark.parametrize("kind", ["headers", "continue"])
def test_a_server_that_holds_its_headers_back_is_cut_off_at_the_deadline(kind, tmp_path):
    # given: a server that would take 40 s to finish its headers, each line well within the read timeout
    srv, stop, url = slow_header_server(kind, 40)
    try:
        started = time.monotonic()
        # when: a bundle download with a deadline of 1.5 s asks it for the manifest
        with pytest.raises(BundleError, match=r"manifest.json: bundle download not finished within its 1.5 s deadline"):
            fetch_bundle(url, tmp_path / "dl", None, deadline_s=1.5)
        # then: the deadline ended it, not the server (before: 40 s, the server's own time)
        assert time.monotonic() - started < 20
        assert list((tmp_path / "dl").iterdir()) == []
    finally:
        stop.set()
        srv.close()


# ---------------------------------------------------------------- install

def test_the_running_bundle_sent_again_stays_in_its_folder(tmp_path, served):
    # given: a bundle installed by an earlier cmd/model (the one running)
    folder = make_onnx_bundle(tmp_path / "www", version="2")
    url = f"{served}/onnx-tiny/2/"
    first = verify_command_bundle(command(url), tmp_path / "downloads", None, deadline_s=30)
    before = [os.stat(first.root).st_ino, os.stat(first.root / "model.fp32.onnx").st_ino]
    # when: the same bundle comes again without a sha256 (a resend, a QoS 1 redelivery)
    again = verify_command_bundle(command(url), tmp_path / "downloads", None, deadline_s=30)
    # then: the copy installed is kept as it is: its folder is never renamed away, not even for the instant a power
    # cut could hit (the state file names it), and the new download is gone
    assert again.root == first.root and again.manifest_sha256 == manifest_sha(folder)
    assert [os.stat(first.root).st_ino, os.stat(first.root / "model.fp32.onnx").st_ino] == before
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == ["onnx-tiny"]


def test_a_damaged_installed_copy_is_replaced_by_the_same_bundle_sent_again(tmp_path, served):
    make_onnx_bundle(tmp_path / "www", version="2")
    url = f"{served}/onnx-tiny/2/"
    installed = verify_command_bundle(command(url), tmp_path / "downloads", None, deadline_s=30).root
    model = installed / "model.fp32.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")      # a bit flipped on the disk since
    again = verify_command_bundle(command(url), tmp_path / "downloads", None, deadline_s=30)
    assert again.root == installed and (installed / "model.fp32.onnx").read_bytes() == (
        tmp_path / "www" / "onnx-tiny" / "2" / "model.fp32.onnx").read_bytes()


def test_an_install_that_fails_puts_the_installed_copy_back(tmp_path, served, monkeypatch):
    # given: version 2 installed, then another bundle under the same name and version on the server
    folder = make_onnx_bundle(tmp_path / "www", version="2")
    url = f"{served}/onnx-tiny/2/"
    installed = verify_command_bundle(command(url), tmp_path / "downloads", None, deadline_s=30).root
    old_manifest = (installed / MANIFEST).read_bytes()
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["created_at"] = "2027-01-01T00:00:00+00:00"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    # when: the rename that installs the new copy fails (the disk)
    real = Path.rename

    def rename(self, target):
        if self.name.startswith(update.INCOMING) and Path(target) == installed:
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(update, "_renameat2_call", lambda old, new, flags: errno.EINVAL)  # no exchange: two renames
    with pytest.raises(BundleError, match="cannot install the bundle"):
        verify_command_bundle(command(url), tmp_path / "downloads", None, deadline_s=30)
    # then: the copy that was installed is where it was, whole (before: left as .old-*, removed at the next download)
    assert (installed / MANIFEST).read_bytes() == old_manifest
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == ["onnx-tiny"]


def test_a_download_is_on_disk_before_it_is_installed(tmp_path, served, monkeypatch):
    # given: a tracer of fsync and rename (a power cut loses what is only in the page cache)
    make_onnx_bundle(tmp_path / "www", version="3")
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(self, target):
        events.append(("rename", str(target)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    # when
    bundle = verify_command_bundle(command(f"{served}/onnx-tiny/3/"), tmp_path / "downloads", None, deadline_s=30)
    # then: the model and the manifest were synced before the install's rename, and the rename after it
    install = events.index(("rename", str(bundle.root)))
    synced = {Path(path).name for kind, path in events[:install] if kind == "fsync"}
    assert {"model.fp32.onnx", MANIFEST} <= synced
    assert ("fsync", str(bundle.root.parent)) in events[install:]


def test_a_bundle_with_the_longest_name_and_version_is_installed_over_its_copy(tmp_path):
    # given: name and version of 128 characters each (what the manifest schema allows), installed once
    name, version = "n" * 128, "v" * 128
    (tmp_path / name / version).mkdir(parents=True)
    (tmp_path / name / version / MANIFEST).write_text("old")
    update.mark_installed(tmp_path / name / version)        # installed by cmd/model (a hand copy is never replaced)
    incoming = tmp_path / f"{update.INCOMING}1-x"
    incoming.mkdir()
    (incoming / MANIFEST).write_text("new")
    # when / then: installed (before: '.old-<name>-<version>-<hex>' was longer than a file name may be)
    assert install_bundle(incoming, tmp_path, name, version) == tmp_path / name / version
    assert (tmp_path / name / version / MANIFEST).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# ---------------------------------------------------------------- clean-up

def test_a_clean_up_cut_short_leaves_nothing_the_next_clean_up_misses(tmp_path, monkeypatch):
    # given: three installed bundles; 1 is no longer kept
    downloads = tmp_path / "downloads"
    for v in ("1", "2", "3"):
        update.mark_installed(make_onnx_bundle(downloads, version=v))     # installed by cmd/model
    keep = [downloads / "onnx-tiny" / "2", downloads / "onnx-tiny" / "3"]
    # when: the power goes while its folder is being removed, right after its manifest.json (the order of a removal
    # is the directory's, file system by file system)
    real_rmtree = update.shutil.rmtree

    def cut_rmtree(path, *args, **kwargs):
        (Path(path) / MANIFEST).unlink()
        raise PowerCut

    monkeypatch.setattr(update.shutil, "rmtree", cut_rmtree)
    with pytest.raises(PowerCut):
        prune_installed(downloads, keep)
    monkeypatch.setattr(update.shutil, "rmtree", real_rmtree)
    # and the next clean-up runs (after the next swap)
    prune_installed(downloads, keep)
    # then: nothing of 1 is left (before: its model stayed for good, a folder no clean-up took for a bundle)
    left = sorted(str(p.relative_to(downloads)) for p in downloads.rglob("*") if p.is_file())
    assert left == [f"onnx-tiny/{v}/{f}" for v in ("2", "3") for f in (update.INSTALLED_MARK, MANIFEST,
                                                                    "model.fp32.onnx")]


# ---------------------------------------------------------------- through the station (agent/app.py)

def test_an_installed_model_that_cannot_run_on_a_full_disk_falls_back_to_the_configured_bundle(
        tiny_bundle, fmnist_video, tmp_path):
    # given: tiny-2 installed by cmd/model, then damaged on disk (it no longer verifies)
    www = tmp_path / "www"
    served = bundle_version(tiny_bundle, www / "tiny-2", "tiny-2")
    server, url = serve_folder(www)
    try:
        station = restarted(config(tmp_path, tiny_bundle, fmnist_video))
        assert station_update(station, served, "tiny-2", f"{url}/tiny-2/")
    finally:
        server.shutdown()
    model = tmp_path / "downloads" / "tiny" / "tiny-2" / "model.fp32.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    conf = tmp_path / "station.yaml"
    conf.write_text(yaml.safe_dump(station_config(tmp_path, tiny_bundle, str(fmnist_video), 1,
                                                  model={"download_dir": str(tmp_path / "downloads")})))
    # when: the station starts (python -m agent run, as the unit runs it) on a disk so full that station-state.json
    # cannot be written (a fake: ENOSPC for the state file's temporary copy; the rest of the disk is real)
    full_disk = (
        "import errno, os, sys\n"
        "real = os.open\n"
        "def full(path, flags, *a, **k):\n"
        "    if '.station-state.json.' in os.fspath(path) and flags & os.O_CREAT:\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))\n"
        "    return real(path, flags, *a, **k)\n"
        "os.open = full\n"
        "from agent.__main__ import main\n"
        f"sys.exit(main(['run', '--config', {str(conf)!r}, '--exit-at-end', '--flush-timeout', '0']))\n")
    proc = subprocess.run([sys.executable, "-c", full_disk], capture_output=True, text=True, timeout=300,
                          cwd=os.getcwd())
    # then: no traceback; the configured bundle ran (the docs' fallback), and the log says why, naming the file
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot run" in proc.stderr and "running the configured bundle" in proc.stderr
    assert (f"{tmp_path / 'station-state.json'}: cannot record that the configured bundle runs (No space left on "
            "device)") in proc.stderr
    assert "model tiny tiny-1 ready" in proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_download_refused_at_its_warm_up_is_named_by_its_url(tiny_bundle, fmnist_video, tmp_path):
    # given: a served bundle whose manifest is valid and pins its model's hash, but whose model is no ONNX model
    bad = bundle_version(tiny_bundle, tmp_path / "www" / "tiny-bad", "tiny-bad")
    (bad / "model.fp32.onnx").write_bytes(b"not an ONNX model" * 16)
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["artifacts"] = [artifact_entry(bad / "model.fp32.onnx", bad, role="onnx-fp32", precision="fp32",
                                            deployable=True)]
    (bad / MANIFEST).write_text(json.dumps(manifest))
    server, base = serve_folder(tmp_path / "www")
    try:
        agent = restarted(config(tmp_path, tiny_bundle, fmnist_video))
        # when
        ok = agent.reload_model(json.dumps({"bundle": f"{base}/tiny-bad/", "sha256": sha(bad),
                                            "version": "tiny-bad"}).encode())
    finally:
        server.shutdown()
    # then: refused, the old model runs, nothing is left of the download, and the reason names the URL sent (not
    # the download folder, which went with the refusal)
    reason = agent.last_update["reason"]
    assert not ok and agent.model.current.bundle.version == "tiny-1"
    assert f"{base}/tiny-bad/model.fp32.onnx" in reason and ".incoming-" not in reason, reason
    assert not (tmp_path / "downloads").exists() or [p.name for p in (tmp_path / "downloads").iterdir()] == []
