"""The calibrate phase: an unsupervised decision threshold on image scores.

Up to ``CALIBRATION_IMAGES`` training images that the training report does not flag
are scored against the classification bank *without their own patches* (as if they
were unseen test images); the threshold is ``median + 3 * 1.4826 * MAD`` of those
scores. Training images scored against a bank holding their own patches would score
~0, far below unseen normal images.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .._validation import robust_limit
from ..memory_bank import MemoryBank

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 16
CALIBRATION_GROUP = 4  # images scored per leave-out k-NN call
THRESHOLD_MAD_FACTOR = 3.0


def leave_out_scores(embeddings: torch.Tensor, bank: MemoryBank, images: np.ndarray, image_score: str,
                     group: int, image_ids: np.ndarray | None = None) -> np.ndarray:
    """Image scores of ``images`` (indices into embeddings [N, h, w, D]), each group
    scored against the bank without that group's own patches (``image_ids``: the
    bank's image id of each embedding row, default its index)."""
    scores = []
    for s in range(0, images.size, group):
        rows = torch.as_tensor(images[s : s + group], device=embeddings.device)
        ids = rows if image_ids is None else torch.as_tensor(image_ids[images[s : s + group]], device=embeddings.device)
        queries = embeddings[rows].reshape(-1, embeddings.shape[-1])
        sub = bank.without_images(ids)
        patch, nearest = sub.score(queries, return_index=True)
        scores.append(sub.image_scores(queries, patch.reshape(rows.numel(), -1), nearest, image_score).cpu())
    return torch.cat(scores).numpy().astype(np.float32)


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


def calibrate_threshold(embeddings: torch.Tensor, bank: MemoryBank, flagged: np.ndarray, seed: int,
                        image_score: str = "max", image_ids: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(threshold, the calibration images' scores) from ``embeddings`` [N, h, w, D] of
    N >= 2 training images (``image_ids``: their ids in the bank, default 0..N-1)."""
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError("threshold calibration needs at least 2 training images")
    chosen = choose_calibration_images(flagged, seed)
    calib = leave_out_scores(embeddings, bank, chosen, image_score, calibration_group(n), image_ids)
    return threshold_from_scores(calib), calib
