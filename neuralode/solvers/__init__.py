"""Numerics only: tableaux, steppers, step-size controllers and the one integration loop.

``SOLVERS`` is the one registry of method names; nothing else lists methods.
"""

from neuralode.solvers.base import RHS, SolverStats, StateLayout
from neuralode.solvers.controllers import ErrorNorm, FixedGridController, PIDController
from neuralode.solvers.loop import STATUSES, Callbacks, LoopResult, Stop, integrate
from neuralode.solvers.methods import (
    ALIASES,
    DEFAULT_METHOD,
    SOLVERS,
    AdaptiveRK,
    FixedGridMethod,
    FixedGridRK,
    Method,
)
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
    "LoopResult",
    "Method",
    "PIDController",
    "RKStepper",
    "SolverStats",
    "StateLayout",
    "Stop",
    "integrate",
]
