"""benchmarks/agent_throughput.py: the bare baseline runs at the benchmark's batch size (the artifact choice is
timed at it) and the agent runs the artifact the baseline ran (proposed as tests/agent/test_agent_throughput_bench.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from benchmark_script import load

from agent.sim.scenes import FASHION_MNIST_DIR

bench = load("agent_throughput")

pytestmark = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="Fashion-MNIST test split not installed")


def _agent_support():
    path = Path(__file__).resolve().parent / "agent_support.py"
    if not path.exists():
        path = Path("/work/main/tests/agent/agent_support.py")
    spec = importlib.util.spec_from_file_location("agent_support_for_throughput_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory) -> Path:
    return _agent_support().make_onnx_bundle(tmp_path_factory.mktemp("throughput-bench"))


def test_the_bare_model_is_timed_and_chosen_at_the_benchmarks_batch_size(onnx_bundle):
    """Before, the bare ModelConfig had no batch_size: its artifact choice was timed at batch 8 whatever
    --batch-size said (and the agent's at --batch-size, so the two could pick different artifacts)."""
    bare = bench.bare_throughput(onnx_bundle, batch_size=3, seconds=0.2, threads=1)
    assert bare.choice["batch"] == 3 and bare.ips > 0
    assert bare.precision == "fp32"                   # the only deployable artifact of this bundle


def test_a_pinned_precision_reaches_the_bare_model_and_the_agent(onnx_bundle, tmp_path):
    bare = bench.bare_throughput(onnx_bundle, batch_size=2, seconds=0.1, threads=1, precision="fp32")
    assert bare.choice["mode"] == "fp32"
    cfg = bench.agent_config(onnx_bundle, tmp_path / "v.avi", tmp_path, 1883, 4, 1, precision="int8")
    assert cfg.model.precision == "int8" and cfg.model.batch_size == 4
