"""PatchCore / SoftPatch / SoftPatchPlus: contracts, denoising behaviour, errors.

Small and CPU-only: random-weight resnet18 (pretrained=False, seeded), 64 px images
(an 8 x 8 patch grid), a few dozen images.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from builders import FAST, SIZE, aligned_object, object_set
from softpatch_cuda import PatchCore, Prediction, SoftPatch, SoftPatchPlus, TrainingReport

def margin(labels: np.ndarray, scores: np.ndarray) -> float:
    """Median defect score over the highest normal score: how far typical defects stand out."""
    return float(np.median(scores[labels == 1]) / scores[labels == 0].max())


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def clean_data():
    return object_set(10, 0, seed=1)[0]


@pytest.fixture(scope="module")
def fitted_softpatch(clean_data):
    return SoftPatch(**FAST).fit(clean_data)


# ------------------------------------------------------------------ contracts
def test_prediction_contract(fitted_softpatch, clean_data):
    pred = fitted_softpatch.predict(clean_data[:5])
    assert isinstance(pred, Prediction)
    assert pred.scores.shape == (5,) and pred.scores.dtype == np.float32
    assert pred.maps.shape == (5, SIZE, SIZE) and pred.maps.dtype == np.float32
    assert pred.is_anomalous.dtype == bool and pred.is_anomalous.shape == (5,)
    assert np.array_equal(pred.is_anomalous, pred.scores > pred.threshold)
    assert pred.threshold == fitted_softpatch.threshold
    assert pred.names == [f"image_{i}" for i in range(5)]
    assert np.all(np.isfinite(pred.maps)) and np.all(pred.scores > 0)
    # image score = the largest patch score
    np.testing.assert_allclose(pred.scores, pred.patch_scores.reshape(5, -1).max(1), rtol=1e-6)
    np.testing.assert_allclose(fitted_softpatch.score(clean_data[:5]), pred.scores, rtol=1e-6)


def test_map_at_input_size_undoes_resize_and_crop():
    rng = np.random.default_rng(0)
    imgs = [aligned_object(rng, size=80) for _ in range(8)]
    model = PatchCore(**dict(FAST, resize=72, crop=64)).fit(imgs)
    wide = Image.fromarray(aligned_object(rng, True, size=80)).resize((100, 80))
    pred = model.predict([wide])
    assert pred.maps.shape == (1, 64, 64)
    full = pred.map_at_input_size(0)
    assert full.shape == (80, 100) and full.dtype == np.float32
    assert full.min() >= pred.maps[0].min() - 1e-5 and full.max() <= pred.maps[0].max() + 1e-5
    with pytest.raises(IndexError):
        pred.map_at_input_size(3)


def test_input_kinds_give_identical_scores(fitted_softpatch, clean_data, tmp_path):
    u8 = clean_data[:3]
    paths = []
    for i, a in enumerate(u8):
        p = tmp_path / f"{i:02d}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    ref = fitted_softpatch.score(u8)
    floats = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(floats), batch_size=2)
    for kind in (paths, str(tmp_path), [Image.fromarray(a) for a in u8], floats, loader):
        np.testing.assert_allclose(fitted_softpatch.score(kind), ref, rtol=1e-5)
    pred = fitted_softpatch.predict(str(tmp_path))
    assert pred.names == ["00.png", "01.png", "02.png"] and pred.sources == paths


def test_training_report_contract(fitted_softpatch, clean_data):
    rep = fitted_softpatch.training_report()
    assert isinstance(rep, TrainingReport)
    assert len(rep) == len(clean_data) and rep.scores.shape == (len(clean_data),)
    assert rep.flagged.dtype == bool
    assert np.array_equal(rep.flagged, rep.scores > rep.threshold)
    assert rep.removed_fraction.shape == (len(clean_data),)
    # at most 15 % of all patches removed (only robust outliers among the top 15 %)
    assert 0.0 < rep.removed_fraction.mean() <= 0.15 + 1e-6
    top = rep.top(3)
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    rows = rep.to_rows()
    assert {"rank", "name", "source", "contamination_score", "flagged", "removed_fraction"} <= set(rows[0])
    assert "TrainingReport" in str(rep)


def test_threshold_calibrated_and_settable(fitted_softpatch, clean_data):
    thr = fitted_softpatch.threshold
    assert np.isfinite(thr) and thr > 0
    # calibration scores came from leave-own-image-out scoring: not ~0
    calib = fitted_softpatch.fit_info_["calibration_scores"]
    assert len(calib) >= 2 and min(calib) > 0.05 * max(calib)
    # the image's own patches give (nearly) zero distance; the calibrated threshold is far above it
    assert fitted_softpatch.score(clean_data[:3]).max() < thr
    model = SoftPatch(**FAST).fit(clean_data)
    model.threshold = 123.0
    pred = model.predict(clean_data[:2])
    assert pred.threshold == 123.0 and not pred.is_anomalous.any()
    with pytest.raises(ValueError, match="threshold"):
        model.threshold = float("nan")


def test_deterministic_with_seed(clean_data):
    a = SoftPatchPlus(**FAST, seed=3).fit(clean_data[:8])
    b = SoftPatchPlus(**FAST, seed=3).fit(clean_data[:8])
    pa, pb = a.predict(clean_data[:4]), b.predict(clean_data[:4])
    np.testing.assert_array_equal(pa.scores, pb.scores)
    np.testing.assert_array_equal(pa.maps, pb.maps)
    assert a.threshold == b.threshold
    np.testing.assert_array_equal(a.training_report().scores, b.training_report().scores)


def test_patchcore_has_no_denoising(clean_data):
    model = PatchCore(**FAST).fit(clean_data)
    assert model.state.cls_bank.weights is None and model.state.seg_bank is None
    assert np.all(model.training_report().removed_fraction == 0)
    assert model.fit_info_["cls_removed"] == 0
    assert "alignment" not in model.config and "noise_threshold" not in model.config


def test_softpatch_plus_two_banks(clean_data):
    # the paper's settings: fixed fractions removed, weights relative to the kept median
    model = SoftPatchPlus(**FAST, alignment="position", removal_mad=None, weight_mode="median",
                          gaussian_shrinkage=0.1, rank_scope="position", seg_threshold=0.5).fit(clean_data)
    total = len(clean_data) * 8 * 8
    assert model.fit_info_["cls_removed"] == int(0.15 * total)
    assert model.fit_info_["seg_removed"] == int(0.5 * total)
    assert len(model.state.seg_bank) < len(model.state.cls_bank)
    # weights normalised so a kept (inlier) patch weighs about 1
    assert 0.8 < float(model.state.cls_bank.weights.median()) < 1.3


def test_softpatch_plus_gates_remove_only_robust_outliers(clean_data):
    # the robust-outlier gate at 3 MAD (0.1's default), "all" discriminators for the seg bank
    gated = dict(FAST, alignment="position", removal_mad=3.0, seg_threshold=0.5)
    model = SoftPatchPlus(**gated, seg_removal_gate="all").fit(clean_data)
    total = len(clean_data) * 8 * 8
    assert 0 < model.fit_info_["cls_removed"] <= int(0.15 * total)
    assert 0 <= model.fit_info_["seg_removed"] <= int(0.5 * total)
    any_gate = SoftPatchPlus(**gated, seg_removal_gate="any").fit(clean_data)
    # the "all" gate (default) removes a subset of what the "any" gate removes
    assert model.fit_info_["seg_removed"] <= any_gate.fit_info_["seg_removed"]
    assert any_gate.fit_info_["cls_removed"] <= any_gate.fit_info_["seg_removed"]
    with pytest.raises(ValueError, match="seg_removal_gate"):
        SoftPatchPlus(**FAST, seg_removal_gate="some")
    # soft weights never below 1, and exactly 1 for most (normal) patches
    w = model.state.cls_bank.weights
    assert float(w.min()) >= 1.0 and float((w == 1.0).float().mean()) > 0.5


def test_softpatch_plus_default_banks(clean_data):
    """Defaults: the cls bank drops only strong robust outliers (6 MAD) among the top 15 %;
    the seg bank drops the whole top 20 % -- a superset of what the cls bank drops."""
    model = SoftPatchPlus(**FAST, alignment="position").fit(clean_data)
    total = len(clean_data) * 8 * 8
    assert model.fit_info_["seg_removed"] == int(0.2 * total)
    assert model.fit_info_["cls_removed"] <= int(0.15 * total)
    three = SoftPatchPlus(**FAST, alignment="position", removal_mad=3.0).fit(clean_data)
    assert model.fit_info_["cls_removed"] <= three.fit_info_["cls_removed"]


@pytest.mark.parametrize("alignment", ["position", "window", "global"])
def test_alignments_run(clean_data, alignment):
    model = SoftPatch(**FAST, alignment=alignment).fit(clean_data)
    assert model.fit_info_["alignment"] == alignment
    assert np.isfinite(model.score(clean_data[:2])).all()


def test_config_is_json_able_and_complete():
    import json

    model = SoftPatch(**FAST, noise_threshold=0.1)
    cfg = json.loads(json.dumps(model.config))
    assert cfg["noise_threshold"] == 0.1 and cfg["alignment"] == "auto" and cfg["discriminator"] == "lof"
    assert SoftPatch(**cfg).config == model.config


def test_progress_and_logging(clean_data, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="softpatch_cuda"):
        SoftPatch(**FAST, progress=True).fit(clean_data[:8])
    assert any("alignment" in r.getMessage() for r in caplog.records)
    assert capsys.readouterr().out == ""  # progress bars go to stderr, nothing is printed


# ------------------------------------------------------------------ denoising works
@pytest.fixture(scope="module")
def contaminated():
    train, train_labels = object_set(20, 5, seed=10)
    test, test_labels = object_set(6, 6, seed=20)
    soft = SoftPatch(**FAST).fit(train)  # alignment "auto"
    core = PatchCore(**FAST).fit(train)
    plus = SoftPatchPlus(**FAST).fit(train)
    return train_labels, test, test_labels, soft, core, plus


def test_softpatch_finds_planted_defects_and_beats_patchcore(contaminated):
    train_labels, test, test_labels, soft, core, plus = contaminated
    rep = soft.training_report()
    assert auroc(train_labels, rep.scores) >= 0.95
    top = {name for name, _ in rep.top(5)}
    assert len(top & {f"image_{i}" for i in np.flatnonzero(train_labels)}) >= 4
    assert rep.flagged[train_labels == 1].sum() >= 3 and rep.flagged[train_labels == 0].sum() <= 2
    # planted defects removed from the bank: test defects of the same kind stand out
    # more (both may separate perfectly, so compare the margin, not only AUROC)
    soft_scores, core_scores, plus_scores = soft.score(test), core.score(test), plus.score(test)
    assert auroc(test_labels, soft_scores) >= auroc(test_labels, core_scores)
    assert auroc(test_labels, soft_scores) >= 0.95
    assert margin(test_labels, soft_scores) > 1.25 * margin(test_labels, core_scores)
    assert margin(test_labels, plus_scores) > 1.25 * margin(test_labels, core_scores)


def test_auto_alignment_on_aligned_objects(contaminated):
    soft = contaminated[3]
    assert soft.fit_info_["alignment"] == "position"
    assert soft.fit_info_["alignment_statistic"] < 0.7


# ------------------------------------------------------------------ errors
def test_predict_before_fit():
    model = SoftPatch(**FAST)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(np.zeros((1, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(RuntimeError, match="not fitted"):
        model.training_report()
    with pytest.raises(RuntimeError, match="not fitted"):
        model.save("x.safetensors")


def test_too_few_images_for_lof(clean_data):
    with pytest.raises(ValueError, match="at least 7 training images"):
        SoftPatch(**FAST).fit(clean_data[:4])
    with pytest.raises(ValueError, match="at least 4 training images"):
        SoftPatch(**FAST, lof_k=3).fit(clean_data[:3])
    # PatchCore fits anyway; the report has no scores then
    model = PatchCore(**FAST).fit(clean_data[:3])
    assert np.isnan(model.training_report().scores).all()
    assert np.isfinite(model.threshold)


def test_bad_inputs(tmp_path, fitted_softpatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images in folder"):
        SoftPatch(**FAST).fit(str(empty))
    with pytest.raises(FileNotFoundError, match="not found"):
        SoftPatch(**FAST).fit(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        fitted_softpatch.predict([str(tmp_path / "missing.png")])
    nan = torch.full((2, 3, SIZE, SIZE), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        fitted_softpatch.predict(nan)
    with pytest.raises(ValueError, match="must be"):
        fitted_softpatch.predict(np.zeros((2, 5, SIZE, SIZE), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        fitted_softpatch.predict(np.zeros((2, SIZE, SIZE, 3), np.int32))
    with pytest.raises(TypeError, match="unsupported"):
        fitted_softpatch.predict(42)
    with pytest.raises(ValueError, match="empty"):
        fitted_softpatch.predict([])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_threshold=1.0), "noise_threshold"),
        (dict(noise_threshold=-0.1), "noise_threshold"),
        (dict(discriminator="knn"), "discriminator"),
        (dict(alignment="diagonal"), "alignment"),
        (dict(lof_k=0), "lof_k"),
        (dict(coreset_ratio=0), "coreset_ratio"),
        (dict(batch_size=0), "batch_size"),
        (dict(resize=32, crop=64), "crop"),
        (dict(distance="cosine"), "distance"),
        (dict(window=0), "window"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftPatch(**dict(FAST, **kwargs))


def test_bad_plus_config():
    with pytest.raises(ValueError, match="discriminators"):
        SoftPatchPlus(**FAST, discriminators=())
    with pytest.raises(ValueError, match="discriminators entry"):
        SoftPatchPlus(**FAST, discriminators=("lof", "isolation_forest"))
    with pytest.raises(ValueError, match="fusion"):
        SoftPatchPlus(**FAST, fusion="median")
    with pytest.raises(ValueError, match="seg_threshold"):
        SoftPatchPlus(**FAST, seg_threshold=1.5)
    with pytest.raises(TypeError):
        PatchCore(**FAST, alignment="position")  # PatchCore takes no discriminator settings


def test_thread_budget_follows_the_setting(clean_data, monkeypatch):
    import softpatch_cuda.models.detector as det
    from softpatch_cuda.runtime import choose_threads

    assert choose_threads(3) == 3
    monkeypatch.setenv("SOFTPATCH_THREADS", "1")
    assert choose_threads("auto") == 1
    seen = []
    real = det.thread_budget

    class Spy(real):
        def __enter__(self):
            seen.append(super().__enter__())
            return seen[-1]

    monkeypatch.setattr(det, "thread_budget", Spy)
    before = torch.get_num_threads()
    model = PatchCore(**FAST, threads=1).fit(clean_data[:4])
    model.score(clean_data[:2])
    assert seen and set(seen) == {1} and torch.get_num_threads() == before  # restored after each phase
    with pytest.raises(ValueError, match="threads"):
        PatchCore(**FAST, threads=0)
    model.threads = "auto"
    assert model.config["threads"] == "auto"


def test_auto_threads_sample_the_load_at_most_once_a_ttl(monkeypatch):
    """Sampling the load costs ~30 ms: a stream of small predict calls must not pay it each time."""
    from softpatch_cuda import runtime

    calls = []
    monkeypatch.delenv("SOFTPATCH_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "other_runnable", lambda: calls.append(1) or 0.0)
    monkeypatch.setattr(runtime, "_auto_threads", [])
    first = runtime.choose_threads("auto")
    assert runtime.choose_threads("auto") == first and len(calls) == 1
    monkeypatch.setattr(runtime, "AUTO_THREADS_TTL_S", 0.0)
    runtime.choose_threads("auto")
    assert len(calls) == 2


def test_the_thread_budget_caps_numpys_blas_too():
    """numpy's BLAS threads spin while they wait: on a shared machine a 2-thread BLAS call
    took hundreds of ms for what one thread does in one (the predictor's maps)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from softpatch_cuda.runtime import thread_budget

    np.ones((64, 64)) @ np.ones((64, 64))  # numpy's BLAS loaded
    blas = lambda: [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]  # noqa: E731
    before = blas()
    with thread_budget(1):
        assert blas() and set(blas()) == {1}
    assert blas() == before
