"""Guards of stiff solves (issue 19): the explicit methods' stiffness test (a stiff problem
stops with a clear message, a non-stiff one, or a stiff but short solve, never does), and
the size check of dense Jacobians."""

from __future__ import annotations

import math
import time

import pytest
import torch

import neuralode
from neuralode.problems import Robertson
from neuralode.solvers import SOLVERS
from neuralode.solvers.stiffness import (
    CHECK_EVERY,
    real_stability_boundary,
    stiff_pair,
    stiffness_ratio,
)


def test_stability_boundaries_are_the_known_ones():
    # |R(-x)| <= 1 up to: Euler 2, classical RK4 2.7853, dopri5 3.3066 (Hairer-Wanner)
    assert real_stability_boundary(SOLVERS["euler"].tableau) == pytest.approx(2.0, abs=1e-6)
    assert real_stability_boundary(SOLVERS["rk4"].tableau) == pytest.approx(2.7853, abs=1e-3)
    assert real_stability_boundary(SOLVERS["dopri5"].tableau) == pytest.approx(3.3066,
                                                                               abs=1e-3)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_the_estimate_is_h_times_the_eigenvalue_on_linear_problems(method):
    tab = SOLVERS[method].tableau
    i, j, d = stiff_pair(tab)
    lam, h = -7.0, 0.3
    y = torch.tensor([1.0, -2.0], dtype=torch.float64)
    K = []
    for r in range(tab.stages):  # the stages of one step of y' = lam y
        yi = y + h * sum(float(tab.a[r, m]) * K[m] for m in range(r))
        K.append(lam * yi)
    ratio = stiffness_ratio(torch.stack(K), i, j, torch.tensor(d, dtype=torch.float64))
    assert ratio == pytest.approx(abs(lam) * h, rel=1e-10)


def test_dopri5_on_robertson_stops_with_a_clear_message():
    p = Robertson()
    t = torch.tensor([0.0, 1.0, 1e3, 1e5], dtype=torch.float64)
    start = time.time()
    with pytest.raises(neuralode.StiffnessError, match=r"stiff.*rodas5p.*kvaerno5.*bdf"):
        neuralode.odeint(p, p.y0, t, method="dopri5")
    assert time.time() - start < 10
    sol = neuralode.solve(p, p.y0, t, method="tsit5", throw=False)
    assert sol.status == "stiff" and not sol.success
    assert CHECK_EVERY <= sol.stats.n_accepted < 2 * CHECK_EVERY


def test_per_sample_stiff_rows_stop_alone():
    p = Robertson()
    y0 = torch.stack([p.y0, p.y0])
    t = torch.tensor([0.0, 1.0, 1e5], dtype=torch.float64)

    def f(t, y):  # sample 0: Robertson; sample 1: a slow linear decay (never stiff)
        return torch.stack([p(t[0], y[0]), -1e-5 * y[1]])
    sol = neuralode.solve(f, y0, t, per_sample=True, method="dopri5", throw=False,
                          options={"time_arg": "batch"})
    assert sol.stats.driver == "batched"
    assert sol.status == ["stiff", "success"]
    assert "stiff" in sol.message[0] and "rodas5p" in sol.message[0]
    assert torch.allclose(sol.ys[-1, 1], p.y0 * math.exp(-1.0), rtol=1e-6)
    with pytest.raises(neuralode.StiffnessError):
        neuralode.solve(f, y0, t, per_sample=True, method="dopri5")


def test_no_alarm_on_long_non_stiff_or_short_stiff_solves():
    # a harmonic oscillator over many periods: thousands of accuracy-limited steps
    t = torch.linspace(0, 300, 4, dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    sol = neuralode.solve(lambda t, y: torch.stack([y[1], -y[0]]), y0, t, rtol=1e-10,
                          atol=1e-12)
    assert sol.success and sol.stats.n_accepted > 2 * CHECK_EVERY
    assert abs(float(sol.ys[-1, 0]) - math.cos(300.0)) < 1e-7
    # Robertson on a short span: stiff, but the rest of the span is a few thousand steps
    p = Robertson()
    short = neuralode.solve(p, p.y0, torch.tensor([0.0, 5.0], dtype=torch.float64))
    assert short.success and short.stats.n_accepted > CHECK_EVERY


def test_the_test_can_be_turned_off_and_its_option_is_checked():
    p = Robertson()
    t = torch.tensor([0.0, 10.0], dtype=torch.float64)
    sol = neuralode.solve(p, p.y0, t, method="dopri5", options={"max_stiff_steps": 1000},
                          throw=False)
    assert sol.status == "stiff"
    off = neuralode.solve(p, p.y0, t, method="dopri5", options={"max_stiff_steps": None})
    assert off.success
    with pytest.raises(neuralode.ODEInputError, match="max_stiff_steps"):
        neuralode.solve(p, p.y0, t, method="dopri5", options={"max_stiff_steps": 0})
    with pytest.warns(UserWarning, match="max_stiff_steps"):  # the stiff methods have none
        neuralode.solve(p, p.y0, t, method="rodas5p", options={"max_stiff_steps": 10})


@pytest.mark.parametrize("method", ["bdf", "rodas5p", "kvaerno5", "implicit_euler"])
def test_a_dense_jacobian_too_large_is_refused_before_it_is_built(method):
    from neuralode.solvers.jacobian import DENSE_JACOBIAN_LIMIT_BYTES
    n = 200_000  # 298 GiB dense
    lam = torch.logspace(-1, 3, n, dtype=torch.float64)
    calls = []

    def f(t, y):
        calls.append(1)
        return -lam * y
    y0 = torch.ones(n, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    o = {"step_size": 0.1} if method == "implicit_euler" else None
    with pytest.raises(neuralode.ODEInputError, match=r"298 GiB.*matrix_free"):
        neuralode.odeint(f, y0, t, method=method, options=o)
    assert len(calls) <= 4  # refused at the first Jacobian, not after building it
    # the limit is the documented one, and a matrix-free solve of the same state works
    assert DENSE_JACOBIAN_LIMIT_BYTES == 2**30
    if method == "bdf":  # 20,000 elements: 3 GiB dense, refused; matrix-free it solves
        m = 20_000
        lam_m = torch.logspace(-1, 1, m, dtype=torch.float64)

        def g(t, y):
            return -lam_m * y
        y0m = torch.ones(m, dtype=torch.float64)
        with pytest.raises(neuralode.ODEInputError, match="GiB"):
            neuralode.odeint(g, y0m, t, method="bdf")
        ys = neuralode.odeint(g, y0m, t, method="bdf", rtol=1e-5, atol=1e-8,
                              options={"jacobian": "matrix_free"})
        assert torch.allclose(ys[-1], torch.exp(-lam_m), rtol=1e-3, atol=1e-6)


# -- the adjoint of the stiff methods reads y from the forward solution ---------------------


def _robertson_loss(p, solver, method, **kw):
    t = torch.tensor([0.0, 1.0, 10.0, 100.0, 1000.0], dtype=torch.float64)
    ys = solver(p, p.y0, t, method=method, **kw)
    return (ys[:, 0] + 1e4 * ys[:, 1]).sum()


def test_stiff_adjoints_match_finite_differences_on_robertson():
    from neuralode.gradients.adjoint import backsolve_unstable
    p = Robertson(log=True, learnable=True)
    tight = {"rtol": 1e-10, "atol": 1e-14}
    base = p.constants_param.detach().clone()
    fd = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            e = torch.zeros(3, dtype=torch.float64)
            e[i] = 1e-5
            p.constants_param.copy_(base + e)
            up = _robertson_loss(p, neuralode.odeint, "rodas5p", **tight)
            p.constants_param.copy_(base - e)
            down = _robertson_loss(p, neuralode.odeint, "rodas5p", **tight)
            fd[i] = (up - down) / 2e-5
        p.constants_param.copy_(base)
    for method in ("rodas4", "kvaerno5", "bdf"):
        assert backsolve_unstable(method)
        p.zero_grad()
        _robertson_loss(p, neuralode.odeint_adjoint, method, rtol=1e-6,
                        atol=1e-10).backward()
        err = float((p.constants_param.grad - fd).norm() / fd.norm())
        assert err < 1e-4, (method, err)
    assert not backsolve_unstable("dopri5") and not backsolve_unstable("scipy_solver")
    with pytest.raises(neuralode.ODEInputError, match="interpolated"):
        neuralode.odeint_adjoint(p, p.y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                                 interpolated="auto")
