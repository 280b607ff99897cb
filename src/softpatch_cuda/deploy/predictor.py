"""The torch-free predictor: an exported embedding graph + the model file.

:class:`OnnxDetector` runs the graph written by ``softpatch export`` (:mod:`.graph`;
ONNX Runtime for ``.onnx``, OpenVINO for ``.xml``: image -> patch embeddings) and scores
the embeddings with the torch detector's own code on numpy arrays: the model file read
by :func:`softpatch_cuda.models.model_io.read_state` (verified; its banks search as the
model says, ``search="pca"`` included), the validated ``ops.knn``, the scoring core
:mod:`softpatch_cuda.scoring` and the image handling of :mod:`softpatch_cuda._pixels`.
The graph is checked against its checksum file (``<graph>.sha256``, written by the
export) before it is run: a damaged graph, or one without a checksum file, is refused.
Nothing here imports torch: where the detector runs, install as requirements-deploy.txt
says (no torch; ``openvino`` for .xml graphs); torch is needed only to fit and to export. Scores
equal the torch path's to float rounding of the graph's embeddings (measured
differences: benchmarks/results/scale_export_*.md).

Command line: ``softpatch predict MODEL IMAGES --graph GRAPH --out DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .._pixels import count_items, image_items, iter_pixel_batches
from ..models.model_io import read_state
from ..models.state import FittedModel
from ..results import Prediction
from ..runtime import thread_budget
from ..scoring import predict_batches
from .formats import GRAPH_FORMAT, load_graph


class OnnxDetector(FittedModel):
    """A fitted detector served from an exported graph and its model file, without torch.

    ``predict(images)`` / ``score(images)`` / ``threshold`` as on the torch detectors
    (:class:`softpatch_cuda.models.state.FittedModel`);
    images: a folder, image paths, PIL images or uint8 / uint16 / float arrays (or a list
    of them). ``threads``: the thread budget ("auto": see
    :func:`softpatch_cuda.runtime.choose_threads`) of the k-NN kernels and numpy; a
    number is the graph engine's threads too (with "auto", the engine's default).
    """

    def __init__(self, model_path: str | os.PathLike, graph_path: str | os.PathLike, *,
                 threads: int | str | None = "auto"):
        model_path = str(Path(model_path).expanduser())
        self.threads = threads
        stored = read_state(model_path, framework="np")
        self.graph = load_graph(graph_path, None if self.threads == "auto" else self.threads)
        meta, spec = self.graph.metadata, stored.state.backbone_spec
        if meta.get("format") != GRAPH_FORMAT:
            raise ValueError(f"{graph_path} is not a softpatch_cuda embedding graph (no {GRAPH_FORMAT!r} metadata); "
                             "write one with 'softpatch export MODEL --format onnx'")
        if meta.get("fingerprint") != spec.get("fingerprint") or meta.get("embed_dim") != str(stored.state.embed_dim):
            raise ValueError(f"{graph_path} was exported from another backbone ({meta.get('backbone')}, weights "
                             f"{str(meta.get('fingerprint'))[:12]}, embed_dim {meta.get('embed_dim')}) than {model_path} "
                             f"uses ({spec.get('backbone')}, {str(spec.get('fingerprint'))[:12]}, "
                             f"{stored.state.embed_dim}); export the graph from this model")
        self.model_path = model_path
        self.model_type = stored.model_type
        self.settings = stored.config
        self.state = stored.state
        self.predict_timings_: dict[str, float] = {}

    @property
    def threads(self) -> int | str:
        """The thread budget of the k-NN kernels and numpy (the graph engine keeps its own)."""
        return self._threads

    @threads.setter
    def threads(self, value: int | str | None) -> None:
        value = "auto" if value is None else value
        if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"threads must be 'auto' or an int >= 1, got {value!r}")
        self._threads = value

    def __repr__(self) -> str:
        return f"OnnxDetector({self.model_type}, {self.model_path}, graph={self.graph.path} [{self.graph.engine}])"

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """[B, 3, S, S] normalised pixels -> [B, h, w, D] patch embeddings (the graph)."""
        if not np.isfinite(pixels).all():
            raise ValueError("images contain NaN or infinite pixel values")
        emb = self.graph(pixels)
        if not np.isfinite(emb).all():
            raise ValueError("the graph produced NaN/inf features for these images")
        return emb

    def _run(self, images: Any, with_maps: bool) -> Prediction:
        cfg = self.settings
        self.predict_timings_ = {}
        with thread_budget(self.threads):
            return predict_batches(iter_pixel_batches(image_items(images), cfg.transform(), cfg.batch_size),
                                   self.embed, self.state.banks, image_score=cfg.image_score, threshold=self.threshold,
                                   resize=cfg.resize, crop=cfg.crop, with_maps=with_maps, total=count_items(images),
                                   timings=self.predict_timings_)

