"""Demo anomaly-detection data, generated on the fly in MVTec AD's folder layout.

Two kinds of category:

* textures ("brick", "grass", "gravel"): random crops of the real photographs that
  scikit-image ships inside its wheel (no download), lightly tinted, with synthetic
  scratches, cracks, stains and pasted foreign material;
* aligned objects ("nut", "chip", "capsule"): an object rendered by code at nearly the
  same pose in every image (shifts of a few pixels, a tiny rotation, lighting changes,
  sensor noise), with missing parts, dents, contamination, bent pins, solder bridges,
  cracks, faulty imprints...

Every defect is applied to a copy of the defect-free picture, so the ground-truth
mask is exact: the pixels that changed by more than a small tolerance. Output is
byte-identical for a seed; nothing large lives in the repository.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from .._validation import is_int

logger = logging.getLogger(__name__)

DEMO_TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
DEMO_OBJECTS: tuple[str, ...] = ("nut", "chip", "capsule")
DEMO_CATEGORIES: tuple[str, ...] = DEMO_TEXTURES + DEMO_OBJECTS

TEXTURE_DEFECTS: tuple[str, ...] = ("scratch", "crack", "stain", "foreign_material")
DEMO_DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    **{name: TEXTURE_DEFECTS for name in DEMO_TEXTURES},
    "nut": ("chipped", "dent", "contamination", "scratch"),
    "chip": ("missing_pin", "bent_pin", "solder_bridge", "contamination", "scratch"),
    "capsule": ("crack", "squeeze", "poke", "faulty_imprint"),
}

MIN_IMAGE_SIZE = 32
# A pixel belongs to a defect when some channel moved by more than this (in [0, 1]).
MASK_TOLERANCE = 0.04
# Fraction of the image side kept clear of defect centres: the models resize to 256 and
# centre-crop 224 (12.5 % lost), and a defect cropped away would mislabel its image.
_DEFECT_MARGIN = 0.16
_MAX_DEFECT_ATTEMPTS = 30

Array = np.ndarray


# ============================================================================ small tools
def _min_defect_area(size: int) -> int:
    """Smallest wanted mask (pixels): ~0.12 % of the image, so no defect is a speck."""
    return max(4, int(round(0.0012 * size * size)))


def _max_defect_area(size: int) -> int:
    return int(0.25 * size * size)


def _smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> Array:
    """Gaussian-smoothed white noise, rescaled to zero mean / unit std."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    std = float(field.std())
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _defect_centre(size: int, rng: np.random.Generator) -> Array:
    lo, hi = _DEFECT_MARGIN * size, (1.0 - _DEFECT_MARGIN) * size
    return rng.uniform(lo, hi, size=2)


def _blob_alpha(size: int, centre: Array, radius: float, softness: float, rng: np.random.Generator,
                roughness: float = 0.25) -> Array:
    """Irregular blob (radius modulated by a few random harmonics), soft edge of
    `softness` pixels. Returns alpha in [0, 1], [size, size] float32."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - centre[0], yy - centre[1]
    theta = np.arctan2(dy, dx)
    scale = np.ones_like(theta)
    for k in range(2, 7):
        scale += roughness / k * rng.uniform(0.3, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    dist = np.hypot(dx, dy) - radius * scale
    return np.clip(0.5 - dist / max(softness, 1e-3), 0.0, 1.0).astype(np.float32)


def _curve_points(start: Array, angle: float, length: float, n_steps: int, turn_sigma: float,
                  rng: np.random.Generator) -> Array:
    """Random walk with heading momentum: smooth curves (small turn_sigma) or jagged
    cracks (large). Returns [n_steps + 1, 2] points (x, y) in pixels."""
    step = length / n_steps
    turns = np.cumsum(rng.normal(0.0, turn_sigma, size=n_steps))
    headings = angle + turns
    steps = np.stack([np.cos(headings), np.sin(headings)], axis=1) * step
    return np.vstack([start[None], start[None] + np.cumsum(steps, axis=0)])


def _stroke_alpha(size: int, strokes: list[tuple[Array, Array]], supersample: int = 4) -> Array:
    """Antialiased alpha of polylines; each stroke = (points [N,2], widths [N-1]) in pixels.
    Drawn by PIL at `supersample`x, then box-downsampled."""
    big = size * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for points, widths in strokes:
        pts = points * supersample
        for i in range(len(pts) - 1):
            w = max(1, int(round(widths[i] * supersample)))
            seg = [tuple(pts[i]), tuple(pts[i + 1])]
            draw.line(seg, fill=255, width=w)
            r = w / 2.0  # round joints, so segments don't leave notches
            for x, y in seg:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    arr = np.asarray(canvas, dtype=np.float32) / 255.0
    return arr.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def _defect_mask(clean: Array, defective: Array, tolerance: float = MASK_TOLERANCE) -> Array:
    """Pixels that changed by more than `tolerance` in some channel; 1-pixel gaps closed,
    holes filled, specks dropped (< 4 px; smaller at small sizes, where a whole defect
    can be that small)."""
    changed = np.abs(defective - clean).max(axis=-1) > tolerance
    padded = np.pad(changed, 2)
    closed = ndimage.binary_closing(padded, structure=np.ones((3, 3), bool))[2:-2, 2:-2]
    mask = ndimage.binary_fill_holes(closed)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        min_speck = max(1, min(4, clean.shape[0] // 24))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= min_speck))
    return mask


def _place_defect(attempt: Callable[[], tuple[Array, Array]], size: int, what: str) -> tuple[Array, Array]:
    """Calls `attempt() -> (defective image, mask)` until the mask is neither a speck nor
    huge. Small images can make every try tiny: then the largest non-empty one is kept."""
    best: tuple[Array, Array] | None = None
    for _ in range(_MAX_DEFECT_ATTEMPTS):
        image, mask = attempt()
        area = int(mask.sum())
        if _min_defect_area(size) <= area <= _max_defect_area(size):
            return image, mask
        if 0 < area <= _max_defect_area(size) and (best is None or area > int(best[1].sum())):
            best = (image, mask)
    if best is None:
        raise RuntimeError(f"could not draw a visible {what} at image_size={size}; use larger images")
    logger.debug("%s at image_size=%d: kept a %d-pixel defect", what, size, int(best[1].sum()))
    return best


def _to_uint8(img: Array) -> Array:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _lighting(size: int, rng: np.random.Generator, gain: tuple[float, float], slope: tuple[float, float]) -> Array:
    """Multiplicative illumination: global gain times a linear gradient in a random direction."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
    phi = rng.uniform(0, 2 * np.pi)
    field = rng.uniform(*gain) * (1.0 + rng.uniform(*slope) * (xx * np.cos(phi) + yy * np.sin(phi)))
    return field[..., None].astype(np.float32)


def _sensor_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> Array:
    # Uniform noise with the requested std: indistinguishable at a few grey levels and
    # several times cheaper to draw than Gaussian noise.
    return (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(sigma * math.sqrt(12.0))


# ============================================================================ textures
# Tint ramps (dark colour, light colour) applied to the grey photographs; brick is
# anisotropic (courses run horizontally, perspective), so it is never rotated.
_OIL, _RUST, _CHALK = (0.22, 0.18, 0.14), (0.62, 0.32, 0.12), (1.00, 1.00, 0.97)
_STEEL_CHIPS = ((0.10, 0.10, 0.12), (0.70, 0.72, 0.80))
_STRAW = ((0.25, 0.12, 0.02), (0.95, 0.75, 0.35))
_RUBBER = ((0.02, 0.02, 0.02), (0.45, 0.42, 0.40))
_FIBRE = ((0.20, 0.05, 0.15), (0.90, 0.55, 0.80))
# Tint ramps (dark, light colour) for the grey photographs; brick is anisotropic (courses
# run horizontally, perspective), so it is never rotated. Each material has a couple of
# characteristic stains and foreign materials (photograph, tint) -- as a production line
# has its own failure modes -- so defects of a type look alike across images, which is
# what makes defective images in the training set harmful for plain PatchCore.
_TEXTURES: dict[str, dict] = {
    "brick": dict(dark=(0.16, 0.07, 0.05), light=(0.98, 0.74, 0.62), isotropic=False, window=0.5,
                  stains=(_OIL, _CHALK), foreign=(("gravel", _STEEL_CHIPS), ("moon", _RUBBER))),
    "grass": dict(dark=(0.05, 0.10, 0.02), light=(0.78, 0.92, 0.50), isotropic=True, window=0.5,
                  stains=(_CHALK, _RUST), foreign=(("gravel", _STRAW), ("brick", _FIBRE))),
    "gravel": dict(dark=(0.10, 0.09, 0.08), light=(0.95, 0.92, 0.86), isotropic=True, window=0.42,
                   stains=(_RUST, _OIL), foreign=(("grass", _STRAW), ("ihc", _FIBRE))),
}


def _jitter_colour(colour: tuple, rng: np.random.Generator, amount: float = 0.03) -> Array:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 1)


@lru_cache(maxsize=None)
def _photo(name: str) -> Array:
    """A photograph bundled in scikit-image's wheel, grey float32 in [0, 1] (read-only)."""
    import skimage.data

    loader = {"brick": skimage.data.brick, "grass": skimage.data.grass, "gravel": skimage.data.gravel,
              "moon": skimage.data.moon, "ihc": skimage.data.immunohistochemistry}[name]
    arr = np.asarray(loader())
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=-1)
    out = (arr.astype(np.float32) / 255.0)
    out.setflags(write=False)
    return out


def _sample_crop(source: Array, size: int, window: float, angle: float, flip: bool,
                 rng: np.random.Generator) -> Array:
    """A `size`x`size` view of `window` source pixels, rotated by `angle`, at a random
    position that keeps the rotated window inside the photograph."""
    h, w = source.shape
    scale = window / size
    cos, sin = math.cos(angle), math.sin(angle)
    half_extent = 0.5 * window * (abs(cos) + abs(sin))
    if 2 * half_extent >= min(h, w):
        raise ValueError("texture window larger than the source photograph")
    cx = rng.uniform(half_extent, w - half_extent)
    cy = rng.uniform(half_extent, h - half_extent)
    a, b = scale * cos, -scale * sin
    d, e = scale * sin, scale * cos
    if flip:
        a, d = -a, -d
    c = cx - (a * size / 2 + b * size / 2)
    f = cy - (d * size / 2 + e * size / 2)
    img = Image.fromarray(np.ascontiguousarray(source, dtype=np.float32))  # float32 -> mode "F"
    out = img.transform((size, size), Image.Transform.AFFINE, (a, b, c, d, e, f),
                        resample=Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def _tint(grey: Array, dark: tuple, light: tuple) -> Array:
    dark_a, light_a = np.asarray(dark, np.float32), np.asarray(light, np.float32)
    return dark_a + (light_a - dark_a) * np.clip(grey, 0.0, 1.0)[..., None]


def _texture_image(category: str, size: int, rng: np.random.Generator) -> Array:
    spec = _TEXTURES[category]
    source = _photo(category)
    window = spec["window"] * source.shape[0] * rng.uniform(0.92, 1.08)
    if spec["isotropic"]:
        angle, flip = rng.uniform(0, 2 * np.pi), bool(rng.integers(2))
        window = min(window, 0.68 * source.shape[0])  # rotated window must fit the photo
    else:
        angle, flip = rng.uniform(-0.03, 0.03), bool(rng.integers(2))
    grey = _sample_crop(source, size, window, angle, flip, rng)
    mean = float(grey.mean())
    grey = (grey - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-0.04, 0.04)
    rgb = _tint(grey, spec["dark"], spec["light"])
    return rgb * _lighting(size, rng, gain=(0.97, 1.03), slope=(0.0, 0.08))


def _scratch(img: Array, rng: np.random.Generator, coverage: Array | None = None, centre: Array | None = None,
             unit: float | None = None, length_range: tuple[float, float] = (0.2, 0.5),
             strength_range: tuple[float, float] = (0.65, 0.95)) -> Array:
    """Thin bright or dark curved line, intensity varying along its length. `unit` is
    the pixel scale (image side / 224); lengths are fractions of 224 * unit."""
    size = img.shape[0]
    unit = size / 224.0 if unit is None else unit
    length = rng.uniform(*length_range) * 224 * unit
    if centre is None:
        centre = _defect_centre(size, rng)
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    points = _curve_points(centre - 0.5 * length * direction, angle, length, 12, rng.uniform(0.02, 0.08), rng)
    width = max(1.0, rng.uniform(1.2, 2.6) * unit)  # thinner than a pixel would fade out
    alpha = _stroke_alpha(size, [(points, np.full(len(points) - 1, width))])
    alpha *= np.clip(0.75 + 0.25 * _smooth_field((size, size), 6 * unit, rng), 0.3, 1.0)
    if coverage is not None:
        alpha *= coverage
    a = (alpha * rng.uniform(*strength_range))[..., None]
    if rng.random() < 0.6:  # bright: fresh metal / scraped surface
        target = np.clip(img * 0.3 + rng.uniform(0.7, 0.9), 0, 1)
    else:
        target = img * rng.uniform(0.2, 0.4)
    return img * (1 - a) + target * a


def _crack(img: Array, rng: np.random.Generator, coverage: Array | None = None, centre: Array | None = None,
           unit: float | None = None, length_range: tuple[float, float] = (0.25, 0.5)) -> Array:
    """Dark jagged line with tapering width and 1-3 branches, and a faint dark halo.
    Lengths are fractions of 224 * unit pixels (unit = image side / 224 by default)."""
    size = img.shape[0]
    unit = size / 224.0 if unit is None else unit
    length = rng.uniform(*length_range) * 224 * unit
    angle = rng.uniform(0, 2 * np.pi)
    if centre is None:
        centre = _defect_centre(size, rng)
    start = centre - 0.5 * length * np.array([np.cos(angle), np.sin(angle)])
    main = _curve_points(start, angle, length, 24, 0.35, rng)
    base_width = rng.uniform(2.0, 3.5) * unit
    taper = np.minimum(1.0, 1.6 * np.sin(np.linspace(0.15, np.pi - 0.15, len(main) - 1)))
    strokes = [(main, base_width * taper)]
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(4, len(main) - 4))
        b_len = length * rng.uniform(0.15, 0.4)
        b_angle = angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        branch = _curve_points(main[i], b_angle, b_len, 10, 0.4, rng)
        strokes.append((branch, base_width * taper[i] * np.linspace(0.8, 0.3, len(branch) - 1)))
    alpha = _stroke_alpha(size, strokes)
    halo = ndimage.gaussian_filter(alpha, 1.5 * unit)
    darkening = np.clip(0.85 * alpha + 0.25 * halo, 0, 0.92)
    if coverage is not None:
        darkening = darkening * coverage
    return img * (1 - darkening[..., None])


def _stain(img: Array, category: str, rng: np.random.Generator, radius_range: tuple[float, float] = (0.06, 0.14)
           ) -> Array:
    """Translucent coloured blob with blurred edges (oil, rust, resin, chalk)."""
    size = img.shape[0]
    unit = size / 224.0
    radius = rng.uniform(*radius_range) * size
    alpha = _blob_alpha(size, _defect_centre(size, rng), radius, 2.0, rng, roughness=0.45)
    alpha = ndimage.gaussian_filter(alpha, rng.uniform(1.5, 4.0) * unit)
    alpha *= np.clip(0.8 + 0.2 * _smooth_field((size, size), 4 * unit, rng), 0, 1)
    stains = _TEXTURES[category]["stains"]
    colour = _jitter_colour(stains[int(rng.integers(len(stains)))], rng)
    a = (alpha * rng.uniform(0.65, 0.9))[..., None]
    stained = img * colour * 0.6 + colour * 0.4  # keeps some of the texture under the stain
    return img * (1 - a) + stained * a


def _foreign_material(img: Array, category: str, rng: np.random.Generator) -> Array:
    """A patch of another material (another photograph, another colour) pasted with a
    soft-edged irregular mask."""
    size = img.shape[0]
    unit = size / 224.0
    options = _TEXTURES[category]["foreign"]
    source_name, (dark, light) = options[int(rng.integers(len(options)))]
    source = _photo(source_name)
    window = source.shape[0] * rng.uniform(0.3, 0.45)
    patch = _sample_crop(source, size, window, rng.uniform(0, 2 * np.pi), bool(rng.integers(2)), rng)
    lo, hi = np.percentile(patch, [2, 98])
    patch = (patch - lo) / max(hi - lo, 1e-3)  # full contrast, whatever the source
    patch_rgb = _tint(patch, _jitter_colour(dark, rng), _jitter_colour(light, rng))
    alpha = _blob_alpha(size, _defect_centre(size, rng), rng.uniform(0.05, 0.11) * size,
                        rng.uniform(1.0, 2.5) * unit, rng, roughness=0.5)
    a = alpha[..., None]
    return img * (1 - a) + patch_rgb * a


def _texture_sample(category: str, defect_type: str | None, size: int, rng: np.random.Generator
                    ) -> tuple[Array, Array, Array]:
    """(image, defect-free image, mask) as uint8 RGB, uint8 RGB, bool."""
    clean = _texture_image(category, size, rng)
    noise = _sensor_noise(clean.shape, 0.008, rng)
    mask = np.zeros((size, size), bool)
    image = clean
    if defect_type is not None:
        apply: Callable[[Array], Array] = {
            "scratch": lambda x: _scratch(x, rng),
            "crack": lambda x: _crack(x, rng),
            "stain": lambda x: _stain(x, category, rng),
            "foreign_material": lambda x: _foreign_material(x, category, rng),
        }[defect_type]

        def attempt() -> tuple[Array, Array]:
            image = apply(clean)
            if rng.random() < 0.25:  # sometimes two defects of the kind
                image = apply(image)
            return image, _defect_mask(np.clip(clean, 0, 1), np.clip(image, 0, 1))

        image, mask = _place_defect(attempt, size, f"{defect_type} on {category}")
    return _to_uint8(image + noise), _to_uint8(clean + noise), mask


# ============================================================================ rendered objects
# Each object is rendered once per image size in its own frame ("canvas": the image plus
# a margin, object centred, fixed light) and cached; every picture is that canvas warped
# to a slightly different pose, with its own grain, lighting field and sensor noise.
# A defective picture re-renders the canvas with the defect and takes the same warp,
# so the defect-free twin differs from it only where the defect is.
_DESIGN_SEED = 20240607  # fixed artwork: the same part in every image


def _margin(size: int) -> int:
    return int(math.ceil(0.08 * size))


@lru_cache(maxsize=8)
def _frame_coords(size: int) -> tuple[Array, Array]:
    """Object-frame coordinates (units of the image side, origin at the object centre)
    of every canvas pixel centre."""
    canvas = size + 2 * _margin(size)
    axis = ((np.arange(canvas, dtype=np.float32) + 0.5) - canvas / 2) / size
    u, v = np.meshgrid(axis, axis)
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


@lru_cache(maxsize=8)
def _design_noise(size: int, sigma_px: float, which: int) -> Array:
    canvas = size + 2 * _margin(size)
    rng = np.random.default_rng([_DESIGN_SEED, size, which])
    out = _smooth_field((canvas, canvas), sigma_px * size / 224, rng)
    out.setflags(write=False)
    return out


def _cover(dist: Array, size: int) -> Array:
    """Antialiased coverage from a signed distance (negative inside, image-side units)."""
    return np.clip(0.5 - dist * size, 0.0, 1.0).astype(np.float32)


def _box_sdf(u: Array, v: Array, half_u: float, half_v: float) -> Array:
    qu, qv = np.abs(u) - half_u, np.abs(v) - half_v
    return np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0)


def _hexagon_sdf(u: Array, v: Array, apothem: float) -> Array:
    """Regular hexagon with flat top/bottom (Inigo Quilez' exact SDF)."""
    kx, ky, kz = -0.866025404, 0.5, 0.577350269
    pu, pv = np.abs(u), np.abs(v)
    dot = np.minimum(kx * pu + ky * pv, 0.0)
    pu, pv = pu - 2 * dot * kx, pv - 2 * dot * ky
    pu = pu - np.clip(pu, -kz * apothem, kz * apothem)
    pv = pv - apothem
    return np.hypot(pu, pv) * np.sign(pv)


def _paint(img: Array, coverage: Array, colour: Array | tuple) -> Array:
    a = coverage[..., None]
    return img * (1 - a) + np.asarray(colour, np.float32) * a


def _to_canvas_px(size: int, point: Array) -> Array:
    """Object-frame point (units) -> canvas pixel coordinates (x, y)."""
    return np.asarray(point, np.float64) * size + (size + 2 * _margin(size)) / 2


Window = tuple[slice, slice]


def _defect_window(size: int, defect: dict) -> Window:
    """Square canvas region that holds everything `defect` changes (its "roi": centre
    and half side in object units), so a defective picture re-renders only that."""
    canvas = size + 2 * _margin(size)
    centre, half_units = defect["roi"]
    centre_px = _to_canvas_px(size, centre)
    half = int(math.ceil(half_units * size)) + 2
    n = min(2 * half, canvas)
    x0 = int(np.clip(round(centre_px[0]) - half, 0, canvas - n))
    y0 = int(np.clip(round(centre_px[1]) - half, 0, canvas - n))
    return slice(y0, y0 + n), slice(x0, x0 + n)


def _frame(size: int, window: Window | None) -> tuple[Array, Array, Window]:
    full = (slice(None), slice(None))
    window = full if window is None else window
    u, v = _frame_coords(size)
    return u[window], v[window], window


def _overlay_defect(img: Array, size: int, defect: dict, coverage: Array, window: Window) -> Array:
    """Contamination / scratch drawn over the (unlit) object, restricted to `coverage`.
    `img` is the canvas region `window`."""
    rng = np.random.default_rng(defect["seed"])
    canvas = img.shape[0]
    unit = size / 224.0
    origin = np.array([window[1].start or 0, window[0].start or 0], np.float64)
    centre = _to_canvas_px(size, defect["centre"]) - origin
    if defect["kind"] == "contamination":
        alpha = _blob_alpha(canvas, centre, defect["radius"] * size, 1.5 * unit, rng, roughness=0.5)
        alpha = ndimage.gaussian_filter(alpha, 0.8 * unit)
        alpha *= np.clip(0.85 + 0.25 * _smooth_field((canvas, canvas), 2 * unit, rng), 0, 1) * coverage
        colour = np.asarray(defect["colour"], np.float32)
        a = (alpha * defect["opacity"])[..., None]
        return img * (1 - a) + (img * 0.3 + colour * 0.7) * a
    if defect["kind"] == "scratch":
        return _scratch(img, rng, coverage=coverage, centre=centre, unit=unit,
                        length_range=defect["length"], strength_range=defect["strength"])
    raise AssertionError(defect["kind"])


def _object_point(rng: np.random.Generator, r_min: float, r_max: float) -> Array:
    r, ang = rng.uniform(r_min, r_max), rng.uniform(0, 2 * np.pi)
    return r * np.array([math.cos(ang), math.sin(ang)])


# ---------------------------------------------------------------------------- nut
_NUT_APOTHEM = 0.29               # across flats = 0.58 of the image side
_NUT_FACE = 0.93 * _NUT_APOTHEM   # flat circular top face (the chamfer cuts the corners)
_NUT_HOLE = 0.47 * _NUT_APOTHEM
_NUT_SINK = _NUT_HOLE + 0.035     # countersink ring around the hole
_NUT_LIGHT = -2.3                 # light from the upper left (radians, image y down)
_NUT_CONTAMINANTS = ((0.12, 0.09, 0.06),)  # grease


def _nut_defect(defect_type: str, rng: np.random.Generator) -> dict:
    if defect_type == "chipped":
        # the two corners that hit the feeder rail: the failure recurs at the same place
        ang = math.pi / 6 + int(rng.choice([0, 3])) * math.pi / 3  # hexagon corners (flat top/bottom)
        corner = _NUT_APOTHEM / math.cos(math.pi / 6)
        centre = corner * rng.uniform(0.9, 1.0) * np.array([math.cos(ang), math.sin(ang)])
        radius = float(rng.uniform(0.035, 0.06))
        return dict(kind="chipped", centre=centre, radius=radius, seed=int(rng.integers(2**31)),
                    roi=(centre, 1.3 * radius + 0.02))
    if defect_type == "dent":
        ang = rng.uniform(0, 2 * np.pi)
        # distance from the centre to the hexagon outline in that direction
        edge_r = _NUT_APOTHEM / math.cos(((ang % (math.pi / 3)) - math.pi / 6))
        direction = np.array([math.cos(ang), math.sin(ang)])
        sigma = float(rng.uniform(0.03, 0.05))
        return dict(kind="dent", centre=0.98 * edge_r * direction, direction=direction,
                    depth=float(rng.uniform(0.01, 0.02)), sigma=sigma, roi=(0.98 * edge_r * direction, 3.5 * sigma))
    if defect_type == "contamination":
        colour = _jitter_colour(_NUT_CONTAMINANTS[int(rng.integers(len(_NUT_CONTAMINANTS)))], rng)
        centre, radius = _object_point(rng, _NUT_SINK, 0.95 * _NUT_APOTHEM), float(rng.uniform(0.018, 0.04))
        return dict(kind="contamination", centre=centre, radius=radius, colour=colour,
                    opacity=float(rng.uniform(0.45, 0.8)), seed=int(rng.integers(2**31)),
                    roi=(centre, 1.9 * radius + 0.015))
    if defect_type == "scratch":
        centre = _object_point(rng, _NUT_SINK + 0.02, 0.85 * _NUT_APOTHEM)
        return dict(kind="scratch", centre=centre, length=(0.12, 0.3), strength=(0.45, 0.8),
                    seed=int(rng.integers(2**31)),
                    roi=(centre, 0.5 * 0.3 + 0.03))
    raise ValueError(defect_type)


def _render_nut(size: int, defect: dict | None, window: Window | None = None) -> tuple[Array, Array]:
    """Top view of a hexagonal steel nut (chamfered corners, countersunk threaded hole)
    on a dark cloth, in the object frame. Returns (RGB in [0, 1], grain amplitude)."""
    u, v, window = _frame(size, window)
    lu, lv = math.cos(_NUT_LIGHT), math.sin(_NUT_LIGHT)
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    radial_u, radial_v = u / np.maximum(r, 1e-6), v / np.maximum(r, 1e-6)
    metal_noise = _design_noise(size, 0.8, 0)[window]

    # outline (a dent pushes it in: the SDF is evaluated at outward-warped points)
    su, sv = u, v
    dent_bump = None
    if defect is not None and defect["kind"] == "dent":
        du, dv = u - defect["centre"][0], v - defect["centre"][1]
        dent_bump = np.exp(-(du * du + dv * dv) / (2 * defect["sigma"] ** 2))
        su = u + defect["depth"] * dent_bump * defect["direction"][0]
        sv = v + defect["depth"] * dent_bump * defect["direction"][1]
    hex_dist = _hexagon_sdf(su, sv, _NUT_APOTHEM)
    if defect is not None and defect["kind"] == "chipped":
        rng = np.random.default_rng(defect["seed"])
        cu, cv = u - defect["centre"][0], v - defect["centre"][1]
        ang = np.arctan2(cv, cu)
        wobble = 1 + 0.18 * np.cos(3 * ang + rng.uniform(0, 6.3)) + 0.08 * np.cos(7 * ang + rng.uniform(0, 6.3))
        cut_dist = np.hypot(cu, cv) - defect["radius"] * wobble
        hex_dist = np.maximum(hex_dist, -cut_dist)
    body = _cover(hex_dist, size)

    # background: dark blue-grey cloth with the nut's soft shadow
    shadow = np.clip(0.5 - _hexagon_sdf(u + 0.02 * lu, v + 0.02 * lv, _NUT_APOTHEM) / 0.04, 0, 1)
    bg = (0.26 + 0.018 * _design_noise(size, 1.5, 1)[window]) * (1 - 0.45 * shadow)
    img = bg[..., None] * np.array([0.92, 0.97, 1.08], np.float32)

    # metal shading
    face = _cover(r - _NUT_FACE, size)
    sink = _cover(r - _NUT_SINK, size)
    hole = _cover(r - _NUT_HOLE, size)
    facing = radial_u * lu + radial_v * lv  # > 0: the slope faces the light
    turned = 0.02 * np.sin(r * 2 * np.pi / 0.0075)  # lathe marks on the face
    flat = 0.64 + turned + 0.03 * metal_noise
    chamfer = 0.50 + 0.22 * facing + 0.02 * metal_noise
    countersink = 0.42 - 0.25 * facing
    depth = np.clip(r / _NUT_HOLE, 0, 1)
    thread = (0.10 + 0.16 * depth) * (0.65 + 0.35 * np.sin(2 * np.pi * (r / 0.011) - theta))
    metal = chamfer * (1 - face) + flat * face
    metal = metal * (1 - sink) + countersink * sink
    metal = metal * (1 - hole) + thread * hole
    metal = metal * (1 - 0.15 * np.clip(1 - np.abs(r - _NUT_FACE) * size / 1.2, 0, 1))  # face/chamfer crease
    if dent_bump is not None:
        # the dented surface tilts towards the dent's centre: shading gradient around it
        du, dv = u - defect["centre"][0], v - defect["centre"][1]
        metal = metal + 0.4 * dent_bump * (du * lu + dv * lv) / defect["sigma"] - 0.05 * dent_bump
    if defect is not None and defect["kind"] == "chipped":
        fracture = np.clip(1 - np.abs(cut_dist) * size / 3.0, 0, 1) * body  # rough broken surface
        metal = metal * (1 - 0.35 * fracture) + 0.05 * fracture * metal_noise
    steel = metal[..., None] * np.array([0.97, 0.99, 1.03], np.float32)
    img = img * (1 - body[..., None]) + steel * body[..., None]
    if defect is not None and defect["kind"] in ("contamination", "scratch"):
        img = _overlay_defect(img, size, defect, body * (1 - hole), window)
    grain = 0.012 + 0.012 * body  # cloth fibres vs metal grain
    return img.astype(np.float32), grain


# ---------------------------------------------------------------------------- chip
_CHIP_BODY = 0.19                 # half side of the black package
_CHIP_PINS = 8                    # pins per side (QFP-32)
_CHIP_PIN_SPAN = 0.78 * _CHIP_BODY
_CHIP_PITCH = 2 * _CHIP_PIN_SPAN / (_CHIP_PINS - 1)
_CHIP_PIN_HALF_W = 0.22 * _CHIP_PITCH
_CHIP_PIN_LEN = 0.06
_CHIP_PAD_HALF_W = 0.36 * _CHIP_PITCH
_CHIP_SOLDER = (0.80, 0.80, 0.76)
_CHIP_LIGHT = -2.2
_CHIP_CONTAMINANTS = ((0.75, 0.55, 0.15),)  # flux residue


@lru_cache(maxsize=1)
def _chip_design() -> dict:
    """The board and package artwork: fixed (the same part in every image)."""
    rng = np.random.default_rng(_DESIGN_SEED)
    glyphs = rng.random((3, 7, 5, 3)) < 0.55  # 3 lines x 7 characters of 5x3 dots
    glyphs[2, 4:] = False                     # last line shorter
    has_trace = rng.random((4, _CHIP_PINS)) < 0.7
    trace_len = rng.uniform(0.03, 0.1, size=(4, _CHIP_PINS))
    solder_blob = rng.uniform(0.85, 1.15, size=(4, _CHIP_PINS))  # each joint a bit different
    return dict(glyphs=glyphs, has_trace=has_trace, trace_len=trace_len, solder_blob=solder_blob)


def _side_frame(u: Array, v: Array, side: int) -> tuple[Array, Array]:
    """Object frame (u, v) -> (outward s, along-side t) for side 0 right, 1 bottom, 2 left, 3 top."""
    return [(u, v), (v, -u), (-u, -v), (-v, u)][side]


def _pin_index(t: Array) -> tuple[Array, Array]:
    idx = np.clip(np.rint((t + _CHIP_PIN_SPAN) / _CHIP_PITCH), 0, _CHIP_PINS - 1).astype(np.int64)
    return idx, t - (-_CHIP_PIN_SPAN + idx * _CHIP_PITCH)


def _side_point(side: int, s: float, t: float) -> Array:
    """(outward s, along-side t) on `side` -> object frame (u, v); inverse of _side_frame."""
    return np.array([(s, t), (-t, s), (-s, -t), (t, -s)][side], np.float64)


def _chip_defect(defect_type: str, rng: np.random.Generator) -> dict:
    side, pin = int(rng.integers(4)), int(rng.integers(_CHIP_PINS))
    if defect_type in ("missing_pin", "bent_pin"):
        pin = int(rng.choice([0, _CHIP_PINS - 1]))  # corner pins: the ones handling damages
    pin_t = -_CHIP_PIN_SPAN + pin * _CHIP_PITCH
    pin_centre = _side_point(side, _CHIP_BODY + 0.5 * _CHIP_PIN_LEN, pin_t)
    if defect_type == "missing_pin":
        return dict(kind="missing_pin", side=side, pin=pin, roi=(pin_centre, 0.06))
    if defect_type == "bent_pin":
        return dict(kind="bent_pin", side=side, pin=pin, angle=float(rng.choice([-1, 1]) * rng.uniform(0.35, 0.6)),
                    roi=(pin_centre, 0.07))
    if defect_type == "solder_bridge":
        pin = min(pin, _CHIP_PINS - 2)
        centre = _side_point(side, _CHIP_BODY + 0.75 * _CHIP_PIN_LEN, -_CHIP_PIN_SPAN + (pin + 0.5) * _CHIP_PITCH)
        return dict(kind="solder_bridge", side=side, pin=pin, seed=int(rng.integers(2**31)), roi=(centre, 0.05))
    if defect_type == "contamination":
        reach = _CHIP_BODY + _CHIP_PIN_LEN
        colour = _jitter_colour(_CHIP_CONTAMINANTS[int(rng.integers(len(_CHIP_CONTAMINANTS)))], rng)
        centre, radius = rng.uniform(-reach, reach, 2), float(rng.uniform(0.02, 0.045))
        return dict(kind="contamination", centre=centre, radius=radius, colour=colour,
                    opacity=float(rng.uniform(0.6, 0.85)), seed=int(rng.integers(2**31)),
                    roi=(centre, 1.9 * radius + 0.015))
    if defect_type == "scratch":
        centre = rng.uniform(-0.6, 0.6, 2) * _CHIP_BODY
        return dict(kind="scratch", centre=centre, length=(0.1, 0.25), strength=(0.6, 0.9),
                    seed=int(rng.integers(2**31)),
                    roi=(centre, 0.5 * 0.25 + 0.03))
    raise ValueError(defect_type)


def _pin_shade(along: Array, across: Array) -> Array:
    """Gull-wing pin: the shoulder bends down (darker), the foot lies flat (bright),
    rounded across its width."""
    profile = 0.55 + 0.3 * np.clip((along - 0.3) / 0.25, 0, 1) - 0.15 * np.exp(-((along - 0.25) / 0.08) ** 2)
    return profile * (1 - 0.3 * across ** 2)


def _render_chip(size: int, defect: dict | None, window: Window | None = None) -> tuple[Array, Array]:
    """Top view of a QFP-32 package soldered on a green PCB (pads, traces, vias,
    silkscreen, laser marking), in the object frame. Returns (RGB in [0, 1], grain amplitude)."""
    design = _chip_design()
    u, v, window = _frame(size, window)
    lu, lv = math.cos(_CHIP_LIGHT), math.sin(_CHIP_LIGHT)
    kind = None if defect is None else defect["kind"]

    img = np.array([0.10, 0.36, 0.20], np.float32) * (1 + 0.06 * _design_noise(size, 1.0, 2)[window])[..., None]
    pads, traces, via_ring, via_hole, pins, pin_shade, solder = (np.zeros(u.shape, np.float32) for _ in range(7))
    pad_start, pad_end = _CHIP_BODY + 0.012, _CHIP_BODY + _CHIP_PIN_LEN + 0.012
    for side in range(4):
        s, t = _side_frame(u, v, side)
        idx, dt = _pin_index(t)
        np.maximum(pads, _cover(_box_sdf(s - 0.5 * (pad_start + pad_end), dt, 0.5 * (pad_end - pad_start),
                                         _CHIP_PAD_HALF_W), size), out=pads)
        length = design["trace_len"][side][idx]
        has = design["has_trace"][side][idx]
        np.maximum(traces, _cover(_box_sdf(s - (pad_end + 0.5 * length), dt, 0.5 * length,
                                           0.3 * _CHIP_PAD_HALF_W), size) * has, out=traces)
        via_r = np.hypot(s - (pad_end + length), dt)
        np.maximum(via_ring, _cover(via_r - 0.011, size) * has, out=via_ring)
        np.maximum(via_hole, _cover(via_r - 0.005, size) * has, out=via_hole)

        present = np.ones(s.shape, bool)
        if kind in ("missing_pin", "bent_pin") and defect["side"] == side:
            present = idx != defect["pin"]
        cov = _cover(_box_sdf(s - (_CHIP_BODY + 0.5 * _CHIP_PIN_LEN), dt, 0.5 * _CHIP_PIN_LEN,
                              _CHIP_PIN_HALF_W), size) * present
        shade = _pin_shade(np.clip((s - _CHIP_BODY) / _CHIP_PIN_LEN, 0, 1), np.clip(dt / _CHIP_PIN_HALF_W, -1, 1))
        np.maximum(pins, cov, out=pins)
        pin_shade = np.where(cov > 0, shade, pin_shade)
        blob = design["solder_blob"][side][idx]
        fillet = np.hypot(np.maximum(np.abs(dt) - 0.9 * _CHIP_PIN_HALF_W, 0) / 1.2,
                          (s - (_CHIP_BODY + 0.85 * _CHIP_PIN_LEN)) / (0.9 * blob)) - 0.012
        np.maximum(solder, _cover(fillet, size) * present, out=solder)

    img = _paint(img, traces, (0.20, 0.52, 0.26))
    img = _paint(img, via_ring, (0.78, 0.68, 0.40))
    img = _paint(img, via_hole, (0.05, 0.06, 0.05))
    img = _paint(img, pads, (0.86, 0.68, 0.36))  # gold-plated (ENIG) pads
    outline = _box_sdf(u, v, pad_end + 0.028, pad_end + 0.028)  # silkscreen, pin-1 corner dot
    silk = np.maximum(_cover(np.abs(outline) - 0.0045, size),
                      _cover(np.hypot(u + pad_end + 0.045, v + pad_end + 0.045) - 0.008, size))
    img = _paint(img, silk, (0.90, 0.91, 0.88))
    solder_colour = np.asarray(_CHIP_SOLDER, np.float32)
    img = _paint(img, solder * 0.9, solder_colour * 0.92)

    if kind == "bent_pin":
        s, t = _side_frame(u, v, defect["side"])
        ds, dtt = s - _CHIP_BODY, t - (-_CHIP_PIN_SPAN + defect["pin"] * _CHIP_PITCH)
        c, sn = math.cos(defect["angle"]), math.sin(defect["angle"])
        bs, bt = c * ds + sn * dtt, -sn * ds + c * dtt
        cov = _cover(_box_sdf(bs - 0.5 * _CHIP_PIN_LEN, bt, 0.5 * _CHIP_PIN_LEN, _CHIP_PIN_HALF_W), size)
        shade = _pin_shade(np.clip(bs / _CHIP_PIN_LEN, 0, 1), np.clip(bt / _CHIP_PIN_HALF_W, -1, 1))
        np.maximum(pins, cov, out=pins)
        pin_shade = np.where(cov > 0, shade, pin_shade)
    img = img * (1 - pins[..., None]) + (pins * pin_shade)[..., None] * np.array([0.95, 0.95, 0.93], np.float32)
    if kind == "solder_bridge":
        rng = np.random.default_rng(defect["seed"])
        s, t = _side_frame(u, v, defect["side"])
        dt = t - (-_CHIP_PIN_SPAN + (defect["pin"] + 0.5) * _CHIP_PITCH)
        ds = s - (_CHIP_BODY + 0.75 * _CHIP_PIN_LEN)
        wobble = 1 + 0.15 * np.cos(3 * np.arctan2(dt, ds) + rng.uniform(0, 6.3))
        ell = np.hypot(dt / (0.75 * _CHIP_PITCH), ds / (0.4 * _CHIP_PIN_LEN))
        bridge = _cover((ell - wobble) * 0.02, size)
        glint = np.exp(-((dt / (0.3 * _CHIP_PITCH)) ** 2 + ((ds + 0.05 * _CHIP_PIN_LEN) / (0.15 * _CHIP_PIN_LEN)) ** 2))
        img = _paint(img, bridge, solder_colour * 0.85) + (bridge * 0.2 * glint)[..., None]

    # package: black epoxy, bevelled edge, pin-1 dimple, laser marking
    body_d = _box_sdf(u, v, _CHIP_BODY, _CHIP_BODY)
    body = _cover(body_d, size)
    bevel = np.clip(1 + body_d / 0.012, 0, 1)  # 1 at the edge, 0 on the flat top
    edge_facing = np.where(np.abs(u) > np.abs(v), np.sign(u) * lu, np.sign(v) * lv)
    epoxy = 0.11 + 0.012 * _design_noise(size, 0.7, 3)[window] + bevel * (0.05 + 0.07 * edge_facing)
    du, dv = u + _CHIP_BODY - 0.045, v + _CHIP_BODY - 0.045
    dimple = _cover(np.hypot(du, dv) - 0.016, size)
    epoxy = epoxy + 0.05 * dimple - 0.03 * dimple * (du * lu + dv * lv) / 0.016
    dot = 0.0085
    col, row = np.floor((u + 0.115) / dot).astype(np.int64), np.floor((v + 0.04) / dot).astype(np.int64)
    char, cx, line, cy = col // 4, col % 4, row // 7, row % 7  # 3-dot glyphs + gap, 5-dot lines + 2 gap
    inside = (col >= 0) & (char < 7) & (row >= 0) & (line < 3) & (cx < 3) & (cy < 5)
    lit = np.zeros(u.shape, bool)
    lit[inside] = design["glyphs"][line[inside], char[inside], cy[inside], cx[inside]]
    epoxy = epoxy + 0.13 * lit
    package = epoxy[..., None] * np.array([1.0, 1.0, 1.04], np.float32)
    img = img * (1 - body[..., None]) + package * body[..., None]

    if kind == "contamination":
        img = _overlay_defect(img, size, defect, np.ones_like(body), window)
    elif kind == "scratch":
        img = _overlay_defect(img, size, defect, _cover(body_d + 0.01, size), window)
    grain = 0.01 + 0.004 * body
    return img.astype(np.float32), grain


# ---------------------------------------------------------------------------- capsule
_CAPSULE_HALF = 0.2               # half length of the straight part
_CAPSULE_R = 0.115                # shell radius
_CAPSULE_SEAM = 0.03              # the cap (left) overlaps the body up to here
_CAPSULE_CAP_R = _CAPSULE_R + 0.005
_CAPSULE_LIGHT = np.array([-0.35, -0.55, 0.76])  # unit vector, image y down, z towards the camera
_CAPSULE_PRINT_DOT = 0.011
_CAPSULE_PRINT_U = 0.09           # left edge of the imprint (on the ivory body)


def _capsule_sdf(u: Array, v: Array, radius: float) -> Array:
    return np.hypot(u - np.clip(u, -_CAPSULE_HALF, _CAPSULE_HALF), v) - radius


def _capsule_defect(defect_type: str, rng: np.random.Generator) -> dict:
    if defect_type == "squeeze":
        side = float(rng.choice([-1.0, 1.0]))
        centre = np.array([rng.uniform(-0.4, 0.4) * _CAPSULE_HALF, side * _CAPSULE_R])  # gripper marks
        sigma = float(rng.uniform(0.03, 0.05))
        return dict(kind="squeeze", centre=centre, direction=np.array([0.0, side]), sigma=sigma,
                    depth=float(rng.uniform(0.012, 0.022)), roi=(centre, 3.5 * sigma))
    if defect_type == "poke":
        centre = np.array([rng.uniform(-1.1, 1.1) * _CAPSULE_HALF, rng.uniform(-0.55, 0.55) * _CAPSULE_R])
        sigma = float(rng.uniform(0.009, 0.015))
        return dict(kind="poke", centre=centre, sigma=sigma, roi=(centre, 4 * sigma))
    if defect_type == "crack":
        centre = np.array([rng.uniform(-1.0, 1.0) * _CAPSULE_HALF, rng.uniform(-0.5, 0.5) * _CAPSULE_R])
        return dict(kind="crack", centre=centre, length=(0.06, 0.14), seed=int(rng.integers(2**31)),
                    roi=(centre, 0.5 * 0.14 + 0.04))
    if defect_type == "faulty_imprint":
        width = 4 * 4 * _CAPSULE_PRINT_DOT
        centre = np.array([_CAPSULE_PRINT_U + rng.uniform(0.1, 0.9) * width, rng.uniform(-0.02, 0.02)])
        return dict(kind="faulty_imprint", centre=centre, radius=float(rng.uniform(0.018, 0.035)),
                    smear=bool(rng.random() < 0.5), seed=int(rng.integers(2**31)), roi=(centre, 0.09))
    raise ValueError(defect_type)


def _render_capsule(size: int, defect: dict | None, window: Window | None = None) -> tuple[Array, Array]:
    """Two-tone gelatin capsule (red cap, ivory body, dot-matrix imprint) lying on a light
    grey tray, in the object frame. Returns (RGB in [0, 1], grain amplitude)."""
    u, v, window = _frame(size, window)
    kind = None if defect is None else defect["kind"]
    bump = None
    su, sv = u, v
    if kind in ("squeeze", "poke"):
        du, dv = u - defect["centre"][0], v - defect["centre"][1]
        bump = np.exp(-(du * du + dv * dv) / (2 * defect["sigma"] ** 2))
    if kind == "squeeze":  # outline pushed in (SDF evaluated at outward-warped points)
        su = u + defect["depth"] * bump * defect["direction"][0]
        sv = v + defect["depth"] * bump * defect["direction"][1]
    body_d = _capsule_sdf(su, sv, _CAPSULE_R)
    cap_d = np.maximum(_capsule_sdf(su, sv, _CAPSULE_CAP_R), su - _CAPSULE_SEAM)
    shell = _cover(np.minimum(body_d, cap_d), size)
    cap = _cover(cap_d, size)

    shadow_d = _capsule_sdf(u - 0.015, v - 0.022, _CAPSULE_R)
    tray = (0.74 + 0.012 * _design_noise(size, 1.2, 4)[window]) * (1 - 0.35 * np.clip(0.5 - shadow_d / 0.05, 0, 1))
    img = tray[..., None] * np.array([1.0, 0.99, 0.96], np.float32)

    # cylinder / hemisphere normals of the (possibly deformed) shell
    radius = np.where(cap > 0.5, _CAPSULE_CAP_R, _CAPSULE_R)
    nu, nv = (su - np.clip(su, -_CAPSULE_HALF, _CAPSULE_HALF)) / radius, sv / radius
    if bump is not None:  # the dent tilts the surface towards its centre
        du, dv = u - defect["centre"][0], v - defect["centre"][1]
        strength = 1.2 if kind == "poke" else 0.8
        nu = nu - strength * bump * du / defect["sigma"]
        nv = nv - strength * bump * dv / defect["sigma"]
    nz = np.sqrt(np.clip(1 - nu * nu - nv * nv, 0.02, 1))
    norm = np.sqrt(nu * nu + nv * nv + nz * nz)
    lx, ly, lz = _CAPSULE_LIGHT
    diffuse = np.clip((nu * lx + nv * ly + nz * lz) / norm, 0, 1)
    specular = 0.45 * diffuse ** 40
    colour = (np.array([0.80, 0.22, 0.14], np.float32) * cap[..., None]
              + np.array([0.94, 0.91, 0.83], np.float32) * (1 - cap[..., None]))
    gel = colour * (0.35 + 0.7 * diffuse)[..., None] + specular[..., None]
    seam = np.clip(1 - np.abs(su - _CAPSULE_SEAM) * size / 1.0, 0, 1) * (np.abs(sv) < _CAPSULE_CAP_R)
    gel = gel * (1 - 0.25 * seam)[..., None]

    # imprint: 4 dot-matrix characters on the body
    glyphs = _capsule_glyphs()
    gx = (u - _CAPSULE_PRINT_U) / _CAPSULE_PRINT_DOT
    gy = (v + 2.5 * _CAPSULE_PRINT_DOT) / _CAPSULE_PRINT_DOT
    col, row = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    char, cx = col // 4, col % 4
    inside = (col >= 0) & (char < 4) & (row >= 0) & (row < 5) & (cx < 3)
    lit = np.zeros(u.shape, np.float32)
    lit[inside] = glyphs[char[inside], row[inside], cx[inside]]
    # round dots, antialiased (pointwise, so a re-rendered window matches the full canvas)
    dot_d = (np.hypot(gx - col - 0.5, gy - row - 0.5) - 0.45) * _CAPSULE_PRINT_DOT
    ink = lit * _cover(dot_d, size)
    if kind == "faulty_imprint":
        rng = np.random.default_rng(defect["seed"])
        origin = np.array([window[1].start or 0, window[0].start or 0], np.float64)
        centre_px = _to_canvas_px(size, defect["centre"]) - origin
        blob = _blob_alpha(u.shape[0], centre_px, defect["radius"] * size, 1.0 * size / 224, rng, roughness=0.4)
        if defect["smear"]:  # ink dragged sideways: a blurred, shifted copy of the print
            shift = int(round(rng.uniform(3, 6) * size / 224)) * int(rng.choice([-1, 1]))
            smeared = ndimage.gaussian_filter(np.roll(ink, shift, axis=int(rng.integers(2))), 1.5 * size / 224)
            ink = np.maximum(ink * (1 - blob), 0.7 * smeared * blob + ink * (1 - blob))
        else:  # imprint missing there
            ink = ink * (1 - blob)
    gel = gel * (1 - 0.75 * ink)[..., None] + (0.75 * ink)[..., None] * np.array([0.12, 0.12, 0.16], np.float32)
    if kind == "poke":
        gel = gel * (1 - 0.25 * bump)[..., None]  # pit: a little darker at the bottom
    img = img * (1 - shell[..., None]) + gel * shell[..., None]
    if kind == "crack":
        rng = np.random.default_rng(defect["seed"])
        origin = np.array([window[1].start or 0, window[0].start or 0], np.float64)
        inner = _cover(np.minimum(body_d, cap_d) + 0.01, size)
        img = _crack(img, rng, coverage=inner, centre=_to_canvas_px(size, defect["centre"]) - origin,
                     unit=size / 224.0, length_range=defect["length"])
    grain = 0.01 + 0.004 * shell
    return img.astype(np.float32), grain


@lru_cache(maxsize=1)
def _capsule_glyphs() -> Array:
    rng = np.random.default_rng(_DESIGN_SEED + 1)
    return (rng.random((4, 5, 3)) < 0.6).astype(np.float32)


_OBJECTS: dict[str, tuple[Callable, Callable]] = {
    "nut": (_nut_defect, _render_nut),
    "chip": (_chip_defect, _render_chip),
    "capsule": (_capsule_defect, _render_capsule),
}


@lru_cache(maxsize=16)
def _clean_canvas(category: str, size: int) -> Array:
    """[canvas, canvas, 4]: defect-free render + grain amplitude (read-only)."""
    img, grain = _OBJECTS[category][1](size, None)
    out = np.concatenate([img, grain[..., None]], axis=-1).astype(np.float32)
    out.setflags(write=False)
    return out


def _warp(canvas: Array, size: int, offset: Array, rotation: float, scale: float) -> Array:
    """Canvas [C, C, K] -> [size, size, K]: the object moved by `offset` pixels, rotated,
    scaled (bilinear)."""
    centre = canvas.shape[0] / 2
    c, s = math.cos(rotation) / scale, math.sin(rotation) / scale
    ox, oy = size / 2 + offset[0], size / 2 + offset[1]
    coeffs = (c, s, centre - (c * ox + s * oy), -s, c, centre - (-s * ox + c * oy))
    channels = []
    for k in range(canvas.shape[-1]):
        plane = Image.fromarray(np.ascontiguousarray(canvas[..., k], dtype=np.float32))  # mode "F"
        plane = plane.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
        channels.append(np.asarray(plane))
    return np.stack(channels, axis=-1)


def _object_sample(category: str, defect_type: str | None, size: int, rng: np.random.Generator
                   ) -> tuple[Array, Array, Array]:
    """(image, the same picture without the defect, mask)."""
    make_defect, render = _OBJECTS[category]
    unit = size / 224.0
    offset = np.clip(rng.normal(0, 1.5 * unit, 2), -4 * unit, 4 * unit)
    rotation = float(np.clip(rng.normal(0, 0.015), -0.04, 0.04))
    scale = float(rng.uniform(0.985, 1.015))
    lighting = _lighting(size, rng, gain=(0.9, 1.1), slope=(0.05, 0.3))
    grain_field = _smooth_field((size, size), 0.8 * unit, rng)[..., None]
    noise = _sensor_noise((size, size, 3), 0.01, rng)

    def finish(rgb_grain: Array) -> Array:
        return (rgb_grain[..., :3] + rgb_grain[..., 3:] * grain_field) * lighting

    warped_clean = _warp(_clean_canvas(category, size), size, offset, rotation, scale)
    clean = finish(warped_clean)
    image = clean
    mask = np.zeros((size, size), bool)
    if defect_type is not None:

        def attempt() -> tuple[Array, Array]:
            defect = make_defect(defect_type, rng)
            window = _defect_window(size, defect)
            canvas = np.array(_clean_canvas(category, size)[..., :3])
            canvas[window], _ = render(size, defect, window)
            image = finish(np.concatenate([_warp(canvas, size, offset, rotation, scale), warped_clean[..., 3:]], -1))
            return image, _defect_mask(np.clip(clean, 0, 1), np.clip(image, 0, 1))

        image, mask = _place_defect(attempt, size, f"{defect_type} on {category}")
    return _to_uint8(image + noise), _to_uint8(clean + noise), mask


def _sample(category: str, defect_type: str | None, size: int, rng: np.random.Generator
            ) -> tuple[Array, Array, Array]:
    """One picture of `category` (defect-free when `defect_type` is None): (image uint8
    [S,S,3], its defect-free twin uint8 [S,S,3], mask bool [S,S])."""
    if category in _TEXTURES:
        return _texture_sample(category, defect_type, size, rng)
    return _object_sample(category, defect_type, size, rng)


# ============================================================================ public API
_SPLIT_CODES = {"train": 1, "test_good": 2, "test_defect": 3}
_GENERATED_NAME = re.compile(r"^\d{3,}(_mask)?\.png$")
# Written into every generated category folder: later calls only replace images in
# folders that carry it.
MARKER_NAME = ".softpatch_demo.json"


def _image_rng(seed: int, category: str, split: str, index: int, defect_index: int = 0) -> np.random.Generator:
    """Independent stream per image: a category's pictures don't depend on which other
    categories or how many images are generated."""
    return np.random.default_rng([seed, zlib.crc32(category.encode()), _SPLIT_CODES[split], defect_index, index])


def _check_count(name: str, value) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _check_categories(categories) -> tuple[str, ...]:
    if categories is None:
        return DEMO_CATEGORIES
    if isinstance(categories, str):
        categories = [categories]
    try:
        names = list(categories)
    except TypeError:
        raise TypeError(f"categories must be a category name or an iterable of names, got "
                        f"{type(categories).__name__}") from None
    if not names:
        raise ValueError(f"categories is empty; choose from {', '.join(DEMO_CATEGORIES)}")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"category names must be str, got {name!r}")
    unknown = [name for name in names if name not in DEMO_CATEGORIES]
    if unknown:
        raise ValueError(f"unknown demo categor{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(map(repr, unknown))}; valid: {', '.join(DEMO_CATEGORIES)}")
    return tuple(dict.fromkeys(names))  # de-duplicated, order kept


def _split_counts(total: int, kinds: int) -> list[int]:
    return [total // kinds + (i < total % kinds) for i in range(kinds)]


def _holds_foreign_images(category_dir: Path) -> bool:
    """Images in the MVTec sub-folders of a category folder that make_demo_dataset did
    not write (no marker): e.g. a real MVTec AD "capsule" -- never to be deleted."""
    if (category_dir / MARKER_NAME).is_file():
        return False
    return any(path.is_file() and _GENERATED_NAME.match(path.name)
               for sub in ("train", "test", "ground_truth") if (category_dir / sub).is_dir()
               for path in (category_dir / sub).rglob("*"))


def _clear_previous(category_dir: Path) -> None:
    """Remove images an earlier call wrote (NNN.png / NNN_mask.png in the MVTec
    sub-folders), so a smaller rerun leaves no stale files; anything else is kept."""
    if not (category_dir / MARKER_NAME).is_file():
        return
    for sub in ("train", "test", "ground_truth"):
        top = category_dir / sub
        if not top.is_dir():
            continue
        for folder in sorted(p for p in top.iterdir() if p.is_dir()):
            for path in folder.iterdir():
                if path.is_file() and _GENERATED_NAME.match(path.name):
                    path.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()


def _save_png(array: Array, path: Path) -> None:
    # Noisy photographs barely compress: the fastest zlib level loses little size.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _category_images(root: Path, category: str, n_train: int, n_test_good: int, n_test_defect: int,
                     image_size: int, seed: int) -> Iterator[tuple[Array, Path]]:
    """Creates the category's folders and yields (uint8 array, destination) pairs."""
    cat_dir = root / category
    _clear_previous(cat_dir)
    train_dir, good_dir = cat_dir / "train" / "good", cat_dir / "test" / "good"
    train_dir.mkdir(parents=True, exist_ok=True)
    good_dir.mkdir(parents=True, exist_ok=True)
    # marker first: a run that dies half-way leaves a folder the next run may clean up
    marker = dict(generator="softpatch_cuda.demo.make_demo_dataset", category=category, n_train=n_train,
                  n_test_good=n_test_good, n_test_defect=n_test_defect, image_size=image_size, seed=seed)
    (cat_dir / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")
    for split, folder, count in (("train", train_dir, n_train), ("test_good", good_dir, n_test_good)):
        for i in range(count):
            yield _sample(category, None, image_size, _image_rng(seed, category, split, i))[0], folder / f"{i:03d}.png"
    defect_types = DEMO_DEFECT_TYPES[category]
    for k, (defect_type, count) in enumerate(zip(defect_types, _split_counts(n_test_defect, len(defect_types)))):
        if count == 0:
            continue
        test_dir, mask_dir = cat_dir / "test" / defect_type, cat_dir / "ground_truth" / defect_type
        test_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = _image_rng(seed, category, "test_defect", i, defect_index=k + 1)
            image, _, mask = _sample(category, defect_type, image_size, rng)
            yield image, test_dir / f"{i:03d}.png"
            yield mask.astype(np.uint8) * 255, mask_dir / f"{i:03d}_mask.png"


def make_demo_dataset(root: str | os.PathLike, categories: Iterable[str] | str | None = None,
                      n_train: int = 40, n_test_good: int = 10, n_test_defect: int = 15,
                      image_size: int = 224, seed: int = 0) -> Path:
    """Write demo categories under `root` in MVTec AD's layout and return `root` as a Path:

        root/<category>/train/good/000.png ...
        root/<category>/test/good/000.png ...
        root/<category>/test/<defect_type>/000.png ...
        root/<category>/ground_truth/<defect_type>/000_mask.png   (255 = defect, 0 = normal)

    `n_test_defect` images per category are spread evenly over its defect types
    (DEMO_DEFECT_TYPES[category]; a type that would get none gets no folder).
    Same arguments -> byte-identical files. Each category folder gets a small marker
    file (MARKER_NAME, the arguments as JSON); images an earlier call left in a marked
    folder are replaced, while a category folder holding images without the marker
    (e.g. a real MVTec AD "capsule") raises FileExistsError before anything is written.

    Raises ValueError / TypeError for unknown categories (the message lists the valid
    ones), non-positive or non-int counts, image_size < 32, a negative seed;
    FileExistsError when root (or root/<category>) is a file.
    """
    cats = _check_categories(categories)
    n_train = _check_count("n_train", n_train)
    n_test_good = _check_count("n_test_good", n_test_good)
    n_test_defect = _check_count("n_test_defect", n_test_defect)
    if not is_int(image_size):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    image_size = int(image_size)
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    seed = int(seed)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"root exists and is not a directory: {root}")
    for name in cats:
        if (root / name).exists() and not (root / name).is_dir():
            raise FileExistsError(f"{root / name} exists and is not a directory")
        if (root / name).is_dir() and _holds_foreign_images(root / name):
            raise FileExistsError(f"{root / name} holds images that make_demo_dataset did not write "
                                  f"(no {MARKER_NAME}); refusing to overwrite them -- choose another root")

    # PNG encoding (zlib, GIL released) overlaps with drawing the next pictures.
    with ThreadPoolExecutor(max_workers=2) as writer:
        for category in cats:
            start = time.perf_counter()
            pending = [writer.submit(_save_png, image, path)
                       for image, path in _category_images(root, category, n_train, n_test_good, n_test_defect,
                                                           image_size, seed)]
            for future in pending:
                future.result()  # re-raises write errors here
            logger.info("demo category %s: %d train, %d good test, %d defective test images (%dx%d) in %.2f s",
                        category, n_train, n_test_good, n_test_defect, image_size, image_size,
                        time.perf_counter() - start)
    return root


__all__ = ["DEMO_CATEGORIES", "DEMO_DEFECT_TYPES", "DEMO_OBJECTS", "DEMO_TEXTURES", "make_demo_dataset"]
