"""Ray (softpatch_cuda.scale.distributed): the predict loop with Ray's chunk runner writes
the local loop's outputs for every model kind and setting; Ray Data scoring
(BatchPredictor, predict_dataset) gives the local rows; the distributed fit equals the
local sharded fit and hands every model option (threads included) to its workers.

Where it runs: another Ray instance runs on the machine for the whole module (started with
``ray start --head``, named by ``RAY_ADDRESS``, the way ``ray.init()`` finds a cluster to
join) and nothing here may join it: the module's own local Ray instance (4 logical CPUs, no
dashboard), the CLI in a process of its own, ``predict_dataset`` outside a session. Relative
paths from another working folder, more workers than CPUs, a worker lost mid-run (the test
hook ``SOFTPATCH_RAY_FAULT_DIR``), an address that does not answer, worker errors in one
line. Random-weight resnet18 at 64 px, a dozen images. Marked slow.
"""

from __future__ import annotations

import csv
import filecmp
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


FOREIGN_CPUS = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def foreign_ray():
    """Another Ray instance on this machine (``ray start --head``, 1 CPU, ports of its own,
    its own temp folder), named by RAY_ADDRESS: what a plain ``ray.init()`` would join."""
    temp = Path(tempfile.mkdtemp(prefix="rayf", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = _free_port()
    ports = {f"--{name}": str(_free_port()) for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")}
    log = (temp / "start.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}", f"--num-cpus={FOREIGN_CPUS}",
                             f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats",
                             *itertools.chain.from_iterable(ports.items())],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        deadline = time.monotonic() + 120
        while not (temp / "ray_current_cluster").is_file():  # written once the head runs
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the foreign Ray instance did not start:\n{(temp / 'start.log').read_text()[-3000:]}")
            time.sleep(0.5)
        address = (temp / "ray_current_cluster").read_text().strip()
        previous = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = address  # a plain ray.init() joins it from now on
        try:
            yield {"address": address, "temp": temp}
        finally:
            if previous is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = previous
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _joined(foreign: dict, pid: int) -> list[Path]:
    """The driver logs a process left in the foreign instance's session: it joined it."""
    return list(Path(foreign["temp"]).glob(f"session_*/logs/*driver*{pid}*"))


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module", autouse=True)
def ray_instance(foreign_ray, fault_dir):
    """The module's own Ray instance: local, never the foreign one RAY_ADDRESS names. Its
    workers see SOFTPATCH_RAY_FAULT_DIR (the lost-worker tests drop files there)."""
    os.environ[D._FAULT_ENV] = str(fault_dir)  # the instance's workers inherit it
    try:
        with D.ray_session(num_cpus=4, quiet=True):  # room for the module's chunk actors beside the other tests' ones
            assert ray.get_runtime_context().gcs_address != foreign_ray["address"]
            assert ray.cluster_resources()["CPU"] == 4
            yield
    finally:
        os.environ.pop(D._FAULT_ENV, None)


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


# ------------------------------------------------------------------ where it runs, what goes wrong
def _env() -> dict:
    src = str(Path(D.__file__).resolve().parents[2])  # the package under test, for the subprocess and its workers
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _copy_images(files: dict, root: Path) -> None:
    for part in ("train", "test"):
        (root / "imgs" / part).mkdir(parents=True)
        for p in files[part]:
            shutil.copy(p, root / "imgs" / part)


def test_cli_on_ray_in_a_process_of_its_own_does_not_join_the_running_cluster(files, foreign_ray, tmp_path):
    """`softpatch fit imgs/train --ray --workers 5` with relative paths, from another folder,
    on a machine with fewer free CPUs than workers and another Ray instance named by
    RAY_ADDRESS: a Ray instance of its own, fewer workers with one warning, done."""
    _copy_images(files, tmp_path)
    cmd = [sys.executable, "-m", "softpatch_cuda", "fit", "imgs/train", "--out", "m.softpatch", *TINY_CLI[:-1],
           "--lof-k", "2", "--ray", "--workers", "5"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - t0 < 240
    if (os.cpu_count() or 1) < 5:  # 5 workers, fewer CPUs: said once
        assert len([line for line in err.splitlines() if "Ray workers asked for, the cluster has free CPUs" in line]) == 1
    fitted = load_model(tmp_path / "m.softpatch", device="cpu")
    assert len(fitted.fit_info_["sharding"]["shards"]) == 5  # the shards asked for, whatever the machine
    assert not _joined(foreign_ray, proc.pid)
    report = (tmp_path / "m_training_report.csv").read_text()
    assert "imgs/train/" in report and str(tmp_path) not in report  # the images named as given


def test_cli_fit_and_predict_with_relative_paths_from_another_folder(files, tmp_path, monkeypatch, capsys):
    """The workers start in another folder: every path is made absolute on the driver; the
    outputs land where the user's folder says, named as given."""
    import softpatch_cuda

    _copy_images(files, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", "imgs/train", "--out", "m.softpatch", *TINY_CLI, "--ray", "--workers", "2"]) == 0, \
        capsys.readouterr().err
    assert cli.main(["predict", "m.softpatch", "imgs/test", "--out", "res", "-q", "--ray", "--workers", "2"]) == 0, \
        capsys.readouterr().err
    rows = list(csv.DictReader((tmp_path / "res" / "predictions.csv").open()))
    assert [r["path"] for r in rows] == [f"imgs/test/{Path(p).name}" for p in files["test"]]
    assert all((tmp_path / r["overlay"]).is_file() for r in rows) and len(rows) == 8
    assert not (Path(softpatch_cuda.__file__).parent / "res").exists()
    local = fit_sharded(SoftPatch(**FAST), [f"imgs/train/{Path(p).name}" for p in files["train"]], shards=2)
    assert load_model(tmp_path / "m.softpatch", device="cpu").threshold == local.threshold


def test_more_workers_than_free_cpus_start_fewer_and_give_the_same_fit(files, caplog):
    caplog.set_level(logging.WARNING, logger=D.__name__)
    assert D._free_slots(1) <= ray.cluster_resources()["CPU"] == 4
    t0 = time.monotonic()
    remote = D.fit_distributed(SoftPatch(**FAST, lof_k=2), files["train"], workers=5)
    assert time.monotonic() - t0 < 180
    assert re.search(r"5 Ray workers asked for, the cluster has free CPUs for [0-4]: the 5 shards run on [1-4] ",
                     caplog.text)
    local = fit_sharded(SoftPatch(**FAST, lof_k=2), files["train"], shards=5)
    assert len(remote.fit_info_["sharding"]["shards"]) == 5
    assert torch.equal(remote.state.cls_bank.features, local.state.cls_bank.features)
    assert remote.threshold == local.threshold


def test_a_shard_whose_worker_is_lost_runs_again_elsewhere(files, fault_dir, caplog):
    caplog.set_level(logging.WARNING, logger=D.__name__)
    (fault_dir / "crash-run").touch()  # the first worker to start a shard dies, as on a lost node
    remote = D.fit_distributed(SoftPatch(**FAST), files["train"], workers=2)
    assert not (fault_dir / "crash-run").exists()
    assert "its Ray worker on" in caplog.text and "was lost" in caplog.text and "attempt 2 of 3" in caplog.text
    local = fit_sharded(SoftPatch(**FAST), files["train"], shards=2)
    assert torch.equal(remote.state.cls_bank.features, local.state.cls_bank.features)
    assert remote.threshold == local.threshold
    again = D.fit_distributed(SoftPatch(**FAST), files["train"], workers=2)  # the next run with the same workers
    assert again.threshold == local.threshold


def test_a_shard_lost_three_times_fails_in_one_line(files, fault_dir):
    for k in range(D.MAX_ATTEMPTS):
        (fault_dir / f"crash-run-{k}").touch()
    try:
        with pytest.raises(D.RayRunError, match=r"^shard \d/2: its Ray worker was lost 3 times") as err:
            D.fit_distributed(SoftPatch(**FAST), files["train"], workers=1, shards=2)
        assert "\n" not in str(err.value)
    finally:
        for p in fault_dir.glob("crash-*"):
            p.unlink()


def test_a_chunk_whose_worker_is_lost_runs_again(files, model_file, ray_chunks, fault_dir, tmp_path):
    source = ModelSource(path=str(model_file), device="cpu")
    local = predict_to_folder(source, files["test"], tmp_path / "local", chunk=2)
    (fault_dir / "crash-score").touch()
    remote = predict_to_folder(source, files["test"], tmp_path / "ray", chunk=2, runner=ray_chunks)
    assert not (fault_dir / "crash-score").exists()
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")
    assert len(remote.rows) == 8


def test_workers_that_cannot_start_fail_in_one_line():
    with pytest.raises(D.RayRunError, match=r"^a Ray worker could not start: TypeError: .*no_such_option") as err:
        list(D._Pool(D._ShardWorker, ("softpatch", {"no_such_option": 1}, "cpu", 1), 1, 1).map("run", [1], str))
    assert "\n" not in str(err.value)
    t0 = time.monotonic()
    with pytest.raises(D.RayRunError, match=r"^no Ray worker started within 2 s"):  # no room: never placed
        list(D._Pool(D._ChunkScorer, (), 1, 1000, start_timeout=2).map("score", [1], str))
    assert time.monotonic() - t0 < 30


def test_a_file_a_worker_misses_but_the_driver_has_means_no_shared_storage(files, tmp_path):
    hinted = D._shared_storage_hint(FileNotFoundError(f"image file not found: {files['test'][0]}"))
    assert str(hinted).startswith("image file not found: ") and str(hinted).endswith(D.SHARED_STORAGE)
    assert D._shared_storage_hint(hinted) is hinted  # said once
    gone = FileNotFoundError(f"image file not found: {tmp_path / 'gone.png'}")
    assert D._shared_storage_hint(gone) is gone  # missing here too: the plain error
    result = D.ChunkResult(0, [files["test"][0]], [1.0], [False], [str(tmp_path / "elsewhere" / "000.png")], [None],
                           1.0, (0.0, 1.0), "SoftPatch")
    with pytest.raises(D.RayRunError, match="a Ray worker wrote is not in .* on this machine: on a Ray cluster"):
        D._check_chunk(result, str(tmp_path / "elsewhere"))


def test_an_address_that_does_not_answer_fails_in_seconds_in_one_line(model_file, files, tmp_path):
    """Nothing listens there (refused at once), or nothing answers (a blackholed address:
    the connect times out; where a proxy answers instead, Ray's connect does): one line,
    in seconds."""
    port = _free_port()
    with pytest.raises(D.RayRunError, match=rf"^cannot reach the Ray cluster at 127.0.0.1:{port} within 2 s"):
        D._check_reachable(f"127.0.0.1:{port}", 2)
    for address in (f"127.0.0.1:{port}", "10.255.255.1:6379"):
        cmd = [sys.executable, "-m", "softpatch_cuda", "predict", str(model_file), *files["test"][:2], "--out",
               str(tmp_path / "o"), "--ray-address", address]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert time.monotonic() - t0 < 90
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("softpatch: error: RayRunError: cannot "), proc.stderr
        assert address in lines[0]
        if address.startswith("127."):
            assert lines[0] == (f"softpatch: error: RayRunError: cannot reach the Ray cluster at {address} within "
                                "10 s: Connection refused (run with -v for the traceback)")


def test_predict_dataset_and_fit_distributed_outside_a_session(files, model_file, foreign_ray, tmp_path):
    """As Ray Data's own functions do, they start a Ray instance when this process runs
    none: a local one, not the cluster RAY_ADDRESS names."""
    script = f"""
import ray, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from builders import FAST
from softpatch_cuda import SoftPatch
from softpatch_cuda.scale import distributed as D
rows = D.predict_dataset({str(model_file)!r}, {files["test"]!r}, workers=1, chunk=4).take_all()
assert len(rows) == 8 and ray.get_runtime_context().gcs_address != {foreign_ray["address"]!r}
ray.shutdown()
model = D.fit_distributed(SoftPatch(**FAST), {files["train"]!r}, workers=2)
assert len(model.fit_info_["sharding"]["shards"]) == 2 and not ray.is_initialized()
print("ok")
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out.strip().endswith("ok"), err[-3000:]
    assert not _joined(foreign_ray, proc.pid)


def test_the_cli_ray_address_options():
    parser = cli.build_parser()
    for argv, want in ((["--ray"], "local"), (["--ray", "auto"], "auto"), (["--ray-address", "h:1"], "h:1"),
                       (["--ray", "--ray-address", "ray://h:10001"], "ray://h:10001")):
        assert cli._ray_address(parser.parse_args(["predict", "m", "x", "--out", "o", *argv])) == want
    with pytest.raises(cli.UsageError, match="give one address"):
        cli._ray_address(parser.parse_args(["predict", "m", "x", "--out", "o", "--ray", "auto", "--ray-address", "h:1"]))
    with pytest.raises(cli.UsageError, match="--ray-address nowhere: not a Ray address"):
        cli._ray_address(parser.parse_args(["predict", "m", "x", "--out", "o", "--ray-address", "nowhere"]))
