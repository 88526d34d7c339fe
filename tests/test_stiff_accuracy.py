"""Issue 19 item 1: the worst output error of every stiff method against the requested
tolerance on the four problems of ``neuralode.problems`` at rtol 1e-6 (atol as the
benchmarks pair it), as ``benchmarks/stiff_controllers.py`` measures it (BENCHMARKS.md).

The aim is 3x the tolerance (scipy's Radau: 0.15-4.3x here). Where a method misses it the
bound is the measured value with a margin of about 1.3x, so that a regression fails; the
cause of each miss is in BENCHMARKS.md (error per step control: the local errors are
within the tolerance, their sum along Van der Pol's slow manifold and OREGO's cycles is
not). ``bdf`` is held against scipy's BDF in the same test (measured 0.35-0.99x it; before
its own step-factor rule, ``bdf.BDFController``, 2.0-2.7x)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from neuralode import solve
from neuralode.problems import Hires, Oregonator, Robertson, VanDerPol

RTOL = 1e-6
PROBLEMS = {c.name: c for c in (Robertson, VanDerPol, Hires, Oregonator)}
AIM = 3.0
# measured error / tolerance where the aim is missed (BENCHMARKS.md, same run)
MISSES = {
    ("vdp", "rodas4"): 10.3, ("vdp", "kvaerno3"): 26.6, ("vdp", "kvaerno4"): 19.4,
    ("vdp", "kvaerno5"): 6.83, ("hires", "kvaerno3"): 9.15, ("orego", "rodas4"): 12.5,
    ("orego", "rodas5p"): 3.97, ("orego", "kvaerno3"): 91.3, ("orego", "kvaerno4"): 126.0,
    ("orego", "kvaerno5"): 18.8,
}
BDF_OVER_SCIPY = 1.25  # measured 0.54 / 0.99 / 0.59 / 0.35 (robertson, vdp, hires, orego)


@pytest.fixture(scope="module")
def cases():
    out = {}
    for name, cls in PROBLEMS.items():
        p = cls()
        t = (torch.cat([torch.zeros(1), torch.logspace(-4, 5, 19)]).double()
             if name == "robertson" else torch.linspace(*p.t_span, 31, dtype=torch.float64))
        out[name] = (p, t, p.reference(t))
    return out


def error_over_tolerance(ys, ref, atol) -> float:
    return float(((ys - ref).abs() / (atol + RTOL * ref.abs())).max())


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", ["rodas4", "rodas5p", "kvaerno3", "kvaerno4", "kvaerno5"])
def test_one_step_methods_error_within_bound(cases, problem, method):
    p, t, ref = cases[problem]
    atol = RTOL * p.atol_ratio
    sol = solve(p, p.y0, t, method=method, rtol=RTOL, atol=atol,
                options={"jacobian": p.jacobian})
    bound = 1.3 * MISSES[(problem, method)] if (problem, method) in MISSES else AIM
    assert error_over_tolerance(sol.ys, ref, atol) <= bound


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_bdf_error_near_scipy_bdf(cases, problem):
    p, t, ref = cases[problem]
    atol = RTOL * p.atol_ratio
    sol = solve(p, p.y0, t, method="bdf", rtol=RTOL, atol=atol,
                options={"jacobian": p.jacobian})
    fun, jac = p.numpy_callables()
    ts = t.numpy()
    sp = solve_ivp(fun, (ts[0], ts[-1]), p.y0.numpy().astype(np.float64), method="BDF",
                   t_eval=ts, rtol=RTOL, atol=atol, jac=jac)
    assert sp.success
    ours = error_over_tolerance(sol.ys, ref, atol)
    theirs = error_over_tolerance(torch.from_numpy(sp.y.T.copy()), ref, atol)
    assert ours <= BDF_OVER_SCIPY * theirs
