"""Backpropagation through the solver (the paper's "RK-Net"), and the part every strategy
that differentiates the float-clock loop shares (``SolverGradient``).

A gradient strategy is an object that owns how a solve is differentiated, for one problem
and per sample: ``solve(func, y0, t, ..., per_sample=...)`` returns the ``Solution`` (or
``PerSampleSolution``), ``event(...)`` runs torchdiffeq's event mode, ``tensor_clock`` says
whether the per-sample batched driver serves it (else each sample is solved alone on the
float clock), and ``bind_params(func, probe)`` fixes the tensors it differentiates before a
per-sample solve splits ``func`` into samples. A new strategy is one module with one such
class, named in ``neuralode.gradients.gradient_strategy``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from neuralode.per_sample import solve_per_sample
from neuralode.problem import check_t, event_solve, prepare, solve_problem


class SolverGradient:
    """A strategy that differentiates the loop's own operations (autograd records them, or
    ``integrator`` replays them): the solve, the event mode and the per-sample solve."""

    name = ""
    tensor_clock = False

    def integrator(self) -> Callable | None:
        """The loop that ``problem.run`` runs (None: ``problem.integrate_plain``)."""
        return None

    def bind_params(self, func, probe: Callable) -> SolverGradient:
        return self

    def solve(self, func, y0, t, *, rtol, atol, method=None, options=None, event_fn=None,
              dense: bool = False, throw: bool = True, per_sample: bool = False,
              sync_counter: list | None = None):
        if per_sample:
            return solve_per_sample(self, func, y0, t, rtol=rtol, atol=atol, method=method,
                                    options=options, throw=throw, event_fn=event_fn,
                                    dense=dense, sync_counter=sync_counter)
        p = prepare(func, y0, rtol=rtol, atol=atol, method=method, options=options)
        return solve_problem(p, check_t(t), event_fn=event_fn, dense=dense, throw=throw,
                             integrator=self.integrator())

    def event(self, func, y0, t, *, rtol, atol, method=None, options=None, event_fn):
        """torchdiffeq's event mode: (event_t, solution at t0 and event_t, stats)."""
        return event_solve(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                           event_fn=event_fn, integrator=self.integrator())


@dataclass(frozen=True)
class Backprop(SolverGradient):
    """Autograd through the solver (the paper's "RK-Net"): the exact gradient of what was
    computed; memory grows with the number of steps. Per sample on the batched driver."""

    name = "backprop"
    tensor_clock = True


__all__ = ["Backprop", "SolverGradient"]
