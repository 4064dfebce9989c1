"""Engine cache on a real GPU: build a TensorRT engine from a bundle's ONNX, restart, hit the cache, run it.

Run where TensorRT is installed (a Jetson image, or a GPU host with the tensorrt wheel):

    python benchmarks/engine_cache_check.py --bundle models/fashion-mnist/<version> --out /tmp/engine-check
    python benchmarks/engine_cache_check.py --out /tmp/engine-check      # a tiny random bundle (needs torch)

Writes ``engine_cache_check.json`` into ``--out``: device, both ensure_engine results
(built, then cache), and where cuda-python is present the largest difference between
the engine's logits and ONNX Runtime's on the same random batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.engine_cache import EngineCacheError, ensure_engine, probe_device  # noqa: E402
from contract.bundle import Bundle, artifact_entry, load_bundle  # noqa: E402

log = logging.getLogger("engine_cache_check")


def tiny_bundle(root: Path) -> Path:
    """A small random CNN exported to ONNX with a dynamic batch (torch is only needed here)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    folder = root / "tiny" / "gpu-check"
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "model.fp32.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), str(onnx_path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    manifest = {
        "schema_version": 1, "name": "tiny", "version": "gpu-check", "created_at": "2026-11-26T00:00:00+00:00",
        "architecture": "tiny-cnn", "frameworks": {"torch": torch.__version__}, "labels": [f"c{i}" for i in range(10)],
        "input": {"height": 32, "width": 32, "resize_shorter": 32, "interpolation": "bilinear",
                  "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channel_order": "RGB", "layout": "NCHW",
                  "dtype": "float32", "input_name": "input", "output_name": "logits"},
        "artifacts": [artifact_entry(onnx_path, folder, role="onnx-fp32", precision="fp32", deployable=True)],
        "quality": {"thresholds": {"min_confidence": 0.5, "min_margin": 0.1, "max_entropy": 1.5}},
        "provenance": {"code_version": "gpu-check"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def compare_with_onnxruntime(bundle: Bundle, engine_path: Path, precision: str, batch: int) -> dict:
    import onnxruntime as ort

    from agent.backends.tensorrt import TensorRTBackend

    spec = bundle.input_spec
    x = np.random.default_rng(0).standard_normal((batch, 3, spec.height, spec.width)).astype(np.float32)
    backend = TensorRTBackend(engine_path, spec, precision=precision, max_batch=batch)
    start = time.perf_counter()
    got = backend.run(x)
    trt_ms = (time.perf_counter() - start) * 1000
    session = ort.InferenceSession(str(bundle.pick_onnx(prefer_int8=precision == "int8").path),
                                   providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x})[0]
    return {"max_abs_logit_diff": float(np.abs(got - want).max()),
            "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()), "trt_first_run_ms": round(trt_ms, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--precision", choices=["fp16", "int8", "auto"], default="fp16")
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"modules": {m: importlib.util.find_spec(m) is not None
                                for m in ("tensorrt", "cuda", "torch", "onnxruntime")}}
    try:
        device = probe_device()
    except EngineCacheError as exc:
        report["error"] = str(exc)
        (args.out / "engine_cache_check.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return 1
    report["device"] = asdict(device)
    bundle = load_bundle(args.bundle or tiny_bundle(args.out / "models"))
    runs = []
    for _ in range(2):  # first start builds, the "restart" must hit the cache
        result = ensure_engine(bundle, args.out / "engines", args.precision, max_batch=args.max_batch, device=device)
        runs.append({"source": result.source, "build_seconds": round(result.build_seconds, 2),
                     "path": str(result.path), "bytes": result.path.stat().st_size})
    report["runs"] = runs
    if report["modules"]["cuda"]:
        report["parity"] = compare_with_onnxruntime(bundle, result.path, result.key.precision, args.max_batch)
    (args.out / "engine_cache_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if [r["source"] for r in runs] == ["built", "cache"] else 1


if __name__ == "__main__":
    sys.exit(main())
