"""The ONNX Runtime backend on real sessions: session options, execution providers that do not start, odd batches,
and model files that are not models.

This onnxruntime build has the CPU provider only and there is no GPU here. A GPU build whose CUDA provider cannot
start behaves in one of two ways, and the tests stand in for each: it comes up on the CPU alone without an error (a
provider library that does not load; ONNX Runtime only logs it), played by reporting CUDA as available so that
ONNX Runtime drops it itself; or ``InferenceSession`` raises (no GPU visible, its own fallback failed too), played
by a wrapper around the real ``InferenceSession`` that raises for a provider list holding CUDA. The CPU sessions
are real.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from agent_support import make_onnx_bundle

import agent.backends.onnxruntime as ort_backend
from agent.backends import BackendError
from agent.backends.onnxruntime import OnnxRuntimeBackend
from contract.bundle import load_bundle

GPU_FIRST = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def bundle(tmp_path):
    return load_bundle(make_onnx_bundle(tmp_path, classes=4, size=16))


def _fixed_batch_model(path: Path, batch: int, classes: int = 4, size: int = 16) -> Path:
    """A real ONNX model exported with a fixed batch size: global average pool, then a linear head."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, classes)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(classes, np.float32), "b")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            [batch, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
                              [weights, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _cuda_in_this_build(monkeypatch) -> None:
    """The backend believes this onnxruntime build has the TensorRT and CUDA providers (a GPU build)."""
    monkeypatch.setattr(ort_backend, "_available_providers", lambda: list(GPU_FIRST))


def _no_gpu_visible(monkeypatch) -> None:
    """``InferenceSession`` raises as a GPU build does when no GPU is visible and its own fallback failed too."""
    import onnxruntime

    real = onnxruntime.InferenceSession

    def session(path, sess_options=None, providers=None, **kwargs):
        if providers and "CUDAExecutionProvider" in providers:
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        return real(path, sess_options=sess_options, providers=providers, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)


def test_session_options_are_the_documented_ones(bundle):
    # given: a real model and an explicit thread count
    backend = OnnxRuntimeBackend(bundle.pick_onnx().path, bundle.input_spec, precision="fp32", intra_op_threads=2)
    options = backend.session.get_session_options()
    # then: that many intra-op threads, pool threads that do not spin between runs, all graph optimizations
    assert backend.threads == options.intra_op_num_threads == 2 and backend.tuning == {}
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_ALL")
    assert backend.name == "onnxruntime:CPUExecutionProvider"


def test_a_gpu_provider_that_quietly_does_not_start_is_announced_and_the_cpu_threads_are_tuned(
        bundle, monkeypatch, caplog):
    # given: model.providers prefers TensorRT and CUDA, the build has them, but the session comes up on the CPU
    _cuda_in_this_build(monkeypatch)
    caplog.set_level(logging.INFO, "agent.backends.onnxruntime")
    with pytest.warns(UserWarning, match="not in available provider names"):     # ONNX Runtime's own word
        backend = OnnxRuntimeBackend(bundle.pick_onnx().path, bundle.input_spec, precision="fp32", cpus=2,
                                     tune_batch=4, providers=GPU_FIRST)
    # then: it runs on the CPU, says so, and its thread count is chosen as for the CPU provider (auto)
    assert backend.name == "onnxruntime:CPUExecutionProvider"
    assert ("did not start TensorrtExecutionProvider/CUDAExecutionProvider" in caplog.text
            and "running on the CPU" in caplog.text)
    assert list(backend.tuning) == [1, 2] and backend.threads == min(backend.tuning, key=backend.tuning.get)
    assert backend.run(np.zeros((3, 3, 16, 16), np.float32)).shape == (3, 4)


def test_a_gpu_provider_that_cannot_start_falls_back_to_the_cpu_instead_of_refusing_the_model(
        bundle, monkeypatch, caplog):
    # given: a GPU build with no GPU visible: the session on TensorRT/CUDA raises
    _cuda_in_this_build(monkeypatch)
    _no_gpu_visible(monkeypatch)
    # when: the backend is made with the default provider order
    backend = OnnxRuntimeBackend(bundle.pick_onnx().path, bundle.input_spec, precision="fp32", intra_op_threads=1,
                                 providers=GPU_FIRST)
    # then: the model runs on the CPU, and the log says why
    assert backend.name == "onnxruntime:CPUExecutionProvider" and backend.threads == 1
    assert "cannot start TensorrtExecutionProvider/CUDAExecutionProvider" in caplog.text
    assert "no CUDA-capable device is detected" in caplog.text and "trying the CPU alone" in caplog.text
    assert backend.run(np.zeros((2, 3, 16, 16), np.float32)).shape == (2, 4)


@pytest.mark.parametrize("damage", ["not a model", "truncated"])
@pytest.mark.parametrize("gpu_build", [False, True])
def test_a_damaged_model_file_is_refused_naming_the_file(bundle, tmp_path, monkeypatch, damage, gpu_build):
    model = tmp_path / "model.fp32.onnx"
    good = bundle.pick_onnx().path.read_bytes()
    model.write_bytes(b"this is not an ONNX model\n" if damage == "not a model" else good[: len(good) // 2])
    if gpu_build:       # the GPU session fails first; the CPU one then names the file and what is wrong
        _cuda_in_this_build(monkeypatch)
        _no_gpu_visible(monkeypatch)
    with pytest.raises(BackendError, match=rf"{model}: ONNX Runtime cannot load the model .*Protobuf parsing failed"):
        OnnxRuntimeBackend(model, bundle.input_spec, precision="fp32", intra_op_threads=1, providers=GPU_FIRST)


def test_a_model_whose_input_does_not_fit_the_manifest_is_refused_naming_both(bundle, tmp_path):
    model = _fixed_batch_model(tmp_path / "model.fp32.onnx", batch=2, size=24)
    with pytest.raises(BackendError, match=r"model.fp32.onnx: model input 'input' has shape \[2, 3, 24, 24\], but "
                                           r"the manifest's field input says \(N, 3, 16, 16\)"):
        OnnxRuntimeBackend(model, bundle.input_spec, precision="fp32", intra_op_threads=1)


@pytest.mark.parametrize("frames", [0, 1, 2, 5])
def test_a_fixed_batch_model_takes_any_batch_size_and_gives_what_a_free_batch_model_does(bundle, tmp_path, frames):
    # given: the same weights exported with a free batch size and with a fixed batch of 2
    free = OnnxRuntimeBackend(bundle.pick_onnx().path, bundle.input_spec, precision="fp32", intra_op_threads=1)
    fixed = OnnxRuntimeBackend(_fixed_batch_model(tmp_path / "fixed2.onnx", batch=2), bundle.input_spec,
                               precision="fp32", intra_op_threads=1)
    assert fixed.fixed_batch == 2 and free.fixed_batch is None
    batch = np.random.default_rng(frames).normal(size=(frames, 3, 16, 16)).astype(np.float32)
    # then: one row of logits per frame, none for an empty batch, the padding never shows
    want = free.run(batch)
    got, embedding = fixed.run_outputs(batch)
    assert got.shape == want.shape == (frames, 4) and embedding is None
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_batch_of_the_wrong_type_or_shape_is_an_error_not_a_result(bundle):
    backend = OnnxRuntimeBackend(bundle.pick_onnx().path, bundle.input_spec, precision="fp32", intra_op_threads=1)
    for bad in (np.zeros((2, 3, 16, 16), np.float64), np.zeros((2, 16, 16, 3), np.float32),
                np.zeros((2, 3, 8, 8), np.float32)):
        with pytest.raises(Exception, match="INVALID_ARGUMENT"):     # ONNX Runtime's own, naming what it expected
            backend.run(bad)
