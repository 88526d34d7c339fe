"""Events: the user's ``event_fn`` on the flat state, and the location of its sign change
inside an accepted step, written once for one problem (float times) and a per-sample batch
((B,) times, each row its own event)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from neuralode.errors import EventError
from neuralode.solvers.elementwise import (
    every,
    logical_not,
    maximum,
    minimum,
    ulp,
    where,
)


class EventFunction:
    """The user's ``event_fn(t, y)`` on the flat state, made positive at the start.

    A vector-valued event_fn fires when any component changes sign (as torchdiffeq: each
    component is multiplied by its initial sign and the minimum is watched). One problem:
    floats in and out; per sample: t (B,), y (B, n), and event_fn returns (B,) or (B, k)."""

    def __init__(self, fn: Callable, rhs, t0, y0: torch.Tensor):
        self.fn, self.rhs = fn, rhs
        self.batch = y0.dim() == 2
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
        tt = t.to(rhs.dtype) if isinstance(t, torch.Tensor) else rhs.time(t)
        yu = y if y.dtype == rhs.user_dtype else y.to(rhs.user_dtype)
        out = self.fn(tt, rhs.layout.unflatten(yu))
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        if not self.batch:
            return out.detach().reshape(-1).to(torch.float64)
        B = y.shape[0]
        if out.shape[:1] != (B,) or out.dim() > 2:
            raise EventError(f"event_fn(t, y) must return shape ({B},) or ({B}, k) in "
                             f"per_sample mode, got {tuple(out.shape)}")
        return out.detach().reshape(B, -1).to(torch.float64)

    def __call__(self, t, y: torch.Tensor):
        with torch.no_grad():
            v = (self._raw(t, y) * self.signs).amin(-1)
        return v if self.batch else v.item()


def _show(t) -> str:
    return f"{t}" if not isinstance(t, torch.Tensor) else f"{t.tolist()[:8]}"


INTERIOR = (0.2, 0.4, 0.6, 0.8)  # step fractions where the interpolant is also checked


def interior_check(event: EventFunction, state_at: Callable, t, h, g1):
    """(end of the interval to search, event value there): the step's end, or the first of
    the ``INTERIOR`` fractions of the step where the event value on the interpolant is <= 0
    while it is positive at the end (two sign changes inside one step, invisible at its
    ends: a ball thrown up through the event height and falling back within one long step).
    A pair of crossings between two of these points is not seen. One problem: floats (the
    check runs only where g1 > 0); per sample: (B,) arrays, rows with g1 <= 0 keep their
    end."""
    h_ev, g_ev = h, g1
    found = logical_not(g1 > 0)
    for th in INTERIOR:
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


def locate_event(event: EventFunction, state_at: Callable, t, y: torch.Tensor, h, g1,
                 active=None):
    """The event time in (t, t + h]: the last float64 time where the (positive at t) event
    value is still > 0 before it turns <= 0 (or an exact zero), to adjacent float64 times.
    Illinois regula falsi on the step's interpolant ``state_at(time)``, with a bisection
    every fifth try. Per sample: t, h, g1 (B,) and ``active`` the rows to locate (the
    others get t + h)."""
    t_lo, g_lo = t, event(t, y)
    t_hi, g_hi = t + h, g1
    last = 0 if active is None else torch.zeros_like(g1)
    done = False if active is None else logical_not(active)
    for it in range(200):
        done = done | (abs(t_hi - t_lo) <= 2 * ulp(maximum(abs(t_lo), abs(t_hi))))
        if every(done):
            break
        tm = 0.5 * (t_lo + t_hi)
        if it % 5 != 4:
            # g_lo > 0 >= g_hi: the secant's root (g_lo - g_hi > 0 wherever it is used)
            tf = t_lo + (t_hi - t_lo) * (g_lo / maximum(g_lo - g_hi, 1e-300))
            use = (g_lo > 0) & (g_hi < 0) & (minimum(t_lo, t_hi) < tf) & (tf < maximum(t_lo, t_hi))
            tm = where(use, tf, tm)
        gm = event(tm, state_at(tm))
        run = logical_not(done)
        zero = run & (gm == 0)  # an exact zero: the event is at tm
        up = run & (gm > 0)
        down = run & (gm < 0)
        # Illinois: halve the value at the end that stayed
        g_hi = where(up & (last == 1), g_hi * 0.5, g_hi)
        g_lo = where(down & (last == -1), g_lo * 0.5, g_lo)
        t_lo = where(up | zero, tm, t_lo)
        g_lo = where(up, gm, g_lo)
        t_hi = where(down, tm, t_hi)
        g_hi = where(down, gm, g_hi)
        last = where(up, 1, where(down, -1, last))
        done = done | zero
    return t_lo if active is None else torch.where(active, t_lo, t + h)


__all__ = ["EventFunction", "interior_check", "locate_event", "nonfinite_event_message"]
