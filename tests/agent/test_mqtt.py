"""MQTT against real mosquitto processes: outage and backlog, TLS + password, refused connects, 3.1.1 envelope."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import logging
import subprocess
import threading
import time
from pathlib import Path

import pytest
from agent_support import Broker, as_config, station_config, validate_message

from agent.app import Agent
from agent.config import AgentConfig
from agent.demo import Subscriber
from agent.health import Metrics
from agent.mqtt import MqttPublisher
from agent.outbox import Message, Outbox

pytestmark = pytest.mark.mqtt
ROOT = "inventory/test/st-01"


def test_broker_outage_mid_run_delivers_everything_in_order(broker, tiny_bundle, fmnist_video, tmp_path):
    cfg = as_config(station_config(tmp_path, tiny_bundle, str(fmnist_video), broker.port,
                                   cameras=[{"id": "cam-a", "uri": str(fmnist_video), "fps": 20,
                                             "backpressure": "block"}]))
    dashboard = Subscriber(broker.host, broker.port, ROOT, client_id="dash-persistent", clean=False)
    agent = Agent(cfg)
    agent.start()
    try:
        assert dashboard.wait_for(lambda d: len(d.of("result")) >= 5, 20)
        broker.stop()
        time.sleep(1.5)
        assert agent.outbox.depth() > 0                       # produced while the broker was down
        assert not agent.publisher.connected.is_set()
        broker.start()
        assert agent.inference.finished.wait(30)
    finally:
        agent.shutdown(20)
    assert dashboard.wait_for(lambda d: len({m.json()["frame_seq"] for m in d.of("result")}) == 60, 15)
    dashboard.close()

    unique = {}
    for msg in dashboard.messages:
        body = msg.json()
        if not msg.topic.endswith(("/stats", "/status")):
            unique.setdefault(body["id"], body)
    ordered = list(unique.values())
    assert [b["seq"] for b in ordered] == sorted(b["seq"] for b in ordered), "sequence order broken"
    results = [b for b in ordered if b["schema"] == "result.v1"]
    assert sorted(b["frame_seq"] for b in results) == list(range(1, 61))
    uploaded = agent.metrics.counter("frames_uploaded_total", camera="cam-a")
    assert len([b for b in ordered if b["schema"] == "frame.v1"]) == uploaded > 0
    assert agent.publisher.state.connects >= 2


def test_v311_connection_sends_frames_as_a_json_envelope(broker, tiny_bundle, fmnist_video, tmp_path):
    cfg = as_config(station_config(tmp_path, tiny_bundle, str(fmnist_video), broker.port,
                                   mqtt={"protocol": "v311"}))
    dashboard = Subscriber(broker.host, broker.port, ROOT, v5=False)
    agent = Agent(cfg)
    agent.start()
    agent.wait(exit_at_end=True)
    agent.shutdown(10)
    assert dashboard.wait_for(lambda d: len(d.of("result")) == 60, 5)
    dashboard.close()
    frames = dashboard.of("frames")
    assert frames
    for msg in frames:
        envelope = json.loads(msg.payload)
        validate_message("frame-envelope.v1", envelope)
        validate_message("frame.v1", envelope["meta"])
        assert base64.b64decode(envelope["jpeg_b64"])[:2] == b"\xff\xd8"


# ---------------------------------------------------------------- TLS and auth

def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject_cn, key, issuer_cn, issuer_key, *, ca=False, san=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pem(path: Path, obj) -> Path:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    else:
        data = obj.public_bytes(serialization.Encoding.PEM)
    path.write_bytes(data)
    return path


@pytest.fixture
def pki(tmp_path):
    """A CA, a broker cert for 127.0.0.1, a client cert; and a second, unrelated CA."""
    from cryptography import x509

    d = tmp_path / "pki"
    d.mkdir()
    ca_key, other_key, server_key, client_key = _key(), _key(), _key(), _key()
    ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    other = _cert("other-ca", other_key, "other-ca", other_key, ca=True)
    server = _cert("127.0.0.1", server_key, "test-ca", ca_key,
                   san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    client = _cert("st-01", client_key, "test-ca", ca_key)
    return {"ca": _write_pem(d / "ca.crt", ca), "other_ca": _write_pem(d / "other.crt", other),
            "server_cert": _write_pem(d / "server.crt", server), "server_key": _write_pem(d / "server.key", server_key),
            "client_cert": _write_pem(d / "client.crt", client), "client_key": _write_pem(d / "client.key", client_key)}


@pytest.fixture
def tls_broker(mosquitto_bin, pki, tmp_path):
    workdir = tmp_path / "tls-broker"
    workdir.mkdir()
    passwd = workdir / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "st-01", "right-password"], check=True,
                   capture_output=True)
    conf = (f"allow_anonymous false\npassword_file {passwd}\ncafile {pki['ca']}\ncertfile {pki['server_cert']}\n"
            f"keyfile {pki['server_key']}\nrequire_certificate true\ntls_version tlsv1.2")
    b = Broker(workdir, extra_conf=conf, persistence=False).start()
    yield b
    b.stop()


def _publisher(tmp_path, port, pki, password_file: Path, ca: Path) -> tuple[MqttPublisher, Outbox]:
    cfg = AgentConfig.model_validate({
        "site": "test", "station": "st-01", "model": {"bundle": "unused"},
        "cameras": [{"id": "cam-a", "uri": "unused"}],
        "mqtt": {"host": "127.0.0.1", "port": port, "username": "st-01", "password_file": str(password_file),
                 "tls": {"ca_file": str(ca), "cert_file": str(pki["client_cert"]), "key_file": str(pki["client_key"])},
                 "reconnect": {"initial_s": 0.1, "max_s": 0.3}},
    })
    outbox = Outbox(tmp_path / f"ob-{password_file.name}-{ca.name}.sqlite", max_bytes=10**7, max_age_s=3600)
    status = lambda state: {"schema": "status.v1", "id": "x", "state": state}  # noqa: E731
    return MqttPublisher(cfg, outbox, Metrics(), status), outbox


def test_tls_and_password_auth_publish_and_ack(tls_broker, pki, tmp_path):
    (tmp_path / "pw").write_text("right-password\n")
    publisher, outbox = _publisher(tmp_path, tls_broker.port, pki, tmp_path / "pw", pki["ca"])
    outbox.put_many([Message("result", {"n": i}) for i in range(5)])
    publisher.start()
    assert publisher.wait_connected(10), publisher.state.history
    deadline = time.monotonic() + 10
    while outbox.depth() and time.monotonic() < deadline:
        time.sleep(0.05)
    publisher.stop(2)
    assert outbox.depth() == 0 and publisher.state.refusals == 0


def test_wrong_password_is_refused_logged_and_retried_never_connected(tls_broker, pki, tmp_path, caplog):
    (tmp_path / "pw").write_text("wrong-password\n")
    publisher, outbox = _publisher(tmp_path, tls_broker.port, pki, tmp_path / "pw", pki["ca"])
    outbox.put(Message("result", {"n": 1}))
    with caplog.at_level(logging.ERROR, logger="agent.mqtt"):
        publisher.start()
        assert not publisher.wait_connected(2.0)
        publisher.stop(0.5)
    assert publisher.state.refusals >= 2 and publisher.state.connects == 0
    assert "connected" not in publisher.state.history
    assert "connection refused by 127.0.0.1" in caplog.text
    assert "reason code 134" in caplog.text or "reason code 135" in caplog.text
    assert outbox.depth() == 1


def test_untrusted_broker_certificate_is_a_tls_error_never_connected(tls_broker, pki, tmp_path, caplog):
    (tmp_path / "pw").write_text("right-password\n")
    publisher, _ = _publisher(tmp_path, tls_broker.port, pki, tmp_path / "pw", pki["other_ca"])
    with caplog.at_level(logging.ERROR, logger="agent.mqtt"):
        publisher.start()
        assert not publisher.wait_connected(1.5)
        publisher.stop(0.5)
    assert publisher.state.connects == 0 and len(publisher.state.history) >= 2
    assert "TLS handshake with 127.0.0.1" in caplog.text and "CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_auto_protocol_falls_back_to_311_when_the_broker_refuses_v5(tmp_path):
    """A hand-written 3.1.1-only broker: refuses a v5 CONNECT (protocol level 5), accepts level 4."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    levels = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            connect = conn.recv(1024)
            levels.append(connect[8])
            conn.sendall(bytes([0x20, 0x02, 0x00, 0x01 if connect[8] == 5 else 0x00]))
            if connect[8] == 5:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    cfg = AgentConfig.model_validate({
        "site": "test", "station": "st-01", "model": {"bundle": "unused"}, "cameras": [{"id": "a", "uri": "x"}],
        "mqtt": {"port": server.getsockname()[1], "reconnect": {"initial_s": 0.1, "max_s": 0.2}}})
    outbox = Outbox(tmp_path / "ob.sqlite", max_bytes=10**6, max_age_s=60)
    publisher = MqttPublisher(cfg, outbox, Metrics(), lambda state: {"state": state})
    publisher.start()
    try:
        assert publisher.wait_connected(5), publisher.state.history
    finally:
        publisher.stop(0.2)
        server.close()
    assert levels[:2] == [5, 4] and publisher.state.protocol == "v311"
    assert "Unsupported protocol version" in publisher.state.history[0]


def test_missing_secret_or_tls_file_is_reported_not_a_crash(tiny_bundle, fmnist_video, tmp_path, caplog):
    from agent.app import StartupError

    cfg = as_config(station_config(tmp_path, tiny_bundle, str(fmnist_video), 1,
                                   mqtt={"password_env": "AGENT_TEST_NO_SUCH_VAR"}))
    with pytest.raises(StartupError, match="mqtt.password_env: environment variable AGENT_TEST_NO_SUCH_VAR"):
        Agent(cfg).start()

    cfg = AgentConfig.model_validate({
        "site": "test", "station": "st-01", "model": {"bundle": "unused"}, "cameras": [{"id": "a", "uri": "x"}],
        "mqtt": {"port": 1, "tls": {"ca_file": str(tmp_path / "missing-ca.crt")},
                 "reconnect": {"initial_s": 0.05, "max_s": 0.1}}})
    publisher = MqttPublisher(cfg, Outbox(tmp_path / "ob.sqlite", max_bytes=10**6, max_age_s=60), Metrics(),
                              lambda state: {"state": state})
    with caplog.at_level(logging.ERROR, logger="agent.mqtt"):
        publisher.start()
        time.sleep(0.5)
        assert publisher.is_alive() and not publisher.connected.is_set()
        publisher.stop(0.1)
    assert f"mqtt.tls.ca_file: {tmp_path / 'missing-ca.crt'}: no such file, or it cannot be read" in caplog.text


def test_a_message_the_broker_refuses_is_sent_again_and_delivered_once_it_is_allowed(mosquitto_bin, tmp_path,
                                                                                     monkeypatch):
    """A PUBACK with a failure code (here the broker's ACL, at first without the alert topic) keeps the message in
    the outbox; it is sent again after a pause while the connection lasts, not only after a reconnect days later.
    The ACL then allows it (mosquitto re-reads it on SIGHUP) and it is delivered, the others never held up."""
    import signal

    import agent.mqtt as mqtt

    monkeypatch.setattr(mqtt, "REFUSED_RETRY_S", (0.3, 1.0))
    acl = tmp_path / "acl"
    allowed = "topic readwrite inventory/test/st-01/result\ntopic readwrite inventory/test/st-01/status\n"
    acl.write_text(allowed)
    broker = Broker(tmp_path, extra_conf=f"allow_anonymous true\nacl_file {acl}", persistence=False).start()
    try:
        cfg = AgentConfig.model_validate({
            "site": "test", "station": "st-01", "model": {"bundle": "unused"},
            "cameras": [{"id": "cam-a", "uri": "unused"}],
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "protocol": "v5",
                     "reconnect": {"initial_s": 0.1, "max_s": 0.3}}})
        outbox = Outbox(tmp_path / "ob.sqlite", max_bytes=10**7, max_age_s=3600)
        metrics = Metrics()
        publisher = MqttPublisher(cfg, outbox, metrics, lambda state: {"schema": "status.v1", "id": "x",
                                                                       "state": state})
        outbox.put_many([Message("result", {"n": 1}), Message("alert", {"n": 2}), Message("result", {"n": 3})])
        publisher.start()
        assert publisher.wait_connected(10), publisher.state.history
        deadline = time.monotonic() + 20
        while metrics.counter("mqtt_publish_rejected_total", kind="alert") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics.counter("mqtt_publish_rejected_total", kind="alert") >= 2     # refused, and tried again
        assert [r.kind for r in outbox.pending()] == ["alert"] and publisher.state.connects == 1
        acl.write_text(allowed + "topic readwrite inventory/test/st-01/alert\n")
        broker.proc.send_signal(signal.SIGHUP)
        while outbox.depth() and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        assert outbox.depth() == 0 and publisher.state.connects == 1
        publisher.stop(2)
    finally:
        broker.stop()


# ---------------------------------------------------------------- poison messages, protocol choice, age at send

LIMIT = 100_000      # the broker's message_size_limit in these tests (deploy/central: 4 MiB)


def _station(port: int, **mqtt) -> AgentConfig:
    return AgentConfig.model_validate({
        "site": "test", "station": "st-01", "model": {"bundle": "unused"},
        "cameras": [{"id": "cam-a", "uri": "unused"}],
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect": {"initial_s": 0.1, "max_s": 0.3}, **mqtt}})


def _status(state: str) -> dict:
    return {"schema": "status.v1", "id": "x", "state": state}


def _numbers(sub: Subscriber) -> set[int]:
    """The test's numbers of the results and frames a subscriber got (a 3.1.1 frame: inside its envelope)."""
    bodies = [m.json() for m in sub.of("result") + sub.of("frames")]
    return {b["meta"]["n"] if "envelope" in b else b["n"] for b in bodies}


def _until(predicate, timeout: float) -> bool:
    """Wait for a condition; the timeout only bounds a failing test."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("stored", ["while-running", "before-the-limit"])
@pytest.mark.parametrize("protocol", ["v5", "v311"])
def test_a_message_larger_than_the_broker_takes_is_dropped_once_and_counted_and_the_rest_delivered(
        mosquitto_bin, tmp_path, protocol, stored):
    """Over mosquitto's message_size_limit, v5: PUBACK 0x95, which paho takes for a malformed packet and drops the
    connection; the station reconnected at once and sent the same frame again, for good, nothing behind it
    delivered. 3.1.1: the broker acknowledges the publish it threw away; the frame was deleted as delivered,
    counted nowhere. ``before-the-limit``: a backlog an older agent stored, dropped when its turn comes."""
    broker = Broker(tmp_path, extra_conf=f"allow_anonymous true\nmessage_size_limit {LIMIT}",
                    persistence=False).start()
    sub = Subscriber(broker.host, broker.port, ROOT, v5=protocol == "v5")
    try:
        # given a 90 kB frame (over the limit only as a 3.1.1 base64 envelope) and a 200 kB frame between results
        messages = [Message("result", {"n": 1}), Message("frame", {"n": 2}, b"\xff\xd8" + b"x" * 90_000),
                    Message("frame", {"n": 3}, b"\xff\xd8" + b"x" * 200_000), Message("result", {"n": 4})]
        outbox = Outbox(tmp_path / "ob.sqlite", max_bytes=10**8, max_age_s=3600)
        if stored == "before-the-limit":
            outbox.put_many(messages)
        publisher = MqttPublisher(_station(broker.port, protocol=protocol, max_message_bytes=LIMIT), outbox,
                                  Metrics(), _status)
        if stored == "while-running":
            assert len(outbox.put_many(messages)) == (3 if protocol == "v5" else 2)

        # when the station publishes its outbox
        publisher.start()
        delivered = _until(lambda: outbox.depth() == 0 and 4 in _numbers(sub), 20)
        publisher.stop(2)

        # then the rest is delivered, and each frame too large for the broker is dropped and counted, once
        assert delivered, (outbox.pending(), outbox.dropped(), publisher.state.history)
        assert _numbers(sub) == ({1, 2, 4} if protocol == "v5" else {1, 4})
        assert outbox.dropped() == {"too-large:frame": 1 if protocol == "v5" else 2}
        assert publisher.state.connects == 1 and "too large" not in broker.log().lower()
    finally:
        sub.close()
        broker.stop()


def test_a_message_that_ends_the_connection_costs_a_growing_pause_not_a_reconnect_storm(mosquitto_bin, tmp_path,
                                                                                         monkeypatch):
    """A poison message the broker answers by ending the connection (here a frame over a message_size_limit the
    station was not told of). Each session had connected, so the backoff started again from its first delay: a
    reconnect and the same frame every 0.1 s, for good. Only a session that got a record acknowledged (or lasted
    STABLE_SESSION_S, made long here so that no slow machine reaches it) starts the backoff again."""
    import agent.mqtt as mqtt

    monkeypatch.setattr(mqtt, "STABLE_SESSION_S", 3600.0)
    delays: list[float] = []
    five = threading.Event()
    sleep = MqttPublisher._sleep

    def recorded_sleep(self, seconds: float) -> None:
        delays.append(seconds)
        if len(delays) >= 5:
            five.set()
        sleep(self, 0.05)

    monkeypatch.setattr(MqttPublisher, "_sleep", recorded_sleep)
    broker = Broker(tmp_path, extra_conf=f"allow_anonymous true\nmessage_size_limit {LIMIT}",
                    persistence=False).start()
    try:
        # given a frame over the broker's limit, first in the outbox, and a station that thinks the limit 4 MiB
        outbox = Outbox(tmp_path / "ob.sqlite", max_bytes=10**8, max_age_s=3600)
        cfg = _station(broker.port, protocol="v5", reconnect={"initial_s": 0.1, "max_s": 10.0, "factor": 2.0})
        publisher = MqttPublisher(cfg, outbox, Metrics(), _status)
        outbox.put_many([Message("frame", {"n": 1}, b"\xff\xd8" + b"x" * 200_000), Message("result", {"n": 2})])

        # when it connects again after each session the frame ended
        publisher.start()
        assert five.wait(60), (delays, publisher.state.history)
        publisher.stop(0.5)

        # then every session had connected, and the pause between them grew (each drawn between half the
        # exponential delay and the delay, test_mqtt_review.py)
        assert publisher.state.connects >= 5 and "Dropped too large PUBLISH" in broker.log()
        assert all(b / 2 <= d <= b for d, b in zip(delays[:5], [0.1, 0.2, 0.4, 0.8, 1.6])), delays
        assert [r.body["n"] for r in outbox.pending()] == [1, 2]
    finally:
        broker.stop()


def test_auto_protocol_goes_back_to_v5_after_connections_closed_before_a_connack(mosquitto_bin, tmp_path):
    """A proxy in front of a broker still starting accepts and closes: the station took 3.1.1 for the rest of its
    life, where the broker acknowledges a publish it denies (an ACL) like a delivery, and the outbox deleted it.
    Only a CONNACK "unsupported protocol version" settles 3.1.1; after a drop, 3.1.1 is tried once, then v5."""
    import socket

    acl = tmp_path / "acl"
    acl.write_text("topic readwrite inventory/test/st-01/result\ntopic readwrite inventory/test/st-01/status\n")
    broker = Broker(tmp_path, extra_conf=f"allow_anonymous true\nacl_file {acl}", persistence=False)
    # given a listener on the broker's port that closes every connection before a CONNACK, until it has seen the
    # station try 3.1.1
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", broker.port))
    server.listen(8)
    levels: list[int] = []

    def close_until_311() -> None:
        while 4 not in levels:
            conn, _ = server.accept()
            levels.append(conn.recv(1024)[8])
            if levels[-1] == 4:
                server.close()      # before the 3.1.1 attempt ends: no later attempt reaches this listener
            conn.close()

    closer = threading.Thread(target=close_until_311, daemon=True)
    closer.start()
    outbox = Outbox(tmp_path / "ob.sqlite", max_bytes=10**7, max_age_s=3600)
    metrics = Metrics()
    publisher = MqttPublisher(_station(broker.port), outbox, metrics, _status)
    publisher.start()
    try:
        closer.join(30)
        assert levels[:2] == [5, 4], levels
        # when the real broker (v5) starts behind it
        broker.start()
        assert publisher.wait_connected(20), publisher.state.history

        # then the station speaks v5 to it, and sees the broker refuse a publish its ACL denies
        assert publisher.state.protocol == "v5", publisher.state.history
        outbox.put_many([Message("result", {"n": 1}), Message("alert", {"n": 2}), Message("result", {"n": 3})])
        assert _until(lambda: metrics.counter("mqtt_publish_rejected_total", kind="alert") >= 1
                      and outbox.depth() == 1, 20), (outbox.pending(), publisher.state.history)
        assert [r.kind for r in outbox.pending()] == ["alert"]
    finally:
        publisher.stop(0.5)
        server.close()
        broker.stop()


def test_a_backlog_past_the_age_quota_is_not_sent_when_the_broker_comes_back(broker, tmp_path):
    """The age quota applied only when a message was stored: a station that stopped producing while its broker was
    away sent its stale backlog when the broker came back."""
    # given 5 results stored, then longer than max_age_s with nothing new stored
    wall = [1_796_000_000.0]
    outbox = Outbox(tmp_path / "ob.sqlite", max_bytes=10**7, max_age_s=60, clock=lambda: wall[0])
    outbox.put_many([Message("result", {"n": n}) for n in range(5)])
    wall[0] += 61
    sub = Subscriber(broker.host, broker.port, ROOT)
    publisher = MqttPublisher(_station(broker.port), outbox, Metrics(), _status)
    try:
        # when the station connects, reads its outbox, and then stores a new result
        publisher.start()
        assert publisher.wait_connected(10), publisher.state.history
        assert _until(lambda: outbox.depth() == 0, 10)
        outbox.put(Message("result", {"n": 5}))
        assert _until(lambda: 5 in _numbers(sub) and outbox.depth() == 0, 10), publisher.state.history
    finally:
        publisher.stop(1)
        sub.close()

    # then only the new one was sent: the stale ones were dropped and counted
    assert _numbers(sub) == {5} and outbox.dropped() == {"age:result": 5}


@pytest.mark.parametrize("jpeg_bytes", [0, 1, 2, 3, 90_001])
def test_the_size_checked_against_the_broker_limit_is_the_size_published(jpeg_bytes):
    """The store-time check computes a frame's size without encoding it (base64 arithmetic): exactly what
    ``encode`` publishes, on either protocol, metadata with non-ASCII text included."""
    from agent.mqtt import encode, wire_bytes
    from agent.outbox import Record

    text = json.dumps({"id": "3f1c", "seq": 7, "label": "Überzieher \"x\"", "n": 1}, separators=(",", ":"))
    for kind, blob in (("frame", bytes(range(256)) * (jpeg_bytes // 256) + b"j" * (jpeg_bytes % 256)),
                       ("result", None)):
        record = Record(7, "3f1c", kind, text, blob, 0.0)
        for v5 in (True, False):
            payload, props = encode(record, v5)
            assert wire_bytes(record, v5) == len(payload) + (len(props.pack()) if props is not None else 0)
