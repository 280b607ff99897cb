"""The graph formats a model's embedding is exported to and served from: one table.

Each :class:`GraphFormat` names its file ending, the optional extra that installs its
engine, how a file is loaded into a callable :class:`Graph` (torch-free: ONNX Runtime,
OpenVINO) and which function of :mod:`.graph` writes one (torch; named here, so this
table loads without it). :func:`.graph.export`, the predictor's loader and the command
line's ``--format`` / ``--graph`` all read it.
"""

from __future__ import annotations

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


GRAPH_FORMATS: tuple[GraphFormat, ...] = (
    GraphFormat("onnx", ".onnx", "export", _load_onnx, "export_onnx"),
    GraphFormat("openvino", ".xml", "openvino", _load_openvino, "export_openvino"),
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


def load_graph(path: str | os.PathLike, threads: int | None = None) -> Graph:
    """An exported graph, run by its format's engine (``threads``: its intra-op threads)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"graph file not found: {path}")
    return format_of(path).load(path, threads)
