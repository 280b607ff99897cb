"""Pictures and tables: heatmap colouring, overlays, PNG writing, CSV/JSON writers and the
training-report table.

Only numpy and Pillow are used (no matplotlib): the colormap is Google's "Turbo"
through its published polynomial approximation, so the pictures are identical on
every machine.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from .results import distinct_names

logger = logging.getLogger(__name__)

# Turbo colormap, polynomial approximation (A. Mikhailov / R. Du, Google 2019): per channel
# c(x) = sum_k coef[k] * x**k for k = 0..5, clipped to [0, 1].
_TURBO_COEFFS = np.array(
    [
        [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ],
    dtype=np.float64,
)


def turbo(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped; NaN -> 0) to uint8 RGB [..., 3] with the Turbo colormap
    (dark blue -> cyan -> green -> yellow -> red)."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    powers = np.stack([x**k for k in range(6)], axis=-1)  # [..., 6]
    rgb = np.clip(powers @ _TURBO_COEFFS.T, 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


def normalize_map(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Linear rescale to [0, 1] (clipped) of an anomaly map given the colour range."""
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise ValueError(f"colour range must be finite, got vmin={vmin}, vmax={vmax}")
    span = vmax - vmin
    if span <= 0:
        span = 1.0  # constant range: everything maps to the low end, not a division by zero
    return np.clip((np.asarray(anomaly_map, dtype=np.float64) - vmin) / span, 0.0, 1.0)


def colour_range(maps: Iterable[np.ndarray], threshold: float | None = None) -> tuple[float, float]:
    """Colour range shared by several anomaly maps so that colours compare across images.

    Without a threshold: [min, max] over all maps. With the model's image threshold (image
    scores are map maxima), the range is centred on it: [lo, 2*threshold - lo] with lo the
    smallest map value, so regions above the decision threshold are yellow to red and a
    normal image stays blue to green.
    """
    lo, hi = math.inf, -math.inf
    for m in maps:
        m = np.asarray(m)
        if m.size:
            lo = min(lo, float(np.nanmin(m)))
            hi = max(hi, float(np.nanmax(m)))
    if not math.isfinite(lo):
        raise ValueError("colour_range: no map values")
    if threshold is not None and math.isfinite(threshold) and threshold > lo:
        return lo, 2.0 * float(threshold) - lo
    return lo, hi if hi > lo else lo + 1.0


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """bool [H, W]: the boundary pixels of a binary mask (mask minus its erosion)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    eroded = ndimage.binary_erosion(mask, iterations=max(1, int(width)), border_value=0)
    return mask & ~eroded


def overlay(
    image: Image.Image | np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Blend a coloured anomaly map with the image it belongs to -> uint8 RGB [H, W, 3].

    The map must already be at the image's resolution (Prediction.map_at_input_size or
    the model frame with ImageTransform.geometry). ``mask`` (optional ground truth, bool
    [H, W]) is drawn as a white outline.
    """
    if isinstance(image, Image.Image):
        rgb = np.asarray(image.convert("RGB"))
    else:
        rgb = np.asarray(image)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=-1)
        if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4) or rgb.dtype != np.uint8:
            raise ValueError(f"image must be uint8 [H,W,3], got {rgb.dtype} {rgb.shape}")
        rgb = rgb[..., :3]
    amap = np.asarray(anomaly_map)
    if amap.shape != rgb.shape[:2]:
        raise ValueError(f"anomaly map shape {amap.shape} differs from the image's {rgb.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = turbo(normalize_map(amap, vmin, vmax)).astype(np.float32)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != amap.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the map's {amap.shape}")
        width = max(1, round(min(mask.shape) / 150))  # visible at any resolution
        out[mask_outline(mask, width)] = 255
    return out


def colourbar(height: int = 12, width: int = 256) -> np.ndarray:
    """uint8 [height, width, 3] horizontal Turbo gradient (legend)."""
    row = turbo(np.linspace(0.0, 1.0, width))
    return np.repeat(row[None], height, axis=0)


def save_png(path: str | os.PathLike, image: np.ndarray | Image.Image, max_side: int | None = None) -> Path:
    """Write an RGB/grey image as PNG (parent folders created); ``max_side`` shrinks large images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    img.save(path, format="PNG")
    return path


# ------------------------------------------------------------------ tables / files
def format_pct(value: Any) -> str:
    """A fraction as a percentage with one decimal, "n/a" for None / NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100.0 * float(value):.1f}"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_floats(obj: Any) -> Any:
    """NaN / inf -> None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """JSON with numpy scalars/arrays converted and NaN written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean_floats(payload), indent=2, default=_json_default) + "\n")
    return path


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """CSV with a header; columns default to the keys of the first row (in order). Text
    that a spreadsheet would run as a formula is escaped (:func:`csv_text`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return path


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets
# (CSV / formula injection): an image named "=HYPERLINK(...).png" would run when the
# predictions are opened. OWASP's advice: prefix such text with a single quote.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(text: str) -> str:
    """``text`` as a CSV cell a spreadsheet shows as text: a leading ``'`` when it starts
    with a formula character (FORMULA_STARTS); other text unchanged."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, str):
        return csv_text(v)
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, np.generic):
        return v.item()
    return v


def format_training_report(report: Any, top: int = 10) -> str:
    """Human-readable summary: how many images were flagged and the top suspects."""
    rows = report.to_rows()
    n_flagged = sum(r["flagged"] for r in rows)
    threshold = getattr(report, "threshold", None)
    head = f"Training-set contamination: {n_flagged} of {len(rows)} images flagged"
    if threshold is not None:
        head += f" (score threshold {float(threshold):.4g})"
    lines = [head, f"Top {min(top, len(rows))} suspects:"]
    width = max([len(r["name"]) for r in rows[:top]] + [4])
    lines.append(f"  {'rank':>4}  {'name':<{width}}  {'score':>10}  flagged")
    for r in rows[:top]:
        lines.append(
            f"  {r['rank']:>4}  {r['name']:<{width}}  {r['contamination_score']:>10.4g}  {'yes' if r['flagged'] else 'no'}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ HTML report
