"""The variable-step, variable-order multistep methods ``adams`` (Adams–Moulton PECE, orders
1-12) and ``bdf`` (orders 1-5, Newton): accuracy against closed forms and scipy's Radau at
rtol 1e-12, order selection, Jacobian/LU reuse, stiff stability, events and outputs between
steps, restarts at discontinuities, and gradients of the discrete solution."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from torch.autograd import gradcheck

from neuralode import odeint, solve
from neuralode.errors import ODEInputError, StepSizeError
from neuralode.problems import VanDerPol
from neuralode.solvers import SOLVERS
from neuralode.solvers.bdf import BDF
from neuralode.solvers.multistep import Adams, MultistepController, order_data

F64 = torch.float64


# -- problems -------------------------------------------------------------------------------

def oscillator(t, y):
    return torch.stack([y[..., 1], -y[..., 0]], -1)


def oscillator_exact(ts):
    return torch.stack([torch.cos(ts), -torch.sin(ts)], -1)


def kepler(t, u):
    x, y, vx, vy = u.unbind(-1)
    r3 = (x * x + y * y) ** 1.5
    return torch.stack([vx, vy, -x / r3, -y / r3], dim=-1)


def kepler_exact(ts: np.ndarray, e: float) -> np.ndarray:
    """Orbit with semi-major axis 1 from pericentre (Kepler's equation by Newton)."""
    m = np.asarray(ts, dtype=np.float64)
    E = np.full_like(m, math.pi)
    for _ in range(60):
        E = E - (E - e * np.sin(E) - m) / (1.0 - e * np.cos(E))
    b = math.sqrt(1.0 - e * e)
    r = 1.0 - e * np.cos(E)
    return np.stack([np.cos(E) - e, b * np.sin(E), -np.sin(E) / r, b * np.cos(E) / r], -1)


def robertson(t, y):
    a, b, c = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([-0.04 * a + 1e4 * b * c, 0.04 * a - 1e4 * b * c - 3e7 * b * b,
                        3e7 * b * b], -1)


def robertson_np(t, y):
    a, b, c = y
    return [-0.04 * a + 1e4 * b * c, 0.04 * a - 1e4 * b * c - 3e7 * b * b, 3e7 * b * b]


MU = 1000.0


def vdp(t, y):
    return torch.stack([y[..., 1], MU * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)


def vdp_np(t, y):
    return [y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]]


def radau_reference(f_np, y0, ts):
    sol = solve_ivp(f_np, (ts[0], ts[-1]), y0, method="Radau", rtol=1e-12, atol=1e-14,
                    t_eval=ts)
    assert sol.success
    return sol.y.T


def max_err(a, b) -> float:
    def arr(v):
        return v.detach().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return float(np.abs(arr(a) - arr(b)).max())


# -- the coefficients ----------------------------------------------------------------------------

@pytest.mark.parametrize("family,q", [("bdf", q) for q in range(1, 6)]
                         + [("adams", q) for q in range(1, 13)])
def test_corrector_is_exact_for_polynomials_of_the_order(family, q):
    """One constant step from the Nordsieck array of y = t^q on y' = q t^(q-1) (a
    polynomial the order-q formula integrates exactly) lands on the exact value."""
    d = order_data(family, q)
    z = np.array([float(math.comb(q, j)) * (-1.0) ** (q - j) for j in range(q + 1)])  # (s-1)^q
    zp = np.array(d["A"]) @ z  # about s = 0: s^q (t_n+1 = 0, h = 1)
    e = (q * 0.0 ** (q - 1) if q > 1 else 1.0) - zp[1]
    y1 = zp[0] + d["l"][0] * e
    assert abs(y1 - 0.0) < 1e-12
    assert abs(e) < 1e-12


def test_error_constants_are_the_textbook_ones():
    # Adams–Moulton orders 1-4 (q points): 1/2, 1/12, 1/24, 19/720; BDF: 1/(q+1) (its
    # truncation error 2/9 for BDF2 over gamma = 2/3: what a step adds to the global error)
    for q, c in zip(range(1, 5), [Fraction(1, 2), Fraction(1, 12), Fraction(1, 24),
                                  Fraction(19, 720)]):
        assert order_data("adams", q)["C"] == pytest.approx(float(c))
    assert order_data("bdf", 2)["C"] == pytest.approx(1 / 3)
    assert order_data("bdf", 2)["l"][0] == pytest.approx(2 / 3)  # gamma of BDF2


@pytest.mark.parametrize("method,q", [("bdf", q) for q in range(1, 6)]
                         + [("adams", q) for q in (1, 2, 3, 4, 5, 8)])
def test_local_error_estimate_matches_the_error_each_step_adds(method, q, monkeypatch):
    """y' = exp(t) at a fixed order and step: f does not depend on y, so each step adds
    its local error to the global error; the estimate must match that increment."""
    log = []

    class FixedOrder(MultistepController):
        def judge(self, y1, rec, h, direction):
            log.append(float(rec.err[0]))
            if rec.q < q and rec.held >= rec.q + 1:
                rec.next_order = rec.q + 1
            return True, h

    monkeypatch.setattr(SOLVERS[method], "make_controller",
                        classmethod(lambda cls, o, norm: FixedOrder(norm, o["_ms_settings"])))
    h, n = (0.02, 150) if q <= 5 else (0.1, 60)  # order 8: an error above round-off
    ts = torch.arange(n + 1, dtype=F64) * h
    sol = solve(lambda t, y: torch.exp(t) * torch.ones_like(y),
                torch.tensor([1.0], dtype=F64), ts, method=method, options={"first_step": h})
    g = sol.ys[:, 0] - torch.exp(ts)
    added = (g[1:] - g[:-1])[-10:]
    est = torch.tensor(log[-10:], dtype=F64)
    ratio = est / added
    # measured 0.993-0.997 (bdf), 0.985-0.997 (adams to 5), 0.92 (adams 8, h = 0.1)
    assert float(ratio.min()) > 0.9 and float(ratio.max()) < 1.1, ratio


# -- adams ------------------------------------------------------------------------------------

def test_registry_has_both_methods():
    assert SOLVERS["adams"] is Adams and SOLVERS["bdf"] is BDF


@pytest.mark.parametrize("method", ["adams", "bdf"])
def test_oscillator_error_falls_with_tolerance_at_step_ends_and_between(method):
    ts = torch.linspace(0, 10, 101, dtype=F64)  # outputs between steps (interpolant)
    errs = []
    for tol in (1e-5, 1e-7, 1e-9):
        ys = odeint(oscillator, torch.tensor([1.0, 0.0], dtype=F64), ts, rtol=tol, atol=tol,
                    method=method)
        errs.append(max_err(ys, oscillator_exact(ts)))
    # measured adams 6.8e-4, 3.5e-6, 5.5e-8; bdf 6.4e-4, 1.8e-5, 3.6e-7
    assert errs[0] < 300 * 1e-5 and errs[2] < 1000 * 1e-9
    assert errs[1] < errs[0] / 10 and errs[2] < errs[1] / 10


def test_adams_kepler_matches_closed_form_and_uses_high_orders():
    ts = np.linspace(0, 2 * math.pi, 41)
    exact = kepler_exact(ts, 0.6)
    errs = []
    for tol in (1e-6, 1e-8, 1e-10):
        sol = solve(kepler, torch.tensor(exact[0]), torch.tensor(ts), rtol=tol, atol=tol,
                    method="adams")
        errs.append(max_err(sol.ys, exact))
        orders = sol.stats.extra["orders_used"]
    # measured 1.5e-3, 2.3e-5, 6.8e-8 (the pericentre amplifies a phase error, as for dopri5)
    assert errs[1] < errs[0] / 10 and errs[2] < errs[1] / 10
    assert errs[2] < 1e-6
    assert max(orders) >= 10  # orders used at rtol 1e-10: 1..12
    assert sum(orders.values()) == sol.stats.n_accepted


def test_adams_needs_fewer_evaluations_than_dopri5_at_tight_tolerance():
    """On Kepler (e = 0.6) adams at rtol 1e-11 has a smaller error than dopri5 at rtol
    1e-10 with fewer evaluations (measured: 602 vs 1130; at equal rtol 1e-10: 423 vs 1130
    evaluations, errors 6.8e-8 vs 6.1e-8)."""
    ts = np.linspace(0, 2 * math.pi, 41)
    exact = kepler_exact(ts, 0.6)
    y0, tt = torch.tensor(exact[0]), torch.tensor(ts)
    d = solve(kepler, y0, tt, rtol=1e-10, atol=1e-10, method="dopri5")
    a = solve(kepler, y0, tt, rtol=1e-11, atol=1e-11, method="adams")
    assert max_err(a.ys, exact) < max_err(d.ys, exact)
    assert a.stats.nfe < 0.7 * d.stats.nfe  # measured 602 vs 1130


def test_adams_lotka_volterra_matches_scipy():
    def lv(t, u):
        x, y = u.unbind(-1)
        return torch.stack([1.5 * x - x * y, -3 * y + x * y], -1)
    ts = np.linspace(0, 10, 21)
    ref = solve_ivp(lambda t, u: [1.5 * u[0] - u[0] * u[1], -3 * u[1] + u[0] * u[1]],
                    (0, 10), [1.0, 1.0], method="DOP853", rtol=1e-13, atol=1e-13,
                    t_eval=ts).y.T
    ys = odeint(lv, torch.tensor([1.0, 1.0], dtype=F64), torch.tensor(ts), rtol=1e-10,
                atol=1e-10, method="adams")
    assert max_err(ys, ref) < 1e-6  # measured 4.5e-8


def test_adams_max_order_is_respected_and_checked():
    sol = solve(oscillator, torch.tensor([1.0, 0.0], dtype=F64),
                torch.linspace(0, 5, 3, dtype=F64), rtol=1e-10, atol=1e-10, method="adams",
                options={"max_order": 4})
    assert max(sol.stats.extra["orders_used"]) == 4
    with pytest.raises(ODEInputError, match="max_order"):
        odeint(oscillator, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]),
               method="adams", options={"max_order": 13})
    with pytest.raises(ODEInputError, match="max_order"):
        odeint(oscillator, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]),
               method="bdf", options={"max_order": 6})


def test_adams_takes_the_adaptive_options():
    y0, ts = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 3.0], dtype=F64)
    seen = []

    def f(t, y):
        seen.append(float(t))
        return oscillator(t, y)
    sol = solve(f, y0, ts, rtol=1e-8, atol=1e-8, method="adams",
                options={"max_step": 0.05, "first_step": 1e-3, "step_t": [1.234],
                         "max_num_steps": 10_000, "norm": lambda e: e.abs().max()})
    assert 1.234 in seen  # step_t: a step ends there (f(t1, y1) evaluated)
    assert seen[1] == pytest.approx(1e-3)  # the first step's predictor evaluation
    steps = sorted(set(seen))
    assert max(b - a for a, b in itertools.pairwise(steps)) <= 0.05 + 1e-12
    assert max_err(sol.ys[-1], oscillator_exact(ts)[-1]) < 1e-6
    with pytest.raises(Exception, match="max_num_steps"):
        odeint(oscillator, y0, ts, method="adams", options={"max_num_steps": 5})


@pytest.mark.parametrize("method", ["adams", "bdf"])
def test_event_is_located_on_the_interpolant(method):
    sol = solve(oscillator, torch.tensor([1.0, 0.0], dtype=F64),
                torch.tensor([0.0, 10.0], dtype=F64), rtol=1e-9, atol=1e-9, method=method,
                event_fn=lambda t, y: y[0])
    assert abs(float(sol.event_t) - math.pi / 2) < 1e-6


@pytest.mark.parametrize("method", ["adams", "bdf"])
def test_jump_t_restarts_the_history_at_order_one(method):
    """f jumps at t = 1: with jump_t the solve restarts there and stays accurate."""
    def f(t, y):
        return torch.where(t < 1.0, -y, -3.0 * y)
    ts = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    sol = solve(f, torch.tensor([1.0], dtype=F64), ts, rtol=1e-8, atol=1e-10, method=method,
                options={"jump_t": [1.0]})
    exact = math.exp(-1.0) * math.exp(-3.0)
    assert abs(float(sol.ys[-1, 0]) - exact) < 1e-6
    assert sol.stats.extra["orders_used"][1] >= 2  # order 1 at the start and after the jump


@pytest.mark.parametrize("method,tol,bound", [("adams", 1e-5, 2e-3), ("bdf", 1e-5, 3e-3)])
def test_float32_state(method, tol, bound):
    ts = torch.linspace(0, 10, 21)
    ys = odeint(oscillator, torch.tensor([1.0, 0.0]), ts, rtol=tol, atol=tol, method=method)
    assert ys.dtype == torch.float32
    assert max_err(ys, oscillator_exact(ts.double())) < bound  # measured 4.8e-4 / 5.5e-4


# -- bdf --------------------------------------------------------------------------------------

ROBERTSON_TS = np.array([0.0, 0.4, 4.0, 40.0])
VDP_TS = np.array([0.0, 1e-3, 3e-3, 1e-2, 0.1, 1.0, 3.0])  # the initial layer, then slow


@pytest.mark.parametrize("name", ["robertson", "vdp"])
def test_bdf_error_falls_with_tolerance_against_radau(name):
    """Measured (max error over outputs and components) for rtol 1e-4, 1e-6, 1e-8:
    Robertson (atol = rtol / 100) 6.9e-5, 2.2e-6, 4.8e-8; Van der Pol mu = 1000
    (atol = rtol) 5.5e-6, 6.6e-7, 3.0e-8. LU factorisations 0.2-0.6 per step (0.41 over
    Robertson's three solves), Jacobians 0.01-0.07 per step (both reused across steps)."""
    f, f_np, y0, ts, atol = ((robertson, robertson_np, [1.0, 0.0, 0.0], ROBERTSON_TS, 1e-2)
                             if name == "robertson" else
                             (vdp, vdp_np, [2.0, 0.0], VDP_TS, 1.0))
    ref = radau_reference(f_np, y0, ts)
    errs, n_lu, n_jac, n_steps = [], 0, 0, 0
    for tol in (1e-4, 1e-6, 1e-8):
        sol = solve(f, torch.tensor(y0, dtype=F64), torch.tensor(ts), rtol=tol,
                    atol=tol * atol, method="bdf")
        errs.append(max_err(sol.ys, ref))
        assert errs[-1] < 100 * tol
        assert max(sol.stats.extra["orders_used"]) > 1
        n_lu, n_jac, n_steps = (n_lu + sol.stats.n_lu, n_jac + sol.stats.n_jac,
                                n_steps + sol.stats.n_steps)
    assert errs[1] < errs[0] and errs[2] < errs[1] / 10
    assert n_lu < 0.5 * n_steps  # LU reuse across steps
    assert n_jac < 0.1 * n_steps  # Jacobian reuse


def test_bdf_takes_large_steps_on_a_very_stiff_linear_problem():
    """y' = -1e6 (y - cos t): explicit methods need h < 2e-6; BDF's steps follow cos t."""
    def f(t, y):
        return -1e6 * (y - torch.cos(t))
    ts = torch.linspace(0, 10, 11, dtype=F64)
    sol = solve(f, torch.tensor([0.0], dtype=F64), ts, rtol=1e-6, atol=1e-6, method="bdf")
    exact = (1e12 * torch.cos(ts) + 1e6 * torch.sin(ts)) / (1e12 + 1)
    assert max_err(sol.ys[1:, 0], exact[1:]) < 1e-5  # measured 2.4e-7
    assert sol.stats.n_steps < 400  # measured 233 (h up to ~0.1 = 5e4 times the limit)


def test_bdf_jacobian_options_agree():
    y0 = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.0, 0.1]], dtype=F64)
    ts = torch.tensor([0.0, 1.0, 10.0], dtype=F64)

    def user_jacobian(t, y):
        blocks = []
        for a, b, c in y:
            blocks.append(torch.stack([
                torch.stack([-0.04 + 0 * a, 1e4 * c, 1e4 * b]),
                torch.stack([0.04 + 0 * a, -1e4 * c - 6e7 * b, -1e4 * b]),
                torch.stack([0 * a, 6e7 * b, 0 * a])]))
        return torch.stack(blocks)  # (B, 3, 3) diagonal blocks

    out = {}
    for jac in ("autograd", "block", user_jacobian):
        sol = solve(robertson, y0, ts, rtol=1e-6, atol=1e-10, method="bdf",
                    options={"jacobian": jac})
        out[jac if isinstance(jac, str) else "user"] = sol.ys
    assert torch.equal(out["autograd"], out["block"])
    assert max_err(out["user"], out["autograd"]) < 1e-12


def test_bdf_float32_van_der_pol_does_not_stall():
    """A float32 state at rtol 1e-4 on Van der Pol (mu = 1000): Newton's second correction
    (bdf asks for two) is rounding noise, a rate near 1; below the rounding floor 2 eps /
    rtol it converges instead of failing (which halved the step to underflow).
    Measured 657 accepted / 101 rejected steps, error 128x the tolerance (float64: 0.7x
    scipy's BDF)."""
    p = VanDerPol()
    ts = torch.linspace(*p.t_span, 11)
    sol = solve(p, p.y0.float(), ts, rtol=1e-4, atol=1e-4, method="bdf",
                options={"jacobian": p.jacobian})
    assert sol.ys.dtype == torch.float32 and bool(torch.isfinite(sol.ys).all())
    assert sol.stats.n_accepted + sol.stats.n_rejected < 1500
    ref = p.reference(ts.double())
    assert float(((sol.ys.double() - ref).abs() / (1e-4 + 1e-4 * ref.abs())).max()) < 500


def test_bdf_newton_failure_is_reported():
    """A wrong user Jacobian (zero) makes Newton diverge on a stiff problem at every step
    size above min_step: the solve stops with a message naming Newton's failure."""
    with pytest.raises(StepSizeError, match="Newton"):
        odeint(lambda t, y: -1e6 * y, torch.tensor([1.0], dtype=F64),
               torch.tensor([0.0, 1.0], dtype=F64), method="bdf",
               options={"jacobian": lambda t, y: torch.zeros(1, 1, dtype=F64),
                        "min_step": 1e-4, "first_step": 1e-2})


# -- gradients ----------------------------------------------------------------------------------


class ReplayController:
    """The real controller on the first solve; later solves replay its decisions (steps,
    acceptances, orders), so that the solve is one fixed discrete map of the inputs and
    finite differences (gradcheck) see exactly what backpropagation differentiates."""

    adaptive = True
    nonfinite = False
    absy = None

    def __init__(self, real):
        self.real = real  # the method's own make_controller
        self.log = None

    def make(self, cls, o, norm):
        if self.log is None:
            self.inner = self.real(o, norm)
            self.log, self.recording = [], True
        else:
            self.recording, self.i = False, 0
        return self

    def first_step(self, *args):
        if self.recording:
            self.h0 = self.inner.first_step(*args)
        return self.h0

    def propose(self, t, h, stop, direction):
        return self.inner.propose(t, h, stop, direction)

    def judge(self, y1, rec, h, direction):
        if self.recording:
            out = self.inner.judge(y1, rec, h, direction)
            self.log.append((out, rec.next_order))
            return out
        out, rec.next_order = self.log[self.i]
        self.i += 1
        return out

    def shrink(self, h, factor, direction):
        raise AssertionError("no Newton failure expected in these problems")


def nonlinear(a):
    def func(t, y):
        return torch.tanh(y @ a.T) + 0.1 * torch.sin(t)
    return func


def grad_inputs():
    y0 = torch.tensor([0.5, -0.3], dtype=F64, requires_grad=True)
    a = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=F64, requires_grad=True)
    return y0, a


@pytest.mark.parametrize("method", ["adams", "bdf"])
def test_gradient_of_the_discrete_solution_is_exact(method, monkeypatch):
    """Backpropagation gives the derivative of the computed solution: with the step
    sequence held fixed, gradcheck (finite differences) agrees at its default tolerances.
    adams: the PECE arithmetic is differentiated as computed (both evaluations of f);
    bdf: the corrector's solution by the implicit function theorem."""
    replay = ReplayController(SOLVERS[method].make_controller)
    monkeypatch.setattr(SOLVERS[method], "make_controller", classmethod(replay.make))
    y0, a = grad_inputs()
    t = torch.tensor([0.0, 0.7, 2.0], dtype=F64)
    stats = {}

    def fn(y0_, a_):
        sol = solve(nonlinear(a_), y0_, t, rtol=1e-5, atol=1e-5, method=method)
        stats.update(sol.stats.extra["orders_used"])
        return sol.ys

    assert gradcheck(fn, (y0, a))
    assert max(stats) >= 3  # the replayed solve changes order


@pytest.mark.parametrize("method,tol,bound,jacobian", [
    ("adams", 1e-10, 1e-7, None), ("bdf", 1e-9, 1e-6, "autograd"),
    ("bdf", 1e-9, 1e-6, "block"), ("bdf", 1e-9, 1e-6, "matrix_free")])
def test_gradient_wrt_y0_of_a_linear_ode_is_the_matrix_exponential(method, tol, bound,
                                                                     jacobian):
    """With the ordinary (adaptive) controller the order and step decisions are discrete
    (finite differences of a whole solve jump where they flip), so the gradient is checked
    against the exact flow derivative instead: d y(T) / d y0 = exp(A T). Two independent
    copies of the system (a (2, 2) state: 'block' applies); bdf's implicit-function step
    through an LU, batched LUs, or GMRES with the transposed operator (matrix_free)."""
    A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=F64)
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.2]], dtype=F64, requires_grad=True)
    yT = odeint(lambda t, y: y @ A.T, y0, torch.tensor([0.0, 3.0], dtype=F64), rtol=tol,
                atol=tol, method=method,
                options=None if jacobian is None else {"jacobian": jacobian})[-1]
    jac = torch.stack([torch.autograd.grad(yT[0, i], y0, retain_graph=True)[0][0]
                       for i in range(2)])
    assert max_err(jac, torch.linalg.matrix_exp(3.0 * A)) < bound


def test_bdf_gradient_on_a_stiff_problem_matches_the_closed_form():
    """y' = -k (y - cos t), k = 1e4: d y(1) / d k against the exact derivative of the
    exact solution (the discrete solution's gradient converges to it with the tolerance)."""
    k = torch.tensor(1e4, dtype=F64, requires_grad=True)
    y1 = odeint(lambda t, y: -k * (y - torch.cos(t)), torch.tensor([1.0], dtype=F64),
                torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-9, atol=1e-11, method="bdf")[-1, 0]
    (g,) = torch.autograd.grad(y1, k)

    def exact(kk):  # y(1) for y(0) = 1: particular solution plus decayed transient
        kk = float(kk)
        c = kk * kk / (kk * kk + 1)
        part = c * math.cos(1.0) + c / kk * math.sin(1.0)
        return part + (1 - c) * math.exp(-kk)

    fd = (exact(1e4 * (1 + 1e-6)) - exact(1e4 * (1 - 1e-6))) / (2e-2)
    assert abs(float(y1.detach()) - exact(1e4)) < 1e-8
    assert abs(float(g) - fd) < 1e-3 * abs(fd)


def test_bdf_quadrature_tail_is_integrated_explicitly():
    """A right-hand side may declare (``implicit_jacobian``, as odeint_adjoint's augmented
    system does) that only the first components need Newton; the rest are quadratures.
    The result agrees with solving everything implicitly, gradients included."""
    from neuralode.solvers.jacobian import JacobianSource

    k = torch.tensor(50.0, dtype=F64, requires_grad=True)

    def f(t, u):  # u = (y, integral of y^2): f does not depend on the integral
        return torch.stack([-k * (u[0] - torch.cos(t)), u[0] ** 2])

    class WithHead:
        def __call__(self, t, u):
            return f(t, u)

        def implicit_jacobian(self, spec, rhs, name):
            return JacobianSource(spec, rhs, 2, head=1, name=name), 1

    ts = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    u0 = torch.tensor([1.0, 0.0], dtype=F64)
    full = solve(f, u0, ts, rtol=1e-8, atol=1e-10, method="bdf")
    part = solve(WithHead(), u0, ts, rtol=1e-8, atol=1e-10, method="bdf")
    assert max_err(part.ys, full.ys) < 3e-7  # both within the tolerance (measured 5.6e-8)
    (g_full,) = torch.autograd.grad(full.ys[-1, 1], k)
    (g_part,) = torch.autograd.grad(part.ys[-1, 1], k)
    assert abs(float(g_part) - float(g_full)) < 1e-5 * abs(float(g_full))


@pytest.mark.parametrize("method", ["adams", "bdf"])
def test_a_first_step_that_leaves_the_domain_of_f_is_retried_smaller(method):
    """y' = -sqrt(y), y = (1 - t/2)^2: a first step of 1.8 predicts y < 0, where f (and
    bdf's Jacobian) is nan; the attempt is rejected and retried with a smaller step."""
    sol = solve(lambda t, y: -torch.sqrt(y), torch.tensor([1.0], dtype=F64),
                torch.tensor([0.0, 1.9], dtype=F64), rtol=1e-8, atol=1e-10, method=method,
                options={"first_step": 1.8})
    assert sol.stats.n_rejected >= 1
    assert abs(float(sol.ys[-1, 0]) - 0.05 ** 2) < 1e-7  # measured 8.4e-10 / 2.6e-9


@pytest.mark.parametrize("method", ["adams", "bdf"])
def test_backward_in_time(method):
    ts = torch.tensor([0.0, -1.0, -2.5], dtype=F64)
    ys = odeint(oscillator, torch.tensor([1.0, 0.0], dtype=F64), ts, rtol=1e-9, atol=1e-9,
                method=method)
    assert max_err(ys, oscillator_exact(ts)) < 1e-6


def test_bdf_adjoint_matches_finite_differences_on_robertson():
    """odeint_adjoint with bdf: the backward (stiff) system is solved by bdf with Newton on
    the (state, adjoint) head (the backward system's Jacobian from
    ``neuralode.gradients.adjoint_jacobian``) and the parameter adjoint as a quadrature. (Measured
    also with options={"jacobian": "matrix_free"}: passes, 20 s.)"""
    from neuralode import odeint_adjoint

    class Robertson(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logk = torch.nn.Parameter(torch.log(torch.tensor([0.04, 3e7, 1e4], dtype=F64)))

        def forward(self, t, y):
            k1, k2, k3 = self.logk.exp()
            a, b, c = y[..., 0], y[..., 1], y[..., 2]
            return torch.stack([-k1 * a + k3 * b * c, k1 * a - k3 * b * c - k2 * b * b,
                                k2 * b * b], -1)

    T = 3e-3
    w = np.array([[1.0, 1e4, 2.0], [0.5, 3e4, -1.0]])

    def loss_scipy(y0, logk):
        k = np.exp(logk)

        def rhs(t, y):
            a, b, c = y
            return [-k[0] * a + k[2] * b * c, k[0] * a - k[2] * b * c - k[1] * b * b,
                    k[1] * b * b]
        sol = solve_ivp(rhs, (0, T), y0, method="Radau", rtol=1e-11, atol=1e-15,
                        t_eval=[T / 3, T])
        return float((sol.y.T * w).sum())

    f = Robertson()
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64, requires_grad=True)
    ys = odeint_adjoint(f, y0, torch.tensor([0.0, T / 3, T], dtype=F64), rtol=1e-8,
                        atol=1e-12, method="bdf")
    gy, gk = torch.autograd.grad((ys[1:] * torch.tensor(w)).sum(), (y0, f.logk))
    rng = np.random.default_rng(0)
    vy, vk = rng.random(3) * [1.0, 1e-4, 1.0], rng.standard_normal(3)
    y0n, lk = np.array([1.0, 0.0, 0.0]), f.logk.detach().numpy()
    fd_y = (loss_scipy(y0n + 1e-7 * vy, lk) - loss_scipy(y0n - 1e-7 * vy, lk)) / 2e-7
    fd_k = (loss_scipy(y0n, lk + 1e-5 * vk) - loss_scipy(y0n, lk - 1e-5 * vk)) / 2e-5
    assert abs(float(gy.numpy() @ vy) - fd_y) < 1e-4 * abs(fd_y)
    assert abs(float(gk.numpy() @ vk) - fd_k) < 1e-4 * abs(fd_k)


def test_adams_adjoint_gradient_is_the_matrix_exponential():
    from neuralode import odeint_adjoint

    A = torch.nn.Parameter(torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=F64))
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    yT = odeint_adjoint(lambda t, y: y @ A.T, y0, torch.tensor([0.0, 3.0], dtype=F64),
                        rtol=1e-10, atol=1e-10, method="adams", adjoint_params=(A,))[-1]
    (g,) = torch.autograd.grad(yT.sum(), y0)
    assert max_err(g, torch.linalg.matrix_exp(3.0 * A.detach()).sum(0)) < 1e-8  # 1.2e-11
