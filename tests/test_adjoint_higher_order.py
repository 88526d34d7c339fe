"""Gradients of gradients through odeint_adjoint (create_graph=True): Hessian-vector
products equal backprop's through odeint."""

import pytest
import torch
from torch import nn

from neuralode import odeint, odeint_adjoint

DT = torch.float64
T = torch.linspace(0.0, 1.0, 4, dtype=DT)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(0.5 * torch.randn(8, 2, generator=g, dtype=DT))
        self.w2 = nn.Parameter(0.5 * torch.randn(2, 8, generator=g, dtype=DT))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1.T + t) @ self.w2.T


def hvp(solver, model, y0, v, **kw):
    """(H v) of L = sum y(t_i)^2 over (parameters, y0), by double backward."""
    inputs = [*model.parameters(), y0]
    ys = solver(model, y0, T, rtol=1e-10, atol=1e-12, **kw)
    grads = torch.autograd.grad((ys ** 2).sum(), inputs, create_graph=True)
    dot = sum((g * w).sum() for g, w in zip(grads, v))
    return torch.autograd.grad(dot, inputs)


# the part of H v that flows through dL/dy(t_i) uses the adjoint's first-order gradient, as
# accurate as the adjoint's backward solve (rk4: its error for this step size)
@pytest.mark.parametrize("method,options,rtol", [("dopri5", None, 1e-7),
                                                 ("rk4", {"step_size": 0.05}, 1e-5)])
def test_hessian_vector_product_through_the_adjoint_equals_backprop(method, options, rtol):
    model = MLP()
    y0 = torch.tensor([[1.0, -0.5], [0.2, 0.3]], dtype=DT, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=DT) for p in [*model.parameters(), y0]]
    got = hvp(odeint_adjoint, model, y0, v, method=method, options=options)
    ref = hvp(odeint, model, y0, v, method=method, options=options)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 1e-2 * float(b.abs().max()))


def test_first_order_gradient_with_create_graph_equals_backprop():
    model = MLP()
    y0 = torch.tensor([1.0, -0.5], dtype=DT)
    ys = odeint_adjoint(model, y0, T, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad((ys ** 2).sum(), list(model.parameters()), create_graph=True)
    assert all(g.requires_grad for g in got)
    ref = torch.autograd.grad((odeint(model, y0, T, rtol=1e-10, atol=1e-12) ** 2).sum(),
                              list(model.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_double_backward_through_event_mode_is_a_clear_error():
    model = MLP()
    y0 = torch.tensor([1.0, -0.5], dtype=DT)
    _, ys = odeint_adjoint(model, y0, T, event_fn=lambda t, y: t - 0.5)
    with pytest.raises(RuntimeError, match="event mode is not supported"):
        torch.autograd.grad(ys[-1].sum(), list(model.parameters()), create_graph=True)
