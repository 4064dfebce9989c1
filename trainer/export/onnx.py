"""ONNX FP32 export with a dynamic batch, checked against PyTorch on real images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

OPSET = 18
FALLBACK_OPSET = 17   # the TorchScript exporter's, when the dynamo exporter cannot trace a model


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
        log.warning("dynamo ONNX export failed (%s); using the TorchScript exporter (opset %d)", exc,
                    FALLBACK_OPSET)
        torch.onnx.export(
            model, example, str(out), dynamo=False, opset_version=FALLBACK_OPSET, input_names=[input_name],
            output_names=outputs, dynamic_axes={name: {0: "batch"} for name in [input_name, *outputs]},
        )
    import onnx

    onnx.checker.check_model(str(out))
    return out


def written_opset(path: Path) -> int:
    """The default-domain (ai.onnx) opset an ONNX file was written with: what a manifest records, since the
    exporter's fallback writes FALLBACK_OPSET, not OPSET."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ValueError(f"{path}: imports no ai.onnx opset; not an exported classifier")
    return int(versions[0])


PARITY_RELATIVE_TOLERANCE = 1e-3   # of the largest |logit|, at least 1e-3 absolute


def _finite_rows(*arrays: np.ndarray | None) -> np.ndarray:
    """Per image (row): True where every given output is finite."""
    return np.logical_and.reduce([np.isfinite(a.reshape(len(a), -1)).all(axis=1) for a in arrays if a is not None])


def parity(model: nn.Module, onnx_path: Path, inputs, batch_size: int = 64, arch: str | None = None) -> dict:
    """ONNX Runtime vs PyTorch on ``inputs``: max absolute logit difference, top-1 agreement, and the gate.

    ``inputs``: an N x 3 x H x W float32 array, or trainer.evaluate.ModelInputs (read a chunk at a time: both
    models run on each batch as it comes, and only their outputs are kept).

    The gate (``passed``): every logit within ``PARITY_RELATIVE_TOLERANCE`` of the largest |logit| (float
    arithmetic in another order differs by ~1e-6 of it; a wrong graph by far more), and every top-1
    disagreement a near-tie that the difference itself explains (PyTorch's top-2 margin within twice the
    max difference). A bundle that fails is not deployable. So does a PyTorch reference with NaN or infinity (no
    difference to it can be measured); the figures are then over the images where both outputs are finite.
    """
    from trainer.evaluate import input_batches, joined_outputs, onnx_session

    model = model.eval().cpu()
    if arch is not None:
        from trainer.model import WithEmbedding

        model = WithEmbedding(model, arch).eval()
    session = onnx_session(onnx_path)
    name = session.get_inputs()[0].name
    parts, got_parts = [], []
    with torch.no_grad():
        for batch in input_batches(inputs, batch_size):
            parts.append(model(torch.from_numpy(batch)))
            got_parts.append(session.run(None, {name: batch}))
    got_all = joined_outputs(session, got_parts)
    if arch is not None:
        ref, ref_emb = (torch.cat([p[k] for p in parts]).numpy() for k in (0, 1))
        got, got_emb = got_all[0], got_all[1]
    else:
        ref, ref_emb, got_emb = torch.cat(parts).numpy(), None, None
        got = got_all[0]
    ref_finite, got_finite = _finite_rows(ref, ref_emb), _finite_rows(got, got_emb)
    both = ref_finite & got_finite        # the differences are measured here; any other row fails the gate below
    diff = float(np.abs(ref[both] - got[both]).max()) if both.any() else 0.0
    tolerance = PARITY_RELATIVE_TOLERANCE * max(1.0, float(np.abs(ref[both]).max()) if both.any() else 1.0)
    top2 = np.sort(ref, axis=1)[:, -2:] if len(ref) else np.zeros((0, 2))
    disagree = ref.argmax(1) != got.argmax(1)
    unexplained = int((disagree & both & (top2[:, 1] - top2[:, 0] > 2 * diff)).sum())
    reason = None
    emb_diff = emb_tolerance = None
    if ref_emb is not None and both.any():
        emb_diff = float(np.abs(ref_emb[both] - got_emb[both]).max())
        emb_tolerance = PARITY_RELATIVE_TOLERANCE * max(1.0, float(np.abs(ref_emb[both]).max()))
    if not ref_finite.all():
        reason = (f"PyTorch gives non-finite outputs (NaN or infinity) on {int((~ref_finite).sum())} of {len(ref)} "
                  "images; ONNX cannot be checked against them")
    elif not got_finite.all():
        reason = "ONNX Runtime returned non-finite outputs"
    elif emb_diff is not None and not emb_diff <= emb_tolerance:
        reason = f"ONNX embedding differs from PyTorch by up to {emb_diff:.3g} (tolerance {emb_tolerance:.3g})"
    elif not diff <= tolerance:
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
