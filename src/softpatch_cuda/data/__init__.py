"""Input data: image/mask loading, the model's input transform and batching.

Dataset loaders (MVTec AD, VisA, BTAD, folders) and noise injection live in the
sibling modules of this package; the demo dataset in :mod:`softpatch_cuda.demo`.
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

from .datasets import (
    BTAD_CATEGORIES,
    MVTEC_CATEGORIES,
    VISA_CATEGORIES,
    DatasetSplit,
    Sample,
    list_categories,
    load_btad,
    load_dataset,
    load_folder,
    load_mvtec,
    load_visa,
    read_mask,
)
from .noise import NoiseRecord, apply_noise, apply_noise_record

__all__ = [
    "BTAD_CATEGORIES",
    "MVTEC_CATEGORIES",
    "VISA_CATEGORIES",
    "DatasetSplit",
    "NoiseRecord",
    "Sample",
    "apply_noise",
    "apply_noise_record",
    "list_categories",
    "load_btad",
    "load_dataset",
    "load_folder",
    "load_mvtec",
    "load_visa",
    "read_mask",
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
