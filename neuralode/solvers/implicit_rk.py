"""Implicit Runge–Kutta methods: one stepper for every implicit tableau.

    Y_i = y + h sum_j a_ij k_j,    k_i = f(t + c_i h, Y_i),    y1 = y + h sum_i b_i k_i

The stage increments z_i = Y_i - y are found by simplified Newton iterations
(``jacobian.newton``) with the Jacobian J = df/dy from ``jacobian.JacobianSource``:

* fully implicit tableaux (Gauss–Legendre, Radau IIA): all stages at once, the Newton
  matrix ``I - h (A ⊗ J)`` coupling them (``NewtonMatrix`` with the (s, s) matrix A); the
  stage derivatives are recovered from the increments as k = (h A)^{-1} z, without further
  evaluations of f (evaluating f at the stages would amplify the Newton error by the
  stiffness);
* diagonally implicit tableaux (SDIRK, ESDIRK, the trapezoidal rule, implicit Euler and
  midpoint): stage by stage, the Newton matrix ``I - h a_ii J``; k_i = (z_i - h sum_{j<i}
  a_ij k_j) / (h a_ii). An explicit first stage (c_1 = 0, a_1j = 0) is f(t, y), which the
  loop hands over (FSAL for the stiffly accurate methods: f(t1, y1) is the last stage).

Newton's convergence test is relative to the solve's tolerances: the predicted error of the
iteration (Hairer & Wanner's contraction-rate estimate) in the RMS norm scaled by
``atol + rtol |y|`` must fall below kappa = max(2 eps / rtol, min(0.03, sqrt(rtol))),
RADAU5's choice (``jacobian.newton_tolerance``), a small fraction of the error the step may
make (2 eps / rtol: what the dtype can resolve). The
Jacobian is kept across steps and re-evaluated only when Newton converged slowly (rate
above ``SLOW_RATE``) or failed; the matrix is refactorised when J changes or h changed by
more than ``REFACTOR`` (relative). When Newton fails with a Jacobian evaluated at the step's
own start, the attempt raises ``StepFailure`` (an adaptive solve shrinks h; a fixed grid
ends with ``ConvergenceError`` quoting where and why).

Gradients (autograd through the solve) are those of the discrete solution, by the implicit
function theorem: the stages are converged without a graph, then one exact Newton step is
taken with a graph, z = z* - M*^{-1} R(z*; y, params), M* = dR/dz at z* (the Jacobians at
the converged stages, detached). Its value is z* (to the Newton tolerance) and its
derivative with respect to y and f's parameters is exactly -M*^{-1} dR/d(y, params).

Dense output: the cubic Hermite interpolant through (y0, f0) and (y1, f1) (third order:
local interpolation error O(h^4)), or the chord with ``interp='linear'``.

``head`` (``odeint_adjoint``): only the first ``head`` flat components are solved by Newton;
the rest are quadratures whose derivatives do not depend on them, integrated with the
tableau's weights from f at the converged stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from neuralode.solvers.adams import HermiteSegment, hermite
from neuralode.solvers.base import StepFailure
from neuralode.solvers.controllers import ErrorNorm
from neuralode.solvers.elementwise import column, divisor, isfinite, maximum, where
from neuralode.solvers.jacobian import (
    JACOBIAN_OPTIONS,
    JacobianSource,
    MatrixFree,
    NewtonMatrix,
    check_jacobian_option,
    gmres,
    lu_solve,
    newton,
    newton_tolerance,
)
from neuralode.solvers.methods import (
    IMPLICIT_ADAPTIVE_OPTIONS,
    STIFF_OUTPUT_OPTIONS,
    AdaptiveRK,
    FixedGridMethod,
    Method,
    _positive_int,
)
from neuralode.solvers.rk import ChordSegment, chord
from neuralode.solvers.tableau import RungeKuttaCoefficients
from neuralode.solvers.timekeeping import time_dtype

# a Newton contraction rate above this re-evaluates J at the next step: RADAU5's THET and
# scipy's Radau (0.25 before: measured on OREGO at rtol 1e-6, kvaerno5 80x the tolerance
# with 20,466 evaluations of f, 19x with 15,231 and 3x the Jacobians)
SLOW_RATE = 1e-3
FAILURE_FACTOR = 0.5  # a failed attempt (Newton with a fresh Jacobian) is retried with h * this
REFACTOR = 0.2  # |h / h_factorised - 1| above this refactorises the Newton matrix


# ----------------------------------------------------------------------------------------
# Tableaux
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ImplicitTableau(RungeKuttaCoefficients):
    """An implicit Runge–Kutta tableau."""

    stiff_decay: str = ""  # "L-stable", "A-stable", ...
    diagonal: bool = field(init=False)  # lower triangular: stage by stage
    explicit_first: bool = field(init=False)  # first stage is f(t, y)
    stiffly_accurate: bool = field(init=False)  # b is A's last row and c_s = 1: y1 = Y_s

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "diagonal", bool(np.all(np.triu(self.a, 1) == 0)))
        object.__setattr__(self, "explicit_first",
                           bool(self.c[0] == 0 and np.all(self.a[0] == 0)))
        object.__setattr__(self, "stiffly_accurate",
                           bool(self.c[-1] == 1.0 and np.array_equal(self.a[-1], self.b)))


def _tab(name, order, a, b, c, **kw) -> ImplicitTableau:
    return ImplicitTableau(name, order, np.array(a, dtype=np.float64),
                           np.array(b, dtype=np.float64), np.array(c, dtype=np.float64), **kw)


_s2, _s3, _s6, _s15 = math.sqrt(2), math.sqrt(3), math.sqrt(6), math.sqrt(15)

IMPLICIT_EULER = _tab("implicit_euler", 1, [[1.0]], [1.0], [1.0], stiff_decay="L-stable")
IMPLICIT_MIDPOINT = _tab("implicit_midpoint", 2, [[0.5]], [1.0], [0.5],
                         stiff_decay="A-stable, not L-stable")
TRAPEZOID = _tab("trapezoid", 2, [[0, 0], [0.5, 0.5]], [0.5, 0.5], [0, 1.0],
                 stiff_decay="A-stable, not L-stable")
RADAU_IIA3 = _tab("radauIIA3", 3, [[5 / 12, -1 / 12], [3 / 4, 1 / 4]], [3 / 4, 1 / 4],
                  [1 / 3, 1.0], stiff_decay="L-stable")
# Gauss–Legendre with nodes 1/2 -+ sqrt(3)/6 (torchdiffeq's second node is 1/2 - sqrt(3)/6)
GL4 = _tab("gl4", 4, [[1 / 4, 1 / 4 - _s3 / 6], [1 / 4 + _s3 / 6, 1 / 4]], [0.5, 0.5],
           [0.5 - _s3 / 6, 0.5 + _s3 / 6], stiff_decay="A-stable, not L-stable")
RADAU_IIA5 = _tab(
    "radauIIA5", 5,
    [[11 / 45 - 7 * _s6 / 360, 37 / 225 - 169 * _s6 / 1800, -2 / 225 + _s6 / 75],
     [37 / 225 + 169 * _s6 / 1800, 11 / 45 + 7 * _s6 / 360, -2 / 225 - _s6 / 75],
     [4 / 9 - _s6 / 36, 4 / 9 + _s6 / 36, 1 / 9]],
    [4 / 9 - _s6 / 36, 4 / 9 + _s6 / 36, 1 / 9], [2 / 5 - _s6 / 10, 2 / 5 + _s6 / 10, 1.0],
    stiff_decay="L-stable")
GL6 = _tab(
    "gl6", 6,
    [[5 / 36, 2 / 9 - _s15 / 15, 5 / 36 - _s15 / 30],
     [5 / 36 + _s15 / 24, 2 / 9, 5 / 36 - _s15 / 24],
     [5 / 36 + _s15 / 30, 2 / 9 + _s15 / 15, 5 / 36]],
    [5 / 18, 4 / 9, 5 / 18], [0.5 - _s15 / 10, 0.5, 0.5 + _s15 / 10],
    stiff_decay="A-stable, not L-stable")
_g = 1 - _s2 / 2  # SDIRK2 (Alexander): gamma = 1 - 1/sqrt(2)
SDIRK2 = _tab("sdirk2", 2, [[_g, 0], [1 - _g, _g]], [1 - _g, _g], [_g, 1.0],
              stiff_decay="L-stable")
# TR-BDF2 as an ESDIRK: a trapezoidal stage to 2 gamma, then BDF2; gamma = 1 - 1/sqrt(2)
_w = _s2 / 4
TRBDF2 = _tab("trbdf2", 2, [[0, 0, 0], [_g, _g, 0], [_w, _w, _g]], [_w, _w, _g],
              [0, 2 * _g, 1.0], stiff_decay="L-stable")


def _kvaerno3() -> ImplicitTableau:
    # Kvaerno (2004), 3(2): gamma is the root of 6 g^3 - 18 g^2 + 9 g - 1 near 0.4359
    # (the stability function vanishes at infinity)
    g = float(np.real(min((r for r in np.roots([6, -18, 9, -1]) if abs(r.imag) < 1e-12),
                          key=lambda r: abs(r - 0.4358665215))))
    a31 = (-4 * g**2 + 6 * g - 1) / (4 * g)
    a32 = (-2 * g + 1) / (4 * g)
    a41 = (6 * g - 1) / (12 * g)
    a42 = -1 / ((24 * g - 12) * g)
    a43 = (-6 * g**2 + 6 * g - 1) / (6 * g - 3)
    a = [[0, 0, 0, 0], [g, g, 0, 0], [a31, a32, g, 0], [a41, a42, a43, g]]
    return _tab("kvaerno3", 3, a, a[3], [0, 2 * g, 1.0, 1.0],
                b_err=np.array(a[3]) - np.array(a[2]), error_order=2, stiff_decay="L-stable")


def _kvaerno4() -> ImplicitTableau:
    # Kvaerno (2004), 4(3), the variant that propagates the fourth-order last stage
    g = 0.5728160625

    def p(*coef):
        return float(np.polyval(coef, g))
    q = p(12, -6, 1)
    a31 = p(144, -180, 81, -15, 1) * g / q**2
    a32 = p(-36, 39, -15, 2) * g / q**2
    a41 = p(-144, 396, -330, 117, -18, 1) / (12 * g**2 * p(12, -9, 2))
    a42 = p(72, -126, 69, -15, 1) / (12 * g**2 * p(3, -1))
    a43 = p(-6, 6, -1) * q**2 / (12 * g**2 * p(12, -9, 2) * p(3, -1))
    a51 = p(288, -312, 120, -18, 1) / (48 * g**2 * p(12, -9, 2))
    a52 = p(24, -12, 1) / (48 * g**2 * p(3, -1))
    a53 = -(q**3) / (48 * g**2 * p(3, -1) * p(12, -9, 2) * p(6, -6, 1))
    a54 = p(-24, 36, -12, 1) / p(24, -24, 4)
    a = [[0, 0, 0, 0, 0], [g, g, 0, 0, 0], [a31, a32, g, 0, 0], [a41, a42, a43, g, 0],
         [a51, a52, a53, a54, g]]
    c = [0, 2 * g, g + a31 + a32, 1.0, 1.0]
    return _tab("kvaerno4", 4, a, a[4], c, b_err=np.array(a[4]) - np.array(a[3]),
                error_order=3, stiff_decay="L-stable")


def _kvaerno5() -> ImplicitTableau:
    # Kvaerno (2004), 5(4), 7 stages, gamma = 0.26
    g = 0.26
    a = np.zeros((7, 7))
    a[1, :2] = [g, g]
    a[2, :3] = [0.13, 0.84033320996790809, g]
    a[3, :4] = [0.22371961478320505, 0.47675532319799699, -0.06470895363112615, g]
    a[4, :5] = [0.16648564323248321, 0.10450018841591720, 0.03631482272098715,
                -0.13090704451073998, g]
    a[5, :6] = [0.13855640231268224, 0, -0.04245337201752043, 0.02446657898003141,
                0.61943039072480676, g]
    a[6, :7] = [0.13659751177640291, 0, -0.05496908796538376, -0.04118626728321046,
                0.62993304899016403, 0.06962479448202728, g]
    c = a.sum(1)
    c[-2:] = 1.0
    return _tab("kvaerno5", 5, a, a[6], c, b_err=a[6] - a[5], error_order=4,
                stiff_decay="L-stable")


KVAERNO3, KVAERNO4, KVAERNO5 = _kvaerno3(), _kvaerno4(), _kvaerno5()

IMPLICIT_TABLEAUX: dict[str, ImplicitTableau] = {t.name: t for t in (
    IMPLICIT_EULER, IMPLICIT_MIDPOINT, TRAPEZOID, RADAU_IIA3, GL4, RADAU_IIA5, GL6, SDIRK2,
    TRBDF2, KVAERNO3, KVAERNO4, KVAERNO5)}


# ----------------------------------------------------------------------------------------
# Linear algebra of the exact (implicit-function-theorem) step
# ----------------------------------------------------------------------------------------

class _OperatorSolve(torch.autograd.Function):
    """x = M^{-1} b for a matrix-free M; the gradient w.r.t. b is M^{-T} g."""

    @staticmethod
    def forward(ctx, b, op):
        ctx.op = op
        return op.solve(b.detach())

    @staticmethod
    def backward(ctx, g):
        return ctx.op.solve(g, transpose=True), None


class StageMatrix:
    """dR/dz of the stage equations at the converged stages:
    ``I - h [a_ij J_j]`` (block (i, j)), J_j the Jacobian at stage j. ``solve(b)`` with b of
    shape (s, n) is differentiable with respect to b (not the matrix)."""

    def __init__(self, Js: list, h: float, A: torch.Tensor, rtol: float):
        self.Js, self.h, self.A, self.rtol = Js, h, A, rtol
        s = A.shape[0]
        self.s = s
        J0 = Js[0]
        if isinstance(J0, MatrixFree):
            self.kind = "matfree"
            return
        if J0.dim() == 2:
            self.kind = "dense"
            n = J0.shape[0]
            eye = torch.eye(n, dtype=J0.dtype, device=J0.device)
            rows = [torch.cat([(eye if i == j else 0 * eye) - (h * float(A[i, j])) * Js[j]
                               for j in range(s)], 1) for i in range(s)]
            M = torch.cat(rows, 0)
        else:
            self.kind = "block"
            B, m, _ = J0.shape
            Jst = torch.stack(Js, 1)  # (B, j, p, q)
            kr = A.to(J0)[None, :, None, :, None] * Jst.permute(0, 2, 1, 3)[:, None]
            hb = h if not isinstance(h, torch.Tensor) else h.to(J0.dtype).reshape(-1, 1, 1)
            M = torch.eye(s * m, dtype=J0.dtype, device=J0.device) - hb * kr.reshape(
                B, s * m, s * m)
        self.lu, self.piv = torch.linalg.lu_factor(M)

    def _mv(self, v: torch.Tensor, transpose: bool) -> torch.Tensor:
        V = v.reshape(self.s, -1)
        A, h = self.A.to(v), self.h
        if not transpose:
            JV = torch.stack([self.Js[j].mv(V[j]) for j in range(self.s)])
            return (V - h * (A @ JV)).reshape(-1)
        W = A.t() @ V  # (j, n): sum_i a_ij w_i
        JW = torch.stack([self.Js[j].vjp(W[j]) for j in range(self.s)])
        return (V - h * JW).reshape(-1)

    def solve(self, b: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        if self.kind == "matfree":
            if b.requires_grad and not transpose:
                return _OperatorSolve.apply(b, self)
            x, _ = gmres(lambda v: self._mv(v, transpose), b.reshape(-1).detach(),
                         rtol=self.rtol, max_restarts=50)
            return x.reshape(b.shape)
        return lu_solve(self.lu, self.piv, b, stages=True)


# ----------------------------------------------------------------------------------------
# The stepper
# ----------------------------------------------------------------------------------------
def make_jacobian_source(spec, rhs, n: int, name: str):
    """The Jacobian source of a solve, and the number of implicitly solved components.

    A right-hand side may bring its own structure (``odeint_adjoint``'s augmented system):
    ``func.implicit_jacobian(spec, rhs, name)`` returning (source, head)."""
    own = getattr(rhs.func, "implicit_jacobian", None)
    if own is not None:
        return own(spec, rhs, name)
    return JacobianSource(spec, rhs, n, name=name), n


class ImplicitRKStepper:
    """One step of an implicit Runge–Kutta method (see the module docstring); same
    interface as ``rk.RKStepper``.

    Per sample (y (B, n), t and h (B,) float64 tensors): every row keeps its own Jacobian
    block, where and when it was evaluated, its factorised Newton matrices and the step
    sizes they were made for, and its contraction estimate; each row's Newton iterations
    stop at its own verdict, and a row whose Newton solve failed with a fresh Jacobian is
    marked in ``failed`` (the driver retries it with h * ``FAILURE_FACTOR``, as the
    one-problem driver does on ``StepFailure``). A row with h = 0 (finished) is left alone.
    Both run the same stage loop (``_stages``), told apart by ``_OneProblem`` and ``_Rows``."""

    def __init__(self, tab: ImplicitTableau, norm: ErrorNorm, jacobian="autograd",
                 max_iters: int = 10, linear: bool = False, name: str = ""):
        self.tab = tab
        self.norm = norm
        self.spec = jacobian
        self.max_iters = max_iters
        self.linear = linear
        self.name = name or tab.name
        self.s = tab.stages
        self.order = tab.order
        self.error_order = tab.error_order
        self.fsal = tab.stiffly_accurate
        self.failure_factor = FAILURE_FACTOR
        self.c = [float(x) for x in tab.c]
        self.a = tab.a
        self.b_nz = [(j, float(x)) for j, x in enumerate(tab.b) if x != 0.0]

    # -- per solve --------------------------------------------------------------------
    def start(self, rhs, y0: torch.Tensor, f0: torch.Tensor, graph: bool) -> None:
        self.rhs = rhs
        self.graph = graph
        self.stats = rhs.stats
        self.batch = y0.dim() == 2
        n = y0.shape[-1]
        self.n = n
        self.jac, self.head = make_jacobian_source(self.spec, rhs, n, self.name)
        dt, dev = y0.dtype, y0.device
        self.A = torch.tensor(self.a, dtype=dt, device=dev)
        self.b = torch.tensor(self.tab.b, dtype=dt, device=dev)
        self.b_err = None if self.tab.b_err is None else torch.tensor(self.tab.b_err, dtype=dt,
                                                                     device=dev)
        if not self.tab.diagonal:
            self.A_inv = torch.linalg.inv(self.A.to(time_dtype(dev))).to(dt)
            # the nodes shaped to scale stage-major stages (s, ..., n)
            self.c_col = torch.tensor(self.c, dtype=dt, device=dev).reshape(
                (-1,) + (1,) * y0.dim())
        rtol = self.norm.rtol
        r = float(rtol) if not isinstance(rtol, torch.Tensor) else float(rtol.min())
        eps = torch.finfo(dt).eps
        self.eps = eps
        self.kappa = newton_tolerance(r, eps)
        self.gmres_rtol = 1e-10 if dt == torch.float64 else 1e-5
        self.f0 = f0
        self.J = None  # the Jacobian in use, evaluated at (J_t, J_y)
        self.J_t, self.J_y = math.nan, None
        self.J_stale: Any = True  # re-evaluate at the next step
        self.mats: dict[Any, tuple[Any, Any]] = {}  # key -> (h, factorised matrix)
        self.eta: Any = None
        self.K: Any = None  # the stages of the last attempt (s, ..., n), Z: (s, ..., head)
        self.Z: Any = None
        self.failed = None
        if self.batch:  # per row: a (B,) value each, nan for "none"
            B = y0.shape[0]
            self.J_t = torch.full((B,), math.nan, dtype=torch.float64, device=dev)
            self.J_stale = torch.ones(B, dtype=torch.bool, device=dev)
            self.eta = torch.full((B,), math.nan, dtype=torch.float64, device=dev)

    # -- Jacobian and Newton matrices ---------------------------------------------------
    def _fresh(self, t, y) -> bool:
        # by value as well: a replayed step (checkpointing) starts from an equal copy of y
        return self.J is not None and self.J_t == t and (
            self.J_y is y or (self.J_y is not None and torch.equal(self.J_y, y)))

    def _evaluate_jacobian(self, t, y, inside: float | None = None) -> None:
        """J at (t, y); ``inside``: the step's end, when f must be evaluated strictly inside
        the step (``perturb``, a discontinuity): J is then taken just after t."""
        tj = t if inside is None else float(self.rhs.toward(t, inside))
        with torch.no_grad():
            self.J = self.jac(tj, y)
        self.J_t, self.J_y = t, y
        self.J_stale = False
        self.mats = {}
        self.eta = None

    def _matrix(self, key, h: float):
        """The Newton matrix I - h key J (key: a diagonal entry) or I - h (A ⊗ J)."""
        got = self.mats.get(key)
        if got is not None and abs(h / got[0] - 1.0) <= REFACTOR:
            return got[1]
        A = self.A if key == "A" else key
        m = NewtonMatrix(self.J, h, A, self.stats, gmres_rtol=1e-3)
        self.mats[key] = (h, m)
        return m

    # -- one attempt ------------------------------------------------------------------
    def _times(self, t, h, left_end):
        if self.batch:  # (B,) float64 times, handed to f by ``rhs.call``
            return [t + ci * h for ci in self.c]
        if left_end is None:
            return [self.rhs.time(t + ci * h) for ci in self.c]
        return [left_end(t + ci * h) for ci in self.c]

    def _f(self, tt, Y):
        return self.rhs.call(tt, Y) if self.batch else self.rhs.call_at(tt, Y)

    def _full(self, y, zh):
        """y + z for an increment of the head components only."""
        if self.head == self.n:
            return y + zh
        return torch.cat([y[..., : self.head] + zh, y[..., self.head:]], -1)

    def _head(self, v):
        """The head components of v (..., n) (v itself, no view, where head = n)."""
        return v if self.head == self.n else v[..., : self.head]

    # -- a diagonally implicit stage: z = base + h g f(t_i, y + z), k_i = (z - base) / (h g) --
    def _stage_base(self, i: int, Kh, hc):
        """h sum_{j<i} a_ij k_j over the head components (``Kh``: the earlier stages' heads,
        stacked (i, ..., head)); 0.0 for the first stage."""
        return hc * _mix(self.A[i, :i], Kh) if i else 0.0

    def _stage_residual(self, y, ti, base, hg) -> Callable:
        """z -> z - base - h g f(t_i, y + z): the stage equation's residual (head)."""
        return lambda z: z - base - hg * self._head(self._f(ti, self._full(y, z)))

    def _stage_f(self, times, y, Z) -> torch.Tensor:
        """f at every stage y + Z_i (head components), stacked: (s, ..., head)."""
        return torch.stack([self._head(self._f(times[i], self._full(y, Z[i])))
                            for i in range(self.s)])

    def step(self, t, y: torch.Tensor, h, left_end=None) -> torch.Tensor:
        times = self._times(t, h, left_end)
        self.f1_known = False
        if self.batch:
            return self._step_rows(t, y, h, times)
        inside = None if left_end is None else t + h
        if self.J is None or (self.J_stale and not self._fresh(t, y)):
            self._evaluate_jacobian(t, y, inside)
        for attempt in range(2):
            with torch.no_grad():
                failure = self._stages(y.detach(), h, times, _OneProblem(self))
            if failure is None:
                break
            if attempt == 0 and not self._fresh(t, y):
                self._evaluate_jacobian(t, y, inside)  # a Jacobian from an earlier step
                continue
            self.J_stale = True
            raise StepFailure(f"{failure} (t={t:.10g}, h={h:.3g}, Jacobian evaluated at the "
                              f"step's start)", factor=FAILURE_FACTOR)
        if self.graph:
            self._exact_step(t, y, h, times)
        K = self.K
        self.y1 = torch.add(y, torch.mv(K.t(), self.b), alpha=h) if not self.graph else \
            y + h * sum(K[j] * bj for j, bj in self.b_nz)
        return self.y1

    # -- per sample ---------------------------------------------------------------------
    def _fresh_rows(self, t, y) -> torch.Tensor:
        if self.J_y is None:
            return torch.zeros_like(self.J_stale)
        return (self.J_t == t) & (self.J_y == y).all(-1)

    def _jacobian_rows(self, t, y, rows: torch.Tensor) -> None:
        """J at (t, y) for the ``rows`` (the others keep theirs); their Newton matrices are
        refactorised at their next use and their contraction estimate is forgotten."""
        with torch.no_grad():
            J = self.jac(t, y.detach())
        r3 = rows[:, None, None]
        self.J = J if self.J is None else torch.where(r3, J, self.J)
        self.J_t = torch.where(rows, t, self.J_t)
        yd = y.detach()
        self.J_y = yd if self.J_y is None else torch.where(rows[:, None], yd, self.J_y)
        self.J_stale = self.J_stale & ~rows
        self.eta = torch.where(rows, math.nan, self.eta)
        self.mats = {k: (torch.where(rows, math.nan, hf), m) for k, (hf, m) in self.mats.items()}

    def _matrix_rows(self, key, h: torch.Tensor, active: torch.Tensor):
        """The Newton matrix I - h key J (or "A": I - h (A ⊗ J)) of every row: refactorised
        for the active rows whose step moved by more than ``REFACTOR`` from the one it was
        made for (or that have none), the others' kept."""
        got = self.mats.get(key)
        if got is not None:
            hf, m = got
            need = active & ~((h / hf - 1.0).abs() <= REFACTOR)
            if not bool(need.any()):
                return m
        new = NewtonMatrix(self.J, h, self.A if key == "A" else key, self.stats,
                           gmres_rtol=1e-3)
        if got is not None:
            new.lu = torch.where(need[:, None, None], new.lu, m.lu)
            new.piv = torch.where(need[:, None], new.piv, m.piv)
            h = torch.where(need, h, hf)
        self.mats[key] = (h, new)
        return new

    def _step_rows(self, t, y, h, times) -> torch.Tensor:
        live = h != 0
        yd = y.detach()
        renew = live & (self.J_stale & ~self._fresh_rows(t, yd)) if self.J is not None \
            else torch.ones_like(live)
        if bool(renew.any()):
            self._jacobian_rows(t, yd, renew)
        with torch.no_grad():
            failed = self._stages(yd, h, times, _Rows(self, live))
            retry = failed & ~self._fresh_rows(t, yd)  # a Jacobian from an earlier step
            if bool(retry.any()):
                self._jacobian_rows(t, yd, retry)
                failed = (failed & ~retry) | self._stages(yd, h, times, _Rows(self, retry))
        self.J_stale = self.J_stale | failed
        self.failed = failed
        if self.graph:
            self._exact_step(t, y, h, times)
        hc = column(h, y)
        self.y1 = torch.addcmul(y, hc, torch.tensordot(self.b, self.K, 1)) if not self.graph \
            else y + hc * sum(self.K[j] * bj for j, bj in self.b_nz)
        return self.y1

    def _scale(self, y):
        """The Newton tolerance scale of the head components (per row for (B, n))."""
        yh = y[..., : self.head].abs()
        sc = self.norm.scale(y.abs())[..., : self.head]
        if not yh.numel():
            return sc
        floor = (10 * self.eps) * (yh + math.sqrt(self.eps) * yh.amax(-1, keepdim=True))
        return torch.maximum(sc, floor)

    def _stages(self, y, h, times, job):
        """Converge the stages of an attempt (no graph): K (s, ..., n) and Z (s, ..., head),
        for one problem ((n,) state, float h; ``job`` a ``_OneProblem``) or per sample ((B, n),
        (B,) h; ``job`` a ``_Rows``), which keeps them. Returns ``job.result``."""
        s, head, n, f = self.s, self.head, self.n, self._f
        scale = self._scale(y)
        hc = column(h, y)
        K = y.new_zeros((s,) + y.shape)
        Z = y.new_zeros((s,) + y.shape[:-1] + (head,))
        f0 = self.f0.detach()
        worst = 0.0  # the slowest contraction rate of the attempt's converged solves

        def converge(residual, z0, key, sc, at):
            """Newton's z, None where the attempt ends (``job.stop``)."""
            nonlocal worst
            res = newton(residual, z0, job.matrix(key, h), sc, tol=self.kappa,
                         max_iters=self.max_iters, stats=self.stats, eta=self.eta,
                         active=job.active)
            if job.stop(res, at):
                return None
            self.eta = where(job.going, _eta(res.rate), self.eta)
            worst = where(job.going & isfinite(res.rate), maximum(worst, res.rate), worst)
            return res.z

        def quadrature(i, z):  # the components outside the Newton solve (head < n)
            if head < n:
                K[i, ..., head:] = f(times[i], self._full(y, z))[..., head:]

        if self.tab.diagonal:
            for i in range(s):
                gi = float(self.a[i, i])
                base = self._stage_base(i, self._head(K[:i]), hc)
                if gi == 0.0:  # explicit stage (the first one of an ESDIRK / trapezoid)
                    K[i] = f0 if i == 0 else f(times[i], self._full(y, base))
                    Z[i] = base
                    continue
                hg = column(h * gi, y)
                prev = self._head(K[i - 1] if i else f0)
                z = converge(self._stage_residual(y, times[i], base, hg), base + hg * prev, gi,
                             scale, f"at stage {i + 1} of {s}")
                if z is None:
                    return job.result
                Z[i] = z
                self._head(K[i])[...] = (z - base) / divisor(hg)
                quadrature(i, z)
        else:  # all stages in one Newton system (per sample: one per row, (B, s head))
            def residual(zp):
                Zc = job.unpack(zp)
                return job.pack(Zc - hc * _mix(self.A, self._stage_f(times, y, Zc)))
            zp = converge(residual, job.pack((hc * self.c_col) * self._head(f0)), "A",
                          job.pack(scale.expand((s,) + scale.shape)), f"(all {s} stages)")
            if zp is None:
                return job.result
            Z = job.unpack(zp)
            self._head(K)[...] = _mix(self.A_inv, Z) / divisor(hc)
            for i in range(s if head < n else 0):
                quadrature(i, Z[i])
        self.J_stale = self.J_stale | (job.going & (worst > SLOW_RATE))
        job.keep(K, Z)
        return job.result

    def _exact_step(self, t, y, h, times) -> None:
        """Replace the converged stages by one exact Newton step with a graph (implicit
        function theorem; see the module docstring)."""
        s, f, Z = self.s, self._f, self.Z
        yd = y.detach()
        with torch.no_grad():
            Js = [None if (self.tab.diagonal and self.a[i, i] == 0) else
                  self.jac(times[i] if self.batch else float(times[i]),
                           self._full(yd, Z[i]))
                  for i in range(s)]
        hc = column(h, y)  # per sample: each row's own h (0 for a finished row)
        if self.tab.diagonal:  # (graphs are for the head = n problems: no quadrature)
            Kg: list[torch.Tensor] = []
            for i in range(s):
                gi = float(self.a[i, i])
                base = self._stage_base(i, torch.stack(Kg) if i else None, hc)
                if gi == 0.0:
                    Kg.append(self.f0 if i == 0 else f(times[i], self._full(y, base)))
                    continue
                hg = hc * gi
                zs = Z[i]
                r = self._stage_residual(y, times[i], base, hg)(zs)
                Mi = StageMatrix([Js[i]], hg, torch.ones(1, 1, dtype=y.dtype), self.gmres_rtol)
                z = zs - Mi.solve(r.unsqueeze(0))[0]
                Kg.append((z - base) / divisor(hg))
            self.K = torch.stack(Kg)
        else:
            M = StageMatrix(Js, h, self.A, self.gmres_rtol)
            Zg = Z - M.solve(Z - hc * _mix(self.A, self._stage_f(times, y, Z)))
            self.K = _mix(self.A_inv, Zg) / divisor(hc)

    def error(self) -> torch.Tensor:
        """sum_i b_err_i k_i of the last attempt (the controller multiplies by h)."""
        K = self.K.detach() if self.graph else self.K
        return torch.tensordot(self.b_err, K, 1) if self.batch else torch.mv(K.t(), self.b_err)

    # -- after an accepted step ---------------------------------------------------------
    def end_derivative(self, t1_time, y1: torch.Tensor) -> torch.Tensor:
        """f(t1, y1): the last stage of a stiffly accurate method, else one evaluation."""
        if self.f1_known:
            return self.f1
        if self.fsal:
            self.f1 = self.K[self.s - 1]
        else:
            self.f1 = self.rhs.at(t1_time, y1)
        self.f1_known = True
        return self.f1

    def prepare_interp(self, t1_time, y1) -> None:
        if not self.linear:
            self.end_derivative(t1_time, y1)

    def interpolate(self, y: torch.Tensor, h, thetas, row: int | None = None):
        """See ``rk.RKStepper.interpolate``: a list of fractions -> a list of states; per
        sample (B, m) fractions -> (B, m, n); ``row`` b: one sample's step alone."""
        if self.linear:
            return chord(y, self.y1 if row is None else self.y1[row], thetas)
        if row is not None:
            return hermite(y, self.y1[row], self.f0[row], self.f1[row], h, thetas)
        return hermite(y, self.y1, self.f0, self.f1, h, thetas)

    # -- per sample: the recorded steps of a dense solution (``batched.BatchedDense``) --
    def record_stages(self) -> torch.Tensor:
        """(f0, f1) of the last attempt (the chord needs neither: f0 alone)."""
        return self.f0[None] if self.linear else torch.stack([self.f0, self.f1])

    def dense_rows(self, y, y1, h, stages, theta) -> torch.Tensor:
        if self.linear:
            return chord(y, y1, theta[:, None])[:, 0]
        return hermite(y, y1, stages[:, 0], stages[:, 1], h, theta[:, None])[:, 0]

    def take(self, idx) -> None:
        """Keep the rows ``idx`` (a per-sample batch shrinks)."""
        for name in ("f0", "f1", "y1", "J", "J_t", "J_y", "J_stale", "eta", "failed"):
            v = getattr(self, name, None)
            if isinstance(v, torch.Tensor):
                setattr(self, name, v[idx])
        for name in ("K", "Z"):
            v = getattr(self, name, None)
            if v is not None:
                setattr(self, name, v[:, idx])
        for key, (hf, m) in self.mats.items():
            m.lu, m.piv, m.J = m.lu[idx], m.piv[idx], m.J[idx]
            self.mats[key] = (hf[idx], m)

    def segment(self, y: torch.Tensor, h: float):
        if self.linear:
            return ChordSegment(y, self.y1)
        return HermiteSegment(y, self.y1, self.f0, self.f1, h)

    def restart(self) -> None:
        """After a discontinuity or a state jump: re-evaluate J at the next step."""
        self.J_stale = True

    def advance(self, f_next: torch.Tensor | None = None, accept=None) -> None:
        """The next first stage: ``f_next``, or f(t1, y1) of the accepted step (per sample
        in the rows ``accept`` only)."""
        new = f_next if f_next is not None else (self.K[self.s - 1] if self.fsal else self.f1)
        self.f0 = new if accept is None else torch.where(accept[:, None], new, self.f0)

    # -- replay (gradient="checkpoint") -------------------------------------------------
    def carry(self):
        """(tensors, plain data) the next attempt depends on besides its start state: the
        first derivative; the Jacobian in use and where it was evaluated, whether it is
        stale, the factorised Newton matrices (and the step sizes they were made for) and
        the contraction estimate, so that a replayed step repeats the Newton iterations."""
        return [self.f0], (self.J, self.J_t, self.J_y, self.J_stale, dict(self.mats), self.eta)

    def resume(self, rhs, y, carry, graph) -> None:
        tensors, (J, J_t, J_y, stale, mats, eta) = carry
        self.start(rhs, y, tensors[0], graph)
        self.J, self.J_t, self.J_y, self.J_stale = J, J_t, J_y, stale
        self.mats, self.eta = dict(mats), eta


def _eta(rate):
    """The contraction estimate theta / (1 - theta) carried to the next Newton solve from a
    converged one's rate (a float, or per row; nan: none, after a single iteration)."""
    ok = isfinite(rate) & (rate < 1)
    return where(ok, maximum(rate / where(ok, 1 - rate, 1.0), 1e-16), math.nan)


def _mix(coeffs: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """sum_j coeffs_j X_j over X's first dimension (coeffs (i,) or (s, i)): a matrix product for
    one problem's (i, n) stages (tensordot's differs in the last bit for n = 1), tensordot for
    the (i, B, n) stages of a batch."""
    return coeffs @ X if X.dim() == 2 else torch.tensordot(coeffs, X, 1)


class _OneProblem:
    """How ``ImplicitRKStepper._stages`` runs for one problem: the first Newton solve that
    fails ends the attempt (``result``: why); a fully implicit tableau's stages (s, head) are
    Newton's unknowns as they are."""

    # no rows: every solve must converge (per sample: the rows solving, the failed rows)
    active: Any = None
    going: Any = True
    result: Any = None

    def __init__(self, stepper: ImplicitRKStepper):
        self.stepper, self.matrix = stepper, stepper._matrix

    def stop(self, res, at: str) -> bool:
        self.result = None if res.converged else f"{res.reason} {at}"
        return not res.converged

    def pack(self, Z: torch.Tensor) -> torch.Tensor:
        return Z

    unpack = pack

    def keep(self, K, Z) -> None:
        self.stepper.K, self.stepper.Z = K, Z


class _Rows(_OneProblem):
    """Per sample: the rows ``active`` (a (B,) mask) solve, each with its own Newton matrices
    and verdict; a row whose solve fails stops there, marked in ``result``, and the others go
    on; a row's fully implicit stages are one vector of unknowns, (B, s n); the stages replace
    the active rows' in the stepper's K and Z."""

    def __init__(self, stepper: ImplicitRKStepper, active: torch.Tensor):
        self.stepper, self.rows, self.active, self.going = stepper, active, active, active
        self.result = torch.zeros_like(active)

    def matrix(self, key, h):
        return self.stepper._matrix_rows(key, h, self.active)

    def stop(self, res, at: str) -> bool:
        self.result = self.result | (self.active & ~res.converged)
        self.active = self.going = self.active & res.converged
        return False

    def pack(self, Z: torch.Tensor) -> torch.Tensor:  # (s, B, n) -> (B, s n)
        return Z.transpose(0, 1).reshape(Z.shape[1], -1)

    def unpack(self, z: torch.Tensor) -> torch.Tensor:
        return z.view(z.shape[0], self.stepper.s, -1).transpose(0, 1)

    def keep(self, K, Z) -> None:
        st, keep = self.stepper, self.rows[None, :, None]
        if st.K is None or st.K.shape != K.shape:
            st.K, st.Z = K, Z
        else:
            st.K, st.Z = torch.where(keep, K, st.K), torch.where(keep, Z, st.Z)


# ----------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------
class _ImplicitMethod(Method):
    """What the fixed-grid and the adaptive implicit methods share (the stepper: per sample
    batched, each row its own Jacobian, LU and Newton)."""

    tableau: ImplicitTableau
    tensor_clock = True

    @classmethod
    def check(cls, o: dict) -> None:
        super().check(o)
        _positive_int(cls.name, "max_iters", o["max_iters"])
        check_jacobian_option(cls.name, o["jacobian"])

    @classmethod
    def make_stepper(cls, o: dict, norm: ErrorNorm):
        return ImplicitRKStepper(cls.tableau, norm, o["jacobian"], o["max_iters"],
                                 linear=o.get("interp") == "linear", name=cls.name)


class FixedGridImplicitRK(_ImplicitMethod, FixedGridMethod):
    """Fixed-grid implicit Runge–Kutta (Newton with the Jacobian)."""

    OPTIONS: ClassVar[dict[str, Any]] = dict(FixedGridMethod.OPTIONS, max_iters=100,
                                             **JACOBIAN_OPTIONS)

    @classmethod
    def describe(cls) -> str:
        t = cls.tableau
        return f"fixed grid, implicit, order {t.order}, {t.stages} stages, {t.stiff_decay}"


class AdaptiveImplicitRK(_ImplicitMethod, AdaptiveRK):
    """Adaptive ESDIRK pair with Newton stages, Jacobian reuse and Hermite dense output.
    ``step_to_outputs``: see ``methods.STEP_TO_OUTPUTS_DOC``."""

    OPTIONS: ClassVar[dict[str, Any]] = dict(IMPLICIT_ADAPTIVE_OPTIONS, max_iters=10,
                                             **JACOBIAN_OPTIONS, **STIFF_OUTPUT_OPTIONS)

    @classmethod
    def describe(cls) -> str:
        t = cls.tableau
        return (f"adaptive, implicit (ESDIRK), order {t.order}({t.error_order}), {t.stages} "
                f"stages, {t.stiff_decay}, dense output: cubic Hermite")


_DOCS = {
    "implicit_euler": "implicit (backward) Euler (order 1, L-stable), fixed grid",
    "implicit_midpoint": "implicit midpoint rule (order 2, A-stable), fixed grid",
    "trapezoid": "trapezoidal rule (order 2, A-stable), fixed grid",
    "radauIIA3": "Radau IIA, 2 stages (order 3, L-stable), fixed grid",
    "gl4": "Gauss–Legendre, 2 stages (order 4, A-stable), fixed grid",
    "radauIIA5": "Radau IIA, 3 stages (order 5, L-stable), fixed grid",
    "gl6": "Gauss–Legendre, 3 stages (order 6, A-stable), fixed grid",
    "sdirk2": "SDIRK, 2 stages (order 2, L-stable), fixed grid",
    "trbdf2": "TR-BDF2 (order 2, L-stable), fixed grid",
    "kvaerno3": "Kvaerno ESDIRK 3(2) (L-stable), adaptive, for stiff problems",
    "kvaerno4": "Kvaerno ESDIRK 4(3) (L-stable), adaptive, for stiff problems",
    "kvaerno5": "Kvaerno ESDIRK 5(4) (L-stable), adaptive, for stiff problems",
}


def _method(tab: ImplicitTableau):
    base = AdaptiveImplicitRK if tab.adaptive else FixedGridImplicitRK
    return type(tab.name[0].upper() + tab.name[1:].replace("_", ""), (base,),
                {"name": tab.name, "tableau": tab, "__doc__": _DOCS[tab.name],
                 "order": tab.order})


METHODS = {name: _method(tab) for name, tab in IMPLICIT_TABLEAUX.items()}

__all__ = ["IMPLICIT_TABLEAUX", "METHODS", "AdaptiveImplicitRK", "FixedGridImplicitRK",
           "ImplicitRKStepper", "ImplicitTableau", "StageMatrix", "make_jacobian_source"]
