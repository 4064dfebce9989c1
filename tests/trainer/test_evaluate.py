"""Metrics on known logits, and the same evaluation for a checkpoint and its ONNX export."""

from __future__ import annotations

import json

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
