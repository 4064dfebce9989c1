"""benchmarks/active_learning.py: its selection and round logic (the benchmark itself is not a test).

The agent's low-confidence selection is checked against the real agent: real
Fashion-MNIST images go through the agent's inference stage (real ONNX Runtime,
real SQLite outbox), and the frames it uploads must be the frames the benchmark
labels first. The round logic is checked with stand-in train/evaluate functions,
because a real retraining per round is the benchmark's minutes-long job.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from benchmark_script import load

from agent.decide import LowConfidencePolicy, PolicyThresholds, classify_batch

REPO = Path(__file__).resolve().parents[3]


al = load("active_learning")


def classifications(probs: list[list[float]], thresholds: dict[str, float]):
    policy = LowConfidencePolicy(PolicyThresholds.resolve(thresholds))
    return classify_batch(np.array(probs), [f"c{i}" for i in range(len(probs[0]))], 2, [policy] * len(probs))


# ------------------------------------------------------------------ selection


def test_flagged_frames_come_first_least_certain_first_then_the_least_certain_others():
    # given: a policy that flags frames below 0.6 confidence; frame 3 is unflagged but has a small margin
    probs = [[0.90, 0.05, 0.05],   # 0 confident
             [0.50, 0.45, 0.05],   # 1 flagged, margin 0.05
             [0.55, 0.25, 0.20],   # 2 flagged, margin 0.30
             [0.62, 0.38, 0.00],   # 3 unflagged (0.62 >= 0.6), margin 0.24
             [0.40, 0.30, 0.30]]   # 4 flagged, margin 0.10
    classes = classifications(probs, {"min_confidence": 0.6})
    assert [c.low_confidence for c in classes] == [False, True, True, False, True]

    # when / then: the budget takes flagged frames by margin, even before an unflagged frame of smaller margin
    assert al.select_low_confidence(classes, 2) == al.Selection((1, 4), flagged_in_pool=3)
    assert al.select_low_confidence(classes, 3).positions == (1, 4, 2)
    # fewer flagged than the budget: the rest follow by margin (3: 0.24 before 0: 0.85)
    assert al.select_low_confidence(classes, 5).positions == (1, 4, 2, 3, 0)


def test_balanced_rank_lets_the_predicted_classes_take_turns_among_the_flagged_frames():
    # given: class 0 is predicted for the three least certain flagged frames
    probs = [[0.50, 0.49, 0.01],   # 0 flagged, class 0, margin 0.01
             [0.50, 0.48, 0.02],   # 1 flagged, class 0, margin 0.02
             [0.50, 0.47, 0.03],   # 2 flagged, class 0, margin 0.03
             [0.10, 0.50, 0.40],   # 3 flagged, class 1, margin 0.10
             [0.05, 0.30, 0.55],   # 4 flagged, class 2, margin 0.25
             [0.62, 0.37, 0.01],   # 5 unflagged, class 0, margin 0.25
             [0.01, 0.34, 0.65]]   # 6 unflagged, class 2, margin 0.31
    classes = classifications(probs, {"min_confidence": 0.6})
    assert [c.class_id for c in classes] == [0, 0, 0, 1, 2, 0, 2]

    # when / then: least certain first spends a budget of 3 on class 0; balanced takes each class's least certain
    assert al.select_low_confidence(classes, 3, rank="margin").positions == (0, 1, 2)
    assert al.select_low_confidence(classes, 3, rank="balanced") == al.Selection((0, 3, 4), flagged_in_pool=5)
    # then the second turn (class 0 only has one left per turn), then the unflagged frames, also by turns
    assert al.select_low_confidence(classes, 7, rank="balanced").positions == (0, 3, 4, 1, 2, 5, 6)


def test_flagged_random_draws_the_budget_from_the_flagged_frames_only():
    probs = [[0.9, 0.1]] * 10 + [[0.55, 0.45]] * 6 + [[0.51, 0.49]] * 4   # 10 confident, 10 flagged
    classes = classifications(probs, {"min_confidence": 0.6})
    flagged = set(range(10, 20))
    picks = [al.select_low_confidence(classes, 5, rank="flagged-random", rng=random.Random(seed)).positions
             for seed in (0, 1)]
    for p in picks:
        assert len(p) == 5 and len(set(p)) == 5 and set(p) <= flagged
    assert picks[0] != picks[1]                                       # a draw, not the margin order
    again = al.select_low_confidence(classes, 5, rank="flagged-random", rng=random.Random(0)).positions
    assert again == picks[0]
    # fewer flagged than the budget: every flagged frame, then the others by margin, as with rank="margin"
    assert (al.select_low_confidence(classes, 12, rank="flagged-random", rng=random.Random(0))
            == al.select_low_confidence(classes, 12, rank="margin"))
    with pytest.raises(ValueError, match="rank"):
        al.select_low_confidence(classes, 5, rank="entropy")


def test_random_selection_uses_the_budget_exactly_without_repeats():
    rng = random.Random(0)
    picks = [al.select_random(100, 30, rng).positions for _ in range(3)]
    for p in picks:
        assert len(p) == 30 and len(set(p)) == 30 and all(0 <= i < 100 for i in p)
    assert len({tuple(p) for p in picks}) == 3           # new draws each round
    assert al.select_random(7, 30, rng).positions == tuple(range(7))   # a small pool is taken whole
    # the same seed gives the same draws: both runs of the benchmark label the same frames
    assert al.select_random(100, 30, random.Random(0)).positions == picks[0]


def test_labelled_frames_leave_the_pool():
    state = al.LabelState(labelled=(1, 2), pool=(10, 11, 12, 13))
    after = state.label([3, 0])
    assert after.labelled == (1, 2, 10, 13)
    assert after.pool == (11, 12)
    assert state.pool == (10, 11, 12, 13)                # the start state is shared by both strategies
    with pytest.raises(ValueError, match="twice"):
        state.label([1, 1])
    with pytest.raises(ValueError, match="outside the pool of 4"):
        state.label([4])


# ------------------------------------------------------------------ rounds and the summary


class ByIndex:
    """Stand-in strategy: labels the pool frames with the lowest dataset index first."""

    name = al.LOW_CONFIDENCE

    def select(self, model, state, budget, round_no):
        return al.Selection(tuple(range(min(budget, len(state.pool)))))


def test_rounds_label_the_budget_each_round_and_retrain_on_all_labels(tmp_path):
    trained: list[tuple[str, int, tuple[int, ...], tuple[int, ...]]] = []

    def train(strategy, round_no, state):
        trained.append((strategy, round_no, state.labelled, state.pool))
        return tmp_path / f"r{round_no}"

    start = al.LabelState(labelled=(0, 1), pool=tuple(range(2, 12)))
    curve = al.run_rounds(ByIndex(), start, tmp_path / "seed", 0.5, rounds=4, budget=4, val_labels=3,
                          train=train, evaluate=lambda model: 0.5 + int(model.name[1:]) / 10)
    assert [(r.round, r.labels, r.selected, r.accuracy) for r in curve] == [
        (0, 5, 0, 0.5), (1, 9, 4, 0.6), (2, 13, 4, 0.7), (3, 15, 2, 0.8)]   # the pool ran out in round 3
    assert trained[0][2] == (0, 1, 2, 3, 4, 5) and trained[0][3] == tuple(range(6, 12))
    assert trained[-1][2] == tuple(range(12)) and trained[-1][3] == ()


def curve(*points):
    return [al.RoundResult(i, labels, 0, acc) for i, (labels, acc) in enumerate(points)]


def test_summary_counts_the_labels_each_strategy_needed_for_randoms_final_accuracy():
    curves = {al.RANDOM: curve((100, 0.70), (200, 0.74), (300, 0.77), (400, 0.80)),
              al.LOW_CONFIDENCE: curve((100, 0.70), (200, 0.78), (300, 0.81), (400, 0.83))}
    s = al.summarize(curves)
    assert s["target_accuracy"] == 0.80
    assert s["labels_needed"] == {al.LOW_CONFIDENCE: 300, al.RANDOM: 400}
    assert s["ratio"] == pytest.approx(0.75) and not s["target_met"]
    assert s["interpolated_labels_needed"][al.LOW_CONFIDENCE] == pytest.approx(200 + 100 * 2 / 3)

    curves[al.LOW_CONFIDENCE] = curve((100, 0.70), (200, 0.80), (300, 0.79), (400, 0.79))
    assert al.summarize(curves)["ratio"] == pytest.approx(0.5) and al.summarize(curves)["target_met"]

    # random reaches its own final accuracy before its last round: the ratio divides by that, the other by 400
    curves[al.RANDOM] = curve((100, 0.70), (200, 0.74), (300, 0.81), (400, 0.80))
    s = al.summarize(curves)
    assert s["labels_needed"] == {al.LOW_CONFIDENCE: 200, al.RANDOM: 300}
    assert s["ratio"] == pytest.approx(2 / 3) and s["ratio_to_random_final_labels"] == pytest.approx(0.5)

    curves[al.LOW_CONFIDENCE] = curve((100, 0.70), (200, 0.75), (300, 0.79), (400, 0.79))
    s = al.summarize(curves)
    assert s["labels_needed"][al.LOW_CONFIDENCE] is None and s["ratio"] is None and not s["target_met"]


# ------------------------------------------------------------------ against the real agent


@pytest.fixture
def pool_frames(fmnist_dir) -> list[np.ndarray]:
    """64 real Fashion-MNIST test images spread over the classes (tests/conftest.py imports 1,000)."""
    from contract.preprocess import read_image

    files = sorted((fmnist_dir / "test").glob("*/*.png"))[::15][:64]
    assert len(files) == 64
    return [read_image(p) for p in files]


@pytest.fixture
def bundle_that_flags_some(tmp_path, pool_frames) -> Path:
    """The agent tests' small bundle, with thresholds set so that some, not all, of these frames are flagged."""
    support = load("agent_support", REPO / "tests" / "agent" / "agent_support.py")
    bundle = support.make_tiny_bundle(tmp_path / "models")
    classes, _ = al.score_pool(bundle, pool_frames)
    conf = np.array([c.confidence for c in classes])
    margin = np.array([c.margin for c in classes])
    entropy = np.array([c.entropy for c in classes])
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["quality"]["thresholds"] = {"min_confidence": float(np.quantile(conf, 0.3)),
                                         "min_margin": float(np.quantile(margin, 0.3)),
                                         "max_entropy": float(np.quantile(entropy, 0.8))}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def agent_uploads(tmp_path: Path, bundle_dir: Path, frames: list[np.ndarray]) -> set[int]:
    """Frame numbers the agent's inference stage puts in its outbox as low-confidence uploads."""
    from agent.backends import create_backend
    from agent.config import AgentConfig
    from agent.health import Metrics
    from agent.outbox import Outbox
    from agent.pipeline import InferenceStage, ModelHolder, ModelRuntime
    from agent.sources.base import Frame
    from contract.bundle import load_bundle
    from contract.preprocess import Preprocessor

    support = load("agent_support", REPO / "tests" / "agent" / "agent_support.py")
    cfg = AgentConfig.model_validate(support.station_config(tmp_path, bundle_dir, str(tmp_path), 1883))
    bundle = load_bundle(bundle_dir)
    runtime = ModelRuntime(bundle, create_backend(bundle, cfg.model), Preprocessor(bundle.input_spec))
    outbox = Outbox(cfg.outbox.path, max_bytes=cfg.outbox.max_bytes, max_age_s=cfg.outbox.max_age_s)
    stage = InferenceStage(cfg, hub=None, model=ModelHolder(runtime), outbox=outbox, metrics=Metrics(),
                           cameras_done=lambda: True)
    batch = [Frame("cam-a", i, 0.0, 0.0, image) for i, image in enumerate(frames)]
    for start in range(0, len(batch), cfg.model.batch_size):
        stage.process(batch[start : start + cfg.model.batch_size])
    uploads = {r.body["frame_seq"] for r in outbox.pending(limit=10_000) if r.kind == "frame"}
    outbox.close()
    return uploads


def test_low_confidence_selection_labels_exactly_what_the_agent_uploads(tmp_path, pool_frames, bundle_that_flags_some):
    # given: what a real station with this bundle uploads for these real frames
    uploaded = agent_uploads(tmp_path, bundle_that_flags_some, pool_frames)
    assert 0 < len(uploaded) < len(pool_frames)

    # when: the benchmark scores the same frames with the same bundle
    classes, info = al.score_pool(bundle_that_flags_some, pool_frames, batch_size=16)
    flagged = {i for i, c in enumerate(classes) if c.low_confidence}

    # then: it flags the same frames, and a budget of that size labels exactly them
    assert flagged == uploaded
    assert info["backend"].startswith("onnxruntime") and info["thresholds"]["max_entropy"] > 0
    chosen = al.select_low_confidence(classes, len(uploaded))
    assert set(chosen.positions) == uploaded and chosen.flagged_in_pool == len(uploaded)
    # a bigger budget adds unflagged frames only after every uploaded one
    more = al.select_low_confidence(classes, len(uploaded) + 5).positions
    assert set(more[: len(uploaded)]) == uploaded and not set(more[len(uploaded):]) & uploaded


# ------------------------------------------------------------------ the benchmark's training recipes


@pytest.mark.parametrize("recipe", ["head", "full"])
def test_head_recipe_trains_only_the_classifier_on_the_imagenet_backbone(tmp_path, fmnist_dir, recipe):
    """--train head: every training (seed model and rounds) leaves the ImageNet backbone as it was."""
    import torch

    from trainer import data as data_mod
    from trainer.model import imagenet_state_dict

    train = data_mod.load_dataset(fmnist_dir / "train", check_images=False)
    labels = np.array(train.labels())
    cfg = al.BenchConfig(data=fmnist_dir, seed_per_class=3, val_per_class=2, pool=50, seed_epochs=1, epochs=1,
                         train=recipe)
    seed, val, pool = al.draw_split(labels, cfg)
    images = al.Images(train.classes, [s.path for s in train.samples], labels, al.LabelState(seed, pool), val,
                       test_x=None, test_y=None)
    lab = al.Lab(cfg, images, tmp_path)
    seed_model = lab.train("seed", 0, images.seed)
    round_model = lab.train("random", 1, images.seed.label(range(10)))

    imagenet = imagenet_state_dict("mobilenet_v2", allow_download=False)
    for checkpoint in (seed_model, round_model):
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
        backbone = [k for k in state if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")]
        unchanged = [k for k in backbone if torch.equal(state[k], imagenet[k])]
        if recipe == "head":
            assert unchanged == backbone, f"{checkpoint}: backbone tensors changed"
        else:
            assert len(unchanged) < len(backbone) / 2, f"{checkpoint}: the full recipe left the backbone as it was"


def finished_run(low: list[tuple[int, float]], rnd: list[tuple[int, float]]) -> dict:
    return {"finished": True, "curves": {
        "low-confidence": [{"round": i, "labels": n, "selected": 0, "accuracy": a} for i, (n, a) in enumerate(low)],
        "random": [{"round": i, "labels": n, "selected": 0, "accuracy": a} for i, (n, a) in enumerate(rnd)]}}


def test_mean_of_runs_averages_each_round_and_summarizes_the_mean_curves(tmp_path):
    a = finished_run([(10, 0.5), (20, 0.8), (30, 0.9)], [(10, 0.5), (20, 0.6), (30, 0.7)])
    b = finished_run([(10, 0.7), (20, 0.6), (30, 0.9)], [(10, 0.7), (20, 0.7), (30, 0.8)])
    curves = al.mean_curves([a, b])
    assert [r.accuracy for r in curves["low-confidence"]] == pytest.approx([0.6, 0.7, 0.9])
    assert [r.accuracy for r in curves["random"]] == pytest.approx([0.6, 0.65, 0.75])
    summary = al.summarize(curves)
    assert summary["target_accuracy"] == pytest.approx(0.75)
    assert summary["labels_needed"] == {"low-confidence": 30, "random": 30}   # a alone would say 20 vs 30

    with pytest.raises(ValueError, match="run 2: random labels per round"):
        al.mean_curves([a, finished_run([(10, 0.5), (20, 0.8), (30, 0.9)], [(10, 0.5), (25, 0.6), (30, 0.7)])])
    with pytest.raises(ValueError, match="run 2: the run did not finish"):
        al.mean_curves([a, dict(b, finished=False)])

    paths = []
    for i, report in enumerate((a, b)):
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps(dict(report, summary=al.summarize(al.mean_curves([report, report])))))
    assert al.main(["--mean-of", *map(str, paths), "--json", str(tmp_path / "mean.json")]) == 0
    written = json.loads((tmp_path / "mean.json").read_text())
    assert written["summary"]["target_accuracy"] == pytest.approx(0.75) and written["mean_of"] == list(map(str, paths))
    with pytest.raises(SystemExit, match="s9.json: cannot read"):
        al.main(["--mean-of", str(paths[0]), str(tmp_path / "s9.json")])
