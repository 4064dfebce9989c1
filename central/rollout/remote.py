"""The bundle a rollout sends: its manifest and hashes, read from the served tree (HTTP) or a folder."""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlparse

from central.rollout.publish import PUBLISHABLE
from contract import net
from contract.bundle import MANIFEST_MAX_BYTES, BundleError, parse_manifest
from contract.events import GATE_FILE, RolloutError
from contract.messages import loads_finite

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 30       # each read from a bundle server
FETCH_DEADLINE_S = 60      # a whole file (manifest, gate record) from a bundle server: connect, head and body


@dataclass(frozen=True)
class RemoteBundle:
    """A published bundle as stations will fetch it: its location, identity and manifest sha256."""

    location: str
    name: str
    version: str
    sha256: str
    gate: dict[str, Any]

    @property
    def model(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}

    def command(self) -> dict[str, Any]:
        """The cmd/model payload (contract/schemas/mqtt/cmd-model.v1.json)."""
        return {"bundle": self.location, "sha256": self.sha256, "version": self.version}


def _read_location(location: str, rel: str, *, optional: bool = False) -> bytes | None:
    """``rel`` in the bundle at ``location`` (a URL or a folder): at most ``MANIFEST_MAX_BYTES``, and from a URL
    within ``FETCH_DEADLINE_S`` in all; None when ``optional`` and it is not there. RolloutError naming the URL
    or file otherwise."""
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        base = location if location.endswith("/") else location + "/"
        return _fetch(urljoin(base, rel), optional, FETCH_DEADLINE_S)
    if parsed.scheme not in ("", "file"):
        raise RolloutError(f"{location}: unsupported bundle location (a path, file://, http:// or https://)")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else location) / rel
    if not path.exists():
        if optional:
            return None
        raise RolloutError(f"{path}: does not exist")
    try:
        if not path.is_file():          # a folder, a FIFO (a read would wait for ever), a device
            raise RolloutError(f"{path}: not a regular file")
        with open(path, "rb") as fh:
            data = fh.read(MANIFEST_MAX_BYTES + 1)
    except OSError as exc:
        raise RolloutError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MANIFEST_MAX_BYTES:
        raise RolloutError(f"{path}: more than {MANIFEST_MAX_BYTES} bytes, not a manifest or gate record")
    return data


def _fetch(url: str, optional: bool, deadline_s: float) -> bytes | None:
    """``url``'s body, read within ``deadline_s`` in all (name lookup, connect, TLS, head and body), each read within
    ``FETCH_TIMEOUT_S``: a server that trickles its bytes (each read in time), or a name resolver that does not
    answer, cannot hold a rollout for ever."""
    limit = MANIFEST_MAX_BYTES
    with _Deadline(deadline_s) as deadline:
        try:
            with _opener(deadline, url).open(url, timeout=min(FETCH_TIMEOUT_S, deadline_s)) as resp:
                data = bytearray()
                while len(data) <= limit and (chunk := resp.read1(64 * 1024)):
                    data += chunk
                short = len(data) <= limit and bool(resp.length)      # Content-Length not reached
            if deadline.passed:             # the cut socket may read as the body's end
                raise OSError("deadline passed")
            if short:
                raise RolloutError(f"{url}: the answer ended after {len(data)} bytes, {resp.length} short of its "
                                   f"Content-Length")
        except urllib.error.HTTPError as exc:
            if deadline.passed:
                raise deadline.error(url) from None
            if optional and exc.code == 404:
                return None
            raise RolloutError(f"{url}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if deadline.passed:
                raise deadline.error(url) from None
            why = f"not an HTTP answer: {exc!r}" if isinstance(exc, http.client.HTTPException) else exc
            raise RolloutError(f"{url}: cannot fetch ({why})") from exc
    if len(data) > limit:
        raise RolloutError(f"{url}: more than {limit} bytes, not a manifest or gate record")
    return bytes(data)


class _Deadline:
    """Shuts the watched connection's socket down once ``seconds`` have passed, so a read blocked in it (the TLS
    handshake, a proxy's answer to CONNECT, the answer's head, its body) ends then, however the server paces its
    bytes. The name lookup and the connect are bounded by what is left of ``seconds`` too (``_connect``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self._own: socket.socket | None = None      # a duplicate of the watched socket's descriptor, ours alone
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.end

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._release()

    def watch(self, sock: socket.socket) -> None:
        """Cut ``sock``'s connection at the deadline, plain or TLS (urllib lets go of the socket once the head is
        in; the answer reads on through it). Through a descriptor of our own: the connection closes its own when
        it likes, and a cut never reaches a descriptor number reused meanwhile."""
        with self._lock:
            self._release()
            self._own = socket.socket(fileno=os.dup(sock.fileno()))
        if self.passed:
            self._cut()

    def _release(self) -> None:
        if self._own is not None:
            self._own.close()
            self._own = None

    def _cut(self) -> None:
        with self._lock:
            if self._own is not None:
                try:
                    self._own.shutdown(socket.SHUT_RDWR)     # the TCP connection itself: a blocked read ends
                except OSError:             # already gone
                    pass

    def error(self, url: str) -> RolloutError:
        return RolloutError(f"{url}: not read in full within {self.seconds:g} s (the server sends too slowly or "
                            f"has stalled)")


def _connect(deadline: _Deadline, url: str, address: tuple[str, int], timeout: Any = None,
             source_address: Any = None) -> socket.socket:
    """``socket.create_connection`` (what http.client calls, for the URL's host or a proxy) within ``deadline``: the
    name looked up (``_lookup``) and each address tried for what is left of it, and the connection watched from the
    moment it is made. http.client keeps the name it was given for the Host header, the TLS server name and the
    certificate check."""
    host, port = address

    def left() -> float:
        wait = deadline.end - time.monotonic()
        if wait <= 0:
            raise deadline.error(url)
        return wait

    return net.connect_within(host, _lookup(host, port, deadline, url), left, timeout, source_address,
                              deadline.watch)


def _lookup(host: str, port: int, deadline: _Deadline, url: str) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo`` for ``host`` within ``deadline`` (``contract.net.resolve_within``: a lookup left behind
    ends when the resolver gives up; a rollout makes a few lookups at most). An IP address is read as one."""
    try:
        return net.resolve_within(host, port, deadline.end - time.monotonic())
    except net.LookupTimeout:
        raise RolloutError(f"{url}: host {host!r} did not resolve in time: no answer from the name resolver within "
                           f"{deadline.seconds:g} s") from None


def _opener(deadline: _Deadline, url: str) -> urllib.request.OpenerDirector:
    """urllib's opener (proxies from the environment, redirects, verified TLS) whose connections are made within
    ``deadline`` and watched by it from the moment they are made (``_connect``)."""
    connect = functools.partial(_connect, deadline, url)

    class Watched(http.client.HTTPConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class WatchedTLS(http.client.HTTPSConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class Plain(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Watched, req)

    class TLS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(WatchedTLS, req, context=self._context)

    return urllib.request.build_opener(Plain, TLS)


def resolve_bundle(location: str) -> RemoteBundle:
    """Read a published bundle's manifest and gate record where stations will fetch it.

    Refuses a version the gate rejected, one without a gate record (not published by
    ``central publish``), and one whose manifest changed after the gate. A relative path is made absolute
    here: sent as it is, each station would look for it in its own working folder.
    """
    if not urlparse(location).scheme:
        location = os.path.abspath(location)
    raw = _read_location(location, "manifest.json")
    assert raw is not None
    try:
        manifest = parse_manifest(raw, f"{location}: manifest.json")       # the schema a station checks
        name, version = manifest["name"], manifest["version"]
    except BundleError as exc:
        raise RolloutError(str(exc)) from exc
    sha = hashlib.sha256(raw).hexdigest()
    gate_raw = _read_location(location, GATE_FILE, optional=True)
    if gate_raw is None:
        raise RolloutError(f"{location}: no {GATE_FILE}; roll out only bundles published by "
                           "'python -m central publish'")
    try:
        gate = loads_finite(gate_raw)
    except ValueError as exc:
        raise RolloutError(f"{location}{GATE_FILE}: not valid JSON ({exc})") from exc
    if not isinstance(gate, dict):
        raise RolloutError(f"{location}{GATE_FILE}: expected a JSON object, got {type(gate).__name__}")
    if gate.get("decision") not in PUBLISHABLE:
        raise RolloutError(f"{location}: {name} {version} was {gate.get('decision')} by the retrain gate "
                           f"({gate.get('reason')}); it is never rolled out")
    if gate.get("manifest_sha256") != sha:
        raise RolloutError(f"{location}: manifest.json (sha256 {sha}) is not the one the gate decided on "
                           f"({gate.get('manifest_sha256')})")
    return RemoteBundle(location, name, version, sha, gate)


def sibling_location(location: str, version: str) -> str:
    """The same model's ``version`` in the same served tree (``<root>/<name>/<version>/``)."""
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        base = location if location.endswith("/") else location + "/"
        return urljoin(base, f"../{version}/")
    return str(Path(unquote(parsed.path) if parsed.scheme == "file" else location).parent / version)
