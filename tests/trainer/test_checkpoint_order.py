"""The end of an epoch writes best.pt (when the epoch improved), last.pt, then its metrics.jsonl line. A kill can land
between any two: the resume then finds the run as an uninterrupted one leaves it (best.pt, last.pt and metrics.jsonl
tell of the same epochs and the same best), and a run resumed on a Mac copy of its data keeps its classes.

A kill is injected by raising from ``os.replace`` (the rename that makes each checkpoint whole); what a kill -9 leaves
and an exception would clean up (a partial ``.last.pt.tmp``) is put back by hand. Which epochs improve is set by the
tests: a tiny run's accuracy is noise, so the validation figure is steered (the run, its checkpoints and its resume
are real).
"""

from __future__ import annotations

import json
import os
import shutil
import unicodedata

import pytest
import torch

import trainer.engine as engine
from trainer.config import TrainConfig
from trainer.data import DatasetError
from trainer.engine import Trainer


def _cfg(fmnist_dir, **kw) -> TrainConfig:
    base = dict(data=str(fmnist_dir / "train"), arch="mobilenet_v2", weights="none", image_size=32, resize_shorter=32,
                epochs=3, batch_size=16, limit_per_class=6, val_fraction=0.25, workers=0, seed=3, device="cpu",
                max_steps_per_epoch=2)
    base.update(kw)
    return TrainConfig(**base)


def _steer(monkeypatch, scores: list[float]) -> None:
    """The next validations score these (accuracy and macro-F1 alike), in turn."""
    scores = list(scores)
    monkeypatch.setattr(engine, "accuracy_and_f1", lambda *args: (scores[0], scores.pop(0)))


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _kill_at(monkeypatch, name: str, count: int, *, before: bool = False) -> None:
    """A kill at the ``count``-th rename onto ``name`` (after it, or ``before`` it)."""
    real_replace, seen = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(os.sep + name):
            seen.append(dst)
            if before and len(seen) == count:
                raise KeyboardInterrupt(f"killed before the rename onto {name}")
        real_replace(src, dst, *args, **kwargs)
        if not before and str(dst).endswith(os.sep + name) and len(seen) == count:
            raise KeyboardInterrupt(f"killed after the rename onto {name}")

    monkeypatch.setattr(os, "replace", replace)


@pytest.fixture(scope="module")
def uninterrupted(fmnist_dir, tmp_path_factory):
    """The run as it ends when nothing stops it: epoch 2 its best."""
    run = tmp_path_factory.mktemp("full") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _steer(monkeypatch, [0.2, 0.4, 0.1])
        Trainer(_cfg(fmnist_dir), run).fit()
    return run


@pytest.mark.parametrize("kill", ["after best.pt", "before last.pt, its partial file left", "after last.pt",
                                  "after the metrics line"])
def test_a_kill_at_any_point_of_an_epochs_end_resumes_to_the_uninterrupted_runs_files(fmnist_dir, tmp_path,
                                                                                      monkeypatch, uninterrupted,
                                                                                      kill):
    """best.pt was written before last.pt: killed between the two, best.pt held epoch 2 and last.pt epoch 1. The
    resume trained epoch 2 again; scoring lower there (resumed on another machine, a GPU's kernels), it recorded epoch
    1 as the best (last.pt, the CLI's summary) while best.pt, the model exported, was the lost attempt's epoch 2, whose
    figures metrics.jsonl never held. Killed after last.pt, before the metrics line, the resume went on after epoch 2
    and metrics.jsonl lacked its line for good. A kill mid-write left a partial checkpoint in the run folder."""
    run = tmp_path / "run"
    # given: a run killed at the end of epoch 2, which improved on epoch 1
    _steer(monkeypatch, [0.2, 0.4])
    if kill == "after best.pt":
        _kill_at(monkeypatch, "best.pt", 2)
        cut = Trainer(_cfg(fmnist_dir), run)
    elif kill.startswith("before last.pt"):
        _kill_at(monkeypatch, "last.pt", 2, before=True)
        cut = Trainer(_cfg(fmnist_dir), run)
    elif kill == "after last.pt":
        _kill_at(monkeypatch, "last.pt", 2)
        cut = Trainer(_cfg(fmnist_dir), run)
    else:
        def stop(epoch, row):
            if epoch == 2:
                raise KeyboardInterrupt

        cut = Trainer(_cfg(fmnist_dir), run, on_epoch_end=stop)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    monkeypatch.undo()
    if kill.startswith("before last.pt"):       # what a kill -9 mid-save leaves (an exception removes it)
        (run / ".last.pt.tmp").write_bytes((run / "best.pt").read_bytes()[:4096])
    # when: it is resumed, each epoch it trains now scoring lower than epoch 2 did
    _steer(monkeypatch, [0.1, 0.1])
    result = Trainer(TrainConfig.load(run / "config.json"), run).fit()
    # then: best.pt is epoch 2's model, as last.pt, metrics.jsonl and the run's result record, and the files are
    # those of the uninterrupted run
    assert (result.best_epoch, result.best_metric, result.epochs_run) == (2, 0.4, 3)
    assert _state(run / "last.pt") == _state(uninterrupted / "last.pt") == \
        {"epoch": 3, "best_metric": 0.4, "best_epoch": 2, "epochs_without_improvement": 1}
    assert _state(run / "best.pt") == _state(uninterrupted / "best.pt")
    for name in ("best.pt", "last.pt"):
        ours = torch.load(run / name, weights_only=True)["model"]
        theirs = torch.load(uninterrupted / name, weights_only=True)["model"]
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=f"{name} {key}")
    rows, full = _rows(run), _rows(uninterrupted)
    assert [(r["epoch"], r["val_accuracy"]) for r in rows] == [(1, 0.2), (2, 0.4), (3, 0.1)]
    for ours, theirs in zip(rows, full, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_finished_runs_missing_last_line_is_written_by_a_resume(fmnist_dir, tmp_path, monkeypatch):
    """Killed after the last epoch's last.pt, before its line: the run is finished, the resume trains nothing and
    writes the line from the figures last.pt holds."""
    run = tmp_path / "run"
    _steer(monkeypatch, [0.2, 0.4])
    _kill_at(monkeypatch, "last.pt", 2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(fmnist_dir, epochs=2), run).fit()
    monkeypatch.undo()
    assert [r["epoch"] for r in _rows(run)] == [1]
    saved = torch.load(run / "last.pt", weights_only=True)["metrics"]
    result = Trainer(TrainConfig.load(run / "config.json"), run).fit()
    assert result.epochs_run == 2 and [r["epoch"] for r in _rows(run)] == [1, 2]
    assert _rows(run)[1] == saved and saved["val_accuracy"] == 0.4


def test_a_newer_best_pt_that_is_not_this_runs_next_checkpoint_is_left_and_the_run_resumes_from_last_pt(
        fmnist_dir, tmp_path, monkeypatch, caplog):
    """Only a kill between the two writes leaves best.pt one epoch past last.pt, from the same run: a best.pt put
    there by hand (another run's, an edited one) is named, never made last.pt."""
    run = tmp_path / "run"
    _steer(monkeypatch, [0.2, 0.4])
    _kill_at(monkeypatch, "best.pt", 2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(fmnist_dir), run).fit()
    monkeypatch.undo()
    best = torch.load(run / "best.pt", weights_only=True)
    torch.save(dict(best, config=dict(best["config"], lr=0.5)), run / "best.pt")      # trained with another lr
    _steer(monkeypatch, [0.1, 0.1])
    with caplog.at_level("WARNING", logger="trainer.engine"):
        result = Trainer(TrainConfig.load(run / "config.json"), run).fit()
    assert "is not the next checkpoint of this run" in caplog.text
    assert result.epochs_run == 3 and [r["epoch"] for r in _rows(run)] == [1, 2, 3]


NFD = {name: unicodedata.normalize("NFD", name) for name in ("Crème", "Crisps", "Tea")}


def _mac_copy(fmnist_dir, root, counts: dict[str, int], sources=("Bag", "Coat", "Dress")):
    """Real images in class folders named as a Mac names them (NFD: 'e' + a combining accent)."""
    for (name, count), source in zip(counts.items(), sources, strict=True):
        folder = root / unicodedata.normalize("NFD", name)
        folder.mkdir(parents=True)
        for path in sorted((fmnist_dir / "train" / source).glob("*.png"))[:count]:
            shutil.copy(path, folder / path.name)
    return root


def _as_an_older_trainer_wrote_it(run) -> list[str]:
    """last.pt and split.json of the run as a trainer that read class names as the folders spell them wrote them:
    the NFD names, sorted as NFD sorts them (Crème before Crisps; in NFC it comes after)."""
    old = sorted(NFD.values())
    ckpt = torch.load(run / "last.pt", weights_only=True)
    row = {i: old.index(unicodedata.normalize("NFD", name)) for i, name in enumerate(ckpt["classes"])}
    torch.save(dict(ckpt, classes=old), run / "last.pt")
    split = json.loads((run / "split.json").read_text())
    split.update(classes=old, **{part: [[p, row[label]] for p, label in split[part]] for part in ("train", "val")})
    (run / "split.json").write_text(json.dumps(split))
    return old


def test_a_run_on_a_mac_copy_started_before_class_names_were_read_in_nfc_resumes_with_its_classes(
        fmnist_dir, tmp_path, monkeypatch):
    """The resume was refused: "the classes ['Crisps', 'Crème', 'Tea'] differ from the classes ['Crème', 'Crisps',
    'Tea']", two lists that print alike but for the order, and restoring "the data as it was" could not help (it
    was). As load_dataset(classes=...) does, the run keeps its names' spelling and order: its model's rows and its
    split's labels."""
    data = _mac_copy(fmnist_dir, tmp_path / "data", {"Crème": 10, "Crisps": 6, "Tea": 8})
    run = tmp_path / "run"
    _steer(monkeypatch, [0.2, 0.3])

    def stop(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(fmnist_dir, data=str(data), epochs=2, batch_size=8, limit_per_class=None), run,
                on_epoch_end=stop).fit()
    old = _as_an_older_trainer_wrote_it(run)
    assert Trainer(TrainConfig.load(run / "config.json"), run).fit().epochs_run == 2
    assert torch.load(run / "last.pt", weights_only=True)["classes"] == old
    report = json.loads((run / "data_report.json").read_text())
    assert report["class_counts"] == {NFD["Crème"]: 10, NFD["Crisps"]: 6, NFD["Tea"]: 8}


def test_a_resume_refused_for_other_classes_names_the_difference_and_the_code_points(fmnist_dir, tmp_path,
                                                                                    monkeypatch):
    data = _mac_copy(fmnist_dir, tmp_path / "data", {"Crème": 6, "Crisps": 6, "Tea": 6})
    run = tmp_path / "run"
    _steer(monkeypatch, [0.2, 0.3])

    def stop(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(fmnist_dir, data=str(data), epochs=2, batch_size=8, limit_per_class=None), run,
                on_epoch_end=stop).fit()
    _as_an_older_trainer_wrote_it(run)
    _mac_copy(fmnist_dir, data, {"Scone": 6}, ("Sandal",))        # a new product arrives
    with pytest.raises(DatasetError) as refused:
        Trainer(TrainConfig.load(run / "config.json"), run).fit()
    assert "new in the data: ['Scone']; of the run, not in the data: []" in str(refused.value)
    assert r"'Cre\u0300me' are not in Unicode NFC" in str(refused.value)
    assert _state(run / "last.pt")["epoch"] == 1                            # nothing trained
