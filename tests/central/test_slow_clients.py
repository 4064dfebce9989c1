"""Slow clients against the central HTTP stack (``central.http.Served``, as every central service is served), on
real localhost ports with the real review app.

A client has ``body_timeout_s`` from its request's head to send the whole body: one that sends nothing, or drips
its body a byte at a time (each byte well within any per-read timer), is answered 408 and closed, and counted;
before, it held its connection and its request for ever. A body sent slowly but steadily, an answer that takes
long and an event stream are never cut. The deadlines are set small and each check has a wide margin (a drip is
given 60 s to be cut by a 1 s deadline; an upload that takes ~2 s gets 30 s), so a busy machine does not decide.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest
from loop_support import LABELS, real_frames

from central.http import BODY_TIMEOUT_S, Served
from central.review.api import MAX_BODY, create_app
from central.review.store import FrameStore
from contract.messages import loads_finite

TOKEN = "slow-clients-token"


@pytest.fixture
def review(tmp_path):
    """The review app over a store with one real frame; ``serve(**timeouts)`` starts it as the services do."""
    store = FrameStore(tmp_path / "store", labels=LABELS)
    [record] = real_frames(1)
    store.add(record.body, record.blob)
    servers: list[Served] = []

    def serve(**timeouts: float) -> Served:
        server = Served(create_app(store, TOKEN), "127.0.0.1", 0, name="slow-test", **timeouts).start()
        servers.append(server)
        return server

    yield serve, store, record
    for server in servers:
        server.stop()
    store.close()


def review_head(frame_id: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /api/frames/{frame_id}/review HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode()


def answer_while_dripping(sock: socket.socket, drip: bytes, every_s: float, within_s: float) -> bytes | None:
    """Send ``drip`` one byte every ``every_s`` seconds until the server has answered whole or closed; what it sent
    (b"" for a bare close), or None when it was still waiting after ``within_s``."""
    deadline = time.monotonic() + within_s
    sock.settimeout(every_s)
    got, sent = b"", 0
    while time.monotonic() < deadline and not answered_whole(got):
        try:
            if sent < len(drip):
                sock.sendall(drip[sent:sent + 1])
                sent += 1
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return got
        if not chunk:
            return got
        got += chunk
    return got if answered_whole(got) else None


def answered_whole(answer: bytes) -> bool:
    head, found, body = answer.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    return bool(found and lengths) and len(body) >= int(lengths[0])


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("how", ["drips", "sends nothing", "drips chunks"])
def test_a_client_that_drips_its_body_gets_a_408_and_its_connection_closed(review, how, caplog):
    """Given a server whose clients have 1 s from a request's head to its whole body, when a client sends its head
    at once and then its body a byte every 0.2 s (or nothing, or a chunked body a byte at a time), then within 60 s
    it is answered 408 with a JSON error naming the body and the deadline, its connection is closed, the server
    counts it (an info line, not an error with a traceback: it is what a client did), nothing is stored, and the
    next request is served (before: it stayed open for ever)."""
    caplog.set_level("INFO")
    serve, store, record = review
    server = serve(body_timeout_s=1.0)
    body = json.dumps({"action": "skip", "reviewer": "slow"}).encode()
    if how == "drips chunks":
        head, drip = review_head(record.id, None), f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    else:
        head, drip = review_head(record.id, len(body)), (body if how == "drips" else b"")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        answer = answer_while_dripping(sock, drip, every_s=0.2, within_s=60)
        assert answer is not None, "no answer after 60 s"
        sock.settimeout(30)
        try:
            assert sock.recv(1) == b"", "the connection was left open"
        except ConnectionResetError:
            pass
    status, payload = status_and_body(answer)
    error = loads_finite(payload)["error"]
    assert status == 408 and "body: not received in full within 1 s" in error, (status, error)
    assert server.timed_out["body"] == 1
    assert store.get(record.id)["status"] == "pending"
    assert any("sent no whole request body" in r.getMessage() for r in caplog.records)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= 40]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:   # and the next is served
        sock.sendall(review_head(record.id, len(body)) + body)
        answer = answer_while_dripping(sock, b"", every_s=0.5, within_s=60)
    assert answer is not None and status_and_body(answer)[0] == 200
    assert store.get(record.id)["status"] == "skipped"


def test_the_largest_body_sent_slowly_but_steadily_is_served(review):
    """Given a 30 s body deadline, when a client sends a review body of the largest size taken (64 KiB) in 16
    pieces 0.1 s apart, then it is served. And the default deadline gives the largest body at least 1 kB/s."""
    assert MAX_BODY / BODY_TIMEOUT_S <= 1100
    serve, store, record = review
    server = serve(body_timeout_s=30.0)
    body = json.dumps({"action": "skip", "reviewer": "steady"}).encode()
    body += b" " * (MAX_BODY - len(body))                  # JSON allows the spaces: exactly the limit
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(review_head(record.id, len(body)))
        for i in range(0, len(body), 4096):
            time.sleep(0.1)
            sock.sendall(body[i:i + 4096])
        answer = answer_while_dripping(sock, b"", every_s=0.5, within_s=60)
    assert answer is not None and status_and_body(answer)[0] == 200, answer
    assert store.get(record.id)["status"] == "skipped" and server.timed_out["body"] == 0


def test_an_event_stream_and_a_slow_answer_are_never_cut_by_the_body_deadline(tmp_path):
    """Given a 0.5 s body (and head) deadline, an event stream of 8 events 0.5 s apart (8 deadlines) and an answer
    that comes 3 s after a body sent at once are both received whole: the deadline is the client's, for its body."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/events":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for n in range(8):
                await asyncio.sleep(0.5)
                await send({"type": "http.response.body", "body": f"data: {n}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await asyncio.sleep(3)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    server = Served(app, "127.0.0.1", 0, name="slow-test", head_timeout_s=0.5, body_timeout_s=0.5).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            stream = b""
            while b"data: 7\n\n" not in stream and (chunk := sock.recv(65536)):
                stream += chunk
        assert all(f"data: {n}\n\n".encode() in stream for n in range(8)), stream
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            answer = b""
            while not answer.endswith(b"hello") and (chunk := sock.recv(65536)):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello"), answer
        assert server.timed_out == {"head": 0, "body": 0, "write": 0}
    finally:
        server.stop()


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf")])
def test_a_deadline_that_is_no_positive_finite_number_is_refused_naming_it(seconds, tmp_path: Path):
    for field in ("head_timeout_s", "body_timeout_s", "write_stall_s"):
        with pytest.raises(ValueError, match=f"{field}: .* is not a positive finite number of seconds"):
            Served(lambda scope, receive, send: None, "127.0.0.1", 0, name="x", **{field: seconds})


def streaming_app(total: int):
    """An answer of ``total`` bytes, 64 KiB at a time, as a bundle download or a long event stream goes out."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(total).encode())]})
        piece = b"x" * 65536
        for start in range(0, total, len(piece)):
            await send({"type": "http.response.body", "body": piece[:total - start], "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def test_a_client_that_stops_reading_an_answer_is_aborted_and_a_slow_reader_is_not(tmp_path):
    """Given a server whose clients must take some of a full answer buffer within 1 s, when one client asks for
    64 MB and reads nothing (its receive buffer 4 kB), then its connection is aborted and counted within 60 s
    (before: held for ever, with the answer's task and, for a bundle, its open file); while a client that reads
    the same answer slowly (64 kB every 0.05 s) gets every byte."""
    total = 64 * 1024 * 1024
    server = Served(streaming_app(total), "127.0.0.1", 0, name="slow-test", write_stall_s=1.0).start()
    try:
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(("127.0.0.1", server.port))
            stalled.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            deadline = time.monotonic() + 60
            while server.timed_out["write"] == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert server.timed_out["write"] == 1, "the stalled client was still connected after 60 s"
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as reader:
            reader.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            got = 0
            head = b""
            while b"\r\n\r\n" not in head:
                head += reader.recv(4096)
            got = len(head.partition(b"\r\n\r\n")[2])
            while got < total and (chunk := reader.recv(65536)):
                got += len(chunk)
                time.sleep(0.05 if got < 2 * 1024 * 1024 else 0)      # slow for the first 2 MB, then at once
        assert head.startswith(b"HTTP/1.1 200 ") and got == total
        assert server.timed_out["write"] == 1
    finally:
        server.stop()
