"""Evaluation metrics: image / pixel AUROC, AUPRO (up to an FPR limit) and F1-max.

All functions raise ValueError for inputs on which the metric is undefined (one
class only, no defect regions) or that are malformed (shape mismatch, NaN / inf,
non-binary labels), naming the argument and the problem; they never return NaN.
Label convention: 1 / True = anomalous (positive class); higher score = more anomalous.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score
from ._validation import is_int, is_number

logger = logging.getLogger(__name__)

# 8-connectivity for defect regions, as in MVTec AD's official evaluation code.
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------- validation
def _to_numpy(x: object, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists etc.
        raise ValueError(f"{name}: cannot be converted to an array ({exc})") from exc
    if arr.dtype == object:
        raise ValueError(f"{name}: ragged or non-numeric input (all items must have the same shape)")
    return arr


def _binary(x: object, name: str) -> np.ndarray:
    """bool array from bool or 0/1 numbers."""
    arr = _to_numpy(x, name)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name}: expected bool or 0/1 values, got dtype {arr.dtype}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise ValueError(
            f"{name}: expected bool or 0/1 values, found e.g. {bad.tolist()} "
            "(binarise first, e.g. mask > 0)"
        )
    return arr.astype(bool)


def _finite_scores(x: object, name: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name}: expected real-valued scores, got dtype {arr.dtype}")
    # float32 keeps pixel-level inputs (millions of values) at half the memory of float64.
    arr = arr.astype(np.float64 if arr.dtype == np.float64 else np.float32, copy=False)
    if not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{name}: contains {n_bad} NaN or infinite values")
    return arr


def _image_inputs(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    y = _binary(labels, "labels")
    s = _finite_scores(scores, "scores")
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    return y, s


def _pixel_inputs(masks: object, maps: object) -> tuple[np.ndarray, np.ndarray]:
    m = _binary(masks, "masks")
    a = _finite_scores(maps, "maps")
    if m.shape != a.shape:
        raise ValueError(f"masks and maps differ in shape: {m.shape} vs {a.shape}")
    if m.ndim == 2:  # one image
        m, a = m[None], a[None]
    if m.ndim != 3:
        raise ValueError(f"masks and maps must be [N, H, W] (or one [H, W] image), got shape {m.shape}")
    if m.size == 0:
        raise ValueError(f"masks and maps are empty (shape {m.shape})")
    return m, a


def _require_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        kind = "anomalous (1)" if n_pos else "normal (0)"
        raise ValueError(
            f"{what} is undefined: all {y.size} labels are {kind}; it needs both normal and anomalous samples"
        )


# --------------------------------------------------------------------------- AUROC
def image_auroc(labels: object, scores: object) -> float:
    """Area under the ROC curve of image scores (labels: 1 = anomalous)."""
    y, s = _image_inputs(labels, scores)
    _require_both_classes(y, "image AUROC")
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: object, maps: object) -> float:
    """ROC AUC over all pixels of all images (masks bool [N, H, W], maps float [N, H, W])."""
    m, a = _pixel_inputs(masks, maps)
    _require_both_classes(m.ravel(), "pixel AUROC")
    return float(roc_auc_score(m.ravel(), a.ravel()))


# --------------------------------------------------------------------------- AUPRO
def _partial_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x, y) from x[0] to x_max; x is non-decreasing,
    x[0] <= x_max <= x[-1]. The curve is interpolated linearly at exactly x_max."""
    n_keep = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:n_keep], y[:n_keep]
    if xs[-1] < x_max:
        x0, y0, x1, y1 = x[n_keep - 1], y[n_keep - 1], x[n_keep], y[n_keep]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) * 0.5))


def pro_curve(
    masks: object, maps: object, num_thresholds: int | None = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, pro, thresholds) with fpr ascending, starting at (0, 0) (threshold +inf).

    A pixel is predicted anomalous when map >= threshold. Thresholds: `num_thresholds`
    evenly spaced values from the maps' minimum to maximum, or every distinct map value
    when None (exact curve, as MVTec AD's official code). FPR = share of normal pixels
    predicted anomalous; PRO = mean over all defect regions (8-connected components of
    each mask) of the share of the region predicted anomalous."""
    m, a = _pixel_inputs(masks, maps)
    exact_bins = None
    if num_thresholds is None:
        # Every distinct value is a threshold, so a pixel's bin is its rank among them + 1.
        thresholds, inverse = np.unique(a, return_inverse=True)
        thresholds = thresholds.astype(np.float64)
        exact_bins = inverse.reshape(a.shape) + 1
    else:
        if not is_int(num_thresholds) or num_thresholds < 2:
            raise ValueError(f"num_thresholds must be an int >= 2 or None, got {num_thresholds!r}")
        thresholds = np.linspace(float(a.min()), float(a.max()), int(num_thresholds))
    n_bins = thresholds.size + 1
    # Counting instead of binarising once per threshold: a pixel whose value is >= the
    # first k thresholds is positive at exactly those k, so per-threshold totals are
    # reversed cumulative sums of per-bin counts. Bins are gathered per image and
    # counted once at the end (one bincount of length T+1, not one per image).
    normal_bins: list[np.ndarray] = []
    defect_bins: list[np.ndarray] = []
    defect_weights: list[np.ndarray] = []
    n_regions = 0
    for index, (mask, amap) in enumerate(zip(m, a)):
        if exact_bins is not None:
            bins = exact_bins[index]
        else:
            bins = np.searchsorted(thresholds, amap.astype(np.float64), side="right")
        normal_bins.append(bins[~mask])
        if mask.any():
            regions, count = ndimage.label(mask, structure=_REGION_STRUCTURE)
            sizes = np.bincount(regions.ravel(), minlength=count + 1).astype(np.float64)
            defect = regions > 0
            defect_bins.append(bins[defect])
            defect_weights.append(1.0 / sizes[regions[defect]])  # each region sums to 1
            n_regions += count
    n_normal = sum(b.size for b in normal_bins)
    if n_regions == 0:
        raise ValueError("AUPRO is undefined: the masks contain no defect pixels")
    if n_normal == 0:
        raise ValueError("AUPRO is undefined: the masks contain no normal pixels (FPR has no denominator)")
    normal_hist = np.bincount(np.concatenate(normal_bins), minlength=n_bins).astype(np.float64)
    region_hist = np.bincount(np.concatenate(defect_bins), weights=np.concatenate(defect_weights), minlength=n_bins)
    # positives at threshold j = pixels in bins j+1..T; index T+1 -> threshold +inf (nothing positive).
    normal_pos = np.cumsum(normal_hist[::-1])[::-1][1:]
    region_pos = np.cumsum(region_hist[::-1])[::-1][1:]
    fpr = np.concatenate([[0.0], (normal_pos / n_normal)[::-1]])
    pro = np.concatenate([[0.0], (region_pos / n_regions)[::-1]])
    return fpr, np.minimum(pro, 1.0), np.concatenate([[np.inf], thresholds[::-1]])


def aupro(masks: object, maps: object, fpr_limit: float = 0.3, num_thresholds: int | None = 200) -> float:
    """Area under the per-region-overlap curve for FPR in [0, fpr_limit], divided by
    fpr_limit (1.0 = perfect). See :func:`pro_curve` for the curve; the curve is
    linearly interpolated at exactly `fpr_limit` and integrated with the trapezoid rule."""
    if not is_number(fpr_limit) or not 0.0 < float(fpr_limit) <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    fpr, pro, _ = pro_curve(masks, maps, num_thresholds)
    # Clipped: float rounding of the trapezoid sum can overshoot 1 by an ulp.
    return min(1.0, max(0.0, _partial_trapezoid(fpr, pro, float(fpr_limit)) / float(fpr_limit)))


# ------------------------------------------------------------------------- F1-max
def f1_max(labels: object, scores: object) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (predict anomalous
    when score >= threshold, sklearn's convention)."""
    y, s = _image_inputs(labels, scores)
    if not y.any():
        raise ValueError(f"F1 is undefined: all {y.size} labels are normal (0); it needs anomalous samples")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision 1, recall 0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])
