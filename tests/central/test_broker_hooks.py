"""The central services' MQTT client code (contract/broker.py) against a real mosquitto: an exception in a paho
callback (``on_connect``, ``on_message``) is logged with its traceback and counted, and paho's network thread goes
on; ``connect`` reports an ``on_connect`` hook that fails on the first connection as that, not as "no CONNACK".

Given paho's default (``suppress_exceptions = False``), such an exception ends the network thread: the client still
reads as connected, but receives nothing, acknowledges nothing and never reconnects, and ``connect`` waited for the
CONNACK it had already received until its timeout.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import paho.mqtt.client as paho
import pytest
from agent_support import Broker

from contract.broker import BrokerError, BrokerSettings, connect


def wait_until(probe: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def hook_tracebacks(caplog, hook: str, error: type[Exception]) -> list[Any]:
    """The log records of ``hook`` raising ``error``, each with the exception's traceback attached."""
    return [r for r in caplog.records if r.name == "contract.broker" and hook in r.getMessage()
            and r.exc_info and isinstance(r.exc_info[1], error) and r.exc_info[2] is not None]


def publisher(broker: Broker) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"hooks-pub-{time.time_ns()}",
                         protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def test_connect_names_an_on_connect_hook_that_fails_on_the_first_connection(broker, caplog) -> None:
    """Given a hook that cannot build its subscriptions, connect raises BrokerError saying so, at once."""
    def subscribe(_client: Any) -> None:
        raise ValueError("a subscription list that cannot be built")

    settings = BrokerSettings(host=broker.host, port=broker.port, connect_timeout_s=20)
    with pytest.raises(BrokerError) as raised:
        connect(settings, "hooks-test", on_connect=subscribe)
    text = str(raised.value)
    assert "no CONNACK" not in text
    assert "on_connect" in text and "ValueError: a subscription list that cannot be built" in text, text
    assert hook_tracebacks(caplog, "on_connect", ValueError)


def test_an_on_connect_hook_failing_on_a_reconnect_keeps_the_connection(broker, caplog) -> None:
    """Given a hook that works on the first connection and raises on the reconnect after a broker restart, the
    client stays connected with its network thread running (a QoS 1 publish gets its PUBACK), and the failure is
    logged with its traceback and counted."""
    calls: list[int] = []

    def subscribe(client: Any) -> None:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("subscriptions refused on the reconnect")
        client.subscribe("hooks/test", qos=1)

    client = connect(BrokerSettings(host=broker.host, port=broker.port), "hooks-test", on_connect=subscribe)
    try:
        client.reconnect_delay_set(0.2, 1)
        broker.stop()
        broker.start()
        wait_until(lambda: len(calls) >= 2, "the reconnect's on_connect")
        wait_until(client.is_connected, "the client to read as connected")
        info = client.publish("hooks/test/out", b"after the reconnect", qos=1)
        info.wait_for_publish(timeout=60)
        assert info.is_published(), "no PUBACK: paho's network thread ended in on_connect"
        assert client.hook_errors["on_connect"] == 1
        assert hook_tracebacks(caplog, "on_connect", RuntimeError)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_message_hook_that_raises_does_not_stop_the_next_message(broker, caplog) -> None:
    """Given a client built by BrokerSettings.new_client (ingest, dashboard feed) whose on_message raises on one
    message, the next message is still delivered, and the failure is logged with its traceback and counted."""
    got: list[bytes] = []
    subscribed = threading.Event()

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        if message.payload == b"poison":
            raise KeyError("a field the service did not expect")
        got.append(bytes(message.payload))

    client = BrokerSettings(host=broker.host, port=broker.port).new_client("hooks-test")
    client.on_connect = lambda c, *_: c.subscribe("hooks/test", qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    sender = publisher(broker)
    try:
        assert subscribed.wait(60), "no SUBACK"
        for payload in (b"poison", b"good"):
            sender.publish("hooks/test", payload, qos=1).wait_for_publish(timeout=60)
        wait_until(lambda: got == [b"good"], "the message after the one its hook raised on")
        assert client.hook_errors["on_message"] == 1
        assert hook_tracebacks(caplog, "on_message", KeyError)
    finally:
        sender.disconnect()
        sender.loop_stop()
        client.disconnect()
        client.loop_stop()
