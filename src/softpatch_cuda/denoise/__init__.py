"""Denoising: score every training patch with noise discriminators, then decide what
each memory bank keeps and how it weighs it.

* :mod:`.discriminators` -- LOF / nearest / Gaussian outlier scores (:func:`score_patches`);
* :mod:`.alignment` -- which patches are compared (position, window, global, auto);
* :mod:`.graphs`, :mod:`.gaussian` -- their building blocks;
* :mod:`.policy` -- ranking, fusion, removal, soft weights, image contamination scores.
"""

from .alignment import ALIGNMENTS, alignment_statistic, check_alignment, resolve_alignment
from .discriminators import (
    DISCRIMINATORS,
    DiscriminatorSettings,
    PatchScores,
    check_discriminator,
    min_images,
    outlier_scores,
    score_patches,
)
from .gaussian import check_shrinkage
from .policy import (
    FUSIONS,
    RANK_SCOPES,
    REMOVALS,
    WEIGHT_FUSIONS,
    WEIGHT_MODES,
    BankSpec,
    DenoiseResult,
    DenoiseSpec,
    contamination_scores,
    fuse,
    plan_banks,
    rank_normalise,
    soft_weights,
    weight_stats,
)

__all__ = [
    "ALIGNMENTS", "DISCRIMINATORS", "FUSIONS", "RANK_SCOPES", "REMOVALS", "WEIGHT_FUSIONS", "WEIGHT_MODES",
    "BankSpec", "DenoiseResult", "DenoiseSpec", "DiscriminatorSettings", "PatchScores",
    "alignment_statistic", "check_alignment", "check_discriminator", "check_shrinkage", "contamination_scores",
    "fuse", "min_images", "outlier_scores", "plan_banks", "rank_normalise", "resolve_alignment",
    "score_patches", "soft_weights", "weight_stats",
]
