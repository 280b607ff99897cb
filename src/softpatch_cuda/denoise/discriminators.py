"""Noise discriminators (docs/ALGORITHM.md sections 3 and 6): per-patch outlier scores.

Input: the projected training patches ``z`` [N, h, w, d] (N images, h x w positions).
Output: scores [N, h, w], about 1 for inliers and larger for outliers.

* ``"lof"``: local outlier factor among the compared patches (k = 6, the papers').
* ``"nearest"``: distance to the nearest compared patch, + 1.
* ``"gaussian"``: Mahalanobis distance to a Gaussian of the compared patches, + 1.

Which patches are compared is the alignment (:mod:`.alignment`). With "position",
LOF runs as one batched ``ops.lof`` call (one group per position); "window" and
"global" use a k-nearest-neighbour graph (:mod:`.graphs`), built once per fit and
shared by the discriminators that use it.

:data:`DISCRIMINATORS` is the one table of them: a new discriminator is a score function
and an entry (its name, the fewest images it needs, whether it uses the neighbour graph,
the memory it holds per shard). torch and the building blocks are imported when scores
are computed, so the table and the settings load without torch (configs, the CLI).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from .._validation import check_choice

logger = logging.getLogger(__name__)


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
        return max(DISCRIMINATORS[m].min_images(self) for m in self.methods)

    def describe(self) -> str:
        """The discriminators, as error messages name them."""
        return f"{list(self.methods)} (lof_k={self.lof_k})"

    def bytes_per_patch(self) -> int:
        """Memory the discriminators hold per training patch of a shard (projection size
        aside): each one's scores, ranks and argsort indices (fusion), and the
        neighbour graph when one of them uses it with a graph alignment."""
        graph = self.alignment in ("auto", "window", "global") and any(
            DISCRIMINATORS[m].neighbour_graph for m in self.methods)
        return len(self.methods) * (4 + 4 + 8 + 8) + (12 * (self.lof_k + 1) if graph else 0)

    def bytes_per_shard(self, proj_dim: int) -> int:
        """Memory the discriminators hold per shard whatever its size."""
        return sum(DISCRIMINATORS[m].shard_bytes(proj_dim) for m in self.methods)


# ------------------------------------------------------------------ the score functions
def _neighbour_graph(z: Any, settings: DiscriminatorSettings, alignment: str, seed: int, cache: dict | None,
                     progress: bool) -> tuple[Any, Any]:
    """(distances, indices) [N*h*w, lof_k] of each patch's nearest patches of other images
    in its comparison set; built once per ``cache`` (LOF and "nearest" share it)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .graphs import global_graph, window_graph  # noqa: PLC0415

    k = settings.lof_k
    key = (alignment, k, settings.window, settings.pool_size, seed)
    graph = cache.get(key) if cache is not None else None
    if graph is None:
        if k > 64 and z.device.type == "cuda":
            raise ValueError(f"lof_k={k} exceeds the 64 neighbours the CUDA k-NN kernel supports")
        n, h, w, _ = z.shape
        total = h * w if alignment == "window" else max(2, min(n, 8))
        with tqdm(total=total, desc=f"neighbours ({alignment})", disable=not progress, leave=False) as bar:
            if alignment == "window":
                graph = window_graph(z, k, settings.window, bar)
            else:
                graph = global_graph(z, k, settings.pool_size, seed, progress_bar=bar)
        if cache is not None:
            cache[key] = graph
    return graph


def lof_scores(z: Any, alignment: str, settings: DiscriminatorSettings, seed: int = 0, cache: dict | None = None,
               progress: bool = False) -> Any:
    from .. import ops  # noqa: PLC0415
    from .graphs import lof_from_graph  # noqa: PLC0415

    n, h, w, d = z.shape
    k = settings.lof_k
    if alignment == "position":
        groups = z.reshape(n, h * w, d).permute(1, 0, 2).contiguous()  # [P, N, d]: one group per position
        return ops.lof(groups, k, check_finite=False).t().reshape(n, h, w)
    dist, idx = _neighbour_graph(z, settings, alignment, seed, cache, progress)
    return lof_from_graph(dist[:, :k], idx[:, :k]).reshape(n, h, w)


def nearest_scores(z: Any, alignment: str, settings: DiscriminatorSettings, seed: int = 0,
                   cache: dict | None = None, progress: bool = False) -> Any:
    import torch  # noqa: PLC0415

    from .. import ops  # noqa: PLC0415

    n, h, w, d = z.shape
    if alignment == "position":  # distance to the nearest other image's patch at this position, + 1
        p = h * w
        groups = z.reshape(n, p, d).permute(1, 0, 2).contiguous()
        out = torch.empty(p, n, device=z.device)
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        for s in range(0, p, 64):
            g = groups[s : s + 64]
            sq = ops.pairwise_sqdist(g, g, check_finite=False).masked_fill(eye, float("inf"))
            out[s : s + 64] = sq.amin(dim=2).clamp_min(0).sqrt()
        return (out.t() + 1.0).reshape(n, h, w)
    dist, _ = _neighbour_graph(z, settings, alignment, seed, cache, progress)
    return (dist[:, 0] + 1.0).reshape(n, h, w)


def gaussian_scores(z: Any, alignment: str, settings: DiscriminatorSettings, seed: int = 0,
                    cache: dict | None = None, progress: bool = False) -> Any:
    from .gaussian import gaussian_global, gaussian_position, gaussian_window  # noqa: PLC0415
    from .spec import check_shrinkage  # noqa: PLC0415

    n, h, w, d = z.shape
    shrinkage = check_shrinkage(settings.gaussian_shrinkage)
    if alignment == "position":
        return gaussian_position(z.reshape(n, h * w, d), shrinkage).reshape(n, h, w)
    if alignment == "window":
        return gaussian_window(z, settings.window, shrinkage).reshape(n, h, w)
    return gaussian_global(z, settings.pool_size, seed, shrinkage).reshape(n, h, w)


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Discriminator:
    """name; ``min_images(settings)``: the fewest training images (per shard) it needs;
    ``score(z, alignment, settings, seed, cache, progress)`` -> [N, h, w]; whether it uses
    the shared neighbour graph (window / global alignment); ``shard_bytes(d)``: memory it
    holds per shard whatever the shard's size (d: the projection size)."""

    name: str
    min_images: Callable[[DiscriminatorSettings], int]
    score: Callable[..., Any]
    neighbour_graph: bool = False
    shard_bytes: Callable[[int], int] = lambda d: 0


DISCRIMINATORS: dict[str, Discriminator] = {d.name: d for d in (
    # LOF needs lof_k neighbours in other images
    Discriminator("lof", lambda s: s.lof_k + 1, lof_scores, neighbour_graph=True),
    Discriminator("nearest", lambda s: 2, nearest_scores, neighbour_graph=True),
    # covariances of one chunk of 64 positions at a time, in float64, and their temporaries
    Discriminator("gaussian", lambda s: 2, gaussian_scores, shard_bytes=lambda d: 64 * d * d * 8 * 6),
)}


def check_discriminator(name: str, what: str = "discriminator") -> str:
    return check_choice(what, name, DISCRIMINATORS)


def min_images(method: str, k: int) -> int:
    """Fewest training images a discriminator needs (LOF: k neighbours in other images)."""
    return DISCRIMINATORS[check_discriminator(method)].min_images(DiscriminatorSettings(methods=(method,), lof_k=k))


def outlier_scores(
    z: Any,
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
) -> Any:
    """Outlier score of every training patch (about 1 for inliers, larger for outliers).

    Args:
        z: [N, h, w, d] float32 projected patch features (any device).
        method: a name in :data:`DISCRIMINATORS`.
        alignment: "position" | "window" | "global" (resolve "auto" first).
        k: LOF neighbours (and the neighbour graph's k).
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
    settings = DiscriminatorSettings(methods=(method,), alignment=alignment, window=window, lof_k=k,
                                     pool_size=pool_size, gaussian_shrinkage=gaussian_shrinkage)
    entry = DISCRIMINATORS[method]
    n = z.shape[0]
    need = entry.min_images(settings)
    if n < need:
        raise ValueError(
            f"the {method!r} discriminator needs at least {need} training images"
            f"{f' (lof_k={k} neighbours in other images)' if method == 'lof' else ''}, got {n}"
        )
    return entry.score(z, alignment, settings, seed, graph_cache, progress)


@dataclass
class PatchScores:
    """The discriminators' output: raw scores per method ([N, h, w], about 1 for
    inliers) and the alignment they compared with (None when too few images)."""

    raw: dict[str, Any]
    alignment: str | None
    alignment_statistic: float | None


def score_patches(z: Any, settings: DiscriminatorSettings, seed: int = 0, progress: bool = False) -> PatchScores:
    """Run every discriminator of ``settings`` on the projected patches ``z`` [N, h, w, d].

    Fewer images than the discriminators need: ValueError when ``settings.required``,
    else empty scores (a warning is logged)."""
    import torch  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .alignment import resolve_alignment  # noqa: PLC0415

    n = z.shape[0]
    need = settings.min_images()
    if n < need:
        message = f"at least {need} training images are needed for the discriminators {settings.describe()}; got {n}"
        if settings.required:
            raise ValueError(message)
        logger.warning("%s: the training report has no scores", message)
        return PatchScores({}, None, None)
    alignment, rho = resolve_alignment(settings.alignment, z, seed)
    cache: dict = {}
    raw: dict[str, Any] = {}
    for method in tqdm(settings.methods, desc=f"denoising ({alignment})", unit="discriminator", disable=not progress):
        raw[method] = outlier_scores(
            z, method, alignment, k=settings.lof_k, window=settings.window, pool_size=settings.pool_size,
            seed=seed, graph_cache=cache, progress=progress, gaussian_shrinkage=settings.gaussian_shrinkage,
        )
        if not torch.isfinite(raw[method]).all():
            raise ValueError(f"the {method!r} discriminator produced non-finite scores (duplicate images?)")
    return PatchScores(raw, alignment, rho)
