"""Continuous normalizing flows (Chen et al. 2018, sec. 4; Grathwohl et al. 2019, FFJORD).

A CNF moves points with an ODE dz/dt = f(t, z). Base samples z(0) ~ N(0, I) become data
x = z(T), and by the instantaneous change of variables (Chen et al., Theorem 1)

    d log p(z(t)) / dt = -tr(df / dz(t)),

so log p(x) = log N(z(0)) - int_0^T tr(df/dz) dt. The trace replaces the log-determinant of a
discrete flow, so any network f is allowed.

The joint state (z, a) with da/dt = tr(df/dz) is solved by ``odeint`` (differentiated as the
model's ``gradient`` says).
Integrating backwards from x at time T with a(T) = 0 gives z(0) and a(0) = -int_0^T tr dt, so

    log p(x) = log N(z(0)) + a(0).

The trace is computed exactly (D vector-Jacobian products, fine for small D) or by Hutchinson's
estimator tr(J) = E[eps^T J eps] (one vector-Jacobian product) with Gaussian or Rademacher
``eps`` drawn once per solve and held fixed during it (FFJORD, sec. 3.1), which keeps the
integrand a smooth ODE for the adaptive solver and keeps each log-density estimate unbiased.

Shapes: points are ``(N, D)``; log-densities and the trace accumulator are ``(N,)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from neuralode.compiled import wants_compile
from neuralode.gradients import Gradient, backward_nfe, gradient_strategy
from neuralode.odeint import odeint
from neuralode.regularizers import RegularizedFunc, Regularizer, regularized_solve

__all__ = ["ACTIVATIONS", "CNF", "ESTIMATORS", "NOISE_KINDS", "AugmentedDynamics",
           "ConcatMLPDynamics", "HyperNetDynamics", "check_steer", "divergence_exact",
           "divergence_hutchinson", "grid_log_prob", "sample_noise", "standard_normal_log_prob"]

ESTIMATORS: tuple[str, ...] = ("exact", "hutchinson")
"""Ways to compute tr(df/dz): ``exact`` (D vector-Jacobian products) or ``hutchinson``."""

NOISE_KINDS: tuple[str, ...] = ("gaussian", "rademacher")
"""Distributions of the Hutchinson probe vector ``eps`` (both have E[eps eps^T] = I)."""

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus,
                                           "elu": nn.ELU}
"""Smooth activations for :class:`ConcatMLPDynamics` (the trace's gradient needs f'')."""


def _check_choice(value: object, valid: Sequence[str], what: str) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid choices are: {', '.join(valid)}")
    return value


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _check_points(x: object, dim: int | None, what: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{what} must have shape (N, D), got {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} has {x.shape[1]} features but the flow has dim={dim}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
    return x


def check_steer(steer: object, t1: float) -> float:
    """STEER's half-width b: a number with 0 <= b < t1 (so that every end time is > 0)."""
    if isinstance(steer, bool) or not isinstance(steer, (int, float)) or \
            not (0 <= steer < abs(t1) and math.isfinite(steer)):
        raise ValueError(f"steer must be a number with 0 <= steer < |T| = {abs(t1):g} (end "
                         f"times are drawn from [T - steer, T + steer]), got {steer!r}")
    return float(steer)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension: ``(N, D) -> (N,)``."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * math.log(2.0 * math.pi)


def sample_noise(like: Tensor, kind: str = "gaussian",
                 generator: torch.Generator | None = None) -> Tensor:
    """A probe vector shaped like ``like``: standard Gaussian, or Rademacher (+-1 each w.p. 1/2).

    ``generator`` must live on ``like``'s device; ``None`` uses torch's global RNG.
    """
    _check_choice(kind, NOISE_KINDS, "noise kind")
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return bits.to(like.dtype) * 2.0 - 1.0


def _graph_vjp(dz: Tensor, z: Tensor, create_graph: bool):
    """``v -> v^T (d dz / d z)`` through the autograd graph from ``z`` to ``dz`` (zeros where
    ``dz`` does not depend on ``z``)."""
    def vjp(v: Tensor) -> Tensor:
        if not dz.requires_grad:  # dz depends on nothing that needs a gradient
            return torch.zeros_like(z)
        (g,) = torch.autograd.grad(dz, z, grad_outputs=v, create_graph=create_graph,
                                   retain_graph=True, allow_unused=True)
        return torch.zeros_like(z) if g is None else g
    return vjp


def trace_exact(vjp, z: Tensor) -> Tensor:
    """tr(J) per sample from ``vjp: v -> v^T J`` (block diagonal J of rows ``(N, D)``), with one
    product per dimension: the one-hot rows e_i give column i of each row's J^T."""
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    total = z.new_zeros(z.shape[0])
    for i in range(z.shape[1]):
        total = total + vjp(eye[i].expand(z.shape))[:, i]
    return total


def trace_hutchinson(vjp, noise: Tensor) -> Tensor:
    """Hutchinson's estimate eps^T J eps per sample from ``vjp: v -> v^T J``, one product."""
    return (vjp(noise) * noise).sum(-1)


def divergence_exact(dz: Tensor, z: Tensor, create_graph: bool) -> Tensor:
    """tr(d dz / d z) per sample, exactly, with one vector-Jacobian product per dimension.

    ``dz`` and ``z`` have shape ``(N, D)`` and row i of ``dz`` depends on row i of ``z`` only.
    Returns ``(N,)``.
    """
    return trace_exact(_graph_vjp(dz, z, create_graph), z)


def divergence_hutchinson(dz: Tensor, z: Tensor, noise: Tensor, create_graph: bool) -> Tensor:
    """Hutchinson's estimate eps^T (d dz / d z) eps per sample, one vector-Jacobian product.

    Unbiased for tr(d dz/dz) when E[eps eps^T] = I. Shapes ``(N, D)`` in, ``(N,)`` out.
    """
    return trace_hutchinson(_graph_vjp(dz, z, create_graph), noise)


# ---------------------------------------------------------------------------------------------
# dynamics f(t, z)
# ---------------------------------------------------------------------------------------------


class HyperNetDynamics(nn.Module):
    """The paper's gated, time-dependent CNF dynamics of width M (Chen et al. 2018, sec. 4.1):

        f(t, z) = (1/M) sum_m  (u_m(t) * sigmoid(g_m(t))) tanh(w_m(t) . z + b_m(t)),

    a sum of M planar-flow-like units whose parameters u, w, g (each (M, D)) and b ((M,)) are
    produced by a small hypernetwork of t (1 -> hidden -> hidden -> 3MD + M, tanh). Capacity
    grows with M, not only with depth; the trace is still one sum over units.
    """

    def __init__(self, dim: int = 2, width: int = 32, hidden: int = 32):
        super().__init__()
        self.dim = _check_positive_int(dim, "dim")
        self.width = _check_positive_int(width, "width")
        self.hidden = _check_positive_int(hidden, "hidden")
        n_out = 3 * width * dim + width
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, n_out))

    def unit_parameters(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(w (M, D), gated u (M, D), b (M,)) at time ``t`` (0-d tensor)."""
        m, d = self.width, self.dim
        p = self.net(t.reshape(1, 1).to(self.net[0].weight.dtype)).reshape(-1)
        w = p[: m * d].view(m, d)
        u = p[m * d: 2 * m * d].view(m, d)
        gate = torch.sigmoid(p[2 * m * d: 3 * m * d].view(m, d))
        b = p[3 * m * d:]
        return w, u * gate, b

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        w, u, b = self.unit_parameters(t)
        h = torch.tanh(z @ w.t() + b)  # (N, M)
        return (h @ u) / self.width

    def extra_repr(self) -> str:
        return f"dim={self.dim}, width={self.width}, hidden={self.hidden}"


class _ConcatLinear(nn.Module):
    """Linear layer on [x, t]: the time is appended to every layer's input."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in + 1, n_out)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.to(x.dtype).expand(x.shape[0], 1)
        return self.linear(torch.cat([x, tt], dim=1))


class ConcatMLPDynamics(nn.Module):
    """An MLP f(t, z) whose every layer sees [h, t] (FFJORD's "concat" layers).

    ``hidden`` lists the hidden widths, e.g. ``(64, 64, 64)``; ``activation`` is one of
    :data:`ACTIVATIONS` (smooth, because training differentiates the trace).
    """

    def __init__(self, dim: int = 2, hidden: Sequence[int] = (64, 64, 64),
                 activation: str = "tanh"):
        super().__init__()
        self.dim = _check_positive_int(dim, "dim")
        hidden = tuple(hidden)
        if not hidden:
            raise ValueError("hidden must list at least one hidden width, got ()")
        for h in hidden:
            _check_positive_int(h, "each hidden width")
        _check_choice(activation, tuple(ACTIVATIONS), "activation")
        sizes = (dim, *hidden, dim)
        self.layers = nn.ModuleList(_ConcatLinear(a, b) for a, b in itertools.pairwise(sizes))
        self.act = ACTIVATIONS[activation]()
        self.hidden, self.activation = hidden, activation

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        h = z
        for k, layer in enumerate(self.layers):
            h = layer(t, h)
            if k < len(self.layers) - 1:
                h = self.act(h)
        return h

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}"


# ---------------------------------------------------------------------------------------------
# the augmented ODE and the flow
# ---------------------------------------------------------------------------------------------


class AugmentedDynamics(nn.Module):
    """The joint ODE of a CNF on the state ``(z (N, D), a (N,))``:

        dz/dt = f(t, z),     da/dt = tr(df/dz)  (exact, or eps^T (df/dz) eps).

    One instance serves one solve: for ``hutchinson`` the probe ``noise`` (shaped like z) is
    fixed at construction and used at every evaluation of that solve. ``nfe`` counts calls
    (including those of an adjoint backward pass).
    """

    def __init__(self, dynamics: nn.Module, estimator: str = "exact",
                 noise: Tensor | None = None):
        super().__init__()
        _check_choice(estimator, ESTIMATORS, "divergence estimator")
        if estimator == "hutchinson" and noise is None:
            raise ValueError("the hutchinson estimator needs a fixed noise tensor shaped like z")
        self.dynamics = dynamics
        self.estimator = estimator
        self.noise = noise
        self.nfe = 0

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        z = state[0]
        if torch.compiler.is_compiling():
            # Inside a compiled solve's loop, torch 2.13 records no autograd graph in an
            # enable_grad block; torch.func's vjp is traced there, and its results carry the
            # caller's graph when it has one (the adjoint's backward pass, a checkpoint replay).
            # (A compiled solve counts its own calls.)
            dz, pullback = torch.func.vjp(lambda x: self.dynamics(t, x), z)
            div = self._trace(lambda v: pullback(v)[0], z)
            return dz, div
        self.nfe += 1
        # The trace's own graph is only needed when the caller differentiates (training, or the
        # adjoint's backward pass); under no_grad, z gets a private graph just for the trace.
        differentiate = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.dynamics(t, z)
            div = self._trace(_graph_vjp(dz, z, create_graph=differentiate), z)
        if not differentiate:
            dz, div = dz.detach(), div.detach()
        return dz, div

    def _trace(self, vjp, z: Tensor) -> Tensor:
        if self.estimator == "exact":
            return trace_exact(vjp, z)
        return trace_hutchinson(vjp, self.noise)


class CNF(nn.Module):
    """A continuous normalizing flow with a standard normal base on R^D.

    Args:
        dynamics: an ``nn.Module`` ``f(t, z)`` mapping ``(N, D) -> (N, D)``, e.g.
            :class:`HyperNetDynamics` or :class:`ConcatMLPDynamics`. Its ``dim`` attribute
            (if any) sets D; otherwise D comes from the data.
        t1: integration time T (base at t=0, data at t=T).
        train_time: learn T (parameterised as exp(log T), so it stays positive).
        estimator: ``"exact"`` or ``"hutchinson"`` (see :data:`ESTIMATORS`).
        noise: Hutchinson probe distribution, ``"gaussian"`` or ``"rademacher"``.
        method, rtol, atol, options: passed to the ODE solver.
        gradient: how the solve is differentiated (``neuralode.gradients``): "backprop"
            (default), "checkpoint" (the same gradient in little memory), "adjoint"
            (memory O(1) in the number of steps), or a strategy object.
        regularizers: ``neuralode.regularizers`` objects (``KineticEnergy()``,
            ``JacobianFrobenius()``, ``SecondDerivative()``) integrated along every training
            solve (module in training mode, gradients enabled) on ``z``, without driving the
            step size (RNODE, Finlay et al. 2020). After such a solve
            ``last_regularization`` holds ``{name: (N,) integral over [0, T]}`` and
            :meth:`regularization_loss` the weighted sum of their means, to add to the loss.
        steer: STEER (Ghosh et al. 2020): in training mode, each solve's end time is drawn
            uniformly from ``[T - steer, T + steer]`` (0 <= steer < T); in eval mode it is T.
            ``last_end_time`` holds the end time of the last solve.

    After every solve, ``last_stats`` holds the solver statistics (``.nfe`` and so on) and
    ``last_nfe`` the number of dynamics evaluations of that solve seen so far (an adjoint's
    backward pass adds to it when it runs).
    """

    def __init__(self, dynamics: nn.Module, *, t1: float = 1.0, train_time: bool = False,
                 estimator: str = "exact", noise: str = "gaussian", method: str = "dopri5",
                 rtol: float = 1e-5, atol: float = 1e-5, options: dict | None = None,
                 gradient: str | Gradient = "backprop",
                 regularizers: Sequence[Regularizer] | None = None, steer: float = 0.0):
        super().__init__()
        if not isinstance(dynamics, nn.Module):
            raise TypeError(f"dynamics must be an nn.Module f(t, z), got {type(dynamics).__name__}")
        if not (isinstance(t1, (int, float)) and not isinstance(t1, bool) and t1 > 0
                and math.isfinite(t1)):
            raise ValueError(f"t1 must be a positive finite number, got {t1!r}")
        self.dynamics = dynamics
        self.dim: int | None = getattr(dynamics, "dim", None)
        self.estimator = _check_choice(estimator, ESTIMATORS, "divergence estimator")
        self.noise = _check_choice(noise, NOISE_KINDS, "noise kind")
        self.train_time = bool(train_time)
        log_t1 = torch.tensor(math.log(float(t1)))
        if self.train_time:
            self.log_t1 = nn.Parameter(log_t1)
        else:
            self.register_buffer("log_t1", log_t1)
        self.method, self.rtol, self.atol = method, rtol, atol
        self.options = dict(options or {})
        self.gradient = gradient_strategy(gradient)
        self.regularizers = list(regularizers or [])
        if self.regularizers:  # validated once (names, types)
            RegularizedFunc(self.dynamics, self.regularizers, n_state=2)
        self.steer = check_steer(steer, float(t1))
        self.last_stats = None
        self.last_regularization: dict[str, Tensor] | None = None
        self.last_end_time: float | None = None
        # Kept out of the module tree: it is bookkeeping, not part of the model's state.
        object.__setattr__(self, "_last_func", None)

    # -- time ----------------------------------------------------------------------------------

    @property
    def end_time(self) -> Tensor:
        """T, a 0-d tensor (differentiable when ``train_time``)."""
        return self.log_t1.exp()

    @property
    def last_nfe(self) -> int:
        if self._last_func is None:
            return 0
        if wants_compile(self.options) and self.last_stats is not None:
            # a compiled loop's calls (forward, a compiled backward) are in its statistics only
            return self.last_stats.nfe + backward_nfe(self.last_stats)
        return self._last_func.nfe

    # -- core solve ----------------------------------------------------------------------------

    def _solve(self, z: Tensor, times: Tensor, estimator: str | None,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Integrate the joint state, from ``(z, 0)``, through ``times``; returns
        (len(times), N, D), (len, N)."""
        est = self.estimator if estimator is None else _check_choice(
            estimator, ESTIMATORS, "divergence estimator")
        noise = sample_noise(z, self.noise, generator) if est == "hutchinson" else None
        func = AugmentedDynamics(self.dynamics, est, noise)
        object.__setattr__(self, "_last_func", func)
        self.last_regularization = None
        if self.regularizers and self.training and torch.is_grad_enabled():
            out = regularized_solve(func, (z, z.new_zeros(z.shape[0])), times,
                                    self.regularizers, component=0, generator=generator,
                                    rtol=self.rtol, atol=self.atol, method=self.method,
                                    options=self.options or None, gradient=self.gradient)
            # the integrals over [0, T], whichever way the solve ran
            sign = 1.0 if float(times[-1]) >= float(times[0]) else -1.0
            self.last_regularization = {k: sign * v for k, v in out.integrals.items()}
            self.last_stats = out.stats
            zs, as_ = out.ys
            return zs, as_
        (zs, as_), self.last_stats = odeint(
            func, (z, z.new_zeros(z.shape[0])), times, rtol=self.rtol, atol=self.atol,
            method=self.method, options=self.options or None, return_stats=True,
            gradient=self.gradient)
        return zs, as_

    def _time_grid(self, start: Tensor | float, stop: Tensor | float) -> Tensor:
        ref = self.log_t1
        start = torch.as_tensor(start, dtype=ref.dtype, device=ref.device)
        stop = torch.as_tensor(stop, dtype=ref.dtype, device=ref.device)
        return torch.stack([start, stop])

    def regularization_loss(self) -> Tensor:
        """``sum weight * mean(integral)`` of the last training solve's regularisers (a zero
        when there are none or the last solve was not a training solve)."""
        if not self.last_regularization:
            return self.log_t1.new_zeros(())
        return sum((r.weight * self.last_regularization[r.name].mean()
                    for r in self.regularizers), self.log_t1.new_zeros(()))

    def training_end_time(self, generator: torch.Generator | None = None) -> Tensor:
        """T in eval mode; in training mode with ``steer`` > 0, T + steer * U(-1, 1)."""
        end = self.end_time
        if self.training and self.steer > 0:
            dev = generator.device if generator is not None else end.device
            u = torch.rand((), generator=generator, device=dev).to(end)
            end = end + self.steer * (2.0 * u - 1.0)
        self.last_end_time = float(end.detach())
        return end

    def _resolve_time(self, time: float | Tensor | None,
                      generator: torch.Generator | None = None) -> Tensor | float:
        if time is None:
            return self.training_end_time(generator)
        try:
            value = float(time.detach()) if isinstance(time, Tensor) else float(time)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"time must be a finite number >= 0, got {time!r}") from None
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"time must be a finite number >= 0, got {time!r}")
        return time

    # -- public API ----------------------------------------------------------------------------

    def encode(self, x: Tensor, *, time: float | Tensor | None = None,
               estimator: str | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Map points x at time ``time`` (default T) back to the base: returns ``(z0, a0)`` with
        ``log p_time(x) = log N(z0) + a0`` (``a0 = -int_0^time tr(df/dz) dt``)."""
        x = _check_points(x, self.dim)
        time = self._resolve_time(time, generator)
        if not isinstance(time, Tensor) and float(time) == 0.0:
            return x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        zs, as_ = self._solve(x, self._time_grid(time, 0.0).to(x.dtype), estimator, generator)
        return zs[-1], as_[-1]

    def decode(self, z0: Tensor, *, estimator: str | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Map base points z0 forward to data space: returns ``(x, aT)`` with
        ``log q(x) = log N(z0) - aT`` (``aT = int_0^T tr(df/dz) dt``)."""
        z0 = _check_points(z0, self.dim, "z0")
        zs, as_ = self._solve(z0, self._time_grid(0.0, self.training_end_time(generator))
                              .to(z0.dtype), estimator, generator)
        return zs[-1], as_[-1]

    def log_prob(self, x: Tensor, *, time: float | Tensor | None = None,
                 estimator: str | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """log-density ``(N,)`` of points ``x (N, D)`` under the flow (at time ``time``, default
        T; the marginal of z(time) when z(0) ~ N(0, I))."""
        z0, a0 = self.encode(x, time=time, estimator=estimator, generator=generator)
        return standard_normal_log_prob(z0) + a0

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`log_prob` with the module's estimator."""
        return self.log_prob(x)

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               estimator: str | None = None, return_log_prob: bool = False):
        """Draw ``n`` samples ``(n, D)`` by integrating base samples forward from 0 to T.

        With ``return_log_prob``, also returns their log-density ``(n,)`` (at no extra solve).
        """
        n = _check_positive_int(n, "n")
        if self.dim is None:
            raise ValueError("this CNF's dynamics has no `dim` attribute; use decode(z0) instead")
        ref = next(iter(self.parameters()), self.log_t1)
        dtype = dtype or ref.dtype
        device = device or ref.device
        z0 = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=device)
        x, a = self.decode(z0, estimator=estimator, generator=generator)
        if return_log_prob:
            return x, standard_normal_log_prob(z0) - a
        return x

    def trajectory(self, z0: Tensor, n_times: int = 5) -> tuple[Tensor, Tensor, Tensor]:
        """Follow base points to the data: returns ``(times (K,), z (K, N, D), log q (K, N))``
        at K = ``n_times`` equally spaced times in [0, T], with exact traces."""
        z0 = _check_points(z0, self.dim, "z0")
        if _check_positive_int(n_times, "n_times") < 2:
            raise ValueError(f"n_times must be >= 2 (the start and the end), got {n_times}")
        times = self.end_time.detach().to(z0.dtype) * torch.linspace(
            0.0, 1.0, n_times, dtype=z0.dtype, device=z0.device)
        zs, as_ = self._solve(z0, times, "exact", None)
        return times, zs, standard_normal_log_prob(z0)[None] - as_

    @torch.no_grad()
    def log_prob_grid(self, lim: float = 4.0, n: int = 100, *, time: float | None = None,
                      batch_size: int = 4096, dtype: torch.dtype | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """Exact log-density on an ``n x n`` grid over ``[-lim, lim]^2`` (2-D flows).

        Returns ``(xs (n,), ys (n,), logp (n, n))`` with ``logp[i, j]`` at ``(xs[j], ys[i])``.
        """
        if self.dim not in (None, 2):
            raise ValueError(f"log_prob_grid is for 2-D flows, this one has dim={self.dim}")
        ref = next(iter(self.parameters()), self.log_t1)
        dtype = dtype or ref.dtype
        return grid_log_prob(lambda p: self.log_prob(p, time=time, estimator="exact"),
                             lim, n, batch_size, dtype, ref.device)


def grid_log_prob(log_prob, lim: float, n: int, batch_size: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Evaluate ``log_prob((M, 2)) -> (M,)`` on an ``n x n`` grid over ``[-lim, lim]^2``."""
    if not (lim > 0 and math.isfinite(lim)):
        raise ValueError(f"lim must be a positive finite number, got {lim!r}")
    _check_positive_int(n, "n")
    _check_positive_int(batch_size, "batch_size")
    xs = torch.linspace(-lim, lim, n, dtype=dtype, device=device)
    gy, gx = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    out = torch.cat([log_prob(chunk) for chunk in pts.split(batch_size)])
    return xs, xs.clone(), out.view(n, n)
