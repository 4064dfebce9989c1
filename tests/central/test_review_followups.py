"""Follow-ups to the review side (2026-12-07): ingest's MQTT callback errors reach the review page, enrolments from
two review servers on one models folder are serialised, and a labels export reads the store without writing it.

Real stores of real frames, the real CLI in subprocesses, a real mosquitto, real ONNX Runtime enrolments of the
colour bundle."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from loop_support import LABELS, REPO, real_frames

from agent.mqtt import encode
from central.review.api import ReviewServer
from central.review.ingest import IngestService
from central.review.labels import CSV_NAME
from central.review.store import DB_NAME, FrameStore, StoreError
from contract.broker import BrokerSettings


def central(argv: list[str], *, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "central", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def without_dac_override() -> list[str]:
    """The command prefix under which a folder's mode binds (root writes in any folder)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a folder's mode cannot be made to bind")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root``: its mtime and bytes."""
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def exported_ids(out: Path) -> list[str]:
    with open(out / CSV_NAME, encoding="utf-8", newline="") as fh:
        return sorted(row["frame_id"] for row in csv.DictReader(fh))


# ---------------------------------------------------------------- 3. a labels export reads, never writes, the store

def test_an_export_beside_a_running_writer_changes_no_file_of_the_store_and_reads_its_newest_decisions(tmp_path):
    """Opening the store to export it reconciled, migrated and checkpointed it: an image without a row (a write the
    ingest service has not finished, as far as the export can tell) was deleted, and the index and its WAL were
    rewritten under the running writer. /tmp/review-followups/repro_export_ro2.py. Now the export leaves every byte
    and mtime as it was (SQLite's shared-memory index, ``-shm``, aside: every reader of a WAL store takes its read
    mark there), and still exports the decision the writer committed last (in its WAL, not yet checkpointed)."""
    root = tmp_path / "store"
    writer = FrameStore(root, labels=LABELS)
    try:
        records = real_frames(4)
        for record in records:
            writer.add(record.body, record.blob)
        for record in records[:3]:
            writer.review(record.id, "label", label="Bag", reviewer="ana")
        (root / "images" / "in-flight.jpg").write_bytes(b"\xff\xd8 a frame ingest is still writing")
        assert (root / f"{DB_NAME}-wal").stat().st_size > 0        # the newest decisions are in the WAL
        before = snapshot(root)
        done = central(["labels", "export", "--store", str(root), "--out", str(tmp_path / "out")])
        after = snapshot(root)
    finally:
        writer.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert exported_ids(tmp_path / "out") == sorted(r.id for r in records[:3])
    assert set(after) == set(before), "files added or removed"
    changed = [name for name in before if before[name] != after[name] and name != f"{DB_NAME}-shm"]
    assert changed == []


def test_an_export_from_a_store_folder_that_cannot_be_written_runs_and_changes_nothing(tmp_path):
    """A read-only store folder (another user's, a read-only mount, a backup): the export stopped, "the frame store
    cannot be opened (attempt to write a readonly database)", because opening the store writes. As root the
    folder's mode binds only without CAP_DAC_OVERRIDE (``setpriv``)."""
    prefix = without_dac_override()
    root = tmp_path / "store"
    store = FrameStore(root, labels=LABELS)
    records = real_frames(3)
    for record in records:
        store.add(record.body, record.blob)
        store.review(record.id, "label", label="Bag", reviewer="ana")
    store.close()
    before = snapshot(root)
    folders = [root, *(p for p in root.rglob("*") if p.is_dir())]
    try:
        for folder in folders:
            folder.chmod(0o555)
        done = central(["labels", "export", "--store", str(root), "--out", str(tmp_path / "out")], prefix=prefix)
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert done.returncode == 0, done.stdout + done.stderr
    assert exported_ids(tmp_path / "out") == sorted(r.id for r in records)
    assert snapshot(root) == before


def test_a_missing_store_or_one_from_before_a_column_is_refused_naming_the_file(tmp_path):
    missing = tmp_path / "nothing-here"
    done = central(["labels", "export", "--store", str(missing), "--out", str(tmp_path / "out")])
    assert done.returncode == 2 and f"{missing / DB_NAME}: no such file" in done.stderr, done.stderr
    assert not missing.exists() and not (tmp_path / "out").exists()

    old = tmp_path / "old"
    FrameStore(old).close()
    import sqlite3

    db = sqlite3.connect(old / DB_NAME)
    db.execute("DROP INDEX frames_track")
    db.execute("ALTER TABLE frames DROP COLUMN track")
    db.close()
    before = snapshot(old)
    with pytest.raises(StoreError, match=r"frames\.sqlite: written by an older version \(no column track\)"):
        FrameStore.open_read_only(old)
    after = snapshot(old)       # SQLite's own empty WAL and shared-memory index may be made beside it, nothing else
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) <= {f"{DB_NAME}-wal", f"{DB_NAME}-shm"}
    assert after.get(f"{DB_NAME}-wal", (0, b""))[1] == b""


# ---------------------------------------------------------------- 1. ingest's MQTT callback errors on the review page

def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def publish(port: int, messages) -> None:
    """QoS 1 publishes, each acknowledged by the broker; ``messages``: (topic, payload, properties)."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-pub-{os.getpid()}-{time.time_ns()}",
                         protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload, props in messages:
            client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def review_stats(srv: ReviewServer) -> dict:
    with urllib.request.urlopen(srv.url + "api/stats", timeout=30) as resp:
        return json.loads(resp.read())


def test_an_ingest_callback_error_is_counted_in_the_store_and_shown_by_the_review_servers_stats(broker, tmp_path):
    """Ingest counted its MQTT callback errors in its own process only (``IngestService.stats``, its log at stop):
    the review server, which reads the store, showed nothing, so a reviewer saw an empty queue and no sign that
    ingest was failing. /tmp/review-followups/repro_callback_errors.py. The exception is injected (the PUBACK of the
    first frame cannot be sent), as in test_ingest_review.py; now the store counts it, the review server's
    /api/stats answers it while ingest runs, and stopping ingest counts nothing twice."""
    records = real_frames(2)
    ingest_store = FrameStore(tmp_path / "store")
    service = IngestService(ingest_store, BrokerSettings(host=broker.host, port=broker.port,
                                                         client_id="ingest-followup-test"))
    real_ack, acks = service.client.ack, []

    def ack_fails_once(mid, qos):
        acks.append(mid)
        if len(acks) == 1:
            raise RuntimeError("injected: the PUBACK could not be sent")
        return real_ack(mid, qos)

    service.client.ack = ack_fails_once
    review_store = FrameStore(tmp_path / "store")           # the review server's own open of the store
    srv = ReviewServer(review_store, "127.0.0.1", 0, no_auth=True).start()
    try:
        assert review_stats(srv)["mqtt_callback_errors"] == {"total": 0, "by_callback": {}, "last_at": None}
        service.start()
        assert service.connected.wait(30)
        publish(broker.port, [("inventory/ber1/receiving-01/frames", *encode(r, True)) for r in records])
        assert wait_for(lambda: review_stats(srv)["mqtt_callback_errors"]["total"] == 1)
        stats = review_stats(srv)
        assert stats["mqtt_callback_errors"]["by_callback"] == {"on_message": 1}
        assert abs(stats["mqtt_callback_errors"]["last_at"] - time.time()) < 600
        assert stats["counters"]["mqtt_callback_errors:on_message"] == 1
        service.stop()
        assert review_stats(srv)["mqtt_callback_errors"]["by_callback"] == {"on_message": 1}
    finally:
        service.stop()
        srv.stop()
        review_store.close()
        ingest_store.close()


def test_a_store_that_cannot_take_the_count_is_logged_once_and_the_count_is_tried_again(tmp_path, caplog):
    store = FrameStore(tmp_path / "store")
    service = IngestService(store, BrokerSettings(port=1))
    service.client.hook_errors["on_message"] += 2
    real = store.count_callback_errors

    def full(new):
        raise OSError(28, "No space left on device")

    store.count_callback_errors = full
    service.count_callback_errors()
    service.count_callback_errors()
    assert caplog.text.count("2 MQTT callback error(s) not counted in the store") == 1
    store.count_callback_errors = real
    service.count_callback_errors()
    service.client.hook_errors["on_connect"] += 1
    service.count_callback_errors()
    assert store.callback_errors()["by_callback"] == {"on_connect": 1, "on_message": 2}
    store.close()


# ---------------------------------------------------------------- 2. one enrolment at a time per models folder

@pytest.fixture
def two_servers(tmp_path):
    """The colour bundle, its gate images, frames of yellow and magenta, and two enrollers on its one models folder
    (two review servers, each with its own store), as tests/central/loop/test_enrol_review.py builds them."""
    from agent_support import OPEN_SET_COLOURS, make_open_set_bundle
    from test_enrol_review import FolderEnroller, _colour_frames

    from central.review.enrol import EnrolSettings

    bundle = make_open_set_bundle(tmp_path / "models")
    gate = tmp_path / "gate"
    for k, (name, rgb) in enumerate(OPEN_SET_COLOURS.items()):
        _colour_frames(gate / name, rgb, 150, seed=k + 10)
    frames = tmp_path / "frames"
    _colour_frames(frames / "yellow", (230, 220, 40), 10, seed=99)
    _colour_frames(frames / "magenta", (220, 40, 220), 10, seed=7)
    stores = [FrameStore(tmp_path / f"store-{n}") for n in ("a", "b")]
    enrollers = [FolderEnroller(store, EnrolSettings(bundle=bundle, gate_data=gate, max_drop_points=3.0), frames)
                 for store in stores]
    yield bundle, enrollers
    for store in stores:
        store.close()


def _parent(bundle_dir) -> str:
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    return manifest["provenance"]["enrolled_from"]["version"]


def test_two_servers_enrolling_at_once_build_one_chain_the_second_told_busy(two_servers, monkeypatch):
    """Server A has chosen the version it builds on (1) and is computing; server B enrols meanwhile. Both built
    on 1: two versions enrolled onto 1, the chain follows the newer, and the other class was gone from every
    later version. /tmp/review-followups/repro_enrol_race.py. Now B is told busy (409 on the page) while A holds
    the models folder's lock, and B's next try builds on A's version. The overlap is made, not timed: A's
    enrolment waits inside ``trainer.enroll.enroll`` until B's attempt has ended."""
    import threading

    import trainer.enroll
    from central.review.enrol import EnrolBusy, latest_enrolled

    bundle, (a, b) = two_servers
    real, a_inside, b_ended = trainer.enroll.enroll, threading.Event(), threading.Event()

    def enroll(cfg):
        if cfg.label == "yellow":
            a_inside.set()
            assert b_ended.wait(300), "server B's attempt never ended"
        return real(cfg)

    monkeypatch.setattr(trainer.enroll, "enroll", enroll)
    results: dict[str, object] = {}

    def server(name, enroller, label) -> None:
        try:
            results[name] = enroller.enrol(label, "ana")
        except Exception as exc:
            results[name] = exc
        finally:
            if name == "b":
                b_ended.set()

    first = threading.Thread(target=server, args=("a", a, "yellow"))
    first.start()
    assert a_inside.wait(300)
    second = threading.Thread(target=server, args=("b", b, "magenta"))
    second.start()
    second.join(300)
    first.join(300)
    assert isinstance(results["a"], dict) and _parent(results["a"]["bundle"]) == "1", results
    assert isinstance(results["b"], EnrolBusy), results
    assert "another enrolment is writing into" in str(results["b"])

    again = b.enrol("magenta", "ana")
    assert _parent(again["bundle"]) == results["a"]["version"]
    assert again["labels"][-2:] == ["yellow", "magenta"]
    assert str(latest_enrolled(bundle, None)) == again["bundle"]


def test_a_lock_held_by_another_process_is_answered_409_and_nothing_is_written(two_servers, tmp_path):
    """The lock is the models folder's, not the server's: a second process holding it (another review server
    mid-enrolment) makes the page's enrolment answer 409 and write nothing; a dry run still answers; once the
    other process has ended (the kernel drops its flock however it ended), the enrolment goes through."""
    bundle, (a, _b) = two_servers
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from central.review.enrol import models_dir_lock\n"
         "with models_dir_lock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()",
         str(bundle.parent.parent)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    srv = ReviewServer(a.store, "127.0.0.1", 0, no_auth=True, enroller=a).start()
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in bundle.parent.iterdir())
        status, body = post(srv.url + "api/enrol", {"label": "yellow", "reviewer": "ana"})
        assert status == 409 and "another enrolment is writing into" in body["error"], body
        assert sorted(p.name for p in bundle.parent.iterdir()) == before
        status, body = post(srv.url + "api/enrol", {"label": "yellow", "dry_run": True})
        assert status == 200 and body["written"] is False, body
        holder.communicate("", timeout=60)
        status, body = post(srv.url + "api/enrol", {"label": "yellow", "reviewer": "ana"})
        assert status == 200 and body["labels"][-1] == "yellow", body
    finally:
        srv.stop()
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
