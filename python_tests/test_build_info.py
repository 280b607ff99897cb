"""The compiled module reports how it was built, and run-time device choice is explained."""

from __future__ import annotations

import shutil
from importlib import metadata

import pytest
import torch

import softpatch_cuda
from softpatch_cuda import runtime


def test_build_info_fields():
    info = softpatch_cuda.build_info()
    for key in ("version", "cuda_compiled", "cuda_version", "compiler", "openmp", "cuda_available"):
        assert key in info
    assert isinstance(info["cuda_compiled"], bool)
    assert info["openmp_max_threads"] >= 1


def test_version_matches_package_metadata():
    try:
        dist_version = metadata.version("softpatch-cuda")
    except metadata.PackageNotFoundError:
        pytest.skip("running from a source tree, not an installed package")
    assert softpatch_cuda.__version__ == dist_version == softpatch_cuda.build_info()["version"]


def test_cuda_compiled_wherever_nvcc_exists():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on this machine")
    if softpatch_cuda.build_info()["cuda_option"] == "OFF":
        pytest.skip("developer build configured with SOFTPATCH_CUDA=OFF")
    assert softpatch_cuda.build_info()["cuda_compiled"], "nvcc is installed but the module was built without CUDA"
    if softpatch_cuda.build_info()["cuda_compiled"]:
        assert softpatch_cuda.build_info()["cuda_architectures"]


def test_auto_device_and_reason():
    dev = runtime.resolve_device("auto")
    if softpatch_cuda.cuda_available():
        assert dev.type == "cuda"
        assert softpatch_cuda.cuda_unavailable_reason() == ""
    else:
        assert dev == torch.device("cpu")
        assert softpatch_cuda.cuda_unavailable_reason()
        with pytest.raises(RuntimeError, match="CUDA is unavailable"):
            runtime.resolve_device("cuda")


def test_bad_device_string():
    with pytest.raises(ValueError, match="device must be"):
        runtime.resolve_device("tpu")
    assert runtime.resolve_device("cpu") == torch.device("cpu")
