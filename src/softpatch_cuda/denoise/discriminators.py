"""Noise discriminators (docs/ALGORITHM.md sections 3 and 6): per-patch outlier scores.

Input: the projected training patches ``z`` [N, h, w, d] (N images, h x w positions).
Output: scores [N, h, w], about 1 for inliers and larger for outliers.

* ``"lof"``: local outlier factor among the compared patches (k = 6, the papers').
* ``"nearest"``: distance to the nearest compared patch, + 1.
* ``"gaussian"``: Mahalanobis distance to a Gaussian of the compared patches, + 1.

Which patches are compared is the alignment (:mod:`.alignment`). With "position",
LOF runs as one batched ``ops.lof`` call (one group per position); "window" and
"global" use a k-nearest-neighbour graph (:mod:`.graphs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import ops
from .._validation import check_choice
from .alignment import resolve_alignment
from .gaussian import check_shrinkage, gaussian_global, gaussian_position, gaussian_window
from .graphs import global_graph, lof_from_graph, window_graph

logger = logging.getLogger(__name__)

DISCRIMINATORS: tuple[str, ...] = ("lof", "nearest", "gaussian")


def check_discriminator(name: str, what: str = "discriminator") -> str:
    return check_choice(what, name, DISCRIMINATORS)


def min_images(method: str, k: int) -> int:
    """Fewest training images a discriminator needs (LOF: k neighbours in other images)."""
    return k + 1 if method == "lof" else 2


def outlier_scores(
    z: torch.Tensor,
    method: str = "lof",
    alignment: str = "position",
    *,
    k: int = 6,
    window: int = 1,
    pool_size: int = 4096,
    seed: int = 0,
    graph_cache: dict | None = None,
    progress: bool = False,
    gaussian_shrinkage: float | str = "ledoit_wolf",
) -> torch.Tensor:
    """Outlier score of every training patch (about 1 for inliers, larger for outliers).

    Args:
        z: [N, h, w, d] float32 projected patch features (any device).
        method: "lof" | "nearest" | "gaussian".
        alignment: "position" | "window" | "global" (resolve "auto" first).
        k: LOF neighbours.
        window: radius r of the "window" alignment.
        pool_size: patches drawn for the "global" alignment.
        graph_cache: optional dict reused across calls (SoftPatchPlus) to build the
            k-NN graph once for "lof" and "nearest".
        gaussian_shrinkage: covariance shrinkage of "gaussian": "ledoit_wolf" or a
            fixed intensity in [0, 1] (see :func:`.gaussian.covariance`).

    Returns:
        [N, h, w] float32 scores on z's device.
    """
    check_discriminator(method)
    if alignment not in ("position", "window", "global"):
        raise ValueError(f"alignment must be 'position', 'window' or 'global' here, got {alignment!r}")
    n, h, w, d = z.shape
    need = min_images(method, k)
    if n < need:
        raise ValueError(
            f"the {method!r} discriminator needs at least {need} training images"
            f"{f' (lof_k={k} neighbours in other images)' if method == 'lof' else ''}, got {n}"
        )
    p = h * w
    flat = z.reshape(n, p, d)
    if method == "gaussian":
        check_shrinkage(gaussian_shrinkage)
        if alignment == "position":
            return gaussian_position(flat, gaussian_shrinkage).reshape(n, h, w)
        if alignment == "window":
            return gaussian_window(z, window, gaussian_shrinkage).reshape(n, h, w)
        return gaussian_global(z, pool_size, seed, gaussian_shrinkage).reshape(n, h, w)
    if alignment == "position":
        groups = flat.permute(1, 0, 2).contiguous()  # [P, N, d]: one group per position
        if method == "lof":
            return ops.lof(groups, k, check_finite=False).t().reshape(n, h, w)
        # nearest: distance to the nearest other image's patch at this position, + 1
        out = torch.empty(p, n, device=z.device)
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        for s in range(0, p, 64):
            g = groups[s : s + 64]
            sq = ops.pairwise_sqdist(g, g, check_finite=False).masked_fill(eye, float("inf"))
            out[s : s + 64] = sq.amin(dim=2).clamp_min(0).sqrt()
        return (out.t() + 1.0).reshape(n, h, w)
    # window / global: neighbour graph, shared between lof and nearest
    kk = k if method == "lof" else 1
    key = (alignment, max(kk, k), window, pool_size, seed)
    graph = graph_cache.get(key) if graph_cache is not None else None
    if graph is None:
        kgraph = max(kk, k)
        if kgraph > 64 and z.device.type == "cuda":
            raise ValueError(f"lof_k={kgraph} exceeds the 64 neighbours the CUDA k-NN kernel supports")
        from tqdm.auto import tqdm  # noqa: PLC0415

        total = p if alignment == "window" else max(2, min(n, 8))
        with tqdm(total=total, desc=f"neighbours ({alignment})", disable=not progress, leave=False) as bar:
            if alignment == "window":
                graph = window_graph(z, kgraph, window, bar)
            else:
                graph = global_graph(z, kgraph, pool_size, seed, progress_bar=bar)
        if graph_cache is not None:
            graph_cache[key] = graph
    dist, idx = graph
    if method == "nearest":
        return (dist[:, 0] + 1.0).reshape(n, h, w)
    return lof_from_graph(dist[:, :k], idx[:, :k]).reshape(n, h, w)




@dataclass(frozen=True)
class DiscriminatorSettings:
    """Which discriminators run on the training patches, and how they compare them.

    ``required``: too few images for a discriminator is an error (SoftPatch) or only
    leaves the training report empty (PatchCore runs LOF for the report alone).
    """

    methods: tuple[str, ...] = ("lof",)
    alignment: str = "auto"
    window: int = 1
    lof_k: int = 6
    pool_size: int = 4096
    gaussian_shrinkage: float | str = "ledoit_wolf"
    required: bool = True

    def min_images(self) -> int:
        return max(min_images(m, self.lof_k) for m in self.methods)


@dataclass
class PatchScores:
    """The discriminators' output: raw scores per method ([N, h, w], about 1 for
    inliers) and the alignment they compared with (None when too few images)."""

    raw: dict[str, torch.Tensor]
    alignment: str | None
    alignment_statistic: float | None


def score_patches(z: torch.Tensor, settings: DiscriminatorSettings, seed: int = 0,
                  progress: bool = False) -> PatchScores:
    """Run every discriminator of ``settings`` on the projected patches ``z`` [N, h, w, d].

    Fewer images than the discriminators need: ValueError when ``settings.required``,
    else empty scores (a warning is logged)."""
    n = z.shape[0]
    need = settings.min_images()
    if n < need:
        message = (f"at least {need} training images are needed for the discriminators "
                   f"{list(settings.methods)} (lof_k={settings.lof_k}); got {n}")
        if settings.required:
            raise ValueError(message)
        logger.warning("%s: the training report has no scores", message)
        return PatchScores({}, None, None)
    alignment, rho = resolve_alignment(settings.alignment, z, seed)
    cache: dict = {}
    raw: dict[str, torch.Tensor] = {}
    from tqdm.auto import tqdm  # noqa: PLC0415

    for method in tqdm(settings.methods, desc=f"denoising ({alignment})", unit="discriminator", disable=not progress):
        raw[method] = outlier_scores(
            z, method, alignment, k=settings.lof_k, window=settings.window, pool_size=settings.pool_size,
            seed=seed, graph_cache=cache, progress=progress, gaussian_shrinkage=settings.gaussian_shrinkage,
        )
        if not torch.isfinite(raw[method]).all():
            raise ValueError(f"the {method!r} discriminator produced non-finite scores (duplicate images?)")
    return PatchScores(raw, alignment, rho)
