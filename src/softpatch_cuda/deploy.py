"""Torch-free predictor: an exported embedding graph + the model file.

:class:`OnnxDetector` scores images with

* the graph written by ``softpatch export`` (:mod:`softpatch_cuda.export`): ONNX Runtime
  for ``.onnx``, OpenVINO for ``.xml``, image -> patch embeddings;
* the model's safetensors file, read as numpy: memory bank(s), soft weights, threshold,
  transform (checksum verified, the graph's backbone fingerprint checked against the model's);
* the package's compiled k-NN (``softpatch_cuda._core.knn_cpu``) on numpy arrays;
* numpy / PIL for the transform, the bilinear upsampling and the Gaussian smoothing of the maps.

Nothing here imports torch: install ``softpatch-cuda`` and ``onnxruntime`` (or
``openvino``) where the detector runs; torch is needed only to fit and to export.
Scores equal the torch path's to float rounding (the test holds them to 1e-4
relative; measured differences are in benchmarks/results/scale_export_*.md).

Command line (torch-free): ``python -m softpatch_cuda.deploy MODEL GRAPH IMAGES --out DIR``
writes the same predictions.csv / .json / overlays as ``softpatch predict``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from . import _core
from ._pixels import IMAGENET_MEAN, IMAGENET_STD, _to_rgb, list_images, load_image, model_input
from .results import Prediction
from .serialization import read_model_file

MAP_SIGMA = 4.0  # the torch path's softpatch_cuda.postprocess.MAP_SIGMA (a test holds them equal)
REWEIGHT_NEIGHBOURS = 9  # softpatch_cuda.memory_bank.REWEIGHT_NEIGHBOURS
GRAPH_FORMAT = "softpatch_cuda.embedding_graph"  # softpatch_cuda.export.GRAPH_FORMAT


# ------------------------------------------------------------------ the graph
@dataclass
class Graph:
    """A loaded embedding graph: call it on [B, 3, H, W] float32 pixels -> [B, h, w, D] embeddings."""

    run: Callable[[np.ndarray], np.ndarray]
    metadata: dict[str, str]
    engine: str
    path: str

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(pixels, dtype=np.float32))


def load_graph(path: str | os.PathLike, threads: int | None = None) -> Graph:
    """An exported graph: ``.onnx`` with ONNX Runtime, ``.xml`` (OpenVINO IR) with OpenVINO."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"graph file not found: {path}")
    if path.suffix.lower() == ".xml":
        try:
            import openvino as ov  # noqa: PLC0415
        except ImportError as exc:
            raise ImportError("an OpenVINO IR graph needs the openvino package (pip install openvino)") from exc
        core = ov.Core()
        model = core.read_model(str(path))
        meta = {}
        for key in ("format", "format_version", "softpatch_cuda", "backbone", "layers", "fingerprint", "embed_dim",
                    "stride"):
            if model.has_rt_info(["softpatch_cuda", key]):
                meta[key] = model.get_rt_info(["softpatch_cuda", key]).astype(str)
        # f32 inference: on CPUs with native bf16 (AMX, AVX512-BF16) OpenVINO otherwise
        # defaults to bf16, and the scores would drift from the torch path's
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = core.compile_model(model, "CPU", config)
        output = compiled.output(0)
        return Graph(lambda x: np.asarray(compiled(x)[output]), meta, "openvino", str(path))
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


# ------------------------------------------------------------------ maps (numpy twins of postprocess)
def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a linear resize, align_corners=False (torch's rule:
    src = (dst + 0.5) * in / out - 0.5, clamped at 0; the upper index clamped at in - 1)."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    # one rounding of scale * (dst + 0.5) - 0.5 to float32, as torch's fused multiply-add gives
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def resize_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[B, h, w] -> [B, H, W] bilinear (``F.interpolate(..., mode="bilinear", align_corners=False)``)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[-2:] == tuple(size):
        return maps.copy()
    y0, y1, wy0, wy1 = _linear_weights(maps.shape[-2], size[0])
    x0, x1, wx0, wx1 = _linear_weights(maps.shape[-1], size[1])
    rows = maps[:, y0, :] * wy0[None, :, None] + maps[:, y1, :] * wy1[None, :, None]
    return rows[:, :, x0] * wx0[None, None, :] + rows[:, :, x1] * wx1[None, None, :]


def gaussian_taps(sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    taps = np.exp(np.float32(-0.5) * (x / np.float32(sigma)) ** 2).astype(np.float32)
    return taps / taps.sum()


def gaussian_blur(maps: np.ndarray, sigma: float = MAP_SIGMA) -> np.ndarray:
    """Separable Gaussian blur of [B, H, W] maps, scipy's 'reflect' border (d c b a | a b c d)."""
    if sigma <= 0:
        return maps
    taps = gaussian_taps(sigma)
    radius = (taps.size - 1) // 2
    out = np.asarray(maps, dtype=np.float32)
    for axis in (2, 1):  # width first, as the torch path
        n = out.shape[axis]
        idx = np.arange(-radius, n + radius)
        idx = np.remainder(idx, 2 * n)
        idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
        padded = np.take(out, idx, axis=axis)
        acc = np.zeros_like(out)
        for t, weight in enumerate(taps):
            acc += weight * np.take(padded, np.arange(t, t + n), axis=axis)
        out = acc
    return out


def patch_scores_to_maps(patch_scores: np.ndarray, size: tuple[int, int], sigma: float = MAP_SIGMA) -> np.ndarray:
    return gaussian_blur(resize_bilinear(patch_scores, size), sigma)


def map_to_input_size(amap: np.ndarray, input_size: tuple[int, int], resize: int | None, crop: int | None,
                      out_size: tuple[int, int] | None = None) -> np.ndarray:
    """Undo resize + centre crop (``softpatch_cuda.postprocess.map_to_input_size`` in numpy)."""
    height, width = (int(v) for v in input_size)
    t = np.asarray(amap, dtype=np.float32)
    frame_h, frame_w = (resize, resize) if resize is not None else (height, width)
    if crop is not None:
        top, left = int(round((frame_h - crop) / 2.0)), int(round((frame_w - crop) / 2.0))
        pad = ((top, frame_h - crop - top), (left, frame_w - crop - left))
        if any(p > 0 for pair in pad for p in pair):
            t = np.pad(t, pad, mode="edge")
    target = (height, width) if out_size is None else tuple(int(v) for v in out_size)
    if t.shape != target:
        t = resize_bilinear(t[None], target)[0]
    return t


# ------------------------------------------------------------------ memory bank
@dataclass
class NumpyBank:
    features: np.ndarray  # [m, D] float32
    weights: np.ndarray | None  # [m] float32
    distance: str = "l2"

    def knn(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.features))
        dist = np.empty((q.shape[0], k), np.float32)
        idx = np.empty((q.shape[0], k), np.int64)
        score = np.empty(q.shape[0], np.float32) if self.weights is not None and k >= 1 else None
        _core.knn_cpu(q, self.features, k, self.weights, dist, idx, score, 0, 0)
        return dist, idx, score

    def score(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[q, D] -> (patch scores [q], nearest bank row [q]), as ``MemoryBank.score``."""
        dist, idx, weighted = self.knn(queries, 1)
        index, d = idx[:, 0], dist[:, 0]
        if self.distance == "squared_l2":
            d = d * d
            scores = d if self.weights is None else d * self.weights[index]
        else:
            scores = d if self.weights is None else weighted
        return scores, index

    def image_scores(self, queries: np.ndarray, patch_scores: np.ndarray, nearest: np.ndarray,
                     mode: str) -> np.ndarray:
        """[B, P] patch scores -> [B] image scores (``MemoryBank.image_scores``)."""
        where = patch_scores.argmax(axis=1)
        top = patch_scores[np.arange(len(where)), where]
        if mode == "max":
            return top
        rows = np.arange(len(where)) * patch_scores.shape[1] + where
        matched = nearest[rows]
        _, support, _ = NumpyBank(self.features, None).knn(self.features[matched], REWEIGHT_NEIGHBOURS)
        dist = np.linalg.norm(queries[rows][:, None, :] - self.features[support], axis=2).astype(np.float32)
        e = np.exp(dist - dist.max(axis=1, keepdims=True))
        return ((np.float32(1.0) - e[:, 0] / e.sum(axis=1)) * top).astype(np.float32)


# ------------------------------------------------------------------ the predictor
class DeployPrediction(Prediction):
    """What :meth:`OnnxDetector.predict` returns: a :class:`softpatch_cuda.Prediction`
    whose maps go back onto the original images with numpy instead of torch."""

    def map_at_input_size(self, i: int, out_size: tuple[int, int] | None = None) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"image index {i} out of range for a prediction of {len(self)} images")
        return map_to_input_size(self.maps[i], self.input_sizes[i], self.resize, self.crop, out_size)


def _fail(path: str, what: str) -> None:
    raise ValueError(f"{path}: corrupt model file ({what})")


def _array(tensors: dict, key: str, path: str, ndim: int, dtype: str) -> np.ndarray:
    a = tensors.get(key)
    if a is None:
        _fail(path, f"missing tensor {key!r}")
    if a.ndim != ndim or a.dtype.name != dtype:
        _fail(path, f"{key} has shape {a.shape} and dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        _fail(path, f"{key} holds NaN or infinite values")
    return np.ascontiguousarray(a)


class OnnxDetector:
    """A fitted detector served from an exported graph and its model file, without torch.

    ``predict(images)`` / ``score(images)`` / ``threshold`` as on the torch detectors;
    images: a folder, image paths, PIL images or uint8 [H, W, 3] arrays (or a list of them).
    """

    def __init__(self, model_path: str | os.PathLike, graph_path: str | os.PathLike, *, threads: int | None = None):
        model_path = str(Path(model_path).expanduser())
        tensors, header = read_model_file(model_path, framework="np")
        config = header.get("config")
        spec = header.get("backbone_spec")
        if not isinstance(config, dict) or not isinstance(spec, dict):
            _fail(model_path, "no config or backbone spec")
        embed_dim = header.get("embed_dim")
        self.graph = load_graph(graph_path, threads)
        meta = self.graph.metadata
        if meta.get("format") != GRAPH_FORMAT:
            raise ValueError(f"{graph_path} is not a softpatch_cuda embedding graph (no {GRAPH_FORMAT!r} metadata); "
                             "write one with 'softpatch export MODEL --format onnx'")
        if meta.get("fingerprint") != spec.get("fingerprint") or meta.get("embed_dim") != str(embed_dim):
            raise ValueError(f"{graph_path} was exported from another backbone ({meta.get('backbone')}, weights "
                             f"{str(meta.get('fingerprint'))[:12]}, embed_dim {meta.get('embed_dim')}) than {model_path} "
                             f"uses ({spec.get('backbone')}, {str(spec.get('fingerprint'))[:12]}, {embed_dim}); "
                             "export the graph from this model")
        self.model_path = model_path
        self.model_type = str(header.get("model_type"))
        self.resize, self.crop = config.get("resize"), config.get("crop")
        self.batch_size = int(config.get("batch_size", 16))
        self.image_score = str(config.get("image_score", "max"))
        distance = str(config.get("distance", "l2"))
        banks = {}
        for name in ("cls", "seg"):
            if f"{name}_bank.features" not in tensors:
                continue
            feats = _array(tensors, f"{name}_bank.features", model_path, 2, "float32")
            if feats.shape[1] != embed_dim or feats.shape[0] < 1:
                _fail(model_path, f"{name} bank is {feats.shape} for embed_dim {embed_dim}")
            w = None
            if f"{name}_bank.weights" in tensors:
                w = _array(tensors, f"{name}_bank.weights", model_path, 1, "float32")
                if w.shape[0] != feats.shape[0] or (w < 0).any():
                    _fail(model_path, f"{name} bank weights")
            banks[name] = NumpyBank(feats, w, distance)
        if "cls" not in banks:
            _fail(model_path, "no classification memory bank")
        self._cls, self._seg = banks["cls"], banks.get("seg")
        threshold = header.get("threshold")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold):
            _fail(model_path, f"threshold {threshold!r}")
        self._threshold = float(threshold)

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or math.isnan(value):
            raise ValueError(f"threshold must be a number, got {value!r}")
        self._threshold = float(value)

    def __repr__(self) -> str:
        return f"OnnxDetector({self.model_type}, {self.model_path}, graph={self.graph.path} [{self.graph.engine}])"

    # ---------------------------------------------------------------- inputs
    def _items(self, images: Any) -> list[tuple[Any, str, str | None]]:
        if isinstance(images, (str, os.PathLike)):
            path = Path(images)
            if not path.exists():
                raise FileNotFoundError(f"image path not found: {path}")
            paths = list_images(path) if path.is_dir() else [str(path)]
            return [(p, os.path.basename(p), p) for p in paths]
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images] if not (isinstance(images, np.ndarray) and images.ndim == 4) else list(images)
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images: pass a folder, image paths, PIL images or uint8 arrays (a non-empty list)")
        out = []
        for i, item in enumerate(images):
            if isinstance(item, (str, os.PathLike)):
                out.append((str(item), os.path.basename(str(item)), str(item)))
            elif isinstance(item, Image.Image):
                out.append((item, f"image_{i}", None))
            elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim in (2, 3):
                arr = item if item.ndim == 3 else np.repeat(item[..., None], 3, axis=2)
                out.append((Image.fromarray(np.ascontiguousarray(arr[..., :3])), f"image_{i}", None))
            else:
                raise TypeError(f"images[{i}]: unsupported item {type(item).__name__} (paths, PIL images or uint8 "
                                "[H, W, 3] arrays)")
        return out

    # ---------------------------------------------------------------- scoring
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """[B, 3, S, S] normalised pixels -> [B, h, w, D] patch embeddings (the graph)."""
        if not np.isfinite(pixels).all():
            raise ValueError("images contain NaN or infinite pixel values")
        emb = self.graph(pixels)
        if not np.isfinite(emb).all():
            raise ValueError("the graph produced NaN/inf features for these images")
        return emb

    def _score_batch(self, emb: np.ndarray, size: tuple[int, int], with_maps: bool):
        b, h, w, dim = emb.shape
        flat = np.ascontiguousarray(emb.reshape(-1, dim))
        cls, nearest = self._cls.score(flat)
        scores = self._cls.image_scores(flat, cls.reshape(b, -1), nearest, self.image_score)
        if not with_maps:
            return scores, None, None
        seg = cls if self._seg is None else self._seg.score(flat)[0]
        seg = seg.reshape(b, h, w).astype(np.float32)
        return scores, seg, patch_scores_to_maps(seg, size)

    def _run(self, images: Any, with_maps: bool) -> DeployPrediction:
        items = self._items(images)
        names, sources, sizes, scores, patches, maps = [], [], [], [], [], []
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            pixels = []
            for item, name, source in batch:
                img = load_image(item) if isinstance(item, str) else _to_rgb(item)
                sizes.append((int(img.height), int(img.width)))
                pixels.append(model_input(img, self.resize, self.crop, IMAGENET_MEAN, IMAGENET_STD))
                names.append(name)
                sources.append(source)
            shapes = {p.shape for p in pixels}
            if len(shapes) > 1:
                raise ValueError(f"images of different sizes {sorted(shapes)} cannot be batched; set resize/crop")
            px = np.stack(pixels)
            s, p, m = self._score_batch(self.embed(px), tuple(px.shape[-2:]), with_maps)
            scores.append(s)
            if with_maps:
                patches.append(p)
                maps.append(m)
        score_arr = np.concatenate(scores).astype(np.float32)
        return DeployPrediction(
            names=names, scores=score_arr, threshold=self._threshold, is_anomalous=score_arr > self._threshold,
            maps=np.concatenate(maps) if with_maps else np.zeros((len(names), 0, 0), np.float32),
            sources=sources, patch_scores=np.concatenate(patches) if with_maps else None, input_sizes=sizes,
            resize=self.resize, crop=self.crop)

    def predict(self, images: Any) -> DeployPrediction:
        """Image scores, verdicts and anomaly maps (as the torch detector's ``predict``)."""
        return self._run(images, with_maps=True)

    def score(self, images: Any) -> np.ndarray:
        """[N] float32 image scores only."""
        return self._run(images, with_maps=False).scores


# ------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m softpatch_cuda.deploy MODEL GRAPH IMAGES... --out DIR`` (no torch)."""
    from .jobs import collect_images, predict_to_folder  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python -m softpatch_cuda.deploy",
        description="Score images with a model file and its exported graph (ONNX Runtime / OpenVINO), without "
                    "torch; writes the same predictions.csv / .json / overlays as 'softpatch predict'.")
    parser.add_argument("model", metavar="MODEL", help="model file saved by 'softpatch fit'")
    parser.add_argument("graph", metavar="GRAPH", help="graph written by 'softpatch export' (.onnx or .xml)")
    parser.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders")
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--threshold", type=float, help="decision threshold (default: the model's)")
    parser.add_argument("--no-overlays", action="store_true", help="skip the heatmap PNGs")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="unreadable images")
    parser.add_argument("--threads", type=int, help="inference threads (default: the engine's)")
    parser.add_argument("-r", "--recursive", action="store_true", help="also read images in sub-folders")
    parser.add_argument("-q", "--quiet", action="store_true", help="only the summary line")
    args = parser.parse_args(argv)
    try:
        detector = OnnxDetector(args.model, args.graph, threads=args.threads)
        paths = collect_images(args.images, args.recursive, "image path")
        result = predict_to_folder(detector, paths, args.out, threshold=args.threshold,
                                   overlays=not args.no_overlays, on_error=args.on_error, progress=not args.quiet,
                                   model_path=args.model)
    except (ValueError, FileNotFoundError, ImportError, PermissionError, NotADirectoryError, TypeError) as exc:
        print(f"softpatch-deploy: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"{result.n_anomalous} of {len(result.rows)} images anomalous (threshold {result.threshold:.4g}). "
          f"Results: {result.csv_path}, {result.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
