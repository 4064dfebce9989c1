"""Dataset layouts, unreadable images, class checks, the split, and Fashion-MNIST import."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from trainer_support import trace_fsync_and_replace

from contract.preprocess import decode_image, read_image
from trainer import data as data_mod
from trainer.data import DatasetError, load_dataset


def _some_images(fmnist_dir: Path, per_class: int = 3) -> dict[str, list[Path]]:
    """A few real images per class, keyed by display name."""
    names = json.loads((fmnist_dir / "train" / "labels.json").read_text())
    return {names[folder.name]: sorted(folder.glob("*.png"))[:per_class]
            for folder in sorted((fmnist_dir / "train").iterdir()) if folder.is_dir()}


def test_class_folders_use_display_names(fmnist_dir):
    ds = load_dataset(fmnist_dir / "train")
    assert ds.layout == "folders"
    assert "T-shirt/top" in ds.classes and "Ankle boot" in ds.classes
    assert len(ds.classes) == 10
    assert len(ds.samples) == 1000
    # labels follow the folders: every sample's folder maps to its class name
    names = json.loads((fmnist_dir / "train" / "labels.json").read_text())
    assert all(names[s.path.parent.name] == ds.classes[s.label] for s in ds.samples)


def test_prefixed_files_layout(fmnist_dir, tmp_path):
    for label, paths in _some_images(fmnist_dir).items():
        for i, p in enumerate(paths):
            shutil.copy(p, tmp_path / f"{data_mod.folder_name(label).replace('_', '-')}_{i}.png")
    ds = load_dataset(tmp_path)
    assert ds.layout == "prefixed"
    assert Counter(ds.classes[s.label] for s in ds.samples) == {c: 3 for c in ds.classes}
    assert "T-shirt-top" in ds.classes


@pytest.mark.parametrize("layout", ["folders", "prefixed"])
def test_item_mask_files_beside_images_are_never_samples(fmnist_dir, tmp_path, layout):
    # given: each image with its <stem>.mask.png beside it (docs/training.md, station views' item mask)
    for label, paths in _some_images(fmnist_dir, 2).items():
        name = data_mod.folder_name(label).replace("_", "-")
        folder = tmp_path / name if layout == "folders" else tmp_path
        folder.mkdir(exist_ok=True)
        for i, p in enumerate(paths):
            stem = f"{name}{i}" if layout == "folders" else f"{name}_{i}"
            shutil.copy(p, folder / f"{stem}.png")
            cv2.imwrite(str(folder / f"{stem}.mask.png"), (read_image(p)[:, :, 0] > 0).astype(np.uint8) * 255)
    # when
    ds = load_dataset(tmp_path)
    # then: only the images are samples, two per class; no mask is trained on or held out for validation
    assert ds.layout == layout and len(ds.samples) == 20
    assert not any(s.path.name.endswith(".mask.png") for s in ds.samples)


def test_prefixed_file_without_class_is_an_error(tmp_path, fmnist_dir):
    src = next(iter(_some_images(fmnist_dir).values()))[0]
    shutil.copy(src, tmp_path / "noclass.png")
    with pytest.raises(DatasetError, match="noclass.png.*<class>_<anything>"):
        load_dataset(tmp_path)


def test_csv_layout_with_relative_paths(fmnist_dir, tmp_path):
    rows = ["path,label"]
    (tmp_path / "img").mkdir()
    for label, paths in _some_images(fmnist_dir, 2).items():
        for i, p in enumerate(paths):
            dest = tmp_path / "img" / f"{data_mod.folder_name(label)}{i}.png"
            shutil.copy(p, dest)
            rows.append(f"img/{dest.name},{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(tmp_path / "labels.csv")
    assert ds.layout == "csv"
    assert len(ds.samples) == 20 and len(ds.classes) == 10
    assert all(s.path.is_file() for s in ds.samples)


def test_a_csv_view_column_marks_station_frames_as_seen(fmnist_dir, tmp_path):
    """view=station: a frame a station sent (its item crop), trained as it is; canvas or nothing: a product image,
    rendered as station views. The retrain's own training CSV marks its reviewed frames so."""
    from trainer.retrain import Item, write_training_csv

    (coat, coat2), (bag,) = _some_images(fmnist_dir, 2)["Coat"], _some_images(fmnist_dir, 1)["Bag"]
    (tmp_path / "labels.csv").write_text(f"path,label,view\n{coat},Coat,station\n{bag},Bag,canvas\n{coat2},Coat,\n")
    ds = load_dataset(tmp_path / "labels.csv")
    assert [s.as_seen for s in ds.samples] == [True, False, False]
    (tmp_path / "plain.csv").write_text(f"path,label\n{coat},Coat\n{bag},Bag\n")          # no column: none
    assert not any(s.as_seen for s in load_dataset(tmp_path / "plain.csv").samples)
    (tmp_path / "bad.csv").write_text(f"path,label,view\n{coat},Coat,station\n{bag},Bag,photo\n")
    with pytest.raises(DatasetError, match=r"bad.csv:3: field view: .*'photo'"):
        load_dataset(tmp_path / "bad.csv")

    write_training_csv(tmp_path / "retrain.csv", [Item(bag, "Bag", "base"), Item(coat, "Coat", "reviewed")])
    ds = load_dataset(tmp_path / "retrain.csv")
    assert [(ds.classes[s.label], s.as_seen) for s in ds.samples] == [("Bag", False), ("Coat", True)]


def test_csv_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,x\n")
    with pytest.raises(DatasetError, match=r"bad.csv.*path,label"):
        load_dataset(bad)
    bad.write_text("path,label\n,x\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2"):
        load_dataset(bad)


def test_corrupt_images_are_skipped_counted_and_listed(fmnist_dir, tmp_path):
    root = tmp_path / "ds"
    for label, paths in _some_images(fmnist_dir, 4).items():
        (root / data_mod.folder_name(label)).mkdir(parents=True)
        for p in paths:
            shutil.copy(p, root / data_mod.folder_name(label) / p.name)
    truncated = root / "Bag" / "truncated.png"
    truncated.write_bytes(next((fmnist_dir / "train" / "Bag").glob("*.png")).read_bytes()[:40])
    (root / "Coat" / "empty.jpg").write_bytes(b"")
    (root / "Coat" / "text.png").write_text("not an image")
    ds = load_dataset(root)
    assert len(ds.samples) == 40
    skipped = {Path(row["path"]).name: row["error"] for row in ds.skipped}
    assert set(skipped) == {"truncated.png", "empty.jpg", "text.png"}
    assert "empty file" in skipped["empty.jpg"] and str(root / "Coat" / "text.png") in skipped["text.png"]


def test_class_with_only_corrupt_images_is_a_clear_error(fmnist_dir, tmp_path):
    good = next(iter(_some_images(fmnist_dir).values()))[0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(good, tmp_path / "a" / "1.png")
    (tmp_path / "b" / "1.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match=r"classes \['b'\] have no readable images"):
        load_dataset(tmp_path)


def test_empty_class_folder_and_single_class_are_errors(fmnist_dir, tmp_path):
    good = next(iter(_some_images(fmnist_dir).values()))[0]
    (tmp_path / "a").mkdir()
    shutil.copy(good, tmp_path / "a" / "1.png")
    with pytest.raises(DatasetError, match="need at least 2"):
        load_dataset(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: class folder holds no images"):
        load_dataset(tmp_path)


def test_missing_dataset_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_grayscale_and_rgba_become_rgb(tmp_path):
    gray = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)
    rgba = np.dstack([gray, gray // 2, gray // 3, np.full_like(gray, 7)])  # RGBA order
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    g = read_image(tmp_path / "g.png")
    a = read_image(tmp_path / "a.png")
    assert g.shape == a.shape == (48, 64, 3) and g.dtype == np.uint8
    assert (g[..., 0] == gray).all() and (g[..., 2] == gray).all()
    np.testing.assert_array_equal(a, rgba[..., :3])  # alpha dropped, channel order RGB
    with pytest.raises(ValueError, match="x.jpg: not a decodable image"):
        decode_image(b"garbage bytes", name="x.jpg")


def test_a_grouped_split_keeps_each_group_on_one_side_stratified_by_label():
    # given: 60 frames of 24 items (1 to 4 frames each) in three classes, one item labelled two ways
    rng = random.Random(5)
    labels, groups = [], []
    for item in range(24):
        for _ in range(rng.randint(1, 4)):
            labels.append(item % 3)
            groups.append(f"item-{item}")
    labels[groups.index("item-4")] = 2          # item 4 (class 1): its first frame labelled 2, the rest 1
    train, val = data_mod.grouped_split(labels, groups, 0.25, seed=3)
    # then: every frame on one side, no item on both, and a quarter of each class's items held out
    assert sorted(train + val) == list(range(len(labels)))
    held = {groups[i] for i in val}
    assert not held & {groups[i] for i in train}
    assert len(held) == 6 and all(sum(g in held for g in {f"item-{i}" for i in range(c, 24, 3)}) == 2
                                  for c in range(3))
    assert data_mod.grouped_split(labels, groups, 0.25, seed=3) == (train, val)
    assert data_mod.grouped_split(labels, groups, 0.25, seed=4) != (train, val)
    with pytest.raises(DatasetError, match="val_fraction"):
        data_mod.grouped_split(labels, groups, 1.0, seed=3)


def test_a_stations_own_frames_are_all_trained_on_never_spent_on_validation(tmp_path):
    # given: 200 images, every fifth a station's frame (as_seen), split 20% for validation
    samples = [data_mod.Sample(tmp_path / f"{i}.png", i % 4, as_seen=i % 5 == 0) for i in range(200)]
    dataset = data_mod.Dataset(tmp_path, list("abcd"), samples, "csv")
    train, val = data_mod.stratified_split(dataset.labels(), 0.2, seed=1)
    assert any(samples[i].as_seen for i in val)                 # the plain split spends some on validation
    kept_train, kept_val = data_mod.station_frames_trained(dataset, train, val)
    # then: every station frame trains, the other validation images stay where they were
    assert {i for i in range(200) if samples[i].as_seen} <= set(kept_train)
    assert kept_val == [i for i in val if not samples[i].as_seen] and sorted(kept_train + kept_val) == list(range(200))
    # a validation split of station frames only is left as it is (it would be empty)
    only = data_mod.Dataset(tmp_path, list("abcd"), [data_mod.Sample(s.path, s.label, True) for s in samples], "csv")
    assert data_mod.station_frames_trained(only, train, val) == (train, val)


def test_split_is_stratified_reproducible_and_saved(fmnist_dir, tmp_path):
    ds = load_dataset(fmnist_dir / "train")
    train, val = data_mod.stratified_split(ds.labels(), 0.2, seed=7)
    assert not set(train) & set(val) and len(train) + len(val) == len(ds.samples)
    per_class = Counter(ds.labels())
    val_counts = Counter(ds.samples[i].label for i in val)
    for label, n in per_class.items():
        assert abs(val_counts[label] - 0.2 * n) <= 1
    assert data_mod.stratified_split(ds.labels(), 0.2, seed=7) == (train, val)
    assert data_mod.stratified_split(ds.labels(), 0.2, seed=8) != (train, val)
    data_mod.save_split(tmp_path / "split.json", ds, train, val, seed=7)
    assert data_mod.load_split(tmp_path / "split.json", ds) == (train, val)
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["seed"] == 7 and len(saved["val"]) == len(val)


def test_the_split_is_synced_to_disk_before_its_rename_and_the_folder_after(fmnist_dir, tmp_path, monkeypatch):
    """A resume needs split.json: a power cut after an unsynced rename can leave it empty. A power cut cannot be
    simulated here: the test checks the calls, os.fsync of the whole temporary file before os.replace, then of
    the folder after it."""
    import os

    ds = load_dataset(fmnist_dir / "train")
    train, val = data_mod.stratified_split(ds.labels(), 0.2, seed=7)
    events = trace_fsync_and_replace(monkeypatch)
    data_mod.save_split(tmp_path / "split.json", ds, train, val, seed=7)
    tmp = str(tmp_path / f".split.json.{os.getpid()}.tmp")
    size = (tmp_path / "split.json").stat().st_size
    assert events == [("fsync", tmp, size), ("replace", tmp, str(tmp_path / "split.json")), ("fsync", str(tmp_path), None)]


def test_fingerprint_changes_with_labels(fmnist_dir, tmp_path):
    shutil.copytree(fmnist_dir / "train", tmp_path / "d")
    before = load_dataset(tmp_path / "d").fingerprint()
    moved = next((tmp_path / "d" / "Bag").glob("*.png"))
    moved.rename(tmp_path / "d" / "Coat" / moved.name)
    assert load_dataset(tmp_path / "d").fingerprint() != before


def test_fashion_mnist_import_matches_idx(fmnist_dir):
    import gzip

    with gzip.open(data_mod.FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read()[8:], dtype=np.uint8)
    with gzip.open(data_mod.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz") as fh:
        first = np.frombuffer(fh.read()[16 : 16 + 784], dtype=np.uint8).reshape(28, 28)
    label = data_mod.FASHION_MNIST_CLASSES[labels[0]]
    path = fmnist_dir / "train" / data_mod.folder_name(label) / "train_00000.png"
    np.testing.assert_array_equal(read_image(path)[..., 0], first)
    counts = load_dataset(fmnist_dir / "train").class_counts()
    assert counts == {c: int((labels[:1000] == i).sum()) for i, c in enumerate(data_mod.FASHION_MNIST_CLASSES)}


def test_bad_idx_file_is_named(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        data_mod.import_fashion_mnist(tmp_path / "out", tmp_path)


def test_an_image_a_csv_lists_twice_is_read_once_and_two_labels_for_it_are_an_error(fmnist_dir, tmp_path):
    """A labels export appended twice: each image was two samples, the split put copies of one image on both
    sides (trained on and validated on), and a resumed run mapped both to one row."""
    import re

    rows = [(str(p), label) for label, paths in _some_images(fmnist_dir, 4).items() for p in paths]
    first = Path(rows[0][0])
    respelled = f"{first.parent}/./{first.name}"                       # the same file, written another way
    csv_rows = rows + rows[:20] + [(respelled, rows[0][1])]
    (tmp_path / "twice.csv").write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in csv_rows))
    ds = load_dataset(tmp_path / "twice.csv")
    assert len(ds.samples) == 40 and len({s.path for s in ds.samples}) == 40
    assert len(ds.skipped) == 21 and ds.skipped[0]["error"] == (f"{tmp_path / 'twice.csv'}:42: image {first} repeats "
                                                                f"line 2 (same label {rows[0][1]!r}); the repeat is "
                                                                f"left out")
    assert ds.skipped[-1]["path"] == respelled and "repeats line 2" in ds.skipped[-1]["error"]
    train, val = data_mod.stratified_split(ds.labels(), 0.25, seed=0)
    assert not {ds.samples[i].path for i in train} & {ds.samples[i].path for i in val}
    # the same image under another label: which one is right cannot be known here
    (tmp_path / "clash.csv").write_text(f"path,label\n{first},Coat\n{rows[5][0]},Bag\n{first},Bag\n")
    with pytest.raises(DatasetError, match=re.escape(f"clash.csv:4: image {first} is labelled 'Bag' here and "
                                                     f"'Coat' on line 2; one image takes one label")):
        load_dataset(tmp_path / "clash.csv")


# ---------------------------------------------------------------- draws that hold every class

def test_a_draw_from_a_small_split_holds_every_class_it_can():
    """10 of 30 images over 10 classes: spread's plain random draw reached 8 classes (the export's station-view
    and calibration sets then never saw two classes); the covering draw reaches all 10, still ``take`` images."""
    labels = [c for c in range(10) for _ in range(3)]
    assert len({labels[i] for i in data_mod.spread(30, 10)}) < 10        # the defect, as the seed draws it
    for take in (10, 12, 15):
        chosen = data_mod.spread_classes(labels, take)
        assert len(chosen) == len(set(chosen)) == take and chosen == sorted(chosen)
        assert {labels[i] for i in chosen} == set(range(10))
    assert data_mod.spread_classes(labels, 5) == data_mod.spread(30, 5)    # fewer than the classes: as drawn
    assert data_mod.spread_classes(labels, None) == list(range(30))


@pytest.mark.parametrize("count, take, seed", [(6000, 1000, 3), (12000, 1000, 3), (54000, 512, 0), (48000, 2000, 2)])
def test_a_draw_that_holds_every_class_already_is_spreads_exactly(count, take, seed):
    """The recipe's draws (validation and training splits listed class by class) are unchanged: bundles exported
    before keep their station-view set, calibration images and open-set fit images."""
    labels = [c for c in range(10) for _ in range(count // 10)]
    assert data_mod.spread_classes(labels, take, seed) == data_mod.spread(count, take, seed)
    order = np.random.default_rng(1).permutation(count)
    assert data_mod.spread_classes(labels, take // 2, order=order, keep_order=True) == order[: take // 2].tolist()
