"""The post-k-NN scoring core (docs/ALGORITHM.md section 5): a memory bank's nearest
rows -> patch scores -> image scores and anomaly maps, and maps back onto the input image.

One implementation for every path that scores images: the torch detector's predict and
its threshold calibration (tensors, on their device) and the torch-free predictor
(numpy arrays). It is written against the array API standard (``array_api_compat``), so
each path computes in its own framework, on its device and in its thread pool; a batch's
results reach the host once, at the end (:func:`score_batch`).

* patch score: the distance to the nearest bank row ("l2", or "squared_l2" as the
  authors' code), times that row's soft weight; with leave-out support
  (:mod:`softpatch_cuda.denoise.support`) the smallest weight x max(distance, support)
  over the bank;
* image score: the largest patch score ("max"), or PatchCore's eq. 7 ("reweighted": the
  largest patch score times 1 - softmax of its distances to the matched row's
  ``REWEIGHT_NEIGHBOURS`` nearest bank rows, so a match in a sparse part of the bank
  counts more);
* map: the h x w grid bilinearly upsampled to the model's input size (align_corners=False)
  and smoothed with a Gaussian (sigma = 4 pixels, truncated at 4 sigma, reflected borders:
  scipy.ndimage.gaussian_filter's defaults, which the reference code uses). Both steps are
  linear and separable, so per axis they are one S x h matrix (blur @ upsample) and a batch
  of maps is two small matrix products, M_y @ P @ M_x^T (16 maps 28 -> 224 on 2 CPU cores:
  0.6 ms; bilinear interpolation + two 33-tap convolutions took 84 ms).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import array_api_compat
import numpy as np

from . import ops
from ._interop import to_numpy
from ._pixels import SeenImages, linear_weights
from .results import Prediction

DISTANCES: tuple[str, ...] = ("l2", "squared_l2")
IMAGE_SCORES: tuple[str, ...] = ("max", "reweighted")
REWEIGHT_NEIGHBOURS = 9
MAP_SIGMA = 4.0


def namespace(*arrays: Any) -> Any:
    """The array API namespace of ``arrays`` (numpy or torch)."""
    return array_api_compat.array_namespace(*arrays)


# ------------------------------------------------------------------ patch and image scores
def patch_scores(distances: Any, nearest: Any, weights: Any, distance: str = "l2") -> Any:
    """Distances to bank rows and those rows' indices (same shape: [q], or [q, c] for
    several rows per query) -> patch scores: the distance (squared for ``"squared_l2"``)
    times the row's soft weight. With leave-out support the distances given here are
    already max(distance, support) (:meth:`MemoryBank.score`)."""
    d = distances * distances if distance == "squared_l2" else distances
    return d if weights is None else d * weights[nearest]


def image_scores(patch: Any, mode: str = "max", *, bank: Any = None, queries: Any = None,
                 nearest: Any = None) -> Any:
    """[B, P] patch scores -> [B] image scores (see IMAGE_SCORES).

    "reweighted" also needs the ``bank`` scored against, the ``queries`` [B*P, D] that
    were scored and the bank row each one matched (``nearest`` [B*P])."""
    xp = namespace(patch)
    top = xp.max(patch, axis=1)
    if mode == "max":
        return top
    b, p = patch.shape
    rows = xp.arange(b, device=array_api_compat.device(patch)) * p + xp.argmax(patch, axis=1)
    matched = nearest[rows]
    k = min(REWEIGHT_NEIGHBOURS, int(bank.features.shape[0]))
    support = ops.knn(bank.features[matched], bank.features, k, check_finite=False).indices  # includes the match
    dist = xp.linalg.vector_norm(queries[rows][:, None, :] - bank.features[support], axis=2)  # [B, k]
    e = xp.exp(dist - xp.max(dist, axis=1, keepdims=True))
    return (1.0 - e[:, 0] / xp.sum(e, axis=1)) * top


# ------------------------------------------------------------------ maps
def gaussian_taps(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1-D Gaussian taps, radius int(truncate * sigma + 0.5) (scipy's rule)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return taps / taps.sum()


@functools.lru_cache(maxsize=64)
def map_operator(n_in: int, n_out: int, sigma: float = MAP_SIGMA) -> np.ndarray:
    """[n_out, n_in] float32: one axis of a map, bilinear upsample then Gaussian blur with
    scipy's 'reflect' border (d c b a | a b c d, repeated when the radius exceeds n_out)."""
    i0, i1, w0, w1 = linear_weights(n_in, n_out)
    up = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(up, (np.arange(n_out), i0), w0.astype(np.float64))
    np.add.at(up, (np.arange(n_out), i1), w1.astype(np.float64))
    if sigma <= 0:
        return up.astype(np.float32)
    taps = gaussian_taps(sigma)
    radius = (taps.size - 1) // 2
    source = np.remainder(np.arange(n_out)[:, None] + np.arange(-radius, radius + 1)[None, :], 2 * n_out)
    source = np.where(source >= n_out, 2 * n_out - 1 - source, source)  # [n_out, taps]
    blur = np.zeros((n_out, n_out), dtype=np.float64)
    np.add.at(blur, (np.repeat(np.arange(n_out), taps.size), source.reshape(-1)), np.tile(taps, n_out))
    return (blur @ up).astype(np.float32)


def anomaly_maps(patch: Any, size: tuple[int, int], sigma: float = MAP_SIGMA) -> Any:
    """[B, h, w] patch scores -> [B, H, W] anomaly maps at the model's input size."""
    xp = namespace(patch)
    dev = array_api_compat.device(patch)
    rows = xp.asarray(map_operator(int(patch.shape[1]), int(size[0]), float(sigma)), device=dev)
    cols = xp.asarray(map_operator(int(patch.shape[2]), int(size[1]), float(sigma)).T.copy(), device=dev)
    return xp.matmul(xp.matmul(rows, patch), cols)


# ------------------------------------------------------------------ a batch
@dataclass
class BatchScores:
    """One batch scored, on the host: image scores [B] and, with maps, the patch scores
    [B, h, w] the maps are made of and the maps [B, S, S] (float32)."""

    scores: np.ndarray
    patch_scores: np.ndarray | None = None
    maps: np.ndarray | None = None


def score_batch(banks: dict[str, Any], embeddings: Any, image_score: str = "max",
                map_size: tuple[int, int] | None = None, timings: dict[str, float] | None = None) -> BatchScores:
    """Score patch embeddings [B, h, w, D] against the classification bank (image scores)
    and, with ``map_size``, the segmentation bank (maps; the classification bank when
    there is none). ``timings`` (seconds) gains "knn_s" and "maps_s"."""
    b, h, w, dim = embeddings.shape
    cls = banks["cls"]
    if dim != cls.features.shape[1]:
        raise ValueError(f"feature dimension {dim} does not match the memory bank ({cls.features.shape[1]})")
    t0 = time.perf_counter()
    xp = namespace(embeddings)
    flat = xp.reshape(embeddings, (b * h * w, dim))
    patch, nearest = cls.score(flat)
    scores = image_scores(xp.reshape(patch, (b, h * w)), image_score, bank=cls, queries=flat, nearest=nearest)
    if map_size is None:
        out = BatchScores(to_numpy(scores).astype(np.float32, copy=False))
        _add(timings, "knn_s", time.perf_counter() - t0)
        return out
    seg = patch if banks.get("seg") is None else banks["seg"].score(flat)[0]
    seg = xp.reshape(seg, (b, h, w))
    t1 = time.perf_counter()
    maps = anomaly_maps(seg, map_size)
    out = BatchScores(*(to_numpy(a).astype(np.float32, copy=False) for a in (scores, seg, maps)))
    _add(timings, "knn_s", t1 - t0)
    _add(timings, "maps_s", time.perf_counter() - t1)
    return out


def _add(timings: dict[str, float] | None, key: str, seconds: float) -> None:
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + seconds



# ------------------------------------------------------------------ a run of batches
def prediction(names: list[str], sources: list[str | None], sizes: list[tuple[int, int]], parts: list[BatchScores],
               threshold: float, resize: int | None, crop: int | None) -> Prediction:
    """Scored batches -> one :class:`Prediction`; the verdicts are decided here, once."""
    scores = np.concatenate([p.scores for p in parts]).astype(np.float32, copy=False)
    with_maps = bool(parts) and parts[0].maps is not None
    maps = np.concatenate([p.maps for p in parts]) if with_maps else np.zeros((len(names), 0, 0), dtype=np.float32)
    patch = np.concatenate([p.patch_scores for p in parts]) if with_maps else None
    return Prediction(names=list(names), scores=scores, threshold=float(threshold), is_anomalous=scores > threshold,
                      maps=maps, sources=list(sources), patch_scores=patch, input_sizes=list(sizes), resize=resize,
                      crop=crop)


def predict_batches(batches: Iterator[Any], embed: Callable[[Any], Any], banks: dict[str, Any], *, image_score: str,
                    threshold: float, resize: int | None, crop: int | None, with_maps: bool = True,
                    total: int | None = None, progress: bool = False,
                    timings: dict[str, float] | None = None) -> Prediction:
    """The predict loop of the torch detector and the torch-free predictor alike: each
    batch of transformed images (``_pixels.ImageBatch``) is embedded (``embed``: the
    backbone, or an exported graph) and scored (:func:`score_batch`). ``timings`` gets
    where the time went: load_s, features_s, knn_s, maps_s."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    timings = {} if timings is None else timings
    timings.update(load_s=0.0, features_s=0.0, knn_s=0.0, maps_s=0.0)
    seen = SeenImages()
    parts: list[BatchScores] = []
    with tqdm(total=total, desc="predict", unit="img", disable=not progress) as bar:
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            timings["load_s"] += time.perf_counter() - t0
            if batch is None:
                break
            t0 = time.perf_counter()
            embeddings = embed(batch.pixels)
            timings["features_s"] += time.perf_counter() - t0
            size = tuple(int(v) for v in batch.pixels.shape[-2:]) if with_maps else None
            parts.append(score_batch(banks, embeddings, image_score, size, timings))
            seen.add(batch)
            bar.update(len(batch))
    seen.check_some()
    return prediction(seen.names, seen.sources, seen.sizes, parts, threshold, resize, crop)
