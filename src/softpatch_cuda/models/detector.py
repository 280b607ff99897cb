"""The detector shared by PatchCore, SoftPatch and SoftPatch+.

``fit`` embeds the training images and runs the fit phases on them as one shard
(:mod:`.phases`: prepare -> denoise -> select, then merge -> calibrate -> fit info),
which produce a :class:`FittedState`; ``predict`` embeds test images and scores them
with :mod:`softpatch_cuda.scoring`. The model kinds differ only in their configuration
(:mod:`.config`): which discriminators run and how each bank is cleaned.
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

import torch

from .._validation import check_bool, is_int
from ..backbone import FeatureExtractor
from ..embedding import EmbeddedImages, PatchEmbedder, embed_batch, embed_images
from ..results import Prediction
from ..runtime import resolve_device, thread_budget
from ..scoring import predict_batches, prediction, score_batch
from . import phases
from .config import PatchCoreConfig
from .state import FittedModel, FittedState


def _check_device_request(device: Any) -> str:
    if isinstance(device, torch.device):
        return str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return device


class Detector(FittedModel):
    """Public base type of :class:`PatchCore`, :class:`SoftPatch` and :class:`SoftPatchPlus`
    (what ``fit`` and ``load_model`` return).

    Construct a model with keyword options (the fields of its config class), an
    optional ``preset`` ("paper": the authors' settings, options override it), the
    ``device`` ("auto", "cpu", "cuda", "cuda:N"), ``progress`` (tqdm bars; also
    settable later as ``model.progress``) and ``threads`` (see :attr:`threads`).
    """

    model_type: ClassVar[str] = "base"
    config_class: ClassVar[type[PatchCoreConfig]] = PatchCoreConfig

    def __init__(self, *, preset: str | None = None, device: str | torch.device = "auto", progress: bool = False,
                 threads: int | str = "auto", **options: Any):
        self._config = self.config_class.from_options(preset, **options)
        self._device_request = _check_device_request(device)
        self.progress = progress
        self.threads = threads
        self._embedder: PatchEmbedder | None = None
        self._state: FittedState | None = None
        self.predict_timings_: dict[str, float] = {}

    # ---------------------------------------------------------------- settings
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
        return self._embedder.device if self._embedder is not None else resolve_device(self._device_request)

    # ---------------------------------------------------------------- backbone
    @property
    def embedder(self) -> PatchEmbedder:
        """The backbone + patch embedding (built on first use)."""
        if self._embedder is None:
            self._embedder = self._build_embedder(resolve_device(self._device_request))
        return self._embedder

    def _build_embedder(self, device: torch.device, spec: dict | None = None,
                        weights: str | None = None) -> PatchEmbedder:
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
        return PatchEmbedder(extractor, cfg.embed_dim)

    # ---------------------------------------------------------------- the fitted state
    @property
    def is_fitted(self) -> bool:
        return self._state is not None

    @property
    def state(self) -> FittedState:
        """What the fit produced (banks, report, threshold, ...; see :class:`FittedState`)."""
        self._check_fitted("state")
        return self._state

    def set_state(self, state: FittedState, weights: str | os.PathLike | None = None) -> "Detector":
        """Install a fitted state (from the fit phases or a model file). The backbone is
        rebuilt from the state's spec (``weights``: its weights file, when the stored path
        is not valid here) unless this model's backbone already has those weights."""
        if self._embedder is None or self.embedder.extractor.fingerprint() != state.backbone_spec.get("fingerprint"):
            self._embedder = self._build_embedder(resolve_device(self._device_request), state.backbone_spec,
                                                  None if weights is None else os.fspath(weights))
        if self._embedder.embed_dim != state.embed_dim:
            raise ValueError(f"the fitted state has embed_dim {state.embed_dim}, but this model's backbone and "
                             f"config give {self._embedder.embed_dim}")
        self._state = state
        return self

    @property
    def fit_info_(self) -> dict[str, Any]:
        """What the fit did: sizes, removed patches, soft-weight spread, timings ({} unfitted)."""
        return {} if self._state is None else self._state.fit_info

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args}){'' if self.is_fitted else ' [not fitted]'}"

    def _check_fitted(self, what: str) -> None:
        if self._state is None:
            raise RuntimeError(f"{type(self).__name__}.{what}: the model is not fitted; call fit(images) first")

    # ---------------------------------------------------------------- fit
    def fit_settings(self) -> phases.FitSettings:
        """What the fit phases take from this model (its backbone is built if needed)."""
        extractor = self.embedder.extractor
        return phases.FitSettings(self._config, type(self).__name__, self.threads, self.progress,
                                  extractor.strides[0], extractor.fingerprint())

    def fit(self, images: Any) -> "Detector":
        """Build the memory bank(s) from training images (any input ``iter_batches``
        accepts: folder, paths, PIL images, arrays, tensors, a DataLoader). Returns self."""
        self._state = None
        t0 = time.perf_counter()
        self.embedder  # noqa: B018 -- built (and timed) before the images are read
        backbone_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        embedded = self.embed(images, desc="features (fit)")
        return self.fit_embedded(embedded, timings={"backbone_s": backbone_s, "features_s": time.perf_counter() - t0})

    def fit_embedded(self, embedded: EmbeddedImages, timings: dict[str, float] | None = None) -> "Detector":
        """Fit from patch embeddings computed by this model's :meth:`embed`: the fit
        phases on one shard, calibrated on these embeddings."""
        self._state = None
        settings = self.fit_settings()
        shard = phases.fit_shard(embedded, settings)
        state = phases.finish([shard], settings, device=self.device, backbone_spec=self.embedder.extractor.spec(),
                              embed=lambda ids: embedded.embeddings[torch.as_tensor(ids)], timings=timings)
        return self.set_state(state)

    # ---------------------------------------------------------------- predict (predict, score: FittedModel)
    def embed(self, images: Any, desc: str = "features") -> EmbeddedImages:
        """The embed phase alone: patch embeddings of ``images`` with this model's
        backbone (built on first use). Feed them to :meth:`fit_embedded` or
        :meth:`predict_embedded` -- e.g. to embed a benchmark's images once for many fits."""
        with thread_budget(self.threads):
            return embed_images(self.embedder, images, self.transform, self._config.batch_size, self.progress, desc)

    @torch.no_grad()
    def _run(self, images: Any, with_maps: bool) -> Prediction:
        from ..data.images import count_images, iter_batches  # noqa: PLC0415

        state = self.state
        cfg = self._config
        # where predict time goes (read by benchmarks/bench_pipeline.py); on CUDA the
        # host copies synchronise, so the split is approximate there
        self.predict_timings_ = {}
        with thread_budget(self.threads):
            return predict_batches(
                iter_batches(images, self.transform, cfg.batch_size), lambda pixels: embed_batch(self.embedder, pixels),
                state.banks, image_score=cfg.image_score, threshold=state.threshold, resize=cfg.resize, crop=cfg.crop,
                with_maps=with_maps, total=count_images(images), progress=self.progress, timings=self.predict_timings_)

    @torch.no_grad()
    def predict_embedded(self, embedded: EmbeddedImages, image_size: tuple[int, int] | None = None) -> Prediction:
        """:meth:`predict` on embeddings from :meth:`embed` (maps at ``image_size``,
        default: the model's input size)."""
        state = self.state
        cfg = self._config
        if image_size is None:
            side = cfg.crop or cfg.resize
            if side is None:
                raise ValueError("predict_embedded: image_size is needed when the model keeps the native size")
            image_size = (side, side)
        self.predict_timings_ = {}
        with thread_budget(self.threads):
            parts = [score_batch(state.banks, embedded.embeddings[s : s + cfg.batch_size], cfg.image_score,
                                 tuple(image_size), self.predict_timings_)
                     for s in range(0, len(embedded), cfg.batch_size)]
        return prediction(embedded.names, embedded.sources, embedded.sizes, parts, state.threshold, cfg.resize,
                          cfg.crop)

    # ---------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to one safetensors file (no pickle, no backbone weights)."""
        from .model_io import save_state  # noqa: PLC0415

        save_state(path, self.model_type, self._config, self.state)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", weights: str | os.PathLike | None = None) -> "Detector":
        """Load a model written by :meth:`save` (verified: checksum, types, ranges, finite
        values, the backbone's weights fingerprint) on ``device``; ``weights``: the backbone
        weights file when the stored path is not valid here (a moved model). On a model
        class, the file must hold that kind of model; on ``Detector``, any kind."""
        from .model_io import read_state  # noqa: PLC0415

        stored = read_state(path, framework="pt", device=resolve_device(device))
        kind = cls._kind(stored.model_type)
        if not issubclass(kind, cls):
            raise ValueError(f"{path} holds a {kind.__name__}, not a {cls.__name__}; use load_model()")
        return kind(device=device, **stored.config.to_dict()).set_state(stored.state, weights)

    @classmethod
    def _kind(cls, model_type: str) -> type["Detector"]:
        """The detector class (this one or a subclass of the base) of a model type."""
        todo = [Detector]
        while todo:
            kind = todo.pop()
            if kind.model_type == model_type:
                return kind
            todo += kind.__subclasses__()
        raise ValueError(f"no detector class for model type {model_type!r} is loaded; use load_model()")
