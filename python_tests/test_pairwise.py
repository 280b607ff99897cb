"""CPU pairwise_sqdist against the float64 numpy reference, on every compiled
instruction set: single rows, d not a multiple of the vector width or d-chunk,
batched inputs (one batch per thread) and single large problems (split over
bank tiles or over query tiles), duplicates, data far from the origin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softpatch_cuda import _reference as ref
from softpatch_cuda import ops

from builders import SUPPORTED_CPU_ISAS as SUPPORTED, several_isas  # noqa: E402


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def assert_close_to_reference(got, a, b):
    want = ref.pairwise_sqdist(a, b)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.all(got >= 0.0)
    # The expansion's rounding error scales with the (centred) squared norms.
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = (a64**2).sum(-1)[..., :, None] + (b64**2).sum(-1)[..., None, :]
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= 1e-5 * want + 2e-6 * norms + 1e-7), float((err - 1e-5 * want).max())


SHAPES_2D = [(1, 1, 1), (1, 7, 3), (5, 3, 2), (70, 130, 33), (64, 64, 32), (129, 65, 200), (17, 300, 129)]


@pytest.mark.parametrize("n,m,d", SHAPES_2D)
def test_pairwise_2d(rng, isa, n, m, d):
    a, b = randn(rng, n, d), randn(rng, m, d)
    assert_close_to_reference(ops.pairwise_sqdist(a, b), a, b)


@pytest.mark.parametrize(
    "B,n,m,d",
    [
        (1, 1, 1, 1),
        (3, 70, 130, 33),    # fewer batches than 2 x threads: each batch split over threads
        (9, 20, 11, 17),     # many batches: one batch per thread
        (1, 300, 1000, 19),  # many bank tiles: split over bank tiles
        (1, 700, 100, 9),    # one bank tile, many query tiles: shared packed bank
        (2, 1, 600, 5),
    ],
)
def test_pairwise_batched(rng, isa, B, n, m, d):
    a, b = randn(rng, B, n, d), randn(rng, B, m, d)
    got = ops.pairwise_sqdist(a, b)
    assert got.shape == (B, n, m)
    assert_close_to_reference(got, a, b)


def test_pairwise_duplicates_are_exactly_zero(rng, isa):
    a = randn(rng, 70, 45)
    got = ops.pairwise_sqdist(a, a)
    assert np.all(np.diag(got) == 0.0)  # recomputed from differences near 0
    np.testing.assert_allclose(got, got.T, rtol=1e-5)
    b = np.concatenate([a[10:20], a[:5]])
    got = ops.pairwise_sqdist(a, b)
    assert np.all(got[np.arange(10, 20), np.arange(10)] == 0.0)


def test_pairwise_far_from_origin(rng, isa):
    offset = 500.0 * rng.uniform(0.5, 1.0, 32).astype(np.float32)
    a = offset + 0.1 * randn(rng, 40, 32)
    b = offset + 0.1 * randn(rng, 50, 32)
    got = ops.pairwise_sqdist(a, b)
    np.testing.assert_allclose(got, ref.pairwise_sqdist(a, b), rtol=1e-4)


def test_pairwise_two_far_clusters(rng, isa):
    """Distances ~1e-6 of the norms that centring cannot shrink: the values are
    recomputed from differences, so within-cluster distances stay accurate."""
    centre = 100.0 * rng.standard_normal(16).astype(np.float32)
    a = np.concatenate([centre + 1e-3 * randn(rng, 30, 16), -centre + 1e-3 * randn(rng, 30, 16)])
    a = a.astype(np.float32)
    np.testing.assert_allclose(ops.pairwise_sqdist(a, a), ref.pairwise_sqdist(a, a), rtol=1e-5)


def test_pairwise_float16(rng, isa):
    a, b = randn(rng, 2, 30, 20, dtype=np.float16), randn(rng, 2, 40, 20, dtype=np.float16)
    got = ops.pairwise_sqdist(a, b)
    assert got.dtype == np.float32
    assert_close_to_reference(got, a.astype(np.float32), b.astype(np.float32))


@several_isas
def test_pairwise_same_on_every_isa(rng, monkeypatch):
    a, b = randn(rng, 90, 100), randn(rng, 260, 100)
    outs = []
    for name in SUPPORTED:
        monkeypatch.setenv("SOFTPATCH_CPU_ISA", name)
        outs.append(ops.pairwise_sqdist(a, b))
    for got in outs[1:]:
        np.testing.assert_allclose(got, outs[0], rtol=1e-5, atol=1e-4)


def test_pairwise_torch_and_non_contiguous(rng, isa):
    a, b = randn(rng, 3, 40, 12), randn(rng, 3, 12, 25)
    tb = torch.from_numpy(b).transpose(1, 2)  # [3, 25, 12], non-contiguous
    got = ops.pairwise_sqdist(torch.from_numpy(a), tb)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == (3, 40, 25)
    assert_close_to_reference(got.numpy(), a, np.ascontiguousarray(tb.numpy()))
    got_np = ops.pairwise_sqdist(a[:, ::2], np.swapaxes(b, 1, 2))
    assert_close_to_reference(got_np, np.ascontiguousarray(a[:, ::2]), np.ascontiguousarray(np.swapaxes(b, 1, 2)))


def test_pairwise_errors(rng):
    with pytest.raises(ValueError, match="same feature dimension"):
        ops.pairwise_sqdist(randn(rng, 3, 4), randn(rng, 5, 6))
    with pytest.raises(ValueError, match="same batch size"):
        ops.pairwise_sqdist(randn(rng, 2, 3, 4), randn(rng, 3, 5, 4))
    with pytest.raises(ValueError, match="both be 2-D or both be 3-D"):
        ops.pairwise_sqdist(randn(rng, 3, 4), randn(rng, 1, 5, 4))
    with pytest.raises(ValueError, match="argument 'b' must be 2 or 3-dimensional"):
        ops.pairwise_sqdist(randn(rng, 3, 4), randn(rng, 4))
    with pytest.raises(ValueError, match="argument 'a' is empty"):
        ops.pairwise_sqdist(np.zeros((0, 4), np.float32), randn(rng, 5, 4))
    with pytest.raises(TypeError, match="argument 'a' must have dtype float32 or float16, got float64"):
        ops.pairwise_sqdist(randn(rng, 3, 4, dtype=np.float64), randn(rng, 5, 4))
    a = randn(rng, 3, 4)
    a[0, 0] = np.nan
    with pytest.raises(ValueError, match="argument 'a' contains NaN"):
        ops.pairwise_sqdist(a, randn(rng, 5, 4))
    b = randn(rng, 5, 4)
    b[4, 3] = -np.inf
    with pytest.raises(ValueError, match="argument 'b' contains NaN or infinite"):
        ops.pairwise_sqdist(randn(rng, 3, 4), b)
