"""The front door: ``odeint`` (torchdiffeq-compatible) and ``solve`` (returns statistics).

It validates input where it enters, flattens tensor and tuple states into one 1-D state,
picks the solver from the registry, runs it, and restores the user's structure.

Gradients: with respect to ``y0`` and to parameters used by ``func`` they come from autograd
through the solver's operations (the paper's "RK-Net"). With respect to the times ``t`` they
use the exact identities of the ODE flow,
    d y(t_i) / d t_i = f(t_i, y(t_i)),     d y(t_i) / d t_0 = -Phi(t_i, t_0) f(t_0, y_0),
attached to the discrete solution; this costs one extra evaluation of f per output time and
is only done when ``t.requires_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neuralode.errors import ODEInputError
from neuralode.solvers import ALIASES, DEFAULT_METHOD, SOLVERS
from neuralode.solvers.base import RHS, SolverStats, StateLayout

Tolerance = float | torch.Tensor | Sequence[float]


@dataclass
class ODESolution:
    """Result of ``solve``: ``ys`` (the solution at every time, first dim len(ts); a tuple
    for tuple states), ``ts`` (the times, as given), ``stats`` (``SolverStats``)."""

    ys: Any
    ts: torch.Tensor
    stats: SolverStats


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
            raise ODEInputError(f"t must be a 1-D tensor of times, got {type(t).__name__}")
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
    """A float, or a flat (n,) tensor for per-tuple-element tolerances."""

    def scalar(v, where):
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                raise ODEInputError(f"{where} must not require grad")
            if v.numel() != 1:
                raise ODEInputError(f"{where} must be a scalar, got shape {tuple(v.shape)}")
            v = v.item()
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ODEInputError(f"{where} must be a non-negative number, got {v!r}")
        if not (v >= 0 and math.isfinite(v)):
            raise ODEInputError(f"{where} must be a non-negative finite number, got {v!r}")
        return v

    if isinstance(tol, (tuple, list)):
        if not layout.is_tuple or len(tol) != len(layout.shapes):
            raise ODEInputError(
                f"{name} given as a sequence of {len(tol)} values; a sequence is only valid for a "
                f"tuple state, with one value per element ({len(layout.shapes)} here"
                f"{'' if layout.is_tuple else ': y0 is a single tensor'})")
        vals = [scalar(v, f"{name}[{k}]") for k, v in enumerate(tol)]
        if len(set(vals)) == 1:
            return vals[0]
        return torch.cat([torch.full((m,), v, dtype=dtype, device=device)
                          for v, m in zip(vals, layout.numels)])
    return scalar(tol, name)


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


def solve(func: Callable, y0, t, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
          method: str | None = None, options: dict | None = None) -> ODESolution:
    """Solve dy/dt = func(t, y), y(t[0]) = y0, and return the solution at every time in ``t``
    together with solver statistics. Arguments as for ``odeint``."""
    _check_func(func)
    items, is_tuple = _check_y0(y0)
    t = _check_t(t)
    ts = _times(t)
    name, opts = _resolve_method(method, options)
    dtype, device = items[0].dtype, items[0].device
    layout = StateLayout([v.shape for v in items], is_tuple)
    rtol_v = _tolerance("rtol", rtol, layout, dtype, device)
    atol_v = _tolerance("atol", atol, layout, dtype, device)

    stats = SolverStats(method=name)
    rhs = RHS(func, layout, dtype, device, stats)
    y0_flat = layout.flatten(tuple(items) if is_tuple else items[0])
    solver_cls = SOLVERS[name]

    t_grad = t.requires_grad and torch.is_grad_enabled()
    if t_grad:
        t_state = t.to(dtype)
        dt = t_state - t_state.detach()  # zero-valued, carries d/dt
        with torch.no_grad():
            f_start = rhs(ts[0], y0_flat.detach())
        y0_solve = y0_flat - dt[0] * f_start
    else:
        y0_solve = y0_flat

    solver = solver_cls(rhs, y0_solve, rtol_v, atol_v, opts.get("norm"), options=opts)
    solver.func_for_grid = func
    solver.y0_user = y0
    outs = solver.integrate(ts)
    outs[0] = y0_flat
    ys = torch.stack(outs)
    if t_grad and len(ts) > 1:
        with torch.no_grad():
            f_out = torch.stack([rhs(ts[i], outs[i].detach()) for i in range(1, len(ts))])
        ys = torch.cat([ys[:1], ys[1:] + dt[1:, None] * f_out])
    return ODESolution(ys=layout.unflatten(ys), ts=t, stats=stats)


def odeint(func: Callable, y0, t, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
           method: str | None = None, options: dict | None = None,
           return_stats: bool = False):
    """Integrate dy/dt = func(t, y) from y(t[0]) = y0 and return y at every time in ``t``.

    Drop-in compatible with ``torchdiffeq.odeint``.

    Args:
        func: callable ``func(t, y)``; ``t`` is a 0-d tensor (the state's dtype), ``y`` has the
            structure of ``y0``; returns dy/dt with the same structure, shapes and dtype.
        y0: initial state, a floating tensor of any shape or a tuple of such tensors.
        t: 1-D tensor of times, strictly increasing or strictly decreasing; ``t[0]`` is the
            time of ``y0``. Time is handled in float64 internally.
        rtol, atol: relative and absolute tolerances (adaptive methods; also the corrector of
            ``implicit_adams``); a float, or one per element of a tuple state.
        method: one of ``neuralode.SOLVERS`` (default ``"dopri5"``).
        options: method options, e.g. ``step_size`` for fixed-grid methods, or ``first_step``,
            ``max_num_steps``, ``norm``... for adaptive ones (see the README).
        return_stats: also return a ``SolverStats`` (NFE, accepted and rejected steps).

    Returns:
        Tensor of shape ``(len(t), *y0.shape)`` (a tuple of those for tuple states), whose
        first entry is ``y0``; and the stats if ``return_stats``.
    """
    sol = solve(func, y0, t, rtol=rtol, atol=atol, method=method, options=options)
    return (sol.ys, sol.stats) if return_stats else sol.ys
