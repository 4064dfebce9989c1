"""The export reads two files of the training run besides the checkpoint: split.json (which images to calibrate,
evaluate and gate on) and data_report.json (the manifest's provenance). A damaged one is refused before any work,
with an error naming the file, and nothing appears under models/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer.data import DatasetError
from trainer.export import bundle as bundle_mod
from trainer.export.quantize import QuantizeConfig


def _edit(file: str, change):
    def edit(run: Path) -> None:
        payload = json.loads((run / file).read_text())
        change(payload)
        (run / file).write_text(json.dumps(payload))
    return edit


def _write(file: str, text: str):
    return lambda run: (run / file).write_text(text)


CASES = {
    "split not JSON": (_write("split.json", '{"root": "/data", "train": [['), "split.json: not a saved split"),
    "split without root": (_edit("split.json", lambda s: s.pop("root")), "split.json: not a saved split .*'root'"),
    "split rows not pairs": (_edit("split.json", lambda s: s.update(val=["a.png"])), "split.json: not a saved split"),
    "split label not a class": (_edit("split.json", lambda s: s["val"][3].__setitem__(1, 10)),
                                r"split.json: val row \[.*, 10\]; expected \[path, class index 0..9\]"),
    "split without validation": (_edit("split.json", lambda s: s.update(val=[])), "split.json: no validation image"),
    "report not JSON": (_write("data_report.json", "{half"), "data_report.json: not a data report"),
    "report missing": (lambda run: (run / "data_report.json").unlink(), "data_report.json: cannot read"),
    "report without fingerprint": (_edit("data_report.json", lambda r: r.pop("fingerprint")),
                                   "data_report.json: not a data report .*'fingerprint'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_run_file_is_refused_before_any_work_naming_the_file(trained_run, tmp_path, monkeypatch, case):
    # given: a copy of a real run with one file damaged
    edit, message = CASES[case]
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "split.json", "data_report.json"):
        shutil.copy(trained_run / name, run / name)
    edit(run)

    def no_work(*args, **kwargs):
        raise AssertionError("the export started its work before checking the run's files")

    monkeypatch.setattr(bundle_mod, "export_onnx", no_work)
    # when: it is exported; then: a DatasetError (the CLI's one-line error) names the file and what is wrong, before
    # the ONNX export (before, a data report was read only at the very end, and a malformed file gave a KeyError
    # traceback or a JSON error that named no file)
    with pytest.raises(DatasetError, match=message) as caught:
        bundle_mod.export_bundle(bundle_mod.ExportConfig(
            checkpoint=run / "best.pt", models_dir=tmp_path / "models", name="x", version="1", tensorrt="off",
            workers=0, quantize=QuantizeConfig(calibration_images=8)))
    assert str(run) in str(caught.value)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.onnx"))
