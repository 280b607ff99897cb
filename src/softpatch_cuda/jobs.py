"""The command line's jobs as library functions: fit to a model file, predict into a
folder, with outputs that never lose work.

* Every output location is checked for writability before any work starts.
* Results are written under a temporary name and moved into place when complete: an
  interrupted or failed run leaves the previous results as they were and no partial
  files; a new run replaces its own outputs (CSV, JSON, overlays) and nothing else in
  the folder (no stale overlays from an earlier run).
* ``predict_to_folder(..., on_error="skip")`` keeps going past unreadable images and
  lists them (with the reason) in the CSV; ``"fail"`` (default) stops at the first one.

One predict loop serves every way of scoring: chunks of paths go to a runner -- this
process (:func:`local_runner`) or Ray workers (:func:`softpatch_cuda.scale.distributed.chunk_runner`)
-- which opens the model from a :class:`ModelSource` (every option travels with it) and
returns a :class:`ChunkResult` per chunk; the loop puts the rows in order and commits.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: staging folders are not locked (stale ones go by age)
    fcntl = None

from ._pixels import IMAGE_EXTENSIONS, list_images, load_image  # torch-free: the ONNX predictor uses these jobs
from .report import overlay, save_png, write_csv, write_json
from .results import distinct_names
from .serialization import write_atomically

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
def collect_images(inputs: Sequence[str], recursive: bool, what: str,
                   exclude: str | os.PathLike | None = None) -> list[str]:
    """Image files from files and folders (with ``recursive``, their sub-folders too), in
    order; clear errors for missing paths, non-images and empty folders. Images a folder
    holds below ``exclude`` (the run's own output folder) are left out."""
    paths: list[str] = []
    skip = None if exclude is None else Path(exclude).expanduser().resolve()
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{what} not found: {item}")
        if p.is_dir():
            found = list_images(p, recursive=recursive)
            if skip is not None:
                found = [f for f in found if skip not in Path(f).resolve().parents]
            paths.extend(found)
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
    write_atomically(report_csv, lambda tmp: write_csv(tmp, model.training_report().to_rows()))
    return FitResult(model, out, report_csv, fit_s)


# ------------------------------------------------------------------ predict
@dataclass(frozen=True)
class ModelSource:
    """What a predict run scores with, in a form every worker can open: a model file
    (``path``; loaded on ``device``, with the backbone ``weights`` file when the stored
    path is not valid there), scored by torch or by an exported ``graph`` (no torch); or an
    in-memory ``model`` (this process only). ``threads``: the thread budget ("auto" or a
    number; None: the model's own, "auto" for a file); ``threshold``: replaces the model's."""

    path: str | None = None
    model: Any = None
    graph: str | None = None
    device: str = "auto"
    weights: str | None = None
    threads: int | str | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.model is None):
            raise ValueError("a model source is a model file (path) or a fitted model, exactly one")
        if self.graph is not None and self.path is None:
            raise ValueError("an exported graph is scored with its model file (path)")

    def open(self) -> Any:
        """The model, ready to predict (the threshold and thread budget applied)."""
        if self.model is not None:
            model = self.model
        elif self.graph is not None:
            from .deploy import OnnxDetector  # noqa: PLC0415 -- torch-free

            model = OnnxDetector(self.path, self.graph, threads=self.threads)
        else:
            from .models import load_model  # noqa: PLC0415 -- torch

            model = load_model(self.path, device=self.device, weights=self.weights)
        if self.threads is not None:
            model.threads = self.threads
        if self.threshold is not None:
            model.threshold = float(self.threshold)
        return model


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


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    return on_error


@dataclass(frozen=True)
class ChunkJob:
    """A chunk of a run: its paths, the first one's position in the run, and (with
    overlays) the file name each readable image's overlay gets."""

    start: int
    paths: list[str]
    overlay_names: list[str] | None = None


@dataclass
class ChunkResult:
    """A chunk scored, as plain data a worker hands back: per path its score, the model's
    verdict and the overlay written (None when unreadable), and the exception that made it
    unreadable (None when readable); the threshold, colour scale and model type used."""

    start: int
    paths: list[str]
    scores: list[float | None]
    anomalous: list[bool | None]
    overlays: list[str | None]
    failures: list[BaseException | None]
    threshold: float
    colour_range: tuple[float, float]
    model_type: str
    maps: list[Any] | None = None  # with score_chunk(..., maps=True): [S, S] per readable image

    def first_failure(self) -> BaseException | None:
        return next((f for f in self.failures if f is not None), None)


def _load_for_predict(path: str) -> tuple[Any, BaseException | None]:
    """(PIL image, None) or (None, the reason it could not be read)."""
    try:
        return load_image(path), None
    except (OSError, ValueError) as exc:
        return None, exc


def score_chunk(model: Any, job: ChunkJob, on_error: str, overlay_dir: Path | None = None,
                maps: bool = False) -> ChunkResult:
    """Load a chunk's paths and predict the readable ones; write their overlays (at most
    OVERLAY_MAX_SIDE pixels a side, on the model's colour scale) into ``overlay_dir``;
    with ``maps``, hand back their anomaly maps. With on_error="fail" a chunk holding an
    unreadable image is not scored at all."""
    loaded = [_load_for_predict(p) for p in job.paths]
    failures = [err for _, err in loaded]
    n = len(job.paths)
    scores: list[float | None] = [None] * n
    anomalous: list[bool | None] = [None] * n
    overlays: list[str | None] = [None] * n
    amaps: list[Any] | None = [None] * n if maps else None
    vrange = model.colour_range()
    readable = [i for i, (img, _) in enumerate(loaded) if img is not None]
    if readable and not (on_error == "fail" and any(failures)):
        prediction = model.predict([loaded[i][0] for i in readable])
        for k, i in enumerate(readable):
            scores[i] = float(prediction.scores[k])
            anomalous[i] = bool(prediction.is_anomalous[k])
            if amaps is not None:
                amaps[i] = prediction.maps[k]
            if overlay_dir is not None and job.overlay_names is not None:
                overlays[i] = str(render_overlay(loaded[i][0], prediction, k, vrange,
                                                 overlay_dir / job.overlay_names[i]))
    return ChunkResult(job.start, list(job.paths), scores, anomalous, overlays, failures, float(model.threshold),
                       tuple(vrange), type(model).__name__, amaps)


Runner = Callable[[ModelSource, Sequence[ChunkJob], str, "Path | None"], Iterable[ChunkResult]]


def local_runner(source: ModelSource, jobs: Sequence[ChunkJob], on_error: str,
                 overlay_dir: Path | None) -> Iterator[ChunkResult]:
    """The chunks one after another in this process (one model, opened once)."""
    model = source.open()
    for job in jobs:
        yield score_chunk(model, job, on_error, overlay_dir)


def prediction_row(name: str, path: str, threshold: float, score: float | None, anomalous: bool | None,
                   error: str | None, overlay: str | None = None) -> dict:
    """One row of predictions.csv / .json (PREDICTION_COLUMNS); the verdict is the model's."""
    row = {"name": name, "path": path, "score": None, "threshold": threshold, "verdict": "error",
           "overlay": None, "error": error}
    if score is not None:
        row.update(score=float(score), verdict="anomalous" if anomalous else "normal", overlay=overlay)
    return row


def one_line(exc: BaseException | None) -> str | None:
    return None if exc is None else " ".join(str(exc).split())


def render_overlay(image: Any, prediction: Any, k: int, vrange: tuple[float, float], path: Path) -> Path:
    """Write image ``k``'s overlay PNG to ``path`` at a bounded resolution (the original's
    geometry, at most OVERLAY_MAX_SIDE pixels a side)."""
    if max(image.size) > OVERLAY_MAX_SIDE:
        image = image.copy()
        image.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
    amap = np.asarray(prediction.map_at_input_size(k, out_size=(image.height, image.width)))
    save_png(path, overlay(image, amap, *vrange))
    return path


def display_names(paths: Sequence[str]) -> dict[str, str]:
    """Path -> the name shown in the outputs (the file name, made distinct)."""
    paths = list(paths)
    return dict(zip(paths, distinct_names([Path(p).name for p in paths], paths)))


def overlay_names(names: Sequence[str]) -> list[str]:
    """The overlays' file names, in the order of the rows: each image's display name made
    a file name, unique within the run."""
    used: dict[str, int] = {}
    return [f"{_unique_stem(name.replace('/', '_'), used)}.png" for name in names]


STAGING_PREFIX = ".softpatch-predict-"
STAGING_LOCK = ".lock"  # held (flock) by the run that writes into the staging folder
_STAGING_LOCKS: dict[Path, Any] = {}


def staging_folder(out: Path) -> Path:
    """A fresh hidden folder under ``out`` where a run writes its outputs before committing
    them, locked while the run lives; the staging folders of runs that died (killed before
    their clean-up) are removed first."""
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    if fcntl is not None:
        handle = open(staging / STAGING_LOCK, "w")  # noqa: SIM115 -- held until remove_staging
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _STAGING_LOCKS[staging] = handle
    return staging


def remove_staging(staging: Path) -> None:
    """Delete a run's staging folder and release its lock."""
    shutil.rmtree(staging, ignore_errors=True)
    handle = _STAGING_LOCKS.pop(staging, None)
    if handle is not None:
        handle.close()


def remove_stale_staging(out: Path, unlocked_age_s: float = 3600.0) -> list[Path]:
    """Remove the staging folders under ``out`` whose run is gone: their lock is free (the
    process that held it has ended), or, without a lock (older versions; systems without
    flock), untouched for ``unlocked_age_s``. Folders of live runs are left alone."""
    removed = []
    for folder in Path(out).glob(STAGING_PREFIX + "*"):
        if folder.is_symlink() or not folder.is_dir() or not _run_is_gone(folder, unlocked_age_s):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _run_is_gone(folder: Path, unlocked_age_s: float) -> bool:
    lock = folder / STAGING_LOCK
    try:
        if fcntl is None or not lock.is_file() or lock.is_symlink():
            return time.time() - folder.stat().st_mtime > unlocked_age_s
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a live run holds it
            return True
    except OSError:
        return False


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


def predict_to_folder(source: Any, paths: Sequence[str], out: str | os.PathLike, *, threshold: float | None = None,
                      overlays: bool = True, on_error: str = "fail", progress: bool = False,
                      chunk: int = PREDICT_CHUNK, runner: Runner | None = None) -> PredictResult:
    """Score ``paths``; write ``out``/predictions.csv, predictions.json and (``overlays``)
    one heatmap overlay PNG per image under ``out``/overlays/.

    ``source``: a :class:`ModelSource`, or a fitted model (a :class:`Detector` or the
    torch-free :class:`softpatch_cuda.deploy.OnnxDetector`); ``threshold`` replaces its
    threshold. ``runner``: who scores the chunks (default: this process; on Ray:
    :func:`softpatch_cuda.scale.distributed.chunk_runner`)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    check_on_error(on_error)
    if not isinstance(source, ModelSource):
        source = ModelSource(model=source)
    if threshold is not None:
        source = replace(source, threshold=float(threshold))
    out = check_writable_dir(out, "output folder")
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no images to predict")
    display = display_names(paths)
    names = overlay_names([display[p] for p in paths]) if overlays else None
    jobs = [ChunkJob(start, paths[start : start + chunk], None if names is None else names[start : start + chunk])
            for start in range(0, len(paths), chunk)]
    staging = staging_folder(out)
    try:
        done: dict[int, ChunkResult] = {}
        with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, file=sys.stderr) as bar:
            for result in (runner or local_runner)(source, jobs, on_error, staging / "overlays" if overlays else None):
                failure = result.first_failure()
                if on_error == "fail" and failure is not None:
                    raise failure
                done[result.start] = result
                bar.update(len(result.paths))
        rows = []
        for job in jobs:
            r = done[job.start]
            for i, path in enumerate(r.paths):
                overlay_path = None if r.overlays[i] is None else str(out / "overlays" / Path(r.overlays[i]).name)
                rows.append(prediction_row(display[path], path, r.threshold, r.scores[i], r.anomalous[i],
                                           one_line(r.failures[i]), overlay_path))
        first = done[jobs[0].start]
        header = {"model": source.path, "model_type": first.model_type, "threshold": first.threshold,
                  "colour_range": list(first.colour_range)}
        commit_predictions(out, staging, rows, header)
    finally:
        remove_staging(staging)
    return PredictResult(rows, out / "predictions.csv", out / "predictions.json",
                         out / "overlays" if overlays else None, first.threshold)


def _unique_stem(name: str, used: dict[str, int]) -> str:
    stem = Path(name).stem or "image"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    count = used.get(safe, 0)
    used[safe] = count + 1
    return safe if count == 0 else f"{safe}_{count + 1}"
