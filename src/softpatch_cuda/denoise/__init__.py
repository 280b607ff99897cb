"""Denoising: score every training patch with noise discriminators, then decide what
each memory bank keeps and how it weighs it.

* :mod:`.spec` -- the vocabulary and the specs a config builds (torch-free);
* :mod:`.discriminators` -- the table of discriminators (LOF / nearest / Gaussian) and
  their outlier scores (:func:`score_patches`);
* :mod:`.alignment` -- which patches are compared (position, window, global, auto);
* :mod:`.graphs`, :mod:`.gaussian` -- their building blocks;
* :mod:`.policy` -- ranking, fusion, removal, soft weights, image contamination scores;
* :mod:`.support` -- leave-out support of bank rows: image-level evidence and the
  support-aware score.

Names are loaded from their modules on first use, so ``denoise.spec`` and the
discriminator table load without torch.
"""

import importlib

_HOME = {
    "ALIGNMENTS": "spec", "FUSIONS": "spec", "GATES": "spec", "RANK_SCOPES": "spec", "REMOVALS": "spec",
    "WEIGHT_FUSIONS": "spec", "WEIGHT_MODES": "spec", "BankSpec": "spec", "DenoiseSpec": "spec",
    "check_shrinkage": "spec", "check_support_images": "spec",
    "DISCRIMINATORS": "discriminators", "Discriminator": "discriminators", "DiscriminatorSettings": "discriminators",
    "PatchScores": "discriminators", "check_discriminator": "discriminators", "min_images": "discriminators",
    "outlier_scores": "discriminators", "score_patches": "discriminators",
    "alignment_statistic": "alignment", "check_alignment": "alignment", "resolve_alignment": "alignment",
    "DenoiseResult": "policy", "contamination_scores": "policy", "flag_images": "policy", "fuse": "policy",
    "plan_banks": "policy", "rank_normalise": "policy", "soft_weights": "policy", "weight_stats": "policy",
}


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


__all__ = sorted(_HOME)
