"""Tests for neuralode.nn: time-aware layers, ODEFunc counters, ODEBlock and NeuralODE."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from neuralode import odeint
from neuralode.nn import (
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashConv2d,
    ConcatSquashLinear,
    CountedFunc,
    NeuralODE,
    ODEBlock,
    ODEFunc,
    TimeSequential,
)


class Decay(ODEFunc):
    """dy/dt = -k y with a learnable k (one parameter)."""

    def __init__(self, k: float = 1.0):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k, dtype=torch.float64))

    def forward(self, t, y):
        return -self.k * y


class SmallMLPFunc(ODEFunc):
    def __init__(self, dim: int = 3, hidden: int = 8):
        super().__init__()
        self.net = TimeSequential(ConcatLinear(dim, hidden), nn.Tanh(), ConcatLinear(hidden, dim))

    def forward(self, t, y):
        return self.net(t, y)


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("layer,x", [
    (ConcatLinear(3, 5), torch.randn(4, 3)),
    (ConcatSquashLinear(3, 5), torch.randn(2, 4, 3)),
    (ConcatConv2d(3, 5, 3, 1, 1), torch.randn(2, 3, 6, 6)),
    (ConcatSquashConv2d(3, 5, 3, 1, 1), torch.randn(2, 3, 6, 6)),
])
def test_time_layers_map_shapes_and_depend_on_time(layer, x):
    torch.manual_seed(0)
    out0 = layer(torch.tensor(0.0), x)
    out1 = layer(0.7, x)
    expected = (*x.shape[:-1], 5) if x.dim() != 4 else (x.shape[0], 5, *x.shape[2:])
    assert out0.shape == expected
    assert not torch.allclose(out0, out1), "the output must change with t"


def test_concat_linear_is_linear_in_time_and_input():
    layer = ConcatLinear(2, 1)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[2.0, 3.0, 5.0]]))  # [t, x0, x1]
        layer.linear.bias.fill_(1.0)
    out = layer(torch.tensor(0.5), torch.tensor([[1.0, -1.0]]))
    assert out.item() == pytest.approx(2.0 * 0.5 + 3.0 - 5.0 + 1.0)


def test_concat_conv2d_prepends_a_constant_time_channel():
    layer = ConcatConv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))  # reads channel t
    out = layer(torch.tensor(0.25), torch.randn(2, 1, 3, 3))
    assert torch.equal(out, torch.full((2, 1, 3, 3), 0.25))


def test_concat_conv2d_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ConcatConv2d(3, 4)(0.0, torch.randn(1, 2, 5, 5))


def test_time_layers_reject_non_scalar_time_and_bad_sizes():
    with pytest.raises(ValueError, match="scalar time"):
        ConcatLinear(2, 2)(torch.zeros(2), torch.randn(1, 2))
    with pytest.raises(ValueError, match="dim_out must be a positive integer, got 0"):
        ConcatLinear(2, 0)


def test_time_sequential_passes_time_only_to_time_layers():
    seq = TimeSequential(ConcatLinear(2, 4), nn.ReLU(), ConcatLinear(4, 2))
    x = torch.randn(3, 2)
    out = seq(torch.tensor(0.3), x)
    manual = seq[2](0.3, seq[1](seq[0](0.3, x)))
    assert torch.allclose(out, manual)


# --------------------------------------------------------------------------- counters


def test_odefunc_counts_calls_and_gradient_flows():
    func = SmallMLPFunc()
    y = torch.randn(2, 3)
    out = func(torch.tensor(0.0), y) + func(torch.tensor(0.1), y)
    assert (func.nfe, func.nfe_grad) == (2, 0)
    out.sum().backward()
    assert func.nfe_grad == 2
    func.reset_nfe()
    assert (func.nfe, func.nfe_grad) == (0, 0)


def test_counted_func_wraps_a_plain_module():
    class Plain(nn.Module):
        def forward(self, t, y):
            return -y

    block = ODEBlock(Plain(), method="rk4", options={"step_size": 0.25})
    assert isinstance(block.func, CountedFunc)
    block(torch.ones(2))
    assert block.nfe_forward == 16  # 4 steps x 4 stages


# --------------------------------------------------------------------------- ODEBlock


def test_odeblock_returns_the_final_state_of_the_solve():
    func = SmallMLPFunc().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    block = ODEBlock(func, 0.0, 2.0, rtol=1e-6, atol=1e-8)
    expected = odeint(func, x, torch.tensor([0.0, 2.0], dtype=torch.float64), rtol=1e-6,
                      atol=1e-8)[-1]
    assert torch.allclose(block(x), expected, atol=1e-12)


def test_odeblock_solves_exponential_decay():
    block = ODEBlock(Decay(0.5), rtol=1e-9, atol=1e-11)
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert torch.allclose(block(x), x * math.exp(-0.5), rtol=1e-7)


def test_odeblock_nfe_forward_matches_solver_stats_and_resets_each_call():
    block = ODEBlock(SmallMLPFunc(), rtol=1e-4, atol=1e-4)
    x = torch.randn(4, 3)
    block(x)
    first = block.nfe_forward
    assert first == block.stats.nfe and first > 0
    block(x)
    assert block.nfe_forward == first, "counters restart at every forward call"
    block.reset_nfe()
    assert (block.nfe_forward, block.nfe_backward, block.func.nfe) == (0, 0, 0)


@pytest.mark.filterwarnings("error::neuralode.solvers.compiled.CompileFallbackWarning")
@pytest.mark.parametrize("gradient", ["checkpoint"])  # (adjoint: test_mnist_train's)
def test_compiled_block_counts_the_eager_blocks_evaluations(gradient):
    """With options={"compile": ...} func's counters do not run inside the compiled loops
    (the adjoint's forward solve, checkpointing's replay): the block reads the forward and
    backward evaluations from the solve's statistics, and they are the eager block's."""
    torch.manual_seed(1)
    func = SmallMLPFunc().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    counts = []
    for options in (None, {"compile": "aot_eager"}):
        block = ODEBlock(func, rtol=1e-6, atol=1e-6, gradient=gradient, options=options)
        block(x).pow(2).sum().backward()
        counts.append((block.nfe_forward, block.nfe_backward))
    assert counts[1] == counts[0] and counts[0][1] > 0


def test_backprop_block_counts_backward_evaluations():
    block = ODEBlock(SmallMLPFunc(), rtol=1e-4, atol=1e-4, gradient="backprop")
    block(torch.randn(4, 3)).pow(2).sum().backward()
    assert 0 < block.nfe_backward <= block.nfe_forward


def test_adjoint_block_counts_backward_evaluations_and_matches_backprop_gradients():
    torch.manual_seed(1)
    func = SmallMLPFunc().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    grads = {}
    for gradient in ("backprop", "adjoint", "checkpoint"):
        func.zero_grad()
        block = ODEBlock(func, rtol=1e-10, atol=1e-10, gradient=gradient)
        block(x).pow(2).sum().backward()
        grads[gradient] = [p.grad.clone() for p in func.parameters()]
        if gradient != "backprop":
            assert block.nfe_backward > 0
            assert block.func.nfe == block.nfe_forward + block.nfe_backward
    for a, b in zip(grads["backprop"], grads["checkpoint"]):  # the same gradient, to rounding
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    grads[True], grads[False] = grads["adjoint"], grads["backprop"]
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_odeblock_in_sequential_to_dtype_state_dict_and_torch_save():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), ODEBlock(SmallMLPFunc(), rtol=1e-5, atol=1e-5),
                          nn.Linear(3, 1)).to(torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    out = model(x)
    assert out.dtype == torch.float64 and out.shape == (4, 1)

    clone = nn.Sequential(nn.Linear(2, 3), ODEBlock(SmallMLPFunc(), rtol=1e-5, atol=1e-5),
                          nn.Linear(3, 1)).double()
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone(x), out)

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), out)
    assert loaded[1].rtol == 1e-5 and loaded[1].method == "dopri5"


def test_odeblock_validates_its_arguments():
    with pytest.raises(ValueError, match=r"unknown method 'rk5'.*valid methods are:.*dopri5"):
        ODEBlock(SmallMLPFunc(), method="rk5")
    with pytest.raises(ValueError, match="rtol must be a positive finite float, got -1"):
        ODEBlock(SmallMLPFunc(), rtol=-1)
    with pytest.raises(ValueError, match="t0 and t1 must be finite and different"):
        ODEBlock(SmallMLPFunc(), 1.0, 1.0)
    with pytest.raises(TypeError, match=r"func must be an nn\.Module"):
        ODEBlock(lambda t, y: -y)
    with pytest.raises(ValueError, match="gradient must be one of"):
        ODEBlock(SmallMLPFunc(), gradient="yes")


def test_set_tolerance_changes_the_work_done():
    torch.manual_seed(0)
    block = ODEBlock(SmallMLPFunc(), rtol=1e-2, atol=1e-2)
    x = torch.randn(8, 3) * 3
    block(x)
    loose = block.nfe_forward
    block.set_tolerance(1e-7)
    block(x)
    assert block.nfe_forward > loose
    with pytest.raises(ValueError, match="rtol"):
        block.set_tolerance(0.0)


# --------------------------------------------------------------------------- NeuralODE


def test_neural_ode_returns_the_trajectory():
    model = NeuralODE(Decay(1.0), rtol=1e-9, atol=1e-11)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    y0 = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    ys = model(y0, t)
    assert ys.shape == (5, 1, 2)
    assert torch.allclose(ys, y0 * torch.exp(-t).view(5, 1, 1), rtol=1e-7)


def test_neural_ode_gradient_of_decay_rate():
    # y(T) = y0 exp(-k T)  =>  d y(T) / dk = -T y(T)
    func = Decay(0.3)
    model = NeuralODE(func, rtol=1e-10, atol=1e-12, gradient="adjoint")
    t = torch.tensor([0.0, 1.5], dtype=torch.float64)
    y0 = torch.tensor([2.0], dtype=torch.float64)
    yT = model(y0, t)[-1].sum()
    yT.backward()
    assert func.k.grad.item() == pytest.approx(-1.5 * yT.item(), rel=1e-6)
