"""The shipped central mosquitto config and ACL against a real broker.

MQTT v5 lets the broker say no: a denied QoS 1 publish gets PUBACK reason code
0x87 "Not authorized" (mosquitto 2.x). mosquitto's acl_file checks read access
when it delivers a message, not at SUBSCRIBE (the SUBACK grants QoS 1 either
way), so for reading the tests assert that nothing is delivered. Every denial
is also shown from the receiving side: nothing denied reaches a subscriber.
"""

from __future__ import annotations

import socket

import pytest
from deploy_support import TIMEOUT, connected

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
