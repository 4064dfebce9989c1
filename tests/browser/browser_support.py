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
