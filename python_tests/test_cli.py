"""The `softpatch` command line: help, errors, and fit / predict / evaluate / demo end to end
on tiny generated data with a random (pretrained=False) resnet18 at 32 px.

Subprocess runs use `python -m softpatch_cuda` (what the console script calls); cheaper
checks call cli.main() in-process.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builders import tiny_mvtec
from softpatch_cuda import cli
from softpatch_cuda.demo import app as demo_app

TINY_MODEL = ["--backbone", "resnet18", "--layers", "layer2,layer3", "--no-pretrained",
              "--resize", "32", "--crop", "32", "--device", "cpu", "--seed", "0"]


def run_cli(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "softpatch_cuda", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_mvtec(tmp_path_factory.mktemp("mvtec"))




# ------------------------------------------------------------------ help / version
@pytest.mark.slow  # a fresh interpreter
def test_help_via_module(tmp_path):
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for word in ("fit", "predict", "evaluate", "demo", "examples:", "--quiet", "--version"):
        assert word in proc.stdout


@pytest.mark.parametrize("command", ["fit", "predict", "evaluate", "demo"])
def test_subcommand_help_has_examples(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: softpatch {command}" in out and "examples:" in out and f"softpatch {command}" in out.split("examples:")[1]


def test_version(capsys):
    from softpatch_cuda import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"softpatch {__version__}"


# ------------------------------------------------------------------ user errors
def _one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("softpatch: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_missing_data_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["fit", str(tmp_path / "nothere"), "--out", str(tmp_path / "m.softpatch")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "nothere" in line and "not found" in line


@pytest.mark.parametrize("argv, fragment", [
    (["predict", "{tmp}/missing.softpatch", "{tmp}", "--out", "{tmp}/o"], "model file not found"),
    (["evaluate", "--dataset", "mvtec", "--root", "{tmp}/nope", "--out", "{tmp}/o"], "--root not found"),
    (["evaluate", "--dataset", "mvtec", "--root", "{tmp}", "--out", "{tmp}/o"], "no MVTec AD categories"),
    (["fit", "{tmp}", "--out", "{tmp}/m", "--model", "bogus"], "invalid choice: 'bogus'"),
    (["fit", "{tmp}"], "required: -o/--out"),
    (["fit", "{tmp}", "--out", "{tmp}/m", "--noise-threshold", "1.5"], "--noise-threshold"),
    (["evaluate", "--dataset", "mvtec", "--root", "{tmp}", "--out", "{tmp}/o", "--noise", "abc"], "--noise"),
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["fit", "{tmp}/img.txt", "--out", "{tmp}/m"], "is not an image file"),
    (["fit", "{tmp}/a.png", "--out", "{tmp}/m", "--device", "tpu"], "--device"),
])
def test_user_errors_exit_2(argv, fragment, tmp_path, capsys):
    (tmp_path / "img.txt").write_text("not an image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert fragment in line, line


def test_option_conflicts_are_usage_errors(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert cli.main(["fit", str(img), "--out", str(tmp_path / "m"), "--model", "patchcore", "--noise-threshold", "0.1"]) == 2
    assert "does not apply to --model patchcore" in capsys.readouterr().err
    assert cli.main(["fit", str(img), "--out", str(tmp_path / "m"), "--seg-threshold", "0.3"]) == 2
    assert "softpatch-plus only" in capsys.readouterr().err
    assert cli.main(["fit", str(img), "--out", str(tmp_path / "m"), "--weights", str(tmp_path / "w.pth")]) == 2
    assert "--weights file not found" in capsys.readouterr().err


@pytest.mark.skipif(__import__("softpatch_cuda").cuda_available(), reason="a usable GPU is present")
def test_cuda_device_without_gpu_is_a_usage_error(tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    assert cli.main(["fit", str(tmp_path / "a.png"), "--out", str(tmp_path / "m"), "--device", "cuda"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--device cuda" in line and "unavailable" in line


def test_verbose_error_shows_traceback(tmp_path, capsys):
    assert cli.main(["-v", "predict", str(tmp_path / "missing"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("softpatch: error: model file not found")


def test_global_options_after_the_command_are_kept():
    parser = cli.build_parser()
    args = parser.parse_args(["-q", "fit", "x", "--out", "m"])
    assert args.quiet is True and args.verbose is False
    args = parser.parse_args(["fit", "x", "--out", "m", "-v"])
    assert args.verbose is True and args.quiet is False


def test_model_kwargs_mapping():
    parser = cli.build_parser()
    argv = ["fit", "x", "--out", "m", "--model", "softpatch-plus", "--noise-threshold", "0.2", "--seg-threshold", "0.4",
            "--layers", "a,b", "--layers", "c", "--resize", "none", "--crop", "48", "--coreset-ratio", "0.05", "-q"]
    args = parser.parse_args(argv)
    kw = cli.model_kwargs(args)
    assert kw == {"device": "auto", "progress": False, "coreset_ratio": 0.05, "layers": ("a", "b", "c"),
                  "resize": None, "crop": 48, "cls_threshold": 0.2, "seg_threshold": 0.4}
    argv = ["fit", "x", "--out", "m", "--noise-threshold", "0.1", "--no-pretrained", "--alignment", "global"]
    args = parser.parse_args(argv)
    kw = cli.model_kwargs(args)
    assert kw["noise_threshold"] == 0.1 and kw["pretrained"] is False and kw["alignment"] == "global"
    assert "resize" not in kw and "crop" not in kw and kw["progress"] is True


def _kwargs(argv: list[str]) -> dict:
    return cli.model_kwargs(cli.build_parser().parse_args(["fit", "x", "--out", "m", *argv]))


def test_denoising_options_and_preset_mapping():
    kw = _kwargs(["--model", "softpatch-plus", "--preset", "paper", "--removal", "fixed", "--weight-mode", "median",
                  "--seg-removal-gate", "any", "--discriminators", "lof,nearest", "--lof-k", "5",
                  "--distance", "squared_l2", "--image-score", "reweighted", "--no-soft-weights"])
    assert kw["preset"] == "paper" and kw["removal_mad"] is None and kw["weight_mode"] == "median"
    assert kw["seg_removal_gate"] == "any" and kw["discriminators"] == ("lof", "nearest") and kw["lof_k"] == 5
    assert kw["distance"] == "squared_l2" and kw["image_score"] == "reweighted" and kw["soft_weights"] is False
    kw = _kwargs(["--discriminators", "gaussian", "--removal-mad", "4"])
    assert kw["discriminator"] == "gaussian" and kw["removal_mad"] == 4.0
    model = cli.build_model(cli.build_parser().parse_args(
        ["fit", "x", "--out", "m", "--model", "softpatch-plus", "--preset", "paper", "--backbone", "resnet18",
         "--no-pretrained", "--device", "cpu"]))
    assert model.config["seg_threshold"] == 0.5 and model.config["distance"] == "squared_l2"
    assert model.config["backbone"] == "resnet18" and model.config["removal_mad"] is None


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "patchcore", "--removal", "fixed"], "--removal does not apply to --model patchcore"),
    (["--model", "softpatch", "--seg-removal-gate", "any"], "--seg-removal-gate applies to --model softpatch-plus"),
    (["--discriminators", "lof,gaussian"], "takes one discriminator"),
    (["--discriminators", "lof,forest", "--model", "softpatch-plus"], "--discriminators entry must be one of"),
    (["--resize", "64", "--crop", "128"], "crop (128) cannot exceed resize (64)"),
    (["--removal", "fixed", "--removal-mad", "3"], "exclude each other"),
])
def test_denoising_option_conflicts(argv, fragment, capsys):
    code = cli.main(["fit", "nonexistent_dir", "--out", "m.softpatch", *argv])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("\n") == 1


def test_bad_option_values_name_the_flag(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "d" / "a.png")
    for argv, message in ((["--removal-mad", "-1"], "--removal-mad must be a number >= 0 or None, got -1.0"),
                          (["--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
                          (["--noise-threshold", "1.5"], "--noise-threshold must be a number in [0, 1), got 1.5"),
                          (["--coreset-ratio", "nan"], "--coreset-ratio must be a number in (0, 1], got nan")):
        code = cli.main(["fit", str(tmp_path / "d"), "--out", str(tmp_path / "m"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and f"softpatch: error: {message}" in err and err.count("\n") == 1, err


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_fit_predict_end_to_end(tiny, tmp_path, capsys):
    train = tiny / "widget" / "train" / "good"
    model = tmp_path / "models" / "widget.softpatch"
    proc = run_cli(["fit", str(train), "--out", str(model), "--top", "3", *TINY_MODEL], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert model.is_file()
    report_csv = tmp_path / "models" / "widget_training_report.csv"
    assert report_csv.is_file()
    rows = list(csv.DictReader(report_csv.open()))
    assert len(rows) == 8 and [int(r["rank"]) for r in rows] == list(range(1, 9))
    scores = [float(r["contamination_score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert "Top 3 suspects" in proc.stdout and "images flagged" in proc.stdout
    assert "Decision threshold" in proc.stdout

    test_dir = tiny / "widget" / "test"
    out = tmp_path / "pred"
    proc = run_cli(["predict", str(model), str(test_dir / "good"), str(test_dir / "spot" / "000.png"), "--out", str(out)],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    # repeated file names are told apart by their folders
    assert [r["name"] for r in rows] == ["good/000.png", "good/001.png", "good/002.png", "spot/000.png"]
    data = json.loads((out / "predictions.json").read_text())
    threshold = data["threshold"]
    assert len(data["predictions"]) == 4
    for r in data["predictions"]:
        assert r["verdict"] == ("anomalous" if r["score"] > threshold else "normal")
        overlay = Path(r["overlay"])
        assert overlay.is_file() and Image.open(overlay).size == (40, 40)  # input resolution
    assert sorted(Path(r["overlay"]).name for r in data["predictions"]) == [
        "good_000.png", "good_001.png", "good_002.png", "spot_000.png"]
    assert re.search(r"\d+ of 4 images anomalous", proc.stdout)

    # threshold override: every image above 0 is anomalous; --quiet drops the per-image table and
    # the progress bars (in-process: cheaper than another interpreter start)
    out2 = tmp_path / "pred2"
    capsys.readouterr()
    assert cli.main(["-q", "predict", str(model), str(test_dir / "good"), "--out", str(out2), "--threshold", "0",
                     "--no-overlays"]) == 0
    captured = capsys.readouterr()
    data2 = json.loads((out2 / "predictions.json").read_text())
    assert data2["threshold"] == 0.0 and all(r["verdict"] == "anomalous" for r in data2["predictions"])
    assert not (out2 / "overlays").exists()
    assert len(captured.out.strip().splitlines()) == 1 and "3 of 3 images anomalous" in captured.out
    assert captured.err.strip() == ""


def test_predict_on_an_mvtec_test_folder_reads_its_sub_folders(tiny, tmp_path, capsys):
    """MVTec's test/ holds only sub-folders: predict reads them (no -r needed); --no-recursive
    says what to do instead of a bare 'no images'."""
    model = tmp_path / "widget.softpatch"
    assert cli.main(["-q", "fit", str(tiny / "widget" / "train"), "--out", str(model), "--model", "patchcore",
                     *TINY_MODEL]) == 0
    test_dir = tiny / "widget" / "test"
    out = tmp_path / "pred"
    assert cli.main(["-q", "predict", str(model), str(test_dir), "--out", str(out), "--no-overlays"]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["name"] for r in rows] == [f"{d}/{i:03d}.png" for d in ("good", "spot") for i in range(3)]
    capsys.readouterr()
    assert cli.main(["-q", "predict", str(model), str(test_dir), "--out", str(out), "--no-recursive"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no images in folder" in line and "sub-folders were not searched" in line and "--no-recursive" in line


@pytest.mark.slow
def test_evaluate_end_to_end(tiny, tmp_path):
    out = tmp_path / "eval"
    proc = run_cli(["evaluate", "--dataset", "mvtec", "--root", str(tiny), "--noise", "0.25", "--model", "softpatch",
                    "--out", str(out), "--save-models", *TINY_MODEL], tmp_path)
    assert proc.returncode == 0, proc.stderr
    md = (out / "results.md").read_text()
    assert "| **mean** |" in md and "| gadget |" in md and "| widget |" in md
    assert "| **mean** |" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert [r["category"] for r in data["rows"]] == ["gadget", "widget"]  # all present, sorted
    for r in data["rows"]:
        assert r["n_train"] == 8 + 2 and r["n_test"] == 3 + 3 - 2  # 2 planted, no-overlap
        assert r["n_planted"] == 2 and r["noise"] == 0.25
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
            assert r[key] is None or 0.0 <= r[key] <= 1.0 + 1e-9
        assert r["pixel_auroc"] is not None
    assert data["mean"]["image_auroc"] == pytest.approx(np.mean([r["image_auroc"] for r in data["rows"]]))
    records = json.loads((out / "noise_records.json").read_text())
    assert [len(r["added"]) for r in records] == [2, 2] and all(not r["overlap"] for r in records)
    assert sorted(p.name for p in (out / "models").iterdir()) == ["gadget.softpatch", "widget.softpatch"]


def test_demo_tiny(tmp_path, capsys):
    pytest.importorskip("softpatch_cuda.demo")
    from softpatch_cuda.demo import DEMO_CATEGORIES

    cats = list(DEMO_CATEGORIES[:2])
    out = tmp_path / "demo"
    argv = ["-q", "demo", "--out", str(out), "--categories", ",".join(cats), "--noise", "0.34", "--no-pretrained",
            "--backbone", "resnet18", "--layers", "layer2,layer3", "--image-size", "32", "--n-train", "6",
            "--n-test-good", "2", "--n-test-defect", "3", "--device", "cpu"]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "Report:" in stdout and str((out / "report.html").resolve()) in stdout
    html = (out / "report.html").read_text()
    # every picture link is relative and exists
    links = re.findall(r"src='([^']+)'", html)
    assert links and all(not Path(l).is_absolute() and (out / l).is_file() for l in links)
    data = json.loads((out / "results.json").read_text())
    assert [c["category"] for c in data["categories"]] == cats
    for c in data["categories"]:
        assert set(c["metrics"]) == {"SoftPatch+", "PatchCore"}
        assert c["flag_summary"]["planted"] == 2 and len(c["noise_record"]["added"]) == 2
        assert c["flag_summary"]["n_train"] == 8
        # overlap (the default): the planted images stay in the test set, one of them is shown
        assert c["noise_record"]["overlap"] is True
        assert {case["kind"] for case in c["cases"]} == {"best defect", "best good", "worst defect", "worst good",
                                                          "recurring defect"}
        for case in c["cases"]:  # a heatmap per model
            assert set(case["models"]) == {"SoftPatch+", "PatchCore"}
            assert len({case["models"][m]["overlay"] for m in case["models"]}) == 2
        for name, d in c["decisions"].items():
            assert d["recurring"] == 2 and d["defects"] == 3 and 0 <= d["caught"] <= 3
            assert f"<td>{d['threshold']:.4g}</td><td>{d['caught']} of 3</td>" in html
        for item in c["flagged"]:
            assert item["planted"] == (item["source"] in c["noise_record"]["added"])
    assert set(data["mean"]) == {"SoftPatch+", "PatchCore"}
    assert data["protocol"] == "overlap" and "(overlap)" in html and "Overlap protocol" in html
    assert "defects caught at the threshold: SoftPatch+ " in stdout
    assert (out / "data" / demo_app.DEMO_MARKER).is_file() and (out / "images" / demo_app.DEMO_MARKER).is_file()


def test_demo_folder_is_rebuilt_only_when_ours(tmp_path):
    data = tmp_path / "data"
    demo_app._prepare_demo_folder(data)
    (data / "old.png").write_bytes(b"x")
    demo_app._prepare_demo_folder(data)  # ours (marker): emptied and rebuilt
    assert sorted(p.name for p in data.iterdir()) == [demo_app.DEMO_MARKER]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    with pytest.raises(cli.UsageError, match="not a demo dataset folder written by"):
        demo_app._prepare_demo_folder(foreign)
    assert (foreign / "mine.txt").is_file()


def test_demo_runs_the_overlap_protocol_by_default():
    """Issue 17, item 11: the demo shows the case the package exists for (the defect recurs)."""
    import inspect

    assert inspect.signature(demo_app.run_demo).parameters["overlap"].default is True
    assert cli.build_parser().parse_args(["demo"]).overlap is True
    assert cli.build_parser().parse_args(["demo", "--no-overlap"]).overlap is False


def test_demo_no_overlap_says_so(tmp_path):
    pytest.importorskip("softpatch_cuda.demo")
    from softpatch_cuda.demo import DEMO_CATEGORIES

    out = tmp_path / "demo"
    argv = ["-q", "demo", "--out", str(out), "--categories", DEMO_CATEGORIES[0], "--noise", "0.34", "--no-overlap",
            "--no-pretrained", "--backbone", "resnet18", "--layers", "layer2,layer3", "--image-size", "32",
            "--n-train", "6", "--n-test-good", "2", "--n-test-defect", "3", "--device", "cpu"]
    assert cli.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    html = (out / "report.html").read_text()
    assert data["protocol"] == "no-overlap" and "(no-overlap)" in html and "No-overlap protocol" in html
    (cat,) = data["categories"]
    assert cat["noise_record"]["overlap"] is False
    assert all(d["recurring"] == 0 and d["defects"] == 1 for d in cat["decisions"].values())
    assert "recurring defect" not in {case["kind"] for case in cat["cases"]}


def test_demo_rejects_too_much_noise(tmp_path, capsys):
    pytest.importorskip("softpatch_cuda.demo")
    argv = ["demo", "--out", str(tmp_path / "d"), "--noise", "0.5", "--n-train", "10", "--n-test-defect", "4"]
    assert cli.main(argv) == 2
    assert "lower --noise" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_threads_option():
    assert "threads" not in _kwargs([])  # auto: the library default
    assert _kwargs(["--threads", "1"])["threads"] == 1
    args = cli.build_parser().parse_args(["fit", "x", "--out", "m", "--threads", "auto"])
    assert args.threads == "auto"
    with pytest.raises(cli.UsageError, match="--threads"):
        cli.build_parser().parse_args(["fit", "x", "--out", "m", "--threads", "0"])
