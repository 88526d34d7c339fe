"""``odeint_event``: solve until an event and differentiate the event time and state.

The event time t* solves g(t*, y(t*)) = 0 for the event function g. By the implicit
function theorem, for any quantity theta that y(t*) depends on (y0, parameters, t0),

    dt*/dtheta = -(dg/dy . dy(t*)/dtheta) / (dg/dt + dg/dy . f(t*, y(t*))),

and the state at the event moves with it: dy*/dtheta = dy(t*)/dtheta + f(t*, y*) dt*/dtheta.
``_EventGradient`` attaches exactly this to the event time and state that the solve found
(without a graph through the root finding); the gradient of y(t*) with respect to theta at
a fixed t* comes from whichever ``odeint_interface`` did the solve (backprop or adjoint).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from neuralode.errors import ODEFuncError, ODEInputError
from neuralode.odeint import odeint
from neuralode.problem import check_y0, state_layout


class _EventGradient(torch.autograd.Function):
    """Identity on (t*, y*) in the forward pass; in the backward pass the implicit-function
    gradient of t* is routed into y* (whose graph leads to y0, parameters and t0)."""

    @staticmethod
    def forward(ctx, func, event_fn, layout, event_t, state_t):
        ctx.func, ctx.event_fn, ctx.layout = func, event_fn, layout
        ctx.save_for_backward(event_t, state_t)
        return event_t.detach().clone(), state_t.detach().clone()

    @staticmethod
    def backward(ctx, grad_t, grad_state):
        event_t, state_t = ctx.saved_tensors
        layout = ctx.layout
        with torch.enable_grad():
            t = event_t.detach().requires_grad_(True)
            y = state_t.detach().requires_grad_(True)
            g = ctx.event_fn(t, layout.unflatten(y))
            if not isinstance(g, torch.Tensor):
                raise ODEFuncError("event_fn must return a tensor")
            # the component that fired: the one closest to zero
            g = g.reshape(-1)
            k = int(torch.argmin(g.detach().abs()))
            dg_dt, dg_dy = torch.autograd.grad(g[k], (t, y), allow_unused=True)
        dg_dt = torch.zeros_like(event_t) if dg_dt is None else dg_dt
        dg_dy = torch.zeros_like(state_t) if dg_dy is None else dg_dy
        with torch.no_grad():
            f = layout.flatten(ctx.func(event_t, layout.unflatten(state_t)))
            dg_total = dg_dt + torch.sum(dg_dy * f)
            if grad_t is None:
                grad_t = torch.zeros_like(event_t)
            if grad_state is None:
                grad_state = torch.zeros_like(state_t)
            # total gradient wrt the event time: direct plus through y(t*) moving with t*
            g_t = grad_t + torch.sum(grad_state * f)
            if float(dg_total) == 0.0:
                raise ODEFuncError("the event function's total derivative is zero at the event "
                                   "(a tangential crossing): the event time is not "
                                   "differentiable there")
            grad_y = grad_state - dg_dy * (g_t / dg_total)
        return None, None, None, None, grad_y


def odeint_event(func: Callable, y0, t0, *, event_fn: Callable, reverse_time: bool = False,
                 odeint_interface: Callable = odeint, **kwargs):
    """Integrate from ``t0`` until ``event_fn(t, y)`` changes sign and return
    ``(event_t, solution)``, solution = y at t0 and at event_t (as torchdiffeq). Gradients of
    the event time and of the state at the event with respect to ``y0``, the parameters
    and ``t0`` follow the implicit function theorem. ``odeint_interface`` is ``odeint`` or
    ``odeint_adjoint``; ``kwargs`` go to it (rtol, atol, method, options, ...)."""
    if not isinstance(t0, torch.Tensor):
        t0 = torch.as_tensor(t0, dtype=torch.float64)
    if t0.numel() != 1:
        raise ODEInputError(f"t0 must be a single time, got shape {tuple(t0.shape)}")
    step = -1.0 if reverse_time else 1.0
    t = torch.cat([t0.reshape(-1), t0.reshape(-1).detach() + step])
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
    items, is_tuple = check_y0(y0)
    layout = state_layout(items, is_tuple)  # a complex state as its real and imaginary parts
    sol_items = list(solution) if is_tuple else [solution]
    state_t = layout.flatten(tuple(s[-1] for s in sol_items) if is_tuple else sol_items[0][-1])

    def flat_func(tt, y):
        return func(tt.to(state_t.dtype) if tt.dtype != state_t.dtype else tt, y)

    event_t, state_t = _EventGradient.apply(flat_func, event_fn, layout, event_t, state_t)
    states = layout.unflatten(state_t)
    if is_tuple:
        solution = tuple(torch.cat([s[:-1], st[None]]) for s, st in zip(sol_items, states))
    else:
        solution = torch.cat([solution[:-1], states[None]])
    return event_t, solution
