"""Ray (softpatch_cuda.scale.distributed): the predict loop with Ray's chunk runner writes
the local loop's outputs for every model kind and setting; Ray Data scoring
(BatchPredictor, predict_dataset) gives the local rows; the distributed fit equals the
local sharded fit and hands every model option (threads included) to its workers.

One local Ray instance for the module (4 logical CPUs, no dashboard). Random-weight resnet18 at
64 px, a dozen images. Marked slow.
"""

from __future__ import annotations

import csv
import filecmp
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is a test extra: pip install '.[test]'")

from builders import FAST, TINY_CLI, object_set, write_corrupt_png, write_images  # noqa: E402
from softpatch_cuda import PatchCore, SoftPatch, SoftPatchPlus, cli, load_model  # noqa: E402
from softpatch_cuda.jobs import ModelSource, predict_to_folder  # noqa: E402
from softpatch_cuda.scale import distributed as D  # noqa: E402
from softpatch_cuda.scale.sharded import fit_sharded  # noqa: E402

pytestmark = pytest.mark.slow
SETTINGS = list(itertools.product(["l2", "squared_l2"], ["max", "reweighted"], ["exact", "pca"], [1, "auto"]))


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    with D.ray_session(num_cpus=4, quiet=True):  # room for the module's chunk actors beside the other tests' ones
        yield


@pytest.fixture(scope="module")
def ray_chunks():
    """One pool of two Ray actors for the module's predict runs (each opens a run's model once)."""
    with D.chunk_runner(2) as runner:
        yield runner


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    test, labels = object_set(4, 4, seed=22)
    return {"train": write_images(root / "train", object_set(16, 0, seed=21)[0]),
            "test": write_images(root / "test", test), "corrupt": write_corrupt_png(root / "test" / "zz_corrupt.png"),
            "labels": labels}


@pytest.fixture(scope="module")
def model_file(files, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.softpatch"
    SoftPatch(**FAST).fit(files["train"]).save(path)
    return path


def _outputs(folder: Path) -> tuple[str, dict]:
    text = (folder / "predictions.csv").read_text().replace(str(folder), "OUT")
    data = json.loads((folder / "predictions.json").read_text().replace(str(folder), "OUT"))
    return text, data


@pytest.mark.parametrize("distance,image_score,search,threads", SETTINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", [PatchCore, SoftPatch, SoftPatchPlus], ids=lambda k: k.__name__)
def test_ray_predict_equals_local_predict(kind, distance, image_score, search, threads, fitted, files, ray_chunks,
                                          tmp_path):
    """The model file and every option reach the workers (ModelSource): the rows are the
    local loop's to the last digit."""
    model = fitted(kind, distance=distance, image_score=image_score, search=search, threads=threads)
    model.save(tmp_path / "m.softpatch")
    source = ModelSource(path=str(tmp_path / "m.softpatch"), device="cpu", threads=threads)
    paths = files["test"][:5]
    local = predict_to_folder(source, paths, tmp_path / "local", chunk=2, overlays=False)
    remote = predict_to_folder(source, paths, tmp_path / "ray", chunk=2, overlays=False, runner=ray_chunks)
    assert remote.rows == [dict(r) for r in local.rows] and len(remote.rows) == 5
    assert [r["score"] for r in local.rows] == [float(s) for s in model.score(paths)]


def test_ray_predict_writes_the_local_outputs(files, model_file, ray_chunks, tmp_path):
    paths = files["test"][:3] + [files["corrupt"]] + files["test"][3:]
    source = ModelSource(path=str(model_file), device="cpu")
    local = predict_to_folder(source, paths, tmp_path / "local", chunk=3, on_error="skip")
    remote = predict_to_folder(source, paths, tmp_path / "ray", chunk=3, on_error="skip", runner=ray_chunks)
    assert remote.n_errors == local.n_errors == 1
    csv_local, json_local = _outputs(tmp_path / "local")
    csv_ray, json_ray = _outputs(tmp_path / "ray")
    assert csv_ray == csv_local  # scores to the last digit, verdicts, names, overlay names, the error row
    assert json_ray == json_local
    names = sorted(p.name for p in (tmp_path / "local" / "overlays").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray" / "overlays").iterdir()) and len(names) == 8
    for name in names:  # same maps, same colour scale (the model's)
        assert filecmp.cmp(tmp_path / "local" / "overlays" / name, tmp_path / "ray" / "overlays" / name, shallow=False)
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["overlays", "predictions.csv", "predictions.json"]


def test_ray_predict_fails_on_a_corrupt_image_with_the_plain_error(files, model_file, ray_chunks, tmp_path):
    with pytest.raises(ValueError, match=r"^corrupt or unreadable image: .*zz_corrupt.png"):
        predict_to_folder(ModelSource(path=str(model_file), device="cpu"), files["test"][:2] + [files["corrupt"]],
                          tmp_path / "o", chunk=1, runner=ray_chunks)
    assert not (tmp_path / "o" / "predictions.csv").exists()
    assert [p for p in (tmp_path / "o").iterdir()] == []  # no staging folder left behind
    with pytest.raises(ValueError, match="a Ray run opens the model on every worker: give a model file"):
        predict_to_folder(load_model(model_file, device="cpu"), files["test"][:2], tmp_path / "o",
                          runner=ray_chunks)


def test_predict_dataset_on_paths_and_on_a_ray_image_dataset(files, model_file, tmp_path):
    model = load_model(model_file, device="cpu")
    local = model.predict(files["test"])
    rows = sorted(D.predict_dataset(model_file, files["test"], workers=2, maps=True, chunk=3).take_all(),
                  key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(8))
    np.testing.assert_array_equal(np.array([r["score"] for r in rows], np.float32), local.scores)
    np.testing.assert_array_equal(np.stack([r["map"] for r in rows]), local.maps)
    assert [r["verdict"] for r in rows] == ["anomalous" if a else "normal" for a in local.is_anomalous]
    local_rows = predict_to_folder(model, files["test"], tmp_path / "local", chunk=3, overlays=False).rows
    for row, want in zip(rows, local_rows):  # the local loop's row schema (+ index, map)
        assert {k: row[k] for k in want if k not in ("score", "error", "overlay")} == \
            {k: v for k, v in want.items() if k not in ("score", "error", "overlay")}
    # a user's dataset: ray.data.read_images decodes the files itself; batches of 4
    ds = ray.data.read_images(files["test"], include_paths=True, mode="RGB")
    got = D.predict_dataset(model_file, ds, workers=1, batch_size=4, overlay_dir=tmp_path / "ov").take_all()
    by_name = {Path(r["path"]).name: r for r in got}
    for name, score in zip(local.names, local.scores):
        assert by_name[name]["score"] == pytest.approx(float(score), rel=1e-6)
        assert Path(by_name[name]["overlay"]).is_file()


def test_batch_predictor_columns_and_errors(model_file, files):
    predictor = D.BatchPredictor(str(model_file), maps=False, on_error="skip")
    out = predictor({"path": np.array([files["test"][0], files["corrupt"]]), "index": np.array([5, 6])})
    assert out["index"].tolist() == [5, 6] and out["verdict"][1] == "error" and np.isnan(out["score"][1])
    assert "corrupt or unreadable image" in out["error"][1] and out["error"][0] == ""
    assert set(out) == {"name", "path", "score", "threshold", "verdict", "overlay", "error", "index"}
    with pytest.raises(ValueError, match="a 'paths', 'path' or 'image' column"):
        predictor({"pixels": np.zeros(2)})
    with pytest.raises(ValueError, match="corrupt or unreadable image"):
        D.BatchPredictor(str(model_file))({"path": np.array([files["corrupt"]])})


@pytest.mark.parametrize("kind", [SoftPatch, SoftPatchPlus], ids=lambda k: k.__name__)
def test_distributed_fit_equals_the_local_sharded_fit(kind, files, tmp_path):
    remote = D.fit_distributed(kind(**FAST, search="pca"), files["train"], workers=2)
    local = fit_sharded(kind(**FAST, search="pca"), files["train"], shards=2)
    assert len(remote.fit_info_["sharding"]["shards"]) == 2
    for a, b in ((remote.state.cls_bank, local.state.cls_bank), (remote.state.seg_bank, local.state.seg_bank)):
        if a is None:
            assert b is None
            continue
        assert torch.equal(a.features, b.features) and torch.equal(a.source_image, b.source_image)
        assert torch.equal(a.weights, b.weights) and a.search == b.search
    assert remote.threshold == local.threshold
    np.testing.assert_array_equal(remote.training_report().scores, local.training_report().scores)
    remote.save(tmp_path / "r.softpatch")
    assert load_model(tmp_path / "r.softpatch", device="cpu").threshold == remote.threshold


def test_the_shard_workers_get_every_model_option():
    worker = D._ShardWorker("softpatch_plus", SoftPatchPlus(**FAST, search="pca").settings.to_dict(), "cpu", 1)
    assert worker.model.threads == 1 and worker.model.settings == SoftPatchPlus(**FAST, search="pca").settings


def test_distributed_fit_refuses_too_many_workers_for_the_images(files):
    with pytest.raises(ValueError, match="shards of 5 images are too small"):
        D.fit_distributed(SoftPatch(**FAST), files["train"], workers=3)


def test_distributed_fit_reports_a_worker_error_as_itself(files):
    with pytest.raises(ValueError, match=r"^corrupt or unreadable image: .*zz_corrupt.png"):
        D.fit_distributed(SoftPatch(**FAST), files["train"][:13] + [files["corrupt"]], workers=2)


def test_cli_fit_and_predict_with_ray(files, model_file, tmp_path, capsys):
    train_dir = str(Path(files["train"][0]).parent)
    code = cli.main(["fit", train_dir, "--out", str(tmp_path / "r.softpatch"), *TINY_CLI, "--ray", "--workers", "2"])
    assert code == 0, capsys.readouterr().err
    fitted = load_model(tmp_path / "r.softpatch", device="cpu")
    assert len(fitted.fit_info_["sharding"]["shards"]) == 2
    good = [p for p in files["test"]]
    assert cli.main(["predict", str(model_file), *good, "--out", str(tmp_path / "local"), "-q"]) == 0
    assert cli.main(["predict", str(model_file), *good, "--out", str(tmp_path / "ray"), "-q",
                     "--ray", "--workers", "2"]) == 0
    rows = lambda d: [{k: v for k, v in r.items() if k != "overlay"}  # noqa: E731
                      for r in csv.DictReader((tmp_path / d / "predictions.csv").open())]
    assert rows("ray") == rows("local")
    capsys.readouterr()
    code = cli.main(["predict", str(model_file), *good, "--out", str(tmp_path / "x"), "-q", "--ray", "--workers", "0"])
    assert code == 2 and "--workers must be >= 1" in capsys.readouterr().err
