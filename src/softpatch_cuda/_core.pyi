"""Type stub of the compiled module (csrc/bindings.cpp). Private: use softpatch_cuda.ops.

CPU entry points take numpy arrays (C-contiguous, exact dtypes; nothing is converted)
and write into caller-allocated outputs. CUDA entry points exist only in builds with
CUDA (``build_info()["cuda_compiled"]``); they take device pointers, sizes and the
caller's stream as integers, check them, and queue the kernels without synchronising.
python_tests/test_interop.py keeps this file in line with the module.
"""

from typing import Any

import numpy as np
from numpy.typing import NDArray

class CudaError(RuntimeError):
    """A failure reported by the CUDA runtime (op name and CUDA message)."""

def build_info() -> dict[str, Any]: ...
def cuda_probe() -> dict[str, Any]: ...
def cuda_device_name(ordinal: int) -> str: ...

# ---------------------------------------------------------------- CPU
def pairwise_sqdist_cpu(a: NDArray[np.float32], b: NDArray[np.float32], out: NDArray[np.float32]) -> None: ...
def knn_cpu(
    queries: NDArray[np.float32],
    bank: NDArray[np.float32],
    k: int,
    weights: NDArray[np.float32] | None,
    out_dist: NDArray[np.float32],
    out_idx: NDArray[np.int64],
    out_score: NDArray[np.float32] | None,
    tile_q: int = 0,
    tile_m: int = 0,
) -> None: ...
def lof_cpu(x: NDArray[np.float32], k: int, out: NDArray[np.float32]) -> None: ...
def kcenter_greedy_cpu(
    x: NDArray[np.float32],
    m: int,
    start: int,
    sample_weight: NDArray[np.float32] | None,
    out_idx: NDArray[np.int64],
) -> int:
    """Returns how many indices were written (fewer than m when the distinct points run out)."""

def kcenter_greedy_approx_cpu(
    x: NDArray[np.float32],
    m: int,
    anchors: NDArray[np.int64],
    sample_weight: NDArray[np.float32] | None,
    out_idx: NDArray[np.int64],
) -> int:
    """Returns how many indices were written (fewer than m when the distinct points run out)."""

# ---------------------------------------------------------------- CUDA (builds with CUDA only)
# Pointers are device addresses (0 for an absent optional buffer); dtype: 0 float32, 1 float16.
def pairwise_sqdist_cuda(
    a: int, b: int, out: int, B: int, n: int, m: int, d: int, dtype: int, allow_tf32: bool, stream: int
) -> None: ...
def knn_cuda_workspace_floats(q: int, m: int, k: int) -> int: ...
def knn_cuda(
    queries: int,
    q: int,
    bank: int,
    m: int,
    d: int,
    k: int,
    weights: int,
    out_dist: int,
    out_idx: int,
    out_score: int,
    dtype: int,
    allow_tf32: bool,
    workspace: int,
    workspace_floats: int,
    stream: int,
) -> None: ...
def lof_cuda_workspace_floats(B: int, n: int, k: int) -> int: ...
def lof_cuda(
    x: int, B: int, n: int, d: int, k: int, out: int, workspace: int, workspace_floats: int, stream: int
) -> None: ...
def kcenter_cuda_workspace_floats(n: int) -> int: ...
def kcenter_greedy_cuda(
    x: int,
    n: int,
    d: int,
    m: int,
    start: int,
    anchors: int,
    n_anchors: int,
    sample_weight: int,
    out_idx: int,
    dtype: int,
    workspace: int,
    workspace_floats: int,
    stream: int,
) -> None:
    """start < 0: approximate variant. Slots after the last centre are set to -1."""
