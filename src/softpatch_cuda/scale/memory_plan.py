"""The memory budget of a sharded fit: how large a shard may be so that the whole fit
stays within a resident-memory budget, decided before any training image is embedded;
and the probes of this process's resident memory it rests on.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..memory_bank import CoresetPlan

DEFAULT_OVERSAMPLE = 2.0
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


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


def discriminator_minimum(model: Any) -> tuple[int, str]:
    """(fewest images per shard, a description of who needs them) for ``model``'s discriminators."""
    settings = model.settings.discriminator_settings()
    return settings.min_images(), f" {settings.describe()}"


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
    the discriminators' scores, ranks and neighbour graph, each bank's kept mask and
    weights and its coreset rows; per shard what the discriminators hold whatever its size
    (their table: ``DiscriminatorSettings.bytes_per_patch`` / ``bytes_per_shard``).
    Counted for the whole training set:
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
    share = CoresetPlan(cfg.coreset_ratio, cfg.coreset_shard_patches, oversample).shard_share(2)
    row = 4 * (dim + d) + 4 + 8  # a coreset row: features, projection, weight, image id
    per_image = p * (
        4 * 2 * dim  # embeddings, and the batches' copy while they are joined
        + 4 * 2 * d  # projections and their per-position groups
        + settings.bytes_per_patch()  # the discriminators' scores, ranks and neighbour graph
        + n_banks * (1 + 4 + 4 * n_methods)  # kept mask, weights and their per-discriminator parts
        + n_banks * share * row  # the shard's coreset rows
    )
    fixed = settings.bytes_per_shard(d)
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
