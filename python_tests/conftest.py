"""Shared test fixtures and the `cuda` marker's auto-skip."""

from __future__ import annotations

import numpy as np
import pytest

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


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
