"""Alignment: which training patches a patch is compared with (docs/ALGORITHM.md section 6b).

* ``"position"`` (the paper): the patches at the same position in the other images.
* ``"window"``: the other images' patches within +-``window`` positions (a (2r+1)^2
  neighbourhood, clipped at the border) -- tolerates small shifts.
* ``"global"``: patches anywhere in the other images, drawn at random (seeded) into a
  pool -- for textures, where no position is special.
* ``"auto"``: chosen from :func:`alignment_statistic`.
"""

from __future__ import annotations

import logging

import torch

from .._validation import check_choice
from .spec import ALIGNMENTS

logger = logging.getLogger(__name__)

# "auto" thresholds on rho = median same-position NN distance / median NN distance to
# patches at random positions (same number of candidates). Aligned objects: the same
# position shows the same part, rho well below 1. Textures: any position is as good,
# rho ~ 1. Chosen on the demo data (aligned objects ~0.55-0.65, regular textures
# ~0.8, irregular ones ~0.9; see benchmarks/results).
AUTO_POSITION_BELOW = 0.7
AUTO_WINDOW_BELOW = 0.95


def check_alignment(name: str) -> str:
    return check_choice("alignment", name, ALIGNMENTS)


def alignment_statistic(z: torch.Tensor, seed: int = 0, max_queries: int = 1024) -> float:
    """rho = median(NN distance among the other images' patches at the same position)
    / median(NN distance among as many patches of the other images at random positions).

    Computed on up to ``max_queries`` random (image, position) queries. About 1 when
    positions are interchangeable (textures), well below 1 for aligned objects.
    """
    n, h, w, d = z.shape
    if n < 2:
        return 1.0
    p = h * w
    flat = z.reshape(n, p, d)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 7919)
    q = min(max_queries, n * p)
    qi = torch.randint(0, n, (q,), generator=gen)
    qp = torch.randint(0, p, (q,), generator=gen)
    rand_pos = torch.randint(0, p, (q, n), generator=gen)
    dev = z.device
    others = torch.arange(n).unsqueeze(0).expand(q, n)
    own = others == qi.unsqueeze(1)
    d_pos, d_rand = [], []
    for start in range(0, q, 128):  # bounded memory: 128 x n x d at a time
        sl = slice(start, start + 128)
        query = flat[qi[sl].to(dev), qp[sl].to(dev)]  # [b, d]
        same = flat[:, qp[sl].to(dev)].permute(1, 0, 2)  # [b, n, d]
        rnd = flat[others[sl].to(dev), rand_pos[sl].to(dev)]  # [b, n, d]
        mask = own[sl].to(dev)
        ds = (same - query[:, None]).norm(dim=2).masked_fill(mask, float("inf")).amin(dim=1)
        dr = (rnd - query[:, None]).norm(dim=2).masked_fill(mask, float("inf")).amin(dim=1)
        d_pos.append(ds)
        d_rand.append(dr)
    med_pos = torch.cat(d_pos).median().item()
    med_rand = torch.cat(d_rand).median().item()
    if med_rand <= 0:
        return 1.0
    return float(med_pos / med_rand)


def resolve_alignment(alignment: str, z: torch.Tensor, seed: int = 0) -> tuple[str, float | None]:
    """(chosen alignment, rho or None). "auto": rho < 0.7 -> position, < 0.95 -> window, else global."""
    check_alignment(alignment)
    if alignment != "auto":
        return alignment, None
    rho = alignment_statistic(z, seed)
    if rho < AUTO_POSITION_BELOW:
        chosen = "position"
    elif rho < AUTO_WINDOW_BELOW:
        chosen = "window"
    else:
        chosen = "global"
    logger.info("alignment='auto': rho=%.3f (same-position / random-position NN distance) -> %s", rho, chosen)
    return chosen, rho


