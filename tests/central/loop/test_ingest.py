"""The ingest service against a real mosquitto: both wire forms, exactly once across kill -9, bad messages."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from loop_support import ingest_process, real_frames

from agent.mqtt import encode
from central.review.ingest import IngestService
from central.review.store import FrameStore
from contract.broker import BrokerSettings

TOPIC = "inventory/ber1/receiving-01/frames"
pytestmark = pytest.mark.mqtt


def station(broker, v5: bool = True) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"station-{os.getpid()}-{time.time_ns()}",
                         protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def publish(client: paho.Client, records, v5: bool = True, topic: str = TOPIC) -> None:
    for record in records:
        payload, props = encode(record, v5)           # the agent's own encoder
        client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def stored_ids(store_dir: Path) -> list[str]:
    db = store_dir / "frames.sqlite"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM frames")]


def test_both_wire_forms_are_stored_with_their_metadata(broker, tmp_path):
    store = FrameStore(tmp_path / "store")
    service = IngestService(store, BrokerSettings(host=broker.host, port=broker.port, client_id="ingest-test"))
    service.start()
    assert service.connected.wait(10)
    v5_records, v311_records = real_frames(3), real_frames(3, start=3)
    publish(client := station(broker), v5_records)
    publish(old := station(broker, v5=False), v311_records, v5=False)
    assert wait_for(lambda: store.list()[1] == 6)
    for record in v5_records + v311_records:
        frame = store.get(record.id)
        assert store.image_path(record.id).read_bytes() == record.blob
        assert frame["predicted"] == record.body["label"]
        assert frame["selected_because"] == record.body["selected_because"]
        assert frame["meta"] == record.body
    publish(client, v5_records[:2])                   # a redelivery: same ids
    assert wait_for(lambda: store.counters().get("duplicates") == 2)
    assert store.list()[1] == 6
    service.stop()
    for c in (client, old):
        c.loop_stop()
        c.disconnect()


def test_malformed_messages_are_counted_and_never_stop_the_service(broker, tmp_path, caplog):
    store = FrameStore(tmp_path / "store")
    service = IngestService(store, BrokerSettings(host=broker.host, port=broker.port, client_id="ingest-test"))
    service.start()
    assert service.connected.wait(10)
    client = station(broker)
    [good, other] = real_frames(2)
    client.publish(TOPIC, b"not a frame", qos=1).wait_for_publish(10)
    publish(client, [good], topic="inventory/ber1/someone-else/frames")       # station and topic disagree
    payload, props = encode(other, True)
    client.publish(TOPIC, payload[:100], qos=1, properties=props).wait_for_publish(10)   # cut JPEG
    publish(client, [other])
    assert wait_for(lambda: store.list()[1] == 1 and store.counters().get("malformed") == 3)
    assert store.get(other.id)["id"] == other.id
    assert "the topic names station ber1/someone-else but the frame says ber1/receiving-01" in caplog.text
    assert "field jpeg.bytes" in caplog.text
    [third] = real_frames(1, start=2)
    payload, props = encode(third, True)
    props.UserProperty = [("id", "00000000-0000-4000-8000-999999999999") if k == "id" else (k, v)
                          for k, v in props.UserProperty]
    client.publish(TOPIC, payload, qos=1, properties=props).wait_for_publish(10)   # properties and meta disagree
    assert wait_for(lambda: store.counters().get("malformed") == 4)
    assert f"user property id '00000000-0000-4000-8000-999999999999' but the frame's field id is '{third.id}'" \
        in caplog.text
    assert store.list()[1] == 1
    service.stop()
    client.loop_stop()
    client.disconnect()


def test_a_malformed_message_that_cannot_be_quarantined_stops_the_service_unacknowledged(broker, tmp_path, caplog):
    """The database fails while quarantining a malformed message: the service stops (it does not sit connected
    with a dead network thread) and the message stays with the broker. The failure is injected, as a database
    that fails on demand cannot be made here."""
    import sqlite3 as sqlite

    store = FrameStore(tmp_path / "store")
    real_quarantine = store.quarantine

    def database_fails(topic, payload, properties, reason):
        raise sqlite.OperationalError("disk I/O error")

    store.quarantine = database_fails
    service = IngestService(store, BrokerSettings(host=broker.host, port=broker.port, client_id="ingest-count-test"))
    service.start()
    assert service.connected.wait(10)
    client = station(broker)
    client.publish(TOPIC, b"not a frame", qos=1).wait_for_publish(10)
    assert service.failed.wait(30) and "disk I/O error" in service.failure
    service.stop()
    assert "frame message quarantined" in caplog.text

    store.quarantine = real_quarantine            # the restarted service gets the same message again
    again = IngestService(store, BrokerSettings(host=broker.host, port=broker.port, client_id="ingest-count-test"))
    again.start()
    assert wait_for(lambda: store.counters().get("malformed") == 1)
    assert [(e["topic"], e["bytes"]) for e in store.list_quarantine()[0]] == [(TOPIC, len(b"not a frame"))]
    again.stop()
    client.loop_stop()
    client.disconnect()


def test_a_frame_that_cannot_be_stored_is_never_acknowledged(broker, tmp_path, caplog):
    """Disk full on one frame: the service stops without its PUBACK, and the broker sends it again to the next
    ingest, which stores it; the frames before it are stored once."""
    records = real_frames(4)
    store = FrameStore(tmp_path / "store")
    real_add = store.add

    def disk_full_on_the_third(meta, jpeg):
        if meta["id"] == records[2].id:
            raise OSError(28, "No space left on device")
        return real_add(meta, jpeg)

    store.add = disk_full_on_the_third
    service = IngestService(store, BrokerSettings(host=broker.host, port=broker.port, client_id="ingest-disk-test"))
    service.start()
    assert service.connected.wait(10)
    publish(client := station(broker), records)
    assert service.failed.wait(30) and "No space left on device" in service.failure
    service.stop()
    assert {f["id"] for f in store.list()[0]} == {records[0].id, records[1].id}
    assert "it stays unacknowledged" in caplog.text

    store.add = real_add                          # space again: the restarted service, same client id
    again = IngestService(store, BrokerSettings(host=broker.host, port=broker.port, client_id="ingest-disk-test"))
    again.start()
    assert wait_for(lambda: store.list()[1] == 4), store.list()[1]
    assert [f["id"] for f in store.list()[0]] == [r.id for r in records] and not again.failed.is_set()
    again.stop()
    client.loop_stop()
    client.disconnect()


def test_two_workers_share_the_subscription_and_the_store(broker, tmp_path):
    """--shared-group: the broker spreads the frames over two ingest workers writing one store folder."""
    records = real_frames(60)
    workers, seen = [], {}
    for name in ("a", "b"):
        store = FrameStore(tmp_path / "store")
        seen[name] = []
        real_add = store.add
        store.add = lambda meta, jpeg, _add=real_add, _seen=seen[name]: (_seen.append(meta["id"]), _add(meta, jpeg))[1]
        worker = IngestService(store, BrokerSettings(host=broker.host, port=broker.port, client_id=f"ingest-{name}"),
                               shared_group="ingest")
        worker.start()
        workers.append(worker)
    assert all(w.connected.wait(10) for w in workers)
    publish(client := station(broker), records)
    check = FrameStore(tmp_path / "store")
    assert wait_for(lambda: check.list(limit=100)[1] == 60), check.list()[1]
    assert sorted(f["id"] for f in check.list(limit=100)[0]) == sorted(r.id for r in records)
    assert seen["a"] and seen["b"] and len(seen["a"]) + len(seen["b"]) == 60      # each frame went to one worker
    assert all(check.image_path(r.id).read_bytes() == r.blob for r in records)
    for w in workers:
        w.stop()
    client.loop_stop()
    client.disconnect()


def test_kill_9_and_downtime_lose_and_duplicate_nothing(broker, tmp_path):
    """Frames published while ingest is dead wait in the broker (persistent session); none is stored twice."""
    store_dir, log = tmp_path / "store", tmp_path / "ingest.log"
    records = real_frames(120)
    proc = ingest_process(store_dir, broker.port, log)
    try:
        assert wait_for(lambda: "subscribed to" in log.read_text(), 60), log.read_text()
        client = station(broker)
        publish(client, records[:40])
        assert wait_for(lambda: len(stored_ids(store_dir)) >= 10, 30)
        proc.send_signal(signal.SIGKILL)                 # mid-stream, no goodbye
        proc.wait(10)
        publish(client, records[40:80])                  # the central side is down: the broker queues them
        proc = ingest_process(store_dir, broker.port, log)
        publish(client, records[80:])
        assert wait_for(lambda: len(stored_ids(store_dir)) >= 120, 90), \
            f"{len(stored_ids(store_dir))} of 120 stored\n{log.read_text()[-3000:]}"
        time.sleep(1.0)                                  # any straggling redelivery would land now
        ids = stored_ids(store_dir)
        assert sorted(ids) == sorted(r.id for r in records) and len(ids) == len(set(ids))
        assert "session resumed" in log.read_text()
        client.loop_stop()
        client.disconnect()
    finally:
        proc.terminate()
        proc.wait(10)
    assert "frames stored" in log.read_text()           # SIGTERM: a clean stop with a summary


def test_cli_names_a_missing_tls_file(tmp_path):
    import subprocess
    import sys

    from loop_support import REPO

    proc = subprocess.run([sys.executable, "-m", "central", "ingest", "--store", str(tmp_path / "s"),
                           "--tls-ca", str(tmp_path / "nope.crt")], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and f"--tls-ca: {tmp_path / 'nope.crt'}: no such file" in proc.stderr


def test_empty_scenes_are_kept_apart_and_contexts_stored_as_checked_files(broker, tmp_path, caplog):
    import base64
    import json

    import cv2
    import numpy as np
    from agent_support import validate_message
    from loop_support import empty_scene_records, with_context

    from agent.outbox import Record

    store = FrameStore(tmp_path / "store")
    service = IngestService(store, BrokerSettings(host=broker.host, port=broker.port, client_id="ingest-test"))
    service.start()
    assert service.connected.wait(10)
    scenes = empty_scene_records(3)
    low = real_frames(3)
    good_ctx, bad_ctx = with_context(low[0]), with_context(low[1], base64.b64encode(b"\xff\xd8 not a jpeg").decode())
    for record in scenes + [good_ctx, bad_ctx]:
        validate_message("frame.v1", record.body)
    labelled_scene = json.loads(scenes[2].text)
    labelled_scene.update(id="00000000-0000-4000-9000-999999999999", label="Shirt")     # an empty scene with a label
    publish(client := station(broker), scenes[:2] + [good_ctx, bad_ctx, low[2]])
    publish(old := station(broker, v5=False), scenes[2:], v5=False)
    publish(client, [Record(9, labelled_scene["id"], "frame", json.dumps(labelled_scene), scenes[2].blob, 0.0)])
    assert wait_for(lambda: len(store.list_empty_scenes()) == 3 and store.list()[1] == 3
                    and store.counters().get("malformed") == 1)
    # the empty scenes never enter the review queue; they are listed per camera with their JPEG as sent
    assert {f["id"] for f in store.list(status="pending", limit=10)[0]} == {r.id for r in low}
    listed = store.list_empty_scenes(station="receiving-01", camera="dock-a")
    assert [s["id"] for s in listed] == [r.id for r in scenes]
    for scene, record in zip(listed, scenes):
        assert (store.root / scene["image"]).read_bytes() == record.blob
        assert (scene["width"], scene["height"], scene["trigger"]) == (160, 160, record.body["trigger"])
    assert store.list_empty_scenes(camera="dock-b") == []
    stats = store.stats()
    assert stats["empty_scenes"] == {"total": 3, "by_camera": {"ber1/receiving-01/dock-a": 3}}
    # the ROI context is a file beside its frame, decodable; a bad one is refused and counted, the frame kept
    context = store.context_path(good_ctx.id)
    assert context is not None and context.parent == store.image_path(good_ctx.id).parent
    assert context.read_bytes() == base64.b64decode(good_ctx.body["context"]["roi_jpeg_b64"])
    assert cv2.imdecode(np.frombuffer(context.read_bytes(), np.uint8), cv2.IMREAD_COLOR).shape == (160, 160, 3)
    assert "roi_jpeg_b64" not in store.get(good_ctx.id)["meta"]["context"]
    assert store.get(good_ctx.id)["meta"]["context"]["crop_box"] == [40, 30, 104, 94]
    assert store.context_path(bad_ctx.id) is None and store.context_path(low[2].id) is None
    assert store.counters()["context_refused"] == 1
    assert "field context.roi_jpeg_b64: not a decodable JPEG image" in caplog.text
    assert "frame.v1: field" in caplog.text
    service.stop()
    store.close()
    # a reopen keeps every file (none is taken for a crash's leftover)
    again = FrameStore(tmp_path / "store")
    assert again.reconciled == {"orphan_images_removed": 0, "rows_without_image": 0}
    assert again.context_path(good_ctx.id).is_file() and len(again.list_empty_scenes()) == 3
    for c in (client, old):
        c.loop_stop()
        c.disconnect()


def test_ingest_refuses_a_quota_sqlite_cannot_hold_naming_the_flag(tmp_path):
    """--max-bytes past SQLite's 64-bit integers was an OverflowError traceback from the store."""
    from central.cli import main

    with pytest.raises(SystemExit, match="--max-bytes 100000000000000000000: expected bytes from 0 to 2"):
        main(["ingest", "--store", str(tmp_path / "store"), "--max-bytes", "1" + "0" * 20])
    assert not (tmp_path / "store").exists()
