"""What a new user trips over (issue 22, items 1-6): each mistake ends early with an error
that says what was wrong, and no wrong answer is reported as success."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode import EventError, ODEFuncError, ODEInputError, odeint, solve

F64 = torch.float64


def test_an_event_that_never_comes_stops_after_a_bounded_search():
    y0 = torch.tensor([1.0], dtype=F64)
    with pytest.raises(EventError, match=r"at most 20000 steps.*max_num_steps"):
        odeint(lambda t, y: -y, y0, torch.tensor([0.0, 5.0], dtype=F64),
               event_fn=lambda t, y: y[0] + 1)


def test_a_fixed_grid_event_search_is_bounded_too():
    y0 = torch.tensor([1.0], dtype=F64)
    with pytest.raises(EventError, match="max_num_steps=20000"):
        odeint(lambda t, y: -y, y0, torch.tensor([0.0, 5.0], dtype=F64), method="rk4",
               options={"step_size": 0.01}, event_fn=lambda t, y: y[0] + 1)


def ballistic(t, y):
    """Height and velocity under gravity; one ball (2,) or a batch (B, 2)."""
    return torch.stack([y[..., 1], torch.full_like(y[..., 1], -9.81)], -1)


def _thrown_ball():
    # thrown up from 0.2 through the height 1, and back: both crossings of y = 1 (t = 0.24,
    # 0.68) fall inside one long step, [0.19, 2] (the solution is a polynomial the method
    # integrates exactly, so the steps grow to the whole span)
    return torch.tensor([0.2, 4.5], dtype=F64)


def test_two_crossings_inside_one_step_are_found_with_interior_points():
    y0 = _thrown_ball()
    o = {"event_interior_points": 4}
    t_first = (4.5 - (4.5**2 - 2 * 9.81 * 0.8) ** 0.5) / 9.81  # 0.2 + 4.5 t - g t^2/2 = 1
    sol = solve(ballistic, y0, torch.tensor([0.0, 2.0], dtype=F64),
                event_fn=lambda t, y: y[0] - 1, rtol=1e-6, atol=1e-6, method="dopri5",
                options=o)
    assert sol.status == "event"
    assert float(sol.event_t) == pytest.approx(t_first, rel=1e-9)
    per = solve(ballistic, y0[None], torch.tensor([0.0, 2.0], dtype=F64), per_sample=True,
                event_fn=lambda t, y: y[:, 0] - 1, rtol=1e-6, atol=1e-6, method="dopri5",
                options=o)
    assert per.status == ["event"]
    assert float(per.event_t[0]) == pytest.approx(float(sol.event_t), rel=1e-12)
    # by default only step ends are compared (as torchdiffeq, scipy): the pair is missed,
    # which the README says; the solve reports it honestly as no event in the span
    plain = solve(ballistic, y0, torch.tensor([0.0, 2.0], dtype=F64),
                  event_fn=lambda t, y: y[0] - 1, rtol=1e-6, atol=1e-6, method="dopri5")
    assert plain.status == "success" and plain.event_t is None
    with pytest.raises(ODEInputError, match="event_interior_points"):
        solve(ballistic, y0, torch.tensor([0.0, 2.0], dtype=F64), method="dopri5",
              event_fn=lambda t, y: y[0] - 1, options={"event_interior_points": -1})


def test_a_diverging_solution_is_named_in_the_event_error():
    # the ball falls for ever and never reaches the event height 20: the steps grow until
    # the height overflows; the error says the solution diverged instead of a bare
    # "non-finite value at t=6.2e+153"
    y0 = torch.tensor([10.0, -1.0], dtype=F64)
    with pytest.raises(EventError, match="diverged"):
        odeint(ballistic, y0, torch.tensor([0.0, 1.0], dtype=F64),
               event_fn=lambda t, y: y[0] - 20.0)


def test_a_norm_returning_a_negative_number_is_a_clear_error():
    with pytest.raises(ODEFuncError, match="non-negative"):
        odeint(lambda t, y: -y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               method="dopri5", options={"norm": lambda e: -e.abs().max()})


def test_meta_tensors_are_refused_at_the_door():
    with pytest.raises(ODEInputError, match="meta device"):
        odeint(lambda t, y: -y, torch.ones(2, device="meta"), torch.tensor([0.0, 1.0]))
    with pytest.raises(ODEInputError, match="meta device"):
        odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0], device="meta"))


@pytest.mark.parametrize("method,option", [("dopri5", "first_step"), ("rk4", "step_size"),
                                           ("dopri5", "max_step"), ("bdf", "first_step")])
def test_numeric_options_take_numbers_not_strings(method, option):
    with pytest.raises(ODEInputError, match=rf"option '{option}'.*must be a number.*str"):
        odeint(lambda t, y: -y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               method=method, options={option: "0.1"})
    with pytest.raises(ODEInputError, match="rtol"):
        odeint(lambda t, y: -y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
               rtol="1e-3")


def _mutating(t, y):
    y.mul_(0.5)
    return -y


@pytest.mark.parametrize("per_sample", [False, True])
def test_a_func_that_changes_y_in_place_is_refused(per_sample):
    y0 = torch.ones(2, 3, dtype=F64)
    with pytest.raises(ODEFuncError, match="in place"):
        odeint(_mutating, y0, torch.tensor([0.0, 1.0], dtype=F64), per_sample=per_sample)


def test_a_half_precision_state_hands_func_copies_it_may_change():
    # float16 states are integrated in float32: func gets a converted copy each call, so
    # changing it touches neither the solver nor y0 (the solve is right, nothing to refuse)
    y0 = torch.ones(3, dtype=torch.float16)
    ys = odeint(_mutating, y0, torch.tensor([0.0, 1.0], dtype=F64))
    assert torch.equal(y0, torch.ones(3, dtype=torch.float16))
    # func returns -(y / 2) of the state it was given: the solution is exp(-t / 2)
    assert torch.allclose(ys[-1].float(), torch.full((3,), math.exp(-0.5)), rtol=2e-3)


def test_an_honest_func_gets_ys0_equal_to_y0():
    y0 = torch.ones(3, dtype=F64)
    ys = odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64))
    assert torch.equal(ys[0], y0) and torch.equal(y0, torch.ones(3, dtype=F64))
    assert neuralode.solve(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64)).success
