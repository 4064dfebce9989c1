"""The export checks that the images of the run's split are still the ones it was trained and split with.

split.json keeps the fingerprint of its images (``Dataset.fingerprint``: their bytes). Before, the export read
split.json's image names only: an image replaced since training by another of the same name and size was
calibrated on, evaluated and gated on, and the bundle's figures described other images, without a word (repro:
/tmp/export_fp/repro_export_fingerprint.py). A real (tiny) training run and real Fashion-MNIST PNGs throughout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer.data import DatasetError
from trainer.export import bundle as bundle_mod
from trainer.export.quantize import QuantizeConfig


class _Reached(Exception):
    """The export got past its checks of the run's files to its first piece of work (the ONNX export)."""


def _copy_run(trained_run: Path, fmnist_dir: Path, tmp_path: Path, *, fingerprint: bool = True) -> Path:
    """A copy of the real run whose split points at a copy of its images (the shared fixture stays untouched)."""
    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir()
    for name in ("best.pt", "split.json", "data_report.json"):
        shutil.copy(trained_run / name, run / name)
    split = json.loads((run / "split.json").read_text())
    shutil.copytree(split["root"], data)
    assert split["fingerprint"].startswith("content-sha256:")     # the trainer saved it
    split["root"] = str(data)
    if not fingerprint:                 # a run trained before 2026-12-07
        del split["fingerprint"]
    (run / "split.json").write_text(json.dumps(split))
    return run


def _same_size_other(run: Path, source: Path) -> tuple[Path, Path]:
    """An image of the run's split, and another real picture of the same number of bytes (other bytes)."""
    split = json.loads((run / "split.json").read_text())
    root = Path(split["root"])
    by_size = {}
    for rel, _ in split["train"] + split["val"]:
        by_size.setdefault((root / rel).stat().st_size, root / rel)
    for other in sorted(source.rglob("*.png")):
        target = by_size.get(other.stat().st_size)
        if target is not None and other.read_bytes() != target.read_bytes():
            return target, other
    pytest.skip("no image of the same size outside the split")      # not seen: 1,000 PNGs of 28 x 28 px


def _export(run: Path, tmp_path: Path, version: str = "1"):
    return bundle_mod.export_bundle(bundle_mod.ExportConfig(
        checkpoint=run / "best.pt", models_dir=tmp_path / "models", name="x", version=version, tensorrt="off",
        workers=0, quantize=QuantizeConfig(calibration_images=128)))


def test_an_export_refuses_images_replaced_since_the_run_and_exports_once_restored(trained_run, fmnist_dir, tmp_path,
                                                                                   monkeypatch):
    # given: a copy of a real run, and one image of its split replaced by another real picture of the same size
    run = _copy_run(trained_run, fmnist_dir, tmp_path)
    target, other = _same_size_other(run, fmnist_dir / "test")
    original = target.read_bytes()
    shutil.copyfile(other, target)

    def no_work(*args, **kwargs):
        raise AssertionError("the export started its work before checking the run's images")

    monkeypatch.setattr(bundle_mod, "export_onnx", no_work)
    # when: it is exported; then: refused before any work, naming split.json and what to do
    with pytest.raises(DatasetError, match=r"split.json: the \d+ images of this run's split are not all the images it "
                                           r"was trained and split with: an image in .* was replaced since the run "
                                           r".*restore them, or re-train") as caught:
        _export(run, tmp_path)
    assert str(run) in str(caught.value)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.onnx"))
    assert not list(run.glob("export-*"))
    # when: the image is restored; then: the real export runs to its bundle
    target.write_bytes(original)
    monkeypatch.undo()
    result = _export(run, tmp_path)
    assert (result.bundle_dir / "manifest.json").is_file()


def test_a_run_saved_without_a_fingerprint_exports_as_before(trained_run, fmnist_dir, tmp_path, monkeypatch):
    # given: a run whose split.json has no fingerprint (trained before 2026-12-07), one image replaced since
    run = _copy_run(trained_run, fmnist_dir, tmp_path, fingerprint=False)
    target, other = _same_size_other(run, fmnist_dir / "test")
    shutil.copyfile(other, target)

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(bundle_mod, "export_onnx", reached)
    # when: it is exported; then: the export is not refused for it (it cannot tell), and goes on to its work
    with pytest.raises(_Reached):
        _export(run, tmp_path)


def test_a_missing_image_of_the_split_is_refused_naming_split_json(trained_run, fmnist_dir, tmp_path, monkeypatch):
    # given: a copy of a real run with one image of its split deleted
    run = _copy_run(trained_run, fmnist_dir, tmp_path)
    split = json.loads((run / "split.json").read_text())
    rel = split["val"][0][0]
    (Path(split["root"]) / rel).unlink()

    def no_work(*args, **kwargs):
        raise AssertionError("the export started its work before checking the run's images")

    monkeypatch.setattr(bundle_mod, "export_onnx", no_work)
    # when: it is exported; then: a DatasetError naming split.json and the image, before any work
    with pytest.raises(DatasetError, match=rf"split.json: cannot read {rel} of this run's split in .*re-train"):
        _export(run, tmp_path)
