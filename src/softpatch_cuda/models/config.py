"""Typed, frozen model configurations, validated once.

One dataclass per model kind; its fields are exactly the keyword options of the
model's constructor (``SoftPatch(lof_k=5)`` <-> ``SoftPatchConfig(lof_k=5)``), and the
dataclass is what a model file stores (``to_dict`` / ``from_dict``). Run-time
settings that do not change what a model computes -- the device and progress bars --
are not part of it.

Presets: ``preset="paper"`` starts from the settings of the authors' code (see
:data:`PAPER_PRESETS`); options given explicitly override the preset.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from .._validation import check_bool, check_choice, check_int, check_number
from ..data.images import ImageTransform
from ..denoise import (
    ALIGNMENTS, DISCRIMINATORS, FUSIONS, RANK_SCOPES, WEIGHT_FUSIONS, WEIGHT_MODES, BankSpec, DenoiseSpec, DiscriminatorSettings,
    check_shrinkage,
)
from ..memory_bank import DISTANCES, IMAGE_SCORES
from ..search import SEARCHES

PRESETS: tuple[str, ...] = ("default", "paper")
SEG_GATES: tuple[str, ...] = ("none", "any", "all")


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


@dataclass(frozen=True)
class PatchCoreConfig:
    """Options shared by every model (PatchCore has only these).

    backbone: timm CNN name; layers: its feature layers (None: the backbone's default
    pair at strides 8 and 16); weights: local state-dict file (stored resolved);
    pretrained: ImageNet weights (False: random, seeded). embed_dim: patch embedding
    size (None: per-backbone default). proj_dim: random projection for denoising and
    the coreset. coreset_ratio: share of the (kept) patches in the memory bank.
    coreset_shard_patches: the greedy coreset runs per shard of whole images of at most
    this many patches and the bank is the shards' union, so fit time grows linearly
    with the training set beyond one shard (None: one pass over all patches).
    resize, crop: input transform. batch_size: images per forward pass. seed: every
    random choice. distance: "l2" or "squared_l2" (the authors' code). image_score:
    "max" (the largest patch score) or "reweighted" (PatchCore paper, eq. 7). search:
    nearest-neighbour search, "exact" or "pca" (principal-subspace candidates with an
    exact re-rank: about 3x less work, a measured small tolerance; softpatch_cuda.search).
    """

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] | None = None
    weights: str | None = None
    pretrained: bool = True
    embed_dim: int | None = None
    proj_dim: int = 128
    coreset_ratio: float = 0.1
    coreset_shard_patches: int | None = 100_000
    resize: int | None = 256
    crop: int | None = 224
    batch_size: int = 16
    seed: int = 0
    distance: str = "l2"
    image_score: str = "max"
    search: str = "exact"

    denoising: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"backbone must be a timm model name, got {self.backbone!r}")
        layers = _as_tuple(self.layers)
        if layers is not None and (
            not isinstance(layers, tuple) or not layers or not all(isinstance(l, str) for l in layers)
        ):
            raise ValueError(f"layers must be None or a non-empty list of layer names, got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        if self.weights is not None:
            if not isinstance(self.weights, (str, os.PathLike)):
                raise TypeError(f"weights must be a file path or None, got {type(self.weights).__name__}")
            # resolved: a model fitted with a relative path still finds its weights elsewhere
            object.__setattr__(self, "weights", str(Path(os.fspath(self.weights)).expanduser().resolve()))
        check_bool("pretrained", self.pretrained)
        check_int("embed_dim", self.embed_dim, 1, allow_none=True)
        check_int("proj_dim", self.proj_dim, 1)
        check_number("coreset_ratio", self.coreset_ratio, 0.0, 1.0, lo_open=True)
        check_int("coreset_shard_patches", self.coreset_shard_patches, 1, allow_none=True)
        check_int("resize", self.resize, 1, allow_none=True)
        check_int("crop", self.crop, 1, allow_none=True)
        ImageTransform(resize=self.resize, crop=self.crop)  # crop <= resize
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        check_choice("distance", self.distance, DISTANCES)
        check_choice("image_score", self.image_score, IMAGE_SCORES)
        check_choice("search", self.search, SEARCHES)

    # ------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """JSON-able dict of the options (tuples as lists)."""
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, preset: str | None = None, **options: Any) -> "PatchCoreConfig":
        """The config for ``preset`` (None: the defaults) with ``options`` on top."""
        preset = "default" if preset is None else check_choice("preset", preset, PRESETS)
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise TypeError(f"{cls.__name__[:-len('Config')]} got unexpected option(s) {unknown}; "
                            f"valid options: {', '.join(cls.option_names())}")
        base = dict(PAPER_PRESETS[cls.__name__]) if preset == "paper" else {}
        base.update(options)
        return cls(**{k: _as_tuple(v) for k, v in base.items()})

    @classmethod
    def from_dict(cls, data: dict) -> "PatchCoreConfig":
        """Read a stored config; keys this version no longer has are refused by name."""
        if not isinstance(data, dict):
            raise ValueError(f"config must be a dict, got {type(data).__name__}")
        return cls.from_options(**LEGACY.upgrade(cls, data))

    def replace(self, **changes: Any) -> "PatchCoreConfig":
        return dataclasses.replace(self, **{k: _as_tuple(v) for k, v in changes.items()})

    # ------------------------------------------------------------ what the pipeline runs
    def transform(self) -> ImageTransform:
        return ImageTransform(resize=self.resize, crop=self.crop)

    def discriminator_settings(self) -> DiscriminatorSettings:
        """PatchCore runs LOF (default settings) only to fill the training report; too
        few images for it is not an error there."""
        return DiscriminatorSettings(methods=("lof",), required=False)

    def denoise_spec(self) -> DenoiseSpec:
        return DenoiseSpec(banks=(BankSpec("cls", 0.0, removal="none", soft_weights=False),))


@dataclass(frozen=True)
class _DenoisingConfig(PatchCoreConfig):
    """Options of the denoising models (SoftPatch, SoftPatch+).

    alignment: which patches a patch is compared with -- "auto", "position" (the
    paper), "window" (+-``window`` positions) or "global" (a random pool of
    ``pool_size`` patches). lof_k: LOF neighbours. soft_weights: multiply the
    nearest-neighbour distance by the matched patch's weight; weight_mode: how outlier
    scores become weights (see :func:`softpatch_cuda.denoise.soft_weights`).
    gaussian_shrinkage: covariance shrinkage of the Gaussian discriminator.
    removal_mad: "do no harm" gate: a top-fraction patch is removed only if its score
    also exceeds median + removal_mad * 1.4826 * MAD (None: the papers' fixed fraction).
    """

    alignment: str = "auto"
    window: int = 1
    lof_k: int = 6
    pool_size: int = 4096
    soft_weights: bool = True
    weight_mode: str = "outlier"
    gaussian_shrinkage: float | str = "ledoit_wolf"
    removal_mad: float | None = 6.0

    denoising: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("alignment", self.alignment, ALIGNMENTS)
        check_int("window", self.window, 1)
        check_int("lof_k", self.lof_k, 1)
        check_int("pool_size", self.pool_size, 16)
        check_bool("soft_weights", self.soft_weights)
        check_choice("weight_mode", self.weight_mode, WEIGHT_MODES)
        check_shrinkage(self.gaussian_shrinkage)
        check_number("removal_mad", self.removal_mad, 0.0, allow_none=True)

    def _settings(self, methods: tuple[str, ...]) -> DiscriminatorSettings:
        return DiscriminatorSettings(methods=methods, alignment=self.alignment, window=self.window, lof_k=self.lof_k,
                                     pool_size=self.pool_size, gaussian_shrinkage=self.gaussian_shrinkage)

    def _bank(self, name: str, fraction: float, gate: str = "any") -> BankSpec:
        removal = "fixed" if self.removal_mad is None or gate == "none" else "gated"
        return BankSpec(name, fraction, removal=removal, gate=gate if removal == "gated" else "any",
                        soft_weights=self.soft_weights)


@dataclass(frozen=True)
class SoftPatchConfig(_DenoisingConfig):
    """SoftPatch: one discriminator ("lof", "nearest" or "gaussian"); noise_threshold:
    the top share of patch outlier scores that may be kept out of the memory bank."""

    discriminator: str = "lof"
    noise_threshold: float = 0.15

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("discriminator", self.discriminator, DISCRIMINATORS)
        check_number("noise_threshold", self.noise_threshold, 0.0, 1.0, hi_open=True)

    def discriminator_settings(self) -> DiscriminatorSettings:
        return self._settings((self.discriminator,))

    def denoise_spec(self) -> DenoiseSpec:
        return DenoiseSpec(banks=(self._bank("cls", self.noise_threshold),), removal_mad=self.removal_mad or 0.0,
                           weight_mode=self.weight_mode)


@dataclass(frozen=True)
class SoftPatchPlusConfig(_DenoisingConfig):
    """SoftPatch+: several discriminators fused by rank (``fusion`` "mean" or "max";
    ranks over all patches or per position, ``rank_scope``); a classification bank
    (``cls_threshold`` may be removed, gated by ``removal_mad``) scores images, a
    segmentation bank (``seg_threshold`` removed; ``seg_removal_gate``: "none" -- the
    whole top fraction, also what the classification bank removes -- or the robust-outlier
    gate in "any" / "all" discriminators) makes the maps. ``weight_fusion``: how the
    discriminators' soft weights combine, "min" (a patch weighs more than 1 only where
    every discriminator calls it an outlier) or "mean" (the papers' fused score)."""

    discriminators: tuple[str, ...] = ("lof", "gaussian")
    fusion: str = "mean"
    cls_threshold: float = 0.15
    seg_threshold: float = 0.2
    rank_scope: str = "global"
    seg_removal_gate: str = "none"
    weight_fusion: str = "min"

    def __post_init__(self) -> None:
        super().__post_init__()
        ds = _as_tuple(self.discriminators)
        if isinstance(ds, str):
            ds = (ds,)
        if not isinstance(ds, tuple) or not ds:
            raise ValueError(f"discriminators must be a non-empty list of {list(DISCRIMINATORS)}, got {ds!r}")
        for d in ds:
            check_choice("discriminators entry", d, DISCRIMINATORS)
        if len(set(ds)) != len(ds):
            raise ValueError(f"discriminators contain duplicates: {list(ds)}")
        object.__setattr__(self, "discriminators", ds)
        check_choice("fusion", self.fusion, FUSIONS)
        check_number("cls_threshold", self.cls_threshold, 0.0, 1.0, hi_open=True)
        check_number("seg_threshold", self.seg_threshold, 0.0, 1.0, hi_open=True)
        check_choice("rank_scope", self.rank_scope, RANK_SCOPES)
        check_choice("seg_removal_gate", self.seg_removal_gate, SEG_GATES)
        check_choice("weight_fusion", self.weight_fusion, WEIGHT_FUSIONS)

    def discriminator_settings(self) -> DiscriminatorSettings:
        return self._settings(self.discriminators)

    def denoise_spec(self) -> DenoiseSpec:
        return DenoiseSpec(
            banks=(self._bank("cls", self.cls_threshold), self._bank("seg", self.seg_threshold, self.seg_removal_gate)),
            fusion=self.fusion, rank_scope=self.rank_scope, removal_mad=self.removal_mad or 0.0,
            weight_mode=self.weight_mode, weight_fusion=self.weight_fusion,
        )


# The authors' code (SoftPatch reference implementation; SoftPatch+ as its paper
# describes): WRN-50-2 with torchvision's weights, squared L2 distances times the
# weight, weights = score / median, a fixed top-15 % (SoftPatch+: 15 % / 50 %) removal,
# same-position comparison. LOF k stays at the papers' 6 (the released code passes it
# under a misspelt keyword and silently runs k = 5; lof_k=5 reproduces that).
_PAPER_COMMON = {"backbone": "wide_resnet50_2.tv_in1k", "layers": ("layer2", "layer3"), "embed_dim": 1024,
                 "resize": 256, "crop": 224, "coreset_ratio": 0.1, "distance": "squared_l2"}
_PAPER_DENOISING = {"alignment": "position", "removal_mad": None, "weight_mode": "median"}
PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "PatchCoreConfig": dict(_PAPER_COMMON),
    "SoftPatchConfig": dict(_PAPER_COMMON, **_PAPER_DENOISING, discriminator="lof", noise_threshold=0.15),
    "SoftPatchPlusConfig": dict(_PAPER_COMMON, **_PAPER_DENOISING, discriminators=("lof", "gaussian"),
                                cls_threshold=0.15, seg_threshold=0.5, rank_scope="position",
                                seg_removal_gate="any", gaussian_shrinkage=0.1, weight_fusion="mean"),
}


class _Legacy:
    """Stored configs of earlier versions: the keys they had that are not options now."""

    RUNTIME_KEYS = ("device", "progress")  # 0.1 stored these in the config

    def upgrade(self, cls: type, data: dict) -> dict:
        return {k: v for k, v in data.items() if k not in self.RUNTIME_KEYS}


LEGACY = _Legacy()

CONFIG_CLASSES = (PatchCoreConfig, SoftPatchConfig, SoftPatchPlusConfig)
