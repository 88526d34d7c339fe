"""Rosenbrock methods rodas4 and rodas5p: orders, stiff accuracy against scipy's Radau and
closed forms, L-stability, Jacobian options, float32, statistics and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from torch.autograd import gradcheck

from neuralode import ODEInputError, odeint, odeint_adjoint, solve

F64 = torch.float64
METHODS = ["rodas4", "rodas5p"]
ORDER = {"rodas4": 4, "rodas5p": 5}
DENSE_ORDER = {"rodas4": 3, "rodas5p": 4}


def fixed(h: float) -> dict:
    """Constant steps of size h through the adaptive controller (min_step = max_step)."""
    return {"first_step": h, "min_step": h, "max_step": h, "step_to_outputs": False}


def smooth(t, y):
    a = torch.tensor([[-0.1, -1.0], [1.0, -0.1]], dtype=y.dtype)
    return torch.sin(y @ a.T) + torch.cos(2 * t)


def robertson(t, y):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3,
                        0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2,
                        3e7 * y2 * y2], -1)


def robertson_np(t, y):
    return [-0.04 * y[0] + 1e4 * y[1] * y[2],
            0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2, 3e7 * y[1] ** 2]


MU = 1000.0


def vdp(t, y):
    x, v = y.unbind(-1)
    return torch.stack([v, MU * ((1 - x * x) * v - x)], -1)


def vdp_np(t, y):
    return [y[1], MU * ((1 - y[0] ** 2) * y[1] - y[0])]


def radau(fun, y0, t_end) -> np.ndarray:
    ref = solve_ivp(fun, (0.0, t_end), y0, method="Radau", rtol=1e-12, atol=1e-14)
    assert ref.success
    return ref.y[:, -1]


LAM = 1e6


def forced_exact(t):
    """y' = -LAM (y - cos t), y(0) = 0."""
    c = LAM**2 / (LAM**2 + 1)
    return c * torch.cos(t) + LAM / (LAM**2 + 1) * torch.sin(t) - c * torch.exp(-LAM * t)


def forced(t, y):
    return -LAM * (y - torch.cos(t))


def slope(errs, hs) -> list[float]:
    return [math.log(errs[i] / errs[i + 1]) / math.log(hs[i] / hs[i + 1])
            for i in range(len(errs) - 1)]


# -- orders ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_order_with_constant_steps(method):
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    span = torch.tensor([0.0, 1.0], dtype=F64)
    ref = solve(smooth, y0, span, method="dopri8", rtol=1e-14, atol=1e-14).ys[-1]
    hs = [0.1, 0.05, 0.025]
    errs = [(solve(smooth, y0, span, method=method, options=fixed(h)).ys[-1] - ref)
            .abs().max().item() for h in hs]
    p = ORDER[method]
    assert all(p - 0.4 < s < p + 0.6 for s in slope(errs, hs)), (errs, slope(errs, hs))


@pytest.mark.parametrize("method", METHODS)
def test_dense_output_order(method):
    # one step of size h, output at 0.37 h: local error O(h^(q+1)) for dense order q
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    hs = [0.2, 0.1, 0.05]
    errs = []
    for h in hs:
        ts = torch.tensor([0.0, 0.37 * h, h], dtype=F64)
        out = solve(smooth, y0, ts, method=method, options=fixed(h)).ys[1]
        ref = solve(smooth, y0, ts[:2], method="dopri8", rtol=1e-14, atol=1e-14).ys[-1]
        errs.append((out - ref).abs().max().item())
    q = DENSE_ORDER[method]
    assert all(q + 0.3 < s < q + 1.8 for s in slope(errs, hs)), (errs, slope(errs, hs))


# -- stiff problems: error falls with the tolerance --------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_robertson_error_falls_with_tolerance(method):
    t_end = 10.0
    y0 = [1.0, 0.0, 0.0]
    ref = radau(robertson_np, y0, t_end)
    scale = np.array([1.0, 1e-4, 1.0])  # y2 is ~1e-5: compare relative to its size
    errs, steps = [], []
    for tol in (1e-3, 1e-5, 1e-7):
        sol = solve(robertson, torch.tensor(y0, dtype=F64), torch.tensor([0.0, t_end], dtype=F64),
                    method=method, rtol=tol, atol=tol * 1e-4)
        errs.append(np.max(np.abs(sol.ys[-1].numpy() - ref) / scale))
        steps.append(sol.stats.n_accepted)
        assert sol.stats.n_jac == sol.stats.n_accepted and sol.stats.n_lu == sol.stats.n_steps
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 1e-5, errs
    assert steps[-1] < 300, steps  # an explicit method needs thousands of steps on [0, 10]


@pytest.mark.parametrize("method", METHODS)
def test_van_der_pol_mu_1000_error_falls_with_tolerance(method):
    t_end = 0.3
    y0 = [2.0, 0.0]
    ref = radau(vdp_np, y0, t_end)
    errs = []
    for tol in (1e-3, 1e-5, 1e-7):
        sol = solve(vdp, torch.tensor(y0, dtype=F64), torch.tensor([0.0, t_end], dtype=F64),
                    method=method, rtol=tol, atol=tol)
        errs.append(np.max(np.abs(sol.ys[-1].numpy() - ref) / (1 + np.abs(ref))))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 1e-6, errs


@pytest.mark.parametrize("method", METHODS)
def test_stiff_non_autonomous_problem_against_closed_form(method):
    # f depends on t: the df/dt term of the Rosenbrock stages is needed for the order.
    # Outputs on the step ends (step_t); the dense output has its own, lower order.
    # outputs inside the initial layer (width 1e-6) and on the slow manifold y ~ cos t
    ts = torch.tensor([0.0, 1e-6, 5e-6, 2e-5, 1.0, 3.0], dtype=F64)
    errs = []
    for tol in (1e-3, 1e-6, 1e-8):
        sol = solve(forced, torch.tensor([0.0], dtype=F64), ts, method=method, rtol=tol,
                    atol=tol, options={"step_t": ts})
        errs.append((sol.ys[1:, 0] - forced_exact(ts[1:])).abs().max().item())
        # an explicit method needs ~1e6 steps (h * LAM < ~3)
        assert sol.stats.n_accepted < 1000
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 5e-8, errs


@pytest.mark.parametrize("method", METHODS)
def test_l_stability_large_constant_steps(method):
    # h * LAM = 2.5e5: the transient is damped in one step (R(inf) = 0), and the solution
    # then follows y ~ cos t to the method's accuracy
    ts = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0], dtype=F64)
    sol = solve(forced, torch.tensor([0.0], dtype=F64), ts, method=method,
                options=dict(fixed(0.25), step_t=ts))
    assert sol.stats.n_accepted == 8
    err = (sol.ys[1:, 0] - forced_exact(ts[1:])).abs().max().item()
    assert err < 1e-4, err  # R(inf) = -1 (trapezoid) would leave an O(1) oscillation


# -- options, float32, statistics ------------------------------------------------------------

def test_jacobian_options_agree():
    # a batch of 3 Van der Pol oscillators (mu = 5) as a (3, 2) state
    mus = torch.tensor([[1.0], [5.0], [10.0]], dtype=F64)

    def f(t, y):
        x, v = y[:, :1], y[:, 1:]
        return torch.cat([v, mus * ((1 - x * x) * v - x)], 1)

    def user_jac(t, y):  # (B, m, m) blocks
        x, v = y[:, 0], y[:, 1]
        m = mus[:, 0]
        return torch.stack([torch.stack([torch.zeros_like(x), torch.ones_like(x)], -1),
                            torch.stack([m * (-2 * x * v - 1), m * (1 - x * x)], -1)], 1)

    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.5]], dtype=F64)
    ts = torch.tensor([0.0, 0.1, 0.2], dtype=F64)
    outs = {}
    for jac in ("autograd", "block", "matrix_free", user_jac):
        sol = solve(f, y0, ts, method="rodas5p", rtol=1e-7, atol=1e-7,
                    options={"jacobian": jac})
        outs[str(jac)[:12]] = sol.ys
        assert sol.stats.n_jac > 0 and sol.stats.n_lu >= sol.stats.n_accepted
    ref = outs["autograd"]
    for key, ys in outs.items():
        assert (ys - ref).abs().max().item() < 1e-5, key


@pytest.mark.parametrize("method", METHODS)
def test_float32(method):
    y0 = [1.0, 0.0, 0.0]
    ref = radau(robertson_np, y0, 10.0)
    sol = solve(robertson, torch.tensor(y0), torch.tensor([0.0, 10.0]), method=method,
                rtol=1e-5, atol=1e-9)
    assert sol.ys.dtype == torch.float32
    err = np.abs(sol.ys[-1].double().numpy() - ref) / np.array([1.0, 1e-4, 1.0])
    assert err.max() < 1e-4, err


def test_bad_jacobian_option():
    with pytest.raises(ODEInputError, match="option 'jacobian'"):
        odeint(vdp, torch.tensor([2.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               method="rodas4", options={"jacobian": "numeric"})


def test_matrix_free_cannot_be_backpropagated():
    y0 = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    with pytest.raises(ODEInputError, match="matrix_free"):
        odeint(vdp, y0, torch.tensor([0.0, 0.1], dtype=F64), method="rodas4",
               options={"jacobian": "matrix_free"})


def test_steps_at_min_step_end_despite_rounding():
    # t1 - t of a step of min_step can exceed min_step by rounding; such a step must be
    # accepted, not retried forever (a constant-step solve used to hang here)
    sol = solve(smooth, torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                method="rodas4", options=fixed(0.2))
    assert sol.stats.n_accepted == 5 and sol.stats.n_rejected == 0


def test_a_step_of_min_step_stretched_onto_a_stop_is_accepted():
    # 0.105 = min_step stretched by 5% onto the end: a rejection would propose the same
    # step again (this hung before); dopri5 as any adaptive method
    for method in ("dopri5", "rodas4"):
        sol = solve(smooth, torch.tensor([1.0, 0.5], dtype=F64),
                    torch.tensor([0.0, 0.105], dtype=F64), method=method, rtol=1e-13,
                    atol=1e-13, options={"first_step": 0.1, "min_step": 0.1})
        assert sol.stats.n_accepted == 1 and sol.stats.n_rejected == 0


def test_describe_names_the_orders():
    from neuralode.solvers import SOLVERS
    assert "order 5(4)" in SOLVERS["rodas5p"].describe()
    assert "dense output of order 3" in SOLVERS["rodas4"].describe()


# -- gradients of the discrete solution ------------------------------------------------------

def make_rhs(a):
    def f(t, y):
        return torch.tanh(y @ a.T) * (1 + 0.5 * torch.sin(3 * t)) - 20.0 * y
    return f


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("jacobian", ["autograd", "block"])
def test_gradcheck_y0_and_parameters(method, jacobian):
    # constant steps: the discrete solution is a smooth function of y0 and a
    y0 = torch.tensor([[0.5, -0.3]], dtype=F64, requires_grad=True)
    a = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.5], dtype=F64)

    def fn(y0_, a_):
        return odeint(make_rhs(a_), y0_, t, method=method,
                      options=dict(fixed(0.1), jacobian=jacobian))

    assert gradcheck(fn, (y0, a))


def test_gradient_against_finite_differences_of_robertson_rates():
    # d y2(T) / d k for the three rate constants, constant steps from a point near the
    # slow manifold (the discrete solution is a smooth function of k), against central
    # differences
    def run(k):
        def f(t, y):
            y1, y2, y3 = y.unbind(-1)
            return torch.stack([-k[0] * y1 + k[1] * y2 * y3,
                                k[0] * y1 - k[1] * y2 * y3 - k[2] * y2 * y2, k[2] * y2 * y2])
        return odeint(f, torch.tensor([0.9649, 3.4e-5, 0.035], dtype=F64),
                      torch.tensor([0.0, 0.5], dtype=F64), method="rodas5p",
                      options=fixed(0.05))[-1, 1]

    k = torch.tensor([0.04, 1e4, 3e7], dtype=F64, requires_grad=True)
    g = torch.autograd.grad(run(k), k)[0]
    for i in range(3):
        e = torch.zeros(3, dtype=F64)
        e[i] = 1e-6 * k[i].item()
        with torch.no_grad():
            fd = (run(k + e) - run(k - e)) / (2 * e[i])
        assert abs(g[i].item() - fd.item()) <= 1e-7 * abs(fd.item()), (i, g, fd)


# -- odeint_adjoint --------------------------------------------------------------------------

class Damped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=F64))

    def forward(self, t, y):
        return torch.tanh(y @ self.a.T) + 0.1 * torch.sin(t)


def test_adjoint_with_a_rosenbrock_forward_matches_backprop():
    from neuralode.solvers import SOLVERS
    ts = torch.tensor([0.0, 0.5, 1.5], dtype=F64)
    grads = []
    for adjoint in (True, False):
        m = Damped()
        y0 = torch.tensor([0.5, -0.3], dtype=F64, requires_grad=True)
        if adjoint:
            ys, stats = odeint_adjoint(m, y0, ts, method="rodas5p", rtol=1e-10, atol=1e-10,
                                       return_stats=True)
        else:
            ys = odeint(m, y0, ts, method="rodas5p", rtol=1e-10, atol=1e-10)
        ys.square().sum().backward()
        grads.append((y0.grad, m.a.grad))
    # the backward solve runs the method the Rosenbrock class names (an ESDIRK when
    # registered): a Rosenbrock stage needs the backward system's exact Jacobian
    preferred = next(m for m in SOLVERS["rodas5p"].adjoint_method if m in SOLVERS)
    assert stats.backward.method == preferred
    assert (grads[0][0] - grads[1][0]).abs().max() < 1e-7
    assert (grads[0][1] - grads[1][1]).abs().max() < 1e-7


def test_rosenbrock_as_the_adjoint_backward_method_is_refused():
    y0 = torch.tensor([0.5, -0.3], dtype=F64, requires_grad=True)
    with pytest.raises(ODEInputError, match="cannot run odeint_adjoint's backward solve"):
        odeint_adjoint(Damped(), y0, torch.tensor([0.0, 1.0], dtype=F64), method="dopri5",
                       adjoint_method="rodas4")
