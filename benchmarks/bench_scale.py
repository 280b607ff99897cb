"""At scale: distributed fit accuracy and time, peak memory vs training-set size, export speed.

    python benchmarks/bench_scale.py distributed [--root ../shared/data] [--categories a,b] [--no-demo]
    python benchmarks/bench_scale.py memory [--counts 100,200,400,800] [--max-memory 2G]
    python benchmarks/bench_scale.py export [--images 64] [--repeats 3]
    options: --out DIR (default benchmarks/results), --name SUFFIX

distributed: per category, SoftPatch (efficientnet_lite0) fitted on the noisy training set
(noise 0.1, no-overlap, seed 0) three ways -- single process (``model.fit``), Ray with 1
worker and with 2 workers (2 shards each: the same model, checked bit for bit) -- and
tested on the same test images (embedded once). Reports image / pixel AUROC of the
single and the distributed fit, the wall time of each fit (Ray session already running;
actor start-up and backbone loading included) and the driver's peak resident memory
(VmHWM, reset before each fit).

memory: per training-set size N (demo "nut" images at 224 px), one fresh process per
fit (so each peak is that fit's): the ordinary ``model.fit`` and ``fit_sharded(...,
max_memory=...)``; reports the process's peak RSS (VmHWM), the chosen shards and the time.

export: the default backbone (efficientnet_lite0) and the papers' WRN-50-2 (random
weights: the same computation, no download; D=1024) at 224 px: predict speed (images/s) of the torch
model, the ONNX graph + compiled k-NN (onnxruntime) and the OpenVINO IR, and the largest
differences of their scores and maps to the torch path.

Writes <out>/scale_<what>[_<name>].json and .md, with the machine and the load average.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

H.import_softpatch_cuda()
from softpatch_cuda import __version__, metrics  # noqa: E402
from softpatch_cuda.report import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEMO_SIZES = {"n_train": 30, "n_test_good": 20, "n_test_defect": 20, "image_size": 128}
REAL_CATEGORIES = ("mvtec_transistor", "mtd_magnetic_tile", "deeppcb_pcb")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def header_lines(title: str, info: dict, meta: dict) -> list[str]:
    return [
        f"# {title}",
        "",
        f"- date (UTC): {meta['created']}; total {meta['elapsed_s']:.0f} s; 1-min load average start / end: "
        f"{meta['load'][0]} / {meta['load'][1]} (a shared 2-core machine: times move with the load)",
        f"- machine: {info['cpu_model']}, {info['cpu_affinity'] or info['cpu_count']} usable cores, RAM "
        f"{info['ram_gib']} GiB, no GPU; torch threads {info['torch_num_threads']}; softpatch_cuda {__version__}",
    ]


def write(what: str, name: str | None, out: Path, payload: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"scale_{what}" + (f"_{name}" if name else "")
    write_json(out / f"{stem}.json", payload)
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)


# ====================================================================== distributed
def _banks_equal(a, b) -> bool:
    import torch

    pairs = [(a.state.cls_bank, b.state.cls_bank), (a.state.seg_bank, b.state.seg_bank)]
    for x, y in pairs:
        if (x is None) != (y is None):
            return False
        if x is not None and not (torch.equal(x.features, y.features) and
                                  (x.weights is None and y.weights is None or torch.equal(x.weights, y.weights))):
            return False
    return a.threshold == b.threshold


def _metrics(model, test_emb, labels, masks) -> dict:
    pred = model.predict_embedded(test_emb)
    row = {"image_auroc": metrics.image_auroc(labels, pred.scores)}
    row["pixel_auroc"] = metrics.pixel_auroc(masks, pred.maps) if masks is not None else None
    return row


def run_distributed(args: argparse.Namespace) -> None:
    from softpatch_cuda import SoftPatch
    from softpatch_cuda.data.datasets import load_mvtec
    from softpatch_cuda.data.noise import apply_noise
    from softpatch_cuda.scale.distributed import fit_distributed, ray_session
    from softpatch_cuda.evaluation import masks_in_model_frame
    from softpatch_cuda.scale.memory_plan import current_rss, peak_rss_of

    t_start, load_start = time.perf_counter(), load()
    jobs = []
    tmp = None
    if not args.no_demo:
        from softpatch_cuda.demo import DEMO_CATEGORIES, make_demo_dataset

        tmp = tempfile.TemporaryDirectory(prefix="softpatch_scale_")
        demo_cats = args.demo_categories.split(",") if args.demo_categories else list(DEMO_CATEGORIES)
        make_demo_dataset(tmp.name, categories=demo_cats, seed=0, **DEMO_SIZES)
        jobs += [("demo", Path(tmp.name), c, DEMO_SIZES["image_size"]) for c in demo_cats]
    if args.root:
        cats = args.categories.split(",") if args.categories else list(REAL_CATEGORIES)
        jobs += [("real", Path(args.root), c, None) for c in cats]
    rows = []
    with ray_session(num_cpus=2, quiet=True):
        for data, root, category, size in jobs:
            split, record = apply_noise(load_mvtec(root, category), 0.1, seed=0, overlap=False)
            train = split.train_paths
            opts = dict(device="cpu") if size is None else dict(device="cpu", resize=size, crop=size)
            probe = SoftPatch(**opts)
            test_emb = probe.embed(split.test_paths, desc="test features")
            labels = np.array([int(s.label) for s in split.test])
            masks = masks_in_model_frame(split.test, probe.transform) if any(s.mask_path for s in split.test) else None
            row = {"data": data, "category": category, "n_train": len(train), "n_planted": len(record.added),
                   "n_test": len(split.test)}
            models = {}
            for key, fit in (("single", lambda m: m.fit(train)),
                             ("ray1", lambda m: fit_distributed(m, train, workers=1, shards=2)),
                             ("ray2", lambda m: fit_distributed(m, train, workers=2, shards=2))):
                model = SoftPatch(**opts)
                before, load_before = current_rss(), load()
                t0 = time.perf_counter()
                _, peak = peak_rss_of(lambda: fit(model))
                row[f"{key}_s"] = time.perf_counter() - t0
                row[f"{key}_driver_peak_gib"] = peak / 2**30
                row[f"{key}_driver_delta_gib"] = (peak - before) / 2**30
                row[f"{key}_load"] = (load_before, load())
                models[key] = model
                print(f"{category} {key}: {row[f'{key}_s']:.1f} s, driver peak {peak / 2**30:.2f} GiB", file=sys.stderr)
            row["ray1_equals_ray2"] = _banks_equal(models["ray1"], models["ray2"])
            for key in ("single", "ray2"):
                for metric, value in _metrics(models[key], test_emb, labels, masks).items():
                    row[f"{key}_{metric}"] = value
                row[f"{key}_cls_bank"] = len(models[key].state.cls_bank)
                row[f"{key}_threshold"] = models[key].threshold
            row["alignments"] = [s["alignment"] for s in models["ray2"].fit_info_["sharding"]["shards"]] + \
                [models["single"].fit_info_["alignment"]]
            rows.append(row)
    if tmp is not None:
        tmp.cleanup()
    info = H.machine_info()
    meta = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": time.perf_counter() - t_start, "load": (load_start, load())}
    md = header_lines("Distributed fit (Ray, 2 shards) vs single-process fit", info, meta) + [
        "- SoftPatch, efficientnet_lite0 (ImageNet weights); noise 0.1 no-overlap (seed 0). Demo: 6 categories, 30 + 3 "
        "planted training images, 128 px; real: the dev sets under ../shared/data at 256 -> 224 px.",
        "- Ray: local instance, 2 CPUs; 2 shards; a worker is 1 CPU (one thread). 1 and 2 workers give the same "
        "model (column 'same'); accuracy is the 2-worker model's. Times include the actors' start and backbone load.",
        "- driver peak: the fitting process's peak RSS during the fit (VmHWM; single: the whole fit); in brackets "
        "the rise above its RSS before the fit.",
        "",
        "| data | category | train | image AUROC single / dist. | pixel AUROC single / dist. | fit s single | "
        "fit s Ray 1 worker | fit s Ray 2 workers | driver peak GiB single / Ray 2 | same |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in rows:
        md.append(f"| {r['data']} | {r['category']} | {r['n_train']} | {pct(r['single_image_auroc'])} / "
                  f"{pct(r['ray2_image_auroc'])} | {pct(r['single_pixel_auroc'])} / {pct(r['ray2_pixel_auroc'])} | "
                  f"{r['single_s']:.1f} | {r['ray1_s']:.1f} | {r['ray2_s']:.1f} | "
                  f"{r['single_driver_peak_gib']:.2f} (+{r['single_driver_delta_gib']:.2f}) / "
                  f"{r['ray2_driver_peak_gib']:.2f} (+{r['ray2_driver_delta_gib']:.2f}) | "
                  f"{'yes' if r['ray1_equals_ray2'] else 'NO'} |")
    for data in ("demo", "real"):
        sel = [r for r in rows if r["data"] == data]
        if not sel:
            continue
        mean = lambda k: float(np.mean([r[k] for r in sel if r[k] is not None]))  # noqa: E731
        diffs = [100 * (r["ray2_image_auroc"] - r["single_image_auroc"]) for r in sel]
        md.append(f"| **{data} mean** | | | **{pct(mean('single_image_auroc'))} / {pct(mean('ray2_image_auroc'))}** | "
                  f"**{pct(mean('single_pixel_auroc'))} / {pct(mean('ray2_pixel_auroc'))}** | "
                  f"**{mean('single_s'):.1f}** | **{mean('ray1_s'):.1f}** | **{mean('ray2_s'):.1f}** | | |")
        md.append(f"|  | image AUROC dist. - single, points: mean {np.mean(diffs):+.2f}, per category "
                  f"{', '.join(f'{d:+.1f}' for d in diffs)} | | | | | | | | |")
    write("distributed", args.name, args.out, {"meta": meta, "machine": info, "rows": rows}, "\n".join(md) + "\n")


# ====================================================================== memory
def memory_point(args: argparse.Namespace) -> None:
    """One fit in this (fresh) process; prints a JSON line with its peak RSS."""
    import glob

    from softpatch_cuda import SoftPatch
    from softpatch_cuda.scale.memory_plan import _status_kib
    from softpatch_cuda.scale.sharded import fit_sharded

    paths = sorted(glob.glob(os.path.join(args.data, "*.png")))[: args.count]
    model = SoftPatch(device="cpu")
    t0 = time.perf_counter()
    if args.mode == "ordinary":
        model.fit(paths)
    else:
        fit_sharded(model, paths, max_memory=args.max_memory)
    result = {"mode": args.mode, "n_images": len(paths), "fit_s": time.perf_counter() - t0,
              "peak_rss_gib": _status_kib("VmHWM") / 2**20, "shards": [s["images"] for s in
                                                                       model.fit_info_.get("sharding", {}).get("shards", [])],
              "memory_plan": model.fit_info_.get("memory_plan"), "cls_bank": len(model.state.cls_bank),
              "grid": model.fit_info_["grid"]}
    print("RESULT " + json.dumps(result))


def run_memory(args: argparse.Namespace) -> None:
    from softpatch_cuda.demo import make_demo_dataset

    t_start, load_start = time.perf_counter(), load()
    counts = [int(c) for c in args.counts.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="softpatch_mem_")
    make_demo_dataset(tmp.name, categories=["nut"], n_train=max(counts), n_test_good=1, n_test_defect=1,
                      image_size=224, seed=0)
    data = str(Path(tmp.name) / "nut" / "train" / "good")
    rows = []
    for n in counts:
        for mode in ("ordinary", "bounded"):
            load_before = load()
            proc = subprocess.run([sys.executable, __file__, "_memory_point", "--data", data, "--count", str(n),
                                   "--mode", mode, "--max-memory", args.max_memory], capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise RuntimeError(f"memory point {n} {mode} failed: {proc.stderr[-2000:]}")
            row = json.loads(line[0][len("RESULT "):])
            row["load"] = (load_before, load())
            rows.append(row)
            print(f"{n} {mode}: peak {row['peak_rss_gib']:.2f} GiB, {row['fit_s']:.0f} s, shards {row['shards']}",
                  file=sys.stderr)
    tmp.cleanup()
    info = H.machine_info()
    meta = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": time.perf_counter() - t_start, "load": (load_start, load()), "max_memory": args.max_memory}
    feats = lambda r: r["n_images"] * r["grid"][0] * r["grid"][1] * 384 * 4 / 2**30  # noqa: E731
    md = header_lines("Peak memory vs training-set size: ordinary fit vs bounded-memory fit", info, meta) + [
        f"- SoftPatch, efficientnet_lite0 (D = 384), demo 'nut' images at 224 px (28 x 28 patches); each fit in a "
        f"fresh process, peak RSS = VmHWM at its end (Python, torch and the backbone included). Bounded: "
        f"fit_sharded(max_memory={args.max_memory}).",
        "",
        "| training images | patch features GiB | ordinary fit peak GiB | bounded fit peak GiB | bounded shards | "
        "ordinary fit s | bounded fit s | bank rows ordinary / bounded |",
        "|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for n in counts:
        o = next(r for r in rows if r["n_images"] == n and r["mode"] == "ordinary")
        b = next(r for r in rows if r["n_images"] == n and r["mode"] == "bounded")
        md.append(f"| {n} | {feats(o):.2f} | {o['peak_rss_gib']:.2f} | {b['peak_rss_gib']:.2f} | "
                  f"{len(b['shards'])} x ~{max(b['shards']) if b['shards'] else n} | {o['fit_s']:.0f} | "
                  f"{b['fit_s']:.0f} | {o['cls_bank']} / {b['cls_bank']} |")
    write("memory", args.name, args.out, {"meta": meta, "machine": info, "rows": rows}, "\n".join(md) + "\n")


# ====================================================================== export
def run_export(args: argparse.Namespace) -> None:
    from softpatch_cuda import SoftPatch
    from softpatch_cuda.demo import make_demo_dataset
    from softpatch_cuda.deploy import OnnxDetector
    from softpatch_cuda.deploy.graph import export_onnx, export_openvino

    try:
        import openvino  # noqa: F401

        have_ov = True
    except ImportError:
        have_ov = False
    t_start, load_start = time.perf_counter(), load()
    tmp = tempfile.TemporaryDirectory(prefix="softpatch_export_")
    root = make_demo_dataset(tmp.name, categories=["nut"], n_train=30, n_test_good=args.images // 2,
                             n_test_defect=args.images - args.images // 2, image_size=256, seed=0)
    train = sorted(str(p) for p in (root / "nut" / "train" / "good").iterdir())
    test = sorted(str(p) for p in (root / "nut" / "test").rglob("*.png"))
    rows = []
    for label, opts in (("efficientnet_lite0 (D 384)", {}),
                        ("wide_resnet50_2 random weights (D 1024)", {"backbone": "wide_resnet50_2", "pretrained": False})):
        model = SoftPatch(device="cpu", **opts).fit(train)
        model_path = Path(tmp.name) / "m.softpatch"
        model.save(model_path)
        t0 = time.perf_counter()
        export_onnx(model, Path(tmp.name) / "m.onnx", check=False)
        export_s = time.perf_counter() - t0
        engines = [("torch", model), ("onnxruntime", OnnxDetector(model_path, Path(tmp.name) / "m.onnx"))]
        if have_ov:
            export_openvino(model, Path(tmp.name) / "m.xml", check=False)
            engines.append(("openvino", OnnxDetector(model_path, Path(tmp.name) / "m.xml")))
        reference = model.predict(test)
        scale = float(np.abs(reference.maps).max())
        for name, engine in engines:
            engine.predict(test[:4])  # warm-up
            timing, pred = H.time_call(lambda: engine.predict(test), repeats=args.repeats, warmup=0)
            rows.append({"backbone": label, "engine": name, "images": len(test), "median_s": timing.median_s,
                         "iqr_s": timing.iqr_s, "images_per_s": len(test) / timing.median_s,
                         "score_max_rel_diff": float(np.max(np.abs(pred.scores - reference.scores) /
                                                            np.abs(reference.scores))),
                         "map_max_diff_rel_to_max": float(np.abs(pred.maps - reference.maps).max() / scale),
                         "same_verdicts": bool(np.array_equal(pred.is_anomalous, reference.is_anomalous)),
                         "export_s": export_s if name != "torch" else None, "load": load()})
            print(rows[-1], file=sys.stderr)
    tmp.cleanup()
    info = H.machine_info()
    meta = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": time.perf_counter() - t_start, "load": (load_start, load())}
    md = header_lines("Export: predict speed and equality of the torch, ONNX Runtime and OpenVINO paths", info, meta) + [
        f"- SoftPatch fitted on 30 demo 'nut' images (256 px, resize 256 / crop 224); predict = {len(test)} test "
        f"images end to end (load, transform, embed, k-NN, maps); median of {args.repeats} runs after a warm-up. "
        "ONNX Runtime / OpenVINO: the exported graph + the compiled k-NN + numpy maps, no torch in the scoring.",
        "- differences: largest |score - torch score| / |torch score| and largest map difference / largest map value.",
        "",
        "| backbone | engine | images/s | time s (IQR) | score max rel. diff | map max diff (rel.) | same verdicts |",
        "|---|---|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        md.append(f"| {r['backbone']} | {r['engine']} | {r['images_per_s']:.1f} | {r['median_s']:.2f} "
                  f"(±{r['iqr_s']:.2f}) | {r['score_max_rel_diff']:.1e} | {r['map_max_diff_rel_to_max']:.1e} | "
                  f"{'yes' if r['same_verdicts'] else 'NO'} |")
    write("export", args.name, args.out, {"meta": meta, "machine": info, "rows": rows}, "\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("distributed")
    d.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    d.add_argument("--categories")
    d.add_argument("--no-demo", action="store_true")
    d.add_argument("--demo-categories")
    m = sub.add_parser("memory")
    m.add_argument("--counts", default="100,200,400,800")
    m.add_argument("--max-memory", default="2G")
    e = sub.add_parser("export")
    e.add_argument("--images", type=int, default=64)
    e.add_argument("--repeats", type=int, default=3)
    w = sub.add_parser("_memory_point")
    w.add_argument("--data", required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--mode", choices=("ordinary", "bounded"), required=True)
    w.add_argument("--max-memory", default="2G")
    for q in (d, m, e):
        q.add_argument("--out", type=Path, default=RESULTS)
        q.add_argument("--name")
    args = p.parse_args(argv)
    {"distributed": run_distributed, "memory": run_memory, "export": run_export,
     "_memory_point": memory_point}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
