"""save / load: one safetensors file, identical scores after a round trip, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from softpatch_cuda import PatchCore, SoftPatch, SoftPatchPlus, load_model
from softpatch_cuda.serialization import FORMAT_VERSION, METADATA_KEY, read_model_file, write_model_file
from builders import FAST, object_set


@pytest.fixture(scope="module")
def data():
    train, _ = object_set(10, 1, seed=3)
    test, _ = object_set(3, 3, seed=4)
    return train, test


@pytest.mark.parametrize("cls", [PatchCore, SoftPatch, SoftPatchPlus])
def test_round_trip_identical(cls, data, tmp_path):
    train, test = data
    model = cls(**FAST).fit(train)
    model.threshold = model.threshold * 1.5  # overrides are saved too
    before = model.predict(test)
    path = tmp_path / "sub" / "model.safetensors"
    model.save(path)
    loaded = load_model(path, device="cpu")
    assert type(loaded) is cls and loaded.config == dict(model.config, device="cpu")
    after = loaded.predict(test)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps, after.maps)
    assert after.threshold == before.threshold
    np.testing.assert_array_equal(before.is_anomalous, after.is_anomalous)
    r0, r1 = model.training_report(), loaded.training_report()
    assert r0.names == r1.names and r0.threshold == r1.threshold
    np.testing.assert_array_equal(r0.scores, r1.scores)
    np.testing.assert_array_equal(r0.flagged, r1.flagged)
    assert loaded.fit_info_["alignment"] == model.fit_info_["alignment"]
    assert cls.load(path, device="cpu").threshold == model.threshold


def test_file_is_safetensors_with_json_header(data, tmp_path):
    model = SoftPatchPlus(**FAST).fit(data[0])
    path = tmp_path / "m.safetensors"
    model.save(path)
    tensors, header = read_model_file(path)
    assert header["format"] == "softpatch_cuda.model" and header["format_version"] == FORMAT_VERSION
    assert header["model_type"] == "softpatch_plus" and header["config"]["seg_threshold"] == model.config["seg_threshold"]
    assert header["backbone_spec"]["backbone"] == "resnet18"
    assert {"projection", "cls_bank.features", "cls_bank.weights", "seg_bank.features", "seg_bank.weights",
            "report.scores"} <= set(tensors)
    assert not any("conv" in k or "layer" in k for k in tensors)  # no backbone weights
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    with pytest.raises(ValueError, match="holds a SoftPatchPlus"):
        SoftPatch.load(path, device="cpu")


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "new.safetensors"
    write_model_file(path, {"projection": torch.zeros(2, 2)}, {"model_type": "softpatch"})
    tensors, header = read_model_file(path)
    header["format_version"] = FORMAT_VERSION + 1
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(header)})
    with pytest.raises(ValueError, match="newer"):
        load_model(path)


def test_foreign_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a model at all")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_model(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a softpatch_cuda model"):
        load_model(foreign)
    bad_json = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(3)}, str(bad_json), metadata={METADATA_KEY: "{oops"})
    with pytest.raises(ValueError, match="corrupt"):
        load_model(bad_json)
    unknown = tmp_path / "unknown.safetensors"
    write_model_file(unknown, {"w": torch.zeros(1)}, {"model_type": "isolation_forest", "config": {}})
    with pytest.raises(ValueError, match="unknown model type"):
        load_model(unknown)
    with pytest.raises(ValueError, match="folder"):
        load_model(tmp_path)


def test_truncated_file(data, tmp_path):
    model = SoftPatch(**FAST).fit(data[0])
    path = tmp_path / "m.safetensors"
    model.save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError):
        load_model(path)
