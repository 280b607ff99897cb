"""Naive numpy implementations of the kernel ops: the executable specification.

Obviously correct and slow (float64 arithmetic, plain loops); used by the tests
and by the benchmarks' "naive" rows. Not used by the models.
"""

from __future__ import annotations

import numpy as np


def pairwise_sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ((a64[..., :, None, :] - b64[..., None, :, :]) ** 2).sum(-1)


def knn(queries: np.ndarray, bank: np.ndarray, k: int, weights: np.ndarray | None = None):
    """Returns (distances [q,k'], indices [q,k'], scores [q] or None); ties -> lower index."""
    d2 = pairwise_sqdist(queries, bank)
    k = min(k, bank.shape[0])
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    dist = np.sqrt(np.take_along_axis(d2, idx, axis=1))
    scores = None if weights is None else dist[:, 0] * np.asarray(weights, np.float64)[idx[:, 0]]
    return dist, idx, scores


def lof(x: np.ndarray, k: int) -> np.ndarray:
    """LOF per group of x [B, n, d] (or [n, d]), the formula of scikit-learn."""
    x = np.asarray(x, np.float64)
    single = x.ndim == 2
    if single:
        x = x[None]
    B, n, _ = x.shape
    k = min(k, n - 1)
    out = np.ones((B, n))
    if n == 1:
        return out[0] if single else out
    for g in range(B):
        dist = np.sqrt(pairwise_sqdist(x[g], x[g]))
        nbr = np.empty((n, k), dtype=np.int64)
        for i in range(n):
            others = [j for j in range(n) if j != i]
            order = sorted(others, key=lambda j: (dist[i, j], j))
            nbr[i] = order[:k]
        ndist = np.take_along_axis(dist, nbr, axis=1)
        kdist = ndist[:, -1]
        reach = np.maximum(ndist, kdist[nbr])
        lrd = 1.0 / (reach.mean(axis=1) + 1e-10)
        out[g] = (lrd[nbr] / lrd[:, None]).mean(axis=1)
    return out[0] if single else out


def _greedy(x: np.ndarray, m: int, first: int, mind: np.ndarray, w: np.ndarray) -> np.ndarray:
    sel = []
    c = first
    for _ in range(m):
        sel.append(c)
        mind = np.minimum(mind, np.sqrt(((x - x[c]) ** 2).sum(1)))
        prio = np.where(w > 0, w * mind, -1.0)
        c = int(np.argmax(prio))  # argmax returns the lowest index among ties
    return np.asarray(sel, dtype=np.int64)


def kcenter_greedy(x: np.ndarray, m: int, start: int = 0, sample_weight: np.ndarray | None = None) -> np.ndarray:
    x = np.asarray(x, np.float64)
    w = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    return _greedy(x, m, start, np.full(len(x), np.inf), w)


def kcenter_greedy_approx(
    x: np.ndarray, m: int, anchors: np.ndarray, sample_weight: np.ndarray | None = None
) -> np.ndarray:
    x = np.asarray(x, np.float64)
    w = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    init = np.sqrt(pairwise_sqdist(x, x[anchors])).mean(axis=1)
    first = int(np.argmax(np.where(w > 0, w * init, -1.0)))
    return _greedy(x, m, first, init, w)
