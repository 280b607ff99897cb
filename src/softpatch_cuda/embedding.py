"""Locally aware patch embeddings (PatchCore / SoftPatch, docs/ALGORITHM.md section 2).

Per layer: each position's 3x3 neighbourhood (zero padding 1, stride 1) is
flattened (C*9); deeper layers' neighbourhood grids are bilinearly resampled to
the shallowest layer's grid; each layer's vector is adaptive-average-pooled to
``embed_dim``; the per-layer vectors are stacked and pooled again to ``embed_dim``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .backbone import FALLBACK_EMBED_DIM, FeatureExtractor, backbone_defaults
from ._pixels import SeenImages
from .data.images import ImageTransform, count_images, iter_batches
from ._validation import is_int



def _neighbourhood_grid(feature: torch.Tensor, patch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """[B,C,H,W] -> [B*h*w, C*k*k]: every position's k x k zero-padded neighbourhood
    (flattened channel-major, as PatchCore), the H x W grid bilinearly resampled to
    ``size``. Resampling the unfolded [B, C*k*k, H, W] columns in one call is the same
    arithmetic as resampling each neighbourhood entry, and keeps memory contiguous."""
    b, c, h, w = feature.shape
    pad = (patch_size - 1) // 2
    cols = F.unfold(feature, kernel_size=patch_size, padding=pad, stride=1)  # [B, C*k*k, H*W]
    cols = cols.reshape(b, c * patch_size * patch_size, h, w)
    if (h, w) != tuple(size):
        cols = F.interpolate(cols, size=size, mode="bilinear", align_corners=False)
    return cols.permute(0, 2, 3, 1).reshape(b * size[0] * size[1], -1)


def aggregate_patches(features: list[torch.Tensor], embed_dim: int, patch_size: int = 3) -> torch.Tensor:
    """Feature maps (shallow first) -> [B, h, w, embed_dim] patch embeddings."""
    if not features:
        raise ValueError("aggregate_patches needs at least one feature map")
    b = features[0].shape[0]
    size = tuple(features[0].shape[-2:])
    pooled = []
    for feature in features:
        flat = _neighbourhood_grid(feature.float(), patch_size, size)
        pooled.append(F.adaptive_avg_pool1d(flat.unsqueeze(1), embed_dim))  # [N, 1, D]
    stacked = torch.cat(pooled, dim=1).reshape(b * size[0] * size[1], 1, -1)  # [N, 1, L*D]
    out = F.adaptive_avg_pool1d(stacked, embed_dim)
    return out.reshape(b, size[0], size[1], embed_dim)


class PatchEmbedder:
    """Images [B,3,S,S] -> patch embeddings [B,h,w,D] (float32, on the extractor's device)."""

    def __init__(self, extractor: FeatureExtractor, embed_dim: int | None = None, patch_size: int = 3):
        if embed_dim is None:
            defaults = backbone_defaults(extractor.backbone_name)
            embed_dim = defaults.embed_dim if defaults else FALLBACK_EMBED_DIM
        if not is_int(embed_dim) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if not is_int(patch_size) or patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd int, got {patch_size!r}")
        self.extractor = extractor
        self.embed_dim = embed_dim
        self.patch_size = patch_size

    @property
    def device(self) -> torch.device:
        return self.extractor.device

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return aggregate_patches(self.extractor(pixels), self.embed_dim, self.patch_size)

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h, w) for an `image_size` input: the shallowest layer's grid,
        ceil(S / stride) for timm CNNs ('same'-style padded strided convolutions)."""
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        stride = self.extractor.strides[0]
        return tuple(-(-s // stride) for s in image_size)  # type: ignore[return-value]


def random_projection(in_dim: int, out_dim: int = 128, seed: int = 0, device="cpu") -> torch.Tensor:
    """Fixed Gaussian random projection [in_dim, out_dim], entries N(0, 1/out_dim)
    (Johnson-Lindenstrauss scaling). Drawn on the CPU from a seeded generator, then
    moved, so every device gets the same matrix."""
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"random_projection needs positive dims, got in_dim={in_dim}, out_dim={out_dim}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    matrix = torch.randn(in_dim, out_dim, generator=gen, dtype=torch.float32) / (out_dim ** 0.5)
    return matrix.to(device)


@dataclass
class EmbeddedImages:
    """The embed phase's output: patch embeddings [N, h, w, D] (on the embedder's
    device) and, per image, its name, source path (None in memory) and (height, width)."""

    embeddings: torch.Tensor
    names: list[str]
    sources: list[str | None]
    sizes: list[tuple[int, int]]
    digests: list[str] | None = None  # per image, a hash of its model-input pixels (finds duplicates)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def subset(self, indices) -> "EmbeddedImages":
        idx = [int(i) for i in indices]
        return EmbeddedImages(self.embeddings[idx], [self.names[i] for i in idx], [self.sources[i] for i in idx],
                              [self.sizes[i] for i in idx],
                              None if self.digests is None else [self.digests[i] for i in idx])


def pixel_digests(pixels: torch.Tensor) -> list[str]:
    """SHA-1 of each image's transformed pixels: identical inputs, identical digests."""
    flat = pixels.detach().to("cpu", torch.float32).contiguous().reshape(pixels.shape[0], -1).numpy()
    return [hashlib.sha1(row.tobytes()).hexdigest() for row in flat]


def embed_batch(embedder: PatchEmbedder, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] pixels -> [B, h, w, D] embeddings, with NaN checks on both sides."""
    if not torch.isfinite(pixels).all():
        raise ValueError("images contain NaN or infinite pixel values")
    emb = embedder(pixels.to(embedder.device))
    if not torch.isfinite(emb).all():
        raise ValueError("the backbone produced NaN/inf features for these images (check the weights)")
    return emb


def embed_images(embedder: PatchEmbedder, images: Any, transform: ImageTransform, batch_size: int,
                 progress: bool = False, desc: str = "features") -> EmbeddedImages:
    """Every image (any input ``iter_batches`` accepts) through the transform and the embedder."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    chunks, digests, seen = [], [], SeenImages()
    first_size: tuple[int, ...] | None = None
    with tqdm(total=count_images(images), desc=desc, unit="img", disable=not progress) as bar:
        for batch in iter_batches(images, transform, batch_size):
            if first_size is not None and tuple(batch.pixels.shape[-2:]) != first_size:
                raise ValueError(
                    f"images of different sizes ({first_size[0]}x{first_size[1]} and {batch.pixels.shape[-2]}x"
                    f"{batch.pixels.shape[-1]} pixels after the transform, e.g. {batch.names[0]}) cannot be "
                    "embedded together; set resize/crop (--resize/--crop)"
                )
            first_size = tuple(batch.pixels.shape[-2:])
            chunks.append(embed_batch(embedder, batch.pixels))
            digests += pixel_digests(batch.pixels)
            seen.add(batch)
            bar.update(len(batch))
    seen.check_some()
    return EmbeddedImages(torch.cat(chunks), seen.names, seen.sources, seen.sizes, digests)
