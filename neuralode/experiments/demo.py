"""``neuralode demo``: solve three well-known ODEs with several methods, then recover the
spiral dynamics dz/dt = A z from a noisy trajectory with a Neural ODE (about a minute on a
laptop CPU) and write a plot.

Part 1 (a few seconds): a solver table — for a Kepler orbit (eccentricity 0.5, one period;
exact: the start state), Lotka–Volterra (reference: dopri8 at rtol=atol=1e-13) and the
linear spiral (exact: the matrix exponential), each method's function evaluations (NFE),
accepted/rejected steps, max-abs error and wall time.

Part 2: ``neuralode train dynamics --field spiral --model mlp`` with the demo's budget, trained
with ``odeint_adjoint``; prints the fit (trajectory error before and after training, against
the noise level; error of the learned vector field) and writes ``OUT/dynamics.png``.

Like the training commands, the demo never replaces an earlier run in ``--out`` unless told
to: ``--overwrite`` starts again, ``--resume`` continues its training part. (``make demo``
passes ``--overwrite``, so that it can be run again and again.)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from neuralode import odeint
from neuralode.experiments import dynamics
from neuralode.experiments.runner import (
    RUN_FILES,
    Run,
    add_gradient_argument,
    nonnegative_int,
    positive_int,
    threads,
)

TABLE_METHODS = (
    ("dopri5", None),
    ("tsit5", None),
    ("bosh3", None),
    ("dopri8", None),
    ("rk4", {"step_size": 0.02}),
    ("euler", {"step_size": 0.01}),
)
TABLE_RTOL, TABLE_ATOL = 1e-6, 1e-8
# what a demo leaves in --out: the training run's files, the table and the plot
DEMO_FILES = (*RUN_FILES, "solver_table.txt", "dynamics.png")


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Solve three well-known ODEs with several methods and print a table of their cost and "
        "accuracy, then recover the spiral dynamics dz/dt = A z from a noisy trajectory with a "
        "Neural ODE (about a minute on a laptop CPU), print the fit and write a plot.")
    parser.add_argument("--out", default="runs/demo",
                        help="output folder (default runs/demo); an earlier demo there is "
                             "replaced only with --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the demo already in --out")
    parser.add_argument("--resume", action="store_true",
                        help="continue the training part of the demo in --out from its "
                             "checkpoint (a larger --iters extends a finished one)")
    parser.add_argument("--iters", type=positive_int, default=800,
                        help="training iterations of the spiral recovery (default 800)")
    parser.add_argument("--model", choices=("mlp", "linear"), default="mlp",
                        help="learned field (default mlp)")
    add_gradient_argument(parser, "adjoint")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="random seed of the data noise and the model (default 0)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, cuda:N or mps for the training part (default cpu)")
    parser.add_argument("--threads", type=threads, default=1,
                        help="torch CPU threads, 1 to the CPUs available (default 1)")
    parser.add_argument("--skip-table", action="store_true", help="skip the solver table")
    parser.add_argument("--no-plot", dest="no_plot", action="store_true",
                        help="do not write the plot")
    parser.add_argument("--no-plots", dest="no_plot", action="store_true",
                        help=argparse.SUPPRESS)  # the old spelling, kept working
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------
# part 1: solver table
# ----------------------------------------------------------------------------


def _kepler():
    e = 0.5  # semi-major axis 1, mu = 1: period 2 pi; start at periapsis
    y0 = torch.tensor([1 - e, 0.0, 0.0, math.sqrt((1 + e) / (1 - e))], dtype=torch.float64)

    def f(t, y):
        r3 = (y[0] ** 2 + y[1] ** 2) ** 1.5
        return torch.stack([y[2], y[3], -y[0] / r3, -y[1] / r3])

    t = torch.tensor([0.0, 2 * math.pi], dtype=torch.float64)
    return "Kepler orbit e=0.5, 1 period", f, y0, t, y0.clone(), "exact"


def _lotka_volterra():
    a, b, c, d = 1.5, 1.0, 3.0, 1.0

    def f(t, y):
        return torch.stack([a * y[0] - b * y[0] * y[1], d * y[0] * y[1] - c * y[1]])

    y0 = torch.tensor([10.0, 5.0], dtype=torch.float64)
    t = torch.tensor([0.0, 10.0], dtype=torch.float64)
    ref = odeint(f, y0, t, rtol=1e-13, atol=1e-13, method="dopri8")[-1]
    return "Lotka-Volterra t in [0, 10]", f, y0, t, ref, "dopri8 1e-13"


def _spiral():
    A = dynamics.make_true_field("spiral").A.clone().double()

    def f(t, y):
        return A @ y

    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 25.0], dtype=torch.float64)
    return "spiral dz/dt = A z t in [0, 25]", f, y0, t, torch.linalg.matrix_exp(A * 25.0) @ y0, \
        "exact (expm)"


def solver_table() -> list[dict]:
    """Solve each test problem with each method; returns one row per solve."""
    rows = []
    for make in (_kepler, _lotka_volterra, _spiral):
        name, f, y0, t, ref, ref_name = make()
        for method, options in TABLE_METHODS:
            t0 = time.perf_counter()
            ys, stats = odeint(f, y0, t, rtol=TABLE_RTOL, atol=TABLE_ATOL, method=method,
                               options=options, return_stats=True)
            wall = time.perf_counter() - t0
            label = method + (f" h={options['step_size']}" if options else "")
            rows.append({"problem": name, "reference": ref_name, "method": label,
                         "nfe": stats.nfe, "accepted": stats.n_accepted,
                         "rejected": stats.n_rejected,
                         "error": float((ys[-1] - ref).abs().max()), "time_ms": 1e3 * wall})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [(f"Solver table (float64; adaptive methods at rtol={TABLE_RTOL:g}, "
             f"atol={TABLE_ATOL:g}; error = max |y(T) - reference|)")]
    head = f"  {'method':<14} {'NFE':>7} {'steps acc/rej':>14} {'error':>10} {'time ms':>9}"
    problem = None
    for r in rows:
        if r["problem"] != problem:
            problem = r["problem"]
            lines += ["", f"{problem}  (reference: {r['reference']})", head]
        steps = f"{r['accepted']}/{r['rejected']}"
        lines.append(f"  {r['method']:<14} {r['nfe']:>7d} {steps:>14} {r['error']:>10.2e} "
                     f"{r['time_ms']:>9.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# part 2: spiral recovery
# ----------------------------------------------------------------------------


def _training_args(args: argparse.Namespace) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    dynamics.build_parser(p)
    argv = ["--field", "spiral", "--model", args.model, "--iters", str(args.iters),
            "--gradient", args.gradient, "--seed", str(args.seed), "--device", args.device,
            "--out", args.out, "--threads", str(args.threads),
            "--eval-every", str(max(1, args.iters // 4)),
            "--ckpt-every", str(max(1, args.iters // 4))]
    for flag in ("resume", "overwrite", "no_plot", "quiet"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    targs = p.parse_args(argv)
    targs.command_name = "dynamics"
    # an interrupted demo is resumed by the demo command, as it was run
    targs.command_words = ["demo"]
    targs.argv = getattr(args, "argv", [])
    targs.invocation = getattr(args, "invocation", "neuralode")
    return targs


def check_out(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--out`` for this demo (``None``: nothing), before any work: an
    earlier demo is never replaced without ``--overwrite``."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a directory; choose a directory"
    if args.resume and args.overwrite:
        return ("--resume continues the demo in --out and --overwrite replaces it; pass one of "
                "them")
    if args.resume and not (out / RUN_FILES[0]).is_file():
        return f"--resume: no checkpoint at {out / RUN_FILES[0]}; start without --resume"
    held = [n for n in DEMO_FILES if (out / n).exists()]
    if held and not (args.resume or args.overwrite):
        return (f"{out} already holds a demo ({', '.join(held)}); pass --overwrite to replace "
                f"it, --resume to continue its training, or choose another --out")
    return None


def run(args: argparse.Namespace) -> int:
    problem = check_out(args)
    if problem:
        print(f"{getattr(args, 'invocation', 'neuralode')} demo: error: {problem}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:  # the training run removes its own files
        for name in DEMO_FILES[len(RUN_FILES):]:
            (out / name).unlink(missing_ok=True)
    t_all = time.perf_counter()
    if not args.skip_table:
        text = format_table(solver_table())
        print(text)
        (out / "solver_table.txt").write_text(text + "\n")
        print()

    targs = _training_args(args)
    print(f"Learning the spiral dz/dt = A z, A = [[-0.1, -1], [1, -0.1]], from "
          f"{targs.n_points} noisy observations (noise std {targs.noise_std:g}) with a Neural ODE "
          f"({args.model} field, {args.iters} iterations, gradients by {args.gradient}) ...",
          flush=True)
    training = Run(dynamics.DynamicsExperiment(), targs)
    rc = training.main()
    if training.final is None:  # stopped, interrupted or failed: the runner said why
        return rc
    m = training.final  # the runner has printed the summary of the fit
    before, after = m.get("initial_traj_mse"), m["traj_mse"]
    noise2 = 2 * m["noise_var"]
    if before is not None and math.isfinite(before):
        print(f"  training cut the trajectory error {before / after:,.0f}x "
              f"(MSE {before:.3g} -> {after:.3g}); the fit to the noisy data is "
              f"{m['traj_mse_obs']:.3g} against a noise floor of {noise2:.3g}")
    # Success: the field is recovered where the data constrain it, and the 25-time-unit
    # roll-out from z(0) is 100x closer to the truth than the untrained model's.
    ok = (before is not None and m["field_rel_err_near"] < 0.10
          and after < 0.01 * before)
    if ok:
        detail = ("its roll-out is closer to the truth than the noisy data are"
                  if after < noise2 else "its roll-out tracks the truth (MSE "
                  f"{after:.2g}; noise floor {noise2:.2g})")
        print(f"Result: OK - the learned vector field is within "
              f"{m['field_rel_err_near']:.1%} of the true one along the data and {detail}.")
    else:
        print("Result: NOT CONVERGED - the learned ODE does not match the data yet; "
              "try more --iters.")
    if not args.no_plot:
        print(f"Plot: {out / 'dynamics.png'} (three panels: the phase plane with the data, the "
              f"true and the learned trajectory; the time series; the true and the learned "
              f"vector field)")
    print(f"Total demo time {time.perf_counter() - t_all:.1f}s")
    return 0
