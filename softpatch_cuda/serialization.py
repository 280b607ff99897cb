"""Model files: one safetensors file, no pickle, verified on load.

Arrays (projection matrix, memory banks, soft weights, training report arrays) are
safetensors tensors; everything else (format name and version, model class, config,
threshold, backbone spec, transform, report names) is JSON in the safetensors
metadata under the key ``"softpatch_cuda"``. Backbone weights are not stored: the
backbone is rebuilt from its spec (package / timm / file weights; random weights are
re-drawn from the saved seed) and checked against the stored weights fingerprint.

Since format version 2 the header carries a SHA-256 checksum over the header itself
and every tensor (name, dtype, shape, bytes): a flipped byte anywhere is refused on
load instead of silently changing scores. Files are written to a temporary name and
renamed (a crash never leaves a half-written model), with the permissions the
process's umask gives any new file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ._validation import is_int

FORMAT_NAME = "softpatch_cuda.model"
FORMAT_VERSION = 2
METADATA_KEY = "softpatch_cuda"
CHECKSUM_KEY = "checksum"


def content_checksum(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> str:
    """SHA-256 over the header (canonical JSON, without the checksum) and every tensor."""
    digest = hashlib.sha256()
    body = {k: v for k, v in header.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(body, sort_keys=True, allow_nan=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_model_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    """Write ``tensors`` and the JSON ``header`` (plus format, version, checksum) to ``path``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"model path {path} is a folder; pass a file path such as {path / 'model.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    payload = dict(header, format=FORMAT_NAME, format_version=FORMAT_VERSION)
    payload[CHECKSUM_KEY] = content_checksum(cpu, payload)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(cpu, str(tmp), metadata={METADATA_KEY: json.dumps(payload, allow_nan=True)})
        os.chmod(tmp, _default_file_mode())  # safetensors creates 0600 files
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a model file: (tensors on the CPU, header). One-line ValueErrors
    for corrupt, damaged, foreign and too-new files; FileNotFoundError for missing ones."""
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
    if not is_int(version) or version < 1:
        raise ValueError(f"{path}: corrupt model header (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written with model format version {version}, newer than this softpatch_cuda "
            f"understands ({FORMAT_VERSION}); upgrade softpatch_cuda to load it"
        )
    if version >= 2:
        stored = header.get(CHECKSUM_KEY)
        if not isinstance(stored, str):
            raise ValueError(f"{path}: corrupt model header (no checksum)")
        if content_checksum(tensors, header) != stored:
            raise ValueError(f"{path} is damaged: its checksum does not match its contents (the file was "
                             "changed or corrupted after it was written); refit or restore the file")
    return tensors, header
