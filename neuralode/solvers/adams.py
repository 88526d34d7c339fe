"""Linear multistep methods on a fixed grid: Adams–Bashforth (explicit) and
Adams–Bashforth–Moulton (predictor–corrector).

The first steps use the 3/8-rule RK4 until enough history exists. Coefficients are computed
for the actual (possibly non-uniform) grid by integrating the Lagrange interpolant of the
past derivatives over the step, so a shortened last step or an irregular grid keeps the
method's order. Outputs between grid points use the cubic Hermite interpolant from the
derivatives at the grid points (already in the history, so it costs no evaluations).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch

from neuralode.errors import ODEInputError
from neuralode.solvers.control import ErrorNorm
from neuralode.solvers.rk import FixedGridRK, needs_graph
from neuralode.solvers.tableau import RK4_38


@lru_cache(maxsize=256)
def _quadrature_weights(nodes: tuple[float, ...]) -> tuple[float, ...]:
    """Weights w_j with sum_j w_j p(x_j) = int_0^1 p(x) dx for all polynomials p of degree
    < len(nodes); nodes are in units of the step (the step runs from 0 to 1)."""
    k = len(nodes)
    x = np.asarray(nodes, dtype=np.float64)
    V = x[None, :] ** np.arange(k)[:, None]  # V[i, j] = x_j^i
    m = 1.0 / np.arange(1, k + 1)
    return tuple(np.linalg.solve(V, m).tolist())


def _weights(times: list[float], t: float, h: float) -> tuple[float, ...]:
    # round to keep the cache effective on uniform grids
    return _quadrature_weights(tuple(round((s - t) / h, 12) for s in times))


class ExplicitAdams(FixedGridRK):
    """Adams–Bashforth up to order 4 (``max_order``), RK4 start, fixed grid."""

    name = "explicit_adams"
    tableau = RK4_38
    OPTIONS: ClassVar[dict[str, Any]] = dict(FixedGridRK.OPTIONS, max_order=4)
    implicit = False

    @classmethod
    def describe(cls) -> str:
        return cls.__doc__.strip().splitlines()[0]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mo = self.options["max_order"]
        if not isinstance(mo, int) or isinstance(mo, bool) or not 1 <= mo <= 4:
            raise ODEInputError(f"option 'max_order' of {self.name!r} must be an int in 1..4, "
                                f"got {mo!r}")
        self.max_order = mo

    def _combine(self, y, coefs, fs, h):
        out = y
        for w, f in zip(coefs, fs):
            out = torch.add(out, f, alpha=h * w)
        return out

    def _predict(self, t, y, h, hist_t, hist_f):
        k = min(len(hist_t), self.max_order)
        w = _weights(hist_t[-k:], t, h)
        return self._combine(y, w, hist_f[-k:], h)

    def _correct(self, t, t1, y, h, hist_t, hist_f, y_pred):
        return y_pred

    def integrate(self, ts: list[float]) -> list[torch.Tensor]:
        outs = [self.y0]
        if len(ts) == 1:
            self.stats.status = "success"
            self.stats.t_final = ts[0]
            return outs
        grid = self.make_grid(ts)
        if self.options["perturb"]:
            raise ODEInputError(f"option 'perturb' is not supported by {self.name!r} (a multistep "
                                f"method cannot restart at each grid point); use an RK method")
        linear = self.options["interp"] == "linear"
        direction = 1.0 if ts[-1] > ts[0] else -1.0
        rhs = self.rhs
        st = self.stepper
        y = self.y0
        t = grid[0]
        f0 = rhs(t, y)
        hist_t, hist_f = [t], [f0]
        i_out = 1
        graph = needs_graph(y, f0)
        for g in range(1, len(grid)):
            t1 = grid[g]
            h = t1 - t
            if len(hist_t) < self.max_order:  # start-up with RK4
                if graph:
                    y1, _ = st.step_graph(t, y, f0, h)
                else:
                    K = st.buffer(y)
                    K[0].copy_(f0)
                    y1 = st.step_buffer(t, y, h).clone()
            else:
                y1 = self._predict(t, y, h, hist_t, hist_f)
                y1 = self._correct(t, t1, y, h, hist_t, hist_f, y1)
            self.stats.n_accepted += 1
            if not math.isfinite(y1.sum().item()):
                self.fail_nonfinite(t, h)
            last = g == len(grid) - 1
            inside = []
            while i_out < len(ts) and direction * (ts[i_out] - t1) < 0:
                inside.append(ts[i_out])
                i_out += 1
            f1 = None
            if not last or (inside and not linear):
                f1 = rhs(t1, y1)
            if inside:
                thetas = [(x - t) / h for x in inside]
                if linear:
                    outs.extend(y + th * (y1 - y) for th in thetas)
                else:
                    # cubic Hermite through (y, f0) and (y1, f1)
                    for th in thetas:
                        w0 = th - 2 * th**2 + th**3
                        w1 = 3 * th**2 - 2 * th**3
                        w2 = th**3 - th**2
                        outs.append(y + (h * w0) * f0 + w1 * (y1 - y) + (h * w2) * f1)
            while i_out < len(ts) and ts[i_out] == t1:
                outs.append(y1)
                i_out += 1
            t, y, f0 = t1, y1, f1
            hist_t.append(t1)
            hist_f.append(f1)
            if len(hist_t) > self.max_order + 1:
                del hist_t[0], hist_f[0]
        self.stats.status = "success"
        self.stats.t_final = t
        return outs


class ImplicitAdams(ExplicitAdams):
    """Adams–Bashforth–Moulton predictor–corrector (order 4), RK4 start, fixed grid."""

    name = "implicit_adams"
    OPTIONS: ClassVar[dict[str, Any]] = dict(ExplicitAdams.OPTIONS, max_iters=4)
    implicit = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mi = self.options["max_iters"]
        if not isinstance(mi, int) or isinstance(mi, bool) or mi < 1:
            raise ODEInputError(f"option 'max_iters' of {self.name!r} must be a positive int, "
                                f"got {mi!r}")
        self.max_iters = mi
        self.conv_norm = ErrorNorm(self.rhs.layout, self.rtol, self.atol, None)

    def _correct(self, t, t1, y, h, hist_t, hist_f, y_pred):
        """Adams–Moulton corrector with nodes t1, t, t-1, ... (same order as the predictor),
        iterated until the correction is within rtol/atol or max_iters is reached."""
        k = min(len(hist_t), self.max_order)
        nodes = hist_t[-(k - 1):] + [t1] if k > 1 else [t1]
        w = _weights(nodes, t, h)
        fs_past = hist_f[-(k - 1):] if k > 1 else []
        y_new = y_pred
        for _ in range(self.max_iters):
            f1 = self.rhs(t1, y_new)
            y_next = self._combine(y, w, fs_past + [f1], h)
            with torch.no_grad():
                delta = (y_next - y_new).detach()
                scale = self.conv_norm.scale(torch.maximum(y_next.detach().abs(),
                                                           y_new.detach().abs()))
                converged = self.conv_norm(delta, scale) <= 1.0
            y_new = y_next
            if converged:
                break
        return y_new
