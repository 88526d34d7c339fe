"""``bdf``: variable-step, variable-order (1-5) backward differentiation formulas for stiff
problems, in Nordsieck form with quasi-constant step size (the scheme of LSODE's BDF; the
shared machinery is in ``multistep.py``).

The corrector of order q solves, for y = y_n+1,

    R(y) = y - y_pred - gamma (h f(t_n+1, y) - Z_pred[1]) = 0,   gamma = l_0 = 1 / H_q

(H_q the harmonic number; with ``Z_new = Z_pred + l e``, e = (y - y_pred) / gamma, this is
the BDF formula through the history's interpolated values) by simplified Newton with the
matrix ``I - gamma h J`` (``jacobian.newton``, Hairer's contraction-rate test, tolerance
max(10 eps / rtol, min(0.03, sqrt(rtol))) of the error scale). The Jacobian J is kept
across steps and re-evaluated only when Newton fails with an old one; the LU factors are
kept while gamma h is unchanged (the controller holds h and q for q+1 steps after a change
and ignores step-size changes below 10%). When Newton fails with a Jacobian evaluated at
this step the attempt raises ``StepFailure`` (the loop halves the step).

Gradients (backpropagation through a solve): Newton runs without a graph; the converged
y* is then passed through one exact Newton step with graph,
``y = y* - M*^{-1} R(y*)``, M* = I - gamma h J(y*) with J evaluated at y* (detached), so
that dy/d(history, parameters) = -M*^{-1} dR/d(history, parameters): the implicit function
theorem for the discrete corrector equation (one extra Jacobian and LU per step, only when a
graph is recorded).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from neuralode.solvers import multistep
from neuralode.solvers.base import StepFailure
from neuralode.solvers.controllers import ErrorNorm
from neuralode.solvers.jacobian import (
    JACOBIAN_OPTIONS,
    JacobianSource,
    NewtonMatrix,
    check_jacobian_option,
    newton,
)
from neuralode.solvers.methods import _positive_int
from neuralode.solvers.multistep import MAX_BDF_ORDER, MultistepMethod, NordsieckStepper


class BDFStepper(NordsieckStepper):
    """BDF of orders 1..max_order with Newton on the corrector (see the module docstring).
    ``head``: only the first ``head`` flat components are solved implicitly; the others
    are quadratures (f does not depend on them) integrated by the same formula explicitly
    from the converged head."""

    family = "bdf"
    fsal = True  # the history holds values: no f(t1, y1) is needed after a step

    def __init__(self, max_order: int, jacobian, max_iters: int, norm: ErrorNorm,
                 head: int | None = None):
        super().__init__(max_order)
        self.jac_spec = jacobian
        self.max_iters = max_iters
        self.norm = norm
        self.head = head
        rtol = norm.rtol if isinstance(norm.rtol, float) else float(norm.rtol.min())
        self.rtol = rtol

    def start(self, rhs, y0, f0, graph) -> None:
        super().start(rhs, y0, f0, graph)
        n = y0.numel()
        self.n = n
        self.jac = JacobianSource(self.jac_spec, rhs, n, head=self.head, name="bdf")
        eps = torch.finfo(y0.dtype).eps
        self.tol = max(10 * eps / max(self.rtol, 1e-300), min(0.03, math.sqrt(self.rtol)))
        self.J = None
        self.J_current = False
        self.M = None
        self.M_hg = math.nan
        self.stats = rhs.stats

    def _matrix(self, h: float, gamma: float) -> NewtonMatrix:
        if self.M is None or self.M_hg != h * gamma:
            self.M = NewtonMatrix(self.J, h, gamma, self.stats)
            self.M_hg = h * gamma
        return self.M

    def _correct(self, t, h, Zp, q, c, left_end):
        t1 = t + h
        gamma = c["l0"]
        yp, z1p = Zp[0], Zp[1]
        head = self.n if self.head is None else self.head
        with torch.no_grad():
            yp_d, z1p_d = yp.detach(), z1p.detach()
            scale = self.norm.scale(yp_d.abs())[:head]

            if head == self.n:
                def residual(y):
                    return y - yp_d - gamma * (h * self._f(t1, y, left_end) - z1p_d)
            else:
                tail = yp_d[head:]

                def residual(y):
                    f = self._f(t1, torch.cat([y, tail]), left_end)[:head]
                    return y - yp_d[:head] - gamma * (h * f - z1p_d[:head])

            res = None
            for _ in range(2):
                if self.J is None:
                    self.J = self.jac(t1, yp_d)
                    self.J_current = True
                    self.M = None
                res = newton(residual, yp_d[:head], self._matrix(h, gamma), scale,
                             tol=self.tol, max_iters=self.max_iters, stats=self.stats)
                if res.converged:
                    break
                if self.J_current:
                    raise StepFailure(f"bdf: Newton's method for the order-{q} corrector "
                                      f"failed at t={t1:.10g} with a fresh Jacobian: "
                                      f"{res.reason}", factor=0.5)
                self.J = None  # retry once with a Jacobian at this step
            ys = res.z
        if head != self.n:
            # quadratures: the same formula, explicit in the converged head
            with torch.set_grad_enabled(self.graph):
                y_full = torch.cat([ys, yp[head:]])
                f = self._f(t1, y_full if not self.graph else torch.cat([ys, yp[head:]]),
                            left_end)
                tail = yp[head:] + gamma * (h * f[head:] - z1p[head:])
            ys_head = ys
        else:
            ys_head = ys
        if self.graph:
            # one exact Newton step with graph at the converged solution (implicit function
            # theorem): value y*, derivative -M*^{-1} dR/d(inputs)
            Jx = self.jac(t1, torch.cat([ys_head, yp.detach()[head:]]) if head != self.n
                          else ys_head)
            Mx = NewtonMatrix(Jx, h, gamma, self.stats)
            y_in = ys_head if head == self.n else torch.cat([ys_head, yp.detach()[head:]])
            f = self._f(t1, y_in, left_end)[:head]
            R = ys_head - yp[:head] - gamma * (h * f - z1p[:head])
            y_head = ys_head - Mx.solve(R)
        else:
            y_head = ys_head
        y = y_head if head == self.n else torch.cat([y_head, tail])
        e = (y - yp) / gamma
        return Zp + c["l_col"] * e.unsqueeze(0), e

    def advance(self, f_next) -> None:
        super().advance(f_next)
        self.J_current = False
        if f_next is not None:
            self.J = None  # after a discontinuity the old Jacobian may be wrong
            self.M = None


class BDF(MultistepMethod):
    """Backward differentiation formulas, variable step, variable order 1..``max_order``
    (default 5), Newton with Jacobian and LU reuse, for stiff problems"""

    name = "bdf"
    order = MAX_BDF_ORDER
    MAX_ORDER = MAX_BDF_ORDER
    OPTIONS: ClassVar[dict[str, Any]] = dict(MultistepMethod.OPTIONS, max_order=MAX_BDF_ORDER,
                                             max_iters=4, **JACOBIAN_OPTIONS)

    @classmethod
    def describe(cls) -> str:
        return ("adaptive, stiff, variable order 1-5 (max_order), BDF in Nordsieck form, "
                "Newton with Jacobian/LU reuse, dense output: the step's polynomial")

    @classmethod
    def check(cls, o: dict) -> None:
        super().check(o)
        check_jacobian_option(cls.name, o["jacobian"])
        _positive_int(cls.name, "max_iters", o["max_iters"])

    @classmethod
    def make_stepper(cls, o: dict, norm: ErrorNorm, head: int | None = None):
        return BDFStepper(o["max_order"], o["jacobian"], o["max_iters"], norm, head)


METHODS = {**multistep.METHODS, "bdf": BDF}

__all__ = ["BDF", "METHODS", "BDFStepper"]
