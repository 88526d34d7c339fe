"""Irregularly sampled noisy 2-D spirals for latent-ODE experiments.

Follows the spiral experiment of Chen et al. (2018), section 5.1: a set of
2-D Archimedean spirals, half clockwise and half counter-clockwise, each
starting at a different random point, observed with Gaussian noise at a few
irregular (random, sorted) times near the start of the trajectory. A model is
scored on held-out points *inside* the observation window (interpolation) and
*after* it (extrapolation).

Generative model (all spirals share one dense time grid)::

    t      = linspace(0, t_max, n_total)                  # (n_total,)
    theta  = theta0 + t                                   # unwrapped angle, 1 rad per time unit
    r      = radius_growth * theta                        # Archimedean: r linear in theta
    z(t)   = r * (cos(phi + d * theta), sin(phi + d * theta))
    noisy  = z + noise_std * N(0, I)

with per-spiral direction ``d`` (+1 counter-clockwise, -1 clockwise),
``theta0 ~ U(pi/2, 5pi/2)`` (so starting radii differ) and a random rotation
``phi ~ U(0, 2pi)`` (so starting directions differ). Spirals grow outward in
both directions.

Defaults and why:

* ``n_total=500`` dense points and ``t_max=10``: 10 rad ≈ 1.6 turns, so the
  window and the extrapolation range each hold most of a turn (the brief asks
  for 1-2 turns; the reference latent-ODE example also used 500 points).
* ``n_window = n_total // 2``: observations come from ``t <= ~5`` (the first
  0.8 turn); the second half is the extrapolation target.
* ``n_obs=100`` (the largest setting of the paper's table; 30 and 50 also
  work), ``noise_std=0.1`` as in the paper, ``radius_growth=0.3`` so radii lie
  in roughly ``[0.5, 5.4]`` and all points fall inside ``[-6, 6]^2``.

Masks over the dense grid (all ``(N, n_total)`` bool, pairwise disjoint):
``obs_mask`` (exactly ``n_obs`` points per spiral, all among the first
``n_window``), ``interp_mask`` (the other points of the window) and
``extrap_mask`` (every point after the window). Per-spiral irregular times
are ``t[mask[i]]``; :func:`gather_points` and :func:`grid_points` turn masks
into padded batches for encoders.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import Tensor

__all__ = ["GridBatch", "IrregularBatch", "SpiralData", "gather_points", "grid_points",
           "make_spirals", "masked_to_padded", "train_test_split"]

Which = Literal["obs", "interp", "extrap", "window", "all"]
_WHICH = ("obs", "interp", "extrap", "window", "all")
_F64 = torch.float64


@dataclass(frozen=True)
class SpiralData:
    """A spiral dataset on a shared dense time grid.

    Attributes:
        t: ``(n_total,)`` strictly increasing times, ``t[0] = 0``.
        clean: ``(N, n_total, 2)`` noise-free trajectories.
        noisy: ``(N, n_total, 2)`` trajectories plus i.i.d. Gaussian noise.
        direction: ``(N,)`` int64, ``+1`` counter-clockwise, ``-1`` clockwise.
        obs_mask: ``(N, n_total)`` bool, the ``n_obs`` observed points.
        interp_mask: ``(N, n_total)`` bool, unobserved points in the window.
        extrap_mask: ``(N, n_total)`` bool, points after the window.
        n_obs: observed points per spiral.
        n_window: length of the observation window (first ``n_window`` grid points).
        noise_std: standard deviation of the observation noise.
    """

    t: Tensor
    clean: Tensor
    noisy: Tensor
    direction: Tensor
    obs_mask: Tensor
    interp_mask: Tensor
    extrap_mask: Tensor
    n_obs: int
    n_window: int
    noise_std: float

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def n_total(self) -> int:
        """Number of dense grid points."""
        return int(self.t.shape[0])

    @property
    def window_end(self) -> float:
        """Time of the last grid point inside the observation window."""
        return float(self.t[self.n_window - 1])

    @property
    def window_mask(self) -> Tensor:
        """``(N, n_total)`` bool, the whole observation window (obs | interp)."""
        return self.obs_mask | self.interp_mask

    def subset(self, index: Tensor | slice | list[int]) -> SpiralData:
        """Select spirals along the first axis (``t`` and metadata are shared)."""
        per_spiral = ("clean", "noisy", "direction", "obs_mask", "interp_mask", "extrap_mask")
        return replace(self, **{k: getattr(self, k)[index] for k in per_spiral})

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> SpiralData:
        """Move tensors to ``device``; cast the floating tensors (t, clean, noisy) to ``dtype``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
            out[f.name] = v
        return SpiralData(**out)


@dataclass(frozen=True)
class IrregularBatch:
    """Per-sequence irregular points, padded to a common length ``K``.

    Attributes:
        times: ``(B, K)``, ascending within each row; padding repeats the
            row's last valid time, so rows stay non-decreasing.
        values: ``(B, K, D)``; padding is zero.
        mask: ``(B, K)`` bool, ``True`` for real points (always a prefix of the row).
    """

    times: Tensor
    values: Tensor
    mask: Tensor


@dataclass(frozen=True)
class GridBatch:
    """Points on a shared time grid (union of the batch's selected times).

    Attributes:
        times: ``(K,)`` strictly increasing, shared by the batch.
        values: ``(B, K, D)``; zero where ``mask`` is False.
        mask: ``(B, K)`` bool, ``True`` where that sequence has a point.
    """

    times: Tensor
    values: Tensor
    mask: Tensor


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------


def _int_arg(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _float_arg(value: object, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")
    return v


# ----------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------


def make_spirals(n_spirals: int = 1000, n_total: int = 500, n_obs: int = 100,
                 noise_std: float = 0.1, seed: int = 0, *, n_window: int | None = None,
                 t_max: float = 10.0, radius_growth: float = 0.3,
                 dtype: torch.dtype = torch.float32) -> SpiralData:
    """Generate noisy Archimedean spirals with irregular observations.

    Args:
        n_spirals: number of spirals ``N``; ``N // 2`` run clockwise, the rest
            counter-clockwise (random order).
        n_total: dense grid points per trajectory (>= 2).
        n_obs: observed points per spiral, drawn without replacement from the
            window and sorted in time.
        noise_std: observation noise standard deviation (>= 0).
        seed: seed of the private ``torch.Generator``; the global RNGs are untouched.
        n_window: observation window length in grid points (default
            ``n_total // 2``); must satisfy ``n_obs <= n_window <= n_total``.
            With ``n_window == n_total`` there is nothing to extrapolate.
        t_max: final time; the grid is ``linspace(0, t_max, n_total)``. Each
            time unit turns the spiral by one radian.
        radius_growth: ``b`` in ``r = b * theta``.
        dtype: floating dtype of ``t``, ``clean`` and ``noisy``.

    Returns:
        :class:`SpiralData` with ``t`` ``(n_total,)``, trajectories
        ``(n_spirals, n_total, 2)`` and masks ``(n_spirals, n_total)``.
    """
    n_spirals = _int_arg(n_spirals, "n_spirals")
    n_total = _int_arg(n_total, "n_total", minimum=2)
    n_obs = _int_arg(n_obs, "n_obs")
    n_window = n_total // 2 if n_window is None else _int_arg(n_window, "n_window")
    if n_window > n_total:
        raise ValueError(f"n_window ({n_window}) cannot exceed n_total ({n_total})")
    if n_obs > n_window:
        raise ValueError(f"n_obs ({n_obs}) exceeds the number of grid points in the observation "
                         f"window (n_window={n_window}); lower n_obs or raise n_window/n_total")
    noise_std = _float_arg(noise_std, "noise_std", positive=False)
    t_max = _float_arg(t_max, "t_max", positive=True)
    radius_growth = _float_arg(radius_growth, "radius_growth", positive=True)
    seed = _int_arg(seed, "seed", minimum=0)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    g = torch.Generator().manual_seed(seed)
    n = n_spirals

    n_cw = n // 2
    direction = torch.ones(n, dtype=torch.int64)
    direction[:n_cw] = -1
    direction = direction[torch.randperm(n, generator=g)]

    theta0 = math.pi / 2 + 2 * math.pi * torch.rand(n, generator=g, dtype=_F64)
    phi = 2 * math.pi * torch.rand(n, generator=g, dtype=_F64)

    t = torch.linspace(0.0, t_max, n_total, dtype=_F64)
    theta = theta0[:, None] + t[None, :]  # (N, T)
    radius = radius_growth * theta
    angle = phi[:, None] + direction[:, None].to(_F64) * theta
    clean = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
    noisy = clean + noise_std * torch.randn(clean.shape, generator=g, dtype=_F64)

    # n_obs distinct window indices per spiral: the first n_obs of a random permutation.
    chosen = torch.rand(n, n_window, generator=g).argsort(dim=1)[:, :n_obs]
    obs_mask = torch.zeros(n, n_total, dtype=torch.bool)
    obs_mask.scatter_(1, chosen, True)
    in_window = torch.arange(n_total) < n_window
    interp_mask = in_window[None, :] & ~obs_mask
    extrap_mask = (~in_window)[None, :].expand(n, n_total).clone()

    return SpiralData(t=t.to(dtype), clean=clean.to(dtype), noisy=noisy.to(dtype),
                      direction=direction, obs_mask=obs_mask, interp_mask=interp_mask,
                      extrap_mask=extrap_mask, n_obs=n_obs, n_window=n_window,
                      noise_std=noise_std)


def train_test_split(data: SpiralData, test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[SpiralData, SpiralData]:
    """Split spirals at random into ``(train, test)``, deterministically in ``seed``.

    The test set gets ``round(test_fraction * N)`` spirals; both parts must be
    non-empty. Spirals keep their relative order within each part.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    seed = _int_arg(seed, "seed", minimum=0)
    n = len(data)
    n_test = round(float(test_fraction) * n)
    if n_test < 1 or n_test > n - 1:
        raise ValueError(f"test_fraction={test_fraction} of {n} spirals leaves an empty train or "
                         f"test set")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test_idx, _ = perm[:n_test].sort()
    train_idx, _ = perm[n_test:].sort()
    return data.subset(train_idx), data.subset(test_idx)


# ----------------------------------------------------------------------------
# batching helpers
# ----------------------------------------------------------------------------


def masked_to_padded(t: Tensor, values: Tensor, mask: Tensor) -> IrregularBatch:
    """Compact the masked points of each row to the front, keeping time order.

    Args:
        t: ``(T,)`` shared grid or ``(B, T)`` per-row times, ascending.
        values: ``(B, T, D)``.
        mask: ``(B, T)`` bool.

    Returns:
        :class:`IrregularBatch` with ``K = max_b mask[b].sum()``.
    """
    if mask.dim() != 2 or values.dim() != 3 or values.shape[:2] != mask.shape:
        raise ValueError(f"expected values (B, T, D) and mask (B, T), got "
                         f"{tuple(values.shape)} and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    b, n_t = mask.shape
    times = t.expand(b, n_t) if t.dim() == 1 else t
    if times.shape != mask.shape:
        raise ValueError(f"t must have shape ({n_t},) or {tuple(mask.shape)}, got {tuple(t.shape)}")

    counts = mask.sum(dim=1)
    k = int(counts.max()) if b > 0 else 0
    # stable sort puts selected entries first, in their original (time) order
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    out_mask = torch.arange(k, device=mask.device)[None, :] < counts[:, None]
    out_t = torch.gather(times, 1, order)
    if k > 0:
        last = torch.gather(out_t, 1, (counts - 1).clamp(min=0)[:, None])
        out_t = torch.where(out_mask, out_t, last)
    d = values.shape[-1]
    out_v = torch.gather(values, 1, order[..., None].expand(b, k, d))
    out_v = out_v * out_mask[..., None].to(out_v.dtype)
    return IrregularBatch(times=out_t, values=out_v, mask=out_mask)


def _select(data: SpiralData, which: Which, index: Tensor | slice | list[int] | None,
            noisy: bool) -> tuple[Tensor, Tensor]:
    if which not in _WHICH:
        raise ValueError(f"unknown point set {which!r}; valid: {', '.join(_WHICH)}")
    sub = data if index is None else data.subset(index)
    if which == "all":
        mask = torch.ones_like(sub.obs_mask)
    elif which == "window":
        mask = sub.window_mask
    else:
        mask = getattr(sub, f"{which}_mask")
    return (sub.noisy if noisy else sub.clean), mask


def gather_points(data: SpiralData, which: Which = "obs",
                  index: Tensor | slice | list[int] | None = None, *,
                  noisy: bool = True) -> IrregularBatch:
    """Per-spiral irregular times and values of one point set, padded.

    ``which`` is ``"obs"``, ``"interp"``, ``"extrap"``, ``"window"`` (obs and
    interp) or ``"all"``. ``index`` selects spirals (default: all). Use
    ``noisy=True`` for encoder inputs and ``noisy=False`` for ground-truth
    targets. Returns times ``(B, K)``, values ``(B, K, 2)``, mask ``(B, K)``.
    """
    values, mask = _select(data, which, index, noisy)
    return masked_to_padded(data.t, values, mask)


def grid_points(data: SpiralData, which: Which = "obs",
                index: Tensor | slice | list[int] | None = None, *,
                noisy: bool = True) -> GridBatch:
    """One point set on the union of the batch's selected times.

    Suits encoders that step through one shared time grid with a per-sequence
    mask (e.g. ODE-RNN). Returns times ``(K,)``, values ``(B, K, 2)`` (zero where
    unmasked) and mask ``(B, K)``; ``K`` is the number of grid times at which at
    least one selected spiral has a point.
    """
    values, mask = _select(data, which, index, noisy)
    keep = mask.any(dim=0)
    sub_mask = mask[:, keep]
    sub_values = values[:, keep] * sub_mask[..., None].to(values.dtype)
    return GridBatch(times=data.t[keep], values=sub_values, mask=sub_mask)
