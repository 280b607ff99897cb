"""CPU k-center kernels vs the naive float64 greedy loop of _reference.py, on every ISA path.

The kernels prune with the triangle inequality but compute every deciding distance
exactly like the reference, so the selected indices must be identical -- not close.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from softpatch_cuda import _reference as R
from softpatch_cuda import ops

from builders import SUPPORTED_CPU_ISAS as ISAS, several_isas  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _harness as H  # noqa: E402



def _anchors(n: int, n_anchors: int, seed: int) -> np.ndarray:
    """The anchors ops.kcenter_greedy_approx draws."""
    return np.random.default_rng(seed).choice(n, size=min(n_anchors, n), replace=False)


def _distinct_greedy(x, m, start=None, anchors=None, sample_weight=None) -> np.ndarray:
    """kcenter.h's "Distinct centres" rule as a naive float64 loop: the naive greedy loop of
    _reference.py, except that when every priority is 0 the next centre is the lowest-index
    eligible point at distance > 0 from every centre, and when there is none selection stops."""
    x = np.asarray(x, np.float64)
    n = len(x)
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if anchors is None:
        mind, c = np.full(n, np.inf), start
    else:
        mind = np.sqrt(R.pairwise_sqdist(x, x[anchors])).mean(axis=1)
        c = int(np.argmax(np.where(w > 0, w * mind, -1.0)))
    cover = np.full(n, np.inf)  # distance to the nearest centre
    sel = []
    while len(sel) < m:
        sel.append(c)
        dist = np.sqrt(((x - x[c]) ** 2).sum(1))
        mind, cover = np.minimum(mind, dist), np.minimum(cover, dist)
        prio = np.where(w > 0, w * mind, -1.0)
        if prio.max() > 0:
            c = int(np.argmax(prio))
            continue
        free = np.flatnonzero((w > 0) & (cover > 0))
        if free.size == 0:
            break
        c = int(free[0])
    return np.asarray(sel, np.int64)


def _n_distinct(x, sample_weight=None) -> int:
    keep = slice(None) if sample_weight is None else sample_weight > 0
    return len(np.unique(x[keep], axis=0))


@pytest.mark.parametrize("seed", range(6))
def test_exact_matches_naive_loop_random_shapes(isa, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    d = int(rng.integers(1, 300))  # d > 128 exercises numpy's split summation
    m = int(rng.integers(1, n + 1))
    start = int(rng.integers(0, n))
    x = (rng.standard_normal((n, d)) * rng.uniform(0.01, 100)).astype(np.float32)
    got = ops.kcenter_greedy(x, m, start=start)
    assert got.dtype == np.int64 and got.shape == (m,)
    np.testing.assert_array_equal(got, R.kcenter_greedy(x, m, start=start))


def test_clustered_data_prunes_and_stays_exact(isa):
    x = H.clustered_patch_features(3000, 48, seed=3)
    np.testing.assert_array_equal(ops.kcenter_greedy(x, 300, start=17), R.kcenter_greedy(x, 300, start=17))


def test_ties_and_duplicates(isa):
    rng = np.random.default_rng(1)
    # Small integers: many exactly equal distances, so the lowest-index rule decides.
    x = rng.integers(-2, 3, size=(120, 5)).astype(np.float32)
    x[60:] = x[:60]
    n_distinct = _n_distinct(x)
    assert n_distinct < 120  # m = 120 runs out of distinct points
    for m in (10, 60, 120):
        got = ops.kcenter_greedy(x, m, start=5)
        # Beyond the distinct points the naive loop would select covered points again;
        # the kernel stops there: its selection is the naive loop's first min(m, D).
        assert len(got) == min(m, n_distinct)
        np.testing.assert_array_equal(got, R.kcenter_greedy(x, m, start=5)[: len(got)])
    grid = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2).astype(np.float32)
    np.testing.assert_array_equal(ops.kcenter_greedy(grid, 36), R.kcenter_greedy(grid, 36))


@pytest.mark.parametrize("seed", range(4))
def test_never_repeats_a_point_when_distinct_points_run_out(isa, seed):
    rng = np.random.default_rng(100 + seed)
    n, d = int(rng.integers(2, 120)), int(rng.integers(1, 9))
    base = rng.integers(-1, 2, size=(int(rng.integers(1, n + 1)), d)).astype(np.float32)
    x = base[rng.integers(0, len(base), n)]  # duplicates everywhere
    w = rng.uniform(0.5, 2.0, n).astype(np.float32)
    w[rng.random(n) < 0.3] = 0.0
    w[int(rng.integers(0, n))] = 1.0
    start = int(np.flatnonzero(w)[0])
    for sw in (None, w):
        eligible = n if sw is None else int((sw > 0).sum())
        n_distinct = _n_distinct(x, sw)
        for m in {1, min(n_distinct, eligible), eligible}:
            for got, want in (
                (ops.kcenter_greedy(x, m, start=start, sample_weight=sw),
                 _distinct_greedy(x, m, start=start, sample_weight=sw)),
                (ops.kcenter_greedy_approx(x, m, seed=seed, sample_weight=sw),
                 _distinct_greedy(x, m, anchors=_anchors(n, 10, seed), sample_weight=sw)),
            ):
                np.testing.assert_array_equal(got, want)
                assert len(got) == min(m, n_distinct)
                assert len(np.unique(x[got], axis=0)) == len(got)  # distinct rows, so distinct indices
                assert sw is None or (sw[got] > 0).all()


def test_approx_selects_the_point_equal_to_every_anchor(isa):
    """Approximate variant: a point identical to every anchor starts at priority 0, like a
    covered one; it is still selected (once) before selection stops."""
    n = 24
    x = np.zeros((n, 3), np.float32)
    x[[3, 11, 17]] = [[5, 0, 0], [0, 4, 0], [0, 0, 3]]  # 3 distinct points, 21 copies of the origin
    seed = next(s for s in range(1000) if not set(_anchors(n, 10, s)) & {3, 11, 17})
    for m in (3, 4, n):
        got = ops.kcenter_greedy_approx(x, m, seed=seed)
        np.testing.assert_array_equal(got, _distinct_greedy(x, m, anchors=_anchors(n, 10, seed)))
        assert list(got) == [3, 11, 17, 0][:m]


def test_identical_points_give_one_centre(isa):
    x = np.full((10, 4), 2.5, np.float32)
    np.testing.assert_array_equal(ops.kcenter_greedy(x, 6, start=4), [4])
    np.testing.assert_array_equal(ops.kcenter_greedy_approx(x, 10), [0])
    w = np.ones(10, np.float32)
    w[:7] = 0
    np.testing.assert_array_equal(ops.kcenter_greedy_approx(x, 3, sample_weight=w), [7])


def test_all_distinct_points_m_equals_n_is_a_permutation(isa):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    got = ops.kcenter_greedy(x, 50, start=7)
    assert sorted(got.tolist()) == list(range(50))
    np.testing.assert_array_equal(got, R.kcenter_greedy(x, 50, start=7))


def test_single_point():
    np.testing.assert_array_equal(ops.kcenter_greedy(np.ones((1, 3), np.float32), 1), [0])


def test_sample_weight(isa):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 20)).astype(np.float32)
    w = rng.uniform(0.2, 2.0, 300).astype(np.float32)
    w[rng.choice(300, 120, replace=False)] = 0.0
    start = int(np.flatnonzero(w)[0])
    got = ops.kcenter_greedy(x, 150, start=start, sample_weight=w)
    np.testing.assert_array_equal(got, R.kcenter_greedy(x, 150, start=start, sample_weight=w))
    assert (w[got] > 0).all()
    # Every selectable point: all of them, never a zero-weight one.
    allsel = ops.kcenter_greedy(x, 180, start=start, sample_weight=w)
    assert set(allsel.tolist()) == set(np.flatnonzero(w).tolist())


def test_approx_matches_reference(isa):
    rng = np.random.default_rng(4)
    for n, d, m, seed in ((500, 37, 60, 0), (9, 4, 9, 3), (5, 2, 2, 1)):
        x = rng.standard_normal((n, d)).astype(np.float32)
        got = ops.kcenter_greedy_approx(x, m, n_anchors=10, seed=seed)
        np.testing.assert_array_equal(got, R.kcenter_greedy_approx(x, m, _anchors(n, 10, seed)))
    x = H.clustered_patch_features(2000, 32, seed=5)
    w = rng.uniform(0, 1, 2000).astype(np.float32)
    w[::3] = 0
    got = ops.kcenter_greedy_approx(x, 200, n_anchors=10, seed=2, sample_weight=w)
    np.testing.assert_array_equal(got, R.kcenter_greedy_approx(x, 200, _anchors(2000, 10, 2), w))
    assert (w[got] > 0).all()


def test_steps_big_enough_for_threads():
    """40k x 128: the first steps scan more than the kernel's parallel threshold, so they
    may run on several threads (the kernel decides from the measured fork/join latency);
    either way the indices are the naive loop's."""
    x = H.clustered_patch_features(40_000, 128, seed=8)
    np.testing.assert_array_equal(ops.kcenter_greedy(x, 40, start=3), R.kcenter_greedy(x, 40, start=3))
    np.testing.assert_array_equal(ops.kcenter_greedy_approx(x, 40, seed=4),
                                  R.kcenter_greedy_approx(x, 40, _anchors(len(x), 10, 4)))


@several_isas
def test_isa_paths_agree():
    x = H.gaussian_features(1500, 130, seed=6)
    outs = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ISAS:
            mp.setenv("SOFTPATCH_CPU_ISA", name)
            outs.append(ops.kcenter_greedy(x, 150, start=1))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_non_contiguous_float16_and_torch_inputs():
    rng = np.random.default_rng(7)
    base = rng.standard_normal((40, 200)).astype(np.float32)
    x = base.T[:, ::3]  # [200, 14], non-contiguous
    want = R.kcenter_greedy(np.ascontiguousarray(x), 30, start=2)
    np.testing.assert_array_equal(ops.kcenter_greedy(x, 30, start=2), want)
    got = ops.kcenter_greedy(torch.from_numpy(base).T[:, ::3], 30, start=2)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), want)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(ops.kcenter_greedy(h, 30, start=2),
                                  R.kcenter_greedy(h.astype(np.float32), 30, start=2))


def test_near_ties_below_half_precision(isa):
    # Points differing by far less than a float16 (and float32) ulp of their coordinates:
    # the filters cannot tell them apart, the exact float64 distances decide.
    rng = np.random.default_rng(10)
    base = (rng.standard_normal((40, 24)) * 100).astype(np.float32)
    x = np.repeat(base, 8, axis=0)
    x += (rng.integers(-3, 4, x.shape) * np.spacing(np.abs(x))).astype(np.float32)
    np.testing.assert_array_equal(ops.kcenter_greedy(x, 200, start=3), R.kcenter_greedy(x, 200, start=3))
    np.testing.assert_array_equal(ops.kcenter_greedy_approx(x, 200, seed=1),
                                  R.kcenter_greedy_approx(x, 200, _anchors(len(x), 10, 1)))


def test_extreme_magnitudes(isa):
    rng = np.random.default_rng(8)
    # float32 squares overflow / underflow here; the pruning must stay conservative.
    for scale in (1e19, 1e-19, 1e36, 1e-40):
        x = (rng.standard_normal((200, 9)) * scale).astype(np.float32)
        np.testing.assert_array_equal(ops.kcenter_greedy(x, 40), R.kcenter_greedy(x, 40))
    mixed = rng.standard_normal((200, 9)).astype(np.float32)
    mixed[::3] *= np.float32(1e25)  # most rows vanish in the scaled half-precision copies
    np.testing.assert_array_equal(ops.kcenter_greedy(mixed, 120), R.kcenter_greedy(mixed, 120))


def test_bad_inputs(monkeypatch):
    x = np.random.default_rng(9).standard_normal((10, 3)).astype(np.float32)
    bad = x.copy()
    bad[4, 1] = np.nan
    for fn in (lambda a: ops.kcenter_greedy(a, 3), lambda a: ops.kcenter_greedy_approx(a, 3)):
        with pytest.raises(ValueError, match="NaN"):
            fn(bad)
    with pytest.raises(ValueError, match="from 10 eligible"):
        ops.kcenter_greedy(x, 11)
    w = np.ones(10, np.float32)
    w[[1, 2, 3]] = 0
    with pytest.raises(ValueError, match="from 7 eligible"):
        ops.kcenter_greedy(x, 8, sample_weight=w)
    with pytest.raises(ValueError, match="sample_weight 0"):
        ops.kcenter_greedy(x, 2, start=2, sample_weight=w)
    for fn in (ops.kcenter_greedy, ops.kcenter_greedy_approx):
        with pytest.raises(ValueError, match="from 0 eligible"):
            fn(x, 1, sample_weight=np.zeros(10, np.float32))
        with pytest.raises(ValueError, match="argument 'sample_weight' must be >= 0"):
            fn(x, 1, sample_weight=-w)
        for bad in (np.nan, np.inf):  # weights are checked even with check_finite=False
            wb = w.copy()
            wb[5] = bad
            with pytest.raises(ValueError, match="argument 'sample_weight' contains NaN or infinite"):
                fn(x, 1, sample_weight=wb, check_finite=False)
        with pytest.raises(ValueError, match="shape"):
            fn(x, 1, sample_weight=np.ones(9, np.float32))
        with pytest.raises(ValueError, match="'m'"):
            fn(x, 0)
        with pytest.raises(TypeError, match="float32"):
            fn(x.astype(np.float64), 2)
    with pytest.raises(ValueError, match="'start'"):
        ops.kcenter_greedy(x, 2, start=10)
    monkeypatch.setenv("SOFTPATCH_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match="SOFTPATCH_CPU_ISA"):
        ops.kcenter_greedy(x, 2)
