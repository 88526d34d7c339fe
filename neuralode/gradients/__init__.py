"""How a solve is differentiated: one choice, the ``gradient`` keyword of ``solve``,
``odeint``, the ``nn`` blocks, the models and the training commands.

    "backprop"    autograd through the solver's operations (exact gradient of what was
                  computed; memory grows with the number of steps). The default.
    "checkpoint"  the same gradient (to rounding), by redoing steps from checkpoints in the
                  backward pass: memory of one step's graph plus the kept states; with
                  ``Checkpoint(budget=k)`` at most k states (binomial checkpointing).
    "adjoint"     the adjoint ODE solved backwards (``odeint_adjoint``): memory independent
                  of the steps, the gradient of the ODE up to the backward solve's error.
    "interpolated_adjoint"
                  the adjoint ODE, reading y from the forward solve's dense output instead
                  of integrating it backwards (``Adjoint(interpolated=True)``).

Strings name the defaults; the strategy objects carry options. ``"checkpoint:16"`` is
``Checkpoint(budget=16)`` (for command lines and configs). Each strategy is one module of
this package and owns how a solve is differentiated, one problem and per sample (see
``neuralode.gradients.backprop``).
"""

from __future__ import annotations

from neuralode.errors import ODEInputError
from neuralode.gradients.adjoint import Adjoint, AdjointStats, odeint_adjoint
from neuralode.gradients.backprop import Backprop, SolverGradient
from neuralode.gradients.checkpoint import Checkpoint

GRADIENTS = ("backprop", "checkpoint", "adjoint", "interpolated_adjoint")
Gradient = Backprop | Checkpoint | Adjoint


def gradient_strategy(gradient: str | Gradient | None) -> Gradient:
    """The strategy named or given by ``gradient`` (None: backprop)."""
    if gradient is None:
        return Backprop()
    if isinstance(gradient, (Backprop, Checkpoint, Adjoint)):
        return gradient
    if isinstance(gradient, str):
        name, _, arg = gradient.partition(":")
        if name == "checkpoint" and arg:
            try:
                budget = int(arg)
            except ValueError:
                raise ODEInputError(f"gradient {gradient!r}: the budget after 'checkpoint:' must "
                                    f"be an int >= 1 (e.g. 'checkpoint:16')") from None
            return Checkpoint(budget=budget)
        if not arg:
            if name == "backprop":
                return Backprop()
            if name == "checkpoint":
                return Checkpoint()
            if name == "adjoint":
                return Adjoint()
            if name == "interpolated_adjoint":
                return Adjoint(interpolated=True)
    raise ODEInputError(f"gradient must be one of {list(GRADIENTS)} (or 'checkpoint:<budget>'), "
                        f"or a Backprop/Checkpoint/Adjoint object; got {gradient!r}")


def backward_nfe(stats) -> int:
    """Evaluations of f that the backward pass of a solve made, from the solve's statistics:
    the adjoint's backward solve (``AdjointStats.backward``) or checkpointing's replay
    (``stats.extra["checkpoint"]``); 0 before ``.backward()`` ran, and for backprop (whose
    backward pass evaluates nothing). A compiled backward pass counts its evaluations there
    only: ``func``'s own counters do not run inside a compiled loop."""
    backward = getattr(stats, "backward", None)
    if backward is not None:
        return backward.nfe
    replay = stats.extra.get("checkpoint")
    return 0 if replay is None else replay.nfe


def describe(gradient: str | Gradient | None) -> str:
    """A short name for logs: backprop, checkpoint, checkpoint:16, adjoint, ..."""
    g = gradient_strategy(gradient)
    if isinstance(g, Checkpoint):
        return "checkpoint" if g.budget is None else f"checkpoint:{g.budget}"
    if isinstance(g, Adjoint):
        return "interpolated_adjoint" if g.interpolated else "adjoint"
    return "backprop"


__all__ = ["GRADIENTS", "Adjoint", "AdjointStats", "Backprop", "Checkpoint", "Gradient",
           "SolverGradient", "backward_nfe", "describe", "gradient_strategy", "odeint_adjoint"]
