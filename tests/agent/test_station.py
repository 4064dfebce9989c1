"""Station behaviour on real images: one decision per item with its lane, QC alerts, backends."""

from __future__ import annotations

import importlib.util
import json

import cv2
import numpy as np
import pytest
from agent_support import as_config, station_config, validate_message

from agent.app import Agent, StartupError
from agent.backends import BackendError, create_backend
from agent.backends.onnxruntime import pick_providers
from agent.config import ModelConfig
from agent.demo import Subscriber, write_video
from contract.bundle import load_bundle

LANES = {"T-shirt/top": "lane-1", "Trouser": "lane-2", "Pullover": "lane-1", "Dress": "lane-2", "Coat": "lane-1",
         "Sandal": "lane-4", "Shirt": "lane-1", "Sneaker": "lane-4", "Bag": "lane-5", "Ankle boot": "lane-4"}


@pytest.fixture(scope="module")
def items_video(fmnist_test_images, tmp_path_factory):
    """12 real products, each in view for 3 frames with 2 empty frames between (a conveyor)."""
    path = tmp_path_factory.mktemp("items") / "items.avi"
    write_video(fmnist_test_images[0][:12], path, size=64, repeat=3, blank_between=2, lead_blank=2)
    return path


@pytest.mark.mqtt
def test_receiving_station_one_decision_per_item_with_lane(broker, tiny_bundle, items_video, tmp_path):
    cfg = as_config(station_config(
        tmp_path, tiny_bundle, str(items_video), broker.port,
        decisions={"presence": {"mode": "background", "min_frames": 2, "gap_frames": 2, "background_threshold": 8},
                   "sorting": {"lanes": LANES, "default_lane": "lane-9", "min_agreement": 0.0},
                   "qc": {"defect_classes": ["Bag", "Coat", "Dress"], "min_confidence": 0.0, "cooldown_s": 0}}))
    dashboard = Subscriber(broker.host, broker.port, "inventory/test/st-01")
    cv2.setNumThreads(-1)                       # OpenCV's default (all CPUs); the station sets its own
    agent = Agent(cfg)
    agent.start()
    assert cv2.getNumThreads() == 1             # model.opencv_threads: each camera thread on one core
    agent.wait(exit_at_end=True)
    agent.shutdown(10)
    # only frames with an item are results (decisions.empty_frames: skip): 12 items x 3 frames
    assert dashboard.wait_for(lambda d: len(d.of("result")) == 12 * 3, 5)
    assert agent.metrics.counter("frames_empty_total", camera="cam-a") == 2 + 12 * 2
    dashboard.close()
    decisions = [json.loads(m.payload) for m in dashboard.of("decision")]
    assert [d["item_seq"] for d in decisions] == list(range(1, 13))
    results = {r["frame_seq"]: r for r in (json.loads(m.payload) for m in dashboard.of("result"))}
    for i, d in enumerate(decisions):
        validate_message("decision.v1", d)
        assert d["frames"] == 3 and d["first_seen"] == results[2 + i * 5 + 1]["captured_at"]
        assert d["lane"] == ("manual-review" if d["low_confidence"] else LANES[d["label"]])
    alerts = [json.loads(m.payload) for m in dashboard.of("alert")]
    defect_frames = [r for r in results.values() if r["label"] in ("Bag", "Coat", "Dress")]
    assert len(alerts) == len(defect_frames)
    for alert in alerts:
        validate_message("alert.v1", alert)
        assert alert["evidence"]["thumbnail_jpeg_b64"]


def test_config_labels_must_exist_in_the_bundle(tiny_bundle, items_video, tmp_path):
    cfg = as_config(station_config(tmp_path, tiny_bundle, str(items_video), 1,
                                   decisions={"qc": {"defect_classes": ["Scratch"]}}))
    with pytest.raises(StartupError, match=r"field decisions.qc.defect_classes\[0\]: label 'Scratch' is not in"):
        Agent(cfg).start()


def test_onnxruntime_backend_batches_and_matches_single_runs(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    backend = create_backend(bundle, ModelConfig(bundle=tiny_bundle, backend="onnxruntime"))
    assert backend.name == "onnxruntime:CPUExecutionProvider" and backend.precision == "fp32"
    x = np.random.default_rng(0).standard_normal((5, 3, 28, 28)).astype(np.float32)
    batched = backend.run(x)
    single = np.concatenate([backend.run(x[i:i + 1]) for i in range(5)])
    assert batched.shape == (5, 10) and np.allclose(batched, single, atol=1e-5)


def test_provider_order_takes_the_available_ones():
    assert pick_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                          ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CUDAExecutionProvider",
                                                                                   "CPUExecutionProvider"]
    assert pick_providers(["TensorrtExecutionProvider"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_the_station_runs_a_deployable_artifact_and_says_which(real_bundle):
    """Default config (precision auto): the deployable ONNX artifacts are timed here; INT8 only if deployable."""
    bundle = load_bundle(real_bundle)
    int8 = bundle.artifact("onnx-int8")
    backend = create_backend(bundle, ModelConfig(bundle=real_bundle, backend="onnxruntime"))
    deployable = {"fp32"} | ({"int8"} if int8 is not None and int8.deployable else set())
    assert set(backend.choice.ms_per_batch) == deployable and backend.precision == backend.choice.precision
    assert ("int8" in backend.choice.skipped) == ("int8" not in deployable)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_chosen_but_absent_is_a_clear_error(tiny_bundle):
    from agent.backends.tensorrt import TensorRTBackend

    with pytest.raises(BackendError, match="tensorrt Python package is not installed"):
        TensorRTBackend(tiny_bundle / "x.engine", load_bundle(tiny_bundle).input_spec, precision="fp16", max_batch=4)
    with pytest.raises(BackendError, match="no deployable engine"):
        create_backend(load_bundle(tiny_bundle), ModelConfig(bundle=tiny_bundle, backend="tensorrt"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="TensorRT is not installable here (no NVIDIA wheel host, no GPU); runs where it is")
def test_tensorrt_engine_matches_onnx(real_bundle, fmnist_test_images, tmp_path):  # pragma: no cover - needs a GPU
    """Where TensorRT and a GPU exist: an FP16 engine built from the bundle's FP32 ONNX, run by the station's
    TensorRT backend, agrees with ONNX Runtime on real test images (top-1 on all but near-ties, logits within
    FP16's rounding)."""
    from agent.backends.onnxruntime import OnnxRuntimeBackend
    from agent.backends.tensorrt import TensorRTBackend
    from contract.preprocess import Preprocessor
    from trainer.export.tensorrt import EngineSpec, build_engine, compute_capability

    try:
        compute_capability()
    except Exception as exc:  # the package is installed but no GPU answers
        pytest.skip(f"TensorRT is installed but no GPU is usable: {exc}")
    bundle = load_bundle(real_bundle)
    spec = bundle.input_spec
    built = build_engine(bundle.artifact("onnx-fp32").path, tmp_path, EngineSpec("fp16", spec.height, spec.width),
                         input_name=spec.input_name)
    trt = TensorRTBackend(built["path"], spec, precision="fp16", max_batch=16)
    ort_backend = OnnxRuntimeBackend(bundle.artifact("onnx-fp32").path, spec, precision="fp32")
    rgb = [np.repeat(img[:, :, None], 3, axis=2) for img in fmnist_test_images[0][:64]]
    batch = Preprocessor(spec).batch(rgb)
    got = np.concatenate([trt.run(batch[i:i + 16]) for i in range(0, len(batch), 16)])
    want = ort_backend.run(batch)
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 0.02 * scale
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.04 * scale
    assert (got.argmax(1) == want.argmax(1))[clear].all()


def test_batched_preprocessing_is_bit_identical_to_single_images(fmnist_test_images):
    from contract.preprocess import InputSpec, Preprocessor

    rgb = [np.repeat(img[:, :, None], 3, axis=2) for img in fmnist_test_images[0][:16]]
    for spec in (InputSpec(height=32, width=32, resize_shorter=36), InputSpec(height=28, width=28, resize_shorter=28,
                                                                             interpolation="area")):
        pre = Preprocessor(spec)
        assert np.array_equal(pre.batch(rgb), np.stack([pre(x) for x in rgb]))


def test_only_engines_for_the_installed_tensorrt_are_used():
    from pathlib import Path

    from agent.backends import compatible_engines
    from contract.bundle import Artifact

    def engine(version, cc):
        return Artifact("tensorrt-engine", Path("e"), "0" * 64, 1, "fp16", True, None, version, cc)

    engines = [engine("10.3.0", "8.7"), engine("8.6.2", "8.7"), engine("10.3.1", "8.9")]
    assert compatible_engines(engines, None) == []
    assert compatible_engines(engines, "10.3.0.26") == [engines[0], engines[2]]
    assert compatible_engines(engines, "10.3.0", "8.7") == [engines[0]]


@pytest.mark.mqtt
def test_two_cameras_share_the_model_and_each_is_complete(broker, tiny_bundle, fmnist_video,
                                                              fmnist_test_images, tmp_path):
    from agent_support import bundle_predictions, video_frames

    folder = tmp_path / "shelf"
    folder.mkdir()
    for i in range(25):
        cv2.imwrite(str(folder / f"img{i:03d}.png"), fmnist_test_images[0][100 + i])
    cfg = as_config(station_config(tmp_path, tiny_bundle, str(fmnist_video), broker.port, cameras=[
        {"id": "dock", "uri": str(fmnist_video), "backpressure": "block", "queue_size": 8},
        {"id": "shelf", "uri": f"file://{folder}", "backpressure": "block", "queue_size": 8}],
        model={"opencv_threads": 0}))
    dashboard = Subscriber(broker.host, broker.port, "inventory/test/st-01")
    cv2.setNumThreads(-1)
    default_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    agent = Agent(cfg)
    agent.start()
    assert cv2.getNumThreads() == default_threads       # opencv_threads 0: OpenCV's own default again
    agent.wait(exit_at_end=True)
    agent.shutdown(10)
    assert dashboard.wait_for(lambda d: len(d.of("result")) == 85, 5)
    dashboard.close()
    results = [json.loads(m.payload) for m in dashboard.of("result")]
    by_cam = {c: sorted((r for r in results if r["camera"] == c), key=lambda r: r["frame_seq"]) for c in ("dock", "shelf")}
    assert [r["frame_seq"] for r in by_cam["shelf"]] == list(range(1, 26))
    assert [r["source_ref"] for r in by_cam["shelf"]] == [f"img{i:03d}.png" for i in range(25)]
    assert [r["label"] for r in by_cam["dock"]] == bundle_predictions(tiny_bundle, video_frames(fmnist_video))
    assert agent.metrics.counter("frames_classified_total", camera="shelf") == 25


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_device_engine_from_startup_is_used_only_when_a_tensorrt_backend_may_run(tiny_bundle, tmp_path):
    from agent.app import DeviceEngine

    engine = DeviceEngine.from_env({"INVENTORY_AGENT_ENGINE": str(tmp_path / "m.engine"),
                                    "INVENTORY_AGENT_ENGINE_PRECISION": "int8"})
    assert engine == DeviceEngine(tmp_path / "m.engine", "int8") and DeviceEngine.from_env({}) is None
    bundle = load_bundle(tiny_bundle)
    for backend in ("onnxruntime", "auto"):
        chosen = create_backend(bundle, ModelConfig(bundle=tiny_bundle, backend=backend), engine.path, "int8")
        assert chosen.name.startswith("onnxruntime")
    with pytest.raises(BackendError, match="tensorrt Python package is not installed"):
        create_backend(bundle, ModelConfig(bundle=tiny_bundle, backend="tensorrt"), engine.path, "int8")


def test_cuda_runtime_wrapper_reports_a_missing_gpu_clearly():
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        pytest.skip("cuda-python is not installed")
    from cuda.bindings import runtime as cudart

    if int(cudart.cudaGetDeviceCount()[0]) == 0 and cudart.cudaGetDeviceCount()[1] > 0:
        pytest.skip("a GPU is present; this checks the no-GPU error path")
    from agent.backends.tensorrt import _CudaRuntime

    with pytest.raises(BackendError, match="CUDA call failed: cudaError"):
        _CudaRuntime()
