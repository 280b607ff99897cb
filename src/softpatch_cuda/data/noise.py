"""Noisy-training protocol of the SoftPatch / SoftPatch+ papers.

A noise ratio r moves round(r * |train|) anomalous test images (drawn with a seed)
into the training set. In the *no-overlap* setting (default, the papers' main one)
they are removed from the test set; with *overlap* they stay there too. The chosen
images are recorded in a :class:`NoiseRecord` (JSON) so that a run can be repeated
exactly, even if the dataset listing or the random generator changes later.

Added training samples keep label 1 and their defect type, for bookkeeping only
(training report vs truth); the models never see labels.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .datasets import DatasetSplit, Sample
from .._validation import is_int, is_number

logger = logging.getLogger(__name__)

_RECORD_FIELDS = ("dataset", "category", "ratio", "seed", "overlap", "added")
_OPTIONAL_FIELDS = ("rounding",)  # absent in records written before 0.2: "round"
ROUNDINGS = ("round", "floor")


@dataclass
class NoiseRecord:
    """Which anomalous test images were added to the training set, and how."""

    dataset: str
    category: str
    ratio: float
    seed: int
    overlap: bool
    added: list[str] = field(default_factory=list)  # Sample.path of each added image, in draw order
    rounding: str = "round"  # how ratio x |train| became a count (see noise_count)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["added"] = list(self.added)
        if d["rounding"] == "round":  # the default: records stay readable by 0.1
            del d["rounding"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseRecord":
        if not isinstance(d, dict):
            raise TypeError(f"noise record must be a dict, got {type(d).__name__}")
        missing = [k for k in _RECORD_FIELDS if k not in d]
        unknown = sorted(set(d) - set(_RECORD_FIELDS) - set(_OPTIONAL_FIELDS))
        if missing or unknown:
            raise ValueError(f"noise record: missing fields {missing}, unknown fields {unknown}")
        added = d["added"]
        if not isinstance(added, list) or not all(isinstance(p, str) for p in added):
            raise ValueError("noise record: 'added' must be a list of path strings")
        if not isinstance(d["overlap"], bool):
            raise ValueError(f"noise record: 'overlap' must be true/false, got {d['overlap']!r}")
        _check_ratio(d["ratio"])
        _check_seed(d["seed"])
        rounding = _check_rounding(d.get("rounding", "round"))
        return cls(str(d["dataset"]), str(d["category"]), float(d["ratio"]), int(d["seed"]), d["overlap"], list(added),
                   rounding)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.parent and not path.parent.is_dir():
            raise FileNotFoundError(f"folder for the noise record does not exist: {path.parent}")
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NoiseRecord":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"noise record not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"noise record {path} is not valid JSON ({exc})") from exc
        return cls.from_dict(data)


def _check_ratio(ratio: object) -> float:
    if not is_number(ratio):
        raise TypeError(f"noise ratio must be a number, got {ratio!r}")
    ratio = float(ratio)
    if not math.isfinite(ratio) or ratio < 0.0 or ratio >= 1.0:
        raise ValueError(f"noise ratio must be in [0, 1), got {ratio}")
    return ratio


def _check_seed(seed: object) -> int:
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_rounding(rounding: object) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
    return str(rounding)


def noise_count(ratio: float, n_train: int, rounding: str = "round") -> int:
    """round(ratio * n_train), halves rounded up (Python's round() would send 2.5 to 2), or
    floor(ratio * n_train) (``rounding="floor"``: the authors' code, ``int(noise * len)``).
    The small epsilon absorbs float error such as 0.1 * 25 = 2.5000000000000004 or 2.4999..."""
    if rounding == "floor":
        return int(math.floor(ratio * n_train + 1e-9))
    return int(math.floor(ratio * n_train + 0.5 + 1e-9))


def _check_clean(split: DatasetSplit) -> None:
    if not isinstance(split, DatasetSplit):
        raise TypeError(f"split must be a DatasetSplit, got {type(split).__name__}")
    if any(s.label for s in split.train):
        raise ValueError(
            f"{split.dataset}/{split.category}: the training set already holds anomalous samples "
            "(noise applied twice?); start from the clean split"
        )
    if not split.train:
        raise ValueError(f"{split.dataset}/{split.category}: the training set is empty")


def _build(split: DatasetSplit, chosen: list[Sample], overlap: bool) -> DatasetSplit:
    chosen_paths = {s.path for s in chosen}
    test = list(split.test) if overlap else [s for s in split.test if s.path not in chosen_paths]
    return DatasetSplit(split.dataset, split.category, list(split.train) + chosen, test)


def apply_noise(
    split: DatasetSplit, ratio: float, seed: int = 0, overlap: bool = False, rounding: str = "round"
) -> tuple[DatasetSplit, NoiseRecord]:
    """Add round(ratio * len(train)) anomalous test images (seeded draw) to the training
    set (``rounding="floor"``: floor, as the authors' code). overlap=False removes them
    from the test set. Returns a new split (the input is not modified) and the record of
    what was added. ratio=0 gives an unchanged copy."""
    _check_clean(split)
    ratio = _check_ratio(ratio)
    seed = _check_seed(seed)
    rounding = _check_rounding(rounding)
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be a bool, got {overlap!r}")
    count = noise_count(ratio, len(split.train), rounding)
    anomalous = [s for s in split.test if s.label == 1]
    if count > len(anomalous):
        raise ValueError(
            f"{split.dataset}/{split.category}: noise ratio {ratio} needs {count} anomalous images "
            f"(round({ratio} * {len(split.train)} training images)) but the test set has only "
            f"{len(anomalous)} available"
        )
    if count and not overlap and count == len(anomalous):
        logger.warning(
            "%s/%s: all %d anomalous test images go to training; the no-overlap test set has none left",
            split.dataset, split.category, count,
        )
    # The draw depends only on (seed, number of anomalous test images): sorted readers keep it stable.
    order = np.random.default_rng(seed).permutation(len(anomalous))[:count]
    chosen = [anomalous[i] for i in order]
    record = NoiseRecord(split.dataset, split.category, ratio, seed, overlap, [s.path for s in chosen], rounding)
    logger.info(
        "%s/%s: noise ratio %.3g -> %d anomalous images added to %d training images (%s)",
        split.dataset, split.category, ratio, count, len(split.train), "overlap" if overlap else "no overlap",
    )
    return _build(split, chosen, overlap), record


def _path_key(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def apply_noise_record(split: DatasetSplit, record: NoiseRecord) -> DatasetSplit:
    """Replay a saved record on the clean `split`: the same images are added (and, without
    overlap, removed from the test set). Errors when the record does not fit the split."""
    if not isinstance(record, NoiseRecord):
        raise TypeError(f"record must be a NoiseRecord, got {type(record).__name__}")
    _check_clean(split)
    where = f"noise record for {record.dataset}/{record.category}"
    if (record.dataset, record.category) != (split.dataset, split.category):
        raise ValueError(f"{where} does not match the split {split.dataset}/{split.category}")
    expected = noise_count(record.ratio, len(split.train), record.rounding)
    if expected != len(record.added):
        raise ValueError(
            f"{where}: it lists {len(record.added)} images but ratio {record.ratio} of this split's "
            f"{len(split.train)} training images is {expected}; the training set has changed"
        )
    if len(set(map(_path_key, record.added))) != len(record.added):
        raise ValueError(f"{where}: it lists the same image more than once")
    by_key = {_path_key(s.path): s for s in split.test if s.label == 1}
    missing_files = [p for p in record.added if not os.path.exists(p)]
    if missing_files:
        raise FileNotFoundError(
            f"{where}: {len(missing_files)} recorded images no longer exist, e.g. {', '.join(missing_files[:3])}"
        )
    not_in_split = [p for p in record.added if _path_key(p) not in by_key]
    if not_in_split:
        raise ValueError(
            f"{where}: {len(not_in_split)} recorded images are not anomalous test images of this split, "
            f"e.g. {', '.join(not_in_split[:3])}"
        )
    chosen = [by_key[_path_key(p)] for p in record.added]
    return _build(split, chosen, record.overlap)
