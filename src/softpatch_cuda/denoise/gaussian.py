"""The Gaussian discriminator: Mahalanobis distance to a shrunk Gaussian fitted per
position (or per window / over a global pool), + 1 so that inliers score about 1."""

from __future__ import annotations

import torch

from .graphs import global_pool, window_positions


def covariance(centred: torch.Tensor, shrinkage: float | str) -> torch.Tensor:
    """centred [G, n, d] -> shrunk covariances [G, d, d] (target: mean variance x I).

    ``shrinkage="ledoit_wolf"`` (default): the Ledoit-Wolf optimal intensity per group.
    With a few dozen images in d = 128 the sample covariance is near-singular and a
    fixed 10 % shrinkage leaves the Mahalanobis distances dominated by the smallest,
    noisiest eigen-directions; Ledoit-Wolf picks the intensity from the data. A float
    in [0, 1] is a fixed intensity (0.1: the papers' reading).
    """
    g, n, d = centred.shape
    x = centred.double()
    cov = x.transpose(1, 2) @ x / max(n, 1)  # MLE covariance, as Ledoit-Wolf
    mu = cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)  # [G]
    eye = torch.eye(d, device=x.device, dtype=x.dtype)
    if shrinkage == "ledoit_wolf":
        delta2 = (cov - mu[:, None, None] * eye).pow(2).sum((1, 2)) / d
        # sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - n ||S||_F^2
        beta2 = (x.pow(2).sum(-1).pow(2).sum(-1) - n * cov.pow(2).sum((1, 2))) / (n * n * d)
        alpha = (torch.minimum(beta2.clamp_min(0), delta2) / delta2.clamp_min(1e-30)).clamp(0.0, 1.0)
    else:
        alpha = torch.full((g,), float(shrinkage), device=x.device, dtype=x.dtype)
    a = alpha[:, None, None]
    return (1 - a) * cov + a * mu[:, None, None] * eye


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """x [G, n, d], mean [G, d], cov [G, d, d] (already shrunk, positive definite) -> [G, n]."""
    d = x.shape[-1]
    eye = torch.eye(d, device=x.device, dtype=torch.float64)
    avg_var = cov.double().diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None]
    chol = torch.linalg.cholesky(cov.double() + 1e-9 * avg_var * eye)
    centred = (x - mean[:, None]).double().transpose(1, 2)  # [G, d, n]
    sol = torch.linalg.solve_triangular(chol, centred, upper=False)
    return sol.pow(2).sum(dim=1).sqrt().float()


def gaussian_position(flat: torch.Tensor, shrinkage: float | str = "ledoit_wolf", chunk: int = 64) -> torch.Tensor:
    """flat [N, P, d] -> [N, P]: Mahalanobis distance to the position's Gaussian + 1."""
    n, p, d = flat.shape
    groups = flat.permute(1, 0, 2)  # [P, N, d]
    out = torch.empty(p, n, device=flat.device)
    for s in range(0, p, chunk):
        g = groups[s : s + chunk]
        mean = g.mean(dim=1)
        cov = covariance(g - mean[:, None], shrinkage)
        out[s : s + chunk] = mahalanobis(g, mean, cov)
    return out.t() + 1.0


def gaussian_window(z: torch.Tensor, radius: int, shrinkage: float | str = "ledoit_wolf") -> torch.Tensor:
    """Per position, a Gaussian over all images' patches within +-radius positions."""
    n, h, w, d = z.shape
    flat = z.reshape(n, h * w, d)
    out = torch.empty(n, h * w, device=z.device)
    for pos, window in enumerate(window_positions(h, w, radius, z.device)):
        members = flat[:, window].reshape(-1, d)
        mean = members.mean(dim=0)
        cov = covariance((members - mean)[None], shrinkage)
        out[:, pos] = mahalanobis(flat[:, pos][None], mean[None], cov)[0]
    return out + 1.0


def gaussian_global(z: torch.Tensor, pool_size: int, seed: int, shrinkage: float | str = "ledoit_wolf") -> torch.Tensor:
    n, h, w, d = z.shape
    flat = z.reshape(n * h * w, d)
    pool = flat[global_pool(n, h * w, pool_size, seed, z.device)]
    mean = pool.mean(dim=0)
    cov = covariance((pool - mean)[None], shrinkage)
    out = torch.empty(flat.shape[0], device=z.device)
    for s in range(0, flat.shape[0], 65536):
        out[s : s + 65536] = mahalanobis(flat[s : s + 65536][None], mean[None], cov)[0]
    return out.reshape(n, h * w) + 1.0


