"""Trainer benchmarks, each with its baseline measured in the same run (docs/benchmarks.md).

1. Training images/s: our loop (decoded-once uint8 canvases, batched augmentation, channels_last,
   denormal flush) against the plain loop of the original design notes (PIL + torchvision
   transforms per image, DataLoader defaults, Adam, no channels_last), same model, data and batch.
2. Inference images/s: PyTorch eager FP32, ONNX Runtime FP32 and INT8 at several batch sizes,
   as ratios to PyTorch eager.
3. Top-1 of the bundle's FP32 and INT8 models on the official Fashion-MNIST test split.

    python benchmarks/trainer_bench.py --bundle models/fashion-mnist/<version> --data data/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.bundle import load_bundle  # noqa: E402
from trainer import data as data_mod  # noqa: E402
from trainer.augment import AugmentConfig, BatchAugment, eval_spec  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.engine import TrainBatches, eval_inputs, load_checkpoint_model  # noqa: E402
from trainer.evaluate import compute_metrics  # noqa: E402
from trainer.model import build_model  # noqa: E402


def _timed_steps(step, batches, warmup: int, steps: int) -> float:
    """Images/s over ``steps`` steps after ``warmup`` steps (data loading included)."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    seen, start = 0, time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        step(x, y)
        seen += len(y)
    return seen / (time.perf_counter() - start)


def plain_loop_rate(samples, image_size: int, batch: int, warmup: int, steps: int, flush_denormal: bool) -> float:
    """The design notes' loop: a PIL Dataset with torchvision transforms, Adam, NCHW."""
    from PIL import Image
    from torchvision import transforms

    torch.set_flush_denormal(flush_denormal)

    class ProductDataset(torch.utils.data.Dataset):
        def __init__(self, items, transform):
            self.items, self.transform = items, transform

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            image = Image.open(self.items[i].path).convert("RGB")
            return self.transform(image), self.items[i].label

    tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(10), transforms.ColorJitter(0.2, 0.2, 0.2), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    loader = torch.utils.data.DataLoader(ProductDataset(samples, tf), batch_size=batch, shuffle=True)
    model = build_model("mobilenet_v2", 10, "imagenet").train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = torch.nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()

    return _timed_steps(step, loader, warmup, steps)


def our_loop_rate(samples, image_size: int, batch: int, warmup: int, steps: int) -> float:
    """Trainer's loop: canvases decoded once, batched augmentation, channels_last, denormal flush."""
    torch.set_flush_denormal(True)
    spec = eval_spec(image_size, image_size)
    cfg = TrainConfig(data="", batch_size=batch, workers=2)
    gen = torch.Generator().manual_seed(0)
    batches = TrainBatches(samples, spec, cfg, gen)  # decoding once is part of the loop's cost: timed below
    augment = BatchAugment(AugmentConfig(), spec, gen)
    model = build_model("mobilenet_v2", 10, "imagenet").train().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = torch.nn.CrossEntropyLoss()

    def step(canvas, y):
        x = augment(canvas).contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        crit(model(x), y).backward()
        opt.step()

    def forever():
        while True:
            yield from ((canvas, y) for canvas, y, _ in batches)

    return _timed_steps(step, forever(), warmup, steps)


def bench_training(args) -> dict:
    dataset = data_mod.load_dataset(Path(args.data) / "train", check_images=False)
    dataset = data_mod.limit_per_class(dataset, args.train_images // 10, seed=0)
    start = time.perf_counter()
    ours = our_loop_rate(dataset.samples, args.image_size, args.batch, 3, args.train_steps)
    decode_s = time.perf_counter() - start
    plain = plain_loop_rate(dataset.samples, args.image_size, args.batch, 3, args.train_steps, flush_denormal=False)
    plain_flush = plain_loop_rate(dataset.samples, args.image_size, args.batch, 3, args.train_steps, flush_denormal=True)
    return {"images": len(dataset.samples), "batch": args.batch, "image_size": args.image_size,
            "steps": args.train_steps, "ours_img_s": ours, "plain_img_s": plain, "plain_flush_denormal_img_s": plain_flush,
            "ratio_ours_vs_plain": ours / plain, "ratio_ours_vs_plain_flush": ours / plain_flush,
            "ours_wall_s_including_decode": decode_s}


def _rate(fn, x: np.ndarray, seconds: float) -> float:
    fn(x)
    fn(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - start)


def bench_inference(args, bundle, checkpoint: Path) -> list[dict]:
    import onnxruntime as ort

    torch.set_flush_denormal(False)  # PyTorch eager as users run it by default
    model, _ = load_checkpoint_model(checkpoint)
    spec = bundle.input_spec
    rng = np.random.default_rng(0)
    sessions = {}
    for role in ("onnx-fp32", "onnx-int8"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        sessions[role] = ort.InferenceSession(str(bundle.artifact(role).path), opts, providers=["CPUExecutionProvider"])
    rows = []
    for bs in args.batch_sizes:
        x = rng.standard_normal((bs, 3, spec.height, spec.width)).astype(np.float32)

        def eager(a):
            with torch.inference_mode():
                model(torch.from_numpy(a))

        r_eager = _rate(eager, x, args.seconds)
        r_fp32 = _rate(lambda a: sessions["onnx-fp32"].run(None, {"input": a}), x, args.seconds)
        r_int8 = _rate(lambda a: sessions["onnx-int8"].run(None, {"input": a}), x, args.seconds)
        rows.append({"batch": bs, "eager_fp32_img_s": r_eager, "ort_fp32_img_s": r_fp32, "ort_int8_img_s": r_int8,
                     "ort_fp32_vs_eager": r_fp32 / r_eager, "ort_int8_vs_eager": r_int8 / r_eager})
    return rows


def bench_accuracy(args, bundle) -> dict:
    from trainer.evaluate import onnx_logits

    test = data_mod.load_dataset(Path(args.data) / "test", classes=bundle.labels, check_images=False)
    x, y = eval_inputs(test.samples, bundle.input_spec, 2, desc="preprocess test split")
    out = {"images": len(y)}
    for role in ("onnx-fp32", "onnx-int8"):
        logits = onnx_logits(bundle.artifact(role).path, x.numpy())
        m = compute_metrics(logits, y.numpy(), bundle.labels)
        out[role] = {"top1": m["accuracy"], "macro_f1": m["macro_f1"]}
    out["int8_minus_fp32_points"] = (out["onnx-int8"]["top1"] - out["onnx-fp32"]["top1"]) * 100
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the bundle's provenance checkpoint")
    p.add_argument("--data", default="data/fashion-mnist")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-images", type=int, default=5000)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=5.0, help="per inference measurement")
    p.add_argument("--skip", nargs="*", default=[], choices=["training", "inference", "accuracy"])
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    checkpoint = args.checkpoint or Path(bundle.manifest["provenance"]["checkpoint"])
    results = {"bundle": str(args.bundle), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if "training" not in args.skip:
        t = results["training"] = bench_training(args)
        print(f"training img/s  ours {t['ours_img_s']:.0f}  plain {t['plain_img_s']:.0f}  "
              f"ratio {t['ratio_ours_vs_plain']:.2f}x  (plain + flush-denormal {t['plain_flush_denormal_img_s']:.0f}, "
              f"ratio {t['ratio_ours_vs_plain_flush']:.2f}x)", flush=True)
    if "inference" not in args.skip:
        results["inference"] = bench_inference(args, bundle, checkpoint)
        for r in results["inference"]:
            print(f"inference batch {r['batch']:>3}  eager FP32 {r['eager_fp32_img_s']:8.0f} img/s  "
                  f"ORT FP32 {r['ort_fp32_img_s']:8.0f} ({r['ort_fp32_vs_eager']:.2f}x)  "
                  f"ORT INT8 {r['ort_int8_img_s']:8.0f} ({r['ort_int8_vs_eager']:.2f}x)", flush=True)
    if "accuracy" not in args.skip:
        a = results["accuracy"] = bench_accuracy(args, bundle)
        print(f"official test split ({a['images']} images): FP32 top-1 {a['onnx-fp32']['top1'] * 100:.2f}%  "
              f"INT8 top-1 {a['onnx-int8']['top1'] * 100:.2f}%  (INT8 - FP32 {a['int8_minus_fp32_points']:+.2f} points)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
