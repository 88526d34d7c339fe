"""``scipy_solver``: scipy's ``solve_ivp`` solvers (torchdiffeq's method of that name).

``options={"solver": "LSODA" | "Radau" | "BDF" | "RK45" | "RK23" | "DOP853"}`` (default
LSODA, as torchdiffeq), with torchdiffeq's ``min_step`` (LSODA only: scipy's other solvers
have no minimum step), ``max_step`` and ``first_step``; tolerances come from ``rtol``/``atol``.
Extra here: ``jacobian`` (None: scipy's finite differences, as torchdiffeq; "autograd" or a
callable as for the implicit methods) is handed to the solvers that use one (Radau, BDF,
LSODA).

It runs on neuralode's integration loop, one scipy step per loop step (scipy's
``OdeSolver.step``; the loop owns output times from scipy's dense output, stops,
``step_t``/``jump_t``, events, callbacks, ``max_num_steps`` and the statistics), so every
feature of the loop works with it, the adjoint's backward solve included.

Forward only: the solution is computed in NumPy (float64). When a gradient could be asked
for (grad mode on and y0, t or the parameters used by func requiring grad) the outputs are
returned attached to the inputs through an autograd node whose backward raises an error
that says what to use instead; torchdiffeq returns a tensor detached from the inputs,
whose missing gradients show up later as ``None`` or an unrelated error.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np
import torch

from neuralode.errors import ConvergenceError, ODEInputError, StepSizeError
from neuralode.solvers.controllers import option_number
from neuralode.solvers.jacobian import JacobianSource, check_jacobian_option
from neuralode.solvers.methods import COMMON_OPTIONS, Method

SCIPY_SOLVERS = ("LSODA", "Radau", "BDF", "RK45", "RK23", "DOP853")
_USES_JACOBIAN = ("LSODA", "Radau", "BDF")


class ScipyGradientError(RuntimeError):
    pass


class _ForwardOnly(torch.autograd.Function):
    """Returns ``value`` attached to ``anchors``; its backward raises."""

    @staticmethod
    def forward(ctx, value, *anchors):
        return value.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise ScipyGradientError(
            "method='scipy_solver' is forward only: scipy's solvers cannot be differentiated "
            "by autograd. For gradients use odeint_adjoint(..., method='scipy_solver') (the "
            "adjoint's backward solve also runs in scipy), or a differentiable method such as "
            "'rodas5p' (stiff) or 'dopri5'. Wrap inference in torch.no_grad() to avoid "
            "building this graph.")


class _Engine:
    """The scipy solver shared by the stepper and the controller: the controller's
    ``propose`` takes a scipy step (scipy chooses its length), the stepper returns it."""

    def __init__(self, o: dict, norm, name: str):
        self.name = name
        self.solver_name = o["solver"]
        self.o = o
        rtol, atol = norm.rtol, norm.atol
        self.rtol = rtol if isinstance(rtol, float) else rtol.detach().cpu().double().numpy()
        self.atol = atol if isinstance(atol, float) else atol.detach().cpu().double().numpy()
        self.jumps = set()
        self.solver = None
        self.y = None  # the current state (a tensor) at time self.t, or None when unknown
        self.t = math.nan
        self.h_next = math.nan
        self.pieces: list = []  # (t_old, t_new, interpolant) of the last loop step
        self.rhs = None

    # -- scipy's callbacks ------------------------------------------------------------
    def _fun(self, t, y):
        rhs = self.rhs
        yt = torch.as_tensor(y, dtype=rhs.dtype).to(rhs.device)
        with torch.no_grad():
            if self.left_end is not None:
                out = rhs.call_at(self.left_end(float(t)), yt)
            elif self.right_start and float(t) == self.t_start:
                out = rhs.call_at(rhs.toward(self.t_start, self.bound), yt)
            else:
                out = rhs.call(float(t), yt)
        return out.detach().to("cpu", torch.float64).numpy()

    def _jac(self, t, y):
        yt = torch.as_tensor(y, dtype=self.rhs.dtype).to(self.rhs.device)
        J = self.jac_source(float(t), yt)
        if J.dim() == 3:  # diagonal blocks
            J = torch.block_diag(*J.unbind(0))
        return J.detach().to("cpu", torch.float64).numpy()

    # -- solver life cycle ------------------------------------------------------------
    def create(self, t: float, y: torch.Tensor, bound: float, first_step: float | None):
        import scipy.integrate as si

        self.t_start, self.bound = t, bound
        self.right_start, self.from_right = self.from_right, False
        self.left_end = None
        if bound in self.jumps:
            self.left_end = self.rhs.left_limit(bound, t)
        kwargs: dict[str, Any] = {"rtol": self.rtol, "atol": self.atol,
                                  "max_step": self.o["max_step"]}
        if first_step is not None and math.isfinite(first_step):
            kwargs["first_step"] = min(abs(first_step), abs(bound - t))
        if self.solver_name == "LSODA" and self.o["min_step"]:
            kwargs["min_step"] = self.o["min_step"]
        if self.solver_name in _USES_JACOBIAN and self.o["jacobian"] is not None:
            kwargs["jac"] = self._jac
        y_np = y.detach().to("cpu", torch.float64).numpy().copy()
        cls = getattr(si, self.solver_name)
        with warnings.catch_warnings():
            # scipy warns that rtol was raised to 100 eps; the front door already
            # refused tolerances the state's dtype cannot resolve
            warnings.filterwarnings("ignore", message=".*rtol.*too small.*")
            self.solver = cls(self._fun, t, y_np, bound, **kwargs)
        self.t, self.y = t, y

    def scipy_step(self) -> None:
        """One step of the scipy solver; its interpolant is made on demand."""
        s = self.solver
        if self.pieces and self.pieces[-1][2] is None:
            # several scipy steps make one loop step: keep each one's interpolant
            self.pieces[-1][2] = s.dense_output()
        msg = s.step()
        if s.status == "failed":
            text = f"{self.name} ({self.solver_name}) failed at t={s.t:.10g}: {msg}"
            if msg and "step size" in msg.lower():
                raise StepSizeError(text)
            raise ConvergenceError(text)
        self.pieces.append([s.t_old, s.t, None])
        self.t = s.t
        self.y = None
        self.h_next = float(getattr(s, "h_abs", None) or s.step_size or math.nan)

    def interpolants(self) -> list:
        """(t_old, t_new, interpolant) of the scipy steps of the current loop step (the
        last one's interpolant made now: DOP853's costs evaluations of f)."""
        if self.pieces and self.pieces[-1][2] is None:
            self.pieces[-1][2] = self.solver.dense_output()
        return [tuple(p) for p in self.pieces]


def _evaluate(pieces, times) -> np.ndarray:
    out = []
    for tv in times:
        for ta, tb, interp in pieces:
            if min(ta, tb) <= tv <= max(ta, tb):
                out.append(interp(tv))
                break
        else:
            out.append(pieces[-1][2](tv))
    return np.stack(out)


class ScipyController:
    """The loop's controller for scipy_solver: each proposed step is one scipy step."""

    adaptive = True
    nonfinite = False
    absy = None

    def __init__(self, engine: _Engine, first_step):
        self.engine = engine
        self.first = first_step

    def first_step(self, rhs, t0, y0, f0, direction) -> float:
        self.engine.t = t0
        return direction * (self.first if self.first is not None else math.nan)

    def propose(self, t: float, h: float, stop: float, direction: float) -> float:
        eng = self.engine
        eng.pieces = []
        bound = stop if math.isfinite(stop) else direction * 1e300
        if eng.y is not None and eng.t == t:
            # the state at t is known: a solver bounded by the next stop, one scipy step
            if eng.solver is None or eng.solver.t != t or eng.solver.t_bound != bound \
                    or eng.solver.status != "running":
                eng.create(t, eng.y, bound, h if math.isfinite(h) else None)
            eng.scipy_step()
            eng.pending = None
            return eng.t
        # after a jump of the state (the adjoint's output times) the stepper learns the
        # new state only in ``step``: integrate to t + h there (a new solver)
        if not math.isfinite(h):
            h = eng.h_next if math.isfinite(eng.h_next) else abs(stop - t) * 1e-3
        t1 = t + direction * min(abs(h), abs(bound - t))
        eng.pending = t1
        return t1

    def judge(self, y1, err, h, direction):
        return True, direction * self.engine.h_next

    def shrink(self, h, factor, direction):
        return h * factor


class ScipyStepper:
    """Returns the scipy step taken by the controller; outputs inside it come from
    scipy's dense output."""

    fsal = True
    forward_only = True  # gradient="checkpoint" refuses it (no replay through scipy)

    def __init__(self, engine: _Engine):
        self.engine = engine

    CALLBACK_NOTES: ClassVar[dict[str, str]] = {
        "callback_step": "is called once per scipy step, after scipy took it (scipy chooses "
                         "and retries its steps inside its own step function)",
        "callback_accept_step": "is called after each scipy step (scipy retries rejected "
                                "attempts internally, so every step it returns is accepted)",
        "callback_reject_step": "is never called: scipy does not report rejected attempts",
    }

    def start(self, rhs, y0, f0, graph):
        eng = self.engine
        for cb, note in self.CALLBACK_NOTES.items():
            if callable(getattr(rhs.func, cb, None)):
                warnings.warn(f"scipy_solver: func.{cb} {note}", stacklevel=5)
        eng.rhs = rhs
        eng.from_right = False
        self.graph = graph
        # anchors: y0 (carrying y0's and t0's graph) and f0 (a graph through parameters
        # that func captures)
        self.anchors = tuple(v for v in (y0, f0) if v.requires_grad) if graph else ()
        eng.y, eng.t = y0.detach(), math.nan
        eng.solver = None
        eng.pending = None
        if eng.o["jacobian"] is not None:
            eng.jac_source = JacobianSource(eng.o["jacobian"], rhs, y0.numel(), name=eng.name)

    def _tensor(self, values: np.ndarray) -> torch.Tensor:
        rhs = self.engine.rhs
        out = torch.as_tensor(values).to(device=rhs.device, dtype=rhs.dtype)
        if self.anchors:
            return _ForwardOnly.apply(out, *self.anchors)
        return out

    def step(self, t, y, h, left_end=None):
        eng = self.engine
        if eng.pending is not None:
            t1 = eng.pending
            eng.pending = None
            eng.create(t, y.detach(), t1, h)
            while eng.solver.status == "running":
                eng.scipy_step()
            eng.t = t1
        self.t0, self.h = t, h
        y1 = eng.solver.y.copy()
        self.y1 = self._tensor(y1)
        eng.y = self.y1.detach()
        return self.y1

    def error(self):
        return None

    def end_derivative(self, t1_time, y1):
        return None

    def prepare_interp(self, t1_time, y1):
        return None

    def interpolate(self, y, h, thetas):
        eng = self.engine
        times = [self.t0 + th * h for th in thetas]
        vals = _evaluate(eng.interpolants(), times)
        out = self._tensor(vals)
        return list(out.unbind(0))

    def segment(self, y, h):
        return _ScipySegment(self.t0, h, self.engine.interpolants(), self)

    def restart(self):
        # a stop with a jump of f or of the state: the next step starts a new scipy solver
        eng = self.engine
        eng.solver = None
        eng.y = None
        eng.from_right = True

    def advance(self, f_next):
        return None


class _ScipySegment:
    __slots__ = ("h", "pieces", "stepper", "t0")

    def __init__(self, t0, h, pieces, stepper):
        self.t0, self.h, self.pieces, self.stepper = t0, h, pieces, stepper

    def evaluate(self, thetas):
        times = [self.t0 + th * self.h for th in thetas]
        return self.stepper._tensor(_evaluate(self.pieces, times))


class ScipySolver(Method):
    """scipy's solve_ivp solvers (LSODA, Radau, BDF, RK45, RK23, DOP853), forward only."""

    name = "scipy_solver"
    adaptive = True
    order = None
    OPTIONS: ClassVar[dict[str, Any]] = dict(
        COMMON_OPTIONS, solver="LSODA", min_step=0.0, max_step=math.inf, first_step=None,
        step_t=None, jump_t=None, norm=None, jacobian=None)

    class tableau:  # read by methods.make_controller (the error order is unused)
        error_order = 1

    @classmethod
    def describe(cls) -> str:
        return ("scipy's solve_ivp solvers (options['solver']: "
                + ", ".join(SCIPY_SOLVERS) + "), forward only")

    @classmethod
    def check(cls, o: dict) -> None:
        if o["solver"] not in SCIPY_SOLVERS:
            raise ODEInputError(f"option 'solver' of 'scipy_solver' must be one of "
                                f"{list(SCIPY_SOLVERS)}, got {o['solver']!r}")
        w = " of 'scipy_solver'"
        o["min_step"] = option_number(w, "min_step", o["min_step"], lambda v: v >= 0,
                                      "a non-negative number")
        o["max_step"] = option_number(w, "max_step", o["max_step"], lambda v: v > 0,
                                      "a positive number")
        if o["first_step"] is not None:
            option_number(w, "first_step", o["first_step"], lambda v: 0 < v < math.inf,
                          "a positive finite number")
        if o["min_step"] > 0 and o["solver"] != "LSODA":
            warnings.warn(f"scipy_solver: option 'min_step' is used by scipy's LSODA only; "
                          f"{o['solver']} ignores it", stacklevel=4)
        if o["norm"] is not None:
            warnings.warn("scipy_solver: option 'norm' is ignored (scipy uses its own RMS "
                          "error norm)", stacklevel=4)
        if o["jacobian"] is not None:
            check_jacobian_option(cls.name, o["jacobian"])
            if o["jacobian"] == "matrix_free":
                raise ODEInputError("scipy_solver: scipy's solvers need the Jacobian as a "
                                    "matrix; use jacobian='autograd' or a callable")
        # the loop asks ``controller_or_default(o).bind(...)`` for the controller
        o["step_size_controller"] = _ScipyControllerFactory(o["first_step"])

    @classmethod
    def make_stepper(cls, o: dict, norm):
        engine = _Engine(o, norm, cls.name)
        o["step_size_controller"].engine = engine
        jumps = o.get("jump_t")
        if jumps is not None:
            engine.jumps = set(torch.as_tensor(jumps, dtype=torch.float64).reshape(-1).tolist())
        return ScipyStepper(engine)


class _ScipyControllerFactory:
    """Stands in the options' ``step_size_controller`` slot: ``bind`` gives the loop the
    scipy controller of the solve's engine."""

    rtol = atol = None

    def __init__(self, first_step):
        self.first_step = first_step
        self.engine = None

    def bind(self, norm, error_order, options, settings=None):
        return ScipyController(self.engine, self.first_step)


METHODS = {"scipy_solver": ScipySolver}

__all__ = ["METHODS", "SCIPY_SOLVERS", "ScipyGradientError", "ScipySolver"]
