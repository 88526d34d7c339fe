"""gradient="checkpoint" for the implicit and multistep methods (implicit RK, Rosenbrock,
adams, bdf): the gradient w.r.t. y0, the parameters and the output times equals
backpropagation's through the solver (float64), with and without a checkpoint budget
smaller than the number of steps; scipy_solver (forward only) is refused clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralode import Checkpoint, odeint
from neuralode.errors import ODEInputError

F64 = torch.float64
FIXED = ("implicit_euler", "trapezoid", "radauIIA5", "gl4", "sdirk2")
METHODS = FIXED + ("kvaerno3", "kvaerno5", "rodas4", "rodas5p", "bdf", "adams")


class StiffLinear(nn.Module):
    """y' = A y + sin(t) (1, 1), eigenvalues about -50 and -1."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-50.0, 1.0], [2.0, -1.0]], dtype=F64))

    def forward(self, t, y):
        return (self.A * y).sum(1) + torch.sin(t)


class VanDerPol(nn.Module):
    def __init__(self):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(10.0, dtype=F64))

    def forward(self, t, y):
        return torch.stack([y[1], self.mu * (1 - y[0] ** 2) * y[1] - y[0]])


PROBLEMS = {
    "linear": (StiffLinear, [1.0, 0.5], [0.0, 0.2, 0.5]),
    "vdp": (VanDerPol, [2.0, 0.0], [0.0, 0.3, 0.6]),
}


def _solve(method, problem, gradient, options=None):
    make, y0, t = PROBLEMS[problem]
    func = make()
    y0 = torch.tensor(y0, dtype=F64, requires_grad=True)
    t = torch.tensor(t, dtype=F64, requires_grad=True)
    kw = {"options": {"step_size": 0.05}} if method in FIXED else {}
    if options:
        kw = {"options": options}
    rtol = 1e-4 if method == "kvaerno3" else 1e-5  # fewer steps (order 2)
    ys, stats = odeint(func, y0, t, method=method, rtol=rtol, atol=1e-7, gradient=gradient,
                       return_stats=True, **kw)
    loss = (ys ** 2).sum() + ys[-1, 0] * ys[1, 1]
    inputs = [y0, t, *func.parameters()]
    return ys.detach(), torch.autograd.grad(loss, inputs), stats


def _rel(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_gradient_equals_backprop(method, problem):
    ys_b, g_b, _ = _solve(method, problem, "backprop")
    assert all(bool(g.abs().max() > 0) for g in g_b)  # every input matters
    for gradient in ("checkpoint", Checkpoint(budget=2)):
        ys_c, g_c, stats = _solve(method, problem, gradient)
        assert torch.equal(ys_c, ys_b)  # the same steps, bit for bit
        ck = stats.extra["checkpoint"]
        assert ck.steps > 2  # a budget smaller than the number of steps
        if gradient != "checkpoint":
            assert ck.recomputed > 0
        for got, want in zip(g_c, g_b):
            assert _rel(got, want) < 1e-10, (method, problem, gradient)


@pytest.mark.parametrize("method", ["kvaerno5", "rodas4", "bdf", "adams"])
def test_rejected_attempts_are_replayed(method):
    """A too large first step: rejected attempts change the stepper's state (Jacobian,
    Newton matrices, order asked for); the replay restores it before the accepted one."""
    opts = {"first_step": 0.3}
    _, g_b, stats = _solve(method, "vdp", "backprop", opts)
    assert stats.n_rejected > 0
    for gradient in ("checkpoint", Checkpoint(budget=2)):
        _, g_c, _ = _solve(method, "vdp", gradient, opts)
        for got, want in zip(g_c, g_b):
            assert _rel(got, want) < 1e-10, (method, gradient)


def test_scipy_solver_is_refused_clearly():
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    with pytest.raises(ODEInputError, match=r"scipy_solver.*forward only.*odeint_adjoint"):
        odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64),
               method="scipy_solver", gradient="checkpoint")
