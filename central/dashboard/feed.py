"""The dashboard's one MQTT subscription: every station's topics and the central rollout events.

paho-mqtt 2.x, MQTT v5, QoS 1, over TCP or websockets, with TLS and a user name
and password as the central broker requires (deploy/central). paho's own network
thread reconnects with backoff; every (re)connect subscribes again, and the
broker resends the retained status of each station and the last rollout event
(the state drops what it has already seen, by message id).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable

import paho.mqtt.client as paho

from central.dashboard.state import WarehouseState
from contract.broker import BrokerSettings
from contract.messages import DASHBOARD_KINDS, fleet_subscription, rollout_topic

log = logging.getLogger(__name__)


def dashboard_topics(settings: BrokerSettings) -> list[str]:
    """Every station's dashboard leaves, its shipment receipts and the central rollout events, under the
    settings' topic root."""
    root = settings.topic_root
    return ([fleet_subscription(kind, root) for kind in DASHBOARD_KINDS + ("receipt",)]
            + [rollout_topic(root)])


class StationFeed:
    """Subscribes and hands every message to ``state.ingest``; reports the connection to ``state.set_broker``."""

    def __init__(self, settings: BrokerSettings, state: WarehouseState,
                 client_factory: Callable[..., paho.Client] = paho.Client) -> None:
        self.settings = settings
        self.state = state
        self._stopping = False
        self.client = settings.new_client("dashboard", default_id=f"dashboard-{socket.gethostname()}-{os.getpid()}",
                                          factory=client_factory)
        self.client.reconnect_delay_set(0.5, 30)
        self._configure()
        state.counters.mqtt_callback_errors = self.callback_errors      # /healthz shows them

    def callback_errors(self) -> dict[str, int]:
        """Exceptions in this feed's MQTT callbacks, by callback name (``contract.broker.guard_hooks``: each logged
        with its traceback, paho's network thread went on)."""
        return dict(self.client.hook_errors)      # one copy in C, under the GIL: no lock needed

    def _configure(self) -> None:
        client = self.client
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message

    def start(self) -> None:
        log.info("dashboard: connecting to %s as %s", self.settings.where(), self.settings.username or "(anonymous)")
        self.client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive_s)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()
        if errors := self.callback_errors():
            log.warning("dashboard: %d exception(s) in MQTT callbacks while running, by callback: %s (each logged "
                        "with its traceback when it happened)", sum(errors.values()), errors)

    # ------------------------------------------------------------ paho callbacks (paho's network thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        where = self.settings.where()
        if reason_code.is_failure:
            detail = f"connection refused by {where}: {reason_code} (reason code {reason_code.value})"
            log.error("dashboard: %s", detail)
            self.state.set_broker(False, detail)
            return
        client.subscribe([(topic, paho.SubscribeOptions(qos=1)) for topic in dashboard_topics(self.settings)])
        self.state.set_broker(True, f"connected to {where}")
        log.info("dashboard: connected to %s; subscribing to %s", where, ", ".join(dashboard_topics(self.settings)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for topic, code in zip(dashboard_topics(self.settings), reason_codes):
            if code.is_failure:
                log.error("dashboard: subscription to %s refused: %s", topic, code)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._stopping:
            self.state.set_broker(False, "stopped")
            return
        detail = f"disconnected from {self.settings.where()}: {reason_code}; reconnecting"
        log.warning("dashboard: %s", detail)
        self.state.set_broker(False, detail)

    def _on_connect_fail(self, client, userdata) -> None:
        detail = f"cannot reach {self.settings.where()}; retrying"
        log.warning("dashboard: %s", detail)
        self.state.set_broker(False, detail)

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        # retain is set only on the stored copy a subscription gets when it is made (MQTT 3.1.1 and 5 alike):
        # a retained status is as old as it says, not as old as the (re)connect
        self.state.ingest(message.topic, bytes(message.payload), retained=bool(message.retain))
