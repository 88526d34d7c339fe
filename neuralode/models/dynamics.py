"""Vector fields for learning dynamics from trajectories (Chen et al. 2018, section 5).

Two *true* fields generate data, and two *learnable* fields fit it:

* :class:`LinearField` — ``dz/dt = A z``; the default ``A = [[-0.1, -1], [1, -0.1]]`` is a
  decaying counter-clockwise spiral (the ``"spiral"`` field).
* :class:`TwoRegimeField` — ``dz/dt = σ(zᵀx0)·A(z − x0) + σ(−zᵀx0)·B(z + x0)``: a smooth
  switch between a linear regime centred at ``x0`` and one centred at ``−x0`` (the
  ``"two-regime"`` field).
* :class:`LinearODEFunc` — learnable ``dz/dt = W z (+ b)``.
* :class:`MLPODEFunc` — learnable ``dz/dt = MLP(z)``.

All fields are ``nn.Module``\\s with ``forward(t, z)`` acting on ``(..., dim)`` states, so they
can be passed to :func:`neuralode.odeint` and :func:`neuralode.odeint_adjoint` directly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from neuralode.nn.layers import mlp

__all__ = ["FIELD_MODELS", "TRUE_FIELDS", "LinearField", "LinearODEFunc", "MLPODEFunc",
           "TwoRegimeField", "box_grid", "make_field_model", "make_true_field",
           "vector_field_error"]

SPIRAL_A = ((-0.1, -1.0), (1.0, -0.1))
TWO_REGIME_A = ((-0.1, -1.0), (1.0, -0.1))
TWO_REGIME_B = ((-0.15, -0.7), (0.7, -0.15))
TWO_REGIME_X0 = (2.0, 0.0)


def _matrix(value, name: str, dim: int | None = None) -> Tensor:
    m = torch.as_tensor(value, dtype=torch.get_default_dtype())
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(m.shape)}")
    if dim is not None and m.shape[0] != dim:
        raise ValueError(f"{name} must be {dim}x{dim}, got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} contains non-finite entries: {m.tolist()}")
    return m


class LinearField(nn.Module):
    """The true linear field ``dz/dt = A z`` (``A`` a fixed buffer)."""

    def __init__(self, A=SPIRAL_A) -> None:
        super().__init__()
        self.register_buffer("A", _matrix(A, "A"))

    @property
    def dim(self) -> int:
        return int(self.A.shape[0])

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return z @ self.A.T


class TwoRegimeField(nn.Module):
    """The true field ``dz/dt = σ(zᵀx0)·A(z − x0) + σ(−zᵀx0)·B(z + x0)``.

    Where ``zᵀx0 ≫ 0`` the flow is the linear spiral ``A`` around ``x0``; where ``zᵀx0 ≪ 0`` it
    is ``B`` around ``−x0``; the logistic ``σ`` blends the two across the hyperplane
    ``zᵀx0 = 0``. Defaults: ``A`` = the spiral matrix, ``B`` a slower, more damped spiral,
    ``x0 = (2, 0)``.
    """

    def __init__(self, A=TWO_REGIME_A, B=TWO_REGIME_B, x0=TWO_REGIME_X0) -> None:
        super().__init__()
        a = _matrix(A, "A")
        self.register_buffer("A", a)
        self.register_buffer("B", _matrix(B, "B", a.shape[0]))
        x = torch.as_tensor(x0, dtype=a.dtype)
        if x.shape != (a.shape[0],):
            raise ValueError(f"x0 must have shape ({a.shape[0]},), got {tuple(x.shape)}")
        self.register_buffer("x0", x)

    @property
    def dim(self) -> int:
        return int(self.A.shape[0])

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        gate = torch.sigmoid(z @ self.x0)[..., None]
        return gate * ((z - self.x0) @ self.A.T) + (1 - gate) * ((z + self.x0) @ self.B.T)


class LinearODEFunc(nn.Module):
    """Learnable linear field ``dz/dt = W z (+ b)``; ``W`` starts at zero."""

    def __init__(self, dim: int = 2, bias: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=bias)
        nn.init.zeros_(self.linear.weight)
        if bias:
            nn.init.zeros_(self.linear.bias)

    @property
    def matrix(self) -> Tensor:
        """The learned ``W`` (dim, dim)."""
        return self.linear.weight

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.linear(z)


class MLPODEFunc(nn.Module):
    """Learnable field ``dz/dt = MLP(z)`` with ``depth`` hidden tanh layers of ``hidden`` units.

    The last layer is scaled down at initialisation so the initial field is small and the
    first solves are cheap and stable.
    """

    def __init__(self, dim: int = 2, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden and depth must be >= 1, got {dim}, {hidden}, {depth}")
        self.net = mlp([dim, *[hidden] * depth, dim], nn.Tanh)
        with torch.no_grad():
            self.net[-1].weight.mul_(0.1)
            self.net[-1].bias.zero_()

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z)


TRUE_FIELDS = {"spiral": LinearField, "two-regime": TwoRegimeField}
FIELD_MODELS = {"linear": LinearODEFunc, "mlp": MLPODEFunc}


def make_true_field(name: str) -> nn.Module:
    """The data-generating field ``"spiral"`` or ``"two-regime"`` with its default parameters."""
    if name not in TRUE_FIELDS:
        raise ValueError(f"unknown field {name!r}; valid fields are: {', '.join(TRUE_FIELDS)}")
    return TRUE_FIELDS[name]()


def make_field_model(name: str, dim: int = 2, hidden: int = 64, depth: int = 2) -> nn.Module:
    """A learnable field: ``"linear"`` (``dz/dt = W z``) or ``"mlp"``."""
    if name not in FIELD_MODELS:
        raise ValueError(f"unknown model {name!r}; valid models are: {', '.join(FIELD_MODELS)}")
    if name == "linear":
        return LinearODEFunc(dim)
    return MLPODEFunc(dim, hidden=hidden, depth=depth)


def box_grid(low: Tensor, high: Tensor, n: int) -> Tensor:
    """The ``n x n`` grid over the box with corners ``low`` and ``high`` (``(2,)``), as
    ``(n * n, 2)`` points (x varying fastest)."""
    xs = torch.linspace(float(low[0]), float(high[0]), n)
    ys = torch.linspace(float(low[1]), float(high[1]), n)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)


@torch.no_grad()
def vector_field_error(learned: nn.Module, true: nn.Module, low: Tensor, high: Tensor,
                       n: int = 25, near: Tensor | None = None,
                       radius: float = 0.25) -> dict[str, float]:
    """Error of a learned 2-D field against the true one on an ``n x n`` grid over a box.

    Args:
        learned, true: fields ``f(t, z)`` on ``(..., 2)`` states.
        low, high: ``(2,)`` corners of the box.
        n: grid points per axis.
        near: optional ``(M, 2)`` points (e.g. the trajectory); then the same two errors are
            also computed over the grid points within ``radius`` of one of them
            (``near_rmse``, ``near_rel_rmse``; nan if there are none), i.e. where data
            constrains the field.

    Returns:
        ``{"rmse": RMS of |f_learned - f_true|, "rel_rmse": rmse / RMS of |f_true|}``
        (plus the ``near_`` pair when ``near`` is given).
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    low = torch.as_tensor(low, dtype=torch.float32)
    high = torch.as_tensor(high, dtype=torch.float32)
    if low.shape != (2,) or high.shape != (2,) or not bool((high > low).all()):
        raise ValueError(f"low and high must be (2,) with high > low, got {low.tolist()} and "
                         f"{high.tolist()}")
    grid = box_grid(low, high, n)
    t = torch.zeros(())
    param = next(iter(learned.parameters()), None)
    dev = param.device if param is not None else grid.device
    f_l = learned(t.to(dev), grid.to(dev)).cpu().float()
    f_t = true(t, grid).float()
    sq_err, sq_true = ((f_l - f_t) ** 2).sum(-1), (f_t ** 2).sum(-1)

    def errors(sel: Tensor) -> tuple[float, float]:
        if not bool(sel.any()):
            return math.nan, math.nan
        rmse = float(sq_err[sel].mean().sqrt())
        scale = float(sq_true[sel].mean().sqrt())
        return rmse, (rmse / scale if scale > 0 else math.inf)

    rmse, rel = errors(torch.ones_like(sq_err, dtype=torch.bool))
    out = {"rmse": rmse, "rel_rmse": rel}
    if near is not None:
        near = torch.as_tensor(near, dtype=torch.float32).reshape(-1, 2).cpu()
        close = torch.cdist(grid, near).min(dim=1).values <= radius
        out["near_rmse"], out["near_rel_rmse"] = errors(close)
    return out
