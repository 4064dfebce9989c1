"""The resolved training configuration, saved with every run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from contract.preprocess import CROP_MODES, CropPolicy
from trainer.augment import AugmentConfig

# (field, lowest value, None allowed): the settings that count images, pixels, epochs, steps or processes
WHOLE_NUMBER_FIELDS = (
    ("epochs", 1, False), ("batch_size", 1, False), ("image_size", 1, False), ("resize_shorter", 1, True),
    ("limit_per_class", 1, True), ("seed", 0, False), ("step_size", 1, False), ("station_frame_repeat", 1, False),
    ("freeze_epochs", 0, False), ("workers", 0, False), ("patience", 1, True), ("max_steps_per_epoch", 1, True),
)

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
    #                                    model's pixels, docs/notes/benchmark-history.md "The crop's margin")
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
        self._check_whole_numbers()
        # a NaN here trains "fine" and the run can then never be exported (a manifest figure not finite)
        for name, low, high in (("lr", 0.0, 10.0), ("weight_decay", 0.0, 10.0), ("momentum", 0.0, 1.0),
                                ("warmup_epochs", 0.0, 1e6), ("gamma", 0.0, 1e6), ("label_smoothing", 0.0, 1.0),
                                ("val_fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{name}: expected a finite number in [{low:g}, {high:g}], got {value!r}")

    def _check_whole_numbers(self) -> None:
        """Counts the loops divide by or count down from: a step_size of 0 divides by zero mid-run, a negative one
        raises the rate each epoch, patience 0 stops before any epoch counts, and a max_steps_per_epoch of 0 or
        less trains nothing yet reports a run; each is refused here, naming its field, before any work."""
        for name, low, optional in WHOLE_NUMBER_FIELDS:
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                none = " (or none)" if optional else ""
                raise ValueError(f"{name}: expected a whole number >= {low}{none}, got {value!r}")

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
