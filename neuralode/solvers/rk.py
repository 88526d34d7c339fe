"""One generic explicit Runge–Kutta stepper, driven by a ``ButcherTableau``, and the two
solvers built on it: fixed grid and adaptive (embedded pair with step-size control).

Two evaluation modes share the same tableau data:

* no autograd (inference, and every solve inside ``odeint_adjoint``): the stages live in one
  preallocated ``(s_ext, n)`` buffer and each stage costs one ``addmv`` plus one copy;
* autograd enabled (backpropagation through the solver): stages are combined with
  out-of-place ops only, so the graph holds the stage values and nothing is overwritten.

Dense output (``tableau.dense``) gives every method's interpolant as weights over the
extended stages, so outputs at requested times never shorten steps.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, ClassVar

import torch

from neuralode.errors import MaxStepsError, ODEInputError, StepSizeError
from neuralode.solvers.base import Solver, nudge, positive_float
from neuralode.solvers.control import ErrorNorm, PIDController, initial_step
from neuralode.solvers.tableau import ButcherTableau


@functools.cache
def _python_coefficients(tab: ButcherTableau):
    """Stage times and the non-zero coefficients of a tableau, as Python floats."""
    s = tab.stages
    c = [float(x) for x in tab.c]
    a_nz = [[(j, float(tab.a[i, j])) for j in range(i) if tab.a[i, j] != 0.0] for i in range(s)]
    b_nz = [(j, float(x)) for j, x in enumerate(tab.b) if x != 0.0]
    return c, a_nz, b_nz


@functools.lru_cache(maxsize=64)
def _tensor_coefficients(tab: ButcherTableau, dtype: torch.dtype, device: torch.device):
    """A tableau's coefficients as tensors of the state's dtype and device, made once per
    (tableau, dtype, device) rather than at every solve (the adjoint solves once per output
    interval). Read-only: nothing writes into them."""
    s = tab.stages
    a_rows = [torch.tensor(tab.a[i, :i], dtype=dtype, device=device) for i in range(s)]
    b = torch.tensor(tab.b, dtype=dtype, device=device)
    b_err = None if tab.b_err is None else torch.tensor(tab.b_err, dtype=dtype, device=device)
    dense_t = torch.tensor(tab.dense.T, dtype=dtype, device=device)  # (degree, s_ext)
    return a_rows, b, b_err, dense_t


class RKStepper:
    """Evaluates the stages of one tableau on the flat state."""

    def __init__(self, tab: ButcherTableau, rhs, y0: torch.Tensor):
        self.tab = tab
        self.rhs = rhs.call
        s = tab.stages
        self.s = s
        self.s_ext = tab.dense.shape[0]
        self.c, self.a_nz, self.b_nz = _python_coefficients(tab)
        self.a_rows, self.b, self.b_err, self.dense_t = _tensor_coefficients(
            tab, y0.dtype, y0.device)
        self.degree = tab.dense.shape[1]
        self.K = None
        self.KT = None
        self.stage_plan = None

    # -- no-autograd path ---------------------------------------------------------------
    def buffer(self, y0: torch.Tensor) -> torch.Tensor:
        if self.K is None:
            self.K = torch.empty(self.s_ext, y0.numel(), dtype=y0.dtype, device=y0.device)
            # transposed views K[:i]^T, made once; addmv(y, K[:i]^T, a_i) = y + K[:i]^T a_i
            self.KT = [self.K[:i].t() for i in range(self.s_ext + 1)]
            self.stage_plan = [(self.KT[i], self.a_rows[i], self.c[i], self.K[i])
                               for i in range(1, self.s)]
        return self.K

    def step_buffer(self, t: float, y: torch.Tensor, h: float, t_last: float | None = None):
        """Stages 2..s into the buffer (K[0] must hold f(t, y)); returns y1.

        ``t_last`` replaces t + h for stages with c == 1 (left-sided evaluation before a
        discontinuity)."""
        rhs, addmv = self.rhs, torch.addmv
        yi = y
        if t_last is None:
            for kt, a, c, k in self.stage_plan:
                yi = addmv(y, kt, a, alpha=h)
                k.copy_(rhs(t + c * h, yi))
        else:
            for kt, a, c, k in self.stage_plan:
                yi = addmv(y, kt, a, alpha=h)
                k.copy_(rhs(t_last if c == 1.0 else t + c * h, yi))
        if self.tab.fsal:
            return yi  # the last stage is evaluated at y1 itself
        return addmv(y, self.KT[self.s], self.b, alpha=h)

    def error_buffer(self) -> torch.Tensor:
        return torch.mv(self.KT[self.s], self.b_err)

    # -- autograd path ----------------------------------------------------------------
    def step_graph(self, t: float, y: torch.Tensor, f0: torch.Tensor, h: float,
                   t_last: float | None = None):
        """Out-of-place stages; returns (y1, list of stage derivatives)."""
        ks = [f0]
        c, rhs = self.c, self.rhs
        yi = y
        for i in range(1, self.s):
            yi = y
            for j, aij in self.a_nz[i]:
                yi = torch.add(yi, ks[j], alpha=h * aij)
            ti = t + c[i] * h if (t_last is None or c[i] != 1.0) else t_last
            ks.append(rhs(ti, yi))
        if self.tab.fsal:
            return yi, ks
        y1 = y
        for j, bj in self.b_nz:
            y1 = torch.add(y1, ks[j], alpha=h * bj)
        return y1, ks

    def error_graph(self, ks) -> torch.Tensor:
        with torch.no_grad():
            return torch.mv(torch.stack(ks[: self.s], dim=1), self.b_err)

    # -- dense output -----------------------------------------------------------------
    def interpolate(self, y: torch.Tensor, K, thetas: list[float], h: float) -> list:
        """States at t + theta h for each theta, from the extended stages K (a buffer
        tensor (s_ext, n) or a list of s_ext tensors):
        y(t + theta h) = y + h * (theta^1..theta^d) @ dense^T @ K."""
        powers = torch.tensor([[th ** (m + 1) for m in range(self.degree)] for th in thetas],
                              dtype=y.dtype, device=y.device)
        w = powers @ self.dense_t  # (m, s_ext)
        if isinstance(K, list):
            K = torch.stack(K)
        if len(thetas) == 1:
            return [torch.addmv(y, K.t(), w[0], alpha=h)]
        return list(torch.addmm(y.unsqueeze(0), w, K, alpha=h).unbind(0))


def needs_graph(y0: torch.Tensor, f0: torch.Tensor) -> bool:
    """Backpropagation through the solver is needed when autograd is on and the state or
    f's output at the start depends on something that requires grad; otherwise the faster
    buffer path runs (also for users who forget torch.no_grad() at inference)."""
    return torch.is_grad_enabled() and (y0.requires_grad or f0.requires_grad)


def _sorted_unique_times(method, name, value, t0, t1, direction) -> list[float]:
    """step_t / jump_t: the times strictly inside (t0, t1), in the direction of travel."""
    if value is None:
        return []
    try:
        vals = torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()
    except (TypeError, ValueError, RuntimeError):
        raise ODEInputError(f"option {name!r} of {method!r} must be a 1-D tensor or sequence of "
                            f"times, got {value!r}")
    if any(not math.isfinite(v) for v in vals):
        raise ODEInputError(f"option {name!r} of {method!r} contains non-finite times: {vals}")
    inside = sorted({v for v in vals if direction * (v - t0) > 0 and direction * (t1 - v) > 0},
                    key=lambda v: direction * v)
    return inside


class UniformGrid:
    """The grid t0, t0 + h, ..., t0 + (n - 1) h, t1 computed on demand, so that memory does not
    grow with the number of steps (a list of n floats would)."""

    def __init__(self, t0: float, t1: float, h: float, n: int):
        self.t0, self.t1, self.h, self.n = t0, t1, h, n

    def __len__(self) -> int:
        return self.n + 1

    def __getitem__(self, k: int) -> float:
        if k < 0:
            k += self.n + 1
        if not 0 <= k <= self.n:
            raise IndexError(k)
        return self.t1 if k == self.n else self.t0 + self.h * k


class FixedGridRK(Solver):
    """Fixed-grid explicit Runge–Kutta on a grid from ``step_size`` or ``grid_constructor``."""

    tableau: ButcherTableau
    OPTIONS: ClassVar[dict[str, Any]] = {"step_size": None, "grid_constructor": None, "perturb": False,
               "interp": "cubic"}

    @classmethod
    def describe(cls) -> str:
        t = cls.tableau
        return f"fixed grid, order {t.order}, {t.stages} stages"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options
        if o["step_size"] is not None and o["grid_constructor"] is not None:
            raise ODEInputError(f"{self.name}: give at most one of the options 'step_size' and "
                                f"'grid_constructor'")
        if o["step_size"] is not None:
            self.step_size = positive_float(self.name, "step_size", o["step_size"])
        if o["interp"] not in ("cubic", "linear"):
            raise ODEInputError(f"option 'interp' of {self.name!r} must be 'cubic' (Hermite, the "
                                f"default) or 'linear', got {o['interp']!r}")
        # set by the front door: grid_constructor(func, y0, t) sees the user's objects
        self.func_for_grid = None
        self.y0_user = None
        self.stepper = RKStepper(self.tableau, self.rhs, self.y0)

    # -- grid ------------------------------------------------------------------------------
    def make_grid(self, ts: list[float]) -> list[float]:
        o = self.options
        t0, t1 = ts[0], ts[-1]
        if o["grid_constructor"] is not None:
            tt = torch.tensor(ts, dtype=torch.float64)
            grid = o["grid_constructor"](self.func_for_grid, self.y0_user, tt)
            try:
                grid = torch.as_tensor(grid).detach().to(torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise ODEInputError(f"{self.name}: grid_constructor must return a 1-D tensor of "
                                    f"times, got {type(grid).__name__}")
            if grid.dim() != 1:
                raise ODEInputError(f"{self.name}: grid_constructor must return a 1-D tensor of "
                                    f"times, got shape {tuple(grid.shape)}")
            grid = grid.tolist()
            if not all(math.isfinite(v) for v in grid):
                raise ODEInputError(f"{self.name}: the grid from grid_constructor contains "
                                    f"non-finite times: {[v for v in grid if not math.isfinite(v)]}")
            direction = 1.0 if t1 > t0 else -1.0
            if len(grid) < 2 or grid[0] != t0 or grid[-1] != t1:
                raise ODEInputError(
                    f"{self.name}: grid_constructor must return a grid starting at t[0]={t0} and "
                    f"ending at t[-1]={t1}, got one from {grid[0] if grid else None} to "
                    f"{grid[-1] if grid else None} with {len(grid)} points")
            if any(direction * (b - a) <= 0 for a, b in itertools.pairwise(grid)):
                raise ODEInputError(f"{self.name}: the grid from grid_constructor must be strictly "
                                    f"monotonic in the direction of t")
            return grid
        if o["step_size"] is None:
            return list(ts)
        span = t1 - t0
        h = self.step_size
        n = max(1, math.ceil(abs(span) / h * (1 - 1e-12)))
        return UniformGrid(t0, t1, math.copysign(h, span), n)

    # -- integration -----------------------------------------------------------------------
    def integrate(self, ts: list[float]) -> list[torch.Tensor]:
        outs = [self.y0]
        if len(ts) == 1:
            self.stats.status = "success"
            self.stats.t_final = ts[0]
            return outs
        grid = self.make_grid(ts)
        perturb = bool(self.options["perturb"])
        linear = self.options["interp"] == "linear"
        st = self.stepper
        rhs = self.rhs
        y = self.y0
        i_out = 1
        direction = 1.0 if ts[-1] > ts[0] else -1.0
        t = grid[0]
        f0 = rhs(nudge(t, grid[1]) if perturb else t, y)
        graph = needs_graph(y, f0)
        K = None if graph else st.buffer(y)
        for g in range(1, len(grid)):
            t1 = grid[g]
            h = t1 - t
            t_last = nudge(t1, t) if perturb else None
            if graph:
                y1, ks = st.step_graph(t, y, f0, h, t_last)
            else:
                K[0].copy_(f0)
                y1 = st.step_buffer(t, y, h, t_last)
            self.stats.n_accepted += 1
            if not math.isfinite(y1.sum().item()):
                self.fail_nonfinite(t, h)
            last = g == len(grid) - 1
            # outputs strictly inside (t, t1) need the interpolant; those at t1 are y1
            inside = []
            while i_out < len(ts) and direction * (ts[i_out] - t1) < 0:
                inside.append(ts[i_out])
                i_out += 1
            need_f1 = (not last) or (inside and not linear)
            f1 = None
            if need_f1:
                if perturb:
                    f1 = rhs(t_last, y1) if inside and not linear else None
                else:
                    f1 = rhs(t1, y1)
            if inside:
                thetas = [(x - t) / h for x in inside]
                if linear:
                    outs.extend(y + th * (y1 - y) for th in thetas)
                elif graph:
                    outs.extend(st.interpolate(y, ks + [f1], thetas, h))
                else:
                    K[st.s].copy_(f1)  # the extended stage f(t1, y1)
                    outs.extend(st.interpolate(y, K, thetas, h))
            while i_out < len(ts) and ts[i_out] == t1:
                outs.append(y1)
                i_out += 1
            t, y = t1, y1
            if not last:
                f0 = rhs(nudge(t, grid[g + 1]), y) if perturb else f1
        self.stats.status = "success"
        self.stats.t_final = t
        return outs


class AdaptiveRK(Solver):
    """Embedded Runge–Kutta pair with error control and dense output."""

    tableau: ButcherTableau
    OPTIONS: ClassVar[dict[str, Any]] = {"first_step": None, "safety": 0.9, "ifactor": 10.0, "dfactor": 0.2,
               "min_step": 0.0, "max_step": math.inf, "max_num_steps": 2**31 - 1,
               "step_t": None, "jump_t": None, "norm": None, "pcoeff": 0.0, "icoeff": 1.0,
               "dcoeff": 0.0, "dtype": torch.float64}

    @classmethod
    def describe(cls) -> str:
        t = cls.tableau
        return (f"adaptive, order {t.order}({t.error_order}), {t.stages} stages"
                f"{', FSAL' if t.fsal else ''}, dense output: {t.dense_name}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options
        m = self.name
        self.safety = positive_float(m, "safety", o["safety"])
        self.ifactor = positive_float(m, "ifactor", o["ifactor"])
        self.dfactor = positive_float(m, "dfactor", o["dfactor"])
        if self.ifactor < 1 or self.dfactor > 1:
            raise ODEInputError(f"{m}: need ifactor >= 1 and 0 < dfactor <= 1, got ifactor="
                                f"{self.ifactor}, dfactor={self.dfactor}")
        self.min_step = positive_float(m, "min_step", o["min_step"], allow_zero=True)
        self.max_step = positive_float(m, "max_step", o["max_step"], allow_inf=True)
        if self.min_step > self.max_step:
            raise ODEInputError(f"{m}: min_step={self.min_step} exceeds max_step={self.max_step}")
        self.first_step = (None if o["first_step"] is None
                           else positive_float(m, "first_step", o["first_step"]))
        mns = o["max_num_steps"]
        if not isinstance(mns, int) or isinstance(mns, bool) or mns < 1:
            raise ODEInputError(f"option 'max_num_steps' of {m!r} must be a positive int, got "
                                f"{mns!r}")
        self.max_num_steps = mns
        for name in ("pcoeff", "icoeff", "dcoeff"):
            positive_float(m, name, o[name], allow_zero=True)
        if o["norm"] is not None and not callable(o["norm"]):
            raise ODEInputError(f"option 'norm' of {m!r} must be a callable taking the scaled "
                                f"error (a tensor, or a tuple of tensors for a tuple state) and "
                                f"returning a scalar; got {o['norm']!r}")
        if o["dtype"] not in (torch.float64, torch.float32):
            raise ODEInputError(f"option 'dtype' of {m!r} (time dtype) must be torch.float64 or "
                                f"torch.float32; neuralode always keeps time in float64")
        self.error_norm = ErrorNorm(self.rhs.layout, self.rtol, self.atol, o["norm"])
        self.stepper = RKStepper(self.tableau, self.rhs, self.y0)

    def integrate(self, ts: list[float]) -> list[torch.Tensor]:
        outs = [self.y0]
        stats = self.stats
        if len(ts) == 1:
            stats.status = "success"
            stats.t_final = ts[0]
            return outs
        o = self.options
        tab = self.tableau
        st = self.stepper
        rhs = self.rhs
        norm = self.error_norm
        t0, t_end = ts[0], ts[-1]
        direction = 1.0 if t_end > t0 else -1.0
        step_t = _sorted_unique_times(self.name, "step_t", o["step_t"], t0, t_end, direction)
        jump_t = _sorted_unique_times(self.name, "jump_t", o["jump_t"], t0, t_end, direction)
        jumps = set(jump_t)
        stops = sorted(set(step_t) | jumps, key=lambda v: direction * v) + [t_end]
        controller = PIDController(tab.error_order, self.safety, self.ifactor, self.dfactor,
                                   float(o["pcoeff"]), float(o["icoeff"]), float(o["dcoeff"]))

        y = self.y0
        t = t0
        f0 = rhs(t, y)
        graph = needs_graph(y, f0)
        if not math.isfinite(f0.sum().item()):
            self.fail_nonfinite(t)
        if self.first_step is not None:
            h = direction * self.first_step
        else:
            with torch.no_grad():
                h = initial_step(rhs, t, y.detach(), f0.detach(), direction, tab.error_order,
                                 norm)
        h = direction * min(max(abs(h), self.min_step), self.max_step)

        K = None if graph else st.buffer(y)
        if K is not None:
            K[0].copy_(f0)
        absy = y.detach().abs()
        i_out = 1
        i_stop = 0
        n_attempts = 0
        span = t_end - t0
        fsal = tab.fsal
        s_ext, s = st.s_ext, st.s
        nonfinite = False  # was the last attempt rejected for a nan/inf derivative?
        while True:
            stop = stops[i_stop]
            h_proposed = h
            # Land exactly on the next stop (output end, step_t or jump_t), stretching the
            # step by up to 1% rather than leaving a sliver.
            if direction * (stop - (t + h)) <= 0.01 * abs(h):
                t1 = stop
                h = t1 - t
                at_stop = True
            else:
                t1 = t + h
                at_stop = False
            if abs(h) <= 4 * math.ulp(max(abs(t), abs(t1))) or t1 == t:
                if nonfinite:  # shrinking the step never made the derivative finite
                    self.fail_nonfinite(t, h)
                raise StepSizeError(
                    f"{self.name}: step size underflow at t={t:.17g}: the step h={h:.3g} is "
                    f"below what float64 time resolves there (the error could not be "
                    f"controlled; the problem may be stiff or the solution may blow up). "
                    f"Reached {100 * (t - t0) / span:.1f}% of the way from t0={t0} to "
                    f"t1={t_end}")
            n_attempts += 1
            if n_attempts > self.max_num_steps:
                raise MaxStepsError(
                    f"{self.name}: max_num_steps={self.max_num_steps} exceeded at t={t:.10g}, "
                    f"{100 * (t - t0) / span:.1f}% of the way from t0={t0} to t1={t_end} "
                    f"(last step size {h:.3g}); raise options['max_num_steps'], loosen "
                    f"rtol/atol, or use a method suited to the problem")
            t_last = nudge(t1, t) if (at_stop and t1 in jumps) else None
            if graph:
                y1, ks = st.step_graph(t, y, f0, h, t_last)
                err = st.error_graph(ks)
                y1d = y1.detach()
            else:
                y1 = st.step_buffer(t, y, h, t_last)
                err = st.error_buffer()
                y1d = y1
            absy1 = y1d.abs()
            ratio = norm(err, norm.scale(torch.maximum(absy, absy1)), h)
            if not math.isfinite(ratio):
                # A derivative that is not finite at the current point cannot be helped by
                # smaller steps; elsewhere in the step it may be (e.g. sqrt of a negative
                # overshoot), so reject and shrink.
                if abs(h) <= self.min_step:
                    self.fail_nonfinite(t, h)
                stats.n_rejected += 1
                h = h * self.dfactor
                nonfinite = True
                continue
            nonfinite = False
            accept = ratio <= 1.0 or abs(h) <= self.min_step
            factor = controller.factor(ratio, accept)
            if accept:
                stats.n_accepted += 1
                # f1 = f(t1, y1): the FSAL stage, or a fresh evaluation (also next step's f0)
                if fsal:
                    f1 = ks[-1] if graph else None
                else:
                    f1 = None
                    need_f1 = i_out < len(ts) and direction * (ts[i_out] - t1) < 0 or t1 != t_end
                    if need_f1:
                        f1 = rhs(t_last if t_last is not None else t1, y1)
                        if K is not None:
                            K[s_ext - 1].copy_(f1)
                inside = []
                while i_out < len(ts) and direction * (ts[i_out] - t1) < 0:
                    inside.append(ts[i_out])
                    i_out += 1
                if inside:
                    thetas = [(x - t) / h for x in inside]
                    if graph:
                        kext = ks if fsal else ks + [f1]
                        outs.extend(st.interpolate(y, kext[:s_ext], thetas, h))
                    else:
                        outs.extend(st.interpolate(y, K, thetas, h))
                while i_out < len(ts) and ts[i_out] == t1:
                    outs.append(y1)
                    i_out += 1
                t, y, absy = t1, y1, absy1
                if at_stop:
                    if t1 == t_end:
                        # what the next step would have been had the solve gone on
                        stats.h_next = max(abs(h_proposed), abs(h) * factor)
                        break
                    i_stop += 1
                    if t1 in jumps:
                        # restart after a discontinuity: right-sided derivative, no FSAL
                        f1 = rhs(nudge(t1, t_end), y)
                        if K is not None:
                            K[0].copy_(f1)
                        f0 = f1
                        h = h * factor
                        h = direction * min(max(abs(h), self.min_step), self.max_step)
                        continue
                if graph:
                    f0 = f1
                elif fsal:
                    K[0].copy_(K[s - 1])
                else:
                    K[0].copy_(K[s_ext - 1])
            else:
                stats.n_rejected += 1
            h = h * factor
            h = direction * min(max(abs(h), self.min_step), self.max_step)
        stats.status = "success"
        stats.t_final = t
        return outs


def make_rk_solver(tab: ButcherTableau, doc: str):
    base = AdaptiveRK if tab.adaptive else FixedGridRK
    return type(tab.name.title().replace("_", ""), (base,),
                {"name": tab.name, "tableau": tab, "__doc__": doc})
