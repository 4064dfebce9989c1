"""Station-view validation: scenes of real product images, cropped by the station's own localizer."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent.localize import Localizer, LocalizerSettings, crop_box, foreground_box
from contract.preprocess import CropPolicy, InputSpec, Preprocessor, read_image
from trainer.station_eval import SceneConfig, StationViewInputs, _surfaces, render_scene, station_views

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
        found = foreground_box(scene, empty).box
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
        ours = crop_box(foreground_box(scene, empty).box, scene.shape[:2], POLICY)
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


def test_a_scene_where_the_localizer_finds_nothing_keeps_its_place_and_is_counted(images):
    """No light (the scene is as dark as its empty twin): foreground_box finds no item. The scene stays in the
    set, as the whole ROI (what ``model_view`` gives without a box), so the set keeps the size the export
    records, and ``found`` (the manifest's ``item_found``) counts it as missed."""
    paths, _ = images
    spec = InputSpec(32, 32, 32, crop=POLICY)
    dark = SceneConfig(gain=(0.0, 0.0), noise=0.0)
    views = station_views(paths[:6], list(range(6)), spec, dark)
    assert len(views) == views.inputs.shape[0] == 6 and views.found == 0
    assert np.isfinite(views.inputs).all() and views.labels.tolist() == list(range(6))
    assert station_views(paths[:6], list(range(6)), spec).found == 6        # lit: every item found


@pytest.mark.parametrize("chunk", [1, 5, 24])
def test_station_views_rendered_chunk_by_chunk_are_the_scenes_of_the_whole_set(images, chunk):
    """The export renders its station views a chunk at a time, on each pass again (1,000 scenes at 224 px held at
    once are 600 MB): every pass gives the scenes, the order and the count of found items of the whole set."""
    paths, _ = images
    spec = InputSpec(32, 32, 32, crop=POLICY)
    whole = station_views(paths, list(range(len(paths))), spec, SceneConfig(seed=4321))
    stream = StationViewInputs(paths, list(range(len(paths))), spec, SceneConfig(seed=4321), chunk=chunk)
    assert len(stream) == len(paths) and stream.found is None        # nothing rendered before a pass
    for _ in range(2):
        chunks = list(stream.chunks())
        assert [len(c) for c in chunks] == [min(chunk, len(paths) - i) for i in range(0, len(paths), chunk)]
        assert np.array_equal(np.concatenate(chunks), whole.inputs) and stream.found == whole.found
    assert stream.labels.tolist() == whole.labels.tolist() == list(range(len(paths)))
    assert station_views([], [], spec).inputs.shape == (0, 3, 32, 32)


def test_scenes_show_the_item_in_its_own_colour_with_a_shadow_the_empty_twin_lacks(images):
    _, rgbs = images
    surfaces = _surfaces(256, 1234)
    light = surfaces[int(np.argmax(surfaces.reshape(len(surfaces), -1).mean(1)))]  # a shadow shows best on it
    still = dict(noise=0.0, blur=0.0, jpeg_quality=(0, 0))
    darker = 0
    for i, rgb in enumerate(rgbs[:8]):
        lit, twin = render_scene(rgb, light, np.random.default_rng(i), SceneConfig(shadow=0.0, **still))
        shaded, twin2 = render_scene(rgb, light, np.random.default_rng(i), SceneConfig(shadow=1.0, **still))
        assert np.array_equal(twin, twin2)                           # the empty scene has no shadow
        drop = lit.astype(int) - shaded.astype(int)
        assert drop.min() >= -1                                      # a shadow only darkens (rounding aside)
        darker += (drop.max(2) > 10).sum() > 200                     # ... a visible patch beside the item
    assert darker >= 6
    grey = np.repeat(rgbs[0][..., :1], 3, axis=2)                    # a grey product takes a colour
    gains = []
    for seed in range(6):
        views = [render_scene(grey, light, np.random.default_rng(seed), SceneConfig(shadow=0.0, item_colour=c, **still))
                 for c in (0.0, 0.3)]
        item = np.abs(views[0][0].astype(int) - views[0][1].astype(int)).max(2) > 40
        spread = [(v[0].astype(int).max(2) - v[0].astype(int).min(2))[item].mean() for v in views]
        assert spread[0] < 3                                         # grey stays grey without a colour
        gains.append(spread[1] - spread[0])
    assert np.mean(gains) > 8


def test_scenes_come_through_the_camera_jpeg():
    rgb = np.zeros((28, 28, 3), np.uint8)
    rgb[6:22, 8:20] = 200
    surface = _surfaces(256, 1234)[0]
    raw, _ = render_scene(rgb, surface, np.random.default_rng(0), SceneConfig(jpeg_quality=(0, 0), noise=0.0))
    coded, _ = render_scene(rgb, surface, np.random.default_rng(0), SceneConfig(jpeg_quality=(20, 20), noise=0.0))
    assert 0.5 < np.abs(raw.astype(int) - coded.astype(int)).mean() < 20


# --- each effect of a scene: drawn as its setting says, and visible in the scene ----------------------------

# Every effect off but the one a test turns on; a small ROI keeps a thousand scenes quick.
STILL = dict(roi=64, gain=(1.0, 1.0), gradient=0.0, noise=0.0, item_gain=(1.0, 1.0), item_colour=0.0, shadow=0.0,
             blur=0.0, jpeg_quality=(0, 0))


def _bar() -> np.ndarray:
    """A grey bar on black, much taller than wide: its axis shows the rotation."""
    rgb = np.zeros((28, 28, 3), np.uint8)
    rgb[4:24, 11:17] = 200
    return rgb


def _axis_degrees(alpha: np.ndarray) -> float:
    """Principal-axis angle of a mask, degrees, x right / y down, in -90..90."""
    ys, xs = np.nonzero(alpha > 0.5)
    dx, dy = xs - xs.mean(), ys - ys.mean()
    return float(np.degrees(0.5 * np.arctan2(2 * (dx * dy).mean(), (dx * dx).mean() - (dy * dy).mean())))


def _scene_pair(rgb, surface, seed: int, **one_on) -> tuple[tuple, tuple]:
    """(scenes without the effect, scenes with it): the same seed, so every other draw is the same."""
    off = render_scene(rgb, surface, np.random.default_rng(seed), SceneConfig(**STILL))
    on = render_scene(rgb, surface, np.random.default_rng(seed), SceneConfig(**{**STILL, **one_on}))
    return off, on


def test_the_item_turns_by_its_drawn_angle_within_the_rotation_setting():
    from trainer.station_eval import _placed_item

    cfg = SceneConfig(roi=300, rotation=20.0)
    drawn, errors = [], []
    for seed in range(60):
        replay = np.random.default_rng(seed)
        replay.uniform(*cfg.item_fraction)                         # _placed_item draws the size, then the angle
        angle = replay.uniform(-cfg.rotation, cfg.rotation)
        _, alpha, _, _ = _placed_item(_bar(), np.random.default_rng(seed), cfg)
        # an upright bar's axis is at 90 degrees; OpenCV turns counter-clockwise as shown (y down)
        errors.append((_axis_degrees(alpha) - (90 - angle) + 90) % 180 - 90)
        drawn.append(angle)
    assert np.abs(errors).max() < 1.5, errors
    assert max(drawn) > 15 and min(drawn) < -15


def test_light_gain_scales_the_scene_and_its_empty_twin():
    surface = _surfaces(256, 1234)[0]
    (scene, twin), (lit, lit_twin) = _scene_pair(_bar(), surface, 0, gain=(1.25, 1.25))
    dark = (twin > 40) & (twin < 180)                                 # 1.25 x 180 < 255: not clipped
    assert dark.mean() > 0.3
    ratio = lit_twin[dark].astype(float) / np.maximum(twin[dark], 1)
    assert np.median(ratio) == pytest.approx(1.25, abs=0.02)
    assert lit.astype(float).mean() > 1.15 * scene.astype(float).mean()
    left_right = []
    for seed in range(20):                                            # a gradient: one side brighter than the other
        (_, flat), (_, graded) = _scene_pair(_bar(), surface, seed, gradient=0.25)
        change = graded.astype(float) / np.maximum(flat, 1)
        left_right.append(abs(change[:, :32].mean() - change[:, 32:].mean())
                          + abs(change[:32].mean() - change[32:].mean()))
    assert np.mean(left_right) > 0.05


def test_motion_blur_comes_in_its_share_of_scenes_and_smooths_them():
    surface = _surfaces(256, 1234)[1]
    blurred, sharpness = 0, []
    for seed in range(1000):
        (sharp, _), (maybe, _) = _scene_pair(_bar(), surface, seed, blur=0.3)
        if np.array_equal(sharp, maybe):
            continue
        blurred += 1
        if len(sharpness) < 50:                                       # along x: the blur is horizontal
            sharpness.append(np.abs(np.diff(maybe.astype(float), axis=1)).mean()
                             / np.abs(np.diff(sharp.astype(float), axis=1)).mean())
    assert blurred / 1000 == pytest.approx(0.3, abs=0.05)
    assert max(sharpness) < 0.8


def test_sensor_noise_has_the_configured_std_on_the_scene_only():
    surface = _surfaces(256, 1234)[2]
    diffs = []
    for seed in range(5):
        (clean, twin), (noisy, noisy_twin) = _scene_pair(_bar(), surface, seed, noise=3.0)
        assert np.array_equal(twin, noisy_twin)                       # the empty twin is the background model's
        unclipped = (clean > 15) & (clean < 240)
        diffs.append((noisy.astype(float) - clean)[unclipped])
    assert np.concatenate(diffs).std() == pytest.approx(3.0, rel=0.08)


def test_item_gain_darkens_the_item_and_not_the_surface():
    surface = _surfaces(256, 1234)[0]
    ratios = []
    for seed in range(5):
        (full, twin), (dim, dim_twin) = _scene_pair(_bar(), surface, seed, item_gain=(0.5, 0.5))
        assert np.array_equal(twin, dim_twin)
        item = np.abs(full.astype(int) - twin.astype(int)).max(2) > 40   # the pasted item (200 on the surface)
        interior = item & (full.min(2) >= 190)                           # fully the item: not its blended rim
        assert interior.sum() > 100
        ratios.append(np.median(dim[interior].astype(float) / full[interior]))
        away = cv2.dilate(item.astype(np.uint8), np.ones((5, 5), np.uint8), iterations=2) == 0
        assert away.sum() > 1000 and np.array_equal(full[away], dim[away])  # the surface beside it is as it was
    assert np.mean(ratios) == pytest.approx(0.5, abs=0.02)
