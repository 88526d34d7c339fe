"""Per-sample batched solving: the driver, controller and RK stepper of ``per_sample=True``.

A batch of B independent problems y_b' = f(t_b, y_b) is advanced together: one call of the
user's function per stage for the whole batch, but every sample has its own time, step
size, error norm, acceptance, output times, statistics and status. Time, step size and
acceptance are (B,) tensors; each per-row formula is the scalar path's formula
(``controllers.ErrorNorm``, ``controllers.initial_step``, ``controllers._PIDRun``,
``rk.RKStepper``), so each sample takes the steps it takes when solved alone.

Why a separate driver from ``loop.integrate``: the scalar loop keeps time and step size as
Python floats and branches on them (a few microseconds per step, guarded by
``benchmarks/loop.py``); with (B,) tensors every branch becomes a masked tensor update and
the only host synchronisation is "is any sample still running" (one per adaptive step, none
per fixed-grid step). Sharing one loop would put tensor bookkeeping on the scalar path's hot
loop. The pieces that define the numerics are shared: the tableaux and their dense-output
weights (``rk._tensor_coefficients``, ``rk._python_coefficients``), the tolerance scale
(``ErrorNorm.scale``), the controller settings (``PIDController.settings``).

States are flat (B, n) tensors (n: the per-sample element count); times are float64 (B,)
tensors on the state's device.

Finished samples: the batch is masked, not shrunk, by default (a finished row takes zero
steps: its f-evaluations are wasted, its values unchanged); ``shrink`` (a fraction in
(0, 1]) compacts the batch to its running rows when they fall to that fraction or below,
which needs a ``func`` that treats rows independently and accepts any batch size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from neuralode.errors import MaxStepsError, NonFiniteError, ODEFuncError, StepSizeError
from neuralode.solvers.rk import _python_coefficients, _tensor_coefficients
from neuralode.solvers.tableau import ButcherTableau

RUNNING, SUCCESS, EVENT, MAX_STEPS, STEP_SIZE, NONFINITE = range(6)
STATUS_NAMES = ("running", "success", "event", "max_steps_reached", "step_size_underflow",
                "nonfinite")
_ERRORS = {MAX_STEPS: MaxStepsError, STEP_SIZE: StepSizeError, NONFINITE: NonFiniteError}


@dataclass
class PerSampleStats:
    """Statistics of a per-sample solve.

    nfe: calls of the user's function (each call evaluates the whole running batch);
    n_accepted, n_rejected: (B,) int64 tensors, each sample's own step attempts;
    status: one status name per sample ("success", "event", or with ``throw=False``
    "max_steps_reached", "step_size_underflow", "nonfinite"); message: one per sample ("" on
    success); t_final: (B,) float64 tensor, where each sample stopped; batch_rows: the sum
    over calls of the rows evaluated (with ``shrink`` below B * nfe).
    """

    method: str = ""
    nfe: int = 0
    n_accepted: torch.Tensor | None = None
    n_rejected: torch.Tensor | None = None
    status: list[str] = field(default_factory=list)
    message: list[str] = field(default_factory=list)
    t_final: torch.Tensor | None = None
    batch_rows: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def n_steps(self) -> torch.Tensor:
        return self.n_accepted + self.n_rejected

    @property
    def success(self) -> bool:
        return all(s in ("success", "event") for s in self.status)

    def __str__(self) -> str:
        bad = sum(s not in ("success", "event") for s in self.status)
        acc = self.n_accepted
        return (f"{self.method}: nfe={self.nfe} (batched calls), accepted per sample "
                f"min/max={int(acc.min())}/{int(acc.max())}, failed samples={bad}")


class BatchedRHS:
    """The user's ``func`` on a flat (B, n) state with (B,) float64 times.

    ``time_arg``: "batch" hands ``func`` the times as a (B,) tensor (the state's dtype);
    "none" hands it a 0-d NaN tensor (for functions that do not use t: a function that does
    use it turns the state into NaN, which is reported, never silently wrong)."""

    def __init__(self, func: Callable, layout, dtype: torch.dtype, device, stats: PerSampleStats,
                 time_arg: str = "batch"):
        self.func, self.layout, self.stats = func, layout, stats
        self.user_dtype = dtype
        self.dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.device = device
        self.time_arg = time_arg
        self.nan_t = torch.full((), math.nan, dtype=self.dtype, device=device)
        self.checked = False
        self.counting = True  # off inside a compiled step (the driver counts its calls)

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = y.shape[0]
        if self.counting:
            stats = self.stats
            stats.nfe += 1
            stats.batch_rows += B
        layout = self.layout
        tt = t.to(self.dtype) if self.time_arg == "batch" else self.nan_t
        yu = y if self.user_dtype == self.dtype else y.to(self.user_dtype)
        if layout.is_tuple:
            yu = tuple(yu[:, a:b].reshape(B, *s) for a, b, s in
                       zip(layout.offsets[:-1], layout.offsets[1:], layout.shapes))
            out = self.func(tt, yu)
            if not self.checked:
                self._check(out, B)
            flat = torch.cat([o.reshape(B, -1) for o in out], dim=1)
        else:
            out = self.func(tt, yu.view(B, *layout.shapes[0]))
            if not self.checked or not isinstance(out, torch.Tensor) or out.dtype != self.user_dtype:
                self._check(out, B)
            flat = out.reshape(B, layout.n)
        return flat if flat.dtype == self.dtype else flat.to(self.dtype)

    def _check(self, out, B: int) -> None:
        layout = self.layout
        items = list(out) if layout.is_tuple and isinstance(out, (tuple, list)) else [out]
        if layout.is_tuple and (not isinstance(out, (tuple, list))
                                or len(items) != len(layout.shapes)):
            raise ODEFuncError(f"func(t, y) must return a tuple of {len(layout.shapes)} "
                               f"tensors matching the tuple state, got {type(out).__name__}")
        for k, (o, s) in enumerate(zip(items, layout.shapes)):
            where = "func(t, y)" + (f", element {k}," if layout.is_tuple else "")
            if not isinstance(o, torch.Tensor):
                raise ODEFuncError(f"{where} must return a tensor, got {type(o).__name__}")
            if tuple(o.shape) != (B, *s):
                raise ODEFuncError(f"{where} returned shape {tuple(o.shape)}, but the batched "
                                   f"state has shape {(B, *s)}; dy/dt must have the shape of y "
                                   f"(per_sample=True: the first dimension is the batch)")
            if o.dtype != self.user_dtype:
                raise ODEFuncError(f"{where} returned dtype {o.dtype}, but the state has dtype "
                                   f"{self.user_dtype}")
        self.checked = True


# ----------------------------------------------------------------------------------------
# error norm, first step, controller: the scalar formulas row by row
# ----------------------------------------------------------------------------------------


def row_norm(norm, err: torch.Tensor, scale: torch.Tensor, factor=None) -> torch.Tensor:
    """(B,) norms of ``factor * err / scale`` per row, ``ErrorNorm.__call__``'s formula.
    A user norm receives the scaled error of the batch (in the user's structure, leading
    dimension B) and must return a (B,) tensor."""
    ratio = err / scale
    if norm.user_norm is not None:
        if factor is not None:
            ratio = ratio * factor[:, None]
        layout = norm.layout
        B = ratio.shape[0]
        if layout.is_tuple:
            arg = tuple(ratio[:, a:b].reshape(B, *s) for a, b, s in
                        zip(layout.offsets[:-1], layout.offsets[1:], layout.shapes))
        else:
            arg = ratio.reshape(B, *layout.shapes[0])
        out = torch.as_tensor(norm.user_norm(arg), dtype=ratio.dtype, device=ratio.device)
        if out.shape != (B,):
            raise ODEFuncError(f"the error norm (options['norm']) must return one value per "
                               f"sample, shape ({B},), in per_sample mode; got shape "
                               f"{tuple(out.shape)}")
        return out.to(torch.float64)
    if not norm.mixed:
        v = torch.linalg.vector_norm(ratio, dim=1).to(torch.float64) * norm.inv_sqrt_n
    else:
        offs = norm.layout.offsets
        v = torch.stack([torch.linalg.vector_norm(ratio[:, a:b], dim=1) / math.sqrt(b - a)
                         for a, b in itertools.pairwise(offs) if b > a], 1).amax(1)
        v = v.to(torch.float64)
    return v if factor is None else v * factor.abs()


def ulp(x: torch.Tensor) -> torch.Tensor:
    """math.ulp of a non-negative float64 tensor."""
    return torch.nextafter(x, torch.full_like(x, math.inf)) - x


def initial_step(rhs, t0, y0, f0, direction, order: int, norm) -> torch.Tensor:
    """``controllers.initial_step`` per row: (B,) signed steps, nan where the error norm is
    not finite at the start. One extra (batched) evaluation of f."""
    scale = norm.scale(y0.abs())
    d0 = row_norm(norm, y0, scale)
    d1 = row_norm(norm, f0, scale)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, 1e-6, 0.01 * d0 / d1)
    h0 = torch.where(torch.isfinite(h0), h0, 1e-6)
    y1 = y0 + ((direction * h0)[:, None] * f0).to(y0.dtype) if y0.dtype != torch.float64 \
        else y0 + (direction * h0)[:, None] * f0
    f1 = rhs(t0 + direction * h0, y1)
    d2 = row_norm(norm, f1 - f0, scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6),
                     (0.01 / dmax) ** (1.0 / (order + 1)))
    h = direction * torch.minimum(100 * h0, h1)
    h = torch.where(torch.isfinite(d2), h, direction * h0 * 1e-3)
    return torch.where(torch.isfinite(d0) & torch.isfinite(d1), h, math.nan)


class BatchedPID:
    """``controllers._PIDRun`` with (B,) tensors: per-sample error ratio, acceptance, next
    step and PID history."""

    STRETCH = 0.1

    def __init__(self, norm, error_order: int, s: dict):
        k = error_order + 1.0
        self.norm, self.settings = norm, s
        self.safety, self.ifactor, self.dfactor = s["safety"], s["ifactor"], s["dfactor"]
        self.min_step, self.max_step, self.first = s["min_step"], s["max_step"], s["first_step"]
        self.b1 = (s["pcoeff"] + s["icoeff"] + s["dcoeff"]) / k
        self.b2 = -(s["pcoeff"] + 2 * s["dcoeff"]) / k
        self.b3 = s["dcoeff"] / k
        self.error_order = error_order

    def clamp(self, h, direction):
        return direction * h.abs().clamp(min=self.min_step).clamp(max=self.max_step)

    def start(self, rhs, t0, y0, f0, direction, h0=None) -> torch.Tensor:
        B = y0.shape[0]
        self.absy = y0.detach().abs()
        self.prev1 = torch.ones(B, dtype=torch.float64, device=y0.device)
        self.prev2 = self.prev1.clone()
        self.nonfinite = torch.zeros(B, dtype=torch.bool, device=y0.device)
        if h0 is not None:
            return self.clamp(h0, direction)
        if self.first is not None:
            return self.clamp(torch.full_like(t0, self.first), direction)
        with torch.no_grad():
            h = initial_step(rhs, t0, y0.detach(), f0.detach(), direction, self.error_order,
                             self.norm)
        return torch.where(torch.isfinite(h), self.clamp(h, direction), h)

    def take(self, idx) -> None:
        """Keep the rows ``idx`` (the batch shrinks)."""
        self.absy, self.prev1, self.prev2 = self.absy[idx], self.prev1[idx], self.prev2[idx]
        self.nonfinite = self.nonfinite[idx]

    def judge(self, y1, err, h, direction, live):
        """(accept, next step) per row for attempts of sizes h; ``live``: rows that ran."""
        absy1 = y1.detach().abs()
        ratio = row_norm(self.norm, err, self.norm.scale(torch.maximum(self.absy, absy1)), h)
        finite = torch.isfinite(ratio)
        accept = finite & ((ratio <= 1.0) | (h.abs() <= self.min_step)) & live
        f = self.safety * ratio ** (-self.b1)
        if self.b2:
            f = f * self.prev1 ** (-self.b2)
        if self.b3:
            f = f * self.prev2 ** (-self.b3)
        f = torch.where(ratio == 0.0, self.ifactor, f)
        f_acc = f.clamp(min=1.0).clamp(max=self.ifactor)
        f_rej = (self.safety * ratio ** (-self.b1)).clamp(min=self.dfactor).clamp(max=0.999)
        h_next = self.clamp(h * torch.where(accept, f_acc, f_rej), direction)
        # a nan/inf error: shrink by dfactor (nan when already at min_step: the driver stops)
        h_bad = torch.where(h.abs() <= self.min_step, math.nan,
                            self.clamp(h * self.dfactor, direction))
        h_next = torch.where(finite, h_next, h_bad)
        self.nonfinite = torch.where(live, ~finite, self.nonfinite)
        self.prev2 = torch.where(accept, self.prev1, self.prev2)
        self.prev1 = torch.where(accept, ratio.clamp(min=1e-10), self.prev1)
        self.absy = torch.where(accept[:, None], absy1, self.absy)
        return accept, h_next


# ----------------------------------------------------------------------------------------
# the batched RK stepper
# ----------------------------------------------------------------------------------------


class BatchedRKStepper:
    """One step of an explicit RK method for every row, each with its own t and h."""

    def __init__(self, tab: ButcherTableau, linear: bool = False):
        self.tab, self.linear = tab, linear
        self.s = tab.stages
        self.s_ext = tab.dense.shape[0]
        self.degree = tab.dense.shape[1]
        self.fsal = tab.fsal
        self.order, self.error_order = tab.order, tab.error_order
        self.c, self.a_nz, self.b_nz = _python_coefficients(tab)

    def start(self, rhs, y0, f0, graph: bool) -> None:
        self.rhs, self.graph = rhs, graph
        self.a_rows, self.b, self.b_err, dense_t = _tensor_coefficients(
            self.tab, y0.dtype, y0.device)
        self.dense_t = dense_t
        self.b_nz_idx = [j for j, _ in self.b_nz]
        if graph:
            self.ks = [f0]
            self.f0 = f0
            return
        self.K = torch.empty(self.s_ext, *y0.shape, dtype=y0.dtype, device=y0.device)
        self.K2 = self.K.view(self.s_ext, -1)  # (s_ext, B n): stage sums as one mv
        self.K[0].copy_(f0)

    def take(self, idx) -> None:
        if self.graph:
            self.f0 = self.f0[idx]
            self.ks = [k[idx] for k in self.ks]
        else:
            self.K = self.K[:, idx].contiguous()
            self.K2 = self.K.view(self.K.shape[0], -1)

    def _comb(self, terms, ks):
        out = None
        for j, a in terms:
            out = ks[j] * a if out is None else torch.add(out, ks[j], alpha=a)
        return out

    def step(self, t, y, h) -> torch.Tensor:
        hc = h.to(y.dtype)[:, None]
        rhs, c = self.rhs, self.c
        if self.graph:
            ks = [self.f0]
            yi = y
            for i in range(1, self.s):
                comb = self._comb(self.a_nz[i], ks)
                yi = y + hc * comb if comb is not None else y
                ks.append(rhs(t + c[i] * h, yi))
            self.ks = ks
            y1 = yi if self.fsal else y + hc * self._comb(self.b_nz, ks)
            self.y1 = y1
            return y1
        K, K2 = self.K, self.K2
        shape = y.shape
        yi = y
        for i in range(1, self.s):
            comb = torch.mv(K2[:i].t(), self.a_rows[i]).view(shape)
            yi = torch.addcmul(y, hc, comb)
            K[i].copy_(rhs(t + c[i] * h, yi))
        if not self.fsal:
            yi = torch.addcmul(y, hc, torch.mv(K2[:self.s].t(), self.b).view(shape))
        self.y1 = yi
        return yi

    def error(self) -> torch.Tensor:
        """sum_i b_err_i k_i per row (the local error is h times this)."""
        with torch.no_grad():
            if self.graph:
                return torch.tensordot(self.b_err, torch.stack(self.ks[:self.s]), dims=1)
            return torch.mv(self.K2[:self.s].t(), self.b_err).view(self.K.shape[1:])

    def finish(self, t1, y1) -> None:
        """After the attempt: f(t1, y1) as the extended stage (non-FSAL methods; for every
        row, as the scalar loop evaluates it after every accepted step)."""
        if self.fsal:
            return
        f1 = self.rhs(t1, y1)
        if self.graph:
            self.ks.append(f1)
        else:
            self.K[self.s_ext - 1].copy_(f1)

    def interpolate(self, y, y1, h, theta) -> torch.Tensor:
        """(B, m, n) states at t + theta h (theta: (B, m) float64) on each row's last
        step."""
        if self.linear:
            return y[:, None] + theta.to(y.dtype)[..., None] * (y1 - y)[:, None]
        powers = theta[..., None] ** torch.arange(1, self.degree + 1, device=theta.device,
                                                  dtype=torch.float64)
        w = (powers @ self.dense_t).to(y.dtype)  # (B, m, s_ext)
        K = torch.stack(self.ks[:self.s_ext]) if self.graph else self.K
        comb = torch.einsum("bms,sbn->bmn", w, K)
        return torch.addcmul(y[:, None], h.to(y.dtype)[:, None, None], comb)

    def advance(self, accept) -> None:
        """The accepted rows' f(t1, y1) becomes their next first stage."""
        if self.graph:
            self.f0 = torch.where(accept[:, None], self.ks[self.s_ext - 1], self.f0)
            return
        K = self.K
        K[0].copy_(torch.where(accept[:, None], K[self.s_ext - 1], K[0]))


# ----------------------------------------------------------------------------------------
# fixed grids
# ----------------------------------------------------------------------------------------


class BatchedGrid:
    """Per-sample fixed grids: the output times (``step_size`` None) or t0 + k h, ending
    exactly at each sample's last output time."""

    def __init__(self, ts: torch.Tensor, step_size: float | None):
        self.ts = ts
        t0, t1 = ts[:, 0], ts[:, -1]
        if step_size is None:
            self.h = None
            self.n = torch.full_like(t0, ts.shape[1] - 1, dtype=torch.long)
        else:
            span = t1 - t0
            self.h = torch.copysign(torch.full_like(t0, float(step_size)), span)
            steps = span.abs() / float(step_size) * (1 - 1e-12)
            self.n = torch.ceil(steps).clamp(min=1).to(torch.long)
        self.t0, self.t1 = t0, t1

    def point(self, k: torch.Tensor) -> torch.Tensor:
        """Grid point k of every row (its last point for k >= n)."""
        if self.h is None:
            return self.ts.gather(1, k.clamp(max=self.ts.shape[1] - 1)[:, None])[:, 0]
        return torch.where(k >= self.n, self.t1, self.t0 + self.h * k)

    def take(self, idx) -> None:
        self.ts, self.n, self.t0, self.t1 = self.ts[idx], self.n[idx], self.t0[idx], self.t1[idx]
        if self.h is not None:
            self.h = self.h[idx]


class BatchedEvent:
    """The user's ``event_fn(t, y)`` on the batch: t (B,), y in the user's structure (B, ...);
    it returns (B,) or (B, k) values; each sample's event is the first time one of its
    components changes sign (each component multiplied by its sign at the start, the minimum
    watched, as the scalar path)."""

    BISECTIONS = 64  # halvings of the step: below float64 resolution of the event time

    def __init__(self, fn: Callable, rhs: BatchedRHS):
        self.fn, self.rhs = fn, rhs

    def _raw(self, t, y) -> torch.Tensor:
        rhs = self.rhs
        layout = rhs.layout
        B = y.shape[0]
        yu = y if rhs.user_dtype == rhs.dtype else y.to(rhs.user_dtype)
        if layout.is_tuple:
            yu = tuple(yu[:, a:b].reshape(B, *sh) for a, b, sh in
                       zip(layout.offsets[:-1], layout.offsets[1:], layout.shapes))
        else:
            yu = yu.reshape(B, *layout.shapes[0])
        out = torch.as_tensor(self.fn(t.to(rhs.dtype), yu))
        if out.shape[:1] != (B,) or out.dim() > 2:
            raise ODEFuncError(f"event_fn(t, y) must return shape ({B},) or ({B}, k) in "
                               f"per_sample mode, got {tuple(out.shape)}")
        return out.detach().reshape(B, -1).to(torch.float64)

    def start(self, t, y) -> torch.Tensor:
        with torch.no_grad():
            c = self._raw(t, y)
        if not bool(torch.isfinite(c).all()) or bool((c == 0).any()):
            raise ODEFuncError("event_fn(t0, y0) must be finite and non-zero for every sample "
                               "(an event at the initial time cannot be located)")
        self.signs = torch.sign(c)
        return (c * self.signs).amin(1)

    def __call__(self, t, y) -> torch.Tensor:
        with torch.no_grad():
            return (self._raw(t, y) * self.signs).amin(1)

    def locate(self, stepper, y, y1, h, t, t1, rows) -> torch.Tensor:
        """(B,) event times in (t, t1] for ``rows`` (the last time found with the event
        value still > 0); bisection on each step's interpolant, all rows at once."""
        with torch.no_grad():
            lo, hi = t.clone(), t1.clone()
            hs = torch.where(h != 0, h, 1.0)
            for _ in range(self.BISECTIONS):
                mid = 0.5 * (lo + hi)
                ym = stepper.interpolate(y.detach(), y1.detach(), h, ((mid - t) / hs)[:, None])
                gm = self(mid, ym[:, 0])
                pos = gm > 0
                lo = torch.where(rows & pos, mid, lo)
                hi = torch.where(rows & ~pos, mid, hi)
        return torch.where(rows, lo, t1)


class BatchedDense:
    """The continuous solution of a per-sample solve: every sample's accepted steps and their
    interpolants. ``sol(t)``: t (m,) shared or (B, m) per sample -> (m, B, n) flat states.
    Non-finite values (NaN) where a time lies outside what a sample solved."""

    def __init__(self, steps: list, stepper, t0: torch.Tensor, t_final: torch.Tensor):
        self.t_lo = torch.stack([s[0] for s in steps])  # (S, B)
        self.t_hi = torch.stack([s[1] for s in steps])
        self.h = torch.stack([s[2] for s in steps])
        self.acc = torch.stack([s[3] for s in steps])
        self.y = torch.stack([s[4] for s in steps])  # (S, B, n)
        self.y1 = torch.stack([s[5] for s in steps])
        self.K = torch.stack([s[6] for s in steps])  # (S, s_ext, B, n)
        self.stepper = stepper
        self.t0, self.t_final = t0, t_final

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        B = self.t_lo.shape[1]
        q = q.to(torch.float64).to(self.t_lo.device)
        q = q[None].expand(B, -1) if q.dim() == 1 else q  # (B, m)
        dirn = torch.where(self.t_final >= self.t0, 1.0, -1.0).to(torch.float64)[:, None]
        lo, hi = self.t_lo.T[:, None, :], self.t_hi.T[:, None, :]  # (B, 1, S)
        inside = self.acc.T[:, None, :] & (dirn[..., None] * (q[..., None] - lo) >= 0) & \
            (dirn[..., None] * (q[..., None] - hi) <= 0)  # (B, m, S)
        found = inside.any(-1)
        k = inside.to(torch.int8).argmax(-1)  # (B, m): the first step holding the time
        b = torch.arange(B, device=q.device)[:, None].expand_as(k)
        h = self.h[k, b]
        theta = torch.where(found, (q - self.t_lo[k, b]) / torch.where(h != 0, h, 1.0), 0.0)
        y, y1 = self.y[k, b], self.y1[k, b]  # (B, m, n)
        st = self.stepper
        if st.linear:
            val = y + theta.to(y.dtype)[..., None] * (y1 - y)
        else:
            powers = theta[..., None] ** torch.arange(1, st.degree + 1, device=q.device,
                                                      dtype=torch.float64)
            w = (powers @ st.dense_t).to(y.dtype)  # (B, m, s_ext)
            K = self.K.permute(0, 2, 1, 3)[k, b]  # (B, m, s_ext, n)
            val = torch.addcmul(y, h.to(y.dtype)[..., None],
                                torch.einsum("bms,bmsn->bmn", w, K))
        val = torch.where((q == self.t_hi[k, b])[..., None], y1, val)
        return torch.where(found[..., None], val, math.nan).transpose(0, 1)


# ----------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------


@dataclass
class BatchedResult:
    ys: torch.Tensor  # (T, B, n); NaN at the output times a failed sample did not reach
    status: torch.Tensor  # (B,) int codes
    t_final: torch.Tensor  # (B,) float64
    y_final: torch.Tensor  # (B, n)
    n_accepted: torch.Tensor
    n_rejected: torch.Tensor
    reached: torch.Tensor  # (B,) number of outputs written (the first is y0)
    h_next: torch.Tensor | None = None  # (B,) the step each sample would take next
    event_t: torch.Tensor | None = None  # (B,) float64, NaN for samples without an event


def _messages(res: BatchedResult, name: str, max_num_steps: int) -> list[str]:
    out = []
    for b, (code, tf) in enumerate(zip(res.status.tolist(), res.t_final.tolist())):
        if code == MAX_STEPS:
            out.append(f"{name}: sample {b}: max_num_steps={max_num_steps} exceeded at "
                       f"t={tf:.10g}; raise options['max_num_steps'], loosen rtol/atol, or use "
                       f"a method suited to the problem")
        elif code == STEP_SIZE:
            out.append(f"{name}: sample {b}: step size underflow at t={tf:.17g} (the error "
                       f"could not be controlled, or the error norm was not finite at the "
                       f"start: atol=0 with y0 = 0?); the problem may be stiff or the "
                       f"solution may blow up")
        elif code == NONFINITE:
            out.append(f"{name}: sample {b}: the ODE's derivative or state became non-finite "
                       f"(nan/inf) after t={tf:.10g}; check func for overflow, division by "
                       f"zero or a blow-up of the solution")
        else:
            out.append("")
    return out


def integrate_batched(rhs: BatchedRHS, y0: torch.Tensor, ts: torch.Tensor, stepper, controller,
                      *, max_num_steps: int, throw: bool = True, name: str = "",
                      shrink: float | None = None, sync_counter: list | None = None,
                      h0: torch.Tensor | None = None, on_step: Callable | None = None,
                      compile_step: bool | str = False, event: Callable | None = None,
                      record: list | None = None) -> tuple[BatchedResult, list[str]]:
    """Integrate every row of ``y0`` (B, n) from ts[b, 0] through the times ts[b] (B, T).

    ``controller``: a ``BatchedPID`` (adaptive) or a ``BatchedGrid`` (fixed grid).
    ``sync_counter``: a list; one entry is appended per host synchronisation of the loop.
    ``h0``: (B,) first step sizes (adaptive; default: Hairer's estimate).
    ``on_step(t, y, h, accept, stepper)``: called after every attempt, before the stepper
    moves on (the adjoint's parameter quadrature reads the attempt's stages there).
    ``compile_step``: the attempt (stepper + controller + bookkeeping) and the proposal run
    under ``torch.compile(fullgraph=True)`` (a string: the backend, default "inductor").
    ``event``: a ``BatchedEvent`` (adaptive methods): each sample stops at its own first
    sign change, located to float64 resolution by bisection on its step's interpolant.
    ``record``: a list that receives every attempt's interpolant data (``BatchedDense``)."""
    B, T = ts.shape
    n = y0.shape[1]
    device = y0.device
    adaptive = isinstance(controller, BatchedPID)
    graph = torch.is_grad_enabled() and y0.requires_grad
    dirn = torch.where(ts[:, -1] >= ts[:, 0], 1.0, -1.0).to(torch.float64)
    if T == 1:
        z = torch.zeros(B, dtype=torch.long, device=device)
        return BatchedResult(y0[None], torch.full_like(z, SUCCESS), ts[:, 0].clone(), y0, z,
                             z.clone(), torch.ones_like(z)), [""] * B
    out = y0.new_zeros(T + 1, B, n)  # row T takes the writes of absent outputs
    out[0] = y0
    pieces = []  # (rows, status, t, y, n_acc, n_rej, i_out) of rows that left the batch

    def sync(x: torch.Tensor):
        if sync_counter is not None:
            sync_counter.append(1)
        return x.tolist()

    # per-row running state (the batch may shrink: ``rows`` are the rows' global indices)
    rows = torch.arange(B, device=device)
    t = ts[:, 0].clone()
    t_end = ts[:, -1]
    key = ts * dirn[:, None]  # increasing in each row
    y = y0
    f0 = rhs(t, y)
    status = torch.zeros(B, dtype=torch.long, device=device)
    bad0 = ~torch.isfinite(f0.detach()).all(1)
    status = torch.where(bad0, NONFINITE, status)
    stepper.start(rhs, y, f0, graph)
    if adaptive:
        h = controller.start(rhs, t, y, f0, dirn, h0)
        status = torch.where((status == RUNNING) & ~torch.isfinite(h), STEP_SIZE, status)
    else:
        k_grid = torch.zeros(B, dtype=torch.long, device=device)
        h = controller.point(k_grid + 1) - t
        n_iter = sync(controller.n.max())  # fixed grids: synchronised before the loop only
    running = status == RUNNING
    n_att = torch.zeros(B, dtype=torch.long, device=device)
    n_acc = torch.zeros(B, dtype=torch.long, device=device)
    n_rej = torch.zeros(B, dtype=torch.long, device=device)
    i_out = torch.ones(B, dtype=torch.long, device=device)
    m_fixed = None if adaptive else _max_outputs_per_step(controller, ts, n_iter, sync)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    pending = None  # the last step's outputs, written before the stages are overwritten
    it = 0

    def write_outputs(p, m: int):
        """The outputs in each row's last step, all at once: (B, m) step fractions, one
        interpolation, one indexed write (entries past a row's count go to a spare row T)."""
        y_s, y1_s, h_s, t_s, t1_s, cnt, i0, rows_s, _ = p
        j = torch.arange(m, device=device)[None, :]
        valid = j < cnt[:, None]
        idx = torch.where(valid, i0[:, None] + j, T)
        t_o = ts[rows_s].gather(1, idx.clamp(max=T - 1))
        hs = torch.where(h_s != 0, h_s, 1.0)[:, None]
        theta = torch.where(valid, (t_o - t_s[:, None]) / hs, 0.0)
        val = stepper.interpolate(y_s, y1_s, h_s, theta)
        val = torch.where((t_o == t1_s[:, None])[..., None], y1_s[:, None], val)
        out.index_put_((idx, rows_s[:, None].expand(-1, m)), val)

    no_outputs = torch.zeros(B, dtype=torch.long, device=device)

    def propose(t, h, t_end, dirn, running, status, n_att, nonfinite, n_out, n_ev):
        """Where each running row's attempt ends, the per-row stop checks, and the values
        of the step's one synchronisation (rows running, outputs of the last step)."""
        t_try = t + h
        t1 = torch.where(dirn * (t_end - t_try) <= BatchedPID.STRETCH * h.abs(), t_end, t_try)
        hh = t1 - t
        tiny = ~torch.isfinite(hh) | (hh.abs() <= 4 * ulp(torch.maximum(t.abs(), t1.abs())))
        status = torch.where(running & tiny, torch.where(nonfinite, NONFINITE, STEP_SIZE),
                             status)
        status = torch.where(running & ~tiny & (n_att >= max_num_steps), MAX_STEPS, status)
        running = status == RUNNING
        return t1, hh, status, running, torch.stack([running.sum(), n_out.max(), n_ev])

    def attempt(t, y, h, hh, t1, t_end, dirn, key, running, status, n_att, n_acc, n_rej,
                i_out, k_grid):
        """One attempt of every running row: the stepper's step, the controller's verdict,
        and the per-row bookkeeping (no host synchronisation)."""
        hm = torch.where(running, hh, zero)
        y1 = stepper.step(t, y, hm)
        t1m = torch.where(running, t1, t)
        if adaptive:
            accept, h_next = controller.judge(y1, stepper.error(), hm, dirn, running)
            n_rej = n_rej + (running & ~accept)
        else:
            ok = torch.isfinite(y1.detach()).all(1)
            status = torch.where(running & ~ok, NONFINITE, status)
            accept = running & ok
            k_grid = k_grid + running
            h_next = hh
        n_att = n_att + running
        n_acc = n_acc + accept
        stepper.finish(t1m, y1)
        # outputs in (t, t1] of the accepted rows, written at the next synchronisation
        upto = torch.searchsorted(key, (dirn * t1m)[:, None], right=True)[:, 0]
        cnt = torch.where(accept, upto - i_out, 0)
        i_new = i_out + cnt
        status = torch.where(accept & (t1m == t_end), SUCCESS, status)
        t_new = torch.where(accept, t1m, t)
        y_new = torch.where(accept[:, None], y1, y)
        h = torch.where(running, h_next, h) if adaptive else hh
        return (y1, hm, t1m, cnt, accept, t_new, y_new, h, status, status == RUNNING, n_att,
                n_acc, n_rej, i_new, k_grid)

    calls = stepper.s - 1 + (0 if stepper.fsal else 1)  # evaluations of f per attempt
    if compile_step:
        backend = compile_step if isinstance(compile_step, str) else "inductor"
        propose = torch.compile(propose, fullgraph=True, dynamic=False, backend=backend)
        attempt = torch.compile(attempt, fullgraph=True, dynamic=False, backend=backend)
    if not adaptive:
        k_grid_ = k_grid
    else:
        k_grid_ = torch.zeros((), dtype=torch.long, device=device)
    event_t = torch.full((B,), math.nan, dtype=torch.float64, device=device)
    ev = no_ev = torch.zeros(B, dtype=torch.bool, device=device)
    if event is not None:
        event.start(t, y)
    while True:
        if adaptive:
            t1, hh, status, running, flags = propose(
                t, h, t_end, dirn, running, status, n_att, controller.nonfinite,
                pending[5] if pending is not None else no_outputs, ev.sum())
            n_run, m, n_ev = sync(flags)  # the one synchronisation per step
            if n_ev:
                # rows whose step crossed their event: locate it, keep the outputs before it
                y_s, y1_s, h_s, t_s, t1_s, cnt, i0, rows_s, acc_s = pending
                t_ev = event.locate(stepper, y_s, y1_s, h_s, t_s, t1_s, ev)
                theta = torch.where(ev, (t_ev - t_s) / torch.where(h_s != 0, h_s, 1.0), 0.0)
                y_ev = stepper.interpolate(y_s, y1_s, h_s, theta[:, None])[:, 0]
                upto = torch.searchsorted(key, (dirn * t_ev)[:, None], right=True)[:, 0]
                cnt = torch.where(ev, upto - i0, cnt)
                i_out = torch.where(ev, i0 + cnt, i_out)
                pending = (y_s, y1_s, h_s, t_s, t1_s, cnt, i0, rows_s, acc_s)
                y = torch.where(ev[:, None], y_ev, y)
                t = torch.where(ev, t_ev, t)
                event_t = event_t.index_put((rows,), torch.where(ev, t_ev, event_t[rows]))
                ev = no_ev
            if pending is not None:
                if m > 0:
                    write_outputs(pending, m)
                stepper.advance(pending[8])
            if n_run == 0:
                break
            if shrink is not None and n_run <= shrink * rows.numel():
                idx = running.nonzero()[:, 0]
                gone = ~running
                pieces.append((rows[gone], status[gone], t[gone], y[gone], n_acc[gone],
                               n_rej[gone], i_out[gone], h[gone]))
                rows, t, t_end, y, h, hh, t1 = (rows[idx], t[idx], t_end[idx], y[idx], h[idx],
                                                hh[idx], t1[idx])
                dirn, key, status, running = dirn[idx], key[idx], status[idx], running[idx]
                n_att, n_acc, n_rej, i_out = n_att[idx], n_acc[idx], n_rej[idx], i_out[idx]
                controller.take(idx)
                stepper.take(idx)
        else:
            if pending is not None:
                if m_fixed > 0:
                    write_outputs(pending, m_fixed)
                stepper.advance(pending[8])
            if it >= n_iter:
                break
            t1 = controller.point(k_grid_ + 1)
            running = running & (k_grid_ < controller.n)
            hh = t1 - t
        it += 1
        t_old, y_old, i_old = t, y, i_out
        if compile_step:
            rhs.counting = False
            rhs.stats.nfe += calls
            rhs.stats.batch_rows += calls * y.shape[0]
        (y1, hm, t1m, cnt, accept, t, y, h, status, running, n_att, n_acc, n_rej, i_out,
         k_grid_) = attempt(t, y, h, hh, t1, t_end, dirn, key, running, status, n_att, n_acc,
                            n_rej, i_out, k_grid_)
        rhs.counting = True
        if on_step is not None:
            on_step(t_old, y_old, hm, accept, stepper)
        if record is not None:
            K = torch.stack(stepper.ks[:stepper.s_ext]) if stepper.graph else stepper.K.clone()
            record.append((t_old, t1m, hm, accept, y_old, y1, K))
        if event is not None:
            g1 = event(t1m, y1)
            ev = accept & (g1 <= 0)
            status = torch.where(ev, EVENT, status)
            running = status == RUNNING
        pending = (y_old, y1, hm, t_old, t1m, cnt, i_old, rows, accept)
    pieces.append((rows, status, t, y, n_acc, n_rej, i_out, h))
    status_full = torch.zeros(B, dtype=torch.long, device=device)
    t_final = torch.empty(B, dtype=torch.float64, device=device)
    n_acc_full = torch.zeros(B, dtype=torch.long, device=device)
    n_rej_full = torch.zeros(B, dtype=torch.long, device=device)
    reached = torch.zeros(B, dtype=torch.long, device=device)
    h_final = torch.empty(B, dtype=torch.float64, device=device)
    y_final = y0.new_zeros(B, n)
    for r, st, tf, yf, na, nr, io, hf in pieces:
        status_full[r], t_final[r], n_acc_full[r], n_rej_full[r], reached[r] = st, tf, na, nr, io
        h_final[r] = hf
        y_final = y_final.index_put((r,), yf)
    mask = torch.arange(T, device=device)[:, None] < reached[None, :]
    ys = torch.where(mask[:, :, None], out[:T], math.nan)
    res = BatchedResult(ys, status_full, t_final, y_final, n_acc_full, n_rej_full, reached,
                        h_final, event_t)
    msgs = _messages(res, name, max_num_steps)
    if throw:
        bad = [b for b, s in enumerate(res.status.tolist()) if s in _ERRORS]
        if bad:
            code = int(res.status[bad[0]])
            more = f" ({len(bad)} of {B} samples failed)" if len(bad) > 1 else ""
            raise _ERRORS[code](msgs[bad[0]] + more)
    return res, msgs


def _max_outputs_per_step(grid: BatchedGrid, ts: torch.Tensor, n_max: int, sync) -> int:
    """The most output times any row has in one step of its fixed grid (computed once)."""
    if grid.h is None:
        return 1
    k = torch.arange(n_max + 1, device=ts.device)
    pts = torch.where(k[None, :] >= grid.n[:, None], grid.t1[:, None],
                      grid.t0[:, None] + grid.h[:, None] * k[None, :])
    dirn = torch.where(grid.t1 >= grid.t0, 1.0, -1.0).to(torch.float64)[:, None]
    # step of each output: the first grid point at or beyond it
    step = torch.searchsorted((pts * dirn).contiguous(), (ts[:, 1:] * dirn).contiguous())
    counts = torch.zeros(ts.shape[0], n_max + 2, dtype=torch.long, device=ts.device)
    counts.scatter_add_(1, step, torch.ones_like(step))
    return sync(counts.max())
