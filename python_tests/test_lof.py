"""CPU lof kernel vs scikit-learn and the naive float64 reference, on every ISA path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.neighbors import LocalOutlierFactor

from softpatch_cuda import _reference as R
from softpatch_cuda import ops

from builders import SUPPORTED_CPU_ISAS as ISAS, several_isas  # noqa: E402



def _sklearn(x: np.ndarray, k: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.stack([-LocalOutlierFactor(n_neighbors=k).fit(g).negative_outlier_factor_ for g in x])


@pytest.mark.parametrize("seed", range(4))
def test_matches_sklearn_random_shapes(isa, seed):
    rng = np.random.default_rng(seed)
    B = int(rng.integers(1, 4))
    n = int(rng.integers(2, 90))
    d = int(rng.integers(1, 150))  # mostly not a multiple of the SIMD width
    k = int(rng.integers(1, n))
    x = (rng.standard_normal((B, n, d)) * rng.uniform(0.1, 5) + rng.uniform(-20, 20)).astype(np.float32)
    got = ops.lof(x, k)
    assert got.shape == (B, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, _sklearn(x, k), rtol=1e-4)
    np.testing.assert_allclose(got, R.lof(x, k), rtol=1e-5)


def test_soft_patch_shape_and_outliers(isa):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 50, 128)).astype(np.float32)
    x[:, 0] += 6.0  # one clear outlier per group
    got = ops.lof(x, 6)
    np.testing.assert_allclose(got, _sklearn(x, 6), rtol=1e-4)
    assert (got.argmax(axis=1) == 0).all()


def test_large_offset_data_uses_centring(isa):
    # Gram distances on raw data would cancel catastrophically here.
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal((2, 40, 33)) * 1e-2).astype(np.float32)
    np.testing.assert_allclose(ops.lof(x, 5), R.lof(x, 5), rtol=1e-5)


def test_extreme_magnitudes(isa):
    rng = np.random.default_rng(11)
    for scale in (1e20, 1e-20):  # float32 squares overflow / underflow
        x = (rng.standard_normal((2, 30, 6)) * scale).astype(np.float32)
        got = ops.lof(x, 4)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, R.lof(x, 4), rtol=1e-5)


def test_duplicates_finite_and_as_reference(isa):
    rng = np.random.default_rng(3)
    x = np.round(rng.standard_normal((3, 30, 7)) * 2).astype(np.float32)
    x[:, 15:] = x[:, :15]  # every sample has a twin
    x[1, 3:9] = x[1, 2]  # a clump of 7 identical samples (> k + 1)
    got = ops.lof(x, 4)
    assert np.isfinite(got).all()
    # Ties go to the lower index, like the reference (scikit-learn may order ties differently).
    np.testing.assert_allclose(got, R.lof(x, 4), rtol=1e-5)


def test_all_identical_samples_give_one(isa):
    x = np.ones((2, 10, 5), np.float32)
    np.testing.assert_allclose(ops.lof(x, 3), 1.0)


def test_single_sample_group_is_one():
    np.testing.assert_array_equal(ops.lof(np.zeros((3, 1, 4), np.float32), 6), np.ones((3, 1), np.float32))


def test_k_clamped_like_sklearn(isa):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 7, 9)).astype(np.float32)
    with pytest.warns(UserWarning, match="using k=6"):
        got = ops.lof(x, 50)
    np.testing.assert_allclose(got, _sklearn(x, 6), rtol=1e-4)
    n2 = rng.standard_normal((2, 2, 3)).astype(np.float32)  # n = 2: one neighbour each
    with pytest.warns(UserWarning):
        np.testing.assert_allclose(ops.lof(n2, 6), 1.0, rtol=1e-6)


def test_large_k_path(isa):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 80, 20)).astype(np.float32)
    np.testing.assert_allclose(ops.lof(x, 50), _sklearn(x, 50), rtol=1e-4)


@pytest.mark.parametrize("k", [1, 4, 5, 6, 7, 8, 12, 16, 17, 32, 33, 45])
def test_every_selection_size(isa, k):
    """k picks the size of the per-lane insertion network (4, 6, 8, 12, 16, 32) or, above
    32, a selection per row; every size must give the reference's neighbours."""
    rng = np.random.default_rng(50 + k)
    x = rng.standard_normal((2, 70, 19)).astype(np.float32)
    x[:, 5] += 4.0
    np.testing.assert_allclose(ops.lof(x, k), R.lof(x, k), rtol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 8, 16, 17, 48, 96, 97])
def test_group_sizes_around_the_tiles(isa, n):
    """n at and around the vector width, the micro-tile and the 16 / 48 column panels:
    the mirrored half of the distance matrix and its padding must line up."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n, 24)).astype(np.float32)
    k = min(6, n - 1)
    np.testing.assert_allclose(ops.lof(x, k), R.lof(x, k), rtol=1e-5)


def test_feature_dimension_over_one_chunk(isa):
    """d above the Gram engine's d-chunk (128 or 256): dot products accumulate over chunks."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 40, 300)).astype(np.float32)
    np.testing.assert_allclose(ops.lof(x, 5), R.lof(x, 5), rtol=1e-5)
    np.testing.assert_allclose(ops.lof(x, 5), _sklearn(x, 5), rtol=1e-4)


def test_one_large_group_bounded_memory(isa):
    """A group too large for the whole distance matrix (n > ~2000) goes strip by strip."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((1, 2100, 6)).astype(np.float32)
    x[0, :20] *= 4.0
    np.testing.assert_allclose(ops.lof(x, 5), _sklearn(x, 5), rtol=1e-5)


def test_two_dimensional_input_is_one_group():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((25, 6)).astype(np.float32)
    got = ops.lof(x, 3)
    assert got.shape == (25,)
    np.testing.assert_allclose(got, ops.lof(x[None], 3)[0])


def test_non_contiguous_and_torch_inputs():
    rng = np.random.default_rng(7)
    base = rng.standard_normal((20, 3, 40)).astype(np.float32)
    x = base.transpose(1, 0, 2)[:, :, ::2]  # [3, 20, 20], non-contiguous
    assert not x.flags.c_contiguous
    want = R.lof(np.ascontiguousarray(x), 4)
    np.testing.assert_allclose(ops.lof(x, 4), want, rtol=1e-5)
    t = torch.from_numpy(base).permute(1, 0, 2)[:, :, ::2]
    got = ops.lof(t, 4)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


@several_isas
def test_isa_paths_agree():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 70, 45)).astype(np.float32)
    outs = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ISAS:
            mp.setenv("SOFTPATCH_CPU_ISA", name)
            outs.append(ops.lof(x, 6))
    # Exact k-NN and float64 arithmetic: identical on every path.
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_bad_inputs(monkeypatch):
    x = np.zeros((2, 5, 3), np.float32)
    bad = x.copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.lof(bad, 2)
    bad[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.lof(bad, 2)
    # The CPU kernel checks while it reads the data: no separate scan to skip.
    with pytest.raises(ValueError, match="lof: argument 'x' contains NaN or infinite"):
        ops.lof(bad, 2, check_finite=False)
    with pytest.raises(ValueError, match="lof: argument 'x' contains NaN or infinite"):
        ops.lof(torch.from_numpy(bad), 2)
    one = np.zeros((2, 1, 3), np.float32)
    one[1, 0, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.lof(one, 2)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="'k'"):
            ops.lof(x, k)
    with pytest.raises(TypeError, match="float32"):
        ops.lof(x.astype(np.float64), 2)
    with pytest.raises(ValueError, match="dimensional"):
        ops.lof(np.zeros(5, np.float32), 2)
    with pytest.raises(ValueError, match="empty"):
        ops.lof(np.zeros((2, 0, 3), np.float32), 2)
    monkeypatch.setenv("SOFTPATCH_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SOFTPATCH_CPU_ISA"):
        ops.lof(x + np.arange(5, dtype=np.float32)[:, None], 2)
