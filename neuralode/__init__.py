"""neuralode: neural ordinary differential equations in PyTorch.

    from neuralode import odeint, odeint_adjoint

``odeint`` is a drop-in replacement for ``torchdiffeq.odeint``; ``solve`` also returns
solver statistics.
"""

from neuralode.adjoint import AdjointStats, odeint_adjoint
from neuralode.errors import MaxStepsError, ODEFuncError, ODEInputError, StepSizeError
from neuralode.odeint import ODESolution, odeint, solve
from neuralode.solvers import SOLVERS, SolverStats

__version__ = "0.1.0"

__all__ = [
           "SOLVERS",
           "AdjointStats",
           "MaxStepsError",
           "ODEFuncError",
           "ODEInputError",
           "ODESolution",
           "SolverStats",
           "StepSizeError",
           "__version__",
           "odeint",
           "odeint_adjoint",
           "solve",
]
