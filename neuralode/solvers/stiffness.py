"""Stiffness detection for the explicit adaptive Runge–Kutta methods (the test of Hairer's
DOPRI5; Hairer, Nørsett & Wanner, Solving ODEs I, II.10, and Hairer & Wanner, Solving ODEs
II, IV.2).

On a stiff problem an explicit method's step is limited by stability, not accuracy: h times
the magnitude rho of the dominant eigenvalue of df/dy sits at the edge of the method's
stability region, whose extent on the negative real axis is ``x_b`` (3.31 for dopri5; see
``real_stability_boundary``). Two stages evaluated at the same time (c = 1: dopri5's and
tsit5's last two, dopri8's 12th and 13th) estimate it without a Jacobian:

    h rho ~ ||k_j - k_i|| / ||(Y_j - Y_i) / h||,   (Y_j - Y_i) / h = sum_m (a_jm - a_im) k_m.

As DOPRI5 does, the test runs every ``CHECK_EVERY`` accepted steps and, once it finds
h rho >= 0.98 x_b, at every step; ``STIFF_STEPS`` such steps in a row declare the problem
stiff (``NONSTIFF_STEPS`` steps below it in a row clear the suspicion). A stiff solve stops
(status "stiff", ``StiffnessError`` naming the stiff methods) when the rest of its span would
take more than ``max_stiff_steps`` (an option, default 100,000) steps of the current size:
a stiff but short solve is left to finish. Per sample (the batched driver) the counters are
per row and the test runs every ``CHECK_EVERY`` attempts of the batch. The methods without
two stages at c = 1 (adaptive_heun, fehlberg2, bosh3) are not tested.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from neuralode.solvers.elementwise import isfinite, where
from neuralode.solvers.rk import combine
from neuralode.solvers.tableau import ButcherTableau

CHECK_EVERY = 1000
STIFF_STEPS = 15
NONSTIFF_STEPS = 6
MAX_STIFF_STEPS = 100_000
STIFF_METHODS = "'rodas5p', 'kvaerno5' or 'bdf'"


@functools.cache
def real_stability_boundary(tab: ButcherTableau) -> float:
    """x_b: the stability function R(z) = 1 + z b^T (I - z A)^{-1} 1 satisfies |R(-x)| <= 1 on
    [0, x_b] (scanned in steps of 1e-3, then bisected)."""
    A, b = np.asarray(tab.a, dtype=np.float64), np.asarray(tab.b, dtype=np.float64)
    ones, eye = np.ones(len(b)), np.eye(len(b))

    def stable(x: float) -> bool:
        return abs(1.0 - x * b @ np.linalg.solve(eye + x * A, ones)) <= 1.0 + 1e-12
    x = 0.0
    while x < 100.0 and stable(x + 1e-3):
        x += 1e-3
    lo, hi = x, x + 1e-3
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    return lo


@functools.cache
def stiff_pair(tab: ButcherTableau) -> tuple[int, int, list[float]] | None:
    """Two stages (i, j) at c = 1 (j the last stage) and a_j - a_i over the stages before j,
    or None."""
    c = [float(x) for x in tab.c]
    j = len(c) - 1
    if c[j] != 1.0:
        return None
    earlier = [i for i in range(j) if c[i] == 1.0]
    if not earlier:
        return None
    i = earlier[-1]
    a = np.asarray(tab.a, dtype=np.float64)
    return i, j, [float(a[j, m] - a[i, m]) for m in range(j)]


def stiffness_ratio(K: torch.Tensor, i: int, j: int, d: list[float]):
    """h rho from the stages K of the last step: (s, n) -> a float (one problem), (s, B, n)
    -> (B,) float64 (per sample)."""
    num = torch.linalg.vector_norm(K[j] - K[i], dim=-1)
    # sum_m d_m K_m written out (it fuses in a compiled loop, which tests every step)
    den = torch.linalg.vector_norm(combine([(K[m], c) for m, c in enumerate(d) if c != 0.0]),
                                   dim=-1)
    ratio = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    return float(ratio) if K.dim() == 2 else ratio.to(torch.float64)


def stiff_message(name: str, t: float, h: float, ratio: float, boundary: float,
                  remaining: float) -> str:
    return (f"{name}: the problem is stiff at t={t:.10g}: for {STIFF_STEPS} steps in a row "
            f"the step size has been limited by {name}'s stability, not its accuracy "
            f"(h * |dominant eigenvalue| ~ {ratio:.3g}, at the edge of its stability region, "
            f"{boundary:.3g}); at h={abs(h):.3g} the rest of the span would take about "
            f"{remaining:.3g} steps. Use a stiff method: method={STIFF_METHODS} (or "
            f"options={{'max_stiff_steps': None}} to go on)")


class StiffnessCheck:
    """The stiffness test of one solve (see the module docstring): one problem (floats,
    ``test``) or per sample (``test_rows``: (B,) counters, each row as alone)."""

    def __init__(self, tab: ButcherTableau, max_stiff_steps: int):
        pair = stiff_pair(tab)
        self.active = pair is not None
        self.next = CHECK_EVERY  # the accepted-step count of the next test
        self.suspect = False
        if not self.active:
            self.next = math.inf
            return
        self.i, self.j, self.d = pair
        self.boundary = real_stability_boundary(tab)
        self.bound = 0.98 * self.boundary
        self.limit = max_stiff_steps
        self.stiff: Any = 0
        self.calm: Any = 0

    def _update(self, K: torch.Tensor, t, h, t_end, counted):
        """The counters after a step (``counted``: it was accepted; per row a mask), and
        (h rho, whether the test fires, the steps that would remain)."""
        ratio = stiffness_ratio(K.detach(), self.i, self.j, self.d)
        hit = ratio >= self.bound
        calm = where(counted, where(hit, 0, self.calm + 1), self.calm)
        stiff = where(counted & hit, self.stiff + 1, self.stiff)
        stiff = where(calm >= NONSTIFF_STEPS, 0, stiff)
        full = stiff >= STIFF_STEPS
        self.stiff, self.calm = where(full, 0, stiff), calm
        remaining = abs(t_end - t) / where(h != 0, abs(h), math.nan)
        remaining = where(isfinite(remaining), remaining, math.inf)
        return ratio, full & (remaining > self.limit), remaining

    def test(self, K: torch.Tensor, n_accepted: int, t: float, h: float, t_end: float,
             name: str) -> str:
        """After an accepted step (K: its stages): "" or why the solve should stop."""
        ratio, fire, remaining = self._update(K, t, h, t_end, True)
        self.next = n_accepted + (1 if self.stiff > 0 else CHECK_EVERY)
        return stiff_message(name, t, h, ratio, self.boundary, remaining) if fire else ""

    def test_rows(self, K: torch.Tensor, accepted: torch.Tensor, t: torch.Tensor,
                  h: torch.Tensor, t_end: torch.Tensor):
        """Per sample after an attempt of every row (K (s, B, n), ``accepted`` (B,)): the
        rows to stop and, for them, (h rho, remaining steps) per row (one host
        synchronisation: whether any row is suspect or fires)."""
        if not isinstance(self.stiff, torch.Tensor):
            self.stiff = torch.zeros_like(accepted, dtype=torch.long)
            self.calm = torch.zeros_like(self.stiff)
        ratio, fire, remaining = self._update(K, t, h, t_end, accepted)
        suspect, fired = torch.stack([(self.stiff > 0).any(), fire.any()]).tolist()
        self.suspect = bool(suspect)
        return fire, (ratio, remaining) if fired else None

    def take(self, idx) -> None:
        """Keep the rows ``idx`` (a per-sample batch shrinks)."""
        if isinstance(getattr(self, "stiff", None), torch.Tensor):
            self.stiff, self.calm = self.stiff[idx], self.calm[idx]


__all__ = ["CHECK_EVERY", "MAX_STIFF_STEPS", "STIFF_STEPS", "StiffnessCheck",
           "real_stability_boundary", "stiff_message", "stiff_pair", "stiffness_ratio"]
