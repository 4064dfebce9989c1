"""agent/sim/scenes.py, agent/sim/score.py and benchmarks/station_view.py: the renderer is deterministic, its truth matches
the masks it composited, and the scoring counts correct, missed, split, merged, phantom and review items
exactly (the benchmark itself, with the agent, is not a test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from benchmark_script import load

from agent.sim import scenes, score

sv = load("station_view")

pytestmark = pytest.mark.skipif(not (scenes.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="Fashion-MNIST test split not installed")


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    return scenes.load_test_split()[0]


def rendered(scene: str, seed: int, frames: range, images: np.ndarray, items: int = 3):
    plan = scenes.plan_scene(scene, items, seed)
    return plan, list(scenes.render_frames(plan, images, frames))


# ---------------------------------------------------------------- renderer

@pytest.mark.parametrize("scene", scenes.SCENES)
def test_same_seed_renders_the_same_bytes_and_another_seed_does_not(scene, test_images):
    # given two renderers of the same plan, built independently
    frames = range(8, 14)
    # when both render the same frames
    _, first = rendered(scene, 3, frames, test_images)
    _, again = rendered(scene, 3, frames, test_images)
    _, other = rendered(scene, 4, frames, test_images)
    # then the JPEG bytes are identical, and a different seed gives different frames
    assert [j for _, j, _, _ in first] == [j for _, j, _, _ in again]
    assert [j for _, j, _, _ in first] != [j for _, j, _, _ in other]


def test_frames_render_alike_in_any_order(test_images):
    plan = scenes.plan_scene("belt", 2, 5)
    forward = {t: j for t, j, _, _ in scenes.render_frames(plan, test_images, range(10, 13))}
    backward = {t: j for t, j, _, _ in scenes.render_frames(plan, test_images, range(12, 9, -1))}
    assert forward == backward


@pytest.mark.parametrize("scene", scenes.SCENES)
def test_each_effect_switched_off_changes_the_frame_and_nothing_else_of_the_scene(scene, test_images):
    # given a frame with an item fully in the ROI, rendered with every effect and with each one off
    plan = scenes.plan_scene(scene, 2, 0)
    t = next(f for f in range(plan.n_frames)
             if any(plan.roi.contains(m)[1] for m in scenes.Renderer(plan, test_images).render(f)[1].values()))
    full, masks, _ = scenes.Renderer(plan, test_images).render(t)
    effects = [e for e in scenes.EFFECTS if e != "blur"]   # few frames are blurred: the next test
    for effect in effects:
        off, off_masks, blurred = scenes.Renderer(plan, test_images, off=frozenset({effect})).render(t)
        # then the frame differs (the effect did something), and the items stay where they were
        assert np.abs(off.astype(int) - full.astype(int)).mean() > 0.2, effect
        if effect not in ("rotation",):
            assert masks.keys() == off_masks.keys() and all((masks[k] == off_masks[k]).all() for k in masks)
    with pytest.raises(ValueError, match="unknown effects"):
        scenes.Renderer(plan, test_images, off=frozenset({"fog"}))


def test_blur_switched_off_leaves_a_blurred_frame_sharp(test_images):
    plan = scenes.plan_scene("belt", 30, 0)
    renderer = scenes.Renderer(plan, test_images, off=frozenset({"noise"}))
    sharp = scenes.Renderer(plan, test_images, off=frozenset({"noise", "blur"}))
    t = next(f for f in range(plan.n_frames) if renderer.render(f)[2])
    blurred, _, _ = renderer.render(t)
    plain, _, flag = sharp.render(t)
    # a horizontal motion blur flattens column-to-column differences (noise off: it would hide them); off,
    # the frame keeps them and is not reported blurred
    def detail(img):
        return np.abs(np.diff(img.astype(float), axis=1)).mean()
    assert not flag and detail(plain) > 1.5 * detail(blurred)


def test_scenes_draw_test_items_balanced_and_disjoint():
    _, labels = scenes.load_test_split()
    belt = scenes.pick_items(labels, 20, 0, "belt")
    bench = scenes.pick_items(labels, 20, 0, "bench")
    assert not set(belt) & set(bench)
    assert sorted(np.bincount(labels[belt], minlength=10).tolist()) == [2] * 10


def test_a_second_draw_of_one_station_skips_the_first_draws_items():
    # given two draws of one scene that share items (seeds 0 and 1, 200 items each)
    _, labels = scenes.load_test_split()
    first = scenes.pick_items(labels, 200, 0, "belt")
    assert set(first) & set(scenes.pick_items(labels, 200, 1, "belt"))
    # when the second skips the first's items (the loop's same-station scene B)
    second = scenes.pick_items(labels, 200, 1, "belt", exclude=first)
    # then none is shown twice and the classes stay balanced
    assert not set(first) & set(second) and len(second) == 200
    assert sorted(np.bincount(labels[second], minlength=10).tolist()) == [20] * 10


def test_ensure_scene_renders_again_when_the_exclusion_changes(tmp_path):
    # given a bench draw rendered without exclusions (its truth.json has no exclusion key, as before)
    plain = sv.ensure_scene("bench", tmp_path, 2, 3)
    assert "excluded_test_indices" not in plain
    skip = [item["test_index"] for item in plain["items"]]
    # when the same draw is asked for without those items
    other = sv.ensure_scene("bench", tmp_path, 2, 3, exclude=skip)
    # then it is rendered again, shows other items and records what it skipped
    assert other["excluded_test_indices"] == sorted(skip)
    assert not {item["test_index"] for item in other["items"]} & set(skip)
    assert json.loads((tmp_path / "bench" / "truth.json").read_text())["excluded_test_indices"] == sorted(skip)
    # and asking again with the same exclusion reuses it
    assert sv.ensure_scene("bench", tmp_path, 2, 3, exclude=skip)["frames_sha256"] == other["frames_sha256"]


def test_the_loop_measures_the_same_station_on_another_draw_in_its_own_folder(tmp_path):
    from benchmarks.station_view_loop import measured_scene

    args = sv.get_args_parser().parse_args(["--bundle", "b", "--loop", "--scenes", "bench", "bench", "--seed", "4",
                                            "--items", "60", "--measure-items", "200"])
    assert measured_scene(args, tmp_path) == (tmp_path / "measure", 5, 200)
    args = sv.get_args_parser().parse_args(["--bundle", "b", "--loop", "--scenes", "belt", "bench", "--seed", "4"])
    assert measured_scene(args, tmp_path) == (tmp_path, 4, 60)      # another station: its own stretch, as before
    args = sv.get_args_parser().parse_args(["--bundle", "b", "--loop", "--scenes", "belt", "belt", "--measure-seed", "9"])
    assert measured_scene(args, tmp_path) == (tmp_path / "measure", 9, 60)


@pytest.mark.parametrize("scene", scenes.SCENES)
def test_truth_matches_the_composited_masks(scene, test_images):
    # given a few items rendered with their masks
    plan, frames = rendered(scene, 1, range(0, 70, 2), test_images)
    roi = plan.roi
    seen_full = 0
    for t, _, masks, blurred in frames:
        truth = scenes.frame_truth(plan, t, masks, blurred)
        for item in truth["full"]:
            # then an item marked fully in the ROI has no mask pixel outside it
            outside = masks[item].copy()
            outside[roi.y:roi.y + roi.height, roi.x:roi.x + roi.width] = False
            assert masks[item].any() and not outside.any()
            seen_full += 1
        for item in truth["visible"]:
            assert masks[item][roi.y:roi.y + roi.height, roi.x:roi.x + roi.width].any()
        if t < scenes.LEAD_EMPTY_FRAMES:
            assert truth["visible"] == [] and truth["full"] == []
    assert seen_full > 0


def test_written_scene_folder_sorts_in_frame_order_and_truth_is_consistent(tmp_path):
    truth = scenes.write_scene("bench", tmp_path, 2, seed=2)
    files = sorted(p.name for p in (tmp_path / "bench").glob("*.jpg"))
    assert files == [f["file"] for f in truth["frames"]] and len(files) == truth["n_frames"]
    on_disk = json.loads((tmp_path / "bench" / "truth.json").read_text())
    assert on_disk["items"] == truth["items"]
    for item in truth["items"]:
        assert set(item["full_frames"]) <= set(item["visible_frames"])
        assert item["label_name"] == scenes.FASHION_MNIST_CLASSES[item["label"]]
    empty = [f for f in truth["frames"] if not f["visible"]]
    assert empty and all(not f["full"] for f in empty)


# ---------------------------------------------------------------- scoring

def frame(t: int, visible=(), full=()) -> dict:
    return {"frame": t, "file": f"f{t:03d}.jpg", "visible": list(visible), "full": list(full), "blurred": False}


def at(t: int) -> float:
    return round(1000.0 + 0.1 * t, 6)


def result(t: int, label: str) -> dict:
    return {"source_ref": f"f{t:03d}.jpg", "captured_at": at(t), "frame_seq": t + 1, "label": label}


def decision(a: int, b: int, label: str, review: bool = False) -> dict:
    return {"first_seen": at(a), "last_seen": at(b), "label": label, "low_confidence": review,
            "lane": "manual-review" if review else "default", "confidence": 0.9, "frames": b - a + 1}


@pytest.fixture()
def truth() -> dict:
    """Five items on 60 frames: 0 (A) 2-9, 1 (B) 12-20, 2 (C) 24-30, 3 (A) 34-40, 4 (B) 41-47 (back to back)."""
    spans = {0: (2, 9, "A"), 1: (12, 20, "B"), 2: (24, 30, "C"), 3: (34, 40, "A"), 4: (41, 47, "B")}
    items = [{"item": i, "test_index": 100 + i, "label_name": lab, "visible_frames": list(range(a, b + 1)),
              "full_frames": list(range(a + 2, b - 1))} for i, (a, b, lab) in spans.items()]
    frames = []
    for t in range(60):
        vis = [i for i, (a, b, _) in spans.items() if a <= t <= b]
        frames.append(frame(t, vis, [i for i in vis if spans[i][0] + 2 <= t <= spans[i][1] - 2]))
    return {"n_frames": 60, "items": items, "frames": frames}


def test_items_correct_missed_split_phantom_merged_and_review(truth):
    # given: item 0 decided right; item 1 split in two; item 2 missed; items 3 and 4 merged into one
    # review decision (so 4 is missed too); a phantom after the last item
    results = [result(t, "A") for t in range(60)]
    decisions = [decision(3, 8, "A"), decision(12, 15, "B"), decision(17, 20, "B"),
                 decision(35, 45, "A", review=True), decision(52, 55, "C")]
    # when scored
    scores = score.score_scene(truth, results, decisions)["items"]
    # then
    assert scores["correct"] == 2          # item 0, and item 3 (one decision, its label, though in review)
    assert scores["split"] == 1 and scores["missed"] == 2
    assert scores["phantom_decisions"] == 1 and scores["merged_decisions"] == 1
    assert scores["review"] == 1 and scores["review_share"] == 0.2
    assert scores["item_accuracy"] == 0.4
    low, high = scores["item_accuracy_ci95"]              # 2 of 5: the interval says how little 5 items tell
    assert low < 0.4 < high and high - low > 0.5
    assert scores["auto_sorted"] == 1 and scores["auto_wrong"] == 0


def test_the_item_accuracy_interval_is_wilsons_and_narrows_with_more_items():
    assert score.wilson(52, 60) == [0.7583, 0.9309]           # the belt's 86.7%: about -11/+6 points
    assert score.wilson(184, 200) == [0.874, 0.9502]
    assert score.wilson(0, 10)[0] == 0.0 and score.wilson(10, 10)[1] == 1.0
    assert score.wilson(0, 0) is None


def test_confident_wrong_decision_counts_as_auto_sorted_wrong(truth):
    results = [result(t, "A") for t in range(60)]
    scores = score.score_scene(truth, results, [decision(24, 30, "A")])["items"]
    assert scores["correct"] == 0 and scores["auto_wrong"] == 1 and scores["auto_sorted_accuracy"] == 0.0


def test_decision_times_without_their_own_result_are_placed_between_neighbours(truth):
    # given results only on item frames (a station that no longer publishes empty frames)
    results = [result(t, "A") for f in truth["frames"] if f["visible"] for t in [f["frame"]]]
    clock = score.FrameClock.from_results(results, {f["file"]: f["frame"] for f in truth["frames"]})
    # then an exact time maps to its frame and a time between two results is interpolated
    assert clock.frame_at(at(5)) == 5
    assert clock.frame_at(at(10.5)) in (10, 11)
    # and a time outside the results is placed only within one frame's time of the first or last: further out
    # (a decision over empty frames before the first result) it is unplaced, not snapped to the edge's item
    assert clock.frame_at(at(1)) == 2 and clock.frame_at(at(48)) == 47
    assert clock.frame_at(at(0)) is None and clock.frame_at(at(59)) is None


def test_frame_scores_full_partial_and_products_on_empty_frames(truth):
    # given every frame classified: right on item 0's frames, "empty" on some empty frames, "B" elsewhere
    results = [result(t, "A" if 2 <= t <= 9 else ("empty" if t < 2 else "B")) for t in range(60)]
    scores = score.score_frames(truth["frames"], truth["items"], results)
    full_frames = sum(1 for f in truth["frames"] if len(f["full"]) == 1)
    assert scores["full"]["frames"] == full_frames
    # item 0 (A): 4 full frames right; items 1, 4 (B): 5 + 3 full right; 2 (C) and 3 (A) wrong
    assert scores["full"]["correct"] == 4 + 5 + 3
    empty = [f["frame"] for f in truth["frames"] if not f["visible"]]
    assert scores["empty"]["frames"] == len(empty)
    assert scores["empty"]["products"] == len(empty) - 2          # frames 0 and 1 said "empty"
    # partial frames: item 0's edges (2, 3, 8, 9) are A (right)
    assert scores["partial"]["correct"] >= 4


def test_unpublished_frames_lower_frame_accuracy_but_not_accuracy_of_published(truth):
    results = [result(t, "A") for t in range(4, 8)]
    full = score.score_frames(truth["frames"], truth["items"], results)["full"]
    assert full["results"] == 4 and full["accuracy_of_published"] == 1.0 and full["accuracy"] == round(4 / 18, 4)


def test_overrides_set_nested_keys_and_every_camera():
    cfg = {"decisions": {"presence": {"mode": "background"}}, "cameras": [{"id": "a"}, {"id": "b"}]}
    sv.apply_overrides(cfg, ["decisions.presence.gap_frames=1", "cameras.fps=10", "model.batch_size=4"])
    assert cfg["decisions"]["presence"] == {"mode": "background", "gap_frames": 1}
    assert [c["fps"] for c in cfg["cameras"]] == [10, 10] and cfg["model"] == {"batch_size": 4}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sv.apply_overrides(cfg, ["nonsense"])


def test_a_shipment_of_the_scenes_items_is_open_when_the_station_starts(tmp_path):
    """--shipment writes the station's state file; the agent's own loader finds the shipment open, with one line
    per label of the scene's items and nothing received yet."""
    from agent.receiving import Shipment
    from agent.state import STATE_FILE, StationState

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"name": "b", "version": "1"}))
    truth = {"scene": "belt", "items": [{"label_name": "Bag"}, {"label_name": "Shirt"}, {"label_name": "Bag"}]}
    assert sv.open_shipment(truth, bundle, tmp_path) == {"Bag": 2, "Shirt": 1}
    state = StationState.load(tmp_path / STATE_FILE, bundle)
    shipment = Shipment.from_json(state.shipment)
    assert (shipment.id, shipment.expected, shipment.received, shipment.closed_at) == \
        ("sv-belt", {"Bag": 2, "Shirt": 1}, {}, None)
    assert shipment.still_expected() == {"Bag", "Shirt"}


def test_loop_reviewer_labels_only_frames_with_one_recognisable_item(truth):
    from benchmarks.station_view_loop import label_for

    items = {it["item"]: it for it in truth["items"]}
    frames = {f["frame"]: f for f in truth["frames"]}
    assert label_for(frames[5], items) == "A"          # item 0 fully in
    assert label_for(frames[2], items) is None         # its first frame: a sliver at the ROI edge
    assert label_for(frames[10], items) is None        # empty belt
    two = {**frames[41], "visible": [3, 4], "full": []}
    assert label_for(two, items) is None               # two items in view


def test_the_loop_records_how_the_retrain_split_its_labelled_frames(tmp_path):
    from benchmarks.station_view_loop import reviewed_split

    # given: a gate report and its split file, one item's frames on both sides and one frame without a track
    split = {"train": [{"path": "a", "track": "t1"}, {"path": "b", "track": "t2"}, {"path": "c", "track": ""}],
             "holdout": [{"path": "d", "track": "t2"}, {"path": "e", "track": "t3"}]}
    (tmp_path / "reviewed-split.json").write_text(json.dumps(split))
    gate = {"data": {"reviewed": {"split_by": "item", "frames": 5, "items": 4, "train": 3, "train_items": 3,
                                  "holdout": 2, "holdout_items": 2,
                                  "split_file": str(tmp_path / "reviewed-split.json")}}}
    # then: the report's counts, and what the file shows
    out = reviewed_split(gate)
    assert (out["frames"], out["train_items"], out["holdout_items"]) == (5, 3, 2)
    assert (out["frames_without_track"], out["items_on_both_sides"]) == (1, 1)
    # a report without a split file (an older retrain): its counts only
    assert "items_on_both_sides" not in reviewed_split({"data": {"reviewed": {"frames": 5}}})


def test_the_loop_compares_scene_b_with_the_new_bundles_clean_test_split(real_bundle, fmnist_dir, tmp_path):
    from benchmarks.station_view_loop import clean_test
    from contract.bundle import load_bundle
    from trainer.data import load_dataset
    from trainer.retrain import Item, evaluate_bundle

    # given: a real bundle as both the current and the candidate, scored on 1,000 real test images
    after = {"items": {"item_accuracy": 0.5}}
    out = clean_test(fmnist_dir / "test", real_bundle, real_bundle, after)
    dataset = load_dataset(fmnist_dir / "test")
    items = [Item(s.path, dataset.classes[s.label], "holdout") for s in dataset.samples]
    top1 = evaluate_bundle(load_bundle(real_bundle), items, dataset.classes, workers=0).score.top1
    # then: the deployable model's top-1 (INT8 where its gate passed), and scene B's distance from it in points
    assert out["images"] == 1000 and out["before"] == out["after"]
    deployable = load_bundle(real_bundle).pick_onnx(prefer_int8=True).path.name
    assert out["after"]["artifact"] == deployable and out["after"]["top1"] == round(top1, 4)
    assert out["gap_points"] == round((round(top1, 4) - 0.5) * 100, 2)
    assert out["within_1_point"] is (out["gap_points"] <= 1.0)
    # a candidate the retrain did not keep: the current bundle's figure only
    assert "after" not in clean_test(fmnist_dir / "test", real_bundle, tmp_path / "gone", after)
    # the test images scene A showed (the candidate trained on their frames) are left out of the clean split
    taught = sorted(int(Path(s.path).stem.split("_")[1]) for s in dataset.samples)[:25:5]
    fewer = clean_test(fmnist_dir / "test", real_bundle, real_bundle, after, taught + [99_999])
    assert fewer["images"] == 995 and fewer["left_out_as_taught"] == 5


def test_an_item_no_camera_could_see_is_neither_missed_nor_in_the_shares():
    """Counted as never_visible only: before, it was also missed and stayed in item accuracy's denominator."""
    items = [{"item": 0, "label_name": "A", "visible_frames": [1, 2, 3]},
             {"item": 1, "label_name": "B", "visible_frames": []}]
    out = score.score_items(items, [{"first_seen": 1, "last_seen": 3, "label": "A", "low_confidence": False,
                                     "lane": "x"}], [(1, 3)])
    assert (out["items"], out["never_visible"], out["missed"], out["correct"]) == (2, 1, 0, 1)
    assert out["item_accuracy"] == 1.0 and out["missed_share"] == 0.0
