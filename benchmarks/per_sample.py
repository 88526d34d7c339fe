"""Per-sample batched solving (``per_sample=True``, issue 11) against torchode (eager) and
torchdiffeq (the batch as one joint problem), in one interleaved run (medians, one thread).

  (a) 256 Van der Pol oscillators, mu ~ U[1, 10], y0 ~ N(0, 2^2), t in [0, 10] (11 outputs),
      dopri5, rtol = atol = 1e-6, float64, forward only: wall time, total evaluations of f
      per sample (batched calls x rows for neuralode and torchdiffeq, torchode's own count),
      per-sample steps, and whether each sample's steps equal its solo solve's.
      Also neuralode with ``shrink=0.5`` against masking, on the same problem with mu carried
      in the state (the function then follows the rows that are left).
  (b) a training step (forward + adjoint backward) of an MLP dynamics (4 -> 64 -> 4, tanh,
      float32) on a batch of 256 with per-sample output times (10 per sample, sorted U[0, 2]),
      dopri5 1e-5: neuralode ``odeint_adjoint(per_sample=True)``, torchode
      ``BacksolveAdjoint``, torchdiffeq ``odeint_adjoint`` of the joint batch on the union of
      the output times (2560 times).
  (c) one latent ODE training step (ELBO forward + backward) on irregularly sampled spirals,
      each sequence solved on its own times (per_sample) vs the union grid.

    python benchmarks/per_sample.py [--only a,b,c] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import interleaved  # noqa: E402 (from HERE, put on the path above)

import neuralode  # noqa: E402

try:
    import torchode as to
except ImportError:  # pragma: no cover - optional
    to = None
try:
    import torchdiffeq as tdq
except ImportError:  # pragma: no cover - optional
    tdq = None


# ------------------------------------------------------------------------------ (a)


def vdp_problem(B=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = 1 + 9 * torch.rand(B, generator=g, dtype=torch.float64)
    y0 = 2 * torch.randn(B, 2, generator=g, dtype=torch.float64)
    t = torch.linspace(0, 10, 11, dtype=torch.float64)
    return mu, y0, t


class VdP(nn.Module):
    def __init__(self, mu):
        super().__init__()
        self.mu = mu
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x**2) * v - x], -1)


def vdp_carried(t, y):
    """mu as a third state component (dmu/dt = 0): rows can be dropped (shrink)."""
    x, v, mu = y[:, 0], y[:, 1], y[:, 2]
    return torch.stack([v, mu * (1 - x**2) * v - x, torch.zeros_like(mu)], -1)


def bench_a(repeats: int) -> None:
    mu, y0, t = vdp_problem()
    B = len(mu)
    tol = 1e-6
    f = VdP(mu)
    out = {}
    sol = neuralode.solve(f, y0, t, rtol=tol, atol=tol, method="dopri5", per_sample=True)
    steps = sol.stats.n_steps
    out["neuralode per_sample"] = (sol.stats.batch_rows / B, steps)
    fns = {"neuralode per_sample": lambda: neuralode.solve(
        f, y0, t, rtol=tol, atol=tol, method="dopri5", per_sample=True)}
    if to is not None:
        term = to.ODETerm(f)

        def torchode_solve():
            step = to.Dopri5(term=term)
            ctrl = to.IntegralController(atol=tol, rtol=tol, term=term)
            solver = to.AutoDiffAdjoint(step, ctrl)
            prob = to.InitialValueProblem(y0=y0, t_eval=t.expand(B, -1))
            return solver.solve(prob)
        s = torchode_solve()
        out["torchode eager"] = (float(s.stats["n_f_evals"].double().mean()),
                                 s.stats["n_steps"])
        fns["torchode eager"] = torchode_solve
    if tdq is not None:
        f.calls = 0
        tdq.odeint(f, y0, t, rtol=tol, atol=tol, method="dopri5")
        out["torchdiffeq joint"] = (f.calls, None)
        fns["torchdiffeq joint"] = lambda: tdq.odeint(f, y0, t, rtol=tol, atol=tol,
                                                      method="dopri5")
    # every sample's steps against its solo solve (scalar path, not timed)
    same = 0
    for b in range(B):
        ref = neuralode.solve(VdP(mu[b]), y0[b], t, rtol=tol, atol=tol, method="dopri5")
        same += int(steps[b]) == ref.stats.n_steps and \
            int(sol.stats.n_accepted[b]) == ref.stats.n_accepted
    times = interleaved(fns, repeats)
    print(f"\n### (a) {B} Van der Pol, mu ~ U[1, 10], t in [0, 10], dopri5 {tol:g}, float64\n")
    print(f"samples whose steps (accepted and rejected) equal their solo solve's: {same}/{B}\n")
    print("| solver | wall time (s) | evaluations of f per sample | steps per sample "
          "min / median / max |")
    print("|---|---|---|---|")
    for k, (evals, st) in out.items():
        st_s = "- (one step size for all)" if st is None else \
            f"{int(st.min())} / {int(st.median())} / {int(st.max())}"
        print(f"| {k} | {times[k]:.3f} | {evals:.0f} | {st_s} |")
    if "torchode eager" in times:
        print(f"\nneuralode per_sample vs torchode eager: "
              f"{times['torchode eager'] / times['neuralode per_sample']:.2f}x faster")

    # masking vs shrinking, mu carried in the state
    y0c = torch.cat([y0, mu[:, None]], 1)
    runs = {}
    for name, opts in (("masked", None), ("shrink=0.5", {"shrink": 0.5})):
        s = neuralode.solve(vdp_carried, y0c, t, rtol=tol, atol=tol, method="dopri5",
                            options=opts, per_sample=True)
        runs[name] = s
    assert torch.equal(runs["masked"].ys, runs["shrink=0.5"].ys)
    tm = interleaved({k: (lambda o=o: neuralode.solve(
        vdp_carried, y0c, t, rtol=tol, atol=tol, method="dopri5", options=o,
        per_sample=True)) for k, o in (("masked", None), ("shrink=0.5", {"shrink": 0.5}))},
        repeats)
    print("\nfinished samples: masking vs shrinking the batch (mu carried in the state; "
          "identical outputs)\n")
    print("| mode | wall time (s) | batched calls | rows evaluated |")
    print("|---|---|---|---|")
    for k, s in runs.items():
        print(f"| {k} | {tm[k]:.3f} | {s.stats.nfe} | {s.stats.batch_rows} |")


# ------------------------------------------------------------------------------ (b)


def mlp_problem(B=256, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 4))
    y0 = torch.randn(B, 4, generator=g)
    ts = torch.sort(torch.rand(B, T, generator=g) * 2, 1).values
    ts[:, 0] = 0.0
    target = torch.randn(T, B, 4, generator=g)
    return net, y0, ts, target


class Auto(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.net(y)


def bench_b(repeats: int) -> None:
    net, y0, ts, target = mlp_problem()
    B, T = ts.shape
    f = Auto(net)
    tol = 1e-5
    fns, nfe = {}, {}

    def neuralode_step():
        net.zero_grad()
        ys = neuralode.odeint_adjoint(f, y0, ts, rtol=tol, atol=tol, method="dopri5",
                                      per_sample=True, options={"time_arg": "none"})
        loss = ((ys - target) ** 2).mean()
        loss.backward()
        return loss
    fns["neuralode per_sample adjoint"] = neuralode_step
    if to is not None:
        term = to.ODETerm(f)

        def torchode_step():
            net.zero_grad()
            step = to.Dopri5(term=term)
            ctrl = to.IntegralController(atol=tol, rtol=tol, term=term)
            solver = to.BacksolveAdjoint(term, step, ctrl)
            sol = solver.solve(to.InitialValueProblem(y0=y0, t_eval=ts))
            loss = ((sol.ys.transpose(0, 1) - target) ** 2).mean()
            loss.backward()
            return loss
        fns["torchode BacksolveAdjoint"] = torchode_step
    if tdq is not None:
        union, inv = torch.unique(ts, return_inverse=True)

        def tdq_step():
            net.zero_grad()
            ys = tdq.odeint_adjoint(f, y0, union, rtol=tol, atol=tol, method="dopri5")
            # row b at its own times: ys[inv[b, k], b]
            got = ys[inv.T, torch.arange(B)[None, :].expand(T, B)]
            loss = ((got - target) ** 2).mean()
            loss.backward()
            return loss
        fns["torchdiffeq adjoint, joint on the union"] = tdq_step
    losses = {}
    for k, fn in fns.items():
        f.calls = 0
        losses[k] = float(fn().detach())
        nfe[k] = f.calls
    # torchdiffeq's adjoint on 2560 union times takes minutes: timed once, not interleaved
    slow = {k: fns.pop(k) for k in list(fns) if k.startswith("torchdiffeq")}
    times = interleaved(fns, repeats)
    for k, fn in slow.items():
        t0 = time.perf_counter()
        fn()
        times[k] = time.perf_counter() - t0
        fns[k] = fn
    print(f"\n### (b) training step, MLP 4-64-4 dynamics, batch {B}, {T} per-sample output "
          f"times in [0, 2], dopri5 {tol:g}, float32, adjoint\n")
    print("| solver | wall time (s) (torchdiffeq: one run) | calls of f (forward + "
          "backward) | loss |")
    print("|---|---|---|---|")
    for k in fns:
        print(f"| {k} | {times[k]:.3f} | {nfe[k]} | {losses[k]:.6f} |")
    base = times["neuralode per_sample adjoint"]
    for k in fns:
        if k != "neuralode per_sample adjoint":
            print(f"\nneuralode per_sample vs {k}: {times[k] / base:.2f}x faster")


# ------------------------------------------------------------------------------ (c)


def bench_c(repeats: int) -> None:
    from neuralode.data.spirals import gather_points, make_spirals
    from neuralode.models.latent_ode import LatentODE
    data = make_spirals(n_spirals=64, n_total=100, n_obs=30, seed=0)
    batch = gather_points(data, "obs", list(range(64)))
    torch.manual_seed(0)
    model = LatentODE(2, 4, enc_hidden=25, ode_hidden=20, rtol=1e-3, atol=1e-4)
    noise = torch.randn(64, 4)
    fns = {}
    for name, union in (("per_sample", False), ("union grid", True)):
        def step(union=union):
            model.union_grid = union
            model.zero_grad()
            loss = -model.elbo(batch.times, batch.values, batch.mask, noise=noise).elbo
            loss.backward()
            return loss
        fns[name] = step
    n_union = int(torch.unique(batch.times[batch.mask]).numel())
    times = interleaved(fns, repeats)
    print(f"\n### (c) latent ODE training step, 64 irregular spirals ({batch.times.shape[1]} "
          f"points each, {n_union} distinct times in the batch), dopri5 1e-3\n")
    print("| decoder solve | wall time (s) |")
    print("|---|---|")
    for k in fns:
        print(f"| {k} | {times[k]:.3f} |")
    print(f"\nper_sample vs union grid: {times['union grid'] / times['per_sample']:.2f}x faster")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="a,b,c")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    for part in args.only.split(","):
        {"a": bench_a, "b": bench_b, "c": bench_c}[part](args.repeats)
    print(f"\n(total {time.time() - t0:.0f} s; torch {torch.__version__}, one thread)")


if __name__ == "__main__":
    main()
