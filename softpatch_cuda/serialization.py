"""Model files: one safetensors file, no pickle.

Arrays (projection matrix, memory banks, soft weights, training report arrays) are
safetensors tensors; everything else (format name and version, model class, config,
threshold, backbone spec, transform, report names) is JSON in the safetensors
metadata under the key ``"softpatch_cuda"``. Backbone weights are not stored: the
backbone is rebuilt from its spec (package / timm / file weights; random weights
are re-drawn from the saved seed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

FORMAT_NAME = "softpatch_cuda.model"
FORMAT_VERSION = 2
METADATA_KEY = "softpatch_cuda"


def write_model_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    """Write ``tensors`` and the JSON ``header`` to ``path`` (parent folders created)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"model path {path} is a folder; pass a file path such as {path / 'model.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(header, format=FORMAT_NAME, format_version=FORMAT_VERSION)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # Write next to the target, then rename: a crash never leaves a half-written model.
    tmp = path.with_name(path.name + ".tmp")
    save_file(cpu, str(tmp), metadata={METADATA_KEY: json.dumps(payload, allow_nan=True)})
    os.replace(tmp, path)
    return path


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model file: (tensors on the CPU, header). Clear errors for missing,
    corrupt, foreign and too-new files."""
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        raise ValueError(f"model path {path} is a folder, not a model file")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 -- safetensors raises several types for bad files
        raise ValueError(
            f"{path} is not a readable softpatch_cuda model file (not a valid safetensors file: {exc})"
        ) from exc
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise ValueError(
            f"{path} is a safetensors file but not a softpatch_cuda model (no {METADATA_KEY!r} metadata)"
        )
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt model header (invalid JSON: {exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a softpatch_cuda model file (format {header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{path}: corrupt model header (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written with model format version {version}, newer than this softpatch_cuda "
            f"understands ({FORMAT_VERSION}); upgrade softpatch_cuda to load it"
        )
    return tensors, header
