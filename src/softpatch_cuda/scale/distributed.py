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

Where it runs (:func:`ray_session`): without an address, a Ray instance of its own on this
machine (``ray.init(address="local")``: never a cluster that happens to run here, nor the
one ``RAY_ADDRESS`` names); only an explicit address ("auto", "HOST:PORT",
"ray://HOST:PORT") joins a cluster, and one that cannot be reached fails within
:data:`CONNECT_TIMEOUT_S` seconds. :func:`fit_distributed`, :func:`predict_dataset` and
:func:`chunk_runner` start a local instance themselves when none is running.

The pools (:class:`_Pool`): at most as many actors as the cluster has free CPUs for (more
workers asked for: fewer started, one warning; the work is split as asked, so the result
does not depend on the machine); workers that do not start within
:data:`START_TIMEOUT_S` seconds fail the run with one line; a shard or chunk whose worker
is lost (a node gone, a process killed) runs again on another worker, up to
:data:`MAX_ATTEMPTS` times in all. Paths are made absolute on the driver (workers start in
another folder). A worker's exception reaches the caller as itself, in one line
(:func:`plain_errors`; its remote traceback is logged at debug level, ``softpatch -v``),
not wrapped in Ray's; a file a worker cannot find but the driver can says that the
cluster needs shared storage.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import install_hint
from ..jobs import (
    PREDICT_CHUNK, ChunkJob, ChunkResult, ModelSource, check_on_error, display_names, one_line, overlay_names,
    prediction_row, render_overlay, score_chunk,
)

logger = logging.getLogger(__name__)

RAY_EXTRA = install_hint("ray")
CONNECT_TIMEOUT_S = 10.0  # an explicit address that does not answer fails after this long
START_TIMEOUT_S = float(os.environ.get("SOFTPATCH_RAY_START_TIMEOUT", 120))  # no worker up after this long: fail
MAX_ATTEMPTS = 3  # a shard / chunk whose worker is lost runs again, this many times in all
GRACE_S = 30.0  # a failed run waits this long for its chunks in flight before killing their workers
SHARED_STORAGE = ("on a Ray cluster the model, the images and the output folder must be on storage every node "
                  "shares, at the same paths")
_FAULT_ENV = "SOFTPATCH_RAY_FAULT_DIR"  # tests: a worker that finds <dir>/crash-<call> deletes it and dies


class RayRunError(RuntimeError):
    """A Ray run could not be carried out (no cluster, no workers, workers lost): one line."""


def _ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(f"Ray is not installed: {RAY_EXTRA}") from exc
    return ray


# ------------------------------------------------------------------ the Ray instance
def _is_local(address: str | None) -> bool:
    return address in (None, "", "local")


def _host_port(address: str) -> tuple[str, int] | None:
    """Where an explicit address's cluster answers ("auto": the running cluster's address,
    as Ray finds it), or None when that cannot be told here."""
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment  # noqa: PLC0415

            found = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise RayRunError("--ray-address auto: no running Ray cluster found on this machine (start one with "
                              "'ray start --head', or give HOST:PORT)") from None
        except Exception:  # noqa: BLE001 -- a private helper: no check rather than a wrong one
            return None
        address = found or ""
    match = re.match(r"^(?:(ray|https?)://)?\[?([\w.\-:]+?)\]?(?::(\d+))?$", address)
    if match is None:
        return None
    scheme, host, port = match.groups()
    if port is None:
        port = {"ray": "10001", "http": "80", "https": "443"}.get(scheme or "", "6379")
    return host, int(port)


def _check_reachable(address: str, timeout: float) -> None:
    where = _host_port(address)
    if where is None:
        return
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc) or type(exc).__name__)
        shown = address if address.endswith(f"{where[0]}:{where[1]}") else f"{address} ({where[0]}:{where[1]})"
        raise RayRunError(f"cannot reach the Ray cluster at {shown} within {timeout:g} s: {reason}") from None


def _init(address: str | None, num_cpus: int | None, quiet: bool, connect_timeout: float) -> None:
    ray = _ray()
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR if quiet else logging.WARNING,
                              "log_to_driver": not quiet}
    if _is_local(address):
        kwargs.update(address="local", num_cpus=num_cpus)  # "local": never a cluster found on the machine
        connecting: Any = contextlib.nullcontext()
    else:
        _check_reachable(address, connect_timeout)  # nothing answers there: refused in seconds
        kwargs["address"] = address
        connecting = _connecting(connect_timeout)  # something answers, not Ray: refused in seconds too
    try:
        with connecting:
            ray.init(**kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        where = "start a local Ray instance" if _is_local(address) else f"connect to the Ray cluster at {address}"
        raise RayRunError(f"cannot {where}: {_first_line(exc)}") from exc


@contextlib.contextmanager
def _connecting(timeout: float) -> Iterator[None]:
    """While ray.init joins a cluster: Ray's own connect retries bounded by ``timeout``
    (``RAY_gcs_server_port_wait_time_s``, unless set), and the retry warnings its C++
    client writes every second held back -- written out when it connects, logged at
    debug level when it does not (the caller says why in one line)."""
    key = "RAY_gcs_server_port_wait_time_s"
    previous = os.environ.get(key)
    if previous is None:
        os.environ[key] = str(max(1, int(np.ceil(timeout))))
    sys.stderr.flush()
    saved = os.dup(2)
    ok = False
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
                ok = True
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                held.seek(0)
                text = held.read()
                if ok:
                    os.write(2, text)
                elif text:
                    logger.debug("Ray, while connecting:\n%s", text.decode(errors="replace"))
    finally:
        os.close(saved)
        if previous is None:
            os.environ.pop(key, None)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, quiet: bool = False,
                connect_timeout: float = CONNECT_TIMEOUT_S) -> Iterator[Any]:
    """Use the Ray instance this process already runs, or start a local one (``address``
    None / "local": a new instance on this machine with ``num_cpus`` CPUs, even when a
    cluster runs here or ``RAY_ADDRESS`` names one), or join the cluster at ``address``
    ("auto": the one running here; "HOST:PORT"; "ray://HOST:PORT"), refused within
    ``connect_timeout`` seconds when it does not answer -- and shut down only what this
    context started."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        _init(address, num_cpus, quiet, connect_timeout)
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


def _ensure_ray(address: str | None) -> bool:
    """Start (or join) a Ray instance when this process runs none, as Ray Data's own
    functions do -- a local one unless ``address`` is given; True when it started one."""
    ray = _ray()
    if ray.is_initialized():
        return False
    logger.info("no Ray instance in this process: %s", "starting a local one" if _is_local(address)
                else f"joining {address}")
    _init(address, None, False, CONNECT_TIMEOUT_S)
    return True


def cluster_cpus() -> int:
    return max(1, int(_ray().cluster_resources().get("CPU", 1)))


def _free_slots(cpus_per_worker: float) -> int:
    """How many more ``cpus_per_worker``-CPU actors the cluster can place now."""
    free = float(_ray().available_resources().get("CPU", 0.0))
    return int(free / cpus_per_worker + 1e-9) if cpus_per_worker > 0 else 1 << 30


def _check_workers(workers: int | None) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")


def _default_workers(workers: int | None, cpus_per_worker: float) -> int:
    _check_workers(workers)
    if workers is None:
        return max(1, int(cluster_cpus() // cpus_per_worker))
    return int(workers)


def _check_cpus_per_worker(cpus_per_worker: float) -> float:
    if isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, (int, float)) or not cpus_per_worker >= 0:
        raise ValueError(f"cpus_per_worker must be a number >= 0, got {cpus_per_worker!r}")
    return float(cpus_per_worker)


def _pool_size(wanted: int, cpus_per_worker: float, what: str) -> int:
    """``wanted`` actors, or as many as the cluster has free CPUs for (one warning): an
    actor that cannot be placed would wait for ever."""
    slots = _free_slots(cpus_per_worker)
    if wanted <= slots:
        return wanted
    size = max(1, slots)
    logger.warning("%d Ray workers asked for, the cluster has free CPUs for %d: %s on %d worker(s)",
                   wanted, slots, what, size)
    return size


# ------------------------------------------------------------------ errors
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.splitlines()[0].split())


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


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


_MISSING = re.compile(r"not found: (.+)$")


def _shared_storage_hint(exc: BaseException) -> BaseException:
    """A file a worker did not find that this machine has: say why (no shared storage)."""
    if not isinstance(exc, FileNotFoundError):
        return exc
    text = one_line(exc) or ""
    match = _MISSING.search(text)
    path = exc.filename or (match.group(1) if match else None)
    if path and Path(str(path)).exists() and SHARED_STORAGE not in text:
        return FileNotFoundError(f"{text} on a Ray worker, though this machine has it: {SHARED_STORAGE}")
    return exc


def _plain(exc: BaseException) -> BaseException:
    """A worker's exception as the caller should see it: the user's own error, in one line."""
    inner = _unwrap(exc)
    tb = getattr(exc, "traceback_str", None)
    if tb:
        logger.debug("the Ray worker's traceback:\n%s", tb)
    if inner is exc:
        if type(exc).__module__.startswith("ray"):  # Ray's own: its message can be a whole traceback
            return RayRunError(f"{type(exc).__name__}: {_first_line(exc)}")
        return exc
    return _shared_storage_hint(inner)


@contextlib.contextmanager
def plain_errors() -> Iterator[None]:
    """Re-raise a worker's exception as itself (one line on the command line), not wrapped in Ray's."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001
        plain = _plain(exc)
        if plain is exc:
            raise
        raise plain from None


def _lost(exc: BaseException) -> bool:
    """The worker went away (its node, its process), not an error in the work itself."""
    from ray import exceptions as rex  # noqa: PLC0415

    lost = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
            rex.LocalRayletDiedError)
    return isinstance(exc, lost) and not getattr(exc, "actor_init_failed", False)


def _start_failure(exc: BaseException) -> BaseException:
    """Why a worker could not start, in one line."""
    if getattr(exc, "actor_init_failed", False):  # its creation raised: the last line of the trace says what
        logger.debug("the Ray worker's start:\n%s", exc)
        cause = _last_line(str(exc))
        hint = (": is softpatch_cuda installed on every node (the same version)?"
                if "ModuleNotFoundError" in cause and "softpatch_cuda" in cause else "")
        return RayRunError(f"a Ray worker could not start: {cause}{hint}")
    plain = _plain(exc)
    if isinstance(plain, RayRunError):
        return RayRunError(f"a Ray worker could not start: {plain}")
    return plain


def _fault_point(call: str) -> None:
    """Tests only (``SOFTPATCH_RAY_FAULT_DIR`` in the workers' environment): a worker that
    claims (deletes) one of the files <dir>/crash-<call>* dies there, as a worker on a lost
    node does."""
    folder = os.environ.get(_FAULT_ENV)
    if not folder or not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        if name.startswith(f"crash-{call}"):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:  # another worker claimed it
                continue
            os._exit(1)


# ------------------------------------------------------------------ actor pools
class _Pool:
    """``size`` actors of ``cls(*args)`` (each asks Ray for ``cpus_per_worker`` CPUs).

    :meth:`map` runs ``getattr(actor, call)(item, *extra)`` for every item, results in
    completion order; an item whose actor is lost runs again on another actor (a new one
    replaces the lost one), :data:`MAX_ATTEMPTS` times in all; no actor up within
    ``start_timeout`` seconds fails with one line."""

    def __init__(self, cls: type, args: tuple, size: int, cpus_per_worker: float,
                 start_timeout: float | None = None):
        ray = _ray()
        self._remote = ray.remote(num_cpus=cpus_per_worker, max_restarts=0)(cls)
        self._args = args
        self.start_timeout = START_TIMEOUT_S if start_timeout is None else float(start_timeout)
        self.size = size
        self._starting: dict[Any, Any] = {}  # ready() ref -> actor
        self._idle: list = []
        self._hosts: dict[Any, str] = {}
        self._running: dict[Any, tuple] = {}  # ref -> (item, attempt, actor, label)
        self._down_since = time.monotonic()  # since when no actor is up (None: one is)
        for _ in range(size):
            self._start()

    def _start(self) -> None:
        actor = self._remote.remote(*self._args)
        self._starting[actor.ready.remote()] = actor

    def _up(self) -> int:
        return len(self._idle) + len({v[2] for v in self._running.values()})

    def _drop(self, actor: Any) -> None:
        with contextlib.suppress(Exception):
            _ray().kill(actor)
        self._hosts.pop(actor, None)
        if self._up() == 0 and self._down_since is None:
            self._down_since = time.monotonic()

    def map(self, call: str, items: Sequence[Any], label: Callable[[Any], str],
            extra: tuple = ()) -> Iterator[tuple[Any, Any]]:
        """(item, result) per item, in completion order."""
        ray = _ray()
        pending = collections.deque((item, 1) for item in items)
        finished = False
        try:
            while pending or self._running:
                while pending and self._idle:
                    item, attempt = pending.popleft()
                    actor = self._idle.pop()
                    self._running[getattr(actor, call).remote(item, *extra)] = (item, attempt, actor)
                waiting = list(self._running) + list(self._starting)
                if not waiting:  # every actor lost and none starting: start the pool again
                    for _ in range(self.size):
                        self._start()
                    continue
                done, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
                if not done:
                    self._check_start_time()
                    continue
                ref = done[0]
                if ref in self._starting:
                    self._started(ref)
                    continue
                item, attempt, actor = self._running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001
                    if not _lost(exc):
                        self._idle.append(actor)
                        raise _plain(exc) from None
                    where = self._hosts.get(actor, "?")
                    self._drop(actor)
                    self._start()  # a replacement, placed wherever Ray finds room
                    if attempt >= MAX_ATTEMPTS:
                        raise RayRunError(f"{label(item)}: its Ray worker was lost {attempt} times, the last on "
                                          f"{where} ({_first_line(exc)})") from None
                    logger.warning("%s: its Ray worker on %s was lost (%s); running it again (attempt %d of %d)",
                                   label(item), where, _first_line(exc), attempt + 1, MAX_ATTEMPTS)
                    pending.appendleft((item, attempt + 1))
                    continue
                self._idle.append(actor)
                yield item, result
            finished = True
        finally:
            if not finished:
                self._settle()

    def _started(self, ref: Any) -> None:
        actor = self._starting.pop(ref)
        try:
            self._hosts[actor] = _ray().get(ref)
        except Exception as exc:  # noqa: BLE001
            with contextlib.suppress(Exception):
                _ray().kill(actor)
            if _lost(exc):  # its node went before it started: start another
                self._start()
                return
            self.close()
            raise _start_failure(exc) from None
        self._idle.append(actor)
        self._down_since = None

    def _check_start_time(self) -> None:
        if self._down_since is None or time.monotonic() - self._down_since < self.start_timeout:
            return
        cpus = _ray().cluster_resources().get("CPU", 0)
        self.close()
        raise RayRunError(f"no Ray worker started within {self.start_timeout:g} s (the cluster has {cpus:g} CPUs, "
                          f"{_ray().available_resources().get('CPU', 0):g} free): is the cluster busy or shrinking?")

    def _settle(self) -> None:
        """A run that stops early: its items in flight finish (up to GRACE_S seconds, so no
        worker still writes into the run's folder), then their actors go."""
        if self._running:
            done: list = []
            with contextlib.suppress(Exception):
                done, _ = _ray().wait(list(self._running), num_returns=len(self._running), timeout=GRACE_S)
            for ref in done:  # fetched, so that Ray does not print their errors as "unhandled" later
                with contextlib.suppress(Exception):
                    _ray().get(ref)
            for _, _, actor in self._running.values():
                self._drop(actor)
            self._running.clear()

    def close(self) -> None:
        for actor in list(self._idle) + list(self._starting.values()) + [v[2] for v in self._running.values()]:
            with contextlib.suppress(Exception):
                _ray().kill(actor)
        self._idle, self._starting, self._running, self._hosts = [], {}, {}, {}


def _host() -> str:
    try:
        return f"{socket.gethostname()} ({_ray().util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001
        return socket.gethostname()


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().absolute())


def _source_on_driver(source: ModelSource, who: str) -> ModelSource:
    """The model source with absolute paths (workers start in another folder), its files checked here."""
    if source.path is None:
        raise ValueError(f"{who} opens the model on every worker: give a model file (ModelSource(path=...))")
    source = dataclasses.replace(source, path=_absolute(source.path), graph=_absolute(source.graph),
                                 weights=_absolute(source.weights))
    for what, file in (("model file", source.path), ("graph file", source.graph), ("weights file", source.weights)):
        if file is not None and not os.path.isfile(file):
            raise FileNotFoundError(f"{what} not found: {file}")
    return source


def _absolute_image(item: Any) -> Any:
    return _absolute(os.fspath(item)) if isinstance(item, (str, os.PathLike)) else item


def _check_images_here(items: Sequence[Any]) -> None:
    """Image paths the driver cannot see either: refused before any worker starts."""
    missing = [os.fspath(p) for p in items if isinstance(p, (str, os.PathLike)) and not os.path.exists(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"image file not found: {missing[0]}{more}")


# ------------------------------------------------------------------ predict
class _ChunkScorer:
    """A Ray actor scoring chunks; it opens a run's model on the run's first chunk and
    keeps it for the rest (a pool serves several runs one after another)."""

    def __init__(self) -> None:
        self.source: ModelSource | None = None
        self.model: Any = None

    def ready(self) -> str:
        return _host()

    def score(self, job: ChunkJob, source: ModelSource, on_error: str, overlay_dir: str | None) -> ChunkResult:
        _fault_point("score")
        if source != self.source:
            self.model, self.source = source.open(), source
        return score_chunk(self.model, job, on_error, None if overlay_dir is None else Path(overlay_dir))


def _chunk_label(job: ChunkJob) -> str:
    first = Path(job.paths[0]).name if job.paths else ""
    return f"images {job.start + 1}-{job.start + len(job.paths)} ({first}, ...)"


def _check_chunk(result: ChunkResult, folder: str | None) -> None:
    """What a worker handed back, checked here: a file it missed that this machine has, an
    overlay it wrote where this machine does not see it -- no shared storage."""
    for failure in result.failures:
        hinted = None if failure is None else _shared_storage_hint(failure)
        if hinted is not failure:
            raise hinted
    for overlay in result.overlays:
        if overlay is not None and not os.path.exists(overlay):
            raise RayRunError(f"the overlay {Path(overlay).name} a Ray worker wrote is not in {folder} on this "
                              f"machine: {SHARED_STORAGE}")


class ChunkRunner:
    """A :func:`softpatch_cuda.jobs.predict_to_folder` runner: the chunks on a pool of
    ``workers`` Ray actors (default: the cluster's CPUs / ``cpus_per_worker``; at most as
    many as it has free CPUs for), results in completion order. The actors start with
    the first run and stay for the next ones until :meth:`close` (or the end of a
    ``with`` block). Without a Ray instance in this process the first run starts one
    (local, or ``address``'s cluster) and :meth:`close` shuts it down. Paths are made
    absolute here; the workers need the model, the images and the run's output folder at
    those paths (one machine, or storage every node shares)."""

    def __init__(self, workers: int | None = None, cpus_per_worker: float = 1, address: str | None = None):
        _check_workers(workers)
        self.workers, self.cpus_per_worker = workers, _check_cpus_per_worker(cpus_per_worker)
        self.address = address
        self._pool: _Pool | None = None
        self._started_ray = False

    def __call__(self, source: ModelSource, jobs: Sequence[ChunkJob], on_error: str,
                 overlay_dir: Path | None) -> Iterator[ChunkResult]:
        source = _source_on_driver(source, "a Ray run")
        jobs = list(jobs)
        _check_images_here([p for job in jobs for p in job.paths])
        self._started_ray = _ensure_ray(self.address) or self._started_ray
        if self._pool is None:
            wanted = _default_workers(self.workers, self.cpus_per_worker)
            self._pool = _Pool(_ChunkScorer, (), _pool_size(wanted, self.cpus_per_worker, "the chunks run"),
                               self.cpus_per_worker)
        folder = None if overlay_dir is None else _absolute(str(overlay_dir))
        given = {job.start: job for job in jobs}
        sent = [dataclasses.replace(job, paths=[_absolute(p) for p in job.paths]) for job in jobs]
        results = self._pool.map("score", sent, _chunk_label, extra=(source, on_error, folder))
        finished = False
        try:
            for _, result in results:
                _check_chunk(result, folder)
                result.paths = list(given[result.start].paths)  # the rows show the paths as given
                yield result
            finished = True
        finally:
            results.close()  # a run that stops early: its chunks in flight finish first (GRACE_S)
            if not finished and self._pool is not None:
                self._pool.close()
                self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._started_ray:
            self._started_ray = False
            _ray().shutdown()

    def __enter__(self) -> "ChunkRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def chunk_runner(workers: int | None = None, cpus_per_worker: float = 1, address: str | None = None) -> ChunkRunner:
    """The chunks of :func:`softpatch_cuda.jobs.predict_to_folder` on Ray actors (see :class:`ChunkRunner`)."""
    return ChunkRunner(workers, cpus_per_worker, address)


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
                    maps: bool = False, overlay_dir: str | os.PathLike | None = None, on_error: str = "fail",
                    address: str | None = None) -> Any:
    """A (lazy) Ray Dataset of predictions, one row per image (columns: see :class:`BatchPredictor`).

    ``source``: a :class:`ModelSource` or a model file. ``data``: a folder, a list of image
    paths (scored in chunks of ``chunk`` images: the local predict's exact scores; rows
    carry ``index``, the path's position), or a ``ray.data.Dataset`` with a ``path``
    and/or ``image`` column (batches of ``batch_size`` rows). ``workers`` actors (default:
    the cluster's CPUs / ``cpus_per_worker``) each open the model once. Run it with
    ``.take_all()``, ``.iter_rows()``, ``.write_parquet(...)``.

    Paths are made absolute here (the rows' ``path`` too); the workers need the model,
    the images and ``overlay_dir`` at those paths. Without a Ray instance in this process
    one is started, as Ray Data's own functions do: a local one, or ``address``'s cluster
    (see :func:`ray_session`); it stays up for the dataset's execution.
    """
    ray = _ray()
    check_on_error(on_error)
    cpus_per_worker = _check_cpus_per_worker(cpus_per_worker)
    _check_workers(workers)
    if not isinstance(source, ModelSource):
        source = ModelSource(path=str(source), device="cpu")
    source = _source_on_driver(source, "predict_dataset")
    _ensure_ray(address)
    workers = _pool_size(_default_workers(workers, cpus_per_worker), cpus_per_worker, "the images are scored")
    if isinstance(data, ray.data.Dataset):
        ds, rows_per_call = data, batch_size
    else:
        from .sharded import image_list  # noqa: PLC0415

        paths = image_list(data)
        if not all(isinstance(p, (str, os.PathLike)) for p in paths):
            raise TypeError("predict_dataset takes image paths or a ray.data.Dataset")
        paths = [_absolute(os.fspath(p)) for p in paths]
        _check_images_here(paths)
        items = [{"index": i, "paths": list(paths[i : i + chunk])} for i in range(0, len(paths), chunk)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * workers)))
        rows_per_call = 1
    if overlay_dir is not None:
        overlay_dir = Path(_absolute(os.fspath(overlay_dir)))
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

    def ready(self) -> str:
        return _host()

    def run(self, job: Any) -> Any:
        from .sharded import run_shard  # noqa: PLC0415

        _fault_point("run")
        return run_shard(self.model, job).to("cpu")


def _shard_label(job: Any) -> str:
    return f"shard {job.shard.index + 1}/{job.shard.count}"


def shard_runner(workers: int | None = None, cpus_per_worker: float = 1, device: str = "cpu"):
    """A :func:`softpatch_cuda.scale.sharded.fit_sharded` runner: the shards on a pool of
    ``workers`` Ray actors (at most one per shard, and as many as the cluster has free CPUs
    for), results in completion order; a shard whose worker is lost runs again on another
    (see :class:`_Pool`). Image paths are made absolute here; the results name them as given."""
    _check_workers(workers)
    cpus_per_worker = _check_cpus_per_worker(cpus_per_worker)

    def run(model: Any, jobs: Sequence[Any]) -> Iterator[Any]:
        from .sharded import ShardJob  # noqa: PLC0415

        jobs = list(jobs)
        _check_images_here([p for job in jobs for p in job.images])
        args = (model.model_type, model.settings.to_dict(), device, model.threads)
        wanted = min(_default_workers(workers, cpus_per_worker), len(jobs))
        pool = _Pool(_ShardWorker, args, _pool_size(wanted, cpus_per_worker, f"the {len(jobs)} shards run"),
                     cpus_per_worker)
        given = {job.shard.index: {_absolute_image(p): os.fspath(p) for p in job.images
                                   if isinstance(p, (str, os.PathLike))} for job in jobs}
        sent = [ShardJob(job.shard, [_absolute_image(p) for p in job.images]) for job in jobs]
        results = pool.map("run", sent, _shard_label)
        try:
            for _, result in results:
                back = given[result.shard.index]  # the report names the images as given
                result.sources = [None if s is None else back.get(s, s) for s in result.sources]
                yield result
        finally:
            results.close()  # stopped early: the shards in flight finish first (GRACE_S)
            pool.close()

    return run


def fit_distributed(model: Any, images: Any, *, workers: int | None = None, shards: int | None = None,
                    shard_size: int | None = None, cpus_per_worker: float = 1, device: str | None = None,
                    oversample: float | None = None, address: str | None = None) -> Any:
    """Fit ``model`` with its shards on Ray.

    The training images are split into ``shards`` (default: one per worker) or shards of
    at most ``shard_size`` images; each worker actor embeds, denoises and coresets its
    shards; the driver merges the coresets with a second greedy k-center pass and
    calibrates the threshold (see :mod:`softpatch_cuda.scale.sharded`). ``workers``
    (default: the cluster's CPUs / ``cpus_per_worker``) decides the shards; the actors
    are at most as many as the cluster has free CPUs for (a warning says so), so the
    model does not depend on the machine. A shard whose worker is lost runs again on
    another. Workers need the images at the same paths (made absolute here: one machine,
    or storage every node shares) or get in-memory images shipped. ``device``: where the
    workers compute (default: the model's device option); the actors ask Ray for
    ``cpus_per_worker`` CPUs each. Without a Ray instance in this process one is started
    for the fit and shut down after it: a local one, or ``address``'s cluster (see
    :func:`ray_session`).
    """
    from .sharded import DEFAULT_OVERSAMPLE, fit_sharded  # noqa: PLC0415

    _check_workers(workers)
    with contextlib.ExitStack() as stack:
        if not _ray().is_initialized():
            stack.enter_context(ray_session(address))
        n_workers = _default_workers(workers, cpus_per_worker)
        if shards is None and shard_size is None:
            shards = n_workers
        return fit_sharded(model, images, shards=shards, shard_size=shard_size,
                           oversample=DEFAULT_OVERSAMPLE if oversample is None else oversample,
                           runner=shard_runner(n_workers, cpus_per_worker, device or model.config["device"]))
