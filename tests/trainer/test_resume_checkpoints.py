"""Checkpoints a run resumes from: random states (CPU and, faked here, CUDA), the loss scaler, damaged files and
failed writes.

There is no GPU on this project's CI machines. The CUDA tests replace torch.cuda's random-state functions with a
fake GPU pair whose states are plain byte tensors (a real GPU's Philox state is one too), and point the trainer at
"cuda" without running anything on it: they check what the checkpoint stores and what a resume hands back to
torch.cuda, not a GPU's own generator.
"""

from __future__ import annotations

import errno
import logging
import os
import re

import pytest
import torch
from torch import nn
from trainer_support import flip_bytes_in_largest_record, trace_fsync_and_replace

from trainer.config import TrainConfig
from trainer.engine import RunState, Trainer, make_schedule, resume_scaler


def _cfg(fmnist_dir, **kw) -> TrainConfig:
    base = dict(data=str(fmnist_dir / "train"), arch="mobilenet_v2", weights="none", image_size=32, resize_shorter=32,
                epochs=2, batch_size=16, limit_per_class=6, val_fraction=0.25, workers=0, seed=3, device="cpu",
                max_steps_per_epoch=2)
    base.update(kw)
    return TrainConfig(**base)


class FakeGPUs:
    """torch.cuda's random-state functions for two GPUs that are not there."""

    def __init__(self) -> None:
        self.states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
        self.restored: list[torch.Tensor] | None = None

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.states))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self._set)

    def _set(self, states) -> None:
        self.restored = [s.clone() for s in states]


def _checkpoint_on(trainer: Trainer, name: str = "last.pt") -> dict:
    """A checkpoint written by ``trainer`` for a small model, read back as a resume reads it."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer.classes = ["a", "b"]
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer._checkpoint(name, model, optimizer, make_schedule(optimizer, trainer.cfg, 1),
                        torch.amp.GradScaler("cpu", enabled=False), RunState(epoch=1), torch.Generator())
    return torch.load(trainer.run_dir / name, map_location="cpu", weights_only=True)


def test_a_checkpoint_on_cuda_holds_every_gpus_random_state_and_a_resume_restores_it(tmp_path, monkeypatch):
    """Dropout on a GPU draws from the GPU's generator: with only the CPU state saved, a resumed GPU run drew other
    dropout masks than an uninterrupted one."""
    gpus = FakeGPUs()
    gpus.install(monkeypatch)
    trainer = Trainer(TrainConfig(data="x", device="cpu"), tmp_path / "run")
    trainer.device = torch.device("cuda", 0)            # what the faked torch.cuda stands in for
    ckpt = _checkpoint_on(trainer)
    assert len(ckpt["cuda_rng"]) == 1                   # one process: its states of both GPUs
    saved = [s.clone() for s in gpus.states]
    assert all(torch.equal(a, b) for a, b in zip(ckpt["cuda_rng"][0], saved, strict=True))
    cpu_state = ckpt["torch_rng"].clone()
    gpus.states = [torch.zeros(16, dtype=torch.uint8)] * 2     # the run goes on drawing, then is cut
    torch.manual_seed(99)
    trainer._restore_rng(ckpt, tmp_path / "run" / "last.pt")
    assert gpus.restored is not None and all(torch.equal(a, b) for a, b in zip(gpus.restored, saved, strict=True))
    assert torch.equal(torch.get_rng_state(), cpu_state)


def test_a_checkpoint_on_cpu_holds_no_cuda_state_and_a_gpu_checkpoint_resumes_on_a_cpu_host(tmp_path, monkeypatch):
    trainer = Trainer(TrainConfig(data="x", device="cpu"), tmp_path / "run")
    ckpt = _checkpoint_on(trainer)
    assert "cuda_rng" not in ckpt

    def no_gpu(*args):
        raise AssertionError("torch.cuda touched on a host without CUDA")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_gpu)
    gpu_ckpt = dict(ckpt, cuda_rng=[[torch.arange(16, dtype=torch.uint8)]])     # as a GPU run writes it
    torch.manual_seed(99)
    trainer._restore_rng(gpu_ckpt, tmp_path / "run" / "last.pt")
    assert torch.equal(torch.get_rng_state(), ckpt["torch_rng"])


def test_an_older_checkpoint_without_cuda_states_resumes_on_cuda_with_a_warning(tmp_path, monkeypatch, caplog):
    gpus = FakeGPUs()
    gpus.install(monkeypatch)
    trainer = Trainer(TrainConfig(data="x", device="cpu"), tmp_path / "run")
    ckpt = _checkpoint_on(trainer)                      # written on CPU: the layout of a checkpoint before 2026-12-07
    trainer.device = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="trainer.engine"):
        trainer._restore_rng(ckpt, tmp_path / "run" / "last.pt")
    assert gpus.restored is None and "holds no CUDA random state" in caplog.text
    assert torch.equal(torch.get_rng_state(), ckpt["torch_rng"])
    caplog.clear()
    fewer = dict(ckpt, cuda_rng=[[torch.arange(16, dtype=torch.uint8)] * 3])     # written on a 3-GPU machine
    with caplog.at_level(logging.WARNING, logger="trainer.engine"):
        trainer._restore_rng(fewer, tmp_path / "run" / "last.pt")
    assert len(gpus.restored) == 2 and "with 3 GPU(s), resumed on one with 2" in caplog.text


def test_a_gpu_runs_checkpoint_resumes_exactly_on_a_cpu_host(fmnist_dir, tmp_path):
    """A real run cut after epoch 1, its last.pt carrying CUDA states as a GPU run's does, resumed here on CPU: it
    ends with the weights of the uninterrupted run."""
    Trainer(_cfg(fmnist_dir), tmp_path / "full").fit()

    def crash(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(fmnist_dir), tmp_path / "cut", on_epoch_end=crash).fit()
    last = tmp_path / "cut" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    torch.save(dict(ckpt, cuda_rng=[[torch.arange(16, dtype=torch.uint8)]]), last)
    assert Trainer(TrainConfig.load(tmp_path / "cut" / "config.json"), tmp_path / "cut").fit().epochs_run == 2
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(last, weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_a_checkpoint_written_without_loss_scaling_resumes_where_fp16_scaling_is_on(tmp_path):
    """A run started on CPU or on a bf16 GPU (scaler off, its state empty), resumed on a GPU without bf16 (fp16,
    scaler on): GradScaler.load_state_dict refused the empty state with a RuntimeError and the resume died. CPU
    GradScalers stand in for the GPU's here (the same class; no GPU on CI)."""
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    resume_scaler(scaler, saved, tmp_path / "last.pt")
    assert scaler.get_scale() == 1024.0                 # starts afresh, as a new run
    on = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    resume_scaler(scaler, on, tmp_path / "last.pt")
    assert scaler.get_scale() == 8.0                    # a saved scale is taken
    off = torch.amp.GradScaler("cpu", enabled=False)
    resume_scaler(off, on, tmp_path / "last.pt")        # an fp16 run resumed on CPU: nothing to load
    assert not off.is_enabled()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a truncated copy", b"not a checkpoint at all"])
def test_a_damaged_last_pt_stops_the_resume_naming_the_file(tmp_path, caplog, content):
    """A truncated or damaged last.pt (a copy cut short, a disk error): a traceback from torch's zip reader that
    did not say which file; now the CLI's one-line error (exit 2) names it, and the file is left as it was."""
    from trainer.cli import main

    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(data=str(tmp_path / "data"), device="cpu", workers=0).save(run / "config.json")
    (run / "last.pt").write_bytes(content)
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--resume", str(run)]) == 2
    assert f"{run / 'last.pt'}: cannot be read as a checkpoint" in caplog.text
    assert (run / "last.pt").read_bytes() == content


def test_a_checkpoint_that_is_not_the_trainers_stops_the_resume_naming_what_it_lacks(tmp_path):
    from trainer.engine import read_resume_checkpoint

    torch.save({"model": {}}, tmp_path / "last.pt")         # a bare state dict's file, put there by hand
    with pytest.raises(ValueError, match=r"last.pt: not a training checkpoint to resume from \(no optimizer, "):
        read_resume_checkpoint(tmp_path / "last.pt")


def test_a_checkpoint_write_that_fails_leaves_the_last_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    """A full disk mid-save: the partial temporary file (as large as a checkpoint: ~300 MB for ResNet50 with Adam)
    stayed in the run folder, on the disk that had no room."""
    trainer = Trainer(TrainConfig(data="x", device="cpu"), tmp_path / "run")
    _checkpoint_on(trainer)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, path):
        real_save(obj, path)                            # written in part; the disk then fills
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _checkpoint_on(trainer)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last.pt"]
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_checkpoint_is_synced_to_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch, name):
    """A power cut after an unsynced rename can leave an empty last.pt (the rename reached the disk, the data did
    not), and the run cannot resume. A power cut cannot be simulated here: the test checks the calls, os.fsync of
    the complete temporary file before os.replace, then os.fsync of the run folder after it."""
    events = trace_fsync_and_replace(monkeypatch)
    run = tmp_path / "run"
    trainer = Trainer(TrainConfig(data="x", device="cpu"), run)
    _checkpoint_on(trainer, name)
    tmp, final = str(run / f".{name}.tmp"), str(run / name)
    size = (run / name).stat().st_size
    assert events == [("fsync", tmp, size), ("replace", tmp, final), ("fsync", str(run), None)]


def test_a_best_pt_whose_bytes_were_damaged_is_refused_by_export_naming_the_file_and_record(fmnist_dir, tmp_path,
                                                                                          caplog):
    """load_checkpoint_model (export, evaluate, retrain's --finetune-from-current) read best.pt with torch.load,
    which does not check the CRC-32 the file holds for each record: a best.pt with flipped bytes in a weight loaded
    without a word and was exported as a damaged model."""
    from trainer.cli import main
    from trainer.engine import load_checkpoint_model

    run = tmp_path / "run"
    Trainer(_cfg(fmnist_dir, epochs=1), run).fit()
    best = run / "best.pt"
    load_checkpoint_model(best)                                     # intact: it loads
    record = flip_bytes_in_largest_record(best)
    torch.load(best, map_location="cpu", weights_only=True)         # damaged: torch reads it all the same
    damaged = best.read_bytes()
    with pytest.raises(ValueError, match=re.escape(f"{best}: damaged: the bytes of its record {record} do not match "
                                                   "their checksum")):
        load_checkpoint_model(best)
    models = tmp_path / "models"
    with caplog.at_level(logging.ERROR):
        assert main(["export", str(best), "--models-dir", str(models), "--tensorrt", "off"]) == 2
    assert f"{best}: damaged: the bytes of its record {record}" in caplog.text
    assert best.read_bytes() == damaged                             # left as it was
    assert not models.exists() or not any(models.rglob("manifest.json"))   # no bundle of the damaged model
