"""The review page and its HTTP API, over a FrameStore.

``python -m central review --store DIR --labels-from models/<name>/<version>``. The standard
library's ThreadingHTTPServer; JSON in and out. Endpoints (all under the server's root):

    GET  /                             the review page (central/review/static/review.html)
    GET  /api/labels                   {"labels": [...model classes], "new_classes": [...], "defects": [...]}
    GET  /api/frames?status=pending&site=&station=&camera=&model_version=&predicted=&limit=50&offset=0&order=oldest|newest|least-certain|least-certain-by-class
                                       {"frames": [...], "total": N}
    GET  /api/frames/<id>              one frame's metadata and review
    GET  /api/frames/<id>/image        its JPEG
    GET  /api/frames/<id>/context      the ROI it was cut from, as the station sent it (404 when none)
    POST /api/frames/<id>/review       {"action": "label"|"skip"|"new_class"|"defect"|"undo",
                                        "label": "...", "reviewer": "...", "note": "..."}
    GET  /api/stats                    counts by status, station, model version and label; quota
    GET  /api/facets                   distinct sites, stations, cameras, model versions, predicted labels

With ``--token T`` (or ``--token-file F``) every /api request needs ``Authorization: Bearer T``
(the page asks once, keeps it in the browser's session storage, and fetches images with it too).
Errors are JSON ``{"error": "..."}`` with 400 (bad field, named), 401, 404 (no such frame), 405, or 500 (the
store's database or disk failed; logged with the request).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from central.review.store import FILTERS, FrameStore, StoreError, UnknownFrame

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_BODY = 64 * 1024


def labels_from(source: Path) -> list[str]:
    """Class names from a bundle folder (its manifest), a manifest.json, or a labels.json (list or {folder: name})."""
    path = source / "manifest.json" if source.is_dir() else source
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise StoreError(f"--labels-from {source}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise StoreError(f"--labels-from {path}: not JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("labels"), list):
        return [str(x) for x in data["labels"]]
    if isinstance(data, list):
        return [str(x) for x in data]
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        return list(data.values())
    raise StoreError(f"--labels-from {path}: expected a bundle manifest (field labels), a list of class names, "
                     f"or a mapping folder -> class name")


class ReviewServer:
    """The HTTP server in a thread (tests, embedding) or in the foreground (``serve_forever``)."""

    def __init__(self, store: FrameStore, host: str = "127.0.0.1", port: int = 8080, token: str | None = None):
        self.store = store
        self.token = token
        handler = type("Handler", (_Handler,), {"server_ref": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}/"

    def start(self) -> "ReviewServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="review-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_ref: ReviewServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("review http: " + fmt, *args)

    # ------------------------------------------------------------ plumbing

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _authorised(self) -> bool:
        token = self.server_ref.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode()):
            return True
        self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send 'Authorization: Bearer <token>'")
        return False

    # ------------------------------------------------------------ routes

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        try:
            if not parts or parts == ["review"]:
                return self._static("review.html")
            if parts[0] == "static" and len(parts) == 2:
                return self._static(parts[1])
            if parts[0] != "api":
                return self._error(HTTPStatus.NOT_FOUND, f"{url.path}: not found")
            if not self._authorised():
                return None
            store = self.server_ref.store
            if parts == ["api", "labels"]:
                return self._json(HTTPStatus.OK, store.labels())
            if parts == ["api", "stats"]:
                return self._json(HTTPStatus.OK, store.stats())
            if parts == ["api", "facets"]:
                return self._json(HTTPStatus.OK, store.facets())
            if parts == ["api", "frames"]:
                return self._list(parse_qs(url.query))
            if len(parts) == 3 and parts[:2] == ["api", "frames"]:
                return self._json(HTTPStatus.OK, store.get(parts[2]))
            if len(parts) == 4 and parts[:2] == ["api", "frames"] and parts[3] == "image":
                data = store.image_path(parts[2]).read_bytes()
                return self._send(HTTPStatus.OK, data, "image/jpeg")
            if len(parts) == 4 and parts[:2] == ["api", "frames"] and parts[3] == "context":
                path = store.context_path(parts[2])
                if path is None:
                    return self._error(HTTPStatus.NOT_FOUND, f"frame {parts[2]!r}: no ROI context was sent with it")
                return self._send(HTTPStatus.OK, path.read_bytes(), "image/jpeg")
            return self._error(HTTPStatus.NOT_FOUND, f"{url.path}: not found")
        except UnknownFrame as exc:
            return self._error(HTTPStatus.NOT_FOUND, str(exc))
        except StoreError as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except FileNotFoundError as exc:
            return self._error(HTTPStatus.NOT_FOUND, f"image file missing: {exc.filename}")
        except Exception as exc:       # the store's database or disk: say so rather than drop the connection
            return self._internal(exc)

    def _internal(self, exc: Exception) -> None:
        log.exception("review http: %s %s failed", self.command, self.path)
        self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the store could not answer ({type(exc).__name__}: {exc})")

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        if not (len(parts) == 4 and parts[:2] == ["api", "frames"] and parts[3] == "review"):
            return self._error(HTTPStatus.NOT_FOUND if parts[:1] == ["api"] else HTTPStatus.METHOD_NOT_ALLOWED,
                               f"POST {url.path}: not found")
        if not self._authorised():
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "header Content-Length: not a number")
        if length > MAX_BODY:
            return self._error(HTTPStatus.BAD_REQUEST, f"body: larger than {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as exc:
            return self._error(HTTPStatus.BAD_REQUEST, f"body: not JSON ({exc})")
        if not isinstance(body, dict):
            return self._error(HTTPStatus.BAD_REQUEST, "body: expected a JSON object")
        unknown = set(body) - {"action", "label", "reviewer", "note"}
        if unknown:
            return self._error(HTTPStatus.BAD_REQUEST, f"body: unknown field(s) {', '.join(sorted(unknown))}")
        for key in ("action", "label", "reviewer", "note"):
            if body.get(key) is not None and not isinstance(body[key], str):
                return self._error(HTTPStatus.BAD_REQUEST, f"field {key}: expected a string")
        if not body.get("action"):
            return self._error(HTTPStatus.BAD_REQUEST, "field action: missing")
        try:
            frame = self.server_ref.store.review(parts[2], body["action"], label=body.get("label"),
                                                 reviewer=body.get("reviewer"), note=body.get("note"))
        except UnknownFrame as exc:
            return self._error(HTTPStatus.NOT_FOUND, str(exc))
        except StoreError as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception as exc:
            return self._internal(exc)
        return self._json(HTTPStatus.OK, frame)

    def _list(self, query: dict[str, list[str]]) -> None:
        filters = {k: v[-1] for k, v in query.items() if k in FILTERS}
        unknown = set(query) - set(FILTERS) - {"limit", "offset", "order"}
        if unknown:
            raise StoreError(f"unknown query parameter(s) {', '.join(sorted(unknown))}")
        try:
            limit = int(query.get("limit", ["50"])[-1])
            offset = int(query.get("offset", ["0"])[-1])
        except ValueError:
            raise StoreError("field limit/offset: not an integer") from None
        order = query.get("order", ["oldest"])[-1]
        frames, total = self.server_ref.store.list(limit=limit, offset=offset, order=order, **filters)
        self._json(HTTPStatus.OK, {"frames": frames, "total": total})

    def _static(self, name: str) -> None:
        path = (STATIC / name).resolve()
        if STATIC.resolve() not in path.parents or not path.is_file():
            return self._error(HTTPStatus.NOT_FOUND, f"/static/{name}: not found")
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, path.read_bytes(), f"{kind}; charset=utf-8" if kind.startswith("text/") or
                   kind.endswith("javascript") else kind)


def add_review_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="serve the review page and its HTTP API over a frame store")
    p.add_argument("--store", required=True, type=Path, help="store folder (as written by 'ingest')")
    p.add_argument("--labels-from", type=Path, default=None,
                   help="the classes a reviewer assigns: a bundle folder, a manifest.json or a labels.json")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (0.0.0.0 to serve the network)")
    p.add_argument("--port", type=int, default=8080, help="default 8080; 0: any free port")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", default=None,
                       help="API token: every /api request then needs 'Authorization: Bearer <token>' "
                            "(visible in the process list: prefer --token-file)")
    token.add_argument("--token-file", type=Path, default=None, help="file whose first line is the API token")


def cmd_review(args) -> int:
    labels = labels_from(args.labels_from) if args.labels_from else []
    if not labels:
        log.warning("no --labels-from: reviewers can only add new classes, skip or mark defects")
    token = args.token
    if args.token_file is not None:
        from central.review.ingest import read_secret

        token = read_secret(args.token_file, "--token-file")
    store = FrameStore(args.store, labels=labels)
    try:
        server = ReviewServer(store, args.host, args.port, token)
    except OSError as exc:
        store.close()
        raise StoreError(f"--host {args.host} --port {args.port}: cannot listen ({exc.strerror or exc})") from None
    print(f"review: {server.url} ({store.stats()['by_status']['pending']} frames pending in {args.store})", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        store.close()
    return 0
