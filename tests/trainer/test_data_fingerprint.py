"""The dataset fingerprint sees an image's bytes, not only its name, label and size, and a resume checks it.

Before, the fingerprint hashed (path, label, size): a photo exported again, or another picture copied in under
an image's name, of the same size, left it unchanged, and a resume trained on the changed image without a word
(repro: /tmp/export_data/repro_fingerprint.py). Real Fashion-MNIST PNGs throughout; a real (tiny) training run for
the resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from trainer import data as data_mod
from trainer.config import TrainConfig
from trainer.data import DatasetError, load_dataset, load_split, save_split
from trainer.engine import Trainer


def _folders(fmnist_dir: Path, root: Path, per_class: int = 12) -> Path:
    for name in ("Bag", "Coat", "Dress"):
        (root / name).mkdir(parents=True)
        for path in sorted((fmnist_dir / "train" / name).glob("*.png"))[:per_class]:
            shutil.copy(path, root / name / path.name)
    return root


def _same_size_pair(root: Path, source: Path) -> tuple[Path, Path]:
    """An image of ``root`` and another real image, of another class in ``source``, of the same number of bytes."""
    sizes = {p.stat().st_size: p for p in sorted(root.rglob("*.png"))}
    for other in sorted(source.rglob("*.png")):
        target = sizes.get(other.stat().st_size)
        if target is not None and other.parent.name != target.parent.name and other.read_bytes() != \
                target.read_bytes():
            return target, other
    pytest.skip("no two images of the same size in the sample")     # not seen: 1,000 PNGs of 28 x 28 px


def test_an_image_replaced_by_another_of_the_same_size_changes_the_fingerprint(fmnist_dir, tmp_path):
    # given: a dataset and its fingerprint
    root = _folders(fmnist_dir, tmp_path / "d")
    before = load_dataset(root).fingerprint()
    assert before.startswith(data_mod.FINGERPRINT_PREFIX)
    # when: an image is only touched, the fingerprint stays; when it is replaced by a picture of the same size, not
    target, other = _same_size_pair(root, fmnist_dir / "train")
    os.utime(target, ns=(1, 1))
    assert load_dataset(root).fingerprint() == before
    shutil.copyfile(other, target)
    after = load_dataset(root)
    # then: the fingerprint changed (its size-only form, still read for old runs, did not: the defect)
    assert after.fingerprint() != before
    assert after.legacy_fingerprint() == load_dataset(root).legacy_fingerprint()
    # and a dataset loaded without the image check (no digests taken) reads the files for the same fingerprint
    assert load_dataset(root, check_images=False).fingerprint() == after.fingerprint()


def test_a_split_check_refuses_a_replaced_image_and_reads_old_splits(fmnist_dir, tmp_path):
    # given: a saved split, and the same split as saved before 2026-12-07 (no fingerprint) and as one with the
    # fingerprint of sizes
    root = _folders(fmnist_dir, tmp_path / "d")
    dataset = load_dataset(root)
    train, val = data_mod.stratified_split(dataset.labels(), 0.25, 0)
    save_split(tmp_path / "split.json", dataset, train, val, 0)
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["fingerprint"] == dataset.fingerprint()
    (tmp_path / "none.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "fingerprint"}))
    (tmp_path / "sizes.json").write_text(json.dumps({**saved, "fingerprint": dataset.legacy_fingerprint()}))
    (tmp_path / "other.json").write_text(json.dumps({**saved, "fingerprint": "blake3:1234"}))
    for name in ("split.json", "none.json", "sizes.json", "other.json"):
        assert load_split(tmp_path / name, dataset) == (train, val), name
    # when: an image is replaced by another real picture of the same size
    target, other = _same_size_pair(root, fmnist_dir / "train")
    shutil.copyfile(other, target)
    changed = load_dataset(root)
    # then: the split saved now refuses it, naming the file; an old split is not refused for its form
    with pytest.raises(DatasetError, match=r"split.json: the 36 images of this saved split are not all the images it "
                                           r"was saved with: an image in .* was replaced by another under the same "
                                           r"name"):
        load_split(tmp_path / "split.json", changed)
    for name in ("none.json", "sizes.json", "other.json"):      # sizes.json: blind to it, as it always was
        assert load_split(tmp_path / name, changed) == (train, val), name
    # and a fingerprint of sizes still sees an image whose size changed
    shutil.copyfile(next(p for p in sorted((fmnist_dir / "train" / "Bag").glob("*.png"))
                         if p.stat().st_size != target.stat().st_size), target)
    with pytest.raises(DatasetError, match="sizes.json: the 36 images"):
        load_split(tmp_path / "sizes.json", load_dataset(root))


def _cfg(data: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), arch="mobilenet_v2", weights="none", image_size=32, resize_shorter=32,
                       epochs=2, batch_size=8, val_fraction=0.25, workers=0, seed=3, max_steps_per_epoch=1, **kw)


def _cut_after_epoch_1(cfg: TrainConfig, run_dir: Path) -> None:
    def crash(epoch, row):
        raise KeyboardInterrupt      # preemption right after the epoch-1 checkpoint

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run_dir, on_epoch_end=crash).fit()


def test_a_resume_refuses_data_whose_image_was_replaced_and_resumes_an_old_run(fmnist_dir, tmp_path):
    import torch

    # given: a run stopped after epoch 1, and one of its images replaced by another picture of the same size
    data = _folders(fmnist_dir, tmp_path / "data")
    run = tmp_path / "run"
    _cut_after_epoch_1(_cfg(data), run)
    target, other = _same_size_pair(data, fmnist_dir / "train")
    kept = target.read_bytes()
    shutil.copyfile(other, target)
    # when: it is resumed, then: refused before any training, naming split.json
    with pytest.raises(DatasetError, match=r"run/split.json: the 36 images of this saved split are not all the "
                                           r"images it was saved with"):
        Trainer(TrainConfig.load(run / "config.json"), run).fit()
    assert torch.load(run / "last.pt", weights_only=True)["state"]["epoch"] == 1
    # and a run whose split.json was written before the fingerprint (none in it) resumes, with the image restored
    target.write_bytes(kept)
    split = json.loads((run / "split.json").read_text())
    del split["fingerprint"]
    (run / "split.json").write_text(json.dumps(split))
    assert Trainer(TrainConfig.load(run / "config.json"), run).fit().epochs_run == 2
    report = json.loads((run / "data_report.json").read_text())
    assert report["fingerprint"] == load_dataset(data).fingerprint()
