"""Benchmarks for the integration-loop rewrite: neuralode vs its baseline, torchdiffeq, torchode
and torchdyn, in one interleaved run (the libraries alternate every repetition; medians; one
thread).

Overhead ratio = time / (NFE x cost of one f); 1.0 is the limit; f is timed in batches of
NFE evaluations inside the same interleaved rounds. For forward + backward the
cost of one f is f plus its backward; for the adjoint it is forward NFE x f + backward NFE x
(f plus its backward).

  (a) 2-D spiral, 200 outputs, dopri5 1e-6, float64           (solver_overhead.py problem a)
  (a8) the spiral of (a) with dopri8 1e-8 (its stage sums are formed as the per-sample
      step forms them, see ``solvers/rk.py``)
  (b) MLP 512x32 width 64, dopri5 1e-5, float32: forward, forward + backward (backprop),
      adjoint                                                  (solver_overhead.py problem b)
  (c) ODE-Net conv block 128x64x7x7, dopri5 1e-3, float32, forward (problem c)
  (d) every fixed-grid method on the MLP of (b) (step 0.05 on [0, 1], no autograd) against a
      hand-written loop doing the same arithmetic; ratio = time / hand-written loop's time;
      the Adams methods at max_order 4 (AB4 and the AM4 corrector, as the hand loop)
  (e) events: the bouncing ball (gravity, event when the height reaches the radius,
      restitution 0.8), time and NFE per bounce, neuralode vs torchdiffeq; skipped for a
      neuralode without ``odeint_event``

Each timed call follows an untimed call of the same function (``--cold``: not, as in the
runs before; then the function timed just after torchdiffeq is slowed, by 20-30% on (a);
see ``_util.interleaved``).

"neuralode" is whatever ``import neuralode`` finds (choose it with PYTHONPATH); "base" is the
baseline tree's ``neuralode`` package copied into a temporary directory as ``neuralode_base``
(``--baseline-rev``, default 267b1ec, read with ``git archive`` from this repository, or
``--baseline ROOT``, a directory holding a ``neuralode`` package). torchdiffeq, torchode and
torchdyn columns appear when they import.

Notes on semantics: torchode takes a batch of independent problems; here the whole state is
one problem (flattened to shape (1, n)), so its error norm and steps match the others'.
torchdyn (no interpolator) shortens steps to land on every output time, so on (a) it takes more
steps. Module construction for torchode (term, step method, controller) is timed with the
solve, like torchdiffeq's per-call solver set-up.

    python benchmarks/loop.py [--quick] [--only a,a8,b,c,d,e] [--repeats 7] [--libs ...]
        [--baseline-rev REV | --baseline ROOT | --no-baseline] [--cold] [--rotate]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import (  # noqa: E402 (from HERE, put on the path above)
    Counting,
    add_baseline_args,
    baseline_label,
    interleaved,
    load_libs,
    loadavg,
)
from solver_overhead import problem_a, problem_b, problem_c  # noqa: E402

import neuralode  # noqa: E402

DEFAULT_BASELINE_REV = "267b1ec"
ROTATE = False  # (--rotate)
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "rk4_classic", "explicit_adams",
                 "implicit_adams")


class Flat(nn.Module):
    """f on a state flattened to (1, n): torchode's batch of one problem; keeps f's params."""

    def __init__(self, f, shape):
        super().__init__()
        self.f = f
        self.shape = shape

    def forward(self, t, y):
        return self.f(t, y.view(self.shape)).reshape(y.shape)  # (n,) under vmap


# --------------------------------------------------------------------------- adaptive solvers

def _tdq_style(odeint, method, f, y0, t, tol):
    return odeint(f, y0, t, rtol=tol, atol=tol, method=method)


def make_solvers(libs: dict, mode: str, method: str = "dopri5"):
    """name -> solve(f, y0, t, tol) returning the outputs at every t (first dim len(t)).
    mode: 'fwd' / 'bwd' (autograd through the solver) / 'adj' (adjoint). torchode and
    torchdyn only for dopri5."""
    out = {}
    for name in ("neuralode", "base"):
        lib = libs.get(name)
        if lib is None:
            continue
        out[name] = partial(_tdq_style, lib.odeint_adjoint if mode == "adj" else lib.odeint,
                            method)
    tdq = libs.get("torchdiffeq")
    if tdq is not None:
        out["torchdiffeq"] = partial(_tdq_style,
                                     tdq.odeint_adjoint if mode == "adj" else tdq.odeint, method)
    if method != "dopri5":
        return out
    to = libs.get("torchode")
    if to is not None:
        def torchode_solve(f, y0, t, tol):
            shape = y0.shape
            term = to.ODETerm(Flat(f, shape))
            step = to.Dopri5(term=term)
            ctrl = to.IntegralController(atol=tol, rtol=tol, term=term)
            if mode == "adj":
                solver = to.BacksolveAdjoint(term, step, ctrl)
            else:
                solver = to.AutoDiffAdjoint(step, ctrl)
            prob = to.InitialValueProblem(y0=y0.reshape(1, -1),
                                          t_eval=t.to(y0.dtype).reshape(1, -1))
            sol = solver.solve(prob)
            return sol.ys[0].view(len(t), *shape)
        out["torchode"] = torchode_solve
    dyn = libs.get("torchdyn")
    if dyn is not None:
        if mode == "adj":
            # what torchdyn.core.NeuralODE(sensitivity="adjoint") runs (torchdyn.core itself
            # imports pytorch_lightning)
            from torchdyn.numerics.sensitivity import _gather_odefunc_adjoint

            def torchdyn_solve(f, y0, t, tol):
                params = torch.cat([q.contiguous().flatten() for q in f.parameters()])
                fn = _gather_odefunc_adjoint(f, params, "dopri5", tol, tol, None, "dopri5", tol,
                                             tol, None, "standard")
                return fn.apply(params, y0, t.to(y0.dtype))[1]
        else:
            from torchdyn.numerics import odeint as dyn_odeint

            def torchdyn_solve(f, y0, t, tol):
                return dyn_odeint(f, y0, t.to(y0.dtype), solver="dopri5", atol=tol, rtol=tol)[1]
        out["torchdyn"] = torchdyn_solve
    return out


def bench_adaptive(p, mode, libs, repeats, warm=True):
    f, y0, t, tol, exact = p["f"], p["y0"], p["t"], p["tol"], p["exact"]
    if mode == "adj":
        p = dict(p, name=p["name"].replace("fwd+bwd", "adjoint"))
    params = list(f.parameters()) if isinstance(f, nn.Module) else []
    solvers = make_solvers(libs, mode, p.get("method", "dopri5"))
    grad = mode != "fwd"
    y0g = y0.clone().requires_grad_(True) if mode == "adj" and not params else y0

    def run_one(solve, func):
        if grad:
            for q in params:
                q.grad = None
            ys = solve(func, y0g, t, tol)
            ys[-1].sum().backward()
            return ys.detach()
        with torch.no_grad():
            return solve(func, y0, t, tol)

    def f_eval():
        if grad:
            f(t[0], y0).sum().backward()
        else:
            with torch.no_grad():
                f(t[0], y0)

    # NFE / error (untimed), and drop libraries that fail on this problem
    rows, fns = [], {}
    for name, solve in list(solvers.items()):
        cf = Counting(f)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if grad:
                    for q in params:
                        q.grad = None
                    ys = solve(cf, y0g, t, tol)
                    nfe_f = cf.n
                    ys[-1].sum().backward()
                    nfe_b = cf.n - nfe_f
                else:
                    with torch.no_grad():
                        ys = solve(cf, y0, t, tol)
                    nfe_f, nfe_b = cf.n, 0
        except Exception as exc:
            rows.append({"problem": p["name"], "mode": mode, "solver": name,
                         "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"})
            continue
        err = (ys.detach() - exact).abs().max().item()
        rows.append({"problem": p["name"], "mode": mode, "solver": name, "nfe": nfe_f,
                     "nfe_bwd": nfe_b, "max_error": err})
        fns[name] = partial(run_one, solve, f)
    # f is timed in batches as long as one solve (NFE evaluations), so that machine noise
    # (preemption on a shared machine) hits the numerator and the denominator alike
    nfes = [r["nfe"] for r in rows if "nfe" in r]
    inner = max(5, max(nfes, default=5))
    fns["f"] = lambda: [f_eval() for _ in range(inner)]
    fb = None
    if mode == "adj":  # f plus its backward, for the backward NFE

        def f_and_backward():
            f(t[0], y0).sum().backward()
        fns["fb"] = lambda: [f_and_backward() for _ in range(inner)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in fns.values():
            fn()
        times = interleaved(fns, repeats, warm=warm, rotate=ROTATE)
    t_f = times.pop("f") / inner
    if mode == "adj":
        fb = times.pop("fb") / inner
    for r in rows:
        if "error" in r:
            continue
        r["time_ms"] = 1e3 * times[r["solver"]]
        r["f_us"] = 1e6 * t_f
        denom = r["nfe"] * t_f + (r["nfe_bwd"] * fb if mode == "adj" else 0.0)
        r["overhead"] = times[r["solver"]] / denom
    return rows


def problem_a8():
    return dict(problem_a(), name="(a8) spiral, 200 outputs, dopri8 1e-8, float64",
                method="dopri8", tol=1e-8)


# ------------------------------------------------------------------ fixed grid vs hand loop

_TABLEAUS = {  # (c, A rows, b): explicit Runge-Kutta, written out by hand
    "euler": ([0.0], [[]], [1.0]),
    "midpoint": ([0.0, 0.5], [[], [0.5]], [0.0, 1.0]),
    "heun2": ([0.0, 1.0], [[], [1.0]], [0.5, 0.5]),
    "heun3": ([0.0, 1 / 3, 2 / 3], [[], [1 / 3], [0.0, 2 / 3]], [0.25, 0.0, 0.75]),
    "rk4": ([0.0, 1 / 3, 2 / 3, 1.0], [[], [1 / 3], [-1 / 3, 1.0], [1.0, -1.0, 1.0]],
            [1 / 8, 3 / 8, 3 / 8, 1 / 8]),
    "rk4_classic": ([0.0, 0.5, 0.5, 1.0], [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]],
                    [1 / 6, 1 / 3, 1 / 3, 1 / 6]),
}
_AB4 = (-9 / 24, 37 / 24, -59 / 24, 55 / 24)  # oldest first, as the solver sums them
_AM4 = (1 / 24, -5 / 24, 19 / 24, 9 / 24)  # f(t-2h), f(t-h), f(t), f(t+h)


def _rk_step(f, t, y, h, tab, k0=None):
    c, A, b = tab
    ks = []
    for i, ci in enumerate(c):
        if i == 0 and k0 is not None:
            ks.append(k0)
            continue
        yi = y
        for j, a in enumerate(A[i]):
            if a:
                yi = torch.add(yi, ks[j], alpha=h * a)
        ks.append(f(t + ci * h, yi))
    for j, bj in enumerate(b):
        if bj:
            y = torch.add(y, ks[j], alpha=h * bj)
    return y


def hand_loop(method, f, y0, t0, t1, h, rtol=1e-7, atol=1e-9):
    """The same arithmetic as the solvers, without any solver machinery."""
    n = round((t1 - t0) / h)
    y, t = y0, t0
    if method in _TABLEAUS:
        tab = _TABLEAUS[method]
        for _ in range(n):
            y = _rk_step(f, t, y, h, tab)
            t += h
        return y
    # Adams: three RK4 (3/8) start-up steps, then AB4 (+ AM4 corrector iterations)
    fs = [f(t, y)]
    for k in range(n):
        t1k = t + h
        if len(fs) < 4:
            y1 = _rk_step(f, t, y, h, _TABLEAUS["rk4"], k0=fs[-1])
        else:
            y1 = y
            for w, fk in zip(_AB4, fs[-4:]):
                y1 = torch.add(y1, fk, alpha=h * w)
            if method == "implicit_adams":
                n_el = y.numel() ** 0.5
                for _ in range(4):
                    fn = f(t1k, y1)
                    y2 = y
                    for w, fk in zip(_AM4, [*fs[-3:], fn]):
                        y2 = torch.add(y2, fk, alpha=h * w)
                    scale = torch.maximum(y2.abs(), y1.abs()) * rtol + atol
                    done = torch.linalg.vector_norm((y2 - y1) / scale).item() / n_el <= 1.0
                    y1 = y2
                    if done:
                        break
        t, y = t1k, y1
        if k < n - 1:
            fs.append(f(t, y))
            del fs[:-4]
    return y


def _fixed_solve(odeint, method, y0, t, h, func):
    # the Adams methods at order 4, the hand loop's (AB4, AM4 corrector) and the baseline's
    # only order; neuralode and torchdiffeq default to 12 for implicit_adams
    adams = {"max_order": 4} if method.endswith("_adams") else {}
    return odeint(func, y0, t, method=method, options={"step_size": h, **adams})[-1]


def _hand_solve(method, y0, h, func):
    return hand_loop(method, func, y0, 0.0, 1.0, h)


def bench_fixed(libs, repeats, methods=FIXED_METHODS, warm=True):
    torch.manual_seed(0)
    f = problem_b(False)["f"]
    y0 = torch.randn(512, 32)
    t = torch.tensor([0.0, 1.0])
    h = 0.05
    rows = []
    for method in methods:
        solvers = {}
        for name in ("neuralode", "base", "torchdiffeq"):
            lib = libs.get(name)
            if lib is None or (name == "torchdiffeq" and method == "rk4_classic"):
                continue
            solvers[name] = partial(_fixed_solve, lib.odeint, method, y0, t, h)
        solvers["hand"] = partial(_hand_solve, method, y0, h)
        fns, info = {}, {}
        with torch.no_grad():
            ref = None
            for name, solve in solvers.items():
                cf = Counting(f)
                y1 = solve(cf)
                if name == "hand":
                    ref = y1
                info[name] = (cf.n, y1)
                fns[name] = partial(solve, f)
            for fn in fns.values():
                fn()
            times = interleaved(fns, repeats, warm=warm, rotate=ROTATE)
        for name in solvers:
            nfe, y1 = info[name]
            rows.append({"method": method, "solver": name, "time_ms": 1e3 * times[name],
                         "nfe": nfe, "vs_hand": times[name] / times["hand"],
                         "diff_vs_hand": (y1 - ref).abs().max().item()})
    return rows


# --------------------------------------------------------------------------- events

class Ball(nn.Module):
    """Bouncing ball: height and velocity under gravity; the event is the height reaching the
    ball's radius; at each bounce the velocity flips and loses 20% (restitution 0.8)."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.tensor([9.8], dtype=torch.float64))
        self.radius = 0.2
        self.n = 0

    def forward(self, t, state):
        self.n += 1
        _, vel = state
        return vel, -self.g.expand_as(vel)

    def event_fn(self, t, state):
        return state[0] - self.radius


def bounce(odeint_event, ball, nbounces, **kw):
    state = (torch.tensor([10.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    t0 = torch.tensor(0.0, dtype=torch.float64)
    times = []
    for _ in range(nbounces):
        t0, sol = odeint_event(ball, state, t0, event_fn=ball.event_fn, rtol=1e-8, atol=1e-8,
                               method="dopri5", **kw)
        pos, vel = (s[-1] for s in sol)
        state = (pos + 1e-7, -vel * 0.8)
        times.append(float(t0))
    return times


def _bounce_with(odeint_event, nbounces, ball, **kw):
    return bounce(odeint_event, ball, nbounces, **kw)


def _fresh_ball(run):
    return run(Ball())


def bench_events(libs, repeats, nbounces=10, warm=True):
    cands = {}
    for name in ("neuralode", "base"):
        lib = libs.get(name)
        if lib is None:
            continue
        if not hasattr(lib, "odeint_event"):
            print(f"# (e) events: {name} has no odeint_event yet; skipped")
            continue
        cands[name] = partial(_bounce_with, lib.odeint_event, nbounces)
    tdq = libs.get("torchdiffeq")
    if tdq is not None:
        cands["torchdiffeq"] = partial(_bounce_with, tdq.odeint_event, nbounces,
                                       odeint_interface=tdq.odeint)
    if not any(k in cands for k in ("neuralode", "base")):
        print("# (e) events: no neuralode with odeint_event; torchdiffeq alone, for reference")
    # exact bounce times: fall from 10 - r, then flights of 2 v / g with v *= 0.8
    g, r = 9.8, 0.2
    v = math.sqrt(2 * g * (10 - r))
    exact = [math.sqrt(2 * (10 - r) / g)]
    for _ in range(nbounces - 1):
        v *= 0.8
        exact.append(exact[-1] + 2 * v / g)
    rows, fns = [], {}
    for name, run in cands.items():
        ball = Ball()
        try:
            with torch.no_grad():
                ts = run(ball)
        except Exception as exc:
            rows.append({"solver": name, "error": f"{type(exc).__name__}: {exc}"[:120]})
            continue
        err = max(abs(a - b) for a, b in zip(ts, exact))
        rows.append({"solver": name, "nfe_per_bounce": ball.n / nbounces,
                     "max_event_time_error": err})
        fns[name] = partial(_fresh_ball, run)
    if fns:
        with torch.no_grad():
            times = interleaved(fns, repeats, warm=warm, rotate=ROTATE)
        for r in rows:
            if r["solver"] in times:
                r["ms_per_bounce"] = 1e3 * times[r["solver"]] / nbounces
    return rows


# --------------------------------------------------------------------------- main

def fmt_adaptive(rows):
    out = ["| problem | mode | library | time (ms) | NFE fwd | NFE bwd | max error | f (us) | "
           + "overhead |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['problem']} | {r['mode']} | {r['solver']} | failed: {r['error']} "
                       "| | | | | |")
            continue
        out.append(f"| {r['problem']} | {r['mode']} | {r['solver']} | {r['time_ms']:.2f} | "
                   f"{r['nfe']} | {r['nfe_bwd'] or ''} | {r['max_error']:.2e} | "
                   f"{r['f_us']:.1f} | {r['overhead']:.2f} |")
    return "\n".join(out)


def fmt_fixed(rows):
    out = ["| method | library | time (ms) | NFE | time / hand loop | max diff vs hand |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['solver']} | {r['time_ms']:.2f} | {r['nfe']} | "
                   f"{r['vs_hand']:.2f} | {r['diff_vs_hand']:.1e} |")
    return "\n".join(out)


def fmt_events(rows):
    out = ["| library | ms / bounce | NFE / bounce | max event-time error |", "|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['solver']} | failed: {r['error']} | | |")
        else:
            out.append(f"| {r['solver']} | {r.get('ms_per_bounce', float('nan')):.2f} | "
                       f"{r['nfe_per_bounce']:.1f} | {r['max_event_time_error']:.1e} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="a,b,c,d,e", help="comma list of a, a8, b, c, d, e")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 repeats, (c) with 2")
    add_baseline_args(ap, DEFAULT_BASELINE_REV)
    ap.add_argument("--libs", default="torchdiffeq,torchode,torchdyn",
                    help="other libraries to compare (those that import)")
    ap.add_argument("--cold", action="store_true",
                    help="no untimed call of each function right before its timed one (the "
                         "protocol before; a function timed just after torchdiffeq is then "
                         "slowed, see _util.interleaved)")
    ap.add_argument("--json", type=Path, default=Path("loop_bench.json"))
    ap.add_argument("--rotate", action="store_true",
                    help="every other round in reverse order (see _util.interleaved)")
    args = ap.parse_args(argv)
    global ROTATE
    ROTATE = args.rotate
    torch.set_num_threads(1)
    reps = 3 if args.quick else args.repeats
    only = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="nd_loop_bench_"))
    try:
        libs = load_libs(args, tmp, {"neuralode": neuralode})
        header = (f"torch {torch.__version__}, 1 thread; neuralode from "
                  f"{Path(neuralode.__file__).parent.parent.name}/; base = "
                  f"{baseline_label(args)}; "
                  + ", ".join(f"{k} {getattr(v, '__version__', '?')}" for k, v in libs.items()
                              if k not in ("neuralode", "base"))
                  + f"; {reps} repeats{', cold' if args.cold else ', warm'}; {loadavg()}")
        print(header, flush=True)
        result = {"header": header, "adaptive": [], "fixed": [], "events": []}
        t_start = time.monotonic()
        jobs = []
        if "a" in only:
            jobs.append((problem_a, "fwd", reps))
        if "a8" in only:
            jobs.append((problem_a8, "fwd", reps))
        if "b" in only:
            jobs += [(partial(problem_b, mode != "fwd"), mode, reps)
                     for mode in ("fwd", "bwd", "adj")]
        if "c" in only:
            jobs.append((problem_c, "fwd", max(2, reps // 2)))
        for k, (make, mode, n) in enumerate(jobs):
            rows = bench_adaptive(make(), mode, libs, n, warm=not args.cold)
            result["adaptive"] += rows
            table = fmt_adaptive(rows)
            print(("\n" + table) if k == 0 else table.split("\n", 2)[2], flush=True)
        if "d" in only:
            result["fixed"] = bench_fixed(libs, reps, warm=not args.cold)
            print("\n(d) fixed grid, MLP 512x32 w64, step 0.05 on [0, 1], float32, no autograd\n")
            print(fmt_fixed(result["fixed"]), flush=True)
        if "e" in only:
            result["events"] = bench_events(libs, reps, warm=not args.cold)
            print("\n(e) bouncing ball, 10 bounces, dopri5 1e-8, float64\n")
            print(fmt_events(result["events"]))
        result["seconds"] = round(time.monotonic() - t_start, 1)
        result["loadavg_end"] = loadavg()
        print(f"\n{result['seconds']} s ({loadavg()})")
        args.json.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
