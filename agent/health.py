"""Counters, gauges and latency windows; the stats payload and a Prometheus endpoint.

One ``Metrics`` object is shared by all threads; every update takes a short lock. A value that is not a
finite number (NaN, an infinity, a non-number, a sum that would overflow) is refused: counted in
``metrics_refused_total{metric}`` and logged the first time per metric, never stored, so neither
/metrics nor the stats payload ever carries NaN or Inf. A stats payload is built from one copy of the tables,
taken under the lock at once, so its numbers agree with each other (never more low-confidence frames than
classified ones).

The /metrics server gives a client at most ``HTTP_DEADLINE_S`` for its whole request (a client that sends a
byte now and then is cut off too) and serves at most ``HTTP_MAX_CONNECTIONS`` at once; one more is closed at
once. Both are counted in ``metrics_http_refused_total{reason}``: a flood of clients holds a bounded number of
threads, and each slot frees within the deadline.
"""

from __future__ import annotations

import logging
import math
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]
Table = dict[tuple[str, Labels], float]
STAGES = ("queue", "preprocess", "inference", "decide", "publish", "capture_to_ack")
MIN_RATE_SPAN_S = 1.0       # fps over a shorter span (a final stats message just after a periodic one) is noise
HTTP_DEADLINE_S = 10.0      # a /metrics client's whole request, from its connect
HTTP_MAX_CONNECTIONS = 16   # /metrics clients served at once (a Prometheus scrape is one, and takes milliseconds)


class Metrics:
    def __init__(self, window: int = 2048) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[tuple[str, Labels], float] = {}
        self._latency: dict[str, deque[float]] = {}
        self._window = window
        # (when, frames captured per camera) of the last two fps() calls: the rate is taken since the newer one
        # at least MIN_RATE_SPAN_S back
        self._rate_bases: deque[tuple[float, dict[str, float]]] = deque([(time.monotonic(), {})], maxlen=2)
        self.info: dict[str, str] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        number = _finite(value)
        with self._lock:
            total = self._counters.get(key, 0.0) + number if number is not None else None
            if total is not None and math.isfinite(total):
                self._counters[key] = total
                return
        self._refuse(name, value)

    def set(self, name: str, value: float, **labels: str) -> None:
        number = _finite(value)
        if number is None:
            self._refuse(name, value)
            return
        with self._lock:
            self._gauges[(name, tuple(sorted(labels.items())))] = number

    def observe(self, stage: str, seconds: float) -> None:
        number = _finite(seconds)
        if number is None:
            self._refuse(f"latency:{stage}", seconds)
            return
        with self._lock:
            self._latency.setdefault(stage, deque(maxlen=self._window)).append(number)

    def _refuse(self, metric: str, value: object) -> None:
        """Count a value that is not a finite number; log it the first time for this metric."""
        key = ("metrics_refused_total", (("metric", metric),))
        with self._lock:
            first = key not in self._counters
            self._counters[key] = self._counters.get(key, 0.0) + 1.0
        if first:
            log.error("metric %s: refused %s, not a finite number (counted in metrics_refused_total; logged once)",
                      metric, str(value)[:80])

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def gauge(self, name: str, **labels: str) -> float | None:
        """A gauge's value; None when it was never set."""
        with self._lock:
            return self._gauges.get((name, tuple(sorted(labels.items()))))

    def counters_by(self, name: str, label: str) -> dict[str, float]:
        with self._lock:
            return _by(self._counters, name, label)

    def gauges_by(self, name: str, label: str) -> dict[str, float]:
        with self._lock:
            return _by(self._gauges, name, label)

    def percentiles(self, stage: str) -> dict[str, float] | None:
        with self._lock:
            values = list(self._latency.get(stage, ()))
        if not values:
            return None
        p50, p95, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 95, 99])
        return {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3), "p99_ms": round(float(p99), 3),
                "n": len(values)}

    def fps(self) -> dict[str, float]:
        """Frames/s per camera since the previous call (since the one before it when that was less than
        MIN_RATE_SPAN_S ago: a few frames in a few milliseconds are not thousands of frames per second)."""
        return self._fps(self.counters_by("frames_captured_total", "camera"))

    def _fps(self, counts: dict[str, float]) -> dict[str, float]:
        now = time.monotonic()
        with self._lock:
            bases = list(self._rate_bases)
            self._rate_bases.append((now, counts))
        then, before = next((b for b in reversed(bases) if now - b[0] >= MIN_RATE_SPAN_S), bases[0])
        span = max(now - then, 1e-6)
        return {cam: round(max(0.0, n - before.get(cam, 0.0)) / span, 2) for cam, n in counts.items()}

    def snapshot(self) -> dict[str, Any]:
        """The body of a stats message (schema contract/schemas/mqtt/stats.v1.json), from one copy of the tables:
        counters read one by one while frames are counted disagreed (more low-confidence frames than classified
        ones, a low_confidence_rate above 1)."""
        with self._lock:
            counters, gauges = dict(self._counters), dict(self._gauges)
        per_camera = lambda name: _by(counters, name, "camera")             # noqa: E731
        total = lambda name: int(sum(per_camera(name).values()))            # noqa: E731
        classified = sum(per_camera("frames_classified_total").values())
        low = sum(per_camera("frames_low_confidence_total").values())
        captured = per_camera("frames_captured_total")
        return {
            "fps": self._fps(captured),
            "frames_captured": captured,
            "frames_dropped": per_camera("frames_dropped_total"),
            "camera_reconnects": per_camera("camera_reconnects_total"),
            "latency": {s: p for s in STAGES if (p := self.percentiles(s)) is not None},
            "queue_depths": {k: int(v) for k, v in _by(gauges, "queue_depth", "queue").items()},
            "outbox": {"depth": int(gauges.get(("outbox_depth", ()), 0.0)),
                       "bytes": int(gauges.get(("outbox_bytes", ()), 0.0)),
                       "dropped": {k: int(v) for k, v in _by(gauges, "outbox_dropped", "reason").items()}},
            "low_confidence_rate": round(low / classified, 4) if classified else 0.0,
            # Cumulative since start: a watcher (the rollout canary) takes differences for its own window.
            "frames_classified": int(classified),
            "frames_low_confidence": int(low),
            "frames_empty": total("frames_empty_total"),
            "inference_errors": int(counters.get(("inference_errors_total", ()), 0.0)),
            "frames_uploaded": total("frames_uploaded_total"),
            "empty_scenes_sent": total("empty_scenes_sent_total"),
            "empty_scenes_given_up": total("empty_scenes_given_up_total"),
            "model_version": self.info.get("model_version", ""),
        }

    def collect(self) -> Iterator[Any]:
        """Metric families for ``prometheus_client`` (a custom collector: our tables are the source of truth)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        with self._lock:
            counters = dict(self._counters)
            gauges = dict(self._gauges)
        for family, table in ((CounterMetricFamily, counters), (GaugeMetricFamily, gauges)):
            for name in sorted({k[0] for k in table}):
                rows = sorted((labels, value) for (n, labels), value in table.items() if n == name)
                keys = sorted({k for labels, _ in rows for k, _ in labels})
                metric = family(f"agent_{name}", f"agent {name.replace('_', ' ')}", labels=keys)
                for labels, value in rows:
                    given = dict(labels)
                    metric.add_metric([given.get(k, "") for k in keys], value)
                yield metric
        latency = Metric("agent_latency_seconds", "per-stage latency over the recent window", "summary")
        for stage in STAGES:
            p = self.percentiles(stage)
            if p:
                for q, key in (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms")):
                    latency.add_sample("agent_latency_seconds", {"stage": stage, "quantile": q}, p[key] / 1000.0)
        yield latency
        info = GaugeMetricFamily("agent_model_info", "the model this station runs",
                                 labels=["model_name", "model_version"])
        info.add_metric([self.info.get("model_name", ""), self.info.get("model_version", "")], 1)
        yield info

    def registry(self) -> Any:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return registry


def _by(table: Table, name: str, label: str) -> dict[str, float]:
    """The rows of one metric in ``table``, keyed by the value of ``label``."""
    return {dict(k[1]).get(label, ""): v for k, v in table.items() if k[0] == name}


def _finite(value: object) -> float | None:
    """``value`` as a finite float (a bool is 0 or 1), or None: NaN, an infinity, a string, an int beyond
    float's range, anything else."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)   # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


class PrometheusServer:
    """``/metrics`` (and ``/``) rendered by ``prometheus_client`` over one ``Metrics``, in a daemon thread;
    any other path is 404, so a health check aimed at the wrong URL fails."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app

        exposition = make_wsgi_app(metrics.registry())

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            if environ.get("PATH_INFO") not in ("/metrics", "/"):
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"not found: the metrics are at /metrics\n"]
            return exposition(environ, start_response)

        class Server(ThreadingMixIn, WSGIServer):
            """At most HTTP_MAX_CONNECTIONS clients at once, each cut off HTTP_DEADLINE_S after it connected (the
            read timeout alone let a client that sends a byte every few seconds keep its thread for good)."""
            daemon_threads = True

            def server_activate(self) -> None:
                self.slots = threading.BoundedSemaphore(HTTP_MAX_CONNECTIONS)
                self.deadlines: dict[socket.socket, float] = {}
                self.deadlines_lock = threading.Lock()
                super().server_activate()

            def process_request(self, request: Any, client_address: Any) -> None:
                if not self.slots.acquire(blocking=False):
                    refused("busy", client_address)
                    self.shutdown_request(request)
                    return
                with self.deadlines_lock:
                    self.deadlines[request] = time.monotonic() + HTTP_DEADLINE_S
                try:
                    super().process_request(request, client_address)
                except BaseException:       # no thread started (none left): the slot is not taken
                    self.request_done(request)
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    self.request_done(request)

            def request_done(self, request: Any) -> None:
                with self.deadlines_lock:
                    self.deadlines.pop(request, None)
                self.slots.release()

            def service_actions(self) -> None:
                """Called by the serve loop about every half second: cut off the clients past their deadline
                (their thread's read or write then ends)."""
                now = time.monotonic()
                with self.deadlines_lock:
                    late = [r for r, deadline in self.deadlines.items() if deadline <= now]
                    for request in late:
                        self.deadlines[request] = math.inf       # cut once; its thread removes it
                for request in late:
                    refused("deadline", None)
                    try:
                        request.shutdown(socket.SHUT_RDWR)
                    except OSError:     # already closed by its thread
                        pass

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that connects and sends nothing (its read times out), or hangs up mid-request: not
                # the agent's problem, and no traceback on stderr for each one.
                log.debug("metrics: client %s: %s", client_address, sys.exc_info()[1])

        class Quiet(WSGIRequestHandler):
            timeout = 10        # a client that opens a connection and sends nothing does not keep a thread for good

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("metrics: " + fmt, *args)

        def refused(reason: str, client_address: Any) -> None:
            metrics.inc("metrics_http_refused_total", reason=reason)
            log.debug("metrics: client %s refused: %s", client_address, reason)

        self._server = make_server(host, port, app, Server, handler_class=Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, name="prometheus", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("prometheus metrics on port %d", self.port)

    def stop(self) -> None:
        """Stop serving and close the socket; safe when ``start`` never ran (a start that failed after the port
        was bound: ``shutdown`` would wait for a serve loop that never began) and when called twice."""
        if self._thread.ident is not None:      # started: its loop ends at once, also one not yet running
            self._server.shutdown()
        self._server.server_close()
