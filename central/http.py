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
for ever, and a few thousand of them every file descriptor the server has.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 30.0       # to send a request's head, from the connection (or the previous answer) on


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
        answered = False

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
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


def head_deadline_protocol(timeout_s: float, name: str) -> type:
    """uvicorn's h11 protocol with a deadline for each request's head: ``timeout_s`` from the connection, or from
    the answer before on a kept-alive one, until the request line and headers are in; then the connection is
    closed. A request under way (a slow answer, an event stream, a body still coming) is never cut by it."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        _head_timer: Any = None
        _awaited: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not self._awaited:     # a request's head is in
                self._disarm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_deadline()           # kept alive, waiting for the next request

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_deadline()
            super().connection_lost(exc)

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
                log.info("%s http: %s sent no whole request head in %.0f s; connection closed", name,
                         "%s:%d" % self.client if self.client else "a client", timeout_s)
                self.transport.close()

    return HeadDeadline


class Served:
    """``app`` on uvicorn at ``host:port`` (0: any free port), plain or HTTPS (``tls_cert``, ``tls_key``)."""

    def __init__(self, app: Any, host: str, port: int, *, name: str, tls_cert: Path | None = None,
                 tls_key: Path | None = None, tls_flags: tuple[str, str] = ("--tls-cert", "--tls-key"),
                 head_timeout_s: float = HEAD_TIMEOUT_S) -> None:
        """``tls_flags``: the command's own names for the two files, for its errors. ``head_timeout_s``: how long
        a client has to send a request's head before its connection is closed."""
        import uvicorn

        cert_flag, key_flag = tls_flags
        if tls_key is not None and tls_cert is None:
            raise ValueError(f"{key_flag}: give the certificate too ({cert_flag})")
        if not (isinstance(port, int) and 0 <= port <= 65535):
            raise ValueError(f"--port: {port} is not a TCP port (0-65535; 0: any free port)")
        self.name = name
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
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, http=head_deadline_protocol(head_timeout_s, name),
                                ssl_certfile=str(tls_cert) if tls_cert else None,
                                ssl_keyfile=str(tls_key) if tls_key else None, server_header=False)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

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

    def start(self, timeout_s: float = 15.0) -> "Served":
        """Serve in a daemon thread; returns once uvicorn accepts connections."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name=f"{self.name}-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the HTTP server at {self.url} did not start (see the log)")
            time.sleep(0.02)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT or SIGTERM (uvicorn's handlers)."""
        self.server.run(sockets=[self.sock])

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()
