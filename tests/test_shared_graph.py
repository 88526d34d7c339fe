"""A func that reaches its parameters through tensors computed outside it (as a library of
controlled differential equations does with spline coefficients): the adjoint and the
checkpointed gradient equal backprop's, and the outside graph survives the backward pass."""

import pytest
import torch
from torch import nn

from neuralode import Adjoint, Checkpoint, odeint, odeint_adjoint

DT = torch.float64
Y0 = torch.tensor([1.0, 2.0], dtype=DT)
T = torch.linspace(0.0, 1.0, 5, dtype=DT)


class Shared(nn.Module):
    """dy/dt = -q0 y + q1 cos(t) with q computed from a leaf p outside func (no parameters of its
    own)."""

    def __init__(self, q):
        super().__init__()
        self.q = q

    def forward(self, t, y):
        c = torch.cos(t)  # per sample: t is (B,)
        return -self.q[0] * y + self.q[1] * (c[:, None] if c.dim() else c)


def leaf():
    return torch.tensor([0.5, 0.3], dtype=DT, requires_grad=True)


def outside(p):
    # sin and the product save tensors: a second pass through a freed graph would fail
    return torch.sin(p) * p + p * 2


def backprop_grad(method="dopri5", options=None):
    p = leaf()
    ys = odeint(Shared(outside(p)), Y0, T, rtol=1e-10, atol=1e-10, method=method,
                options=options)
    return torch.autograd.grad((ys[1:] ** 2).sum(), p)[0]


def test_the_issues_minimal_case():
    p = torch.tensor([0.5, 0.3], requires_grad=True)
    q = p * 2
    func = Shared(q)
    odeint_adjoint(func, torch.tensor([1.0]), torch.tensor([0.0, 1.0]),
                   adjoint_params=(p,))[-1].sum().backward()
    assert p.grad is not None and bool(torch.isfinite(p.grad).all())


@pytest.mark.parametrize("method,options", [("dopri5", None), ("rk4", {"step_size": 0.05})])
@pytest.mark.parametrize("interpolated", [False, True])
def test_adjoint_through_an_outside_graph_equals_backprop(method, options, interpolated):
    p = leaf()
    q = outside(p)
    ys = odeint_adjoint(Shared(q), Y0, T, rtol=1e-10, atol=1e-10, method=method,
                        options=options, adjoint_params=(p,), interpolated=interpolated)
    (g,) = torch.autograd.grad((ys[1:] ** 2).sum(), p)
    torch.testing.assert_close(g, backprop_grad(method, options), rtol=1e-6, atol=1e-8)
    # the outside graph was retained: it can still be differentiated
    (gq,) = torch.autograd.grad(q.sum(), p)
    torch.testing.assert_close(gq, torch.cos(p.detach()) * p.detach() + torch.sin(p.detach()) + 2)


@pytest.mark.parametrize("budget", [None, 2])
def test_checkpoint_through_an_outside_graph_equals_backprop(budget):
    p = leaf()
    ys = odeint(Shared(outside(p)), Y0, T, rtol=1e-10, atol=1e-10,
                gradient=Checkpoint(budget=budget, params=(p,)))
    (g,) = torch.autograd.grad((ys[1:] ** 2).sum(), p)
    torch.testing.assert_close(g, backprop_grad(), rtol=1e-9, atol=1e-12)


def test_per_sample_adjoint_through_an_outside_graph_equals_backprop():
    p = leaf()
    y0 = torch.stack([Y0, 2 * Y0])
    ys = odeint(Shared(outside(p)), y0, T, rtol=1e-10, atol=1e-10, per_sample=True,
                gradient=Adjoint(params=(p,)))
    (g,) = torch.autograd.grad((ys[1:] ** 2).sum(), p)
    p2 = leaf()
    ref = odeint(Shared(outside(p2)), y0, T, rtol=1e-10, atol=1e-10)
    (g_ref,) = torch.autograd.grad((ref[1:] ** 2).sum(), p2)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-8)
