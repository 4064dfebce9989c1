"""Training runs: what a run folder holds, resume after interruption, early stopping, ResNet50 on CPU."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from trainer.config import TrainConfig
from trainer.engine import Trainer, make_schedule


def _cfg(fmnist_dir, **kw) -> TrainConfig:
    base = dict(data=str(fmnist_dir / "train"), arch="mobilenet_v2", weights="none", image_size=32, resize_shorter=32,
                epochs=2, batch_size=32, limit_per_class=12, val_fraction=0.25, workers=0, seed=3,
                max_steps_per_epoch=None)
    base.update(kw)
    return TrainConfig(**base)


def test_run_folder_holds_config_split_metrics_curves_and_checkpoints(trained_run):
    for name in ("config.json", "split.json", "metrics.jsonl", "curves.png", "best.pt", "last.pt", "data_report.json"):
        assert (trained_run / name).is_file(), name
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["train_images_per_s"] > 0 for r in rows)
    cfg = TrainConfig.load(trained_run / "config.json")
    assert cfg.arch == "mobilenet_v2" and cfg.epochs == 2
    ckpt = torch.load(trained_run / "last.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 2 and len(ckpt["classes"]) == 10
    # a real fine-tune of ImageNet weights on 800 real images learns something in 2 epochs
    assert max(r["val_accuracy"] for r in rows) > 0.5


def test_resume_after_interruption_continues_exactly(fmnist_dir, tmp_path):
    """An interrupted run resumed from last.pt ends with the same weights as an uninterrupted one."""
    full = Trainer(_cfg(fmnist_dir), tmp_path / "full")
    full.fit()

    def crash(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt  # power cut / preemption right after the epoch-1 checkpoint

    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(fmnist_dir), tmp_path / "cut", on_epoch_end=crash).fit()
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["state"]["epoch"] == 1
    resumed = Trainer(TrainConfig.load(tmp_path / "cut" / "config.json"), tmp_path / "cut").fit()
    assert resumed.epochs_run == 2
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


def test_early_stopping_stops_when_val_stops_improving(fmnist_dir, tmp_path):
    # lr 0 cannot improve after the first epoch: patience 1 must stop after epoch 2 of 5
    result = Trainer(_cfg(fmnist_dir, epochs=5, lr=0.0, patience=1), tmp_path / "es").fit()
    assert result.stopped_early and result.epochs_run == 2 and result.best_epoch == 1
    # resumed, a run that stopped early trains no further epoch (it trained a third before)
    again = Trainer(TrainConfig.load(tmp_path / "es" / "config.json"), tmp_path / "es").fit()
    assert again.stopped_early and again.epochs_run == 2
    assert len((tmp_path / "es" / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_loss_that_is_not_finite_stops_the_run_naming_it(fmnist_dir, tmp_path):
    """A diverged run trained on for every remaining epoch and kept NaN weights as best.pt (its NaN logits'
    argmax still "beat" the starting metric)."""
    with pytest.raises(ValueError, match=r"epoch \d: the loss is not finite"):
        Trainer(_cfg(fmnist_dir, epochs=4, optimizer="sgd", lr=10.0, weight_decay=10.0), tmp_path / "nan").fit()
    best = tmp_path / "nan" / "best.pt"
    assert not best.exists() or all(torch.isfinite(v).all() for v in torch.load(best, weights_only=True)["model"].values()
                                    if v.is_floating_point())


def test_a_fractional_warmup_never_lifts_the_rate_past_lr():
    cfg = TrainConfig(data="x", epochs=5, lr=1.0, warmup_epochs=0.1, schedule="cosine")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_schedule(opt, cfg, steps_per_epoch=3)          # warmup 0.3 steps: it used to start at 3.3 x lr
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) <= 1.0 and lrs[0] == 1.0


def test_resnet50_trains_on_cpu_with_tiny_images(fmnist_dir, tmp_path):
    cfg = _cfg(fmnist_dir, arch="resnet50", epochs=1, limit_per_class=6, freeze_epochs=0, optimizer="adamw",
               label_smoothing=0.1, warmup_epochs=0.5)
    initial = Trainer(cfg, tmp_path / "unused")
    torch.manual_seed(cfg.seed)
    from trainer.model import build_model

    start = build_model("resnet50", 10, "none").state_dict()["layer1.0.conv1.weight"]
    result = Trainer(cfg, tmp_path / "r50").fit()
    ckpt = torch.load(tmp_path / "r50" / "last.pt", weights_only=True)
    assert ckpt["config"]["arch"] == "resnet50" and ckpt["model"]["fc.weight"].shape == (10, 2048)
    assert result.epochs_run == 1 and initial.device.type == "cpu"
    assert (ckpt["model"]["layer1.0.conv1.weight"] - start).abs().max() > 0  # the backbone was trained
    assert torch.isfinite(ckpt["model"]["fc.weight"]).all()


def test_linear_probe_then_fine_tune_changes_backbone_only_after_freeze(fmnist_dir, tmp_path):
    seen = {}

    def snapshot(epoch, row):
        ckpt = torch.load(tmp_path / "lp" / "last.pt", weights_only=True)
        seen[epoch] = (ckpt["model"]["features.0.0.weight"].clone(), ckpt["model"]["classifier.1.weight"].clone(), row)

    Trainer(_cfg(fmnist_dir, weights="imagenet", freeze_epochs=1), tmp_path / "lp", on_epoch_end=snapshot).fit()
    from trainer.model import imagenet_state_dict

    pretrained = imagenet_state_dict("mobilenet_v2")["features.0.0.weight"]
    torch.testing.assert_close(seen[1][0], pretrained, rtol=0, atol=0)  # frozen in epoch 1
    assert (seen[2][0] - pretrained).abs().max() > 0  # trained in epoch 2
    assert seen[1][2]["frozen_backbone"] and not seen[2][2]["frozen_backbone"]


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_schedules_with_warmup(schedule):
    cfg = TrainConfig(data="x", epochs=4, lr=1.0, warmup_epochs=1, schedule=schedule, step_size=2, gamma=0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_schedule(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup over epoch 1
    if schedule == "cosine":
        assert lrs[10] == pytest.approx(1.0) and lrs[39] < 0.01 and lrs[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    elif schedule == "step":
        assert lrs[15] == 1.0 and lrs[25] == 0.5
    else:
        assert lrs[39] == 1.0


def test_config_rejects_unknown_values_and_fields(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(data="x", optimizer="lion")
    (tmp_path / "config.json").write_text(json.dumps({"data": "x", "bogus": 1}))
    with pytest.raises(ValueError, match=r"config.json: unknown fields \['bogus'\]"):
        TrainConfig.load(tmp_path / "config.json")


def test_station_frames_are_repeated_in_training_and_the_setting_is_checked(fmnist_dir):
    from trainer import data as data_mod
    from trainer.cli import get_args_parser, train_config_from_args
    from trainer.engine import station_frames_repeated

    base = [data_mod.Sample(fmnist_dir / f"{i}.png", i % 3) for i in range(6)]
    frames = [data_mod.Sample(fmnist_dir / f"f{i}.png", 1, as_seen=True) for i in range(2)]
    out = station_frames_repeated(base + frames, 4)
    assert out[:8] == base + frames and len(out) == 6 + 2 * 4
    assert sorted(str(s.path) for s in out if s.as_seen) == sorted([str(f.path) for f in frames] * 4)
    assert station_frames_repeated(base + frames, 1) == base + frames
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match=r"station_frame_repeat: expected a whole number >= 1"):
            TrainConfig(data="x", station_frame_repeat=bad)
    args = get_args_parser().parse_args(["train", "--data", "x", "--station-frame-repeat", "5"])
    assert train_config_from_args(args).station_frame_repeat == 5


@pytest.mark.parametrize("cache_images", [True, False])
def test_each_row_of_a_batch_carries_its_samples_as_seen_flag(fmnist_dir, cache_images):
    """From memory and streamed from disk alike: the flag is what routes a station's frame past station views."""
    from trainer import data as data_mod
    from trainer.augment import eval_spec
    from trainer.engine import TrainBatches

    samples = data_mod.load_dataset(fmnist_dir / "train", check_images=False).samples[::50]
    marked = [dataclasses.replace(s, as_seen=s.label == 1) for s in samples]
    batches = TrainBatches(marked, eval_spec(32, 32), _cfg(fmnist_dir, batch_size=16, cache_images=cache_images),
                           torch.Generator().manual_seed(0))
    rows = [(y, seen) for _ in range(3) for _, y, seen in batches]
    assert all(torch.equal(seen, y == 1) for y, seen in rows) and any(bool(seen.any()) for _, seen in rows)


@pytest.mark.parametrize("cache_images", [True, False])
def test_balance_classes_draws_every_class_equally_often(fmnist_dir, cache_images):
    """A training set skewed 10:1 towards a few classes (as reviewed low-confidence frames are)."""
    from trainer import data as data_mod
    from trainer.augment import eval_spec
    from trainer.engine import TrainBatches

    dataset = data_mod.load_dataset(fmnist_dir / "train", check_images=False)
    per_class: dict[int, list] = {}
    for s in dataset.samples:
        per_class.setdefault(s.label, []).append(s)
    skewed = [s for c, items in per_class.items() for s in items[: 40 if c < 3 else 4]]   # 120 + 28 images

    def class_counts(balance: bool) -> torch.Tensor:
        cfg = _cfg(fmnist_dir, balance_classes=balance, batch_size=37, cache_images=cache_images)
        batches = TrainBatches(skewed, eval_spec(32, 32), cfg, torch.Generator().manual_seed(0))
        labels = torch.cat([y for _ in range(20) for _, y, _ in batches])
        return torch.bincount(labels, minlength=10).float() / len(labels)

    plain, balanced = class_counts(False), class_counts(True)
    assert plain[:3].sum() == pytest.approx(120 / 148, abs=0.02)        # drawn as stored: 81% from 3 classes
    assert balanced.min() > 0.08 and balanced.max() < 0.12               # every class ~10%


def test_a_fit_leaves_the_process_with_ieee_floats(trained_run):
    """The fit flushes denormals for speed (process-wide CPU state); after it, subnormal numbers exist again
    for whatever runs next in the process (an export, an evaluation, property tests drawing floats)."""
    smallest = math.ulp(0.0)          # 5e-324, a subnormal: compares as zero while denormals are flushed
    assert smallest > 0.0 and smallest * 2 > smallest


def _small_folders(fmnist_dir, root, classes=("Bag", "Coat", "Dress"), per_class=12):
    """A few real images of a few classes, as class folders of their own (a --data that can change mid-run)."""
    import shutil

    for name in classes:
        (root / name).mkdir(parents=True)
        for path in sorted((fmnist_dir / "train" / name).glob("*.png"))[:per_class]:
            shutil.copy(path, root / name / path.name)
    return root


def _cut_after_epoch_1(cfg, run_dir) -> None:
    def crash(epoch, row):
        raise KeyboardInterrupt      # preemption right after the epoch-1 checkpoint

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run_dir, on_epoch_end=crash).fit()


def test_a_new_run_clears_what_an_attempt_without_a_checkpoint_left(fmnist_dir, tmp_path):
    """A first attempt that failed before its first checkpoint (a --weights path that did not load) left its
    split.json; the corrected run, with another seed and val_fraction, silently trained on that old split."""
    from trainer.model import WeightsError

    run = tmp_path / "run"
    with pytest.raises(WeightsError):
        Trainer(_cfg(fmnist_dir, weights=str(tmp_path / "missing.pt"), val_fraction=0.5, seed=1), run).fit()
    assert json.loads((run / "split.json").read_text())["seed"] == 1
    (run / "metrics.jsonl").write_text('{"epoch": 1, "stale": true}\n')       # an old run's, its last.pt removed
    Trainer(_cfg(fmnist_dir, epochs=1, max_steps_per_epoch=1), run).fit()
    split = json.loads((run / "split.json").read_text())
    assert split["seed"] == 3 and len(split["val"]) == 30                     # 12 of each class, a quarter held out
    assert split["drawn_for"] == {"data": str(fmnist_dir / "train"), "seed": 3, "val_fraction": 0.25,
                                  "limit_per_class": 12}
    assert [json.loads(line).get("stale") for line in (run / "metrics.jsonl").read_text().splitlines()] == [None]


def test_a_split_placed_in_the_run_folder_before_the_first_fit_is_used_as_it_is(fmnist_dir, tmp_path):
    """A caller (benchmarks/active_learning.py) may save the split of a new run itself (save_split without the
    trainer's drawn_for): the new run keeps it."""
    from trainer import data as data_mod

    data = _small_folders(fmnist_dir, tmp_path / "data", per_class=6)
    dataset = data_mod.load_dataset(data)
    run = tmp_path / "run"
    run.mkdir()
    data_mod.save_split(run / "split.json", dataset, list(range(4, 18)), [0, 1, 2, 3], seed=3)
    Trainer(_cfg(fmnist_dir, data=str(data), limit_per_class=None, epochs=1, batch_size=8), run).fit()
    report = json.loads((run / "data_report.json").read_text())
    assert (report["train_images"], report["val_images"]) == (14, 4)
    assert "drawn_for" not in json.loads((run / "split.json").read_text())


def test_a_resume_refuses_changed_classes_and_a_config_its_split_was_not_drawn_for(fmnist_dir, tmp_path):
    """A class folder added to --data (or a display name changed in labels.json, which reorders the classes)
    mid-run: the resume failed with a size-mismatch traceback, or trained on with every label swapped."""
    from trainer.data import DatasetError

    data = _small_folders(fmnist_dir, tmp_path / "data")
    cfg = _cfg(fmnist_dir, data=str(data), epochs=2, batch_size=8, limit_per_class=None, max_steps_per_epoch=1)
    _cut_after_epoch_1(cfg, tmp_path / "run")
    _small_folders(fmnist_dir, data, classes=("Sandal",))                      # a new product arrives
    with pytest.raises(DatasetError, match=r"the classes \['Bag', 'Coat', 'Dress', 'Sandal'\] differ from the "
                                           r"classes \['Bag', 'Coat', 'Dress'\] of the run being resumed"):
        Trainer(TrainConfig.load(tmp_path / "run" / "config.json"), tmp_path / "run").fit()
    import shutil

    shutil.rmtree(data / "Sandal")
    (data / "labels.json").write_text(json.dumps({"Bag": "Tote bag"}))        # same count, another order
    with pytest.raises(DatasetError, match=r"\['Coat', 'Dress', 'Tote bag'\] differ from the classes \['Bag'"):
        Trainer(TrainConfig.load(tmp_path / "run" / "config.json"), tmp_path / "run").fit()
    (data / "labels.json").unlink()
    with pytest.raises(DatasetError, match=r"split.json: drawn for seed 3, but the config of the run being "
                                           r"resumed says 4"):
        Trainer(dataclasses.replace(cfg, seed=4), tmp_path / "run").fit()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state"]["epoch"] == 1     # nothing trained
    assert Trainer(TrainConfig.load(tmp_path / "run" / "config.json"), tmp_path / "run").fit().epochs_run == 2


def test_a_resume_with_limit_per_class_reads_its_split_from_a_folder_that_has_grown(fmnist_dir, tmp_path):
    """--limit-per-class drew its subset again from the folder as it was at the resume: with new images in it,
    the draw missed images of the saved split and the resume stopped saying one 'is no longer' there."""
    import shutil

    data = _small_folders(fmnist_dir, tmp_path / "data", per_class=20)
    cfg = _cfg(fmnist_dir, data=str(data), epochs=2, batch_size=8, limit_per_class=12, max_steps_per_epoch=1)
    _cut_after_epoch_1(cfg, tmp_path / "run")
    before = json.loads((tmp_path / "run" / "data_report.json").read_text())
    for path in sorted((fmnist_dir / "train" / "Bag").glob("*.png"))[20:25]:
        shutil.copy(path, data / "Bag" / path.name)                            # new photos of a product
    assert Trainer(TrainConfig.load(tmp_path / "run" / "config.json"), tmp_path / "run").fit().epochs_run == 2
    after = json.loads((tmp_path / "run" / "data_report.json").read_text())
    # the report describes the images the run trains on, as at its start
    assert {k: after[k] for k in ("class_counts", "train_images", "val_images", "fingerprint")} == \
        {k: before[k] for k in ("class_counts", "train_images", "val_images", "fingerprint")}


def test_an_empty_validation_split_is_a_dataset_error_saying_why(fmnist_dir, tmp_path):
    from trainer.data import DatasetError

    with pytest.raises(DatasetError, match=r"the validation split is empty: every class has a single image "
                                           r"\(--limit-per-class 1\)"):
        Trainer(_cfg(fmnist_dir, limit_per_class=1, batch_size=4), tmp_path / "run").fit()
    assert not (tmp_path / "run" / "split.json").exists()


def test_curves_of_a_run_without_metrics_are_skipped(tmp_path):
    from trainer.engine import plot_curves

    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")        # a finished run whose file was removed
    assert not (tmp_path / "curves.png").exists()
