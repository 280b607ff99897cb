"""The denoising policy (softpatch_cuda.denoise.policy) against a plain numpy reading of
its rules, on random scores with planted outlier images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softpatch_cuda.denoise import BankSpec, DenoiseSpec, plan_banks
from softpatch_cuda.denoise.policy import REPORT_MAD_FACTOR, REPORT_SCALE_FLOOR, REPORT_TOP_FRACTION
from softpatch_cuda.models import SoftPatchConfig, SoftPatchPlusConfig


def _scores(n: int, h: int, w: int, seed: int, outlier_images=(), methods=("lof", "gaussian")) -> dict:
    rng = np.random.default_rng(seed)
    raw = {}
    for k, m in enumerate(methods):
        s = 1.0 + np.abs(rng.normal(0, 0.05 + 0.5 * k, (n, h, w)))  # heavy-ish tail, different scales
        for i in outlier_images:  # a defect: a 2x2 block of strong outliers
            y, x = rng.integers(0, h - 1), rng.integers(0, w - 1)
            s[i, y:y + 2, x:x + 2] += 3.0 * (1 + k)
        raw[m] = torch.from_numpy(s.astype(np.float32))
    return raw


def _lower_median(a: np.ndarray) -> float:
    """torch.median's definition: the lower of the two middle values for an even count."""
    f = np.sort(np.asarray(a).reshape(-1))
    return float(f[(f.size - 1) // 2])


def _ranks(a: np.ndarray) -> np.ndarray:
    flat = a.reshape(-1)
    r = np.empty(flat.size)
    r[np.argsort(flat, kind="stable")] = np.arange(flat.size)
    return (r / max(flat.size - 1, 1)).reshape(a.shape)


def _reference(raw: dict, banks: list[tuple[str, float, str, str]], mad_factor: float, weight_mode: str,
               weight_fusion: str = "mean"):
    """Plain reading: order = mean rank (one discriminator: its score); a bank removes its
    top fraction, gated or not; outlier weights = max(1, mean_d (or min_d) s_d / (med_d + 3 MAD_d))."""
    arrays = [v.numpy().astype(np.float64) for v in raw.values()]
    order = arrays[0] if len(arrays) == 1 else np.mean([_ranks(a) for a in arrays], axis=0)
    total = order.size
    out = {}
    for name, fraction, removal, gate in banks:
        removed = np.zeros(total, bool)
        count = 0 if removal == "none" else int(math.floor(fraction * total + 1e-9))
        if count:
            worst = np.argsort(-order.reshape(-1), kind="stable")[:count]
            if removal == "gated":
                hits = []
                for a in arrays:
                    f = a.reshape(-1)
                    med = _lower_median(f)
                    hits.append(f > med + mad_factor * 1.4826 * _lower_median(np.abs(f - med)))
                ok = np.any(hits, axis=0) if gate == "any" else np.all(hits, axis=0)
                worst = worst[ok[worst]]
            removed[worst] = True
        parts = []
        for a in arrays:
            f = a.reshape(-1)
            med = _lower_median(f)
            parts.append(f / (med + 3.0 * 1.4826 * _lower_median(np.abs(f - med))))
        combined = np.min(parts, axis=0) if weight_fusion == "min" else np.mean(parts, axis=0)
        out[name] = (~removed, np.maximum(combined, 1.0))
    # report: mean over discriminators of score / median, top 5 % mean per image, robust flag with floor
    ev = np.mean([a / _lower_median(a) for a in arrays], axis=0).reshape(arrays[0].shape[0], -1)
    top = int(math.ceil(REPORT_TOP_FRACTION * ev.shape[1]))
    img = np.sort(ev, axis=1)[:, -top:].mean(axis=1)
    med = np.median(img)
    scale = max(1.4826 * np.median(np.abs(img - med)), REPORT_SCALE_FLOOR * abs(med))
    return out, img, img > med + REPORT_MAD_FACTOR * scale


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("removal, gate", [("gated", "any"), ("gated", "all"), ("fixed", "any"), ("none", "any")])
@pytest.mark.parametrize("weight_fusion", ["mean", "min"])
def test_plan_banks_matches_plain_reference(seed, removal, gate, weight_fusion):
    raw = _scores(24, 7, 9, seed, outlier_images=(3, 11, 17))
    banks = [("cls", 0.15, removal, gate), ("seg", 0.2, "fixed", "any")]
    spec = DenoiseSpec(banks=tuple(BankSpec(n, f, removal=r, gate=g) for n, f, r, g in banks), removal_mad=6.0,
                       weight_fusion=weight_fusion)
    got = plan_banks(raw, spec)
    want, img, flagged = _reference(raw, banks, 6.0, "outlier", weight_fusion)
    for name in ("cls", "seg"):
        np.testing.assert_array_equal(got.kept[name].numpy(), want[name][0])
        np.testing.assert_allclose(got.weights[name].numpy(), want[name][1], rtol=1e-5)
    np.testing.assert_allclose(got.image_scores, img, rtol=1e-5)
    np.testing.assert_array_equal(got.flagged, flagged)
    # the segmentation bank's removal is a superset of the classification bank's
    assert not np.any(~got.kept["cls"].numpy() & got.kept["seg"].numpy())


def test_planted_images_are_flagged_and_clean_sets_lose_nothing():
    raw = _scores(30, 8, 8, 5, outlier_images=(2, 9, 21))
    spec = SoftPatchPlusConfig().denoise_spec()
    res = plan_banks(raw, spec)
    assert set(np.flatnonzero(res.flagged)) == {2, 9, 21}
    removed_images = set(np.flatnonzero(res.removed_fraction > 0))
    assert {2, 9, 21} <= removed_images
    clean = plan_banks(_scores(30, 8, 8, 5), spec)
    assert clean.flagged.sum() == 0
    # the default 6-MAD gate keeps (almost) every patch of a clean set in the cls bank
    assert clean.stats["cls"]["removed_share"] < 0.01


def test_report_flag_floor_when_images_score_alike():
    # every image has the same top patches: MAD 0 -> without the floor all above median flag
    s = torch.ones(20, 6, 6)
    s[:, 0, 0] = 1.5
    s[7, 0, 0] = 1.50001  # a hair above the rest: not flagged
    s[13, 2, 2] = 4.0  # clearly above: flagged
    res = plan_banks({"lof": s}, SoftPatchConfig().denoise_spec())
    assert list(np.flatnonzero(res.flagged)) == [13]


def test_softpatch_single_discriminator_orders_by_raw_score():
    raw = _scores(16, 5, 5, 3, outlier_images=(4,), methods=("lof",))
    spec = DenoiseSpec(banks=(BankSpec("cls", 0.1, removal="fixed"),))
    res = plan_banks(raw, spec)
    flat = raw["lof"].reshape(-1)
    count = int(0.1 * flat.numel())
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[flat.topk(count).indices] = True
    assert torch.equal(~res.kept["cls"], expected)


def test_min_weight_fusion_needs_every_discriminator():
    """A patch that only one discriminator calls an outlier keeps weight 1 under "min"
    and weighs more under "mean"; a patch both call outliers weighs more under both."""
    raw = _scores(20, 6, 6, 4)
    raw["gaussian"][2, 1, 1] += 40.0  # only the Gaussian discriminator sees it
    raw["lof"][5, 3, 3] += 40.0
    raw["gaussian"][5, 3, 3] += 40.0  # both see it
    one, both = 2 * 36 + 1 * 6 + 1, 5 * 36 + 3 * 6 + 3
    weights = {}
    for fusion in ("mean", "min"):
        spec = DenoiseSpec(banks=(BankSpec("cls", 0.0, removal="none"),), weight_fusion=fusion)
        weights[fusion] = plan_banks(raw, spec).weights["cls"]
    assert weights["mean"][one] > 1.5 and weights["min"][one] == 1.0
    assert weights["mean"][both] > 1.5 and weights["min"][both] > 1.5
    assert bool((weights["min"] <= weights["mean"]).all())
    assert SoftPatchPlusConfig().denoise_spec().weight_fusion == "min"
    assert SoftPatchPlusConfig.from_options(preset="paper").denoise_spec().weight_fusion == "mean"
