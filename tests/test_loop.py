"""The one integration loop: events, dense solutions, callbacks, statuses, and the bugs the
rewrite fixed. Event times and gradients are checked against closed forms and finite
differences."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from neuralode import (
    EventError,
    MaxStepsError,
    NeuralODEError,
    NonFiniteError,
    ODEFuncError,
    ODEInputError,
    PIDController,
    StepSizeError,
    odeint,
    odeint_adjoint,
    odeint_dense,
    odeint_event,
    solve,
)
from neuralode.solvers import SOLVERS

F64, F32 = torch.float64, torch.float32
FIXED = [m for m, c in SOLVERS.items() if not c.adaptive]
ADAPTIVE = [m for m, c in SOLVERS.items() if c.adaptive]
LN2 = math.log(2.0)


def opts(method, step=0.01):
    """Fixed grids: the step; the stiff one-step methods: outputs interpolated (as every
    other method's), not step ends."""
    if not SOLVERS[method].adaptive:
        return {"step_size": step}
    return {"step_to_outputs": False} if "step_to_outputs" in SOLVERS[method].OPTIONS else None


class Decay(torch.nn.Module):
    """dy/dt = -k y with a learnable rate."""

    def __init__(self, k=1.0, dtype=F64):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=dtype))

    def forward(self, t, y):
        return -self.k * y


class Falling(torch.nn.Module):
    """A ball under gravity: state (height, velocity)."""

    def __init__(self, g=9.81, dtype=F64):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(g, dtype=dtype))

    def forward(self, t, y):
        return torch.stack([y[1], -self.g * torch.ones_like(y[1])])


# -- events: times against closed forms ----------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_event_time_of_decay_crossing_one_half_is_ln2(method, dtype):
    y0 = torch.tensor([1.0], dtype=dtype)
    t_ev, ys = odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64),
                      event_fn=lambda t, y: y[0] - 0.5, method=method, options=opts(method, 0.01),
                      rtol=1e-9 if dtype == F64 else 1e-6, atol=1e-10 if dtype == F64 else 1e-7)
    tol = {F32: 2e-5, F64: 1e-7}[dtype]
    if dtype == F32 and method in ("adaptive_heun", "fehlberg2", "bosh3"):
        tol = 1e-4  # low-order pairs at rtol 1e-6 in float32
    fixed_order = None if SOLVERS[method].adaptive else getattr(SOLVERS[method], "order", None)
    if fixed_order == 2:
        tol = 1e-4  # second order at step 0.01: the solution's error, not the root's
    if fixed_order == 1:
        tol = 5e-3
    assert ys.shape == (2, 1) and ys.dtype == dtype
    assert abs(t_ev.item() - LN2) < tol, (method, t_ev.item())
    assert abs(ys[-1].item() - 0.5) < tol
    assert torch.equal(ys[0], y0)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_event_time_backwards_in_time(dtype):
    # y(t) = 0.25 e^{-t} reaches 0.5 at t = -ln 2 going backwards from t = 0
    t_ev, ys = odeint(lambda t, y: -y, torch.tensor([0.25], dtype=dtype),
                      torch.tensor([0.0, -1.0], dtype=F64), event_fn=lambda t, y: y[0] - 0.5)
    assert abs(t_ev.item() + LN2) < (1e-5 if dtype == F32 else 1e-7)
    assert abs(ys[-1].item() - 0.5) < (1e-5 if dtype == F32 else 1e-7)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "rk4"])
def test_falling_ball_impact_time(method, dtype):
    h0, g = 10.0, 9.81
    t_ev, ys = odeint(Falling(g, dtype), torch.tensor([h0, 0.0], dtype=dtype),
                      torch.tensor([0.0, 1.0], dtype=F64), event_fn=lambda t, y: y[0],
                      method=method,
                      options=opts(method, 0.05))
    exact = math.sqrt(2 * h0 / g)
    assert abs(t_ev.item() - exact) < (1e-5 if dtype == F32 else 1e-9)
    assert abs(ys[-1, 1].item() + g * exact) < (1e-4 if dtype == F32 else 1e-8)


def test_event_root_is_located_to_adjacent_floats_on_the_interpolant():
    # a quadratic state is reproduced exactly by dopri5's interpolant: the event time is
    # exact to rounding although the steps are large
    t_ev, _ = odeint(lambda t, y: torch.stack([2 * t]).to(y) * torch.ones_like(y),
                     torch.tensor([0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                     event_fn=lambda t, y: y[0] - 2.0, rtol=1e-3, atol=1e-3)
    assert abs(t_ev.item() - math.sqrt(2.0)) < 4e-16


def test_event_on_a_tuple_state_with_a_zero_dim_element():
    t_ev, (x, v) = odeint(lambda t, s: (s[1][0], -torch.ones_like(s[1])),
                          (torch.tensor(1.0, dtype=F64), torch.tensor([0.0], dtype=F64)),
                          torch.tensor([0.0, 1.0], dtype=F64), event_fn=lambda t, s: s[0])
    assert x.shape == (2,) and v.shape == (2, 1)
    assert abs(t_ev.item() - math.sqrt(2.0)) < 1e-9


def test_vector_event_fires_on_the_first_component_to_cross():
    t_ev, _ = odeint(lambda t, y: torch.ones_like(y), torch.tensor([0.0], dtype=F64),
                     torch.tensor([0.0, 1.0]),
                     event_fn=lambda t, y: torch.stack([y[0] - 3.0, y[0] - 2.0]))
    assert abs(t_ev.item() - 2.0) < 1e-12


def test_event_that_never_happens_is_a_clear_error_in_bounded_time():
    with pytest.raises(EventError, match="never changed sign"):
        odeint(lambda t, y: -y, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0]),
               event_fn=lambda t, y: y[0] + 1.0, options={"max_num_steps": 500},
               method="dopri5")
    with pytest.raises(EventError, match="never changed sign"):
        odeint(lambda t, y: -y, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0]),
               event_fn=lambda t, y: y[0] + 1.0, method="rk4",
               options={"step_size": 0.1, "max_num_steps": 200})


def test_solve_with_an_event_in_the_span_stops_there_and_one_outside_does_not():
    t = torch.linspace(0, 2, 21, dtype=F64)
    sol = solve(lambda t, y: -y, torch.tensor([1.0], dtype=F64), t,
                event_fn=lambda t, y: y[0] - 0.5)
    assert sol.status == "event" and abs(sol.event_t.item() - LN2) < 1e-7
    n_before = int((t <= LN2).sum())
    assert sol.ys.shape == (n_before, 1)
    torch.testing.assert_close(sol.ys[:, 0], torch.exp(-t[:n_before]), rtol=1e-6, atol=1e-8)
    sol = solve(lambda t, y: -y, torch.tensor([1.0], dtype=F64), t,
                event_fn=lambda t, y: y[0] - 0.01)
    assert sol.status == "success" and sol.event_t is None and sol.ys.shape == (21, 1)


def test_event_at_the_initial_time_is_refused():
    with pytest.raises(EventError, match="exactly zero at t0"):
        odeint(lambda t, y: -y, torch.tensor([1.0]), torch.tensor([0.0, 1.0]),
               event_fn=lambda t, y: y[0] - 1.0)


def test_event_needs_step_size_for_fixed_grids():
    with pytest.raises(ODEInputError, match=r"needs options=.*step_size"):
        odeint(lambda t, y: -y, torch.tensor([1.0]), torch.tensor([0.0, 1.0]), method="rk4",
               event_fn=lambda t, y: y[0] - 0.5, options={"grid_constructor": lambda f, y, t: t})


# -- event gradients ------------------------------------------------------------------------

@pytest.mark.parametrize("interface", [odeint, odeint_adjoint])
def test_event_time_gradients_match_the_closed_form(interface):
    # y' = -k y, y(t0) = y0: y = 0.5 at t* = t0 + ln(2 y0) / k
    k, y0v, t0v = 2.0, 3.0, 0.25
    func = Decay(k)
    y0 = torch.tensor([y0v], dtype=F64, requires_grad=True)
    t0 = torch.tensor(t0v, dtype=F64, requires_grad=True)
    t_ev, _sol = odeint_event(func, y0, t0, event_fn=lambda t, y: y[0] - 0.5,
                             odeint_interface=interface, rtol=1e-11, atol=1e-12)
    assert abs(t_ev.item() - (t0v + math.log(2 * y0v) / k)) < 1e-9
    t_ev.backward()
    assert abs(y0.grad.item() - 1 / (k * y0v)) < 1e-7
    assert abs(func.k.grad.item() + math.log(2 * y0v) / k**2) < 1e-7
    assert abs(t0.grad.item() - 1.0) < 1e-7


@pytest.mark.parametrize("interface", [odeint, odeint_adjoint])
def test_event_state_gradient_matches_finite_differences(interface):
    # the velocity at impact of a falling ball depends on g and on the initial height
    def impact_velocity(g, h):
        func = Falling(g)
        y0 = torch.stack([h, torch.zeros((), dtype=F64)])
        _, sol = odeint_event(func, y0, torch.tensor(0.0, dtype=F64),
                              event_fn=lambda t, y: y[0], odeint_interface=interface,
                              rtol=1e-11, atol=1e-12)
        return sol[-1, 1], func

    h = torch.tensor(5.0, dtype=F64, requires_grad=True)
    v, func = impact_velocity(9.81, h)
    v.backward()
    eps = 1e-5
    with torch.no_grad():
        fd_h = (impact_velocity(9.81, h + eps)[0] - impact_velocity(9.81, h - eps)[0]) / (2 * eps)
        fd_g = (impact_velocity(9.81 + eps, h)[0] - impact_velocity(9.81 - eps, h)[0]) / (2 * eps)
    assert abs(h.grad.item() - fd_h.item()) < 1e-6
    assert abs(func.g.grad.item() - fd_g.item()) < 1e-6
    # closed form: v = -sqrt(2 g h)
    assert abs(h.grad.item() + math.sqrt(9.81 / (2 * 5.0))) < 1e-7


def test_odeint_adjoint_event_mode_returns_the_event_and_backpropagates():
    func = Decay(1.0)
    y0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    t_ev, ys = odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=F64),
                              event_fn=lambda t, y: y[0] - 0.5)
    assert abs(t_ev.item() - LN2) < 1e-7
    ys[-1].sum().backward()  # the event time is held fixed, as torchdiffeq
    assert abs(y0.grad.item() - math.exp(-LN2)) < 1e-6


# -- dense solutions -----------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_dense_solution_equals_odeint_between_and_at_steps(method):
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    A = torch.tensor([[-0.1, -1.0], [1.0, -0.1]], dtype=F64)

    def f(t, y):
        return y @ A.T

    t = torch.tensor([0.0, 0.37, 1.0, 2.21, 3.0], dtype=F64)
    sol = solve(f, y0, torch.tensor([0.0, 3.0], dtype=F64), method=method,
                options=opts(method, 0.1), dense=True)
    ys = odeint(f, y0, t, method=method, options=opts(method, 0.1))
    torch.testing.assert_close(sol.evaluate(t), ys, rtol=1e-12, atol=1e-12)
    dense = odeint_dense(f, y0, torch.tensor(0.0), torch.tensor(3.0), method=method,
                         options=opts(method, 0.1))
    torch.testing.assert_close(dense(t[1]), ys[1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ODEInputError, match="covers"):
        dense(torch.tensor(3.5))


def test_dense_solution_is_differentiable():
    func = Decay(0.7)
    y0 = torch.tensor([2.0], dtype=F64, requires_grad=True)
    sol = solve(func, y0, torch.tensor([0.0, 2.0], dtype=F64), dense=True, rtol=1e-10,
                atol=1e-10)
    sol.evaluate(torch.tensor(1.3, dtype=F64)).sum().backward()
    assert abs(y0.grad.item() - math.exp(-0.7 * 1.3)) < 1e-8
    assert abs(func.k.grad.item() + 1.3 * 2.0 * math.exp(-0.7 * 1.3)) < 1e-7


# -- callbacks -----------------------------------------------------------------------------

class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.counts = dict.fromkeys(["step", "accept", "reject", "step_adj", "accept_adj",
                                     "reject_adj"], 0)
        for name, key in [("callback_step", "step"), ("callback_accept_step", "accept"),
                          ("callback_reject_step", "reject"),
                          ("callback_step_adjoint", "step_adj"),
                          ("callback_accept_step_adjoint", "accept_adj"),
                          ("callback_reject_step_adjoint", "reject_adj")]:
            setattr(self, name, self._counter(key))

    def _counter(self, key):
        def cb(t0, y0, dt):
            assert isinstance(t0, torch.Tensor) and isinstance(dt, torch.Tensor)
            self.counts[key] += 1
        return cb

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) * (5 * t).sin()


def test_callbacks_are_called_once_per_attempt_with_accept_or_reject():
    f = Counting()
    y0 = torch.tensor([1.0, 2.0])
    ys, st = odeint_adjoint(f, y0, torch.tensor([0.0, 3.0]), rtol=1e-8, atol=1e-8,
                            options={"first_step": 1.0}, method="dopri5", return_stats=True)
    c = f.counts
    assert st.n_rejected > 0
    assert c["step"] == st.n_accepted + st.n_rejected
    assert (c["accept"], c["reject"]) == (st.n_accepted, st.n_rejected)
    assert c["step_adj"] == 0
    ys.sum().backward()
    b = st.backward
    assert c["step_adj"] == b.n_accepted + b.n_rejected > 0
    assert (c["accept_adj"], c["reject_adj"]) == (b.n_accepted, b.n_rejected)


def test_fixed_grid_calls_callback_step_per_step_and_warns_about_the_rest():
    f = Counting()
    with pytest.warns(UserWarning, match="does not support the callbacks"):
        ys = odeint_adjoint(f, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]),
                            method="rk4", options={"step_size": 0.1})
    assert f.counts["step"] == 10 and f.counts["accept"] == 0
    ys.sum().backward()
    assert f.counts["step_adj"] == 10


# -- statuses with throw=False --------------------------------------------------------------

def test_throw_false_reports_max_steps_with_the_solution_so_far():
    t = torch.linspace(0, 10, 11, dtype=F64)
    sol = solve(lambda t, y: -y, torch.tensor([1.0], dtype=F64), t,
                options={"max_num_steps": 5}, method="dopri5", throw=False)
    assert sol.status == "max_steps_reached" and not sol.success
    assert "max_num_steps=5" in sol.message and sol.stats.status == sol.status
    assert 0 < sol.t_final < 10 and sol.ys.shape[0] < 11
    torch.testing.assert_close(sol.ys[:, 0], torch.exp(-t[: sol.ys.shape[0]]), rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(MaxStepsError):
        solve(lambda t, y: -y, torch.tensor([1.0], dtype=F64), t,
              options={"max_num_steps": 5}, method="dopri5")


def test_throw_false_reports_step_size_underflow():
    sol = solve(lambda t, y: y**2, torch.tensor([1.0], dtype=F64),
                torch.tensor([0.0, 2.0], dtype=F64), throw=False)
    assert sol.status == "step_size_underflow" and abs(sol.t_final - 1.0) < 1e-6
    with pytest.raises(StepSizeError):
        solve(lambda t, y: y**2, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 2.0]))


def test_throw_false_reports_nonfinite():
    def f(t, y):
        return torch.where(t < 0.5, -y, torch.full_like(y, math.nan))

    for method, o in (("dopri5", None), ("rk4", {"step_size": 0.1})):
        sol = solve(f, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0]),
                    method=method, options=o, throw=False)
        assert sol.status == "nonfinite", method
        assert sol.t_final <= 0.5 + 1e-12
        with pytest.raises(NonFiniteError):
            solve(f, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0]), method=method,
                  options=o)


def test_every_error_derives_from_one_base_class():
    for exc in (ODEInputError, ODEFuncError, StepSizeError, MaxStepsError, NonFiniteError,
                EventError):
        assert issubclass(exc, NeuralODEError)
    assert issubclass(NonFiniteError, FloatingPointError)


# -- the loop never hangs and never lies ----------------------------------------------------

def _bounded(fn, *args, **kw):
    """Run fn; the loop must end by itself (each case here used to loop forever)."""
    return fn(*args, **kw)


def test_zero_tolerances_are_refused():
    with pytest.raises(ODEInputError, match="both zero"):
        odeint(lambda t, y: -y, torch.tensor([1.0]), torch.tensor([0.0, 1.0]), rtol=0, atol=0)


def test_zero_atol_with_a_zero_state_is_a_clear_error():
    with pytest.raises(StepSizeError, match="atol > 0"):
        _bounded(odeint, lambda t, y: -y, torch.tensor([0.0]), torch.tensor([0.0, 1.0]),
                 atol=0.0)


def test_tolerance_below_the_dtype_resolution_is_refused():
    with pytest.raises(ODEInputError, match="rtol=1e-12 is below what float32 resolves"):
        odeint(lambda t, y: -y, torch.tensor([1.0]), torch.tensor([0.0, 10.0]), rtol=1e-12,
               atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_states_accumulate_in_float32_and_are_right(dtype):
    y = odeint(lambda t, y: torch.ones_like(y), torch.tensor([1.0], dtype=dtype),
               torch.tensor([0.0, 10.0]))
    assert y.dtype == dtype and y[-1].item() == 11.0
    y = odeint(lambda t, y: -y, torch.tensor([1.0], dtype=dtype), torch.tensor([0.0, 2.0]))
    assert abs(y[-1].float().item() - math.exp(-2)) < 2e-3


def test_a_norm_returning_nan_is_a_clear_error():
    with pytest.raises(ODEFuncError, match="norm"):
        odeint(lambda t, y: -y, torch.tensor([1.0]), torch.tensor([0.0, 1.0]), method="dopri5",
               options={"norm": lambda e: float("nan")})


@pytest.mark.parametrize("options,match", [
    ({"safety": 1.5}, "option 'safety' of 'dopri5' must be a positive finite number at most 1"),
    ({"dfactor": 1.0}, "a rejected step must shrink"),
    ({"dtype": torch.float32}, "option 'dtype' of 'dopri5'"),
])
def test_options_that_would_stall_the_controller_are_refused(options, match):
    with pytest.raises(ODEInputError, match=match):
        odeint(lambda t, y: -y, torch.tensor([1.0]), torch.tensor([0.0, 1.0]), method="dopri5",
               options=options)


def test_tiny_step_size_is_an_input_error():
    with pytest.raises(ODEInputError, match="more than 2\\*\\*52 steps"):
        odeint(lambda t, y: -y, torch.tensor([1.0]), torch.tensor([0.0, 1.0]), method="euler",
               options={"step_size": 1e-300})


def test_func_changing_its_output_shape_or_dtype_later_is_a_clear_error():
    calls = {"n": 0}

    def shape_changer(t, y):
        calls["n"] += 1
        return -y if calls["n"] < 3 else torch.cat([-y, -y])

    with pytest.raises(ODEFuncError, match=r"returned shape .*earlier calls"):
        odeint(shape_changer, torch.tensor([1.0]), torch.tensor([0.0, 1.0]))
    calls["n"] = 0

    def dtype_changer(t, y):
        calls["n"] += 1
        return -y if calls["n"] < 3 else -y.double()

    with pytest.raises(ODEFuncError, match=r"returned dtype .*earlier calls"):
        odeint(dtype_changer, torch.tensor([1.0]), torch.tensor([0.0, 1.0]))


# -- fixed bugs ----------------------------------------------------------------------------

def _step_at_one(t, y):
    return torch.where(t < 1.0, torch.zeros_like(y), torch.ones_like(y))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("method", [m for m in FIXED if "adams" not in m])
def test_perturb_sees_the_discontinuity_at_a_grid_point_in_any_dtype(method, dtype):
    # dy/dt = [t >= 1]: from 0 to 2 the exact answer is 1; without perturb the step
    # starting at t = 1 would see f = 1 from the left end of a step ending there
    y = odeint(_step_at_one, torch.tensor([0.0], dtype=dtype), torch.tensor([0.0, 2.0]),
               method=method, options={"step_size": 0.25, "perturb": True})
    assert abs(y[-1].item() - 1.0) < 1e-6, y[-1].item()


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
def test_perturb_with_adams_never_evaluates_f_at_a_grid_point(method, dtype):
    seen = []

    def f(t, y):
        seen.append(float(t))
        return -y

    odeint(f, torch.tensor([1.0], dtype=dtype), torch.tensor([0.0, 2.0]), method=method,
           options={"step_size": 0.25, "perturb": True})
    grid = {0.25 * k for k in range(9)}
    assert len(seen) > 16 and not grid & set(seen)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_jump_t_in_float32_is_as_cheap_as_in_float64(method):
    nfe = {}
    for dtype in (F32, F64):
        ys, st = odeint(_step_at_one, torch.tensor([0.0], dtype=dtype), torch.tensor([0.0, 2.0]),
                        method=method, options={"jump_t": [1.0]}, rtol=1e-6, atol=1e-6,
                        return_stats=True)
        nfe[dtype] = st.nfe
        assert abs(ys[-1].item() - 1.0) < 1e-5
    assert nfe[F32] <= nfe[F64] + 6, nfe


def test_zero_dim_states_everywhere():
    func = Decay(1.0)
    y0 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    ys = odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=F64))
    assert ys.shape == (2,)
    ys[-1].backward()
    assert abs(y0.grad.item() - math.exp(-1)) < 1e-6
    ys = odeint(lambda t, s: (-s[0], s[1]), (torch.tensor(1.0), torch.ones(2)),
                torch.tensor([0.0, 1.0]))
    assert ys[0].shape == (2,) and ys[1].shape == (2, 2)
    a = torch.tensor(2.0, dtype=F64, requires_grad=True)
    ys = odeint_adjoint(lambda t, s: (-a * s[0], -s[1]), (torch.tensor(1.0, dtype=F64),
                        torch.ones(2, dtype=F64)), torch.tensor([0.0, 1.0], dtype=F64),
                        adjoint_params=(a,))
    ys[0][-1].backward()
    assert abs(a.grad.item() + math.exp(-2)) < 1e-6


def test_per_element_tensor_tolerances_as_torchdiffeq():
    y0 = torch.tensor([[1.0, 1.0]], dtype=F64)
    _, loose = odeint(lambda t, y: -y, y0, torch.tensor([0.0, 5.0]), rtol=1e-3, atol=1e-3,
                      return_stats=True)
    ys, mixed = odeint(lambda t, y: -y, y0, torch.tensor([0.0, 5.0]),
                       rtol=torch.tensor([[1e-3, 1e-9]]), atol=torch.tensor([1e-3, 1e-9]),
                       return_stats=True)
    assert mixed.nfe > loose.nfe
    assert abs(ys[-1, 0, 1].item() - math.exp(-5)) < 1e-8


def test_odeint_adjoint_with_per_element_tuple_tolerances():
    a = torch.tensor(0.5, dtype=F64, requires_grad=True)
    ys = odeint_adjoint(lambda t, s: (-a * s[0], a * s[1]),
                        (torch.ones(2, dtype=F64), torch.ones(1, dtype=F64)),
                        torch.tensor([0.0, 1.0], dtype=F64), rtol=[1e-6, 1e-4],
                        atol=[1e-8, 1e-6], adjoint_params=(a,))
    (ys[0][-1].sum() + ys[1][-1].sum()).backward()
    exact = -2 * math.exp(-0.5) + math.exp(0.5)
    assert abs(a.grad.item() - exact) < 1e-3


def test_bad_adjoint_configuration_is_reported_before_the_forward_solve():
    func = Decay(1.0)
    calls = {"n": 0}

    class Watched(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = func

        def forward(self, t, y):
            calls["n"] += 1
            return self.inner(t, y)

    with pytest.raises(ODEInputError, match="adjoint"):
        odeint_adjoint(Watched(), torch.tensor([1.0], dtype=F64, requires_grad=True),
                       torch.tensor([0.0, 1.0]), adjoint_options={"norm": "semi"})
    with pytest.raises(ODEInputError, match="must be a positive int"):
        odeint_adjoint(Watched(), torch.tensor([1.0], dtype=F64, requires_grad=True),
                       torch.tensor([0.0, 1.0]), adjoint_options={"max_num_steps": 0})
    with pytest.warns(UserWarning, match="does not use the option"), \
            pytest.raises(ODEInputError):
        odeint_adjoint(Watched(), torch.tensor([1.0], dtype=F64, requires_grad=True),
                           torch.tensor([0.0, 1.0]), adjoint_options={"stepsize": 0.1},
                           adjoint_rtol=-1.0)
    assert calls["n"] == 0


def test_adjoint_backward_is_one_reverse_solve_across_all_outputs():
    f = Counting()
    times = []
    f.callback_step_adjoint = lambda t0, y0, dt: times.append(float(t0))
    t = torch.linspace(0, 2, 21)
    ys = odeint_adjoint(f, torch.tensor([1.0, 2.0]), t, method="dopri5", rtol=1e-6, atol=1e-6)
    ys.sum().backward()
    # one solve: attempt start times never increase from t[-1] down to t[0]
    assert times[0] == 2.0 and all(b <= a for a, b in itertools.pairwise(times))


def test_adams_methods_take_max_order_up_to_12():
    f, y0 = (lambda t, y: torch.stack([y[1], -y[0]])), torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 6.0], dtype=F64)
    exact = torch.tensor([math.cos(6.0), -math.sin(6.0)], dtype=F64)
    errs = {}
    for order in (4, 8, 12):
        y = odeint(f, y0, t, method="implicit_adams",
                   options={"step_size": 0.05, "max_order": order}, rtol=1e-12, atol=1e-12)
        errs[order] = (y[-1] - exact).abs().max().item()
    assert errs[12] < errs[8] < errs[4] / 10
    assert errs[12] < 2e-8
    y = odeint(f, y0, t, method="implicit_adams", options={"step_size": 0.05})
    assert (y[-1] - exact).abs().max().item() < 1e-8  # default max_order 12, rtol 1e-7


def test_a_user_controller_object_is_used():
    y0, t = torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 5.0], dtype=F64)
    _, default = odeint(lambda t, y: -y, y0, t, return_stats=True)
    ctrl = PIDController(rtol=1e-3, atol=1e-3, pcoeff=0.4, icoeff=0.3)
    ys, st = odeint(lambda t, y: -y, y0, t, method="dopri5",
                    options={"step_size_controller": ctrl}, return_stats=True)
    assert st.nfe < default.nfe
    assert abs(ys[-1].item() - math.exp(-5)) < 1e-3
    with pytest.raises(ODEInputError, match=r"must be a neuralode\.PIDController"):
        odeint(lambda t, y: -y, y0, t, method="dopri5", options={"step_size_controller": 3})
    with pytest.raises(ODEInputError, match="safety"):
        PIDController(safety=2.0)


def test_a_user_adjoint_norm_receives_torchdiffeqs_tuple():
    seen = []
    params = (torch.rand(7, requires_grad=True), torch.rand((), requires_grad=True))

    def norm(state):
        seen.append(tuple(tuple(v.shape) for v in state))
        return max(v.abs().max() for v in state)

    xs = odeint_adjoint(lambda t, s: (s[0] * params[1], s[1]),
                        (torch.tensor(1.0), torch.full((2, 2), 0.5)), torch.tensor([0.0, 1.0]),
                        adjoint_params=params, adjoint_options={"norm": norm})
    xs[0].sum().backward()
    assert seen and seen[0] == ((), (), (2, 2), (), (2, 2), (7,), ())
    assert params[1].grad is not None and params[0].grad.abs().max() == 0


@pytest.mark.parametrize("method", ["rk4", "midpoint", "explicit_adams", "dopri5"])
@pytest.mark.parametrize("graph", [False, True])
def test_float32_stage_sums_are_rounded_once(method, graph):
    # y' = 0.2 from 3.2 over 50 steps of 0.01: a float32 sum that adds every stage's term into
    # y separately drifts 1.7e-5 (rk4); adding the step's increment once stays near 4.7e-6
    a = torch.tensor(0.2)
    y0 = torch.tensor([3.2]).requires_grad_(graph)
    o = {"step_size": 0.01} if method != "dopri5" else {"first_step": 0.01, "max_step": 0.01}
    ys = odeint(lambda t, y: a * torch.ones_like(y), y0, torch.tensor([1.0, 1.5], dtype=F64),
                method=method, options=o)
    assert abs(ys[-1].item() - 3.3) < 8e-6


def test_adjoint_asks_the_grid_constructor_for_the_reversed_grid():
    x0 = torch.tensor(1.0, requires_grad=True)
    asked = []

    def grid_constructor(f, y0, t):
        asked.append(t.tolist())
        return torch.linspace(float(t[0]), float(t[-1]), 11)

    xs = odeint_adjoint(lambda t, x: x, x0, torch.tensor([0.0, 1.0]), method="euler",
                        options={"grid_constructor": grid_constructor}, adjoint_params=())
    xs[1].backward()
    assert asked == [[0.0, 1.0], [1.0, 0.0]]
    assert abs(x0.grad.item() - 1.1**10) < 1e-5  # Euler's discrete adjoint: (1 + h)^10


def test_adjoint_backward_inherits_jump_t():
    def f(t, x):
        return -0.5 * x if t < 0.5 else x**2

    nfe = {}
    for jump in (False, True):
        x0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
        xs, st = odeint_adjoint(f, x0, torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-6,
                                atol=1e-6, adjoint_params=(), return_stats=True, method="dopri5",
                                options={"jump_t": [0.5]} if jump else None)
        xs.sum().backward()
        nfe[jump] = st.backward.nfe
    assert nfe[True] < nfe[False] / 2


def test_adjoint_of_dynamics_independent_of_the_state():
    y0 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    ys = odeint_adjoint(lambda t, y: -0.1 * torch.exp(-0.1 * t) * torch.ones_like(y), y0,
                        torch.tensor([0.0, 2.0], dtype=F64), adjoint_params=())
    ys[-1].backward()
    assert y0.grad.item() == pytest.approx(1.0)


def test_adjoint_with_a_jump_at_an_output_time():
    # the backward solve's state jump (output time) and f's jump (jump_t) at the same time
    def f(t, x):
        return -0.5 * x if t < 0.5 else -2.0 * x

    x0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    xs = odeint_adjoint(f, x0, t, method="dopri5", options={"jump_t": [0.5]}, rtol=1e-10,
                        atol=1e-10, adjoint_params=())
    xs.sum().backward()
    exact = 1.0 + math.exp(-0.25) + math.exp(-0.25 - 1.0)
    assert abs(x0.grad.item() - exact) < 1e-8


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "tsit5"])
def test_float32_fsal_step_end_is_summed_once(method):
    # an FSAL method's last stage is evaluated at y1 itself: in float32 that state is
    # y + h * (K^T a), the stage sum formed first and added once (as every method's y1), not
    # one rounding into y per stage
    from neuralode.solvers.rk import RKStepper
    from neuralode.solvers.tableau import TABLEAUX

    torch.manual_seed(0)
    A = torch.randn(256, 256) / 16

    class Rhs:
        @staticmethod
        def call(t, y):
            return torch.tanh(A @ y) * 1e3

    st = RKStepper(TABLEAUX[method])
    y = torch.randn(256) * 1e3
    st.start(Rhs, y, Rhs.call(0.0, y), False)
    h = 0.0123
    y1 = st.step(0.0, y, h)
    s = st.s
    once = torch.add(y, torch.mv(st.K[: s - 1].t(), st.a_rows[s - 1]), alpha=h)
    assert torch.equal(y1, once)
    fused = torch.addmv(y, st.K[: s - 1].t(), st.a_rows[s - 1], alpha=h)
    assert not torch.equal(fused, once)  # the test can tell the two sums apart
