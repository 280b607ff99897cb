"""The one table of model kinds: type name (model files) <-> class <-> CLI name <-> display name."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .detector import Detector
from .kinds import PatchCore, SoftPatch, SoftPatchPlus


@dataclass(frozen=True)
class ModelKind:
    model_type: str  # stored in model files
    cls: type[Detector]
    cli_name: str  # softpatch --model NAME
    display_name: str  # tables and reports


MODEL_KINDS: tuple[ModelKind, ...] = (
    ModelKind("softpatch", SoftPatch, "softpatch", "SoftPatch"),
    ModelKind("softpatch_plus", SoftPatchPlus, "softpatch-plus", "SoftPatch+"),
    ModelKind("patchcore", PatchCore, "patchcore", "PatchCore"),
)
CLI_NAMES: tuple[str, ...] = tuple(k.cli_name for k in MODEL_KINDS)


def kind_by_cli_name(name: str) -> ModelKind:
    for kind in MODEL_KINDS:
        if kind.cli_name == name:
            return kind
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(CLI_NAMES)}")


def kind_by_type(model_type: str) -> ModelKind | None:
    return next((k for k in MODEL_KINDS if k.model_type == model_type), None)


def kind_of(model: Detector) -> ModelKind:
    return next(k for k in MODEL_KINDS if isinstance(model, k.cls))


def load_model(path: str | os.PathLike, device: str = "auto", weights: str | os.PathLike | None = None) -> Detector:
    """Load any model written by ``save`` (PatchCore, SoftPatch or SoftPatchPlus).

    The file is verified (checksum, types, ranges, finite values) and the rebuilt
    backbone's weights must match the fingerprint stored at fit. ``weights``: the
    backbone weights file when the stored path is not valid here (a moved model).
    """
    from ..serialization import read_model_file  # noqa: PLC0415
    from .model_io import restore_model  # noqa: PLC0415

    tensors, header = read_model_file(path)
    kind = kind_by_type(header.get("model_type"))
    if kind is None:
        known = sorted(k.model_type for k in MODEL_KINDS)
        raise ValueError(f"{path}: unknown model type {header.get('model_type')!r} (known: {known})")
    stored = header.get("config")
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: corrupt model header (no config)")
    try:
        config = kind.cls.config_class.from_dict(stored)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the stored config does not fit {kind.cls.__name__}: {exc}") from exc
    model = kind.cls(device=device, **config.to_dict())
    restore_model(model, tensors, header, str(path), model.config["device"],
                  weights=None if weights is None else os.fspath(weights))
    return model
