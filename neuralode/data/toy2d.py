"""Two-dimensional toy densities for continuous normalizing flows.

Two families live here:

* **Sample-based toy datasets** (FFJORD-style), drawn with :func:`sample_toy2d`.
  Every dataset is scaled so that almost all points fall inside ``[-4, 4]^2``.
  Where the density is known in closed form, :func:`toy2d_log_density` evaluates
  it exactly so experiments can report the true negative log-likelihood.
* **Unnormalized target energies** ``U(z)`` with ``p(z) ∝ exp(-U(z))`` from
  Rezende & Mohamed (2015), Table 1, used by the "density matching" experiment
  of the Neural ODE paper; see :func:`potential_energy`.

All randomness comes from ``torch`` (an optional ``torch.Generator``); nothing
touches numpy's global RNG. Samples are produced in float64 on the CPU and then
cast to the requested dtype, so a given generator state yields the same points
(up to rounding) for every floating dtype.

Dataset definitions (before the final cast):

========== ==================================================================
name       definition
========== ==================================================================
moons      two interleaved half circles of radius 1 (each point picks a moon
           with probability 1/2), isotropic noise std 0.1, then ``2 x + (-1,
           -0.2)``: arcs of radius 2 centred at ``(-1, -0.2)`` (upper half) and
           ``(1, 0.8)`` (lower half), noise std 0.2.
circles    two concentric rings of radius 1 and 0.5 (probability 1/2 each),
           noise std 0.08, then scaled by 3: radii 3 and 1.5, noise std 0.24.
rings      four concentric rings of radius 3, 2.25, 1.5, 0.75 (probability 1/4
           each), isotropic noise std 0.08.
8gaussians equal mixture of 8 isotropic Gaussians with std ``0.5 / sqrt(2)``
           centred at ``(4 / sqrt(2)) * (cos(k pi / 4), sin(k pi / 4))``.
pinwheel   5 curved arms: radial std 0.3, tangential std 0.1, rate 0.25,
           scaled by 2.
checker-   uniform on the 8 "black" 2x2 squares of a 4x4 board covering
board      ``[-4, 4)^2``; a square ``[2i, 2i+2) x [2j, 2j+2)`` is occupied
           iff ``i + j`` is even. Density ``1/32`` there, 0 elsewhere.
2spirals   two point-reflected arms ``theta * (-cos theta, sin theta)`` with
           ``theta = 3 pi sqrt(u)``, uniform jitter ``U(0, 0.5)`` per
           coordinate, scaled by 1/3, plus isotropic noise std 0.1.
========== ==================================================================
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["POTENTIALS", "TOY_DATASETS", "potential_energy", "sample_toy2d", "toy2d_log_density"]

TOY_DATASETS: tuple[str, ...] = ("moons", "circles", "rings", "8gaussians", "pinwheel",
                                 "checkerboard", "2spirals")
"""Names accepted by :func:`sample_toy2d`."""

POTENTIALS: tuple[str, ...] = ("u1", "u2", "u3", "u4")
"""Names accepted by :func:`potential_energy`."""

_LOG_DENSITY_NAMES: tuple[str, ...] = ("8gaussians", "checkerboard")

# 8gaussians parameters.
_EIGHT_RADIUS = 4.0 / math.sqrt(2.0)
_EIGHT_STD = 0.5 / math.sqrt(2.0)

_F64 = torch.float64


# ----------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------


def _check_name(name: object, valid: tuple[str, ...], what: str) -> str:
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"unknown {what} {name!r}; valid names are: {', '.join(valid)}")
    return name


def _check_positive_int(n: object, what: str = "n") -> int:
    if isinstance(n, bool):
        raise TypeError(f"{what} must be a positive int, got bool {n!r}")
    try:
        value = operator.index(n)  # accepts int and numpy/torch integer scalars
    except TypeError:
        raise TypeError(f"{what} must be a positive int, got {type(n).__name__} {n!r}") from None
    if value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value}")
    return value


def _check_points(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape (..., 2), got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != 2:
        raise ValueError(f"{what} must have shape (..., 2), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
    return x


# ----------------------------------------------------------------------------
# random primitives (float64, CPU)
# ----------------------------------------------------------------------------


def _rand(g: torch.Generator | None, *shape: int) -> Tensor:
    return torch.rand(*shape, generator=g, dtype=_F64)


def _randn(g: torch.Generator | None, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=_F64)


def _coin(g: torch.Generator | None, n: int) -> Tensor:
    """(n,) bool, each True with probability 1/2."""
    return torch.randint(0, 2, (n,), generator=g) == 1


def _polar(radius: Tensor, angle: Tensor) -> Tensor:
    return torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)


# ----------------------------------------------------------------------------
# samplers: each returns (n, 2) float64
# ----------------------------------------------------------------------------


def _moons(n: int, g: torch.Generator | None) -> Tensor:
    theta = math.pi * _rand(g, n)
    upper = torch.stack((torch.cos(theta), torch.sin(theta)), dim=-1)
    lower = torch.stack((1.0 - torch.cos(theta), 0.5 - torch.sin(theta)), dim=-1)
    x = torch.where(_coin(g, n)[:, None], upper, lower)
    x = x + 0.1 * _randn(g, n, 2)
    return 2.0 * x + torch.tensor([-1.0, -0.2], dtype=_F64)


def _circles(n: int, g: torch.Generator | None) -> Tensor:
    radius = torch.where(_coin(g, n), 1.0, 0.5).to(_F64)
    x = _polar(radius, 2.0 * math.pi * _rand(g, n))
    x = x + 0.08 * _randn(g, n, 2)
    return 3.0 * x


def _rings(n: int, g: torch.Generator | None) -> Tensor:
    radii = torch.tensor([3.0, 2.25, 1.5, 0.75], dtype=_F64)
    ring = torch.randint(0, 4, (n,), generator=g)
    x = _polar(radii[ring], 2.0 * math.pi * _rand(g, n))
    return x + 0.08 * _randn(g, n, 2)


def _eight_centres(dtype: torch.dtype = _F64, device: torch.device | None = None) -> Tensor:
    angles = torch.arange(8, dtype=_F64) * (math.pi / 4.0)
    return _polar(torch.full_like(angles, _EIGHT_RADIUS), angles).to(dtype=dtype, device=device)


def _eight_gaussians(n: int, g: torch.Generator | None) -> Tensor:
    component = torch.randint(0, 8, (n,), generator=g)
    return _eight_centres()[component] + _EIGHT_STD * _randn(g, n, 2)


def _pinwheel(n: int, g: torch.Generator | None) -> Tensor:
    n_arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    arm = torch.randint(0, n_arms, (n,), generator=g).to(_F64)
    feats = _randn(g, n, 2) * torch.tensor([radial_std, tangential_std], dtype=_F64)
    feats[:, 0] += 1.0
    # Rotate each point by its arm's base angle plus a twist growing with radius.
    angle = arm * (2.0 * math.pi / n_arms) + rate * torch.exp(feats[:, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    x = torch.stack((c * feats[:, 0] - s * feats[:, 1], s * feats[:, 0] + c * feats[:, 1]), -1)
    return 2.0 * x


def _checkerboard(n: int, g: torch.Generator | None) -> Tensor:
    # Column index i in {-2,..,1}, row index j chosen so that i + j is even.
    col = torch.randint(-2, 2, (n,), generator=g)
    row = torch.remainder(col, 2) - 2 * torch.randint(0, 2, (n,), generator=g)
    corner = torch.stack((col, row), dim=-1).to(_F64)
    return 2.0 * (corner + _rand(g, n, 2))


def _two_spirals(n: int, g: torch.Generator | None) -> Tensor:
    theta = 3.0 * math.pi * torch.sqrt(_rand(g, n))
    arm = torch.stack((-theta * torch.cos(theta), theta * torch.sin(theta)), dim=-1)
    arm = arm + 0.5 * _rand(g, n, 2)
    sign = torch.where(_coin(g, n), 1.0, -1.0).to(_F64)
    return sign[:, None] * arm / 3.0 + 0.1 * _randn(g, n, 2)


_SAMPLERS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "moons": _moons, "circles": _circles, "rings": _rings, "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel, "checkerboard": _checkerboard, "2spirals": _two_spirals}


def sample_toy2d(name: str, n: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Draw ``n`` i.i.d. points from the 2-D toy dataset ``name``.

    Args:
        name: one of :data:`TOY_DATASETS`.
        n: number of points (positive int).
        generator: CPU ``torch.Generator`` for reproducibility; ``None`` uses
            torch's global RNG.
        dtype: floating dtype of the result.

    Returns:
        Tensor of shape ``(n, 2)`` on the CPU.
    """
    _check_name(name, TOY_DATASETS, "toy dataset")
    n = _check_positive_int(n, "n")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return _SAMPLERS[name](n, generator).to(dtype)


# ----------------------------------------------------------------------------
# exact log densities
# ----------------------------------------------------------------------------


def _eight_gaussians_log_density(x: Tensor) -> Tensor:
    centres = _eight_centres(dtype=x.dtype, device=x.device)
    sq = ((x[..., None, :] - centres) ** 2).sum(-1)  # (..., 8)
    log_norm = -math.log(2.0 * math.pi * _EIGHT_STD**2)
    return torch.logsumexp(-0.5 * sq / _EIGHT_STD**2, dim=-1) + log_norm - math.log(8.0)


def _checkerboard_log_density(x: Tensor) -> Tensor:
    inside = ((x >= -4.0) & (x < 4.0)).all(dim=-1)
    cell = torch.floor(x / 2.0)
    occupied = torch.remainder(cell.sum(dim=-1), 2.0) == 0
    log_p = torch.full(x.shape[:-1], -math.log(32.0), dtype=x.dtype, device=x.device)
    return torch.where(inside & occupied, log_p, torch.full_like(log_p, -math.inf))


def toy2d_log_density(name: str, x: Tensor) -> Tensor:
    """Exact log density ``log p(x)`` of a toy dataset, where it is tractable.

    Supported: ``"8gaussians"`` (Gaussian mixture) and ``"checkerboard"``
    (uniform on the occupied squares; ``-inf`` outside them). Other valid names
    raise ``NotImplementedError``; unknown names raise ``ValueError``.

    Args:
        name: dataset name.
        x: points, shape ``(..., 2)``, floating dtype.

    Returns:
        Tensor of shape ``(...)`` with the dtype and device of ``x``.
    """
    _check_name(name, TOY_DATASETS, "toy dataset")
    if name not in _LOG_DENSITY_NAMES:
        raise NotImplementedError(f"no closed-form log density for toy dataset {name!r}; "
                                  f"available for: {', '.join(_LOG_DENSITY_NAMES)}")
    x = _check_points(x, "x")
    if name == "8gaussians":
        return _eight_gaussians_log_density(x)
    return _checkerboard_log_density(x)


# ----------------------------------------------------------------------------
# Rezende & Mohamed (2015) potentials
# ----------------------------------------------------------------------------


def _w1(z1: Tensor) -> Tensor:
    return torch.sin(2.0 * math.pi * z1 / 4.0)


def _w2(z1: Tensor) -> Tensor:
    return 3.0 * torch.exp(-0.5 * ((z1 - 1.0) / 0.6) ** 2)


def _w3(z1: Tensor) -> Tensor:
    return 3.0 * torch.sigmoid((z1 - 1.0) / 0.3)


def _neg_log_sum_exp2(a: Tensor, b: Tensor) -> Tensor:
    """``-log(exp(a) + exp(b))``, computed stably."""
    return -torch.logaddexp(a, b)


def _u1(z1: Tensor, z2: Tensor) -> Tensor:
    norm = torch.sqrt(z1**2 + z2**2)
    ring = 0.5 * ((norm - 2.0) / 0.4) ** 2
    return ring + _neg_log_sum_exp2(-0.5 * ((z1 - 2.0) / 0.6) ** 2, -0.5 * ((z1 + 2.0) / 0.6) ** 2)


def _u2(z1: Tensor, z2: Tensor) -> Tensor:
    return 0.5 * ((z2 - _w1(z1)) / 0.4) ** 2


def _u3(z1: Tensor, z2: Tensor) -> Tensor:
    d = z2 - _w1(z1)
    return _neg_log_sum_exp2(-0.5 * (d / 0.35) ** 2, -0.5 * ((d + _w2(z1)) / 0.35) ** 2)


def _u4(z1: Tensor, z2: Tensor) -> Tensor:
    d = z2 - _w1(z1)
    return _neg_log_sum_exp2(-0.5 * (d / 0.4) ** 2, -0.5 * ((d + _w3(z1)) / 0.35) ** 2)


_POTENTIAL_FNS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "u1": _u1, "u2": _u2, "u3": _u3, "u4": _u4}


def potential_energy(name: str, z: Tensor) -> Tensor:
    """Unnormalized energy ``U(z)`` of Rezende & Mohamed (2015), ``p(z) ∝ exp(-U(z))``.

    With ``w1(z) = sin(2 pi z1 / 4)``, ``w2(z) = 3 exp(-((z1 - 1) / 0.6)^2 / 2)``
    and ``w3(z) = 3 sigmoid((z1 - 1) / 0.3)``:

    * ``u1``: ``((|z| - 2) / 0.4)^2 / 2 - log(exp(-((z1-2)/0.6)^2/2) + exp(-((z1+2)/0.6)^2/2))``
    * ``u2``: ``((z2 - w1) / 0.4)^2 / 2``
    * ``u3``: ``-log(exp(-((z2-w1)/0.35)^2/2) + exp(-((z2-w1+w2)/0.35)^2/2))``
    * ``u4``: ``-log(exp(-((z2-w1)/0.4)^2/2) + exp(-((z2-w1+w3)/0.35)^2/2))``

    ``u2``..``u4`` are not normalizable on the whole plane (they do not decay
    along ``z1``); as in the paper, use them on a bounded box such as ``[-4, 4]^2``.
    The log-sum-exp terms are evaluated stably; the result is differentiable.

    Args:
        name: one of :data:`POTENTIALS`.
        z: points, shape ``(..., 2)``, floating dtype.

    Returns:
        Tensor of shape ``(...)``.
    """
    _check_name(name, POTENTIALS, "potential")
    z = _check_points(z, "z")
    return _POTENTIAL_FNS[name](z[..., 0], z[..., 1])
