"""CUDA kernels against the CPU kernels on the same inputs (skipped without a GPU).

Shapes are chosen to hit the kernels' edge cases: single rows, partial 64-row
tiles, d not a multiple of the 32-wide feature slice, k >= m, duplicate rows
(ties -> lower index), float16 inputs and the split-bank / merge path of knn.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from softpatch_cuda import ops  # noqa: E402

pytestmark = pytest.mark.cuda


def dev(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


def host(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------ pairwise
@pytest.mark.parametrize("B,n,m,d", [(1, 1, 1, 1), (1, 5, 3, 2), (3, 70, 130, 33), (2, 64, 64, 32), (1, 129, 65, 200)])
def test_pairwise_float32_exact(rng, B, n, m, d):
    a, b = randn(rng, B, n, d), randn(rng, B, m, d)
    want = ops.pairwise_sqdist(a, b)
    got = host(ops.pairwise_sqdist(dev(a), dev(b)))
    assert got.shape == (B, n, m)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_pairwise_duplicates_are_zero(rng):
    a = randn(rng, 70, 45)
    got = host(ops.pairwise_sqdist(dev(a), dev(a)))
    assert np.all(np.diag(got) == 0.0)  # exact FP32 differences: no cancellation
    got16 = host(ops.pairwise_sqdist(dev(a.astype(np.float16)), dev(a.astype(np.float16))))
    assert np.all(got16 >= 0.0)
    assert np.abs(np.diag(got16)).max() < 1e-2


@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (70, 130, 33), (200, 90, 128)])
def test_pairwise_tf32_and_float16(rng, n, m, d):
    a, b = randn(rng, n, d), randn(rng, m, d)
    want = ops.pairwise_sqdist(a, b)
    scale = float(want.max()) + 1.0
    got_tf32 = host(ops.pairwise_sqdist(dev(a), dev(b), allow_tf32=True))
    np.testing.assert_allclose(got_tf32, want, rtol=0, atol=5e-3 * scale)
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    want16 = ops.pairwise_sqdist(a16.astype(np.float32), b16.astype(np.float32))
    got16 = host(ops.pairwise_sqdist(dev(a16), dev(b16)))
    assert got16.dtype == np.float32
    np.testing.assert_allclose(got16, want16, rtol=0, atol=1e-4 * scale)


# ------------------------------------------------------------------ knn
def _check_knn(queries, bank, k, weights=None, exact_indices=False):
    """CUDA knn equals CPU knn. Summation order differs between the kernels, so
    indices must match exactly only where the CPU's neighbouring distances are
    separated by more than the rounding error (or everywhere, for inputs whose
    only ties are exact duplicates); the returned rows must be at the returned
    distances in every case."""
    want = ops.knn(queries, bank, k, weights)
    got = ops.knn(dev(queries), dev(bank), k, None if weights is None else dev(weights))
    gd, gi = host(got.distances), host(got.indices)
    # Squared distances to the CPU's within float32 rounding of ||q||^2 + ||b||^2
    # (the CPU kernel may use the norm expansion).
    scale = float((queries.astype(np.float64) ** 2).sum(1).max() + (bank.astype(np.float64) ** 2).sum(1).max())
    np.testing.assert_allclose(gd.astype(np.float64) ** 2, want.distances.astype(np.float64) ** 2, rtol=1e-5, atol=1e-5 * scale)
    true = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[gi]) ** 2).sum(-1))
    np.testing.assert_allclose(gd, true, rtol=1e-5, atol=1e-5)
    if exact_indices:
        np.testing.assert_array_equal(gi, want.indices)
    else:
        wd = want.distances.astype(np.float64)
        padded = np.concatenate([np.full((wd.shape[0], 1), -np.inf), wd, np.full((wd.shape[0], 1), np.inf)], 1)
        isolated = (np.diff(padded[:, :-1], axis=1) > 1e-3) & (np.diff(padded[:, 1:], axis=1) > 1e-3)
        np.testing.assert_array_equal(gi[isolated], want.indices[isolated])
        assert isolated.mean() > 0.5  # the check above must cover most entries
    if weights is not None:
        np.testing.assert_allclose(host(got.scores), gd[:, 0] * weights[gi[:, 0]], rtol=1e-6)
        np.testing.assert_allclose(host(got.scores), want.scores, rtol=1e-4, atol=1e-5)
    else:
        assert got.scores is None


@pytest.mark.parametrize(
    "q,m,d,k",
    [
        (1, 1, 1, 1),        # smallest
        (5, 3, 4, 7),        # k > m: clamped to m
        (70, 130, 33, 1),    # partial tiles, d not a multiple of 32
        (64, 64, 32, 5),
        (130, 300, 50, 64),  # largest k kept in shared memory
        (1, 5000, 20, 3),    # one query: the bank is split over blocks, then merged
        (3, 4000, 7, 1),     # split path, k = 1
        (9000, 70, 6, 2),    # many query tiles: no split
    ],
)
def test_knn_float32_exact_matches_cpu(rng, q, m, d, k):
    _check_knn(randn(rng, q, d), randn(rng, m, d), k, rng.random(m).astype(np.float32))


def test_knn_ties_take_lower_index(rng):
    base = randn(rng, 40, 24)
    bank = np.concatenate([base, base, base[:10]])  # every row duplicated
    queries = np.concatenate([base[::3], randn(rng, 30, 24)])
    for k in (1, 4):
        _check_knn(queries, bank, k, exact_indices=True)
    # Split path with duplicates across splits.
    big = np.repeat(randn(rng, 50, 8), 60, axis=0)
    _check_knn(big[::500].copy(), big, 3, exact_indices=True)
    got = ops.knn(dev(queries), dev(bank), 2)
    i = host(got.indices)
    same = host(got.distances)[:, 0] == host(got.distances)[:, 1]
    assert same.any() and np.all(i[same, 0] < i[same, 1])


def test_knn_float16_and_tf32_close_to_cpu(rng):
    q, m, d = 300, 1000, 64
    queries, bank = randn(rng, q, d), randn(rng, m, d)
    for kw, qq, bb in (
        ({"allow_tf32": True}, queries, bank),
        ({}, queries.astype(np.float16), bank.astype(np.float16)),
    ):
        qf, bf = qq.astype(np.float32), bb.astype(np.float32)
        want = ops.knn(qf, bf, 5)
        got = ops.knn(dev(qq), dev(bb), 5, **kw)
        gd, gi = host(got.distances), host(got.indices)
        np.testing.assert_allclose(gd, want.distances, rtol=0, atol=2e-2)
        # The returned neighbours really are that close (ties may reorder near-equal ones).
        true = np.sqrt(((qf[:, None, :] - bf[gi]) ** 2).sum(-1))
        np.testing.assert_allclose(gd, true, rtol=0, atol=2e-2)
        assert np.all(np.diff(gd, axis=1) >= 0)


def test_knn_k_above_64_is_a_clear_error(rng):
    with pytest.raises(ValueError, match="k=65"):
        ops.knn(dev(randn(rng, 4, 3)), dev(randn(rng, 100, 3)), 65)


# ------------------------------------------------------------------ lof
@pytest.mark.parametrize("B,n,d,k", [(1, 2, 3, 1), (5, 40, 16, 6), (3, 130, 33, 10), (2, 100, 8, 70), (7, 65, 128, 6)])
def test_lof_matches_cpu(rng, B, n, d, k):
    x = randn(rng, B, n, d)
    want = ops.lof(x, k)
    got = host(ops.lof(dev(x), k))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_lof_duplicates_stay_finite(rng):
    x = randn(rng, 2, 30, 5)
    x[:, 10:20] = x[:, :10]  # every sample of the first 10 duplicated
    x[1, 25:] = x[1, 24]     # a cluster of identical samples
    want = ops.lof(x, 4)
    got = host(ops.lof(dev(x), 4))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ k-center
@pytest.mark.parametrize("n,d,m,start", [(1, 3, 1, 0), (10, 2, 10, 3), (2000, 32, 150, 7), (3001, 7, 200, 0), (5000, 128, 64, 4999)])
def test_kcenter_exact_same_indices(rng, n, d, m, start):
    x = randn(rng, n, d)
    want = ops.kcenter_greedy(x, m, start)
    got = host(ops.kcenter_greedy(dev(x), m, start))
    np.testing.assert_array_equal(got, want)


def test_kcenter_weights_and_duplicates(rng):
    x = np.repeat(randn(rng, 300, 16), 3, axis=0)  # triplicates: ties -> lowest index
    w = rng.random(900).astype(np.float32)
    w[::4] = 0.0
    want = ops.kcenter_greedy(x, 250, 1, w)
    got = host(ops.kcenter_greedy(dev(x), 250, 1, dev(w)))
    np.testing.assert_array_equal(got, want)
    assert np.all(w[got] > 0)


@pytest.mark.parametrize("d", [16, 13])  # vectorised and scalar loads
def test_kcenter_float16_same_as_cpu_on_upcast(rng, d):
    x16 = randn(rng, 1500, d).astype(np.float16)
    want = ops.kcenter_greedy(x16.astype(np.float32), 120, 2)
    got = host(ops.kcenter_greedy(dev(x16), 120, 2))
    np.testing.assert_array_equal(got, want)
    # half=True converts float32 input on the device.
    got_h = host(ops.kcenter_greedy(dev(x16.astype(np.float32)), 120, 2, half=True))
    np.testing.assert_array_equal(got_h, want)


@pytest.mark.parametrize("n,d,m,n_anchors", [(1, 4, 1, 10), (2500, 24, 100, 10), (999, 5, 50, 3)])
def test_kcenter_approx_same_indices(rng, n, d, m, n_anchors):
    x = randn(rng, n, d)
    w = rng.random(n).astype(np.float32) + 0.5
    want = ops.kcenter_greedy_approx(x, m, n_anchors, seed=3, sample_weight=w)
    got = host(ops.kcenter_greedy_approx(dev(x), m, n_anchors, seed=3, sample_weight=dev(w)))
    np.testing.assert_array_equal(got, want)


def test_kcenter_stops_where_the_cpu_stops(rng):
    """Fewer distinct points than m: CUDA returns the same shorter selection as the CPU
    (no repeated index), for both variants, including a point equal to every anchor."""
    x = np.repeat(rng.integers(-2, 3, size=(40, 6)).astype(np.float32), 5, axis=0)
    w = rng.random(200).astype(np.float32) + 0.5
    w[::7] = 0.0
    for sw in (None, w):
        want = ops.kcenter_greedy(x, 200 if sw is None else int((w > 0).sum()), 1, sw)
        got = host(ops.kcenter_greedy(dev(x), len(x) if sw is None else int((w > 0).sum()), 1,
                                      None if sw is None else dev(sw)))
        np.testing.assert_array_equal(got, want)
        assert len(np.unique(got)) == len(got) < 200
        want = ops.kcenter_greedy_approx(x, 150, seed=2, sample_weight=sw)
        got = host(ops.kcenter_greedy_approx(dev(x), 150, seed=2, sample_weight=None if sw is None else dev(sw)))
        np.testing.assert_array_equal(got, want)
    z = np.zeros((24, 3), np.float32)
    z[[3, 11, 17]] = [[5, 0, 0], [0, 4, 0], [0, 0, 3]]
    seed = next(s for s in range(1000)
                if not set(np.random.default_rng(s).choice(24, 10, replace=False)) & {3, 11, 17})
    np.testing.assert_array_equal(host(ops.kcenter_greedy_approx(dev(z), 24, seed=seed)), [3, 11, 17, 0])


def test_knn_negative_weights_rejected_on_device(rng):
    w = np.ones(8, np.float32)
    w[2] = -1.0
    with pytest.raises(ValueError, match="knn: argument 'weights' must be >= 0"):
        ops.knn(dev(randn(rng, 4, 3)), dev(randn(rng, 8, 3)), 1, dev(w), check_finite=False)


def test_bad_dtype_code_is_rejected_before_launch(rng):
    from softpatch_cuda import _core

    a = dev(randn(rng, 4, 3))
    out = torch.empty((4, 4), device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="dtype"):
        _core.pairwise_sqdist_cuda(a.data_ptr(), a.data_ptr(), out.data_ptr(), 1, 4, 4, 3, 7, False, stream)
