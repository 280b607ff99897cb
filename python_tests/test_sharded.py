"""The sharded fit (softpatch_cuda.scale.sharded): one shard is the single-process fit
for every model kind and setting, several shards give one ordinary model, the composable
coreset's covering bound, the memory budget chosen and refused before any work, the CLI
flags.

Random-weight resnet18 at 64 px on rendered objects: small and CPU-only.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from builders import FAST, TINY_CLI, object_set, write_images
from softpatch_cuda import PatchCore, SoftPatch, SoftPatchPlus, cli, load_model, ops
from softpatch_cuda.memory_bank import CoresetPlan
from softpatch_cuda.models import phases
from softpatch_cuda.scale import memory_plan
from softpatch_cuda.scale.memory_plan import parse_memory, plan_memory
from softpatch_cuda.scale.sharded import ShardJob, fit_sharded, plan_shards, run_shard

KINDS = [PatchCore, SoftPatch, SoftPatchPlus]
SETTINGS = list(itertools.product(["l2", "squared_l2"], ["max", "reweighted"], ["exact", "pca"], [1, "auto"]))


@pytest.fixture(scope="module")
def train():
    return list(object_set(16, 2, seed=11)[0])


@pytest.fixture(scope="module")
def test_set():
    return object_set(3, 3, seed=12)


def same_bank(a, b) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.source_image, b.source_image)
    assert (a.weights is None) == (b.weights is None)
    if a.weights is not None:
        assert torch.equal(a.weights, b.weights)
    assert (a.distance, a.search) == (b.distance, b.search)


@pytest.mark.parametrize("distance,image_score,search,threads", SETTINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_one_shard_is_the_single_process_fit(kind, distance, image_score, search, threads, train, test_set):
    options = dict(FAST, distance=distance, image_score=image_score, search=search, threads=threads)
    single = kind(**options).fit(train)
    sharded = fit_sharded(kind(**options), train)
    same_bank(single.state.cls_bank, sharded.state.cls_bank)
    same_bank(single.state.seg_bank, sharded.state.seg_bank)
    assert sharded.state.cls_bank.search == search  # the sharded fit used to drop it
    assert sharded.threshold == single.threshold and sharded.state.score_floor == single.state.score_floor
    ra, rb = single.training_report(), sharded.training_report()
    assert ra.names == rb.names and np.array_equal(ra.flagged, rb.flagged)
    np.testing.assert_array_equal(ra.scores, rb.scores)
    np.testing.assert_array_equal(ra.removed_fraction, rb.removed_fraction)
    a, b = single.predict(test_set[0]), sharded.predict(test_set[0])
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)


def test_every_phase_runs_under_the_models_thread_budget(train, monkeypatch):
    """The sharded fit used to ignore ``threads``: every phase's budget is the model's."""
    requested = []
    real = phases.thread_budget

    def recording(threads):
        requested.append(threads)
        return real(threads)

    monkeypatch.setattr(phases, "thread_budget", recording)
    fit_sharded(SoftPatch(**FAST, threads=1), train, shards=2)
    assert requested and set(requested) == {1}


def test_shards_give_one_ordinary_model(train, test_set, tmp_path):
    model = fit_sharded(SoftPatchPlus(**FAST), train, shards=2)
    info = model.fit_info_
    assert [s["images"] for s in info["sharding"]["shards"]] == [9, 9]
    n, (h, w) = len(train), info["grid"]
    for name, bank in (("cls", model.state.cls_bank), ("seg", model.state.seg_bank)):
        kept = n * h * w - info[f"{name}_removed"]
        assert len(bank) == CoresetPlan(model.settings.coreset_ratio).size(kept)  # the single-process fit's size
        assert info["sharding"]["union_rows"][name] > len(bank)  # the second pass reduced the union
        assert set(bank.source_image.tolist()) <= set(range(n))
    assert len(model.training_report()) == n
    model.save(tmp_path / "m.softpatch")
    again = load_model(tmp_path / "m.softpatch", device="cpu")
    np.testing.assert_array_equal(again.score(test_set[0]), model.score(test_set[0]))
    images, labels = test_set
    scores = model.score(images)
    assert scores[labels == 1].min() > scores[labels == 0].max()  # still finds the defects


def test_duplicates_across_shards_enter_the_bank_once(train):
    images = train[:9] + [train[0]] + train[9:17]  # image 9 duplicates image 0, in the other shard
    model = fit_sharded(PatchCore(**FAST), images, shards=2)
    assert model.fit_info_["sharding"]["cross_shard_duplicates"] == 1
    assert 9 not in set(model.state.cls_bank.source_image.tolist())
    report = model.training_report()
    assert len(report) == 18 and report.names[9] == "image_9"
    assert report.scores[9] == report.scores[0]
    h, w = model.fit_info_["grid"]
    assert len(model.state.cls_bank) == CoresetPlan(model.settings.coreset_ratio).size(17 * h * w)


def test_shards_below_the_discriminators_minimum_are_refused(train):
    with pytest.raises(ValueError, match=r"shards of 6 images are too small.*\['lof', 'gaussian'\].*at least 7"):
        fit_sharded(SoftPatchPlus(**FAST), train, shards=3)
    with pytest.raises(ValueError, match="at least 9 images per shard"):
        fit_sharded(SoftPatch(**FAST, lof_k=8), train, shard_size=6)


def test_plan_shards_is_balanced_and_checked():
    assert plan_shards(10, 2, shards=3) == [(0, 3), (3, 7), (7, 10)]
    assert plan_shards(10, 2, shard_size=4) == [(0, 3), (3, 7), (7, 10)]
    assert plan_shards(10, 2) == [(0, 10)]
    with pytest.raises(ValueError, match="either shards or shard_size"):
        plan_shards(10, 2, shards=2, shard_size=5)
    with pytest.raises(ValueError, match="shards must be a positive integer"):
        plan_shards(10, 2, shards=0)
    with pytest.raises(ValueError, match="12 shards for 10 training images"):
        plan_shards(10, 1, shards=12)


def test_composable_coreset_covers_within_the_sum_of_the_radii():
    """Every point is within (its shard's greedy radius + the merge pass's radius) of
    the bank -- the triangle inequality behind the 2x factor; holds only if the merge
    selects and gathers the right rows."""
    rng = np.random.default_rng(0)
    shards = [torch.from_numpy(rng.normal(size=(400, 8)).astype(np.float32)
                               + rng.normal(scale=3, size=(1, 8)).astype(np.float32)) for _ in range(3)]
    ratio, parts, radii = 0.05, [], []
    for s, x in enumerate(shards):
        idx = ops.kcenter_greedy_approx(x, int(2 * ratio * len(x)), seed=s)
        radii.append(float(ops.knn(x, x[idx], 1).distances.max()))
        parts.append(phases.BankPart(x[idx], x[idx], None, torch.arange(len(idx)) + 1000 * s,
                                     torch.ones(len(x), dtype=torch.int64), torch.arange(len(x)) + 1000 * s))
    everything = torch.cat(shards)
    union = torch.cat([p.features for p in parts])
    for group_rows in (None, 50):  # one merge pass, or one per group of shards
        rows = CoresetPlan(ratio, group_rows).reduce([p.projected for p in parts], [p.kept for p in parts], 0)
        bank = phases._gather(parts, rows, "features")
        r_merge = float(ops.knn(union, bank, 1).distances.max())
        covering = float(ops.knn(everything, bank, 1).distances.max())
        assert covering <= max(radii) + r_merge + 1e-4
        assert torch.equal(bank, union[rows])
        assert torch.equal(phases._gather(parts, rows, "image_ids"), torch.cat([p.image_ids for p in parts])[rows])
    assert len(CoresetPlan(ratio).reduce([p.projected for p in parts], [p.kept for p in parts], 0)) == \
        CoresetPlan(ratio).size(1200)


def test_parse_memory():
    assert parse_memory("4G") == 4 * 2**30
    assert parse_memory("512m") == 512 * 2**20
    assert parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert parse_memory(1000) == 1000
    for bad in ("4Q", "", "-1G", 0, True, "G"):
        with pytest.raises(ValueError, match="max_memory must be"):
            parse_memory(bad)


class _CountingModel:
    """Records every training image embed() sees: the budget check must not embed one."""

    def __init__(self, model, train):
        self.train_ids, self.seen = {id(x) for x in train}, 0
        original = model.embed

        def embed(images, desc="features"):
            self.seen += sum(id(x) in self.train_ids for x in images)
            return original(images, desc=desc)

        model.embed = embed


@pytest.fixture
def fixed_rss(monkeypatch):
    """The process's memory pinned (1 GiB, a batch peak of 100 MiB above it), so the plan is deterministic."""
    monkeypatch.setattr(memory_plan, "current_rss", lambda: 2**30)
    monkeypatch.setattr(memory_plan, "peak_rss_of", lambda fn: (fn(), 2**30 + 100 * 2**20))


def test_max_memory_refused_before_any_training_image_is_embedded(train, fixed_rss):
    model = SoftPatch(**FAST)
    counter = _CountingModel(model, train)
    with pytest.raises(ValueError, match=r"max_memory 100 MiB cannot be met: this process already holds 1.00 GiB"):
        fit_sharded(model, train, max_memory="100M")
    with pytest.raises(ValueError, match=r"max_memory 1.05 GiB cannot be met: .*embedding a batch of 8 takes 100 MiB"
                                         r".*the smallest shard \(7 images.*\['lof'\].*give at least 1\.1\d GiB"):
        fit_sharded(model, train, max_memory="1.05G")
    assert counter.seen == 0


def test_max_memory_chooses_the_shards(train, fixed_rss):
    plan = plan_memory(SoftPatch(**FAST), train, 64 * 2**30)
    assert plan.shard_size == len(train) and plan.grid == (8, 8) and plan.embed_dim == 384
    assert plan.baseline == 2**30 and plan.embed_batch == 100 * 2**20
    # room for a shard of 9 images (and the union of several shards), not for all 18 in one
    assert plan.need(len(train), sharded=False) > plan.need(9)
    model = fit_sharded(SoftPatch(**FAST), train, max_memory=plan.need(9) + plan.per_image // 2)
    assert model.fit_info_["memory_plan"]["shard_size"] == 9
    assert [s["images"] for s in model.fit_info_["sharding"]["shards"]] == [9, 9]
    model = fit_sharded(SoftPatch(**FAST), train, max_memory=plan.need(len(train), sharded=False))
    assert len(model.fit_info_["sharding"]["shards"]) == 1
    with pytest.raises(ValueError, match="give max_memory, or shards / shard_size"):
        fit_sharded(SoftPatch(**FAST), train, max_memory="8G", shards=2)


def test_run_shard_refuses_a_shard_of_too_few_distinct_images(train):
    model = SoftPatch(**FAST)
    job = ShardJob(phases.Shard(0, 2, 0), [train[0]] * 5 + train[1:4])  # 8 images, 4 distinct
    with pytest.raises(ValueError, match="shard 1 of 2 has 4 distinct images.*at least 7"):
        run_shard(model, job)


def test_cli_fit_with_shards_and_max_memory(train, tmp_path, capsys):
    folder = tmp_path / "train"
    write_images(folder, train)
    code = cli.main(["fit", str(folder), "--out", str(tmp_path / "s.softpatch"), "--shards", "2", *TINY_CLI])
    assert code == 0, capsys.readouterr().err
    model = load_model(tmp_path / "s.softpatch", device="cpu")
    assert len(model.fit_info_["sharding"]["shards"]) == 2
    code = cli.main(["fit", str(folder), "--out", str(tmp_path / "m.softpatch"), "--max-memory", "64G", *TINY_CLI])
    assert code == 0
    assert load_model(tmp_path / "m.softpatch", device="cpu").fit_info_["memory_plan"]["shard_size"] == 18
    for args, message in (
        (["--max-memory", "10Q"], "--max-memory must be a size"),
        (["--max-memory", "1M"], "max_memory 1 MiB cannot be met"),
        (["--max-memory", "8G", "--shards", "2"], "give --max-memory or --shards"),
        (["--shards", "0"], "--shards must be >= 1"),
        (["--shards", "4"], "shards of 4 images are too small"),
        (["--workers", "2"], "--workers needs --ray"),
        (["--ray", "not an address"], "not a Ray address"),
        (["--ray", "local", "--max-memory", "8G"], "--max-memory bounds a fit on this machine"),
    ):
        capsys.readouterr()
        code = cli.main(["fit", str(folder), "--out", str(tmp_path / "x.softpatch"), *TINY_CLI, *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "x.softpatch").exists()
