"""Detectors: PatchCore, SoftPatch and SoftPatch+ -- one pipeline, three configurations.

* :mod:`.config` -- typed, frozen configurations and the ``paper`` preset;
* :mod:`.detector` -- the pipeline (fit = embed -> denoise -> build banks -> report -> calibrate);
* :mod:`.calibration` -- the unsupervised threshold;
* :mod:`.model_io` -- save / restore;
* :mod:`.registry` -- the table of model kinds and :func:`load_model`.
"""

from .config import PRESETS, PatchCoreConfig, SoftPatchConfig, SoftPatchPlusConfig
from .detector import Detector
from .kinds import PatchCore, SoftPatch, SoftPatchPlus
from .registry import CLI_NAMES, MODEL_KINDS, ModelKind, kind_by_cli_name, kind_of, load_model

__all__ = [
    "CLI_NAMES", "MODEL_KINDS", "PRESETS", "Detector", "ModelKind", "PatchCore", "PatchCoreConfig", "SoftPatch",
    "SoftPatchConfig", "SoftPatchPlus", "SoftPatchPlusConfig", "kind_by_cli_name", "kind_of", "load_model",
]
