"""Exceptions raised by neuralode.

Every error derives from ``NeuralODEError`` and from the standard Python exception that
existing code already catches (``ValueError`` for bad input, ``RuntimeError`` for a solve
that cannot go on, ``FloatingPointError`` for a non-finite state), so both
``except neuralode.NeuralODEError`` and ``except ValueError`` work.
"""

from __future__ import annotations

import os
import sys
from types import FrameType


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


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, for a warning issued by the function that calls this,
    that names the first caller outside the package (the user's line, however deep the
    call into neuralode was)."""
    f: FrameType | None = sys._getframe(1)
    level = 1
    while f is not None and f.f_code.co_filename.startswith(_PACKAGE):
        f, level = f.f_back, level + 1
    return level
