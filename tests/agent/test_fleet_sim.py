"""The fleet simulator (agent/sim/fleet.py): what it publishes follows the contract, and a small fleet through
the shipped central broker (TLS, a password per station, the ACL) reaches the dashboard state and ingest whole.

The broker is deploy/central/mosquitto/{mosquitto.conf,acl} as benchmarks/fleet.py runs it (paths and ports in a
temporary folder, a throw-away CA). The dashboard is the real ``StationFeed`` + ``WarehouseState`` in this
process, ingest the real ``IngestService`` + ``FrameStore``, each logged in as its deploy user.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ssl
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest

from agent.mqtt import encode
from agent.sim.fleet import (
    Fleet,
    FleetConfig,
    ItemImages,
    StationSim,
    classify,
    config_from_args,
    get_args_parser,
    read_credentials,
    station_names,
    troubled,
    write_credentials,
)
from central.dashboard.feed import StationFeed
from central.dashboard.state import WarehouseState
from central.review.ingest import IngestService, parse_frame
from central.review.store import FrameStore
from contract.broker import BrokerSettings
from contract.messages import checker, loads_finite

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 90.0


def load_benchmark():
    spec = importlib.util.spec_from_file_location("fleet_benchmark", REPO / "benchmarks" / "fleet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fleet_benchmark"] = module      # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def wait_until(what: str, done, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def check_wire(topic: str, payload: bytes, props) -> str:
    """Check one message as a subscriber gets it; returns its schema name."""
    leaf = topic.rsplit("/", 1)[-1]
    if leaf == "frames":
        meta, jpeg = parse_frame(topic, payload, props)      # frame.v1 metadata in the v5 user property
        assert jpeg[:2] == b"\xff\xd8"
        return "frame.v1"
    body = loads_finite(payload)
    checker(body["schema"]).check(topic, body)
    assert body["schema"] == f"{leaf}.v1"
    return body["schema"]


# ---------------------------------------------------------------- the messages, without a network

def test_every_kind_a_station_publishes_follows_its_schema():
    """Given a QC station whose model is often unsure, when it classifies 300 frames and goes through a rollout
    that one station refuses, then its results, decisions, alerts, frames, stats and statuses all follow their
    schemas as they go on the wire (frames: JPEG payload, frame.v1 metadata in the v5 user property)."""
    cfg = FleetConfig(sites=1, per_site=2, qc_every=1, defect_label="Bag", alert_cooldown_s=0.0,
                      frame_interval_s=0.0, hard_items=0.5)
    images = ItemImages(cfg.labels, cfg.jpeg_side)
    stations = [StationSim(cfg, "site-00", name, i, images, np.random.default_rng([3, i]))
                for i, (_site, name) in enumerate(station_names(cfg))]
    checked: dict[str, int] = {}
    tracks: dict[str, set[str]] = {"frame": set(), "decision": set()}
    for _ in range(150):
        logits = [s.next_logits(s.cameras[0]) for s in stations]
        for station, cls in zip(stations, classify(stations, logits, cfg.labels)):
            for kind, body, blob in station.frame_messages(station.cameras[0], cls):
                if kind in tracks:
                    tracks[kind].add(body["track"])
                record = station.record(kind, body, blob)
                payload, props = encode(record, True)
                name = check_wire(f"{station.topics.root}/{'frames' if kind == 'frame' else kind}", payload, props)
                checked[name] = checked.get(name, 0) + 1
    stations[0].update_model(refuse=False)
    stations[1].update_model(refuse=True)
    for station in stations:
        for body in (station.status_body("online"), station.status_body("offline"), station.stats_body(3)):
            checker(body["schema"]).check(station.key, body)
            checked[body["schema"]] = checked.get(body["schema"], 0) + 1
    assert set(checked) == {"result.v1", "decision.v1", "alert.v1", "frame.v1", "status.v1", "stats.v1"}, checked
    assert checked["result.v1"] == 300
    # an uploaded frame names its item as the item's decision does (the last items may still be in view)
    assert len(tracks["frame"] - tracks["decision"]) <= 2 < len(tracks["frame"] & tracks["decision"])
    assert stations[0].version == cfg.model_to and stations[1].version == cfg.model_from
    assert stations[1].status_body("online")["last_model_update"]["ok"] is False
    assert stations[0].stats_body(0)["model_version"] == cfg.model_to


def test_a_dock_receives_shipment_after_shipment_and_its_receipts_count_what_arrived():
    """Given receiving stations with shipments of 12 items, when each classifies 400 frames, then every receipt
    follows its schema; each shipment opens with a receipt where every line is short and closes with a final one
    that counts its 12 items (received, review or unknown) against lines that add up to 12; the next one opens
    with a new id; and every ref in a receipt names a decision the station published, with that decision's label."""
    cfg = FleetConfig(sites=1, per_site=2, qc_every=0, shipment_items=12, hard_items=0.2)
    images = ItemImages(cfg.labels, cfg.jpeg_side)
    docks = [StationSim(cfg, "site-00", name, i, images, np.random.default_rng([5, i]))
             for i, (_site, name) in enumerate(station_names(cfg))]
    decisions: dict[str, dict] = {}
    receipts: dict[str, list[dict]] = {d.key: [] for d in docks}
    for _ in range(200):
        logits = [d.next_logits(d.cameras[0]) for d in docks]
        for dock, cls in zip(docks, classify(docks, logits, cfg.labels)):
            for kind, body, blob in dock.frame_messages(dock.cameras[0], cls):
                record = dock.record(kind, body, blob)
                payload, props = encode(record, True)
                check_wire(f"{dock.topics.root}/{kind if kind != 'frame' else 'frames'}", payload, props)
                sent = loads_finite(payload) if kind != "frame" else None
                if kind == "decision":
                    decisions[sent["id"]] = sent
                elif kind == "receipt":
                    receipts[dock.key].append(sent)
    for dock in docks:
        mine = receipts[dock.key]
        finals = [r for r in mine if r["final"]]
        assert dock.shipments >= 3 and len(finals) == dock.shipments - 1, (dock.shipments, len(finals))
        opened = [r for r in mine if r["items"] == 0]
        assert [r["shipment"] for r in opened] == [f"{dock.station}-{n:05d}" for n in range(1, dock.shipments + 1)]
        assert all(line["status"] == "short" for r in opened for line in r["lines"])
        for final in finals:
            assert final["state"] == "closed" and final["items"] == 12
            assert sum(line["expected"] for line in final["lines"]) == 12
            counted = final["totals"]
            assert counted["matched"] + counted["over"] + counted["unexpected"] + counted["review"] \
                + counted["unknown"] == 12
        seqs = [r["seq"] for r in mine]
        assert seqs == sorted(seqs)
        for r in mine:
            for line in r["lines"]:
                for ref in line["refs"]:
                    assert decisions[ref["decision"]]["label"] == line["label"] == ref["label"]
            for ref in r["review"]["refs"]:
                assert decisions[ref["decision"]]["low_confidence"]


def test_a_dock_with_two_cameras_closes_a_shipment_only_when_its_last_item_is_decided():
    """Two cameras taking items off one truck in turn (as ``FleetLoop._produce`` drives them): when the last item of
    a shipment is on one camera, the other waits (empty frames, nothing published) instead of opening the next
    shipment, so every final receipt counts exactly the shipment's 12 items, each decision in the shipment whose
    items it was drawn from."""
    cfg = FleetConfig(sites=1, per_site=1, qc_every=0, shipment_items=12, cameras=2)
    dock = StationSim(cfg, "site-00", "st-000", 0, ItemImages(cfg.labels, cfg.jpeg_side), np.random.default_rng([5, 0]))
    finals, decided, waited = [], 0, 0
    for n in range(600):
        camera = dock.cameras[n % 2]
        cls = classify([dock], [dock.next_logits(camera)], cfg.labels)[0]
        waited += dock.items[camera] is None
        for kind, body, blob in dock.frame_messages(camera, cls):
            payload, props = encode(dock.record(kind, body, blob), True)
            check_wire(f"{dock.topics.root}/{kind if kind != 'frame' else 'frames'}", payload, props)
            decided += kind == "decision"
            if kind == "receipt" and body["final"]:
                finals.append(body)
    assert [f["items"] for f in finals] == [12] * len(finals)
    assert len(finals) >= 8 and waited > 0
    assert all(sum(line["expected"] for line in f["lines"]) == 12 for f in finals)
    open_items = dock.desk.shipment.receipt()["items"] if dock.desk.shipment is not None else 0
    assert decided == 12 * len(finals) + open_items      # no decision lost between shipments
    assert dock.metrics.snapshot()["frames_empty"] == waited


def test_credentials_are_a_password_per_station_and_a_mosquitto_password_file(tmp_path):
    cfg = FleetConfig(sites=2, per_site=3)
    plain, passwd = write_credentials(cfg, tmp_path, {"dashboard": "pw"})
    users = read_credentials(plain)
    assert sorted(users) == sorted(f"{site}/{station}" for site, station in station_names(cfg))
    assert len(set(users.values())) == 6
    hashed = dict(line.split(":", 1) for line in passwd.read_text().splitlines())
    assert set(hashed) == set(users) | {"dashboard"}
    assert all(h.startswith("$7$") for h in hashed.values())          # mosquitto 2's PBKDF2-SHA512
    assert plain.stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------- a small fleet through the deployed broker

@pytest.fixture
def deployed(tmp_path):
    bench = load_benchmark()
    cfg = FleetConfig(sites=2, per_site=3, results_per_s=5.0, stats_interval_s=1.0, frame_interval_s=0.5,
                      qc_every=3, alert_cooldown_s=1.0, offline=1, stale=1, trouble_after_s=3.0,
                      rollout_share=0.5, rollout_over_s=3.0, loops=2)
    plain, passwd = write_credentials(cfg, tmp_path / "secrets", bench.CENTRAL_USERS, bench.MOSQUITTO_PASSWD)
    broker = bench.FleetBroker(tmp_path / "broker", bench.make_pki(tmp_path / "pki"), passwd=passwd)
    broker.workdir.mkdir()
    broker.start()
    settings = BrokerSettings(host="127.0.0.1", port=broker.tls_port, tls_ca=broker.pki.ca_cert)
    yield cfg, settings, read_credentials(plain), bench.CENTRAL_USERS, tmp_path
    broker.stop()


class Wiretap:
    """Every station message on the broker, read as the central services read them (user central-ingest)."""

    def __init__(self, settings: BrokerSettings, password: str) -> None:
        self.messages: list[tuple[str, bytes, object]] = []
        self.subscribed = threading.Event()
        self.lock = threading.Lock()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="fleet-test-wiretap", protocol=paho.MQTTv5)
        client.tls_set(ca_certs=str(settings.tls_ca), cert_reqs=ssl.CERT_REQUIRED)
        client.username_pw_set("central-ingest", password)
        client.on_connect = lambda c, *_: c.subscribe("inventory/+/+/+", qos=1)
        client.on_subscribe = lambda *_: self.subscribed.set()
        client.on_message = self._on_message
        client.connect(settings.host, settings.port)
        client.loop_start()
        self.client = client

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload), message.properties))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_small_fleet_through_the_deployed_broker_reaches_dashboard_and_ingest(deployed):
    """Given 2 sites x 3 stations logged in with their own passwords over TLS, one dropping off (its will), one
    going quiet and half of them switching model, when they publish for a while, then every message on the wire
    follows its schema, the dashboard counts nothing malformed and shows each station as it is (online, offline
    by its will, stale; the model version each runs), every acknowledged message is applied once, and ingest
    stores every frame."""
    cfg, settings, passwords, central, tmp_path = deployed
    state = WarehouseState()
    feed = StationFeed(settings.with_(username="dashboard", password_env=None), state)
    feed.client.username_pw_set("dashboard", central["dashboard"])
    store = FrameStore(tmp_path / "store")
    ingest = IngestService(store, settings.with_(username="central-ingest", client_id="central-ingest"))
    ingest.client.username_pw_set("central-ingest", central["central-ingest"])
    tap = Wiretap(settings, central["central-ingest"])
    feed.start()
    ingest.start()
    fleet = Fleet(cfg, settings, passwords)
    try:
        wait_until("the dashboard, ingest and the wiretap subscribed",
                   lambda: state.health()["broker_connected"] and ingest.connected.is_set() and tap.subscribed.is_set())
        fleet.start()
        trouble = troubled(cfg)
        offline = next(k for k, v in trouble.items() if v == "offline")
        stale = next(k for k, v in trouble.items() if v == "stale")

        def health() -> dict[str, str]:
            state.refresh()
            return {key: station.health for key, station in state.stations.items()}

        wait_until("the dropped station offline, the quiet one stale, the rollout done",
                   lambda: health().get(offline) == "offline" and health().get(stale) == "stale"
                   and all(c.sim.version == cfg.model_to for c in fleet.clients
                           if c.sim.last_update is not None and c.sim.last_update["ok"]))
        seen = health()
        assert len(seen) == 6
        assert {k: v for k, v in seen.items() if k not in trouble} == dict.fromkeys(set(seen) - set(trouble), "online")
        assert state.stations[offline].status["state"] == "offline"
        assert state.stations[offline].status["id"] == next(c.will["id"] for c in fleet.clients if c.sim.key == offline)
        versions = {c.sim.key: c.sim.version for c in fleet.clients}
        assert {k: s.status["model"]["version"] for k, s in state.stations.items() if k != offline} == \
            {k: v for k, v in versions.items() if k != offline}
        assert cfg.model_to in versions.values()
    finally:
        fleet.stop(goodbye=False)
    report = fleet.report()
    assert not report["errors"] and not report["refused"]
    expected = {key: {**s["acked"], "status": s["acked"].get("status", 0) + s["wills"]}
                for key, s in report["per_station"].items()}
    kinds = ("status", "result", "decision", "alert", "stats")
    wait_until("every acknowledged message applied by the dashboard",
               lambda: all(state.stations[k].counts[kind] >= want.get(kind, 0)
                           for k, want in expected.items() for kind in kinds))
    wait_until("every frame stored", lambda: store.stats()["frames"] >= report["acked"].get("frame", 0))
    try:
        counters = state.health()["counters"]
        assert counters["malformed"] == 0 and counters["duplicates"] == 0
        assert {k: {kind: state.stations[k].counts[kind] for kind in kinds if state.stations[k].counts[kind]}
                for k in expected} == {k: {kind: n for kind, n in want.items() if kind in kinds and n}
                                       for k, want in expected.items()}
        stats = store.stats()
        assert stats["frames"] == report["acked"]["frame"] > 0
        assert stats["counters"].get("malformed", 0) == 0
        with tap.lock:
            wire = list(tap.messages)
        names = {check_wire(topic, payload, props) for topic, payload, props in wire}
        assert {"status.v1", "result.v1", "decision.v1", "stats.v1", "frame.v1"} <= names
        assert len(wire) >= sum(report["acked"].values())
    finally:
        tap.close()
        ingest.stop()
        feed.stop()
        store.close()


def test_only_the_watched_stations_keep_their_result_times_and_those_are_bounded(deployed):
    """Given a fleet through the deployed broker where one station's latency is measured (``latency_of``) and at
    most 8 of its result times are kept, when every station publishes well over 8 results, then that station
    keeps its newest 8 and no other station keeps any (each result of every station was kept: ~0.5 GiB/h at
    1,000 stations)."""
    cfg, settings, passwords, _central, _tmp = deployed
    watched = next(f"{site}/{station}" for site, station in station_names(cfg) if f"{site}/{station}" not in
                   troubled(cfg))
    cfg = dataclasses.replace(cfg, latency_of=(watched,), latency_keep=8)
    fleet = Fleet(cfg, settings, passwords)
    fleet.start()
    try:
        wait_until("every online station acknowledged 20 results",
                   lambda: all(c.tally.acked["result"] >= 20 for c in fleet.clients if c.sim.key not in troubled(cfg)))
    finally:
        fleet.stop(goodbye=True)
    report = fleet.report()
    assert not report["errors"] and report["acked"]["result"] > 6 * 8
    kept = {c.sim.key: len(c.result_times) for c in fleet.clients}
    assert kept == {key: 8 if key == watched else 0 for key in kept}
    assert len(report["result_times"]) == 8
    mine = next(c for c in fleet.clients if c.sim.key == watched)
    times = [t for _id, t in report["result_times"]]
    assert times == sorted(times) and times[-1] == mine.result_times[-1][1]     # the newest ones


def test_latency_of_on_the_command_line_is_repeatable_and_must_name_a_station_of_the_fleet(capsys):
    base = ["run", "--sites", "2", "--per-site", "3", "--credentials", "x"]
    args = get_args_parser().parse_args(base + ["--latency-of", "site-01/st-002", "--latency-of", "site-00/st-000"])
    assert config_from_args(args).latency_of == ("site-01/st-002", "site-00/st-000")
    assert config_from_args(get_args_parser().parse_args(base)).latency_of == ()
    from agent.sim.fleet import main

    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--latency-of", "site-02/st-000"])
    assert exit_info.value.code == 2 and "--latency-of: no such station in this fleet: site-02/st-000" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="site-00/st-009"):
        Fleet(FleetConfig(sites=2, per_site=3, latency_of=("site-00/st-009",)), BrokerSettings(), {})


def test_the_fleet_benchmark_runs_the_deployed_stack_and_reports_nothing_lost(tmp_path):
    """benchmarks/fleet.py as the docs run it, on 3 stations for a few seconds: the deployed broker, the real
    ``python -m central dashboard`` and ``ingest`` processes, the simulator processes; exit 0, and the JSON says
    what was published, applied, stored, lost (0) and malformed (0), with the command."""
    import json
    import subprocess

    out = tmp_path / "fleet.json"
    proc = subprocess.run([sys.executable, "benchmarks/fleet.py", "--sites", "1", "--per-site", "3", "--duration", "4",
                           "--offline", "1", "--stale", "0", "--watch", "1", "--shipment-items", "2",
                           "--results-per-s", "4",
                           "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["stations"] == 3 and result["lost_total"] == 0 and result["malformed"] == 0
    assert result["published"]["acked"]["result"] == result["dashboard"]["applied_by_kind"]["result"] > 0
    # the docks' receipts (shipments of 2 items): each one the broker acknowledged, applied by the dashboard
    assert result["published"]["acked"]["receipt"] == result["dashboard"]["applied_by_kind"]["receipt"] > 0
    assert result["lost"]["qos1"]["receipt"] == 0 and result["shipments"]["docks"] == 3
    assert result["shipments"]["opened"] > 3 and result["shipments"]["dashboard"]["closed"] > 0
    assert result["dashboard"]["troubled_health_after_goodbye"] == {"site-00/st-002": "offline"}
    assert result["command"].startswith("python benchmarks/fleet.py --sites 1")
    assert set(result["cost"]) == {"mosquitto", "dashboard", "ingest", "simulator"}
    # the simulator keeps result times only for the watched card's station (--latency-of), all of them
    latency = result["latency_publish_to_events_ms"]
    assert result["events_streams"]["result_times_kept"] == latency["of"] > 0
    assert latency["of"] < result["published"]["acked"]["result"]
