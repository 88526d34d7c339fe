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
  ``n_accepted``/``n_rejected`` as (B,) int64 tensors, a status and message per sample,
  and ``driver``: which driver ran.
* ``throw=False`` (``solve``): a failing sample (max steps, step-size underflow, non-finite
  state, Newton failure) stops alone with its status; its outputs after the failure are
  NaN; the others are unaffected.

Two drivers run the same numerics (``neuralode.solvers``):

* ``"batched"``, the tensor clock: the explicit Runge–Kutta methods (adaptive and fixed
  grid), with backprop or the adjoint (a per-sample backward solve), events and dense
  output: one call of ``func`` per stage for the whole batch. Options of this driver:
  ``options={"compile": True}`` (or a backend name, e.g. "aot_eager"): the step (RK stages
  + controller + per-row bookkeeping) runs under ``torch.compile(fullgraph=True)``;
  ``options={"shrink": q}`` (q in (0, 1]): when the running samples are at most the
  fraction q of the current batch, the batch is compacted to them (``func`` then sees
  fewer rows; it must accept any batch size).
* ``"sample_by_sample"``, the float clock: every other case: the implicit, Rosenbrock,
  multistep, Adams and scipy methods (their Newton iterations, Jacobians, order choices
  and scipy's own steps are per problem), ``gradient="checkpoint"`` (any budget) and the
  interpolated adjoint, gradients with respect to ``t``, callbacks, and the options
  ``step_t``, ``jump_t``, ``perturb`` and ``grid_constructor``. Each sample is solved alone
  by the one-problem solver: ``func`` sees a batch of one (y (1, ...), t (1,)), and so
  does ``event_fn``; torchdiffeq's callbacks are called per sample with that sample's
  (1, ...) state. Correct and exact, not batched: B solves one after the other.

Refused with a clear error: ``odeint(..., per_sample=True, event_fn=...)`` (torchdiffeq's
event mode; use ``solve(..., per_sample=True, event_fn=...)``), ``compile``/``shrink``
where the sample-by-sample driver runs, ``shrink`` with events or dense output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from neuralode.adjoint import adjoint_derivatives, odeint_adjoint
from neuralode.errors import ODEFuncError, ODEInputError
from neuralode.gradients import Adjoint, Backprop, Checkpoint, Gradient
from neuralode.parameters import find_params
from neuralode.problem import (
    CALLBACK_NAMES,
    Problem,
    batch_times,
    check_t,
    check_y0,
    find_callbacks,
    prepare,
    resolve_method,
    solve_problem,
)
from neuralode.solvers.base import PerSampleStats, StateLayout
from neuralode.solvers.batched import BatchedDense, BatchedResult, integrate_batched
from neuralode.solvers.controllers import ErrorNorm, PerSampleGrid
from neuralode.solvers.loop import Callbacks
from neuralode.solvers.methods import controller_or_default
from neuralode.solvers.registry import SOLVERS
from neuralode.solvers.status import CODE, ERRORS, NAMES

PER_SAMPLE_OPTIONS = {"time_arg": "batch", "shrink": None, "compile": False}
FLOAT_CLOCK_OPTIONS = {"step_t": None, "jump_t": None, "perturb": False,
                       "grid_constructor": None}

__all__ = ["PerSampleSolution", "PerSampleStats", "odeint_adjoint_per_sample",
           "odeint_per_sample", "solve_per_sample"]


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
        """The continuous solution (``solve(..., per_sample=True, dense=True)``) at t:
        a time (0-d) gives (B, ...) states, as a one-problem solution gives (...); times
        of shape (m,) (shared) or (B, m) give (m, B, ...). NaN outside a sample's solved
        span."""
        if self.dense is None:
            raise ODEInputError("this solution has no dense output; call "
                                "solve(..., per_sample=True, dense=True)")
        tt = torch.as_tensor(t, dtype=torch.float64)
        y = self.dense(tt.reshape(1) if tt.dim() == 0 else tt).to(self.user_dtype)
        if tt.dim() == 0:
            y = y[0]
        return self.layout.unflatten(y)

    @property
    def success(self) -> bool:
        return all(s in ("success", "event") for s in self.status)


@dataclass
class _Setup:
    """A validated per-sample solve: the problem on the batch, its times, and the driver."""

    p: Problem
    ts: torch.Tensor  # (B, T) float64
    B: int
    driver: str
    shrink: float | None
    compile_step: bool | str


def _split_options(options) -> tuple[dict, dict]:
    if options is not None and not isinstance(options, dict):
        raise ODEInputError(f"options must be a dict, got {type(options).__name__}")
    options = dict(options or {})
    ps = {k: options.pop(k, v) for k, v in PER_SAMPLE_OPTIONS.items()}
    if ps["time_arg"] not in ("batch", "none"):
        raise ODEInputError(f"options['time_arg'] must be 'batch' (func gets t of shape (B,)) "
                            f"or 'none' (func ignores t), got {ps['time_arg']!r}")
    if ps["shrink"] is not None:
        try:
            q = float(ps["shrink"])
        except (TypeError, ValueError):
            q = math.nan
        if not 0 < q <= 1:
            raise ODEInputError(f"options['shrink'] must be None or a fraction in (0, 1], got "
                                f"{ps['shrink']!r}")
        ps["shrink"] = q
    return options, ps


def _driver(p: Problem, func, t, gradient: Gradient) -> str:
    """"batched" where the tensor clock serves everything asked, else "sample_by_sample"."""
    o = p.opts
    float_clock = any(k in o and o[k] is not None and o[k] is not False
                      for k in FLOAT_CLOCK_OPTIONS)
    t_grad = isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()
    callbacks = any(callable(getattr(func, n, None)) for n in CALLBACK_NAMES)
    if (not p.method.tensor_clock or float_clock or t_grad or callbacks
            or isinstance(gradient, Checkpoint)
            or (isinstance(gradient, Adjoint) and gradient.interpolated)):
        return "sample_by_sample"
    return "batched"


def setup(func, y0, t, *, rtol, atol, method, options, gradient: Gradient) -> _Setup:
    opts, ps = _split_options(options)
    items, _ = check_y0(y0, batch=True)
    B = items[0].shape[0]
    t = check_t(t, batch=B)
    p = prepare(func, y0, rtol=rtol, atol=atol, method=method, options=opts, batch=True,
                time_arg=ps["time_arg"])
    ts = batch_times(t, B, items[0].device)
    driver = _driver(p, func, t, gradient)
    compile_step = ps["compile"] if isinstance(ps["compile"], str) else bool(ps["compile"])
    if driver != "batched" and (ps["shrink"] is not None or compile_step):
        raise ODEInputError(
            f"per_sample=True: the options 'shrink' and 'compile' need the batched driver "
            f"(explicit Runge–Kutta methods with backprop or the adjoint, no step_t/jump_t/"
            f"perturb/grid_constructor, callbacks or gradients in t); {p.name!r} here is "
            f"solved sample by sample")
    p.stats.driver = driver
    return _Setup(p, ts, B, driver, ps["shrink"], compile_step)


# ------------------------------------------------------------------------------------------
# the tensor clock
# ------------------------------------------------------------------------------------------


def _batched_parts(p: Problem, ts: torch.Tensor, norm: ErrorNorm | None = None):
    """The stepper and controller of a batched solve (``norm``: another error norm, the
    adjoint's)."""
    o = p.opts
    norm = norm or p.norm
    stepper = p.method.make_stepper(o, norm)
    if p.method.adaptive:
        controller = controller_or_default(o).bind(norm, stepper.error_order, o,
                                                   o.get("_pid_settings"))
    else:
        controller = PerSampleGrid(ts, o["step_size"])
    return stepper, controller


def _fill_stats(st: PerSampleStats, res: BatchedResult, msgs: list[str]) -> None:
    st.n_accepted, st.n_rejected = res.n_accepted, res.n_rejected
    st.status = [NAMES[c] for c in res.status.tolist()]
    st.message = msgs
    st.t_final = res.t_final


def _run_batched(s: _Setup, *, throw: bool, event_fn, dense: bool, sync_counter):
    p = s.p
    if event_fn is not None and (not p.method.adaptive or s.shrink is not None
                                 or s.compile_step):
        raise ODEInputError("per_sample=True events need an adaptive method, without the "
                            "options 'shrink' and 'compile'")
    if dense and s.shrink is not None:
        raise ODEInputError("per_sample=True dense output cannot be combined with 'shrink'")
    stepper, controller = _batched_parts(p, s.ts)
    record = [] if dense else None
    res, msgs = integrate_batched(p.rhs, p.y0_flat, s.ts, stepper, controller,
                                  max_num_steps=p.opts["max_num_steps"], throw=throw,
                                  name=p.name, shrink=s.shrink, sync_counter=sync_counter,
                                  compile_step=s.compile_step, event_fn=event_fn,
                                  record=record)
    _fill_stats(p.stats, res, msgs)
    dense_sol = BatchedDense(record, stepper, s.ts[:, 0], res.t_final) if record else None
    return res.ys, res, dense_sol


# ------------------------------------------------------------------------------------------
# the float clock, sample by sample
# ------------------------------------------------------------------------------------------


class _Sample:
    """The batch's ``func``, ``event_fn`` and callbacks seen by one sample: a batch of one."""

    def __init__(self, func, layout: StateLayout, time_arg: str, dtype):
        self.func, self.layout, self.time_arg = func, layout, time_arg
        self.checked = False
        self.nan_t = torch.full((), math.nan, dtype=dtype)

    def _args(self, t, y):
        tb = t.reshape(1) if self.time_arg == "batch" else self.nan_t.to(t.device)
        yb = tuple(v[None] for v in y) if self.layout.is_tuple else y[None]
        return tb, yb

    NEEDS = ("per_sample=True solves this case sample by sample (see neuralode.per_sample), "
             "so func gets a batch of one (y of shape (1, ...), t of shape (1,)) and must "
             "return one row; per-sample constants (e.g. a parameter of shape (B,)) belong in "
             "the state, or func must index them by the rows it is given")

    def __call__(self, t, y):
        if self.checked:
            out = self.func(*self._args(t, y))
        else:
            try:
                out = self.func(*self._args(t, y))
            except (RuntimeError, IndexError, ValueError) as e:
                raise ODEFuncError(f"{self.NEEDS}; func failed on a batch of one: {e}") from e
            self.checked = True
        items = list(out) if self.layout.is_tuple and isinstance(out, (tuple, list)) else [out]
        for o in items:
            if isinstance(o, torch.Tensor) and (o.dim() == 0 or o.shape[0] != 1):
                raise ODEFuncError(f"{self.NEEDS}; it returned shape {tuple(o.shape)}")
        if self.layout.is_tuple:
            return tuple(o[0] if isinstance(o, torch.Tensor) else o for o in out)
        return out[0] if isinstance(out, torch.Tensor) else out

    def event(self, event_fn):
        def one(t, y):
            return torch.as_tensor(event_fn(*self._args(t, y))).reshape(-1)
        return one

    def callbacks(self) -> Callbacks | None:
        cbs = find_callbacks(self.func, _FIXED_GRID_FREE)
        if cbs is None:
            return None

        def wrap(cb):
            if cb is None:
                return None
            return lambda t0, y0, dt: cb(*self._args(t0, y0), dt.reshape(1))
        return Callbacks(wrap(cbs.step), wrap(cbs.accept), wrap(cbs.reject))


class _FIXED_GRID_FREE:  # find_callbacks' view of a method: all three callbacks kept
    adaptive = True
    name = ""


class _SampleDense:
    """Each sample's ``DenseSolution``; NaN outside a sample's span (as ``BatchedDense``)."""

    def __init__(self, dense: list):
        self.dense = dense

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        B = len(self.dense)
        q = q.to(torch.float64)
        q = q[None].expand(B, -1) if q.dim() == 1 else q
        cols = []
        for b, d in enumerate(self.dense):
            lo, hi = sorted((d.t0, d.t1))
            row = q[b]
            inside = (row >= lo) & (row <= hi)
            val = torch.full((row.numel(), d.layout.n), math.nan, dtype=torch.float64)
            if bool(inside.any()):
                v = d(row[inside])
                v = torch.cat([x.reshape(x.shape[0], -1) for x in v], 1) \
                    if isinstance(v, tuple) else v.reshape(v.shape[0], -1)
                val = val.to(v.dtype)
                val[inside] = v
            cols.append(val)
        return torch.stack(cols, 1)  # (m, B, n)


def _run_sample_by_sample(s: _Setup, func, y0, t, *, rtol, atol, method, options,
                          gradient: Gradient, throw: bool, event_fn, dense: bool):
    """Each sample alone on the float clock, through the one-problem solver; gradients of
    every strategy flow through the stacked outputs."""
    p, B = s.p, s.B
    layout = p.layout
    opts, _ = _split_options(options)
    items, is_tuple = check_y0(y0, batch=True)
    sample = _Sample(func, layout, p.rhs.time_arg, p.rhs.dtype)
    cbs = sample.callbacks()
    ev = sample.event(event_fn) if event_fn is not None else None
    params = None
    if isinstance(gradient, Adjoint):
        params = find_params(func, gradient.params)
    elif isinstance(gradient, Checkpoint) and gradient.params is None:
        params = find_params(func, None, probe=lambda: func(
            t[..., 0] if t.dim() == 1 else t[:, 0],
            tuple(v.detach() for v in items) if is_tuple else items[0].detach()),
            who="gradient='checkpoint'", arg="Checkpoint params")
        gradient = Checkpoint(budget=gradient.budget, params=params)
    T = s.ts.shape[1]
    outs, status, t_fin, y_fin, n_acc, n_rej, reached, msgs, dense_sols = \
        [], [], [], [], [], [], [], [], []
    ev_t = torch.full((B,), math.nan, dtype=torch.float64)
    st = p.stats
    for b in range(B):
        y0_b = tuple(v[b] for v in items) if is_tuple else items[0][b]
        t_b = t if t.dim() == 1 else t[b]
        if isinstance(gradient, Adjoint):
            ys_b, sb = odeint_adjoint(sample, y0_b, t_b, rtol=rtol, atol=atol, method=method,
                                      options=opts, return_stats=True,
                                      **{**gradient.kwargs(), "adjoint_params": params})
            status_b, msg_b, tf_b = sb.status, sb.message, sb.t_final
            yf_b = tuple(v[-1] for v in ys_b) if is_tuple else ys_b[-1]
        else:
            pb = prepare(sample, y0_b, rtol=rtol, atol=atol, method=method, options=opts)
            sol = solve_problem(pb, check_t(t_b), event_fn=ev, dense=dense, throw=throw,
                                checkpoint=gradient if isinstance(gradient, Checkpoint)
                                else None, callbacks=cbs)
            ys_b, sb, status_b, msg_b = sol.ys, sol.stats, sol.status, sol.message
            tf_b, yf_b = sol.t_final, sol.y_final
            if sol.event_t is not None:
                ev_t[b] = float(sol.event_t)
            dense_sols.append(sol.dense)
        flat = layout.flatten(ys_b, ys_b[0].shape[0] if is_tuple else ys_b.shape[0])
        k = flat.shape[0]
        if k < T:
            flat = torch.cat([flat, flat.new_full((T - k, flat.shape[1]), math.nan)])
        outs.append(flat)
        status.append(CODE[status_b])
        msgs.append(f"sample {b}: {msg_b}" if msg_b else "")
        t_fin.append(tf_b)
        y_fin.append(layout.flatten(yf_b))
        n_acc.append(sb.n_accepted)
        n_rej.append(sb.n_rejected)
        reached.append(k)
        st.nfe += sb.nfe
        st.batch_rows += sb.nfe
    dev = p.y0_flat.device
    res = BatchedResult(torch.stack(outs, 1), torch.tensor(status, device=dev),
                        torch.tensor(t_fin, dtype=torch.float64, device=dev), torch.stack(y_fin),
                        torch.tensor(n_acc, device=dev), torch.tensor(n_rej, device=dev),
                        torch.tensor(reached, device=dev), event_t=ev_t.to(dev))
    _fill_stats(st, res, msgs)
    if throw:  # the one-problem solver raised already; nothing failed silently
        assert not any(NAMES[c] in ERRORS for c in status)
    return res.ys, res, (_SampleDense(dense_sols) if dense else None)


# ------------------------------------------------------------------------------------------
# the front
# ------------------------------------------------------------------------------------------


def solve_per_sample(func: Callable, y0, t, *, rtol=1e-7, atol=1e-9, method=None,
                     options=None, throw: bool = True, event_fn: Callable | None = None,
                     dense: bool = False, gradient: Gradient | None = None,
                     sync_counter: list | None = None) -> PerSampleSolution:
    """``solve(..., per_sample=True)``; see the module docstring. ``event_fn(t, y)`` (t (B,),
    y (B, ...)) -> (B,) or (B, k): each sample stops at its own first sign change (status
    "event", ``event_t`` (B,), NaN outputs after it); gradients treat the event time as
    fixed. ``dense``: keep every step's interpolant; ``sol.evaluate(t)`` (t (m,) or (B, m))
    gives (m, B, ...) states."""
    gradient = gradient if gradient is not None else Backprop()
    if event_fn is not None and not callable(event_fn):
        raise ODEInputError(f"event_fn must be callable, got {type(event_fn).__name__}")
    s = setup(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
              gradient=gradient)
    if isinstance(gradient, Adjoint) and (event_fn is not None or dense or not throw):
        raise ODEInputError("solve(..., per_sample=True, gradient='adjoint') supports neither "
                            "event_fn, dense=True nor throw=False; use gradient='backprop' or "
                            "'checkpoint' for those")
    if isinstance(gradient, Adjoint) and s.driver == "batched":
        ys, stats = odeint_adjoint_per_sample(
            func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
            return_stats=True, **gradient.kwargs())
        last = tuple(v[-1] for v in ys) if s.p.layout.is_tuple else ys[-1]
        return PerSampleSolution(ys=ys, ts=t, stats=stats, status=list(stats.status),
                                 message=list(stats.message), t_final=stats.t_final,
                                 y_final=last, layout=s.p.layout, user_dtype=s.p.rhs.user_dtype)
    if s.driver == "batched":
        ys, res, dense_sol = _run_batched(s, throw=throw, event_fn=event_fn, dense=dense,
                                          sync_counter=sync_counter)
    else:
        ys, res, dense_sol = _run_sample_by_sample(
            s, func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
            gradient=gradient, throw=throw, event_fn=event_fn, dense=dense)
    p = s.p
    return PerSampleSolution(ys=_to_user(p, ys), ts=t, stats=p.stats,
                             status=list(p.stats.status), message=list(p.stats.message),
                             t_final=res.t_final, y_final=_to_user(p, res.y_final),
                             event_t=res.event_t, dense=dense_sol, layout=p.layout,
                             user_dtype=p.rhs.user_dtype)


def _to_user(p: Problem, y: torch.Tensor):
    if y.dtype != p.rhs.user_dtype:
        y = y.to(p.rhs.user_dtype)
    return p.layout.unflatten(y)


def odeint_per_sample(func: Callable, y0, t, *, rtol=1e-7, atol=1e-9, method=None,
                      options=None, return_stats: bool = False,
                      gradient: Gradient | None = None):
    sol = solve_per_sample(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                           gradient=gradient)
    return (sol.ys, sol.stats) if return_stats else sol.ys


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
        s: _Setup = cfg["backward"]
        p = s.p
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
            stepper, ctrl = _batched_parts(p, seg, cfg["aug_norm"])
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
        grads_y0 = p.layout.unflatten(a.to(ys[0].dtype))
        grads_y0 = grads_y0 if p.layout.is_tuple else (grads_y0,)
        return (None, None, *grads_y0, *[g.to(q.dtype) for g, q in zip(quad.total, params)])


def odeint_adjoint_per_sample(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None,
                              adjoint_rtol=None, adjoint_atol=None, adjoint_method=None,
                              adjoint_options=None, adjoint_params=None,
                              return_stats: bool = False, interpolated: bool = False):
    """``odeint_adjoint(..., per_sample=True)``. On the tensor clock: the forward solve of
    ``solve_per_sample`` (no graph kept), and a backward solve per sample of (y, a) from
    each sample's last output time to its first, through its own output times (where a
    gains dL/dy(t_i) and y is reset to the stored output); the parameter gradient is the
    sum over samples of int a^T df/dtheta dt, accumulated by each accepted backward step's
    quadrature (it is not part of any error norm). Memory does not grow with the number of
    steps. Where the sample-by-sample driver runs (see the module docstring, and
    ``interpolated=True``), each sample is differentiated by ``odeint_adjoint`` alone."""
    g = Adjoint(rtol=adjoint_rtol, atol=adjoint_atol, method=adjoint_method,
                options=adjoint_options, params=adjoint_params, interpolated=interpolated)
    fwd = setup(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, gradient=g)
    items, is_tuple = check_y0(y0, batch=True)
    params = find_params(func, adjoint_params)
    adjoint_method = method if adjoint_method is None else adjoint_method
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in (options or {}).items() if k != "norm"}
    b_name, _ = resolve_method(adjoint_method, {k: v for k, v in adjoint_options.items()
                                                if k not in PER_SAMPLE_OPTIONS})
    if fwd.driver != "batched" or not SOLVERS[b_name].tensor_clock:
        if not (torch.is_grad_enabled() and (any(v.requires_grad for v in items) or params)):
            sol = solve_per_sample(func, y0, t, rtol=rtol, atol=atol, method=method,
                                   options=options)
        else:
            sol = solve_per_sample(func, y0, t, rtol=rtol, atol=atol, method=method,
                                   options=options, gradient=g)
        return (sol.ys, sol.stats) if return_stats else sol.ys
    if adjoint_options.get("norm") is not None:
        raise ODEInputError("adjoint_options['norm'] is not supported with per_sample=True "
                            "(the backward error norm is the max of the RMS norms of y and "
                            "its adjoint per sample)")
    adjoint_options = {k: v for k, v in adjoint_options.items()
                       if k not in ("shrink", "compile")}
    a_rtol = rtol if adjoint_rtol is None else adjoint_rtol
    a_atol = atol if adjoint_atol is None else adjoint_atol
    # the backward problem, validated before the forward solve
    bwd = setup(func, tuple(v.detach() for v in items) if is_tuple else items[0].detach(), t,
                rtol=a_rtol, atol=a_atol, method=adjoint_method, options=adjoint_options,
                gradient=Backprop())
    n = bwd.p.layout.n
    aug_layout = StateLayout([torch.Size([n]), torch.Size([n])], True)

    def dup(v):
        return v if not isinstance(v, torch.Tensor) else torch.cat([v, v])
    aug_norm = ErrorNorm(aug_layout, dup(bwd.p.norm.rtol), dup(bwd.p.norm.atol), None)
    stats = PerSampleStats(method=bwd.p.name)
    cfg = {"func": func, "is_tuple": is_tuple, "t": t, "rtol": rtol, "atol": atol,
           "method": method, "options": options, "stats": stats, "backward": bwd,
           "aug_norm": aug_norm}
    needs_grad = torch.is_grad_enabled() and (any(v.requires_grad for v in items) or params)
    if not needs_grad:
        sol = solve_per_sample(func, y0, t, rtol=rtol, atol=atol, method=method,
                               options=options)
        return (sol.ys, sol.stats) if return_stats else sol.ys
    outs = _PerSampleAdjoint.apply(cfg, len(items), *items, *params)
    ys = tuple(outs) if is_tuple else outs[0]
    return (ys, stats) if return_stats else ys
