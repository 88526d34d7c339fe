"""Time on devices without float64 (Apple's MPS; torchdiffeq issue 257).

One switch, ``time_dtype(device)``, says in which dtype time may live *on a device*:
float64 where the device has it (CPU, CUDA), float32 otherwise (``mps``). Tests and users
force the float32 path on any device with ``force_time_dtype(torch.float32)`` (a context
manager) or by setting ``FORCED_TIME_DTYPE``; ``None`` restores the automatic choice.

The one-problem driver keeps its clock in host Python floats (float64 on the host, whatever
the device), so its time is as exact on MPS as on CUDA; what the switch changes there is
only the device tensors derived from time (the interpolant's weights), which are made in
the switch's dtype so that no float64 tensor is ever created on a device without float64.

A fixed grid's times are counted, t_k = t0 + k h with k an integer (two roundings however
large k is: ``controllers.PerSampleGrid``), never accumulated step by step (t += h drifts
by about an ulp of t per step in float32).
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
