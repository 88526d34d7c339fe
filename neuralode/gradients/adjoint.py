"""``odeint_adjoint``: gradients by the adjoint sensitivity method (Chen et al. 2018, sec. 2).

The forward pass runs the solve without autograd and keeps only the outputs at the
requested times. The backward pass is ONE reverse solve, from the last output time with a
nonzero incoming gradient back to t_0, of the augmented system

    dy/dt = f(t, y),   da/dt = -a^T df/dy,   dg/dt = -a^T df/dtheta

on the one integration loop: the output times are stops where the state jumps (the adjoint
``a`` gains the loss's direct gradient dL/dy(t_i), and ``y`` is reset to the stored forward
output, which removes the drift of the backward reconstruction). At t_0, ``a`` is dL/dy0 and
``g`` is dL/dtheta. Gradients with respect to the times follow from the flow identities
dL/dt_i = <dL/dy(t_i), f(t_i, y_i)> (i > 0) and dL/dt_0 = -<a(t_0), f(t_0, y_0)>, so no
separate time-adjoint integral is needed.

Memory does not grow with the number of solver steps: nothing inside a solve is recorded.
The backward configuration (method, options, tolerances) is validated before the forward
solve, not inside ``.backward()``.

``interpolated=True`` (the interpolated adjoint, as in Daulbaev et al. 2020 and ACA/MALI's
motivation): the forward solve keeps its dense output, and the backward solve reads y(t)
from it instead of integrating y backwards, so the gradient does not suffer from an
unstable backward reconstruction (dissipative dynamics); memory grows with the forward
steps (one interpolant per step), not with the graph.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from neuralode.compiled import one_as_batch, solve_compiled_one, wants_compile, without_compile
from neuralode.errors import ODEInputError
from neuralode.gradients.adjoint_jacobian import AdjointJacobian
from neuralode.gradients.backprop import Backprop
from neuralode.parameters import as_tensors, find_params, functional_flat, module_names
from neuralode.per_sample import (
    PER_SAMPLE_OPTIONS,
    PerSampleSolution,
    batched_parts,
    integrate_batched,
    run_compiled,
    run_sample_by_sample,
    setup,
)
from neuralode.problem import (
    CALLBACK_NAMES,
    Tolerance,
    check_t,
    check_y0,
    event_solve,
    find_callbacks,
    prepare,
    resolve_method,
    run,
    solve_problem,
    state_layout,
    times_of,
)
from neuralode.solution import DenseSolution, Solution
from neuralode.solvers.base import PerSampleStats, SolverStats, StateLayout
from neuralode.solvers.compiled import (
    BackpropRefused,
    CompileFailure,
    CompileFallbackWarning,
    lru_get,
)
from neuralode.solvers.controllers import ErrorNorm
from neuralode.solvers.loop import Stop
from neuralode.solvers.registry import SOLVERS
from neuralode.solvers.timekeeping import time_dtype

ADJOINT_CALLBACK_NAMES = tuple(n + "_adjoint" for n in CALLBACK_NAMES)


class AdjointStats(SolverStats):
    """Forward-solve statistics, plus ``backward`` (the backward solve's ``SolverStats``,
    filled in when ``.backward()`` runs, None before)."""

    backward: SolverStats | None = None


@dataclass(frozen=True)
class Adjoint:
    """The adjoint method (``odeint_adjoint``); fields are its ``adjoint_*`` arguments.
    interpolated: the backward solve reads y(t) from the forward solve's dense output
    (memory grows with the forward steps; no backward reconstruction error); None (the
    default): True for the stiff methods (``backsolve_unstable``), False otherwise. Per sample:
    the batched driver's per-sample backward solve, or each sample's own adjoint (the
    interpolated adjoint, and wherever the float clock runs)."""

    rtol: Any = None
    atol: Any = None
    method: str | None = None
    options: dict | None = None
    params: Any = None
    interpolated: bool | None = None
    name = "adjoint"

    def __post_init__(self):
        if self.interpolated not in (None, True, False):
            raise ODEInputError(f"Adjoint interpolated must be True, False or None (True for "
                                f"the stiff methods), got {self.interpolated!r}")
        if self.params is not None:
            object.__setattr__(self, "params", as_tensors(self.params, "Adjoint params"))

    @property
    def tensor_clock(self) -> bool:
        return not self.interpolated

    def kwargs(self) -> dict:
        """Keyword arguments of ``odeint_adjoint``."""
        return {"adjoint_rtol": self.rtol, "adjoint_atol": self.atol,
                "adjoint_method": self.method, "adjoint_options": self.options,
                "adjoint_params": self.params, "interpolated": self.interpolated}

    def solve(self, func, y0, t, *, rtol, atol, method=None, options=None, event_fn=None,
              dense: bool = False, throw: bool = True, per_sample: bool = False,
              sync_counter=None):
        """``solve`` with the adjoint's gradient: the outputs of ``odeint_adjoint`` as a
        ``Solution`` (per sample a ``PerSampleSolution``)."""
        if event_fn is not None or dense or not throw:
            raise ODEInputError("solve(..., gradient='adjoint') supports neither event_fn, "
                                "dense=True nor throw=False; use odeint(..., event_fn=..., "
                                "gradient='adjoint') for events, or gradient='checkpoint' "
                                "(exact gradients in little memory)")
        if per_sample:
            return _solve_per_sample(self, func, y0, t, rtol=rtol, atol=atol, method=method,
                                     options=options)
        t = check_t(t)
        ys, stats = odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method,
                                   options=options, return_stats=True, **self.kwargs())
        last = tuple(y[-1] for y in ys) if isinstance(ys, tuple) else ys[-1]
        return Solution(ys=ys, ts=t, stats=stats, status=stats.status, message=stats.message,
                        t_final=stats.t_final, y_final=last)

    def event(self, func, y0, t, *, rtol, atol, method=None, options=None, event_fn):
        (event_t, ys), stats = odeint_adjoint(func, y0, t, rtol=rtol, atol=atol,
                                              method=method, options=options,
                                              event_fn=event_fn, return_stats=True,
                                              **self.kwargs())
        return event_t, ys, stats


def adjoint_derivatives(f_of_y: Callable, y: torch.Tensor, a: torch.Tensor, params,
                        need_y: bool = True):
    """The adjoint system's derivatives, for one problem (y (n,)) and per sample (y (B, n),
    rows independent): (f(y), -a^T df/dy, -a^T df/dparams), one vector-Jacobian product.
    ``need_y`` False skips -a^T df/dy (None). A parameter f does not use gives None."""
    with torch.enable_grad():
        y_ = y.detach().requires_grad_(need_y)
        f = f_of_y(y_)
        inputs = ((y_,) if need_y else ()) + tuple(params)
        if f.requires_grad and inputs:
            # retain_graph: f may reach the parameters through tensors computed outside
            # func (shared by every call); only this call's own graph is dropped, with f
            grads = torch.autograd.grad(f, inputs, -a, allow_unused=True, retain_graph=True)
        else:  # f depends on neither y nor the parameters
            grads = (None,) * len(inputs)  # type: ignore[assignment]
    if not need_y:
        return f.detach(), None, grads
    da = grads[0] if grads[0] is not None else torch.zeros_like(y)
    return f.detach(), da, grads[1:]


def _seminorm(state) -> float:
    """Error norm over the state and its adjoint only, ignoring the parameter adjoint
    (Kidger, Chen & Lyons 2021, "Hey, that's not an ODE")."""
    y, a, _ = state
    vals = [torch.linalg.vector_norm(v) / math.sqrt(v.numel()) for v in (y, a) if v.numel()]
    return float(torch.stack(vals).max())


def _backward_tolerance(tol, layout: StateLayout):
    """The forward tolerance (a number, a tensor broadcastable to the state, or one value per
    tuple element) as tolerances of the backward state (y, a, parameter adjoint)."""
    if isinstance(tol, (tuple, list)) and layout.is_tuple:
        parts = [torch.as_tensor(v, dtype=torch.float64).broadcast_to(s).reshape(-1)
                 for v, s in zip(tol, layout.shapes)]
        flat = torch.cat(parts)
        return [flat, flat, float(flat.min()) if flat.numel() else 0.0]
    if isinstance(tol, torch.Tensor) and tol.numel() > 1 and not layout.is_tuple:
        flat = tol.detach().to(torch.float64).broadcast_to(layout.shapes[0]).reshape(-1)
        return [flat, flat, float(flat.min())]
    return tol


def _user_adjoint_norm(norm: Callable, layout: StateLayout, params):
    """A user's adjoint norm, called as torchdiffeq calls it: with the tuple
    ``(t, *y, *adj_y, *adj_params)`` (y and adj_y in the user's structure; t is the time
    adjoint, which neuralode does not integrate: a zero)."""
    shapes = [p.shape for p in params]

    def wrapped(state):
        y, a, gp = state
        ys = layout.unflatten(y)
        adj = layout.unflatten(a)
        ys = ys if layout.is_tuple else (ys,)
        adj = adj if layout.is_tuple else (adj,)
        parts, k = [], 0
        for s in shapes:
            n = math.prod(s)
            parts.append(gp[k:k + n].reshape(s))
            k += n
        return norm((y.new_zeros(()), *ys, *adj, *parts))
    return wrapped


class _BackwardDynamics:
    """The backward system's right-hand side; implicit methods ask it for their Jacobian
    (``implicit_jacobian``: built from the user's f, see
    ``neuralode.gradients.adjoint_jacobian``) and
    solve only the (y, a) head by Newton (the parameter adjoint is a quadrature)."""

    def __init__(self, backward: _Backward):
        self.backward = backward

    def __call__(self, t, state):
        return self.backward._dynamics(t, state)

    def implicit_jacobian(self, spec, rhs, name: str):
        b = self.backward
        return AdjointJacobian(spec, b.func, b.layout, rhs, name), 2 * b.n


class _Backward:
    """The backward solve, prepared (and so validated) before the forward pass."""

    def __init__(self, func, layout: StateLayout, params, dtype, device, rtol, atol, method,
                 options, stats: AdjointStats, interpolated: bool = False):
        self.func, self.layout, self.params = func, layout, params
        self.interpolated = interpolated
        # the forward solve's dense output (interpolated adjoint)
        self.dense: DenseSolution | None = None
        self.n = layout.n
        self.n_par = sum(p.numel() for p in params)
        self.dtype, self.device = dtype, device
        self.stats = stats
        aug0 = (torch.zeros(self.n, dtype=dtype, device=device),
                torch.zeros(self.n, dtype=dtype, device=device),
                torch.zeros(self.n_par, dtype=dtype, device=device))
        self.problem = prepare(_BackwardDynamics(self), aug0,
                               rtol=_backward_tolerance(rtol, layout),
                               atol=_backward_tolerance(atol, layout), method=method,
                               options=options, stats=SolverStats())
        self.callbacks = find_callbacks(func, self.problem.method, ADJOINT_CALLBACK_NAMES)
        self.settings = (rtol, atol, method, options)  # (for the compiled backward solve)

    def flat_func(self, t, y):
        return self.layout.flatten(self.func(t, self.layout.unflatten(y)))

    def _dynamics(self, t, state):
        y, a, _ = state
        if self.dense is not None:  # y(t) from the forward solve's dense output
            y = self.dense.flat_at(float(t)).to(self.dtype)
        f, da, gp = adjoint_derivatives(lambda y_: self.flat_func(t, y_), y, a, self.params)
        if self.params:
            dg = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                            for g, p in zip(gp, self.params)])
        else:
            dg = y.new_zeros(0)
        if self.dense is not None:  # y is read from the dense output, not integrated
            return torch.zeros_like(y), da, dg
        return f, da, dg

    def _grid(self, t0: float, t_last: float):
        """The backward grid of a fixed-grid method, or None (adaptive methods, and grids
        that are the output times). With ``step_size``: the forward grid's points (anchored
        at t0) walked backwards, so the reconstruction of y lands where the forward solve
        stepped. With a ``grid_constructor``: the constructor asked for [t_last, t0], as
        torchdiffeq asks it."""
        p = self.problem
        if p.method.adaptive:
            return None
        if p.opts.get("grid_constructor") is not None:
            return p.method.grid(p.opts, [t_last, t0], self._dynamics, None, False)
        if p.opts.get("step_size") is None:
            return None
        forward = p.method.grid(p.opts, [t0, t_last], None, None, False)
        return (forward[k] for k in range(len(forward) - 1, -1, -1))

    def __call__(self, ts: torch.Tensor, ys_flat: torch.Tensor, g_flat: torch.Tensor):
        """(dL/dy0 flat, dL/dparams flat, adjoint at t0 from the later outputs only)."""
        times = ts.tolist()
        last = _last_with_gradient(g_flat)
        a = g_flat[last].clone() if last > 0 else torch.zeros_like(g_flat[0])
        gp = torch.zeros(self.n_par, dtype=self.dtype, device=self.device)
        stats = self.problem.stats
        stats.nfe = stats.n_accepted = stats.n_rejected = 0
        if last > 0:
            n = self.n

            def make_hook(i):
                def hook(t, state):
                    state = state.clone()
                    state[:n] = ys_flat[i]
                    state[n:2 * n] += g_flat[i]
                    return state
                return hook

            stops = [Stop(times[i], "hook", make_hook(i)) for i in range(1, last)]
            start = torch.cat([ys_flat[last], a, gp])
            res = run(self.problem, [times[last], times[0]], start, stops=stops,
                      callbacks=self.callbacks, grid=self._grid(times[0], times[last]))
            end = res.y_final
            a, gp = end[n:2 * n], end[2 * n:]
        self.stats.backward = stats
        a_t0 = a  # adjoint from the later outputs only: out[0] = y0 does not depend on t0
        return a + g_flat[0], gp, a_t0

    def compiled(self, ts: torch.Tensor, ys_flat: torch.Tensor, g_flat: torch.Tensor,
                 backend) -> tuple | None:
        """``__call__`` with the backward solve compiled (``adjoint_options['compile']``): one
        compiled solve from the last output with a gradient back to t_0 that stops at the
        output times in between, where the state (y, a, parameter adjoint) jumps as the
        eager solve's stops make it: y reset to the forward output, the output's gradient
        added to a. Times, states, jumps and tolerances are inputs of the compiled loop:
        later backward passes reuse it. None, with a ``CompileFallbackWarning``, where
        it cannot serve: func not an nn.Module whose own parameters and buffers are all the
        parameters, a scalar tolerance missing, a norm (seminorm or the user's), callbacks,
        the interpolated adjoint, or a backward method the compiled loop does not run."""
        rtol, atol, method, options = self.settings
        system = _compiled_system(self.func, self.params, self.layout)
        reasons = [why for why, bad in (
            ("func is not an nn.Module owning every parameter", system is None),
            ("the interpolated adjoint", self.interpolated),
            ("callbacks", bool(self.callbacks)),
            ("tensor tolerances", not all(isinstance(v, (int, float)) for v in (rtol, atol))),
            ("a norm (the seminorm or the user's)", (options or {}).get("norm") is not None),
            (f"the method {method!r}", not SOLVERS[method].tensor_clock
             or SOLVERS[method].builds_jacobians())) if bad]
        if reasons or system is None:
            warnings.warn(f"odeint_adjoint: adjoint_options['compile'] cannot compile this "
                          f"backward solve ({'; '.join(reasons)}); it runs eagerly",
                          CompileFallbackWarning, stacklevel=3)
            return None
        last = _last_with_gradient(g_flat)
        n, dtype, device = self.n, self.dtype, self.device
        gp = torch.zeros(self.n_par, dtype=dtype, device=device)
        stats = SolverStats(method=method, status="success")
        if last == 0:
            a = torch.zeros_like(g_flat[0])
        else:
            # one compiled solve from t_last back to t_0 (a batch of one, state (y, a,
            # parameter adjoint) flat); at each output time in between it stops and jumps:
            # y <- the forward output there, a <- a + dL/dy there
            back = torch.arange(last, -1, -1, device=ts.device)
            times = ts[back]
            z = torch.zeros(len(times), 1, self.n_par, dtype=dtype, device=device)
            J = torch.cat([ys_flat[back, None], g_flat[back, None], z], -1)
            keep = torch.cat([torch.zeros(n, dtype=dtype, device=device),
                              torch.ones(n + self.n_par, dtype=dtype, device=device)])
            y0 = (ys_flat[last][None], g_flat[last][None], gp[None])
            st = setup(one_as_batch(system, True), y0, times[None], rtol=rtol, atol=atol,
                       method=method, options={**(options or {}), "compile": backend},
                       tensor_clock=True)
            try:
                res = run_compiled(st, jumps=(J, keep), outputs=False)  # (y_final only)
            except CompileFailure as e:
                warnings.warn(f"odeint_adjoint: the backward solve could not be compiled "
                              f"({e}); it runs eagerly", CompileFallbackWarning, stacklevel=3)
                return None
            end = res.y_final[0]
            a, gp = end[n:2 * n], end[2 * n:]
            ps = st.p.stats
            stats.nfe, stats.compile_s, stats.n_compiles = ps.nfe, ps.compile_s, ps.n_compiles
            stats.n_accepted, stats.n_rejected = int(res.n_accepted[0]), int(res.n_rejected[0])
            stats.t_final = float(res.t_final[0])
        self.stats.backward = stats
        return a + g_flat[0], gp, a


def _last_with_gradient(g_flat: torch.Tensor) -> int:
    """The last output index with a nonzero incoming gradient (0 when none has one): where
    the backward solve starts. One read from the device for all outputs (not one each)."""
    nonzero = g_flat.reshape(len(g_flat), -1).any(1).nonzero().flatten().tolist()
    return nonzero[-1] if nonzero else 0


# (id(func), structure) -> the backward system; each entry keeps its func alive (so its id
# is not reused), at most MAX_SYSTEMS of them (least recently used dropped), as the
# compiled driver keeps its loops
_SYSTEMS: OrderedDict = OrderedDict()
MAX_SYSTEMS = 64


def _compiled_system(func, params, layout: StateLayout) -> Callable | None:
    """The backward system as a function of (t, (y, a, parameter adjoint)) that
    torch.compile can trace: f and both vector-Jacobian products by one ``torch.func.vjp``
    (``torch.autograd.grad`` is not traced), with func's parameters swapped in by
    ``torch.func.functional_call``. One function object per (func, parameters, state
    structure), kept in ``_SYSTEMS``, so that the compiled loop is reused by every
    backward pass. None when func is not an ``nn.Module`` or a parameter is not one of its
    own parameters or buffers."""
    names = module_names(func, params)
    if names is None:
        return None
    # (the parameters' ids too: a parameter replaced on the module is another system)
    key = (id(func), names, tuple(id(p) for p in params), tuple(map(tuple, layout.shapes)),
           layout.is_tuple, layout.complex_dtype)
    return lru_get(_SYSTEMS, key, lambda: _make_system(func, names, tuple(params), layout),
                   MAX_SYSTEMS)


def _make_system(func, names, params, layout):
    f_flat = functional_flat(func, names, layout)

    def system(t, state):
        y, a, _ = state
        out, vjp = torch.func.vjp(lambda yv, *ps: f_flat(t, yv, ps), y, *params)
        grads = vjp(-a)
        dg = torch.cat([g.reshape(-1) for g in grads[1:]]) if params else y.new_zeros(0)
        return out, grads[0], dg
    return system


def _forward_solve(cfg: dict, y0, t, dense: bool) -> Solution:
    """``odeint_adjoint``'s forward solve (no graph): on the loop, or compiled
    (``options['compile']``, which keeps no dense output)."""
    if cfg["compile"]:
        return solve_compiled_one(cfg["func"], y0, t, rtol=cfg["rtol"],
                                  atol=cfg["atol"], method=cfg["method"],
                                  options={**cfg["options"], "compile": cfg["compile"]})
    return solve_problem(prepare(cfg["func"], y0, rtol=cfg["rtol"], atol=cfg["atol"],
                                 method=cfg["method"], options=cfg["options"]), t, dense=dense)


_UNLISTED = (
    "odeint_adjoint: the solution depends on tensors that require grad, but the adjoint "
    "differentiates none (func has no parameters that require grad, as an nn.Module, and "
    "adjoint_params gave none): {what}. Pass those tensors in adjoint_params "
    "(gradient=Adjoint(params=...)) for the adjoint's gradient, or solve under "
    "torch.no_grad() where no gradient is wanted")


def _warn_unlisted(ys) -> None:
    """A solve that the adjoint does not differentiate (no parameters, no y0 or t that
    requires grad) whose outputs carry a graph all the same (``func`` reaches tensors that
    require grad, a plain callable's closure say): say so; that graph is backprop's, through
    every step (torchdiffeq's outputs would carry none, and such tensors get no gradient)."""
    if torch.is_grad_enabled() and any(
            y.requires_grad for y in (ys if isinstance(ys, tuple) else (ys,))):
        warnings.warn(_UNLISTED.format(
            what="they are differentiated by backprop through the forward solve's steps, "
                 "with memory that grows with the steps"), stacklevel=3)


class _AdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, t, n_state, *tensors):
        y0_items = tensors[:n_state]
        params = tensors[n_state:]
        y0 = tuple(y0_items) if cfg["is_tuple"] else y0_items[0]
        with torch.no_grad():
            if cfg["event_fn"] is None:
                sol = _forward_solve(cfg, y0, t, dense=cfg["backward"].interpolated)
                ys, fstats = sol.ys, sol.stats
                ctx.dense = sol.dense
                t_out = t
                event_t = None
            else:
                event_t, ys, fstats = event_solve(
                    cfg["func"], y0, t, rtol=cfg["rtol"], atol=cfg["atol"],
                    method=cfg["method"], options=cfg["options"], event_fn=cfg["event_fn"])
                tdt = torch.promote_types(t.dtype, time_dtype(t.device))
                t_out = torch.stack([t[0].detach().to(tdt), event_t.to(tdt)])
        cfg["stats"].__dict__.update({k: v for k, v in fstats.__dict__.items()})
        ys = ys if cfg["is_tuple"] else (ys,)
        ctx.cfg = cfg
        ctx.n_state = n_state
        ctx.event = event_t is not None
        ctx.n_params = len(params)
        # y0 too: a double backward re-solves from it (``_differentiable_backward``)
        ctx.save_for_backward(t, t_out, *ys, *params, *y0_items)
        if event_t is not None:
            return (event_t, *ys)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grad_outs):
        if torch.is_grad_enabled():  # create_graph=True: gradients of gradients
            return _differentiable_backward(ctx, grad_outs)
        cfg = ctx.cfg
        n_state = ctx.n_state
        saved = ctx.saved_tensors
        t, t_out = saved[0], saved[1]
        ys = saved[2:2 + n_state]
        params = saved[2 + n_state:2 + n_state + ctx.n_params]
        grad_ys = grad_outs[1:] if ctx.event else grad_outs
        backward: _Backward = cfg["backward"]
        layout = backward.layout
        # float64 where the device has it (timekeeping.time_dtype); read on the host
        ts = t_out.detach().to(torch.promote_types(t_out.dtype, time_dtype(t_out.device)))
        n_t = len(ts)
        dtype, device = ys[0].dtype.to_real(), ys[0].device  # a complex state's parts
        ys_flat = layout.flatten(tuple(ys) if layout.is_tuple else ys[0], n_t)
        g_flat = layout.flatten(tuple(grad_ys) if layout.is_tuple else grad_ys[0], n_t)
        ys_c = ys_flat.to(backward.dtype)
        g_c = g_flat.to(backward.dtype)
        backward.dense = getattr(ctx, "dense", None)
        try:
            backend = cfg["compile_backward"]
            res = backward.compiled(ts, ys_c, g_c, backend) if backend else None
            a, gp, a_t0 = res if res is not None else backward(ts, ys_c, g_c)
        finally:
            backward.dense = None

        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = torch.zeros(n_t, dtype=dtype, device=device)
            with torch.no_grad():
                for i in range(n_t):
                    w = g_c[i] if i > 0 else -a_t0
                    if i > 0 and not bool(w.any()):
                        continue
                    tt = torch.full((), ts[i].item(), dtype=dtype, device=device)
                    grad_t[i] = torch.dot(w.to(dtype), backward.flat_func(tt, ys_flat[i])
                                          .to(dtype))
            if ctx.event:
                # t = (t0, direction): the event time is held fixed here (as torchdiffeq)
                grad_t = torch.stack([grad_t[0], torch.zeros_like(grad_t[0])])
            grad_t = grad_t.to(t.dtype)
        grad_y0 = layout.unflatten(a.to(dtype))
        grad_y0 = grad_y0 if layout.is_tuple else (grad_y0,)
        grad_params = []
        offset = 0
        for p in params:
            grad_params.append(gp[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        return (None, grad_t, None, *grad_y0, *grad_params)


def backsolve_unstable(method_name: str) -> bool:
    """The stiff methods (those with a Jacobian, scipy's excepted): integrating y backwards
    from its final value reverses the decay of their stiff modes, which grow by up to
    exp(|lambda| T), so the backward solve fails or crawls (Robertson over [0, 1000]: a step
    size underflow after minutes); their adjoint reads y from the forward solution."""
    return SOLVERS[method_name].builds_jacobians() and method_name != "scipy_solver"


def _differentiable_backward(ctx, grad_outs):
    """``odeint_adjoint``'s backward under ``create_graph=True`` (Hessian-vector products,
    gradient penalties): the solve is redone from the saved inputs with autograd recording
    it, and differentiated with ``create_graph``, so the gradient is backprop's (exact for
    the discrete solve) and itself differentiable. Memory grows with the steps in this
    case only."""
    cfg = ctx.cfg
    if ctx.event:
        raise RuntimeError("double backward (create_graph=True) through odeint_adjoint's event "
                           "mode is not supported; use odeint(..., event_fn=...) with "
                           "gradient='backprop' for higher-order gradients")
    n_state, n_params = ctx.n_state, ctx.n_params
    saved = ctx.saved_tensors
    t = saved[0]
    params = saved[2 + n_state:2 + n_state + n_params]
    y0_items = saved[2 + n_state + n_params:]
    y0 = tuple(y0_items) if cfg["is_tuple"] else y0_items[0]
    sol = solve_problem(prepare(cfg["func"], y0, rtol=cfg["rtol"], atol=cfg["atol"],
                                method=cfg["method"], options=cfg["options"]), t)
    ys = sol.ys if cfg["is_tuple"] else (sol.ys,)
    need = ctx.needs_input_grad  # (cfg, t, n_state, *y0 items, *params)
    wrt = [(k, v) for k, v in enumerate((t, *y0_items, *params))
           if need[1 + k if k == 0 else 2 + k] and v.requires_grad]
    got = torch.autograd.grad(ys, [v for _, v in wrt], grad_outs, create_graph=True,
                              allow_unused=True) if wrt else ()
    grads: list[torch.Tensor | None] = [None] * (1 + n_state + n_params)
    for (k, v), g in zip(wrt, got):
        grads[k] = torch.zeros_like(v) if g is None else g
    return (None, grads[0], None, *grads[1:])


def _real_params(params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The adjoint's parameters, refused where complex (the state may be complex)."""
    for k, p in enumerate(params):
        if p.is_complex():
            raise ODEInputError(
                f"odeint_adjoint: parameter {k} ({tuple(p.shape)}) is complex ({p.dtype}); "
                f"the adjoint's parameters must be real (a complex state is fine): keep the "
                f"real and imaginary parts as real tensors and combine them in func, or use "
                f"gradient='backprop' or 'checkpoint'")
    return params


def _default_adjoint_method(method_name: str) -> str:
    """The backward method of ``odeint_adjoint`` when none is given: the forward method, or
    the first registered of the methods it names (``adjoint_method`` of Rosenbrock methods,
    which cannot integrate the backward system exactly)."""
    preferred = getattr(SOLVERS[method_name], "adjoint_method", None)
    if preferred is None:
        return method_name
    return next(m for m in preferred if m in SOLVERS)


def odeint_adjoint(func: Callable, y0, t, *, rtol: Tolerance = 1e-7, atol: Tolerance = 1e-9,
                   method: str | None = None, options: dict | None = None,
                   event_fn: Callable | None = None,
                   adjoint_rtol: Tolerance | None = None, adjoint_atol: Tolerance | None = None,
                   adjoint_method: str | None = None, adjoint_options: dict | None = None,
                   adjoint_params: Iterable[torch.Tensor] | None = None,
                   return_stats: bool = False, interpolated: bool | None = None,
                   per_sample: bool = False):
    """``odeint`` whose backward pass solves the adjoint ODE instead of backpropagating
    through the solver: memory independent of the number of steps. Drop-in compatible with
    ``torchdiffeq.odeint_adjoint`` (event mode included: ``event_fn`` returns
    ``(event_t, solution)``; the backward pass treats the event time as fixed, as
    torchdiffeq; use ``odeint_event(..., odeint_interface=odeint_adjoint)`` for the
    gradient through the event time).

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
        per_sample: y0 is a batch (B, ...) of independent problems (see ``odeint``): the
            backward solve is per sample too, the parameter gradient is summed over
            samples.
        interpolated: the interpolated adjoint: the backward solve reads y(t) from the
            forward solve's dense output (kept until the backward pass: memory grows with
            the forward steps) instead of integrating y backwards. Not with ``event_fn``.
            None (default): True for the stiff methods, whose backward reconstruction of y
            is unstable (``backsolve_unstable``), False for the others.
    """
    if interpolated not in (None, True, False):
        raise ODEInputError(f"interpolated must be True, False or None (automatic: True for "
                            f"the stiff methods), got {interpolated!r}")
    if per_sample:
        if event_fn is not None:
            raise ODEInputError("event_fn is not supported with odeint_adjoint(..., "
                                "per_sample=True); use solve(..., per_sample=True, "
                                "event_fn=...)")
        g = Adjoint(rtol=adjoint_rtol, atol=adjoint_atol, method=adjoint_method,
                    options=adjoint_options, params=adjoint_params, interpolated=interpolated)
        batch = _solve_per_sample(g, func, y0, t, rtol=rtol, atol=atol, method=method,
                                  options=options)
        return (batch.ys, batch.stats) if return_stats else batch.ys
    # the compiled solve (options['compile']): the forward solve; the backward solve with
    # adjoint_options['compile'] where ``_Backward.compiled`` can serve it (else eager)
    compiled = wants_compile(options)
    if compiled and (event_fn is not None or interpolated):
        raise ODEInputError("odeint_adjoint with options['compile'] compiles the forward solve "
                            "of the plain adjoint: neither event_fn nor interpolated=True "
                            "(solve without 'compile' for them)")
    compile_value = options.get("compile") if compiled and options is not None else None
    options = without_compile(options)
    # the backward solve compiled only when adjoint_options ask for it (not inherited: on
    # an f of large matrix products it was slower than the eager backward, BENCHMARKS.md)
    compile_backward = None
    if adjoint_options is not None:
        if wants_compile(adjoint_options):
            compile_backward = adjoint_options["compile"]
        adjoint_options = without_compile(adjoint_options)
    if interpolated and event_fn is not None:
        raise ODEInputError("interpolated=True does not support event_fn (event mode keeps no "
                            "dense output); use the plain adjoint or gradient='checkpoint'")
    params = _real_params(find_params(func, adjoint_params))
    method_name, opts = resolve_method(method, options)
    if interpolated is None:
        interpolated = event_fn is None and backsolve_unstable(method_name)
    default_backward = adjoint_method is None
    if adjoint_method is None:
        adjoint_method = _default_adjoint_method(method_name)
    if adjoint_options is None:
        if options and adjoint_method != method_name and not default_backward:
            raise ODEInputError(
                f"adjoint_method={adjoint_method!r} differs from method={method_name!r} and "
                f"options were given for the forward solve; pass adjoint_options for the "
                f"backward solve explicitly (e.g. adjoint_options={{}})")
        # the backward solve inherits the forward options (step_t/jump_t too: the
        # discontinuities are the same), except the forward state's norm
        adjoint_options = {k: v for k, v in opts.items() if k != "norm"}
        if adjoint_method != method_name:  # the forward method's choice of backward method
            valid = SOLVERS[adjoint_method].OPTIONS
            adjoint_options = {k: v for k, v in adjoint_options.items() if k in valid}
    else:
        if not isinstance(adjoint_options, dict):
            raise ODEInputError(f"adjoint_options must be a dict, got "
                                f"{type(adjoint_options).__name__}")
        adjoint_options = dict(adjoint_options)
    user_adjoint_norm = None
    if adjoint_options.get("norm") == "seminorm":
        adjoint_options["norm"] = _seminorm
    elif isinstance(adjoint_options.get("norm"), str):
        raise ODEInputError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got "
                            f"{adjoint_options['norm']!r}")
    elif adjoint_options.get("norm") is not None:
        user_adjoint_norm = adjoint_options.pop("norm")
        if not callable(user_adjoint_norm):
            raise ODEInputError(f"adjoint_options['norm'] must be 'seminorm' or a callable, "
                                f"got {user_adjoint_norm!r}")
    adj_method_name, adjoint_options = resolve_method(adjoint_method, adjoint_options)
    if getattr(SOLVERS[adj_method_name], "adjoint_method", None) is not None:
        raise ODEInputError(
            f"adjoint_method={adj_method_name!r} cannot run odeint_adjoint's backward solve: a "
            f"Rosenbrock method needs the exact Jacobian of the backward system (second "
            f"derivatives of func), which is not formed; use e.g. "
            f"adjoint_method={_default_adjoint_method(adj_method_name)!r} (the default)")
    adjoint_rtol = rtol if adjoint_rtol is None else adjoint_rtol
    adjoint_atol = atol if adjoint_atol is None else adjoint_atol

    items, is_tuple = check_y0(y0)
    t = check_t(t)
    times_of(t)
    layout = state_layout(items, is_tuple)
    stats = AdjointStats(method=method_name)
    dtype = items[0].dtype.to_real()  # the backward state: real (a complex y as its parts)
    dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    # the backward solve is prepared (validated) now, not deep inside .backward()
    if user_adjoint_norm is not None:
        adjoint_options["norm"] = _user_adjoint_norm(user_adjoint_norm, layout, params)
    backward = _Backward(func, layout, params, dtype, items[0].device, adjoint_rtol,
                         adjoint_atol, adj_method_name, adjoint_options, stats, interpolated)
    cfg = {"func": func, "is_tuple": is_tuple, "rtol": rtol, "atol": atol,
           "method": method_name, "options": opts, "stats": stats, "event_fn": event_fn,
           "backward": backward, "compile": compile_value, "compile_backward": compile_backward}

    needs_grad = torch.is_grad_enabled() and (
        t.requires_grad or any(v.requires_grad for v in items) or bool(params))
    if not needs_grad:
        if event_fn is not None:
            event_t, ys, fstats = event_solve(func, y0, t, rtol=rtol, atol=atol,
                                               method=method_name, options=opts,
                                               event_fn=event_fn)
            _warn_unlisted(ys)
            stats.__dict__.update(fstats.__dict__)
            return ((event_t, ys), stats) if return_stats else (event_t, ys)
        try:
            sol = _forward_solve(cfg, y0, t, dense=False)
        except BackpropRefused:
            raise ODEInputError(_UNLISTED.format(
                what="the compiled forward solve cannot be differentiated by backprop")) \
                from None
        _warn_unlisted(sol.ys)
        stats.__dict__.update(sol.stats.__dict__)
        return (sol.ys, stats) if return_stats else sol.ys
    outs = _AdjointFunction.apply(cfg, t, len(items), *items, *params)
    if event_fn is not None:
        event_t, outs = outs[0], outs[1:]
        ys = tuple(outs) if is_tuple else outs[0]
        return ((event_t, ys), stats) if return_stats else (event_t, ys)
    ys = tuple(outs) if is_tuple else outs[0]
    return (ys, stats) if return_stats else ys


# ------------------------------------------------------------------------------------------
# the adjoint on the tensor clock: a per-sample backward solve, the parameter adjoint
# summed over samples
# ------------------------------------------------------------------------------------------


class _AdjointRHS:
    """The per-sample augmented system z = (y, a):  dy/dt = f(t, y),  da/dt = -a^T df/dy
    (rows independent: one vector-Jacobian product of the batched f per call). The
    backward driver's ``rhs``: ``call(t, z)``."""

    def __init__(self, frhs, n: int, stats: PerSampleStats):
        self.frhs, self.n, self.stats = frhs, n, stats
        self.counting = True
        self.batch = True

    def call(self, t, z):
        if self.counting:
            self.stats.nfe += 1
            self.stats.batch_rows += z.shape[0]
        n = self.n
        f, da, _ = adjoint_derivatives(lambda y: self.frhs.call(t, y), z[:, :n], z[:, n:], ())
        return torch.cat([f, da], 1)

    at = call  # (``RHS.at``: per sample, every time is a (B,) tensor)


class _ParamQuadrature:
    """sum over samples of int a^T df/dtheta dt, by each accepted step's own RK weights
    (the parameter adjoint is not part of the state: it enters no error norm, as the
    seminorm of Kidger, Chen & Lyons 2021, and costs no memory per sample)."""

    def __init__(self, frhs, n: int, params):
        self.frhs, self.n, self.params = frhs, n, params
        self.total = [torch.zeros_like(p) for p in params]

    def __call__(self, t, z, h, accept, stepper) -> None:
        if not self.params:
            return
        n = self.n
        w_row = torch.where(accept, h, 0.0)
        hc = h.to(z.dtype)[:, None]
        for i, b in stepper.b_nz:
            if i == 0:
                zi = z
            else:
                comb = torch.mv(stepper.KT[i], stepper.a_rows[i]).view(z.shape)
                zi = torch.addcmul(z, hc, comb)
            ti = t + stepper.c[i] * h
            cot = (b * w_row).to(z.dtype)[:, None] * zi[:, n:]
            _, _, grads = adjoint_derivatives(lambda y, ti=ti: self.frhs.call(ti, y),
                                              zi[:, :n], cot, self.params, need_y=False)
            for acc, g in zip(self.total, grads):
                if g is not None:
                    acc.add_(g)


class _PerSampleAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, n_state, *tensors):
        items, params = tensors[:n_state], tensors[n_state:]
        y0 = tuple(items) if cfg["is_tuple"] else items[0]
        with torch.no_grad():
            sol = Backprop().solve(cfg["func"], y0, cfg["t"], rtol=cfg["rtol"],
                                   atol=cfg["atol"], method=cfg["method"],
                                   options=cfg["options"], per_sample=True)
        cfg["stats"].__dict__.update(sol.stats.__dict__)
        ys = sol.ys if cfg["is_tuple"] else (sol.ys,)
        ctx.cfg, ctx.n_state = cfg, n_state
        ctx.save_for_backward(*ys, *params)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grad_ys):
        cfg, n_state = ctx.cfg, ctx.n_state
        saved = ctx.saved_tensors
        ys, params = saved[:n_state], saved[n_state:]
        T, B = ys[0].shape[:2]
        s = cfg["backward"]  # the backward problem's per_sample setup
        p = s.p

        def flat(items):  # (T, B, ...) items -> (T, B, n) (a complex state: its parts)
            rows = [v.reshape(T * B, *v.shape[2:]) for v in items]
            return p.layout.flatten(tuple(rows) if p.layout.is_tuple else rows[0],
                                    T * B).reshape(T, B, -1)
        ys_flat = flat(ys)
        g_flat = flat([g if g is not None else torch.zeros_like(y) for g, y in zip(grad_ys, ys)])
        dtype = p.rhs.dtype
        ys_c, g_c = ys_flat.to(dtype), g_flat.to(dtype)
        n = ys_c.shape[2]
        ts = s.ts
        quad = _ParamQuadrature(p.rhs, n, params)
        a = g_c[T - 1].clone()
        h = None
        stats = PerSampleStats(method=p.name)
        p.stats.nfe = 0
        arhs = _AdjointRHS(p.rhs, n, stats)
        n_acc = torch.zeros(B, dtype=torch.long, device=ys_c.device)
        n_rej = torch.zeros_like(n_acc)
        for i in range(T - 1, 0, -1):
            seg = torch.stack([ts[:, i], ts[:, i - 1]], 1)
            z0 = torch.cat([ys_c[i], a], 1)
            stepper, ctrl = batched_parts(p, seg, cfg["aug_norm"])
            res, _ = integrate_batched(arhs, z0, seg, stepper, ctrl,
                                       max_num_steps=p.opts["max_num_steps"], throw=True,
                                       name=p.name + " (adjoint)", h0=h, on_step=quad)
            a = res.y_final[:, n:] + g_c[i - 1]
            h = res.h_next if p.method.adaptive else None
            n_acc += res.n_accepted
            n_rej += res.n_rejected
        stats.n_accepted, stats.n_rejected = n_acc, n_rej
        stats.extra["param_quadrature_nfe"] = p.stats.nfe - stats.nfe
        cfg["stats"].extra["backward"] = stats
        grads_y0 = p.layout.unflatten(a.to(ys[0].dtype.to_real()))
        grads_y0 = grads_y0 if p.layout.is_tuple else (grads_y0,)
        return (None, None, *grads_y0, *[g.to(q.dtype) for g, q in zip(quad.total, params)])


def _solve_per_sample(g: Adjoint, func, y0, t, *, rtol, atol, method, options
                      ) -> PerSampleSolution:
    """``odeint_adjoint(..., per_sample=True)``. On the tensor clock: the forward solve of
    ``solve_per_sample`` (no graph kept), and a backward solve per sample of (y, a) from
    each sample's last output time to its first, through its own output times (where a
    gains dL/dy(t_i) and y is reset to the stored output); the parameter gradient is the
    sum over samples of int a^T df/dtheta dt, accumulated by each accepted backward step's
    quadrature (it is not part of any error norm). Memory does not grow with the number of
    steps. Where the sample-by-sample driver runs (see ``neuralode.per_sample``, and the
    interpolated adjoint), each sample is differentiated by the one-problem adjoint."""
    fwd = setup(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                tensor_clock=g.tensor_clock)
    items, is_tuple = check_y0(y0, batch=True)
    params = _real_params(find_params(func, g.params))
    adjoint_method = method if g.method is None else g.method
    adjoint_options = g.options
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in (options or {}).items() if k != "norm"}
    b_name, _ = resolve_method(adjoint_method, {k: v for k, v in adjoint_options.items()
                                                if k not in PER_SAMPLE_OPTIONS})
    needs_grad = torch.is_grad_enabled() and (any(v.requires_grad for v in items) or params)
    # (the batched backward solve and its quadrature run explicit Runge–Kutta methods)
    if fwd.driver != "batched" or not SOLVERS[b_name].tensor_clock \
            or SOLVERS[b_name].builds_jacobians():
        one = replace(g, params=params)
        opts = {k: v for k, v in (options or {}).items() if k not in PER_SAMPLE_OPTIONS}

        def solve_one(f_b, y0_b, t_b, ev):
            return one.solve(f_b, y0_b, t_b, rtol=rtol, atol=atol, method=method, options=opts)
        return run_sample_by_sample(fwd, func, y0, t, solve_one)
    if not needs_grad:
        sol = Backprop().solve(func, y0, t, rtol=rtol, atol=atol, method=method,
                               options=options, per_sample=True)
        _warn_unlisted(sol.ys)
        return sol
    # the parameter adjoint is one sum over the batch, not a per-sample state: each sample's
    # backward error norm is the seminorm (max of the RMS norms of y and a), so its
    # gradients are those of its solo adjoint with adjoint_options={"norm": "seminorm"}
    if adjoint_options.get("norm") not in (None, "seminorm"):
        raise ODEInputError("per_sample=True: the backward error norm is the seminorm (the "
                            "max of the RMS norms of y and its adjoint per sample; the "
                            "parameter adjoint is summed over the batch); adjoint_options["
                            "'norm'] may only be 'seminorm'")
    adjoint_options = {k: v for k, v in adjoint_options.items()
                       if k not in ("shrink", "compile", "norm")}
    a_rtol = rtol if g.rtol is None else g.rtol
    a_atol = atol if g.atol is None else g.atol
    # the backward problem, validated before the forward solve
    bwd = setup(func, tuple(v.detach() for v in items) if is_tuple else items[0].detach(), t,
                rtol=a_rtol, atol=a_atol, method=adjoint_method, options=adjoint_options,
                tensor_clock=True)
    n = bwd.p.layout.n
    aug_layout = StateLayout([torch.Size([n]), torch.Size([n])], True)

    def dup(v):
        return v if not isinstance(v, torch.Tensor) else torch.cat([v, v])
    aug_norm = ErrorNorm(aug_layout, dup(bwd.p.norm.rtol), dup(bwd.p.norm.atol), None)
    stats = PerSampleStats(method=bwd.p.name)
    cfg = {"func": func, "is_tuple": is_tuple, "t": t, "rtol": rtol, "atol": atol,
           "method": method, "options": options, "stats": stats, "backward": bwd,
           "aug_norm": aug_norm}
    outs = _PerSampleAdjoint.apply(cfg, len(items), *items, *params)
    ys = tuple(outs) if is_tuple else outs[0]
    last = tuple(v[-1] for v in ys) if is_tuple else ys[-1]
    return PerSampleSolution(ys=ys, ts=t, stats=stats, status=list(stats.status),
                             message=list(stats.message), t_final=stats.t_final, y_final=last,
                             layout=bwd.p.layout, user_dtype=bwd.p.rhs.user_dtype)


__all__ = ["Adjoint", "AdjointStats", "adjoint_derivatives", "odeint_adjoint"]
