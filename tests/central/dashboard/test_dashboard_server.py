"""The dashboard's HTTP side (page, /api/state, the /events stream) and its CLI, against a real broker; and the
dashboard on the shipped central broker (TLS, password, ACL; TCP and secure websockets)."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request

import pytest
from dashboard_support import (
    DashboardProcess,
    failed_gate_event,
    get_json,
    publish,
    publish_event,
    retopic,
    rollout_event,
    wait_until,
)

from central.dashboard.cli import main
from central.dashboard.server import Dashboard
from central.dashboard.state import StateLimits
from contract.broker import BrokerSettings

pytestmark = pytest.mark.mqtt


class EventStream:
    """A raw Server-Sent Events reader, as a browser's EventSource sees the stream."""

    def __init__(self, url_host: str, port: int, query: str = "", timeout: float = 30.0) -> None:
        self.conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
        self.conn.request("GET", "/events" + query, headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()
        self.bytes = 0

    def next_event(self) -> tuple[str, dict]:
        name, data = None, None
        while True:
            raw = self.response.fp.readline()
            self.bytes += len(raw)
            line = raw.decode()
            if not line:
                raise EOFError("the stream ended")
            line = line.rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
            elif line == "" and name is not None:
                return name, data

    def until(self, predicate, timeout: float = 60.0) -> list[tuple[str, dict]]:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            seen.append(self.next_event())
            if predicate(*seen[-1]):
                return seen
        raise AssertionError(f"no matching event in {[n for n, _ in seen]}")

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def dashboard(broker):
    dash = Dashboard(BrokerSettings(port=broker.port), port=0, push_interval_s=0.1,
                     limits=StateLimits(recent=5), no_auth=True)
    dash.start()
    yield dash
    dash.stop()


def test_the_stream_sends_the_overview_and_the_page_then_what_changed(dashboard, broker, recorded):
    host, port = dashboard.address
    stream = EventStream(host, port, "?station=test/st-01")
    try:
        # a browser connecting gets the overview, its page of the station list and its open card first
        assert stream.response.getheader("Content-Type") == "text/event-stream"
        first = dict([stream.next_event() for _ in range(3)])
        assert first["overview"]["schema"] == "dashboard-overview.v1" and first["overview"]["fleet"]["stations"] == 0
        assert first["stations"]["total"] == 0 and first["stations"]["stations"] == []
        assert "no station 'test/st-01'" in first["station"]["error"]
        # when a station's status and a result arrive on the broker: the overview, the page and the card
        status = next(m for m in recorded if m.kind == "status" and m.json()["state"] == "online")
        result = next(m for m in recorded if m.kind == "result")
        publish(broker.port, [(status.topic, status.payload), (result.topic, result.payload)])
        events = stream.until(lambda n, d: n == "station" and d.get("counts", {}).get("result") == 1)
        view = events[-1][1]
        assert view["key"] == "test/st-01" and view["health"] == "online"
        # the agent's first status is sent before its camera opens; a result shows no frame rate yet. The recording
        # refuses an update right after the start: on a loaded machine that lands before the first status.
        down = [c for c, up in status.json()["cameras"].items() if not up]
        refused = (status.json().get("last_model_update") or {}).get("ok") is False
        assert [r["code"] for r in view["reasons"]] == (["update-refused"] if refused else []) + \
            (["camera-down"] if down else [])
        assert view["results"][0]["id"] == result.json()["id"]
        pages = [d for n, d in events if n == "stations"]
        assert pages and pages[-1]["stations"][0]["key"] == "test/st-01"
        # and a rollout event, in the overview
        event = failed_gate_event()
        publish_event(broker.port, event)
        events = stream.until(lambda n, d: n == "overview" and d["rollout_events"])
        overview = events[-1][1]
        assert overview["rollout_events"][0]["id"] == event["id"]
        assert overview["broker"]["connected"] is True and overview["counters"]["received"] == 3
    finally:
        stream.close()


def test_a_burst_of_results_is_pushed_as_few_updates(dashboard, broker, recorded):
    host, port = dashboard.address
    stream = EventStream(host, port, "?station=test/st-01")
    try:
        results = [retopic(m, "test", "st-01") for m in recorded if m.kind == "result"][:40]
        publish(broker.port, [(m.topic, m.payload) for m in results])
        events = stream.until(lambda n, d: n == "station" and d.get("counts", {}).get("result") == len(results))
        station_events = [d for n, d in events if n == "station" and "counts" in d]
        # merged per push interval: far fewer pushes than messages, and the last one holds the newest 5
        assert len(station_events) < len(results)
        assert [r["id"] for r in station_events[-1]["results"]] == [m.json()["id"] for m in results[::-1][:5]]
    finally:
        stream.close()


def test_a_page_that_shows_other_stations_is_not_sent_a_stations_card(dashboard, broker, recorded):
    host, port = dashboard.address
    status = next(m for m in recorded if m.kind == "status" and m.json()["state"] == "online")
    publish(broker.port, [(m.topic, m.payload) for m in (retopic(status, "a", "st-01"), retopic(status, "b", "st-01"))])
    wait_until(lambda: get_json(dashboard.url + "api/overview")["fleet"]["stations"] == 2, 30, "two stations")
    stream = EventStream(host, port, "?site=a")
    try:
        first = dict([stream.next_event() for _ in range(2)])
        assert [r["key"] for r in first["stations"]["stations"]] == ["a/st-01"]
        # a result from site b changes the overview, never this page's rows, and sends no card
        result = next(m for m in recorded if m.kind == "result")
        publish(broker.port, [(m.topic, m.payload) for m in (retopic(result, "b", "st-01"),)])
        events = stream.until(lambda n, d: n == "overview" and d["counters"]["received"] == 3)
        assert {n for n, _ in events} == {"overview"}
    finally:
        stream.close()


def test_a_page_that_stops_reading_is_cut_off_holding_nothing_and_open_pages_are_capped(broker, monkeypatch):
    """A page whose connection stopped taking bytes kept up to 512 events of ~100 kB each (50 MB a page, any
    number of pages). Now a page holding more than QUEUE_BYTES is cut off and its queue emptied at once; past
    MAX_LISTENERS a new page gets a 503, and the open pages keep their streams."""
    import asyncio

    import central.dashboard.server as server

    listener = server.Listener(asyncio.new_event_loop())
    event = b"x" * (server.QUEUE_BYTES // 3)
    for _ in range(3):
        listener.offer(event)
    assert not listener.cut and listener.queued_bytes == 3 * len(event)
    listener.offer(event)
    assert listener.cut and listener.queued_bytes == 0 and listener.events.qsize() == 1      # the wake-up only
    listener.offer(event)
    assert listener.events.qsize() == 1
    monkeypatch.setattr(server, "MAX_LISTENERS", 2)
    dash = Dashboard(BrokerSettings(port=broker.port), port=0, push_interval_s=0.1, no_auth=True)
    dash.start()
    try:
        host, port = dash.address
        pages = [EventStream(host, port) for _ in range(2)]
        wait_until(lambda: dash.broadcaster.count == 2, 10, "two pages open")
        third = http.client.HTTPConnection(host, port, timeout=10)
        third.request("GET", "/events")
        answer = third.getresponse()
        assert answer.status == 503 and "2 pages are open already" in json.loads(answer.read())["error"]
        assert pages[0].next_event()[0] in ("overview", "stations")
        for page in pages:
            page.close()
        third.close()
    finally:
        dash.stop()


def test_the_page_and_its_files_are_served_and_nothing_else(dashboard):
    url = dashboard.url
    with urllib.request.urlopen(url) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
    assert 'id="stations"' in page and 'id="rollout-events"' in page and "/static/app.js" in page
    assert "http://" not in page and "https://" not in page            # no CDN: everything is served here
    with urllib.request.urlopen(url + "static/app.js") as response:
        assert response.headers["Content-Type"].startswith("text/javascript")
        assert "EventSource" in response.read().decode()
    for path in ["static/../state.py", "static/state.py", "static/%2e%2e/__init__.py", "nope"]:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + path)
        assert err.value.code == 404 and "error" in json.loads(err.value.read()), path
    assert get_json(url + "healthz")["broker_connected"] in (True, False)
    assert get_json(url + "api/state")["topic_root"] == "inventory"


def test_a_slow_whole_state_holds_up_neither_health_nor_the_pages_streams(monkeypatch):
    """/api/state of a thousand stations takes a second or more to build and encode (27 MB). The endpoints ran on the
    server's event loop: while one was built, /healthz and every open page's stream waited (7.9 s for /healthz while
    three scripts fetched it, /tmp/dashboard/repro_event_loop_blocked.py). Here the build waits on an event, so the
    test does not depend on how fast this machine is."""
    import threading

    from fleet_messages import FleetStation

    from central.dashboard.server import Broadcaster, Pusher, create_app
    from central.dashboard.state import WarehouseState
    from central.http import Served

    state = WarehouseState()
    st = FleetStation("ber1", "dock-01")
    state.ingest(*st.message("status", st.status(time.time())))
    building, release = threading.Event(), threading.Event()
    whole = state.snapshot

    def slow_snapshot(*args, **kwargs):
        building.set()
        release.wait(120)
        return whole(*args, **kwargs)

    monkeypatch.setattr(state, "snapshot", slow_snapshot)
    broadcaster = Broadcaster()
    served = Served(create_app(state, broadcaster), "127.0.0.1", 0, name="dashboard")
    served.start()
    base = f"http://127.0.0.1:{served.port}"
    script = threading.Thread(target=lambda: get_json(f"{base}/api/state", 180))
    page = None
    try:
        script.start()
        assert building.wait(60), "/api/state never started"
        assert get_json(f"{base}/healthz", 30)["stations"] == 1
        assert get_json(f"{base}/api/stations", 30)["total"] == 1
        page = EventStream("127.0.0.1", served.port, timeout=30)
        wait_until(lambda: broadcaster.count == 1, 30, "the page's stream registered")
        Pusher(state, broadcaster, time.time).round()
        assert page.next_event()[0] == "overview"
        assert script.is_alive()                          # all the while, the whole state was being built
    finally:
        release.set()
        script.join(60)
        if page is not None:
            page.close()
        broadcaster.close()
        served.stop()


def test_a_station_taken_out_of_service_leaves_the_page_when_its_retained_status_is_cleared(dashboard, broker,
                                                                                            recorded):
    """``mosquitto_pub -r -n -t inventory/<site>/<station>/status``, the MQTT way to drop a retained message:
    the dashboard got an empty message, counted it as malformed and kept the station, offline and degraded."""
    status = next(m for m in recorded if m.kind == "status" and m.json()["state"] == "offline")
    old, kept = retopic(status, "ber1", "old-dock"), retopic(status, "ber1", "dock-02")
    publish(broker.port, [(old.topic, old.payload), (kept.topic, kept.payload)], retain=True)
    host, port = dashboard.address
    wait_until(lambda: get_json(f"http://{host}:{port}/api/stations")["total"] == 2, 30, "two stations listed")
    publish(broker.port, [(old.topic, b"")], retain=True)
    page = wait_until(lambda: (lambda p: p if p["total"] == 1 else None)(
        get_json(f"http://{host}:{port}/api/stations")), 30, "the station gone from the list")
    assert [r["key"] for r in page["stations"]] == ["ber1/dock-02"]
    overview = get_json(f"http://{host}:{port}/api/overview")
    assert overview["counters"]["malformed"] == 0 and overview["fleet"]["offline"] == 1
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{host}:{port}/api/stations/ber1/old-dock")
    assert err.value.code == 404
    # a dashboard started now never sees it: the broker holds no retained status for it any more
    late = Dashboard(BrokerSettings(port=broker.port), port=0, push_interval_s=0.1, no_auth=True)
    late.start()
    try:
        host2, port2 = late.address
        wait_until(lambda: get_json(f"http://{host2}:{port2}/api/stations")["total"] == 1, 30, "the retained one")
        assert [r["key"] for r in get_json(f"http://{host2}:{port2}/api/stations")["stations"]] == ["ber1/dock-02"]
    finally:
        late.stop()


def test_the_cli_refuses_a_missing_password_file_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope.password"
    assert main(["--password-file", str(missing), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--password-file" in err and str(missing) in err


def test_the_cli_says_when_its_port_is_taken(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--port", str(port), "--mqtt-port", "1"]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("args, named", [
    (["--push-interval", "nan"], "--push-interval: expected a finite number in (0, 60], got nan"),
    (["--push-interval", "inf"], "--push-interval"), (["--stale-factor", "nan"], "--stale-factor"),
    (["--stale-min-s", "inf"], "--stale-min-s"), (["--port", "70000"], "--port: 70000 is not a TCP port"),
    (["--port", "-1"], "--port: -1 is not a TCP port"),
    (["--web-tls-cert", "/nonexistent/cert.pem"], "--web-tls-cert /nonexistent/cert.pem"),
    (["--web-tls-key", "/nonexistent/key.pem"], "--web-tls-key: give the certificate too (--web-tls-cert)")])
def test_the_cli_names_a_setting_that_could_not_work(args, named, tmp_path, capsys):
    """NaN passed "<= 0" (a busy push loop, or no station ever stale), a port past 65535 was a traceback, and the
    page's TLS errors named the MQTT flags or no file at all."""
    assert main(["--no-auth", "--mqtt-port", "1", *(["--port", "0"] if "--port" not in args else []), *args]) == 2
    assert named in capsys.readouterr().err


def test_the_dashboard_shows_the_broker_down_and_recovers(tmp_path, broker, recorded):
    dash = DashboardProcess(tmp_path, broker.port)
    try:
        dash.wait_state(lambda s: s["broker"]["connected"], "connected")
        broker.stop()
        snap = dash.wait_state(lambda s: not s["broker"]["connected"], "the broker seen down")
        assert str(broker.port) in snap["broker"]["detail"]
        broker.start()
        dash.wait_state(lambda s: s["broker"]["connected"], "reconnected", timeout=90)
        status = next(m for m in recorded if m.kind == "status")
        publish(broker.port, [(status.topic, status.payload)])
        dash.wait_station("test/st-01", lambda s: s["counts"]["status"] == 1, "a message after the reconnect")
    finally:
        dash.stop()


# ---------------------------------------------------------------- the shipped central broker

@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_on_the_shipped_central_broker_as_user_dashboard(tmp_path, transport, recorded):
    from deploy_support import MOSQUITTO_PASSWD, USERS, CentralBroker, make_pki

    if not __import__("pathlib").Path(MOSQUITTO_PASSWD).exists():
        pytest.skip("mosquitto_passwd is not installed (apt-get install mosquitto)")
    central = CentralBroker(tmp_path / "central", make_pki(tmp_path / "pki"))
    central.workdir.mkdir()
    central.start()
    password = tmp_path / "dashboard.password"
    password.write_text(USERS["dashboard"] + "\n")
    port = central.tls_port if transport == "tcp" else central.ws_port
    dash = DashboardProcess(tmp_path, port, "--transport", transport, "--tls-ca", str(central.pki.ca_cert),
                            "--username", "dashboard", "--password-file", str(password))
    try:
        dash.wait_state(lambda s: s["broker"]["connected"], "connected to the central broker")
        # a station (user ber1/receiving-01) publishes its status and a result, as the agent builds them
        station = {"username": "ber1/receiving-01", "password": USERS["ber1/receiving-01"],
                   "ca": central.pki.ca_cert}
        status = next(m for m in recorded if m.kind == "status" and m.json()["state"] == "online")
        result = next(m for m in recorded if m.kind == "result")
        messages = [retopic(status, "ber1", "receiving-01"), retopic(result, "ber1", "receiving-01")]
        publish(central.tls_port, [(m.topic, m.payload) for m in messages], **station)
        # central (user central-ingest) publishes a rollout event; the ACL lets the dashboard read it
        event = rollout_event("canary", True, None, ["ber1/receiving-01"])
        publish(central.tls_port, [("inventory/_central/rollout", json.dumps(event))], retain=True,
                username="central-ingest", password=USERS["central-ingest"], ca=central.pki.ca_cert)
        view = dash.wait_station("ber1/receiving-01", lambda s: s["counts"]["result"] == 1 and s["rollout"],
                                 "the station's status, result and rollout event")
        assert view["health"] == "online" and view["rollout"]["id"] == event["id"]
        assert "Denied" not in central.log()
    finally:
        dash.stop()
        central.stop()
