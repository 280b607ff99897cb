"""softpatch_cuda: SoftPatch / SoftPatch+ fully unsupervised anomaly detection.

Hot paths (pairwise distances, k-NN with soft weights, LOF, greedy k-center
coreset) are C++ (OpenMP) and CUDA kernels in the compiled module ``_core``;
see :mod:`softpatch_cuda.ops`.
"""

from __future__ import annotations

try:
    from . import _core
except ImportError as exc:  # a checkout that was never built: one line, no chained tracebacks
    from .errors import missing_core

    missing_core(__name__, __path__[0], exc)
from ._core import CudaError
from ._version import __version__

# The torch-based public surface is imported on first use (PEP 562 module __getattr__):
# ``from softpatch_cuda import SoftPatch`` works as before, while the torch-free
# deployment path (softpatch_cuda.deploy: onnxruntime + the compiled k-NN) imports this
# package without pulling in torch.
_LAZY = {
    "ops": (".ops", None),
    "Detector": (".models", "Detector"),
    "PatchCore": (".models", "PatchCore"),
    "SoftPatch": (".models", "SoftPatch"),
    "SoftPatchPlus": (".models", "SoftPatchPlus"),
    "load_model": (".models", "load_model"),
    "Prediction": (".results", "Prediction"),
    "TrainingReport": (".results", "TrainingReport"),
    "cuda_available": (".runtime", "cuda_available"),
    "cuda_unavailable_reason": (".runtime", "cuda_unavailable_reason"),
    "resolve_device": (".runtime", "resolve_device"),
}


def __getattr__(name: str):
    entry = _LAZY.get(name)
    if entry is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(entry[0], __name__)
    value = module if entry[1] is None else getattr(module, entry[1])
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def build_info() -> dict:
    """What the compiled module was built with: version, CUDA (yes/no, version,
    architectures), compiler, OpenMP -- plus whether CUDA is usable right now."""
    from .runtime import cuda_available, cuda_unavailable_reason  # noqa: PLC0415

    info = dict(_core.build_info())
    info["cuda_available"] = cuda_available()
    info["cuda_unavailable_reason"] = cuda_unavailable_reason()
    return info


__all__ = [
    "CudaError",
    "Detector",
    "PatchCore",
    "Prediction",
    "SoftPatch",
    "SoftPatchPlus",
    "TrainingReport",
    "__version__",
    "build_info",
    "cuda_available",
    "cuda_unavailable_reason",
    "load_model",
    "ops",
    "resolve_device",
]
