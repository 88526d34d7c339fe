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
a stiff but short solve is left to finish. The methods without two stages at c = 1
(adaptive_heun, fehlberg2, bosh3) are not tested.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

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


def stiffness_ratio(K: torch.Tensor, i: int, j: int, d: torch.Tensor) -> float:
    """h rho from the stages K (rows k_1.., one problem) of the last step."""
    num = torch.linalg.vector_norm(K[j] - K[i])
    den = torch.linalg.vector_norm(torch.mv(K[:j].t(), d))
    return float(num / den) if float(den) > 0 else 0.0


class StiffnessCheck:
    """The float clock's stiffness test of one solve (see the module docstring)."""

    def __init__(self, tab: ButcherTableau, max_stiff_steps: int):
        pair = stiff_pair(tab)
        self.active = pair is not None
        self.next = CHECK_EVERY  # the accepted-step count of the next test
        if not self.active:
            self.next = math.inf
            return
        self.i, self.j, self.d = pair
        self.bound = 0.98 * real_stability_boundary(tab)
        self.limit = max_stiff_steps
        self.stiff = self.calm = 0
        self.d_tensor: torch.Tensor | None = None

    def test(self, K: torch.Tensor, n_accepted: int, t: float, h: float, t_end: float,
             name: str) -> str:
        """After an accepted step (K: its stages): "" or why the solve should stop."""
        if self.d_tensor is None or self.d_tensor.dtype != K.dtype:
            self.d_tensor = torch.tensor(self.d, dtype=K.dtype, device=K.device)
        ratio = stiffness_ratio(K.detach(), self.i, self.j, self.d_tensor)
        if ratio >= self.bound:
            self.stiff += 1
            self.calm = 0
        else:
            self.calm += 1
            if self.calm >= NONSTIFF_STEPS:
                self.stiff = 0
        suspect = self.stiff > 0
        self.next = n_accepted + (1 if suspect else CHECK_EVERY)
        if self.stiff < STIFF_STEPS:
            return ""
        self.stiff = 0
        remaining = abs(t_end - t) / abs(h) if h else math.inf
        if remaining <= self.limit:
            return ""
        return (f"{name}: the problem is stiff at t={t:.10g}: for {STIFF_STEPS} steps in a row "
                f"the step size has been limited by {name}'s stability, not its accuracy "
                f"(h * |dominant eigenvalue| ~ {ratio:.3g}, at the edge of its stability "
                f"region, {self.bound / 0.98:.3g}); at h={abs(h):.3g} the rest of the span would "
                f"take about {remaining:.3g} steps. Use a stiff method: method={STIFF_METHODS} "
                f"(or options={{'max_stiff_steps': None}} to go on)")


__all__ = ["CHECK_EVERY", "MAX_STIFF_STEPS", "STIFF_STEPS", "StiffnessCheck",
           "real_stability_boundary", "stiff_pair", "stiffness_ratio"]
