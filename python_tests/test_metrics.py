"""Metrics against hand-computed cases and slow plain references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from softpatch_cuda.metrics import aupro, f1_max, image_auroc, pixel_auroc, pro_curve


# ---------------------------------------------------------------------- references
def naive_auroc(labels, scores) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), over all pairs."""
    labels = np.asarray(labels, bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def naive_aupro(masks, maps, thresholds, fpr_limit=0.3) -> float:
    """Binarise once per threshold, label regions, average the overlaps; integrate by clipping segments."""
    masks = np.asarray(masks, bool)
    maps = np.asarray(maps, np.float64)
    points = [(0.0, 0.0)]
    for t in sorted(thresholds, reverse=True):
        predicted = maps >= t
        fpr = (predicted & ~masks).sum() / (~masks).sum()
        overlaps = []
        for mask, pred in zip(masks, predicted):
            regions, count = ndimage.label(mask, structure=np.ones((3, 3)))
            for r in range(1, count + 1):
                overlaps.append(pred[regions == r].mean())
        points.append((fpr, float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def naive_f1_max(labels, scores) -> float:
    labels = np.asarray(labels, bool)
    best = 0.0
    for t in np.unique(scores):
        pred = np.asarray(scores) >= t
        tp = (pred & labels).sum()
        if tp:
            precision, recall = tp / pred.sum(), tp / labels.sum()
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ------------------------------------------------------------------------- AUROC
def test_image_auroc_by_hand():
    # positive/negative pairs: (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, *) ok -> 3 / 4
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert image_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # tie counts half
    assert image_auroc([True, False, True], [3, 1, 2]) == pytest.approx(1.0)  # bool labels, int scores
    assert image_auroc(np.array([1, 0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.0)


def test_image_auroc_matches_pairwise_reference(rng):
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounded: ties included
    assert image_auroc(labels, scores) == pytest.approx(naive_auroc(labels, scores), abs=1e-12)


@pytest.mark.parametrize(
    "labels, scores, match",
    [
        ([0, 0, 0], [1, 2, 3], "undefined: all 3 labels are normal"),
        ([1, 1], [1, 2], "undefined: all 2 labels are anomalous"),
        ([0, 1, 1], [1, 2], "differ in length"),
        ([0, 1], [np.nan, 1], "NaN or infinite"),
        ([0, 1], [np.inf, 1], "NaN or infinite"),
        ([0, 2], [1, 2], "0/1 values"),
        ([[0, 1]], [[1, 2]], "must be 1-D"),
        ([], [], "empty"),
        ([0, 1], ["a", "b"], "real-valued"),
    ],
)
def test_image_auroc_errors(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        image_auroc(labels, scores)


def test_pixel_auroc(rng):
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 3, 3] = True
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, 0, 0] = 1.0
    # defect at 1 beats all 14 normals; defect at 0 ties all of them: (14 + 7) / 28
    assert pixel_auroc(masks, maps) == pytest.approx(0.75)
    assert pixel_auroc(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert pixel_auroc(masks[0], maps[0]) == pytest.approx(0.75)  # one [H, W] image
    masks = rng.random((3, 8, 8)) < 0.2
    maps = (rng.random((3, 8, 8)) + masks * 0.3).astype(np.float32)
    assert pixel_auroc(masks, maps) == pytest.approx(naive_auroc(masks, maps), abs=1e-9)
    assert pixel_auroc(masks.astype(np.uint8), maps.astype(np.float64)) == pytest.approx(naive_auroc(masks, maps))


def test_pixel_auroc_errors():
    masks = np.zeros((2, 4, 4), bool)
    maps = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="pixel AUROC is undefined"):
        pixel_auroc(masks, maps)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_auroc(masks, maps[:, :3])
    bad = maps.copy()
    bad[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="maps: contains 1 NaN"):
        pixel_auroc(masks, bad)
    with pytest.raises(ValueError, match=r"masks: expected bool or 0/1 values, found e.g. \[255\]"):
        pixel_auroc(masks.astype(np.uint8) * 255, maps)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        pixel_auroc(masks[None], maps[None])


# ------------------------------------------------------------------------- AUPRO
def test_aupro_perfect_and_inverted():
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 1:3, 1:4] = True
    masks[1, 4:6, 0:2] = True
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert aupro(masks, masks.astype(np.float32), num_thresholds=None) == pytest.approx(1.0)
    # defects below every normal pixel (normals all distinct): PRO stays 0 until FPR = 1
    inverted = np.arange(72, dtype=np.float32).reshape(2, 6, 6) + 1.0
    inverted[masks] = 0.0
    assert aupro(masks, inverted, num_thresholds=None) == pytest.approx(0.0)


def test_aupro_two_regions_half_detected():
    # Region A (detected) and region B (tied with the normals): curve (0,0) -> (0, .5) -> (1, 1);
    # PRO at FPR 0.3 = 0.65, area = 0.3 * (0.5 + 0.65) / 2, normalised by 0.3 -> 0.575.
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 3, 3] = True
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, 0, 0] = 1.0
    assert aupro(masks, maps) == pytest.approx(0.575)
    assert aupro(masks, maps, num_thresholds=None) == pytest.approx(0.575)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.75)


def test_aupro_averages_regions_not_pixels():
    # A 1-pixel region found first, a 9-pixel region last: PRO 0.5 (pixel share would be 0.1).
    masks = np.zeros((2, 5, 5), bool)
    masks[0, 0, 0] = True
    masks[1, 1:4, 1:4] = True
    maps = np.zeros((2, 5, 5), np.float32)
    maps[0, 0, 0] = 2.0
    maps[~masks] = 1.0
    # curve: (0,0) -> (0,.5) -> (1,.5) -> (1,1)
    assert aupro(masks, maps, num_thresholds=None) == pytest.approx(0.5)


def test_aupro_regions_are_8_connected():
    # One diagonal-touching region of 3 pixels; only one pixel found -> overlap 1/3
    # (4-connectivity would give regions {1 found} and {2 missed}: mean 0.5).
    masks = np.zeros((1, 5, 5), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.ones((1, 5, 5), np.float32)
    maps[0, 0, 0] = 3.0
    maps[0, 1, 1] = maps[0, 1, 2] = 0.0
    assert aupro(masks, maps, num_thresholds=None) == pytest.approx(1 / 3)


def test_aupro_interpolates_at_the_fpr_limit():
    # 10 normals at 0.1..1.0, one defect pixel tied with the 0.7 normal:
    # (0,0) (.1,0) (.2,0) (.3,0) (.4,1) ...: nothing below FPR 0.3; at 0.35 the
    # diagonal segment gives PRO 0.5 -> area 0.05 * 0.5 / 2 = 0.0125.
    maps = np.array([[[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.7]]], np.float32)
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, 10] = True
    fpr, pro, thresholds = pro_curve(masks, maps, num_thresholds=None)
    np.testing.assert_allclose(fpr, [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    assert thresholds[0] == np.inf
    assert aupro(masks, maps, num_thresholds=None) == pytest.approx(0.0)
    assert aupro(masks, maps, fpr_limit=0.35, num_thresholds=None) == pytest.approx(0.0125 / 0.35)
    assert aupro(masks, maps, fpr_limit=0.5, num_thresholds=None) == pytest.approx((0.05 + 0.1) / 0.5)


@pytest.mark.parametrize("num_thresholds", [2, 17, 200])
def test_aupro_matches_naive_on_a_threshold_grid(rng, num_thresholds):
    masks = np.zeros((3, 20, 20), bool)
    masks[0, 2:7, 3:9] = True
    masks[0, 12:14, 12:19] = True
    masks[1, 5:15, 5:7] = True
    masks[1, 16, 16] = True  # region of one pixel
    maps = rng.normal(size=masks.shape).astype(np.float32)
    maps[masks] += 1.5
    maps = ndimage.gaussian_filter(maps, sigma=(0, 1, 1))
    thresholds = np.linspace(float(maps.min()), float(maps.max()), num_thresholds)
    expected = naive_aupro(masks, maps, thresholds)
    assert aupro(masks, maps, num_thresholds=num_thresholds) == pytest.approx(expected, abs=1e-9)
    if num_thresholds == 200:
        assert 0.3 < expected < 1.0


def test_aupro_exact_mode_matches_naive_with_ties(rng):
    masks = rng.random((2, 12, 12)) < 0.15  # many small regions
    maps = np.round(rng.random((2, 12, 12)) + 0.4 * masks, 1).astype(np.float32)  # many ties
    expected = naive_aupro(masks, maps, np.unique(maps))
    assert aupro(masks, maps, num_thresholds=None) == pytest.approx(expected, abs=1e-9)
    assert aupro(masks, maps, fpr_limit=0.7, num_thresholds=None) == pytest.approx(
        naive_aupro(masks, maps, np.unique(maps), fpr_limit=0.7), abs=1e-9
    )


def test_aupro_errors():
    masks = np.zeros((1, 4, 4), bool)
    maps = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="no defect pixels"):
        aupro(masks, maps)
    with pytest.raises(ValueError, match="no normal pixels"):
        aupro(~masks, maps)
    masks[0, 0, 0] = True
    for limit in (0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(masks, maps, fpr_limit=limit)
    for n in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="num_thresholds"):
            aupro(masks, maps, num_thresholds=n)
    with pytest.raises(ValueError, match="differ in shape"):
        aupro(masks, maps[..., :2])
    maps[0, 1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        aupro(masks, maps)


def test_aupro_constant_map():
    # Every pixel positive at the single threshold: curve (0,0) -> (1,1), area up to 0.3 = 0.045.
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :2] = True
    assert aupro(masks, np.full((1, 4, 4), 0.5, np.float32)) == pytest.approx(0.15)


# ------------------------------------------------------------------------ F1-max
def test_f1_max_by_hand():
    # thresholds: 0.8 -> P 1, R .5, F1 .667; 0.4 -> P .5, R .5; 0.35 -> P 2/3, R 1, F1 0.8; 0.1 -> P .5, R 1
    f1, threshold = f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)
    assert f1_max([0, 1, 1], [0.2, 0.6, 0.9]) == (pytest.approx(1.0), pytest.approx(0.6))
    assert f1_max([1, 1], [0.2, 0.3]) == (pytest.approx(1.0), pytest.approx(0.2))  # no negatives: fine


def test_f1_max_matches_reference(rng):
    labels = rng.integers(0, 2, 150)
    scores = np.round(rng.normal(size=150) + labels, 1)
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(naive_f1_max(labels, scores))
    pred = scores >= threshold
    tp = (pred & (labels == 1)).sum()
    assert 2 * tp / (pred.sum() + labels.sum()) == pytest.approx(f1)


def test_f1_max_errors():
    with pytest.raises(ValueError, match="F1 is undefined: all 3 labels are normal"):
        f1_max([0, 0, 0], [1, 2, 3])
    with pytest.raises(ValueError, match="differ in length"):
        f1_max([0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        f1_max([0, 1], [np.nan, 1])
