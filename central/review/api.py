"""The review page and its HTTP API, over a FrameStore.

``python -m central review --store DIR --labels-from models/<name>/<version>``. A FastAPI app on
uvicorn (``central.http``); JSON in and out, its OpenAPI schema at ``/api/openapi.json``. Endpoints
(all under the server's root):

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
Errors are JSON ``{"error": "..."}`` with 400 (bad field, named), 401, 403 (a browser POST from another
origin), 404 (no such frame), 405, 413 (a body over 64 KiB, whatever its Content-Length says), or 500 (the
store's database or disk failed; logged with the request). ``--tls-cert``/``--tls-key`` serve HTTPS.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import mimetypes
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from central.http import BodyTooLarge, Guard, Served, too_large_response
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


REVIEW_FIELDS = ("action", "label", "reviewer", "note")


class ReviewBody(BaseModel):
    """A review of one frame; the store checks the action and the label against the classes."""

    model_config = ConfigDict(extra="forbid", strict=True)

    action: str | None = Field(None, description="label | skip | new_class | defect | undo")
    label: str | None = Field(None, description="the class (label), the new class name (new_class) or the defect")
    reviewer: str | None = None
    note: str | None = None


def create_app(store: FrameStore, token: str | None = None) -> FastAPI:
    """The review page and API over ``store`` (an ASGI app; ``ReviewServer`` serves it)."""

    def authorised(authorization: str | None = Header(None)) -> None:
        if not token:
            return
        given = authorization or ""
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
            raise HTTPException(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send 'Authorization: Bearer <token>'")

    app = FastAPI(title="Review API", version="1", openapi_url="/api/openapi.json", docs_url=None, redoc_url=None,
                  description="Label the low-confidence frames stations sent back (docs/loop.md).")
    api = APIRouter(prefix="/api", dependencies=[Depends(authorised)])

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(HTTPStatus.BAD_REQUEST, _validation_message(exc.errors()))

    app.add_exception_handler(BodyTooLarge, too_large_response)

    @app.exception_handler(UnknownFrame)
    async def unknown(_request: Request, exc: UnknownFrame) -> JSONResponse:
        return _error(HTTPStatus.NOT_FOUND, str(exc))

    @app.exception_handler(StoreError)
    async def bad(_request: Request, exc: StoreError) -> JSONResponse:
        return _error(HTTPStatus.BAD_REQUEST, str(exc))

    @app.exception_handler(FileNotFoundError)
    async def missing(_request: Request, exc: FileNotFoundError) -> JSONResponse:
        return _error(HTTPStatus.NOT_FOUND, f"image file missing: {exc.filename}")

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

    @api.get("/stats", summary="counts by status, station, model version and label; the storage quota")
    def stats() -> dict[str, Any]:
        return store.stats()

    @api.get("/facets", summary="distinct sites, stations, cameras, model versions, predicted labels")
    def facets() -> dict[str, Any]:
        return store.facets()

    @api.get("/frames", summary="a page of frames, filtered and ordered")
    def frames(request: Request, limit: str = "50", offset: str = "0", order: str = "oldest") -> dict[str, Any]:
        query = request.query_params
        unknown_keys = set(query) - set(FILTERS) - {"limit", "offset", "order"}
        if unknown_keys:
            raise StoreError(f"unknown query parameter(s) {', '.join(sorted(unknown_keys))}")
        try:
            limit_n, offset_n = int(limit), int(offset)
        except ValueError:
            raise StoreError("field limit/offset: not an integer") from None
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
            body = ReviewBody.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            raise StoreError(_validation_message(exc.errors())) from None
        if not body.action:
            raise StoreError("field action: missing")
        return await run_in_threadpool(store.review, frame_id, body.action, label=body.label,
                                       reviewer=body.reviewer, note=body.note)

    app.include_router(api)

    @app.api_route("/api/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
                   include_in_schema=False)
    def not_found(rest: str, request: Request) -> Response:
        authorised(request.headers.get("authorization"))
        return _error(HTTPStatus.NOT_FOUND, f"{request.method} /api/{rest}: not found")

    return Guard(app, MAX_BODY)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=int(status), headers={"Cache-Control": "no-store"})


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
    path = (STATIC / name).resolve()
    if STATIC.resolve() not in path.parents or not path.is_file():
        return _error(HTTPStatus.NOT_FOUND, f"/static/{name}: not found")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    text = kind.startswith("text/") or kind.endswith("javascript")
    return Response(path.read_bytes(), media_type=f"{kind}; charset=utf-8" if text else kind)


class ReviewServer(Served):
    """The review app on uvicorn, in a thread (``start``: tests, embedding) or in the foreground (``serve_forever``)."""

    def __init__(self, store: FrameStore, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                 *, tls_cert: Path | None = None, tls_key: Path | None = None):
        self.store = store
        self.token = token
        super().__init__(create_app(store, token), host, port, name="review", tls_cert=tls_cert, tls_key=tls_key)


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
    p.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="its private key (PEM)")


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
        server = ReviewServer(store, args.host, args.port, token, tls_cert=args.tls_cert, tls_key=args.tls_key)
    except OSError as exc:
        store.close()
        raise StoreError(f"--host {args.host} --port {args.port}: cannot listen ({exc.strerror or exc})") from None
    print(f"review: {server.url} ({store.stats()['by_status']['pending']} frames pending in {args.store})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.stop()
        store.close()
    return 0
