"""Exceptions raised by neuralode. All derive from standard Python exceptions so that
existing ``except ValueError`` / ``except RuntimeError`` code keeps working."""


class ODEInputError(ValueError):
    """Invalid arguments to a solve: y0, t, tolerances, method or options."""


class ODEFuncError(ValueError):
    """The user's ``func`` returned something that is not a valid derivative."""


class StepSizeError(RuntimeError):
    """The adaptive step size fell below what float64 time can resolve."""


class MaxStepsError(RuntimeError):
    """``max_num_steps`` was exceeded before reaching the final time."""
