"""The float-clock driver: one problem, time and step size as Python floats.

Every method runs here (``batched.py`` is the same loop on a tensor clock, for per-sample
batches of the explicit RK methods). The driver owns everything that is not one step of a
method and not the choice of the step size: statistics, ``max_num_steps``, stop times
(``step_t``, ``jump_t``, state jumps), non-finite handling, outputs at the requested times
(from the stepper's dense output), events, callbacks, the dense record of the solution,
and the final status. A *stepper* (``rk.RKStepper``, ``adams.AdamsStepper``) takes one
step; a *controller* (``controllers.FixedGridController``, ``controllers.PIDController``)
says where the step ends and whether it is accepted.

The solver state is the flat 1-D tensor of the front door (``neuralode.odeint``); time is a
Python float (float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from neuralode.errors import EventError
from neuralode.solvers.base import StepFailure
from neuralode.solvers.event_location import (
    EventFunction,
    interior_check,
    locate_event,
    nonfinite_event_message,
)
from neuralode.solvers.status import (
    CONVERGENCE,
    ERRORS,
    EVENT,
    MAX_STEPS,
    NONFINITE,
    STATUSES,
    STEP_SIZE,
    STIFF,
    SUCCESS,
    convergence_message,
    max_steps_message,
    nonfinite_grid_message,
    nonfinite_message,
    progress,
    step_size_message,
)
from neuralode.solvers.stiffness import StiffnessCheck

# fixed-grid solves check the state for nan/inf every this many steps (and at outputs,
# stops and the end) rather than synchronising with the device at every step
_CHECK_EVERY = 8
# 4 ulp(x) <= 4 * 2**-52 * |x| < _ULP_BOUND * |x| for normal x, and <= 2e-323 below them
_ULP_BOUND = 1e-15


@dataclass
class Stop:
    """A time the solve must land on exactly.

    kind: "step" (land and go on), "jump" (a discontinuity of f: the step ends with f
    evaluated from the left, the next starts with f from the right), "hook" (the state
    jumps). ``hook(t, y) -> y_new`` (the adjoint's backward solve) may come with either
    "hook" or "jump" (a state jump at a discontinuity of f)."""

    time: float
    kind: str = "step"
    hook: Callable | None = None


@dataclass
class Callbacks:
    """torchdiffeq's ``callback_step``, ``callback_accept_step``, ``callback_reject_step``,
    each called as ``cb(t0, y0, dt)`` (tensors; y0 in the user's structure)."""

    step: Callable | None = None
    accept: Callable | None = None
    reject: Callable | None = None

    def __bool__(self) -> bool:
        return bool(self.step or self.accept or self.reject)


@dataclass
class LoopResult:
    outs: list[torch.Tensor]  # flat states at the output times reached
    y_final: torch.Tensor  # the state where the solve stopped
    status: str = SUCCESS
    message: str = ""
    t_final: float = math.nan
    event_t: float | None = None
    event_y: torch.Tensor | None = None
    segments: list[tuple[float, float, Any]] | None = None
    h_next: float = math.nan


def _merge_stops(stops: list[Stop]) -> list[Stop]:
    """One stop per time (sorted input): a jump wins over a plain stop, a hook is kept."""
    out: list[Stop] = []
    for s in stops:
        if out and out[-1].time == s.time:
            prev = out[-1]
            kind = "jump" if "jump" in (prev.kind, s.kind) else (
                "hook" if "hook" in (prev.kind, s.kind) else "step")
            out[-1] = Stop(s.time, kind, prev.hook or s.hook)
        else:
            out.append(s)
    return out


def integrate(rhs, y0: torch.Tensor, ts: list[float], stepper, controller, *,
              stops: list[Stop] = (), open_end: bool = False, event_fn: Callable | None = None,
              callbacks: Callbacks | None = None, perturb: bool = False,
              max_num_steps: int = 2**31 - 1, record: bool = False, throw: bool = True,
              name: str = "", event_interior_points: int = 0,
              stiffness: StiffnessCheck | None = None) -> LoopResult:
    """Integrate from (ts[0], y0) and return the states at the times ``ts``.

    ``open_end``: ts[-1] only gives the direction; the solve runs until the event (event
    mode of torchdiffeq) or ``max_num_steps``. ``stops``: times strictly inside the span to
    land on (see ``Stop``). ``perturb``: every step hands f its start time from the right
    and its end time from the left (fixed grids with discontinuities at grid points).
    ``event_interior_points``: see ``event_location.interior_check``. ``stiffness``: the
    explicit methods' stiffness test (``solvers.stiffness``).
    """
    stats = rhs.stats
    t0 = ts[0]
    res = LoopResult(outs=[y0], t_final=t0, y_final=y0, segments=[] if record else None)
    if len(ts) == 1 and event_fn is None:
        return res
    direction = 1.0 if ts[-1] > t0 else -1.0
    t_end = direction * math.inf if open_end else ts[-1]
    inside = _merge_stops(sorted((s for s in stops if direction * (s.time - t0) > 0
                                  and direction * (t_end - s.time) > 0),
                                 key=lambda s: direction * s.time))
    plan = inside + [Stop(t_end, "end")]
    n_out = 1 if open_end else len(ts)
    event = (EventFunction(event_fn, rhs, t0, y0, event_interior_points)
             if event_fn is not None else None)
    cbs = callbacks if callbacks else None
    adaptive = controller.adaptive

    def fail(status: str, message: str, t: float, y) -> LoopResult:
        if throw:
            raise ERRORS[status](message)
        res.status, res.message, res.t_final, res.y_final = status, message, t, y
        return res

    t, y = t0, y0
    t_good, y_good = t0, y0  # the last state checked to be finite (fixed grids)
    if perturb:
        f0 = rhs.call_at(rhs.toward(t0, t0 + direction), y0)
    else:
        f0 = rhs.call(t0, y0)
    if adaptive and not math.isfinite(f0.sum().item()):
        return fail(NONFINITE, nonfinite_message(name, t0, "", at_start=True), t, y)
    graph = torch.is_grad_enabled() and (y0.requires_grad or f0.requires_grad)
    stepper.start(rhs, y0, f0, graph)
    h = controller.first_step(rhs.call, t0, y0, f0, direction)
    outs = res.outs
    i_out, i_stop, n_attempts = 1, 0, 0
    failure = ""  # why the last attempt of an implicit method failed (for messages)
    propose, judge, step, error = controller.propose, controller.judge, stepper.step, \
        stepper.error if adaptive else None
    stiff_next = stiffness.next if stiffness is not None else math.inf
    while True:
        stop = plan[i_stop]
        t1 = propose(t, h, stop.time, direction)
        at_stop = t1 == stop.time
        h = t1 - t
        # a step of at most 4 ulps (or nan/inf) cannot move the clock; the cheap bound first
        # (4 ulp(x) <= 8.9e-16 |x|), the exact test only near it
        if not _ULP_BOUND * (abs(t) + abs(t1)) + 1e-300 < abs(h) < math.inf and (
                not math.isfinite(h) or abs(h) <= 4 * math.ulp(max(abs(t), abs(t1)))):
            where = "" if open_end else progress(t, t0, ts[-1])
            if adaptive and controller.nonfinite:
                return fail(NONFINITE, nonfinite_message(name, t, where), t, y)
            return fail(STEP_SIZE, step_size_message(name, t, h, failure, where), t, y)
        if n_attempts >= max_num_steps:
            where = "before the event" if open_end else progress(t, t0, ts[-1])
            return fail(MAX_STEPS, max_steps_message(name, max_num_steps, t, h, where), t, y)
        n_attempts += 1
        left = perturb or (at_stop and stop.kind == "jump")
        left_end = rhs.left_limit(t1, t) if left else None
        if cbs is not None and cbs.step is not None:
            cbs.step(*rhs.callback_args(t, y, h))
        try:
            y1 = step(t, y, h, left_end)
        except StepFailure as e:
            if not adaptive:
                return fail(CONVERGENCE, convergence_message(name, t, t1, h, e.reason), t, y)
            failure = e.reason
            stats.n_rejected += 1
            if cbs is not None and cbs.reject is not None:
                cbs.reject(*rhs.callback_args(t, y, h))
            h = controller.shrink(h, e.factor, direction)
            continue
        failure = ""
        if adaptive:
            accept, h_next = judge(y1, error(), h, direction)
            if not accept:
                stats.n_rejected += 1
                if cbs is not None and cbs.reject is not None:
                    cbs.reject(*rhs.callback_args(t, y, h))
                h = h_next
                continue
        else:
            accept, h_next = judge()
        stats.n_accepted += 1
        if cbs is not None and cbs.accept is not None:
            cbs.accept(*rhs.callback_args(t, y, h))
        t1_eval = left_end(t1) if left else t1

        # event: the first sign change inside this step ends the solve there
        if event is not None:
            g1 = event(t1, y1)
            if not math.isfinite(g1):
                raise EventError(nonfinite_event_message(name, t1, y1))
            h_ev, g_ev = h, g1
            if g1 <= 0 or event.interior:
                stepper.prepare_interp(t1_eval, y1)
                yd = y.detach()

                def state_at(tm, yd=yd, t=t, h=h):
                    return stepper.interpolate(yd, h, [(tm - t) / h])[0]
                if g1 > 0:
                    with torch.no_grad():
                        h_ev, g_ev = interior_check(event, state_at, t, h, g1)
            if g_ev <= 0:
                with torch.no_grad():
                    t_ev = locate_event(event, state_at, t, yd, h_ev, g_ev)
                y_ev = stepper.interpolate(y, h, [(t_ev - t) / h])[0] if t_ev != t else y
                while i_out < n_out and direction * (ts[i_out] - t_ev) <= 0:
                    out_t = ts[i_out]
                    outs.append(stepper.interpolate(y, h, [(out_t - t) / h])[0])
                    i_out += 1
                if record:
                    res.segments.append((t, t1, stepper.segment(y, h)))
                res.status, res.event_t, res.event_y = EVENT, t_ev, y_ev
                res.t_final, res.y_final = t_ev, y_ev
                return res

        # outputs strictly inside (t, t1) come from the interpolant; those at t1 are y1
        if i_out < n_out and direction * (ts[i_out] - t1) < 0:
            stepper.prepare_interp(t1_eval, y1)
            thetas = []
            while i_out < n_out and direction * (ts[i_out] - t1) < 0:
                thetas.append((ts[i_out] - t) / h)
                i_out += 1
            outs.extend(stepper.interpolate(y, h, thetas))
        while i_out < n_out and ts[i_out] == t1:
            outs.append(y1)
            i_out += 1
        if record:
            stepper.prepare_interp(t1_eval, y1)
            res.segments.append((t, t1, stepper.segment(y, h)))
        if not adaptive and (at_stop or stats.n_accepted % _CHECK_EVERY == 0
                             or (i_out > 1 and ts[i_out - 1] == t1)):
            # fixed grids: one device synchronisation every few steps, not every step
            if not math.isfinite(y1.sum().item()):
                return fail(NONFINITE, nonfinite_grid_message(name, t_good, t1, h), t_good,
                            y_good)
            t_good, y_good = t1, y1
        if stats.n_accepted >= stiff_next:  # every CHECK_EVERY steps (each while suspect)
            why = stiffness.test(stepper.stages(), stats.n_accepted, t1, h, t_end, name)
            stiff_next = stiffness.next
            if why:
                return fail(STIFF, why, t1, y1)
        t, y = t1, y1
        f_next = None
        if at_stop:
            if stop.kind == "end":
                res.t_final, res.y_final, res.h_next = t, y, h_next
                return res
            i_stop += 1
            if stop.kind != "step":
                stepper.restart()  # a multistep history does not survive a discontinuity
            if stop.hook is not None:
                y = stop.hook(t, y)
                if adaptive:
                    controller.absy = y.detach().abs()
            if stop.kind == "jump":
                f_next = rhs.call_at(rhs.toward(t, t + direction), y)
            elif stop.hook is not None:
                f_next = rhs.call(t, y)
        if perturb and f_next is None:
            f_next = rhs.call_at(rhs.toward(t, t + direction), y)
        if f_next is None and not stepper.fsal:
            stepper.end_derivative(t1_eval, y1)
        stepper.advance(f_next)
        h = h_next


__all__ = ["CONVERGENCE", "EVENT", "STATUSES", "SUCCESS", "Callbacks", "LoopResult", "Stop",
           "integrate"]
