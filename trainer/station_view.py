"""Station-view rendering: a training image as the station's item crop would show it.

The station crops each frame to the item (``contract.preprocess.CropPolicy``, mode ``foreground``:
the item's box grown by ``margin`` x its longer side on every side, square) and feeds that crop
to the model. A dataset image (a garment centred on black, a product photo) looks nothing like
it: the crop shows the item on a belt, bench, tote or cardboard, rotated, tilted, lit unevenly,
noisy, sometimes blurred or re-compressed, sometimes partly out of view. This module renders
that crop from the training canvas, for a whole batch at once with torch ops, on the training
device:

1. The item's mask: a ``<stem>.mask.png`` beside the image when the canvas carries one (4th
   channel); else, when the canvas border is one uniform colour (a product on a plain
   background, like Fashion-MNIST), the pixels that differ from it (a soft ramp, small holes
   closed); else all ones (a plain paste of the photo). Sometimes the mask's enclosed holes are
   filled (``fill_holes``): a station's segmentation may or may not see the surface through a
   bag's handle.
2. One homography per image for the item (scale so that the item's box fills about
   1/(1+2 margin) of the crop, with jitter; position jitter; rotation; flip; perspective tilt;
   sometimes a shift that puts part of it out of view) and one for the background window (same
   tilt, its own zoom and angle), both applied by ``grid_sample``. Sometimes a drop shadow: the
   silhouette offset and softened, darkening the surface; the station's box may take it in, which
   puts the item off-centre in the crop (``shadow_in_box``).
3. Light (gain, white balance, a linear gradient across the view; the item's own brightness and
   colour), blur (motion or defocus, as grouped ``conv2d`` with per-image kernels), JPEG re-compression (OpenCV's libjpeg).
4. Area downsampling to the canvas size (with ``supersample``), centre crop to the model input
   (the Preprocessor's centre crop), sensor noise.

Scale: a station crop is about ``camera_px`` (250) pixels before the Preprocessor shrinks it to
the canvas (48 px in the Fashion-MNIST recipe). The view is rendered at the canvas size
(``supersample`` 1; 2 renders at twice the size and area-downsamples, at ~4x the cost: measured in
benchmarks/augment_speed.py, 2x rendering at 48 px ran slower than the model itself on a 2-core
CPU). Each effect is sized for what survives the camera -> canvas downscale: blur lengths and radii
are given in camera pixels and scaled by ``render_side / camera_px``; noise is given as its std at
camera resolution and added at the model input with the std that averaging ``camera_px / side``
pixels per side leaves (i.i.d. noise averaged over f x f pixels keeps 1/f of its std); JPEG runs
on the view upscaled to twice its size (at most ``camera_px``), so its 8 px blocks are 4 px of the
model input: coarser than a camera's, hence a mild default quality range.

torchvision.transforms.v2 functional ops take one parameter set per call and kornia would be a
new dependency for two short ops, so the warps and kernels are built here from torch primitives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from contract.preprocess import InputSpec
from trainer.backgrounds import TEXTURES, folder_tiles, procedural_tiles

MASK_MODES = ("auto", "border", "paste")
BORDER_THRESHOLD = 0.06  # a pixel this far from the border colour (any channel, 0..1) starts to be the item
BORDER_RAMP = 0.15       # ... and is fully the item this much further
BORDER_PLAIN = 0.6       # share of border pixels at the median colour for the border rule to apply (auto)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _is_pair(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _check_number(name: str, value: Any, low: float, high: float, *, what: str, low_open: bool = False,
                  high_open: bool = False) -> None:
    """ValueError naming ``station_view.<name>`` unless ``value`` is a finite number in the interval."""
    inside = _is_number(value) and (low < value if low_open else low <= value) \
        and (value < high if high_open else value <= high)
    if not inside:
        raise ValueError(f"station_view.{name}: expected a finite number in {_interval(low, high, low_open, high_open)}"
                         f" ({what}), got {value!r}")


def _check_range(name: str, pair: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                 what: str = "") -> None:
    """ValueError naming ``station_view.<name>`` unless ``pair`` is (lo, hi), finite, lo <= hi, both in the interval."""
    inside = _is_pair(pair) and all(_is_number(v) for v in pair) and pair[0] <= pair[1] \
        and (low < pair[0] if low_open else low <= pair[0]) and (pair[1] < high if high_open else pair[1] <= high)
    if not inside:
        bound = f"{low:g} {'<' if low_open else '<='} low <= high" + (
            f" {'<' if high_open else '<='} {high:g}" if math.isfinite(high) else "")
        raise ValueError(f"station_view.{name}: expected two finite numbers, {bound}{what}, got {pair!r}")


@dataclass(frozen=True, kw_only=True)
class StationViewConfig:
    """How training images are rendered as station crops; saved in the run's config.json."""

    enabled: bool = True
    """Render station views at all; off trains on the dataset images only (the plain path)."""
    share: float = 0.8
    """Fraction of training images rendered as station views; the rest take the plain path, which keeps the
    accuracy on clean centred images."""
    rotation: float = 20.0
    """Maximum in-plane rotation of the item, degrees (uniform in +-rotation)."""
    scale_jitter: float = 0.15
    """The item's box side is 1/(1+2 margin) of the crop times a log-uniform factor in [1/(1+j), 1+j]:
    the station's foreground box is not exact."""
    position_jitter: float = 0.04
    """Uniform shift of the item's centre, as a fraction of the crop side, per axis."""
    out_of_view: float = 0.1
    """Probability that the item is shifted so that part of it leaves the crop."""
    out_of_view_fraction: tuple[float, float] = (0.1, 0.35)
    """How much of the item's extent (along the shift) leaves the crop."""
    tilt: float = 0.12
    """Maximum perspective coefficient (per axis) of the camera tilt; 0.12 makes opposite edges of a square
    differ by up to ~25%."""
    gain: tuple[float, float] = (0.6, 1.4)
    """Overall light gain range (log-uniform)."""
    white_balance: float = 0.06
    """Per-channel gain jitter (uniform +-)."""
    item_colour: float = 0.3
    """Maximum saturation of a random colour given to the item alone (a random hue; uniform 0..item_colour):
    products come in colours that a grey catalogue image (Fashion-MNIST) does not show."""
    item_gain: tuple[float, float] = (0.65, 1.15)
    """Brightness of the item alone relative to the surface (log-uniform): a dark garment on a dark belt, a
    pale one on a light bench."""
    fill_holes: float = 0.5
    """Probability that the item's enclosed holes (the dark inside of a bag's handle, between a sandal's
    straps) are part of the item, shown as the image has them, instead of showing the surface: a station's
    segmentation (or a product photo's mask) may or may not fill them."""
    shadow: float = 0.5
    """Probability of a drop shadow: the item's silhouette, offset, softened and darkening the surface."""
    shadow_strength: tuple[float, float] = (0.2, 0.5)
    """How much the shadow darkens the surface at its core (uniform)."""
    shadow_offset_px: float = 14.0
    """Maximum offset of the shadow from the item, camera pixels, in a random direction."""
    shadow_softness_px: float = 6.0
    """Gaussian softness (sigma) of the shadow's edge, camera pixels."""
    shadow_in_box: float = 0.5
    """Probability that the station's foreground box takes in the shadow as well as the item (a strong shadow
    differs from the empty scene as much as the item does): the crop then holds the item off-centre and a
    little smaller."""
    gradient: float = 0.3
    """Maximum brightness change from the view's centre to its edge along a random direction."""
    noise: float = 0.08
    """Maximum sensor-noise std at camera resolution (0..1 pixel units); each image draws uniform 0..noise."""
    blur: float = 0.25
    """Probability of blur; half motion, half defocus."""
    motion_blur_px: float = 20.0
    """Maximum motion-blur length in camera pixels."""
    defocus_px: float = 5.0
    """Maximum defocus radius in camera pixels."""
    jpeg: float = 0.3
    """Probability of JPEG re-compression."""
    jpeg_quality: tuple[int, int] = (50, 95)
    """JPEG quality range (uniform, inclusive)."""
    backgrounds: str | None = None
    """Folder of empty-scene frames captured at a station (jpg/png); random crops join the texture bank."""
    folder_share: float = 0.5
    """With ``backgrounds``, the fraction of views drawn on a crop of those frames."""
    textures: tuple[str, ...] = tuple(TEXTURES)
    """Procedural surfaces to draw on (belt, bench, tote, cardboard)."""
    tiles_per_kind: int = 6
    """Procedural tiles generated per surface kind (once per run)."""
    texture_seed: int = 0
    """Seed of the procedural tiles and background-folder crops."""
    mask: str = "auto"
    """auto: mask file, else the border rule when the border is plain, else paste; border: always the border
    rule; paste: the whole image (all-ones mask)."""
    camera_px: int = 250
    """Side of a station's item crop in camera pixels, before the Preprocessor shrinks it."""
    supersample: float = 1.0
    """Render at this multiple of the canvas side (capped at 256 px) and area-downsample; 2 costs ~4x the time."""

    def __post_init__(self) -> None:
        """ValueError naming ``station_view.<field>`` for a value that is not finite or out of range: a NaN renders
        every view as NaN, a zero divides, and either would otherwise surface at the first batch, unnamed."""
        for name in ("share", "out_of_view", "blur", "jpeg", "folder_share", "fill_holes", "shadow", "shadow_in_box"):
            _check_number(name, getattr(self, name), 0.0, 1.0, what="a probability")
        _check_number("rotation", self.rotation, 0.0, 180.0, what="degrees")
        # Each factor or shift below must keep what it scales positive (or inside the view) at its extreme.
        _check_number("scale_jitter", self.scale_jitter, 0.0, 1.0, what="the box factor is 1/(1+j)..1+j")
        _check_number("position_jitter", self.position_jitter, 0.0, 0.5, what="a fraction of the crop side")
        _check_number("tilt", self.tilt, 0.0, 0.5, high_open=True,
                      what="a perspective coefficient per axis (0.5 would fold the view's corner)")
        _check_number("white_balance", self.white_balance, 0.0, 1.0, high_open=True,
                      what="a channel gain jitter (1 would allow a zero gain)")
        _check_number("item_colour", self.item_colour, 0.0, 1.0, high_open=True,
                      what="a saturation (1 would allow a zero channel)")
        _check_number("gradient", self.gradient, 0.0, 1.0, high_open=True,
                      what="a brightness change centre to edge (1 would make an edge black)")
        _check_number("noise", self.noise, 0.0, 1.0, what="a std in 0..1 pixel units")
        _check_range("out_of_view_fraction", self.out_of_view_fraction, 0.0, 1.0, high_open=True,
                     what=" (1 would move the whole item out of view: a label with no item)")
        _check_range("gain", self.gain, 0.0, math.inf, low_open=True)
        _check_range("item_gain", self.item_gain, 0.0, math.inf, low_open=True)
        _check_range("shadow_strength", self.shadow_strength, 0.0, 1.0)
        if not (_is_int(self.camera_px) and self.camera_px > 0):
            raise ValueError(f"station_view.camera_px: expected a whole number of pixels > 0, got {self.camera_px!r}")
        for name in ("shadow_offset_px", "shadow_softness_px", "motion_blur_px", "defocus_px"):
            _check_number(name, getattr(self, name), 0.0, float(self.camera_px),
                          what="camera pixels, at most camera_px")
        _check_number("supersample", self.supersample, 0.0, 256.0, low_open=True, what="a multiple of the canvas side")
        q = self.jpeg_quality
        if not (_is_pair(q) and all(_is_int(v) for v in q) and 1 <= q[0] <= q[1] <= 100):
            raise ValueError(f"station_view.jpeg_quality: expected two whole numbers, 1 <= low <= high <= 100, "
                             f"got {q!r}")
        if not (_is_int(self.tiles_per_kind) and self.tiles_per_kind > 0):
            raise ValueError(f"station_view.tiles_per_kind: expected a whole number > 0, got {self.tiles_per_kind!r}")
        if not (_is_int(self.texture_seed) and self.texture_seed >= 0):
            raise ValueError(f"station_view.texture_seed: expected a whole number >= 0, got {self.texture_seed!r}")
        if self.mask not in MASK_MODES:
            raise ValueError(f"station_view.mask: expected one of {MASK_MODES}, got {self.mask!r}")
        if not self.textures and not self.backgrounds:
            raise ValueError("station_view: no textures and no backgrounds folder: nothing to draw items on")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "StationViewConfig":
        """From config.json (lists back to tuples); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"augment.station_view: unknown field(s) {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**values)


def render_side_for(side: int, supersample: float = 1.0) -> int:
    """The canvas side times ``supersample``, capped at 256, never below the canvas (see the module docstring)."""
    return max(side, min(round(side * supersample), 256))


def item_mask(canvas: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """N x 1 x S x S item mask in 0..1 for a float canvas batch (N x 3|4 x S x S, 0..1).

    A 4th channel that is not all zero is a mask file's mask. The border rule takes the median
    border colour; a pixel's alpha ramps from 0 at BORDER_THRESHOLD away from it (any channel) to 1
    at BORDER_RAMP further, so the item's dark anti-aliased rim fades into the new background instead
    of leaving a halo; holes that a 3x3 closing fills (dark details inside the item) are opaque. In
    ``auto`` mode the rule applies when most of the border (BORDER_PLAIN) is that colour, else the
    image is pasted whole. An empty result falls back to all ones.
    """
    n, _, s, _ = canvas.shape
    rgb = canvas[:, :3]
    ones = torch.ones(n, 1, s, s, device=canvas.device)
    if mode == "paste":
        return ones
    border = torch.cat([rgb[:, :, 0], rgb[:, :, -1], rgb[:, :, :, 0], rgb[:, :, :, -1]], dim=2)  # N x 3 x 4S
    ref = border.median(dim=2).values
    plain = ((border - ref[..., None]).abs().amax(1) <= BORDER_THRESHOLD).float().mean(1) >= BORDER_PLAIN
    diff = (rgb - ref[..., None, None]).abs().amax(1, keepdim=True)
    hard = (diff > BORDER_THRESHOLD).float()
    closed = -F.max_pool2d(-F.max_pool2d(hard, 3, 1, 1), 3, 1, 1)
    mask = torch.maximum(((diff - BORDER_THRESHOLD) / BORDER_RAMP).clamp(0, 1), closed * (1 - hard))
    if mode == "auto":
        mask = torch.where(plain.view(n, 1, 1, 1), mask, ones)
    if canvas.shape[1] == 4:
        given = canvas[:, 3:4]
        mask = torch.where((given.amax((1, 2, 3)) > 0).view(n, 1, 1, 1), given, mask)
    empty = (mask > 0.5).flatten(1).sum(1) == 0
    return torch.where(empty.view(n, 1, 1, 1), ones, mask)


def mask_boxes(mask: torch.Tensor) -> torch.Tensor:
    """N x 4 (x0, y0, x1, y1) of ``mask > 0.5`` in normalized coords (-1..1, pixel edges); never empty."""
    n, _, s, _ = mask.shape
    on = mask[:, 0] > 0.5
    rows, cols = on.any(2), on.any(1)

    def span(line: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = line.int().argmax(1)
        last = s - 1 - line.flip(1).int().argmax(1)
        return first.float(), last.float() + 1

    y0, y1 = span(rows)
    x0, x1 = span(cols)
    return torch.stack([x0, y0, x1, y1], 1) * (2.0 / s) - 1.0


def enclosed_holes(mask: torch.Tensor) -> torch.Tensor:
    """N x 1 x S x S: pixels outside ``mask > 0.5`` that the outside cannot reach (4-connected flood fill
    from the border, OpenCV, per image on the CPU: ~10 us at 48 px)."""
    on = (mask[:, 0] > 0.5).cpu().numpy().astype(np.uint8)
    holes = np.zeros_like(on)
    for i, m in enumerate(on):
        flood = np.pad(m, 1)
        cv2.floodFill(flood, None, (0, 0), 2, flags=4)
        holes[i] = flood[1:-1, 1:-1] == 0
    return torch.from_numpy(holes).to(mask.device, torch.float32).unsqueeze(1)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel (zero padding: a silhouette's blur fades at the border)."""
    if sigma <= 0.05:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)


def _homography_grid(matrix: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Sampling grid (N x R x R x 2): the output's pixel centres ``coords`` (R, normalized) through ``matrix``."""
    n, r = matrix.shape[0], coords.shape[0]
    xs, ys, m = coords.view(1, 1, r), coords.view(1, r, 1), matrix.reshape(n, 9, 1, 1)
    grid = torch.empty(n, r, r, 2, device=matrix.device)
    den = (m[:, 6] * xs + m[:, 7] * ys + m[:, 8]).clamp_(min=1e-3).reciprocal_()
    torch.mul(m[:, 0] * xs + m[:, 1] * ys + m[:, 2], den, out=grid[..., 0])
    torch.mul(m[:, 3] * xs + m[:, 4] * ys + m[:, 5], den, out=grid[..., 1])
    return grid


def _jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """One HxWx3 RGB uint8 image through JPEG at ``quality`` (OpenCV expects BGR: the chroma must be right)."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not JPEG-encode a training view")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


class StationView:
    """Renders a uint8/float canvas batch as station crops; ``sample`` draws every random parameter."""

    def __init__(self, config: StationViewConfig, spec: InputSpec, generator: torch.Generator, hflip: float = 0.5) -> None:
        self.config = config
        self.spec = spec
        self.generator = generator
        self.hflip = hflip
        self.side = spec.resize_shorter
        self.render_side = render_side_for(self.side, config.supersample)
        self.jpeg_side = min(2 * self.render_side, max(config.camera_px, self.render_side))
        self.px = self.render_side / config.camera_px     # camera pixels -> render pixels
        self.fill = 1.0 / (1.0 + 2.0 * spec.crop.margin)  # item box side / crop side at the station
        tile = min(2 * self.render_side, 384)
        banks = []
        if config.textures:
            banks.append(procedural_tiles(tile, config.tiles_per_kind, config.texture_seed, tuple(config.textures)))
        self.n_procedural = len(banks[0]) if banks else 0
        if config.backgrounds:
            banks.append(folder_tiles(config.backgrounds, tile, 8, config.texture_seed))
        self.n_folder = len(banks[-1]) if config.backgrounds else 0
        tiles = torch.from_numpy(np.concatenate(banks))
        self.n_tiles = len(tiles)
        self.tile = tile
        # All tiles stacked into one tall image: one grid_sample reads each view's own tile.
        self.atlas = (tiles.float() / 255.0).permute(1, 0, 2, 3).reshape(1, 3, -1, tile)
        r = self.render_side
        self.coords = (torch.arange(r, dtype=torch.float32) + 0.5) * (2.0 / r) - 1.0
        self.blur_size = 2 * math.ceil(max(config.motion_blur_px / 2, config.defocus_px) * self.px + 0.5) + 1

    # --- random draws ---------------------------------------------------------------------------

    def _rand(self, n: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) * (high - low) + low

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """Every draw for ``n`` views (each tensor has ``n`` rows, so a shard can take rows rank::world)."""
        c, r = self.config, self._rand
        log_j = math.log(1 + c.scale_jitter)
        p = {
            "sv_scale": torch.exp(r(n, -log_j, log_j)),
            "sv_dx": r(n, -c.position_jitter, c.position_jitter), "sv_dy": r(n, -c.position_jitter, c.position_jitter),
            "sv_out": r(n) < c.out_of_view, "sv_out_axis": r(n) < 0.5, "sv_out_sign": torch.where(r(n) < 0.5, -1.0, 1.0),
            "sv_out_frac": r(n, *c.out_of_view_fraction),
            "sv_angle": r(n, -c.rotation, c.rotation) * math.pi / 180,
            "sv_flip": torch.where(r(n) < self.hflip, -1.0, 1.0),
            "sv_tilt_x": r(n, -c.tilt, c.tilt), "sv_tilt_y": r(n, -c.tilt, c.tilt),
            "sv_bg_zoom": r(n, 0.35, 0.6), "sv_bg_angle": r(n, 0, 2 * math.pi),
            "sv_bg_cx": r(n, -0.3, 0.3), "sv_bg_cy": r(n, -0.3, 0.3),
            "sv_gain": torch.exp(r(n, math.log(c.gain[0]), math.log(c.gain[1]))),
            "sv_wb": torch.rand(n, 3, generator=self.generator) * 2 * c.white_balance + 1 - c.white_balance,
            "sv_colour": self._colours(n),
            "sv_item_gain": torch.exp(r(n, math.log(c.item_gain[0]), math.log(c.item_gain[1]))),
            "sv_fill_holes": r(n) < c.fill_holes,
            "sv_shadow": r(n) < c.shadow, "sv_shadow_in_box": r(n) < c.shadow_in_box,
            "sv_shadow_strength": r(n, *c.shadow_strength),
            "sv_shadow_len": r(n, 0.3, 1.0) * c.shadow_offset_px, "sv_shadow_dir": r(n, 0, 2 * math.pi),
            "sv_grad": r(n, 0, c.gradient), "sv_grad_dir": r(n, 0, 2 * math.pi),
            "sv_noise_std": r(n, 0, c.noise),
            "sv_noise": torch.randn(n, 3, self.spec.height, self.spec.width, generator=self.generator),
            "sv_blur": r(n) < c.blur, "sv_blur_motion": r(n) < 0.5, "sv_blur_amount": r(n, 0.3, 1.0),
            "sv_blur_angle": r(n, 0, math.pi),
            "sv_jpeg": r(n) < c.jpeg, "sv_jpeg_quality": torch.randint(c.jpeg_quality[0], c.jpeg_quality[1] + 1, (n,),
                                                                         generator=self.generator),
        }
        folder = r(n) < (c.folder_share if self.n_procedural else 1.0)
        proc = (r(n) * self.n_procedural).long().clamp(max=max(self.n_procedural - 1, 0))
        own = self.n_procedural + (r(n) * self.n_folder).long().clamp(max=max(self.n_folder - 1, 0))
        p["sv_tile"] = torch.where(folder & (self.n_folder > 0), own, proc)
        return p

    def _colours(self, n: int) -> torch.Tensor:
        """N x 3 per-channel factors of a random hue at saturation 0..item_colour (mean 1: brightness kept)."""
        hue = self._rand(n, 0, 2 * math.pi).view(n, 1)
        sat = self._rand(n, 0, self.config.item_colour).view(n, 1)
        phase = torch.arange(3).view(1, 3) * (2 * math.pi / 3)
        return 1 + sat * torch.cos(hue + phase)

    # --- geometry -------------------------------------------------------------------------------

    def _perspective(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        n = len(p["sv_tilt_x"])
        m = torch.eye(3).repeat(n, 1, 1)
        m[:, 2, 0], m[:, 2, 1] = p["sv_tilt_x"], p["sv_tilt_y"]
        return m

    def item_matrix(self, mask: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """N x 3 x 3 canvas -> crop (normalized coords), before the perspective.

        The item's box is measured after rotation and flip (over the mask's pixels), as the station
        would find it, so the fill and the out-of-view shift hold for any shape and angle.
        """
        n, side = mask.shape[0], mask.shape[-1]
        cos, sin, flip = torch.cos(p["sv_angle"]), torch.sin(p["sv_angle"]), p["sv_flip"]
        a, b, c, d = cos * flip, -sin, sin * flip, cos  # rotation after flip
        centres = (torch.arange(side, dtype=torch.float32) + 0.5) * (2.0 / side) - 1.0
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        xs, ys = xs.reshape(1, -1), ys.reshape(1, -1)
        on = (mask.reshape(n, -1) > 0.5).cpu()
        u = a.view(n, 1) * xs + b.view(n, 1) * ys
        v = c.view(n, 1) * xs + d.view(n, 1) * ys
        pixel = 2.0 / side
        u0, u1 = u.masked_fill(~on, math.inf).amin(1) - pixel / 2, u.masked_fill(~on, -math.inf).amax(1) + pixel / 2
        v0, v1 = v.masked_fill(~on, math.inf).amin(1) - pixel / 2, v.masked_fill(~on, -math.inf).amax(1) + pixel / 2
        box_w, box_h = u1 - u0, v1 - v0
        # The station's box: the item's, or the union of the item's and its shadow's (offset ox, oy in crop
        # coords); that box fills 1/(1+2 margin) of the crop and sits at its centre (plus jitter).
        ox, oy = self.shadow_offset(p)
        counted = (p["sv_shadow"] & p["sv_shadow_in_box"]).float()
        ox, oy = ox * counted, oy * counted
        span = 2 * self.fill * p["sv_scale"]
        s = torch.minimum((span - ox.abs()) / box_w, (span - oy.abs()) / box_h)
        tx, ty = p["sv_dx"] * 2 - ox / 2, p["sv_dy"] * 2 - oy / 2
        half = torch.where(p["sv_out_axis"], box_w, box_h) * s / 2
        shift = p["sv_out_sign"] * (1 - half + 2 * half * p["sv_out_frac"])
        tx = torch.where(p["sv_out"] & p["sv_out_axis"], shift, tx)
        ty = torch.where(p["sv_out"] & ~p["sv_out_axis"], shift, ty)
        m = torch.zeros(n, 3, 3)
        m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = s * a, s * b, tx - s * (u0 + u1) / 2
        m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = s * c, s * d, ty - s * (v0 + v1) / 2
        m[:, 2, 2] = 1
        return m

    def shadow_offset(self, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The shadow's offset from the item in normalized crop coords (the crop is ``camera_px`` across)."""
        length = p["sv_shadow_len"] * (2.0 / self.config.camera_px)
        return length * torch.cos(p["sv_shadow_dir"]), length * torch.sin(p["sv_shadow_dir"])

    def _background_grid(self, p: dict[str, torch.Tensor], tilt_inv: torch.Tensor, dev: torch.device) -> torch.Tensor:
        z, cos, sin = p["sv_bg_zoom"], torch.cos(p["sv_bg_angle"]), torch.sin(p["sv_bg_angle"])
        m = torch.zeros(len(z), 3, 3)
        m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = z * cos, -z * sin, p["sv_bg_cx"]
        m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = z * sin, z * cos, p["sv_bg_cy"]
        m[:, 2, 2] = 1
        grid = _homography_grid((m @ tilt_inv).to(dev), self.coords.to(dev))
        edge = 1 - 1 / self.tile  # stay inside the view's own tile of the atlas
        gx, gy = grid[..., 0].clamp(-edge, edge), grid[..., 1].clamp(-edge, edge)
        k = p["sv_tile"].to(dev).float().view(-1, 1, 1)
        return torch.stack([gx, -1 + (2 * k + 1) / self.n_tiles + gy / self.n_tiles], -1)

    # --- rendering ------------------------------------------------------------------------------

    def render(self, canvas: torch.Tensor, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(view, item mask) at render size, 0..1, before blur/JPEG/noise: N x 3|1 x R x R."""
        n, dev = canvas.shape[0], canvas.device
        mask = item_mask(canvas, self.config.mask)
        if bool(p["sv_fill_holes"].any()):
            fill = p["sv_fill_holes"].to(dev).view(n, 1, 1, 1)
            mask = torch.where(fill, torch.maximum(mask, enclosed_holes(mask)), mask)
        tilt = self._perspective(p)
        item_to_crop = tilt @ self.item_matrix(mask, p)
        coords = self.coords.to(dev)
        grid = _homography_grid(torch.linalg.inv(item_to_crop).to(dev), coords)
        item = F.grid_sample(torch.cat([canvas[:, :3], mask], 1), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)
        bg_grid = self._background_grid(p, torch.linalg.inv(tilt), dev)
        if self.atlas.device != dev:
            self.atlas = self.atlas.to(dev)
        atlas = self.atlas
        background = F.grid_sample(atlas.expand(n, -1, -1, -1), bg_grid, mode="bilinear", padding_mode="border",
                                   align_corners=False)
        alpha = item[:, 3:4]
        shadows = p["sv_shadow"].nonzero().squeeze(1)
        if len(shadows):
            background[shadows.to(dev)] *= 1 - self.shadow(mask[shadows.to(dev)], item_to_crop[shadows],
                                                           {k: v[shadows] for k, v in p.items()})
        colour = (p["sv_colour"] * p["sv_item_gain"].view(n, 1)).to(dev).view(n, 3, 1, 1)
        return torch.lerp(background, (item[:, :3] * colour).clamp_(0.0, 1.0), alpha), alpha

    def shadow(self, mask: torch.Tensor, item_to_crop: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """N x 1 x R x R darkening (0..strength): the item's silhouette moved by the shadow's offset, softened."""
        ox, oy = self.shadow_offset(p)
        shift = torch.eye(3).repeat(len(ox), 1, 1)
        shift[:, 0, 2], shift[:, 1, 2] = ox, oy
        grid = _homography_grid(torch.linalg.inv(shift @ item_to_crop).to(mask.device), self.coords.to(mask.device))
        silhouette = F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        soft = _gaussian_blur(silhouette, self.config.shadow_softness_px * self.px)
        return soft * p["sv_shadow_strength"].to(mask.device).view(-1, 1, 1, 1)

    def light(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gain, white balance and a linear gradient across the view."""
        n, r, dev = x.shape[0], self.render_side, x.device
        coords = self.coords.to(dev)
        gx = (p["sv_grad"] * torch.cos(p["sv_grad_dir"])).to(dev).view(n, 1, 1, 1) * coords.view(1, 1, 1, r)
        gy = (p["sv_grad"] * torch.sin(p["sv_grad_dir"])).to(dev).view(n, 1, 1, 1) * coords.view(1, 1, r, 1)
        gain = (p["sv_gain"].view(n, 1) * p["sv_wb"]).to(dev).view(n, 3, 1, 1)
        return (x * gain).mul_((gx + gy).add_(1)).clamp_(0.0, 1.0)

    def blur_kernels(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """N x K x K normalized kernels: a line (motion) or a soft disk (defocus)."""
        k = self.blur_size
        t = torch.arange(k, dtype=torch.float32) - k // 2
        ky, kx = torch.meshgrid(t, t, indexing="ij")
        amount = p["sv_blur_amount"].view(-1, 1, 1)
        cos, sin = torch.cos(p["sv_blur_angle"]).view(-1, 1, 1), torch.sin(p["sv_blur_angle"]).view(-1, 1, 1)
        length = (amount * self.config.motion_blur_px * self.px).clamp(min=1.0)
        across = (1 - (kx * sin - ky * cos).abs()).clamp(min=0)
        along = ((length / 2 + 0.5 - (kx * cos + ky * sin).abs()).clamp(0, 1))
        radius = (amount * self.config.defocus_px * self.px).clamp(min=0.5)
        disk = (radius + 0.5 - torch.sqrt(kx**2 + ky**2)).clamp(0, 1)
        kernel = torch.where(p["sv_blur_motion"].view(-1, 1, 1), across * along, disk)
        return kernel / kernel.sum((1, 2), keepdim=True)

    def blur(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        n, _, r, _ = x.shape
        kernels = self.blur_kernels(p).to(x.device).repeat_interleave(3, 0).unsqueeze(1)
        pad = self.blur_size // 2
        padded = F.pad(x.reshape(1, n * 3, r, r), (pad, pad, pad, pad), mode="replicate")
        return F.conv2d(padded, kernels, groups=n * 3).view(n, 3, r, r)

    def jpeg(self, x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        """Encode and decode each image at its own quality (OpenCV's libjpeg, on the CPU), at ``jpeg_side``.

        A camera compresses the whole frame; the item crop is ~camera_px across. Compressing at the
        render size would make 8 px blocks a sixth of a 48 px view, so the view is first upscaled to
        twice its size (up to camera_px): blocks stay coarser than a camera's, at a bounded cost.
        (torchvision.io's JPEG codec is deprecated from torchvision 0.29 on; OpenCV is already a
        dependency and measured as fast here.)
        """
        r = x.shape[-1]
        big = F.interpolate(x, size=(self.jpeg_side, self.jpeg_side), mode="bilinear", align_corners=False) \
            if self.jpeg_side != r else x
        images = big.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        decoded = [_jpeg_round_trip(img, int(q)) for img, q in zip(images, quality.tolist())]
        out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(x.device).float().div_(255.0)
        return F.interpolate(out, size=(r, r), mode="area") if self.jpeg_side != r else out

    def __call__(self, canvas: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float canvas batch (0..1, N x 3|4 x S x S) -> station views N x 3 x H x W in 0..1 (not normalized)."""
        x, _ = self.render(canvas, p)
        x = self.light(x, p)
        for flag, op in (("sv_blur", self.blur), ("sv_jpeg", None)):
            rows = p[flag].nonzero().squeeze(1)
            if not len(rows):
                continue
            sub = {k: v[rows] for k, v in p.items()}
            dev_rows = rows.to(x.device)
            x[dev_rows] = op(x[dev_rows], sub) if op else self.jpeg(x[dev_rows], sub["sv_jpeg_quality"])
        if self.render_side != self.side:
            x = F.interpolate(x, size=(self.side, self.side), mode="area")
        top, left = (self.side - self.spec.height) // 2, (self.side - self.spec.width) // 2
        x = x[:, :, top : top + self.spec.height, left : left + self.spec.width]
        std = p["sv_noise_std"].to(x.device).view(-1, 1, 1, 1) * (self.side / self.config.camera_px)
        return (x + std * p["sv_noise"].to(x)).clamp(0.0, 1.0)
