"""The shipped central mosquitto config and ACL against a real broker.

MQTT v5 lets the broker say no: a denied QoS 1 publish gets PUBACK reason code
0x87 "Not authorized" (mosquitto 2.x). mosquitto's acl_file checks read access
when it delivers a message, not at SUBSCRIBE (the SUBACK grants QoS 1 either
way), so for reading the tests assert that nothing is delivered. Every denial
is also shown from the receiving side: nothing denied reaches a subscriber.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading

import pytest
from deploy_support import TIMEOUT, USERS, connected, make_probe

pytestmark = pytest.mark.mqtt
NOT_AUTHORIZED = 0x87


# ---------------------------------------------------------------- ACL

def test_a_station_publishes_on_its_own_topics_and_central_receives_them(connect):
    # given the central ingest subscribed to everything and station receiving-01 at site ber1
    central = connected(connect("central-ingest"))
    assert central.subscribe("inventory/#") == 1
    station = connected(connect("ber1/receiving-01"))
    # when the station publishes each of its outbound kinds
    kinds = ["status", "result", "decision", "alert", "frames", "stats", "receipt"]
    codes = [station.publish(f"inventory/ber1/receiving-01/{k}") for k in kinds]
    # then every publish is accepted (0x00 Success or 0x10 No matching subscribers) and delivered
    assert all(c in (0x00, 0x10) for c in codes), codes
    assert [m.topic.rsplit("/", 1)[-1] for m in central.wait_messages(len(kinds))] == kinds


@pytest.mark.parametrize("topic", [
    "inventory/ber1/qc-01/result",          # another station at the same site
    "inventory/muc2/receiving-01/result",   # a station of the same name at another site
    "inventory/ber1/receiving-01/cmd/model",  # commands, even its own
    "inventory/ber1/qc-01/cmd/model",       # commands to another station
    "inventory/ber1/receiving-01/other",    # a kind the contract does not have
    "inventory/ber1/result",                # outside the station's root
])
def test_a_station_cannot_publish_outside_its_own_topics(connect, topic):
    central = connected(connect("central-ingest"))
    central.subscribe("inventory/#")
    station = connected(connect("ber1/receiving-01"))
    # the broker refuses the publish with 0x87 ...
    assert station.publish(topic) == NOT_AUTHORIZED
    # ... and nothing reaches a subscriber: the allowed marker sent after it arrives alone
    station.publish("inventory/ber1/receiving-01/stats", b"marker")
    assert [m.topic for m in central.wait_messages(1)] == ["inventory/ber1/receiving-01/stats"]


def test_central_sends_commands_and_only_the_addressed_station_reads_them(connect):
    # mosquitto's acl_file checks read access when it delivers, not at SUBSCRIBE (the SUBACK grants
    # QoS 1 either way), so the test shows that nothing is delivered to a station it is not meant for
    station = connected(connect("ber1/receiving-01"))
    other = connected(connect("ber1/qc-01"))
    assert station.subscribe("inventory/ber1/receiving-01/cmd/#") == 1
    other.subscribe("inventory/#")                      # tries to eavesdrop on everything
    central = connected(connect("central-ingest"))
    assert central.publish("inventory/ber1/receiving-01/cmd/model", b'{"version": "v2"}') == 0x00
    assert central.publish("inventory/ber1/receiving-01/result") == NOT_AUTHORIZED   # central cannot fake results
    assert central.publish("inventory/ber1/qc-01/cmd/model", b"marker") == 0x00     # its own cmd: readable
    assert [m.payload for m in station.wait_messages(1)] == [b'{"version": "v2"}']
    assert [(m.topic, m.payload) for m in other.wait_messages(1)] == [("inventory/ber1/qc-01/cmd/model", b"marker")]


def test_the_dashboard_reads_results_and_receipts_but_cannot_publish_or_read_frames(connect):
    dash = connected(connect("dashboard"))
    dash.subscribe("inventory/#")
    assert dash.publish("inventory/ber1/receiving-01/cmd/model") == NOT_AUTHORIZED
    assert dash.publish("inventory/ber1/receiving-01/result") == NOT_AUTHORIZED
    assert dash.publish("inventory/ber1/receiving-01/receipt") == NOT_AUTHORIZED
    station = connected(connect("ber1/receiving-01"))
    station.publish("inventory/ber1/receiving-01/frames", b"jpeg")
    station.publish("inventory/ber1/receiving-01/result", b"result")
    station.publish("inventory/ber1/receiving-01/receipt", b"receipt")
    assert [m.payload for m in dash.wait_messages(2)] == [b"result", b"receipt"]


def test_the_dashboard_websocket_listener_is_tls_and_delivers_results(connect, central_broker):
    dash = connected(connect("dashboard", port=central_broker.ws_port, transport="websockets"))
    assert dash.subscribe("inventory/+/+/result") == 1
    station = connected(connect("ber1/receiving-01"))
    station.publish("inventory/ber1/receiving-01/result", b'{"label": "Bag"}')
    assert [m.payload for m in dash.wait_messages(1)] == [b'{"label": "Bag"}']


# ---------------------------------------------------------------- TLS only, passwords

def test_plain_mqtt_gets_no_connack_on_the_tls_listener(connect):
    plain = connect("ber1/receiving-01", ca=None)
    # the broker expects a TLS ClientHello and drops the connection: no CONNACK, ever
    assert plain.closed.wait(TIMEOUT)
    assert plain.connack is None


def test_a_raw_tcp_client_reads_no_mqtt_bytes_from_the_tls_listener(central_broker):
    connect_packet = bytes.fromhex("101000044d5154540502003c000003616263")  # CONNECT v5, client id "abc"
    with socket.create_connection(("127.0.0.1", central_broker.tls_port), timeout=TIMEOUT) as sock:
        sock.sendall(connect_packet)
        try:
            reply = sock.recv(16)
        except ConnectionResetError:
            reply = b""
    assert not reply.startswith(b"\x20"), f"got a CONNACK in clear: {reply!r}"


def test_the_shipped_config_has_no_listener_without_tls():
    from deploy_support import SHIPPED_CONF

    blocks = SHIPPED_CONF.read_text().split("\nlistener ")[1:]
    assert blocks, "no listener"
    for block in blocks:
        assert "certfile " in block and "keyfile " in block, f"{SHIPPED_CONF}: listener {block.split()[0]} without TLS"


def test_tls_with_a_ca_that_did_not_sign_the_server_fails(connect, tmp_path):
    from deploy_support import make_pki

    stranger = make_pki(tmp_path / "other-ca")
    probe = connect("ber1/receiving-01", ca=str(stranger.ca_cert))
    assert probe.closed.wait(TIMEOUT) and probe.connack is None


@pytest.mark.parametrize("user,password", [("ber1/receiving-01", "wrong"), (None, None)])
def test_wrong_password_and_anonymous_are_refused(connect, user, password):
    probe = connect(user, password=password)
    assert probe.connected.wait(TIMEOUT)
    assert probe.connack.is_failure and probe.connack.value in (0x86, 0x87)


def test_what_the_patterns_let_a_one_level_user_write_reaches_no_fleet_subscription(connect):
    """mosquitto applies `pattern` lines to every user: `dashboard` may publish on inventory/dashboard/result (the
    docs say so). Three levels: no subscription to a leaf of every station (inventory/+/+/<leaf>) gets it."""
    central = connected(connect("central-ingest"))
    for leaf in ("status", "result", "frames", "receipt"):
        assert central.subscribe(f"inventory/+/+/{leaf}") == 1
    dash = connected(connect("dashboard"))
    assert dash.publish("inventory/dashboard/result", b"fake") in (0x00, 0x10)
    assert dash.publish("inventory/ber1/receiving-01/result", b"fake") == NOT_AUTHORIZED
    station = connected(connect("ber1/receiving-01"))
    station.publish("inventory/ber1/receiving-01/stats", b"marker")     # not subscribed: only the result below
    station.publish("inventory/ber1/receiving-01/result", b"real")
    assert [(m.topic, m.payload) for m in central.wait_messages(1)] == [("inventory/ber1/receiving-01/result", b"real")]


# ---------------------------------------------------------------- what one away session may hold

def conf_value(key: str) -> int:
    from deploy_support import SHIPPED_CONF

    found = re.findall(rf"(?m)^{key} (\d+)$", SHIPPED_CONF.read_text())
    assert len(found) == 1, f"{SHIPPED_CONF}: {key} set {len(found)} times"
    return int(found[0])


def test_one_away_session_holds_at_most_a_gib_of_the_broker():
    """max_queued_messages bounds a session's queue by count only: 10000 frames of up to message_size_limit
    (4 MiB) are 40 GiB of memory and persistence file for one ingest session that is away (reproduced: each
    queued 3.9 MiB frame adds its size to mosquitto's RSS). max_queued_bytes bounds it by size."""
    by_count = conf_value("max_queued_messages") * conf_value("message_size_limit")
    assert by_count > 1 << 30                                    # why the byte bound is needed
    assert conf_value("max_queued_bytes") <= 1 << 30


def test_the_broker_drops_what_arrives_beyond_the_byte_bound_for_an_away_session(mosquitto_bin, pki, tmp_path):
    """The shipped max_queued_bytes line, with its value scaled down to 2.5 frames (the directive is what is
    checked, not mosquitto's arithmetic): ingest, back from an outage, gets the oldest frames, not all six."""
    import paho.mqtt.client as mqtt
    from deploy_support import CentralBroker, wait_listening
    from paho.mqtt.client import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    frame = 1 << 20
    workdir = tmp_path / "central"
    workdir.mkdir()
    broker = CentralBroker(workdir, pki)
    conf = broker.write_config()
    shipped = f"max_queued_bytes {conf_value('max_queued_bytes')}\n"
    text = conf.read_text()
    assert shipped in text
    conf.write_text(text.replace(shipped, f"max_queued_bytes {frame * 5 // 2}\n"))
    broker.proc = subprocess.Popen([mosquitto_bin, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
    received: list[bytes] = []
    got = threading.Condition()

    def ingest_session() -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ingest-central-1", protocol=mqtt.MQTTv5)
        client.tls_set(ca_certs=str(pki.ca_cert))
        client.username_pw_set("central-ingest", USERS["central-ingest"])
        connected_event = threading.Event()
        client.on_connect = lambda c, u, f, reason, p: connected_event.set()

        def on_message(c, u, msg):
            with got:
                received.append(msg.payload[:1])
                got.notify_all()

        client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        client.connect("127.0.0.1", broker.tls_port, clean_start=False, properties=props)
        client.loop_start()
        assert connected_event.wait(TIMEOUT)
        return client

    try:
        wait_listening(broker.proc, broker.tls_port)
        # given ingest's persistent session subscribed to frames, then away
        ingest = ingest_session()
        _, mid = ingest.subscribe("inventory/+/+/frames", qos=1)
        ingest.disconnect()
        ingest.loop_stop()
        # when a station sends six 1 MiB frames (each acknowledged: the station's outbox lets them go)
        station = connected(make_probe(broker.tls_port, "ber1/receiving-01", ca=str(pki.ca_cert)))
        codes = [station.publish("inventory/ber1/receiving-01/frames", bytes([i]) * frame) for i in range(6)]
        assert codes == [0] * 6
        # then ingest, back, gets the oldest frames the bound held and not the rest
        ingest = ingest_session()
        station.publish("inventory/ber1/receiving-01/frames", b"\xff")            # marker, sent after it is back
        with got:
            assert got.wait_for(lambda: b"\xff" in received, TIMEOUT), received
        frames = [r[0] for r in received if r != b"\xff"]
        assert frames == list(range(len(frames))) and 1 <= len(frames) < 6, frames
        ingest.disconnect()
        ingest.loop_stop()
        station.close()
    finally:
        broker.stop()
