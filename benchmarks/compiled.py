"""Compiled solves (``options={"compile": True}``, issue 18) against eager neuralode,
torchdiffeq and torchode (eager and compiled), in one interleaved run (medians, one thread;
every compiled function is compiled before the timed rounds: compile times are printed
separately).

  (a) 2-D linear spiral, 200 outputs, dopri5 rtol = atol = 1e-6, float64 (loop.py's (a))
  (r) a 3-element state with an explicit method: Lorenz '63 on [0, 2], 100 outputs, dopri5
      1e-6, float64
  (b) MLP 512x32 width 64 (loop.py's (b)), dopri5 1e-5, float32: forward overhead ratio
      (time / (NFE x one f)); an adjoint training step (forward + backward)
  (o) the MLP of (b) with 20 and 100 output times, forward (outputs beyond one call's
      buffer: written a chunk per call)
  (v) 256 Van der Pol oscillators per sample (per_sample.py's (a)), dopri5 1e-6, float64
  (d) rk4 on the MLP of (b), step 0.05 on [0, 1]: compiled neuralode against a hand-written
      loop of the same arithmetic compiled by torch.compile
  (b) and (d) also time ``neuralode.CompiledSolver`` (the solver object: a kind's later
      solves rerun its compiled loop without the per-call look-ups of ``odeint``)
  (g) an adjoint training step of a small neural ODE (2 -> 32 -> 2, tanh), 20 and 2 outputs
      on [0, 5], dopri5 1e-6, float64: eager, the forward solve compiled, and the forward and
      backward solves compiled (``adjoint_options={"compile": True}``)
  (k) a checkpoint training step (gradient="checkpoint"): eager, and with its backward pass
      compiled (``options={"compile": True}``), beside backprop and the adjoint with both
      solves compiled: the small neural ODE of (g) (20 and 2 outputs), and the MLP of (b)

For each row: the steps (accepted/rejected) of eager and compiled neuralode and the largest
difference of their outputs, which must be rounding.

``--baseline-rev REV``: the compiled solves of another revision's package (copied as
``neuralode_base``, as ``loop.py`` does) timed beside them in (a), (r), (b)'s forward and (o).

    python benchmarks/compiled.py [--only a,r,b,o,v,d,g,k] [--repeats 11]
        [--libs torchdiffeq,torchode] [--baseline-rev REV] [--rotate]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import (  # noqa: E402 (from HERE, put on the path)
    interleaved,
    load_baseline,
    loadavg,
    optional,
)
from solver_overhead import MLPDynamics as MLP  # noqa: E402 (loop.py's (b) dynamics)

import neuralode  # noqa: E402
from neuralode.solvers import compiled as compiled_driver  # noqa: E402

C = {"compile": True}
ROTATE = False  # (--rotate)


class Flat(nn.Module):
    """f on a state flattened to (1, n) (torchode's batch of one problem)."""

    def __init__(self, f, shape):
        super().__init__()
        self.f, self.shape = f, shape

    def forward(self, t, y):
        return self.f(t, y.view(self.shape)).reshape(y.shape)


def first_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torchode_solvers(to, f, y0, t, tol, batch: bool):
    """torchode's solve, eager and (where torch.compile takes it) compiled."""
    term = to.ODETerm(f if batch else Flat(f, y0.shape))
    step = to.Dopri5(term=term)
    ctrl = to.IntegralController(atol=tol, rtol=tol, term=term)
    solver = to.AutoDiffAdjoint(step, ctrl)
    yb = y0 if batch else y0.reshape(1, -1)
    tb = t.to(y0.dtype).expand(yb.shape[0], -1)
    prob = to.InitialValueProblem(y0=yb, t_eval=tb)
    out = {"torchode eager": lambda: solver.solve(prob)}
    try:
        jit = torch.compile(solver)
        compile_s = first_call(lambda: jit.solve(prob))
        out["torchode compiled"] = lambda: jit.solve(prob)
        print(f"# torchode compiled: first call {compile_s:.1f} s")
    except Exception as exc:  # its compile may fail on this torch: say so, keep eager
        print(f"# torchode compiled failed: {type(exc).__name__}: {str(exc)[:200]}")
    return out


def compare(label, e, c) -> None:
    na = (e.stats.n_accepted, c.stats.n_accepted)
    nr = (e.stats.n_rejected, c.stats.n_rejected)
    ye, yc = (e.ys, c.ys)
    diff = float((ye - yc).abs().max())
    scale = float(ye.abs().max())
    same = torch.equal(torch.as_tensor(na[0]), torch.as_tensor(na[1])) and \
        torch.equal(torch.as_tensor(nr[0]), torch.as_tensor(nr[1]))
    print(f"{label}: steps equal {same} (accepted {_short(na[0])}, rejected {_short(nr[0])}); "
          f"max |eager - compiled| {diff:.1e} (max |y| {scale:.2g}); compile "
          f"{c.stats.compile_s:.1f} s" if c.stats.n_compiles else
          f"{label}: steps equal {same}; max |eager - compiled| {diff:.1e} (loop reused)")


def _short(v):
    v = torch.as_tensor(v)
    return int(v) if v.dim() == 0 else f"{int(v.sum())} over {v.numel()} samples"


def table(title, times: dict, base: str = "neuralode eager", nfe: dict | None = None) -> None:
    base = base if base in times else next(iter(times))
    print(f"\n{title} ({loadavg()})")
    print(f"| solver | median ms | {base} / this |" + (" NFE |" if nfe else ""))
    print("|---|---|---|" + ("---|" if nfe else ""))
    for k, v in times.items():
        extra = f" {nfe.get(k, '')} |" if nfe else ""
        print(f"| {k} | {v * 1e3:.3f} | {times[base] / v:.2f} |{extra}")


def case_small(name, f, y0, t, tol, repeats, libs):
    e = neuralode.solve(f, y0, t, rtol=tol, atol=tol)
    c = neuralode.solve(f, y0, t, rtol=tol, atol=tol, options=C)
    compare(name, e, c)
    fns = {"neuralode eager": lambda: neuralode.odeint(f, y0, t, rtol=tol, atol=tol),
           "neuralode compiled": lambda: neuralode.odeint(f, y0, t, rtol=tol, atol=tol,
                                                          options=C)}
    if libs.get("base") is not None:
        base = libs["base"]
        fns["base compiled"] = lambda: base.odeint(f, y0, t, rtol=tol, atol=tol, options=C)
    if libs.get("torchdiffeq") is not None:
        tdq = libs["torchdiffeq"]
        fns["torchdiffeq"] = lambda: tdq.odeint(f, y0, t, rtol=tol, atol=tol, method="dopri5")
    if libs.get("torchode") is not None:
        fns.update(torchode_solvers(libs["torchode"], f, y0, t, tol, batch=False))
    table(name, interleaved(fns, repeats, warm=True, rotate=ROTATE))


def case_a(repeats, libs):
    A = torch.tensor([[-0.1, -1.0], [1.0, -0.1]], dtype=torch.float64)

    def f(t, y):
        return torch.mv(A, y)
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0, 25, 200, dtype=torch.float64)
    case_small("(a) spiral, 200 outputs, dopri5 1e-6, float64", f, y0, t, 1e-6, repeats, libs)


class SmallODE(nn.Module):
    """(g) and (k): a small neural ODE, 2 -> 32 -> 2 with tanh, float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2)).double()

    def forward(self, t, y):
        return self.net(y)


def training_rows(label, f, y0, t, tol, variants, compiled_name, repeats):
    """One training step (forward, mean squared error to a fixed target, backward) per
    variant {name: (odeint, kwargs)}, interleaved; gradients compared with the first's."""
    torch.manual_seed(1)
    target = torch.randn(len(t), *y0.shape, dtype=y0.dtype)
    grads = {}

    def step(odeint, kw, name):
        def run():
            f.zero_grad()
            ys = odeint(f, y0.clone().requires_grad_(), t, rtol=tol, atol=tol, **kw)
            ((ys - target) ** 2).mean().backward()
            grads[name] = torch.cat([p.grad.reshape(-1) for p in f.parameters()])
        return run
    fns = {name: step(o, kw, name) for name, (o, kw) in variants.items()}
    print(f"# {label}: first {compiled_name} step {first_call(fns[compiled_name]):.1f} s")
    times = interleaved(fns, repeats, warm=True, rotate=ROTATE)
    ref = grads[next(iter(variants))]
    for k, g in grads.items():
        print(f"# {label}: {k}: max |grad - first grad| / max |first grad| "
              f"{float((g - ref).abs().max() / ref.abs().max()):.1e}")
    table(label, times)


def case_g(repeats, libs):
    f = SmallODE()
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    adj = neuralode.odeint_adjoint
    for n_out in (20, 2):
        t = torch.linspace(0, 5, n_out, dtype=torch.float64)
        variants = {"neuralode eager": (adj, {}),
                    "neuralode forward compiled": (adj, {"options": C}),
                    "neuralode forward and backward compiled": (
                        adj, {"options": C, "adjoint_options": C})}
        if libs.get("torchdiffeq") is not None:
            variants["torchdiffeq"] = (libs["torchdiffeq"].odeint_adjoint, {})
        training_rows(f"(g) small neural ODE (2-32-2), adjoint training step, {n_out} outputs "
                      f"on [0, 5], dopri5 1e-6, float64", f, y0, t, 1e-6, variants,
                      "neuralode forward and backward compiled", repeats)


def case_k(repeats, libs):
    """gradient='checkpoint' with its backward pass compiled (issue 18 item 2) against the
    eager checkpoint, backprop and the adjoint with both solves compiled."""
    f = SmallODE()
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    ode = neuralode.odeint
    for n_out in (20, 2):
        t = torch.linspace(0, 5, n_out, dtype=torch.float64)
        variants = {"neuralode checkpoint eager": (ode, {"gradient": "checkpoint"}),
                    "neuralode checkpoint, backward compiled": (
                        ode, {"gradient": "checkpoint", "options": C}),
                    "neuralode backprop": (ode, {}),
                    "neuralode adjoint, both solves compiled": (
                        neuralode.odeint_adjoint, {"options": C, "adjoint_options": C})}
        if libs.get("torchdiffeq") is not None:
            variants["torchdiffeq backprop"] = (libs["torchdiffeq"].odeint, {})
        training_rows(f"(k) small neural ODE (2-32-2), checkpoint training step, {n_out} "
                      f"outputs on [0, 5], dopri5 1e-6, float64", f, y0, t, 1e-6, variants,
                      "neuralode checkpoint, backward compiled", repeats)
    mlp = MLP()
    torch.manual_seed(0)
    y0 = torch.randn(512, 32)
    t = torch.tensor([0.0, 1.0])
    training_rows("(k) MLP 512x32, checkpoint training step, dopri5 1e-5, float32", mlp, y0, t,
                  1e-5, {"neuralode checkpoint eager": (ode, {"gradient": "checkpoint"}),
                         "neuralode checkpoint, backward compiled": (
                             ode, {"gradient": "checkpoint", "options": C}),
                         "neuralode backprop": (ode, {})},
                  "neuralode checkpoint, backward compiled", repeats)


def case_r(repeats, libs):
    def lorenz(t, y):
        x, yy, z = y.unbind(-1)
        return torch.stack([10.0 * (yy - x), x * (28.0 - z) - yy, x * yy - 8.0 / 3.0 * z], -1)
    y0 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    t = torch.linspace(0, 2, 100, dtype=torch.float64)
    case_small("(r) Lorenz (3 states), 100 outputs, dopri5 1e-6, float64", lorenz, y0, t, 1e-6,
               repeats, libs)


def case_b(repeats, libs):
    torch.manual_seed(0)
    f = MLP()
    y0 = torch.randn(512, 32)
    t = torch.tensor([0.0, 1.0])
    tol = 1e-5
    with torch.no_grad():  # (the compiled solve is not differentiated by backprop)
        e = neuralode.solve(f, y0, t, rtol=tol, atol=tol)
        c = neuralode.solve(f, y0, t, rtol=tol, atol=tol, options=C)
    compare("(b) MLP forward", e, c)
    nfe = e.stats.nfe

    def f_batch():
        with torch.no_grad():
            for _ in range(nfe):
                f(t[0], y0)
    with torch.no_grad():
        solver = neuralode.CompiledSolver(f, rtol=tol, atol=tol, options=C)
        fns = {"neuralode eager": lambda: neuralode.odeint(f, y0, t, rtol=tol, atol=tol),
               "neuralode compiled": lambda: neuralode.odeint(f, y0, t, rtol=tol, atol=tol,
                                                              options=C),
               "neuralode CompiledSolver": lambda: solver(y0, t),
               f"{nfe} evaluations of f": f_batch}
        if libs.get("base") is not None:
            base = libs["base"]
            fns["base compiled"] = lambda: base.odeint(f, y0, t, rtol=tol, atol=tol, options=C)
        times = interleaved(fns, repeats, warm=True, rotate=ROTATE)
    table("(b) MLP 512x32, dopri5 1e-5, float32, forward (overhead ratio = time / "
          f"{nfe} evaluations of f)", times)
    for k in ("neuralode eager", "neuralode compiled", "neuralode CompiledSolver"):
        print(f"overhead ratio {k}: {times[k] / times[f'{nfe} evaluations of f']:.3f}")
    # an adjoint training step
    target = torch.randn(512, 32)

    def train_step(options, adjoint_options=None):
        def run():
            f.zero_grad()
            ys = neuralode.odeint_adjoint(f, y0, t, rtol=tol, atol=tol, options=options,
                                          adjoint_options=adjoint_options)
            ((ys[-1] - target) ** 2).mean().backward()
        return run
    first_call(train_step(C, C))
    times = interleaved({"neuralode eager": train_step({}),
                         "neuralode forward compiled": train_step(C),
                         "neuralode forward and backward compiled": train_step(C, C)},
                        repeats, warm=True, rotate=ROTATE)
    table("(b) MLP adjoint training step (forward + backward), dopri5 1e-5, float32", times)


def case_o(repeats, libs):
    """(b)'s MLP forward with 20 and 100 output times: outputs larger than what one call of
    the compiled loop carries are written a chunk per call."""
    torch.manual_seed(0)
    f = MLP()
    y0 = torch.randn(512, 32)
    tol = 1e-5
    base = libs.get("base")
    for T in (20, 100):
        t = torch.linspace(0.0, 1.0, T)
        with torch.no_grad():
            e = neuralode.solve(f, y0, t, rtol=tol, atol=tol)
            c = neuralode.solve(f, y0, t, rtol=tol, atol=tol, options=C)
            compare(f"(o) MLP, {T} outputs", e, c)
            print(f"NFE eager {e.stats.nfe}, compiled {c.stats.nfe}")
            fns = {"neuralode eager": lambda t=t: neuralode.odeint(f, y0, t, rtol=tol, atol=tol),
                   "neuralode compiled": lambda t=t: neuralode.odeint(f, y0, t, rtol=tol,
                                                                      atol=tol, options=C)}
            if base is not None:
                fns["base compiled"] = lambda t=t: base.odeint(f, y0, t, rtol=tol, atol=tol,
                                                               options=C)
            times = interleaved(fns, repeats, warm=True, rotate=ROTATE)
        table(f"(o) MLP 512x32, dopri5 1e-5, float32, {T} outputs on [0, 1], forward", times)


def case_v(repeats, libs):
    g = torch.Generator().manual_seed(0)
    B = 256
    mu = torch.rand(B, generator=g, dtype=torch.float64) * 9 + 1
    y0 = torch.randn(B, 2, generator=g, dtype=torch.float64) * 2
    t = torch.linspace(0, 10, 11, dtype=torch.float64)
    tol = 1e-6

    class VdP(nn.Module):
        def forward(self, t, y):
            x, v = y[..., 0], y[..., 1]
            return torch.stack([v, mu * (1 - x ** 2) * v - x], -1)
    f = VdP()
    e = neuralode.solve(f, y0, t, rtol=tol, atol=tol, per_sample=True)
    c = neuralode.solve(f, y0, t, rtol=tol, atol=tol, per_sample=True, options=C)
    compare("(v) 256 Van der Pol per sample", e, c)
    fns = {"neuralode eager": lambda: neuralode.solve(f, y0, t, rtol=tol, atol=tol,
                                                      per_sample=True),
           "neuralode compiled": lambda: neuralode.solve(f, y0, t, rtol=tol, atol=tol,
                                                         per_sample=True, options=C)}
    if libs.get("torchode") is not None:
        fns.update(torchode_solvers(libs["torchode"], f, y0, t, tol, batch=True))
    table("(v) 256 Van der Pol per sample, dopri5 1e-6, float64", interleaved(fns, repeats,
                                                                              warm=True,
                                                                              rotate=ROTATE))


def case_d(repeats, libs):
    torch.manual_seed(0)
    f = MLP()
    y0 = torch.randn(512, 32)
    t = torch.tensor([0.0, 1.0])
    h, n = 0.05, 20
    opts = {"step_size": h}

    def rk4_loop(y):  # the same arithmetic as neuralode's rk4 (3/8 rule), written by hand
        tt = t[0]
        for _ in range(n):
            k1 = f(tt, y)
            k2 = f(tt + h / 3, y + h * k1 / 3)
            k3 = f(tt + 2 * h / 3, y + h * (k2 - k1 / 3))
            k4 = f(tt + h, y + h * (k1 - k2 + k3))
            y = y + h * (k1 + 3 * (k2 + k3) + k4) / 8
            tt = tt + h
        return y
    hand = torch.compile(rk4_loop, fullgraph=True)
    with torch.no_grad():
        e = neuralode.solve(f, y0, t, method="rk4", options=opts)
        c = neuralode.solve(f, y0, t, method="rk4", options={**opts, **C})
        compare("(d) rk4 fixed grid", e, c)
        print(f"# hand-written compiled loop: first call {first_call(lambda: hand(y0)):.1f} s;"
              f" max |hand - neuralode| {float((hand(y0) - e.ys[-1]).abs().max()):.1e}")
        solver = neuralode.CompiledSolver(f, method="rk4", options={**opts, **C})
        fns = {"neuralode eager": lambda: neuralode.odeint(f, y0, t, method="rk4",
                                                           options=opts),
               "neuralode compiled": lambda: neuralode.odeint(f, y0, t, method="rk4",
                                                              options={**opts, **C}),
               "neuralode CompiledSolver": lambda: solver(y0, t),
               "hand-written loop, compiled": lambda: hand(y0)}
        times = interleaved(fns, repeats, warm=True, rotate=ROTATE)
    table("(d) rk4 on the MLP, step 0.05 on [0, 1], float32, forward", times)
    for k in ("neuralode compiled", "neuralode CompiledSolver"):
        print(f"{k} / hand-written compiled loop: "
              f"{times[k] / times['hand-written loop, compiled']:.3f}")


CASES = {"a": case_a, "r": case_r, "b": case_b, "o": case_o, "v": case_v, "d": case_d,
         "g": case_g, "k": case_k}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="a,r,b,o,v,d,g,k")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--libs", default="torchdiffeq,torchode")
    ap.add_argument("--baseline-rev", default=None,
                    help="also time this revision's compiled solves in (a), (r), (b), (o)")
    ap.add_argument("--rotate", action="store_true",
                    help="every other round in reverse order (see _util.interleaved)")
    args = ap.parse_args(argv)
    global ROTATE
    ROTATE = args.rotate
    torch.set_num_threads(1)
    libs = {name: optional(name) for name in args.libs.split(",") if name}
    print(f"# torch {torch.__version__}, {loadavg()}"
          + (f"; base = {args.baseline_rev}" if args.baseline_rev else ""))
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline_rev:
            libs["base"] = load_baseline(args.baseline_rev, None, Path(tmp))
        for key in args.only.split(","):
            before = len(compiled_driver.COMPILES)
            CASES[key](args.repeats, libs)
            print(f"# inductor compilations in ({key}): "
                  f"{len(compiled_driver.COMPILES) - before}, "
                  f"{sum(compiled_driver.COMPILES[before:]):.1f} s\n")


if __name__ == "__main__":
    main()
