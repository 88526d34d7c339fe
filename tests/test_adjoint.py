"""odeint_adjoint: gradients equal backpropagation through the solver; memory; options; errors."""

import pytest
import torch
from torch import nn

from neuralode import ODEInputError, odeint, odeint_adjoint

DT = torch.float64


class Linear(nn.Module):
    def __init__(self, n=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(0.5 * torch.randn(n, n, generator=g, dtype=DT))

    def forward(self, t, y):
        return y @ self.A.T


class MLP(nn.Module):
    """Small time-dependent MLP dynamics."""

    def __init__(self, n=3, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(n + 1, width).double()
        self.l2 = nn.Linear(width, n).double()

    def forward(self, t, y):
        tt = t.expand(*y.shape[:-1], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], -1))))


METHODS = {
    "dopri5": None,
    "tsit5": None,
    "bosh3": None,
    "rk4": {"step_size": 0.02},
    "explicit_adams": {"step_size": 0.02},
}


def _grads(fn, func, y0, t, method, options, loss_fn, **kw):
    ys = fn(func, y0, t, rtol=1e-10, atol=1e-10, method=method, options=options, **kw)
    loss = loss_fn(ys)
    inputs = (y0, t) + tuple(func.parameters())
    return torch.autograd.grad(loss, inputs)


def _rel(a, b):
    a = torch.cat([x.reshape(-1) for x in a])
    b = torch.cat([x.reshape(-1) for x in b])
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_adjoint_gradients_equal_backprop(method, model):
    func = Linear() if model == "linear" else MLP()
    y0 = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(1)).requires_grad_()
    t = torch.tensor([0.0, 0.3, 0.8, 1.0], dtype=DT, requires_grad=True)

    def loss_fn(ys):
        return (ys[1:] ** 2).sum() + ys[-1].sin().sum()

    g_bp = _grads(odeint, func, y0, t, method, METHODS[method], loss_fn)
    g_adj = _grads(odeint_adjoint, func, y0, t, method, METHODS[method], loss_fn)
    for name, a, b in zip(["y0", "t", "params"], g_adj[:2] + (g_adj[2:],),
                          g_bp[:2] + (g_bp[2:],)):
        a = a if isinstance(a, tuple) else (a,)
        b = b if isinstance(b, tuple) else (b,)
        assert _rel(a, b) < 1e-5, f"{method}/{model}: gradient wrt {name} differs"


def test_adjoint_gradcheck():
    torch.manual_seed(0)
    A = (0.5 * torch.randn(2, 2, dtype=DT)).requires_grad_()
    y0 = torch.randn(2, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT, requires_grad=True)

    def f(y0, A, t):
        return odeint_adjoint(lambda s, y: A @ y + torch.sin(s), y0, t, rtol=1e-11, atol=1e-12,
                              adjoint_params=(A,))

    assert torch.autograd.gradcheck(f, (y0, A, t), atol=1e-6, rtol=1e-5)


def test_loss_on_some_output_times_only():
    func = MLP(seed=3)
    y0 = torch.randn(4, 3, dtype=DT).requires_grad_()
    t = torch.linspace(0, 1, 6, dtype=DT).requires_grad_()
    for sel in ([1], [2, 4], [0, 5], [3]):
        def loss_fn(ys, sel=sel):
            return sum((ys[i] ** 3).sum() for i in sel)

        g_bp = _grads(odeint, func, y0, t, "dopri5", None, loss_fn)
        g_adj = _grads(odeint_adjoint, func, y0, t, "dopri5", None, loss_fn)
        assert _rel(g_adj, g_bp) < 1e-6, sel
        # outputs after the last used time contribute nothing, and nothing is integrated
        # for them: the time gradients there are zero
        assert torch.all(g_adj[1][max(sel) + 1:] == 0)


def test_the_backward_solve_starts_at_the_last_output_with_a_gradient():
    from neuralode.gradients.adjoint import _last_with_gradient
    g = torch.zeros(5, 6, dtype=DT)
    assert _last_with_gradient(g) == 0
    g[3, 5], g[1, 0] = 1e-300, -2.0
    assert _last_with_gradient(g) == 3
    g[4, 2] = float("nan")  # (a NaN gradient is not zero: the solve starts there)
    assert _last_with_gradient(g) == 4
    g0 = torch.zeros(4, 3, dtype=DT)
    g0[0, 1] = 1.0
    assert _last_with_gradient(g0) == 0


def test_tuple_state_and_backwards_time():
    class Coupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor([0.7, -0.3], dtype=DT))

        def forward(self, t, state):
            x, v = state
            return v, -self.k[0] * x + self.k[1] * v * torch.cos(t)

    func = Coupled()
    x0 = torch.tensor([1.0, 0.5], dtype=DT, requires_grad=True)
    v0 = torch.tensor([[0.0], [0.2]], dtype=DT).squeeze(1).requires_grad_()
    t = torch.tensor([2.0, 1.2, 0.0], dtype=DT, requires_grad=True)  # backwards in time
    grads = []
    for fn in (odeint, odeint_adjoint):
        xs, vs = fn(func, (x0, v0), t, rtol=1e-10, atol=1e-10)
        loss = (xs[1:] ** 2).sum() + vs[-1].sum()
        grads.append(torch.autograd.grad(loss, (x0, v0, t, func.k)))
    assert _rel(grads[1], grads[0]) < 1e-6


def test_seminorm_same_gradients_fewer_backward_nfe():
    func = MLP(n=4, width=64, seed=5)
    y0 = torch.randn(16, 4, dtype=DT).requires_grad_()
    t = torch.tensor([0.0, 3.0], dtype=DT)
    results = {}
    for norm in (None, "seminorm"):
        opts = {} if norm is None else {"norm": norm}
        ys, stats = odeint_adjoint(func, y0, t, rtol=1e-7, atol=1e-8, adjoint_options=opts,
                                   return_stats=True)
        assert stats.backward is None  # filled by .backward()
        g = torch.autograd.grad((ys[-1] ** 2).sum(), (y0,) + tuple(func.parameters()))
        results[norm] = (g, stats.backward.nfe, stats.nfe)
    g_full, nfe_full, fwd_full = results[None]
    g_semi, nfe_semi, fwd_semi = results["seminorm"]
    assert fwd_full == fwd_semi
    assert nfe_semi < nfe_full
    assert _rel(g_semi, g_full) < 1e-3


def test_forward_output_equals_odeint_and_backward_stats():
    func = MLP(seed=2)
    y0 = torch.randn(3, 3, dtype=DT, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=DT)
    a, s_a = odeint_adjoint(func, y0, t, return_stats=True)
    b, s_b = odeint(func, y0, t, return_stats=True)
    # same solver, same steps; only the summation order of stage combinations differs
    assert torch.allclose(a, b.detach(), rtol=1e-12, atol=1e-13)
    assert s_a.nfe == s_b.nfe and s_a.n_accepted == s_b.n_accepted
    a.sum().backward()
    assert s_a.backward.nfe > 0 and s_a.backward.n_accepted > 0


def _saved_bytes_during_forward(T, n_steps_per_unit=100):
    func = MLP(seed=0)
    y0 = torch.randn(8, 3, dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, float(T)], dtype=DT)
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        ys = odeint_adjoint(func, y0, t, method="rk4",
                            options={"step_size": 1.0 / n_steps_per_unit})
    ys.sum().backward()
    return total[0]


def test_forward_saves_only_outputs_independent_of_steps():
    short = _saved_bytes_during_forward(1)
    long = _saved_bytes_during_forward(16)  # 16x more solver steps
    assert short == long
    # while backprop through the solver saves memory proportional to the steps
    func = MLP(seed=0)
    y0 = torch.randn(8, 3, dtype=DT, requires_grad=True)
    sizes = []
    for T in (1, 4):
        total = [0]

        def pack(x, total=total):
            total[0] += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            odeint(func, y0, torch.tensor([0.0, float(T)], dtype=DT), method="rk4",
                   options={"step_size": 0.01})
        sizes.append(total[0])
    assert sizes[1] > 3 * sizes[0] > 0


def test_params_not_requiring_grad_unused_and_time_independent():
    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(torch.tensor([[-0.5, 1.0], [-1.0, -0.5]], dtype=DT))
            self.frozen = nn.Parameter(torch.tensor(2.0, dtype=DT), requires_grad=False)
            self.unused = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, t, y):  # no dependence on t
            return y @ self.A.T * self.frozen

    func = F()
    y0 = torch.tensor([[1.0, 0.0]], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT, requires_grad=True)
    ys = odeint_adjoint(func, y0, t)
    ys[-1].sum().backward()
    assert func.frozen.grad is None
    assert torch.equal(func.unused.grad, torch.zeros(3, dtype=DT))
    # d y(1)/d A for the linear ODE vs backprop
    ga = func.A.grad.clone()
    func.A.grad = None
    odeint(func, y0, t)[-1].sum().backward()
    assert torch.allclose(ga, func.A.grad, rtol=1e-5)


def test_float32_state():
    func = MLP(seed=1).float()
    y0 = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    ys = odeint_adjoint(func, y0, t, rtol=1e-6, atol=1e-7)
    assert ys.dtype == torch.float32
    ys.sum().backward()
    assert y0.grad.dtype == torch.float32 and torch.isfinite(y0.grad).all()


def test_error_func_not_module_without_params():
    with pytest.raises(ODEInputError, match=r"nn\.Module"):
        odeint_adjoint(lambda t, y: -y, torch.ones(2, requires_grad=True), torch.tensor([0.0, 1.0]))


def test_tensors_outside_the_adjoint_parameters_are_said_not_hidden():
    """A module with no parameters whose forward reaches tensors that require grad (a
    closure): the adjoint differentiates nothing, so the outputs' graph is backprop's through
    every step. That is said (a warning; the compiled forward, which backprop cannot
    differentiate, an error naming adjoint_params), and regularized_solve of a plain callable
    refuses the adjoint as solve does."""
    import warnings

    import neuralode
    from neuralode.regularizers import KineticEnergy, regularized_solve
    net = Linear()

    class Closure(nn.Module):
        def forward(self, t, y):
            return net(t, y)
    y0, t = torch.ones(2, 3, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)
    with pytest.warns(UserWarning, match="adjoint differentiates none .* backprop through"):
        ys = odeint_adjoint(Closure(), y0, t)
    assert ys.requires_grad  # (torchdiffeq's would carry no graph, and net no gradient)
    with pytest.warns(UserWarning, match="adjoint differentiates none"):
        neuralode.solve(Closure(), y0, t, gradient="adjoint", per_sample=True)
    with pytest.raises(ODEInputError, match=r"compiled forward solve .* adjoint_params"):
        odeint_adjoint(Closure(), y0, t, options={"compile": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odeint_adjoint(Closure(), y0, t, adjoint_params=tuple(net.parameters()))
        odeint_adjoint(net, y0, t)
        with torch.no_grad():
            odeint_adjoint(Closure(), y0, t)
    with pytest.raises(ODEInputError, match=r"gradient='adjoint'\) needs func to be an nn\."):
        regularized_solve(lambda t, y: net(t, y), y0, t, [KineticEnergy()], gradient="adjoint")
    ok = regularized_solve(lambda t, y: net(t, y), y0, t, [KineticEnergy()],
                           gradient=neuralode.gradients.Adjoint(params=(net.A,)))
    ref = regularized_solve(net, y0, t, [KineticEnergy()])
    (ga,) = torch.autograd.grad(ok.integrals["kinetic"].sum(), net.A)
    (gb,) = torch.autograd.grad(ref.integrals["kinetic"].sum(), net.A)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-9)


def test_error_tolerance_requiring_grad():
    func = Linear()
    y0 = torch.ones(3, dtype=DT)
    with pytest.raises(ODEInputError, match="require grad"):
        odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=DT),
                       adjoint_rtol=torch.tensor(1e-3, requires_grad=True))
    with pytest.raises(ODEInputError, match="require grad"):
        odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=DT),
                       rtol=torch.tensor(1e-3, requires_grad=True))
    with pytest.raises(ODEInputError, match="non-negative"):
        odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=DT), adjoint_atol="tight")


def test_error_adjoint_method_differs_without_adjoint_options():
    func = Linear()
    with pytest.raises(ODEInputError, match="adjoint_options"):
        odeint_adjoint(func, torch.ones(3, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT),
                       method="rk4", options={"step_size": 0.1}, adjoint_method="dopri5")
    # explicit adjoint options make it valid
    ys = odeint_adjoint(func, torch.ones(3, dtype=DT, requires_grad=True),
                        torch.tensor([0.0, 1.0], dtype=DT), method="rk4",
                        options={"step_size": 0.1}, adjoint_method="dopri5", adjoint_options={})
    ys.sum().backward()


def test_error_bad_seminorm_name_and_adjoint_params():
    func = Linear()
    with pytest.raises(ODEInputError, match="seminorm"):
        odeint_adjoint(func, torch.ones(3, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT),
                       adjoint_options={"norm": "semi"})
    with pytest.raises(ODEInputError, match="adjoint_params"):
        odeint_adjoint(func, torch.ones(3, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT),
                       adjoint_params=42)


def test_double_backward_is_supported():
    # gradients of gradients: tests/test_adjoint_higher_order.py
    func = Linear()
    y0 = torch.ones(3, dtype=DT, requires_grad=True)
    ys = odeint_adjoint(func, y0, torch.tensor([0.0, 1.0], dtype=DT))
    (g,) = torch.autograd.grad(ys.sum(), y0, create_graph=True)
    assert g.requires_grad


def test_backward_carries_step_size_across_output_times():
    # With many output times the adjoint solves one interval per output; restarting the
    # step-size heuristic at each would cost ~14 evaluations per interval here. Carrying the
    # step over leaves one dopri5 step per interval: a fresh f0 plus 6 stages.
    torch.manual_seed(0)
    func = MLP(n=8, width=32, seed=4)
    y0 = torch.randn(16, 8, dtype=DT, requires_grad=True)
    t = torch.linspace(0, 3, 60, dtype=DT)
    ys, stats = odeint_adjoint(func, y0, t, rtol=1e-6, atol=1e-6, return_stats=True)
    ys.pow(2).mean().backward()
    intervals = len(t) - 1
    assert stats.backward.nfe <= 8 * intervals
    g_adj = y0.grad.clone()
    y0.grad = None
    odeint(func, y0, t, rtol=1e-10, atol=1e-10).pow(2).mean().backward()
    assert ((g_adj - y0.grad).norm() / y0.grad.norm()).item() < 1e-5
