"""agent/sim/score.py and benchmarks/station_view.py: decisions auto-sorted and wrong are counted per decision (a
split item's each and phantoms included), the camera's counts say when the last stats message predates the scene's
end, and the summary prints the denominator the item accuracy divides by."""

from __future__ import annotations

from benchmark_script import load

from agent.sim.score import camera_counts, score_items

sv = load("station_view")


def decision(label: str, lane: str | None = None, low: bool = False) -> dict:
    return {"label": label, "lane": "manual-review" if low else (lane or label), "low_confidence": low}


def items_with_a_split_and_a_phantom() -> tuple[list[dict], list[dict], list[tuple[int, int]]]:
    """A Bag decided right; a Coat split into a part auto-sorted as Trouser and a part sent to review; a Shirt no
    frame shows; a Dress decided right; and a Sneaker decided and auto-sorted over empty frames (a phantom)."""
    items = [{"item": 0, "label_name": "Bag", "visible_frames": list(range(0, 10))},
             {"item": 1, "label_name": "Coat", "visible_frames": list(range(20, 30))},
             {"item": 2, "label_name": "Shirt", "visible_frames": []},
             {"item": 3, "label_name": "Dress", "visible_frames": list(range(40, 50))}]
    decisions = [decision("Bag"), decision("Trouser"), decision("Coat", low=True), decision("Dress"),
                 decision("Sneaker")]
    spans = [(0, 9), (20, 24), (26, 29), (40, 49), (60, 65)]
    return items, decisions, spans


def test_a_split_items_decision_sorted_to_a_wrong_lane_and_a_sorted_phantom_are_auto_sorted_and_wrong():
    items, decisions, spans = items_with_a_split_and_a_phantom()
    s = score_items(items, decisions, spans)
    assert (s["split"], s["phantom_decisions"]) == (1, 1)
    # four decisions were not sent to review: Bag (right), Trouser on the Coat (wrong), Dress (right), the phantom
    assert (s["auto_wrong_decisions"], s["auto_sorted_decisions"]) == (2, 4)
    assert s["auto_sorted_decision_accuracy"] == 0.5
    # the items with exactly one decision, as before 2026-12-07: the split Coat and the phantom are not in them
    assert (s["auto_wrong"], s["auto_sorted"]) == (0, 2)


def test_a_decision_sent_to_review_by_its_lane_alone_is_not_auto_sorted():
    """The review lane named by the station's config (decisions.sorting.review_lane) marks review, as the flag."""
    items = [{"item": 0, "label_name": "Bag", "visible_frames": [1, 2, 3]}]
    s = score_items(items, [{"label": "Coat", "lane": "hold", "low_confidence": False}], [(1, 3)], review_lane="hold")
    assert (s["auto_sorted_decisions"], s["auto_wrong_decisions"], s["review"]) == (0, 0, 1)


def document(items_scores: dict, camera: dict) -> dict:
    return {"items": items_scores,
            "frames": {"full": {"accuracy": None, "correct": 0, "frames": 0, "results": 0},
                       "partial": {"accuracy": None, "correct": 0, "frames": 0},
                       "empty": {"products": 0, "frames": 0, "product_rate": None}},
            "camera": camera, "bundle": {"name": "x", "version": "1", "val_accuracy": None, "crop": None},
            "scene": {"name": "synthetic", "frames": 66}, "agent": {"returncode": 0, "wall_s": 0, "outbox_left": 0}}


def test_the_summary_prints_the_item_accuracys_own_denominator_and_the_decisions_auto_sorted_and_wrong():
    items, decisions, spans = items_with_a_split_and_a_phantom()
    s = score_items(items, decisions, spans)
    camera = {"frames_in_scene": 66, "results_received": 40, "frames_captured_last_stats": 66,
              "frames_dropped_last_stats": 0, "last_stats_stale": False}
    text = sv.table(document(s, camera))
    assert s["item_accuracy"] == round(2 / 3, 4)            # 2 right of the 3 items a camera could see
    assert "(2/3 visible; 1 never in view" in text and "(2/4" not in text
    assert "auto-sorted decisions 2 wrong of 4" in text


def test_a_document_from_before_the_decision_counts_names_what_its_figures_count():
    items, decisions, spans = items_with_a_split_and_a_phantom()
    s = score_items(items, decisions, spans)
    old = {k: v for k, v in s.items() if not k.startswith("auto_") or k in ("auto_sorted", "auto_wrong",
                                                                              "auto_sorted_accuracy")}
    camera = {"frames_in_scene": 66, "results_received": 40, "frames_captured_last_stats": 66,
              "frames_dropped_last_stats": 0}
    text = sv.table(document(old, camera))
    assert "auto-sorted items with one decision 0 wrong of 2" in text and "split items and phantoms not counted" in text


def truth(n_frames: int) -> dict:
    return {"n_frames": n_frames}


def stats(seq: int, captured: int, dropped: int = 0) -> dict:
    return {"seq": seq, "frames_captured": {"cam0": captured}, "frames_dropped": {"cam0": dropped},
            "frames_classified": captured}


def test_a_last_stats_message_sent_before_the_scenes_end_is_flagged_and_no_drop_count_is_printed_from_it():
    results = [{"frame_seq": 5259}]
    cam = camera_counts(truth(5269), results, [stats(1, 3000), stats(2, 5224)], "cam0")
    assert cam["frames_captured_last_stats"] == 5224 and cam["last_stats_stale"] is True
    text = sv.camera_counts(cam)
    assert "dropped" not in text and "drops not known" in text and "5224 of 5269" in text


def test_a_last_stats_message_that_counted_every_frame_is_not_stale():
    cam = camera_counts(truth(100), [{"frame_seq": 99}], [stats(1, 40), stats(2, 100)], "cam0")
    assert cam["last_stats_stale"] is False
    assert sv.camera_counts(cam) == "captured 100, dropped 0"


def test_no_stats_message_at_all_is_stale():
    cam = camera_counts(truth(100), [], [], "cam0")
    assert cam["last_stats_stale"] is True and cam["frames_captured_last_stats"] is None
    assert "drops not known" in sv.camera_counts(cam)


def test_an_old_document_without_the_flag_is_read_as_stale_from_its_counts():
    cam = {"frames_in_scene": 5269, "results_received": 4060, "frames_captured_last_stats": 5201.0,
           "frames_dropped_last_stats": 0}
    assert "drops not known" in sv.camera_counts(cam)


def test_the_demo_scorecard_counts_decisions_auto_sorted_and_the_items_a_camera_could_see():
    """bin/demo's summary (agent/demo.py) prints the same counts as the benchmark: before, it printed 2 right of
    4 items (one never in view) and "auto-sorted 2, 0 of them wrong" for this scene."""
    from agent.demo import DemoRun, summary_lines

    items, decisions, spans = items_with_a_split_and_a_phantom()
    doc = document(score_items(items, decisions, spans), {})
    truth = {"scene": "belt", "seed": 1, "n_frames": 66, "roi": {"width": 10, "height": 10, "x": 0, "y": 0}}
    text = "\n".join(summary_lines(DemoRun([], truth, {"items": doc["items"], "frames": doc["frames"]})))
    assert "items decided right   2 of 3 (66.7%); 1 never in view" in text
    assert "auto-sorted 4, 2 of them wrong" in text
