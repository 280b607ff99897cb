"""What the leave-out support (issue 16) costs at fit: SoftPatch+ with support_images=2 (the
default) against support_images=None (the fit before it), interleaved on the same cached
embeddings of real training sets with planted defective images, so the load of a busy machine
hits both alike; and the predict of the test set after each fit (the support-aware score,
``max(d, support)`` per candidate, is on the predict path). Writes <out>/<name>.json and .md
(per set: median fit and predict seconds, the phase split, the ratios of the medians).

    python benchmarks/bench_support_cost.py --root ../shared/data \
        --categories mvtec_transistor,mtd_magnetic_tile --noise 0.1 --repeats 3
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from bench_accuracy import load_mvtec, plant  # noqa: E402

from softpatch_cuda import SoftPatchPlus  # noqa: E402
from softpatch_cuda.report import write_json  # noqa: E402

OPTIONS = {"support_images=None": None, "support_images=2": 2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--categories", default="mvtec_transistor,mtd_magnetic_tile")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="support_cost_cpu", help="result file stem")
    args = p.parse_args(argv)
    load_start = os.getloadavg()
    sets = {}
    for cat in args.categories.split(","):
        split = load_mvtec(Path(args.root), cat)
        noisy, planted, n_clean = plant(split, args.noise, args.seed, 8)
        paths = [s.path for s in noisy.train]
        embedded = SoftPatchPlus().embed(paths)
        test = SoftPatchPlus().embed([s.path for s in split.test])
        runs = {k: [] for k in OPTIONS}
        for rep in range(args.repeats):
            for label, value in OPTIONS.items():  # interleaved: both see the same load
                model = SoftPatchPlus(support_images=value)
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                model.fit_embedded(embedded)
                fit_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                model.predict_embedded(test)
                runs[label].append({"fit_s": fit_s, "predict_s": time.perf_counter() - t0, "load_1min": load,
                                    "phases_s": dict(model.fit_info_.get("timings") or {})})
                print(f"{cat} repeat {rep} {label}: fit {fit_s:.1f} s, predict {runs[label][-1]['predict_s']:.1f} s "
                      f"(load {load:.1f})", file=sys.stderr, flush=True)
        med = {k: float(np.median([r["fit_s"] for r in v])) for k, v in runs.items()}
        med_predict = {k: float(np.median([r["predict_s"] for r in v])) for k, v in runs.items()}
        sets[cat] = {"n_train": len(paths), "n_planted": len(planted), "n_test": len(test), "runs": runs,
                     "median_fit_s": med, "ratio": med["support_images=2"] / med["support_images=None"],
                     "median_predict_s": med_predict,
                     "predict_ratio": med_predict["support_images=2"] / med_predict["support_images=None"]}
    info = H.machine_info()
    payload = {"meta": {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "load_start": load_start, "load_end": os.getloadavg(), "args": vars(args)},
               "machine": info, "sets": sets}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{args.name}.json", payload)
    lines = ["# Fit and predict cost of the leave-out support (issue 16)", "",
             f"- {payload['meta']['created']}; {info['cpu_model']}, {info['cpu_affinity'] or info['cpu_count']} cores; "
             f"1-min load start / end {load_start[0]:.1f} / {payload['meta']['load_end'][0]:.1f} (a shared machine: "
             "the two settings run interleaved, so both see the same load)",
             f"- SoftPatch+ defaults, efficientnet_lite0, cached embeddings (fit = denoise + coreset + support + "
             f"calibration; embedding excluded), noise {args.noise:g} planted with seed {args.seed}, "
             f"{args.repeats} repeats, medians; predict = the set's test images from cached embeddings "
             "(k-NN, scores, maps)", "",
             "| set | training images | fit s, support None | fit s, support 2 | ratio | support phase s (median) "
             "| test images | predict s, support None | predict s, support 2 | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cat, s in sets.items():
        sup = float(np.median([r["phases_s"].get("support_s", 0.0) for r in s["runs"]["support_images=2"]]))
        lines.append(f"| {cat} | {s['n_train']} ({s['n_planted']} planted) | {s['median_fit_s']['support_images=None']:.1f} | "
                     f"{s['median_fit_s']['support_images=2']:.1f} | {s['ratio']:.2f}x | {sup:.1f} | {s['n_test']} | "
                     f"{s['median_predict_s']['support_images=None']:.2f} | {s['median_predict_s']['support_images=2']:.2f} | "
                     f"{s['predict_ratio']:.2f}x |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
