"""Distributed training: two CPU processes (gloo, launched by torchrun) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import TrainConfig
from trainer.engine import Trainer


def _args(fmnist_dir: Path, out: Path, name: str, **kw) -> list[str]:
    opts = {"--data": fmnist_dir / "train", "--out-dir": out, "--name": name, "--image-size": 32,
            "--resize-shorter": 32, "--epochs": 2, "--batch-size": 16, "--limit-per-class": 8, "--val-fraction": 0.25,
            "--workers": 0, "--seed": 5, "--device": "cpu", "--lr": 1e-3}
    opts.update(kw)
    return [str(x) for kv in opts.items() for x in kv]


def _torchrun(args: list[str], extra: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trainer", "train", *args, *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _single(fmnist_dir: Path, out: Path, name: str, **kw) -> None:
    from trainer.__main__ import get_args_parser, train_config_from_args

    args = get_args_parser().parse_args(["train", *_args(fmnist_dir, out, name, **kw)])
    cfg = train_config_from_args(args)
    torch.set_num_threads(1)
    try:
        Trainer(cfg, out / name).fit()
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


def _state(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def test_two_processes_equal_one_process_for_a_linear_probe(fmnist_dir, tmp_path):
    """Frozen backbone (no BatchNorm updates, no dropout): DDP must give the single-process weights."""
    kw = {"--arch": "resnet18", "--weights": "none", "--freeze-epochs": 2}
    _single(fmnist_dir, tmp_path, "one", **kw)
    _torchrun(_args(fmnist_dir, tmp_path, "two", **kw), [])
    one, two = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert (one["fc.weight"] - build_init_fc(tmp_path)).abs().max() > 1e-3  # the head did train
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # written once, by rank 0


def build_init_fc(tmp_path: Path) -> torch.Tensor:
    """The head before training: the config's seed makes it reproducible."""
    from trainer.model import build_model

    cfg = TrainConfig.load(tmp_path / "one" / "config.json")
    torch.manual_seed(cfg.seed)
    return build_model("resnet18", 10, "none").fc.weight.detach()


def test_two_processes_fine_tune_matches_one_process_within_tolerance(fmnist_dir, tmp_path):
    """Full fine-tune: per-process BatchNorm statistics (gloo has no SyncBatchNorm) differ slightly."""
    kw = {"--arch": "mobilenet_v2", "--weights": "imagenet", "--limit-per-class": 40, "--batch-size": 32}
    _single(fmnist_dir, tmp_path, "one", **kw)
    _torchrun(_args(fmnist_dir, tmp_path, "two", **kw), [])
    m1 = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert m1[-1]["val_accuracy"] > 0.3 and m2[-1]["val_accuracy"] > 0.3  # both learned (chance is 0.1)
    assert abs(m1[-1]["val_accuracy"] - m2[-1]["val_accuracy"]) <= 0.1
    assert abs(m1[-1]["val_loss"] - m2[-1]["val_loss"]) <= 0.25


def test_batch_must_split_evenly(fmnist_dir, tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "trainer", "train", *_args(fmnist_dir, tmp_path, "odd", **{"--batch-size": 15,
                        "--weights": "none", "--epochs": 1})], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
