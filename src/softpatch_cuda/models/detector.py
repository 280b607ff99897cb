"""The detector pipeline shared by PatchCore, SoftPatch and SoftPatch+.

``fit`` runs five named phases, each a function with explicit inputs:

1. embed       -- :func:`softpatch_cuda.embedding.embed_images`
2. denoise     -- :func:`softpatch_cuda.denoise.score_patches` + :func:`softpatch_cuda.denoise.plan_banks`
3. build banks -- :func:`softpatch_cuda.memory_bank.build_banks`
4. report      -- :meth:`softpatch_cuda.results.TrainingReport.from_denoising`
5. calibrate   -- :func:`softpatch_cuda.models.calibration.calibrate_threshold`

The model kinds differ only in their configuration (:mod:`.config`): which
discriminators run and how each bank is cleaned.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, ClassVar

import numpy as np
import torch

from .._validation import check_bool, is_int, is_number
from ..backbone import FeatureExtractor
from ..denoise import DenoiseResult, plan_banks, score_patches, weight_stats
from ..embedding import EmbeddedImages, PatchEmbedder, embed_batch, embed_images, random_projection
from ..memory_bank import MemoryBank, build_banks
from ..postprocess import patch_scores_to_maps
from ..results import Prediction, TrainingReport
from ..runtime import resolve_device, thread_budget
from .calibration import calibrate_threshold
from .config import PatchCoreConfig

logger = logging.getLogger(__name__)

MIN_GRID = 3  # patches per side: below this, position-wise denoising and maps mean nothing


def distinct_images(embedded: EmbeddedImages) -> tuple[list[int], np.ndarray]:
    """(indices of the first occurrence of each distinct image, for every image the
    position of its original in that list). Exact duplicates by their pixel digests
    (or, without digests, their embeddings)."""
    keys = embedded.digests
    if keys is None:
        flat = embedded.embeddings.detach().to("cpu").reshape(len(embedded), -1).numpy()
        keys = [row.tobytes() for row in flat]
    position: dict = {}
    distinct: list[int] = []
    original_of = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        if key not in position:
            position[key] = len(distinct)
            distinct.append(i)
        original_of[i] = position[key]
    return distinct, original_of


def _check_device_request(device: Any) -> str:
    if isinstance(device, torch.device):
        return str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return device


class Detector:
    """Public base type of :class:`PatchCore`, :class:`SoftPatch` and :class:`SoftPatchPlus`
    (what ``fit`` and ``load_model`` return).

    Construct a model with keyword options (the fields of its config class), an
    optional ``preset`` ("paper": the authors' settings, options override it), the
    ``device`` ("auto", "cpu", "cuda", "cuda:N") and ``progress`` (tqdm bars; also
    settable later as ``model.progress``).
    """

    model_type: ClassVar[str] = "base"
    config_class: ClassVar[type[PatchCoreConfig]] = PatchCoreConfig

    def __init__(self, *, preset: str | None = None, device: str | torch.device = "auto", progress: bool = False,
                 threads: int | str = "auto", **options: Any):
        self._config = self.config_class.from_options(preset, **options)
        self._device_request = _check_device_request(device)
        self.progress = progress
        self.threads = threads
        self._reset()

    # ---------------------------------------------------------------- state
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
        self._alignment: str | None = None
        self._alignment_statistic: float | None = None
        self.fit_info_: dict[str, Any] = {}
        self.predict_timings_: dict[str, float] = {}

    @property
    def settings(self) -> PatchCoreConfig:
        """The typed, frozen configuration."""
        return self._config

    @property
    def config(self) -> dict:
        """JSON-able constructor arguments (options, device, progress, threads)."""
        return dict(self._config.to_dict(), device=self._device_request, progress=self.progress, threads=self.threads)

    @property
    def progress(self) -> bool:
        """Show tqdm progress bars (on stderr) during fit and predict."""
        return self._progress

    @progress.setter
    def progress(self, value: bool) -> None:
        self._progress = check_bool("progress", value)

    @property
    def threads(self) -> int | str:
        """CPU threads for fit and predict: an int, or "auto" (default): the usable CPUs
        minus what other processes keep busy when each phase starts (see
        :func:`softpatch_cuda.runtime.choose_threads`)."""
        return self._threads

    @threads.setter
    def threads(self, value: int | str) -> None:
        if value != "auto" and not (is_int(value) and value >= 1):
            raise ValueError(f"threads must be 'auto' or an int >= 1, got {value!r}")
        self._threads = value if value == "auto" else int(value)

    @property
    def transform(self):
        return self._config.transform()

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else resolve_device(self._device_request)

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
        if not is_number(value) or math.isnan(value):
            raise ValueError(f"threshold must be a number, got {value!r}")
        self._check_fitted("threshold")
        self._threshold = float(value)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args}){'' if self._fitted else ' [not fitted]'}"

    def _check_fitted(self, what: str) -> None:
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__}.{what}: the model is not fitted; call fit(images) first")

    def _build_components(self, device: torch.device, spec: dict | None = None, weights: str | None = None) -> None:
        cfg = self._config
        # Random (pretrained=False) backbones are drawn from the model seed, so a saved
        # model re-creates the same weights on load.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if spec is None:
                extractor = FeatureExtractor(cfg.backbone, layers=list(cfg.layers) if cfg.layers else None,
                                             weights=cfg.weights, pretrained=cfg.pretrained, device=device)
            else:
                extractor = FeatureExtractor.from_spec(spec, device=device, weights=weights)
                extractor.verify(spec.get("fingerprint"))  # random weights too: drawn from the seed above
        self._extractor = extractor
        self._embedder = PatchEmbedder(extractor, cfg.embed_dim)
        self._device = device

    # ---------------------------------------------------------------- fit
    def fit(self, images: Any) -> "Detector":
        """Build the memory bank(s) from training images (any input ``iter_batches``
        accepts: folder, paths, PIL images, arrays, tensors, a DataLoader). Returns self."""
        self._reset()
        t0 = time.perf_counter()
        self._build_components(resolve_device(self._device_request))
        backbone_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        embedded = self.embed(images, desc="features (fit)")
        self.fit_embedded(embedded, timings={"backbone_s": backbone_s, "features_s": time.perf_counter() - t0})
        return self

    def fit_embedded(self, embedded: EmbeddedImages, timings: dict[str, float] | None = None) -> "Detector":
        """Fit from patch embeddings computed by this model's :meth:`embed` (phases 2-5)."""
        if self._embedder is None:
            self._build_components(resolve_device(self._device_request))
        self._fitted = False
        cfg = self._config
        timings = dict(timings or {})
        n_all, h, w, dim = embedded.embeddings.shape
        self._check_grid(h, w)
        # Exact duplicate images would sit in the bank twice and score 0 against each
        # other when left out for calibration: fit on the distinct ones; the report
        # lists every image (a duplicate gets its original's row).
        distinct, original_of = distinct_images(embedded)
        if len(distinct) < 2:
            raise ValueError(f"{type(self).__name__}.fit needs at least 2 distinct training images (one is left out "
                             f"of the bank to calibrate the threshold); got {len(distinct)} distinct of {n_all}")
        if len(distinct) < n_all:
            logger.warning("%d of %d training images are exact duplicates of others; fitting on the %d distinct ones",
                           n_all - len(distinct), n_all, len(distinct))
        emb = embedded.embeddings[distinct] if len(distinct) < n_all else embedded.embeddings
        n = emb.shape[0]
        device = self._device
        logger.info("fit: %d images, %dx%d patches of dim %d on %s", n, h, w, dim, device)
        self._projection = random_projection(dim, cfg.proj_dim, seed=cfg.seed, device=device)
        flat = emb.reshape(n * h * w, dim)
        proj = (flat @ self._projection).contiguous()

        t0 = time.perf_counter()
        with thread_budget(self.threads):
            denoised = self._denoise(proj.reshape(n, h, w, -1))
        timings["denoise_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if denoised is None:  # too few images for the report-only discriminator (PatchCore)
            kept = {bank.name: torch.ones(n * h * w, dtype=torch.bool, device=device)
                    for bank in cfg.denoise_spec().banks}
            weights: dict = {name: None for name in kept}
        else:
            kept, weights = denoised.kept, denoised.weights
        # bank rows remember their image by its index in the whole training set
        image_index = torch.as_tensor(distinct, device=device).repeat_interleave(h * w)
        with thread_budget(self.threads):
            banks = build_banks(flat, proj, image_index, kept, weights, cfg.coreset_ratio, seed=cfg.seed,
                                distance=cfg.distance, progress=self.progress,
                                shard_patches=cfg.coreset_shard_patches, patches_per_image=h * w, search=cfg.search)
        self._cls_bank, self._seg_bank = banks["cls"], banks.get("seg")
        timings["coreset_s"] = time.perf_counter() - t0

        report = TrainingReport.from_denoising([embedded.names[i] for i in distinct],
                                               [embedded.sources[i] for i in distinct], denoised)
        self._report = report.expanded(embedded.names, embedded.sources, original_of)

        t0 = time.perf_counter()
        with thread_budget(self.threads):
            self._threshold, calib = calibrate_threshold(emb, self._cls_bank, report.flagged, cfg.seed,
                                                         cfg.image_score, image_ids=np.asarray(distinct))
        timings["calibration_s"] = time.perf_counter() - t0

        info: dict[str, Any] = {"n_images": n_all, "n_distinct_images": n, "grid": [h, w], "embed_dim": dim,
                                "alignment": self._alignment, "alignment_statistic": self._alignment_statistic}
        for name, bank in banks.items():
            removed = int((~kept[name]).sum())
            info[f"{name}_bank_size"] = len(bank)
            info[f"{name}_removed"] = removed
            info[f"{name}_removed_share"] = removed / float(n * h * w)
            info[f"{name}_weights"] = weight_stats(bank.weights)
        info["flagged_images"] = int(np.sum(self._report.flagged))
        info["calibration_scores"] = [float(s) for s in calib]
        info["timings"] = timings
        self.fit_info_ = info
        self._fitted = True
        logger.info("fit done: threshold %.4g; %s; timings %s", self._threshold,
                    {k: v for k, v in info.items() if k not in ("calibration_scores", "timings")},
                    {k: round(v, 2) for k, v in timings.items()})
        return self

    def _check_grid(self, h: int, w: int) -> None:
        """Refuse patch grids too small for patch-level denoising and maps, naming the image size needed."""
        if min(h, w) >= MIN_GRID:
            return
        stride = self._extractor.strides[0] if self._extractor is not None else 8
        side = (MIN_GRID - 1) * stride + 1
        raise ValueError(f"the images give a {h}x{w} patch grid; at least {MIN_GRID}x{MIN_GRID} patches are needed: "
                         f"use model inputs of at least {side}x{side} pixels (resize/crop, --resize/--crop)")

    def _denoise(self, z: torch.Tensor) -> DenoiseResult | None:
        """The denoise phase: discriminator scores, then the policy (None: no scores)."""
        cfg = self._config
        scores = score_patches(z, cfg.discriminator_settings(), seed=cfg.seed, progress=self.progress)
        self._alignment, self._alignment_statistic = scores.alignment, scores.alignment_statistic
        if not scores.raw:
            return None
        per_position = getattr(cfg, "rank_scope", "global") == "position" and scores.alignment == "position"
        return plan_banks(scores.raw, cfg.denoise_spec(), per_position=per_position)

    # ---------------------------------------------------------------- predict
    def predict(self, images: Any) -> Prediction:
        """Score images: image scores, verdicts and anomaly maps (see :class:`Prediction`)."""
        with thread_budget(self.threads):
            return self._run(images, with_maps=True)

    def score(self, images: Any) -> np.ndarray:
        """[N] float32 image anomaly scores only (no maps)."""
        with thread_budget(self.threads):
            return self._run(images, with_maps=False).scores

    def embed(self, images: Any, desc: str = "features") -> EmbeddedImages:
        """The embed phase alone: patch embeddings of ``images`` with this model's
        backbone (built on first use). Feed them to :meth:`fit_embedded` or
        :meth:`predict_embedded` -- e.g. to embed a benchmark's images once for many fits."""
        if self._embedder is None:
            self._build_components(resolve_device(self._device_request))
        with thread_budget(self.threads):
            return embed_images(self._embedder, images, self.transform, self._config.batch_size, self.progress, desc)

    @torch.no_grad()
    def _score_embeddings(self, emb: torch.Tensor, with_maps: bool, size: tuple[int, int],
                          timings: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """[B, h, w, D] -> image scores [B], and with maps: patch scores [B, h, w] and maps [B, S, S] (CPU)."""
        b, h, w, dim = emb.shape
        if dim != self._cls_bank.features.shape[1]:
            raise ValueError(f"feature dimension {dim} does not match the memory bank "
                             f"({self._cls_bank.features.shape[1]})")
        t1 = time.perf_counter()
        flat = emb.reshape(-1, dim)
        cls, nearest = self._cls_bank.score(flat, return_index=True)
        cls = cls.reshape(b, h, w)
        scores = self._cls_bank.image_scores(flat, cls.reshape(b, -1), nearest, self._config.image_score).cpu()
        if not with_maps:
            timings["knn_s"] += time.perf_counter() - t1
            return scores, None, None
        seg = cls if self._seg_bank is None else self._seg_bank.score(flat).reshape(b, h, w)
        t2 = time.perf_counter()
        timings["knn_s"] += t2 - t1
        maps = patch_scores_to_maps(seg, size).cpu()
        timings["maps_s"] += time.perf_counter() - t2
        return scores, seg.cpu(), maps

    @torch.no_grad()
    def _run(self, images: Any, with_maps: bool) -> Prediction:
        self._check_fitted("predict")
        from tqdm.auto import tqdm  # noqa: PLC0415

        from ..data.images import count_images, iter_batches  # noqa: PLC0415

        names, sources, sizes, scores, maps, patches = [], [], [], [], [], []
        # where predict time goes (read by benchmarks/bench_pipeline.py); on CUDA the
        # .cpu() copies synchronise, so the split is approximate there
        timings = {"load_s": 0.0, "features_s": 0.0, "knn_s": 0.0, "maps_s": 0.0}
        batches = iter_batches(images, self.transform, self._config.batch_size)
        with tqdm(total=count_images(images), desc="predict", unit="img", disable=not self.progress) as bar:
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                timings["load_s"] += time.perf_counter() - t0
                if batch is None:
                    break
                t0 = time.perf_counter()
                emb = embed_batch(self._embedder, batch.pixels)
                timings["features_s"] += time.perf_counter() - t0
                s, p, m = self._score_embeddings(emb, with_maps, tuple(batch.pixels.shape[-2:]), timings)
                scores.append(s)
                if with_maps:
                    patches.append(p)
                    maps.append(m)
                names += batch.names
                sources += batch.sources
                sizes += batch.sizes
                bar.update(len(batch))
        if not names:
            raise ValueError("images: no images were given")
        self.predict_timings_ = timings
        return self._prediction(names, sources, sizes, scores, patches if with_maps else None,
                                maps if with_maps else None)

    @torch.no_grad()
    def predict_embedded(self, embedded: EmbeddedImages, image_size: tuple[int, int] | None = None) -> Prediction:
        """:meth:`predict` on embeddings from :meth:`embed` (maps at ``image_size``,
        default: the model's input size)."""
        self._check_fitted("predict")
        cfg = self._config
        if image_size is None:
            side = cfg.crop or cfg.resize
            if side is None:
                raise ValueError("predict_embedded: image_size is needed when the model keeps the native size")
            image_size = (side, side)
        timings = {"load_s": 0.0, "features_s": 0.0, "knn_s": 0.0, "maps_s": 0.0}
        scores, patches, maps = [], [], []
        with thread_budget(self.threads):
            for s in range(0, len(embedded), cfg.batch_size):
                sc, p, m = self._score_embeddings(embedded.embeddings[s : s + cfg.batch_size], True,
                                                  tuple(image_size), timings)
                scores.append(sc)
                patches.append(p)
                maps.append(m)
        self.predict_timings_ = timings
        return self._prediction(embedded.names, embedded.sources, embedded.sizes, scores, patches, maps)

    def _prediction(self, names, sources, sizes, scores, patches, maps) -> Prediction:
        cfg = self._config
        score_arr = torch.cat(scores).numpy().astype(np.float32)
        if maps is not None:
            map_arr = torch.cat(maps).numpy().astype(np.float32)
            patch_arr = torch.cat(patches).numpy().astype(np.float32)
        else:
            map_arr = np.zeros((len(names), 0, 0), dtype=np.float32)
            patch_arr = None
        return Prediction(
            names=list(names), scores=score_arr, threshold=self._threshold, is_anomalous=score_arr > self._threshold,
            maps=map_arr, sources=list(sources), patch_scores=patch_arr, input_sizes=list(sizes),
            resize=cfg.resize, crop=cfg.crop,
        )

    def training_report(self) -> TrainingReport:
        """Contamination score of every training image and the likely defective ones."""
        self._check_fitted("training_report")
        return self._report

    # ---------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to one safetensors file (no pickle, no backbone weights)."""
        self._check_fitted("save")
        from .model_io import save_model  # noqa: PLC0415

        save_model(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", weights: str | os.PathLike | None = None) -> "Detector":
        """Load a model written by :meth:`save` (on ``device``; see :func:`load_model`)."""
        from .registry import load_model  # noqa: PLC0415

        model = load_model(path, device=device, weights=weights)
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}; use load_model()")
        return model
