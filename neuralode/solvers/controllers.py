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

import math
from collections.abc import Callable
from typing import ClassVar

import torch

from neuralode.errors import ODEFuncError, ODEInputError, StepSizeError


class ErrorNorm:
    """Turns an error estimate into the scalar ratio that the controller compares with 1.

    ``norm`` is None (RMS over the whole state, or for tuple states the max over elements
    of each element's RMS) or a user callable that receives the scaled error in the user's
    structure (a tensor, or a tuple of tensors) and returns a number or a 0-d tensor.
    ``rtol``/``atol`` are floats or flat (n,) tensors (per-element tolerances).
    """

    def __init__(self, layout, rtol, atol, norm: Callable | None):
        self.layout = layout
        self.rtol = rtol
        self.atol = atol
        self.user_norm = norm
        self.scalar_tol = not isinstance(rtol, torch.Tensor) and not isinstance(atol, torch.Tensor)
        self.inv_sqrt_n = 1.0 / math.sqrt(max(layout.n, 1))
        self.mixed = layout.is_tuple and len(layout.shapes) > 1

    def scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """atol + rtol * absmax, elementwise."""
        if self.scalar_tol:
            return absmax.mul(self.rtol).add_(self.atol)
        return torch.addcmul(self.atol, self.rtol, absmax) if isinstance(self.atol, torch.Tensor) \
            else (absmax * self.rtol).add_(self.atol)

    def __call__(self, err: torch.Tensor, scale: torch.Tensor, factor: float = 1.0) -> float:
        """The norm of ``factor * err / scale`` as a Python float."""
        ratio = err / scale
        if self.user_norm is not None:
            if factor != 1.0:
                ratio = ratio * factor
            return float(self.user_norm(self.layout.unflatten(ratio)))
        if not self.mixed:
            return torch.linalg.vector_norm(ratio).item() * self.inv_sqrt_n * abs(factor)
        # mixed norm: max over tuple elements of the RMS of each element
        vals = [torch.linalg.vector_norm(ratio[a:b]) / math.sqrt(b - a)
                for a, b in zip(self.layout.offsets[:-1], self.layout.offsets[1:]) if b > a]
        return torch.stack(vals).max().item() * abs(factor)

    def convergence(self, y_new: torch.Tensor, y_old: torch.Tensor) -> float:
        """Norm of the change y_new - y_old scaled by the tolerances (corrector iterations)."""
        return self(y_new - y_old, self.scale(torch.maximum(y_new.abs(), y_old.abs())))


def initial_step(rhs, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: float,
                 order: int, norm: ErrorNorm) -> float:
    """Hairer's starting step size (Solving ODEs I, II.4, p. 169); returns a signed step, or
    nan when the error norm is not finite at the start. Uses one extra evaluation of f."""
    scale = norm.scale(y0.abs())
    d0 = norm(y0, scale)
    d1 = norm(f0, scale)
    if not (math.isfinite(d0) and math.isfinite(d1)):
        if norm.user_norm is not None and bool(torch.isfinite(scale).all()) \
                and bool((scale > 0).all()):
            raise ODEFuncError(f"the error norm (options['norm']) returned {d0} / {d1} for a "
                               f"finite state; it must return a finite non-negative number")
        return math.nan
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    y1 = y0 + (direction * h0) * f0
    f1 = rhs.call(t0 + direction * h0, y1)
    d2 = norm(f1 - f0, scale) / h0
    if not math.isfinite(d2):
        return direction * h0 * 1e-3  # a derivative that blows up nearby: start tiny
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return direction * min(100 * h0, h1)


def _number(where: str, name: str, value, ok: Callable[[float], bool], need: str) -> float:
    """A float option that satisfies ``ok``, or a clear error saying what is needed."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ODEInputError(f"option {name!r}{where} must be a number, got {value!r}") from None
    if math.isnan(v) or not ok(v):
        raise ODEInputError(f"option {name!r}{where} must be {need}, got {value!r}")
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
    DEFAULTS: ClassVar[dict] = {"pcoeff": 0.0, "icoeff": 1.0, "dcoeff": 0.0, "safety": 0.9, "ifactor": 10.0,
                "dfactor": 0.2, "first_step": None, "min_step": 0.0, "max_step": math.inf}

    def __init__(self, rtol=None, atol=None, *, pcoeff=None, icoeff=None, dcoeff=None,
                 safety=None, ifactor=None, dfactor=None, first_step=None, min_step=None,
                 max_step=None):
        self.rtol, self.atol = rtol, atol
        self.pcoeff, self.icoeff, self.dcoeff = pcoeff, icoeff, dcoeff
        self.safety, self.ifactor, self.dfactor = safety, ifactor, dfactor
        self.first_step, self.min_step, self.max_step = first_step, min_step, max_step
        self._validate({k: getattr(self, k) for k in self.FIELDS[2:] if getattr(self, k) is not None})

    def __repr__(self) -> str:
        set_ = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.FIELDS
                         if getattr(self, k) is not None)
        return f"PIDController({set_})"

    @classmethod
    def _validate(cls, s: dict, method: str = "") -> dict:
        w = f" of {method!r}" if method else ""
        out = {}
        finite = math.isfinite
        for k in ("pcoeff", "icoeff", "dcoeff"):
            if k in s:
                out[k] = _number(w, k, s[k], finite, "a finite number")
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
                out[k] = _number(w, k, s[k], ok, need)
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
             settings: dict | None = None) -> _PIDRun:
        """The per-solve state (``settings``: the result of ``settings(options)`` when the
        caller already has it)."""
        return _PIDRun(norm, error_order, settings or self.settings(options))


class StepBounds:
    """What every adaptive controller does alike: bound a step by ``min_step``/``max_step``
    and choose the first one (``first``, or Hairer's estimate for the order
    ``start_order``). Needs ``norm``, ``min_step``, ``max_step``, ``first``, ``start_order``."""

    def clamp(self, h: float, direction: float) -> float:
        return direction * min(max(abs(h), self.min_step), self.max_step)

    def first_step(self, rhs, t0, y0, f0, direction) -> float:
        self.absy = y0.detach().abs()
        if self.first is not None:
            return self.clamp(self.first, direction)
        with torch.no_grad():
            h = initial_step(rhs, t0, y0.detach(), f0.detach(), direction, self.start_order,
                             self.norm)
        if not math.isfinite(h):
            raise StepSizeError(
                "the error norm is not finite at the initial state, so no step size can be "
                "chosen: the tolerance scale atol + rtol * |y0| is zero somewhere (atol=0 with "
                "y0 = 0?) or the state or derivative is not finite; use atol > 0")
        return self.clamp(h, direction)


class _PIDRun(StepBounds):
    """The per-solve state of a PIDController."""

    adaptive = True
    STRETCH = 0.1

    def __init__(self, norm: ErrorNorm, error_order: int, s: dict):
        k = error_order + 1.0
        self.norm = norm
        self.safety, self.ifactor, self.dfactor = s["safety"], s["ifactor"], s["dfactor"]
        self.min_step, self.max_step, self.first = s["min_step"], s["max_step"], s["first_step"]
        self.b1 = (s["pcoeff"] + s["icoeff"] + s["dcoeff"]) / k
        self.b2 = -(s["pcoeff"] + 2 * s["dcoeff"]) / k
        self.b3 = s["dcoeff"] / k
        self.error_order = self.start_order = error_order
        self.prev1 = self.prev2 = 1.0
        self.absy = None
        self.nonfinite = False  # was the last attempt rejected for a nan/inf error?


    def shrink(self, h: float, factor: float, direction: float) -> float:
        """The next attempt after a failed one (an implicit method's Newton solve did not
        converge): h * factor, or nan (the loop reports it) below min_step."""
        if abs(h) <= self.min_step:
            return math.nan
        return self.clamp(h * factor, direction)

    def propose(self, t: float, h: float, stop: float, direction: float) -> float:
        """Where the attempt ends: t + h, or the next stop when it lies within ``STRETCH``
        of a step beyond t + h. Stretching by up to 10% rather than leaving a sliver saves a
        whole step (a neural ODE solve is often 3-4 steps); the controller's safety factor
        (0.9^-5 ~ 1.7 for dopri5) leaves room for the 10% longer step's larger error."""
        if direction * (stop - (t + h)) <= self.STRETCH * abs(h):
            return stop
        return t + h

    def judge(self, y1: torch.Tensor, err: torch.Tensor, h: float,
              direction: float) -> tuple[bool, float]:
        """(accept, next step) from the error estimate of an attempt of size h."""
        norm = self.norm
        absy1 = (y1.detach() if y1.requires_grad else y1).abs()
        ratio = norm(err, norm.scale(torch.maximum(self.absy, absy1)), h)
        if ratio <= 1.0 and self.b2 == 0.0 and self.b3 == 0.0 and ratio > 0.0:
            # the common case, an accepted step of the I controller, without the general path
            f = self.safety * ratio ** (-self.b1)
            f = self.ifactor if f > self.ifactor else (max(f, 1.0))
            self.prev2, self.prev1 = self.prev1, max(ratio, 1e-10)
            self.absy = absy1
            hn = abs(h) * f
            hn = self.max_step if hn > self.max_step else (max(hn, self.min_step))
            self.nonfinite = False
            return True, direction * hn
        if not math.isfinite(ratio):
            if self.norm.user_norm is not None and bool(torch.isfinite(err).all()) \
                    and bool(torch.isfinite(y1).all()):
                raise ODEFuncError(f"the error norm (options['norm']) returned {ratio} for a "
                                   f"finite error estimate; it must return a finite "
                                   f"non-negative number")
            # Smaller steps may avoid a non-finite derivative inside the step (e.g. sqrt of
            # a negative overshoot): reject and shrink; the loop reports it if h vanishes.
            self.nonfinite = True
            if abs(h) <= self.min_step * (1.0 + self.STRETCH + 1e-9):  # as for ``accept``
                return False, math.nan
            return False, self.clamp(h * self.dfactor, direction)
        self.nonfinite = False
        # a step at min_step is accepted, also when rounding (h = t1 - t) or a stretch onto a
        # stop (``propose``) made it longer: its retry would be the same step (endless loop)
        accept = ratio <= 1.0 or abs(h) <= self.min_step * (1.0 + self.STRETCH + 1e-9)
        if ratio == 0.0:
            f = self.ifactor
        else:
            f = self.safety * ratio ** (-self.b1)
            if self.b2:
                f *= self.prev1 ** (-self.b2)
            if self.b3:
                f *= self.prev2 ** (-self.b3)
        if accept:
            f = min(self.ifactor, max(1.0, f))
            self.prev2, self.prev1 = self.prev1, max(ratio, 1e-10)
            self.absy = absy1
        else:
            # after a rejection the step always shrinks (the PID history terms could
            # otherwise ask for a step as large as the rejected one)
            f = min(0.999, max(self.dfactor, self.safety * ratio ** (-self.b1)))
        return accept, self.clamp(h * f, direction)
