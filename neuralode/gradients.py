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
``Checkpoint(budget=16)`` (for command lines and configs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from neuralode.errors import ODEInputError

GRADIENTS = ("backprop", "checkpoint", "adjoint", "interpolated_adjoint")


@dataclass(frozen=True)
class Backprop:
    """Autograd through the solver (the paper's "RK-Net")."""

    name = "backprop"


@dataclass(frozen=True)
class Checkpoint:
    """Checkpointed backprop (``neuralode.checkpoint``).

    budget: None keeps every accepted step's start state (backward: each step redone once);
        an int k >= 1 keeps at most k states at a time (binomial schedule, more steps
        redone; the recomputation factor is in ``stats.extra["checkpoint"]``).
    params: the tensors to differentiate besides y0 and t; default: an nn.Module's
        parameters (as ``odeint_adjoint``), for any other callable the leaf tensors its
        graph reaches in one evaluation at the start (tensors a closure uses)."""

    budget: int | None = None
    params: Any = None
    name = "checkpoint"

    def __post_init__(self):
        b = self.budget
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ODEInputError(f"Checkpoint budget must be None (keep every step) or an int >= 1 "
                                f"(checkpoints kept at once), got {b!r}")
        if self.params is not None:
            object.__setattr__(self, "params", _tensors(self.params, "Checkpoint params"))


@dataclass(frozen=True)
class Adjoint:
    """The adjoint method (``odeint_adjoint``); fields are its ``adjoint_*`` arguments.
    interpolated: the backward solve reads y(t) from the forward solve's dense output
    (memory grows with the forward steps; no backward reconstruction error)."""

    rtol: Any = None
    atol: Any = None
    method: str | None = None
    options: dict | None = None
    params: Any = None
    interpolated: bool = False
    name = "adjoint"

    def __post_init__(self):
        if not isinstance(self.interpolated, bool):
            raise ODEInputError(f"Adjoint interpolated must be True or False, got "
                                f"{self.interpolated!r}")
        if self.params is not None:
            object.__setattr__(self, "params", _tensors(self.params, "Adjoint params"))

    def kwargs(self) -> dict:
        """Keyword arguments of ``odeint_adjoint``."""
        return {"adjoint_rtol": self.rtol, "adjoint_atol": self.atol,
                "adjoint_method": self.method, "adjoint_options": self.options,
                "adjoint_params": self.params, "interpolated": self.interpolated}


Gradient = Backprop | Checkpoint | Adjoint


def _tensors(value, what) -> tuple:
    if isinstance(value, torch.Tensor):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ODEInputError(f"{what} must be an iterable of tensors, got "
                            f"{type(value).__name__}") from None
    for k, v in enumerate(items):
        if not isinstance(v, torch.Tensor):
            raise ODEInputError(f"{what}[{k}] must be a tensor, got {type(v).__name__}")
    return items


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


def describe(gradient: str | Gradient | None) -> str:
    """A short name for logs: backprop, checkpoint, checkpoint:16, adjoint, ..."""
    g = gradient_strategy(gradient)
    if isinstance(g, Checkpoint):
        return "checkpoint" if g.budget is None else f"checkpoint:{g.budget}"
    if isinstance(g, Adjoint):
        return "interpolated_adjoint" if g.interpolated else "adjoint"
    return "backprop"


__all__ = ["GRADIENTS", "Adjoint", "Backprop", "Checkpoint", "Gradient", "describe",
           "gradient_strategy"]
