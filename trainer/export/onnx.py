"""ONNX FP32 export with a dynamic batch, checked against PyTorch on real images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

OPSET = 18


EMBEDDING_NAME = "embedding"


def export_onnx(model: nn.Module, out: Path, height: int, width: int, *, input_name: str = "input",
                output_name: str = "logits", arch: str | None = None, embedding_name: str = EMBEDDING_NAME) -> Path:
    """Write ``model`` as ONNX with a dynamic batch dimension; given its ``arch``, with a second output, the
    embedding (trainer.model.WithEmbedding: what its classifier reads, beside earlier stages' pooled features)."""
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    outputs = [output_name]
    if arch is not None:
        from trainer.model import WithEmbedding

        model = WithEmbedding(model, arch).eval()
        outputs.append(embedding_name)
    example = (torch.zeros(2, 3, height, width),)
    try:
        program = torch.onnx.export(
            model, example, dynamo=True, opset_version=OPSET, input_names=[input_name], output_names=outputs,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False,
        )
        program.save(str(out))
    except Exception as exc:  # the TorchScript exporter still handles models torch.export cannot trace
        log.warning("dynamo ONNX export failed (%s); using the TorchScript exporter", exc)
        torch.onnx.export(
            model, example, str(out), dynamo=False, opset_version=17, input_names=[input_name],
            output_names=outputs, dynamic_axes={name: {0: "batch"} for name in [input_name, *outputs]},
        )
    import onnx

    onnx.checker.check_model(str(out))
    return out


PARITY_RELATIVE_TOLERANCE = 1e-3   # of the largest |logit|, at least 1e-3 absolute


def parity(model: nn.Module, onnx_path: Path, inputs: np.ndarray, batch_size: int = 64, arch: str | None = None) -> dict:
    """ONNX Runtime vs PyTorch on ``inputs``: max absolute logit difference, top-1 agreement, and the gate.

    The gate (``passed``): every logit within ``PARITY_RELATIVE_TOLERANCE`` of the largest |logit| (float
    arithmetic in another order differs by ~1e-6 of it; a wrong graph by far more), and every top-1
    disagreement a near-tie that the difference itself explains (PyTorch's top-2 margin within twice the
    max difference). A bundle that fails is not deployable.
    """
    from trainer.evaluate import onnx_outputs

    model = model.eval().cpu()
    if arch is not None:
        from trainer.model import WithEmbedding

        model = WithEmbedding(model, arch).eval()
    with torch.no_grad():
        parts = [model(torch.from_numpy(inputs[i : i + batch_size])) for i in range(0, len(inputs), batch_size)]
    if arch is not None:
        ref, ref_emb = (torch.cat([p[k] for p in parts]).numpy() for k in (0, 1))
        got, got_emb = onnx_outputs(onnx_path, inputs, batch_size)
    else:
        ref, ref_emb, got_emb = torch.cat(parts).numpy(), None, None
        got = onnx_outputs(onnx_path, inputs, batch_size)[0]
    diff = float(np.abs(ref - got).max()) if len(ref) else 0.0
    tolerance = PARITY_RELATIVE_TOLERANCE * max(1.0, float(np.abs(ref).max()) if len(ref) else 1.0)
    top2 = np.sort(ref, axis=1)[:, -2:] if len(ref) else np.zeros((0, 2))
    disagree = ref.argmax(1) != got.argmax(1)
    unexplained = int((disagree & (top2[:, 1] - top2[:, 0] > 2 * diff)).sum())
    reason = None
    emb_diff = emb_tolerance = None
    if ref_emb is not None and len(ref_emb):
        emb_diff = float(np.abs(ref_emb - got_emb).max())
        emb_tolerance = PARITY_RELATIVE_TOLERANCE * max(1.0, float(np.abs(ref_emb).max()))
    if not np.isfinite(got).all() or (got_emb is not None and not np.isfinite(got_emb).all()):
        reason = "ONNX Runtime returned non-finite outputs"
    elif emb_diff is not None and emb_diff > emb_tolerance:
        reason = f"ONNX embedding differs from PyTorch by up to {emb_diff:.3g} (tolerance {emb_tolerance:.3g})"
    elif diff > tolerance:
        reason = f"ONNX logits differ from PyTorch by up to {diff:.3g} (tolerance {tolerance:.3g})"
    elif unexplained:
        reason = f"ONNX top-1 differs from PyTorch on {unexplained} image(s) that are not near-ties"
    return {
        "images": int(len(inputs)),
        "max_abs_logit_diff": diff,
        "top1_agreement": float((~disagree).mean()) if len(ref) else 1.0,
        "tolerance": tolerance,
        "max_abs_embedding_diff": emb_diff,
        "embedding_tolerance": emb_tolerance,
        "passed": reason is None,
        "reason": reason,
    }
