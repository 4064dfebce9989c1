"""Metrics on known logits, and the same evaluation for a checkpoint and its ONNX export."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from trainer.evaluate import (
    compute_metrics,
    evaluate,
    expected_calibration_error,
    flagged,
    softmax,
    suggest_thresholds,
    within_review_budget,
    write_reports,
)


def test_metrics_on_known_predictions():
    classes = ["a", "b", "c"]
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 1, 2, 2])
    logits = np.full((6, 3), -5.0)
    logits[np.arange(6), labels] = 0.0  # the true class is at least second everywhere
    logits[np.arange(6), preds] = 5.0
    m = compute_metrics(logits, labels, classes, top_k=2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"]["matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["top2_accuracy"] == 1.0


def test_ece_of_perfectly_calibrated_and_overconfident_models():
    labels = np.array([0] * 8 + [1] * 2)
    probs = np.tile([0.8, 0.2], (10, 1))  # says 80% for class 0, right 80% of the time
    ece, _ = expected_calibration_error(probs, labels)
    assert ece == pytest.approx(0.0, abs=1e-9)
    sure = np.tile([0.99, 0.01], (10, 1))
    assert expected_calibration_error(sure, labels)[0] == pytest.approx(0.19)


def test_suggested_thresholds_flag_the_uncertain_mistakes():
    rng = np.random.default_rng(0)
    n = 2000
    labels = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4))
    right = rng.random(n) < 0.85
    logits[np.arange(n), labels] += np.where(right, 6.0, 0.0)  # right answers are confident
    m = compute_metrics(logits, labels, ["a", "b", "c", "d"])
    lc = m["low_confidence"]
    assert lc["errors_caught_fraction"] > 0.5  # each rule alone catches about half of the mistakes
    assert lc["accuracy_unflagged"] > m["accuracy"]
    assert lc["flagged_fraction"] < 0.3
    assert flagged(softmax(logits), m["thresholds"]).mean() == pytest.approx(lc["flagged_fraction"])


def test_review_budget_relaxes_thresholds_that_flag_too_much_and_keeps_those_that_fit():
    rng = np.random.default_rng(1)
    n = 4000
    labels = rng.integers(0, 5, n)
    logits = rng.normal(0, 1, (n, 5))
    right = rng.random(n) < 0.7                      # a hard view: the mistakes' medians flag a third of all rows
    logits[np.arange(n), labels] += np.where(right, rng.uniform(0.5, 6.0, n), 0.0)
    probs = softmax(logits)
    suggested = suggest_thresholds(probs, labels)
    assert flagged(probs, suggested).mean() > 0.2
    for budget in (0.05, 0.10, 0.2):
        capped = within_review_budget(probs, suggested, budget)
        share = flagged(probs, capped).mean()
        assert budget - 0.01 < share <= budget           # uses the budget, and no more
        assert capped["min_confidence"] <= suggested["min_confidence"] and capped["max_entropy"] >= suggested["max_entropy"]
    generous = within_review_budget(probs, suggested, 0.9)
    assert generous == suggested                      # within the budget already: kept as suggested
    with pytest.raises(ValueError, match="review budget"):
        within_review_budget(probs, suggested, 1.5)


def test_checkpoint_and_onnx_evaluate_identically(trained_run, real_bundle, fmnist_dir, tmp_path):
    """FP32 checkpoint and its ONNX export, same images, same code: the same figures."""
    a = evaluate(trained_run / "best.pt", fmnist_dir / "test", tmp_path / "ckpt", limit=20)
    b = evaluate(real_bundle / "model.fp32.onnx", fmnist_dir / "test", tmp_path / "onnx", limit=20)
    c = evaluate(real_bundle / "model.int8.onnx", fmnist_dir / "test", tmp_path / "int8", limit=20)
    assert a["images"] == b["images"] == c["images"] == 200
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert a["accuracy"] == b["accuracy"] > 0.4
    assert abs(c["accuracy"] - b["accuracy"]) < 0.15
    for name in ("metrics.json", "confusion_matrix.json", "confusion_matrix.png", "reliability.png", "worst_mistakes.png"):
        assert (tmp_path / "onnx" / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    assert saved["worst_mistakes"] and saved["worst_mistakes"][0]["true"] != saved["worst_mistakes"][0]["predicted"]


def test_rows_of_non_finite_logits_count_as_wrong_and_no_nan_reaches_metrics_json(tmp_path):
    """NaN rows used to be argmax class 0 (right for class-0 images: accuracy 1.0 with 2 of 3 rows NaN), and their
    NaN made the thresholds NaN and metrics.json invalid JSON."""
    from contract.messages import loads_finite

    logits = np.array([[np.nan, np.nan, np.nan], [np.inf, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    labels = np.array([0, 0, 1, 0])
    m = compute_metrics(logits, labels, ["a", "b", "c"])
    assert m["accuracy"] == 0.5 and m["non_finite_images"] == 2 and m["top3_accuracy"] == 0.5
    assert m["per_class"]["a"]["support"] == 3 and m["per_class"]["a"]["recall"] == pytest.approx(1 / 3)
    assert m["confusion_matrix"]["matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]     # they predicted no class
    assert all(np.isfinite(v) for v in m["thresholds"].values()) and np.isfinite(m["ece"])
    write_reports(tmp_path / "out", m, [tmp_path / "unused.png"] * 4, logits, labels)
    saved = loads_finite((tmp_path / "out" / "metrics.json").read_text())
    assert saved["accuracy"] == 0.5 and saved["worst_mistakes"] == []
    # no finite row at all: nothing to calibrate on, said with None, not NaN
    none_finite = compute_metrics(np.full((2, 3), np.nan), np.array([0, 1]), ["a", "b", "c"])
    assert none_finite["accuracy"] == 0.0 and none_finite["thresholds"] is None and none_finite["ece"] is None
    # a figure that is not finite is refused, naming the file, and never written
    with pytest.raises(ValueError, match=r"bad/metrics.json: a figure is not finite"):
        write_reports(tmp_path / "bad", {**m, "ece": float("nan")}, [tmp_path / "unused.png"] * 4, logits, labels)
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_metrics_of_no_images_or_of_logits_that_do_not_match_the_classes_are_clear_errors():
    abc = ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"no images to compute metrics on"):
        compute_metrics(np.zeros((0, 3)), np.zeros(0, np.int64), abc)
    with pytest.raises(ValueError, match=r"logits: expected 1 x 3 .*got shape \(1, 4\)"):
        compute_metrics(np.zeros((1, 4)), np.array([0]), abc)
    with pytest.raises(ValueError, match=r"labels: expected class indices 0..2"):
        compute_metrics(np.zeros((1, 3)), np.array([-1]), abc)
    single = compute_metrics(np.zeros((2, 1)), np.array([0, 0]), ["only"])   # one class: margin is its probability
    assert single["accuracy"] == 1.0 and single["thresholds"]["min_margin"] == 1.0


def _agent_support():
    """tests/agent/agent_support.py: the agent tests' small real ONNX bundles."""
    path = Path(__file__).resolve().parents[1] / "agent" / "agent_support.py"
    spec = importlib.util.spec_from_file_location("agent_support_for_trainer_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _colour_folders(root: Path, colours: dict, count: int = 3) -> Path:
    from PIL import Image

    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((16, 16, 3), rgb, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_bundles_enrolled_classes_are_scored_as_a_station_scores_them(tmp_path):
    # given: a bundle with an enrolled class (its logit computed from the embedding), and images of every label
    support = _agent_support()
    bundle = support.make_open_set_bundle(tmp_path / "models", enrolled=True)
    name, rgb = support.ENROLLED_COLOUR
    data = _colour_folders(tmp_path / "data", {**support.OPEN_SET_COLOURS, name: rgb})
    # when: its ONNX model is evaluated
    m = evaluate(bundle / "model.fp32.onnx", data, tmp_path / "out", workers=0)
    # then: the enrolled class is predicted where a station predicts it (it had recall 0: raw logits only)
    assert m["per_class"][name] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}
    assert m["accuracy"] == 1.0 and m["confusion_matrix"]["classes"][-1] == name


def test_evaluate_refuses_a_model_with_non_finite_logits_naming_the_file_and_count(tmp_path):
    # given: a bundle whose embedding, so its enrolled class's logit, is NaN on white frames
    support = _agent_support()
    bundle = support.make_open_set_bundle(tmp_path / "models", enrolled=True, nan_embedding_when_bright=True)
    data = _colour_folders(tmp_path / "data", {"red": support.OPEN_SET_COLOURS["red"], "belt": (255, 255, 255)}, 2)
    # then: an error naming the model file and how many images, and no report that would count them
    with pytest.raises(ValueError, match=r"model.fp32.onnx: gives non-finite logits \(NaN or infinity\) on 2 of 4 "
                                         r"images of .*data \(e.g. \[.*belt"):
        evaluate(bundle / "model.fp32.onnx", data, tmp_path / "out", workers=0)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_evaluate_on_a_folder_without_a_readable_image_names_the_folder(tmp_path):
    from trainer.data import DatasetError

    bundle = _agent_support().make_open_set_bundle(tmp_path / "models")
    (tmp_path / "data" / "red").mkdir(parents=True)
    (tmp_path / "data" / "red" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"data: no readable image of the classes .* 1 unreadable image"):
        evaluate(bundle / "model.fp32.onnx", tmp_path / "data", tmp_path / "out", workers=0)


def test_macro_f1_leaves_out_classes_with_no_images_and_no_predictions():
    """A test folder holding 3 of the model's 10 classes, every image right: macro-F1 was 0.3 (the 7 absent classes
    counted as F1 0) and their recall 0 at support 0. The training loop's val_macro_f1 is the same figure."""
    import torch

    from contract.messages import dumps_finite, loads_finite
    from trainer.engine import accuracy_and_f1

    classes = [f"c{i}" for i in range(10)]
    labels = np.random.default_rng(0).integers(0, 3, 300)
    logits = np.eye(10)[labels] * 10
    m = compute_metrics(logits, labels, classes)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert m["per_class"]["c5"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert accuracy_and_f1(torch.tensor(logits), torch.tensor(labels), 10) == (1.0, 1.0)
    # a class predicted but with no image is a mistake: F1 0, in the average; its recall is undefined
    logits[0] = np.eye(10)[7] * 10
    m = compute_metrics(logits, labels, classes)
    assert m["per_class"]["c7"] == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx(np.mean([m["per_class"][c]["f1"] for c in ("c0", "c1", "c2", "c7")]))
    assert accuracy_and_f1(torch.tensor(logits), torch.tensor(labels), 10)[1] == pytest.approx(m["macro_f1"])
    assert loads_finite(dumps_finite(m))["per_class"]["c5"]["f1"] is None          # strict JSON: null, not NaN


def test_with_every_class_present_the_training_and_evaluation_macro_f1_agree_with_the_plain_mean():
    import torch

    from trainer.engine import accuracy_and_f1

    rng = np.random.default_rng(1)
    labels, logits = np.arange(500) % 6, rng.normal(size=(500, 6))
    pred = logits.argmax(1)
    plain = np.mean([2 * ((pred == c) & (labels == c)).sum() / ((pred == c).sum() + (labels == c).sum())
                     for c in range(6)])
    assert compute_metrics(logits, labels, list("abcdef"))["macro_f1"] == pytest.approx(plain)
    assert accuracy_and_f1(torch.tensor(logits), torch.tensor(labels), 6)[1] == pytest.approx(plain)
