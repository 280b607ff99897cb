"""Result dataclasses: :class:`Prediction` (test images) and :class:`TrainingReport` (training images)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._pixels import map_to_input_size


@dataclass
class Prediction:
    """What :meth:`predict` returns.

    Attributes:
        names: image names (file names, or ``image_<i>`` for in-memory images).
        scores: [N] float32 image anomaly scores (largest patch score).
        threshold: the decision threshold used for ``is_anomalous``.
        is_anomalous: [N] bool, ``scores > threshold``.
        maps: [N, S, S] float32 anomaly maps in the model frame (after resize + centre
            crop); compare with ``ImageTransform.mask(gt)``.
        sources: file path of each image, None for in-memory images.
        patch_scores: [N, h, w] float32 patch scores the maps are made from.
        input_sizes: (height, width) of each original image.
        resize, crop: the model's transform, to undo it in :meth:`map_at_input_size`.
    """

    names: list[str]
    scores: np.ndarray
    threshold: float
    is_anomalous: np.ndarray
    maps: np.ndarray
    sources: list[str | None] = field(default_factory=list)
    patch_scores: np.ndarray | None = None
    input_sizes: list[tuple[int, int]] = field(default_factory=list)
    resize: int | None = None
    crop: int | None = None

    def __len__(self) -> int:
        return len(self.names)

    def map_at_input_size(self, i: int, out_size: tuple[int, int] | None = None) -> np.ndarray:
        """[H, W] float32: ``maps[i]`` put back onto the original image (crop border filled
        with the map's edge values, resize undone bilinearly); ``out_size`` renders it at
        another (e.g. downscaled) size of the original's frame."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"image index {i} out of range for a prediction of {len(self)} images")
        if not self.input_sizes:
            raise ValueError("this Prediction carries no input sizes; map_at_input_size is unavailable")
        return map_to_input_size(self.maps[i], self.input_sizes[i], self.resize, self.crop, out_size)

    def to_rows(self) -> list[dict]:
        return [
            {"name": n, "source": s, "score": float(sc), "is_anomalous": bool(a)}
            for n, s, sc, a in zip(self.names, self._sources(), self.scores, self.is_anomalous)
        ]

    def _sources(self) -> list[str | None]:
        return self.sources if self.sources else [None] * len(self.names)


@dataclass
class TrainingReport:
    """Per training image: how contaminated it looks (docs/ALGORITHM.md section 3, per image).

    Attributes:
        names, sources: the training images, in training order.
        scores: [N] float32 contamination score: the mean of the image's top 5 % patch
            outlier scores, each divided by its discriminator's median (a typical patch
            scores 1).
        flagged: [N] bool, likely defective: ``score > threshold``.
        threshold: ``median + 3 * 1.4826 * MAD`` of the scores, the MAD floored (robust:
            a minority of defective images does not move it, and images that all score
            alike are not flagged).
        removed_fraction: [N] float32 fraction of the image's patches excluded from the
            memory bank (0 for PatchCore).
        evidence: with leave-out support (SoftPatch / SoftPatch+ defaults), what the score
            combines, per image and relative to a typical image (1): "discriminators" (the
            patch discriminators' score above) and "leave_out" (the image scored against a
            bank of the other images); ``scores`` is then their mean and ``threshold`` the
            split of :func:`softpatch_cuda.denoise.support.split_limit`.
    """

    names: list[str]
    sources: list[str | None]
    scores: np.ndarray
    flagged: np.ndarray
    threshold: float
    removed_fraction: np.ndarray | None = None
    evidence: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def expanded(self, names: list[str], sources: list[str | None], original_of) -> "TrainingReport":
        """The report of the distinct images spread over every training image: image i
        gets the row of its original ``original_of[i]`` (exact duplicates)."""
        idx = np.asarray(original_of, dtype=np.int64)
        if len(idx) == len(self.names) and np.array_equal(idx, np.arange(len(idx))):
            return self
        removed = None if self.removed_fraction is None else np.asarray(self.removed_fraction)[idx]
        return TrainingReport(list(names), list(sources), np.asarray(self.scores)[idx], np.asarray(self.flagged)[idx],
                              self.threshold, removed, {k: np.asarray(v)[idx] for k, v in self.evidence.items()})

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` most contaminated-looking images, highest score first."""
        order = np.argsort(-np.nan_to_num(self.scores, nan=-np.inf), kind="stable")[:n]
        return [(self.names[i], float(self.scores[i])) for i in order]

    def to_rows(self) -> list[dict]:
        """The report's one table, most suspicious first: rank, name (the path below the
        folder all images share where file names repeat), source, contamination score,
        flagged, removed fraction and, with leave-out support, the evidence columns."""
        scores = np.asarray(self.scores, dtype=np.float64)
        sources = list(self.sources) if self.sources else [None] * len(self.names)
        names = distinct_names(list(self.names), sources)
        removed = np.zeros(len(scores)) if self.removed_fraction is None else np.asarray(self.removed_fraction)
        rows = []
        for rank, i in enumerate(np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")):
            row = {"rank": rank + 1, "name": names[i], "source": sources[i], "contamination_score": float(scores[i]),
                   "flagged": bool(self.flagged[i]), "removed_fraction": float(removed[i])}
            row.update({f"{key}_evidence": float(values[i]) for key, values in self.evidence.items()})
            rows.append(row)
        return rows

    def __str__(self) -> str:
        from .report import format_training_report  # noqa: PLC0415 -- the one table of this report

        return f"TrainingReport: {format_training_report(self, top=len(self))}"


def distinct_names(names: list[str], sources: list[str | None]) -> list[str]:
    """File names repeat across folders (train/good/001.png, test/dent/001.png): then show
    each file's path relative to the folder all of them share."""
    if len(set(names)) == len(names) or not sources or any(s is None for s in sources):
        return names
    try:
        common = os.path.commonpath([os.path.abspath(s) for s in sources])
    except ValueError:  # different drives
        return names
    if os.path.isfile(common):
        common = os.path.dirname(common)
    return [Path(os.path.relpath(os.path.abspath(s), common)).as_posix() for s in sources]
