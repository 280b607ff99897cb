"""Accuracy benchmark: PatchCore / SoftPatch / SoftPatch+ on the demo categories under
training-set contamination (the papers' noise protocol).

    python benchmarks/bench_accuracy.py [--categories a,b] [--noise 0,0.1,0.2,0.4]
        [--models patchcore,softpatch,softpatch-plus] [--overlap] [--quick]
        [--device cpu|cuda|auto] [--data DIR] [--out benchmarks/results]

The demo dataset (softpatch_cuda.data.demo) is generated once (into --data, or a
temporary folder); for every noise ratio, round(ratio x |train|) defective test images
are planted in each category's training set (seeded; removed from the test set unless
--overlap), every model is fitted on it and tested. Image AUROC, pixel AUROC and AUPRO
per category and their means are written to <out>/accuracy_<device>.json and .md with
a description of the machine. These are synthetic images: the benchmark shows trends
(how fast each method degrades with contamination), not MVTec-comparable numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

H.import_softpatch_cuda()
from softpatch_cuda import __version__  # noqa: E402
from softpatch_cuda.cli import MODEL_CHOICES, MODEL_DISPLAY, _model_classes  # noqa: E402
from softpatch_cuda.evaluation import evaluate_split, mean_row  # noqa: E402
from softpatch_cuda.report import write_json  # noqa: E402

DEFAULT_NOISE = (0.0, 0.1, 0.2, 0.4)
# n_test_defect must exceed round(0.4 * n_train): the planted images come from the defective test images.
SIZES = {
    "default": {"n_train": 30, "n_test_good": 10, "n_test_defect": 20, "image_size": 160},
    "quick": {"n_train": 10, "n_test_good": 4, "n_test_defect": 8, "image_size": 96},
}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--categories", help="comma list of demo categories (default: all)")
    p.add_argument("--noise", default=",".join(f"{r:g}" for r in DEFAULT_NOISE), help="comma list of noise ratios")
    p.add_argument("--models", default="patchcore,softpatch,softpatch-plus", help=f"comma list of {', '.join(MODEL_CHOICES)}")
    p.add_argument("--overlap", action="store_true", help="planted images stay in the test set too")
    p.add_argument("--quick", action="store_true", help="tiny data (smoke test; numbers mean little)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the noise draw and the models")
    p.add_argument("--data", help="folder for the generated dataset (default: a temporary folder)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--backbone", help="backbone (default: the models' default, efficientnet_lite0)")
    p.add_argument("--no-pretrained", action="store_true", help=argparse.SUPPRESS)  # tests only
    p.add_argument("--image-size", type=int, help="side of the generated images (= model input)")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test-good", type=int)
    p.add_argument("--n-test-defect", type=int)
    args = p.parse_args(argv)
    try:
        args.noise = [float(r) for r in _csv(args.noise)]
    except ValueError:
        p.error(f"--noise: expected numbers, got {args.noise!r}")
    if not args.noise or any(not 0 <= r < 1 for r in args.noise):
        p.error(f"--noise ratios must be in [0, 1), got {args.noise}")
    args.models = _csv(args.models)
    bad = [m for m in args.models if m not in MODEL_CHOICES]
    if bad or not args.models:
        p.error(f"--models: unknown {bad}; choose from {', '.join(MODEL_CHOICES)}")
    args.categories = _csv(args.categories) if args.categories else None
    return args


def _load(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _mean_table(rows: list[dict], models: list[str], noises: list[float], key: str) -> list[str]:
    lines = ["| model | " + " | ".join(f"noise {r:g}" for r in noises) + " |",
             "|---|" + "|".join("---:" for _ in noises) + "|"]
    for m in models:
        cells = []
        for r in noises:
            v = mean_row([x for x in rows if x["model"] == m and x["noise"] == r], [key])[key]
            cells.append(_pct(v))
        lines.append(f"| {MODEL_DISPLAY[m]} | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict], args: argparse.Namespace, info: dict, sizes: dict, created: str, elapsed: float) -> str:
    setting = "overlap" if args.overlap else "no-overlap"
    gpu = info.get("gpu")
    lines = [
        f"# softpatch_cuda accuracy under training-set contamination ({args.device}, {setting})",
        "",
        f"- date (UTC): {created}; total time {elapsed:.0f} s; 1-min load average at start / end: "
        f"{_load(args.load_average['start'])} / {_load(args.load_average['end'])} (fit/predict times grow with it)",
        f"- CPU: {info['cpu_model']}, {info['cpu_affinity'] or info['cpu_count']} usable cores, RAM {info['ram_gib']} GiB"
        + (f"; GPU: {gpu['name']}" if gpu else ""),
        f"- softpatch_cuda {__version__}; backbone {args.backbone or 'efficientnet_lite0'}"
        f"{' (random weights)' if args.no_pretrained else ' (pretrained)'}",
        f"- data: demo categories {', '.join(sorted({r['category'] for r in rows}))}; per category "
        f"{sizes['n_train']} train, {sizes['n_test_good']} good + {sizes['n_test_defect']} defective test images, "
        f"{sizes['image_size']} px; noise = round(ratio x {sizes['n_train']}) defective test images planted in "
        f"train ({setting}: {'they stay in the test set' if args.overlap else 'removed from the test set'}); seed {args.seed}",
        "- metrics in percent; means over categories. Synthetic data: compare methods and trends, not absolute values.",
        "",
        "## Mean image AUROC",
        "",
        *_mean_table(rows, args.models, args.noise, "image_auroc"),
        "",
        "## Mean pixel AUROC",
        "",
        *_mean_table(rows, args.models, args.noise, "pixel_auroc"),
        "",
        "## Mean AUPRO (FPR <= 30 %)",
        "",
        *_mean_table(rows, args.models, args.noise, "aupro"),
        "",
        "## Per category",
        "",
        "| noise | category | model | planted | image AUROC | pixel AUROC | AUPRO | fit s | predict s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    for r in rows:
        lines.append(f"| {r['noise']:g} | {r['category']} | {MODEL_DISPLAY[r['model']]} | {r['n_planted']} | "
                     f"{_pct(r['image_auroc'])} | {_pct(r['pixel_auroc'])} | {_pct(r['aupro'])} | "
                     f"{r['fit_s']:.1f} | {r['predict_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from softpatch_cuda.data.datasets import load_mvtec
    from softpatch_cuda.data.demo import DEMO_CATEGORIES, make_demo_dataset
    from softpatch_cuda.data.noise import apply_noise

    categories = args.categories or list(DEMO_CATEGORIES)
    unknown = [c for c in categories if c not in DEMO_CATEGORIES]
    if unknown:
        print(f"bench_accuracy: unknown categories {unknown}; choose from {list(DEMO_CATEGORIES)}", file=sys.stderr)
        return 2
    sizes = dict(SIZES["quick" if args.quick else "default"])
    for key in ("image_size", "n_train", "n_test_good", "n_test_defect"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    worst = round(max(args.noise) * sizes["n_train"])
    if worst >= sizes["n_test_defect"] + (1 if args.overlap else 0):
        print(f"bench_accuracy: noise {max(args.noise)} plants {worst} images but there are only "
              f"{sizes['n_test_defect']} defective test images per category; raise --n-test-defect", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    # Other processes on the machine slow the fit/predict times down (not the metrics): record it.
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    tmp = None
    if args.data:
        data_root = Path(args.data)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="softpatch_bench_")
        data_root = Path(tmp.name)
    print(f"generating demo data in {data_root} ...", file=sys.stderr, flush=True)
    make_demo_dataset(data_root, categories=categories, n_train=sizes["n_train"], n_test_good=sizes["n_test_good"],
                      n_test_defect=sizes["n_test_defect"], image_size=sizes["image_size"], seed=args.seed)

    classes = _model_classes()
    common = {"device": args.device, "resize": sizes["image_size"], "crop": sizes["image_size"], "seed": args.seed,
              "progress": False}
    if args.backbone:
        common["backbone"] = args.backbone
    if args.no_pretrained:
        common["pretrained"] = False
    rows: list[dict] = []
    records: list[dict] = []
    for category in categories:
        split = load_mvtec(data_root, category)
        for ratio in args.noise:
            noisy, record = apply_noise(split, ratio, seed=args.seed, overlap=args.overlap)
            records.append(record.to_dict())
            for kind in args.models:
                row = evaluate_split(classes[kind](**common), noisy)
                row.update(model=kind, noise=ratio, overlap=bool(args.overlap), n_planted=len(record.added))
                rows.append(row)
                print(f"{category:>14} noise {ratio:<4g} {MODEL_DISPLAY[kind]:<11} image {_pct(row['image_auroc'])} "
                      f"pixel {_pct(row['pixel_auroc'])} ({row['fit_s']:.1f} s + {row['predict_s']:.1f} s)",
                      file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t_start
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    args.load_average = {"start": load_start, "end": load_end}
    if tmp is not None:
        tmp.cleanup()

    info = H.machine_info()
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = str(args.device)
    stem = f"accuracy_{device.replace(':', '')}" + ("_overlap" if args.overlap else "") + ("_quick" if args.quick else "")
    payload = {
        "created_utc": created, "elapsed_s": elapsed, "args": {k: v for k, v in vars(args).items()},
        "sizes": sizes, "machine": info, "rows": rows, "noise_records": records,
        "means": {f"{m}@{r:g}": mean_row([x for x in rows if x["model"] == m and x["noise"] == r])
                  for m in args.models for r in args.noise},
    }
    json_path = write_json(out / f"{stem}.json", payload)
    md_path = out / f"{stem}.md"
    md_path.write_text(markdown(rows, args, info, sizes, created, elapsed))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
