"""CPU knn against the float64 numpy reference, on every compiled instruction set.

Shapes hit the kernel's edge cases: single rows, m = 1, k >= m, d not a multiple
of the vector width or the d-chunk, partial query/bank tiles (forced small tiles
and several default tiles), both work splits (many bank tiles -> per-thread
lists merged; few bank tiles -> shared packed bank), exact ties and data far
from the origin (where ||a||^2 + ||b||^2 - 2ab cancels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softpatch_cuda import _reference as ref
from softpatch_cuda import ops

from builders import SUPPORTED_CPU_ISAS as SUPPORTED, several_isas  # noqa: E402


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def assert_knn_equal(got, queries, bank, k, weights=None):
    want_d, want_i, want_s = ref.knn(queries, bank, k, weights)
    k_eff = min(k, bank.shape[0])
    assert got.distances.shape == got.indices.shape == (queries.shape[0], k_eff)
    assert got.distances.dtype == np.float32 and got.indices.dtype == np.int64
    np.testing.assert_array_equal(got.indices, want_i)
    np.testing.assert_allclose(got.distances, want_d, rtol=2e-6, atol=1e-6)
    if weights is None:
        assert got.scores is None
    else:
        assert got.scores.shape == (queries.shape[0],) and got.scores.dtype == np.float32
        np.testing.assert_allclose(got.scores, want_s, rtol=2e-6, atol=1e-6)


SHAPES = [  # q, m, d, k
    (1, 1, 1, 1),
    (1, 5, 3, 10),     # k > m: clamped
    (7, 1, 17, 3),     # m = 1
    (3, 4, 2, 4),      # k == m
    (33, 70, 129, 5),  # d just over a chunk boundary
    (70, 300, 3, 1),
    (65, 97, 257, 7),
    (130, 520, 64, 2),  # several default bank tiles
]


@pytest.mark.parametrize("q,m,d,k", SHAPES)
def test_knn_matches_reference(rng, isa, q, m, d, k):
    queries, bank = randn(rng, q, d), randn(rng, m, d)
    assert_knn_equal(ops.knn(queries, bank, k), queries, bank, k)


@pytest.mark.parametrize("q,m,d,k", [(1, 9, 5, 1), (40, 300, 33, 3), (700, 1200, 20, 4)])
def test_knn_weighted_scores(rng, isa, q, m, d, k):
    queries, bank = randn(rng, q, d), randn(rng, m, d)
    weights = rng.uniform(0.2, 2.0, m).astype(np.float32)
    assert_knn_equal(ops.knn(queries, bank, k, weights), queries, bank, k, weights)


@pytest.mark.parametrize("tile_q,tile_m", [(1, 1), (5, 7), (8, 50), (64, 16)])
@pytest.mark.parametrize("q,m", [(3, 400), (90, 130), (200, 40)])
def test_knn_forced_partial_tiles(rng, isa, tile_q, tile_m, q, m):
    """Tiles smaller than the shapes (rounded up to the micro-tile by the kernel):
    many bank tiles (merged per-thread lists) and many query tiles (shared bank)."""
    d, k = 19, 4
    queries, bank = randn(rng, q, d), randn(rng, m, d)
    weights = rng.uniform(0.5, 1.5, m).astype(np.float32)
    got = ops.knn(queries, bank, k, weights, _tile_q=tile_q, _tile_m=tile_m)
    assert_knn_equal(got, queries, bank, k, weights)


def test_knn_many_default_tiles(rng, isa):
    queries, bank = randn(rng, 600, 48), randn(rng, 2000, 48)
    assert_knn_equal(ops.knn(queries, bank, 3), queries, bank, 3)


def test_knn_duplicate_bank_rows_lowest_index_first(rng, isa):
    base = randn(rng, 40, 21)
    bank = np.concatenate([base, base, base])  # row j, j+40, j+80 identical
    queries = np.concatenate([base[:10], randn(rng, 10, 21)])
    got = ops.knn(queries, bank, 6)
    assert_knn_equal(got, queries, bank, 6)
    np.testing.assert_array_equal(got.indices[:10, :3], np.arange(10)[:, None] + np.array([0, 40, 80]))
    assert np.all(got.distances[:10, :3] == 0.0)  # exact recheck: no cancellation residue


def test_knn_exact_ties_on_a_lattice(rng, isa):
    """Small integer coordinates: many neighbours at exactly the same distance."""
    queries = rng.integers(-2, 3, size=(50, 6)).astype(np.float32)
    bank = rng.integers(-2, 3, size=(300, 6)).astype(np.float32)
    got = ops.knn(queries, bank, 5)
    assert_knn_equal(got, queries, bank, 5)


def test_knn_all_rows_equal(isa):
    bank = np.ones((50, 7), np.float32)
    got = ops.knn(np.zeros((3, 7), np.float32), bank, 60)
    np.testing.assert_array_equal(got.indices, np.tile(np.arange(50), (3, 1)))
    np.testing.assert_allclose(got.distances, np.sqrt(7.0), rtol=1e-6)


def test_knn_far_from_origin_is_accurate(rng, isa):
    """Features with a large common offset: the norm expansion alone would lose
    most digits; centring + the exact recheck keep distances and order exact."""
    offset = 300.0 * rng.uniform(0.5, 1.0, 64).astype(np.float32)
    queries = offset + 0.05 * randn(rng, 60, 64)
    bank = offset + 0.05 * randn(rng, 500, 64)
    assert_knn_equal(ops.knn(queries, bank, 3), queries, bank, 3)


@pytest.mark.parametrize("spread", [1.0, 1e-3])
def test_knn_two_far_clusters(rng, isa, spread):
    """Clusters far from the origin on opposite sides: centring on the mean does
    not shrink the norms. Spread 1: the exact recheck orders the candidates;
    spread 1e-3 (distances ~1e-6 of the norms): the expansion cannot rank at
    all and the kernel falls back to an exact scan."""
    centre = 100.0 * rng.standard_normal(16).astype(np.float32)
    bank = np.concatenate([centre + spread * randn(rng, 150, 16), -centre + spread * randn(rng, 150, 16)])
    queries = np.concatenate([centre + spread * randn(rng, 20, 16), -centre + spread * randn(rng, 20, 16)])
    bank, queries = bank.astype(np.float32), queries.astype(np.float32)
    assert_knn_equal(ops.knn(queries, bank, 4), queries, bank, 4)


def test_knn_float16_inputs(rng, isa):
    queries, bank = randn(rng, 30, 40, dtype=np.float16), randn(rng, 90, 40, dtype=np.float16)
    got = ops.knn(queries, bank, 3)
    assert got.distances.dtype == np.float32
    assert_knn_equal(got, queries.astype(np.float32), bank.astype(np.float32), 3)


@several_isas
def test_knn_same_result_on_every_isa(rng, monkeypatch):
    queries, bank = randn(rng, 100, 77), randn(rng, 700, 77)
    results = {}
    for name in SUPPORTED:
        monkeypatch.setenv("SOFTPATCH_CPU_ISA", name)
        results[name] = ops.knn(queries, bank, 4)
    first = results[SUPPORTED[0]]
    for got in results.values():
        np.testing.assert_array_equal(got.indices, first.indices)
        np.testing.assert_allclose(got.distances, first.distances, rtol=1e-6)


def test_knn_torch_in_torch_out(rng, isa):
    queries, bank = randn(rng, 20, 9), randn(rng, 50, 9)
    weights = rng.uniform(0.5, 1.5, 50).astype(np.float32)
    got = ops.knn(torch.from_numpy(queries), torch.from_numpy(bank), 2, torch.from_numpy(weights))
    assert isinstance(got.distances, torch.Tensor) and got.indices.dtype == torch.int64
    assert isinstance(got.scores, torch.Tensor)
    want = ops.knn(queries, bank, 2, weights)
    np.testing.assert_array_equal(got.indices.numpy(), want.indices)
    np.testing.assert_array_equal(got.distances.numpy(), want.distances)
    np.testing.assert_array_equal(got.scores.numpy(), want.scores)


def test_knn_non_contiguous_inputs(rng, isa):
    big_q, big_b = randn(rng, 40, 30), randn(rng, 33, 120)
    queries = big_q[::2, :25]           # strided rows, partial columns
    bank = big_b[:, ::4].T[:, :25]     # a transposed view: column-major
    assert not queries.flags.c_contiguous and not bank.flags.c_contiguous
    got = ops.knn(queries, bank, 3)
    assert_knn_equal(got, np.ascontiguousarray(queries), np.ascontiguousarray(bank), 3)
    tq = torch.from_numpy(big_b).t()[:, :25]  # non-contiguous torch view [120, 25]
    got_t = ops.knn(tq, torch.from_numpy(np.ascontiguousarray(bank)), 2)
    assert_knn_equal(ops.KnnResult(got_t.distances.numpy(), got_t.indices.numpy(), None),
                     np.ascontiguousarray(tq.numpy()), np.ascontiguousarray(bank), 2)


@pytest.mark.parametrize("name", ["queries", "bank", "weights"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_knn_non_finite_input_is_an_error(rng, name, bad):
    args = {"queries": randn(rng, 5, 4), "bank": randn(rng, 8, 4), "weights": np.ones(8, np.float32)}
    if name == "weights":
        args[name][1] = bad
    else:
        args[name][1, 2] = bad
    with pytest.raises(ValueError, match=f"knn: argument '{name}' contains NaN or infinite"):
        ops.knn(args["queries"], args["bank"], 2, args["weights"])


@pytest.mark.parametrize("check_finite", [True, False])
def test_knn_rejects_negative_and_non_finite_weights(rng, check_finite):
    """Weights are checked whatever check_finite says (one pass over m values)."""
    queries, bank = randn(rng, 5, 4), randn(rng, 8, 4)
    w = np.ones(8, np.float32)
    w[3] = -0.5
    with pytest.raises(ValueError, match="knn: argument 'weights' must be >= 0"):
        ops.knn(queries, bank, 2, w, check_finite=check_finite)
    with pytest.raises(ValueError, match="knn: argument 'weights' must be >= 0"):
        ops.knn(torch.from_numpy(queries), torch.from_numpy(bank), 2, torch.from_numpy(w), check_finite=check_finite)
    for bad in (np.nan, np.inf, -np.inf):
        w[3] = bad
        with pytest.raises(ValueError, match="knn: argument 'weights' contains NaN or infinite"):
            ops.knn(queries, bank, 2, w, check_finite=check_finite)
    w[3] = 0.0  # zero is a valid weight: that neighbour scores 0
    got = ops.knn(bank[3:4], bank, 1, w)
    assert got.indices[0, 0] == 3 and got.scores[0] == 0.0


def test_knn_nan_unchecked_is_memory_safe(isa):
    """check_finite=False with NaN rows: results are unspecified but defined
    (no crash, no out-of-range index)."""
    bank = np.full((6, 3), np.nan, np.float32)
    got = ops.knn(np.zeros((2, 3), np.float32), bank, 2, np.ones(6, np.float32), check_finite=False)
    assert np.all((got.indices == -1) | ((got.indices >= 0) & (got.indices < 6)))


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2"])
def test_knn_bad_k(rng, k):
    with pytest.raises(ValueError, match="'k' must be a positive integer"):
        ops.knn(randn(rng, 3, 4), randn(rng, 5, 4), k)


def test_knn_shape_errors(rng):
    with pytest.raises(ValueError, match="same feature dimension"):
        ops.knn(randn(rng, 3, 4), randn(rng, 5, 6))
    with pytest.raises(ValueError, match="'weights' must have shape"):
        ops.knn(randn(rng, 3, 4), randn(rng, 5, 4), 1, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="'queries' must be 2-dimensional"):
        ops.knn(randn(rng, 4), randn(rng, 5, 4))
    with pytest.raises(ValueError, match="'bank' is empty"):
        ops.knn(randn(rng, 3, 4), np.zeros((0, 4), np.float32))


def test_knn_bad_isa_override(rng, monkeypatch):
    monkeypatch.setenv("SOFTPATCH_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SOFTPATCH_CPU_ISA=sse9"):
        ops.knn(randn(rng, 3, 4), randn(rng, 5, 4))
    for name in ("avx512", "avx2"):
        if name not in SUPPORTED:
            monkeypatch.setenv("SOFTPATCH_CPU_ISA", name)
            with pytest.raises(ValueError, match="not supported"):
                ops.knn(randn(rng, 3, 4), randn(rng, 5, 4))
