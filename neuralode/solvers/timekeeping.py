"""Time on devices without float64 (Apple's MPS; torchdiffeq issue 257).

One switch, ``time_dtype(device)``, says in which dtype time may live *on a device*:
float64 where the device has it (CPU, CUDA), float32 otherwise (``mps``). Tests and users
force the float32 path on any device with ``force_time_dtype(torch.float32)`` (a context
manager) or by setting ``FORCED_TIME_DTYPE``; ``None`` restores the automatic choice.

The one-problem driver keeps its clock in host Python floats (float64 on the host, whatever
the device), so its time is as exact on MPS as on CUDA; what the switch changes there is
only the device tensors derived from time (the interpolant's weights), which are made in
the switch's dtype so that no float64 tensor is ever created on a device without float64.

A float32 time accumulated step by step (t += h) drifts: each addition rounds to half an
ulp of t, so after N steps the error grows like N ulps. Two bounded representations are
given here, written once for Python floats, NumPy scalars and (B,) tensors:

* ``clock_add``: a compensated clock, t = hi + lo with |lo| <= ulp(hi) / 2. Each addition
  of a step h is split exactly (Knuth's TwoSum) into the rounded sum and its rounding error,
  which is carried in ``lo``; the error of the pair after N steps is a few ulps of t
  (``lo``'s own roundings are 2^-24 of an ulp of t each), against N / 2 ulps for naive sums.
* ``grid_time``: integer step counting for fixed grids, t_k = t0 + k h with k an integer:
  two roundings however large k is (``controllers.PerSampleGrid`` already counts so).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

FORCED_TIME_DTYPE: torch.dtype | None = None
"""``None``: float64 where the device has it, float32 otherwise. ``torch.float32``: the
float32-time path everywhere (for testing it on CPU). ``torch.float64``: never float32."""

_DTYPES = (torch.float32, torch.float64)
_NO_FLOAT64 = frozenset({"mps"})


def time_dtype(device) -> torch.dtype:
    """The dtype of time tensors on ``device`` (a torch.device, a string or None for
    the CPU)."""
    forced = FORCED_TIME_DTYPE
    if forced is not None:
        if forced not in _DTYPES:
            raise ValueError(f"neuralode.solvers.timekeeping.FORCED_TIME_DTYPE must be None, "
                             f"torch.float32 or torch.float64, got {forced!r}")
        return forced
    kind = device.type if isinstance(device, torch.device) else str(device or "cpu")
    return torch.float32 if kind.split(":")[0] in _NO_FLOAT64 else torch.float64


@contextlib.contextmanager
def force_time_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, time on every device is ``dtype`` (None: the automatic choice)."""
    global FORCED_TIME_DTYPE
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"force_time_dtype takes None, torch.float32 or torch.float64, "
                         f"got {dtype!r}")
    saved = FORCED_TIME_DTYPE
    FORCED_TIME_DTYPE = dtype
    try:
        yield
    finally:
        FORCED_TIME_DTYPE = saved


def as_time(v) -> torch.Tensor:
    """Times as a tensor: float64, or a floating tensor kept on its device in the best
    dtype the device has (``time_dtype``: float32 on MPS, where it cannot be float64)."""
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.to(torch.promote_types(v.dtype, time_dtype(v.device)))
    return torch.as_tensor(v, dtype=torch.float64)


def two_sum(a, b):
    """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth; any magnitudes, no
    branches): six additions in the arithmetic of ``a`` and ``b``."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def clock_add(hi, lo, h):
    """The compensated clock (hi, lo) advanced by h: returns (hi', lo') with hi' + lo' =
    hi + lo + h up to lo's rounding, and |lo'| <= ulp(hi') / 2 (renormalised)."""
    s, e = two_sum(hi, h)
    e = e + lo
    hi = s + e  # Fast2Sum: |s| >= |e|, since e is below an ulp of s
    return hi, e - (hi - s)


def clock_value(hi, lo, dtype=torch.float64):
    """The clock's time as one value: a Python float (hi + lo in float64) for float clocks,
    or a tensor of ``dtype``."""
    if isinstance(hi, torch.Tensor):
        return hi.to(dtype) + lo.to(dtype)
    return float(hi) + float(lo)


def grid_time(t0, h, k):
    """Grid point k of a fixed grid (integer step counting): t0 + k h, two roundings for
    any k (``k`` an int or an integer tensor)."""
    return t0 + h * k
