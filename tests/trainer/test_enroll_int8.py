"""Enrolment gated on the INT8 model too (trainer/enroll.py, docs/enrol.md "The gate"): a station on a CPU with VNNI
runs the bundle's INT8 ONNX model (a Jetson an INT8 TensorRT engine built from it), and computes the enrolled logit
from that model's embedding; the old classes' promise must hold for what it runs.

Until 2026-12-07 the gate measured the FP32 model only. The bundle is the colour bundle of
tests/agent/agent_support.py (a real two-output ONNX model in ONNX Runtime) with an INT8 model added: the same graph,
its embedding output passed through real QuantizeLinear/DequantizeLinear nodes (uint8, per channel). Quantized
with a range that holds every colour, the INT8 model decides like the FP32 one; quantized with a green-channel range
that starts at 0 (as a calibration that never saw a negative value there would set it), the red, blue and belt
frames' green channel is clipped up towards yellow's: the enrolled yellow row, fitted and capped on the FP32
embedding, takes red frames on the INT8 model while the FP32 gate loses nothing. TensorRT cannot run here: its INT8
engines are built from this INT8 ONNX model, which stands for them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_enroll import _agent_support, _colour_images, _refused, _tree, colour_setup

import trainer.enroll as enroll_module
from contract.bundle import MANIFEST, ROLE_INT8, artifact_entry, load_bundle
from contract.events import read_gate
from trainer.enroll import EnrolConfig, EnrolError, enroll

SPAN = 4.0          # the normalized colours lie in [-2, 2]: a uint8 range that holds every one of them


def _add_int8_model(bundle: Path, green_from: float | None = None, deployable: bool = True,
                    nan_when_bright: bool = False) -> Path:
    """The colour bundle's model with its embedding quantized (QuantizeLinear/DequantizeLinear, uint8, per channel)
    written as the bundle's ``onnx-int8`` artifact; ``green_from``: the green channel's range starts there (values
    below it are clipped up to it) instead of holding every colour; ``nan_when_bright``: its embedding is NaN for a
    white frame (the FP32 model's is not)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(bundle / "model.fp32.onnx"))
    graph = model.graph
    ident = next(n for n in graph.node if n.output[0] == "embedding")
    ident.output[0] = "embedding_fp32"
    scale = np.full(3, SPAN / 255.0, np.float32)
    zero = np.full(3, 128, np.uint8)
    if green_from is not None:              # [green_from, green_from + SPAN]
        zero[1] = int(round(-green_from / scale[1]))
    inits = [numpy_helper.from_array(scale, "emb_scale"), numpy_helper.from_array(zero, "emb_zero")]
    dequantized = "embedding_dq" if nan_when_bright else "embedding"
    nodes = [helper.make_node("QuantizeLinear", ["embedding_fp32", "emb_scale", "emb_zero"], ["embedding_q"], axis=1),
             helper.make_node("DequantizeLinear", ["embedding_q", "emb_scale", "emb_zero"], [dequantized], axis=1)]
    if nan_when_bright:
        _agent_support()._nan_when_bright(dequantized, "embedding", inits, nodes)
    graph.initializer.extend(inits)
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(bundle / "model.int8.onnx"))
    manifest = json.loads((bundle / MANIFEST).read_text())
    entry = artifact_entry(bundle / "model.int8.onnx", bundle, role=ROLE_INT8, precision="int8", deployable=deployable)
    if not deployable:
        entry["reason"] = "the INT8 gate refused it (test)"
    manifest["artifacts"].append(entry)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    load_bundle(bundle)
    return bundle


@pytest.fixture
def colour_int8(tmp_path):
    """The colour bundle (belt, red, green, blue), 150 gate images of each class, 10 yellow examples, 50 red
    frames the enrolment never sees."""
    support, bundle, gate, yellow = colour_setup(tmp_path)
    red = _colour_images(tmp_path / "red_test", support.OPEN_SET_COLOURS["red"], 50, seed=3)
    return bundle, gate, yellow, red


def _decide(bundle_dir: Path, model: str, paths: list[Path]) -> list[str]:
    """Decisions of a bundle as a station running ``model`` makes them: its outputs, enrolled logits appended from
    its embedding, argmax."""
    from contract.preprocess import Preprocessor, read_image
    from trainer.enroll import model_outputs

    bundle = load_bundle(bundle_dir)
    inputs = Preprocessor(bundle.input_spec).batch([read_image(p) for p in paths])
    logits, emb = model_outputs(bundle_dir / model, inputs, bundle.embedding_name, "logits")
    return [bundle.labels[i] for i in bundle.open_set.full_logits(logits, emb).argmax(1)]


def test_an_enrolment_whose_int8_model_loses_the_old_classes_is_refused_naming_it(colour_int8, tmp_path,
                                                                                 monkeypatch, capsys):
    """Yellow passes the FP32 gate (nothing lost) but takes red frames on an INT8 model whose green channel is
    clipped at 0: refused, naming the INT8 model and both figures, nothing written; the report has both."""
    bundle, gate, yellow, red = colour_int8
    _add_int8_model(bundle, green_from=0.0)
    cfg = EnrolConfig(bundle=bundle, label="yellow", images=yellow, gate_data=gate, version="2")

    dry = enroll(EnrolConfig(**{**cfg.__dict__, "dry_run": True})).report
    assert dry["gate"]["passed"] and dry["gate"]["drop_points"] <= 0.5                  # FP32: passed
    int8 = dry["int8"]
    assert int8["model"] == "model.int8.onnx" and not int8["gate"]["passed"]
    assert int8["gate"]["drop_points"] > 0.5 and int8["gate"]["max_drop_points"] == 0.5
    assert int8["gate"]["held_out_images"] == dry["gate"]["held_out_images"]             # the same gate images
    assert int8["gate"]["accuracy_after"] < int8["gate"]["accuracy_before"]

    message = _refused(cfg, bundle.parent, "INT8 model (model.int8.onnx", "'yellow' not enrolled",
                       f"lose {int8['gate']['drop_points']:.2f} points", "at most 0.5 allowed",
                       f"the FP32 model: {dry['gate']['drop_points']:.2f}")
    with pytest.raises(EnrolError) as info:
        enroll(cfg)
    assert info.value.report["int8"]["gate"] == int8["gate"], message
    from trainer.cli import _print_enrolment  # the CLI prints both verdicts

    _print_enrolment(dry)
    printed = capsys.readouterr().out
    assert "old classes" in printed and ": passed" in printed
    assert f"on INT8       {int8['gate']['accuracy_before'] * 100:.2f}%" in printed and ": FAILED" in printed

    # what the gate saw is what such a station would do: the FP32 gate alone (as until 2026-12-07) writes the same
    # row, and on unseen red frames the FP32 model keeps them red while the INT8 model takes them for yellow
    monkeypatch.setattr(enroll_module, "int8_model", lambda _bundle: None)
    fp32_only = enroll(EnrolConfig(**{**cfg.__dict__, "models_dir": tmp_path / "elsewhere"}))
    assert fp32_only.report["gate"] == dry["gate"]
    on_fp32 = _decide(fp32_only.bundle_dir, "model.fp32.onnx", red)
    on_int8 = _decide(fp32_only.bundle_dir, "model.int8.onnx", red)
    assert on_fp32.count("red") >= 48 and on_int8.count("yellow") >= 40, (on_fp32, on_int8)


def test_a_normal_enrolment_reports_the_int8_figures_beside_the_fp32_ones(colour_int8):
    """With an INT8 model quantized over the colours' whole range, yellow enrols; the report, the manifest's
    quality.enrolment block and the gate record carry the INT8 figures in the FP32 ones' format. At 2 points: at
    0.5 the 300 held-out images allow one image lost, the FP32 model loses one (0.33 points) and this INT8 model's
    rounding one more (0.67 points, refused: the gate doing its job at the margin)."""
    bundle, gate, yellow, red = colour_int8
    _add_int8_model(bundle)
    result = enroll(EnrolConfig(bundle=bundle, label="yellow", images=yellow, gate_data=gate, version="2",
                                max_drop_points=2.0))
    report = result.report
    int8, fp32 = report["int8"], report["gate"]
    assert int8["model"] == "model.int8.onnx"
    assert set(int8["gate"]) == set(fp32) and int8["gate"]["passed"] and int8["gate"]["drop_points"] <= 2.0
    assert int8["gate"]["images"] == fp32["images"] == 600 and int8["gate"]["held_out_images"] == 300
    assert int8["recall_examples"] >= 0.9 and int8["recall_leave_one_out"] >= 0.9
    assert [c["max_drop_points"] for c in int8["allowances"]] == [c["max_drop_points"] for c in report["allowances"]]
    assert all(set(c) == {"max_drop_points", "recall_leave_one_out", "drop_points"} for c in int8["allowances"])
    manifest = json.loads((result.bundle_dir / MANIFEST).read_text())
    assert manifest["quality"]["enrolment"]["yellow"]["int8"] == int8
    gate_record = read_gate(result.bundle_dir)
    assert gate_record["figures"]["old_drop_points_int8"] == int8["gate"]["drop_points"]
    assert "on the INT8 model" in gate_record["reason"]
    assert _decide(result.bundle_dir, "model.int8.onnx", red).count("red") >= 48


@pytest.mark.parametrize("int8_model", ["none", "not deployable"])
def test_without_a_deployable_int8_model_the_report_says_none(colour_int8, int8_model):
    """A station never runs an INT8 model the export marked not deployable: only the FP32 gate applies."""
    bundle, gate, yellow, _red = colour_int8
    if int8_model == "not deployable":
        _add_int8_model(bundle, green_from=0.0, deployable=False)       # would be refused, were it deployable
    before = _tree(bundle.parent)
    report = enroll(EnrolConfig(bundle=bundle, label="yellow", images=yellow, gate_data=gate, dry_run=True)).report
    assert report["int8"] is None and report["gate"]["passed"]
    assert _tree(bundle.parent) == before


def test_gate_images_the_int8_model_gives_no_finite_outputs_for_are_left_out_of_its_figures(colour_int8, tmp_path):
    """Two white belt frames give the INT8 model a NaN embedding (the FP32 model's is finite): its figures are
    measured on the other gate images and stay finite, and the FP32 ones keep all of them."""
    from PIL import Image

    bundle, gate, yellow, _red = colour_int8
    _add_int8_model(bundle, nan_when_bright=True)
    for i in range(2):
        Image.new("RGB", (16, 16), (255, 255, 255)).save(gate / "belt" / f"white{i}.png")
    report = enroll(EnrolConfig(bundle=bundle, label="yellow", images=yellow, gate_data=gate, dry_run=True,
                                max_drop_points=2.0)).report
    assert report["gate"]["images"] == 602 and report["int8"]["gate"]["images"] == 600
    figures = [v for v in report["int8"]["gate"].values() if isinstance(v, float)]
    figures += [report["int8"]["recall_examples"], report["int8"]["recall_leave_one_out"]]
    assert all(np.isfinite(figures)) and report["int8"]["gate"]["passed"]
    assert report["int8"]["gate"]["held_out_images"] in (report["gate"]["held_out_images"] - 2,
                                                          report["gate"]["held_out_images"] - 1,
                                                          report["gate"]["held_out_images"])
