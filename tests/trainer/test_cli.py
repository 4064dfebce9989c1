"""The trainer's CLI end to end, as the README runs it: train, evaluate, export, verify, keygen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def trainer(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_train_export_verify_evaluate_through_the_cli(fmnist_dir, tmp_path):
    done = trainer("train", "--data", fmnist_dir / "train", "--name", "cli", "--arch", "mobilenet_v2",
                   "--image-size", 32, "--resize-shorter", 32, "--epochs", 2, "--batch-size", 32,
                   "--limit-per-class", 50, "--workers", 0, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "best val accuracy" in done.stdout and (tmp_path / "runs" / "cli" / "best.pt").is_file()

    again = trainer("train", "--data", fmnist_dir / "train", "--name", "cli", cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently overwrites a run
    # resumed as docs/training.md writes it, without --data (the run's config names it): nothing left to train
    resumed = trainer("train", "--resume", "runs/cli", cwd=tmp_path)
    assert resumed.returncode == 0 and "best val accuracy" in resumed.stdout, resumed.stderr[-2000:]
    for args, reason in ((["--name", "x"], "--data: required"), (["--resume", "runs/nope"], "no run there")):
        refused = trainer("train", *args, cwd=tmp_path)
        assert refused.returncode == 2 and reason in refused.stderr, refused.stderr[-2000:]

    trainer("keygen", "--private", "keys/k.key", "--public", "keys/k.pub", cwd=tmp_path)
    done = trainer("export", "runs/cli/best.pt", "--version", "v1", "--calibration-images", 64,
                   "--station-val-images", 40, "--sign-key", "keys/k.key", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FP32 val top-1" in done.stdout and "INT8 val top-1" in done.stdout and "station views" in done.stdout
    bundle = tmp_path / "models" / "cli" / "v1"
    # trained on station views (the CLI default): the station must feed it its item crop, and export judged
    # both models on validation images as the station's localizer crops them from a camera's view
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input"]["crop"] == {"mode": "foreground", "margin": 0.0, "min_size": 16}
    station = manifest["quality"]["station_view"]
    assert station["images"] == station["item_found"] == 40 and 0.0 <= station["int8_val_accuracy"] <= 1.0
    int8 = manifest["quality"]["int8"]
    open_set = manifest["open_set"]["calibration"]      # the gate covers the embedding too (docs/open-set.md)
    assert open_set["int8_passed"] == (open_set["int8_embedding_cosine_median"] >= 0.98)
    assert int8["passed"] == (station["int8_passed"] and int8["delta_top1_points"] >= -1.0 - 1e-9
                              and open_set["int8_passed"])

    done = trainer("verify", bundle, "--public-key", "keys/k.pub", cwd=tmp_path)
    assert done.returncode == 0 and "signature valid" in done.stdout

    done = trainer("evaluate", bundle / "model.int8.onnx", "--data", fmnist_dir / "test", "--out", "eval-int8",
                   "--limit-per-class", 10, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval-int8" / "metrics.json").read_text())
    assert metrics["images"] == 100 and metrics["accuracy"] > 0.2

    (bundle / "model.int8.onnx").write_bytes(b"tampered")
    done = trainer("verify", bundle, cwd=tmp_path)
    assert done.returncode == 1 and "model.int8.onnx" in done.stderr


def test_cli_errors_name_the_problem(tmp_path):
    done = trainer("train", "--data", tmp_path / "missing", cwd=tmp_path)
    assert done.returncode == 2 and f"{tmp_path / 'missing'}: dataset path does not exist" in done.stderr
    done = trainer("verify", tmp_path / "nobundle", cwd=tmp_path)
    assert done.returncode == 1 and "bundle folder does not exist" in done.stderr


def test_train_resume_warns_about_the_flags_its_run_config_overrides(fmnist_dir, tmp_path, caplog):
    """`train --resume runs/x --epochs 3 --lr 0.01` (to extend a finished run) trained nothing more and said
    nothing: the run's config.json decides, and the other flags were dropped without a word."""
    from trainer.cli import main

    common = ["--out-dir", str(tmp_path / "runs"), "--arch", "mobilenet_v2", "--weights", "none", "--image-size", "32",
              "--resize-shorter", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0",
              "--station-view", "off", "--limit-per-class", "4"]
    assert main(["train", "--data", str(fmnist_dir / "train"), "--name", "ext", *common]) == 0
    run = tmp_path / "runs" / "ext"
    caplog.clear()
    assert main(["train", "--resume", str(run), "--epochs", "3", "--lr", "0.01", "--no-amp"]) == 0
    assert (f"--resume {run} continues with the run's own settings ({run / 'config.json'}); ignoring --epochs 3, "
            f"--lr 0.01, --no-amp") in caplog.text
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    caplog.clear()
    assert main(["train", "--resume", str(run)]) == 0 and "ignoring" not in caplog.text


def test_a_new_run_refuses_a_folder_holding_a_trained_model_without_last_pt(tmp_path, caplog):
    """best.pt kept (last.pt removed to save space): a new run of the same name would replace that model."""
    from trainer.cli import main

    run = tmp_path / "runs" / "kept"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"a trained model")
    assert main(["train", "--data", str(tmp_path), "--out-dir", str(tmp_path / "runs"), "--name", "kept"]) == 2
    assert f"{run} holds best.pt of an earlier run (without last.pt, it cannot be resumed)" in caplog.text
    assert sorted(p.name for p in run.iterdir()) == ["best.pt"]
