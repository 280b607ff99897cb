"""Memory banks (softpatch_cuda.memory_bank): the one bank-size rule (CoresetPlan) for a
single fit, a shard and the merge; removed patches never chosen; leave-images-out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softpatch_cuda import ops
from softpatch_cuda.memory_bank import CoresetPlan, MemoryBank, shard_ranges


def test_the_size_rule():
    plan = CoresetPlan(0.1)
    assert [plan.size(k) for k in (1, 9, 10, 11, 1000)] == [1, 1, 1, 2, 100]
    assert CoresetPlan(1.0).size(37) == 37
    assert CoresetPlan(0.1, oversample=2.0).shard_share(1) == 0.1  # one shard: its coreset is the bank
    assert CoresetPlan(0.1, oversample=2.0).shard_share(3) == pytest.approx(0.2)
    assert CoresetPlan(0.6, oversample=2.0).shard_share(3) == 1.0


def test_removed_patches_never_enter_the_bank():
    rng = np.random.default_rng(0)
    proj = torch.from_numpy(rng.standard_normal((200, 8)).astype(np.float32))
    proj[:10] += 20  # far outliers: greedy k-center would pick them first
    kept = torch.ones(200, dtype=torch.bool)
    kept[:10] = False
    selected = CoresetPlan(0.1).select(proj, kept, seed=0)
    assert len(selected) == 19 and not bool((selected < 10).any())
    everything = CoresetPlan(0.1).select(proj, torch.ones(200, dtype=torch.bool), seed=0)
    assert bool((everything < 10).any())
    assert CoresetPlan(1.0).select(proj, kept, seed=0).tolist() == list(range(10, 200))  # ratio 1: every kept row


def test_grouped_coreset_is_the_union_of_per_group_greedy_selections():
    assert shard_ranges(100, 10, None) == [(0, 100)]
    assert shard_ranges(100, 10, 100) == [(0, 100)]
    assert shard_ranges(100, 10, 35) == [(0, 20), (20, 50), (50, 80), (80, 100)]  # whole images, even
    assert shard_ranges(100, 10, 5) == [(a, a + 10) for a in range(0, 100, 10)]  # at least one image
    rng = np.random.default_rng(0)
    proj = torch.from_numpy(rng.normal(size=(120, 8)).astype(np.float32))
    kept = torch.ones(120, dtype=torch.bool)
    kept[::7] = False
    plan = CoresetPlan(0.2, shard_patches=50)
    got = plan.select(proj, kept, seed=3, patches_per_image=10)
    want = []
    for group, (a, b) in enumerate(shard_ranges(120, 10, 50)):
        m = plan.size(int(kept[a:b].sum()))
        want += (np.asarray(ops.kcenter_greedy_approx(proj[a:b], m, n_anchors=10, seed=3 + group,
                                                      sample_weight=kept[a:b].float())) + a).tolist()
    assert got.tolist() == want and all(bool(kept[i]) for i in got)
    single = CoresetPlan(0.2).select(proj, kept, seed=3)  # no groups: exactly one greedy pass
    ref = ops.kcenter_greedy_approx(proj, CoresetPlan(0.2).size(int(kept.sum())), n_anchors=10, seed=3,
                                    sample_weight=kept.float())
    assert single.tolist() == np.asarray(ref).tolist()


def test_a_shard_of_several_keeps_its_oversampled_share_with_its_own_seed():
    proj = torch.from_numpy(np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32))
    kept = torch.ones(300, dtype=torch.bool)
    plan = CoresetPlan(0.1, oversample=2.0)
    alone = plan.select_in_shard(proj, kept, 5, 1, shard=0, shards=1)
    assert alone.tolist() == plan.select(proj, kept, 5).tolist() and len(alone) == 30
    second = plan.select_in_shard(proj, kept, 5, 1, shard=1, shards=3)
    assert second.tolist() == plan.select(proj, kept, 5 + 7919 * 2, share=0.2).tolist() and len(second) == 60


def test_reduce_runs_the_second_pass_per_group_down_to_the_size_of_what_the_shards_kept():
    rng = np.random.default_rng(2)
    parts = [torch.from_numpy(rng.normal(size=(n, 8)).astype(np.float32)) for n in (40, 30, 50)]
    plan = CoresetPlan(0.1, shard_patches=80)  # groups: [0, 1] (70 rows), [2] (50 rows)
    rows = plan.reduce(parts, [200, 150, 250], seed=4)
    union = torch.cat(parts[:2])
    first = np.sort(np.asarray(ops.kcenter_greedy_approx(union, plan.size(350), n_anchors=10, seed=4)))
    second = np.sort(np.asarray(ops.kcenter_greedy_approx(parts[2], plan.size(250), n_anchors=10, seed=5))) + 70
    assert rows.tolist() == first.tolist() + second.tolist()
    assert CoresetPlan(0.5).reduce(parts[:1], [100], seed=0).tolist() == list(range(40))  # size >= union: all


def test_leaving_images_out_and_an_empty_bank():
    bank = MemoryBank(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.tensor([2.0, 1.0]), torch.tensor([0, 1]))
    q = torch.tensor([[0.0, 3.0], [9.0, 0.0]])
    assert bank.without_images(np.array([1])).score(q)[0].tolist() == pytest.approx([6.0, 18.0])
    on_numpy = MemoryBank(bank.features.numpy(), bank.weights.numpy(), bank.source_image.numpy())
    assert on_numpy.without_images([1]).score(q.numpy())[0].tolist() == pytest.approx([6.0, 18.0])
    with pytest.raises(ValueError, match="empty memory bank"):
        bank.without_images(np.array([0, 1]))
