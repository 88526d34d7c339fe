"""Stiff solvers (issue 10): neuralode's stiff methods side by side with scipy's Radau, BDF and
LSODA in one interleaved run (medians; one thread), on the standard stiff problems of
``neuralode.problems``; a batch of Robertson systems with different rate constants solved
as one batched state against a Python loop over scipy; and ``adams`` against ``dopri5`` on
non-stiff problems.

(1) Robertson (t in [0, 1e5]), Van der Pol mu = 1000 ([0, 3000]), HIRES ([0, 321.8122]) and
    OREGO ([0, 360]) at rtol = 1e-4, 1e-6, 1e-8 with atol = ratio x rtol (ratio: Robertson
    1e-6, HIRES 1e-4, Van der Pol and OREGO 1; ``StiffProblem.tolerances``). Outputs at 11
    times (Robertson: 0 and 10^-5 ... 10^5; the others: uniform), float64. Every solver gets
    the analytic Jacobian (``--jacobian autograd``: neuralode's own by autograd instead).
    err = max over outputs and components of |y - ref| / (|ref| + atol / rtol): the relative
    error, with the problem's absolute scale as a floor; ref = scipy Radau at rtol 1e-11
    (``StiffProblem.reference``; agrees with the published test-set values to 1e-12).
    NFE, Jacobian evaluations, LU factorisations and steps as each solver counts them
    (scipy: ``nfev``, ``njev``, ``nlu``, len of its step list).
(2) B Robertson systems (default 1024) with rate constants k_i x 2^u, u ~ U(-1, 1) per system
    and constant, one batched (B, 3) state (``options={"jacobian": ...}`` block-diagonal:
    the analytic (B, 3, 3) blocks, or ``"block"`` with ``--jacobian autograd``) against a
    loop of B scipy solves (``--loop-sample N``: timed on N of them, scaled to B); same
    tolerances; error on a subset of systems against their references.
(3) ``adams`` against ``dopri5`` on Kepler (e = 0.5, t in [0, 20]) and Lotka-Volterra
    (t in [0, 20]) at rtol = atol = 1e-8, 1e-10; "dopri5 NFE at adams' error": dopri5 run at
    rtol 10^-5 ... 10^-13 and its NFE interpolated (log-log) at adams' error.

Methods that are not registered in ``neuralode.solvers.registry.SOLVERS`` are skipped with a
note. The tables go to stdout as Markdown.

    python benchmarks/stiff.py [METHOD ...] [--quick] [--repeats 3] [--problems ...]
        [--rtols 1e-4 1e-6 1e-8] [--batch 1024] [--loop-sample 0] [--skip batch,adams]
        [--jacobian analytic]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from neuralode import odeint
from neuralode.problems import PROBLEMS, Robertson, make_problem
from neuralode.solvers.registry import SOLVERS

DEFAULT_METHODS = ("kvaerno5", "kvaerno3", "rodas5p", "rodas4", "bdf")
SCIPY_METHODS = ("Radau", "BDF", "LSODA")
MAX_STEPS = 200_000
F64 = torch.float64


def output_times(problem) -> np.ndarray:
    if problem.name == "robertson":
        return np.concatenate([[0.0], np.logspace(-5, 5, 11)])
    return np.linspace(problem.t0, problem.t1, 11)


def scaled_error(y: np.ndarray, ref: np.ndarray, floor: float) -> float:
    return float(np.max(np.abs(y - ref) / (np.abs(ref) + floor)))


def _stat(stats, name):
    v = getattr(stats, name, None)
    if v is None:
        v = getattr(stats, "extra", {}).get(name)
    return v


def neuralode_run(problem, method, ts, rtol, atol, jacobian, y0=None):
    """A closure running one neuralode solve; returns (ys as numpy, stats dict)."""
    y0 = problem.initial_state() if y0 is None else y0
    t = torch.as_tensor(ts, dtype=F64)
    if jacobian == "analytic":
        opts = {"jacobian": problem.jacobian}
    elif problem.batch_size is not None or y0.dim() == 2:
        opts = {"jacobian": "block"}
    else:
        opts = {}
    opts["max_num_steps"] = MAX_STEPS

    def fn():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ys, stats = odeint(problem, y0, t, rtol=rtol, atol=atol, method=method,
                               options=dict(opts), return_stats=True)
        return ys.numpy(), {"nfe": stats.nfe, "jac": _stat(stats, "n_jac"),
                            "lu": _stat(stats, "n_lu"), "steps": stats.n_steps,
                            "newton": _stat(stats, "n_newton")}
    return fn


def scipy_run(problem, method, ts, rtol, atol, index=None, y0=None):
    fun, jac = problem.numpy_callables(index)
    y0 = problem.y0.numpy() if y0 is None else y0

    def fn():
        sol = solve_ivp(fun, (ts[0], ts[-1]), y0, method=method, t_eval=ts, rtol=rtol,
                        atol=atol, jac=jac)
        if sol.status != 0:
            raise RuntimeError(f"scipy {method}: {sol.message}")
        return sol.y.T, {"nfe": sol.nfev, "jac": sol.njev, "lu": sol.nlu,
                         "steps": None, "newton": None}
    return fn


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _fmt(v, spec=".3g"):
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def compare(problem, methods, rtols, repeats, jacobian) -> list[str]:
    ts = output_times(problem)
    ref = problem.reference(ts, rtol=1e-11).numpy()
    lines = [(f"\n### {problem.name} (n = {problem.n}, t in [{problem.t0:g}, {problem.t1:g}], "
             f"atol = {problem.atol_ratio:g} x rtol)\n"),
             "| rtol | solver | err | NFE | Jacobians | LUs | steps | ms (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for rtol in rtols:
        _, atol = problem.tolerances(rtol)
        floor = atol / rtol
        fns = {m: neuralode_run(problem, m, ts, rtol, atol, jacobian) for m in methods}
        fns.update({f"scipy {m}": scipy_run(problem, m, ts, rtol, atol) for m in SCIPY_METHODS})
        results, samples, failed = {}, {}, {}
        for name, fn in fns.items():
            try:
                (ys, st), dt = timed(fn)
            except Exception as e:
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                continue
            results[name] = (scaled_error(ys, ref, floor), st)
            samples[name] = [dt]
        for _ in range(repeats - 1):  # interleaved: every solver once per round
            for name in results:
                samples[name].append(timed(fns[name])[1])
        for name in fns:
            if name in failed:
                lines.append(f"| {rtol:g} | {name} | failed: {failed[name]} | | | | | |")
                continue
            err, st = results[name]
            ms = 1e3 * statistics.median(samples[name])
            lines.append(f"| {rtol:g} | {name} | {err:.2e} | {st['nfe']} | {_fmt(st['jac'])} | "
                         f"{_fmt(st['lu'])} | {_fmt(st['steps'])} | {ms:.1f} |")
        print("\n".join(lines[-len(fns):]), file=sys.stderr, flush=True)
    return lines


def batch_benchmark(methods, batch, rtol, jacobian, n_check, scipy_methods,
                    loop_sample=0) -> list[str]:
    g = torch.Generator().manual_seed(0)
    base = torch.tensor(Robertson.defaults, dtype=F64)
    ks = base * 2 ** (2 * torch.rand(batch, 3, generator=g, dtype=F64) - 1)
    problem = Robertson(*ks.unbind(-1))
    ts = output_times(problem)
    _, atol = problem.tolerances(rtol)
    floor = atol / rtol
    check = list(range(0, batch, max(1, batch // n_check)))[:n_check]
    ref = problem.reference(ts, rtol=1e-11).numpy() if batch <= n_check else None
    if ref is None:
        sub = Robertson(*ks[check].unbind(-1))
        ref = sub.reference(ts, rtol=1e-11).numpy()
    lines = [(f"\n### {batch} Robertson systems, different rate constants (rtol {rtol:g}, "
             f"atol {atol:g}); error over {len(check)} systems\n"),
             ("| solver | err | NFE | Jacobians | LUs | steps | seconds "
              "| speed-up vs the scipy loops |"),
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for m in methods:
        fn = neuralode_run(problem, m, ts, rtol, atol, jacobian, y0=problem.initial_state())
        try:
            (ys, st), dt = timed(fn)
        except Exception as e:
            rows.append((f"{m} (one batched state)", None, (f"failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}")))
            continue
        err = scaled_error(ys[:, check], ref, floor)
        rows.append((f"{m} (one batched state)", dt, (err, st)))
    # the loop is timed over every system, or over ``loop_sample`` evenly spread ones and
    # scaled to the batch (the systems are solved independently, so the time adds up)
    timed_systems = (list(range(batch)) if not loop_sample or loop_sample >= batch
                     else sorted(set(range(0, batch, batch // loop_sample)) | set(check)))
    scale = batch / len(timed_systems)
    for sm in scipy_methods:
        t0 = time.perf_counter()
        outs, nfe, njev, nlu = {}, 0, 0, 0
        for i in timed_systems:
            ys, st = scipy_run(problem, sm, ts, rtol, atol, index=i)()
            nfe, njev, nlu = nfe + st["nfe"], njev + st["jac"], nlu + st["lu"]
            if i in check:
                outs[i] = ys
        dt = (time.perf_counter() - t0) * scale
        err = scaled_error(np.stack([outs[i] for i in check], 1), ref, floor)
        what = (f"loop of {batch}" if scale == 1 else
                f"loop of {batch} (timed on {len(timed_systems)}, x{scale:.3g})")
        rows.append((f"scipy {sm}, {what}", dt,
                     (err, {"nfe": round(nfe * scale), "jac": round(njev * scale),
                            "lu": round(nlu * scale), "steps": None})))
    loops = {r[0].split(",")[0]: r[1] for r in rows if r[0].startswith("scipy")}
    for name, dt, res in rows:
        if dt is None:
            lines.append(f"| {name} | {res} | | | | | | |")
            continue
        err, st = res
        speed = ("" if name.startswith("scipy") else
                 ", ".join(f"{k.split()[1]} {v / dt:.1f}x" for k, v in loops.items()))
        lines.append(f"| {name} | {err:.2e} | {st['nfe']} | {_fmt(st['jac'])} | "
                     f"{_fmt(st['lu'])} | {_fmt(st['steps'])} | {dt:.2f} | {speed} |")
    lines.append("\nSpeed-up: the loop's time over the batched solve's, for each scipy loop. "
                 "Scipy's NFE, Jacobians and LUs are summed over the loop.")
    return lines


# --------------------------------------------------------------------------- non-stiff

def kepler(t, u):
    x, y, vx, vy = u.unbind(-1)
    r3 = (x * x + y * y) ** 1.5
    return torch.stack([vx, vy, -x / r3, -y / r3], -1)


def kepler_np(t, u):
    x, y, vx, vy = u
    r3 = (x * x + y * y) ** 1.5
    return [vx, vy, -x / r3, -y / r3]


def lotka(t, u):
    x, y = u.unbind(-1)
    return torch.stack([1.5 * x - x * y, -3.0 * y + x * y], -1)


def lotka_np(t, u):
    return [1.5 * u[0] - u[0] * u[1], -3.0 * u[1] + u[0] * u[1]]


NONSTIFF = {
    "Kepler e=0.5": (kepler, kepler_np, [0.5, 0.0, 0.0, math.sqrt(3.0)], 20.0),
    "Lotka-Volterra": (lotka, lotka_np, [1.0, 1.0], 20.0),
}


def adams_benchmark(rtols) -> list[str]:
    lines = ["\n### adams vs dopri5, non-stiff problems (rtol = atol)\n",
             ("| problem | rtol | adams err | adams NFE | dopri5 err | dopri5 NFE | "
             "dopri5 NFE at adams' error |"), "|---|---|---|---|---|---|---|"]
    for name, (f, f_np, y0, t1) in NONSTIFF.items():
        ts = np.linspace(0.0, t1, 21)
        ref = solve_ivp(f_np, (0.0, t1), y0, method="DOP853", t_eval=ts, rtol=1e-13,
                        atol=1e-15).y.T
        y0_t = torch.tensor(y0, dtype=F64)
        t = torch.tensor(ts, dtype=F64)
        run = partial(_nonstiff_error, f, y0_t, t, ref)
        sweep = sorted(run("dopri5", 10.0 ** -k) for k in range(5, 14))  # (err, nfe)
        for tol in rtols:
            ea, na = run("adams", tol)
            ed, nd = run("dopri5", tol)
            lines.append(f"| {name} | {tol:g} | {ea:.2e} | {na} | {ed:.2e} | {nd} | "
                         f"{_fmt(_interp_nfe(sweep, ea), '.0f')} |")
    lines.append("\nReference: scipy DOP853 at rtol 1e-13, atol 1e-15; err = max abs error over "
                 "21 outputs. Last column: dopri5's NFE interpolated (log-log) at adams' error "
                 "from a sweep over rtol 1e-5 ... 1e-13.")
    return lines


def _nonstiff_error(f, y0, t, ref, method, tol):
    """(max abs error against ``ref``, NFE) of one solve."""
    with torch.no_grad():
        ys, st = odeint(f, y0, t, rtol=tol, atol=tol, method=method,
                        options={"max_num_steps": MAX_STEPS}, return_stats=True)
    return float(np.abs(ys.numpy() - ref).max()), st.nfe


def _interp_nfe(sweep, err):
    errs = np.log([max(e, 1e-300) for e, _ in sweep])
    nfes = np.log([n for _, n in sweep])
    if not errs[0] <= math.log(max(err, 1e-300)) <= errs[-1]:
        return None
    return float(np.exp(np.interp(math.log(err), errs, nfes)))


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("methods", nargs="*", help=f"neuralode methods (default: those of "
                                               f"{' '.join(DEFAULT_METHODS)} that exist)")
    ap.add_argument("--quick", action="store_true",
                    help="rtol 1e-4 and 1e-6 only, 1 repeat, a batch of 64, the adams part at "
                         "1e-8 only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--rtols", nargs="+", type=float, default=[1e-4, 1e-6, 1e-8])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batch-rtol", type=float, default=1e-6)
    ap.add_argument("--batch-scipy", nargs="+", default=list(SCIPY_METHODS),
                    choices=list(SCIPY_METHODS))
    ap.add_argument("--loop-sample", type=int, default=0,
                    help="time the scipy loop on this many of the batch's systems and scale "
                         "the time to the batch (default 0: all)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: "
                                               "problems,batch,adams")
    ap.add_argument("--jacobian", choices=("analytic", "autograd"), default="analytic",
                    help="neuralode's Jacobian: the problem's analytic one (as scipy gets) or "
                         "autograd")
    args = ap.parse_args(argv)
    if args.quick:
        args.rtols = [r for r in args.rtols if r >= 1e-6] or args.rtols[:1]
        args.repeats, args.batch = 1, min(args.batch, 64)
    torch.set_num_threads(1)
    skip = set(filter(None, args.skip.split(",")))
    asked = args.methods or list(DEFAULT_METHODS)
    methods = [m for m in asked if m in SOLVERS]
    for m in asked:
        if m not in SOLVERS:
            print(f"note: method {m!r} is not registered in neuralode; skipped", file=sys.stderr)
    out = [f"## Stiff problems (`python benchmarks/stiff.py {' '.join(sys.argv[1:])}`)\n",
           (f"neuralode methods: {', '.join(methods) or '(none registered)'}; Jacobian: "
           f"{args.jacobian} (scipy: analytic); torch threads: 1; repeats: {args.repeats} "
           f"(interleaved, median)")]
    if "problems" not in skip:
        for name in args.problems:
            out += compare(make_problem(name), methods, args.rtols, args.repeats, args.jacobian)
    if "batch" not in skip:
        out += batch_benchmark(methods, args.batch, args.batch_rtol, args.jacobian,
                               n_check=4 if args.quick else 16, scipy_methods=args.batch_scipy,
                               loop_sample=args.loop_sample)
    if "adams" not in skip:
        if "adams" in SOLVERS:
            out += adams_benchmark([1e-8] if args.quick else [1e-8, 1e-10])
        else:
            print("note: method 'adams' is not registered in neuralode; the adams part is "
                  "skipped", file=sys.stderr)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
