"""Settings and files the trainer is handed that could never work: each refused before any work, naming the flag
or the file, and nothing written (found by a review of trainer/ inputs; each reproduced first)."""

from __future__ import annotations

import gzip
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from trainer.augment import AugmentConfig
from trainer.config import TrainConfig
from trainer.data import DatasetError, stratified_split


@pytest.mark.parametrize("field, value", [("lr", math.nan), ("label_smoothing", math.nan), ("warmup_epochs", math.nan),
                                          ("gamma", math.inf), ("momentum", 2.0), ("val_fraction", 1.5),
                                          ("image_size", 0), ("limit_per_class", 0), ("limit_per_class", -1)])
def test_a_training_setting_that_is_not_finite_or_in_range_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(data="d", **{field: value})


@pytest.mark.parametrize("field, value", [("step_size", 0), ("step_size", -1), ("patience", 0), ("patience", -3),
                                          ("max_steps_per_epoch", 0), ("max_steps_per_epoch", -1), ("workers", -1),
                                          ("freeze_epochs", -2), ("epochs", 2.5), ("batch_size", True),
                                          ("seed", "1"), ("image_size", 32.0)])
def test_a_count_that_is_not_a_whole_number_in_range_is_refused_by_name(field, value):
    """step_size 0 divided by zero mid-run and -1 raised the rate tenfold each epoch; patience 0 trained one epoch
    and then crashed drawing curves; max_steps_per_epoch 0 or less trained nothing and reported a run."""
    with pytest.raises(ValueError, match=rf"^{field}: expected a whole number >= \d"):
        TrainConfig(data="d", **{field: value})
    TrainConfig(data="d", patience=1, max_steps_per_epoch=1, workers=0, freeze_epochs=0, step_size=1)   # the edges


def test_a_refused_count_on_the_command_line_names_its_flag(tmp_path, caplog):
    from trainer.cli import main

    rc = main(["train", "--data", str(tmp_path), "--out-dir", str(tmp_path / "runs"), "--step-size", "0"])
    assert rc == 2 and "--step-size: step_size: expected a whole number >= 1, got 0" in caplog.text
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("device, message", [("gpu", "--device 'gpu': expected auto, cpu, cuda or cuda:N"),
                                             ("meta", "--device 'meta': expected auto, cpu, cuda or cuda:N"),
                                             ("cuda", "--device cuda: CUDA is not available on this machine")])
def test_a_device_that_is_misspelt_or_absent_is_a_value_error_naming_the_flag(device, message, monkeypatch, tmp_path,
                                                                              caplog):
    """--device cuda on a machine without CUDA, or --device gpu, ended in a traceback (RuntimeError), not the
    CLI's one-line error and exit 2."""
    import torch

    from trainer.cli import main
    from trainer.engine import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)       # the same on a machine with a GPU
    with pytest.raises(ValueError, match=re.escape(message)):
        select_device(device)
    rc = main(["train", "--data", str(tmp_path), "--out-dir", str(tmp_path / "runs"), "--device", device])
    assert rc == 2 and message in caplog.text


@pytest.mark.parametrize("field, value", [("hflip", math.nan), ("rotation", math.inf), ("erasing", 1.5),
                                          ("scale", (1.0, 0.5)), ("ratio", (math.nan, 1.0))])
def test_an_augmentation_setting_that_is_not_finite_or_in_range_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"augment.{field}"):
        AugmentConfig(**{field: value})
    assert AugmentConfig.from_dict(AugmentConfig().to_dict()) == AugmentConfig()     # the defaults pass


def test_export_settings_and_a_file_that_is_no_checkpoint_are_refused_before_any_work(tmp_path):
    from trainer.export.bundle import ExportConfig, export_bundle
    from trainer.export.quantize import QuantizeConfig

    ckpt = tmp_path / "best.pt"
    for bad, match in ((dict(quantize=QuantizeConfig(calibration_images=0)), "--calibration-images"),
                       (dict(parity_images=0), "--parity-images"), (dict(open_set_images=0), "--open-set-images"),
                       (dict(gate_margin_points=math.inf), "--gate-margin"), (dict(unknown_keep=0.0), "--unknown-keep"),
                       (dict(version="x/y"), "--version: 'x/y' is not a bundle version"),
                       (dict(name=".."), "--name: '..' is not a bundle name")):
        with pytest.raises(ValueError, match=match):
            export_bundle(ExportConfig(checkpoint=ckpt, models_dir=tmp_path / "models", **bad))
    for content in (b"", b"just text\n"):
        ckpt.write_bytes(content)
        with pytest.raises(ValueError, match=f"{ckpt}: not a trainer checkpoint"):
            export_bundle(ExportConfig(checkpoint=ckpt, models_dir=tmp_path / "models"))
    assert not (tmp_path / "models").exists()


def _idx(path: Path, dims: tuple[int, ...], body: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body)


def test_an_idx_file_of_zero_pixel_images_is_a_dataset_error_naming_it(tmp_path):
    from trainer.data import import_fashion_mnist

    for split in ("train", "t10k"):
        _idx(tmp_path / f"{split}-images-idx3-ubyte.gz", (2, 0, 28), b"")
        _idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", (2,), b"\x00\x01")
    with pytest.raises(DatasetError, match="images-idx3-ubyte.gz: IDX header says images of 0 x 28 px"):
        import_fashion_mnist(tmp_path / "out", tmp_path)


def test_a_csv_with_a_byte_order_mark_reads_and_a_split_keeps_every_class_in_training(tmp_path):
    import cv2

    from trainer.data import load_dataset

    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8), 40 * i, np.uint8))
    (tmp_path / "data.csv").write_bytes("\ufeffpath,label\n0.png,a\n1.png,a\n2.png,b\n3.png,b\n".encode())
    assert sorted(load_dataset(tmp_path / "data.csv").classes) == ["a", "b"]
    train, val = stratified_split([0, 0] + [1] * 10, 0.8, 0)
    assert 0 in [([0, 0] + [1] * 10)[i] for i in train]       # two images of class 0: one stays for training


def test_a_background_frame_of_a_few_pixels_still_gives_a_tile(tmp_path):
    import cv2

    from trainer.backgrounds import folder_tiles

    cv2.imwrite(str(tmp_path / "tiny.png"), np.full((2, 2, 3), 90, np.uint8))
    tiles = folder_tiles(tmp_path, side=16, per_file=4, seed=0)
    assert tiles.shape[1:] == (3, 16, 16) and np.isfinite(tiles).all()


def test_retrain_refuses_a_damaged_split_and_a_fraction_out_of_range_by_name(tmp_path):
    """The current version's split.json truncated or of another shape: RetrainError naming it, not a
    KeyError traceback. A holdout fraction out of (0, 1): named by its own flag, before any training."""
    from types import SimpleNamespace

    from trainer.retrain import RetrainConfig, RetrainError, overall_holdout, retrain

    run = tmp_path / "run"
    run.mkdir()
    current = SimpleNamespace(manifest={"provenance": {"run_dir": str(run)}})
    cfg = RetrainConfig(base_data=tmp_path, reviewed=tmp_path, current=tmp_path, report=tmp_path / "r", train={})
    for text in ('{"root": "/x", "val": [["a.png", 0]', '{"root": "/x", "classes": ["a"]}', '[1, 2]'):
        (run / "split.json").write_text(text)
        with pytest.raises(RetrainError, match=f"{run / 'split.json'}: not the current version's split"):
            overall_holdout(cfg, current, [], 0)
    for flag, field in (("--holdout-fraction", "holdout_fraction"),
                        ("--reviewed-holdout-fraction", "reviewed_holdout_fraction")):
        bad = RetrainConfig(base_data=tmp_path, reviewed=tmp_path, current=tmp_path / "none", report=tmp_path / "r",
                            train={}, **{field: 1.5})
        with pytest.raises(RetrainError, match=f"{flag}: expected a share in \\(0, 1\\), got 1.5"):
            retrain(bad)
