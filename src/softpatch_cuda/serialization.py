"""Model files: one safetensors file, no pickle, verified on load.

Arrays (projection matrix, memory banks, soft weights, training report arrays) are
safetensors tensors; everything else (format name and version, model class, config,
threshold, backbone spec, transform, report names) is JSON in the safetensors
metadata under the key ``"softpatch_cuda"``. Backbone weights are not stored: the
backbone is rebuilt from its spec (package / timm / file weights; random weights are
re-drawn from the saved seed) and checked against the stored weights fingerprint.

Since format version 2 the header carries a SHA-256 checksum over the header itself
and every tensor (name, dtype, shape, bytes): a flipped byte anywhere is refused on
load instead of silently changing scores. A checksum is verified whenever present,
whatever the version field says (it covers that field too); a file that says version 1
(which had no checksum) but holds content only later versions write is refused, and a
genuine version 1 file loads with a warning that it cannot be verified. Files are written to a temporary name and
renamed (a crash never leaves a half-written model), with the permissions the
process's umask gives any new file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

from ._validation import is_int

FORMAT_NAME = "softpatch_cuda.model"
FORMAT_VERSION = 3  # 3: banks' leave-out support distances, the report's evidence columns
METADATA_KEY = "softpatch_cuda"
CHECKSUM_KEY = "checksum"

# Files are written from numpy arrays and read as numpy (torch is never imported here:
# the torch-free predictor reads model files too). The checksum names dtypes as torch
# prints them -- files of earlier versions were written from torch tensors -- so a
# file's checksum is the same whichever framework reads it.
_NUMPY_DTYPE_NAMES = {"float32": "torch.float32", "float16": "torch.float16", "float64": "torch.float64",
                      "int64": "torch.int64", "int32": "torch.int32", "uint8": "torch.uint8", "bool": "torch.bool"}


def _checksum_view(t: Any) -> tuple[str, tuple, bytes]:
    """(dtype name, shape, bytes) of a torch tensor or a numpy array."""
    if type(t).__module__.startswith("torch"):
        t = t.detach().to("cpu").contiguous()
        return str(t.dtype), tuple(t.shape), t.numpy().tobytes()
    import numpy as np  # noqa: PLC0415

    a = np.ascontiguousarray(t)
    name = _NUMPY_DTYPE_NAMES.get(a.dtype.name)
    if name is None:
        raise ValueError(f"unsupported array dtype {a.dtype} in a model file")
    return name, tuple(int(v) for v in a.shape), a.tobytes()


def content_checksum(tensors: dict[str, Any], header: dict[str, Any]) -> str:
    """SHA-256 over the header (canonical JSON, without the checksum) and every tensor
    (torch tensors or numpy arrays: the same digest for the same contents)."""
    digest = hashlib.sha256()
    body = {k: v for k, v in header.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(body, sort_keys=True, allow_nan=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        dtype, shape, data = _checksum_view(tensors[name])
        digest.update(f"\0{name}\0{dtype}\0{shape}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write a file under a temporary name beside ``path`` (``write(tmp)``) and move it into
    place when complete: a crash or an error never leaves a half-written file, and the old
    one stays until then. The folder is created when missing."""
    import tempfile  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, created exclusively (O_EXCL | O_NOFOLLOW): a predictable name could be
    # a planted symlink that the write would follow onto another file.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600 files; the umask's mode, as any new file
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
    return path


def write_model_file(path: str | os.PathLike, tensors: dict[str, Any], header: dict[str, Any]) -> Path:
    """Write ``tensors`` (numpy arrays) and the JSON ``header`` (plus format, version,
    checksum) to ``path``."""
    import numpy as np  # noqa: PLC0415
    from safetensors.numpy import save_file  # noqa: PLC0415

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"model path {path} is a folder; pass a file path such as {path / 'model.safetensors'}")
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    payload = dict(header, format=FORMAT_NAME, format_version=FORMAT_VERSION)
    payload[CHECKSUM_KEY] = content_checksum(arrays, payload)

    def write(tmp: Path) -> None:
        save_file(arrays, str(tmp), metadata={METADATA_KEY: json.dumps(payload, allow_nan=True)})
        os.chmod(tmp, _default_file_mode())  # safetensors creates 0600 files

    return write_atomically(path, write)


def _open_file(path: Path, framework: str, with_tensors: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, header) of a model file, the header's format and version checked."""
    from safetensors import safe_open  # noqa: PLC0415

    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        raise ValueError(f"model path {path} is a folder, not a model file")
    try:
        tensors: dict[str, Any] = {}
        with safe_open(str(path), framework=framework, device="cpu") as f:
            metadata = f.metadata() or {}
            for key in f.keys() if with_tensors else ():
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
    return tensors, header


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """A model file's header alone (format and version checked; the checksum is checked
    when the file is read with :func:`read_model_file`)."""
    return _open_file(Path(path), "np", with_tensors=False)[1]


def read_model_file(path: str | os.PathLike, framework: str = "pt") -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and verify a model file: (tensors on the CPU, header). One-line ValueErrors
    for corrupt, damaged, foreign and too-new files; FileNotFoundError for missing ones.

    ``framework``: "pt" (torch tensors) or "np" (numpy arrays; torch is not imported)."""
    if framework not in ("pt", "np"):
        raise ValueError(f"framework must be 'pt' or 'np', got {framework!r}")
    path = Path(path)
    tensors, header = _open_file(path, framework, with_tensors=True)
    # A checksum, when there is one, is verified whatever the version says: the version
    # field is part of what it covers, so a file relabelled as older fails it too.
    if CHECKSUM_KEY in header or header["format_version"] >= 2:
        stored = header.get(CHECKSUM_KEY)
        if not isinstance(stored, str):
            raise ValueError(f"{path}: corrupt model header (no checksum)")
        if content_checksum(tensors, header) != stored:
            raise ValueError(f"{path} is damaged: its checksum does not match its contents (the file was "
                             "changed or corrupted after it was written); refit or restore the file")
        return tensors, header
    # Version 1 (0.1) files have no checksum. One that holds what only later versions
    # write is a later file whose version field was lowered (and checksum dropped) to get
    # past verification: refused. A genuine one is used as far as it can be verified (the
    # model layer still checks every array's type, shape and range), with a warning.
    later = later_version_content(tensors, header)
    if later:
        named = ", ".join(later[:3]) + (f" and {len(later) - 3} more" if len(later) > 3 else "")
        raise ValueError(f"{path} says model format version 1 but holds {named}, which version 1 files "
                         "never had: its version field was changed and its checksum removed (or the file is "
                         "damaged); it cannot be verified, so it is not used -- refit or restore the file")
    warnings.warn(f"{path} is a model format version 1 file: it has no checksum, so damage to it cannot be "
                  "detected; save it again (load_model(path).save(path)) to add one", UserWarning, stacklevel=2)
    return tensors, header


# What only files of format version >= 2 hold: version 1 wrote the model type, library
# version, config, threshold, backbone spec (no weights fingerprint), embed_dim, fit
# information and report names; its tensors were the projection, the banks' features,
# source images and weights and the report's scores / flagged / removed fractions.
V1_HEADER_KEYS = frozenset({"format", "format_version", "model_type", "library_version", "config", "threshold",
                            "backbone_spec", "embed_dim", "fit_info", "report"})
V1_TENSOR_PARTS = (".features", ".source_image", ".weights")
V1_TENSORS = frozenset({"projection", "report.scores", "report.flagged", "report.removed_fraction"})


def later_version_content(tensors: dict[str, Any], header: dict[str, Any]) -> list[str]:
    """What in a file that says format version 1 only later versions write (empty: nothing)."""
    found = [f"the header entry {key!r}" for key in sorted(set(header) - V1_HEADER_KEYS)]
    spec = header.get("backbone_spec")
    if isinstance(spec, dict) and "fingerprint" in spec:
        found.append("a backbone weights fingerprint")
    found += [f"the tensor {name!r}" for name in sorted(tensors)
              if name not in V1_TENSORS and not (name.endswith(V1_TENSOR_PARTS) and "_bank." in name)]
    return found
