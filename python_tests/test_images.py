"""Image loading, input coercion, transform geometry and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from softpatch_cuda.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    count_images,
    iter_batches,
    list_images,
    load_image,
    load_mask,
)

SMALL = ImageTransform(resize=40, crop=32)


@pytest.fixture
def picture(rng):
    return rng.integers(0, 256, size=(48, 56, 3), dtype=np.uint8)


def _pixels(images, transform=SMALL, batch_size=16):
    return torch.cat([b.pixels for b in iter_batches(images, transform, batch_size)])


# ----------------------------------------------------------------------- loading
def test_load_image_modes(tmp_path, picture):
    grey = picture[..., 0]
    Image.fromarray(picture).save(tmp_path / "rgb.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([picture, np.full(grey.shape, 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(picture).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(picture).convert("CMYK").save(tmp_path / "cmyk.tif")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")

    rgb = np.asarray(load_image(tmp_path / "rgb.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == picture.shape
    np.testing.assert_array_equal(rgb, picture)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "grey.png")), np.dstack([grey] * 3))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "rgba.png")), picture)
    pal = np.asarray(load_image(tmp_path / "pal.png"))
    assert pal.shape == picture.shape and pal.dtype == np.uint8
    cmyk = np.asarray(load_image(tmp_path / "cmyk.tif"))
    assert cmyk.shape == picture.shape and np.abs(cmyk.astype(int) - picture).max() <= 2
    # 16-bit grey is scaled (65535 -> 255), not saturated.
    g16 = load_image(tmp_path / "grey16.png")
    assert g16.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(g16)[..., 0], grey)


def test_load_image_errors(tmp_path, picture):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    Image.fromarray(picture).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or unreadable image: .*truncated.png"):
        load_image(tmp_path / "truncated.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="corrupt or unreadable image"):
        load_image(tmp_path / "text.png")
    with pytest.raises(ValueError, match="folder"):
        load_image(tmp_path)


def test_load_mask(tmp_path):
    mask = np.zeros((20, 30), np.uint8)
    mask[5:9, 10:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(np.dstack([mask * 0, mask, mask * 0])).save(tmp_path / "m_rgb.png")
    for name in ("m.png", "m_rgb.png"):
        out = load_mask(tmp_path / name)
        assert out.dtype == bool
        np.testing.assert_array_equal(out, mask > 0)


def test_list_images(tmp_path, picture):
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="no images in folder"):
        list_images(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    for name in ("b.PNG", "a.jpg", "sub/c.bmp"):
        Image.fromarray(picture).save(tmp_path / name)
    assert [p.split("/")[-1] for p in list_images(tmp_path, recursive=False)] == ["a.jpg", "b.PNG"]
    assert [p.split("/")[-1] for p in list_images(tmp_path, recursive=True)] == ["a.jpg", "b.PNG", "c.bmp"]


# --------------------------------------------------------------------- coercion
def test_every_input_type_gives_identical_pixels(tmp_path, picture):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(picture).save(folder / "x.png")
    Image.fromarray(picture[::-1].copy()).save(folder / "y.png")
    pictures = np.stack([picture, picture[::-1]])
    reference = _pixels(str(folder))
    assert reference.shape == (2, 3, 32, 32) and reference.dtype == torch.float32

    as_float = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(as_float), batch_size=1)
    dict_loader = torch.utils.data.DataLoader([{"image": t} for t in as_float], batch_size=2)
    variants = {
        "folder Path": folder,
        "paths": [str(folder / "x.png"), str(folder / "y.png")],
        "PIL list": [Image.fromarray(p) for p in pictures],
        "uint8 NHWC": pictures,
        "uint8 list": list(pictures),
        "RGBA list": [np.dstack([p, np.zeros(p.shape[:2], np.uint8)]) for p in pictures],
        "float tensor": as_float,
        "float array": as_float.numpy().astype(np.float64),
        "float list": list(as_float),
        "uint8 tensor NCHW": torch.from_numpy(pictures).permute(0, 3, 1, 2).contiguous(),
        "tuple loader": loader,
        "dict loader": dict_loader,
    }
    for what, images in variants.items():
        assert torch.equal(_pixels(images, batch_size=1), reference), what
        assert count_images(images) == 2, what
    single = _pixels(str(folder / "x.png"))
    for images in (Image.fromarray(picture), picture, as_float[0]):
        assert torch.equal(_pixels(images), single)


def test_grayscale_inputs(picture):
    grey = picture[..., 0]
    expected = _pixels(np.dstack([grey] * 3))
    assert torch.equal(_pixels(grey), expected)
    assert torch.equal(_pixels(Image.fromarray(grey)), expected)
    assert torch.equal(_pixels(torch.from_numpy(grey).float()[None] / 255.0), expected)
    # 16-bit arrays are scaled like 16-bit files (65535 -> 255)
    assert torch.equal(_pixels(grey.astype(np.uint16) * 257), expected)
    assert torch.equal(_pixels(np.stack([np.dstack([grey] * 3).astype(np.uint16) * 257] * 2))[1], expected[0])


def test_names_sources_and_lazy_batching(tmp_path, picture, monkeypatch):
    for i in range(5):
        Image.fromarray(picture).save(tmp_path / f"{i}.png")
    calls = []
    import softpatch_cuda._pixels as pixels_mod

    real = pixels_mod.load_image
    monkeypatch.setattr(pixels_mod, "load_image", lambda p: calls.append(p) or real(p))
    batches = iter_batches(tmp_path, SMALL, batch_size=2)
    first = next(batches)
    assert len(calls) == 2  # the folder is read one batch at a time
    rest = list(batches)
    assert [len(b) for b in [first, *rest]] == [2, 2, 1]
    assert first.names == ["0.png", "1.png"] and first.sources[0] == str(tmp_path / "0.png")
    arr_batch = next(iter_batches(np.stack([picture] * 3), SMALL))
    assert arr_batch.names == ["image_0", "image_1", "image_2"] and arr_batch.sources == [None] * 3


def test_bad_inputs(tmp_path, picture):
    def run(images):
        return list(iter_batches(images, SMALL))

    with pytest.raises(ValueError, match="empty list"):
        run([])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images in folder"):
        run(tmp_path / "empty")
    with pytest.raises(TypeError, match="unsupported images type"):
        run(42)
    with pytest.raises(TypeError, match=r"images\[1\]"):
        run([picture, 3.5])
    with pytest.raises(ValueError, match="unsupported dtype int64.*uint8"):
        run(picture.astype(np.int64))
    with pytest.raises(ValueError, match="uint8 image must be"):
        run(picture[..., :2])
    with pytest.raises(ValueError, match=r"\[3,H,W\]"):
        run(np.zeros((48, 56, 3), np.float32))  # channels-last float
    nan = np.zeros((3, 8, 8), np.float32)
    nan[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        run(nan)
    with pytest.raises(ValueError, match="already normalised"):
        run(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches(picture, SMALL, batch_size=0))
    with pytest.raises(ValueError, match="different sizes"):
        list(iter_batches([picture, picture[:30]], ImageTransform(resize=None, crop=None)))
    with pytest.raises(ValueError, match="larger than"):
        list(iter_batches(np.zeros((20, 20), np.uint8), ImageTransform(resize=None, crop=32)))


# -------------------------------------------------------------------- transform
def test_transform_normalisation_and_geometry(picture):
    t = ImageTransform(resize=None, crop=None)
    out = torch.from_numpy(t.pixels(Image.fromarray(picture)))
    expected = (torch.from_numpy(picture).permute(2, 0, 1).float() / 255.0 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out, expected)
    assert ImageTransform().output_size == 224 and ImageTransform(crop=None).output_size == 256
    crop_only = ImageTransform(resize=None, crop=32).geometry(Image.fromarray(picture))
    # centre crop of a 56x48 image: left = 12, top = 8
    np.testing.assert_array_equal(np.asarray(crop_only), picture[8:40, 12:44])


def test_mask_lands_on_the_same_pixels_as_the_image():
    # A bright square in the image and the same square in the mask must coincide
    # after resize + crop, whatever the geometry.
    for transform in (ImageTransform(resize=40, crop=32), ImageTransform(resize=None, crop=48),
                      ImageTransform(resize=96, crop=None), ImageTransform(resize=64, crop=64)):
        img = np.zeros((80, 100, 3), np.uint8)
        mask = np.zeros((80, 100), bool)
        img[30:50, 40:60] = 255
        mask[30:50, 40:60] = True
        seen = np.asarray(transform.geometry(Image.fromarray(img)))[..., 0]
        m = transform.mask(mask)
        assert m.dtype == bool and m.shape == seen.shape
        size = transform.output_size
        assert m.shape == (size, size)
        assert m.any()
        # every mask pixel is bright in the image and every fully bright pixel is masked
        assert (seen[m] > 100).all()
        assert m[seen == 255].all()
        assert np.array_equal(transform.mask(Image.fromarray(mask.astype(np.uint8) * 255)), m)


def test_transform_validation_and_dict_roundtrip():
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(resize=100, crop=200)
    with pytest.raises(ValueError, match="resize"):
        ImageTransform(resize=0)
    with pytest.raises(ValueError, match="mean and std"):
        ImageTransform(std=(1.0, 0.0, 1.0))
    t = ImageTransform(resize=300, crop=256, mean=(0.5, 0.5, 0.5))
    import json

    assert ImageTransform.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(ValueError, match="unknown"):
        ImageTransform.from_dict({"resize": 1, "bogus": 2})
    with pytest.raises(ValueError, match="mask must be"):
        t.mask(np.zeros((2, 3, 4, 5)))
