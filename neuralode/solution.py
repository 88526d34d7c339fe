"""The result of a solve: outputs, status, statistics, event, and the dense solution."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import torch

from neuralode.errors import ODEInputError
from neuralode.solvers.base import SolverStats, StateLayout
from neuralode.solvers.status import FINISHED_WELL
from neuralode.solvers.timekeeping import as_time


class DenseSolution:
    """The continuous solution of one solve, from the stored interpolant of every accepted
    step (whatever method ran). ``sol(t)`` evaluates it at a time or a 1-D tensor of times
    inside the solved span: shape ``(*t.shape, *y0.shape)`` (a tuple for tuple states).
    Differentiable when the solve recorded a graph (``odeint``-style backprop)."""

    def __init__(self, segments, layout: StateLayout, t0: float, t1: float, user_dtype):
        self.segments = segments
        self.layout = layout
        self.t0, self.t1 = t0, t1
        self.direction = 1.0 if t1 >= t0 else -1.0
        self.user_dtype = user_dtype
        self._keys = [self.direction * ta for ta, _, _ in segments]

    def flat_at(self, v: float) -> torch.Tensor:
        """The flat state at the time ``v`` (inside the span), in the solver's dtype."""
        k = bisect.bisect_right(self._keys, self.direction * v) - 1
        k = min(max(k, 0), len(self.segments) - 1)
        ta, tb, seg = self.segments[k]
        return seg.evaluate([(v - ta) / (tb - ta)])[0]

    def __call__(self, t) -> Any:
        tt = as_time(t)  # read on the host; float32 where the device has no float64
        flat_t = tt.detach().reshape(-1).tolist()
        lo, hi = sorted((self.t0, self.t1))
        bad = [v for v in flat_t if not lo <= v <= hi]
        if bad:
            raise ODEInputError(f"the dense solution covers [{lo}, {hi}]; got times outside it: "
                                f"{bad[:5]}")
        if not self.segments:
            raise ODEInputError("the solve took no step, so there is no dense solution")
        y = torch.stack([self.flat_at(v) for v in flat_t]).to(self.user_dtype)
        y = y.reshape(*tt.shape, self.layout.n)
        return self.layout.unflatten(y)


@dataclass
class Solution:
    """Result of ``neuralode.solve``.

    ys: the solution at the output times reached (first dim: number of times; a tuple for
        tuple states); all of ``ts`` on success, fewer when an event or (with
        ``throw=False``) a failure ended the solve early.
    ts: the output times, as given.
    stats: ``SolverStats`` (NFE, accepted and rejected steps, status, message).
    status: "success", "event", or with ``throw=False`` "max_steps_reached",
        "step_size_underflow", "nonfinite".
    event_t, event_y: the event time (a 0-d tensor) and the state there, when an event
        ended the solve.
    t_final, y_final: where the solve stopped (the last output time on success).
    dense: the continuous solution (``solve(..., dense=True)``); also ``sol.evaluate(t)``.
    """

    ys: Any
    ts: torch.Tensor
    stats: SolverStats
    status: str = "success"
    message: str = ""
    event_t: torch.Tensor | None = None
    event_y: Any = None
    t_final: float = float("nan")
    y_final: Any = None
    dense: DenseSolution | None = field(default=None, repr=False)

    @property
    def success(self) -> bool:
        return self.status in FINISHED_WELL

    def evaluate(self, t):
        """The continuous solution at ``t`` (needs ``solve(..., dense=True)``)."""
        if self.dense is None:
            raise ODEInputError("this solution has no dense output; call solve(..., dense=True)")
        return self.dense(t)


ODESolution = Solution  # the name of earlier versions
