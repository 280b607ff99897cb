"""The ``softpatch`` command line: fit, predict, export, evaluate, demo.

User errors (missing files, bad arguments, ValueError / FileNotFoundError from the
library) end with exit code 2 and one line ``softpatch: error: ...`` on stderr; other
failures with exit code 1 and one line. ``-v`` adds debug logging and tracebacks.

The model options are generated from the config classes' fields (their metadata:
flag, help, parser, check; :func:`softpatch_cuda.models.config.option`). Torch and the
models are imported by the commands that need them: ``softpatch --help`` and
``softpatch predict ... --graph`` run where torch is not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import logging
import math
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from .deploy.formats import FORMAT_NAMES, GRAPH_FORMATS, graph_format, verify_graph
from .errors import UsageError, full_install_hint, missing_full_install
from .models.config import PRESETS
from .models.registry import CLI_NAMES, MODEL_KINDS, kind_by_cli_name

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
  softpatch fit images/ --out m.softpatch --ray --workers 4         # shards on a Ray instance of its own
  softpatch fit images/ --out m.softpatch --ray-address auto --shards 16   # on the Ray cluster running here
  (a cluster needs softpatch_cuda on every node and the images and --out on shared storage at the same
  paths: see README, "Ray, where it runs")
"""

PREDICT_EPILOG = """\
Writes DIR/predictions.csv and DIR/predictions.json (score and verdict per image) and, per image,
DIR/overlays/<name>.png: the anomaly map over the image at its own resolution (colours: blue =
normal ... red = anomalous, the decision threshold in the middle of the scale).

examples:
  softpatch predict bottle.softpatch images/test --out results/
  softpatch predict bottle.softpatch a.png b.png --out results/ --threshold 2.5 --no-overlays
  softpatch predict bottle.softpatch images/ --out results/ --ray --workers 8      # Ray actors, same outputs
  softpatch predict bottle.softpatch images/ --out /shared/res --ray-address HEAD:6379  # a Ray cluster
  softpatch predict bottle.softpatch images/ --out results/ --graph bottle.onnx    # exported graph, no torch
"""

EXPORT_EPILOG = """\
Writes the backbone + patch embedding as a graph; the memory bank, weights, threshold and
transform stay in the model file. Beside the graph goes its checksum, GRAPH.sha256: a graph
that does not match it (damaged or changed after export), or has none, is refused when loaded;
copy it with the graph. Serve both without torch: 'softpatch predict MODEL IMAGES --graph
GRAPH', or softpatch_cuda.deploy.OnnxDetector in Python.

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
training set (they also stay in the test set: the defect recurs, unless --no-overlap), fits
SoftPatch+ and PatchCore per category and writes DIR/report.html (open it in a browser) with
DIR/results.json and the pictures.

examples:
  softpatch demo
  softpatch demo --out /tmp/demo --quick
  softpatch demo --categories carpet,bottle --noise 0.1
"""


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


@dataclasses.dataclass
class _ModelOption:
    """A command-line model option: its flag and the config field it sets, per model kind."""

    flag: str
    meta: dict  # the field metadata's "cli" entry (first declaration)
    fields: dict[str, dataclasses.Field]  # CLI model name -> config field

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


def model_options() -> list[_ModelOption]:
    """The model options of every kind, in the config classes' field order; a flag several
    kinds share (--noise-threshold: SoftPatch's noise_threshold, SoftPatch+'s cls_threshold)
    is one option."""
    options: dict[str, _ModelOption] = {}
    for kind in MODEL_KINDS:
        for f in dataclasses.fields(kind.config_class):
            cli = f.metadata.get("cli")
            if cli is not None:
                flag = cli["flag"] or "--" + f.name.replace("_", "-")
                options.setdefault(flag, _ModelOption(flag, cli, {})).fields[kind.cli_name] = f
    return list(options.values())


def _default_text(option: _ModelOption) -> str:
    defaults = {repr(f.default) for f in option.fields.values()}
    if "default" in option.meta["help"] or option.meta["negate"] or len(defaults) != 1:
        return ""
    value = next(iter(option.fields.values())).default
    shown = "none" if value is None else ",".join(value) if isinstance(value, tuple) else value
    return f" (default {shown})"


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
    g.add_argument("--device", default="auto", help="auto (default: CUDA when usable), cpu, cuda, cuda:N")
    d = parser.add_argument_group("denoising (softpatch, softpatch-plus)")
    denoising = [k.cli_name for k in MODEL_KINDS if k.config_class.denoising]
    for option in model_options():
        meta = option.meta
        common = len(option.fields) == len(MODEL_KINDS)
        only = "" if common or set(option.fields) == set(denoising) else f" ({' and '.join(option.fields)} only)"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS,
                                  "help": meta["help"].replace("%", "%%") + _default_text(option) + only}
        if meta["negate"]:
            kwargs.update(action="store_const", const=False)
        else:
            kwargs.update(metavar=meta["metavar"], choices=meta["choices"])
            if meta["multiple"]:
                kwargs["action"] = "append"
            elif meta["parse"] is not None:
                kwargs["type"] = meta["parse"]
        (g if common else d).add_argument(option.flag, dest=option.dest, **kwargs)
    d.add_argument("--removal", choices=("gated", "fixed"),
                   help="gated (default): a top-share patch goes only if it is also a robust outlier "
                        "(--removal-mad); fixed: the whole top share goes (the papers; --removal-mad none)")


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
    p.add_argument("-r", "--recursive", action=argparse.BooleanOptionalAction, default=True,
                   help="read the images in sub-folders of DATA folders too (default; --no-recursive: only "
                        "their own files)")
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
    p.add_argument("-r", "--recursive", action=argparse.BooleanOptionalAction, default=True,
                   help="read the images in sub-folders too, e.g. MVTec's test/<defect>/ (default; "
                        "--no-recursive: only the folders' own files)")
    g = p.add_argument_group("at scale")
    _add_ray_options(g, "score with Ray Data; the same outputs")
    g.add_argument("--graph", metavar="FILE",
                   help="score with an exported graph (softpatch export: "
                        f"{' / '.join(f.suffix for f in GRAPH_FORMATS)}) instead of torch; torch need not be installed")

    # ---- export
    p = add("export", "export the backbone + patch embedding for deployment without torch (ONNX, OpenVINO)",
            EXPORT_EPILOG, cmd_export)
    p.add_argument("model", metavar="MODEL", help="a model saved by 'softpatch fit'")
    p.add_argument("--format", choices=FORMAT_NAMES, default=FORMAT_NAMES[0],
                   help=", ".join(f"{f.name} ({f.suffix})" for f in GRAPH_FORMATS) + f" (default {FORMAT_NAMES[0]})")
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
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="remove the planted images from the test set (default: they stay, the defect recurs)")
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
                       help=f"{what}, on a Ray instance of its own started on this machine (never a cluster "
                            "that runs here); --ray ADDRESS is --ray-address ADDRESS (put it after the "
                            "positional arguments)")
    group.add_argument("--ray-address", metavar="ADDRESS",
                       help="join a running Ray cluster instead (implies --ray): auto (the one running on this "
                            "machine), HOST:PORT or ray://HOST:PORT; refused within seconds when it does not "
                            "answer. Every node needs softpatch_cuda installed, and the model, the images and "
                            "--out on shared storage at the same paths")
    group.add_argument("--workers", type=int, metavar="N",
                       help="Ray workers (default: the cluster's CPUs); more than the cluster has free CPUs "
                            "for: fewer start, with a warning")


def _ray_address(args: argparse.Namespace) -> str | None:
    """The Ray address checked (None: no Ray; "local": a Ray instance of its own);
    --workers only with --ray / --ray-address."""
    address = args.ray
    if args.ray_address is not None:
        if address not in (None, "local", args.ray_address):
            raise UsageError(f"--ray {args.ray} and --ray-address {args.ray_address}: give one address")
        address = args.ray_address
    if address is None:
        if args.workers is not None:
            raise UsageError("--workers needs --ray")
        return None
    flag = "--ray-address" if args.ray_address is not None else "--ray"
    if not RAY_ADDRESS.match(address):
        hint = " (it looks like a path: put --ray after the positional arguments, or write --ray=ADDRESS)" \
            if flag == "--ray" and Path(address).exists() else ""
        raise UsageError(f"{flag} {address}: not a Ray address (auto, local, ray://HOST:PORT, HOST:PORT){hint}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    return address


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


def model_kwargs(args: argparse.Namespace) -> dict:
    """Constructor arguments from the model options given (the others keep the library or
    preset defaults); each value is checked by its config field's own check, under the
    flag's name."""
    kind = kind_by_cli_name(args.model)
    kw: dict[str, Any] = {"device": _check_device(args.device), "progress": _progress(args)}
    if args.threads != "auto":
        kw["threads"] = args.threads
    if args.preset is not None:
        kw["preset"] = args.preset
    for option in model_options():
        if not hasattr(args, option.dest):  # not given (argparse.SUPPRESS)
            continue
        field = option.fields.get(kind.cli_name)
        if field is None:
            if not kind.config_class.denoising:
                raise UsageError(f"{option.flag} does not apply to --model {kind.cli_name} (it does no denoising)")
            raise UsageError(f"{option.flag} applies to --model {' and '.join(option.fields)} only")
        value = getattr(args, option.dest)
        if option.meta["multiple"]:
            value = _split_list(value)
            if "tuple" not in str(field.type):  # one value (SoftPatch's discriminator)
                if len(value) != 1:
                    raise UsageError(f"--model {kind.cli_name} takes one {field.name} ({option.flag}), got "
                                     f"{','.join(value)}")
                value = value[0]
        if field.name == "weights":
            value = _check_weights_file(value)
        try:
            kw[field.name] = field.metadata["check"](option.flag, value)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
    if kw.get("pretrained") is False and "weights" in kw:
        raise UsageError("--no-pretrained and --weights exclude each other")
    if args.removal is not None:
        if not kind.config_class.denoising:
            raise UsageError(f"--removal does not apply to --model {kind.cli_name} (it does no denoising)")
        if args.removal == "fixed":
            if hasattr(args, "removal_mad"):
                raise UsageError("--removal fixed and --removal-mad exclude each other (fixed has no gate)")
            kw["removal_mad"] = None
    return kw


def _model_file(text: str) -> Path:
    """MODEL, checked: a file saved by 'softpatch fit'."""
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {text}")
    if path.is_dir():
        raise UsageError(f"MODEL {text} is a folder, expected a file saved by 'softpatch fit'")
    return path


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
    except (ValueError, TypeError) as exc:  # options that do not go together (e.g. crop > resize)
        raise UsageError(str(exc)) from exc


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
        from .scale.memory_plan import parse_memory

        try:
            parse_memory(args.max_memory)  # a malformed size fails before any work
        except ValueError as exc:
            raise UsageError(str(exc).replace("max_memory", "--max-memory")) from None
    model = build_model(args)  # option mistakes first (cheap: no backbone yet)
    paths = collect_images(args.data, args.recursive, "DATA")
    how = ""
    if address is not None:
        how = " on a local Ray instance" if address == "local" else f" on the Ray cluster at {address}"
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
            from .scale.distributed import fit_distributed, ray_session

            with ray_session(address, quiet=args.quiet):
                return fit_distributed(model, paths, workers=args.workers, shards=args.shards, device=args.device)

        return _optional_dependency(fit_on_ray)
    if args.max_memory is not None or args.shards is not None:
        def fit_in_shards(model: Any, paths: list[str]) -> Any:
            from .scale.sharded import fit_sharded

            return fit_sharded(model, paths, shards=args.shards, max_memory=args.max_memory)

        return fit_in_shards
    return None


def _optional_dependency(fn: Callable) -> Callable:
    """A missing optional package (ray, onnx, onnxruntime, openvino) is a usage error: one line, exit 2."""
    def run(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except ImportError as exc:
            if missing_full_install(exc):
                raise  # not an optional extra: main() names the full install
            raise UsageError(str(exc)) from exc

    return run


# ====================================================================== predict
def cmd_predict(args: argparse.Namespace) -> int:
    from .jobs import ModelSource, check_writable_dir, collect_images, predict_to_folder

    model_path = _model_file(args.model)
    address = _ray_address(args)
    if args.graph is not None:  # scored without torch: no backbone, no device
        if args.weights:
            raise UsageError("--weights does not apply with --graph (the graph holds the backbone)")
        if args.device not in ("auto", "cpu"):
            raise UsageError(f"--device {args.device} does not apply with --graph (ONNX Runtime / OpenVINO on the CPU)")
        if not Path(args.graph).expanduser().is_file():
            raise FileNotFoundError(f"graph file not found: {args.graph}")
        verify_graph(Path(args.graph).expanduser())  # damaged or unverifiable: refused before any output
    out = check_writable_dir(args.out, "--out")
    paths = collect_images(args.images, args.recursive, "image path", exclude=out)
    source = ModelSource(path=str(model_path.resolve()), graph=None if args.graph is None else
                         str(Path(args.graph).expanduser().resolve()),
                         device="cpu" if args.graph is not None else _check_device(args.device),
                         weights=_check_weights_file(args.weights), threads=args.threads, threshold=args.threshold)

    def run(runner: Any = None) -> Any:
        return predict_to_folder(source, paths, out, overlays=not args.no_overlays, on_error=args.on_error,
                                 progress=_progress(args), runner=runner)

    if address is None:
        result = _optional_dependency(run)()
    else:
        def run_on_ray() -> Any:
            from .scale.distributed import chunk_runner, ray_session

            with ray_session(address, quiet=args.quiet), chunk_runner(args.workers) as runner:
                return run(runner)

        result = _optional_dependency(run_on_ray)()
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
    from .deploy import export

    model_path = _model_file(args.model)
    if args.opset < 13:
        raise UsageError(f"--opset must be >= 13, got {args.opset}")
    fmt = graph_format(args.format)
    out = Path(args.out).expanduser() if args.out else model_path.with_suffix(fmt.suffix)
    if out.suffix.lower() != fmt.suffix:
        raise UsageError(f"--out {out}: a {fmt.name} graph file name ends in {fmt.suffix}")
    from .jobs import check_writable_file

    check_writable_file(out, "--out")
    weights = _check_weights_file(args.weights)
    summary = _optional_dependency(export)(str(model_path), out, args.format, opset=args.opset, weights=weights,
                                           check=not args.no_check)
    check = ""
    if "max_rel_diff" in summary:
        check = f"; max difference to the torch embedding {summary['max_abs_diff']:.2g} ({summary['max_rel_diff']:.2g} relative)"
    print(f"Exported the {summary['metadata']['backbone']} embedding graph ({args.format}, opset {args.opset}) to "
          f"{summary['path']}{check}; its checksum, checked whenever it is loaded, to {summary['checksum']} (copy "
          f"both). Serve it with the model file: softpatch predict {model_path} IMAGES --graph {summary['path']} "
          "--out DIR")
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
        args.out, categories=_split_list(args.categories), noise=args.noise, quick=args.quick, overlap=args.overlap,
        device=_check_device(args.device), seed=args.seed, pretrained=not args.no_pretrained, backbone=args.backbone,
        layers=_split_list(args.layers), sizes=sizes, progress=_progress(args),
        log=(lambda s: None) if args.quiet else _print_above_bars, threads=args.threads,
    )
    names = results["models"]
    print("mean AUROC (image / pixel, %): " + "; ".join(
        f"{n} {format_pct(results['mean'][n]['image_auroc'])} / {format_pct(results['mean'][n]['pixel_auroc'])}" for n in names))
    print("defects caught at the threshold: " + "; ".join(
        f"{n} {t['caught']} of {t['defects']}" + (f" ({t['recurring_caught']} of {t['recurring']} recurring)"
                                                  if t["recurring"] else "") + f", {t['false_alarms']} false alarms"
        for n in names for t in [results["decisions_total"][n]]))
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
        module = missing_full_install(exc)
        if module is not None:  # a torch-free (deploy) install: fit, evaluate, export, demo need the full one
            print(f"{PROG}: error: {full_install_hint(args.command, module)}", file=sys.stderr)
            return 2
        hint = "" if args.verbose else " (run with -v for the traceback)"
        print(f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)}{hint}", file=sys.stderr)
        return 1
    finally:
        _restore_logging(logging_state)


if __name__ == "__main__":
    sys.exit(main())
