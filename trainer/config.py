"""The resolved training configuration, saved with every run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from contract.preprocess import CROP_MODES, CropPolicy
from trainer.augment import AugmentConfig


@dataclass
class TrainConfig:
    """Everything that decides a training run; ``runs/<name>/config.json`` holds it resolved."""

    data: str
    out_dir: str = "runs"
    name: str = "model"
    arch: str = "resnet50"
    weights: str = "imagenet"
    image_size: int = 224
    resize_shorter: int | None = None  # None: image_size * 256 / 224
    interpolation: str = "bilinear"
    val_fraction: float = 0.1
    limit_per_class: int | None = None
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_size: int = 5
    gamma: float = 0.1
    label_smoothing: float = 0.0
    balance_classes: bool = False      # each epoch draws every class equally often (reviewed frames are skewed)
    station_frame_repeat: int = 1      # each training frame a station sent (Sample.as_seen, a CSV's view=station)
    #                                    is drawn this many times per epoch: a few hundred among thousands of images
    freeze_epochs: int = 0
    frozen_bn: bool = False            # BatchNorm normalizes with its running statistics and never updates them
    amp: bool = True
    channels_last: bool = True
    device: str = "auto"
    workers: int = 2
    cache_images: bool = True
    patience: int | None = None
    metric: str = "accuracy"
    max_steps_per_epoch: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    crop_margin: float = 0.0           # the station's item crop: foreground box grown by this x its longer side
    #                                    (0: the box itself, squared; a tighter crop gives the item more of the
    #                                    model's pixels, docs/benchmarks.md "The crop's margin")
    crop_mode: str | None = None       # None: "foreground" with station views, "roi" without (resolved on load)

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig.from_dict(self.augment)
        if self.crop_mode is None:
            self.crop_mode = "foreground" if self.augment.station_view.enabled else "roi"
        checks = {
            "optimizer": ("adam", "adamw", "sgd"),
            "schedule": ("cosine", "step", "constant"),
            "metric": ("accuracy", "macro_f1"),
            "interpolation": ("bilinear", "area"),
            "crop_mode": CROP_MODES,
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        self.crop_policy  # noqa: B018 -- raises ValueError naming input.crop.margin when it is out of range
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        # a NaN here trains "fine" and the run can then never be exported (a manifest figure not finite)
        for name, low, high in (("lr", 0.0, 10.0), ("weight_decay", 0.0, 10.0), ("momentum", 0.0, 1.0),
                                ("warmup_epochs", 0.0, 1e6), ("gamma", 0.0, 1e6), ("label_smoothing", 0.0, 1.0),
                                ("val_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{name}: expected a finite number in [{low:g}, {high:g}], got {value!r}")
        if self.image_size < 1 or (self.resize_shorter is not None and self.resize_shorter < 1):
            raise ValueError(f"image_size and resize_shorter: expected >= 1 px, got {self.image_size}, "
                             f"{self.resize_shorter}")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise ValueError(f"limit_per_class: expected at least 1 image (or none for all), "
                             f"got {self.limit_per_class}")
        if isinstance(self.station_frame_repeat, bool) or not isinstance(self.station_frame_repeat, int) \
                or self.station_frame_repeat < 1:
            raise ValueError(f"station_frame_repeat: expected a whole number >= 1, got {self.station_frame_repeat!r}")

    @property
    def crop_policy(self) -> CropPolicy:
        """The item crop the station must feed this model (the checkpoint's and bundle's ``input.crop``)."""
        return CropPolicy(mode=self.crop_mode, margin=self.crop_margin)

    @property
    def resolved_resize_shorter(self) -> int:
        return self.resize_shorter or round(self.image_size * 256 / 224)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}")
        return cls(**raw)
