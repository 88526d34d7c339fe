"""Pieces shared by every solver: the right-hand-side wrapper, statistics, option checks.

Solvers work on a flat 1-D state tensor ``y`` of ``n`` elements and Python-float (float64)
times. The front door (``neuralode.odeint``) flattens tensors and tuples of tensors into
this form and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from neuralode.errors import ODEFuncError, ODEInputError


@dataclass
class SolverStats:
    """Statistics of one solve.

    nfe: evaluations of the user's function; n_accepted / n_rejected: step attempts
    (fixed-grid methods only accept); status: "success" once the final time is reached.
    """

    method: str = ""
    nfe: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    status: str = "running"
    t_final: float = math.nan
    h_next: float = math.nan  # adaptive methods: the step the controller proposed last
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return self.n_accepted + self.n_rejected

    def __str__(self) -> str:
        return (f"{self.method}: nfe={self.nfe} accepted={self.n_accepted} "
                f"rejected={self.n_rejected} status={self.status}")


class StateLayout:
    """How a user state (tensor or tuple of tensors) maps to the flat solver state."""

    def __init__(self, shapes: list[torch.Size], is_tuple: bool):
        self.shapes = shapes
        self.is_tuple = is_tuple
        self.numels = [math.prod(s) for s in shapes]
        self.n = sum(self.numels)
        offsets = [0]
        for k in self.numels:
            offsets.append(offsets[-1] + k)
        self.offsets = offsets

    def unflatten(self, y: torch.Tensor):
        """(..., n) flat -> the user's structure with leading dims preserved."""
        lead = y.shape[:-1]
        if not self.is_tuple:
            return y.view(*lead, *self.shapes[0]) if y.is_contiguous() else \
                y.reshape(*lead, *self.shapes[0])
        return tuple(
            y[..., a:b].reshape(*lead, *s)
            for a, b, s in zip(self.offsets[:-1], self.offsets[1:], self.shapes)
        )

    def flatten(self, value) -> torch.Tensor:
        if not self.is_tuple:
            return value.reshape(-1)
        return torch.cat([v.reshape(-1) for v in value])


def nudge(t: float, toward: float) -> float:
    """The next float64 after ``t`` in the direction of ``toward`` (for discontinuities)."""
    return math.nextafter(t, toward)


class RHS:
    """The user's ``func(t, y)`` seen on the flat state, with evaluation counting.

    ``t`` is handed to ``func`` as a 0-d tensor of the state's dtype on its device (as
    torchdiffeq does); the first call validates the shape, dtype and device of the result.
    """

    def __init__(self, func: Callable, layout: StateLayout, dtype: torch.dtype,
                 device: torch.device, stats: SolverStats):
        self.func = func
        self.layout = layout
        self.dtype = dtype
        self.device = device
        self.stats = stats
        self._checked = False
        self.call = self._make_call()

    def _make_call(self) -> Callable[[float, torch.Tensor], torch.Tensor]:
        """A closure specialised to the state layout (the solver's hot path)."""
        func, stats, layout = self.func, self.stats, self.layout
        full, dtype, device = torch.full, self.dtype, self.device
        if not layout.is_tuple and tuple(layout.shapes[0]) == (layout.n,):
            def call(t, y):
                stats.nfe += 1
                out = func(full((), t, dtype=dtype, device=device), y)
                if not self._checked:
                    self._check(out, t)
                return out
        elif not layout.is_tuple:
            shape = layout.shapes[0]

            def call(t, y):
                stats.nfe += 1
                out = func(full((), t, dtype=dtype, device=device), y.view(shape))
                if not self._checked:
                    self._check(out, t)
                return out.reshape(-1)
        else:
            def call(t, y):
                stats.nfe += 1
                out = func(full((), t, dtype=dtype, device=device), layout.unflatten(y))
                if not self._checked:
                    self._check(out, t)
                return torch.cat([o.reshape(-1) for o in out])
        return call

    def __call__(self, t: float, y: torch.Tensor) -> torch.Tensor:
        return self.call(t, y)

    def _check(self, out, t: float) -> None:
        layout = self.layout
        what = f"func(t, y) at t={t:g}"
        if layout.is_tuple:
            if not isinstance(out, (tuple, list)) or len(out) != len(layout.shapes):
                raise ODEFuncError(
                    f"{what} must return a tuple of {len(layout.shapes)} tensors matching the "
                    f"tuple state y0, got {type(out).__name__}"
                    + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
            items = list(out)
        else:
            items = [out]
        for k, (o, shape) in enumerate(zip(items, layout.shapes)):
            where = f"{what}" + (f", element {k}," if layout.is_tuple else "")
            if not isinstance(o, torch.Tensor):
                raise ODEFuncError(f"{where} must return a tensor, got {type(o).__name__}")
            if o.shape != shape:
                raise ODEFuncError(
                    f"{where} returned shape {tuple(o.shape)}, but the state has shape "
                    f"{tuple(shape)}; dy/dt must have the same shape as y")
            if o.dtype != self.dtype:
                raise ODEFuncError(
                    f"{where} returned dtype {o.dtype}, but the state has dtype {self.dtype}; "
                    f"dy/dt must have the same dtype as y0")
            if o.device != self.device:
                raise ODEFuncError(
                    f"{where} returned a tensor on {o.device}, but the state is on "
                    f"{self.device}")
        self._checked = True


def check_options(method: str, given: dict, allowed: dict) -> dict:
    """Fill defaults and reject unknown option names with the list of valid ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ODEInputError(
            f"unknown option(s) {unknown} for method {method!r}; valid options are: "
            f"{sorted(allowed)}")
    opts = dict(allowed)
    opts.update(given)
    return opts


def positive_float(method: str, name: str, value, allow_zero=False, allow_inf=False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ODEInputError(f"option {name!r} of {method!r} must be a number, got {value!r}")
    bad = math.isnan(v) or v < 0 or (v == 0 and not allow_zero) or (math.isinf(v) and not allow_inf)
    if bad:
        req = "a non-negative" if allow_zero else "a positive"
        raise ODEInputError(
            f"option {name!r} of {method!r} must be {req}"
            f"{'' if allow_inf else ' finite'} number, got {value!r}")
    return v


class Solver:
    """Base class: a solver integrates the flat state and returns it at every output time."""

    name = ""
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, rhs: RHS, y0: torch.Tensor, rtol, atol, norm, options: dict):
        self.rhs = rhs
        self.y0 = y0
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        self.options = check_options(self.name, options, self.OPTIONS)
        self.stats = rhs.stats
        self.stats.method = self.name

    @classmethod
    def describe(cls) -> str:
        return cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.name

    def integrate(self, ts: list[float]) -> list[torch.Tensor]:
        raise NotImplementedError

    def fail_nonfinite(self, t: float, h: float | None = None) -> None:
        span = f" (in the step from t={t:.10g} with h={h:.3g})" if h is not None else ""
        raise FloatingPointError(
            f"the ODE's derivative or state became non-finite (nan/inf) at t={t:.10g}{span}; "
            f"check func for overflow, division by zero or a blow-up of the solution")
