"""The self-contained demo: synthetic MVTec-style data (:mod:`.synthetic`), the demo run
(:mod:`.app`) and its HTML report (:mod:`.html`).

Not imported by ``import softpatch_cuda`` (it needs scipy and scikit-image): import
``softpatch_cuda.demo`` explicitly.
"""

from .app import DEMO_MODELS, DEMO_SIZES, run_demo
from .synthetic import DEMO_CATEGORIES, DEMO_DEFECT_TYPES, make_demo_dataset

__all__ = ["DEMO_CATEGORIES", "DEMO_DEFECT_TYPES", "DEMO_MODELS", "DEMO_SIZES", "make_demo_dataset", "run_demo"]
