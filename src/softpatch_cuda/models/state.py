"""The fitted state: everything a fit produces and a fitted detector scores with, besides
its configuration and the backbone's weights (rebuilt from ``backbone_spec``).

The fit's phases (:mod:`.phases`) build it, :mod:`.model_io` writes and reads it (as
torch tensors for the detector, as numpy arrays for the torch-free predictor), and the
detector holds it; no other module reaches into a detector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .._validation import is_number
from ..memory_bank import MemoryBank
from ..results import Prediction, TrainingReport

BANK_NAMES: tuple[str, ...] = ("cls", "seg")  # classification (image scores), segmentation (maps)


def check_threshold(value: Any) -> float:
    if not is_number(value) or math.isnan(value):
        raise ValueError(f"threshold must be a number, got {value!r}")
    return float(value)


@dataclass
class FittedState:
    """projection: [D, d] the seeded random projection the denoising and coreset used.
    banks: "cls" (image scores) and, for SoftPatch+, "seg" (anomaly maps).
    report: the training report. threshold: the decision threshold on image scores.
    score_floor: the lowest patch score of the calibration images (the low end of the
    overlays' colour scale). alignment (+ its statistic): what the discriminators
    compared. fit_info: sizes, timings and what the denoising did. backbone_spec: how to
    rebuild the backbone (weights fingerprint included). embed_dim: D."""

    projection: Any
    banks: dict[str, MemoryBank]
    report: TrainingReport
    threshold: float
    score_floor: float
    alignment: str | None
    alignment_statistic: float | None
    backbone_spec: dict
    embed_dim: int
    fit_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.threshold = check_threshold(self.threshold)
        if "cls" not in self.banks or set(self.banks) - set(BANK_NAMES):
            raise ValueError(f"a fitted state needs a 'cls' bank (and at most a 'seg' bank), got {sorted(self.banks)}")

    @property
    def cls_bank(self) -> MemoryBank:
        return self.banks["cls"]

    @property
    def seg_bank(self) -> MemoryBank | None:
        return self.banks.get("seg")

    def colour_range(self) -> tuple[float, float]:
        """The overlays' colour scale: from the score floor to as far above the threshold,
        so the threshold sits in the middle (a normal image stays blue to green, regions
        above the threshold are yellow to red) whatever images a run scores first."""
        lo = min(self.score_floor, self.threshold)
        return (lo, 2.0 * self.threshold - lo) if self.threshold > lo else (lo, lo + 1.0)


class FittedModel:
    """What every fitted model offers over its state -- the torch detector and the
    torch-free predictor alike: the threshold (settable), the overlays' colour scale,
    the training report, ``predict`` and ``score``. A subclass provides ``state`` and
    ``_run(images, with_maps)``."""

    state: FittedState

    @property
    def threshold(self) -> float:
        """Decision threshold on image scores (calibrated at fit; settable)."""
        return self.state.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = check_threshold(value)
        self.state.threshold = value

    def colour_range(self) -> tuple[float, float]:
        """The colour scale of this model's overlays (see :meth:`FittedState.colour_range`)."""
        return self.state.colour_range()

    def training_report(self) -> TrainingReport:
        """Contamination score of every training image and the likely defective ones."""
        return self.state.report

    def predict(self, images: Any) -> Prediction:
        """Score images: image scores, verdicts and anomaly maps (see :class:`Prediction`)."""
        return self._run(images, with_maps=True)

    def score(self, images: Any):
        """[N] float32 image anomaly scores only (no maps)."""
        return self._run(images, with_maps=False).scores
