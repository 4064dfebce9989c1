"""Station-view validation (trainer.station_eval), review of 2026-12-07: an item larger than the ROI is cut around
its centre, every SceneConfig setting is checked by name, and ``found`` counts what the station's Localizer counts."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from agent.localize import Localizer, LocalizerSettings
from contract.preprocess import CropPolicy, InputSpec, read_image
from trainer.station_eval import SceneConfig, StationViewInputs, _placed_item, _surfaces, render_scene, station_views


@pytest.fixture(scope="module")
def images(fmnist_dir):
    paths = sorted((fmnist_dir / "test").glob("*/*.png"))[::40][:12]
    return paths, [read_image(p) for p in paths]


def _photo() -> np.ndarray:
    """A photo that fills its frame (no plain border): the whole image is the item."""
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _uncut(cfg: SceneConfig, seed: int) -> np.ndarray:
    """The alpha of the same draw at a ROI so large that nothing is cut (the item the same size in pixels)."""
    scale = cfg.roi / 3000
    big = SceneConfig(roi=3000, item_fraction=(cfg.item_fraction[0] * scale, cfg.item_fraction[1] * scale),
                      rotation=cfg.rotation)
    return _placed_item(_photo(), np.random.default_rng(seed), big)[1]


@pytest.mark.parametrize("fraction, rotation", [(0.77, 20.0), (1.0, 20.0), (1.0, 45.0)])
def test_an_item_whose_window_is_larger_than_the_roi_is_cut_around_its_centre(fraction, rotation):
    """The rotated item's window is the image diagonal: at item_fraction 0.77 (the default's upper end) it is 329 px
    for a 300 px ROI. It was cut to the ROI from its top-left corner: the item lost its right and bottom and its
    centre moved ~15 px towards them (at item_fraction 1.0, 35% of the item lost and its centre moved 44 px)."""
    cfg = SceneConfig(item_fraction=(fraction, fraction), rotation=rotation)
    for seed in range(5):
        item, alpha, top, left = _placed_item(_photo(), np.random.default_rng(seed), cfg)
        assert item.shape[:2] == alpha.shape == (cfg.roi, cfg.roi) and (top, left) == (0, 0)   # the whole ROI
        ys, xs = np.nonzero(alpha > 0.5)
        centre = (cfg.roi - 1) / 2
        assert math.hypot(xs.mean() - centre, ys.mean() - centre) < 2.5, seed       # the item stays centred
        uncut = _uncut(cfg, seed)
        side = uncut.shape[0]
        start = (side - cfg.roi) // 2                                              # the ROI around the centre
        inside = uncut[start : start + cfg.roi, start : start + cfg.roi].sum()
        assert alpha.sum() == pytest.approx(inside, rel=0.01)                      # all of it that the ROI holds
        if fraction < 0.78:
            assert alpha.sum() == pytest.approx(uncut.sum(), rel=0.002)           # all of it: the item fits


def test_an_item_smaller_than_the_roi_is_not_cut_and_lies_anywhere_inside():
    cfg = SceneConfig(item_fraction=(0.3, 0.3), rotation=20.0)
    corners = set()
    for seed in range(20):
        _, alpha, top, left = _placed_item(_photo(), np.random.default_rng(seed), cfg)
        assert alpha.sum() == pytest.approx(_uncut(cfg, seed).sum(), rel=0.002)
        assert top + alpha.shape[0] <= cfg.roi and left + alpha.shape[1] <= cfg.roi
        corners.add((top, left))
    assert len(corners) > 15


# --- SceneConfig: every setting checked, the error naming it --------------------------------------------------

BAD = [
    ("roi", 0), ("roi", -300), ("roi", 300.0), ("roi", True), ("roi", "300"),
    ("item_fraction", (0.0, 0.5)), ("item_fraction", (0.8, 0.6)), ("item_fraction", (0.5, 1.1)),
    ("item_fraction", (1.1, 1.1)), ("item_fraction", (math.nan, 0.7)), ("item_fraction", (0.5, math.inf)),
    ("item_fraction", 0.6), ("item_fraction", (0.5, 0.6, 0.7)), ("item_fraction", ("0.5", 0.7)),
    ("rotation", -1.0), ("rotation", 181.0), ("rotation", math.nan), ("rotation", None),
    ("gain", (-0.1, 1.0)), ("gain", (1.2, 0.8)), ("gain", (0.8, math.inf)), ("gain", (math.nan, 1.0)),
    ("gradient", -0.1), ("gradient", 1.5), ("gradient", math.inf),
    ("noise", -1.0), ("noise", 300.0), ("noise", math.nan),
    ("item_gain", (0.0, 1.0)), ("item_gain", (1.2, 0.8)), ("item_gain", (0.5, math.inf)),
    ("item_colour", -0.1), ("item_colour", 1.5), ("item_colour", math.nan),
    ("shadow", 1.5), ("shadow", -0.5), ("shadow", math.nan), ("blur", 2.0), ("blur", math.nan),
    ("shadow_offset", (-1.0, 4.0)), ("shadow_offset", (14.0, 4.0)), ("shadow_offset", (4.0, 1e9)),
    ("shadow_offset", (4.0, math.nan)),
    ("shadow_strength", (0.2, 1.5)), ("shadow_strength", (-0.2, 0.5)), ("shadow_strength", (0.5, 0.2)),
    ("shadow_softness", -1.0), ("shadow_softness", math.nan), ("shadow_softness", 1e9),
    ("blur_px", (0, 5)), ("blur_px", (15, 7)), ("blur_px", (7.0, 15.0)), ("blur_px", (7, 301)),
    ("jpeg_quality", (0, 90)), ("jpeg_quality", (90, 75)), ("jpeg_quality", (75, 101)), ("jpeg_quality", (75.0, 95.0)),
    ("jpeg_quality", (-1, 95)), ("jpeg_quality", 90),
    ("seed", -1), ("seed", 1.5), ("seed", None),
]


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_a_scene_setting_out_of_range_is_refused_naming_it(name, value):
    """Nothing was checked: a NaN gain rendered every scene as NaN, blur_px 0 divided by zero mid-export, an item
    fraction over 1 put an item larger than the ROI into it."""
    with pytest.raises(ValueError, match=rf"^SceneConfig\.{name}: expected .*got {re.escape(repr(value))}$"):
        SceneConfig(**{name: value})


@pytest.mark.parametrize("settings", [
    {}, {"seed": 4321}, {"gain": (0.0, 0.0), "noise": 0.0}, {"jpeg_quality": (0, 0)}, {"jpeg_quality": (20, 20)},
    {"shadow": 1.0, "blur": 0.0}, {"item_colour": 0.0, "item_gain": (1.0, 1.0)}, {"item_fraction": (1.0, 1.0)},
    {"roi": 64, "gradient": 0.0, "rotation": 0.0, "shadow_softness": 0.0, "blur_px": (1, 64)},
    {"roi": np.int64(300), "seed": np.int64(7), "item_fraction": [0.5, 0.6], "rotation": 180.0},
], ids=lambda s: ",".join(s) or "defaults")
def test_every_setting_the_export_tests_and_benchmarks_use_is_accepted(settings):
    cfg = SceneConfig(**settings)
    scene, empty = render_scene(_photo(), _surfaces(256, 1234)[0], np.random.default_rng(0), cfg)
    assert scene.shape == empty.shape == (int(cfg.roi), int(cfg.roi), 3)


# --- found: what the station's Localizer counts ----------------------------------------------------------------


@pytest.mark.parametrize("min_size", [16, 200, 301])
def test_found_counts_the_scenes_where_the_station_sees_an_item(images, min_size):
    """The station (agent.localize.Localizer) treats a box whose longer side is under the crop policy's min_size as
    no item; ``found`` (the manifest's ``item_found``) counted every box: with min_size 200 (boxes here are 186-270
    px) or 301 (over the 300 px ROI: no box reaches it) it reported 12 of 12 found where a station saw fewer or
    none."""
    paths, rgbs = images
    policy = CropPolicy("foreground", 0.1, min_size)
    cfg = SceneConfig()
    views = station_views(paths, list(range(len(paths))), InputSpec(32, 32, 32, crop=policy), cfg)
    rng, surfaces = np.random.default_rng(cfg.seed), _surfaces(256, cfg.seed)     # the same scenes, replayed
    present = 0
    for rgb in rgbs:
        scene, empty = render_scene(rgb, surfaces[rng.integers(len(surfaces))], rng, cfg)
        present += Localizer(LocalizerSettings(), policy, empty_scene=empty).update(scene).present
    assert views.found == present
    assert {16: views.found == len(paths), 200: 0 < views.found < len(paths), 301: views.found == 0}[min_size]
    stream = StationViewInputs(paths, list(range(len(paths))), InputSpec(32, 32, 32, crop=policy), cfg, chunk=5)
    list(stream.chunks())
    assert stream.found == views.found                                             # streamed: the same count
