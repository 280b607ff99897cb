"""Fit-and-test evaluation of a model on a dataset split, and result tables.

Pixel metrics are computed in the model's frame (after its resize + centre crop):
the ground-truth masks go through the same geometry as the images
(``ImageTransform.mask``), which is what the papers' evaluation code does.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from .data.images import ImageTransform

logger = logging.getLogger(__name__)

# Columns of the results table: (row key, header, kind). "pct": fraction shown as percent.
RESULT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("image_auroc", "image AUROC", "pct"),
    ("pixel_auroc", "pixel AUROC", "pct"),
    ("aupro", "AUPRO@30%", "pct"),
    ("image_f1_max", "image F1-max", "pct"),
    ("report_auroc", "report AUROC", "pct"),
    ("flag_precision", "flag precision", "pct"),
    ("flag_recall", "flag recall", "pct"),
    ("fit_s", "fit s", "sec"),
    ("predict_s", "predict s", "sec"),
)
METRIC_KEYS = tuple(key for key, _, _ in RESULT_COLUMNS)
# Shown only when some row has them (runs with planted training images).
DETECTION_KEYS = ("report_auroc", "flag_precision", "flag_recall")


def model_transform(model: Any) -> ImageTransform:
    """The model's input transform (resize + crop), from ``model.transform`` or its config."""
    transform = getattr(model, "transform", None)
    if isinstance(transform, ImageTransform):
        return transform
    config = getattr(model, "config", None)
    if isinstance(config, dict) and ("resize" in config or "crop" in config):
        return ImageTransform(resize=config.get("resize", 256), crop=config.get("crop", 224))
    raise TypeError(
        f"cannot find the input transform of {type(model).__name__}: expected a .transform "
        "(ImageTransform) or a .config dict with 'resize' and 'crop'"
    )


def _image_size_hw(path: str) -> tuple[int, int]:
    with Image.open(path) as img:  # reads the header only
        return img.height, img.width


def _read_mask(sample: Any) -> np.ndarray:
    """bool [H, W] ground truth of a test sample at its image's resolution (zeros when none)."""
    size_hw = _image_size_hw(sample.path)
    from .data.datasets import read_mask

    mask = np.asarray(read_mask(sample, size_hw), dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask of {sample.path} must be 2-D, got shape {mask.shape}")
    return mask


def masks_in_model_frame(samples: Sequence[Any], transform: ImageTransform, size: int | None = None) -> np.ndarray:
    """bool [N, S, S]: each sample's ground-truth mask through the model's resize + crop.

    When the transform keeps the native size (resize=crop=None) the masks must all have the
    same shape (as the maps do); ``size`` checks the side length when given.
    """
    masks = [transform.mask(_read_mask(s)) for s in samples]
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise ValueError(f"masks of different sizes in the model frame: {sorted(shapes)}; set resize/crop")
    out = np.stack(masks) if masks else np.zeros((0, size or 0, size or 0), dtype=bool)
    if size is not None and out.shape[1:] != (size, size):
        raise ValueError(f"masks in the model frame are {out.shape[1:]}, anomaly maps are {(size, size)}")
    return out


def _safe_metric(name: str, fn, *args) -> float | None:
    """A metric value, or None when it is undefined for this data (e.g. one class only)."""
    try:
        value = float(fn(*args))
    except ValueError as exc:
        logger.warning("%s undefined here: %s", name, exc)
        return None
    return value if math.isfinite(value) else None


def contamination_detection(report: Any, planted: np.ndarray) -> dict:
    """How well a training report finds the planted (defective) training images:
    {"flagged", "flagged_planted", "auroc" (of the contamination scores), "precision",
    "recall" (of the flags)}; None where undefined (nothing planted, nothing flagged,
    one class only, no scores)."""
    from .metrics import image_auroc

    planted = np.asarray(planted, dtype=bool)
    scores = np.asarray(report.scores, dtype=np.float64)
    flagged = np.asarray(report.flagged, dtype=bool)
    out = {"flagged": int(flagged.sum()), "flagged_planted": int((flagged & planted).sum()),
           "auroc": None, "precision": None, "recall": None}
    if planted.any():
        out["recall"] = float((flagged & planted).sum() / planted.sum())
        if flagged.any():
            out["precision"] = float((flagged & planted).sum() / flagged.sum())
        if not planted.all() and np.isfinite(scores).all():
            out["auroc"] = float(image_auroc(planted.astype(int), scores))
    return out


def set_progress(model: Any, progress: bool) -> None:
    """Show or hide a model's own progress bars after construction (e.g. a loaded model
    keeps the setting it was saved with); models without them are left alone."""
    if hasattr(model, "progress"):
        model.progress = bool(progress)


def evaluate_split(model: Any, split: Any, progress: bool = False) -> dict:
    """Fit ``model`` on ``split.train``, predict ``split.test``, compute the metrics.

    Returns {"category", "n_train", "n_test", "image_auroc", "pixel_auroc", "aupro",
    "image_f1_max", "fit_s", "predict_s"} plus "dataset" and "n_test_anomalous".
    Metrics are fractions in [0, 1]; a metric that is undefined on this split (test set
    with one class only; no ground-truth masks at all for the pixel metrics) is None.
    """
    return evaluate_split_detailed(model, split, progress)[0]


def evaluate_split_detailed(model: Any, split: Any, progress: bool = False,
                            embedded: Any = None) -> tuple[dict, Any, np.ndarray | None]:
    """:func:`evaluate_split` that also returns the test Prediction and the ground-truth
    masks in the model frame (bool [N, S, S], None when the split has no masks).
    When defective images were planted in the training set (label 1 there), the row
    also says how well the training report found them (:func:`contamination_detection`).

    ``embedded``: the split's images already embedded by a model with the same
    backbone and transform (``EmbeddedImages`` covering every train and test path):
    the model then fits and predicts from them (``fit_embedded`` / ``predict_embedded``)
    instead of reading and embedding the images again -- for several models on one split."""
    train, test = list(split.train), list(split.test)
    if not train:
        raise ValueError(f"split {split.category!r}: empty training set")
    if not test:
        raise ValueError(f"split {split.category!r}: empty test set")
    from . import metrics
    set_progress(model, progress)

    if embedded is not None:
        index = {src: i for i, src in enumerate(embedded.sources)}
        missing = [s.path for s in train + test if s.path not in index]
        if missing:
            raise ValueError(f"embedded images lack {len(missing)} of the split's images, e.g. {missing[0]}")
        t0 = time.perf_counter()
        model.fit_embedded(embedded.subset([index[s.path] for s in train]))
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        prediction = model.predict_embedded(embedded.subset([index[s.path] for s in test]))
        predict_s = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        model.fit([s.path for s in train])
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        prediction = model.predict([s.path for s in test])
        predict_s = time.perf_counter() - t0

    labels = np.array([int(s.label) for s in test], dtype=np.int64)
    scores = np.asarray(prediction.scores, dtype=np.float64)
    if scores.shape != (len(test),):
        raise ValueError(f"model returned {scores.shape} scores for {len(test)} test images")

    one_class = len(np.unique(labels)) < 2
    if one_class:
        logger.warning("split %r: the test set has one class only; image metrics are undefined", split.category)
    image_auroc = None if one_class else _safe_metric("image AUROC", metrics.image_auroc, labels, scores)
    f1 = None
    if not one_class:
        try:
            f1 = float(metrics.f1_max(labels, scores)[0])
        except ValueError as exc:
            logger.warning("F1-max undefined here: %s", exc)

    pixel_auroc = aupro = None
    masks = None
    if any(getattr(s, "mask_path", None) for s in test):
        maps = np.asarray(prediction.maps, dtype=np.float32)
        masks = masks_in_model_frame(test, model_transform(model), size=None)
        if masks.shape != maps.shape:
            raise ValueError(f"ground-truth masks {masks.shape} and anomaly maps {maps.shape} differ in shape")
        if masks.any() and not masks.all():
            pixel_auroc = _safe_metric("pixel AUROC", metrics.pixel_auroc, masks, maps)
            aupro = _safe_metric("AUPRO", metrics.aupro, masks, maps)
        else:
            logger.warning("split %r: masks hold one class only; pixel metrics are undefined", split.category)
    else:
        logger.info("split %r has no ground-truth masks; pixel metrics skipped", split.category)

    planted = np.array([int(s.label) == 1 for s in train])
    detection = None
    if planted.any() and hasattr(model, "training_report"):
        detection = contamination_detection(model.training_report(), planted)
    row = {
        "dataset": getattr(split, "dataset", None),
        "category": split.category,
        "n_train": len(train),
        "n_test": len(test),
        "n_test_anomalous": int(labels.sum()),
        "image_auroc": image_auroc,
        "pixel_auroc": pixel_auroc,
        "aupro": aupro,
        "image_f1_max": f1,
        "fit_s": fit_s,
        "predict_s": predict_s,
        "report_auroc": None if detection is None else detection["auroc"],
        "flag_precision": None if detection is None else detection["precision"],
        "flag_recall": None if detection is None else detection["recall"],
    }
    return row, prediction, masks


def mean_row(rows: Sequence[dict], keys: Iterable[str] = METRIC_KEYS, label: str = "mean") -> dict:
    """Per-key mean over the rows that have a value (None / NaN skipped; all missing -> None)."""
    out: dict[str, Any] = {"category": label}
    for key in keys:
        values = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
        out[key] = float(np.mean(values)) if values else None
    for count in ("n_train", "n_test"):
        if rows and all(r.get(count) is not None for r in rows):
            out[count] = int(sum(int(r[count]) for r in rows))
    return out


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if kind == "pct":
        return f"{100.0 * float(value):.1f}"
    if kind == "sec":
        return f"{float(value):.1f}"
    return str(value)


def results_table_markdown(
    rows: Sequence[dict],
    columns: Sequence[tuple[str, str, str]] = RESULT_COLUMNS,
    label_key: str = "category",
    with_mean: bool = True,
) -> str:
    """Markdown table, one row per result plus a bold mean row (metrics in percent, times in s).

    ``columns``: (row key, header, "pct" | "sec" | "raw"). The mean skips missing values.
    """
    if not rows:
        raise ValueError("results_table_markdown: no rows")
    columns = [c for c in columns if c[0] not in DETECTION_KEYS or any(r.get(c[0]) is not None for r in rows)]
    header = f"| {label_key} | " + " | ".join(h for _, h, _ in columns) + " |"
    align = "|---|" + "|".join("---:" for _ in columns) + "|"
    lines = [header, align]
    for r in rows:
        lines.append(f"| {r.get(label_key, '')} | " + " | ".join(_fmt(r.get(k), kind) for k, _, kind in columns) + " |")
    if with_mean:
        mean = mean_row(rows, [k for k, _, kind in columns if kind in ("pct", "sec")])
        lines.append("| **mean** | " + " | ".join(f"**{_fmt(mean.get(k), kind)}**" for k, _, kind in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    rows: Sequence[dict],
    out_dir: str | os.PathLike,
    meta: dict | None = None,
    stem: str = "results",
    title: str | None = None,
) -> tuple[Path, Path]:
    """Write out_dir/<stem>.json ({"meta", "rows", "mean"}) and out_dir/<stem>.md (the table,
    under ``title`` when given)."""
    from .report import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out_dir / f"{stem}.json", {"meta": meta or {}, "rows": list(rows), "mean": mean_row(rows)})
    md_path = out_dir / f"{stem}.md"
    table = results_table_markdown(rows)
    md_path.write_text(f"# {title}\n\n{table}" if title else table)
    return json_path, md_path
