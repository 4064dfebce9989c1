"""Hostile input against the dashboard: station messages (non-finite, wrong-typed, huge, random bytes) and
HTTP requests. The state refuses and counts what it cannot use, its snapshot and event stream stay strict
JSON listing the good stations, and the page is authenticated unless the operator opts out."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import uuid

import httpx
import pytest
from dashboard_support import REPO, get_json, publish, retopic, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from central.dashboard.server import Dashboard, sse
from central.dashboard.state import WarehouseState
from contract.broker import BrokerSettings
from contract.messages import dumps_finite, loads_finite

pytestmark = pytest.mark.mqtt
GOOD, BAD = "test/good-01", "test/bad-01"
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e999", "-1e400")
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def leaves(value, path=()):
    """Every (path, leaf) of a JSON body."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, path + (i,))
    else:
        yield path, value


def replaced(body, path, value):
    body = json.loads(json.dumps(body))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


@pytest.fixture(scope="module")
def station_messages(recorded):
    """One recorded message of each kind, as the good and as the bad station would send it."""
    kinds = {}
    for message in recorded:
        kinds.setdefault(message.kind, message)
    return kinds


def strict_snapshot(state: WarehouseState) -> dict:
    """The snapshot as the page gets it: strict JSON (no NaN), parsed back."""
    return loads_finite(dumps_finite(state.snapshot(now=5000.0)))


def fresh_state(station_messages) -> WarehouseState:
    state = WarehouseState()
    for kind in ("status", "result", "stats"):
        message = retopic(station_messages[kind], *GOOD.split("/"))
        assert state.ingest(message.topic, message.payload, received_at=1000.0) == "applied"
    return state


@st.composite
def hostile_messages(draw, station_messages):
    """(topic, payload) for the bad station: non-finite numbers, wrong types, huge, random bytes."""
    kind = draw(st.sampled_from(sorted(station_messages)))
    base = json.loads(retopic(station_messages[kind], *BAD.split("/")).payload)
    topic = f"inventory/{BAD}/{kind}"
    numbers = [path for path, leaf in leaves(base) if isinstance(leaf, (int, float)) and not isinstance(leaf, bool)]
    how = draw(st.sampled_from(["non-finite", "wrong type", "huge", "random bytes", "not an object"]))
    if how == "non-finite" and numbers:
        body = replaced(base, draw(st.sampled_from(numbers)), "@@")
        return topic, json.dumps(body).replace('"@@"', draw(st.sampled_from(NON_FINITE))).encode(), how
    if how == "wrong type":
        path, leaf = draw(st.sampled_from(list(leaves(base))))
        value = draw(JSON_VALUES.filter(lambda v: type(v) is not type(leaf) and not (
            isinstance(v, (int, float)) and isinstance(leaf, (int, float)) and not isinstance(leaf, bool))))
        return topic, json.dumps(replaced(base, path, value)).encode(), how
    if how == "huge":
        path = draw(st.sampled_from([p for p, leaf in leaves(base) if isinstance(leaf, str)]))
        return topic, json.dumps(replaced(base, path, "x" * draw(st.integers(1 << 20, 3 << 20)))).encode(), how
    if how == "random bytes":
        return topic, draw(st.binary(max_size=300)), how
    return topic, json.dumps(draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))).encode(), how


@settings(max_examples=200)
@given(data=st.data())
def test_hostile_station_messages_are_refused_counted_and_the_snapshot_stays_strict_json(station_messages, data):
    state = fresh_state(station_messages)
    good_before = strict_snapshot(state)["stations"]
    topic, payload, how = data.draw(hostile_messages(station_messages))
    outcome = state.ingest(topic, payload, received_at=1001.0)
    snap = strict_snapshot(state)                    # never NaN, never an exception
    if outcome == "malformed":
        assert snap["counters"]["malformed"] == 1 and snap["malformed"][0]["topic"] == topic
        assert BAD not in [s["key"] for s in snap["stations"]]
        if how == "non-finite":
            assert "not JSON" in snap["malformed"][0]["reason"]
    else:                                            # a wrong type the schema allows (e.g. a null it permits)
        assert how == "wrong type" and outcome == "applied", (how, outcome)
    if how in ("non-finite", "huge", "random bytes", "not an object"):
        assert outcome == "malformed", (how, payload[:200])
    assert [s for s in snap["stations"] if s["key"] == GOOD] == good_before
    state.drain_changes(now=5000.0)
    rows = state.rows(now=5000.0)
    for name, change in (("overview", state.overview(5000.0, rows)), ("stations", {"stations": rows}),
                         ("station", state.station_card(GOOD, 5000.0))):
        loads_finite(sse(name, change).split(b"data: ", 1)[1])
    message = retopic(station_messages["result"], *GOOD.split("/"))
    assert state.ingest(message.topic, message.payload, received_at=1002.0) == "applied"


def test_deep_nesting_and_negative_counts_are_refused_by_name_and_a_flood_logs_no_traceback(station_messages,
                                                                                          caplog):
    """A payload nested deeper than the JSON parser goes, and counters the schema bounds below (two cameras'
    -1e308 frames dropped would overflow the station's total): refused as named bad input, and a flood of
    them logs its first 20 and every 100th, without a traceback each."""
    state = fresh_state(station_messages)
    stats = json.loads(retopic(station_messages["stats"], *BAD.split("/")).payload)
    negative = json.dumps({**stats, "frames_dropped": {"a": -1e308, "b": -1e308}}).encode()
    deep = b"[" * 30_000 + b"]" * 30_000
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="central.dashboard.state"):
        for _ in range(150):
            assert state.ingest(f"inventory/{BAD}/status", deep, received_at=1001.0) == "malformed"
            assert state.ingest(f"inventory/{BAD}/stats", negative, received_at=1001.0) == "malformed"
    snap = strict_snapshot(state)
    assert snap["counters"]["malformed"] == 300
    assert "nested deeper" in snap["malformed"][1]["reason"] and "frames_dropped" in snap["malformed"][0]["reason"]
    flood = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "central.dashboard.state"]
    assert not [r for r in flood if r.exc_info] and len(flood) == 20 + 3      # the first 20, the 100th ... 300th
    message = retopic(station_messages["result"], *GOOD.split("/"))
    assert state.ingest(message.topic, message.payload, received_at=1002.0) == "applied"


def test_a_view_that_cannot_be_finite_shows_null_and_the_other_stations_still_show(station_messages):
    state = fresh_state(station_messages)
    other = retopic(station_messages["status"], "test", "other-01")
    assert state.ingest(other.topic, other.payload, received_at=1000.0) == "applied"
    state.stations[GOOD].stats["fps_total"] = float("inf")      # however it got there
    snap = strict_snapshot(state)
    shown = {s["key"]: s for s in snap["stations"]}
    assert set(shown) == {GOOD, "test/other-01"} and shown[GOOD]["stats"]["fps_total"] is None
    rows = {r["key"]: r for r in loads_finite(dumps_finite(state.rows(now=5000.0)))}
    assert set(rows) == {GOOD, "test/other-01"} and rows[GOOD]["fps_total"] is None
    assert loads_finite(dumps_finite(state.station_card(GOOD, 5000.0)))["stats"]["fps_total"] is None


# ---------------------------------------------------------------- over HTTP and a real broker

def _dashboard(broker_port: int, **kw) -> Dashboard:
    dash = Dashboard(BrokerSettings(port=broker_port), port=0, push_interval_s=0.1, **kw)
    dash.start()
    return dash


def test_the_page_needs_a_password_by_default_and_health_stays_open(broker):
    dash = _dashboard(broker.port)
    try:
        user, password = dash.web_auth
        assert user == "viewer" and len(password) >= 24
        for path in ("/", "/api/state", "/api/overview", "/api/stations", "/api/stations/a/b", "/events",
                     "/static/app.js"):
            response = httpx.get(dash.url.rstrip("/") + path, timeout=10)
            assert response.status_code == 401 and response.json()["error"] == "authentication required", path
            assert response.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(dash.url + "healthz", timeout=10).json()["ok"] is True
        assert httpx.get(dash.url + "api/state", auth=(user, password), timeout=10).status_code == 200
        assert httpx.get(dash.url + "api/state", auth=(user, password + "x"), timeout=10).status_code == 401
    finally:
        dash.stop()


def test_the_cli_writes_the_password_it_made_to_a_file_only_its_owner_reads(broker, tmp_path):
    out = tmp_path / "state" / "dashboard-web.password"
    proc = subprocess.Popen([sys.executable, "-m", "central", "dashboard", "--mqtt-port", str(broker.port), "--port",
                             "0", "--web-password-out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.match(r"dashboard: (\S+) \(user 'viewer'", line).group(1)
        password = out.read_text().strip()
        assert out.stat().st_mode & 0o777 == 0o600 and len(password) >= 24
        assert httpx.get(url + "api/state", timeout=10).status_code == 401
        assert httpx.get(url + "api/state", auth=("viewer", password), timeout=10).status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert str(out) in err


METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
PATHS = st.sampled_from(["/", "/index.html", "/api/state", "/healthz", "/static/app.js", "/static/../x",
                         "/static/%2e%2e/state.py", "/static/a%00.js", "/api", "/api/state/x", "/nope", "/api/overview",
                         "/api/stations", "/api/stations/a/b", "/api/stations/a"]) | st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="?#"), max_size=60).map(
    lambda p: "/" + p)


@settings(max_examples=120)
@given(method=METHODS, path=PATHS, query=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=30),
                                                         max_size=3),
       body=st.binary(max_size=5000), origin=st.none() | st.sampled_from(["http://evil.example", "null"]))
def test_every_dashboard_endpoint_answers_generated_requests_without_a_5xx(open_dashboard, method, path, query,
                                                                           body, origin):
    headers = {"Origin": origin} if origin else {}
    client = open_dashboard
    response = client.request(method, path, params=query, content=body or None, headers=headers)
    assert response.status_code < 500, (method, path, response.status_code)
    if response.status_code >= 400 and method != "HEAD":
        assert loads_finite(response.content)["error"], response.text[:200]
    if origin and method in ("POST", "PUT", "DELETE", "PATCH"):
        assert response.status_code in (403, 413), response.status_code
    state = client.get("/api/state")
    assert state.status_code == 200 and loads_finite(state.content)["schema"] == "dashboard-state.v1"


@pytest.fixture(scope="module")
def open_dashboard(tmp_path_factory, mosquitto_bin):
    from agent_support import Broker

    broker = Broker(tmp_path_factory.mktemp("hostile-dashboard-broker")).start()
    dash = _dashboard(broker.port, no_auth=True)
    client = httpx.Client(base_url=dash.url.rstrip("/"), timeout=30)
    yield client
    client.close()
    dash.stop()
    broker.stop()


def test_over_a_real_broker_bad_messages_are_counted_and_the_page_still_lists_the_good_station(broker,
                                                                                              station_messages):
    dash = _dashboard(broker.port, no_auth=True)
    try:
        wait_until(lambda: get_json(dash.url + "healthz")["broker_connected"], 30, "the dashboard connected")
        good = [retopic(station_messages[k], *GOOD.split("/")) for k in ("status", "result")]
        bad_result = json.loads(retopic(station_messages["result"], *BAD.split("/")).payload)
        bad_status = json.loads(retopic(station_messages["status"], *BAD.split("/")).payload)
        bad = [(f"inventory/{BAD}/result", json.dumps({**bad_result, "confidence": "@@"}).replace('"@@"', "NaN")),
               (f"inventory/{BAD}/status", json.dumps({**bad_status, "uptime_s": "@@"}).replace('"@@"', "1e999")),
               (f"inventory/{BAD}/stats", bytes(range(256))),
               (f"inventory/{BAD}/result", json.dumps({**bad_result, "id": str(uuid.uuid4()), "seq": "1"}))]
        publish(broker.port, [(m.topic, m.payload) for m in good[:1]] + bad + [(m.topic, m.payload) for m in good[1:]])
        def taken() -> dict | None:
            snap = loads_finite(httpx.get(dash.url + "api/state", timeout=10).content)
            done = snap["counters"]["malformed"] >= 4 and snap["stations"] and snap["stations"][0]["counts"]["result"]
            return snap if done else None

        snap = wait_until(taken, 30, "every message taken")
        assert [s["key"] for s in snap["stations"]] == [GOOD] and snap["counters"]["malformed"] == 4
        with httpx.stream("GET", dash.url + "events", timeout=10) as stream:
            lines = stream.iter_lines()
            data = next(line for line in lines if line.startswith("data: ") and '"offset"' in line)
            assert loads_finite(data[6:])["stations"][0]["key"] == GOOD
    finally:
        dash.stop()
