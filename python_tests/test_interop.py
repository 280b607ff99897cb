"""The CPU boundary between user arrays and the C++ kernels (softpatch_cuda._interop
and the pybind11 layer): zero-copy for contiguous numpy arrays and torch CPU
tensors (shared memory, also through DLPack), outputs in the caller's framework,
errors that name the argument, no silent dtype conversion, non-contiguous input
copied once by the Python layer and rejected by the raw binding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softpatch_cuda import _core, ops
from softpatch_cuda import _interop as io


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def data_ptr(x: np.ndarray) -> int:
    return x.__array_interface__["data"][0]


# ------------------------------------------------------------------ zero-copy
def test_numpy_contiguous_input_is_not_copied(rng):
    x = randn(rng, 10, 8)
    view = io.host_float32(io.wrap(x, "op", "x"))
    assert view is x or data_ptr(view) == data_ptr(x)


def test_torch_cpu_tensor_shares_memory(rng):
    t = torch.from_numpy(randn(rng, 10, 8))
    view = io.host_float32(io.wrap(t, "op", "x"))
    assert isinstance(view, np.ndarray)
    assert data_ptr(view) == t.data_ptr()


def test_torch_requires_grad_is_read_without_copy(rng):
    t = torch.from_numpy(randn(rng, 6, 5)).requires_grad_(True)
    view = io.host_view(io.wrap(t, "op", "x"))
    assert data_ptr(view) == t.data_ptr()
    got = ops.knn(t, t, 2)  # no "can't call numpy() on a tensor that requires grad"
    assert torch.equal(got.indices[:, 0], torch.arange(6))


def test_dlpack_views_are_accepted_zero_copy(rng):
    t = torch.from_numpy(randn(rng, 12, 7))
    arr = np.from_dlpack(t)  # torch CPU -> numpy through DLPack: shared memory
    assert data_ptr(arr) == t.data_ptr()
    assert data_ptr(io.host_view(io.wrap(arr, "op", "x"))) == t.data_ptr()
    back = torch.from_dlpack(arr)
    got_np = ops.knn(arr, arr, 3)
    got_t = ops.knn(back, back, 3)
    np.testing.assert_array_equal(got_np.indices, got_t.indices.numpy())


def test_outputs_follow_the_first_argument_framework(rng):
    q, b = randn(rng, 4, 3), randn(rng, 9, 3)
    res = ops.knn(q, torch.from_numpy(b), 2)
    assert isinstance(res.distances, np.ndarray) and isinstance(res.indices, np.ndarray)
    res_t = ops.knn(torch.from_numpy(q), b, 2)
    assert isinstance(res_t.distances, torch.Tensor) and res_t.distances.device.type == "cpu"
    np.testing.assert_array_equal(res.indices, res_t.indices.numpy())
    out = ops.pairwise_sqdist(torch.from_numpy(q), torch.from_numpy(b))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.is_contiguous()


def test_inputs_are_not_modified(rng):
    q, b = randn(rng, 30, 20), randn(rng, 50, 20)
    q0, b0 = q.copy(), b.copy()
    ops.knn(q, b, 3)
    ops.pairwise_sqdist(q, b)
    np.testing.assert_array_equal(q, q0)
    np.testing.assert_array_equal(b, b0)


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.int64, np.bool_, np.uint8])
def test_numpy_wrong_dtype_is_a_type_error_naming_the_argument(rng, dtype):
    good = randn(rng, 5, 4)
    bad = (rng.standard_normal((5, 4)) * 3).astype(dtype)
    with pytest.raises(TypeError, match=f"knn: argument 'bank' must have dtype float32 or float16, got {np.dtype(dtype)}"):
        ops.knn(good, bad)
    with pytest.raises(TypeError, match="argument 'a' must have dtype"):
        ops.pairwise_sqdist(bad, good)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int32])
def test_torch_wrong_dtype_is_a_type_error(rng, dtype):
    bad = torch.from_numpy(randn(rng, 5, 4)).to(dtype)
    with pytest.raises(TypeError, match="argument 'queries' must have dtype float32 or float16"):
        ops.knn(bad, randn(rng, 5, 4))


def test_weights_must_be_float32_even_when_features_are_half(rng):
    q, b = randn(rng, 3, 4, dtype=np.float16), randn(rng, 6, 4, dtype=np.float16)
    with pytest.raises(TypeError, match="argument 'weights' must have dtype float32, got float16"):
        ops.knn(q, b, 1, np.ones(6, np.float16))


def test_not_an_array_is_a_type_error(rng):
    with pytest.raises(TypeError, match="argument 'queries' must be a numpy array, a torch tensor"):
        ops.knn([[1.0, 2.0]], randn(rng, 3, 2))
    with pytest.raises(TypeError, match="argument 'b' must be a numpy array"):
        ops.pairwise_sqdist(randn(rng, 3, 2), None)


# ------------------------------------------------------------------ layout
def test_non_contiguous_inputs_are_copied_once_and_give_the_same_result(rng):
    base = randn(rng, 40, 30)
    for view in (base[::3], base[:, 5:20], base.T[:, :7], base[::-1]):
        assert not view.flags.c_contiguous
        host = io.host_view(io.wrap(view, "op", "x"))
        assert host.flags.c_contiguous and not np.shares_memory(host, base)
        np.testing.assert_array_equal(host, view)
        got = ops.pairwise_sqdist(view, view[:4])
        want = ops.pairwise_sqdist(np.ascontiguousarray(view), np.ascontiguousarray(view[:4]))
        np.testing.assert_array_equal(got, want)


def test_raw_binding_rejects_what_the_python_layer_would_fix(rng):
    """_core never converts: wrong dtype, non-contiguous or read-only outputs are
    errors there (the Python layer copies non-contiguous inputs itself)."""
    q, b = randn(rng, 4, 3), randn(rng, 6, 3)
    d, i = np.empty((4, 2), np.float32), np.empty((4, 2), np.int64)
    _core.knn_cpu(q, b, 2, None, d, i, None)
    np.testing.assert_array_equal(i, ops.knn(q, b, 2).indices)
    with pytest.raises(ValueError, match="argument 'queries' must be C-contiguous"):
        _core.knn_cpu(np.asfortranarray(randn(rng, 4, 3)), b, 2, None, d, i, None)
    with pytest.raises(TypeError, match="argument 'bank' must have dtype float32, got float64"):
        _core.knn_cpu(q, b.astype(np.float64), 2, None, d, i, None)
    with pytest.raises(TypeError, match="argument 'out_idx' must have dtype int64"):
        _core.knn_cpu(q, b, 2, None, d, i.astype(np.int32), None)
    ro = np.empty((1, 4, 6), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="argument 'out' must be writable"):
        _core.pairwise_sqdist_cpu(q[None], b[None], ro)
    with pytest.raises(ValueError, match="k must be in"):
        _core.knn_cpu(q, b, 7, None, np.empty((4, 7), np.float32), np.empty((4, 7), np.int64), None)


# ------------------------------------------------------------------ NaN
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_nan_errors_name_the_argument(rng, framework):
    q, b = randn(rng, 4, 3), randn(rng, 6, 3)
    b[2, 1] = np.nan
    if framework == "torch":
        q, b = torch.from_numpy(q), torch.from_numpy(b)
    with pytest.raises(ValueError, match="knn: argument 'bank' contains NaN or infinite values"):
        ops.knn(q, b)
    with pytest.raises(ValueError, match="pairwise_sqdist: argument 'b' contains NaN"):
        ops.pairwise_sqdist(q, b)
    half = randn(rng, 4, 3, dtype=np.float16)
    half[0, 0] = np.inf
    with pytest.raises(ValueError, match="argument 'a' contains NaN or infinite"):
        ops.pairwise_sqdist(half, half)


# ------------------------------------------------------------------ CUDA entry points
# The raw CUDA bindings check every argument before any CUDA call, so these run on
# any build compiled with CUDA, with or without a GPU. FAKE is an aligned, non-null
# address that is never dereferenced (a missing check would reach the kernel).
FAKE = 1 << 20
needs_cuda_build = pytest.mark.skipif(not hasattr(_core, "knn_cuda"), reason="softpatch_cuda built without CUDA")


@needs_cuda_build
def test_cuda_pairwise_binding_checks():
    args = dict(a=FAKE, b=FAKE, out=FAKE, B=1, n=4, m=5, d=3, dtype=0, tf32=False, stream=0)

    def call(**kw):
        _core.pairwise_sqdist_cuda(*dict(args, **kw).values())

    with pytest.raises(ValueError, match="pairwise_sqdist: argument 'a' is a null device pointer"):
        call(a=0)
    with pytest.raises(ValueError, match="argument 'out' must be aligned to 4 bytes"):
        call(out=FAKE + 2)
    with pytest.raises(ValueError, match="argument 'b' must be aligned to 4 bytes"):
        call(b=FAKE + 2)
    with pytest.raises(ValueError, match="need B, n, m, d >= 1"):
        call(m=0)
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        call(dtype=7)


@needs_cuda_build
def test_cuda_knn_binding_checks():
    q, m, k = 3, 10, 2
    need = _core.knn_cuda_workspace_floats(q, m, k)
    args = dict(queries=FAKE, q=q, bank=FAKE, m=m, d=4, k=k, weights=FAKE, out_dist=FAKE, out_idx=FAKE,
                out_score=FAKE, dtype=0, tf32=False, workspace=FAKE, workspace_floats=need, stream=0)

    def call(**kw):
        _core.knn_cuda(*dict(args, **kw).values())

    with pytest.raises(ValueError, match="knn: k must be in \\[1, m\\]"):
        call(k=11)
    with pytest.raises(ValueError, match="need q, m, d >= 1"):
        call(q=0)
    with pytest.raises(ValueError, match="argument 'out_idx' is a null device pointer"):
        call(out_idx=0)
    with pytest.raises(ValueError, match="argument 'out_idx' must be aligned to 8 bytes"):
        call(out_idx=FAKE + 4)
    with pytest.raises(ValueError, match="out_score needs weights"):
        call(weights=0)
    with pytest.raises(ValueError, match=f"workspace has {need - 1} floats, needs {need}"):
        call(workspace_floats=need - 1)
    with pytest.raises(ValueError, match="argument 'bank' must be aligned to 2 bytes"):
        call(dtype=1, bank=FAKE + 1)


@needs_cuda_build
def test_cuda_lof_binding_checks():
    need = _core.lof_cuda_workspace_floats(2, 5, 3)
    args = dict(x=FAKE, B=2, n=5, d=4, k=3, out=FAKE, workspace=FAKE, workspace_floats=need, stream=0)

    def call(**kw):
        _core.lof_cuda(*dict(args, **kw).values())

    with pytest.raises(ValueError, match="lof: need n >= 2 and 1 <= k <= n - 1"):
        call(k=5)
    with pytest.raises(ValueError, match="need B >= 1 and d >= 1"):
        call(d=0)
    with pytest.raises(ValueError, match="argument 'x' is a null device pointer"):
        call(x=0)
    with pytest.raises(ValueError, match="argument 'workspace' must be aligned to 8 bytes"):
        call(workspace=FAKE + 4)
    with pytest.raises(ValueError, match="workspace has 1 floats"):
        call(workspace_floats=1)


@needs_cuda_build
def test_cuda_kcenter_binding_checks():
    n = 20
    need = _core.kcenter_cuda_workspace_floats(n)
    args = dict(x=FAKE, n=n, d=3, m=5, start=0, anchors=0, n_anchors=0, sample_weight=0, out_idx=FAKE, dtype=0,
                workspace=FAKE, workspace_floats=need, stream=0)

    def call(**kw):
        _core.kcenter_greedy_cuda(*dict(args, **kw).values())

    with pytest.raises(ValueError, match="kcenter_greedy: need 1 <= m <= n"):
        call(m=21)
    with pytest.raises(ValueError, match="start must be in \\[0, n\\)"):
        call(start=20)
    with pytest.raises(ValueError, match="kcenter_greedy_approx: argument 'anchors' is a null device pointer"):
        call(start=-1)
    with pytest.raises(ValueError, match="kcenter_greedy_approx: anchors must not be empty"):
        call(start=-1, anchors=FAKE)
    with pytest.raises(ValueError, match="argument 'sample_weight' must be aligned to 4 bytes"):
        call(sample_weight=FAKE + 1)
    with pytest.raises(ValueError, match="workspace has 0 floats"):
        call(workspace_floats=0)


# ------------------------------------------------------------------ the stub
def test_core_stub_matches_the_module():
    """softpatch_cuda/_core.pyi names every function of the compiled module with the
    module's own parameter names (CUDA ones: only checked in a CUDA build)."""
    import ast
    import re
    from pathlib import Path

    import softpatch_cuda

    tree = ast.parse((Path(softpatch_cuda.__file__).parent / "_core.pyi").read_text())
    stub = {f.name: [a.arg for a in f.args.args] for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert "CudaError" in {c.name for c in tree.body if isinstance(c, ast.ClassDef)}
    assert issubclass(_core.CudaError, RuntimeError)
    runtime = {n for n in dir(_core) if callable(getattr(_core, n)) and not n.startswith("_") and n != "CudaError"}
    cuda_names = {n for n in stub if "cuda" in n and n not in ("cuda_probe", "cuda_device_name")}
    assert runtime <= set(stub), f"missing from _core.pyi: {sorted(runtime - set(stub))}"
    assert set(stub) - cuda_names <= runtime, f"not in the module: {sorted(set(stub) - cuda_names - runtime)}"
    assert (cuda_names <= runtime) == bool(_core.build_info()["cuda_compiled"])
    for name in runtime:
        signature = getattr(_core, name).__doc__.strip().splitlines()[0]  # pybind11: name(a: T, ...) -> R
        params = re.findall(r"(\w+): ", signature[signature.index("(") :])
        assert params == stub[name], f"{name}: module {params}, stub {stub[name]}"
