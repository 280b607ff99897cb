"""Image files and the model's input geometry without torch (numpy + PIL only).

The torch-free deployment predictor (:mod:`softpatch_cuda.deploy`) and the job writers
(:mod:`softpatch_cuda.jobs`) read images through these functions; the torch pipeline
(:mod:`softpatch_cuda.data.images`) re-exports them, so both paths load and transform a
picture with the same code and get identical pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

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


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Sorted image files in `folder` (extensions: IMAGE_EXTENSIONS, any case)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"not a folder: {folder}")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(str(p) for p in candidates if _is_image_file(p))
    if not files:
        raise ValueError(
            f"no images in folder {folder}{' (searched recursively)' if recursive else ''}; "
            f"looked for files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
    return files


# ------------------------------------------------------------------------ geometry
def _centre_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    if crop > width or crop > height:
        raise ValueError(f"crop {crop} is larger than the (resized) image {width}x{height}")
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return left, top, left + crop, top + crop


def model_input(img: Image.Image, resize: int | None, crop: int | None,
                mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD) -> np.ndarray:
    """[3, S, S] float32 normalised pixels: the same arithmetic as
    :meth:`softpatch_cuda.data.images.ImageTransform.image` (resize bilinear, centre
    crop, /255, (x - mean) / std in float32), without torch."""
    img = _to_rgb(img)
    if resize is not None:
        img = img.resize((resize, resize), resample=Image.BILINEAR)
    if crop is not None:
        img = img.crop(_centre_box(img.width, img.height, crop))
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (chw - m) / s
