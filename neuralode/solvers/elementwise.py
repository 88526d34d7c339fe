"""Elementwise operations on a clock value: a Python float (one problem, the float-clock
driver) or a (B,) tensor (a per-sample batch, the tensor-clock driver).

Every formula of step-size control (the error ratio's use, the step factor, the first
step, the stretch onto a stop, event location) is written once with these operations, so
the two drivers run the same arithmetic: with floats it costs a few Python operations, with
tensors it is a handful of elementwise kernels and no host synchronisation.

Floats follow the tensor semantics where they differ: ``where`` picks without raising,
comparisons with nan are False, and no formula here divides by a value that may be zero.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def where(cond, a, b):
    """``a`` where ``cond`` holds, else ``b``."""
    if isinstance(cond, Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


def minimum(a, b):
    if isinstance(a, Tensor):
        return torch.minimum(a, b) if isinstance(b, Tensor) else a.clamp(max=b)
    if isinstance(b, Tensor):
        return b.clamp(max=a)
    return a if (a < b or a != a) else b  # nan propagates, as in torch.minimum


def maximum(a, b):
    if isinstance(a, Tensor):
        return torch.maximum(a, b) if isinstance(b, Tensor) else a.clamp(min=b)
    if isinstance(b, Tensor):
        return b.clamp(min=a)
    return a if (a > b or a != a) else b


def clip(x, lo: float, hi: float):
    """x limited to [lo, hi] (nan stays nan)."""
    if isinstance(x, Tensor):
        return x.clamp(min=lo, max=hi)
    return lo if x < lo else (hi if x > hi else x)


def isfinite(x):
    return torch.isfinite(x) if isinstance(x, Tensor) else math.isfinite(x)


def logical_not(x):
    return ~x if isinstance(x, Tensor) else not x


def ulp(x):
    """The spacing of float64 numbers at |x| (``math.ulp``)."""
    if isinstance(x, Tensor):
        x = x.abs()
        return torch.nextafter(x, torch.full_like(x, math.inf)) - x
    return math.ulp(x)


def column(h, like: Tensor):
    """A per-row value (a float, or (B,) for a (B, ...) state) shaped to multiply ``like``."""
    if isinstance(h, Tensor):
        return h.to(like.dtype).reshape(h.shape + (1,) * (like.dim() - h.dim()))
    return h


def every(x) -> bool:
    """True when x holds for every row (a host synchronisation for a tensor)."""
    return bool(x.all()) if isinstance(x, Tensor) else bool(x)


def some(x) -> bool:
    return bool(x.any()) if isinstance(x, Tensor) else bool(x)
