"""Accuracy of the stiff one-step methods with the PID and Gustafsson controllers (issue 19).

For each of the four problems of ``neuralode.problems`` at rtol 1e-4, 1e-6, 1e-8 (atol =
atol_ratio * rtol, as benchmarks/stiff.py pairs them) and each of rodas4, rodas5p, kvaerno3,
kvaerno5: the worst output error divided by the tolerance atol + rtol |y| against the
problem's reference (scipy Radau, rtol 1e-12), and the accepted / rejected steps, with the
default PID controller and with ``GustafssonController``; analytic Jacobians. Times are
printed but are single runs: compare them only within a row.

    python benchmarks/stiff_controllers.py [--methods rodas4,rodas5p,kvaerno3,kvaerno5]
"""

from __future__ import annotations

import argparse
import time

import torch

import neuralode
from neuralode.problems import Hires, Oregonator, Robertson, VanDerPol


def output_times(p) -> torch.Tensor:
    if isinstance(p, Robertson):  # nine decades: log-spaced outputs
        return torch.cat([torch.zeros(1), torch.logspace(-4, 5, 19)]).double()
    return torch.linspace(*p.t_span, 31, dtype=torch.float64)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="rodas4,rodas5p,kvaerno3,kvaerno5")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| problem | rtol | method | PID error/tol | PID accepted/rejected | PID s "
          "| Gustafsson error/tol | Gustafsson accepted/rejected | Gustafsson s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cls in (Robertson, VanDerPol, Hires, Oregonator):
        p = cls()
        t = output_times(p)
        ref = p.reference(t)
        for rtol in (1e-4, 1e-6, 1e-8):
            atol = rtol * p.atol_ratio
            for method in args.methods.split(","):
                cells = []
                for ctrl in (None, neuralode.GustafssonController()):
                    start = time.perf_counter()
                    sol = neuralode.solve(p, p.y0, t, method=method, rtol=rtol, atol=atol,
                                          options={"step_size_controller": ctrl,
                                                   "jacobian": p.jacobian})
                    err = float(((sol.ys - ref).abs() / (atol + rtol * ref.abs())).max())
                    cells += [f"{err:.3g}", f"{sol.stats.n_accepted}/{sol.stats.n_rejected}",
                              f"{time.perf_counter() - start:.2f}"]
                print(f"| {p.name} | {rtol:.0e} | {method} | " + " | ".join(cells) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
