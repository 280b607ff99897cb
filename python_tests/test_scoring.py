"""The post-k-NN scoring core (softpatch_cuda.scoring) against independent oracles:
torch's F.interpolate + a reflect-padded conv2d and scipy's gaussian_filter for the maps,
torch's softmax for PatchCore's re-weighting, and the core run on numpy equal to it run
on torch (the predictor and the detector share it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from softpatch_cuda import ops, scoring
from softpatch_cuda._pixels import map_to_input_size
from softpatch_cuda.memory_bank import MemoryBank


def _torch_maps(patch: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """The oracle: bilinear upsample (align_corners=False), then a separable Gaussian with
    scipy's 'reflect' border (d c b a | a b c d) as two 1-D convolutions."""
    up = F.interpolate(patch[:, None].double(), size=size, mode="bilinear", align_corners=False)
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    taps = taps / taps.sum()
    for dim in (3, 2):
        n = up.shape[dim]
        idx = torch.remainder(torch.arange(-radius, n + radius), 2 * n)
        idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
        up = up.index_select(dim, idx)
        kernel = taps.view(1, 1, 1, -1) if dim == 3 else taps.view(1, 1, -1, 1)
        up = F.conv2d(up, kernel)
    return up[:, 0]


@pytest.mark.parametrize("h,w,size", [(28, 28, (224, 224)), (8, 8, (64, 64)), (4, 6, (32, 40)), (3, 3, (3, 3)),
                                      (5, 5, (7, 9))])
def test_maps_equal_interpolate_then_reflect_blur(h, w, size):
    patch = torch.from_numpy(np.random.default_rng(h * w).random((3, h, w)).astype(np.float32)) * 5
    got = scoring.anomaly_maps(patch.numpy(), size)
    want = _torch_maps(patch, size).numpy()
    assert got.shape == (3, *size) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * float(np.abs(want).max()))


def test_maps_blur_is_scipys_gaussian_filter():
    """No upsampling (same size): the map is scipy.ndimage.gaussian_filter(sigma=4) of the
    patch scores, also when the radius (16) exceeds the map."""
    for shape in ((2, 40, 33), (1, 5, 5)):
        x = np.random.default_rng(shape[1]).random(shape).astype(np.float32)
        ref = np.stack([ndimage.gaussian_filter(a.astype(np.float64), 4.0) for a in x])
        np.testing.assert_allclose(scoring.anomaly_maps(x, shape[1:]), ref, atol=1e-6)


def test_maps_on_numpy_equal_maps_on_torch():
    patch = np.random.default_rng(0).random((4, 7, 7)).astype(np.float32)
    on_torch = scoring.anomaly_maps(torch.from_numpy(patch), (56, 56))
    assert isinstance(on_torch, torch.Tensor)
    np.testing.assert_allclose(scoring.anomaly_maps(patch, (56, 56)), on_torch.numpy(), rtol=1e-6, atol=1e-7)


def test_a_single_hot_patch_peaks_where_it_lies():
    patch = np.zeros((1, 4, 4), np.float32)
    patch[0, 1, 2] = 1.0
    maps = scoring.anomaly_maps(patch, (32, 32))
    y, x = np.unravel_index(int(maps[0].argmax()), (32, 32))
    assert 8 <= y < 16 and 16 <= x < 24


@pytest.mark.parametrize("input_size,resize,crop,out", [((60, 90), 40, 32, None), ((32, 32), None, None, None),
                                                        ((50, 40), None, 32, None), ((300, 200), 64, 48, (100, 70)),
                                                        ((64, 64), 64, 64, None)])
def test_map_to_input_size_equals_replicate_pad_then_interpolate(input_size, resize, crop, out):
    side = crop or resize or input_size[0]
    amap = np.random.default_rng(side).random((side, side)).astype(np.float32)
    got = map_to_input_size(amap, input_size, resize, crop, out)
    t = torch.from_numpy(amap)[None, None]
    frame = (resize, resize) if resize is not None else input_size
    if crop is not None:
        top, left = int(round((frame[0] - crop) / 2.0)), int(round((frame[1] - crop) / 2.0))
        t = F.pad(t, (left, frame[1] - crop - left, top, frame[0] - crop - top), mode="replicate")
    target = out or input_size
    if tuple(t.shape[-2:]) != tuple(target):
        t = F.interpolate(t, size=target, mode="bilinear", align_corners=False)
    assert got.shape == tuple(target)
    np.testing.assert_allclose(got, t[0, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_patch_scores_weight_and_square_the_distance():
    dist = np.array([3.0, 1.0], np.float32)
    nearest = np.array([0, 1])
    weights = np.array([2.0, 1.0], np.float32)
    assert scoring.patch_scores(dist, nearest, weights, "l2").tolist() == [6.0, 1.0]
    assert scoring.patch_scores(dist, nearest, None, "squared_l2").tolist() == [9.0, 1.0]
    bank = MemoryBank(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.tensor([2.0, 1.0]), torch.tensor([0, 1]))
    scores, rows = bank.score(torch.tensor([[0.0, 3.0], [9.0, 0.0]]))
    assert scores.tolist() == pytest.approx([6.0, 1.0]) and rows.tolist() == [0, 1]


def _bank(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32)),
            torch.from_numpy(rng.uniform(0.5, 2.0, n).astype(np.float32)))


def test_reweighted_image_score_is_patchcore_eq7():
    feats, weights = _bank(300, 16, 0)
    bank = MemoryBank(feats, weights, torch.zeros(300, dtype=torch.int64))
    queries = torch.from_numpy(np.random.default_rng(1).normal(size=(4 * 25, 16)).astype(np.float32))
    patch, nearest = bank.score(queries)
    got = scoring.image_scores(patch.reshape(4, 25), "reweighted", bank=bank, queries=queries, nearest=nearest)
    # oracle: torch.softmax over the distances to the matched row's 9 nearest bank rows
    top, where = patch.reshape(4, 25).max(dim=1)
    rows = torch.arange(4) * 25 + where
    support = ops.knn(feats[nearest[rows]], feats, 9).indices
    dist = (queries[rows][:, None, :] - feats[support]).norm(dim=2)
    want = (1.0 - torch.softmax(dist, dim=1)[:, 0]) * top
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert scoring.image_scores(patch.reshape(4, 25), "max").tolist() == top.tolist()


@pytest.mark.parametrize("image_score", ["max", "reweighted"])
@pytest.mark.parametrize("distance", ["l2", "squared_l2"])
@pytest.mark.parametrize("search", ["exact", "pca"])
def test_score_batch_on_numpy_equals_score_batch_on_torch(image_score, distance, search):
    """The torch-free predictor runs the same core on numpy: the same numbers."""
    feats, weights = _bank(400, 48, 2)
    emb = torch.from_numpy(np.random.default_rng(3).normal(size=(3, 5, 5, 48)).astype(np.float32))
    make = lambda f, w, s: MemoryBank(f, w, s, distance, search)  # noqa: E731
    ids = torch.zeros(400, dtype=torch.int64)
    on_torch = scoring.score_batch({"cls": make(feats, weights, ids), "seg": make(feats[:200], None, ids[:200])},
                                   emb, image_score, (20, 20))
    on_numpy = scoring.score_batch({"cls": make(feats.numpy(), weights.numpy(), ids.numpy()),
                                    "seg": make(feats[:200].numpy(), None, ids[:200].numpy())},
                                   emb.numpy(), image_score, (20, 20))
    np.testing.assert_allclose(on_numpy.scores, on_torch.scores, rtol=1e-6)
    np.testing.assert_allclose(on_numpy.patch_scores, on_torch.patch_scores, rtol=1e-6)
    np.testing.assert_allclose(on_numpy.maps, on_torch.maps, rtol=1e-6, atol=1e-7)
    assert on_torch.maps.shape == (3, 20, 20) and on_torch.patch_scores.shape == (3, 5, 5)
    with pytest.raises(ValueError, match="feature dimension 47 does not match the memory bank"):
        scoring.score_batch({"cls": make(feats, weights, ids)}, emb[..., :47], image_score)


def test_prediction_decides_the_verdicts_once():
    parts = [scoring.BatchScores(np.array([1.0, 3.0], np.float32)), scoring.BatchScores(np.array([2.5], np.float32))]
    pred = scoring.prediction(["a", "b", "c"], [None] * 3, [(4, 4)] * 3, parts, 2.0, None, None)
    assert pred.is_anomalous.tolist() == [False, True, True] and pred.maps.shape == (3, 0, 0)
    assert pred.patch_scores is None and pred.threshold == 2.0
