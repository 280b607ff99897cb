"""The command line's jobs as library functions: fit to a model file, predict into a
folder, with outputs that never lose work.

* Every output location is checked for writability before any work starts.
* Results are written under a temporary name and moved into place when complete: an
  interrupted or failed run leaves the previous results as they were and no partial
  files; a new run replaces its own outputs (CSV, JSON, overlays) and nothing else in
  the folder (no stale overlays from an earlier run).
* ``predict_to_folder(..., on_error="skip")`` keeps going past unreadable images and
  lists them (with the reason) in the CSV; ``"fail"`` (default) stops at the first one.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .data.images import IMAGE_EXTENSIONS, list_images, load_image
from .report import colour_range, distinct_names, overlay, save_png, training_report_rows, write_csv, write_json

PREDICT_CHUNK = 32  # images per predict() call: bounds the memory held by anomaly maps
OVERLAY_MAX_SIDE = 2048  # overlays of larger images are rendered downscaled (bounded memory)
ON_ERROR = ("fail", "skip")
PREDICTION_COLUMNS = ("name", "path", "score", "threshold", "verdict", "overlay", "error")


# ------------------------------------------------------------------ outputs
def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """The file can be created (its folder exists or can be made, and is writable); no
    file is left behind by the check."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file name such as {path / 'model.softpatch'}")
    _probe_folder(path.parent, what)
    return path


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} exists and is not a folder")
    _probe_folder(path, what)
    return path


def _probe_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".softpatch-write-check-"):
            pass
    except OSError as exc:
        raise PermissionError(f"{what}: cannot write in {folder} ({exc.strerror or exc})") from exc


def _replace(src: Path, dst: Path) -> None:
    """Move a finished output into place (a folder replaces the old folder)."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# ------------------------------------------------------------------ inputs
def collect_images(inputs: Sequence[str], recursive: bool, what: str) -> list[str]:
    """Image files from files and folders, in order; clear errors for missing paths,
    non-images and empty folders."""
    paths: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{what} not found: {item}")
        if p.is_dir():
            paths.extend(list_images(p, recursive=recursive))
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            paths.append(str(p))
        else:
            raise ValueError(f"{what} {item} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)}) or a folder")
    if not paths:
        raise ValueError(f"no images in {', '.join(inputs)}")
    return paths


# ------------------------------------------------------------------ fit
@dataclass
class FitResult:
    model: Any
    model_path: Path
    report_csv: Path
    fit_s: float


def fit_to_file(model: Any, paths: Sequence[str], out: str | os.PathLike, report_csv: str | os.PathLike) -> FitResult:
    """Fit ``model`` on ``paths``; save it to ``out`` and the training report to ``report_csv``.
    Both locations are checked before the fit starts."""
    out = check_writable_file(out, "model output")
    report_csv = check_writable_file(report_csv, "training report")
    t0 = time.perf_counter()
    model.fit(list(paths))
    fit_s = time.perf_counter() - t0
    model.save(out)
    _write_atomically(report_csv, lambda tmp: write_csv(tmp, training_report_rows(model.training_report())))
    return FitResult(model, out, report_csv, fit_s)


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ------------------------------------------------------------------ predict
@dataclass
class PredictResult:
    rows: list[dict]
    csv_path: Path
    json_path: Path
    overlays: Path | None
    threshold: float

    @property
    def n_anomalous(self) -> int:
        return sum(r["verdict"] == "anomalous" for r in self.rows)

    @property
    def n_errors(self) -> int:
        return sum(r["verdict"] == "error" for r in self.rows)


def _load_for_predict(path: str, on_error: str):
    """(PIL image, None) or (None, reason) when skipping unreadable images."""
    try:
        return load_image(path), None
    except (OSError, ValueError) as exc:
        if on_error == "fail":
            raise
        return None, " ".join(str(exc).split())


def predict_to_folder(model: Any, paths: Sequence[str], out: str | os.PathLike, *, threshold: float | None = None,
                      overlays: bool = True, on_error: str = "fail", progress: bool = False,
                      chunk: int = PREDICT_CHUNK, model_path: str | None = None) -> PredictResult:
    """Score ``paths`` with a fitted model; write ``out``/predictions.csv, predictions.json
    and (``overlays``) one heatmap overlay PNG per image under ``out``/overlays/."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    out = check_writable_dir(out, "output folder")
    if threshold is not None:
        model.threshold = float(threshold)
    threshold = float(model.threshold)
    paths = list(paths)
    display = dict(zip(paths, distinct_names([Path(p).name for p in paths], paths)))
    staging = Path(tempfile.mkdtemp(prefix=".softpatch-predict-", dir=out))
    try:
        rows: list[dict] = []
        used: dict[str, int] = {}
        vrange: tuple[float, float] | None = None
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, file=sys.stderr)
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            loaded = [_load_for_predict(p, on_error) for p in part]
            images = [img for img, _ in loaded if img is not None]
            prediction = model.predict(images) if images else None
            if prediction is not None and vrange is None:
                vrange = colour_range(prediction.maps, threshold)  # one colour scale for the whole run
            k = 0
            for path, (img, error) in zip(part, loaded):
                row = {"name": display[path], "path": path, "score": None, "threshold": threshold,
                       "verdict": "error", "overlay": None, "error": error}
                if img is not None:
                    score = float(prediction.scores[k])
                    row.update(score=score, verdict="anomalous" if score > threshold else "normal")
                    if overlays:
                        row["overlay"] = _write_overlay(img, prediction, k, vrange, staging / "overlays",
                                                        out / "overlays", display[path], used)
                    k += 1
                rows.append(row)
            bar.update(len(part))
        bar.close()
        write_csv(staging / "predictions.csv", rows, PREDICTION_COLUMNS)
        write_json(staging / "predictions.json", {
            "model": model_path, "model_type": type(model).__name__, "threshold": threshold,
            "colour_range": list(vrange) if vrange else None, "predictions": rows,
        })
        # commit: the new outputs replace the old ones (stale overlays go too)
        if (staging / "overlays").is_dir():
            _replace(staging / "overlays", out / "overlays")
        elif (out / "overlays").is_dir():
            shutil.rmtree(out / "overlays")
        for name in ("predictions.json", "predictions.csv"):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PredictResult(rows, out / "predictions.csv", out / "predictions.json",
                         out / "overlays" if overlays else None, threshold)


def _write_overlay(image, prediction, k: int, vrange, staging_dir: Path, final_dir: Path, name: str,
                   used: dict[str, int]) -> str:
    """One overlay PNG at a bounded resolution (the original's geometry, at most
    OVERLAY_MAX_SIDE pixels a side); returns its final path."""
    if max(image.size) > OVERLAY_MAX_SIDE:
        image = image.copy()
        image.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
    amap = np.asarray(prediction.map_at_input_size(k, out_size=(image.height, image.width)))
    file_name = f"{_unique_stem(name.replace('/', '_'), used)}.png"
    save_png(staging_dir / file_name, overlay(image, amap, *vrange))
    return str(final_dir / file_name)


def _unique_stem(name: str, used: dict[str, int]) -> str:
    stem = Path(name).stem or "image"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    count = used.get(safe, 0)
    used[safe] = count + 1
    return safe if count == 0 else f"{safe}_{count + 1}"
