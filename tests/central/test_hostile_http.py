"""Hostile clients against the review server and the bundle server, on real localhost ports.

Every endpoint gets generated malformed requests (bodies, types, non-finite numbers, huge strings, query
parameters, ids, headers, paths, byte ranges): the answer is a 4xx JSON error that names what was wrong,
never a 5xx, nothing stored changes, and the next good request is served. The servers are authenticated by
default and refuse state-changing requests from another site's page.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_support import LABELS, REPO, real_frames

from central.review.api import STATIC, TOKEN_FILE, ReviewServer
from central.review.store import FrameStore
from central.rollout.publish import BundleServer
from contract.messages import loads_finite

TOKEN = "hostile-test-token"
BIG = 3 * 1024 * 1024 + 123          # a bundle artifact of realistic size, for HEAD and Range


# ---------------------------------------------------------------- servers and a raw client

class Served(tuple):
    """A fixture's parts, shown briefly in a failing example (not every stored JPEG byte)."""

    def __repr__(self) -> str:
        return f"<{type(self[0]).__name__} {self[0].url}>"


@pytest.fixture(scope="module")
def review(tmp_path_factory):
    store = FrameStore(tmp_path_factory.mktemp("hostile-review") / "store", labels=LABELS)
    records = real_frames(4)
    for record in records:
        store.add(record.body, record.blob)
    server = ReviewServer(store, "127.0.0.1", 0, token=TOKEN).start()
    client = httpx.Client(base_url=server.url.rstrip("/"), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    yield Served((server, store, records, client))
    client.close()
    server.stop()
    store.close()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-bundles")
    (root / "fashion" / "3").mkdir(parents=True)
    artifact = os.urandom(BIG)
    (root / "fashion" / "3" / "model.onnx").write_bytes(artifact)
    (root / "fashion" / "3" / "manifest.json").write_text('{"name": "fashion"}')
    (root / "fashion" / ".4.partial-0000").mkdir()
    (root / "fashion" / ".4.partial-0000" / "manifest.json").write_text("half-copied")
    (root.parent / "outside.txt").write_text("not served")
    server = BundleServer(root).start()
    client = httpx.Client(base_url=server.url.rstrip("/"), timeout=30)
    yield Served((server, artifact, client))
    client.close()
    server.stop()


def raw(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte (headers no client library would send); the status, headers, body.

    The connection stays open for writing until the answer is read, as a browser's does (a half-closed one
    reads as a client that went away)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(head + b"\r\n" + body)
        except (BrokenPipeError, ConnectionResetError):     # answered and closed before the body was taken
            pass
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        status_line, _, rest = data.partition(b"\r\n")
        header_block, _, payload = rest.partition(b"\r\n\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.decode("latin-1").partition(":") for line in header_block.split(b"\r\n") if line)}
        want = 0 if head.startswith(b"HEAD ") else int(headers.get("content-length", "0"))
        while len(payload) < want and (chunk := sock.recv(65536)):
            payload += chunk
    assert status_line.startswith(b"HTTP/1.1 "), (head[:200], data[:200])
    return int(status_line.split()[1]), headers, payload


def json_error(response: httpx.Response) -> str:
    """The error text of a 4xx, asserting it is strict JSON ``{"error": ...}``."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return loads_finite(response.content)["error"]


def review_path(frame_id: str) -> str:
    return f"/api/frames/{quote(frame_id, safe='')}/review"


def still_serves_review(client: httpx.Client, records) -> None:
    response = client.get("/api/frames", params={"limit": "50"})
    assert response.status_code == 200 and loads_finite(response.content)["total"] == len(records)


# ---------------------------------------------------------------- authentication and cross-site writes

def test_the_review_api_needs_a_token_unless_the_operator_opts_out(tmp_path):
    store = FrameStore(tmp_path / "store", labels=LABELS)
    [record] = real_frames(1)
    store.add(record.body, record.blob)
    server = ReviewServer(store, "127.0.0.1", 0).start()         # no token given: one is made
    try:
        base = server.url.rstrip("/")
        assert server.token and len(server.token) >= 32 and server.page_url.endswith(f"#token={server.token}")
        for method, path, body in (("GET", "/api/frames", None), ("GET", f"/api/frames/{record.id}/image", None),
                                   ("POST", review_path(record.id), {"action": "skip"}),
                                   ("GET", "/api/nothing-here", None)):
            response = httpx.request(method, base + path, json=body)
            assert response.status_code == 401 and "token" in json_error(response), (method, path)
        assert store.get(record.id)["status"] == "pending"
        assert httpx.get(base + "/").status_code == 200                # the page (no data) loads and asks
        done = httpx.post(base + review_path(record.id), json={"action": "skip"},
                          headers={"Authorization": f"Bearer {server.token}"})
        assert done.status_code == 200 and store.get(record.id)["status"] == "skipped"
    finally:
        server.stop()
    opened = ReviewServer(store, "127.0.0.1", 0, no_auth=True).start()
    try:
        assert opened.token is None and httpx.get(opened.url + "api/frames").status_code == 200
    finally:
        opened.stop()
        store.close()


def test_the_review_cli_makes_a_token_file_only_its_owner_reads_and_prints_the_url_to_open(tmp_path):
    store_dir = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "central", "review", "--store", str(store_dir), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.match(r"review: (http://127\.0\.0\.1:\d+/)#token=(\S+) ", line)
        assert match, (line, proc.poll())
        url, token = match.groups()
        token_file = store_dir / TOKEN_FILE
        assert token_file.read_text().strip() == token and len(token) >= 32
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert httpx.get(url + "api/stats").status_code == 401
        assert httpx.get(url + "api/stats", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"API token written to {token_file}" in err


def test_the_review_cli_without_auth_says_so_loudly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "central", "review", "--store", str(tmp_path / "store"), "--port",
                             "0", "--no-auth"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = re.match(r"review: (\S+) ", proc.stdout.readline()).group(1)
        assert "#token" not in url and httpx.get(url + "api/stats").status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "NO AUTHENTICATION" in err and not (tmp_path / "store" / TOKEN_FILE).exists()


@pytest.mark.parametrize("headers, named", [
    ({"Origin": "http://evil.example"}, "header Origin"),
    ({"Origin": "null"}, "header Origin"),                         # a sandboxed frame or a data: page
    ({"Origin": "http://["}, "header Origin"),                      # not even a URL
    ({"Sec-Fetch-Site": "cross-site"}, "header Sec-Fetch-Site"),   # a browser that sends no Origin on this one
])
def test_a_cross_site_write_is_refused_even_with_the_token(review, headers, named):
    server, store, records, client = review
    target = records[0].id
    response = client.post(review_path(target), json={"action": "skip"}, headers=headers)
    assert response.status_code == 403 and named in json_error(response)
    assert store.get(target)["status"] == "pending"
    same = client.post(review_path(target), json={"action": "undo"},
                       headers={"Origin": server.url.rstrip("/"), "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200 and same.json()["status"] == "pending"


# ---------------------------------------------------------------- bodies

CONTENT_LENGTHS = st.one_of(
    st.integers(max_value=-1).map(str),                                    # -1 and every negative
    st.integers(min_value=64 * 1024 + 1, max_value=10 ** 30).map(str),     # more than the limit, up to absurd
    st.integers(min_value=19, max_value=6000).map(lambda n: "9" * n),      # past int()'s 4,300-digit limit too
    st.sampled_from(["1e3", "0x10", "+5", " ", "", "1.5", "5, 6", "NaN", "\xb2", "\xb9\xb2", "٣"]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xff), min_size=1, max_size=30),
)


@settings(max_examples=60)
@given(length=CONTENT_LENGTHS)
def test_a_bad_content_length_is_refused_on_every_write_and_the_next_request_is_served(review, bundles, length):
    server, store, records, client = review
    target = records[1].id
    text = length.strip()
    if text.isascii() and text.isdigit() and len(text.lstrip("0")) <= 5 and int(text) <= 64 * 1024:
        return                                                  # a good length: not this test's business
    encoded = length.encode("latin-1", "replace")
    for port, path in ((server.port, review_path(target)), (bundles[0].port, "/fashion/3/manifest.json")):
        for method in ("POST", "PUT", "GET"):
            status, headers, payload = raw(port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                                           f"Bearer {TOKEN}\r\n".encode() + b"Content-Length: " + encoded + b"\r\n",
                                           b'{"action": "skip"}')
            assert 400 <= status < 500, (method, path, length, status, payload[:200])
            if headers.get("content-type", "").startswith("application/json"):   # else the HTTP parser's own 400
                error = loads_finite(payload)["error"]        # "5, 5" is 5 to the parser: a truncated body
                assert "Content-Length" in error or "body" in error or status == 405, (length, error)
    assert store.get(target)["status"] == "pending"
    still_serves_review(client, records)
    assert bundles[2].get("/fashion/3/manifest.json").status_code == 200


@settings(max_examples=15)
@given(size=st.integers(min_value=64 * 1024 + 1, max_value=3 * 1024 * 1024), pieces=st.integers(1, 40))
def test_a_chunked_body_over_the_limit_is_cut_off_on_every_write(review, bundles, size, pieces):
    server, store, records, client = review
    target = records[1].id
    note = json.dumps({"action": "skip", "note": "x" * size}).encode()
    step = max(1, len(note) // pieces)
    chunks = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n"
                      for part in (note[i:i + step] for i in range(0, len(note), step))) + b"0\r\n\r\n"
    for port, path in ((server.port, review_path(target)), (bundles[0].port, "/fashion/3/manifest.json")):
        status, headers, payload = raw(port, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                                       f"{TOKEN}\r\nTransfer-Encoding: chunked\r\n".encode(), chunks)
        assert status in (405, 413), (path, status, payload[:200])
        assert headers["content-type"].startswith("application/json")
    assert store.get(target)["status"] == "pending"
    still_serves_review(client, records)


# ---------------------------------------------------------------- review bodies, queries, ids, headers

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
FIELDS = ("action", "label", "reviewer", "note", "expect")
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e999", "-1e400")


@st.composite
def review_bodies(draw) -> bytes:
    """A review body that must be refused: wrong types, unknown fields, non-finite numbers, bad JSON."""
    kind = draw(st.sampled_from(["wrong type", "unknown field", "non-finite", "not an object", "not JSON",
                                 "unknown action", "unknown label", "lone surrogate", "too long", "nested too deeply"]))
    body: dict = {"action": "label", "label": LABELS[0]}
    if kind == "lone surrogate":      # valid JSON (json.dumps escapes it), not valid Unicode text to store
        field = draw(st.sampled_from(["label", "reviewer", "note"]))
        body.update({"action": draw(st.sampled_from(["label", "new_class", "defect", "skip"])),
                     field: draw(st.text(max_size=8)) + chr(draw(st.integers(0xD800, 0xDFFF)))})
    elif kind == "too long":
        field, limit = draw(st.sampled_from([("label", 128), ("reviewer", 256), ("note", 4096)]))
        body.update({"action": draw(st.sampled_from(["new_class", "defect", "skip"])), field: "x" * (limit + 1)})
    elif kind == "nested too deeply":  # deeper than the JSON parser goes, well under the body limit
        depth = draw(st.sampled_from([5_000, 30_000]))
        return (b'{"action": "skip", "note": ' + b"[" * depth + b"]" * depth + b"}")
    elif kind == "wrong type":
        field = draw(st.sampled_from(FIELDS))
        body[field] = draw(JSON_VALUES.filter(lambda v: not isinstance(v, str) and v is not None))
    elif kind == "unknown field":
        body[draw(st.text(min_size=1, max_size=30).filter(lambda k: k not in FIELDS))] = draw(JSON_VALUES)
    elif kind == "non-finite":
        field = draw(st.sampled_from(FIELDS + ("extra",)))
        return json.dumps({**body, field: "@@"}).replace('"@@"', draw(st.sampled_from(NON_FINITE))).encode()
    elif kind == "not an object":
        return json.dumps(draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))).encode()
    elif kind == "not JSON":
        return draw(st.binary(min_size=1, max_size=200).filter(lambda b: not _is_json(b)))
    elif kind == "unknown action":
        body["action"] = draw(st.text(max_size=3000).filter(
            lambda a: a not in ("", "label", "skip", "new_class", "defect", "undo")))
    else:
        body["label"] = draw(st.text(min_size=1, max_size=3000).filter(lambda label: label not in LABELS))
    return json.dumps(body).encode()


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


@settings(max_examples=150)
@given(body=review_bodies(), content_type=st.sampled_from(["application/json", "text/plain", "",
                                                           "application/x-www-form-urlencoded"]))
def test_a_malformed_review_is_a_400_naming_the_field_and_changes_nothing(review, body, content_type):
    server, store, records, client = review
    target = records[2].id
    before = store.get(target)
    response = client.post(review_path(target), content=body, headers={"Content-Type": content_type})
    error = json_error(response)
    assert response.status_code == 400 and re.search(r"\bfield \w+|\bbody\b", error), error
    assert store.get(target) == before
    still_serves_review(client, records)


def test_a_nested_body_and_an_odd_static_name_are_4xx_on_every_endpoint_and_the_next_request_is_served(review):
    server, store, records, client = review
    nested = b"[" * 30_000 + b"]" * 30_000
    for path in (review_path(records[1].id), "/api/enrol"):
        response = client.post(path, content=b'{"label": ' + nested + b"}")
        assert response.status_code == 400 and "nested" in json_error(response), (path, response.text[:200])
    for name in ("%00", "a" * 5000, "review.html%00.js", "%2e%2e%2fapi.py", "REVIEW.JS"):
        response = client.get(f"/static/{name}")
        assert response.status_code == 404 and json_error(response), (name, response.status_code)
        assert str(STATIC.resolve()) not in response.text       # the install path stays unsaid
    assert client.get("/static/review.js").status_code == 200
    assert store.get(records[1].id)["status"] == "pending"
    still_serves_review(client, records)


def test_a_refused_enrolment_with_a_non_finite_figure_answers_400_with_null(tmp_path):
    """Fake enroller (the real gate's figures come from a trained bundle; tests/central/loop/test_enrol_review.py):
    a refusal whose figures hold NaN is still a 400 carrying them, the NaN as null, not a 500."""
    from central.review.enrol import EnrolRefused

    class Refusing:
        def describe(self):
            return {"enabled": True}

        def enrol(self, label, reviewer, max_drop_points, dry_run):
            raise EnrolRefused("gate refused", {"figures": {"gate": {"drop_points": math.nan, "old": 0.9}}})

    store = FrameStore(tmp_path / "store", labels=LABELS)
    server = ReviewServer(store, "127.0.0.1", 0, token=TOKEN, enroller=Refusing()).start()
    try:
        response = httpx.post(server.url.rstrip("/") + "/api/enrol", json={"label": "Scarf"},
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert response.status_code == 400, response.text[:300]
        body = loads_finite(response.content)
        assert body["error"] == "gate refused" and body["figures"]["gate"] == {"drop_points": None, "old": 0.9}
    finally:
        server.stop()
        store.close()


@settings(max_examples=100)
@given(params=st.lists(st.tuples(
    st.sampled_from(["limit", "offset", "order", "status", "station", "site", "camera", "model_version",
                     "predicted"]) | st.text(min_size=1, max_size=15),
    st.sampled_from(["-1", "0", "1001", "1e999", "NaN", "Infinity", "9" * 30, "9" * 5000, "", " 7", "1.5",
                     "\x00", "least-certain", "pending", "%"]) | st.text(max_size=300)), max_size=5))
def test_bad_query_parameters_are_a_400_naming_the_field(review, params):
    server, store, records, client = review
    response = client.get("/api/frames", params=params)
    if response.status_code == 200:
        assert isinstance(loads_finite(response.content)["frames"], list)
    else:
        error = json_error(response)
        assert response.status_code == 400 and ("field" in error or "query parameter" in error), error
    still_serves_review(client, records)


FRAME_IDS = st.text(min_size=1, max_size=400) | st.sampled_from(
    ["..", "../..", "../../etc/passwd", "%2e%2e", "\x00", "a" * 5000, "images/x.jpg", "' OR 1=1 --", "*", "NaN"])


@settings(max_examples=80)
@given(frame_id=FRAME_IDS, what=st.sampled_from(["", "/image", "/context", "/review"]))
def test_a_bad_frame_id_is_a_404_naming_it_on_every_frame_endpoint(review, frame_id, what):
    server, store, records, client = review
    if frame_id in {r.id for r in records} | {".", ".."}:        # ".": the client makes it /api/frames/
        return
    path = f"/api/frames/{quote(frame_id, safe='')}{what}"
    response = client.post(path, json={"action": "skip"}) if what == "/review" else client.get(path)
    error = json_error(response)
    assert response.status_code in (404, 400), (path, response.status_code, error)
    still_serves_review(client, records)


HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xff, exclude_characters="\x7f"),
                      max_size=200)


@settings(max_examples=80)
@given(authorization=HEADER_TEXT | st.just("Bearer " + TOKEN + "x") | st.just("Basic " + TOKEN),
       origin=st.none() | HEADER_TEXT, fetch_site=st.none() | HEADER_TEXT, content_type=HEADER_TEXT,
       extra=st.dictionaries(st.from_regex(r"\AX-[A-Za-z0-9-]{1,20}\Z"), HEADER_TEXT, max_size=3))
def test_odd_headers_are_a_4xx_and_never_a_5xx(review, authorization, origin, fetch_site, content_type, extra):
    server, store, records, client = review
    target = records[3].id
    headers = {"Authorization": authorization, "Content-Type": content_type, **extra}
    headers.update({k: v for k, v in (("Origin", origin), ("Sec-Fetch-Site", fetch_site)) if v is not None})
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
    for method, path in (("GET", "/api/frames"), ("POST", review_path(target))):
        status, got, payload = raw(server.port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + head +
                                   b"Content-Length: 17\r\n", b'{"action":"skip"}')
        assert status < 500, (method, status, payload[:200])
        if status >= 400 and got.get("content-type", "").startswith("application/json"):
            assert loads_finite(payload)["error"]
    assert store.get(target)["status"] == "pending"
    still_serves_review(client, records)


def _routes(app) -> list[tuple[str, str]]:
    """Every (method, path) the review app serves: its OpenAPI schema's, and the page's routes beside it."""
    inner = app.app
    listed = {(method.upper(), path) for path, item in inner.openapi()["paths"].items() for method in item}
    listed |= {(method, route.path) for route in inner.routes if hasattr(route, "path")
               for method in getattr(route, "methods", ()) or () if method != "HEAD"}
    return sorted(listed)


@settings(max_examples=60)
@given(value=st.text(min_size=1, max_size=200), query=st.dictionaries(st.text(min_size=1, max_size=10),
                                                                       st.text(max_size=50), max_size=3),
       body=JSON_VALUES)
def test_every_review_endpoint_answers_generated_requests_without_a_5xx(review, value, query, body):
    server, store, records, client = review
    from central.review.api import create_app

    routes = _routes(create_app(store, TOKEN))
    assert ("POST", "/api/frames/{frame_id}/review") in routes and ("GET", "/api/frames") in routes
    for method, path in routes:
        url = re.sub(r"\{(\w+)(:path)?\}", quote(value, safe=""), path)
        response = client.request(method, url, params=query, json=body if method == "POST" else None)
        assert response.status_code < 500, (method, url, response.status_code, response.text[:200])
        if response.status_code >= 400:
            assert json_error(response)
        elif response.headers["content-type"].startswith("application/json"):
            loads_finite(response.content)
    assert all(store.get(r.id)["status"] == "pending" for r in records)
    still_serves_review(client, records)


def test_a_non_finite_number_from_the_store_is_answered_as_null_not_as_a_500(review, monkeypatch):
    server, store, records, client = review
    real_get, real_stats = store.get, store.stats
    monkeypatch.setattr(store, "get", lambda frame_id: {**real_get(frame_id), "confidence": math.nan,
                                                        "margin": math.inf})
    monkeypatch.setattr(store, "stats", lambda: {**real_stats(), "odd": [1.0, -math.inf]})
    response = client.get(f"/api/frames/{records[0].id}")
    assert response.status_code == 200
    frame = loads_finite(response.content)
    assert frame["confidence"] is None and frame["margin"] is None and frame["id"] == records[0].id
    stats = loads_finite(client.get("/api/stats").content)
    assert stats["odd"] == [1.0, None] and stats["frames"] == len(records)


# ---------------------------------------------------------------- the bundle server

PATH_PARTS = st.sampled_from(["..", ".", "%2e%2e", "%2E%2e%2f", "..%2f..%2f", "%00", "fashion", "3", "model.onnx",
                              ".4.partial-0000", "%2e4.partial-0000", "manifest.json", "\\..\\", "%5c..%5c",
                              "%ff%fe", "outside.txt", "", "a" * 300]) | st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="/?#"), max_size=40)


@settings(max_examples=150)
@given(parts=st.lists(PATH_PARTS, max_size=6), method=st.sampled_from(["GET", "HEAD"]))
def test_no_path_leaves_the_served_tree_or_shows_a_hidden_folder(bundles, parts, method):
    server, artifact, client = bundles
    path = "/" + "/".join(parts)
    status, headers, payload = raw(server.port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
    assert status < 500, (path, status, payload[:200])
    if status == 200:                           # only a served file, never the half-copied one or outside.txt
        assert payload in (artifact, b'{"name": "fashion"}', b""), (path, payload[:100])
    elif method == "GET" and headers.get("content-type", "").startswith("application/json"):
        assert status == 404 and "not found" in loads_finite(payload)["error"], (path, payload)
    else:                                       # HEAD has no body; 400: the HTTP parser refused the request line
        assert status in (400, 404), (path, status)
    assert client.get("/fashion/3/manifest.json").status_code == 200


@settings(max_examples=60)
@given(ranges=st.lists(st.tuples(st.integers(-10, BIG + 10) | st.none(), st.integers(-10, BIG + 10) | st.none()),
                       min_size=1, max_size=12),
       unit=st.sampled_from(["bytes", "bytes", "items", "BYTES"]))
def test_byte_ranges_of_a_big_artifact_are_served_exactly_or_refused(bundles, ranges, unit):
    server, artifact, client = bundles
    spec = ",".join(f"{'' if a is None else a}-{'' if b is None else b}" for a, b in ranges)
    response = client.get("/fashion/3/model.onnx", headers={"Range": f"{unit}={spec}"})
    assert response.status_code in (200, 206, 400, 416), (spec, response.status_code)
    if response.status_code == 200:
        assert response.content == artifact
    elif response.status_code == 206 and len(ranges) == 1:
        start, end = re.match(r"bytes (\d+)-(\d+)/\d+", response.headers["content-range"]).groups()
        assert response.content == artifact[int(start):int(end) + 1]
    elif response.status_code in (400, 416):
        assert "header Range" in json_error(response)
    head = client.head("/fashion/3/model.onnx")
    assert head.status_code == 200 and int(head.headers["content-length"]) == BIG and head.content == b""


def test_many_small_ranges_get_the_whole_file_not_a_multipart_amplification(bundles):
    server, artifact, client = bundles
    spec = ",".join(f"{i}-{i}" for i in range(0, 4000, 2))
    response = client.get("/fashion/3/model.onnx", headers={"Range": f"bytes={spec}"})
    assert response.status_code == 200 and response.content == artifact


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"])
def test_the_bundle_server_refuses_every_other_method_as_json(bundles, method):
    server, artifact, client = bundles
    response = client.request(method, "/fashion/3/model.onnx")
    assert response.status_code == 405 and method in json_error(response)
    assert response.headers["allow"] == "GET, HEAD"


def test_a_missing_file_is_a_json_404_naming_the_path(bundles):
    server, artifact, client = bundles
    response = client.get("/fashion/9/model.onnx")
    assert "/fashion/9/model.onnx" in json_error(response) and response.status_code == 404
    assert client.get("/fashion/3/model.onnx").content == artifact


def test_a_path_into_the_bundle_folder_itself_is_not_a_listing(bundles):
    server, artifact, client = bundles
    for path in ("/", "/fashion", "/fashion/3/", "/fashion/3"):
        assert client.get(path).status_code == 404
    assert Path(server.root).is_dir()


def test_every_answer_forbids_framing_sniffing_and_the_referer(review, bundles):
    """Both pages' one-click decisions must not be clickjacked (with --no-auth a framing page could click them),
    a served file is never sniffed as another type, and no URL leaves in a Referer."""
    server, store, records, client = review
    answers = [client.get("/"), client.get("/static/review.js"), client.get("/api/frames"), client.get("/api/nope"),
               bundles[2].get("/fashion/3/manifest.json"), bundles[2].get("/nope")]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.url
        assert answer.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in \
            answer.headers["content-security-policy"]
        assert answer.headers["referrer-policy"] == "no-referrer"


# ---------------------------------------------------------------- slow clients

def slow_app_server(folder: Path, head_timeout_s: float):
    """The real review app with a slow endpoint beside it, served as every central service is (``Served``)."""
    import asyncio

    from central.http import Served as Serving
    from central.review.api import create_app

    store = FrameStore(folder / "store", labels=LABELS)
    review_app = create_app(store, TOKEN)

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/slow":         # an answer that takes 3 deadlines
            await asyncio.sleep(3 * head_timeout_s)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await review_app(scope, receive, send)
    return Serving(app, "127.0.0.1", 0, name="slow-test", head_timeout_s=head_timeout_s).start(), store


def closed_by_server(sock: socket.socket, drip: bytes, every_s: float, within_s: float) -> bool:
    """Whether the server closes ``sock`` while ``drip`` is sent every ``every_s`` seconds, within ``within_s``."""
    import time

    deadline = time.monotonic() + within_s
    sock.settimeout(every_s)
    while time.monotonic() < deadline:
        try:
            sock.sendall(drip)
            if sock.recv(1) == b"":
                return True
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def test_a_client_that_drips_its_request_head_is_closed_and_others_are_served(tmp_path):
    """Given a server whose clients have 1 s to send a request's head, when one client sends half a head and then
    a header line every 0.2 s, another connects and sends nothing, and a third is kept alive after an answer and
    drips its next head, then the server closes all three (before: they stayed open for ever, each holding a file
    descriptor), while a request whose answer takes 3 s is answered whole and the API keeps answering."""
    server, store = slow_app_server(tmp_path, head_timeout_s=1.0)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as dripping, \
                socket.create_connection(("127.0.0.1", server.port), timeout=30) as silent, \
                socket.create_connection(("127.0.0.1", server.port), timeout=30) as kept_alive:
            dripping.sendall(b"GET /api/stats HTTP/1.1\r\nHost: x\r\n")
            kept_alive.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            kept_alive.settimeout(60)
            answer = b""
            while not answer.endswith(b"ok"):
                answer += kept_alive.recv(1024)
            assert answer.startswith(b"HTTP/1.1 200 ")                # a slow answer is never cut
            kept_alive.sendall(b"GET /api/stats HTTP/1.1\r\n")
            assert closed_by_server(dripping, b"X-a: b\r\n", 0.2, 60)
            assert closed_by_server(kept_alive, b"X-a: b\r\n", 0.2, 60)
            assert closed_by_server(silent, b"", 0.2, 60)
        response = httpx.get(f"{server.url}api/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert response.status_code == 200
    finally:
        server.stop()
        store.close()
