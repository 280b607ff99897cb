"""The one table of model kinds: type name (model files) <-> class <-> config class <->
CLI name <-> display name.

Torch-free: the command line and the torch-free predictor read it; a kind's class
(torch) is imported when it is first asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..serialization import read_header
from .config import PatchCoreConfig, SoftPatchConfig, SoftPatchPlusConfig
from .model_io import config_class_of


@dataclass(frozen=True)
class ModelKind:
    config_class: type[PatchCoreConfig]
    class_name: str  # in softpatch_cuda.models.kinds
    cli_name: str  # softpatch --model NAME
    display_name: str  # tables and reports

    @property
    def model_type(self) -> str:
        """The name model files store."""
        return self.config_class.model_type

    @property
    def cls(self) -> type:
        from . import kinds  # noqa: PLC0415 -- the detectors need torch

        return getattr(kinds, self.class_name)


MODEL_KINDS: tuple[ModelKind, ...] = (
    ModelKind(SoftPatchConfig, "SoftPatch", "softpatch", "SoftPatch"),
    ModelKind(SoftPatchPlusConfig, "SoftPatchPlus", "softpatch-plus", "SoftPatch+"),
    ModelKind(PatchCoreConfig, "PatchCore", "patchcore", "PatchCore"),
)
CLI_NAMES: tuple[str, ...] = tuple(k.cli_name for k in MODEL_KINDS)


def kind_by_cli_name(name: str) -> ModelKind:
    for kind in MODEL_KINDS:
        if kind.cli_name == name:
            return kind
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(CLI_NAMES)}")


def kind_by_type(model_type: Any) -> ModelKind | None:
    return next((k for k in MODEL_KINDS if k.model_type == model_type), None)


def kind_of(model: Any) -> ModelKind:
    """The kind of a model (a detector, or the torch-free predictor) by its model type."""
    return next(k for k in MODEL_KINDS if k.model_type == model.model_type)


def load_model(path: str | os.PathLike, device: str = "auto", weights: str | os.PathLike | None = None) -> Any:
    """Load any model written by ``save`` (PatchCore, SoftPatch or SoftPatchPlus).

    The file is verified (checksum, types, ranges, finite values) and the rebuilt
    backbone's weights must match the fingerprint stored at fit. ``weights``: the
    backbone weights file when the stored path is not valid here (a moved model).
    """
    config_class = config_class_of(read_header(path), path)
    return kind_by_type(config_class.model_type).cls.load(path, device=device, weights=weights)
