"""The fit phases one by one, each from explicit inputs (no Detector):
embed -> denoise -> build banks -> training report -> calibrate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softpatch_cuda.backbone import FeatureExtractor
from softpatch_cuda.data.images import ImageTransform
from softpatch_cuda.denoise import BankSpec, DenoiseSpec, DiscriminatorSettings, plan_banks, score_patches
from softpatch_cuda.embedding import PatchEmbedder, embed_images
from softpatch_cuda.memory_bank import build_banks, coreset_size
from softpatch_cuda.models.calibration import calibrate_threshold, leave_out_scores
from softpatch_cuda.results import TrainingReport


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    return PatchEmbedder(FeatureExtractor("resnet18", pretrained=False), 32)


def test_embed_phase(embedder):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    out = embed_images(embedder, imgs + [imgs[1]], ImageTransform(resize=32, crop=32), batch_size=2)
    assert out.embeddings.shape == (4, 4, 4, 32) and out.names == [f"image_{i}" for i in range(4)]
    assert out.digests[1] == out.digests[3] and len(set(out.digests[:3])) == 3
    assert out.sizes == [(40, 40)] * 4
    torch.testing.assert_close(out.embeddings[1], out.embeddings[3])
    assert out.subset([2, 0]).names == ["image_2", "image_0"]
    with pytest.raises(ValueError, match="different sizes"):
        embed_images(embedder, [imgs[0], rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)],
                     ImageTransform(resize=None, crop=None), batch_size=1)


def test_denoise_phase():
    rng = np.random.default_rng(1)
    z = torch.from_numpy(rng.normal(size=(12, 4, 4, 8)).astype(np.float32))
    z[5, 1:3, 1:3] += 6.0  # a defect in image 5
    scores = score_patches(z, DiscriminatorSettings(methods=("lof", "gaussian"), alignment="position", lof_k=4))
    assert scores.alignment == "position" and set(scores.raw) == {"lof", "gaussian"}
    assert all(s.shape == (12, 4, 4) for s in scores.raw.values())
    res = plan_banks(scores.raw, DenoiseSpec(banks=(BankSpec("cls", 0.1, removal="fixed"),)))
    removed = (~res.kept["cls"]).reshape(12, 4, 4)
    assert removed[5, 1:3, 1:3].all() and int(np.argmax(res.image_scores)) == 5
    with pytest.raises(ValueError, match="at least 5 training images"):
        score_patches(z[:4], DiscriminatorSettings(lof_k=4))
    empty = score_patches(z[:4], DiscriminatorSettings(lof_k=4, required=False))
    assert empty.raw == {} and empty.alignment is None


def test_build_banks_phase():
    rng = np.random.default_rng(2)
    emb = torch.from_numpy(rng.normal(size=(60, 16)).astype(np.float32))
    proj = emb[:, :4].contiguous()
    image_index = torch.arange(6).repeat_interleave(10)
    kept = {"cls": torch.ones(60, dtype=torch.bool), "seg": torch.arange(60) % 3 != 0}
    weights = {"cls": torch.linspace(1, 2, 60), "seg": None}
    banks = build_banks(emb, proj, image_index, kept, weights, 0.25, seed=0)
    assert len(banks["cls"]) == coreset_size(60, 0.25) and len(banks["seg"]) == coreset_size(40, 0.25)
    seg_rows = [int(torch.nonzero((emb == row).all(1))[0]) for row in banks["seg"].features]
    assert all(r % 3 != 0 for r in seg_rows)  # removed rows never enter the bank
    assert banks["seg"].weights is None and banks["cls"].weights.shape == (len(banks["cls"]),)
    torch.testing.assert_close(banks["cls"].source_image, image_index[[
        int(torch.nonzero((emb == row).all(1))[0]) for row in banks["cls"].features]])


def test_report_phase():
    names, sources = ["a", "b", "c"], ["/x/a.png", None, "/x/c.png"]
    empty = TrainingReport.from_denoising(names, sources, None)
    assert np.isnan(empty.scores).all() and not empty.flagged.any() and math.isnan(empty.threshold)
    z = torch.ones(3, 4, 4)
    z[2, 0, 0] = 9.0
    res = plan_banks({"lof": z}, DenoiseSpec(banks=(BankSpec("cls", 0.0, removal="none"),)))
    rep = TrainingReport.from_denoising(names, sources, res)
    assert rep.flagged.tolist() == [False, False, True]
    spread = rep.expanded(names + ["a copy"], sources + [None], [0, 1, 2, 2])
    assert spread.scores[3] == spread.scores[2] and spread.names[3] == "a copy"


def test_calibrate_phase():
    from softpatch_cuda.memory_bank import MemoryBank

    rng = np.random.default_rng(3)
    emb = torch.from_numpy(rng.normal(size=(20, 3, 3, 8)).astype(np.float32))
    bank = MemoryBank(emb.reshape(-1, 8), None, torch.arange(20).repeat_interleave(9))
    flagged = np.zeros(20, bool)
    flagged[[2, 7]] = True
    thr, calib = calibrate_threshold(emb, bank, flagged, seed=0)
    assert calib.size == 16 and math.isfinite(thr)
    # the calibration images were scored without their own patches: scores far from 0
    assert calib.min() > 0.1
    chosen = np.sort(np.random.default_rng(17).choice(np.flatnonzero(~flagged), size=16, replace=False))
    np.testing.assert_allclose(calib, leave_out_scores(emb, bank, chosen, "max", 4))
    med = np.median(calib)
    assert thr == pytest.approx(med + 3 * 1.4826 * np.median(np.abs(calib - med)), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        calibrate_threshold(emb[:1], bank, flagged[:1], seed=0)
