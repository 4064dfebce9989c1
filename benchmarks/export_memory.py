"""Peak memory of `python -m trainer export` with INT8 calibration: ResNet50 at 224 px, old path against new.

A user's export of a ResNet50 at 224 px with the default 512 calibration images was killed for memory at
24 GB: ONNX Runtime's calibrator (quantize_static with a data reader) keeps the intermediate outputs of
every batch until the reader is empty. The export now computes the ranges one batch at a time
(trainer/export/quantize.py, calibration_ranges) and hands them to quantize_static.

Each export runs in its own child process (the real ``export_bundle``: ONNX export, parity, calibration,
INT8 gate); the parent reads the child's peak RSS from ``os.wait4``. The old path (quantize_static fed all
batches, 32 at a time, as before) runs with 64 images only: with 512 it needs more than 24 GB. The
checkpoint is a ResNet50 with random weights (no ResNet50 weights here) trained for one step by the
trainer on Fashion-MNIST, so the model, input size and export are the real ones; its accuracy is not.

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/export_memory.py             # about 10 min on 2 cores
    python benchmarks/export_memory.py --counts 64 --old-count 16 --size 64     # quick look

The export's images (validation, parity, calibration, open-set fit) are streamed a chunk at a time
(trainer.evaluate.ModelInputs); before, each set was held whole. ``--train-images`` and
``--val-fraction`` size those sets, and ``--old-count 0`` leaves the old calibration path out:

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/export_memory.py --counts 512 --old-count 0 --size 128 \
        --train-images 3000 --val-fraction 0.2 --val-limit 256 --json benchmarks/results/export_memory_streamed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def build_checkpoint(work: Path, size: int, train_images: int, val_fraction: float = 0.05) -> Path:
    """A ResNet50 checkpoint the way the trainer writes one: one training step, random initial weights."""
    from trainer.config import TrainConfig
    from trainer.data import import_fashion_mnist
    from trainer.engine import Trainer

    data = work / "fashion-mnist"
    import_fashion_mnist(data, FMNIST, limit=train_images)
    run_dir = work / "runs" / "resnet50"
    cfg = TrainConfig(data=str(data / "train"), name="resnet50", arch="resnet50", weights="none", image_size=size,
                      epochs=1, batch_size=8, max_steps_per_epoch=1, val_fraction=val_fraction, workers=0, amp=False,
                      device="cpu", seed=0)
    Trainer(cfg, run_dir).fit()
    return run_dir / "best.pt"


def legacy_quantize_qdq(fp32_path, out_path, calibration, cfg, input_name="input") -> dict:
    """The old path: quantize_static fed every batch (32 images) through one reader, ORT keeping all outputs."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    size = max(b for b in range(1, min(32, len(calibration)) + 1) if len(calibration) % b == 0)
    batches = iter([{input_name: calibration[i:i + size]} for i in range(0, len(calibration), size)])
    reader = type("AllBatches", (), {"get_next": lambda self: next(batches, None)})()
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "OpTypesToExcludeOutputQuantization": ["Gemm"],
             "CalibPercentile": cfg.percentile}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile, extra_options=extra)
    return {"calibration_images": int(len(calibration)), "method": "percentile", "per_channel": cfg.per_channel,
            "batch_size": size, "float_outputs": ["logits"]}


def child(args: argparse.Namespace) -> None:
    """One export; prints a JSON line. ``--path old`` swaps the calibration for the legacy one."""
    from trainer.export import bundle as bundle_mod
    from trainer.export.quantize import QuantizeConfig

    if args.child == "old":
        bundle_mod.quantize_qdq = legacy_quantize_qdq
    start = time.perf_counter()
    result = bundle_mod.export_bundle(bundle_mod.ExportConfig(
        checkpoint=Path(args.checkpoint), models_dir=Path(args.models), name="resnet50",
        version=f"{args.child}-{args.images}", quantize=QuantizeConfig(calibration_images=args.images),
        tensorrt="off", workers=0, val_limit=args.val_limit, parity_images=args.val_limit))
    int8 = result.manifest["quality"]["int8"]
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "int8_passed": int8["passed"],
                      "calibration": int8["calibration"]}))


def run_child(path: str, images: int, checkpoint: Path, models: Path, val_limit: int) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--images", str(images), "--checkpoint", str(checkpoint),
           "--models", str(models), "--val-limit", str(val_limit)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"path": path, "images": images, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "exit": proc.returncode}
    if proc.returncode == 0:
        row.update(json.loads(out.strip().splitlines()[-1]))
    print(f"{path:3s} {images:4d} images: peak RSS {row['peak_rss_mb']:8.1f} MB, exit {proc.returncode}"
          + (f", {row['seconds']} s" if "seconds" in row else ""), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[64, 512], help="calibration images, new path")
    p.add_argument("--old-count", type=int, default=64, help="calibration images, old path (the baseline); 0: not run")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--val-limit", type=int, default=32, help="validation (and parity) images of the export")
    p.add_argument("--train-images", type=int, default=None,
                   help="Fashion-MNIST images the run is made of (default: enough for the largest count)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="the run's validation share")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "export_memory.json")
    p.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_images = args.train_images or max(args.counts) * 21 // 20 + 64
        checkpoint = build_checkpoint(work, args.size, train_images, args.val_fraction)
        rows = [run_child("old", args.old_count, checkpoint, work / "models", args.val_limit)] if args.old_count else []
        rows += [run_child("new", n, checkpoint, work / "models", args.val_limit) for n in args.counts]
    if args.old_count:
        base = rows[0]["peak_rss_mb"]
        for row in rows:
            row["ratio_to_old"] = round(row["peak_rss_mb"] / base, 3)
            print(f"{row['path']} {row['images']:4d}: {row['ratio_to_old']:.3f} x the old path's peak with "
                  f"{args.old_count}")
    calib_mb = max(args.counts) * 3 * args.size * args.size * 4 / 1e6
    report = {"model": "resnet50 (weights none, 1 training step)", "input": args.size,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "baseline": f"old path, {args.old_count} images" if args.old_count else None,
              "train_images": train_images, "val_fraction": args.val_fraction,
              "calibration_array_mb_at_max_count": round(calib_mb, 1), "runs": rows,
              "command": "OMP_NUM_THREADS=2 nice -n 10 python benchmarks/export_memory.py " + " ".join(sys.argv[1:])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
