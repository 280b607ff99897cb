"""Typed, frozen model configurations, validated once.

One dataclass per model kind; its fields are exactly the keyword options of the
model's constructor (``SoftPatch(lof_k=5)`` <-> ``SoftPatchConfig(lof_k=5)``), and the
dataclass is what a model file stores (``to_dict`` / ``from_dict``). Run-time
settings that do not change what a model computes -- the device and progress bars --
are not part of it. Torch-free: the command line and the torch-free predictor read it.

Presets: ``preset="paper"`` starts from the settings of the authors' code (see
:data:`PAPER_PRESETS`); options given explicitly override the preset. With another
``backbone`` the preset's layers (WRN-50-2's layer2 + layer3) follow it: that backbone's
paper-equivalent pair, its last stages at strides 8 and 16 (``layers=None``; for
efficientnet_lite0 blocks.2 + blocks.4), unless ``layers`` are given too.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from .._pixels import ImageTransform
from .._validation import check_bool, check_choice, check_int, check_number
from ..denoise.discriminators import DISCRIMINATORS, DiscriminatorSettings
from ..denoise.spec import (
    ALIGNMENTS, FUSIONS, RANK_SCOPES, WEIGHT_FUSIONS, WEIGHT_MODES, BankSpec, DenoiseSpec, check_shrinkage,
    check_support_images,
)
from ..memory_bank import MemoryBank
from ..scoring import DISTANCES, IMAGE_SCORES
from ..search import SEARCHES

PRESETS: tuple[str, ...] = ("default", "paper")
SEG_GATES: tuple[str, ...] = ("none", "any", "all")


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


def option(default: Any, check: Callable[[str, Any], Any], help: str | None = None, *, flag: str | None = None,
           metavar: str | None = None, parse: Callable[[str], Any] | None = None,
           choices: Sequence[str] | None = None, multiple: bool = False, negate: bool = False) -> Any:
    """A config field and what is known about it, in one place: ``check(name, value)``
    validates (and normalises) it -- the config runs it with the field's name, the command
    line with the flag's; with ``help`` the field is a command-line option (``flag``,
    default ``--field-name``; ``parse`` turns the text into a value; ``choices``;
    ``multiple``: repeatable and comma lists; ``negate``: a flag that sets False)."""
    meta = {"check": check}
    if help is not None:
        meta["cli"] = {"help": help, "flag": flag, "metavar": metavar, "parse": parse, "choices": choices,
                       "multiple": multiple, "negate": negate}
    return field(default=default, metadata=meta)


def _architecture(backbone: Any) -> str | None:
    """A timm name without its pretrained tag ("wide_resnet50_2.tv_in1k" -> "wide_resnet50_2")."""
    return backbone.split(".", 1)[0] if isinstance(backbone, str) else None


def _backbone(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a timm model name, got {value!r}")
    return value


def _names(what: str) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> tuple[str, ...] | None:
        value = _as_tuple(value)
        if value is not None and (
            not isinstance(value, tuple) or not value or not all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"{name} must be None or a non-empty list of {what}, got {value!r}")
        return value
    return check


def _weights(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path or None, got {type(value).__name__}")
    # resolved: a model fitted with a relative path still finds its weights elsewhere
    return str(Path(os.fspath(value)).expanduser().resolve())


def _int(lo: int, allow_none: bool = False) -> Callable[[str, Any], Any]:
    return lambda name, value: check_int(name, value, lo, allow_none=allow_none)


def _number(lo: float | None = None, hi: float | None = None, **kw: Any) -> Callable[[str, Any], Any]:
    return lambda name, value: check_number(name, value, lo, hi, **kw)


def _choice(choices: Sequence[str]) -> Callable[[str, Any], Any]:
    return lambda name, value: check_choice(name, value, choices)


def _discriminators(name: str, value: Any) -> tuple[str, ...]:
    ds = _as_tuple(value)
    if isinstance(ds, str):
        ds = (ds,)
    if not isinstance(ds, tuple) or not ds:
        raise ValueError(f"{name} must be a non-empty list of {list(DISCRIMINATORS)}, got {ds!r}")
    for d in ds:
        check_choice(f"{name} entry", d, DISCRIMINATORS)
    if len(set(ds)) != len(ds):
        raise ValueError(f"{name} contain duplicates: {list(ds)}")
    return ds


def _size(text: str) -> int | None:
    """A side length, or "none" (that step off)."""
    return None if text.lower() in ("none", "0") else int(text)


def _optional_number(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


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

    Each field's check (and, for the command-line options, flag and help) is in its
    metadata (:func:`option`).
    """

    backbone: str = option("efficientnet_lite0", _backbone, "timm CNN name", metavar="NAME")
    layers: tuple[str, ...] | None = option(
        None, _names("layer names"), "feature layers of the backbone, comma list (default: the backbone's default)",
        metavar="L1,L2", multiple=True)
    weights: str | None = option(None, _weights, "backbone weights (.pth/.safetensors state dict); default: "
                                 "pretrained weights", metavar="FILE")
    pretrained: bool = option(True, check_bool, "random backbone weights (for smoke tests only: results are "
                              "meaningless)", flag="--no-pretrained", negate=True)
    embed_dim: int | None = option(None, _int(1, allow_none=True))
    proj_dim: int = option(128, _int(1))
    coreset_ratio: float = option(0.1, _number(0.0, 1.0, lo_open=True),
                                  "fraction of training patches kept in the memory bank", metavar="F", parse=float)
    coreset_shard_patches: int | None = option(100_000, _int(1, allow_none=True))
    resize: int | None = option(256, _int(1, allow_none=True), "resize images to N x N first ('none' keeps the size)",
                                metavar="N", parse=_size)
    crop: int | None = option(224, _int(1, allow_none=True), "then centre-crop N x N ('none' for no crop)",
                              metavar="N", parse=_size)
    batch_size: int = option(16, _int(1), "images per forward pass", metavar="N", parse=int)
    seed: int = option(0, _int(0), "random seed (projection, coreset start)", parse=int)
    distance: str = option("l2", _choice(DISTANCES), "nearest-neighbour distance (squared_l2 as the authors' code)",
                           choices=DISTANCES)
    image_score: str = option("max", _choice(IMAGE_SCORES), "image score: the largest patch score or PatchCore's "
                              "eq. 7 re-weighting", choices=IMAGE_SCORES)
    search: str = option("exact", _choice(SEARCHES), "nearest-neighbour search: exact or pca (principal-subspace "
                         "candidates, exact re-rank: ~3x less k-NN work, small measured tolerance)", choices=SEARCHES)

    model_type: ClassVar[str] = "patchcore"  # the model kind these options configure, as model files name it
    denoising: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        ImageTransform(resize=self.resize, crop=self.crop)  # crop <= resize

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
        if preset == "paper" and "layers" not in options and _architecture(options.get("backbone")) not in (
                None, _architecture(base["backbone"])):
            # The preset's layers are WRN-50-2's: another backbone gets its own paper-equivalent
            # pair, the last stages at strides 8 and 16 (None: the backbone's default pair).
            base["layers"] = None
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

    def memory_bank(self, features: Any, weights: Any, source_image: Any, support: Any = None,
                    support_rows: Any = None) -> MemoryBank:
        """A bank of these rows that scores as this config says (distance, search; the rows'
        leave-out support distances, if any): every bank a fit merges or a model file holds
        is built here."""
        return MemoryBank(features, weights, source_image, self.distance, self.search, support, support_rows)

    def support_banks(self) -> tuple[str, ...]:
        """The banks whose rows get leave-out support distances (:mod:`softpatch_cuda.denoise.support`)."""
        return ()

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
    support_images: leave-out support (:mod:`softpatch_cuda.denoise.support`): a bank row
    vouches for a test patch only as far as that many other training images vouch for
    the row, and training images whose leave-out score stands out are flagged and vouch
    for nothing (None: off, the papers).
    """

    alignment: str = option("auto", _choice(ALIGNMENTS), "which training patches are compared: auto, position (the "
                            "paper), window, global", choices=ALIGNMENTS)
    window: int = option(1, _int(1))
    lof_k: int = option(6, _int(1), "LOF neighbours", metavar="K", parse=int)
    pool_size: int = option(4096, _int(16))
    soft_weights: bool = option(True, check_bool, "no soft weights (distances unscaled)", flag="--no-soft-weights",
                                negate=True)
    weight_mode: str = option("outlier", _choice(WEIGHT_MODES), "soft weights: outlier (1 for inliers), clamped, "
                              "median (the papers)", choices=WEIGHT_MODES)
    gaussian_shrinkage: float | str = option("ledoit_wolf", lambda name, value: check_shrinkage(value))
    removal_mad: float | None = option(6.0, _number(0.0, allow_none=True), "the removal gate: a top-share patch goes "
                                       "only if its score is above median + K * 1.4826 * MAD ('none': the whole top "
                                       "share, as --removal fixed)", metavar="K", parse=_optional_number)
    support_images: int | None = option(2, lambda name, value: check_support_images(value),
                                        "leave-out support: a training patch vouches for a test patch only as far as "
                                        "K other training images vouch for it, so a defect memorised from fewer than "
                                        "K training images no longer hides its twins ('none': off, as the papers)",
                                        metavar="K", parse=_optional_int)

    denoising: ClassVar[bool] = True

    def support_banks(self) -> tuple[str, ...]:
        return () if self.support_images is None else tuple(b.name for b in self.denoise_spec().banks)

    def _settings(self, methods: tuple[str, ...]) -> DiscriminatorSettings:
        return DiscriminatorSettings(methods=methods, alignment=self.alignment, window=self.window, lof_k=self.lof_k,
                                     pool_size=self.pool_size, gaussian_shrinkage=self.gaussian_shrinkage)

    def _bank(self, name: str, fraction: float, gate: str = "any") -> BankSpec:
        removal = "fixed" if self.removal_mad is None or gate == "none" else "gated"
        return BankSpec(name, fraction, removal=removal, gate=gate if removal == "gated" else "any",
                        soft_weights=self.soft_weights)


_NOISE_THRESHOLD_HELP = "top share of patch outlier scores that may be kept out of the (classification) bank"
_DISCRIMINATORS_HELP = (f"{', '.join(DISCRIMINATORS)}: softpatch takes one (default lof), softpatch-plus a comma "
                        "list (default lof,gaussian)")


@dataclass(frozen=True)
class SoftPatchConfig(_DenoisingConfig):
    """SoftPatch: one discriminator ("lof", "nearest" or "gaussian"); noise_threshold:
    the top share of patch outlier scores that may be kept out of the memory bank."""

    discriminator: str = option("lof", _choice(DISCRIMINATORS), _DISCRIMINATORS_HELP, flag="--discriminators",
                                metavar="D1,D2", multiple=True)

    model_type: ClassVar[str] = "softpatch"
    noise_threshold: float = option(0.15, _number(0.0, 1.0, hi_open=True), _NOISE_THRESHOLD_HELP, metavar="F",
                                    parse=float)

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

    discriminators: tuple[str, ...] = option(("lof", "gaussian"), _discriminators, _DISCRIMINATORS_HELP,
                                             metavar="D1,D2", multiple=True)
    fusion: str = option("mean", _choice(FUSIONS))
    cls_threshold: float = option(0.15, _number(0.0, 1.0, hi_open=True), _NOISE_THRESHOLD_HELP,
                                  flag="--noise-threshold", metavar="F", parse=float)
    seg_threshold: float = option(0.2, _number(0.0, 1.0, hi_open=True), "share removed from the segmentation bank",
                                  metavar="F", parse=float)
    rank_scope: str = option("global", _choice(RANK_SCOPES))
    seg_removal_gate: str = option("none", _choice(SEG_GATES), "segmentation bank gate (none: its whole top share "
                                   "goes)", choices=SEG_GATES)
    weight_fusion: str = option("min", _choice(WEIGHT_FUSIONS), "combine the discriminators' soft weights by min "
                                "(every discriminator must call a patch an outlier) or mean (the papers)",
                                choices=WEIGHT_FUSIONS)

    model_type: ClassVar[str] = "softpatch_plus"

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
_PAPER_DENOISING = {"alignment": "position", "removal_mad": None, "weight_mode": "median", "support_images": None}
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
        data = {k: v for k, v in data.items() if k not in self.RUNTIME_KEYS}
        if cls.denoising and "support_images" not in data:  # fitted before 0.3: banks without support
            data["support_images"] = None
        return data


LEGACY = _Legacy()

CONFIG_CLASSES = (PatchCoreConfig, SoftPatchConfig, SoftPatchPlusConfig)


def config_class_for(model_type: Any) -> type[PatchCoreConfig] | None:
    """The config class of a model type as model files name it (None when unknown)."""
    return next((c for c in CONFIG_CLASSES if c.model_type == model_type), None)
