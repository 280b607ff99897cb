"""evaluation.py: results table with mean row, JSON/markdown writing, evaluate_split with a
fake model (scores and maps known in advance) against plain metric references."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softpatch_cuda import evaluation
from softpatch_cuda.data.images import ImageTransform

ROWS = [
    {"category": "a", "n_train": 10, "n_test": 5, "image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": None,
     "image_f1_max": 0.5, "fit_s": 1.0, "predict_s": 2.0},
    {"category": "b", "n_train": 20, "n_test": 7, "image_auroc": 1.0, "pixel_auroc": None, "aupro": 0.6,
     "image_f1_max": float("nan"), "fit_s": 3.0, "predict_s": 4.0},
]


def test_mean_row_skips_missing_values():
    mean = evaluation.mean_row(ROWS)
    assert mean["category"] == "mean"
    assert mean["image_auroc"] == pytest.approx(0.95)
    assert mean["pixel_auroc"] == pytest.approx(0.8)
    assert mean["aupro"] == pytest.approx(0.6)
    assert mean["image_f1_max"] == pytest.approx(0.5)
    assert mean["fit_s"] == pytest.approx(2.0)
    assert mean["n_train"] == 30 and mean["n_test"] == 12
    assert evaluation.mean_row([{"category": "x", "image_auroc": None}])["image_auroc"] is None


def test_results_table_markdown_has_rows_and_mean():
    md = evaluation.results_table_markdown(ROWS)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| category | image AUROC | pixel AUROC | AUPRO")
    assert lines[1].startswith("|---|")
    assert lines[2] == "| a | 90.0 | 80.0 | n/a | 50.0 | 1.0 | 2.0 |"
    assert lines[3] == "| b | 100.0 | n/a | 60.0 | n/a | 3.0 | 4.0 |"
    assert lines[4] == "| **mean** | **95.0** | **80.0** | **60.0** | **50.0** | **2.0** | **3.0** |"
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    with pytest.raises(ValueError, match="no rows"):
        evaluation.results_table_markdown([])


def test_write_results(tmp_path):
    json_path, md_path = evaluation.write_results(ROWS, tmp_path / "out", meta={"dataset": "x"}, title="T")
    data = json.loads(json_path.read_text())
    assert data["meta"] == {"dataset": "x"}
    assert [r["category"] for r in data["rows"]] == ["a", "b"]
    assert data["rows"][1]["image_f1_max"] is None  # NaN -> null
    assert data["mean"]["image_auroc"] == pytest.approx(0.95)
    assert md_path.read_text().startswith("# T\n\n| category |")


# ------------------------------------------------------------------ evaluate_split with a fake model
@dataclass(frozen=True)
class FakeSample:
    path: str
    label: int
    defect_type: str
    mask_path: str | None


@dataclass
class FakeSplit:
    dataset: str
    category: str
    train: list
    test: list


@dataclass
class FakePrediction:
    scores: np.ndarray
    maps: np.ndarray


class FakeModel:
    """Scores each test image by the fraction of bright pixels; the map is the image's
    brightness in the model frame. Records what it was given."""

    def __init__(self, size: int = 16):
        self.config = {"resize": size, "crop": size}
        self.transform = ImageTransform(resize=size, crop=size)
        self.fitted_on: list[str] | None = None
        self.progress = None

    def fit(self, paths):
        self.fitted_on = list(paths)
        return self

    def predict(self, paths):
        maps = []
        for p in paths:
            g = np.asarray(self.transform.geometry(Image.open(p)), dtype=np.float32).mean(axis=-1) / 255.0
            maps.append(g)
        maps = np.stack(maps)
        return FakePrediction(scores=maps.reshape(len(maps), -1).mean(axis=1), maps=maps)


def _write(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return str(path)


@pytest.fixture
def fake_split(tmp_path):
    rng = np.random.default_rng(0)
    train = [FakeSample(_write(tmp_path / "train" / f"{i}.png", rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)),
                        0, "good", None) for i in range(4)]
    test = []
    for i in range(3):
        test.append(FakeSample(_write(tmp_path / "test" / f"good{i}.png", rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)),
                               0, "good", None))
    for i in range(3):
        img = rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)
        mask = np.zeros((24, 24), dtype=np.uint8)
        mask[4 + 2 * i: 12 + 2 * i, 6:14] = 255
        img[mask > 0] = 250
        p = _write(tmp_path / "test" / f"bad{i}.png", img)
        m = _write(tmp_path / "gt" / f"bad{i}_mask.png", mask)
        test.append(FakeSample(p, 1, "spot", m))
    return FakeSplit("fake", "cat", train, test)


def test_evaluate_split_with_fake_model(fake_split):
    pytest.importorskip("softpatch_cuda.data.datasets")
    pytest.importorskip("softpatch_cuda.metrics")
    from sklearn.metrics import roc_auc_score

    model = FakeModel(size=16)
    row, prediction, masks = evaluation.evaluate_split_detailed(model, fake_split, progress=True)
    assert model.fitted_on == [s.path for s in fake_split.train]
    assert model.progress is True
    assert set(row) >= {"category", "n_train", "n_test", "image_auroc", "pixel_auroc", "aupro", "image_f1_max",
                        "fit_s", "predict_s"}
    assert (row["category"], row["n_train"], row["n_test"], row["n_test_anomalous"]) == ("cat", 4, 6, 3)
    labels = np.array([s.label for s in fake_split.test])
    assert row["image_auroc"] == pytest.approx(roc_auc_score(labels, prediction.scores)) and row["image_auroc"] == 1.0
    # masks went through the model's resize (24 -> 16) like the images
    assert masks.shape == (6, 16, 16) and not masks[:3].any() and masks[3:].any()
    expected_mask = ImageTransform(16, 16).mask(np.asarray(Image.open(fake_split.test[3].mask_path)) > 0)
    np.testing.assert_array_equal(masks[3], expected_mask)
    assert row["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), prediction.maps.ravel()))
    # defect pixels are the brightest ones: perfect region overlap at any FPR
    assert row["aupro"] == pytest.approx(1.0) and row["image_f1_max"] == pytest.approx(1.0)
    assert row["fit_s"] >= 0 and row["predict_s"] >= 0
    assert evaluation.evaluate_split(FakeModel(16), fake_split).keys() == row.keys()


def test_evaluate_split_reports_contamination_detection(fake_split):
    from softpatch_cuda import TrainingReport

    planted = FakeSample(fake_split.test[3].path, 1, "spot", fake_split.test[3].mask_path)
    noisy = FakeSplit("fake", "cat", fake_split.train + [planted], fake_split.test)

    class ReportingModel(FakeModel):
        def training_report(self):
            scores = np.array([1.0, 1.1, 0.9, 1.0, 3.0], np.float32)  # the planted image scores highest
            flagged = np.array([False, True, False, False, True])
            return TrainingReport([f"i{k}" for k in range(5)], [None] * 5, scores, flagged, 1.05)

    row = evaluation.evaluate_split(ReportingModel(size=16), noisy)
    assert row["report_auroc"] == 1.0 and row["flag_precision"] == 0.5 and row["flag_recall"] == 1.0
    clean = evaluation.evaluate_split(ReportingModel(size=16), fake_split)
    assert clean["report_auroc"] is None and clean["flag_recall"] is None
    table = evaluation.results_table_markdown([row])
    assert "report AUROC" in table and "100.0 | 50.0 | 100.0" in table


def test_evaluate_split_without_masks_gives_no_pixel_metrics(fake_split):
    pytest.importorskip("softpatch_cuda.metrics")
    pytest.importorskip("softpatch_cuda.data.datasets")
    no_masks = FakeSplit("fake", "cat", fake_split.train,
                         [FakeSample(s.path, s.label, s.defect_type, None) for s in fake_split.test])
    row = evaluation.evaluate_split(FakeModel(16), no_masks)
    assert row["pixel_auroc"] is None and row["aupro"] is None
    assert row["image_auroc"] == 1.0


def test_evaluate_split_one_class_test_set(fake_split):
    pytest.importorskip("softpatch_cuda.metrics")
    pytest.importorskip("softpatch_cuda.data.datasets")
    only_good = FakeSplit("fake", "cat", fake_split.train, fake_split.test[:3])
    row = evaluation.evaluate_split(FakeModel(16), only_good)
    assert row["image_auroc"] is None and row["image_f1_max"] is None and row["pixel_auroc"] is None


def test_evaluate_split_rejects_empty_sets(fake_split):
    with pytest.raises(ValueError, match="empty training set"):
        evaluation.evaluate_split(FakeModel(), FakeSplit("f", "c", [], fake_split.test))
    with pytest.raises(ValueError, match="empty test set"):
        evaluation.evaluate_split(FakeModel(), FakeSplit("f", "c", fake_split.train, []))


def test_model_transform_from_config():
    class M:
        config = {"resize": 40, "crop": 32}

    t = evaluation.model_transform(M())
    assert (t.resize, t.crop) == (40, 32)
    with pytest.raises(TypeError, match="input transform"):
        evaluation.model_transform(object())


# ------------------------------------------------------------------ benchmarks/bench_accuracy.py smoke run
@pytest.mark.slow  # runs the benchmark script in a subprocess
def test_bench_accuracy_smoke(tmp_path):
    """Tiny run (random resnet18, 32 px, demo data): both protocols, two seeds, complete
    JSON (metrics, what the denoising did, contamination detection) and markdown."""
    import subprocess
    import sys

    pytest.importorskip("softpatch_cuda.demo")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_accuracy.py"
    out = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, str(script), "--demo", "--categories", "nut", "--noise", "0,0.25", "--seeds", "0,1",
         "--models", "patchcore,softpatch-plus", "--backbone", "resnet18", "--no-pretrained", "--image-size", "32",
         "--n-train", "8", "--n-test-good", "2", "--n-test-defect", "4", "--no-aupro", "--name", "smoke",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "accuracy_smoke.json").read_text())
    rows = data["rows"]
    # noise 0: one run per model; noise 0.25: 2 seeds x 2 protocols per model
    assert len(rows) == 2 + 2 * 2 * 2
    clean = [r for r in rows if r["noise"] == 0.0]
    assert {r["protocol"] for r in clean} == {"clean"} and all(r["n_planted"] == 0 and r["n_test"] == 6 for r in clean)
    noisy = [r for r in rows if r["noise"] == 0.25]
    assert {(r["seed"], r["protocol"]) for r in noisy} == {(s, p) for s in (0, 1) for p in ("no-overlap", "overlap")}
    assert all(r["n_planted"] == 2 and r["n_train_clean"] == 8 for r in noisy)
    # no-overlap: the planted images left the test set; overlap: they stayed
    assert {r["n_test"] for r in noisy if r["protocol"] == "no-overlap"} == {4}
    assert {r["n_test"] for r in noisy if r["protocol"] == "overlap"} == {6}
    assert all(r["image_auroc"] is not None and r["pixel_auroc"] is not None for r in rows)
    plus = [r for r in noisy if r["model"] == "softpatch-plus"]
    assert all("cls_removed_share" in r["denoising"] and "seg_removed_share" in r["denoising"] for r in plus)
    assert all(set(r["contamination_detection"]) >= {"auroc", "precision", "recall", "flagged"} for r in plus)
    assert "cpu_model" in data["machine"]
    md = (out / "accuracy_smoke.md").read_text()
    for text in ("## Mean image AUROC, no-overlap", "## Mean pixel AUROC, overlap", "What the denoising did",
                 "| softpatch-plus |", "noise 0.25", "load average"):
        assert text in md


# ------------------------------------------------------------------ benchmarks/summarize_accuracy.py
def _summary_rows(model, cat, clean, overlap, no_overlap, report=0.95, fit_s=10.0, pixel=0.9, seeds=(0,)):
    rows = [{"category": cat, "model": model, "noise": 0.0, "seed": 0, "protocol": "clean", "n_planted": 0,
             "image_auroc": clean, "pixel_auroc": pixel, "fit_s": fit_s, "predict_s": 1.0,
             "denoising": {}, "contamination_detection": {}}]
    for n in (0.1, 0.2, 0.4):
        for seed in seeds:
            for protocol, v in (("no-overlap", no_overlap), ("overlap", overlap)):
                rows.append({"category": cat, "model": model, "noise": n, "seed": seed, "protocol": protocol,
                             "n_planted": 3, "image_auroc": v, "pixel_auroc": pixel, "fit_s": fit_s,
                             "predict_s": 1.0, "denoising": {"cls_removed_share": 0.01},
                             "contamination_detection": {"auroc": report}})
    return rows


def test_summarize_accuracy_checks_every_set_against_the_baseline(tmp_path):
    """The pooled table's targets: met on the mean is not enough, every set is judged."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import summarize_accuracy as S

    rows = (_summary_rows("patchcore", "a", 0.90, 0.60, 0.89) + _summary_rows("plus", "a", 0.895, 0.88, 0.885)
            + _summary_rows("patchcore", "b", 0.80, 0.55, 0.79)
            # set b: clean 1.5 points below the baseline, overlap within 5 of its clean score, report 0.7
            + _summary_rows("plus", "b", 0.785, 0.76, 0.78, report=0.7, fit_s=25.0)
            + _summary_rows("before", "a", 0.90, 0.80, 0.89, pixel=0.95) + _summary_rows("before", "b", 0.80, 0.70, 0.79))
    res = {name: (ok, figs) for name, ok, figs in S.targets(rows, ["a", "b"], "plus", "patchcore", "before")}
    by = lambda prefix: next(v for k, v in res.items() if k.startswith(prefix))  # noqa: E731
    assert by("overlap 10-40")[0] is True  # mean 0.82 vs 0.575
    assert by("every set, overlap 20")[0] is True  # a: 0.88 >= 0.85; b: 0.76 >= 0.75
    ok, figs = by("clean")
    assert ok is False and "b 78.5 vs 80.0 MISSED" in figs and "a 89.5 vs 90.0 ok" in figs
    assert by("no-overlap 10-20")[0] is True
    ok, figs = by("training report")
    assert ok is False and "b 0.1 70.0 MISSED" in figs
    ok, figs = by("overlap pixel")
    assert ok is False  # 0.9 against 0.925 before
    ok, figs = by("fit time")
    assert ok is True and "1.75x" in figs  # (10 + 25) / 2 against 10
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"meta": {"created": "x", "elapsed_s": 1.0, "load": [0, 0]}, "machine": {},
                                "rows": rows}))
    S.main([str(path), "--model", "plus", "--before", "before", "--out", str(tmp_path / "r.md")])
    md = (tmp_path / "r.md").read_text()
    assert "| clean: within 1 image point of the baseline on every set | **no** |" in md
    assert "| **mean** | plus | 84.0 |" in md
