"""Sharded fit: the training images in shards, one memory bank, bounded memory.

One path serves two uses: the bounded-memory fit on one machine (shards run one after
another in this process, :func:`fit_sharded` with ``max_memory``) and the distributed
fit (shards run on Ray actors, :func:`softpatch_cuda.scale.distributed.fit_distributed`).
Both are the fit phases of :mod:`softpatch_cuda.models.phases` -- the same ones a
single-process fit runs -- with a runner that maps shards to workers.

Per shard (:func:`run_shard`, a training set in its own right): embed its images
(``model.embed``), then ``phases.fit_shard``: the noise discriminators compare the shard's
images with each other, so a shard needs at least ``DiscriminatorSettings.min_images()``
images; the projection is the model's seeded random projection, the same matrix in
every shard; each bank keeps a greedy k-center coreset of the shard's kept patches,
``oversample`` times the shard's share of the final bank (:class:`CoresetPlan`). The
shard's patch features are dropped when it returns.

Then ``phases.finish``: the merge concatenates the shards' coresets and runs a second
greedy k-center pass (``CoresetPlan.reduce``) on the union down to the bank size a
single-process fit would have (``ceil(coreset_ratio x kept patches)``), flags training
images on the union of the shards' contamination scores, and calibrates the threshold on
up to 16 unflagged training images, embedded again (16 images instead of keeping every
embedding). The result is an ordinary fitted detector: save / load / predict unchanged.

Composable coreset guarantee (greedy k-center, Gonzalez 1985: radius <= 2 OPT). Let r_s be
shard s's greedy covering radius and r_U the second pass's radius over the union U. Every
kept patch x of shard s is within r_s of U and every point of U within r_U of the bank, so
x is within r_s + r_U of the bank. r_U <= 2 OPT_m(U) <= 2 OPT_m(X) (U is a subset of all
patches X), and when a shard keeps at least m centres r_s <= 2 OPT_m(X_s) <= 2 OPT_m(X):
the two-round bank is a 4-approximation of the optimal m-centre radius where one greedy
pass over all patches is a 2-approximation -- the guarantee degrades by a factor of 2
(Malkomes et al., NeurIPS 2015, prove the same bound for this two-round scheme). With the
default ``oversample`` a shard keeps fewer than m centres; its term is then bounded by
its own greedy radius, 2 OPT_{k_s}(X_s), exactly the guarantee the single-process fit
already gives each of its ``coreset_shard_patches`` shards. A single shard skips the
second pass and gives the single-process fit's bank, row for row.

What differs from a single-process fit: the discriminators compare an image with the
images of its shard only (the noise statistics are per shard; so are ``alignment="auto"``'s
choice and the soft-weight scale), and exact duplicates are found across shards by their
pixel digests, after the shards were denoised (a duplicate pair split over two shards is
denoised twice, then enters the bank once).
"""


from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .._interop import is_tensor
from .._pixels import image_paths
from ..models import phases
from .memory_plan import (
    DEFAULT_OVERSAMPLE, _gib, discriminator_minimum, parse_memory, plan_memory, release_free_memory,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ inputs
def image_list(images: Any) -> list:
    """The training images as a list that can be split into shards: a folder, image
    paths, PIL images, uint8 / float arrays (one per image, or one [N, ...] array)."""
    if isinstance(images, (str, os.PathLike)):
        return image_paths(images)
    if isinstance(images, np.ndarray) or is_tensor(images):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: empty list")
        return list(images)
    raise TypeError(f"a sharded fit needs images it can split into shards (a folder, a list of paths or images, "
                    f"an [N, ...] array), got {type(images).__name__}")



def shard_bounds(n_images: int, n_shards: int) -> list[tuple[int, int]]:
    """``n_shards`` contiguous ranges of images, sizes differing by at most one."""
    bounds = [round(i * n_images / n_shards) for i in range(n_shards + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def plan_shards(n_images: int, min_images: int, shards: int | None = None, shard_size: int | None = None,
                what: str = "") -> list[tuple[int, int]]:
    """Balanced shards of whole images: ``shards`` of them, or as few as keep each at most
    ``shard_size`` images (neither: one). Refuses shards smaller than ``min_images``."""
    if shards is not None and shard_size is not None:
        raise ValueError("give either shards or shard_size, not both")
    for name, value in (("shards", shards), ("shard_size", shard_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if shards is not None:
        n_shards = int(shards)
    elif shard_size is not None:
        n_shards = -(-n_images // int(shard_size))
    else:
        n_shards = 1
    if n_shards > n_images:
        raise ValueError(f"{n_shards} shards for {n_images} training images: a shard needs at least one image")
    bounds = shard_bounds(n_images, n_shards)
    smallest = min(b - a for a, b in bounds)
    if n_shards > 1 and smallest < min_images:
        raise ValueError(f"shards of {smallest} images are too small: the noise discriminators{what} need at least "
                         f"{min_images} images per shard (at most {max(1, n_images // min_images)} shard(s) for "
                         f"{n_images} images); use fewer shards or larger ones")
    return bounds



# ------------------------------------------------------------------ shards
@dataclass
class ShardJob:
    """One shard to fit: where it lies in the training set, and its images (paths or in-memory images)."""

    shard: phases.Shard
    images: list


def run_shard(model: Any, job: ShardJob) -> phases.ShardResult:
    """Embed one shard with ``model``'s backbone, then the fit phases on it."""
    shard = job.shard
    t0 = time.perf_counter()
    label = f"features (shard {shard.index + 1}/{shard.count})" if shard.count > 1 else "features (fit)"
    embedded = model.embed(job.images, desc=label)
    features_s = time.perf_counter() - t0
    return phases.fit_shard(embedded, model.fit_settings(), shard, timings={"features_s": features_s})


def local_runner(model: Any, jobs: Sequence[ShardJob]) -> Iterator[phases.ShardResult]:
    """Run the shards one after another in this process: one shard's patch features
    in memory at a time."""
    for job in jobs:
        result = run_shard(model, job)
        release_free_memory()
        yield result


# ------------------------------------------------------------------ entry point
Runner = Callable[[Any, Sequence[ShardJob]], Iterable[phases.ShardResult]]


def fit_sharded(model: Any, images: Any, *, shards: int | None = None, shard_size: int | None = None,
                max_memory: int | str | None = None, oversample: float = DEFAULT_OVERSAMPLE,
                runner: Runner | None = None) -> Any:
    """Fit ``model`` (an unfitted or fitted PatchCore / SoftPatch / SoftPatchPlus) shard by shard.

    Args:
        images: a folder, a list of image paths or in-memory images (anything that can
            be split into shards; see :func:`image_list`).
        shards / shard_size: how many shards, or the most images per shard (balanced).
        max_memory: a resident-memory budget for the whole fit ("8G", "512M" or bytes):
            the shard size is chosen to keep within it, and a budget that cannot be met
            is refused before any training image is embedded. Excludes shards/shard_size.
        oversample: each shard keeps this many times its share of the bank for the
            merge's second greedy pass (ignored with one shard).
        runner: runs the shards (default: one after another in this process;
            :mod:`softpatch_cuda.scale.distributed` passes a Ray runner).

    Returns the model, fitted; ``model.fit_info_["sharding"]`` (and ``["memory_plan"]``)
    say how it was split.
    """
    items = image_list(images)
    if isinstance(oversample, bool) or not isinstance(oversample, (int, float)) or not oversample >= 1.0:
        raise ValueError(f"oversample must be a number >= 1, got {oversample!r}")
    t_start = time.perf_counter()
    plan = None
    if max_memory is not None:
        if shards is not None or shard_size is not None:
            raise ValueError("max_memory chooses the shard size: give max_memory, or shards / shard_size, not both")
        plan = plan_memory(model, items, parse_memory(max_memory), oversample)
        shard_size = plan.shard_size
        logger.info("max_memory %s: shards of at most %d images (%s)", _gib(plan.budget), shard_size, plan.to_dict())
    min_images, who = discriminator_minimum(model)
    bounds = plan_shards(len(items), min_images, shards, shard_size, who)
    jobs = [ShardJob(phases.Shard(i, len(bounds), a, float(oversample)), items[a:b]) for i, (a, b) in enumerate(bounds)]
    settings = model.fit_settings()
    results = (runner or local_runner)(model, jobs)

    def embed_again(ids: np.ndarray) -> Any:  # the calibration images: 16 at most
        return model.embed([items[i] for i in ids], desc="features (calibration)").embeddings

    state = phases.finish(results, settings, device=model.device, backbone_spec=model.embedder.extractor.spec(),
                          embed=embed_again, n_images=len(items), sharding={"oversample": float(oversample)})
    state.fit_info["timings"]["total_s"] = time.perf_counter() - t_start
    if plan is not None:
        state.fit_info["memory_plan"] = plan.to_dict()
    return model.set_state(state)
