"""Images without torch (numpy + PIL): files, any in-memory input as RGB PIL images, the
model's input transform, batches of transformed pixels, and the transform undone on a map.

The torch detector (:mod:`softpatch_cuda.data.images` adds torch tensors and
DataLoaders) and the torch-free predictor both read and transform images through these
functions, so a picture gives identical pixels whichever path scores it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from ._validation import is_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------------- files
def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. High-bit-depth grey ('I;16*', 'I', 'F') is scaled,
    not clipped: PIL's own convert('RGB') would saturate 16-bit values at 255."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # 65535 -> 255
        elif mode == "F" and np.nanmax(arr, initial=0.0) <= 1.0:
            arr = arr * 255.0  # float image in [0, 1]
        elif np.nanmax(arr, initial=0.0) > 255:
            arr = arr / 257.0  # 32-bit container holding 16-bit data (PIL's PNG decoder)
        grey = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    # RGBA / LA: alpha dropped (as PatchCore and torchvision loaders do); CMYK, YCbCr, 1, L, P: converted.
    return img.convert("RGB")


def _open(path: str | os.PathLike) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise ValueError(f"expected an image file, got a folder: {path}")
    try:
        img = Image.open(path)
        img.load()  # decode now so truncated / corrupt files fail here, with the path
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"corrupt or unreadable image: {path} ({exc})") from exc
    return img


def load_image(path: str | os.PathLike) -> Image.Image:
    """Load an image file as 8-bit RGB (grayscale, RGBA, palette, 16-bit, CMYK converted)."""
    return _to_rgb(_open(path))


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _walk(folder: Path) -> Iterator[Path]:
    """Every entry below ``folder``; hidden folders (.git, a run's staging folder) are skipped
    and symlinked folders not followed."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in dirs + files:
            yield Path(root) / name


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Sorted image files in `folder` and (``recursive``, the default) its sub-folders, as
    MVTec's test/<defect>/ layout has them (extensions: IMAGE_EXTENSIONS, any case; hidden
    files and folders skipped). ``recursive=False``: the folder's own files only."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"not a folder: {folder}")
    candidates = _walk(folder) if recursive else folder.iterdir()
    files = sorted(str(p) for p in candidates if _is_image_file(p))
    if not files:
        where = ("its sub-folders searched too" if recursive else
                 "its sub-folders were not searched: leave out --no-recursive / pass recursive=True")
        raise ValueError(
            f"no images in folder {folder} ({where}); looked for files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
    return files


# ------------------------------------------------------------------------ geometry
def _centre_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    if crop > width or crop > height:
        raise ValueError(f"crop {crop} is larger than the (resized) image {width}x{height}")
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return left, top, left + crop, top + crop


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

    def pixels(self, img: Image.Image) -> np.ndarray:
        """[3, S, S] float32 normalised pixels: /255, then (x - mean) / std, in float32."""
        arr = np.asarray(self.geometry(img), dtype=np.float32) / np.float32(255.0)
        chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return (chw - mean) / std

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


# ---------------------------------------------------------------------- in-memory inputs
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


def image_paths(path: str | os.PathLike) -> list[str]:
    """The images of a folder and its sub-folders (sorted), or the one file a path names."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image path not found: {path}")
    return list_images(path) if path.is_dir() else [str(path)]


def image_items(images: Any) -> Iterator[tuple[Any, str, str | None]]:
    """Yield (PIL image or path, name, source) lazily for a folder, path(s), PIL image(s)
    or uint8 / uint16 / float arrays (one image, or [N, ...]); paths are loaded later.
    (:func:`softpatch_cuda.data.images.iter_batches` adds torch tensors and DataLoaders.)"""
    if isinstance(images, (str, os.PathLike)):
        folder = images if Path(images).is_dir() else None
        for p in image_paths(images):
            # a folder's image is named by its path below the folder (test/crack/000.png: "crack/000.png")
            name = os.path.basename(p) if folder is None else Path(os.path.relpath(p, folder)).as_posix()
            yield p, name, p
        return
    if isinstance(images, Image.Image):
        yield images, "image_0", None
        return
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
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: empty list")
        for i, item in enumerate(images):
            name = f"image_{i}"
            if isinstance(item, (str, os.PathLike)):
                yield str(item), os.path.basename(str(item)), str(item)
            elif isinstance(item, Image.Image):
                yield item, name, None
            elif isinstance(item, np.ndarray):
                yield _single_array_to_pil(item, f"images[{i}]"), name, None
            else:
                raise TypeError(f"images[{i}]: unsupported item type {type(item).__name__}")
        return
    raise TypeError(
        f"unsupported images type {type(images).__name__}; pass a folder, file path(s), PIL image(s), "
        "a uint8/float array or tensor, or a torch DataLoader"
    )


def count_items(images: Any) -> int | None:
    """Number of images :func:`image_items` yields (None when unknown)."""
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            return len(list_images(path))
        return 1 if path.exists() else None
    if isinstance(images, Image.Image):
        return 1
    if isinstance(images, np.ndarray):
        return int(images.shape[0]) if images.ndim == 4 else 1
    if isinstance(images, (list, tuple)):
        return len(images)
    return None


# ---------------------------------------------------------------------- batching
@dataclass
class ImageBatch:
    pixels: Any  # [B, 3, S, S] float32 normalised (numpy here; a CPU tensor from data.images.iter_batches)
    names: list[str] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)
    # (height, width) of each original image before resize/crop: lets anomaly maps be
    # put back onto the input (Prediction.map_at_input_size).
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class SeenImages:
    """The names, sources and sizes of the images a run's batches carried, in order."""

    names: list[str] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def add(self, batch: ImageBatch) -> None:
        self.names += batch.names
        self.sources += batch.sources
        self.sizes += batch.sizes

    def check_some(self) -> "SeenImages":
        if not self.names:
            raise ValueError("images: no images were given")
        return self


def iter_pixel_batches(items: Iterable[tuple[Any, str, str | None]], transform: ImageTransform,
                       batch_size: int = 16) -> Iterator[ImageBatch]:
    """Batches of transformed pixels (numpy) from :func:`image_items`-style items; files
    are read one batch at a time."""
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pending: list[tuple[Any, str, str | None]] = []

    def flush() -> ImageBatch:
        pixels = []
        sizes = []
        for item, _, _ in pending:
            img = load_image(item) if isinstance(item, str) else item
            sizes.append((int(img.height), int(img.width)))
            pixels.append(transform.pixels(img))
        shapes = {p.shape for p in pixels}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)} cannot be batched; set resize/crop")
        return ImageBatch(np.stack(pixels), [n for _, n, _ in pending], [s for _, _, s in pending], sizes)

    for entry in items:
        pending.append(entry)
        if len(pending) == batch_size:
            yield flush()
            pending = []
    if pending:
        yield flush()


# ---------------------------------------------------------------------- maps back on the input
def linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a linear resize, align_corners=False (torch's rule:
    src = (dst + 0.5) * in / out - 0.5, clamped at 0; the upper index clamped at in - 1)."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    # one rounding of scale * (dst + 0.5) - 0.5 to float32, as torch's fused multiply-add gives
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def resize_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[B, h, w] -> [B, H, W] bilinear, align_corners=False (two gathers: the weights are
    sparse, so a large output costs H * W, not H * W * h)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[-2:] == tuple(size):
        return maps.copy()
    y0, y1, wy0, wy1 = linear_weights(maps.shape[-2], size[0])
    x0, x1, wx0, wx1 = linear_weights(maps.shape[-1], size[1])
    rows = maps[:, y0, :] * wy0[None, :, None] + maps[:, y1, :] * wy1[None, :, None]
    return rows[:, :, x0] * wx0[None, None, :] + rows[:, :, x1] * wx1[None, None, :]


def map_to_input_size(amap: np.ndarray, input_size: tuple[int, int], resize: int | None, crop: int | None,
                      out_size: tuple[int, int] | None = None) -> np.ndarray:
    """Undo resize + centre crop: a [S, S] model-frame map -> [H, W] on the original image
    (or rendered at ``out_size``, e.g. a downscaled copy of a huge image: same geometry,
    memory independent of the original's size).

    The region the crop cut away has no scores; it is filled by repeating the map's
    border values (no artificial edge of zeros), then the resize is undone bilinearly.
    """
    height, width = (int(v) for v in input_size)
    t = np.asarray(amap, dtype=np.float32)
    frame_h, frame_w = (resize, resize) if resize is not None else (height, width)
    if crop is not None:  # the crop's centre box, as the transform cuts it
        top, left = int(round((frame_h - crop) / 2.0)), int(round((frame_w - crop) / 2.0))
        pad = ((top, frame_h - crop - top), (left, frame_w - crop - left))
        if any(p > 0 for pair in pad for p in pair):
            t = np.pad(t, pad, mode="edge")
    target = (height, width) if out_size is None else tuple(int(v) for v in out_size)
    if t.shape != target:
        t = resize_bilinear(t[None], target)[0]
    return t
