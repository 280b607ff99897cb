"""The exported embedding graph: the backbone + patch embedding as ONNX (and OpenVINO IR).

Only the image -> patch-embedding computation goes into the graph. The memory bank(s),
soft weights, threshold, projection and transform stay in the model's safetensors file:
the graph is the size of the backbone whatever the training set (ONNX exports that put
the bank inside the graph grow with it), and one graph serves every model fitted with
the same backbone. :class:`softpatch_cuda.deploy.OnnxDetector` loads both, without torch,
and scores with the same code as the torch detector (:mod:`softpatch_cuda.scoring`).

The graph: input ``pixels`` [B, 3, H, W] float32 (the model's transform already applied:
resize, crop, ImageNet normalisation), output ``embeddings`` [B, h, w, D] float32; the
batch and the image size are dynamic. Its metadata names the backbone weights'
fingerprint, layers, embed_dim and the package version, checked when a model is paired
with it.

``F.adaptive_avg_pool1d`` (the patch embedding's pooling) does not export to ONNX
(its input length is not known to the exporter). :class:`AveragePool1d` computes the
same windows from index tables fixed at export (the channel counts are known): output
i averages inputs floor(i L / D) .. ceil((i + 1) L / D) - 1, summed in the same order and
divided by the window length as torch's kernel does. A dense L x D averaging matrix would
give the same values but cost L x D multiply-adds per patch (WRN-50: 7 GFLOP per image,
more than the backbone); the gather-sum costs D x (window length).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..errors import install_hint
from ..embedding import _neighbourhood_grid
from ..serialization import write_atomically
from .formats import GRAPH_FORMAT, GRAPH_VERSION, checksum_path, graph_format, load_graph, write_graph_checksum

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
EXPORT_EXTRA = install_hint("export")


class AveragePool1d(torch.nn.Module):
    """``F.adaptive_avg_pool1d(x[:, None], out)[:, 0]`` for x [N, length], exportable to ONNX."""

    def __init__(self, length: int, out: int):
        super().__init__()
        i = np.arange(out)
        start = (i * length) // out
        end = -((-(i + 1) * length) // out)  # ceil
        count = end - start
        width = int(count.max())
        j = np.arange(width)
        index = np.minimum(start[:, None] + j[None, :], end[:, None] - 1)  # [out, width], padded with the last
        self.register_buffer("index", torch.as_tensor(index.T.copy(), dtype=torch.int64))  # [width, out]
        self.register_buffer("mask", torch.as_tensor((j[:, None] < count[None, :]).astype(np.float32)))
        self.register_buffer("count", torch.as_tensor(count.astype(np.float32)))
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = x.index_select(1, self.index[0])
        for j in range(1, self.width):  # unrolled at export: width is a few entries
            acc = acc + x.index_select(1, self.index[j]) * self.mask[j]
        return acc / self.count


class EmbeddingGraph(torch.nn.Module):
    """The backbone and the patch embedding of :mod:`softpatch_cuda.embedding`, in export-friendly form."""

    def __init__(self, embedder: Any):
        super().__init__()
        extractor = embedder.extractor
        self.backbone = extractor.model
        self.patch_size = embedder.patch_size
        k2 = embedder.patch_size ** 2
        self.pools = torch.nn.ModuleList(AveragePool1d(c * k2, embedder.embed_dim) for c in extractor.channels)
        self.final = AveragePool1d(len(extractor.channels) * embedder.embed_dim, embedder.embed_dim)
        self.embed_dim = embedder.embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = list(self.backbone(pixels))
        b = pixels.shape[0]
        h, w = features[0].shape[-2], features[0].shape[-1]
        pooled = [pool(_neighbourhood_grid(f.float(), self.patch_size, (h, w))) for f, pool in
                  zip(features, self.pools)]
        stacked = torch.stack(pooled, dim=1).reshape(b * h * w, -1)  # [N, L*D], layer-major as the torch path
        return self.final(stacked).reshape(b, h, w, self.embed_dim)


def _load(model: Any, weights: str | None = None) -> Any:
    if isinstance(model, (str, os.PathLike)):
        from ..models import load_model  # noqa: PLC0415

        return load_model(model, device="cpu", weights=weights)
    if not model.is_fitted:
        raise ValueError("export needs a fitted model (or a model file)")
    return model


def _example_input(model: Any, batch: int = 2) -> torch.Tensor:
    cfg = model.settings
    side = cfg.crop or cfg.resize
    if side is None:
        side = 224  # native-size models: any size works (dynamic axes); trace at a common one
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, side, side, generator=gen)


def graph_metadata(model: Any) -> dict[str, str]:
    extractor = model.embedder.extractor
    spec = extractor.spec()
    return {
        "format": GRAPH_FORMAT, "format_version": GRAPH_VERSION, "softpatch_cuda": __version__,
        "backbone": spec["backbone"], "layers": ",".join(spec["layers"]), "fingerprint": spec["fingerprint"],
        "embed_dim": str(model.embedder.embed_dim), "stride": str(extractor.strides[0]),
    }


def export_onnx(model: Any, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, weights: str | None = None,
                check: bool = True) -> dict:
    """Write ``model``'s backbone + patch embedding (a fitted detector or a model file) to
    the ONNX file ``path``. With ``check`` (and onnxruntime installed) the graph is run
    on random input and compared with the torch embedding. Returns a summary
    (path, metadata, max_abs_diff / max_rel_diff when checked)."""
    try:
        import onnx  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the onnx package: {EXPORT_EXTRA}") from exc
    model = _load(model, weights)
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"export output {path} is a folder; give a file name such as {path / 'model.onnx'}")
    graph = EmbeddingGraph(model.embedder).eval().to("cpu")
    example = _example_input(model)
    meta = graph_metadata(model)

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript-based exporter: the dynamo exporter needs onnxscript, an extra
            # dependency. Its deprecation notice and the tracer's warning about the grid-size
            # comparison in the embedding (constant per layer: the first layer's grid is the
            # patch grid, deeper layers always differ from it) say nothing to act on.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(graph, (example,), str(tmp), input_names=["pixels"], output_names=["embeddings"],
                              dynamic_axes={"pixels": {0: "batch", 2: "height", 3: "width"},
                                            "embeddings": {0: "batch", 1: "grid_h", 2: "grid_w"}},
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))

    write_atomically(path, write)
    write_graph_checksum(path)
    summary: dict[str, Any] = {"path": str(path), "format": "onnx", "opset": opset, "metadata": meta,
                               "checksum": str(checksum_path(path))}
    if check:
        summary.update(check_graph(model, path, example))
    return summary


def check_graph(model: Any, path: str | os.PathLike, pixels: torch.Tensor | None = None) -> dict:
    """Run the exported graph (by its format's engine) and the torch embedding on the same
    input: their largest absolute and relative differences."""
    pixels = _example_input(model) if pixels is None else pixels
    run = load_graph(path)
    got = run(pixels.numpy())
    with torch.no_grad():
        want = model.embedder(pixels).cpu().numpy()
    if got.shape != want.shape:
        raise RuntimeError(f"the exported graph gives embeddings of shape {got.shape}, torch {want.shape}")
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale > 0 else diff}


def export_openvino(model: Any, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, weights: str | None = None,
                    check: bool = True) -> dict:
    """OpenVINO IR (``path``: the .xml; the weights go to the .bin beside it), converted
    from the ONNX graph, with the same metadata (``rt_info``)."""
    try:
        import openvino as ov  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(f"OpenVINO export needs the openvino package: {install_hint('openvino')}") from exc
    model = _load(model, weights)
    path = Path(path).expanduser()
    if path.suffix.lower() != ".xml":
        raise ValueError(f"an OpenVINO IR file name ends in .xml, got {path.name}")
    onnx_tmp = path.with_name(f".{path.stem}.export-{os.getpid()}.onnx")
    try:
        summary = export_onnx(model, onnx_tmp, opset=opset, check=False)
        ov_model = ov.convert_model(str(onnx_tmp))
        for key, value in summary["metadata"].items():
            ov_model.set_rt_info(value, ["softpatch_cuda", key])
        ov.save_model(ov_model, str(path), compress_to_fp16=False)  # fp32: scores must match the torch path
        write_graph_checksum(path)
    finally:
        for tmp in (onnx_tmp, checksum_path(onnx_tmp)):
            if tmp.exists():
                tmp.unlink()
    out: dict[str, Any] = {"path": str(path), "format": "openvino", "opset": opset, "metadata": summary["metadata"],
                           "checksum": str(checksum_path(path))}
    if check:
        out.update(check_graph(model, path))
    return out


def export(model: Any, path: str | os.PathLike, fmt: str = "onnx", **kwargs: Any) -> dict:
    """Write ``model``'s embedding graph in format ``fmt`` (see ``formats.GRAPH_FORMATS``)."""
    return globals()[graph_format(fmt).writer](model, path, **kwargs)


__all__ = ["AveragePool1d", "EmbeddingGraph", "check_graph", "export", "export_onnx", "export_openvino",
           "graph_metadata"]
