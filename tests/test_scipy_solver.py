"""scipy_solver: scipy's solve_ivp solvers on the integration loop, forward only."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from neuralode import ODEInputError, odeint, odeint_adjoint, solve
from neuralode.solvers.scipy_solver import SCIPY_SOLVERS, ScipyGradientError

F64 = torch.float64
A = torch.tensor([[-0.1, -1.0], [1.0, -0.1]], dtype=F64)


def forced(t, y):
    return y @ A.T + torch.sin(t)


def forced_np(t, y):
    return y @ A.numpy().T + np.sin(t)


@pytest.mark.parametrize("solver", SCIPY_SOLVERS)
@pytest.mark.parametrize("reverse", [False, True])
def test_outputs_equal_scipy_called_directly(solver, reverse):
    ts = torch.linspace(0.0, 5.0, 7, dtype=F64)
    if reverse:
        ts = ts.flip(0)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    sol = solve(forced, y0, ts, method="scipy_solver", options={"solver": solver},
                rtol=1e-8, atol=1e-10)
    ref = solve_ivp(forced_np, (ts[0].item(), ts[-1].item()), y0.numpy(), method=solver,
                    t_eval=ts.numpy(), rtol=1e-8, atol=1e-10)
    # the same scipy steps, outputs from the same interpolants (LSODA's internal
    # interpolation differs from its dense output by rounding only)
    np.testing.assert_allclose(sol.ys.numpy(), ref.y.T, rtol=0, atol=1e-10)
    assert sol.stats.status == "success" and sol.stats.nfe >= ref.nfev - 5


def test_dtype_and_shape_of_the_users_state():
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float32)
    ys = odeint(lambda t, y: y @ A.T.float() + torch.sin(t), y0,
                torch.tensor([0.0, 1.0, 2.0]), method="scipy_solver", rtol=1e-6, atol=1e-8)
    assert ys.dtype == torch.float32 and ys.shape == (3, 1, 2)
    ref = solve_ivp(forced_np, (0, 2), [1.0, 0.5], t_eval=[0, 1, 2], rtol=1e-10, atol=1e-12)
    assert np.abs(ys[:, 0].double().numpy() - ref.y.T).max() < 1e-4


def test_stiff_robertson_with_autograd_jacobian_matches_radau():
    def rob(t, y):
        return torch.stack([-0.04 * y[0] + 1e4 * y[1] * y[2],
                            0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2,
                            3e7 * y[1] ** 2])

    def rob_np(t, y):
        return [-0.04 * y[0] + 1e4 * y[1] * y[2],
                0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2, 3e7 * y[1] ** 2]

    ref = solve_ivp(rob_np, (0, 100), [1.0, 0, 0], method="Radau", rtol=1e-12, atol=1e-14)
    for solver in ("Radau", "BDF", "LSODA"):
        sol = solve(rob, torch.tensor([1.0, 0, 0], dtype=F64),
                    torch.tensor([0.0, 100.0], dtype=F64), method="scipy_solver",
                    options={"solver": solver, "jacobian": "autograd"}, rtol=1e-8, atol=1e-12)
        err = np.abs(sol.ys[-1].numpy() - ref.y[:, -1]) / np.array([1.0, 1e-4, 1.0])
        assert err.max() < 1e-5, (solver, err)
        assert sol.stats.n_jac > 0


def test_gradient_through_it_raises_a_clear_error():
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    ys = odeint(forced, y0, torch.tensor([0.0, 1.0], dtype=F64), method="scipy_solver")
    assert ys.requires_grad  # not silently detached
    with pytest.raises(ScipyGradientError, match=r"odeint_adjoint.*rodas5p"):
        ys.sum().backward()


def test_gradient_through_captured_parameters_raises_too():
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    ys = odeint(lambda t, y: -k * y, torch.tensor([1.0], dtype=F64),
                torch.tensor([0.0, 1.0], dtype=F64), method="scipy_solver")
    with pytest.raises(ScipyGradientError):
        torch.autograd.grad(ys[-1].sum(), k)


def test_no_graph_under_no_grad():
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    with torch.no_grad():
        ys = odeint(forced, y0, torch.tensor([0.0, 1.0], dtype=F64), method="scipy_solver")
    assert not ys.requires_grad


def test_adjoint_gradients_match_backprop():
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(A.clone())

        def forward(self, t, y):
            return y @ self.a.T + torch.sin(t)

    ts = torch.linspace(0.0, 3.0, 4, dtype=F64)
    grads = []
    for method, fn in (("scipy_solver", odeint_adjoint), ("dopri5", odeint)):
        m = Linear()
        y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
        fn(m, y0, ts, method=method, rtol=1e-10, atol=1e-12).square().sum().backward()
        grads.append((y0.grad, m.a.grad))
    assert (grads[0][0] - grads[1][0]).abs().max() < 1e-7
    assert (grads[0][1] - grads[1][1]).abs().max() < 1e-7


def test_event_time():
    t_ev, ys = odeint(lambda t, y: -y, torch.tensor([1.0], dtype=F64),
                      torch.tensor([0.0, 1.0], dtype=F64), event_fn=lambda t, y: y[0] - 0.5,
                      method="scipy_solver", rtol=1e-10, atol=1e-12)
    assert abs(t_ev.item() - math.log(2.0)) < 1e-8
    assert abs(ys[-1].item() - 0.5) < 1e-8


def test_jump_t_restarts_at_the_discontinuity():
    # y' = 1 before t = 1 and 0 after: y(2) = 1 exactly (up to tolerance) when the
    # solver lands on the jump and restarts
    def f(t, y):
        return torch.ones_like(y) if t < 1.0 else torch.zeros_like(y)

    ys = odeint(f, torch.tensor([0.0], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                method="scipy_solver", options={"solver": "RK45", "jump_t": [1.0]})
    assert abs(ys[-1].item() - 1.0) < 1e-9


@pytest.mark.parametrize("solver", ["LSODA", "RK45"])
def test_max_step_bounds_the_steps(solver):
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    ts = torch.tensor([0.0, 8.0], dtype=F64)
    free = solve(forced, y0, ts, method="scipy_solver", options={"solver": solver})
    bounded = solve(forced, y0, ts, method="scipy_solver",
                    options={"solver": solver, "max_step": 0.02})
    assert free.stats.n_accepted < 400 <= bounded.stats.n_accepted


def test_options_are_checked():
    with pytest.raises(ODEInputError, match=r"'solver'.*LSODA"):
        odeint(forced, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0]),
               method="scipy_solver", options={"solver": "Euler"})
    with pytest.warns(UserWarning, match="LSODA only"):
        odeint(forced, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0]),
               method="scipy_solver", options={"solver": "RK45", "min_step": 0.1})


def test_unknown_option_warns():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        odeint(forced, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0]),
               method="scipy_solver", options={"step_size": 0.1})
    assert any("does not use the option" in str(w.message) for w in rec)


@pytest.mark.parametrize("name,note", [("callback_step", "after scipy took it"),
                                       ("callback_accept_step", "after each scipy step"),
                                       ("callback_reject_step", "never called")])
def test_callbacks_warn_how_scipy_calls_them(name, note):
    calls = []

    class F(torch.nn.Module):
        def forward(self, t, y):
            return -y

    f = F()
    setattr(f, name, lambda t0, y0, dt: calls.append(float(t0)))
    with pytest.warns(UserWarning, match=note):
        sol = solve(f, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                    method="scipy_solver")
    if name == "callback_reject_step":
        assert calls == []
    else:
        assert len(calls) == sol.stats.n_accepted > 0
