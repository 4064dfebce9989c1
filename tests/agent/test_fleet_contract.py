"""The fleet simulator on the wire, as a real station: every message under its schema, on its topic, with the QoS
and retain flag of ARCHITECTURE.md section 4, and a station that leaves ends with a retained offline status
(its own, or its last will), never a retained "online" nobody will ever correct.

A real mosquitto (tests/agent/conftest.py); the wiretap subscribes with QoS 2 and retain-as-published, so it
sees the QoS and the retain flag each message was published with.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict

import paho.mqtt.client as paho
import pytest

from agent.sim.fleet import Fleet, FleetConfig, station_names
from central.review.ingest import parse_frame
from contract.broker import BrokerSettings
from contract.messages import checker, loads_finite

pytestmark = pytest.mark.mqtt

# leaf -> (QoS, retained), ARCHITECTURE.md section 4 (receipt: an outbox kind, as result)
CONTRACT = {"status": (1, True), "result": (1, False), "decision": (1, False), "alert": (1, False),
            "stats": (0, False), "frames": (1, False), "receipt": (1, False)}


class Tap:
    """A subscriber to every station topic that keeps (topic, payload, qos, retain, properties)."""

    def __init__(self, port: int, name: str) -> None:
        self.messages: list[tuple] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        options = paho.SubscribeOptions(qos=2, retainAsPublished=True)
        client.on_connect = lambda c, *_: c.subscribe("inventory/+/+/#", options=options)
        client.on_subscribe = lambda *_: self.subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        assert self.subscribed.wait(30), "the wiretap was not subscribed"

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload), message.qos, message.retain,
                                  message.properties))

    def close(self) -> list[tuple]:
        self.client.disconnect()
        self.client.loop_stop()
        with self.lock:
            return list(self.messages)


def run_fleet(port: int, cfg: FleetConfig, seconds: float, goodbye: bool) -> Fleet:
    fleet = Fleet(cfg, BrokerSettings(host="127.0.0.1", port=port), {f"{s}/{t}": "pw" for s, t in station_names(cfg)})
    fleet.start()
    try:
        time.sleep(seconds)
    finally:
        fleet.stop(goodbye=goodbye)
    assert not fleet.report()["errors"]
    return fleet


def retained_statuses(port: int, stations: int) -> dict[str, dict]:
    """What a dashboard started now is handed: each station's retained status (waits for ``stations`` of them)."""
    tap = Tap(port, "late-subscriber")

    def statuses() -> dict[str, dict]:
        with tap.lock:
            return {topic.rsplit("/", 1)[0]: loads_finite(payload) for topic, payload, _q, retain, _p in tap.messages
                    if retain and topic.endswith("/status")}
    deadline = time.monotonic() + 30
    while len(statuses()) < stations and time.monotonic() < deadline:
        time.sleep(0.1)
    tap.close()
    return statuses()


def test_every_message_of_a_fleet_run_follows_the_contract_on_the_wire(broker):
    """Given QC stations, docks with shipments, a rollout and a station that drops off, when the fleet publishes
    for a few seconds and says goodbye, then every message is valid under its schema, has the QoS and retain flag
    of its topic, a unique id and a sequence number its station used once, and every station's retained status
    at the end says offline."""
    cfg = FleetConfig(sites=1, per_site=4, results_per_s=5.0, stats_interval_s=0.5, frame_interval_s=0.5,
                      qc_every=2, alert_cooldown_s=0.5, hard_items=0.5, offline=1, trouble_after_s=2.0,
                      rollout_share=0.5, rollout_over_s=2.0, shipment_items=3, loops=1)
    tap = Tap(broker.port, "wiretap")
    run_fleet(broker.port, cfg, 4.0, goodbye=True)
    time.sleep(1.0)
    wire = tap.close()
    wrong: Counter = Counter()
    leaves: Counter = Counter()
    ids: set[str] = set()
    seqs: dict[str, list[int]] = defaultdict(list)
    for topic, payload, qos, retain, props in wire:
        root, leaf = topic.rsplit("/", 1)
        leaves[leaf] += 1
        if CONTRACT.get(leaf) != (qos, retain):
            wrong[f"{leaf}: QoS {qos}, retain {retain}; the contract says {CONTRACT.get(leaf)}"] += 1
        body = parse_frame(topic, payload, props)[0] if leaf == "frames" else loads_finite(payload)
        if leaf != "frames":
            checker(body["schema"], "jsonschema").check(topic, body)
            assert body["schema"] == f"{leaf}.v1"
        assert (body["site"], body["station"]) == tuple(root.split("/")[1:])
        if body["id"] in ids:
            wrong[f"{leaf}: id used twice"] += 1
        ids.add(body["id"])
        seqs[root].append(body["seq"])
    assert not wrong, dict(wrong)
    assert {"status", "result", "decision", "stats", "frames", "receipt"} <= set(leaves), leaves
    assert all(len(set(s)) == len(s) for s in seqs.values())
    final = retained_statuses(broker.port, 4)
    assert len(final) == 4 and {body["state"] for body in final.values()} == {"offline"}, final


def test_a_fleet_that_leaves_without_goodbye_leaves_its_last_wills(broker):
    """``--no-goodbye``: the stations leave as crashed ones do (no offline status of their own); the broker
    publishes each one's last will, so a dashboard started later sees them offline. Before, they sent a clean
    DISCONNECT, which discards the will: every station stayed retained "online", then "stale", for good."""
    cfg = FleetConfig(sites=1, per_site=3, results_per_s=2.0, stats_interval_s=0.5, qc_every=0, loops=1)
    fleet = run_fleet(broker.port, cfg, 1.5, goodbye=False)
    assert fleet.report()["wills"] == 3
    final = retained_statuses(broker.port, 3)
    assert {key: body["state"] for key, body in final.items()} == \
        {f"inventory/{c.sim.key}": "offline" for c in fleet.clients}
    assert {body["id"] for body in final.values()} == {c.will["id"] for c in fleet.clients}
