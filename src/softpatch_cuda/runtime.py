"""Run-time capability: is a CUDA device usable by *our* kernels, and which device to use.

Probed lazily and cached: importing softpatch_cuda never touches CUDA. torch may
see a GPU that our CUDA 13 kernels cannot use (older driver), so "auto" asks the
compiled module, not only torch. torch is imported by the functions that return or set
torch objects, not by this module (the torch-free predictor uses the thread budget).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

from . import _core

FORCE_CPU_ENV = "SOFTPATCH_FORCE_CPU"


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[bool, str]:
    if os.environ.get(FORCE_CPU_ENV, "") not in ("", "0"):
        return False, f"{FORCE_CPU_ENV} is set"
    if not _core.build_info()["cuda_compiled"]:
        if _core.build_info().get("cuda_option") == "OFF":
            return False, "softpatch_cuda was built without CUDA (SOFTPATCH_CUDA=OFF)"
        return False, "softpatch_cuda was built without CUDA (no nvcc at build time)"
    probe = _core.cuda_probe()
    if probe["device_count"] == 0:
        return False, probe["reason"] or "no CUDA device"
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return False, "torch is not installed (the CUDA path runs on torch tensors)"
    if not torch.cuda.is_available():
        return False, "torch cannot use the GPU (CPU-only torch build or driver mismatch)"
    return True, ""


def cuda_available() -> bool:
    """True when the compiled CUDA kernels can run on a visible GPU."""
    return _probe()[0]


def cuda_unavailable_reason() -> str:
    """Why :func:`cuda_available` is False ("" when it is True)."""
    return _probe()[1]


def resolve_device(device: Any = "auto") -> Any:
    """Map "auto" | "cpu" | "cuda" | "cuda:N" | torch.device to a torch.device.

    "auto" picks CUDA only when :func:`cuda_available`; an explicit "cuda" on a
    machine without a usable GPU raises a RuntimeError that says why.
    """
    import torch  # noqa: PLC0415

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda") if cuda_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if dev.type == "cuda" and not cuda_available():
        raise RuntimeError(f"device={str(device)!r} requested but CUDA is unavailable: {cuda_unavailable_reason()}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


# ---------------------------------------------------------------- thread budget
THREADS_ENV = "SOFTPATCH_THREADS"


def usable_cpus() -> int:
    """CPUs this process may run on (affinity mask, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def other_runnable(samples: int = 8, interval_s: float = 0.004) -> float | None:
    """Average number of runnable tasks on the machine besides the one sampling, from
    /proc/loadavg's instantaneous count (None where there is no /proc)."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(0, running - 1))
        time.sleep(interval_s)
    return sum(counts) / len(counts)


def choose_threads(requested: int | str | None = "auto") -> int:
    """Threads for the next piece of work: ``requested`` if an int; with "auto" (default)
    the usable CPUs minus what other processes keep busy right now (at least 1).

    Why: on a shared machine, one thread per core makes every parallel step wait for
    threads that the scheduler has parked behind other processes (measured here at load
    4 on 2 cores: backbone features 1.8x slower with 2 threads than with 1).
    ``SOFTPATCH_THREADS`` or ``OMP_NUM_THREADS`` in the environment fix the count.
    Sampling the load takes ~30 ms, so a count is reused for AUTO_THREADS_TTL_S: a stream
    of small predict calls pays it once in a while, not per call.
    """
    if isinstance(requested, int) and not isinstance(requested, bool):
        return max(1, requested)
    fixed = os.environ.get(THREADS_ENV) or os.environ.get("OMP_NUM_THREADS")
    if fixed:
        try:
            return max(1, int(fixed))
        except ValueError:
            pass
    now = time.monotonic()
    if _auto_threads and now - _auto_threads[0] < AUTO_THREADS_TTL_S:
        return _auto_threads[1]
    cpus = usable_cpus()
    busy = other_runnable()
    threads = cpus if busy is None else max(1, min(cpus, int(cpus - busy + 0.5)))
    _auto_threads[:] = [time.monotonic(), threads]
    return threads


AUTO_THREADS_TTL_S = 2.0
_auto_threads: list = []  # [when, count] of the last "auto" choice


class thread_budget:  # noqa: N801 -- a context manager
    """Within the block torch (and, through the shared OpenMP runtime, the C++ kernels)
    and numpy's BLAS use :func:`choose_threads` threads; the previous settings come back
    after. Where torch is not loaded (the torch-free predictor) the OpenMP runtime is set
    directly. Why numpy's BLAS too: its threads spin while they wait, and on a shared
    machine a 2-thread BLAS call took 256 ms for the 16 maps of a batch that take 0.6 ms
    on one thread (benchmarks/results/scoring_maps_cpu.md)."""

    def __init__(self, requested: int | str | None = "auto"):
        self.requested = requested

    def __enter__(self) -> int:
        self._torch = sys.modules.get("torch")
        self.threads = choose_threads(self.requested)
        if self._torch is not None:
            self._previous = self._torch.get_num_threads()
            if self.threads != self._previous:
                self._torch.set_num_threads(self.threads)
        self._native = _limit_native_threads(self.threads, openmp=self._torch is None)
        return self.threads

    def __exit__(self, *exc) -> bool:
        if self._native is not None:
            self._native.restore_original_limits()
        if self._torch is not None and self._torch.get_num_threads() != self._previous:
            self._torch.set_num_threads(self._previous)
        return False


def _limit_native_threads(threads: int, openmp: bool) -> Any:
    """threadpoolctl's limits on numpy's BLAS (and the OpenMP runtime), None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415
    except ImportError:
        return None
    return threadpool_limits(limits=threads, user_api=None if openmp else "blas")
