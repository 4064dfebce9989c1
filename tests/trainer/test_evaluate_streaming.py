"""Evaluation streams its images: read, preprocessed, run and dropped a chunk at a time, with the figures and
reports of the whole set at once (``python -m trainer evaluate`` and the retrain gate's ``evaluate_bundle``).

Both held every evaluation image at once (0.6 MB each at 224 px: a 20,000-image test set is 12 GB), so their
memory grew with the test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from trainer_support import count_waiting_images

from contract.bundle import load_bundle
from trainer.evaluate import evaluate
from trainer.retrain import _read_items, evaluate_bundle

REPORTS = ("metrics.json", "confusion_matrix.json", "confusion_matrix.png", "reliability.png", "worst_mistakes.png")


@pytest.fixture
def preprocessed_since_a_model_ran(monkeypatch):
    """Counts the images preprocessed (each goes through the station's Preprocessor) since a model last ran a batch
    (an ONNX Runtime run, or a forward of a checkpoint's torch model): what waits in memory for a model. Streamed,
    at most a chunk plus one model batch (256); an evaluation that preprocesses its whole set first counts it all.
    Only with workers=0 are the images made in this process, where they are counted."""
    return count_waiting_images(monkeypatch, torch_models=True)


def _models(trained_run: Path, real_bundle: Path) -> dict[str, Path]:
    return {"checkpoint": trained_run / "best.pt", "onnx": real_bundle / "model.fp32.onnx"}


def test_evaluation_in_chunks_writes_the_reports_of_the_whole_set_at_once(trained_run, real_bundle, fmnist_dir,
                                                                           tmp_path):
    # given: a checkpoint and its ONNX export, each evaluated with the whole set as one chunk (as evaluate held it
    # before) and in chunks of 7 (no model batch size divides it)
    for kind, model in _models(trained_run, real_bundle).items():
        out = {chunk: tmp_path / kind / str(chunk) for chunk in (100_000, 7)}
        for chunk, folder in out.items():
            evaluate(model, fmnist_dir / "test", folder, workers=0, limit=30, chunk_images=chunk)
        # then: every report is the same, byte for byte (figures, confusion matrix, plots)
        for name in REPORTS:
            assert (out[7] / name).read_bytes() == (out[100_000] / name).read_bytes(), (kind, name)


def test_evaluate_holds_a_chunk_and_a_model_batch_of_preprocessed_images_not_the_whole_set(
        trained_run, real_bundle, fmnist_dir, tmp_path, preprocessed_since_a_model_ran):
    made, chunk = preprocessed_since_a_model_ran, 32
    for kind, model in _models(trained_run, real_bundle).items():
        # given: 1,000 test images, more than a chunk and a model batch hold together
        made.update(since_run=0, peak=0, total=0)
        # when: evaluated
        m = evaluate(model, fmnist_dir / "test", tmp_path / kind, workers=0, chunk_images=chunk)
        # then: every image went through, never more than a chunk and a batch of them waiting for the model
        # (before: all 1,000)
        assert m["images"] == made["total"] == 1000, kind
        assert made["peak"] <= 256 + chunk, (kind, made)


def test_the_retrain_gate_evaluates_a_bundle_a_chunk_at_a_time(real_bundle, fmnist_dir,
                                                               preprocessed_since_a_model_ran):
    # given: the 1,000 test images as the retrain gate's held-out items
    bundle = load_bundle(real_bundle)
    items, _ = _read_items(fmnist_dir / "test", "holdout")
    assert len(items) == 1000 and {i.label for i in items} <= set(bundle.labels)
    made = preprocessed_since_a_model_ran
    # when: scored in chunks of 32, and as one chunk (the figures before streaming)
    streamed = evaluate_bundle(bundle, items, bundle.labels, prefer_int8=False, workers=0, chunk_images=32)
    peak = made["peak"]
    whole = evaluate_bundle(bundle, items, bundle.labels, prefer_int8=False, workers=0, chunk_images=100_000)
    # then: the same figures, and never more than a chunk and a model batch of images held (before: all 1,000)
    assert peak <= 256 + 32, made
    assert streamed == whole
    assert streamed.score.images == 1000 and np.isfinite(streamed.macro_f1)
