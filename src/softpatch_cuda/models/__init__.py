"""Detectors: PatchCore, SoftPatch and SoftPatch+ -- one pipeline, three configurations.

* :mod:`.config` -- typed, frozen configurations and the ``paper`` preset;
* :mod:`.registry` -- the table of model kinds and :func:`load_model`;
* :mod:`.state` -- the fitted state; :mod:`.model_io` -- it in a model file and back;
* :mod:`.phases` -- the fit (prepare -> denoise -> select, merge -> calibrate -> fit info);
* :mod:`.calibration` -- the unsupervised threshold;
* :mod:`.detector`, :mod:`.kinds` -- the detector and its three kinds.

The configs and the registry load without torch (the command line, the torch-free
predictor); the detectors are imported on first use.
"""

from .config import PRESETS, PatchCoreConfig, SoftPatchConfig, SoftPatchPlusConfig
from .registry import CLI_NAMES, MODEL_KINDS, ModelKind, kind_by_cli_name, kind_by_type, kind_of, load_model

_DETECTORS = {"Detector": ".detector", "PatchCore": ".kinds", "SoftPatch": ".kinds", "SoftPatchPlus": ".kinds"}


def __getattr__(name: str):
    if name not in _DETECTORS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    value = getattr(importlib.import_module(_DETECTORS[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "CLI_NAMES", "MODEL_KINDS", "PRESETS", "Detector", "ModelKind", "PatchCore", "PatchCoreConfig", "SoftPatch",
    "SoftPatchConfig", "SoftPatchPlus", "SoftPatchPlusConfig", "kind_by_cli_name", "kind_by_type", "kind_of",
    "load_model",
]
