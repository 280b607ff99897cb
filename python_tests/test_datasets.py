"""Dataset readers on tiny generated trees: MVTec AD, VisA (csv + converted), BTAD, folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softpatch_cuda.data.datasets import (
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
    split_good_images,
)


def _img(path: Path, size=(12, 10), value: int = 100, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _mask(path: Path, size=(12, 10), box=(2, 2, 6, 5), value: int = 255) -> Path:
    """Mask with a filled rectangle box=(left, top, right, bottom) (exclusive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    left, top, right, bottom = box
    arr[top:bottom, left:right] = value
    Image.fromarray(arr).save(path)
    return path


def make_mvtec(root: Path, category: str = "bottle", n_train: int = 3, defects=("broken", "crack")) -> Path:
    base = root / category
    for i in range(n_train):
        _img(base / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        _img(base / "test" / "good" / f"{i:03d}.png")
    for d in defects:
        for i in range(2):
            _img(base / "test" / d / f"{i:03d}.png")
            _mask(base / "ground_truth" / d / f"{i:03d}_mask.png")
    return root


# ------------------------------------------------------------------------- MVTec AD
def test_category_tuples():
    assert len(MVTEC_CATEGORIES) == 15 and "bottle" in MVTEC_CATEGORIES
    assert len(VISA_CATEGORIES) == 12 and "pcb1" in VISA_CATEGORIES
    assert BTAD_CATEGORIES == ("01", "02", "03")


def test_mvtec_reader(tmp_path):
    root = make_mvtec(tmp_path)
    split = load_mvtec(root, "bottle")
    assert isinstance(split, DatasetSplit)
    assert (split.dataset, split.category) == ("mvtec", "bottle")
    assert [Path(s.path).name for s in split.train] == ["000.png", "001.png", "002.png"]
    assert all(s == Sample(s.path, 0, "good", None) for s in split.train)
    assert [(s.defect_type, s.label) for s in split.test] == [
        ("broken", 1), ("broken", 1), ("crack", 1), ("crack", 1), ("good", 0), ("good", 0)
    ]
    for s in split.test:
        if s.label:
            assert s.mask_path == str(root / "bottle" / "ground_truth" / s.defect_type / (Path(s.path).stem + "_mask.png"))
        else:
            assert s.mask_path is None
    assert load_mvtec(str(root), "bottle") == split  # deterministic, str root accepted
    assert load_dataset("mvtec", root, "bottle") == split
    assert load_dataset("MVTec_AD", root, "bottle") == split
    assert "train 3 (0 anomalous)" in split.summary()


def test_mvtec_missing_category_message(tmp_path):
    root = make_mvtec(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        load_mvtec(root, "cable")
    msg = str(info.value)
    assert f"MVTec AD category 'cable' not found under {root}" in msg
    assert f"{root}/cable/train/good/*.png" in msg
    assert "bottle" in msg  # folders present


def test_mvtec_wrong_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="root folder not found"):
        load_mvtec(tmp_path / "nope", "bottle")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError):
        load_mvtec(tmp_path / "file.txt", "bottle")
    with pytest.raises(ValueError, match="category must be a folder name"):
        load_mvtec(tmp_path, "../bottle")
    # empty train/good
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"train/good is empty.*expected"):
        load_mvtec(tmp_path, "bottle")
    # train ok, no test folder
    _img(tmp_path / "bottle" / "train" / "good" / "000.png")
    with pytest.raises(ValueError, match="no folders in .*test"):
        load_mvtec(tmp_path, "bottle")
    # non-image files only in the defect folder
    (tmp_path / "bottle" / "test" / "crack").mkdir(parents=True)
    (tmp_path / "bottle" / "test" / "crack" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no test images"):
        load_mvtec(tmp_path, "bottle")


def test_mvtec_missing_mask_is_an_error(tmp_path):
    root = make_mvtec(tmp_path)
    (root / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask for test image .*001.png.*001_mask.png"):
        load_mvtec(root, "bottle")


def test_list_categories_mvtec(tmp_path):
    make_mvtec(tmp_path, "zipper")
    make_mvtec(tmp_path, "bottle")
    (tmp_path / "not_a_category").mkdir()
    assert list_categories("mvtec", tmp_path) == ["bottle", "zipper"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no MVTec AD categories found"):
        list_categories("mvtec", empty)
    with pytest.raises(ValueError, match="unknown dataset"):
        list_categories("imagenet", tmp_path)


# ---------------------------------------------------------------------------- VisA
def make_visa_csv(root: Path) -> Path:
    rows = []
    for cat in ("candle", "pcb1"):
        for i in range(3):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            _img(root / rel)
            rows.append([cat, "train" if i < 2 else "test", "normal", rel, ""])
        for i in range(2):
            rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            _img(root / rel)
            _mask(root / mrel, value=1)  # VisA masks store class indices, not 255
            rows.append([cat, "test", "anomaly", rel, mrel])
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def test_visa_csv_reader(tmp_path):
    root = make_visa_csv(tmp_path)
    split = load_visa(root, "candle")
    assert (split.dataset, split.category) == ("visa", "candle")
    assert [Path(s.path).name for s in split.train] == ["0000.JPG", "0001.JPG"]
    assert [(Path(s.path).name, s.label, s.defect_type) for s in split.test] == [
        ("0002.JPG", 0, "good"), ("000.JPG", 1, "bad"), ("001.JPG", 1, "bad")
    ]
    assert split.test[1].mask_path == str(root / "candle/Data/Masks/Anomaly/000.png")
    assert read_mask(split.test[1], (10, 12)).sum() == 12  # value 1 counts as defect
    assert list_categories("visa", root) == ["candle", "pcb1"]
    with pytest.raises(FileNotFoundError, match=r"VisA category 'fryum' not found in .*1cls.csv.*candle, pcb1"):
        load_visa(root, "fryum")


def test_visa_csv_missing_files_and_bad_rows(tmp_path):
    root = make_visa_csv(tmp_path)
    (root / "pcb1/Data/Images/Anomaly/001.JPG").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 files listed in .* are missing, e.g. .*001.JPG"):
        load_visa(root, "pcb1")
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text("object,split,label,image,mask\ncandle,val,normal,candle/x.JPG,\n")
    with pytest.raises(ValueError, match="expected split train|test"):
        load_visa(root, "candle")
    csv_path.write_text("object,image\ncandle,x.JPG\n")
    with pytest.raises(ValueError, match="lacks columns"):
        load_visa(root, "candle")


def test_visa_converted_layout(tmp_path):
    base = tmp_path / "pcb2"
    for i in range(3):
        _img(base / "train" / "good" / f"{i:03d}.JPG")
    _img(base / "test" / "good" / "000.JPG")
    _img(base / "test" / "bad" / "000.JPG")
    _img(base / "test" / "bad" / "001.JPG")
    _mask(base / "ground_truth" / "bad" / "000.png")  # named like the image, no _mask suffix
    split = load_visa(tmp_path, "pcb2")
    assert len(split.train) == 3
    bad = [s for s in split.test if s.label]
    assert [s.defect_type for s in bad] == ["bad", "bad"]
    assert bad[0].mask_path == str(base / "ground_truth" / "bad" / "000.png")
    assert bad[1].mask_path is None  # masks optional in the conversion
    assert list_categories("visa", tmp_path) == ["pcb2"]
    with pytest.raises(FileNotFoundError, match=r"VisA category 'candle' not found .*split_csv/1cls.csv"):
        load_visa(tmp_path, "candle")


# ---------------------------------------------------------------------------- BTAD
def test_btad_reader(tmp_path):
    for cat, img_ext, mask_ext in (("01", "bmp", "png"), ("03", "bmp", "bmp")):
        base = tmp_path / cat
        for i in range(2):
            _img(base / "train" / "ok" / f"{i:04d}.{img_ext}")
        _img(base / "test" / "ok" / f"0000.{img_ext}")
        for i in range(2):
            _img(base / "test" / "ko" / f"{i:04d}.{img_ext}")
            _mask(base / "ground_truth" / "ko" / f"{i:04d}.{mask_ext}")
    assert list_categories("btad", tmp_path) == ["01", "03"]
    for cat, mask_ext in (("01", "png"), ("03", "bmp")):
        split = load_btad(tmp_path, cat)
        assert split.dataset == "btad" and len(split.train) == 2
        assert all(s.defect_type == "good" for s in split.train)
        assert [(s.label, s.defect_type) for s in split.test] == [(1, "ko"), (1, "ko"), (0, "good")]
        assert all(s.mask_path.endswith("." + mask_ext) for s in split.test if s.label)
        assert read_mask(split.test[0], (5, 6)).any()
    with pytest.raises(FileNotFoundError, match=r"BTAD category '02' not found .*02/train/ok"):
        load_btad(tmp_path, "02")


# -------------------------------------------------------------------------- folders
def test_folder_mvtec_like(tmp_path):
    base = tmp_path / "parts"
    for i in range(3):
        _img(base / "train" / "good" / f"{i}.jpg")
    _img(base / "test" / "good" / "g.jpg")
    _img(base / "test" / "scratch" / "a.jpg")
    _img(base / "test" / "scratch" / "b.jpg")
    _mask(base / "ground_truth" / "scratch" / "a_mask.png")
    split = load_folder(base)
    assert (split.dataset, split.category) == ("folder", "parts")
    assert len(split.train) == 3
    assert [(Path(s.path).name, s.label, s.defect_type) for s in split.test] == [
        ("g.jpg", 0, "good"), ("a.jpg", 1, "scratch"), ("b.jpg", 1, "scratch")
    ]
    assert split.test[1].mask_path.endswith("a_mask.png") and split.test[2].mask_path is None
    # category as a subfolder, and the root's own name
    assert load_folder(tmp_path, "parts") == split
    assert list_categories("folder", tmp_path) == ["parts"]
    assert list_categories("folder", base) == ["parts"]
    assert load_dataset("folder", base, "parts") == split
    assert load_dataset("folder", base) == split


def test_folder_train_images_directly(tmp_path):
    _img(tmp_path / "train" / "0.png")
    _img(tmp_path / "test" / "bad" / "0.png")
    split = load_folder(tmp_path)
    assert len(split.train) == 1 and split.test[0].label == 1


def test_folder_flat_split(tmp_path):
    for i in range(10):
        _img(tmp_path / "good" / f"{i:02d}.png")
    for i in range(3):
        _img(tmp_path / "dent" / f"{i}.png")
    _img(tmp_path / "hole" / "x.png")
    _mask(tmp_path / "masks" / "dent" / "0.png")
    _mask(tmp_path / "ground_truth" / "dent" / "1_mask.png")
    _mask(tmp_path / "masks" / "dent" / "1.png", box=(0, 0, 1, 1))  # ground_truth wins
    split = load_folder(tmp_path, seed=3)
    good_test = [s for s in split.test if s.label == 0]
    assert len(split.train) == 8 and len(good_test) == 2  # 80 / 20
    assert sorted(s.path for s in split.train + good_test) == [str(tmp_path / "good" / f"{i:02d}.png") for i in range(10)]
    assert [s.path for s in split.train] == sorted(s.path for s in split.train)
    bad = [s for s in split.test if s.label]
    assert [s.defect_type for s in bad] == ["dent", "dent", "dent", "hole"]
    assert bad[0].mask_path.endswith("masks/dent/0.png")
    assert bad[1].mask_path.endswith("ground_truth/dent/1_mask.png")
    assert bad[2].mask_path is None
    # deterministic for a seed, different for another seed
    assert load_folder(tmp_path, seed=3) == split
    assert any(load_folder(tmp_path, seed=s).train != split.train for s in range(4, 10))


def test_split_good_images_sizes():
    for n, n_test in ((2, 1), (3, 1), (5, 1), (8, 2), (10, 2), (13, 3), (100, 20)):
        train, test = split_good_images([f"{i:03d}" for i in range(n)], seed=0)
        assert len(test) == n_test and len(train) == n - n_test
        assert not set(train) & set(test)
    with pytest.raises(ValueError, match="at least 2 good images"):
        split_good_images(["a"])


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no 'train' or 'good' folder; expected either"):
        load_folder(tmp_path)
    _img(tmp_path / "good" / "0.png")
    with pytest.raises(ValueError, match="at least 2 good images"):
        load_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="category 'other' not found"):
        load_folder(tmp_path, "other")
    mvtec_like = tmp_path / "m"
    _img(mvtec_like / "train" / "good" / "0.png")
    with pytest.raises(FileNotFoundError, match="test not found"):
        load_folder(mvtec_like)
    (mvtec_like / "test").mkdir()
    with pytest.raises(ValueError, match="no test images"):
        load_folder(mvtec_like)
    with pytest.raises(TypeError, match="seed"):
        load_folder(tmp_path, seed=1.5)
    with pytest.raises(FileNotFoundError, match="no folder dataset categories"):
        empty = tmp_path / "e"
        empty.mkdir()
        list_categories("folder", empty)


def test_load_dataset_dispatch_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        load_dataset("coco", tmp_path, "x")
    with pytest.raises(ValueError, match="needs a category"):
        load_dataset("mvtec", tmp_path, None)


# ---------------------------------------------------------------------------- masks
def test_read_mask_resizes_with_nearest(tmp_path):
    mask_path = _mask(tmp_path / "m.png", size=(4, 4), box=(0, 0, 2, 2))  # top-left quarter
    sample = Sample(str(tmp_path / "x.png"), 1, "crack", str(mask_path))
    small = read_mask(sample, (4, 4))
    assert small.dtype == bool and small.sum() == 4
    big = read_mask(sample, (8, 6))
    assert big.shape == (8, 6) and big.dtype == bool
    expected = np.zeros((8, 6), bool)
    expected[:4, :3] = True
    np.testing.assert_array_equal(big, expected)
    # RGB masks, good samples and missing masks
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.dstack([np.asarray(Image.open(mask_path))] * 3)).save(rgb)
    np.testing.assert_array_equal(read_mask(Sample("x", 1, "c", str(rgb)), (4, 4)), small)
    assert not read_mask(Sample("x", 0, "good"), (3, 5)).any()
    assert read_mask(Sample("x", 1, "c", None), (3, 5)).shape == (3, 5)
    with pytest.raises(ValueError, match="size_hw"):
        read_mask(sample, (0, 4))
    with pytest.raises(FileNotFoundError):
        read_mask(Sample("x", 1, "c", str(tmp_path / "gone.png")), (4, 4))


def test_visa_csv_with_bom_and_crlf(tmp_path):
    _img(tmp_path / "fryum/Data/Images/Normal/0.JPG")
    _img(tmp_path / "fryum/Data/Images/Normal/1.JPG")
    _img(tmp_path / "fryum/Data/Images/Anomaly/0.JPG")
    (tmp_path / "split_csv").mkdir()
    text = (
        "object,split,label,image,mask\r\n"
        "fryum,train,normal,fryum/Data/Images/Normal/0.JPG,\r\n"
        "fryum,test,normal,fryum/Data/Images/Normal/1.JPG,\r\n"
        "fryum,test,anomaly,fryum/Data/Images/Anomaly/0.JPG,\r\n"
    )
    (tmp_path / "split_csv" / "1cls.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    split = load_visa(tmp_path, "fryum")
    assert [s.label for s in split.test] == [0, 1] and split.test[1].mask_path is None


def test_non_images_and_hidden_files_ignored(tmp_path):
    root = make_mvtec(tmp_path)
    (root / "bottle" / "train" / "good" / "readme.txt").write_text("x")
    _img(root / "bottle" / "train" / "good" / ".hidden.png")
    (root / "bottle" / "test" / ".cache").mkdir()
    _img(root / "bottle" / "test" / ".cache" / "0.png")
    _img(root / "bottle" / "train" / "good" / "003.PNG", mode="L")  # upper-case extension, greyscale
    split = load_mvtec(root, "bottle")
    assert [Path(s.path).name for s in split.train] == ["000.png", "001.png", "002.png", "003.PNG"]
    assert {s.defect_type for s in split.test} == {"broken", "crack", "good"}
