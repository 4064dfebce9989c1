"""HTTP side of the dashboard: the page, the JSON API and the ``/events`` stream (Server-Sent Events).

A Starlette app on uvicorn (``central.http``). ``/api/overview`` is the fleet summary, ``/api/stations``
one page of the searched and filtered station list (degraded first), ``/api/stations/{site}/{station}``
one station's card (with its open shipment), ``/api/shipments`` the open and recently closed shipments
(receipt.v1), ``/api/state`` everything (every station's whole view; for scripts and tests, large
with a big fleet). One pusher thread (``Pusher``) wakes every ``push_interval_s`` and sends each open page
only what it shows and what changed: the overview, its page of the list, its open card. A stream's query
(``/events?site=&state=&model=&q=&limit=&offset=&station=``) says what it shows; the page reconnects when
that changes. One that cannot keep up is cut off and its EventSource reconnects to fresh views, so a slow
browser never holds up the others or grows memory. A stream waits on an asyncio queue of its own (no
thread per browser); the pusher hands it chunks with ``call_soon_threadsafe``. Every other endpoint is a plain
function, run on Starlette's thread pool: ``/api/state`` of a thousand stations takes a second to build and
encode, and on the event loop it held up every stream and ``/healthz`` as long (seconds, with a few scripts).

Every path but ``/healthz`` asks for a password (HTTP Basic, which the page's EventSource sends too):
the one given, or one made at start (``web_auth``), unless ``no_auth``. Every answer is strict JSON
(``dumps_finite``), errors included (``{"error": ...}`` naming the path, the parameter or the method).
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
from central.dashboard.overview import QueryError, parse_query
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
QUEUE_BYTES = 4 << 20    # a page that has not taken this much is cut off (a full station list is ~100 kB an event)
MAX_LISTENERS = 256      # open pages at once; more get a 503 (each holds a connection and its queue)
REFRESH_S = 5.0          # views are rebuilt at least this often (rolling windows, ages), changes or not
PATHS = ["/", "/api/overview", "/api/shipments", "/api/stations", "/api/stations/{site}/{station}", "/api/state",
         "/events", "/healthz"]
WEB_USER = "viewer"
# The page runs only its own files: no inline script, handler or style attribute runs, so text from a station that
# ever reached the page as markup could not run there either; data: is for the alerts' JPEG thumbnails only.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


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
    """One connected page: what it shows (its station-list query and open card), a bounded queue of encoded
    events on the server's event loop, and what was last sent to it (touched only by the pusher thread)."""

    loop: asyncio.AbstractEventLoop
    query: dict[str, Any] = field(default_factory=lambda: parse_query({}))
    card: str | None = None
    events: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=QUEUE_EVENTS))
    cut: bool = False
    fresh: bool = True
    sent: dict[str, Any] = field(default_factory=dict)
    queued_bytes: int = 0

    def offer(self, chunk: bytes) -> None:
        """On the loop: queue ``chunk``, or cut the listener off when it holds too many events or bytes (it
        reconnects to fresh views). A cut listener's queue is emptied at once: a page that stopped reading
        keeps nothing in memory while its connection waits for TCP to give up."""
        if self.cut:
            return
        if self.queued_bytes + len(chunk) > QUEUE_BYTES or self.events.full():
            self.cut = True              # its generator sees it at the next chunk and ends the stream
            while not self.events.empty():
                self.events.get_nowait()
            self.queued_bytes = 0
            self.events.put_nowait(b"")  # wakes a generator waiting for a chunk
            return
        self.events.put_nowait(chunk)
        self.queued_bytes += len(chunk)

    def taken(self, chunk: bytes) -> None:
        """On the loop: the generator took ``chunk`` off the queue."""
        self.queued_bytes = max(0, self.queued_bytes - len(chunk))

    def send(self, chunk: bytes) -> None:
        """From any thread."""
        try:
            self.loop.call_soon_threadsafe(self.offer, chunk)
        except RuntimeError:             # its loop is closed: the server is stopping
            self.cut = True


class Broadcaster:
    """Every connected stream; may be called from any thread. ``wake`` tells the pusher a page is waiting."""

    def __init__(self) -> None:
        self._listeners: set[Listener] = set()
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self.wake = threading.Event()

    def add(self, listener: Listener) -> Listener:
        with self._lock:
            self._listeners.add(listener)
        self.wake.set()
        return listener

    def remove(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.discard(listener)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._listeners)

    def listeners(self) -> list[Listener]:
        with self._lock:
            return list(self._listeners)

    def publish(self, chunk: bytes) -> None:
        for listener in self.listeners():
            listener.send(chunk)

    def close(self) -> None:
        """End every stream now (an empty chunk wakes its generator), not at its next keepalive."""
        self.closed.set()
        self.publish(b"")


class Pusher:
    """Builds what each open page needs and sends only what changed for it.

    Once per round: the station rows (one pass over the stations), the overview (shared by every page),
    one station-list page per distinct query, and the card of each station a page has open when that
    station changed. A page gets ``overview`` when it differs from the one it has, ``stations`` (the whole
    page: rows, order, total) when the page's keys or total changed, else ``rows`` with only the rows that
    changed, and ``station`` (the card). So the stream follows what one page shows, not the fleet size.
    """

    def __init__(self, state: WarehouseState, broadcaster: Broadcaster, clock: Callable[[], float]) -> None:
        self.state, self.broadcaster, self.clock = state, broadcaster, clock
        self._built_at = 0.0

    def round(self) -> int:
        """One push round; returns the bytes queued for all pages."""
        changes = self.state.drain_changes(watched=lambda: self.broadcaster.count > 0)
        listeners = [lst for lst in self.broadcaster.listeners() if not lst.cut]
        now = self.clock()
        fresh = [lst for lst in listeners if lst.fresh]
        if not listeners or not (changes or fresh or now - self._built_at >= REFRESH_S):
            return 0
        self._built_at = now
        rows = self.state.rows(now)
        overview = sse("overview", self.state.overview(now, rows))
        pages: dict[tuple, dict[str, Any]] = {}
        sent = 0
        for listener in listeners:
            key = tuple(sorted(listener.query.items()))
            if key not in pages:
                pages[key] = self.state.station_page(listener.query, now, rows)
            chunks = self._for(listener, overview, pages[key], changes.stations, now)
            listener.fresh = False
            for chunk in chunks:
                listener.send(chunk)
                sent += len(chunk)
        return sent

    def _for(self, listener: Listener, overview: bytes, page: dict[str, Any], changed: set[str],
             now: float) -> list[bytes]:
        chunks = []
        if listener.fresh or listener.sent.get("overview") != overview:
            listener.sent["overview"] = overview
            chunks.append(overview)
        rows = {row["key"]: row for row in page["stations"]}
        before: dict[str, Any] = listener.sent.get("rows") or {}
        if listener.fresh or list(rows) != list(before) or page["total"] != listener.sent.get("total"):
            chunks.append(sse("stations", page))
        else:
            differ = [row for key, row in rows.items() if before.get(key) != row]
            if differ:
                chunks.append(sse("rows", {"stations": differ}))
        listener.sent.update(rows=rows, total=page["total"])
        if listener.card and (listener.fresh or listener.card in changed):
            card = self.state.station_card(listener.card, now)
            chunks.append(sse("station", card if card is not None else missing_station(listener.card, self.state)))
        return chunks


def missing_station(key: str, state: WarehouseState) -> dict[str, Any]:
    return {"key": key, "error": f"no station {key[:200]!r}: it has sent nothing this dashboard has seen "
                                 f"({len(state.stations)} stations known)"}


def create_app(state: WarehouseState, broadcaster: Broadcaster) -> Any:
    """The dashboard's ASGI app over ``state``; streams get their changes from ``broadcaster``."""

    def page(_request: Request) -> Response:
        return _static("index.html")

    def static(request: Request) -> Response:
        return _static(request.path_params["name"])

    whole_state = threading.Lock()

    def api_state(_request: Request) -> Response:
        # one at a time: a few scripts at once took the state's lock in turns for seconds, and the pusher (every
        # page) and /healthz waited behind all of them
        with whole_state:
            return StrictJSONResponse(state.snapshot())

    def api_overview(_request: Request) -> Response:
        return StrictJSONResponse(state.overview())

    def api_shipments(_request: Request) -> Response:
        return StrictJSONResponse(state.shipment_list())

    def api_stations(request: Request) -> Response:
        try:
            query = parse_query(dict(request.query_params))
        except QueryError as exc:
            return StrictJSONResponse({"error": f"{request.url.path}: {exc}"}, status_code=400)
        return StrictJSONResponse(state.station_page(query))

    def api_station(request: Request) -> Response:
        key = f"{request.path_params['site']}/{request.path_params['station']}"
        card = state.station_card(key)
        if card is None:
            return StrictJSONResponse({"error": missing_station(key, state)["error"]}, status_code=404)
        return StrictJSONResponse(card)

    def healthz(_request: Request) -> Response:
        return StrictJSONResponse({"ok": True, **state.health(), "listeners": broadcaster.count})

    async def events(request: Request) -> Response:
        params = dict(request.query_params)
        try:
            query = parse_query(params)
        except QueryError as exc:
            return StrictJSONResponse({"error": f"{request.url.path}: {exc}"}, status_code=400)
        card = params.get("station") or None
        if card is not None and len(card) > 300:
            return StrictJSONResponse({"error": "/events: parameter station: longer than 300 characters"},
                                      status_code=400)
        if broadcaster.count >= MAX_LISTENERS:
            return StrictJSONResponse({"error": f"/events: {MAX_LISTENERS} pages are open already; try again later"},
                                      status_code=503, headers={"Retry-After": "10"})
        listener = broadcaster.add(Listener(asyncio.get_running_loop(), query, card))   # the pusher sends all first

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 2000\n\n"
                while not broadcaster.closed.is_set() and not listener.cut:
                    try:
                        chunk = await asyncio.wait_for(listener.events.get(), KEEPALIVE_S)
                        listener.taken(chunk)
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
        ("/api/overview", api_overview), ("/api/shipments", api_shipments), ("/api/stations", api_stations),
        ("/api/stations/{site}/{station}", api_station), ("/healthz", healthz), ("/events", events))]
    app = Starlette(routes=routes, exception_handlers={404: not_found, HTTPException: http_error})
    return Guard(app, max_bytes=4096)


def _static(name: str) -> Response:
    item = resources.files("central.dashboard").joinpath("static", name) if STATIC_NAME.match(name) else None
    if item is None or not item.is_file():
        return StrictJSONResponse({"error": f"no static file {name[:200]!r}"}, status_code=404)
    return Response(item.read_bytes(), media_type=CONTENT_TYPES[name.rsplit(".", 1)[1]],
                    headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP})


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
        self.pusher = Pusher(self.state, self.broadcaster, clock)
        self.push_interval_s = push_interval_s
        app = create_app(self.state, self.broadcaster)
        self.web_auth = None if no_auth else web_auth or (WEB_USER, secrets.token_urlsafe(24))
        if self.web_auth is not None:
            app = BasicAuth(app, *self.web_auth, realm="inventory dashboard", open_paths=("/healthz",))
        self.http = Served(app, host, port, name="dashboard", tls_cert=tls_cert, tls_key=tls_key,
                           tls_flags=("--web-tls-cert", "--web-tls-key"))
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
        wake = self.broadcaster.wake
        while not self._stop.is_set():
            wake.wait(self.push_interval_s)      # a new page is served at once, changes once per interval
            wake.clear()
            if self._stop.is_set():
                break
            try:
                self.pusher.round()
            except Exception:   # noqa: BLE001 - the page must keep updating
                log.exception("dashboard: pushing changes failed")

    def stop(self) -> None:
        self._stop.set()
        self.broadcaster.wake.set()
        self.broadcaster.close()
        self.http.stop()
        self.feed.stop()
        for thread in self._threads:
            thread.join(timeout=5)
