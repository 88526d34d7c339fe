"""Devices without float64 (Apple's MPS; torchdiffeq issue 257), tested on CPU by forcing
the float32-time path (``timekeeping.force_time_dtype(torch.float32)``).

* Every explicit method's one-problem solve on float32 states creates no float64 tensor at
  all under the forced path (so none on a device without float64) and agrees with the
  default path to float32 accuracy.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from neuralode import ODEInputError, odeint, solve
from neuralode.solvers import SOLVERS, timekeeping
from neuralode.solvers.methods import AdaptiveRK, FixedGridRK
from neuralode.solvers.timekeeping import force_time_dtype, time_dtype

# ------------------------------------------------------------------------------------------
# the switch
# ------------------------------------------------------------------------------------------


def test_time_dtype_is_float64_where_the_device_has_it_and_float32_on_mps():
    assert time_dtype(torch.device("cpu")) == torch.float64
    assert time_dtype("cuda:0") == torch.float64
    assert time_dtype(None) == torch.float64
    assert time_dtype(torch.device("mps")) == torch.float32
    assert time_dtype("mps:0") == torch.float32
    with force_time_dtype(torch.float32):
        assert time_dtype(torch.device("cpu")) == torch.float32
        with force_time_dtype(None):
            assert time_dtype("cpu") == torch.float64
        assert time_dtype("cpu") == torch.float32
    assert timekeeping.FORCED_TIME_DTYPE is None


def test_bad_forced_time_dtypes_are_refused_clearly():
    with pytest.raises(ValueError, match="float32"), force_time_dtype(torch.float16):
        pass
    timekeeping.FORCED_TIME_DTYPE = "float32"  # type: ignore[assignment]
    try:
        with pytest.raises(ValueError, match="FORCED_TIME_DTYPE"):
            time_dtype("cpu")
    finally:
        timekeeping.FORCED_TIME_DTYPE = None


# ------------------------------------------------------------------------------------------
# solves on the forced float32-time path
# ------------------------------------------------------------------------------------------

EXPLICIT = sorted([name for name, cls in SOLVERS.items()
                   if cls.__mro__[1] in (AdaptiveRK, FixedGridRK)] + ["explicit_adams"])


class NoFloat64(TorchDispatchMode):
    """Fails on any operation that produces a float64 tensor (as a device without float64
    would). ``torch.tensor(python_floats, dtype=..., device=...)`` is let through: it reads
    the Python numbers on the host (shown to modes as a float64 ``lift_fresh``) and the
    device receives the requested dtype."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.lift_fresh.default:
            return out
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.dtype in (torch.float64, torch.complex128):
                raise AssertionError(f"{func} made a {o.dtype} tensor")
        return out


def rhs(t, y):
    return torch.stack([y[..., 1], -y[..., 0] - 0.1 * y[..., 1]], -1)


def options_for(cls):
    return None if cls.adaptive else {"step_size": 0.01}


def test_the_no_float64_guard_can_fail():
    with pytest.raises(AssertionError, match="float64"), NoFloat64():
        torch.zeros(2, dtype=torch.float64)


@pytest.mark.parametrize("method", EXPLICIT)
def test_every_explicit_method_makes_no_float64_tensor_on_the_float32_time_path(method):
    cls = SOLVERS[method]
    y0 = torch.tensor([1.0, 0.0])
    t = torch.linspace(0.0, 1.0, 7)
    kw = {"method": method, "options": options_for(cls), "rtol": 1e-5, "atol": 1e-7}
    ref = odeint(rhs, y0, t, **kw)
    with force_time_dtype(torch.float32), NoFloat64():
        ys = odeint(rhs, y0, t, **kw)
    assert ys.dtype == torch.float32
    torch.testing.assert_close(ys, ref, rtol=1e-5, atol=1e-6)


OTHERS = sorted(set(SOLVERS) - set(EXPLICIT) - {"scipy_solver"})  # scipy: a host solver


@pytest.mark.parametrize("method", OTHERS)
def test_implicit_and_multistep_methods_make_no_float64_tensor_on_the_float32_time_path(
        method):
    cls = SOLVERS[method]
    y0 = torch.tensor([1.0, 0.0])
    t = torch.linspace(0.0, 1.0, 5)
    kw = {"method": method, "options": None if cls.adaptive else {"step_size": 0.05},
          "rtol": 1e-4, "atol": 1e-6}
    ref = odeint(rhs, y0, t, **kw)
    with force_time_dtype(torch.float32), NoFloat64():
        ys = odeint(rhs, y0, t, **kw)
    torch.testing.assert_close(ys, ref, rtol=1e-5, atol=1e-5)


def test_the_default_path_keeps_float64_interpolant_weights():
    """Without the switch the dense weights are float64 (float32 would lose ~1e-5 to
    dopri8's large coefficients); with it, float32."""
    from neuralode.solvers.rk import _tensor_coefficients

    tab = SOLVERS["dopri8"].tableau
    assert _tensor_coefficients(tab, torch.float32, torch.device("cpu"))[3].dtype == \
        torch.float64
    with force_time_dtype(torch.float32):
        assert _tensor_coefficients(tab, torch.float32, torch.device("cpu"))[3].dtype == \
            torch.float32


class Damped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, t, y):
        return torch.stack([y[..., 1], -y[..., 0] - self.a * y[..., 1]], -1)


def grads(gradient: str, per_sample: bool):
    torch.manual_seed(0)
    f = Damped()
    y0 = torch.tensor([[1.0, 0.0], [0.5, -0.2], [-1.0, 0.3]])
    y0 = y0 if per_sample else y0[0]
    ys = odeint(f, y0, torch.linspace(0.0, 1.0, 5), rtol=1e-6, atol=1e-8,
                gradient=gradient, per_sample=per_sample)
    (ys ** 2).sum().backward()
    return ys.detach(), f.a.grad


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
def test_gradients_on_the_float32_time_path_make_no_float64_and_match(gradient, per_sample):
    ys, g = grads(gradient, per_sample)
    with force_time_dtype(torch.float32), NoFloat64():
        ys32, g32 = grads(gradient, per_sample)
    torch.testing.assert_close(ys32, ys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g32, g, rtol=1e-4, atol=1e-6)


def test_events_and_dense_output_on_the_float32_time_path():
    from neuralode import odeint_dense, odeint_event

    y0 = torch.tensor([1.0, 0.0])
    ev = lambda t, y: y[..., 0] - 0.5  # noqa: E731
    q = torch.tensor([0.3, 0.7])
    te, ye = odeint_event(rhs, y0, torch.tensor(0.0), event_fn=ev)
    d = odeint_dense(rhs, y0, torch.tensor(0.0), torch.tensor(1.0))(q)
    with force_time_dtype(torch.float32), NoFloat64():
        te32, ye32 = odeint_event(rhs, y0, torch.tensor(0.0), event_fn=ev)
        d32 = odeint_dense(rhs, y0, torch.tensor(0.0), torch.tensor(1.0))(q)
    assert te32.dtype == torch.float32
    torch.testing.assert_close(te32, te, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ye32, ye, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d32, d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", EXPLICIT)
def test_per_sample_float32_time_runs_each_sample_on_host_floats_and_equals_float64_time(method):
    """Without float64 on the device the per-sample solve runs sample by sample on the
    float clock (host floats: exact time); it equals the tensor clock's float64-time solve
    to float32 accuracy, with per-sample events and dense output."""
    cls = SOLVERS[method]
    y0 = torch.tensor([[1.0, 0.0], [0.5, -0.2], [-1.0, 0.3]])
    t = torch.linspace(0.0, 1.0, 6)
    kw = {"method": method, "options": options_for(cls), "rtol": 1e-5, "atol": 1e-7,
          "per_sample": True, "dense": True}
    ref = solve(rhs, y0, t, **kw)
    with force_time_dtype(torch.float32), NoFloat64():
        sol = solve(rhs, y0, t, **kw)
        mid = sol.evaluate(torch.tensor([0.25, 0.75]))
    assert sol.stats.driver == "sample_by_sample"
    assert sol.t_final.dtype == torch.float32
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mid, ref.evaluate(torch.tensor([0.25, 0.75])).float(),
                               rtol=1e-5, atol=1e-6)
    assert sol.status == ref.status == ["success"] * 3


def test_per_sample_events_on_the_float32_time_path():
    y0 = torch.tensor([[1.0, 0.0], [0.8, 0.1]])
    t = torch.linspace(0.0, 3.0, 4)
    ev = lambda t, y: y[:, 0] - 0.5  # noqa: E731
    ref = solve(rhs, y0, t, per_sample=True, event_fn=ev)
    with force_time_dtype(torch.float32), NoFloat64():
        sol = solve(rhs, y0, t, per_sample=True, event_fn=ev)
    assert sol.status == ref.status == ["event"] * 2
    torch.testing.assert_close(sol.event_t, ref.event_t.float(), rtol=1e-5, atol=1e-6)


def test_per_sample_shrink_without_float64_time_is_refused_clearly():
    with force_time_dtype(torch.float32), \
            pytest.raises(ODEInputError, match="device with float64"):
        odeint(rhs, torch.ones(2, 2), torch.linspace(0, 1, 3), per_sample=True,
               options={"shrink": 0.5})


def test_the_solvers_float32_time_path_over_a_million_steps_keeps_exact_time():
    # the forced float32-time path of a one-problem solve: 10^6 fixed-grid steps of 1e-6
    # from t = 1; the clock (host floats, grid points t0 + k h) hands f every step's time
    # within half a float32 ulp of 1 + k h, and ends exactly at t1, where float32
    # accumulation of the same steps (t += h) drifts by tens of thousands of ulps
    seen = []

    def f(t, y):
        seen.append(t)
        return torch.ones_like(y)
    y0 = torch.zeros(1, dtype=torch.float32)
    t = torch.tensor([1.0, 2.0], dtype=torch.float32)
    n, h = 10**6, 1e-6
    with timekeeping.force_time_dtype(torch.float32):
        sol = solve(f, y0, t, method="euler", options={"step_size": h})
    assert sol.stats.n_accepted == n and sol.t_final == 2.0
    got = torch.stack(seen[:n]).to(torch.float64)
    want = 1.0 + h * torch.arange(n, dtype=torch.float64)
    ulp = torch.finfo(torch.float32).eps * want
    assert float(((got - want).abs() / ulp).max()) <= 0.5
    naive = torch.full((), 1.0, dtype=torch.float32)
    for _ in range(10**4):  # the drift of float32 accumulation, on 1% of the steps
        naive = naive + torch.tensor(h, dtype=torch.float32)
    eps32 = torch.finfo(torch.float32).eps
    assert float((naive.double() - (1.0 + 1e4 * h)).abs() / (eps32 * 1.01)) > 10
