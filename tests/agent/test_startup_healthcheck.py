"""``python -m agent.startup healthcheck`` against endpoints that are not the agent's: every one ends in exit 1
with one line on stderr, within ``--timeout`` in all; a bad ``--timeout`` is an argparse error naming it. Real
sockets on free ports; the check runs in its own process where a hang would otherwise hold the test."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.startup import healthcheck as startup_healthcheck
from agent.startup import main

ROOT = Path(__file__).resolve().parents[2]


def serve(reply: bytes | None, drip: bool = False) -> str:
    """A one-socket HTTP impostor on a free port: sends ``reply`` and closes, or (``drip``) announces 1000 bytes
    and sends one every 0.2 s. Its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)

    def run() -> None:
        while True:
            conn, _ = sock.accept()
            conn.recv(4096)
            try:
                if drip:
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n")
                    for _ in range(1000):
                        conn.sendall(b"x")
                        time.sleep(0.2)
                else:
                    conn.sendall(reply)
            except OSError:
                pass
            conn.close()

    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"


def healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.startup", "healthcheck", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("reply, why", [
    (b"SSH-2.0-OpenSSH_9\r\n", "not a complete HTTP answer (BadStatusLine"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\nagent_model_info 1\n", "not a complete HTTP answer "
                                                                                "(IncompleteRead"),
], ids=["bad-status-line", "truncated-body"])
def test_an_endpoint_that_answers_no_complete_http_is_unhealthy_without_a_traceback(reply, why):
    url = serve(reply)
    result = healthcheck("--url", url, "--timeout", "10")
    assert result.returncode == 1
    assert result.stderr.startswith(f"unhealthy: {url}: {why}") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_dripping_endpoint_is_unhealthy_once_the_whole_timeout_is_spent():
    """Each byte comes well within the socket timeout; only an overall deadline ends it (before: 200 s here)."""
    url = serve(None, drip=True)
    started = time.monotonic()
    result = healthcheck("--url", url, "--timeout", "1")
    assert result.returncode == 1 and f"unhealthy: {url}: no complete answer within 1s" in result.stderr
    assert time.monotonic() - started < 60


def test_an_oversized_body_is_unhealthy(capsys, metrics_server):
    url = f"{metrics_server}/metrics"
    assert startup_healthcheck(url, 10.0) == 0
    assert startup_healthcheck(url, 10.0, max_bytes=100) == 1
    assert f"unhealthy: {url}: ValueError: a body of more than 100 bytes" in capsys.readouterr().err


def test_a_url_without_a_scheme_is_unhealthy_with_the_reason():
    result = healthcheck("--url", "127.0.0.1:9108/metrics")
    assert result.returncode == 1 and "unhealthy: 127.0.0.1:9108/metrics: unknown url type" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "soon"])
def test_a_timeout_that_is_not_a_finite_positive_number_is_an_argparse_error(value, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["healthcheck", "--url", "http://127.0.0.1:1/metrics", "--timeout", value])
    assert exited.value.code == 2
    assert "argument --timeout: expected a" in capsys.readouterr().err
