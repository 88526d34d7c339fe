"""adams vs dopri5: evaluations (NFE) at equal error on non-stiff problems (the problems of
benchmarks/dopri5_vs_torchdiffeq.py plus a harmonic oscillator), float64. Errors are the max
over outputs and components against a dopri8 solution at rtol = atol = 1e-13.

For dopri5 at rtol = atol = 1e-8 and 1e-10, the table gives its NFE and error, adams's NFE
and error at the same tolerance, and "adams NFE at equal error": the NFE of adams at the
loosest tolerance of the ladder 10^(-k/4) whose error is at most dopri5's.

    python benchmarks/adams.py
"""

from __future__ import annotations

import math

import torch
from dopri5_vs_torchdiffeq import problems

from neuralode import odeint, solve

DT = torch.float64


def all_problems():
    out = {"harmonic oscillator": (lambda t, y: torch.stack([y[1], -y[0]]),
                                   torch.tensor([1.0, 0.0], dtype=DT),
                                   torch.linspace(0, 20, 50, dtype=DT))}
    out.update(problems())
    return out


def run(f, y0, t, method, tol, ref):
    sol = solve(f, y0, t, rtol=tol, atol=tol, method=method)
    return sol.stats.nfe, (sol.ys - ref).abs().max().item()


def main():
    torch.set_num_threads(1)
    ladder = [10.0 ** (-k / 4) for k in range(20, 53)]  # 1e-5 .. 1e-13
    print("| problem | rtol | dopri5 NFE | dopri5 error | adams NFE | adams error | "
          "adams NFE at equal error | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for name, (f, y0, t) in all_problems().items():
        ref = odeint(f, y0, t, rtol=1e-13, atol=1e-13, method="dopri8")
        adams = {}
        for tol in (1e-8, 1e-10):
            nd, ed = run(f, y0, t, "dopri5", tol, ref)
            na, ea = run(f, y0, t, "adams", tol, ref)
            eq = None
            for lt in ladder:
                if lt not in adams:
                    adams[lt] = run(f, y0, t, "adams", lt, ref)
                if adams[lt][1] <= ed:
                    eq = adams[lt][0]
                    break
            ratio = eq / nd if eq is not None else math.nan
            ratios.append(ratio)
            print(f"| {name} | {tol:.0e} | {nd} | {ed:.2e} | {na} | {ea:.2e} | "
                  f"{eq if eq is not None else 'not reached'} | {ratio:.2f} |")
    print(f"\nadams / dopri5 NFE at equal error: max {max(ratios):.2f}, "
          f"below 1 in {sum(r < 1 for r in ratios)} of {len(ratios)}")


if __name__ == "__main__":
    main()
