"""Time-aware layers: ``layer(t, x)`` where ``t`` is a scalar time (a 0-d tensor or float).

* ``ConcatLinear`` / ``ConcatConv2d``: append ``t`` to the input as one extra feature /
  one extra constant channel (Chen et al. 2018, torchdiffeq's MNIST example).
* ``ConcatSquashLinear`` / ``ConcatSquashConv2d``: ``W x`` gated and shifted by functions of
  ``t``: ``(W x + b) * sigmoid(G t + g) + H t`` (FFJORD, Grathwohl et al. 2019).
* ``TimeSequential``: a chain of layers where time-aware ones receive ``t`` and ordinary
  ``nn.Module`` s (activations, norms) receive only ``x``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConcatConv2d", "ConcatLinear", "ConcatSquashConv2d", "ConcatSquashLinear", "TimeLayer",
           "TimeSequential", "mlp"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _time_like(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a 0-d tensor with ``x``'s dtype and device, or as a (N,) tensor when it
    holds one time per sample of ``x`` (N = x.shape[0]: ``per_sample=True`` solves)."""
    if isinstance(t, torch.Tensor):
        if t.numel() == 1:
            return t.reshape(()).to(dtype=x.dtype, device=x.device)
        if t.dim() == 1 and x.dim() >= 1 and t.shape[0] == x.shape[0]:
            return t.to(dtype=x.dtype, device=x.device)
        raise ValueError(f"time-aware layers take a scalar time t or one time per sample "
                         f"(shape ({x.shape[0] if x.dim() else 1},)), got a tensor of shape "
                         f"{tuple(t.shape)}")
    return torch.tensor(float(t), dtype=x.dtype, device=x.device)


def _per_row(tt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0-d or (N,) time reshaped to broadcast against ``x`` along its first dimension."""
    return tt.reshape(-1, *([1] * (x.dim() - 1))) if tt.dim() else tt


class TimeLayer(nn.Module):
    """Marker base class of layers whose forward is ``forward(t, x)``."""


class _Sized(TimeLayer):
    """A time-aware layer from ``dim_in`` to ``dim_out`` features (or channels)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.dim_in = _positive_int("dim_in", dim_in)
        self.dim_out = _positive_int("dim_out", dim_out)

    def extra_repr(self) -> str:
        return f"dim_in={self.dim_in}, dim_out={self.dim_out}"


class ConcatLinear(_Sized):
    """``Linear(dim_in + 1, dim_out)`` applied to ``[t, x]``.

    ``x``: ``(..., dim_in)`` -> ``(..., dim_out)``.
    """

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__(dim_in, dim_out)
        self.linear = nn.Linear(self.dim_in + 1, self.dim_out, bias=bias)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        tt = _per_row(_time_like(t, x), x).expand(*x.shape[:-1], 1)
        return self.linear(torch.cat([tt, x], dim=-1))


class ConcatConv2d(_Sized):
    """``Conv2d(dim_in + 1, dim_out, ...)`` applied to ``x`` with a constant channel ``t``
    prepended. ``x``: ``(N, dim_in, H, W)``. ``transpose=True`` uses ``ConvTranspose2d``."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True,
                 transpose: bool = False):
        super().__init__(dim_in, dim_out)
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.conv = conv(self.dim_in + 1, self.dim_out, kernel_size=kernel_size, stride=stride,
                         padding=padding, dilation=dilation, groups=groups, bias=bias)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim_in:
            raise ValueError(f"{type(self).__name__} expects x of shape (N, {self.dim_in}, H, W),"
                             f" got {tuple(x.shape)}")
        tt = _per_row(_time_like(t, x), x).expand(x.shape[0], 1, x.shape[2], x.shape[3])
        return self.conv(torch.cat([tt, x], dim=1))


class ConcatSquashLinear(_Sized):
    """``Linear(dim_in, dim_out)(x) * sigmoid(gate(t)) + shift(t)`` (FFJORD's
    ConcatSquashLinear). ``x``: ``(..., dim_in)`` -> ``(..., dim_out)``."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__(dim_in, dim_out)
        self.linear = nn.Linear(self.dim_in, self.dim_out)
        self.gate = nn.Linear(1, self.dim_out)
        self.shift = nn.Linear(1, self.dim_out, bias=False)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        tt = _time_like(t, x).reshape(-1, 1)
        shape = (self.dim_out,) if tt.shape[0] == 1 else \
            (tt.shape[0], *([1] * (x.dim() - 2)), self.dim_out)
        gate = torch.sigmoid(self.gate(tt)).reshape(shape)
        return self.linear(x) * gate + self.shift(tt).reshape(shape)


class ConcatSquashConv2d(_Sized):
    """``Conv2d(dim_in, dim_out, ...)(x) * sigmoid(gate(t)) + shift(t)``, the gate and shift
    being one value per output channel. ``x``: ``(N, dim_in, H, W)``."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, transpose: bool = False):
        super().__init__(dim_in, dim_out)
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.conv = conv(self.dim_in, self.dim_out, kernel_size=kernel_size, stride=stride,
                         padding=padding, dilation=dilation, groups=groups)
        self.gate = nn.Linear(1, self.dim_out)
        self.shift = nn.Linear(1, self.dim_out, bias=False)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        tt = _time_like(t, x).reshape(-1, 1)
        gate = torch.sigmoid(self.gate(tt)).reshape(-1, self.dim_out, 1, 1)
        return self.conv(x) * gate + self.shift(tt).reshape(-1, self.dim_out, 1, 1)


def mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    """Linear layers of the widths ``sizes`` (input first, output last), ``act()`` between
    consecutive ones."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class TimeSequential(nn.Sequential):
    """``nn.Sequential`` whose forward is ``forward(t, x)``: each :class:`TimeLayer` is called
    as ``layer(t, x)``, every other module as ``module(x)``."""

    def forward(self, t, x):  # type: ignore[override]
        for module in self:
            x = module(t, x) if isinstance(module, TimeLayer) else module(x)
        return x
