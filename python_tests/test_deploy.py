"""Export for deployment: the ONNX / OpenVINO embedding graph and the torch-free predictor.

Scores of the exported graph + compiled k-NN equal the torch path's within 1e-4 relative
on the demo data; the predictor runs where torch cannot be imported; the numpy twins of
the transform and the map post-processing equal the torch ones.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("onnx", reason="onnx is a test extra: pip install '.[test]'")
pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra: pip install '.[test]'")

from softpatch_cuda import SoftPatch, SoftPatchPlus, cli, load_model, postprocess  # noqa: E402
from softpatch_cuda import deploy  # noqa: E402
from softpatch_cuda.data.images import ImageTransform  # noqa: E402
from softpatch_cuda.demo import make_demo_dataset  # noqa: E402
from softpatch_cuda.export import AveragePool1d, EmbeddingGraph, export_onnx, export_openvino  # noqa: E402
from softpatch_cuda.serialization import read_model_file  # noqa: E402

REL_TOL = 1e-4  # the bar for scores; measured differences are ~1e-7 (benchmarks/results/scale_export_*)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = make_demo_dataset(tmp_path_factory.mktemp("demo"), categories=["nut", "grass"], n_train=10,
                             n_test_good=3, n_test_defect=3, image_size=64, seed=0)
    data = {}
    for cat in ("nut", "grass"):
        data[cat] = (sorted(str(p) for p in (root / cat / "train" / "good").iterdir()),
                     sorted(str(p) for p in (root / cat / "test").rglob("*.png")))
    return data


@pytest.fixture(scope="module")
def exported(demo, tmp_path_factory):
    """(model file, ONNX graph, torch model) for a random-weight resnet18 SoftPatch+ and
    the package's default backbone (efficientnet_lite0, offline ImageNet weights) SoftPatch."""
    out = {}
    folder = tmp_path_factory.mktemp("exported")
    for name, model in (("resnet18", SoftPatchPlus(backbone="resnet18", pretrained=False, resize=64, crop=64,
                                                   device="cpu", image_score="reweighted")),
                        ("lite0", SoftPatch(resize=64, crop=64, device="cpu"))):
        model.fit(demo["nut"][0])
        path = folder / f"{name}.softpatch"
        model.save(path)
        summary = export_onnx(model, folder / f"{name}.onnx")
        assert summary["max_rel_diff"] < 1e-5
        out[name] = (path, folder / f"{name}.onnx", model)
    return out


@pytest.mark.parametrize("length,out", [(1152, 384), (360, 384), (384, 384), (1008, 384), (9216, 1024), (7, 3),
                                        (3, 7), (768, 384)])
def test_average_pool_equals_adaptive_avg_pool1d_exactly(length, out):
    x = torch.randn(33, length, generator=torch.Generator().manual_seed(length))
    want = F.adaptive_avg_pool1d(x[:, None], out)[:, 0]
    assert torch.equal(AveragePool1d(length, out)(x), want)


def test_embedding_graph_equals_the_torch_embedding_exactly(exported):
    for _, _, model in exported.values():
        pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        graph = EmbeddingGraph(model._embedder).eval()
        with torch.no_grad():
            assert torch.equal(graph(pixels), model._embedder(pixels))


@pytest.mark.parametrize("name", ["resnet18", "lite0"])
def test_onnx_scores_equal_the_torch_scores(name, exported, demo):
    model_path, graph_path, model = exported[name]
    detector = deploy.OnnxDetector(model_path, graph_path)
    for cat in ("nut", "grass"):
        images = demo[cat][1]
        want = model.predict(images)
        got = detector.predict(images)
        assert got.names == want.names and got.input_sizes == want.input_sizes
        np.testing.assert_allclose(got.scores, want.scores, rtol=REL_TOL)
        np.testing.assert_array_equal(got.is_anomalous, want.is_anomalous)
        scale = float(np.abs(want.maps).max())
        assert float(np.abs(got.maps - want.maps).max()) <= REL_TOL * scale
        np.testing.assert_allclose(got.patch_scores, want.patch_scores, rtol=REL_TOL, atol=REL_TOL * scale)
        big = want.map_at_input_size(0, out_size=(100, 90))
        assert float(np.abs(got.map_at_input_size(0, out_size=(100, 90)) - big).max()) <= REL_TOL * scale
        np.testing.assert_allclose(detector.score(images), want.scores, rtol=REL_TOL)


def test_graph_batch_and_image_size_are_dynamic(exported):
    _, graph_path, model = exported["resnet18"]
    run = deploy.load_graph(graph_path)
    for shape in ((1, 3, 64, 64), (5, 3, 96, 80)):
        pixels = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = model._embedder(pixels).numpy()
        got = run(pixels.numpy())
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= REL_TOL * float(np.abs(want).max())


def test_the_predictor_runs_where_torch_cannot_be_imported(exported, demo, tmp_path):
    """A shim package named torch that raises on import sits first on the path: the
    predictor (and its command line) must never import torch."""
    shim = tmp_path / "shim" / "torch"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('torch is not available here')\n")
    model_path, graph_path, model = exported["resnet18"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path / "shim"), os.environ.get("PYTHONPATH")) if p))
    images = demo["grass"][1]
    code = (
        "import sys, json\n"
        "from softpatch_cuda.deploy import OnnxDetector\n"
        f"d = OnnxDetector({str(model_path)!r}, {str(graph_path)!r})\n"
        f"print(json.dumps([float(s) for s in d.score({images!r})]))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.array(eval(proc.stdout.strip().splitlines()[-1]), np.float32),
                               model.score(images), rtol=REL_TOL)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "softpatch_cuda.deploy", str(model_path), str(graph_path), *images,
                           "--out", str(out), "-q"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    np.testing.assert_allclose([float(r["score"]) for r in rows], model.score(images), rtol=REL_TOL)
    assert len(list((out / "overlays").iterdir())) == len(images)
    proc = subprocess.run([sys.executable, "-m", "softpatch_cuda.deploy", str(model_path), str(tmp_path / "no.onnx"),
                           *images, "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "graph file not found" in proc.stderr and proc.stderr.count("\n") == 1


def test_a_graph_from_another_backbone_or_no_graph_is_refused(exported, tmp_path):
    with pytest.raises(ValueError, match="exported from another backbone"):
        deploy.OnnxDetector(exported["resnet18"][0], exported["lite0"][1])
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    plain = helper.make_model(helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not a softpatch_cuda embedding graph"):
        deploy.OnnxDetector(exported["resnet18"][0], tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="not a loadable ONNX graph"):
        deploy.OnnxDetector(exported["resnet18"][0], tmp_path / "junk.onnx")


def test_model_files_read_as_numpy_verify_the_same_checksum(exported, tmp_path):
    path = exported["lite0"][0]
    pt, header = read_model_file(path)
    np_tensors, np_header = read_model_file(path, framework="np")
    assert header == np_header and set(pt) == set(np_tensors)
    for key in pt:
        np.testing.assert_array_equal(pt[key].numpy(), np_tensors[key])
    damaged = tmp_path / "damaged.softpatch"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a byte of the last tensor
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged: its checksum does not match"):
        read_model_file(damaged, framework="np")
    with pytest.raises(ValueError, match="framework must be"):
        read_model_file(path, framework="tf")


def test_numpy_twins_of_the_torch_postprocessing():
    rng = np.random.default_rng(0)
    assert deploy.MAP_SIGMA == postprocess.MAP_SIGMA
    from softpatch_cuda.export import GRAPH_FORMAT
    from softpatch_cuda.memory_bank import REWEIGHT_NEIGHBOURS

    assert deploy.GRAPH_FORMAT == GRAPH_FORMAT and deploy.REWEIGHT_NEIGHBOURS == REWEIGHT_NEIGHBOURS
    patch = rng.random((2, 7, 9), dtype=np.float32)
    for size in ((64, 64), (50, 70), (5, 4)):
        want = F.interpolate(torch.from_numpy(patch)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        np.testing.assert_allclose(deploy.resize_bilinear(patch, size), want.numpy(), rtol=1e-6, atol=1e-6)
    maps = rng.random((2, 40, 30), dtype=np.float32)
    np.testing.assert_allclose(deploy.gaussian_blur(maps), postprocess.gaussian_blur(torch.from_numpy(maps)).numpy(),
                               rtol=1e-5, atol=1e-6)
    for resize, crop, size in ((256, 224, (300, 400)), (None, 48, (64, 64)), (64, None, (33, 47))):
        amap = rng.random((crop or resize, crop or resize), dtype=np.float32)
        np.testing.assert_allclose(deploy.map_to_input_size(amap, size, resize, crop),
                                   postprocess.map_to_input_size(amap, size, resize, crop), rtol=1e-5, atol=1e-6)


def test_numpy_transform_equals_the_torch_transform_exactly():
    from softpatch_cuda._pixels import model_input

    rng = np.random.default_rng(1)
    for mode, shape in (("RGB", (70, 90, 3)), ("L", (64, 64)), ("RGBA", (40, 50, 4))):
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode)
        for resize, crop in ((64, 56), (None, 32), (48, None)):
            want = ImageTransform(resize=resize, crop=crop).image(img).numpy()
            np.testing.assert_array_equal(model_input(img, resize, crop), want)


def test_cli_export_and_predict_with_the_graph(exported, demo, tmp_path, capsys):
    model_path = exported["resnet18"][0]
    code = cli.main(["export", str(model_path), "--out", str(tmp_path / "g.onnx"), "-q"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Exported the resnet18 embedding graph (onnx, opset 17)" in out and "max difference" in out
    images = demo["nut"][1]
    assert cli.main(["predict", str(model_path), *images, "--out", str(tmp_path / "t"), "-q"]) == 0
    assert cli.main(["predict", str(model_path), *images, "--out", str(tmp_path / "g"), "-q", "--graph",
                     str(tmp_path / "g.onnx")]) == 0
    torch_rows = list(csv.DictReader((tmp_path / "t" / "predictions.csv").open()))
    graph_rows = list(csv.DictReader((tmp_path / "g" / "predictions.csv").open()))
    assert [r["name"] for r in graph_rows] == [r["name"] for r in torch_rows]
    assert [r["verdict"] for r in graph_rows] == [r["verdict"] for r in torch_rows]
    np.testing.assert_allclose([float(r["score"]) for r in graph_rows], [float(r["score"]) for r in torch_rows],
                               rtol=REL_TOL)
    capsys.readouterr()
    for args, message in (
        (["export", str(tmp_path / "none.softpatch")], "model file not found"),
        (["export", str(model_path), "--format", "openvino", "--out", str(tmp_path / "x.onnx")], "ends in .xml"),
        (["export", str(model_path), "--opset", "9"], "--opset must be >= 13"),
        (["predict", str(model_path), *images, "--out", str(tmp_path / "x"), "--graph", str(tmp_path / "no.onnx")],
         "graph file not found"),
        (["predict", str(model_path), *images, "--out", str(tmp_path / "x"), "--graph", str(tmp_path / "g.onnx"),
          "--weights", str(model_path)], "--weights does not apply with --graph"),
    ):
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


def test_openvino_ir_scores_equal_the_torch_scores(exported, demo, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO export is optional: pip install '.[openvino]'")
    model_path, _, model = exported["lite0"]
    summary = export_openvino(model, tmp_path / "lite0.xml")
    assert summary["max_rel_diff"] < 1e-5 and (tmp_path / "lite0.bin").is_file()
    detector = deploy.OnnxDetector(model_path, tmp_path / "lite0.xml")
    assert detector.graph.engine == "openvino"
    images = demo["grass"][1]
    np.testing.assert_allclose(detector.score(images), model.score(images), rtol=REL_TOL)
    assert cli.main(["export", str(model_path), "--format", "openvino", "-o", str(tmp_path / "cli.xml"), "-q",
                     "--no-check"]) == 0
    assert (tmp_path / "cli.bin").is_file()
