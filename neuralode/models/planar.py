"""Planar normalizing flows (Rezende & Mohamed 2015), the discrete baseline for CNFs.

One planar layer is

    f(z) = z + u_hat * tanh(w . z + b),     log |det df/dz| = log(1 + tanh'(w . z + b) w . u_hat),

where ``u_hat = u + (m(w . u) - w . u) w / |w|^2`` with ``m(s) = -1 + softplus(s)`` enforces
``w . u_hat > -1`` and hence invertibility (Rezende & Mohamed 2015, appendix A.1). A flow of
K layers has capacity growing only with depth K, which the Neural ODE paper contrasts with the
width M of a CNF.

The inverse has no closed form; along w it reduces to the scalar equation
``w . y = s + (w . u_hat) tanh(s + b)`` for ``s = w . z``, which is monotone and is solved by
bisection. :class:`PlanarFlow` can therefore be used in either direction:

* ``mode="generative"`` (density matching): ``x = f_K(...f_1(z))`` for ``z ~ N(0, I)``;
  sampling and the density of samples are exact and differentiable, ``log_prob`` of given
  points needs the (non-differentiable) numerical inverse.
* ``mode="normalizing"`` (maximum likelihood): ``z = f_K(...f_1(x))`` maps data to the base;
  ``log_prob`` is exact and differentiable, sampling uses the numerical inverse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuralode.models.cnf import (
    _check_choice,
    _check_points,
    _check_positive_int,
    grid_log_prob,
    standard_normal_log_prob,
)

__all__ = ["PLANAR_MODES", "PlanarFlow", "PlanarLayer"]

PLANAR_MODES: tuple[str, ...] = ("generative", "normalizing")


class PlanarLayer(nn.Module):
    """One invertible planar map on R^D with parameters u, w (D,) and b (scalar)."""

    def __init__(self, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.dim = _check_positive_int(dim, "dim")
        bound = 1.0 / math.sqrt(dim)
        self.u = nn.Parameter((torch.rand(dim, generator=generator) * 2 - 1) * bound)
        self.w = nn.Parameter((torch.rand(dim, generator=generator) * 2 - 1) * bound)
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> Tensor:
        """u projected so that w . u_hat = -1 + softplus(w . u) > -1."""
        wu = self.w @ self.u
        return self.u + (F.softplus(wu) - 1.0 - wu) * self.w / (self.w @ self.w + 1e-12)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z (N, D) -> (f(z) (N, D), log|det df/dz| (N,))``."""
        u = self.u_hat()
        pre = z @ self.w + self.b
        h = torch.tanh(pre)
        y = z + h[:, None] * u
        # 1 + h'(pre) w.u_hat > 0 because h' in (0, 1] and w.u_hat > -1.
        logdet = torch.log1p((1.0 - h * h) * (self.w @ u))
        return y, logdet

    @torch.no_grad()
    def inverse(self, y: Tensor, iters: int = 80) -> Tensor:
        """Solve f(z) = y for z by bisection on s = w . z (float64 internally)."""
        dtype = y.dtype
        y64 = y.double()
        w, u, b = self.w.double(), self.u_hat().double(), float(self.b)
        c = float(w @ u)
        wy = y64 @ w
        lo, hi = wy - abs(c) - 1e-9, wy + abs(c) + 1e-9
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = mid + c * torch.tanh(mid + b) > wy
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        s = 0.5 * (lo + hi)
        return (y64 - torch.tanh(s + b)[:, None] * u).to(dtype)


class PlanarFlow(nn.Module):
    """A stack of K planar layers with a standard normal base (see the module docstring).

    Args:
        dim: dimension D.
        num_layers: K.
        mode: ``"generative"`` (layers map base -> data) or ``"normalizing"`` (data -> base).
        generator: optional CPU generator for the initial parameters.
    """

    def __init__(self, dim: int = 2, num_layers: int = 32, mode: str = "generative",
                 generator: torch.Generator | None = None):
        super().__init__()
        self.dim = _check_positive_int(dim, "dim")
        self.num_layers = _check_positive_int(num_layers, "num_layers")
        self.mode = _check_choice(mode, PLANAR_MODES, "planar flow mode")
        self.layers = nn.ModuleList(PlanarLayer(dim, generator) for _ in range(num_layers))

    def transform(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the layers in order: ``(N, D) -> ((N, D), sum of log|det| (N,))``."""
        total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for layer in self.layers:
            z, logdet = layer(z)
            total = total + logdet
        return z, total

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        """Undo :meth:`transform` numerically (no gradient)."""
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y

    def log_prob(self, x: Tensor) -> Tensor:
        """log-density ``(N,)`` of ``x (N, D)``; differentiable in ``normalizing`` mode."""
        x = _check_points(x, self.dim)
        if self.mode == "normalizing":
            z, logdet = self.transform(x)
            return standard_normal_log_prob(z) + logdet
        z0 = self.inverse(x)
        _, logdet = self.transform(z0)
        return standard_normal_log_prob(z0) - logdet

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None, return_log_prob: bool = False):
        """``n`` samples ``(n, D)``; differentiable (with their log-density) in generative mode."""
        n = _check_positive_int(n, "n")
        ref = self.layers[0].w
        z0 = torch.randn(n, self.dim, generator=generator, dtype=dtype or ref.dtype,
                         device=ref.device)
        if self.mode == "generative":
            x, logdet = self.transform(z0)
            log_q = standard_normal_log_prob(z0) - logdet
        else:
            x = self.inverse(z0)
            log_q = self.log_prob(x)
        return (x, log_q) if return_log_prob else x

    @torch.no_grad()
    def log_prob_grid(self, lim: float = 4.0, n: int = 100, *, batch_size: int = 16384,
                      dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """log-density on an ``n x n`` grid over ``[-lim, lim]^2``; see ``CNF.log_prob_grid``."""
        if self.dim != 2:
            raise ValueError(f"log_prob_grid is for 2-D flows, this one has dim={self.dim}")
        ref = self.layers[0].w
        return grid_log_prob(self.log_prob, lim, n, batch_size, dtype or ref.dtype, ref.device)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_layers={self.num_layers}, mode={self.mode!r}"
