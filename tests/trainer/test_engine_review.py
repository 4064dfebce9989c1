"""The training loop's resume path and its failures: a resume with settings other than the run's, a checkpoint with
damaged bytes, the runtime flags a resume takes from its command line, and a run whose loss stops being finite.
Real runs of a small MobileNetV2 on real Fashion-MNIST images, on CPU."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest
import torch
from trainer_support import flip_bytes_in_largest_record

from trainer.config import TrainConfig
from trainer.engine import Trainer, read_resume_checkpoint


def _cfg(fmnist_dir, **kw) -> TrainConfig:
    base = dict(data=str(fmnist_dir / "train"), arch="mobilenet_v2", weights="none", image_size=32, resize_shorter=32,
                epochs=3, batch_size=16, limit_per_class=6, val_fraction=0.25, workers=0, seed=3, device="cpu",
                max_steps_per_epoch=2)
    base.update(kw)
    return TrainConfig(**base)


def _cut_after_epoch_1(cfg: TrainConfig, run_dir) -> None:
    def crash(epoch, row):
        raise KeyboardInterrupt     # a power cut or preemption right after the epoch-1 checkpoint

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run_dir, on_epoch_end=crash).fit()


CHANGES = [
    (dict(epochs=6), "epochs 3 -> 6"),                          # the cosine schedule bent mid-run
    (dict(lr=0.1), "lr 0.001 -> 0.1"),                          # not used, yet recorded in the checkpoint
    (dict(batch_size=8), "batch_size 16 -> 8"),
    (dict(arch="resnet18"), 'arch "mobilenet_v2" -> "resnet18"'),    # a state-dict traceback
    (dict(optimizer="sgd"), 'optimizer "adam" -> "sgd"'),       # KeyError: 'momentum'
    (dict(lr=0.1, label_smoothing=0.1), "label_smoothing 0.0 -> 0.1; lr 0.001 -> 0.1"),
]


def test_a_resume_with_other_settings_than_the_runs_is_refused_naming_them(fmnist_dir, tmp_path):
    """A run cut after epoch 1 and resumed with a config that is not the one it trained with (config.json edited,
    or a Trainer handed another config): it trained on silently or died on a traceback. Now nothing is trained or
    written and the error names last.pt and the changed settings."""
    cfg, run = _cfg(fmnist_dir), tmp_path / "run"
    _cut_after_epoch_1(cfg, run)
    last_before, config_before = (run / "last.pt").read_bytes(), (run / "config.json").read_text()
    for change, named in CHANGES:
        with pytest.raises(ValueError, match=re.escape(f"{run / 'last.pt'}: the run was trained with other settings "
                                                       f"than its config now gives ({named})")):
            Trainer(dataclasses.replace(cfg, **change), run).fit()
        assert (run / "last.pt").read_bytes() == last_before and (run / "config.json").read_text() == config_before
    # where and how fast it runs may change; the run then goes on to its end
    assert Trainer(dataclasses.replace(cfg, cache_images=False), run).fit().epochs_run == 3


def test_an_edited_config_json_stops_the_cli_resume_in_one_line(fmnist_dir, tmp_path, caplog):
    from trainer.cli import main

    cfg, run = _cfg(fmnist_dir), tmp_path / "run"
    _cut_after_epoch_1(cfg, run)
    edited = json.loads((run / "config.json").read_text())
    edited["epochs"] = 10                                       # to extend the run
    (run / "config.json").write_text(json.dumps(edited))
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--resume", str(run)]) == 2
    assert f"{run / 'last.pt'}: the run was trained with other settings than its config now gives (epochs 3 -> 10)" \
        in caplog.text and "--weights" in caplog.text
    assert torch.load(run / "last.pt", weights_only=True)["state"]["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_checkpoint_whose_bytes_were_damaged_stops_the_resume_naming_the_file_and_record(fmnist_dir, tmp_path,
                                                                                          caplog):
    """torch.load does not check the CRC-32 the file holds for each record: a last.pt with flipped bytes in a
    tensor loaded without a word, and the resumed run trained on from the damaged weights."""
    from trainer.cli import main

    run = tmp_path / "run"
    _cut_after_epoch_1(_cfg(fmnist_dir), run)
    torch.load(run / "last.pt", weights_only=True)              # intact: it reads
    record = flip_bytes_in_largest_record(run / "last.pt")
    torch.load(run / "last.pt", weights_only=True)              # damaged: torch reads it all the same
    damaged = (run / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=re.escape(f"{run / 'last.pt'}: damaged: the bytes of its record {record} "
                                                   "do not match their checksum")):
        read_resume_checkpoint(run / "last.pt")
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--resume", str(run)]) == 2
    assert f"{run / 'last.pt'}: damaged" in caplog.text
    assert (run / "last.pt").read_bytes() == damaged
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_resume_takes_device_workers_and_cache_flags_from_its_command_line(fmnist_dir, tmp_path, caplog):
    """A run started with --device cuda:N, resumed on a machine without that GPU: the error said to use
    --device cpu, and --device cpu given with --resume was ignored ("ignoring --device cpu"), so the run could not
    be resumed there."""
    from trainer.cli import main

    cfg, run = _cfg(fmnist_dir), tmp_path / "run"
    _cut_after_epoch_1(cfg, run)
    written = json.loads((run / "config.json").read_text())
    written["device"] = "cuda:99"                               # as a machine with that GPU wrote it
    (run / "config.json").write_text(json.dumps(written))
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--resume", str(run)]) == 2
    assert "--device cuda:99" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["train", "--resume", str(run), "--workers", "-1"]) == 2
    assert "--workers: workers: expected a whole number >= 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["train", "--resume", str(run), "--device", "cpu", "--no-cache-images", "--lr", "0.5"]) == 0
    assert "ignoring --lr 0.5. To train" in caplog.text          # not --device, not --no-cache-images
    saved = json.loads((run / "config.json").read_text())
    assert (saved["device"], saved["cache_images"], saved["lr"]) == ("cpu", False, cfg.lr)
    assert torch.load(run / "last.pt", weights_only=True)["state"]["epoch"] == 3


def test_a_run_that_diverges_after_its_first_epoch_says_what_is_saved_and_asks_for_a_new_run(fmnist_dir, tmp_path):
    """The loss turned NaN in a later epoch (the step schedule multiplies the rate by 1e6 each epoch): the error
    said "lower --lr" although a --resume ignores --lr and diverges again, and "best.pt keeps the last finite
    epoch", which is not what best.pt holds."""
    cfg = _cfg(fmnist_dir, epochs=4, optimizer="sgd", lr=1e-3, weight_decay=10.0, schedule="step", step_size=1,
               gamma=1e6)
    run = tmp_path / "run"
    with pytest.raises(ValueError) as raised:
        Trainer(cfg, run).fit()
    found = re.search(r"epoch (\d): the loss is not finite .*: the weights diverged and the epoch is not saved; "
                      r"last\.pt holds epoch (\d), best\.pt epoch (\d) \(val accuracy [0-9.]+\); --resume would "
                      r"diverge again with the run's own settings, so start a new run \(another --name\) with a lower "
                      r"--lr \(now 0\.001\)", str(raised.value))
    assert found, str(raised.value)
    diverged, last_epoch, best_epoch = map(int, found.groups())
    state = torch.load(run / "last.pt", weights_only=True)["state"]
    assert last_epoch == diverged - 1 == state["epoch"] and best_epoch == state["best_epoch"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == diverged - 1
    for name in ("last.pt", "best.pt"):
        weights = torch.load(run / name, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), name


def test_a_run_that_diverges_in_its_first_epoch_says_nothing_was_saved(fmnist_dir, tmp_path):
    with pytest.raises(ValueError, match=r"epoch 1: the loss is not finite .*no epoch finished, no checkpoint was "
                                         r"written; run again with a lower --lr \(now 10\)"):
        Trainer(_cfg(fmnist_dir, optimizer="sgd", lr=10.0, weight_decay=10.0), tmp_path / "run").fit()
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()
