"""softpatch_cuda: SoftPatch / SoftPatch+ fully unsupervised anomaly detection.

Hot paths (pairwise distances, k-NN with soft weights, LOF, greedy k-center
coreset) are C++ (OpenMP) and CUDA kernels in the compiled module ``_core``;
see :mod:`softpatch_cuda.ops`.
"""

from __future__ import annotations


def _source_tree_message(exc: ImportError) -> str:
    """Why _core is missing: an installed copy shadowed by this source tree, or no build."""
    from importlib import metadata

    here = __path__[0]
    try:
        installed = metadata.distribution("softpatch-cuda").locate_file("softpatch_cuda")
    except metadata.PackageNotFoundError:
        installed = None
    if installed is not None and str(installed) != here:
        return (f"softpatch_cuda is installed in {installed}, but Python imported the source tree {here}, which "
                "has no compiled module (the current folder is probably the repository root): run from another "
                "folder, or install in editable mode (pip install -e .)")
    return (f"softpatch_cuda's compiled module _core could not be imported from {here} ({exc}). "
            "Install the package (pip install .) or build it in place (see README, 'Developer build').")


try:
    from . import _core
except ImportError as exc:  # a source tree without its compiled module
    raise ImportError(_source_tree_message(exc)) from exc
from . import ops
from ._core import CudaError
from ._version import __version__
from .models import Detector, PatchCore, SoftPatch, SoftPatchPlus, load_model
from .results import Prediction, TrainingReport
from .runtime import cuda_available, cuda_unavailable_reason, resolve_device


def build_info() -> dict:
    """What the compiled module was built with: version, CUDA (yes/no, version,
    architectures), compiler, OpenMP -- plus whether CUDA is usable right now."""
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
