"""One set of numerics: every method and every gradient strategy per sample equals the
one-problem solver, the drivers share their formulas, and the package's layout has no
import cycles."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import neuralode
from neuralode import GustafssonController, solve
from neuralode.solvers import SOLVERS
from neuralode.solvers.scipy_solver import SCIPY_SOLVERS

B = 3
T = torch.tensor([0.0, 0.4, 1.1, 2.0], dtype=torch.float64)
Y0 = torch.tensor([[2.0, 0.0, 1.0], [0.5, -1.0, 3.0], [-1.5, 0.7, 0.3]], dtype=torch.float64)


def vdp(t, y):
    """Van der Pol with its mu carried in the state (y = (x, v, mu)), any batch shape, so
    the same function serves a sample alone (y (3,), t 0-d) and a batch (y (B, 3), t (B,))."""
    x, v, mu = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([v, mu * (1 - x**2) * v - x + 0.1 * torch.sin(t), torch.zeros_like(mu)],
                       -1)


def _options(name: str):
    """One set of options per method (fixed grids at a step size, scipy per solver)."""
    cls = SOLVERS[name]
    if name == "scipy_solver":
        return [{"solver": s} for s in SCIPY_SOLVERS]
    if not cls.adaptive:
        return [{"step_size": 0.05}]
    return [None]


CASES = [(name, o) for name in SOLVERS for o in _options(name)]


def _rel(a, b):
    return float(((a - b).abs() / (b.abs() + 1e-300)).max()) if a.numel() else 0.0


@pytest.mark.parametrize("name,options", CASES,
                         ids=[f"{n}-{(o or {}).get('solver', '')}" for n, o in CASES])
def test_every_method_per_sample_equals_its_solo_solves(name, options):
    _equals_solo({"method": name, "options": options, "rtol": 1e-6, "atol": 1e-8})


def _equals_solo(kw):
    """Every sample of a per-sample solve equals its solo solve: float64 outputs to 1e-10
    relative, the same accepted and rejected steps."""
    sol = solve(vdp, Y0, T, per_sample=True, **kw)
    assert sol.success, sol.message
    for b in range(B):
        one = solve(vdp, Y0[b], T, **kw)
        assert _rel(sol.ys[:, b], one.ys) <= 1e-10, (kw["method"], b)
        assert int(sol.stats.n_accepted[b]) == one.stats.n_accepted
        assert int(sol.stats.n_rejected[b]) == one.stats.n_rejected


@pytest.mark.parametrize("tol", [1e-6, 1e-9, 1e-12])
def test_dopri8_per_sample_equals_its_solo_solves_at_every_tolerance(tol):
    # dopri8's embedded error estimate is ~1e-12 of its stages: a last-bit difference in
    # how the two drivers sum the stages (a fused addmv on the float clock, a per-row
    # product then add on the tensor clock) moved its steps by ~1e-5 and its outputs by
    # ~1e-9; its stage sums are formed the same way in both drivers
    _equals_solo({"method": "dopri8", "rtol": tol, "atol": tol})


def test_the_stiff_one_step_methods_run_per_sample():
    # today's crash: the Rosenbrock and ESDIRK tableaux were handed to the explicit stepper
    for name in ("rodas4", "rodas5p", "kvaerno3", "kvaerno4", "kvaerno5"):
        sol = solve(lambda t, y: -y, torch.ones(2, 2, dtype=torch.float64),
                    torch.tensor([0.0, 1.0], dtype=torch.float64), per_sample=True,
                    method=name)
        assert sol.stats.driver == "batched"
        assert torch.allclose(sol.ys[-1], torch.full((2, 2), math.exp(-1.0),
                                                     dtype=torch.float64), rtol=1e-5)


def test_explicit_rk_methods_run_on_the_tensor_clock():
    sol = solve(vdp, Y0, T, per_sample=True, method="dopri5")
    assert sol.stats.driver == "batched"
    assert sol.stats.nfe < sum(solve(vdp, Y0[b], T).stats.nfe for b in range(B))


# -- the stiff one-step methods (Rosenbrock, ESDIRK) on the tensor clock ------------------

STIFF = ["rodas4", "kvaerno4"]


@pytest.mark.parametrize("method", STIFF)
@pytest.mark.parametrize("options", [{"step_to_outputs": False}, {"time_arg": "none"}],
                         ids=["interpolated", "time_arg_none"])
def test_stiff_batched_options_equal_solo(method, options):
    f = vdp if "time_arg" not in options else (lambda t, y: vdp(torch.zeros(()), y))
    sol = solve(f, Y0, T, per_sample=True, method=method, options=options)
    assert sol.stats.driver == "batched"
    solo_opts = {k: v for k, v in options.items() if k != "time_arg"}
    for b in range(B):
        one = solve(f, Y0[b], T, method=method, options=solo_opts or None)
        assert _rel(sol.ys[:, b], one.ys) <= 1e-10
        assert int(sol.stats.n_accepted[b]) == one.stats.n_accepted


@pytest.mark.parametrize("method", ["rodas5p", "kvaerno5"])
def test_stiff_batched_dense_events_and_shrink_equal_solo(method):
    def event(t, y):
        return y[..., 0] - 1.0  # x crosses 1
    sol = solve(vdp, Y0, T, per_sample=True, method=method, event_fn=event, dense=True)
    assert sol.stats.driver == "batched"
    q = torch.tensor([0.3, 0.9], dtype=torch.float64)
    for b in range(B):
        one = solve(vdp, Y0[b], T, method=method, event_fn=event, dense=True)
        assert sol.status[b] == one.status
        if one.event_t is None:
            assert math.isnan(float(sol.event_t[b]))
        else:
            assert abs(float(sol.event_t[b]) - float(one.event_t)) <= 1e-10
        inside = q <= float(sol.t_final[b])
        assert _rel(sol.evaluate(q[inside])[:, b], one.evaluate(q[inside])) <= 1e-10
    shrunk = solve(vdp, Y0, T, per_sample=True, method=method, options={"shrink": 0.9})
    full = solve(vdp, Y0, T, per_sample=True, method=method)
    assert torch.equal(shrunk.stats.n_accepted, full.stats.n_accepted)
    assert _rel(shrunk.ys, full.ys) <= 1e-12


@pytest.mark.parametrize("method", STIFF)
def test_stiff_batched_failure_stays_in_its_sample(method):
    def f(t, y):  # y' = y^2 blows up at t = 1/y0: sample 1 (y0 = 2) fails at t = 0.5
        return y * y
    y0 = torch.tensor([[0.1], [2.0], [-1.0]], dtype=torch.float64)
    o = {"max_num_steps": 300}
    sol = solve(f, y0, T, per_sample=True, method=method, throw=False, options=o)
    assert sol.stats.driver == "batched"
    for b in range(3):
        one = solve(f, y0[b], T, method=method, throw=False, options=o)
        assert sol.status[b] == one.status
        assert int(sol.stats.n_accepted[b]) == one.stats.n_accepted
    assert sol.status[1] != "success" and sol.status[0] == sol.status[2] == "success"


def test_esdirk_batched_newton_failures_are_retried_per_row_as_solo():
    # mu = 1, 300, 30: with 2 Newton iterations allowed, each sample's solves fail at
    # other steps; each failed row is retried alone with a fresh Jacobian, then h / 2
    y0 = torch.tensor([[2.0, 0.0, 1.0], [2.0, 0.0, 300.0], [-1.5, 0.7, 30.0]],
                      dtype=torch.float64)
    kw = {"method": "kvaerno5", "rtol": 1e-6, "atol": 1e-8, "options": {"max_iters": 2}}
    sol = solve(vdp, y0, T[:3], per_sample=True, **kw)
    fails = 0
    for b in range(3):
        one = solve(vdp, y0[b], T[:3], **kw)
        fails += one.stats.n_newton_fail
        assert _rel(sol.ys[:, b], one.ys) <= 1e-10
        assert int(sol.stats.n_accepted[b]) == one.stats.n_accepted
        assert int(sol.stats.n_rejected[b]) == one.stats.n_rejected
    assert fails > 0 and sol.stats.n_newton_fail == fails


@pytest.mark.parametrize("method", ["implicit_euler", "sdirk2"])
def test_fixed_grid_implicit_batched_convergence_failure_per_row(method):
    # 3 Newton iterations are too few for some samples' first step: those rows end with
    # "convergence_failure" where they started, the others run to the end, as alone
    y0 = torch.tensor([[2.0, 0.0, 1.0], [2.0, 0.0, 300.0], [-1.5, 0.7, 30.0]],
                      dtype=torch.float64)
    kw = {"method": method, "options": {"step_size": 0.05, "max_iters": 3}, "throw": False}
    sol = solve(vdp, y0, T, per_sample=True, **kw)
    assert sol.stats.driver == "batched"
    for b in range(3):
        one = solve(vdp, y0[b], T, **kw)
        assert sol.status[b] == one.status
        assert float(sol.t_final[b]) == one.t_final
        assert int(sol.stats.n_accepted[b]) == one.stats.n_accepted
        if one.status == "success":
            assert _rel(sol.ys[:, b], one.ys) <= 1e-10
        else:
            assert "(h=0.05) failed" in sol.message[b] and "(h=0.05) failed" in one.message
    assert "convergence_failure" in sol.status and "success" in sol.status
    with pytest.raises(neuralode.ConvergenceError):
        solve(vdp, y0, T, per_sample=True, **dict(kw, throw=True))


@pytest.mark.parametrize("method", ["sdirk2", "radauIIA3"])
def test_fixed_grid_implicit_batched_backprop_equals_solo(method):
    # the graph of each row's exact Newton step (implicit function theorem) on the batch
    f = Dyn()
    kw = {"method": method, "options": {"step_size": 0.1}}
    y0 = (0.3 * Y0).clone().requires_grad_(True)
    w = torch.randn(len(T), B, 3, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    sol = solve(f, y0, T, per_sample=True, **kw)
    assert sol.stats.driver == "batched"
    got = _grads(f, y0, (sol.ys * w).sum())
    want = [torch.zeros_like(g) for g in got]
    for b in range(B):
        yb = (0.3 * Y0[b]).clone().requires_grad_(True)
        gb = _grads(f, yb, (solve(f, yb, T, **kw).ys * w[:, b]).sum())
        want[0][b] = gb[0]
        for a, g in zip(want[1:], gb[1:]):
            a += g
    for a, c in zip(got, want):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-12)


def test_stiff_float32_batched_and_other_jacobians_sample_by_sample():
    y0 = Y0.float()
    sol = solve(vdp, y0, T, per_sample=True, method="rodas5p", rtol=1e-4, atol=1e-6)
    # float32: the per-row factors h gamma, d_i h, C_ij / h are formed in float64 and
    # rounded once, as the one-problem step's Python floats are
    for b in range(B):
        one = solve(vdp, y0[b], T, method="rodas5p", rtol=1e-4, atol=1e-6)
        assert sol.ys.dtype == torch.float32
        assert torch.allclose(sol.ys[:, b], one.ys, rtol=1e-6, atol=1e-7)
        assert int(sol.stats.n_accepted[b]) == one.stats.n_accepted
    for method in ("rodas5p", "kvaerno5"):
        mf = solve(vdp, Y0, T, per_sample=True, method=method,
                   options={"jacobian": "matrix_free"})
        assert mf.stats.driver == "sample_by_sample"
        with pytest.raises(neuralode.ODEInputError, match="compile"):
            solve(vdp, Y0, T, per_sample=True, method=method, options={"compile": True})


# -- every float-clock feature per sample --------------------------------------------------


@pytest.mark.parametrize("options", [{"step_t": [0.7]}, {"jump_t": [0.9]}],
                         ids=["step_t", "jump_t"])
def test_stops_per_sample_equal_solo(options):
    sol = solve(vdp, Y0, T, per_sample=True, method="dopri5", options=options)
    for b in range(B):
        one = solve(vdp, Y0[b], T, method="dopri5", options=options)
        assert _rel(sol.ys[:, b], one.ys) <= 1e-12
        assert int(sol.stats.n_accepted[b]) == one.stats.n_accepted


def test_perturb_and_grid_constructor_per_sample_equal_solo():
    def grid(func, y0, t):
        return torch.linspace(float(t[0]), float(t[-1]), 31, dtype=torch.float64)
    for o in ({"step_size": 0.1, "perturb": True}, {"grid_constructor": grid}):
        sol = solve(vdp, Y0, T, per_sample=True, method="rk4", options=o)
        for b in range(B):
            assert _rel(sol.ys[:, b], solve(vdp, Y0[b], T, method="rk4", options=o).ys) <= 1e-12


def test_callbacks_per_sample_see_each_sample_as_a_batch_of_one():
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, t, y):
            return vdp(t, y)

        def callback_accept_step(self, t0, y0, dt):
            self.seen.append(tuple(y0.shape))
    f = F()
    sol = solve(f, Y0, T, per_sample=True, method="dopri5")
    assert sol.stats.driver == "sample_by_sample"
    assert len(f.seen) == int(sol.stats.n_accepted.sum())
    assert set(f.seen) == {(1, 3)}


def test_a_func_that_cannot_take_a_batch_of_one_gets_a_clear_error():
    mu = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)

    def f(t, y):  # closes over per-sample constants: only the whole batch works
        return torch.stack([y[:, 1], mu * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], -1)
    with pytest.raises(neuralode.ODEFuncError, match="batch of one"):
        solve(f, Y0[:, :2], T, per_sample=True, method="bdf")


def test_time_gradients_per_sample_equal_solo():
    t = T.clone().requires_grad_(True)
    ys = neuralode.odeint(vdp, Y0, t, per_sample=True)
    (g,) = torch.autograd.grad(ys.square().sum(), t)
    want = torch.zeros_like(T)
    for b in range(B):
        tb = T.clone().requires_grad_(True)
        want += torch.autograd.grad(neuralode.odeint(vdp, Y0[b], tb).square().sum(), tb)[0]
    assert torch.allclose(g, want, rtol=1e-10, atol=1e-12)


def test_dense_evaluate_at_one_time_has_the_one_problem_shape():
    sol = solve(vdp, Y0, T, per_sample=True, dense=True)
    assert sol.evaluate(torch.tensor(0.5)).shape == (B, 3)
    assert sol.evaluate(torch.tensor([0.5, 0.6])).shape == (2, B, 3)
    one = solve(vdp, Y0[1], T, dense=True)
    assert _rel(sol.evaluate(torch.tensor(0.5))[1], one.evaluate(torch.tensor(0.5))) <= 1e-10


# -- gradients: every strategy, per sample ------------------------------------------------


def _net():
    g = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.double()


class Dyn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, t, y):
        return self.net(y)


def _grads(f, y0, loss):
    return torch.autograd.grad(loss, [y0, *f.parameters()])


STRATEGIES = ["backprop", "checkpoint", "checkpoint:2", "adjoint", "interpolated_adjoint"]


@pytest.mark.parametrize("gradient", STRATEGIES)
@pytest.mark.parametrize("method,options", [("dopri5", None), ("kvaerno3", None),
                                            ("rodas5p", None), ("rk4", {"step_size": 0.1})])
def test_every_gradient_strategy_per_sample_equals_solo(gradient, method, options):
    f = Dyn()
    # the stiff methods on a shorter span at a looser tolerance: each of their steps costs
    # Jacobians (and Newton iterations) and, checkpointed, a replay through them
    stiff = method in ("kvaerno3", "rodas5p")
    t = T[:3] if stiff else T
    w = torch.randn(len(t), B, 3, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    y0 = (0.3 * Y0).clone().requires_grad_(True)
    kw = {"method": method, "options": options, "rtol": 1e-8, "atol": 1e-10}
    if stiff:
        kw.update(rtol=1e-5, atol=1e-7)
    ys = neuralode.odeint(f, y0, t, per_sample=True, gradient=gradient, **kw)
    got = _grads(f, y0, (ys * w).sum())
    want = None
    solo = gradient
    if gradient == "adjoint" and method == "dopri5":
        # the batched adjoint's backward error norm is the seminorm (the parameter adjoint
        # is summed over the batch, not a per-sample state)
        solo = neuralode.Adjoint(options=dict(options or {}, norm="seminorm"))
    for b in range(B):
        yb = (0.3 * Y0[b]).clone().requires_grad_(True)
        gb = _grads(f, yb, (neuralode.odeint(f, yb, t, gradient=solo, **kw) * w[:, b]).sum())
        gb = [gb[0]] + list(gb[1:])
        want = [[gb[0]], gb[1:]] if want is None else [want[0] + [gb[0]],
                                                       [a + c for a, c in zip(want[1], gb[1:])]]
    want = [torch.stack(want[0]), *want[1]]
    tol = 1e-9
    for a, c in zip(got, want):
        assert torch.allclose(a, c, rtol=tol, atol=tol), (gradient, method)


def test_solve_per_sample_with_the_adjoint():
    f = Dyn()
    y0 = (0.3 * Y0).clone().requires_grad_(True)
    sol = solve(f, y0, T, per_sample=True, gradient="adjoint")
    g = _grads(f, y0, sol.ys.square().sum())
    ys = neuralode.odeint(f, y0, T, per_sample=True)
    want = _grads(f, y0, ys.square().sum())
    for a, c in zip(g, want):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-7)


# -- Gustafsson's predictive controller --------------------------------------------------


def test_gustafsson_step_factor_follows_the_formula_on_floats_and_rows():
    from neuralode.solvers.base import StateLayout
    from neuralode.solvers.controllers import ErrorNorm
    layout = StateLayout([torch.Size([1])], False)
    norm = ErrorNorm(layout, 0.0, 1.0, None)
    ctrl = GustafssonController()
    run = ctrl.bind(norm, 4, {})
    run.absy = torch.zeros(1, dtype=torch.float64)
    run.init_history(0.1)
    e = 1.0 / 5
    # first accepted step: the I controller; err = |err estimate| * h
    acc, h1 = run.judge(torch.zeros(1, dtype=torch.float64),
                        torch.tensor([0.5 / 0.1], dtype=torch.float64), 0.1, 1.0)
    assert acc and h1 == pytest.approx(0.1 * min(10.0, 0.9 * 0.5 ** -e))
    # second: the smaller of the I and the predictive factors
    acc, h2 = run.judge(torch.zeros(1, dtype=torch.float64),
                        torch.tensor([0.8 / h1], dtype=torch.float64), h1, 1.0)
    f_i = 0.9 * 0.8 ** -e
    f_g = 0.9 * (h1 / 0.1) * (0.5 / 0.8**2) ** e
    assert acc and h2 == pytest.approx(h1 * max(0.2, min(10.0, f_i, f_g)))
    # the same two steps on rows equal the floats
    rows = ctrl.bind(norm, 4, {})
    rows.absy = torch.zeros(2, 1, dtype=torch.float64)
    h = torch.full((2,), 0.1, dtype=torch.float64)
    rows.init_history(h)
    live = torch.ones(2, dtype=torch.bool)
    _, hr = rows.judge(torch.zeros(2, 1, dtype=torch.float64),
                       torch.full((2, 1), 0.5 / 0.1, dtype=torch.float64), h, 1.0, live)
    _, hr = rows.judge(torch.zeros(2, 1, dtype=torch.float64), (0.8 / hr)[:, None], hr, 1.0,
                       live)
    assert torch.allclose(hr, torch.full((2,), h2, dtype=torch.float64), rtol=1e-15)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "kvaerno5", "rodas5p"])
def test_gustafsson_controller_solves_in_both_drivers(method):
    ctrl = {"step_size_controller": GustafssonController()}
    kw = {"method": method, "options": ctrl, "rtol": 1e-6, "atol": 1e-9}
    sol = solve(vdp, Y0, T, per_sample=True, **kw)
    ref = solve(vdp, Y0, T, per_sample=True, method="dopri5", rtol=1e-11, atol=1e-13)
    assert _rel(sol.ys[-1], ref.ys[-1]) < 1e-3
    pid = solve(vdp, Y0[0], T, method=method, rtol=1e-6, atol=1e-9,
                options={"step_size_controller": neuralode.PIDController()})
    one = solve(vdp, Y0[0], T, **kw)
    assert not torch.equal(one.ys, pid.ys)  # another step-size sequence than the PID's
    for b in range(B):
        one = solve(vdp, Y0[b], T, **kw)
        assert _rel(sol.ys[:, b], one.ys) <= 1e-10
        assert int(sol.stats.n_accepted[b]) == one.stats.n_accepted
        assert int(sol.stats.n_rejected[b]) == one.stats.n_rejected


# -- layout -----------------------------------------------------------------------------


PACKAGE = Path(neuralode.__file__).parent


def _module_imports() -> dict[str, set[str]]:
    """Each library module's imports of other neuralode modules at module level."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("neuralode"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("neuralode"))
        graph[name] = deps
    return {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}


def test_the_library_has_no_import_cycles():
    graph = _module_imports()
    library = {k: v for k, v in graph.items()
               if not k.startswith(("neuralode.experiments", "neuralode.cli"))}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*path, m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(library.get(m, ())):
            if d.startswith("neuralode.") and d.count(".") and d in library and \
                    not (m.startswith(d + ".") or d == "neuralode"):
                visit(d, [*path, m])
        state[m] = 2
    for m in sorted(library):
        visit(m, [])


def test_the_library_imports_no_neuralode_module_inside_a_function():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE.parent))
        if rel.startswith(("neuralode/experiments", "neuralode/cli.py")):
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                            "neuralode"):
                        offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders


def test_method_modules_do_not_import_the_registry():
    for mod in ("methods", "implicit_rk", "rosenbrock", "multistep", "bdf", "scipy_solver",
                "adams", "rk"):
        tree = ast.parse((PACKAGE / "solvers" / f"{mod}.py").read_text())
        imported = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    for a in node.names] + [node.module or "" for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom)]
        assert not any("registry" in name for name in imported), mod
