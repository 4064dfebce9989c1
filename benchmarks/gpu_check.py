"""GPU check for the trainer (run on a machine with a CUDA GPU; see docs/benchmarks.md).

1. Training images/s with and without mixed precision on the same GPU, same data and model
   (ResNet50, the production default, 224 px; and MobileNetV2), through the Trainer itself.
2. A short real fine-tune: ImageNet MobileNetV2 on all 60,000 Fashion-MNIST training images,
   evaluated on the official 10,000-image test split.

    python benchmarks/gpu_check.py --data data/fashion-mnist --out gpu-check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import TrainConfig  # noqa: E402
from trainer.engine import Trainer  # noqa: E402


def throughput(data: Path, out: Path, arch: str, size: int, amp: bool, steps: int, batch: int) -> dict:
    cfg = TrainConfig(data=str(data / "train"), arch=arch, weights="none", image_size=size, epochs=2, batch_size=batch,
                      limit_per_class=max(200, steps * batch // 10 + 20), amp=amp, workers=8, seed=0,
                      max_steps_per_epoch=steps, name=f"{arch}-{size}-{'amp' if amp else 'fp32'}")
    Trainer(cfg, out / cfg.name).fit()
    rows = [json.loads(line) for line in (out / cfg.name / "metrics.jsonl").read_text().splitlines()]
    return {"arch": arch, "image_size": size, "batch": batch, "amp": amp,
            "train_img_s_epoch2": rows[-1]["train_images_per_s"]}  # epoch 2: cudnn autotune and caches warm


def fine_tune(data: Path, out: Path, epochs: int) -> dict:
    from trainer.evaluate import evaluate

    cfg = TrainConfig(data=str(data / "train"), arch="mobilenet_v2", weights="imagenet", image_size=64, resize_shorter=64,
                      epochs=epochs, batch_size=128, lr=1e-3, warmup_epochs=0.3, label_smoothing=0.1, workers=8,
                      name="finetune")
    start = time.perf_counter()
    result = Trainer(cfg, out / cfg.name).fit()
    seconds = time.perf_counter() - start
    metrics = evaluate(out / cfg.name / "best.pt", data / "test", out / cfg.name / "test-eval", workers=8)
    rows = [json.loads(line) for line in (out / cfg.name / "metrics.jsonl").read_text().splitlines()]
    return {"epochs": result.epochs_run, "wall_s": seconds, "best_val_accuracy": result.best_metric,
            "test_top1": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
            "train_img_s": [r["train_images_per_s"] for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "throughput": []}
    for arch, size, batch in (("resnet50", 224, 128), ("mobilenet_v2", 224, 128)):
        for amp in (False, True):
            row = throughput(args.data, args.out, arch, size, amp, args.steps, batch)
            report["throughput"].append(row)
            print(json.dumps(row), flush=True)
    for arch in ("resnet50", "mobilenet_v2"):
        rates = {r["amp"]: r["train_img_s_epoch2"] for r in report["throughput"] if r["arch"] == arch}
        print(f"{arch}: AMP {rates[True]:.0f} img/s vs FP32 {rates[False]:.0f} img/s = {rates[True] / rates[False]:.2f}x",
              flush=True)
    report["fine_tune"] = fine_tune(args.data, args.out, args.epochs)
    print(json.dumps(report["fine_tune"]), flush=True)
    (args.out / "gpu_report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
