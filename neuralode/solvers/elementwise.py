"""Elementwise operations on a clock value: a Python float (one problem, the float-clock
driver) or a (B,) tensor (a per-sample batch, the tensor-clock driver).

Every formula of step-size control (the error ratio's use, the step factor, the first
step, the stretch onto a stop, event location) is written once with these operations, so
the two drivers run the same arithmetic: with floats it costs a few Python operations, with
tensors it is a handful of elementwise kernels and no host synchronisation.

Floats follow the tensor semantics where they differ: ``where`` picks without raising,
comparisons with nan are False, and no formula here divides by a value that may be zero.
A clock value is told apart by the Python number types (``NUMBER``): ``isinstance(x,
torch.Tensor)`` goes through torch's metaclass and costs more than the arithmetic.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor
NUMBER = (float, int, bool)


def where(cond, a, b):
    """``a`` where ``cond`` holds, else ``b``."""
    if isinstance(cond, NUMBER):
        return a if cond else b
    return torch.where(cond, a, b)


def axpy(x: Tensor, y: Tensor, alpha) -> Tensor:
    """x + alpha * y: ``torch.add(x, y, alpha=alpha)`` (one kernel), and where it is traced
    by torch.compile a product and a sum: torch 2.13's inductor drops ``alpha`` when an
    operand is a matrix product (``torch.add(x, a @ b, alpha=c)`` compiles to x + a @ b:
    a stage of an f that ends in a product without bias, in a compiled step)."""
    if torch.compiler.is_compiling():
        return x + y * alpha
    return torch.add(x, y, alpha=alpha)


def minimum(a, b):
    if isinstance(a, NUMBER):
        if isinstance(b, NUMBER):
            return a if (a < b or a != a) else b  # nan propagates, as in torch.minimum
        return b.clamp(max=a)
    return a.clamp(max=b) if isinstance(b, NUMBER) else torch.minimum(a, b)


def maximum(a, b):
    if isinstance(a, NUMBER):
        if isinstance(b, NUMBER):
            return a if (a > b or a != a) else b
        return b.clamp(min=a)
    return a.clamp(min=b) if isinstance(b, NUMBER) else torch.maximum(a, b)


def clip(x, lo: float, hi: float):
    """x limited to [lo, hi] (nan stays nan)."""
    if isinstance(x, NUMBER):
        return lo if x < lo else (hi if x > hi else x)
    return x.clamp(min=lo, max=hi)


def isfinite(x):
    return math.isfinite(x) if isinstance(x, NUMBER) else torch.isfinite(x)


def logical_not(x):
    return not x if isinstance(x, NUMBER) else ~x


def ulp(x):
    """The spacing of float64 numbers at |x| (``math.ulp``)."""
    if isinstance(x, NUMBER):
        return math.ulp(x)
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, math.inf)) - x


def column(h, like: Tensor):
    """A per-row value (a float, or (B,) for a (B, ...) state) shaped to multiply ``like``."""
    if isinstance(h, NUMBER):
        return h
    return h.to(like.dtype).reshape(h.shape + (1,) * (like.dim() - h.dim()))


def divisor(x):
    """x where it is not 0, else 1: a per-row step to divide by, where a row that did not move
    (h = 0, a finished sample) gets 0 / 1 rather than nan."""
    return where(x != 0, x, 1.0)


def every(x) -> bool:
    """True when x holds for every row (a host synchronisation for a tensor)."""
    return bool(x) if isinstance(x, NUMBER) else bool(x.all())


def some(x) -> bool:
    return bool(x) if isinstance(x, NUMBER) else bool(x.any())
