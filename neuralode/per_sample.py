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
  output; the Rosenbrock and ESDIRK methods with autograd Jacobians (each row's own
  Jacobian block, LU, Newton iterations and Jacobian reuse), with backprop, events and
  dense output: one call of ``func`` per stage (or Newton iteration) for the whole batch.
  Options of this driver: ``options={"compile": True}`` (explicit methods; or a backend
  name, e.g. "aot_eager"): the step (RK stages + controller + per-row bookkeeping) runs
  under ``torch.compile(fullgraph=True)``;
  ``options={"shrink": q}`` (q in (0, 1]): when the running samples are at most the
  fraction q of the current batch, the batch is compacted to them (``func`` then sees
  fewer rows; it must accept any batch size).
* ``"sample_by_sample"``, the float clock: every other case: the fixed-grid implicit,
  multistep, Adams and scipy methods (their order choices, histories and scipy's own
  steps are per problem), the stiff one-step methods with other Jacobian options or the
  adjoint, ``gradient="checkpoint"`` (any budget) and the
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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from neuralode.errors import ODEFuncError, ODEInputError
from neuralode.problem import (
    Problem,
    batch_times,
    check_finite,
    check_func,
    check_t,
    check_y0,
    check_y_unchanged,
    first_callback,
    flat_y0,
    plain_key,
    prepare,
    to_user_dtype,
)
from neuralode.solvers.base import RHS, PerSampleStats, StateLayout
from neuralode.solvers.batched import BatchedDense, BatchedResult, integrate_batched
from neuralode.solvers.compiled import integrate_compiled
from neuralode.solvers.controllers import ErrorNorm, PerSampleGrid
from neuralode.solvers.methods import controller_or_default
from neuralode.solvers.status import CODE, ERRORS, FINISHED_WELL, NAMES
from neuralode.solvers.timekeeping import as_time, time_dtype

PER_SAMPLE_OPTIONS = {"time_arg": "batch", "shrink": None, "compile": False}
FLOAT_CLOCK_OPTIONS = {"step_t": None, "jump_t": None, "perturb": False,
                       "grid_constructor": None}

__all__ = ["PER_SAMPLE_OPTIONS", "PerSampleSolution", "PerSampleStats", "batched_parts",
           "integrate_batched", "run_compiled", "run_sample_by_sample", "setup",
           "solve_per_sample"]


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
    t_final: torch.Tensor | None
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
        tt = as_time(t)
        y = self.dense(tt.reshape(1) if tt.dim() == 0 else tt).to(self.user_dtype)
        if tt.dim() == 0:
            y = y[0]
        return self.layout.unflatten(y)

    @property
    def success(self) -> bool:
        return all(s in FINISHED_WELL for s in self.status)


@dataclass
class _Setup:
    """A validated per-sample solve: the problem on the batch, its times, and the driver."""

    p: Problem
    t: torch.Tensor  # the times as checked ((T,) or (B, T))
    ts: torch.Tensor  # (B, T) float64
    B: int
    driver: str
    shrink: float | None
    compile: bool | str  # options['compile']: False, True or a torch.compile backend


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


def _driver(p: Problem, func, t, tensor_clock: bool) -> str:
    """"batched" where the tensor clock serves everything asked, else "sample_by_sample"."""
    o = p.opts
    float_clock = any(k in o and o[k] is not None and o[k] is not False
                      for k in FLOAT_CLOCK_OPTIONS)
    t_grad = isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()
    callbacks = first_callback(func) is not None
    if not (tensor_clock and p.method.batches(o)) or float_clock or t_grad or callbacks:
        return "sample_by_sample"
    return "batched"


class _Known:
    """What ``setup`` decided for solves of one kind (``_setup_key``): each such solve
    checks only its values (y0 finite, t's times) and gets its own statistics, right-hand
    side and flat state."""

    def __init__(self, s: _Setup):
        p = s.p
        self.B, self.driver, self.shrink, self.compile = s.B, s.driver, s.shrink, s.compile
        self.name, self.method, self.opts, self.opts_key = p.name, p.method, dict(p.opts), \
            p.opts_key
        self.layout, self.norm, self.time_arg = p.layout, p.norm, p.rhs.time_arg

    def renew(self, func, y0, t) -> _Setup:
        check_func(func)
        is_tuple = isinstance(y0, (tuple, list))
        items = list(y0) if is_tuple else [y0]
        check_finite(items, is_tuple)
        device = items[0].device
        ts = batch_times(t, self.B, device)
        stats = PerSampleStats(method=self.name)
        stats.driver = self.driver
        rhs = RHS(func, self.layout, items[0].dtype, device, stats, batch=True,
                  time_arg=self.time_arg)
        y0_flat = flat_y0(self.layout, items, is_tuple, self.B, rhs.dtype)
        p = Problem(func, y0, items, self.layout, rhs, y0_flat, self.method, self.name,
                    dict(self.opts), self.norm, stats, y0_flat._version, self.opts_key)
        return _Setup(p, t, ts, self.B, self.driver, self.shrink, self.compile)


_KNOWN: OrderedDict = OrderedDict()  # ``_setup_key`` -> ``_Known``
MAX_KNOWN = 64


def _setup_key(y0, t, rtol, atol, method, options, tensor_clock: bool) -> tuple | None:
    """What ``setup`` decides from, where a solve of the same key decides the same: the
    types, shapes, dtypes and devices of y0 and t, the tolerances, the method, the options
    (plain values only) and the gradient's needs; None for other solves (checked in full)."""
    if type(t) is not torch.Tensor or type(rtol) not in _NUMBER or \
            type(atol) not in _NUMBER or not rtol > 0 or \
            not (options is None or type(options) is dict) or \
            not (method is None or type(method) is str):
        return None
    items = y0 if isinstance(y0, (tuple, list)) else (y0,)
    if not items:  # (``check_y0`` says what is wrong)
        return None
    for v in items:
        if not isinstance(v, torch.Tensor):
            return None
    opts = plain_key(options or {})
    if opts is None:
        return None
    return (type(y0), tuple((type(v), v.shape, v.dtype, v.device) for v in items),
            t.shape, t.dtype, t.device, t.requires_grad, torch.is_grad_enabled(),
            time_dtype(items[0].device), rtol, atol, method, tensor_clock, opts)


_NUMBER = (int, float)


def setup(func, y0, t, *, rtol, atol, method, options, tensor_clock: bool) -> _Setup:
    """Validate a per-sample solve and choose its driver (``tensor_clock``: the gradient
    strategy can run on the batched driver). A solve of a kind seen before (``_setup_key``)
    checks only its values."""
    key = _setup_key(y0, t, rtol, atol, method, options, tensor_clock)
    known = _KNOWN.get(key) if key is not None else None
    if known is not None and first_callback(func) is None:
        _KNOWN.move_to_end(key)
        return known.renew(func, y0, t)
    s = _setup(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
               tensor_clock=tensor_clock)
    # (not where the options warned: their warning comes at every solve)
    if key is not None and s.p.opts_key is not None and first_callback(func) is None:
        _KNOWN[key] = _Known(s)
        while len(_KNOWN) > MAX_KNOWN:
            _KNOWN.popitem(last=False)
    return s


def _setup(func, y0, t, *, rtol, atol, method, options, tensor_clock: bool) -> _Setup:
    opts, ps = _split_options(options)
    items, _ = check_y0(y0, batch=True, finite=False)  # (its values: ``prepare``'s check)
    B = items[0].shape[0]
    t = check_t(t, batch=B)
    p = prepare(func, y0, rtol=rtol, atol=atol, method=method, options=opts, batch=True,
                time_arg=ps["time_arg"])
    ts = batch_times(t, B, items[0].device)
    # the tensor clock keeps (B,) float64 times on the device; without float64 there
    # (timekeeping.time_dtype: MPS) each sample runs alone on the float clock's host floats
    driver = _driver(p, func, t, tensor_clock and time_dtype(items[0].device) == torch.float64)
    compile = ps["compile"] if isinstance(ps["compile"], str) else bool(ps["compile"])
    if driver != "batched" and (ps["shrink"] is not None or compile):
        raise ODEInputError(
            f"the options 'shrink' and 'compile' need the batched driver (the tensor clock) "
            f"('compile': explicit Runge–Kutta methods; 'shrink' also Rosenbrock and ESDIRK "
            f"ones), with gradient 'backprop' or 'adjoint' (not 'checkpoint' or the "
            f"interpolated adjoint), no step_t/jump_t/perturb/grid_constructor, callbacks "
            f"or gradients in t, on a device with float64; this {p.name!r} solve cannot run "
            f"there")
    if compile and p.method.builds_jacobians():
        raise ODEInputError(f"the option 'compile' serves the explicit Runge–Kutta methods; "
                            f"{p.name!r} builds Jacobians and runs Newton iterations in its "
                            f"step (solve it without 'compile')")
    p.stats.driver = driver
    return _Setup(p, t, ts, B, driver, ps["shrink"], compile)


# ------------------------------------------------------------------------------------------
# the tensor clock
# ------------------------------------------------------------------------------------------


def batched_parts(p: Problem, ts: torch.Tensor, norm: ErrorNorm | None = None,
                  derive: bool = True):
    """The stepper and controller of a batched solve (``norm``: another error norm, the
    adjoint's; ``derive`` False: a fixed grid's tensors are made in the compiled loop)."""
    o = p.opts
    norm = norm or p.norm
    stepper = p.method.make_stepper(o, norm)
    controller: Any
    if p.method.adaptive:
        controller = controller_or_default(o, p.method).bind(norm, stepper.error_order, o,
                                                             o.get("_pid_settings"))
    else:
        controller = PerSampleGrid(ts, o["step_size"], derive)
    return stepper, controller


def fill_stats(st: PerSampleStats, res: BatchedResult, msgs: list[str]) -> None:
    st.n_accepted, st.n_rejected = res.n_accepted, res.n_rejected
    st.status = [NAMES[c] for c in res.status.tolist()]
    st.message = msgs
    st.t_final = res.t_final


def run_compiled(s: _Setup, *, throw: bool = True, jumps=None, outputs: bool = True,
                 info: dict | None = None) -> BatchedResult:
    """The compiled solve of a validated setup (``options['compile']``; ``jumps``,
    ``outputs``, ``info``: see ``integrate_compiled``), its statistics filled in."""
    p = s.p
    if p.norm.user_norm is not None:
        raise ODEInputError("the compiled solve (options['compile']) takes the default "
                            "error norm; drop options['norm'] or 'compile'")
    stepper, controller = batched_parts(p, s.ts, derive=False)
    backend = s.compile if isinstance(s.compile, str) else "inductor"
    tols = (p.norm.rtol, p.norm.atol) if p.norm.scalar_tol else None
    info = {} if info is None else info
    res, msgs = integrate_compiled(p.rhs, p.y0_flat, s.ts, stepper, controller,
                                   max_num_steps=p.opts["max_num_steps"], throw=throw,
                                   name=p.name, backend=backend,
                                   stiffness=p.method.stiffness_check(p.opts),
                                   tolerances=tols, info=info, jumps=jumps, outputs=outputs,
                                   settings_key=p.opts_key)
    p.stats.compile_s, p.stats.n_compiles = info["compile_s"], info["compiles"]
    check_y_unchanged(p)
    fill_stats(p.stats, res, msgs)
    return res


def _run_batched(s: _Setup, *, throw: bool, event_fn, dense: bool, sync_counter):
    p = s.p
    if event_fn is not None and (not p.method.adaptive or s.shrink is not None
                                 or s.compile):
        raise ODEInputError("per_sample=True events need an adaptive method, without the "
                            "options 'shrink' and 'compile'")
    if dense and s.shrink is not None:
        raise ODEInputError("per_sample=True dense output cannot be combined with 'shrink'")
    if s.compile:
        if dense:
            raise ODEInputError("the compiled solve (options['compile']) has no dense "
                                "output; solve without 'compile' for dense=True")
        res = run_compiled(s, throw=throw)
        return res.ys, res, None
    stepper, controller = batched_parts(p, s.ts)
    record: list | None = [] if dense else None
    res, msgs = integrate_batched(p.rhs, p.y0_flat, s.ts, stepper, controller,
                                  max_num_steps=p.opts["max_num_steps"], throw=throw,
                                  name=p.name, shrink=s.shrink, sync_counter=sync_counter,
                                  event_fn=event_fn,
                                  record=record,
                                  event_interior_points=p.opts["event_interior_points"],
                                  step_to_outputs=p.opts.get("step_to_outputs", False),
                                  stiffness=p.method.stiffness_check(p.opts))
    check_y_unchanged(p)
    fill_stats(p.stats, res, msgs)
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

    def __getattr__(self, name: str):
        """torchdiffeq's callbacks of the batch's ``func`` (and their ``_adjoint``
        variants), called with the sample as a batch of one."""
        if name.startswith("callback_") and callable(getattr(self.func, name, None)):
            cb = getattr(self.func, name)
            return lambda t0, y0, dt: cb(*self._args(t0, y0), dt.reshape(1))
        raise AttributeError(name)


class _SampleDense:
    """Each sample's ``DenseSolution``; NaN outside a sample's span (as ``BatchedDense``)."""

    def __init__(self, dense: list):
        self.dense = dense

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        B = len(self.dense)
        q = as_time(q)
        q = q[None].expand(B, -1) if q.dim() == 1 else q
        cols = []
        for b, d in enumerate(self.dense):
            lo, hi = sorted((d.t0, d.t1))
            row = q[b]
            inside = (row >= lo) & (row <= hi)
            val = torch.full((row.numel(), d.layout.n), math.nan, dtype=q.dtype, device=q.device)
            if bool(inside.any()):
                v = d(row[inside])
                v = torch.cat([x.reshape(x.shape[0], -1) for x in v], 1) \
                    if isinstance(v, tuple) else v.reshape(v.shape[0], -1)
                val = val.to(v.dtype)
                val[inside] = v
            cols.append(val)
        return torch.stack(cols, 1)  # (m, B, n)


def run_sample_by_sample(s: _Setup, func, y0, t, solve_one: Callable, *, event_fn=None,
                         dense: bool = False, throw: bool = True):
    """Each sample alone on the float clock: ``solve_one(func_b, y0_b, t_b, event_fn_b)``
    returns the sample's ``Solution`` (a gradient strategy's one-problem
    solve); gradients of every strategy flow through the stacked outputs."""
    p, B = s.p, s.B
    layout = p.layout
    items, is_tuple = check_y0(y0, batch=True)
    sample = _Sample(func, layout, p.rhs.time_arg, p.rhs.dtype)
    ev = sample.event(event_fn) if event_fn is not None else None
    T = s.ts.shape[1]
    outs, status, t_fin, y_fin, n_acc, n_rej, reached, msgs, dense_sols = \
        [], [], [], [], [], [], [], [], []
    ev_t = [math.nan] * B
    st = p.stats
    st.driver = "sample_by_sample"
    for b in range(B):
        y0_b = tuple(v[b] for v in items) if is_tuple else items[0][b]
        sol = solve_one(sample, y0_b, s.t if s.t.dim() == 1 else s.t[b], ev)
        n_t = sol.ys[0].shape[0] if is_tuple else sol.ys.shape[0]
        flat = layout.flatten(sol.ys, n_t)
        if n_t < T:
            flat = torch.cat([flat, flat.new_full((T - n_t, flat.shape[1]), math.nan)])
        outs.append(flat)
        status.append(CODE[sol.status])
        msgs.append(f"sample {b}: {sol.message}" if sol.message else "")
        t_fin.append(sol.t_final)
        y_fin.append(layout.flatten(sol.y_final))
        n_acc.append(sol.stats.n_accepted)
        n_rej.append(sol.stats.n_rejected)
        reached.append(n_t)
        if sol.event_t is not None:
            ev_t[b] = float(sol.event_t)
        dense_sols.append(sol.dense)
        st.nfe += sol.stats.nfe
        st.batch_rows += sol.stats.nfe
        st.extra.setdefault("samples", []).append(sol.stats)
    dev = p.y0_flat.device
    tdt = time_dtype(dev)
    res = BatchedResult(torch.stack(outs, 1), torch.tensor(status, device=dev),
                        torch.tensor(t_fin, dtype=tdt, device=dev), torch.stack(y_fin),
                        torch.tensor(n_acc, device=dev), torch.tensor(n_rej, device=dev),
                        torch.tensor(reached, device=dev),
                        event_t=torch.tensor(ev_t, dtype=tdt, device=dev))
    fill_stats(st, res, msgs)
    if throw:  # the one-problem solver raised already; nothing failed silently
        assert not any(NAMES[c] in ERRORS for c in status)
    return _solution(s, t, res, _SampleDense(dense_sols) if dense else None)


def _solution(s: _Setup, t, res: BatchedResult, dense_sol) -> PerSampleSolution:
    p = s.p
    return PerSampleSolution(ys=p.layout.unflatten(to_user_dtype(res.ys, p)), ts=t,
                             stats=p.stats,
                             status=list(p.stats.status), message=list(p.stats.message),
                             t_final=res.t_final,
                             y_final=p.layout.unflatten(to_user_dtype(res.y_final, p)),
                             event_t=res.event_t, dense=dense_sol, layout=p.layout,
                             user_dtype=p.rhs.user_dtype)


# ------------------------------------------------------------------------------------------
# the front
# ------------------------------------------------------------------------------------------


def solve_per_sample(strategy, func: Callable, y0, t, *, rtol=1e-7, atol=1e-9, method=None,
                     options=None, throw: bool = True, event_fn: Callable | None = None,
                     dense: bool = False, sync_counter: list | None = None
                     ) -> PerSampleSolution:
    """``solve(..., per_sample=True)`` differentiated by ``strategy`` (a gradient strategy
    that differentiates the loop: backprop or checkpoint); see the module docstring.
    ``event_fn(t, y)`` (t (B,), y (B, ...)) -> (B,) or (B, k): each sample stops at its own
    first sign change (status "event", ``event_t`` (B,), NaN outputs after it); gradients
    treat the event time as fixed. ``dense``: keep every step's interpolant;
    ``sol.evaluate(t)`` gives the states at t."""
    if event_fn is not None and not callable(event_fn):
        raise ODEInputError(f"event_fn must be callable, got {type(event_fn).__name__}")
    s = setup(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
              tensor_clock=strategy.tensor_clock)
    if s.driver == "batched":
        _, res, dense_sol = _run_batched(s, throw=throw, event_fn=event_fn, dense=dense,
                                         sync_counter=sync_counter)
        return _solution(s, t, res, dense_sol)
    opts, _ = _split_options(options)
    items, is_tuple = check_y0(y0, batch=True)
    one = strategy.bind_params(func, lambda: func(
        s.ts[:, 0].to(s.p.rhs.dtype),
        tuple(v.detach() for v in items) if is_tuple else items[0].detach()))

    def solve_one(f_b, y0_b, t_b, ev):
        return one.solve(f_b, y0_b, t_b, rtol=rtol, atol=atol, method=method, options=opts,
                         event_fn=ev, dense=dense, throw=throw)
    return run_sample_by_sample(s, func, y0, t, solve_one, event_fn=event_fn, dense=dense,
                                throw=throw)
