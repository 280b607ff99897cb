"""Damaged model files, bad inputs and interrupted runs: each refused with one clear
error (exact class and message fragment) and nothing left behind.

Random-weight resnet18 at 32-64 px: small and CPU-only.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from builders import FAST, TINY_CLI, object_set, write_images
from softpatch_cuda import PatchCore, SoftPatch, SoftPatchPlus, cli, load_model, ops
from softpatch_cuda.jobs import predict_to_folder
from softpatch_cuda.serialization import CHECKSUM_KEY, METADATA_KEY, content_checksum, read_model_file


@pytest.fixture(scope="module")
def data():
    train, _ = object_set(10, 1, seed=3)
    test, _ = object_set(3, 3, seed=4)
    return train, test


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.softpatch"
    SoftPatchPlus(**FAST).fit(data[0]).save(path)
    return path


def _rewrite(src: Path, dst: Path, edit_tensors=None, edit_header=None, fix_checksum: bool = True) -> Path:
    """A copy of a model file with tensors / header edited (checksum recomputed unless told)."""
    tensors, header = read_model_file(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    if fix_checksum:
        header[CHECKSUM_KEY] = content_checksum(tensors, header)
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(header, allow_nan=True)})
    return dst


# ------------------------------------------------------------------ damaged model files
def test_bit_flip_anywhere_is_refused(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    rng = np.random.default_rng(0)
    header_len = int.from_bytes(raw[:8], "little")
    flips = list(rng.integers(8 + header_len, len(raw), 6))  # inside the tensor data
    for pos in flips:
        damaged = bytearray(raw)
        damaged[pos] ^= 0x10
        path = tmp_path / f"flip_{pos}.softpatch"
        path.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match="is damaged: its checksum does not match"):
            load_model(path, device="cpu")


def test_nan_poisoned_bank_is_refused_even_with_a_valid_checksum(saved, tmp_path):
    def poison(t):
        t["cls_bank.features"] = t["cls_bank.features"].clone()
        t["cls_bank.features"][3, 5] = float("nan")

    path = _rewrite(saved, tmp_path / "nan.softpatch", edit_tensors=poison)
    with pytest.raises(ValueError, match=r"corrupt model file \(cls_bank.features holds NaN"):
        load_model(path, device="cpu")


@pytest.mark.parametrize("version", [0, -1, True, "2", 2.0, None])
def test_bad_format_versions_are_refused(saved, tmp_path, version):
    path = _rewrite(saved, tmp_path / "v.softpatch", edit_header=lambda h: h.__setitem__("format_version", version))
    with pytest.raises(ValueError, match="format_version"):
        load_model(path, device="cpu")


@pytest.mark.parametrize("edit, fragment", [
    (lambda h: h.pop("backbone_spec"), "no backbone spec"),
    (lambda h: h.__setitem__("threshold", float("nan")), "threshold"),
    (lambda h: h.__setitem__("embed_dim", 0), "embed_dim"),
    (lambda h: h["report"].__setitem__("names", []), "training report"),
    (lambda h: h.__setitem__("config", {"coreset_ratio": 7}), "stored config does not fit"),
    (lambda h: h.__setitem__("model_type", "isolation_forest"), "unknown model type"),
])
def test_bad_headers_are_refused_with_one_line(saved, tmp_path, edit, fragment):
    path = _rewrite(saved, tmp_path / "h.softpatch", edit_header=edit)
    with pytest.raises(ValueError, match=fragment) as info:
        load_model(path, device="cpu")
    assert "\n" not in str(info.value)


def test_inconsistent_tensors_are_refused(saved, tmp_path):
    def shrink(t):
        t["cls_bank.source_image"] = t["cls_bank.source_image"][:-1].clone()

    with pytest.raises(ValueError, match="cls bank source images"):
        load_model(_rewrite(saved, tmp_path / "s.softpatch", edit_tensors=shrink), device="cpu")

    def negative(t):
        t["cls_bank.weights"] = -t["cls_bank.weights"]

    with pytest.raises(ValueError, match="cls bank weights"):
        load_model(_rewrite(saved, tmp_path / "w.softpatch", edit_tensors=negative), device="cpu")


def test_truncated_files(saved, tmp_path):
    raw = saved.read_bytes()
    for keep in (0, 7, 100, len(raw) // 2, len(raw) - 1):
        path = tmp_path / f"cut_{keep}.softpatch"
        path.write_bytes(raw[:keep])
        with pytest.raises(ValueError):
            load_model(path, device="cpu")


def test_edited_backbone_spec_is_refused(saved, tmp_path):
    # same embedding size, other layers: the checksum (and the fingerprint) catch it
    def edit(h):
        h["backbone_spec"]["layers"] = ["layer1", "layer3"]

    with pytest.raises(ValueError, match="checksum"):
        load_model(_rewrite(saved, tmp_path / "e.softpatch", edit_header=edit, fix_checksum=False), device="cpu")
    with pytest.raises(ValueError, match="backbone weights differ"):
        load_model(_rewrite(saved, tmp_path / "f.softpatch", edit_header=edit), device="cpu")


def test_swapped_weights_file_is_refused_naming_both_fingerprints(data, tmp_path):
    import timm

    torch.manual_seed(1)
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "a.pth")
    torch.manual_seed(2)
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "b.pth")
    options = dict(FAST, pretrained=True, weights=str(tmp_path / "a.pth"))
    model = PatchCore(**options).fit(data[0])
    model.save(tmp_path / "m.softpatch")
    with pytest.raises(ValueError, match=r"backbone weights differ .*fitted: [0-9a-f]{16}, now: [0-9a-f]{16}"):
        load_model(tmp_path / "m.softpatch", device="cpu", weights=tmp_path / "b.pth")
    # the right file under another name: accepted (a moved model with its weights)
    os.replace(tmp_path / "a.pth", tmp_path / "moved.pth")
    with pytest.raises(FileNotFoundError, match="--weights FILE"):
        load_model(tmp_path / "m.softpatch", device="cpu")
    loaded = load_model(tmp_path / "m.softpatch", device="cpu", weights=tmp_path / "moved.pth")
    np.testing.assert_array_equal(loaded.score(data[1]), model.score(data[1]))


def test_relative_weights_path_is_stored_resolved(data, tmp_path, monkeypatch):
    import timm

    torch.manual_seed(1)
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path)
    model = PatchCore(**dict(FAST, pretrained=True, weights="w.pth")).fit(data[0])
    assert model.config["weights"] == str(tmp_path / "w.pth")
    model.save(tmp_path / "m.softpatch")
    monkeypatch.chdir("/")
    assert np.isfinite(load_model(tmp_path / "m.softpatch", device="cpu").score(data[1])).all()


def test_model_file_mode_follows_umask(saved):
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o666 & ~mask


# ------------------------------------------------------------------ degenerate training sets
def test_identical_images_are_fitted_once(data):
    img = data[0][0]
    same = np.stack([img] * 9)
    with pytest.raises(ValueError, match="at least 2 distinct training images.*got 1 distinct of 9"):
        PatchCore(**FAST).fit(same)
    mixed = np.concatenate([np.stack([img] * 6), data[0][1:9]])  # 6 copies + 8 others
    model = SoftPatch(**FAST).fit(mixed)
    assert model.fit_info_["n_images"] == 14 and model.fit_info_["n_distinct_images"] == 9
    rep = model.training_report()
    assert len(rep) == 14 and np.all(rep.scores[:6] == rep.scores[0])
    assert np.isfinite(model.threshold) and model.threshold > 0


def test_tiny_patch_grid_is_refused_with_the_size_needed():
    tiny = np.random.default_rng(0).integers(0, 255, (8, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"1x1 patch grid.*at least 17x17 pixels"):
        PatchCore(**dict(FAST, resize=None, crop=None)).fit(tiny)


def test_one_image_is_refused(data):
    with pytest.raises(ValueError, match="at least 2 distinct training images"):
        PatchCore(**FAST).fit(data[0][:1])


def test_kcenter_never_repeats_an_index():
    x = np.repeat(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), 5, axis=0)  # 3 distinct points
    for fn in (ops.kcenter_greedy, ops.kcenter_greedy_approx):
        try:
            idx = np.asarray(fn(x, 6))
        except ValueError as exc:
            assert "distinct" in str(exc)
            continue
        assert len(set(idx.tolist())) == len(idx)


def test_knn_refuses_negative_weights():
    q = np.zeros((2, 3), np.float32)
    bank = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="weights"):
        ops.knn(q, bank, 1, weights=np.array([1, -1, 1, 1], np.float32))


# ------------------------------------------------------------------ runs that lose nothing
def test_unwritable_fit_output_fails_before_training(data, tmp_path, capsys):
    write_images(tmp_path / "train", data[0])
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")  # unwritable even for root
    code = cli.main(["fit", str(tmp_path / "train"), "--out", str(blocker / "m.softpatch"), *TINY_CLI])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write" in err and err.count("\n") == 1
    assert "Fitting" not in err and blocker.read_text().startswith("a file")
    code = cli.main(["fit", str(tmp_path / "train"), "--out", str(tmp_path / "m.softpatch"),
                     "--report", str(blocker / "r.csv"), *TINY_CLI])
    assert code == 2 and "training report" in capsys.readouterr().err
    assert not (tmp_path / "m.softpatch").exists()


def test_predict_replaces_old_outputs_and_skips_or_fails_on_corrupt_images(data, tmp_path):
    model = PatchCore(**FAST).fit(data[0])
    good = write_images(tmp_path / "imgs", data[1])
    out = tmp_path / "out"
    first = predict_to_folder(model, good, out, chunk=2)
    assert len(list((out / "overlays").iterdir())) == 6 and first.n_errors == 0
    (out / "notes.txt").write_text("user file")  # not ours: must survive
    corrupt = tmp_path / "imgs" / "zz_corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    paths = good[:3] + [str(corrupt)] + good[3:4]
    before = (out / "predictions.csv").read_bytes()
    with pytest.raises(ValueError, match="corrupt or unreadable image.*zz_corrupt.png"):
        predict_to_folder(model, paths, out, chunk=2)
    # a failed run leaves the previous results exactly as they were, and no staging folder
    assert (out / "predictions.csv").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "overlays", "predictions.csv", "predictions.json"]
    result = predict_to_folder(model, paths, out, chunk=2, on_error="skip")
    assert result.n_errors == 1 and len(result.rows) == 5
    bad = [r for r in result.rows if r["verdict"] == "error"]
    assert bad[0]["path"] == str(corrupt) and "corrupt or unreadable" in bad[0]["error"] and bad[0]["score"] is None
    assert len(list((out / "overlays").iterdir())) == 4  # stale overlays of the first run are gone
    assert (out / "notes.txt").read_text() == "user file"
    csv_text = (out / "predictions.csv").read_text()
    assert "zz_corrupt" in csv_text and "error" in csv_text.splitlines()[0]


def test_huge_image_overlay_is_bounded(data, tmp_path):
    model = PatchCore(**FAST).fit(data[0])
    big = Image.fromarray(data[1][0]).resize((3000, 2400))
    big.save(tmp_path / "big.png")
    res = predict_to_folder(model, [str(tmp_path / "big.png")], tmp_path / "out")
    with Image.open(res.rows[0]["overlay"]) as img:
        assert max(img.size) == 2048 and abs(img.size[0] / img.size[1] - 3000 / 2400) < 0.01


def test_mixed_sizes_without_resize_is_one_line_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_images(tmp_path / "a", [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8) for _ in range(4)])
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a" / "odd.png")
    code = cli.main(["fit", str(tmp_path / "a"), "--out", str(tmp_path / "m.softpatch"), "--model", "patchcore",
                     "--backbone", "resnet18", "--no-pretrained", "--resize", "none", "--crop", "none",
                     "--batch-size", "1", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "different sizes" in err and "--resize" in err and err.count("\n") == 1


def test_a_package_without_its_compiled_module_says_so(tmp_path, monkeypatch):
    # a copy of the package without _core, under another name (so no installed copy answers)
    import importlib
    import shutil

    import softpatch_cuda

    src = Path(softpatch_cuda.__file__).parent
    shutil.copytree(src, tmp_path / "unbuilt_softpatch", ignore=shutil.ignore_patterns("_core*", "__pycache__"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="compiled module _core is missing.*never built.*pip install") as info:
        importlib.import_module("unbuilt_softpatch")
    # one message, not chained onto Python's misleading "partially initialized ... circular import"
    assert "circular" not in str(info.value) and info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.slow  # a fresh interpreter
def test_running_an_unbuilt_checkout_prints_the_helpful_line_alone(tmp_path):
    """``python -m softpatch_cuda`` inside an unbuilt source tree (issue 17, item 13): one line
    'softpatch: error: ...' and exit code 2, no tracebacks."""
    import os
    import shutil
    import subprocess
    import sys

    import softpatch_cuda

    src = Path(softpatch_cuda.__file__).parent
    shutil.copytree(src, tmp_path / "unbuilt_softpatch", ignore=shutil.ignore_patterns("_core*", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "unbuilt_softpatch", "fit", "x"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("softpatch: error: unbuilt_softpatch's compiled module _core is "
                                                   "missing"), proc.stderr
    assert "Traceback" not in proc.stderr and "circular" not in proc.stderr
