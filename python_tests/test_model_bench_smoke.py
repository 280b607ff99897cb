"""Smoke test of benchmarks/bench_pipeline.py --quick: it runs and writes complete results.

No timing is asserted; the file's fields and the per-stage split are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_pipeline.py"


@pytest.mark.slow  # runs the benchmark script in a subprocess
def test_bench_pipeline_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--models", "softpatch", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (json_path,) = tmp_path.glob("*-cpu-*.json")
    (md_path,) = tmp_path.glob("*-cpu-*.md")
    data = json.loads(json_path.read_text())
    ops = {(r["op"], r["impl"]) for r in data["records"]}
    assert ops == {("fit", "softpatch"), ("predict", "softpatch")}
    fit = next(r for r in data["records"] if r["op"] == "fit")
    assert {"features_s", "denoise_s", "coreset_s", "calibration_s"} <= set(fit["throughput"])
    assert fit["params"]["alignment_chosen"] in ("position", "window", "global")
    assert "machine" in data and data["machine"]["cpu_count"] >= 1
    assert "pipeline benchmark" in md_path.read_text()
