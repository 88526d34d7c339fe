"""Continuous normalizing flows and the planar-flow baseline (issue 6)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralode.models.cnf import (
    CNF,
    AugmentedDynamics,
    ConcatMLPDynamics,
    HyperNetDynamics,
    divergence_exact,
    divergence_hutchinson,
    sample_noise,
    standard_normal_log_prob,
)
from neuralode.models.planar import PlanarFlow, PlanarLayer

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-10}


@pytest.fixture(autouse=True)
def _one_thread():
    # These solves are many tiny ops; extra threads only add overhead on a shared machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class LinearDynamics(nn.Module):
    """f(t, z) = A z, whose flow is exp(A t) and whose log-det is t tr(A)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.dim = a.shape[0]
        self.a = nn.Parameter(a.clone())

    def forward(self, t, z):
        return z @ self.a.t()


class ConstantZeroDynamics(nn.Module):
    dim = 2

    def forward(self, t, z):
        return torch.zeros_like(z)


def _matrix():
    return torch.tensor([[0.3, -0.7], [0.5, -0.2]], dtype=F64)


def _nonlinear_cnf(estimator="exact", noise="gaussian", seed=0, **kw):
    torch.manual_seed(seed)
    dyn = HyperNetDynamics(2, width=8, hidden=16).double()
    with torch.no_grad():  # make the flow visibly non-trivial
        dyn.net[-1].weight.mul_(5.0)
        dyn.net[-1].bias.normal_(0.0, 0.5)
    return CNF(dyn, t1=1.0, estimator=estimator, noise=noise, **kw)


# ---------------------------------------------------------------------------------------------
# the change of variables
# ---------------------------------------------------------------------------------------------


def test_exact_trace_log_density_of_linear_flow_matches_closed_form():
    a, t1 = _matrix(), 0.8
    cnf = CNF(LinearDynamics(a), t1=t1, estimator="exact", **TIGHT)
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    z0 = x @ torch.linalg.matrix_exp(-a * t1).t()
    expected = standard_normal_log_prob(z0) - t1 * torch.trace(a)
    torch.testing.assert_close(cnf.log_prob(x), expected, rtol=1e-8, atol=1e-8)
    # and forwards: the accumulated trace is t * tr(A) for every sample
    _, a_t = cnf.decode(z0)
    torch.testing.assert_close(a_t, torch.full((16,), t1 * float(torch.trace(a)), dtype=F64),
                               rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_estimate_is_unbiased_within_statistical_bound(kind):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    n = 20000
    z = torch.randn(1, 3, dtype=F64).expand(n, 3).clone().requires_grad_(True)
    dz = net(z)
    exact = divergence_exact(dz, z, create_graph=False)
    noise = sample_noise(z, kind, torch.Generator().manual_seed(3))
    est = divergence_hutchinson(dz, z, noise, create_graph=False)
    assert float(est.std()) > 1e-3  # really a random estimate
    se = float(est.std()) / math.sqrt(n)
    assert abs(float(est.mean()) - float(exact[0])) < 4.0 * se
    assert torch.allclose(exact, exact[0].expand(n))


def test_hutchinson_cnf_log_density_is_unbiased_over_many_draws():
    cnf = _nonlinear_cnf("hutchinson", "rademacher", rtol=1e-7, atol=1e-8)
    n = 3000
    x = torch.tensor([[0.4, -0.9]], dtype=F64).expand(n, 2).clone()
    with torch.no_grad():
        exact = cnf.log_prob(x[:1], estimator="exact")
        est = cnf.log_prob(x, generator=torch.Generator().manual_seed(5))
    assert float(est.std()) > 1e-3
    se = float(est.std()) / math.sqrt(n)
    assert abs(float(est.mean()) - float(exact)) < 4.0 * se + 1e-5


def test_hutchinson_noise_is_held_fixed_during_one_solve():
    # For f = A z and a Rademacher eps in 2-D, eps^T A eps = tr(A) +- (A12 + A21). If the noise
    # were redrawn at every evaluation the integral would average the two values instead.
    a, t1 = _matrix(), 0.7
    cnf = CNF(LinearDynamics(a), t1=t1, estimator="hutchinson", noise="rademacher",
              options={"max_num_steps": 500}, **TIGHT)
    z0 = torch.randn(200, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, a_t = cnf.decode(z0, generator=torch.Generator().manual_seed(4))
    assert cnf.last_stats.nfe > 6
    rate = a_t / t1
    tr, off = float(torch.trace(a)), float(a[0, 1] + a[1, 0])
    dist = torch.minimum((rate - (tr + off)).abs(), (rate - (tr - off)).abs())
    assert float(dist.max()) < 1e-7
    assert 50 < int((rate > tr).sum()) < 150  # both signs occur


def test_sample_integrated_forward_then_backward_returns_to_itself():
    cnf = _nonlinear_cnf(rtol=1e-9, atol=1e-10)
    z0 = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, _ = cnf.decode(z0)
        back, _ = cnf.encode(x)
    assert float((x - z0).abs().max()) > 0.2  # the flow moved the points
    torch.testing.assert_close(back, z0, rtol=1e-6, atol=1e-6)


def test_sample_log_density_matches_log_prob_of_the_sample():
    cnf = _nonlinear_cnf(rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        x, log_q = cnf.sample(32, generator=torch.Generator().manual_seed(0), return_log_prob=True)
        torch.testing.assert_close(cnf.log_prob(x), log_q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["graph", "constant"])
def test_zero_dynamics_log_likelihood_equals_base_density(kind):
    if kind == "graph":  # f depends on z in the graph but is identically zero
        dyn = ConcatMLPDynamics(2, hidden=(8,)).double()
        with torch.no_grad():
            dyn.layers[-1].linear.weight.zero_()
            dyn.layers[-1].linear.bias.zero_()
    else:
        dyn = ConstantZeroDynamics()
    x = torch.randn(10, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 2
    base = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=F64),
                                                  torch.eye(2, dtype=F64))
    for est in ("exact", "hutchinson"):
        cnf = CNF(dyn, estimator=est)
        torch.testing.assert_close(cnf.log_prob(x), base.log_prob(x), rtol=1e-12, atol=1e-12)


def test_cnf_density_integrates_to_one():
    cnf = _nonlinear_cnf(rtol=1e-6, atol=1e-7)
    xs, _, logp = cnf.log_prob_grid(lim=7.0, n=90)
    cell = float(xs[1] - xs[0]) ** 2
    assert abs(float(logp.exp().sum()) * cell - 1.0) < 1e-2


def test_density_at_time_zero_is_the_base():
    cnf = _nonlinear_cnf()
    x = torch.randn(5, 2, dtype=F64)
    torch.testing.assert_close(cnf.log_prob(x, time=0.0), standard_normal_log_prob(x))


def test_trajectory_starts_at_base_and_ends_at_decode():
    cnf = _nonlinear_cnf(rtol=1e-8, atol=1e-9)
    z0 = torch.randn(20, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        times, zs, log_q = cnf.trajectory(z0, 4)
        x, a_t = cnf.decode(z0)
    assert zs.shape == (4, 20, 2) and log_q.shape == (4, 20)
    torch.testing.assert_close(times, torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=F64))
    torch.testing.assert_close(zs[0], z0)
    torch.testing.assert_close(zs[-1], x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_q[-1], standard_normal_log_prob(z0) - a_t,
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# dynamics and training
# ---------------------------------------------------------------------------------------------


def test_hypernet_exact_divergence_matches_analytic_trace():
    torch.manual_seed(0)
    dyn = HyperNetDynamics(2, width=5, hidden=7).double()
    t = torch.tensor(0.3, dtype=F64)
    z = torch.randn(6, 2, dtype=F64, requires_grad=True)
    dz, div = AugmentedDynamics(dyn, "exact")(t, (z, torch.zeros(6, dtype=F64)))
    w, u, b = dyn.unit_parameters(t)
    h = torch.tanh(z @ w.t() + b)
    analytic = ((1 - h**2) * (w * u).sum(-1)).sum(-1) / 5
    torch.testing.assert_close(div, analytic)
    torch.testing.assert_close(dz, h @ u / 5)


def test_concat_dynamics_depends_on_time():
    torch.manual_seed(0)
    dyn = ConcatMLPDynamics(2, hidden=(16, 16), activation="softplus")
    z = torch.randn(4, 2)
    assert dyn(torch.tensor(0.0), z).shape == (4, 2)
    assert not torch.allclose(dyn(torch.tensor(0.0), z), dyn(torch.tensor(1.0), z))


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_one_training_step_lowers_the_loss(estimator):
    torch.manual_seed(0)
    from neuralode.data.toy2d import sample_toy2d

    cnf = CNF(ConcatMLPDynamics(2, hidden=(32, 32)), t1=0.5, estimator=estimator,
              rtol=1e-5, atol=1e-5)
    x = sample_toy2d("8gaussians", 256, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(cnf.parameters(), lr=1e-2)

    def loss():  # the same probe noise before and after the step
        return -cnf.log_prob(x, generator=torch.Generator().manual_seed(9)).mean()

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert float(after) < float(before.detach()) - 1e-3


def test_trainable_time_gets_the_finite_difference_gradient():
    cnf = _nonlinear_cnf(rtol=1e-10, atol=1e-10, train_time=True)
    x = torch.tensor([[0.5, -0.3], [1.0, 1.2]], dtype=F64)
    cnf.log_t1.data = cnf.log_t1.data.double()
    loss = cnf.log_prob(x).sum()
    (g,) = torch.autograd.grad(loss, cnf.log_t1)
    eps = 1e-5
    with torch.no_grad():
        base = cnf.log_t1.clone()
        cnf.log_t1.copy_(base + eps)
        up = cnf.log_prob(x).sum()
        cnf.log_t1.copy_(base - eps)
        down = cnf.log_prob(x).sum()
        cnf.log_t1.copy_(base)
    fd = (up - down) / (2 * eps)
    assert abs(float(g)) > 1e-3
    assert abs(float(g) - float(fd)) < 1e-5 * max(1.0, abs(float(fd)))


def test_adjoint_gradients_match_backprop_through_the_solver():
    x = torch.tensor([[0.5, -0.3], [1.0, 1.2], [-2.0, 0.1]], dtype=F64)
    grads = []
    for gradient in ("backprop", "adjoint", "checkpoint"):
        cnf = _nonlinear_cnf(rtol=1e-9, atol=1e-10, gradient=gradient)
        loss = -cnf.log_prob(x).mean()
        grads.append(torch.autograd.grad(loss, list(cnf.parameters())))
    for g_bp, g_adj, g_ck in zip(*grads):
        torch.testing.assert_close(g_adj, g_bp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_ck, g_bp, rtol=1e-10, atol=1e-12)  # to rounding


@pytest.mark.filterwarnings("error::neuralode.solvers.compiled.CompileFallbackWarning")
@pytest.mark.parametrize("gradient,estimator", [("checkpoint", "hutchinson")])
def test_compiled_training_step_equals_eager_and_counts_every_evaluation(gradient, estimator):
    """options={"compile": ...}: the divergence is traced inside the compiled loop (torch.func's
    vjp; an enable_grad block records nothing there), so the solve compiles rather than falling
    back; loss, gradients, steps and evaluations (forward and backward) are the eager step's.
    ("aot_eager": dynamo's tracing, which is what failed, without inductor's compile time;
    the adjoint with the exact trace: ``test_cnf_experiment.py``'s training command.)"""
    torch.manual_seed(0)
    dynamics = ConcatMLPDynamics(dim=2, hidden=(8,)).double()
    x = torch.randn(16, 2, dtype=F64)

    def step(options):
        cnf = CNF(dynamics, estimator=estimator, gradient=gradient, options=options)
        loss = -cnf.log_prob(x, generator=torch.Generator().manual_seed(1)).mean()
        fwd = cnf.last_nfe
        return loss, torch.autograd.grad(loss, list(dynamics.parameters())), cnf, fwd

    loss_e, grads_e, eager, fwd_e = step(None)
    loss_c, grads_c, comp, fwd_c = step({"compile": "aot_eager"})
    if gradient == "adjoint":  # the forward solve compiled, not solved eagerly
        assert comp.last_stats.n_compiles == 1
    else:  # checkpointing's forward solve records its steps eagerly; its replay compiled
        assert comp.last_stats.extra["checkpoint"].compiled
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-13, atol=0)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-10, atol=1e-13)
    assert comp.last_stats.n_accepted == eager.last_stats.n_accepted
    assert fwd_c == fwd_e and comp.last_nfe == eager.last_nfe > fwd_e


def test_sample_noise_kinds():
    like = torch.zeros(4000, 3)
    r = sample_noise(like, "rademacher", torch.Generator().manual_seed(0))
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    g = sample_noise(like, "gaussian", torch.Generator().manual_seed(0))
    assert abs(float(g.std()) - 1.0) < 0.05 and len(g.unique()) > 1000


# ---------------------------------------------------------------------------------------------
# planar flow
# ---------------------------------------------------------------------------------------------


def test_planar_log_det_matches_autograd_jacobian():
    torch.manual_seed(0)
    layer = PlanarLayer(3).double()
    with torch.no_grad():
        layer.b.fill_(0.3)
    z = torch.randn(5, 3, dtype=F64)
    _, logdet = layer(z)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], z[i])
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac)[1])


def test_planar_constraint_keeps_layers_invertible():
    layer = PlanarLayer(2)
    with torch.no_grad():  # w . u = -5 would make the raw map non-invertible
        layer.w.copy_(torch.tensor([1.0, 0.0]))
        layer.u.copy_(torch.tensor([-5.0, 0.0]))
    assert float((layer.w @ layer.u_hat()).detach()) > -1.0
    y = torch.randn(100, 2, dtype=torch.float32)
    torch.testing.assert_close(layer(layer.inverse(y))[0], y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["generative", "normalizing"])
def test_planar_flow_sample_density_agrees_with_log_prob_and_integrates_to_one(mode):
    flow = PlanarFlow(2, 6, mode=mode, generator=torch.Generator().manual_seed(0)).double()
    x, log_q = flow.sample(50, generator=torch.Generator().manual_seed(1), return_log_prob=True)
    torch.testing.assert_close(flow.log_prob(x.detach()), log_q.detach(), rtol=1e-7, atol=1e-7)
    xs, _, logp = flow.log_prob_grid(lim=8.0, n=160)
    cell = float(xs[1] - xs[0]) ** 2
    assert abs(float(logp.exp().sum()) * cell - 1.0) < 1e-2


def test_planar_flow_training_step_lowers_the_loss():
    from neuralode.data.toy2d import sample_toy2d

    flow = PlanarFlow(2, 8, mode="normalizing", generator=torch.Generator().manual_seed(0))
    x = sample_toy2d("moons", 256, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    before = -flow.log_prob(x).mean()
    before.backward()
    opt.step()
    assert float(-flow.log_prob(x).mean().detach()) < float(before.detach()) - 1e-4


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    dyn = HyperNetDynamics(2, 4, 4)
    with pytest.raises(ValueError, match=r"'trace'.*exact, hutchinson"):
        CNF(dyn, estimator="trace")
    with pytest.raises(ValueError, match=r"'uniform'.*gaussian, rademacher"):
        CNF(dyn, noise="uniform")
    with pytest.raises(ValueError, match=r"t1 must be a positive .* -1"):
        CNF(dyn, t1=-1.0)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        CNF(lambda t, z: z)
    with pytest.raises(ValueError, match=r"'relu'.*tanh"):
        ConcatMLPDynamics(2, activation="relu")
    with pytest.raises(ValueError, match="width must be a positive int, got 0"):
        HyperNetDynamics(2, width=0)
    with pytest.raises(ValueError, match="3 features but the flow has dim=2"):
        CNF(dyn).log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"shape \(N, D\), got \(2,\)"):
        CNF(dyn).log_prob(torch.zeros(2))
    with pytest.raises(ValueError, match=r"time must be a finite number >= 0, got -0\.5"):
        CNF(dyn).log_prob(torch.zeros(4, 2), time=-0.5)
    with pytest.raises(ValueError, match=r"'svd'.*exact, hutchinson"):
        CNF(dyn).log_prob(torch.zeros(4, 2), estimator="svd")
    with pytest.raises(ValueError, match="needs a fixed noise"):
        AugmentedDynamics(dyn, "hutchinson")
    with pytest.raises(ValueError, match=r"'backward'.*generative, normalizing"):
        PlanarFlow(2, 3, mode="backward")
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        PlanarFlow(2, 0)
