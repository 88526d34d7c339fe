"""Variable-step, variable-order linear multistep methods in Nordsieck form: ``adams``
(Adams–Moulton corrector with a polynomial-extrapolation predictor, PECE, orders 1-12) and,
in ``bdf.py``, ``bdf`` (backward differentiation formulas, orders 1-5, Newton corrector).

Both methods share everything here: the history is the Nordsieck array of a step of size h
at t_n, ``Z[j] = h^j y^(j)(t_n) / j!`` (j = 0..q), i.e. the coefficients of the polynomial
``P(s) = sum_j Z[j] s^j``, s = (t - t_n) / h, whose derivative ``h dP/dt = P'(s)`` in these
units. One step (Gear; Byrne & Hindmarsh, ACM TOMS 1 (1975); the scheme of LSODE):

* predict: ``Z_pred = A Z`` (A the Pascal matrix: the same polynomial about t_n + h);
* correct: ``Z_new = Z_pred + l e`` with e a vector of the state's size chosen so that
  ``P_new'(0) = h f(t_n+1, P_new(0))`` (Adams: one evaluation at the predicted state;
  BDF: Newton's method); the polynomial ``l(s)`` of the method makes ``P_new`` keep the
  method's memory: BDF of order q keeps the values at s = -1..-q (then ``P_new`` is the BDF
  interpolant), Adams keeps the value at s = -1 and the derivatives at s = -1..-(q-1);
* a change of step size rescales ``Z[j] *= r^j`` (the polynomial is kept: the method is the
  constant-step formula applied to interpolated history, "quasi-constant step size");
* order q -> q-1 removes the s^q term by subtracting a multiple of the monic polynomial that
  vanishes on what the order-(q-1) method needs (no information is invented); q -> q+1
  adds the degree-(q+1) term that restores the one further memory condition from the
  previous step's polynomial (the predicted one);
* local error of order k: ``C_k h^(k+1) y^(k+1)`` with the error constant C_k of the formula
  (Adams–Moulton: |gamma*_k|; BDF: 1 / (k+1), what a step adds to the global error), where
  ``h^(q+1) y^(q+1) ~ q! l_q e`` (the change of the top Nordsieck entry),
  ``h^q y^(q) ~ q! Z[q]`` and ``h^(q+2) y^(q+2) ~`` the difference of two successive
  ``q! l_q e``; the controller (``MultistepController``) picks the order and step size from
  the three estimates (orders q-1, q, q+1) as LSODE does, holding h and q for q+1 steps
  after every change (this keeps BDF's Newton matrix valid for many steps); ``bdf``
  replaces the step factor of an estimate (``MultistepController._factor``) by its own
  (``bdf.BDFController``).

Dense output is the step's polynomial ``P_new`` on s in [-1, 0]: it passes through y_n and
(BDF: exactly; Adams: by the memory condition) through y_n-1, so outputs between steps cost
no evaluations. Every operation is out of place: backpropagation through a solve gives the
gradient of the discrete solution (``adams``: of the explicit PECE arithmetic, including
both evaluations of f; ``bdf``: see ``bdf.py``).
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache
from typing import Any, ClassVar

import torch

from neuralode.solvers.controllers import ErrorNorm, PIDController, StepBounds
from neuralode.solvers.methods import (
    COMMON_OPTIONS,
    Method,
    _positive_int,
    check_dtype_and_norm,
)
from neuralode.solvers.timekeeping import time_dtype

MAX_ADAMS_ORDER = 12
MAX_BDF_ORDER = 5

# -- exact coefficients (rational arithmetic, once per family and order) --------------------


def _val(a: Fraction, length: int) -> list[Fraction]:
    """Weights of the functional p -> p(a) on coefficient vectors of the given length."""
    return [a ** j if j or a else Fraction(1) for j in range(length)]


def _der(a: Fraction, length: int) -> list[Fraction]:
    """Weights of p -> p'(a)."""
    return [Fraction(0)] + [j * (a ** (j - 1) if j > 1 else Fraction(1)) for j in range(1, length)]


def _solve(rows: list[list[Fraction]], rhs: list[Fraction]) -> list[Fraction]:
    """Gaussian elimination in exact arithmetic (small square systems)."""
    n = len(rows)
    m = [list(r) + [b] for r, b in zip(rows, rhs)]
    for c in range(n):
        p = next(r for r in range(c, n) if m[r][c] != 0)
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c and m[r][c] != 0:
                f = m[r][c] / m[c][c]
                m[r] = [a - f * b for a, b in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] for i in range(n)]


def _functionals(family: str, q: int, length: int):
    """(state, memory, extra) of the order-q method, as weight vectors of the given length.
    state: what a corrected polynomial of order q satisfies besides nothing else (q+1
    conditions that determine it); memory: what the corrector keeps from the prediction;
    extra: the further memory condition of order q+1, kept by the previous polynomial."""
    F = Fraction
    if family == "bdf":
        state = [_val(F(-i), length) for i in range(q + 1)]
        memory = [_val(F(-i), length) for i in range(1, q + 1)]
        extra = _val(F(-(q + 1)), length)
    else:
        state = [_val(F(0), length)] + [_der(F(-i), length) for i in range(q)]
        memory = [_val(F(-1), length)] + [_der(F(-i), length) for i in range(1, q)]
        extra = _der(F(-q), length)
    return state, memory, extra


def _dot(w, z) -> Fraction:
    return sum((a * b for a, b in zip(w, z)), Fraction(0))


def _error_constant(family: str, q: int) -> Fraction:
    """C_q: what one step adds to the global error is C_q h^(q+1) y^(q+1). BDF: 1/(q+1),
    the formula's truncation error 1/((q+1) H_q) divided by gamma = 1/H_q (the BDF
    recursion passes on a fraction of each step's error to the next ones, so the global
    error grows by the truncation error / gamma per step; as scipy's BDF estimate)."""
    if family == "bdf":
        return Fraction(1, q + 1)
    # Adams–Moulton: gamma*_0 = 1, sum_{j=0}^{k} gamma*_j / (k + 1 - j) = 0
    g = [Fraction(1)]
    for k in range(1, q + 1):
        g.append(-sum(g[j] / (k + 1 - j) for j in range(k)))
    return abs(g[q])


@cache
def order_data(family: str, q: int) -> dict[str, Any]:
    """Python-float coefficients of the order-q method of ``family`` ("adams" or "bdf")."""
    F = Fraction
    n = q + 1
    _, memory, extra = _functionals(family, q, n)
    # corrector polynomial l: vanishes on the memory, l'(0) = 1
    ell = _solve(memory + [_der(F(0), n)], [F(0)] * len(memory) + [F(1)])
    out: dict[str, Any] = {"l": [float(x) for x in ell], "l_top": ell[q]}
    if family == "adams":
        # after the final evaluation f(t_n+1, y_n+1): replace P'(0) keeping y_n+1 and the
        # past derivatives
        keep = [_val(F(0), n)] + [_der(F(-i), n) for i in range(1, q)]
        lt = _solve(keep + [_der(F(0), n)], [F(0)] * len(keep) + [F(1)])
        out["ltil"] = [float(x) for x in lt]
    out["C"] = float(_error_constant(family, q))
    out["fact"] = float(math.factorial(q))
    # q -> q+1: Q monic of degree q+1, vanishing on the order-q state
    st_up, _, _ = _functionals(family, q, n + 1)
    rows = [w[:n] for w in st_up]
    rhs = [-w[n] for w in st_up]
    Q = _solve(rows, rhs) + [F(1)]
    _, _, extra_up = _functionals(family, q, n + 1)
    out["Q"] = [float(x) for x in Q]
    out["phi"] = [float(x) for x in extra]  # on the degree-q polynomials
    out["phi_Q"] = float(_dot(extra_up, Q))
    # q -> q-1: D monic of degree q vanishing on the order-(q-1) state
    if q > 1:
        st_dn, _, _ = _functionals(family, q - 1, n)
        D = _solve([w[:q] for w in st_dn], [-w[q] for w in st_dn]) + [F(1)]
        out["D"] = [float(x) for x in D]
    # Pascal matrix: coefficients of P(s + 1)
    out["A"] = [[float(math.comb(j, i)) for j in range(n)] for i in range(n)]
    return out


class _Coefficients:
    """``order_data`` as tensors of one dtype and device (made once per solve)."""

    def __init__(self, family: str, max_order: int, dtype, device):
        self.by_order = {}
        for q in range(1, max_order + 1):
            d = order_data(family, q)
            t = {k: torch.tensor(d[k], dtype=dtype, device=device)
                 for k in ("l", "A", "Q", "phi") + (("ltil",) if "ltil" in d else ())
                 + (("D",) if "D" in d else ())}
            t["l_col"] = t["l"].unsqueeze(1)
            if "ltil" in t:
                t["ltil_col"] = t["ltil"].unsqueeze(1)
            t.update({k: d[k] for k in ("C", "fact", "phi_Q")})
            t["l0"] = d["l"][0]
            t["delta_factor"] = d["fact"] * float(d["l_top"])  # q! l_q
            self.by_order[q] = t


# -- the step record the controller reads ------------------------------------------------------


class MultistepError:
    """What one attempt tells the controller: local error estimates of orders q-1, q, q+1
    (absolute, state-shaped tensors; None where not available) and how many steps the
    current order and step size have been held. The controller writes back ``next_order``."""

    __slots__ = ("err", "err_hi", "err_lo", "held", "iterations", "max_order", "next_order",
                 "orders", "q")

    def __init__(self, q, err, err_lo, err_hi, held, max_order, iterations=None):
        self.q, self.err, self.err_lo, self.err_hi = q, err, err_lo, err_hi
        self.held, self.max_order = held, max_order
        self.iterations = iterations  # BDF: (Newton iterations of the corrector, the limit)
        self.next_order = q
        self.orders: dict[int, int] = {}  # the solve's count of accepted steps per order


# -- the shared stepper ------------------------------------------------------------------------


class NordsieckSegment:
    """The interpolating polynomial of one accepted step (dense solutions)."""

    __slots__ = ("Z",)

    def __init__(self, Z):
        self.Z = Z

    def evaluate(self, thetas) -> torch.Tensor:
        return _eval_poly(self.Z, thetas)


def _eval_poly(Z: torch.Tensor, thetas) -> torch.Tensor:
    """P(theta - 1) for the Nordsieck array Z of the step (weights formed in float64, or
    float32 on a device without float64: ``timekeeping.time_dtype``)."""
    k = Z.shape[0]
    V = torch.tensor([[(th - 1.0) ** j for j in range(k)] for th in thetas],
                     dtype=time_dtype(Z.device), device=Z.device)
    return V.to(Z.dtype) @ Z


class _Decision:
    """The controller's choice recorded for an accepted attempt (see ``redo_decision``)."""

    def __init__(self, next_order: int):
        self.next_order = next_order


class NordsieckStepper:
    """The machinery shared by ``adams`` and ``bdf``; subclasses provide ``_correct``
    (the corrector of one attempt) and the family name.

    Per solve: ``start``; per attempt ``step(t, y, h)`` -> y1 from the committed history;
    ``error()`` -> a ``MultistepError``; ``advance`` commits an accepted attempt (with the
    order the controller chose); ``restart`` drops the history (order 1 next)."""

    family = ""
    fsal = False

    def __init__(self, max_order: int):
        self.max_order = max_order

    # -- per solve ------------------------------------------------------------------------
    def start(self, rhs, y0: torch.Tensor, f0: torch.Tensor, graph: bool) -> None:
        self.rhs = rhs
        self.graph = graph
        self.co = _Coefficients(self.family, self.max_order, y0.dtype, y0.device).by_order
        self.f0 = f0
        self.Z = None  # committed Nordsieck array (None: start from (y, h f0) at order 1)
        self.q = 1
        self.hZ = math.nan  # the step size Z is scaled to
        self.delta_prev = None  # q! l_q e of the last accepted step (order q, step hZ)
        self.held = 0  # accepted steps since the last change of order or step size
        self.record = None
        # accepted steps per order, in the solve's statistics
        self.orders_used: dict[int, int] = rhs.stats.extra.setdefault("orders_used", {})
        self.pending = None
        self.pending_retry = False
        self._restart = False
        self.f1 = None

    def _f(self, t1: float, y, left_end):
        return self.rhs.call(t1, y) if left_end is None else self.rhs.call_at(left_end(t1), y)

    def _history(self, y: torch.Tensor, h: float) -> tuple[torch.Tensor, int]:
        """The committed history at the order of this attempt, scaled to step h."""
        if self.Z is None:
            return torch.stack([y, self.f0 * h]), 1
        Z, q = self.Z, self.q
        if self.record is not None and self.record.next_order < q and self.pending_retry:
            while q > self.record.next_order:  # a rejected attempt asked for a lower order
                Z = self._decrease(Z, q)
                q -= 1
        if h != self.hZ:
            r = h / self.hZ
            pw = torch.tensor([r ** j for j in range(q + 1)], dtype=Z.dtype, device=Z.device)
            Z = Z * pw.unsqueeze(1)
        return Z, q

    def _decrease(self, Z: torch.Tensor, q: int) -> torch.Tensor:
        D = self.co[q]["D"]
        return Z[:q] - D[:q].unsqueeze(1) * Z[q].unsqueeze(0)

    def step(self, t: float, y: torch.Tensor, h: float, left_end=None) -> torch.Tensor:
        Z, q = self._history(y, h)
        c = self.co[q]
        Zp = c["A"] @ Z
        Zn, e = self._correct(t, h, Zp, q, c, left_end)
        delta = e * c["delta_factor"]
        self.pending = (Zn, Zp, q, h, delta)
        self.pending_retry = True
        return Zn[0]

    def error(self) -> MultistepError:
        Zn, _, q, h, delta = self.pending
        with torch.no_grad():
            delta = delta.detach()
            err = delta * self.co[q]["C"]
            err_lo = None
            if q > 1:
                err_lo = Zn[q].detach() * (self.co[q - 1]["C"] * self.co[q]["fact"])
            err_hi = None
            if (q < self.max_order and self.delta_prev is not None and self.Z is not None
                    and self.q == q):
                r = h / self.hZ
                d2 = delta - self.delta_prev * (r ** (q + 1))
                err_hi = d2 * self.co[q + 1]["C"]
        same = self.Z is not None and self.q == q and h == self.hZ
        held = self.held + 1 if same else 1
        self.record = MultistepError(q, err, err_lo, err_hi, held, self.max_order,
                                     self._iterations())
        self.record.orders = self.orders_used
        return self.record

    # -- after an accepted attempt ---------------------------------------------------------
    def end_derivative(self, t1_time, y1):
        if self.f1 is None:
            self.f1 = self.rhs.at(t1_time, y1)
        return self.f1

    def prepare_interp(self, t1_time, y1) -> None:
        """Nothing to do: the step's polynomial is the interpolant."""

    def interpolate(self, y, h, thetas):
        Zn = self.pending[0]
        return list(_eval_poly(Zn, thetas).unbind(0))

    def segment(self, y, h):
        return NordsieckSegment(self.pending[0])

    def restart(self) -> None:
        self._restart = True

    def _final(self, Zn, q, h):
        """The committed polynomial of an accepted attempt (Adams: after f(t1, y1))."""
        return Zn

    def advance(self, f_next) -> None:
        Zn, Zp, q, h, delta = self.pending
        self.pending_retry = False
        rec = self.record
        same = self.Z is not None and self.q == q and h == self.hZ
        if self._restart or f_next is not None:
            self._restart = False
            self.f0 = f_next if f_next is not None else self.f1
            self.Z, self.q, self.hZ, self.delta_prev, self.held = None, 1, math.nan, None, 0
            self.record, self.f1 = None, None
            return
        Z = self._final(Zn, q, h)
        self.f1 = None
        self.held = self.held + 1 if same else 1
        nq = rec.next_order if rec is not None else q
        self.delta_prev = delta.detach()  # only the error estimates use it
        if nq == q + 1 and q < self.max_order:
            c = self.co[q]
            cc = ((c["phi"] @ Zp - c["phi"] @ Z) / c["phi_Q"])
            Z = torch.cat([Z + c["Q"][:q + 1].unsqueeze(1) * cc.unsqueeze(0),
                           cc.unsqueeze(0)])
            q += 1
            self.delta_prev = None
            self.held = 0
        elif nq < q:
            while q > nq:
                Z = self._decrease(Z, q)
                q -= 1
            self.delta_prev = None
            self.held = 0
        self.Z, self.q, self.hZ = Z, q, h
        self.record = None

    def _correct(self, t, h, Zp, q, c, left_end):
        raise NotImplementedError

    def _iterations(self):
        """(iterations, limit) of an implicit corrector's last solve; None: explicit."""
        return None

    # -- replay (gradient="checkpoint") -------------------------------------------------
    def carry(self):
        """(tensors, plain data) the next attempt depends on besides its start state: the
        first derivative, the Nordsieck history and the last error-difference vector; the
        order, the step size the history is scaled to, the steps held, the last error
        record (the order a rejected attempt asked for) and the restart flags."""
        tensors = [self.f0]
        if self.Z is not None:
            tensors.append(self.Z)
        if self.delta_prev is not None:
            tensors.append(self.delta_prev)
        meta = (self.Z is not None, self.delta_prev is not None, self.q, self.hZ, self.held,
                self.record, self.pending_retry, self._restart, self._carry_extra())
        return tensors, meta

    def resume(self, rhs, y, carry, graph) -> None:
        tensors, (has_z, has_d, q, hZ, held, record, retry, restart, extra) = carry
        self.start(rhs, y, tensors[0], graph)
        self.Z = tensors[1] if has_z else None
        self.delta_prev = tensors[1 + has_z] if has_d else None
        self.q, self.hZ, self.held, self.record = q, hZ, held, record
        self.pending_retry, self._restart = retry, restart
        self._resume_extra(extra)

    def decision(self):
        """What the controller decided for an accepted attempt besides its step size: the
        order of the next step (None: keep the order)."""
        return None if self.record is None else self.record.next_order

    def redo_decision(self, next_order) -> None:
        """A replayed accepted attempt (no error estimate, no controller): the order the
        forward solve's controller chose."""
        self.record = _Decision(next_order)

    def _carry_extra(self):
        return None

    def _resume_extra(self, extra) -> None:
        pass


class AdamsPECEStepper(NordsieckStepper):
    """Adams predictor–corrector in PECE mode: predict (the history polynomial
    extrapolated), evaluate f there, correct (Adams–Moulton of order q), evaluate f at the
    corrected state (done after acceptance, ``end_derivative``; it becomes the history's
    derivative at t_n+1). Two evaluations per step; explicit arithmetic, so
    backpropagation differentiates exactly the computed values."""

    family = "adams"

    def _correct(self, t, h, Zp, q, c, left_end):
        t1 = t + h
        f = self._f(t1, Zp[0], left_end)
        e = f * h - Zp[1]
        return Zp + c["l_col"] * e.unsqueeze(0), e

    def _final(self, Zn, q, h):
        f1 = self.f1  # the loop evaluated f(t1, y1) (end_derivative) before advance
        e2 = f1 * h - Zn[1]
        return Zn + self.co[q]["ltil_col"] * e2.unsqueeze(0)


# -- the controller ------------------------------------------------------------------------------


class MultistepController(StepBounds):
    """Order and step-size selection of ``adams``/``bdf`` (as LSODE): the attempt is accepted
    when the order-q error estimate is within the tolerances (RMS norm of
    err / (atol + rtol max(|y_n|, |y_n+1|))); after q+1 steps with the same order and step
    size, the next order is the one of q-1, q, q+1 that allows the largest step
    (factor 1 / (b_k r_k)^(1/(k+1)) with biases b = 1.3, 1.2, 1.4); a step-size increase
    below 10% is not made (the history and, for BDF, the Newton matrix stay valid); after
    the q+1 held steps an accepted step whose error asks for a smaller step (factor < 1)
    shrinks the next one (cheaper than the rejection that would likely follow)."""

    adaptive = True
    BIAS_LO, BIAS, BIAS_HI = 1.3, 1.2, 1.4
    UP_GROWTH = 2.0
    KEEP_BELOW = 1.0  # after the hold, a step factor in [KEEP_BELOW, 1.1) keeps h

    def __init__(self, norm: ErrorNorm, s: dict):
        self.norm = norm
        self.ifactor, self.dfactor = s["ifactor"], s["dfactor"]
        self.min_step, self.max_step, self.first = s["min_step"], s["max_step"], s["first_step"]
        self.start_order = 1  # the history starts at order 1
        self.absy = None
        self.nonfinite = False
        self.n_fail = 0

    def _factor(self, r: float, k: int, bias: float, rec: MultistepError) -> float:
        """The step-size factor that an error estimate r (in units of the tolerance) of a
        method of error order k (h^k) allows."""
        return 1.0 / ((bias * r) ** (1.0 / k) + 1e-6)

    def shrink(self, h: float, factor: float, direction: float) -> float:
        self.n_fail += 1
        return super().shrink(h, factor, direction)

    def judge(self, y1: torch.Tensor, rec: MultistepError, h: float,
              direction: float) -> tuple[bool, float]:
        absy1 = y1.detach().abs()
        scale = self.norm.scale(torch.maximum(self.absy, absy1))
        q = rec.q
        r = self.norm(rec.err, scale)
        if not math.isfinite(r):
            self.nonfinite = True
            self.n_fail += 1
            rec.next_order = 1
            if self.at_min_step(h):
                return False, math.nan
            return False, self.clamp(h * self.dfactor, direction)
        self.nonfinite = False
        accept = r <= 1.0 or self.at_min_step(h)
        fac = self._factor(r, q + 1, self.BIAS, rec)
        if not accept:
            self.n_fail += 1
            nq = q
            if rec.err_lo is not None:
                r_lo = self.norm(rec.err_lo, scale)
                fac_lo = self._factor(r_lo, q, self.BIAS_LO, rec)
                if fac_lo > fac:
                    fac, nq = fac_lo, q - 1
            if self.n_fail >= 3:
                nq = max(1, min(nq, q - 1))
            rec.next_order = nq
            fac = min(0.9, max(self.dfactor, fac))
            return False, self.clamp(h * fac, direction)
        self.n_fail = 0
        self.absy = absy1
        rec.orders[q] = rec.orders.get(q, 0) + 1
        nq = q
        if rec.held < q + 1:
            return True, h  # hold h and q for q+1 steps after a change
        if rec.err_lo is not None:
            r_lo = self.norm(rec.err_lo, scale)
            fac_lo = self._factor(r_lo, q, self.BIAS_LO, rec)
            if fac_lo > fac:
                fac, nq = fac_lo, q - 1
        if rec.err_hi is not None and q < rec.max_order:
            r_hi = self.norm(rec.err_hi, scale)
            fac_hi = self._factor(r_hi, q + 2, self.BIAS_HI, rec)
            if fac_hi > fac:
                # a long step extrapolates the history (and its errors, of the size of the
                # current order's error) far back: the higher order starts with at most
                # UP_GROWTH times the step the current order allows
                fac, nq = min(fac_hi, self.UP_GROWTH * max(fac, 1.0)), q + 1
        if self.KEEP_BELOW <= fac < 1.1 and nq == q:
            return True, h  # a change below 10% is not worth a new history and LU
        fac = min(self.ifactor, max(self.dfactor, fac))
        rec.next_order = nq
        hn = self.clamp(h * fac, direction)
        return True, hn


# -- method classes ----------------------------------------------------------------------------


class MultistepMethod(Method):
    """Base of ``adams``/``bdf``: options and their checks, the controller."""

    adaptive = True
    MAX_ORDER = MAX_ADAMS_ORDER
    CONTROL = ("first_step", "ifactor", "dfactor", "min_step", "max_step")
    OPTIONS: ClassVar[dict[str, Any]] = dict(
        COMMON_OPTIONS, first_step=None, ifactor=10.0, dfactor=0.2, min_step=0.0,
        max_step=math.inf, step_t=None, jump_t=None, norm=None, dtype=torch.float64)

    @classmethod
    def check(cls, o: dict) -> None:
        check_dtype_and_norm(cls.name, o)
        _positive_int(cls.name, "max_order", o["max_order"], cls.MAX_ORDER)
        s = {k: o[k] for k in cls.CONTROL}
        s.update(PIDController._validate(s, cls.name))
        o["_ms_settings"] = s

    @classmethod
    def make_controller(cls, o: dict, norm: ErrorNorm) -> MultistepController:
        return MultistepController(norm, o["_ms_settings"])


class Adams(MultistepMethod):
    """Adams–Moulton PECE, variable step, variable order 1..``max_order`` (default 12),
    Nordsieck form, for non-stiff problems at tight tolerances"""

    name = "adams"
    order = MAX_ADAMS_ORDER
    OPTIONS: ClassVar[dict[str, Any]] = dict(MultistepMethod.OPTIONS,
                                             max_order=MAX_ADAMS_ORDER)

    @classmethod
    def describe(cls) -> str:
        return ("adaptive, variable order 1-12 (max_order), Adams–Moulton PECE in Nordsieck "
                "form, 2 evaluations per step, dense output: the step's polynomial")

    @classmethod
    def make_stepper(cls, o: dict, norm: ErrorNorm):
        return AdamsPECEStepper(o["max_order"])


METHODS = {"adams": Adams}

__all__ = ["METHODS", "Adams", "AdamsPECEStepper", "MultistepController", "MultistepError",
           "MultistepMethod", "NordsieckStepper", "order_data"]
