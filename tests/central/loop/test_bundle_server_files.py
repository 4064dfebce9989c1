"""The bundle server's file answers and its shutdown, on a real ``BundleServer`` (uvicorn on a localhost port).

Each answer is read from the file descriptor opened when the request came in, by the server's own response built
on Starlette's public ``Response``/``StreamingResponse`` (before: an override of ``FileResponse._open_file``, a
private Starlette method that an upgrade could change or remove without a word). Starlette's ``FileResponse`` is
the reference its answers are compared with, header for header and byte for byte, for whole files, HEAD, one
range, several ranges (multipart/byteranges), ``If-Range``, 304 and refused ranges. Stopping the server while
clients hold stalled downloads (they asked for a large file and never read) ends them quietly: before, uvicorn
cancelled their tasks after its 2 s grace and logged a CancelledError traceback per download.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from rollout_support import REPO, wait_until

from central.http import Served
from central.rollout import BundleServer

SIZE = 300_000                   # several 64 KiB chunks, not a multiple of one
STALLED_FILE = 32 * 1024 * 1024  # more than the kernel's socket buffers hold for a client that reads nothing


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A served tree with a binary artifact and a JSON file, the server on it and a client of it, and beside them
    Starlette's own ``FileResponse`` on uvicorn (``reference``): what the bundle server answered through before."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse
    from starlette.routing import Route

    root = tmp_path_factory.mktemp("bundle-files")
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.onnx").write_bytes(os.urandom(SIZE))
    (root / "m" / "index.json").write_text('{"versions": {"1": {"path": "1/"}}}')

    async def file(request):
        return FileResponse(root / request.path_params["name"])

    server = BundleServer(root).start()
    starlette = Served(Starlette(routes=[Route("/{name:path}", file, methods=["GET", "HEAD"])]), "127.0.0.1", 0,
                       name="reference").start()
    client = httpx.Client(base_url=server.url.rstrip("/"), timeout=30)
    reference = httpx.Client(base_url=starlette.url.rstrip("/"), timeout=30)
    yield root, client, reference
    client.close()
    reference.close()
    server.stop()
    starlette.stop()


def parts(response: httpx.Response) -> list[tuple[str, str, bytes]]:
    """A multipart/byteranges body as (Content-Type, Content-Range, bytes) per part."""
    boundary = re.fullmatch(r"multipart/byteranges; boundary=(\w+)", response.headers["content-type"]).group(1)
    body = response.content
    assert body.endswith(f"--{boundary}--".encode())
    found = []
    for chunk in body[:-len(f"--{boundary}--")].split(f"--{boundary}\r\n".encode())[1:]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n"))
        assert data.endswith(b"\r\n")
        found.append((fields["Content-Type"], fields["Content-Range"], data[:-2]))
    return found


RANGES = ["bytes=0-0", "bytes=0-99", f"bytes={SIZE - 10}-", "bytes=-100", f"bytes=100-{SIZE + 500}",
          "bytes= 1 - 3", "BYTES=7-70000", "bytes=0-9,20-29", "bytes=0-9,5-14", "bytes=0-9,10-19",
          "bytes=-5,0-4,100-199", f"bytes=0-65535,65536-{SIZE - 1}", "bytes=0-9,x-3,,-,20-29",
          # refused: another unit, nothing parseable, an end before its start, a start past the end
          "items=0-5", "bytes=abc", "bytes=", "bytes=5-2", "bytes=0-9,30-20", f"bytes={SIZE}-", "bytes=-0",
          f"bytes=0-9,{SIZE + 1}-"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("wanted", RANGES)
def test_a_range_is_answered_as_starlettes_file_response_answers_it(tree, wanted, method):
    root, client, reference = tree
    mine = client.request(method, "/m/1/model.onnx", headers={"Range": wanted})
    theirs = reference.request(method, "/m/1/model.onnx", headers={"Range": wanted})
    assert mine.status_code == theirs.status_code, (wanted, mine.text[:200], theirs.text[:200])
    if mine.status_code >= 400:
        if method == "GET":
            assert "header Range" in mine.json()["error"] and repr(wanted)[:20] in mine.json()["error"]
        assert mine.headers.get("content-range") == theirs.headers.get("content-range")
        return
    for field in ("content-length", "content-range", "etag", "last-modified", "accept-ranges"):
        assert mine.headers.get(field) == theirs.headers.get(field), (wanted, field)
    if method == "HEAD":
        assert mine.content == b""
    elif mine.headers["content-type"].startswith("multipart/byteranges"):
        assert parts(mine) == parts(theirs) and int(mine.headers["content-length"]) == len(mine.content)
    else:
        assert mine.headers["content-type"] == theirs.headers["content-type"] and mine.content == theirs.content


@pytest.mark.parametrize("name", ["m/1/model.onnx", "m/index.json"])
def test_a_whole_file_its_validators_and_a_conditional_request_are_starlettes(tree, name):
    root, client, reference = tree
    mine, theirs = client.get(f"/{name}"), reference.get(f"/{name}")
    assert mine.status_code == 200 and mine.content == theirs.content == (root / name).read_bytes()
    for field in ("content-type", "content-length", "etag", "last-modified", "accept-ranges"):
        assert mine.headers[field] == theirs.headers[field], field
    etag, modified = mine.headers["etag"], mine.headers["last-modified"]
    for condition in ({"If-None-Match": etag}, {"If-None-Match": f'"other", W/{etag}'}, {"If-None-Match": "*"},
                      {"If-Modified-Since": modified}):
        answer = client.get(f"/{name}", headers=condition)
        assert answer.status_code == 304 and answer.content == b"" and answer.headers["etag"] == etag, condition
    assert client.get(f"/{name}", headers={"If-None-Match": '"other"'}).status_code == 200
    # If-Range: the range only while the file is the one the client has (its ETag or date), else all of it
    for validator, status in ((etag, 206), (modified, 206), ('"other"', 200), (f"W/{etag}", 200)):
        answer = client.get(f"/{name}", headers={"Range": "bytes=0-4", "If-Range": validator})
        assert answer.status_code == status, validator
        assert answer.content == (root / name).read_bytes()[:5 if status == 206 else None]


def test_the_bundle_servers_starlette_classes_shadow_no_private_starlette_name(tmp_path):
    """The server's own subclasses of Starlette classes override no private (``_name``) attribute of them. The file
    answer overrode ``FileResponse._open_file`` (private, marked "remove once AnyIO ...") to read the file opened at
    the request: an upgrade that renamed it would have gone back to opening the file by name, torn answers and all,
    without an error. A Starlette release that adds a private name one of our subclasses uses fails here too."""
    import starlette
    from starlette.responses import Response
    from starlette.staticfiles import StaticFiles

    from central.rollout.publish import bundle_app

    def subclasses(cls: type) -> set[type]:
        return {cls}.union(*(subclasses(sub) for sub in cls.__subclasses__()))

    bundle_app(tmp_path)            # makes its classes (they import Starlette only when a server is built)
    ours = [c for c in subclasses(Response) | subclasses(StaticFiles) if c.__module__ == "central.rollout.publish"]
    assert {c.__name__ for c in ours} >= {"OpenedFile", "PublishedFiles"}
    shadowed = sorted({f"{c.__qualname__}.{name} over {base.__module__}.{base.__qualname__}.{name}"
                       for c in ours for name in vars(c) if name.startswith("_") and not name.endswith("__")
                       for base in c.__mro__[1:] if base.__module__.startswith("starlette") and name in vars(base)})
    assert shadowed == [], f"Starlette {starlette.__version__}: private Starlette names overridden: {shadowed}"


def read_head(sock: socket.socket) -> tuple[dict[str, str], bytes]:
    """The answer's head (fields, lower-case) and what came of its body with it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 2"), lines[0]
    return {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}, body


@pytest.mark.parametrize("wanted", [None, "bytes=1000-3000000", "bytes=0-9,100000-3999999"])
def test_a_file_renamed_over_during_its_download_is_sent_whole_from_the_file_it_opened(tmp_path, wanted):
    """Given a 4 MiB download whose client has taken only the head (4 kB receive buffer: the server is part way
    through the file, waiting), when a publish renames another file over it, then the rest of the body is still
    the first file's, to its last byte, and the next request gets the new file."""
    root = tmp_path / "served"
    (root / "m").mkdir(parents=True)
    old, new = os.urandom(4 * 1024 * 1024), os.urandom(4 * 1024 * 1024 + 12345)
    (root / "m" / "model.onnx").write_bytes(old)
    server = BundleServer(root).start()
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(30)
            sock.connect(("127.0.0.1", server.port))
            extra = f"Range: {wanted}\r\n" if wanted else ""
            sock.sendall(f"GET /m/model.onnx HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode())
            headers, body = read_head(sock)
            (root / "m" / ".new").write_bytes(new)
            os.replace(root / "m" / ".new", root / "m" / "model.onnx")     # as a publish renames index.json
            while chunk := sock.recv(65536):
                body += chunk
        assert len(body) == int(headers["content-length"])
        if wanted is None:
            assert body == old
        elif "," not in wanted:
            assert headers["content-range"] == f"bytes 1000-3000000/{len(old)}" and body == old[1000:3000001]
        else:
            assert f"Content-Range: bytes 0-9/{len(old)}\r\n\r\n".encode() + old[:10] + b"\r\n" in body
            assert f"Content-Range: bytes 100000-3999999/{len(old)}\r\n\r\n".encode() + old[100000:4000000] in body
        assert httpx.get(f"{server.url}m/model.onnx", timeout=30).content == new     # the next request: the new
    finally:
        server.stop()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def stalled_downloads(port: int, count: int) -> list[socket.socket]:
    """``count`` clients that ask for the large file, take the answer's head and then read nothing (4 kB receive
    buffers): their downloads are under way and stay so."""
    clients = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /m/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(12).startswith(b"HTTP/1.1 200")
        clients.append(sock)
    return clients


def served_tree_with_a_large_file(tmp_path: Path) -> Path:
    root = tmp_path / "served"
    (root / "m").mkdir(parents=True)
    with open(root / "m" / "big.bin", "wb") as out:
        out.truncate(STALLED_FILE)          # sparse: read as zeros, nothing written to disk
    return root


def test_stopping_the_server_cuts_stalled_downloads_quietly_in_one_line(tmp_path, caplog):
    """Given three clients that asked for a 32 MiB file and read nothing, when the server is stopped (uvicorn's
    shutdown, as on SIGINT/SIGTERM), then each download is cut at once, one INFO line says how many, uvicorn logs
    no error (before: "Cancel 3 running task(s), timeout graceful shutdown exceeded" after a 2 s wait, then an
    "Exception in ASGI application" CancelledError traceback per download), and every file the answers opened is
    closed."""
    root = served_tree_with_a_large_file(tmp_path)
    before = len(os.listdir("/proc/self/fd"))
    server = BundleServer(root).start()
    records = Records()
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(records)
    clients = stalled_downloads(server.port, 3)
    try:
        with caplog.at_level(logging.INFO, logger="central.rollout.publish"):
            server.stop()
        assert not server._thread.is_alive()
    finally:
        uvicorn_log.removeHandler(records)
        for sock in clients:
            sock.close()
    errors = [r.getMessage() for r in records.records if r.levelno >= logging.WARNING or r.exc_info]
    assert errors == [], errors
    lines = [r.getMessage() for r in caplog.records if r.name == "central.rollout.publish"]
    assert lines == ["bundle server stopped: 3 download(s) under way cut (a station resumes its download with a "
                     "Range request)"], lines
    assert server.cut_at_shutdown == {"downloads": 3}
    wait_until(lambda: len(os.listdir("/proc/self/fd")) <= before, 30, "every file and socket to be closed")


def test_serve_bundles_stopped_by_sigterm_with_stalled_downloads_says_one_line_and_no_error(tmp_path):
    """``python -m central serve-bundles`` stopped as compose and systemd stop it (SIGTERM) while two clients hold
    stalled downloads: one line naming the cut downloads, no ERROR line (before: uvicorn's "Cancel 2 running
    task(s), timeout graceful shutdown exceeded" after a 2 s wait)."""
    root = served_tree_with_a_large_file(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "central", "serve-bundles", "--root", str(root), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clients: list[socket.socket] = []
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"at http://127\.0\.0\.1:(\d+)/", line).group(1))
        clients = stalled_downloads(port, 2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        for sock in clients:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "ERROR" not in err and "Traceback" not in err, err
    assert "bundle server stopped: 2 download(s) under way cut" in err, err
