"""Explicit waits for the browser tests: poll the page (generous timeouts, a loaded 2-core machine), never sleep."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

TIMEOUT = 60.0


def wait(driver: WebDriver, check: Callable[[WebDriver], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """``check``'s first truthy value; on timeout an AssertionError that says what was awaited."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                             ).until(check)
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text[:3000]
        raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}; the page shows:\n{body}") from None


def wait_css(driver: WebDriver, css: str, what: str | None = None, timeout: float = TIMEOUT,
             where: Callable[[WebElement], bool] = lambda e: True) -> WebElement:
    """The first element matching ``css`` (and ``where``)."""
    def check(d: WebDriver) -> WebElement | None:
        return next((e for e in d.find_elements(By.CSS_SELECTOR, css) if where(e)), None)
    return wait(driver, check, what or css, timeout)


def wait_count(driver: WebDriver, css: str, at_least: int, what: str, timeout: float = TIMEOUT) -> list[WebElement]:
    def check(d: WebDriver) -> list[WebElement] | None:
        found = d.find_elements(By.CSS_SELECTOR, css)
        return found if len(found) >= at_least else None
    return wait(driver, check, what, timeout)


def text_of(element: WebElement) -> str:
    """The element's text content (also when it is scrolled out of view, where .text is empty)."""
    return element.get_attribute("textContent") or ""


def alert(driver: WebDriver) -> Any:
    """The page's open prompt or alert, or None (for ``wait``)."""
    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return None


def key(browser: WebDriver, name: str, *, repeat: bool = False, on: str = "document") -> None:
    """A keydown as the browser fires it (``repeat`` is what a held key sends; WebDriver cannot hold one)."""
    target = "document" if on == "document" else f"document.getElementById('{on}')"
    browser.execute_script(f"{target}.dispatchEvent(new KeyboardEvent('keydown', "
                           f"{{key: arguments[0], repeat: arguments[1], bubbles: true}}));", name, repeat)


@contextmanager
def review_server(args: list[str], log: Path, port: int) -> Iterator[str]:
    """``python -m central review <args> --host 127.0.0.1 --port <port>`` as a user starts it; its URL once it
    serves the page (its output in ``log``, shown if it exits)."""
    from dashboard_support import REPO, wait_until

    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "central", "review", *args, "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def serving() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"review server exited with {proc.returncode}:\n{log.read_text()}")
        return urllib.request.urlopen(url, timeout=2).status == 200
    try:
        wait_until(serving, 90, "python -m central review to serve")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


# Installed by the browser before any script of each page loaded runs (the page's own policy does not apply to it).
CSP_RECORDER = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.cspViolations.push({directive: e.effectiveDirective || e.violatedDirective, blocked: e.blockedURI,
                             source: e.sourceFile, line: e.lineNumber, sample: e.sample});
}, true);
"""


@contextmanager
def csp_violations(driver: WebDriver) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """While open, every page loaded records its Content-Security-Policy violations from its first byte on (an
    inline script or handler, a style attribute, an image from elsewhere): the function yielded returns the current
    page's, as ``{directive, blocked, source, line, sample}``."""
    added = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_RECORDER})
    try:
        yield lambda: driver.execute_script("return window.cspViolations")
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]})


# What nginx answers when the service behind it is down (502) or too slow (504), with a marker that must stay text.
PROXY_PAGE = """<html>
<head><title>{status} {reason}</title><style>body {{ color: red }}</style></head>
<body>
<center><h1>{status} {reason}</h1></center>
<hr><center>nginx/1.24.0 <b id="proxy-markup">(markup)</b></center>
</body>
</html>
"""


class FaultyProxy:
    """A reverse proxy on a free port in front of ``upstream`` (``http://127.0.0.1:PORT``), as nginx would be: it
    passes every request on and streams the answer back as it comes (an event stream too), except requests whose
    path matches ``failing`` (a regular expression, set with ``fail``), which get nginx's HTML error page with
    ``status`` (502 or 504) instead. ``requests`` counts the requests seen per path (without the query)."""

    def __init__(self, upstream: str) -> None:
        import http.server
        import re
        import threading
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream)
        self.failing: re.Pattern[str] | None = None
        self.status = 502
        self.requests: dict[str, int] = {}
        self._open: set[Any] = set()          # the connections of answers being passed on now
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"       # every answer ends with the connection: a stream needs no framing

            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._serve(self)

            do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def fail(self, pattern: str | None, status: int = 502) -> None:
        """From now on answer paths matching ``pattern`` with an HTML ``status`` page (None: pass all on)."""
        import re

        self.failing, self.status = (re.compile(pattern) if pattern else None), status

    def seen(self, path: str) -> int:
        with self._lock:
            return self.requests.get(path, 0)

    def cut(self) -> None:
        """Drop every connection passing an answer on now (an open event stream), as a restarting proxy does."""
        import socket

        with self._lock:
            cut, self._open = list(self._open), set()
        for connection in cut:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, handler: Any) -> None:
        import http.client
        import http.server

        path = handler.path.split("?", 1)[0]
        with self._lock:
            self.requests[path] = self.requests.get(path, 0) + 1
        failing, status = self.failing, self.status
        if failing is not None and failing.search(path):
            reason = http.server.BaseHTTPRequestHandler.responses.get(status, ("Error",))[0]
            if status == 504:
                reason = "Gateway Time-out"      # nginx's spelling
            page = PROXY_PAGE.format(status=status, reason=reason).encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "text/html")
            handler.send_header("Content-Length", str(len(page)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(page)
            return
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() not in ("host", "connection", "keep-alive", "proxy-connection", "accept-encoding")}
        upstream = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        try:
            upstream.request(handler.command, handler.path, body=body, headers=headers)
            answer = upstream.getresponse()
            handler.send_response(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "server", "date"):
                    handler.send_header(k, v)
            handler.end_headers()
            with self._lock:
                self._open.add(handler.connection)
            while chunk := answer.read1(65536):
                handler.wfile.write(chunk)
                handler.wfile.flush()
        except OSError:       # the page went away (a closed stream), or the service did
            pass
        finally:
            with self._lock:
                self._open.discard(handler.connection)
            upstream.close()
