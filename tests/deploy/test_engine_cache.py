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
