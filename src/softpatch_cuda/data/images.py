"""Image / mask loading, the model's input transform, and batching of any input type.

Every accepted input (folder, path(s), PIL image(s), uint8 arrays, float arrays or
tensors in [0, 1], a torch DataLoader) is turned into 8-bit RGB PIL images, one at
a time, then transformed; so the same picture gives identical pixels whatever way
it is passed in, and folders are read lazily batch by batch (bounded memory). The
torch-free part (files, arrays, the transform, batching) is :mod:`softpatch_cuda._pixels`;
this module adds torch tensors and DataLoaders and hands batches over as tensors.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .._pixels import (  # noqa: F401 -- the torch-free pieces, re-exported here
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageBatch,
    ImageTransform,
    _array_items,
    _centre_box,
    _is_image_file,
    _open,
    _to_rgb,
    count_items,
    image_items,
    iter_pixel_batches,
    list_images,
    load_image,
)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Load a defect mask as bool [H, W] (any nonzero value = defect)."""
    arr = np.asarray(_open(path))
    if arr.ndim == 3:
        arr = arr.any(axis=-1)
    return arr != 0


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.uint8:
        # uint8 tensors follow torch's channels-first layout.
        arr = t.numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)
        elif arr.ndim == 4 and arr.shape[1] in (1, 3, 4):
            arr = arr.transpose(0, 2, 3, 1)
        return arr
    if t.is_floating_point():
        return t.float().numpy()
    raise ValueError(f"unsupported tensor dtype {t.dtype}; pass float images in [0, 1] or uint8")


def _items(images: Any) -> Iterator[tuple[Any, str, str | None]]:
    """Yield (PIL image or path, name, source) lazily; paths are loaded later."""
    if isinstance(images, torch.utils.data.DataLoader):
        yield from _loader_items(images)
        return
    if isinstance(images, torch.Tensor):
        images = _tensor_to_numpy(images)
    elif isinstance(images, (list, tuple)):
        images = [_tensor_to_numpy(x) if isinstance(x, torch.Tensor) else x for x in images]
    yield from image_items(images)


def _loader_items(loader: Iterable) -> Iterator[tuple[Any, str, str | None]]:
    index = 0
    for b, batch in enumerate(loader):
        if isinstance(batch, dict):
            if "image" not in batch:
                raise ValueError(f"DataLoader batch {b} is a dict without an 'image' key (keys: {list(batch)})")
            batch = batch["image"]
        elif isinstance(batch, (list, tuple)):
            if not batch:
                raise ValueError(f"DataLoader batch {b} is empty")
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"DataLoader batch {b}: expected a tensor of images, got {type(batch).__name__}")
        arr = _tensor_to_numpy(batch)
        if arr.ndim != 4:
            raise ValueError(f"DataLoader batch {b}: expected [B,3,H,W] images, got shape {tuple(batch.shape)}")
        for img in _array_items(arr, f"DataLoader batch {b}") or []:
            yield img, f"image_{index}", None
            index += 1
    if index == 0:
        raise ValueError("the DataLoader yielded no images")


def iter_batches(images: Any, transform: ImageTransform, batch_size: int = 16) -> Iterator[ImageBatch]:
    """Transformed batches ([B, 3, S, S] CPU tensors) of any accepted input; files are
    read one batch at a time."""
    for batch in iter_pixel_batches(_items(images), transform, batch_size):
        yield replace(batch, pixels=torch.from_numpy(batch.pixels))


def count_images(images: Any) -> int | None:
    """Number of images iter_batches will yield (None when unknown, e.g. an iterable loader)."""
    if isinstance(images, torch.Tensor):
        return int(images.shape[0]) if images.ndim == 4 else 1
    if isinstance(images, torch.utils.data.DataLoader):
        try:
            return len(images.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
    return count_items(images)
