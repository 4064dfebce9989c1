"""The review page and its HTTP API, over a FrameStore.

``python -m central review --store DIR --labels-from models/<name>/<version>``. A FastAPI app on
uvicorn (``central.http``); JSON in and out, its OpenAPI schema at ``/api/openapi.json``. Endpoints
(all under the server's root):

    GET  /                             the review page (central/review/static/review.html)
    GET  /api/labels                   {"labels": [...model classes], "new_classes": [...], "defects": [...]}
    GET  /api/frames?status=pending&site=&station=&camera=&model_version=&predicted=&limit=50&offset=0&order=oldest|newest|least-certain|least-certain-by-class
                                       {"frames": [...], "total": N}
    GET  /api/frames/<id>              one frame's metadata and review (``track``: the item it shows;
                                       ``item_pending``: that item's pending frames, 0 without a track)
    GET  /api/frames/<id>/image        its JPEG
    GET  /api/frames/<id>/context      the ROI it was cut from, as the station sent it (404 when none)
    POST /api/frames/<id>/review       {"action": "label"|"skip"|"new_class"|"defect"|"undo",
                                        "label": "...", "reviewer": "...", "note": "...", "item": false,
                                        "expect": null}
                                       item: true decides every pending frame of the frame's item too
                                       (frame.v1 track); the answer lists them in item_frames. expect: the
                                       status the decision was made on ("pending" from the page): 409 and
                                       nothing changed when another reviewer decided the frame meanwhile
    GET  /api/stats                    counts by status, station, model version and label; quota; the store's
                                       counters; ``mqtt_callback_errors``: the ingest service's MQTT callback
                                       errors {"total", "by_callback", "last_at"} (the page warns for a day)
    GET  /api/facets?limit=200         distinct sites, stations, cameras, model versions, predicted labels: of each
                                       the ``limit`` (1..1000) with the most frames, in value order, and
                                       ``more``: {facet: how many other values it has, not listed}
    GET  /api/quarantine?limit=50&offset=0   frame messages ingest refused, newest first:
                                       {"messages": [{seq, received_at, topic, reason, bytes, ...}], "kept", "refused"}
    GET  /api/enrol                    {"enabled": bool, "bundle", "min_examples", "allowance": {"default", "limit"}}
    POST /api/enrol                    {"label": "...", "reviewer": "...", "max_drop_points": null, "dry_run": false}:
                                       a new bundle version with that new class, from its reviewed frames
                                       (``--enrol-bundle``; central/review/enrol.py); dry_run: its figures only

Every /api request needs ``Authorization: Bearer <token>``: ``--token-file F`` (or ``--token T``) gives
it; without either, a random token is made at start and written to ``<store>/review.token`` (mode 0600),
and the URL printed to open carries it after ``#token=`` (a fragment: never sent to the server or logged).
The page reads it there, or asks once, keeps it in the browser's session storage, and fetches images with
it too; the page itself (HTML, script, style) holds no data and is served to anyone, under a strict
Content-Security-Policy (``PAGE_CSP``: only its own script and style run, images from this server or the blobs
it fetched). ``--no-auth`` serves the API to anyone who can reach it (local development; logged as a
warning). Every JSON answer is strict JSON: a non-finite number that reached the store is answered as null
(and logged), never as NaN.
Errors are JSON ``{"error": "..."}`` with 400 (bad field, named), 401, 403 (a browser POST from another
origin or site), 404 (no such frame), 405, 408 (a body not in whole 60 s after its request's head; the
connection is closed: ``central.http``), 409 (a review whose ``expect`` no longer holds), 413 (a body over
64 KiB, whatever its Content-Length says), or 500 (the
store's database or disk failed; logged with the request). ``--tls-cert``/``--tls-key`` serve HTTPS.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import math
import mimetypes
import re
import secrets
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from central.http import BodyTooLarge, Guard, Served, generated_secret, too_large_response, warn_no_auth
from central.review.enrol import EnrolBusy, EnrolRefused
from central.review.store import FILTERS, FrameStore, ReviewConflict, StoreError, UnknownFrame
from contract.messages import dumps_finite, loads_finite

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
STATIC_FILES = frozenset(p.name for p in STATIC.iterdir() if p.is_file())
MAX_BODY = 64 * 1024
TOKEN_FILE = "review.token"          # in the store folder: the token made at start when none is given
MAX_OFFSET = 2 ** 62                 # SQLite's integers are 64-bit
# The page runs only its own files: no inline script, event handler or style attribute, so station-sent text that
# ever reached the page as markup could not run or restyle it. blob: is for the frames' JPEGs, which the page
# fetches with the API token and shows from a blob (an <img> cannot send the header). The same policy as the
# dashboard's (central/dashboard/server.py PAGE_CSP), less its data: images.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class FiniteJSONResponse(JSONResponse):
    """Strict JSON out, always: a non-finite number (a frame stored before schemas refused them) becomes null.

    One bad frame must not turn the whole queue into a 500; the value is logged with where it was found.
    """

    def render(self, content: Any) -> bytes:
        try:
            text = dumps_finite(content, ensure_ascii=False, separators=(",", ":"))
        except ValueError:
            found: list[str] = []
            cleaned = _finite_or_null(content, "", found)
            log.warning("review http: non-finite number(s) answered as null at %s", ", ".join(found[:5]))
            text = dumps_finite(cleaned, ensure_ascii=False, separators=(",", ":"))
        # a lone surrogate (a request's field name echoed in an error) goes out as its JSON escape, \udXXX
        return text.encode("utf-8", "backslashreplace")


def _finite_or_null(value: Any, where: str, found: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found.append(where or "/")
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v, f"{where}/{k}", found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v, f"{where}/{i}", found) for i, v in enumerate(value)]
    return value


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


REVIEW_FIELDS = ("action", "label", "reviewer", "note")


class ReviewBody(BaseModel):
    """A review of one frame; the store checks the action and the label against the classes."""

    model_config = ConfigDict(extra="forbid", strict=True)

    action: str | None = Field(None, description="label | skip | new_class | defect | undo")
    label: str | None = Field(None, description="the class (label), the new class name (new_class) or the defect")
    reviewer: str | None = None
    note: str | None = None
    item: bool = Field(False, description="the same decision for the other pending frames of the frame's item (its "
                                          "station, camera and track); with undo, back to pending with it")
    expect: str | None = Field(None, description="the frame's status the decision was made on (the page sends "
                                                 "pending): 409, nothing changed, when another reviewer has decided "
                                                 "it meanwhile; without it a decision replaces any earlier one")


class EnrolBody(BaseModel):
    """Enrol a new class from its reviewed frames (docs/enrol.md)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    label: str | None = Field(None, description="the new class, as the frames were reviewed")
    reviewer: str | None = None
    max_drop_points: float | None = Field(None, description="the old classes' allowance in points (default: the "
                                                            "server's --enrol-max-drop; at most its limit)")
    dry_run: bool = Field(False, description="the figures (recall and old classes' loss by allowance) only; "
                                             "nothing written")


def create_app(store: FrameStore, token: str | None, enroller: Any = None) -> FastAPI:
    """The review page and API over ``store`` (an ASGI app; ``ReviewServer`` serves it); ``token`` None: open.
    ``enroller``: a ``central.review.enrol.ReviewEnroller``, or None (``POST /api/enrol`` answers 409)."""

    def authorised(authorization: str | None = Header(None)) -> None:
        if not token:
            return
        given = authorization or ""
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
            raise HTTPException(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send 'Authorization: Bearer <token>'")

    app = FastAPI(title="Review API", version="1", openapi_url="/api/openapi.json", docs_url=None, redoc_url=None,
                  default_response_class=FiniteJSONResponse, description="Label the low-confidence frames stations sent back (docs/loop.md).")
    api = APIRouter(prefix="/api", dependencies=[Depends(authorised)])

    @app.exception_handler(StarletteHTTPException)      # the router's own 404/405 too (a path with a newline)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path[:200]!r}"
        detail = {"Not Found": f"{where}: not found", "Method Not Allowed": f"{where}: method not allowed"}.get(
            str(exc.detail), str(exc.detail))
        return _error(exc.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(HTTPStatus.BAD_REQUEST, _validation_message(exc.errors()))

    app.add_exception_handler(BodyTooLarge, too_large_response)

    @app.exception_handler(UnknownFrame)
    async def unknown(_request: Request, exc: UnknownFrame) -> JSONResponse:
        return _error(HTTPStatus.NOT_FOUND, str(exc))

    @app.exception_handler(ReviewConflict)
    async def conflict(_request: Request, exc: ReviewConflict) -> JSONResponse:
        return _error(HTTPStatus.CONFLICT, str(exc))

    @app.exception_handler(StoreError)
    async def bad(_request: Request, exc: StoreError) -> JSONResponse:
        return _error(HTTPStatus.BAD_REQUEST, str(exc))

    @app.exception_handler(EnrolRefused)
    async def refused(_request: Request, exc: EnrolRefused) -> JSONResponse:
        return _error(HTTPStatus.BAD_REQUEST, str(exc), exc.details)     # the gate's figures beside the reason

    @app.exception_handler(FileNotFoundError)
    async def missing(_request: Request, exc: FileNotFoundError) -> JSONResponse:
        return _error(HTTPStatus.NOT_FOUND, f"image file missing: {exc.filename}")

    @app.exception_handler(ClientDisconnect)           # gone mid-body, or cut off by the body deadline (central.http)
    async def gone(request: Request, _exc: ClientDisconnect) -> JSONResponse:
        log.info("review http: %s %s: the client went away before its body was in", request.method,
                 request.url.path[:200])
        return _error(HTTPStatus.BAD_REQUEST, "body: the client went away before it was in")   # goes nowhere

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # the store's database or disk: say so rather than drop the connection
        log.error("review http: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the store could not answer ({type(exc).__name__}: {exc})")

    @app.get("/", include_in_schema=False)
    @app.get("/review", include_in_schema=False)
    def page() -> Response:
        return _static("review.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        return _static(name)

    @api.get("/labels", summary="the classes a reviewer assigns, new classes so far, defects")
    def labels() -> dict[str, Any]:
        return store.labels()

    @api.get("/stats", summary="counts by status, station, model version and label; the storage quota; the ingest "
                               "service's MQTT callback errors")
    def stats() -> dict[str, Any]:
        return store.stats()

    @api.get("/facets", summary="distinct sites, stations, cameras, model versions, predicted labels: of each the "
                                "ones with the most frames (at most limit), and how many more there are")
    def facets(limit: str | None = None) -> dict[str, Any]:
        return store.facets(limit=None if limit is None else _integer("limit", limit))

    @api.get("/quarantine", summary="the frame messages ingest refused (newest first) and why; read-only")
    def quarantine(limit: str = "50", offset: str = "0") -> dict[str, Any]:
        limit_n, offset_n = _integer("limit", limit), _integer("offset", offset)
        if not 0 <= offset_n <= MAX_OFFSET:
            raise StoreError(f"field offset: {offset_n} is not in 0..{MAX_OFFSET}")
        entries, kept = store.list_quarantine(limit=limit_n, offset=offset_n)
        return {"messages": entries, "kept": kept, "refused": store.counters().get("malformed", 0)}

    @api.get("/frames", summary="a page of frames, filtered and ordered")
    def frames(request: Request, limit: str = "50", offset: str = "0", order: str = "oldest") -> dict[str, Any]:
        query = request.query_params
        unknown_keys = set(query) - set(FILTERS) - {"limit", "offset", "order"}
        if unknown_keys:
            raise StoreError(f"unknown query parameter(s) {', '.join(sorted(unknown_keys))}")
        limit_n, offset_n = _integer("limit", limit), _integer("offset", offset)
        if not 0 <= offset_n <= MAX_OFFSET:
            raise StoreError(f"field offset: {offset_n} is not in 0..{MAX_OFFSET}")
        filters = {k: query.getlist(k)[-1] for k in query if k in FILTERS}
        page_frames, total = store.list(limit=limit_n, offset=offset_n, order=order, **filters)
        return {"frames": page_frames, "total": total}

    @api.get("/frames/{frame_id}", summary="one frame's metadata and review")
    def frame(frame_id: str) -> dict[str, Any]:
        return store.get(frame_id)

    @api.get("/frames/{frame_id}/image", summary="the frame's JPEG", response_class=Response)
    def image(frame_id: str) -> Response:
        return Response(store.image_path(frame_id).read_bytes(), media_type="image/jpeg")

    @api.get("/frames/{frame_id}/context", summary="the ROI the frame was cut from (404 when none was sent)",
             response_class=Response)
    def context(frame_id: str) -> Response:
        path = store.context_path(frame_id)
        if path is None:
            raise HTTPException(HTTPStatus.NOT_FOUND, f"frame {frame_id!r}: no ROI context was sent with it")
        return Response(path.read_bytes(), media_type="image/jpeg")

    @api.post("/frames/{frame_id}/review", summary="label, skip, new class, defect or undo",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ReviewBody.model_json_schema()}}}})
    async def review(frame_id: str, request: Request) -> dict[str, Any]:
        # Read as JSON whatever the Content-Type says (curl -d and urllib send form-urlencoded by default).
        try:
            data = loads_finite(await request.body() or b"{}")
        except ValueError as exc:           # NaN, Infinity and 1e999 included
            raise StoreError(f"body: not JSON ({exc})") from None
        try:
            body = ReviewBody.model_validate(data)
        except ValidationError as exc:
            raise StoreError(_validation_message(exc.errors())) from None
        if not body.action:
            raise StoreError("field action: missing")
        return await run_in_threadpool(store.review, frame_id, body.action, label=body.label,
                                       reviewer=body.reviewer, note=body.note, item=body.item, expect=body.expect)

    @api.get("/enrol", summary="whether this server enrols new classes, into which bundle, at what allowance")
    def enrol_settings() -> dict[str, Any]:
        return enroller.describe() if enroller is not None else {"enabled": False}

    @api.post("/enrol", summary="a new bundle version with a new class, from its reviewed frames (docs/enrol.md)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": EnrolBody.model_json_schema()}}}})
    async def enrol(request: Request) -> dict[str, Any]:
        try:
            body = EnrolBody.model_validate(loads_finite(await request.body() or b"{}"))
        except ValueError as exc:           # not JSON, or not this body (pydantic's error is a ValueError)
            raise StoreError(_validation_message(exc.errors()) if isinstance(exc, ValidationError)
                             else f"body: not JSON ({exc})") from None
        if not body.label:
            raise StoreError("field label: missing")
        if enroller is None:
            raise HTTPException(HTTPStatus.CONFLICT, "enrolment is not configured: start 'python -m central review' "
                                                     "with --enrol-bundle")
        try:
            return await run_in_threadpool(enroller.enrol, body.label, body.reviewer, body.max_drop_points,
                                           body.dry_run)
        except EnrolBusy as exc:
            raise HTTPException(HTTPStatus.CONFLICT, str(exc)) from None

    app.include_router(api)

    @app.api_route("/api/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
                   include_in_schema=False)
    def not_found(rest: str, request: Request) -> Response:
        authorised(request.headers.get("authorization"))
        return _error(HTTPStatus.NOT_FOUND, f"{request.method} /api/{rest}: not found")

    return Guard(app, MAX_BODY)


def _integer(field: str, text: str) -> int:
    if not re.fullmatch(r"-?[0-9]{1,19}", text.strip()):
        raise StoreError(f"field {field}: {text[:40]!r} is not an integer")
    return int(text)


def _error(status: int, message: str, details: dict[str, Any] | None = None) -> JSONResponse:
    return FiniteJSONResponse({"error": message, **(details or {})}, status_code=int(status),
                              headers={"Cache-Control": "no-store"})


def _validation_message(errors: list[dict[str, Any]]) -> str:
    """FastAPI's validation errors in this API's words: the field and what was wrong."""
    extra = sorted(str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden")
    if extra:
        return f"body: unknown field(s) {', '.join(extra)}"
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid"}
    kind, loc = first.get("type", ""), [str(p) for p in first.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        return f"body: not JSON ({first.get('ctx', {}).get('error', first.get('msg'))})"
    if kind in ("model_attributes_type", "dict_type", "model_type") or not loc:
        return "body: expected a JSON object"
    if kind == "string_type":
        return f"field {'/'.join(loc)}: expected a string"
    return f"field {'/'.join(loc)}: {first.get('msg')}"


def _static(name: str) -> Response:
    path = STATIC / name if name in STATIC_FILES else None     # the page's own files only, by name
    if path is None or not path.is_file():
        return _error(HTTPStatus.NOT_FOUND, f"/static/{name[:64]!r}: not found")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    text = kind.startswith("text/") or kind.endswith("javascript")
    # with the Guard's X-Content-Type-Options, X-Frame-Options and Referrer-Policy (central.http.SECURITY_HEADERS)
    return Response(path.read_bytes(), media_type=f"{kind}; charset=utf-8" if text else kind,
                    headers={"Content-Security-Policy": PAGE_CSP})


class ReviewServer(Served):
    """The review app on uvicorn, in a thread (``start``: tests, embedding) or in the foreground (``serve_forever``)."""

    def __init__(self, store: FrameStore, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                 *, no_auth: bool = False, tls_cert: Path | None = None, tls_key: Path | None = None,
                 enroller: Any = None):
        """``token`` None: a random one is made (``self.token``; ``page_url`` carries it), unless ``no_auth``."""
        if no_auth and token:
            raise ValueError("give a token or no_auth, not both")
        self.store = store
        self.token = None if no_auth else token or secrets.token_urlsafe(32)
        super().__init__(create_app(store, self.token, enroller), host, port, name="review", tls_cert=tls_cert,
                         tls_key=tls_key)
        if no_auth:
            warn_no_auth("review", host)

    @property
    def page_url(self) -> str:
        """The page's URL with the token in its fragment, which the page keeps and the browser never sends."""
        return f"{self.url}#token={self.token}" if self.token else self.url


def add_review_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="serve the review page and its HTTP API over a frame store")
    p.add_argument("--store", required=True, type=Path, help="store folder (as written by 'ingest')")
    p.add_argument("--labels-from", type=Path, default=None,
                   help="the classes a reviewer assigns: a bundle folder, a manifest.json or a labels.json")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (0.0.0.0 to serve the network)")
    p.add_argument("--port", type=int, default=8080, help="default 8080; 0: any free port")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", default=None,
                       help="API token: every /api request needs 'Authorization: Bearer <token>' "
                            "(visible in the process list: prefer --token-file)")
    token.add_argument("--token-file", type=Path, default=None,
                       help=f"file whose first line is the API token (default: a random token, made at start and "
                            f"written to <store>/{TOKEN_FILE}, mode 0600)")
    token.add_argument("--no-auth", action="store_true",
                       help="serve the API to anyone who can reach it, without a token (local development only)")
    p.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="its private key (PEM)")
    p.add_argument("--enrol-bundle", type=Path, default=None,
                   help="enable POST /api/enrol: new classes are enrolled into this bundle from their reviewed "
                        "frames, each a new version beside it (docs/enrol.md; needs onnxruntime)")
    p.add_argument("--enrol-sign-key", type=Path, default=None, help="sign enrolled versions with this key")
    p.add_argument("--enrol-public-key", type=Path, default=None, help="check the bundle's signature first")
    p.add_argument("--enrol-gate-data", type=Path, default=None,
                   help="class folders of the old classes' images for the enrolment gate (default: the bundle's "
                        "training run's validation split)")
    p.add_argument("--enrol-max-drop", type=float, default=0.5,
                   help="points of the old classes' accuracy an enrolment may cost (default 0.5; a product that "
                        "looks like a trained one needs more to be recognised: docs/enrol.md, 'How much to allow')")
    p.add_argument("--enrol-max-drop-limit", type=float, default=None,
                   help="the most a reviewer may choose for one enrolment on the page, after seeing its figures "
                        "(default: --enrol-max-drop, no choice)")


def _enroller(store: FrameStore, args) -> Any:
    if getattr(args, "enrol_bundle", None) is None:
        return None
    from central.review.enrol import EnrolSettings, ReviewEnroller

    return ReviewEnroller(store, EnrolSettings(bundle=args.enrol_bundle, sign_key=args.enrol_sign_key,
                                               public_key=args.enrol_public_key, gate_data=args.enrol_gate_data,
                                               max_drop_points=args.enrol_max_drop,
                                               max_drop_limit=args.enrol_max_drop_limit))


def cmd_review(args) -> int:
    labels = labels_from(args.labels_from) if args.labels_from else []
    if not labels:
        log.warning("no --labels-from: reviewers can only add new classes, skip or mark defects")
    token = args.token
    if args.token_file is not None:
        from central.review.ingest import read_secret

        token = read_secret(args.token_file, "--token-file")
    store = FrameStore(args.store, labels=labels)
    made = not token and not args.no_auth
    try:
        enroller = _enroller(store, args)
        if made:
            token = generated_secret(store.root / TOKEN_FILE)
        server = ReviewServer(store, args.host, args.port, token, no_auth=args.no_auth, tls_cert=args.tls_cert,
                              tls_key=args.tls_key, enroller=enroller)
    except StoreError:
        store.close()
        raise
    except OSError as exc:
        store.close()
        if made and exc.filename and TOKEN_FILE in str(exc.filename):
            raise StoreError(f"{exc.filename}: cannot write the API token ({exc.strerror or exc}); "
                             "give one with --token-file") from None
        raise StoreError(f"--host {args.host} --port {args.port}: cannot listen ({exc.strerror or exc})") from None
    if made:
        log.warning("review: API token written to %s (mode 0600); open %s#token=<that token>",
                    store.root / TOKEN_FILE, server.url)
    print(f"review: {server.page_url if made else server.url} "
          f"({store.stats()['by_status']['pending']} frames pending in {args.store})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.stop()
        store.close()
    return 0
