"""The denoising policy: from the discriminators' patch scores to what each memory bank keeps.

Inputs: the raw outlier scores of one or more discriminators ([N, h, w] each, about 1
for inliers). Outputs (:class:`DenoiseResult`):

* per bank, which patches are kept (``kept`` [N*P] bool) and their soft weights;
* per training image, a contamination score and whether it is flagged (the
  training report).

Steps, each a small function below: rank and fuse the scores (:func:`order_scores`),
remove patches per bank (:func:`removal_mask`), weight the kept ones
(:func:`soft_weights`), score and flag images (:func:`contamination_scores`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .._validation import MAD_TO_SIGMA, check_choice, robust_limit
from .spec import (  # noqa: F401 -- the policy's vocabulary and specs, importable from here too
    FUSIONS, GATES, RANK_SCOPES, REMOVALS, WEIGHT_FUSIONS, WEIGHT_MODES, BankSpec, DenoiseSpec,
)

OUTLIER_WEIGHT_MAD = 3.0
CLAMPED_WEIGHT_QUANTILE = 0.9
REPORT_TOP_FRACTION = 0.05  # contamination score: mean of an image's top 5 % patch evidence
REPORT_MAD_FACTOR = 3.0  # flagged: score > median + 3 * 1.4826 * MAD of the image scores
# Floor of the robust scale of the image scores, relative to their median: when most
# images score alike the MAD collapses and every image above the median would be
# flagged (a clean set lost half its images to the flag that way).
REPORT_SCALE_FLOOR = 0.05


@dataclass
class DenoiseResult:
    """What the denoising decided. Arrays are on the scores' device unless noted."""

    kept: dict[str, torch.Tensor]  # bank name -> [N*P] bool
    weights: dict[str, torch.Tensor | None]  # bank name -> [N*P] float32 or None
    image_scores: np.ndarray  # [N] float32 contamination score per training image
    flagged: np.ndarray  # [N] bool
    flag_limit: float
    removed_fraction: np.ndarray  # [N] float32 share of each image's patches removed from the cls bank
    stats: dict = field(default_factory=dict)  # per bank: removed patches, weight quantiles


# ------------------------------------------------------------------ ranking and fusion
def rank_normalise(scores: torch.Tensor, per_position: bool) -> torch.Tensor:
    """[N, h, w] -> ranks in [0, 1] (0 most normal); within each position's group of N
    images when ``per_position``, else over all patches. Ties share the lower rank order."""
    n, h, w = scores.shape
    if per_position:
        flat = scores.reshape(n, h * w)
        ranks = flat.argsort(dim=0).argsort(dim=0).float()
        return (ranks / max(n - 1, 1)).reshape(n, h, w)
    flat = scores.reshape(-1)
    ranks = flat.argsort().argsort().float()
    return (ranks / max(flat.numel() - 1, 1)).reshape(n, h, w)


def fuse(ranks: Sequence[torch.Tensor], fusion: str = "mean") -> torch.Tensor:
    """Combine rank-normalised scores of several discriminators: "mean" or "max"."""
    check_choice("fusion", fusion, FUSIONS)
    stacked = torch.stack(list(ranks))
    return stacked.mean(dim=0) if fusion == "mean" else stacked.amax(dim=0)


def order_scores(raw: dict[str, torch.Tensor], fusion: str = "mean", per_position: bool = False) -> torch.Tensor:
    """[N, h, w], larger = removed first. One discriminator: its raw scores (SoftPatch);
    several: their rank-normalised scores fused (SoftPatch+)."""
    if len(raw) == 1:
        (only,) = raw.values()
        return only
    return fuse([rank_normalise(s, per_position) for s in raw.values()], fusion)


# ------------------------------------------------------------------ removal
def top_fraction_count(total: int, fraction: float) -> int:
    return int(math.floor(fraction * total + 1e-9))


def robust_outliers(raw: dict[str, torch.Tensor], factor: float, combine: str = "any") -> torch.Tensor:
    """[N*P] bool: the patch's score exceeds median + factor * 1.4826 * MAD of all
    patches' scores in at least one discriminator (``combine="any"``) or in every one
    (``"all"``)."""
    mask = None
    for s in raw.values():
        f = s.reshape(-1)
        med = f.median()
        mad = (f - med).abs().median() * MAD_TO_SIGMA
        hit = f > med + factor * mad
        mask = hit if mask is None else (mask | hit if combine == "any" else mask & hit)
    return mask


def removal_mask(raw: dict[str, torch.Tensor], order: torch.Tensor, bank: BankSpec, removal_mad: float) -> torch.Tensor:
    """[N*P] bool, True for the patches this bank drops."""
    total = order.numel()
    removed = torch.zeros(total, dtype=torch.bool, device=order.device)
    n_remove = top_fraction_count(total, bank.fraction) if bank.removal != "none" else 0
    if n_remove == 0:
        return removed
    worst = order.reshape(-1).topk(n_remove).indices
    if bank.removal == "gated":  # "do no harm": only confirmed outliers go
        worst = worst[robust_outliers(raw, removal_mad, bank.gate)[worst]]
    removed[worst] = True
    return removed


# ------------------------------------------------------------------ soft weights
def soft_weights(scores: Sequence[torch.Tensor], kept: torch.Tensor, mode: str = "outlier",
                 fusion: str = "mean") -> torch.Tensor:
    """[N*P] soft weights from one or more discriminators' raw scores.

    Each discriminator's scores are divided by a reference; ``fusion`` combines the
    quotients of several discriminators: "mean" (their average) or "min" (the smallest:
    a patch weighs more than 1 only where every discriminator calls it an outlier, so
    one heavy-tailed discriminator cannot up-weight rare normal patches on its own --
    measured: SoftPatch+ on DeepPCB at noise 0, image AUROC 52.4 with "mean", 68.2 with
    "min", PatchCore 67.6).

    * ``"median"``: reference = median kept score (the plain reading of the papers:
      a typical inlier weighs 1, but half of the normal patches weigh more than 1 and
      half less, so normal matches are re-scaled by +-10-30 %).
    * ``"clamped"``: reference = the 90th percentile of the kept scores and the weight
      is at least 1: the 90 % most normal kept patches weigh exactly 1; only the most
      outlying kept patches weigh more.
    * ``"outlier"``: reference = median + 3 * 1.4826 * MAD of all patches' scores,
      weight at least 1: only robust outliers weigh more than 1, every other patch
      weighs exactly 1.
    """
    check_choice("weight_mode", mode, WEIGHT_MODES)
    check_choice("weight_fusion", fusion, WEIGHT_FUSIONS)
    parts = []
    for s in scores:
        s = s.reshape(-1).clamp_min(0)
        ref_set = s[kept] if bool(kept.any()) else s
        if mode == "median":
            ref = ref_set.median()
        elif mode == "outlier":  # robust outlier limit over all patches
            med = s.median()
            ref = med + OUTLIER_WEIGHT_MAD * MAD_TO_SIGMA * (s - med).abs().median()
        else:
            k = max(1, math.ceil(CLAMPED_WEIGHT_QUANTILE * ref_set.numel()))
            ref = ref_set.float().kthvalue(k).values
        parts.append(s / ref.clamp_min(1e-12))
    stacked = torch.stack(parts)
    w = stacked.min(dim=0).values if fusion == "min" else stacked.mean(dim=0)
    return w if mode == "median" else w.clamp_min(1.0)


# ------------------------------------------------------------------ training report
def patch_evidence(raw: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, h, w]: each discriminator's score divided by its median, averaged (1 = typical)."""
    parts = [s / s.reshape(-1).median().clamp_min(1e-12) for s in raw.values()]
    return torch.stack(parts).mean(dim=0)


def contamination_scores(evidence: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """Per image: the mean of its top 5 % patch evidence; flagged above the robust limit.

    Returns (scores [N] float32, flagged [N] bool, limit)."""
    n = evidence.shape[0]
    flat = evidence.reshape(n, -1)
    count = max(1, int(math.ceil(REPORT_TOP_FRACTION * flat.shape[1])))
    scores = flat.topk(count, dim=1).values.mean(dim=1).cpu().numpy().astype(np.float32)
    flagged, limit = flag_images(scores)
    return scores, flagged, limit


def flag_images(scores: np.ndarray) -> tuple[np.ndarray, float]:
    """(flagged [N] bool, limit): images whose contamination score exceeds the robust limit
    of all the scores (median + REPORT_MAD_FACTOR MAD, the MAD floored at REPORT_SCALE_FLOOR
    of the median); nothing is flagged where no score is finite. A sharded fit applies it
    to the union of its shards' scores."""
    scores = np.asarray(scores, dtype=np.float32)
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return np.zeros(scores.size, dtype=bool), float("nan")
    floor = REPORT_SCALE_FLOOR * abs(float(np.median(finite)))
    limit = robust_limit(scores, REPORT_MAD_FACTOR, scale_floor=floor)
    return scores > limit, float(limit)


# ------------------------------------------------------------------ the whole policy
def weight_stats(weights: torch.Tensor | None) -> dict | None:
    """Quantiles of a bank's soft weights, so a policy whose weights do nothing shows."""
    if weights is None or weights.numel() == 0:
        return None
    q = torch.quantile(weights.double().cpu(), torch.tensor([0.0, 0.5, 0.9, 0.99, 1.0], dtype=torch.float64))
    return {"min": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "p99": float(q[3]), "max": float(q[4]),
            "share_above_1": float((weights > 1.0).double().mean())}


def plan_banks(raw: dict[str, torch.Tensor], spec: DenoiseSpec, per_position: bool = False) -> DenoiseResult:
    """Apply the policy to the discriminators' scores ([N, h, w] each, one device)."""
    first = next(iter(raw.values()))
    n = first.shape[0]
    order = order_scores(raw, spec.fusion, per_position)
    evidence = patch_evidence(raw)
    image_scores, flagged, limit = contamination_scores(evidence)
    result = DenoiseResult(kept={}, weights={}, image_scores=image_scores, flagged=flagged, flag_limit=limit,
                           removed_fraction=np.zeros(n, dtype=np.float32))
    for bank in spec.banks:
        kept = ~removal_mask(raw, order, bank, spec.removal_mad)
        weights = (soft_weights(list(raw.values()), kept, spec.weight_mode, spec.weight_fusion)
                   if bank.soft_weights else None)
        result.kept[bank.name] = kept
        result.weights[bank.name] = weights
        if bank.name == "cls":
            result.removed_fraction = (~kept).reshape(n, -1).float().mean(1).cpu().numpy().astype(np.float32)
        result.stats[bank.name] = {"removed": int((~kept).sum()), "removed_share": float((~kept).float().mean())}
    return result
