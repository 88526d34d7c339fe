"""ODE functions that count their evaluations, and modules that integrate them.

* :class:`ODEFunc`: base class for ``f(t, y)`` modules; every call adds one to ``nfe`` and,
  when gradients flow back through the output, to ``nfe_grad``.
* :class:`NeuralODE`: ``model(y0, t)`` returns the trajectory ``y(t)`` at the given times.
* :class:`ODEBlock`: ``block(x)`` integrates from ``t0`` to ``t1`` and returns ``y(t1)`` (the
  drop-in replacement of a stack of residual blocks).

Both integrate with ``neuralode.odeint``; ``gradient`` chooses how the solve is
differentiated (``neuralode.gradients``): "backprop" (through the solver's operations, the
paper's "RK-Net"), "checkpoint" (the same gradient in little memory), "adjoint" (the adjoint
method: O(1) memory in the number of steps), or a strategy object with options. After a
forward call ``nfe_forward`` holds the number of evaluations of ``f`` it made; after the
backward pass ``nfe_backward`` holds the evaluations the backward pass made (adjoint and
checkpoint: evaluations during the backward pass; backprop: evaluations that gradients
flowed back through).

Options for dynamics that stay cheap to solve (issue 21):

* ``regularizers=[KineticEnergy(), JacobianFrobenius(), SecondDerivative()]``
  (``neuralode.regularizers``): integrated along every training solve (module in training
  mode, gradients enabled) without driving the step size; ``regularization`` then holds
  ``{name: per-sample integral}`` and :meth:`NeuralODE.regularization_loss` their weighted
  mean, to add to the loss;
* ``steer=b`` (STEER, Ghosh et al. 2020): in training mode the final time is drawn uniformly
  from ``[t_end - b, t_end + b]`` at every call; in eval mode it is ``t_end``;
* ``augment=k`` (augmented neural ODEs, Dupont et al. 2019): k zero channels are appended to
  dimension 1 of the state (features of ``(B, D)``, channels of ``(B, C, H, W)``), so ``func``
  works on ``D + k`` features; ``augment_output="keep"`` (default) returns the augmented
  state (a following layer projects it), ``"drop"`` returns the first ``D`` features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from neuralode.compiled import wants_compile
from neuralode.gradients import (
    Adjoint,
    Backprop,
    Gradient,
    backward_nfe,
    describe,
    gradient_strategy,
)
from neuralode.odeint import odeint
from neuralode.regularizers import (
    RegularizedFunc,
    Regularizer,
    regularization_loss,
    regularized_solve,
)
from neuralode.solvers import ALIASES, SOLVERS

__all__ = ["AUGMENT_OUTPUTS", "CountedFunc", "NeuralODE", "ODEBlock", "ODEFunc"]

AUGMENT_OUTPUTS: tuple[str, ...] = ("keep", "drop")
"""What an augmented block returns: the whole augmented state, or the original channels."""


def _first_grad_tensor(out) -> torch.Tensor | None:
    items = out if isinstance(out, (tuple, list)) else (out,)
    for v in items:
        if isinstance(v, torch.Tensor) and v.requires_grad:
            return v
    return None


class ODEFunc(nn.Module):
    """Base class of the right-hand side ``f(t, y)`` of a neural ODE.

    Subclasses implement ``forward(t, y)``. Counters (plain ints, not saved in state_dict):
    ``nfe`` -- calls since the last :meth:`reset_nfe`; ``nfe_grad`` -- calls whose output
    a backward pass has since propagated gradients through.
    """

    def __init__(self):
        super().__init__()
        self.nfe = 0
        self.nfe_grad = 0

    def __call__(self, t, y, *args, **kwargs):
        if torch.compiler.is_compiling():
            # inside a compiled solve: no Python state changes (the solve counts its calls;
            # the blocks read them from its statistics)
            return super().__call__(t, y, *args, **kwargs)
        self.nfe += 1
        out = super().__call__(t, y, *args, **kwargs)
        if torch.is_grad_enabled():
            v = _first_grad_tensor(out)
            if v is not None:
                v.register_hook(self._count_grad)
        return out

    def _count_grad(self, grad):
        self.nfe_grad += 1

    def reset_nfe(self) -> None:
        """Set both counters to zero."""
        self.nfe = 0
        self.nfe_grad = 0


class CountedFunc(ODEFunc):
    """Wraps any ``nn.Module`` with ``forward(t, y)`` so that its evaluations are counted.
    The wrapped module is ``.module`` (its state_dict keys gain the prefix ``module.``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, t, y):
        return self.module(t, y)


def _check_tolerance(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive float, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return v


def _check_method(name: str, method) -> str | None:
    if method is None:
        return None
    if method not in SOLVERS and method not in ALIASES:
        raise ValueError(f"unknown {name} {method!r}; valid methods are: "
                         f"{', '.join(sorted(set(SOLVERS) | set(ALIASES)))}")
    return method


class NeuralODE(nn.Module):
    """``y(t) = y0 + int_{t[0]}^{t} func(s, y(s)) ds`` for a learned ``func``.

    Args:
        func: an :class:`ODEFunc` or any ``nn.Module`` with ``forward(t, y)`` (then wrapped in
            :class:`CountedFunc`).
        method, rtol, atol, options: the solver, as for ``neuralode.odeint``.
        gradient: how the solve is differentiated: "backprop" (default), "checkpoint",
            "checkpoint:<budget>", "adjoint", "interpolated_adjoint", or a
            ``neuralode.Checkpoint``/``Adjoint`` object with options (the adjoint's
            backward solver: ``Adjoint(method=..., rtol=..., atol=..., options=...)``).
        per_sample: solve each sample of the batch (first dimension of y0) as its own
            problem (``odeint(..., per_sample=True)``): its result does not depend on the
            rest of the batch; ``forward`` still returns ``(len(t), *y0.shape)``.
        regularizers, steer, augment, augment_output: see the module's docstring.

    ``forward(y0, t)`` returns a tensor ``(len(t), *y0.shape)`` (a tuple for tuple states).
    After each call: ``nfe_forward``, ``stats`` (the solver's ``SolverStats``); after the
    backward pass: ``nfe_backward``.
    """

    def __init__(self, func: nn.Module, *, method: str | None = "dopri5", rtol: float = 1e-3,
                 atol: float = 1e-3, options: dict[str, Any] | None = None,
                 gradient: str | Gradient = "backprop", per_sample: bool = False,
                 regularizers: Sequence[Regularizer] | None = None, steer: float = 0.0,
                 augment: int = 0, augment_output: str = "keep"):
        super().__init__()
        if not isinstance(func, nn.Module):
            raise TypeError(f"func must be an nn.Module with forward(t, y) (an ODEFunc or any "
                            f"module), got {type(func).__name__}")
        self.func = func if isinstance(func, ODEFunc) else CountedFunc(func)
        self.method = _check_method("method", method)
        self.rtol = _check_tolerance("rtol", rtol)
        self.atol = _check_tolerance("atol", atol)
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict or None, got {type(options).__name__}")
        self.options = dict(options) if options else None
        self.gradient = gradient_strategy(gradient)
        if isinstance(self.gradient, Adjoint):
            _check_method("Adjoint method", self.gradient.method)
        if not isinstance(per_sample, bool):
            raise TypeError(f"per_sample must be True or False, got {per_sample!r}")
        self.per_sample = per_sample
        self.regularizers = list(regularizers or [])
        if self.regularizers:  # validated once (types, unique names)
            RegularizedFunc(self.func, self.regularizers)
        if isinstance(steer, bool) or not isinstance(steer, (int, float)) or \
                not (steer >= 0 and math.isfinite(steer)):
            raise ValueError(f"steer must be a finite number >= 0 (end times are drawn from "
                             f"[t_end - steer, t_end + steer]), got {steer!r}")
        self.steer = float(steer)
        if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
            raise ValueError(f"augment must be an int >= 0 (zero channels appended to "
                             f"dimension 1), got {augment!r}")
        self.augment = augment
        if augment_output not in AUGMENT_OUTPUTS:
            raise ValueError(f"unknown augment_output {augment_output!r}; valid choices are: "
                             f"{', '.join(AUGMENT_OUTPUTS)}")
        self.augment_output = augment_output
        self.nfe_forward = 0
        self._nfe_after_forward = 0
        self.stats = None
        self.regularization: dict[str, torch.Tensor] | None = None
        self.last_times: torch.Tensor | None = None

    @property
    def adjoint(self) -> bool:
        """Whether the gradient is the adjoint method's."""
        return isinstance(self.gradient, Adjoint)

    # -- counters ------------------------------------------------------------------------

    @property
    def nfe_backward(self) -> int:
        """Evaluations of ``func`` made by the backward pass of the last forward call: with the
        adjoint or checkpointing, the calls since the forward solve ended; with backprop, the
        evaluations of the forward solve that gradients were propagated through."""
        if not isinstance(self.gradient, Backprop):
            if wants_compile(self.options) and self.stats is not None:
                return backward_nfe(self.stats)  # (a compiled backward pass counts it there)
            return self.func.nfe - self._nfe_after_forward
        return self.func.nfe_grad

    def reset_nfe(self) -> None:
        """Zero ``nfe_forward``, ``nfe_backward`` and the function's counters."""
        self.func.reset_nfe()
        self.nfe_forward = 0
        self._nfe_after_forward = 0
        self.stats = None

    def set_tolerance(self, rtol: float, atol: float | None = None) -> None:
        """Change the solver tolerances (``atol`` defaults to ``rtol``)."""
        self.rtol = _check_tolerance("rtol", rtol)
        self.atol = _check_tolerance("atol", rtol if atol is None else atol)

    # -- solving ------------------------------------------------------------------------

    def steer_times(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` with its last time drawn from ``[t[-1] - steer, t[-1] + steer]`` in training
        mode (STEER); ``t`` itself in eval mode or with ``steer`` = 0."""
        if not (self.training and self.steer > 0):
            return t
        if t.dim() != 1 or t.shape[0] < 2:
            raise ValueError(f"steer needs 1-D times with at least 2 entries, got shape "
                             f"{tuple(t.shape)}")
        gap = abs(float(t[-1]) - float(t[-2]))
        if self.steer >= gap:
            raise ValueError(f"steer={self.steer:g} must be smaller than the last interval "
                             f"|t[-1] - t[-2]| = {gap:g}, so the times stay ordered")
        u = torch.rand((), dtype=torch.float64).item()
        end = t[-1] + self.steer * (2.0 * u - 1.0)
        return torch.cat([t[:-1], end.reshape(1)])

    def augment_state(self, y0):
        """``y0`` with ``augment`` zero channels appended to dimension 1."""
        if not self.augment:
            return y0
        if not isinstance(y0, torch.Tensor) or y0.dim() < 2:
            raise ValueError(f"augment needs a batched tensor state (B, D, ...), got "
                             f"{tuple(y0.shape) if isinstance(y0, torch.Tensor) else y0!r}")
        pad = y0.new_zeros((y0.shape[0], self.augment, *y0.shape[2:]))
        return torch.cat([y0, pad], dim=1)

    def regularization_loss(self) -> torch.Tensor:
        """``sum weight * mean(integral)`` of the last training solve (0 when none)."""
        if not self.regularization:
            p = next(iter(self.parameters()), None)
            return torch.zeros(()) if p is None else p.new_zeros(())
        return regularization_loss(self.regularization, self.regularizers)

    def _solve(self, y0, t: torch.Tensor):
        self.reset_nfe()
        self.regularization = None
        y0 = self.augment_state(y0)
        channels = y0.shape[1] - self.augment if self.augment else 0
        t = self.steer_times(t)
        self.last_times = t
        kwargs = dict(rtol=self.rtol, atol=self.atol, method=self.method, gradient=self.gradient,
                      per_sample=self.per_sample)
        if self.regularizers and self.training and torch.is_grad_enabled():
            out = regularized_solve(self.func, y0, t, self.regularizers,
                                    options=self.options, **kwargs)
            ys, stats = out.ys, out.stats
            sign = 1.0 if float(t[-1]) >= float(t[0]) else -1.0
            self.regularization = {k: sign * v for k, v in out.integrals.items()}
        else:
            ys, stats = odeint(self.func, y0, t, options=self.options, return_stats=True,
                               **kwargs)
        self.stats = stats
        # a compiled solve's function calls are in its statistics only (see ODEFunc)
        self.nfe_forward = stats.nfe if wants_compile(self.options) else self.func.nfe
        self._nfe_after_forward = self.func.nfe
        if self.augment and self.augment_output == "drop":
            ys = ys[:, :, :channels]
        return ys

    def forward(self, y0, t) -> torch.Tensor:
        """Trajectory at the times ``t`` (1-D, ``t[0]`` the time of ``y0``)."""
        return self._solve(y0, t)

    def extra_repr(self) -> str:
        s = f"method={self.method!r}, rtol={self.rtol:g}, atol={self.atol:g}"
        if self.options:
            s += f", options={self.options}"
        if self.regularizers:
            s += f", regularizers={self.regularizers}"
        if self.steer:
            s += f", steer={self.steer:g}"
        if self.augment:
            s += f", augment={self.augment}, augment_output={self.augment_output!r}"
        return s + f", gradient={describe(self.gradient)}"


class ODEBlock(NeuralODE):
    """Integrates ``func`` over ``[t0, t1]`` and returns the final state: ``block(x)`` has the
    shape of ``x``. Arguments as for :class:`NeuralODE`, plus ``t0`` and ``t1`` (default 0, 1).
    """

    def __init__(self, func: nn.Module, t0: float = 0.0, t1: float = 1.0, **kwargs):
        super().__init__(func, **kwargs)
        try:
            self.t0, self.t1 = float(t0), float(t1)
        except (TypeError, ValueError):
            raise ValueError(f"t0 and t1 must be floats, got t0={t0!r}, t1={t1!r}") from None
        if not (math.isfinite(self.t0) and math.isfinite(self.t1)) or self.t0 == self.t1:
            raise ValueError(f"t0 and t1 must be finite and different, got t0={t0!r}, t1={t1!r}")
        if self.steer >= abs(self.t1 - self.t0):
            raise ValueError(f"steer={self.steer:g} must be smaller than |t1 - t0| = "
                             f"{abs(self.t1 - self.t0):g}")

    def integration_times(self, like: torch.Tensor) -> torch.Tensor:
        """``tensor([t0, t1])`` with the dtype and device of ``like``."""
        return torch.tensor([self.t0, self.t1], dtype=like.dtype, device=like.device)

    def forward(self, x):  # type: ignore[override]
        first = x[0] if isinstance(x, (tuple, list)) else x
        ys = self._solve(x, self.integration_times(first))
        if isinstance(ys, (tuple, list)):
            return tuple(y[-1] for y in ys)
        return ys[-1]

    def extra_repr(self) -> str:
        return f"t0={self.t0:g}, t1={self.t1:g}, " + super().extra_repr()
