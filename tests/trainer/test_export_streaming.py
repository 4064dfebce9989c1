"""The export streams its images: read (or rendered), preprocessed, fed and dropped a chunk at a time, with the
figures of the whole set at once.

A user's export held every calibration, validation, parity, open-set and station-view image at once (0.6 MB
each at 224 px: a 6,000-image validation split alone is 3.6 GB), so its memory grew with the image counts."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_support import count_waiting_images

from contract.bundle import load_bundle
from contract.preprocess import CropPolicy, InputSpec
from trainer.evaluate import ChainedInputs, input_batches
from trainer.export.bundle import ExportConfig, export_bundle
from trainer.export.quantize import QuantizeConfig


class _Chunked:
    """An array served ``size`` rows at a time, each chunk a copy (as a stream makes them)."""

    def __init__(self, array: np.ndarray, size: int) -> None:
        self.array, self.size = array, size

    def __len__(self) -> int:
        return len(self.array)

    def chunks(self):
        for start in range(0, len(self.array), self.size):
            yield self.array[start : start + self.size].copy()


@pytest.mark.parametrize("chunk", [1, 3, 8, 50, 103, 400])
@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_batches_of_a_stream_are_the_batches_of_the_whole_array(chunk, batch):
    # given: 103 rows, served in chunks of any size, alone or as parts one after the other
    rows = np.arange(103 * 3, dtype=np.float32).reshape(103, 3)
    whole = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    for stream in (_Chunked(rows, chunk), ChainedInputs(_Chunked(rows[:40], chunk), rows[40:41],
                                                        _Chunked(rows[41:], chunk))):
        # then: a model sees the same batches as from one array (the figures cannot move), the last one shorter
        got = list(input_batches(stream, batch))
        assert [len(b) for b in got] == [len(b) for b in whole]
        assert all(np.array_equal(a, b) for a, b in zip(got, whole))
    assert list(input_batches(np.zeros((0, 3), np.float32), batch)) == []


def _foreground_run(trained_run: Path, run: Path, extra_val: int = 0) -> Path:
    """``trained_run`` as a foreground-crop run (station views rendered), its validation split extended with
    ``extra_val`` of its training images (more images than a chunk and a model batch hold together)."""
    run.mkdir()
    ckpt = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    spec = InputSpec.from_manifest(ckpt["input"])
    ckpt["input"] = dataclasses.replace(spec, crop=CropPolicy("foreground", 0.1)).to_manifest()
    torch.save(ckpt, run / "best.pt")
    split = json.loads((trained_run / "split.json").read_text())
    split["val"] = split["val"] + split["train"][:extra_val]
    (run / "split.json").write_text(json.dumps(split))
    shutil.copy(trained_run / "data_report.json", run / "data_report.json")
    return run


def _figures(manifest: dict) -> dict:
    """What a streamed export must not change: everything but the time, the version and where it was written."""
    manifest = json.loads(json.dumps(manifest))
    del manifest["created_at"], manifest["version"]
    return manifest


def test_a_streamed_export_writes_the_figures_of_the_whole_set_at_once(trained_run, tmp_path):
    # given: one foreground-crop run (calibration, gate, parity, open set and station views all used) exported
    # with every set as one chunk (as the export held them before), and with chunks of 7 (no batch size divides it)
    run = _foreground_run(trained_run, tmp_path / "run")
    manifests, open_sets = {}, {}
    for version, chunk in (("whole", 100_000), ("chunked", 7)):
        result = export_bundle(ExportConfig(
            checkpoint=run / "best.pt", models_dir=tmp_path / "models", name="fg", version=version, tensorrt="off",
            workers=0, val_limit=60, parity_images=30, open_set_images=90, station_val_images=40, chunk_images=chunk,
            quantize=QuantizeConfig(calibration_images=26, batch_size=4)))
        manifests[version] = _figures(result.manifest)
        open_sets[version] = np.load(result.bundle_dir / "open_set.npz")
    # then: the same manifest, figure for figure (the INT8 file's sha256 included: the same calibrated ranges),
    # and the same open-set statistics
    quality = manifests["whole"]["quality"]
    assert quality["station_view"]["images"] == 40 and quality["int8"]["calibration"]["calibration_images"] == 26
    assert quality["parity"]["images"] == 30 and manifests["whole"]["open_set"]["calibration"]["fit_images"] == 103
    assert manifests["chunked"] == manifests["whole"]
    assert set(open_sets["chunked"].files) == set(open_sets["whole"].files)
    for name in open_sets["whole"].files:
        np.testing.assert_array_equal(open_sets["chunked"][name], open_sets["whole"][name], err_msg=name)


def test_an_export_holds_a_chunk_and_a_model_batch_of_preprocessed_images_not_whole_sets(
        trained_run, tmp_path, monkeypatch):
    """Counts, for a real export, the images preprocessed (every one goes through the station's Preprocessor,
    read from disk or rendered as a station view) since a model last ran a batch: what waits in memory for a
    model. Streamed, that is at most a chunk plus one model batch (256, ONNX Runtime's), whatever the counts;
    an export that preprocesses a whole set before running a model on it counts the whole set (here 300 to 800
    images a set). workers=0: the images are made in this process, where they are counted."""
    # given: a foreground-crop run with about 600 validation images, and every set larger than a chunk and a batch
    run = _foreground_run(trained_run, tmp_path / "run", extra_val=400)
    made = count_waiting_images(monkeypatch)
    chunk = 32
    result = export_bundle(ExportConfig(
        checkpoint=run / "best.pt", models_dir=tmp_path / "models", name="fg", version="1", tensorrt="off",
        workers=0, parity_images=300, open_set_images=800, station_val_images=1000, chunk_images=chunk,
        quantize=QuantizeConfig(calibration_images=600)))
    q = result.manifest["quality"]
    val = len(json.loads((run / "split.json").read_text())["val"])
    assert val > 500 and q["val_images"] == q["station_view"]["images"] == val and q["parity"]["images"] == 300
    assert q["int8"]["calibration"]["calibration_images"] == 600
    assert result.manifest["open_set"]["calibration"]["fit_images"] == 800 + 300
    # then: never more than a chunk and a batch of them waiting for a model (before: 1,199, two whole sets),
    # though thousands went through
    assert made["peak"] <= 256 + chunk, made
    assert made["total"] > 2500
    load_bundle(result.bundle_dir)
