"""What tests and benchmarks build their data and models from (one place: the benchmarks
import it too, as pytorch3d's benchmarks import its test cases).

Small and CPU-only: random-weight resnet18 (pretrained=False, seeded) at 64 px (an 8 x 8
patch grid), rendered objects and textures, a few dozen images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

import softpatch_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
CPU_ISAS = ("avx512", "avx2", "scalar")
SUPPORTED_CPU_ISAS = tuple(softpatch_cuda.build_info()["cpu_isas"])
# the "every instruction set agrees" tests compare the paths with each other: with one
# path (a scalar-only build, AArch64) there is nothing to compare
several_isas = pytest.mark.skipif(len(SUPPORTED_CPU_ISAS) < 2,
                                  reason=f"one CPU instruction set here ({SUPPORTED_CPU_ISAS}): nothing to compare")

SIZE = 64
FAST = dict(backbone="resnet18", pretrained=False, resize=SIZE, crop=SIZE, device="cpu", batch_size=8)
# the same model on the command line
TINY_CLI = ["--backbone", "resnet18", "--no-pretrained", "--resize", str(SIZE), "--crop", str(SIZE), "--device", "cpu",
            "-q"]


def aligned_object(rng: np.random.Generator, defect: bool = False, size: int = SIZE, jitter: int = 1,
                   defect_side: int | None = None) -> np.ndarray:
    """A rendered, nearly aligned object: a ringed disc on a grey background, +-``jitter``
    px, lighting and sensor noise. Defect: a dark square (``defect_side``, default size / 8)
    on the object."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.integers(-jitter, jitter + 1), size / 2 + rng.integers(-jitter, jitter + 1)
    r = np.hypot(yy - cy, xx - cx)
    img = np.full((size, size, 3), 0.35, np.float32)
    img[r < size * 0.36] = (0.75, 0.6, 0.3)
    img[(r > size * 0.18) & (r < size * 0.24)] = (0.2, 0.3, 0.7)
    img[r < size * 0.08] = (0.9, 0.9, 0.9)
    img *= rng.uniform(0.95, 1.05)
    if defect:
        s = defect_side or size // 8
        angle = rng.uniform(0, 2 * np.pi)
        rad = rng.uniform(0.12, 0.28) * size
        y0, x0 = int(cy + rad * np.sin(angle)) - s // 2, int(cx + rad * np.cos(angle)) - s // 2
        img[y0 : y0 + s, x0 : x0 + s] = (0.05, 0.05, 0.05)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def object_set(n: int, n_defect: int, seed: int, size: int = SIZE, jitter: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(images [n + n_defect, size, size, 3] uint8, labels): n normal objects, then n_defect defective ones."""
    rng = np.random.default_rng(seed)
    labels = np.array([0] * n + [1] * n_defect)
    return np.stack([aligned_object(rng, bool(lab), size, jitter) for lab in labels]), labels


def write_images(folder: Path, arrays: Sequence[np.ndarray]) -> list[str]:
    """PNG files 000.png, 001.png, ... of ``arrays`` in ``folder``; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(arrays):
        p = folder / f"{i:03d}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    return paths


def write_corrupt_png(path: Path) -> str:
    """A file named like a PNG that no decoder reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    return str(path)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.normal(120, 12, (size, size, 1)) + np.linspace(0, 20, size)[None, :, None]
    return np.clip(np.repeat(base, 3, axis=2), 0, 255).astype(np.uint8)


def tiny_mvtec(root: Path, categories=("widget", "gadget"), n_train=8, n_good=3, n_bad=3, size=40, seed=0) -> Path:
    """An MVTec-layout dataset of textures with red square defects and their masks."""
    rng = np.random.default_rng(seed)
    for cat in categories:
        base = root / cat
        write_images(base / "train" / "good", [_texture(rng, size) for _ in range(n_train)])
        write_images(base / "test" / "good", [_texture(rng, size) for _ in range(n_good)])
        images, masks = [], []
        for _ in range(n_bad):
            img = _texture(rng, size)
            mask = np.zeros((size, size), np.uint8)
            y, x = rng.integers(6, size - 16, 2)
            mask[y:y + 10, x:x + 10] = 255
            img[mask > 0] = [250, 30, 30]
            images.append(img)
            masks.append(mask)
        write_images(base / "test" / "spot", images)
        for i, mask in enumerate(masks):
            m = base / "ground_truth" / "spot" / f"{i:03d}_mask.png"
            m.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(m)
    return root
