"""Model files <-> fitted states (the file format itself: :mod:`softpatch_cuda.serialization`).

Tensors: the projection, each bank's features / source images / soft weights /
leave-out support distances, the training report's arrays (and its evidence columns).
Header (JSON): model type, the typed config as-is, the
threshold and score floor, the backbone spec, embed_dim, fit information and the
report's names.

:func:`read_state` verifies a file once and returns its state as numpy arrays (the
torch-free predictor) or as torch tensors on a device (the detector); torch is imported
only for the latter.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._interop import to_numpy
from .._validation import is_int, is_number
from .._version import __version__
from ..results import TrainingReport
from ..serialization import read_model_file, write_model_file
from .config import CONFIG_CLASSES, PatchCoreConfig, config_class_for
from .state import BANK_NAMES, FittedState


def save_state(path: str | os.PathLike, model_type: str, config: PatchCoreConfig, state: FittedState) -> None:
    """Write a fitted state (and the config and type of the model it belongs to) to ``path``."""
    tensors: dict[str, np.ndarray] = {"projection": to_numpy(state.projection)}
    for name, bank in state.banks.items():
        tensors[f"{name}_bank.features"] = to_numpy(bank.features)
        tensors[f"{name}_bank.source_image"] = to_numpy(bank.source_image)
        if bank.weights is not None:
            tensors[f"{name}_bank.weights"] = to_numpy(bank.weights)
        if bank.support is not None:
            tensors[f"{name}_bank.support"] = to_numpy(bank.support)
    rep = state.report
    tensors["report.scores"] = np.asarray(rep.scores, dtype=np.float32)
    tensors["report.flagged"] = np.asarray(rep.flagged, dtype=np.uint8)
    tensors["report.removed_fraction"] = np.asarray(rep.removed_fraction, dtype=np.float32)
    for key, values in rep.evidence.items():
        tensors[f"report.evidence.{key}"] = np.asarray(values, dtype=np.float32)
    header = {
        "model_type": model_type,
        "library_version": __version__,
        "config": config.to_dict(),
        "threshold": state.threshold,
        "score_floor": state.score_floor,
        "backbone_spec": state.backbone_spec,
        "embed_dim": state.embed_dim,
        "fit_info": state.fit_info,
        "report": {"names": rep.names, "sources": rep.sources, "threshold": rep.threshold},
    }
    write_model_file(path, tensors, header)


def _fail(path: str, what: str) -> None:
    raise ValueError(f"{path}: corrupt model file ({what})")


def _array(tensors: dict, key: str, path: str, ndim: int, dtype: str, finite: bool = True) -> np.ndarray:
    a = tensors.get(key)
    if a is None:
        _fail(path, f"missing tensor {key!r}")
    if a.ndim != ndim or a.dtype.name != dtype:
        _fail(path, f"{key} has shape {tuple(a.shape)} and dtype {a.dtype}")
    if finite and a.dtype.kind == "f" and not np.isfinite(a).all():
        _fail(path, f"{key} holds NaN or infinite values")
    return a


def check_contents(tensors: dict[str, np.ndarray], header: dict, path: str) -> None:
    """Every stored array and header entry is of the right type, shape and range and the
    pieces agree with each other; a damaged model is refused here, never used."""
    if not isinstance(header.get("backbone_spec"), dict):
        _fail(path, "no backbone spec")
    embed_dim = header.get("embed_dim")
    if not is_int(embed_dim) or embed_dim < 1:
        _fail(path, f"embed_dim {embed_dim!r}")
    for key, required in (("threshold", True), ("score_floor", False)):
        value = header.get(key)
        if (required or value is not None) and (not is_number(value) or not math.isfinite(value)):
            _fail(path, f"{key} {value!r}")
    if not isinstance(header.get("fit_info", {}), dict):
        _fail(path, "fit_info")
    rep = header.get("report")
    if not isinstance(rep, dict) or not isinstance(rep.get("names"), list) or not isinstance(rep.get("sources"), list):
        _fail(path, "no training report")
    n = len(rep["names"])
    if n < 1 or len(rep["sources"]) != n or not all(isinstance(x, str) for x in rep["names"]):
        _fail(path, "training report names / sources")
    proj = _array(tensors, "projection", path, 2, "float32")
    if proj.shape[0] != embed_dim:
        _fail(path, f"projection is {tuple(proj.shape)} but embed_dim is {embed_dim}")
    for name in BANK_NAMES:
        if f"{name}_bank.features" not in tensors:
            if name == "cls":
                _fail(path, "no classification memory bank")
            continue
        feats = _array(tensors, f"{name}_bank.features", path, 2, "float32")
        if feats.shape[0] < 1 or feats.shape[1] != embed_dim:
            _fail(path, f"{name} bank is {tuple(feats.shape)} for embed_dim {embed_dim}")
        src = _array(tensors, f"{name}_bank.source_image", path, 1, "int64")
        if src.shape[0] != feats.shape[0] or (src < 0).any() or (src >= n).any():
            _fail(path, f"{name} bank source images")
        for part in ("weights", "support"):
            if f"{name}_bank.{part}" in tensors:
                a = _array(tensors, f"{name}_bank.{part}", path, 1, "float32")
                if a.shape[0] != feats.shape[0] or (a < 0).any():
                    _fail(path, f"{name} bank {part}")
    scores = _array(tensors, "report.scores", path, 1, "float32", finite=False)
    if scores.shape[0] != n or not (np.isfinite(scores).all() or np.isnan(scores).all()):
        _fail(path, "training report scores")  # all NaN: a report without scores
    flagged = _array(tensors, "report.flagged", path, 1, "uint8")
    removed = _array(tensors, "report.removed_fraction", path, 1, "float32")
    if flagged.shape[0] != n or (flagged > 1).any() or removed.shape[0] != n or (removed < 0).any() \
            or (removed > 1).any():
        _fail(path, "training report arrays")
    for key in [k for k in tensors if k.startswith("report.evidence.")]:
        ev = _array(tensors, key, path, 1, "float32")  # robust z-scores: any finite value
        if ev.shape[0] != n:
            _fail(path, f"training report {key[len('report.'):]}")


def config_class_of(header: dict, path: Any) -> type[PatchCoreConfig]:
    """The config class of a model file's model type; unknown types are refused, naming the known ones."""
    config_class = config_class_for(header.get("model_type"))
    if config_class is None:
        known = sorted(c.model_type for c in CONFIG_CLASSES)
        raise ValueError(f"{path}: unknown model type {header.get('model_type')!r} (known: {known})")
    return config_class


@dataclass
class StoredModel:
    """A model file's contents: the kind of model (its type name), its typed config, its fitted state."""

    model_type: str
    config: PatchCoreConfig
    state: FittedState



def read_state(path: str | os.PathLike, framework: str = "np", device: Any = "cpu") -> StoredModel:
    """Read and verify a model file (checksum, types, shapes, ranges, finite values).
    ``framework``: "np" (numpy arrays) or "pt" (torch tensors on ``device``)."""
    if framework not in ("np", "pt"):
        raise ValueError(f"framework must be 'np' or 'pt', got {framework!r}")
    path = str(path)
    tensors, header = read_model_file(path, framework="np")
    model_type = header.get("model_type")
    config_class = config_class_of(header, path)
    stored = header.get("config")
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: corrupt model header (no config)")
    try:
        config = config_class.from_dict(stored)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the stored config does not fit a {model_type} model: {exc}") from exc
    check_contents(tensors, header, path)
    for name in BANK_NAMES:
        if f"{name}_bank.features" in tensors and \
                (f"{name}_bank.support" in tensors) != (name in config.support_banks()):
            _fail(path, f"the {name} bank's support distances do not match the config (support_images "
                        f"{getattr(config, 'support_images', None)})")
    if framework == "pt":
        import torch  # noqa: PLC0415

        def array(a: np.ndarray) -> Any:
            return torch.from_numpy(np.array(a)).to(device)  # a writable copy: the file's buffer is read-only
    else:
        def array(a: np.ndarray) -> Any:
            return np.ascontiguousarray(a)

    banks = {}
    for name in BANK_NAMES:
        if f"{name}_bank.features" in tensors:
            weights, support = tensors.get(f"{name}_bank.weights"), tensors.get(f"{name}_bank.support")
            banks[name] = config.memory_bank(array(tensors[f"{name}_bank.features"]),
                                             None if weights is None else array(weights),
                                             array(tensors[f"{name}_bank.source_image"]),
                                             None if support is None else array(support))
    rep = header["report"]
    report = TrainingReport(list(rep["names"]), list(rep["sources"]), np.array(tensors["report.scores"]),
                            tensors["report.flagged"].astype(bool), float(rep.get("threshold", float("nan"))),
                            np.array(tensors["report.removed_fraction"]),
                            {k[len("report.evidence."):]: np.array(v) for k, v in tensors.items()
                             if k.startswith("report.evidence.")})
    fit_info = dict(header.get("fit_info") or {})
    state = FittedState(projection=array(tensors["projection"]), banks=banks, report=report,
                        threshold=float(header["threshold"]), score_floor=float(header.get("score_floor", 0.0)),
                        alignment=fit_info.get("alignment"), alignment_statistic=fit_info.get("alignment_statistic"),
                        backbone_spec=header["backbone_spec"], embed_dim=int(header["embed_dim"]), fit_info=fit_info)
    return StoredModel(model_type, config, state)
