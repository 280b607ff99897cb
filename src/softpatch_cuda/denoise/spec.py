"""What the denoising is asked to do: the names it knows and the specs a model's config
builds -- torch-free, so configs and the command line load without torch.

The algorithm is in the sibling modules (discriminators, alignment, policy); this module
holds their vocabulary: the alignments, the fusions, removals, gates and weight modes of
the policy (:mod:`.policy`), the per-bank and overall specs, and the Gaussian's shrinkage
check.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._validation import is_int, is_number

ALIGNMENTS: tuple[str, ...] = ("auto", "position", "window", "global")
FUSIONS: tuple[str, ...] = ("mean", "max")
RANK_SCOPES: tuple[str, ...] = ("global", "position")
REMOVALS: tuple[str, ...] = ("gated", "fixed", "none")
GATES: tuple[str, ...] = ("any", "all")
WEIGHT_MODES: tuple[str, ...] = ("outlier", "clamped", "median")
WEIGHT_FUSIONS: tuple[str, ...] = ("min", "mean")

SHRINKAGE_HELP = "'ledoit_wolf' or a number in [0, 1]"


def check_shrinkage(value) -> float | str:
    ok = value == "ledoit_wolf" or (is_number(value) and 0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"gaussian_shrinkage must be {SHRINKAGE_HELP}, got {value!r}")
    return value


def check_support_images(value) -> int | None:
    """``support_images`` (:mod:`.support`): None (off) or an int >= 1."""
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(f"support_images must be None or an int >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class BankSpec:
    """How one memory bank is cleaned.

    name: "cls" (image scores) or "seg" (anomaly maps).
    fraction: the top fraction of patches (by fused outlier rank) that may be removed.
    removal: "fixed" -- remove the whole top fraction (the papers); "gated" -- remove a
        top-fraction patch only if it is also a robust outlier (score above median +
        ``removal_mad`` MAD) in any / all discriminators (``gate``); "none".
    soft_weights: keep the patches' soft weights in the bank.
    """

    name: str
    fraction: float
    removal: str = "gated"
    gate: str = "any"
    soft_weights: bool = True


@dataclass(frozen=True)
class DenoiseSpec:
    """Everything the policy needs besides the scores (built from a model's config)."""

    banks: tuple[BankSpec, ...]
    fusion: str = "mean"
    rank_scope: str = "global"
    removal_mad: float = 3.0
    weight_mode: str = "outlier"
    weight_fusion: str = "mean"
