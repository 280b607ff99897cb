"""Beyond one process, on Ray (optional extra: ``pip install "softpatch-cuda[ray]"``).

* Batch scoring with Ray Data: :class:`BatchPredictor` is a callable class for
  ``ray.data.Dataset.map_batches`` (the model is loaded once per actor);
  :func:`predict_dataset` builds the pipeline; :func:`predict_to_folder_ray` writes
  the same ``predictions.csv`` / ``.json`` / overlays as the local
  :func:`softpatch_cuda.jobs.predict_to_folder` (``softpatch predict ... --ray``).
* Distributed fit: :func:`fit_distributed` runs the shards of
  :func:`softpatch_cuda.sharded.fit_sharded` on a pool of Ray actors
  (``ray.util.ActorPool``), one backbone per actor, and merges their coresets in the
  driver (``softpatch fit ... --ray``).

Scheduling, retries and data movement are Ray's; this module only says what runs where.

Identical results: given paths, the local loop scores chunks of ``PREDICT_CHUNK``
images; the Ray pipeline makes each chunk one dataset row, so every chunk is scored
by the same code on the same batch of images, and the scores are the local ones. The
first chunk (the one that sets the overlays' colour scale) runs first, as one Ray task.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .jobs import (
    PREDICT_CHUNK, OverlayNames, PredictResult, _unique_stem, check_on_error, check_writable_dir, commit_predictions,
    display_names, prediction_row, predictions_header, render_overlay, score_chunk, staging_folder,
)
from .report import colour_range

logger = logging.getLogger(__name__)

RAY_EXTRA = 'pip install "softpatch-cuda[ray]"'


def _ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(f"Ray is not installed: {RAY_EXTRA} (or pip install 'ray[data]')") from exc
    return ray


# ------------------------------------------------------------------ the Ray instance
@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, quiet: bool = False) -> Iterator[Any]:
    """Use the running Ray instance, or connect to ``address`` ("auto", "ray://host:port",
    "host:port"), or start a local one ("local" / None, ``num_cpus`` CPUs) -- and shut
    down only what this context started."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR if quiet else logging.WARNING,
                                  "log_to_driver": not quiet}
        if address in (None, "local"):
            kwargs["num_cpus"] = num_cpus
        else:
            kwargs["address"] = address
        ray.init(**kwargs)
        started = True
    quieted = []
    try:
        if quiet:
            ray.data.DataContext.get_current().enable_progress_bars = False
            for name in ("ray", "ray.data"):  # Ray Data logs every execution at INFO
                log = logging.getLogger(name)
                quieted.append((log, log.level))
                log.setLevel(logging.WARNING)
        yield ray
    finally:
        for log, level in quieted:
            log.setLevel(level)
        if started:
            ray.shutdown()


def cluster_cpus() -> int:
    return max(1, int(_ray().cluster_resources().get("CPU", 1)))


def _default_workers(workers: int | None, cpus_per_worker: float) -> int:
    if workers is None:
        return max(1, int(cluster_cpus() // cpus_per_worker))
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return int(workers)


def _unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error (a corrupt image, a bad option)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
            continue
        if type(exc).__module__.startswith("ray") and isinstance(exc.__cause__, BaseException):
            exc = exc.__cause__
            continue
        break
    return exc


@contextlib.contextmanager
def _plain_errors() -> Iterator[None]:
    """Re-raise a worker's exception as itself (one line on the command line), not wrapped in Ray's."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001
        inner = _unwrap(exc)
        if inner is exc:
            raise
        raise inner from None


# ------------------------------------------------------------------ batch scoring
class BatchPredictor:
    """Score images in ``ray.data.Dataset.map_batches`` (``compute``: an actor pool).

    The model file is loaded once per actor. Input batches (dict of numpy columns) hold
    one of:

    * ``"paths"``: per row, a list of image paths scored together (a chunk; the local
      loop's chunks give its exact scores), with ``"index"`` the first path's position;
    * ``"path"``: one image path per row (``"index"`` optional);
    * ``"image"``: in-memory images ([H, W, 3] uint8, e.g. from ``ray.data.read_images``),
      ``"path"`` optional.

    Output columns, one row per image: ``index`` (-1 when unknown), ``path``, ``score``
    (NaN when unreadable), ``verdict`` ("normal" / "anomalous" / "error"), ``threshold``,
    ``error`` (empty when readable); ``overlay`` (the written PNG) with ``overlay_dir``,
    ``map`` ([S, S] float32 anomaly map in the model frame) with ``maps=True``.
    """

    def __init__(self, model_path: str, *, device: str = "cpu", weights: str | None = None,
                 threshold: float | None = None, maps: bool = False, overlay_dir: str | None = None,
                 colour_range: Sequence[float] | None = None, on_error: str = "fail"):
        from .models import load_model  # noqa: PLC0415

        self.model = load_model(model_path, device=device, weights=weights)
        if threshold is not None:
            self.model.threshold = float(threshold)
        self.threshold = float(self.model.threshold)
        self.maps = bool(maps)
        self.overlay_dir = None if overlay_dir is None else Path(overlay_dir)
        if self.overlay_dir is not None and colour_range is None:
            raise ValueError("overlays need a colour_range shared by all workers (see first_colour_range)")
        self.vrange = None if colour_range is None else tuple(float(v) for v in colour_range)
        self.on_error = check_on_error(on_error)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "paths" in batch:
            groups = [[str(p) for p in paths] for paths in batch["paths"]]
            starts = [int(i) for i in batch["index"]] if "index" in batch else [-1] * len(groups)
            rows: list[dict] = []
            for paths, start in zip(groups, starts):
                rows += self._score_paths(paths, [start + i if start >= 0 else -1 for i in range(len(paths))])
        elif "image" in batch:
            rows = self._score_images(batch)
        elif "path" in batch:
            index = [int(i) for i in batch["index"]] if "index" in batch else [-1] * len(batch["path"])
            rows = self._score_paths([str(p) for p in batch["path"]], index)
        else:
            raise ValueError(f"BatchPredictor: a batch needs a 'paths', 'path' or 'image' column, got {sorted(batch)}")
        return self._columns(rows)

    def _score_paths(self, paths: list[str], index: list[int]) -> list[dict]:
        scored = score_chunk(self.model, paths, self.on_error)
        return self._rows(scored, index)

    def _score_images(self, batch: dict[str, np.ndarray]) -> list[dict]:
        from PIL import Image  # noqa: PLC0415

        from .jobs import ScoredChunk  # noqa: PLC0415

        images = [Image.fromarray(np.asarray(a, dtype=np.uint8)).convert("RGB") for a in batch["image"]]
        paths = [str(p) for p in batch["path"]] if "path" in batch else [""] * len(images)
        index = [int(i) for i in batch["index"]] if "index" in batch else [-1] * len(images)
        scored = ScoredChunk(paths, images, [None] * len(images), self.model.predict(images))
        return self._rows(scored, index)

    def _rows(self, scored: Any, index: list[int]) -> list[dict]:
        return chunk_rows(scored, index, self.threshold, self.overlay_dir, self.vrange, self.maps)

    @staticmethod
    def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
        if not rows:
            return {}
        out: dict[str, np.ndarray] = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if key == "map":
                arr = np.empty(len(values), dtype=object)
                arr[:] = values
                out[key] = arr
            else:
                out[key] = np.asarray(values)
        return out


def chunk_rows(scored: Any, index: list[int], threshold: float, overlay_dir: Path | None = None,
               vrange: tuple[float, float] | None = None, maps: bool = False) -> list[dict]:
    """A scored chunk's output rows (see :class:`BatchPredictor`); overlays written to ``overlay_dir``."""
    rows = []
    position = dict(scored.readable())
    for i, (path, score) in enumerate(zip(scored.paths, scored.scores())):
        row = {"index": index[i], "path": path, "score": math.nan if score is None else score,
               "verdict": "error" if score is None else ("anomalous" if score > threshold else "normal"),
               "threshold": threshold, "error": scored.errors[i] or "",
               "error_type": "" if scored.failures[i] is None else type(scored.failures[i]).__name__}
        k = position.get(i)
        if overlay_dir is not None:
            row["overlay"] = "" if k is None else str(_write_overlay(scored, i, k, index[i], overlay_dir, vrange))
        if maps:
            row["map"] = np.zeros((0, 0), np.float32) if k is None else np.asarray(scored.prediction.maps[k],
                                                                                  dtype=np.float32)
        rows.append(row)
    return rows


def _write_overlay(scored: Any, i: int, k: int, index: int, overlay_dir: Path, vrange) -> Path:
    # unique per image without coordination between workers: the position, then the name
    stem = _unique_stem(Path(scored.paths[i]).name or "image", {})
    name = f"{index:09d}-{stem}.png" if index >= 0 else f"{os.getpid()}-{id(scored)}-{k}-{stem}.png"
    return render_overlay(scored.images[i], scored.prediction, k, vrange, overlay_dir / name)


def _chunk_dataset(paths: Sequence[str], chunk: int, start: int, workers: int) -> Any:
    """One dataset row per chunk of paths (``index``: its first path's position), in
    enough blocks that every worker gets some."""
    items = [{"index": i, "paths": list(paths[i : i + chunk])} for i in range(start, len(paths), chunk)]
    return _ray().data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * workers)))


def predict_dataset(model_path: str | os.PathLike, data: Any, *, workers: int | None = None,
                    cpus_per_worker: float = 1, batch_size: int = 16, chunk: int = PREDICT_CHUNK,
                    device: str = "cpu", weights: str | None = None, threshold: float | None = None,
                    maps: bool = False, overlay_dir: str | os.PathLike | None = None,
                    colour_range: Sequence[float] | None = None, on_error: str = "fail") -> Any:
    """A (lazy) Ray Dataset of predictions, one row per image (columns: see :class:`BatchPredictor`).

    ``data``: a folder, a list of image paths (scored in chunks of ``chunk`` images:
    the local predict's exact scores; rows carry ``index``, the path's position), or a
    ``ray.data.Dataset`` with a ``path`` and/or ``image`` column (batches of
    ``batch_size`` rows). ``workers`` actors (default: the cluster's CPUs /
    ``cpus_per_worker``) each load the model once. With ``overlay_dir`` every worker
    writes overlay PNGs there, on the colour scale ``colour_range`` (default: the local
    predict's, from the first chunk -- :func:`first_colour_range`). Run it with
    ``.take_all()``, ``.iter_rows()``, ``.write_parquet(...)``.
    """
    ray = _ray()
    check_on_error(on_error)
    model_path = str(Path(model_path).expanduser().resolve())
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"model file not found: {model_path}")
    workers = _default_workers(workers, cpus_per_worker)
    if isinstance(data, ray.data.Dataset):
        ds, rows_per_call = data, batch_size
        first = None
    else:
        from .sharded import image_list  # noqa: PLC0415

        paths = [str(p) for p in image_list(data)]
        if not all(isinstance(p, str) for p in paths):
            raise TypeError("predict_dataset takes image paths or a ray.data.Dataset")
        ds, rows_per_call = _chunk_dataset(paths, chunk, 0, workers), 1
        first = paths[:chunk]
    if overlay_dir is not None:
        overlay_dir = Path(overlay_dir).expanduser().resolve()
        overlay_dir.mkdir(parents=True, exist_ok=True)
        if colour_range is None:
            if first is None:
                first = [str(r["path"]) for r in data.limit(chunk).take_all()] if "path" in data.columns() else None
            if not first:
                raise ValueError("overlays of a dataset without a 'path' column need colour_range=(lo, hi)")
            colour_range = first_colour_range(model_path, first, device=device, weights=weights,
                                              threshold=threshold, on_error=on_error)
    return ds.map_batches(
        BatchPredictor, batch_size=rows_per_call, compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        fn_constructor_kwargs={"model_path": model_path, "device": device, "weights": weights, "threshold": threshold,
                               "maps": maps, "overlay_dir": None if overlay_dir is None else str(overlay_dir),
                               "colour_range": colour_range, "on_error": on_error},
    )


def _first_chunks(model_path: str, paths: list[str], chunk: int, device: str, weights: str | None,
                  threshold: float | None, on_error: str, overlay_dir: str | None) -> dict:
    """The run's first chunks, up to the first with a readable image: their rows, the
    colour range that image's chunk sets for the whole run (as the local loop), the
    threshold and the model's type."""
    from .models import load_model  # noqa: PLC0415

    model = load_model(model_path, device=device, weights=weights)
    if threshold is not None:
        model.threshold = float(threshold)
    out: dict[str, Any] = {"threshold": float(model.threshold), "model_type": type(model).__name__,
                           "colour_range": None, "rows": [], "done": 0}
    for start in range(0, len(paths), chunk):
        scored = score_chunk(model, paths[start : start + chunk], on_error)
        out["done"] = start + len(scored.paths)
        if scored.prediction is not None:
            out["colour_range"] = colour_range(scored.prediction.maps, out["threshold"])
        out["rows"] += chunk_rows(scored, list(range(start, start + len(scored.paths))), out["threshold"],
                                  None if overlay_dir is None else Path(overlay_dir), out["colour_range"])
        if scored.prediction is not None:
            break
    return out


def first_colour_range(model_path: str, paths: Sequence[str], *, device: str = "cpu", weights: str | None = None,
                       threshold: float | None = None, on_error: str = "fail",
                       chunk: int = PREDICT_CHUNK) -> tuple[float, float] | None:
    """The overlays' colour scale of a run over ``paths``, as the local predict sets it (one Ray task)."""
    ray = _ray()
    task = ray.remote(_first_chunks)
    result = ray.get(task.remote(str(model_path), list(paths), chunk, device, weights, threshold, on_error, None))
    return result["colour_range"]


_LOAD_ERRORS = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError, "PermissionError": PermissionError,
                "IsADirectoryError": IsADirectoryError, "OSError": OSError}


def _check_row(row: dict, on_error: str) -> None:
    """on_error="fail": an unreadable image stops the run with the local loop's exception."""
    if on_error == "fail" and str(row["error"]):
        raise _LOAD_ERRORS.get(str(row.get("error_type")), ValueError)(str(row["error"]))


def predict_to_folder_ray(model_path: str | os.PathLike, paths: Sequence[str], out: str | os.PathLike, *,
                          workers: int | None = None, cpus_per_worker: float = 1, threshold: float | None = None,
                          overlays: bool = True, on_error: str = "fail", progress: bool = False,
                          chunk: int = PREDICT_CHUNK, device: str = "cpu", weights: str | None = None) -> PredictResult:
    """:func:`softpatch_cuda.jobs.predict_to_folder` on Ray: the same predictions.csv,
    predictions.json and overlays (written by the workers into the run's staging folder,
    named by the driver as the local loop names them), committed atomically."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    ray = _ray()
    check_on_error(on_error)
    model_path = Path(model_path).expanduser()
    if not model_path.is_file():
        raise FileNotFoundError(f"model file not found: {model_path}")
    out = check_writable_dir(out, "output folder")
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no images to predict")
    display = display_names(paths)
    staging = staging_folder(out)
    pending = staging / "pending-overlays"
    try:
        with _plain_errors():
            # the workers skip unreadable images and report them; on_error="fail" is applied
            # here, so the error reaches the caller as itself (Ray Data wraps a worker's
            # exceptions in its own and keeps only their text)
            first = ray.get(ray.remote(_first_chunks).remote(
                str(model_path.resolve()), paths, chunk, device, weights, threshold, "skip",
                str(pending) if overlays else None))
            results = {}
            for r in first["rows"]:
                _check_row(r, on_error)
                results[int(r["index"])] = r
            rest = paths[first["done"]:]
            if rest:
                n_workers = _default_workers(workers, cpus_per_worker)
                ds = _chunk_dataset(paths, chunk, first["done"], n_workers).map_batches(
                    BatchPredictor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_workers),
                    num_cpus=cpus_per_worker,
                    fn_constructor_kwargs={"model_path": str(model_path.resolve()), "device": device,
                                           "weights": weights, "threshold": threshold, "maps": False,
                                           "overlay_dir": str(pending) if overlays else None,
                                           "colour_range": first["colour_range"], "on_error": "skip"})
                bar = tqdm(total=len(rest), desc="predict (ray)", unit="img", disable=not progress, file=sys.stderr)
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for i in range(len(batch["index"])):
                        row = {k: batch[k][i] for k in batch}
                        _check_row(row, on_error)
                        results[int(row["index"])] = row
                    bar.update(len(batch["index"]))
                bar.close()
        threshold_used = first["threshold"]
        names = OverlayNames()
        rows = []
        for i, path in enumerate(paths):
            r = results[i]
            score = None if r["verdict"] == "error" else float(r["score"])
            overlay_path = None
            if overlays and score is not None:
                file_name = names.next(display[path])
                (staging / "overlays").mkdir(exist_ok=True)
                os.replace(str(r["overlay"]), staging / "overlays" / file_name)
                overlay_path = str(out / "overlays" / file_name)
            rows.append(prediction_row(display[path], path, threshold_used, score, str(r["error"]) or None,
                                       overlay_path))
        shutil.rmtree(pending, ignore_errors=True)
        commit_predictions(out, staging, rows, predictions_header(str(model_path), first["model_type"],
                                                                  threshold_used, first["colour_range"]))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PredictResult(rows, out / "predictions.csv", out / "predictions.json",
                         out / "overlays" if overlays else None, threshold_used)


# ------------------------------------------------------------------ distributed fit
class _ShardWorker:
    """A Ray actor that embeds, denoises and coresets shards with its own copy of the model."""

    def __init__(self, model_type: str, config: dict, device: str):
        from .models.registry import kind_by_type  # noqa: PLC0415

        kind = kind_by_type(model_type)
        self.model = kind.cls(device=device, **config)

    def run(self, spec: Any) -> Any:
        from .sharded import run_shard  # noqa: PLC0415

        return run_shard(self.model, spec)


def ray_runner(workers: int | None = None, cpus_per_worker: float = 1, device: str = "cpu"):
    """A :func:`softpatch_cuda.sharded.fit_sharded` runner: the shards on a pool of
    ``workers`` Ray actors, results in completion order."""
    ray = _ray()

    def run(model: Any, specs: Sequence[Any]) -> Iterator[Any]:
        from ray.util import ActorPool  # noqa: PLC0415

        n = min(_default_workers(workers, cpus_per_worker), len(specs))
        actor = ray.remote(num_cpus=cpus_per_worker)(_ShardWorker)
        actors = [actor.remote(model.model_type, model.settings.to_dict(), device) for _ in range(n)]
        try:
            with _plain_errors():
                yield from ActorPool(actors).map_unordered(lambda a, spec: a.run.remote(spec), list(specs))
        finally:
            for a in actors:
                ray.kill(a)

    return run


def fit_distributed(model: Any, images: Any, *, workers: int | None = None, shards: int | None = None,
                    shard_size: int | None = None, cpus_per_worker: float = 1, device: str | None = None,
                    oversample: float | None = None) -> Any:
    """Fit ``model`` with its shards on Ray (a running instance: use :func:`ray_session`).

    The training images are split into ``shards`` (default: one per worker) or shards of
    at most ``shard_size`` images; each worker actor embeds, denoises and coresets its
    shards; the driver merges the coresets with a second greedy k-center pass and
    calibrates the threshold (see :mod:`softpatch_cuda.sharded`). Workers need the
    images at the same paths (a shared file system) or get in-memory images shipped.
    ``device``: where the workers compute (default: the model's device option); the
    actors ask Ray for ``cpus_per_worker`` CPUs each.
    """
    from .sharded import DEFAULT_OVERSAMPLE, fit_sharded  # noqa: PLC0415

    n_workers = _default_workers(workers, cpus_per_worker)
    if shards is None and shard_size is None:
        shards = n_workers
    return fit_sharded(model, images, shards=shards, shard_size=shard_size,
                       oversample=DEFAULT_OVERSAMPLE if oversample is None else oversample,
                       runner=ray_runner(n_workers, cpus_per_worker, device or model.config["device"]))
