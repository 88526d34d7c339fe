"""Regularisation integrals along a solve: dynamics that stay cheap to solve.

The commonest failure when training a neural ODE is that the learned dynamics get harder to
solve as training goes on (the number of function evaluations, NFE, climbs). The remedy of
Finlay et al. (RNODE, ICML 2020) and Kelly et al. (TayNODE, NeurIPS 2020) is to add to the
loss integrals along the trajectory that penalise "complicated" dynamics:

* :class:`KineticEnergy`: ``int ||f(t, z)||^2 dt`` (RNODE's kinetic energy);
* :class:`JacobianFrobenius`: ``int ||df/dz||_F^2 dt``, exactly (one vector-Jacobian product
  per state dimension: for small states) or by Hutchinson's estimator
  ``||df/dz||_F^2 = E ||eps^T df/dz||^2`` (one vector-Jacobian product) with ``eps`` drawn
  once per solve and held fixed during it (RNODE);
* :class:`SecondDerivative`: ``int ||d^2 z/dt^2||^2 dt``, TayNODE's penalty of order K = 2.
  Along a solution, ``d^2 z/dt^2 = (df/dz) f + df/dt``: a Jacobian-vector product in the
  direction ``(dz, dt) = (f, 1)``, computed with two reverse-mode products (the "double
  vjp": ``v -> (df/dz)^T v`` is linear in ``v``, and its gradient with respect to ``v`` in
  the direction ``f`` is ``(df/dz) f``), so it needs no forward-mode support from ``func``.

Every integral is a per-sample quantity: for a batched state ``(B, ...)`` it has shape
``(B,)`` (the squared norms are summed over the other dimensions), for an unbatched state it
is a 0-d tensor.

How it is integrated: the state is augmented to ``(y, r_1, ..., r_k)`` with
``dr_i/dt = integrand_i(t, y)`` and solved by the same solver (:class:`RegularizedFunc`), so
every gradient strategy (``"backprop"``, ``"checkpoint"``, ``"adjoint"``) and
``per_sample=True`` differentiate the integrals through their usual machinery. The
integrands never drive the step size: the solve's error norm (``options["norm"]``) is
replaced by the default norm over the user's components only (or by the user's own norm
applied to them), so the accepted steps are those of the unregularised solve. Pass
``error_control="all"`` to control the integrals' error too.

    from neuralode.regularizers import KineticEnergy, JacobianFrobenius, regularized_solve
    out = regularized_solve(func, y0, t, [KineticEnergy(), JacobianFrobenius("hutchinson")],
                            method="dopri5", rtol=1e-5, atol=1e-5)
    loss = task_loss(out.ys[-1]) + 0.01 * out.integrals["kinetic"].mean() \\
        + 0.01 * out.integrals["jacobian_frobenius"].mean()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from neuralode.compiled import wants_compile
from neuralode.errors import ODEInputError
from neuralode.gradients import Adjoint, gradient_strategy
from neuralode.odeint import solve
from neuralode.solvers import ALIASES, SOLVERS

__all__ = ["ERROR_CONTROLS", "JacobianFrobenius", "KineticEnergy", "RegularizedFunc",
           "RegularizedSolution", "Regularizer", "SecondDerivative", "controls_step_size",
           "regularization_loss", "regularized_solve"]

ERROR_CONTROLS: tuple[str, ...] = ("state", "all")
"""Which components the step-size error norm sees: the user's state only (default) or the
state and the regularisation integrals."""

ESTIMATORS: tuple[str, ...] = ("exact", "hutchinson")
NOISE_KINDS: tuple[str, ...] = ("gaussian", "rademacher")
MAX_EXACT_DIM = 256
"""The largest per-sample state size for which the exact Jacobian norm is allowed (it costs
one vector-Jacobian product per dimension at every evaluation)."""


def _check_weight(weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
            not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


class _Evaluation:
    """What the integrands of one evaluation share: ``t``, the measured state ``z`` (a graph
    leaf or node that ``f`` was computed from), ``f``, whether the integrands must be
    differentiable (``create_graph``) and whether dimension 0 is the batch."""

    def __init__(self, t: Tensor, z: Tensor, f: Tensor, create_graph: bool, batched: bool):
        self.t, self.z, self.f = t, z, f
        self.create_graph = create_graph
        self.batched = batched

    def sum_squares(self, v: Tensor) -> Tensor:
        """Squared 2-norm per sample: ``(B, ...) -> (B,)`` (batched) or a 0-d tensor."""
        sq = v * v
        return sq.reshape(sq.shape[0], -1).sum(-1) if self.batched else sq.sum()

    def zeros(self) -> Tensor:
        shape = (self.z.shape[0],) if self.batched else ()
        return torch.zeros(shape, dtype=self.z.dtype, device=self.z.device)

    def vjp(self, v: Tensor, inputs: Sequence[Tensor]):
        """``v^T df/d(inputs)``; a None entry for an input ``f`` does not depend on."""
        if not self.f.requires_grad:
            return [None] * len(inputs)
        return torch.autograd.grad(self.f, list(inputs), grad_outputs=v,
                                   create_graph=self.create_graph, retain_graph=True,
                                   allow_unused=True)


class Regularizer:
    """One integrand ``r(t, z) >= 0`` integrated along the solve. ``name`` keys its integral
    in the results; ``weight`` is its factor in :func:`regularization_loss`."""

    name: str = "regularizer"

    def __init__(self, weight: float = 1.0, name: str | None = None):
        self.weight = _check_weight(weight)
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"name must be a non-empty string, got {name!r}")
            self.name = name

    def begin_solve(self, z0: Tensor, generator: torch.Generator | None) -> None:
        """Called once before every solve with the measured initial state (draws noise)."""

    def integrand(self, ev: _Evaluation) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight:g})"


class KineticEnergy(Regularizer):
    """``int ||f(t, z)||^2 dt`` (RNODE's kinetic energy). No extra derivative."""

    name = "kinetic"

    def integrand(self, ev: _Evaluation) -> Tensor:
        return ev.sum_squares(ev.f)


class JacobianFrobenius(Regularizer):
    """``int ||df/dz||_F^2 dt``.

    estimator: ``"exact"`` (one vector-Jacobian product per dimension of a sample's state;
        at most :data:`MAX_EXACT_DIM` dimensions) or ``"hutchinson"`` (``||eps^T df/dz||^2``
        with a probe ``eps`` drawn once per solve, Gaussian or Rademacher: unbiased, one
        vector-Jacobian product).

    Samples must be independent (row i of ``f`` depends on row i of ``z`` only), as for any
    per-sample trace or Jacobian computed by summing over the batch.
    """

    name = "jacobian_frobenius"

    def __init__(self, estimator: str = "hutchinson", noise: str = "gaussian",
                 weight: float = 1.0, name: str | None = None):
        super().__init__(weight, name)
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; valid choices are: "
                             f"{', '.join(ESTIMATORS)}")
        if noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {noise!r}; valid choices are: "
                             f"{', '.join(NOISE_KINDS)}")
        self.estimator, self.noise = estimator, noise
        self.eps: Tensor | None = None

    def begin_solve(self, z0: Tensor, generator: torch.Generator | None) -> None:
        if self.estimator == "exact":
            n = z0[0].numel() if z0.dim() >= 2 else z0.numel()
            if n > MAX_EXACT_DIM:
                raise ValueError(f"JacobianFrobenius('exact') costs one vector-Jacobian "
                                 f"product per state dimension; a sample has {n} > "
                                 f"{MAX_EXACT_DIM}: use estimator='hutchinson'")
            return
        if self.noise == "gaussian":
            self.eps = torch.randn(z0.shape, generator=generator, dtype=z0.dtype,
                                   device=z0.device)
        else:
            bits = torch.randint(0, 2, z0.shape, generator=generator, device=z0.device)
            self.eps = bits.to(z0.dtype) * 2.0 - 1.0

    def integrand(self, ev: _Evaluation) -> Tensor:
        if self.estimator == "hutchinson":
            if self.eps is None or self.eps.shape != ev.f.shape:
                raise RuntimeError("JacobianFrobenius('hutchinson'): no probe for this solve; "
                                   "call begin_solve(z0) first (regularized_solve and "
                                   "RegularizedFunc.begin_solve do)")
            (g,) = ev.vjp(self.eps.to(ev.f.dtype), [ev.z])
            return ev.zeros() if g is None else ev.sum_squares(g)
        f = ev.f.reshape(ev.f.shape[0], -1) if ev.batched else ev.f.reshape(1, -1)
        total = ev.zeros()
        for j in range(f.shape[1]):
            (g,) = ev.vjp(torch.zeros_like(f).index_fill_(1, torch.tensor([j], device=f.device),
                                                          1.0).reshape(ev.f.shape), [ev.z])
            if g is not None:
                total = total + ev.sum_squares(g)
        return total

    def __repr__(self) -> str:
        return (f"JacobianFrobenius(estimator={self.estimator!r}, noise={self.noise!r}, "
                f"weight={self.weight:g})")


class SecondDerivative(Regularizer):
    """``int ||d^2 z/dt^2||^2 dt`` with ``d^2 z/dt^2 = (df/dz) f + df/dt`` (TayNODE, order
    K = 2), by a double vector-Jacobian product (no forward-mode AD needed)."""

    name = "second_derivative"

    def integrand(self, ev: _Evaluation) -> Tensor:
        if not ev.f.requires_grad:
            return ev.zeros()
        t = ev.t
        u = torch.zeros_like(ev.f, requires_grad=True)
        gz, gt = torch.autograd.grad(ev.f, [ev.z, t], grad_outputs=u, create_graph=True,
                                     retain_graph=True, allow_unused=True)
        # h(u) = u^T ((df/dz) f + (df/dt) 1): linear in u, its gradient is d^2 z/dt^2
        h = u.new_zeros(())
        if gz is not None:
            h = h + (gz * ev.f).sum()
        if gt is not None:
            h = h + gt.sum()
        if not h.requires_grad:
            return ev.zeros()
        (acc,) = torch.autograd.grad(h, u, create_graph=ev.create_graph, retain_graph=True,
                                     allow_unused=True)
        return ev.zeros() if acc is None else ev.sum_squares(acc)


def _check_regularizers(regularizers: object) -> list[Regularizer]:
    if isinstance(regularizers, Regularizer):
        regularizers = [regularizers]
    if not isinstance(regularizers, (list, tuple)) or not regularizers:
        raise ValueError(f"regularizers must be a non-empty list of Regularizer objects "
                         f"(KineticEnergy(), JacobianFrobenius(), SecondDerivative()), got "
                         f"{regularizers!r}")
    out = []
    for r in regularizers:
        if not isinstance(r, Regularizer):
            raise TypeError(f"each regulariser must be a Regularizer (KineticEnergy(), "
                            f"JacobianFrobenius(), SecondDerivative()), got {r!r}")
        out.append(r)
    names = [r.name for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"regulariser names must be unique, {dup} repeat; pass name=... to "
                         f"tell them apart")
    return out


class RegularizedFunc(nn.Module):
    """``func`` with its state augmented by the regularisation integrals.

    ``forward(t, (*state, r_1, ..., r_k))`` returns ``(*func(t, state), integrand_1, ...)``,
    where ``state`` is the user's state (a tensor, or a tuple of ``n_state`` tensors) and the
    integrands are measured on its element ``component`` (default 0 for tuple states, e.g.
    ``z`` of a CNF's ``(z, logp)``). ``batched`` (default: the measured element has >= 2
    dimensions) says whether dimension 0 is the batch; each integral then has shape ``(B,)``.

    Call :meth:`begin_solve` with the initial state before every solve (draws Hutchinson
    probes); :func:`regularized_solve` does. The wrapped ``func`` is ``.func`` (its
    parameters are this module's, so the adjoint finds them).
    """

    def __init__(self, func: Callable, regularizers: Sequence[Regularizer], *,
                 n_state: int | None = None, component: int | None = None,
                 batched: bool | None = None):
        super().__init__()
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
        self.func = func
        self.regularizers = _check_regularizers(regularizers)
        if n_state is not None and (isinstance(n_state, bool) or not isinstance(n_state, int)
                                    or n_state < 1):
            raise ValueError(f"n_state must be None (tensor state) or the number of tuple "
                             f"elements >= 1, got {n_state!r}")
        self.n_state = n_state
        k = 0 if component is None else component
        if isinstance(k, bool) or not isinstance(k, int) or \
                not 0 <= k < (1 if n_state is None else n_state):
            raise ValueError(f"component must index the state's tuple elements (0..."
                             f"{(n_state or 1) - 1}), got {component!r}")
        self.component = k
        if batched is not None and not isinstance(batched, bool):
            raise TypeError(f"batched must be None, True or False, got {batched!r}")
        self.batched = batched

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.regularizers]

    def measured(self, state) -> Tensor:
        """The element of the user's state that the regularisers measure."""
        return state if self.n_state is None else state[self.component]

    def is_batched(self, z: Tensor) -> bool:
        return z.dim() >= 2 if self.batched is None else self.batched

    def initial_integrals(self, z0: Tensor) -> tuple[Tensor, ...]:
        shape = (z0.shape[0],) if self.is_batched(z0) else ()
        return tuple(torch.zeros(shape, dtype=z0.dtype, device=z0.device)
                     for _ in self.regularizers)

    def begin_solve(self, state0, generator: torch.Generator | None = None) -> None:
        """Prepare a solve from the user's initial state (draws fixed Hutchinson probes)."""
        z0 = self.measured(state0)
        for r in self.regularizers:
            r.begin_solve(z0, generator)

    def augment(self, state0, generator: torch.Generator | None = None) -> tuple:
        """``begin_solve`` and the augmented initial state ``(*state0, 0, ..., 0)``."""
        self.begin_solve(state0, generator)
        user = (state0,) if self.n_state is None else tuple(state0)
        return (*user, *self.initial_integrals(self.measured(state0)))

    def split(self, aug) -> tuple[Any, dict[str, Any]]:
        """Augmented result -> (user's state or tuple, {name: integral})."""
        n = 1 if self.n_state is None else self.n_state
        user = aug[0] if self.n_state is None else tuple(aug[:n])
        return user, dict(zip(self.names, aug[n:]))

    def forward(self, t: Tensor, aug: tuple) -> tuple:
        n = 1 if self.n_state is None else self.n_state
        if len(aug) != n + len(self.regularizers):
            raise ValueError(f"RegularizedFunc expects the state plus {len(self.regularizers)} "
                             f"integrals ({n + len(self.regularizers)} tensors), got {len(aug)}")
        user = list(aug[:n])
        differentiate = torch.is_grad_enabled()
        with torch.enable_grad():
            z = user[self.component]
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
                user[self.component] = z
            tt = t.detach().requires_grad_(True) if any(
                isinstance(r, SecondDerivative) for r in self.regularizers) else t
            out = self.func(tt, user[0] if self.n_state is None else tuple(user))
            outs = (out,) if self.n_state is None else tuple(out)
            ev = _Evaluation(tt, z, outs[self.component], differentiate, self.is_batched(z))
            rates = [r.integrand(ev) for r in self.regularizers]
        if not differentiate:
            outs = tuple(o.detach() for o in outs)
            rates = [r.detach() for r in rates]
        return (*outs, *rates)

    def extra_repr(self) -> str:
        return f"regularizers={self.regularizers}, component={self.component}"


def regularization_loss(integrals: dict[str, Tensor],
                        regularizers: Sequence[Regularizer]) -> Tensor:
    """``sum_i weight_i * mean(integral_i)`` (the term RNODE adds to the loss)."""
    total: Tensor | None = None
    for r in regularizers:
        term = r.weight * integrals[r.name].mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no regularisers")
    return total


@dataclass
class RegularizedSolution:
    """Result of :func:`regularized_solve`.

    ys: the user's solution at the output times (as ``solve``'s ``ys``);
    integrals: ``{name: value at the last output time}``, each ``(B,)`` (batched) or 0-d;
    trajectories: ``{name: value at every output time}``, ``(T, B)`` or ``(T,)``;
    solution: the solve's own result (augmented state), with ``stats`` and ``status``.
    """

    ys: Any
    integrals: dict[str, Tensor]
    trajectories: dict[str, Tensor]
    solution: Any = field(repr=False)

    @property
    def stats(self):
        return self.solution.stats

    def loss(self, regularizers: Sequence[Regularizer]) -> Tensor:
        """``sum weight * mean(integral)`` over ``regularizers``."""
        return regularization_loss(self.integrals, regularizers)


def state_norm(n_state: int | None, per_sample: bool,
               user_norm: Callable | None = None) -> Callable:
    """An error norm for the augmented state ``(*state, r_1, ...)`` that sees the user's
    state only: the user's norm applied to it, or the solver's default (RMS of the state;
    for tuple states the max over elements of each element's RMS)."""
    n = 1 if n_state is None else n_state

    def norm(scaled):
        parts = tuple(scaled[:n])
        if user_norm is not None:
            return user_norm(parts[0] if n_state is None else parts)
        vals = []
        for p in parts:
            if per_sample:
                m = p[0].numel() if p.shape[0] else 0
                if m:
                    vals.append(torch.linalg.vector_norm(p.reshape(p.shape[0], -1), dim=-1)
                                / math.sqrt(m))
            elif p.numel():
                vals.append(torch.linalg.vector_norm(p) / math.sqrt(p.numel()))
        if not vals:
            return parts[0].new_zeros(parts[0].shape[:1] if per_sample else ())
        return torch.stack(vals, -1).amax(-1)
    return norm


def _extend_tolerance(tol: Any, n_state: int | None, k: int, name: str) -> Any:
    """A tolerance of the user's state as one of the augmented tuple state."""
    if isinstance(tol, (int, float)) and not isinstance(tol, bool):
        return tol
    if isinstance(tol, torch.Tensor) and tol.numel() == 1:
        return tol
    user = [tol] if n_state is None else list(tol) if isinstance(tol, (list, tuple)) else None
    if user is None:
        raise ValueError(f"{name} for a tuple state must be a number or one value per element, "
                         f"got {tol!r}")
    smallest = min(float(torch.as_tensor(v).min()) for v in user)
    return [*user, *([smallest] * k)]


def controls_step_size(method: str | None) -> bool:
    """Whether ``method`` (``None``: the default, dopri5) is adaptive: with
    ``error_control="state"``, :func:`regularized_solve` keeps the integrals out of its
    step-size control, which the compiled solve cannot do."""
    method = method or "dopri5"
    method = ALIASES.get(method, method)
    return method in SOLVERS and "norm" in SOLVERS[method].OPTIONS


def regularized_solve(func: Callable, y0, t, regularizers: Sequence[Regularizer] | Regularizer,
                      *, component: int | None = None, batched: bool | None = None,
                      error_control: str = "state", generator: torch.Generator | None = None,
                      **solve_kwargs) -> RegularizedSolution:
    """``neuralode.solve(func, y0, t, **solve_kwargs)`` plus the regularisation integrals
    ``int_{t[0]}^{t} integrand(s, y(s)) ds`` of ``regularizers`` along the same solve.

    ``component``/``batched`` as for :class:`RegularizedFunc`; ``error_control``:
    ``"state"`` (default: the integrals do not drive the step size; the accepted steps are
    those of the plain solve) or ``"all"``; ``generator`` draws the Hutchinson probes.
    Everything else (``method``, ``rtol``, ``atol``, ``options``, ``gradient``,
    ``per_sample``, ...) goes to ``solve``; ``event_fn`` is not supported.
    """
    if error_control not in ERROR_CONTROLS:
        raise ValueError(f"unknown error_control {error_control!r}; valid choices are: "
                         f"{', '.join(ERROR_CONTROLS)}")
    if "event_fn" in solve_kwargs:
        raise ValueError("regularized_solve does not support event_fn")
    n_state = len(y0) if isinstance(y0, (tuple, list)) else None
    if n_state is None and not isinstance(y0, torch.Tensor):
        raise TypeError(f"y0 must be a tensor or a tuple of tensors, got {type(y0).__name__}")
    g = gradient_strategy(solve_kwargs.get("gradient"))
    if isinstance(g, Adjoint) and g.params is None and not isinstance(func, nn.Module):
        raise ODEInputError(  # (as solve's: the wrapper is a module, func's closure is not)
            f"regularized_solve(..., gradient={solve_kwargs['gradient']!r}) needs func to be "
            f"an nn.Module (to find the parameters to differentiate), got "
            f"{type(func).__name__}; pass gradient=Adjoint(params=(tensors...)) to "
            f"differentiate a plain callable")
    rfunc = func if isinstance(func, RegularizedFunc) else RegularizedFunc(
        func, _check_regularizers(regularizers), n_state=n_state, component=component,
        batched=batched)
    aug0 = rfunc.augment(tuple(y0) if n_state is not None else y0, generator)
    k = len(rfunc.regularizers)
    kwargs = dict(solve_kwargs)
    for name in ("rtol", "atol"):
        if name in kwargs:
            kwargs[name] = _extend_tolerance(kwargs[name], n_state, k, name)
    if error_control == "state":
        options = dict(kwargs.get("options") or {})
        user_norm = options.get("norm")
        if user_norm is not None and not callable(user_norm):
            raise ValueError(f"options['norm'] must be callable, got {user_norm!r}")
        method = kwargs.get("method") or "dopri5"
        method = ALIASES.get(method, method)
        if controls_step_size(method):
            if wants_compile(options):
                raise ODEInputError(
                    f"regularized_solve: the compiled solve (options['compile']) of the "
                    f"adaptive method {method!r} takes the default error norm over the whole "
                    f"state, so it cannot keep the regularisers' integrals out of the "
                    f"step-size control (error_control='state', the default): solve without "
                    f"'compile', pass error_control='all' (the integrals then drive the step "
                    f"size too), or use a fixed-grid method")
            options["norm"] = state_norm(n_state, bool(kwargs.get("per_sample", False)),
                                         user_norm)
            kwargs["method"] = method
            kwargs["options"] = options
    sol = solve(rfunc, aug0, t, **kwargs)
    user, trajectories = rfunc.split(sol.ys)
    integrals = {name: v[-1] for name, v in trajectories.items()}
    return RegularizedSolution(user, integrals, trajectories, sol)
