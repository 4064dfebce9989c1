"""The main job end to end on bundled defaults: real product images -> trained model -> bundle."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    data_dir: Path = Path("data/fashion-mnist")
    out_dir: Path = Path("runs")
    models_dir: Path = Path("models")
    limit_per_class: int | None = 2000
    epochs: int = 4
    image_size: int = 48
    arch: str = "mobilenet_v2"
    name: str = "fashion-mnist"
    source: Path | None = None          # the Fashion-MNIST IDX files (None: contract.dataset.FASHION_MNIST_DIR)


def demo_train_config(cfg: DemoConfig, run_name: str):
    from trainer.augment import AugmentConfig
    from trainer.config import TrainConfig
    from trainer.station_view import StationViewConfig

    # Stations crop the item they localized (agent/localize.py), so the demo trains as ``python -m
    # trainer train`` does by default: most images rendered as station views (StationViewConfig
    # defaults, items rotated up to 20 degrees), the rest on the documented recipe's plain path
    # (docs/training.md: centred and upright, --plain-rotation 0), and a foreground-crop bundle.
    augment = AugmentConfig(scale=(0.75, 1.0), rotation=0.0, brightness=0.1, contrast=0.1, saturation=0.1,
                            erasing=0.2, station_view=StationViewConfig())
    return TrainConfig(augment=augment, crop_mode="foreground",
        data=str(cfg.data_dir / "train"), out_dir=str(cfg.out_dir), name=run_name, arch=cfg.arch, weights="imagenet",
        image_size=cfg.image_size, resize_shorter=cfg.image_size, limit_per_class=cfg.limit_per_class,
        epochs=cfg.epochs, batch_size=64, optimizer="adam", lr=1e-3, warmup_epochs=0.2, label_smoothing=0.1,
    )


def import_demo_data(data_dir: Path, source: Path | None = None) -> None:
    """Fashion-MNIST in ``data_dir``, imported unless an import there finished: a ``train`` folder alone may be
    what an interrupted first run left (a few hundred images, no ``test``), which the demo would train on as if
    it were the data set. A ``train`` folder that is not an import (its labels.json does not name Fashion-MNIST's
    classes), or one the source is not installed to complete, is used as it is."""
    import json

    from contract.dataset import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, LABELS_FILE, folder_name
    from trainer.data import fashion_mnist_imported, import_fashion_mnist

    source = Path(source or FASHION_MNIST_DIR)
    train = data_dir / "train"
    if fashion_mnist_imported(data_dir):
        return
    if train.is_dir():
        try:
            ours = json.loads((train / LABELS_FILE).read_text(encoding="utf-8")) == {
                folder_name(c): c for c in FASHION_MNIST_CLASSES}
        except (OSError, ValueError):
            ours = False
        why = None if ours and source.is_dir() else f"{source} is not installed" if ours else \
            f"{train / LABELS_FILE} does not name Fashion-MNIST's classes: not an import"
        if why is not None:
            log.warning("%s: no record that a Fashion-MNIST import finished here (%s); training on the images it "
                        "holds", data_dir, why)
            return
    import_fashion_mnist(data_dir, source)      # idempotent: completes an interrupted import, keeps what it wrote


def run_demo(cfg: DemoConfig):
    """Import Fashion-MNIST, fine-tune ImageNet MobileNetV2, export and verify a bundle; print the figures."""
    from trainer.cli import print_export_summary
    from trainer.engine import Trainer
    from trainer.export.bundle import ExportConfig, export_bundle

    start = time.perf_counter()
    import_demo_data(cfg.data_dir, cfg.source)
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    train_cfg = demo_train_config(cfg, run_name)
    result = Trainer(train_cfg, cfg.out_dir / run_name).fit()
    print(f"trained {cfg.arch} for {result.epochs_run} epochs in {time.perf_counter() - start:.0f}s; "
          f"run folder {result.run_dir}")
    export = export_bundle(ExportConfig(checkpoint=result.run_dir / "best.pt", models_dir=cfg.models_dir, name=cfg.name))
    print_export_summary(export)
    print(f"total {time.perf_counter() - start:.0f}s")
    return export
