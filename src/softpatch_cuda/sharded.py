"""Sharded fit: the training images in shards, one memory bank, bounded memory.

One path serves two uses: the bounded-memory fit on one machine (shards run one after
another in this process, :func:`fit_sharded` with ``max_memory``) and the distributed
fit (shards run as Ray actor tasks, :func:`softpatch_cuda.distributed.fit_distributed`).

Per shard (:func:`run_shard`, a training set in its own right):

1. embed its images (``model.embed``);
2. denoise: the noise discriminators compare the shard's images with each other
   (``denoise.score_patches`` + ``denoise.plan_banks``), so a shard needs at least
   ``DiscriminatorSettings.min_images()`` images; the projection is the model's seeded
   random projection, the same matrix in every shard;
3. select a greedy k-center coreset of the shard's kept patches (``memory_bank.select_coreset``),
   ``oversample`` times the shard's share of the final bank;
4. return the selected rows (full embeddings, projections, soft weights, training image
   ids) and the shard's training-report rows. The shard's patch features are dropped here.

The driver (:func:`merge_shards`) concatenates the shards' coresets and runs a second
greedy k-center pass (``ops.kcenter_greedy_approx``) on the union down to the bank size a
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
import math
import os
import re
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import ops
from ._validation import robust_limit
from .denoise import plan_banks, score_patches, weight_stats
from .denoise.policy import REPORT_MAD_FACTOR, REPORT_SCALE_FLOOR
from .embedding import random_projection
from .memory_bank import MemoryBank, coreset_size, select_coreset
from .results import TrainingReport

logger = logging.getLogger(__name__)

DEFAULT_OVERSAMPLE = 2.0
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


# ------------------------------------------------------------------ inputs
def parse_memory(value: Any) -> int:
    """Bytes from an int or a string such as "4G", "512M", "2.5GiB" (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"max_memory must be a size such as 4G or 512M, got {value!r}")
    if isinstance(value, (int, np.integer)):
        if value <= 0:
            raise ValueError(f"max_memory must be positive, got {value}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).upper() in _UNITS:
            size = float(m.group(1)) * _UNITS[m.group(2).upper()]
            if size > 0:
                return int(size)
    raise ValueError(f"max_memory must be a size such as 4G, 512M or a number of bytes, got {value!r}")


def image_list(images: Any) -> list:
    """The training images as a list that can be split into shards: a folder, image
    paths, PIL images, uint8 / float arrays (one per image, or one [N, ...] array)."""
    from .data.images import list_images  # noqa: PLC0415

    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if not path.exists():
            raise FileNotFoundError(f"image path not found: {path}")
        return list_images(path) if path.is_dir() else [str(path)]
    if isinstance(images, (np.ndarray, torch.Tensor)):
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


def discriminator_minimum(model: Any) -> tuple[int, str]:
    """(fewest images per shard, a description of who needs them) for ``model``'s discriminators."""
    settings = model.settings.discriminator_settings()
    return settings.min_images(), f" {list(settings.methods)} (lof_k={settings.lof_k})"


# ------------------------------------------------------------------ per shard
@dataclass
class ShardSpec:
    """One shard: its images (paths or in-memory images) and the training-set index of its first image."""

    index: int
    count: int  # number of shards
    first_image: int
    images: list
    oversample: float = DEFAULT_OVERSAMPLE


@dataclass
class BankPart:
    """A shard's coreset of one bank (numpy, CPU): rows of the selected patches."""

    features: np.ndarray  # [k, D] float32
    projected: np.ndarray  # [k, d] float32
    weights: np.ndarray | None  # [k] float32
    image_ids: np.ndarray  # [k] int64, index of the training image in the whole training set
    kept_counts: np.ndarray  # [n] int64 patches each of the shard's distinct images kept after denoising
    kept_images: np.ndarray  # [n] int64 their training-set indices

    @property
    def kept(self) -> int:
        """Patches this bank kept in the shard: sets the final bank size (ceil(ratio x kept))."""
        return int(self.kept_counts.sum())


@dataclass
class ShardResult:
    index: int
    first_image: int
    n_images: int
    names: list[str]
    sources: list[str | None]
    digests: list[str]
    distinct: list[int]  # shard-local indices of the first occurrence of each distinct image
    original_of: np.ndarray  # [n_images] position of each image's original in ``distinct``
    scores: np.ndarray  # [len(distinct)] contamination scores (NaN: no discriminator ran)
    removed_fraction: np.ndarray  # [len(distinct)]
    banks: dict[str, BankPart]
    grid: tuple[int, int]
    embed_dim: int
    alignment: str | None
    alignment_statistic: float | None
    fingerprint: str | None
    timings: dict[str, float] = field(default_factory=dict)


_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fingerprint(extractor: Any) -> str:
    """The backbone weights' fingerprint, hashed once per backbone (it reads every weight)."""
    if extractor not in _FINGERPRINTS:
        _FINGERPRINTS[extractor] = extractor.fingerprint()
    return _FINGERPRINTS[extractor]


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu").contiguous().numpy()


@torch.no_grad()
def run_shard(model: Any, spec: ShardSpec) -> ShardResult:
    """Embed, denoise and coreset one shard with ``model``'s backbone and settings."""
    from .models.detector import distinct_images  # noqa: PLC0415

    cfg = model.settings
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    label = f"features (shard {spec.index + 1}/{spec.count})" if spec.count > 1 else "features (fit)"
    embedded = model.embed(spec.images, desc=label)
    timings["features_s"] = time.perf_counter() - t0
    n_all, h, w, dim = embedded.embeddings.shape
    model._check_grid(h, w)
    distinct, original_of = distinct_images(embedded)
    emb = embedded.embeddings[distinct] if len(distinct) < n_all else embedded.embeddings
    names, sources, digests = embedded.names, embedded.sources, embedded.digests
    del embedded  # ``emb`` is the shard's one full copy of its patch features from here on
    n = emb.shape[0]
    settings = cfg.discriminator_settings()
    if spec.count > 1 and n < settings.min_images():
        raise ValueError(f"shard {spec.index + 1} of {spec.count} has {n} distinct images; the noise discriminators "
                         f"{list(settings.methods)} (lof_k={settings.lof_k}) need at least {settings.min_images()} "
                         "per shard: use fewer, larger shards")
    device = emb.device
    projection = random_projection(dim, cfg.proj_dim, seed=cfg.seed, device=device)
    flat = emb.reshape(n * h * w, dim)
    proj = (flat @ projection).contiguous()

    t0 = time.perf_counter()
    scores = score_patches(proj.reshape(n, h, w, -1), settings, seed=cfg.seed, progress=model.progress)
    alignment, alignment_statistic = scores.alignment, scores.alignment_statistic
    denoised = None
    if scores.raw:
        per_position = getattr(cfg, "rank_scope", "global") == "position" and alignment == "position"
        denoised = plan_banks(scores.raw, cfg.denoise_spec(), per_position=per_position)
    del scores
    timings["denoise_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    image_index = (torch.as_tensor(distinct, device=device) + spec.first_image).repeat_interleave(h * w)
    parts: dict[str, BankPart] = {}
    for bank in cfg.denoise_spec().banks:
        if denoised is None:
            kept, weights = torch.ones(n * h * w, dtype=torch.bool, device=device), None
        else:
            kept, weights = denoised.kept[bank.name], denoised.weights[bank.name]
        n_kept = int(kept.sum())
        if n_kept == 0:
            raise ValueError(f"shard {spec.index + 1}: no training patch is left after denoising; "
                             "lower the noise threshold")
        # one shard: the single-process fit's coreset (same ratio, seed and sub-shards);
        # several: each keeps ``oversample`` times its share for the driver's second pass
        ratio = cfg.coreset_ratio if spec.count == 1 else min(1.0, spec.oversample * cfg.coreset_ratio)
        seed = cfg.seed if spec.count == 1 else cfg.seed + 7919 * (spec.index + 1)
        if ratio >= 1.0:
            selected = torch.nonzero(kept).flatten()
        else:
            selected = select_coreset(proj, kept, ratio, seed, cfg.coreset_shard_patches, h * w)
        parts[bank.name] = BankPart(
            _numpy(flat[selected]), _numpy(proj[selected]),
            None if weights is None else _numpy(weights[selected].to(torch.float32)),
            _numpy(image_index[selected]), _numpy(kept.reshape(n, h * w).sum(dim=1).to(torch.int64)),
            np.asarray(distinct, dtype=np.int64) + spec.first_image)
    timings["coreset_s"] = time.perf_counter() - t0
    if denoised is None:
        report_scores = np.full(n, np.nan, dtype=np.float32)
        removed = np.zeros(n, dtype=np.float32)
    else:
        report_scores = np.asarray(denoised.image_scores, dtype=np.float32)
        removed = np.asarray(denoised.removed_fraction, dtype=np.float32)
    return ShardResult(
        index=spec.index, first_image=spec.first_image, n_images=n_all, names=list(names), sources=list(sources),
        digests=list(digests or []), distinct=[int(i) for i in distinct], original_of=np.asarray(original_of),
        scores=report_scores, removed_fraction=removed, banks=parts, grid=(int(h), int(w)), embed_dim=int(dim),
        alignment=alignment, alignment_statistic=alignment_statistic,
        fingerprint=_fingerprint(model._extractor), timings=timings,
    )


# ------------------------------------------------------------------ the driver
def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; elsewhere nothing).
    A shard's tensors are freed when it ends, but glibc keeps much of a multi-threaded
    process's freed memory in its arenas, and the next shard's arrays may land in other
    arenas: without this, resident memory creeps up shard after shard."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def local_runner(model: Any, specs: Sequence[ShardSpec]) -> Iterator[ShardResult]:
    """Run the shards one after another in this process: one shard's patch features
    in memory at a time."""
    for spec in specs:
        result = run_shard(model, spec)
        release_free_memory()
        yield result


def _reduce_union(projected: list[np.ndarray], kept: list[int], ratio: float, seed: int,
                  group_rows: int | None) -> np.ndarray:
    """Row indices (into the parts' concatenation) of the bank: greedy k-center over the
    union of the shards' coresets, per group of consecutive shards of at most
    ``group_rows`` rows (the cost of a pass grows with rows x centres), each group
    reduced to ``ceil(ratio x the patches its shards kept)``."""
    groups: list[list[int]] = [[]]
    rows = 0
    for p, proj in enumerate(projected):
        if groups[-1] and group_rows is not None and rows + len(proj) > group_rows:
            groups.append([])
            rows = 0
        groups[-1].append(p)
        rows += len(proj)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in projected])])
    selected = []
    for g, members in enumerate(groups):
        union = np.concatenate([projected[p] for p in members]) if len(members) > 1 else projected[members[0]]
        m = coreset_size(sum(kept[p] for p in members), ratio)
        base = offsets[members[0]]
        if m >= len(union):
            selected.append(np.arange(len(union)) + base)
            continue
        idx = ops.kcenter_greedy_approx(np.ascontiguousarray(union), m, n_anchors=10, seed=seed + g, check_finite=False)
        selected.append(np.sort(np.asarray(idx, dtype=np.int64)) + base)
    return np.concatenate(selected)


def _gather(parts: list[BankPart], rows: np.ndarray, attr: str) -> np.ndarray | None:
    """Rows (indices into the parts' concatenation, ascending) of one attribute, without
    concatenating the parts first (bounded memory: the union is not copied)."""
    if getattr(parts[0], attr) is None:
        return None
    offsets = np.concatenate([[0], np.cumsum([len(p.image_ids) for p in parts])])
    out = []
    for p, part in enumerate(parts):
        lo, hi = np.searchsorted(rows, [offsets[p], offsets[p + 1]])
        if hi > lo:
            out.append(getattr(part, attr)[rows[lo:hi] - offsets[p]])
    return np.ascontiguousarray(np.concatenate(out))


@dataclass
class _Report:
    """The training report over all shards (distinct images; duplicates point to their original)."""

    distinct: list[int]  # training-set index of each distinct image
    original: np.ndarray  # [N] position of each image's original in ``distinct``
    names: list[str]
    sources: list[str | None]
    scores: np.ndarray
    removed: np.ndarray
    duplicates: set[int]  # training-set indices of images that duplicate an image of an earlier shard


def _combine_reports(results: list[ShardResult], n_images: int) -> _Report:
    distinct: list[int] = []
    original = np.empty(n_images, dtype=np.int64)
    names: list[str] = [""] * n_images
    sources: list[str | None] = [None] * n_images
    scores, removed = [], []
    position_of_digest: dict[str, int] = {}
    duplicates: set[int] = set()
    for r in results:
        position = np.empty(len(r.distinct), dtype=np.int64)  # shard-distinct -> global-distinct position
        for q, j in enumerate(r.distinct):
            g = r.first_image + j
            digest = r.digests[j] if r.digests else None
            if digest is not None and digest in position_of_digest:
                position[q] = position_of_digest[digest]
                duplicates.add(g)
                continue
            position[q] = len(distinct)
            if digest is not None:
                position_of_digest[digest] = len(distinct)
            distinct.append(g)
            scores.append(r.scores[q])
            removed.append(r.removed_fraction[q])
        for i in range(r.n_images):
            g = r.first_image + i
            original[g] = position[r.original_of[i]]
            # in-memory images are named by their place in the whole training set, as a single fit names them
            names[g] = r.names[i] if r.sources[i] is not None else f"image_{g}"
            sources[g] = r.sources[i]
    return _Report(distinct, original, names, sources, np.asarray(scores, dtype=np.float32),
                   np.asarray(removed, dtype=np.float32), duplicates)


def _flags(scores: np.ndarray) -> tuple[np.ndarray, float]:
    """Flagged images and the limit over the union of the shards' contamination scores
    (the rule of ``denoise.contamination_scores``, over all training images)."""
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return np.zeros(scores.size, dtype=bool), float("nan")
    floor = REPORT_SCALE_FLOOR * abs(float(np.median(finite)))
    limit = robust_limit(scores, REPORT_MAD_FACTOR, scale_floor=floor)
    return scores > limit, float(limit)


def merge_shards(model: Any, results: Iterable[ShardResult], images: list, oversample: float = DEFAULT_OVERSAMPLE,
                 timings: dict[str, float] | None = None) -> Any:
    """The driver: shards' coresets -> one bank per bank kind (second greedy pass),
    training report, threshold; installs them in ``model`` (which is then fitted)."""
    from .models.calibration import (  # noqa: PLC0415
        calibration_group, choose_calibration_images, leave_out_scores, threshold_from_scores,
    )
    from .runtime import resolve_device  # noqa: PLC0415

    cfg = model.settings
    timings = dict(timings or {})
    collected: list[ShardResult] = []
    for result in results:  # as they arrive (Ray: in completion order); their features are already gone
        collected.append(result)
        logger.info("shard %d done: %d images, %s", result.index + 1, result.n_images,
                    {k: round(v, 2) for k, v in result.timings.items()})
    collected.sort(key=lambda r: r.index)
    n_images = len(images)
    if sum(r.n_images for r in collected) != n_images:
        raise RuntimeError(f"the shards returned {sum(r.n_images for r in collected)} images, expected {n_images}")
    first = collected[0]
    for r in collected[1:]:
        if (r.grid, r.embed_dim, r.fingerprint) != (first.grid, first.embed_dim, first.fingerprint):
            raise ValueError(f"shard {r.index + 1} was embedded differently from shard 1 (grid {r.grid} vs "
                             f"{first.grid}, dim {r.embed_dim} vs {first.embed_dim}, backbone weights "
                             f"{(r.fingerprint or '')[:12]} vs {(first.fingerprint or '')[:12]}): every worker "
                             "must use the same backbone weights")
    (h, w), dim = first.grid, first.embed_dim
    for key in ("features_s", "denoise_s", "coreset_s"):
        timings[f"shards_{key}"] = sum(r.timings.get(key, 0.0) for r in collected)

    t0 = time.perf_counter()
    rep = _combine_reports(collected, n_images)
    flagged, limit = _flags(rep.scores)
    device = resolve_device(model._device_request) if model._device is None else model._device
    banks: dict[str, MemoryBank] = {}
    info_banks: dict[str, dict] = {}
    for bank in cfg.denoise_spec().banks:
        parts = [r.banks[bank.name] for r in collected]
        if rep.duplicates:  # rows of images that duplicate an earlier shard's image leave the union
            parts = [_drop_images(p, rep.duplicates) for p in parts]
        union_rows = sum(len(p.image_ids) for p in parts)
        if len(collected) == 1:
            rows = np.arange(union_rows)
        else:
            rows = _reduce_union([p.projected for p in parts], [p.kept for p in parts], cfg.coreset_ratio,
                                 cfg.seed, cfg.coreset_shard_patches)
        weights = _gather(parts, rows, "weights")
        banks[bank.name] = MemoryBank(
            torch.from_numpy(_gather(parts, rows, "features")).to(device),
            None if weights is None else torch.from_numpy(weights).to(device),
            torch.from_numpy(_gather(parts, rows, "image_ids")).to(device), cfg.distance)
        kept = sum(p.kept for p in parts)
        info_banks[bank.name] = {"union_rows": union_rows, "kept": kept}
    shards_info = [{"images": r.n_images, "first_image": r.first_image, "alignment": r.alignment,
                    "alignment_statistic": r.alignment_statistic,
                    "timings": {k: round(v, 3) for k, v in r.timings.items()}} for r in collected]
    alignment_votes = Counter(r.alignment for r in collected if r.alignment is not None)
    del collected[:]  # the shards' coresets: only the banks remain
    timings["merge_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n = len(rep.distinct)
    chosen = choose_calibration_images(flagged, cfg.seed)
    ids = np.asarray(rep.distinct, dtype=np.int64)[chosen]
    calib_emb = model.embed([images[i] for i in ids], desc="features (calibration)").embeddings
    calib = leave_out_scores(calib_emb, banks["cls"], np.arange(len(ids)), cfg.image_score, calibration_group(n),
                             image_ids=ids)
    threshold = threshold_from_scores(calib)
    del calib_emb
    timings["calibration_s"] = time.perf_counter() - t0

    report = TrainingReport([rep.names[i] for i in rep.distinct], [rep.sources[i] for i in rep.distinct],
                            rep.scores, flagged, limit, rep.removed)
    # "auto" alignment is chosen per shard; the model records the majority choice (each shard's is in fit_info_)
    model._alignment = alignment_votes.most_common(1)[0][0] if alignment_votes else None
    stats = [s["alignment_statistic"] for s in shards_info if s["alignment_statistic"] is not None]
    model._alignment_statistic = float(np.median(stats)) if stats else None
    model._projection = random_projection(dim, cfg.proj_dim, seed=cfg.seed, device=device)
    model._cls_bank, model._seg_bank = banks["cls"], banks.get("seg")
    model._report = report.expanded(rep.names, rep.sources, rep.original)
    model._threshold = float(threshold)
    info: dict[str, Any] = {"n_images": n_images, "n_distinct_images": n, "grid": [h, w], "embed_dim": dim,
                            "alignment": model._alignment, "alignment_statistic": model._alignment_statistic}
    for name, b in banks.items():
        removed_patches = n * h * w - info_banks[name]["kept"]
        info[f"{name}_bank_size"] = len(b)
        info[f"{name}_removed"] = int(removed_patches)
        info[f"{name}_removed_share"] = removed_patches / float(n * h * w)
        info[f"{name}_weights"] = weight_stats(b.weights)
    info["flagged_images"] = int(np.sum(model._report.flagged))
    info["calibration_scores"] = [float(s) for s in calib]
    info["timings"] = timings
    info["sharding"] = {"shards": shards_info, "oversample": oversample,
                        "union_rows": {k: v["union_rows"] for k, v in info_banks.items()},
                        "cross_shard_duplicates": len(rep.duplicates)}
    model.fit_info_ = info
    model._fitted = True
    return model


def _drop_images(part: BankPart, images: set[int]) -> BankPart:
    dropped = np.fromiter(images, dtype=np.int64)
    keep = ~np.isin(part.image_ids, dropped)
    counted = ~np.isin(part.kept_images, dropped)
    if keep.all() and counted.all():
        return part
    return BankPart(part.features[keep], part.projected[keep], None if part.weights is None else part.weights[keep],
                    part.image_ids[keep], part.kept_counts[counted], part.kept_images[counted])


# ------------------------------------------------------------------ memory budget
def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def current_rss() -> int:
    """This process's resident memory in bytes (Linux /proc; elsewhere the peak so far)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import resource  # noqa: PLC0415

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


def peak_rss_of(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """(fn(), the most resident memory the process held while it ran, in bytes), or None
    for the peak where the kernel cannot reset its high-water mark (non-Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return fn(), None
    result = fn()
    kib = _status_kib("VmHWM")
    return result, None if kib is None else kib * 1024


@dataclass
class MemoryPlan:
    """What a sharded fit needs, in bytes (see :func:`plan_memory`)."""

    budget: int
    baseline: int  # the process before the fit's data: Python, torch, the backbone
    embed_batch: int  # one embedding batch (forward pass and patch aggregation), measured
    per_image: int  # a shard's data per image: features, projections, discriminators, its coreset
    fixed: int  # a shard's data independent of its size (Gaussian covariances)
    merge_single: int  # the bank and calibration (one shard)
    merge_sharded: int  # ... plus the union of the shards' coresets (several shards)
    n_images: int
    shard_size: int
    grid: tuple[int, int]
    embed_dim: int

    def counted(self, shard_images: int, sharded: bool = True) -> int:
        """Bytes counted for a fit with shards of ``shard_images`` images."""
        merge = self.merge_sharded if sharded else self.merge_single
        return self.baseline + self.embed_batch + self.fixed + merge + shard_images * self.per_image

    def need(self, shard_images: int, sharded: bool = True) -> int:
        """The budget such a fit needs: what is counted, with SLACK of the budget kept free."""
        return int(math.ceil(self.counted(shard_images, sharded) / (1.0 - SLACK)))

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _probe_images(model: Any, images: list) -> list:
    """Blank images that the model's transform turns into model inputs of the training images' size."""
    cfg = model.settings
    side = cfg.resize or cfg.crop
    if side is not None:
        hw = (side, side)
    else:  # native size: the first training image's
        first = images[0]
        if isinstance(first, (str, os.PathLike)):
            from PIL import Image  # noqa: PLC0415

            with Image.open(first) as img:  # the header only
                hw = (img.height, img.width)
        elif hasattr(first, "size") and not hasattr(first, "shape"):
            hw = (first.size[1], first.size[0])
        else:
            shape = tuple(np.asarray(first).shape)
            hw = shape[1:3] if len(shape) == 3 and shape[0] in (1, 3) and shape[-1] not in (1, 3, 4) else shape[:2]
    return [np.full((*hw, 3), 128, dtype=np.uint8)] * cfg.batch_size


SAFETY = 1.25  # temporaries the per-image count below does not name
SLACK = 0.05  # share of the budget kept free for allocator fragmentation and thread-local caches


def plan_memory(model: Any, images: list, budget: int, oversample: float = DEFAULT_OVERSAMPLE) -> MemoryPlan:
    """The largest shard that keeps the fit within ``budget`` bytes of resident memory,
    or a ValueError naming what does not fit -- before any training image is embedded.

    Measured: the process now (after building the backbone) and the peak of embedding
    one batch of blank images of the training images' size. Counted per image of a shard
    (from the patch grid h x w, the embedding size D and the projection size d): its
    embeddings (twice while batches are joined), projections (twice: the position groups),
    each discriminator's scores and ranks, each bank's kept mask and weights and its
    coreset rows; per shard the Gaussian covariances. Counted for the whole training set:
    the union of the shards' coresets and the bank (``coreset_ratio`` of the patches,
    ``oversample`` times that in the union), and the calibration images.
    """
    cfg = model.settings
    now = current_rss()
    if budget <= now:
        raise ValueError(f"max_memory {_gib(budget)} cannot be met: this process already holds {_gib(now)}")
    probe = _probe_images(model, images)
    embedded, peak = peak_rss_of(lambda: model.embed(probe, desc="memory probe"))
    _, h, w, dim = embedded.embeddings.shape
    del embedded
    release_free_memory()
    # what stays after the first batch (the backbone, libraries' one-time state) is the
    # baseline; the batch's transient peak above it recurs with every batch
    baseline = current_rss()
    embed_batch = max(0, (peak or baseline) - baseline)
    p, d = h * w, cfg.proj_dim
    settings = cfg.discriminator_settings()
    n_methods, n_banks = len(settings.methods), len(cfg.denoise_spec().banks)
    graph = settings.alignment in ("auto", "window", "global")
    share = min(1.0, oversample * cfg.coreset_ratio)
    row = 4 * (dim + d) + 4 + 8  # a coreset row: features, projection, weight, image id
    per_image = p * (
        4 * 2 * dim  # embeddings, and the batches' copy while they are joined
        + 4 * 2 * d  # projections and their per-position groups
        + n_methods * (4 + 4 + 8 + 8)  # scores, ranks, argsort indices (fusion)
        + (12 * (settings.lof_k + 1) if graph else 0)  # neighbour graph (window / global alignment)
        + n_banks * (1 + 4 + 4 * n_methods)  # kept mask, weights and their per-discriminator parts
        + n_banks * share * row  # the shard's coreset rows
    )
    fixed = 64 * d * d * 8 * 6 if "gaussian" in settings.methods else 0  # covariances of one chunk of positions
    n = len(images)

    def merge_bytes(shards: int) -> int:
        union = 0 if shards == 1 else n_banks * share * n * p * row  # the shards' coresets
        bank = n_banks * cfg.coreset_ratio * n * p * (4 * dim + 12)
        calibration = 16 * p * dim * 4 * 2  # 16 images' embeddings and their k-NN working set
        return int(union + bank + calibration)

    per_image = int(per_image * SAFETY)
    plan = MemoryPlan(budget, baseline, embed_batch, per_image, fixed, merge_bytes(1), merge_bytes(2), n, n,
                      (h, w), dim)
    if plan.need(n, sharded=False) <= budget:
        return plan  # one shard: the single-process fit within the budget
    room = budget * (1.0 - SLACK) - plan.counted(0)
    size = int(room // per_image) if room > 0 else 0
    smallest = max(discriminator_minimum(model)[0], 1)
    if size < smallest:
        who = discriminator_minimum(model)[1]
        raise ValueError(
            f"max_memory {_gib(budget)} cannot be met: this process already holds {_gib(baseline)} (Python, torch, "
            f"the backbone), embedding a batch of {cfg.batch_size} takes {_gib(embed_batch)}, the memory bank of "
            f"{n} images needs {_gib(plan.merge_sharded)} while it is built, and the smallest shard ({smallest} "
            f"images, what the discriminators{who} need) {_gib(smallest * per_image + fixed)}: give at least "
            f"{_gib(plan.need(smallest))}, or lower coreset_ratio / batch_size")
    plan.shard_size = int(min(size, n))
    return plan


# ------------------------------------------------------------------ entry point
Runner = Callable[[Any, Sequence[ShardSpec]], Iterable[ShardResult]]


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
            driver's second greedy pass (ignored with one shard).
        runner: runs the shards (default: one after another in this process;
            :mod:`softpatch_cuda.distributed` passes a Ray runner).

    Returns the model, fitted; ``model.fit_info_["sharding"]`` (and ``["memory_plan"]``)
    say how it was split.
    """
    items = image_list(images)
    if isinstance(oversample, bool) or not isinstance(oversample, (int, float)) or not oversample >= 1.0:
        raise ValueError(f"oversample must be a number >= 1, got {oversample!r}")
    t_start = time.perf_counter()
    model._reset()
    plan = None
    if max_memory is not None:
        if shards is not None or shard_size is not None:
            raise ValueError("max_memory chooses the shard size: give max_memory, or shards / shard_size, not both")
        plan = plan_memory(model, items, parse_memory(max_memory), oversample)
        shard_size = plan.shard_size
        logger.info("max_memory %s: shards of at most %d images (%s)", _gib(plan.budget), shard_size, plan.to_dict())
    min_images, who = discriminator_minimum(model)
    bounds = plan_shards(len(items), min_images, shards, shard_size, who)
    specs = [ShardSpec(i, len(bounds), a, items[a:b], float(oversample)) for i, (a, b) in enumerate(bounds)]
    results = (runner or local_runner)(model, specs)
    merge_shards(model, results, items, float(oversample))
    model.fit_info_["timings"]["total_s"] = time.perf_counter() - t_start
    if plan is not None:
        model.fit_info_["memory_plan"] = plan.to_dict()
    return model
