"""Adjoint benchmarks (issue 3), one thread.

  memory   peak resident memory of one training step (forward + backward) of a tanh MLP
           dynamics (batch 256, state 32, width 64), rk4 at step 0.01 over [0, T], T = 1, 4, 16,
           each in a fresh process; peak = VmHWM after a warm-up step, malloc_trim(0) and a
           reset through /proc/self/clear_refs, minus the resident memory just before the
           measured step.
  nfe      forward vs backward NFE of dopri5 at tolerances 1e-3..1e-7, with and without the
           seminorm (same MLP with its weights scaled by 6 so that the dynamics are strongly
           nonlinear, batch 256, t in [0, 2]; at the default initialisation every tolerance
           takes the same 20 evaluations and there is nothing to compare).
  overhead time of a training step with the adjoint / (forward NFE x t_f + backward NFE x
           t_vjp), on the MLP (batch 512, dopri5 1e-5) and the ODE-Net conv block (dopri5 1e-3).

Every section also runs torchdiffeq's odeint_adjoint when it is installed (interleaved).

    python benchmarks/adjoint.py [memory|nfe|overhead|all] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import Counting, interleaved, torchdiffeq_or_none
from solver_overhead import ConvBlock, MLPDynamics

import neuralode


def _adjoint_fn(lib):
    if lib == "neuralode":
        return neuralode.odeint_adjoint, neuralode.odeint
    import torchdiffeq

    return torchdiffeq.odeint_adjoint, torchdiffeq.odeint


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(lib: str, mode: str, T: float) -> dict:
    """Runs in a fresh process: one warm-up step, reset the peak, one measured step."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    adjoint, plain = _adjoint_fn(lib)
    solver = adjoint if mode == "adjoint" else plain
    f = MLPDynamics(32, 64)
    y0 = torch.randn(256, 32)
    t = torch.tensor([0.0, T])

    def step():
        for p in f.parameters():
            p.grad = None
        ys = solver(f, y0, t, method="rk4", options={"step_size": 0.01})
        ys[-1].pow(2).mean().backward()

    step()
    # glibc keeps freed heap pages resident; hand them back so the measured step has to
    # fault in everything it needs, then reset the high-water mark to the current RSS
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    return {"lib": lib, "mode": mode, "T": T, "peak_above_base_mib": (peak - base) / 1024,
            "base_mib": base / 1024}


def bench_memory(libs):
    rows = []
    for lib in libs:
        for mode in ("adjoint", "backprop"):
            for T in (1.0, 4.0, 16.0):
                out = subprocess.run(
                    [sys.executable, __file__, "_memory_child", lib, mode, str(T)],
                    capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\n### Peak memory of one training step (MiB above the resident baseline)\n")
    print("| library | gradient | T=1 | T=4 | T=16 | T=16 / T=1 |")
    print("|---|---|---|---|---|---|")
    for lib in libs:
        for mode in ("adjoint", "backprop"):
            v = [r["peak_above_base_mib"] for r in rows if r["lib"] == lib and r["mode"] == mode]
            print(f"| {lib} | {mode} | {v[0]:.1f} | {v[1]:.1f} | {v[2]:.1f} | "
                  f"{v[2] / max(v[0], 1e-9):.2f} |")
    return rows


def _count_nfe(adjoint, f, y0, t, tol, seminorm=False):
    """(forward, backward) evaluations of f in one training step with ``adjoint``."""
    cf = Counting(f)
    kw = {"adjoint_options": {"norm": "seminorm"}} if seminorm else {}
    ys = adjoint(cf, y0, t, rtol=tol, atol=tol, method="dopri5", **kw)
    fwd = cf.n
    ys[-1].pow(2).mean().backward()
    return fwd, cf.n - fwd


def bench_nfe(libs):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    f = MLPDynamics(32, 64)
    with torch.no_grad():
        for p in f.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    y0 = torch.randn(256, 32)
    t = torch.tensor([0.0, 2.0])
    rows = []
    for tol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        for lib in libs:
            for semi in (False, True):
                fwd, bwd = _count_nfe(_adjoint_fn(lib)[0], f, y0, t, tol, semi)
                rows.append({"tol": tol, "lib": lib, "seminorm": semi, "forward_nfe": fwd,
                             "backward_nfe": bwd})
    print("\n### Forward vs backward NFE, dopri5, nonlinear MLP batch 256, t in [0, 2] "
          "(backward counts evaluations of f inside the adjoint's vector-Jacobian products)\n")
    print("| tol | library | seminorm | forward NFE | backward NFE | backward / forward |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tol']:.0e} | {r['lib']} | {'yes' if r['seminorm'] else 'no'} | "
              f"{r['forward_nfe']} | {r['backward_nfe']} | "
              f"{r['backward_nfe'] / r['forward_nfe']:.2f} |")
    return rows


def _overhead_one(name, f, y0, tol, libs, repeats):
    t = torch.tensor([0.0, 1.0])
    params = list(f.parameters())
    v = torch.randn_like(y0)

    def make(lib):
        adjoint, _ = _adjoint_fn(lib)

        def run():
            for p in params:
                p.grad = None
            ys = adjoint(f, y0, t, rtol=tol, atol=tol, method="dopri5")
            ys[-1].pow(2).mean().backward()
        return run

    def f_fwd():
        with torch.no_grad():
            f(t[0], y0)

    def f_vjp():
        with torch.enable_grad():
            y = y0.detach().requires_grad_()
            out = f(t[0], y)
            torch.autograd.grad(out, (y, *params), v)

    fns = {lib: make(lib) for lib in libs}
    fns["f"] = f_fwd
    fns["vjp"] = f_vjp
    for fn in fns.values():
        fn()
    times = interleaved(fns, repeats)
    rows = []
    for lib in libs:
        fwd, bwd = _count_nfe(_adjoint_fn(lib)[0], f, y0, t, tol)
        ideal = fwd * times["f"] + bwd * times["vjp"]
        rows.append({"problem": name, "lib": lib, "time_ms": 1e3 * times[lib],
                     "forward_nfe": fwd, "backward_nfe": bwd, "f_ms": 1e3 * times["f"],
                     "vjp_ms": 1e3 * times["vjp"], "overhead_ratio": times[lib] / ideal})
    return rows


def bench_overhead(libs, repeats):
    torch.set_num_threads(1)
    rows = []
    torch.manual_seed(0)
    problems = [
        ("MLP 512x32 w64, dopri5 1e-5", MLPDynamics(32, 64), torch.randn(512, 32), 1e-5),
        ("ODE-Net conv block 128x64x7x7, dopri5 1e-3", ConvBlock(64),
         torch.randn(128, 64, 7, 7), 1e-3),
    ]
    for name, f, y0, tol in problems:
        rows.extend(_overhead_one(name, f, y0, tol, libs, repeats))
    print("\n### Training step with the adjoint: overhead ratio\n")
    print("| problem | library | step time (ms) | fwd NFE | bwd NFE | f (ms) | f vjp (ms) | "
          "overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['problem']} | {r['lib']} | {r['time_ms']:.1f} | {r['forward_nfe']} | "
              f"{r['backward_nfe']} | {r['f_ms']:.3f} | {r['vjp_ms']:.3f} | "
              f"{r['overhead_ratio']:.2f} |")
    return rows


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_memory_child":
        print(json.dumps(memory_child(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="all", choices=["memory", "nfe", "overhead", "all"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    libs = ["neuralode"] + (["torchdiffeq"] if torchdiffeq_or_none() else [])
    print(f"torch {torch.__version__}, 1 thread, libraries: {libs}")
    out = {}
    if args.what in ("memory", "all"):
        out["memory"] = bench_memory(libs)
    if args.what in ("nfe", "all"):
        out["nfe"] = bench_nfe(libs)
    if args.what in ("overhead", "all"):
        out["overhead"] = bench_overhead(libs, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
