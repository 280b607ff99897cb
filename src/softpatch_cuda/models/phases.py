"""The fit, as phase functions with explicit inputs; the one sequence every fit runs.

Per shard of training images (:func:`fit_shard`, after the shard was embedded):

1. :func:`prepare`  -- grid check, exact duplicates, the seeded projection;
2. :func:`denoise`  -- the discriminators' patch scores and the policy
   (:func:`softpatch_cuda.denoise.score_patches` + :func:`softpatch_cuda.denoise.plan_banks`);
3. :func:`select`   -- each bank's coreset of the kept patches (:class:`CoresetPlan`).

Then over all shards (:func:`finish`):

4. :func:`merge`     -- the shards' coresets -> one bank per kind (the only place a
   :class:`MemoryBank` is built from the config), the training report over every image;
5. :func:`calibrate` -- the threshold from training images scored without their own patches;
6. :func:`fit_info`  -- what the fit did, in numbers.

A single-process fit (:meth:`Detector.fit_embedded`) is one shard whose calibration
embeddings are already in memory; the sharded and Ray fits
(:mod:`softpatch_cuda.scale.sharded`) run :func:`fit_shard` through a runner and the
same :func:`finish`. Each phase runs under the fit's thread budget.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..denoise import DenoiseResult, plan_banks, score_patches, weight_stats
from ..denoise.policy import flag_images
from ..denoise.support import (
    BankSupport, RowSupport, find_candidates, leave_out_support, robust_z, split_limit, support_stats, supporters,
    unsupported_fill,
)
from ..embedding import EmbeddedImages, random_projection
from ..memory_bank import CoresetPlan, MemoryBank
from ..results import TrainingReport
from ..runtime import thread_budget
from .calibration import (
    CALIBRATION_GROUP, calibration_group, choose_calibration_images, leave_out_scores, threshold_from_scores,
)
from .config import PatchCoreConfig
from .state import FittedState

logger = logging.getLogger(__name__)

MIN_GRID = 3  # patches per side: below this, position-wise denoising and maps mean nothing


@dataclass(frozen=True)
class FitSettings:
    """What the phases take from a detector: its config, name, thread budget, progress
    bars and backbone (its finest stride, for the grid check's advice; its weights'
    fingerprint, so shards embedded by different workers are caught)."""

    config: PatchCoreConfig
    name: str = "Detector"
    threads: int | str = "auto"
    progress: bool = False
    stride: int = 8
    fingerprint: str | None = None


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``; its first image's index in the whole training set;
    ``oversample``: see :class:`CoresetPlan` (ignored for a single shard)."""

    index: int = 0
    count: int = 1
    first_image: int = 0
    oversample: float = 1.0


def distinct_images(embedded: EmbeddedImages) -> tuple[list[int], np.ndarray]:
    """(indices of the first occurrence of each distinct image, for every image the
    position of its original in that list). Exact duplicates by their pixel digests
    (or, without digests, their embeddings)."""
    keys = embedded.digests
    if keys is None:
        flat = embedded.embeddings.detach().to("cpu").reshape(len(embedded), -1).numpy()
        keys = [row.tobytes() for row in flat]
    position: dict = {}
    distinct: list[int] = []
    original_of = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        if key not in position:
            position[key] = len(distinct)
            distinct.append(i)
        original_of[i] = position[key]
    return distinct, original_of


def check_grid(h: int, w: int, stride: int) -> None:
    """Refuse patch grids too small for patch-level denoising and maps, naming the image size needed."""
    if min(h, w) >= MIN_GRID:
        return
    side = (MIN_GRID - 1) * stride + 1
    raise ValueError(f"the images give a {h}x{w} patch grid; at least {MIN_GRID}x{MIN_GRID} patches are needed: "
                     f"use model inputs of at least {side}x{side} pixels (resize/crop, --resize/--crop)")


# ------------------------------------------------------------------ 1. prepare
@dataclass
class Prepared:
    """A shard's training images ready for denoising: the embeddings of its distinct
    images [n, h, w, D], their projections [n*h*w, d] and training-set indices [n]; the
    names, sources and digests of all its images and, for each, its original's position."""

    embeddings: torch.Tensor
    projected: torch.Tensor
    image_ids: np.ndarray
    names: list[str]
    sources: list[str | None]
    digests: list[str] | None
    distinct: list[int]
    original_of: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.embeddings.shape[1]), int(self.embeddings.shape[2])

    @property
    def flat(self) -> torch.Tensor:
        """[n*h*w, D]: the rows a bank is made of."""
        return self.embeddings.reshape(-1, self.embeddings.shape[-1])


def prepare(embedded: EmbeddedImages, settings: FitSettings, shard: Shard = Shard()) -> Prepared:
    cfg = settings.config
    n_all, h, w, dim = embedded.embeddings.shape
    check_grid(h, w, settings.stride)
    # Exact duplicate images would sit in the bank twice and score 0 against each other
    # when left out for calibration: fit on the distinct ones; the report lists every
    # image (a duplicate gets its original's row).
    distinct, original_of = distinct_images(embedded)
    n = len(distinct)
    if shard.count == 1 and n < 2:
        raise ValueError(f"{settings.name}.fit needs at least 2 distinct training images (one is left out of the "
                         f"bank to calibrate the threshold); got {n} distinct of {n_all}")
    discriminators = cfg.discriminator_settings()
    if shard.count > 1 and n < discriminators.min_images():
        raise ValueError(f"shard {shard.index + 1} of {shard.count} has {n} distinct images; the noise discriminators "
                         f"{discriminators.describe()} need at least {discriminators.min_images()} per shard: use "
                         "fewer, larger shards")
    if n < n_all:
        logger.warning("%d of %d training images are exact duplicates of others; fitting on the %d distinct ones",
                       n_all - n, n_all, n)
    emb = embedded.embeddings[distinct] if n < n_all else embedded.embeddings
    logger.info("fit: %d images, %dx%d patches of dim %d on %s", n, h, w, dim, emb.device)
    projection = random_projection(dim, cfg.proj_dim, seed=cfg.seed, device=emb.device)
    projected = (emb.reshape(n * h * w, dim) @ projection).contiguous()
    return Prepared(emb, projected, np.asarray(distinct, dtype=np.int64) + shard.first_image, list(embedded.names),
                    list(embedded.sources), embedded.digests, distinct, original_of)


# ------------------------------------------------------------------ 2. denoise
@dataclass
class Denoised:
    """The denoise phase's decision (None when the discriminators could not run: too few
    images for PatchCore's report-only LOF) and the alignment they compared with."""

    result: DenoiseResult | None
    alignment: str | None
    alignment_statistic: float | None

    def kept(self, bank: str, rows: int, device: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([rows] bool: the patches ``bank`` keeps, [rows] their soft weights or None)."""
        if self.result is None:  # no scores: every patch stays, unweighted
            return torch.ones(rows, dtype=torch.bool, device=device), None
        return self.result.kept[bank], self.result.weights[bank]

    def report_columns(self, n: int) -> dict[str, np.ndarray]:
        """Per distinct image of the shard, the training report's columns."""
        if self.result is None:
            return {"scores": np.full(n, np.nan, dtype=np.float32), "removed_fraction": np.zeros(n, dtype=np.float32)}
        return {"scores": np.asarray(self.result.image_scores, dtype=np.float32),
                "removed_fraction": np.asarray(self.result.removed_fraction, dtype=np.float32)}


def denoise(prepared: Prepared, settings: FitSettings) -> Denoised:
    cfg = settings.config
    n = prepared.embeddings.shape[0]
    h, w = prepared.grid
    with thread_budget(settings.threads):
        scores = score_patches(prepared.projected.reshape(n, h, w, -1), cfg.discriminator_settings(), seed=cfg.seed,
                               progress=settings.progress)
        if not scores.raw:
            return Denoised(None, scores.alignment, scores.alignment_statistic)
        per_position = getattr(cfg, "rank_scope", "global") == "position" and scores.alignment == "position"
        result = plan_banks(scores.raw, cfg.denoise_spec(), per_position=per_position)
    return Denoised(result, scores.alignment, scores.alignment_statistic)


# ------------------------------------------------------------------ 3. select
@dataclass
class BankPart:
    """A shard's coreset of one bank: the chosen rows' full embeddings [k, D], projections
    [k, d], soft weights [k] (or None) and training-image ids [k]; how many patches each of
    the shard's distinct images kept [n] and those images' training-set indices [n]."""

    features: torch.Tensor
    projected: torch.Tensor
    weights: torch.Tensor | None
    image_ids: torch.Tensor
    kept_counts: torch.Tensor
    kept_images: torch.Tensor
    support: torch.Tensor | None = None  # [k] leave-out support distances (phase 3b)
    supporters: RowSupport | None = None  # [k] rows' supporting images, for the calibration

    @property
    def kept(self) -> int:
        """Patches this bank kept in the shard: the bank's size is ``CoresetPlan.size`` of their sum."""
        return int(self.kept_counts.sum())

    def to(self, device: Any) -> "BankPart":
        moved = [None if t is None else t.to(device) for t in (
            self.features, self.projected, self.weights, self.image_ids, self.kept_counts, self.kept_images,
            self.support)]
        rows = None if self.supporters is None else self.supporters.to(device)
        return BankPart(*moved, rows)

    def rows(self, keep: torch.Tensor) -> "BankPart":
        """The part's rows ``keep`` ([k] bool), the kept-patch counts unchanged."""
        pick = (lambda t: None if t is None else t[keep])
        return BankPart(self.features[keep], self.projected[keep], pick(self.weights), self.image_ids[keep],
                        self.kept_counts, self.kept_images, pick(self.support),
                        None if self.supporters is None else self.supporters.subset(keep))

    def without_images(self, images: set[int]) -> "BankPart":
        """The part without the rows and counts of these training images."""
        dropped = torch.as_tensor(sorted(images), dtype=torch.int64, device=self.image_ids.device)
        keep = ~torch.isin(self.image_ids, dropped)
        counted = ~torch.isin(self.kept_images, dropped)
        if bool(keep.all()) and bool(counted.all()):
            return self
        part = self.rows(keep)
        return dataclasses.replace(part, kept_counts=self.kept_counts[counted], kept_images=self.kept_images[counted])


def coreset_plan(cfg: PatchCoreConfig, oversample: float = 1.0) -> CoresetPlan:
    return CoresetPlan(cfg.coreset_ratio, cfg.coreset_shard_patches, oversample)


def select(prepared: Prepared, denoised: Denoised, settings: FitSettings, shard: Shard = Shard()) -> dict[str, BankPart]:
    from tqdm.auto import tqdm  # noqa: PLC0415

    cfg = settings.config
    plan = coreset_plan(cfg, shard.oversample)
    n = prepared.embeddings.shape[0]
    h, w = prepared.grid
    flat, proj = prepared.flat, prepared.projected
    device = flat.device
    image_index = torch.as_tensor(prepared.image_ids, device=device).repeat_interleave(h * w)
    parts: dict[str, BankPart] = {}
    banks = cfg.denoise_spec().banks
    with thread_budget(settings.threads):
        for bank in tqdm(banks, desc="coreset", unit="bank", disable=not settings.progress):
            kept, weights = denoised.kept(bank.name, n * h * w, device)
            if not bool(kept.any()):
                where = f"shard {shard.index + 1}: " if shard.count > 1 else ""
                raise ValueError(f"{where}no training patch is left after denoising; lower the noise threshold")
            rows = plan.select_in_shard(proj, kept, cfg.seed, h * w, shard.index, shard.count)
            parts[bank.name] = BankPart(
                flat[rows], proj[rows], None if weights is None else weights[rows].to(torch.float32), image_index[rows],
                kept.reshape(n, h * w).sum(dim=1).to(torch.int64),
                torch.as_tensor(prepared.image_ids, device=device))
    return parts


# ------------------------------------------------------------------ 3b. support
@dataclass
class Supported:
    """The support phase's outcome for a shard (:mod:`softpatch_cuda.denoise.support`):
    per distinct image of the shard its leave-out score, combined evidence and flag; how
    many rows each bank dropped; the flag rounds. Empty when the config has no support."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    removed_rows: dict[str, int] = field(default_factory=dict)
    rounds: int = 0


def support(prepared: Prepared, denoised: Denoised, parts: dict[str, BankPart], settings: FitSettings) -> Supported:
    """Phase 3b: the rows of the config's support banks get their leave-out support
    distances -- from the kept patches of the shard's other, unflagged images -- and
    training images are flagged by their evidence (leave-out score combined with the
    discriminators' score). A flagged image's rows whose support distance alone exceeds
    the leave-out split leave the banks: the patches by which it stands out (none when
    nothing is flagged). ``parts`` is updated in place."""
    cfg = settings.config
    names = [b for b in cfg.support_banks() if b in parts]
    if not names or denoised.result is None:
        return Supported()

    k, spare = cfg.support_images, CALIBRATION_GROUP
    n = prepared.embeddings.shape[0]
    h, w = prepared.grid
    flat = prepared.flat
    ids = torch.as_tensor(prepared.image_ids, device=flat.device)
    image_index = ids.repeat_interleave(h * w)
    n_ids = int(prepared.image_ids.max()) + 1
    other = np.zeros(n_ids, dtype=np.float32)
    other[prepared.image_ids] = denoised.result.image_scores
    out = Supported()
    result = None
    with thread_budget(settings.threads):
        for name in names:  # the classification bank first: its rows decide the flags
            part = parts[name]
            kept, _ = denoised.kept(name, n * h * w, flat.device)
            cand = find_candidates(part.features, part.image_ids, flat[kept], image_index[kept], n_ids)
            if result is None:
                result = leave_out_support(cand, k, spare, other)
                rows = result.rows
            else:
                rows = supporters(cand, torch.as_tensor(result.flagged, device=flat.device), k + spare)
            dist = rows.distance(k)
            flagged_row = torch.as_tensor(result.flagged, device=flat.device)[part.image_ids]
            drop = flagged_row & ~(dist <= result.distance_limit)
            part = dataclasses.replace(part, support=dist, supporters=rows)
            parts[name] = part.rows(~drop) if bool(drop.any()) else part
            out.removed_rows[name] = int(drop.sum())
    out.rounds = result.rounds
    own = prepared.image_ids
    out.columns = {"leave_out": result.leave_out[own] / max(float(np.median(result.leave_out[own])), 1e-12),
                   "contamination": result.evidence[own], "flagged": result.flagged[own].astype(np.float32)}
    return out


# ------------------------------------------------------------------ one shard
@dataclass
class ShardResult:
    """What a shard hands to the merge: its bank parts, the report columns of its distinct
    images, and the names / sources / digests of all its images."""

    shard: Shard
    names: list[str]
    sources: list[str | None]
    digests: list[str] | None
    distinct: list[int]  # shard-local indices of the first occurrence of each distinct image
    original_of: np.ndarray  # [images] position of each image's original in ``distinct``
    columns: dict[str, np.ndarray]  # per distinct image: the training report's columns
    banks: dict[str, BankPart]
    grid: tuple[int, int]
    embed_dim: int
    alignment: str | None
    alignment_statistic: float | None
    fingerprint: str | None
    timings: dict[str, float] = field(default_factory=dict)
    support: dict = field(default_factory=dict)  # what the support phase did (rows dropped, flag rounds)

    @property
    def n_images(self) -> int:
        return len(self.names)

    def to(self, device: Any) -> "ShardResult":
        """The result with its bank parts on ``device`` (a worker hands them back on the CPU)."""
        self.banks = {name: part.to(device) for name, part in self.banks.items()}
        return self


@torch.no_grad()
def fit_shard(embedded: EmbeddedImages, settings: FitSettings, shard: Shard = Shard(),
              timings: dict[str, float] | None = None) -> ShardResult:
    """Phases 1-3 on one shard's embedded images."""
    timings = dict(timings or {})
    prepared = prepare(embedded, settings, shard)
    t0 = time.perf_counter()
    denoised = denoise(prepared, settings)
    timings["denoise_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = select(prepared, denoised, settings, shard)
    timings["coreset_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    supported = support(prepared, denoised, parts, settings)
    timings["support_s"] = time.perf_counter() - t0
    n = prepared.embeddings.shape[0]
    return ShardResult(shard, prepared.names, prepared.sources, prepared.digests, prepared.distinct,
                       prepared.original_of, dict(denoised.report_columns(n), **supported.columns), parts,
                       prepared.grid, int(prepared.embeddings.shape[-1]), denoised.alignment,
                       denoised.alignment_statistic, settings.fingerprint, timings,
                       {"removed_rows": supported.removed_rows, "rounds": supported.rounds})


# ------------------------------------------------------------------ 4. merge
@dataclass
class Merged:
    """The shards merged: one bank per kind; the training-set index of every distinct
    image, their report columns and flags; the report over every image; the alignment
    (the shards' majority, the median statistic); sizes for :func:`fit_info`."""

    banks: dict[str, MemoryBank]
    distinct: np.ndarray
    flagged: np.ndarray
    report: TrainingReport
    alignment: str | None
    alignment_statistic: float | None
    grid: tuple[int, int]
    embed_dim: int
    kept: dict[str, int]
    shards: list[dict]
    union_rows: dict[str, int]
    cross_shard_duplicates: int
    support: dict = field(default_factory=dict)  # the shards' support records, summed (rows dropped, rounds)


def _gather(parts: list[BankPart], rows: torch.Tensor, attr: str) -> torch.Tensor | None:
    """Rows (indices into the parts' concatenation, ascending) of one attribute, without
    concatenating the parts first (bounded memory: the union is not copied)."""
    if getattr(parts[0], attr) is None:
        return None
    offsets = np.concatenate([[0], np.cumsum([len(p.image_ids) for p in parts])])
    bounds = torch.searchsorted(rows, torch.as_tensor(offsets, dtype=rows.dtype, device=rows.device)).tolist()
    out = [getattr(part, attr)[rows[bounds[p]:bounds[p + 1]] - int(offsets[p])]
           for p, part in enumerate(parts) if bounds[p + 1] > bounds[p]]
    return torch.cat(out)


def merge(results: Iterable[ShardResult], settings: FitSettings, device: Any, n_images: int | None = None) -> Merged:
    cfg = settings.config
    collected = sorted(results, key=lambda r: r.shard.index)
    total = sum(r.n_images for r in collected)
    if n_images is not None and total != n_images:
        raise RuntimeError(f"the shards returned {total} images, expected {n_images}")
    first = collected[0]
    for r in collected[1:]:
        if (r.grid, r.embed_dim, r.fingerprint) != (first.grid, first.embed_dim, first.fingerprint):
            raise ValueError(f"shard {r.shard.index + 1} was embedded differently from shard 1 (grid {r.grid} vs "
                             f"{first.grid}, dim {r.embed_dim} vs {first.embed_dim}, backbone weights "
                             f"{(r.fingerprint or '')[:12]} vs {(first.fingerprint or '')[:12]}): every worker "
                             "must use the same backbone weights")
    # the distinct images over all shards: a shard's image whose digest an earlier shard
    # had is that image's duplicate (shards denoise alone, so duplicates across shards
    # are found here)
    distinct: list[int] = []
    original = np.empty(total, dtype=np.int64)
    names: list[str] = [""] * total
    sources: list[str | None] = [None] * total
    columns: dict[str, list] = {key: [] for key in first.columns}
    position_of_digest: dict[str, int] = {}
    duplicates: set[int] = set()
    for r in collected:
        position = np.empty(len(r.distinct), dtype=np.int64)  # shard-distinct -> distinct position
        for q, j in enumerate(r.distinct):
            g = r.shard.first_image + j
            digest = r.digests[j] if r.digests else None
            if digest is not None and digest in position_of_digest:
                position[q] = position_of_digest[digest]
                duplicates.add(g)
                continue
            position[q] = len(distinct)
            if digest is not None:
                position_of_digest[digest] = len(distinct)
            distinct.append(g)
            for key, values in r.columns.items():
                columns[key].append(values[q])
        for i in range(r.n_images):
            g = r.shard.first_image + i
            original[g] = position[r.original_of[i]]
            # in-memory images of a shard are named by their place in the whole training set
            names[g] = r.names[i] if r.sources[i] is not None or r.shard.count == 1 else f"image_{g}"
            sources[g] = r.sources[i]
    report_columns = {key: np.asarray(values, dtype=np.float32) for key, values in columns.items()}
    report = _report(report_columns, [names[i] for i in distinct], [sources[i] for i in distinct])
    flagged = report.flagged
    report = report.expanded(names, sources, original)

    plan = coreset_plan(cfg)
    banks: dict[str, MemoryBank] = {}
    kept: dict[str, int] = {}
    union_rows: dict[str, int] = {}
    with thread_budget(settings.threads):
        for name in first.banks:
            parts = [r.banks[name].to(device) for r in collected]
            if duplicates:  # rows of images that duplicate an earlier shard's image leave the union
                parts = [p.without_images(duplicates) for p in parts]
            union_rows[name] = sum(len(p.image_ids) for p in parts)
            kept[name] = sum(p.kept for p in parts)
            if len(parts) == 1:  # one shard: its coreset is the bank
                only = parts[0]
                features, weights, ids, support = only.features, only.weights, only.image_ids, only.support
                supporters = only.supporters
            else:
                rows = plan.reduce([p.projected for p in parts], [p.kept for p in parts], cfg.seed)
                features, weights, ids, support = (_gather(parts, rows, a)
                                                   for a in ("features", "weights", "image_ids", "support"))
                supporters = None if parts[0].supporters is None else \
                    RowSupport.cat([p.supporters for p in parts]).subset(rows)
            rows_support = None
            if support is not None:
                excluded = torch.zeros(total, dtype=torch.bool, device=ids.device)
                excluded[torch.as_tensor(np.asarray(distinct)[flagged], dtype=torch.int64, device=ids.device)] = True
                rows_support = BankSupport(supporters, cfg.support_images, excluded)
                support = unsupported_fill(support)
            banks[name] = cfg.memory_bank(features, weights, ids, support, rows_support)
    votes = Counter(r.alignment for r in collected if r.alignment is not None)
    stats = [r.alignment_statistic for r in collected if r.alignment_statistic is not None]
    shards = [{"images": r.n_images, "first_image": r.shard.first_image, "alignment": r.alignment,
               "alignment_statistic": r.alignment_statistic,
               "timings": {k: round(v, 3) for k, v in r.timings.items()}} for r in collected]
    support_record: dict = {}
    if first.support:
        support_record = {"removed_rows": {name: sum(r.support["removed_rows"].get(name, 0) for r in collected)
                                           for name in first.support["removed_rows"]},
                          "rounds": max(r.support["rounds"] for r in collected)}
    return Merged(banks, np.asarray(distinct, dtype=np.int64), flagged, report,
                  votes.most_common(1)[0][0] if votes else None, float(np.median(stats)) if stats else None,
                  first.grid, first.embed_dim, kept, shards, union_rows, len(duplicates), support_record)


def _report(columns: dict[str, np.ndarray], names: list[str], sources: list[str | None]) -> TrainingReport:
    """The training report of the distinct images from the shards' columns. With leave-out
    support: the combined evidence, the shards' flags and, as evidence columns, the
    discriminators' and the leave-out scores (each a robust z-score, 0 = a typical image); without:
    the discriminators' contamination scores and their flags (:func:`flag_images`)."""
    if "contamination" not in columns:
        flagged, limit = flag_images(columns["scores"])
        return TrainingReport(names, sources, columns["scores"], flagged, limit, columns["removed_fraction"])
    scores = columns["contamination"]
    evidence = {"discriminators": robust_z(columns["scores"]), "leave_out": robust_z(columns["leave_out"])}
    return TrainingReport(names, sources, scores, columns["flagged"] > 0.5, split_limit(scores),
                          columns["removed_fraction"], evidence)


# ------------------------------------------------------------------ 5. calibrate
@dataclass
class Calibration:
    threshold: float
    scores: np.ndarray  # the calibration images' leave-out image scores
    score_floor: float  # their lowest patch score


def calibrate(bank: MemoryBank, merged: Merged, settings: FitSettings,
              embed: Callable[[np.ndarray], torch.Tensor]) -> Calibration:
    """The threshold from up to CALIBRATION_IMAGES unflagged training images, each scored
    against the bank without its own patches. ``embed(ids)``: the embeddings [k, h, w, D]
    of those training images (from memory, or embedded again after a sharded fit)."""
    cfg = settings.config
    n = len(merged.distinct)
    if n < 2:
        raise ValueError("threshold calibration needs at least 2 training images")
    ids = merged.distinct[choose_calibration_images(merged.flagged, cfg.seed)]
    embeddings = embed(ids)
    with thread_budget(settings.threads):
        scores, floor = leave_out_scores(embeddings, bank, np.arange(len(ids)), cfg.image_score,
                                         calibration_group(n), image_ids=ids)
    return Calibration(threshold_from_scores(scores), scores, floor)


# ------------------------------------------------------------------ 6. fit info
def fit_info(merged: Merged, calibration: Calibration, timings: dict[str, float],
             n_images: int, sharding: dict | None = None) -> dict[str, Any]:
    """Sizes, what the denoising removed, the soft weights' spread, flags, calibration
    scores, timings (and, for a sharded fit, how it was split)."""
    h, w = merged.grid
    n = len(merged.distinct)
    info: dict[str, Any] = {"n_images": n_images, "n_distinct_images": n, "grid": [h, w],
                            "embed_dim": merged.embed_dim, "alignment": merged.alignment,
                            "alignment_statistic": merged.alignment_statistic}
    for name, bank in merged.banks.items():
        removed = n * h * w - merged.kept[name]
        info[f"{name}_bank_size"] = len(bank)
        info[f"{name}_removed"] = int(removed)
        info[f"{name}_removed_share"] = removed / float(n * h * w)
        info[f"{name}_weights"] = weight_stats(bank.weights)
        if bank.support is not None:  # leave-out support: its distances' spread, the rows it dropped
            info[f"{name}_support"] = support_stats(bank.support)
            info[f"{name}_unsupported_removed"] = merged.support["removed_rows"].get(name, 0)
    info["flagged_images"] = int(np.sum(merged.report.flagged))
    if merged.support:
        info["support_rounds"] = merged.support["rounds"]
    info["calibration_scores"] = [float(s) for s in calibration.scores]
    info["timings"] = dict(timings)
    if sharding is not None:
        info["sharding"] = dict(sharding, shards=merged.shards, union_rows=merged.union_rows,
                                cross_shard_duplicates=merged.cross_shard_duplicates)
    return info


def finish(results: Iterable[ShardResult], settings: FitSettings, *, device: Any, backbone_spec: dict,
           embed: Callable[[np.ndarray], torch.Tensor], n_images: int | None = None,
           timings: dict[str, float] | None = None, sharding: dict | None = None) -> FittedState:
    """Phases 4-6: the shards' results -> the fitted state."""
    timings = dict(timings or {})
    t0 = time.perf_counter()
    results = list(results)
    for key in ("features_s", "denoise_s", "coreset_s", "support_s"):
        timings[key] = timings.get(key, 0.0) + sum(r.timings.get(key, 0.0) for r in results)
    merged = merge(results, settings, device, n_images)
    del results  # the shards' coresets: only the banks remain
    timings["merge_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibration = calibrate(merged.banks["cls"], merged, settings, embed)
    timings["calibration_s"] = time.perf_counter() - t0
    cfg = settings.config
    info = fit_info(merged, calibration, timings, len(merged.report), sharding)
    state = FittedState(
        projection=random_projection(merged.embed_dim, cfg.proj_dim, seed=cfg.seed, device=device),
        banks=merged.banks, report=merged.report, threshold=calibration.threshold,
        score_floor=calibration.score_floor, alignment=merged.alignment,
        alignment_statistic=merged.alignment_statistic, backbone_spec=backbone_spec, embed_dim=merged.embed_dim,
        fit_info=info)
    logger.info("fit done: threshold %.4g; %s; timings %s", state.threshold,
                {k: v for k, v in info.items() if k not in ("calibration_scores", "timings", "sharding")},
                {k: round(v, 2) for k, v in timings.items()})
    return state
