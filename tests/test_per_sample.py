"""per_sample=True: each sample of a batch is solved as if alone (issue 11)."""

from __future__ import annotations

import math

import pytest
import torch

from neuralode import Backprop, MaxStepsError, ODEInputError, odeint, odeint_adjoint, solve

B = 5
MU = torch.tensor([0.5, 2.0, 4.0, 1.0, 8.0], dtype=torch.float64)
Y0 = torch.tensor([[2.0, 0.0], [1.0, -1.0], [0.5, 0.3], [-1.5, 0.2], [1.0, 1.0]],
                  dtype=torch.float64)
T = torch.linspace(0.0, 4.0, 6, dtype=torch.float64)


def vdp(mu):
    """Forced Van der Pol with per-sample stiffness mu; works for one sample (y (2,), t 0-d)
    and for a batch (y (B, 2), t (B,))."""
    def f(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x**2) * v - x + 0.1 * torch.sin(t)], -1)
    return f


def solo(method, b, t, **kw):
    return solve(vdp(MU[b]), Y0[b], t, method=method, **kw)


def rel_diff(a, b):
    """max |a - b| / max |b| (relative to the sample's scale)."""
    return float((a - b).abs().max() / b.abs().max())


ADAPTIVE = [("dopri5", 1e-12), ("tsit5", 1e-12), ("bosh3", 1e-12), ("fehlberg2", 1e-12),
            ("adaptive_heun", 1e-12),
            # dopri8's interpolant has weights up to ~120 in magnitude: different (equally
            # valid) summation orders differ by more than 1e-12 between steps
            ("dopri8", 1e-9)]


@pytest.mark.parametrize("method,tol", ADAPTIVE)
def test_each_sample_equals_its_solo_solve(method, tol):
    rtol = {"bosh3": 1e-5, "fehlberg2": 1e-4, "adaptive_heun": 1e-3}.get(method, 1e-7)
    t = T if method != "adaptive_heun" else T[:4]
    sol = solve(vdp(MU), Y0, t, rtol=rtol, atol=1e-9, method=method, per_sample=True)
    assert sol.ys.shape == (len(t), B, 2)
    assert sol.status == ["success"] * B
    for b in range(B):
        ref = solo(method, b, t, rtol=rtol, atol=1e-9)
        assert rel_diff(sol.ys[:, b], ref.ys) < tol
        assert int(sol.stats.n_accepted[b]) == ref.stats.n_accepted
        assert int(sol.stats.n_rejected[b]) == ref.stats.n_rejected
    assert sol.stats.n_accepted.dtype == torch.int64
    # samples differ: the stiff one takes the most steps, the easy one the fewest
    assert int(sol.stats.n_accepted[4]) > int(sol.stats.n_accepted[0])


@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.05}), ("euler", None),
                                            ("midpoint", {"step_size": 0.02})])
def test_fixed_grid_sample_equals_solo(method, options):
    sol = solve(vdp(MU), Y0, T, method=method, options=options, per_sample=True)
    for b in range(B):
        ref = solo(method, b, T, options=options)
        assert rel_diff(sol.ys[:, b], ref.ys) < 1e-12
        assert int(sol.stats.n_accepted[b]) == ref.stats.n_accepted


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
def test_adams_sample_by_sample(method):
    # the Adams methods run sample by sample: func sees a batch of one
    f = vdp(torch.tensor(2.0, dtype=torch.float64))
    opts = {"step_size": 0.05}
    sol = solve(f, Y0, T, method=method, options=opts, per_sample=True)
    for b in range(B):
        ref = solve(f, Y0[b], T, method=method, options=opts)
        assert rel_diff(sol.ys[:, b], ref.ys) < 1e-12


def test_per_sample_output_times_equal_solo_solves():
    g = torch.Generator().manual_seed(0)
    ts = torch.sort(torch.rand(B, 7, generator=g, dtype=torch.float64) * 3, dim=1).values
    ts[:, 0] = torch.tensor([0.0, 0.5, -1.0, 0.0, 0.2], dtype=torch.float64)
    ts[2] = torch.flip(ts[2], [0])  # one sample integrates backwards
    for method, opts in (("dopri5", None), ("rk4", {"step_size": 0.02})):
        sol = solve(vdp(MU), Y0, ts, rtol=1e-7, atol=1e-9, method=method, options=opts,
                    per_sample=True)
        for b in range(B):
            ref = solo(method, b, ts[b], rtol=1e-7, atol=1e-9, options=opts)
            assert rel_diff(sol.ys[:, b], ref.ys) < 1e-12
            assert int(sol.stats.n_accepted[b]) == ref.stats.n_accepted


def test_float32_and_tuple_states():
    def f(t, y):
        a, b = y
        return (-a * b[:, :1], a.sum(1, keepdim=True) * torch.cos(t)[:, None])
    g = torch.Generator().manual_seed(0)
    y0 = (torch.rand(4, 3, generator=g), torch.rand(4, 1, generator=g))
    sol = solve(f, y0, T.float(), rtol=1e-5, atol=1e-7, per_sample=True)
    assert sol.ys[0].shape == (len(T), 4, 3) and sol.ys[0].dtype == torch.float32
    for b in range(4):
        ref = solve(lambda t, y: tuple(v[0] for v in f(t.reshape(1), (y[0][None], y[1][None]))),
                    (y0[0][b], y0[1][b]), T.float(), rtol=1e-5, atol=1e-7)
        # float32 rounds the stage sums differently: steps may differ by one or two, and
        # the outputs by the tolerance's order
        for got, want in zip(sol.ys, ref.ys):
            assert float((got[:, b] - want).abs().max()) < 5e-5
        assert abs(int(sol.stats.n_steps[b]) - ref.stats.n_steps) <= 3


def test_identical_samples_cost_one_solo_solve():
    y0 = Y0[1:2].repeat(3, 1)
    sol = solve(vdp(MU[1]), y0, T, per_sample=True)
    ref = solve(vdp(MU[1]), Y0[1], T)
    assert sol.stats.nfe == ref.stats.nfe  # nfe counts batched calls
    assert sol.stats.n_accepted.tolist() == [ref.stats.n_accepted] * 3


def test_failing_sample_does_not_corrupt_the_others():
    # sample 4 (mu = 8) needs the most steps: it hits max_num_steps alone
    steps = [solo("dopri5", b, T).stats.n_steps for b in range(B)]
    cap = sorted(steps)[-2] + 1
    sol = solve(vdp(MU), Y0, T, per_sample=True, method="dopri5",
                options={"max_num_steps": cap}, throw=False)
    worst = max(range(B), key=lambda b: steps[b])
    for b in range(B):
        if b == worst:
            assert sol.status[b] == "max_steps_reached"
            assert "max_num_steps" in sol.message[b]
            assert bool(torch.isnan(sol.ys[-1, b]).all())
        else:
            assert sol.status[b] == "success"
            assert rel_diff(sol.ys[:, b], solo("dopri5", b, T).ys) < 1e-12
    with pytest.raises(MaxStepsError, match=f"sample {worst}"):
        solve(vdp(MU), Y0, T, per_sample=True, method="dopri5",
              options={"max_num_steps": cap})


def test_blow_up_of_one_sample_is_its_own_status():
    # y' = y^2 blows up at t = 1/y0: only the sample with y0 = 1 does so before t = 2
    y0 = torch.tensor([[0.1], [1.0], [0.2]], dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    for method, opts in (("dopri5", None), ("rk4", {"step_size": 0.01})):
        sol = solve(lambda t, y: y**2, y0, t, method=method, options=opts, per_sample=True,
                    throw=False)
        assert sol.status[0] == sol.status[2] == "success"
        assert sol.status[1] in ("nonfinite", "step_size_underflow")
        assert 0.9 < float(sol.t_final[1]) < 1.1  # the blow-up is at t = 1
        for b in (0, 2):
            exact = y0[b, 0] / (1 - y0[b, 0] * 2.0)
            assert abs(float(sol.ys[1, b, 0]) - float(exact)) < 1e-5 * float(exact)


def test_time_arg_none_hands_func_a_nan_time():
    seen = []

    def f(t, y):
        seen.append(t.shape)
        return -y
    sol = solve(f, Y0, T, per_sample=True, options={"time_arg": "none"})
    assert all(s == () for s in seen)
    assert rel_diff(sol.ys[-1], Y0 * math.exp(-4.0)) < 1e-6
    bad = solve(lambda t, y: -y * t, Y0, T, per_sample=True, options={"time_arg": "none"},
                throw=False)
    assert set(bad.status) == {"nonfinite"}


def test_shrinking_the_batch_keeps_every_result():
    full = solve(vdp(MU), Y0, T, per_sample=True)

    def f(t, y):  # mu must follow the rows that are left: carried in the state instead
        return vdp(y[:, 2])(t, y[:, :2]).new_zeros(y.shape).index_copy(
            1, torch.tensor([0, 1]), vdp(y[:, 2])(t, y[:, :2]))
    y0 = torch.cat([Y0, MU[:, None]], 1)
    shrunk = solve(f, y0, T, per_sample=True, options={"shrink": 0.5})
    keep = solve(f, y0, T, per_sample=True)
    assert torch.equal(shrunk.ys, keep.ys)
    assert shrunk.stats.batch_rows < keep.stats.batch_rows
    assert torch.equal(shrunk.stats.n_accepted, keep.stats.n_accepted)
    assert full.status == shrunk.status


def test_odeint_per_sample_returns_stats():
    ys, stats = odeint(vdp(MU), Y0, T, per_sample=True, return_stats=True)
    assert ys.shape == (len(T), B, 2)
    assert stats.n_accepted.shape == (B,) and stats.n_rejected.shape == (B,)
    assert stats.status == ["success"] * B


@pytest.mark.parametrize("t,match", [(torch.zeros(2, 3), "shape"),
                                     (torch.tensor([[0.0, 1.0, 0.5]] * B), "row 0"),
                                     (torch.tensor([0.0, float("nan")]), "non-finite")])
def test_bad_times_are_refused(t, match):
    with pytest.raises(ODEInputError, match=match):
        solve(vdp(MU), Y0, t.double(), per_sample=True)


def test_a_solve_of_a_kind_seen_before_checks_its_values_and_decides_alike():
    """``setup`` keeps what it decided for a kind of solve (shapes, dtypes, tolerances,
    options): a later solve of that kind checks its own values and gets the decisions a
    first solve would."""
    from neuralode import per_sample

    f = vdp(MU)
    per_sample._KNOWN.clear()
    first = solve(f, Y0, T, per_sample=True, rtol=1e-6, atol=1e-8)
    assert len(per_sample._KNOWN) == 1
    again = solve(f, Y0 * 0.5, T, per_sample=True, rtol=1e-6, atol=1e-8)
    assert len(per_sample._KNOWN) == 1  # (the kind was known)
    fresh = [solo("dopri5", b, T, rtol=1e-6, atol=1e-8) for b in range(B)]
    assert rel_diff(first.ys[-1], torch.stack([s.ys[-1] for s in fresh])) <= 1e-10
    assert rel_diff(again.ys[0], Y0 * 0.5) == 0.0
    # the known kind's values are checked: y0 and t
    bad = Y0.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ODEInputError, match="non-finite"):
        solve(f, bad, T, per_sample=True, rtol=1e-6, atol=1e-8)
    with pytest.raises(ODEInputError, match="strictly increasing"):
        solve(f, Y0, T.flip(0)[[1, 0, 2, 3, 4, 5]], per_sample=True, rtol=1e-6, atol=1e-8)
    # other tolerances or options: another kind, decided afresh
    loose = solve(f, Y0, T, per_sample=True, rtol=1e-3, atol=1e-3)
    assert (loose.stats.n_accepted < first.stats.n_accepted).all()
    capped = solve(f, Y0, T, per_sample=True, rtol=1e-6, atol=1e-8, throw=False,
                   options={"max_num_steps": 3})
    assert capped.status == ["max_steps_reached"] * B
    # a callback added to func after its kind was known: its driver calls it

    def decay(t, y):
        return -y
    assert solve(decay, Y0, T, per_sample=True).stats.driver == "batched"
    calls = []
    decay.callback_step = lambda t0, y0, dt: calls.append(float(t0))  # type: ignore
    s = solve(decay, Y0, T, per_sample=True)
    assert s.stats.driver == "sample_by_sample" and len(calls) > 0
    assert rel_diff(s.ys[-1], Y0 * math.exp(-4.0)) <= 1e-6


def test_unsupported_options_are_refused():
    # every method and option runs per sample; the batched driver's own options need it
    with pytest.raises(ODEInputError, match="batched driver"):
        solve(vdp(MU), Y0, T, per_sample=True, method="bdf", options={"compile": True})
    with pytest.raises(ODEInputError, match="Jacobians"):
        solve(vdp(MU), Y0, T, per_sample=True, method="kvaerno3", options={"compile": True})
    with pytest.raises(ODEInputError, match="batched driver"):
        solve(vdp(MU), Y0, T, per_sample=True, method="dopri5",
              options={"jump_t": [1.0], "shrink": 0.5})
    with pytest.raises(ODEInputError, match="batch dimension"):
        solve(vdp(MU), torch.tensor(1.0), T, per_sample=True)
    with pytest.raises(ODEInputError, match="empty tuple"):
        solve(vdp(MU), (), T, per_sample=True)
    assert odeint_adjoint is not None


def _mlp_problem():
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    net = net.double()

    def f(t, y):
        tt = t.reshape(-1, 1).expand(y.shape[0], 1) if y.dim() == 2 else t.reshape(1)
        return net(torch.cat([y, tt], -1))
    y0 = torch.randn(4, 2, generator=g, dtype=torch.float64)
    ts = torch.sort(torch.rand(4, 5, generator=g, dtype=torch.float64) * 3, 1).values
    ts[:, 0] = 0.0
    w = torch.randn(5, 4, 2, generator=g, dtype=torch.float64)
    return net, f, y0, ts, w


def _solo_grads(net, f, y0, ts, w, **kw):
    """Sum over samples of each sample's backprop gradient (solved alone)."""
    y0 = y0.clone().requires_grad_(True)
    total = None
    for b in range(y0.shape[0]):
        yb = odeint(f, y0[b], ts[b], **kw)
        gb = torch.autograd.grad((yb * w[:, b]).sum(), [y0, *net.parameters()])
        total = gb if total is None else [a + c for a, c in zip(total, gb)]
    return total


@pytest.mark.parametrize("method,options", [("dopri5", None), ("rk4", {"step_size": 0.05})])
def test_backprop_gradients_equal_solo_gradients(method, options):
    net, f, y0, ts, w = _mlp_problem()
    y0r = y0.clone().requires_grad_(True)
    ys = odeint(f, y0r, ts, method=method, options=options, per_sample=True)
    got = torch.autograd.grad((ys * w).sum(), [y0r, *net.parameters()])
    want = _solo_grads(net, f, y0, ts, w, method=method, options=options)
    for a, c in zip(got, want):
        assert float((a - c).abs().max() / c.abs().max()) < 1e-12


@pytest.mark.parametrize("method,options,tol", [("dopri5", None, 1e-7),
                                                ("rk4", {"step_size": 0.04}, 1e-5)])
def test_adjoint_gradients_equal_solo_gradients(method, options, tol):
    net, f, y0, ts, w = _mlp_problem()
    y0r = y0.clone().requires_grad_(True)
    ys, stats = odeint_adjoint(f, y0r, ts, method=method, options=options, rtol=1e-9,
                               atol=1e-10, per_sample=True, return_stats=True,
                               adjoint_params=tuple(net.parameters()))
    got = torch.autograd.grad((ys * w).sum(), [y0r, *net.parameters()])
    # reference: backprop through tight per-sample solves
    want = _solo_grads(net, f, y0, ts, w, rtol=1e-10, atol=1e-11)
    for a, c in zip(got, want):
        assert float((a - c).abs().max() / c.abs().max()) < tol
    back = stats.extra["backward"]
    assert back.n_accepted.shape == (4,) and bool((back.n_accepted > 0).all())


def test_one_host_synchronisation_per_adaptive_step():
    syncs = []
    sol = Backprop().solve(vdp(MU), Y0, T, rtol=1e-7, atol=1e-9, method="dopri5",
                          per_sample=True, sync_counter=syncs)
    # one per attempt of the slowest sample, plus the check that finds nothing running
    assert len(syncs) == int(sol.stats.n_steps.max()) + 1


def test_fixed_grid_synchronises_only_before_the_loop():
    counts = []
    for h in (0.1, 0.01):
        syncs = []
        sol = Backprop().solve(vdp(MU[:2]), Y0[:2], T, rtol=1e-7, atol=1e-9, method="rk4",
                               per_sample=True,
                               options={"step_size": h}, sync_counter=syncs)
        counts.append(len(syncs))
        assert int(sol.stats.n_accepted[0]) == round(4.0 / h)
    assert counts[0] == counts[1] <= 2


@pytest.mark.parametrize("method,options", [("dopri5", {}), ("rk4", {"step_size": 0.02})])
def test_compiled_step_equals_eager(method, options):
    # fullgraph=True: any graph break fails; "aot_eager" traces without a C++ toolchain
    eager = solve(vdp(MU), Y0, T, method=method, options=dict(options), per_sample=True)
    comp = solve(vdp(MU), Y0, T, method=method, per_sample=True,
                 options=dict(options, compile="aot_eager"))
    assert rel_diff(comp.ys, eager.ys) < 1e-12
    assert torch.equal(comp.stats.n_accepted, eager.stats.n_accepted)
    assert torch.equal(comp.stats.n_rejected, eager.stats.n_rejected)
    assert comp.stats.nfe == eager.stats.nfe


def test_each_sample_stops_at_its_own_event():
    # free fall from heights h0: the height reaches 0 at sqrt(2 h0 / g)
    g = 9.81
    h0 = torch.tensor([1.0, 5.0, 20.0, 100.0], dtype=torch.float64)
    y0 = torch.stack([h0, torch.zeros(4, dtype=torch.float64)], 1)

    def f(t, y):
        return torch.stack([y[..., 1], torch.full_like(y[..., 1], -g)], -1)
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    sol = solve(f, y0, t, per_sample=True, event_fn=lambda t, y: y[:, 0], rtol=1e-8,
                atol=1e-9)
    exact = torch.sqrt(2 * h0 / g)
    assert sol.status == ["event", "event", "event", "success"]
    assert float((sol.event_t[:3] - exact[:3]).abs().max()) < 1e-9
    assert bool(torch.isnan(sol.event_t[3]))
    for b in range(4):
        before = t <= exact[b]
        assert bool(torch.isfinite(sol.ys[before, b]).all())
        assert bool(torch.isnan(sol.ys[~before, b]).all())
        want = h0[b] - 0.5 * g * t[before] ** 2
        assert float((sol.ys[before, b, 0] - want).abs().max()) < 1e-8
        if b < 3:  # the same event time as the sample's solo solve
            ref = solve(f, y0[b], torch.tensor([0.0, 3.0], dtype=torch.float64),
                        event_fn=lambda t, y: y[0], rtol=1e-8, atol=1e-9)
            assert abs(float(ref.event_t) - float(sol.event_t[b])) < 1e-12
            assert abs(float(sol.y_final[b, 0])) < 1e-9


@pytest.mark.parametrize("method,options", [("dopri5", None), ("bosh3", None),
                                            ("rk4", {"step_size": 0.05})])
def test_dense_solution_equals_solo_dense_solution(method, options):
    rtol = 1e-5 if method == "bosh3" else 1e-7
    sol = solve(vdp(MU), Y0, T, method=method, options=options, rtol=rtol, per_sample=True,
                dense=True)
    g = torch.Generator().manual_seed(3)
    q = torch.sort(torch.rand(B, 9, generator=g, dtype=torch.float64) * 4, 1).values
    got = sol.evaluate(q)  # (9, B, 2)
    assert got.shape == (9, B, 2)
    assert rel_diff(sol.evaluate(T), sol.ys) < 1e-12  # at the output times: the outputs
    for b in range(B):
        ref = solo(method, b, T, options=options, rtol=rtol, dense=True)
        assert rel_diff(got[:, b], ref.evaluate(q[b])) < 1e-12
    assert bool(torch.isnan(sol.evaluate(torch.tensor([5.0], dtype=torch.float64))).all())
