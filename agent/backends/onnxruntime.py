"""ONNX Runtime backend with a configurable execution-provider order."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from agent.backends.base import BackendError
from agent.preprocess import InputSpec

log = logging.getLogger(__name__)


def pick_providers(preferred: Sequence[str], available: Sequence[str]) -> list[str]:
    """The preferred providers this build has, in preference order; CPU always last resort."""
    chosen = [p for p in preferred if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class OnnxRuntimeBackend:
    def __init__(self, model_path: Path, spec: InputSpec, *, precision: str,
                 providers: Sequence[str] = ("CPUExecutionProvider",), intra_op_threads: int = 0,
                 spinning: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # ORT's pool threads busy-wait between runs by default; on a small CPU that steals the
        # cores the camera, decision and MQTT threads need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0" if not spinning else "1")
        chosen = pick_providers(providers, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"{model_path}: ONNX Runtime cannot load the model ({exc})") from exc
        self.spec = spec
        self.precision = precision
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_name = spec.input_name if spec.input_name in inputs else next(iter(inputs))
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = spec.output_name if spec.output_name in outputs else outputs[0]
        batch_dim = inputs[self.input_name].shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.name = f"onnxruntime:{self.session.get_providers()[0]}"
        log.info("%s: %s (%s), providers %s", model_path.name, self.name, precision, self.session.get_providers())

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch; a model exported with a fixed batch size is fed in chunks."""
        if self.fixed_batch is None or len(batch) == self.fixed_batch:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        parts = []
        for start in range(0, len(batch), self.fixed_batch):
            chunk = batch[start:start + self.fixed_batch]
            pad = self.fixed_batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            parts.append(self.session.run([self.output_name], {self.input_name: chunk})[0][: self.fixed_batch - pad])
        return np.concatenate(parts)

    def warmup(self, batch_size: int, runs: int) -> None:
        """First runs allocate and (with TensorRT EP) build engines; do it before reporting ready."""
        dummy = np.zeros((batch_size, 3, self.spec.height, self.spec.width), np.float32)
        for _ in range(runs):
            self.run(dummy)
