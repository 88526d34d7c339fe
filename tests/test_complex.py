"""Complex states (complex64/complex128, tensors and tuples): solved as the real state of
their real and imaginary parts, so every method, dense output, events, per-sample batches
and every gradient work on them; time and parameters stay real.

The reference is the two-level Schrodinger equation dpsi/dt = -i H psi with
H = [[1, g], [g, -1]] (g = 1/2): psi(t) = expm(-i H t) psi0, and from psi0 = (1, 0) the
population of the second level is (g^2 / W^2) sin^2(W t), W = sqrt(1 + g^2) (Rabi)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from neuralode import (
    Adjoint,
    Checkpoint,
    ODEFuncError,
    ODEInputError,
    odeint,
    odeint_adjoint,
    odeint_dense,
    odeint_event,
    solve,
)
from neuralode.solvers import SOLVERS

C128 = torch.complex128
F64 = torch.float64
G = 0.5
H = torch.tensor([[1.0, G], [G, -1.0]], dtype=C128)
PSI0 = torch.tensor([1.0, 0.0], dtype=C128)
T = torch.linspace(0.0, 2.0, 5, dtype=F64)
W = math.sqrt(1 + G**2)


def schrodinger(t, psi):
    return -1j * (psi @ H.T)  # psi (..., 2): one state or a batch of them


def exact(t: torch.Tensor, psi0=PSI0) -> torch.Tensor:
    """psi at the times t, (len(t), 2)."""
    return torch.stack([torch.linalg.matrix_exp(-1j * H * float(ti)) @ psi0 for ti in t])


def as_real_system(t, x):
    """The same equation on the real (2, 2) state of (real, imaginary) parts, written out:
    d(u + iv)/dt = -i H (u + iv)  <=>  du/dt = H v, dv/dt = -H u."""
    u, v = x[:, 0], x[:, 1]
    Hr = H.real
    return torch.stack([Hr @ v, -(Hr @ u)], 1)


def options_for(cls) -> dict | None:
    return None if cls.adaptive else {"step_size": 0.01}


def quiet_solve(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy_solver's notes
        return solve(*args, **kwargs)


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_every_method_solves_a_complex_state_as_its_real_and_imaginary_parts(method):
    """The same steps, statistics and values (to rounding) as the real system of the parts:
    the error norm treats the real and imaginary parts as real numbers."""
    cls = SOLVERS[method]
    kw = {"rtol": 1e-6, "atol": 1e-8, "method": method, "options": options_for(cls)}
    z = quiet_solve(schrodinger, PSI0, T, **kw)
    r = quiet_solve(as_real_system, torch.view_as_real(PSI0).clone(), T, **kw)
    assert z.ys.dtype == C128 and z.ys.shape == (len(T), 2)
    assert z.stats.n_accepted == r.stats.n_accepted
    assert z.stats.n_rejected == r.stats.n_rejected
    torch.testing.assert_close(torch.view_as_real(z.ys), r.ys, rtol=1e-10, atol=1e-12)


FAMILIES = {  # one method per family: error against the matrix exponential
    "dopri5": 1e-7, "tsit5": 1e-7, "dopri8": 1e-6, "bosh3": 1e-6, "rk4": 1e-8,
    "explicit_adams": 1e-6, "adams": 1e-6, "radauIIA5": 1e-8, "kvaerno5": 1e-6,
    "rodas5p": 1e-6, "bdf": 1e-5, "gl4": 1e-8,
}


@pytest.mark.parametrize("method", sorted(FAMILIES))
def test_complex_solution_matches_the_matrix_exponential(method):
    ys = quiet_solve(schrodinger, PSI0, T, rtol=1e-9, atol=1e-11, method=method,
                     options=options_for(SOLVERS[method])).ys
    assert float((ys - exact(T)).abs().max()) < FAMILIES[method]


def test_complex64_state_keeps_its_dtype_and_real_float32_time():
    seen = []

    def f(t, psi):
        seen.append(t.dtype)
        return -1j * (H.to(torch.complex64) @ psi)
    ys = odeint(f, PSI0.to(torch.complex64), T.float(), rtol=1e-5, atol=1e-7)
    assert ys.dtype == torch.complex64
    assert set(seen) == {torch.float32}
    assert float((ys.to(C128) - exact(T)).abs().max()) < 1e-4


def test_tuple_of_complex_tensors():
    phase0 = torch.tensor(1.0 + 0.0j, dtype=C128)
    ys = odeint(lambda t, y: (schrodinger(t, y[0]), -2j * y[1]), (PSI0, phase0), T,
                rtol=1e-10, atol=1e-12)
    assert float((ys[0] - exact(T)).abs().max()) < 1e-8
    torch.testing.assert_close(ys[1], torch.exp(-2j * T.to(C128)), rtol=1e-8, atol=1e-9)


def test_per_element_tolerances_of_a_complex_state_cover_both_parts():
    """atol per complex element applies to its real and its imaginary part."""
    atol = torch.tensor([1e-12, 1e-6], dtype=F64)
    z = solve(schrodinger, PSI0, T, rtol=0.0, atol=atol)
    r = solve(as_real_system, torch.view_as_real(PSI0).clone(), T, rtol=0.0,
              atol=atol[:, None].expand(2, 2))
    assert z.stats.n_accepted == r.stats.n_accepted
    torch.testing.assert_close(torch.view_as_real(z.ys), r.ys, rtol=1e-10, atol=1e-12)


def test_dense_output_of_a_complex_state():
    q = torch.tensor([0.37, 1.3], dtype=F64)
    sol = solve(schrodinger, PSI0, T, rtol=1e-10, atol=1e-12, dense=True)
    assert float((sol.evaluate(q) - exact(q)).abs().max()) < 1e-8
    dense = odeint_dense(schrodinger, PSI0, 0.0, 2.0, rtol=1e-10, atol=1e-12)
    assert float((dense(q) - exact(q)).abs().max()) < 1e-8


def test_event_on_a_complex_state_at_the_rabi_time():
    """|psi_1|^2 = 0.1 first at W t = pi / 4 (population (g/W)^2 sin^2(W t) = 0.2 sin^2)."""
    def population(t, psi):
        return psi[1].abs() ** 2 - 0.1
    event_t, ys = odeint(schrodinger, PSI0, T, event_fn=population, rtol=1e-10, atol=1e-12)
    assert abs(float(event_t) - math.pi / (4 * W)) < 1e-8
    assert abs(float(ys[-1][1].abs() ** 2) - 0.1) < 1e-8


@pytest.mark.parametrize("interface", [odeint, odeint_adjoint])
def test_event_time_gradient_of_a_complex_state_matches_finite_differences(interface):
    """odeint_event: d(t* + sum Re psi(t*))/dpsi0 by the implicit function theorem."""
    def population(t, psi):
        return psi[1].abs() ** 2 - 0.1

    def run(psi0, **kw):
        t_ev, sol = odeint_event(schrodinger, psi0, torch.tensor(0.0, dtype=F64),
                                 event_fn=population, rtol=1e-12, atol=1e-14, **kw)
        return t_ev + sol[-1].real.sum()
    psi0 = torch.tensor([0.95, 0.1 + 0.05j], dtype=C128, requires_grad=True)
    kw = {} if interface is odeint else {"adjoint_params": ()}
    (g,) = torch.autograd.grad(run(psi0, odeint_interface=interface, **kw), psi0)
    eps, fd = 1e-6, []
    with torch.no_grad():
        for i in range(2):
            e = torch.eye(2, dtype=C128)[i]
            fd.append(complex(float(run(psi0 + eps * e) - run(psi0 - eps * e)) / (2 * eps),
                              float(run(psi0 + 1j * eps * e) - run(psi0 - 1j * eps * e))
                              / (2 * eps)))
    torch.testing.assert_close(g, torch.tensor(fd, dtype=C128), rtol=1e-6, atol=1e-6)


def test_per_sample_complex_batch():
    psi0 = torch.stack([PSI0, torch.tensor([0.6, 0.8j], dtype=C128)])
    sol = solve(schrodinger, psi0, T, rtol=1e-10, atol=1e-12, per_sample=True)
    assert sol.stats.driver == "batched"  # the tensor clock, on the real parts
    for b in range(2):
        assert float((sol.ys[:, b] - exact(T, psi0[b])).abs().max()) < 1e-8


def test_per_sample_complex_event_and_dense_output():
    sol = solve(schrodinger, PSI0[None], T, rtol=1e-10, atol=1e-12, per_sample=True,
                dense=True, event_fn=lambda t, psi: psi[..., 1].abs() ** 2 - 0.1)
    assert sol.status == ["event"]
    assert abs(float(sol.event_t[0]) - math.pi / (4 * W)) < 1e-8
    q = torch.tensor([0.3], dtype=F64)
    got = sol.evaluate(q)
    assert got.dtype == C128
    assert float((got[0, 0] - exact(q)[0]).abs().max()) < 1e-8


class Hamiltonian(nn.Module):
    """-i H(w) psi with a real parameter w = (detuning, coupling)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, G], dtype=F64))

    def forward(self, t, psi):
        d, g = self.w
        Hm = torch.stack([torch.stack([d, g]), torch.stack([g, -d])]).to(C128)
        return -1j * (psi @ Hm.T)


def loss(ys):
    """Real and depends on both parts of two outputs."""
    return (ys[-1].real ** 2 + 3 * ys[-1].imag).sum() + (ys[2] * ys[2].conj()).real[..., 0].sum()


def finite_differences(psi0, eps=1e-6):
    """dL/dw and dL/dpsi0 (PyTorch's convention for a real loss of a complex input:
    dL/dRe + i dL/dIm) by central differences."""
    def L(w, y):
        m = Hamiltonian()
        with torch.no_grad():
            m.w.copy_(w)
            return float(loss(odeint(m, y, T, rtol=1e-12, atol=1e-14)))
    w0 = Hamiltonian().w.detach()
    e = torch.eye(2, dtype=F64)
    dw = torch.tensor([(L(w0 + eps * e[i], psi0) - L(w0 - eps * e[i], psi0)) / (2 * eps)
                       for i in range(2)], dtype=F64)
    dy = []
    for i in range(2):
        ei = e[i].to(C128)
        dre = (L(w0, psi0 + eps * ei) - L(w0, psi0 - eps * ei)) / (2 * eps)
        dim = (L(w0, psi0 + 1j * eps * ei) - L(w0, psi0 - 1j * eps * ei)) / (2 * eps)
        dy.append(complex(dre, dim))
    return dw, torch.tensor(dy, dtype=C128)


@pytest.fixture(scope="module")
def fd_gradients():
    return finite_differences(PSI0)


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint",
                                      "interpolated_adjoint"])
def test_complex_gradients_match_finite_differences(gradient, fd_gradients):
    m = Hamiltonian()
    psi0 = PSI0.clone().requires_grad_()
    ys = odeint(m, psi0, T, rtol=1e-10, atol=1e-12, gradient=gradient)
    gw, gy = torch.autograd.grad(loss(ys), (m.w, psi0))
    assert gy.dtype == C128 and gw.dtype == F64
    torch.testing.assert_close(gw, fd_gradients[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gy, fd_gradients[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gradient", [Adjoint(), Checkpoint()])
def test_per_sample_complex_gradients_match_backprop(gradient):
    m = Hamiltonian()
    psi0 = torch.stack([PSI0, torch.tensor([0.6, 0.8j], dtype=C128)]).requires_grad_()
    ys = odeint(m, psi0, T, rtol=1e-10, atol=1e-12, per_sample=True, gradient=gradient)
    got = torch.autograd.grad(loss(ys), (m.w, psi0))
    ref = torch.autograd.grad(loss(odeint(m, psi0, T, rtol=1e-10, atol=1e-12)), (m.w, psi0))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-8)


def test_time_gradients_of_a_complex_state_agree():
    grads = []
    for gradient in ("backprop", "adjoint"):
        t = T.clone().requires_grad_()
        grads.append(torch.autograd.grad(loss(odeint(Hamiltonian(), PSI0, t, rtol=1e-10,
                                                     atol=1e-12, gradient=gradient)), t)[0])
    assert grads[0].dtype == F64
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-7, atol=1e-8)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_complex32_is_refused():
    with pytest.raises(ODEInputError, match="complex64 or complex128"):
        odeint(schrodinger, PSI0.to(torch.complex32), T)


def test_func_returning_a_real_tensor_for_a_complex_state_is_an_error():
    with pytest.raises(ODEFuncError, match=r"returned dtype torch\.float64.*complex128"):
        odeint(lambda t, y: y.real, PSI0, T)


def test_adjoint_refuses_complex_parameters():
    Hp = H.clone().requires_grad_()
    with pytest.raises(ODEInputError, match="must be real"):
        odeint_adjoint(lambda t, y: -1j * (Hp @ y), PSI0, T, adjoint_params=(Hp,))
