"""Ordinary torchdiffeq calls that must work unchanged."""

import torch

from neuralode import odeint

F64 = torch.float64


def test_per_element_atol_with_one_rtol():
    """rtol a number and atol a tensor (the scale atol + rtol |y| per element)."""
    atol = torch.tensor([1e-10, 1e-6], dtype=F64)
    y0 = torch.ones(2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ys = odeint(lambda t, y: -y, y0, t, rtol=1e-8, atol=atol)
    torch.testing.assert_close(ys[-1], y0 * torch.exp(torch.tensor(-1.0, dtype=F64)),
                               rtol=1e-6, atol=1e-6)
    # the tighter component governs: the same steps as atol=1e-10 for both
    _, s_vec = odeint(lambda t, y: -y, y0, t, rtol=1e-8, atol=atol, return_stats=True)
    _, s_one = odeint(lambda t, y: -y, y0, t, rtol=1e-8, atol=1e-10, return_stats=True)
    _, s_loose = odeint(lambda t, y: -y, y0, t, rtol=1e-8, atol=1e-6, return_stats=True)
    assert s_loose.n_accepted <= s_vec.n_accepted <= s_one.n_accepted


def test_float32_state_with_rtol_1e_9_is_solved():
    """A float32 reference solution at rtol = atol = 1e-9 (as torchdyn's tests ask
    torchdiffeq for): accurate to float32, in a bounded number of steps."""
    y0 = torch.tensor([1.0, -2.0])
    t = torch.tensor([0.0, 1.0])
    ys, stats = odeint(lambda t, y: -y, y0, t, rtol=1e-9, atol=1e-9, return_stats=True)
    torch.testing.assert_close(ys[-1], y0 * torch.exp(torch.tensor(-1.0)), rtol=2e-6, atol=0)
    assert stats.status == "success" and stats.n_steps < 2000
