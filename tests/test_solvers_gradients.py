"""Gradients through the solvers (backpropagation through the steps, "RK-Net").

Gradients with respect to y0 and to parameters of func come from autograd through the
solver's operations; finite differences of the *discrete* solution also see the step
sizes move with the input (the controller is not differentiated), an effect of the order
of the local error, so adaptive solves use tight tolerances here. Gradients with respect
to t use the exact flow identities (see neuralode/odeint.py), which finite differences of
the discrete solution reproduce to the accuracy of the solve.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from neuralode import odeint, solve

F64 = torch.float64

# (method, rtol = atol, options). dopri8 needs 1e-12: its order-5 interpolant at the
# interior output moves with the step size as y0 is perturbed (1e-5 mismatch at 1e-10).
CASES = [
    ("dopri5", 1e-9, None),
    ("tsit5", 1e-9, None),
    ("bosh3", 1e-8, None),
    ("dopri8", 1e-12, None),
    ("rk4", 1e-9, {"step_size": 0.05}),
    ("euler", 1e-9, {"step_size": 0.05}),
    ("midpoint", 1e-9, {"step_size": 0.05}),
    ("heun3", 1e-9, {"step_size": 0.05}),
    ("explicit_adams", 1e-9, {"step_size": 0.05}),
    ("implicit_adams", 1e-10, {"step_size": 0.05}),
]
T_GRAD_METHODS = {"dopri5", "tsit5", "bosh3", "dopri8", "rk4", "heun3", "explicit_adams",
                  "implicit_adams"}


def nonlinear_rhs(a):
    def func(t, y):
        return torch.tanh(y @ a.T) + 0.1 * torch.sin(t)
    return func


def inputs():
    y0 = torch.tensor([0.5, -0.3], dtype=F64, requires_grad=True)
    a = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64, requires_grad=True)
    return y0, a, t


@pytest.mark.parametrize("method,tol,options", CASES)
def test_gradcheck_wrt_y0_and_parameters(method, tol, options):
    y0, a, t = inputs()

    def fn(y0_, a_):
        return odeint(nonlinear_rhs(a_), y0_, t.detach(), rtol=tol, atol=tol, method=method,
                      options=options)

    assert gradcheck(fn, (y0, a))


@pytest.mark.parametrize("method,tol,options",
                         [c for c in CASES if c[0] in T_GRAD_METHODS])
def test_gradcheck_wrt_times(method, tol, options):
    y0, a, t = inputs()

    def fn(t_):
        return odeint(nonlinear_rhs(a.detach()), y0.detach(), t_, rtol=tol, atol=tol,
                      method=method, options=options)

    assert gradcheck(fn, (t,))


@pytest.mark.parametrize("method,tol,options", [CASES[0], CASES[4]])
def test_gradcheck_all_inputs_together_with_decreasing_time(method, tol, options):
    y0, a, _ = inputs()
    t = torch.tensor([1.0, 0.3, -0.5], dtype=F64, requires_grad=True)

    def fn(y0_, a_, t_):
        return odeint(nonlinear_rhs(a_), y0_, t_, rtol=tol, atol=tol, method=method,
                      options=options)

    assert gradcheck(fn, (y0, a, t))


def test_gradcheck_tuple_state():
    x0 = torch.tensor([0.4, -0.1], dtype=F64, requires_grad=True)
    v0 = torch.tensor([0.2], dtype=F64, requires_grad=True)
    w = torch.tensor([1.3, 0.7], dtype=F64, requires_grad=True)

    def fn(x0_, v0_, w_):
        def func(t, s):
            x, v = s
            return w_ * torch.sin(x) * v, -(x * w_).sum(0, keepdim=True)
        xs, vs = odeint(func, (x0_, v0_), torch.tensor([0.0, 0.5, 1.2], dtype=F64),
                        rtol=1e-10, atol=1e-10)
        return xs, vs

    assert gradcheck(fn, (x0, v0, w))


def test_euler_time_gradient_approaches_the_exact_flow_derivative():
    # the t-gradient is the exact d y(T) / dT = f(T, y(T)); the Euler solution's own
    # derivative (finite differences over the end of the grid) differs by O(h):
    # halving h must halve the mismatch
    y0, a, _ = inputs()
    func = nonlinear_rhs(a.detach())
    mismatches = []
    for h in (0.02, 0.01, 0.005):
        t = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
        y = odeint(func, y0.detach(), t, method="euler", options={"step_size": h})
        (grad,) = torch.autograd.grad(y[-1, 0], t)
        eps = 1e-6
        plus = odeint(func, y0.detach(), torch.tensor([0.0, 1.0 + eps], dtype=F64),
                      method="euler", options={"step_size": h})[-1, 0]
        minus = odeint(func, y0.detach(), torch.tensor([0.0, 1.0 - eps], dtype=F64),
                       method="euler", options={"step_size": h})[-1, 0]
        mismatches.append(abs(grad[1].item() - ((plus - minus) / (2 * eps)).item()))
    assert mismatches[0] / mismatches[1] == pytest.approx(2.0, rel=0.2)
    assert mismatches[1] / mismatches[2] == pytest.approx(2.0, rel=0.2)


# -- gradients against closed forms --------------------------------------------------------

A_LIN = torch.tensor([[-0.2, 1.0], [-1.5, -0.1]], dtype=F64)


def test_gradient_wrt_y0_of_linear_ode_is_the_matrix_exponential():
    y0 = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    t_end = 2.5
    y = odeint(lambda t, y: A_LIN @ y, y0, torch.tensor([0.0, t_end], dtype=F64), rtol=1e-11,
               atol=1e-11)
    w = torch.tensor([0.3, -0.7], dtype=F64)
    (grad,) = torch.autograd.grad((w * y[-1]).sum(), y0)
    expected = torch.linalg.matrix_exp(A_LIN * t_end).T @ w
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-9)


def test_gradient_wrt_decay_rate_matches_closed_form():
    # y' = -k y: y(T) = y0 exp(-k T), d y(T) / dk = -T y(T)
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y0 = torch.tensor([2.0], dtype=F64)
    t_end = 3.0
    y = odeint(lambda t, y: -k * y, y0, torch.tensor([0.0, t_end], dtype=F64), rtol=1e-11,
               atol=1e-11, method="tsit5")
    (grad,) = torch.autograd.grad(y[-1, 0], k)
    expected = -t_end * 2.0 * torch.exp(-0.7 * torch.tensor(t_end, dtype=F64))
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=0)


def test_time_gradients_are_the_flow_identities():
    # d y(t_i)/d t_i = f(t_i, y(t_i)) = A y(t_i);  d y(t_i)/d t_0 = -Phi(t_i, t_0) A y0
    y0 = torch.tensor([1.0, -2.0], dtype=F64)
    t = torch.tensor([0.5, 1.0, 2.5], dtype=F64, requires_grad=True)
    ys = odeint(lambda s, y: A_LIN @ y, y0, t, rtol=1e-11, atol=1e-11)
    w = torch.tensor([0.3, -0.7], dtype=F64)
    (grad,) = torch.autograd.grad((w * ys[-1]).sum(), t)
    phi = torch.linalg.matrix_exp(A_LIN * 2.0)
    y_end = phi @ y0
    expected = torch.stack([-(w @ (phi @ (A_LIN @ y0))), torch.zeros((), dtype=F64),
                            w @ (A_LIN @ y_end)])
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-9)


# -- bookkeeping -------------------------------------------------------------------------

def test_time_gradient_costs_one_evaluation_per_output_time():
    y0 = torch.tensor([1.0, -2.0], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=F64)
    plain = solve(lambda s, y: A_LIN @ y, y0, t)
    with_t = solve(lambda s, y: A_LIN @ y, y0, t.clone().requires_grad_())
    assert with_t.stats.nfe - plain.stats.nfe == len(t)
    # same steps; only rounding differs (the plain solve takes the no-autograd buffer path)
    torch.testing.assert_close(with_t.ys, plain.ys, rtol=0, atol=1e-14)
    assert with_t.stats.n_accepted == plain.stats.n_accepted


def test_output_requires_grad_only_when_an_input_does():
    y0 = torch.tensor([1.0, -2.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    assert not odeint(lambda s, y: A_LIN @ y, y0, t).requires_grad
    assert odeint(lambda s, y: A_LIN @ y, y0.clone().requires_grad_(), t).requires_grad
    a = A_LIN.clone().requires_grad_()
    assert odeint(lambda s, y: a @ y, y0, t).requires_grad
    with torch.no_grad():
        assert not odeint(lambda s, y: a @ y, y0.clone().requires_grad_(), t).requires_grad


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_gradient_of_inference_and_training_paths_give_the_same_solution(method):
    # with grad enabled the solver combines stages out of place; without it, in a
    # preallocated buffer: both must compute the same numbers
    y0 = torch.tensor([0.5, -0.3], dtype=F64)
    a = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=F64)
    t = torch.linspace(0.0, 2.0, 7, dtype=F64)
    opts = {"step_size": 0.05} if method == "rk4" else None
    graph = odeint(nonlinear_rhs(a), y0.clone().requires_grad_(), t, method=method,
                   options=opts)
    with torch.no_grad():
        buffered = odeint(nonlinear_rhs(a), y0, t, method=method, options=opts)
    torch.testing.assert_close(graph.detach(), buffered, rtol=0, atol=1e-13)
