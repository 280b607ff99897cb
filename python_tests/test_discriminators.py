"""Noise discriminators, alignment choice, fusion and post-processing vs plain references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import LocalOutlierFactor

from softpatch_cuda import denoise as disc
from softpatch_cuda.denoise import gaussian, graphs


def _features(n=10, h=3, w=4, d=5, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, h, w, d)).astype(np.float32))


def _sk_lof(x: np.ndarray, k: int) -> np.ndarray:
    return -LocalOutlierFactor(n_neighbors=k).fit(x).negative_outlier_factor_


def test_position_lof_matches_sklearn_per_position():
    z = _features()
    got = disc.outlier_scores(z, "lof", "position", k=3).numpy()
    for y in range(3):
        for x in range(4):
            np.testing.assert_allclose(got[:, y, x], _sk_lof(z[:, y, x].numpy(), 3), rtol=1e-4)


def test_lof_from_graph_equals_sklearn_on_the_full_graph():
    x = np.random.default_rng(1).standard_normal((30, 4)).astype(np.float32)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :5]
    dist = np.take_along_axis(d, idx, 1)
    got = graphs.lof_from_graph(torch.from_numpy(dist).float(), torch.from_numpy(idx)).numpy()
    np.testing.assert_allclose(got, _sk_lof(x, 5), rtol=1e-4)


def _brute_neighbours(z: np.ndarray, allowed) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (i, p): sorted distances to the allowed patches (j, q)."""
    n, h, w, d = z.shape
    flat = z.reshape(n * h * w, d)
    out = []
    for a in range(n * h * w):
        i, p = divmod(a, h * w)
        cands = [b for b in range(n * h * w) if allowed(i, p, *divmod(b, h * w))]
        dist = np.sqrt(((flat[cands] - flat[a]) ** 2).sum(1))
        out.append(np.sort(dist))
    return out


def test_window_graph_matches_brute_force():
    z = _features(n=6, h=4, w=5, d=3, seed=2)
    h, w = 4, 5
    k = 4

    def allowed(i, p, j, q):
        (py, px), (qy, qx) = divmod(p, w), divmod(q, w)
        return j != i and abs(py - qy) <= 1 and abs(px - qx) <= 1

    dist, idx = graphs.window_graph(z, k, radius=1)
    ref = _brute_neighbours(z.numpy(), allowed)
    for a in range(dist.shape[0]):
        np.testing.assert_allclose(dist[a].numpy(), ref[a][:k], rtol=1e-5, atol=1e-5)
        i, p = divmod(a, h * w)
        for b in idx[a].tolist():
            assert allowed(i, p, *divmod(b, h * w))


def test_global_graph_excludes_own_image_and_uses_the_pool():
    z = _features(n=9, h=3, w=3, d=4, seed=3)
    p = 9
    dist, idx = graphs.global_graph(z, 5, pool_size=40, seed=0)
    pool = set(graphs.global_pool(9, p, 40, 0, "cpu").tolist())
    images = torch.arange(9 * p) // p
    assert not (idx // p == images[:, None]).any()
    assert set(idx.flatten().tolist()) <= pool
    flat = z.reshape(-1, 4)
    np.testing.assert_allclose(dist, (flat[:, None] - flat[idx]).norm(dim=2), rtol=1e-4, atol=1e-5)
    assert torch.all(dist[:, 1:] >= dist[:, :-1] - 1e-6)


def test_nearest_position_is_distance_to_nearest_other_plus_one():
    z = _features(n=7)
    got = disc.outlier_scores(z, "nearest", "position").numpy()
    zn = z.numpy()
    for i in range(7):
        d = np.sqrt(((zn - zn[i]) ** 2).sum(-1))  # [N, h, w]
        d[i] = np.inf
        np.testing.assert_allclose(got[i], d.min(0) + 1, rtol=1e-4)


def test_gaussian_position_flags_the_planted_outlier():
    z = _features(n=40, h=2, w=2, d=3, seed=4)
    z[7, 1, 0] += 8.0
    got = disc.outlier_scores(z, "gaussian", "position")
    assert got.shape == (40, 2, 2) and torch.all(got >= 1)
    assert int(got[:, 1, 0].argmax()) == 7
    # Mahalanobis with a Ledoit-Wolf covariance: compare with sklearn on a clean position
    from sklearn.covariance import LedoitWolf

    x = z[:, 0, 0].double().numpy()
    diff = x - x.mean(0)
    lw = LedoitWolf().fit(x).covariance_
    ref = np.sqrt(np.einsum("nd,de,ne->n", diff, np.linalg.inv(lw), diff)) + 1
    np.testing.assert_allclose(got[:, 0, 0].numpy(), ref, rtol=1e-4)
    # a fixed intensity: 0.9 * MLE covariance + 0.1 * mean variance * I
    fixed = disc.outlier_scores(z, "gaussian", "position", gaussian_shrinkage=0.1)
    cov = np.cov(x, rowvar=False, bias=True)
    cov = 0.9 * cov + 0.1 * np.trace(cov) / 3 * np.eye(3)
    ref = np.sqrt(np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff)) + 1
    np.testing.assert_allclose(fixed[:, 0, 0].numpy(), ref, rtol=1e-4)
    with pytest.raises(ValueError, match="gaussian_shrinkage"):
        disc.outlier_scores(z, "gaussian", "position", gaussian_shrinkage=1.5)


def test_ledoit_wolf_matches_sklearn_when_n_is_below_d():
    from sklearn.covariance import LedoitWolf

    x = torch.randn(1, 20, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    centred = x - x.mean(dim=1, keepdim=True)
    got = gaussian.covariance(centred, "ledoit_wolf")[0].numpy()
    np.testing.assert_allclose(got, LedoitWolf().fit(x[0].numpy()).covariance_, rtol=1e-6, atol=1e-9)


def test_soft_weights_modes():
    s = torch.tensor([1.0, 1.0, 1.04, 1.0, 0.96, 1.05, 0.95, 1.0, 5.0, 1.02])
    kept = s < 4
    out = disc.soft_weights([s], kept, "outlier")
    assert torch.all(out >= 1) and out[8] > 3 and torch.all(out[:8] == 1)
    med = disc.soft_weights([s], kept, "median")
    np.testing.assert_allclose(float(med[kept].median()), 1.0, rtol=1e-6)
    assert torch.all(disc.soft_weights([s], kept, "clamped") >= 1)
    with pytest.raises(ValueError, match="weight_mode"):
        disc.soft_weights([s], kept, "bogus")


@pytest.mark.parametrize("method", disc.DISCRIMINATORS)
@pytest.mark.parametrize("alignment", ["position", "window", "global"])
def test_every_discriminator_finds_a_planted_outlier(method, alignment):
    z = _features(n=20, h=4, w=4, d=6, seed=5) * 0.3
    z[3, 2, 1] += 5.0
    got = disc.outlier_scores(z, method, alignment, k=4, pool_size=200)
    assert got.shape == (20, 4, 4) and torch.isfinite(got).all()
    assert tuple(np.unravel_index(int(got.argmax()), got.shape)) == (3, 2, 1)


def test_too_few_images_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 7 training images"):
        disc.outlier_scores(_features(n=5), "lof", "position", k=6)
    with pytest.raises(ValueError, match="discriminator must be"):
        disc.outlier_scores(_features(), "iforest", "position")


def test_alignment_statistic_separates_aligned_from_texture():
    rng = np.random.default_rng(0)
    n, h, w, d = 20, 6, 6, 16
    means = rng.standard_normal((1, h, w, d)) * 3.0  # each position its own part
    aligned = torch.from_numpy((means + rng.standard_normal((n, h, w, d)) * 0.5).astype(np.float32))
    texture = torch.from_numpy(rng.standard_normal((n, h, w, d)).astype(np.float32))
    rho_aligned = disc.alignment_statistic(aligned)
    rho_texture = disc.alignment_statistic(texture)
    assert rho_aligned < 0.5 < 0.9 < rho_texture < 1.1
    assert disc.resolve_alignment("auto", aligned)[0] == "position"
    assert disc.resolve_alignment("auto", texture)[0] == "global"
    assert disc.resolve_alignment("window", texture) == ("window", None)
    with pytest.raises(ValueError, match="alignment must be"):
        disc.resolve_alignment("nope", texture)


def test_rank_normalise_and_fuse():
    s = torch.tensor([[[1.0, 5.0]], [[2.0, 4.0]], [[3.0, 3.0]]])  # [N=3, 1, 2]
    per_pos = disc.rank_normalise(s, per_position=True)
    assert per_pos[:, 0, 0].tolist() == [0.0, 0.5, 1.0] and per_pos[:, 0, 1].tolist() == [1.0, 0.5, 0.0]
    overall = disc.rank_normalise(s, per_position=False)
    assert overall.min() == 0 and overall.max() == 1 and float(overall[0, 0, 1]) == 1.0
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])
    assert disc.fuse([a, b], "mean").tolist() == [0.5, 0.5]
    assert disc.fuse([a, b], "max").tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="fusion"):
        disc.fuse([a], "median")
