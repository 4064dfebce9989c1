"""An item left in view past ``relearn_frames`` is learned into the background; once it is taken away the
view is the old empty scene again, and that must read as empty (the replaced background restored), not as an
item where the thing stood until the next relearn (a phantom item, decided and counted by a receiving station).

Synthetic station views (tests/agent/scenes.py) with real Fashion-MNIST items, the real localizer and tracker.
A stopped belt is rendered at every 4th frame (ribs of 12 px moving 3 px a frame: the same belt position) with
the sensor noise of each frame.
"""

from __future__ import annotations

import numpy as np
import pytest
from scenes import Scene, make_sprite

from agent.config import PresenceConfig, SortingConfig
from agent.decide import ItemTracker, LaneMap, LowConfidencePolicy, Observation, PolicyThresholds, classify, roi_edges
from agent.localize import Localizer, LocalizerSettings

ROI = 300
LABELS = ["a", "b"]
POLICY = LowConfidencePolicy(PolicyThresholds())


def stopped(scene: Scene, k: int, items=(), gain: float = 1.0) -> np.ndarray:
    """Frame ``k`` of a stopped belt: the belt where it was at frame 0, this frame's sensor noise."""
    return scene.render(4 * k, list(items), gain)[0]


def warmed(scene: Scene, **settings) -> Localizer:
    loc = Localizer(LocalizerSettings(**settings))
    for k in range(3):
        loc.update(stopped(scene, k))
    return loc


@pytest.mark.parametrize("light, gain", [(False, 1.0), (True, 0.9)], ids=["dark-belt", "bench-light-dimmed"])
def test_an_item_left_past_relearn_frames_then_taken_away_leaves_no_phantom(fmnist_test_images, light, gain):
    # given: an item resting in view for longer than relearn_frames (learned into the background), on the bench
    # the light dimming a little while it rests
    scene = Scene(ROI, light=light, seed=3)
    item = make_sprite(fmnist_test_images[0][0], 200, 0.0, (0.9, 0.8, 0.7))
    loc = warmed(scene, relearn_frames=60)
    resting = [loc.update(stopped(scene, k, [(item, 50, 40)], gain)).present for k in range(3, 103)]
    assert all(resting[:59]) and not any(resting[61:]) and loc.relearned == 1
    # when: it is taken away: the empty belt for longer than another relearn period
    after = [loc.update(stopped(scene, k, gain=gain)) for k in range(103, 233)]
    # then: the empty belt is empty from the first frame (before: an item, where it stood, until relearned again)
    assert not any(a.present for a in after), [k for k, a in enumerate(after) if a.present][:5]
    assert loc.restored == 1 and loc.relearned == 1
    assert after[-1].scene_empty


def test_a_stop_longer_than_relearn_frames_makes_one_decision_not_a_phantom_second(fmnist_test_images):
    # given: a localizer and tracker as the station runs them (relearn_frames and max_frames scaled down from
    # 1800 and 300): an item resting 100 frames, then taken away, the empty belt for 200 frames
    cfg = PresenceConfig(mode="background", relearn_frames=60, max_frames=20)
    scene = Scene(ROI, seed=3)
    item = make_sprite(fmnist_test_images[0][0], 200, 0.0, (0.9, 0.8, 0.7))
    loc = Localizer(LocalizerSettings.from_config(cfg))
    tracker = ItemTracker("cam", LABELS, cfg, LaneMap(SortingConfig()), POLICY)
    decisions, present = [], []
    for k in range(303):
        items = [(item, 50, 40)] if 3 <= k < 103 else []
        located = loc.update(stopped(scene, k, items))
        obs = None
        if located.present:
            cls = classify(np.array([0.9, 0.1]), LABELS, 2, POLICY)
            obs = Observation(k, k / 30, cls, located.box, roi_edges(located.box, ROI, ROI))
        d = tracker.update(obs, located.present)
        decisions += [(k, d.frames)] if d is not None else []
        present.append(located.present)
    # then: the item is decided once; before, the empty belt read as an item for 60 frames and was decided too
    # (decisions [(22, 20), (122, 20)])
    assert decisions == [(22, 20)] and not any(present[103:])


def test_another_item_where_the_relearned_one_stood_is_still_an_item(fmnist_test_images):
    # given: an item left in view past relearn_frames (learned into the background)
    scene = Scene(ROI, seed=6)
    first = make_sprite(fmnist_test_images[0][0], 200, 0.0, (0.9, 0.8, 0.7))
    second = make_sprite(fmnist_test_images[0][1], 180, 10.0, (0.7, 0.8, 0.9))
    loc = warmed(scene, relearn_frames=60)
    for k in range(3, 70):
        loc.update(stopped(scene, k, [(first, 50, 40)]))
    assert loc.relearned == 1
    # when: it is swapped for another item in one frame, which rests a while, then is taken away too
    swapped = [loc.update(stopped(scene, k, [(second, 60, 50)])).present for k in range(70, 100)]
    after = [loc.update(stopped(scene, k)).present for k in range(100, 130)]
    # then: the other item is an item in every frame (the old empty scene is not restored under it), and once
    # it has gone too the view is the old empty scene: empty
    assert all(swapped) and not any(after) and loc.restored == 1 and loc.relearned == 1


def test_items_passing_by_a_relearned_item_that_stays_are_seen_and_do_not_restore(fmnist_test_images):
    # given: an item left at the edge of a belt past relearn_frames (it stays: a changed scene)
    scene = Scene(ROI, seed=8)
    left = make_sprite(fmnist_test_images[0][2], 120, 0.0, (0.9, 0.8, 0.7))
    passing = [make_sprite(fmnist_test_images[0][i], 140, 0.0, (0.8, 0.9, 0.7)) for i in range(3, 6)]
    loc = warmed(scene, relearn_frames=60)
    for k in range(3, 70):
        loc.update(stopped(scene, k, [(left, 0, 0)]))
    assert loc.relearned == 1
    # when: other items ride through the view, one after another, past the one that stays
    seen = []
    for j, sprite in enumerate(passing):
        for step in range(16):
            k = 70 + 20 * j + step
            image, truth = scene.render(4 * k, [(left, 0, 0), (sprite, 150, -150 + 25 * step)])
            got = loc.update(image)
            if truth[1:] and truth[1][3] - truth[1][1] >= 80:
                seen.append(got.present and got.box is not None and got.box[1] >= truth[1][1] - 20)
        for k in range(70 + 20 * j + 16, 70 + 20 * j + 20):
            assert not loc.update(stopped(scene, k, [(left, 0, 0)])).present
    # then: each passing item is seen where it is, the item that stayed is never an item, nothing is restored
    assert seen and all(seen) and loc.restored == 0
