"""The compiled solve (``options={"compile": True}``, issue 18): the whole adaptive loop in
one compiled graph gives the eager solve's steps and outputs, compiles once per structure,
differentiates, and refuses what it does not serve.

Each compilation takes seconds to tens of seconds, so the cases share structures where
they can (the module-scoped solves below) and the refusals are checked before any compile.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import neuralode
from neuralode.errors import MaxStepsError, ODEInputError, StiffnessError
from neuralode.solvers import compiled as compiled_driver

C = {"compile": True}
STIFFNESS = 1.0  # a user's global that a func reads (its guard is kept)
# a silent eager fallback would pass every comparison below: here it is an error
pytestmark = pytest.mark.filterwarnings(
    "error::neuralode.solvers.compiled.CompileFallbackWarning")


def vdp(t, y):
    x, v, mu = y[:, 0], y[:, 1], y[:, 2]
    return torch.stack([v, mu * (1 - x * x) * v - x, torch.zeros_like(mu)], 1)


@pytest.fixture(scope="module")
def vdp_batch():
    g = torch.Generator().manual_seed(0)
    y0 = torch.cat([torch.randn(6, 2, generator=g), torch.rand(6, 1, generator=g) * 4 + 0.5],
                   1).double()
    return y0, torch.linspace(0, 6, 13, dtype=torch.float64)


def test_per_sample_compiled_equals_eager_and_does_not_recompile(vdp_batch):
    y0, t = vdp_batch
    before = len(compiled_driver.COMPILES)
    runs = [(y0, 1e-6, 1e-8, t), (y0 * 1.2, 1e-5, 1e-7, t * 0.9), (y0, 3e-8, 1e-10, t)]
    for k, (y, rtol, atol, tt) in enumerate(runs):
        e = neuralode.solve(vdp, y, tt, per_sample=True, rtol=rtol, atol=atol)
        c = neuralode.solve(vdp, y, tt, per_sample=True, rtol=rtol, atol=atol, options=C)
        assert torch.equal(e.stats.n_accepted, c.stats.n_accepted)
        assert torch.equal(e.stats.n_rejected, c.stats.n_rejected)
        scale = e.ys.abs().max()
        assert (e.ys - c.ys).abs().max() <= 1e-11 * scale
        assert c.status == ["success"] * 6
        # one compilation for the three solves: tolerances, y0 and t are inputs
        assert c.stats.n_compiles == (1 if k == 0 else 0)
        assert (c.stats.compile_s > 0) == (k == 0)
    assert len(compiled_driver.COMPILES) - before == 1


def test_per_element_tolerances_are_each_solves_own(vdp_batch):
    """Tolerance tensors (one per element) are read in the loop from the solve's norm:
    another solve of the structure, with other tolerances, steps by its own."""
    y0, t = vdp_batch
    accepted = []
    for k, scale in enumerate((1.0, 1e3)):
        rtol = torch.tensor([1e-7, 1e-7, 1e-9], dtype=torch.float64) * scale
        e = neuralode.solve(vdp, y0, t, per_sample=True, rtol=rtol, atol=1e-8)
        c = neuralode.solve(vdp, y0, t, per_sample=True, rtol=rtol, atol=1e-8,
                            options=C)
        assert torch.equal(e.stats.n_accepted, c.stats.n_accepted)
        assert torch.equal(e.stats.n_rejected, c.stats.n_rejected)
        assert (e.ys - c.ys).abs().max() <= 1e-11 * e.ys.abs().max()
        assert c.stats.n_compiles == (1 if k == 0 else 0)
        accepted.append(c.stats.n_accepted)
    assert (accepted[1] < accepted[0]).all()


def test_autograd_tracing_is_set_only_for_a_loop_whose_tracing_needed_it():
    """``traced``: dynamo's trace_autograd_ops (a global setting, tens of microseconds to set
    and reset) is set for a compiled loop only after its tracing failed without it; another
    failure is not retried."""
    seen = []

    class Loop:  # (a compiled loop's stand-in: its tracing wants autograd once)
        pass

    def run():
        on = torch._dynamo.config.trace_autograd_ops
        seen.append(on)
        if not on and len(seen) == 1:
            raise torch._dynamo.exc.Unsupported("torch.autograd.grad with "
                                                "trace_autograd_ops=False")
        return "ran"
    loop, was = Loop(), torch._dynamo.config.trace_autograd_ops
    assert compiled_driver.traced(loop, run) == "ran" and seen == [False, True]
    assert compiled_driver.traced(loop, run) == "ran" and seen == [False, True, True]
    assert torch._dynamo.config.trace_autograd_ops == was
    other, tries = Loop(), []

    def fails():
        tries.append(1)
        raise torch._dynamo.exc.Unsupported("something else")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="something else"):
        compiled_driver.traced(other, fails)
    assert tries == [1] and not getattr(other, "neuralode_autograd", False)


def test_one_problem_tuple_float32_and_many_outputs_per_step():
    """One problem (a batch of one inside), a tuple state in float32, and more output times
    in one step than the output window (the rows write them before stepping on)."""
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])

    def f(t, y):
        a, b = y
        return torch.mv(A, a), -0.5 * b * torch.cos(t)
    def f_batch(t, y):  # the same problem as a per-sample batch of one
        a, b = y
        return torch.einsum("ij,bj->bi", A, a), -0.5 * b * torch.cos(t)[:, None]
    y0 = (torch.tensor([2.0, 0.0]), torch.ones(3))
    t = torch.linspace(0, 3, 301)  # ~40 outputs per step at rtol 1e-3
    e = neuralode.solve(f, y0, t, rtol=1e-3, atol=1e-5)
    p = neuralode.solve(f_batch, tuple(v[None] for v in y0), t, rtol=1e-3, atol=1e-5,
                        per_sample=True)
    c = neuralode.solve(f, y0, t, rtol=1e-3, atol=1e-5, options=C)
    assert c.stats.n_accepted == e.stats.n_accepted and c.stats.n_rejected == e.stats.n_rejected
    assert 1 < e.stats.n_accepted < 20  # many outputs per step (the window is 16)
    assert compiled_driver.MAX_WINDOW == 16
    # on a small state the iterations that only write outputs attempt a masked step (it
    # costs less than skipping it): counted as calls of f
    assert c.stats.nfe > e.stats.nfe
    for a, b, q in zip(e.ys, c.ys, p.ys):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        # the compiled solve is the per-sample driver's, to float32 rounding
        assert (q[:, 0] - b).abs().max() <= 1e-5
        # and the one-problem driver's to the solution's accuracy (in float32 the error
        # estimate of the very accurate second step is rounding noise, ~1e-5 of the
        # tolerance, which each driver rounds its own way: the next step sizes part by 3%)
        assert (a - b).abs().max() <= 1e-3
    assert c.status == "success" and c.t_final == pytest.approx(3.0)


def test_a_large_state_travels_unstacked_and_equals_eager():
    """States above ``PACK_ELEMENTS`` are carried alone, not stacked with their kind."""
    k = torch.linspace(0.5, 2.0, 2500, dtype=torch.float64)

    def f(t, y):
        return -k * y + torch.sin(t)[:, None]
    y0 = torch.stack([torch.cos(k), torch.sin(k)])  # (2, 2500): 5000 elements
    assert y0.numel() > compiled_driver.PACK_ELEMENTS
    t = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    e = neuralode.solve(f, y0, t, per_sample=True, rtol=1e-7, atol=1e-9)
    c = neuralode.solve(f, y0, t, per_sample=True, rtol=1e-7, atol=1e-9, options=C)
    assert torch.equal(e.stats.n_accepted, c.stats.n_accepted)
    assert (e.ys - c.ys).abs().max() <= 1e-13


def test_the_carried_state_layouts_give_back_every_value_exactly():
    """A small problem's carried state travels as one float64 vector, a larger one stacked
    by kind, a large tensor alone: unpacking gives back each tensor's dtype, shape and
    values exactly (counters near 2^31, flags, float32 and float64 values)."""
    from neuralode.solvers.compiled import _groups, _pack, _unpack
    for B, n in ((1, 3), (compiled_driver.FLAT_ROWS + 1, 3), (2, 3000)):
        g = torch.Generator().manual_seed(B)
        state = {"t": torch.randn(B, generator=g, dtype=torch.float64),
                 "it": torch.tensor(2 ** 31 - 1),
                 "n_acc": torch.randint(0, 2 ** 40, (B,), generator=g),
                 "flag": torch.rand(B, generator=g) > 0.5,
                 "y": torch.randn(B, n, generator=g, dtype=torch.float32) * 1e30,
                 "h": torch.full((B,), math.nan, dtype=torch.float64)}
        groups = _groups(state)
        hows = {how for _, how, _ in groups}
        assert hows == ({"flat"} if B == 1 else {"stack"} if n == 3 else {"flat", "alone"})
        back = _unpack(_pack(state, groups), groups)
        for k, v in state.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape
            assert torch.equal(back[k], v) or (v.isnan().all() and back[k].isnan().all())


def test_what_torch_compile_cannot_capture_runs_eagerly_with_a_warning(monkeypatch):
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)

    def f(t, y):
        return y @ A.T  # a view of a captured tensor: the compiled loop refuses the alias
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    with pytest.warns(compiled_driver.CompileFallbackWarning, match="solved eagerly"):
        c = neuralode.solve(f, y0, t, per_sample=True, options=C)
    e = neuralode.solve(f, y0, t, per_sample=True)
    assert torch.equal(c.ys, e.ys) and c.stats.n_compiles == 0
    # the structure that failed is not traced again (a training loop would pay it per call)
    tried = []
    real = compiled_driver.compiled_function
    monkeypatch.setattr(compiled_driver, "compiled_function",
                        lambda *a, **k: tried.append(a) or real(*a, **k))
    with pytest.warns(compiled_driver.CompileFallbackWarning, match="solved eagerly"):
        c = neuralode.solve(f, y0 * 2, t, per_sample=True, options=C)
    assert not tried and torch.equal(c.ys, neuralode.solve(f, y0 * 2, t, per_sample=True).ys)

    def g(t, y):  # another func of the same shapes is compiled
        return torch.stack([-0.1 * y[:, 0] + 2.0 * y[:, 1], -2.0 * y[:, 0] - 0.1 * y[:, 1]], 1)
    c = neuralode.solve(g, y0, t, per_sample=True, options=C)
    assert tried and torch.allclose(c.ys, e.ys, rtol=0, atol=1e-12)


def test_a_loop_compiled_again_at_every_call_runs_eagerly_after_its_third_compile():
    class F(torch.nn.Module):  # torchdiffeq's examples count evaluations this way
        def __init__(self):
            super().__init__()
            self.nfe = 0

        def forward(self, t, y):
            self.nfe += 1
            return torch.stack([y[1], -y[0] - 0.1 * y[1]])
    f = F()
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0, 2, 3, dtype=torch.float64)
    e = neuralode.solve(f, y0, t)
    opts = {"compile": "aot_eager"}  # (dynamo's guards, without inductor's compile time)
    for _ in range(2):  # the counter's guard fails at each call: compiled again
        c = neuralode.solve(f, y0, t, options=opts)
        assert c.stats.n_compiles == 1 and torch.allclose(c.ys, e.ys, rtol=0, atol=1e-14)
    with pytest.warns(compiled_driver.CompileFallbackWarning,
                      match=r"compiled 3 times, again at each call.*self\.nfe \+= 1"):
        c = neuralode.solve(f, y0, t, options=opts)
    assert c.stats.n_compiles == 1 and torch.allclose(c.ys, e.ys, rtol=0, atol=1e-14)
    before = f.nfe
    with pytest.warns(compiled_driver.CompileFallbackWarning, match="solved eagerly"):
        c = neuralode.solve(f, y0, t, options=opts)
    assert c.stats.n_compiles == 0 and torch.allclose(c.ys, e.ys, rtol=0, atol=1e-14)
    assert f.nfe - before >= e.stats.nfe  # (eager: the counter counts every evaluation)


def test_the_loop_drops_the_guards_its_structure_fixes_and_keeps_those_on_func(monkeypatch):
    # the structure key fixes the templates' settings and the tableau's coefficients:
    # dynamo's guards on them (hundreds, checked at every call) are dropped; a value that
    # func reads is not fixed by the key, and when it changes the loop compiles again
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = 0.1

        def forward(self, t, y):
            return torch.stack([y[1], -STIFFNESS * y[0] - self.k * y[1]])
    seen = []
    real = compiled_driver._guard_filter

    def recording(fixed):
        keep = real(fixed)

        def run(entries):
            kept = keep(entries)
            seen.extend(zip(entries, kept))
            return kept
        return run
    monkeypatch.setattr(compiled_driver, "_guard_filter", recording)
    f = F()
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0, 2, 3, dtype=torch.float64)
    opts = {"compile": "aot_eager"}
    first = neuralode.solve(f, y0, t, options=opts)
    dropped = [e.name for e, k in seen if not k]
    assert sum(n.startswith("spec.stepper.__dict__['a_nz']") for n in dropped) > 20
    # torch's pytree registry, which while_loop and cond read as they flatten their operands
    assert sum("_pytree" in n for n in dropped) > 20
    assert not [e for e, k in seen if k and "_pytree" in e.name]
    # a guard on func (reached through spec.stepper.rhs) or on a tensor is dropped only as
    # a repeat of one that is kept (the same check of the same source, made again by each
    # evaluation of f the loop traces)
    kept = {(e.name, e.guard_type, repr(getattr(e.orig_guard.create_fn, "keywords", None)))
            for e, k in seen if k}
    on_func = [e for e, k in seen if not k and (e.name.startswith("spec.stepper.rhs")
                                                or e.guard_type == "TENSOR_MATCH")]
    assert on_func and all((e.name, e.guard_type,
                            repr(getattr(e.orig_guard.create_fn, "keywords", None))) in kept
                           for e in on_func)
    assert any(e.name.startswith("spec.stepper.rhs") and k for e, k in seen)
    # the globals of the package, of torch and Python's builtins keep no guard; a user's do
    assert not [e.name for e, k in seen if k and e.name.startswith(
        ("G['__import_neuralode", "G['__import_torch_dot_nn_dot_functional", "G['__builtins",
         "G['_fork']"))]
    assert [e.name for e, k in seen if not k and e.name.startswith("G['__import_neuralode")]
    assert any(k and "STIFFNESS" in e.name for e, k in seen)
    f.k = 0.3
    c = neuralode.solve(f, y0, t, options=opts)
    e = neuralode.solve(f, y0, t)
    assert c.stats.n_compiles == 1 and torch.allclose(c.ys, e.ys, rtol=0, atol=1e-14)
    assert not torch.allclose(c.ys, first.ys, rtol=0, atol=1e-6)
    monkeypatch.setattr(sys.modules[__name__], "STIFFNESS", 2.0)
    c2 = neuralode.solve(f, y0, t, options=opts)
    e = neuralode.solve(f, y0, t)
    assert c2.stats.n_compiles == 1 and torch.allclose(c2.ys, e.ys, rtol=0, atol=1e-14)
    assert not torch.allclose(c2.ys, c.ys, rtol=0, atol=1e-6)


def test_other_controller_settings_get_a_loop_of_their_own():
    # settings are Python floats the loop reads: each value is a structure of its own,
    # compiled once, not a recompilation of one loop (which ``recompiled`` would take for a
    # value changing at every call, and solve eagerly from the third on)
    def f(t, y):
        return torch.stack([y[1], -y[0] - 0.5 * y[1]])
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0, 2, 3, dtype=torch.float64)
    compiles = []
    for safety in (0.9, 0.8, 0.7, 0.9):
        e = neuralode.solve(f, y0, t, options={"safety": safety})
        c = neuralode.solve(f, y0, t, options={"compile": "aot_eager", "safety": safety})
        compiles.append(c.stats.n_compiles)
        assert (c.stats.n_accepted, c.stats.n_rejected) == (e.stats.n_accepted,
                                                            e.stats.n_rejected)
        assert torch.allclose(c.ys, e.ys, rtol=0, atol=1e-14)
    assert compiles == [1, 1, 1, 0]


def test_fixed_grid_equals_eager_and_the_adjoint_differentiates_it():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net.double()

        def forward(self, t, y):
            return self.net(y)
    f = F()
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=torch.float64)
    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    with torch.no_grad():
        e = neuralode.solve(f, y0, t, method="rk4", options={"step_size": 0.1})
        c = neuralode.solve(f, y0, t, method="rk4", options={"step_size": 0.1, **C})
    assert c.stats.n_accepted == e.stats.n_accepted == 10
    assert (e.ys - c.ys).abs().max() <= 1e-14

    def grads(gradient, options):
        f.zero_grad()
        y = y0.clone().requires_grad_()
        sol = neuralode.solve(f, y, t, rtol=1e-9, atol=1e-11, options=options,
                              gradient=gradient)
        (sol.ys ** 2).sum().backward()
        return sol, [y.grad, *(p.grad.clone() for p in f.parameters())]
    # the adjoint: the forward solve compiled, the backward solve the eager adjoint's
    before = len(compiled_driver.COMPILES)
    a, ga = grads("adjoint", C)
    assert len(compiled_driver.COMPILES) == before + 1
    e, ge = grads("adjoint", {})
    _, gb = grads("backprop", {})
    assert max(float((x - y).abs().max()) for x, y in zip(ga, ge)) <= 1e-12
    assert max(float((x - y).abs().max()) for x, y in zip(ga, gb)) <= 1e-6
    assert a.stats.backward.n_accepted == e.stats.backward.n_accepted > 0

    def adjoint_grads(y0, **kw):
        f.zero_grad()
        y = y0.clone().requires_grad_()
        ys, st = neuralode.odeint_adjoint(f, y, t, rtol=1e-9, atol=1e-11, return_stats=True,
                                          **kw)
        (ys ** 2).sum().backward()
        return st, [y.grad, *(p.grad.clone() for p in f.parameters())]
    # adjoint_options={"compile": True}: the backward solve compiled too, one loop that
    # stops and jumps at the output times as the eager backward solve does: the same steps,
    # evaluations and gradients (to rounding)
    CB = {"adjoint_options": C}
    before = len(compiled_driver.COMPILES)
    st, gc = adjoint_grads(y0, options=C, **CB)
    se, ge = adjoint_grads(y0)
    assert len(compiled_driver.COMPILES) == before + 1  # (the forward loop is reused)
    assert st.backward.n_compiles == 1 and st.backward.compile_s > 0
    assert st.backward.status == "success"
    assert (st.backward.n_accepted, st.backward.n_rejected, st.backward.nfe) == \
        (se.backward.n_accepted, se.backward.n_rejected, se.backward.nfe)
    assert max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(gc, ge)) <= 1e-12
    # another y0, a compiled backward after an eager forward: nothing compiles again
    before = len(compiled_driver.COMPILES)
    st, gc = adjoint_grads(0.7 * y0, **CB)
    _, ge7 = adjoint_grads(0.7 * y0)
    assert len(compiled_driver.COMPILES) == before and st.backward.n_compiles == 0
    assert max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(gc, ge7)) <= 1e-12
    # a parameter replaced on the module: the compiled backward uses the new one
    with torch.no_grad():
        f.net[0].weight = torch.nn.Parameter(f.net[0].weight * 1.5)
    st, gc = adjoint_grads(0.7 * y0, **CB)
    _, ge7 = adjoint_grads(0.7 * y0)
    assert max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(gc, ge7)) <= 1e-12
    # what the compiled backward does not serve (here the seminorm; also a func that is not
    # an nn.Module owning its parameters, callbacks, a backward method with Jacobians) runs
    # the eager backward, announced: the eager adjoint's gradients to the last bit
    semi = {"norm": "seminorm"}
    with pytest.warns(compiled_driver.CompileFallbackWarning, match="seminorm"):
        _, gs = adjoint_grads(y0, adjoint_options={**semi, **C})
    _, ge = adjoint_grads(y0, adjoint_options=semi)
    assert max(float((x - y).abs().max()) for x, y in zip(gs, ge)) <= 0.0
    # backprop through the compiled loop is refused (torch's while_loop autograd: below)
    with pytest.raises(ODEInputError, match="gradient='adjoint'"):
        grads("backprop", C)


def test_outputs_beyond_the_carried_buffer_are_written_in_several_calls(monkeypatch,
                                                                        vdp_batch):
    """A carried buffer is copied at every iteration, so outputs larger than
    ``CHUNK_ELEMENTS`` are written a chunk per call of the compiled loop, every row going
    on from its first unwritten output (a row that reaches the end of the chunk waits):
    the same steps, outputs and gradients as eager, and the first step computed before
    the first call. The window is 4 outputs, as on a large state: the iterations that only
    write outputs evaluate nothing (as many calls of f as eager)."""
    monkeypatch.setattr(compiled_driver, "CHUNK_ELEMENTS", 30)
    monkeypatch.setattr(compiled_driver, "WINDOW_ELEMENTS", 64)
    calls = []
    real = compiled_driver.compiled_function

    def counting(fn, backend, structure, settings=None, fixed=None):
        loop = real(fn, backend, structure, settings, fixed)

        def run(*args):
            calls.append(structure)
            return loop(*args)
        return run
    monkeypatch.setattr(compiled_driver, "compiled_function", counting)
    y0, _ = vdp_batch
    t = torch.linspace(0, 6, 41, dtype=torch.float64)  # 40 outputs, windows of 4
    e = neuralode.solve(vdp, y0, t, per_sample=True, rtol=1e-6, atol=1e-8)
    c = neuralode.solve(vdp, y0, t, per_sample=True, rtol=1e-6, atol=1e-8, options=C)
    assert len(calls) >= 10  # (40 outputs, 4 per call)
    assert torch.equal(e.stats.n_accepted, c.stats.n_accepted)
    assert torch.equal(e.stats.n_rejected, c.stats.n_rejected)
    assert (e.ys - c.ys).abs().max() <= 1e-11 * e.ys.abs().max()
    assert c.status == ["success"] * 6
    # one problem, about four outputs per step: the iterations that only write outputs
    # evaluate nothing
    k = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)

    def decay(t, y):
        return -k * y
    e = neuralode.solve(decay, torch.ones(3, dtype=torch.float64), t, rtol=1e-3, atol=1e-6)
    c = neuralode.solve(decay, torch.ones(3, dtype=torch.float64), t, rtol=1e-3, atol=1e-6,
                        options=C)
    assert e.stats.n_accepted <= 8  # (40 outputs: more than a window per step)
    assert (c.stats.n_accepted, c.stats.n_rejected, c.stats.nfe) == \
        (e.stats.n_accepted, e.stats.n_rejected, e.stats.nfe)
    assert (e.ys - c.ys).abs().max() <= 1e-14

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 2)).double()

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)
    f = F()
    y1 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=torch.float64)

    def adjoint_grads(**kw):
        f.zero_grad()
        y = y1.clone().requires_grad_()
        ys, st = neuralode.odeint_adjoint(f, y, t, rtol=1e-9, atol=1e-11, return_stats=True,
                                          **kw)
        (ys ** 2).sum().backward()
        return ys, st, [y.grad, *(p.grad.clone() for p in f.parameters())]
    del calls[:]
    yc, sc, gc = adjoint_grads(options=C, adjoint_options=C)  # forward and backward chunked
    ye, se, ge = adjoint_grads()
    # the forward solve a chunk per call; the backward solve in one call (it writes no
    # outputs: the adjoint reads its final state)
    counts = sorted(calls.count(s) for s in set(calls))
    assert len(counts) == 2 and counts[0] == 1 and counts[1] >= 5, counts
    assert (sc.n_accepted, sc.n_rejected, sc.nfe) == (se.n_accepted, se.n_rejected, se.nfe)
    assert (sc.backward.n_accepted, sc.backward.n_rejected, sc.backward.nfe) == \
        (se.backward.n_accepted, se.backward.n_rejected, se.backward.nfe)
    assert (yc - ye).abs().max() <= 1e-12 * ye.abs().max()
    assert max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(gc, ge)) <= 1e-12


def test_torch_while_loop_autograd_is_still_wrong():
    """Why backprop through the compiled solve is refused: torch's autograd of a compiled
    while_loop returns wrong gradients for a loop of this kind (a captured parameter, values
    written into a carried buffer). If this test fails, torch has fixed it: allow backprop
    through the compiled solve (``compiled.BACKPROP_REFUSED``) and test it against eager."""
    from torch._higher_order_ops import while_loop

    w = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    T = 6

    def body(i, y, out):
        y1 = y * 1.1 + w
        return i + 1, y1, out.index_put((torch.stack([2 * i, 2 * i + 1]),),
                                        torch.stack([y, y1]))

    def cond(i, y, out):
        return i < 3

    def run(y0, loop):
        return loop(cond, body, (torch.zeros((), dtype=torch.long), y0,
                                 y0.new_zeros(T + 1, 3)))

    def eager_loop(cond, body, carry):
        while cond(*carry):
            carry = body(*carry)
        return carry
    y0 = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(lambda y: run(y, while_loop), backend="eager", fullgraph=True)
    grads = []
    for fn in (lambda y: run(y, eager_loop), compiled):
        w.grad = None
        (fn(y0)[2] ** 2).sum().backward()
        grads.append(w.grad.clone())
    assert not torch.allclose(grads[0], grads[1], rtol=1e-6)


def test_statuses_inside_the_compiled_loop():
    """max_num_steps and the stiffness test end rows inside the graph, with the eager
    driver's statuses and messages."""
    def robertson(t, y):
        a, b, c = y[:, 0], y[:, 1], y[:, 2]
        return torch.stack([-0.04 * a + 1e4 * b * c, 0.04 * a - 1e4 * b * c - 3e7 * b * b,
                            3e7 * b * b], 1)
    y0 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1e5], dtype=torch.float64)
    with pytest.raises(StiffnessError, match="stiff"):
        neuralode.solve(robertson, y0, t, per_sample=True, options=C)
    sol = neuralode.solve(robertson, y0, t, per_sample=True, throw=False,
                          options={**C, "max_num_steps": 50})
    assert sol.status == ["max_steps_reached"] * 2
    assert (sol.stats.n_accepted + sol.stats.n_rejected).tolist() == [50, 50]
    assert "max_num_steps=50" in sol.message[0]
    assert math.isnan(float(sol.ys[1, 0, 0]))
    with pytest.raises(MaxStepsError):
        neuralode.solve(robertson, y0, t, per_sample=True, options={**C, "max_num_steps": 50})


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "rodas5p"}, "explicit Runge"),
    ({"method": "bdf"}, "explicit Runge"),
    ({"gradient": "checkpoint", "per_sample": True}, "batched driver"),
    ({"dense": True}, "dense"),
    ({"event_fn": lambda t, y: y[0]}, "event_fn"),
    ({"options": {"compile": True, "norm": lambda e: e.abs().max()}}, "norm"),
    ({"options": {"compile": 3}}, "backend"),
])
def test_what_the_compiled_path_refuses(kwargs, match):
    kwargs = dict(kwargs)
    options = kwargs.pop("options", C)
    y0 = torch.ones(2, dtype=torch.float64)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    with pytest.raises(ODEInputError, match=match):
        neuralode.solve(lambda t, y: -y, y0, t, options=options, **kwargs)


def test_callbacks_and_time_gradients_are_refused():
    class F(torch.nn.Module):
        def forward(self, t, y):
            return -y

        def callback_step(self, t, y, dt):
            pass
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    with pytest.raises(ODEInputError, match="callback"):
        neuralode.odeint(F(), torch.ones(2, dtype=torch.float64), t, options=C)
    with pytest.raises(ODEInputError, match="with respect to t"):
        neuralode.odeint(lambda t, y: -y, torch.ones(2, dtype=torch.float64),
                         t.clone().requires_grad_(), options=C)


@pytest.mark.parametrize("method,o", [("rk4", {"step_size": 0.3}), ("heun2", {"step_size": 0.3}),
                                      ("dopri5", {})])
def test_an_end_time_only_solve_of_a_bias_free_product_equals_eager(method, o):
    """Two output times (start, end): the loop carries no output buffer and its result is
    the final state. f ends in a matrix product without bias, the form torch 2.13's inductor
    miscompiles in ``torch.add(x, a @ b, alpha=c)`` (alpha dropped: rk4/heun2 off by O(1);
    the stage sums now go through ``elementwise.axpy``); a fixed grid whose last step is
    shorter, and an adaptive method."""
    A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [0.5, -1.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    e = neuralode.solve(lambda t, y: y @ A, y0, t, per_sample=True, method=method, options=o)
    c = neuralode.solve(lambda t, y: y @ A, y0, t, per_sample=True, method=method,
                        options={**o, **C})
    assert (e.ys - c.ys).abs().max() <= 1e-14
    assert torch.equal(e.stats.n_accepted, c.stats.n_accepted)
    assert torch.equal(e.stats.n_rejected, c.stats.n_rejected)
    if method != "dopri5":
        return
    # a row that does not get to its end (max_num_steps): NaN output, the eager final state
    ts = torch.tensor([[0.0, 1.0], [0.0, 60.0]], dtype=torch.float64)
    kw = dict(per_sample=True, throw=False, options={"max_num_steps": 12})
    e = neuralode.solve(lambda t, y: y @ A, y0, ts, **kw)
    c = neuralode.solve(lambda t, y: y @ A, y0, ts, **{**kw, "options": {"max_num_steps": 12,
                                                                           **C}})
    assert c.status == e.status == ["success", "max_steps_reached"]
    assert (e.ys[:, 0] - c.ys[:, 0]).abs().max() <= 1e-14 and c.ys[1, 1].isnan().all()
    # (12 steps on [0, 60]: the compiled arithmetic's rounding, carried through them)
    assert (e.y_final - c.y_final).abs().max() <= 1e-10
    assert torch.allclose(e.t_final, c.t_final, rtol=1e-10, atol=0)


def test_a_fixed_grid_to_its_end_evaluates_f_as_eager_does_and_takes_any_step_size():
    """Only the final state wanted, a method without FSAL: each step evaluates its own first
    stage, so no f(t1, y1) follows the last step (the eager solve's count, one fewer than a
    carried first stage); the step size enters the loop as a tensor (another one compiles
    nothing); a row whose f turns non-finite ends with the eager status and message."""
    A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=torch.float64)
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    before = len(compiled_driver.COMPILES)
    for h in (0.1, 0.07):
        e = neuralode.solve(lambda t, y: (y @ A).tanh(), y0, t, method="rk4",
                            options={"step_size": h})
        with torch.no_grad():  # (with autograd on, f(t0, y0) is evaluated before the loop,
            # to see whether the solve would need a graph: refused)
            c = neuralode.solve(lambda t, y: (y @ A).tanh(), y0, t, method="rk4",
                                options={"step_size": h, **C})
        assert c.stats.n_accepted == e.stats.n_accepted == math.ceil(1 / h - 1e-9)
        assert c.stats.nfe == e.stats.nfe == 4 * e.stats.n_accepted
        assert (e.ys - c.ys).abs().max() <= 1e-14
    assert len(compiled_driver.COMPILES) - before == 1

    def g(t, y):
        return torch.where(t[:, None] > 0.5, torch.full_like(y, math.nan), -y)
    ts = torch.tensor([[0.0, 1.0], [0.0, 0.4], [0.0, 0.8]], dtype=torch.float64)
    yb = torch.ones(3, 2, dtype=torch.float64)
    kw = dict(per_sample=True, method="rk4", throw=False)
    e = neuralode.solve(g, yb, ts, options={"step_size": 0.1}, **kw)
    c = neuralode.solve(g, yb, ts, options={"step_size": 0.1, **C}, **kw)
    assert c.status == e.status == ["nonfinite", "success", "nonfinite"]
    assert c.message == e.message and "between t=0.5 and t=0.6" in c.message[0]
    assert torch.equal(c.stats.n_accepted, e.stats.n_accepted)
    assert torch.equal(c.t_final, e.t_final)


def test_axpy_keeps_its_factor_on_a_compiled_matrix_product():
    """``axpy(x, a @ b, c)`` compiled equals x + c (a @ b) (``torch.add(..., alpha=c)``
    compiles to x + a @ b in torch 2.13)."""
    from neuralode.solvers.elementwise import axpy
    g = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((4, 3), (4, 5), (5, 3)))

    def fn(x, a, b):
        return axpy(x, a @ b, 0.125), axpy(a @ b, x, 0.125)
    got = torch.compile(fn, fullgraph=True, backend="inductor")(x, a, b)
    assert torch.allclose(got[0], x + 0.125 * (a @ b), rtol=1e-14, atol=1e-14)
    assert torch.allclose(got[1], a @ b + 0.125 * x, rtol=1e-14, atol=1e-14)


class Spiral(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]],
                                                 dtype=torch.float64))

    def forward(self, t, y):
        return torch.tanh(y) @ self.A + 0.1 * t


def test_a_compiled_solver_reruns_a_kind_with_its_own_values_as_solve_does(monkeypatch):
    """CompiledSolver: without autograd, a solve of a kind met before calls that kind's
    compiled loop again (no setup, no structure lookup) with its own y0, t and the solver's
    tolerances: the steps, statistics and outputs of ``solve``; its values are still checked,
    callbacks are still refused, a kind of its own gets a loop of its own, and a loop that
    fails now is solved the first way."""
    from neuralode import compiled as front
    func = Spiral()
    opts = {"compile": "aot_eager"}  # (dynamo's tracing, without inductor's compile time)
    solver = neuralode.CompiledSolver(func, rtol=1e-7, atol=1e-9, options=opts)
    setups = []
    real = front.setup
    monkeypatch.setattr(front, "setup", lambda *a, **k: setups.append(1) or real(*a, **k))
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    with torch.no_grad():
        for y, tt in [(y0, t), (-0.5 * y0, t), (y0.flip(0), 2 * t), (y0, t.flip(0))]:
            got = solver.solve(y, tt)
            assert len(setups) == 1  # the kind's later solves rerun its first one's loop
            ref = neuralode.solve(func, y, tt, rtol=1e-7, atol=1e-9, options=opts)
            setups.clear()
            assert torch.equal(got.ys, ref.ys) and torch.equal(got.y_final, ref.y_final)
            assert (got.stats.nfe, got.stats.n_accepted, got.stats.n_rejected, got.status,
                    got.t_final) == (ref.stats.nfe, ref.stats.n_accepted,
                                     ref.stats.n_rejected, ref.status, ref.t_final)
            assert torch.equal(solver(y, tt), ref.ys)
            setups.append(1)
        with pytest.raises(ODEInputError, match="non-finite"):
            solver(torch.tensor([math.nan, 0.0], dtype=torch.float64), t)
        with pytest.raises(ODEInputError, match="strictly increasing or strictly decreasing"):
            solver(y0, t[[0, 2, 1, 3, 4, 5, 6]])
        few = neuralode.CompiledSolver(func, rtol=1e-7, atol=1e-9,
                                       options={**opts, "max_num_steps": 3})
        few.solve(y0, t, throw=False)
        out = few.solve(y0, t, throw=False)
        assert out.status == "max_steps_reached" and "3" in out.message
        with pytest.raises(MaxStepsError):
            few(y0, t)
        # another kind (a batch of states, fewer times): a loop of its own
        y2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        setups.clear()
        got = solver(y2, t[:4])
        assert len(setups) == 1 and len(solver._lanes) == 2
        assert torch.equal(got, neuralode.odeint(func, y2, t[:4], rtol=1e-7, atol=1e-9,
                                                 options=opts))
        # a callback added to func is still refused
        func.callback_step = lambda t0, y0, dt: None
        with pytest.raises(ODEInputError, match="callbacks"):
            solver(y0, t)
        del func.callback_step
        # a loop that fails now: solved the first way (here: eagerly, with the warning)
        lane = solver._lanes[next(iter(solver._lanes))].lane
        compiled_driver.FAILED[lane.fkey] = "a test's failure"
        try:
            with pytest.warns(compiled_driver.CompileFallbackWarning, match="a test's failure"):
                got = solver.solve(y0, t)
        finally:
            del compiled_driver.FAILED[lane.fkey]
        assert torch.allclose(got.ys, neuralode.solve(func, y0, t, rtol=1e-7, atol=1e-9).ys,
                              rtol=0, atol=1e-12)
        # a fixed grid: the grid of each solve's own times (made in the graph)
        grid = neuralode.CompiledSolver(func, method="rk4", options={**opts, "step_size": 0.1})
        for tt in (t[[0, -1]], 0.35 * t[[0, -1]], t[[-1, 0]]):
            got, ref = grid.solve(y0, tt), neuralode.solve(func, y0, tt, method="rk4",
                                                          options={**opts, "step_size": 0.1})
            assert torch.equal(got.ys, ref.ys) and got.stats.nfe == ref.stats.nfe
        assert len(grid._lanes) == 1
    # with autograd: solve's way (here the refusal of backprop through the compiled loop)
    with pytest.raises(ODEInputError, match="not differentiated by backprop"):
        solver(y0, t)
    with pytest.raises(ODEInputError, match="compile"):
        neuralode.CompiledSolver(func, options={"compile": False})
