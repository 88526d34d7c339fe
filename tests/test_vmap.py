"""torch.func.vmap over odeint: the mapped axis is solved per sample (own steps), as a loop
of single solves would be."""

import pytest
import torch

from neuralode import ODEInputError, odeint

# torch's own vmap machinery calls the deprecated torch.jit.script on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

F64 = torch.float64
A = torch.tensor([[0.0, 1.0], [-1.0, -0.1]], dtype=F64)
T = torch.linspace(0.0, 2.0, 5, dtype=F64)
Y0 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]], dtype=F64)


def f(t, y):
    assert y.shape == (2,) and t.dim() == 0  # func sees one sample
    return A @ y + torch.sin(t)


@pytest.mark.parametrize("method,options", [("dopri5", None), ("tsit5", None),
                                            ("rk4", {"step_size": 0.1})])
def test_vmap_over_y0_equals_a_loop_of_solves(method, options):
    kw = {"rtol": 1e-9, "atol": 1e-11, "method": method, "options": options}
    got = torch.vmap(lambda y0: odeint(f, y0, T, **kw))(Y0)
    ref = torch.stack([odeint(f, y0, T, **kw) for y0 in Y0])
    assert got.shape == (3, len(T), 2)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_vmap_over_t_and_tuple_states():
    ts = torch.stack([T, 2 * T])
    got = torch.vmap(lambda y0, t: odeint(lambda t, y: (-y[0], y[0] - y[1]), (y0, y0), t,
                                          rtol=1e-9, atol=1e-11))(Y0[:2], ts)
    for b in range(2):
        ref = odeint(lambda t, y: (-y[0], y[0] - y[1]), (Y0[b], Y0[b]), ts[b], rtol=1e-9,
                     atol=1e-11)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g[b], r, rtol=1e-12, atol=1e-12)


def test_gradient_of_a_vmapped_solve_by_autograd():
    y0 = Y0.clone().requires_grad_()
    (g,) = torch.autograd.grad(torch.vmap(lambda y: odeint(f, y, T))(y0).square().sum(), y0)
    y1 = Y0.clone().requires_grad_()
    (r,) = torch.autograd.grad(torch.stack([odeint(f, y, T) for y in y1]).square().sum(), y1)
    torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_unsupported_vmap_uses_are_clear_errors():
    with pytest.raises(ODEInputError, match=r"under torch\.vmap"):
        torch.vmap(lambda y0: odeint(f, y0, T, return_stats=True))(Y0)
    with pytest.raises(RuntimeError, match="gradient transforms"):
        torch.vmap(torch.func.grad(lambda y0: odeint(f, y0, T)[-1].sum()))(Y0)


def test_jacrev_and_jvp_through_odeint_are_the_flow_map():
    """The Jacobian of y(t) with respect to y0 for dy/dt = A y + sin(t) is expm(A t)."""
    def last(y0):
        return odeint(f, y0, T, rtol=1e-10, atol=1e-12)[-1]
    expm = torch.linalg.matrix_exp(A * float(T[-1]))
    torch.testing.assert_close(torch.func.jacrev(last)(Y0[0]), expm, rtol=1e-7, atol=1e-8)
    v = torch.tensor([0.0, 1.0], dtype=F64)
    _, tangent = torch.func.jvp(last, (Y0[0],), (v,))
    torch.testing.assert_close(tangent, expm @ v, rtol=1e-7, atol=1e-8)
