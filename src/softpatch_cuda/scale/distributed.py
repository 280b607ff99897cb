"""Beyond one process, on Ray (optional extra: ``pip install ".[ray]"`` in the source folder).

Ray only maps work to workers; what runs is the local code:

* predict: :func:`chunk_runner` is a runner for :func:`softpatch_cuda.jobs.predict_to_folder`
  -- the chunks of a run on a pool of Ray actors, each opening the run's
  :class:`~softpatch_cuda.jobs.ModelSource` once (every option, the thread budget
  included) and returning a :class:`~softpatch_cuda.jobs.ChunkResult` per chunk
  (``softpatch predict ... --ray``): the same rows, overlays and files as the local loop;
* Ray Data: :class:`BatchPredictor` (a callable class for ``Dataset.map_batches``) and
  :func:`predict_dataset` give one row per image, in the local loop's row schema;
* fit: :func:`shard_runner` is a runner for :func:`softpatch_cuda.scale.sharded.fit_sharded`
  -- the shards on a pool of actors, one model copy each; :func:`fit_distributed` uses it
  (``softpatch fit ... --ray``).

Scheduling, retries and data movement are Ray's. A worker's exception reaches the caller
as itself (:func:`plain_errors`), not wrapped in Ray's.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import install_hint
from ..jobs import (
    PREDICT_CHUNK, ChunkJob, ChunkResult, ModelSource, check_on_error, display_names, one_line, overlay_names,
    prediction_row, render_overlay, score_chunk,
)

logger = logging.getLogger(__name__)

RAY_EXTRA = install_hint("ray")


def _ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(f"Ray is not installed: {RAY_EXTRA}") from exc
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
def plain_errors() -> Iterator[None]:
    """Re-raise a worker's exception as itself (one line on the command line), not wrapped in Ray's."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001
        inner = _unwrap(exc)
        if inner is exc:
            raise
        raise inner from None


def _actor_pool(cls: type, args: tuple, count: int, cpus_per_worker: float) -> tuple[Any, list]:
    from ray.util import ActorPool  # noqa: PLC0415

    actor = _ray().remote(num_cpus=cpus_per_worker)(cls)
    actors = [actor.remote(*args) for _ in range(count)]
    return ActorPool(actors), actors


def _map_on_actors(cls: type, args: tuple, items: Sequence[Any], workers: int | None, cpus_per_worker: float,
                   call: str) -> Iterator[Any]:
    """``getattr(actor, call)(item)`` for every item on a pool of ``cls(*args)`` actors,
    results in completion order; the actors go when the iteration ends."""
    count = min(_default_workers(workers, cpus_per_worker), len(items))
    pool, actors = _actor_pool(cls, args, count, cpus_per_worker)
    try:
        with plain_errors():
            yield from pool.map_unordered(lambda a, item: getattr(a, call).remote(item), list(items))
    finally:
        for a in actors:
            _ray().kill(a)


# ------------------------------------------------------------------ predict
class _ChunkScorer:
    """A Ray actor scoring chunks; it opens a run's model on the run's first chunk and
    keeps it for the rest (a pool serves several runs one after another)."""

    def __init__(self) -> None:
        self.source: ModelSource | None = None
        self.model: Any = None

    def score(self, source: ModelSource, job: ChunkJob, on_error: str, overlay_dir: str | None) -> ChunkResult:
        if source != self.source:
            self.model, self.source = source.open(), source
        return score_chunk(self.model, job, on_error, None if overlay_dir is None else Path(overlay_dir))


class ChunkRunner:
    """A :func:`softpatch_cuda.jobs.predict_to_folder` runner: the chunks on a pool of
    ``workers`` Ray actors (default: the cluster's CPUs / ``cpus_per_worker``), results in
    completion order. The actors start with the first run and stay for the next ones
    until :meth:`close` (or the end of a ``with`` block). Workers need the images and the
    run's output folder at the same paths (one machine, or a shared file system)."""

    def __init__(self, workers: int | None = None, cpus_per_worker: float = 1):
        self.workers, self.cpus_per_worker = workers, cpus_per_worker
        self._pool: Any = None
        self._actors: list = []

    def __call__(self, source: ModelSource, jobs: Sequence[ChunkJob], on_error: str,
                 overlay_dir: Path | None) -> Iterator[ChunkResult]:
        if source.path is None:
            raise ValueError("a Ray run opens the model on every worker: give a model file (ModelSource(path=...))")
        if self._pool is None:
            count = _default_workers(self.workers, self.cpus_per_worker)
            self._pool, self._actors = _actor_pool(_ChunkScorer, (), count, self.cpus_per_worker)
        folder = None if overlay_dir is None else str(overlay_dir)
        finished = False
        try:
            with plain_errors():
                yield from self._pool.map_unordered(lambda a, job: a.score.remote(source, job, on_error, folder),
                                                    list(jobs))
            finished = True
        finally:
            if not finished:  # the run stopped early (an error): its chunks in flight go with the actors
                self.close()

    def close(self) -> None:
        for a in self._actors:
            _ray().kill(a)
        self._pool, self._actors = None, []

    def __enter__(self) -> "ChunkRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def chunk_runner(workers: int | None = None, cpus_per_worker: float = 1) -> ChunkRunner:
    """The chunks of :func:`softpatch_cuda.jobs.predict_to_folder` on Ray actors (see :class:`ChunkRunner`)."""
    return ChunkRunner(workers, cpus_per_worker)


class BatchPredictor:
    """Score images in ``ray.data.Dataset.map_batches`` (``compute``: an actor pool).

    The model is opened once per actor from ``source`` (a :class:`ModelSource`, or a model
    file path). Input batches (dict of numpy columns) hold one of:

    * ``"paths"``: per row, a list of image paths scored together (a chunk; the local
      loop's chunks give its exact scores), with ``"index"`` the first path's position;
    * ``"path"``: one image path per row (``"index"`` optional);
    * ``"image"``: in-memory images ([H, W, 3] uint8, e.g. from ``ray.data.read_images``),
      ``"path"`` optional.

    Output, one row per image: the columns of ``predictions.csv``
    (:func:`softpatch_cuda.jobs.prediction_row`; score NaN and error / overlay "" where
    there is none, as Ray Data wants typed columns), ``index`` (-1 when unknown) and, with
    ``maps=True``, ``map`` ([S, S] float32 anomaly map in the model frame). With
    ``overlay_dir`` each actor writes overlay PNGs there (on the model's colour scale).
    """

    def __init__(self, source: ModelSource | str | os.PathLike, *, maps: bool = False,
                 overlay_dir: str | os.PathLike | None = None, on_error: str = "fail"):
        if not isinstance(source, ModelSource):
            source = ModelSource(path=str(source), device="cpu")
        self.model = source.open()
        self.maps = bool(maps)
        self.overlay_dir = None if overlay_dir is None else Path(overlay_dir)
        self.on_error = check_on_error(on_error)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "paths" in batch:
            starts = [int(i) for i in batch["index"]] if "index" in batch else [-1] * len(batch["paths"])
            rows: list[dict] = []
            for paths, start in zip(batch["paths"], starts):
                paths = [str(p) for p in paths]
                rows += self._score_paths(paths, [start + i if start >= 0 else -1 for i in range(len(paths))])
        elif "image" in batch:
            rows = self._score_images(batch)
        elif "path" in batch:
            index = [int(i) for i in batch["index"]] if "index" in batch else [-1] * len(batch["path"])
            rows = self._score_paths([str(p) for p in batch["path"]], index)
        else:
            raise ValueError(f"BatchPredictor: a batch needs a 'paths', 'path' or 'image' column, got {sorted(batch)}")
        return _columns(rows)

    def _overlay_names(self, names: list[str], index: list[int]) -> list[str] | None:
        # unique without coordination between workers: the position (else this process), then the name
        if self.overlay_dir is None:
            return None
        return overlay_names([f"{i:09d}-{n}" if i >= 0 else f"{os.getpid()}-{id(names)}-{k}-{n}"
                              for k, (n, i) in enumerate(zip(names, index))])

    def _score_paths(self, paths: list[str], index: list[int]) -> list[dict]:
        names = display_names(paths)
        job = ChunkJob(0, paths, self._overlay_names([names[p] for p in paths], index))
        result = score_chunk(self.model, job, self.on_error, self.overlay_dir, maps=self.maps)
        failure = result.first_failure()
        if self.on_error == "fail" and failure is not None:
            raise failure
        return [self._row(names[p], p, result.threshold, result.scores[i], result.anomalous[i],
                          one_line(result.failures[i]), result.overlays[i], index[i],
                          None if result.maps is None else result.maps[i]) for i, p in enumerate(paths)]

    def _score_images(self, batch: dict[str, np.ndarray]) -> list[dict]:
        from PIL import Image  # noqa: PLC0415

        images = [Image.fromarray(np.asarray(a, dtype=np.uint8)).convert("RGB") for a in batch["image"]]
        paths = [str(p) for p in batch["path"]] if "path" in batch else [""] * len(images)
        index = [int(i) for i in batch["index"]] if "index" in batch else [-1] * len(images)
        names = [Path(p).name or f"image_{k}" for k, p in enumerate(paths)]
        files = self._overlay_names(names, index)
        prediction = self.model.predict(images)
        vrange = self.model.colour_range()
        rows = []
        for k in range(len(images)):
            overlay_path = None if files is None else str(
                render_overlay(images[k], prediction, k, vrange, self.overlay_dir / files[k]))
            rows.append(self._row(names[k], paths[k], float(prediction.threshold), float(prediction.scores[k]),
                                  bool(prediction.is_anomalous[k]), None, overlay_path, index[k],
                                  prediction.maps[k] if self.maps else None))
        return rows

    def _row(self, name: str, path: str, threshold: float, score: float | None, anomalous: bool | None,
             error: str | None, overlay: str | None, index: int, amap: np.ndarray | None) -> dict:
        row = prediction_row(name, path, threshold, score, anomalous, error, overlay)
        row["index"] = index
        if self.maps:  # an unreadable image's map is empty
            row["map"] = np.zeros((0, 0), np.float32) if amap is None else np.asarray(amap, dtype=np.float32)
        return row


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> typed numpy columns (None: NaN for the score, "" for text)."""
    if not rows:
        return {}
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "map":
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[key] = arr
        elif key == "score":
            out[key] = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
        elif key in ("error", "overlay"):
            out[key] = np.asarray(["" if v is None else v for v in values])
        else:
            out[key] = np.asarray(values)
    return out


def predict_dataset(source: ModelSource | str | os.PathLike, data: Any, *, workers: int | None = None,
                    cpus_per_worker: float = 1, batch_size: int = 16, chunk: int = PREDICT_CHUNK,
                    maps: bool = False, overlay_dir: str | os.PathLike | None = None, on_error: str = "fail") -> Any:
    """A (lazy) Ray Dataset of predictions, one row per image (columns: see :class:`BatchPredictor`).

    ``source``: a :class:`ModelSource` or a model file. ``data``: a folder, a list of image
    paths (scored in chunks of ``chunk`` images: the local predict's exact scores; rows
    carry ``index``, the path's position), or a ``ray.data.Dataset`` with a ``path``
    and/or ``image`` column (batches of ``batch_size`` rows). ``workers`` actors (default:
    the cluster's CPUs / ``cpus_per_worker``) each open the model once. Run it with
    ``.take_all()``, ``.iter_rows()``, ``.write_parquet(...)``.
    """
    ray = _ray()
    check_on_error(on_error)
    if not isinstance(source, ModelSource):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        source = ModelSource(path=str(path), device="cpu")
    workers = _default_workers(workers, cpus_per_worker)
    if isinstance(data, ray.data.Dataset):
        ds, rows_per_call = data, batch_size
    else:
        from .sharded import image_list  # noqa: PLC0415

        paths = image_list(data)
        if not all(isinstance(p, str) for p in paths):
            raise TypeError("predict_dataset takes image paths or a ray.data.Dataset")
        items = [{"index": i, "paths": list(paths[i : i + chunk])} for i in range(0, len(paths), chunk)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * workers)))
        rows_per_call = 1
    if overlay_dir is not None:
        overlay_dir = Path(overlay_dir).expanduser().resolve()
        overlay_dir.mkdir(parents=True, exist_ok=True)
    return ds.map_batches(
        BatchPredictor, batch_size=rows_per_call, compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        fn_constructor_kwargs={"source": source, "maps": maps,
                               "overlay_dir": None if overlay_dir is None else str(overlay_dir), "on_error": on_error},
    )


# ------------------------------------------------------------------ fit
class _ShardWorker:
    """A Ray actor that embeds, denoises and coresets shards with its own copy of the
    model (every option, the thread budget included); its results travel on the CPU."""

    def __init__(self, model_type: str, config: dict, device: str, threads: int | str):
        from ..models.registry import kind_by_type  # noqa: PLC0415

        self.model = kind_by_type(model_type).cls(device=device, threads=threads, **config)

    def run(self, job: Any) -> Any:
        from .sharded import run_shard  # noqa: PLC0415

        return run_shard(self.model, job).to("cpu")


def shard_runner(workers: int | None = None, cpus_per_worker: float = 1, device: str = "cpu"):
    """A :func:`softpatch_cuda.scale.sharded.fit_sharded` runner: the shards on a pool of
    ``workers`` Ray actors, results in completion order."""

    def run(model: Any, jobs: Sequence[Any]) -> Iterator[Any]:
        args = (model.model_type, model.settings.to_dict(), device, model.threads)
        yield from _map_on_actors(_ShardWorker, args, jobs, workers, cpus_per_worker, "run")

    return run


def fit_distributed(model: Any, images: Any, *, workers: int | None = None, shards: int | None = None,
                    shard_size: int | None = None, cpus_per_worker: float = 1, device: str | None = None,
                    oversample: float | None = None) -> Any:
    """Fit ``model`` with its shards on Ray (a running instance: use :func:`ray_session`).

    The training images are split into ``shards`` (default: one per worker) or shards of
    at most ``shard_size`` images; each worker actor embeds, denoises and coresets its
    shards; the driver merges the coresets with a second greedy k-center pass and
    calibrates the threshold (see :mod:`softpatch_cuda.scale.sharded`). Workers need the
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
                       runner=shard_runner(n_workers, cpus_per_worker, device or model.config["device"]))
