"""Engine cache: key, layout, hit/miss, staleness, atomic writes.

TensorRT cannot be installed on this machine (no GPU, no JetPack), so every test
passes ``FakeTensorRT`` as the builder: it stands for ``build_with_tensorrt``
and returns bytes that record what it was asked to build. The real builder's
TensorRT calls run only on a Jetson/GPU machine.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from deploy_support import ORIN, FakeTensorRT, make_bundle

from agent.engine_cache import (
    ENGINE_FILE,
    KEY_FILE,
    DeviceInfo,
    EngineCacheError,
    engine_key,
    ensure_engine,
    entries,
    lookup,
    probe_device,
    prune,
)
from contract.bundle import load_bundle


@pytest.fixture
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(autouse=True)
def stand_in_load_check(monkeypatch):
    """``ensure_engine`` loads every engine once with TensorRT where it is importable; the stand-in's bytes are no
    plan a real TensorRT loads, so on a machine that has TensorRT the check is a stand-in too (none here: a no-op)."""
    import agent.engine_cache as engine_cache

    monkeypatch.setattr(engine_cache, "check_with_tensorrt", lambda engine: None)


def test_first_start_builds_and_a_restart_with_the_same_key_does_not(bundle, tmp_path):
    # given an empty cache on an Orin
    cache, trt = tmp_path / "engines", FakeTensorRT()
    # when the station starts twice
    first = ensure_engine(bundle, cache, "fp16", max_batch=8, device=ORIN, builder=trt)
    second = ensure_engine(load_bundle(bundle.root), cache, "fp16", max_batch=8, device=ORIN, builder=trt)
    # then the engine was built once and the second start read it from the cache
    assert (first.source, second.source, trt.builds) == ("built", "cache", 1)
    assert first.path == second.path and first.path.name == ENGINE_FILE
    assert first.path.parent.name.startswith("fp16-sm87-trt10.3.0-")
    meta = json.loads((first.path.parent / KEY_FILE).read_text())
    assert meta["key"]["precision"] == "fp16" and meta["bundle"] == {"name": "demo", "version": "v1"}
    assert trt.requests[0].onnx_path.name == "model.fp32.onnx"
    assert trt.requests[0].input_spec.height == 48


@pytest.mark.parametrize("change", ["tensorrt", "gpu", "onnx", "precision", "batch", "input size"])
def test_any_change_of_the_key_rebuilds_and_never_serves_the_stale_engine(change, bundle, tmp_path):
    cache, trt = tmp_path / "engines", FakeTensorRT()
    old = ensure_engine(bundle, cache, "fp16", max_batch=8, device=ORIN, builder=trt)
    device, precision, batch, other = ORIN, "fp16", 8, bundle
    if change == "tensorrt":
        device = DeviceInfo("10.3.1", "8.7")          # JetPack upgrade
    elif change == "gpu":
        device = DeviceInfo("10.3.0", "7.2")          # cache volume moved to a Xavier
    elif change == "onnx":
        other = load_bundle(make_bundle(tmp_path / "m2", version="v2", onnx_bytes=b"retrained"))
    elif change == "precision":
        precision = "int8"
    elif change == "input size":     # the same ONNX bytes (symbolic H and W), a manifest asking for 64 px
        folder = make_bundle(tmp_path / "m3")
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["input"].update(height=64, width=64, resize_shorter=64)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        other = load_bundle(folder)
    else:
        batch = 16
    new = ensure_engine(other, cache, precision, max_batch=batch, device=device, builder=trt)
    assert new.source == "built" and trt.builds == 2
    assert new.path != old.path and new.key.digest() != old.key.digest()


def test_key_hashes_the_onnx_file_itself_not_the_manifest(bundle, tmp_path):
    key = engine_key(bundle, ORIN, "fp16", 8)
    (bundle.root / "model.fp32.onnx").write_bytes(b"swapped after verification")
    assert engine_key(bundle, ORIN, "fp16", 8).onnx_sha256 != key.onnx_sha256


def test_auto_precision_takes_int8_only_when_the_bundle_marks_it_deployable(tmp_path):
    trt = FakeTensorRT()
    good = load_bundle(make_bundle(tmp_path / "a"))
    gated = load_bundle(make_bundle(tmp_path / "b", int8="gated"))
    assert ensure_engine(good, tmp_path / "c", "auto", device=ORIN, builder=trt).key.precision == "int8"
    assert trt.requests[-1].onnx_path.name == "model.int8.onnx"
    assert ensure_engine(gated, tmp_path / "c", "auto", device=ORIN, builder=trt).key.precision == "fp16"
    with pytest.raises(EngineCacheError, match=r"manifest.json: field artifacts: no deployable onnx-int8.*gate failed"):
        ensure_engine(gated, tmp_path / "c", "int8", device=ORIN, builder=trt)


@pytest.mark.parametrize("damage", ["truncate", "flip", "key"])
def test_a_damaged_entry_is_discarded_and_rebuilt(damage, bundle, tmp_path):
    cache, trt = tmp_path / "engines", FakeTensorRT()
    path = ensure_engine(bundle, cache, "fp16", device=ORIN, builder=trt).path
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])      # power cut while an old version wrote in place
    elif damage == "flip":
        path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    else:
        meta = json.loads((path.parent / KEY_FILE).read_text())
        meta["key"]["tensorrt_version"] = "8.6.2"
        (path.parent / KEY_FILE).write_text(json.dumps(meta))
    again = ensure_engine(bundle, cache, "fp16", device=ORIN, builder=trt)
    assert again.source == "built" and trt.builds == 2 and again.path.read_bytes() == data


def test_a_failed_build_leaves_nothing_behind_and_the_next_start_builds(bundle, tmp_path):
    cache = tmp_path / "engines"
    with pytest.raises(RuntimeError, match="out of memory"):
        ensure_engine(bundle, cache, "fp16", device=ORIN, builder=FakeTensorRT(fail=RuntimeError("out of memory")))
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".lock-")] == []
    assert ensure_engine(bundle, cache, "fp16", device=ORIN, builder=FakeTensorRT()).source == "built"


def test_an_empty_engine_is_an_error_naming_the_onnx_file(bundle, tmp_path):
    with pytest.raises(EngineCacheError, match=r"model.fp32.onnx: the builder returned an empty engine"):
        ensure_engine(bundle, tmp_path / "e", "fp16", device=ORIN, builder=lambda req: b"")


def test_concurrent_starts_build_once(bundle, tmp_path):
    cache, trt = tmp_path / "engines", FakeTensorRT()
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        ensure_engine(bundle, cache, "fp16", device=ORIN, builder=trt))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert trt.builds == 1 and sorted(r.source for r in results) == ["built", "cache", "cache", "cache"]


def test_an_engine_shipped_in_the_bundle_for_this_device_is_used_as_is(tmp_path):
    shipped = [{"precision": "fp16", "tensorrt_version": "10.3.0", "compute_capability": "8.7"},
               {"precision": "fp16", "tensorrt_version": "10.3.0", "compute_capability": "9.0"}]
    bundle = load_bundle(make_bundle(tmp_path / "m", engines=shipped))
    trt = FakeTensorRT()
    got = ensure_engine(bundle, tmp_path / "e", "fp16", device=ORIN, builder=trt)
    assert got.source == "bundle" and trt.builds == 0 and got.path.parent == bundle.root
    # the same bundle on a JetPack with another TensorRT: the shipped engines do not match, build
    assert ensure_engine(bundle, tmp_path / "e", "fp16", device=DeviceInfo("10.4.0", "8.7"),
                         builder=trt).source == "built"


def test_prune_removes_entries_this_device_can_never_use(bundle, tmp_path):
    cache, trt = tmp_path / "engines", FakeTensorRT()
    ensure_engine(bundle, cache, "fp16", device=DeviceInfo("10.2.0", "8.7"), builder=trt)
    current = ensure_engine(bundle, cache, "fp16", device=ORIN, builder=trt)
    (cache / ".tmp-leftover-123").mkdir()
    removed = prune(cache, ORIN)
    assert len(removed) == 2
    assert [Path(e["folder"]) for e in entries(cache)] == [current.path.parent]
    assert lookup(cache, current.key) == current.path


def test_unwritable_cache_folder_is_named(bundle, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EngineCacheError, match=rf"{blocker}/engines: engine cache folder cannot be created"):
        ensure_engine(bundle, blocker / "engines", "fp16", device=ORIN, builder=FakeTensorRT())


def test_probing_the_device_without_tensorrt_says_so():
    pytest.importorskip("numpy")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this test is for machines without it")
    except ImportError:
        pass
    with pytest.raises(EngineCacheError, match="TensorRT is not installed"):
        probe_device()


def test_compute_capability_falls_back_to_nvidia_smi_without_cuda_python(tmp_path, monkeypatch):
    import agent.engine_cache as engine_cache

    def no_cuda_python(index):
        raise ImportError("cuda-python absent")

    fake = tmp_path / "nvidia-smi"     # stands for the driver's tool: prints what an Orin would report
    fake.write_text("#!/bin/sh\necho 8.7\n")
    fake.chmod(0o755)
    monkeypatch.setattr(engine_cache, "_cc_from_cuda_python", no_cuda_python)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert engine_cache.compute_capability() == "8.7"


# ---------------------------------------------------------------- damaged records, a bounded cache

@pytest.mark.parametrize("damage", [b"\xff\xd8\xff\xe0 flash garbage", b"[1, 2]", b'{"key": 5}', b"\0" * 300],
                         ids=["not-utf8", "a-list", "key-not-a-record", "zeros"])
def test_a_damaged_key_record_of_an_old_entry_never_stops_a_start(damage, tmp_path):
    from agent.startup import main

    # given: a cache holding an old model's engine whose key.json flash wear or a power cut turned into junk
    cache, trt = tmp_path / "engines", FakeTensorRT()
    old = ensure_engine(load_bundle(make_bundle(tmp_path / "old", version="v0", onnx_bytes=b"older")), cache, "fp16",
                        device=ORIN, builder=trt)
    (old.path.parent / KEY_FILE).write_bytes(damage)
    # when: the station starts on its bundle (backend tensorrt: every engine failure would be fatal)
    config = tmp_path / "station.yaml"
    config.write_text(json.dumps({
        "site": "ber1", "station": "receiving-01",
        "model": {"bundle": str(make_bundle(tmp_path / "cur", version="v1")), "backend": "tensorrt", "batch_size": 4,
                  "download_dir": str(tmp_path / "state" / "bundles")},
        "cameras": [{"id": "dock-a", "uri": "rtsp://10.20.1.11:554/stream1"}],
        "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite")}}))
    execs = []
    rc = main(["start", "--config", str(config), "--engine-cache", str(cache)], exec_fn=lambda *a: execs.append(a),
              device=ORIN, builder=trt, tensorrt_present=True)
    # then: it starts, the damaged entry is gone, the cache lists the good one
    assert rc == 0 and len(execs) == 1
    assert not old.path.parent.exists()
    assert [e["bundle"]["version"] for e in entries(cache)] == ["v1"]
    # and: asked for again, the damaged key is built afresh
    again = ensure_engine(load_bundle(make_bundle(tmp_path / "back", version="v0", onnx_bytes=b"older")), cache,
                          "fp16", device=ORIN, builder=trt)
    assert again.source == "built" and again.path == old.path


def test_prune_and_entries_skip_nothing_but_damaged_records(tmp_path):
    cache, trt = tmp_path / "engines", FakeTensorRT()
    kept = ensure_engine(load_bundle(make_bundle(tmp_path / "a", version="v1", onnx_bytes=b"one")), cache, "fp16",
                         device=ORIN, builder=trt)
    bad = ensure_engine(load_bundle(make_bundle(tmp_path / "b", version="v2", onnx_bytes=b"two")), cache, "fp16",
                        device=ORIN, builder=trt)
    (bad.path.parent / KEY_FILE).write_bytes(b"\x80\x81")
    (cache / "notes").mkdir()                              # not an entry: never touched
    assert [Path(e["folder"]) for e in entries(cache)] == [kept.path.parent]
    assert prune(cache, ORIN) == [bad.path.parent]
    assert (cache / "notes").is_dir() and lookup(cache, kept.key) == kept.path


def _version_bundle(tmp_path: Path, n: int):
    """Model update n: retrained weights, so its ONNX file (and its engine's key) is new."""
    return load_bundle(make_bundle(tmp_path / f"m{n}", version=f"v{n}", onnx_bytes=f"weights {n}".encode()))


def test_the_cache_keeps_the_engines_used_last_and_no_more(tmp_path):
    # given: a station that went through six model updates, then rolled back to v1
    cache, trt = tmp_path / "engines", FakeTensorRT()
    bundles = [_version_bundle(tmp_path, n) for n in range(1, 8)]
    for bundle in bundles[:6]:
        ensure_engine(bundle, cache, "fp16", device=ORIN, builder=trt, max_entries=3)
    assert sorted(e["bundle"]["version"] for e in entries(cache)) == ["v4", "v5", "v6"]
    assert ensure_engine(bundles[5], cache, "fp16", device=ORIN, builder=trt, max_entries=3).source == "cache"
    ensure_engine(bundles[3], cache, "fp16", device=ORIN, builder=trt, max_entries=3)      # v4 asked for again
    # when: the next update arrives
    ensure_engine(bundles[6], cache, "fp16", device=ORIN, builder=trt, max_entries=3)
    # then: the three used last stay (v5 was used before v6 and v4), engines of another device are prune's
    assert sorted(e["bundle"]["version"] for e in entries(cache)) == ["v4", "v6", "v7"]
    assert trt.builds == 7


def test_the_default_bound_holds_across_many_updates_and_a_restart(tmp_path):
    cache, trt = tmp_path / "engines", FakeTensorRT()
    for n in range(12):
        ensure_engine(_version_bundle(tmp_path, n), cache, "fp16", device=ORIN, builder=trt)
    prune(cache, ORIN)
    assert sorted(e["bundle"]["version"] for e in entries(cache)) == ["v10", "v11", "v8", "v9"]


def test_an_entry_another_holds_the_lock_of_is_not_evicted(tmp_path):
    from agent.engine_cache import key_lock

    cache, trt = tmp_path / "engines", FakeTensorRT()
    v2 = _version_bundle(tmp_path, 2)
    first = ensure_engine(_version_bundle(tmp_path, 1), cache, "fp16", device=ORIN, builder=trt, max_entries=1)
    with key_lock(cache, first.key):         # a lookup of v1 under way elsewhere (flock: another open file)
        second = ensure_engine(v2, cache, "fp16", device=ORIN, builder=trt, max_entries=1)
    assert first.path.is_file() and second.path.is_file()
    ensure_engine(v2, cache, "fp16", device=ORIN, builder=trt, max_entries=1)
    assert [Path(e["folder"]) for e in entries(cache)] == [second.path.parent]
