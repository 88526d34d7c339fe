"""Methods: what a method name means (a stepper, its kind, its options).

Each method class says which options it takes (with defaults), builds its stepper and its
step-size controller from them. The drivers run them all; ``registry.SOLVERS`` maps the
names to the classes of this module and of the implicit, multistep and scipy modules.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar

import torch

from neuralode.errors import ODEInputError
from neuralode.solvers.adams import MAX_ADAMS_ORDER, AdamsStepper
from neuralode.solvers.controllers import (
    ErrorNorm,
    FixedGridController,
    PIDController,
    grid_step_count,
    merge_times,
    option_number,
)
from neuralode.solvers.rk import RKStepper
from neuralode.solvers.stiffness import MAX_STIFF_STEPS, StiffnessCheck
from neuralode.solvers.tableau import TABLEAUX, ButcherTableau

# options every method takes
COMMON_OPTIONS: dict[str, Any] = {"max_num_steps": 2**31 - 1, "event_interior_points": 0}


def _positive_int(method: str, name: str, value, high: int | None = None) -> int:
    if (not isinstance(value, int) or isinstance(value, bool) or value < 1
            or (high is not None and value > high)):
        what = f"an int in 1..{high}" if high is not None else "a positive int"
        raise ODEInputError(f"option {name!r} of {method!r} must be {what}, got {value!r}")
    return value


def times_inside(method, name, value, t0, t1, direction) -> list[float]:
    """step_t / jump_t: the distinct times strictly inside (t0, t1), in the direction of
    travel (t1 may be infinite in event mode)."""
    if value is None:
        return []
    try:
        vals = torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()
    except (TypeError, ValueError, RuntimeError):
        raise ODEInputError(f"option {name!r} of {method!r} must be a 1-D tensor or sequence of "
                            f"times, got {value!r}") from None
    if any(not math.isfinite(v) for v in vals):
        raise ODEInputError(f"option {name!r} of {method!r} contains non-finite times: {vals}")
    return sorted({v for v in vals if direction * (v - t0) > 0 and direction * (t1 - v) > 0},
                  key=lambda v: direction * v)


class UniformGrid:
    """The grid t0, t0 + h, ..., t0 + (n - 1) h, t1 computed on demand, so that memory does
    not grow with the number of steps; ``n = None``: endless (event search)."""

    def __init__(self, t0: float, t1: float, h: float, n: int | None):
        self.t0, self.t1, self.h, self.n = t0, t1, h, n

    def __len__(self) -> int:
        return 2**62 if self.n is None else self.n + 1

    def __iter__(self):
        k = 0
        while self.n is None or k < self.n:
            yield self.t0 + self.h * k
            k += 1
        yield self.t1

    def __getitem__(self, k: int) -> float:
        if self.n is not None:
            if k < 0:
                k += self.n + 1
            if not 0 <= k <= self.n:
                raise IndexError(k)
            if k == self.n:
                return self.t1
        return self.t0 + self.h * k


class Method:
    """Base of the registry's entries."""

    name = ""
    adaptive = False
    # runs per sample on the tensor clock (``batched.integrate_batched``); the other
    # methods run per sample on the float clock, sample by sample
    tensor_clock = False
    OPTIONS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def describe(cls) -> str:
        return cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.name

    @classmethod
    def check(cls, o: dict) -> None:
        """Validate the options ``o`` (defaults filled in); may add derived entries."""

    @classmethod
    def builds_jacobians(cls) -> bool:
        """The implicit methods (those with a ``jacobian`` option; scipy's included)."""
        return "jacobian" in cls.OPTIONS

    @classmethod
    def batches(cls, o: dict) -> bool:
        """Whether a per-sample solve with the options ``o`` runs on the tensor clock: the
        methods marked ``tensor_clock``, the implicit ones with autograd Jacobians (each row
        its own block; matrix-free GMRES, "block" and a user's callable are per problem and
        run sample by sample)."""
        return cls.tensor_clock and o.get("jacobian", "autograd") == "autograd"

    @classmethod
    def make_stepper(cls, o: dict, norm: ErrorNorm):
        raise NotImplementedError(f"{cls.__name__} defines no stepper")

    @classmethod
    def stiffness_check(cls, o: dict) -> StiffnessCheck | None:
        """The float clock's stiffness test of a solve, or None (see ``AdaptiveRK``)."""
        return None

    @classmethod
    def grid(cls, o: dict, ts: list[float], func, y0_user, open_end: bool):
        raise NotImplementedError(f"{cls.__name__} is not a fixed-grid method")


class FixedGridMethod(Method):
    """Base of fixed-grid methods: the grid from ``step_size`` or ``grid_constructor``."""

    OPTIONS: ClassVar[dict[str, Any]] = dict(COMMON_OPTIONS, step_size=None,
                                             grid_constructor=None, perturb=False,
                                             interp="cubic")

    @classmethod
    def check(cls, o: dict) -> None:
        if o["step_size"] is not None and o["grid_constructor"] is not None:
            raise ODEInputError(f"{cls.name}: give at most one of the options 'step_size' and "
                                f"'grid_constructor'")
        if o["step_size"] is not None:
            _number_option(cls.name, "step_size", o["step_size"])
        if o["interp"] not in ("cubic", "linear"):
            raise ODEInputError(f"option 'interp' of {cls.name!r} must be 'cubic' (Hermite, the "
                                f"default) or 'linear', got {o['interp']!r}")
        if o["grid_constructor"] is not None and not callable(o["grid_constructor"]):
            raise ODEInputError(f"option 'grid_constructor' of {cls.name!r} must be a callable "
                                f"(func, y0, t) -> grid, got {o['grid_constructor']!r}")

    @classmethod
    def grid(cls, o: dict, ts: list[float], func, y0_user, open_end: bool):
        """The grid from ts[0] to ts[-1] (every output time of ``ts`` lies on or between
        its points)."""
        t0, t1 = ts[0], ts[-1]
        name = cls.name
        if open_end:
            if o["step_size"] is None:
                raise ODEInputError(f"{name}: an event search with a fixed-grid method needs "
                                    f"options={{'step_size': ...}} (the grid cannot follow "
                                    f"output times that are not given)")
            return UniformGrid(t0, math.inf, math.copysign(float(o["step_size"]), t1 - t0), None)
        if o["grid_constructor"] is not None:
            tt = torch.tensor(ts, dtype=torch.float64)
            grid = o["grid_constructor"](func, y0_user, tt)
            try:
                grid = torch.as_tensor(grid).detach().to(torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise ODEInputError(f"{name}: grid_constructor must return a 1-D tensor of "
                                    f"times, got {type(grid).__name__}") from None
            if grid.dim() != 1:
                raise ODEInputError(f"{name}: grid_constructor must return a 1-D tensor of "
                                    f"times, got shape {tuple(grid.shape)}")
            grid = grid.tolist()
            return check_grid(name, grid, t0, t1)
        if o["step_size"] is None:
            return list(ts)
        span = t1 - t0
        h = float(o["step_size"])
        if abs(span) / h > 2**52:
            raise ODEInputError(f"{name}: step_size={h:g} makes more than 2**52 steps over "
                                f"[{t0}, {t1}]; use a larger step_size")
        return UniformGrid(t0, t1, math.copysign(h, span), grid_step_count(span, h))


def check_grid(name: str, grid: list[float], t0: float, t1: float) -> list[float]:
    if not all(math.isfinite(v) for v in grid):
        raise ODEInputError(f"{name}: the grid from grid_constructor contains non-finite times: "
                            f"{[v for v in grid if not math.isfinite(v)]}")
    direction = 1.0 if t1 > t0 else -1.0
    if len(grid) < 2 or grid[0] != t0 or grid[-1] != t1:
        raise ODEInputError(
            f"{name}: grid_constructor must return a grid starting at t[0]={t0} and ending at "
            f"t[-1]={t1}, got one from {grid[0] if grid else None} to "
            f"{grid[-1] if grid else None} with {len(grid)} points")
    if any(direction * (b - a) <= 0 for a, b in itertools.pairwise(grid)):
        raise ODEInputError(f"{name}: the grid from grid_constructor must be strictly "
                            f"monotonic in the direction of t")
    return grid


def _number_option(method, name, value) -> float:
    return option_number(f" of {method!r}", name, value, lambda v: 0 < v < math.inf,
                         "a positive finite number")


class FixedGridRK(FixedGridMethod):
    tableau: ButcherTableau
    tensor_clock = True

    @classmethod
    def describe(cls) -> str:
        t = cls.tableau
        return f"fixed grid, order {t.order}, {t.stages} stages"

    @classmethod
    def make_stepper(cls, o: dict, norm: ErrorNorm):
        return RKStepper(cls.tableau, linear=o["interp"] == "linear")


# implicit one-step methods: outputs are step ends by default (see ``STEP_TO_OUTPUTS_DOC``)
STIFF_OUTPUT_OPTIONS: dict[str, Any] = {"step_to_outputs": True}
STEP_TO_OUTPUTS_DOC = (
    "On a stiff problem the steps grow long and an interpolant inside such a step amplifies "
    "the step's error by the stiffness (measured on Robertson at rtol 1e-6: kvaerno5's Hermite "
    "output 98x the tolerance between steps, within 1.4x with outputs at step ends, for 12% "
    "more evaluations), so ``step_to_outputs`` (default True) makes every output time a step "
    "end; False interpolates.")


def check_step_to_outputs(method: str, o: dict) -> None:
    if not isinstance(o.get("step_to_outputs", False), bool):
        raise ODEInputError(f"option 'step_to_outputs' of {method!r} must be True (outputs at "
                            f"step ends, the default) or False (outputs interpolated), got "
                            f"{o['step_to_outputs']!r}")


def check_dtype_and_norm(method: str, o: dict) -> None:
    """The adaptive methods' ``dtype`` (of time) and ``norm`` options."""
    if o["dtype"] not in (torch.float64, None):
        raise ODEInputError(f"option 'dtype' of {method!r} (the dtype of time) must be "
                            f"torch.float64: neuralode always keeps time in float64, got "
                            f"{o['dtype']!r}")
    if o["norm"] is not None and not callable(o["norm"]):
        raise ODEInputError(f"option 'norm' of {method!r} must be a callable taking the "
                            f"scaled error (a tensor, or a tuple of tensors for a tuple "
                            f"state) and returning a scalar; got {o['norm']!r}")


class AdaptiveRK(Method):
    """Embedded Runge–Kutta pair with error control and dense output. ``max_stiff_steps``
    (explicit pairs; None: off): see ``neuralode.solvers.stiffness``."""

    adaptive = True
    tensor_clock = True
    tableau: ButcherTableau
    OPTIONS: ClassVar[dict[str, Any]] = dict(
        COMMON_OPTIONS, first_step=None, safety=0.9, ifactor=10.0, dfactor=0.2, min_step=0.0,
        max_step=math.inf, step_t=None, jump_t=None, norm=None, pcoeff=0.0, icoeff=1.0,
        dcoeff=0.0, dtype=torch.float64, step_size_controller=None,
        max_stiff_steps=MAX_STIFF_STEPS)

    @classmethod
    def describe(cls) -> str:
        t = cls.tableau
        return (f"adaptive, order {t.order}({t.error_order}), {t.stages} stages"
                f"{', FSAL' if t.fsal else ''}, dense output: {t.dense_name}")

    @classmethod
    def check(cls, o: dict) -> None:
        check_dtype_and_norm(cls.name, o)
        check_step_to_outputs(cls.name, o)
        ctrl = o["step_size_controller"]
        if ctrl is not None and not isinstance(ctrl, PIDController):
            raise ODEInputError(f"option 'step_size_controller' of {cls.name!r} must be a "
                                f"neuralode.PIDController or neuralode.GustafssonController, "
                                f"got {type(ctrl).__name__}")
        # validates safety, ifactor, ... once; ``make_controller`` reuses the result
        o["_pid_settings"] = controller_or_default(o, cls).settings(o, cls.name)
        v = o.get("max_stiff_steps")
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ODEInputError(f"option 'max_stiff_steps' of {cls.name!r} must be a positive "
                                f"int (a stiff solve stops when more steps than this remain) "
                                f"or None (no stiffness test), got {v!r}")

    @classmethod
    def stiffness_check(cls, o: dict) -> StiffnessCheck | None:
        """The float clock's stiffness test of a solve (explicit pairs), or None."""
        limit = o.get("max_stiff_steps")
        check = None if limit is None else StiffnessCheck(cls.tableau, limit)
        return check if check is not None and check.active else None

    @classmethod
    def make_stepper(cls, o: dict, norm: ErrorNorm):
        return RKStepper(cls.tableau)


# the adaptive implicit methods' options: the explicit pairs' but the stiffness test
IMPLICIT_ADAPTIVE_OPTIONS = {k: v for k, v in AdaptiveRK.OPTIONS.items()
                             if k != "max_stiff_steps"}

_DEFAULT_CONTROLLER = PIDController()
_PID_DEFAULTS = {"pcoeff": 0.0, "icoeff": 1.0, "dcoeff": 0.0}


def controller_or_default(o: dict, method: type[Method]) -> PIDController:
    """The options' ``step_size_controller``, else the method's ``default_controller``
    (a PID controller, unless the method names another), else PID when the options set PID
    coefficients."""
    chosen = o.get("step_size_controller")
    if chosen is not None:
        return chosen
    default = getattr(method, "default_controller", None)
    if default is None or any(o.get(k, v) != v for k, v in _PID_DEFAULTS.items()):
        return _DEFAULT_CONTROLLER
    return default


class ExplicitAdams(FixedGridMethod):
    """Adams–Bashforth, variable-step coefficients, order up to ``max_order`` (default 4,
    at most 12), RK4 start, fixed grid."""

    name = "explicit_adams"
    order = 4
    DEFAULT_ORDER = 4
    OPTIONS: ClassVar[dict[str, Any]] = dict(FixedGridMethod.OPTIONS, max_order=DEFAULT_ORDER)

    @classmethod
    def check(cls, o: dict) -> None:
        super().check(o)
        _positive_int(cls.name, "max_order", o["max_order"], MAX_ADAMS_ORDER)

    @classmethod
    def make_stepper(cls, o: dict, norm: ErrorNorm):
        return AdamsStepper(False, o["max_order"], linear=o["interp"] == "linear")


class ImplicitAdams(ExplicitAdams):
    """Adams–Bashforth–Moulton predictor–corrector, order up to ``max_order`` (default 12),
    RK4 start, fixed grid."""

    name = "implicit_adams"
    order = 12
    DEFAULT_ORDER = 12
    OPTIONS: ClassVar[dict[str, Any]] = dict(FixedGridMethod.OPTIONS, max_order=DEFAULT_ORDER,
                                             max_iters=4)

    @classmethod
    def check(cls, o: dict) -> None:
        super().check(o)
        _positive_int(cls.name, "max_iters", o["max_iters"])

    @classmethod
    def make_stepper(cls, o: dict, norm: ErrorNorm):
        return AdamsStepper(True, o["max_order"], o["max_iters"], norm.convergence,
                            linear=o["interp"] == "linear")


_DOCS = {
    "euler": "Euler's method (order 1), fixed grid",
    "midpoint": "explicit midpoint (order 2), fixed grid",
    "heun2": "Heun's method / explicit trapezoid (order 2), fixed grid",
    "heun3": "Heun's third-order method, fixed grid",
    "rk4": "Runge–Kutta 4 with the 3/8 rule (as torchdiffeq's rk4), fixed grid",
    "rk4_classic": "classic Runge–Kutta 4, fixed grid",
    "adaptive_heun": "Heun–Euler 2(1), adaptive",
    "fehlberg2": "Runge–Kutta–Fehlberg 2(1), adaptive",
    "bosh3": "Bogacki–Shampine 3(2), adaptive",
    "dopri5": "Dormand–Prince 5(4), adaptive (default)",
    "tsit5": "Tsitouras 5(4), adaptive",
    "dopri8": "Dormand–Prince 8(7), adaptive",
}


def make_rk_method(tab: ButcherTableau, doc: str) -> type[Method]:
    base = AdaptiveRK if tab.adaptive else FixedGridRK
    return type(tab.name.title().replace("_", ""), (base,),
                {"name": tab.name, "tableau": tab, "__doc__": doc, "order": tab.order})


# this module's methods; ``registry.SOLVERS`` holds every method of every module
METHODS: dict[str, type[Method]] = {name: make_rk_method(tab, _DOCS[name])
                                    for name, tab in TABLEAUX.items()}
METHODS["explicit_adams"] = ExplicitAdams
METHODS["implicit_adams"] = ImplicitAdams


def make_controller(method: type[Method], o: dict, norm: ErrorNorm, ts, func, y0_user,
                    open_end: bool, grid=None, stop_times=()):
    """The step-size controller of a solve. Fixed grids: ``grid`` (else the method's grid
    from its options), with ``stop_times`` merged in so that every stop is a grid point."""
    if method.adaptive:
        if hasattr(method, "make_controller"):  # methods with their own controller (bdf)
            return method.make_controller(o, norm)
        return controller_or_default(o, method).bind(norm, method.tableau.error_order, o,
                                             o.get("_pid_settings"))
    if grid is None:
        grid = method.grid(o, ts, func, y0_user, open_end)
    if stop_times:
        grid = merge_times(grid, stop_times, 1.0 if ts[-1] > ts[0] else -1.0)
    return FixedGridController(grid)
