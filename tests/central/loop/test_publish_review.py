"""Publishing into the served tree and serving it, against what happens on a real central host: a publish that
rewrites ``index.json`` while the server reads it, a symlink loop in the served tree, a publish killed before its
index was written, a served tree on a full file system, and flags typed wrong.

Everything is real: the ``BundleServer`` on a localhost port read over raw HTTP, tiny real bundles
(rollout_support.tiny_versions), ``python -m central publish`` as a process whose file size limit
(``RLIMIT_FSIZE``: the kernel refuses a write past it, as a full disk refuses one) stands in for a full disk.
One test moves a rename to the moment between the server's lookup of a file and its reading, by wrapping
Starlette's ``lookup_path``: a race that real timing hits only now and then (1 in 20 requests in a loop here).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rollout_support import REPO, promote, tiny_versions, wait_until

from central.rollout import BundleServer, RolloutError, publish_bundle
from contract.events import write_json_atomic


@pytest.fixture
def served(tmp_path):
    bundles = tiny_versions(tmp_path / "models", ["v1", "v2"])
    root = tmp_path / "served"
    publish_bundle(bundles["v1"], root, baseline=True)
    server = BundleServer(root).start()
    try:
        yield root, server, bundles
    finally:
        server.stop()


def get(server: BundleServer, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection, read to the server's close: the body exactly as it came (http.client
    would stop at the Content-Length and hide a longer body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        extra = "".join(f"{h}\r\n" for h in headers)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


# ---------------------------------------------------------------- serving a tree that publishes change

@pytest.mark.parametrize("versions", [3000, 0], ids=["grows", "shrinks"])
def test_a_file_renamed_over_between_lookup_and_read_is_sent_whole_with_its_own_length(served, monkeypatch, versions):
    """Starlette took a file's size (Content-Length, ETag) at lookup and opened it by name later: a publish that
    renamed a new index.json in between got the new bytes sent under the old length (an h11 "Too much data"
    traceback and a torn body, or a body cut short). Now the answer is read from the file it was sized from."""
    from starlette.staticfiles import StaticFiles

    root, server, _ = served
    index = root / "tiny" / "index.json"
    if versions == 0:
        write_json_atomic(index, {"versions": {f"v{i}": {"path": f"v{i}/"} for i in range(3000)}})
    replacement = {"versions": {f"v{i}": {"path": f"v{i}/"} for i in range(versions)}}
    looked_up = StaticFiles.lookup_path

    def then_a_publish_renames(self, path):
        found = looked_up(self, path)
        if path.endswith("index.json"):
            write_json_atomic(index, replacement)
        return found

    monkeypatch.setattr(StaticFiles, "lookup_path", then_a_publish_renames)
    status, headers, body = get(server, "/tiny/index.json")
    assert status == 200 and int(headers["content-length"]) == len(body)
    assert json.loads(body) == replacement
    monkeypatch.undo()
    assert get(server, "/tiny/index.json")[2] == body          # and the ETag is that file's too
    assert get(server, "/tiny/index.json")[1]["etag"] == headers["etag"]


def test_a_symlink_loop_in_the_served_tree_is_a_json_404_and_the_next_request_is_served(served):
    """A loop (a link to a link to it) made os.stat raise ELOOP inside Starlette: a 500 and an "Exception in ASGI
    application" traceback per request."""
    root, server, _ = served
    os.symlink("loop-b", root / "tiny" / "loop-a")
    os.symlink("loop-a", root / "tiny" / "loop-b")
    for path in ("/tiny/loop-a", "/tiny/loop-a/manifest.json"):
        status, _, body = get(server, path)
        assert status == 404 and json.loads(body) == {"error": f"{path}: not found"}
    os.symlink(root.parent / "models" / "v1" / "manifest.json", root / "tiny" / "outside")
    assert get(server, "/tiny/outside")[0] == 404                    # a link out of the tree: still never served
    assert get(server, "/tiny/v1/manifest.json")[0] == 200


def test_every_kind_of_answer_closes_the_file_it_opened(served):
    """Each answer holds its file open from lookup to its end: whole files, ranges, refused ranges, 304s, HEAD and
    a client gone mid-download all give it back."""
    root, server, _ = served
    (root / "tiny" / "v1" / "big.bin").write_bytes(b"x" * 8_000_000)
    etag = get(server, "/tiny/v1/manifest.json")[1]["etag"]

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_files()
    for _ in range(10):
        for headers in ((), ("Range: bytes=0-3",), ("Range: bytes=0-1,4-5",), ("Range: bytes=9-1",),
                        ("Range: bytes=99999-",), (f"If-None-Match: {etag}",)):
            assert get(server, "/tiny/v1/manifest.json", *headers)[0] in (200, 206, 304, 400, 416)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET /tiny/v1/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(1000)
    wait_until(lambda: open_files() <= before, 30, "the server to close every file it opened")


# ---------------------------------------------------------------- the index: killed publishes, a full disk

def test_what_a_killed_publish_left_of_the_index_is_removed_by_the_next(served):
    """A publish killed while writing index.json left its hidden temporary file beside it for good."""
    root, _, bundles = served
    left = root / "tiny" / ".index.json.0a1b2c3d.tmp"
    left.write_text('{"versions": {"v1"')
    promote(bundles["v2"])
    publish_bundle(bundles["v2"], root)
    assert not left.exists()
    assert sorted(json.loads((root / "tiny" / "index.json").read_text())["versions"]) == ["v1", "v2"]


def _no_bigger_files_than(limit: int):
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a write past it fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_completing_a_publish_on_a_full_disk_is_a_named_error_and_the_rerun_completes_it(served):
    """A publish killed between its rename and its index is completed by the next run; when that run could not
    write the index (a full disk), it ended in a bare OSError traceback and left a temporary file."""
    root, _, bundles = served
    (root / "tiny" / "index.json").unlink()                  # as a publish killed after the rename
    command = [sys.executable, "-m", "central", "publish", str(bundles["v1"]), "--root", str(root), "--baseline"]
    full = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=_no_bigger_files_than(64))
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    assert f"--root {root}: cannot publish {root / 'tiny' / 'v1'} (File too large" in full.stderr
    assert sorted(p.name for p in (root / "tiny").iterdir()) == [".index.lock", "v1"]
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already published tiny v1" in again.stdout, again.stderr
    assert list(json.loads((root / "tiny" / "index.json").read_text())["versions"]) == ["v1"]


# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("argv, flag", [
    (["rollback", "--all", "--mqtt-host", "h", "--to", "../1"], "--to"),
    (["rollback", "--all", "--mqtt-host", "h", "--to", ""], "--to"),
    (["publish", "models/x/1", "--root", "r", "--base-url", "htp:/central:8070"], "--base-url"),
    (["publish", "models/x/1", "--root", "r", "--base-url", "central:8070"], "--base-url"),
    (["publish", "models/x/1", "--root", "r", "--base-url", "http://central:port/"], "--base-url"),
])
def test_a_version_or_url_flag_typed_wrong_is_refused_by_the_parser_naming_it(argv, flag, capsys):
    from central.cli import get_args_parser

    with pytest.raises(SystemExit) as exit_:
        get_args_parser().parse_args(argv)
    assert exit_.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err
    assert get_args_parser().parse_args(argv[:-1] + ["previous" if flag == "--to" else "https://central:8070/b"])


def test_serving_a_root_that_is_missing_or_a_file_names_root(tmp_path):
    (tmp_path / "served.txt").write_text("not a folder")
    with pytest.raises(RolloutError, match=r"^--root .*served.txt: not a folder"):
        BundleServer(tmp_path / "served.txt")
    with pytest.raises(RolloutError, match=r"^--root .*nowhere: served folder does not exist"):
        BundleServer(tmp_path / "nowhere")


# ---------------------------------------------------------------- the history's size

def test_the_history_keeps_the_beginning_of_a_long_reason_so_its_size_stays_small(tmp_path):
    """A station may answer with a 16 KiB reason (status.v1); 200 entries of those made the history 3.3 MB per
    station, re-read and rewritten whole at every record of every rollout."""
    from central.rollout import history as module
    from central.rollout.history import MAX_ENTRIES, RolloutHistory
    from central.rollout.remote import RemoteBundle

    history = RolloutHistory(tmp_path / "history.json")
    bundle = RemoteBundle("http://central:8070/tiny/v2/", "tiny", "v2", "0" * 64, {})
    reason = "refused the bundle: " + "x" * 16364
    for _ in range(MAX_ENTRIES + 5):
        history.record("site/st-a", action="rollout", bundle=bundle, from_version="v1", ok=False, reason=reason)
    assert (tmp_path / "history.json").stat().st_size < MAX_ENTRIES * 3000      # 2000 characters of reason kept
    cut = module.MAX_REASON_CHARS
    kept = RolloutHistory(tmp_path / "history.json").entries("site/st-a")
    assert len(kept) == MAX_ENTRIES
    assert kept[-1]["reason"] == reason[:cut] + f"... ({len(reason) - cut} more characters not kept)"
    history.record("site/st-a", action="rollout", bundle=bundle, from_version="v1", ok=True, reason="switched")
    assert history.entries("site/st-a")[-1]["reason"] == "switched"


def test_an_artifact_in_a_sub_folder_has_its_folders_synced_before_the_rename(tmp_path, monkeypatch):
    """A power cut cannot be made here: what is checked is that every folder of the copy is synced (a file's name
    lives in its folder) before the copy is renamed into place, as the station's own install does. Before, only
    the top folder was: after a power cut, an artifact in a sub-folder could be missing from a published version."""
    from central.rollout import publish as module

    bundle = tiny_versions(tmp_path / "models", ["v1"])["v1"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "onnx" / "fp32").mkdir(parents=True)
    for entry in manifest["artifacts"]:
        (bundle / entry["path"]).rename(bundle / "onnx" / "fp32" / entry["path"])
        entry["path"] = f"onnx/fp32/{entry['path']}"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    synced: list[str] = []
    real_fsync_dir, real_replace = module.fsync_dir, os.replace

    def record_sync(folder, **kw):
        synced.append(Path(folder).relative_to(tmp_path / "served" / "tiny").as_posix())
        real_fsync_dir(folder, **kw)

    def record_rename(src, dst):
        synced.append(f"rename -> {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(module, "fsync_dir", record_sync)
    monkeypatch.setattr(module.os, "replace", record_rename)
    publish_bundle(bundle, tmp_path / "served", baseline=True)
    monkeypatch.undo()
    before = synced[:synced.index("rename -> v1")]
    partial = before[-1]
    assert partial.startswith(".v1.partial-") and before[-3:] == [f"{partial}/onnx/fp32", f"{partial}/onnx", partial]
    assert (tmp_path / "served" / "tiny" / "v1" / "onnx" / "fp32").is_dir()
