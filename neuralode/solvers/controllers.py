"""Step-size controllers (Hairer, Norsett & Wanner, Solving ODEs I, II.4).

A controller decides where each step ends and whether an attempt is accepted:

* ``FixedGridController``: the steps of a given grid, always accepted;
* ``PIDController``: adaptive steps from an embedded error estimate: mixed
  absolute/relative RMS error norm, initial step from two evaluations of f, an I controller
  (``safety * ratio**(-1/k)``) generalised to PID (``pcoeff``, ``icoeff``, ``dcoeff`` in the
  convention of Söderlind / diffrax), growth and shrink bounded by ``ifactor``/``dfactor``.

``PIDController`` is also the object a user passes,
``options={"step_size_controller": PIDController(pcoeff=0.4, icoeff=0.3)}``; settings it
leaves as None come from ``odeint``'s tolerances and options. One instance can serve many
solves: ``bind`` makes the per-solve state.

Time and step sizes are Python floats here (one problem); the per-sample mode will hold them
as (B,) tensors with the same methods.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import ClassVar

import torch

from neuralode.errors import ODEFuncError, ODEInputError, StepSizeError
from neuralode.solvers.elementwise import (
    clip,
    column,
    every,
    isfinite,
    maximum,
    minimum,
    some,
    where,
)
from neuralode.solvers.status import start_scale_message


class ErrorNorm:
    """Turns an error estimate into the ratio that the controller compares with 1.

    ``norm`` is None (RMS over the whole state, or for tuple states the max over elements
    of each element's RMS) or a user callable that receives the scaled error in the user's
    structure (a tensor, or a tuple of tensors) and returns a number or a 0-d tensor (per
    sample: the structure with a leading batch dimension B, and a (B,) tensor back).
    ``rtol``/``atol`` are floats or flat (n,) tensors (per-element tolerances).

    A flat (n,) error gives a Python float (the float-clock driver's one host
    synchronisation per step); a (B, n) batch of errors gives a (B,) float64 tensor.
    """

    def __init__(self, layout, rtol, atol, norm: Callable | None):
        self.layout = layout
        self.rtol = rtol
        self.atol = atol
        self.user_norm = norm
        self.scalar_tol = not isinstance(rtol, torch.Tensor) and not isinstance(atol, torch.Tensor)
        self.mixed = layout.is_tuple and len(layout.shapes) > 1
        # RMS: the 2-norm times 1/sqrt(n); the mixed norm divides each element's part itself
        self.rms_factor = 1.0 if self.mixed else 1.0 / math.sqrt(max(layout.n, 1))

    def scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """atol + rtol * absmax, elementwise."""
        if self.scalar_tol:
            return absmax.mul(self.rtol).add_(self.atol)
        if not isinstance(self.atol, torch.Tensor):
            return (absmax * self.rtol).add_(self.atol)
        if isinstance(self.rtol, torch.Tensor):
            return torch.addcmul(self.atol, self.rtol, absmax)
        return torch.add(self.atol, absmax, alpha=self.rtol)  # per-element atol, one rtol

    def __call__(self, err: torch.Tensor, scale: torch.Tensor, factor=1.0):
        """The norm of ``factor * err / scale``: a float for (n,), (B,) float64 for (B, n)
        (``factor`` a float, or (B,) per row)."""
        ratio = err / scale
        batch = ratio.ndim == 2
        if self.user_norm is not None:
            return self._user(ratio, factor, batch)
        if not self.mixed:
            raw = torch.linalg.vector_norm(ratio, dim=-1) if batch else \
                torch.linalg.vector_norm(ratio)
        else:  # max over tuple elements of the RMS of each element
            dim = -1 if batch else None  # (the reductions without dim are the faster ones)
            raw = torch.stack([torch.linalg.vector_norm(ratio[..., a:b], dim=dim) / math.sqrt(b - a)
                               for a, b in itertools.pairwise(self.layout.offsets) if b > a],
                              -1)
            raw = raw.amax(-1) if batch else raw.max()
        raw = raw.to(torch.float64) if batch else raw.item()
        return raw * self.rms_factor * abs(factor)

    def _user(self, ratio: torch.Tensor, factor, batch: bool):
        if batch:
            if isinstance(factor, torch.Tensor):
                ratio = ratio * factor.to(ratio.dtype)[:, None]
            B = ratio.shape[0]
            out = torch.as_tensor(self.user_norm(self.layout.unflatten(ratio)),
                                  dtype=ratio.dtype, device=ratio.device)
            if out.shape != (B,):
                raise ODEFuncError(f"the error norm (options['norm']) must return one value "
                                   f"per sample, shape ({B},), in per_sample mode; got shape "
                                   f"{tuple(out.shape)}")
            if bool((out < 0).any()):
                raise ODEFuncError(f"the error norm (options['norm']) returned negative "
                                   f"values {out[out < 0].tolist()[:4]}; it must return finite "
                                   f"non-negative numbers")
            return out.to(torch.float64)
        if factor != 1.0:
            ratio = ratio * factor
        value = float(self.user_norm(self.layout.unflatten(ratio)))
        if value < 0:
            raise ODEFuncError(f"the error norm (options['norm']) returned {value}; it must "
                               f"return a finite non-negative number")
        return value

    def convergence(self, y_new: torch.Tensor, y_old: torch.Tensor) -> float:
        """Norm of the change y_new - y_old scaled by the tolerances (corrector iterations)."""
        return self(y_new - y_old, self.scale(torch.maximum(y_new.abs(), y_old.abs())))


def initial_step(rhs_call: Callable, t0, y0: torch.Tensor, f0: torch.Tensor, direction,
                 order: int, norm: ErrorNorm):
    """Hairer's starting step size (Solving ODEs I, II.4, p. 169): a signed step, or nan
    where the error norm is not finite at the start. One extra evaluation of f,
    ``rhs_call(t, y)``. One problem: floats t0, direction; a batch: (B,) tensors."""
    scale = norm.scale(y0.abs())
    d0 = norm(y0, scale)
    d1 = norm(f0, scale)
    ok = isfinite(d0) & isfinite(d1)
    # (in a compiled graph every row runs the formulas below: the last line sets the rows
    # that are not ok to nan)
    if not torch.compiler.is_compiling() and not every(ok):
        if norm.user_norm is not None and bool(torch.isfinite(scale).all()) \
                and bool((scale > 0).all()):
            raise ODEFuncError(f"the error norm (options['norm']) returned {d0} / {d1} for a "
                               f"finite state; it must return a finite non-negative number")
        if not some(ok):
            return where(ok, 0.0, math.nan) * direction
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = where(small, 1e-6, 0.01 * d0 / maximum(d1, 1e-300))  # d1 >= 1e-5 where used
    h0 = where(isfinite(h0), h0, 1e-6)
    y1 = y0 + column(direction * h0, y0) * f0
    f1 = rhs_call(t0 + direction * h0, y1)
    d2 = norm(f1 - f0, scale) / h0
    dmax = maximum(d1, d2)
    h1 = where(dmax <= 1e-15, maximum(h0 * 1e-3, 1e-6),
               (0.01 / maximum(dmax, 1e-300)) ** (1.0 / (order + 1)))
    h = direction * minimum(100 * h0, h1)
    h = where(isfinite(d2), h, direction * h0 * 1e-3)  # a derivative that blows up nearby
    return where(ok, h, math.nan)


def option_number(owner: str, name: str, value, ok: Callable[[float], bool], need: str
                  ) -> float:
    """A float option that satisfies ``ok``, or a clear error saying what is needed. One
    rule for every numeric option (as for rtol/atol): numbers (or 0-d tensors), never
    strings or booleans."""
    if isinstance(value, (str, bytes, bool)):
        raise ODEInputError(f"option {name!r}{owner} must be a number, got {value!r} (a "
                            f"{type(value).__name__}; numeric options take numbers, not text)")
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ODEInputError(f"option {name!r}{owner} must be a number, got {value!r}") from None
    if math.isnan(v) or not ok(v):
        raise ODEInputError(f"option {name!r}{owner} must be {need}, got {value!r}")
    return v


class FixedGridController:
    """Steps along a given grid (an iterable of float64 times, walked once, so a lazy grid
    keeps memory flat); every step is accepted."""

    adaptive = False

    def __init__(self, grid):
        self.it = iter(grid)
        self.t_prev = next(self.it)
        self.t_next = next(self.it, None)

    def first_step(self, *args) -> float:
        return self.t_next - self.t_prev

    def propose(self, t: float, h: float, stop: float, direction: float) -> float:
        return self.t_next

    def judge(self) -> tuple[bool, float]:
        self.t_prev, self.t_next = self.t_next, next(self.it, None)
        return True, (math.nan if self.t_next is None else self.t_next - self.t_prev)


def grid_step_count(span, step):
    """How many steps of size ``step`` cover ``span`` (at least one); a last step within
    1e-12 of ``step`` relative is not split off. ``span`` a float or (B,) tensor (then
    ``step`` may be a 0-d tensor too)."""
    steps = abs(span) / step * (1 - 1e-12)
    if isinstance(steps, torch.Tensor):
        return torch.ceil(steps).clamp(min=1).to(torch.long)
    return max(1, math.ceil(steps))


class PerSampleGrid:
    """Fixed grids per sample (the tensor clock's ``FixedGridController``): each row's
    output times (``step_size`` None) or t0 + k h, ending exactly at the row's last output
    time. ``step_size``: None, a float, or a 0-d float64 tensor (the compiled loop's input:
    another step size is not another loop). ``derive`` False: the grid's tensors are made
    later, by ``at`` (the compiled loop makes them in its graph)."""

    adaptive = False

    def __init__(self, ts: torch.Tensor, step_size, derive: bool = True):
        self.ts, self.step = ts, step_size
        if derive:
            self._derive()

    def _derive(self) -> None:
        ts, step = self.ts, self.step
        t0, t1 = ts[:, 0], ts[:, -1]
        if step is None:
            self.h = None
            self.n = torch.full_like(t0, ts.shape[1] - 1, dtype=torch.long)
        else:
            span = t1 - t0
            if not isinstance(step, torch.Tensor):
                step = float(step)
            self.h = torch.copysign(torch.as_tensor(step, dtype=t0.dtype, device=t0.device)
                                    .expand_as(t0), span)
            self.n = grid_step_count(span, step)
        self.t0, self.t1 = t0, t1

    def at(self, ts: torch.Tensor) -> PerSampleGrid:
        """This grid's settings on the times ``ts``, its tensors made."""
        return PerSampleGrid(ts, self.step)

    def point(self, k: torch.Tensor) -> torch.Tensor:
        """Grid point k of every row (its last point for k >= n)."""
        if self.h is None:
            return self.ts.gather(1, k.clamp(max=self.ts.shape[1] - 1)[:, None])[:, 0]
        return torch.where(k >= self.n, self.t1, self.t0 + self.h * k)

    def take(self, idx) -> None:
        self.ts, self.n, self.t0, self.t1 = self.ts[idx], self.n[idx], self.t0[idx], self.t1[idx]
        if self.h is not None:
            self.h = self.h[idx]


def merge_times(grid, extra, direction: float, rel: float = 1e-9):
    """The sorted union (in the direction of travel) of a grid and extra times inside it,
    lazily. A grid point within ``rel`` of a step of an extra time is dropped for it (no
    sliver steps from rounding, e.g. 15 * 0.02 != 0.3)."""
    extra = sorted(extra, key=lambda v: direction * v)
    k = 0
    last = None
    for g in grid:
        while k < len(extra) and direction * (extra[k] - g) < 0:
            if last is None or direction * (extra[k] - last) > 0:
                yield extra[k]
                last = extra[k]
            k += 1
        if k < len(extra) and extra[k] == g:
            k += 1
        if last is not None and direction * (g - last) <= 0:
            continue
        if last is not None and abs(g - last) <= rel * max(abs(g), 1.0):
            continue  # the extra time just yielded stands for this grid point
        if k < len(extra) and abs(extra[k] - g) <= rel * max(abs(g), 1.0):
            continue  # the next extra time will stand for it
        yield g
        last = g


class StepBounds:
    """What every adaptive controller does alike, on a float clock or per sample: bound a
    step by ``min_step``/``max_step``, choose the first one (``first``, or Hairer's
    estimate for the order ``start_order``), and end an attempt on the next stop when it
    lies within ``STRETCH`` of a step beyond it. Needs ``norm``, ``min_step``,
    ``max_step``, ``first``, ``start_order``."""

    STRETCH = 0.1

    def clamp(self, h, direction):
        a = abs(h)
        if isinstance(a, float):  # the float clock's hot path: no call
            lo, hi = self.min_step, self.max_step
            return direction * (lo if a < lo else (hi if a > hi else a))
        return direction * a.clamp(min=self.min_step, max=self.max_step)

    def at_min_step(self, h):
        """Steps at ``min_step`` are accepted, also when rounding (h = t1 - t) or a stretch
        onto a stop made them longer: their retry would be the same step (endless loop)."""
        return abs(h) <= self.min_step * (1.0 + self.STRETCH + 1e-9)

    def first_step(self, rhs_call, t0, y0, f0, direction):
        """The first step (``rhs_call(t, y)``: f at a time of the clock)."""
        self.absy = y0.detach().abs()
        if self.first is not None:
            return self.clamp(self.first if not isinstance(t0, torch.Tensor)
                              else torch.full_like(t0, self.first), direction)
        with torch.no_grad():
            h = initial_step(rhs_call, t0, y0.detach(), f0.detach(), direction,
                             self.start_order, self.norm)
        if not isinstance(h, torch.Tensor):
            if not math.isfinite(h):
                raise StepSizeError(start_scale_message())
            return self.clamp(h, direction)
        return torch.where(torch.isfinite(h), self.clamp(h, direction), h)

    def propose(self, t, h, stop, direction):
        """Where the attempt ends: t + h, or the next stop when it lies within ``STRETCH``
        of a step beyond t + h. Stretching by up to 10% rather than leaving a sliver saves a
        whole step (a neural ODE solve is often 3-4 steps); the controller's safety factor
        (0.9^-5 ~ 1.7 for dopri5) leaves room for the 10% longer step's larger error."""
        t_try = t + h
        if type(t_try) is float:
            return stop if direction * (stop - t_try) <= self.STRETCH * abs(h) else t_try
        return torch.where(direction * (stop - t_try) <= self.STRETCH * abs(h), stop, t_try)

    def shrink(self, h, factor: float, direction):
        """The next attempt after a failed one (an implicit method's Newton solve did not
        converge): h * factor, or nan (the loop reports it) at min_step."""
        return where(self.at_min_step(h), math.nan, self.clamp(h * factor, direction))


class PIDController:
    """Adaptive step-size control; see the module docstring.

    Args (None: taken from ``odeint``'s arguments and options, then the defaults shown):
        rtol, atol: tolerances (floats, or tensors broadcastable to the state);
        pcoeff, icoeff, dcoeff: PID coefficients (0, 1, 0: the I controller; e.g. 0.4,
            0.3, 0 for a PI controller);
        safety (0.9, in (0, 1]), ifactor (10, >= 1), dfactor (0.2, in (0, 1)): the factor
            of the next step is safety * ratio**(-...), limited to [dfactor, ifactor];
        first_step: initial step (default: Hairer's two-evaluation estimate);
        min_step (0), max_step (inf): bounds of |h|; a step at min_step is accepted.
    """

    adaptive = True
    FIELDS = ("rtol", "atol", "pcoeff", "icoeff", "dcoeff", "safety", "ifactor", "dfactor",
              "first_step", "min_step", "max_step")
    DEFAULTS: ClassVar[dict] = {"pcoeff": 0.0, "icoeff": 1.0, "dcoeff": 0.0, "safety": 0.9,
                                "ifactor": 10.0, "dfactor": 0.2, "first_step": None,
                                "min_step": 0.0, "max_step": math.inf}

    def __init__(self, rtol=None, atol=None, *, pcoeff=None, icoeff=None, dcoeff=None,
                 safety=None, ifactor=None, dfactor=None, first_step=None, min_step=None,
                 max_step=None):
        self.rtol, self.atol = rtol, atol
        self.pcoeff, self.icoeff, self.dcoeff = pcoeff, icoeff, dcoeff
        self.safety, self.ifactor, self.dfactor = safety, ifactor, dfactor
        self.first_step, self.min_step, self.max_step = first_step, min_step, max_step
        self._validate({k: getattr(self, k) for k in self.FIELDS[2:]
                        if getattr(self, k) is not None})

    def __repr__(self) -> str:
        set_ = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.FIELDS
                         if getattr(self, k) is not None)
        return f"{type(self).__name__}({set_})"

    @classmethod
    def _validate(cls, s: dict, method: str = "") -> dict:
        w = f" of {method!r}" if method else ""
        out = {}
        finite = math.isfinite
        for k in ("pcoeff", "icoeff", "dcoeff"):
            if k in s:
                out[k] = option_number(w, k, s[k], finite, "a finite number")
        checks = {
            "safety": (lambda v: 0 < v <= 1, "a positive finite number at most 1"),
            "ifactor": (lambda v: v >= 1, "a number >= 1 (need ifactor >= 1)"),
            "dfactor": (lambda v: 0 < v < 1,
                        "a number in (0, 1) (need 0 < dfactor < 1: a rejected step must shrink)"),
            "first_step": (lambda v: 0 < v < math.inf, "a positive finite number"),
            "min_step": (lambda v: 0 <= v < math.inf, "a non-negative finite number"),
            "max_step": (lambda v: v > 0, "a positive number (inf for no bound)"),
        }
        for k, (ok, need) in checks.items():
            if s.get(k) is not None:
                out[k] = option_number(w, k, s[k], ok, need)
        if out.get("min_step", 0.0) > out.get("max_step", math.inf):
            raise ODEInputError(f"min_step={out['min_step']} exceeds max_step={out['max_step']}")
        return out

    def settings(self, options: dict, method: str = "") -> dict:
        """This controller's settings, filled from ``options`` and the defaults."""
        s = dict(self.DEFAULTS)
        s.update({k: v for k, v in options.items() if k in self.DEFAULTS})
        s.update({k: getattr(self, k) for k in self.FIELDS[2:] if getattr(self, k) is not None})
        s.update(self._validate(s, method))
        if s["pcoeff"] + s["icoeff"] + s["dcoeff"] <= 0:
            raise ODEInputError(f"pcoeff + icoeff + dcoeff must be positive (the step must "
                                f"shrink when the error grows), got {s['pcoeff']}, "
                                f"{s['icoeff']}, {s['dcoeff']}")
        return s

    def bind(self, norm: ErrorNorm, error_order: int, options: dict,
             settings: dict | None = None) -> PIDRun:
        """The per-solve state (``settings``: the result of ``settings(options)`` when the
        caller already has it)."""
        return self.RUN(norm, error_order, settings or self.settings(options))


class PIDRun(StepBounds):
    """The per-solve state of a PIDController, on a float clock (one problem: floats) or
    per sample ((B,) tensors; ``judge``'s ``live`` marks the rows that ran)."""

    adaptive = True

    def __init__(self, norm: ErrorNorm, error_order: int, s: dict):
        k = error_order + 1.0
        self.norm = norm
        self.safety, self.ifactor, self.dfactor = s["safety"], s["ifactor"], s["dfactor"]
        self.min_step, self.max_step, self.first = s["min_step"], s["max_step"], s["first_step"]
        self.b1 = (s["pcoeff"] + s["icoeff"] + s["dcoeff"]) / k
        self.b2 = -(s["pcoeff"] + 2 * s["dcoeff"]) / k
        self.b3 = s["dcoeff"] / k
        self.error_order = self.start_order = error_order
        self.accept_floor = 1.0  # an accepted step does not shrink the next one
        self.has_history = bool(self.b2 or self.b3)  # does ``remember`` keep anything?
        self.absy = None
        self.init_history(1.0)  # ``nonfinite``: was the last attempt rejected for nan/inf?

    def first_step(self, rhs_call, t0, y0, f0, direction):
        h = super().first_step(rhs_call, t0, y0, f0, direction)
        self.init_history(h)
        return h

    def init_history(self, h) -> None:
        """Start the history; per sample (h a (B,) tensor) one value per row."""
        for name, v in self.history().items():
            setattr(self, name, v if not isinstance(h, torch.Tensor) else
                    torch.full(h.shape, v, device=h.device,
                               dtype=torch.bool if isinstance(v, bool) else torch.float64))

    def history(self) -> dict:
        """The per-solve history and its initial values (per sample: one per row)."""
        return {"prev1": 1.0, "prev2": 1.0, "nonfinite": False}

    def take(self, idx) -> None:
        """Keep the rows ``idx`` (a per-sample batch shrinks)."""
        for name, v in vars(self).items():
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and name not in ("norm",):
                setattr(self, name, v[idx])

    def growth(self, ratio, h):
        """The step factor asked for by an attempt of error ratio ``ratio`` (> 0): the PID
        formula, safety * ratio^-b1 * prev1^-b2 * prev2^-b3 (Söderlind; diffrax's
        coefficients)."""
        f = self.safety * ratio ** (-self.b1)
        if self.b2:
            f = f * self.prev1 ** (-self.b2)
        if self.b3:
            f = f * self.prev2 ** (-self.b3)
        return f

    def remember(self, accept, ratio, h, live=None) -> None:
        """History after an attempt (PID: the last two accepted error ratios); per sample
        the rows ``live`` ran (the others, never accepted, keep their history)."""
        self.prev2 = where(accept, self.prev1, self.prev2)
        self.prev1 = where(accept, maximum(ratio, 1e-10), self.prev1)

    def rejected_factor(self, ratio):
        """After a rejection the step always shrinks (the PID history terms could otherwise
        ask for a step as large as the rejected one)."""
        return clip(self.safety * ratio ** (-self.b1), self.dfactor, 0.999)

    def nonfinite_step(self, h, direction):
        """After a nan/inf error: smaller steps may avoid a non-finite derivative inside the
        step (e.g. sqrt of a negative overshoot): shrink by dfactor; nan (reported by the
        driver) at min_step."""
        return where(self.at_min_step(h), math.nan, self.clamp(h * self.dfactor, direction))

    def judge(self, y1: torch.Tensor, err: torch.Tensor, h, direction, live=None):
        """(accept, next step) from the error estimate of an attempt of size h. One problem:
        floats, and only the branch taken is computed; per sample: (B,) tensors, ``live``
        the rows that ran (the others are not accepted)."""
        norm = self.norm
        absy1 = (y1.detach() if y1.requires_grad else y1).abs()
        ratio = norm(err, norm.scale(torch.maximum(self.absy, absy1)), h)
        finite = math.isfinite(ratio) if type(ratio) is float else torch.isfinite(ratio)
        if norm.user_norm is not None and not every(finite) and \
                bool(torch.isfinite(err).all()) and bool(torch.isfinite(y1).all()):
            raise ODEFuncError(f"the error norm (options['norm']) returned {ratio} for a "
                               f"finite error estimate; it must return a finite "
                               f"non-negative number")
        # ratio == 0 asks for the largest growth: the factors are evaluated at ratio > 0
        # (their limit is clipped to ifactor either way)
        if isinstance(ratio, float):
            self.nonfinite = not finite
            if not finite:
                return False, self.nonfinite_step(h, direction)
            accept = ratio <= 1.0 or self.at_min_step(h)
            r = ratio if ratio > 1e-300 else 1e-300
            if accept:
                f = clip(self.growth(r, h), self.accept_floor, self.ifactor)
                self.absy = absy1
            else:
                f = self.rejected_factor(r)
            if self.has_history:
                self.remember(accept, ratio, h)
            return accept, self.clamp(h * f, direction)
        r = ratio.clamp(min=1e-300)
        accept = finite & ((ratio <= 1.0) | self.at_min_step(h))
        if live is not None:
            accept = accept & live
        f = torch.where(accept, clip(self.growth(r, h), self.accept_floor, self.ifactor),
                        self.rejected_factor(r))
        h_next = torch.where(finite, self.clamp(h * f, direction),
                             self.nonfinite_step(h, direction))
        self.nonfinite = ~finite if live is None else torch.where(live, ~finite,
                                                                   self.nonfinite)
        self.remember(accept, ratio, h, live)
        self.absy = torch.where(accept[:, None], absy1, self.absy)
        return accept, h_next


PIDController.RUN = PIDRun
