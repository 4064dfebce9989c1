"""Training augmentation throughput: station views against the plain path, in the same run.

The documented Fashion-MNIST recipe must still train in about 30 minutes on a 2-core CPU, where
the model runs at ~450 images/s at 48 px; this prints images/s of the plain path, of station views
only, and of the default mix (``StationViewConfig.share``), and each one's ratio to the plain path,
for batch 128 at 48 px and batch 32 at 224 px (canvas 256), on real Fashion-MNIST images.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/augment_speed.py --out benchmarks/results/augment_speed.json
    python benchmarks/augment_speed.py --grid /tmp/station_view_grid.png   # 64 rendered views to look at
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.preprocess import CropPolicy  # noqa: E402
from trainer.augment import AugmentConfig, BatchAugment, eval_spec  # noqa: E402
from trainer.data import _read_idx  # noqa: E402
from trainer.station_view import StationViewConfig  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def canvases(count: int, side: int) -> torch.Tensor:
    """The first ``count`` Fashion-MNIST train images as uint8 canvases (3 x side x side)."""
    import cv2

    dims, body = _read_idx(FMNIST, 3)
    images = np.frombuffer(body, np.uint8).reshape(dims)[:count]
    out = np.stack([cv2.resize(im, (side, side), interpolation=cv2.INTER_LINEAR) for im in images])
    return torch.from_numpy(np.repeat(out[:, None], 3, axis=1))


def rate(augment: BatchAugment, batch: torch.Tensor, seconds: float) -> float:
    augment(batch)  # warm-up (bank on device, allocator)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        augment(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def measure(size: int, side: int, batch_size: int, seconds: float) -> dict:
    spec = eval_spec(size, side, crop=CropPolicy(mode="foreground"))
    batch = canvases(batch_size, side)
    configs = {
        "plain": AugmentConfig(),
        "station_view_only": AugmentConfig(station_view=StationViewConfig(share=1.0)),
        "default_mix": AugmentConfig(station_view=StationViewConfig()),
    }
    row = {"image_size": size, "canvas": side, "batch": batch_size}
    for name, cfg in configs.items():
        row[f"{name}_images_per_s"] = round(rate(BatchAugment(cfg, spec, torch.Generator().manual_seed(0)), batch, seconds), 1)
    for name in ("station_view_only", "default_mix"):
        row[f"{name}_vs_plain"] = round(row[f"{name}_images_per_s"] / row["plain_images_per_s"], 3)
    return row


def save_grid(path: Path, size: int = 48) -> None:
    """64 station views of real Fashion-MNIST images (8 x 8, 3x nearest upscale) as a PNG."""
    import torchvision

    spec = eval_spec(size, size, crop=CropPolicy(mode="foreground"))
    batch = canvases(640, size)[::10]
    aug = BatchAugment(AugmentConfig(station_view=StationViewConfig(share=1.0)), spec, torch.Generator().manual_seed(1))
    x = aug(batch) * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
    grid = torchvision.utils.make_grid((x.clamp(0, 1) * 255).round().byte(), nrow=8, padding=2)
    big = grid.repeat_interleave(3, 1).repeat_interleave(3, 2)
    torchvision.io.write_png(big, str(path))
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per configuration")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--grid", type=Path, default=None, help="only write a PNG grid of 64 station views")
    args = parser.parse_args()
    if args.grid:
        save_grid(args.grid)
        return 0
    rows = [measure(48, 48, 128, args.seconds), measure(224, 256, 32, args.seconds)]
    for r in rows:
        print(f"{r['image_size']:>3} px batch {r['batch']:>3}: plain {r['plain_images_per_s']:>7.0f} img/s, "
              f"station view {r['station_view_only_images_per_s']:>6.0f} ({r['station_view_only_vs_plain']:.2f}x), "
              f"default mix {r['default_mix_images_per_s']:>6.0f} ({r['default_mix_vs_plain']:.2f}x)")
    result = {"benchmark": "augment_speed", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
