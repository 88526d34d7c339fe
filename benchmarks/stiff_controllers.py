"""Accuracy of the stiff methods against the requested tolerance, beside scipy (issue 19).

For each of the four problems of ``neuralode.problems`` at rtol 1e-4, 1e-6, 1e-8 (atol =
atol_ratio * rtol, as benchmarks/stiff.py pairs them): the worst output error divided by
the tolerance atol + rtol |y| against the problem's reference (scipy Radau, rtol 1e-12), the
accepted / rejected steps, evaluations of f and the wall time of rodas4, rodas5p, kvaerno3,
kvaerno4, kvaerno5 and bdf (analytic Jacobians, each method's default step-size controller,
or ``--controller``), and of scipy's Radau, BDF and LSODA (``solve_ivp`` with the same
analytic Jacobian and ``t_eval``; their accepted steps are counted, their rejections are
internal). The error, step and evaluation columns are deterministic; the seconds are
single runs: compare them within one run.

    python benchmarks/stiff_controllers.py [--methods rodas4,...,bdf] [--scipy Radau,BDF,LSODA]
        [--controller default|pid|gustafsson] [--problems robertson,vdp,hires,orego]
        [--rtols 1e-4,1e-6,1e-8]
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


def neuralode_row(p, t, ref, method: str, rtol: float, atol: float, controller) -> list[str]:
    options = {"jacobian": p.jacobian}
    if controller is not None:  # (bdf has its own order and step control)
        options["step_size_controller"] = controller
    start = time.perf_counter()
    sol = neuralode.solve(p, p.y0, t, method=method, rtol=rtol, atol=atol, options=options)
    seconds = time.perf_counter() - start
    st = sol.stats
    return [f"{error_ratio(sol.ys, ref, rtol, atol):.3g}", f"{st.n_accepted}/{st.n_rejected}",
            str(st.nfe), f"{seconds:.2f}"]


def scipy_row(p, t, ref, name: str, rtol: float, atol: float) -> list[str]:
    base = SCIPY[name]
    steps = [0]

    class Counted(base):  # one _step_impl call per accepted step (rejections are inside)
        def _step_impl(self):
            out = super()._step_impl()
            steps[0] += out[0]
            return out

    fun, jac = p.numpy_callables()
    ts = t.numpy()
    start = time.perf_counter()
    sol = solve_ivp(fun, (ts[0], ts[-1]), p.y0.numpy().astype(np.float64), method=Counted,
                    t_eval=ts, rtol=rtol, atol=atol, jac=jac)
    seconds = time.perf_counter() - start
    if not sol.success:
        return ["failed: " + sol.message, "", "", f"{seconds:.2f}"]
    ys = torch.from_numpy(sol.y.T.copy())
    return [f"{error_ratio(ys, ref, rtol, atol):.3g}", f"{steps[0]}/-", str(sol.nfev),
            f"{seconds:.2f}"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="rodas4,rodas5p,kvaerno3,kvaerno4,kvaerno5,bdf")
    ap.add_argument("--scipy", default="Radau,BDF,LSODA")
    ap.add_argument("--controller", default="default", choices=sorted(CONTROLLERS))
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--rtols", default="1e-4,1e-6,1e-8")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    make = CONTROLLERS[args.controller]
    methods = [m for m in args.methods.split(",") if m]
    scipys = [m for m in args.scipy.split(",") if m]
    print("| problem | rtol | solver | error/tol | accepted/rejected | f evals | s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.problems.split(","):
        p = PROBLEMS[name]()
        t = output_times(p)
        ref = p.reference(t)
        for rtol in (float(r) for r in args.rtols.split(",")):
            atol = rtol * p.atol_ratio
            rows = [(m, neuralode_row(p, t, ref, m, rtol, atol,
                                      make() if make and m != "bdf" else None))
                    for m in methods]
            rows += [(f"scipy {m}", scipy_row(p, t, ref, m, rtol, atol)) for m in scipys]
            for solver, cells in rows:
                print(f"| {p.name} | {rtol:.0e} | {solver} | " + " | ".join(cells) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
