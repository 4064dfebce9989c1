"""Model update commands: fetch a bundle named by path or URL, check it, load it.

A bundle URL points at the bundle folder; manifest.json (and manifest.json.sig
when present) and every artifact the manifest lists are fetched relative to it.
The sha256 in the command is of manifest.json, which in turn pins every
artifact's sha256, so one hash covers the whole bundle.

A download is bounded, whatever the server does: the manifest is at most
``MANIFEST_MAX_BYTES`` and its hash is checked against the command before any
artifact is fetched; each artifact stops at the size the manifest declares (one
byte more and the bundle is refused); and the whole fetch has one deadline
(``FETCH_DEADLINE_S``), so a server that drips a byte every few seconds holds the
command thread until the deadline, not for as long as it likes. A connection still open at the deadline is shut
down whatever it is reading (``_Cutoff``): header lines sent one at a time, or ``100 Continue`` answers without end,
are cut off there too, and so are a TLS handshake sent a few bytes at a time and an HTTPS proxy's slow answer to
CONNECT (the connection is watched from the moment it is made).
The host's name is looked up within the same deadline (``_resolve``): a resolver that does not answer (no DNS
server reachable) refuses the command at the deadline, naming the URL, instead of holding the command thread for as
long as the lookup takes. The connection then goes to the address found, while the request's Host header and, for
HTTPS, the TLS server name and the certificate check stay on the URL's name.

A connection that breaks off in the middle of an artifact (reset, stalled for ``FETCH_TIMEOUT_S``, closed short
of its Content-Length) is taken up where it broke with a Range request, ``RESUME_TRIES`` times at most, within
the one deadline; a server that ignores Range sends the file from its start again.

With a public key configured (``model.public_key``), manifest.json.sig is fetched and checked right after the
manifest, before any artifact: an unsigned bundle, or one signed by another key, costs two small files.

The disk is bounded too: before the first artifact byte, the sizes the manifest declares must fit in the
download folder's free space with ``DISK_RESERVE_BYTES`` to spare (the outbox shares that disk: a download
that filled it would lose results); and what a download killed with the process left (``.incoming-*``) is
removed before the next one starts, so it cannot keep every later update from finding room.

A power cut at any step leaves the running bundle and the one before it whole: every file of a download is
synced to disk before it is installed (one rename), so the state file never names a bundle whose bytes are still
in the page cache; the running bundle sent again is not reinstalled over itself (its folder is never moved away);
another bundle of the same name and version replaces the installed one in one step (``renameat2`` with
``RENAME_EXCHANGE``; two renames, logged, where the file system refuses it), so ``<name>/<version>`` is never
missing; and an installed bundle that is cleaned up is first renamed to ``.old-*`` (removed by the next download or
clean-up), so a clean-up cut short never leaves a version folder that lost its manifest.json but kept its model.

Only what cmd/model installed is ever removed: each version it installs carries ``INSTALLED_MARK`` (the sha256
of its manifest.json), written before the rename that publishes the folder, and the clean-up after a swap
(``prune_installed``) removes a ``<name>/<version>/`` folder only when its mark names its manifest. Anything else
in the download folder (bundles copied there by hand, versions installed before the mark existed, a folder whose
manifest was replaced by hand) is left alone and logged once, naming it; cmd/model does not install over such a
folder either. Disk stays bounded: what cmd/model installs is marked and pruned to the kept bundles, and what it
leaves alone it never adds to.

An artifact's manifest path is a file path: it is quoted into the URL (a space, ``#``, ``?`` or ``%`` in a
file name is fetched as that file, and a path never names another host).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote, unquote, urljoin, urlparse

from contract import net
from contract.bundle import (
    MANIFEST,
    MANIFEST_MAX_BYTES,
    NAME_PATTERN,
    SIGNATURE,
    SIGNATURE_MAX_BYTES,
    Bundle,
    BundleError,
    load_bundle,
    parse_manifest,
)
from contract.events import fsync_dir
from contract.messages import loads_finite

log = logging.getLogger(__name__)
FETCH_TIMEOUT_S = 60            # one read; a server silent this long is given up on
FETCH_DEADLINE_S = 600          # the whole bundle: manifest, signature and every artifact
COMMAND_MAX_BYTES = 64 * 1024   # a cmd/model payload is a location, a hash and a version
READ_CHUNK = 64 * 1024
RESOLVE_MAX_PENDING = 4         # host name lookups past their deadline that may still run (a thread each) before a
                                # download of a named host is refused without another lookup; IP addresses still work
RESUME_TRIES = 3                # an artifact's download that breaks off is resumed (HTTP Range) this often at most
DISK_RESERVE_BYTES = 128 << 20  # what a download leaves free on its disk for the outbox, the state file and the logs
INCOMING = ".incoming-"         # a download being verified: .incoming-<pid>-<version>-<random>
INSTALLED_MARK = ".installed-by-cmd-model"  # in each version folder cmd/model installed: {"manifest_sha256": ...}
INSTALLED_MARK_MAX_BYTES = 4096
AT_FDCWD = -100                 # renameat2: paths relative to the working directory (absolute ones: as they are)
RENAME_EXCHANGE = 2             # renameat2: swap two existing paths in one step (Linux 3.15+, glibc 2.28+)
LEFT_ALONE_MAX = 4096           # folders whose "left alone" was logged (once each), remembered at most
_left_alone: set[Path] = set()  # installed-looking folders prune_installed found that are not cmd/model's (logged)
_left_alone_lock = threading.Lock()
_fetching: set[Path] = set()    # this process's .incoming-* folders not yet installed or discarded
_fetching_lock = threading.Lock()
_LOOKUPS = net.Lookups(RESOLVE_MAX_PENDING)     # lookups left running past their deadline (_resolve), a thread each
# the station's own checks of a downloaded manifest (parsed, its URL), run before any artifact is fetched: raises
# BundleError or ConfigError naming the URL and the field (e.g. labels that no longer cover the config's lanes)
ManifestCheck = Callable[[dict[str, Any], str], None]


@dataclass(frozen=True)
class ModelCommand:
    bundle: str
    sha256: str | None
    version: str | None

    @classmethod
    def parse(cls, payload: bytes) -> "ModelCommand":
        """The command's fields, each checked for type and form; BundleError names the field."""
        if len(payload) > COMMAND_MAX_BYTES:
            raise BundleError(f"cmd/model: payload of {len(payload)} bytes, more than {COMMAND_MAX_BYTES}")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BundleError(f"cmd/model: payload is not UTF-8 (byte {exc.start}: {exc.reason})") from None
        try:
            data: Any = loads_finite(text)
        except (ValueError, RecursionError) as exc:     # not JSON, NaN or 1e999
            raise BundleError(f"cmd/model: payload is not JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise BundleError(f"cmd/model: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"bundle", "sha256", "version"})
        if unknown:         # a misspelt "sha256" would otherwise install whatever the location serves, unchecked
            raise BundleError(f"cmd/model: field {unknown[0][:40]!r}: not a field of cmd/model (bundle, sha256, "
                              "version)")
        location = data.get("bundle")
        if not isinstance(location, str) or not location or "\x00" in location or len(location) > 2048:
            raise BundleError("cmd/model: field bundle: expected a bundle path or URL string")
        sha = data.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
            raise BundleError("cmd/model: field sha256: expected the 64-hex sha256 of manifest.json")
        version = data.get("version")
        if version is not None and (not isinstance(version, str) or not NAME_PATTERN.fullmatch(version)):
            raise BundleError(f"cmd/model: field version: expected a bundle version such as '20240601-1200', "
                              f"got {str(version)[:80]!r}")
        try:
            parsed = urlparse(location)
        except ValueError as exc:             # e.g. 'http://[::1' (an unclosed IPv6 host)
            raise BundleError(f"cmd/model: field bundle: {location[:200]!r} is not a URL ({exc})") from exc
        if parsed.scheme in ("http", "https") and not parsed.hostname:
            raise BundleError(f"cmd/model: field bundle: {location[:200]!r} names no host")
        return cls(location, sha.lower() if sha else None, version)


class _Deadline:
    """The one deadline of a bundle fetch; each read waits at most what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self, url: str) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise BundleError(f"{url}: bundle download not finished within its {self.seconds:g} s deadline")
        return left


class _Cutoff:
    """Shuts one request's connections down when the fetch's deadline passes. A read timeout bounds each read only,
    and http.client reads a response's header lines, and any number of ``100 Continue`` answers before it, one
    read at a time: a server that sends them slowly would hold the command thread far past the deadline.
    Its connections are opened by ``connect``: the host's name looked up, and each address tried, within the
    deadline too, and each connection is watched from the moment it is made, through a copy of its socket
    (``_watch_copy``): what is read before http.client hands the connection over, a proxy's answer to CONNECT and
    the TLS handshake (on the socket ``wrap_socket`` makes of it), is cut at the deadline as well."""

    def __init__(self, deadline: _Deadline, url: str) -> None:
        self._deadline, self._url = deadline, url
        self._sockets: list[socket.socket] = []
        self._copies: list[socket.socket] = []      # connect's copies of its sockets: ours to close (__exit__)
        self._lock = threading.Lock()
        self._cut = False
        self._timer = threading.Timer(max(0.0, deadline.at - time.monotonic()), self._shut)
        self._timer.daemon = True
        self.opener = urllib.request.build_opener(_CutHTTPHandler(self), _CutHTTPSHandler(self))

    def connect(self, address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> socket.socket:
        """``socket.create_connection`` (what http.client calls, for the URL's host or a proxy) within the deadline:
        http.client keeps the name it was given for the Host header, the TLS server name and the certificate check."""
        host, port = address
        return net.connect_within(host, _resolve(host, port, self._deadline, self._url),
                                  lambda: self._deadline.left(self._url), timeout, source_address, self._watch_copy)

    def _watch_copy(self, sock: socket.socket) -> None:
        """Watch the connection through a descriptor of our own: a shutdown acts on the connection itself, so it ends
        a read blocked on any socket of it (the TLS one that ``wrap_socket`` makes of ``sock``), and our copy's number
        is never one the connection closed and the process reused meanwhile."""
        copy = socket.socket(fileno=os.dup(sock.fileno()))
        with self._lock:
            self._copies.append(copy)
        self.watch(copy)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            cut = self._cut
        if cut:
            _shut_down(sock)

    def _shut(self) -> None:
        with self._lock:        # held: a copy is not closed (its number reused) while it is shut down
            self._cut = True
            for sock in self._sockets:
                _shut_down(sock)

    def __enter__(self) -> "_Cutoff":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for copy in self._copies:
                copy.close()
            self._copies.clear()


def _resolve(host: str, port: int, deadline: _Deadline, url: str) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo`` for ``host`` within the deadline (``contract.net.resolve_within``): a lookup left
    behind when the deadline passes first ends when the resolver gives up; while ``RESOLVE_MAX_PENDING`` are left
    behind, a name is refused without a lookup. An IP address is read as one, without a thread or a resolver."""
    try:
        return net.resolve_within(host, port, deadline.left(url), _LOOKUPS)
    except net.LookupBacklog as exc:
        raise BundleError(f"{url}: host {host!r} not looked up: {exc} (an IP address in the URL does not need "
                          "one)") from None
    except net.LookupTimeout:
        raise BundleError(f"{url}: host {host!r} did not resolve in time: no answer from the name resolver within "
                          f"the download's {deadline.seconds:g} s deadline") from None


def _shut_down(sock: socket.socket) -> None:
    """A read blocked on ``sock`` returns at once (end of stream)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watched(connection: type[http.client.HTTPConnection], cutoff: _Cutoff) -> type[http.client.HTTPConnection]:
    class Watched(connection):       # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = cutoff.connect        # the name looked up within the deadline too

        def connect(self) -> None:
            super().connect()
            cutoff.watch(self.sock)

    return Watched


class _CutHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, cutoff: _Cutoff) -> None:
        super().__init__()
        self._cutoff = cutoff

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_watched(http_class, self._cutoff), req, **kwargs)


class _CutHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, cutoff: _Cutoff) -> None:
        super().__init__()
        self._cutoff = cutoff

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_watched(http_class, self._cutoff), req, **kwargs)


class _Broken(Exception):
    """A response whose body broke off before its end: the connection reset or stalled, or it closed short of
    the Content-Length it announced. ``got``: the bytes of the file on disk so far."""

    def __init__(self, got: int, why: BaseException | str) -> None:
        super().__init__(str(why))
        self.got, self.why = got, why


def _download(url: str, dest: Path, max_bytes: int, deadline: _Deadline, *, optional: bool = False,
              exact: bool = False) -> bool:
    """``url`` into ``dest``, refused as soon as more than ``max_bytes`` arrive or the deadline passes.

    ``exact``: the artifact must be exactly ``max_bytes`` long (the manifest's size). Its download is taken up
    where it broke off (an HTTP Range request) up to ``RESUME_TRIES`` times, within the same deadline: one reset
    connection in the middle of a large model does not refuse the update."""
    got, resumes = 0, 0
    try:
        with open(dest, "wb") as fh:
            while True:
                try:
                    got = _receive(url, fh, got, max_bytes, deadline)
                    break
                except _Broken as broken:
                    got = broken.got
                    if not exact or resumes >= RESUME_TRIES:
                        raise broken.why if isinstance(broken.why, BaseException) else broken
                    resumes += 1
                    log.warning("%s: download broke off at %d of %d bytes (%s); resuming from there (%d of %d)",
                                url, got, max_bytes, broken, resumes, RESUME_TRIES)
            fh.flush()
            os.fsync(fh.fileno())       # on disk before the bundle is installed and the state file names it
    except urllib.error.HTTPError as exc:
        if optional and exc.code == 404:
            dest.unlink(missing_ok=True)        # no file: not an empty one (an unsigned bundle has no .sig)
            return False
        raise BundleError(f"{url}: download failed (HTTP {exc.code})") from exc
    except TimeoutError as exc:
        raise BundleError(f"{url}: download stalled ({exc}); {got} bytes received") from exc
    except _Broken as exc:
        raise BundleError(f"{url}: download broke off ({exc}); {got} bytes received") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        deadline.left(url)      # what the cut-off at the deadline ended (_Cutoff) is refused as that
        raise BundleError(f"{url}: download failed ({exc})") from exc
    if exact and got != max_bytes:
        raise BundleError(f"{url}: {got} bytes received, the manifest says {max_bytes} (truncated)")
    return True


def _receive(url: str, fh: Any, start: int, max_bytes: int, deadline: _Deadline) -> int:
    """One request: the file from byte ``start`` (a Range request when not 0) appended to ``fh``; the bytes of the
    file written when the response's body ended whole. ``_Broken`` when it broke off."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    timeout = min(FETCH_TIMEOUT_S, deadline.left(url))
    with _Cutoff(deadline, url) as cutoff, cutoff.opener.open(request, timeout=timeout) as resp:
        got = _resume_offset(url, resp, start) if start else 0
        fh.seek(got)
        fh.truncate()
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and got + int(declared) > max_bytes:
            raise BundleError(f"{url}: server announces {got + int(declared)} bytes, more than the {max_bytes} "
                              "expected")
        while True:
            deadline.left(url)
            try:
                block = resp.read1(READ_CHUNK)
            except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
                raise _Broken(got, exc) from exc
            if not block:
                break
            got += len(block)
            if got > max_bytes:
                raise BundleError(f"{url}: more than the {max_bytes} bytes expected; download stopped")
            fh.write(block)
        if resp.length:         # closed before the Content-Length it announced
            raise _Broken(got, f"the connection closed {resp.length} bytes short of the {declared} announced")
    return got


def _resume_offset(url: str, resp: Any, start: int) -> int:
    """Where a resumed response's body goes in the file: ``start`` for the range asked for, 0 for a server that
    sends the whole file again (200: Range is optional for a server)."""
    if resp.status == 200:
        return 0
    found = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (resp.headers.get("Content-Range") or "").strip())
    if resp.status != 206 or found is None or int(found.group(1)) != start:
        raise BundleError(f"{url}: asked to resume at byte {start}, the server answered {resp.status} "
                          f"{resp.headers.get('Content-Range')!r}")
    return start


def fetch_bundle(location: str, download_dir: Path, version: str | None, *, sha256: str | None = None,
                 deadline_s: float = FETCH_DEADLINE_S, public_key: Any | None = None,
                 check_manifest: ManifestCheck | None = None) -> Path:
    """A local bundle folder for a path, file:// URL or http(s):// URL.

    For a URL: ``sha256`` (of manifest.json), with ``public_key`` the manifest's signature, and ``check_manifest``
    (the station's own checks of a manifest, e.g. that its labels cover the config's decisions) are checked before
    any artifact is fetched, and the whole download must finish within ``deadline_s``."""
    try:
        parsed = urlparse(location)
    except ValueError as exc:
        raise BundleError(f"{location[:200]!r}: not a bundle path or URL ({exc})") from exc
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) if parsed.scheme == "file" else location)
    if parsed.scheme not in ("http", "https"):
        raise BundleError(f"{location}: unsupported bundle URL scheme {parsed.scheme!r} (path, file, http, https)")
    if version is not None and not NAME_PATTERN.fullmatch(version):
        raise BundleError(f"{location}: version {version[:80]!r} is not a bundle version")
    base = location if location.endswith("/") else location + "/"
    # Into a fresh folder: a bundle already installed under this version (maybe the running one) stays
    # intact until the new copy is verified (install_bundle).
    with _fetching_lock:
        for gone in _sweep_leftovers(download_dir):
            log.warning("removed %s: left by a download that did not finish (the process ended)", gone)
        try:
            download_dir.mkdir(parents=True, exist_ok=True)
            target = Path(tempfile.mkdtemp(prefix=f"{INCOMING}{os.getpid()}-{version or 'bundle'}-",
                                           dir=download_dir))
        except OSError as exc:
            raise BundleError(f"{download_dir}: cannot make a download folder ({exc.strerror or exc})") from exc
        _fetching.add(target.resolve())
    try:
        _fetch_into(base, target, sha256, _Deadline(deadline_s), public_key, check_manifest)
    except BaseException:
        _drop(target)
        raise
    return target


def _drop(incoming: Path) -> None:
    """A download folder that is refused goes; it is no longer this process's."""
    shutil.rmtree(incoming, ignore_errors=True)
    _release(incoming)


def _release(incoming: Path) -> None:
    with _fetching_lock:
        _fetching.discard(incoming.resolve())


def _leftover(entry: Path) -> bool:
    """Whether ``entry`` is what an install or a download left when its process ended: ``.old-*``, and
    ``.incoming-*`` that is neither this process's (fetched, not yet installed or refused: ``_fetching``) nor
    another running process's."""
    if entry.is_symlink() or not entry.is_dir():
        return False
    if entry.name.startswith(".old-"):
        return True
    if not entry.name.startswith(INCOMING):
        return False
    pid = entry.name[len(INCOMING):].split("-", 1)[0]
    if entry.resolve() in _fetching:
        return False
    if pid.isdigit() and int(pid) != os.getpid():
        from contract.bundle import process_runs

        return not process_runs(int(pid))
    return True         # this process's own (none is being written: checked above), or of the older name form


def _own_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not path.name.startswith(".")


def _sweep_leftovers(download_dir: Path) -> list[Path]:
    try:
        found = [e for e in download_dir.iterdir() if _leftover(e)]
    except OSError:
        return []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def _check_room(target: Path, manifest: dict[str, Any], manifest_url: str) -> None:
    """The artifacts the manifest declares fit on the download disk, ``DISK_RESERVE_BYTES`` to spare."""
    need = sum({entry["path"]: entry["size"] for entry in manifest["artifacts"]}.values()) + SIGNATURE_MAX_BYTES
    try:
        free = shutil.disk_usage(target).free
    except OSError as exc:
        raise BundleError(f"{target.parent}: cannot read its free space ({exc.strerror or exc})") from exc
    if need + DISK_RESERVE_BYTES > free:
        raise BundleError(f"{manifest_url}: the bundle's files need {need} bytes, and {target.parent} has {free} "
                          f"free of which {DISK_RESERVE_BYTES} stay for the station (outbox, state, logs); "
                          "no artifact fetched")


def _check_signature(signature: Path | None, manifest: bytes, public_key: Any | None, signature_url: str,
                     manifest_url: str) -> None:
    """With a public key, the manifest's signature is checked as soon as both are here: a bundle that is unsigned or
    signed by another key is refused before any artifact byte (else the station fetches, and on a Jetson builds an
    engine for, a bundle of any size from whoever can publish a cmd/model). ``load_bundle`` checks it again."""
    if public_key is None:
        return
    from cryptography.exceptions import InvalidSignature

    if signature is None:
        raise BundleError(f"{signature_url}: missing, and a public key is configured (unsigned bundles are refused); "
                          "no artifact fetched")
    try:
        public_key.verify(signature.read_bytes(), manifest)
    except OSError as exc:
        raise BundleError(f"{signature}: cannot read ({exc.strerror or exc})") from exc
    except InvalidSignature as exc:
        raise BundleError(f"{signature_url}: signature does not match {manifest_url} (model.public_key); "
                          "no artifact fetched") from exc


def _fetch_into(base: str, target: Path, sha256: str | None, deadline: _Deadline, public_key: Any | None,
                check_manifest: ManifestCheck | None = None) -> None:
    manifest_url = urljoin(base, MANIFEST)
    _download(manifest_url, target / MANIFEST, MANIFEST_MAX_BYTES, deadline)
    data = (target / MANIFEST).read_bytes()
    if sha256 is not None and (digest := hashlib.sha256(data).hexdigest()) != sha256:
        raise BundleError(f"{manifest_url}: sha256 {digest} does not match the command's {sha256}; "
                          "no artifact fetched")
    manifest = parse_manifest(data, manifest_url)
    _check_room(target, manifest, manifest_url)
    signature_url = urljoin(base, SIGNATURE)
    served = _download(signature_url, target / SIGNATURE, SIGNATURE_MAX_BYTES, deadline, optional=True)
    _check_signature(target / SIGNATURE if served else None, data, public_key, signature_url, manifest_url)
    if check_manifest is not None:
        check_manifest(manifest, manifest_url)
    root = target.resolve()
    for i, entry in enumerate(manifest["artifacts"]):
        rel = entry["path"]
        dest = (target / rel).resolve()
        if root not in dest.parents or "\x00" in rel or dest in (root / MANIFEST, root / SIGNATURE,
                                                                 root / INSTALLED_MARK):
            raise BundleError(f"{manifest_url}: field artifacts/{i}/path: {rel!r} leaves the bundle")
        dest.parent.mkdir(parents=True, exist_ok=True)
        _download(urljoin(base, quote(rel)), dest, entry["size"], deadline, exact=True)


def mark_installed(folder: Path, installed_as: Path | None = None) -> None:
    """Write ``INSTALLED_MARK`` into a bundle folder cmd/model is about to install as ``installed_as`` (default: where
    it lies), synced: it is published with the folder's rename. Only a folder marked so, where it lies and for the
    manifest.json it holds, is ever removed by a clean-up."""
    digest = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    mark = {"installed_by": "cmd/model", "folder": str((installed_as or folder).resolve()), "manifest_sha256": digest}
    with open(folder / INSTALLED_MARK, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(mark) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def installed_by_cmd_model(folder: Path) -> bool:
    """Whether cmd/model installed ``folder`` (``INSTALLED_MARK``) there, and its manifest.json is still the one it
    installed; False for anything else (no mark, a link, a mark unreadable, for another folder (a copy made by hand
    elsewhere) or for another manifest)."""
    mark = folder / INSTALLED_MARK
    try:
        if mark.is_symlink() or not mark.is_file() or mark.stat().st_size > INSTALLED_MARK_MAX_BYTES:
            return False
        data = loads_finite(mark.read_text(encoding="utf-8"))
        manifest = (folder / MANIFEST).read_bytes() if (folder / MANIFEST).stat().st_size <= MANIFEST_MAX_BYTES \
            else b""
        here = str(folder.resolve())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and bool(manifest) and data.get("folder") == here and \
        data.get("manifest_sha256") == hashlib.sha256(manifest).hexdigest()


def install_bundle(incoming: Path, download_dir: Path, name: str, version: str) -> Path:
    """Move a verified download to ``download_dir/<name>/<version>``, marked as cmd/model's (``mark_installed``).
    An older copy there (same name and version, other content) is swapped with it in one step (``_exchange``), so
    at every instant the folder holds the old bundle or the new one whole; the old one then goes to ``.old-*`` and
    is removed. Where the file system refuses the exchange it is two renames (logged: not atomic there). A folder
    there that cmd/model did not install (a bundle copied by hand) is never replaced: BundleError, and nothing is
    touched."""
    target = download_dir / name / version
    if (target.exists() or target.is_symlink()) and not installed_by_cmd_model(target):
        raise BundleError(f"{target}: holds a bundle cmd/model did not install (no {INSTALLED_MARK} for its "
                          "manifest.json: copied there by hand, or installed before the mark existed); it is left "
                          "alone: move it away, or send the bundle under another version")
    target.parent.mkdir(parents=True, exist_ok=True)
    mark_installed(incoming, target)
    for folder in {incoming, *(p for p in incoming.rglob("*") if p.is_dir() and not p.is_symlink())}:
        fsync_dir(folder)       # its files' names on disk before it is installed (their bytes are: _download)
    old = None
    if target.exists() and _exchange(incoming, target):
        fsync_dir(target.parent)    # the new bundle is at target, the old one at incoming's name: both on disk
        fsync_dir(incoming.parent)
        old = _old_name(download_dir, f"{name}-{version}")
        try:
            incoming.rename(old)    # the old copy on its way out (a power cut before: an .incoming-* leftover)
        except OSError:
            old = incoming
    else:
        if target.exists():     # no atomic exchange here: for an instant <name>/<version> is not there
            old = _old_name(download_dir, f"{name}-{version}")
            target.rename(old)
        try:
            incoming.rename(target)
        except OSError:
            if old is not None:     # the copy that was there goes back: an install that fails changes nothing
                old.rename(target)
            raise
    fsync_dir(target.parent)    # the rename survives a power cut before the state file names the bundle
    fsync_dir(download_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _load_renameat2() -> Callable[[bytes, bytes, int], int] | None:
    """glibc's ``renameat2`` (2.28+), or None where the C library has none."""
    try:
        import ctypes

        func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, AttributeError, ImportError):
        return None
    if func is None:
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    func.restype = ctypes.c_int

    def call(old: bytes, new: bytes, flags: int) -> int:
        if func(AT_FDCWD, old, AT_FDCWD, new, flags) == 0:
            return 0
        return ctypes.get_errno() or errno.EIO

    return call


def _renameat2(old: Path, new: Path, flags: int) -> None:
    """``renameat2(2)``: OSError with the call's errno (ENOSYS where the C library has no such call)."""
    if _renameat2_call is None:
        raise OSError(errno.ENOSYS, "renameat2 is not in this C library", str(old))
    err = _renameat2_call(os.fsencode(old), os.fsencode(new), flags)
    if err:
        raise OSError(err, os.strerror(err), str(old), None, str(new))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (``RENAME_EXCHANGE``): True when done; False, logged, where the kernel, the C
    library or the file system does not offer it (ENOSYS, EINVAL, EOPNOTSUPP; nothing moved). Any other OSError is
    raised, nothing moved."""
    try:
        _renameat2(a, b, RENAME_EXCHANGE)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        log.warning("%s: replaced by two renames, not atomically (renameat2 RENAME_EXCHANGE refused: %s): a power "
                    "cut between them leaves no folder there, and the next start runs the configured bundle",
                    b, exc.strerror or exc)
        return False
    return True


_renameat2_call = _load_renameat2()


def _old_name(download_dir: Path, what: str) -> Path:
    """A fresh ``.old-*`` name for a folder on its way out (a name and a version of 128 characters each would make
    a file name longer than a file system takes)."""
    return download_dir / f".old-{what[:200]}-{uuid.uuid4().hex[:8]}"


def _remove_installed(path: Path, download_dir: Path) -> None:
    """An installed bundle removed as one step: renamed to ``.old-*`` first (what a power cut leaves of it is removed
    by the next download or clean-up), else a removal cut short could leave its model without its manifest.json,
    a folder no clean-up recognises as a bundle."""
    doomed = _old_name(download_dir, f"{path.parent.name}-{path.name}")
    try:
        path.rename(doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def prune_installed(download_dir: Path, keep: Sequence[Path]) -> list[Path]:
    """Remove what cmd/model left in ``download_dir`` that no longer runs: bundles it installed
    (``<name>/<version>/`` marked ``INSTALLED_MARK``) other than ``keep`` (the running one, the one before it, and
    the configured ``model.bundle``: each a folder or its manifest.json), and the ``.incoming-*`` / ``.old-*``
    folders a crash left. Returns what went. A bundle folder without the mark (copied by hand, or installed before
    the mark existed) is left alone, logged once. Disk stays bounded: what cmd/model installs is kept to two bundles
    (three where the configured one is here), and what it leaves alone it never adds to."""
    kept = {(Path(p).parent if Path(p).name == MANIFEST else Path(p)).resolve() for p in keep}  # folder or manifest
    gone = []
    try:
        entries = list(download_dir.iterdir())
    except OSError:
        return gone
    for entry in entries:
        if entry.name.startswith((INCOMING, ".old-")):
            if _leftover(entry) and entry.resolve() not in kept:
                gone.append(entry)
        elif _own_folder(entry):        # a link is never followed: what it points at is not cmd/model's
            try:
                found = [v for v in entry.iterdir()
                         if _own_folder(v) and (v / MANIFEST).is_file() and v.resolve() not in kept]
            except OSError:
                continue
            gone += [v for v in found if installed_by_cmd_model(v)]
            _log_left_alone([v for v in found if v not in gone])
    for path in gone:
        if path.parent == download_dir:     # .incoming-* / .old-*: a leftover already
            shutil.rmtree(path, ignore_errors=True)
        else:
            _remove_installed(path, download_dir)
    for model in {path.parent for path in gone if path.parent != download_dir}:
        try:
            model.rmdir()       # a model's folder this clean-up left empty (one it found empty is not its own)
        except OSError:
            pass
    return gone


def _log_left_alone(folders: list[Path]) -> None:
    """Each bundle folder the clean-up leaves alone (not cmd/model's), logged once per process."""
    with _left_alone_lock:
        new = [f for f in folders if f not in _left_alone]
        if len(_left_alone) < LEFT_ALONE_MAX:
            _left_alone.update(new)
    for folder in new:
        log.warning("left alone: %s is a bundle cmd/model did not install (no %s for its manifest.json: copied there "
                    "by hand, or installed before the mark existed); the clean-up after cmd/model never removes it "
                    "(remove it by hand when it is no longer needed)", folder, INSTALLED_MARK)


@dataclass(frozen=True)
class Incoming:
    """A bundle a command named, verified where it lies (a download: its own ``.incoming-*`` folder), not yet
    installed: the station builds and warms its model from here, and only a bundle that runs is installed."""

    bundle: Bundle
    downloaded: bool

    def install(self, download_dir: Path, public_key: Any | None) -> Bundle:
        """The bundle from its installed place (a path named in the command stays where it is)."""
        if not self.downloaded:
            return self.bundle
        name, version = self.bundle.name, self.bundle.version
        same = _same_installed(download_dir / name / version, self.bundle, public_key)
        if same is not None:
            self.discard()
            return same
        try:
            installed = install_bundle(self.bundle.root, download_dir, name, version)
            _release(self.bundle.root)
        except BundleError:         # a folder there that is not cmd/model's: left alone
            self.discard()
            raise
        except OSError as exc:
            self.discard()
            raise BundleError(f"{download_dir / name / version}: cannot install the bundle "
                              f"({exc.strerror or exc})") from exc
        bundle = load_bundle(installed, public_key)
        if bundle.manifest_sha256 != self.bundle.manifest_sha256:
            raise BundleError(f"{installed}: its manifest changed while it was installed")
        return bundle

    def discard(self) -> None:
        """A refused download goes; nothing installed was touched."""
        if self.downloaded:
            _drop(self.bundle.root)


def _same_installed(target: Path, incoming: Bundle, public_key: Any | None) -> Bundle | None:
    """The copy at ``target`` when it is the very bundle ``incoming`` is (the same manifest) and still verifies.
    It is kept, not replaced: the running bundle sent again (a resend without sha256, a QoS 1 redelivery) would
    otherwise be renamed away for the instant before the new copy's rename, and a power cut then would leave the
    state file naming a folder that is gone (the next start runs the configured bundle)."""
    if target.is_symlink() or not (target / MANIFEST).is_file():
        return None
    try:
        if hashlib.sha256((target / MANIFEST).read_bytes()).hexdigest() != incoming.manifest_sha256:
            return None
        installed = load_bundle(target, public_key)
    except (OSError, BundleError):
        return None         # a damaged copy is replaced by the new one
    return installed if installed.manifest_sha256 == incoming.manifest_sha256 else None


def fetch_verified(cmd: ModelCommand, download_dir: Path, public_key: Any | None,
                   deadline_s: float = FETCH_DEADLINE_S, *, check_manifest: ManifestCheck | None = None) -> Incoming:
    """Fetch and fully verify the bundle a command names, without installing it; BundleError says why not.

    ``check_manifest``: the station's own checks of the manifest (``ManifestCheck``); for a download they run
    before any artifact is fetched, for a local bundle once it is verified."""
    downloaded = urlparse(cmd.bundle).scheme in ("http", "https")
    root = fetch_bundle(cmd.bundle, download_dir, cmd.version, sha256=cmd.sha256, deadline_s=deadline_s,
                        public_key=public_key, check_manifest=check_manifest)
    try:
        bundle = _verify(cmd, root, public_key)
        if check_manifest is not None and not downloaded:
            check_manifest(bundle.manifest, str(bundle.root / MANIFEST))
        return Incoming(bundle, downloaded)
    except BundleError as exc:
        if not downloaded:
            raise
        _drop(root)
        # the reason names the URL the operator sent, not the download folder that is removed with the refusal
        raise BundleError(str(exc).replace(str(root), cmd.bundle.rstrip("/"))) from exc
    except BaseException:
        if downloaded:
            _drop(root)
        raise


def verify_command_bundle(cmd: ModelCommand, download_dir: Path, public_key: Any | None,
                          deadline_s: float = FETCH_DEADLINE_S) -> Bundle:
    """Fetch, fully verify and install the bundle a command names; BundleError says why it is refused.

    A download is verified in a temporary folder and only then installed as ``download_dir/<name>/<version>``;
    a refused one is deleted, so nothing already installed is touched. The station itself installs only after
    the model has been built and warmed (``fetch_verified``, ``Incoming.install``)."""
    return fetch_verified(cmd, download_dir, public_key, deadline_s).install(download_dir, public_key)


def _verify(cmd: ModelCommand, root: Path, public_key: Any | None) -> Bundle:
    """The bundle at ``root``, its manifest checked against the command's sha256 on the very bytes it was parsed
    from (a folder that changes between a check and a load cannot slip another manifest in)."""
    bundle = load_bundle(root, public_key)
    manifest_path = bundle.root / MANIFEST
    if cmd.sha256 is not None and bundle.manifest_sha256 != cmd.sha256:
        raise BundleError(f"{manifest_path}: sha256 {bundle.manifest_sha256} does not match the command's "
                          f"{cmd.sha256}")
    if cmd.version is not None and bundle.version != cmd.version:
        raise BundleError(f"{manifest_path}: field version: {bundle.version!r}, the command expects {cmd.version!r}")
    return bundle
