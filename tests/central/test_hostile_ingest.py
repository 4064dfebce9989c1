"""Hostile frame messages against central ingest and the frame store (issue 13).

What one station can publish on its own ``frames`` topic must never stop ingest for every station:
a message refused for its content is acknowledged and quarantined (kept, counted, listed), never
redelivered; a JPEG's header is read before anything decodes it; non-finite numbers never enter the
store and never leave it. The property tests run generated malformed messages, interleaved with good
frames, through a real mosquitto and a real ``python -m central ingest`` process.
"""

from __future__ import annotations

import base64
import itertools
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from loop_support import REPO, ingest_process, real_frames
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from central.review.checks import jpeg_dimensions
from central.review.ingest import IngestService
from central.review.store import FrameStore, StoreError
from contract.broker import BrokerSettings
from contract.messages import dumps_finite

TOPIC = "inventory/ber1/receiving-01/frames"
[TEMPLATE] = real_frames(1)
_ids = itertools.count(1)


# ---------------------------------------------------------------- messages

def good_meta() -> dict:
    """A valid frame.v1 body with a fresh id (the agent's own shape, from ``real_frames``)."""
    n = next(_ids)
    return {**json.loads(TEMPLATE.text), "id": f"00000000-0000-4000-a000-{n:012d}", "seq": n, "frame_seq": n}


def v5_message(meta_text: str, jpeg: bytes, frame_id: str | None = None) -> tuple[bytes, Properties]:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("meta", meta_text)] + ([("id", frame_id)] if frame_id else [])
    return jpeg, props


def forged_sof(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) declaring ``width`` x ``height``; nothing else changed."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[:i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[i + 9:]


HUGE_INTS = st.sampled_from([2 ** 53, 2 ** 63, 2 ** 64, 10 ** 30, -(2 ** 70)])
NON_FINITE = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
WRONG_TYPES = [{"a": 1}, [1, 2], True]       # and a string where a number goes, a number where a string goes
LONG_TEXT = st.integers(1100, 60_000).map(lambda n: "x" * n)      # over every maxLength, under MQTT's 64 kB
LONE_SURROGATE = st.sampled_from(["\ud800", "ok\udfff", "\udcff" * 3])
NUMBER_FIELDS = ["seq", "frame_seq", "ts", "captured_at", "confidence"]
TEXT_FIELDS = ["label", "source_ref", "site"]


@st.composite
def bad_meta_text(draw) -> str:
    """frame.v1 metadata text with one hostile value: a huge int, a non-finite number, a wrong type, a long
    string, a lone surrogate, or JSON nested deeper than the parser goes."""
    meta = good_meta()
    kind = draw(st.sampled_from(["huge", "non-finite", "type", "long", "surrogate", "nested", "model"]))
    if kind == "huge":
        meta[draw(st.sampled_from(["seq", "frame_seq", "ts", "captured_at"]))] = draw(HUGE_INTS)
    elif kind == "non-finite":
        field = draw(st.sampled_from(NUMBER_FIELDS))
        meta[field] = "@@"
        return json.dumps(meta).replace('"@@"', draw(NON_FINITE))
    elif kind == "type":
        field = draw(st.sampled_from(NUMBER_FIELDS + TEXT_FIELDS + ["top_k", "jpeg", "model"]))
        meta[field] = draw(st.sampled_from(WRONG_TYPES + ["7" if field in NUMBER_FIELDS else 7]))
    elif kind == "long":
        meta[draw(st.sampled_from(["label", "source_ref", "camera"]))] = draw(LONG_TEXT)
    elif kind == "surrogate":
        meta[draw(st.sampled_from(["label", "source_ref"]))] = draw(LONE_SURROGATE)
    elif kind == "nested":
        return json.dumps(meta)[:-1] + ', "extra": ' + "[" * 5000 + "]" * 5000 + "}"
    else:
        meta["model"] = {**meta["model"], "version": draw(st.sampled_from([7, None, ["1"], "\ud800"]))}
    return json.dumps(meta)


@st.composite
def bad_message(draw) -> tuple[str, bytes, Properties | None]:
    """(form, payload, properties) of a frame message ingest must quarantine."""
    kind = draw(st.sampled_from(["meta", "random-bytes", "forged-sof", "jpeg-garbage", "envelope", "non-utf8"]))
    jpeg = TEMPLATE.blob
    if kind == "meta":
        return (kind, *v5_message(draw(bad_meta_text()), jpeg))
    if kind == "random-bytes":
        return kind, draw(st.binary(max_size=2048)), None
    if kind == "forged-sof":
        width, height = draw(st.sampled_from([(40000, 40000), (20000, 20000), (65535, 65535), (8193, 8192),
                                              (0, 64), (640, 480)]))
        forged = forged_sof(jpeg, width, height)
        meta = good_meta()
        meta["jpeg"] = {**meta["jpeg"], "bytes": len(forged)}
        if width * height > 8192 * 8192 and draw(st.booleans()):     # the metadata agrees with the forgery
            meta["jpeg"].update(width=width, height=height)
        return (kind, *v5_message(json.dumps(meta), forged, meta["id"]))
    if kind == "jpeg-garbage":
        garbage = b"\xff\xd8" + draw(st.binary(min_size=1, max_size=512))
        meta = good_meta()
        meta["jpeg"] = {**meta["jpeg"], "bytes": len(garbage)}
        return (kind, *v5_message(json.dumps(meta), garbage))
    if kind == "envelope":
        meta = good_meta()
        jpeg_b64 = draw(st.sampled_from(["not base64!", "QUJD=extra", 12345, None, "é" * 8, ["x"]]))
        envelope = {"envelope": "frame.v1", "meta": meta, "jpeg_b64": jpeg_b64}
        return kind, json.dumps(envelope).encode(), None
    envelope = json.dumps({"envelope": "frame.v1", "meta": good_meta(), "jpeg_b64": ""}).encode()
    return kind, envelope[:20] + b"\xff\xfe\xc3\x28" + envelope[20:], None


def good_message() -> tuple[str, bytes, Properties]:
    meta = good_meta()
    return (meta["id"], *v5_message(json.dumps(meta), TEMPLATE.blob, meta["id"]))


# ---------------------------------------------------------------- fixtures

def station(broker) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"hostile-station-{time.time_ns()}",
                         protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def counts(store: FrameStore) -> tuple[int, int]:
    return store.list()[1], store.counters().get("malformed", 0)


def fresh_store(tmp_path: Path, **kwargs) -> FrameStore:
    """A new, empty store for one hypothesis example (``tmp_path`` is shared by all examples of a test)."""
    return FrameStore(tempfile.mkdtemp(dir=tmp_path), **kwargs)


def offline_service(store: FrameStore) -> IngestService:
    """An ingest service that is never started: ``handle`` is the per-message path ``on_message`` runs."""
    return IngestService(store, BrokerSettings(host="127.0.0.1", port=1, client_id="hostile-unit"))


# ---------------------------------------------------------------- image bounds

def test_the_jpeg_header_gives_the_size_without_decoding():
    assert jpeg_dimensions(TEMPLATE.blob) == (64, 64)
    assert jpeg_dimensions(forged_sof(TEMPLATE.blob, 40000, 30000)) == (40000, 30000)
    assert jpeg_dimensions(b"\xff\xd8") is None and jpeg_dimensions(b"GIF89a") is None


def test_a_tiny_jpeg_declaring_20000_px_is_refused_before_it_is_decoded(tmp_path):
    """The probe's 2 kB JPEG declaring 20000 x 20000 cost 2.3 GB and was stored; now it costs nothing."""
    store = FrameStore(tmp_path / "store")
    forged = forged_sof(TEMPLATE.blob, 20000, 20000)
    meta = {**good_meta(), "jpeg": {**TEMPLATE.body["jpeg"], "width": 20000, "height": 20000, "bytes": len(forged)}}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(StoreError, match=rf"frame {meta['id']}: the payload: the JPEG header declares 20000x20000 "
                                         rf"px, more than 67108864 pixels; refused before decoding"):
        store.add(meta, forged)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 300, f"refusing the frame took {grown_mb:.0f} MB"
    assert store.list()[1] == 0 and not list((tmp_path / "store").rglob("*.jpg"))


@settings(max_examples=60)
@given(width=st.integers(1, 65535), height=st.integers(1, 65535), agree=st.booleans())
def test_a_forged_header_is_refused_by_its_size_or_its_disagreement_with_the_metadata(tmp_path, width, height,
                                                                                      agree):
    store = fresh_store(tmp_path, max_pixels=4096 * 4096)
    forged = forged_sof(TEMPLATE.blob, width, height)
    meta = good_meta()
    meta["jpeg"] = {**meta["jpeg"], "bytes": len(forged), **({"width": width, "height": height} if agree else {})}
    if (width, height) == (64, 64) or (agree and width * height <= 4096 * 4096):
        # within bounds and as declared: decoded (libjpeg pads a short image), stored or refused as undecodable
        try:
            assert store.add(meta, forged).outcome == "stored"
        except StoreError as exc:
            assert "not a decodable JPEG image" in str(exc)
        return
    with pytest.raises(StoreError) as refused:
        store.add(meta, forged)
    text = str(refused.value)
    assert text.startswith(f"frame {meta['id']}: ")
    if width * height > 4096 * 4096:
        assert f"declares {width}x{height} px, more than {4096 * 4096} pixels" in text
    elif not agree:
        assert f"field jpeg.width/height: 64x64 but the JPEG's header declares {width}x{height} px" in text
    store.close()


# ---------------------------------------------------------------- one message, no broker

@settings(max_examples=150)
@given(message=bad_message())
def test_every_hostile_message_is_quarantined_by_name_and_the_next_good_one_stored(tmp_path, message):
    store = fresh_store(tmp_path)
    service = offline_service(store)
    kind, payload, props = message
    assert service.handle(TOPIC, payload, props) == "quarantined", kind
    [entry], kept = store.list_quarantine(payload=True)
    assert kept == 1 and store.counters()["malformed"] == 1
    assert entry["topic"] == TOPIC and entry["bytes"] == len(payload)
    assert base64.b64decode(entry["payload_b64"]) == payload[:64 * 1024]
    assert entry["reason"] and "Traceback" not in entry["reason"]
    if props is not None:
        assert [k for k, _ in entry["properties"]] == [k for k, _ in props.UserProperty]
    dumps_finite(entry)                                     # what the API and CLI show is strict JSON
    frame_id, payload, props = good_message()
    assert service.handle(TOPIC, payload, props) == "stored"
    assert [f["id"] for f in store.list()[0]] == [frame_id]
    store.close()


@pytest.mark.parametrize("field, value, expected", [
    ("seq", 2 ** 64, "field seq"),
    ("ts", "1e999", "1e999 is outside the range of a finite number"),
    ("confidence", "NaN", "NaN is not a JSON number"),
    ("captured_at", 10 ** 20, "field captured_at"),
    ("label", "x" * 5000, "field label"),
    ("track", "../../etc/passwd", "field track"),
])
def test_the_reason_names_the_field(tmp_path, field, value, expected):
    store = FrameStore(tmp_path / "store")
    meta = good_meta()
    meta[field] = "@@"
    text = json.dumps(meta).replace('"@@"', value if isinstance(value, str) and value in ("1e999", "NaN")
                                    else json.dumps(value))
    assert offline_service(store).handle(TOPIC, *v5_message(text, TEMPLATE.blob)) == "quarantined"
    assert expected in store.list_quarantine()[0][0]["reason"]


def test_values_that_pass_no_schema_are_refused_by_the_store_not_by_sqlite(tmp_path):
    """The store is called by more than ingest: a seq beyond 64 bits, a lone surrogate, a NaN are StoreErrors
    naming the field, never an OverflowError or UnicodeEncodeError from inside the database driver."""
    store = FrameStore(tmp_path / "store")
    for field, value, expected in [("seq", 2 ** 63, "field seq: an integer of 64 bits"),
                                   ("label", "\ud800", "field label: not valid Unicode text"),
                                   ("confidence", float("nan"), "field confidence: nan is not a finite number"),
                                   ("ts", 10 ** 400, "field ts: a number too large for a float"),
                                   ("model", "fashion", "field model: expected an object"),
                                   ("top_k", [{"label": "a", "p": float("inf")}], "field top_k")]:
        meta = {**good_meta(), field: value}
        with pytest.raises(StoreError, match=expected):
            store.add(meta, TEMPLATE.blob)
    assert store.list()[1] == 0


def test_a_payload_over_the_limit_is_quarantined_without_being_parsed(tmp_path):
    store = FrameStore(tmp_path / "store")
    service = IngestService(store, BrokerSettings(host="127.0.0.1", port=1, client_id="hostile-unit"),
                            max_payload_bytes=100_000)
    meta = good_meta()
    big = TEMPLATE.blob + b"\0" * 200_000
    assert service.handle(TOPIC, *v5_message(json.dumps(meta), big)) == "quarantined"
    [entry], _ = store.list_quarantine()
    assert entry["reason"] == f"the payload has {len(big)} bytes, more than --max-payload-bytes 100000"
    assert entry["kept_bytes"] == 64 * 1024 and entry["bytes"] == len(big)


def test_user_properties_over_the_limit_are_quarantined_without_being_parsed(tmp_path):
    """The broker's message_size_limit bounds the payload only: metadata of 200 kB (in the meta user property)
    over a 100 kB limit is refused by its size, before the JSON parser sees it."""
    store = FrameStore(tmp_path / "store")
    service = IngestService(store, BrokerSettings(host="127.0.0.1", port=1, client_id="hostile-unit"),
                            max_payload_bytes=100_000)
    meta = {**good_meta(), "source_ref": "x" * 200_000}
    jpeg, props = v5_message(json.dumps(meta), TEMPLATE.blob)
    assert service.handle(TOPIC, jpeg, props) == "quarantined"
    [entry], _ = store.list_quarantine()
    assert entry["reason"].startswith("the user properties have ") and "more than --max-payload-bytes 100000" in \
        entry["reason"]
    _, payload, props = good_message()
    assert service.handle(TOPIC, payload, props) == "stored"          # and the next good one is stored


def test_a_quarantined_message_keeps_64k_characters_of_its_user_properties_however_many_it_has(tmp_path):
    """Given refused messages with thousands of 16 kB user properties (MQTT bounds only the whole packet), when
    they are quarantined, then each keeps at most 64 k characters of them, with how many it left out, so that the
    1,000 messages the quarantine keeps stay within megabytes, not gigabytes."""
    store = FrameStore(tmp_path / "store")
    many = [(f"k{i}", "v" * 16_000) for i in range(300)]
    store.quarantine(TOPIC, b"junk", many, "a test")
    store.quarantine(TOPIC, b"junk", [("meta", "{}"), ("id", "x")], "a small one")
    (few, crowded), _ = store.list_quarantine()
    assert few["properties"] == [["meta", "{}"], ["id", "x"]]
    kept = crowded["properties"]
    assert sum(len(k) + len(v) for k, v in kept) <= 64 * 1024 + 64
    assert kept[0] == ["k0", "v" * 16_000] and kept[-1][0] == "(not kept)"
    assert kept[-1][1] == f"{300 - (len(kept) - 1)} more user properties"
    with sqlite3.connect(tmp_path / "store" / "frames.sqlite") as db:
        assert db.execute("SELECT MAX(length(properties)) FROM quarantine").fetchone()[0] < 70_000


def test_the_quarantine_keeps_the_newest_and_counts_them_all(tmp_path, monkeypatch):
    from central.review import store as store_module

    monkeypatch.setattr(store_module, "QUARANTINE_MAX_ROWS", 5)
    store = FrameStore(tmp_path / "store")
    for i in range(12):
        store.quarantine(TOPIC, f"payload {i}".encode(), [], f"reason {i}")
    entries, kept = store.list_quarantine()
    assert kept == 5 and [e["reason"] for e in entries] == [f"reason {i}" for i in range(11, 6, -1)]
    assert store.counters()["malformed"] == 12


# ---------------------------------------------------------------- non-finite numbers out

def test_a_stored_row_with_nan_never_makes_the_queue_invalid_json(tmp_path):
    """A row an older version stored with NaN and Infinity (json.dumps wrote them): the queue lists it with
    null there, and every other frame with it."""
    store = FrameStore(tmp_path / "store")
    records = real_frames(3)
    for r in records:
        store.add(r.body, r.blob)
    poisoned = records[1].id
    with sqlite3.connect(tmp_path / "store" / "frames.sqlite") as db:
        meta = {**records[1].body, "confidence": float("nan"), "ts": float("inf")}
        db.execute("UPDATE frames SET meta = ?, confidence = ?, top_k = ?, margin = ? WHERE id = ?",
                   (json.dumps(meta), float("inf"), json.dumps([{"label": "Bag", "p": float("nan")}]),
                    float("-inf"), poisoned))
        db.execute("UPDATE frames SET meta = ? WHERE id = ?", ("{not json", records[2].id))
    frames, total = store.list(limit=10)
    assert total == 3 and [f["id"] for f in frames] == [r.id for r in records]
    json.loads(dumps_finite({"frames": frames}))          # strict JSON, whatever was stored
    row = store.get(poisoned)
    assert row["confidence"] is None and row["margin"] is None and row["top_k"] == [{"label": "Bag", "p": None}]
    assert row["meta"]["confidence"] is None and row["meta"]["ts"] is None
    assert store.get(records[2].id)["meta"] == {}


# ---------------------------------------------------------------- visible: API and CLI

def test_the_quarantine_is_listed_by_the_api_and_the_cli(tmp_path):
    import urllib.request

    from central.review.api import ReviewServer

    store = FrameStore(tmp_path / "store")
    meta = good_meta()
    meta["seq"] = 2 ** 64
    offline_service(store).handle(TOPIC, *v5_message(json.dumps(meta), TEMPLATE.blob))
    srv = ReviewServer(store, "127.0.0.1", 0, token="q-token").start()
    try:
        req = urllib.request.Request(srv.url + "api/quarantine", headers={"Authorization": "Bearer q-token"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read())
    finally:
        srv.stop()
    assert body["kept"] == 1 and body["refused"] == 1
    [entry] = body["messages"]
    assert entry["topic"] == TOPIC and "field seq" in entry["reason"] and "payload_b64" not in entry
    store.close()
    proc = subprocess.run([sys.executable, "-m", "central", "quarantine", "--store", str(tmp_path / "store")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "1 frame message(s) refused, the newest 1 kept in quarantine" in proc.stdout
    assert "#1 " in proc.stdout and TOPIC in proc.stdout and "field seq" in proc.stdout


# ---------------------------------------------------------------- through mosquitto and a running ingest

@pytest.mark.mqtt
def test_poison_messages_through_a_real_broker_never_stop_ingest_nor_come_back(broker, tmp_path):
    """Batches of generated hostile messages interleaved with good frames, published to mosquitto and taken by
    a running ``python -m central ingest``: it keeps running, stores every good frame, quarantines every bad
    one; restarted on the same session, it gets none of them again."""
    store_dir, log = tmp_path / "store", tmp_path / "ingest.log"
    proc = ingest_process(store_dir, broker.port, log)
    client = station(broker)
    try:
        assert wait_for(lambda: "subscribed to" in log.read_text()), log.read_text()
        store = FrameStore(store_dir)
        good_ids: list[str] = []

        @settings(max_examples=8, phases=[Phase.explicit, Phase.generate])    # no shrinking through a broker
        @given(batch=st.lists(bad_message(), min_size=4, max_size=20), goods_every=st.integers(1, 4))
        def batches(batch, goods_every):
            stored, refused = counts(store)
            sent_good = 0
            for i, (_kind, payload, props) in enumerate(batch):
                client.publish(TOPIC, payload, qos=1, properties=props).wait_for_publish(10)
                if i % goods_every == 0:
                    frame_id, good, good_props = good_message()
                    client.publish(TOPIC, good, qos=1, properties=good_props).wait_for_publish(10)
                    good_ids.append(frame_id)
                    sent_good += 1
            assert wait_for(lambda: counts(store) == (stored + sent_good, refused + len(batch)), 30), \
                f"{counts(store)} != {(stored + sent_good, refused + len(batch))}\n{log.read_text()[-3000:]}"
            assert proc.poll() is None, log.read_text()[-3000:]

        batches()
        refused = store.counters()["malformed"]
        assert sorted(f["id"] for f in store.list(limit=1000)[0]) == sorted(good_ids)
        assert store.list_quarantine()[1] == refused

        proc.terminate()                                   # restart on the same persistent session
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        proc = ingest_process(store_dir, broker.port, log)
        frame_id, good, good_props = good_message()        # queued behind anything the broker would redeliver
        client.publish(TOPIC, good, qos=1, properties=good_props).wait_for_publish(10)
        assert wait_for(lambda: any(f["id"] == frame_id for f in store.list(limit=1000)[0])), log.read_text()[-3000:]
        assert store.counters()["malformed"] == refused and store.list_quarantine()[1] == refused
        assert "session resumed" in log.read_text() and proc.poll() is None
        store.close()
    finally:
        client.loop_stop()
        client.disconnect()
        proc.terminate()
        proc.wait(30)
