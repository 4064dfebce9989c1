"""Retrain and gate: the rule on its own, then on real models trained on real Fashion-MNIST images.

The current version is a real MobileNetV2 fine-tuned from ImageNet (32 px) on a few hundred
images with only three of "Trouser" (rollout_support.weak_base, shared with the end-to-end
test). Reviewed frames are real, unseen Fashion-MNIST images labelled with their ground truth.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from rollout_support import WEAK_CLASS, Recorder, class_recall, weak_base  # noqa: F401

from central.rollout import (
    RolloutError,
    manifest_sha256,
    publish_bundle,
    read_gate,
    validate_event,
)
from contract.broker import BrokerSettings
from trainer.retrain import (
    ExportSettings,
    GateDecision,
    Item,
    Paired,
    RetrainConfig,
    RetrainError,
    Score,
    gate_decision,
    item_count,
    retrain,
    reviewed_split,
    train_settings,
)

# ---------------------------------------------------------------- the reviewed frames' split

def test_the_gates_reviewed_frames_are_items_the_candidate_never_trained_on():
    # given: 10 items of 6 frames each as the labels export names them (track), and 8 frames without a track
    items = [Item(Path(f"/r/{label}-{n}-{f}.jpg"), label, "reviewed", {"track": f"{label}-{n}", "frame_id": "x"})
             for label in ("Shirt", "Bag") for n in range(5) for f in range(6)]
    items += [Item(Path(f"/r/loose-{n}.jpg"), "Shirt", "reviewed", {"frame_id": "y"}) for n in range(8)]
    train, held = reviewed_split(items, 0.3, seed=0)
    # then: all of an item's frames on one side; a frame without a track is an item of its own
    tracked = lambda part: {i.extra["track"] for i in part if "track" in i.extra}  # noqa: E731
    assert not tracked(train) & tracked(held) and len(train) + len(held) == 68
    assert item_count(items) == 18 and item_count(train) + item_count(held) == 18
    # a stratified 30% of each label's items: Bag 2 of 5 (12 frames), Shirt 4 of 13 (5 items and 8 loose frames)
    assert item_count(held) == 6 and sum(i.label == "Bag" for i in held) == 12
    assert reviewed_split(items, 0.3, seed=0) == (train, held)


# ---------------------------------------------------------------- the rule

def decide(cur_all: int, new_all: int, cur_rev: int, new_rev: int, *, n: int = 200, m: int = 20,
           tol: float = 0.0) -> GateDecision:
    return gate_decision(Score(cur_all, n), Score(new_all, n), Score(cur_rev, m), Score(new_rev, m),
                         overall_tolerance_points=tol)


def test_promoted_when_as_good_overall_and_better_on_reviewed_frames():
    d = decide(150, 150, 5, 6)
    assert d.promoted and d.decision == "promoted"
    assert d.reasons[0].startswith("overall top-1 75.00% vs 75.00% (+0.00 points")
    assert "reviewed frames top-1 30.00% vs 25.00% on 20 held-out frames (+5.00 points" in d.reasons[1]


def test_rejected_when_worse_overall_by_more_than_the_tolerance():
    d = decide(150, 149, 5, 15)                          # -0.5 points overall, much better on reviewed frames
    assert not d.promoted and d.reasons[0].endswith("worse") and "-0.50 points" in d.reasons[0]
    assert decide(150, 149, 5, 15, tol=0.5).promoted     # within an explicit tolerance
    assert not decide(150, 148, 5, 15, tol=0.5).promoted


def test_the_overall_rule_allows_the_paired_comparisons_noise_and_no_more():
    # The user's case: 10,000 test images, a 2-epoch retrain changed 300 answers (136 gained, 164 lost):
    # -0.28 points. The paired standard error is sqrt(300/10000 - 0.0028^2)/sqrt(10000) = 0.173 points.
    n, pairs = 10_000, Paired(lost=164, gained=136)
    assert round(pairs.standard_error_points(n), 3) == 0.173
    d = gate_decision(Score(9370, n), Score(9342, n), Score(5, 20), Score(9, 20), overall_pairs=pairs)
    assert d.promoted, d.reasons                                     # 0.280 < 1.645 x 0.173 = 0.285
    assert "may lose at most 0.28 = 0.00 + 1.645 x 0.17 paired standard error" in d.reasons[0]
    assert not gate_decision(Score(9370, n), Score(9342, n), Score(5, 20), Score(9, 20), overall_pairs=pairs,
                             overall_confidence=0.5).promoted       # no noise allowance: the old strict rule
    # A real loss is refused: 3 points on 1,000 images, 60 lost and 30 gained (standard error 0.30 points)
    worse = gate_decision(Score(900, 1000), Score(870, 1000), Score(5, 20), Score(15, 20), overall_pairs=Paired(60, 30))
    assert not worse.promoted and worse.reasons[0].endswith("worse")
    with pytest.raises(ValueError, match="overall-confidence"):
        gate_decision(Score(1, 2), Score(1, 2), Score(1, 2), Score(2, 2), overall_confidence=1.0)


def test_paired_counts_come_from_the_two_models_answers_on_the_same_images():
    truth = ["a", "b", "c", "d"]
    assert Paired.of(truth, ["a", "b", "x", "x"], ["a", "x", "c", "x"]) == Paired(lost=1, gained=1)
    with pytest.raises(ValueError, match="same images"):
        Paired.of(truth, ["a"], ["a"])


def test_the_reviewed_frames_noise_is_counted_by_item():
    # 100 held-out frames of 10 items, 10 frames each. Frames of one item are decided alike: a gain of 20 frames
    # on 2 items is two pieces of evidence, not twenty.
    truth = ["a"] * 100
    items = [i // 10 for i in range(100)]
    current = ["x"] * 100
    two_items = ["a" if i < 20 else "x" for i in range(100)]            # items 0 and 1 gained, whole
    by_item = Paired.of(truth, current, two_items, items)
    by_frame = Paired.of(truth, current, two_items)
    assert (by_item.lost, by_item.gained, by_item.items) == (0, 20, 10) and by_frame.items is None
    assert round(by_frame.standard_error_points(100), 2) == 4.0         # sqrt(20 - 100 x 0.2^2) / 100
    assert round(by_item.standard_error_points(100), 2) == 12.65        # sqrt(2 x 8^2 + 8 x 2^2) / 100
    # one item per frame: the same as without items
    assert Paired.of(truth, current, two_items, list(range(100))).standard_error_points(100) == \
        pytest.approx(by_frame.standard_error_points(100))
    one_each = ["a" if i % 10 == 0 else "x" for i in range(100)]        # one more frame right on every item
    every_item = Paired.of(truth, current, one_each, items)
    assert every_item.standard_error_points(100) == pytest.approx(0.0)

    def gate(candidate_right: int, pairs: Paired, confidence: float):
        return gate_decision(Score(900, 1000), Score(900, 1000), Score(0, 100), Score(candidate_right, 100),
                             reviewed_pairs=pairs, reviewed_confidence=confidence)

    # the default: more frames right is enough, and the reason gives the noise by item
    d = gate(20, by_item, 0.5)
    assert d.promoted, d.reasons
    assert "on 100 held-out frames, 10 items (+20.00 points; paired standard error 12.65 points; must be higher)" \
        in d.reasons[1]
    assert d.noise == {"overall_standard_error_points": None, "reviewed_standard_error_points": 12.6491,
                       "reviewed_holdout_items": 10, "reviewed_sign_p": 0.25}
    # asked for a 95% bound: two items are not enough (1.645 x 12.65 = 20.8 > 20), the same gain counted by frame
    # would have been (6.6), and a smaller gain on every item is
    strict = gate(20, by_item, 0.95)
    assert not strict.promoted and strict.reasons[1].endswith(
        "must be higher by more than 1.645 x 12.65, and the items' sign test p 0.250 at most 0.050): not better")
    assert gate(20, by_frame, 0.95).promoted
    assert gate(10, every_item, 0.95).promoted
    # one held-out item, or a few that all gained alike, have a standard error of 0: the sign test over items
    # keeps a frame or two from promoting at 0.95 (one item: p 0.5; four of four: 0.0625), and five of five pass
    for gained_items, promoted in ((1, False), (4, False), (5, True)):
        few = Paired.of(["a"] * gained_items, ["x"] * gained_items, ["a"] * gained_items, list(range(gained_items)))
        assert few.standard_error_points(gained_items) == 0.0
        d = gate_decision(Score(900, 1000), Score(900, 1000), Score(0, gained_items), Score(gained_items, gained_items),
                          reviewed_pairs=few, reviewed_confidence=0.95)
        assert d.promoted is promoted, (gained_items, d.reasons)
        assert gate_decision(Score(900, 1000), Score(900, 1000), Score(0, gained_items),
                             Score(gained_items, gained_items), reviewed_pairs=few).promoted     # the default
    with pytest.raises(ValueError, match="reviewed-confidence"):
        gate(20, by_item, 1.0)
    with pytest.raises(ValueError, match="same images"):
        Paired.of(truth, current, two_items, items[:-1])


@pytest.mark.parametrize("setting, flag", [({"reviewed_confidence": 1.0}, "--reviewed-confidence"),
                                           ({"overall_confidence": 0.2}, "--overall-confidence"),
                                           ({"overall_tolerance_points": float("nan")}, "--overall-tolerance")])
def test_a_gate_setting_out_of_range_is_refused_before_anything_is_trained(tmp_path, setting, flag):
    cfg = RetrainConfig(base_data=tmp_path / "base", reviewed=tmp_path / "reviewed", current=tmp_path / "current",
                        report=tmp_path / "report.json", train={"out_dir": str(tmp_path / "runs")}, **setting)
    with pytest.raises(RetrainError, match=flag):
        retrain(cfg)
    assert list(tmp_path.iterdir()) == []


def test_rejected_when_not_strictly_better_on_the_reviewed_frames():
    d = decide(150, 180, 12, 12)
    assert not d.promoted and d.reasons[1].endswith("not better")
    assert not decide(150, 180, 12, 11).promoted


def test_rejected_without_held_out_reviewed_frames_and_refused_on_different_image_sets():
    d = decide(150, 180, 0, 0, m=0)
    assert not d.promoted and "cannot be shown" in d.reasons[1]
    with pytest.raises(ValueError, match="same images"):
        gate_decision(Score(1, 10), Score(1, 11), Score(1, 5), Score(2, 5))
    with pytest.raises(ValueError, match="overall-tolerance"):
        decide(1, 1, 1, 2, tol=-1)


# ---------------------------------------------------------------- real models

@pytest.fixture(scope="module")
def weak(fmnist_dir, tmp_path_factory):
    return weak_base(fmnist_dir, tmp_path_factory.mktemp("weak"))


def reviewed_csv(path: Path, weak, *, shirts: int = 40, others: dict[str, int] | None = None,
                 corrupt: bool = False) -> Path:
    """Reviewed frames as 'central labels export' hands them over: path,label plus provenance columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, count in {WEAK_CLASS: shirts, **(others or {"Pullover": 5, "T-shirt/top": 5})}.items():
        for i, image in enumerate(weak.pool[label][:count]):
            rows.append({"path": str(image), "label": label, "frame_id": f"{label}-{i}", "station": "ber1/receiving-01",
                         "model_version": "1"})
    if corrupt:
        bad = path.parent / "truncated.jpg"
        bad.write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
        rows.append({"path": str(bad), "label": WEAK_CLASS, "frame_id": "bad", "station": "ber1/receiving-01",
                     "model_version": "1"})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def config(weak, tmp: Path, reviewed: Path, *, version: str, finetune: bool, **train) -> RetrainConfig:
    settings = train_settings(out_dir=str(tmp / "runs"), epochs=2, batch_size=16, lr=1e-3, workers=0, seed=0)
    settings.update(train)
    return RetrainConfig(base_data=weak.base, reviewed=reviewed, current=weak.bundle, report=tmp / f"report-{version}.json",
                         train=settings, holdout=weak.holdout, finetune_from_current=finetune,
                         export=ExportSettings(models_dir=tmp / "models", version=version, calibration_images=64,
                                               parity_images=32, tensorrt="off"))


@pytest.mark.slow
def test_a_better_candidate_is_promoted_with_figures_and_can_be_published(weak, tmp_path):
    reviewed = reviewed_csv(tmp_path / "reviewed" / "labels.csv", weak, corrupt=True)
    result = retrain(config(weak, tmp_path, reviewed, version="2", finetune=True))
    report = result.report
    print(result.report_md.read_text())
    assert result.decision.promoted, result.decision.reasons
    f = report["figures"]
    assert f["overall"]["candidate"]["correct"] >= f["overall"]["current"]["correct"]
    assert f["reviewed"]["candidate"]["correct"] > f["reviewed"]["current"]["correct"]
    assert f["overall"]["current"]["images"] == f["overall"]["candidate"]["images"] == 1000
    assert set(f["overall"]["current"]) >= {"top1", "macro_f1", "per_class_recall"}
    # the weak class is what the reviewed frames taught it
    assert f["overall"]["candidate"]["per_class_recall"][WEAK_CLASS] > f["overall"]["current"]["per_class_recall"][WEAK_CLASS]
    # held-out reviewed frames: stratified, seeded, recorded, never trained on
    data = report["data"]["reviewed"]
    assert (data["frames"], data["train"] + data["holdout"]) == (50, 50)
    assert data["per_class_holdout"] == {"Pullover": 2, WEAK_CLASS: 12, "T-shirt/top": 2}
    assert data["per_class_train"] == {"Pullover": 3, WEAK_CLASS: 28, "T-shirt/top": 3}
    assert (data["split_by"], data["items"], data["holdout_items"]) == ("item", 50, 16)   # no tracks: a frame each
    assert "on 16 held-out frames, 16 items (" in result.decision.reasons[1]          # the noise, counted by item
    short = report["figures_short"]
    assert short["reviewed_confidence"] == 0.5 and short["reviewed_holdout_items"] == 16
    assert short["reviewed_standard_error_points"] > 0 and short["overall_standard_error_points"] > 0
    assert read_gate(result.bundle_dir)["figures"]["reviewed_holdout_items"] == 16
    split = json.loads(Path(data["split_file"]).read_text())
    held = {row["path"] for row in split["holdout"]}
    assert len(held) == 16 and all(row["frame_id"] for row in split["holdout"])
    trained_on = {row["path"] for row in csv.DictReader(open(report["training"]["dataset_csv"]))}
    assert not held & trained_on and len(trained_on) == report["data"]["base"]["train_images"] + 34
    # every reviewed frame of the training side is trained on: none spent on the run's own validation
    run_split = json.loads((Path(report["training"]["run_dir"]) / "split.json").read_text())
    run_val = {str((Path(run_split["root"]) / p).resolve()) for p, _ in run_split["val"]}
    assert run_val and not run_val & {str(Path(row["path"]).resolve()) for row in split["train"]}
    assert report["training"]["finetuned_from_current"] and report["training"]["start"].endswith("best.pt")
    assert [s["path"] for s in report["data"]["skipped_images"]] == [str(reviewed.parent / "truncated.jpg")]
    # recorded beside the bundle, and publishable
    gate = read_gate(result.bundle_dir)
    assert gate["decision"] == "promoted" and gate["manifest_sha256"] == manifest_sha256(result.bundle_dir)
    assert "PROMOTED" in result.report_md.read_text()
    assert publish_bundle(result.bundle_dir, tmp_path / "served").decision == "promoted"


@pytest.mark.slow
@pytest.mark.mqtt
def test_an_undertrained_candidate_is_rejected_recorded_and_never_published(weak, tmp_path, broker):
    recorder = Recorder(broker.port, ["inventory/_central/rollout"])
    reviewed = reviewed_csv(tmp_path / "reviewed.csv", weak)
    cfg = config(weak, tmp_path, reviewed, version="3", finetune=False, epochs=1, max_steps_per_epoch=1)
    cfg.mqtt = BrokerSettings("127.0.0.1", broker.port)
    try:
        result = retrain(cfg)
    finally:
        recorder.close()
    print(result.report_md.read_text())
    assert not result.decision.promoted
    assert any(r.endswith("worse") for r in result.report["reasons"]), result.report["reasons"]
    assert read_gate(result.bundle_dir)["decision"] == "rejected"
    with pytest.raises(RolloutError, match="rejected by the retrain gate"):
        publish_bundle(result.bundle_dir, tmp_path / "served")
    [event] = recorder.events()
    validate_event(event)
    assert (event["action"], event["ok"], event["model"]) == ("gate", False, {"name": "fmnist", "version": "3"})
    assert event["reason"].startswith("rejected: overall top-1") and event["figures"]["current_version"] == "1"
    assert "REJECTED" in result.report_md.read_text()


@pytest.mark.slow
def test_fine_tuning_needs_the_current_versions_checkpoint(weak, tmp_path):
    copy = shutil.copytree(weak.bundle, tmp_path / "models" / "fmnist" / "1")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["provenance"]["checkpoint"] = str(tmp_path / "elsewhere" / "best.pt")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    cfg = config(weak, tmp_path, reviewed_csv(tmp_path / "r.csv", weak, shirts=6), version="4", finetune=True)
    cfg.current = copy
    with pytest.raises(RetrainError, match=r"elsewhere/best.pt: the checkpoint fmnist 1 was exported from .*not on this "
                                           "machine; bundles hold ONNX, not trainable weights"):
        retrain(cfg)
    del manifest["provenance"]["checkpoint"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RetrainError, match="field provenance/checkpoint: absent"):
        retrain(cfg)
    assert not (tmp_path / "models" / "fmnist" / "4").exists()
    # and nothing is trained for a version that cannot be written
    cfg.current, cfg.finetune_from_current = weak.bundle, False
    cfg.export.version = "1"
    with pytest.raises(RetrainError, match="--version 1: that is the current version"):
        retrain(cfg)
    (tmp_path / "models" / "fmnist" / "5").mkdir()
    cfg.export.version = "5"
    with pytest.raises(RetrainError, match="fmnist/5: bundle version already exists"):
        retrain(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_current_version_is_weak_on_the_class_it_barely_saw(weak):
    from trainer.data import FASHION_MNIST_CLASSES

    recall = {c: class_recall(weak.bundle, weak.holdout, c)[0] for c in FASHION_MNIST_CLASSES}
    print("current version, recall per class on held-out images:", {c: f"{r:.0%}" for c, r in recall.items()})
    others = [r for c, r in recall.items() if c != WEAK_CLASS]
    assert recall[WEAK_CLASS] < 0.1 and sum(others) / len(others) > 0.3


@pytest.mark.slow
def test_without_holdout_the_current_versions_own_validation_split_is_held_out(weak, tmp_path):
    from contract.bundle import load_bundle
    from trainer.retrain import _read_items, overall_holdout

    cfg = config(weak, tmp_path, tmp_path / "unused.csv", version="9", finetune=False)
    cfg.holdout = None
    current = load_bundle(weak.bundle)
    base, _ = _read_items(weak.base, "base")
    held, source, _ = overall_holdout(cfg, current, base, seed=0)
    split = json.loads((weak.run_dir / "split.json").read_text())
    assert "the current version's validation split" in source
    assert sorted(str(i.path) for i in held) == sorted(str(Path(split["root"]) / rel) for rel, _ in split["val"])
    # without that split (another machine), a seeded share of the base data, and the report says what that means
    moved = shutil.copytree(weak.bundle, tmp_path / "elsewhere" / "fmnist" / "1")
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["provenance"]["run_dir"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    held, source, _ = overall_holdout(cfg, load_bundle(moved), base, seed=0)
    assert "may have trained on some of these images" in source
    assert len(held) == sum(max(1, round(n * 0.1)) for n in _per_class(base).values())


def _per_class(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item.label] = out.get(item.label, 0) + 1
    return out


def test_retrain_trains_for_the_crop_the_current_bundle_is_fed(tmp_path):
    """--station-view left open follows the current bundle: a whole-ROI bundle's next version is not trained
    on station views it would never be fed (its head learned little from the reviewed frames when it was)."""
    from trainer.cli import _current_station_view

    for crop, expected in (({"mode": "foreground", "margin": 0.1}, "on"), ({"mode": "roi"}, "off"), (None, "off")):
        bundle = tmp_path / str(crop)
        bundle.mkdir()
        (bundle / "manifest.json").write_text(json.dumps({"input": {"crop": crop} if crop else {}}))
        assert _current_station_view(bundle) == expected
    assert _current_station_view(tmp_path / "missing") == "off"


def test_fine_tuning_from_the_current_version_defaults_to_a_tenth_of_the_training_learning_rate():
    """A converged model fine-tuned at the training rate forgets the base data (2 epochs lost 2.6 points and the
    gate refused the round); left open, --lr is 1e-4 when fine-tuning from the current and 1e-3 from ImageNet,
    and a rate the user gives is kept either way."""
    from types import SimpleNamespace

    from trainer.cli import get_args_parser
    from trainer.retrain import FINETUNE_LR, resolve_train_config

    current = SimpleNamespace(input_spec=SimpleNamespace(height=48, resize_shorter=48, interpolation="bilinear"),
                              manifest={"architecture": "mobilenet_v2"})
    assert resolve_train_config(train_settings(), current, weights="runs/x/best.pt")["lr"] == FINETUNE_LR == 1e-4
    assert resolve_train_config(train_settings(), current, weights=None)["lr"] == 1e-3
    assert resolve_train_config(train_settings(lr=3e-4), current, weights="runs/x/best.pt")["lr"] == 3e-4
    # the command line leaves it open unless --lr is given
    base = ["retrain", "--base-data", "b", "--reviewed", "r", "--current", "c", "--report", "x.json"]
    assert get_args_parser().parse_args(base).lr is None
    assert get_args_parser().parse_args(base + ["--lr", "5e-4"]).lr == 5e-4


def test_retrain_keeps_the_current_runs_training_recipe_unless_told_otherwise():
    """The next version is trained under the augmentation the current one was (the recipe's 50% station views,
    no plain rotation, milder crops, label smoothing), not the training defaults; an option given is kept;
    where the current run's config is not known, the training defaults apply."""
    from types import SimpleNamespace

    from trainer.config import TrainConfig
    from trainer.retrain import resolve_train_config

    current = SimpleNamespace(input_spec=SimpleNamespace(height=48, resize_shorter=48, interpolation="bilinear"),
                              manifest={"architecture": "mobilenet_v2"})
    recipe = TrainConfig(data="").to_dict()
    recipe["label_smoothing"] = 0.1
    recipe["augment"].update(scale=[0.75, 1.0], rotation=0.0, brightness=0.1, contrast=0.1, saturation=0.1, erasing=0.2)
    recipe["augment"]["station_view"].update(share=0.5, rotation=15.0)
    defaults = TrainConfig(data="").to_dict()

    tuned = resolve_train_config(train_settings(), current, weights="runs/x/best.pt", current_config=recipe)
    assert tuned["label_smoothing"] == 0.1
    assert {k: tuned["augment"][k] for k in ("scale", "rotation", "brightness", "erasing")} == \
        {"scale": [0.75, 1.0], "rotation": 0.0, "brightness": 0.1, "erasing": 0.2}
    assert tuned["augment"]["station_view"]["share"] == 0.5 and tuned["augment"]["station_view"]["rotation"] == 15.0
    TrainConfig(**{**tuned, "data": "x"})                                   # a config the trainer takes

    given = train_settings()
    given["augment"]["erasing"] = 0.0
    assert resolve_train_config(given, current, weights="runs/x/best.pt", current_config=recipe)["augment"]["erasing"] == 0.0

    scratch = resolve_train_config(train_settings(), current, weights=None, current_config=recipe)
    assert scratch["augment"]["scale"] == [0.75, 1.0] and scratch["lr"] == 1e-3    # the recipe, training's rate
    fresh = resolve_train_config(train_settings(), current, weights=None, current_config=None)
    assert fresh["label_smoothing"] == defaults["label_smoothing"]
    assert fresh["augment"]["scale"] == defaults["augment"]["scale"]
    assert fresh["augment"]["station_view"]["share"] == defaults["augment"]["station_view"]["share"]

    # the command line leaves the recipe open unless an option is given
    from trainer.cli import get_args_parser

    base = ["retrain", "--base-data", "b", "--reviewed", "r", "--current", "c", "--report", "x.json"]
    args = get_args_parser().parse_args(base)
    assert args.scale is None and args.station_view_share is None and args.label_smoothing is None
    assert get_args_parser().parse_args(base + ["--scale", "0.5", "1"]).scale == [0.5, 1.0]
    from trainer.cli import retrain_train_settings

    left = retrain_train_settings(args)
    assert left["lr"] is None and left["label_smoothing"] is None
    # reviewed frames are drawn 10 times an epoch unless asked otherwise (train's own default stays 1)
    assert left["station_frame_repeat"] == 10 and get_args_parser().parse_args(["train", "--data", "x"]) \
        .station_frame_repeat == 1
    assert retrain_train_settings(get_args_parser().parse_args(base + ["--station-frame-repeat", "1"])) \
        ["station_frame_repeat"] == 1
    assert left["augment"]["scale"] is None and left["augment"]["rotation"] is None
    assert left["augment"]["station_view"]["share"] is None and left["augment"]["station_view"]["rotation"] is None
    given = retrain_train_settings(get_args_parser().parse_args(base + ["--rotation", "10", "--erasing", "0.3"]))
    assert given["augment"]["station_view"]["rotation"] == 10.0 and given["augment"]["rotation"] == 10.0
    assert given["augment"]["erasing"] == 0.3 and given["augment"]["scale"] is None
    tuned = resolve_train_config(given, current, weights="runs/x/best.pt", current_config=recipe)
    assert tuned["augment"]["rotation"] == 10.0 and tuned["augment"]["erasing"] == 0.3      # given: kept
    assert tuned["augment"]["scale"] == [0.75, 1.0] and tuned["label_smoothing"] == 0.1     # open: the current's


# ---------------------------------------------------------------- an enrolled current version; a spreadsheet's CSV

def _enrolled_colour_bundle(tmp_path: Path) -> Path:
    """tests/agent/agent_support.py's colour bundle with yellow enrolled (a row on its embedding, as
    ``trainer enroll`` adds one): labels belt, red, green, blue, yellow; the model's labels the first four."""
    from agent_support import make_open_set_bundle

    return make_open_set_bundle(tmp_path / "models", enrolled=True)


def _png_folders(root: Path, counts: dict[str, int]) -> Path:
    """Class folders of ``counts`` 16 px grey PNG images each."""
    import numpy as np
    from PIL import Image

    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((16, 16, 3), 40 * i % 256, np.uint8)).save(root / label / f"{i}.png")
    return root


def test_fine_tuning_from_an_enrolled_version_takes_the_checkpoint_of_its_model(tmp_path):
    """The checkpoint knows the model's labels; the enrolled class is a row on the embedding, never in it. Its
    classes were compared with all the bundle's labels, and an enrolled version was 'not this version's
    checkpoint'."""
    import numpy as np
    import torch

    from contract.bundle import load_bundle
    from trainer.model import build_model
    from trainer.retrain import current_checkpoint

    bundle_dir = _enrolled_colour_bundle(tmp_path)
    bundle = load_bundle(bundle_dir)
    assert bundle.labels[-1] == "yellow" and bundle.model_labels == bundle.labels[:-1]
    checkpoint = tmp_path / "best.pt"
    torch.save({"model": build_model("mobilenet_v2", len(bundle.model_labels), "none").state_dict(),
                "classes": bundle.model_labels, "config": {"arch": "mobilenet_v2"}}, checkpoint)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["architecture"] = "mobilenet_v2"
    manifest["provenance"]["checkpoint"] = str(checkpoint)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    no_probe = np.zeros((0, 3, 16, 16), np.float32)         # the outputs' check is test_fine_tuning_needs_...'s
    assert current_checkpoint(load_bundle(bundle_dir), no_probe) == checkpoint


def test_reviewed_frames_in_a_csv_with_a_byte_order_mark_keep_their_items(tmp_path):
    """A spreadsheet's "CSV UTF-8" starts with a byte order mark: the first column was read as "\\ufeffpath", the
    track column lost, and the frames of one item split onto both sides of the gate."""
    from trainer.retrain import _read_items, item_key

    _png_folders(tmp_path / "frames", {"red": 16, "blue": 16})
    rows = [(f"frames/{label}/{i}.png", label, f"{label}-item{i // 4}") for label in ("red", "blue") for i in range(16)]
    with open(tmp_path / "reviewed.csv", "w", newline="", encoding="utf-8-sig") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "track"])
        writer.writerows(rows)
    items, _ = _read_items(tmp_path / "reviewed.csv", "reviewed")
    assert len(items) == 32 and all(item.extra.get("track") for item in items)
    train, held = reviewed_split(items, 0.3, seed=0)
    assert held and not {item_key(i) for i in train} & {item_key(i) for i in held}
    assert item_count(items) == 8


def test_retraining_from_an_enrolled_version_without_images_of_its_enrolled_class_is_refused(tmp_path):
    """The candidate trains the classes its images show; an enrolled class (its examples kept only as a row on the
    embedding) would be dropped, and neither held-out set has its images, so the gate would not see it go."""
    current = _enrolled_colour_bundle(tmp_path)
    base = _png_folders(tmp_path / "base", {"belt": 10, "red": 10, "green": 10, "blue": 10})
    reviewed = _png_folders(tmp_path / "reviewed", {"red": 6})
    cfg = RetrainConfig(base_data=base, reviewed=reviewed, current=current, report=tmp_path / "report.json",
                        train=train_settings(out_dir=str(tmp_path / "runs")),
                        export=ExportSettings(models_dir=tmp_path / "models", version="2"))
    with pytest.raises(RetrainError, match=r"enrolled class\(es\) 'yellow' have no training images in --base-data "
                                           r".*central labels export"):
        retrain(cfg)
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in current.parent.iterdir()) == ["1"]


def test_an_image_a_model_gives_non_finite_logits_for_is_scored_wrong_and_the_candidate_rejected(tmp_path):
    """The argmax of a NaN row is its first column: the gate scored a model right on every image it gave NaN for
    whose label came first (4 of 4 white frames of class-0 right, top-1 100%, beside a macro-F1 of 0)."""
    import numpy as np
    from agent_support import make_onnx_bundle
    from PIL import Image

    from contract.bundle import load_bundle
    from trainer.retrain import evaluate_bundle, refuse_non_finite

    # given: a real ONNX model whose logits are NaN for white frames, and 4 white and 6 dark frames of class-0
    bundle = load_bundle(make_onnx_bundle(tmp_path / "models", nan="bright"))
    items = []
    for i, value in enumerate([255] * 4 + [0] * 6):
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(tmp_path / f"{i}.png")
        items.append(Item(tmp_path / f"{i}.png", "class-0", "holdout"))
    # when: scored as the gate scores it
    ev = evaluate_bundle(bundle, items, bundle.labels, workers=0)
    clean = evaluate_bundle(bundle, items[4:], bundle.labels, workers=0)
    # then: the white frames predict no class and count wrong, as in the macro-F1
    assert ev.non_finite_images == 4 and ev.predictions[:4] == [None] * 4
    assert ev.score.correct == clean.score.correct <= 6 and clean.non_finite_images == 0
    assert ev.predictions[4:] == clean.predictions
    # and a candidate that gives them is rejected whatever its figures, the reason naming how many
    promoted = GateDecision(True, ["overall ok", "reviewed ok"])
    assert refuse_non_finite(promoted, {"overall": clean, "reviewed": clean}) is promoted
    refused = refuse_non_finite(promoted, {"overall": ev, "reviewed": clean})
    assert not refused.promoted and refused.reasons[:2] == promoted.reasons
    assert "non-finite logits (NaN or infinity) on 4 of 10 overall held-out images" in refused.reasons[-1]


@pytest.mark.parametrize("label", [-1, 4, "x", None, True])
def test_a_damaged_row_of_the_current_versions_split_is_refused_naming_the_file(tmp_path, label):
    """The held-out images default to the current version's validation split: a label of -1 was read as the last
    class (a red image scored as blue), and the gate judged both models on a wrong label."""
    from agent_support import OPEN_SET_COLOURS, make_open_set_bundle

    from contract.bundle import load_bundle
    from trainer.retrain import overall_holdout

    bundle_dir = make_open_set_bundle(tmp_path / "models")
    data = _png_folders(tmp_path / "data", {name: 3 for name in OPEN_SET_COLOURS})
    rows = [[f"{name}/{i}.png", k] for k, name in enumerate(OPEN_SET_COLOURS) for i in range(3)]
    rows[3][1] = label                                # red/0.png
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text(json.dumps({"root": str(data), "classes": list(OPEN_SET_COLOURS), "train": [],
                                                "val": rows}))
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["provenance"]["run_dir"] = str(run)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    cfg = RetrainConfig(base_data=data, reviewed=data, current=bundle_dir, report=tmp_path / "r.json", train={})
    with pytest.raises(RetrainError, match=rf"split.json: not the current version's split .*row \['red/0.png', "
                                           rf"{label!r}\]; expected \[path, class index 0..3\]"):
        overall_holdout(cfg, load_bundle(bundle_dir), [], 0)
    rows[3][1] = 1
    (run / "split.json").write_text(json.dumps({"root": str(data), "classes": list(OPEN_SET_COLOURS), "train": [],
                                                "val": rows}))
    items, _source, _ = overall_holdout(cfg, load_bundle(bundle_dir), [], 0)
    assert [(i.path.parent.name, i.label) for i in items] == [(name, name) for name in OPEN_SET_COLOURS
                                                              for _ in range(3)]


@pytest.mark.parametrize("case", ["none", "missing", "not a key", "another key"])
def test_a_sign_key_the_candidate_could_not_be_signed_or_verified_with_is_refused_before_training(
        tmp_path, monkeypatch, case):
    """With --public-key the candidate is verified with that key after its training and export: without
    --sign-key (unsigned: refused), or with a --sign-key that is missing, no key or another key's, the retrain
    trained for hours and then failed (a key that cannot be read also failed without --public-key, at signing)."""
    from agent_support import OPEN_SET_COLOURS, make_open_set_bundle

    import trainer.engine as engine
    from trainer.signing import generate_keypair, sign_bundle

    def no_training(_self):
        raise AssertionError("the candidate was trained before the signing key was checked")

    monkeypatch.setattr(engine.Trainer, "fit", no_training)
    current = make_open_set_bundle(tmp_path / "models")
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    sign_bundle(current, tmp_path / "k.key")
    (tmp_path / "junk.key").write_text("not a key\n")
    base = _png_folders(tmp_path / "base", {name: 10 for name in OPEN_SET_COLOURS})
    reviewed = _png_folders(tmp_path / "reviewed", {"red": 6})
    sign_key, needle = {
        "none": (None, "--public-key given without --sign-key"),
        "missing": (tmp_path / "missing.key", "missing.key: cannot read the private key"),
        "not a key": (tmp_path / "junk.key", "junk.key: not an unencrypted ed25519 private key"),
        "another key": (tmp_path / "other.key", "other.key: not the private key of --public-key")}[case]
    cfg = RetrainConfig(base_data=base, reviewed=reviewed, current=current, report=tmp_path / "report.json",
                        train=train_settings(out_dir=str(tmp_path / "runs")),
                        export=ExportSettings(models_dir=tmp_path / "models", version="2", sign_key=sign_key),
                        public_key=tmp_path / "k.pub")
    with pytest.raises(RetrainError, match=needle):
        retrain(cfg)
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in current.parent.iterdir()) == ["1"]
    if case in ("missing", "not a key"):            # no --public-key: the key is still checked first
        cfg.public_key = None
        with pytest.raises(RetrainError, match=needle.split(": ", 1)[1]):
            retrain(cfg)
