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

from ._pixels import IMAGE_EXTENSIONS, list_images, load_image  # torch-free: the ONNX predictor uses these jobs
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


def fit_to_file(model: Any, paths: Sequence[str], out: str | os.PathLike, report_csv: str | os.PathLike,
                fit: Callable[[Any, list[str]], Any] | None = None) -> FitResult:
    """Fit ``model`` on ``paths``; save it to ``out`` and the training report to ``report_csv``.
    Both locations are checked before the fit starts. ``fit(model, paths)`` replaces
    ``model.fit(paths)`` (the sharded, bounded-memory and Ray fits)."""
    out = check_writable_file(out, "model output")
    report_csv = check_writable_file(report_csv, "training report")
    t0 = time.perf_counter()
    if fit is None:
        model.fit(list(paths))
    else:
        fit(model, list(paths))
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
    """(PIL image, None) or (None, the exception) when skipping unreadable images."""
    try:
        return load_image(path), None
    except (OSError, ValueError) as exc:
        if on_error == "fail":
            raise
        return None, exc


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    return on_error


# The pieces below are shared by the local loop (predict_to_folder) and the Ray workers
# (softpatch_cuda.distributed), so both write the same rows, overlays and files.
@dataclass
class ScoredChunk:
    """One chunk of paths after loading and scoring: per path the image (None when
    unreadable) and the reason it could not be read; the prediction of the readable
    images (None when there were none)."""

    paths: list[str]
    images: list[Any]
    failures: list[BaseException | None]
    prediction: Any

    @property
    def errors(self) -> list[str | None]:
        """Per path the reason it could not be read (one line), None when readable."""
        return [None if exc is None else " ".join(str(exc).split()) for exc in self.failures]

    def scores(self) -> list[float | None]:
        """Per path its score (None for unreadable images), in path order."""
        out, k = [], 0
        for img in self.images:
            if img is None:
                out.append(None)
            else:
                out.append(float(self.prediction.scores[k]))
                k += 1
        return out

    def readable(self) -> list[tuple[int, int]]:
        """(position in the chunk, position in the prediction) of every readable image."""
        pairs, k = [], 0
        for i, img in enumerate(self.images):
            if img is not None:
                pairs.append((i, k))
                k += 1
        return pairs


def score_chunk(model: Any, paths: Sequence[str], on_error: str) -> ScoredChunk:
    """Load ``paths`` (unreadable ones fail or are skipped, ``on_error``) and predict the readable ones."""
    loaded = [_load_for_predict(p, on_error) for p in paths]
    images = [img for img, _ in loaded if img is not None]
    prediction = model.predict(images) if images else None
    return ScoredChunk(list(paths), [img for img, _ in loaded], [err for _, err in loaded], prediction)


def prediction_row(name: str, path: str, threshold: float, score: float | None, error: str | None,
                   overlay: str | None = None) -> dict:
    """One row of predictions.csv / .json (PREDICTION_COLUMNS)."""
    row = {"name": name, "path": path, "score": None, "threshold": threshold, "verdict": "error",
           "overlay": None, "error": error}
    if score is not None:
        row.update(score=float(score), verdict="anomalous" if score > threshold else "normal", overlay=overlay)
    return row


def render_overlay(image: Any, prediction: Any, k: int, vrange: tuple[float, float], path: Path) -> Path:
    """Write image ``k``'s overlay PNG to ``path`` at a bounded resolution (the original's
    geometry, at most OVERLAY_MAX_SIDE pixels a side)."""
    if max(image.size) > OVERLAY_MAX_SIDE:
        image = image.copy()
        image.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
    amap = np.asarray(prediction.map_at_input_size(k, out_size=(image.height, image.width)))
    save_png(path, overlay(image, amap, *vrange))
    return path


class OverlayNames:
    """File names of the overlays, unique within a run, given in the order of the rows."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}

    def next(self, name: str) -> str:
        return f"{_unique_stem(name.replace('/', '_'), self._used)}.png"


def display_names(paths: Sequence[str]) -> dict[str, str]:
    """Path -> the name shown in the outputs (the file name, made distinct)."""
    paths = list(paths)
    return dict(zip(paths, distinct_names([Path(p).name for p in paths], paths)))


def staging_folder(out: Path) -> Path:
    """A fresh hidden folder under ``out`` where a run writes its outputs before committing them."""
    return Path(tempfile.mkdtemp(prefix=".softpatch-predict-", dir=out))


def commit_predictions(out: Path, staging: Path, rows: list[dict], header: dict) -> None:
    """Write predictions.csv / .json into ``staging`` and move everything (with
    ``staging``/overlays, if any) into ``out``: the new outputs replace the old ones,
    stale overlays included, and nothing else in ``out`` is touched."""
    write_csv(staging / "predictions.csv", rows, PREDICTION_COLUMNS)
    write_json(staging / "predictions.json", dict(header, predictions=rows))
    if (staging / "overlays").is_dir():
        _replace(staging / "overlays", out / "overlays")
    elif (out / "overlays").is_dir():
        shutil.rmtree(out / "overlays")
    for name in ("predictions.json", "predictions.csv"):
        os.replace(staging / name, out / name)


def predictions_header(model_path: str | None, model_type: str, threshold: float,
                       vrange: tuple[float, float] | None) -> dict:
    return {"model": model_path, "model_type": model_type, "threshold": threshold,
            "colour_range": list(vrange) if vrange else None}


def predict_to_folder(model: Any, paths: Sequence[str], out: str | os.PathLike, *, threshold: float | None = None,
                      overlays: bool = True, on_error: str = "fail", progress: bool = False,
                      chunk: int = PREDICT_CHUNK, model_path: str | None = None) -> PredictResult:
    """Score ``paths`` with a fitted model; write ``out``/predictions.csv, predictions.json
    and (``overlays``) one heatmap overlay PNG per image under ``out``/overlays/.

    ``model``: anything with ``threshold`` and ``predict(images)`` -- a :class:`Detector`
    or the torch-free :class:`softpatch_cuda.deploy.OnnxDetector`."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    check_on_error(on_error)
    out = check_writable_dir(out, "output folder")
    if threshold is not None:
        model.threshold = float(threshold)
    threshold = float(model.threshold)
    paths = list(paths)
    display = display_names(paths)
    staging = staging_folder(out)
    try:
        rows: list[dict] = []
        names = OverlayNames()
        vrange: tuple[float, float] | None = None
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, file=sys.stderr)
        for start in range(0, len(paths), chunk):
            scored = score_chunk(model, paths[start : start + chunk], on_error)
            if scored.prediction is not None and vrange is None:
                vrange = colour_range(scored.prediction.maps, threshold)  # one colour scale for the whole run
            overlay_of: dict[int, str] = {}
            if overlays:
                for i, k in scored.readable():
                    file_name = names.next(display[scored.paths[i]])
                    render_overlay(scored.images[i], scored.prediction, k, vrange, staging / "overlays" / file_name)
                    overlay_of[i] = str(out / "overlays" / file_name)
            for i, (path, score) in enumerate(zip(scored.paths, scored.scores())):
                rows.append(prediction_row(display[path], path, threshold, score, scored.errors[i], overlay_of.get(i)))
            bar.update(len(scored.paths))
        bar.close()
        commit_predictions(out, staging, rows, predictions_header(model_path, type(model).__name__, threshold, vrange))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PredictResult(rows, out / "predictions.csv", out / "predictions.json",
                         out / "overlays" if overlays else None, threshold)


def _unique_stem(name: str, used: dict[str, int]) -> str:
    stem = Path(name).stem or "image"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    count = used.get(safe, 0)
    used[safe] = count + 1
    return safe if count == 0 else f"{safe}_{count + 1}"
