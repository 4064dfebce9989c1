"""Publish a promoted bundle into the served tree, and serve that tree over HTTP for ``cmd/model``.

``publish_bundle`` copies ``models/<name>/<version>`` to ``<root>/<name>/<version>/`` after the
agent's own verification (``contract.bundle.load_bundle``) and the gate record written by
``python -m trainer retrain`` (``gate.json``): a rejected version is refused, always.
``BundleServer`` serves the tree (standard library), which is what ``cmd/model`` URLs name.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from central.http import Guard, Served
from contract.events import (
    GATE_FILE,
    RolloutError,
    fsync_dir,
    manifest_sha256,
    read_gate,
    rejected_in_log,
    utc_now,
    write_json_atomic,
)

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
PUBLISH_LOCK = ".index.lock"        # in <root>/<name>/: one publish of a model at a time (hidden: never served)
PUBLISHABLE = ("promoted", "baseline")


@dataclass(frozen=True)
class PublishResult:
    name: str
    version: str
    path: Path
    url_path: str          # relative to the served root: "<name>/<version>/"
    sha256: str            # of manifest.json: what cmd/model carries
    decision: str
    already: bool = False


def _check_publishable(bundle_dir: Path, sha: str, root: Path, name: str, baseline: bool) -> dict[str, Any]:
    gate = read_gate(bundle_dir)
    logged = rejected_in_log(bundle_dir, sha)
    if (gate is not None and gate["decision"] == "rejected") or logged is not None:
        why = (gate or logged or {}).get("reason") or "see the retrain report"
        raise RolloutError(f"{bundle_dir}: rejected by the retrain gate ({why}); a rejected version is never published")
    if gate is not None:
        if gate.get("manifest_sha256") != sha:
            raise RolloutError(f"{bundle_dir / GATE_FILE}: field manifest_sha256: {gate.get('manifest_sha256')} "
                               f"is not the sha256 of this manifest.json ({sha}); the bundle changed after the gate")
        return gate
    if not baseline:
        raise RolloutError(f"{bundle_dir}: no {GATE_FILE}: only a version promoted by 'python -m trainer retrain' is "
                           "published (pass --baseline for the first version of a model, exported by 'trainer export')")
    version = json.loads((bundle_dir / "manifest.json").read_text())["version"]
    others = [p.name for p in (root / name).iterdir() if p.is_dir() and not p.name.startswith(".")
              and p.name != version] if (root / name).is_dir() else []     # the same baseline again: a no-op
    if others:
        raise RolloutError(f"{bundle_dir}: --baseline is only for the first version of {name!r}, and {root / name} "
                           f"already holds {', '.join(sorted(others))}; later versions go through the retrain gate")
    return {"decision": "baseline", "manifest_sha256": sha, "name": name,
            "reason": "first version of the model, exported by 'trainer export' (not gated)", "ts": utc_now()}


def publish_bundle(bundle_dir: str | Path, root: str | Path, *, baseline: bool = False,
                   public_key: Path | None = None) -> PublishResult:
    """Copy a verified, promoted bundle into ``root/<name>/<version>/``; nothing appears there half-copied."""
    from contract.bundle import BundleError, check_model_runs, load_bundle, load_public_key

    bundle_dir, root = Path(bundle_dir), Path(root)
    if root.exists() and not root.is_dir():
        raise RolloutError(f"--root {root}: not a folder (the served tree is a folder; a typo?)")
    try:
        bundle = load_bundle(bundle_dir, load_public_key(public_key) if public_key else None)
        if importlib.util.find_spec("onnxruntime") is not None:
            check_model_runs(bundle)   # what verify and every station refuse is never offered to them
        else:                          # the central image runs no model; the export ran the same check
            log.info("%s: onnxruntime is not installed here; the model check is the export's", bundle_dir)
    except BundleError as exc:
        raise RolloutError(f"refusing to publish an unverifiable bundle: {exc}") from exc
    _check_servable(bundle)
    _check_publishable(bundle.root, manifest_sha256(bundle.root), root, bundle.name, baseline)   # refused: no folder
    model_dir = root / bundle.name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        lock = open(model_dir / PUBLISH_LOCK, "a")
    except OSError as exc:         # a read-only served tree, or a --root under a file: named, never a traceback
        raise RolloutError(f"--root {root}: cannot publish {model_dir / bundle.version} ({exc.strerror or exc}: "
                           f"{exc.filename or model_dir})") from exc
    with lock:      # two publishes of one model at once: the second waits, then finds the first's copy
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another publish of %s is under way; waiting for it to finish", model_dir, bundle.name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _publish_locked(bundle, root, baseline, public_key)


def _publish_locked(bundle: Any, root: Path, baseline: bool, public_key: Path | None) -> PublishResult:
    """The gate check and the copy of a verified bundle, under the model's publish lock."""
    bundle_dir = bundle.root
    sha = manifest_sha256(bundle_dir)
    gate = _check_publishable(bundle_dir, sha, root, bundle.name, baseline)
    target = root / bundle.name / bundle.version
    try:
        return _publish_or_complete(bundle, root, target, sha, gate, public_key)
    except OSError as exc:         # a read-only or full served tree: named, never a traceback
        raise RolloutError(f"--root {root}: cannot publish {target} ({exc.strerror or exc}: "
                           f"{exc.filename or target})") from exc


def _publish_or_complete(bundle: Any, root: Path, target: Path, sha: str, gate: dict[str, Any],
                         public_key: Path | None) -> PublishResult:
    """Copy the bundle to ``target`` and list it, or, published before, check the copy and complete its index."""
    from contract.bundle import MANIFEST, BundleError, load_bundle, load_public_key

    url_path = f"{bundle.name}/{bundle.version}/"
    if target.exists():
        if (target / MANIFEST).exists() and manifest_sha256(target) == sha:
            try:                # published whole? (a power cut can leave a renamed folder with empty files)
                load_bundle(target, load_public_key(public_key) if public_key else None)
            except BundleError as exc:
                raise RolloutError(f"{target}: published before but damaged ({exc}); move it aside and publish "
                                   f"again") from exc
            _update_index(root / bundle.name, bundle.version, sha, gate["decision"])   # a crash may have missed it
            return PublishResult(bundle.name, bundle.version, target, url_path, sha, gate["decision"], already=True)
        raise RolloutError(f"{target}: version {bundle.version} is already published with another manifest; "
                           "a published version is never replaced (export a new version)")
    _copy_into_place(bundle, bundle.root, target, gate, public_key)
    _update_index(root / bundle.name, bundle.version, sha, gate["decision"])
    log.info("published %s %s at %s", bundle.name, bundle.version, target)
    return PublishResult(bundle.name, bundle.version, target, url_path, sha, gate["decision"])


def _check_servable(bundle: Any) -> None:
    """Every artifact can be fetched from the served tree: ``bundle_app`` never serves a path with a part that
    starts with '.' (half-copied folders are hidden), so a bundle listing one would be refused by every station."""
    for i, entry in enumerate(bundle.manifest["artifacts"]):
        hidden = [part for part in Path(entry["path"]).parts if part.startswith(".")]
        if hidden:
            raise RolloutError(f"{bundle.root / 'manifest.json'}: field artifacts/{i}/path: {entry['path']!r} is in "
                               f"a hidden file or folder ({hidden[0]!r}), which the bundle server never serves; no "
                               "station could fetch it (rename it and export the bundle again)")


def _copy_into_place(bundle: Any, bundle_dir: Path, target: Path, gate: dict[str, Any],
                     public_key: Path | None) -> None:
    """Copy the bundle's files into a hidden partial folder, check the copy, then rename it to ``target``."""
    from contract.bundle import MANIFEST, SIGNATURE, load_bundle, load_public_key, partial_dir, sweep_partials

    sweep_partials(target.parent)           # what publishes killed before their clean-up left here
    partial = partial_dir(target)
    try:
        partial.mkdir(parents=True)
        files = [MANIFEST] + ([SIGNATURE] if (bundle_dir / SIGNATURE).exists() else [])
        files += [a.path.relative_to(bundle_dir).as_posix() for a in bundle.artifacts]
        for rel in files:
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle_dir / rel, partial / rel)
            with open(partial / rel, "rb") as fh:         # on disk before the folder is renamed into place
                os.fsync(fh.fileno())
        write_json_atomic(partial / GATE_FILE, gate)
        load_bundle(partial, load_public_key(public_key) if public_key else None)   # the copy, checked again
        folders = {partial / parent for rel in files for parent in Path(rel).parents}
        for folder in sorted(folders, key=lambda f: -len(f.parts)):
            fsync_dir(folder)       # an artifact in a sub-folder: its name on disk too (partial itself, last)
        os.replace(partial, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _update_index(model_dir: Path, version: str, sha: str, decision: str) -> None:
    """Add ``version`` to the model's index.json; the caller holds the model's lock (``PUBLISH_LOCK``), so two
    publishes at once both stay listed."""
    path = model_dir / INDEX_FILE
    try:
        index = json.loads(path.read_text()) if path.exists() else {"versions": {}}
        if not isinstance(index, dict) or not isinstance(index.get("versions"), dict):
            raise ValueError("expected {\"versions\": {...}}")
    except ValueError as exc:
        raise RolloutError(f"{path}: not a published index ({exc}); move it aside and publish again") from None
    known = index["versions"].get(version)
    if known and known.get("manifest_sha256") == sha:
        return
    index["versions"][version] = {"path": f"{version}/", "manifest_sha256": sha, "decision": decision,
                                  "published_at": utc_now()}
    # what a killed or failed write left (a full disk): the lock is held, so no other publish's file
    for tmp in model_dir.glob(f".{INDEX_FILE}.*.tmp"):
        tmp.unlink(missing_ok=True)
    try:
        write_json_atomic(path, index)
    except OSError:
        for tmp in model_dir.glob(f".{INDEX_FILE}.*.tmp"):
            tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- serve

MAX_RANGES = 8        # more byte ranges than a downloader asks for: the Range header is ignored (RFC 9110 14.2)


def bundle_app(root: Path) -> Any:
    """The served tree as an ASGI app: files only, GET/HEAD only, no directory listings, nothing hidden
    (a half-copied bundle lives in a dot-folder until it is renamed into place).

    Whatever a client sends, the answer is a file, a byte range of one, or a JSON ``{"error": ...}`` naming
    the path, the method or the header (404, 405, 400/416 for a bad Range, 413 for a body); never a 500.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Mount

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
        return JSONResponse({"error": message}, status, headers={"Cache-Control": "no-store", **(headers or {})})

    async def http_error(request: Any, exc: HTTPException) -> Any:
        path = request.url.path[:200]
        if exc.status_code == 404:
            return error(404, f"{path}: not found")
        return error(exc.status_code, f"{path}: header Range: {exc.detail}" if exc.status_code in (400, 416)
                     else f"{path}: {exc.detail}", exc.headers)

    files = Starlette(routes=[Mount("/", app=_published_files(root))], exception_handlers={HTTPException: http_error})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            parts = [p for p in unquote(path).split("/") if p]
            if scope["method"] not in ("GET", "HEAD"):
                await error(405, f"method {scope['method']} not allowed on {path[:200]} (GET or HEAD)",
                            {"Allow": "GET, HEAD"})(scope, receive, send)
                return
            if any(p.startswith(".") or "\x00" in p for p in parts):
                await error(404, f"{path[:200]}: not found")(scope, receive, send)
                return
            headers = scope.get("headers") or []
            ranges = [v for k, v in headers if k.lower() == b"range"]
            if ranges and (len(ranges) > 1 or ranges[0].count(b",") >= MAX_RANGES):
                scope = {**scope, "headers": [(k, v) for k, v in headers if k.lower() != b"range"]}
            send = _json_errors(send, path)
        await files(scope, receive, send)

    return Guard(app, max_bytes=0, no_store=False)


def _published_files(root: Path) -> Any:
    """Starlette's static files, with two changes for a tree that publishes rewrite while it is served:

    - each answer is read from the file as it was opened when the request came in (its size and ETag from that
      open file, ``os.fstat``): a file renamed over meanwhile (``index.json`` at every publish) is sent whole,
      old or new, never the new bytes under the old Content-Length (a torn body, or an h11 error and a
      traceback) nor a mix of two files' bytes (``OpenedFile``, built on Starlette's public ``Response``);
    - a path the server cannot look up (a symlink loop, a folder it may not read) is a JSON 404 or 403 naming
      the path, never a 500 with a traceback.
    """
    import errno
    import stat

    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.staticfiles import NotModifiedResponse, StaticFiles

    opened_file = _opened_file_class()

    class PublishedFiles(StaticFiles):
        def lookup_path(self, path: str) -> tuple[str, os.stat_result | None]:
            try:
                return super().lookup_path(path)
            except PermissionError as exc:
                log.warning("bundle server: %s: %s", exc.filename or path, exc.strerror)
                raise HTTPException(403, "not readable by the server") from None
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:
                    raise
                log.warning("bundle server: %s: %s", exc.filename or path, exc.strerror or exc)
                raise HTTPException(404) from None

        def file_response(self, full_path: Any, stat_result: os.stat_result, scope: Any,
                          status_code: int = 200) -> Any:
            try:
                fd = os.open(full_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except PermissionError:
                raise HTTPException(403, "not readable by the server") from None
            except OSError:         # removed or replaced by a link since it was looked up
                raise HTTPException(404) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise HTTPException(404)
            response = opened_file(fd, str(full_path))
            if self.is_not_modified(response.headers, Headers(scope=scope)):
                os.close(fd)
                return NotModifiedResponse(response.headers)
            return response

    return PublishedFiles(directory=str(root))


CHUNK_BYTES = 64 * 1024     # read and sent at a time


class _RangeRefused(Exception):
    """A ``Range`` header that is answered 400 (malformed) or 416 (past the end) instead of a file."""

    def __init__(self, status: int, detail: str, size: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail
        self.headers = {"Content-Range": f"bytes */{size}"} if size is not None else None


def _byte_ranges(value: str, size: int) -> list[tuple[int, int]]:
    """The byte ranges ``[start, end)`` of a file of ``size`` bytes that a ``Range`` header asks for, read as
    Starlette's FileResponse reads them: ``a-b``, ``a-`` and ``-n`` (the last n bytes); a part that is none of
    these is skipped; an end past the file is its end; overlapping or touching ranges are merged, in order.
    [] (the whole file, RFC 9110 14.2) when it lists more than ``MAX_RANGES``. ``_RangeRefused`` 400 for another
    unit, no range or one that ends before it starts, 416 for one that starts past the end."""
    import re

    unit, equals, spec = value.partition("=")
    shown = repr(value[:80])
    if not equals or unit.strip().lower() != "bytes":
        raise _RangeRefused(400, f"{shown}: only byte ranges are served (bytes=START-END)")
    if spec.count(",") >= MAX_RANGES:
        return []
    spans = []
    for part in spec.split(","):
        found = re.fullmatch(r"\s*(\d*)\s*-\s*(\d*)\s*", part, re.ASCII)
        if found is None or found.group(1) == found.group(2) == "":
            continue
        try:
            first, last = (int(n) if n else None for n in found.groups())
        except ValueError:          # more digits than int() reads (4300): no file has such an offset
            continue
        if first is None:
            spans.append((max(size - last, 0), size))
        else:
            spans.append((first, size if last is None else min(last + 1, size)))
    if not spans:
        raise _RangeRefused(400, f"{shown}: asks for no byte range (bytes=START-END)")
    if any(start >= size for start, _ in spans):
        raise _RangeRefused(416, f"{shown}: starts past the end of the file ({size} bytes)", size)
    if any(start >= end for start, end in spans):
        raise _RangeRefused(400, f"{shown}: a range ends before it starts")
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class _FileShrank(Exception):
    """The open file is shorter than when its answer began (it was truncated in place, which publishes never do)."""


def _opened_file_class() -> type:
    """``OpenedFile``: the answer for one file, from a descriptor opened when the request came in. Built on
    Starlette's public ``Response``/``StreamingResponse`` (imported here: publishing needs no Starlette)."""
    import hashlib
    from email.utils import formatdate
    from mimetypes import guess_type
    from secrets import token_hex

    import anyio.to_thread
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.responses import Response, StreamingResponse

    class OpenedFile(Response):
        """GET and HEAD of the whole file, one byte range or several (multipart/byteranges), with ``If-Range``;
        Content-Length, Last-Modified and ETag (Starlette's formula) from ``os.fstat`` of the descriptor, every
        byte read from it (``os.pread``: no shared offset). The descriptor is closed when the answer ends."""

        def __init__(self, fd: int, path: str) -> None:
            info = os.fstat(fd)
            self.fd, self.path, self.size = fd, path, info.st_size
            tag = hashlib.md5(f"{info.st_mtime}-{info.st_size}".encode(), usedforsecurity=False).hexdigest()
            super().__init__(headers={"accept-ranges": "bytes", "content-length": str(info.st_size),
                                      "last-modified": formatdate(info.st_mtime, usegmt=True), "etag": f'"{tag}"'},
                             media_type=guess_type(path)[0] or "application/octet-stream")

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            try:
                await self._answer(Headers(scope=scope), scope["method"] == "HEAD")(scope, receive, send)
            except _FileShrank:     # the answer cannot be completed: the server closes its connection
                log.warning("bundle server: %s: shorter than its Content-Length; changed in place while served "
                            "(a published file is replaced by a rename, never rewritten)", self.path)
            finally:
                os.close(self.fd)

        def _answer(self, request: Headers, head: bool) -> Response:
            wanted, if_range = request.get("range"), request.get("if-range")
            spans: list[tuple[int, int]] = []
            if wanted is not None and if_range in (None, self.headers["etag"], self.headers["last-modified"]):
                try:
                    spans = _byte_ranges(wanted, self.size)
                except _RangeRefused as exc:
                    raise HTTPException(exc.status, exc.detail, exc.headers) from None
            headers = dict(self.headers)
            if not spans:
                return self._body(200, headers, [(b"", 0, self.size)], b"", head)
            if len(spans) == 1:
                [(start, end)] = spans
                headers.update({"content-range": f"bytes {start}-{end - 1}/{self.size}",
                                "content-length": str(end - start)})
                return self._body(206, headers, [(b"", start, end)], b"", head)
            boundary = token_hex(13)
            parts = [((b"\r\n" if i else b"") + f"--{boundary}\r\nContent-Type: {headers['content-type']}\r\n"
                      f"Content-Range: bytes {start}-{end - 1}/{self.size}\r\n\r\n".encode("latin-1"), start, end)
                     for i, (start, end) in enumerate(spans)]
            tail = f"\r\n--{boundary}--".encode()
            headers.update({"content-type": f"multipart/byteranges; boundary={boundary}",
                            "content-length": str(sum(len(p) + end - start for p, start, end in parts) + len(tail))})
            return self._body(206, headers, parts, tail, head)

        def _body(self, status: int, headers: dict[str, str], parts: list[tuple[bytes, int, int]], tail: bytes,
                  head: bool) -> Response:
            if head:
                return Response(status_code=status, headers=headers)
            return StreamingResponse(self._read(parts, tail), status, headers)

        async def _read(self, parts: list[tuple[bytes, int, int]], tail: bytes) -> Any:
            for prefix, start, end in parts:
                if prefix:
                    yield prefix
                while start < end:
                    chunk = await anyio.to_thread.run_sync(os.pread, self.fd, min(CHUNK_BYTES, end - start), start)
                    if not chunk:
                        raise _FileShrank(self.path)
                    start += len(chunk)
                    yield chunk
            if tail:
                yield tail

    return OpenedFile


def _json_errors(send: Any, path: str) -> Any:
    """``send`` with a plain-text error (Starlette's own, e.g. a 500 from its error middleware) rewritten as JSON."""
    held: dict[str, Any] = {}

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400 and not any(
                k == b"content-type" and v.startswith(b"application/json") for k, v in message.get("headers", [])):
            held["start"] = message
            return
        if "start" in held and message["type"] == "http.response.body":
            start = held.pop("start")
            text = message.get("body", b"").decode("utf-8", "replace").strip() or "range not satisfiable"
            what = f"header Range: {text}" if start["status"] in (400, 416) else text
            body = json.dumps({"error": f"{path[:200]}: {what}"}).encode()
            kept = [(k, v) for k, v in start.get("headers", []) if k not in (b"content-type", b"content-length")]
            await send({**start, "headers": [*kept, (b"content-type", b"application/json"),
                                              (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    return wrapped


class BundleServer(Served):
    """The served tree over HTTP(S) (Starlette's static files on uvicorn), in a background thread (``start``).

    A stop cuts each download under way whose station is not taking it (``Served``: at once, or as soon as its
    write buffer fills; one still under way after the grace too), counted in ``cut_at_shutdown["downloads"]``; the
    station resumes a cut download with a Range request."""

    cut_what = "downloads"

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                 tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise RolloutError(f"--root {self.root}: " + ("not a folder (the served tree is a folder; a typo?)"
                               if self.root.exists() else "served folder does not exist (publish a bundle into "
                               "it first)"))
        super().__init__(bundle_app(self.root), host, port, name="bundles", tls_cert=tls_cert, tls_key=tls_key)

    def said_cut(self, count: int) -> None:
        log.info("bundle server stopped: %d download(s) under way cut (a station resumes its download with a Range "
                 "request)", count)
