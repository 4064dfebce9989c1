"""Datasets as users copy them: from a Mac (resource forks, NFD names), with links, stray files, duplicates, moved
images, and IDX files whose body is not what their header says."""

from __future__ import annotations

import gzip
import logging
import shutil
import struct
import tracemalloc
import unicodedata
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer import data as data_mod
from trainer.backgrounds import folder_tiles
from trainer.data import DatasetError, import_fashion_mnist, load_dataset

APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60)   # a Mac's ._name resource fork


def _png(value: int, side: int = 6) -> bytes:
    """A small PNG whose bytes differ for each value (no two images of a test alike unless it says so)."""
    image = np.full((side, side, 3), value % 256, np.uint8)
    image[0, 0] = (value // 256) % 256, 7, 9
    return cv2.imencode(".png", image)[1].tobytes()


def _classes(root: Path, names: dict[str, int], start: int = 0) -> int:
    """``names``: class folder -> number of images; distinct PNGs, numbered from ``start``."""
    value = start
    for name, count in names.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"{i:04d}.png").write_bytes(_png(value))
            value += 1
    return value


# ---------------------------------------------------------------- hidden and system files


def test_a_macs_resource_forks_and_hidden_folders_are_neither_samples_nor_listed(tmp_path):
    _classes(tmp_path, {"bag": 3, "shoe": 3})
    for name in ("bag", "shoe"):
        for i in range(3):
            (tmp_path / name / f"._{i:04d}.png").write_bytes(APPLEDOUBLE)
        (tmp_path / name / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (tmp_path / name / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
        (tmp_path / name / ".thumbnails").mkdir()
        (tmp_path / name / ".thumbnails" / "big.png").write_bytes(_png(200))
    dataset = load_dataset(tmp_path)
    assert sorted(dataset.relative(s.path) for s in dataset.samples) == [
        f"{c}/{i:04d}.png" for c in ("bag", "shoe") for i in range(3)]
    assert dataset.skipped == []


def test_a_prefixed_dataset_copied_from_a_mac_loads_without_a_class_named_dot(tmp_path):
    for i, label in enumerate(["bag", "bag", "shoe", "shoe"]):
        (tmp_path / f"{label}_{i}.png").write_bytes(_png(i))
        (tmp_path / f"._{label}_{i}.png").write_bytes(APPLEDOUBLE)
    dataset = load_dataset(tmp_path)
    assert dataset.classes == ["bag", "shoe"] and len(dataset.samples) == 4 and dataset.skipped == []


def test_a_backgrounds_folder_copied_from_a_mac_gives_crops_of_its_frames(tmp_path):
    (tmp_path / "cam0").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "cam0" / f"frame{i}.jpg"), np.full((40, 60, 3), 50 * i, np.uint8))
        (tmp_path / "cam0" / f"._frame{i}.jpg").write_bytes(APPLEDOUBLE)
    assert folder_tiles(tmp_path, 16, 2, seed=0).shape == (6, 3, 16, 16)


# ---------------------------------------------------------------- files that are not images


def test_other_files_among_a_thousand_images_are_skipped_counted_and_named(tmp_path):
    _classes(tmp_path, {"bag": 600, "shoe": 400})
    strays = [tmp_path / "bag" / "IMG_0001.HEIC", tmp_path / "bag" / "notes.txt", tmp_path / "shoe" / "anim.gif",
              tmp_path / "shoe" / "README"]
    for path in strays:
        path.write_bytes(b"not a picture this trainer reads")
    (tmp_path / "shoe" / "0001.JPG").write_bytes(cv2.imencode(".jpg", np.full((8, 8, 3), 3, np.uint8))[1].tobytes())
    dataset = load_dataset(tmp_path)
    assert dataset.class_counts() == {"bag": 600, "shoe": 401}          # .JPG: an image whatever the case
    assert sorted(row["path"] for row in dataset.skipped) == sorted(str(p) for p in strays)
    by_path = {row["path"]: row["error"] for row in dataset.skipped}
    assert "not an image file this trainer reads (.HEIC;" in by_path[str(strays[0])]
    assert "(no extension;" in by_path[str(strays[3])]


# ---------------------------------------------------------------- Unicode normal forms


NFC, NFD = unicodedata.normalize("NFC", "Café"), unicodedata.normalize("NFD", "Café")


def test_a_class_folder_named_on_a_mac_is_the_class_of_the_same_name_typed_on_linux(tmp_path):
    assert NFC != NFD
    end = _classes(tmp_path / "train", {NFC: 2, "tea": 2})
    _classes(tmp_path / "test", {NFD: 2, "tea": 2}, start=end)
    train = load_dataset(tmp_path / "train")
    test = load_dataset(tmp_path / "test", classes=train.classes)
    assert test.classes == train.classes and test.class_counts() == {NFC: 2, "tea": 2}
    assert load_dataset(tmp_path / "test").classes == [NFC, "tea"]


def test_two_copies_of_one_class_in_both_normal_forms_are_one_class(tmp_path):
    end = _classes(tmp_path, {NFC: 2, "tea": 2})
    (tmp_path / NFD).mkdir()
    (tmp_path / NFD / "mac.png").write_bytes(_png(end))
    dataset = load_dataset(tmp_path)
    assert dataset.classes == [NFC, "tea"] and dataset.class_counts() == {NFC: 3, "tea": 2}


def test_a_labels_file_written_on_linux_names_a_folder_a_mac_renamed(tmp_path):
    _classes(tmp_path, {NFD: 2, "tea": 2})
    (tmp_path / "labels.json").write_text(f'{{"{NFC}": "Café au lait"}}', encoding="utf-8")
    assert load_dataset(tmp_path).classes == ["Café au lait", "tea"]


# ---------------------------------------------------------------- links and duplicates


def test_links_in_a_class_folder_loops_and_folder_links_are_listed_file_links_followed(tmp_path):
    root = tmp_path / "data"
    end = _classes(root, {"bag": 3, "shoe": 3})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.png").write_bytes(_png(end))
    (root / "bag" / "loop.png").symlink_to("loop.png")
    (root / "bag" / "more").symlink_to(outside)
    (root / "shoe" / "out.png").symlink_to(outside / "o.png")
    dataset = load_dataset(root)
    assert dataset.class_counts() == {"bag": 3, "shoe": 4}
    errors = {Path(row["path"]).name: row["error"] for row in dataset.skipped}
    assert errors.keys() == {"loop.png", "more"}
    assert "a broken link or a link loop" in errors["loop.png"] and "a link to a folder, not followed" in errors["more"]
    assert dataset.duplicates == []


def test_the_same_image_under_two_classes_is_reported_as_a_label_conflict(tmp_path, caplog):
    _classes(tmp_path, {"bag": 3, "shoe": 3})
    shutil.copy(tmp_path / "bag" / "0001.png", tmp_path / "shoe" / "copied.png")
    shutil.copy(tmp_path / "shoe" / "0002.png", tmp_path / "shoe" / "again.png")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        dataset = load_dataset(tmp_path)
    assert dataset.duplicates == [
        {"images": ["bag/0001.png", "shoe/copied.png"], "labels": ["bag", "shoe"], "conflict": True},
        {"images": ["shoe/0002.png", "shoe/again.png"], "labels": ["shoe"], "conflict": False}]
    assert "1 image(s) of the same bytes under more than one class, a label conflict" in caplog.text
    assert "bag/0001.png = shoe/copied.png ('bag', 'shoe')" in caplog.text
    assert dataset.subset([0, 1]).duplicates == dataset.duplicates


def test_a_class_folder_linking_back_to_the_root_is_reported_as_conflicting_with_every_class(tmp_path):
    _classes(tmp_path, {"bag": 2, "shoe": 2})
    (tmp_path / "all").symlink_to(".")
    dataset = load_dataset(tmp_path)
    assert all(g["conflict"] for g in dataset.duplicates) and len(dataset.duplicates) == 4
    assert ["all/bag/0000.png", "bag/0000.png"] in [g["images"] for g in dataset.duplicates]


# ---------------------------------------------------------------- the split


def test_the_split_does_not_depend_on_the_order_the_file_system_lists_files_in(tmp_path, monkeypatch):
    _classes(tmp_path, {"bag": 30, "shoe": 20, "cap": 11})

    def split() -> list[list[str]]:
        ds = load_dataset(tmp_path, check_images=False)
        parts = data_mod.stratified_split(ds.labels(), 0.3, 5)
        return [[ds.relative(ds.samples[i].path) for i in part] for part in parts]

    before = split()
    iterdir, rglob = Path.iterdir, Path.rglob
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(iterdir(self), reverse=True)))
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: iter(sorted(rglob(self, pattern), reverse=True)))
    assert split() == before


def test_a_saved_split_whose_images_were_moved_or_deleted_names_and_counts_them_all(tmp_path):
    root = tmp_path / "data"
    _classes(root, {"bag": 20, "shoe": 20})
    dataset = load_dataset(root)
    train, val = data_mod.stratified_split(dataset.labels(), 0.25, 0)
    data_mod.save_split(tmp_path / "split.json", dataset, train, val, 0)
    (root / "bag" / "archive").mkdir()
    for i in range(7):
        shutil.move(root / "bag" / f"{i:04d}.png", root / "bag" / "archive" / f"{i:04d}.png")
    for i in range(5):
        (root / "shoe" / f"{i:04d}.png").unlink()
    with pytest.raises(DatasetError) as info:
        data_mod.load_split(tmp_path / "split.json", load_dataset(root))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'split.json'}: 12 of the 40 images of the saved split are no longer in")
    assert message.count(".png") == 10 and ", ..." in message


def test_a_saved_split_reads_back_after_the_folders_were_copied_through_a_mac(tmp_path):
    _classes(tmp_path / "linux", {NFC: 3, "tea": 3})
    dataset = load_dataset(tmp_path / "linux")
    train, val = data_mod.stratified_split(dataset.labels(), 0.34, 0)
    data_mod.save_split(tmp_path / "split.json", dataset, train, val, 0)
    shutil.copytree(tmp_path / "linux" / NFC, tmp_path / "mac" / NFD)
    shutil.copytree(tmp_path / "linux" / "tea", tmp_path / "mac" / "tea")
    assert data_mod.load_split(tmp_path / "split.json", load_dataset(tmp_path / "mac")) == (train, val)


# ---------------------------------------------------------------- IDX files


def _idx_header(dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def _source(folder: Path, images: bytes) -> Path:
    folder.mkdir(parents=True)
    labels = gzip.compress(_idx_header((2,)) + bytes([0, 1]))
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(images)
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(labels)
    return folder


def test_a_small_idx_file_inflating_past_its_header_is_refused_without_reading_it_all(tmp_path):
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)       # gzip: a 64 KiB file of 64 MiB
    parts = [compressor.compress(_idx_header((2, 3, 3)) + bytes(18))]
    parts += [compressor.compress(bytes(1 << 20)) for _ in range(64)]
    source = _source(tmp_path / "src", b"".join(parts) + compressor.flush())
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError) as info:
            import_fashion_mnist(tmp_path / "out", source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value) == (f"{source / 'train-images-idx3-ubyte.gz'}: header says (2, 3, 3) (18 bytes) but the "
                               f"body has more (not read)")
    assert peak < 8 << 20, peak


def test_an_idx_header_declaring_more_than_the_limit_is_refused_before_reading_the_body(tmp_path):
    source = _source(tmp_path / "src", gzip.compress(_idx_header((100_000, 4096, 4096)) + bytes(100)))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: header says \(100000, 4096, 4096\) "
                                           r"\(1677721600000 bytes\), more than 1073741824 \(not read\)"):
        import_fashion_mnist(tmp_path / "out", source)
