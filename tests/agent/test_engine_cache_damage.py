"""The engine cache against engines TensorRT will not load and against lock files left behind.

TensorRT and a CUDA GPU cannot run here (no NVIDIA wheel host, no GPU), so ``tensorrt`` and ``cuda.bindings.runtime``
are stand-ins written after TensorRT 10.3's Python API (``Runtime.deserialize_cuda_engine`` gives None for a plan it
cannot read, "expecting library version ..., please rebuild"), with cuda-python's (error, value) tuples and host
memory playing device memory; the builder is a stand-in too (``build_with_tensorrt`` needs a GPU). The ONNX models,
ONNX Runtime, the start-up and the flock locks between real processes are real.
"""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from agent_support import make_onnx_bundle
from test_tensorrt_backend import _cuda_runtime, _Engine

from agent.backends import BackendError, create_backend
from agent.config import ModelConfig
from agent.engine_cache import (
    DeviceInfo,
    engine_key,
    ensure_engine,
    entries,
    load_failures,
    lookup,
    prune,
    write_entry,
)
from contract.bundle import artifact_entry, load_bundle

ORIN = DeviceInfo(tensorrt_version="10.3.0", compute_capability="8.7")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tensorrt(monkeypatch):
    """Installs the stand-ins; ``trt.readable(data)`` says which plans this "TensorRT" deserializes (default: the
    plans ``Builder`` makes), ``trt.loads`` counts the plans it was given."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = "10.3.0"
    trt.readable, trt.loads, trt.runtime_error = (lambda data: data.startswith(b"plan")), [], None
    # what the TensorRT backend tests' engine reads from its TensorRT: an engine that deserializes gets a context,
    # its optimization profile takes batches of 1 to 32, and it gives finite (zero) logits
    trt.profile_max, trt.no_context, trt.nan_outputs = 32, False, False
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dtype: np.float32

    class Runtime:
        def __init__(self, logger: object) -> None:
            if trt.runtime_error is not None:       # no GPU visible: CUDA cannot start
                raise trt.runtime_error

        def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
            trt.loads.append(bytes(data))
            return _Engine(trt) if trt.readable(bytes(data)) else None

    trt.Runtime = Runtime
    rt = _cuda_runtime()        # the CUDA runtime stand-in the TensorRT backend tests use
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = rt, bindings
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", rt)):
        monkeypatch.setitem(sys.modules, name, module)
    return trt


class Builder:
    """Stands for ``build_with_tensorrt``: counts builds, returns a plan the stand-in TensorRT reads."""

    def __init__(self) -> None:
        self.builds = 0

    def __call__(self, request) -> bytes:
        self.builds += 1
        return b"plan " + request.key.digest().encode()


def station_config(tmp_path: Path, bundle: Path, backend: str) -> Path:
    config = tmp_path / "station.yaml"
    config.write_text(json.dumps({
        "site": "ber1", "station": "receiving-01",
        "model": {"bundle": str(bundle), "backend": backend, "batch_size": 4,
                  "download_dir": str(tmp_path / "state" / "bundles")},
        "cameras": [{"id": "dock-a", "uri": "rtsp://10.20.1.11:554/stream1"}],
        "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite")}}))
    return config


def start_station(config: Path, cache: Path, builder: Builder, backend: str, bundle: Path):
    """``python -m agent.startup start`` then what the agent does with the engine it is handed: (exit code, backend
    name or the agent's error)."""
    from agent.startup import main

    execs: list[tuple] = []
    rc = main(["start", "--config", str(config), "--engine-cache", str(cache)], exec_fn=lambda *a: execs.append(a),
              device=ORIN, builder=builder, tensorrt_present=True)
    if rc != 0:
        return rc, None
    engine = execs[0][2].get("INVENTORY_AGENT_ENGINE")
    try:
        runs = create_backend(load_bundle(bundle), ModelConfig(bundle=bundle, backend=backend, batch_size=4,
                                                               intra_op_threads=1),
                              Path(engine) if engine else None, execs[0][2].get("INVENTORY_AGENT_ENGINE_PRECISION"))
    except BackendError as exc:
        return rc, f"agent cannot start: {exc}"
    return rc, runs.name


# ---------------------------------------------------------------- an engine TensorRT will not load

def test_a_cached_engine_tensorrt_rejects_is_removed_and_rebuilt_so_the_station_starts(tensorrt, tmp_path, caplog):
    """The cache served an engine whose sha256 matched its record but that TensorRT could not deserialize (built
    under another driver): with backend tensorrt the agent exited 2 at every start, a restart loop under systemd."""
    # given: a cache entry, intact by its sha256, holding a plan this TensorRT rejects
    folder = make_onnx_bundle(tmp_path / "b", classes=4, size=16)
    cache, builder = tmp_path / "engines", Builder()
    cache.mkdir()
    stale = write_entry(cache, engine_key(load_bundle(folder), ORIN, "fp16", 4), b"old driver's plan")
    config = station_config(tmp_path, folder, "tensorrt")

    # when: the station starts
    first = start_station(config, cache, builder, "tensorrt", folder)

    # then: the entry was removed (logged, counted) and built again, and the agent runs the new engine
    assert first == (0, "tensorrt:10.3.0") and builder.builds == 1
    assert stale.read_bytes().startswith(b"plan") and load_failures(cache) == 1
    assert f"{stale.parent}: removed from the engine cache, TensorRT cannot load its engine" in caplog.text
    # and: the next start takes it from the cache, nothing rebuilt
    assert start_station(config, cache, builder, "tensorrt", folder) == (0, "tensorrt:10.3.0")
    assert builder.builds == 1 and load_failures(cache) == 1


def test_when_tensorrt_rejects_even_a_fresh_engine_auto_runs_onnx_runtime_and_nothing_bad_is_cached(tensorrt, tmp_path):
    # given: a TensorRT that loads no plan at all (its own builds included) and a stale entry
    tensorrt.readable = lambda data: False
    folder = make_onnx_bundle(tmp_path / "b", classes=4, size=16)
    cache, builder = tmp_path / "engines", Builder()
    cache.mkdir()
    write_entry(cache, engine_key(load_bundle(folder), ORIN, "fp16", 4), b"old driver's plan")

    # when: the station starts with backend auto, then with backend tensorrt
    auto = start_station(station_config(tmp_path, folder, "auto"), cache, builder, "auto", folder)
    pinned = start_station(station_config(tmp_path, folder, "tensorrt"), cache, builder, "tensorrt", folder)

    # then: auto runs ONNX Runtime, tensorrt cannot start (exit 2, the start-up says why), and the cache keeps no
    # engine TensorRT rejected
    assert auto[0] == 0 and auto[1].startswith("onnxruntime")
    assert pinned == (2, None)
    assert entries(cache) == [] and load_failures(cache) == 3


def test_a_shipped_engine_tensorrt_rejects_is_passed_over_for_one_built_here(tensorrt, tmp_path):
    # given: a bundle shipping an engine for exactly this TensorRT and GPU that TensorRT will not load
    folder = make_onnx_bundle(tmp_path / "b", classes=4, size=16)
    (folder / "model.fp16.engine").write_bytes(b"a plan of another driver")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"].append(artifact_entry(folder / "model.fp16.engine", folder, role="tensorrt-engine",
                                                precision="fp16", deployable=True, tensorrt_version="10.3.0",
                                                compute_capability="8.7"))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    builder = Builder()
    # when
    got = ensure_engine(load_bundle(folder), tmp_path / "engines", "fp16", max_batch=4, device=ORIN, builder=builder)
    # then: an engine is built into the cache; the bundle's file stays as shipped (its hash is in the manifest)
    assert got.source == "built" and builder.builds == 1
    assert (folder / "model.fp16.engine").read_bytes() == b"a plan of another driver"


def test_an_engine_is_not_removed_when_tensorrt_itself_cannot_start(tensorrt, tmp_path):
    # given: a good cached engine, and a start where CUDA sees no GPU (a container run without --runtime nvidia)
    bundle = load_bundle(make_onnx_bundle(tmp_path / "b", classes=4, size=16))
    cache, builder = tmp_path / "engines", Builder()
    good = ensure_engine(bundle, cache, "fp16", max_batch=4, device=ORIN, builder=builder)
    tensorrt.runtime_error = RuntimeError("CUDA initialization failure with error: 100")
    # when / then: the error is raised, naming what failed, and the engine is kept for the next start
    with pytest.raises(RuntimeError, match="CUDA initialization failure"):
        ensure_engine(bundle, cache, "fp16", max_batch=4, device=ORIN, builder=builder)
    assert lookup(cache, good.key) == good.path and load_failures(cache) == 0


# ---------------------------------------------------------------- lock files

def lock_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(".lock-"))


def test_no_lock_file_is_left_behind_by_builds_hits_and_evictions(tmp_path):
    """Every key ever built left an empty .lock-<digest> file, one per model update, for ever."""
    cache, builder = tmp_path / "engines", Builder()
    for n in range(6):      # six model updates, each built, asked for again, then evicted (two kept)
        folder = make_onnx_bundle(tmp_path / f"m{n}", classes=4, size=16, version=str(n))
        bundle = load_bundle(folder)
        (folder / "model.fp32.onnx").write_bytes((folder / "model.fp32.onnx").read_bytes() + b" " * n)
        for _ in range(2):
            ensure_engine(bundle, cache, "fp16", max_batch=4, device=ORIN, builder=builder, max_entries=2)
    assert builder.builds == 6 and len(entries(cache)) == 2
    assert lock_files(cache) == []


def test_prune_sweeps_lock_files_nobody_holds_and_leaves_a_held_one(tmp_path):
    # given: lock files an earlier version left, and one another process holds now (a build under way)
    cache = tmp_path / "engines"
    cache.mkdir()
    for digest in ("0123456789abcdef", "fedcba9876543210"):
        (cache / f".lock-{digest}").touch()
    held = cache / ".lock-00000000000000aa"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(120)", str(held)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # when: a station starts and prunes
        prune(cache, ORIN)
        # then: only the held one is left
        assert lock_files(cache) == [held.name]
    finally:
        holder.kill()
        holder.wait()
    prune(cache, ORIN)
    assert lock_files(cache) == []


def test_a_process_that_opened_the_lock_file_before_it_was_removed_does_not_lock_beside_the_new_holder(
        tmp_path, monkeypatch):
    """The lock file goes when its holder lets go. A process that opened it just before then gets its flock on a
    file no longer linked, while a third process creates the file anew and locks that: both would build (or one
    remove what the other builds). The waiter must take the file linked now instead."""
    import fcntl
    import types as t

    import agent.engine_cache as engine_cache

    lock = tmp_path / ".lock-0123456789abcdef"
    first = engine_cache._acquire(lock, wait=True)
    third: list[int | None] = []

    def flock(fd: int, how: int) -> None:
        if not third:       # the waiter opened the old file; meanwhile the holder lets go
            third.append(None)
            engine_cache._release(lock, first)    # and a third process takes the key's lock on a new file
            third[0] = engine_cache._acquire(lock, wait=True)
        fcntl.flock(fd, how)

    monkeypatch.setattr(engine_cache, "fcntl", t.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX,
                                                                LOCK_NB=fcntl.LOCK_NB, LOCK_UN=fcntl.LOCK_UN))
    # when: the waiter tries the lock (without waiting, so the test cannot hang)
    got = engine_cache._acquire(lock, wait=False)
    # then: it does not hold it: the third process does
    assert got is None and third and third[0] is not None
    monkeypatch.undo()
    engine_cache._release(lock, third[0])
    assert not lock.exists()


BUILD_IN_A_PROCESS = r"""
import sys, time
from pathlib import Path
sys.path[:0] = [sys.argv[4], sys.argv[5]]
from agent.engine_cache import DeviceInfo, ensure_engine
from contract.bundle import load_bundle

def builder(request):
    with open(sys.argv[3], "a") as f:
        f.write("built\n")
    time.sleep(0.3)         # a build takes minutes: the others wait on the key's lock meanwhile
    return b"plan " + request.key.digest().encode()

print(ensure_engine(load_bundle(sys.argv[1]), sys.argv[2], "fp16", max_batch=4, device=DeviceInfo("10.3.0", "8.7"),
                    builder=builder).source)
"""


def test_processes_starting_at_once_build_one_engine_and_leave_no_lock_file(tmp_path):
    folder = make_onnx_bundle(tmp_path / "b", classes=4, size=16)
    cache, log = tmp_path / "engines", tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_IN_A_PROCESS, str(folder), str(cache), str(log),
                               str(REPO), str(Path(__file__).parent)], stdout=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(4)]
    sources = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert sources == ["built", "cache", "cache", "cache"]
    assert log.read_text().count("built") == 1 and lock_files(cache) == []
