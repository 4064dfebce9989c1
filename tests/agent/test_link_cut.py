"""The link-cut soak (benchmarks/link_cut_soak.py), short: a station whose broker link is cut every 1-2 s loses nothing.

Real mosquitto, the real station in this process, a real TCP proxy that aborts the station's connection at
seeded random moments and sometimes stops listening; a subscriber straight on the broker counts by id.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from benchmark_script import load

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.mqtt


def test_a_station_whose_link_is_cut_every_1_to_2_s_delivers_every_message(mosquitto_bin, tiny_bundle, fmnist_video,
                                                                           tmp_path):
    soak = load("link_cut_soak")
    # given a proxy that cuts every 1-2 s and, after 30% of the cuts (seed 1: 5 in the first 20 s), refuses connects
    plan = soak.CutPlan(cut_every_s=(1.0, 2.0), refuse_chance=0.3, refuse_for_s=(0.2, 2.0), seed=1)
    cfg = soak.SoakConfig(duration_s=20.0, fps=20.0, plan=plan, drain_timeout_s=120.0, deliver_timeout_s=30.0)

    # when the station runs 20 s through it, then stops its camera and drains its outbox
    res = soak.run_soak(tiny_bundle, fmnist_video, tmp_path, cfg)

    # then every result, decision and upload it wrote to its outbox reached the subscriber, nothing is left behind
    assert res["produced"]["result"] >= 50 and res["produced"]["frame"] > 0, res
    assert res["delivered_unique"] == res["produced"], res
    assert res["lost_total"] == 0 and res["unexpected"] == {"result": 0, "decision": 0, "frame": 0}, res
    assert res["results_missing_count"] == 0 and res["frames_dropped"] == 0, res
    assert res["outbox_drained"] and res["outbox_left"] == 0 and res["outbox_dropped"] == {}, res
    assert soak.failed(res) == []
    # and the link really was cut: several live connections aborted, the listener closed at least twice
    link = res["link"]
    assert link["cuts"] >= 5 and link["connections_cut"] >= 5, link
    assert link["refusals"] >= 2, link
    assert res["reconnects"] >= 3, res


def test_the_soak_catches_a_station_that_deletes_on_send_instead_of_on_puback(mosquitto_bin, tiny_bundle,
                                                                              fmnist_video, tmp_path, monkeypatch):
    """The gate is not vacuous: the link's 50 ms delay keeps messages on the way when a cut comes, so a publisher
    that forgets a message once it is handed to the socket (at most once) loses some at almost every cut."""
    from agent.mqtt import MqttPublisher

    soak = load("link_cut_soak")
    send = MqttPublisher._fill_window

    def delete_on_send(self, client, last_sent):
        sent = send(self, client, last_sent)
        self._acked.extend(self._inflight.values())     # committed as if PUBACK'd on the next loop turn
        self._inflight.clear()
        return sent

    # given a station whose publisher deletes each message from its outbox as soon as it is sent
    monkeypatch.setattr(MqttPublisher, "_fill_window", delete_on_send)
    plan = soak.CutPlan(cut_every_s=(1.0, 2.0), refuse_chance=0.0, seed=2)
    cfg = soak.SoakConfig(duration_s=12.0, fps=20.0, plan=plan, drain_timeout_s=60.0, deliver_timeout_s=5.0)

    # when it runs through the cutting link
    res = soak.run_soak(tiny_bundle, fmnist_video, tmp_path, cfg)

    # then the soak reports the messages that never arrived, and fails
    assert res["link"]["connections_cut"] >= 4, res["link"]
    assert res["lost_total"] > 0 and res["outbox_left"] == 0, res
    assert res["delivered_unique"]["result"] == res["produced"]["result"] - res["lost"]["result"]
    assert any(why.startswith("lost") for why in soak.failed(res))


def connack(level: int) -> bytes:
    """A successful CONNACK: MQTT v5 carries a properties length (0), 3.1.1 does not."""
    return bytes([0x20, 0x03, 0x00, 0x00, 0x00]) if level == 5 else bytes([0x20, 0x02, 0x00, 0x00])


def test_a_cut_before_connack_does_not_downgrade_a_v5_station_to_311(tmp_path):
    """A broker that answered v5 once speaks v5: a link cut during a later handshake is a cut, not a protocol refusal."""
    from agent.config import AgentConfig
    from agent.health import Metrics
    from agent.mqtt import MqttPublisher
    from agent.outbox import Outbox

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    levels: list[int] = []

    def serve() -> None:
        # given a v5 broker whose link is cut once after a session, and once more mid-handshake
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            level = conn.recv(1024)[8]
            levels.append(level)
            if len(levels) == 2:          # the cut comes after CONNECT, before the CONNACK
                conn.close()
                continue
            conn.sendall(connack(level))
            if len(levels) == 1:          # a working v5 session, then a cut
                time.sleep(0.3)
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    cfg = AgentConfig.model_validate({
        "site": "test", "station": "st-01", "model": {"bundle": "unused"}, "cameras": [{"id": "a", "uri": "x"}],
        "mqtt": {"port": server.getsockname()[1], "reconnect": {"initial_s": 0.1, "max_s": 0.2}}})
    publisher = MqttPublisher(cfg, Outbox(tmp_path / "ob.sqlite", max_bytes=10**6, max_age_s=60), Metrics(),
                              lambda state: {"state": state})
    publisher.start()
    try:
        deadline = time.monotonic() + 10
        while publisher.state.connects < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        publisher.stop(0.2)
        server.close()
    # then it reconnects with MQTT v5, as before the cut
    assert publisher.state.connects >= 2, publisher.state.history
    assert levels[:3] == [5, 5, 5] and publisher.state.protocol == "v5", (levels, publisher.state.history)
