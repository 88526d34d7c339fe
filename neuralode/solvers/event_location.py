"""Events: the user's ``event_fn`` on the flat state, and the location of its sign change
inside an accepted step, written once for one problem (float times) and a per-sample batch
((B,) times, each row its own event)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from neuralode.errors import EventError
from neuralode.solvers.elementwise import every, logical_not, where
from neuralode.solvers.timekeeping import time_dtype


class EventFunction:
    """The user's ``event_fn(t, y)`` on the flat state, made positive at the start.

    A vector-valued event_fn fires when any component changes sign (as torchdiffeq: each
    component is multiplied by its initial sign and the minimum is watched). One problem:
    floats in and out; per sample: t (B,), y (B, n), and event_fn returns (B,) or (B, k)."""

    def __init__(self, fn: Callable, rhs, t0, y0: torch.Tensor, interior_points: int = 0):
        self.fn, self.rhs = fn, rhs
        self.batch = y0.dim() == 2
        self.vdt = time_dtype(y0.device)  # the values' dtype: float64 where the device has it
        # step fractions where the interpolant is also checked (``interior_check``)
        self.interior = [(k + 1) / (interior_points + 1) for k in range(interior_points)]
        with torch.no_grad():
            c = self._raw(t0, y0)
        if not bool(torch.isfinite(c).all()):
            raise EventError(f"event_fn(t0, y0) is not finite at t0={_show(t0)}: {c}")
        self.signs = torch.sign(c)
        if not bool((self.signs != 0).all()):
            raise EventError(
                f"event_fn(t0, y0) is exactly zero at t0={_show(t0)}; an event at the initial "
                f"time cannot be located (start just after it, or shift event_fn)")

    def _raw(self, t, y: torch.Tensor) -> torch.Tensor:
        rhs = self.rhs
        tt = rhs.time(t) if isinstance(t, float) else t.to(rhs.dtype)
        yu = y if y.dtype == rhs.user_dtype else y.to(rhs.user_dtype)
        out = self.fn(tt, rhs.layout.unflatten(yu))
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        if not self.batch:
            return out.detach().reshape(-1).to(self.vdt)
        B = y.shape[0]
        if out.shape[:1] != (B,) or out.dim() > 2:
            raise EventError(f"event_fn(t, y) must return shape ({B},) or ({B}, k) in "
                             f"per_sample mode, got {tuple(out.shape)}")
        return out.detach().reshape(B, -1).to(self.vdt)

    def __call__(self, t, y: torch.Tensor):
        with torch.no_grad():
            if self.batch:
                return (self._raw(t, y) * self.signs).amin(-1)
            return (self._raw(t, y) * self.signs).min().item()

    def row(self, b: int) -> Callable[[float, torch.Tensor], float]:
        """Row b of a per-sample event as a one-problem event function (float time, (n,)
        state -> float): ``event_fn`` sees that sample as a batch of one."""
        signs = self.signs[b:b + 1]

        def value(t: float, y: torch.Tensor) -> float:
            with torch.no_grad():
                tt = torch.full((1,), t, dtype=torch.float64, device=y.device)
                return float((self._raw(tt, y[None]) * signs).amin())
        return value


def _show(t) -> str:
    return f"{t}" if not isinstance(t, torch.Tensor) else f"{t.tolist()[:8]}"


def interior_check(event: EventFunction, state_at: Callable, t, h, g1):
    """(end of the interval to search, event value there): the step's end, or the first of
    the ``event.interior`` fractions of the step (``options['event_interior_points']``
    evenly spaced points) where the event value on the interpolant is <= 0 while it is
    positive at the end (two sign changes inside one step, invisible at its ends: a ball
    thrown up through the event height and falling back within one long step). A pair of
    crossings between two of these points is not seen. One problem: floats (the check runs
    only where g1 > 0); per sample: (B,) arrays, rows with g1 <= 0 keep their end."""
    h_ev, g_ev = h, g1
    found = logical_not(g1 > 0)
    for th in event.interior:
        tm = t + th * h
        gm = event(tm, state_at(tm))
        hit = logical_not(found) & (gm <= 0)
        h_ev, g_ev = where(hit, th * h, h_ev), where(hit, gm, g_ev)
        found = found | hit
        if every(found):
            break
    return h_ev, g_ev


def nonfinite_event_message(name: str, t, y: torch.Tensor) -> str:
    big = float(y.detach().abs().max()) if y.numel() else 0.0
    return (f"{name}: event_fn returned a non-finite value at t={t:.10g}, where the state's "
            f"largest magnitude is {big:.3g}: the solution diverged (or event_fn failed) "
            f"before any sign change of event_fn was found")


def locate_event(event: Callable, state_at: Callable, t: float, y: torch.Tensor, h: float,
                 g1: float) -> float:
    """The event time in (t, t + h]: the last float64 time where the (positive at t) event
    value is still > 0 before it turns <= 0 (or an exact zero), to adjacent float64 times.
    Illinois regula falsi on the step's interpolant ``state_at(time)``, with a bisection
    every fifth try. ``event(time, state) -> float``; per sample, each row with an event
    is located by this function alone (``EventFunction.row``), so a sample's event time is
    its solo solve's."""
    t_lo, g_lo = t, event(t, y)
    t_hi, g_hi = t + h, g1
    last = 0
    for it in range(200):
        if abs(t_hi - t_lo) <= 2 * math.ulp(max(abs(t_lo), abs(t_hi))):
            break
        tm = 0.5 * (t_lo + t_hi)
        if g_lo > 0 > g_hi and it % 5 != 4:
            tf = t_lo + (t_hi - t_lo) * (g_lo / (g_lo - g_hi))
            if min(t_lo, t_hi) < tf < max(t_lo, t_hi):
                tm = tf
        gm = event(tm, state_at(tm))
        if gm == 0:
            return tm
        if gm > 0:
            t_lo, g_lo = tm, gm
            if last == 1:
                g_hi *= 0.5  # Illinois: halve the value at the end that stayed
            last = 1
        else:
            t_hi, g_hi = tm, gm
            if last == -1:
                g_lo *= 0.5
            last = -1
    return t_lo


__all__ = ["EventFunction", "interior_check", "locate_event", "nonfinite_event_message"]
