"""Training augmentation on real Fashion-MNIST images: each effect of the station view and of the plain
path is checked by a measurement that fails when the effect is removed or becomes a no-op."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contract.preprocess import CropPolicy, ImageDecodeError
from trainer.augment import (
    AugmentConfig,
    BatchAugment,
    eval_spec,
    load_canvas,
    mask_path,
)
from trainer.config import TrainConfig
from trainer.station_view import (
    StationView,
    StationViewConfig,
    enclosed_holes,
    item_mask,
    mask_boxes,
)

SIDE = 48
SPEC = eval_spec(SIDE, SIDE, crop=CropPolicy(mode="foreground", margin=0.1))
# Every random effect off: geometry is exactly "item box fills 1/(1+2 margin), centred".
STILL = dict(rotation=0.0, scale_jitter=0.0, position_jitter=0.0, out_of_view=0.0, tilt=0.0, gain=(1.0, 1.0),
             white_balance=0.0, gradient=0.0, noise=0.0, blur=0.0, jpeg=0.0, item_colour=0.0, item_gain=(1.0, 1.0),
             fill_holes=0.0, shadow=0.0)


@pytest.fixture(scope="module")
def canvas(fmnist_dir) -> torch.Tensor:
    """64 real Fashion-MNIST training images as float canvases (0..1), several of each class."""
    paths = sorted((fmnist_dir / "train").rglob("*.png"))[::15][:64]
    return torch.from_numpy(np.stack([load_canvas(p, SPEC) for p in paths])).float() / 255


def station(spec=SPEC, hflip: float = 0.0, seed: int = 0, **overrides) -> StationView:
    return StationView(StationViewConfig(**{**STILL, **overrides}), spec, torch.Generator().manual_seed(seed), hflip)


def boxes_of(alpha: torch.Tensor) -> torch.Tensor:
    """(x0, y0, x1, y1) in pixels of alpha > 0.5."""
    return (mask_boxes(alpha) + 1) * alpha.shape[-1] / 2


def axis_angle(alpha: torch.Tensor) -> torch.Tensor:
    """Principal-axis angle (radians, x right / y down) and elongation of each mask."""
    n, _, h, w = alpha.shape
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    m = alpha[:, 0]
    total = m.sum((1, 2))
    cx, cy = (m * xs).sum((1, 2)) / total, (m * ys).sum((1, 2)) / total
    dx, dy = xs - cx.view(n, 1, 1), ys - cy.view(n, 1, 1)
    mu20, mu02, mu11 = (m * dx * dx).sum((1, 2)), (m * dy * dy).sum((1, 2)), (m * dx * dy).sum((1, 2))
    angle = 0.5 * torch.atan2(2 * mu11, mu20 - mu02)
    spread = torch.sqrt((mu20 - mu02) ** 2 + 4 * mu11**2) / (mu20 + mu02)
    return angle, spread


def wrapped_degrees(a: torch.Tensor) -> torch.Tensor:
    """Axis angles are defined modulo 180 degrees."""
    return (torch.rad2deg(a) + 90) % 180 - 90


def hf_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference from a 3x3 local mean: sensor noise raises it, blur lowers it."""
    return ((x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)) ** 2).mean((1, 2, 3))


# --- station view: mask, background, geometry ------------------------------------------------------


def test_mask_comes_from_the_plain_border_of_the_image(canvas):
    mask = item_mask(canvas)
    gray = canvas[:, :3].amax(1, keepdim=True)
    assert (mask[gray > 0.3] > 0.99).float().mean() > 0.99  # the garment is opaque
    assert mask[:, :, 0, 0].max() == 0 and mask[:, :, -1, -1].max() == 0  # the black corners are not
    assert 0.2 < mask.mean() < 0.9
    photo = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))  # no plain border
    assert (item_mask(photo) == 1).all() and (item_mask(canvas[:2], "paste") == 1).all()


def test_mask_file_beside_an_image_is_its_mask(fmnist_dir, tmp_path):
    import cv2

    image = sorted((fmnist_dir / "train").rglob("*.png"))[0]
    photo = tmp_path / "item.png"
    cv2.imwrite(str(photo), np.full((40, 60, 3), 128, np.uint8))
    painted = np.zeros((40, 60), np.uint8)
    painted[10:30, 20:40] = 255
    cv2.imwrite(str(mask_path(photo)), painted)
    with_mask = torch.from_numpy(load_canvas(photo, SPEC, with_mask=True)).float()[None] / 255
    mask = item_mask(with_mask)
    assert with_mask.shape[1] == 4 and 0.2 < mask.mean() < 0.35  # the painted box, not the flat photo
    without = torch.from_numpy(load_canvas(image, SPEC, with_mask=True))
    assert without[3].max() == 0  # no file: zeros, and the border rule decides


def test_background_texture_fills_outside_the_item(canvas):
    view, alpha = station().render(canvas, station().sample(len(canvas)))
    outside = (alpha < 0.01).expand_as(view)
    pixels = view[outside]
    assert outside.float().mean() > 0.2
    assert (view.amax(1, keepdim=True)[alpha < 0.01] < 0.03).float().mean() < 0.02  # not the image's black
    per_image = [view[i][outside[i]].std() for i in range(len(view)) if outside[i].any()]
    assert torch.tensor(per_image).median() > 0.01 and pixels.std() > 0.05  # textured, and surfaces differ


def test_item_box_fills_the_crop_by_the_margin_with_jitter(canvas):
    for margin in (0.1, 0.25):
        spec = eval_spec(SIDE, SIDE, crop=CropPolicy(mode="foreground", margin=margin))
        sv = station(spec, scale_jitter=0.15, position_jitter=0.04)
        _, alpha = sv.render(canvas, sv.sample(len(canvas)))
        b = boxes_of(alpha)
        longer = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) / SIDE
        centre = (b[:, :2] + b[:, 2:]) / 2 / SIDE - 0.5
        assert abs(longer.mean().item() - 1 / (1 + 2 * margin)) < 0.04
        assert longer.std() > 0.03 and centre.std() > 0.01  # the station's box is not exact
        assert centre.abs().max() < 0.08


def test_rotation_turns_the_item_by_the_drawn_angle(canvas):
    sv = station(rotation=20.0)
    p = sv.sample(len(canvas))
    p["sv_angle"] = torch.full((len(canvas),), math.radians(15.0))
    _, turned = sv.render(canvas, p)
    _, upright = sv.render(canvas, {**p, "sv_angle": torch.zeros(len(canvas))})
    a1, spread = axis_angle(turned)
    a0, _ = axis_angle(upright)
    elongated = spread > 0.3
    assert elongated.sum() >= 10
    assert (wrapped_degrees(a1 - a0)[elongated] - 15.0).abs().median() < 3.0
    drawn = torch.rad2deg(sv.sample(500)["sv_angle"])
    assert drawn.abs().max() <= 20.0 and drawn.abs().max() > 18.0  # default range +-20


def test_perspective_tilt_makes_a_square_a_trapezoid():
    square = torch.zeros(1, 3, SIDE, SIDE)
    square[..., 12:36, 12:36] = 1.0
    sv = station(tilt=0.12)
    p = sv.sample(1)
    for tilt, expect_ratio in ((0.12, 1.2), (0.0, 1.0)):
        p.update(sv_tilt_x=torch.zeros(1), sv_tilt_y=torch.full((1,), tilt))
        _, alpha = sv.render(square, p)
        rows = (alpha[0, 0] > 0.5).sum(1)
        filled = rows.nonzero().squeeze(1)
        top, bottom = rows[filled[2]].item(), rows[filled[-3]].item()
        assert top / bottom == pytest.approx(expect_ratio, abs=0.08)


def test_out_of_view_puts_part_of_the_item_outside_the_crop(canvas):
    def touching(share_out: float) -> torch.Tensor:
        sv = station(out_of_view=share_out, scale_jitter=0.15, position_jitter=0.04, rotation=20.0)
        _, alpha = sv.render(canvas, sv.sample(len(canvas)))
        on = alpha[:, 0] > 0.5
        return on[:, 0].any(1) | on[:, -1].any(1) | on[:, :, 0].any(1) | on[:, :, -1].any(1)

    assert touching(1.0).all()
    assert touching(0.0).float().mean() < 0.3



def forced(p: dict, n: int, **values) -> dict:
    """``p`` with some draws set to one value for every image (bool for flags, float for amounts)."""
    out = dict(p)
    for key, value in values.items():
        out[key] = torch.full((n,), value, dtype=torch.bool if isinstance(value, bool) else torch.float32)
    return out


def test_drop_shadow_darkens_the_surface_on_the_side_it_falls(canvas):
    sv = station(shadow=1.0, shadow_in_box=0.0)
    n = len(canvas)
    p = forced(sv.sample(n), n, sv_shadow_strength=0.5, sv_shadow_len=14.0, sv_shadow_dir=0.0)  # falls to +x
    lit, alpha = sv.render(canvas, forced(p, n, sv_shadow=False))
    shaded, alpha_shaded = sv.render(canvas, p)
    assert torch.equal(alpha, alpha_shaded)                       # the item itself does not move
    surface = (alpha < 0.01).expand_as(lit)
    darker = (lit - shaded).clamp(min=0) * surface
    assert ((shaded - lit) * surface).max() <= 1e-6                # a shadow never lightens
    # Beside the item, on the +x side (pixels whose left neighbour 2 px away is the item), the surface
    # darkens; on the -x side it does not (or much less).
    right = (F.pad(alpha, (2, 0))[..., :-2] > 0.5) & (alpha < 0.01)
    left = (F.pad(alpha, (0, 2))[..., 2:] > 0.5) & (alpha < 0.01)
    drop_right = darker.mean(1, keepdim=True)[right].mean()
    drop_left = darker.mean(1, keepdim=True)[left].mean()
    assert drop_right > 0.05 and drop_right > 3 * drop_left


def test_a_shadow_in_the_station_box_puts_the_item_off_centre_and_smaller(canvas):
    sv = station(shadow=1.0)
    n = len(canvas)
    p = forced(sv.sample(n), n, sv_shadow_len=14.0, sv_shadow_dir=0.0)
    _, own = sv.render(canvas, forced(p, n, sv_shadow_in_box=False))
    _, boxed = sv.render(canvas, forced(p, n, sv_shadow_in_box=True))
    a, b = boxes_of(own), boxes_of(boxed)
    shift = ((b[:, 0] + b[:, 2]) - (a[:, 0] + a[:, 2])) / 2
    offset_px = 14.0 / 250 * SIDE                                  # the shadow's offset at the model's scale
    assert shift.median() == pytest.approx(-offset_px / 2, abs=0.5)  # the union box is centred, not the item
    width = lambda box: box[:, 2] - box[:, 0]                      # noqa: E731
    grown = width(b) - width(a)                                    # whole pixels: +-1 is rounding
    assert grown.max() <= 1 and (grown <= -2).float().mean() > 0.3 and grown.mean() < -1


def test_filled_holes_show_the_image_inside_the_item_instead_of_the_surface():
    ring = torch.zeros(1, 3, SIDE, SIDE)
    ring[:, :, 10:38, 10:38] = 0.8
    ring[:, :, 18:30, 18:30] = 0.0                                 # a dark hole the border rule leaves out
    mask = item_mask(ring)
    assert mask[0, 0, 24, 24] == 0 and enclosed_holes(mask)[0, 0, 24, 24] == 1
    assert enclosed_holes(mask)[0, 0, 2, 2] == 0 and enclosed_holes(mask).sum() == 12 * 12
    sv = station(fill_holes=1.0)
    p = sv.sample(1)
    open_view, open_alpha = sv.render(ring, forced(p, 1, sv_fill_holes=False))
    filled_view, filled_alpha = sv.render(ring, p)
    centre = (slice(None), slice(None), slice(20, 28), slice(20, 28))
    assert open_alpha[centre].max() < 0.01 and filled_alpha[centre].min() > 0.99
    assert filled_view[centre].max() < 0.02 < open_view[centre].mean()  # the image's black, not the surface


def test_item_gain_changes_the_item_alone(canvas):
    sv = station(item_gain=(0.6, 1.2))
    n = len(canvas)
    p = sv.sample(n)
    assert p["sv_item_gain"].min() >= 0.6 and p["sv_item_gain"].max() <= 1.2 and p["sv_item_gain"].std() > 0.05
    base, alpha = sv.render(canvas, forced(p, n, sv_item_gain=1.0))
    dim, _ = sv.render(canvas, forced(p, n, sv_item_gain=0.6))
    item = (alpha > 0.99).expand_as(base)
    surface = (alpha < 0.01).expand_as(base)
    torch.testing.assert_close(dim[item], base[item] * 0.6, atol=0.005, rtol=0)  # alpha > 0.99: 1% is surface
    torch.testing.assert_close(dim[surface], base[surface], atol=0.001, rtol=0)  # alpha < 0.01: 1% is item

# --- station view: light, noise, blur, JPEG --------------------------------------------------------


def test_gain_and_gradient_light_the_view():
    sv = station()
    gray = torch.full((4, 3, SIDE, SIDE), 0.4)
    p = sv.sample(4)
    p.update(sv_gain=torch.tensor([1.0, 1.3, 1.0, 1.0]), sv_wb=torch.ones(4, 3),
             sv_grad=torch.tensor([0.0, 0.0, 0.3, 0.3]), sv_grad_dir=torch.tensor([0.0, 0.0, 0.0, math.pi]))
    lit = sv.light(gray.clone(), p)
    assert lit[0].mean() == pytest.approx(0.4, abs=1e-4) and lit[1].mean() == pytest.approx(0.52, abs=1e-3)
    half = SIDE // 2
    left_right = lit[:, :, :, half:].mean((1, 2, 3)) - lit[:, :, :, :half].mean((1, 2, 3))
    assert left_right[2] > 0.05 and left_right[3] < -0.05 and left_right[0].abs() < 1e-4


def test_item_colour_tints_the_grey_item_and_not_the_background(canvas):
    grey, tinted = station(seed=3), station(seed=3, item_colour=0.3)
    p = tinted.sample(len(canvas))
    assert (p["sv_colour"].mean(1) - 1).abs().max() < 1e-5 and p["sv_colour"].std(1).max() > 0.05
    plain_view, alpha = grey.render(canvas, {**p, "sv_colour": torch.ones(len(canvas), 3)})
    colour_view, _ = tinted.render(canvas, p)
    item = (alpha > 0.99).expand(-1, 3, -1, -1)
    spread = lambda v: (v.amax(1, keepdim=True) - v.amin(1, keepdim=True)).expand(-1, 3, -1, -1)[item]  # noqa: E731
    assert spread(plain_view).max() < 0.02                        # a grey garment stays grey without it (edges: 1%
    #                                                               of the surface shows through at alpha 0.99)
    assert spread(colour_view).mean() > 0.05                      # and takes a colour with it
    outside = (alpha < 0.01).expand(-1, 3, -1, -1)
    assert torch.allclose(plain_view[outside], colour_view[outside], atol=0.01)  # the surface is not tinted


def test_noise_raises_and_blur_lowers_high_frequency_energy(canvas):
    sv = station(noise=0.1, blur=1.0)
    p = sv.sample(len(canvas))
    clean = {**p, "sv_noise_std": torch.zeros(len(canvas)), "sv_blur": torch.zeros(len(canvas), dtype=torch.bool)}
    base = hf_energy(sv(canvas, clean))
    noisy = hf_energy(sv(canvas, {**clean, "sv_noise_std": torch.full((len(canvas),), 0.1)}))
    assert (noisy > base).all()
    for motion in (True, False):
        blurred = {**clean, "sv_blur": torch.ones(len(canvas), dtype=torch.bool), "sv_blur_amount": torch.ones(len(canvas)),
                   "sv_blur_motion": torch.full((len(canvas),), motion)}
        assert (hf_energy(sv(canvas, blurred)) < 0.8 * base).float().mean() > 0.9


def test_jpeg_recompression_changes_the_view_a_little(canvas):
    sv = station()
    view, _ = sv.render(canvas[:16], sv.sample(16))
    errors = {}
    for quality in (20, 90):
        out = sv.jpeg(view, torch.full((16,), quality))
        assert out.shape == view.shape
        errors[quality] = (out - view).abs().mean().item()
        psnr = -10 * math.log10(((out - view) ** 2).mean().item())
        assert psnr > 24.0
    assert errors[20] > errors[90] > 0.002


# --- station view: every draw follows its setting (4,000 draws, fixed seed) ---------------------------

N_DRAWS = 4000
DRAW_SPEC = eval_spec(16, 16, crop=CropPolicy(mode="foreground", margin=0.1))  # the draws do not depend on size
# Every setting away from its default, so a draw that ignores its setting (a constant, a default) shows.
CUSTOM = dict(rotation=35.0, scale_jitter=0.3, position_jitter=0.1, out_of_view=0.4, out_of_view_fraction=(0.2, 0.5),
              tilt=0.05, gain=(0.8, 1.1), white_balance=0.15, item_colour=0.5, item_gain=(0.5, 0.9), fill_holes=0.2,
              shadow=0.7, shadow_strength=(0.1, 0.3), shadow_offset_px=30.0, shadow_in_box=0.25, gradient=0.1,
              noise=0.03, blur=0.6, jpeg=0.7, jpeg_quality=(30, 60), tiles_per_kind=3)


def assert_uniform(x: torch.Tensor, low: float, high: float, what: str) -> None:
    """``x`` (thousands of draws) fills [low, high] evenly: in range, reaching both ends, mean and std of a uniform."""
    x, span = x.double().flatten(), high - low
    assert x.min() >= low - 1e-6 and x.max() <= high + 1e-6, (what, x.min().item(), x.max().item(), low, high)
    assert x.min() < low + 0.02 * span and x.max() > high - 0.02 * span, (what, "does not fill its range")
    assert abs(x.mean().item() - (low + high) / 2) < 0.05 * span, (what, x.mean().item(), (low + high) / 2)
    assert abs(x.std().item() - span / math.sqrt(12)) < 0.05 * span, (what, x.std().item(), span / math.sqrt(12))


def assert_rate(flags: torch.Tensor, p: float, what: str) -> None:
    assert abs(flags.float().mean().item() - p) < 0.05, (what, flags.float().mean().item(), p)


@pytest.mark.parametrize("settings, hflip", [({}, 0.5), (CUSTOM, 0.2)], ids=["defaults", "custom"])
def test_every_station_view_draw_follows_its_setting(settings, hflip):
    cfg = StationViewConfig(**settings)
    sv = StationView(cfg, DRAW_SPEC, torch.Generator().manual_seed(11), hflip)
    p = sv.sample(N_DRAWS)
    assert all(len(v) == N_DRAWS for v in p.values())
    # geometry: box factor (log-uniform), shift, rotation, flip, tilt, out of view
    log_j = math.log(1 + cfg.scale_jitter)
    assert_uniform(torch.log(p["sv_scale"]), -log_j, log_j, "scale_jitter")
    for key in ("sv_dx", "sv_dy"):
        assert_uniform(p[key], -cfg.position_jitter, cfg.position_jitter, key)
    assert_uniform(torch.rad2deg(p["sv_angle"]), -cfg.rotation, cfg.rotation, "rotation")
    assert set(p["sv_flip"].tolist()) <= {-1.0, 1.0}
    assert_rate(p["sv_flip"] < 0, hflip, "hflip")
    assert_uniform(p["sv_tilt_x"], -cfg.tilt, cfg.tilt, "tilt x")
    assert_uniform(p["sv_tilt_y"], -cfg.tilt, cfg.tilt, "tilt y")
    assert_rate(p["sv_out"], cfg.out_of_view, "out_of_view")
    assert_rate(p["sv_out_axis"], 0.5, "out-of-view axis")
    assert_rate(p["sv_out_sign"] < 0, 0.5, "out-of-view side")
    assert_uniform(p["sv_out_frac"], *cfg.out_of_view_fraction, "out_of_view_fraction")
    # the background window: zoom, angle and centre
    assert_uniform(p["sv_bg_zoom"], 0.35, 0.6, "background zoom")
    assert_uniform(p["sv_bg_angle"], 0, 2 * math.pi, "background angle")
    assert_uniform(p["sv_bg_cx"], -0.3, 0.3, "background x")
    assert_uniform(p["sv_bg_cy"], -0.3, 0.3, "background y")
    # light: gain (log-uniform), white balance per channel (independent), gradient
    assert_uniform(torch.log(p["sv_gain"]), math.log(cfg.gain[0]), math.log(cfg.gain[1]), "gain")
    for ch in range(3):
        assert_uniform(p["sv_wb"][:, ch], 1 - cfg.white_balance, 1 + cfg.white_balance, f"white balance {ch}")
    corr = torch.corrcoef(p["sv_wb"].T)
    assert (corr - torch.eye(3)).abs().max() < 0.1                      # each channel its own gain
    assert_uniform(p["sv_grad"], 0, cfg.gradient, "gradient")
    assert_uniform(p["sv_grad_dir"], 0, 2 * math.pi, "gradient direction")
    # the item: colour (a hue at saturation 0..item_colour, brightness kept), brightness (log-uniform), holes
    colour = p["sv_colour"]
    assert (colour.mean(1) - 1).abs().max() < 1e-5
    assert_uniform(torch.sqrt(((colour - 1) ** 2).sum(1) / 1.5), 0, cfg.item_colour, "item_colour")
    assert_uniform(torch.log(p["sv_item_gain"]), math.log(cfg.item_gain[0]), math.log(cfg.item_gain[1]), "item_gain")
    assert_rate(p["sv_fill_holes"], cfg.fill_holes, "fill_holes")
    # shadow
    assert_rate(p["sv_shadow"], cfg.shadow, "shadow")
    assert_rate(p["sv_shadow_in_box"], cfg.shadow_in_box, "shadow_in_box")
    assert_uniform(p["sv_shadow_strength"], *cfg.shadow_strength, "shadow_strength")
    assert_uniform(p["sv_shadow_len"], 0.3 * cfg.shadow_offset_px, cfg.shadow_offset_px, "shadow_offset_px")
    assert_uniform(p["sv_shadow_dir"], 0, 2 * math.pi, "shadow direction")
    # noise, blur, JPEG
    assert_uniform(p["sv_noise_std"], 0, cfg.noise, "noise")
    assert abs(p["sv_noise"].mean().item()) < 0.01 and abs(p["sv_noise"].std().item() - 1) < 0.01
    assert_rate(p["sv_blur"], cfg.blur, "blur")
    assert_rate(p["sv_blur_motion"], 0.5, "motion or defocus")
    assert_uniform(p["sv_blur_amount"], 0.3, 1.0, "blur amount")
    assert_uniform(p["sv_blur_angle"], 0, math.pi, "blur angle")
    assert_rate(p["sv_jpeg"], cfg.jpeg, "jpeg")
    quality = p["sv_jpeg_quality"]
    lo, hi = cfg.jpeg_quality
    assert quality.min() == lo and quality.max() == hi                  # inclusive at both ends
    assert_uniform(quality.float(), lo - 0.5, hi + 0.5, "jpeg_quality")  # integers: uniform over lo-0.5..hi+0.5
    # surfaces: every procedural tile, about equally often
    counts = torch.bincount(p["sv_tile"], minlength=sv.n_tiles)
    assert len(counts) == sv.n_tiles == 4 * cfg.tiles_per_kind
    assert (counts - N_DRAWS / sv.n_tiles).abs().max() < 0.4 * N_DRAWS / sv.n_tiles, counts.tolist()


def test_the_plain_paths_hflip_is_the_station_views_flip():
    for hflip in (0.0, 0.3, 1.0):
        cfg = AugmentConfig(hflip=hflip, station_view=StationViewConfig())
        p = BatchAugment(cfg, DRAW_SPEC, torch.Generator().manual_seed(2)).sample(N_DRAWS)
        assert_rate(p["sv_flip"] < 0, hflip, "hflip")


def test_a_backgrounds_folder_is_drawn_in_its_share_of_views(tmp_path):
    import cv2

    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((40, 60, 3), 60 * (i + 1), np.uint8))
    for share in (0.3, 0.8):
        sv = StationView(StationViewConfig(backgrounds=str(folder), folder_share=share, tiles_per_kind=2), DRAW_SPEC,
                         torch.Generator().manual_seed(4))
        tile = sv.sample(N_DRAWS)["sv_tile"]
        own = tile >= sv.n_procedural
        assert sv.n_folder > 1 and sv.n_procedural == 8
        assert_rate(own, share, "folder_share")
        assert (torch.bincount(tile[own] - sv.n_procedural, minlength=sv.n_folder) > 0).all()   # every crop is used
        assert (torch.bincount(tile[~own], minlength=sv.n_procedural) > 0).all()


# --- station view: each drawn effect changes the rendered view (with and without it) -------------------


def rendered(sv: StationView, canvas: torch.Tensor, p: dict, **values) -> torch.Tensor:
    """The full render (``StationView.__call__``) with some draws set to one value for every image."""
    return sv(canvas, forced(p, len(canvas), **values))


def test_light_gain_and_white_balance_reach_the_rendered_view(canvas):
    sv = station()
    p = sv.sample(len(canvas))
    base = rendered(sv, canvas, p)
    unclipped = base < 0.7                                            # 1.3 x 0.7 stays under the clip at 1
    gained = rendered(sv, canvas, p, sv_gain=1.3)
    torch.testing.assert_close(gained[unclipped], 1.3 * base[unclipped], atol=2e-3, rtol=0)
    assert gained.mean() > 1.15 * base.mean()
    tinted = sv(canvas, {**p, "sv_wb": torch.tensor([1.1, 1.0, 0.9]).expand(len(canvas), 3)})
    for ch, factor in enumerate((1.1, 1.0, 0.9)):
        pixels = unclipped[:, ch]
        torch.testing.assert_close(tinted[:, ch][pixels], factor * base[:, ch][pixels], atol=2e-3, rtol=0)
    ratio = lambda v: v[:, 0].mean() / v[:, 2].mean()                  # noqa: E731
    assert ratio(tinted) > 1.15 * ratio(base)                          # red over blue: 1.1 / 0.9 = 1.22
    graded = rendered(sv, canvas, p, sv_grad=0.3, sv_grad_dir=0.0)   # brighter to the right
    half = SIDE // 2
    gain = graded.mean((0, 1, 2)) / base.mean((0, 1, 2))             # per column
    assert gain[half:].mean() > 1.1 and gain[:half].mean() < 0.9


def test_jpeg_recompression_runs_in_the_render_on_its_rows_only(canvas):
    sv = station(jpeg=1.0)
    n = len(canvas)
    p = forced(sv.sample(n), n, sv_blur=False, sv_noise_std=0.0)
    clean = rendered(sv, canvas, p, sv_jpeg=False)
    coded = sv(canvas, {**p, "sv_jpeg": torch.arange(n) % 2 == 0, "sv_jpeg_quality": torch.full((n,), 30)})
    change = (coded - clean).abs().mean((1, 2, 3))
    assert (change[::2] > 0.003).all() and (change[1::2] == 0).all()
    psnr = -10 * torch.log10(((coded[::2] - clean[::2]) ** 2).mean())
    assert psnr > 22                                                  # a re-compression, not another image


def test_station_flip_mirrors_the_item():
    ell = torch.zeros(1, 3, SIDE, SIDE)
    ell[..., 10:38, 12:20] = 0.8                                       # an L: not its own mirror image
    ell[..., 30:38, 12:36] = 0.8
    sv = station(hflip=0.5)
    p = sv.sample(1)
    _, upright = sv.render(ell, forced(p, 1, sv_flip=1.0))
    _, mirrored = sv.render(ell, forced(p, 1, sv_flip=-1.0))
    iou = lambda a, b: ((a > 0.5) & (b > 0.5)).sum().item() / ((a > 0.5) | (b > 0.5)).sum().item()  # noqa: E731
    assert iou(mirrored.flip(-1), upright) > 0.95                      # the mirror image, centred as before
    assert iou(mirrored, upright) < 0.6


def test_out_of_view_fraction_is_the_share_of_the_item_outside_the_crop():
    square = torch.zeros(1, 3, SIDE, SIDE)
    square[..., 12:36, 12:36] = 0.8
    sv = station()
    p = forced(sv.sample(1), 1, sv_out_axis=True, sv_out_sign=1.0)

    def visible_width(**values) -> float:
        _, alpha = sv.render(square, forced(p, 1, **values))
        return (alpha[0, 0] > 0.5).any(0).sum().item()

    whole = visible_width(sv_out=False)
    assert whole == pytest.approx(SIDE / 1.2, abs=1.5)                # the box fills 1/(1+2 margin)
    for frac in (0.1, 0.35):
        assert visible_width(sv_out=True, sv_out_frac=frac) / whole == pytest.approx(1 - frac, abs=0.05)


def test_background_window_draws_move_the_surface_not_the_item(canvas):
    sv = station()
    n = len(canvas)
    p = sv.sample(n)
    base, alpha = sv.render(canvas, p)
    item, surface = (alpha > 0.99).expand_as(base), (alpha < 0.01).expand_as(base)
    for key, value in (("sv_bg_zoom", 0.6), ("sv_bg_angle", 1.0), ("sv_bg_cx", 0.3), ("sv_bg_cy", -0.3)):
        moved, _ = sv.render(canvas, {**p, key: p[key] * 0 + value})
        torch.testing.assert_close(moved[item], base[item], atol=0.01, rtol=0, msg=key)  # alpha > 0.99: 1% surface
        assert (moved - base).abs()[surface].mean() > 0.02, key


def test_sensor_noise_has_the_drawn_std_scaled_to_the_model_input(canvas):
    sv = station(noise=0.1)
    n = len(canvas)
    p = sv.sample(n)
    clean = rendered(sv, canvas, p, sv_noise_std=0.0)
    noisy = rendered(sv, canvas, p, sv_noise_std=0.1)
    unclipped = (clean > 0.1) & (clean < 0.9)
    expected = 0.1 * SIDE / 250                                        # std at camera resolution, averaged down
    assert (noisy - clean)[unclipped].std().item() == pytest.approx(expected, rel=0.05)


def test_supersample_renders_at_a_multiple_of_the_canvas_and_area_downsamples(canvas):
    fine, plain_sv = station(supersample=2.0), station()
    assert (fine.render_side, plain_sv.render_side, station(supersample=8.0).render_side) == (2 * SIDE, SIDE, 256)
    n = len(canvas)
    p = fine.sample(n)
    view, alpha = fine.render(canvas, p)
    assert view.shape[-1] == alpha.shape[-1] == 2 * SIDE
    out = fine(canvas, p)
    assert out.shape[-1] == SIDE
    torch.testing.assert_close(out, F.interpolate(fine.light(view, p), size=(SIDE, SIDE), mode="area"), atol=1e-5,
                               rtol=0)
    # the edges are anti-aliased: more pixels of the item's rim lie between the surface and the item
    _, coarse = plain_sv.render(canvas, p)
    rim = lambda a: ((a > 0.05) & (a < 0.95)).float().mean()           # noqa: E731
    assert rim(F.interpolate(alpha, size=(SIDE, SIDE), mode="area")) > 1.2 * rim(coarse)   # seen: 1.4

# --- station view: backgrounds folder, share, shards -------------------------------------------------


def test_backgrounds_folder_pixels_appear_and_a_bad_file_is_named(canvas, tmp_path):
    import cv2

    folder = tmp_path / "empty-scenes"
    folder.mkdir()
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[...] = (250, 20, 240)  # BGR: magenta-ish, no procedural surface has it
    frame[::7] = (200, 10, 190)
    cv2.imwrite(str(folder / "a.png"), frame)
    cv2.imwrite(str(folder / "b.jpg"), frame)
    sv = station(backgrounds=str(folder), folder_share=1.0)
    view, alpha = sv.render(canvas[:8], sv.sample(8))
    outside = view.permute(1, 0, 2, 3)[:, (alpha[:, 0] < 0.01)]
    assert outside[0].mean() > 0.7 and outside[1].mean() < 0.15 and outside[2].mean() > 0.7

    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        station(backgrounds=str(folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .* images"):
        station(backgrounds=str(empty))


def test_a_backgrounds_folder_of_many_cameras_gives_crops_of_every_camera_not_the_first_ones(tmp_path):
    # given: an exported backgrounds folder (<site>/<station>/<camera>/<id>.jpg) with more frames than the reader
    # takes: 40 from each of three cameras, each camera's surface one flat colour
    import cv2

    from trainer.backgrounds import folder_tiles

    colours = {"cam-a": (200, 30, 30), "cam-b": (30, 200, 30), "cam-c": (30, 30, 200)}
    for camera, bgr in colours.items():
        folder = tmp_path / "bg" / "ber1" / "dock" / camera
        folder.mkdir(parents=True)
        for i in range(40):
            cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((48, 64, 3), bgr, np.uint8))
    # when: the trainer reads at most 64 of the 120
    tiles = folder_tiles(tmp_path / "bg", side=16, per_file=1, seed=0, limit=64)
    # then: 64 crops, from all three cameras in about equal shares (sorted by path, the first 64 are cam-a and cam-b)
    assert len(tiles) == 64
    rgb = {camera: np.array(bgr[::-1]) for camera, bgr in colours.items()}
    means = tiles.reshape(len(tiles), 3, -1).mean(2)
    counts = {camera: int((np.abs(means - c).max(1) < 5).sum()) for camera, c in rgb.items()}
    assert sum(counts.values()) == 64 and min(counts.values()) >= 12, counts


def test_station_view_share_routes_images_between_the_two_paths(canvas):
    u8 = (canvas * 255).round().byte()
    for share in (0.0, 0.5, 1.0):
        gen = torch.Generator().manual_seed(3)
        aug = BatchAugment(AugmentConfig(station_view=StationViewConfig(share=share)), SPEC, gen)
        state = gen.get_state()
        out = aug(u8)
        gen.set_state(state)
        p = aug.sample(len(u8))
        chosen = p["station"]
        assert chosen.float().mean().item() == pytest.approx(share, abs=0.15)
        expected = torch.empty_like(out)
        for rows, path in ((~chosen).nonzero().squeeze(1), aug.plain), (chosen.nonzero().squeeze(1), aug.station):
            if len(rows):
                expected[rows] = path(canvas[rows], {k: v[rows] for k, v in p.items()})
        mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
        torch.testing.assert_close(out, (expected - mean) / std, atol=1e-4, rtol=0)


def test_rows_already_a_station_view_take_the_plain_path_whatever_their_draw(canvas):
    """A station's frame (Sample.as_seen) is trained as it is: with every row drawn for a station view, the rows
    marked as seen come out of the plain path with their own draws, the others as station views, and a batch
    with no row marked is augmented exactly as without the argument."""
    u8 = (canvas[:16] * 255).round().byte()
    seen = torch.arange(16) % 3 == 0
    gen = torch.Generator().manual_seed(7)
    aug = BatchAugment(AugmentConfig(station_view=StationViewConfig(share=1.0, jpeg=0.0)), SPEC, gen)
    state = gen.get_state()
    out = aug(u8, as_seen=seen)
    gen.set_state(state)
    p = aug.sample(16)
    assert bool(p["station"].all())                                   # every row drew the station path
    mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
    for rows, path in ((seen.nonzero().squeeze(1), aug.plain), ((~seen).nonzero().squeeze(1), aug.station)):
        expected = path(canvas[rows], {k: v[rows] for k, v in p.items()})
        torch.testing.assert_close(out[rows], (expected - mean) / std, atol=1e-4, rtol=0)
    gen.set_state(state)
    unmarked = aug(u8, as_seen=torch.zeros(16, dtype=torch.bool))
    gen.set_state(state)
    torch.testing.assert_close(unmarked, aug(u8), atol=0, rtol=0)
    assert (unmarked[seen] - out[seen]).abs().amax() > 0.5            # the marked rows did change path


def test_every_shard_renders_its_rows_exactly_as_the_whole_batch(canvas):
    u8 = (canvas[:32] * 255).round().byte()
    cfg = AugmentConfig(station_view=StationViewConfig(jpeg=0.0))  # libjpeg is exact too, but keep it quick
    whole = BatchAugment(cfg, SPEC, torch.Generator().manual_seed(5))(u8)
    for rank in range(2):
        part = BatchAugment(cfg, SPEC, torch.Generator().manual_seed(5))(u8[rank::2], shard=(rank, 2), total=32)
        torch.testing.assert_close(part, whole[rank::2], atol=1e-5, rtol=0)


# --- the plain path: rotation, colour jitter, random erasing -----------------------------------------

PLAIN_STILL = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, rotation=0.0, brightness=0.0, contrast=0.0,
                   saturation=0.0)


def plain(canvas: torch.Tensor, **overrides) -> tuple[torch.Tensor, dict]:
    aug = BatchAugment(AugmentConfig(**{**PLAIN_STILL, **overrides}), SPEC, torch.Generator().manual_seed(0))
    gen_state = aug.generator.get_state()
    p = aug.sample(len(canvas))
    aug.generator.set_state(gen_state)
    x = aug((canvas * 255).round().byte())
    mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
    return x * std + mean, p


def test_plain_rotation_turns_the_image_by_the_drawn_angle(canvas):
    turned, p = plain(canvas, rotation=30.0)
    upright, _ = plain(canvas)
    drawn = torch.rad2deg(torch.atan2(p["theta"][:, 1, 0], p["theta"][:, 0, 0]))
    a1, spread = axis_angle(item_mask(turned))
    a0, _ = axis_angle(item_mask(upright))
    usable = (spread > 0.3) & (drawn.abs() > 8)
    assert usable.sum() >= 8
    # theta maps output to input, so the content turns by minus the drawn angle
    assert (wrapped_degrees(a1 - a0)[usable] + drawn[usable]).abs().median() < 3.0


def test_plain_colour_jitter_scales_brightness_per_image(canvas):
    still, _ = plain(canvas)
    jittered, p = plain(canvas, brightness=0.4)
    ratio = jittered.sum((1, 2, 3)) / still.sum((1, 2, 3))
    assert p["brightness"].std() > 0.1
    dim = p["brightness"] < 1  # no clipping at 1.0 when darkening
    torch.testing.assert_close(ratio[dim], p["brightness"][dim], atol=0.01, rtol=0)


def test_plain_random_erasing_replaces_a_rectangle_with_noise(canvas):
    still, _ = plain(canvas)
    erased, p = plain(canvas, erasing=1.0)
    changed = (erased - still).abs().amax(1) > 1e-4
    area = changed.float().mean((1, 2))
    assert (area > 0.01).float().mean() > 0.8
    for i in range(8):  # the changed pixels sit in one rectangle of about the drawn area
        ys, xs = changed[i].nonzero(as_tuple=True)
        if len(ys):
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            assert len(ys) / box.item() > 0.6


def test_every_plain_path_draw_follows_its_setting():
    cfg = AugmentConfig(scale=(0.2, 0.5), ratio=(0.6, 1.6), hflip=0.3, rotation=25.0, brightness=0.3, contrast=0.2,
                        saturation=0.4, erasing=0.6)
    p = BatchAugment(cfg, DRAW_SPEC, torch.Generator().manual_seed(8)).sample(N_DRAWS)
    theta = p["theta"]
    # theta = [[w cos f, -h sin, cx], [w sin f, h cos, cy]] (output -> input, normalized): w, h the crop's sides
    w, h = torch.hypot(theta[:, 0, 0], theta[:, 1, 0]), torch.hypot(theta[:, 0, 1], theta[:, 1, 1])
    assert_uniform(w * h, *cfg.scale, "scale (crop area)")
    assert_uniform(torch.log(w / h), math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), "ratio")
    flipped = torch.linalg.det(theta[:, :, :2]) < 0
    assert_rate(flipped, cfg.hflip, "hflip")
    assert_uniform(torch.rad2deg(torch.atan2(-theta[:, 0, 1], theta[:, 1, 1])), -25.0, 25.0, "rotation")
    assert (theta[:, 0, 2].abs() <= 1 - w + 1e-6).all() and (theta[:, 1, 2].abs() <= 1 - h + 1e-6).all()  # inside
    assert theta[:, 0, 2].std() > 0.1 and theta[:, 1, 2].std() > 0.1                # the crop moves
    for name in ("brightness", "contrast", "saturation"):
        strength = getattr(cfg, name)
        assert_uniform(p[name], 1 - strength, 1 + strength, name)
    assert_rate(p["erase"], cfg.erasing, "erasing")
    assert_uniform(p["erase_area"], 0.02, 0.25, "erase area")


def test_plain_contrast_scales_each_images_spread_about_its_mean(canvas):
    still, _ = plain(canvas)
    jittered, p = plain(canvas, contrast=0.4)
    spread = lambda x: (x - x.mean((1, 2, 3), keepdim=True)).abs().mean((1, 2, 3))  # noqa: E731
    ratio = spread(jittered) / spread(still)
    assert p["contrast"].std() > 0.15
    lower = p["contrast"] < 1                                          # no clipping when the spread shrinks
    torch.testing.assert_close(ratio[lower], p["contrast"][lower], atol=0.01, rtol=0)
    assert (ratio[~lower] > 1.0).all()


def test_plain_saturation_scales_each_images_colour(canvas):
    tinted = canvas * torch.tensor([1.0, 0.7, 0.4]).view(1, 3, 1, 1)  # a coloured product (Fashion-MNIST is grey)

    def chroma(x: torch.Tensor) -> torch.Tensor:
        return (x - (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])).abs().mean((1, 2, 3))

    still, _ = plain(tinted)
    jittered, p = plain(tinted, saturation=0.5)
    ratio = chroma(jittered) / chroma(still)
    assert p["saturation"].std() > 0.2
    lower = p["saturation"] < 1
    torch.testing.assert_close(ratio[lower], p["saturation"][lower], atol=0.01, rtol=0)
    assert (ratio[~lower] > 1.0).all()


def test_plain_random_resized_crop_zooms_into_the_canvas():
    square = torch.zeros(64, 3, SIDE, SIDE)
    square[..., 12:36, 12:36] = 0.8                                    # a quarter of the canvas
    whole, _ = plain(square)
    zoomed, p = plain(square, scale=(0.25, 0.25))                      # a crop of half the side: 2x zoom
    cover = lambda x: (x.amax(1) > 0.4).float().mean((1, 2))          # noqa: E731
    assert cover(whole).mean() == pytest.approx(0.25, abs=0.02)
    # the crop's centre moves over the canvas: on average (1 - |cx|)(1 - |cy|) of it shows the square, 0.56
    assert cover(zoomed).mean() == pytest.approx(0.56, abs=0.08)
    shown = ((1 - p["theta"][:, 0, 2].abs()) * (1 - p["theta"][:, 1, 2].abs())).clamp(max=1)
    assert (cover(zoomed) - shown).abs().max() < 0.08                  # each image: the share its crop holds


# --- configuration ---------------------------------------------------------------------------------


def test_station_view_config_round_trips_and_old_configs_load(tmp_path):
    cfg = TrainConfig(data="d", augment=AugmentConfig(station_view=StationViewConfig(rotation=15.0, backgrounds="bg")))
    assert cfg.crop_mode == "foreground" and cfg.crop_policy == CropPolicy(mode="foreground", margin=0.0)
    cfg.save(tmp_path / "config.json")
    again = TrainConfig.load(tmp_path / "config.json")
    assert again == cfg and again.augment.station_view.gain == (0.6, 1.4)

    old = json.loads((tmp_path / "config.json").read_text())
    del old["augment"]["station_view"], old["crop_margin"], old["crop_mode"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    legacy = TrainConfig.load(tmp_path / "old.json")
    assert not legacy.augment.station_view.enabled and legacy.crop_policy.mode == "roi"
    with pytest.raises(ValueError, match="unknown field"):
        AugmentConfig.from_dict({"station_view": {"rotaton": 3}})
    with pytest.raises(ValueError, match="margin"):
        TrainConfig(data="d", crop_margin=2.0)
    with pytest.raises(TypeError):
        StationViewConfig(True)  # keyword-only
    assert dataclasses.is_dataclass(StationViewConfig) and StationViewConfig().enabled


def test_train_flags_build_the_station_view_and_crop_policy():
    from trainer.cli import get_args_parser, train_config_from_args

    parse = get_args_parser().parse_args
    on = train_config_from_args(parse(["train", "--data", "d"]))
    assert on.augment.station_view.enabled and on.augment.station_view.rotation == 20.0 and on.augment.rotation == 20.0
    assert on.crop_mode == "foreground" and on.crop_margin == 0.0      # the box itself, squared
    off = train_config_from_args(parse(["train", "--data", "d", "--station-view", "off", "--rotation", "0",
                                        "--station-view-share", "0.5", "--backgrounds", "bg", "--crop-margin", "0.2"]))
    assert not off.augment.station_view.enabled and off.crop_policy == CropPolicy(mode="roi", margin=0.2)
    assert off.augment.station_view.share == 0.5 and off.augment.station_view.backgrounds == "bg"
    assert off.augment.rotation == 0.0
    upright = train_config_from_args(parse(["train", "--data", "d", "--plain-rotation", "0"]))
    assert upright.augment.rotation == 0.0 and upright.augment.station_view.rotation == 20.0
    spec = eval_spec(48, 48, crop=on.crop_policy)
    assert spec.to_manifest()["crop"] == {"mode": "foreground", "margin": 0.0, "min_size": 16}


def test_train_stops_before_decoding_when_a_background_frame_is_corrupt(fmnist_dir, tmp_path, caplog):
    from trainer.cli import main

    folder = tmp_path / "bg"
    folder.mkdir()
    (folder / "frame-0007.jpg").write_bytes(b"\xff\xd8 truncated")
    rc = main(["train", "--data", str(fmnist_dir / "train"), "--out-dir", str(tmp_path / "runs"), "--workers", "0",
               "--backgrounds", str(folder), "--arch", "mobilenet_v2", "--weights", "none"])
    assert rc == 2 and "frame-0007.jpg" in caplog.text
    assert not (tmp_path / "runs" / "model" / "split.json").exists()  # stopped before reading the dataset


@pytest.mark.parametrize("field, value", [
    ("rotation", math.nan), ("rotation", math.inf), ("rotation", 181.0), ("rotation", -1.0), ("rotation", "20"),
    ("scale_jitter", math.nan), ("scale_jitter", -1.0), ("position_jitter", math.nan), ("position_jitter", 0.6),
    ("out_of_view_fraction", (0.5, 0.1)), ("out_of_view_fraction", (math.nan, 0.3)),
    ("out_of_view_fraction", (0.1, 1.5)), ("out_of_view_fraction", (0.1, 1.0)),  # 1: the whole item out of view
    ("tilt", math.nan), ("tilt", 0.5), ("tilt", 5.0), ("tilt", -0.1),
    ("gain", (0.0, 1.0)), ("gain", (-1.0, 1.0)), ("gain", (math.nan, 1.0)), ("gain", (1.4, 0.6)),
    ("gain", (0.6, math.inf)), ("gain", (1.0,)), ("white_balance", math.nan), ("white_balance", 1.0),
    ("item_colour", math.nan), ("item_colour", 1.0), ("item_gain", (1.0, math.inf)), ("item_gain", (0.0, 1.0)),
    ("gradient", math.nan), ("gradient", 1.0), ("noise", math.nan), ("noise", math.inf), ("noise", -0.1),
    ("shadow_offset_px", math.nan), ("shadow_softness_px", -1.0), ("shadow_strength", (math.nan, 0.5)),
    ("shadow_strength", (0.5, 0.2)), ("motion_blur_px", math.nan), ("motion_blur_px", -100.0),
    ("defocus_px", math.inf), ("camera_px", 0), ("camera_px", 250.5), ("supersample", math.nan),
    ("supersample", 0.0), ("tiles_per_kind", 0), ("texture_seed", -1), ("share", math.nan), ("blur", 1.5),
    ("jpeg", math.nan), ("out_of_view", -0.1), ("jpeg_quality", (0, 90)), ("jpeg_quality", (90, 50)),
    ("jpeg_quality", (50.5, 90)),
])
def test_a_station_view_setting_that_is_not_finite_or_in_range_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=rf"^station_view\.{field}: expected "):
        StationViewConfig(**{field: value})
    saved = list(value) if isinstance(value, tuple) else value            # as a run's config.json holds it
    with pytest.raises(ValueError, match=rf"^station_view\.{field}: expected "):
        AugmentConfig.from_dict({"station_view": {field: saved}})


def test_every_station_view_setting_the_repo_uses_is_accepted():
    from trainer.cli import get_args_parser, train_config_from_args

    for settings in ({}, STILL, CUSTOM, {"enabled": False}, {"share": 1.0, "jpeg": 0.0}, {"supersample": 2.0}):
        StationViewConfig(**settings)
    StationViewConfig(rotation=180.0, scale_jitter=1.0, position_jitter=0.5, tilt=0.49, gain=(1e-3, 100.0),
                      white_balance=0.99, item_colour=0.99, gradient=0.99, noise=1.0, out_of_view_fraction=(0.0, 0.99),
                      motion_blur_px=250.0, defocus_px=0.0, supersample=0.5, jpeg_quality=(1, 100), tiles_per_kind=1)
    parse = get_args_parser().parse_args
    recipe = ["--scale", "0.75", "1.0", "--plain-rotation", "0", "--jitter", "0.1", "--erasing", "0.2",
              "--station-view-share", "0.5"]                             # README's, docs/training.md's, benchmarks'
    for extra in ([], recipe, ["--station-view", "off", "--rotation", "0"]):
        train_config_from_args(parse(["train", "--data", "d", *extra]))


def test_train_flags_refuse_a_bad_augmentation_value_naming_the_flag_and_the_field(tmp_path, caplog):
    from trainer.cli import get_args_parser, main, train_config_from_args

    parse = get_args_parser().parse_args
    for extra, message in (
        (["--rotation", "nan", "--plain-rotation", "10"], r"^--rotation: station_view\.rotation: expected"),
        (["--rotation", "nan", "--station-view", "off"], r"^--rotation: station_view\.rotation: expected"),
        (["--rotation", "200"], r"^--rotation: station_view\.rotation: expected"),
        (["--station-view-share", "1.5"], r"^--station-view-share: station_view\.share: expected"),
        (["--plain-rotation", "nan"], r"^--plain-rotation: augment\.rotation: expected"),
        (["--jitter", "2"], r"^--jitter: augment\.brightness: expected"),
    ):
        with pytest.raises(ValueError, match=message):
            train_config_from_args(parse(["train", "--data", "d", *extra]))
    rc = main(["train", "--data", str(tmp_path), "--out-dir", str(tmp_path / "runs"), "--rotation", "nan",
               "--plain-rotation", "10"])
    assert rc == 2 and "--rotation: station_view.rotation: expected a finite number in [0, 180]" in caplog.text
    assert not (tmp_path / "runs").exists()                                # stopped before anything was written
