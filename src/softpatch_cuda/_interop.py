"""The one place where user arrays become kernel arguments.

numpy arrays and torch CPU tensors reach the C++ kernels zero-copy (torch CPU
tensors through ``Tensor.numpy()``, i.e. a shared-memory view); CUDA arrays
(torch, CuPy) go as raw device pointers with the caller's current stream.
Nothing is converted silently: a wrong dtype is a TypeError naming the argument.
Outputs are allocated in the caller's framework on the caller's device.

torch is never imported here: a torch tensor can only arrive once its caller imported
torch, so the torch branches find the module in ``sys.modules`` (the torch-free
predictor runs the same validated ops on numpy arrays).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

DTYPE_CODE = {"float32": 0, "float16": 1}  # must match sp::DType


@dataclass
class Arr:
    """A validated array argument."""

    obj: Any  # the original object (numpy array, torch tensor, cupy array)
    framework: str  # "numpy" | "torch" | "cupy"
    device: str  # "cpu" | "cuda"
    device_index: int  # -1 on CPU
    dtype: str  # "float32" | "float16" | "int64" | ...
    shape: tuple

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _torch() -> Any:
    """The torch module when it is loaded, else None (then no argument can be a tensor)."""
    return sys.modules.get("torch")


def is_tensor(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def to_numpy(x: Any) -> np.ndarray:
    """A host numpy array of ``x``: numpy as it is, CPU tensors as a shared-memory view,
    device arrays copied to the host."""
    if isinstance(x, np.ndarray):
        return x
    if is_tensor(x):
        return x.detach().cpu().numpy()
    if _is_cupy(x):
        return x.get()
    return np.asarray(x)


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.startswith("cupy") and hasattr(x, "__cuda_array_interface__")


def wrap(x: Any, op: str, name: str) -> Arr:
    """Classify ``x`` (numpy / torch / CuPy) without copying it."""
    if isinstance(x, np.ndarray):
        return Arr(x, "numpy", "cpu", -1, str(x.dtype), tuple(x.shape))
    if is_tensor(x):
        dev = x.device
        if dev.type not in ("cpu", "cuda"):
            raise TypeError(f"{op}: argument '{name}' is on device {dev}; only cpu and cuda are supported")
        dtype = str(x.dtype).replace("torch.", "")
        return Arr(x, "torch", dev.type, dev.index if dev.type == "cuda" else -1, dtype, tuple(x.shape))
    if _is_cupy(x):
        return Arr(x, "cupy", "cuda", int(x.device.id), str(x.dtype), tuple(x.shape))
    raise TypeError(
        f"{op}: argument '{name}' must be a numpy array, a torch tensor or a CuPy array, got {type(x).__name__}"
    )


def check_float(a: Arr, op: str, name: str, allowed: Sequence[str] = ("float32",)) -> None:
    if a.dtype not in allowed:
        raise TypeError(
            f"{op}: argument '{name}' must have dtype {' or '.join(allowed)}, got {a.dtype} "
            "(convert explicitly, e.g. x.astype(np.float32) or x.float())"
        )


def check_ndim(a: Arr, op: str, name: str, ndims: Sequence[int]) -> None:
    if a.ndim not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{op}: argument '{name}' must be {want}-dimensional, got shape {a.shape}")


def check_nonempty(a: Arr, op: str, name: str) -> None:
    if any(s == 0 for s in a.shape):
        raise ValueError(f"{op}: argument '{name}' is empty (shape {a.shape})")


def check_finite(a: Arr, op: str, name: str) -> None:
    x = a.obj
    if a.framework == "torch" and x.device.type == "cpu" and a.dtype in ("float32", "float16", "float64"):
        x = x.detach().numpy()  # shares memory; numpy's reductions are ~25x faster than torch.isfinite here
    if isinstance(x, np.ndarray):
        # min/max propagate NaN and expose inf: two passes, no temporary bool array.
        ok = x.size == 0 or bool(np.isfinite(x.min()) and np.isfinite(x.max()))
    elif a.framework == "torch":
        ok = bool(_torch().isfinite(x).all())
    else:
        import cupy  # noqa: PLC0415  (only reachable with a CuPy input)

        ok = bool(cupy.isfinite(x).all())
    if not ok:
        raise ValueError(f"{op}: argument '{name}' contains NaN or infinite values")


def check_weights(a: Arr, op: str, name: str) -> None:
    """Weights (one per point, O(n)): finite and >= 0, checked whatever ``check_finite``
    says -- one min/max pass."""
    x = a.obj
    if a.framework == "torch":
        lo, hi = (float(v) for v in _torch().aminmax(x.detach()))
    else:  # numpy or CuPy; min/max propagate NaN
        lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{op}: argument '{name}' contains NaN or infinite values")
    if lo < 0:
        raise ValueError(f"{op}: argument '{name}' must be >= 0 (its minimum is {lo:g})")


def check_same_device(op: str, *args: tuple[str, Arr | None]) -> None:
    present = [(n, a) for n, a in args if a is not None]
    first_name, first = present[0]
    for n, a in present[1:]:
        if (a.device, a.device_index) != (first.device, first.device_index):
            raise ValueError(
                f"{op}: arguments '{first_name}' and '{n}' are on different devices "
                f"({first.device}:{first.device_index} vs {a.device}:{a.device_index})"
            )
        if a.framework != first.framework and "cupy" in (a.framework, first.framework):
            raise TypeError(f"{op}: arguments '{first_name}' and '{n}' must come from the same framework")


# ---------------------------------------------------------------- CPU side
def host_view(a: Arr) -> np.ndarray:
    """numpy view of a CPU array; copies only when the layout is not C-contiguous."""
    x = a.obj
    if a.framework == "torch":
        x = x.detach()
        if not x.is_contiguous():
            x = x.contiguous()
        return x.numpy()  # shares memory with the tensor
    return np.ascontiguousarray(x)


def host_float32(a: Arr) -> np.ndarray:
    """numpy float32 view; float16 is upcast (documented: CPU kernels compute in float32)."""
    v = host_view(a)
    return v if v.dtype == np.float32 else v.astype(np.float32)


def empty_like_framework(ref: Arr, shape: tuple, dtype: str) -> Any:
    """Allocate an output in ``ref``'s framework and on its device."""
    if ref.framework == "numpy":
        return np.empty(shape, dtype=dtype)
    if ref.framework == "torch":
        torch = _torch()
        dev = torch.device(ref.device, ref.device_index) if ref.device == "cuda" else torch.device("cpu")
        return torch.empty(shape, dtype=getattr(torch, dtype), device=dev)
    import cupy  # noqa: PLC0415

    with cupy.cuda.Device(ref.device_index):
        return cupy.empty(shape, dtype=dtype)


def out_view(out: Any) -> np.ndarray:
    """Writable numpy view of a freshly allocated CPU output (numpy or torch)."""
    return out if isinstance(out, np.ndarray) else out.numpy()


# ---------------------------------------------------------------- CUDA side
def device_ptr(x: Any) -> int:
    """Raw device pointer of a C-contiguous CUDA array (0 for None)."""
    if x is None:
        return 0
    if is_tensor(x):
        return int(x.data_ptr())
    return int(x.__cuda_array_interface__["data"][0])


def numel(x: Any) -> int:
    """Number of elements of a CUDA array (torch or CuPy)."""
    return int(x.numel()) if is_tensor(x) else int(x.size)


def device_contiguous(a: Arr) -> Any:
    x = a.obj
    if a.framework == "torch":
        x = x.detach()
        return x if x.is_contiguous() else x.contiguous()
    import cupy  # noqa: PLC0415

    return cupy.ascontiguousarray(x)


def current_stream(ref: Arr) -> int:
    """The caller's current CUDA stream on ``ref``'s device, as an integer handle."""
    if ref.framework == "torch":
        return int(_torch().cuda.current_stream(ref.device_index).cuda_stream)
    import cupy  # noqa: PLC0415

    return int(cupy.cuda.get_current_stream().ptr)


class device_guard:  # noqa: N801  (used as a context manager)
    """Make ``ref``'s GPU current for the duration of a kernel call."""

    def __init__(self, ref: Arr):
        self.ref = ref
        self._ctx = None

    def __enter__(self):
        if self.ref.framework == "torch":
            self._ctx = _torch().cuda.device(self.ref.device_index)
        else:
            import cupy  # noqa: PLC0415

            self._ctx = cupy.cuda.Device(self.ref.device_index)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
