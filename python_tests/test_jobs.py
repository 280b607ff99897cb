"""The command line's jobs as library functions (softpatch_cuda.jobs): one predict loop
whatever runs the chunks, the model source that carries every option, one row schema
with the model's verdict, and an overlay colour scale the model fixes."""

from __future__ import annotations

import filecmp
import json
import random

import numpy as np
import pytest

from builders import object_set, write_images
from softpatch_cuda import SoftPatch
from softpatch_cuda.jobs import (
    PREDICTION_COLUMNS, ChunkJob, ModelSource, local_runner, overlay_names, predict_to_folder, prediction_row,
    score_chunk,
)


@pytest.fixture(scope="module")
def model(fitted):
    return fitted(SoftPatch)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    test, _ = object_set(3, 3, seed=12)
    return write_images(tmp_path_factory.mktemp("test"), test)


def shuffled_runner(source, jobs, on_error, overlay_dir):
    """A runner that hands the chunks back in another order (as Ray's workers may)."""
    results = list(local_runner(source, jobs, on_error, overlay_dir))
    random.Random(0).shuffle(results)
    yield from results


def test_the_loop_orders_the_rows_whatever_order_the_chunks_come_back_in(model, images, tmp_path):
    want = predict_to_folder(model, images, tmp_path / "a", chunk=2)
    got = predict_to_folder(model, images, tmp_path / "b", chunk=2, runner=shuffled_runner)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "overlay"} for r in rows]  # noqa: E731
    assert strip(got.rows) == strip(want.rows) and [r["path"] for r in got.rows] == images
    for row in want.rows:
        name = row["overlay"].split("/")[-1]
        assert filecmp.cmp(tmp_path / "a" / "overlays" / name, tmp_path / "b" / "overlays" / name, shallow=False)


def test_rows_carry_the_models_verdicts_and_scores(model, images, tmp_path):
    result = predict_to_folder(model, images, tmp_path / "o", overlays=False)
    prediction = model.predict(images)
    assert [r["score"] for r in result.rows] == [float(s) for s in prediction.scores]
    assert [r["verdict"] for r in result.rows] == ["anomalous" if a else "normal" for a in prediction.is_anomalous]
    assert all(tuple(r) == PREDICTION_COLUMNS for r in result.rows) and result.overlays is None
    assert prediction_row("a", "/x/a.png", 2.0, None, None, "unreadable") == {
        "name": "a", "path": "/x/a.png", "score": None, "threshold": 2.0, "verdict": "error", "overlay": None,
        "error": "unreadable"}


def test_the_colour_scale_is_the_models_not_the_first_chunks(model, images, tmp_path):
    """An image's overlay is the same whichever images a run scores first."""
    a = predict_to_folder(model, images, tmp_path / "a", chunk=1)
    b = predict_to_folder(model, images[::-1], tmp_path / "b", chunk=1)
    header = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert header["colour_range"] == list(model.colour_range()) == \
        json.loads((tmp_path / "b" / "predictions.json").read_text())["colour_range"]
    lo, hi = model.colour_range()
    assert lo == pytest.approx(model.state.score_floor) and (lo + hi) / 2 == pytest.approx(model.threshold)
    for row in a.rows:
        other = next(r for r in b.rows if r["path"] == row["path"])
        assert filecmp.cmp(row["overlay"], other["overlay"], shallow=False)


def test_a_model_source_carries_every_option(model, images, tmp_path):
    model.save(tmp_path / "m.softpatch")
    source = ModelSource(path=str(tmp_path / "m.softpatch"), device="cpu", threads=1, threshold=1.5)
    opened = source.open()
    assert opened.threads == 1 and opened.threshold == 1.5 and opened.settings == model.settings
    result = predict_to_folder(source, images, tmp_path / "o", overlays=False)
    assert result.threshold == 1.5 and all(r["threshold"] == 1.5 for r in result.rows)
    assert [r["verdict"] for r in result.rows] == ["anomalous" if r["score"] > 1.5 else "normal" for r in result.rows]
    with pytest.raises(ValueError, match="a model file \\(path\\) or a fitted model, exactly one"):
        ModelSource()
    with pytest.raises(ValueError, match="an exported graph is scored with its model file"):
        ModelSource(model=model, graph="g.onnx")


def test_a_chunk_with_an_unreadable_image(model, images, tmp_path):
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    job = ChunkJob(4, [images[0], str(corrupt)], ["a.png", "b.png"])
    skipped = score_chunk(model, job, "skip", tmp_path / "ov")
    assert skipped.scores[1] is None and skipped.scores[0] is not None and skipped.overlays[1] is None
    assert "corrupt or unreadable image" in str(skipped.first_failure()) and skipped.start == 4
    failed = score_chunk(model, job, "fail", tmp_path / "ov2")
    assert failed.scores == [None, None] and not (tmp_path / "ov2").exists()  # not scored at all
    assert np.isfinite(skipped.scores[0])


def test_overlay_names_are_unique_and_in_row_order():
    assert overlay_names(["a.png", "b.jpg", "sub/a.png", "a.png"]) == ["a.png", "b.png", "sub_a.png", "a_2.png"]


# ------------------------------------------------------------------ MVTec layout (issue 17, item 10)
def test_predict_reads_the_sub_folders_of_an_mvtec_test_folder(model, tmp_path):
    """MVTec's test/ holds only sub-folders (good/, crack/, ...): a folder is read with its
    sub-folders, by the API (model.predict) and by the command line's image collection."""
    from builders import tiny_mvtec
    from softpatch_cuda.jobs import collect_images

    test = tiny_mvtec(tmp_path / "mvtec", categories=("widget",), n_good=2, n_bad=2) / "widget" / "test"
    prediction = model.predict(str(test))
    assert prediction.names == ["good/000.png", "good/001.png", "spot/000.png", "spot/001.png"]
    assert len(prediction.scores) == 4
    paths = collect_images([str(test)], True, "image path")
    assert [p[len(str(test)) + 1:] for p in paths] == prediction.names
    # the run's own output folder inside the inputs is not read back as inputs
    (test / "results" / "overlays").mkdir(parents=True)
    write_images(test / "results" / "overlays", object_set(1, 0, seed=1)[0])
    (test / ".softpatch-predict-x").mkdir()  # a hidden folder (a run's staging folder)
    write_images(test / ".softpatch-predict-x", object_set(1, 0, seed=1)[0])
    assert collect_images([str(test)], True, "image path", exclude=test / "results") == paths
    with pytest.raises(ValueError, match="sub-folders were not searched"):
        collect_images([str(test)], False, "image path")


# ------------------------------------------------------------------ outputs that cannot be turned against the user (item 14)
def test_names_that_spreadsheets_run_as_formulas_are_escaped_in_the_csv(model, tmp_path):
    import csv

    names = ["=HYPERLINK(x).png", "@SUM(1).png", "+1.png", "-2.png", "plain.png"]
    src = tmp_path / "in"
    src.mkdir()
    arrays = object_set(len(names), 0, seed=2)[0]
    for name, a in zip(names, arrays):
        __import__("PIL.Image").Image.fromarray(a).save(src / name)
    result = predict_to_folder(model, [str(src / n) for n in names], tmp_path / "out", overlays=False)
    cells = [r["name"] for r in csv.DictReader(result.csv_path.open())]
    assert cells == ["'=HYPERLINK(x).png", "'@SUM(1).png", "'+1.png", "'-2.png", "plain.png"]
    # the JSON keeps the real names (a program reads it, not a spreadsheet)
    assert [r["name"] for r in json.loads(result.json_path.read_text())["predictions"]] == names


def test_the_training_report_is_not_written_through_a_planted_symlink(model, tmp_path):
    """A predictable temporary name (.NAME.tmp-PID) let anyone with write access to the folder
    plant a symlink that the report's write followed onto another file."""
    import os

    from softpatch_cuda.jobs import fit_to_file

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "models"
    out.mkdir()
    for name in ("m_training_report.csv", "m.softpatch"):
        os.symlink(victim, out / f".{name}.tmp-{os.getpid()}")  # the names 0.2 used
    fit_to_file(model, [], out / "m.softpatch", out / "m_training_report.csv", fit=lambda m, paths: m)
    assert victim.read_text() == "keep me"
    assert (out / "m_training_report.csv").is_file() and not (out / "m_training_report.csv").is_symlink()
    assert "contamination_score" in (out / "m_training_report.csv").read_text()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]  # nothing left behind


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(model, images, tmp_path):
    import subprocess
    import sys

    from softpatch_cuda.jobs import STAGING_PREFIX

    out = tmp_path / "out"
    out.mkdir()
    # a run killed mid-way: its staging folder (with a partial overlay) stays, its lock is released
    code = ("import os, sys; from pathlib import Path; from softpatch_cuda.jobs import staging_folder; "
            "s = staging_folder(Path(sys.argv[1])); (s / 'overlays').mkdir(); (s / 'overlays' / 'x.png').write_text('x'); "
            "os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code, str(out)], timeout=120).returncode == 9
    # an older version's staging folder (no lock), untouched for two hours
    old = out / f"{STAGING_PREFIX}old"
    old.mkdir()
    os_times = __import__("time").time() - 7200
    __import__("os").utime(old, (os_times, os_times))
    assert len(list(out.glob(STAGING_PREFIX + "*"))) == 2
    # a run still going (its lock held): left alone
    import fcntl

    live = out / f"{STAGING_PREFIX}live"
    live.mkdir()
    with open(live / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        predict_to_folder(model, images[:1], out, overlays=False)
        assert list(out.glob(STAGING_PREFIX + "*")) == [live]
    # and its own staging folder is gone too
    predict_to_folder(model, images[:1], out, overlays=False)
    assert not list(out.glob(STAGING_PREFIX + "*"))
