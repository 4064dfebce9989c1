"""Training: data on the device, train/validate loops, checkpoints, resume, early stopping."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
import unicodedata
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from contract.events import fsync_dir
from contract.preprocess import InputSpec, Preprocessor
from trainer import data as data_mod
from trainer.augment import BatchAugment, eval_spec, load_canvas, load_eval, mask_path
from trainer.config import TrainConfig
from trainer.distributed import DistContext, init_distributed, shutdown
from trainer.evaluate import macro_f1
from trainer.model import build_model, set_backbone_frozen, train_mode

log = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = int(float(os.environ.get("TRAINER_CACHE_GB", "8")) * 2**30)


def select_device(name: str = "auto") -> torch.device:
    """The torch device ``--device`` names; a ValueError naming the flag (the CLI's one-line error, exit 2) for a
    name that is not auto, cpu, cuda or cuda:N, or a GPU this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


class ImageFiles(torch.utils.data.Dataset):
    """Images by path, each turned into an array by ``load`` (canvas or eval input); with ``with_index`` each item
    also carries its index (what a batch's rows were)."""

    def __init__(self, samples: Sequence[data_mod.Sample], load: Callable[[Path], np.ndarray],
                 with_index: bool = False) -> None:
        self.samples = list(samples)
        self.load = load
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple:
        s = self.samples[i]
        return (self.load(s.path), s.label, i) if self.with_index else (self.load(s.path), s.label)


def _loader(files: ImageFiles, batch_size: int, workers: int, shuffle: bool = False,
            generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        files, batch_size=batch_size, shuffle=shuffle, generator=generator,
        num_workers=workers, persistent_workers=workers > 0,
    )


def materialize(files: ImageFiles, workers: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once into one tensor (with labels)."""
    from tqdm import tqdm

    xs, ys = [], []
    for x, y, *_ in tqdm(_loader(files, 512, workers), desc=desc, unit="batch", leave=False):
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys)


def station_frames_repeated(samples: Sequence[data_mod.Sample], repeat: int) -> list[data_mod.Sample]:
    """The training samples with each station frame (``as_seen``) ``repeat`` times in all: a station's few hundred
    reviewed frames among thousands of base images are otherwise drawn too rarely to teach its view. Only the
    training split is repeated; validation sees each frame once."""
    samples = list(samples)
    return samples + [s for s in samples if s.as_seen for _ in range(repeat - 1)]


class TrainBatches:
    """Shuffled uint8 canvas batches with their labels and which rows are as seen (``Sample.as_seen``): from memory
    when they fit, else from worker processes.

    In memory, every rank of a distributed run draws the same global batch and trains on
    its rows of it (``sharded`` is False). Streaming from disk, a DistributedSampler
    gives each rank its own share of the files and batches of batch_size / world.
    """

    def __init__(self, samples, spec: InputSpec, cfg: TrainConfig, generator: torch.Generator,
                 dist: DistContext | None = None) -> None:
        # A 4th canvas channel carries mask files, only when station views use them and some exist.
        with_mask = cfg.augment.station_view.enabled and any(mask_path(s.path).exists() for s in samples)
        self.files = ImageFiles(samples, lambda p: load_canvas(p, spec, with_mask), with_index=True)
        self.batch_size = cfg.batch_size
        self.generator = generator
        self.workers = cfg.workers
        self.dist = dist or DistContext()
        self.seed = cfg.seed
        self.sampler = None
        self.balance = cfg.balance_classes
        self.labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        self.as_seen = torch.tensor([s.as_seen for s in samples], dtype=torch.bool)
        side = spec.resize_shorter
        estimate = len(samples) * (4 if with_mask else 3) * side * side
        self.cached = None
        if cfg.cache_images and estimate <= CACHE_LIMIT_BYTES:
            self.cached = materialize(self.files, cfg.workers, "decode train images")
        elif cfg.cache_images:
            log.info("train images need %.1f GiB decoded; streaming from disk instead", estimate / 2**30)
        if self.cached is None and self.dist.enabled:
            if self.balance:
                raise ValueError("balance_classes needs the training images in memory in a distributed run "
                                 "(cache_images, and few enough images to fit)")
            self.sampler = torch.utils.data.DistributedSampler(
                self.files, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)

    @property
    def sharded(self) -> bool:
        return self.sampler is not None

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        # A ragged last batch is dropped: a batch of one breaks BatchNorm and skews the step size.
        return max(1, len(self.files) // self.batch_size)

    def order(self) -> torch.Tensor:
        """One epoch's sample order: a permutation, or with ``balance_classes`` as many draws as there are
        images, each class equally likely and the images of a class equally likely within it."""
        if not self.balance:
            return torch.randperm(len(self.labels), generator=self.generator)
        counts = torch.bincount(self.labels).float()
        weights = 1.0 / counts[self.labels]
        return torch.multinomial(weights, len(self.labels), replacement=True, generator=self.generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.cached is not None:
            x, y = self.cached
            order = self.order()
            for step in range(len(self)):
                idx = order[step * self.batch_size : (step + 1) * self.batch_size]
                yield x[idx], y[idx], self.as_seen[idx]
            return
        if self.sampler is not None:
            loader = torch.utils.data.DataLoader(self.files, batch_size=self.batch_size // self.dist.world,
                                                 sampler=self.sampler, num_workers=self.workers, drop_last=True)
        elif self.balance:
            loader = torch.utils.data.DataLoader(self.files, batch_size=self.batch_size, num_workers=self.workers,
                                                 sampler=self.order().tolist())
        else:
            loader = _loader(self.files, self.batch_size, self.workers, True, self.generator)
        yield from ((x, y, self.as_seen[i]) for _, (x, y, i) in zip(range(len(self)), loader))


def eval_inputs(samples, spec: InputSpec, workers: int, desc: str = "preprocess val images") -> tuple[torch.Tensor, torch.Tensor]:
    """The exact station inputs for ``samples`` (manifest preprocessing), with labels."""
    pre = Preprocessor(spec)
    return materialize(ImageFiles(samples, lambda p: load_eval(p, pre)), workers, desc)


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, device: torch.device, batch_size: int = 256,
                   channels_last: bool = False) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR factor: linear warmup, then cosine to zero, step decay, or constant."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return min(1.0, (step + 1) / warmup)     # a fractional warmup never lifts the rate past lr
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def accuracy_and_f1(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """Top-1 accuracy and macro-F1 (``trainer.evaluate.macro_f1``: the same figure ``evaluate`` reports)."""
    pred = logits.argmax(1)
    acc = (pred == labels).float().mean().item() if len(labels) else 0.0
    tp = torch.bincount(labels[pred == labels], minlength=num_classes)
    predicted = torch.bincount(pred, minlength=num_classes)
    support = torch.bincount(labels, minlength=num_classes)
    return acc, macro_f1(tp.numpy(), predicted.numpy(), support.numpy())


RESUME_KEYS = ("model", "optimizer", "schedule", "scaler", "state", "generator", "torch_rng", "classes")


def read_resume_checkpoint(path: Path) -> dict:
    """``last.pt`` of a run to resume; a ValueError naming the file for one that cannot be read (a truncated copy,
    a disk error) or is not a trainer checkpoint, which the CLI reports in one line. The file is left as it is."""
    damaged = _damaged_record(path)
    if damaged is not None:
        raise ValueError(f"{path}: damaged: the bytes of its record {damaged} do not match their checksum (a disk or "
                         f"copy error); the run cannot resume from it. Put back a good copy of the file, or start a "
                         f"new run (another --name)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
        detail = str(exc).split(". ")[0] or ("the file is empty" if path.stat().st_size == 0 else type(exc).__name__)
        raise ValueError(f"{path}: cannot be read as a checkpoint ({detail}); the run cannot resume from it. Put "
                         f"back a good copy of the file, or start a new run (another --name)") from exc
    missing = [key for key in RESUME_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a training checkpoint to resume from (no {', '.join(missing)})")
    return ckpt


def _damaged_record(path: Path) -> str | None:
    """The first record of a checkpoint (a zip archive) whose bytes do not match the CRC-32 stored beside them, or
    None. torch.load does not check them: a flipped bit in a weight or an optimizer moment loaded without a word and
    the resumed run trained on from it. A file that is no zip archive is left to torch.load to judge."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError):
        return None


# Settings that say where and how fast a run computes, not what: a resume may run with others (another machine or
# GPU, more decoding processes, the run folder moved; the initial weights are not read again). Every other setting
# of a resumed run must be the one it was trained with.
RESUME_MAY_CHANGE = ("device", "workers", "cache_images", "out_dir", "name", "weights")


def changed_settings(trained: dict, now: dict, prefix: str = "") -> list[str]:
    """The settings (``augment.station_view.rotation``) of ``now`` that differ from those a checkpoint was
    ``trained`` with, as ``name old -> new``. Only settings both hold are compared: a setting added since the
    checkpoint was written loads with the value that keeps the old behaviour."""
    changed = []
    for key in sorted(trained.keys() & now.keys()):
        name, was, is_ = prefix + key, trained[key], now[key]
        if name in RESUME_MAY_CHANGE:
            continue
        if isinstance(was, dict) and isinstance(is_, dict):
            changed += changed_settings(was, is_, name + ".")
        elif _plain(was) != _plain(is_):   # a tuple and its list are the same, and 1 and 1.0
            changed.append(f"{name} {json.dumps(was, default=str)} -> {json.dumps(is_, default=str)}")
    return changed


def _plain(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


def resume_scaler(scaler: torch.amp.GradScaler, saved: dict, source: Path) -> None:
    """The fp16 loss scaler's state from a checkpoint. One written with the scaler off (a run on CPU, or bf16 on
    a GPU that has it) holds none: resumed where fp16 scaling is on (a GPU without bf16), the scale starts afresh,
    as in a new run (GradScaler.load_state_dict refuses an empty state)."""
    if scaler.is_enabled() and not saved:
        log.info("%s was written without fp16 loss scaling; the loss scale starts afresh", source)
        return
    scaler.load_state_dict(saved)


@dataclass
class RunState:
    """What a checkpoint holds besides the config: enough to continue exactly."""

    epoch: int = 0  # epochs completed
    best_metric: float = -1.0
    best_epoch: int = -1
    epochs_without_improvement: int = 0


@dataclass
class RunResult:
    run_dir: Path
    best_metric: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool


class Trainer:
    """One training run in ``run_dir``; ``fit()`` continues from ``last.pt`` when it exists."""

    def __init__(self, cfg: TrainConfig, run_dir: Path,
                 on_epoch_end: Callable[[int, dict], None] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.on_epoch_end = on_epoch_end
        self.dist = DistContext()
        self.device = select_device(cfg.device)
        self.spec = eval_spec(cfg.image_size, cfg.resolved_resize_shorter, cfg.interpolation, crop=cfg.crop_policy)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16

    # --- setup -------------------------------------------------------------------------------

    def _dataset(self, resume_classes: list[str] | None) -> tuple[data_mod.Dataset, list[int], list[int]]:
        """The dataset and its split. Resuming (``resume_classes``: the classes of last.pt), the split the run
        started with, read against the whole of ``data`` (a --limit-per-class draw made again from a folder that
        has changed would miss some of its images); so is a split a caller placed in the run folder before the
        first fit (one saved without ``drawn_for``). Otherwise a new split, saved for a resume and the export."""
        cfg, resuming = self.cfg, resume_classes is not None
        dataset = data_mod.load_dataset(cfg.data)
        if resuming and dataset.classes != resume_classes:
            dataset = self._in_resumed_classes(dataset, resume_classes)
        split_path = self.run_dir / "split.json"
        saved = split_path.exists()
        drawn_for = data_mod.split_drawn_for(split_path) if saved else None
        if saved and (resuming or drawn_for is None):
            if resuming and drawn_for is not None:
                self._check_split_settings(split_path, drawn_for)
            dataset, train_idx, val_idx = _split_only(dataset, *data_mod.load_split(split_path, dataset))
        else:  # the same on every rank of a distributed run: same data, same seed
            if cfg.limit_per_class:
                dataset = data_mod.limit_per_class(dataset, cfg.limit_per_class, cfg.seed)
            train_idx, val_idx = data_mod.stratified_split(dataset.labels(), cfg.val_fraction, cfg.seed)
            train_idx, val_idx = data_mod.station_frames_trained(dataset, train_idx, val_idx)
            if val_idx and self.dist.is_main:
                data_mod.save_split(split_path, dataset, train_idx, val_idx, cfg.seed,
                                    drawn_for=self._split_settings())
        if not val_idx:
            raise data_mod.DatasetError(f"{cfg.data}: the validation split is empty: {self._why_no_validation(dataset)}"
                                        f"; validation needs a class with 2 or more images")
        if not self.dist.is_main:
            return dataset, train_idx, val_idx
        report = {
            "dataset": str(dataset.root), "layout": dataset.layout, "classes": dataset.classes,
            "class_counts": dataset.class_counts(), "train_images": len(train_idx), "val_images": len(val_idx),
            "skipped_images": dataset.skipped, "fingerprint": dataset.fingerprint(),
            "duplicates": dataset.duplicates,
        }
        (self.run_dir / "data_report.json").write_text(json.dumps(report, indent=1))
        if dataset.skipped:
            log.warning("%d files skipped (unreadable images, other files in class folders, or repeated in a CSV); "
                        "listed in %s", len(dataset.skipped),
                        self.run_dir / "data_report.json")
        return dataset, train_idx, val_idx

    def _in_resumed_classes(self, dataset: data_mod.Dataset, classes: list[str]) -> data_mod.Dataset:
        """``dataset`` labelled by the classes of the run being resumed when they are its classes spelled in another
        Unicode normal form: a run started before class names were read in NFC, on folders a Mac copy named
        (decomposed: ``e`` + combining accent), holds them so, perhaps in another order (NFC sorts otherwise). As
        ``load_dataset(classes=...)`` does, the run's names keep their spelling and order (its model's rows, its
        split's labels). Any other difference is a DatasetError naming the classes that differ."""
        in_nfc = [unicodedata.normalize("NFC", name) for name in classes]
        if sorted(in_nfc) == sorted(dataset.classes) and len(set(in_nfc)) == len(in_nfc):
            row = {name: i for i, name in enumerate(in_nfc)}
            relabel = [row[name] for name in dataset.classes]
            log.info("%s: the classes of %s are the data's classes in another Unicode normal form; they keep the "
                     "run's spelling and order", self.cfg.data, self.run_dir / "last.pt")
            return replace(dataset, classes=list(classes),
                           samples=[replace(s, label=relabel[s.label]) for s in dataset.samples])
        added = [name for name in dataset.classes if name not in in_nfc]
        gone = [name for name, nfc in zip(classes, in_nfc) if nfc not in dataset.classes]
        detail = f"new in the data: {added}; of the run, not in the data: {gone}"
        if any(name != nfc for name, nfc in zip(classes, in_nfc)):
            detail += (f"; the run's names {', '.join(ascii(n) for n, nfc in zip(classes, in_nfc) if n != nfc)} are "
                       f"not in Unicode NFC, in which the data's names are read: names that print alike may differ")
        raise data_mod.DatasetError(
            f"{self.cfg.data}: the classes {dataset.classes} differ from the classes {classes} of the run being "
            f"resumed ({self.run_dir / 'last.pt'}) ({detail}); its model has a row per class in that order. "
            f"Restore the data as it was, or start a new run (another --name)")

    def _split_settings(self) -> dict:
        """What decides the split drawn for this config: a split drawn for other settings is not this run's."""
        cfg = self.cfg
        return {"data": str(cfg.data), "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                "limit_per_class": cfg.limit_per_class}

    def _check_split_settings(self, split_path: Path, drawn_for: dict) -> None:
        """A resume whose config no longer matches its split (config.json edited, or a Trainer handed another
        config for the folder) would train and validate on images the config does not describe."""
        for name, expected in self._split_settings().items():
            if name in drawn_for and drawn_for[name] != expected:
                raise data_mod.DatasetError(
                    f"{split_path}: drawn for {name} {drawn_for[name]!r}, but the config of the run being resumed says "
                    f"{expected!r}; resume with the run's own config.json, or start a new run (another --name)")

    def _check_resume_settings(self, resume: dict, source: Path) -> None:
        """A resume continues the run it was: its schedule spans the epochs, steps and rate it started with, and its
        optimizer, model and split are theirs. A config.json edited since (more epochs, another lr, batch size,
        arch, image size or optimizer), or a Trainer handed another config for the folder, silently trained on
        with the old rate and batch while the checkpoint recorded the new ones, bent the cosine mid-run, or died
        on a traceback (a state dict of another arch, another optimizer's state)."""
        trained = resume.get("config")
        if not isinstance(trained, dict):
            return
        try:        # read as config.json is read: a setting added since takes its default, None its resolved value
            known = {k: v for k, v in trained.items() if k in TrainConfig.__dataclass_fields__}
            trained = TrainConfig(**known).to_dict()
        except (TypeError, ValueError):
            pass    # refused by today's checks: compared as it was written
        changed = changed_settings(trained, self.cfg.to_dict())
        if changed:
            raise ValueError(
                f"{source}: the run was trained with other settings than its config now gives ({'; '.join(changed)}"
                f"); a resume continues a run with the settings it started with. Put them back in "
                f"{self.run_dir / 'config.json'}, or start a new run (another --name; --weights {source} starts it "
                f"from this run's weights)")

    def _diverged(self, epoch: int, row: dict, state: RunState) -> str:
        """What a run whose loss went NaN or infinite is told: what is saved, and what to do. The epoch is not
        saved; a --resume would train it again with the same settings (the run's config decides) and diverge again,
        so the advice is a new run."""
        if state.epoch:
            saved = (f"last.pt holds epoch {state.epoch}, best.pt epoch {state.best_epoch} (val {self.cfg.metric} "
                     f"{state.best_metric:.4f}); --resume would diverge again with the run's own settings, so start "
                     f"a new run (another --name)")
        else:
            saved = "no epoch finished, no checkpoint was written; run again"
        return (f"{self.run_dir}: epoch {epoch + 1}: the loss is not finite (train {row['train_loss']}, val "
                f"{row['val_loss']}): the weights diverged and the epoch is not saved; {saved} with a lower --lr "
                f"(now {self.cfg.lr:g}) or --weight-decay (now {self.cfg.weight_decay:g})")

    def _why_no_validation(self, dataset: data_mod.Dataset) -> str:
        counts = dataset.class_counts()
        if max(counts.values(), default=0) > 1:
            return f"{self.run_dir / 'split.json'} lists no validation image"
        limit = f" (--limit-per-class {self.cfg.limit_per_class})" if self.cfg.limit_per_class else ""
        return f"every class has a single image{limit}, and a class's only image is kept for training"

    def _clear_leftovers(self) -> None:
        """A new run in a folder without last.pt: what an earlier attempt left before its first checkpoint (a
        --weights path that did not load, a crash) is not this run's. Its split.json (drawn for that attempt's
        seed, val_fraction, data and limit) would be reused and its metrics.jsonl appended to; both go, logged. A
        split.json without ``drawn_for`` was placed by the caller and stays."""
        split_path, metrics = self.run_dir / "split.json", self.run_dir / "metrics.jsonl"
        if split_path.exists() and data_mod.split_drawn_for(split_path) is not None:
            log.warning("%s: removing the split of an earlier attempt that saved no checkpoint (last.pt); this run "
                        "draws its own", split_path)
            split_path.unlink()
        if metrics.exists():
            log.warning("%s: removing the epochs of an earlier run that left no last.pt", metrics)
            metrics.unlink()

    def _checkpoint(self, name: str, model, optimizer, schedule, scaler, state: RunState, generator,
                    metrics: dict | None = None) -> None:
        """``name`` in the run folder, written whole or not at all. ``metrics``: the figures of the epoch it ends
        (its metrics.jsonl line), which a resume writes there when a kill came before the line."""
        # On CUDA, dropout draws from each GPU's generator: every process's states of every GPU, by rank (a
        # collective, so every rank comes here; only rank 0 writes).
        cuda_rng = self.dist.gather_object(torch.cuda.get_rng_state_all()) if self.device.type == "cuda" else None
        if not self.dist.is_main:
            return
        payload = {
            "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(), "state": state.__dict__, "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(), "classes": self.classes, "config": self.cfg.to_dict(),
            "input": self.spec.to_manifest(),
        }
        if cuda_rng is not None:
            payload["cuda_rng"] = cuda_rng
        if metrics is not None:
            payload["metrics"] = metrics
        _write_durably(self.run_dir / name, lambda fh: torch.save(payload, fh))

    def _settle_epoch_end(self, last: Path) -> None:
        """The run folder as an uninterrupted run leaves it, after a kill at the end of an epoch. An epoch ends by
        writing best.pt (when it improved), last.pt, then its metrics.jsonl line, each whole or not at all:

        - killed after best.pt, before last.pt: best.pt holds the finished epoch, one past last.pt, with all a
          resume needs (both are written from the same state). It becomes last.pt, so the run continues after
          it, and best.pt, last.pt and metrics.jsonl tell of the same best epoch. (Resumed from the older last.pt,
          the epoch was trained again; scoring lower there, as another machine or a GPU may, the run recorded an
          older best while best.pt kept the lost attempt's model.)
        - killed after last.pt, before the line: the line is written from the figures last.pt holds.
        - killed mid-write: the partial ``.<name>.tmp`` (up to a checkpoint's size) is removed.
        """
        for name in ("best.pt", "last.pt"):
            partial = self.run_dir / f".{name}.tmp"
            if partial.exists():
                log.warning("%s: removing the partial checkpoint of a write that was cut off", partial)
                partial.unlink()
        saved = _peek_checkpoint(last)
        if saved is None:   # no run to resume (epoch 1 writes best.pt again), or last.pt cannot be read (named later)
            return
        best_path = self.run_dir / "best.pt"
        best = _peek_checkpoint(best_path)
        if best is not None and best["state"].get("epoch", 0) > saved["state"].get("epoch", 0):
            if self._rolls_forward(best, saved, best_path):
                log.warning("%s holds epoch %d, one past %s (the run was stopped between writing the two): the run "
                            "continues after it", best_path, best["state"]["epoch"], last)
                with open(best_path, "rb") as src:
                    _write_durably(last, lambda fh: shutil.copyfileobj(src, fh, 2**24))
                saved = best
        self._complete_metrics(saved, last)

    def _rolls_forward(self, best: dict, saved: dict, best_path: Path) -> bool:
        """Whether best.pt is the checkpoint of the epoch after last.pt's, written by this run, intact: only a kill
        between the two writes leaves one so. Any other newer best.pt (put there by hand) is named and left."""
        fits = (best["state"].get("epoch") == saved["state"].get("epoch", 0) + 1
                and all(key in best for key in RESUME_KEYS) and best.get("classes") == saved.get("classes")
                and isinstance(best.get("config"), dict) and isinstance(saved.get("config"), dict)
                and not changed_settings(saved["config"], best["config"]))
        if not fits or _damaged_record(best_path) is not None:
            log.warning("%s holds epoch %s, past the epoch %s of last.pt, but is not the next checkpoint of this "
                        "run (or is damaged); the run resumes from last.pt", best_path, best["state"].get("epoch"),
                        saved["state"].get("epoch"))
            return False
        return True

    def _complete_metrics(self, saved: dict, last: Path) -> None:
        """The metrics.jsonl line of last.pt's epoch, from the figures last.pt holds, when a kill came before it."""
        path, epoch = self.run_dir / "metrics.jsonl", saved["state"].get("epoch")
        if epoch in _metrics_epochs(path):
            return
        row = saved.get("metrics")
        if not isinstance(row, dict) or row.get("epoch") != epoch:
            log.warning("%s has no line for epoch %s, and %s holds no figures to restore it from (written before "
                        "2026-12-07)", path, epoch, last)
            return
        log.warning("%s: writing the line of epoch %s from %s (the run was stopped before it)", path, epoch, last)
        _append_metrics(path, row)

    def _restore_rng(self, resume: dict, source: Path) -> None:
        """The random states of a checkpoint, so that a resumed run draws what an uninterrupted one would: torch's
        CPU generator and, on CUDA, the GPUs' generators of this process (dropout on the GPU). The augmentation
        draws from the run's own generator, restored beside these; numpy's and Python's global generators are
        not drawn from in training. A checkpoint without CUDA states (written on CPU, or before 2026-12-07)
        resumes with a warning; a GPU run's checkpoint resumes on a host without CUDA (its CUDA states unused)."""
        torch.set_rng_state(resume["torch_rng"])
        if self.device.type != "cuda":
            return
        saved = resume.get("cuda_rng")
        if saved is None:
            log.warning("%s holds no CUDA random state (written on CPU, or before 2026-12-07): dropout on the GPU "
                        "draws otherwise than in an uninterrupted run", source)
            return
        if len(saved) != self.dist.world:
            log.warning("%s was written by %d process(es), resumed by %d: the CUDA random states are not restored",
                        source, len(saved), self.dist.world)
            return
        states, count = saved[self.dist.rank], torch.cuda.device_count()
        if len(states) != count:
            log.warning("%s was written on a machine with %d GPU(s), resumed on one with %d: the random states of "
                        "the first %d are restored", source, len(states), count, min(count, len(states)))
        torch.cuda.set_rng_state_all(states[:count])

    def _wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel across processes; SyncBatchNorm on GPUs (gloo CPU runs keep per-rank BN)."""
        if not self.dist.enabled:
            return model
        if self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.cfg.freeze_epochs > 0,  # frozen backbone params get no grads
        )

    # --- loops -------------------------------------------------------------------------------

    def _train_epoch(self, epoch, model, batches, augment, optimizer, schedule, scaler,
                     criterion) -> tuple[float, int, int, float]:
        """One epoch on this process's rows: their loss sum (loss x rows), right answers, rows, and the seconds."""
        from tqdm import tqdm

        cfg = self.cfg
        rank, world = self.dist.rank, self.dist.world
        train_mode(_unwrap(model), cfg.arch, cfg.frozen_bn)
        seen, correct, loss_sum, start = 0, 0, 0.0, time.perf_counter()
        steps = min(len(batches), cfg.max_steps_per_epoch or len(batches))
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                   disable=not self.dist.is_main)
        for step, (canvas, labels, as_seen) in enumerate(batches):
            if step >= steps:
                break
            if batches.sharded:  # this rank's own rows (its DistributedSampler share): rows rank::world of the
                # global batch, so the draws are made for the whole global batch, as in one process
                x = augment(canvas.to(self.device, non_blocking=True), shard=(rank, world), total=len(labels) * world,
                            as_seen=as_seen)
            else:  # this rank trains on rows rank, rank + world, ... of the global batch
                total = len(labels)
                canvas, labels, as_seen = canvas[rank::world], labels[rank::world], as_seen[rank::world]
                x = augment(canvas.to(self.device, non_blocking=True), shard=(rank, world), total=total,
                            as_seen=as_seen)
            y = labels.to(self.device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                logits = model(x)
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            seen += len(y)
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * len(y)
            rate = seen * world / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}")
            bar.update()
        bar.close()
        return loss_sum, correct, seen, time.perf_counter() - start

    def _train_figures(self, loss_sum: float, correct: int, seen: int, elapsed: float) -> dict:
        """An epoch's train figures over the whole run: each process trained on its own share of the rows (the
        progress bar shows rank 0's), so their sums are added up first, and every rank holds the same figures."""
        loss_sum, correct, seen = self.dist.sum_over_ranks([loss_sum, correct, seen])
        return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                "train_images_per_s": seen / elapsed, "train_seconds": elapsed}

    def _validate(self, model, val_x: torch.Tensor, val_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of the whole val set; each rank predicts its share."""
        rank, world = self.dist.rank, self.dist.world
        logits = predict_logits(_unwrap(model), val_x[rank::world], self.device, channels_last=self.cfg.channels_last)
        if not self.dist.enabled:
            return logits, val_y
        parts = self.dist.gather_cat(logits)
        labels = [val_y[r::world] for r in range(world)]
        return torch.cat(parts), torch.cat(labels)

    def fit(self) -> RunResult:
        self.dist, device = init_distributed(self.cfg.device)
        if device is not None:
            self.device = device
            self.use_amp = self.cfg.amp and device.type == "cuda"
        try:
            return self._fit()
        finally:
            # Flushing denormals is process-wide CPU state (DAZ/FTZ): set for the fit only, so the code that runs
            # after it in the same process (an export, an evaluation, a test) sees IEEE floats again.
            torch.set_flush_denormal(False)
            if self.dist.enabled:
                shutdown()

    def _fit(self) -> RunResult:
        cfg = self.cfg
        if cfg.batch_size % self.dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {self.dist.world} processes")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        last = self.run_dir / "last.pt"
        if self.dist.is_main:
            self._settle_epoch_end(last)
        self.dist.barrier()         # every rank reads last.pt as settled
        resume = read_resume_checkpoint(last) if last.exists() else None
        if self.dist.is_main and resume is None:
            self._clear_leftovers()
        self.dist.barrier()  # no rank looks for a saved split before an earlier attempt's is gone
        # Denormal floats (near-zero activations from dark backgrounds) make CPU kernels ~20x slower.
        torch.set_flush_denormal(True)
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        # Built first (it draws nothing): a bad --backgrounds file stops the run before images are decoded.
        augment = BatchAugment(cfg.augment, self.spec, generator)
        dataset, train_idx, val_idx = self._dataset(resume["classes"] if resume else None)
        if resume:
            self._check_resume_settings(resume, last)
        if self.dist.is_main:      # after the checks: a resume refused for its data leaves the run's config as it was
            cfg.save(self.run_dir / "config.json")
        self.classes = dataset.classes
        model = build_model(cfg.arch, len(self.classes), "none" if resume else cfg.weights,
                            classes=self.classes).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if resume:
            model.load_state_dict(resume["model"])
        model = self._wrap(model)
        train = station_frames_repeated([dataset.samples[i] for i in train_idx], cfg.station_frame_repeat)
        batches = TrainBatches(train, self.spec, cfg, generator, self.dist)
        val_x, val_y = eval_inputs([dataset.samples[i] for i in val_idx], self.spec, cfg.workers)
        optimizer = make_optimizer(model, cfg)
        steps_per_epoch = min(len(batches), cfg.max_steps_per_epoch or len(batches))
        schedule = make_schedule(optimizer, cfg, steps_per_epoch)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)
        state = RunState()
        if resume:
            optimizer.load_state_dict(resume["optimizer"])
            schedule.load_state_dict(resume["schedule"])
            resume_scaler(scaler, resume["scaler"], last)
            state = RunState(**resume["state"])
            generator.set_state(resume["generator"])
            self._restore_rng(resume, last)
            log.info("resuming %s after epoch %d", self.run_dir, state.epoch)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        stopped_early = cfg.patience is not None and state.epochs_without_improvement >= cfg.patience
        if stopped_early:           # a resumed run that had stopped early: nothing more to train
            log.info("%s stopped early at epoch %d; nothing to resume", self.run_dir, state.epoch)
        while state.epoch < cfg.epochs and not stopped_early:
            epoch = state.epoch
            set_backbone_frozen(_unwrap(model), cfg.arch, epoch < cfg.freeze_epochs)
            batches.set_epoch(epoch)
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "frozen_backbone": epoch < cfg.freeze_epochs}
            sums = self._train_epoch(epoch, model, batches, augment, optimizer, schedule, scaler, criterion)
            row.update(self._train_figures(*sums))
            logits, val_labels = self._validate(model, val_x, val_y)
            row["val_loss"] = nn.functional.cross_entropy(logits, val_labels).item()
            if not (math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])):
                raise ValueError(self._diverged(epoch, row, state))
            row["val_accuracy"], row["val_macro_f1"] = accuracy_and_f1(logits, val_labels, len(self.classes))
            metric = row["val_" + cfg.metric]
            state.epoch = epoch + 1
            # best.pt, last.pt, then the metrics line: a kill between two of them leaves what a resume completes
            # (_settle_epoch_end), each checkpoint carrying the epoch's figures
            if metric > state.best_metric:
                state.best_metric, state.best_epoch, state.epochs_without_improvement = metric, epoch + 1, 0
                self._checkpoint("best.pt", model, optimizer, schedule, scaler, state, generator, row)
            else:
                state.epochs_without_improvement += 1
            self._checkpoint("last.pt", model, optimizer, schedule, scaler, state, generator, row)
            if self.dist.is_main:
                _append_metrics(self.run_dir / "metrics.jsonl", row)
            self.dist.barrier()  # nobody starts the next epoch (or a resume) before the checkpoint is on disk
            log.info("epoch %d: loss %.4f, train acc %.4f, val acc %.4f, val F1 %.4f, %.0f img/s",
                     epoch + 1, row["train_loss"], row["train_accuracy"], row["val_accuracy"],
                     row["val_macro_f1"], row["train_images_per_s"])
            if self.on_epoch_end:
                self.on_epoch_end(epoch + 1, row)
            if cfg.patience is not None and state.epochs_without_improvement >= cfg.patience:
                log.info("early stop: no improvement in val %s for %d epochs", cfg.metric, cfg.patience)
                stopped_early = True
                break
        if self.dist.is_main:
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        return RunResult(self.run_dir, state.best_metric, state.best_epoch, state.epoch, stopped_early)


def _write_durably(target: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``target`` as ``write`` fills it, whole or not at all: written to ``.<name>.tmp`` beside it, synced, renamed
    over it, and the folder synced."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())   # on disk before the rename: a power cut then never leaves an empty last.pt
        os.replace(tmp, target)     # a kill mid-save never leaves a half-written checkpoint
    except BaseException:   # a full disk, Ctrl-C: the partial file (up to a checkpoint's size) goes too
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)        # the rename itself survives a power cut only once the folder is synced


def _peek_checkpoint(path: Path) -> dict | None:
    """A checkpoint's keys with its tensors left on disk (memory-mapped, not read), or None when there is no
    file or it cannot be read so (the resume's own read then names what is wrong with it)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:   # missing, truncated, another format: the caller's own read of it judges
        return None
    return ckpt if isinstance(ckpt, dict) and isinstance(ckpt.get("state"), dict) else None


def _split_only(dataset: data_mod.Dataset, train: list[int],
                val: list[int]) -> tuple[data_mod.Dataset, list[int], list[int]]:
    """The dataset cut to the images of a saved split, with the split's indices into it: a resumed run reports
    (data_report.json: counts, fingerprint) the images it trains on, not images added to the folder since."""
    keep = sorted({*train, *val})
    position = {old: new for new, old in enumerate(keep)}
    return dataset.subset(keep), [position[i] for i in train], [position[i] for i in val]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _metrics_epochs(path: Path) -> set:
    """The epochs metrics.jsonl has a line for (none when there is no file)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return set()
    epochs = set()
    for line in lines:
        try:
            epochs.add(json.loads(line).get("epoch"))
        except (ValueError, AttributeError):
            continue
    return epochs


def plot_curves(metrics_path: Path, out: Path) -> None:
    """Loss and accuracy per epoch (train and val) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():      # a finished run resumed after its metrics.jsonl was removed: no epoch ran
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax1.plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(epochs, [r["train_accuracy"] for r in rows], "o-", label="train")
    ax2.plot(epochs, [r["val_accuracy"] for r in rows], "o-", label="val")
    ax2.plot(epochs, [r["val_macro_f1"] for r in rows], "s--", label="val macro-F1")
    ax2.set(xlabel="epoch", ylabel="score", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def load_checkpoint_model(path: str | Path, device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """A trained model and its checkpoint metadata (classes, config, input spec) from best.pt/last.pt.

    A ValueError naming the file and the record for a checkpoint whose bytes do not match the CRC-32s it holds:
    torch.load does not check them, so a best.pt damaged on disk or in a copy exported a damaged model unnoticed."""
    path = Path(path)
    damaged = _damaged_record(path)
    if damaged is not None:
        raise ValueError(f"{path}: damaged: the bytes of its record {damaged} do not match their checksum (a disk or "
                         f"copy error); no model is loaded from it. Put back a good copy of the file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "classes" not in ckpt:
        raise ValueError(f"{path}: not a trainer checkpoint (expected keys 'model' and 'classes')")
    cfg = ckpt["config"]
    model = build_model(cfg["arch"], len(ckpt["classes"]), "none")
    model.load_state_dict(ckpt["model"])
    model.eval()
    if device is not None:
        model.to(device)
    return model, ckpt
