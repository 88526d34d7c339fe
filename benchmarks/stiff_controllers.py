"""Accuracy of the stiff methods against the requested tolerance, beside scipy (issue 19).

For each of the four problems of ``neuralode.problems`` at rtol 1e-4, 1e-6, 1e-8 (atol =
atol_ratio * rtol, as benchmarks/stiff.py pairs them): the worst output error divided by
the tolerance atol + rtol |y| against the problem's reference (scipy Radau, rtol 1e-12), the
accepted / rejected steps, evaluations of f and the wall time of rodas4, rodas5p, kvaerno3,
kvaerno4, kvaerno5 and bdf (analytic Jacobians, each method's default step-size controller,
or ``--controller``), and of scipy's Radau, BDF and LSODA (``solve_ivp`` with the same
analytic Jacobian and ``t_eval``; their accepted steps are counted, their rejections are
internal). The error, step and evaluation columns are deterministic; the seconds are the
median of ``--repeats`` runs (compare them within one run), and "x Radau" divides them by
scipy Radau's in the same cell. ``--jacobian default``: neither side is given the analytic
Jacobian (neuralode: autograd; scipy: finite differences).

    python benchmarks/stiff_controllers.py [--methods rodas4,...,bdf] [--scipy Radau,BDF,LSODA]
        [--controller default|pid|gustafsson] [--problems robertson,vdp,hires,orego]
        [--rtols 1e-4,1e-6,1e-8] [--jacobian analytic|default] [--repeats 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.integrate import BDF, LSODA, Radau, solve_ivp

import neuralode
from neuralode.problems import Hires, Oregonator, Robertson, VanDerPol

PROBLEMS = {c.name: c for c in (Robertson, VanDerPol, Hires, Oregonator)}
SCIPY = {"Radau": Radau, "BDF": BDF, "LSODA": LSODA}
CONTROLLERS = {"default": None, "pid": neuralode.PIDController,
               "gustafsson": neuralode.GustafssonController}


def output_times(p) -> torch.Tensor:
    if isinstance(p, Robertson):  # nine decades: log-spaced outputs
        return torch.cat([torch.zeros(1), torch.logspace(-4, 5, 19)]).double()
    return torch.linspace(*p.t_span, 31, dtype=torch.float64)


def error_ratio(ys: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> float:
    """The worst output error over the tolerance atol + rtol |y_ref|."""
    return float(((ys - ref).abs() / (atol + rtol * ref.abs())).max())


def timed(run, repeats: int):
    """(the last result, the median wall time of ``repeats`` runs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def neuralode_row(p, t, ref, method: str, rtol: float, atol: float, controller,
                  analytic: bool = True, repeats: int = 1) -> list[str]:
    options = {"jacobian": p.jacobian} if analytic else {}
    if controller is not None:  # (bdf has its own order and step control)
        options["step_size_controller"] = controller
    sol, seconds = timed(lambda: neuralode.solve(p, p.y0, t, method=method, rtol=rtol,
                                                 atol=atol, options=options), repeats)
    st = sol.stats
    return [f"{error_ratio(sol.ys, ref, rtol, atol):.3g}", f"{st.n_accepted}/{st.n_rejected}",
            str(st.nfe), f"{seconds:.4g}"]


def scipy_row(p, t, ref, name: str, rtol: float, atol: float, analytic: bool = True,
              repeats: int = 1) -> list[str]:
    base = SCIPY[name]
    steps = [0]

    class Counted(base):  # one _step_impl call per accepted step (rejections are inside)
        def _step_impl(self):
            out = super()._step_impl()
            steps[0] += out[0]
            return out

    fun, jac = p.numpy_callables()
    ts = t.numpy()

    def run():
        steps[0] = 0
        return solve_ivp(fun, (ts[0], ts[-1]), p.y0.numpy().astype(np.float64),
                         method=Counted, t_eval=ts, rtol=rtol, atol=atol,
                         jac=jac if analytic else None)
    sol, seconds = timed(run, repeats)
    if not sol.success:
        return ["failed: " + sol.message, "", "", f"{seconds:.2f}"]
    ys = torch.from_numpy(sol.y.T.copy())
    return [f"{error_ratio(ys, ref, rtol, atol):.3g}", f"{steps[0]}/-", str(sol.nfev),
            f"{seconds:.4g}"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="rodas4,rodas5p,kvaerno3,kvaerno4,kvaerno5,bdf")
    ap.add_argument("--scipy", default="Radau,BDF,LSODA")
    ap.add_argument("--controller", default="default", choices=sorted(CONTROLLERS))
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--rtols", default="1e-4,1e-6,1e-8")
    ap.add_argument("--jacobian", default="analytic", choices=("analytic", "default"))
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    analytic, reps = args.jacobian == "analytic", args.repeats
    torch.set_num_threads(1)
    make = CONTROLLERS[args.controller]
    methods = [m for m in args.methods.split(",") if m]
    scipys = [m for m in args.scipy.split(",") if m]
    print("| problem | rtol | solver | error/tol | accepted/rejected | f evals | s | x Radau |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.problems.split(","):
        p = PROBLEMS[name]()
        t = output_times(p)
        ref = p.reference(t)
        for rtol in (float(r) for r in args.rtols.split(",")):
            atol = rtol * p.atol_ratio
            rows = [(m, neuralode_row(p, t, ref, m, rtol, atol,
                                      make() if make and m != "bdf" else None, analytic, reps))
                    for m in methods]
            rows += [(f"scipy {m}", scipy_row(p, t, ref, m, rtol, atol, analytic, reps))
                     for m in scipys]
            radau = dict(rows).get("scipy Radau")
            for solver, cells in rows:
                ratio = f"{float(cells[3]) / float(radau[3]):.2f}" if radau else ""
                print(f"| {p.name} | {rtol:.0e} | {solver} | " + " | ".join(cells)
                      + f" | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
