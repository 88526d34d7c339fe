"""``per_sample=True``: a batch of independent problems, each solved as if alone.

``solve``/``odeint``/``odeint_adjoint`` with ``per_sample=True`` treat the first dimension
of ``y0`` (a tensor (B, ...) or a tuple of such, all with the same B) as a batch of B
independent initial-value problems sharing ``func``. Every sample has its own step size,
error norm (the RMS over that sample's elements), acceptance, dense output and termination,
so a sample's result and step counts do not depend on the rest of the batch.

* ``t``: output times shared by the batch, shape (T,), or one row per sample, shape (B, T);
  each row strictly monotonic (rows may differ in span and direction).
* ``func(t, y)``: ``y`` has the batch's structure (B, ...); ``t`` is a (B,) tensor holding
  each sample's own time (in the state's dtype). For functions that do not use t, pass
  ``options={"time_arg": "none"}``: ``t`` is then a 0-d NaN tensor (a function that uses it
  anyway produces NaN, which is reported as a non-finite status, never a silent error).
  ``func`` must treat rows independently (no batch norm across samples).
* Output: shape (T, B, ...) (a tuple for tuple states): row b at the times t[b] (or t).
* Statistics (``return_stats=True`` / ``Solution.stats``): a ``PerSampleStats`` with
  ``n_accepted``/``n_rejected`` as (B,) int64 tensors, ``nfe`` counting batched calls of
  ``func``, a status and message per sample.
* ``throw=False`` (``solve``): a failing sample (max steps, step-size underflow, non-finite
  state) stops alone with its status; its outputs after the failure are NaN; the others
  are unaffected.
* ``options={"compile": True}`` (or a backend name, e.g. "aot_eager"): the step (RK stages
  + controller + per-row bookkeeping) runs under ``torch.compile(fullgraph=True)``; the
  number of evaluations of f is counted outside the compiled step. ``func`` must be
  traceable; the first solve pays the compilation.
* ``options={"shrink": q}`` (q in (0, 1]): when the running samples are at most the fraction
  q of the current batch, the batch is compacted to them (``func`` then sees fewer rows;
  it must accept any batch size). Default: no compaction (finished rows are masked: they
  cost evaluations but not correctness).

Methods: every explicit RK method (adaptive and fixed grid) runs batched in
``neuralode.solvers.batched``; the Adams methods (whose multistep history depends on each
sample's grid) are solved sample by sample with the scalar loop (correct, not batched).
Events (``solve(..., per_sample=True, event_fn=...)``): each sample stops at its own event.
Dense output (``dense=True``): ``sol.evaluate(t)`` per sample.
Not supported with ``per_sample=True``: callbacks, the options
``step_t``, ``jump_t``, ``perturb``, ``grid_constructor``, and gradients with respect to t.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from neuralode.errors import ODEInputError
from neuralode.solvers.base import StateLayout
from neuralode.solvers.batched import (
    STATUS_NAMES,
    BatchedDense,
    BatchedEvent,
    BatchedGrid,
    BatchedPID,
    BatchedRHS,
    BatchedRKStepper,
    PerSampleStats,
    integrate_batched,
)
from neuralode.solvers.controllers import ErrorNorm
from neuralode.solvers.methods import SOLVERS, AdaptiveRK, FixedGridRK, controller_or_default

PER_SAMPLE_OPTIONS = {"time_arg": "batch", "shrink": None, "compile": False}
UNSUPPORTED = {"step_t": None, "jump_t": None, "perturb": False, "grid_constructor": None}

__all__ = ["PerSampleSolution", "PerSampleStats", "odeint_per_sample", "solve_per_sample"]


@dataclass
class PerSampleSolution:
    """Result of ``solve(..., per_sample=True)``.

    ys: (T, B, ...) outputs (a tuple for tuple states), NaN where a failed sample did not
        reach an output time; ts: the output times as given ((T,) or (B, T));
    stats: ``PerSampleStats``; status, message: one per sample;
    t_final: (B,) float64 tensor, where each sample stopped; y_final: the states there.
    """

    ys: Any
    ts: torch.Tensor
    stats: PerSampleStats
    status: list[str]
    message: list[str]
    t_final: torch.Tensor
    y_final: Any
    event_t: torch.Tensor | None = None  # (B,) float64 event times (NaN: no event)
    dense: Any = None
    layout: Any = None
    user_dtype: Any = None

    def evaluate(self, t):
        """The continuous solution (``solve(..., per_sample=True, dense=True)``) at t of
        shape (m,) (shared) or (B, m): (m, B, ...) states; NaN outside a sample's solved
        span."""
        if self.dense is None:
            raise ODEInputError("this solution has no dense output; call "
                                "solve(..., per_sample=True, dense=True)")
        y = self.dense(torch.as_tensor(t))
        return _unflatten(self.layout, y.to(self.user_dtype))

    @property
    def success(self) -> bool:
        return all(s in ("success", "event") for s in self.status)


def _check_batch_y0(y0) -> tuple[list[torch.Tensor], bool, int]:
    is_tuple = isinstance(y0, (tuple, list))
    items = list(y0) if is_tuple else [y0]
    if is_tuple and not items:
        raise ODEInputError("y0 is an empty tuple; give a tensor (B, ...) or a tuple of them")
    for k, v in enumerate(items):
        name = f"y0[{k}]" if is_tuple else "y0"
        if not isinstance(v, torch.Tensor):
            raise ODEInputError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if v.dim() < 1 or v.shape[0] == 0:
            raise ODEInputError(f"per_sample=True: {name} must have a leading batch dimension "
                                f"(B, ...) with B >= 1, got shape {tuple(v.shape)}")
        if not v.is_floating_point() or v.is_complex():
            raise ODEInputError(f"{name} must have a real floating dtype, got {v.dtype}")
        if not bool(torch.isfinite(v).all()):
            raise ODEInputError(f"{name} contains non-finite values (nan or inf)")
    B = items[0].shape[0]
    for k, v in enumerate(items):
        if v.shape[0] != B or v.dtype != items[0].dtype or v.device != items[0].device:
            raise ODEInputError(
                f"per_sample=True: every tensor of a tuple y0 needs the same batch size, dtype "
                f"and device: y0[0] is {tuple(items[0].shape)} {items[0].dtype} on "
                f"{items[0].device}, y0[{k}] is {tuple(v.shape)} {v.dtype} on {v.device}")
    return items, is_tuple, B


def _check_batch_t(t, B: int, device) -> torch.Tensor:
    """(B, T) float64 times on ``device`` from t of shape (T,) or (B, T)."""
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ODEInputError(f"t must be a tensor of times, got {type(t).__name__}") from None
    if t.is_complex() or t.dtype == torch.bool:
        raise ODEInputError(f"t must be real, got dtype {t.dtype}")
    if t.dim() == 1:
        tt = t.detach().to(device=device, dtype=torch.float64)[None].expand(B, -1)
    elif t.dim() == 2 and t.shape[0] == B:
        tt = t.detach().to(device=device, dtype=torch.float64)
    else:
        raise ODEInputError(f"per_sample=True: t must have shape (T,) (shared) or (B, T) = "
                            f"({B}, T) (one row per sample), got {tuple(t.shape)}")
    if tt.shape[1] == 0:
        raise ODEInputError("t is empty; give at least one time (t[..., 0] is the time of y0)")
    if not bool(torch.isfinite(tt).all()):
        raise ODEInputError("t contains non-finite values")
    if tt.shape[1] > 1:
        d = tt[:, 1:] - tt[:, :-1]
        sign = torch.sign(d[:, :1])
        bad = ((d * sign) <= 0).any(1)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ODEInputError(f"t must be strictly increasing or strictly decreasing in each "
                                f"row; row {b} is not: {tt[b].tolist()[:10]}")
    return tt.contiguous()


@dataclass
class _Prepared:
    rhs: BatchedRHS
    layout: StateLayout
    y0_flat: torch.Tensor
    ts: torch.Tensor
    stepper: Any
    controller: Any
    opts: dict
    name: str
    stats: PerSampleStats
    B: int
    shrink: float | None
    adams: bool
    norm: ErrorNorm


def prepare_per_sample(func, y0, t, *, rtol, atol, method, options) -> _Prepared:
    from neuralode.odeint import (
        _check_func,
        _check_resolvable,
        _resolve_method,
        _tolerance,
        method_options,
    )
    _check_func(func)
    items, is_tuple, B = _check_batch_y0(y0)
    options = dict(options or {})
    ps = {k: options.pop(k, v) for k, v in PER_SAMPLE_OPTIONS.items()}
    if ps["time_arg"] not in ("batch", "none"):
        raise ODEInputError(f"options['time_arg'] must be 'batch' (func gets t of shape (B,)) "
                            f"or 'none' (func ignores t), got {ps['time_arg']!r}")
    shrink = ps["shrink"]
    if shrink is not None:
        try:
            shrink = float(shrink)
        except (TypeError, ValueError):
            shrink = math.nan
        if not 0 < shrink <= 1:
            raise ODEInputError(f"options['shrink'] must be None or a fraction in (0, 1], got "
                                f"{ps['shrink']!r}")
    name, given = _resolve_method(method, options if options else None)
    opts = method_options(name, given)
    for k, default in UNSUPPORTED.items():
        if k in opts and opts[k] is not default and opts[k] != default:
            raise ODEInputError(f"option {k!r} is not supported with per_sample=True")
    cls = SOLVERS[name]
    dtype, device = items[0].dtype, items[0].device
    layout = StateLayout([v.shape[1:] for v in items], is_tuple)
    stats = PerSampleStats(method=name)
    rhs = BatchedRHS(func, layout, dtype, device, stats, ps["time_arg"])
    ctrl = controller_or_default(opts) if cls.adaptive else None
    rtol = ctrl.rtol if ctrl is not None and ctrl.rtol is not None else rtol
    atol = ctrl.atol if ctrl is not None and ctrl.atol is not None else atol
    rtol_v = _tolerance("rtol", rtol, layout, rhs.dtype, device)
    atol_v = _tolerance("atol", atol, layout, rhs.dtype, device)
    y0_flat = torch.cat([v.reshape(B, -1) for v in items], dim=1)
    if y0_flat.dtype != rhs.dtype:
        y0_flat = y0_flat.to(rhs.dtype)
    if cls.adaptive:
        _check_resolvable(name, rtol_v, atol_v, y0_flat, rhs.dtype)
    norm = ErrorNorm(layout, rtol_v, atol_v, opts.get("norm"))
    ts = _check_batch_t(t, B, device)
    adams = not issubclass(cls, (AdaptiveRK, FixedGridRK))
    stepper = controller = None
    if issubclass(cls, AdaptiveRK):
        stepper = BatchedRKStepper(cls.tableau)
        controller = BatchedPID(norm, cls.tableau.error_order,
                                opts.get("_pid_settings") or
                                controller_or_default(opts).settings(opts, name))
    elif issubclass(cls, FixedGridRK):
        stepper = BatchedRKStepper(cls.tableau, linear=opts["interp"] == "linear")
        controller = BatchedGrid(ts, opts["step_size"])
    p = _Prepared(rhs, layout, y0_flat, ts, stepper, controller, opts, name, stats, B,
                  shrink, adams, norm)
    p.compile_step = ps["compile"] if isinstance(ps["compile"], str) else bool(ps["compile"])
    return p


def _unflatten(layout: StateLayout, y: torch.Tensor):
    """(..., B, n) -> the user's structure (..., B, *shape)."""
    lead = tuple(y.shape[:-1])
    if not layout.is_tuple:
        return y.reshape(*lead, *layout.shapes[0])
    return tuple(y[..., a:b].reshape(*lead, *s) for a, b, s in
                 zip(layout.offsets[:-1], layout.offsets[1:], layout.shapes))


def run_per_sample(p: _Prepared, y0_flat: torch.Tensor | None = None, *, throw: bool = True,
                   sync_counter: list | None = None, event_fn: Callable | None = None,
                   record: list | None = None):
    """Run the prepared solve; returns (BatchedResult-like ys (T, B, n), status codes, ...)."""
    y0_flat = p.y0_flat if y0_flat is None else y0_flat
    if p.adams:
        return _run_sample_by_sample(p, y0_flat, throw)
    res, msgs = integrate_batched(p.rhs, y0_flat, p.ts, p.stepper, p.controller,
                                  max_num_steps=p.opts["max_num_steps"], throw=throw,
                                  name=p.name, shrink=p.shrink, sync_counter=sync_counter,
                                  compile_step=p.compile_step,
                                  event=None if event_fn is None else BatchedEvent(event_fn, p.rhs),
                                  record=record)
    st = p.stats
    st.n_accepted, st.n_rejected = res.n_accepted, res.n_rejected
    st.status = [STATUS_NAMES[c] for c in res.status.tolist()]
    st.message = msgs
    st.t_final = res.t_final
    return res


def _run_sample_by_sample(p: _Prepared, y0_flat: torch.Tensor, throw: bool):
    """The Adams methods: each sample solved alone by the scalar loop."""
    from neuralode.odeint import solve
    from neuralode.solvers.batched import _ERRORS, BatchedResult
    B, T = p.ts.shape
    layout = p.layout
    rhs = p.rhs
    opts = {k: v for k, v in p.opts.items() if not k.startswith("_")}
    outs, status, tf, yf, na, nr, reached, msgs = [], [], [], [], [], [], [], []
    codes = {n: k for k, n in enumerate(STATUS_NAMES)}
    for b in range(B):
        def f1(t, y, b=b):
            tb = t.reshape(1) if rhs.time_arg == "batch" else rhs.nan_t
            y1 = tuple(v[None] for v in y) if layout.is_tuple else y[None]
            out = rhs.func(tb, y1)
            return tuple(o[0] for o in out) if layout.is_tuple else out[0]
        y0_b = _unflatten(layout, y0_flat[b])
        sol = solve(f1, y0_b, p.ts[b], rtol=p.norm.rtol, atol=p.norm.atol, method=p.name,
                    options=opts, throw=throw)
        flat = sol.ys if not layout.is_tuple else torch.cat(
            [v.reshape(v.shape[0], -1) for v in sol.ys], 1)
        flat = flat.reshape(flat.shape[0], -1)
        k = flat.shape[0]
        if k < T:
            flat = torch.cat([flat, flat.new_full((T - k, flat.shape[1]), math.nan)])
        outs.append(flat)
        status.append(codes[sol.status])
        msgs.append(f"sample {b}: {sol.message}" if sol.message else "")
        tf.append(sol.t_final)
        y_end = sol.y_final if not layout.is_tuple else torch.cat(
            [v.reshape(-1) for v in sol.y_final])
        yf.append(y_end.reshape(-1))
        na.append(sol.stats.n_accepted)
        nr.append(sol.stats.n_rejected)
        reached.append(k)
        p.stats.nfe += sol.stats.nfe
        p.stats.batch_rows += sol.stats.nfe
    dev = y0_flat.device
    res = BatchedResult(torch.stack(outs, 1), torch.tensor(status, device=dev),
                        torch.tensor(tf, dtype=torch.float64, device=dev), torch.stack(yf),
                        torch.tensor(na, device=dev), torch.tensor(nr, device=dev),
                        torch.tensor(reached, device=dev))
    st = p.stats
    st.n_accepted, st.n_rejected = res.n_accepted, res.n_rejected
    st.status = [STATUS_NAMES[c] for c in status]
    st.message = msgs
    st.t_final = res.t_final
    assert not throw or all(c not in _ERRORS for c in status)
    return res


def _to_user(p: _Prepared, y: torch.Tensor):
    if y.dtype != p.rhs.user_dtype:
        y = y.to(p.rhs.user_dtype)
    return _unflatten(p.layout, y)


def _check_no_t_grad(t) -> None:
    if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
        raise ODEInputError("per_sample=True does not differentiate with respect to t; pass "
                            "t.detach() (or solve without per_sample for gradients in t)")


def solve_per_sample(func: Callable, y0, t, *, rtol=1e-7, atol=1e-9, method=None,
                     options=None, throw: bool = True, event_fn: Callable | None = None,
                     dense: bool = False, sync_counter: list | None = None
                     ) -> PerSampleSolution:
    """``solve(..., per_sample=True)``; see the module docstring. ``event_fn(t, y)`` (t (B,),
    y (B, ...)) -> (B,) or (B, k): each sample stops at its own first sign change (status
    "event", ``event_t`` (B,), NaN outputs after it); an adaptive RK method is needed, and
    gradients treat the event time as fixed. ``dense``: keep every step's interpolant;
    ``sol.evaluate(t)`` (t (m,) or (B, m)) gives (m, B, ...) states."""
    _check_no_t_grad(t)
    p = prepare_per_sample(func, y0, t, rtol=rtol, atol=atol, method=method, options=options)
    if event_fn is not None:
        if not callable(event_fn):
            raise ODEInputError(f"event_fn must be callable, got {type(event_fn).__name__}")
        if not isinstance(p.controller, BatchedPID) or p.shrink is not None or p.compile_step:
            raise ODEInputError("per_sample=True events need an adaptive RK method, without "
                                "options 'shrink' and 'compile'")
    if dense and (p.adams or p.shrink is not None):
        raise ODEInputError("per_sample=True dense output needs an RK method and no 'shrink'")
    record = [] if dense else None
    res = run_per_sample(p, throw=throw, sync_counter=sync_counter, event_fn=event_fn,
                         record=record)
    dense_sol = None
    if dense:
        dense_sol = BatchedDense(record, p.stepper, p.ts[:, 0], res.t_final) if record \
            else None
    return PerSampleSolution(ys=_to_user(p, res.ys), ts=t, stats=p.stats,
                             status=list(p.stats.status), message=list(p.stats.message),
                             t_final=res.t_final, y_final=_to_user(p, res.y_final),
                             event_t=res.event_t, dense=dense_sol, layout=p.layout,
                             user_dtype=p.rhs.user_dtype)


def odeint_per_sample(func: Callable, y0, t, *, rtol=1e-7, atol=1e-9, method=None,
                      options=None, return_stats: bool = False):
    sol = solve_per_sample(func, y0, t, rtol=rtol, atol=atol, method=method, options=options)
    return (sol.ys, sol.stats) if return_stats else sol.ys




# ----------------------------------------------------------------------------------------
# the adjoint: a per-sample backward solve, the parameter adjoint summed over samples
# ----------------------------------------------------------------------------------------


class _AdjointRHS:
    """The per-sample augmented system z = (y, a):  dy/dt = f(t, y),  da/dt = -a^T df/dy
    (rows independent: one vector-Jacobian product of the batched f per call)."""

    def __init__(self, frhs: BatchedRHS, n: int, stats: PerSampleStats):
        self.frhs, self.n, self.stats = frhs, n, stats

    def __call__(self, t, z):
        self.stats.nfe += 1
        self.stats.batch_rows += z.shape[0]
        n = self.n
        y, a = z[:, :n], z[:, n:]
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            f = self.frhs(t, y_)
            da = torch.autograd.grad(f, y_, -a, allow_unused=True)[0] if f.requires_grad \
                else None
        return torch.cat([f.detach(), da if da is not None else torch.zeros_like(a)], 1)


class _ParamQuadrature:
    """sum over samples of int a^T df/dtheta dt, by each accepted step's own RK weights
    (the parameter adjoint is not part of the state: it enters no error norm, as the
    seminorm of Kidger, Chen & Lyons 2021, and costs no memory per sample)."""

    def __init__(self, frhs: BatchedRHS, n: int, params):
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
                comb = torch.mv(stepper.K2[:i].t(), stepper.a_rows[i]).view(z.shape)
                zi = torch.addcmul(z, hc, comb)
            ti = t + stepper.c[i] * h
            with torch.enable_grad():
                f = self.frhs(ti, zi[:, :n].detach())
                if not f.requires_grad:
                    continue
                cot = -(b * w_row).to(z.dtype)[:, None] * zi[:, n:]
                grads = torch.autograd.grad(f, self.params, cot, allow_unused=True)
            for acc, g in zip(self.total, grads):
                if g is not None:
                    acc.add_(g)


class _PerSampleAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, n_state, *tensors):
        items, params = tensors[:n_state], tensors[n_state:]
        y0 = tuple(items) if cfg["is_tuple"] else items[0]
        with torch.no_grad():
            sol = solve_per_sample(cfg["func"], y0, cfg["t"], rtol=cfg["rtol"],
                                   atol=cfg["atol"], method=cfg["method"],
                                   options=cfg["options"])
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
        ys_flat = torch.cat([y.reshape(T, B, -1) for y in ys], 2)
        g_flat = torch.cat([(g if g is not None else torch.zeros_like(y)).reshape(T, B, -1)
                            for g, y in zip(grad_ys, ys)], 2)
        p = cfg["backward"]
        dtype = p.rhs.dtype
        ys_c, g_c = ys_flat.to(dtype), g_flat.to(dtype)
        n = ys_c.shape[2]
        ts = p.ts
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
            if p.adaptive:
                ctrl = BatchedPID(p.aug_norm, p.stepper.error_order, p.pid_settings)
            else:
                ctrl = BatchedGrid(seg, p.opts["step_size"])
            stepper = BatchedRKStepper(p.stepper.tab, p.stepper.linear)
            res, _ = integrate_batched(arhs, z0, seg, stepper, ctrl,
                                       max_num_steps=p.opts["max_num_steps"], throw=True,
                                       name=p.name + " (adjoint)", h0=h, on_step=quad)
            a = res.y_final[:, n:] + g_c[i - 1]
            h = res.h_next if p.adaptive else None
            n_acc += res.n_accepted
            n_rej += res.n_rejected
        stats.n_accepted, stats.n_rejected = n_acc, n_rej
        stats.extra["param_quadrature_nfe"] = p.stats.nfe - stats.nfe
        cfg["stats"].extra["backward"] = stats
        grads_y0 = _unflatten(p.layout, a.to(ys[0].dtype))
        grads_y0 = grads_y0 if p.layout.is_tuple else (grads_y0,)
        return (None, None, *grads_y0, *[g.to(q.dtype) for g, q in zip(quad.total, params)])


def odeint_adjoint_per_sample(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None,
                              adjoint_rtol=None, adjoint_atol=None, adjoint_method=None,
                              adjoint_options=None, adjoint_params=None,
                              return_stats: bool = False):
    """``odeint_adjoint(..., per_sample=True)``: the forward solve of ``solve_per_sample``
    (no graph kept), and a backward solve per sample of (y, a) from each sample's last
    output time to its first, through its own output times (where a gains dL/dy(t_i) and y
    is reset to the stored output); the parameter gradient is the sum over samples of
    int a^T df/dtheta dt, accumulated by each accepted backward step's quadrature (it is not
    part of any error norm). Memory does not grow with the number of steps."""
    from neuralode.adjoint import _find_params
    _check_no_t_grad(t)
    params = _find_params(func, adjoint_params)
    items, is_tuple, _ = _check_batch_y0(y0)
    adjoint_method = method if adjoint_method is None else adjoint_method
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in (options or {}).items() if k != "norm"}
    if adjoint_options.get("norm") is not None:
        raise ODEInputError("adjoint_options['norm'] is not supported with per_sample=True "
                            "(the backward error norm is the max of the RMS norms of y and "
                            "its adjoint per sample)")
    adjoint_options = {k: v for k, v in adjoint_options.items()
                       if k not in ("shrink", "compile")}
    a_rtol = rtol if adjoint_rtol is None else adjoint_rtol
    a_atol = atol if adjoint_atol is None else adjoint_atol
    # the backward problem, validated before the forward solve
    bp = prepare_per_sample(func, tuple(v.detach() for v in items) if is_tuple
                            else items[0].detach(), t, rtol=a_rtol, atol=a_atol,
                            method=adjoint_method, options=adjoint_options)
    if bp.adams:
        raise ODEInputError(f"odeint_adjoint with per_sample=True needs an RK method for the "
                            f"backward solve, got {bp.name!r}")
    bp.adaptive = isinstance(bp.controller, BatchedPID)
    if bp.adaptive:
        n = bp.layout.n
        aug_layout = StateLayout([torch.Size([n]), torch.Size([n])], True)

        def dup(v):
            return v if not isinstance(v, torch.Tensor) else torch.cat([v, v])
        bp.aug_norm = ErrorNorm(aug_layout, dup(bp.norm.rtol), dup(bp.norm.atol), None)
        bp.pid_settings = bp.controller.settings
    stats = PerSampleStats(method=bp.name)
    cfg = {"func": func, "is_tuple": is_tuple, "t": t, "rtol": rtol, "atol": atol,
           "method": method, "options": options, "stats": stats, "backward": bp}
    needs_grad = torch.is_grad_enabled() and (any(v.requires_grad for v in items) or params)
    if not needs_grad:
        sol = solve_per_sample(func, y0, t, rtol=rtol, atol=atol, method=method,
                               options=options)
        return (sol.ys, sol.stats) if return_stats else sol.ys
    outs = _PerSampleAdjoint.apply(cfg, len(items), *items, *params)
    ys = tuple(outs) if is_tuple else outs[0]
    return (ys, stats) if return_stats else ys
