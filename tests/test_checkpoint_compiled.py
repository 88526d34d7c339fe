"""The compiled backward pass of gradient='checkpoint' (``Checkpoint(compile=True)``, or
``options={"compile": True}`` with gradient="checkpoint"; issue 18 item 2): the gradients
of the eager replay (and of backpropagation) to rounding, one compilation per structure,
and an announced eager replay where it cannot serve.

Each compilation takes seconds, so each test compiles one structure at most."""

from __future__ import annotations

import pytest
import torch

import neuralode
from neuralode import Checkpoint
from neuralode.solvers import compiled as compiled_driver
from neuralode.solvers.compiled import CompileFallbackWarning

F64 = torch.float64
# a silent eager replay would pass every comparison below: here it is an error
pytestmark = pytest.mark.filterwarnings(
    "error::neuralode.solvers.compiled.CompileFallbackWarning")


class Field(torch.nn.Module):
    """A small time-dependent neural vector field (tuple states: a rotation of the pair)."""

    def __init__(self, n=2, tuple_state=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(n, 16, generator=g) * 0.8)
        self.b1 = torch.nn.Parameter(torch.randn(16, generator=g) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(16, n, generator=g) * 0.8)
        self.register_buffer("scale", torch.tensor(1.5))
        self.tuple_state = tuple_state

    def forward(self, t, y):
        if self.tuple_state:
            a, b = y
            z = torch.cat([a, b.reshape(-1)])
            out = self.scale * torch.tanh(z @ self.w1 + self.b1 * t) @ self.w2
            return out[:1] - 0.3 * b.reshape(-1)[:1], out[1:].reshape(b.shape) + 0.3 * a
        return self.scale * torch.tanh(y @ self.w1 + self.b1 * t) @ self.w2 - 0.1 * y


def grads(func, y0, t, gradient, loss=None, **kw):
    sol = neuralode.solve(func, y0, t, gradient=gradient, **kw)
    ys = sol.ys if isinstance(sol.ys, torch.Tensor) else torch.cat(
        [v.reshape(len(t), -1) for v in sol.ys], 1)
    L = (ys ** 2).sum() + ys[len(t) // 2].sum() if loss is None else loss(sol)
    params = list(func.parameters()) if isinstance(func, torch.nn.Module) else [func.w]
    leaves = ([*y0] if isinstance(y0, tuple) else [y0]) + params
    return torch.autograd.grad(L, leaves), sol


def assert_close(a, b, rel):
    for x, y in zip(a, b):
        assert (x - y).abs().max() <= rel * y.abs().max(), (x, y)


def test_equals_the_eager_replay_and_compiles_once_per_structure():
    func = Field().double()
    t = torch.linspace(0, 4, 9, dtype=F64)  # outputs inside steps and at their ends
    y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    before = len(compiled_driver.COMPILES)
    for k, (y, scale) in enumerate([(y0, 1.0), (y0 * 1.01, 1.02), (y0, 0.98)]):
        y = y.detach().requires_grad_(True)
        with torch.no_grad():
            func.w2.mul_(scale)
        kw = dict(rtol=1e-7, atol=1e-9)
        ref, _ = grads(func, y, t, "backprop", **kw)
        eager, _ = grads(func, y, t, "checkpoint", **kw)
        got, sol = grads(func, y, t, Checkpoint(compile=True), **kw)
        assert_close(got, eager, 1e-12)
        assert_close(got, ref, 1e-12)
        cs = sol.stats.extra["checkpoint"]
        assert cs.compiled and cs.replayed == cs.steps == sol.stats.n_accepted
        # y0 and the parameters are inputs: one compilation while the number of steps stays
        # inside the step buffer's capacity
        assert cs.n_compiles == (1 if k == 0 else 0) and (cs.compile_s > 0) == (k == 0)
        assert cs.nfe == 6 * cs.steps + 1  # dopri5: 6 evaluations a step, f(t0, y0) once
    # steps landing on step_t are plain steps: served by the same compiled sweep
    y = y0.detach().requires_grad_(True)
    kw = dict(rtol=1e-7, atol=1e-9, options={"step_t": torch.tensor([0.3, 1.7])})
    eager, _ = grads(func, y, t, "checkpoint", **kw)
    got, sol = grads(func, y, t, Checkpoint(compile=True), **kw)
    assert sol.stats.extra["checkpoint"].compiled
    assert_close(got, eager, 1e-12)
    assert len(compiled_driver.COMPILES) - before == 1


def test_options_compile_tuple_float32_backwards_in_time():
    """gradient="checkpoint" with options={"compile": True}: the same switch; a tuple state
    in float32, integrated from t = 3 down to 0."""
    func = Field(3, tuple_state=True)
    y0 = (torch.tensor([0.4], requires_grad=True), torch.tensor([[0.2, -0.7]], requires_grad=True))
    t = torch.linspace(3, 0, 6)
    kw = dict(rtol=1e-5, atol=1e-6)
    eager, _ = grads(func, y0, t, "checkpoint", **kw)
    got, sol = grads(func, y0, t, "checkpoint", options={"compile": True}, **kw)
    assert sol.stats.extra["checkpoint"].compiled
    assert_close(got, eager, 1e-5)


def test_fixed_grid_linear_outputs_and_an_event():
    """rk4 (no first-same-as-last stage) with outputs on the chord, and the event state of
    a solve that stops at an event (an output inside its last step)."""
    func = Field().double()
    y0 = torch.tensor([0.3, 0.2], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 2, 7, dtype=F64)
    kw = dict(method="rk4", options={"step_size": 0.15, "interp": "linear"},
              event_fn=lambda t, y: y[0] - 0.1 + 0 * t)

    def loss(sol):
        assert sol.status == "event"
        return (sol.ys[torch.isfinite(sol.ys)] ** 2).sum() + 3 * sol.event_y.sum()
    eager, _ = grads(func, y0, t, "checkpoint", loss, **kw)
    got, sol = grads(func, y0, t, Checkpoint(compile=True), loss, **kw)
    assert sol.stats.extra["checkpoint"].compiled
    assert_close(got, eager, 1e-12)


@pytest.mark.filterwarnings("default::neuralode.solvers.compiled.CompileFallbackWarning")
def test_what_it_cannot_serve_is_replayed_eagerly_and_said():
    func = Field().double()
    y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    ref, _ = grads(func, y0, t, "checkpoint")
    def closure(t, y):  # not a module: its tensors cannot be swapped into a compiled step
        return torch.tanh(y @ func.w1) @ func.w2
    closure.w = func.w1

    cases = [
        (func, Checkpoint(budget=2, compile=True), {}, "a checkpoint budget"),
        (closure, Checkpoint(compile=True), {}, "not an nn.Module"),
        (func, Checkpoint(compile=True), {"method": "rodas5p"}, "explicit Runge-Kutta"),
        (func, Checkpoint(compile=True), {"options": {"jump_t": torch.tensor([0.5])}},
         "discontinuity"),
    ]
    for f, g, kw, why in cases:
        with pytest.warns(CompileFallbackWarning, match=why):
            got, sol = grads(f, y0, t, g, **kw)
        assert not sol.stats.extra["checkpoint"].compiled
        if f is func and "method" not in kw and "options" not in kw:
            assert_close(got, ref, 1e-12)
    with pytest.warns(CompileFallbackWarning, match="per sample"):
        sol = neuralode.solve(func, y0.detach().expand(2, 2).requires_grad_(True), t,
                              per_sample=True, gradient=Checkpoint(compile=True))
    sol.ys.sum().backward()
    cs = sol.stats.extra["samples"][0].extra["checkpoint"]
    assert cs.replayed > 0 and not cs.compiled
    with pytest.raises(neuralode.ODEInputError, match="compile must be True, False or"):
        Checkpoint(compile=1)


@pytest.mark.filterwarnings("default::neuralode.solvers.compiled.CompileFallbackWarning")
def test_a_sweep_torch_compile_cannot_trace_falls_back_once_and_is_not_retried(monkeypatch):
    """autograd.grad inside func (the CNF's divergence, eagerly) inside the sweep's vjp:
    torch.compile gives up (an internal error of dynamo, not its own exception class); the
    eager replay gives the gradient, and the next backward pass does not trace again."""
    from neuralode.gradients import compiled_replay

    class WithGrad(Field):
        def forward(self, t, y):
            with torch.enable_grad():
                z = y if y.requires_grad else y.detach().requires_grad_(True)
                out = super().forward(t, z)
                (g,) = torch.autograd.grad(out.sum(), z, create_graph=True)
            return out + 0.1 * g

    func = WithGrad().double()
    y0 = torch.tensor([0.5, -0.2], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    ref, _ = grads(func, y0, t, "checkpoint")
    for k in range(2):
        with pytest.warns(CompileFallbackWarning, match="could not be compiled"):
            got, sol = grads(func, y0, t, Checkpoint(compile=True))
        assert not sol.stats.extra["checkpoint"].compiled
        assert_close(got, ref, 1e-12)
        if k == 0:  # the failure is remembered: no second attempt to compile
            monkeypatch.setattr(compiled_replay, "compiled_function", None)


def test_the_nn_blocks_take_it():
    """``NeuralODE(..., gradient="checkpoint", options={"compile": True})`` (what the training
    commands' --gradient checkpoint --compile build): the eager block's gradients."""
    from neuralode.nn import CountedFunc, NeuralODE

    class Tanh(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(1)
            self.lin = torch.nn.Linear(3, 3)
            with torch.no_grad():
                self.lin.weight.copy_(torch.randn(3, 3, generator=g))
                self.lin.bias.copy_(torch.randn(3, generator=g))

        def forward(self, t, y):
            return torch.tanh(self.lin(y))

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0, 1, 4)
    got = []
    for options in (None, {"compile": True}):
        f = Tanh()
        block = NeuralODE(CountedFunc(f), gradient="checkpoint", options=options, rtol=1e-6,
                          atol=1e-6)
        block(x, t).pow(2).sum().backward()
        got.append([p.grad for p in f.parameters()])
    assert_close(got[1], got[0], 1e-5)


def test_a_device_without_float64_times():
    """On a device without float64 (MPS; forced here) the step times enter the compiled sweep
    in float32, as every time tensor there: the gradient of the eager replay (whose stage
    times are Python floats) to float32 rounding of the times."""
    from neuralode.solvers.timekeeping import force_time_dtype

    func = Field()
    y0 = torch.tensor([1.0, -0.5], requires_grad=True)
    t = torch.linspace(0, 2, 5)
    eager, _ = grads(func, y0, t, "checkpoint", rtol=1e-5, atol=1e-6)
    with force_time_dtype(torch.float32):
        got, sol = grads(func, y0, t, Checkpoint(compile=True), rtol=1e-5, atol=1e-6)
    assert sol.stats.extra["checkpoint"].compiled
    assert_close(got, eager, 1e-5)
