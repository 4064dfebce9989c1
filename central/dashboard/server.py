"""HTTP side of the dashboard: the page, ``/api/state`` and the ``/events`` stream (Server-Sent Events).

A Starlette app on uvicorn (``central.http``). One pusher thread drains the state's changes every
``push_interval_s`` and broadcasts them, so a burst of results becomes one update per station per
interval, whatever the message rate. Each browser gets the whole state first (``snapshot``), then the
changes; one that cannot keep up is cut off and its EventSource reconnects to a fresh snapshot, so a slow
browser never holds up the others or grows memory. A stream waits on an asyncio queue of its own (no
thread per browser); the pusher hands it chunks with ``call_soon_threadsafe``.

Every path but ``/healthz`` asks for a password (HTTP Basic, which the page's EventSource sends too):
the one given, or one made at start (``web_auth``), unless ``no_auth``. Every answer is strict JSON
(``dumps_finite``), errors included (``{"error": ...}`` naming the path or the method).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from central.dashboard.feed import StationFeed
from central.dashboard.state import StateLimits, WarehouseState
from central.http import BasicAuth, Guard, Served, warn_no_auth
from contract.broker import BrokerSettings
from contract.messages import dumps_finite

log = logging.getLogger(__name__)

STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(html|js|css|svg)$")
CONTENT_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
                 "css": "text/css; charset=utf-8", "svg": "image/svg+xml"}
KEEPALIVE_S = 15.0
QUEUE_EVENTS = 512
PATHS = ["/", "/api/state", "/events", "/healthz"]
WEB_USER = "viewer"


class StrictJSONResponse(JSONResponse):
    """JSON that is valid for every browser: NaN or an infinity is an error here, never sent."""

    def render(self, content: Any) -> bytes:
        return dumps_finite(content, ensure_ascii=False, separators=(",", ":")).encode()


def sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One Server-Sent Event; JSON has no raw newlines, so it is one ``data:`` line (strict: no NaN)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {dumps_finite(data, separators=(',', ':'))}\n\n".encode()


@dataclass(eq=False)
class Listener:
    """One connected browser: a bounded queue of encoded events on the server's event loop."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=QUEUE_EVENTS))
    cut: bool = False

    def offer(self, chunk: bytes) -> None:
        """On the loop: queue ``chunk``, or cut the listener off when it is full (it reconnects)."""
        try:
            self.events.put_nowait(chunk)
        except asyncio.QueueFull:
            self.cut = True              # its generator sees it at the next chunk and ends the stream


class Broadcaster:
    """Every connected stream; ``publish`` and ``close`` may be called from any thread."""

    def __init__(self) -> None:
        self._listeners: set[Listener] = set()
        self._lock = threading.Lock()
        self.closed = threading.Event()

    def add(self, loop: asyncio.AbstractEventLoop) -> Listener:
        listener = Listener(loop)
        with self._lock:
            self._listeners.add(listener)
        return listener

    def remove(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.discard(listener)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._listeners)

    def publish(self, chunk: bytes) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener.loop.call_soon_threadsafe(listener.offer, chunk)
            except RuntimeError:         # its loop is closed: the server is stopping
                listener.cut = True

    def close(self) -> None:
        """End every stream now (an empty chunk wakes its generator), not at its next keepalive."""
        self.closed.set()
        self.publish(b"")


def create_app(state: WarehouseState, broadcaster: Broadcaster) -> Any:
    """The dashboard's ASGI app over ``state``; streams get their changes from ``broadcaster``."""

    async def page(_request: Request) -> Response:
        return _static("index.html")

    async def static(request: Request) -> Response:
        return _static(request.path_params["name"])

    async def api_state(_request: Request) -> Response:
        return StrictJSONResponse(state.snapshot())

    async def healthz(_request: Request) -> Response:
        return StrictJSONResponse({"ok": True, **state.health(), "listeners": broadcaster.count})

    async def events(request: Request) -> Response:
        listener = broadcaster.add(asyncio.get_running_loop())   # before the snapshot: no change falls between
        snapshot = state.snapshot()

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 2000\n" + sse("snapshot", snapshot, snapshot["version"])
                while not broadcaster.closed.is_set() and not listener.cut:
                    try:
                        chunk = await asyncio.wait_for(listener.events.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        chunk = b": keepalive\n\n"
                    if not chunk or listener.cut:
                        break
                    yield chunk
            finally:
                broadcaster.remove(listener)

        return StreamingResponse(stream(), headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                                    "X-Accel-Buffering": "no"})   # a proxy must not buffer it

    async def not_found(request: Request, _exc: Exception) -> Response:
        return StrictJSONResponse({"error": f"no such path {request.url.path!r}", "paths": PATHS}, status_code=404)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        detail = f"method {request.method} not allowed on {request.url.path!r} (GET or HEAD)" \
            if exc.status_code == 405 else f"{request.url.path!r}: {exc.detail}"
        return StrictJSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    routes = [Route(path, endpoint, methods=["GET", "HEAD"]) for path, endpoint in (
        ("/", page), ("/index.html", page), ("/static/{name:path}", static), ("/api/state", api_state),
        ("/healthz", healthz), ("/events", events))]
    app = Starlette(routes=routes, exception_handlers={404: not_found, HTTPException: http_error})
    return Guard(app, max_bytes=4096)


def _static(name: str) -> Response:
    item = resources.files("central.dashboard").joinpath("static", name) if STATIC_NAME.match(name) else None
    if item is None or not item.is_file():
        return StrictJSONResponse({"error": f"no static file {name[:200]!r}"}, status_code=404)
    return Response(item.read_bytes(), media_type=CONTENT_TYPES[name.rsplit(".", 1)[1]],
                    headers={"Cache-Control": "no-cache"})


class Dashboard:
    """The one place that wires the MQTT feed, the state, the pusher and the HTTP server."""

    def __init__(self, mqtt: BrokerSettings, *, host: str = "127.0.0.1", port: int = 8090,
                 limits: StateLimits | None = None, push_interval_s: float = 0.25,
                 web_auth: tuple[str, str] | None = None, no_auth: bool = False, tls_cert: Path | None = None,
                 tls_key: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        """``web_auth`` (user, password) None: a random password for user ``viewer`` (``self.web_auth``),
        unless ``no_auth``, which serves the page to anyone who can reach it (logged as a warning)."""
        if no_auth and web_auth is not None:
            raise ValueError("give a web password or no_auth, not both")
        mqtt.check()
        self.state = WarehouseState(topic_root=mqtt.topic_root, limits=limits, clock=clock)
        self.feed = StationFeed(mqtt, self.state)
        self.broadcaster = Broadcaster()
        self.push_interval_s = push_interval_s
        app = create_app(self.state, self.broadcaster)
        self.web_auth = None if no_auth else web_auth or (WEB_USER, secrets.token_urlsafe(24))
        if self.web_auth is not None:
            app = BasicAuth(app, *self.web_auth, realm="inventory dashboard", open_paths=("/healthz",))
        self.http = Served(app, host, port, name="dashboard", tls_cert=tls_cert, tls_key=tls_key)
        if no_auth:
            warn_no_auth("dashboard", host)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        return self.http.host, self.http.port

    @property
    def url(self) -> str:
        return f"{self.http.scheme}://{self.http.host}:{self.http.port}/"

    def start(self) -> None:
        self.feed.start()
        self.http.start()
        self._threads = [threading.Thread(target=self._push_loop, name="dashboard-push", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("dashboard: serving %s", self.url)

    def _push_loop(self) -> None:
        while not self._stop.wait(self.push_interval_s):
            try:
                # nobody watching: forget the changes (a new page starts from a snapshot anyway)
                for name, data in self.state.drain_changes(watched=lambda: self.broadcaster.count > 0):
                    self.broadcaster.publish(sse(name, data, data.get("version")))
            except Exception:   # noqa: BLE001 - the page must keep updating
                log.exception("dashboard: pushing changes failed")

    def stop(self) -> None:
        self._stop.set()
        self.broadcaster.close()
        self.http.stop()
        self.feed.stop()
        for thread in self._threads:
            thread.join(timeout=5)
