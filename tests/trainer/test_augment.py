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
