"""Serving the central HTTP services: an ASGI app on uvicorn, in a thread or in the foreground.

The review API, the dashboard and the bundle server are ASGI apps (FastAPI / Starlette); ``Served``
binds the listening socket itself (so "cannot listen" is an ``OSError`` at construction, naming the
address, not a log line from a server thread), then runs uvicorn on it. ``Guard`` refuses request
bodies over a size, whatever the client claims (a ``Content-Length`` that is not a non-negative
number, or larger than the limit, is answered 400/413 before the app reads anything, and a chunked
body is cut off as soon as it passes the limit) and cross-site writes; ``BasicAuth`` asks for a
password. The services are authenticated unless the operator opts out: with no secret given, one is
made at start (``generated_secret``) and written to a file only its owner can read. A client gets
``HEAD_TIMEOUT_S`` to send each request's head (its request line and headers): uvicorn's only timer is the
keep-alive one, so a client that sent half a head, or dripped it a byte at a time, held its connection
for ever, and a few thousand of them every file descriptor the server has. Then it gets ``BODY_TIMEOUT_S``
from its head to send the whole body: a client that dripped its body (one byte every few seconds, each byte
resetting no timer) held its connection and the request's task for ever too. One that is late gets a JSON 408
and its connection closed. And a client that stops reading an answer (a bundle download, an event stream) while
the server holds 64 KiB of it unsent is closed when it has taken no byte for ``WRITE_STALL_S``: before, it
held its connection, the answer's task and its open file for ever. Each is logged and counted
(``Served.timed_out``). A request without a body (every GET, the dashboard's event stream) has no body deadline,
and an answer that the client keeps reading is never cut, however long it takes.

A stop (``Served.stop``; SIGINT or SIGTERM in ``serve_forever``) cuts at once each answer whose client is not taking
it (its write buffer full; one whose buffer fills later, as soon as it does) and gives the others
``SHUTDOWN_GRACE_S`` to end; what is still under way then (an event stream, a slow answer) is cut too. A cut answer
ends as one whose client went away, quietly; they are counted (``Served.cut_at_shutdown``) and logged in one line.
Before, uvicorn waited 2 s for them and then cancelled their tasks: an ERROR line and a CancelledError traceback per
answer. ``serve_forever`` handles SIGINT and SIGTERM itself and returns: uvicorn re-raised the signal it had handled,
so Ctrl-C ended in a KeyboardInterrupt traceback (status 130) and SIGTERM killed the process before the command's own
clean-up (closing the review store) ran.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 30.0       # to send a request's head, from the connection (or the previous answer) on
BODY_TIMEOUT_S = 60.0       # to send a request's whole body, from its head on (64 KiB, the largest taken: >= 1.1 kB/s)
WRITE_STALL_S = 120.0       # to take any byte of an answer while the server holds 64 KiB of it unsent
SHUTDOWN_GRACE_S = 2.0      # at a stop, for the answers under way whose clients take them to end, before they are cut
CUT_ENDS_S = 5.0            # then for a cut answer's task to end, before uvicorn cancels it (a traceback each)


class Guard:
    """ASGI middleware in front of a central app (pure ASGI, so a streamed response is never buffered).

    - request bodies of at most ``max_bytes``: JSON ``{"error": ...}`` with 400 or 413 otherwise;
    - ``same_origin_writes``: a POST/PUT/PATCH/DELETE whose ``Origin`` names another host than the request's
      ``Host``, or that a browser marks ``Sec-Fetch-Site: cross-site``, is refused with 403 (a page on another
      site; scripts send neither header);
    - ``no_store``: every response carries ``Cache-Control: no-store`` unless it sets its own.
    """

    def __init__(self, app: Any, max_bytes: int, *, same_origin_writes: bool = True, no_store: bool = True) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.same_origin_writes = same_origin_writes
        self.no_store = no_store

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        refused = self._cross_site(scope["method"], headers) if self.same_origin_writes else None
        if refused:
            await _error(send, 403, refused)
            return
        declared = headers.get(b"content-length")
        if declared is not None:
            text = declared.decode("latin-1").strip()
            if not (text.isascii() and text.isdigit()):      # "-1", "1e3", "²" (a latin-1 digit): refused
                await _error(send, 400, f"header Content-Length: {text[:40]!r} is not a non-negative number")
                return
            if len(text.lstrip("0")) > 18 or int(text) > self.max_bytes:   # no int() of a 5,000-digit number
                await _error(send, 413, f"body: larger than {self.max_bytes} bytes")
                return
        seen = 0
        answered = gone = False

        async def limited() -> dict[str, Any]:
            nonlocal seen, gone
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            elif message["type"] == "http.disconnect":
                gone = True
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                given = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in given]
                if self.no_store and b"cache-control" not in given:
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, limited, watched_send)
        except BodyTooLarge:
            if not answered:
                await _error(send, 413, f"body: larger than {self.max_bytes} bytes")
        except Exception as exc:
            if not gone:
                raise
            # the client went away (or was cut off at a deadline) and the app failed on it: no one to answer, and
            # no "Exception in ASGI application" traceback for what a client did
            log.info("%s %s: the client went away; the request ended (%s)", scope["method"],
                     scope["path"][:200], type(exc).__name__)

    @staticmethod
    def _cross_site(method: str, headers: dict[bytes, bytes]) -> str | None:
        """Why a state-changing request comes from another site's page, or None."""
        if method not in ("POST", "PUT", "PATCH", "DELETE"):
            return None
        origin = headers.get(b"origin")
        if origin is not None:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            try:
                netloc = urlparse(origin.decode("latin-1")).netloc.lower()
            except ValueError:          # e.g. "http://[" : not an origin this server has
                netloc = None
            if netloc != host:
                return f"header Origin: {method} from another origin ({origin.decode('latin-1')!r}) refused"
        if headers.get(b"sec-fetch-site", b"").strip().lower() == b"cross-site":
            return f"header Sec-Fetch-Site: {method} from another site's page refused"
        return None


# on every answer: no type sniffing, no framing (a page's one-click decisions cannot be clickjacked), no Referer
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", b"frame-ancestors 'none'"), (b"referrer-policy", b"no-referrer"))


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a body passes the limit; apps answer it with 413 (``too_large_response``)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"body: larger than {max_bytes} bytes")


def too_large_response(_request: Any, exc: BodyTooLarge) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": str(exc)}, status_code=413, headers={"Cache-Control": "no-store"})


async def _error(send: Any, status: int, message: str, *extra: tuple[bytes, bytes]) -> None:
    """A JSON ``{"error": message}`` response straight from the middleware, with ``extra`` headers."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *extra]})
    await send({"type": "http.response.body", "body": body})


def generated_secret(path: Path) -> str:
    """A fresh random secret (32 random bytes, URL-safe text), written to ``path`` readable by its owner only.

    The file is created with mode 0600 under a temporary name and renamed into place, so the secret is
    never readable by others, not even for a moment. OSError (naming ``path``) when it cannot be written.
    """
    secret = secrets.token_urlsafe(32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secret + "\n")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return secret


def warn_no_auth(service: str, host: str) -> None:
    """Say loudly that ``service`` runs open to anyone who can reach ``host``."""
    where = "this machine" if host in ("127.0.0.1", "::1", "localhost") else f"anyone who can reach {host}"
    log.warning("%s: --no-auth: NO AUTHENTICATION; %s can read and change everything it serves "
                "(for local development only)", service, where)


class BasicAuth:
    """ASGI middleware: HTTP Basic authentication on every path but ``open_paths`` (a health check).

    Browsers ask once and send the credentials with every same-origin request, the page's EventSource
    included, which a bearer token in JavaScript could not do. Compared in constant time.
    """

    def __init__(self, app: Any, user: str, password: str, *, realm: str, open_paths: tuple[str, ...] = ()) -> None:
        import base64

        self.app = app
        self.expected = b"Basic " + base64.b64encode(f"{user}:{password}".encode())
        self.realm = realm
        self.open_paths = open_paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import hmac

        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _error(send, 401, "authentication required",
                             (b"www-authenticate", f'Basic realm="{self.realm}"'.encode()))
                return
        await self.app(scope, receive, send)


def head_deadline_protocol(timeout_s: float, name: str, body_timeout_s: float = BODY_TIMEOUT_S,
                           timed_out: dict[str, int] | None = None, write_stall_s: float = WRITE_STALL_S,
                           on_cut: Callable[[], None] = lambda: None) -> type:
    """uvicorn's h11 protocol with a deadline for each request's head: ``timeout_s`` from the connection, or from
    the answer before on a kept-alive one, until the request line and headers are in; then the connection is
    closed. And one for its body: ``body_timeout_s`` from the head until the whole body is in; then a JSON 408
    (when nothing was answered yet) and the connection closed. An answer under way (a slow one, an event stream)
    is never cut by either; a request without a body has no body deadline. And one for a client that stopped
    reading: ``write_stall_s`` with the answer's write buffer full (writing paused) and nothing taken from it; then
    the connection is aborted. ``timed_out``: counts ``head``, ``body`` and ``write`` deadlines passed. At the server's
    stop (``shutdown``), a connection whose client is not taking its answer is cut (``cut_off``: ``on_cut`` is called)
    at once, or as soon as its write buffer fills."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    counts = timed_out if timed_out is not None else {}

    class HeadDeadline(H11Protocol):
        _head_timer: Any = None
        _awaited: Any = None
        _body_timer: Any = None
        _body_cycle: Any = None
        _stall_timer: Any = None
        _held_at_arm: tuple[int | None, int] = (None, 0)
        _stopping = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not self._awaited:     # a request's head is in
                self._disarm_head_deadline()
            self._watch_body()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_deadline()           # kept alive, waiting for the next request
            self._watch_body()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_deadline()
            self._disarm_body_deadline()
            self._disarm_stall()
            super().connection_lost(exc)

        def pause_writing(self) -> None:            # the transport holds 64 KiB the client has not taken
            super().pause_writing()
            if self._stopping:
                self.cut_off()
            else:
                self._arm_stall()

        def shutdown(self) -> None:                 # the server stops
            if self.flow.write_paused:              # its client is not taking the answer
                self.cut_off()
            else:
                self._stopping = self.cycle is not None and not self.cycle.response_complete
                super().shutdown()                  # uvicorn's: closed now if idle, else after its answer

        def cut_off(self) -> None:
            """At a stop: abort the connection, its answer under way or unsent; the app sees a client that went
            away."""
            if not self.transport.is_closing() or self.transport.get_write_buffer_size():
                on_cut()
            self.transport.abort()                  # close() would wait to send what the client does not take

        def resume_writing(self) -> None:           # the client took some: it reads, however slowly
            super().resume_writing()
            self._disarm_stall()

        def _arm_stall(self) -> None:
            self._disarm_stall()
            self._held_at_arm = (_unsent_bytes(self.transport), self.transport.get_write_buffer_size())
            self._stall_timer = self.loop.call_later(write_stall_s, self._write_stalled)

        def _disarm_stall(self) -> None:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None

        def _write_stalled(self) -> None:
            self._stall_timer = None
            if self.transport.is_closing() and not self.transport.get_write_buffer_size():
                return
            (unsent, buffered), unsent_now = self._held_at_arm, _unsent_bytes(self.transport)
            if (unsent is not None and unsent_now is not None and unsent_now < unsent) \
                    or self.transport.get_write_buffer_size() < buffered:
                # the client took some of what the kernel holds for it (a large socket buffer drains for a
                # while before the transport may write again): slow, not stalled
                self._arm_stall()
                return
            counts["write"] = counts.get("write", 0) + 1
            where = f" {self.cycle.scope['method']} {self.cycle.scope['path'][:200]}" if self.cycle else ""
            log.info("%s http: %s took none of the answer%s in %.0f s; connection aborted", name,
                     "%s:%d" % self.client if self.client else "a client", where, write_stall_s)
            self.transport.abort()                  # close() would wait to send what the client does not take

        def _arm_head_deadline(self) -> None:
            self._disarm_head_deadline()
            self._awaited = self.cycle
            self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _disarm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.cycle is self._awaited and not self.transport.is_closing():
                counts["head"] = counts.get("head", 0) + 1
                log.info("%s http: %s sent no whole request head in %.0f s; connection closed", name,
                         "%s:%d" % self.client if self.client else "a client", timeout_s)
                self.transport.close()

        def _watch_body(self) -> None:
            """Arm the body deadline when a request's head is in and its body is not; disarm it once the body is
            in or the request is answered (a later byte of an answered request's body is the head deadline's)."""
            cycle = self.cycle
            waiting = (cycle is not None and cycle.more_body and not cycle.response_complete
                       and not cycle.disconnected)
            if waiting and self._body_cycle is not cycle:
                self._disarm_body_deadline()
                self._body_cycle = cycle
                self._body_timer = self.loop.call_later(body_timeout_s, self._body_timed_out)
            elif not waiting:
                self._disarm_body_deadline()

        def _disarm_body_deadline(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            self._body_cycle = None

        def _body_timed_out(self) -> None:
            cycle, self._body_timer = self._body_cycle, None
            if cycle is not self.cycle or not cycle.more_body or cycle.response_complete or cycle.disconnected \
                    or self.transport.is_closing():
                return
            counts["body"] = counts.get("body", 0) + 1
            scope = cycle.scope
            declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")[:20]
            what = f"Content-Length {declared}" if declared else "chunked"
            log.info("%s http: %s sent no whole request body (%s) for %s %s in %.0f s; answered 408, connection "
                     "closed", name, "%s:%d" % self.client if self.client else "a client", what, scope["method"],
                     scope["path"][:200], body_timeout_s)
            answer = not cycle.response_started
            cycle.disconnected = True        # the app's own answer, if any, goes nowhere; its receive() ends
            cycle.message_event.set()
            if answer:
                message = (f"body: not received in full within {body_timeout_s:g} s of the request's head ({what}); "
                           f"request refused")
                body = json.dumps({"error": message}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                           (b"connection", b"close"), (b"cache-control", b"no-store"), *SECURITY_HEADERS]
                try:
                    for event in (h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
                                  h11.Data(data=body), h11.EndOfMessage()):
                        self.transport.write(self.conn.send(event))
                except h11.LocalProtocolError:      # the connection's state allows no answer: just close it
                    pass
            self.transport.close()

    return HeadDeadline


def _unsent_bytes(transport: Any) -> int | None:
    """Bytes in the connection's kernel send queue the client has not acknowledged (Linux: SIOCOUTQ), or None
    where that cannot be asked."""
    import fcntl
    import struct
    import termios

    sock = transport.get_extra_info("socket")
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (AttributeError, OSError, ValueError):
        return None


class Served:
    """``app`` on uvicorn at ``host:port`` (0: any free port), plain or HTTPS (``tls_cert``, ``tls_key``).

    ``cut_at_shutdown[cut_what]`` counts the answers a stop cut (see the module's docstring); ``said_cut`` logs them.
    """

    cut_what = "answers"

    def __init__(self, app: Any, host: str, port: int, *, name: str, tls_cert: Path | None = None,
                 tls_key: Path | None = None, tls_flags: tuple[str, str] = ("--tls-cert", "--tls-key"),
                 head_timeout_s: float = HEAD_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S,
                 write_stall_s: float = WRITE_STALL_S) -> None:
        """``tls_flags``: the command's own names for the two files, for its errors. ``head_timeout_s``: how long
        a client has to send a request's head before its connection is closed; ``body_timeout_s``: how long from
        its head to send its whole body before it is answered 408 and closed; ``write_stall_s``: how long a client
        may leave a full buffer of its answer untaken before its connection is aborted (``timed_out`` counts
        each)."""
        for field, seconds in (("head_timeout_s", head_timeout_s), ("body_timeout_s", body_timeout_s),
                               ("write_stall_s", write_stall_s)):
            if not 0 < seconds < float("inf"):          # NaN fails too
                raise ValueError(f"{field}: {seconds!r} is not a positive finite number of seconds")
        import uvicorn

        cert_flag, key_flag = tls_flags
        if tls_key is not None and tls_cert is None:
            raise ValueError(f"{key_flag}: give the certificate too ({cert_flag})")
        if not (isinstance(port, int) and 0 <= port <= 65535):
            raise ValueError(f"--port: {port} is not a TCP port (0-65535; 0: any free port)")
        self.name = name
        self.timed_out = {"head": 0, "body": 0, "write": 0}     # connections closed at each deadline, since start
        self.scheme = "https" if tls_cert else "http"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
            self.sock.listen(128)
        except OSError:
            self.sock.close()
            raise
        if tls_cert:
            # a bad file is an error now, not in the server thread (tls_key None: the key is in the cert file)
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(tls_cert),
                                                                                    str(tls_key) if tls_key else None)
            except (OSError, ssl.SSLError) as exc:
                self.sock.close()
                raise ValueError(f"{cert_flag} {tls_cert}" + (f" / {key_flag} {tls_key}" if tls_key else "")
                                 + f": cannot load the certificate and key ({exc.strerror or exc})") from None
        self.cut_at_shutdown = {self.cut_what: 0}      # answers cut by a stop, since start

        def count_cut() -> None:
            self.cut_at_shutdown[self.cut_what] += 1

        protocol = head_deadline_protocol(head_timeout_s, name, body_timeout_s, self.timed_out, write_stall_s,
                                          count_cut)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S + CUT_ENDS_S, http=protocol,
                                ssl_certfile=str(tls_cert) if tls_cert else None,
                                ssl_keyfile=str(tls_key) if tls_key else None, server_header=False)
        self.server = _server_cutting_at_shutdown(config, self.cut_at_shutdown, self.cut_what, self.said_cut)
        self._thread: threading.Thread | None = None

    def said_cut(self, count: int) -> None:
        """Log that a stop cut ``count`` answers (a service says what they were to it: ``BundleServer``)."""
        log.info("%s stopped: %d answer(s) under way cut (their clients were not taking them, or they had not ended "
                 "%g s after the stop)", self.name, count, SHUTDOWN_GRACE_S)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def host(self) -> str:
        return str(self.sock.getsockname()[0])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def start(self, timeout_s: float | None = 15.0) -> "Served":
        """Serve in a daemon thread; returns once uvicorn accepts connections (``timeout_s`` None: no deadline)."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name=f"{self.name}-http", daemon=True)
        self._thread.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or (deadline is not None and time.monotonic() > deadline):
                raise RuntimeError(f"{self.name}: the HTTP server at {self.url} did not start (see the log)")
            time.sleep(0.02)
        return self

    def serve_forever(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop (logged in one line) and return, for the command to clean up
        and exit 0. uvicorn serves in a thread, where it installs no signal handler: in the main thread it
        re-raised the signal it had handled (Ctrl-C: a KeyboardInterrupt traceback; SIGTERM: killed before the
        command's clean-up). A second Ctrl-C while stopping stops waiting for answers under way; a third
        interrupts. Without a signal to wait for (not the main thread), it serves until ``stop``."""
        if threading.current_thread() is not threading.main_thread():
            self.start(timeout_s=None)._thread.join()
            return
        received: list[int] = []
        stopping = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            received.append(signum)
            if not stopping.is_set():
                stopping.set()
            elif signum == signal.SIGINT:       # Ctrl-C again: do not wait; once more: KeyboardInterrupt
                self.server.force_exit = True
                signal.signal(signal.SIGINT, previous[signal.SIGINT])

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start(timeout_s=None)
            while not stopping.wait(0.5):
                if not self._thread.is_alive():
                    raise RuntimeError(f"{self.name}: the HTTP server at {self.url} stopped (see the log)")
            log.info("%s: %s received; stopping", self.name, signal.Signals(received[0]).name)
            self.server.should_exit = True
            self._thread.join()                 # every answer ended or cut (see the module's docstring)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()


def _server_cutting_at_shutdown(config: Any, cut: dict[str, int], key: str, said_cut: Callable[[int], None]) -> Any:
    """uvicorn's server on ``config`` (whose protocol is ``head_deadline_protocol``'s), which at shutdown cuts the
    answers under way whose clients are not taking them (the protocol's ``shutdown``), and ``SHUTDOWN_GRACE_S``
    later each one still under way or unsent (``cut_off``); ``said_cut`` is told how many, when any were."""
    import asyncio

    import uvicorn

    class CutsAtShutdown(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            before = cut[key]
            late = asyncio.get_running_loop().call_later(SHUTDOWN_GRACE_S, self._cut_the_rest)
            try:
                await super().shutdown(sockets)
            finally:
                late.cancel()
            if cut[key] > before:
                said_cut(cut[key] - before)

        def _cut_the_rest(self) -> None:
            for connection in list(self.server_state.connections):
                connection.cut_off()

    return CutsAtShutdown(config)
