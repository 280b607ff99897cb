"""PatchCore, SoftPatch and SoftPatch+ detectors (ALGORITHM.md).

One pipeline, three settings:

* :class:`PatchCore`: no denoising, no soft weights. It still runs the default
  noise discriminator (LOF) for its :meth:`training_report`.
* :class:`SoftPatch`: one discriminator; the top ``noise_threshold`` fraction of
  patch outlier scores is excluded from the coreset -- by default only patches that
  are also robust outliers (``removal_mad``: above median + 3 MAD), so a clean set
  loses no rare normal patches; soft weights (``weight_mode="outlier"``: 1 for every
  inlier, score / outlier limit above it) multiply the nearest-neighbour distance at
  test time. ``removal_mad=None, weight_mode="median"`` is the paper's setting.
* :class:`SoftPatchPlus`: several discriminators fused by rank; a classification bank
  (``cls_threshold`` removed) scores images, a segmentation bank (``seg_threshold``
  removed) makes the maps.

Alignment (ALGORITHM.md 6b): ``alignment="auto"`` measures how well patches at the
same position match across images (see :func:`discriminators.alignment_statistic`)
and picks "position" (aligned objects), "window" or "global" (textures); the choice
and the statistic are in :attr:`fit_info_` and in saved files.

Unsupervised threshold: up to 16 training images not flagged by the training report
are scored against the memory bank *without their own patches* (as if unseen); the
threshold is ``median + 3 * 1.4826 * MAD`` of those scores. Override with
``model.threshold = x``.

Example:
    >>> model = SoftPatch(backbone="resnet18", pretrained=False, resize=64, crop=64)  # doctest: +SKIP
    >>> model.fit("train/good").predict("test").scores  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch

from . import discriminators as disc
from .backbone import FeatureExtractor
from .data.images import ImageTransform, count_images, iter_batches
from .embedding import PatchEmbedder, random_projection
from .memory_bank import DISTANCES, MemoryBank, build_bank
from .postprocess import image_scores_from_patches, patch_scores_to_maps, top_fraction_mean
from .results import Prediction, TrainingReport
from .runtime import resolve_device
from .serialization import read_model_file, write_model_file

logger = logging.getLogger(__name__)

REPORT_TOP_FRACTION = 0.05  # contamination score: mean of an image's top 5 % patch scores
REPORT_MAD_FACTOR = 3.0  # flagged: score > median + 3 * 1.4826 * MAD
THRESHOLD_MAD_FACTOR = 3.0
CALIBRATION_IMAGES = 16
CALIBRATION_GROUP = 4  # images scored per leave-out k-NN call


def _robust_limit(values: np.ndarray, factor: float) -> float:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) * 1.4826
    return med + factor * mad


def _robust_outliers(raw: dict[str, torch.Tensor], factor: float | None, combine: str = "any") -> torch.Tensor | None:
    """[N*P] bool: the patch's score exceeds median + factor * 1.4826 * MAD of all
    patches' scores in at least one discriminator (``combine="any"``) or in every one
    (``"all"``). None when factor is None (no such gate)."""
    if factor is None:
        return None
    mask = None
    for s in raw.values():
        f = s.reshape(-1)
        med = f.median()
        mad = (f - med).abs().median() * 1.4826
        hit = f > med + factor * mad
        mask = hit if mask is None else (mask | hit if combine == "any" else mask & hit)
    return mask


# ------------------------------------------------------------------ validation
def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def _check_fraction(name: str, value: Any, lo: float, hi: float, hi_inclusive: bool) -> None:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and lo <= value and (value <= hi if hi_inclusive else value < hi)
    if not ok:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}{']' if hi_inclusive else ')'}, got {value!r}")


def _check_common(cfg: dict) -> None:
    if not isinstance(cfg["backbone"], str) or not cfg["backbone"]:
        raise ValueError(f"backbone must be a timm model name, got {cfg['backbone']!r}")
    layers = cfg["layers"]
    if layers is not None and (
        isinstance(layers, str) or not all(isinstance(l, str) for l in layers) or len(layers) == 0
    ):
        raise ValueError(f"layers must be None or a non-empty list of layer names, got {layers!r}")
    if cfg["weights"] is not None and not isinstance(cfg["weights"], (str, os.PathLike)):
        raise TypeError(f"weights must be a file path or None, got {type(cfg['weights']).__name__}")
    if not isinstance(cfg["pretrained"], bool):
        raise TypeError(f"pretrained must be True or False, got {cfg['pretrained']!r}")
    _check_int("embed_dim", cfg["embed_dim"], 1, allow_none=True)
    _check_int("proj_dim", cfg["proj_dim"], 1)
    _check_fraction("coreset_ratio", cfg["coreset_ratio"], 0.0, 1.0, True)
    if cfg["coreset_ratio"] <= 0:
        raise ValueError(f"coreset_ratio must be > 0, got {cfg['coreset_ratio']!r}")
    _check_int("resize", cfg["resize"], 1, allow_none=True)
    _check_int("crop", cfg["crop"], 1, allow_none=True)
    ImageTransform(resize=cfg["resize"], crop=cfg["crop"])  # crop <= resize
    if not isinstance(cfg["device"], (str, torch.device)):
        raise TypeError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {cfg['device']!r}")
    _check_int("batch_size", cfg["batch_size"], 1)
    _check_int("seed", cfg["seed"], 0)
    if cfg["distance"] not in DISTANCES:
        raise ValueError(f"distance must be one of {list(DISTANCES)}, got {cfg['distance']!r}")
    # discriminator settings (PatchCore has none: it uses _DISCRIMINATOR_DEFAULTS)
    if "window" in cfg:
        _check_int("window", cfg["window"], 1)
        if cfg.get("weight_mode", "outlier") not in disc.WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {list(disc.WEIGHT_MODES)}, got {cfg['weight_mode']!r}")
        disc.check_shrinkage(cfg.get("gaussian_shrinkage", "ledoit_wolf"))
        mad = cfg.get("removal_mad")
        if mad is not None and (isinstance(mad, bool) or not isinstance(mad, (int, float)) or not mad >= 0):
            raise ValueError(f"removal_mad must be None or a number >= 0, got {mad!r}")
        _check_int("lof_k", cfg["lof_k"], 1)
        _check_int("pool_size", cfg["pool_size"], 16)
        disc.check_alignment(cfg["alignment"])


# What PatchCore's report-only discriminator uses (it takes no such arguments).
_DISCRIMINATOR_DEFAULTS = {
    "alignment": "auto", "window": 1, "lof_k": 6, "pool_size": 4096, "weight_mode": "outlier",
    "gaussian_shrinkage": "ledoit_wolf", "rank_scope": "global",
    "removal_mad": 3.0, "seg_removal_gate": "all",
}


class _Detector:
    """Shared pipeline; subclasses fix which discriminators run and how the banks are built."""

    model_type = "base"

    # ---------------------------------------------------------------- setup
    def __init__(self, **config: Any):
        config["progress"] = bool(config.get("progress", False))
        if isinstance(config.get("weights"), os.PathLike):
            config["weights"] = os.fspath(config["weights"])
        if isinstance(config.get("layers"), tuple):
            config["layers"] = list(config["layers"])
        if isinstance(config.get("device"), torch.device):
            config["device"] = str(config["device"])
        _check_common(config)
        self._validate_specific(config)
        self._config = config
        self._reset()

    def _validate_specific(self, cfg: dict) -> None:
        pass

    def _opt(self, key: str):
        return self._config[key] if key in self._config else _DISCRIMINATOR_DEFAULTS[key]

    def _reset(self) -> None:
        self._fitted = False
        self._device: torch.device | None = None
        self._extractor: FeatureExtractor | None = None
        self._embedder: PatchEmbedder | None = None
        self._projection: torch.Tensor | None = None
        self._cls_bank: MemoryBank | None = None
        self._seg_bank: MemoryBank | None = None
        self._threshold: float = float("nan")
        self._report: TrainingReport | None = None
        self.fit_info_: dict[str, Any] = {}
        self.predict_timings_: dict[str, float] = {}

    @property
    def config(self) -> dict:
        """JSON-able constructor arguments."""
        return dict(self._config)

    @property
    def transform(self) -> ImageTransform:
        return ImageTransform(resize=self._config["resize"], crop=self._config["crop"])

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else resolve_device(self._config["device"])

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    @property
    def threshold(self) -> float:
        """Decision threshold on image scores (calibrated at fit; settable)."""
        self._check_fitted("threshold")
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or math.isnan(value):
            raise ValueError(f"threshold must be a number, got {value!r}")
        self._check_fitted("threshold")
        self._threshold = float(value)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config.items())
        return f"{type(self).__name__}({args}){'' if self._fitted else ' [not fitted]'}"

    def _check_fitted(self, what: str) -> None:
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__}.{what}: the model is not fitted; call fit(images) first")

    def _build_components(self, device: torch.device, spec: dict | None = None) -> None:
        cfg = self._config
        # Random (pretrained=False) backbones are drawn from the model seed, so a saved
        # model re-creates the same weights on load.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            if spec is None:
                extractor = FeatureExtractor(
                    cfg["backbone"], layers=cfg["layers"], weights=cfg["weights"],
                    pretrained=cfg["pretrained"], device=device,
                )
            else:
                extractor = FeatureExtractor.from_spec(spec, device=device)
        self._extractor = extractor
        self._embedder = PatchEmbedder(extractor, cfg["embed_dim"])
        self._device = device

    # ---------------------------------------------------------------- features
    def _embed_all(self, images: Any, desc: str):
        """Embeddings [N,h,w,D] on the device + names, sources, original sizes."""
        from tqdm.auto import tqdm  # noqa: PLC0415

        total = count_images(images)
        chunks, names, sources, sizes = [], [], [], []
        with tqdm(total=total, desc=desc, unit="img", disable=not self._config["progress"]) as bar:
            for batch in iter_batches(images, self.transform, self._config["batch_size"]):
                emb = self._embed_batch(batch.pixels)
                chunks.append(emb)
                names += batch.names
                sources += batch.sources
                sizes += batch.sizes
                bar.update(len(batch))
        if not chunks:
            raise ValueError("images: no images were given")
        return torch.cat(chunks), names, sources, sizes

    def _embed_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(pixels).all():
            raise ValueError("images contain NaN or infinite pixel values")
        emb = self._embedder(pixels.to(self._device))
        if not torch.isfinite(emb).all():
            raise ValueError("the backbone produced NaN/inf features for these images (check the weights)")
        return emb

    # ---------------------------------------------------------------- fit
    def _plan(self) -> dict:
        """Which discriminators run, and the banks: list of (name, removed fraction, soft weights)."""
        raise NotImplementedError

    def fit(self, images: Any) -> "_Detector":
        """Build the memory bank(s) from training images (any input iter_batches accepts).

        Returns self.
        """
        self._reset()
        cfg = self._config
        device = resolve_device(cfg["device"])
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self._build_components(device)
        timings["backbone_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        emb, names, sources, sizes = self._embed_all(images, "features (fit)")
        timings["features_s"] = time.perf_counter() - t0
        n, h, w, dim = emb.shape
        plan = self._plan()
        methods: list[str] = plan["discriminators"]
        k = self._opt("lof_k")
        need = max(disc.min_images(m, k) for m in methods) if methods else 1
        if n < need and plan["required"]:
            raise ValueError(
                f"{type(self).__name__}.fit needs at least {need} training images "
                f"(discriminators {methods}, lof_k={k}); got {n}"
            )
        run_discriminators = n >= need
        logger.info("fit: %d images, %dx%d patches of dim %d on %s", n, h, w, dim, device)

        self._projection = random_projection(dim, cfg["proj_dim"], seed=cfg["seed"], device=device)
        flat = emb.reshape(n * h * w, dim)
        proj = (flat @ self._projection).contiguous()
        image_index = torch.arange(n, device=device).repeat_interleave(h * w)

        # ---- noise discrimination
        t0 = time.perf_counter()
        info: dict[str, Any] = {"n_images": n, "grid": [h, w], "embed_dim": dim}
        raw: dict[str, torch.Tensor] = {}
        if run_discriminators:
            z = proj.reshape(n, h, w, -1)
            alignment, rho = disc.resolve_alignment(self._opt("alignment"), z, cfg["seed"])
            info.update(alignment=alignment, alignment_statistic=rho)
            cache: dict = {}
            from tqdm.auto import tqdm  # noqa: PLC0415

            for m in tqdm(methods, desc=f"denoising ({alignment})", unit="discriminator",
                          disable=not cfg["progress"]):
                raw[m] = disc.outlier_scores(
                    z, m, alignment, k=k, window=self._opt("window"), pool_size=self._opt("pool_size"),
                    seed=cfg["seed"], graph_cache=cache, progress=cfg["progress"],
                    gaussian_shrinkage=self._opt("gaussian_shrinkage"),
                )
                if not torch.isfinite(raw[m]).all():
                    raise ValueError(f"the {m!r} discriminator produced non-finite scores (duplicate images?)")
            del cache
        else:
            info.update(alignment=None, alignment_statistic=None)
            logger.warning(
                "%s: %d training images are too few for the %s discriminator (needs %d); "
                "the training report has no scores", type(self).__name__, n, methods, need,
            )
        timings["denoise_s"] = time.perf_counter() - t0

        # ---- banks
        t0 = time.perf_counter()
        total = n * h * w
        banks: dict[str, MemoryBank] = {}
        report_scores = None
        removed_fraction = np.zeros(n, dtype=np.float32)
        order_score = self._order_score(raw, info) if raw else None  # [N,h,w], larger = more outlying
        from tqdm.auto import tqdm  # noqa: PLC0415

        for bank_name, remove_fraction, soft in tqdm(plan["banks"], desc="coreset", unit="bank",
                                                     disable=not cfg["progress"]):
            kept = torch.ones(total, dtype=torch.bool, device=device)
            n_remove = disc.top_fraction_count(total, remove_fraction) if order_score is not None else 0
            if n_remove > 0:
                worst = order_score.reshape(-1).topk(n_remove).indices
                gate = self._opt("seg_removal_gate") if bank_name == "seg" else "any"
                outlier_mask = _robust_outliers(raw, self._opt("removal_mad"), gate)
                if outlier_mask is not None:  # "do no harm": only confirmed outliers go
                    worst = worst[outlier_mask[worst]]
                kept[worst] = False
                n_remove = int(worst.numel())
            weights = None
            if raw:
                normalised = self._weights(raw, kept)  # [N*P], an inlier ~ 1
                if bank_name == "cls":
                    report_scores = normalised.reshape(n, h * w)
                    removed_fraction = (~kept).reshape(n, h * w).float().mean(1).cpu().numpy()
                if soft:
                    weights = normalised
            banks[bank_name], _ = build_bank(
                flat, proj, image_index, kept, weights, cfg["coreset_ratio"], seed=cfg["seed"],
                distance=cfg["distance"],
            )
            info[f"{bank_name}_bank_size"] = len(banks[bank_name])
            info[f"{bank_name}_removed"] = n_remove
        self._cls_bank = banks["cls"]
        self._seg_bank = banks.get("seg")
        timings["coreset_s"] = time.perf_counter() - t0

        # ---- training report
        if report_scores is not None:
            scores = top_fraction_mean(report_scores, REPORT_TOP_FRACTION).cpu().numpy().astype(np.float32)
            limit = _robust_limit(scores, REPORT_MAD_FACTOR)
            flagged = scores > limit
        else:
            scores = np.full(n, np.nan, dtype=np.float32)
            limit = float("nan")
            flagged = np.zeros(n, dtype=bool)
        self._report = TrainingReport(list(names), list(sources), scores, flagged, float(limit), removed_fraction)

        # ---- threshold
        t0 = time.perf_counter()
        self._threshold, calib = self._calibrate(emb, flagged)
        info["calibration_scores"] = [float(s) for s in calib]
        timings["calibration_s"] = time.perf_counter() - t0
        info["timings"] = timings
        self.fit_info_ = info
        self._fitted = True
        logger.info("fit done: %s; threshold %.4g; timings %s", {k: v for k, v in info.items() if k != "calibration_scores"},
                    self._threshold, {k: round(v, 2) for k, v in timings.items()})
        return self

    def _order_score(self, raw: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
        """Per patch, what the hard denoising ranks by (larger = removed first)."""
        (only,) = raw.values()
        return only

    def _weights(self, raw: dict[str, torch.Tensor], kept: torch.Tensor) -> torch.Tensor:
        """[N*P] soft weights (see :func:`discriminators.soft_weights`; ``weight_mode``)."""
        return disc.soft_weights(list(raw.values()), kept, self._opt("weight_mode"))

    def _calibrate(self, emb: torch.Tensor, flagged: np.ndarray) -> tuple[float, np.ndarray]:
        """Threshold from training images scored without their own patches in the bank."""
        n = emb.shape[0]
        if n < 2:
            logger.warning("one training image: no threshold calibration possible; threshold = inf")
            return float("inf"), np.zeros(0, dtype=np.float32)
        candidates = np.flatnonzero(~flagged)
        if candidates.size < 2:
            candidates = np.arange(n)
        rng = np.random.default_rng(self._config["seed"] + 17)
        chosen = np.sort(rng.choice(candidates, size=min(CALIBRATION_IMAGES, candidates.size), replace=False))
        # with very few images a group would exclude most of the bank: score one at a time
        group = CALIBRATION_GROUP if n >= 4 * CALIBRATION_GROUP else 1
        scores = []
        for s in range(0, chosen.size, group):
            ids = torch.as_tensor(chosen[s : s + group], device=emb.device)
            queries = emb[ids].reshape(-1, emb.shape[-1])
            patch = self._cls_bank.score(queries, exclude_images=ids).reshape(ids.numel(), -1)
            scores.append(patch.amax(dim=1).cpu())
        calib = torch.cat(scores).numpy().astype(np.float32)
        if calib.size < 3:
            return float(calib.max()), calib
        return _robust_limit(calib, THRESHOLD_MAD_FACTOR), calib

    # ---------------------------------------------------------------- predict
    def predict(self, images: Any) -> Prediction:
        """Score images: image scores, verdicts and anomaly maps (see :class:`Prediction`)."""
        return self._run(images, with_maps=True)

    def score(self, images: Any) -> np.ndarray:
        """[N] float32 image anomaly scores only (no maps)."""
        return self._run(images, with_maps=False).scores

    @torch.no_grad()
    def _run(self, images: Any, with_maps: bool) -> Prediction:
        self._check_fitted("predict")
        from tqdm.auto import tqdm  # noqa: PLC0415

        names, sources, sizes, scores, maps, patches = [], [], [], [], [], []
        total = count_images(images)
        # where predict time goes (read by benchmarks/bench_pipeline.py); on CUDA the
        # .cpu() copies synchronise, so the split is approximate there
        timings = {"load_s": 0.0, "features_s": 0.0, "knn_s": 0.0, "maps_s": 0.0}
        batches = iter_batches(images, self.transform, self._config["batch_size"])
        with tqdm(total=total, desc="predict", unit="img", disable=not self._config["progress"]) as bar:
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                timings["load_s"] += time.perf_counter() - t0
                if batch is None:
                    break
                t0 = time.perf_counter()
                emb = self._embed_batch(batch.pixels)
                b, h, w, dim = emb.shape
                if dim != self._cls_bank.features.shape[1]:
                    raise ValueError(f"feature dimension {dim} does not match the memory bank ({self._cls_bank.features.shape[1]})")
                flat = emb.reshape(-1, dim)
                t1 = time.perf_counter()
                timings["features_s"] += t1 - t0
                cls = self._cls_bank.score(flat).reshape(b, h, w)
                scores.append(image_scores_from_patches(cls).cpu())
                if with_maps:
                    seg = cls if self._seg_bank is None else self._seg_bank.score(flat).reshape(b, h, w)
                    patches.append(seg.cpu())
                    t2 = time.perf_counter()
                    maps.append(patch_scores_to_maps(seg, tuple(batch.pixels.shape[-2:])).cpu())
                    timings["maps_s"] += time.perf_counter() - t2
                    timings["knn_s"] += t2 - t1
                else:
                    timings["knn_s"] += time.perf_counter() - t1
                names += batch.names
                sources += batch.sources
                sizes += batch.sizes
                bar.update(len(batch))
        if not names:
            raise ValueError("images: no images were given")
        self.predict_timings_ = timings
        score_arr = torch.cat(scores).numpy().astype(np.float32)
        if with_maps:
            map_arr = torch.cat(maps).numpy().astype(np.float32)
            patch_arr = torch.cat(patches).numpy().astype(np.float32)
        else:
            map_arr = np.zeros((len(names), 0, 0), dtype=np.float32)
            patch_arr = None
        return Prediction(
            names=names, scores=score_arr, threshold=self._threshold, is_anomalous=score_arr > self._threshold,
            maps=map_arr, sources=sources, patch_scores=patch_arr, input_sizes=sizes,
            resize=self._config["resize"], crop=self._config["crop"],
        )

    def training_report(self) -> TrainingReport:
        """Contamination score of every training image and the likely defective ones."""
        self._check_fitted("training_report")
        return self._report

    # ---------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to one safetensors file (no pickle, no backbone weights)."""
        self._check_fitted("save")
        from . import __version__  # noqa: PLC0415

        tensors: dict[str, torch.Tensor] = {"projection": self._projection}
        for name, bank in (("cls", self._cls_bank), ("seg", self._seg_bank)):
            if bank is None:
                continue
            tensors[f"{name}_bank.features"] = bank.features
            tensors[f"{name}_bank.source_image"] = bank.source_image
            if bank.weights is not None:
                tensors[f"{name}_bank.weights"] = bank.weights
        rep = self._report
        tensors["report.scores"] = torch.from_numpy(np.asarray(rep.scores, dtype=np.float32))
        tensors["report.flagged"] = torch.from_numpy(np.asarray(rep.flagged, dtype=np.uint8))
        tensors["report.removed_fraction"] = torch.from_numpy(np.asarray(rep.removed_fraction, dtype=np.float32))
        header = {
            "model_type": self.model_type,
            "library_version": __version__,
            "config": self._config,
            "threshold": self._threshold,
            "backbone_spec": self._extractor.spec(),
            "embed_dim": self._embedder.embed_dim,
            "fit_info": self.fit_info_,
            "report": {"names": rep.names, "sources": rep.sources, "threshold": rep.threshold},
        }
        write_model_file(path, tensors, header)
        logger.info("saved %s to %s", type(self).__name__, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> "_Detector":
        """Load a model written by :meth:`save` (on ``device``)."""
        model = load_model(path, device=device)
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}; use load_model()")
        return model

    def _restore(self, tensors: dict[str, torch.Tensor], header: dict, path: str, device: str) -> None:
        dev = resolve_device(device)
        self._build_components(dev, spec=header["backbone_spec"])
        try:
            self._projection = tensors["projection"].to(dev)
            banks = {}
            for name in ("cls", "seg"):
                if f"{name}_bank.features" not in tensors:
                    continue
                weights = tensors.get(f"{name}_bank.weights")
                banks[name] = MemoryBank(
                    tensors[f"{name}_bank.features"].to(dev),
                    None if weights is None else weights.to(dev),
                    tensors[f"{name}_bank.source_image"].to(dev),
                    self._config["distance"],
                )
            self._cls_bank = banks["cls"]
            self._seg_bank = banks.get("seg")
            rep = header["report"]
            self._report = TrainingReport(
                list(rep["names"]), list(rep["sources"]), tensors["report.scores"].numpy(),
                tensors["report.flagged"].numpy().astype(bool), float(rep["threshold"]),
                tensors["report.removed_fraction"].numpy(),
            )
            self._threshold = float(header["threshold"])
            self.fit_info_ = dict(header.get("fit_info", {}))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: incomplete or corrupt model file (missing {exc})") from exc
        if self._embedder.embed_dim != header.get("embed_dim", self._embedder.embed_dim):
            raise ValueError(f"{path}: embed_dim mismatch between header and backbone")
        if self._cls_bank.features.shape[1] != self._projection.shape[0]:
            raise ValueError(f"{path}: memory bank and projection dimensions disagree (corrupt file)")
        self._fitted = True


_COMMON_DEFAULTS = dict(
    backbone="efficientnet_lite0", layers=None, weights=None, pretrained=True, embed_dim=None,
    proj_dim=128, coreset_ratio=0.1, resize=256, crop=224, device="auto", batch_size=16, seed=0,
    progress=False, distance="l2",
)


class PatchCore(_Detector):
    """PatchCore (Roth et al. 2022): greedy-coreset memory bank, nearest-neighbour distance.

    Same pipeline as :class:`SoftPatch` with denoising and soft weights off. The LOF
    discriminator still runs (alignment "auto") to fill :meth:`training_report`.

    Args:
        backbone: timm CNN name; layers: its feature layers (None: the backbone's
            default pair at strides 8 and 16); weights: local state-dict file;
            pretrained: ImageNet weights (False: random, seeded -- tests).
        embed_dim: patch embedding size (None: per-backbone default).
        proj_dim: random projection size for denoising and coreset selection.
        coreset_ratio: fraction of the (kept) patches in the memory bank.
        resize, crop: input transform (resize x resize, centre crop).
        device: "auto" | "cpu" | "cuda[:N]"; batch_size: images per batch.
        seed: every random choice (projection, coreset start, pools, random backbones).
        progress: tqdm bars; distance: "l2" or "squared_l2" (the authors' code).
    """

    model_type = "patchcore"

    def __init__(
        self, *, backbone: str = "efficientnet_lite0", layers: list[str] | None = None,
        weights: str | os.PathLike | None = None, pretrained: bool = True, embed_dim: int | None = None,
        proj_dim: int = 128, coreset_ratio: float = 0.1, resize: int | None = 256, crop: int | None = 224,
        device: str = "auto", batch_size: int = 16, seed: int = 0, progress: bool = False,
        distance: str = "l2",
    ):
        super().__init__(
            backbone=backbone, layers=layers, weights=weights, pretrained=pretrained, embed_dim=embed_dim,
            proj_dim=proj_dim, coreset_ratio=coreset_ratio, resize=resize, crop=crop, device=device,
            batch_size=batch_size, seed=seed, progress=progress, distance=distance,
        )

    def _plan(self) -> dict:
        return {"discriminators": ["lof"], "required": False, "banks": [("cls", 0.0, False)]}


class SoftPatch(_Detector):
    """SoftPatch (Jiang et al. 2022): patch-level denoising + soft weights.

    Args (beyond :class:`PatchCore`'s):
        discriminator: "lof" (default), "nearest" or "gaussian".
        lof_k: LOF neighbours (6, the papers').
        noise_threshold: fraction of all training patches, the most outlying, excluded
            from the memory bank (0.15).
        alignment: "auto" (default) | "position" (the paper) | "window" | "global".
        window: radius of the "window" alignment, in patch positions.
        pool_size: random patches the "global" alignment compares with.
        soft_weights: multiply the nearest-neighbour distance by the matched patch's weight.
        weight_mode: how outlier scores become soft weights (see
            :func:`discriminators.soft_weights`). "outlier" (default): 1 for every patch
            below the robust outlier limit (median + 3 MAD), score / limit above it, so
            normal patches are never amplified or damped. "median": score / median kept
            score (the papers' reading; half of the normal patches weigh > 1).
        gaussian_shrinkage: covariance shrinkage of the "gaussian" discriminator:
            "ledoit_wolf" (default) or a fixed intensity (0.1 = the previous default).
        removal_mad: "do no harm" gate of the hard denoising: a patch among the top
            ``noise_threshold`` is removed only if its score also exceeds
            median + removal_mad * 1.4826 * MAD of all scores (in at least one
            discriminator). None: remove the whole top fraction (the papers).
            Why: on the demo data a clean training set lost up to 10-20 image AUROC
            points (nut) when 15 % of its normal patches were removed.

    Measured (demo data, 6 categories x noise 0/0.2/0.4 x 2 data seeds, 128 px, 30
    train images, efficientnet_lite0; small test sets, +-3 points per cell is noise):
    mean image AUROC SoftPatch 85.9/87.8/85.8 (defaults) vs PatchCore 85.7/86.8/87.3,
    pixel 92.7/93.5/94.6 vs 93.3/93.2/94.4 (3 data seeds). Paper-faithful settings
    (weight_mode="median", removal_mad=None; seed 0): image 78.9/83.8/84.4.
    """

    model_type = "softpatch"

    def __init__(
        self, *, backbone: str = "efficientnet_lite0", layers: list[str] | None = None,
        weights: str | os.PathLike | None = None, pretrained: bool = True, embed_dim: int | None = None,
        proj_dim: int = 128, coreset_ratio: float = 0.1, resize: int | None = 256, crop: int | None = 224,
        device: str = "auto", batch_size: int = 16, seed: int = 0, progress: bool = False,
        distance: str = "l2", discriminator: str = "lof", lof_k: int = 6, noise_threshold: float = 0.15,
        alignment: str = "auto", window: int = 1, pool_size: int = 4096, soft_weights: bool = True,
        weight_mode: str = "outlier", gaussian_shrinkage: float | str = "ledoit_wolf",
        removal_mad: float | None = 3.0,
    ):
        super().__init__(
            backbone=backbone, layers=layers, weights=weights, pretrained=pretrained, embed_dim=embed_dim,
            proj_dim=proj_dim, coreset_ratio=coreset_ratio, resize=resize, crop=crop, device=device,
            batch_size=batch_size, seed=seed, progress=progress, distance=distance,
            discriminator=discriminator, lof_k=lof_k, noise_threshold=noise_threshold, alignment=alignment,
            window=window, pool_size=pool_size, soft_weights=soft_weights, weight_mode=weight_mode,
            gaussian_shrinkage=gaussian_shrinkage, removal_mad=removal_mad,
        )

    def _validate_specific(self, cfg: dict) -> None:
        disc.check_discriminator(cfg["discriminator"])
        _check_fraction("noise_threshold", cfg["noise_threshold"], 0.0, 1.0, False)
        if not isinstance(cfg["soft_weights"], bool):
            raise TypeError(f"soft_weights must be True or False, got {cfg['soft_weights']!r}")

    def _plan(self) -> dict:
        cfg = self._config
        return {
            "discriminators": [cfg["discriminator"]],
            "required": True,
            "banks": [("cls", cfg["noise_threshold"], cfg["soft_weights"])],
        }


class SoftPatchPlus(_Detector):
    """SoftPatch+ (Wang et al. 2025): fused discriminators, two memory banks.

    Args (beyond :class:`PatchCore`'s):
        discriminators: which discriminators to fuse (default LOF + Gaussian).
        fusion: "mean" or "max" of the rank-normalised scores. Ranks are taken within
            each position's group for alignment "position", over all patches otherwise.
        cls_threshold: fraction removed for the classification bank (image scores).
        seg_threshold: fraction removed for the segmentation bank (anomaly maps).
        alignment, window, pool_size, lof_k: as in :class:`SoftPatch`.
        soft_weights: soft weights are the mean over discriminators of each raw score
            divided by a reference (``weight_mode``; ranks themselves would give the
            most normal patch weight 0).
        weight_mode, gaussian_shrinkage, removal_mad: as in :class:`SoftPatch`.
            The paper-faithful setting is weight_mode="median", gaussian_shrinkage=0.1,
            rank_scope="position", removal_mad=None.
        rank_scope: "global" (default): rank the scores over all patches before fusing,
            so positions with more outliers lose more patches; "position": within each
            position's group (alignment "position" only), which removes the same share
            at every position, also where there is nothing to clean.

        seg_removal_gate: which patches the segmentation bank (up to ``seg_threshold``
            removed) may lose: "all" (default) -- robust outliers in every
            discriminator; "any" -- in at least one (as the classification bank).
            Removing half of the patches on LOF's tail alone cost 0.7 pixel AUROC
            points at noise 0 (rare normal patches went missing).

    Measured (demo data, 6 categories x noise 0/0.2/0.4 x 3 data seeds, 128 px, 30 train
    images; +-3 points per cell is noise): mean image AUROC 85.7/87.8/87.2 with the
    defaults vs PatchCore 85.7/86.8/87.3; pixel AUROC 93.3/93.5/94.4 vs 93.3/93.2/94.4.
    The paper-faithful setting (seed 0 only, PatchCore 83.4/83.1/84.6 image, 93.4/92.7/94.6
    pixel there): image 83.8/83.1/86.9, pixel 91.4/91.7/93.2.
    """

    model_type = "softpatch_plus"

    def __init__(
        self, *, backbone: str = "efficientnet_lite0", layers: list[str] | None = None,
        weights: str | os.PathLike | None = None, pretrained: bool = True, embed_dim: int | None = None,
        proj_dim: int = 128, coreset_ratio: float = 0.1, resize: int | None = 256, crop: int | None = 224,
        device: str = "auto", batch_size: int = 16, seed: int = 0, progress: bool = False,
        distance: str = "l2", discriminators: tuple[str, ...] | list[str] = ("lof", "gaussian"),
        fusion: str = "mean", cls_threshold: float = 0.15, seg_threshold: float = 0.5, alignment: str = "auto",
        window: int = 1, lof_k: int = 6, pool_size: int = 4096, soft_weights: bool = True,
        weight_mode: str = "outlier", gaussian_shrinkage: float | str = "ledoit_wolf", rank_scope: str = "global",
        removal_mad: float | None = 3.0, seg_removal_gate: str = "all",
    ):
        if isinstance(discriminators, str):
            discriminators = [discriminators]
        super().__init__(
            backbone=backbone, layers=layers, weights=weights, pretrained=pretrained, embed_dim=embed_dim,
            proj_dim=proj_dim, coreset_ratio=coreset_ratio, resize=resize, crop=crop, device=device,
            batch_size=batch_size, seed=seed, progress=progress, distance=distance,
            discriminators=list(discriminators) if isinstance(discriminators, (list, tuple)) else discriminators,
            fusion=fusion, cls_threshold=cls_threshold, seg_threshold=seg_threshold, alignment=alignment,
            window=window, lof_k=lof_k, pool_size=pool_size, soft_weights=soft_weights, weight_mode=weight_mode,
            gaussian_shrinkage=gaussian_shrinkage, rank_scope=rank_scope, removal_mad=removal_mad,
            seg_removal_gate=seg_removal_gate,
        )

    def _validate_specific(self, cfg: dict) -> None:
        ds = cfg["discriminators"]
        if not isinstance(ds, list) or not ds:
            raise ValueError(f"discriminators must be a non-empty list of {list(disc.DISCRIMINATORS)}, got {ds!r}")
        for d in ds:
            disc.check_discriminator(d, "discriminators entry")
        if len(set(ds)) != len(ds):
            raise ValueError(f"discriminators contain duplicates: {ds}")
        if cfg["fusion"] not in disc.FUSIONS:
            raise ValueError(f"fusion must be one of {list(disc.FUSIONS)}, got {cfg['fusion']!r}")
        if cfg["seg_removal_gate"] not in ("any", "all"):
            raise ValueError(f"seg_removal_gate must be 'any' or 'all', got {cfg['seg_removal_gate']!r}")
        if cfg["rank_scope"] not in ("global", "position"):
            raise ValueError(f"rank_scope must be 'global' or 'position', got {cfg['rank_scope']!r}")
        _check_fraction("cls_threshold", cfg["cls_threshold"], 0.0, 1.0, False)
        _check_fraction("seg_threshold", cfg["seg_threshold"], 0.0, 1.0, False)
        if not isinstance(cfg["soft_weights"], bool):
            raise TypeError(f"soft_weights must be True or False, got {cfg['soft_weights']!r}")

    def _plan(self) -> dict:
        cfg = self._config
        return {
            "discriminators": list(cfg["discriminators"]),
            "required": True,
            "banks": [("cls", cfg["cls_threshold"], cfg["soft_weights"]),
                      ("seg", cfg["seg_threshold"], cfg["soft_weights"])],
        }

    def _order_score(self, raw: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
        per_position = self._config["rank_scope"] == "position" and info.get("alignment") == "position"
        ranks = [disc.rank_normalise(s, per_position) for s in raw.values()]
        return disc.fuse(ranks, self._config["fusion"])


_MODEL_TYPES: dict[str, type[_Detector]] = {
    PatchCore.model_type: PatchCore,
    SoftPatch.model_type: SoftPatch,
    SoftPatchPlus.model_type: SoftPatchPlus,
}


def load_model(path: str | os.PathLike, device: str = "auto") -> _Detector:
    """Load any model written by ``save`` (PatchCore, SoftPatch or SoftPatchPlus)."""
    tensors, header = read_model_file(path)
    model_type = header.get("model_type")
    cls = _MODEL_TYPES.get(model_type)
    if cls is None:
        raise ValueError(f"{path}: unknown model type {model_type!r} (known: {sorted(_MODEL_TYPES)})")
    config = header.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: corrupt model header (no config)")
    config = dict(config, device=device if isinstance(device, str) else str(device))
    try:
        model = cls(**config)
    except TypeError as exc:
        raise ValueError(f"{path}: the stored config does not fit {cls.__name__}: {exc}") from exc
    model._restore(tensors, header, str(path), config["device"])
    return model
