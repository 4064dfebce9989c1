"""Station-view validation: scenes of real product images, cropped by the station's own localizer."""

from __future__ import annotations

import numpy as np
import pytest

from agent.localize import Localizer, LocalizerSettings, crop_box, foreground_box
from agent.preprocess import CropPolicy, InputSpec, Preprocessor, read_image
from trainer.station_eval import SceneConfig, _surfaces, render_scene, station_views

POLICY = CropPolicy("foreground", 0.1, 16)


@pytest.fixture(scope="module")
def images(fmnist_dir):
    paths = sorted((fmnist_dir / "test").glob("*/*.png"))[::40][:24]
    return paths, [read_image(p) for p in paths]


def _true_box(scene: np.ndarray, empty: np.ndarray) -> tuple[int, int, int, int]:
    """Where the scene differs from its empty twin by more than the sensor noise: the pasted item."""
    ys, xs = np.nonzero(np.abs(scene.astype(int) - empty.astype(int)).max(2) > 40)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union


def test_the_localizer_finds_each_item_on_every_surface(images):
    _, rgbs = images
    rng, surfaces, cfg = np.random.default_rng(0), _surfaces(256, 1234), SceneConfig()
    ious = []
    for i, rgb in enumerate(rgbs):
        scene, empty = render_scene(rgb, surfaces[i % len(surfaces)], rng, cfg)
        assert scene.shape == empty.shape == (cfg.roi, cfg.roi, 3)
        found = foreground_box(scene, empty, gain=1.0).box
        assert found is not None
        ious.append(_iou(found, _true_box(scene, empty)))
    # a dark item on the dark belt can lose its darkest parts (2% of 400 scenes under IoU 0.6, none missed)
    assert np.mean(ious) > 0.85 and sum(iou < 0.6 for iou in ious) <= 2, ious


def test_the_crop_is_the_one_a_station_camera_thread_makes(images):
    """The station's Localizer, given the empty twin as its captured empty scene, crops the same square."""
    _, rgbs = images
    rng, surfaces = np.random.default_rng(1), _surfaces(256, 1234)
    for i, rgb in enumerate(rgbs[:8]):
        scene, empty = render_scene(rgb, surfaces[(3 * i) % len(surfaces)], rng, SceneConfig())
        station = Localizer(LocalizerSettings(), POLICY, empty_scene=empty).update(scene)
        ours = crop_box(foreground_box(scene, empty, gain=1.0).box, scene.shape[:2], POLICY)
        assert station.present and station.crop_box == ours


def test_station_views_are_model_inputs_of_the_item_crop(images):
    paths, rgbs = images
    spec = InputSpec(32, 32, 32, crop=POLICY)
    views = station_views(paths, list(range(len(paths))), spec)
    assert views.inputs.shape == (len(paths), 3, 32, 32) and views.found == len(paths)
    assert views.labels.tolist() == list(range(len(paths)))
    again = station_views(paths, list(range(len(paths))), spec)
    assert np.array_equal(views.inputs, again.inputs)  # seeded: the same scenes every export
    # a whole-ROI policy feeds the whole scene: mostly surface, so the inputs differ from the item crops
    whole = station_views(paths, list(range(len(paths))), InputSpec(32, 32, 32, crop=CropPolicy("roi")))
    assert np.abs(whole.inputs - views.inputs).mean() > 0.1
    assert not np.array_equal(views.inputs[0], Preprocessor(spec)(rgbs[0]))
