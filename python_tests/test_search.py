"""Nearest-neighbour search modes of the memory bank: "exact" is ops.knn; "pca" finds
candidates in the bank's principal subspace and re-ranks them exactly."""

from __future__ import annotations

import numpy as np
import torch

from softpatch_cuda import ops
from softpatch_cuda.memory_bank import MemoryBank
from softpatch_cuda.search import PrincipalSubspaceIndex, key_dims


def _clustered(n: int, d: int, seed: int, rank: int = 24) -> torch.Tensor:
    """Rows concentrated near a low-dimensional subspace, like patch embeddings."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, d))
    x = rng.normal(size=(n, rank)) @ basis + 0.05 * rng.normal(size=(n, d))
    return torch.from_numpy(x.astype(np.float32))


def test_pca_search_finds_the_exact_neighbour_almost_always():
    bank = _clustered(3000, 96, 0)
    queries = _clustered(400, 96, 1)
    ref = ops.knn(queries, bank, 1)
    index = PrincipalSubspaceIndex(bank)
    assert index.dims == key_dims(96) == 32
    dist, idx = index.search(queries)
    same = (idx == ref.indices[:, 0]).float().mean().item()
    assert same >= 0.98
    # never closer than the true nearest row; when the row differs, only slightly farther
    assert torch.all(dist >= ref.distances[:, 0] * (1 - 1e-5))
    assert float(((dist - ref.distances[:, 0]) / ref.distances[:, 0]).max()) < 0.1
    # the distance returned is the exact distance to the row returned
    np.testing.assert_allclose(dist.numpy(), (queries - bank[idx]).norm(dim=1).numpy(), rtol=1e-5)


def test_bank_search_modes_and_weights():
    bank = _clustered(500, 96, 2)
    weights = torch.linspace(1.0, 2.0, 500)
    queries = _clustered(50, 96, 3)
    exact = MemoryBank(bank, weights, torch.zeros(500, dtype=torch.int64))
    pca = MemoryBank(bank, weights, torch.zeros(500, dtype=torch.int64), search="pca")
    s_exact, i_exact = exact.score(queries)
    ref = ops.knn(queries, bank, 1, weights=weights)
    torch.testing.assert_close(s_exact, ref.scores, rtol=0, atol=0)
    s_pca, i_pca = pca.score(queries)
    agree = i_pca == i_exact
    assert agree.float().mean() >= 0.95
    torch.testing.assert_close(s_pca[agree], s_exact[agree], rtol=1e-5, atol=1e-6)
    # a tiny bank is searched exactly whatever the mode
    small = MemoryBank(bank[:20], None, torch.zeros(20, dtype=torch.int64), search="pca")
    torch.testing.assert_close(small.score(queries)[0], ops.knn(queries, bank[:20], 1).distances[:, 0])


def test_pca_search_on_numpy_equals_it_on_torch():
    """The torch-free predictor searches a "pca" bank with the same index, on numpy."""
    bank = _clustered(800, 96, 4)
    queries = _clustered(60, 96, 5)
    dist_t, idx_t = PrincipalSubspaceIndex(bank).search(queries)
    dist_n, idx_n = PrincipalSubspaceIndex(bank.numpy()).search(queries.numpy())
    assert isinstance(dist_n, np.ndarray) and np.array_equal(idx_n, idx_t.numpy())
    np.testing.assert_allclose(dist_n, dist_t.numpy(), rtol=1e-6)
