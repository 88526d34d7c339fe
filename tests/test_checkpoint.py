"""Checkpointed differentiation (``gradient="checkpoint"``) and the one gradient keyword.

The specification: a checkpointed solve returns backprop's outputs and backprop's gradient
(float64, relative difference < 1e-10) with respect to y0, parameters and t, for every
kind of method and solve; with a budget it recomputes exactly the binomial schedule's steps
and keeps what it saves for backward independent of the number of steps.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from neuralode import Adjoint, Checkpoint, odeint, odeint_adjoint, odeint_event, solve
from neuralode.errors import ODEInputError
from neuralode.gradients.checkpoint import binomial_cost, binomial_split
from neuralode.solvers import SOLVERS

F64 = torch.float64


class Field(nn.Module):
    """A small nonlinear, time-dependent field with parameters."""

    def __init__(self, n: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.6 * torch.randn(n, n, generator=g, dtype=F64))
        self.b = nn.Parameter(0.3 * torch.randn(n, generator=g, dtype=F64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w + self.b) * torch.cos(t) - 0.2 * y


def _rel(got, want) -> float:
    worst = 0.0
    for a, b in zip(got, want):
        scale = float(b.abs().max()) or 1.0
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def _grads(loss_of, inputs, gradient):
    loss, outs = loss_of(gradient)
    return outs.detach(), torch.autograd.grad(loss, inputs)


TWO_WAYS = ("checkpoint", Checkpoint(budget=2))


def _check_equal(loss_of, inputs, gradients=TWO_WAYS):
    ys_bp, g_bp = _grads(loss_of, inputs, "backprop")
    for gradient in gradients:
        ys, g = _grads(loss_of, inputs, gradient)
        assert torch.equal(ys, ys_bp), f"{gradient}: outputs differ from backprop's"
        assert _rel(g, g_bp) < 1e-10, f"{gradient}: gradient differs by {_rel(g, g_bp):.2e}"


FIXED = {"euler": 0.1, "midpoint": 0.1, "rk4": 0.15, "explicit_adams": 0.05,
         "implicit_adams": 0.05}
ADAPTIVE = ["adaptive_heun", "bosh3", "dopri5", "tsit5", "dopri8"]


@pytest.mark.parametrize("method", list(FIXED) + ADAPTIVE)
def test_gradients_equal_backprop_for_every_kind_of_method(method):
    assert method in SOLVERS
    func = Field()
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1),
                     requires_grad=True)
    t = torch.tensor([0.0, 0.37, 1.0, 1.6], dtype=F64, requires_grad=True)
    opts = {"step_size": FIXED[method]} if method in FIXED else None
    tol = 1e-3 if method == "adaptive_heun" else 1e-6  # order 2: keep the steps few

    def loss_of(gradient):
        ys = odeint(func, y0, t, method=method, options=opts, rtol=tol, atol=tol,
                    gradient=gradient)
        return (ys ** 2).sum() + ys[1].sum(), ys

    _check_equal(loss_of, [y0, t, *func.parameters()])


def test_tuple_state_reversed_time_and_closure_parameters():
    w = torch.tensor([[0.3, -1.1], [0.9, 0.2]], dtype=F64, requires_grad=True)

    def func(t, state):  # a plain callable: its tensors are found from its graph
        a, b = state
        return torch.tanh(b @ w), -a * torch.sin(t) + b.sum()

    a0 = torch.tensor([0.5, -0.2], dtype=F64, requires_grad=True)
    b0 = torch.tensor([1.0, 0.3], dtype=F64, requires_grad=True)
    t = torch.tensor([2.0, 1.1, -0.5], dtype=F64, requires_grad=True)

    def loss_of(gradient):
        ys = odeint(func, (a0, b0), t, rtol=1e-7, atol=1e-9, gradient=gradient)
        return sum((y ** 2).sum() for y in ys), torch.cat([y.reshape(-1) for y in ys])

    _check_equal(loss_of, [a0, b0, t, w])


def test_discontinuities_and_perturbed_fixed_grids():
    func = Field()
    y0 = torch.tensor([0.4, -0.3, 1.2], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.5], dtype=F64, requires_grad=True)
    for method, opts in (("dopri5", {"jump_t": [0.7], "step_t": [0.3, 1.2]}),
                         ("rk4", {"step_size": 0.1, "perturb": True})):
        def loss_of(gradient, method=method, opts=opts):
            ys = odeint(func, y0, t, method=method, options=opts, gradient=gradient)
            return (ys ** 2).sum(), ys

        _check_equal(loss_of, [y0, t, *func.parameters()])


def test_events_event_mode_odeint_event_and_solve():
    func = Field()
    w = func.w
    y0 = torch.tensor([0.1, -0.3, 0.2], dtype=F64, requires_grad=True)

    def drive(t, y):
        return torch.ones_like(y) + 0.3 * torch.tanh(y @ w)

    def ev(t, y):
        return y[0] - 1.5

    def event_mode(gradient):
        t = torch.tensor([0.0, 1.0], dtype=F64)
        _, ys = odeint(drive, y0, t, event_fn=ev, gradient=gradient)
        return (ys ** 2).sum(), ys

    def with_ift(gradient):
        t0 = torch.tensor(0.0, dtype=F64, requires_grad=True)
        et, ys = odeint_event(drive, y0, t0, event_fn=ev, gradient=gradient)
        return (ys ** 2).sum() + 3 * et, torch.cat([ys.reshape(-1), et.reshape(1)])

    def solve_mode(gradient):
        t = torch.linspace(0, 3, 7, dtype=F64)
        sol = solve(func, y0, t, method="rk4", options={"step_size": 0.07},
                    event_fn=lambda t, y: y[1] + 0.25, gradient=gradient)
        assert sol.status == "event"
        return (sol.ys ** 2).sum() + sol.event_y.sum(), torch.cat(
            [sol.ys.reshape(-1), sol.event_y])

    for loss_of in (event_mode, with_ift, solve_mode):
        _check_equal(loss_of, [y0, w])


def test_binomial_cost_and_split_are_the_brute_force_optimum():
    @functools.cache
    def best(steps, free):  # minimal recomputation, trying every first checkpoint
        if steps <= 1:
            return 0
        if free == 0:
            return steps * (steps - 1) // 2
        return min(m + best(steps - m, free - 1) + best(m, free) for m in range(1, steps))

    for free in range(5):
        for steps in range(1, 60):
            assert binomial_cost(steps, free) == best(steps, free), (steps, free)
            if free and steps > 1:
                m = binomial_split(steps, free)
                assert m + best(steps - m, free - 1) + best(m, free) == best(steps, free)


@pytest.mark.parametrize("budget", [1, 3, 16])
def test_budget_recomputes_the_binomial_schedule(budget):
    func = Field()
    y0 = torch.tensor([0.4, -0.3, 1.2], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    n = 100
    ys, stats = odeint(func, y0, t, method="rk4", options={"step_size": 2.0 / n},
                       gradient=Checkpoint(budget=budget), return_stats=True)
    forward_nfe = stats.nfe
    g = torch.autograd.grad(ys[-1].sum(), [y0, *func.parameters()])
    ys_bp = odeint(func, y0, t, method="rk4", options={"step_size": 2.0 / n})
    assert _rel(g, torch.autograd.grad(ys_bp[-1].sum(), [y0, *func.parameters()])) < 1e-10
    ck = stats.extra["checkpoint"]
    assert (ck.steps, ck.replayed) == (n, n)
    assert ck.recomputed == binomial_cost(n, budget)
    assert ck.max_stored == budget
    # every replayed or recomputed rk4 step is 4 evaluations (3 for the last, which needs no
    # f(t1, y1) for a next step); each pass from y0 adds f(y0)
    assert ck.nfe == 4 * (ck.recomputed + ck.replayed) - 1 + ck.from_start
    assert ck.from_start == 1  # only the replay of the first step needs f(y0) with a graph
    assert ck.recompute_factor == (2 * n + ck.recomputed) / n
    assert stats.nfe == forward_nfe  # the backward pass counts apart


def test_unbounded_checkpoint_redoes_each_step_once():
    func = Field()
    y0 = torch.tensor([0.4, -0.3, 1.2], dtype=F64, requires_grad=True)
    ys, stats = odeint(func, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4",
                       options={"step_size": 0.05}, gradient="checkpoint", return_stats=True)
    ys[-1].sum().backward()
    ck = stats.extra["checkpoint"]
    assert (ck.steps, ck.recomputed, ck.replayed, ck.recompute_factor) == (20, 0, 20, 2.0)


def _saved_bytes(gradient, n_steps):
    func = Field()
    y0 = torch.randn(16, 3, dtype=F64, requires_grad=True)
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        ys = odeint(func, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4",
                    options={"step_size": 1.0 / n_steps}, gradient=gradient)
    ys[-1].sum().backward()
    return total[0]


def test_bytes_saved_for_backward_do_not_grow_with_steps_under_a_budget():
    budget = Checkpoint(budget=4)
    assert _saved_bytes(budget, 10) == _saved_bytes(budget, 100) > 0
    # without a budget one state and one derivative per step; backprop all stages' values
    state_and_f = 2 * 16 * 3 * 8
    assert _saved_bytes("checkpoint", 100) - _saved_bytes("checkpoint", 10) == 90 * state_and_f
    assert _saved_bytes("backprop", 100) > 3 * _saved_bytes("checkpoint", 100)


class Dissipative(nn.Module):
    """A fast-decaying mode coupled to a slow one: the backward reconstruction of y that
    the plain adjoint integrates grows like e^{8 t}."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor([8.0, 1.0], dtype=F64))
        self.w = nn.Parameter(torch.tensor([1.0, 0.5], dtype=F64))

    def forward(self, t, y):
        return -self.k * y + self.w * torch.sin(3 * t) + 0.5 * torch.tanh(y.flip(-1))


def test_dissipative_problem_plain_adjoint_wrong_checkpoint_right():
    func = Dissipative()
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 2.5], dtype=F64)

    def grad_y0(gradient):
        ys = odeint(func, y0, t, rtol=1e-4, atol=1e-4, method="dopri5", gradient=gradient)
        return torch.autograd.grad(ys[-1].pow(2).sum(), y0)[0]

    def loss(y):  # the exact flow, for central differences
        with torch.no_grad():
            return float(odeint(func, y, t, rtol=1e-12, atol=1e-12, method="dopri8")[-1]
                         .pow(2).sum())

    eps = 1e-6
    fd = torch.tensor([(loss(y0.detach() + eps * e) - loss(y0.detach() - eps * e)) / (2 * eps)
                       for e in torch.eye(2, dtype=F64)])

    def err(g):
        return float((g - fd).abs().max() / fd.abs().max())

    plain, ck = grad_y0("adjoint"), grad_y0("checkpoint")
    interp = grad_y0("interpolated_adjoint")
    assert err(ck) < 2e-3           # the discretisation error at rtol 1e-4
    assert err(plain) > 0.05        # the unstable backward reconstruction
    assert abs(float(plain[0] - fd[0])) > 0.5 * abs(float(fd[0]))
    assert err(interp) < err(plain) / 3


def test_interpolated_adjoint_matches_backprop_on_a_smooth_problem():
    func = Field()
    y0 = torch.tensor([0.4, -0.3, 1.2], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.5], dtype=F64)
    grads = []
    for gradient in ("backprop", Adjoint(interpolated=True)):
        ys = odeint(func, y0, t, rtol=1e-10, atol=1e-10, gradient=gradient)
        grads.append(torch.autograd.grad((ys ** 2).sum(), [y0, *func.parameters()]))
    assert _rel(grads[1], grads[0]) < 1e-6
    ys = odeint_adjoint(func, y0, t, interpolated=True)
    assert ys.shape == (3, 3)


def test_one_keyword_chooses_the_strategy_everywhere():
    func = Field()
    y0 = torch.tensor([0.4, -0.3, 1.2], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    g_adj = torch.autograd.grad(odeint_adjoint(func, y0, t)[-1].sum(), y0)[0]
    for gradient in ("adjoint", Adjoint()):
        g = torch.autograd.grad(odeint(func, y0, t, gradient=gradient)[-1].sum(), y0)[0]
        assert torch.equal(g, g_adj)
    sol = solve(func, y0, t, gradient="adjoint")
    assert torch.equal(torch.autograd.grad(sol.ys[-1].sum(), y0)[0], g_adj)
    ys = odeint(func, y0, t, gradient="checkpoint:3", method="rk4", options={"step_size": 0.1})
    assert torch.autograd.grad(ys[-1].sum(), y0)[0].shape == (3,)


def test_bad_choices_are_refused_with_the_valid_ones():
    func = Field()
    y0 = torch.tensor([0.4, -0.3, 1.2], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ODEInputError, match=r"gradient must be one of.*checkpoint"):
        odeint(func, y0, t, gradient="exact")
    with pytest.raises(ODEInputError, match="budget after 'checkpoint:' must be an int"):
        odeint(func, y0, t, gradient="checkpoint:x")
    with pytest.raises(ODEInputError, match=r"budget must be None .* or an int >= 1"):
        Checkpoint(budget=0)
    with pytest.raises(ODEInputError, match="dense=True cannot be combined"):
        solve(func, y0, t, dense=True, gradient="checkpoint")
    with pytest.raises(ODEInputError, match="supports neither event_fn"):
        solve(func, y0, t, event_fn=lambda t, y: y[0], gradient="adjoint")
    with pytest.raises(ODEInputError, match="interpolated=True does not support event_fn"):
        odeint(func, y0, t, event_fn=lambda t, y: y[0], gradient="interpolated_adjoint")
    ys = odeint(func, y0, t, gradient="checkpoint")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ys[-1].sum(), y0, create_graph=True)


def test_no_graph_needed_no_tape():
    func = Field()
    y0 = torch.tensor([0.4, -0.3, 1.2], dtype=F64)
    for p in func.parameters():
        p.requires_grad_(False)
    ys, stats = odeint(func, y0, torch.tensor([0.0, 1.0], dtype=F64), gradient="checkpoint",
                       return_stats=True)
    assert not ys.requires_grad and "checkpoint" not in stats.extra


def test_a_stepper_that_cannot_be_replayed_is_refused(monkeypatch):
    cls = SOLVERS["rk4"]
    make = cls.make_stepper

    def without_carry(o, norm):
        stepper = make(o, norm)
        stepper.carry = None  # a stepper outside the carry()/resume() protocol
        return stepper

    monkeypatch.setattr(cls, "make_stepper", without_carry)
    y0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    with pytest.raises(ODEInputError, match=r"cannot be replayed .* gradient='backprop'"):
        odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4",
               options={"step_size": 0.5}, gradient="checkpoint")
