"""An export that fails at its last step, the publish of the finished version into the models folder, leaves no
reports in the run folder: its ``export-<version>`` folder appears only with the bundle, and the reports of an
earlier export of that version stay as they were.

Real runs and real exports (a tiny real fine-tune, ONNX Runtime); the failures are injected at the publish itself:
``os.replace`` of the finished version refused as a full disk or a models folder without permission would refuse it,
and the version published by another export while this one ran. Before the fix the reports were written straight
into ``export-<version>`` before the publish (repro: /tmp/export_data/repro_publish_failure.py)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from trainer.export import bundle as bundle_mod
from trainer.export.quantize import QuantizeConfig

EARLIER = '{"written by": "an earlier export of version 1"}'


def _run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of the real run's files with the reports of an earlier export of version 1 in it."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "split.json", "data_report.json"):
        shutil.copy(trained_run / name, run / name)
    (run / "export-1" / "fp32").mkdir(parents=True)
    (run / "export-1" / "fp32" / "metrics.json").write_text(EARLIER)
    return run


def _config(run: Path, models: Path) -> bundle_mod.ExportConfig:
    return bundle_mod.ExportConfig(checkpoint=run / "best.pt", models_dir=models, name="tiny", version="1",
                                   tensorrt="off", workers=0, val_limit=40, parity_images=8, open_set_images=64,
                                   quantize=QuantizeConfig(calibration_images=16))


def _only_earlier_reports(run: Path) -> None:
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "data_report.json", "export-1", "split.json"]
    assert [str(p.relative_to(run)) for p in sorted((run / "export-1").rglob("*"))] == \
        ["export-1/fp32", "export-1/fp32/metrics.json"]
    assert (run / "export-1" / "fp32" / "metrics.json").read_text() == EARLIER


def _left_by_a_killed_export(run: Path) -> Path:
    """The hidden reports folder of an export of version 1 whose process (a real one, ended) was killed."""
    import subprocess
    import sys

    from contract.bundle import partial_dir

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    head, _pid, rand = partial_dir(run / "export-1").name.rsplit("-", 2)
    left = run / f"{head}-{int(ended.stdout)}-{rand}"
    (left / "fp32").mkdir(parents=True)
    (left / "fp32" / "metrics.json").write_text("{}")
    return left


def test_a_publish_the_file_system_refuses_leaves_no_reports_and_a_rerun_publishes_both(trained_run, tmp_path,
                                                                                       monkeypatch):
    # given: a run with the reports of an earlier export of version 1, and a models folder whose rename of the
    # finished version fails (ENOSPC, as a full disk refuses it)
    run, models = _run_copy(trained_run, tmp_path), tmp_path / "models"
    final = models / "tiny" / "1"
    real_replace = os.replace

    def refused_at_publish(src, dst):
        if Path(dst) == final:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refused_at_publish)
    # when: the export runs to its end
    with pytest.raises(OSError, match="No space left on device"):
        bundle_mod.export_bundle(_config(run, models))
    # then: nothing under models/, and the run folder holds the earlier reports only, no report of this export
    assert list((models / "tiny").iterdir()) == []
    _only_earlier_reports(run)

    # and when the file system takes it again, a rerun of the same version publishes the bundle and its reports,
    # and removes the reports an export killed outright (kill -9: no clean-up) left in their hidden folder
    monkeypatch.setattr(os, "replace", real_replace)
    killed = _left_by_a_killed_export(run)
    result = bundle_mod.export_bundle(_config(run, models))
    assert not killed.exists()
    assert result.bundle_dir == final and (final / "manifest.json").is_file()
    assert sorted(p.name for p in (models / "tiny").iterdir()) == ["1"]
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "data_report.json", "export-1", "split.json"]
    assert sorted(p.name for p in (run / "export-1").iterdir()) == ["fp32", "int8"]
    assert (run / "export-1" / "fp32" / "metrics.json").read_text() != EARLIER
    assert (run / "export-1" / "int8" / "confusion_matrix.json").is_file()


def test_a_version_published_meanwhile_by_another_export_leaves_no_reports(trained_run, tmp_path, monkeypatch):
    # given: another export that publishes tiny/1 while this one writes its reports
    run, models = _run_copy(trained_run, tmp_path), tmp_path / "models"
    final = models / "tiny" / "1"
    real_reports = bundle_mod.write_reports

    def reports_while_another_publishes(out_dir, *args):
        final.mkdir(exist_ok=True)
        (final / "manifest.json").write_text("the other export's")
        return real_reports(out_dir, *args)

    monkeypatch.setattr(bundle_mod, "write_reports", reports_while_another_publishes)
    # when: this export reaches its publish
    with pytest.raises(FileExistsError, match="tiny/1: bundle version already exists"):
        bundle_mod.export_bundle(_config(run, models))
    # then: the other export's bundle stands alone, and the run folder holds no report of this export
    assert sorted(p.name for p in (models / "tiny").iterdir()) == ["1"]
    assert (final / "manifest.json").read_text() == "the other export's"
    _only_earlier_reports(run)
