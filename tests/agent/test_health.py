"""The station's /metrics: prometheus_client's server over the agent's own tables, read back by its parser."""

from __future__ import annotations

import logging
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
