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


def _relabel(path, out, header_change=None, tensors_change=None):
    """Rewrite a model file with its header / tensors changed (and nothing recomputed)."""
    from safetensors.numpy import save_file as save_numpy

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a version 1 source file: no checksum
        tensors, header = read_model_file(path, framework="np")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    if header_change:
        header = header_change(header)
    if tensors_change:
        tensors = tensors_change(tensors)
    save_numpy(tensors, str(out), metadata={METADATA_KEY: json.dumps(header)})
    return out


def _damage_bank(tensors):
    bank = tensors["cls_bank.features"]
    bank[0, :192] = -bank[0, :192]  # 768 bytes of one bank row
    return tensors


def test_a_downgraded_format_version_does_not_bypass_the_checksum(data, tmp_path):
    """Issue 17, item 9: 'format_version': 1 (no checksum before version 2) used to skip
    the checksum, so a damaged bank was used silently."""
    path = tmp_path / "m.softpatch"
    SoftPatch(**FAST).fit(data[0]).save(path)
    # the checksum kept: it covers the version field too, and the bank
    relabelled = _relabel(path, tmp_path / "v1.softpatch", lambda h: dict(h, format_version=1), _damage_bank)
    with pytest.raises(ValueError, match="damaged: its checksum does not match"):
        load_model(relabelled, device="cpu")
    with pytest.raises(ValueError, match="damaged: its checksum does not match"):
        read_model_file(_relabel(path, tmp_path / "v1-only.softpatch", lambda h: dict(h, format_version=1)))
    # the checksum removed as well: the file holds what version 1 never wrote
    stripped = _relabel(path, tmp_path / "v1-stripped.softpatch",
                        lambda h: {k: v for k, v in dict(h, format_version=1).items() if k != "checksum"}, _damage_bank)
    with pytest.raises(ValueError, match="says model format version 1 but holds .*which version 1 files never had"):
        load_model(stripped, device="cpu")
    with pytest.raises(ValueError, match="says model format version 1"):
        read_model_file(stripped, framework="np")


def test_a_genuine_version_1_file_loads_with_a_warning(data, tmp_path):
    """Version 1 (0.1) files have no checksum: they load, verified as far as they can be
    (types, shapes, ranges), with a warning that damage cannot be detected."""
    from softpatch_cuda.serialization import V1_HEADER_KEYS

    train, test = data
    model = PatchCore(**FAST).fit(train)
    path = tmp_path / "m.softpatch"
    model.save(path)

    def as_v1(header):
        v1 = {k: v for k, v in header.items() if k in V1_HEADER_KEYS}
        v1["backbone_spec"] = {k: v for k, v in header["backbone_spec"].items() if k != "fingerprint"}
        return dict(v1, format_version=1)

    old = _relabel(path, tmp_path / "v1.softpatch", as_v1)
    with pytest.warns(UserWarning, match="format version 1 file: it has no checksum"):
        loaded = load_model(old, device="cpu")
    np.testing.assert_array_equal(loaded.predict(test).scores, model.predict(test).scores)
    # still checked as far as it can be: a bank row of NaN is refused
    def nan_row(tensors):
        tensors["cls_bank.features"][0] = np.nan
        return tensors

    broken = _relabel(old, tmp_path / "v1-nan.softpatch", tensors_change=nan_row)
    with pytest.warns(UserWarning, match="no checksum"), pytest.raises(ValueError, match="NaN or infinite"):
        load_model(broken, device="cpu")
