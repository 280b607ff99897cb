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


def window_index(h: int, w: int, r: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, (2r+1)^2] positions of each position's window (clipped at the border: the
    missing slots hold the position itself) and [P, (2r+1)^2] bool, True for real slots."""
    size = 2 * r + 1
    ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1, device=dev), torch.arange(-r, r + 1, device=dev), indexing="ij")
    wy = ys.reshape(-1, 1) + dy.reshape(1, -1)
    wx = xs.reshape(-1, 1) + dx.reshape(1, -1)
    valid = (wy >= 0) & (wy < h) & (wx >= 0) & (wx < w)
    own = torch.arange(h * w, device=dev).reshape(-1, 1).expand(-1, size * size)
    return torch.where(valid, wy * w + wx, own), valid


def window_graph(z: torch.Tensor, k: int, radius: int, progress_bar=None,
                 max_elements: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest patches of every patch among the other images' patches within +-radius
    positions. Returns (distances [N*P, k], global patch indices [N*P, k]); patch id = i*P + p.

    All positions are handled in a few batched distance calls (``ops.pairwise_sqdist``
    on [positions, N, d] x [positions, N * window, d], at most ``max_elements`` distances
    at a time) instead of one small k-NN call per position: on a busy machine the
    per-call overhead of hundreds of tiny calls dominated.
    """
    n, h, w, d = z.shape
    p = h * w
    flat = z.reshape(n, p, d)
    dev = z.device
    win, valid = window_index(h, w, radius, dev)
    wsize = win.shape[1]
    if k > n * wsize - wsize:
        raise ValueError(f"k={k} neighbours per patch, but a window holds only {(n - 1) * wsize} patches of other images")
    dist_out = torch.empty(n, p, k, device=dev)
    idx_out = torch.empty(n, p, k, dtype=torch.int64, device=dev)
    images = torch.arange(n, device=dev)
    # candidate row c of a position's bank: image c // wsize, window slot c % wsize
    cand_image = torch.arange(n * wsize, device=dev) // wsize
    cand_slot = torch.arange(n * wsize, device=dev) % wsize
    own = cand_image[None, :] == images[:, None]  # [N, N*W]
    chunk = max(1, max_elements // max(1, n * n * wsize))
    for start in range(0, p, chunk):
        pos = torch.arange(start, min(p, start + chunk), device=dev)
        queries = flat[:, pos].permute(1, 0, 2).contiguous()  # [c, N, d]
        bank = flat[:, win[pos]].permute(1, 0, 2, 3).reshape(len(pos), n * wsize, d).contiguous()  # [c, N*W, d]
        sq = ops.pairwise_sqdist(queries, bank, check_finite=False)  # [c, N, N*W]
        invalid = ~valid[pos][:, cand_slot]  # [c, N*W]: clipped window slots
        sq = sq.masked_fill(invalid[:, None, :] | own[None], float("inf"))
        best = sq.topk(k, dim=2, largest=False)  # ascending
        nbr_image = cand_image[best.indices]
        nbr_pos = win[pos][torch.arange(len(pos), device=dev)[:, None, None], cand_slot[best.indices]]
        dist_out[:, pos] = best.values.clamp_min(0).sqrt().permute(1, 0, 2)
        idx_out[:, pos] = (nbr_image * p + nbr_pos).permute(1, 0, 2)
        if progress_bar is not None:
            progress_bar.update(len(pos))
    return dist_out.reshape(n * p, k), idx_out.reshape(n * p, k)


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


