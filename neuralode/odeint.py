"""The front door: ``odeint`` (torchdiffeq-compatible), ``solve`` (returns a ``Solution``
with statistics, status, event and dense output) and ``odeint_dense``.

It validates input where it enters, flattens tensor and tuple states into one 1-D state,
builds the method's stepper and controller from the registry, runs the one integration
loop (``neuralode.solvers.loop``), and restores the user's structure.

Gradients: with respect to ``y0`` and to parameters used by ``func`` they come from autograd
through the solver's operations (the paper's "RK-Net"). With respect to the times ``t`` they
use the exact identities of the ODE flow,
    d y(t_i) / d t_i = f(t_i, y(t_i)),     d y(t_i) / d t_0 = -Phi(t_i, t_0) f(t_0, y_0),
attached to the discrete solution; this costs one extra evaluation of f per output time and
is only done when ``t.requires_grad``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neuralode.errors import EventError, ODEInputError
from neuralode.gradients import Adjoint, Checkpoint, Gradient, gradient_strategy
from neuralode.solution import DenseSolution, ODESolution, Solution
from neuralode.solvers.base import RHS, SolverStats, StateLayout
from neuralode.solvers.controllers import ErrorNorm
from neuralode.solvers.loop import Callbacks, LoopResult, Stop, integrate
from neuralode.solvers.methods import (
    ALIASES,
    DEFAULT_METHOD,
    SOLVERS,
    Method,
    controller_or_default,
    make_controller,
    times_inside,
)

Tolerance = float | torch.Tensor | Sequence[float]
CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")

__all__ = ["ODESolution", "Solution", "odeint", "odeint_dense", "solve"]


def _check_func(func) -> None:
    if not callable(func):
        raise ODEInputError(f"func must be a callable func(t, y) returning dy/dt, got "
                            f"{type(func).__name__}")


def _check_y0(y0) -> tuple[list[torch.Tensor], bool]:
    is_tuple = isinstance(y0, (tuple, list))
    items = list(y0) if is_tuple else [y0]
    if is_tuple and not items:
        raise ODEInputError("y0 is an empty tuple; give a tensor or a non-empty tuple of tensors")
    for k, v in enumerate(items):
        name = f"y0[{k}]" if is_tuple else "y0"
        if not isinstance(v, torch.Tensor):
            raise ODEInputError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if v.is_complex():
            raise ODEInputError(f"{name} is complex ({v.dtype}); neuralode solves real states: "
                                f"use torch.view_as_real(y0) and the same view in func")
        if not v.is_floating_point():
            raise ODEInputError(f"{name} must have a floating dtype (float16/bfloat16/float32/"
                                f"float64), got {v.dtype}; e.g. use y0.float()")
        if v.numel() and not bool(torch.isfinite(v).all()):
            raise ODEInputError(f"{name} contains non-finite values (nan or inf)")
    if is_tuple:
        d0, dev0 = items[0].dtype, items[0].device
        for k, v in enumerate(items):
            if v.dtype != d0 or v.device != dev0:
                raise ODEInputError(
                    f"all tensors of a tuple y0 must share dtype and device: y0[0] is {d0} on "
                    f"{dev0}, y0[{k}] is {v.dtype} on {v.device}")
    return items, is_tuple


def _check_t(t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ODEInputError(f"t must be a 1-D tensor of times, got {type(t).__name__}") from None
    if t.dim() != 1:
        raise ODEInputError(f"t must be a 1-D tensor of times, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ODEInputError("t is empty; give at least one time (t[0] is the time of y0)")
    if t.is_complex() or t.dtype == torch.bool:
        raise ODEInputError(f"t must be real, got dtype {t.dtype}")
    return t


def _times(t: torch.Tensor) -> list[float]:
    ts = t.detach().to(torch.float64).tolist()
    bad = [x for x in ts if not math.isfinite(x)]
    if bad:
        raise ODEInputError(f"t contains non-finite values: {bad[:5]}")
    if len(ts) > 1:
        direction = 1.0 if ts[1] > ts[0] else -1.0
        for k in range(1, len(ts)):
            if direction * (ts[k] - ts[k - 1]) <= 0:
                raise ODEInputError(
                    f"t must be strictly increasing or strictly decreasing; t[{k - 1}]={ts[k - 1]!r}"
                    f" and t[{k}]={ts[k]!r} break the order set by t[0], t[1]")
    return ts


def _tolerance(name: str, tol, layout: StateLayout, dtype, device):
    """A float, or a flat (n,) tensor for per-element tolerances: a tensor broadcastable to
    the state (or, for a tuple state, one value or tensor per element)."""
    if isinstance(tol, (int, float)) and not isinstance(tol, bool):  # the common case, fast
        v = float(tol)
        if not (v >= 0 and math.isfinite(v)):
            raise ODEInputError(f"{name} must be a non-negative finite number, got {tol!r}")
        return v

    def tensor_of(v, shape, where):
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                raise ODEInputError(f"{where} must not require grad")
            v = v.detach()
        try:
            v = torch.as_tensor(v, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ODEInputError(f"{where} must be a non-negative finite number, got {v!r} "
                                f"(tolerances are numbers or tensors of them)") from None
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            shown = v.item() if v.numel() == 1 else v
            raise ODEInputError(f"{where} must be a non-negative finite number, got {shown!r} "
                                f"(tolerances are numbers or tensors of them)")
        try:
            return torch.broadcast_to(v.cpu(), shape).reshape(-1)
        except RuntimeError:
            raise ODEInputError(f"{where} of shape {tuple(v.shape)} does not broadcast to the "
                                f"state's shape {tuple(shape)}") from None

    if isinstance(tol, (tuple, list)) and layout.is_tuple:
        if len(tol) != len(layout.shapes):
            raise ODEInputError(f"{name} given as a sequence of {len(tol)} values; a tuple state "
                                f"needs one per element ({len(layout.shapes)} here)")
        flat = torch.cat([tensor_of(v, s, f"{name}[{k}]")
                          for k, (v, s) in enumerate(zip(tol, layout.shapes))])
    elif layout.is_tuple:
        v = tensor_of(tol, (), name)
        flat = v.expand(layout.n) if v.numel() == 1 else None
        if flat is None:
            raise ODEInputError(f"{name} for a tuple state must be a number or a sequence with "
                                f"one value (or tensor) per element")
    else:
        flat = tensor_of(tol, layout.shapes[0], name)
    if flat.numel() == 0:
        return 0.0
    first = flat[0].item()
    if bool((flat == first).all()):
        return first
    return flat.to(dtype=dtype, device=device)


def _resolve_method(method, options) -> tuple[str, dict]:
    if options is not None and not isinstance(options, dict):
        raise ODEInputError(f"options must be a dict, got {type(options).__name__}")
    if method is None:
        if options:
            raise ODEInputError(
                f"options {sorted(options)} were given without a method; options are specific to "
                f"a method, so name it (e.g. method='dopri5' or method='rk4')")
        method = DEFAULT_METHOD
    if not isinstance(method, str):
        raise ODEInputError(f"method must be a string, got {type(method).__name__}")
    name = ALIASES.get(method, method)
    if name not in SOLVERS:
        raise ODEInputError(f"unknown method {method!r}; valid methods are: "
                            f"{sorted(SOLVERS) + sorted(ALIASES)}")
    return name, dict(options or {})


def method_options(name: str, given: dict) -> dict:
    """The method's options with defaults filled in and values checked. Options the method
    does not use are ignored with a warning that names them and the valid ones (as
    torchdiffeq does)."""
    cls = SOLVERS[name]
    unknown = sorted(set(given) - set(cls.OPTIONS))
    if unknown:
        warnings.warn(f"method {name!r} does not use the option(s) {unknown}; they are ignored. "
                      f"Its options are: {sorted(cls.OPTIONS)}", stacklevel=3)
    opts = dict(cls.OPTIONS)
    opts.update({k: v for k, v in given.items() if k in cls.OPTIONS})
    mns = opts["max_num_steps"]
    if not isinstance(mns, int) or isinstance(mns, bool) or mns < 1:
        raise ODEInputError(f"option 'max_num_steps' of {name!r} must be a positive int, got "
                            f"{mns!r}")
    cls.check(opts)
    return opts


def _eps(dtype) -> float:
    return torch.finfo(dtype).eps


def _check_resolvable(name, rtol, atol, y0_flat, dtype) -> None:
    """Tolerances the dtype cannot resolve would make the step size crawl or fail: refuse
    them with the limit (rtol >= eps/100 of the dtype the solver accumulates in: rtol=1e-9
    passes in float32, 1e-12 does not)."""
    eps = _eps(dtype)
    r = rtol if isinstance(rtol, float) else float(rtol.min())
    a = atol if isinstance(atol, float) else float(atol.min())
    if r == 0 and a == 0:
        raise ODEInputError(f"{name}: rtol and atol are both zero; no error is small enough. "
                            f"Give rtol > 0 and/or atol > 0")
    if 0 < r < eps / 100:
        raise ODEInputError(
            f"{name}: rtol={r:g} is below what {str(dtype).replace('torch.', '')} resolves "
            f"(machine epsilon {eps:.3g}); use rtol >= {eps / 100:.3g}, or a float64 state")
    if r == 0:
        ymax = float(y0_flat.detach().abs().max()) if y0_flat.numel() else 0.0
        if a < eps / 100 * ymax:
            raise ODEInputError(
                f"{name}: with rtol=0, atol={a:g} is below what "
                f"{str(dtype).replace('torch.', '')} resolves for |y0| up to {ymax:g}; use a "
                f"larger atol, rtol > 0, or a float64 state")


def _callbacks(func, method_cls: type[Method], names=CALLBACK_NAMES) -> Callbacks | None:
    """torchdiffeq's callbacks found on ``func``; a warning for those the method cannot
    honour (fixed-grid methods have no accept/reject)."""
    found = {n: getattr(func, n) for n in names if callable(getattr(func, n, None))}
    if not found:
        return None
    base = [n.replace("_adjoint", "") for n in found]
    if not method_cls.adaptive:
        bad = sorted(n for n, b in zip(found, base) if b != "callback_step")
        if bad:
            warnings.warn(f"method {method_cls.name!r} is a fixed-grid method and does not "
                          f"support the callbacks {bad} (it has no step rejection); only "
                          f"callback_step is called", stacklevel=4)
    cb = dict(zip(base, found.values()))
    accept = cb.get("callback_accept_step") if method_cls.adaptive else None
    reject = cb.get("callback_reject_step") if method_cls.adaptive else None
    return Callbacks(step=cb.get("callback_step"), accept=accept, reject=reject)


@dataclass
class Problem:
    """A validated solve: everything the loop needs except the output times."""

    func: Callable
    y0_user: Any
    items: list[torch.Tensor]
    layout: StateLayout
    rhs: RHS
    y0_flat: torch.Tensor
    method: type[Method]
    name: str
    opts: dict
    norm: ErrorNorm
    stats: SolverStats


def prepare(func, y0, *, rtol, atol, method, options, stats=None) -> Problem:
    """Validate everything that does not depend on the output times."""
    _check_func(func)
    items, is_tuple = _check_y0(y0)
    name, given = _resolve_method(method, options)
    opts = method_options(name, given)
    cls = SOLVERS[name]
    dtype, device = items[0].dtype, items[0].device
    layout = StateLayout([v.shape for v in items], is_tuple)
    stats = stats if stats is not None else SolverStats(method=name)
    stats.method = name
    rhs = RHS(func, layout, dtype, device, stats)
    ctrl = controller_or_default(opts) if cls.adaptive else None
    rtol = ctrl.rtol if ctrl is not None and ctrl.rtol is not None else rtol
    atol = ctrl.atol if ctrl is not None and ctrl.atol is not None else atol
    rtol_v = _tolerance("rtol", rtol, layout, rhs.dtype, device)
    atol_v = _tolerance("atol", atol, layout, rhs.dtype, device)
    y0_flat = layout.flatten(tuple(items) if is_tuple else items[0])
    if y0_flat.dtype != rhs.dtype:
        y0_flat = y0_flat.to(rhs.dtype)
    if cls.adaptive:
        _check_resolvable(name, rtol_v, atol_v, y0_flat, rhs.dtype)
    norm = ErrorNorm(layout, rtol_v, atol_v, opts.get("norm"))
    return Problem(func, y0, items, layout, rhs, y0_flat, cls, name, opts, norm, stats)


def run(p: Problem, ts: list[float], y0_flat: torch.Tensor | None = None, *,
        open_end=False, event_fn=None, stops=(), callbacks: Callbacks | None = None,
        record=False, throw=True, grid=None, checkpoint=None) -> LoopResult:
    """Run the loop for a prepared problem (``checkpoint``: a ``gradients.Checkpoint``, to
    differentiate by checkpointing instead of through the recorded graph)."""
    o = p.opts
    cls = p.method
    stepper = cls.make_stepper(o, p.norm)
    direction = 1.0 if len(ts) < 2 or ts[-1] > ts[0] else -1.0
    stops = list(stops)
    if cls.adaptive:
        end = direction * math.inf if open_end else ts[-1]
        stops += [Stop(v) for v in times_inside(cls.name, "step_t", o["step_t"], ts[0], end,
                                                direction)]
        jumps = times_inside(cls.name, "jump_t", o["jump_t"], ts[0], end, direction)
        stops += [Stop(v, "jump") for v in jumps]  # the loop merges stops at equal times
        if o.get("step_to_outputs") and not open_end:
            # implicit methods on stiff problems: outputs at step ends, not interpolated
            stops += [Stop(v) for v in ts[1:-1]]
    controller = make_controller(cls, o, p.norm, ts, p.func, p.y0_user, open_end, grid,
                                 [s.time for s in stops]) if len(ts) > 1 else None
    y_start = p.y0_flat if y0_flat is None else y0_flat
    if checkpoint is not None and torch.is_grad_enabled():
        from neuralode.checkpoint import integrate_checkpointed

        res = integrate_checkpointed(
            checkpoint, p.rhs, y_start, ts, lambda: cls.make_stepper(o, p.norm), controller,
            func=p.func, perturb=bool(o.get("perturb", False)), record=record,
            loop_kwargs={"stops": stops, "open_end": open_end, "event_fn": event_fn,
                         "callbacks": callbacks, "max_num_steps": o["max_num_steps"],
                         "throw": throw, "name": p.name})
    else:
        res = integrate(p.rhs, y_start, ts, stepper, controller, stops=stops,
                        open_end=open_end, event_fn=event_fn, callbacks=callbacks,
                        perturb=bool(o.get("perturb", False)),
                        max_num_steps=o["max_num_steps"], record=record, throw=throw,
                        name=p.name)
    p.stats.status = res.status
    p.stats.message = res.message
    p.stats.t_final = res.t_final
    p.stats.h_next = res.h_next
    return res


def _start_carrying_t0(p: Problem, t: torch.Tensor, ts: list[float]):
    """(y0 plus a zero-valued term that carries d y(t_i)/d t_0 = -Phi f(t_0, y_0), the
    zero-valued time offsets t - t.detach() in the state's dtype)."""
    t_state = t.to(p.rhs.dtype)
    dt = t_state - t_state.detach()
    with torch.no_grad():
        f_start = p.rhs.call(ts[0], p.y0_flat.detach())
    return p.y0_flat - dt[0] * f_start, dt


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
    g = gradient_strategy(gradient)
    if per_sample:
        _per_sample_gradient(g, "solve")
        return _per_sample("solve")(
            func, y0, t, rtol=rtol, atol=atol, method=method, options=options, throw=throw,
            event_fn=event_fn, dense=dense)
    if isinstance(g, Adjoint):
        return _solve_adjoint(func, y0, t, g, rtol=rtol, atol=atol, method=method,
                              options=options, event_fn=event_fn, dense=dense, throw=throw)
    checkpoint = g if isinstance(g, Checkpoint) else None
    p = prepare(func, y0, rtol=rtol, atol=atol, method=method, options=options)
    t = _check_t(t)
    ts = _times(t)
    if event_fn is not None and not callable(event_fn):
        raise ODEInputError(f"event_fn must be a callable event_fn(t, y), got "
                            f"{type(event_fn).__name__}")
    t_grad = t.requires_grad and torch.is_grad_enabled()
    y0_flat = p.y0_flat
    y0_solve, dt = _start_carrying_t0(p, t, ts) if t_grad else (y0_flat, None)
    res = run(p, ts, y0_solve, event_fn=event_fn, callbacks=_callbacks(func, p.method),
              record=dense, throw=throw, checkpoint=checkpoint)
    outs = res.outs
    outs[0] = y0_flat
    ys = torch.stack(outs)
    if t_grad and len(outs) > 1:
        with torch.no_grad():
            f_out = torch.stack([p.rhs.call(ts[i], outs[i].detach()) for i in range(1, len(outs))])
        ys = torch.cat([ys[:1], ys[1:] + dt[1:len(outs), None] * f_out])
    ys = _to_user(ys, p)
    dense_sol = None
    if dense:
        dense_sol = DenseSolution(res.segments, p.layout, ts[0], res.t_final, p.rhs.user_dtype)
    event_t = event_y = None
    if res.event_t is not None:
        event_t = torch.tensor(res.event_t, dtype=torch.float64).to(t.dtype)
        event_y = _to_user(res.event_y, p)
    return Solution(ys=p.layout.unflatten(ys), ts=t, stats=p.stats, status=res.status,
                    message=res.message, event_t=event_t, event_y=event_y,
                    t_final=res.t_final, y_final=p.layout.unflatten(_to_user(res.y_final, p)),
                    dense=dense_sol)


def _solve_adjoint(func, y0, t, g: Adjoint, *, rtol, atol, method, options, event_fn, dense,
                   throw) -> Solution:
    """``solve`` with the adjoint's gradient: the outputs of ``odeint_adjoint`` as a
    ``Solution``."""
    if event_fn is not None or dense or not throw:
        raise ODEInputError("solve(..., gradient='adjoint') supports neither event_fn, dense=True "
                            "nor throw=False; use odeint(..., event_fn=..., gradient='adjoint') "
                            "for events, or gradient='checkpoint' (exact gradients in little "
                            "memory)")
    from neuralode.adjoint import odeint_adjoint

    t = _check_t(t)
    ys, stats = odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method,
                               options=options, return_stats=True, **g.kwargs())
    last = tuple(y[-1] for y in ys) if isinstance(ys, tuple) else ys[-1]
    return Solution(ys=ys, ts=t, stats=stats, status=stats.status, message=stats.message,
                    t_final=stats.t_final, y_final=last)


def _to_user(y: torch.Tensor, p: Problem) -> torch.Tensor:
    return y if y.dtype == p.rhs.user_dtype else y.to(p.rhs.user_dtype)


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
        y0: initial state, a floating tensor of any shape (0-dim too) or a tuple of such.
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
            Bounded by ``max_num_steps`` (default 1e6 steps here), then an EventError.
        return_stats: also return a ``SolverStats`` (NFE, accepted and rejected steps).
        gradient: how the solve is differentiated: "backprop" (default: autograd through
            the solver), "checkpoint" (the same gradient, to rounding, with memory of one
            step's graph; ``neuralode.Checkpoint(budget=k)`` keeps at most k states),
            "adjoint" (``odeint_adjoint``; ``neuralode.Adjoint(...)`` carries its options),
            "interpolated_adjoint". See ``neuralode.gradients``.
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
    g = gradient_strategy(gradient)
    if isinstance(g, Adjoint):
        from neuralode.adjoint import odeint_adjoint

        return odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method,
                              options=options, event_fn=event_fn, return_stats=return_stats,
                              per_sample=per_sample, **g.kwargs())
    if per_sample:
        _per_sample_gradient(g, "odeint")
        return _per_sample("odeint", event_fn=event_fn)(
            func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
            return_stats=return_stats)
    if event_fn is not None:
        event_t, sol, stats = _event_solve(func, y0, t, rtol=rtol, atol=atol, method=method,
                                           options=options, event_fn=event_fn, gradient=g)
        return ((event_t, sol), stats) if return_stats else (event_t, sol)
    sol = solve(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, gradient=g)
    return (sol.ys, sol.stats) if return_stats else sol.ys


EVENT_MAX_STEPS = 10**6


def _per_sample_gradient(g, entry: str) -> None:
    """per_sample=True differentiates by backprop (or, through ``odeint``, the adjoint)."""
    if isinstance(g, Checkpoint):
        raise ODEInputError(f"{entry}(..., per_sample=True) does not support "
                            f"gradient='checkpoint' yet; use gradient='backprop' or (with "
                            f"odeint) gradient='adjoint', which solves backwards per sample")
    if isinstance(g, Adjoint):
        raise ODEInputError("solve(..., per_sample=True) differentiates by backprop; for the "
                            "adjoint use odeint(..., per_sample=True, gradient='adjoint')")


def _per_sample(entry: str, event_fn=None):
    """The per-sample front door (``neuralode.per_sample``), after refusing what it lacks."""
    if event_fn is not None:
        raise ODEInputError("odeint(..., per_sample=True) has no event mode; use "
                            "solve(..., per_sample=True, event_fn=...) (an event per sample)")
    from neuralode import per_sample
    return per_sample.solve_per_sample if entry == "solve" else per_sample.odeint_per_sample


def _event_solve(func, y0, t, *, rtol, atol, method, options, event_fn, callbacks=None,
                 stats=None, gradient=None):
    """torchdiffeq's event mode; returns (event_t, solution of y0 and y(event_t), stats)."""
    if not callable(event_fn):
        raise ODEInputError(f"event_fn must be a callable event_fn(t, y), got "
                            f"{type(event_fn).__name__}")
    opts = dict(options or {})
    p = prepare(func, y0, rtol=rtol, atol=atol, method=method, options=opts, stats=stats)
    if "max_num_steps" not in opts:
        p.opts["max_num_steps"] = EVENT_MAX_STEPS
    t = _check_t(t)
    ts = _times(t)
    if len(ts) < 2:
        raise ODEInputError("event mode needs t with at least two times: t[0] is the start, "
                            "t[1] gives the direction of integration")
    y0_solve = p.y0_flat
    if t.requires_grad and torch.is_grad_enabled():
        y0_solve, _ = _start_carrying_t0(p, t, ts)  # y(t*) at a fixed t* moves with t0
    res = run(p, ts[:2], y0_solve, open_end=True, event_fn=event_fn,
              callbacks=callbacks if callbacks is not None else _callbacks(func, p.method),
              throw=False, checkpoint=gradient if isinstance(gradient, Checkpoint) else None)
    if res.status != "event":
        raise EventError(f"{p.name}: event_fn never changed sign: the search from t0={ts[0]} "
                         f"stopped at t={res.t_final:.10g} without an event ({res.message})")
    ys = torch.stack([p.y0_flat, res.event_y])
    ys = p.layout.unflatten(_to_user(ys, p))
    event_t = torch.tensor(res.event_t, dtype=torch.float64).to(t.dtype)
    return event_t, ys, p.stats


def odeint_dense(func: Callable, y0, t0, t1, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
                 method: str | None = None, options: dict | None = None) -> DenseSolution:
    """Solve from ``t0`` to ``t1`` once and return the continuous solution, a callable
    ``sol(t)`` valid on [t0, t1] (as ``torchdiffeq.odeint_dense``; every method)."""
    times = torch.stack([torch.as_tensor(t0, dtype=torch.float64).reshape(()),
                         torch.as_tensor(t1, dtype=torch.float64).reshape(())])
    sol = solve(func, y0, times, rtol=rtol, atol=atol, method=method, options=options,
                dense=True)
    return sol.dense
