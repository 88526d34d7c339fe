"""dopri5 NFE and error, neuralode vs torchdiffeq, on five non-stiff problems at several
tolerances (needs `pip install --no-deps torchdiffeq`). Errors are against a dopri8 solution at
rtol = atol = 1e-13, float64.

    python benchmarks/dopri5_vs_torchdiffeq.py
"""

from __future__ import annotations

import math

import torch

from neuralode import odeint, solve

DT = torch.float64


def problems():
    def kepler(t, s):
        x, y, vx, vy = s
        r3 = (x * x + y * y) ** 1.5
        return torch.stack([vx, vy, -x / r3, -y / r3])

    e = 0.9
    A = torch.tensor([[-0.1, -1.0], [1.0, -0.1]], dtype=DT)
    n = 10
    chain = torch.diag(-torch.ones(n, dtype=DT)) + torch.diag(torch.ones(n - 1, dtype=DT), -1)
    return {
        "Kepler e=0.9": (kepler, torch.tensor([1 - e, 0, 0, math.sqrt((1 + e) / (1 - e))],
                                              dtype=DT), torch.linspace(0, 2 * math.pi, 50,
                                                                        dtype=DT)),
        "Lotka-Volterra": (lambda t, s: torch.stack([1.5 * s[0] - s[0] * s[1],
                                                     -3 * s[1] + s[0] * s[1]]),
                           torch.tensor([10.0, 5.0], dtype=DT), torch.linspace(0, 15, 100,
                                                                               dtype=DT)),
        "spiral": (lambda t, y: A @ y, torch.tensor([2.0, 0.0], dtype=DT),
                   torch.linspace(0, 25, 200, dtype=DT)),
        "pendulum": (lambda t, y: torch.stack([y[1], -torch.sin(y[0])]),
                     torch.tensor([2.5, 0.0], dtype=DT), torch.linspace(0, 30, 100, dtype=DT)),
        "10-D linear chain": (lambda t, y: chain @ y, torch.ones(n, dtype=DT),
                              torch.linspace(0, 10, 20, dtype=DT)),
    }


def main():
    import torchdiffeq

    torch.set_num_threads(1)
    print("| problem | tol | NFE neuralode | NFE torchdiffeq | error neuralode "
          "| error torchdiffeq |")
    print("|---|---|---|---|---|---|")
    nfe_ratios, err_ratios = [], []
    for name, (f, y0, t) in problems().items():
        ref = odeint(f, y0, t, rtol=1e-13, atol=1e-13, method="dopri8")
        for tol in (1e-4, 1e-6, 1e-8, 1e-10):
            ours = solve(f, y0, t, rtol=tol, atol=tol, method="dopri5")
            count = [0]

            def g(tt, y, f=f, count=count):
                count[0] += 1
                return f(tt, y)

            theirs = torchdiffeq.odeint(g, y0, t, rtol=tol, atol=tol, method="dopri5")
            e1 = (ours.ys - ref).abs().max().item()
            e2 = (theirs - ref).abs().max().item()
            nfe_ratios.append(ours.stats.nfe / count[0])
            err_ratios.append(e1 / e2)
            print(f"| {name} | {tol:.0e} | {ours.stats.nfe} | {count[0]} | {e1:.2e} | {e2:.2e} |")
    print(f"\nNFE ratio neuralode / torchdiffeq: mean {sum(nfe_ratios) / len(nfe_ratios):.3f}, "
          f"max {max(nfe_ratios):.3f}, above 1 in {sum(r > 1 for r in nfe_ratios)} of "
          f"{len(nfe_ratios)}; error ratio: mean {sum(err_ratios) / len(err_ratios):.2f}, "
          f"max {max(err_ratios):.2f}")


if __name__ == "__main__":
    main()
