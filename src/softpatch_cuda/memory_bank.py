"""Memory banks: the rows a detector scores against, and the one rule of how many rows
a bank keeps and which (docs/ALGORITHM.md section 4).

:class:`MemoryBank` holds the rows (numpy arrays or torch tensors, on any device) and finds
each query's nearest row -- ``ops.knn``, or principal-subspace candidates with an exact
re-rank (``search="pca"``, :mod:`softpatch_cuda.search`); :mod:`softpatch_cuda.scoring`
turns the match into scores.

:class:`CoresetPlan` owns the bank-size rule for the single-process fit, each shard of a
sharded fit, the shards' merge and the memory planner: a bank keeps
``ceil(coreset_ratio * kept patches)`` rows (every kept patch at ratio 1), chosen by
``ops.kcenter_greedy_approx`` -- the PatchCore / SoftPatch reference's approximate start
(every point's initial distance is its mean distance to 10 random points) -- on the
128-d projections; patches the denoising removed get sample weight 0 and are never
chosen (the reference filters the outliers out first, then samples its percentage of
what is left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from array_api_compat import device

from . import ops
from .scoring import DISTANCES, namespace, patch_scores
from .search import DEFAULT_CANDIDATES, PrincipalSubspaceIndex

__all__ = ["DISTANCES", "SUPPORT_CANDIDATES", "CoresetPlan", "MemoryBank", "shard_ranges"]


# Bank rows examined per query when the rows carry leave-out support distances (the row
# minimising max(distance, support) x weight need not be the nearest one).
SUPPORT_CANDIDATES = 8


@dataclass
class MemoryBank:
    """features [m, D]; weights [m] soft weights or None (PatchCore); source_image [m]
    index of the training image each row came from (for leave-own-image-out scoring);
    support [m] each row's leave-out support distance or None: a row vouches for a query
    only as far as other training images vouch for the row (see
    :mod:`softpatch_cuda.denoise.support`). One framework and device for all of them.
    support_rows: during a fit, the rows' supporting images
    (:class:`~softpatch_cuda.denoise.support.BankSupport`), so that leaving images out of
    the bank also takes their vouching away; not stored in model files."""

    features: Any
    weights: Any
    source_image: Any
    distance: str = "l2"
    search: str = "exact"  # see softpatch_cuda.search
    support: Any = None
    support_rows: Any = field(default=None, repr=False, compare=False)
    _index: PrincipalSubspaceIndex | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def candidates(self, queries: Any) -> tuple[Any, Any]:
        """(distances [q, c], rows [q, c]) of the rows examined per query, nearest first: the
        nearest row, or SUPPORT_CANDIDATES rows when the rows carry support distances
        (exact k-NN, or principal-subspace candidates with exact distances for "pca")."""
        count = 1 if self.support is None else min(SUPPORT_CANDIDATES, len(self))
        if self.search == "pca" and len(self) > 4 * DEFAULT_CANDIDATES:
            if self._index is None:
                self._index = PrincipalSubspaceIndex(self.features, candidates=max(count, DEFAULT_CANDIDATES))
            return self._index.search_candidates(queries, count)
        res = ops.knn(queries, self.features, count, check_finite=False)
        return res.distances, res.indices

    def nearest(self, queries: Any) -> tuple[Any, Any]:
        """(distance [q], row [q]) of each query's nearest bank row (exact or "pca")."""
        dist, rows = self.candidates(queries)
        return dist[:, 0], rows[:, 0]

    def score(self, queries: Any) -> tuple[Any, Any]:
        """[q, D] -> ([q] patch scores, [q] the deciding row of each; see scoring.patch_scores).

        With support distances a row's score for a query is weight x max(distance,
        support), and the smallest over the bank decides. The examined rows decide unless
        their best score exceeds what any row beyond them could give (its distance is at
        least the last examined one's, its weight at least the smallest weight); those
        queries -- e.g. the copy of a memorised defect -- are scored against every row, so
        the result is the exact minimum over the bank."""
        dist, rows = self.candidates(queries)
        if self.support is None:
            return patch_scores(dist[:, 0], rows[:, 0], self.weights, self.distance), rows[:, 0]
        xp = namespace(dist)
        scores = patch_scores(xp.maximum(dist, self.support[rows]), rows, self.weights, self.distance)
        where = xp.argmin(scores, axis=1)[:, None]
        best = xp.take_along_axis(scores, where, axis=1)[:, 0]
        row = xp.take_along_axis(rows, where, axis=1)[:, 0]
        if dist.shape[1] < len(self):
            w_min = 1.0 if self.weights is None else float(xp.min(self.weights))
            bound = patch_scores(dist[:, -1], None, None, self.distance) * w_min
            unsure = xp.nonzero(best > bound)[0]
            if unsure.shape[0]:
                best[unsure], row[unsure] = self._exhaustive(queries[unsure])
        return best, row

    def _exhaustive(self, queries: Any, chunk: int = 256) -> tuple[Any, Any]:
        """(score [q], row [q]): min over every row of weight x max(distance, support)."""
        xp = namespace(queries)
        everything = xp.arange(len(self), device=device(self.features))[None, :]
        best, rows = [], []
        for s in range(0, queries.shape[0], chunk):
            sq = ops.pairwise_sqdist(queries[s : s + chunk], self.features, check_finite=False)
            dist = xp.sqrt(xp.clip(sq, 0.0, None))
            scores = patch_scores(xp.maximum(dist, self.support[None, :]), everything, self.weights, self.distance)
            best.append(xp.min(scores, axis=1))
            rows.append(xp.argmin(scores, axis=1))
        return xp.concat(best), xp.concat(rows)

    def without_images(self, images: Any) -> "MemoryBank":
        """The bank as if these training images had not been given: without their rows and,
        while the fit's supporters are known, without their vouching for other rows."""
        xp = namespace(self.source_image)
        images = xp.asarray(images, device=device(self.source_image))
        keep = ~xp.isin(self.source_image, images)
        if not bool(xp.any(keep)):
            raise ValueError("cannot score against an empty memory bank (every row excluded)")
        support = self.support if self.support_rows is None else self.support_rows.distances(images)
        return self.rows(keep, support)

    def rows(self, keep: Any, support: Any = None) -> "MemoryBank":
        """The bank of the rows ``keep`` ([m] bool); ``support``: the [m] support distances to
        take theirs from (default: the bank's own). The rows' supporters come along."""
        support = self.support if support is None else support
        return MemoryBank(self.features[keep], None if self.weights is None else self.weights[keep],
                          self.source_image[keep], self.distance, self.search,
                          None if support is None else support[keep],
                          None if self.support_rows is None else self.support_rows.subset(keep))


def shard_ranges(total: int, patches_per_image: int, shard_patches: int | None) -> list[tuple[int, int]]:
    """Row ranges of whole images, each at most ``shard_patches`` rows (at least one
    image), as even as possible; one range when ``shard_patches`` is None or not exceeded."""
    if shard_patches is None or total <= shard_patches:
        return [(0, total)]
    n_images = total // patches_per_image
    per_shard = max(1, shard_patches // patches_per_image)
    n_shards = -(-n_images // per_shard)
    bounds = [round(i * n_images / n_shards) * patches_per_image for i in range(n_shards + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _size(kept: int, ratio: float) -> int:
    return max(1, min(kept, int(math.ceil(ratio * kept))))


@dataclass(frozen=True)
class CoresetPlan:
    """How many of the kept patches a memory bank keeps, and which.

    ratio: the config's ``coreset_ratio``. shard_patches: the greedy pass runs per group
    of whole images of at most this many patches (``coreset_shard_patches``; its cost
    grows with centres x points, so per group it grows linearly with the training set)
    and the bank is the groups' union. oversample: in a fit of several shards, each shard
    keeps this many times its share, for the merge's second pass.
    """

    ratio: float
    shard_patches: int | None = None
    oversample: float = 1.0

    def size(self, kept: int) -> int:
        """Rows of a bank over ``kept`` patches: ceil(ratio x kept), at least one."""
        return _size(kept, self.ratio)

    def shard_share(self, shards: int) -> float:
        """The share of its kept patches a shard keeps: the ratio itself when it is the only
        shard (its coreset is the bank), else ``oversample`` times it, at most all."""
        return self.ratio if shards == 1 else min(1.0, self.oversample * self.ratio)

    def select(self, projected: Any, kept: Any, seed: int, patches_per_image: int = 1,
               share: float | None = None) -> Any:
        """Indices of the chosen rows of ``projected`` [M, d] (image-major) among the ``kept``
        [M] (bool) ones: every kept row at a share of 1, else a greedy k-center coreset of
        ``ceil(share x kept)`` rows per group of ``shard_patches`` (share: the ratio)."""
        xp = namespace(projected, kept)
        share = self.ratio if share is None else share
        if share >= 1.0:
            return xp.nonzero(kept)[0]
        chunks = []
        for group, (a, b) in enumerate(shard_ranges(projected.shape[0], patches_per_image, self.shard_patches)):
            keep = kept[a:b]
            n_kept = int(xp.count_nonzero(keep))
            if n_kept == 0:
                continue
            sample_weight = xp.astype(keep, xp.float32) if n_kept < (b - a) else None
            idx = ops.kcenter_greedy_approx(projected[a:b], _size(n_kept, share), n_anchors=10, seed=seed + group,
                                            sample_weight=sample_weight, check_finite=False)
            chunks.append(idx + a)
        return xp.concat(chunks)

    def select_in_shard(self, projected: Any, kept: Any, seed: int, patches_per_image: int, shard: int,
                        shards: int) -> Any:
        """:meth:`select` for shard ``shard`` of ``shards``: the single-process fit's coreset
        when it is the only one; else its oversampled share, drawn with a seed of its own."""
        if shards > 1:
            seed = seed + 7919 * (shard + 1)
        return self.select(projected, kept, seed, patches_per_image, self.shard_share(shards))

    def reduce(self, projected: Sequence[Any], kept: Sequence[int], seed: int) -> Any:
        """Row indices (into the parts' concatenation, ascending) of the bank over the union
        of several shards' coresets: greedy k-center per group of consecutive shards of at
        most ``shard_patches`` rows, each group down to ``size`` of the patches its shards kept."""
        xp = namespace(*projected)
        groups: list[list[int]] = [[]]
        rows = 0
        for p, part in enumerate(projected):
            if groups[-1] and self.shard_patches is not None and rows + part.shape[0] > self.shard_patches:
                groups.append([])
                rows = 0
            groups[-1].append(p)
            rows += part.shape[0]
        offsets = [0]
        for part in projected:
            offsets.append(offsets[-1] + int(part.shape[0]))
        device = projected[0].device
        selected = []
        for g, members in enumerate(groups):
            union = xp.concat([projected[p] for p in members]) if len(members) > 1 else projected[members[0]]
            m = self.size(sum(kept[p] for p in members))
            base = offsets[members[0]]
            if m >= union.shape[0]:
                selected.append(xp.arange(union.shape[0], device=device) + base)
                continue
            idx = ops.kcenter_greedy_approx(union, m, n_anchors=10, seed=seed + g, check_finite=False)
            selected.append(xp.sort(idx) + base)
        return xp.concat(selected)
