"""benchmarks/mqtt_load.py on a small load: the counting, dedupe and loss accounting are right."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from deploy_support import REPO

pytestmark = pytest.mark.mqtt


def load_module():
    spec = importlib.util.spec_from_file_location("mqtt_load", REPO / "benchmarks" / "mqtt_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mqtt_load"] = module   # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("subscribers", [1, 2])
def test_a_small_fleet_loses_nothing(tmp_path, subscribers, mosquitto_bin):
    mqtt_load = load_module()
    broker, port = mqtt_load.start_mosquitto(tmp_path)
    try:
        cfg = mqtt_load.LoadConfig(host="127.0.0.1", port=port, stations=20, rate=10.0, duration=1.0,
                                   payload_bytes=300, publishers=2, subscribers=subscribers, stations_per_site=8,
                                   drain_s=10.0)
        result = mqtt_load.run_load(cfg, broker.pid)
    finally:
        broker.terminate()
        broker.wait(10)
    assert result["lost"] == 0 and result["unacked"] == 0 and result["publish_errors"] == 0
    assert result["acked"] == result["published"] == result["received_unique"] >= 180
    assert result["latency_ms"]["p99"] < 1000


def test_station_names_follow_the_topic_contract():
    mqtt_load = load_module()
    assert mqtt_load.station_name(123, 50) == ("site-002", "st-023")
