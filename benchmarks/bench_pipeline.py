"""End-to-end pipeline benchmark: fit time and predict images/s on generated images.

    python benchmarks/bench_pipeline.py [--device cpu|cuda] [--models patchcore,softpatch,softpatch_plus]
                                        [--n-train 200] [--n-test 50] [--image-size 256] [--resize 256 --crop 224]
                                        [--backbone efficientnet_lite0] [--random-weights] [--alignment auto]
                                        [--quick] [--out benchmarks/results]

Images: rendered, nearly aligned objects (a ringed disc, +-3 px jitter, lighting and
sensor noise; every fifth test image with a dark defect), generated in memory as
uint8 arrays (so decoding files is not timed; resize/crop/normalise is). Targets
(issue 4, 2-core CPU): fit 200 images at 224 px < 60 s, predict >= 5 images/s.

Each model is fitted once (fit is minutes-scale; a repeat would double the run) and
predicts the test set twice, the second run timed. Rows record where the time goes:
fit = backbone build + feature extraction + noise discrimination + coreset +
threshold calibration; predict = load/transform + features + k-NN + maps.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "python_tests")]

import _harness as H  # noqa: E402
from builders import aligned_object  # noqa: E402  (the tests' images)

H.import_softpatch_cuda()
from softpatch_cuda.models import MODEL_KINDS  # noqa: E402

MODELS = {kind.model_type: kind.cls for kind in MODEL_KINDS}  # the model-file type names


def make_images(n: int, size: int, seed: int, defect_every: int = 0) -> np.ndarray:
    """Rendered, nearly aligned objects (+-size/80 px), every ``defect_every``-th with a
    dark square of size/10 on it."""
    rng = np.random.default_rng(seed)
    return np.stack([aligned_object(rng, bool(defect_every) and i % defect_every == defect_every - 1, size,
                                    jitter=max(1, size // 80), defect_side=size // 10) for i in range(n)])


def fp32_peak_gflops(info: dict, device: str) -> float | None:
    """The machine's FP32 peak: cores x clock x FMA lanes (AVX-512: 32, AVX2: 16 per cycle,
    two FMA units) x 2 flops; GPUs from the harness's table."""
    if device.startswith("cuda"):
        gpu = info.get("gpu") or {}
        peaks = H.gpu_peaks(gpu.get("name", "")) if gpu else None
        return None if peaks is None else peaks["fp32_tflops"] * 1000.0
    try:
        mhz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        return None
    from softpatch_cuda import build_info

    lanes = 16 if "avx512" in build_info()["cpu_isas"] else 8
    cores = info.get("cpu_affinity") or info.get("cpu_count") or 1
    return cores * mhz / 1000.0 * lanes * 2 * 2  # two FMA units, 2 flops per FMA


def bench_model(name: str, args, train: np.ndarray, test: np.ndarray, search: str = "exact") -> list[H.Record]:
    kwargs = dict(
        backbone=args.backbone, pretrained=not args.random_weights, resize=args.resize, crop=args.crop,
        device=args.device, batch_size=args.batch_size, seed=0, search=search, threads=args.threads,
    )
    if name != "patchcore":
        kwargs["alignment"] = args.alignment
    model = MODELS[name](**kwargs)
    fit_s, _ = H.time_once(lambda: model.fit(train), args.device)
    info = model.fit_info_
    params = dict(kwargs, n_train=len(train), image_size=args.image_size, grid=info["grid"], embed_dim=info["embed_dim"],
                  alignment_chosen=info.get("alignment"), alignment_statistic=info.get("alignment_statistic"),
                  bank_size=info.get("cls_bank_size"), seg_bank_size=info.get("seg_bank_size"))
    split = {k: round(v, 3) for k, v in info["timings"].items()}
    impl = name if search == "exact" else f"{name} (search={search})"
    records = [H.Record(
        op="fit", case=f"{len(train)} images {args.crop or args.resize}px", impl=impl, params=params,
        device=args.device, median_s=fit_s, repeats=1,
        throughput={"images_per_s": len(train) / fit_s, **split},
        note="target < 10 s (SoftPatch+, 200 images, 224 px, idle 2-core CPU)" if args.device == "cpu" else "",
    )]
    model.predict(test[: min(len(test), args.batch_size)])  # warm-up (allocator, thread pools)
    timing, pred = H.time_call(lambda: model.predict(test), args.device, repeats=args.repeats, warmup=0)
    split = {k: round(v, 3) for k, v in model.predict_timings_.items()}
    labels = np.array([(i % 5 == 4) for i in range(len(test))])
    pos, neg = pred.scores[labels], pred.scores[~labels]
    auroc = float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))) if len(pos) and len(neg) else None
    # roofline of the k-NN: exact search costs 2 * patches * bank rows * D per bank
    h, w = info["grid"]
    banks = [info.get("cls_bank_size") or 0, info.get("seg_bank_size") or 0]
    knn_gflop = 2.0 * len(test) * h * w * sum(banks) * info["embed_dim"] / 1e9
    knn_s = max(model.predict_timings_.get("knn_s", 0.0), 1e-9)
    peak = fp32_peak_gflops(H.machine_info(), args.device)
    throughput = {"images_per_s": len(test) / timing.median_s, **split, "image_auroc_sanity": auroc,
                  "knn_share": round(knn_s / max(sum(model.predict_timings_.values()), 1e-9), 3),
                  "knn_exact_equivalent_gflop_s": round(knn_gflop / knn_s, 1),
                  "fp32_peak_gflop_s": None if peak is None else round(peak, 1)}
    if search != "exact":  # tolerance: the same fitted banks searched exactly
        banks = [b for b in (model.state.cls_bank, model.state.seg_bank) if b is not None]
        for bank in banks:
            bank.search = "exact"
        exact = model.predict(test)
        for bank in banks:
            bank.search = search
        rel = np.abs(pred.patch_scores - exact.patch_scores) / np.maximum(exact.patch_scores, 1e-9)
        throughput.update(patch_scores_changed=float((rel > 1e-5).mean()), max_rel_patch_score_change=float(rel.max()),
                          max_rel_image_score_change=float((np.abs(pred.scores - exact.scores) / exact.scores).max()))
    records.append(H.Record(
        op="predict", case=f"{len(test)} images {args.crop or args.resize}px", impl=impl,
        params=dict(n_test=len(test), batch_size=args.batch_size, bank_size=info.get("cls_bank_size"),
                    seg_bank_size=info.get("seg_bank_size"), search=search),
        device=args.device, median_s=timing.median_s, iqr_s=timing.iqr_s, repeats=timing.repeats,
        throughput=throughput,
        note="target >= 30 images/s (PatchCore, SoftPatch; idle)" if args.device == "cpu" else "",
    ))
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", default="softpatch", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--image-size", type=int, default=256, help="side of the generated images")
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--random-weights", action="store_true", help="pretrained=False (no weights needed)")
    p.add_argument("--alignment", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="timed predict repeats")
    p.add_argument("--search", default="exact", help="comma list of k-NN search modes to run: exact, pca")
    p.add_argument("--threads", default="auto", help="model threads: auto (default) or a number")
    p.add_argument("--quick", action="store_true", help="tiny run (20 images, 64 px, random resnet18): smoke test")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.image_size, args.resize, args.crop = 20, 10, 64, 64, 64
        args.backbone, args.random_weights = "resnet18", True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the models log each fit stage's duration at INFO: visible while a long fit runs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    torch.manual_seed(0)
    train = make_images(args.n_train, args.image_size, seed=1)
    test = make_images(args.n_test, args.image_size, seed=2, defect_every=5)
    records: list[H.Record] = []
    if args.threads != "auto":
        args.threads = int(args.threads)
    for name in names:
        for search in [m.strip() for m in args.search.split(",") if m.strip()]:
            t0 = time.perf_counter()
            records += bench_model(name, args, train, test, search)
            print(f"{name} ({search}): done in {time.perf_counter() - t0:.1f} s", flush=True)
    info = H.machine_info()
    # the 2-core dev machine is shared: record how busy it was
    info["load_average_1_5_15"] = list(__import__("os").getloadavg())
    json_path, md_path = H.write_results(records, info, vars(args), args.out, args.device)
    md = md_path.read_text().replace("softpatch_cuda kernel benchmark", "softpatch_cuda pipeline benchmark", 1)
    md = md.replace("\n\nTimes are", f"\n- load average (1/5/15 min) at the end: {info['load_average_1_5_15']}\n\nTimes are", 1)
    md_path.write_text(md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
