"""Shared benchmark machinery: timing, machine description, seeded data, result writers.

Timings are wall-clock medians over repeats after a warm-up; on CUDA every timed
call is bracketed by CUDA events with a synchronisation, so asynchronous kernel
launches are not mistaken for finished work.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Peak dense float32 (non-tensor-core) / TF32 tensor-core TFLOP/s and HBM GB/s, SXM parts (vendor datasheets).
GPU_PEAKS = {
    "H100": {"fp32_tflops": 67.0, "tf32_tflops": 495.0, "fp16_tflops": 990.0, "hbm_gbps": 3350.0},
    "H200": {"fp32_tflops": 67.0, "tf32_tflops": 495.0, "fp16_tflops": 990.0, "hbm_gbps": 4800.0},
}


def import_softpatch_cuda():
    """Import the installed package; fall back to this checkout's src/ (a developer build
    puts the compiled module there) only when none is installed."""
    import importlib
    import sys

    try:
        return importlib.import_module("softpatch_cuda")
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        sys.modules.pop("softpatch_cuda", None)
        return importlib.import_module("softpatch_cuda")


def gpu_peaks(name: str) -> dict | None:
    """Peak figures for a GPU by (substring of) its name, or None when unknown."""
    for key, peaks in GPU_PEAKS.items():
        if key in name.upper():
            return dict(peaks, matched=key)
    return None


# ------------------------------------------------------------------ timing
@dataclass
class Timing:
    median_s: float
    iqr_s: float
    repeats: int
    samples_s: list[float] = field(default_factory=list)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str = "cpu", repeats: int = 5, warmup: int = 1) -> tuple[Timing, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Returns the timing (median, inter-quartile range, samples) and the last result.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    _sync(device)
    samples = []
    if device.startswith("cuda"):
        import torch

        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            stop.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(stop) / 1000.0)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = fn()
            samples.append(time.perf_counter() - t0)
    return summarise(samples), result


def summarise(samples: list[float]) -> Timing:
    samples = sorted(samples)
    if len(samples) >= 4:
        q = statistics.quantiles(samples, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = samples[-1] - samples[0]
    return Timing(statistics.median(samples), iqr, len(samples), samples)


def time_once(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, Any]:
    """A single synchronised run (no warm-up); used to estimate cost before committing repeats."""
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - t0, result


# ------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 -- any import failure means "not available"
        return None
    return getattr(mod, "__version__", "unknown")


def machine_info() -> dict:
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_num_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "ram_gib": _ram_gib(),
        "versions": {m: _version(m) for m in ("torch", "numpy", "faiss", "sklearn")},
    }
    try:
        import softpatch_cuda

        info["softpatch_cuda"] = {k: v for k, v in softpatch_cuda.build_info().items()}
    except Exception as exc:  # noqa: BLE001
        info["softpatch_cuda"] = {"error": repr(exc)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "total_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "torch_cuda": torch.version.cuda,
        }
        try:
            import subprocess

            gpu["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
        except Exception:  # noqa: BLE001
            gpu["driver"] = None
        gpu["peaks"] = gpu_peaks(props.name)
        info["gpu"] = gpu
    return info


def machine_slug(info: dict) -> str:
    name = info.get("gpu", {}).get("name") if info.get("gpu") else None
    base = f"{info['cpu_model']}-{info['cpu_affinity'] or info['cpu_count']}c"
    if name:
        base = f"{name}"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")[:60]


# ------------------------------------------------------------------ data
def make_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def gaussian_features(n: int, d: int, seed: int) -> np.ndarray:
    """[n, d] float32 standard-normal rows (knn / pairwise benchmarks)."""
    return make_rng(seed).standard_normal((n, d), dtype=np.float32)


def clustered_patch_features(n: int, d: int, seed: int, n_clusters: int = 50, subspace_dim: int = 24,
                             noise: float = 0.05) -> np.ndarray:
    """[n, d] float32 resembling randomly projected CNN patch features.

    A mixture of ``n_clusters`` Gaussians (unequal sizes and spreads) living in a random
    ``subspace_dim``-dimensional subspace, plus small isotropic noise in all ``d`` dims --
    greedy k-center on such data behaves like on real patch banks (many near-duplicates,
    a few far points), unlike on isotropic noise.
    """
    rng = make_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, subspace_dim)))
    centres = rng.standard_normal((n_clusters, subspace_dim)) * 3.0
    spreads = rng.uniform(0.3, 1.2, n_clusters)
    sizes = rng.dirichlet(np.full(n_clusters, 2.0))
    labels = rng.choice(n_clusters, size=n, p=sizes)
    latent = centres[labels] + rng.standard_normal((n, subspace_dim)) * spreads[labels, None]
    x = latent @ basis.T + rng.standard_normal((n, d)) * noise
    return np.ascontiguousarray(x, dtype=np.float32)


def lof_groups(b: int, n: int, d: int, seed: int, outlier_frac: float = 0.05) -> np.ndarray:
    """[b, n, d] float32: per position n samples (one per image), a few of them outliers."""
    rng = make_rng(seed)
    x = rng.standard_normal((b, n, d), dtype=np.float32)
    n_out = max(1, int(n * outlier_frac))
    x[:, :n_out] += rng.uniform(3.0, 6.0, (b, n_out, 1)).astype(np.float32)
    return x


# ------------------------------------------------------------------ results
@dataclass
class Record:
    op: str
    case: str
    impl: str
    params: dict
    device: str
    status: str = "ok"  # ok | skipped | estimated | error
    median_s: float | None = None
    iqr_s: float | None = None
    repeats: int = 0
    note: str = ""
    speedup_vs_best_baseline: float | None = None  # only on our rows: best baseline time / ours
    best_baseline: str | None = None
    correctness: dict | None = None  # only on baseline rows: ours vs this baseline
    throughput: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def write_results(records: list[Record], info: dict, args: dict, out_dir: str | Path, device: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    stem = f"{machine_slug(info)}-{device}-{now.strftime('%Y%m%d-%H%M%S')}"
    payload = {
        "created_utc": now.isoformat(timespec="seconds"),
        "device": device,
        "args": args,
        "machine": info,
        "records": [r.to_dict() for r in records],
    }
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown_table(records, info, device, payload["created_utc"]))
    return json_path, md_path


def _fmt_s(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def _fmt_corr(c: dict | None) -> str:
    if not c:
        return ""
    parts = []
    for key, val in c.items():
        if isinstance(val, float):
            parts.append(f"{key}={val:.2g}")
        else:
            parts.append(f"{key}={val}")
    return ", ".join(parts)


def markdown_table(records: list[Record], info: dict, device: str, created: str) -> str:
    gpu = info.get("gpu")
    lines = [
        f"# softpatch_cuda kernel benchmark ({device})",
        "",
        f"- date (UTC): {created}",
        f"- CPU: {info['cpu_model']}, {info['cpu_affinity'] or info['cpu_count']} usable cores, "
        f"torch threads {info['torch_num_threads']}, OMP_NUM_THREADS={info['omp_num_threads_env']}, RAM {info['ram_gib']} GiB",
    ]
    if gpu:
        lines.append(f"- GPU: {gpu['name']} ({gpu['total_memory_gib']} GiB), driver {gpu.get('driver')}, torch CUDA {gpu['torch_cuda']}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    sp = info.get("softpatch_cuda", {})
    lines.append(f"- softpatch_cuda: {sp.get('version')} (cuda_compiled={sp.get('cuda_compiled')})")
    lines += [
        "",
        "Times are medians over repeats (IQR in brackets). `speedup` = best baseline time / ours (>1: ours faster). "
        "`check` compares our result with that baseline's. Status `estimated`: extrapolated from part of the work (see note).",
        "",
        "| op | case | impl | status | time | speedup | check / throughput | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        t = _fmt_s(r.median_s)
        if r.median_s is not None and r.iqr_s:
            t += f" (±{_fmt_s(r.iqr_s)})"
        sp_txt = f"{r.speedup_vs_best_baseline:.2f}x vs {r.best_baseline}" if r.speedup_vs_best_baseline else ""
        extra = _fmt_corr(r.correctness)
        if r.throughput:
            extra = (extra + "; " if extra else "") + _fmt_corr(r.throughput)
        lines.append(f"| {r.op} | {r.case} | {r.impl} | {r.status} | {t} | {sp_txt} | {extra} | {r.note} |")
    return "\n".join(lines) + "\n"
