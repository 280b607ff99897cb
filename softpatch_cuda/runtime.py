"""Run-time capability: is a CUDA device usable by *our* kernels, and which device to use.

Probed lazily and cached: importing softpatch_cuda never touches CUDA. torch may
see a GPU that our CUDA 13 kernels cannot use (older driver), so "auto" asks the
compiled module, not only torch.
"""

from __future__ import annotations

import functools
import os

import torch

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
    if not torch.cuda.is_available():
        return False, "torch cannot use the GPU (CPU-only torch build or driver mismatch)"
    return True, ""


def cuda_available() -> bool:
    """True when the compiled CUDA kernels can run on a visible GPU."""
    return _probe()[0]


def cuda_unavailable_reason() -> str:
    """Why :func:`cuda_available` is False ("" when it is True)."""
    return _probe()[1]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "cuda:N" | torch.device to a torch.device.

    "auto" picks CUDA only when :func:`cuda_available`; an explicit "cuda" on a
    machine without a usable GPU raises a RuntimeError that says why.
    """
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
