"""Public kernel ops: validate the inputs, dispatch by where the data lives.

CPU arrays (numpy, torch CPU) run the C++ kernels; CUDA arrays (torch, CuPy) run
the CUDA kernels on the caller's current stream. Results come back in the
caller's framework and on the caller's device.

torch is imported only when a tensor arrives (see :mod:`._interop`), so the ops serve
numpy callers where torch is not installed.

Common rules: float32 inputs everywhere; float16 accepted by ``pairwise_sqdist``,
``knn`` and ``kcenter_greedy`` (on the CPU it is upcast to float32 for the
computation); no other dtype is converted -- a wrong dtype raises TypeError.
NaN/inf inputs raise ValueError. Non-contiguous inputs are copied once to a
contiguous layout.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np

from . import _core
from . import _interop as io
from ._validation import is_int

_HALF_OK = ("float32", "float16")
_CUDA_KNN_MAX_K = 64  # running top-k kept in shared memory (csrc/topk.cuh)


class KnnResult(NamedTuple):
    """Result of :func:`knn`.

    distances: [q, k] float32 Euclidean distances, ascending.
    indices:   [q, k] int64 bank row indices, nearest first (ties -> lower index).
    scores:    [q] float32 ``distances[:, 0] * weights[indices[:, 0]]`` when weights
               were given, else None.
    """

    distances: Any
    indices: Any
    scores: Any


def _require_cuda_build(op: str) -> None:
    if not hasattr(_core, f"{op}_cuda"):
        raise RuntimeError(
            f"{op}: the input is on a CUDA device but softpatch_cuda was built without CUDA "
            "(rebuild where nvcc is available, or move the data to the CPU)"
        )


def _validate(op: str, name: str, x: Any, ndims, dtypes=("float32",), check_finite=True) -> io.Arr:
    a = io.wrap(x, op, name)
    io.check_ndim(a, op, name, ndims)
    io.check_float(a, op, name, dtypes)
    io.check_nonempty(a, op, name)
    if check_finite:
        io.check_finite(a, op, name)
    return a


def _cuda_dtype(op: str, args: list[io.Arr]) -> str:
    kinds = {a.dtype for a in args}
    if len(kinds) != 1:
        raise TypeError(f"{op}: on CUDA all float inputs must share one dtype, got {sorted(kinds)}")
    return kinds.pop()


# ------------------------------------------------------------------ pairwise
def pairwise_sqdist(a: Any, b: Any, *, allow_tf32: bool = False, check_finite: bool = True) -> Any:
    """Squared Euclidean distances between the rows of ``a`` and ``b``.

    Args:
        a: [n, d] or batched [B, n, d], float32 (or float16).
        b: [m, d] or [B, m, d], same dtype family and device as ``a``.
        allow_tf32: on CUDA, let float32 inputs use TF32 tensor cores.

    Returns:
        [n, m] (or [B, n, m]) float32 distances, clamped at 0. On the CPU, values
        that are small next to the squared norms are recomputed from the
        differences, so duplicate rows give exactly 0.

    The CPU kernel picks AVX-512, AVX2+FMA or portable code from the CPU at run
    time; the environment variable ``SOFTPATCH_CPU_ISA=avx512|avx2|scalar``
    forces one (``softpatch_cuda.build_info()["cpu_isas"]`` lists those usable).

    Example:
        >>> import numpy as np
        >>> pairwise_sqdist(np.eye(2, dtype=np.float32), np.zeros((1, 2), np.float32)).tolist()
        [[1.0], [1.0]]
    """
    op = "pairwise_sqdist"
    A = _validate(op, "a", a, (2, 3), _HALF_OK, check_finite)
    Bv = _validate(op, "b", b, (2, 3), _HALF_OK, check_finite)
    io.check_same_device(op, ("a", A), ("b", Bv))
    if A.ndim != Bv.ndim:
        raise ValueError(f"{op}: 'a' and 'b' must both be 2-D or both be 3-D, got shapes {A.shape} and {Bv.shape}")
    batched = A.ndim == 3
    shA = A.shape if batched else (1, *A.shape)
    shB = Bv.shape if batched else (1, *Bv.shape)
    if shA[0] != shB[0]:
        raise ValueError(f"{op}: 'a' and 'b' must have the same batch size, got {shA[0]} and {shB[0]}")
    if shA[2] != shB[2]:
        raise ValueError(f"{op}: 'a' and 'b' must have the same feature dimension, got {shA[2]} and {shB[2]}")
    Bn, n, d = shA
    m = shB[1]
    out_shape = (Bn, n, m) if batched else (n, m)
    out = io.empty_like_framework(A, out_shape, "float32")
    if A.device == "cpu":
        va = io.host_float32(A).reshape(Bn, n, d)
        vb = io.host_float32(Bv).reshape(Bn, m, d)
        _core.pairwise_sqdist_cpu(va, vb, io.out_view(out).reshape(Bn, n, m))
        return out
    _require_cuda_build(op)
    dtype = _cuda_dtype(op, [A, Bv])
    ca, cb = io.device_contiguous(A), io.device_contiguous(Bv)
    with io.device_guard(A):
        _core.pairwise_sqdist_cuda(
            io.device_ptr(ca), io.device_ptr(cb), io.device_ptr(out), Bn, n, m, d,
            io.DTYPE_CODE[dtype], bool(allow_tf32), io.current_stream(A),
        )
    return out


# ------------------------------------------------------------------ knn
def knn(
    queries: Any,
    bank: Any,
    k: int = 1,
    weights: Any = None,
    *,
    allow_tf32: bool = False,
    check_finite: bool = True,
    _tile_q: int = 0,
    _tile_m: int = 0,
) -> KnnResult:
    """k nearest bank rows of every query (Euclidean), optionally soft-weighted.

    The q x m distance matrix is never materialised: the kernels walk query x bank
    tiles keeping a running top-k per query.

    Args:
        queries: [q, d] float32 (or float16).
        bank: [m, d], same dtype and device.
        k: number of neighbours; clamped to m when k > m.
        weights: optional [m] float32 soft weights (SoftPatch), finite and >= 0 (always
            checked: ValueError otherwise); then ``scores = distances[:, 0] * weights[indices[:, 0]]``.
        allow_tf32: on CUDA, allow TF32 tensor-core math for float32 inputs.
        check_finite: set False to skip the NaN/inf scan (e.g. a bank already checked).

    Returns:
        :class:`KnnResult` (distances [q, k'], indices [q, k'] int64, scores [q] or None),
        with k' = min(k, m). On the CPU the returned distances are recomputed from
        the differences (not the norm expansion), so they are accurate even for
        near-duplicates; the instruction set is chosen as in :func:`pairwise_sqdist`.
    """
    op = "knn"
    Q = _validate(op, "queries", queries, (2,), _HALF_OK, check_finite)
    Bk = _validate(op, "bank", bank, (2,), _HALF_OK, check_finite)
    W = None
    if weights is not None:
        W = _validate(op, "weights", weights, (1,), ("float32",), check_finite)
        if W.shape[0] != Bk.shape[0]:
            raise ValueError(f"{op}: 'weights' must have shape [{Bk.shape[0]}] (one per bank row), got {W.shape}")
    io.check_same_device(op, ("queries", Q), ("bank", Bk), ("weights", W))
    if W is not None:
        io.check_weights(W, op, "weights")
    if Q.shape[1] != Bk.shape[1]:
        raise ValueError(
            f"{op}: 'queries' and 'bank' must have the same feature dimension, got {Q.shape[1]} and {Bk.shape[1]}"
        )
    if not is_int(k) or k < 1:
        raise ValueError(f"{op}: 'k' must be a positive integer, got {k!r}")
    q, d = Q.shape
    m = Bk.shape[0]
    k = int(min(k, m))
    dist = io.empty_like_framework(Q, (q, k), "float32")
    idx = io.empty_like_framework(Q, (q, k), "int64")
    score = io.empty_like_framework(Q, (q,), "float32") if W is not None else None
    if Q.device == "cpu":
        _core.knn_cpu(
            io.host_float32(Q), io.host_float32(Bk), k,
            None if W is None else io.host_view(W),
            io.out_view(dist), io.out_view(idx), None if score is None else io.out_view(score),
            int(_tile_q), int(_tile_m),
        )
        return KnnResult(dist, idx, score)
    _require_cuda_build(op)
    if k > _CUDA_KNN_MAX_K:
        raise ValueError(
            f"{op}: k={k} is larger than {_CUDA_KNN_MAX_K}, the most the CUDA kernel keeps per query; "
            "use k <= 64 or move the inputs to the CPU"
        )
    dtype = _cuda_dtype(op, [Q, Bk])
    cq, cb = io.device_contiguous(Q), io.device_contiguous(Bk)
    cw = io.device_contiguous(W) if W is not None else None
    ws = io.empty_like_framework(Q, (int(_core.knn_cuda_workspace_floats(q, m, k)),), "float32")
    with io.device_guard(Q):
        _core.knn_cuda(
            io.device_ptr(cq), q, io.device_ptr(cb), m, d, k, io.device_ptr(cw),
            io.device_ptr(dist), io.device_ptr(idx), io.device_ptr(score),
            io.DTYPE_CODE[dtype], bool(allow_tf32), io.device_ptr(ws), io.numel(ws), io.current_stream(Q),
        )
    return KnnResult(dist, idx, score)


# ------------------------------------------------------------------ lof
def lof(x: Any, k: int = 6, *, check_finite: bool = True) -> Any:
    """Local outlier factor of every sample, independently within each group.

    Args:
        x: [B, n, d] float32 -- B independent groups of n samples (SoftPatch: one
            group per patch position, one sample per training image); [n, d] is
            treated as a single group.
        k: neighbours. Like scikit-learn, k > n - 1 is clamped to n - 1 with a
            warning. A group of one sample gets LOF 1.
        check_finite: NaN/inf raise ValueError. On the CPU the kernel checks while it
            reads the data (always; it costs nothing there); on CUDA set False to skip
            the separate scan.

    Returns:
        [B, n] (or [n]) float32 LOF values, ~1 for inliers and larger for outliers;
        equal to ``-LocalOutlierFactor(n_neighbors=k).fit(x).negative_outlier_factor_``.
    """
    op = "lof"
    # The CPU kernel checks finiteness while it centres each group (no extra pass).
    X = _validate(op, "x", x, (2, 3), ("float32",), check_finite=False)
    n_samples = X.shape[-2]
    if check_finite and (X.device != "cpu" or n_samples == 1):
        io.check_finite(X, op, "x")
    if not is_int(k) or k < 1:
        raise ValueError(f"{op}: 'k' must be a positive integer, got {k!r}")
    batched = X.ndim == 3
    Bn, n, d = X.shape if batched else (1, *X.shape)
    out = io.empty_like_framework(X, (Bn, n) if batched else (n,), "float32")
    if n == 1:
        out[...] = 1.0
        return out
    if k > n - 1:
        warnings.warn(f"{op}: k={k} is >= the number of samples per group ({n}); using k={n - 1}", stacklevel=2)
        k = n - 1
    if X.device == "cpu":
        _core.lof_cpu(io.host_view(X).reshape(Bn, n, d), int(k), io.out_view(out).reshape(Bn, n))
        return out
    _require_cuda_build(op)
    cx = io.device_contiguous(X)
    ws = io.empty_like_framework(X, (max(1, int(_core.lof_cuda_workspace_floats(Bn, n, k))),), "float32")
    with io.device_guard(X):
        _core.lof_cuda(io.device_ptr(cx), Bn, n, d, int(k), io.device_ptr(out), io.device_ptr(ws), io.numel(ws),
                       io.current_stream(X))
    return out


# ------------------------------------------------------------------ k-center
def _check_kcenter_args(op: str, X: io.Arr, m: Any, sample_weight: Any, check_finite: bool):
    n = X.shape[0]
    if not is_int(m) or m < 1:
        raise ValueError(f"{op}: 'm' must be a positive integer, got {m!r}")
    W = None
    n_eligible = n
    if sample_weight is not None:
        W = _validate(op, "sample_weight", sample_weight, (1,), ("float32",), check_finite)
        io.check_same_device(op, ("x", X), ("sample_weight", W))
        if W.shape[0] != n:
            raise ValueError(f"{op}: 'sample_weight' must have shape [{n}], got {W.shape}")
        io.check_weights(W, op, "sample_weight")
        n_eligible = int((W.obj > 0).sum())
    if m > n_eligible:
        raise ValueError(
            f"{op}: cannot select m={m} centres from {n_eligible} eligible points "
            f"({n} points, {n - n_eligible} with weight 0)"
        )
    return W, int(m)


def _weight_at(W: io.Arr | None, i: int) -> float:
    return 1.0 if W is None else float(W.obj[i])


def kcenter_greedy(
    x: Any, m: int, start: int = 0, sample_weight: Any = None, *, half: bool = False, check_finite: bool = True
) -> Any:
    """Exact greedy k-center (farthest-point) coreset: up to ``m`` distinct indices in selection order.

    The first index is ``start``; each next one is the point with the largest
    ``sample_weight * distance to the nearest selected point`` (ties -> lowest
    index). Points with weight 0 are never selected (SoftPatch's denoising).
    Identical to the naive O(n*m*d) loop; the kernels prune work with the
    triangle inequality.

    No point is selected twice, and no two selected points are equal: once every
    remaining point coincides with a selected one (all priorities 0), selection
    stops. So the result has ``min(m, D)`` indices, D = the number of distinct
    rows among the points with weight > 0 -- fewer than ``m`` only when the data
    holds fewer than ``m`` distinct points; then it is the naive loop's first D.

    Args:
        x: [n, d] float32 (float16 accepted; on CUDA it stays half-size).
        m: number of centres, 1 <= m <= number of points with weight > 0 (ValueError otherwise).
        start: index of the first centre.
        sample_weight: optional [n] float32, finite and >= 0.
        half: on CUDA, keep float32 features as float16 internally (faster, L2-resident).

    Returns:
        [min(m, D)] int64 indices (numpy / torch, on the input's device).
    """
    op = "kcenter_greedy"
    X = _validate(op, "x", x, (2,), _HALF_OK, check_finite)
    W, m = _check_kcenter_args(op, X, m, sample_weight, check_finite)
    n, d = X.shape
    if not is_int(start) or not 0 <= start < n:
        raise ValueError(f"{op}: 'start' must be an index in [0, {n}), got {start!r}")
    if _weight_at(W, int(start)) <= 0:
        raise ValueError(f"{op}: 'start'={start} has sample_weight 0 and can never be selected")
    out = io.empty_like_framework(X, (m,), "int64")
    if X.device == "cpu":
        count = _core.kcenter_greedy_cpu(
            io.host_float32(X), m, int(start), None if W is None else io.host_view(W), io.out_view(out)
        )
        return out[:count]
    return _kcenter_cuda(op, X, W, m, int(start), None, half, out)


def kcenter_greedy_approx(
    x: Any, m: int, n_anchors: int = 10, seed: int = 0, sample_weight: Any = None, *,
    half: bool = False, check_finite: bool = True,
) -> Any:
    """PatchCore's approximate greedy coreset (ApproximateGreedyCoresetSampler).

    Every point's initial distance is its mean distance to ``n_anchors`` random
    points (drawn with ``seed``); then the greedy farthest-point loop runs as in
    :func:`kcenter_greedy`, starting from the point with the largest initial
    (weighted) distance.

    Distinct indices of distinct points, as in :func:`kcenter_greedy`: when every
    priority is 0, the next centre is the lowest-index point that coincides with no
    selected one (here a point identical to every anchor can be such a point), and
    selection stops when there is none.

    Returns:
        [min(m, D)] int64 indices in selection order (D: distinct rows of weight > 0).
    """
    op = "kcenter_greedy_approx"
    X = _validate(op, "x", x, (2,), _HALF_OK, check_finite)
    W, m = _check_kcenter_args(op, X, m, sample_weight, check_finite)
    n, d = X.shape
    if not is_int(n_anchors) or n_anchors < 1:
        raise ValueError(f"{op}: 'n_anchors' must be a positive integer, got {n_anchors!r}")
    anchors = np.random.default_rng(seed).choice(n, size=min(int(n_anchors), n), replace=False).astype(np.int64)
    out = io.empty_like_framework(X, (m,), "int64")
    if X.device == "cpu":
        count = _core.kcenter_greedy_approx_cpu(
            io.host_float32(X), m, anchors, None if W is None else io.host_view(W), io.out_view(out)
        )
        return out[:count]
    if X.framework == "torch":
        import torch  # noqa: PLC0415 -- loaded already: X is a tensor

        dev_anchors = torch.from_numpy(anchors).to(X.obj.device)
    else:
        import cupy  # noqa: PLC0415

        dev_anchors = cupy.asarray(anchors)
    return _kcenter_cuda(op, X, W, m, -1, dev_anchors, half, out)


def _kcenter_cuda(op, X, W, m, start, anchors, half, out):
    _require_cuda_build("kcenter_greedy")
    n, d = X.shape
    cx = io.device_contiguous(X)
    if half and X.dtype == "float32":
        cx = cx.half() if X.framework == "torch" else cx.astype("float16")
    dtype = "float16" if (half or X.dtype == "float16") else "float32"
    cw = io.device_contiguous(W) if W is not None else None
    ws = io.empty_like_framework(X, (max(1, int(_core.kcenter_cuda_workspace_floats(n))),), "float32")
    with io.device_guard(X):
        _core.kcenter_greedy_cuda(
            io.device_ptr(cx), n, d, m, start, io.device_ptr(anchors), 0 if anchors is None else len(anchors),
            io.device_ptr(cw), io.device_ptr(out), io.DTYPE_CODE[dtype], io.device_ptr(ws), io.numel(ws),
            io.current_stream(X),
        )
    # Slots after the last centre hold -1 (selection stopped early); counting them
    # waits for the stream.
    return out[: int((out >= 0).sum())]


__all__ = ["KnnResult", "kcenter_greedy", "kcenter_greedy_approx", "knn", "lof", "pairwise_sqdist"]
