"""Saving and loading fitted detectors (the file format itself: :mod:`softpatch_cuda.serialization`).

Tensors: the projection, each bank's features / source images / soft weights, the
training report's arrays. Header (JSON): model type, the typed config as-is, the
threshold, the backbone spec, fit information and the report's names.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch

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


def restore_model(model: "Detector", tensors: dict[str, torch.Tensor], header: dict, path: str, device: str) -> None:
    """Fill a freshly constructed ``model`` from a model file's contents."""
    dev = resolve_device(device)
    model._build_components(dev, spec=header["backbone_spec"])
    try:
        model._projection = tensors["projection"].to(dev)
        banks = {}
        for name in BANK_NAMES:
            if f"{name}_bank.features" not in tensors:
                continue
            weights = tensors.get(f"{name}_bank.weights")
            banks[name] = MemoryBank(
                tensors[f"{name}_bank.features"].to(dev),
                None if weights is None else weights.to(dev),
                tensors[f"{name}_bank.source_image"].to(dev),
                model.settings.distance,
            )
        model._cls_bank = banks["cls"]
        model._seg_bank = banks.get("seg")
        rep = header["report"]
        model._report = TrainingReport(
            list(rep["names"]), list(rep["sources"]), tensors["report.scores"].numpy(),
            tensors["report.flagged"].numpy().astype(bool), float(rep["threshold"]),
            tensors["report.removed_fraction"].numpy(),
        )
        model._threshold = float(header["threshold"])
        model.fit_info_ = dict(header.get("fit_info", {}))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: incomplete or corrupt model file (missing {exc})") from exc
    if model._embedder.embed_dim != header.get("embed_dim", model._embedder.embed_dim):
        raise ValueError(f"{path}: embed_dim mismatch between header and backbone")
    if model._cls_bank.features.shape[1] != model._projection.shape[0]:
        raise ValueError(f"{path}: memory bank and projection dimensions disagree (corrupt file)")
    model._fitted = True
