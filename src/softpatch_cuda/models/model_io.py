"""Saving and loading fitted detectors (the file format itself: :mod:`softpatch_cuda.serialization`).

Tensors: the projection, each bank's features / source images / soft weights, the
training report's arrays. Header (JSON): model type, the typed config as-is, the
threshold, the backbone spec, fit information and the report's names.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._validation import is_int, is_number
from .._version import __version__
from ..memory_bank import MemoryBank
from ..results import TrainingReport
from ..runtime import resolve_device
from ..serialization import write_model_file

if TYPE_CHECKING:
    from .detector import Detector

BANK_NAMES = ("cls", "seg")


def save_model(model: "Detector", path: str | os.PathLike) -> None:
    tensors: dict[str, torch.Tensor] = {"projection": model._projection}
    for name, bank in zip(BANK_NAMES, (model._cls_bank, model._seg_bank)):
        if bank is None:
            continue
        tensors[f"{name}_bank.features"] = bank.features
        tensors[f"{name}_bank.source_image"] = bank.source_image
        if bank.weights is not None:
            tensors[f"{name}_bank.weights"] = bank.weights
    rep = model._report
    tensors["report.scores"] = torch.from_numpy(np.asarray(rep.scores, dtype=np.float32))
    tensors["report.flagged"] = torch.from_numpy(np.asarray(rep.flagged, dtype=np.uint8))
    tensors["report.removed_fraction"] = torch.from_numpy(np.asarray(rep.removed_fraction, dtype=np.float32))
    header = {
        "model_type": model.model_type,
        "library_version": __version__,
        "config": model.settings.to_dict(),
        "threshold": model._threshold,
        "backbone_spec": model._extractor.spec(),
        "embed_dim": model._embedder.embed_dim,
        "fit_info": model.fit_info_,
        "report": {"names": rep.names, "sources": rep.sources, "threshold": rep.threshold},
    }
    write_model_file(path, tensors, header)


def _fail(path: str, what: str) -> None:
    raise ValueError(f"{path}: corrupt model file ({what})")


def _tensor(tensors: dict, key: str, path: str, ndim: int, dtypes: tuple, finite: bool = True) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        _fail(path, f"missing tensor {key!r}")
    if t.ndim != ndim or t.dtype not in dtypes:
        _fail(path, f"{key} has shape {tuple(t.shape)} and dtype {t.dtype}")
    if finite and t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
        _fail(path, f"{key} holds NaN or infinite values")
    return t


def check_contents(tensors: dict[str, torch.Tensor], header: dict, path: str) -> None:
    """Every stored array and header entry is of the right type, shape and range and the
    pieces agree with each other; a damaged model is refused here, never used."""
    if not isinstance(header.get("backbone_spec"), dict):
        _fail(path, "no backbone spec")
    embed_dim = header.get("embed_dim")
    if not is_int(embed_dim) or embed_dim < 1:
        _fail(path, f"embed_dim {embed_dim!r}")
    threshold = header.get("threshold")
    if not is_number(threshold) or math.isnan(threshold):
        _fail(path, f"threshold {threshold!r}")
    rep = header.get("report")
    if not isinstance(rep, dict) or not isinstance(rep.get("names"), list) or not isinstance(rep.get("sources"), list):
        _fail(path, "no training report")
    n = len(rep["names"])
    if n < 1 or len(rep["sources"]) != n or not all(isinstance(x, str) for x in rep["names"]):
        _fail(path, "training report names / sources")
    proj = _tensor(tensors, "projection", path, 2, (torch.float32,))
    if proj.shape[0] != embed_dim:
        _fail(path, f"projection is {tuple(proj.shape)} but embed_dim is {embed_dim}")
    for name in BANK_NAMES:
        if f"{name}_bank.features" not in tensors:
            if name == "cls":
                _fail(path, "no classification memory bank")
            continue
        feats = _tensor(tensors, f"{name}_bank.features", path, 2, (torch.float32,))
        if feats.shape[0] < 1 or feats.shape[1] != embed_dim:
            _fail(path, f"{name} bank is {tuple(feats.shape)} for embed_dim {embed_dim}")
        src = _tensor(tensors, f"{name}_bank.source_image", path, 1, (torch.int64,))
        if src.shape[0] != feats.shape[0] or bool((src < 0).any()) or bool((src >= n).any()):
            _fail(path, f"{name} bank source images")
        if f"{name}_bank.weights" in tensors:
            w = _tensor(tensors, f"{name}_bank.weights", path, 1, (torch.float32,))
            if w.shape[0] != feats.shape[0] or bool((w < 0).any()):
                _fail(path, f"{name} bank weights")
    scores = _tensor(tensors, "report.scores", path, 1, (torch.float32,), finite=False)
    if scores.shape[0] != n or not (bool(torch.isfinite(scores).all()) or bool(torch.isnan(scores).all())):
        _fail(path, "training report scores")  # all NaN: a report without scores
    flagged = _tensor(tensors, "report.flagged", path, 1, (torch.uint8,))
    removed = _tensor(tensors, "report.removed_fraction", path, 1, (torch.float32,))
    if flagged.shape[0] != n or bool((flagged > 1).any()) or removed.shape[0] != n \
            or bool((removed < 0).any()) or bool((removed > 1).any()):
        _fail(path, "training report arrays")


def restore_model(model: "Detector", tensors: dict[str, torch.Tensor], header: dict, path: str, device: str,
                  weights: str | None = None) -> None:
    """Fill a freshly constructed ``model`` from a verified model file's contents
    (``weights``: the backbone weights file, overriding the stored path)."""
    check_contents(tensors, header, path)
    dev = resolve_device(device)
    model._build_components(dev, spec=header["backbone_spec"], weights=weights)
    if model._embedder.embed_dim != header["embed_dim"]:
        _fail(path, f"embed_dim {header['embed_dim']} but the backbone and config give {model._embedder.embed_dim}")
    model._projection = tensors["projection"].to(dev)
    banks = {}
    for name in BANK_NAMES:
        if f"{name}_bank.features" not in tensors:
            continue
        w = tensors.get(f"{name}_bank.weights")
        banks[name] = MemoryBank(tensors[f"{name}_bank.features"].to(dev), None if w is None else w.to(dev),
                                 tensors[f"{name}_bank.source_image"].to(dev), model.settings.distance,
                                 model.settings.search)
    model._cls_bank = banks["cls"]
    model._seg_bank = banks.get("seg")
    rep = header["report"]
    model._report = TrainingReport(
        list(rep["names"]), list(rep["sources"]), tensors["report.scores"].numpy(),
        tensors["report.flagged"].numpy().astype(bool), float(rep.get("threshold", float("nan"))),
        tensors["report.removed_fraction"].numpy(),
    )
    model._threshold = float(header["threshold"])
    model.fit_info_ = dict(header.get("fit_info") or {})
    model._fitted = True
