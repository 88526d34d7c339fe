"""``odeint_adjoint``: gradients by the adjoint sensitivity method (Chen et al. 2018, sec. 2).

The forward pass calls ``odeint`` without autograd and keeps only the outputs at the
requested times. The backward pass integrates, interval by interval from the last output
time to the first, the augmented system

    dy/dt = f(t, y),   da/dt = -a^T df/dy,   dg/dt = -a^T df/dtheta

starting each interval from the stored forward output and adding the loss's direct gradient
dL/dy(t_i) to the adjoint ``a`` at each output time. At t_0, ``a`` is dL/dy0 and ``g`` is
dL/dtheta. Gradients with respect to the times follow from the flow identities
dL/dt_i = <dL/dy(t_i), f(t_i, y_i)> (i > 0) and dL/dt_0 = -<a(t_0), f(t_0, y_0)>, so no
separate time-adjoint integral is needed.

Memory does not grow with the number of solver steps: nothing inside a solve is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from neuralode.errors import ODEInputError
from neuralode.odeint import Tolerance, _check_y0, _resolve_method, odeint, solve
from neuralode.solvers import SOLVERS
from neuralode.solvers.base import SolverStats, StateLayout


class AdjointStats(SolverStats):
    """Forward-solve statistics, plus ``backward`` (a ``SolverStats`` summed over the
    backward intervals; filled in when ``.backward()`` runs, None before)."""

    backward: SolverStats | None = None


def _seminorm(state) -> float:
    """Error norm over the state and its adjoint only, ignoring the parameter adjoint
    (Kidger, Chen & Lyons 2021, "Hey, that's not an ODE")."""
    y, a, _ = state
    vals = [torch.linalg.vector_norm(v) / math.sqrt(v.numel()) for v in (y, a) if v.numel()]
    return float(torch.stack(vals).max())


class _AdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, t, n_state, *tensors):
        y0_items = tensors[:n_state]
        params = tensors[n_state:]
        y0 = tuple(y0_items) if cfg["is_tuple"] else y0_items[0]
        with torch.no_grad():
            sol = solve(cfg["func"], y0, t, rtol=cfg["rtol"], atol=cfg["atol"],
                        method=cfg["method"], options=cfg["options"])
        cfg["stats"].__dict__.update({k: v for k, v in sol.stats.__dict__.items()})
        ys = sol.ys if cfg["is_tuple"] else (sol.ys,)
        ctx.cfg = cfg
        ctx.n_state = n_state
        ctx.save_for_backward(t, *ys, *params)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grad_ys):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "double backward (create_graph=True, or higher-order gradients) through "
                "odeint_adjoint is not supported; use neuralode.odeint for higher-order "
                "gradients")
        cfg = ctx.cfg
        n_state = ctx.n_state
        saved = ctx.saved_tensors
        t = saved[0]
        ys = saved[1:1 + n_state]
        params = saved[1 + n_state:]
        layout: StateLayout = cfg["layout"]
        func = cfg["func"]
        ts = t.detach().to(torch.float64)
        n_t = len(ts)
        dtype, device = ys[0].dtype, ys[0].device

        # flat (len(t), n) views of outputs and their incoming gradients
        ys_flat = torch.cat([y.reshape(n_t, -1) for y in ys], dim=1)
        g_flat = torch.cat([g.reshape(n_t, -1) for g in grad_ys], dim=1)

        def flat_func(tt, y):
            return layout.flatten(func(tt, layout.unflatten(y)))

        def aug_dynamics(tt, state):
            y, a, _ = state
            with torch.enable_grad():
                y_ = y.detach().requires_grad_(True)
                f = flat_func(tt, y_)
                grads = torch.autograd.grad(f, (y_,) + params, -a, allow_unused=True)
            da = grads[0] if grads[0] is not None else torch.zeros_like(y)
            if params:
                dg = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                for g, p in zip(grads[1:], params)])
            else:
                dg = y.new_zeros(0)
            return f.detach(), da, dg

        n_par = sum(p.numel() for p in params)
        a = torch.zeros_like(ys_flat[0])
        gp = torch.zeros(n_par, dtype=dtype, device=device)
        back = SolverStats(method=cfg["adjoint_method"], status="success")
        nonzero = [i for i in range(n_t) if bool(g_flat[i].any())]
        last = nonzero[-1] if nonzero else 0
        opts = dict(cfg["adjoint_options"])
        # carry the step size from one interval to the next instead of re-running the
        # initial-step heuristic at every output time (adaptive methods, unless set by the user)
        carry = "first_step" in SOLVERS[cfg["adjoint_method"]].OPTIONS and "first_step" not in opts
        for i in range(last, 0, -1):
            a = a + g_flat[i]
            sol = solve(aug_dynamics, (ys_flat[i], a, gp), ts[i - 1:i + 1].flip(0),
                        rtol=cfg["adjoint_rtol"], atol=cfg["adjoint_atol"],
                        method=cfg["adjoint_method"], options=opts)
            if carry and math.isfinite(sol.stats.h_next):
                opts["first_step"] = sol.stats.h_next
            _, a_seq, g_seq = sol.ys
            a, gp = a_seq[-1], g_seq[-1]
            for k in ("nfe", "n_accepted", "n_rejected"):
                setattr(back, k, getattr(back, k) + getattr(sol.stats, k))
        a_t0 = a  # adjoint from the later outputs only: out[0] = y0 does not depend on t0
        a = a + g_flat[0]
        cfg["stats"].backward = back

        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = torch.zeros(n_t, dtype=dtype, device=device)
            with torch.no_grad():
                for i in range(n_t):
                    w = g_flat[i] if i > 0 else -a_t0
                    if i > 0 and not bool(w.any()):
                        continue
                    tt = torch.full((), ts[i].item(), dtype=dtype, device=device)
                    grad_t[i] = torch.dot(w, flat_func(tt, ys_flat[i]))
            grad_t = grad_t.to(t.dtype)
        grad_y0 = layout.unflatten(a)
        grad_y0 = grad_y0 if layout.is_tuple else (grad_y0,)
        grad_params = []
        offset = 0
        for p in params:
            grad_params.append(gp[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return (None, grad_t, None, *grad_y0, *grad_params)


def odeint_adjoint(func: Callable, y0, t, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
                   method: str | None = None, options: dict | None = None,
                   adjoint_rtol: Tolerance | None = None, adjoint_atol: Tolerance | None = None,
                   adjoint_method: str | None = None, adjoint_options: dict | None = None,
                   adjoint_params: Iterable[torch.Tensor] | None = None,
                   return_stats: bool = False):
    """``odeint`` whose backward pass solves the adjoint ODE instead of backpropagating
    through the solver: memory independent of the number of steps. Drop-in compatible with
    ``torchdiffeq.odeint_adjoint``.

    Args (beyond ``odeint``'s):
        adjoint_rtol, adjoint_atol, adjoint_method: for the backward solve (default: the
            forward ones).
        adjoint_options: options of the backward solve; defaults to ``options`` when the
            method is the same (without a forward ``norm``). ``{"norm": "seminorm"}``
            leaves the parameter adjoint out of the step-size error norm, which usually
            cuts backward function evaluations.
        adjoint_params: tensors whose gradients the backward pass computes (default: the
            parameters of ``func``, which must then be an ``nn.Module``, that require grad).
        return_stats: also return an ``AdjointStats``; its ``backward`` field is filled
            with the backward-solve statistics once ``.backward()`` has run.
    """
    if adjoint_params is None:
        if not isinstance(func, nn.Module):
            raise ODEInputError(
                f"odeint_adjoint needs func to be an nn.Module (to find the parameters to "
                f"differentiate), got {type(func).__name__}; pass adjoint_params=(tensors...) "
                f"to differentiate a plain callable")
        params = tuple(p for p in func.parameters() if p.requires_grad)
    else:
        if isinstance(adjoint_params, torch.Tensor):
            adjoint_params = (adjoint_params,)
        try:
            params = tuple(adjoint_params)
        except TypeError:
            raise ODEInputError(f"adjoint_params must be an iterable of tensors, got "
                                f"{type(adjoint_params).__name__}")
        for k, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise ODEInputError(f"adjoint_params[{k}] must be a tensor, got "
                                    f"{type(p).__name__}")
        params = tuple(p for p in params if p.requires_grad)
    # keep each parameter once (shared modules) to avoid double-counted gradients
    seen, unique = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    params = tuple(unique)

    method_name, opts = _resolve_method(method, options)
    if adjoint_method is None:
        adjoint_method = method_name
    if adjoint_options is None:
        if options and adjoint_method != method_name:
            raise ODEInputError(
                f"adjoint_method={adjoint_method!r} differs from method={method_name!r} and "
                f"options were given for the forward solve; pass adjoint_options for the "
                f"backward solve explicitly (e.g. adjoint_options={{}})")
        adjoint_options = {k: v for k, v in opts.items() if k != "norm"}
    else:
        adjoint_options = dict(adjoint_options)
    if adjoint_options.get("norm") == "seminorm":
        adjoint_options["norm"] = _seminorm
    elif isinstance(adjoint_options.get("norm"), str):
        raise ODEInputError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got "
                            f"{adjoint_options['norm']!r}")
    adj_method_name, adjoint_options = _resolve_method(adjoint_method, adjoint_options)
    adjoint_rtol = rtol if adjoint_rtol is None else adjoint_rtol
    adjoint_atol = atol if adjoint_atol is None else adjoint_atol

    items, is_tuple = _check_y0(y0)
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)
    layout = StateLayout([v.shape for v in items], is_tuple)
    stats = AdjointStats(method=method_name)
    cfg = {"func": func, "is_tuple": is_tuple, "layout": layout, "rtol": rtol, "atol": atol,
               "method": method_name, "options": opts, "adjoint_rtol": adjoint_rtol,
               "adjoint_atol": adjoint_atol, "adjoint_method": adj_method_name,
               "adjoint_options": adjoint_options, "stats": stats}
    # validate the backward configuration now, not deep inside .backward()
    for name, tol in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if isinstance(tol, torch.Tensor) and tol.requires_grad:
            raise ODEInputError(f"{name} must not require grad")
        if not isinstance(tol, (tuple, list)):
            try:
                ok = float(tol) >= 0 and math.isfinite(float(tol))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ODEInputError(f"{name} must be a non-negative finite number, got {tol!r}")

    needs_grad = torch.is_grad_enabled() and (
        t.requires_grad or any(v.requires_grad for v in items) or bool(params))
    if not needs_grad:
        ys, fstats = odeint(func, y0, t, rtol=rtol, atol=atol, method=method_name,
                            options=opts, return_stats=True)
        stats.__dict__.update(fstats.__dict__)
        return (ys, stats) if return_stats else ys
    outs = _AdjointFunction.apply(cfg, t, len(items), *items, *params)
    ys = tuple(outs) if is_tuple else outs[0]
    return (ys, stats) if return_stats else ys
