"""How a solve ends: the status names, their integer codes (per-sample statuses are (B,)
tensors of codes), the error each failure raises, and the messages, written once for both
drivers."""

from __future__ import annotations

from neuralode.errors import (
    ConvergenceError,
    MaxStepsError,
    NonFiniteError,
    StepSizeError,
    StiffnessError,
)

RUNNING = "running"
SUCCESS = "success"
EVENT = "event"
MAX_STEPS = "max_steps_reached"
STEP_SIZE = "step_size_underflow"
NONFINITE = "nonfinite"
CONVERGENCE = "convergence_failure"
STIFF = "stiff"
STATUSES = (SUCCESS, EVENT, MAX_STEPS, STEP_SIZE, NONFINITE, CONVERGENCE, STIFF)
NAMES = (RUNNING, *STATUSES)  # index = code
CODE = {name: k for k, name in enumerate(NAMES)}
ERRORS = {MAX_STEPS: MaxStepsError, STEP_SIZE: StepSizeError, NONFINITE: NonFiniteError,
          CONVERGENCE: ConvergenceError, STIFF: StiffnessError}
FINISHED_WELL = (SUCCESS, EVENT)


def progress(t: float, t0: float, t1: float) -> str:
    if t1 == t0:
        return f"at t0={t0}"
    return f"{100 * (t - t0) / (t1 - t0):.1f}% of the way from t0={t0} to t1={t1}"


def max_steps_message(name: str, max_num_steps: int, t: float, h: float, where: str) -> str:
    return (f"{name}: max_num_steps={max_num_steps} exceeded at t={t:.10g}, {where} (last "
            f"step size {h:.3g}); raise options['max_num_steps'], loosen rtol/atol, or use a "
            f"method suited to the problem")


def step_size_message(name: str, t: float, h: float, failure: str, where: str) -> str:
    why = (f"the last attempt failed: {failure}" if failure else
           "the error could not be controlled; the problem may be stiff or the solution may "
           "blow up")
    return (f"{name}: step size underflow at t={t:.17g}: the step h={h:.3g} is below what "
            f"float64 time resolves there ({why}){'; reached ' + where if where else ''}")


def nonfinite_message(name: str, t: float, where: str, *, at_start: bool = False) -> str:
    if at_start:
        return (f"{name}: the ODE's derivative or state became non-finite (nan/inf) at "
                f"t={t:.10g} (the initial time); check func for overflow or division by zero")
    return (f"{name}: the ODE's derivative or state became non-finite (nan/inf) at t={t:.10g} "
            f"and smaller steps did not help; check func for overflow, division by zero or a "
            f"blow-up of the solution{'; reached ' + where if where else ''}")


def nonfinite_grid_message(name: str, t_good: float, t1: float, h: float) -> str:
    return (f"{name}: the ODE's derivative or state became non-finite (nan/inf) between "
            f"t={t_good:.10g} and t={t1:.10g} (steps of h={h:.3g}; the state was finite at "
            f"t={t_good:.10g}); check func for overflow, division by zero or a blow-up of the "
            f"solution")


def convergence_message(name: str, t: float, t1: float, h: float, failure: str) -> str:
    """A fixed grid's implicit step that could not be solved."""
    return (f"{name}: the step from t={t:.10g} to t={t1:.10g} (h={h:.3g}) failed: {failure}; "
            f"use a smaller step_size or an adaptive method")


def start_scale_message() -> str:
    return ("the error norm is not finite at the initial state, so no step size can be "
            "chosen: the tolerance scale atol + rtol * |y0| is zero somewhere (atol=0 with "
            "y0 = 0?) or the state or derivative is not finite; use atol > 0")
