"""The review page and its files are served under a strict Content-Security-Policy (only the page's own script and
style run; images from this server or the blobs the page fetched with its token), never sniffed, framed or sent
on in a Referer: over HTTP from the real server, as a browser gets them (tests/browser/test_browser_review_csp.py
runs the page under it)."""

from __future__ import annotations

import httpx
import pytest
from loop_support import LABELS, real_frames

from central.review.api import STATIC_FILES, ReviewServer
from central.review.store import FrameStore


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    store = FrameStore(tmp_path_factory.mktemp("headers") / "store", labels=LABELS)
    for record in real_frames(2):
        store.add(record.body, record.blob)
    server = ReviewServer(store, "127.0.0.1", 0, token="headers-test-token").start()
    yield server
    server.stop()
    store.close()


def policy(header: str) -> dict[str, list[str]]:
    directives = (d.split() for d in header.split(";") if d.strip())
    return {d[0]: d[1:] for d in directives}


@pytest.mark.parametrize("path", ["/", "/review", *(f"/static/{name}" for name in sorted(STATIC_FILES))])
def test_the_page_and_its_files_carry_a_strict_policy(served, path):
    answer = httpx.get(served.url.rstrip("/") + path, timeout=30)
    assert answer.status_code == 200, answer.text
    csp = policy(answer.headers["content-security-policy"])
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["img-src"] == ["'self'", "blob:"]            # the frames' JPEGs: this server, or fetched with the token
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"] and csp["form-action"] == ["'none'"]
    assert "unsafe" not in answer.headers["content-security-policy"]
    assert len(answer.headers.get_list("content-security-policy")) == 1      # one policy, not the Guard's beside it
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["referrer-policy"] == "no-referrer"


def test_a_missing_file_and_the_api_are_never_sniffed_or_framed_either(served):
    auth = {"Authorization": "Bearer headers-test-token"}
    for answer in (httpx.get(served.url + "static/nope.js", timeout=30),
                   httpx.get(served.url + "api/frames", headers=auth, timeout=30)):
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert answer.headers["referrer-policy"] == "no-referrer"
