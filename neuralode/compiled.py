"""Compiled solves: ``options={"compile": True}`` (or a ``torch.compile`` backend name).

The whole solve runs as one compiled graph (``neuralode.solvers.compiled``): steps,
accept/reject, step-size control, outputs, termination, statistics and status, with no host
synchronisation between the first step and the last. Its results are the eager solve's: the
same steps and accepted/rejected counts, outputs equal to rounding.

* One problem (``solve``/``odeint``/``odeint_adjoint``): the problem is solved as a
  per-sample batch of one on the tensor clock (``func`` still sees the problem's own shapes
  and a 0-d time), and the result unwrapped. Per sample (``per_sample=True``): the batch.
* Served: the explicit Runge–Kutta methods (adaptive and fixed grid), float32 and float64,
  tensors and tuples; solves without gradients, and the adjoint (``odeint_adjoint`` /
  ``gradient="adjoint"``: the forward solve compiled, the backward solve eager: the
  one-problem adjoint's, or per sample the batched driver's).
* ``gradient="checkpoint"`` (one problem): the forward solve eager (it records the steps),
  the backward pass one compiled loop (``gradients.compiled_replay``).
* Refused with a clear error: backprop through the compiled loop (torch 2.13's autograd of
  ``while_loop`` gives wrong gradients for it; ``solvers.compiled.BACKPROP_REFUSED``), the
  implicit, Rosenbrock, multistep and scipy methods, ``gradient="checkpoint"`` per sample
  and the interpolated adjoint, events, dense output, callbacks,
  ``step_t``/``jump_t``/``perturb``/``grid_constructor``, a user error norm, gradients
  with respect to ``t``, ``shrink``.
* ``CompiledSolver`` (``neuralode.odeint``): a kind's later solves without autograd rerun
  its first solve's compiled loop and templates (``OneLane``), their values checked.
* Compilation: once per structure (method, controller settings, shapes, dtypes, number of
  output times, ``func``'s type); tolerances, output times, ``y0`` and parameters are
  inputs, so changing them does not recompile. ``stats.compile_s`` gives the seconds of the
  call that compiled (0.0 when the compiled loop was reused), ``stats.n_compiles`` the
  compilations it triggered (a backward graph counts too).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from neuralode.errors import ODEInputError
from neuralode.per_sample import fill_stats, run_compiled, setup
from neuralode.problem import batch_times, check_finite, check_t, check_y0, first_callback, flat_y0
from neuralode.solution import Solution
from neuralode.solvers.base import PerSampleStats, SolverStats, StateLayout
from neuralode.solvers.batched import BatchedResult
from neuralode.solvers.compiled import Lane

__all__ = ["OneLane", "one_as_batch", "one_solution", "solve_compiled_one", "wants_compile",
           "without_compile"]


def wants_compile(options) -> bool:
    """Does ``options`` ask for the compiled path (True or a backend name)?"""
    if not isinstance(options, dict):
        return False
    c = options.get("compile", False)
    if c is not False and c is not None and not isinstance(c, (bool, str)):
        raise ODEInputError(f"options['compile'] must be True, False or a torch.compile "
                            f"backend name (e.g. 'inductor'), got {c!r}")
    return bool(c)


def without_compile(options):
    """``options`` without the key 'compile' (an eager solve's options)."""
    if not isinstance(options, dict) or "compile" not in options:
        return options
    return {k: v for k, v in options.items() if k != "compile"}


def one_as_batch(func: Callable, is_tuple: bool) -> Callable:
    """``func`` of one problem as the per-sample function of a batch of one: t (1,), y (1, ...)
    -> (1, ...)."""
    if is_tuple:
        def batch_func(t, y):
            out = func(t[0] if t.dim() else t, tuple(v[0] for v in y))
            if not isinstance(out, (tuple, list)):
                return out  # the shape check reports it
            return tuple(v.unsqueeze(0) for v in out)
    else:
        def batch_func(t, y):
            out = func(t[0] if t.dim() else t, y[0])
            return out.unsqueeze(0) if isinstance(out, torch.Tensor) else out
    batch_func.__wrapped__ = func  # type: ignore[attr-defined]  # (the compiled loop's key)
    return batch_func


def solve_compiled_one(func: Callable, y0, t, *, rtol, atol, method=None, options=None,
                       event_fn=None, dense: bool = False, throw: bool = True,
                       keep: dict | None = None) -> Solution:
    """One problem's compiled solve (no gradient strategy: backprop, refused where autograd
    would differentiate the loop, or a gradient's own forward solve): a batch of one on the
    compiled tensor clock, unwrapped into a ``Solution``. ``keep``: a dict that receives
    "lane", a ``OneLane`` for the later solves of this ``func`` and kind, where the solve
    can be rerun that way."""
    if event_fn is not None or dense:
        raise ODEInputError("the compiled solve (options['compile']) serves neither event_fn "
                            "nor dense=True; solve without 'compile' for them")
    items, is_tuple = check_y0(y0, finite=False)  # (its values: the batch's ``prepare``)
    t = check_t(t)
    if t.requires_grad and torch.is_grad_enabled():
        raise ODEInputError("the compiled solve (options['compile']) does not differentiate "
                            "with respect to t; detach t or solve without 'compile'")
    yb = tuple(v.unsqueeze(0) for v in items) if is_tuple else items[0].unsqueeze(0)
    name = first_callback(func)
    if name is not None:
        raise ODEInputError(f"the compiled solve (options['compile']) does not call "
                            f"callbacks (func.{name}); solve without 'compile'")
    s = setup(one_as_batch(func, is_tuple), yb, t, rtol=rtol, atol=atol, method=method,
              options=options, tensor_clock=True)
    info: dict = {}
    res = run_compiled(s, throw=throw, info=info)
    p = s.p
    if keep is not None and "lane" in info:
        keep["lane"] = OneLane(info["lane"], p.layout, p.rhs.user_dtype, p.rhs.dtype, is_tuple)
    return one_solution(t, res, p.stats, p.layout, p.rhs.user_dtype, is_tuple)


def one_solution(t, res: BatchedResult, st: PerSampleStats, layout: StateLayout,
                 user_dtype: torch.dtype, is_tuple: bool) -> Solution:
    """The ``Solution`` of one problem solved as a batch of one (``res``, its statistics
    ``st``)."""
    # (the sample's values: ``tolist`` and ``select`` cost less than indexing a tensor)
    stats = SolverStats(method=st.method, nfe=st.nfe, n_accepted=st.n_accepted.tolist()[0],
                        n_rejected=st.n_rejected.tolist()[0], status=st.status[0],
                        message=st.message[0], t_final=res.t_final.tolist()[0],
                        compile_s=st.compile_s, n_compiles=st.n_compiles, extra=st.extra)
    ys, y_final = (layout.unflatten(v if v.dtype == user_dtype else v.to(user_dtype))
                   for v in (res.ys, res.y_final))
    ys = tuple(v.select(1, 0) for v in ys) if is_tuple else ys.select(1, 0)
    y_final = tuple(v.select(0, 0) for v in y_final) if is_tuple else y_final.select(0, 0)
    return Solution(ys=ys, ts=t, stats=stats, status=stats.status, message=stats.message,
                    t_final=stats.t_final, y_final=y_final)


class OneLane:
    """A one-problem compiled solve made again for a later y0 and t of its kind (the same
    ``func``, shapes, dtypes and devices, no autograd): its values checked as the first
    solve's were (y0 finite, t's times), then the first solve's compiled loop and templates
    (``solvers.compiled.Lane``) called with them. ``CompiledSolver`` keeps one per kind."""

    def __init__(self, lane: Lane, layout: StateLayout, user_dtype: torch.dtype,
                 dtype: torch.dtype, is_tuple: bool):
        self.lane, self.layout, self.is_tuple = lane, layout, is_tuple
        self.user_dtype, self.dtype = user_dtype, dtype

    def solve(self, y0, t, throw: bool) -> Solution | None:
        """y0 and t's solution, or None where the loop now fails (solve it the first way:
        that says why)."""
        items = list(y0) if self.is_tuple else [y0]
        check_finite(items, self.is_tuple)
        ts = batch_times(t, 1, items[0].device)
        y = flat_y0(self.layout, [v.unsqueeze(0) for v in items], self.is_tuple, 1,
                    self.dtype)
        stats = PerSampleStats(method=self.lane.name)
        stats.driver = "batched"
        # (y0 is no longer checked for a func that writes into it: a compiled loop's body
        # cannot write into the loop's inputs)
        got = self.lane.rerun(ts, y, stats, throw)
        if got is None:
            return None
        fill_stats(stats, *got)
        return one_solution(t, got[0], stats, self.layout, self.user_dtype, self.is_tuple)
