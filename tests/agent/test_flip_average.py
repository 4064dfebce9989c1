"""model.flip_average: each crop and its mirror image through the real ONNX model, their logits averaged.

A tiny random-weight CNN (tests/agent/agent_support.py make_tiny_bundle: a stride-2 convolution, so a mirrored
image gives other logits) in a real ONNX Runtime session, run through the inference stage alone; the expected
probabilities are computed here from the same session on the preprocessed frame and its mirror."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from agent_support import as_config, inference_stage, make_tiny_bundle, station_config

from agent.decide import softmax
from agent.sources.base import Frame
from contract.bundle import load_bundle
from contract.preprocess import Preprocessor


def lopsided(side: int = 32) -> np.ndarray:
    """Bright on the left, dark on the right, a colour ramp down: not its own mirror image."""
    img = np.zeros((side, side, 3), np.uint8)
    img[:, : side // 3] = (240, 200, 40)
    img[:, :, 2] = np.linspace(0, 255, side, dtype=np.uint8)[:, None]
    return img


def result_probs(tmp_path, bundle_dir, labels: list[str], frame_image: np.ndarray, flip: bool) -> np.ndarray:
    cfg = as_config(station_config(tmp_path, bundle_dir, "unused", 1, frames={"enabled": False},
                                   model={"flip_average": flip}, decisions={"top_k": len(labels)}))
    assert cfg.model.flip_average is flip
    stage, outbox, _, _ = inference_stage(cfg, bundle_dir)
    stage.process([Frame("cam-a", 1, 1000.0, 0.0, frame_image)])
    (result,) = [r.body for r in outbox.pending(limit=10) if r.kind == "result"]
    outbox.close()
    probs = {entry["label"]: entry["p"] for entry in result["top_k"]}
    return np.array([probs[label] for label in labels])


def test_flip_average_averages_the_logits_of_the_crop_and_its_mirror(tmp_path):
    bundle_dir = make_tiny_bundle(tmp_path / "models")
    bundle = load_bundle(bundle_dir)
    frame_image = lopsided()
    x = Preprocessor(bundle.input_spec)(frame_image)[None]
    session = ort.InferenceSession(str(bundle_dir / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    plain = session.run(None, {"input": x})[0][0]
    mirrored = session.run(None, {"input": np.ascontiguousarray(x[..., ::-1])})[0][0]
    assert np.abs(softmax(plain) - softmax(mirrored)).max() > 1e-3      # the mirror matters for this model

    off = result_probs(tmp_path / "off", bundle_dir, bundle.labels, frame_image, flip=False)
    on = result_probs(tmp_path / "on", bundle_dir, bundle.labels, frame_image, flip=True)
    np.testing.assert_allclose(off, softmax(plain), atol=2e-5)
    np.testing.assert_allclose(on, softmax((plain + mirrored) / 2), atol=2e-5)
    assert np.abs(on - off).max() > 1e-3


def test_flip_average_is_off_by_default():
    from agent.config import ModelConfig

    assert ModelConfig(bundle="b").flip_average is False
