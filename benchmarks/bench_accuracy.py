"""Accuracy under training-set contamination: PatchCore / SoftPatch / SoftPatch+ (and
anomalib's PatchCore) on real MVTec-layout data or the demo data, both protocols.

    python benchmarks/bench_accuracy.py --root ../shared/data \\
        --categories mvtec_transistor,mtd_magnetic_tile,deeppcb_pcb --name real
    python benchmarks/bench_accuracy.py --demo --name demo
    options: --noise 0,0.1,0.2,0.4 --seeds 0,1,2 --protocols no-overlap,overlap
             --models patchcore,softpatch,softpatch-plus,anomalib-patchcore
             --models "softpatch-plus[preset=paper]" (options in brackets: key=value,...)
             --coreset-ratio R --backbone NAME --device cpu|cuda --out DIR

The papers' noise protocol: for a ratio r, round(r x |train|) anomalous test images
(drawn with the seed) join the training set. No-overlap: they leave the test set;
overlap: they stay (the detector has memorised them). One fit serves both protocols
(the training set is the same); the test metrics are computed on the two test sets.
When a category has too few anomalous images for r (e.g. MVTec AD transistor, 40
defective images, at r >= 0.2), the clean training set is subsampled (evenly spaced)
so that round(r x n_train) <= anomalous - min(--min-left, anomalous / 2); the tables
give n_train.

Every image is embedded once per category (all our models share the backbone); fit
and predict then run from the cached embeddings (``fit_embedded`` /
``predict_embedded``), so "fit s" is denoising + coreset + calibration.

Per run the JSON records what the denoising did (patches removed per bank, soft-weight
quantiles, flagged training images) and how well the training report finds the
planted images (AUROC of its scores, precision / recall of its flags), so a method
that silently does nothing shows. Writes <out>/accuracy_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

H.import_softpatch_cuda()
from softpatch_cuda import __version__, metrics  # noqa: E402
from softpatch_cuda.data.datasets import DatasetSplit, load_mvtec  # noqa: E402
from softpatch_cuda.data.noise import apply_noise, noise_count  # noqa: E402
from softpatch_cuda.embedding import EmbeddedImages  # noqa: E402,F401
from softpatch_cuda.evaluation import contamination_detection, masks_in_model_frame  # noqa: E402
from softpatch_cuda.models import CLI_NAMES, kind_by_cli_name  # noqa: E402
from softpatch_cuda.report import format_pct, write_json  # noqa: E402

DEFAULT_NOISE = (0.0, 0.1, 0.2, 0.4)
PROTOCOLS = ("no-overlap", "overlap")
PAIRED = "no-overlap-paired"  # opt-in third protocol (see test_subset)
ANOMALIB = "anomalib-patchcore"
DEMO_SIZES = {"n_train": 30, "n_test_good": 20, "n_test_defect": 20, "image_size": 128}
MODEL_SPEC = re.compile(r"^([a-z+-]+)(?:\[(.*)\])?$")


# ------------------------------------------------------------------ arguments
def _csv(text: str) -> list[str]:
    return [t.strip() for t in re.split(r",(?![^\[]*\])", text) if t.strip()]


def parse_model_spec(text: str) -> dict:
    """"softpatch-plus" or "softpatch-plus[preset=paper,removal_mad=None]" -> spec dict."""
    m = MODEL_SPEC.match(text.strip())
    if not m:
        raise ValueError(f"bad model spec {text!r}")
    name, opts = m.group(1), m.group(2)
    if name != ANOMALIB:
        kind_by_cli_name(name)  # raises for unknown names
    options: dict = {}
    for item in filter(None, (o.strip() for o in (opts or "").split(","))):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    if name == ANOMALIB and options:
        raise ValueError(f"{ANOMALIB} takes no options")
    return {"label": text.strip(), "name": name, "options": options}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="folder holding MVTec-layout categories (<cat>/train/good, <cat>/test/...)")
    src.add_argument("--demo", action="store_true", help="generate the demo dataset and use it")
    p.add_argument("--categories", help="comma list (default: every category under --root / every demo category)")
    p.add_argument("--noise", default=",".join(f"{r:g}" for r in DEFAULT_NOISE), help="comma list of noise ratios")
    p.add_argument("--seeds", default="0,1,2", help="noise-draw seeds (noise 0 runs once)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="no-overlap and/or overlap")
    p.add_argument("--models", default="patchcore,softpatch,softpatch-plus",
                   help=f"comma list of {', '.join(CLI_NAMES)}, {ANOMALIB}; options as name[key=value,...]")
    p.add_argument("--min-left", type=int, default=8,
                   help="anomalous test images that stay unplanted, at most half of them (the clean training "
                        "set is subsampled when a ratio would need more; default 8)")
    p.add_argument("--coreset-ratio", type=float, help="override every model's coreset ratio")
    p.add_argument("--backbone", help="backbone of every model (default: efficientnet_lite0)")
    p.add_argument("--weights", help="backbone weights file of every model (and of the anomalib baseline)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--name", default=None, help="result file stem: accuracy_<name> (default: demo or real)")
    p.add_argument("--data", help="demo: folder for the generated dataset (default: a temporary folder)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--no-aupro", action="store_true", help="skip AUPRO (the slowest metric)")
    p.add_argument("--no-pretrained", action="store_true", help=argparse.SUPPRESS)  # tests only
    p.add_argument("--image-size", type=int, help="demo: image side (= model input)")
    p.add_argument("--n-train", type=int, help="demo: training images per category")
    p.add_argument("--n-test-good", type=int, help="demo: good test images per category")
    p.add_argument("--n-test-defect", type=int, help="demo: defective test images per category")
    args = p.parse_args(argv)
    try:
        args.noise = [float(r) for r in _csv(args.noise)]
        args.seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        p.error("--noise / --seeds: expected comma lists of numbers")
    if not args.noise or any(not 0 <= r < 1 for r in args.noise):
        p.error(f"--noise ratios must be in [0, 1), got {args.noise}")
    if not args.seeds or any(s < 0 for s in args.seeds):
        p.error(f"--seeds must be non-negative ints, got {args.seeds}")
    args.protocols = _csv(args.protocols)
    if not args.protocols or any(x not in (*PROTOCOLS, PAIRED) for x in args.protocols):
        p.error(f"--protocols: choose from {', '.join((*PROTOCOLS, PAIRED))}")
    try:
        args.models = [parse_model_spec(m) for m in _csv(args.models)]
    except ValueError as exc:
        p.error(f"--models: {exc}")
    if not args.models:
        p.error("--models: give at least one model")
    args.categories = _csv(args.categories) if args.categories else None
    args.name = args.name or ("demo" if args.demo else "real")
    return args


# ------------------------------------------------------------------ data
def plant(split: DatasetSplit, ratio: float, seed: int, min_left: int) -> tuple[DatasetSplit, list[str], int]:
    """(split with the planted images in train and still in test, planted paths, clean n_train)."""
    anomalous = sum(s.label for s in split.test)
    available = anomalous - min(min_left, anomalous // 2)
    train = list(split.train)
    n = len(train)
    while ratio > 0 and n > 1 and noise_count(ratio, n) > available:
        n -= 1
    if n < len(train):  # evenly spaced subset of the clean training images
        keep = np.unique(np.linspace(0, len(train) - 1, n).round().astype(int))
        train = [train[i] for i in keep]
    sub = DatasetSplit(split.dataset, split.category, train, list(split.test))
    noisy, record = apply_noise(sub, ratio, seed=seed, overlap=True)
    return noisy, list(record.added), len(train)


def test_subset(test, planted: set[str], protocol: str) -> np.ndarray:
    """Indices of the test images that count in this protocol. "no-overlap-paired": also
    without the good test images named like a planted image -- on sets whose good test
    images are the defect-free templates of the defective ones (DeepPCB: test/good/<n> is
    the template of test/defect/<n>), a planted defective image is a near-duplicate of its
    template, so no-overlap rewards a bank that keeps the planted image."""
    if protocol == "overlap":
        return np.arange(len(test))
    names = {Path(p).name for p in planted} if protocol == "no-overlap-paired" else set()
    return np.array([i for i, s in enumerate(test) if s.path not in planted
                     and not (s.label == 0 and Path(s.path).name in names)], dtype=np.int64)


# ------------------------------------------------------------------ models
def build_model(spec: dict, args: argparse.Namespace, size: int | None) -> object:
    options = dict(spec["options"])
    preset = options.pop("preset", None)
    common: dict = {"device": args.device, "progress": False}
    if args.backbone:
        common["backbone"] = args.backbone
    if args.weights:
        common["weights"] = args.weights
    if args.no_pretrained:
        common["pretrained"] = False
    if args.coreset_ratio:
        common["coreset_ratio"] = args.coreset_ratio
    if size is not None:
        common.update(resize=size, crop=size)
    return kind_by_cli_name(spec["name"]).cls(preset=preset, **dict(common, **options))


def embedding_key(model) -> tuple:
    cfg = model.settings
    return (cfg.backbone, cfg.layers, cfg.weights, cfg.pretrained, cfg.embed_dim, cfg.resize, cfg.crop, cfg.seed)


def test_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray | None,
                 with_aupro: bool) -> dict:
    out = {"image_auroc": None, "pixel_auroc": None, "aupro": None}
    if len(np.unique(labels)) == 2:
        out["image_auroc"] = float(metrics.image_auroc(labels, scores))
    if masks is not None and masks.any() and not masks.all():
        out["pixel_auroc"] = float(metrics.pixel_auroc(masks, maps))
        if with_aupro:
            out["aupro"] = float(metrics.aupro(masks, maps))
    return out


def denoising_record(model) -> dict:
    info = model.fit_info_
    keys = ("alignment", "alignment_statistic", "cls_bank_size", "cls_removed_share", "cls_weights",
            "seg_bank_size", "seg_removed_share", "seg_weights", "flagged_images", "cls_support", "seg_support",
            "cls_unsupported_removed", "seg_unsupported_removed", "support_rounds")
    return {k: info.get(k) for k in keys if k in info}


def evidence_detection(report, planted: np.ndarray) -> dict:
    """AUROC of each evidence column of the training report for the planted images."""
    out = {}
    for key, values in (getattr(report, "evidence", None) or {}).items():
        v = np.asarray(values, dtype=np.float64)
        if planted.any() and not planted.all() and np.isfinite(v).all():
            out[key] = float(metrics.image_auroc(planted.astype(int), v))
    return out


# ------------------------------------------------------------------ one category
def run_category(root: Path, category: str, args: argparse.Namespace, size: int | None, log) -> list[dict]:
    split = load_mvtec(root, category)
    ours = [s for s in args.models if s["name"] != ANOMALIB]
    rows: list[dict] = []
    cache: dict[tuple, tuple[EmbeddedImages, dict]] = {}
    masks_all = None
    labels_all = np.array([s.label for s in split.test], dtype=np.int64)
    for ratio in args.noise:
        for seed in (args.seeds if ratio > 0 else args.seeds[:1]):
            noisy, planted_paths, n_clean = plant(split, ratio, seed, args.min_left)
            planted = set(planted_paths)
            train_paths = [s.path for s in noisy.train]
            planted_mask = np.array([p in planted for p in train_paths])
            for spec in args.models:
                t0 = time.perf_counter()
                if spec["name"] == ANOMALIB:
                    import _anomalib as A

                    transform = build_model(ours[0] if ours else {"name": "patchcore", "options": {}}, args,
                                            size).transform
                    res = A.fit_predict(train_paths, [s.path for s in split.test], transform,
                                        coreset_ratio=args.coreset_ratio or A.CORESET_RATIO,
                                        backbone=args.backbone or "efficientnet_lite0", weights=args.weights)
                    scores, maps, fit_s, predict_s = res["scores"], res["maps"], res["fit_s"], res["predict_s"]
                    denoise, detection = {}, {}
                else:
                    model = build_model(spec, args, size)
                    key = embedding_key(model)
                    if key not in cache:
                        te = time.perf_counter()
                        embedded = model.embed([s.path for s in split.train] + [s.path for s in split.test])
                        index = {src: i for i, src in enumerate(embedded.sources)}
                        cache[key] = (embedded, index)
                        log(f"  {category}: embedded {len(embedded)} images in {time.perf_counter() - te:.0f} s")
                    embedded, index = cache[key]
                    t0 = time.perf_counter()
                    model.fit_embedded(embedded.subset([index[p] for p in train_paths]))
                    fit_s = time.perf_counter() - t0
                    t1 = time.perf_counter()
                    pred = model.predict_embedded(embedded.subset([index[s.path] for s in split.test]))
                    predict_s = time.perf_counter() - t1
                    scores, maps = pred.scores, pred.maps
                    denoise = denoising_record(model)
                    report = model.training_report()
                    detection = contamination_detection(report, planted_mask) if ratio > 0 else {}
                    if ratio > 0:
                        detection["evidence_auroc"] = evidence_detection(report, planted_mask)
                    else:
                        detection["flagged"] = int(np.asarray(report.flagged).sum())
                if masks_all is None and any(s.mask_path for s in split.test):
                    masks_all = masks_in_model_frame(split.test, build_model(
                        ours[0] if ours else {"name": "patchcore", "options": {}}, args, size).transform)
                for protocol in args.protocols:
                    if ratio == 0 and protocol != args.protocols[0]:
                        continue  # no planted images: both protocols are the same test set
                    sel = test_subset(split.test, planted, protocol)
                    m = test_metrics(labels_all[sel], np.asarray(scores)[sel],
                                     None if masks_all is None else masks_all[sel],
                                     None if maps is None else np.asarray(maps)[sel], not args.no_aupro)
                    rows.append({
                        "category": category, "model": spec["label"], "noise": ratio, "seed": seed,
                        "protocol": protocol if ratio > 0 else "clean", "n_train_clean": n_clean,
                        "n_planted": len(planted_paths), "n_test": int(len(sel)),
                        "n_test_anomalous": int(labels_all[sel].sum()), **m, "fit_s": fit_s, "predict_s": predict_s,
                        "denoising": denoise, "contamination_detection": detection,
                    })
                log(f"{category:>18} r={ratio:<4g} seed {seed} {spec['label']:<28} " + "  ".join(
                    f"{r['protocol']}: img {format_pct(r['image_auroc'])} px {format_pct(r['pixel_auroc'])}"
                    for r in rows[-len(args.protocols):] if r["model"] == spec["label"] and r["noise"] == ratio)
                    + f"  ({fit_s:.0f}+{predict_s:.0f} s)"
                    + (f"  report AUROC {format_pct(detection.get('auroc'))}" if detection else ""))
    return rows


# ------------------------------------------------------------------ tables
def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else None


def _std(values) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.std(vals)) if len(vals) > 1 else None


def cell_means(rows: list[dict], key: str) -> dict:
    """(model, protocol, noise) -> mean over categories of the per-category mean over seeds."""
    per_cat: dict = {}
    for r in rows:
        per_cat.setdefault((r["model"], r["protocol"], r["noise"], r["category"]), []).append(r[key])
    out: dict = {}
    for (model, protocol, noise, _), vals in per_cat.items():
        out.setdefault((model, protocol, noise), []).append(_mean(vals))
    return {k: _mean(v) for k, v in out.items()}


def mean_table(rows: list[dict], models: list[str], noises: list[float], protocol: str, key: str) -> list[str]:
    means = cell_means(rows, key)
    clean = cell_means([r for r in rows if r["protocol"] == "clean"], key)
    noisy = [r for r in noises if r > 0]
    head = (["noise 0"] if 0.0 in noises else []) + [f"noise {r:g}" for r in noisy]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "|".join("---:" for _ in head) + "|"]
    for m in models:
        cells = ([format_pct(clean.get((m, "clean", 0.0)))] if 0.0 in noises else [])
        cells += [format_pct(means.get((m, protocol, r))) for r in noisy]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def category_table(rows: list[dict], models: list[str], noises: list[float], protocols: list[str]) -> list[str]:
    lines = ["| category | model | " + " | ".join(
        ["clean"] + [f"{p} {r:g}" for p in protocols for r in noises if r > 0]) + " |"]
    lines.append("|---|---|" + "|".join("---:" for _ in range(1 + len(protocols) * len([r for r in noises if r > 0]))) + "|")
    for cat in sorted({r["category"] for r in rows}):
        for m in models:
            cells = []
            for protocol, ratio in [("clean", 0.0)] + [(p, r) for p in protocols for r in noises if r > 0]:
                sel = [r for r in rows if r["category"] == cat and r["model"] == m and r["protocol"] == protocol
                       and r["noise"] == ratio]
                img, px = _mean(r["image_auroc"] for r in sel), _mean(r["pixel_auroc"] for r in sel)
                sd = _std(r["image_auroc"] for r in sel)
                cells.append("n/a" if not sel else f"{format_pct(img)} / {format_pct(px)}"
                             + (f" (±{100 * sd:.1f})" if sd is not None else ""))
            lines.append(f"| {cat} | {m} | " + " | ".join(cells) + " |")
    return lines


def denoising_table(rows: list[dict], models: list[str], noises: list[float], protocol: str) -> list[str]:
    """What the denoising did, averaged over categories and seeds (one protocol: fits are shared)."""
    lines = ["| model | noise | cls removed % | seg removed % | cls weights > 1 % | cls weight p99 | "
             "flagged / planted | report AUROC | flag precision | flag recall | AUROC discriminators / leave-out | "
             "unsupported rows removed cls / seg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        for ratio in noises:
            prot = "clean" if ratio == 0 else protocol
            sel = [r for r in rows if r["model"] == m and r["noise"] == ratio and r["protocol"] == prot
                   and r.get("denoising")]
            if not sel:
                continue
            d = [r["denoising"] for r in sel]
            c = [r["contamination_detection"] for r in sel]
            cw = [x.get("cls_weights") or {} for x in d]
            lines.append(
                f"| {m} | {ratio:g} | {format_pct(_mean(x.get('cls_removed_share') for x in d))} | "
                f"{format_pct(_mean(x.get('seg_removed_share') for x in d))} | "
                f"{format_pct(_mean(w.get('share_above_1') for w in cw))} | "
                f"{_fmt(_mean(w.get('p99') for w in cw))} | "
                f"{_fmt(_mean(x.get('flagged_images') for x in d), 1)} / {_fmt(_mean(r['n_planted'] for r in sel), 1)} | "
                f"{format_pct(_mean(x.get('auroc') for x in c))} | {format_pct(_mean(x.get('precision') for x in c))} | "
                f"{format_pct(_mean(x.get('recall') for x in c))} | "
                f"{format_pct(_mean((x.get('evidence_auroc') or {}).get('discriminators') for x in c))} / "
                f"{format_pct(_mean((x.get('evidence_auroc') or {}).get('leave_out') for x in c))} | "
                f"{_fmt(_mean(x.get('cls_unsupported_removed') for x in d), 1)} / "
                f"{_fmt(_mean(x.get('seg_unsupported_removed') for x in d), 1)} |")
    return lines


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}" if digits > 1 else f"{v:.1f}"


def markdown(rows: list[dict], args: argparse.Namespace, info: dict, meta: dict) -> str:
    models = [s["label"] for s in args.models]
    gpu = info.get("gpu")
    n_train = {}
    for r in rows:
        n_train.setdefault(r["category"], {})[r["noise"]] = (r["n_train_clean"], r["n_planted"])
    lines = [
        f"# Accuracy under training-set contamination: {meta['data']}",
        "",
        f"- date (UTC): {meta['created']}; total {meta['elapsed_s']:.0f} s; 1-min load average start / end: "
        f"{_fmt(meta['load'][0], 2)} / {_fmt(meta['load'][1], 2)} (times only; metrics do not depend on load)",
        f"- machine: {info['cpu_model']}, {info['cpu_affinity'] or info['cpu_count']} cores, RAM {info['ram_gib']} GiB"
        + (f"; GPU {gpu['name']}" if gpu else "") + f"; device {args.device}",
        f"- softpatch_cuda {__version__}; backbone {args.backbone or 'efficientnet_lite0'}; coreset ratio "
        f"{args.coreset_ratio or 'model default (0.1)'}; noise-draw seeds {args.seeds} (noise 0: one run)",
        "- clean training images / planted per category and noise: " + "; ".join(
            f"{c}: " + ", ".join(f"r={r:g} {a}+{b}" for r, (a, b) in sorted(v.items())) for c, v in sorted(n_train.items())),
        "- metrics in %, mean over categories of the mean over seeds. No-overlap: planted images left the test "
        "set; overlap: they stayed (memorised defects). 'fit s' excludes embedding (cached per category).",
    ]
    for protocol in args.protocols:
        for key, title in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (FPR <= 30 %)")):
            if key == "aupro" and args.no_aupro:
                continue
            lines += ["", f"## Mean {title}, {protocol}", "", *mean_table(rows, models, args.noise, protocol, key)]
    lines += ["", "## What the denoising did (one fit serves both protocols)", "",
              *denoising_table(rows, models, args.noise, args.protocols[0]), "",
              "## Per category: image / pixel AUROC (± std of image AUROC over seeds)", "",
              *category_table(rows, models, args.noise, args.protocols), "",
              "## Mean fit / predict seconds per run", "", "| model | fit s | predict s |", "|---|---:|---:|"]
    for m in models:
        sel = [r for r in rows if r["model"] == m]
        lines.append(f"| {m} | {_fmt(_mean(r['fit_s'] for r in sel), 3)} | {_fmt(_mean(r['predict_s'] for r in sel), 3)} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if any(s["name"] == ANOMALIB for s in args.models):
        import _anomalib as A

        ok, why = A.available()
        if not ok:
            log(f"bench_accuracy: {ANOMALIB} skipped: {why}")
            args.models = [s for s in args.models if s["name"] != ANOMALIB]
        elif not A.check_equivalence():
            log("bench_accuracy: the fast k-center substitute differs from anomalib's loop; using anomalib's loop")
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    tmp = None
    size = None
    if args.demo:
        from softpatch_cuda.demo import DEMO_CATEGORIES, make_demo_dataset

        sizes = dict(DEMO_SIZES)
        for key in sizes:
            if getattr(args, key, None) is not None:
                sizes[key] = getattr(args, key)
        if args.data:
            root = Path(args.data)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="softpatch_bench_")
            root = Path(tmp.name)
        categories = args.categories or list(DEMO_CATEGORIES)
        log(f"generating demo data in {root} ...")
        make_demo_dataset(root, categories=categories, n_train=sizes["n_train"], n_test_good=sizes["n_test_good"],
                          n_test_defect=sizes["n_test_defect"], image_size=sizes["image_size"], seed=0)
        size = sizes["image_size"]
        data_desc = (f"demo data ({', '.join(categories)}; {sizes['n_train']} train, {sizes['n_test_good']} good + "
                     f"{sizes['n_test_defect']} defective test images, {size} px)")
    else:
        root = Path(args.root)
        categories = args.categories or sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        data_desc = f"real data under {root.name}/ ({', '.join(categories)})"
    rows: list[dict] = []
    for category in categories:
        rows += run_category(root, category, args, size, log)
    elapsed = time.perf_counter() - t_start
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if tmp is not None:
        tmp.cleanup()
    info = H.machine_info()
    meta = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "elapsed_s": elapsed,
            "load": (load_start, load_end), "data": data_desc}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"accuracy_{args.name}"
    payload = {"meta": meta, "args": {k: v for k, v in vars(args).items()}, "machine": info, "rows": rows}
    json_path = write_json(out / f"{stem}.json", payload)
    md_path = out / f"{stem}.md"
    md_path.write_text(markdown(rows, args, info, meta))
    print(md_path.read_text())
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
