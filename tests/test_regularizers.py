"""Regularisation integrals (neuralode.regularizers): closed forms on linear dynamics,
gradients against finite differences with every gradient strategy, and the step count."""

import math

import pytest
import torch
from torch import nn

from neuralode import solve
from neuralode.models.cnf import CNF, ConcatMLPDynamics
from neuralode.nn import NeuralODE, ODEBlock
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


@pytest.mark.parametrize(("gradient", "per_sample"), [
    ("backprop", False), ("checkpoint", False), ("adjoint", False), ("backprop", True),
    ("adjoint", True)])
def test_gradients_match_finite_differences(gradient, per_sample):
    func = _Tanh()
    z0 = torch.tensor([[0.5, -1.0], [1.2, 0.3]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    regs = _all_regs()

    def loss(z0_):
        out = regularized_solve(func, z0_, t, regs, generator=torch.Generator().manual_seed(5),
                                gradient=gradient, per_sample=per_sample, **TOL)
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


# -- nn blocks and the CNF: regularisers, STEER, augmented dimensions ---------------------------


class _Diag(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t, z):
        return z * self.a


def test_ode_block_regularization_in_training_mode_only():
    a, z0 = _diag_problem()
    block = ODEBlock(_Diag(a), 0.0, T, rtol=1e-10, atol=1e-10,
                     regularizers=[KineticEnergy(weight=2.0)])
    y = block(z0)
    expected = (a * z0 ** 2 * (torch.exp(2 * a * T) - 1) / 2).sum(-1)
    torch.testing.assert_close(block.regularization["kinetic"], expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(block.regularization_loss(), 2.0 * expected.mean(), rtol=1e-8,
                               atol=1e-10)
    nfe_train = block.nfe_forward
    (y.sum() + block.regularization_loss()).backward()
    assert block.func.module.a.grad is not None
    block.eval()
    y_eval = block(z0)
    assert block.regularization is None and float(block.regularization_loss()) == 0.0
    assert block.nfe_forward == nfe_train
    torch.testing.assert_close(y_eval, y.detach())


def test_steer_end_times_are_uniform_in_training_and_fixed_in_eval():
    torch.manual_seed(0)
    block = ODEBlock(_Diag(torch.tensor([-0.5])), 0.0, 1.0, steer=0.3)
    t = block.integration_times(torch.zeros(1))
    ends = torch.tensor([float(block.steer_times(t)[-1]) for _ in range(4000)])
    assert 0.7 <= float(ends.min()) < 0.72 and 1.28 < float(ends.max()) <= 1.3
    assert abs(float(ends.mean()) - 1.0) < 0.01  # std of the mean: 0.3/sqrt(3*4000) = 0.003
    assert abs(float(ends.var()) - 0.3 ** 2 / 3) < 0.003
    block.eval()
    assert torch.equal(block.steer_times(t), t)
    y = block(torch.ones(2, 1))
    torch.testing.assert_close(y, torch.full((2, 1), math.exp(-0.5)), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="steer"):
        ODEBlock(_Diag(torch.tensor([-0.5])), 0.0, 1.0, steer=1.0)
    with pytest.raises(ValueError, match="steer"):
        NeuralODE(_Diag(torch.tensor([-0.5])), steer=-0.1)


def test_steer_solves_to_the_drawn_end_time():
    torch.manual_seed(1)
    block = ODEBlock(_Diag(torch.tensor([-0.5], dtype=torch.float64)), 0.0, 1.0, steer=0.4,
                     rtol=1e-9, atol=1e-9)
    x = torch.ones(3, 1, dtype=torch.float64)
    y = block(x)
    end = float(block.last_times[-1])
    assert end != 1.0
    torch.testing.assert_close(y, x * math.exp(-0.5 * end))


def test_cnf_steer_end_time_distribution_and_eval():
    cnf = CNF(ConcatMLPDynamics(2, (8,)), t1=0.5, steer=0.2)
    gen = torch.Generator().manual_seed(0)
    ends = torch.tensor([float(cnf.training_end_time(gen)) for _ in range(4000)])
    assert 0.3 <= float(ends.min()) < 0.31 and 0.69 < float(ends.max()) <= 0.7
    assert abs(float(ends.mean()) - 0.5) < 0.01
    cnf.eval()
    assert float(cnf.training_end_time(gen)) == 0.5
    x = torch.randn(5, 2)
    torch.testing.assert_close(cnf.log_prob(x), cnf.log_prob(x))
    with pytest.raises(ValueError, match="steer"):
        CNF(ConcatMLPDynamics(2, (8,)), t1=0.5, steer=0.5)


def test_cnf_regularization_integrals_over_zero_to_t():
    a = torch.tensor([-0.5, 0.8], dtype=torch.float64)
    cnf = CNF(_Diag(a), t1=T, rtol=1e-10, atol=1e-10,
              regularizers=[KineticEnergy(), JacobianFrobenius("exact")]).double()
    x = torch.tensor([[1.0, -2.0], [0.5, 0.3]], dtype=torch.float64)
    logp = cnf.log_prob(x)
    # encoding runs from x at T back to 0: z(s) = x exp(a (s - T))
    kin = (a * x ** 2 * (1 - torch.exp(-2 * a * T)) / 2).sum(-1)
    torch.testing.assert_close(cnf.last_regularization["kinetic"], kin, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(cnf.last_regularization["jacobian_frobenius"],
                               torch.full((2,), float((a ** 2).sum()) * T, dtype=torch.float64))
    (-logp.mean() + cnf.regularization_loss()).backward()
    assert cnf.dynamics.a.grad is not None
    cnf.eval()
    cnf.log_prob(x)
    assert cnf.last_regularization is None


@pytest.mark.parametrize("output", ["keep", "drop"])
def test_augmented_block_shapes_and_gradient_match_closed_form(output):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, dtype=torch.float64, generator=g) * 0.5
    block = ODEBlock(_Linear(A), 0.0, 1.0, rtol=1e-10, atol=1e-10, augment=2,
                     augment_output=output)
    x = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = block(x)
    assert y.shape == ((4, 5) if output == "keep" else (4, 3))
    # y(1) = expm(A) [x, 0]: the zero channels start at zero and then move
    full = torch.cat([x, x.new_zeros(4, 2)], 1) @ torch.linalg.matrix_exp(A).T
    torch.testing.assert_close(y, full if output == "keep" else full[:, :3])
    (gx,) = torch.autograd.grad(y.sum(), x)
    rows = torch.linalg.matrix_exp(A)[: (5 if output == "keep" else 3), :3]
    torch.testing.assert_close(gx, rows.sum(0).expand(4, 3))


def test_augmented_block_pads_channels_of_images():
    block = ODEBlock(_Conv(), augment=3)
    y = block(torch.randn(2, 4, 5, 5))
    assert y.shape == (2, 7, 5, 5)
    with pytest.raises(ValueError, match="augment"):
        ODEBlock(_Conv(), augment=-1)
    with pytest.raises(ValueError, match="augment_output"):
        ODEBlock(_Conv(), augment=1, augment_output="project")


class _Linear(nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, t, z):
        return z @ self.A.T


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(7, 7, 3, padding=1)

    def forward(self, t, z):
        return torch.tanh(self.conv(z))


def test_cnf_regularised_gradient_is_the_same_with_every_strategy():
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for gradient in ("backprop", "adjoint", "checkpoint"):
        torch.manual_seed(0)
        cnf = CNF(ConcatMLPDynamics(2, (8,)), t1=0.5, gradient=gradient, rtol=1e-8, atol=1e-8,
                  regularizers=[KineticEnergy(0.1), JacobianFrobenius(weight=0.1),
                                SecondDerivative(0.1)]).double()
        loss = -cnf.log_prob(x, generator=torch.Generator().manual_seed(3)).mean() \
            + cnf.regularization_loss()
        loss.backward()
        grads[gradient] = torch.cat([p.grad.reshape(-1) for p in cnf.parameters()
                                     if p.grad is not None])
    torch.testing.assert_close(grads["checkpoint"], grads["backprop"])
    torch.testing.assert_close(grads["adjoint"], grads["backprop"], rtol=1e-6, atol=1e-7)
