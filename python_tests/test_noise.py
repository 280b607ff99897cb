"""Noisy-training protocol: counts, seeded determinism, overlap / no-overlap, JSON records, replay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softpatch_cuda.data.datasets import DatasetSplit, Sample, load_mvtec
from softpatch_cuda.data.noise import NoiseRecord, apply_noise, apply_noise_record, noise_count


def _split(n_train: int = 20, n_bad: int = 8, n_good_test: int = 3, files: Path | None = None) -> DatasetSplit:
    def path(name: str) -> str:
        if files is None:
            return f"/data/cat/{name}"
        p = files / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p)
        return str(p)

    train = [Sample(path(f"train/good/{i:03d}.png"), 0, "good") for i in range(n_train)]
    test = [Sample(path(f"test/good/{i:03d}.png"), 0, "good") for i in range(n_good_test)]
    test += [
        Sample(path(f"test/{'crack' if i % 2 else 'hole'}/{i:03d}.png"), 1, "crack" if i % 2 else "hole", f"/m/{i}.png")
        for i in range(n_bad)
    ]
    return DatasetSplit("mvtec", "cat", train, test)


def test_noise_count_rounds_half_up():
    assert noise_count(0.1, 20) == 2
    assert noise_count(0.1, 25) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert noise_count(0.1, 15) == 2  # 1.5000000000000002
    assert noise_count(0.1, 14) == 1
    assert noise_count(0.0, 100) == 0
    assert noise_count(0.3, 5) == 2  # 1.5


def test_ratio_zero_is_the_clean_split():
    split = _split()
    noisy, record = apply_noise(split, 0.0, seed=5)
    assert noisy.train == split.train and noisy.test == split.test
    assert noisy is not split and noisy.train is not split.train
    assert record.added == [] and record.ratio == 0.0


def test_no_overlap_moves_images():
    split = _split()
    before = (list(split.train), list(split.test))
    noisy, record = apply_noise(split, 0.2, seed=1)
    assert (split.train, split.test) == before  # input untouched
    assert len(record.added) == 4
    added = noisy.train[20:]
    assert [s.path for s in added] == record.added
    assert all(s.label == 1 and s.defect_type in ("crack", "hole") and s.mask_path for s in added)
    assert noisy.train[:20] == split.train
    assert len(noisy.test) == len(split.test) - 4
    assert not set(record.added) & {s.path for s in noisy.test}
    assert {s.path for s in noisy.test} | set(record.added) == {s.path for s in split.test}
    assert (record.dataset, record.category, record.seed, record.overlap) == ("mvtec", "cat", 1, False)


def test_overlap_keeps_test_set():
    split = _split()
    noisy, record = apply_noise(split, 0.2, seed=1, overlap=True)
    assert noisy.test == split.test
    assert len(noisy.train) == 24 and record.overlap
    # the same images as without overlap (the draw does not depend on the setting)
    assert record.added == apply_noise(split, 0.2, seed=1)[1].added


def test_seeded_determinism():
    split = _split(n_train=30, n_bad=20)
    a = apply_noise(split, 0.3, seed=7)[1].added
    assert a == apply_noise(split, 0.3, seed=7)[1].added
    draws = {tuple(apply_noise(split, 0.3, seed=s)[1].added) for s in range(6)}
    assert len(draws) > 1
    assert len(set(a)) == 9


def test_errors():
    split = _split(n_train=20, n_bad=3)
    with pytest.raises(ValueError, match=r"needs 4 anomalous images .* only 3 available"):
        apply_noise(split, 0.2)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="noise ratio must be in"):
            apply_noise(split, bad)
    with pytest.raises(TypeError, match="noise ratio must be a number"):
        apply_noise(split, "0.1")
    with pytest.raises(ValueError, match="seed"):
        apply_noise(split, 0.1, seed=-1)
    with pytest.raises(TypeError, match="overlap"):
        apply_noise(split, 0.1, overlap="yes")
    noisy, _ = apply_noise(split, 0.1)
    with pytest.raises(ValueError, match="already holds anomalous samples"):
        apply_noise(noisy, 0.1)
    with pytest.raises(TypeError, match="DatasetSplit"):
        apply_noise([], 0.1)
    with pytest.raises(ValueError, match="training set is empty"):
        apply_noise(DatasetSplit("x", "y", [], split.test), 0.1)


def test_all_anomalies_used_warns_but_works(caplog):
    split = _split(n_train=10, n_bad=2)
    noisy, record = apply_noise(split, 0.2)
    assert len(record.added) == 2 and not any(s.label for s in noisy.test)
    assert "none left" in caplog.text


def test_record_round_trip(tmp_path):
    split = _split(files=tmp_path / "cat")
    noisy, record = apply_noise(split, 0.15, seed=3)
    path = record.save(tmp_path / "noise.json")
    on_disk = json.loads(path.read_text())
    assert on_disk == {
        "dataset": "mvtec", "category": "cat", "ratio": 0.15, "seed": 3, "overlap": False, "added": record.added
    }
    loaded = NoiseRecord.load(path)
    assert loaded == record
    replayed = apply_noise_record(split, loaded)
    assert replayed.train == noisy.train and replayed.test == noisy.test
    assert NoiseRecord.from_dict(record.to_dict()) == record


def test_replay_uses_the_record_not_the_rng(tmp_path):
    split = _split(files=tmp_path / "cat")
    _, record = apply_noise(split, 0.1, seed=0)
    other = [s.path for s in split.test if s.label and s.path not in record.added][:2]
    hand = NoiseRecord("mvtec", "cat", 0.1, 0, True, other)
    replayed = apply_noise_record(split, hand)
    assert [s.path for s in replayed.train[20:]] == other
    assert replayed.test == split.test  # overlap from the record


def test_replay_matches_relative_and_absolute_paths(tmp_path, monkeypatch):
    root = tmp_path / "mvtec"
    for i in range(10):
        p = root / "bottle" / "train" / "good" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(p)
    for i in range(3):
        for sub, name in (("test/crack", f"{i:03d}.png"), ("ground_truth/crack", f"{i:03d}_mask.png")):
            p = root / "bottle" / sub / name
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(p)
    _, record = apply_noise(load_mvtec(root, "bottle"), 0.2, seed=2)
    monkeypatch.chdir(tmp_path)
    relative_split = load_mvtec("mvtec", "bottle")
    replayed = apply_noise_record(relative_split, record)
    assert len(replayed.train) == 12 and len(replayed.test) == 1


def test_replay_errors(tmp_path):
    split = _split(files=tmp_path / "cat")
    _, record = apply_noise(split, 0.1, seed=0)
    with pytest.raises(ValueError, match="does not match the split"):
        apply_noise_record(DatasetSplit("visa", "cat", split.train, split.test), record)
    with pytest.raises(ValueError, match="the training set has changed"):
        apply_noise_record(DatasetSplit("mvtec", "cat", split.train[:10], split.test), record)
    wrong = NoiseRecord("mvtec", "cat", 0.1, 0, False, [split.train[0].path, split.train[1].path])
    with pytest.raises(ValueError, match="not anomalous test images of this split"):
        apply_noise_record(split, wrong)
    dup = NoiseRecord("mvtec", "cat", 0.1, 0, False, [record.added[0]] * 2)
    with pytest.raises(ValueError, match="more than once"):
        apply_noise_record(split, dup)
    Path(record.added[0]).unlink()
    with pytest.raises(FileNotFoundError, match="no longer exist"):
        apply_noise_record(split, record)
    with pytest.raises(TypeError):
        apply_noise_record(split, record.to_dict())


def test_record_validation(tmp_path):
    good = NoiseRecord("mvtec", "cat", 0.1, 0, False, ["a"]).to_dict()
    with pytest.raises(ValueError, match="missing fields"):
        NoiseRecord.from_dict({k: v for k, v in good.items() if k != "seed"})
    with pytest.raises(ValueError, match="unknown fields"):
        NoiseRecord.from_dict({**good, "extra": 1})
    with pytest.raises(ValueError, match="added"):
        NoiseRecord.from_dict({**good, "added": "a"})
    with pytest.raises(ValueError, match="noise ratio"):
        NoiseRecord.from_dict({**good, "ratio": 2})
    with pytest.raises(ValueError, match="overlap"):
        NoiseRecord.from_dict({**good, "overlap": "no"})
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        NoiseRecord.load(bad_json)
    with pytest.raises(FileNotFoundError):
        NoiseRecord.load(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="folder for the noise record"):
        NoiseRecord("mvtec", "cat", 0.1, 0, False, []).save(tmp_path / "no" / "r.json")


def test_floor_rounding_as_the_authors_code(tmp_path):
    split = _split(n_train=25, n_bad=10, files=tmp_path)
    assert noise_count(0.1, 25) == 3 and noise_count(0.1, 25, "floor") == 2
    noisy, record = apply_noise(split, 0.1, seed=0, rounding="floor")
    assert len(record.added) == 2 and record.rounding == "floor"
    assert NoiseRecord.from_dict(record.to_dict()) == record
    replay = apply_noise_record(split, NoiseRecord.from_dict(record.to_dict()))
    assert [s.path for s in replay.train] == [s.path for s in noisy.train]
    old = {k: v for k, v in record.to_dict().items() if k != "rounding"}  # a 0.1 record
    assert NoiseRecord.from_dict(old).rounding == "round"
    with pytest.raises(ValueError, match="rounding"):
        apply_noise(split, 0.1, rounding="ceil")
