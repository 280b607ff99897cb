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
"""

from __future__ import annotations

import torch

from . import ops

SEARCHES = ("exact", "pca")
DEFAULT_CANDIDATES = 8


def key_dims(width: int) -> int:
    """Principal dimensions kept for a bank of this width: a third, at least 32."""
    return max(32, width // 3)


class PrincipalSubspaceIndex:
    """Candidates from the bank's principal subspace, exact re-rank."""

    def __init__(self, bank: torch.Tensor, dims: int | None = None, candidates: int = DEFAULT_CANDIDATES):
        if bank.ndim != 2 or bank.shape[0] < 1:
            raise ValueError(f"the search index needs a non-empty [m, D] bank, got {tuple(bank.shape)}")
        m, d = bank.shape
        self.bank = bank
        self.dims = int(min(dims or key_dims(d), d))
        self.candidates = int(min(candidates, m))
        x = bank.double()
        self.mean = x.mean(dim=0)
        centred = x - self.mean
        # principal directions from the D x D scatter matrix (D is a few hundred)
        _, eigvecs = torch.linalg.eigh(centred.T @ centred)
        self.basis = eigvecs[:, -self.dims:].flip(1).to(bank.dtype).contiguous()  # [D, dims]
        self.keys = self._keys(bank)

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean.to(x.dtype)) @ self.basis).contiguous()

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances [q], bank indices [q] int64) of each query's nearest candidate."""
        cand = ops.knn(self._keys(queries), self.keys, self.candidates, check_finite=False).indices
        exact = (queries[:, None, :] - self.bank[cand]).pow(2).sum(2).sqrt()  # [q, c]
        best, where = exact.min(dim=1)
        return best, cand.gather(1, where[:, None])[:, 0]
