"""Linear multistep steppers on a fixed grid: Adams–Bashforth (explicit) and
Adams–Bashforth–Moulton (predictor–corrector, PECE with up to ``max_iters`` corrections).

The first steps use the 3/8-rule RK4 until four derivatives are in the history; then the
order grows with the history up to ``max_order`` (1..12). Coefficients are computed for the
actual (possibly non-uniform) grid by integrating the Lagrange interpolant of the past
derivatives over the step, in exact rational arithmetic (cached), so a shortened last step
or an irregular grid keeps the method's order and order 12 loses no digits to a Vandermonde
solve. Outputs between grid points use the cubic Hermite interpolant through the
derivatives at the grid points (already in the history: no extra evaluations).
"""

from __future__ import annotations

import warnings
from fractions import Fraction
from functools import lru_cache

import torch

from neuralode.solvers.rk import ChordSegment, RKStepper, add_terms, chord
from neuralode.solvers.tableau import RK4_38

MAX_ADAMS_ORDER = 12
_RK_START = 4  # derivatives needed in the history before the multistep formula is used


@lru_cache(maxsize=512)
def _quadrature_weights(nodes: tuple[float, ...]) -> tuple[float, ...]:
    """Weights w_j with sum_j w_j p(x_j) = int_0^1 p(x) dx for all polynomials p of degree
    < len(nodes); nodes are in units of the step (the step runs from 0 to 1). Exact: the
    Lagrange basis polynomials are integrated in rational arithmetic."""
    xs = [Fraction(x) for x in nodes]
    weights = []
    for j, xj in enumerate(xs):
        poly = [Fraction(1)]  # coefficients, lowest degree first
        denom = Fraction(1)
        for m, xm in enumerate(xs):
            if m == j:
                continue
            poly = [Fraction(0)] + poly  # multiply by x
            for k in range(len(poly) - 1):
                poly[k] -= xm * poly[k + 1]
            denom *= xj - xm
        weights.append(float(sum(p / (k + 1) for k, p in enumerate(poly)) / denom))
    return tuple(weights)


def _weights(times, t: float, h: float) -> tuple[float, ...]:
    # round to keep the cache effective on uniform grids
    return _quadrature_weights(tuple(round((s - t) / h, 12) for s in times))


class HermiteSegment:
    """Cubic Hermite interpolant through (y0, f0) and (y1, f1) on one step."""

    __slots__ = ("f0", "f1", "h", "y0", "y1")

    def __init__(self, y0, y1, f0, f1, h):
        self.y0, self.y1, self.f0, self.f1, self.h = y0, y1, f0, f1, h

    def evaluate(self, thetas) -> torch.Tensor:
        return torch.stack(hermite(self.y0, self.y1, self.f0, self.f1, self.h, thetas))


def hermite(y0, y1, f0, f1, h, thetas):
    """The cubic Hermite interpolant at the step fractions ``thetas``: a list of floats ->
    a list of states; per sample (y0, y1, f0, f1 (B, n), h (B,), thetas (B, m) float64) ->
    (B, m, n)."""
    if isinstance(thetas, torch.Tensor):
        dt = y0.dtype
        return _hermite_at(*(v[:, None] for v in (y0, y1, f0, f1)), h.to(dt)[:, None, None],
                           thetas.to(dt)[..., None])
    return [_hermite_at(y0, y1, f0, f1, h, th) for th in thetas]


def _hermite_at(y0, y1, f0, f1, h, th):
    w0 = th - 2 * th**2 + th**3
    w1 = 3 * th**2 - 2 * th**3
    w2 = th**3 - th**2
    return y0 + (h * w0) * f0 + w1 * (y1 - y0) + (h * w2) * f1


class AdamsStepper:
    """Adams–Bashforth (``implicit=False``) or Adams–Bashforth–Moulton on a fixed grid."""

    fsal = False
    error_order = None

    def __init__(self, implicit: bool, max_order: int, max_iters: int = 4, conv_norm=None,
                 linear: bool = False):
        self.implicit = implicit
        self.linear = linear
        self.max_order = max_order
        self.max_iters = max_iters
        self.conv_norm = conv_norm
        self.order = max_order
        self.rk = RKStepper(RK4_38)

    def start(self, rhs, y0, f0, graph):
        self.rhs = rhs
        self.graph = graph
        self.hist_t: list[float] = []
        self.hist_f: list[torch.Tensor] = []
        self.f0 = f0
        self.f1 = None
        self.fresh = False
        self.warned = False
        self.rk_started = False

    def step(self, t, y, h, left_end=None):
        self.t, self.h, self.f1 = t, h, None
        t1 = t + h
        hist_t, hist_f = self.hist_t + [t], self.hist_f + [self.f0]
        if len(hist_t) < min(_RK_START, self.max_order):
            if self.rk_started:
                self.rk.advance(self.f0)  # the start-up steps share one stage buffer
            else:
                self.rk.start(self.rhs, y, self.f0, self.graph)
                self.rk_started = True
            y1 = self.rk.step(t, y, h, left_end)  # a new tensor (RK4_38 is not FSAL)
        else:
            k = min(len(hist_t), self.max_order)
            w = _weights(hist_t[-k:], t, h)
            y1 = _combine(y, w, hist_f[-k:], h)
            if self.implicit:
                y1 = self._correct(t1, y, h, hist_t, hist_f, y1, left_end)
        self.y1 = y1
        return y1

    def _correct(self, t1, y, h, hist_t, hist_f, y_pred, left_end):
        """Adams–Moulton corrector with nodes t1 and the last past ones (one order above the
        predictor, at most ``max_order``), iterated until the correction is within
        rtol/atol or ``max_iters`` is reached."""
        k = min(len(hist_t), self.max_order - 1)
        nodes = hist_t[-k:] + [t1] if k > 0 else [t1]
        w = _weights(nodes, self.t, h)
        fs_past = hist_f[-k:] if k > 0 else []
        t_eval = left_end(t1) if left_end is not None else None
        y_new = y_pred
        converged = False
        for _ in range(self.max_iters):
            f1 = self.rhs.call(t1, y_new) if t_eval is None else self.rhs.call_at(t_eval, y_new)
            y_next = _combine(y, w, fs_past + [f1], h)
            with torch.no_grad():
                converged = self.conv_norm(y_next.detach(), y_new.detach()) <= 1.0
            y_new = y_next
            if converged:
                break
        if not converged and not self.warned:
            self.warned = True
            warnings.warn(f"implicit_adams: the corrector did not converge to rtol/atol in "
                          f"max_iters={self.max_iters} iterations (first at t={t1:.6g}); the "
                          f"solution may be less accurate than the tolerances: use a smaller "
                          f"step_size or more max_iters", stacklevel=2)
        return y_new

    def error(self):
        raise NotImplementedError("the Adams steppers run on a fixed grid")

    def end_derivative(self, t1_time, y1):
        if self.f1 is None:
            self.f1 = self.rhs.at(t1_time, y1)
        return self.f1

    def prepare_interp(self, t1_time, y1) -> None:
        if not self.linear:
            self.end_derivative(t1_time, y1)

    def interpolate(self, y, h, thetas):
        if self.linear:
            return chord(y, self.y1, thetas)
        return hermite(y, self.y1, self.f0, self.f1, h, thetas)

    def segment(self, y, h):
        if self.linear:
            return ChordSegment(y, self.y1)
        return HermiteSegment(y, self.y1, self.f0, self.f1, h)

    def restart(self) -> None:
        """Forget the multistep history (after a jump of f or of the state): the next
        steps start again with RK4."""
        self.hist_t, self.hist_f = [], []
        self.fresh = True

    def advance(self, f_next):
        if self.fresh:
            self.fresh = False  # after a restart the last step's start is not history
        else:
            self.hist_t.append(self.t)
            self.hist_f.append(self.f0)
        if len(self.hist_t) >= self.max_order:
            del self.hist_t[0], self.hist_f[0]
        self.f0 = f_next if f_next is not None else self.f1

    # -- checkpointing (neuralode.checkpoint) ---------------------------------------------
    def carry(self):
        """(tensors, plain data) the next step needs besides its start state: the first
        derivative and the derivative history (shared, never written to), their times."""
        return [self.f0, *self.hist_f], (list(self.hist_t), self.fresh)

    def resume(self, rhs, y, carry, graph) -> None:
        tensors, (hist_t, fresh) = carry
        self.start(rhs, y, tensors[0], graph)
        self.hist_f, self.hist_t, self.fresh = list(tensors[1:]), list(hist_t), fresh


def _combine(y, coefs, fs, h):
    """y + h * sum_j w_j f_j, summed precisely below float64 (the result is a state)."""
    return add_terms(y, list(zip(fs, coefs)), h, y.dtype != torch.float64)
