"""Training review (2026-12-07): a damaged mask file beside one training image, and the demo after an interrupted
Fashion-MNIST import."""

from __future__ import annotations

import gzip
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer.augment import eval_spec, load_canvas, mask_path
from trainer.data import fashion_mnist_imported, import_fashion_mnist

ROOT = Path(__file__).resolve().parents[2]


def _item(path: Path, value: int, side: int = 40) -> Path:
    img = np.zeros((side, side, 3), np.uint8)
    img[10:30, 10:30] = value
    cv2.imwrite(str(path), img)
    return path


def _damaged_masks(folder: Path) -> tuple[Path, Path]:
    """An image whose mask file is not an image, and one whose mask file is another size than the image."""
    corrupt, small = _item(folder / "corrupt.png", 200), _item(folder / "small.png", 120)
    mask_path(corrupt).write_bytes(b"\x89PNG\r\n\x1a\n not the rest of a PNG")
    cv2.imwrite(str(mask_path(small)), np.full((20, 20), 255, np.uint8))
    return corrupt, small


def test_a_damaged_mask_file_is_ignored_with_a_warning_naming_it(tmp_path, caplog):
    # given: two images whose mask files cannot be used
    corrupt, small = _damaged_masks(tmp_path)
    spec = eval_spec(32, 32)
    with caplog.at_level(logging.WARNING, logger="trainer.augment"):
        # when: they are loaded as training canvases with masks
        canvases = [load_canvas(p, spec, with_mask=True) for p in (corrupt, small, corrupt)]
    # then: each is its image with an empty mask plane (the renderer finds the mask as for an image without a mask
    # file), and each damaged mask file is reported once, by name, with what is wrong
    for canvas, path in zip(canvases, (corrupt, small, corrupt)):
        assert canvas.shape == (4, 32, 32) and canvas[3].max() == 0
        assert (canvas[:3] == load_canvas(path, spec)).all()
    warned = [r.getMessage() for r in caplog.records]
    assert sum(str(mask_path(corrupt)) in m for m in warned) == 1
    assert any(str(mask_path(small)) in m and "20x20" in m and "40x40" in m for m in warned)


def test_training_goes_on_past_a_damaged_mask_file(tmp_path):
    # given: a small dataset where one image's mask file is corrupt and another's is the wrong size
    data = tmp_path / "data"
    for label, value in (("a", 60), ("b", 220)):
        (data / label).mkdir(parents=True)
        for i in range(4):
            _item(data / label / f"{i}.png", value + i)
        _damaged_masks(data / label)      # each class: 6 images, 2 with damaged masks; some of them are trained on
    # when: it is trained on with station views (the CLI default), which read mask files
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "trainer", "train", "--data", str(data), "--arch", "mobilenet_v2",
                           "--weights", "none", "--image-size", "32", "--resize-shorter", "32", "--epochs", "1",
                           "--batch-size", "4", "--workers", "0", "--val-fraction", "0.3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    # then: the run finishes; the damaged mask files of the training split are named in warnings, not a reason
    # to stop
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs" / "model" / "best.pt").is_file()
    assert ".mask.png" in done.stderr and "mask file ignored" in done.stderr


def _idx(path: Path, array: np.ndarray) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.fixture
def small_fashion_mnist(tmp_path) -> Path:
    """Fashion-MNIST's four IDX files, 20 training and 10 test images of 28x28 (all ten classes)."""
    source = tmp_path / "source"
    source.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _idx(source / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _idx(source / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return source


def test_the_demo_completes_an_interrupted_import_before_training(small_fashion_mnist, tmp_path, monkeypatch):
    import trainer.engine
    from trainer.pipeline import DemoConfig, run_demo

    # given: what a first demo run stopped during its import leaves: a train folder with its first images, no test
    # folder, no record that the import finished
    data = tmp_path / "fashion-mnist"
    import_fashion_mnist(data, small_fashion_mnist, limit=3)
    for path in sorted((data / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (data / "test").rmdir()
    (data / ".import-complete.json").unlink()
    assert len(list((data / "train").rglob("*.png"))) == 3

    # when: the demo runs again (the Trainer replaced by one that counts the images it is given and stops there:
    # this test is about the data, not the training)
    seen = {}

    class Stop(Exception):
        pass

    class CountingTrainer:
        def __init__(self, cfg, run_dir):
            self.cfg = cfg

        def fit(self):
            seen["train"] = len(list(Path(self.cfg.data).rglob("*.png")))
            raise Stop

    monkeypatch.setattr(trainer.engine, "Trainer", CountingTrainer)
    with pytest.raises(Stop):
        run_demo(DemoConfig(data_dir=data, out_dir=tmp_path / "runs", models_dir=tmp_path / "models",
                            source=small_fashion_mnist))

    # then: it trained on the whole training set, the import finished, and the test split is there
    assert seen["train"] == 20
    assert len(list((data / "test").rglob("*.png"))) == 10 and fashion_mnist_imported(data)


def test_an_import_of_the_first_images_only_is_not_a_finished_import(small_fashion_mnist, tmp_path):
    import_fashion_mnist(tmp_path / "some", small_fashion_mnist, limit=3)
    import_fashion_mnist(tmp_path / "all", small_fashion_mnist)
    assert not fashion_mnist_imported(tmp_path / "some") and fashion_mnist_imported(tmp_path / "all")
    assert not fashion_mnist_imported(tmp_path / "nothing-here")


def test_resuming_refuses_a_split_whose_image_was_relabelled_since(tmp_path):
    from trainer.data import DatasetError, load_dataset, load_split, save_split, stratified_split

    # given: a CSV dataset, and the split a run saved from it
    rows = ["path,label"]
    for label, value in (("a", 60), ("b", 200)):
        for i in range(4):
            _item(tmp_path / f"{label}{i}.png", value + i)
            rows.append(f"{label}{i}.png,{label}")
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    dataset = load_dataset(csv_file)
    train, val = stratified_split(dataset.labels(), 0.25, seed=0)
    split = tmp_path / "split.json"
    save_split(split, dataset, train, val, seed=0)
    assert load_split(split, load_dataset(csv_file)) == (train, val)      # unchanged: the same split

    # when: one training image's row is relabelled before the run is resumed
    moved = dataset.relative(dataset.samples[train[0]].path)
    csv_file.write_text(csv_file.read_text().replace(f"{moved},a", f"{moved},b"))
    # then: the resume is refused, naming the split file, the image and both labels, not trained on the new label
    with pytest.raises(DatasetError, match=rf"split\.json: image {moved} is labelled 'b' .* now, 'a' in this saved"):
        load_split(split, load_dataset(csv_file))


def test_the_demo_leaves_a_train_folder_that_is_not_an_import_as_it_is(small_fashion_mnist, tmp_path):
    from trainer.pipeline import import_demo_data

    # given: a --data-dir whose train folder holds a user's own class folders (no Fashion-MNIST labels.json)
    own = tmp_path / "own"
    (own / "train" / "mug").mkdir(parents=True)
    _item(own / "train" / "mug" / "0.png", 90)
    # when: the demo prepares its data there, with Fashion-MNIST installed
    import_demo_data(own, small_fashion_mnist)
    # then: nothing is added to it
    assert [p.name for p in (own / "train").iterdir()] == ["mug"] and not (own / "test").exists()
