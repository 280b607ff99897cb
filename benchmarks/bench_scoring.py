"""The post-k-NN scoring core's map step on the CPU: the array-API core run on numpy (the
torch-free predictor) and on torch tensors (the detector), against the bilinear
interpolation + two 33-tap convolutions the torch path ran before (the tests' oracle,
python_tests/test_scoring.py). Why the core is what it is: benchmarks/results/scoring_maps_cpu.md.

    python benchmarks/bench_scoring.py [--batch 16] [--grid 28] [--size 224] [--threads 1,2] [--repeats 50]

Each variant runs in this process with ``--threads`` torch threads and as many BLAS
threads for numpy (threadpoolctl); medians of ``--repeats`` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "python_tests")]

import _harness as H  # noqa: E402

H.import_softpatch_cuda()
from softpatch_cuda import scoring  # noqa: E402
from test_scoring import _torch_maps  # noqa: E402  (the interpolate + conv2d path, float64 there)


def interpolate_and_convolve(patch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """What the torch path did before: F.interpolate, then a reflect-padded separable conv2d, in float32."""
    import torch.nn.functional as F  # noqa: PLC0415

    up = F.interpolate(patch[:, None], size=size, mode="bilinear", align_corners=False)
    radius = int(4.0 * scoring.MAP_SIGMA + 0.5)
    taps = torch.from_numpy(scoring.gaussian_taps(scoring.MAP_SIGMA).astype(np.float32))
    for dim in (3, 2):
        n = up.shape[dim]
        idx = torch.remainder(torch.arange(-radius, n + radius), 2 * n)
        up = up.index_select(dim, torch.where(idx >= n, 2 * n - 1 - idx, idx))
        up = F.conv2d(up, taps.view(1, 1, 1, -1) if dim == 3 else taps.view(1, 1, -1, 1))
    return up[:, 0]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--grid", type=int, default=28)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    patch = np.random.default_rng(0).random((args.batch, args.grid, args.grid), dtype=np.float32) * 3
    size = (args.size, args.size)
    want = _torch_maps(torch.from_numpy(patch), size).numpy()
    variants = {
        "core on numpy (predictor)": lambda: scoring.anomaly_maps(patch, size),
        "core on torch (detector)": lambda: scoring.anomaly_maps(torch.from_numpy(patch), size),
        "interpolate + conv2d (before)": lambda: interpolate_and_convolve(torch.from_numpy(patch), size),
    }
    print(f"maps: {args.batch} x {args.grid}x{args.grid} -> {args.size}x{args.size}; load average {os.getloadavg()}")
    print("| variant | threads | median ms | max rel diff to float64 oracle |\n|---|---:|---:|---:|")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        with threadpool_limits(limits=threads, user_api="blas"):
            for name, fn in variants.items():
                got = np.asarray(fn())
                err = float(np.abs(got - want).max() / np.abs(want).max())
                print(f"| {name} | {threads} | {median_ms(fn, args.repeats):.2f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
