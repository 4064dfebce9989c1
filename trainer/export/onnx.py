"""ONNX FP32 export with a dynamic batch, checked against PyTorch on real images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

OPSET = 18


def export_onnx(model: nn.Module, out: Path, height: int, width: int, *, input_name: str = "input",
                output_name: str = "logits") -> Path:
    """Write ``model`` as ONNX with a dynamic batch dimension."""
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    example = (torch.zeros(2, 3, height, width),)
    try:
        program = torch.onnx.export(
            model, example, dynamo=True, opset_version=OPSET, input_names=[input_name], output_names=[output_name],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False,
        )
        program.save(str(out))
    except Exception as exc:  # the TorchScript exporter still handles models torch.export cannot trace
        log.warning("dynamo ONNX export failed (%s); using the TorchScript exporter", exc)
        torch.onnx.export(
            model, example, str(out), dynamo=False, opset_version=17, input_names=[input_name],
            output_names=[output_name], dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        )
    import onnx

    onnx.checker.check_model(str(out))
    return out


def parity(model: nn.Module, onnx_path: Path, inputs: np.ndarray, batch_size: int = 64) -> dict:
    """Max absolute logit difference and top-1 agreement of ONNX Runtime vs PyTorch on ``inputs``."""
    from trainer.evaluate import onnx_logits

    model = model.eval().cpu()
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(inputs[i : i + batch_size])) for i in range(0, len(inputs), batch_size)]).numpy()
    got = onnx_logits(onnx_path, inputs, batch_size)
    return {
        "images": int(len(inputs)),
        "max_abs_logit_diff": float(np.abs(ref - got).max()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
    }
