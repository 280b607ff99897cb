"""The ``softpatch`` command line: fit, predict, evaluate, demo.

User errors (missing files, bad arguments, ValueError / FileNotFoundError from the
library) end with exit code 2 and one line ``softpatch: error: ...`` on stderr; other
failures with exit code 1 and one line. ``-v`` adds debug logging and tracebacks.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UsageError
from .models.config import PRESETS
from .models.registry import CLI_NAMES, kind_by_cli_name

PROG = "softpatch"
DATASET_CHOICES = ("mvtec", "visa", "btad", "folder")

logger = logging.getLogger(__name__)


# ====================================================================== parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, our prefix, pointer to the right --help
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=100)


MAIN_EPILOG = """\
examples:
  softpatch demo                                   # no data needed: builds a small dataset, writes report.html
  softpatch fit train_images/ --out part.softpatch # fit on unlabeled (possibly contaminated) images
  softpatch predict part.softpatch new_images/ --out results/
  softpatch evaluate --dataset mvtec --root ~/data/mvtec --category bottle,screw --noise 0.1 --out eval/
  softpatch export part.softpatch --format onnx         # deploy without torch (ONNX Runtime / OpenVINO)

Run 'softpatch COMMAND --help' for the options of a command.
"""

FIT_EPILOG = """\
DATA are image files and/or folders of images (the training set: mostly normal images; a few
defective ones are fine -- SoftPatch finds and down-weights them). The model is saved to --out,
the training-contamination report (every training image with its contamination score, most
suspicious first) to --report (default: next to the model, <name>_training_report.csv).

examples:
  softpatch fit images/train --out bottle.softpatch
  softpatch fit images/train --out bottle.softpatch --model softpatch-plus --coreset-ratio 0.05
  softpatch fit images/ --out m.softpatch --backbone resnet18 --layers layer2,layer3 --weights r18.pth
  softpatch fit images/ --out m.softpatch --resize 320 --crop 288 --device cuda

at scale (see README, "At scale"):
  softpatch fit images/ --out m.softpatch --max-memory 8G          # bounded memory: shards, one bank
  softpatch fit images/ --out m.softpatch --ray --workers 4         # shards on a local Ray instance
  softpatch fit images/ --out m.softpatch --ray auto --shards 16    # on a running Ray cluster
"""

PREDICT_EPILOG = """\
Writes DIR/predictions.csv and DIR/predictions.json (score and verdict per image) and, per image,
DIR/overlays/<name>.png: the anomaly map over the image at its own resolution (colours: blue =
normal ... red = anomalous, the decision threshold in the middle of the scale).

examples:
  softpatch predict bottle.softpatch images/test --out results/
  softpatch predict bottle.softpatch a.png b.png --out results/ --threshold 2.5 --no-overlays
  softpatch predict bottle.softpatch images/ --out results/ --ray --workers 8      # Ray Data, same outputs
  softpatch predict bottle.softpatch images/ --out results/ --graph bottle.onnx    # exported graph, no torch
"""

EXPORT_EPILOG = """\
Writes the backbone + patch embedding as a graph; the memory bank, weights, threshold and
transform stay in the model file. Serve both without torch: softpatch_cuda.deploy.OnnxDetector
in Python, 'python -m softpatch_cuda.deploy MODEL GRAPH IMAGES --out DIR', or 'softpatch predict
MODEL IMAGES --graph GRAPH'.

examples:
  softpatch export bottle.softpatch                         # bottle.onnx
  softpatch export bottle.softpatch --format openvino -o ir/bottle.xml
"""

EVALUATE_EPILOG = """\
Per category: load the dataset split, optionally plant --noise x |train| defective test images
in the training set (seeded; removed from the test set unless --overlap), fit, predict the
test set and compute image AUROC, pixel AUROC, AUPRO (FPR <= 30%) and image F1-max. Writes
DIR/results.md (table with a mean row), DIR/results.json and DIR/noise_records.json.

examples:
  softpatch evaluate --dataset mvtec --root ~/data/mvtec --out eval/
  softpatch evaluate --dataset mvtec --root ~/data/mvtec --category bottle --category screw \\
      --noise 0.1 --model softpatch-plus --out eval/
  softpatch evaluate --dataset visa --root ~/data/visa --noise 0.08 --overlap --out eval_visa/
  softpatch evaluate --dataset folder --root my_parts/ --out eval_parts/
"""

DEMO_EPILOG = """\
Needs no data and no network: generates a small MVTec-style dataset (textures and rendered
objects with synthetic defects) in DIR/data, plants --noise x |train| defective images in each
training set, fits SoftPatch+ and PatchCore per category and writes DIR/report.html (open it in
a browser) with DIR/results.json and the pictures.

examples:
  softpatch demo
  softpatch demo --out /tmp/demo --quick
  softpatch demo --categories carpet,bottle --noise 0.1
"""


def _size_or_none(text: str) -> int | None:
    if text.lower() in ("none", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}")
    return value


def _split_list(values: Sequence[str] | None) -> list[str] | None:
    """Repeatable options that also take comma lists: ['a,b', 'c'] -> ['a', 'b', 'c']."""
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


def _add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    # The subcommands repeat the global options (so 'softpatch fit ... -q' works); their
    # defaults are suppressed there, or they would overwrite what was given before the command.
    default = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    group = parser.add_argument_group("output")
    group.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help="no progress bars, only results and errors")
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help="debug logging; tracebacks on errors")
    group.add_argument("--threads", type=_threads, default=default("auto"), metavar="N",
                       help="CPU threads: auto (default: the cores other processes leave free, re-checked at "
                            "each phase) or a number")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", choices=CLI_NAMES, default="softpatch",
                   help="softpatch (default): noise-robust PatchCore (LOF per patch position); "
                        "softpatch-plus: several noise discriminators, separate banks for "
                        "classification and segmentation; patchcore: no denoising")
    g.add_argument("--preset", choices=PRESETS, default=None,
                   help="default, or paper: the authors' settings (WRN-50-2 with torchvision's weights -- give "
                        "them with --weights offline --, squared distances, fixed 15 %% removal, weights = "
                        "score / median); options given explicitly override the preset")
    g.add_argument("--backbone", metavar="NAME", help="timm CNN name (default: efficientnet_lite0)")
    g.add_argument("--layers", metavar="L1,L2", action="append",
                   help="feature layers of the backbone, comma list (default: the backbone's default)")
    g.add_argument("--weights", metavar="FILE",
                   help="backbone weights (.pth/.safetensors state dict); default: pretrained weights")
    g.add_argument("--no-pretrained", action="store_true",
                   help="random backbone weights (for smoke tests only: results are meaningless)")
    g.add_argument("--device", default="auto", help="auto (default: CUDA when usable), cpu, cuda, cuda:N")
    g.add_argument("--coreset-ratio", type=_finite_float, metavar="F",
                   help="fraction of training patches kept in the memory bank (default 0.1)")
    g.add_argument("--seed", type=int, help="random seed (projection, coreset start; default 0)")
    g.add_argument("--resize", type=_size_or_none, metavar="N",
                   help="resize images to N x N first (default 256; 'none' keeps the size)")
    g.add_argument("--crop", type=_size_or_none, metavar="N",
                   help="then centre-crop N x N (default 224; 'none' for no crop)")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass (default 16)")
    g.add_argument("--distance", choices=("l2", "squared_l2"),
                   help="nearest-neighbour distance (default l2; squared_l2 as the authors' code)")
    g.add_argument("--image-score", choices=("max", "reweighted"),
                   help="image score: the largest patch score (default) or PatchCore's eq. 7 re-weighting")
    g.add_argument("--search", choices=("exact", "pca"),
                   help="nearest-neighbour search: exact (default) or pca (principal-subspace candidates, exact "
                        "re-rank: ~3x less k-NN work, small measured tolerance)")
    d = parser.add_argument_group("denoising (softpatch, softpatch-plus)")
    d.add_argument("--noise-threshold", type=_fraction, metavar="F",
                   help="top share of patch outlier scores that may be kept out of the (classification) bank "
                        "(default 0.15)")
    d.add_argument("--seg-threshold", type=_fraction, metavar="F",
                   help="softpatch-plus: share removed from the segmentation bank (default 0.2)")
    d.add_argument("--removal", choices=("gated", "fixed"),
                   help="gated (default): a top-share patch goes only if it is also a robust outlier "
                        "(--removal-mad); fixed: the whole top share goes (the papers)")
    d.add_argument("--removal-mad", type=_finite_float, metavar="K",
                   help="the gate: score above median + K * 1.4826 * MAD (default 6)")
    d.add_argument("--seg-removal-gate", choices=("none", "any", "all"),
                   help="softpatch-plus: segmentation bank gate (default none: its whole top share goes)")
    d.add_argument("--weight-mode", choices=("outlier", "clamped", "median"),
                   help="soft weights: outlier (default; 1 for inliers), clamped, median (the papers)")
    d.add_argument("--weight-fusion", choices=("min", "mean"),
                   help="softpatch-plus: combine the discriminators' soft weights by min (default: every "
                        "discriminator must call a patch an outlier) or mean (the papers)")
    d.add_argument("--no-soft-weights", action="store_true", help="no soft weights (distances unscaled)")
    d.add_argument("--alignment", choices=("auto", "position", "window", "global"),
                   help="which training patches are compared: auto (default), position (the paper), "
                        "window, global")
    d.add_argument("--lof-k", type=int, metavar="K", help="LOF neighbours (default 6)")
    d.add_argument("--discriminators", metavar="D1,D2", action="append",
                   help="lof, nearest, gaussian: softpatch takes one (default lof), softpatch-plus a comma list "
                        "(default lof,gaussian)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="SoftPatch / SoftPatch+ anomaly detection trained on unlabeled, possibly "
                    "contaminated images: fit, predict, evaluate on benchmark datasets, or run the demo.",
        epilog=MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_text: str, epilog: str, handler: Callable) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog, formatter_class=_Formatter)
        _add_global_options(p, suppress=True)
        p.set_defaults(handler=handler)
        return p

    # ---- fit
    p = add("fit", "fit a model on training images and report suspected contaminated images", FIT_EPILOG, cmd_fit)
    p.add_argument("data", nargs="+", metavar="DATA", help="training image files and/or folders")
    p.add_argument("-o", "--out", required=True, metavar="MODEL", help="where to save the model (e.g. model.softpatch)")
    p.add_argument("--report", metavar="CSV", help="training report CSV (default: <model>_training_report.csv)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="suspects printed (default 10)")
    p.add_argument("-r", "--recursive", action="store_true", help="also read images in sub-folders of DATA folders")
    _add_model_options(p)
    g = p.add_argument_group("at scale")
    _add_ray_options(g, "the shards run on Ray actors")
    g.add_argument("--shards", type=int, metavar="N",
                   help="split the training images into N shards, each denoised on its own, one memory bank "
                        "(default with --ray: one per worker)")
    g.add_argument("--max-memory", metavar="SIZE",
                   help="keep the fit under SIZE of memory (e.g. 8G, 512M): shards sized to fit, refused at once "
                        "when impossible")

    # ---- predict
    p = add("predict", "score images with a saved model: CSV/JSON and heatmap overlays", PREDICT_EPILOG, cmd_predict)
    p.add_argument("model", metavar="MODEL", help="a model saved by 'softpatch fit'")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--threshold", type=_finite_float, metavar="X",
                   help="decision threshold on image scores (default: the one stored in the model)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-overlays", action="store_true", help="skip the heatmap PNGs")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="unreadable images: stop with an error (default) or skip them (listed in the CSV "
                        "with the reason)")
    p.add_argument("--weights", metavar="FILE",
                   help="backbone weights file, when the path stored in the model is not valid here")
    p.add_argument("-r", "--recursive", action="store_true", help="also read images in sub-folders")
    g = p.add_argument_group("at scale")
    _add_ray_options(g, "score with Ray Data; the same outputs")
    g.add_argument("--graph", metavar="FILE",
                   help="score with an exported graph (softpatch export: .onnx / .xml) instead of torch")

    # ---- export
    p = add("export", "export the backbone + patch embedding for deployment without torch (ONNX, OpenVINO)",
            EXPORT_EPILOG, cmd_export)
    p.add_argument("model", metavar="MODEL", help="a model saved by 'softpatch fit'")
    p.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                   help="onnx (default) or openvino (IR .xml + .bin; needs the openvino package)")
    p.add_argument("-o", "--out", metavar="FILE", help="graph file (default: MODEL with .onnx / .xml)")
    p.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset (default 17)")
    p.add_argument("--weights", metavar="FILE",
                   help="backbone weights file, when the path stored in the model is not valid here")
    p.add_argument("--no-check", action="store_true",
                   help="skip running the graph against the torch embedding after writing it")

    # ---- evaluate
    p = add("evaluate", "fit + test per category of a benchmark dataset, with optional training noise",
            EVALUATE_EPILOG, cmd_evaluate)
    p.add_argument("--dataset", required=True, choices=DATASET_CHOICES, help="dataset layout")
    p.add_argument("--root", required=True, metavar="PATH", help="dataset root folder")
    p.add_argument("--category", "--categories", dest="category", action="append", metavar="NAME",
                   help="category (repeatable or comma list; default: all present under --root)")
    p.add_argument("--noise", type=_fraction, default=0.0, metavar="R",
                   help="plant round(R x |train|) defective test images in the training set (default 0)")
    p.add_argument("--overlap", action="store_true",
                   help="keep the planted images in the test set too (default: removed, 'no-overlap')")
    p.add_argument("--noise-seed", type=int, default=0, metavar="N", help="seed of the noise draw (default 0)")
    p.add_argument("--noise-rounding", choices=("round", "floor"), default=None,
                   help="planted count = round (default) or floor (the authors' code; the default with "
                        "--preset paper) of R x |train|")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--save-models", action="store_true", help="also save each fitted model to DIR/models/")
    _add_model_options(p)

    # ---- demo
    p = add("demo", "self-contained demo: synthetic data, noisy training, HTML report", DEMO_EPILOG, cmd_demo)
    p.add_argument("-o", "--out", default="softpatch_demo", metavar="DIR", help="output folder (default ./softpatch_demo)")
    p.add_argument("--categories", "--category", dest="categories", action="append", metavar="NAME",
                   help="demo categories (repeatable or comma list; default: all)")
    p.add_argument("--noise", type=_fraction, default=0.2, metavar="R", help="training contamination ratio (default 0.2)")
    p.add_argument("--quick", action="store_true", help="fewer and smaller images (about 4x faster, rougher numbers)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the noise draw (default 0)")
    # Undocumented knobs for tests and experiments.
    p.add_argument("--no-pretrained", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backbone", help=argparse.SUPPRESS)
    p.add_argument("--layers", action="append", help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-train", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-test-good", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-test-defect", type=int, help=argparse.SUPPRESS)
    return parser


# ====================================================================== helpers
RAY_ADDRESS = re.compile(r"^(auto|local|(ray|https?)://[\w.\-]+(:\d+)?|[\w.\-]+:\d+)$")


def _add_ray_options(group: Any, what: str) -> None:
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help=f"{what}: a local Ray instance (no ADDRESS), 'auto' (the running cluster) or "
                            "ray://HOST:PORT; put it after the positional arguments")
    group.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: the cluster's CPUs)")


def _ray_address(args: argparse.Namespace) -> str | None:
    """The --ray address checked (None: no Ray); --workers only with --ray."""
    if args.ray is None:
        if args.workers is not None:
            raise UsageError("--workers needs --ray")
        return None
    if not RAY_ADDRESS.match(args.ray):
        hint = " (it looks like a path: put --ray after the positional arguments, or write --ray=ADDRESS)" \
            if Path(args.ray).exists() else ""
        raise UsageError(f"--ray {args.ray}: not a Ray address (auto, local, ray://HOST:PORT, HOST:PORT){hint}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    return args.ray


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet


def _check_device(device: str) -> str:
    """--device value checked now: a machine without a usable GPU is a usage error, not a crash."""
    from .runtime import resolve_device

    try:
        resolve_device(device)
    except RuntimeError as exc:  # "cuda" requested, none usable: resolve_device says why
        raise UsageError(f"--device {device}: {exc}") from exc
    except ValueError as exc:
        raise UsageError(f"--device: {exc}") from exc
    return device


# CLI option -> constructor option per model (None: the option does not apply to that model).
_DENOISING_OPTIONS: dict[str, dict[str, str]] = {
    "noise_threshold": {"softpatch": "noise_threshold", "softpatch-plus": "cls_threshold"},
    "seg_threshold": {"softpatch-plus": "seg_threshold"},
    "removal_mad": {"softpatch": "removal_mad", "softpatch-plus": "removal_mad"},
    "seg_removal_gate": {"softpatch-plus": "seg_removal_gate"},
    "weight_mode": {"softpatch": "weight_mode", "softpatch-plus": "weight_mode"},
    "weight_fusion": {"softpatch-plus": "weight_fusion"},
    "alignment": {"softpatch": "alignment", "softpatch-plus": "alignment"},
    "lof_k": {"softpatch": "lof_k", "softpatch-plus": "lof_k"},
}
_COMMON_OPTIONS = ("backbone", "weights", "coreset_ratio", "seed", "batch_size", "distance", "image_score", "search")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def model_kwargs(args: argparse.Namespace) -> dict:
    """Constructor arguments from the model options; options not given keep the library
    (or preset) defaults. Value checks are the model config's; this only maps names."""
    kind = args.model
    kw: dict[str, Any] = {"device": _check_device(args.device), "progress": _progress(args)}
    if args.threads != "auto":
        kw["threads"] = args.threads
    if args.preset is not None:
        kw["preset"] = args.preset
    for key in _COMMON_OPTIONS:
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    layers = _split_list(getattr(args, "layers", None))
    if layers:
        kw["layers"] = layers
    if getattr(args, "no_pretrained", False):
        if args.weights:
            raise UsageError("--no-pretrained and --weights exclude each other")
        kw["pretrained"] = False
    if args.weights:
        kw["weights"] = _check_weights_file(args.weights)
    # argparse stores "none" as None, so tell "not given" from "none" by looking at argv order-free:
    for attr in ("resize", "crop"):
        if attr in getattr(args, "_given_sizes", {}):
            kw[attr] = args._given_sizes[attr]
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    for attr, per_model in _DENOISING_OPTIONS.items():
        if getattr(args, attr, None) is None:
            continue
        if kind not in per_model:
            if kind == "patchcore":
                raise UsageError(f"{_flag(attr)} does not apply to --model patchcore (it does no denoising)")
            raise UsageError(f"{_flag(attr)} applies to --model {' and '.join(per_model)} only")
        kw[per_model[kind]] = getattr(args, attr)
    if args.removal == "fixed":
        if args.removal_mad is not None:
            raise UsageError("--removal fixed and --removal-mad exclude each other (fixed has no gate)")
        kw["removal_mad"] = None
    denoising_flags = [f for f, given in (("--removal", args.removal), ("--no-soft-weights", args.no_soft_weights),
                                          ("--discriminators", args.discriminators)) if given]
    if denoising_flags and kind == "patchcore":
        raise UsageError(f"{denoising_flags[0]} does not apply to --model patchcore (it does no denoising)")
    if args.no_soft_weights:
        kw["soft_weights"] = False
    discriminators = _split_list(args.discriminators)
    if discriminators:
        if kind == "softpatch":
            if len(discriminators) != 1:
                raise UsageError(f"--model softpatch takes one discriminator, got {','.join(discriminators)}")
            kw["discriminator"] = discriminators[0]
        else:
            kw["discriminators"] = discriminators
    return kw


def _check_weights_file(weights: str | None) -> str | None:
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--weights file not found: {weights}")
    return str(path.resolve())


def build_model(args: argparse.Namespace) -> Any:
    kwargs = model_kwargs(args)  # option mistakes first, before any heavy import
    try:
        return kind_by_cli_name(args.model).cls(**kwargs)
    except (ValueError, TypeError) as exc:  # name the flag, not the Python option
        message = str(exc)
        for key in sorted({*_COMMON_OPTIONS, *(o for m in _DENOISING_OPTIONS.values() for o in m.values()),
                           "discriminator", "discriminators", "layers", "resize", "crop"}, key=len, reverse=True):
            message = re.sub(rf"\b{key}\b", _flag(key if key != "cls_threshold" else "noise_threshold"), message)
        raise UsageError(message) from exc


def _record_given_sizes(args: argparse.Namespace, argv: Sequence[str]) -> None:
    # --resize none / --crop none mean "skip this step" (None), which argparse cannot tell
    # from "option not given" (also None): remember which of the two were on the command line.
    given = {}
    for attr in ("resize", "crop"):
        flag = f"--{attr}"
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            given[attr] = getattr(args, attr, None)
    args._given_sizes = given


def _training_report_csv_path(model_path: Path, report: str | None) -> Path:
    if report:
        return Path(report).expanduser()
    name = model_path.name
    stem = name[: -len(model_path.suffix)] if model_path.suffix else name
    return model_path.with_name(f"{stem}_training_report.csv")


def _say(args: argparse.Namespace, text: str = "") -> None:
    """Progress-type output (suppressed by --quiet); results are printed regardless."""
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


# ====================================================================== fit
def cmd_fit(args: argparse.Namespace) -> int:
    from .jobs import collect_images, fit_to_file
    from .report import format_training_report

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise UsageError(f"--out {args.out} is a folder; give a file name such as {out / 'model.softpatch'}")
    if args.top < 0:
        raise UsageError(f"--top must be >= 0, got {args.top}")
    address = _ray_address(args)
    if args.shards is not None and args.shards < 1:
        raise UsageError(f"--shards must be >= 1, got {args.shards}")
    if args.max_memory is not None:
        if address is not None:
            raise UsageError("--max-memory bounds a fit on this machine; with --ray choose the shards (--shards)")
        if args.shards is not None:
            raise UsageError("--max-memory chooses the shards itself; give --max-memory or --shards, not both")
        from .sharded import parse_memory

        try:
            parse_memory(args.max_memory)  # a malformed size fails before any work
        except ValueError as exc:
            raise UsageError(str(exc).replace("max_memory", "--max-memory")) from None
    model = build_model(args)  # option mistakes first (cheap: no backbone yet)
    paths = collect_images(args.data, args.recursive, "DATA")
    how = ""
    if address is not None:
        how = f" on Ray ({address})"
    elif args.max_memory is not None:
        how = f" within {args.max_memory} of memory"
    elif args.shards is not None:
        how = f" in {args.shards} shards"
    _say(args, f"Fitting {kind_by_cli_name(args.model).display_name} on {len(paths)} images{how} ...")
    result = fit_to_file(model, paths, out, _training_report_csv_path(out, args.report), fit=_fit_function(args, address))
    print(format_training_report(model.training_report(), top=args.top))
    print(f"Decision threshold on image scores: {float(model.threshold):.4g}")
    print(f"Model saved to {result.model_path} (fit in {result.fit_s:.1f} s); training report: {result.report_csv}")
    return 0


def _fit_function(args: argparse.Namespace, address: str | None) -> Callable | None:
    """How fit_to_file fits: the model's own fit (None), the bounded-memory / sharded fit, or Ray."""
    if address is not None:
        def fit_on_ray(model: Any, paths: list[str]) -> Any:
            from .distributed import fit_distributed, ray_session

            with ray_session(address, quiet=args.quiet):
                return fit_distributed(model, paths, workers=args.workers, shards=args.shards, device=args.device)

        return _optional_dependency(fit_on_ray)
    if args.max_memory is not None or args.shards is not None:
        def fit_in_shards(model: Any, paths: list[str]) -> Any:
            from .sharded import fit_sharded

            return fit_sharded(model, paths, shards=args.shards, max_memory=args.max_memory)

        return fit_in_shards
    return None


def _optional_dependency(fn: Callable) -> Callable:
    """A missing optional package (ray, onnx, onnxruntime, openvino) is a usage error: one line, exit 2."""
    def run(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except ImportError as exc:
            raise UsageError(str(exc)) from exc

    return run


# ====================================================================== predict
def cmd_predict(args: argparse.Namespace) -> int:
    from . import load_model
    from .jobs import check_writable_dir, collect_images, predict_to_folder

    model_path = Path(args.model).expanduser()
    if not model_path.exists():
        raise FileNotFoundError(f"model file not found: {args.model}")
    if model_path.is_dir():
        raise UsageError(f"MODEL {args.model} is a folder, expected a file saved by 'softpatch fit'")
    address = _ray_address(args)
    if args.graph is not None:
        if address is not None:
            raise UsageError("--graph and --ray exclude each other (score a graph with Python: softpatch_cuda.deploy)")
        if args.weights:
            raise UsageError("--weights does not apply with --graph (the graph holds the backbone)")
        if args.device not in ("auto", "cpu"):
            raise UsageError(f"--device {args.device} does not apply with --graph (ONNX Runtime / OpenVINO on the CPU)")
        if not Path(args.graph).expanduser().is_file():
            raise FileNotFoundError(f"graph file not found: {args.graph}")
    out = check_writable_dir(args.out, "--out")
    paths = collect_images(args.images, args.recursive, "image path")
    weights = _check_weights_file(args.weights)
    device = _check_device(args.device)
    if address is not None:
        def run_on_ray() -> Any:
            from .distributed import predict_to_folder_ray, ray_session

            with ray_session(address, quiet=args.quiet):
                return predict_to_folder_ray(model_path, paths, out, workers=args.workers, threshold=args.threshold,
                                             overlays=not args.no_overlays, on_error=args.on_error,
                                             progress=_progress(args), device=device, weights=weights)

        result = _optional_dependency(run_on_ray)()
    else:
        if args.graph is not None:
            from .deploy import OnnxDetector

            model = _optional_dependency(OnnxDetector)(model_path, args.graph)
        else:
            model = load_model(model_path, device=device, weights=weights)
            model.threads = args.threads
        result = predict_to_folder(model, paths, out, threshold=args.threshold, overlays=not args.no_overlays,
                                   on_error=args.on_error, progress=_progress(args), model_path=str(model_path))
    rows = result.rows
    width = max(len(r["name"]) for r in rows)
    if not args.quiet:
        print(f"{'image':<{width}}  {'score':>10}  verdict")
        for r in rows:
            score = "" if r["score"] is None else f"{r['score']:>10.4g}"
            print(f"{r['name']:<{width}}  {score:>10}  {r['verdict']}" + (f" ({r['error']})" if r["error"] else ""))
    errors = f"; {result.n_errors} unreadable image(s) skipped" if result.n_errors else ""
    print(f"{result.n_anomalous} of {len(rows)} images anomalous (threshold {result.threshold:.4g}){errors}. "
          f"Results: {result.csv_path}, {result.json_path}"
          + ("" if args.no_overlays else f", overlays in {result.overlays}"))
    return 0


# ====================================================================== export
def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    model_path = Path(args.model).expanduser()
    if not model_path.exists():
        raise FileNotFoundError(f"model file not found: {args.model}")
    if model_path.is_dir():
        raise UsageError(f"MODEL {args.model} is a folder, expected a file saved by 'softpatch fit'")
    if args.opset < 13:
        raise UsageError(f"--opset must be >= 13, got {args.opset}")
    suffix = ".onnx" if args.format == "onnx" else ".xml"
    out = Path(args.out).expanduser() if args.out else model_path.with_suffix(suffix)
    if args.format == "openvino" and out.suffix.lower() != ".xml":
        raise UsageError(f"--out {out}: an OpenVINO IR file name ends in .xml")
    from .jobs import check_writable_file

    check_writable_file(out, "--out")
    weights = _check_weights_file(args.weights)
    summary = _optional_dependency(export)(str(model_path), out, args.format, opset=args.opset, weights=weights,
                                           check=not args.no_check)
    check = ""
    if "max_rel_diff" in summary:
        check = f"; max difference to the torch embedding {summary['max_abs_diff']:.2g} ({summary['max_rel_diff']:.2g} relative)"
    print(f"Exported the {summary['metadata']['backbone']} embedding graph ({args.format}, opset {args.opset}) to "
          f"{summary['path']}{check}. Serve it with the model file: softpatch predict {model_path} IMAGES --graph "
          f"{summary['path']} --out DIR")
    return 0


def _print_above_bars(text: str) -> None:
    """A progress message that does not tear an active tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


# ====================================================================== evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import __version__
    from .data import datasets
    from .data.noise import apply_noise
    from .evaluation import evaluate_split, results_table_markdown, write_results
    from .report import write_json

    root = Path(args.root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"--root not found: {args.root}")
    if not root.is_dir():
        raise UsageError(f"--root {args.root} is not a folder")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    model_kwargs(args)  # validate the model options before any long work

    categories = _split_list(args.category) or list(datasets.list_categories(args.dataset, root))
    rows: list[dict] = []
    records: list[dict] = []
    for n, category in enumerate(categories, 1):
        label = category
        split = datasets.load_dataset(args.dataset, root, category)
        rounding = args.noise_rounding or ("floor" if args.preset == "paper" else "round")
        split, record = apply_noise(split, args.noise, seed=args.noise_seed, overlap=args.overlap, rounding=rounding)
        records.append(record.to_dict())
        _say(args, f"[{n}/{len(categories)}] {label}: {len(split.train)} training images "
                   f"({len(record.added)} planted defects), {len(split.test)} test images")
        model = build_model(args)
        row = evaluate_split(model, split, progress=_progress(args))
        row["category"] = split.category or label
        row["model"] = args.model
        row["noise"] = args.noise
        row["overlap"] = bool(args.overlap)
        row["n_planted"] = len(record.added)
        rows.append(row)
        if args.save_models:
            (out / "models").mkdir(parents=True, exist_ok=True)
            model.save(out / "models" / f"{row['category']}.softpatch")
        _say(args, "    " + ", ".join(
            f"{k} {'n/a' if row[k] is None else f'{100 * row[k]:.1f}'}"
            for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
        ) + f", fit {row['fit_s']:.1f} s, predict {row['predict_s']:.1f} s")

    setting = "no noise" if args.noise == 0 else f"noise {args.noise:g} ({'overlap' if args.overlap else 'no-overlap'})"
    title = f"{kind_by_cli_name(args.model).display_name} on {args.dataset}, {setting}"
    meta = {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "softpatch_cuda": __version__, "dataset": args.dataset, "root": str(root), "model": args.model,
        "model_kwargs": {k: v for k, v in model_kwargs(args).items() if k != "progress"},
        "noise": args.noise, "overlap": bool(args.overlap), "noise_seed": args.noise_seed,
        "metrics_note": "fractions in [0,1]; pixel metrics in the model frame (after resize + crop); "
                        "None = undefined for this split",
    }
    json_path, md_path = write_results(rows, out, meta=meta, title=title)
    noise_path = write_json(out / "noise_records.json", records)
    print(f"{title} (metrics in %)\n")
    print(results_table_markdown(rows))
    print(f"Results: {md_path}, {json_path}; noise records: {noise_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.app import run_demo
    from .report import format_pct

    sizes = {"image_size": args.image_size, "n_train": args.n_train, "n_test_good": args.n_test_good,
             "n_test_defect": args.n_test_defect}
    for key, value in sizes.items():
        if value is not None and value < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    results = run_demo(
        args.out, categories=_split_list(args.categories), noise=args.noise, quick=args.quick,
        device=_check_device(args.device), seed=args.seed, pretrained=not args.no_pretrained, backbone=args.backbone,
        layers=_split_list(args.layers), sizes=sizes, progress=_progress(args),
        log=(lambda s: None) if args.quiet else _print_above_bars, threads=args.threads,
    )
    names = results["models"]
    print("mean AUROC (image / pixel, %): " + "; ".join(
        f"{n} {format_pct(results['mean'][n]['image_auroc'])} / {format_pct(results['mean'][n]['pixel_auroc'])}" for n in names))
    print(f"Demo finished in {results['elapsed_s']:.0f} s. Report: {Path(results['report']).resolve()}")
    return 0


# ====================================================================== main
def _configure_logging(verbose: bool, quiet: bool) -> tuple[logging.Handler, int]:
    """Our handler on the root logger; returns what _restore_logging needs (main() may run
    in-process, e.g. in tests, and must not leave handlers on a closed stream behind)."""
    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    fmt = "%(levelname)s %(name)s: %(message)s" if verbose else f"{PROG}: %(levelname)s: %(message)s"
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    if verbose:
        # PIL logs every PNG chunk at debug level: noise, not information about our run.
        handler.addFilter(lambda record: not record.name.startswith("PIL."))
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    return handler, previous_level


def _restore_logging(state: tuple[logging.Handler, int]) -> None:
    handler, previous_level = state
    root = logging.getLogger()
    root.removeHandler(handler)
    root.setLevel(previous_level)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError):  # str(KeyError) adds quotes
        text = f"missing key {text}"
    return " ".join(text.split())


USER_ERRORS = (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FileExistsError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``softpatch`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    _record_given_sizes(args, argv)
    logging_state = _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 -- anything else: a failure, not a usage mistake
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else " (run with -v for the traceback)"
        print(f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)}{hint}", file=sys.stderr)
        return 1
    finally:
        _restore_logging(logging_state)


if __name__ == "__main__":
    sys.exit(main())
