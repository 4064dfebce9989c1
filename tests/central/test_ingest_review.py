"""The central side's MQTT callback errors made visible (ingest, the dashboard's /healthz, the rollout's station
link), ingest's subscription flags checked at start, and the labels export's names and disk errors.

Against a real mosquitto. An exception inside a callback cannot be caused from outside any more (each callback
catches what a message can do), so where a test needs one it injects it, and says so."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import urllib.request

import paho.mqtt.client as paho
import pytest
from loop_support import REPO, real_frames

from agent.mqtt import encode
from central.review.ingest import IngestService
from central.review.labels import CSV_NAME, export_reviewed
from central.review.store import FrameStore
from contract.broker import BrokerSettings

TOPIC = "inventory/ber1/receiving-01/frames"


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def publish(port: int, messages, *, retain: bool = False) -> None:
    """QoS 1 publishes, in order, each acknowledged by the broker; ``messages``: (topic, payload, properties)."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-pub-{os.getpid()}-{time.time_ns()}",
                         protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload, props in messages:
            client.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


# ---------------------------------------------------------------- ingest


@pytest.mark.parametrize("topic, group, flag", [("inventory/#/frames", None, "--topic"),
                                                ("inventory/+/st+/frames", None, "--topic"),
                                                ("inventory/+/+/frames", "ingest/a", "--shared-group"),
                                                ("inventory/+/+/frames", "", "--shared-group")])
def test_a_subscription_the_broker_cannot_take_is_refused_at_start_naming_the_flag(tmp_path, topic, group, flag):
    """``--topic inventory/#/frames`` made paho raise inside on_connect: the service ran subscribed to nothing,
    stored nothing and said nothing more; ``--shared-group ingest/a`` subscribed to ``$share/ingest/a/...``, which
    the broker reads as share ``ingest`` of topic ``a/inventory/+/+/frames``: no frame ever came
    (/tmp/central-ingest/repro_ingest_hook.py)."""
    from central.review.ingest import SubscriptionError

    store = FrameStore(tmp_path / "store")
    try:
        with pytest.raises(SubscriptionError, match=f"^{flag} "):
            IngestService(store, BrokerSettings(port=1), topic=topic, shared_group=group)
    finally:
        store.close()
    extra = ["--topic", topic] + (["--shared-group", group] if group is not None else [])
    done = subprocess.run([sys.executable, "-m", "central", "ingest", "--store", str(tmp_path / "cli"),
                           "--mqtt-port", "1", *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().startswith(flag), done.stderr[-2000:]


def test_an_exception_in_an_ingest_callback_is_counted_shown_at_stop_and_the_next_frame_is_stored(broker, tmp_path,
                                                                                                  caplog):
    """The exception is injected (the PUBACK of the first frame cannot be sent): ``contract.broker`` counts it in
    the client's hook_errors; ingest showed that count nowhere. Now ``stats()`` has it, ``stop`` logs it, and the
    next frame is stored all the same."""
    records = real_frames(2)
    store = FrameStore(tmp_path / "store")
    service = IngestService(store, BrokerSettings(host=broker.host, port=broker.port, client_id="ingest-hook-test"))
    real_ack, acks = service.client.ack, []

    def ack_fails_once(mid, qos):
        acks.append(mid)
        if len(acks) == 1:
            raise RuntimeError("injected: the PUBACK could not be sent")
        return real_ack(mid, qos)

    service.client.ack = ack_fails_once
    service.start()
    try:
        assert service.connected.wait(30)
        assert service.stats()["mqtt_callback_errors"] == {}
        publish(broker.port, [(TOPIC, *encode(r, True)) for r in records])
        assert wait_for(lambda: store.list()[1] == 2), store.list()[1]
        assert wait_for(lambda: service.stats()["mqtt_callback_errors"] == {"on_message": 1})
    finally:
        service.stop()
        store.close()
    assert "1 exception(s) in MQTT callbacks while running, by callback: {'on_message': 1}" in caplog.text


# ---------------------------------------------------------------- dashboard and rollout link


def test_healthz_counts_the_exceptions_in_the_dashboards_mqtt_callbacks(broker, monkeypatch):
    """Injected: the state's ingest raises on one message. /healthz showed nothing of it; now its counters have
    ``mqtt_callback_errors`` by callback, and the next message is taken."""
    from central.dashboard.server import Dashboard

    dash = Dashboard(BrokerSettings(port=broker.port), port=0, no_auth=True)
    real_ingest = dash.state.ingest

    def ingest(topic, payload, *args, **kwargs):
        if payload == b"boom":
            raise RuntimeError("injected: a defect in the state")
        return real_ingest(topic, payload, *args, **kwargs)

    monkeypatch.setattr(dash.state, "ingest", ingest)
    dash.start()
    host, port = dash.address

    def health() -> dict:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=30) as resp:
            return json.loads(resp.read())

    try:
        assert wait_for(lambda: health()["broker_connected"])
        assert health()["counters"]["mqtt_callback_errors"] == {}
        # retained: delivered whether the subscription is made before or after (broker_connected comes before it)
        publish(broker.port, [("inventory/ber1/dock-01/status", b"boom", None),
                              ("inventory/ber1/dock-02/status", b"not json", None)], retain=True)
        assert wait_for(lambda: health()["counters"]["malformed"] == 1
                        and health()["counters"]["mqtt_callback_errors"] == {"on_message": 1}), health()
    finally:
        dash.stop()


def test_the_rollout_station_link_reports_callback_errors_beside_refused(broker, monkeypatch, caplog):
    """Injected: the JSON reader raises an error the link does not expect on one status. ``counts()`` has it beside
    ``refused``, and closing the link logs both."""
    import central.rollout.link as link_module
    from central.rollout.link import StationLink

    real_loads = link_module.loads_finite

    def loads(payload):
        if bytes(payload) == b"boom":
            raise RuntimeError("injected: a defect in the reader")
        return real_loads(payload)

    monkeypatch.setattr(link_module, "loads_finite", loads)
    link = StationLink(BrokerSettings("127.0.0.1", broker.port)).connect()
    try:
        link.settle(quiet_s=0.2, timeout_s=30)
        publish(broker.port, [("inventory/ber1/dock-01/status", b"boom", None),
                              ("inventory/ber1/dock-02/status", b"not json", None)])
        assert wait_for(lambda: link.refused == 1)
        assert link.counts() == {"refused": 1, "mqtt_callback_errors": {"on_message": 1}, "disconnects": 0}
    finally:
        link.close()
    assert "1 station message(s) refused, MQTT callback errors {'on_message': 1}" in caplog.text


# ---------------------------------------------------------------- labels export


@pytest.mark.parametrize("name", ["reviewed.csv", "export.json", "labels.json", "Labels.JSON"])
def test_a_class_named_like_one_of_the_exports_own_files_gets_a_folder_of_its_own(tmp_path, name):
    """A reviewer's new class "labels.json" made the class folder where labels.json goes, and every export failed
    (IsADirectoryError; FileExistsError for "reviewed.csv"). /tmp/central-ingest/repro_labels_reserved.py."""
    from trainer.data import read_csv

    store = FrameStore(tmp_path / "store", labels=["Bag"])
    first, second = real_frames(2)
    try:
        for r in (first, second):
            store.add(r.body, r.blob)
        store.review(first.id, "new_class", label=name, reviewer="ana")
        store.review(second.id, "label", label="Bag", reviewer="ana")
        summary = export_reviewed(store, tmp_path / "out")
    finally:
        store.close()
    assert summary["by_label"] == {"Bag": 1, name: 1}
    folders = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert folders == {"Bag": "Bag", f"_{name}": name}
    assert (tmp_path / "out" / f"_{name}" / f"{first.id}.jpg").read_bytes() == first.blob
    assert sorted(read_csv(tmp_path / "out" / CSV_NAME).classes) == sorted(["Bag", name])


def test_an_export_that_cannot_be_written_says_so_naming_out_and_keeps_the_earlier_one(tmp_path):
    """The file system refuses to write (here RLIMIT_FSIZE: every write past 64 kB fails with EFBIG, as ENOSPC would
    on a full disk): ``labels export --force`` ended in a traceback whose last line named no file; now one line
    names --out, nothing half-written is left beside it, and the earlier export is whole.
    /tmp/central-ingest/repro_labels_full.py (a full tmpfs)."""
    import resource
    import signal

    store = FrameStore(tmp_path / "store", labels=["Bag"])
    try:
        for r in real_frames(150):
            store.add(r.body, r.blob)
            store.review(r.id, "label", label="Bag", reviewer="ana", note="a note to make each row longer " * 20)
    finally:
        store.close()
    out = tmp_path / "exports" / "out"
    command = [sys.executable, "-m", "central", "labels", "export", "--store", str(tmp_path / "store"), "--out",
               str(out)]
    assert subprocess.run(command, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    before = (out / CSV_NAME).read_bytes()
    assert len(before) > 128 * 1024

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write past the limit fails (EFBIG), not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    done = subprocess.run(command + ["--force"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert f"--out {out}: the export could not be written" in last and "earlier export is kept" in last, last
    assert "Traceback" not in done.stderr
    assert (out / CSV_NAME).read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    with open(out / CSV_NAME, newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == 150
