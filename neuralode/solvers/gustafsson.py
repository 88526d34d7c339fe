"""Gustafsson's predictive step-size controller (Hairer & Wanner, Solving ODEs II, IV.8,
eq. (8.21) and RADAU5's implementation of it).

After an accepted step n with error ratio err_n (following an accepted step n-1 of size
h_{n-1} and ratio err_{n-1}) the next step is h_n times the smaller of

    safety * err_n^(-1/k)                                          (the I controller)
    safety * (h_n / h_{n-1}) * (err_{n-1} / err_n^2)^(1/k)        (the predictive one)

with k the error estimate's order + 1, limited to [dfactor, ifactor] (an accepted step may
shrink the next one, as in RADAU5); err_{n-1} is held at least 1e-2 (RADAU5's ERRACC). Right
after a rejection the step does not grow. Rejections shrink by the I controller's factor.
It damps the step-size oscillations of stiff solves, where the error estimate follows the
step size less than the asymptotic law says.

    options={"step_size_controller": neuralode.GustafssonController()}

Works with every adaptive one-step method (explicit, implicit and Rosenbrock Runge–Kutta),
one problem or per sample: the formulas below run on Python floats or on (B,) tensors.
"""

from __future__ import annotations

import math
from typing import Any

from neuralode.solvers.controllers import PIDController, PIDRun
from neuralode.solvers.elementwise import logical_not, maximum, minimum, where


class GustafssonRun(PIDRun):
    """The per-solve state of a ``GustafssonController``."""

    # the history (``history``): floats, or (B,) tensors per sample
    h_acc: Any
    err_acc: Any
    had_accept: Any
    rejected_last: Any

    def __init__(self, norm, error_order: int, s: dict):
        super().__init__(norm, error_order, s)
        self.exponent = 1.0 / (error_order + 1.0)
        self.accept_floor = self.dfactor
        self.has_history = True

    def history(self) -> dict:
        return {**super().history(), "h_acc": math.nan, "err_acc": 1.0, "had_accept": False,
                "rejected_last": False}

    def growth(self, ratio, h):
        e = self.exponent
        f = self.safety * ratio ** (-e)
        # err_acc / ratio^2 written as two divisions: ratio^2 may underflow to zero
        predictive = self.safety * (h / self.h_acc) * (self.err_acc / ratio / ratio) ** e
        f = where(self.had_accept, minimum(f, predictive), f)
        return where(self.rejected_last, minimum(f, 1.0), f)

    def remember(self, accept, ratio, h, live=None) -> None:
        self.h_acc = where(accept, h, self.h_acc)
        self.err_acc = where(accept, maximum(ratio, 1e-2), self.err_acc)
        self.had_accept = self.had_accept | accept
        rejected = logical_not(accept)
        self.rejected_last = rejected if live is None else where(live, rejected,
                                                                 self.rejected_last)


class GustafssonController(PIDController):
    """Gustafsson's predictive controller (RADAU5's); see ``neuralode.solvers.gustafsson``.
    Takes the settings of ``PIDController`` except the PID coefficients (its exponent is
    1/(error order + 1)): rtol, atol, safety, ifactor, dfactor, first_step, min_step,
    max_step."""

    RUN = GustafssonRun

    def __init__(self, rtol=None, atol=None, *, safety=None, ifactor=None, dfactor=None,
                 first_step=None, min_step=None, max_step=None):
        super().__init__(rtol, atol, safety=safety, ifactor=ifactor, dfactor=dfactor,
                         first_step=first_step, min_step=min_step, max_step=max_step)


__all__ = ["GustafssonController", "GustafssonRun"]
