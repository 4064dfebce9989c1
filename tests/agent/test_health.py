"""The station's /metrics: prometheus_client's server over the agent's own tables, read back by its parser."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from agent.health import Metrics, PrometheusServer


def _scrape(port: int) -> dict[str, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200 and resp.headers.get_content_type() == "text/plain"
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_endpoint_serves_counters_gauges_latency_and_model_info():
    metrics = Metrics()
    metrics.info.update(model_name="fmnist", model_version="3")
    metrics.inc("frames_captured_total", 5, camera="dock-a")
    metrics.inc("frames_captured_total", 2, camera='odd "cam"\\b')      # quotes and backslashes escaped
    metrics.set("queue_depth", 4, queue="inference")
    for ms in (1, 2, 3, 4, 100):
        metrics.observe("inference", ms / 1000.0)
    server = PrometheusServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        families = _scrape(server.port)
        captured = {s.labels["camera"]: s.value for s in families["agent_frames_captured"].samples
                    if s.name == "agent_frames_captured_total"}
        assert captured == {"dock-a": 5.0, 'odd "cam"\\b': 2.0}
        assert families["agent_frames_captured"].type == "counter"
        assert [(s.labels, s.value) for s in families["agent_queue_depth"].samples] == [({"queue": "inference"}, 4.0)]
        quantiles = {s.labels["quantile"]: s.value for s in families["agent_latency_seconds"].samples}
        assert quantiles["0.5"] == 0.003 and quantiles["0.99"] > 0.09
        info = families["agent_model_info"].samples[0]
        assert info.labels == {"model_name": "fmnist", "model_version": "3"} and info.value == 1
        metrics.inc("frames_captured_total", 1, camera="dock-a")           # live: the next scrape sees it
        again = _scrape(server.port)["agent_frames_captured"].samples
        assert {s.labels["camera"]: s.value for s in again if s.name.endswith("_total")}["dock-a"] == 6.0
    finally:
        server.stop()


def test_non_finite_values_are_refused_counted_and_never_served(caplog):
    """NaN or an infinity used to be stored: /metrics served NaN/+Inf and snapshot() raised OverflowError."""
    metrics = Metrics()
    metrics.info.update(model_name="fmnist", model_version="3")
    metrics.inc("frames_captured_total", 2, camera="a")
    metrics.observe("inference", 0.004)
    metrics.set("queue_depth", 3, queue="camera:a")
    metrics.observe("inference", float("nan"))
    metrics.set("queue_depth", float("inf"), queue="camera:a")
    metrics.set("outbox_depth", "12")                                   # not a number either
    metrics.inc("frames_dropped_total", float("nan"), camera="a")
    metrics.inc("frames_captured_total", float("-inf"), camera="a")
    metrics.inc("frames_captured_total", 1.7e308, camera="a")
    metrics.inc("frames_captured_total", 1.7e308, camera="a")          # the sum would overflow to +Inf
    snap = metrics.snapshot()                                           # raised OverflowError before
    assert snap["queue_depths"] == {"camera:a": 3} and snap["frames_dropped"] == {}
    assert snap["latency"]["inference"]["n"] == 1
    assert snap["frames_captured"] == {"a": 2 + 1.7e308}
    refused = metrics.counters_by("metrics_refused_total", "metric")
    assert refused == {"latency:inference": 1, "queue_depth": 1, "outbox_depth": 1, "frames_dropped_total": 1,
                       "frames_captured_total": 2}
    assert caplog.text.count("metric frames_captured_total: refused") == 1        # logged once per metric
    server = PrometheusServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        server.stop()
    assert "NaN" not in text and "Inf" not in text
    assert 'agent_metrics_refused_total{metric="queue_depth"} 1.0' in text


def test_a_client_error_on_the_metrics_server_is_logged_at_debug_not_printed(capsys, caplog):
    """What the server does for a client that connected and sent nothing until its read timed out: before, the
    socketserver default printed a traceback on stderr for each such client."""
    server = PrometheusServer(Metrics(), "127.0.0.1", 0)
    server.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="agent.health"):
            try:
                raise TimeoutError("timed out")
            except TimeoutError:
                server._server.handle_error(None, ("127.0.0.1", 40000))
    finally:
        server.stop()
    assert capsys.readouterr().err == ""
    assert "metrics: client ('127.0.0.1', 40000): timed out" in caplog.text


def test_stop_returns_for_a_server_that_never_started_and_frees_its_port():
    """A start that failed after the port was bound (Agent.start) left stop() waiting for a serve loop that never
    began: Agent.shutdown() hung. Now stop() closes the socket and returns, and a second stop() does too."""
    import socket
    import threading

    server = PrometheusServer(Metrics(), "127.0.0.1", 0)
    port = server.port
    stopping = threading.Thread(target=lambda: (server.stop(), server.stop()), daemon=True)
    stopping.start()
    stopping.join(60)       # a hang detector, not a timing: stop() returns at once or never
    assert not stopping.is_alive(), "PrometheusServer.stop() hangs when start() never ran"
    with socket.socket() as again:      # the port is free again: the socket was closed
        again.bind(("127.0.0.1", port))


def test_stop_after_start_still_ends_the_serve_loop():
    server = PrometheusServer(Metrics(), "127.0.0.1", 0)
    server.start()
    assert "agent_model_info" in _scrape(server.port)
    server.stop()
    server.stop()
    server._thread.join(60)     # its loop has returned (stop() waited for that); the thread ends right after
    assert not server._thread.is_alive()


class CountingWhileReading:
    """The metrics lock, taken by the reader; each time it is taken, one more low-confidence frame has been counted
    (captured, classified, low), as the camera and inference threads do between two reads of a stats round."""

    def __init__(self, metrics: Metrics) -> None:
        self.inner = threading.Lock()
        self.table = metrics._counters

    def __enter__(self) -> "CountingWhileReading":
        self.inner.acquire()
        for name in ("frames_captured_total", "frames_classified_total", "frames_low_confidence_total"):
            key = (name, (("camera", "a"),))
            self.table[key] = self.table.get(key, 0.0) + 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.release()


def test_a_stats_snapshot_taken_while_frames_are_counted_agrees_with_itself():
    """Each counter used to be read under its own lock: frames counted between the reads gave more low-confidence
    frames than classified ones, a low_confidence_rate of 1.5 (stats.v1 allows at most 1)."""
    metrics = Metrics()
    metrics._lock = CountingWhileReading(metrics)      # type: ignore[assignment]
    snap = metrics.snapshot()
    assert snap["frames_low_confidence"] <= snap["frames_classified"] <= sum(snap["frames_captured"].values())
    assert 0 <= snap["low_confidence_rate"] <= 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_fps_over_a_span_of_milliseconds_is_not_thousands_of_frames_per_second(monkeypatch):
    """The final stats message at a stop comes a few ms after a periodic one: one frame in 5 ms read as 200 fps."""
    clock = Clock()
    monkeypatch.setattr("agent.health.time", clock)
    metrics = Metrics()
    for second in (1, 2):           # periodic rounds of 1 s, 30 frames each
        metrics.inc("frames_captured_total", 30, camera="a")
        clock.now += 1.0
        assert metrics.snapshot()["fps"] == {"a": 30.0}
    metrics.inc("frames_captured_total", 1, camera="a")
    clock.now += 0.005
    assert metrics.snapshot()["fps"] == {"a": round(31 / 1.005, 2)}      # since the round before: 30.85
    clock.now += 1.0
    assert metrics.snapshot()["fps"] == {"a": 0.0}


def _cut_off(sock: socket.socket, limit_s: float, drip: bool) -> bool:
    """Whether the server closes ``sock`` within ``limit_s`` (a hang detector), the client sending a byte every
    half second when ``drip``."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if drip:
                sock.sendall(b"X")
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:             # reset or broken pipe: closed by the server too
            return True
    return False


def test_a_slow_client_is_cut_off_at_the_deadline_and_the_next_scrape_is_served(monkeypatch):
    """A client that sends a header byte now and then kept its thread for good: the read timeout never fired."""
    monkeypatch.setattr("agent.health.HTTP_DEADLINE_S", 1.0)
    metrics = Metrics()
    server = PrometheusServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(b"GET /metrics HTTP/1.0\r\n")
            assert _cut_off(slow, 30, drip=True), "a slow-drip client held its connection for 30 s"
        families = _scrape(server.port)
    finally:
        server.stop()
    refused = {s.labels["reason"]: s.value for s in families["agent_metrics_http_refused"].samples
               if s.name.endswith("_total")}
    assert refused == {"deadline": 1.0}


def test_clients_beyond_the_connection_limit_are_closed_at_once_and_slots_come_back(monkeypatch):
    """Every connection got a thread of its own, without a bound: a flood of idle clients, a flood of threads."""
    monkeypatch.setattr("agent.health.HTTP_MAX_CONNECTIONS", 2)
    metrics = Metrics()
    server = PrometheusServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        with socket.create_connection(("127.0.0.1", server.port)) as third:
            # closed at once, not after the handler's 10 s read timeout
            assert _cut_off(third, 5, drip=False), "a third client was served beyond the limit of two"
        assert metrics.counter("metrics_http_refused_total", reason="busy") == 1
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 30            # a hang detector: their threads end as soon as they see EOF
        while time.monotonic() < deadline:
            try:
                assert "agent_model_info" in _scrape(server.port)
                break
            except OSError:                         # a slot not back yet: refused
                time.sleep(0.1)
        else:
            raise AssertionError("no scrape served after the idle clients left")
    finally:
        server.stop()
