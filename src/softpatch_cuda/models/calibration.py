"""The calibrate phase: an unsupervised decision threshold on image scores.

Up to ``CALIBRATION_IMAGES`` training images that the training report does not flag
are scored against the classification bank *without their own patches* (as if they
were unseen test images); the threshold is ``median + 3 * 1.4826 * MAD`` of those
scores. Training images scored against a bank holding their own patches would score
~0, far below unseen normal images.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from array_api_compat import device

from .._interop import to_numpy
from .._validation import robust_limit
from ..memory_bank import MemoryBank
from ..scoring import image_scores, namespace

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 16
CALIBRATION_GROUP = 4  # images scored per leave-out k-NN call
THRESHOLD_MAD_FACTOR = 3.0


def leave_out_scores(embeddings: Any, bank: MemoryBank, images: np.ndarray, image_score: str,
                     group: int, image_ids: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(image scores [k], their lowest patch score) of ``images`` (indices into embeddings
    [N, h, w, D]), each group scored against the bank without that group's own patches
    (``image_ids``: the bank's image id of each embedding row, default its index)."""
    xp = namespace(embeddings)
    ids_of = np.arange(embeddings.shape[0]) if image_ids is None else np.asarray(image_ids)
    scores, floor = [], np.inf
    for s in range(0, images.size, group):
        rows = images[s : s + group]
        queries = xp.reshape(embeddings[xp.asarray(rows, device=device(embeddings))], (-1, embeddings.shape[-1]))
        sub = bank.without_images(ids_of[rows])
        patch, nearest = sub.score(queries)
        patch = xp.reshape(patch, (rows.size, -1))
        scores.append(to_numpy(image_scores(patch, image_score, bank=sub, queries=queries, nearest=nearest)))
        floor = min(floor, float(xp.min(patch)))
    return np.concatenate(scores).astype(np.float32), floor


def choose_calibration_images(flagged: np.ndarray, seed: int) -> np.ndarray:
    """Sorted indices of the calibration images: up to CALIBRATION_IMAGES images the
    training report does not flag (any images when fewer than 2 are unflagged), seeded."""
    flagged = np.asarray(flagged, dtype=bool)
    candidates = np.flatnonzero(~flagged)
    if candidates.size < 2:
        candidates = np.arange(flagged.size)
    rng = np.random.default_rng(seed + 17)
    return np.sort(rng.choice(candidates, size=min(CALIBRATION_IMAGES, candidates.size), replace=False))


def calibration_group(n_images: int) -> int:
    """Images left out together per k-NN call; with very few training images a group
    would exclude most of the bank, so they are scored one at a time."""
    return CALIBRATION_GROUP if n_images >= 4 * CALIBRATION_GROUP else 1


def threshold_from_scores(calib: np.ndarray) -> float:
    """The threshold from the calibration images' scores (their maximum below 3 scores)."""
    if calib.size < 3:
        return float(calib.max())
    return robust_limit(calib, THRESHOLD_MAD_FACTOR)
