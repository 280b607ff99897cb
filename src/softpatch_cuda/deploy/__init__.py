"""Deployment without torch: the embedding graph export and the predictor that serves it.

* :mod:`.formats` -- the graph formats (ONNX, OpenVINO IR): one table, the loaders, the
  graph's checksum file (``<graph>.sha256``, verified at load);
* :mod:`.graph` -- the exported graph and ``export()`` (needs torch and onnx);
* :mod:`.predictor` -- :class:`OnnxDetector`: graph + model file, scored without torch.

Importing this package does not import torch; ``export`` is loaded on first use.
"""

from .formats import (FORMAT_NAMES, GRAPH_FORMATS, Graph, GraphFormat, checksum_path, graph_format, load_graph,
                      verify_graph)
from .predictor import OnnxDetector


def __getattr__(name: str):
    if name == "export":  # needs torch: imported on use
        from .graph import export  # noqa: PLC0415

        return export
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FORMAT_NAMES", "GRAPH_FORMATS", "Graph", "GraphFormat", "OnnxDetector", "checksum_path", "export",
           "graph_format", "load_graph", "verify_graph"]
