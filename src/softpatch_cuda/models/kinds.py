"""The three detectors: one pipeline (:class:`Detector`), three configurations."""

from __future__ import annotations

from .config import PatchCoreConfig, SoftPatchConfig, SoftPatchPlusConfig
from .detector import Detector


class PatchCore(Detector):
    """PatchCore (Roth et al. 2022): greedy-coreset memory bank, nearest-neighbour distance.

    The same pipeline as :class:`SoftPatch` with denoising and soft weights off. LOF
    still runs (alignment "auto") to fill :meth:`training_report`. Options: the fields
    of :class:`PatchCoreConfig`.
    """

    config_class = PatchCoreConfig
    model_type = config_class.model_type


class SoftPatch(Detector):
    """SoftPatch (Jiang et al. 2022): patch-level denoising with one discriminator, soft
    weights on the nearest-neighbour distance. Options: the fields of :class:`SoftPatchConfig`."""

    config_class = SoftPatchConfig
    model_type = config_class.model_type


class SoftPatchPlus(Detector):
    """SoftPatch+ (Wang et al. 2025): several discriminators fused by rank, a
    classification bank for image scores and a more aggressively cleaned segmentation
    bank for the maps. Options: the fields of :class:`SoftPatchPlusConfig`."""

    config_class = SoftPatchPlusConfig
    model_type = config_class.model_type
