"""One vocabulary for argument checks, and the robust outlier limit.

Every public entry point validates its arguments with these helpers, so the same
mistake gets the same message everywhere: the argument's name, what was expected,
what was given. ``bool`` is never accepted where a number is expected (``True`` is
an ``int`` to Python, never to a user).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterable

import numpy as np

MAD_TO_SIGMA = 1.4826  # MAD x this = standard deviation of a normal distribution


def is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False) -> int | None:
    """``value`` as an int in [minimum, maximum]; ValueError naming ``name`` otherwise."""
    if value is None and allow_none:
        return None
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        what = "an int" + (f" {' and '.join(bounds)}" if bounds else "") + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False, allow_none: bool = False) -> float | None:
    """``value`` as a finite float in the interval (closed unless ``*_open``); ValueError otherwise."""
    if value is None and allow_none:
        return None
    ok = is_number(value) and math.isfinite(float(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        if lo is not None and hi is not None:
            what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            what = f"a number {'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            what = f"a number {'<' if hi_open else '<='} {hi:g}"
        else:
            what = "a finite number"
        raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def robust_limit(values: Any, factor: float, scale_floor: float = 0.0) -> float:
    """``median + factor * 1.4826 * MAD`` of the finite values (NaN when there are none).

    ``scale_floor`` bounds the robust scale (1.4826 * MAD) from below: when more than
    half of the values are (nearly) equal the MAD is ~0 and every value above the
    median would pass the limit; the floor keeps the limit meaningful there.
    """
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return float("nan")
    med = float(np.median(arr))
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(arr - med))), float(scale_floor))
    return med + factor * scale
