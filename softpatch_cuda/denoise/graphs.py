"""k-nearest-neighbour graphs between training patches, and LOF computed on them.

For the "window" and "global" alignments the comparison sets of different patches
overlap, so LOF is computed on the k-nearest-neighbour graph (each patch's k
nearest patches in its comparison set, via ``ops.knn``) with exactly LOF's
formulas. A patch is never compared with patches of its own image: neighbouring
patches of one image overlap (3x3 aggregation) and would hide a defect that spans
several patches.
"""

from __future__ import annotations

import torch

from .. import ops

_LOF_EPS = 1e-10  # as sklearn: duplicates give no division by zero


def window_positions(h: int, w: int, r: int, dev) -> list[torch.Tensor]:
    out = []
    for y in range(h):
        for x in range(w):
            ys = torch.arange(max(0, y - r), min(h, y + r + 1), device=dev)
            xs = torch.arange(max(0, x - r), min(w, x + r + 1), device=dev)
            out.append((ys[:, None] * w + xs[None, :]).reshape(-1))
    return out


def _drop_same_image(dist, idx, nbr_image, query_image, k):
    """Mask neighbours from the query's own image, keep the k nearest others."""
    dist = dist.masked_fill(nbr_image == query_image[:, None], float("inf"))
    best = dist.topk(k, dim=1, largest=False)  # topk is sorted ascending here
    return best.values, idx.gather(1, best.indices)


def window_graph(z: torch.Tensor, k: int, radius: int, progress_bar=None) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest patches of every patch among the other images' patches within +-radius
    positions. Returns (distances [N*P, k], global patch indices [N*P, k]); patch id = i*P + p."""
    n, h, w, d = z.shape
    p = h * w
    flat = z.reshape(n, p, d)
    dev = z.device
    dist_out = torch.empty(n * p, k, device=dev)
    idx_out = torch.empty(n * p, k, dtype=torch.int64, device=dev)
    images = torch.arange(n, device=dev)
    if dev.type == "cuda" and k + (2 * radius + 1) ** 2 > 64:
        raise ValueError(
            f"window={radius} with lof_k={k} needs {k + (2 * radius + 1) ** 2} neighbours per query; the CUDA "
            "k-NN kernel keeps at most 64 (use window <= 3)"
        )
    for pos, window in enumerate(window_positions(h, w, radius, dev)):
        wsize = window.numel()
        bank = flat[:, window].reshape(n * wsize, d)  # image-major: row = img*wsize + j
        kq = min(k + wsize, n * wsize)
        res = ops.knn(flat[:, pos], bank, kq, check_finite=False)
        nbr_image = res.indices // wsize
        global_id = nbr_image * p + window[res.indices % wsize]
        dist, ids = _drop_same_image(res.distances, global_id, nbr_image, images, k)
        rows = images * p + pos
        dist_out[rows] = dist
        idx_out[rows] = ids
        if progress_bar is not None:
            progress_bar.update(1)
    return dist_out, idx_out


def global_pool(n: int, p: int, pool_size: int, seed: int, dev) -> torch.Tensor:
    total = n * p
    if total <= pool_size:
        return torch.arange(total, device=dev)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 104729)
    return torch.randperm(total, generator=gen)[:pool_size].sort().values.to(dev)


def global_graph(
    z: torch.Tensor, k: int, pool_size: int, seed: int = 0, n_folds: int = 8, progress_bar=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest patches of every patch among a random pool of patches from the other
    images. Images are split into folds; a fold's patches are compared with the pool
    rows of the other folds (own image excluded, one knn call per fold)."""
    n, h, w, d = z.shape
    p = h * w
    flat = z.reshape(n * p, d)
    dev = z.device
    pool = global_pool(n, p, pool_size, seed, dev)
    pool_image = pool // p
    folds = max(2, min(n, n_folds))
    image_fold = torch.arange(n, device=dev) % folds
    dist_out = torch.empty(n * p, k, device=dev)
    idx_out = torch.empty(n * p, k, dtype=torch.int64, device=dev)
    for fold in range(folds):
        fold_images = torch.nonzero(image_fold == fold).flatten()
        if fold_images.numel() == 0:
            continue
        bank_rows = pool[image_fold[pool_image] != fold]
        rows = (fold_images[:, None] * p + torch.arange(p, device=dev)[None]).reshape(-1)
        kk = min(k, bank_rows.numel())
        res = ops.knn(flat[rows], flat[bank_rows], kk, check_finite=False)
        dist = res.distances
        ids = bank_rows[res.indices]
        if kk < k:  # tiny pools: repeat the farthest neighbour
            dist = torch.cat([dist, dist[:, -1:].expand(-1, k - kk)], 1)
            ids = torch.cat([ids, ids[:, -1:].expand(-1, k - kk)], 1)
        dist_out[rows] = dist
        idx_out[rows] = ids
        if progress_bar is not None:
            progress_bar.update(1)
    return dist_out, idx_out


def lof_from_graph(dist: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """LOF from each point's k nearest neighbours (distances ascending, neighbour ids).

    k-distance(b) = b's k-th neighbour distance; reach(a, b) = max(k-dist(b), d(a, b));
    lrd(a) = 1 / (mean reach + 1e-10); LOF(a) = mean lrd(neighbours) / lrd(a).
    """
    kdist = dist[:, -1]
    reach = torch.maximum(kdist[idx], dist)
    lrd = 1.0 / (reach.mean(dim=1) + _LOF_EPS)
    return lrd[idx].mean(dim=1) / lrd


