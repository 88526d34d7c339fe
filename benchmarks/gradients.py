"""Gradient strategies (issue 12): one training step of the MLP benchmark, differentiated by
backprop, the adjoint, checkpointing without a budget and with a budget of 16 checkpoints.

Problem (as ``benchmarks/adjoint.py``): tanh MLP dynamics (state 32, width 64, batch 256,
float32), loss mean(y(T)^2), over [0, T] for T = 1, 4, 16, with rk4 at step 0.01 and with
dopri5 at rtol = atol = 1e-5.

  memory  peak resident memory of one training step, each in a fresh process: one warm-up
          step, malloc_trim(0), VmHWM reset through /proc/self/clear_refs, then the measured
          step; peak = VmHWM minus the resident memory just before it (MiB).
  time    median CPU seconds (``time.process_time``: this process's own CPU time, which the
          other jobs on a shared machine disturb far less than wall time) and median wall
          seconds per training step (forward + backward), the strategies interleaved round
          by round in one process, one thread; also the forward/backward NFE, the
          recomputation factor, and the largest relative difference of the checkpointed
          gradients from backprop's.
  accuracy  relative error of dL/d(y0, params) against the ODE's true gradient (checkpoint
          through dopri8 at 1e-12) for every strategy with dopri5 at rtol = atol = 1e-3..1e-6,
          float64, on (a) a dissipative problem (stiffness ratio 8, T = 2.5: the plain
          adjoint's backward reconstruction of y grows like e^{8t}) and (b) the MLP dynamics
          of the other sections (batch 16, T = 4); plus the backward NFE.

    python benchmarks/gradients.py [memory|time|accuracy|all] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import Counting
from solver_overhead import MLPDynamics

import neuralode
from neuralode import Checkpoint

MODES = ("backprop", "adjoint", "checkpoint", "checkpoint:16")
SOLVES = {"rk4": {"method": "rk4", "options": {"step_size": 0.01}},
          "dopri5": {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}}
TIMES = (1.0, 4.0, 16.0)


def _gradient(mode):
    return Checkpoint(budget=16) if mode == "checkpoint:16" else mode


def _problem():
    torch.manual_seed(0)
    f = MLPDynamics(32, 64)
    y0 = torch.randn(256, 32)
    return f, y0


def _step(f, y0, T, solve, mode, stats_out=None):
    for p in f.parameters():
        p.grad = None
    ys, stats = neuralode.odeint(f, y0, torch.tensor([0.0, T]), gradient=_gradient(mode),
                                 return_stats=True, **SOLVES[solve])
    ys[-1].pow(2).mean().backward()
    if stats_out is not None:
        stats_out.append(stats)


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(solve: str, mode: str, T: float) -> dict:
    torch.set_num_threads(1)
    f, y0 = _problem()
    _step(f, y0, T, solve, mode)
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    _step(f, y0, T, solve, mode)
    peak = _status_kib("VmHWM")
    return {"solve": solve, "mode": mode, "T": T, "peak_above_base_mib": (peak - base) / 1024}


def bench_memory():
    rows = []
    for solve in SOLVES:
        for T in TIMES:
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "_memory_child", solve, mode,
                                      str(T)], capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\n### Peak memory of one training step (MiB above the resident baseline)\n")
    print("| solve | gradient | T=1 | T=4 | T=16 | T=16 / backprop's |")
    print("|---|---|---|---|---|---|")
    for solve in SOLVES:
        bp16 = next(r["peak_above_base_mib"] for r in rows
                    if r["solve"] == solve and r["mode"] == "backprop" and r["T"] == 16.0)
        for mode in MODES:
            v = [r["peak_above_base_mib"] for r in rows if r["solve"] == solve
                 and r["mode"] == mode]
            print(f"| {solve} | {mode} | {v[0]:.1f} | {v[1]:.1f} | {v[2]:.1f} | "
                  f"{v[2] / bp16:.3f} |")
    return rows


def _rel_diff(a, b) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


def bench_time(repeats: int):
    torch.set_num_threads(1)
    rows = []
    for solve in SOLVES:
        for T in TIMES:
            f, y0 = _problem()
            cf = Counting(f)
            info = {}
            grads = {}
            for mode in MODES:  # NFE, statistics and gradients of one step
                stats = []
                cf.n = 0
                _step(cf, y0, T, solve, mode, stats)
                fwd = stats[0].nfe
                info[mode] = {"nfe_forward": fwd, "nfe_backward": cf.n - fwd,
                              "steps": stats[0].n_accepted}
                ck = stats[0].extra.get("checkpoint")
                if ck is not None:
                    info[mode]["recompute_factor"] = ck.recompute_factor
                grads[mode] = [p.grad.clone() for p in f.parameters()]
            cpu = {m: [] for m in MODES}
            wall = {m: [] for m in MODES}
            for _ in range(repeats):  # interleaved rounds
                for m in MODES:
                    c0, w0 = time.process_time(), time.perf_counter()
                    _step(f, y0, T, solve, m)
                    cpu[m].append(time.process_time() - c0)
                    wall[m].append(time.perf_counter() - w0)
            times = {m: statistics.median(v) for m, v in cpu.items()}
            for mode in MODES:
                row = {"solve": solve, "T": T, "mode": mode, "time_s": times[mode],
                       "wall_s": statistics.median(wall[mode]),
                       "time_vs_backprop": times[mode] / times["backprop"], **info[mode]}
                if mode.startswith("checkpoint"):
                    row["grad_rel_diff_vs_backprop"] = _rel_diff(grads[mode], grads["backprop"])
                rows.append(row)
    print("\n### Time of one training step (median, 1 thread) and work\n")
    print("| solve | T | gradient | CPU time (s) | vs backprop | wall (s) | NFE fwd/bwd | "
          "recompute factor | grad rel. diff vs backprop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rf = f"{r['recompute_factor']:.2f}" if "recompute_factor" in r else ""
        gd = (f"{r['grad_rel_diff_vs_backprop']:.1e}" if "grad_rel_diff_vs_backprop" in r
              else "")
        print(f"| {r['solve']} | {r['T']:g} | {r['mode']} | {r['time_s']:.3f} | "
              f"{r['time_vs_backprop']:.2f} | {r['wall_s']:.3f} | "
              f"{r['nfe_forward']}/{r['nfe_backward']} | {rf} | {gd} |")
    return rows


class Dissipative(torch.nn.Module):
    """A fast-decaying mode coupled to a slow one (as tests/test_checkpoint.py)."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor([8.0, 1.0], dtype=torch.float64))
        self.w = torch.nn.Parameter(torch.tensor([1.0, 0.5], dtype=torch.float64))

    def forward(self, t, y):
        return -self.k * y + self.w * torch.sin(3 * t) + 0.5 * torch.tanh(y.flip(-1))


def bench_accuracy():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mlp = MLPDynamics(32, 64).double()
    problems = {
        "dissipative, T=2.5": (Dissipative(), torch.tensor([1.0, 2.0], dtype=torch.float64),
                               2.5),
        "MLP, T=4": (mlp, torch.randn(16, 32, dtype=torch.float64), 4.0),
    }
    modes = ("backprop", "checkpoint", "adjoint", "interpolated_adjoint")
    rows = []
    for name, (f, y0, T) in problems.items():
        t = torch.tensor([0.0, T], dtype=torch.float64)
        y0 = y0.requires_grad_(True)
        inputs = [y0, *f.parameters()]

        def grads(mode, tol, method="dopri5", f=f, y0=y0, t=t, inputs=inputs):
            cf = Counting(f)
            ys = neuralode.odeint(cf, y0, t, rtol=tol, atol=tol, method=method,
                                  gradient=mode)
            fwd = cf.n
            g = torch.autograd.grad(ys[-1].pow(2).sum(), inputs)
            return torch.cat([x.reshape(-1) for x in g]), fwd, cf.n - fwd

        ref, _, _ = grads("checkpoint", 1e-12, "dopri8")
        for tol in (1e-3, 1e-4, 1e-5, 1e-6):
            for mode in modes:
                try:
                    g, fwd, bwd = grads(mode, tol)
                    err = float((g - ref).norm() / ref.norm())
                except neuralode.NeuralODEError as e:  # e.g. the backward solve fails
                    err, fwd, bwd = float("nan"), 0, 0
                    print(f"# {name} {mode} {tol:g}: {type(e).__name__}: {str(e)[:100]}")
                rows.append({"problem": name, "tol": tol, "mode": mode, "rel_error": err,
                             "nfe_forward": fwd, "nfe_backward": bwd})
    print("\n### Gradient error against the ODE's gradient, dopri5, float64\n")
    print("| problem | tol | " + " | ".join(modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for name in problems:
        for tol in (1e-3, 1e-4, 1e-5, 1e-6):
            cells = []
            for mode in modes:
                r = next(r for r in rows if r["problem"] == name and r["tol"] == tol
                         and r["mode"] == mode)
                cells.append(f"{r['rel_error']:.1e} ({r['nfe_forward']}/{r['nfe_backward']})")
            print(f"| {name} | {tol:.0e} | " + " | ".join(cells) + " |")
    print("\n(cells: relative error of the gradient, (forward NFE / backward NFE))")
    return rows


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_memory_child":
        print(json.dumps(memory_child(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="all",
                    choices=["memory", "time", "accuracy", "all"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, 1 thread")
    out = {}
    if args.what in ("memory", "all"):
        out["memory"] = bench_memory()
    if args.what in ("time", "all"):
        out["time"] = bench_time(args.repeats)
    if args.what in ("accuracy", "all"):
        out["accuracy"] = bench_accuracy()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
