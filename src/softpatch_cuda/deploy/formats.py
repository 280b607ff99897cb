"""The graph formats a model's embedding is exported to and served from: one table.

Each :class:`GraphFormat` names its file ending, the optional extra that installs its
engine, how a file is loaded into a callable :class:`Graph` (torch-free: ONNX Runtime,
OpenVINO) and which function of :mod:`.graph` writes one (torch; named here, so this
table loads without it). :func:`.graph.export`, the predictor's loader and the command
line's ``--format`` / ``--graph`` all read it.

Every exported graph has a checksum file beside it, ``<graph>.sha256`` (the format of
``sha256sum``: one line per file of the graph -- the .onnx; the .xml and its .bin), and
:func:`load_graph` verifies it before the engine reads the graph: a graph changed or
damaged after export, or one without a checksum file, is refused with one line (a
damaged graph otherwise runs and silently changes scores). The checksum lies beside the
graph rather than in the model file: one graph serves every model fitted with the same
backbone, and it is written after (and apart from) the model file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

GRAPH_FORMAT = "softpatch_cuda.embedding_graph"  # the "format" entry of every graph's metadata
GRAPH_VERSION = "1"
METADATA_KEYS = ("format", "format_version", "softpatch_cuda", "backbone", "layers", "fingerprint", "embed_dim",
                 "stride")


@dataclass
class Graph:
    """A loaded embedding graph: call it on [B, 3, H, W] float32 pixels -> [B, h, w, D] embeddings."""

    run: Callable[[np.ndarray], np.ndarray]
    metadata: dict[str, str]
    engine: str
    path: str

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(pixels, dtype=np.float32))


def _load_onnx(path: Path, threads: int | None) -> Graph:
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError("an ONNX graph needs onnxruntime (pip install onnxruntime)") from exc
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own types for bad files
        raise ValueError(f"{path} is not a loadable ONNX graph: {' '.join(str(exc).split())[:300]}") from exc
    meta = dict(session.get_modelmeta().custom_metadata_map)
    name = session.get_inputs()[0].name
    return Graph(lambda x: session.run(None, {name: x})[0], meta, "onnxruntime", str(path))


def _load_openvino(path: Path, threads: int | None) -> Graph:
    try:
        import openvino as ov  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError("an OpenVINO IR graph needs the openvino package (pip install openvino)") from exc
    core = ov.Core()
    model = core.read_model(str(path))
    meta = {key: model.get_rt_info(["softpatch_cuda", key]).astype(str) for key in METADATA_KEYS
            if model.has_rt_info(["softpatch_cuda", key])}
    # f32 inference: on CPUs with native bf16 (AMX, AVX512-BF16) OpenVINO otherwise
    # defaults to bf16, and the scores would drift from the torch path's
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = core.compile_model(model, "CPU", config)
    output = compiled.output(0)
    return Graph(lambda x: np.asarray(compiled(x)[output]), meta, "openvino", str(path))


@dataclass(frozen=True)
class GraphFormat:
    name: str  # softpatch export --format NAME
    suffix: str  # the graph file's ending
    extra: str  # the package extra that installs the engine
    load: Callable[[Path, int | None], Graph]
    writer: str  # the function of softpatch_cuda.deploy.graph that writes it
    companions: tuple[str, ...] = ()  # endings of the files written beside it (OpenVINO: the .bin weights)

    def files(self, path: Path) -> list[Path]:
        """The files a graph ``path`` of this format consists of."""
        return [path] + [path.with_suffix(suffix) for suffix in self.companions]


GRAPH_FORMATS: tuple[GraphFormat, ...] = (
    GraphFormat("onnx", ".onnx", "export", _load_onnx, "export_onnx"),
    GraphFormat("openvino", ".xml", "openvino", _load_openvino, "export_openvino", (".bin",)),
)
FORMAT_NAMES: tuple[str, ...] = tuple(f.name for f in GRAPH_FORMATS)


def graph_format(name: str) -> GraphFormat:
    for fmt in GRAPH_FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"format must be one of {list(FORMAT_NAMES)}, got {name!r}")


def format_of(path: str | os.PathLike) -> GraphFormat:
    """The format of a graph file, by its ending."""
    suffix = Path(path).suffix.lower()
    for fmt in GRAPH_FORMATS:
        if fmt.suffix == suffix:
            return fmt
    raise ValueError(f"{path}: a graph file ends in {' or '.join(f.suffix for f in GRAPH_FORMATS)} "
                     f"({', '.join(f'{f.suffix}: {f.name}' for f in GRAPH_FORMATS)})")


CHECKSUM_SUFFIX = ".sha256"


def checksum_path(path: str | os.PathLike) -> Path:
    """The checksum file of a graph: ``<graph>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_graph_checksum(path: str | os.PathLike) -> Path:
    """Write the checksum file of the graph ``path`` (every file of it; ``sha256sum -c``
    checks it too). Called by the exporters once the graph is complete."""
    from ..serialization import write_atomically  # noqa: PLC0415

    path = Path(path)
    text = "".join(f"{_sha256(f)}  {f.name}\n" for f in format_of(path).files(path))
    return write_atomically(checksum_path(path), lambda tmp: tmp.write_text(text))


def verify_graph(path: str | os.PathLike) -> None:
    """Check a graph's files against its checksum file: ValueError (one line) when the
    checksum file is missing or unreadable or a file does not match it."""
    path = Path(path)
    sidecar = checksum_path(path)
    export = f"softpatch export MODEL --format {format_of(path).name} --out {path}"
    if not sidecar.is_file():
        raise ValueError(f"{path} has no checksum file ({sidecar.name}; graphs exported by earlier versions have "
                         f"none), so damage to it cannot be detected: re-export it ({export})")
    stored: dict[str, str] = {}
    try:
        for line in sidecar.read_text().splitlines():
            if line.strip():
                digest, name = line.split(maxsplit=1)
                stored[name.strip().lstrip("*")] = digest.lower()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{sidecar} is not a readable checksum file ({exc}): re-export the graph ({export})") from exc
    for f in format_of(path).files(path):
        if f.name not in stored:
            raise ValueError(f"{sidecar} has no checksum for {f.name}: re-export the graph ({export})")
        if not f.is_file():
            raise FileNotFoundError(f"{f.name}, a file of the graph {path}, is missing")
        if _sha256(f) != stored[f.name]:
            raise ValueError(f"{f} is damaged: its SHA-256 does not match {sidecar.name} (the graph was changed or "
                             f"corrupted after export); re-export it ({export})")


def load_graph(path: str | os.PathLike, threads: int | None = None, *, verify: bool = True) -> Graph:
    """An exported graph, run by its format's engine (``threads``: its intra-op threads).
    ``verify``: check it against its checksum file first (:func:`verify_graph`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"graph file not found: {path}")
    fmt = format_of(path)
    if verify:
        verify_graph(path)
    return fmt.load(path, threads)
