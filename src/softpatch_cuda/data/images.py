"""Image / mask loading, the model's input transform, and batching of any input type.

Every accepted input (folder, path(s), PIL image(s), uint8 arrays, float arrays or
tensors in [0, 1], a torch DataLoader) is turned into 8-bit RGB PIL images, one at
a time, then transformed; so the same picture gives identical pixels whatever way
it is passed in, and folders are read lazily batch by batch (bounded memory).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from .._validation import is_int

from .._pixels import (  # noqa: F401 -- torch-free file helpers, re-exported here
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _centre_box,
    _is_image_file,
    _open,
    _to_rgb,
    list_images,
    load_image,
)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Load a defect mask as bool [H, W] (any nonzero value = defect)."""
    arr = np.asarray(_open(path))
    if arr.ndim == 3:
        arr = arr.any(axis=-1)
    return arr != 0


# ------------------------------------------------------------------------ transform
@dataclass(frozen=True)
class ImageTransform:
    """Resize to resize x resize (bilinear, antialiased), centre-crop crop x crop,
    normalise with mean/std. resize=None / crop=None skip that step."""

    resize: int | None = 256
    crop: int | None = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.resize is not None and self.crop is not None and self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) cannot exceed resize ({self.resize})")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got {self.mean}, {self.std}")

    @property
    def output_size(self) -> int | None:
        """Side of the square the model sees (None when both steps are off: native size)."""
        return self.crop if self.crop is not None else self.resize

    def _apply_geometry(self, img: Image.Image, resample: int) -> Image.Image:
        if self.resize is not None:
            img = img.resize((self.resize, self.resize), resample=resample)
        if self.crop is not None:
            img = img.crop(_centre_box(img.width, img.height, self.crop))
        return img

    def geometry(self, img: Image.Image) -> Image.Image:
        """Resized + centre-cropped RGB image: what the model sees (for overlays)."""
        # PIL's bilinear resize widens its filter when downscaling, i.e. it antialiases.
        return self._apply_geometry(_to_rgb(img), Image.BILINEAR)

    def image(self, img: Image.Image) -> torch.Tensor:
        """[3, S, S] float32, normalised."""
        arr = np.asarray(self.geometry(img), dtype=np.float32) / 255.0
        pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (pixels - mean) / std

    def mask(self, mask: np.ndarray | Image.Image) -> np.ndarray:
        """bool [S, S]: nearest-neighbour resize and the same centre crop as images."""
        if isinstance(mask, Image.Image):
            arr = np.asarray(mask)
        else:
            arr = np.asarray(mask)
        if arr.ndim == 3:
            arr = arr.any(axis=-1)
        if arr.ndim != 2:
            raise ValueError(f"mask must be [H, W] (or [H, W, C]), got shape {arr.shape}")
        binary = Image.fromarray((arr != 0).astype(np.uint8) * 255, mode="L")
        return np.asarray(self._apply_geometry(binary, Image.NEAREST)) > 127

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageTransform":
        unknown = set(d) - {"resize", "crop", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown ImageTransform fields: {sorted(unknown)}")
        return cls(**{k: (tuple(v) if k in ("mean", "std") else v) for k, v in d.items()})


# ---------------------------------------------------------------------- batching
@dataclass
class ImageBatch:
    pixels: torch.Tensor  # [B, 3, S, S] float32 normalised (CPU)
    names: list[str] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)
    # (height, width) of each original image before resize/crop: lets anomaly maps be
    # put back onto the input (Prediction.map_at_input_size).
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def _uint8_to_pil(arr: np.ndarray, what: str) -> Image.Image:
    """uint8 [H,W] / [H,W,1] / [H,W,3] / [H,W,4] -> RGB PIL."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), mode="L").convert("RGB")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]), mode="RGB")
    raise ValueError(f"{what}: uint8 image must be [H,W], [H,W,3] or [H,W,4], got shape {arr.shape}")


def _float_to_pil(arr: np.ndarray, what: str) -> Image.Image:
    """float [3,H,W] / [1,H,W] / [H,W] in [0, 1] -> RGB PIL (rounded to 8 bits)."""
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"{what}: float image must be [3,H,W] (channels first), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{what}: float pixel values must be in [0, 1], got range [{lo:.3g}, {hi:.3g}]; "
            "it looks already normalised (pass raw [0,1] images, the model normalises them) "
            "or is 0-255 data (pass it as uint8)"
        )
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    u8 = np.rint(arr.transpose(1, 2, 0).astype(np.float64) * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(u8), mode="RGB")


def _uint16_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit camera data -> 8 bits, the same scaling as 16-bit image files (65535 -> 255)."""
    return np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)


def _array_items(arr: np.ndarray, what: str) -> list[Image.Image] | None:
    """Split an array into per-image PIL images; None if it is a single image."""
    if arr.dtype == np.uint16:
        arr = _uint16_to_uint8(arr)
    if arr.dtype == np.uint8:
        if arr.ndim == 4:
            return [_uint8_to_pil(a, f"{what}[{i}]") for i, a in enumerate(arr)]
        return None
    if np.issubdtype(arr.dtype, np.floating):
        if arr.ndim == 4:
            return [_float_to_pil(a, f"{what}[{i}]") for i, a in enumerate(arr)]
        return None
    raise ValueError(
        f"{what}: unsupported dtype {arr.dtype}; pass uint8 (0-255) or uint16 (0-65535) images "
        "channels last, or float (0-1) images channels first"
    )


def _single_array_to_pil(arr: np.ndarray, what: str) -> Image.Image:
    if arr.dtype == np.uint16:
        arr = _uint16_to_uint8(arr)
    if arr.dtype == np.uint8:
        return _uint8_to_pil(arr, what)
    if np.issubdtype(arr.dtype, np.floating):
        return _float_to_pil(arr, what)
    raise ValueError(
        f"{what}: unsupported dtype {arr.dtype}; pass uint8 (0-255) or uint16 (0-65535) images "
        "channels last, or float (0-1) images channels first"
    )


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
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if not path.exists():
            raise FileNotFoundError(f"image path not found: {path}")
        if path.is_dir():
            for p in list_images(path):
                yield p, os.path.basename(p), p
        else:
            yield str(path), path.name, str(path)
        return
    if isinstance(images, Image.Image):
        yield images, "image_0", None
        return
    if isinstance(images, torch.Tensor):
        images = _tensor_to_numpy(images)
    if isinstance(images, np.ndarray):
        split = _array_items(images, "images")
        if split is None:
            yield _single_array_to_pil(images, "images"), "image_0", None
        else:
            if not split:
                raise ValueError("images: the array holds no images (first dimension is 0)")
            for i, img in enumerate(split):
                yield img, f"image_{i}", None
        return
    if isinstance(images, torch.utils.data.DataLoader):
        yield from _loader_items(images)
        return
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: empty list")
        for i, item in enumerate(images):
            name = f"image_{i}"
            if isinstance(item, (str, os.PathLike)):
                yield str(item), os.path.basename(str(item)), str(item)
            elif isinstance(item, Image.Image):
                yield item, name, None
            elif isinstance(item, (np.ndarray, torch.Tensor)):
                arr = _tensor_to_numpy(item) if isinstance(item, torch.Tensor) else item
                yield _single_array_to_pil(arr, f"images[{i}]"), name, None
            else:
                raise TypeError(f"images[{i}]: unsupported item type {type(item).__name__}")
        return
    raise TypeError(
        f"unsupported images type {type(images).__name__}; pass a folder, file path(s), PIL image(s), "
        "a uint8/float array or tensor, or a torch DataLoader"
    )


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
    """Transformed batches of any accepted input; files are read one batch at a time."""
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pending: list[tuple[Any, str, str | None]] = []

    def flush() -> ImageBatch:
        tensors = []
        sizes = []
        for item, _, _ in pending:
            img = load_image(item) if isinstance(item, str) else item
            sizes.append((int(img.height), int(img.width)))
            tensors.append(transform.image(img))
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(
                f"images of different sizes {sorted(shapes)} cannot be batched; set resize/crop"
            )
        return ImageBatch(
            torch.stack(tensors), [n for _, n, _ in pending], [s for _, _, s in pending], sizes
        )

    for entry in _items(images):
        pending.append(entry)
        if len(pending) == batch_size:
            yield flush()
            pending = []
    if pending:
        yield flush()


def count_images(images: Any) -> int | None:
    """Number of images iter_batches will yield (None when unknown, e.g. an iterable loader)."""
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            return len(list_images(path))
        return 1 if path.exists() else None
    if isinstance(images, Image.Image):
        return 1
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return int(images.shape[0]) if images.ndim == 4 else 1
    if isinstance(images, (list, tuple)):
        return len(images)
    if isinstance(images, torch.utils.data.DataLoader):
        try:
            return len(images.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
    return None
