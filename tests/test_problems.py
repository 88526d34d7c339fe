"""The stiff test problems (neuralode.problems): right-hand sides, analytic Jacobians,
batches with per-system constants, and the scipy reference against published values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuralode import ODEInputError, odeint
from neuralode.problems import (
    PROBLEMS,
    Hires,
    Oregonator,
    Robertson,
    VanDerPol,
    make_problem,
)

F64 = torch.float64

# Published reference values (facts). HIRES, OREGO, ROBER and VDPOL from the Test Set for IVP
# Solvers (Mazzia, Magherini; University of Bari), computed there with RADAU5 in extended
# precision. VDPOL there is the scaled form y1' = y2, y2' = ((1 - y1^2) y2 - y1) / eps with
# eps = 1e-6, y(0) = (2, 0), on [0, 2]; with t = mu tau, mu = 1e3, it is our Van der Pol
# (mu = 1000) at t = 2000, x = y1 and x' = y2 / mu.
PUBLISHED = {
    "hires": (321.8122, [0.7371312573325668e-3, 0.1442485726316185e-3, 0.5888729740967575e-4,
                         0.1175651343283149e-2, 0.2386356198831331e-2, 0.6238968252742796e-2,
                         0.2849998395185769e-2, 0.2850001604814231e-2]),
    "orego": (360.0, [0.1000814870318523e1, 0.1228178521549917e4, 0.1320554942846706e3]),
    "robertson": (1e11, [0.2083340149701255e-7, 0.8333360770334713e-13, 0.9999999791665050]),
    "vdp": (2000.0, [0.1706167732170483e1, -0.8928097010247975e0 / 1e3]),
}


def _states(name: str, batch: int, seed: int = 0) -> torch.Tensor:
    """Positive states of the size the problem meets (a random scale per component)."""
    g = torch.Generator().manual_seed(seed)
    scale = {"robertson": [1.0, 3e-5, 1.0], "vdp": [2.0, 1.0], "hires": [1e-2] * 7 + [6e-3],
             "orego": [1e2, 1e3, 1e2]}[name]
    return torch.rand(batch, len(scale), generator=g, dtype=F64) * torch.tensor(scale, dtype=F64)


def _per_system(name: str, batch: int, seed: int = 1) -> torch.Tensor:
    """(batch, P) constants: the defaults times factors in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(PROBLEMS[name].defaults, dtype=F64)
    return c * 2 ** (2 * torch.rand(batch, c.numel(), generator=g, dtype=F64) - 1)


def _make(name: str, constants: torch.Tensor) -> torch.nn.Module:
    cls = PROBLEMS[name]
    if cls is Robertson:
        return Robertson(*constants.unbind(-1))
    if cls is VanDerPol:
        return VanDerPol(constants[..., 0])
    return cls(constants)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_jacobian_matches_autograd(name):
    p = make_problem(name)
    for y in _states(name, 3):
        jac = torch.func.jacrev(lambda v: p(torch.zeros((), dtype=F64), v))(y)
        torch.testing.assert_close(p.jacobian(0.0, y), jac, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_batched_jacobian_is_one_block_per_system_with_its_own_constants(name):
    c = _per_system(name, 4)
    batch = _make(name, c)
    y = _states(name, 4)
    jac = batch.jacobian(0.0, y)
    assert jac.shape == (4, batch.n, batch.n)
    full = torch.func.jacrev(lambda v: batch(0.0, v))(y)  # (B, n, B, n)
    for i in range(4):
        torch.testing.assert_close(jac[i], full[i, :, i], rtol=1e-13, atol=1e-13)
        off = full[i, :, [j for j in range(4) if j != i]]
        assert bool((off == 0).all())


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_batch_with_per_system_constants_equals_separate_systems(name):
    c = _per_system(name, 5)
    y = _states(name, 5, seed=2)
    out = _make(name, c)(0.0, y)
    for i in range(5):
        torch.testing.assert_close(out[i], _make(name, c[i])(0.0, y[i]), rtol=1e-14, atol=0)
    shared = make_problem(name)
    torch.testing.assert_close(shared(0.0, y)[2], shared(0.0, y[2]), rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_numpy_versions_agree_with_torch(name):
    p = make_problem(name)
    for y in _states(name, 3, seed=3):
        np.testing.assert_allclose(p.numpy_func(0.0, y.numpy()), p(0.0, y).numpy(),
                                   rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(p.numpy_jacobian(0.0, y.numpy()), p.jacobian(0.0, y).numpy(),
                                   rtol=1e-14, atol=1e-300)
    c = _per_system(name, 3)
    batch = _make(name, c)
    y = _states(name, 3, seed=4)
    fun, jac = batch.numpy_callables(index=1)
    np.testing.assert_allclose(fun(0.0, y[1].numpy()), batch(0.0, y)[1].numpy(), rtol=1e-14)
    np.testing.assert_allclose(jac(0.0, y[1].numpy()), batch.jacobian(0.0, y)[1].numpy(),
                               rtol=1e-14)


def test_robertson_formula_and_conservation():
    p = Robertson()
    y = torch.tensor([0.7, 2e-5, 0.3], dtype=F64)
    expected = torch.tensor([-0.04 * 0.7 + 1e4 * 2e-5 * 0.3,
                             0.04 * 0.7 - 1e4 * 2e-5 * 0.3 - 3e7 * 4e-10,
                             3e7 * 4e-10], dtype=F64)
    torch.testing.assert_close(p(0.0, y), expected, rtol=1e-15, atol=0)
    assert abs(float(p(0.0, y).sum())) < 1e-17  # total mass is conserved


def test_log_parameters_give_the_same_field_and_chain_rule_gradients():
    y = _states("robertson", 2)
    plain = Robertson(learnable=True)
    logp = Robertson(log=True, learnable=True)
    torch.testing.assert_close(logp(0.0, y), plain(0.0, y), rtol=1e-14, atol=0)
    assert [n for n, _ in logp.named_parameters()] == ["constants_param"]
    plain(0.0, y).pow(2).sum().backward()
    logp(0.0, y).pow(2).sum().backward()
    # d/d log k = k d/dk
    torch.testing.assert_close(logp.constants_param.grad,
                               plain.constants_param.grad * plain.constants.detach(),
                               rtol=1e-12, atol=0)
    assert "constants_param" in dict(Robertson().named_buffers())


def test_float32_state_gets_float32_derivative():
    p = Oregonator()
    y = torch.tensor([1.0, 2.0, 3.0])
    assert p(0.0, y).dtype == torch.float32 and p.jacobian(0.0, y).dtype == torch.float32
    torch.testing.assert_close(p(0.0, y).double(), p(0.0, y.double()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_reference_matches_published_values(name):
    # Radau at rtol 1e-10 (faster than the default 1e-12) already agrees to < 1e-11 relative
    # (measured: at most 1.4e-12 over all components of the four problems).
    t, values = PUBLISHED[name]
    p = make_problem(name)
    ref = p.reference([p.t0, t], rtol=1e-10)
    assert ref.dtype == F64 and ref.shape == (2, p.n)
    torch.testing.assert_close(ref[0], p.y0)
    rel = (ref[-1] - torch.tensor(values, dtype=F64)).abs() / torch.tensor(values).abs()
    assert float(rel.max()) < 1e-10, rel


def test_default_reference_of_hires_matches_published_values_to_1e_12():
    t, values = PUBLISHED["hires"]
    ref = Hires().reference([t])  # rtol 1e-12 (measured: at most 1.6e-13 relative)
    rel = (ref[0] - torch.tensor(values, dtype=F64)).abs() / torch.tensor(values).abs()
    assert float(rel.max()) < 1e-12, rel


def test_reference_is_cached_and_keyed_by_constants(monkeypatch):
    p = Robertson(learnable=True)
    ts = torch.logspace(-4, 0, 5, dtype=F64)
    a = p.reference(ts)
    calls = []

    def stub(ts, *args):
        calls.append(1)
        return np.full((ts.size, 3), 7.0)

    monkeypatch.setattr(p, "_reference_one", stub)
    b = p.reference(ts)  # served from the cache
    assert not calls and torch.equal(a, b)
    b += 1  # a copy: the cache is not changed by the caller
    torch.testing.assert_close(p.reference(ts), a, rtol=0, atol=0)
    with torch.no_grad():
        p.constants_param[0] *= 2
    assert bool((p.reference(ts) == 7.0).all()) and calls  # new constants: solved again


def test_reference_of_a_batch_equals_the_references_of_its_systems():
    ks = torch.tensor([[0.04, 3e7, 1e4], [0.08, 1e7, 3e4]], dtype=F64)
    ts = torch.tensor([0.0, 1e-3, 0.1, 1.0], dtype=F64)
    both = Robertson(*ks.unbind(-1)).reference(ts, rtol=1e-10)
    assert both.shape == (4, 2, 3)
    for i in range(2):
        torch.testing.assert_close(both[:, i], Robertson(*ks[i]).reference(ts, rtol=1e-10),
                                   rtol=0, atol=0)
    torch.testing.assert_close(both.sum(-1), torch.ones(4, 2, dtype=F64), rtol=1e-12, atol=0)


def test_neuralode_solves_a_problem_module_to_the_reference():
    p = Hires()  # mildly stiff: an explicit method manages the first time unit
    ts = torch.linspace(0.0, 1.0, 5, dtype=F64)
    ys = odeint(p, p.initial_state(), ts, rtol=1e-10, atol=1e-14, method="dopri5")
    torch.testing.assert_close(ys, p.reference(ts, rtol=1e-11), rtol=1e-8, atol=1e-14)


def test_invalid_input_is_refused_with_the_valid_shapes():
    p = Robertson()
    with pytest.raises(ODEInputError, match=r"shape \(3,\) or \(B, 3\), got \(4,\)"):
        p(0.0, torch.zeros(4, dtype=F64))
    batch = Robertson(torch.tensor([0.04, 0.05]), 3e7, 1e4)
    assert batch.batch_size == 2 and batch.initial_state().shape == (2, 3)
    with pytest.raises(ODEInputError, match=r"batch of 2.*\(2, 3\), got \(3,\)"):
        batch(0.0, torch.zeros(3, dtype=F64))
    with pytest.raises(ODEInputError, match="unknown problem 'rober'; valid problems are: "
                                            "robertson, vdp, hires, orego"):
        make_problem("rober")
    with pytest.raises(ODEInputError, match="log=True needs positive constants"):
        Robertson(k1=-1.0, log=True)
    with pytest.raises(ODEInputError, match=r"shape \(10,\) or \(B, 10\)"):
        Hires([1.0, 2.0])
    with pytest.raises(ODEInputError, match="strictly increasing and >= t0"):
        p.reference([1.0, 0.5])
    with pytest.raises(ODEInputError, match="strictly increasing and >= t0"):
        p.reference([-1.0])
