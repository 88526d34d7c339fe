"""The Jacobian sources and linear algebra shared by the implicit methods."""

import math

import pytest
import torch

from neuralode.errors import ODEFuncError, ODEInputError
from neuralode.solvers.base import RHS, SolverStats, StateLayout
from neuralode.solvers.jacobian import (
    _CONVERGED,
    _DIVERGE,
    _GOING,
    JacobianSource,
    NewtonMatrix,
    _newton_verdict,
    check_jacobian_option,
    gmres,
    newton,
    rounding_floor,
)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _rhs(func, shape):
    layout = StateLayout([torch.Size(shape)], False)
    return RHS(func, layout, torch.float64, torch.device("cpu"), SolverStats())


def _vdp_batch(t, y):  # (B, 2): B independent Van der Pol oscillators, mu = 1 + b
    mu = 1.0 + torch.arange(y.shape[0], dtype=y.dtype)
    x, v = y[:, 0], y[:, 1]
    return torch.stack([v, mu * (1 - x**2) * v - x], 1)


def _vdp_jac(y):
    mu = 1.0 + torch.arange(y.shape[0], dtype=y.dtype)
    x, v = y[:, 0], y[:, 1]
    J = torch.zeros(y.shape[0], 2, 2)
    J[:, 0, 1] = 1
    J[:, 1, 0] = -2 * mu * x * v - 1
    J[:, 1, 1] = mu * (1 - x**2)
    return J


def test_dense_block_matrix_free_and_user_jacobians_agree():
    torch.manual_seed(0)
    y = torch.randn(3, 2)
    blocks = _vdp_jac(y)
    dense = torch.block_diag(*blocks)
    rhs = _rhs(_vdp_batch, (3, 2))
    J = JacobianSource("autograd", rhs, 6)(0.0, y.reshape(-1))
    assert torch.allclose(J, dense, atol=1e-14)
    Jb = JacobianSource("block", rhs, 6)(0.0, y.reshape(-1))
    assert torch.allclose(Jb, blocks, atol=1e-14)
    mf = JacobianSource("matrix_free", rhs, 6)(0.0, y.reshape(-1))
    v = torch.randn(6)
    assert torch.allclose(mf.mv(v), dense @ v, atol=1e-13)
    user = JacobianSource(lambda t, yy: _vdp_jac(yy), rhs, 6)(0.0, y.reshape(-1))
    assert torch.allclose(user, blocks)
    assert rhs.stats.n_jac == 4


def test_functions_torch_func_cannot_transform_fall_back_to_rows():
    def f(t, y):  # .item() breaks torch.func
        return -float(y[0].item() > -10) * y**2
    rhs = _rhs(f, (3,))
    y = torch.tensor([1.0, 2.0, 3.0])
    J = JacobianSource("autograd", rhs, 3)(0.0, y)
    assert torch.allclose(J, torch.diag(-2 * y))


def test_head_excludes_quadrature_components():
    def f(t, y):  # the last two components are quadratures of the first two
        return torch.cat([-y[:2] * y[1], y[:2] ** 2])
    rhs = _rhs(f, (4,))
    y = torch.tensor([1.0, 2.0, 5.0, 7.0])
    J = JacobianSource("autograd", rhs, 4, head=2)(0.0, y)
    assert torch.allclose(J, torch.tensor([[-2.0, -1.0], [0.0, -4.0]]))


@pytest.mark.parametrize("kind", ["autograd", "block", "matrix_free"])
@pytest.mark.parametrize("stages", [None, 2])
def test_newton_matrix_solves_i_minus_h_a_kron_j(kind, stages):
    torch.manual_seed(1)
    y = torch.randn(4, 2)
    rhs = _rhs(_vdp_batch, (4, 2))
    dense = torch.block_diag(*_vdp_jac(y))
    J = JacobianSource(kind, rhs, 8)(0.0, y.reshape(-1))
    h = 0.3
    A = 0.25 if stages is None else torch.tensor([[5 / 12, -1 / 12], [3 / 4, 1 / 4]])
    stats = SolverStats()
    M = NewtonMatrix(J, h, A, stats, gmres_rtol=1e-12)
    if stages is None:
        full = torch.eye(8) - h * A * dense
        b = torch.randn(8)
    else:
        full = torch.eye(16) - h * torch.kron(A, dense)
        b = torch.randn(2, 8)
    x = M.solve(b)
    assert x.shape == b.shape
    assert torch.allclose(full @ x.reshape(-1), b.reshape(-1), atol=1e-10)
    assert stats.n_lu == 1


def test_gmres_solves_and_reports_failure():
    torch.manual_seed(2)
    A = torch.eye(40) * 3 + 0.1 * torch.randn(40, 40)
    b = torch.randn(40)
    x, ok = gmres(lambda v: A @ v, b, rtol=1e-12)
    assert ok and torch.allclose(A @ x, b, atol=1e-10)
    x, ok = gmres(lambda v: A @ v, b, rtol=1e-14, restart=2, max_restarts=1)
    assert not ok


def test_newton_converges_quadratically_and_fails_clearly():
    stats = SolverStats()
    # z^3 + z - 10 = 0 componentwise (root 2), exact derivative at the root as the matrix
    J = torch.diag(torch.full((3,), 13.0))

    class Exact:
        def solve(self, b):
            return torch.linalg.solve(J, b)
    res = newton(lambda z: z**3 + z - 10, torch.full((3,), 1.9), Exact(), torch.full((3,), 1e-8),
                 tol=0.03, max_iters=10, stats=stats)
    assert res.converged and torch.allclose(res.z, torch.full((3,), 2.0), atol=1e-9)
    assert stats.n_newton == res.iterations
    # a matrix with the wrong sign makes the iteration diverge: reported, not raised
    class Wrong:
        def solve(self, b):
            return -b / 13.0
    bad = newton(lambda z: z**3 + z - 10, torch.full((3,), 1.9), Wrong(),
                 torch.full((3,), 1e-8), tol=0.03, max_iters=10, stats=stats)
    assert not bad.converged and "diverge" in bad.reason
    assert stats.n_newton_fail == 1
    nan = newton(lambda z: z * math.nan, torch.ones(3), Exact(), torch.ones(3), tol=0.03,
                 max_iters=5, stats=stats)
    assert not nan.converged and "non-finite" in nan.reason


def test_newton_min_iters_and_rounding_floor():
    """bdf's Newton (``min_iters=2``, ``floor``): a first correction within the tolerance
    does not converge unless it is at the rounding floor; a correction at the floor
    converges whatever its rate (rounding noise read as a rate >= 1 is not divergence);
    the defaults keep the one-iteration test."""
    tol, floor = 1e-2, 1e-3
    going = _newton_verdict(0, 5e-3, math.nan, 1.0, tol, 4, min_iters=2, floor=floor)[2]
    assert going == _GOING
    assert _newton_verdict(0, 5e-3, math.nan, 1.0, tol, 4)[2] == _CONVERGED
    assert _newton_verdict(0, 5e-4, math.nan, 1.0, tol, 4, min_iters=2, floor=floor)[2] \
        == _CONVERGED
    # rate 1 (the iterate no longer moves): divergence above the floor, converged below
    assert _newton_verdict(1, 5e-3, 5e-3, 1.0, tol, 4, min_iters=2, floor=floor)[2] \
        == _DIVERGE
    assert _newton_verdict(1, 5e-4, 5e-4, 1.0, tol, 4, min_iters=2, floor=floor)[2] \
        == _CONVERGED
    # per row (the batched path): the same verdicts elementwise
    nrm = torch.tensor([5e-3, 5e-4], dtype=torch.float64)
    v = _newton_verdict(1, nrm, nrm.clone(), torch.ones(2, dtype=torch.float64), tol, 4,
                        min_iters=2, floor=floor)[2]
    assert v.tolist() == [_DIVERGE, _CONVERGED]
    assert rounding_floor(1e-4, 2.0**-23) == pytest.approx(2 * 2.0**-23 / 1e-4)


def test_bad_options_and_user_jacobians_are_refused():
    with pytest.raises(ODEInputError, match="'jacobian'"):
        check_jacobian_option("kvaerno5", "dense")
    rhs = _rhs(_vdp_batch, (3, 2))
    with pytest.raises(ODEFuncError, match=r"returned shape \(5, 5\)"):
        JacobianSource(lambda t, y: torch.zeros(5, 5), rhs, 6)(0.0, torch.zeros(6))
    tup = RHS(lambda t, y: y, StateLayout([torch.Size([2]), torch.Size([2])], True),
              torch.float64, torch.device("cpu"), SolverStats())
    with pytest.raises(ODEInputError, match="block"):
        JacobianSource("block", tup, 4)


class _FailingRK:
    """dopri5's stepper that fails (as a Newton solve would) on steps longer than h_max."""

    def __init__(self, h_max):
        from neuralode.solvers.rk import RKStepper
        from neuralode.solvers.tableau import TABLEAUX
        self.inner = RKStepper(TABLEAUX["dopri5"])
        self.h_max = h_max

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, t, y, h, left_end=None):
        from neuralode.solvers.base import StepFailure
        if abs(h) > self.h_max:
            raise StepFailure(f"Newton iterations diverge (h={h:.3g})", factor=0.5)
        return self.inner.step(t, y, h, left_end)


def test_loop_rejects_failed_steps_or_reports_them():
    from neuralode.errors import ConvergenceError, StepSizeError
    from neuralode.solvers.controllers import ErrorNorm, FixedGridController, PIDController
    from neuralode.solvers.loop import integrate

    def run(controller_kind, h_max, throw=True):
        rhs = _rhs(lambda t, y: -y, (1,))
        norm = ErrorNorm(rhs.layout, 1e-6, 1e-9, None)
        if controller_kind == "pid":
            ctrl = PIDController().bind(norm, 4, {})
        else:
            ctrl = FixedGridController([0.0, 0.5, 1.0])
        return rhs, integrate(rhs, torch.ones(1), [0.0, 1.0], _FailingRK(h_max), ctrl,
                              throw=throw, name="test")

    rhs, res = run("pid", 0.05)
    assert abs(res.outs[-1].item() - math.exp(-1)) < 1e-6
    assert rhs.stats.n_rejected > 0
    with pytest.raises(ConvergenceError, match=r"step from t=0 to t=0.5 .*diverge"):
        run("grid", 0.1)
    _, res = run("grid", 0.1, throw=False)
    assert res.status == "convergence_failure" and "diverge" in res.message
    with pytest.raises(StepSizeError, match="last attempt failed: Newton iterations diverge"):
        run("pid", 0.0)


def test_fully_implicit_stages_with_a_transposed_jacobian():
    """jacrev of f = A @ y returns a non-contiguous view; the stage matrix I - h(A⊗J) must
    still be formed (gl4 and radauIIA5 failed on it)."""
    from neuralode import odeint

    A = torch.tensor([[-2.0, 1.0], [1.0, -20.0]])
    ref = torch.linalg.matrix_exp(A) @ torch.ones(2)
    for method in ("gl4", "radauIIA5"):
        y = odeint(lambda t, y: A @ y, torch.ones(2), torch.tensor([0.0, 1.0]), method=method,
                   options={"step_size": 0.05})
        assert torch.allclose(y[-1], ref, atol=1e-7), method
