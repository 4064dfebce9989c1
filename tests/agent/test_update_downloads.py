"""cmd/model downloads against the disk they land on and the server that serves them.

Real parts: the bundle server (``central.rollout.publish``: ``publish_bundle`` into a served tree, ``BundleServer``
on uvicorn) or a plain ``http.server`` where a bundle the publisher would refuse must be served, real ONNX bundles,
the real disk's free space, real processes for the owners of download folders.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from agent_support import make_onnx_bundle

import agent.update as update
from agent.update import ModelCommand, fetch_verified, prune_installed, verify_command_bundle
from central.rollout.publish import BundleServer, publish_bundle
from contract.bundle import MANIFEST, BundleError, artifact_entry, load_bundle


class Recorded(SimpleHTTPRequestHandler):
    """http.server's file handler that records each path asked for on its server."""

    def do_GET(self) -> None:      # noqa: N802 (http.server's name)
        self.server.asked.append(self.path)     # type: ignore[attr-defined]
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def plain_server():
    """Serves folders as they are (the bundle server would refuse to publish some of what these tests serve)."""
    servers = []

    def serve(folder: Path) -> tuple[str, list[str]]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Recorded, directory=str(folder)))
        server.asked = []       # type: ignore[attr-defined]
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server.asked     # type: ignore[attr-defined]

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def bundle_server():
    servers = []

    def serve(root: Path) -> str:
        servers.append(BundleServer(root).start())
        return servers[-1].url

    yield serve
    for server in servers:
        server.stop()


def command(url: str, sha: str | None = None, version: str | None = None) -> ModelCommand:
    return ModelCommand.parse(json.dumps({"bundle": url, "sha256": sha, "version": version}).encode())


def manifest_sha(folder: Path) -> str:
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()


def rename_artifact(folder: Path, new_name: str) -> None:
    """The bundle's model file under another name, its manifest saying so (a valid bundle still)."""
    (folder / new_name).parent.mkdir(parents=True, exist_ok=True)
    (folder / "model.fp32.onnx").rename(folder / new_name)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["artifacts"][0]["path"] = new_name
    (folder / MANIFEST).write_text(json.dumps(manifest))
    load_bundle(folder)


# ---------------------------------------------------------------- the disk

def test_a_bundle_larger_than_the_free_disk_is_refused_before_any_artifact_byte(tmp_path, plain_server):
    # given: a served manifest that declares an artifact of 1 PiB (more than any disk here has free)
    folder = make_onnx_bundle(tmp_path / "www", version="huge")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["artifacts"][0]["size"] = 1 << 50
    (folder / MANIFEST).write_text(json.dumps(manifest))
    base, asked = plain_server(tmp_path / "www")
    # when: a station is told to install it
    with pytest.raises(BundleError, match=r"need \d+ bytes, and .*downloads has \d+ free.*no artifact fetched"):
        verify_command_bundle(command(f"{base}/onnx-tiny/huge/", manifest_sha(folder)), tmp_path / "downloads",
                              None, deadline_s=30)
    # then: only the manifest was asked for, and nothing of the download is left
    assert asked == [f"/onnx-tiny/huge/{MANIFEST}"]
    assert list((tmp_path / "downloads").iterdir()) == []


def test_a_download_leaves_the_reserve_free_for_the_station(tmp_path, bundle_server, monkeypatch):
    # given: a published bundle, and a disk whose free space is all reserve (the reserve set to twice the free space)
    published = publish_bundle(make_onnx_bundle(tmp_path / "src", version="r1"), tmp_path / "www", baseline=True)
    url = f"{bundle_server(tmp_path / 'www')}/{published.url_path}"
    monkeypatch.setattr(update, "DISK_RESERVE_BYTES", 2 * shutil.disk_usage(tmp_path).free)
    # when / then: refused, naming the reserve
    with pytest.raises(BundleError, match="stay for the station"):
        verify_command_bundle(command(url, published.sha256), tmp_path / "downloads", None, deadline_s=30)
    # and with the real reserve it installs
    monkeypatch.undo()
    bundle = verify_command_bundle(command(url, published.sha256), tmp_path / "downloads", None, deadline_s=30)
    assert bundle.root == tmp_path / "downloads" / "onnx-tiny" / "r1"


def _ended_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_what_a_killed_download_left_is_removed_before_the_next_download(tmp_path, bundle_server):
    # given: the download folder of a station killed while downloading (a power cut: its process is gone),
    # one of the older name form, and the download another station process sharing the folder is running now
    downloads = tmp_path / "downloads"
    killed = downloads / f".incoming-{_ended_pid()}-v1-k3j2h1"
    older = downloads / ".incoming-v1-x8y7z6"
    for left in (killed, older):
        left.mkdir(parents=True)
        (left / "model.fp32.onnx").write_bytes(os.urandom(4096))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = downloads / f".incoming-{live.pid}-v9-a1b2c3"
        running.mkdir()
        published = publish_bundle(make_onnx_bundle(tmp_path / "src", version="v2"), tmp_path / "www", baseline=True)
        url = f"{bundle_server(tmp_path / 'www')}/{published.url_path}"
        # when: the next cmd/model downloads
        incoming = fetch_verified(command(url, published.sha256), downloads, None, deadline_s=30)
        # then: the leftovers went before it, the other process's download stays, and so does this one's own
        assert not killed.exists() and not older.exists() and running.is_dir()
        assert incoming.bundle.root.is_dir() and incoming.bundle.root.name.startswith(f".incoming-{os.getpid()}-")
        # and a swap's clean-up (prune_installed) keeps what is still being verified or written
        assert prune_installed(downloads, []) == [] and incoming.bundle.root.is_dir() and running.is_dir()
        installed = incoming.install(downloads, None)
        assert sorted(p.name for p in downloads.iterdir()) == [running.name, "onnx-tiny"]
        assert installed.root == downloads / "onnx-tiny" / "v2"
    finally:
        live.kill()
        live.wait()
    # once that process has ended, its folder is a leftover like any other
    assert prune_installed(downloads, [installed.root]) == [running]


# ---------------------------------------------------------------- artifact paths in URLs

@pytest.mark.parametrize("name", ["model v2.onnx", "model#2.onnx", "model%41.onnx", "model?.onnx", "sub dir/m.onnx"])
def test_artifact_file_names_with_url_characters_are_fetched_as_those_files(name, tmp_path, bundle_server):
    # given: a valid bundle whose model file's name holds a character with a meaning in URLs, published and served
    folder = make_onnx_bundle(tmp_path / "src", version="n1")
    rename_artifact(folder, name)
    published = publish_bundle(folder, tmp_path / "www", baseline=True)
    url = f"{bundle_server(tmp_path / 'www')}/{published.url_path}"
    # when: a station installs it
    bundle = verify_command_bundle(command(url, published.sha256, "n1"), tmp_path / "downloads", None, deadline_s=30)
    # then: it got that file (its hash checked by load_bundle)
    assert (bundle.root / name).read_bytes() == (folder / name).read_bytes()


def test_an_artifact_path_is_never_fetched_from_another_host(tmp_path, plain_server):
    # given: host B, and on host A a bundle whose artifact path reads like a URL on B ("http://B/model.fp32.onnx":
    # as a file path, the folders "http:" and "B" inside the bundle)
    other, asked_of_other = plain_server(tmp_path / "elsewhere")
    rel = f"{other}/model.fp32.onnx"
    folder = make_onnx_bundle(tmp_path / "www", version="h1")
    (folder / Path(rel)).parent.mkdir(parents=True)
    (folder / "model.fp32.onnx").rename(folder / Path(rel))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["artifacts"] = [artifact_entry(folder / Path(rel), folder, role="onnx-fp32", precision="fp32",
                                            deployable=True)]
    manifest["artifacts"][0]["path"] = rel
    (folder / MANIFEST).write_text(json.dumps(manifest))
    base, asked = plain_server(tmp_path / "www")
    # when
    bundle = verify_command_bundle(command(f"{base}/onnx-tiny/h1/", manifest_sha(folder)), tmp_path / "downloads",
                                   None, deadline_s=30)
    # then: the file came from the bundle's own server, host B was never asked
    assert asked_of_other == [] and len(asked) == 3       # manifest, signature (404), the model
    assert bundle.artifacts[0].path.read_bytes() == (folder / Path(rel)).read_bytes()


# ---------------------------------------------------------------- what the bundle server can serve

@pytest.mark.parametrize("name", [".model.fp32.onnx", ".cache/model.fp32.onnx", "engines/.x/model.fp32.onnx"])
def test_a_bundle_with_an_artifact_the_server_never_serves_is_not_published(name, tmp_path):
    from contract.events import RolloutError

    # given: a valid bundle with its model in a hidden file or folder (the bundle server hides dot-paths: they are
    # its half-copied folders)
    folder = make_onnx_bundle(tmp_path / "src", version="d1")
    rename_artifact(folder, name)
    # when / then: publishing refuses it, naming the field, and nothing is published
    with pytest.raises(RolloutError, match=r"manifest.json: field artifacts/0/path: .*never serves"):
        publish_bundle(folder, tmp_path / "www", baseline=True)
    assert not (tmp_path / "www" / "onnx-tiny" / "d1").exists()


def test_every_file_of_a_published_bundle_is_served_to_a_station(tmp_path, bundle_server):
    folder = make_onnx_bundle(tmp_path / "src", version="s1")
    rename_artifact(folder, "weights/v1/model.fp32.onnx")
    published = publish_bundle(folder, tmp_path / "www", baseline=True)
    url = f"{bundle_server(tmp_path / 'www')}/{published.url_path}"
    bundle = verify_command_bundle(command(url, published.sha256, "s1"), tmp_path / "downloads", None, deadline_s=30)
    assert bundle.artifacts[0].path == tmp_path / "downloads" / "onnx-tiny" / "s1" / "weights/v1/model.fp32.onnx"


# ---------------------------------------------------------------- a connection that breaks off mid-file

class CuttingServer:
    """A real HTTP server for a bundle folder whose answers for the model file break off halfway ``cuts`` times
    (``cut``: "close", the connection closed short of the Content-Length it announced, or "reset", a TCP RST);
    a Range request is answered 206 from that byte, unless ``ignore_range`` (then 200, the whole file)."""

    def __init__(self, root: Path, cut: str = "close", cuts: int = 1, ignore_range: bool = False) -> None:
        self.root, self.cut, self.cuts_left, self.ignore_range = root, cut, cuts, ignore_range
        self.requests: list[tuple[str, str | None]] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:       # noqa: N802 (http.server's name)
                asked = self.headers.get("Range")
                site.requests.append((self.path.rsplit("/", 1)[-1], asked))
                path = site.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                start = re.fullmatch(r"bytes=(\d+)-", asked or "")
                if start and not site.ignore_range:
                    body = data[int(start.group(1)):]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start.group(1)}-{len(data) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path.suffix == ".onnx" and site.cuts_left > 0:
                    site.cuts_left -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if site.cut == "reset":     # linger 0: close() sends RST instead of FIN
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cutting(tmp_path):
    sites = []

    def make(**behaviour) -> tuple[CuttingServer, str, str]:
        folder = make_onnx_bundle(tmp_path / "www", version=f"c{len(sites)}")
        sites.append(CuttingServer(tmp_path / "www", **behaviour))
        return sites[-1], f"{sites[-1].base}/onnx-tiny/{folder.name}/", manifest_sha(folder)

    yield make
    for site in sites:
        site.close()


@pytest.mark.parametrize("cut", ["close", "reset"])
def test_a_download_that_breaks_off_mid_file_is_resumed_where_it_broke(cut, tmp_path, cutting):
    # given: a server whose first answer for the model file breaks off halfway
    site, url, sha = cutting(cut=cut)
    # when
    bundle = verify_command_bundle(command(url, sha), tmp_path / "downloads", None, deadline_s=30)
    # then: the rest was asked for from where it broke, and the file installed is whole (load_bundle hashed it)
    model = [r for r in site.requests if r[0] == "model.fp32.onnx"]
    half = bundle.artifacts[0].size // 2
    assert model == [("model.fp32.onnx", None), ("model.fp32.onnx", f"bytes={half}-")]
    assert bundle.artifacts[0].path.stat().st_size == bundle.artifacts[0].size


def test_a_server_that_ignores_range_sends_the_file_again_from_its_start(tmp_path, cutting):
    site, url, sha = cutting(ignore_range=True)
    bundle = verify_command_bundle(command(url, sha), tmp_path / "downloads", None, deadline_s=30)
    assert [r[0] for r in site.requests].count("model.fp32.onnx") == 2 and bundle.version.startswith("c")


def test_a_download_that_keeps_breaking_off_is_refused_after_the_resumes(tmp_path, cutting):
    from agent.update import RESUME_TRIES

    site, url, sha = cutting(cuts=100)
    with pytest.raises(BundleError, match=r"model.fp32.onnx: download broke off \(the connection closed \d+ bytes "
                                          r"short"):
        verify_command_bundle(command(url, sha), tmp_path / "downloads", None, deadline_s=30)
    assert [r[0] for r in site.requests].count("model.fp32.onnx") == 1 + RESUME_TRIES
    assert list((tmp_path / "downloads").iterdir()) == []


def test_signatures_over_http_signed_installs_unsigned_and_forged_are_refused(tmp_path, bundle_server):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    signed = make_onnx_bundle(tmp_path / "src-signed", version="s1")
    (signed / "manifest.json.sig").write_bytes(key.sign((signed / MANIFEST).read_bytes()))
    forged = make_onnx_bundle(tmp_path / "src-forged", version="s2")
    (forged / "manifest.json.sig").write_bytes(Ed25519PrivateKey.generate().sign((forged / MANIFEST).read_bytes()))
    unsigned = make_onnx_bundle(tmp_path / "src-unsigned", version="s3")
    urls = {}
    for folder in (signed, forged, unsigned):      # each the first of its own served tree (--baseline)
        published = publish_bundle(folder, tmp_path / "www" / folder.name, baseline=True)
        urls[folder.name] = (f"{folder.name}/{published.url_path}", published.sha256)
    base = bundle_server(tmp_path / "www")

    def install(version: str):
        path, sha = urls[version]
        return verify_command_bundle(command(f"{base}/{path}", sha), tmp_path / "downloads", key.public_key(),
                                     deadline_s=30)

    assert install("s1").signed
    with pytest.raises(BundleError, match=r"manifest.json.sig: signature does not match"):
        install("s2")
    with pytest.raises(BundleError, match=r"manifest.json.sig: missing, and a public key is configured"):
        install("s3")


def test_prune_installed_keeps_a_bundle_named_by_its_manifest(tmp_path):
    # given: the configured bundle inside the download folder, named as model.bundle may name it (its manifest.json)
    downloads = tmp_path / "downloads"
    configured = make_onnx_bundle(downloads, version="v1")
    newer = [make_onnx_bundle(downloads, version=v) for v in ("v2", "v3")]
    # when: a swap from v2 to v3 cleans up, keeping the configured bundle too
    gone = prune_installed(downloads, [newer[1], newer[0], configured / MANIFEST])
    # then
    assert gone == [] and configured.is_dir()


def test_prune_installed_never_follows_a_link_out_of_the_download_folder(tmp_path):
    # given: in the download folder, a link to the models shipped with the image and a link to a version folder
    shipped = make_onnx_bundle(tmp_path / "opt-models", version="factory")
    downloads = tmp_path / "downloads"
    running = make_onnx_bundle(downloads, version="v3")
    (downloads / "factory-models").symlink_to(shipped.parent, target_is_directory=True)
    (running.parent / "v2").symlink_to(shipped, target_is_directory=True)
    # when: a swap cleans up
    gone = prune_installed(downloads, [running])
    # then: nothing behind a link is touched
    assert gone == [] and (shipped / MANIFEST).is_file() and running.is_dir()


@pytest.mark.parametrize("signature", ["forged", "unsigned"])
def test_a_bad_signature_is_refused_before_any_artifact_byte(signature, tmp_path, plain_server):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    # given: a station with a public key, and a bundle signed by another key (or not at all), no sha256 in the command
    key = Ed25519PrivateKey.generate()
    folder = make_onnx_bundle(tmp_path / "www", version="v2")
    if signature == "forged":
        (folder / "manifest.json.sig").write_bytes(Ed25519PrivateKey.generate().sign((folder / MANIFEST).read_bytes()))
    base, asked = plain_server(tmp_path / "www")
    # when: it is sent
    with pytest.raises(BundleError) as refused:
        fetch_verified(command(f"{base}/onnx-tiny/v2/"), tmp_path / "downloads", key.public_key(), deadline_s=30)
    # then: refused on the manifest's signature, naming its URL, and no artifact was asked for
    assert re.search(r"http://127\.0\.0\.1:\d+/onnx-tiny/v2/manifest\.json\.sig: "
                     + ("signature does not match" if signature == "forged" else "missing"), str(refused.value))
    assert "no artifact fetched" in str(refused.value)
    assert [p for p in asked if p.endswith(".onnx")] == []
    assert list((tmp_path / "downloads").iterdir()) == []


def test_a_refused_download_names_its_url_not_the_removed_download_folder(tmp_path, plain_server):
    # given: a served bundle whose version is not the one the command expects
    make_onnx_bundle(tmp_path / "www", version="v2")
    base, _ = plain_server(tmp_path / "www")
    # when: it is sent
    with pytest.raises(BundleError) as refused:
        fetch_verified(command(f"{base}/onnx-tiny/v2/", version="v3"), tmp_path / "downloads", None, deadline_s=30)
    # then: the reason names the bundle's URL (what the operator sent), not the .incoming-* folder that is gone
    assert str(refused.value).startswith(f"{base}/onnx-tiny/v2/manifest.json: field version: 'v2', the command "
                                         "expects 'v3'")
    assert ".incoming-" not in str(refused.value)


def test_the_stations_manifest_check_refuses_before_any_artifact_byte(tmp_path, plain_server):
    # given: a station whose config sorts "class-7" to a lane, and a served bundle whose labels no longer have it
    make_onnx_bundle(tmp_path / "www", classes=4, version="v2")
    base, asked = plain_server(tmp_path / "www")
    seen = []

    def lanes_covered(manifest: dict, where: str) -> None:
        seen.append(where)
        if "class-7" not in manifest["labels"]:
            raise BundleError(f"{where}: field labels: label 'class-7' (decisions.sorting.lanes) is not in the bundle")

    # when: it is sent
    with pytest.raises(BundleError) as refused:
        fetch_verified(command(f"{base}/onnx-tiny/v2/"), tmp_path / "downloads", None, deadline_s=30,
                       check_manifest=lanes_covered)
    # then: refused on the manifest, naming its URL, with no artifact fetched and nothing left on the disk
    assert str(refused.value).startswith(f"{base}/onnx-tiny/v2/manifest.json: field labels: label 'class-7'")
    assert [p for p in asked if p.endswith(".onnx")] == []
    assert list((tmp_path / "downloads").iterdir()) == []
    # and: the same check runs on a bundle named by its local path (once verified)
    local = make_onnx_bundle(tmp_path / "local", classes=4, version="v3")
    with pytest.raises(BundleError, match=r"label 'class-7'"):
        fetch_verified(command(str(local)), tmp_path / "downloads", None, check_manifest=lanes_covered)
    assert seen == [f"{base}/onnx-tiny/v2/manifest.json", str(local / MANIFEST)]
