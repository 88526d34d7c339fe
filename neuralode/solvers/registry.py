"""The one registry of method names: ``SOLVERS`` maps each name to its method class.

The method modules define their classes and export them as ``METHODS``; they do not import
this module, so the registry is the only place that knows them all. Tests, the docs and
the command line read it rather than listing methods by hand.
"""

from __future__ import annotations

from neuralode.solvers import bdf, implicit_rk, methods, rosenbrock, scipy_solver
from neuralode.solvers.methods import Method

SOLVERS: dict[str, type[Method]] = {}
for _module in (methods, implicit_rk, bdf, rosenbrock, scipy_solver):
    SOLVERS.update(_module.METHODS)
ALIASES = {"heun": "heun2", "fixed_adams": "implicit_adams"}
DEFAULT_METHOD = "dopri5"

__all__ = ["ALIASES", "DEFAULT_METHOD", "SOLVERS"]
