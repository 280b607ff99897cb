"""Patch embeddings against a naive implementation, shapes, determinism, projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softpatch_cuda.backbone import FeatureExtractor
from softpatch_cuda.embedding import PatchEmbedder, aggregate_patches, random_projection
from builders import DEVICES


def _bilinear_weights(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] matrix of torch's bilinear interpolation (align_corners=False)."""
    m = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for o in range(out_size):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        lo = min(int(np.floor(src)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        m[o, lo] += 1 - frac
        m[o, hi] += frac
    return m


def _adaptive_avg(vec: np.ndarray, out: int) -> np.ndarray:
    n = len(vec)
    return np.array([vec[(i * n) // out: -((-(i + 1) * n) // out)].mean() for i in range(out)])


def _naive_embed(features: list[np.ndarray], dim: int) -> np.ndarray:
    """Loop-by-loop reading of docs/ALGORITHM.md section 2 for one image."""
    h, w = features[0].shape[1:]
    per_layer = []
    for f in features:
        c, fh, fw = f.shape
        padded = np.pad(f, ((0, 0), (1, 1), (1, 1)))
        neigh = np.zeros((fh, fw, c, 3, 3))
        for y in range(fh):
            for x in range(fw):
                neigh[y, x] = padded[:, y:y + 3, x:x + 3]
        wy, wx = _bilinear_weights(h, fh), _bilinear_weights(w, fw)
        resampled = np.einsum("Yy,Xx,yxcij->YXcij", wy, wx, neigh)  # separable bilinear
        per_layer.append(resampled.reshape(h, w, -1))
    out = np.zeros((h, w, dim))
    for y in range(h):
        for x in range(w):
            stacked = np.concatenate([_adaptive_avg(v[y, x], dim) for v in per_layer])
            out[y, x] = _adaptive_avg(stacked, dim)
    return out


def test_aggregation_matches_naive(rng):
    shallow = rng.normal(size=(2, 3, 6, 5)).astype(np.float32)
    deep = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
    for dim in (7, 16, 40):
        got = aggregate_patches([torch.from_numpy(shallow), torch.from_numpy(deep)], dim).numpy()
        assert got.shape == (2, 6, 5, dim) and got.dtype == np.float32
        for b in range(2):
            np.testing.assert_allclose(got[b], _naive_embed([shallow[b], deep[b]], dim), rtol=1e-5, atol=1e-5)


def test_single_layer_identity_neighbourhood(rng):
    # One layer, D = C*9: the embedding is exactly the zero-padded 3x3 neighbourhood.
    f = rng.normal(size=(1, 2, 4, 4)).astype(np.float32)
    got = aggregate_patches([torch.from_numpy(f)], 18).numpy()[0]
    padded = np.pad(f[0], ((0, 0), (1, 1), (1, 1)))
    np.testing.assert_allclose(got[0, 0], padded[:, 0:3, 0:3].reshape(-1), rtol=0, atol=0)
    np.testing.assert_allclose(got[2, 1], padded[:, 2:5, 1:4].reshape(-1), rtol=0, atol=0)


def test_patch_embedder_shapes_and_determinism():
    torch.manual_seed(0)
    fe = FeatureExtractor("resnet18", pretrained=False)
    emb = PatchEmbedder(fe, embed_dim=64)
    x = torch.rand(3, 3, 64, 64)
    out = emb(x)
    assert out.shape == (3, 8, 8, 64) and out.dtype == torch.float32 and out.device == fe.device
    assert emb.grid_size(64) == (8, 8) and emb.grid_size(224) == (28, 28)
    torch.testing.assert_close(emb(x), out, rtol=0, atol=0)
    # batching does not change an image's embedding
    torch.testing.assert_close(emb(x[1:2])[0], out[1], rtol=1e-5, atol=1e-5)
    # it is exactly aggregate_patches of the extractor's maps
    torch.testing.assert_close(out, aggregate_patches(fe(x), 64), rtol=0, atol=0)


def test_default_embed_dims_and_validation():
    torch.manual_seed(0)
    lite = FeatureExtractor("efficientnet_lite0", pretrained=False)
    assert PatchEmbedder(lite).embed_dim == 384
    emb = PatchEmbedder(lite)
    assert emb.grid_size(224) == (28, 28)
    assert emb(torch.rand(1, 3, 224, 224)).shape == (1, 28, 28, 384)
    with pytest.raises(ValueError, match="embed_dim"):
        PatchEmbedder(lite, embed_dim=0)
    with pytest.raises(ValueError, match="patch_size"):
        PatchEmbedder(lite, patch_size=2)


@pytest.mark.parametrize("device", DEVICES)
def test_random_projection(device):
    a = random_projection(50, 16, seed=3, device=device)
    assert a.shape == (50, 16) and a.dtype == torch.float32 and a.device.type == device
    torch.testing.assert_close(a.cpu(), random_projection(50, 16, seed=3), rtol=0, atol=0)
    assert not torch.equal(a.cpu(), random_projection(50, 16, seed=4))
    big = random_projection(2000, 256, seed=0)
    # JL scaling: entries N(0, 1/out_dim) so squared norms are preserved on average
    assert abs(big.var().item() * 256 - 1.0) < 0.02
    with pytest.raises(ValueError):
        random_projection(0, 16)
