"""Shared test fixtures and the `cuda` marker's auto-skip."""

from __future__ import annotations

import numpy as np
import pytest

from builders import CPU_ISAS, SUPPORTED_CPU_ISAS
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


@pytest.fixture(params=CPU_ISAS)
def isa(request, monkeypatch):
    """Run a test once per CPU instruction-set path (SOFTPATCH_CPU_ISA); paths this
    CPU or build lacks are skipped."""
    if request.param not in SUPPORTED_CPU_ISAS:
        pytest.skip(f"{request.param} not supported here (supported: {SUPPORTED_CPU_ISAS})")
    monkeypatch.setenv("SOFTPATCH_CPU_ISA", request.param)
    return request.param



@pytest.fixture(scope="session")
def fitted():
    """``fitted(kind, **options)``: a model of that kind fitted (once per session) on
    ``fitted.train`` with builders.FAST and the options -- the equality tests of the
    sharded fit, the exported predictor and Ray share these fits."""
    from builders import FAST, object_set

    cache: dict = {}
    train = list(object_set(16, 2, seed=11)[0])

    def fit(kind, **options):
        key = (kind.__name__, tuple(sorted(options.items(), key=lambda kv: kv[0])))
        if key not in cache:
            cache[key] = kind(**FAST, **options).fit(train)
        return cache[key]

    fit.train = train
    return fit
