"""The exported bundle: ONNX parity, INT8 QDQ and its gate, verification, signatures, TensorRT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from contract.bundle import BundleError, load_bundle, load_public_key
from contract.preprocess import Preprocessor, read_image
from trainer.export.quantize import (
    CalibrationError,
    QuantizeConfig,
    int8_gate,
    quantize_qdq,
)


def _val_images(bundle_dir: Path, count: int = 64):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    split = json.loads((Path(manifest["provenance"]["run_dir"]) / "split.json").read_text())
    root = Path(split["root"])
    rows = split["val"][:count]
    return [root / p for p, _ in rows], np.array([label for _, label in rows])


def test_bundle_runs_in_onnx_runtime_and_records_parity_and_gate(real_bundle):
    bundle = load_bundle(real_bundle)
    q = bundle.manifest["quality"]
    assert q["parity"]["images"] > 0 and q["parity"]["max_abs_logit_diff"] < 1e-3 and q["parity"]["top1_agreement"] == 1.0
    assert set(q["int8"]) >= {"val_accuracy", "delta_top1_points", "gate_margin_points", "passed"}
    assert q["int8"]["passed"] == (q["int8"]["delta_top1_points"] >= -q["int8"]["gate_margin_points"])
    assert set(q["thresholds"]) == {"min_confidence", "min_margin", "max_entropy"}
    how = q["thresholds_from"]                       # which set they come from, and what they flag there
    assert how["set"] in ("station_view", "val") and how["review_budget"] is None  # the default: no cap
    assert how["suggested"] == q["thresholds"] and 0 < how["flagged_fraction"] < 1
    assert bundle.labels[0] == "Ankle boot" and len(bundle.labels) == 10

    paths, labels = _val_images(real_bundle)
    pre = Preprocessor(bundle.input_spec)
    x = pre.batch([read_image(p) for p in paths])
    fp32 = ort.InferenceSession(str(bundle.artifact("onnx-fp32").path), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(bundle.artifact("onnx-int8").path), providers=["CPUExecutionProvider"])
    logits32 = fp32.run(None, {"input": x})[0]
    logits8 = int8.run(None, {"input": x[:1]})[0]  # dynamic batch: 1 works as well as 64
    assert logits32.shape == (len(paths), 10) and logits8.shape == (1, 10)
    assert (logits32.argmax(1) == labels).mean() > 0.4  # a real model on real images, well above chance (0.1)


def test_int8_model_has_explicit_symmetric_qdq(real_bundle):
    model = onnx.load(str(load_bundle(real_bundle).artifact("onnx-int8").path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [onnx.numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(zp.dtype == np.int8 and not zp.any() for zp in zero_points)  # TensorRT wants zp 0


def test_int8_logits_stay_float_so_margins_do_not_tie(real_bundle):
    """Logits rounded to an INT8 grid tie the top two classes of many frames (margin exactly 0, argmax to the
    lower class id), which skews the agent's least-certain ranking by class order."""
    bundle = load_bundle(real_bundle)
    model = onnx.load(str(bundle.artifact("onnx-int8").path))
    producer = {out: n for n in model.graph.node for out in n.output}
    assert producer["logits"].op_type == "Gemm"
    assert bundle.manifest["quality"]["int8"]["calibration"]["float_outputs"] == ["logits"]
    paths, _ = _val_images(real_bundle)
    x = Preprocessor(bundle.input_spec).batch([read_image(p) for p in paths])
    int8 = ort.InferenceSession(str(bundle.artifact("onnx-int8").path), providers=["CPUExecutionProvider"])
    logits = int8.run(None, {"input": x})[0]
    assert len(np.unique(logits)) > 255            # an INT8 grid holds at most 255 values
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert (top2[:, 1] > top2[:, 0]).all()


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(bundle, dest)
    return dest


def test_tampered_file_fails_verification(real_bundle, tmp_path):
    b = _copy(real_bundle, tmp_path)
    onnx_file = b / "model.int8.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.int8.onnx: sha256 .* does not match"):
        load_bundle(b)


def test_truncated_missing_and_bad_manifest_fail_verification(real_bundle, tmp_path):
    b = _copy(real_bundle, tmp_path)
    (b / "model.fp32.onnx").write_bytes((b / "model.fp32.onnx").read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"model.fp32.onnx: size"):
        load_bundle(b)
    (b / "model.fp32.onnx").unlink()
    with pytest.raises(BundleError, match=r"model.fp32.onnx: listed in .*manifest.json but missing"):
        load_bundle(b)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["input"]["mean"] = [0.5, 0.5]
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest.json: field input/mean"):
        load_bundle(b)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest.json: not valid JSON"):
        load_bundle(b)


def test_signed_bundle_verifies_and_detects_manifest_edits(real_bundle, tmp_path):
    from trainer.signing import generate_keypair, sign_bundle

    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    b = _copy(real_bundle, tmp_path)
    sign_bundle(b, tmp_path / "k.key")
    key = load_public_key(tmp_path / "k.pub")
    assert load_bundle(b, key).signed
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(b, load_public_key(tmp_path / "other.pub"))
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["quality"]["int8"]["passed"] = True
    (b / "manifest.json").write_text(json.dumps(manifest, indent=1))  # hashes still match, signature does not
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(b, key)
    (b / "manifest.json.sig").unlink()
    with pytest.raises(BundleError, match="unsigned bundles are refused"):
        load_bundle(b, key)


def test_int8_gate_thresholds():
    assert int8_gate(0.90, 0.895, 1.0) == (True, None)
    assert int8_gate(0.90, 0.890, 1.0)[0] is True  # exactly at the margin
    passed, reason = int8_gate(0.90, 0.85, 1.0)
    assert not passed and "5.00 points below FP32" in reason


def test_int8_gate_refuses_a_badly_calibrated_model(trained_run, tmp_path, monkeypatch):
    """Calibrating on blank frames (a camera pointed at an empty belt) clips real activations;
    the gate must catch the accuracy loss, keep the file, mark it not deployable and say why."""
    from trainer.export import bundle as bundle_mod

    def blank_frames(train_samples, spec, count, workers, chunk):
        return np.zeros((16, 3, spec.height, spec.width), dtype=np.float32)

    monkeypatch.setattr(bundle_mod, "_calibration_inputs", blank_frames)
    result = bundle_mod.export_bundle(bundle_mod.ExportConfig(
        checkpoint=trained_run / "best.pt", models_dir=tmp_path, name="bad-int8", version="1", tensorrt="off",
        workers=0, quantize=QuantizeConfig(calibration_images=16, method="minmax")))
    int8 = result.manifest["quality"]["int8"]
    assert not int8["passed"] and "points below FP32" in int8["reason"]
    bundle = load_bundle(result.bundle_dir)
    art = bundle.artifact("onnx-int8")
    assert art.path.is_file() and not art.deployable and art.reason == int8["reason"]
    assert bundle.pick_onnx().role == "onnx-fp32"  # the station falls back to FP32


def test_onnx_parity_gate_refuses_a_graph_that_is_not_the_trained_model(trained_run, tmp_path, monkeypatch):
    """An ONNX graph whose weights drifted from the checkpoint (here: the classifier's bias shifted by 0.5,
    as a broken exporter or a stale file would) must not be deployable, FP32 and the INT8 made from it."""
    from trainer.export import bundle as bundle_mod
    real_export = bundle_mod.export_onnx

    def drifted_export(model, out, *args, **kwargs):
        path = real_export(model, out, *args, **kwargs)
        graph = onnx.load(str(path))
        bias = next(i for i in graph.graph.initializer if tuple(i.dims) == (10,))  # the 10-class head's bias
        values = onnx.numpy_helper.to_array(bias).copy()
        values[0] += 0.5
        bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
        onnx.save(graph, str(path))
        return path

    monkeypatch.setattr(bundle_mod, "export_onnx", drifted_export)
    built = _stub_tensorrt(monkeypatch)       # TensorRT present (stubbed: it cannot be installed here)
    result = bundle_mod.export_bundle(bundle_mod.ExportConfig(
        checkpoint=trained_run / "best.pt", models_dir=tmp_path, name="drifted", version="1", tensorrt="on",
        workers=0, station_val_images=0, quantize=QuantizeConfig(calibration_images=16)))
    parity = result.manifest["quality"]["parity"]
    assert not parity["passed"] and "differ from PyTorch by up to 0.5" in parity["reason"]
    bundle = load_bundle(result.bundle_dir)
    assert not bundle.artifact("onnx-fp32").deployable and not bundle.artifact("onnx-int8").deployable
    with pytest.raises(BundleError, match="no deployable ONNX artifact"):
        bundle.pick_onnx()
    # nor an engine of that graph: a station runs engines first, and one built from it would run what the gate
    # refused (before 2026-12-06 the FP16 engine was built from the FP32 graph whatever its parity, deployable)
    assert built == [] and not bundle.engines()
    assert not [a for a in bundle.manifest["artifacts"] if a["role"] == "tensorrt-engine"]
    trt = result.manifest["quality"]["tensorrt"]
    assert trt["engines"] == 0 and "FP32 ONNX parity" in trt["reason"] and set(trt["not_built"]) == {"fp16", "int8"}


def _stub_tensorrt(monkeypatch) -> list[tuple[str, str]]:
    """TensorRT as if present. It cannot be installed on this project's CI machines (no NVIDIA wheel host, no
    GPU), so its builder is stubbed: an engine's bytes do not matter here, only which ONNX model it is built
    from and what the manifest says of it. Returns the (precision, ONNX file) of each engine built."""
    from trainer.export import tensorrt as trt_export

    built: list[tuple[str, str]] = []

    def build_engine(onnx_path, out_dir, spec, input_name="input"):
        built.append((spec.precision, Path(onnx_path).name))
        out = Path(out_dir) / f"model.{spec.precision}.sm87.trt10.3.engine"
        out.write_bytes(b"stub engine from " + Path(onnx_path).name.encode())
        return {"path": out, "precision": spec.precision, "tensorrt_version": "10.3.0", "compute_capability": "8.7"}

    monkeypatch.setattr(trt_export, "require_tensorrt_gpu", lambda: None)
    monkeypatch.setattr(trt_export, "build_engine", build_engine)
    return built


def test_tensorrt_engines_are_built_only_from_models_that_passed_their_gates(tmp_path, monkeypatch):
    from contract.preprocess import InputSpec
    from trainer.export.bundle import ExportConfig, _build_engines

    built = _stub_tensorrt(monkeypatch)
    cfg, spec = ExportConfig(checkpoint=tmp_path / "best.pt", tensorrt="on"), InputSpec(32, 32, 32)
    # both models passed: an FP16 engine from the FP32 model, an INT8 one from the INT8 model
    engines, reason, refused = _build_engines(cfg, tmp_path, spec, None, None)
    assert built == [("fp16", "model.fp32.onnx"), ("int8", "model.int8.onnx")] and reason is None and refused == {}
    assert [e["source"] for e in engines] == ["model.fp32.onnx", "model.int8.onnx"]
    # the INT8 gate failed: the FP16 engine only, and the manifest says why there is no INT8 one
    built.clear()
    engines, reason, refused = _build_engines(cfg, tmp_path, spec, None, "INT8 5.00 points below FP32")
    assert built == [("fp16", "model.fp32.onnx")] and reason is None
    assert refused == {"int8": "model.int8.onnx not deployable (INT8 5.00 points below FP32)"}
    # FP32 parity failed (so the INT8 model quantized from that graph too): no engine at all, and why
    built.clear()
    engines, reason, refused = _build_engines(cfg, tmp_path, spec, "FP32 ONNX parity: logits differ",
                                              "FP32 ONNX parity: logits differ")
    assert built == [] and engines == [] and set(refused) == {"fp16", "int8"}
    assert reason.startswith("no engine built: model.fp32.onnx not deployable (FP32 ONNX parity: logits differ)")


def _two_output_onnx(path: Path, logits_op: str) -> Path:
    """A real ONNX model of a bundle's form (``logits`` and ``embedding``) on 3-number inputs: logits_op(input)."""
    from onnx import TensorProto, helper

    inputs = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3]) for name in ("logits", "embedding")]
    nodes = [helper.make_node(logits_op, ["input"], ["logits"]), helper.make_node("Identity", ["input"], ["embedding"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [inputs], outputs),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_station_view_int8_logits_that_are_not_finite_fail_the_int8_gate(tmp_path):
    from trainer.export.bundle import _station_quality
    from trainer.station_eval import StationViews

    # given: station views on which the FP32 model is right everywhere, and the INT8 model (Log: NaN for a negative
    # input) is NaN on all of 3 of 8 rows, whose argmax still says class 0, the true one
    fp32, int8 = _two_output_onnx(tmp_path / "fp32.onnx", "Identity"), _two_output_onnx(tmp_path / "int8.onnx", "Log")
    inputs = np.tile(np.array([[3.0, 2.0, 1.0]], np.float32), (8, 1))
    inputs[:3] = [-1.0, -2.0, -3.0]
    views = StationViews(inputs, np.zeros(8, np.int64), 8)
    quality, reason, outputs = _station_quality(views, fp32, int8, 1.0)
    # then: those count as wrong, and the INT8 model fails the gate, as on the validation images
    assert quality["val_accuracy"] == 1.0 and quality["int8_val_accuracy"] == 5 / 8 and not quality["int8_passed"]
    assert reason == "station views: INT8 model gives non-finite logits (NaN or infinity) on 3 of 8 validation images"
    # and with no view at all (every validation image a station's own frame), there is no gate to apply
    empty = StationViews(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), 0)
    assert _station_quality(empty, fp32, int8, 1.0) == (None, None, None)


def test_onnx_parity_fails_where_the_pytorch_reference_is_not_finite(trained_run, real_bundle):
    """A NaN in the reference made every comparison with it False, so the gate passed whatever ONNX gave."""
    import torch

    from trainer.engine import load_checkpoint_model
    from trainer.export.onnx import parity

    model, _ = load_checkpoint_model(trained_run / "best.pt")

    class NaNOnFirstImage(torch.nn.Module):
        def forward(self, x):
            out = model(x).clone()
            out[0, 0] = float("nan")
            return out

    images, _ = _real_calibration_images(real_bundle, 4)
    assert parity(model.eval(), real_bundle / "model.fp32.onnx", images)["passed"]       # the reference itself
    result = parity(NaNOnFirstImage(), real_bundle / "model.fp32.onnx", images)
    assert not result["passed"]
    assert result["reason"].startswith("PyTorch gives non-finite outputs (NaN or infinity) on 1 of 4 images")
    assert np.isfinite(result["max_abs_logit_diff"]) and result["max_abs_logit_diff"] <= result["tolerance"]


def test_onnx_parity_of_a_faithful_export_passes(real_bundle):
    parity = load_bundle(real_bundle).manifest["quality"]["parity"]
    assert parity["passed"] and parity["reason"] is None and parity["max_abs_logit_diff"] <= parity["tolerance"]


def test_quantize_without_calibration_images_is_an_error(real_bundle, tmp_path):
    fp32 = load_bundle(real_bundle).artifact("onnx-fp32").path
    with pytest.raises(CalibrationError, match="needs real images"):
        quantize_qdq(fp32, tmp_path / "x.onnx", None, QuantizeConfig())
    with pytest.raises(CalibrationError, match="needs real images"):
        quantize_qdq(fp32, tmp_path / "x.onnx", np.zeros((0, 3, 32, 32), np.float32), QuantizeConfig())
    assert not (tmp_path / "x.onnx").exists()


def test_existing_version_is_never_overwritten(real_bundle, trained_run):
    from trainer.export.bundle import ExportConfig, export_bundle

    before = (real_bundle / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        export_bundle(ExportConfig(checkpoint=trained_run / "best.pt", models_dir=real_bundle.parent.parent,
                                   name=real_bundle.parent.name, version=real_bundle.name, tensorrt="off"))
    assert (real_bundle / "manifest.json").read_bytes() == before


def test_tensorrt_absent_is_recorded_not_fatal(real_bundle):
    from trainer.export.tensorrt import tensorrt_available

    q = load_bundle(real_bundle).manifest["quality"]["tensorrt"]
    if tensorrt_available():
        pytest.skip("TensorRT is installed here; the engine test below covers it")
    assert q["engines"] == 0  # this bundle was exported with --tensorrt off
    from trainer.export.tensorrt import TensorRTUnavailable, require_tensorrt_gpu

    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        require_tensorrt_gpu()


def test_tensorrt_engines_build_where_present(real_bundle, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on this machine (no NVIDIA wheel host)")
    from trainer.export.tensorrt import EngineSpec, build_engine, compute_capability

    try:
        compute_capability()
    except Exception as exc:  # TensorRT without a GPU
        pytest.skip(str(exc))
    bundle = load_bundle(real_bundle)
    built = build_engine(bundle.artifact("onnx-fp32").path, tmp_path, EngineSpec("fp16", 32, 32))
    assert built["path"].stat().st_size > 0 and built["tensorrt_version"]


@pytest.mark.parametrize("count", [40, 37])
def test_calibration_counts_that_are_not_a_multiple_of_the_batch_work(real_bundle, tmp_path, count):
    """ONNX Runtime's calibrator fails on a shorter last batch; every image is still used, in equal batches."""
    paths, _ = _val_images(real_bundle, count)
    assert len(paths) == count
    images = Preprocessor(load_bundle(real_bundle).input_spec).batch([read_image(p) for p in paths])
    out = tmp_path / "int8.onnx"
    quantize_qdq(real_bundle / "model.fp32.onnx", out, images, QuantizeConfig(calibration_images=count, batch_size=32))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images[:4]})[0]
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


def _real_calibration_images(bundle_dir: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    paths, labels = _val_images(bundle_dir, count)
    return Preprocessor(load_bundle(bundle_dir).input_spec).batch([read_image(p) for p in paths]), labels


def test_calibration_holds_one_batch_of_intermediate_outputs_at_a_time(real_bundle, tmp_path, monkeypatch):
    """ONNX Runtime's calibrator keeps every batch's intermediate outputs (9 GB at 64 ResNet50 images);
    ours hands its histograms one batch at a time, yet every image is counted and the model passes the gate."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    images, _ = _real_calibration_images(real_bundle, 64)
    seen: list[int] = []
    collect = HistogramCollector.collect

    def spy(self, name_to_arr):
        seen.append(np.asarray(name_to_arr["input"]).reshape(-1, *images.shape[1:]).shape[0])
        return collect(self, name_to_arr)

    monkeypatch.setattr(HistogramCollector, "collect", spy)
    out = tmp_path / "int8.onnx"
    info = quantize_qdq(real_bundle / "model.fp32.onnx", out, images, QuantizeConfig(calibration_images=64, batch_size=4))
    assert max(seen) == 4 and sum(seen) == 64 and info["batch_size"] == 4
    # ... and the model is the one all 64 images at once make: same scales, so the same logits. (Whether a
    # 2-epoch 32 px model passes the 1-point gate depends on the CPU's arithmetic, so that is not asserted.)
    whole = tmp_path / "int8-whole.onnx"
    quantize_qdq(real_bundle / "model.fp32.onnx", whole, images, QuantizeConfig(calibration_images=64, batch_size=64))
    val, _ = _real_calibration_images(real_bundle, 200)
    logits = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": val})[0]
              for path in (out, whole)]
    assert np.isfinite(logits[0]).all() and np.array_equal(logits[0], logits[1])


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_streamed_ranges_equal_onnx_runtimes_one_shot_ranges(real_bundle, tmp_path, method):
    """Same method, same numbers: ranges computed batch by batch equal ORT's own all-at-once calibration
    (fed one batch per call instead, ORT re-bins its histograms and the entropy ranges move a lot)."""
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from trainer.export.quantize import (
        _calibrator_options,
        calibration_ranges,
        ort_calibration_method,
    )

    images, _ = _real_calibration_images(real_bundle, 24)
    cfg = QuantizeConfig(method=method, batch_size=3)
    prepared = tmp_path / "prepared.onnx"
    quant_pre_process(str(real_bundle / "model.fp32.onnx"), str(prepared), skip_symbolic_shape=True)
    streamed = calibration_ranges(prepared, tmp_path, images, cfg, "input")
    (tmp_path / "one").mkdir()
    one_shot = create_calibrator(prepared, None, augmented_model_path=str(tmp_path / "one" / "aug.onnx"),
                                 calibrate_method=ort_calibration_method(method), extra_options=_calibrator_options(cfg))
    feeds = iter([{"input": images[i:i + 8]} for i in range(0, 24, 8)])
    one_shot.collect_data(type("AllBatches", (), {"get_next": lambda self: next(feeds, None)})())
    expected = one_shot.compute_data()
    assert set(streamed.data) == set(expected.data)
    for name in expected.data:
        np.testing.assert_allclose(streamed[name].range_value, expected[name].range_value, rtol=1e-6, err_msg=name)


def test_a_model_with_non_finite_logits_is_not_deployable():
    """The export gate's check: INT8 logits with NaN or infinity make the INT8 artifact not deployable (and
    FP32 ones stop the export), with a reason counting the images."""
    from trainer.export.bundle import non_finite_reason

    logits = np.zeros((5, 3), np.float32)
    assert non_finite_reason("INT8", logits) is None
    logits[1, 2], logits[3, 0] = np.nan, np.inf
    assert non_finite_reason("INT8", logits) == ("INT8 model gives non-finite logits (NaN or infinity) on 2 of 5 "
                                                 "validation images")


def test_a_stations_own_frames_are_never_rendered_again_as_station_views(tmp_path):
    # given: a run whose split holds a station's frames (a retrain's reviewed crops, saved as_seen) among images
    from trainer import data as data_mod
    from trainer.export import bundle as bundle_mod
    from trainer.export.quantize import QuantizeConfig

    samples = [data_mod.Sample(tmp_path / f"img/{i}.png", i % 2, as_seen=i % 3 == 0) for i in range(30)]
    dataset = data_mod.Dataset(tmp_path, ["a", "b"], samples, "csv")
    train, val = list(range(0, 30, 2)), list(range(1, 30, 2))
    data_mod.save_split(tmp_path / "split.json", dataset, train, val, seed=0)
    loaded_train, loaded_val = bundle_mod._split_samples(tmp_path, ["a", "b"])
    assert [s.as_seen for s in loaded_train + loaded_val] == [samples[i].as_seen for i in train + val]
    spec = type("Spec", (), {"crop": type("Crop", (), {"mode": "foreground"})()})()
    cfg = bundle_mod.ExportConfig(checkpoint=tmp_path / "best.pt", station_val_images=1000,
                                  quantize=QuantizeConfig(calibration_images=64))
    sets = bundle_mod._station_sets(cfg, spec, loaded_train, loaded_val)   # streams: nothing rendered yet
    # then: the station-view validation and calibration sets render only the other images, all of them here
    seen = {str(tmp_path / f"img/{i}.png") for i in range(0, 30, 3)}
    val_paths, calib_paths = ({str(p) for p in sets[part].paths} for part in ("val", "calibration"))
    assert not (val_paths | calib_paths) & seen
    assert val_paths == {str(tmp_path / f"img/{i}.png") for i in val} - seen
    assert calib_paths == {str(tmp_path / f"img/{i}.png") for i in train} - seen
    # a split saved before the mark (no as_seen list) loads every image as a plain one
    old = json.loads((tmp_path / "split.json").read_text())
    del old["as_seen"]
    (tmp_path / "split.json").write_text(json.dumps(old))
    assert not any(s.as_seen for part in bundle_mod._split_samples(tmp_path, ["a", "b"]) for s in part)


def test_the_station_view_set_is_drawn_from_every_class_of_a_split_listed_class_by_class(tmp_path):
    # given: a split that lists its validation images class by class, as every run saves it, and a station-view
    # set of a fifth of them (the export's default: 1,000 of the recipe's 6,000)
    from trainer import data as data_mod
    from trainer.export import bundle as bundle_mod
    from trainer.export.quantize import QuantizeConfig

    classes = ["a", "b", "c", "d", "e"]
    samples = [data_mod.Sample(tmp_path / f"img/{c}-{i}.png", k) for k, c in enumerate(classes) for i in range(60)]
    dataset = data_mod.Dataset(tmp_path, classes, samples, "folders")
    val = list(range(len(samples)))                          # class by class
    data_mod.save_split(tmp_path / "split.json", dataset, val[:5], val, seed=0)
    train, loaded_val = bundle_mod._split_samples(tmp_path, classes)
    spec = type("Spec", (), {"crop": type("Crop", (), {"mode": "foreground"})()})()
    cfg = bundle_mod.ExportConfig(checkpoint=tmp_path / "best.pt", station_val_images=60,
                                  quantize=QuantizeConfig(calibration_images=4))
    sets = bundle_mod._station_sets(cfg, spec, train, loaded_val)
    # then: its unknown threshold, review thresholds and INT8 gate see every class, about equally, not the first one
    counts = np.bincount(sets["val"].labels, minlength=len(classes))
    assert counts.sum() == 60 and counts.min() >= 6 and counts.max() <= 20, counts
    # the same draw for the parity images and --val-limit: spread, in order, all when asked for more
    picked = data_mod.spread(len(samples), 60)
    assert picked == sorted(set(picked)) and len(picked) == 60
    assert np.bincount([samples[i].label for i in picked], minlength=len(classes)).min() >= 6
    assert data_mod.spread(10, None) == data_mod.spread(10, 50) == list(range(10))


def test_an_export_with_nothing_to_render_a_fallback_graph_and_a_nan_int8_model_publishes_safely(
        trained_run, tmp_path, monkeypatch):
    """One small export for what used to crash it or misreport it:

    - a foreground-crop run whose validation images are all a station's own frames (``as_seen``): no station view
      to render (the station gate's argmax on an empty array crashed the export); the gate is skipped, and said so;
    - another export of the same version under way: its partial folder was deleted by this one;
    - the reports were written after the bundle was published (a failure there left a published bundle behind an
      error, and a rerun said "version already exists");
    - the dynamo exporter failing: the TorchScript fallback writes opset 17, the manifest said 18;
    - an INT8 model with NaN outputs on one validation image: its unknown-score threshold was NaN (the export
      crashed); now it is not deployable, with the reason, and no NaN reaches the manifest or the reports."""
    import dataclasses

    import torch

    from contract.messages import loads_finite
    from contract.preprocess import CropPolicy, InputSpec
    from trainer.export import bundle as bundle_mod
    from trainer.export.onnx import written_opset

    # given: the trained run as a foreground-crop run whose validation split is all station frames
    run = tmp_path / "run"
    run.mkdir()
    ckpt = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    spec = InputSpec.from_manifest(ckpt["input"])
    ckpt["input"] = dataclasses.replace(spec, crop=CropPolicy("foreground", 0.0)).to_manifest()
    torch.save(ckpt, run / "best.pt")
    split = json.loads((trained_run / "split.json").read_text())
    split["as_seen"] = [path for path, _ in split["val"]]
    (run / "split.json").write_text(json.dumps(split))
    shutil.copy(trained_run / "data_report.json", run / "data_report.json")
    other = tmp_path / "models" / "seen" / ".1.partial"                     # another export's, under way
    other.mkdir(parents=True)
    (other / "model.fp32.onnx").write_bytes(b"half written by another export")
    real_export = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated: torch.export cannot trace this model")
        return real_export(*args, **kwargs)

    real_outputs = bundle_mod.onnx_outputs

    def int8_nan_on_first_image(path, inputs, *args, **kwargs):
        outputs = real_outputs(path, inputs, *args, **kwargs)
        if Path(path).name == "model.int8.onnx" and len(outputs[0]):
            outputs = [o.copy() for o in outputs]
            outputs[0][0], outputs[1][0] = np.nan, np.nan
        return outputs

    final_dir = tmp_path / "models" / "seen" / "1"
    published_when_reported = []
    real_reports = bundle_mod.write_reports

    reported_logits = {}

    def reports(out_dir, metrics, paths, logits, labels):
        published_when_reported.append(final_dir.exists())
        reported_logits[Path(out_dir).name] = logits
        return real_reports(out_dir, metrics, paths, logits, labels)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    monkeypatch.setattr(bundle_mod, "onnx_outputs", int8_nan_on_first_image)
    monkeypatch.setattr(bundle_mod, "write_reports", reports)
    result = bundle_mod.export_bundle(bundle_mod.ExportConfig(
        checkpoint=run / "best.pt", models_dir=tmp_path / "models", name="seen", version="1", tensorrt="off",
        workers=0, val_limit=40, parity_images=8, open_set_images=64, quantize=QuantizeConfig(calibration_images=16)))
    q = result.manifest["quality"]
    # then: no station-view gate, and the manifest says why; the thresholds come from the validation images
    assert q["station_view"] is None and "every validation image is a station's own frame" in q["station_view_skipped"]
    assert q["thresholds_from"]["set"] == "val" and result.manifest["open_set"]["calibration"]["set"] == "val"
    # the other export's folder is untouched, and this one's is gone
    assert sorted(p.name for p in final_dir.parent.iterdir()) == [".1.partial", "1"]
    assert (other / "model.fp32.onnx").read_bytes() == b"half written by another export"
    # both reports written before the bundle appeared under models/
    assert published_when_reported == [False, False]
    # the opset of the file, not the exporter's default
    assert written_opset(final_dir / "model.fp32.onnx") == 17 == result.manifest["frameworks"]["opset"]
    # the INT8 model is not deployable, with the reason; it has no unknown threshold of its own
    bundle = load_bundle(final_dir)
    assert not bundle.artifact("onnx-int8").deployable and bundle.pick_onnx().role == "onnx-fp32"
    assert q["int8"]["reason"] == "INT8 model gives non-finite logits (NaN or infinity) on 1 of 40 validation images"
    assert "threshold_int8" not in result.manifest["open_set"] and bundle.open_set.int8_threshold is None
    assert set(result.manifest["open_set"]["keep_thresholds"]) == {"fp32"}
    # its NaN image predicts no class, so it agrees with FP32 on none (its argmax, 0, was counted as a class-0
    # prediction, agreeing with FP32's on the first validation image, of class 0)
    fp32_top1, int8_logits = reported_logits["fp32"].argmax(1), reported_logits["int8"]
    assert fp32_top1[0] == 0 and np.isnan(int8_logits[0]).all()
    assert q["int8"]["top1_agreement"] == ((int8_logits.argmax(1) == fp32_top1)[1:]).sum() / 40
    # and its report counts the NaN image as a wrong one, in strict JSON
    int8_report = loads_finite((run / "export-1" / "int8" / "metrics.json").read_text())
    assert int8_report["non_finite_images"] == 1 and int8_report["images"] == 40
