"""Demo dataset: MVTec layout, determinism, exact masks, argument checks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softpatch_cuda.demo import synthetic as demo
from softpatch_cuda.demo import DEMO_CATEGORIES, DEMO_DEFECT_TYPES, make_demo_dataset

SIZE = 64
COUNTS = dict(n_train=3, n_test_good=2, n_test_defect=5)  # 5 >= every category's number of defect types


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), image_size=SIZE, seed=3, **COUNTS)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_categories_cover_textures_and_objects():
    assert len(demo.DEMO_TEXTURES) >= 2 and len(demo.DEMO_OBJECTS) >= 2
    assert DEMO_CATEGORIES == demo.DEMO_TEXTURES + demo.DEMO_OBJECTS
    assert set(DEMO_DEFECT_TYPES) == set(DEMO_CATEGORIES)
    for types in DEMO_DEFECT_TYPES.values():
        assert "good" not in types and len(types) == len(set(types)) >= 3


def test_mvtec_layout(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == sorted(DEMO_CATEGORIES)
    for cat in DEMO_CATEGORIES:
        cat_dir = dataset / cat
        assert sorted(p.name for p in cat_dir.iterdir()) == [demo.MARKER_NAME, "ground_truth", "test", "train"]
        assert [p.name for p in (cat_dir / "train").iterdir()] == ["good"]
        assert sorted(p.name for p in (cat_dir / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        assert sorted(p.name for p in (cat_dir / "test" / "good").iterdir()) == ["000.png", "001.png"]
        types = DEMO_DEFECT_TYPES[cat]
        assert sorted(p.name for p in (cat_dir / "test").iterdir()) == sorted(("good",) + types)
        assert sorted(p.name for p in (cat_dir / "ground_truth").iterdir()) == sorted(types)  # no mask for good
        n_defect = 0
        for defect_type in types:
            images = sorted((cat_dir / "test" / defect_type).iterdir())
            masks = sorted((cat_dir / "ground_truth" / defect_type).iterdir())
            assert images and all(re.fullmatch(r"\d{3}\.png", p.name) for p in images)
            assert [p.name for p in masks] == [p.stem + "_mask.png" for p in images]
            n_defect += len(images)
        assert n_defect == COUNTS["n_test_defect"]


def test_images_are_rgb_uint8_and_masks_binary(dataset):
    for path in dataset.rglob("*.png"):
        with Image.open(path) as img:
            assert img.size == (SIZE, SIZE)
            is_mask = path.parent.parent.name == "ground_truth"
            assert img.mode == ("L" if is_mask else "RGB"), path
        if is_mask:
            mask = _pixels(path)
            assert set(np.unique(mask)) <= {0, 255}
            assert (mask == 255).sum() >= 4, f"{path} is (nearly) empty"
            assert (mask == 255).mean() < 0.3, f"{path} covers most of the image"


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    again = make_demo_dataset(tmp_path / "again", image_size=SIZE, seed=3, **COUNTS)
    assert _files(again) == _files(dataset)
    other = _files(make_demo_dataset(tmp_path / "other", image_size=SIZE, seed=4, **COUNTS))
    reference = _files(dataset)
    assert other.keys() == reference.keys()
    images = [k for k in reference if "ground_truth" not in k]
    assert all(other[k] != reference[k] for k in images)


def test_category_does_not_depend_on_the_others(dataset, tmp_path):
    only = make_demo_dataset(tmp_path, categories=["nut"], image_size=SIZE, seed=3, **COUNTS)
    assert [p.name for p in only.iterdir()] == ["nut"]
    assert _files(only / "nut") == _files(dataset / "nut")


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_defects_change_exactly_the_masked_pixels(category):
    size = 96
    tolerance = demo.MASK_TOLERANCE * 255
    for defect_type in DEMO_DEFECT_TYPES[category]:
        for seed in range(3):
            image, clean, mask = demo._sample(category, defect_type, size, np.random.default_rng(seed))
            assert image.shape == clean.shape == (size, size, 3) and image.dtype == clean.dtype == np.uint8
            assert mask.shape == (size, size) and mask.dtype == bool
            diff = np.abs(image.astype(int) - clean.astype(int)).max(axis=-1)
            assert mask.sum() >= demo._min_defect_area(size), (category, defect_type, seed)
            # inside: clearly changed (holes filled / 1-px gaps closed may add a few unchanged pixels)
            assert (diff[mask] > tolerance / 2).mean() > 0.7, (category, defect_type, seed)
            assert diff[mask].mean() > 1.5 * tolerance, (category, defect_type, seed)
            # outside: unchanged up to the tolerance, but for dropped specks
            assert (diff[~mask] > tolerance + 1).sum() <= 0.002 * size * size, (category, defect_type, seed)


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_good_samples_have_no_defect(category):
    image, clean, mask = demo._sample(category, None, 48, np.random.default_rng(0))
    assert np.array_equal(image, clean) and not mask.any()


def test_objects_are_aligned_textures_are_not():
    """Objects: nearly the same picture every time (pose jitter of a few pixels), so good
    images correlate strongly with each other; textures: independent crops, they don't."""
    from scipy import ndimage

    def correlations(category: str) -> np.ndarray:
        grey = [ndimage.gaussian_filter(demo._sample(category, None, 64, np.random.default_rng(i))[0].mean(-1), 1.0)
                for i in range(5)]
        return np.array([np.corrcoef(grey[0].ravel(), g.ravel())[0, 1] for g in grey[1:]])

    for category in demo.DEMO_OBJECTS:
        assert correlations(category).min() > 0.6, category
    for category in demo.DEMO_TEXTURES:
        assert np.abs(correlations(category)).max() < 0.35, category


def test_rerun_replaces_previous_images_and_keeps_other_files(tmp_path):
    make_demo_dataset(tmp_path, categories="brick", n_train=3, n_test_good=2, n_test_defect=4, image_size=32)
    note = tmp_path / "brick" / "train" / "good" / "notes.txt"
    note.write_text("mine")
    make_demo_dataset(tmp_path, categories="brick", n_train=2, n_test_good=1, n_test_defect=2, image_size=32)
    train = sorted(p.name for p in (tmp_path / "brick" / "train" / "good").iterdir())
    assert train == ["000.png", "001.png", "notes.txt"]
    assert sorted(p.name for p in (tmp_path / "brick" / "test").iterdir()) == ["crack", "good", "scratch"]
    assert sorted(p.name for p in (tmp_path / "brick" / "ground_truth").iterdir()) == ["crack", "scratch"]


def test_never_touches_images_it_did_not_write(tmp_path):
    """E.g. root pointed at a real MVTec AD folder, which has a "capsule" category."""
    theirs = tmp_path / "capsule" / "train" / "good" / "000.png"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"real data")
    with pytest.raises(FileExistsError, match="did not write"):
        make_demo_dataset(tmp_path, categories=["nut", "capsule"], n_train=1, n_test_good=1, n_test_defect=1,
                          image_size=32)
    assert theirs.read_bytes() == b"real data"
    assert not (tmp_path / "nut").exists()  # checked before anything was written


def test_small_images(tmp_path):
    root = make_demo_dataset(tmp_path, n_train=1, n_test_good=1, n_test_defect=5, image_size=32, seed=1)
    masks = list(root.rglob("*_mask.png"))
    assert len(masks) == 5 * len(DEMO_CATEGORIES)
    assert all((_pixels(p) > 0).any() for p in masks)


def test_mvtec_reader_loads_it(dataset):
    datasets = pytest.importorskip("softpatch_cuda.data.datasets")
    split = datasets.load_mvtec(dataset, "chip")
    assert len(split.train) == COUNTS["n_train"]
    assert len(split.test) == COUNTS["n_test_good"] + COUNTS["n_test_defect"]
    assert sum(s.label for s in split.test) == COUNTS["n_test_defect"]
    assert all((s.mask_path is None) == (s.label == 0) for s in split.test)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(categories=["brick", "bolt"]), ValueError, r"unknown demo category 'bolt'.*valid: brick, grass"),
        (dict(categories=[]), ValueError, "categories is empty"),
        (dict(categories=[3]), TypeError, "category names must be str"),
        (dict(n_train=0), ValueError, "n_train must be positive"),
        (dict(n_test_good=-1), ValueError, "n_test_good must be positive"),
        (dict(n_test_defect=0), ValueError, "n_test_defect must be positive"),
        (dict(n_train=2.0), TypeError, "n_train must be an int"),
        (dict(n_train=True), TypeError, "n_train must be an int"),
        (dict(image_size=31), ValueError, "image_size must be at least 32"),
        (dict(image_size="64"), TypeError, "image_size must be an int"),
        (dict(seed=-1), ValueError, "seed must be non-negative"),
    ],
)
def test_argument_errors(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_demo_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written before the checks


def test_root_that_is_a_file(tmp_path):
    path = tmp_path / "file.png"
    path.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a directory"):
        make_demo_dataset(path)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "nut").write_text("x")
    with pytest.raises(FileExistsError, match="nut"):
        make_demo_dataset(tmp_path / "root", categories="nut")


def test_returns_path(tmp_path):
    out = make_demo_dataset(str(tmp_path / "x"), categories=("grass", "grass"), n_train=1, n_test_good=1,
                            n_test_defect=1, image_size=32)
    assert out == tmp_path / "x" and [p.name for p in out.iterdir()] == ["grass"]
