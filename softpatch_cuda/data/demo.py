"""Demo anomaly-detection data, generated on the fly in MVTec AD's folder layout.

Two kinds of category:

* textures ("brick", "grass", "gravel"): random crops of the real photographs that
  scikit-image ships inside its wheel (no download), lightly tinted, with synthetic
  scratches, cracks, stains and pasted foreign material;
* aligned objects ("nut", "chip"): an object rendered by code at nearly the same pose
  in every image (shifts of a few pixels, a tiny rotation, lighting changes, sensor
  noise), with missing parts, dents, contamination, bent pins, solder bridges...

Every defect is applied to a copy of the defect-free picture, so the ground-truth
mask is exact: the pixels that changed by more than a small tolerance. Output is
byte-identical for a seed; nothing large lives in the repository.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

logger = logging.getLogger(__name__)

DEMO_TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
DEMO_OBJECTS: tuple[str, ...] = ("nut", "chip")
DEMO_CATEGORIES: tuple[str, ...] = DEMO_TEXTURES + DEMO_OBJECTS

TEXTURE_DEFECTS: tuple[str, ...] = ("scratch", "crack", "stain", "foreign_material")
DEMO_DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    **{name: TEXTURE_DEFECTS for name in DEMO_TEXTURES},
    "nut": ("chipped", "dent", "contamination", "scratch"),
    "chip": ("missing_pin", "bent_pin", "solder_bridge", "contamination", "scratch"),
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
    """Smallest accepted mask (pixels): ~0.12 % of the image, so no defect is a speck."""
    return max(12, int(round(0.0012 * size * size)))


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
    holes filled, specks (< 4 px) dropped."""
    changed = np.abs(defective - clean).max(axis=-1) > tolerance
    padded = np.pad(changed, 2)
    closed = ndimage.binary_closing(padded, structure=np.ones((3, 3), bool))[2:-2, 2:-2]
    mask = ndimage.binary_fill_holes(closed)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= 4))
    return mask


def _mask_ok(mask: Array, size: int) -> bool:
    area = int(mask.sum())
    return _min_defect_area(size) <= area <= _max_defect_area(size)


def _to_uint8(img: Array) -> Array:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _lighting(size: int, rng: np.random.Generator, gain: tuple[float, float], slope: tuple[float, float]) -> Array:
    """Multiplicative illumination: global gain times a linear gradient in a random direction."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
    phi = rng.uniform(0, 2 * np.pi)
    field = rng.uniform(*gain) * (1.0 + rng.uniform(*slope) * (xx * np.cos(phi) + yy * np.sin(phi)))
    return field[..., None].astype(np.float32)


def _sensor_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> Array:
    return rng.normal(0.0, sigma, size=shape).astype(np.float32)


# ============================================================================ textures
# Tint ramps (dark colour, light colour) applied to the grey photographs; brick is
# anisotropic (courses run horizontally, perspective), so it is never rotated.
_TEXTURES: dict[str, dict] = {
    "brick": dict(dark=(0.16, 0.07, 0.05), light=(0.98, 0.74, 0.62), isotropic=False, window=0.5),
    "grass": dict(dark=(0.05, 0.10, 0.02), light=(0.78, 0.92, 0.50), isotropic=True, window=0.5),
    "gravel": dict(dark=(0.10, 0.09, 0.08), light=(0.95, 0.92, 0.86), isotropic=True, window=0.42),
}
# Colours that foreign material gets tinted with (another material than the host).
_FOREIGN_TINTS = (
    ((0.10, 0.10, 0.12), (0.70, 0.72, 0.80)),  # bluish grey (metal chips)
    ((0.25, 0.12, 0.02), (0.95, 0.75, 0.35)),  # sawdust / straw
    ((0.02, 0.02, 0.02), (0.45, 0.42, 0.40)),  # dark rubber / coal
    ((0.20, 0.05, 0.15), (0.90, 0.55, 0.80)),  # dyed fibre
)
_STAIN_COLOURS = (
    (0.22, 0.18, 0.14),  # oil
    (0.62, 0.32, 0.12),  # rust
    (0.18, 0.24, 0.55),  # ink
    (0.85, 0.78, 0.30),  # resin / yellow
    (1.00, 1.00, 0.97),  # bleach / chalk (lightens)
)


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
    img = Image.fromarray(np.ascontiguousarray(source), mode="F")
    out = img.transform((size, size), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR)
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


def _scratch(img: Array, rng: np.random.Generator, coverage: Array | None = None) -> Array:
    """Thin bright or dark curved line, intensity varying along its length."""
    size = img.shape[0]
    unit = size / 224.0
    length = rng.uniform(0.2, 0.5) * size
    start = _defect_centre(size, rng)
    angle = rng.uniform(0, 2 * np.pi)
    points = _curve_points(start - 0.5 * length * np.array([np.cos(angle), np.sin(angle)]), angle,
                           length, 12, rng.uniform(0.02, 0.08), rng)
    width = rng.uniform(1.2, 2.6) * unit
    alpha = _stroke_alpha(size, [(points, np.full(len(points) - 1, width))])
    alpha *= np.clip(0.75 + 0.25 * _smooth_field((size, size), 6 * unit, rng), 0.3, 1.0)
    if coverage is not None:
        alpha *= coverage
    strength = rng.uniform(0.65, 0.95)
    a = (alpha * strength)[..., None]
    if rng.random() < 0.6:  # bright: fresh metal / scraped surface
        target = np.clip(img * 0.3 + rng.uniform(0.7, 0.9), 0, 1)
    else:
        target = img * rng.uniform(0.2, 0.4)
    return img * (1 - a) + target * a


def _crack(img: Array, rng: np.random.Generator) -> Array:
    """Dark jagged line with tapering width and 1-3 branches, and a faint dark halo."""
    size = img.shape[0]
    unit = size / 224.0
    length = rng.uniform(0.25, 0.5) * size
    angle = rng.uniform(0, 2 * np.pi)
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
    darkening = np.clip(0.85 * alpha + 0.25 * halo, 0, 0.92)[..., None]
    return img * (1 - darkening)


def _stain(img: Array, rng: np.random.Generator, coverage: Array | None = None,
           radius_range: tuple[float, float] = (0.05, 0.12)) -> Array:
    """Translucent coloured blob with blurred edges (oil, rust, ink, resin, bleach)."""
    size = img.shape[0]
    unit = size / 224.0
    radius = rng.uniform(*radius_range) * size
    alpha = _blob_alpha(size, _defect_centre(size, rng), radius, 2.0, rng, roughness=0.45)
    alpha = ndimage.gaussian_filter(alpha, rng.uniform(1.5, 4.0) * unit)
    alpha *= np.clip(0.8 + 0.2 * _smooth_field((size, size), 4 * unit, rng), 0, 1)
    if coverage is not None:
        alpha *= coverage
    colour = np.asarray(_STAIN_COLOURS[int(rng.integers(len(_STAIN_COLOURS)))], np.float32)
    a = (alpha * rng.uniform(0.55, 0.85))[..., None]
    stained = img * colour * 0.6 + colour * 0.4  # keeps some of the texture under the stain
    return img * (1 - a) + stained * a


def _foreign_material(img: Array, category: str, rng: np.random.Generator) -> Array:
    """A patch of another material (another photograph, another colour) pasted with a
    soft-edged irregular mask."""
    size = img.shape[0]
    unit = size / 224.0
    others = [name for name in DEMO_TEXTURES if name != category] + ["moon", "ihc"]
    source_name = others[int(rng.integers(len(others)))]
    source = _photo(source_name)
    window = source.shape[0] * rng.uniform(0.25, 0.6)
    patch = _sample_crop(source, size, window, rng.uniform(0, 2 * np.pi), bool(rng.integers(2)), rng)
    lo, hi = np.percentile(patch, [2, 98])
    patch = (patch - lo) / max(hi - lo, 1e-3)  # full contrast, whatever the source
    dark, light = _FOREIGN_TINTS[int(rng.integers(len(_FOREIGN_TINTS)))]
    patch_rgb = _tint(patch, dark, light)
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
            "stain": lambda x: _stain(x, rng),
            "foreign_material": lambda x: _foreign_material(x, category, rng),
        }[defect_type]
        for _ in range(_MAX_DEFECT_ATTEMPTS):
            image = apply(clean)
            if rng.random() < 0.25:  # sometimes two defects of the kind
                image = apply(image)
            mask = _defect_mask(np.clip(clean, 0, 1), np.clip(image, 0, 1))
            if _mask_ok(mask, size):
                break
        else:  # pragma: no cover - the parameter ranges make this practically impossible
            raise RuntimeError(f"could not place a visible {defect_type} defect on {category}")
    return _to_uint8(image + noise), _to_uint8(clean + noise), mask


# ============================================================================ rendered objects
def _coords(size: int, centre: Array, rotation: float, scale: float) -> tuple[Array, Array]:
    """Object-frame coordinates of every pixel centre, in units of the image side."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    dx, dy = xx - centre[0], yy - centre[1]
    c, s = math.cos(rotation), math.sin(rotation)
    return (c * dx + s * dy) / scale, (-s * dx + c * dy) / scale


def _cover(dist: Array, size: int, scale: float = 1.0) -> Array:
    """Antialiased coverage from a signed distance (negative inside, image-side units)."""
    return np.clip(0.5 - dist * size * scale, 0.0, 1.0).astype(np.float32)


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


def _overlay_defect(img: Array, defect: dict, coverage: Array, rng_seed: int) -> Array:
    """Contamination / scratch drawn over the (unlit) object, restricted to `coverage`."""
    rng = np.random.default_rng(rng_seed)
    if defect["kind"] == "contamination":
        size = img.shape[0]
        unit = size / 224.0
        alpha = _blob_alpha(size, defect["centre"], defect["radius"], 1.5 * unit, rng, roughness=0.5)
        alpha = ndimage.gaussian_filter(alpha, 0.8 * unit)
        alpha *= np.clip(0.85 + 0.25 * _smooth_field((size, size), 2 * unit, rng), 0, 1) * coverage
        colour = np.asarray(defect["colour"], np.float32)
        a = (alpha * defect["opacity"])[..., None]
        return img * (1 - a) + (img * 0.3 + colour * 0.7) * a
    if defect["kind"] == "scratch":
        return _scratch(img, rng, coverage=coverage)
    raise AssertionError(defect["kind"])


# ---------------------------------------------------------------------------- nut
_NUT_APOTHEM = 0.29        # across flats = 0.58 of the image side
_NUT_FACE = 0.93 * _NUT_APOTHEM   # flat circular top face (the chamfer cuts the corners)
_NUT_HOLE = 0.47 * _NUT_APOTHEM
_NUT_SINK = _NUT_HOLE + 0.035     # countersink ring around the hole


def _nut_scene(size: int, rng: np.random.Generator) -> dict:
    unit = 1.0 / 224.0
    return dict(
        size=size,
        centre=np.array([0.5, 0.5]) + rng.normal(0, 2.0 * unit, 2).clip(-4 * unit, 4 * unit),
        rotation=float(rng.normal(0, 0.02)),
        scale=float(rng.uniform(0.985, 1.015)),
        light=float(rng.uniform(-2.6, -2.0)),  # light from the upper left, roughly
        thread_phase=float(rng.uniform(0, 2 * np.pi)),  # the nut turns, its thread with it
        bg_noise=_smooth_field((size, size), 1.5 * size / 224, rng),
        metal_noise=_smooth_field((size, size), 0.8 * size / 224, rng),
        lighting=_lighting(size, rng, gain=(0.9, 1.1), slope=(0.05, 0.3)),
        overlay_seed=int(rng.integers(2**31)),
    )


def _nut_defect(scene: dict, defect_type: str, rng: np.random.Generator) -> dict:
    size = scene["size"]
    if defect_type == "chipped":
        vertex = rng.integers(6)
        ang = np.pi / 6 + vertex * np.pi / 3  # hexagon corners (flat top/bottom)
        corner = _NUT_APOTHEM / math.cos(math.pi / 6)
        reach = rng.uniform(0.92, 1.02)
        return dict(kind="chipped", centre=corner * reach * np.array([math.cos(ang), math.sin(ang)]),
                    radius=float(rng.uniform(0.045, 0.075)), seed=int(rng.integers(2**31)))
    if defect_type == "dent":
        ang = rng.uniform(0, 2 * np.pi)
        edge_r = _NUT_APOTHEM / max(abs(math.cos((ang % (np.pi / 3)) - np.pi / 6)), 1e-3)
        edge_r = min(edge_r, _NUT_APOTHEM / math.cos(math.pi / 6)) * 0.98
        return dict(kind="dent", centre=edge_r * np.array([math.cos(ang), math.sin(ang)]),
                    direction=np.array([math.cos(ang), math.sin(ang)]),
                    depth=float(rng.uniform(0.018, 0.03)), sigma=float(rng.uniform(0.03, 0.05)))
    if defect_type == "contamination":
        # somewhere on the metal, in image pixels
        r = rng.uniform(_NUT_SINK, _NUT_APOTHEM * 0.95)
        ang = rng.uniform(0, 2 * np.pi)
        centre = (scene["centre"] + r * np.array([math.cos(ang), math.sin(ang)])) * size
        colour = [(0.12, 0.09, 0.06), (0.55, 0.28, 0.10), (0.85, 0.82, 0.74), (0.20, 0.30, 0.10)][int(rng.integers(4))]
        return dict(kind="contamination", centre=centre, radius=float(rng.uniform(0.025, 0.06) * size),
                    colour=colour, opacity=float(rng.uniform(0.6, 0.9)))
    if defect_type == "scratch":
        return dict(kind="scratch")
    raise ValueError(defect_type)


def _render_nut(scene: dict, defect: dict | None) -> tuple[Array, Array]:
    """Top view of a hexagonal steel nut (chamfered corners, countersunk threaded hole)
    on a dark cloth. Returns (RGB image in [0, 1], object coverage)."""
    size = scene["size"]
    u, v = _coords(size, scene["centre"], scene["rotation"], scene["scale"])
    lu, lv = math.cos(scene["light"]), math.sin(scene["light"])
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    radial_u, radial_v = u / np.maximum(r, 1e-6), v / np.maximum(r, 1e-6)

    # shape (a dent pushes the outline in: the SDF is evaluated at outward-warped points)
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
    body = _cover(hex_dist, size, scene["scale"])

    # background: dark blue-grey cloth with the nut's soft shadow
    shadow_dist = _hexagon_sdf(u + 0.02 * lu, v + 0.02 * lv, _NUT_APOTHEM)
    shadow = np.clip(0.5 - shadow_dist / 0.04, 0, 1)
    bg = (0.26 + 0.018 * scene["bg_noise"]) * (1 - 0.45 * shadow)
    img = bg[..., None] * np.array([0.92, 0.97, 1.08], np.float32)

    # metal shading
    face = _cover(r - _NUT_FACE, size)
    sink = _cover(r - _NUT_SINK, size)
    hole = _cover(r - _NUT_HOLE, size)
    facing = radial_u * lu + radial_v * lv  # >0: slope faces the light
    turned = 0.02 * np.sin(r * 2 * np.pi / 0.0075)  # lathe marks on the face
    flat = 0.64 + turned + 0.03 * scene["metal_noise"]
    chamfer = 0.50 + 0.22 * facing + 0.02 * scene["metal_noise"]
    countersink = 0.42 - 0.25 * facing
    depth = np.clip(r / _NUT_HOLE, 0, 1)
    thread = (0.10 + 0.16 * depth) * (0.65 + 0.35 * np.sin(2 * np.pi * (r / 0.011) - theta - scene["thread_phase"]))
    metal = chamfer * (1 - face) + flat * face
    metal = metal * (1 - sink) + countersink * sink
    metal = metal * (1 - hole) + thread * hole
    edge_line = np.clip(1 - np.abs(r - _NUT_FACE) * size / 1.2, 0, 1)  # crease face/chamfer
    metal = metal * (1 - 0.15 * edge_line)
    if dent_bump is not None:
        # dent: the surface tilts towards the dent centre -> shading gradient around it
        du, dv = u - defect["centre"][0], v - defect["centre"][1]
        metal = metal - 0.9 * dent_bump * (du * lu + dv * lv) / defect["sigma"] - 0.06 * dent_bump
    if defect is not None and defect["kind"] == "chipped":
        fracture = np.clip(1 - np.abs(cut_dist) * size / 3.0, 0, 1) * body
        metal = metal * (1 - 0.35 * fracture) + 0.05 * fracture * scene["metal_noise"]
    steel = metal[..., None] * np.array([0.97, 0.99, 1.03], np.float32)
    img = img * (1 - body[..., None]) + steel * body[..., None]

    metal_cov = body * (1 - hole)
    if defect is not None and defect["kind"] in ("contamination", "scratch"):
        img = _overlay_defect(img, defect, metal_cov, scene["overlay_seed"])
    return img * scene["lighting"], body


# ---------------------------------------------------------------------------- chip
_CHIP_BODY = 0.19                 # half side of the black package
_CHIP_PINS = 8                    # pins per side (QFP-32)
_CHIP_PIN_SPAN = 0.78 * _CHIP_BODY
_CHIP_PITCH = 2 * _CHIP_PIN_SPAN / (_CHIP_PINS - 1)
_CHIP_PIN_HALF_W = 0.22 * _CHIP_PITCH
_CHIP_PIN_LEN = 0.06
_CHIP_PAD_HALF_W = 0.36 * _CHIP_PITCH
_CHIP_SOLDER = (0.80, 0.80, 0.76)


@lru_cache(maxsize=4)
def _chip_design() -> dict:
    """The board and package artwork: fixed (the same part in every image)."""
    rng = np.random.default_rng(20240607)
    glyphs = rng.random((3, 7, 5, 3)) < 0.55  # 3 lines x 7 characters of 5x3 dots
    glyphs[2, 4:] = False                     # last line shorter
    has_trace = rng.random((4, _CHIP_PINS)) < 0.7
    trace_len = rng.uniform(0.03, 0.1, size=(4, _CHIP_PINS))
    return dict(glyphs=glyphs, has_trace=has_trace, trace_len=trace_len)


def _side_frame(u: Array, v: Array, side: int) -> tuple[Array, Array]:
    """Body-frame (u, v) -> (outward s, along-side t) for side 0 right, 1 bottom, 2 left, 3 top."""
    if side == 0:
        return u, v
    if side == 1:
        return v, -u
    if side == 2:
        return -u, -v
    return -v, u


def _pin_index(t: Array) -> tuple[Array, Array]:
    idx = np.clip(np.rint((t + _CHIP_PIN_SPAN) / _CHIP_PITCH), 0, _CHIP_PINS - 1)
    return idx.astype(np.int64), t - (-_CHIP_PIN_SPAN + idx * _CHIP_PITCH)


def _chip_scene(size: int, rng: np.random.Generator) -> dict:
    unit = 1.0 / 224.0
    return dict(
        size=size,
        centre=np.array([0.5, 0.5]) + rng.normal(0, 2.0 * unit, 2).clip(-4 * unit, 4 * unit),
        rotation=float(rng.normal(0, 0.012)),
        scale=float(rng.uniform(0.99, 1.01)),
        light=float(rng.uniform(-2.6, -2.0)),
        board_noise=_smooth_field((size, size), 1.0 * size / 224, rng),
        body_noise=_smooth_field((size, size), 0.7 * size / 224, rng),
        solder_blob=rng.uniform(0.85, 1.15, size=(4, _CHIP_PINS)),  # each joint a bit different
        lighting=_lighting(size, rng, gain=(0.9, 1.1), slope=(0.05, 0.25)),
        overlay_seed=int(rng.integers(2**31)),
    )


def _chip_defect(scene: dict, defect_type: str, rng: np.random.Generator) -> dict:
    size = scene["size"]
    side, pin = int(rng.integers(4)), int(rng.integers(_CHIP_PINS))
    if defect_type == "missing_pin":
        return dict(kind="missing_pin", side=side, pin=pin)
    if defect_type == "bent_pin":
        return dict(kind="bent_pin", side=side, pin=pin,
                    angle=float(rng.choice([-1, 1]) * rng.uniform(0.2, 0.4)))
    if defect_type == "solder_bridge":
        return dict(kind="solder_bridge", side=side, pin=min(pin, _CHIP_PINS - 2),
                    seed=int(rng.integers(2**31)))
    if defect_type == "contamination":
        reach = _CHIP_BODY + _CHIP_PIN_LEN
        centre = (scene["centre"] + rng.uniform(-reach, reach, 2)) * size
        colour = [(0.75, 0.55, 0.15), (0.65, 0.65, 0.62), (0.05, 0.04, 0.03)][int(rng.integers(3))]
        return dict(kind="contamination", centre=centre, radius=float(rng.uniform(0.022, 0.05) * size),
                    colour=colour, opacity=float(rng.uniform(0.6, 0.85)))
    if defect_type == "scratch":
        return dict(kind="scratch")
    raise ValueError(defect_type)


def _render_chip(scene: dict, defect: dict | None) -> tuple[Array, Array]:
    """Top view of a QFP-32 package soldered on a green PCB (pads, traces, vias,
    silkscreen, laser marking). Returns (RGB image in [0, 1], package coverage)."""
    size, scale = scene["size"], scene["scale"]
    design = _chip_design()
    u, v = _coords(size, scene["centre"], scene["rotation"], scale)
    lu, lv = math.cos(scene["light"]), math.sin(scene["light"])

    board = np.array([0.10, 0.36, 0.20], np.float32) * (1 + 0.06 * scene["board_noise"])[..., None]
    img = board
    pad_cov = np.zeros((size, size), np.float32)
    trace_cov = np.zeros_like(pad_cov)
    via_ring = np.zeros_like(pad_cov)
    via_hole = np.zeros_like(pad_cov)
    pin_cov = np.zeros_like(pad_cov)
    pin_shade = np.zeros_like(pad_cov)
    solder_cov = np.zeros_like(pad_cov)
    pad_start, pad_end = _CHIP_BODY + 0.012, _CHIP_BODY + _CHIP_PIN_LEN + 0.012
    for side in range(4):
        s, t = _side_frame(u, v, side)
        idx, dt = _pin_index(t)
        pad_cov = np.maximum(pad_cov, _cover(_box_sdf(s - 0.5 * (pad_start + pad_end), dt,
                                                      0.5 * (pad_end - pad_start), _CHIP_PAD_HALF_W), size, scale))
        length = design["trace_len"][side][idx]
        has = design["has_trace"][side][idx]
        trace = _cover(_box_sdf(s - (pad_end + 0.5 * length), dt, 0.5 * length, 0.3 * _CHIP_PAD_HALF_W), size, scale)
        trace_cov = np.maximum(trace_cov, trace * has)
        via_r = np.hypot(s - (pad_end + length), dt)
        via_ring = np.maximum(via_ring, _cover(via_r - 0.011, size, scale) * has)
        via_hole = np.maximum(via_hole, _cover(via_r - 0.005, size, scale) * has)

        # gull-wing pins: shoulder bends down (dark), foot lies flat on the pad (bright)
        present = np.ones_like(s, dtype=bool)
        if defect is not None and defect["kind"] in ("missing_pin", "bent_pin") and defect["side"] == side:
            present = idx != defect["pin"]
        pin_d = _box_sdf(s - (_CHIP_BODY + 0.5 * _CHIP_PIN_LEN), dt, 0.5 * _CHIP_PIN_LEN, _CHIP_PIN_HALF_W)
        cov = _cover(pin_d, size, scale) * present
        along = np.clip((s - _CHIP_BODY) / _CHIP_PIN_LEN, 0, 1)
        across = np.clip(dt / _CHIP_PIN_HALF_W, -1, 1)
        profile = 0.55 + 0.3 * np.clip((along - 0.3) / 0.25, 0, 1) - 0.15 * np.exp(-((along - 0.25) / 0.08) ** 2)
        shade = profile * (1 - 0.3 * across ** 2) + 0.08 * across * (lu * 0 + lv)
        pin_cov = np.maximum(pin_cov, cov)
        pin_shade = np.where(cov > 0, shade, pin_shade)
        blob = scene["solder_blob"][side][idx]
        fillet = _cover(np.hypot(np.maximum(np.abs(dt) - _CHIP_PIN_HALF_W * 0.9, 0) / 1.2,
                                 (s - (_CHIP_BODY + 0.85 * _CHIP_PIN_LEN)) / (0.9 * blob))
                        - 0.012, size, scale) * present
        solder_cov = np.maximum(solder_cov, fillet)

    img = _paint(img, trace_cov, (0.20, 0.52, 0.26))
    img = _paint(img, via_ring, (0.78, 0.68, 0.40))
    img = _paint(img, via_hole, (0.05, 0.06, 0.05))
    img = _paint(img, pad_cov, (0.82, 0.80, 0.70))  # tinned pads (HASL)

    # silkscreen outline with pin-1 corner mark
    outline = _box_sdf(u, v, pad_end + 0.028, pad_end + 0.028)
    silk = _cover(np.abs(outline) - 0.0045, size, scale)
    silk = np.maximum(silk, _cover(np.hypot(u + pad_end + 0.045, v + pad_end + 0.045) - 0.008, size, scale))
    img = _paint(img, silk, (0.90, 0.91, 0.88))

    # solder fillets, then the pins over them
    solder_colour = np.asarray(_CHIP_SOLDER, np.float32)
    img = _paint(img, solder_cov * 0.9, solder_colour * 0.92)
    if defect is not None and defect["kind"] == "bent_pin":
        s, t = _side_frame(u, v, defect["side"])
        root_t = -_CHIP_PIN_SPAN + defect["pin"] * _CHIP_PITCH
        ds, dtt = s - _CHIP_BODY, t - root_t
        c, sn = math.cos(defect["angle"]), math.sin(defect["angle"])
        bs, bt = c * ds + sn * dtt, -sn * ds + c * dtt
        cov = _cover(_box_sdf(bs - 0.5 * _CHIP_PIN_LEN, bt, 0.5 * _CHIP_PIN_LEN, _CHIP_PIN_HALF_W), size, scale)
        along = np.clip(bs / _CHIP_PIN_LEN, 0, 1)
        shade = (0.55 + 0.3 * np.clip((along - 0.3) / 0.25, 0, 1)) * (1 - 0.3 * np.clip(bt / _CHIP_PIN_HALF_W, -1, 1) ** 2)
        pin_cov = np.maximum(pin_cov, cov)
        pin_shade = np.where(cov > 0, shade, pin_shade)
    img = _paint(img, pin_cov, np.zeros(3, np.float32)) + (pin_cov * pin_shade)[..., None] * np.array([0.95, 0.95, 0.93], np.float32)
    if defect is not None and defect["kind"] == "solder_bridge":
        rng = np.random.default_rng(defect["seed"])
        s, t = _side_frame(u, v, defect["side"])
        mid_t = -_CHIP_PIN_SPAN + (defect["pin"] + 0.5) * _CHIP_PITCH
        ang = np.arctan2(t - mid_t, s - (_CHIP_BODY + 0.75 * _CHIP_PIN_LEN))
        wobble = 1 + 0.15 * np.cos(3 * ang + rng.uniform(0, 6.3))
        ell = np.hypot((t - mid_t) / (0.75 * _CHIP_PITCH), (s - (_CHIP_BODY + 0.75 * _CHIP_PIN_LEN)) / (0.4 * _CHIP_PIN_LEN))
        bridge = _cover((ell - wobble) * 0.02, size, scale)
        glint = np.exp(-(((t - mid_t) / (0.3 * _CHIP_PITCH)) ** 2 + ((s - _CHIP_BODY - 0.7 * _CHIP_PIN_LEN) / (0.15 * _CHIP_PIN_LEN)) ** 2))
        img = _paint(img, bridge, solder_colour * 0.85) + (bridge * 0.2 * glint)[..., None]

    # package: black epoxy, bevelled edge, pin-1 dimple, laser marking
    body_d = _box_sdf(u, v, _CHIP_BODY, _CHIP_BODY)
    body = _cover(body_d, size, scale)
    bevel = np.clip(1 + body_d / 0.012, 0, 1)  # 1 at the edge, 0 inside the top face
    edge_facing = np.where(np.abs(u) > np.abs(v), np.sign(u) * lu, np.sign(v) * lv)
    epoxy = 0.11 + 0.012 * scene["body_noise"] + bevel * (0.05 + 0.07 * edge_facing)
    dimple = _cover(np.hypot(u + _CHIP_BODY - 0.045, v + _CHIP_BODY - 0.045) - 0.016, size, scale)
    epoxy = epoxy + 0.05 * dimple - 0.03 * dimple * ((u + _CHIP_BODY - 0.045) * lu + (v + _CHIP_BODY - 0.045) * lv) / 0.016
    glyphs = design["glyphs"]
    dot = 0.0085
    gx = (u + 0.115) / dot  # 7 characters of 3 dots + 1 gap -> 28 dots wide
    gy = (v + 0.04) / dot   # 3 lines of 5 dots + 2 gap
    col, row = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    char, cx = col // 4, col % 4
    line, cy = row // 7, row % 7
    inside = (col >= 0) & (char < 7) & (row >= 0) & (line < 3) & (cx < 3) & (cy < 5)
    lit = np.zeros_like(inside)
    lit[inside] = glyphs[line[inside], char[inside], cy[inside], cx[inside]]
    epoxy = epoxy + 0.13 * lit
    package = epoxy[..., None] * np.array([1.0, 1.0, 1.04], np.float32)
    img = img * (1 - body[..., None]) + package * body[..., None]

    if defect is not None and defect["kind"] == "contamination":
        img = _overlay_defect(img, defect, np.ones_like(body), scene["overlay_seed"])
    if defect is not None and defect["kind"] == "scratch":
        inner = _cover(body_d + 0.01, size, scale)
        img = _overlay_defect(img, defect, inner, scene["overlay_seed"])
    return img * scene["lighting"], body


_OBJECTS: dict[str, tuple[Callable, Callable, Callable]] = {
    "nut": (_nut_scene, _nut_defect, _render_nut),
    "chip": (_chip_scene, _chip_defect, _render_chip),
}


def _object_sample(category: str, defect_type: str | None, size: int, rng: np.random.Generator
                   ) -> tuple[Array, Array, Array]:
    """(image, the same scene rendered without the defect, mask)."""
    make_scene, make_defect, render = _OBJECTS[category]
    scene = make_scene(size, rng)
    clean, _ = render(scene, None)
    noise = _sensor_noise(clean.shape, 0.01, rng)
    image = clean
    mask = np.zeros((size, size), bool)
    if defect_type is not None:
        for _ in range(_MAX_DEFECT_ATTEMPTS):
            image, _ = render(scene, make_defect(scene, defect_type, rng))
            mask = _defect_mask(np.clip(clean, 0, 1), np.clip(image, 0, 1))
            if _mask_ok(mask, size):
                break
            scene["overlay_seed"] = int(rng.integers(2**31))
        else:  # pragma: no cover
            raise RuntimeError(f"could not place a visible {defect_type} defect on {category}")
    return _to_uint8(image + noise), _to_uint8(clean + noise), mask


def _sample(category: str, defect_type: str | None, size: int, rng: np.random.Generator
            ) -> tuple[Array, Array, Array]:
    """One picture of `category` (defect-free when `defect_type` is None): (image uint8
    [S,S,3], defect-free version uint8 [S,S,3], mask bool [S,S])."""
    if category in _TEXTURES:
        return _texture_sample(category, defect_type, size, rng)
    return _object_sample(category, defect_type, size, rng)


# ============================================================================ public API
_SPLIT_CODES = {"train": 1, "test_good": 2, "test_defect": 3}
_GENERATED_NAME = re.compile(r"^\d{3,}(_mask)?\.png$")


def _image_rng(seed: int, category: str, split: str, index: int, defect_index: int = 0) -> np.random.Generator:
    """Independent stream per image: a category's pictures don't depend on which other
    categories or how many images are generated."""
    return np.random.default_rng([seed, zlib.crc32(category.encode()), _SPLIT_CODES[split], defect_index, index])


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
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


def _clear_previous(category_dir: Path) -> None:
    """Remove images an earlier call wrote (NNN.png / NNN_mask.png in the MVTec
    sub-folders), so a smaller rerun leaves no stale files; anything else is kept."""
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
    Image.fromarray(array).save(path, format="PNG")


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
    Same arguments -> byte-identical files. Images an earlier call left in these
    folders are replaced.
    """
    cats = _check_categories(categories)
    n_train = _check_count("n_train", n_train)
    n_test_good = _check_count("n_test_good", n_test_good)
    n_test_defect = _check_count("n_test_defect", n_test_defect)
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    image_size = int(image_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
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

    for category in cats:
        start = time.perf_counter()
        cat_dir = root / category
        _clear_previous(cat_dir)
        train_dir, good_dir = cat_dir / "train" / "good", cat_dir / "test" / "good"
        train_dir.mkdir(parents=True, exist_ok=True)
        good_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            image, _, _ = _sample(category, None, image_size, _image_rng(seed, category, "train", i))
            _save_png(image, train_dir / f"{i:03d}.png")
        for i in range(n_test_good):
            image, _, _ = _sample(category, None, image_size, _image_rng(seed, category, "test_good", i))
            _save_png(image, good_dir / f"{i:03d}.png")
        defect_types = DEMO_DEFECT_TYPES[category]
        for k, (defect_type, count) in enumerate(zip(defect_types, _split_counts(n_test_defect, len(defect_types)))):
            if count == 0:
                continue
            test_dir = cat_dir / "test" / defect_type
            mask_dir = cat_dir / "ground_truth" / defect_type
            test_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = _image_rng(seed, category, "test_defect", i, defect_index=k + 1)
                image, _, mask = _sample(category, defect_type, image_size, rng)
                _save_png(image, test_dir / f"{i:03d}.png")
                _save_png(mask.astype(np.uint8) * 255, mask_dir / f"{i:03d}_mask.png")
        logger.info("demo category %s: %d train, %d good test, %d defective test images (%dx%d) in %.2f s",
                    category, n_train, n_test_good, n_test_defect, image_size, image_size,
                    time.perf_counter() - start)
    return root


__all__ = ["DEMO_CATEGORIES", "DEMO_DEFECT_TYPES", "DEMO_OBJECTS", "DEMO_TEXTURES", "make_demo_dataset"]
