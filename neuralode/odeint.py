"""The front door: ``odeint`` (torchdiffeq-compatible), ``odeint_adjoint``, ``solve``
(returns a ``Solution`` with statistics, status, event and dense output) and
``odeint_dense``.

The ``gradient`` strategy (``neuralode.gradients``) owns how a solve is run and
differentiated: one problem on the float clock (``neuralode.problem``), or a per-sample
batch (``neuralode.per_sample``, every method and gradient). Input is validated where it
enters (``neuralode.problem``).

Gradients: with respect to ``y0`` and to parameters used by ``func`` they come from autograd
through the solver's operations (the paper's "RK-Net"). With respect to the times ``t`` they
use the exact identities of the ODE flow,
    d y(t_i) / d t_i = f(t_i, y(t_i)),     d y(t_i) / d t_0 = -Phi(t_i, t_0) f(t_0, y_0),
attached to the discrete solution; this costs one extra evaluation of f per output time and
is only done when ``t.requires_grad``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import cast

import torch

from neuralode.compiled import solve_compiled_one, wants_compile, without_compile
from neuralode.errors import ODEInputError
from neuralode.gradients import Adjoint, Checkpoint, Gradient, gradient_strategy, odeint_adjoint
from neuralode.problem import Tolerance, first_callback
from neuralode.solution import DenseSolution, ODESolution, Solution
from neuralode.solvers.timekeeping import as_time
from neuralode.vmapped import is_vmapped, vmapped_odeint

__all__ = ["CompiledSolver", "ODESolution", "Solution", "odeint", "odeint_adjoint", "odeint_dense",
           "solve"]


def solve(func: Callable, y0, t, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
          method: str | None = None, options: dict | None = None,
          event_fn: Callable | None = None, dense: bool = False,
          throw: bool = True, gradient: str | Gradient | None = None,
          per_sample: bool = False) -> Solution:
    """Solve dy/dt = func(t, y), y(t[0]) = y0, and return a ``Solution``: the states at the
    times ``t`` with statistics and status. Arguments as for ``odeint``, plus:

    event_fn: ``event_fn(t, y) -> tensor``; the solve ends at the first time in the span
        where a component changes sign (located on the dense output to adjacent float64
        times); ``Solution.event_t``/``event_y`` give it, ``ys`` holds the outputs before
        it, and ``status`` is "event". No sign change in the span: status "success".
    dense: keep every step's interpolant; ``Solution.evaluate(t)`` then gives the
        continuous solution anywhere in the span (differentiably under autograd).
    throw: False returns the solution computed so far with a failure status
        ("max_steps_reached", "step_size_underflow", "nonfinite") and a message instead of
        raising; invalid input still raises.
    gradient: how the solve is differentiated (``neuralode.gradients``): "backprop"
        (default), "checkpoint" (the same gradient in little memory; ``Checkpoint(budget=k)``
        bounds it), "adjoint" / "interpolated_adjoint" (or an ``Adjoint`` object; not with
        ``event_fn`` or ``dense``: use ``odeint``'s event mode).
    per_sample: solve each sample of the batch y0 (B, ...) as its own problem (own steps,
        output times t of shape (T,) or (B, T), statistics and status) and return a
        ``neuralode.per_sample.PerSampleSolution``; see ``neuralode.per_sample``.
    """
    return _solve(gradient_strategy(gradient), func, y0, t, rtol=rtol, atol=atol,
                  method=method, options=options, event_fn=event_fn, dense=dense, throw=throw,
                  per_sample=per_sample)


def _solve(g, func, y0, t, *, options, per_sample: bool, **kwargs):
    """``g.solve``; one problem with ``options['compile']`` as a compiled batch of one
    (``neuralode.compiled``; the adjoint compiles its forward solve in ``odeint_adjoint``)."""
    if not per_sample and not isinstance(g, Adjoint):
        if wants_compile(options) and isinstance(g, Checkpoint):
            # the checkpoint's forward solve records steps eagerly; its backward pass is
            # compiled (gradients.compiled_replay)
            g = replace(g, compile=options["compile"])
        elif wants_compile(options):
            return solve_compiled_one(func, y0, t, options=options, **kwargs)
        options = without_compile(options)
    return g.solve(func, y0, t, options=options, per_sample=per_sample, **kwargs)


def odeint(func: Callable, y0, t, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
           method: str | None = None, options: dict | None = None,
           event_fn: Callable | None = None, return_stats: bool = False,
           gradient: str | Gradient | None = None, per_sample: bool = False):
    """Integrate dy/dt = func(t, y) from y(t[0]) = y0 and return y at every time in ``t``.

    Drop-in compatible with ``torchdiffeq.odeint``.

    Args:
        func: callable ``func(t, y)``; ``t`` is a 0-d tensor (the state's dtype), ``y`` has the
            structure of ``y0``; returns dy/dt with the same structure, shapes and dtype.
            Optional attributes ``func.callback_step(t0, y0, dt)``, ``callback_accept_step``,
            ``callback_reject_step`` are called around each step attempt (as torchdiffeq).
        y0: initial state, a floating or complex (complex64/complex128) tensor of any shape
            (0-dim too) or a tuple of such (one dtype); a complex state is solved as its
            real and imaginary parts (the error norm treats them as reals).
        t: 1-D tensor of times, strictly increasing or strictly decreasing; ``t[0]`` is the
            time of ``y0``. Time is handled in float64 internally.
        rtol, atol: relative and absolute tolerances (adaptive methods; also the corrector of
            ``implicit_adams``): numbers, tensors broadcastable to the state, or for tuple
            states one value (or tensor) per element.
        method: one of ``neuralode.SOLVERS`` (default ``"dopri5"``).
        options: method options, e.g. ``step_size`` for fixed-grid methods, or ``first_step``,
            ``max_num_steps``, ``norm``, ``step_size_controller``... (see the README).
        event_fn: torchdiffeq's event mode: integrate from ``t[0]`` (in the direction of
            ``t[1]``, which is otherwise ignored) until ``event_fn(t, y)`` changes sign, and
            return ``(event_t, solution)`` with solution = y at ``t[0]`` and at ``event_t``.
            Bounded by ``max_num_steps`` (default 20,000 steps in event mode), then an EventError.
        return_stats: also return a ``SolverStats`` (NFE, accepted and rejected steps).
        gradient: how the solve is differentiated: "backprop" (default: autograd through
            the solver), "checkpoint" (the same gradient, to rounding, with memory of one
            step's graph; ``neuralode.Checkpoint(budget=k)`` keeps at most k states),
            "adjoint" (``odeint_adjoint``; ``neuralode.Adjoint(...)`` carries its options),
            "interpolated_adjoint". See ``neuralode.gradients``.
        (Under ``torch.func.vmap`` the mapped axis of y0 or t becomes such a per-sample
        solve, ``func`` still seeing one sample: see ``neuralode.vmapped``.)
        per_sample: y0 is a batch (B, ...) of independent problems, each solved with its own
            steps, output times (t of shape (T,) or (B, T)) and status; ``func`` gets t as a
            (B,) tensor; the result has shape (T, B, ...) and the stats are a
            ``PerSampleStats``. See ``neuralode.per_sample``. Gradients: "backprop" or
            "adjoint" (a per-sample backward solve).

    Returns:
        Tensor of shape ``(len(t), *y0.shape)`` (a tuple of those for tuple states), whose
        first entry is ``y0``; in event mode ``(event_t, solution)``; and the stats if
        ``return_stats``.
    """
    if is_vmapped(y0, t):  # torch.func.vmap over odeint: a per-sample solve
        if event_fn is not None or return_stats or per_sample:
            raise ODEInputError("odeint under torch.vmap supports neither event_fn, "
                                "return_stats nor per_sample=True; call odeint(..., "
                                "per_sample=True) on the batch instead")
        return vmapped_odeint(odeint, func, y0, t, rtol=rtol, atol=atol, method=method,
                              options=options, gradient=gradient)
    g = gradient_strategy(gradient)
    if event_fn is not None:
        if per_sample:
            raise ODEInputError("odeint(..., per_sample=True) has no event mode; use "
                                "solve(..., per_sample=True, event_fn=...) (an event per "
                                "sample)")
        event_t, sol, stats = g.event(func, y0, t, rtol=rtol, atol=atol, method=method,
                                      options=options, event_fn=event_fn)
        return ((event_t, sol), stats) if return_stats else (event_t, sol)
    sol = _solve(g, func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                 per_sample=per_sample)
    return (sol.ys, sol.stats) if return_stats else sol.ys


def odeint_dense(func: Callable, y0, t0, t1, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
                 method: str | None = None, options: dict | None = None) -> DenseSolution:
    """Solve from ``t0`` to ``t1`` once and return the continuous solution, a callable
    ``sol(t)`` valid on [t0, t1] (as ``torchdiffeq.odeint_dense``; every method)."""
    times = torch.stack([as_time(t0).reshape(()), as_time(t1).reshape(())])
    sol = solve(func, y0, times, rtol=rtol, atol=atol, method=method, options=options,
                dense=True)
    return cast(DenseSolution, sol.dense)  # dense=True: always there


class CompiledSolver:
    """``solve``/``odeint`` of one ``func`` with ``options={"compile": True}``, made once for
    solves that come again and again (a model's forward pass, an evaluation loop)::

        solver = neuralode.CompiledSolver(func, rtol=1e-5, atol=1e-5)
        ys = solver(y0, t)         # odeint(func, y0, t, rtol=1e-5, atol=1e-5,
                                   #        options={"compile": True})
        sol = solver.solve(y0, t)  # solve(...): the Solution, with its statistics

    Arguments as for ``solve`` (``options["compile"]`` may name a ``torch.compile`` backend;
    it defaults to True). Results, errors and warnings are ``solve``'s with the same
    arguments. A solve without autograd (under ``torch.no_grad()``) of one problem whose
    ``y0`` and ``t`` are of a kind the solver met before (their types, shapes, dtypes and
    devices) checks their values as ``solve`` does (y0 finite, t's times, no callbacks on
    ``func``), then calls the compiled loop of that kind's first solve again: the options,
    the state's layout, the loop's templates and its structure are not looked up or made
    again (``solve`` finds them in caches, at a fraction of a millisecond per call). Such a
    solve is always the compiled one, whatever ``gradient`` says (``"checkpoint"``'s
    forward solve is eager in ``solve``: the same steps, results to rounding). Every other
    call goes through ``solve``. The solver holds ``func`` and up to ``MAX_KINDS`` kinds.
    """

    MAX_KINDS = 16

    def __init__(self, func: Callable, *, rtol: float = 1e-7, atol: float = 1e-9,
                 method: str | None = None, options: dict | None = None,
                 gradient: str | Gradient | None = None, per_sample: bool = False):
        if not callable(func):
            raise ODEInputError(f"CompiledSolver: func must be callable, got "
                                f"{type(func).__name__}")
        opts = {"compile": True, **(options or {})}
        if not wants_compile(opts):
            raise ODEInputError("CompiledSolver: options['compile'] must be True or a "
                                "torch.compile backend name (for an eager solve, call solve)")
        self.func, self.rtol, self.atol, self.method = func, rtol, atol, method
        self.options, self.gradient, self.per_sample = opts, gradient, per_sample
        self._lanes: OrderedDict = OrderedDict()  # kind -> compiled.OneLane

    def __call__(self, y0, t):
        """``odeint``'s result: the states at the times ``t``."""
        if is_vmapped(y0, t):
            return odeint(self.func, y0, t, rtol=self.rtol, atol=self.atol,
                          method=self.method, options=self.options, gradient=self.gradient)
        return self.solve(y0, t).ys

    def solve(self, y0, t, *, throw: bool = True) -> Solution:
        """``solve``'s ``Solution`` of ``y0`` at the times ``t``."""
        kind = None if self.per_sample or torch.is_grad_enabled() else _kind(y0, t)
        if kind is None:
            return solve(self.func, y0, t, rtol=self.rtol, atol=self.atol, method=self.method,
                         options=self.options, throw=throw, gradient=self.gradient,
                         per_sample=self.per_sample)
        lane = self._lanes.get(kind)
        if lane is not None and first_callback(self.func) is None:
            self._lanes.move_to_end(kind)
            sol = lane.solve(y0, t, throw)
            if sol is not None:
                return sol
            del self._lanes[kind]  # (its loop fails now: the first way says why)
        keep: dict = {}
        sol = solve_compiled_one(self.func, y0, t, rtol=self.rtol, atol=self.atol,
                                 method=self.method, options=self.options, throw=throw,
                                 keep=keep)
        if "lane" in keep:
            self._lanes[kind] = keep["lane"]
            while len(self._lanes) > self.MAX_KINDS:
                self._lanes.popitem(last=False)
        return sol


def _kind(y0, t) -> tuple | None:
    """The types, shapes, dtypes and devices of y0 and t (plain tensors), or None."""
    items = y0 if isinstance(y0, (tuple, list)) else (y0,)
    if type(t) is not torch.Tensor or any(type(v) is not torch.Tensor for v in items):
        return None
    return (type(y0), tuple((v.shape, v.dtype, v.device) for v in items), t.shape, t.dtype,
            t.device)
