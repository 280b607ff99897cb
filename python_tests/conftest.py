"""Shared test fixtures and the `cuda` marker's auto-skip."""

from __future__ import annotations

import numpy as np
import pytest

import softpatch_cuda
from softpatch_cuda import cuda_available, cuda_unavailable_reason


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason=f"CUDA unavailable: {cuda_unavailable_reason()}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


CPU_ISAS = ("avx512", "avx2", "scalar")
SUPPORTED_CPU_ISAS = softpatch_cuda.build_info()["cpu_isas"]


@pytest.fixture(params=CPU_ISAS)
def isa(request, monkeypatch):
    """Run a test once per CPU instruction-set path (SOFTPATCH_CPU_ISA); paths this
    CPU or build lacks are skipped."""
    if request.param not in SUPPORTED_CPU_ISAS:
        pytest.skip(f"{request.param} not supported here (supported: {SUPPORTED_CPU_ISAS})")
    monkeypatch.setenv("SOFTPATCH_CPU_ISA", request.param)
    return request.param


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
