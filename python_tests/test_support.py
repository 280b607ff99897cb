"""Leave-out support (denoise/support.py) and the support-aware bank score, against plain
numpy readings of their definitions."""

import numpy as np
import pytest
import torch

from softpatch_cuda.denoise import support as S
from softpatch_cuda.memory_bank import MemoryBank


def naive_supporters(rows, row_images, patches, patch_images, n_images, excluded, count):
    """Per row: the `count` nearest other, non-excluded images by their nearest patch."""
    d = np.sqrt(((rows[:, None, :].astype(np.float64) - patches[None, :, :]) ** 2).sum(-1))  # [m, M]
    out_img = np.full((len(rows), count), -1)
    out_d = np.full((len(rows), count), np.inf)
    for r in range(len(rows)):
        per = np.full(n_images, np.inf)
        np.minimum.at(per, patch_images, d[r])
        per[row_images[r]] = np.inf
        per[excluded] = np.inf
        order = np.argsort(per, kind="stable")[:count]
        ok = np.isfinite(per[order])
        out_img[r, : ok.sum()] = order[ok]
        out_d[r, : ok.sum()] = per[order][ok]
    return out_img, out_d


def image_set(n=12, p=20, d=16, seed=0, outliers=()):
    """n images of p patches from one Gaussian; images in `outliers` get one far patch."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p, d)).astype(np.float32)
    for i in outliers:
        x[i, 0] += 12.0 + rng.normal(size=d).astype(np.float32)  # a defect no other image shares
    patches = torch.from_numpy(x.reshape(n * p, d))
    images = torch.arange(n).repeat_interleave(p)
    return patches, images


@pytest.mark.parametrize("count,candidates", [(1, 64), (3, 64), (5, 6), (4, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_supporters_match_naive(count, candidates, seed):
    """Candidates + exact fallback (forced by few candidates) = the per-image minimum, any exclusion."""
    n = 9
    patches, images = image_set(n=n, p=15, d=12, seed=seed)
    rng = np.random.default_rng(seed + 5)
    rows_idx = torch.as_tensor(rng.choice(len(patches), size=40, replace=False))
    rows, row_images = patches[rows_idx], images[rows_idx]
    exact = S.find_candidates(rows, row_images, patches, images, n, count=candidates, dims=12)  # full rank
    reduced = S.find_candidates(rows, row_images, patches, images, n, count=candidates, dims=3)
    for excluded in (np.zeros(n, bool), np.isin(np.arange(n), [1, 4])):
        want_img, want_d = naive_supporters(rows.numpy(), row_images.numpy(), patches.numpy(), images.numpy(), n,
                                            excluded, count)
        got = S.supporters(exact, torch.as_tensor(excluded), count)
        np.testing.assert_allclose(got.distances.numpy(), want_d, rtol=1e-4, atol=1e-4)
        finite = np.isfinite(want_d)
        assert (got.images.numpy()[finite] == want_img[finite]).all()
        # candidates from a low-dimensional subspace may miss an image's nearest patch, never
        # invent a nearer one: each k-th support distance is at least the exact one
        approx = S.supporters(reduced, torch.as_tensor(excluded), count).distances.numpy()
        assert (approx >= want_d - 1e-4).all()


def test_row_support_distance_kth_not_excluded():
    rs = S.RowSupport(torch.tensor([[3, 1, 2, -1], [0, 2, 1, 3]]),
                      torch.tensor([[1.0, 2.0, 3.0, np.inf], [0.5, 0.7, 0.9, 1.1]]))
    assert rs.distance(1).tolist() == [1.0, 0.5]
    assert rs.distance(2).tolist() == pytest.approx([2.0, 0.7])
    ex = torch.tensor([False, True, False, True])  # images 1 and 3 vouch for nothing
    assert rs.distance(1, ex).tolist() == pytest.approx([3.0, 0.5])
    assert rs.distance(2, ex).tolist() == pytest.approx([np.inf, 0.7])
    assert S.unsupported_fill(rs.distance(2, ex)).tolist() == pytest.approx([0.7, 0.7])


def test_split_limit_numpy_reading():
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.normal(10, 1, 200), [30, 31, 32]])
    med = np.median(s)
    sigma = max((med - np.percentile(s, 25)) / 0.6745, S.SPLIT_SCALE_FLOOR * med)
    assert S.split_limit(s) == pytest.approx(med + S.SPLIT_FACTOR * sigma)
    assert S.split_limit(np.full(50, 3.0)) == pytest.approx(3.0 * (1 + S.SPLIT_FACTOR * S.SPLIT_SCALE_FLOOR))
    assert S.split_limit(np.array([1.0, 2.0])) == np.inf  # too few to split


def test_combined_evidence_numpy_reading():
    """Each evidence as (x - median) / lower-half sigma (floored), the two averaged."""
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.normal(5, 0.5, 100), [9.0, 12.0]])
    b = np.concatenate([rng.gamma(2.0, 1.0, 100), [2.0, 30.0]])
    present = np.ones(len(a), dtype=bool)
    present[5] = False  # an absent image does not count in the centre or the spread

    def z(x):
        ref = x[present]
        med = np.median(ref)
        sigma = max((med - np.percentile(ref, 25)) / 0.6745, S.SPLIT_SCALE_FLOOR * abs(med))
        return (x - med) / sigma

    np.testing.assert_allclose(S.combined_evidence(a, b, present), (z(a) + z(b)) / 2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(S.combined_evidence(a, None, present), z(a), rtol=1e-5, atol=1e-5)


def test_fusion_is_not_swamped_by_an_evidence_that_sees_nothing():
    """One evidence finds the planted images clearly (z = 16), the other is noise of any
    spread: the fused evidence still flags exactly them (a mean of ratios to the median
    was swamped by the wider one), and a clean set flags none. Averaging halves a signal
    only one evidence sees; the split then uses the spread of the mean."""
    rng = np.random.default_rng(2)
    n, planted = 200, [7, 50, 120, 160, 199]
    sees = rng.normal(1.0, 0.05, n)
    sees[planted] += 0.8
    present = np.ones(n, dtype=bool)
    for spread in (0.01, 0.3, 0.9):
        blind = np.abs(rng.normal(1.0, spread, n))
        fused = S.combined_evidence(blind, sees, present)
        assert set(np.flatnonzero(fused > S.split_limit(fused))) == set(planted)
        clean = S.combined_evidence(blind, rng.normal(1.0, 0.05, n), present)
        assert (clean > S.split_limit(clean)).sum() <= 1


def _support_all_rows(patches, images, n, k, spare=0):
    c = S.find_candidates(patches, images, patches, images, n)
    return S.leave_out_support(c, k, spare=spare)


def test_planted_images_are_flagged_and_lose_support():
    n, p = 30, 20
    planted = [3, 17, 25]
    patches, images = image_set(n=n, p=p, d=16, seed=2, outliers=planted)
    res = _support_all_rows(patches, images, n, k=1)
    assert set(np.flatnonzero(res.flagged)) == set(planted)
    # the defect patch of a planted image has no support: its distance to any other image is large
    defect_rows = torch.as_tensor([i * p for i in planted])
    normal = torch.ones(n * p, dtype=torch.bool)
    normal[defect_rows] = False
    assert float(res.support[defect_rows].min()) > 3 * float(res.support[normal].median())


def test_clean_set_scores_as_before():
    """Do no harm: on a clean set few images are flagged and fresh normal patches score
    (almost) as plain nearest-neighbour distances."""
    n, p, d = 40, 20, 16
    patches, images = image_set(n=n, p=p, d=d, seed=3)
    res = _support_all_rows(patches, images, n, k=2)
    assert res.flagged.sum() <= 0.05 * n
    assert torch.isfinite(res.support).all()
    fresh = torch.from_numpy(np.random.default_rng(30).normal(size=(500, d)).astype(np.float32))
    plain = MemoryBank(patches, None, images).score(fresh)[0]
    supported = MemoryBank(patches, None, images, support=S.unsupported_fill(res.support)).score(fresh)[0]
    change = (supported - plain) / plain
    assert float(change.median()) < 0.02 and float(change.mean()) < 0.05


def test_recurring_defect_needs_k_supporters():
    """The same defect in two planted images: with k = 1 each vouches for the other; with
    support_images = 2 a third image is needed, so the defect loses its support."""
    n, p, d = 30, 20, 16
    patches, images = image_set(n=n, p=p, d=d, seed=4)
    for i in (5, 6):
        patches[i * p] = torch.full((d,), 9.0) + 0.01 * i
    one = _support_all_rows(patches, images, n, k=1)
    two = _support_all_rows(patches, images, n, k=2)
    assert float(one.support[5 * p]) < 0.1  # vouched for by its twin
    assert float(two.support[5 * p]) > 5.0  # no second image has it
    assert two.flagged[[5, 6]].all()


def naive_bank_scores(q, feats, support, weights, squared):
    d = np.sqrt(((q[:, None, :].astype(np.float64) - feats[None]) ** 2).sum(-1))
    eff = np.maximum(d, support[None, :])
    if squared:
        eff = eff ** 2
    if weights is not None:
        eff = eff * weights[None, :]
    return eff.min(1), eff.argmin(1)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize("distance", ["l2", "squared_l2"])
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("search", ["exact", "pca"])
def test_support_aware_score_is_exact(framework, distance, with_weights, search):
    """min over EVERY row of w * max(d, support), on torch tensors and on numpy arrays (the
    torch-free predictor): queries copied from unsupported rows too (the memorised-defect
    case, where the nearest rows do not decide)."""
    rng = np.random.default_rng(7)
    m, d = 300, 24
    feats = rng.normal(size=(m, d)).astype(np.float32)
    support = rng.uniform(0.5, 4.0, size=m).astype(np.float32)
    support[:10] = 50.0  # unsupported rows
    weights = rng.uniform(1.0, 1.5, size=m).astype(np.float32) if with_weights else None
    q = np.concatenate([rng.normal(size=(60, d)), feats[:10] + 1e-3]).astype(np.float32)
    arr = torch.from_numpy if framework == "torch" else np.asarray
    bank = MemoryBank(arr(feats), None if weights is None else arr(weights), arr(np.arange(m)), distance, search,
                      arr(support))
    got, row = (np.asarray(x) for x in bank.score(arr(q)))
    want, want_row = naive_bank_scores(q, feats, support, weights, distance == "squared_l2")
    if search == "exact":
        np.testing.assert_allclose(got, want, rtol=2e-4)
        assert (row == want_row).mean() > 0.95  # ties aside
    else:  # candidates from the principal subspace: never below the exact minimum
        assert (got >= want * (1 - 2e-4)).all()
    # a copy of an unsupported row scores at least what leaving that row's image out would give
    assert (got[60:] > 1.0).all()


def test_without_images_takes_their_vouching_away():
    n, p = 20, 10
    patches, images = image_set(n=n, p=p, d=8, seed=9)
    c = S.find_candidates(patches, images, patches, images, n)
    res = S.leave_out_support(c, 1, spare=4)
    bank = MemoryBank(patches, None, images, support=S.unsupported_fill(res.support),
                      support_rows=S.BankSupport(res.rows, 1, torch.as_tensor(res.flagged)))
    left = torch.tensor([2, 7])
    sub = bank.without_images(left)
    excluded = torch.as_tensor(res.flagged).clone()
    excluded[left] = True
    want = S.unsupported_fill(res.rows.distance(1, excluded))[~torch.isin(images, left)]
    assert torch.equal(sub.support, want)
    assert (sub.source_image != 2).all() and (sub.source_image != 7).all()
