"""INT8 calibration methods compared on one bundle's FP32 ONNX model: top-1 of each INT8 model vs FP32.

Every INT8 model is made by the product's own quantizer (``trainer.export.quantize.quantize_qdq``: ONNX
Runtime's static quantization, explicit symmetric QDQ, per-channel, the ranges streamed one batch at a time)
from the same calibration images (training images of the bundle's run, chosen as export chooses them), and
scored in ONNX Runtime (CPU) on the run's validation images with the bundle's preprocessing.

    python benchmarks/quantizers.py --bundle models/<name>/<version> [--calibration-images 512]
        [--methods minmax percentile entropy] [--percentiles 99.99 99.999] [--run-dir runs/<name>]
        [--val-limit N] [--tag NAME]

Writes benchmarks/results/quantizers_<tag>.json (with the command) and prints a table. NVIDIA Model
Optimizer is not compared here: it pulls in onnxruntime-gpu and cupy, which replace this project's
onnxruntime, and its INT8 models target TensorRT's kernels on a GPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from contract.bundle import load_bundle  # noqa: E402
from trainer.data import spread  # noqa: E402
from trainer.engine import eval_inputs  # noqa: E402
from trainer.evaluate import onnx_logits  # noqa: E402
from trainer.export.bundle import _calibration_inputs, _split_samples  # noqa: E402
from trainer.export.quantize import QuantizeConfig, quantize_qdq  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--methods", nargs="+", default=["minmax", "percentile", "entropy"],
                   choices=["minmax", "percentile", "entropy"])
    p.add_argument("--percentiles", nargs="+", type=float, default=[99.99, 99.999])
    p.add_argument("--run-dir", type=Path, default=None,
                   help="the bundle's training run (default: its manifest's provenance.run_dir, which is relative to "
                        "where export ran)")
    p.add_argument("--val-limit", type=int, default=None,
                   help="score on N validation images only, drawn over the whole split as the export draws them")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)

    bundle = load_bundle(args.bundle)
    spec = bundle.input_spec
    run_dir = args.run_dir or Path(bundle.manifest["provenance"]["run_dir"])
    if not (run_dir / "split.json").is_file():
        p.error(f"{run_dir / 'split.json'}: not found; pass the bundle's training run with --run-dir")
    train_samples, val_samples = _split_samples(run_dir, list(bundle.labels))
    if args.val_limit:
        val_samples = [val_samples[i] for i in spread(len(val_samples), args.val_limit)]
    val_x, val_y = (t.numpy() for t in eval_inputs(val_samples, spec, args.workers))
    calibration = _calibration_inputs(train_samples, spec, args.calibration_images, args.workers)
    fp32_path = bundle.artifact("onnx-fp32").path
    fp32 = float((onnx_logits(fp32_path, val_x).argmax(1) == val_y).mean())
    print(f"FP32 {fp32 * 100:.2f}% on {len(val_y)} validation images; {len(calibration)} calibration images", flush=True)

    variants = []
    for method in args.methods:
        for pct in (args.percentiles if method == "percentile" else [None]):
            variants.append(QuantizeConfig(calibration_images=args.calibration_images, method=method,
                                           **({"percentile": pct} if pct is not None else {})))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, cfg in enumerate(variants):
            out = Path(tmp) / f"int8-{k}.onnx"
            start = time.monotonic()
            quantize_qdq(fp32_path, out, calibration, cfg, input_name=spec.input_name)
            seconds = time.monotonic() - start
            int8 = float((onnx_logits(out, val_x).argmax(1) == val_y).mean())
            row = {"method": cfg.method, "percentile": cfg.percentile if cfg.method == "percentile" else None,
                   "int8_top1": round(int8, 5), "delta_points": round((int8 - fp32) * 100, 2),
                   "calibration_seconds": round(seconds, 1)}
            rows.append(row)
            label = cfg.method + (f" {cfg.percentile:g}" if row["percentile"] else "")
            print(f"{label:18s} INT8 {int8 * 100:.2f}%  {row['delta_points']:+.2f} points  ({seconds:.0f} s)", flush=True)
    doc = {"benchmark": "quantizers",
           "command": "python benchmarks/quantizers.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "bundle": str(args.bundle), "architecture": bundle.manifest.get("architecture"),
           "input": f"{spec.height}x{spec.width}", "validation_images": int(len(val_y)),
           "calibration_images": int(len(calibration)), "fp32_top1": round(fp32, 5),
           "quantizer": "trainer.export.quantize.quantize_qdq (ONNX Runtime static QDQ, symmetric, per-channel)",
           "rows": rows}
    if args.tag:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"quantizers_{args.tag}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
