"""Input data: image/mask loading, the model's input transform and batching.

Dataset loaders (MVTec AD, VisA, BTAD, folders), noise injection and the demo
dataset live in the sibling modules of this package.
"""

from .images import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageBatch,
    ImageTransform,
    count_images,
    iter_batches,
    list_images,
    load_image,
    load_mask,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageBatch",
    "ImageTransform",
    "count_images",
    "iter_batches",
    "list_images",
    "load_image",
    "load_mask",
]
