"""Both pages behind a reverse proxy that answers with its own HTML error page (nginx's 502 while the service is down,
504 while it is slow), in headless Chromium: the page says the HTTP status and that the answer came from something
in between, with the start of that page's text (as text, never markup), under its Content-Security-Policy; it keeps
retrying as before and goes on once the proxy passes requests again. The proxy is real (browser_support.FaultyProxy,
a reverse proxy on a free port in front of the real server); only its error pages are made up, as nginx writes them.
Before, the review page showed the JSON parse error ("Unexpected token '<'") and the dashboard only "disconnected".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from browser_support import FaultyProxy, csp_violations, text_of, wait, wait_css
from dashboard_support import DashboardProcess
from selenium.webdriver.common.by import By

sys.path.append(str(Path(__file__).resolve().parents[1] / "central" / "loop"))
from loop_support import LABELS, real_frames  # noqa: E402

from central.review.api import ReviewServer  # noqa: E402
from central.review.store import FrameStore  # noqa: E402


def status_text(driver, element_id: str) -> str:
    return text_of(driver.find_element(By.ID, element_id))


@pytest.mark.mqtt
def test_the_dashboard_names_a_proxys_502_and_keeps_retrying(browser, artifacts, tmp_path, broker):
    dash = DashboardProcess(tmp_path, broker.port)
    proxy = FaultyProxy(dash.url)
    try:
        with csp_violations(browser) as violations:
            # given the dashboard behind a proxy, live
            browser.get(proxy.url)
            wait_css(browser, 'body[data-stream="open"]', "the live stream to open through the proxy")
            wait(browser, lambda d: status_text(d, "stream-status") == "live", "the stream said live")

            # when the proxy drops the stream and answers it with its HTML 502 page (the dashboard restarting behind
            # it): the browser's own retry gets the 502, and EventSource gives up
            proxy.fail(r"^/events$", 502)
            before = proxy.seen("/events")
            proxy.cut()

            # then the page says what answered: the status, that it was not the dashboard, the page's text
            said = wait(browser, lambda d: (t := status_text(d, "stream-status")).startswith("live: disconnected (")
                        and t, "the stream status to name the proxy's answer")
            assert "HTTP 502 from a proxy or server in between: 502 Bad Gateway" in said, said
            assert "nginx/1.24.0 (markup)" in said and "<" not in said and "color: red" not in said, said
            assert "retrying in" in said and "Unexpected token" not in said, said
            assert not browser.find_elements(By.ID, "proxy-markup")
            assert browser.find_element(By.ID, "stream-status").get_attribute("data-connected") == "false"
            # and it keeps trying on its own (each try: the stream and one request asking why)
            wait(browser, lambda d: proxy.seen("/events") >= before + 4, "a second try through the proxy", 90)
            browser.save_screenshot(str(artifacts / "dashboard-proxy-502.png"))

            # when the proxy passes requests again, then the page is live again without a reload
            proxy.fail(None)
            wait_css(browser, 'body[data-stream="open"]', "the stream to open again", timeout=90)
            wait(browser, lambda d: status_text(d, "stream-status") == "live", "the stream said live again")
            assert violations() == []
    finally:
        proxy.close()
        dash.stop()


def test_the_review_page_names_a_proxys_504_and_keeps_retrying(browser, artifacts, tmp_path):
    store = FrameStore(tmp_path / "store", labels=LABELS)
    for record in real_frames(2):
        store.add(record.body, record.blob)
    server = ReviewServer(store, "127.0.0.1", 0).start()
    proxy = FaultyProxy(server.url)
    try:
        with csp_violations(browser) as violations:
            # given the review page behind a proxy, loaded (the token in the URL's fragment, as the server prints it)
            browser.get(proxy.url + server.page_url[len(server.url):])
            wait(browser, lambda d: status_text(d, "status") == "ready", "the page to load through the proxy")
            assert status_text(browser, "pending-count") == "2"

            # when the proxy answers the API with its HTML 504 page (the server too slow behind it)
            proxy.fail(r"^/api/", 504)

            # then the next refresh says what answered, not a JSON parse error
            wait(browser, lambda d: "HTTP 504" in status_text(d, "status"), "the status to name the proxy's 504")
            said = status_text(browser, "status")
            assert said.startswith("cannot reach the review server (HTTP 504 from a proxy or server in between: "
                                   "504 Gateway Time-out 504 Gateway Time-out nginx/1.24.0 (markup)); "
                                   "retrying every 3 s"), said
            assert "Unexpected token" not in said and "JSON" not in said, said
            assert browser.find_element(By.ID, "status").get_attribute("data-state") == "error"
            assert not browser.find_elements(By.ID, "proxy-markup")
            browser.save_screenshot(str(artifacts / "review-proxy-504.png"))
            # and it keeps refreshing on its own
            seen = proxy.seen("/api/labels")
            wait(browser, lambda d: proxy.seen("/api/labels") >= seen + 2, "two more refreshes through the proxy", 90)

            # when the proxy passes requests again, then the page goes on where it was
            proxy.fail(None)
            wait(browser, lambda d: status_text(d, "status") == "server answering again", "the server answering again",
                 90)
            assert status_text(browser, "pending-count") == "2"
            assert violations() == []
    finally:
        proxy.close()
        server.stop()
