"""Ray: batch scoring (BatchPredictor, predict_dataset, predict_to_folder_ray, softpatch
predict --ray) equals the local predict; the distributed fit equals the local sharded fit.

One local Ray instance for the module (2 CPUs, no dashboard). Random-weight resnet18 at
64 px, a dozen images.
"""

from __future__ import annotations

import csv
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray", reason="Ray is a test extra: pip install '.[test]'")

from softpatch_cuda import SoftPatch, SoftPatchPlus, cli, load_model  # noqa: E402
from softpatch_cuda import distributed as D  # noqa: E402
from softpatch_cuda.jobs import predict_to_folder  # noqa: E402
from softpatch_cuda.sharded import fit_sharded  # noqa: E402
from test_models import FAST, object_set  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    with D.ray_session(num_cpus=2, quiet=True):
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    train, _ = object_set(16, 0, seed=21)
    test, labels = object_set(4, 4, seed=22)
    paths = {}
    for split, images in (("train", train), ("test", test)):
        (root / split).mkdir()
        paths[split] = []
        for i, img in enumerate(images):
            p = root / split / f"{i:03d}.png"
            Image.fromarray(img).save(p)
            paths[split].append(str(p))
    corrupt = root / "test" / "zz_corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    paths["corrupt"] = str(corrupt)
    paths["labels"] = labels
    return paths


@pytest.fixture(scope="module")
def model_file(files, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.softpatch"
    SoftPatch(**FAST).fit(files["train"]).save(path)
    return path


def _outputs(folder: Path) -> tuple[str, dict]:
    text = (folder / "predictions.csv").read_text().replace(str(folder), "OUT")
    data = json.loads((folder / "predictions.json").read_text().replace(str(folder), "OUT"))
    return text, data


def test_ray_predict_writes_the_local_outputs(files, model_file, tmp_path):
    paths = files["test"][:3] + [files["corrupt"]] + files["test"][3:]
    model = load_model(model_file, device="cpu")
    local = predict_to_folder(model, paths, tmp_path / "local", chunk=3, on_error="skip", model_path=str(model_file))
    remote = D.predict_to_folder_ray(model_file, paths, tmp_path / "ray", workers=2, chunk=3, on_error="skip")
    assert remote.n_errors == local.n_errors == 1
    csv_local, json_local = _outputs(tmp_path / "local")
    csv_ray, json_ray = _outputs(tmp_path / "ray")
    assert csv_ray == csv_local  # scores to the last digit, verdicts, names, overlay names, the error row
    assert json_ray == json_local
    names = sorted(p.name for p in (tmp_path / "local" / "overlays").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray" / "overlays").iterdir()) and len(names) == 8
    for name in names:  # same maps, same colour scale (set by the first chunk, as locally)
        assert filecmp.cmp(tmp_path / "local" / "overlays" / name, tmp_path / "ray" / "overlays" / name, shallow=False)
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["overlays", "predictions.csv", "predictions.json"]


def test_ray_predict_fails_on_a_corrupt_image_with_the_plain_error(files, model_file, tmp_path):
    with pytest.raises(ValueError, match=r"^corrupt or unreadable image: .*zz_corrupt.png"):
        D.predict_to_folder_ray(model_file, files["test"][:2] + [files["corrupt"]], tmp_path / "o", workers=1,
                                chunk=1)
    assert not (tmp_path / "o" / "predictions.csv").exists()
    assert [p for p in (tmp_path / "o").iterdir()] == []  # no staging folder left behind


def test_predict_dataset_on_paths_and_on_a_ray_image_dataset(files, model_file, tmp_path):
    local = load_model(model_file, device="cpu").predict(files["test"])
    rows = sorted(D.predict_dataset(model_file, files["test"], workers=2, maps=True, chunk=3).take_all(),
                  key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(8))
    np.testing.assert_array_equal(np.array([r["score"] for r in rows], np.float32), local.scores)
    np.testing.assert_array_equal(np.stack([r["map"] for r in rows]), local.maps)
    assert [r["verdict"] for r in rows] == ["anomalous" if a else "normal" for a in local.is_anomalous]
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
    with pytest.raises(ValueError, match="a 'paths', 'path' or 'image' column"):
        predictor({"pixels": np.zeros(2)})
    with pytest.raises(ValueError, match="overlays need a colour_range"):
        D.BatchPredictor(str(model_file), overlay_dir="/tmp/x")


@pytest.mark.parametrize("kind", [SoftPatch, SoftPatchPlus], ids=lambda k: k.__name__)
def test_distributed_fit_equals_the_local_sharded_fit(kind, files, tmp_path):
    remote = D.fit_distributed(kind(**FAST), files["train"], workers=2)
    local = fit_sharded(kind(**FAST), files["train"], shards=2)
    assert len(remote.fit_info_["sharding"]["shards"]) == 2
    for a, b in ((remote._cls_bank, local._cls_bank), (remote._seg_bank, local._seg_bank)):
        if a is None:
            assert b is None
            continue
        assert torch.equal(a.features, b.features) and torch.equal(a.source_image, b.source_image)
        assert torch.equal(a.weights, b.weights)
    assert remote.threshold == local.threshold
    np.testing.assert_array_equal(remote.training_report().scores, local.training_report().scores)
    remote.save(tmp_path / "r.softpatch")
    assert load_model(tmp_path / "r.softpatch", device="cpu").threshold == remote.threshold


def test_distributed_fit_refuses_too_many_workers_for_the_images(files):
    with pytest.raises(ValueError, match="shards of 5 images are too small"):
        D.fit_distributed(SoftPatch(**FAST), files["train"], workers=3)


def test_distributed_fit_reports_a_worker_error_as_itself(files):
    with pytest.raises(ValueError, match=r"^corrupt or unreadable image: .*zz_corrupt.png"):
        D.fit_distributed(SoftPatch(**FAST), files["train"][:13] + [files["corrupt"]], workers=2)


TINY_CLI = ["--backbone", "resnet18", "--no-pretrained", "--resize", "64", "--crop", "64", "--device", "cpu", "-q"]


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
    code = cli.main(["predict", str(model_file), *good, "--out", str(tmp_path / "x"), "-q", "--ray", "--graph",
                     str(model_file)])
    assert code == 2 and "--graph and --ray exclude each other" in capsys.readouterr().err
