"""Leave-out support of memory-bank patches: image-level evidence of contamination.

Why. A defective image in the training set puts its defect patches into the memory bank,
and the same defect at test time then finds an (exact) match: PatchCore's failure under
contamination, worst when the defect recurs on the line (the "overlap" protocol). The
position-wise discriminators miss thin cracks and faint spots: such a patch is no more
outlying at its position than normal variation is.

What. Every bank row m (a patch of training image i) gets a *support distance* a(m): the
distance from m to the nearest patch of the k-th other training image that vouches for it
(k = ``support_images``; images flagged as contaminated do not vouch). A bank row vouches
for a test patch q only as far as other images vouch for the row itself:

    patch score(q) = min over bank rows m of  w(m) * max(||q - m||, a(m))

-- LOF's reachability distance, with the leave-one-image-out distance in place of the
k-distance. A patch seen in fewer than k training images scores as if its image had been
left out of the training set, so a memorised defect no longer hides its twin; a normal
patch is shared by many images, its a(m) lies below a test patch's own nearest-neighbour
distance, and clean data scores as before. Nothing has to be decided about which images
are defective for this to work.

Image evidence. An image's leave-out score is the largest support distance among its bank
rows (the greedy coreset keeps every image's most outlying patches): PatchCore's score of
the image against a bank built from the other images. It sees what the position-wise
discriminators miss (a thin crack is no more outlying at its position than normal
variation, but has no neighbour in any other image), and misses what they see (a defect
repeated in several planted images). The two are fused as robust z-scores
(:func:`combined_evidence`); images whose evidence stands out (:func:`split_limit`) are
flagged; flagged images stop vouching for others, so that a
defect recurring in several planted images loses its support too, and the flags are
recomputed until they settle (at most ``MAX_ROUNDS``).

Cost. One k-NN of the bank rows against every training patch in a ``SUBSPACE_DIMS``-d
principal subspace (``CANDIDATES`` candidates per row), an exact re-rank in the full
dimension, and exact distances for the rows whose candidates hold too few other images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import ops

CANDIDATES = 64  # nearest training patches examined per bank row (the CUDA k-NN keeps at most 64)
SUBSPACE_DIMS = 48  # principal dimensions the candidates are searched in (exact re-rank after)
BASIS_ROWS = 32768  # patches the principal directions are estimated from
RERANK_ROWS = 1024  # bank rows re-ranked per chunk (bounds the [rows, CANDIDATES, D] gather)
EXACT_ROWS = 64  # rows per chunk of the exact fallback ([rows, all patches] distances)
MAX_ROUNDS = 4  # flag / re-support rounds
SPLIT_FACTOR = 4.0  # flagged above median + 4 sigma of the lower half of the evidence
# Floor of that sigma relative to the median: images that all score alike are not flagged.
SPLIT_SCALE_FLOOR = 0.02


@dataclass
class SupportCandidates:
    """For every bank row: its nearest training patches (exact distances, ascending) and
    their images, plus what the exact fallback needs. Held during a fit only."""

    distances: torch.Tensor  # [m, C] float32, ascending
    images: torch.Tensor  # [m, C] int64, training image of each candidate patch
    first: torch.Tensor  # [m, C] bool, the candidate is its image's nearest in this row
    rows: torch.Tensor  # [m, D] the bank rows
    row_images: torch.Tensor  # [m] int64
    patches: torch.Tensor  # [M, D] every training patch the rows may be supported by
    patch_images: torch.Tensor  # [M] int64
    n_images: int

    @property
    def present(self) -> torch.Tensor:
        """[n_images] bool: the images that have patches here (ids may skip some)."""
        out = torch.zeros(self.n_images, dtype=torch.bool, device=self.patch_images.device)
        out[self.patch_images] = True
        return out


@dataclass
class RowSupport:
    """Per bank row, its nearest supporting images (distinct, not its own, not excluded
    when computed): ``images`` [m, S] int64 (-1 where fewer exist) and ``distances``
    [m, S] float32 ascending (inf where fewer exist)."""

    images: torch.Tensor
    distances: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def distance(self, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """[m] distance to the k-th supporting image not in ``exclude`` ([n_images] bool);
        inf where fewer than k supporters are left."""
        valid = self.images >= 0
        if exclude is not None:
            valid &= ~exclude.to(self.images.device)[self.images.clamp_min(0)]
        hit = valid & (valid.cumsum(dim=1) == k)
        found = hit.any(dim=1)
        out = torch.full((len(self),), float("inf"), dtype=torch.float32, device=self.distances.device)
        out[found] = self.distances[found].gather(1, hit[found].float().argmax(dim=1, keepdim=True))[:, 0]
        return out

    def subset(self, index: torch.Tensor) -> "RowSupport":
        return RowSupport(self.images[index], self.distances[index])

    def to(self, device) -> "RowSupport":
        return RowSupport(self.images.to(device), self.distances.to(device))

    @staticmethod
    def cat(parts: list["RowSupport"], image_offsets: list[int] | None = None) -> "RowSupport":
        """Rows of several parts (e.g. shards) in order; ``image_offsets`` shift each part's image ids."""
        width = max(p.images.shape[1] for p in parts)
        images, dists = [], []
        for i, p in enumerate(parts):
            img, dist = p.images, p.distances
            if image_offsets is not None:
                img = torch.where(img >= 0, img + image_offsets[i], img)
            pad = width - img.shape[1]
            if pad:
                img = torch.cat([img, img.new_full((img.shape[0], pad), -1)], dim=1)
                dist = torch.cat([dist, dist.new_full((dist.shape[0], pad), float("inf"))], dim=1)
            images.append(img)
            dists.append(dist)
        return RowSupport(torch.cat(images), torch.cat(dists))


def find_candidates(rows: torch.Tensor, row_images: torch.Tensor, patches: torch.Tensor, patch_images: torch.Tensor,
                    n_images: int, count: int = CANDIDATES, dims: int = SUBSPACE_DIMS) -> SupportCandidates:
    """The ``count`` nearest training patches of every bank row.

    Searched in the patches' top-``dims`` principal subspace with ``ops.knn``, then
    re-ranked with exact full-dimension distances. rows [m, D], patches [M, D] on one
    device; row_images [m] and patch_images [M] int64 training-image ids < n_images.
    """
    from ..search import PrincipalSubspaceIndex  # noqa: PLC0415

    index = PrincipalSubspaceIndex(patches, dims=dims, candidates=count, basis_rows=BASIS_ROWS)
    cand = index.nearest_candidates(rows)  # [m, c] patch indices
    dist = torch.empty(cand.shape, dtype=torch.float32, device=rows.device)
    for s in range(0, rows.shape[0], RERANK_ROWS):
        sl = slice(s, s + RERANK_ROWS)
        dist[sl] = (rows[sl, None, :] - patches[cand[sl]]).pow(2).sum(dim=2).sqrt()
    dist, order = dist.sort(dim=1)
    images = patch_images[cand.gather(1, order)]
    # first occurrence of each image along the (sorted) row
    c = images.shape[1]
    earlier = torch.ones(c, c, dtype=torch.bool, device=images.device).tril(-1)  # [j, j'] j' < j
    first = torch.empty_like(images, dtype=torch.bool)
    for s in range(0, images.shape[0], RERANK_ROWS):
        blk = images[s : s + RERANK_ROWS]
        same = blk[:, :, None] == blk[:, None, :]
        first[s : s + RERANK_ROWS] = ~(same & earlier).any(dim=2)
    return SupportCandidates(dist, images, first, rows, row_images, patches, patch_images, int(n_images))


def _exact_supporters(c: SupportCandidates, rows: torch.Tensor, excluded: torch.Tensor, count: int):
    """(images [u, count], distances [u, count]) for the rows ``rows`` from all patches."""
    n = c.n_images
    out_img = torch.full((rows.numel(), count), -1, dtype=torch.int64, device=c.rows.device)
    out_dist = torch.full((rows.numel(), count), float("inf"), dtype=torch.float32, device=c.rows.device)
    for s in range(0, rows.numel(), EXACT_ROWS):
        r = rows[s : s + EXACT_ROWS]
        sq = ops.pairwise_sqdist(c.rows[r].contiguous(), c.patches, check_finite=False).clamp_min(0)  # [u, M]
        per_image = torch.full((r.numel(), n), float("inf"), dtype=torch.float32, device=sq.device)
        per_image.scatter_reduce_(1, c.patch_images.expand(r.numel(), -1), sq, reduce="amin", include_self=True)
        per_image[torch.arange(r.numel(), device=sq.device), c.row_images[r]] = float("inf")
        per_image[:, excluded] = float("inf")
        k = min(count, n)
        d, img = per_image.topk(k, dim=1, largest=False)
        img = torch.where(torch.isfinite(d), img, torch.full_like(img, -1))
        out_img[s : s + EXACT_ROWS, :k] = img
        out_dist[s : s + EXACT_ROWS, :k] = d.sqrt()
    return out_img, out_dist


def supporters(c: SupportCandidates, excluded: torch.Tensor | None, count: int) -> RowSupport:
    """Each row's ``count`` nearest supporting images: distinct, not the row's own image,
    not ``excluded`` ([n_images] bool). Taken from the candidates; rows whose candidates
    hold fewer such images get them from every patch (exact)."""
    device = c.images.device
    if excluded is None:
        excluded = torch.zeros(c.n_images, dtype=torch.bool, device=device)
    excluded = excluded.to(device)
    valid = c.first & (c.images != c.row_images[:, None]) & ~excluded[c.images]
    rank = valid.cumsum(dim=1)
    take = valid & (rank <= count)
    m = c.images.shape[0]
    images = torch.full((m, count), -1, dtype=torch.int64, device=device)
    dists = torch.full((m, count), float("inf"), dtype=torch.float32, device=device)
    r, j = take.nonzero(as_tuple=True)
    slot = rank[r, j] - 1
    images[r, slot] = c.images[r, j]
    dists[r, slot] = c.distances[r, j]
    short = (rank[:, -1] < count).nonzero().flatten()
    if short.numel():
        images[short], dists[short] = _exact_supporters(c, short, excluded, count)
    return RowSupport(images, dists)


# ------------------------------------------------------------------ image evidence and flags
def image_evidence(row_images: torch.Tensor, support: torch.Tensor, n_images: int) -> np.ndarray:
    """[n_images] float32: the largest finite support distance among each image's rows (0
    for an image without rows)."""
    finite = torch.isfinite(support)
    ev = torch.zeros(n_images, dtype=torch.float32, device=support.device)
    ev.scatter_reduce_(0, row_images[finite], support[finite].float(), reduce="amax", include_self=True)
    return ev.cpu().numpy()


def _centre_and_scale(s: np.ndarray) -> tuple[float, float]:
    """Median and a sigma estimated from the lower half only (median - 25th percentile,
    / 0.6745), so that up to half of the images being contaminated -- all on the upper
    side -- does not widen it; floored at SPLIT_SCALE_FLOOR x |median| (images that all
    score alike are not told apart by rounding noise)."""
    med = float(np.median(s))
    sigma = (med - float(np.percentile(s, 25))) / 0.6745
    return med, max(sigma, SPLIT_SCALE_FLOOR * abs(med), 1e-12)


def split_limit(scores: np.ndarray) -> float:
    """The flag limit of image scores: median + SPLIT_FACTOR x the lower-half sigma."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size < 4:
        return float("inf")
    med, sigma = _centre_and_scale(s)
    return med + SPLIT_FACTOR * sigma


def robust_z(scores: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """Scores as robust z-scores over ``present``: (score - median) / lower-half sigma."""
    s = np.asarray(scores, dtype=np.float64)
    ref = s[present] if present is not None else s
    ref = ref[np.isfinite(ref)]
    if ref.size < 4:
        return np.zeros_like(s, dtype=np.float32)
    med, sigma = _centre_and_scale(ref)
    return ((s - med) / sigma).astype(np.float32)


def combined_evidence(leave_out: np.ndarray, other: np.ndarray | None, present: np.ndarray) -> np.ndarray:
    """An image's contamination evidence (0 = a typical image): the mean of the robust
    z-scores of its leave-out score and (when given) the patch discriminators' score.
    z-scores rather than ratios to the median: each evidence then counts in units of its
    own spread on the clean side, so an evidence that does not see a set's defects adds
    noise of unit size instead of swamping the one that does (the split re-estimates the
    spread of the mean)."""
    ev = robust_z(leave_out, present)
    if other is None:
        return ev
    return ((ev + robust_z(other, present)) / 2.0).astype(np.float32)


@dataclass
class SupportResult:
    """What the leave-out support decided (arrays over image ids; [m] on the rows' device)."""

    rows: RowSupport  # supporters of every row, flagged images excluded
    support: torch.Tensor  # [m] float32 k-th supporter distance (inf: unsupported)
    leave_out: np.ndarray  # [n_images] leave-out score of every image (distance units)
    evidence: np.ndarray  # [n_images] combined evidence (robust z, 0 = typical), what the flags split
    flagged: np.ndarray  # [n_images] bool
    limit: float  # flag limit on the evidence
    distance_limit: float  # the same split on the leave-out scores alone (distance units)
    rounds: int


def leave_out_support(c: SupportCandidates, k: int, spare: int = 0, other: np.ndarray | None = None) -> SupportResult:
    """Flag images by their contamination evidence and support every row by the unflagged ones.

    Round 1 supports every row by every other image; the evidence -- the leave-out score
    combined with ``other`` ([n_images], e.g. the discriminators' image scores; None: the
    leave-out score alone) -- is split (:func:`split_limit`) into flags; each later round
    drops the flagged images from the supporters and flags again, until the flags settle
    (at most MAX_ROUNDS rounds). ``spare``: extra supporters kept per row, so that a few
    more images can be left out later (the calibration images) without another search."""
    count = k + spare
    present = c.present.cpu().numpy()
    flagged = np.zeros(c.n_images, dtype=bool)
    rows = supporters(c, None, count)
    rounds = 0
    while True:
        rounds += 1
        support = rows.distance(k)
        leave_out = image_evidence(c.row_images, support, c.n_images)
        evidence = combined_evidence(leave_out, other, present)
        limit = split_limit(evidence[present])
        new = (evidence > limit) & present
        if np.array_equal(new, flagged) or rounds == MAX_ROUNDS:
            break
        flagged = new
        rows = supporters(c, torch.as_tensor(flagged, device=c.images.device), count)
    return SupportResult(rows, support, leave_out, evidence, flagged, float(limit),
                         split_limit(leave_out[present]), rounds)


def unsupported_fill(support: torch.Tensor) -> torch.Tensor:
    """Rows no image vouches for (inf) get the largest finite support distance (or 0)."""
    finite = torch.isfinite(support)
    if bool(finite.all()):
        return support
    fill = support[finite].max() if bool(finite.any()) else support.new_zeros(())
    return torch.where(finite, support, fill)


@dataclass
class BankSupport:
    """A bank's rows' supporters during a fit, so that calibration can leave images out
    (their rows and their vouching) without another search."""

    rows: RowSupport
    k: int
    excluded: torch.Tensor  # [n_images] bool: images that vouch for nothing (flagged)

    def subset(self, index: torch.Tensor) -> "BankSupport":
        return BankSupport(self.rows.subset(index), self.k, self.excluded)

    def distances(self, leave_out: torch.Tensor | None = None) -> torch.Tensor:
        """[m] support distances with ``leave_out`` image ids vouching for nothing either."""
        excluded = self.excluded.clone()
        if leave_out is not None and leave_out.numel():
            excluded[leave_out.to(excluded.device)] = True
        return unsupported_fill(self.rows.distance(self.k, excluded))


def support_stats(support: torch.Tensor | None) -> dict | None:
    """Quantiles of a bank's support distances (what the leave-out support did)."""
    if support is None or support.numel() == 0:
        return None
    s = support.double().cpu()
    q = torch.quantile(s, torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64))
    return {"median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(q[3])}


__all__ = ["CANDIDATES", "BankSupport", "RowSupport", "SupportCandidates", "SupportResult",
           "combined_evidence", "find_candidates", "image_evidence", "leave_out_support", "relative", "split_limit", "support_stats", "supporters",
           "unsupported_fill"]
