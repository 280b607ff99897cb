"""Dataset readers: MVTec AD, VisA, BTAD and generic image folders.

Every reader returns a :class:`DatasetSplit` (train / test lists of :class:`Sample`)
in a sorted, deterministic order. Nothing is downloaded: a folder that does not have
the expected layout raises an error that shows the layout that was expected.

Layouts
-------
MVTec AD (``load_mvtec``)::

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/good/*.png
    ROOT/<category>/test/<defect>/*.png
    ROOT/<category>/ground_truth/<defect>/<name>_mask.png

VisA (``load_visa``), either the original release with its split file::

    ROOT/split_csv/1cls.csv      columns object,split,label,image,mask
                                 (split train|test, label normal|anomaly,
                                 image/mask paths relative to ROOT)

or the MVTec-style conversion (``test/bad`` + ``ground_truth/bad``, masks named
like the image, with or without ``_mask``). VisA's split file does not name the
defect kind, so every anomalous VisA sample has ``defect_type == "bad"``
(the converted layout's folder name) in both forms.

BTAD (``load_btad``), categories ``01``, ``02``, ``03``::

    ROOT/<category>/train/ok/*
    ROOT/<category>/test/ok/*   ROOT/<category>/test/ko/*
    ROOT/<category>/ground_truth/ko/<stem>.(png|bmp)   (matched by file stem)

Generic folder (``load_folder``), either MVTec-like::

    ROOT/train/good/*  (or images directly in ROOT/train)
    ROOT/test/good/*   ROOT/test/<defect>/*
    ROOT/ground_truth/<defect>/<stem>[_mask].*   (optional)

or flat (no predefined split)::

    ROOT/good/*   ROOT/<defect>/*
    ROOT/ground_truth/<defect>/<stem>[_mask].*  or  ROOT/masks/<defect>/...   (optional)

In the flat form the good images are split with a seeded shuffle: 20 % (rounded,
at least 1) go to the test set, the rest (at least 1) to training.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .images import IMAGE_EXTENSIONS, load_mask
from .._validation import is_int

logger = logging.getLogger(__name__)

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
VISA_CATEGORIES: tuple[str, ...] = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
BTAD_CATEGORIES: tuple[str, ...] = ("01", "02", "03")
DATASET_NAMES: tuple[str, ...] = ("mvtec", "visa", "btad", "folder")

# Share of the good images that the flat folder layout puts into the test set.
FOLDER_TEST_GOOD_FRACTION = 0.2
# Folder names that hold masks, never defect images, in the folder layouts.
_MASK_FOLDERS = ("ground_truth", "masks")
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset. The models never see label / defect_type / mask_path."""

    path: str
    label: int  # 0 good, 1 anomalous
    defect_type: str  # "good" for normal images
    mask_path: str | None = None  # None for good images or when the dataset has no mask


@dataclass
class DatasetSplit:
    dataset: str
    category: str
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.train = list(self.train)
        self.test = list(self.test)

    @property
    def train_paths(self) -> list[str]:
        return [s.path for s in self.train]

    @property
    def test_paths(self) -> list[str]:
        return [s.path for s in self.test]

    def summary(self) -> str:
        n_bad_train = sum(s.label for s in self.train)
        n_bad_test = sum(s.label for s in self.test)
        return (
            f"{self.dataset}/{self.category}: train {len(self.train)} ({n_bad_train} anomalous), "
            f"test {len(self.test)} ({len(self.test) - n_bad_test} good, {n_bad_test} anomalous)"
        )


# --------------------------------------------------------------------------- helpers
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    """Sorted image files directly inside `folder` ([] when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _check_root(root: str | os.PathLike, dataset: str) -> Path:
    if root is None or str(root) == "":
        raise ValueError(f"{dataset}: root must be a folder path, got {root!r}")
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"{dataset} root folder not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{dataset} root is not a folder: {path}")
    return path


def _check_category_name(category: object, dataset: str) -> str:
    if not isinstance(category, str) or not category or "/" in category or "\\" in category or category in (".", ".."):
        raise ValueError(f"{dataset}: category must be a folder name (str), got {category!r}")
    return category


def _mask_index(folder: Path) -> dict[str, Path]:
    """Map from image stem to mask file in `folder`; a `_mask` suffix is stripped.
    An exact-stem mask wins over a `_mask` one when both exist."""
    index: dict[str, Path] = {}
    for mask in _images_in(folder):
        stem = mask.stem
        if stem.endswith("_mask"):
            index.setdefault(stem[: -len("_mask")], mask)
        else:
            index[stem] = mask
    return index


def _require_images(folder: Path, expected: str) -> list[Path]:
    images = _images_in(folder)
    if not images:
        state = "is empty (no image files)" if folder.is_dir() else "does not exist"
        raise ValueError(
            f"{folder} {state}; expected {expected} (image extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return images


# ------------------------------------------------------------------------- MVTec AD
def _mvtec_layout(root: Path, category: str, good: str = "good", example_ext: str = "png") -> str:
    return (
        f"{root}/{category}/train/{good}/*.{example_ext}, {root}/{category}/test/<defect>/*.{example_ext} "
        f"and {root}/{category}/ground_truth/<defect>/<name>_mask.png"
    )


def _load_mvtec_like(
    dataset: str,
    root: Path,
    category: str,
    *,
    good: str,
    require_masks: bool,
    layout: str,
) -> DatasetSplit:
    """Shared reader of ROOT/<cat>/{train/<good>, test/<defect>, ground_truth/<defect>}."""
    base = root / category
    train = [Sample(str(p), 0, "good") for p in _require_images(base / "train" / good, layout)]
    test_dir = base / "test"
    defect_dirs = _subfolders(test_dir)
    if not defect_dirs:
        raise ValueError(f"{dataset} category '{category}': no folders in {test_dir}; expected {layout}")
    test: list[Sample] = []
    for defect_dir in defect_dirs:
        images = _images_in(defect_dir)
        if not images:
            logger.warning("%s category '%s': empty test folder %s skipped", dataset, category, defect_dir)
            continue
        if defect_dir.name == good:
            test.extend(Sample(str(p), 0, "good") for p in images)
            continue
        masks = _mask_index(base / "ground_truth" / defect_dir.name)
        for image in images:
            mask = masks.get(image.stem)
            if mask is None and require_masks:
                raise FileNotFoundError(
                    f"{dataset} category '{category}': no mask for test image {image}; expected "
                    f"{base / 'ground_truth' / defect_dir.name / (image.stem + '_mask.png')} "
                    f"(or the same stem with another image extension)"
                )
            test.append(Sample(str(image), 1, defect_dir.name, str(mask) if mask is not None else None))
    if not test:
        raise ValueError(f"{dataset} category '{category}': no test images under {test_dir}; expected {layout}")
    split = DatasetSplit(dataset, category, train, test)
    logger.debug("loaded %s", split.summary())
    return split


def _category_missing(dataset: str, root: Path, category: str, layout: str, known: tuple[str, ...]) -> Exception:
    present = [c.name for c in _subfolders(root)]
    hint = f"; folders present: {', '.join(present)}" if present else "; the root folder is empty"
    if known:
        hint += f"; {dataset} categories: {', '.join(known)}"
    return FileNotFoundError(f"{dataset} category '{category}' not found under {root}: expected {layout}{hint}")


def load_mvtec(root: str | os.PathLike, category: str) -> DatasetSplit:
    """MVTec AD category (any category folder in the MVTec AD layout is accepted,
    e.g. MPDD, which uses the same tree). Masks are required for anomalous images."""
    root_path = _check_root(root, "MVTec AD")
    category = _check_category_name(category, "MVTec AD")
    layout = _mvtec_layout(root_path, category)
    if not (root_path / category / "train").is_dir():
        raise _category_missing("MVTec AD", root_path, category, layout, MVTEC_CATEGORIES)
    return _load_mvtec_like("mvtec", root_path, category, good="good", require_masks=True, layout=layout)


# ----------------------------------------------------------------------------- VisA
def _visa_layout(root: Path, category: str) -> str:
    return (
        f"{root}/{VISA_SPLIT_CSV.as_posix()} (columns object,split,label,image,mask; paths relative to {root}) "
        f"or the MVTec-style conversion {root}/{category}/train/good/*, {root}/{category}/test/{{good,bad}}/*, "
        f"{root}/{category}/ground_truth/bad/*"
    )


def _read_visa_csv(csv_path: Path) -> list[dict[str, str]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # -sig: tolerate a BOM
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = {"object", "split", "label", "image", "mask"} - set(columns)
            if missing:
                raise ValueError(
                    f"VisA split file {csv_path} lacks columns {sorted(missing)}; "
                    "expected the header object,split,label,image,mask"
                )
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as exc:
        raise ValueError(f"VisA split file {csv_path} is not a UTF-8 text file ({exc})") from exc


def _load_visa_csv(root: Path, category: str, csv_path: Path) -> DatasetSplit:
    rows = [r for r in _read_visa_csv(csv_path) if r["object"] == category]
    if not rows:
        objects = sorted({r["object"] for r in _read_visa_csv(csv_path)})
        raise FileNotFoundError(
            f"VisA category '{category}' not found in {csv_path} (objects listed: {', '.join(objects) or 'none'}); "
            f"expected {_visa_layout(root, category)}"
        )
    train: list[Sample] = []
    test: list[Sample] = []
    missing: list[str] = []
    for row in rows:
        split, label = row["split"].lower(), row["label"].lower()
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise ValueError(
                f"VisA split file {csv_path}: row {row} has split {row['split']!r} / label {row['label']!r}; "
                "expected split train|test and label normal|anomaly"
            )
        image = root / row["image"]
        if not image.is_file():
            missing.append(str(image))
            continue
        if label == "normal":
            sample = Sample(str(image), 0, "good")
        else:
            mask = root / row["mask"] if row["mask"] else None
            if mask is not None and not mask.is_file():
                missing.append(str(mask))
                continue
            sample = Sample(str(image), 1, "bad", str(mask) if mask is not None else None)
        (train if split == "train" else test).append(sample)
    if missing:
        raise FileNotFoundError(
            f"VisA category '{category}': {len(missing)} files listed in {csv_path} are missing, e.g. "
            f"{', '.join(missing[:3])}; paths in the split file are relative to {root}"
        )
    if not train or not test:
        raise ValueError(f"VisA category '{category}': {csv_path} lists {len(train)} train and {len(test)} test images")
    train.sort(key=lambda s: s.path)
    # Sorted like the folder readers: good first, then anomalous, each by path.
    test.sort(key=lambda s: (s.label, s.path))
    return DatasetSplit("visa", category, train, test)


def load_visa(root: str | os.PathLike, category: str) -> DatasetSplit:
    """VisA category from ROOT/split_csv/1cls.csv or the MVTec-style conversion."""
    root_path = _check_root(root, "VisA")
    category = _check_category_name(category, "VisA")
    if (root_path / category / "train").is_dir():
        return _load_mvtec_like(
            "visa", root_path, category, good="good", require_masks=False, layout=_visa_layout(root_path, category)
        )
    csv_path = root_path / VISA_SPLIT_CSV
    if csv_path.is_file():
        return _load_visa_csv(root_path, category, csv_path)
    raise _category_missing("VisA", root_path, category, _visa_layout(root_path, category), VISA_CATEGORIES)


# ----------------------------------------------------------------------------- BTAD
def load_btad(root: str | os.PathLike, category: str) -> DatasetSplit:
    """BTAD category ("01", "02", "03"); ok images are good, ko anomalous (masks
    in ground_truth/ko, .png or .bmp, matched by stem)."""
    root_path = _check_root(root, "BTAD")
    category = _check_category_name(category, "BTAD")
    layout = (
        f"{root_path}/{category}/train/ok/*, {root_path}/{category}/test/{{ok,ko}}/* and "
        f"{root_path}/{category}/ground_truth/ko/<stem>.(png|bmp)"
    )
    if not (root_path / category / "train").is_dir():
        raise _category_missing("BTAD", root_path, category, layout, BTAD_CATEGORIES)
    split = _load_mvtec_like("btad", root_path, category, good="ok", require_masks=True, layout=layout)
    # BTAD calls normal images "ok"; the rest of the package uses "good".
    test = [s if s.label else Sample(s.path, 0, "good") for s in split.test]
    return DatasetSplit("btad", category, split.train, test)


# --------------------------------------------------------------------------- folder
def _folder_layout(root: Path) -> str:
    return (
        f"either {root}/train/good/* + {root}/test/good/* + {root}/test/<defect>/* "
        f"or {root}/good/* + {root}/<defect>/* (optional masks in {root}/ground_truth/<defect>/ "
        f"or {root}/masks/<defect>/, named like the image, with or without _mask)"
    )


def _is_folder_dataset(path: Path) -> bool:
    return (path / "train").is_dir() or (path / "good").is_dir()


def _folder_masks(base: Path, defect: str) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for mask_root in reversed(_MASK_FOLDERS):  # ground_truth wins over masks
        index.update(_mask_index(base / mask_root / defect))
    return index


def _defect_samples(base: Path, image_root: Path, skip: tuple[str, ...]) -> list[Sample]:
    samples: list[Sample] = []
    for defect_dir in _subfolders(image_root):
        if defect_dir.name in skip:
            continue
        images = _images_in(defect_dir)
        if not images:
            logger.warning("folder dataset %s: empty defect folder %s skipped", base, defect_dir)
            continue
        masks = _folder_masks(base, defect_dir.name)
        for image in images:
            mask = masks.get(image.stem)
            samples.append(Sample(str(image), 1, defect_dir.name, str(mask) if mask is not None else None))
    return samples


def split_good_images(paths: list[str], seed: int = 0, test_fraction: float = FOLDER_TEST_GOOD_FRACTION) -> tuple[list[str], list[str]]:
    """Seeded split of good images into (train, test): round(test_fraction * n) test
    images, at least 1, and at least 1 train image; both returned sorted."""
    if len(paths) < 2:
        raise ValueError(f"need at least 2 good images to split into train and test, got {len(paths)}")
    n_test = min(max(1, int(np.floor(test_fraction * len(paths) + 0.5))), len(paths) - 1)
    order = np.random.default_rng(seed).permutation(len(paths))
    ordered = sorted(paths)
    test = sorted(ordered[i] for i in order[:n_test])
    train = sorted(ordered[i] for i in order[n_test:])
    return train, test


def load_folder(root: str | os.PathLike, category: str | None = None, seed: int = 0) -> DatasetSplit:
    """Generic image folder (see the module docstring for the two accepted layouts).

    `category` names a subfolder of `root`; None means `root` itself. When `root`
    itself is a dataset, its own folder name is also accepted as its category (that
    is what :func:`list_categories` returns for it). `seed` only matters for the flat
    layout (which good images are held out for testing)."""
    root_path = _check_root(root, "folder dataset")
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if category is None:
        base, name = root_path, root_path.resolve().name
    else:
        name = _check_category_name(category, "folder dataset")
        base = root_path / name
        if not base.is_dir():
            if name == root_path.resolve().name and _is_folder_dataset(root_path):
                base = root_path
            else:
                raise _category_missing("folder dataset", root_path, name, _folder_layout(base), ())
    layout = _folder_layout(base)
    if (base / "train").is_dir():
        train_dir = base / "train" / "good"
        if not train_dir.is_dir() and _images_in(base / "train"):
            train_dir = base / "train"
        train = [Sample(str(p), 0, "good") for p in _require_images(train_dir, layout)]
        test_dir = base / "test"
        if not test_dir.is_dir():
            raise FileNotFoundError(f"folder dataset {base}: {test_dir} not found; expected {layout}")
        test = [Sample(str(p), 0, "good") for p in _images_in(test_dir / "good")]
        test += _defect_samples(base, test_dir, skip=("good",))
        if not test:
            raise ValueError(f"folder dataset {base}: no test images under {test_dir}; expected {layout}")
    elif (base / "good").is_dir():
        good = [str(p) for p in _require_images(base / "good", layout)]
        if len(good) < 2:
            raise ValueError(
                f"folder dataset {base}: {base / 'good'} holds {len(good)} image; the flat layout needs at least "
                "2 good images (one for training, one for testing)"
            )
        train_paths, test_paths = split_good_images(good, seed)
        train = [Sample(p, 0, "good") for p in train_paths]
        test = [Sample(p, 0, "good") for p in test_paths]
        test += _defect_samples(base, base, skip=("good", "train", "test", *_MASK_FOLDERS))
    else:
        raise FileNotFoundError(f"folder dataset {base}: no 'train' or 'good' folder; expected {layout}")
    if not any(s.label for s in test):
        logger.warning("folder dataset %s has no anomalous test images: AUROC cannot be computed", base)
    split = DatasetSplit("folder", name, train, test)
    logger.debug("loaded %s", split.summary())
    return split


# -------------------------------------------------------------------------- generic
def _normalise_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "").replace(" ", "").replace("-", "")
    aliases = {"mvtec": "mvtec", "mvtecad": "mvtec", "visa": "visa", "btad": "btad", "folder": "folder"}
    if key not in aliases:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return aliases[key]


def load_dataset(name: str, root: str | os.PathLike, category: str | None = None, seed: int = 0) -> DatasetSplit:
    """Dispatch to the reader for `name` ("mvtec", "visa", "btad" or "folder").
    `seed` is used by the flat folder layout only."""
    key = _normalise_name(name)
    if key == "folder":
        return load_folder(root, category, seed=seed)
    if category is None:
        raise ValueError(f"dataset {name!r} needs a category; see list_categories({key!r}, root)")
    return {"mvtec": load_mvtec, "visa": load_visa, "btad": load_btad}[key](root, category)


def list_categories(name: str, root: str | os.PathLike) -> list[str]:
    """Categories present under `root` (sorted). For "folder": the subfolders in a
    folder layout, or [root's own name] when `root` itself is one."""
    key = _normalise_name(name)
    label = {"mvtec": "MVTec AD", "visa": "VisA", "btad": "BTAD", "folder": "folder dataset"}[key]
    root_path = _check_root(root, label)
    if key == "folder":
        if _is_folder_dataset(root_path):
            return [root_path.resolve().name]
        found = [p.name for p in _subfolders(root_path) if _is_folder_dataset(p)]
        layout = _folder_layout(root_path / "<category>") + f", or {root_path} itself in that layout"
    else:
        found = [p.name for p in _subfolders(root_path) if (p / "train").is_dir()]
        if key == "visa" and (root_path / VISA_SPLIT_CSV).is_file():
            listed = {r["object"] for r in _read_visa_csv(root_path / VISA_SPLIT_CSV) if r["object"]}
            found = sorted(set(found) | {c for c in listed if (root_path / c).is_dir()})
        layout = {
            "mvtec": _mvtec_layout(root_path, "<category>"),
            "visa": _visa_layout(root_path, "<category>"),
            "btad": f"{root_path}/<category>/train/ok/*, {root_path}/<category>/test/{{ok,ko}}/*",
        }[key]
    if not found:
        raise FileNotFoundError(f"no {label} categories found under {root_path}: expected {layout}")
    return sorted(found)


def read_mask(sample: Sample, size_hw: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask of `sample` as bool [H, W] (nearest-neighbour resize to
    `size_hw`); all False for good samples and anomalous samples without a mask."""
    if (
        not isinstance(size_hw, (tuple, list))
        or len(size_hw) != 2
        or not all(is_int(v) and v > 0 for v in size_hw)
    ):
        raise ValueError(f"size_hw must be (height, width) with positive ints, got {size_hw!r}")
    height, width = int(size_hw[0]), int(size_hw[1])
    if sample.label == 0 or sample.mask_path is None:
        return np.zeros((height, width), dtype=bool)
    mask = load_mask(sample.mask_path)
    if mask.shape != (height, width):
        resized = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize((width, height), Image.NEAREST)
        mask = np.asarray(resized) > 127
    return mask
