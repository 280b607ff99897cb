"""Nearest-neighbour search over a memory bank: exact, or principal-subspace candidates
with an exact re-rank (``search="pca"``).

Exact search costs queries x bank x D multiply-adds: for 200 training images at 224 px
(a 15.7k x 384 bank) that is ~9.5 GFLOP per test image, so a 2-core CPU cannot score
more than ~15-20 images/s however good the kernel. The "pca" search finds each query's
``candidates`` nearest bank rows in the bank's top-``dims`` principal subspace (one
k-NN call on dims instead of D values per row: about a third of the work for D = 384,
dims = 128), then computes the exact distances to those candidates and keeps the
nearest. Patch embeddings concentrate in few principal directions, so the true nearest
row is almost always among the candidates; when it is not, the returned distance is that
of a close row (an overestimate). Measured tolerance: see benchmarks/results
(pipeline_*): share of patches whose nearest row differs and the largest relative
score change. The default stays "exact".

Written against the array API (like :mod:`softpatch_cuda.scoring`): the index works on
the bank's numpy arrays (the torch-free predictor) or torch tensors on any device.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from . import ops
from ._interop import to_numpy

SEARCHES = ("exact", "pca")
DEFAULT_CANDIDATES = 8


def key_dims(width: int) -> int:
    """Principal dimensions kept for a bank of this width: a third, at least 32."""
    return max(32, width // 3)


class PrincipalSubspaceIndex:
    """Candidates from the bank's principal subspace, exact re-rank."""

    def __init__(self, bank: Any, dims: int | None = None, candidates: int = DEFAULT_CANDIDATES,
                 basis_rows: int | None = None):
        """``basis_rows``: estimate the principal directions from at most this many rows
        (evenly spaced; None: all rows) -- the directions of a few hundred thousand patches
        are those of a few ten thousand of them, at a fraction of the cost."""
        if bank.ndim != 2 or bank.shape[0] < 1:
            raise ValueError(f"the search index needs a non-empty [m, D] bank, got {tuple(bank.shape)}")
        xp = self.xp = array_api_compat.array_namespace(bank)
        m, d = bank.shape
        self.bank = bank
        self.dims = int(min(dims or key_dims(d), d))
        self.candidates = int(min(candidates, m))
        sample = bank
        if basis_rows is not None and m > basis_rows:
            step = -(-m // basis_rows)
            sample = bank[xp.arange(0, m, step, device=array_api_compat.device(bank))]
        x = xp.astype(sample, xp.float64)
        self.mean = xp.mean(x, axis=0)
        centred = x - self.mean
        # principal directions from the D x D scatter matrix (D is a few hundred), decomposed
        # on the host: torch's multi-threaded eigh took 2.8 s for D = 384 on a loaded 2-core
        # machine (its OpenMP threads wait on each other), numpy's 0.03 s
        _, eigvecs = np.linalg.eigh(to_numpy(centred.T @ centred))
        basis = np.ascontiguousarray(eigvecs[:, ::-1][:, : self.dims])  # [D, dims], largest first
        self.basis = xp.asarray(basis, dtype=bank.dtype, device=array_api_compat.device(bank))
        self.keys = self._keys(bank)

    def _keys(self, x: Any) -> Any:
        # x @ basis - mean @ basis: no centred copy of x (x may be every training patch)
        return x @ self.basis - self.xp.astype(self.mean, x.dtype) @ self.basis

    def nearest_candidates(self, queries: Any) -> Any:
        """[q, candidates] int64: the bank rows nearest to each query in the principal subspace."""
        return ops.knn(self._keys(queries), self.keys, self.candidates, check_finite=False).indices

    def search_candidates(self, queries: Any, count: int = 1) -> tuple[Any, Any]:
        """(exact distances [q, count], bank indices [q, count] int64): each query's ``count``
        nearest candidates, nearest first."""
        xp = self.xp
        cand = self.nearest_candidates(queries)
        exact = xp.sqrt(xp.sum((queries[:, None, :] - self.bank[cand]) ** 2, axis=2))  # [q, c]
        order = xp.argsort(exact, axis=1, stable=True)[:, : min(count, exact.shape[1])]
        return xp.take_along_axis(exact, order, axis=1), xp.take_along_axis(cand, order, axis=1)

    def search(self, queries: Any) -> tuple[Any, Any]:
        """(distances [q], bank indices [q] int64) of each query's nearest candidate."""
        dist, rows = self.search_candidates(queries, 1)
        return dist[:, 0], rows[:, 0]
