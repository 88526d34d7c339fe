"""neuralode: neural ordinary differential equations in PyTorch.

    from neuralode import odeint, odeint_adjoint

``odeint`` is a drop-in replacement for ``torchdiffeq.odeint`` (events included);
``solve`` returns a ``Solution`` with statistics, status, event and dense output.
``gradient="backprop" | "checkpoint" | "adjoint"`` (or ``Checkpoint(budget=16)``,
``Adjoint(...)``) chooses how a solve is differentiated.
"""

from neuralode.errors import (
    ConvergenceError,
    EventError,
    MaxStepsError,
    NeuralODEError,
    NonFiniteError,
    ODEFuncError,
    ODEInputError,
    StepSizeError,
    StiffnessError,
)
from neuralode.events import odeint_event
from neuralode.gradients import Adjoint, AdjointStats, Backprop, Checkpoint
from neuralode.odeint import CompiledSolver, odeint, odeint_adjoint, odeint_dense, solve
from neuralode.solution import DenseSolution, ODESolution, Solution
from neuralode.solvers import SOLVERS, GustafssonController, PIDController, SolverStats

__version__ = "0.2.0"

__all__ = [
    "SOLVERS",
    "Adjoint",
    "AdjointStats",
    "Backprop",
    "Checkpoint",
    "CompiledSolver",
    "ConvergenceError",
    "DenseSolution",
    "EventError",
    "GustafssonController",
    "MaxStepsError",
    "NeuralODEError",
    "NonFiniteError",
    "ODEFuncError",
    "ODEInputError",
    "ODESolution",
    "PIDController",
    "Solution",
    "SolverStats",
    "StepSizeError",
    "StiffnessError",
    "__version__",
    "odeint",
    "odeint_adjoint",
    "odeint_dense",
    "odeint_event",
    "solve",
]
