"""Hostile datasets: names that are not UTF-8, corrupt images, empty classes, bad labels files, truncated IDX.

A dataset either loads (every class name UTF-8 text, every kept image decodable, every dropped file listed
with its reason) or is refused with a DatasetError naming the file; the CLI exits 2 with that one message.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from contract.preprocess import MAX_IMAGE_SIDE, ImageDecodeError, read_image
from trainer.data import DatasetError, import_fashion_mnist, load_dataset

REPO = Path(__file__).resolve().parents[2]
PNG = cv2.imencode(".png", np.full((6, 6, 3), 90, np.uint8))[1].tobytes()


def _write(folder: Path, name: bytes, data: bytes) -> Path:
    os.makedirs(os.fsencode(folder), exist_ok=True)
    path = os.path.join(os.fsencode(folder), name)
    with open(path, "wb") as fh:
        fh.write(data)
    return Path(os.fsdecode(path))


def _two_classes(root: Path) -> None:
    for name in ("bag", "shoe"):
        _write(root / name, b"1.png", PNG)
        _write(root / name, b"2.png", PNG)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


# ---------------------------------------------------------------- one test per probe class

def test_a_class_folder_whose_name_is_not_utf8_is_refused_by_name(tmp_path):
    _two_classes(tmp_path)
    _write(Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))), b"1.png", PNG)
    with pytest.raises(DatasetError, match=r"caf\\xe9: class name 'caf\\xe9' is not valid UTF-8"):
        load_dataset(tmp_path)


def test_an_image_whose_file_name_is_not_utf8_is_skipped_and_listed(tmp_path):
    _two_classes(tmp_path)
    _write(tmp_path / "bag", b"\xff\xfe.png", PNG)
    dataset = load_dataset(tmp_path)
    assert dataset.classes == ["bag", "shoe"] and len(dataset.samples) == 4
    assert dataset.skipped == [{"path": f"{tmp_path}/bag/\\xff\\xfe.png",
                                "error": f"{tmp_path}/bag/\\xff\\xfe.png: file name is not valid UTF-8"}]
    dataset.fingerprint()
    json.dumps(dataset.skipped, ensure_ascii=False).encode()     # reports can be written as UTF-8


def test_a_corrupt_or_unreadable_image_is_skipped_and_listed(tmp_path):
    _two_classes(tmp_path)
    _write(tmp_path / "bag", b"3.png", PNG[: len(PNG) // 3])
    _write(tmp_path / "bag", b"4.jpg", b"\xff\xd8\xff" + b"\x00" * 40)
    dataset = load_dataset(tmp_path)
    assert len(dataset.samples) == 4
    assert sorted(Path(row["path"]).name for row in dataset.skipped) == ["3.png", "4.jpg"]
    assert all(row["error"].startswith(row["path"]) for row in dataset.skipped)


def test_an_image_declaring_gigapixels_is_skipped_from_its_header_before_decoding(tmp_path):
    """A 2 kB PNG whose header declares 60000 x 60000 pixels (10.8 GB once decoded) is listed by name with the
    size it declares; the dataset's other images load. A side just over the limit, which OpenCV would decode
    cheaply, is refused the same way: the check is the header's, not the decoder's."""
    _two_classes(tmp_path)
    huge = bytearray(PNG)
    huge[16:24] = struct.pack(">II", 60000, 60000)
    _write(tmp_path / "bag", b"3.png", bytes(huge))
    cv2.imwrite(str(tmp_path / "shoe" / "3.png"), np.zeros((1, MAX_IMAGE_SIDE + 1, 3), np.uint8))
    dataset = load_dataset(tmp_path)
    assert len(dataset.samples) == 4
    errors = {Path(row["path"]).parent.name: row["error"] for row in dataset.skipped}
    assert errors["bag"] == (f"{tmp_path}/bag/3.png: its header declares 60000x60000 pixels; expected sides of 1 "
                             f"to {MAX_IMAGE_SIDE} (refused before decoding)")
    assert f"declares {MAX_IMAGE_SIDE + 1}x1 pixels" in errors["shoe"]
    with pytest.raises(ImageDecodeError, match=f"{tmp_path}/bag/3.png: its header declares 60000x60000"):
        read_image(tmp_path / "bag" / "3.png")
    for name, data, reason in ((b"e.png", b"", "empty file"), (b"g.png", b"GIF89a" + b"\0" * 40, "no JPEG, PNG")):
        with pytest.raises(ImageDecodeError, match=f"{tmp_path}/bag/{name.decode()}: {reason}"):
            read_image(_write(tmp_path / "bag", name, data))


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    _two_classes(tmp_path)
    (tmp_path / "coat").mkdir()
    with pytest.raises(DatasetError, match=f"{tmp_path / 'coat'}: class folder holds no images"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("body, expected", [
    (b'{"bag": 5}', "labels.json: field bag: class name 5 is a int, expected text"),
    (b'{"bag": ""}', "labels.json: field bag: class name '' is empty or holds control characters"),
    (b'{"bag": "a\\u0000b"}', "labels.json: field bag: class name 'a\\x00b' is empty or holds control"),
    (b'{"bag": "' + b"x" * 129 + b'"}', "xxx' is 129 characters long, more than 128"),
    (b'["bag", "shoe"]', "labels.json: expected an object mapping folder names to class names, got list"),
    (b'{"bag": "\xff"}', "labels.json: not UTF-8 text"),
    (b'{"bag": ', "labels.json: not valid JSON"),
], ids=["int", "empty", "control", "long", "list", "non-utf8", "truncated"])
def test_a_labels_file_of_the_wrong_shape_is_refused_naming_file_and_field(tmp_path, body, expected):
    _two_classes(tmp_path)
    (tmp_path / "labels.json").write_bytes(body)
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "labels.json")) and expected in str(info.value)


@pytest.mark.parametrize("body, expected", [
    (b"path,label\nbag/1.png,\xff\n", "data.csv: not UTF-8 text"),
    (b"path,label\nbag/1.png,bag\x00\n", "data.csv:2: field label: class name"),
    (b"path,label\nbag/1.png,bag\nshoe/1.png,\n", "data.csv:3: empty path or label"),
    (b"file,class\nbag/1.png,bag\n", "data.csv: expected a header with columns 'path,label'"),
], ids=["non-utf8", "nul", "empty-label", "header"])
def test_a_csv_with_bad_rows_is_refused_naming_the_line(tmp_path, body, expected):
    _two_classes(tmp_path)
    (tmp_path / "data.csv").write_bytes(body)
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path / "data.csv")
    assert str(info.value).startswith(str(tmp_path / "data.csv")) and expected in str(info.value)


# ---------------------------------------------------------------- IDX files

def _idx(body: bytes, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body


GOOD_IMAGES = gzip.compress(_idx(bytes(range(2 * 3 * 3)), (2, 3, 3)))
GOOD_LABELS = gzip.compress(_idx(bytes([0, 9]), (2,)))


def _idx_source(folder: Path, images: bytes = GOOD_IMAGES, labels: bytes = GOOD_LABELS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(images)
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(labels)
    return folder


@pytest.mark.parametrize("images, labels, expected", [
    (gzip.compress(_idx(b"", (2, 3, 3))[:9]), GOOD_LABELS, "train-images-idx3-ubyte.gz: truncated IDX header"),
    (GOOD_IMAGES[:-12], GOOD_LABELS, "train-images-idx3-ubyte.gz: cannot read IDX file"),
    (gzip.compress(_idx(bytes(10), (2, 3, 3))), GOOD_LABELS, "header says (2, 3, 3) (18 bytes) but the body has 10"),
    (gzip.compress(_idx(bytes(4), (4,))), GOOD_LABELS, "IDX header says 1 dimensions, expected 3"),
    (GOOD_IMAGES, gzip.compress(_idx(bytes([0]), (1,))), "train-labels-idx1-ubyte.gz: 1 labels for the 2 images"),
    (GOOD_IMAGES, gzip.compress(_idx(bytes([0, 200]), (2,))), "label 200 is not one of the 10 Fashion-MNIST"),
    (b"\x1f\x8b" + b"\x00" * 30, GOOD_LABELS, "train-images-idx3-ubyte.gz: cannot read IDX file"),
], ids=["header", "gzip-truncated", "body", "ndim", "count", "label-range", "gzip-corrupt"])
def test_a_truncated_or_damaged_idx_file_is_refused_by_name(tmp_path, images, labels, expected):
    source = _idx_source(tmp_path / "src", images, labels)
    with pytest.raises(DatasetError) as info:
        import_fashion_mnist(tmp_path / "out", source)
    assert str(info.value).startswith(str(source)) and expected in str(info.value)


def test_import_fashion_mnist_cli_exits_2_with_the_message_on_a_truncated_file(tmp_path):
    source = _idx_source(tmp_path / "src", images=gzip.compress(_idx(b"", (2, 3, 3))[:9]))
    proc = _cli("import-fashion-mnist", "--source", str(source), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{source / 'train-images-idx3-ubyte.gz'}: truncated IDX header (9 bytes)" in proc.stderr


def test_train_cli_exits_2_naming_a_class_folder_that_is_not_utf8(tmp_path):
    data = tmp_path / "data"
    _two_classes(data)
    _write(Path(os.fsdecode(os.path.join(os.fsencode(data), b"\xff"))), b"1.png", PNG)
    proc = _cli("train", "--data", str(data), "--out-dir", str(tmp_path / "runs"), "--weights", "none",
                "--epochs", "1", "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{data}/\\xff: class name '\\xff' is not valid UTF-8" in proc.stderr


# ---------------------------------------------------------------- property: generated dataset folders

def _fs_name(name: bytes) -> bool:
    return b"/" not in name and b"\x00" not in name and not name.startswith(b".")


PLAIN = st.from_regex(r"[a-z]{1,5}", fullmatch=True).map(str.encode)
NAMES = st.one_of(PLAIN, PLAIN, PLAIN, st.binary(min_size=1, max_size=6).filter(_fs_name),
                  st.text(min_size=1, max_size=6).map(lambda t: t.encode("utf-8", "surrogateescape")).filter(_fs_name))
CONTENTS = st.one_of(st.just(PNG), st.just(PNG), st.just(PNG), st.just(PNG), st.binary(max_size=64), st.just(PNG[: len(PNG) // 2]))
LABELS = st.one_of(st.binary(max_size=40),
                   st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=4), st.integers(), st.none()),
                                   max_size=3).map(lambda d: json.dumps(d).encode()))


def _check_loaded_or_refused(root: Path, source: Path) -> None:
    try:
        dataset = load_dataset(source)
    except DatasetError as exc:
        assert str(exc).startswith(str(root)), str(exc)
        event("refused")
        return
    event("loaded with skipped files" if dataset.skipped else "loaded")
    assert len(dataset.classes) >= 2
    for name in dataset.classes:
        name.encode("utf-8")
    for sample in dataset.samples:
        str(sample.path).encode("utf-8")
        read_image(sample.path)
    json.dumps(dataset.skipped, ensure_ascii=False).encode("utf-8")
    dataset.fingerprint()


@settings(max_examples=120)
@given(classes=st.dictionaries(NAMES, st.lists(st.tuples(NAMES, CONTENTS), min_size=1, max_size=3), min_size=2,
                               max_size=4),
       labels=st.one_of(st.none(), st.none(), LABELS))
def test_a_generated_class_folder_dataset_loads_or_is_refused_by_name(tmp_path, classes, labels):
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    for folder, files in classes.items():
        folder_path = Path(os.fsdecode(os.path.join(os.fsencode(root), folder)))
        for name, data in files:
            _write(folder_path, name + b".png", data)
    if labels is not None:
        (root / "labels.json").write_bytes(labels)
    _check_loaded_or_refused(root, root)


@settings(max_examples=80)
@given(files=st.lists(st.tuples(NAMES, NAMES, CONTENTS), min_size=2, max_size=8))
def test_a_generated_prefixed_dataset_loads_or_is_refused_by_name(tmp_path, files):
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    for label, rest, data in files:
        _write(root, label.replace(b"_", b"-") + b"_" + rest + b".jpg", data)
    _check_loaded_or_refused(root, root)


@settings(max_examples=80)
@given(body=st.binary(max_size=200), rows=st.lists(st.tuples(NAMES, NAMES), max_size=5))
def test_a_generated_csv_loads_or_is_refused_by_name(tmp_path, body, rows):
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    _two_classes(root)
    (root / "random.csv").write_bytes(body)
    _check_loaded_or_refused(root, root / "random.csv")
    lines = [b"path,label", b"bag/1.png,bag", b"shoe/1.png,shoe"] + [path + b"," + label for path, label in rows]
    (root / "rows.csv").write_bytes(b"\n".join(lines) + b"\n")
    _check_loaded_or_refused(root, root / "rows.csv")


@settings(max_examples=80)
@given(which=st.sampled_from(["images", "labels"]), cut=st.integers(0, 200), flips=st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3), raw=st.booleans())
def test_a_damaged_idx_file_imports_or_is_refused_by_name(tmp_path, which, cut, flips, raw):
    good = {"images": _idx(bytes(range(2 * 3 * 3)), (2, 3, 3)), "labels": _idx(bytes([0, 9]), (2,))}
    body = bytearray(good[which])
    for at, value in flips:
        body[at % len(body)] = value
    body = bytes(body[:cut]) if cut < len(body) else bytes(body)
    damaged = body if raw else gzip.compress(body)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    source = _idx_source(folder / "src", **{which: damaged})
    try:
        counts = import_fashion_mnist(folder / "out", source)
    except DatasetError as exc:
        assert str(exc).startswith(str(source)), str(exc)
        event("refused")
    else:
        event("imported")
        assert counts["train"] == counts["test"] == 2
