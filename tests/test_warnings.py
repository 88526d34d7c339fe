"""Warnings a user sees that are not about their code."""

from __future__ import annotations

import subprocess
import sys

# A first Rosenbrock solve in a fresh process, every warning recorded ("always": none is
# hidden by Python's default filters or by an earlier identical one).
FIRST_RODAS5P_SOLVE = """
import warnings
import torch
from neuralode import odeint
from neuralode.problems import Robertson

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    p = Robertson()
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    odeint(p, y0, t, method="rodas5p", rtol=1e-6, atol=1e-10)
for w in caught:
    print(f"WARNING {w.category.__name__}: {w.message}")
print("SOLVED")
"""


def test_first_rodas5p_solve_does_not_warn_that_torch_jit_script_is_deprecated():
    out = subprocess.run([sys.executable, "-c", FIRST_RODAS5P_SOLVE], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "SOLVED" in out.stdout
    assert "torch.jit.script" not in out.stdout + out.stderr, out.stdout
