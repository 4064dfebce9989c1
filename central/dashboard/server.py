"""HTTP side of the dashboard: the page, ``/api/state`` and the ``/events`` stream (Server-Sent Events).

Standard library only (``ThreadingHTTPServer``). One pusher thread drains the
state's changes every ``push_interval_s`` and broadcasts them, so a burst of
results becomes one update per station per interval, whatever the message rate.
Each browser gets the whole state first (``snapshot``), then the changes; one
that cannot keep up is cut off and its EventSource reconnects to a fresh
snapshot, so a slow browser never holds up the others or grows memory.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable
from urllib.parse import urlsplit

from central.dashboard.feed import StationFeed
from central.dashboard.state import StateLimits, WarehouseState
from contract.broker import BrokerSettings

log = logging.getLogger(__name__)

STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(html|js|css|svg)$")
CONTENT_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
                 "css": "text/css; charset=utf-8", "svg": "image/svg+xml"}
KEEPALIVE_S = 15.0


def sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One Server-Sent Event; JSON has no raw newlines, so it is one ``data:`` line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass(eq=False)
class Listener:
    """One connected browser: a bounded queue of encoded events."""

    events: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=512))
    cut: bool = False


class Broadcaster:
    def __init__(self) -> None:
        self._listeners: set[Listener] = set()
        self._lock = threading.Lock()
        self.closed = threading.Event()

    def add(self) -> Listener:
        listener = Listener()
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
                listener.events.put_nowait(chunk)
            except queue.Full:
                listener.cut = True      # it reconnects and starts again from a snapshot

    def close(self) -> None:
        """End every stream now (an empty chunk wakes its handler), not at its next keepalive."""
        self.closed.set()
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener.events.put_nowait(b"")
            except queue.Full:
                listener.cut = True


class DashboardHandler(BaseHTTPRequestHandler):
    server: "DashboardHTTPServer"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._static("index.html")
        elif path.startswith("/static/"):
            self._static(path[len("/static/"):])
        elif path == "/api/state":
            self._json(HTTPStatus.OK, self.server.state.snapshot())
        elif path == "/events":
            self._events()
        elif path == "/healthz":
            self._json(HTTPStatus.OK, {"ok": True, **self.server.state.health(),
                                       "listeners": self.server.broadcaster.count})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {path!r}",
                                              "paths": ["/", "/api/state", "/events", "/healthz"]})

    def _json(self, status: HTTPStatus, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _static(self, name: str) -> None:
        item = resources.files("central.dashboard").joinpath("static", name) if STATIC_NAME.match(name) else None
        if item is None or not item.is_file():
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no static file {name!r}"})
            return
        data = item.read_bytes()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", CONTENT_TYPES[name.rsplit(".", 1)[1]])
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(data)

    def _events(self) -> None:
        broadcaster = self.server.broadcaster
        listener = broadcaster.add()       # before the snapshot: no change falls between the two
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.send_header("X-Accel-Buffering", "no")       # a reverse proxy must not buffer the stream
            self.end_headers()
            self.close_connection = True
            snapshot = self.server.state.snapshot()
            self.wfile.write(b"retry: 2000\n" + sse("snapshot", snapshot, snapshot["version"]))
            self.wfile.flush()
            while not broadcaster.closed.is_set() and not listener.cut:
                try:
                    chunk = listener.events.get(timeout=KEEPALIVE_S)
                except queue.Empty:
                    chunk = b": keepalive\n\n"
                if not chunk:
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass                            # the browser went away
        finally:
            broadcaster.remove(listener)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("http %s: " + fmt, self.address_string(), *args)


class DashboardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: WarehouseState, broadcaster: Broadcaster) -> None:
        self.state = state
        self.broadcaster = broadcaster
        super().__init__(address, DashboardHandler)


class Dashboard:
    """The one place that wires the MQTT feed, the state, the pusher and the HTTP server."""

    def __init__(self, mqtt: BrokerSettings, *, host: str = "127.0.0.1", port: int = 8090,
                 limits: StateLimits | None = None, push_interval_s: float = 0.25,
                 clock: Callable[[], float] = time.time) -> None:
        mqtt.check()
        self.state = WarehouseState(topic_root=mqtt.topic_root, limits=limits, clock=clock)
        self.feed = StationFeed(mqtt, self.state)
        self.broadcaster = Broadcaster()
        self.push_interval_s = push_interval_s
        self.http = DashboardHTTPServer((host, port), self.state, self.broadcaster)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> None:
        self.feed.start()
        self._threads = [threading.Thread(target=self.http.serve_forever, name="dashboard-http", daemon=True),
                         threading.Thread(target=self._push_loop, name="dashboard-push", daemon=True)]
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
        self.http.shutdown()
        self.http.server_close()
        self.feed.stop()
        for thread in self._threads:
            thread.join(timeout=5)
