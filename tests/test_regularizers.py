"""Regularisation integrals (neuralode.regularizers): closed forms on linear dynamics,
gradients against finite differences with every gradient strategy, and the step count."""

import pytest
import torch
from torch import nn

from neuralode import solve
from neuralode.regularizers import (
    JacobianFrobenius,
    KineticEnergy,
    RegularizedFunc,
    SecondDerivative,
    regularization_loss,
    regularized_solve,
)

T = 0.7
TOL = {"method": "dopri5", "rtol": 1e-10, "atol": 1e-10}


def _diag_problem():
    a = torch.tensor([-0.5, 0.3, 0.8], dtype=torch.float64)
    z0 = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]], dtype=torch.float64)
    return a, z0


def _times():
    return torch.tensor([0.0, T], dtype=torch.float64)


def test_kinetic_energy_matches_closed_form_on_linear_dynamics():
    a, z0 = _diag_problem()
    out = regularized_solve(lambda t, z: z * a, z0, _times(), [KineticEnergy()], **TOL)
    # ||A z(t)||^2 = sum_i a_i^2 z0_i^2 exp(2 a_i t), integrated over [0, T]
    expected = (a * z0 ** 2 * (torch.exp(2 * a * T) - 1) / 2).sum(-1)
    assert out.integrals["kinetic"].shape == (2,)
    torch.testing.assert_close(out.integrals["kinetic"], expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out.ys[-1], z0 * torch.exp(a * T), rtol=1e-8, atol=1e-10)


def test_jacobian_frobenius_exact_matches_closed_form():
    A = torch.tensor([[0.2, -1.0, 0.4], [0.5, -0.3, 0.0], [1.5, 0.1, -0.2]],
                     dtype=torch.float64)
    _, z0 = _diag_problem()
    out = regularized_solve(lambda t, z: z @ A.T, z0, _times(),
                            [JacobianFrobenius("exact")], **TOL)
    expected = torch.full((2,), float((A ** 2).sum()) * T, dtype=torch.float64)
    torch.testing.assert_close(out.integrals["jacobian_frobenius"], expected)


def test_jacobian_frobenius_hutchinson_uses_one_probe_per_solve_and_is_unbiased():
    A = torch.tensor([[0.2, -1.0], [0.5, -0.3]], dtype=torch.float64)
    z0 = torch.randn(4000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reg = JacobianFrobenius("hutchinson", noise="rademacher")
    out = regularized_solve(lambda t, z: z @ A.T, z0, _times(), [reg],
                            generator=torch.Generator().manual_seed(1), **TOL)
    # with the probe eps fixed during the solve, the integrand is the constant ||eps^T A||^2
    per_sample = ((reg.eps @ A) ** 2).sum(-1) * T
    torch.testing.assert_close(out.integrals["jacobian_frobenius"], per_sample)
    mean = float(out.integrals["jacobian_frobenius"].detach().mean())
    assert abs(mean - float((A ** 2).sum()) * T) < 0.05 * float((A ** 2).sum()) * T


def test_second_derivative_matches_closed_form_on_linear_dynamics():
    a, z0 = _diag_problem()
    out = regularized_solve(lambda t, z: z * a, z0, _times(), [SecondDerivative()], **TOL)
    # z'' = A^2 z: ||A^2 z||^2 = sum_i a_i^4 z0_i^2 exp(2 a_i t)
    expected = (a ** 3 * z0 ** 2 * (torch.exp(2 * a * T) - 1) / 2).sum(-1)
    torch.testing.assert_close(out.integrals["second_derivative"], expected, rtol=1e-8,
                               atol=1e-10)


def test_second_derivative_includes_the_explicit_time_derivative():
    b = torch.tensor([0.5, -2.0], dtype=torch.float64)
    a = torch.tensor([-0.4, 0.0], dtype=torch.float64)
    z0 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    # f = a z + b t; z'' = a (a z + b t) + b. Component 2 (a = 0): z'' = b_2 exactly.
    out = regularized_solve(lambda t, z: z * a + b * t, z0, _times(),
                            [SecondDerivative(), KineticEnergy()], **TOL)
    zs = solve(lambda t, z: z * a + b * t, z0, torch.linspace(0, T, 2001, dtype=torch.float64),
               **TOL).ys
    tt = torch.linspace(0, T, 2001, dtype=torch.float64)[:, None, None]
    acc = a * (a * zs + b * tt) + b
    integrand = (acc ** 2).sum(-1)[:, 0]
    h = T / 2000  # Simpson's rule on the exact trajectory
    simpson = h / 3 * (integrand[0] + integrand[-1] + 4 * integrand[1:-1:2].sum()
                       + 2 * integrand[2:-1:2].sum())
    torch.testing.assert_close(out.integrals["second_derivative"][0], simpson, rtol=1e-9,
                               atol=1e-12)


def test_tuple_state_measures_the_chosen_component():
    a, z0 = _diag_problem()
    out = regularized_solve(lambda t, s: (s[0] * a, s[1] * 0 + 1.0), (z0, z0[:, 0] * 0),
                            _times(), [KineticEnergy()], **TOL)
    expected = (a * z0 ** 2 * (torch.exp(2 * a * T) - 1) / 2).sum(-1)
    torch.testing.assert_close(out.integrals["kinetic"], expected, rtol=1e-8, atol=1e-10)
    assert isinstance(out.ys, tuple) and len(out.ys) == 2
    torch.testing.assert_close(out.ys[1][-1], torch.full((2,), T, dtype=torch.float64))


def test_per_sample_integrals_match_closed_form():
    a, z0 = _diag_problem()
    out = regularized_solve(lambda t, z: z * a, z0, _times(), [KineticEnergy()],
                            per_sample=True, **TOL)
    expected = (a * z0 ** 2 * (torch.exp(2 * a * T) - 1) / 2).sum(-1)
    torch.testing.assert_close(out.integrals["kinetic"], expected, rtol=1e-8, atol=1e-10)


class _Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.W = nn.Parameter(torch.randn(2, 2, dtype=torch.float64, generator=g))
        self.b = nn.Parameter(torch.randn(2, dtype=torch.float64, generator=g) * 0.3)

    def forward(self, t, z):
        return torch.tanh(z @ self.W.T + self.b * torch.cos(t).reshape(-1, 1)) - 0.2 * z


def _all_regs():
    return [KineticEnergy(weight=0.3), JacobianFrobenius("exact", weight=0.5),
            JacobianFrobenius("hutchinson", name="jf_hutch"), SecondDerivative(weight=0.7)]


def test_regularized_solve_keeps_the_accepted_steps_of_the_plain_solve():
    func = _Tanh()
    z0 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 3.0], dtype=torch.float64)
    for per_sample in (False, True):
        kw = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-6, "per_sample": per_sample}
        plain = solve(func, z0, t, **kw)
        out = regularized_solve(func, z0, t, _all_regs(), **kw)
        assert torch.equal(torch.as_tensor(out.stats.n_accepted),
                           torch.as_tensor(plain.stats.n_accepted))
        assert torch.equal(torch.as_tensor(out.stats.nfe), torch.as_tensor(plain.stats.nfe))
        torch.testing.assert_close(out.ys, plain.ys, rtol=1e-12, atol=1e-12)
    plain = solve(func, z0, t, method="dopri5", rtol=1e-6, atol=1e-6)
    # controlling the integrals' error too changes the steps
    both = regularized_solve(func, z0, t, _all_regs(), error_control="all", rtol=1e-6,
                             atol=1e-6, method="dopri5")
    assert (both.stats.n_accepted, both.stats.n_rejected) != \
        (plain.stats.n_accepted, plain.stats.n_rejected)


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
def test_gradients_match_finite_differences(gradient):
    func = _Tanh()
    z0 = torch.tensor([[0.5, -1.0], [1.2, 0.3]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    regs = _all_regs()

    def loss(z0_):
        out = regularized_solve(func, z0_, t, regs, generator=torch.Generator().manual_seed(5),
                                gradient=gradient, **TOL)
        return regularization_loss(out.integrals, regs) + out.ys[-1].pow(2).sum() * 0.1

    value = loss(z0)
    gW, gz0 = torch.autograd.grad(value, [func.W, z0])
    eps = 1e-6
    with torch.no_grad():
        for (i, j) in [(0, 0), (0, 1), (1, 0)]:
            func.W[i, j] += eps
            up = float(loss(z0.detach()))
            func.W[i, j] -= 2 * eps
            down = float(loss(z0.detach()))
            func.W[i, j] += eps
            fd = (up - down) / (2 * eps)
            assert abs(fd - float(gW[i, j])) < 1e-6 * (1 + abs(float(gW[i, j])))
        for (i, j) in [(0, 1), (1, 0)]:
            zp, zm = z0.detach().clone(), z0.detach().clone()
            zp[i, j] += eps
            zm[i, j] -= eps
            fd = (float(loss(zp)) - float(loss(zm))) / (2 * eps)
            assert abs(fd - float(gz0[i, j])) < 1e-6 * (1 + abs(float(gz0[i, j])))


def test_bad_input_is_refused_early():
    z0 = torch.zeros(2, 2)
    t = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="non-empty list"):
        regularized_solve(lambda t, z: z, z0, t, [])
    with pytest.raises(TypeError, match="Regularizer"):
        regularized_solve(lambda t, z: z, z0, t, ["kinetic"])
    with pytest.raises(ValueError, match="unique"):
        regularized_solve(lambda t, z: z, z0, t, [KineticEnergy(), KineticEnergy()])
    with pytest.raises(ValueError, match="estimator"):
        JacobianFrobenius("lanczos")
    with pytest.raises(ValueError, match="weight"):
        KineticEnergy(weight=-1.0)
    with pytest.raises(ValueError, match="error_control"):
        regularized_solve(lambda t, z: z, z0, t, [KineticEnergy()], error_control="some")
    with pytest.raises(ValueError, match="component"):
        RegularizedFunc(lambda t, z: z, [KineticEnergy()], n_state=2, component=2)


def test_exact_jacobian_refuses_large_states():
    z0 = torch.zeros(2, 300)
    with pytest.raises(ValueError, match="hutchinson"):
        regularized_solve(lambda t, z: z, z0, torch.tensor([0.0, 1.0]),
                          [JacobianFrobenius("exact")])
