"""Numerics only: tableaux, steppers, step-size controllers and the two drivers (the float
clock of one problem, ``loop.integrate``; the tensor clock of a per-sample batch,
``batched.integrate_batched``), which share every formula.

``SOLVERS`` (``registry``) is the one registry of method names; nothing else lists methods.
"""

from neuralode.solvers.base import RHS, PerSampleStats, SolverStats, StateLayout
from neuralode.solvers.controllers import (
    ErrorNorm,
    FixedGridController,
    PerSampleGrid,
    PIDController,
)
from neuralode.solvers.gustafsson import GustafssonController
from neuralode.solvers.loop import STATUSES, Callbacks, LoopResult, Stop, integrate
from neuralode.solvers.methods import AdaptiveRK, FixedGridMethod, FixedGridRK, Method
from neuralode.solvers.registry import ALIASES, DEFAULT_METHOD, SOLVERS
from neuralode.solvers.rk import RKStepper
from neuralode.solvers.tableau import TABLEAUX, ButcherTableau

__all__ = [
    "ALIASES",
    "DEFAULT_METHOD",
    "RHS",
    "SOLVERS",
    "STATUSES",
    "TABLEAUX",
    "AdaptiveRK",
    "ButcherTableau",
    "Callbacks",
    "ErrorNorm",
    "FixedGridController",
    "FixedGridMethod",
    "FixedGridRK",
    "GustafssonController",
    "LoopResult",
    "Method",
    "PIDController",
    "PerSampleGrid",
    "PerSampleStats",
    "RKStepper",
    "SolverStats",
    "StateLayout",
    "Stop",
    "integrate",
]
