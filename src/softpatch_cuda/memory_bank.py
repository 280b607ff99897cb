"""Memory bank: denoised greedy coreset of training patches, soft weights, k-NN scoring.

docs/ALGORITHM.md section 4. Coreset selection runs ``ops.kcenter_greedy_approx`` -- the
PatchCore / SoftPatch reference's approximate start (every point's initial distance
is its mean distance to 10 random points) -- on the 128-d projections; patches the
noise discriminator removed get sample weight 0 and are never selected. The number
of centres is ``ceil(coreset_ratio * kept patches)`` (the reference filters the
outliers out first, then samples its percentage of what is left).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from . import ops
from .search import PrincipalSubspaceIndex

logger = logging.getLogger(__name__)

DISTANCES = ("l2", "squared_l2")
# Image score from the patch scores: "max" (PatchCore / SoftPatch reference code) or
# "reweighted" (PatchCore paper, eq. 7: the largest patch score times
# 1 - softmax of its distances to the matched bank patch's REWEIGHT_NEIGHBOURS
# nearest bank patches, so a match in a sparse region of the bank counts more).
IMAGE_SCORES = ("max", "reweighted")
REWEIGHT_NEIGHBOURS = 9


@dataclass
class MemoryBank:
    """features [m, D]; weights [m] soft weights or None (PatchCore); source_image [m]
    index of the training image each row came from (for leave-own-image-out scoring)."""

    features: torch.Tensor
    weights: torch.Tensor | None
    source_image: torch.Tensor
    distance: str = "l2"
    search: str = "exact"  # see softpatch_cuda.search
    _index: PrincipalSubspaceIndex | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def to(self, device) -> "MemoryBank":
        return MemoryBank(
            self.features.to(device),
            None if self.weights is None else self.weights.to(device),
            self.source_image.to(device),
            self.distance,
            self.search,
        )

    def _nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance [q], index [q]) of each query's nearest bank row (exact or "pca")."""
        if self.search == "pca" and len(self) > 4 * self._candidates():
            if self._index is None:
                self._index = PrincipalSubspaceIndex(self.features)
            return self._index.search(queries)
        res = ops.knn(queries, self.features, 1, check_finite=False)
        return res.distances[:, 0], res.indices[:, 0]

    @staticmethod
    def _candidates() -> int:
        from .search import DEFAULT_CANDIDATES  # noqa: PLC0415

        return DEFAULT_CANDIDATES

    def without_images(self, images: torch.Tensor) -> "MemoryBank":
        """The bank without the rows that came from these training images."""
        keep = ~torch.isin(self.source_image, images.to(self.source_image.device))
        if not bool(keep.any()):
            raise ValueError("cannot score against an empty memory bank (every row excluded)")
        return MemoryBank(self.features[keep], None if self.weights is None else self.weights[keep],
                          self.source_image[keep], self.distance, self.search)

    def score(self, queries: torch.Tensor, exclude_images: torch.Tensor | None = None,
              return_index: bool = False):
        """[q, D] -> [q] patch scores: distance to the nearest bank row, times its weight
        (and, with ``return_index``, that row's index in the bank scored against).

        ``exclude_images``: bank rows from these training images are ignored (used to
        score training images as if unseen, for the threshold calibration).
        """
        if exclude_images is not None:
            return self.without_images(exclude_images).score(queries, return_index=return_index)
        dist, index = self._nearest(queries)
        if self.distance == "squared_l2":
            dist = dist * dist
        scores = dist if self.weights is None else dist * self.weights[index]
        return (scores, index) if return_index else scores

    def image_scores(self, queries: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor,
                     mode: str = "max") -> torch.Tensor:
        """[B, P] patch scores -> [B] image scores (see IMAGE_SCORES).

        queries [B*P, D] are the patches that were scored, nearest [B*P] the bank row each
        matched (from ``score(..., return_index=True)``); only "reweighted" uses them.
        """
        top, where = patch_scores.max(dim=1)
        if mode == "max":
            return top
        b, p = patch_scores.shape
        rows = torch.arange(b, device=patch_scores.device) * p + where
        matched = nearest[rows]  # m* for every image
        k = min(REWEIGHT_NEIGHBOURS, len(self))
        support = ops.knn(self.features[matched], self.features, k, check_finite=False).indices  # includes m*
        dist = (queries[rows][:, None, :] - self.features[support]).norm(dim=2)  # [B, k]
        weight = 1.0 - torch.softmax(dist, dim=1)[:, 0]
        return weight * top


def build_banks(
    embeddings: torch.Tensor,
    projected: torch.Tensor,
    image_index: torch.Tensor,
    kept: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor | None],
    coreset_ratio: float,
    seed: int = 0,
    distance: str = "l2",
    progress: bool = False,
    shard_patches: int | None = None,
    patches_per_image: int = 1,
    search: str = "exact",
) -> dict[str, MemoryBank]:
    """One bank per entry of ``kept`` (same arguments as :func:`build_bank`)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    banks = {}
    for name in tqdm(list(kept), desc="coreset", unit="bank", disable=not progress):
        banks[name], _ = build_bank(embeddings, projected, image_index, kept[name], weights.get(name),
                                    coreset_ratio, seed=seed, distance=distance, shard_patches=shard_patches,
                                    patches_per_image=patches_per_image, search=search)
    return banks


def coreset_size(n_kept: int, ratio: float) -> int:
    return max(1, min(n_kept, int(math.ceil(ratio * n_kept))))


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


def select_coreset(projected: torch.Tensor, kept: torch.Tensor, coreset_ratio: float, seed: int = 0,
                   shard_patches: int | None = None, patches_per_image: int = 1) -> torch.Tensor:
    """Indices of the coreset: greedy k-center (PatchCore's approximate start) over the
    kept rows, ``ceil(coreset_ratio * kept)`` centres.

    With ``shard_patches``, the rows (image-major) are split into shards of whole images
    and each shard gets its own greedy k-center of its share; the bank is their union.
    The cost of a greedy pass grows with centres x points, i.e. with the square of the
    training set; per shard it grows linearly with the number of shards. The union covers
    every kept patch within its shard's greedy radius (each shard's coreset is a
    2-approximation of that shard's optimal k-center).
    """
    total = projected.shape[0]
    chunks = []
    for shard, (a, b) in enumerate(shard_ranges(total, patches_per_image, shard_patches)):
        keep = kept[a:b]
        n_kept = int(keep.sum())
        if n_kept == 0:
            continue
        m = coreset_size(n_kept, coreset_ratio)
        sample_weight = keep.to(torch.float32) if n_kept < (b - a) else None
        idx = ops.kcenter_greedy_approx(projected[a:b], m, n_anchors=10, seed=seed + shard,
                                        sample_weight=sample_weight, check_finite=False)
        chunks.append(torch.as_tensor(idx, device=projected.device) + a)
    return torch.cat(chunks)


def build_bank(
    embeddings: torch.Tensor,
    projected: torch.Tensor,
    image_index: torch.Tensor,
    kept: torch.Tensor | None,
    weights: torch.Tensor | None,
    coreset_ratio: float,
    seed: int = 0,
    distance: str = "l2",
    shard_patches: int | None = None,
    patches_per_image: int = 1,
    search: str = "exact",
) -> tuple[MemoryBank, torch.Tensor]:
    """Select the coreset and assemble the bank.

    Args:
        embeddings: [M, D] full patch embeddings (the bank stores these).
        projected: [M, d] projections the coreset is selected on.
        image_index: [M] training image of each patch.
        kept: [M] bool, False for patches the denoising removed (None: all kept).
        weights: [M] soft weights or None.
        coreset_ratio: fraction of the kept patches to select (>= 1: all kept patches).
        shard_patches, patches_per_image: see :func:`select_coreset`.

    Returns:
        (bank, selected patch indices [m]).
    """
    total = embeddings.shape[0]
    if kept is None:
        kept = torch.ones(total, dtype=torch.bool, device=embeddings.device)
    n_kept = int(kept.sum())
    if n_kept == 0:
        raise ValueError("no training patch is left after denoising; lower the noise threshold")
    if coreset_ratio >= 1.0:
        selected = torch.nonzero(kept).flatten()
    else:
        selected = select_coreset(projected, kept, coreset_ratio, seed, shard_patches, patches_per_image)
    logger.debug("memory bank: %d of %d patches (%d kept after denoising)", selected.numel(), total, n_kept)
    bank = MemoryBank(
        embeddings[selected].contiguous(),
        None if weights is None else weights[selected].contiguous().to(torch.float32),
        image_index[selected].contiguous(),
        distance,
        search,
    )
    return bank, selected
