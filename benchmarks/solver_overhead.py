"""Solver overhead: neuralode vs torchdiffeq (when installed), interleaved, one thread.

Problems (issue 2):
  (a) 2-D linear spiral, t in [0, 25], 200 outputs, dopri5 rtol=atol=1e-6, float64;
  (b) tanh MLP dynamics (batch 512, state 32, width 64), t in [0, 1], dopri5 1e-5, float32,
      forward only and forward + backward (backprop through the solver);
  (c) the ODE-Net convolutional block (state 128x64x7x7, GroupNorm-ReLU-ConcatConv2d 3x3,
      twice, then GroupNorm), dopri5 1e-3, float32, forward only.

Overhead ratio = solve time / (NFE x time of one evaluation of f); for forward + backward
the denominator uses one evaluation of f plus its backward. Errors are against a closed form
(a) or a dopri8 solution in float64 at rtol=atol=1e-12 (b) or 1e-7 (c; 1e4 below the tolerance
benchmarked, and a tighter reference costs minutes).

    python benchmarks/solver_overhead.py [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import interleaved, torchdiffeq_or_none

from neuralode import odeint


class MLPDynamics(nn.Module):
    def __init__(self, dim=32, width=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y)


class ConcatConv2d(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin + 1, cout, 3, 1, 1)

    def forward(self, t, x):
        tt = torch.ones_like(x[:, :1]) * t
        return self.conv(torch.cat([tt, x], 1))


class ConvBlock(nn.Module):
    """The ODE-Net's ODE function (torchdiffeq's MNIST example architecture)."""

    def __init__(self, dim=64):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, dim)
        self.conv1 = ConcatConv2d(dim, dim)
        self.norm2 = nn.GroupNorm(32, dim)
        self.conv2 = ConcatConv2d(dim, dim)
        self.norm3 = nn.GroupNorm(32, dim)

    def forward(self, t, x):
        out = self.conv1(t, torch.relu(self.norm1(x)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)


def _counting(func):
    count = [0]

    def f(t, y):
        count[0] += 1
        return func(t, y)

    return f, count


def problem_a():
    A = torch.tensor([[-0.1, -1.0], [1.0, -0.1]], dtype=torch.float64)

    def f(t, y):
        return torch.mv(A, y)

    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0, 25, 200, dtype=torch.float64)
    exact = torch.stack([torch.linalg.matrix_exp(A * ti) @ y0 for ti in t])
    return {"name": "(a) spiral, 200 outputs, dopri5 1e-6, float64", "f": f, "y0": y0, "t": t,
                "tol": 1e-6, "exact": exact, "backward": False, "f_args": (t[0], y0)}


def problem_b(backward):
    torch.manual_seed(0)
    f = MLPDynamics()
    y0 = torch.randn(512, 32)
    t = torch.tensor([0.0, 1.0])
    ref = odeint(f.double(), y0.double(), t.double(), rtol=1e-12, atol=1e-12,
                 method="dopri8").float()
    f.float()
    name = "(b) MLP 512x32, dopri5 1e-5, float32, " + ("fwd+bwd" if backward else "fwd")
    return {"name": name, "f": f, "y0": y0, "t": t, "tol": 1e-5, "exact": ref, "backward": backward,
                "f_args": (t[0], y0)}


def problem_c():
    torch.manual_seed(0)
    f = ConvBlock()
    y0 = torch.randn(128, 64, 7, 7)
    t = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        ref = odeint(f.double(), y0.double(), t.double(), rtol=1e-7, atol=1e-7,
                     method="dopri8").float()
    f.float()
    return {"name": "(c) ODE-Net conv block 128x64x7x7, dopri5 1e-3, float32, fwd", "f": f,
                "y0": y0, "t": t, "tol": 1e-3, "exact": ref, "backward": False,
                "f_args": (t[0], y0)}


def run_problem(p, repeats, tdq):
    solvers = {"neuralode": odeint}
    if tdq is not None:
        solvers["torchdiffeq"] = tdq.odeint
    f, y0, t, tol = p["f"], p["y0"], p["t"], p["tol"]
    params = list(f.parameters()) if isinstance(f, nn.Module) else []

    def make(solver):
        if p["backward"]:
            def run():
                for q in params:
                    q.grad = None
                ys = solver(f, y0, t, rtol=tol, atol=tol, method="dopri5")
                ys[-1].sum().backward()
        else:
            def run():
                with torch.no_grad():
                    solver(f, y0, t, rtol=tol, atol=tol, method="dopri5")
        return run

    def f_eval():
        if p["backward"]:
            out = f(*p["f_args"])
            out.sum().backward()
        else:
            with torch.no_grad():
                f(*p["f_args"])

    fns = {name: make(s) for name, s in solvers.items()}
    inner_f = 50 if p["exact"].numel() < 10 else 5
    fns["f"] = lambda: [f_eval() for _ in range(inner_f)]
    for fn in fns.values():  # warm-up
        fn()
    times = interleaved(fns, repeats)
    t_f = times.pop("f") / inner_f
    rows = []
    for name, solver in solvers.items():
        cf, count = _counting(f)
        with torch.no_grad():
            ys = solver(cf, y0, t, rtol=tol, atol=tol, method="dopri5")
        nfe = count[0]
        err = (ys - p["exact"]).abs().max().item()
        rows.append({"problem": p["name"], "solver": name, "time_ms": 1e3 * times[name], "nfe": nfe,
                         "max_error": err, "f_time_us": 1e6 * t_f,
                         "overhead_ratio": times[name] / (nfe * t_f)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--problems", default="a,b,bb,c", help="comma list of a, b, bb, c")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tdq = torchdiffeq_or_none()
    makers = {"a": problem_a, "b": lambda: problem_b(False), "bb": lambda: problem_b(True),
              "c": problem_c}
    rows = []
    for key in args.problems.split(","):
        p = makers[key]()
        reps = args.repeats if key in ("a", "b") else max(5, args.repeats // 3)
        rows.extend(run_problem(p, reps, tdq))
    print(f"torch {torch.__version__}, 1 thread, torchdiffeq "
          f"{getattr(tdq, '__version__', 'not installed')}\n")
    print("| problem | solver | time (ms, median) | NFE | max error | f time (us) | overhead |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['problem']} | {r['solver']} | {r['time_ms']:.2f} | {r['nfe']} | "
              f"{r['max_error']:.2e} | {r['f_time_us']:.1f} | {r['overhead_ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
