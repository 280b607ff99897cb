"""report.py: colormap, overlays, PNG/CSV/JSON writers, training-report tables, demo HTML."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softpatch_cuda import report
from softpatch_cuda.results import TrainingReport
from softpatch_cuda.demo import html as demo_html


# ------------------------------------------------------------------ colormap
def test_turbo_shape_dtype_and_endpoints():
    x = np.linspace(0, 1, 11).reshape(11, 1)
    rgb = report.turbo(x)
    assert rgb.shape == (11, 1, 3) and rgb.dtype == np.uint8
    low, mid, high = rgb[0, 0].astype(int), rgb[5, 0].astype(int), rgb[10, 0].astype(int)
    # Turbo: dark blue-ish at 0, green at 0.5, dark red at 1.
    assert low.max() < 60
    assert mid[1] > 200 and mid[1] > mid[2]
    assert high[0] > 120 and high[0] > 5 * max(high[1], high[2], 1)
    # Hue moves from blue (low end) to red (high end).
    assert rgb[1, 0, 2] > rgb[1, 0, 0] and rgb[8, 0, 0] > rgb[8, 0, 2]


def test_turbo_clips_and_handles_nan():
    rgb = report.turbo(np.array([-5.0, 0.0, 1.0, 7.0, np.nan]))
    np.testing.assert_array_equal(rgb[0], rgb[1])
    np.testing.assert_array_equal(rgb[3], rgb[2])
    np.testing.assert_array_equal(rgb[4], rgb[1])


def test_turbo_matches_reference_polynomial():
    # The published polynomial, written out term by term (independent of the vectorised form).
    def ref(x):
        r = 0.13572138 + x * (4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943))))
        g = 0.09140261 + x * (2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604))))
        b = 0.10667330 + x * (12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973))))
        return np.rint(np.clip([r, g, b], 0, 1) * 255).astype(np.uint8)

    for x in (0.0, 0.13, 0.5, 0.77, 1.0):
        np.testing.assert_array_equal(report.turbo(np.array(x)), ref(x))


def test_normalize_map_and_colour_range():
    m = np.array([[0.0, 1.0], [2.0, 4.0]])
    np.testing.assert_allclose(report.normalize_map(m, 0.0, 4.0), m / 4.0)
    np.testing.assert_allclose(report.normalize_map(m, 1.0, 1.0), [[0, 0], [1, 1]])  # degenerate span: no NaN
    with pytest.raises(ValueError, match="finite"):
        report.normalize_map(m, 0.0, np.inf)
    assert report.colour_range([m, m + 1]) == (0.0, 5.0)
    # threshold at the middle of the scale
    lo, hi = report.colour_range([m + 1.0], threshold=2.0)
    assert lo == 1.0 and hi == 3.0 and (lo + hi) / 2 == 2.0
    with pytest.raises(ValueError, match="no map values"):
        report.colour_range([np.zeros((0, 0))])


# ------------------------------------------------------------------ overlays
def test_overlay_blend_extremes_and_mask_outline():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    amap = rng.random((20, 30)).astype(np.float32)
    np.testing.assert_array_equal(report.overlay(image, amap, 0.0, 1.0, alpha=0.0), image)
    np.testing.assert_array_equal(report.overlay(image, amap, 0.0, 1.0, alpha=1.0), report.turbo(amap))
    half = report.overlay(Image.fromarray(image), amap, 0.0, 1.0, alpha=0.5)
    expected = np.rint(0.5 * image + 0.5 * report.turbo(amap).astype(np.float32)).astype(np.uint8)
    assert np.abs(half.astype(int) - expected.astype(int)).max() <= 1

    mask = np.zeros((20, 30), dtype=bool)
    mask[5:15, 10:20] = True
    out = report.overlay(image, amap, 0.0, 1.0, alpha=0.0, mask=mask)
    outline = report.mask_outline(mask)
    assert outline.sum() == 10 * 10 - 8 * 8  # one-pixel ring
    assert (out[outline] == 255).all()
    np.testing.assert_array_equal(out[~outline], image[~outline])


def test_overlay_validates_shapes():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="differs"):
        report.overlay(image, np.zeros((4, 4)), 0, 1)
    with pytest.raises(ValueError, match="uint8"):
        report.overlay(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8)), 0, 1)
    with pytest.raises(ValueError, match="alpha"):
        report.overlay(image, np.zeros((8, 8)), 0, 1, alpha=2)
    with pytest.raises(ValueError, match="mask shape"):
        report.overlay(image, np.zeros((8, 8)), 0, 1, mask=np.ones((4, 4), bool))


def test_save_png_roundtrip_and_shrink(tmp_path):
    arr = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    p = report.save_png(tmp_path / "a" / "b.png", arr)
    np.testing.assert_array_equal(np.asarray(Image.open(p)), arr)
    p2 = report.save_png(tmp_path / "small.png", arr, max_side=30)
    assert Image.open(p2).size == (30, 20)
    assert report.colourbar(5, 64).shape == (5, 64, 3)


# ------------------------------------------------------------------ tables / files
def test_write_json_handles_numpy_and_nan(tmp_path):
    p = report.write_json(tmp_path / "x.json", {"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"),
                                                "d": [np.int64(2), np.inf], "e": tmp_path})
    data = json.loads(p.read_text())
    assert data == {"a": 0.5, "b": [0, 1, 2], "c": None, "d": [2, None], "e": str(tmp_path)}


def test_write_csv(tmp_path):
    rows = [{"name": "a.png", "score": np.float32(1.25), "ok": True, "x": None},
            {"name": "b.png", "score": 2.0, "ok": False, "x": 3}]
    p = report.write_csv(tmp_path / "r.csv", rows)
    got = list(csv.DictReader(p.open()))
    assert got == [{"name": "a.png", "score": "1.25", "ok": "true", "x": ""},
                   {"name": "b.png", "score": "2", "ok": "false", "x": "3"}]


def test_write_csv_escapes_text_a_spreadsheet_would_run(tmp_path):
    """CSV (formula) injection: text starting with = + - @ (or tab / CR) gets a leading quote."""
    rows = [{"name": n, "score": -1.5} for n in ("=1+1", "+x", "-x", "@x", "\tx", "a=b", "x-")]
    got = list(csv.DictReader(report.write_csv(tmp_path / "r.csv", rows).open()))
    assert [r["name"] for r in got] == ["'=1+1", "'+x", "'-x", "'@x", "'\tx", "a=b", "x-"]
    assert {r["score"] for r in got} == {"-1.5"}  # numbers stay numbers


def test_training_report_rows_sorted_and_formatted():
    rep = TrainingReport(["a.png", "b.png", "c.png"], ["/d/a.png", "/d/b.png", "/d/c.png"], np.array([1.0, 3.0, 2.0]),
                         np.array([False, True, True]), 1.5)
    rows = rep.to_rows()
    assert [r["name"] for r in rows] == ["b.png", "c.png", "a.png"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0] == {"rank": 1, "name": "b.png", "source": "/d/b.png", "contamination_score": 3.0, "flagged": True,
                       "removed_fraction": 0.0}
    text = report.format_training_report(rep, top=2)
    assert "2 of 3 images flagged" in text and "threshold 1.5" in text
    lines = text.splitlines()
    assert "b.png" in lines[3] and "yes" in lines[3] and "c.png" in lines[4]
    assert "a.png" not in text  # only the top 2
    # repeated file names: paths relative to the shared folder
    rep3 = TrainingReport(["001.png", "001.png"], ["/d/nut/train/good/001.png", "/d/nut/test/dent/001.png"],
                          np.array([1.0, 2.0]), np.array([False, True]), 1.5)
    assert [r["name"] for r in rep3.to_rows()] == ["test/dent/001.png", "train/good/001.png"]
    # no sources: still works
    rep2 = TrainingReport(["x"], [], np.array([0.5]), np.array([False]), 1.5)
    assert rep2.to_rows()[0]["source"] is None


# ------------------------------------------------------------------ demo HTML
def _fake_results(tmp_path: Path) -> dict:
    pic = report.save_png(tmp_path / "images" / "cat" / "case.png", np.zeros((4, 4, 3), np.uint8))
    pic2 = report.save_png(tmp_path / "images" / "cat" / "case_1.png", np.zeros((4, 4, 3), np.uint8))
    bar = report.save_png(tmp_path / "images" / "colourbar.png", report.colourbar())
    metrics = {"SoftPatch+": {"image_auroc": 0.95, "pixel_auroc": 0.9}, "PatchCore": {"image_auroc": 0.7, "pixel_auroc": None}}
    return {
        "title": "demo <test>",
        "settings": {"noise": "0.2"},
        "models": ["SoftPatch+", "PatchCore"],
        "explanation": ["Why & how."],
        "colourbar": str(bar),
        "categories": [{
            "category": "carpet",
            "metrics": metrics,
            "flag_summary": {"n_train": 10, "planted": 2, "flagged": 2, "flagged_planted": 1, "contamination_auroc": 0.875},
            "flagged": [{"name": "x.png", "score": 2.5, "planted": True, "thumbnail": str(pic)},
                        {"name": "y.png", "score": 2.0, "planted": False, "thumbnail": None}],
            "decisions": {"SoftPatch+": {"threshold": 2.25, "defects": 8, "caught": 7, "recurring": 2,
                                         "recurring_caught": 2, "good": 10, "false_alarms": 1},
                          "PatchCore": {"threshold": 1.75, "defects": 8, "caught": 3, "recurring": 2,
                                        "recurring_caught": 0, "good": 10, "false_alarms": 0}},
            "cases": [{"kind": "recurring defect", "name": "hole/000.png", "label": 1, "recurring": True,
                       "models": {"SoftPatch+": {"score": 3.0, "threshold": 2.25, "predicted_anomalous": True,
                                                 "overlay": str(pic)},
                                  "PatchCore": {"score": 1.5, "threshold": 1.75, "predicted_anomalous": False,
                                                "overlay": str(pic2)}}}],
        }],
        "decisions_total": {"SoftPatch+": {"defects": 8, "caught": 7, "recurring": 2, "recurring_caught": 2,
                                           "good": 10, "false_alarms": 1},
                            "PatchCore": {"defects": 8, "caught": 3, "recurring": 2, "recurring_caught": 0,
                                          "good": 10, "false_alarms": 0}},
        "mean": {"SoftPatch+": {"image_auroc": 0.95, "pixel_auroc": 0.9}, "PatchCore": {"image_auroc": 0.7, "pixel_auroc": None}},
    }


def test_demo_report_html_is_self_contained_with_relative_links(tmp_path):
    results = _fake_results(tmp_path)
    path = demo_html.write_demo_report(results, tmp_path)
    text = path.read_text()
    assert path == tmp_path / "report.html"
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "demo &lt;test&gt;" in text and "Why &amp; how." in text  # escaped
    assert "src='images/cat/case.png'" in text and "src='images/colourbar.png'" in text
    assert str(tmp_path) not in text  # relative links only
    for value in ("95.0", "90.0", "70.0", "n/a", "87.5"):
        assert value in text
    assert "planted defect" in text and "normal image" in text
    assert "<tr class='mean'>" in text
    assert "http://" not in text and "https://" not in text  # nothing fetched from the network


def test_demo_report_shows_each_models_threshold_catches_and_heatmaps(tmp_path):
    """Issue 17, item 12: the decision threshold and how many defects each model catches at
    it, and a heatmap of every shown test image under every model."""
    text = demo_html.demo_report_html(_fake_results(tmp_path), tmp_path)
    assert "Decisions at the threshold" in text
    assert "<td>2.25</td><td>7 of 8</td><td>2 of 2</td><td>1 of 10</td>" in text  # SoftPatch+
    assert "<td>1.75</td><td>3 of 8</td><td>0 of 2</td><td>0 of 10</td>" in text  # PatchCore
    assert "<td>per category</td><td>7 of 8</td>" in text  # the totals row
    heatmaps = text[text.index("Anomaly maps"):]
    assert "src='images/cat/case.png' alt='SoftPatch+: hole/000.png'" in heatmaps
    assert "src='images/cat/case_1.png' alt='PatchCore: hole/000.png'" in heatmaps
    assert "score 1.5 (threshold 1.75)" in heatmaps and "also planted in training" in heatmaps
