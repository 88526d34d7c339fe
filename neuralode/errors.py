"""Exceptions raised by neuralode.

Every error derives from ``NeuralODEError`` and from the standard Python exception that
existing code already catches (``ValueError`` for bad input, ``RuntimeError`` for a solve
that cannot go on, ``FloatingPointError`` for a non-finite state), so both
``except neuralode.NeuralODEError`` and ``except ValueError`` work.
"""


class NeuralODEError(Exception):
    """Base class of every error neuralode raises."""


class ODEInputError(NeuralODEError, ValueError):
    """Invalid arguments to a solve: y0, t, tolerances, method or options."""


class ODEFuncError(NeuralODEError, ValueError):
    """The user's ``func`` (or ``event_fn``) returned something that is not valid."""


class StepSizeError(NeuralODEError, RuntimeError):
    """The step size fell below what float64 time can resolve, or became non-finite."""


class MaxStepsError(NeuralODEError, RuntimeError):
    """``max_num_steps`` was exceeded before reaching the final time (or the event)."""


class NonFiniteError(NeuralODEError, FloatingPointError):
    """The state or its derivative became non-finite (nan/inf)."""


class ConvergenceError(NeuralODEError, RuntimeError):
    """The nonlinear (Newton) or linear iterations of an implicit method did not converge."""


class StiffnessError(NeuralODEError, RuntimeError):
    """An explicit method found the problem stiff (its step limited by stability) with too
    much of the span left; the message names the stiff methods."""


class EventError(NeuralODEError, RuntimeError):
    """An event search ended without the event (torchdiffeq-style event mode only)."""
