"""The TensorRT backend's behaviour around the engine, and how the agent falls back from it.

TensorRT and a CUDA GPU cannot run here (no NVIDIA wheel host, no GPU), so ``tensorrt`` and
``cuda.bindings.runtime`` are stand-ins written after TensorRT 10.3's Python API (pyCore.cpp: a null
engine from ``deserialize_cuda_engine``, a null context from ``create_execution_context`` when the GPU is
out of memory, ``set_input_shape`` False outside the optimization profile, ``get_tensor_profile_shape``
giving [min, opt, max]) and cuda-python's (error, value) tuples; host memory plays device memory. The ONNX
models and ONNX Runtime sessions are real.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import subprocess
import sys
import types

import numpy as np
import pytest
from agent_support import make_onnx_bundle

from agent.backends import BackendError, create_backend
from agent.backends.artifact_choice import measure_ms, pick_precision
from agent.config import ModelConfig
from agent.engine_cache import explicit_batch_flags, prune
from contract.bundle import artifact_entry, load_bundle


class _Context:
    def __init__(self, engine: "_Engine") -> None:
        self.engine, self.shapes, self.addresses = engine, [], {}

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if not 1 <= shape[0] <= self.engine.profile_max:
            return False
        self.shapes.append(shape)
        return True

    def execute_async_v3(self, stream: int) -> bool:
        if self.engine.trt.nan_outputs:     # an FP16 engine whose activations overflow: NaN logits
            logits = np.full((self.shapes[-1][0], 4), np.nan, np.float32)
            ctypes.memmove(self.addresses["logits"], logits.ctypes.data, logits.nbytes)
        return True         # else the outputs stay zeros: finite logits


class _Engine:
    def __init__(self, trt: "types.ModuleType") -> None:
        self.trt = trt
        self.profile_max = trt.profile_max
        self.io = [("input", "in", (-1, 3, 16, 16)), ("logits", "out", (-1, 4))]
        self.num_io_tensors = len(self.io)
        self.contexts: list[_Context] = []

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def get_tensor_mode(self, name: str) -> str:
        return {n: m for n, m, _ in self.io}[name]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return {n: s for n, _, s in self.io}[name]

    def get_tensor_dtype(self, name: str) -> str:
        return "float"

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(1, 3, 16, 16), (8, 3, 16, 16), (self.profile_max, 3, 16, 16)]

    def create_execution_context(self) -> _Context | None:
        if self.trt.no_context:
            return None
        self.contexts.append(_Context(self))
        return self.contexts[-1]


def _tensorrt(version: str = "10.3.0", *, deserialize: bool = True, no_context: bool = False,
              profile_max: int = 32, nan_outputs: bool = False) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version
    trt.no_context, trt.profile_max, trt.engines, trt.nan_outputs = no_context, profile_max, [], nan_outputs
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.nptype = lambda dtype: np.float32

    class Runtime:
        def __init__(self, logger: object) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
            if not deserialize:
                return None
            trt.engines.append(_Engine(trt))
            return trt.engines[-1]

    trt.Runtime = Runtime
    return trt


def _cuda_runtime() -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    buffers: dict[int, ctypes.Array] = {}

    def malloc(n: int) -> tuple[int, int]:
        buf = ctypes.create_string_buffer(n)
        buffers[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    rt.cudaMalloc = malloc
    rt.cudaFree = lambda ptr: (buffers.pop(ptr, None), (0,))[1]
    rt.cudaStreamCreate = lambda: (0, 1234)
    rt.cudaStreamDestroy = lambda stream: (0,)
    rt.cudaStreamSynchronize = lambda stream: (0,)
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    rt.cudaMemcpyAsync = lambda dst, src, n, kind, stream: (ctypes.memmove(dst, src, n), (0,))[1]
    return rt


@pytest.fixture
def stand_in(monkeypatch):
    """Installs the stand-ins; call it with the TensorRT behaviour wanted, get the tensorrt module back."""
    def install(**behaviour) -> types.ModuleType:
        trt = _tensorrt(**behaviour)
        cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        bindings.runtime = _cuda_runtime()
        cuda.bindings = bindings
        for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                             ("cuda.bindings.runtime", bindings.runtime)):
            monkeypatch.setitem(sys.modules, name, module)
        return trt
    return install


@pytest.fixture
def engine_bundle(tmp_path):
    """A real ONNX bundle (4 labels, 16 px) with an engine artifact beside its ONNX model."""
    folder = make_onnx_bundle(tmp_path / "b", classes=4, size=16)
    engine = folder / "model.fp16.engine"
    engine.write_bytes(b"plan")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"].append(artifact_entry(engine, folder, role="tensorrt-engine", precision="fp16",
                                                deployable=True, tensorrt_version="10.3.0", compute_capability="8.7"))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return load_bundle(folder), engine


@pytest.mark.parametrize("behaviour", [{"deserialize": False}, {"no_context": True}, {"nan_outputs": True}],
                         ids=["engine-does-not-deserialize", "no-execution-context", "non-finite-logits"])
def test_auto_runs_onnx_runtime_when_the_devices_engine_cannot_run(stand_in, engine_bundle, behaviour):
    # given: TensorRT importable, the start-up's engine for this device, and an engine TensorRT cannot run
    stand_in(**behaviour)
    bundle, engine = engine_bundle
    cfg = ModelConfig(bundle=bundle.root, backend="auto", batch_size=8, intra_op_threads=1)
    # when: the agent builds its backend under backend: auto
    backend = create_backend(bundle, cfg, engine)
    # then: ONNX Runtime runs the bundle (as docs/deploy.md promises), not a station that cannot start
    assert backend.name.startswith("onnxruntime") and backend.run(np.zeros((2, 3, 16, 16), np.float32)).shape == (2, 4)
    # and: pinned to TensorRT, the same engine is a BackendError naming what failed
    with pytest.raises(BackendError, match="deserialize|execution context|non-finite logits"):
        create_backend(bundle, ModelConfig(bundle=bundle.root, backend="tensorrt", batch_size=8), engine)


def test_auto_runs_onnx_runtime_when_the_engines_logits_do_not_fit_the_labels(stand_in, tmp_path):
    """Checked only after the choice, such an engine made the station refuse a bundle whose ONNX model runs."""
    # given: a 5-label bundle and an engine that gives 4 logits per image (built from another model)
    stand_in()
    folder = make_onnx_bundle(tmp_path / "b", classes=5, size=16)
    engine = tmp_path / "model.fp16.engine"
    engine.write_bytes(b"plan")
    bundle = load_bundle(folder)
    # when / then: backend auto runs ONNX Runtime; pinned to TensorRT, the engine is refused naming the mismatch
    backend = create_backend(bundle, ModelConfig(bundle=folder, backend="auto", batch_size=4, intra_op_threads=1),
                             engine)
    assert backend.name.startswith("onnxruntime") and backend.run(np.zeros((2, 3, 16, 16), np.float32)).shape == (2, 5)
    with pytest.raises(BackendError, match="model.fp16.engine: 4 outputs per image but field labels has 5"):
        create_backend(bundle, ModelConfig(bundle=folder, backend="tensorrt", batch_size=4), engine)


def test_a_batch_larger_than_the_engines_profile_runs_in_chunks_of_the_profile(stand_in, engine_bundle):
    # given: an engine built for batches of 1..32 (the shipped profile) and a station batch of 64
    trt = stand_in(profile_max=32)
    bundle, engine = engine_bundle
    backend = create_backend(bundle, ModelConfig(bundle=bundle.root, backend="tensorrt", batch_size=64), engine)
    trt.engines[-1].contexts[-1].shapes.clear()        # the check of the sample batch at creation ran it already
    # when
    logits = backend.run(np.zeros((64, 3, 16, 16), np.float32))
    # then: two chunks of 32, none refused by set_input_shape
    assert backend.max_batch == 32 and logits.shape == (64, 4)
    assert [s[0] for s in trt.engines[-1].contexts[-1].shapes] == [32, 32]


def test_network_flags_are_explicit_batch_on_tensorrt_8_and_none_on_10():
    assert explicit_batch_flags(_tensorrt("8.6.1")) == 1 and explicit_batch_flags(_tensorrt("10.3.0")) == 0


def test_an_int8_model_must_be_clearly_faster_to_be_chosen():
    assert pick_precision("auto", {"fp32": 1.0, "int8": 0.97}) == "fp32"     # 3%: noise between equals
    assert pick_precision("auto", {"fp32": 1.0, "int8": 0.9}) == "int8"


def test_the_timing_turns_alternate_so_neither_candidate_always_runs_second():
    order: list[str] = []

    class Timed:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, batch: np.ndarray) -> np.ndarray:
            order.append(self.name)
            return np.zeros((len(batch), 2), np.float32)

    measure_ms({"fp32": Timed("fp32"), "int8": Timed("int8")}, np.zeros((1, 3, 8, 8), np.float32), budget_s=0,
               min_runs=4, max_runs=4)
    timed = order[2:]            # after one warm-up run each
    assert timed == ["fp32", "int8", "int8", "fp32", "fp32", "int8", "int8", "fp32"]


def test_prune_leaves_a_build_another_running_process_is_writing(tmp_path):
    # given: two temp folders of engine builds: one of a process that runs, one of a process that has ended
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (tmp_path / f".tmp-fp16-sm87-trt10.3.0-abc-{live.pid}").mkdir()
        (tmp_path / f".tmp-fp16-sm87-trt10.3.0-abc-{dead.pid}").mkdir()
        # when: another process starts and prunes the cache
        from agent.engine_cache import DeviceInfo

        removed = prune(tmp_path, DeviceInfo(tensorrt_version="10.3.0", compute_capability="8.7"))
        # then: only the dead process's leftover goes
        assert [p.name for p in removed] == [f".tmp-fp16-sm87-trt10.3.0-abc-{dead.pid}"]
        assert (tmp_path / f".tmp-fp16-sm87-trt10.3.0-abc-{live.pid}").is_dir()
    finally:
        live.kill()
        live.wait()


def test_an_onnx_model_that_fails_while_threads_are_tuned_is_skipped_and_the_other_runs(tmp_path):
    # given: a bundle whose INT8 model loads but cannot run a batch above 1 (its batch baked into a Reshape),
    # and thread tuning on (intra_op_threads 0, the default), which runs each model while tuning
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = make_onnx_bundle(tmp_path / "b", classes=4, size=16)
    weights = [numpy_helper.from_array(np.ones((3, 4), np.float32), "w"),
               numpy_helper.from_array(np.zeros(4, np.float32), "b"),
               numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Reshape", ["pooled", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "batch-one", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.int8.onnx"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"].append(artifact_entry(folder / "model.int8.onnx", folder, role="onnx-int8", precision="int8",
                                                deployable=True))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(folder)
    # when
    backend = create_backend(bundle, ModelConfig(bundle=folder, backend="onnxruntime", precision="auto",
                                                 intra_op_threads=0, batch_size=8))
    # then: the FP32 model runs, and why INT8 was skipped is recorded, naming its file
    assert backend.precision == "fp32" and "model.int8.onnx: cannot run a batch of 8" in backend.choice.skipped["int8"]


def test_of_two_shipped_engines_the_one_built_with_this_exact_tensorrt_runs(stand_in, tmp_path, monkeypatch):
    import agent.backends as backends

    # given: TensorRT 10.3.1 on an Orin, whose stand-in deserializes only a plan of its own exact version (as
    # TensorRT does for engines not built version-compatible: "expecting library version ..., please rebuild"),
    # and a bundle shipping engines for 10.3.0 and 10.3.1, listed in that order
    trt = stand_in()
    trt.__version__ = "10.3.1"
    any_plan = trt.Runtime

    class ExactRuntime(any_plan):
        def deserialize_cuda_engine(self, data: bytes):
            return super().deserialize_cuda_engine(data) if data == b"plan-" + trt.__version__.encode() else None

    trt.Runtime = ExactRuntime
    monkeypatch.setattr(backends, "_compute_capability", lambda: "8.7")     # what probe_device reads on an Orin
    folder = make_onnx_bundle(tmp_path / "b", classes=4, size=16)
    manifest = json.loads((folder / "manifest.json").read_text())
    for version in ("10.3.0", "10.3.1"):
        plan = folder / f"model.{version}.engine"
        plan.write_bytes(b"plan-" + version.encode())
        manifest["artifacts"].append(artifact_entry(plan, folder, role="tensorrt-engine", precision="fp16",
                                                    deployable=True, tensorrt_version=version,
                                                    compute_capability="8.7"))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(folder)
    for kind in ("tensorrt", "auto"):
        # when: the agent builds its backend
        backend = create_backend(bundle, ModelConfig(bundle=folder, backend=kind, batch_size=4, intra_op_threads=1))
        # then: the 10.3.1 engine runs (not a refusal, nor ONNX Runtime after the 10.3.0 engine failed)
        assert backend.name == "tensorrt:10.3.1" and backend.engine_path.name == "model.10.3.1.engine"
