"""The fit phases one by one, each from explicit inputs (no Detector): embed, then
(softpatch_cuda.models.phases) prepare -> denoise -> select on a shard, merge -> calibrate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softpatch_cuda.backbone import FeatureExtractor
from softpatch_cuda.data.images import ImageTransform
from softpatch_cuda.denoise import BankSpec, DenoiseSpec, DiscriminatorSettings, flag_images, plan_banks, score_patches
from softpatch_cuda.embedding import PatchEmbedder, embed_images
from softpatch_cuda.models import SoftPatchPlusConfig, phases
from softpatch_cuda.models.calibration import leave_out_scores


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


def _embedded(n: int = 12, seed: int = 2):
    from softpatch_cuda.embedding import EmbeddedImages

    rng = np.random.default_rng(seed)
    emb = torch.from_numpy(rng.normal(size=(n, 4, 4, 16)).astype(np.float32))
    emb[min(5, n - 1), 1:3, 1:3] += 8.0  # a defect in image 5
    return EmbeddedImages(emb, [f"image_{i}" for i in range(n)], [None] * n, [(4, 4)] * n,
                          [f"digest{i}" for i in range(n)])


SETTINGS = phases.FitSettings(SoftPatchPlusConfig(proj_dim=8, coreset_ratio=0.25, alignment="position", lof_k=4,
                                                  seg_threshold=0.3))


def test_prepare_phase_finds_duplicates_and_projects():
    embedded = _embedded()
    embedded.digests[7] = embedded.digests[2]  # image 7 duplicates image 2
    prepared = phases.prepare(embedded, SETTINGS)
    assert prepared.distinct == [i for i in range(12) if i != 7] and prepared.original_of[7] == 2
    assert prepared.projected.shape == (11 * 16, 8) and prepared.grid == (4, 4)
    with pytest.raises(ValueError, match="1x1 patch grid.*at least 17x17 pixels"):
        phases.check_grid(1, 1, 8)


def test_select_phase_keeps_the_plans_coreset_of_the_kept_patches():
    prepared = phases.prepare(_embedded(), SETTINGS)
    denoised = phases.denoise(prepared, SETTINGS)
    parts = phases.select(prepared, denoised, SETTINGS)
    assert set(parts) == {"cls", "seg"}
    for name, part in parts.items():
        kept = denoised.result.kept[name]
        assert part.kept == int(kept.sum())
        assert len(part.image_ids) == phases.coreset_plan(SETTINGS.config).size(part.kept)
        rows = [int(torch.nonzero((prepared.flat == row).all(1))[0]) for row in part.features]
        assert all(bool(kept[r]) for r in rows)  # removed patches never enter a bank
        assert part.image_ids.tolist() == [r // 16 for r in rows]
    assert (~denoised.result.kept["seg"]).reshape(12, 16)[5].sum() >= 4  # the defect left the maps' bank


def test_merge_and_report_phases():
    result = phases.fit_shard(_embedded(), SETTINGS)
    merged = phases.merge([result], SETTINGS, "cpu", n_images=12)
    assert merged.report.names == [f"image_{i}" for i in range(12)] and int(np.argmax(merged.report.scores)) == 5
    assert merged.report.flagged[5] and merged.report.flagged.tolist() == flag_images(merged.report.scores)[0].tolist()
    bank = merged.banks["cls"]
    assert bank.distance == "l2" and bank.search == "exact" and len(bank) == len(result.banks["cls"].image_ids)
    with pytest.raises(RuntimeError, match="returned 12 images, expected 13"):
        phases.merge([result], SETTINGS, "cpu", n_images=13)


def test_a_report_without_scores():
    from softpatch_cuda.models import PatchCoreConfig

    settings = phases.FitSettings(PatchCoreConfig(proj_dim=8, coreset_ratio=0.5))  # LOF needs 7 images: 4 given
    result = phases.fit_shard(_embedded(4), settings)
    report = phases.merge([result], settings, "cpu").report
    assert np.isnan(report.scores).all() and not report.flagged.any() and math.isnan(report.threshold)


def test_calibrate_phase():
    from softpatch_cuda.memory_bank import MemoryBank

    rng = np.random.default_rng(3)
    emb = torch.from_numpy(rng.normal(size=(20, 3, 3, 8)).astype(np.float32))
    bank = MemoryBank(emb.reshape(-1, 8), None, torch.arange(20).repeat_interleave(9))
    flagged = np.zeros(20, bool)
    flagged[[2, 7]] = True
    merged = phases.Merged({"cls": bank}, np.arange(20), flagged, None, None, None, (3, 3), 8, {}, [], {}, 0)
    settings = phases.FitSettings(SoftPatchPlusConfig())
    calib = phases.calibrate(bank, merged, settings, lambda ids: emb[torch.as_tensor(ids)])
    assert calib.scores.size == 16 and math.isfinite(calib.threshold)
    # the calibration images were scored without their own patches: scores far from 0
    assert calib.scores.min() > 0.1 and 0 < calib.score_floor <= calib.scores.min()
    chosen = np.sort(np.random.default_rng(17).choice(np.flatnonzero(~flagged), size=16, replace=False))
    np.testing.assert_allclose(calib.scores, leave_out_scores(emb, bank, chosen, "max", 4)[0])
    med = np.median(calib.scores)
    assert calib.threshold == pytest.approx(med + 3 * 1.4826 * np.median(np.abs(calib.scores - med)), rel=1e-6)
    one = phases.Merged({"cls": bank}, np.arange(1), flagged[:1], None, None, None, (3, 3), 8, {}, [], {}, 0)
    with pytest.raises(ValueError, match="at least 2"):
        phases.calibrate(bank, one, settings, lambda ids: emb[torch.as_tensor(ids)])
