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
from neuralode.problem import check_t, check_y0, first_callback
from neuralode.solution import Solution
from neuralode.solvers.base import SolverStats

__all__ = ["one_as_batch", "solve_compiled_one", "wants_compile", "without_compile"]


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


def solve_compiled_one(strategy, func: Callable, y0, t, *, rtol, atol, method=None,
                       options=None, event_fn=None, dense: bool = False, throw: bool = True
                       ) -> Solution:
    """One problem's compiled solve, differentiated by ``strategy``: a batch of one on the
    compiled tensor clock, unwrapped into a ``Solution``."""
    if event_fn is not None or dense:
        raise ODEInputError("the compiled solve (options['compile']) serves neither event_fn "
                            "nor dense=True; solve without 'compile' for them")
    items, is_tuple = check_y0(y0, finite=False)  # (its values: the batch's ``prepare``)
    t = check_t(t)
    if t.requires_grad and torch.is_grad_enabled():
        raise ODEInputError("the compiled solve (options['compile']) does not differentiate "
                            "with respect to t; detach t or solve without 'compile'")
    yb = tuple(v.unsqueeze(0) for v in items) if is_tuple else items[0].unsqueeze(0)
    batch_func = one_as_batch(func, is_tuple)
    name = first_callback(func)
    if name is not None:
        raise ODEInputError(f"the compiled solve (options['compile']) does not call "
                            f"callbacks (func.{name}); solve without 'compile'")
    strategy = strategy.bind_params(func, lambda: func(
        t[0].to(items[0].dtype.to_real()),
        tuple(v.detach() for v in items) if is_tuple else items[0].detach()))
    sol = strategy.solve(batch_func, yb, t, rtol=rtol, atol=atol, method=method,
                         options=options, throw=throw, per_sample=True)
    ps = sol.stats  # (the batched driver's: every field filled for the one sample)
    # (the sample's values: ``tolist`` and ``select`` cost less than indexing a tensor)
    stats = SolverStats(method=ps.method, nfe=ps.nfe, n_accepted=ps.n_accepted.tolist()[0],
                        n_rejected=ps.n_rejected.tolist()[0], status=sol.status[0],
                        message=sol.message[0], t_final=sol.t_final.tolist()[0],
                        compile_s=ps.compile_s, n_compiles=ps.n_compiles, extra=ps.extra)
    ys = tuple(v.select(1, 0) for v in sol.ys) if is_tuple else sol.ys.select(1, 0)
    y_final = tuple(v.select(0, 0) for v in sol.y_final) if is_tuple else \
        sol.y_final.select(0, 0)
    return Solution(ys=ys, ts=t, stats=stats, status=stats.status, message=stats.message,
                    t_final=stats.t_final, y_final=y_final)
