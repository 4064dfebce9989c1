"""Stopping the central HTTP services (``central.http.Served``: the review server, the dashboard, the bundle server).

Real parts: the real commands (``python -m central review`` / ``serve-bundles``) stopped by a real signal, the real
review server, the real dashboard on a real mosquitto, raw sockets on localhost as clients.

Before: Ctrl-C ended ``review`` and ``serve-bundles`` in a KeyboardInterrupt traceback (exit status -2: uvicorn
re-raised the SIGINT it had handled) and SIGTERM killed them (-15) before their clean-up ran. And a stop with a client
holding an answer it did not read (answers to pipelined requests, a dashboard page's event stream) or an event stream
that never ends by itself waited uvicorn's 2 s and then logged "Cancel N running task(s), timeout graceful shutdown
exceeded" (ERROR) and a CancelledError traceback per answer. Now each is cut, counted (``cut_at_shutdown``) and said
in one INFO line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from rollout_support import REPO, wait_until

from central.http import Served

PIPELINED = 800         # requests for the review page's 22 kB script: 18 MB, more than the socket buffers hold


class Records(logging.Handler):
    """Every record of the loggers it is attached to (uvicorn's do not reach the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING or r.exc_info]

    def lines(self, logger: str) -> list[str]:
        return [r.getMessage() for r in self.records if r.name == logger]


@pytest.fixture
def records():
    """Records of uvicorn's and central.http's loggers, once ``attach`` is called: after the servers are made, as
    each ``uvicorn.Config`` sets uvicorn's loggers' handlers anew."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn", "central.http")]
    levels = [logger.level for logger in loggers]

    def attach() -> Records:
        for logger in loggers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        return handler

    handler.attach = attach
    yield handler
    for logger, level in zip(loggers, levels):
        logger.removeHandler(handler)
        logger.setLevel(level)


def not_reading(port: int, request: bytes, times: int = 1) -> socket.socket:
    """A client that sends ``request`` ``times`` times (pipelined) and reads nothing (a 4 kB receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request * times)
    return sock


def holding_back(served: Served) -> int:
    """How many of the server's connections hold a full write buffer (their client is not taking the answer)."""
    return sum(1 for connection in list(served.server.server_state.connections) if connection.flow.write_paused)


# ---------------------------------------------------------------- a signal stops the command cleanly

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["review", "serve-bundles"])
def test_a_signal_stops_the_command_with_one_line_and_status_0(tmp_path, command, sig):
    """Given ``python -m central review`` or ``serve-bundles`` serving, when it gets SIGINT (Ctrl-C) or SIGTERM
    (compose, systemd), then it says so in one line, exits 0 and prints no traceback (before: Ctrl-C ended in a
    KeyboardInterrupt traceback and status -2, SIGTERM killed it with status -15 before its clean-up)."""
    if command == "review":
        (tmp_path / "store").mkdir()
        argv = ["review", "--store", str(tmp_path / "store"), "--no-auth", "--port", "0"]
        name, started = "review", r"review: (http://\S+/)"
    else:
        (tmp_path / "served").mkdir()
        argv = ["serve-bundles", "--root", str(tmp_path / "served"), "--port", "0"]
        name, started = "bundles", r"at (http://\S+/)"
    proc = subprocess.Popen([sys.executable, "-m", "central", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(started, proc.stdout.readline()).group(1)
        wait_until(lambda: answers(url), 60, f"{command} to answer")     # serving: its signal handlers are in place
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "ERROR" not in err, err
    assert f"INFO central.http: {name}: {sig.name} received; stopping" in err, err


def answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=5)
        return True
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------- answers under way at a stop

def test_stopping_the_review_server_cuts_the_answers_its_clients_do_not_read_quietly(tmp_path, records):
    """Given two clients that each pipelined 800 requests for the page's script and read none of the answers (the
    server's write buffer for each is full), when the review server stops, then both are cut, counted, said in one
    INFO line, and uvicorn logs no error (before: "Cancel 2 running task(s), timeout graceful shutdown exceeded" after
    2 s, then an "Exception in ASGI application" CancelledError traceback per client)."""
    from central.review.api import ReviewServer
    from central.review.store import FrameStore

    store = FrameStore(tmp_path / "store", labels=["Shirt", "Bag"])
    server = ReviewServer(store, "127.0.0.1", 0, token="test-token").start()
    records.attach()
    request = b"GET /static/review.js HTTP/1.1\r\nHost: x\r\n\r\n"
    clients = [not_reading(server.port, request, PIPELINED) for _ in range(2)]
    try:
        wait_until(lambda: holding_back(server) == 2, 60, "both clients' write buffers to fill")
        server.stop()
        assert not server._thread.is_alive()
    finally:
        for sock in clients:
            sock.close()
        store.close()
    assert records.errors() == [], records.errors()
    assert server.cut_at_shutdown == {"answers": 2}
    assert records.lines("central.http") == [
        "review stopped: 2 answer(s) under way cut (their clients were not taking them, or they had not ended 2 s "
        "after the stop)"]


def test_stopping_the_dashboard_ends_every_pages_event_stream_quietly(broker, records):
    """Given a page that stopped reading its event stream (its write buffer full) and one that reads, when the
    dashboard stops, then the first is cut, the second's stream ends, and uvicorn logs no error (before: "Cancel 1
    running task(s), timeout graceful shutdown exceeded" after 2 s, then a CancelledError traceback)."""
    from central.dashboard.server import Dashboard
    from contract.broker import BrokerSettings

    dashboard = Dashboard(BrokerSettings(port=broker.port), port=0, web_auth=("viewer", "test-password"))
    dashboard.start()
    records.attach()
    request = b"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " \
        + base64.b64encode(b"viewer:test-password") + b"\r\n\r\n"
    stalled = not_reading(dashboard.http.port, request)
    reader = socket.create_connection(("127.0.0.1", dashboard.http.port), timeout=60)
    reader.sendall(request)
    ended = threading.Event()

    def read() -> None:
        with contextlib.suppress(ConnectionResetError):
            while reader.recv(65536):
                pass
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_until(lambda: dashboard.broadcaster.count == 2, 60, "both pages' streams registered")
        event = b"event: overview\ndata: " + b"x" * 200_000 + b"\n\n"

        def held_back() -> bool:
            if not holding_back(dashboard.http):
                dashboard.broadcaster.publish(event)        # the reader takes them, the stalled page does not
            return holding_back(dashboard.http) == 1

        wait_until(held_back, 120, "the stalled page's write buffer to fill", interval=0.2)
        dashboard.stop()
        assert ended.wait(30), "the reading page's stream did not end"
    finally:
        stalled.close()
        reader.close()
    assert records.errors() == [], records.errors()
    assert dashboard.http.cut_at_shutdown == {"answers": 1}


def test_an_event_stream_that_never_ends_by_itself_is_cut_quietly_after_the_grace(records):
    """Given a ``Served`` app whose event stream ends only when its client goes away, and a client reading it, when
    the server stops, then the stream is cut after the grace (``SHUTDOWN_GRACE_S``), the reader sees its end, and
    uvicorn logs no error (before: "Cancel 1 running task(s)..." and a CancelledError traceback)."""
    from starlette.responses import StreamingResponse

    async def app(scope, receive, send):
        async def keepalives():
            while True:
                yield b": keepalive\n\n"
                await asyncio.sleep(0.1)

        await StreamingResponse(keepalives(), media_type="text/event-stream")(scope, receive, send)

    served = Served(app, "127.0.0.1", 0, name="stream-test").start()
    records.attach()
    reader = socket.create_connection(("127.0.0.1", served.port), timeout=60)
    try:
        reader.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.recv(12).startswith(b"HTTP/1.1 200")
        served.stop()
        with contextlib.suppress(ConnectionResetError):
            while reader.recv(65536):
                pass
    finally:
        reader.close()
    assert records.errors() == [], records.errors()
    assert served.cut_at_shutdown == {"answers": 1}
    assert records.lines("central.http") == [
        "stream-test stopped: 1 answer(s) under way cut (their clients were not taking them, or they had not ended "
        "2 s after the stop)"]


def test_serve_forever_outside_the_main_thread_serves_until_stop(tmp_path):
    """``serve_forever`` installs its signal handlers only in the main thread (Python allows no other); elsewhere it
    serves until ``stop``."""
    from central.rollout import BundleServer

    (tmp_path / "served").mkdir()
    server = BundleServer(tmp_path / "served")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    wait_until(lambda: server.server.started, 60, "the server to start")
    assert httpx.get(f"{server.url}nothing", timeout=30).status_code == 404
    server.stop()
    thread.join(30)
    assert not thread.is_alive()
