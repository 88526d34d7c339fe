"""Numerics only: tableaux, steppers, step-size control and interpolation.

``SOLVERS`` is the one registry of method names; nothing else lists methods.
"""

from neuralode.solvers.adams import ExplicitAdams, ImplicitAdams
from neuralode.solvers.base import RHS, Solver, SolverStats, StateLayout
from neuralode.solvers.rk import AdaptiveRK, FixedGridRK, make_rk_solver
from neuralode.solvers.tableau import TABLEAUX, ButcherTableau

_DOCS = {
    "euler": "Euler's method (order 1), fixed grid",
    "midpoint": "explicit midpoint (order 2), fixed grid",
    "heun2": "Heun's method / explicit trapezoid (order 2), fixed grid",
    "heun3": "Heun's third-order method, fixed grid",
    "rk4": "Runge–Kutta 4 with the 3/8 rule (as torchdiffeq's rk4), fixed grid",
    "rk4_classic": "classic Runge–Kutta 4, fixed grid",
    "adaptive_heun": "Heun–Euler 2(1), adaptive",
    "fehlberg2": "Runge–Kutta–Fehlberg 2(1), adaptive",
    "bosh3": "Bogacki–Shampine 3(2), adaptive",
    "dopri5": "Dormand–Prince 5(4), adaptive (default)",
    "tsit5": "Tsitouras 5(4), adaptive",
    "dopri8": "Dormand–Prince 8(7), adaptive",
}

SOLVERS: dict[str, type[Solver]] = {name: make_rk_solver(tab, _DOCS[name])
                                    for name, tab in TABLEAUX.items()}
SOLVERS["explicit_adams"] = ExplicitAdams
SOLVERS["implicit_adams"] = ImplicitAdams
ALIASES = {"heun": "heun2", "fixed_adams": "implicit_adams"}
DEFAULT_METHOD = "dopri5"

__all__ = [
    "ALIASES",
    "DEFAULT_METHOD",
    "RHS",
    "SOLVERS",
    "TABLEAUX",
    "AdaptiveRK",
    "ButcherTableau",
    "FixedGridRK",
    "Solver",
    "SolverStats",
    "StateLayout",
]
