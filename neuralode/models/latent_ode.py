"""Latent ODE for irregularly sampled time series (Chen et al. 2018, section 5), its
ODE-RNN encoder (Rubanova et al. 2019) and an RNN baseline.

Generative model (a VAE whose decoder is an ODE in latent space)::

    z0 ~ N(0, I)                                     latent state at t0 (default 0)
    z(t) = ODESolve(f_theta, z0, t0, t)              f_theta: MLP latent dynamics
    x(t) ~ N(readout(z(t)), obs_std^2 I)             known observation noise

Recognition network: a GRU run *backwards in time* over the observations, fed the value,
the time since ``t0`` and the gap to the next observation at each step; its final hidden
state gives the Gaussian posterior ``q(z0 | x) = N(mu, diag(exp(logvar)))`` sampled with the
reparameterisation trick. The ODE-RNN encoder instead lets the hidden state evolve by an ODE
between observations. Training maximises the ELBO
``E_q[log p(x | z0)] - KL(q(z0 | x) || N(0, I))``; predictions decode the posterior mean.

Sequence inputs, shared by every model here:

* ``times``: ``(K,)`` shared by the batch or ``(B, K)`` per sequence;
* ``values``: ``(B, K, obs_dim)``;
* ``mask``: ``(B, K)`` bool, ``True`` where a point is observed (default: all). Padding
  entries (mask ``False``) are ignored whatever their time or value, so
  :class:`neuralode.data.spirals.IrregularBatch` and ``GridBatch`` both fit.

Within each sequence the observed times must be strictly increasing and ``>= t0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from neuralode import odeint
from neuralode.gradients import Checkpoint, Gradient, gradient_strategy
from neuralode.nn.layers import mlp
from neuralode.regularizers import RegularizedFunc, Regularizer, regularized_solve

__all__ = ["ELBOTerms", "GRUEncoder", "LatentDynamics", "LatentODE", "ODERNNEncoder", "RNNBaseline",
           "check_sequences", "gaussian_kl"]

ENCODERS = ("gru", "ode-rnn")
READOUT_ACTS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh}


class ELBOTerms(NamedTuple):
    """Batch means of the ELBO and its parts (per sequence: sums over points and dims)."""

    elbo: Tensor
    log_lik: Tensor
    kl: Tensor


# ----------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------


def check_sequences(times: Tensor, values: Tensor, mask: Tensor | None = None, *,
                    obs_dim: int | None = None, t0: float = 0.0
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Validate a batch of irregular sequences; return ``(times (B, K), values, mask)``.

    Raises ``ValueError``/``TypeError`` naming the offending sequence and position when shapes
    disagree, values or times are not finite, a sequence has no observation, observed times
    are not strictly increasing, or an observation precedes ``t0``.
    """
    if not isinstance(values, Tensor) or values.dim() != 3:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be a tensor of shape (B, K, obs_dim), got {shape}")
    b, k, d = values.shape
    if obs_dim is not None and d != obs_dim:
        raise ValueError(f"values have {d} channels but the model expects obs_dim={obs_dim}")
    if k == 0 or b == 0:
        raise ValueError(f"values must hold at least one sequence and one time, got shape "
                         f"{tuple(values.shape)}")
    if not values.is_floating_point():
        raise TypeError(f"values must be floating point, got {values.dtype}")
    if not isinstance(times, Tensor):
        raise TypeError(f"times must be a tensor of shape (K,) or (B, K), got "
                        f"{type(times).__name__}")
    if times.dim() == 1 and times.shape[0] == k:
        times = times.expand(b, k)
    elif times.shape != (b, k):
        raise ValueError(f"times must have shape ({k},) or ({b}, {k}) to match values "
                         f"{tuple(values.shape)}, got {tuple(times.shape)}")
    times = times.to(values.dtype)
    if mask is None:
        mask = torch.ones(b, k, dtype=torch.bool, device=values.device)
    else:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor of shape ({b}, {k}), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != (b, k):
            raise ValueError(f"mask must have shape ({b}, {k}), got {tuple(mask.shape)}")
    empty = (~mask.any(dim=1)).nonzero()
    if empty.numel():
        raise ValueError(f"sequence {int(empty[0])} has no observed point (mask all False); "
                         f"every sequence needs at least one")
    bad = (mask & ~torch.isfinite(times)).nonzero()
    if bad.numel():
        i, j = bad[0].tolist()
        raise ValueError(f"times[{i}, {j}] = {float(times[i, j])} is not finite")
    bad = (mask[..., None] & ~torch.isfinite(values)).any(-1).nonzero()
    if bad.numel():
        i, j = bad[0].tolist()
        raise ValueError(f"values[{i}, {j}] = {values[i, j].tolist()} is not finite")
    # previous observed time at each position (-inf if none) via a running max
    neg_inf = torch.full_like(times, -math.inf)
    observed = torch.where(mask, times, neg_inf)
    prev = torch.cat([neg_inf[:, :1], observed[:, :-1]], dim=1).cummax(dim=1).values
    bad = (mask & (times <= prev)).nonzero()
    if bad.numel():
        i, j = bad[0].tolist()
        raise ValueError(
            f"observation times must be strictly increasing within each sequence: sequence "
            f"{i} has times[{i}, {j}] = {float(times[i, j]):.6g} after an earlier observed "
            f"time {float(prev[i, j]):.6g}; sort each sequence by time (and drop duplicates)")
    bad = (mask & (times < t0)).nonzero()
    if bad.numel():
        i, j = bad[0].tolist()
        raise ValueError(f"times[{i}, {j}] = {float(times[i, j]):.6g} precedes t0 = {t0}; "
                         f"the latent state is defined at t0, before every observation")
    return times, values, mask


def _check_query_times(t: Tensor, t0: float) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() == 0:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"query times must be a non-empty 1-D tensor, got {shape}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("query times contain non-finite values")
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        j = int((t[1:] <= t[:-1]).nonzero()[0]) + 1
        raise ValueError(f"query times must be strictly increasing: t[{j}] = {float(t[j]):.6g}"
                         f" follows t[{j - 1}] = {float(t[j - 1]):.6g}")
    if float(t[0]) < t0:
        raise ValueError(f"query time {float(t[0]):.6g} precedes t0 = {t0}; the model "
                         f"predicts forward from t0")
    return t


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` summed over the last dim."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(-1)


# ----------------------------------------------------------------------------
# encoders
# ----------------------------------------------------------------------------


class GRUEncoder(nn.Module):
    """GRU recognition network run backwards in time over the observations.

    Step input: ``[x_k, t_k - t0, gap_k]`` with ``gap_k`` the time to the next observation of
    the same sequence (0 for the last one). Returns the posterior ``(mu, logvar)``, each
    ``(B, latent_dim)``.
    """

    def __init__(self, obs_dim: int, latent_dim: int, hidden: int = 25, t0: float = 0.0) -> None:
        super().__init__()
        self.obs_dim, self.latent_dim, self.hidden, self.t0 = obs_dim, latent_dim, hidden, t0
        self.cell = nn.GRUCell(obs_dim + 2, hidden)
        self.to_posterior = nn.Linear(hidden, 2 * latent_dim)

    def forward(self, times: Tensor, values: Tensor,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        times, values, mask = check_sequences(times, values, mask, obs_dim=self.obs_dim,
                                              t0=self.t0)
        b, k, _ = values.shape
        h = values.new_zeros(b, self.hidden)
        # time of the next observed point, starting from each sequence's last observed time
        last_idx = (mask * torch.arange(1, k + 1, device=mask.device)).argmax(dim=1)
        t_next = times.gather(1, last_idx[:, None]).squeeze(1)
        for j in range(k - 1, -1, -1):
            m = mask[:, j]
            tj = times[:, j]
            gap = torch.where(m, t_next - tj, torch.zeros_like(tj))
            inp = torch.cat([values[:, j], (tj - self.t0)[:, None], gap[:, None]], dim=-1)
            h = torch.where(m[:, None], self.cell(inp, h), h)
            t_next = torch.where(m, tj, t_next)
        mu, logvar = self.to_posterior(h).chunk(2, dim=-1)
        return mu, logvar


class ODERNNEncoder(nn.Module):
    """ODE-RNN recognition network (Rubanova et al. 2019), run backwards in time.

    The hidden state evolves by ``dh/dt = g(h)`` (an MLP) between consecutive observation
    times and jumps by a GRU update at each observation; finally it is evolved back to
    ``t0``. A batch with per-sequence times is put on the union of its observed times (all
    sequences evolve between union times; each one jumps only at its own observations).
    ``method``/``options`` choose the solver for each interval (default: one Euler step per
    interval, as cheap as the GRU; use e.g. ``"rk4"`` or ``"dopri5"`` for accuracy).
    """

    def __init__(self, obs_dim: int, latent_dim: int, hidden: int = 25, ode_hidden: int = 25,
                 t0: float = 0.0, method: str = "euler", options: dict | None = None,
                 rtol: float = 1e-3, atol: float = 1e-4) -> None:
        super().__init__()
        self.obs_dim, self.latent_dim, self.hidden, self.t0 = obs_dim, latent_dim, hidden, t0
        self.ode_func = LatentDynamics(hidden, ode_hidden, act=nn.Tanh)
        self.cell = nn.GRUCell(obs_dim, hidden)
        self.to_posterior = nn.Linear(hidden, 2 * latent_dim)
        self.method, self.options, self.rtol, self.atol = method, options, rtol, atol

    def _evolve(self, h: Tensor, t_from: Tensor, t_to: Tensor) -> Tensor:
        ts = torch.stack([t_from, t_to])
        return odeint(self.ode_func, h, ts, method=self.method, options=self.options,
                      rtol=self.rtol, atol=self.atol)[-1]

    def forward(self, times: Tensor, values: Tensor,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        times, values, mask = check_sequences(times, values, mask, obs_dim=self.obs_dim,
                                              t0=self.t0)
        b = values.shape[0]
        grid = torch.unique(times[mask])  # sorted union of observed times, (U,)
        pos = torch.searchsorted(grid, times.contiguous()).clamp(max=grid.numel() - 1)
        g_vals = values.new_zeros(b, grid.numel(), self.obs_dim)
        g_mask = torch.zeros(b, grid.numel(), dtype=torch.bool, device=mask.device)
        rows = torch.arange(b, device=mask.device)[:, None].expand_as(pos)
        g_vals[rows[mask], pos[mask]] = values[mask]
        g_mask[rows[mask], pos[mask]] = True

        h = values.new_zeros(b, self.hidden)
        # a sequence's state starts (at zero) at its own last observation
        started = torch.zeros(b, dtype=torch.bool, device=mask.device)
        for u in range(grid.numel() - 1, -1, -1):
            if u < grid.numel() - 1:
                h = torch.where(started[:, None], self._evolve(h, grid[u + 1], grid[u]), h)
            m = g_mask[:, u]
            h = torch.where(m[:, None], self.cell(g_vals[:, u], h), h)
            started = started | m
        if float(grid[0]) > self.t0:
            h = self._evolve(h, grid[0], grid.new_tensor(self.t0))
        mu, logvar = self.to_posterior(h).chunk(2, dim=-1)
        return mu, logvar


# ----------------------------------------------------------------------------
# latent ODE
# ----------------------------------------------------------------------------


class LatentDynamics(nn.Module):
    """Autonomous latent dynamics ``dz/dt = MLP(z)`` (two hidden layers)."""

    def __init__(self, latent_dim: int, hidden: int = 20, act: type[nn.Module] = nn.ELU) -> None:
        super().__init__()
        self.net = mlp([latent_dim, hidden, hidden, latent_dim], act)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z)


class LatentODE(nn.Module):
    """Latent ODE VAE for irregularly sampled time series.

    Args:
        obs_dim: data dimension ``D``.
        latent_dim: latent dimension ``L``.
        encoder: ``"gru"`` (GRU over observations and time gaps) or ``"ode-rnn"``.
        enc_hidden: encoder hidden size.
        ode_hidden: width of the latent dynamics MLP.
        dec_hidden: width of the readout MLP ``L -> dec_hidden -> D``; 0 (default) gives a
            linear readout, which extrapolated spirals far better than a ReLU MLP in our runs.
        readout_act: activation of the readout MLP: ``"relu"``, ``"elu"`` or ``"tanh"``.
        obs_std: known observation noise standard deviation used in the likelihood.
        t0: time of the latent initial state ``z0`` (at or before every observation).
        method, rtol, atol, options: solver for the latent ODE (see :func:`neuralode.odeint`).
        gradient: how the latent solve is differentiated (``neuralode.gradients``):
            "backprop" (default), "checkpoint", "adjoint", or a strategy object.
        union_grid: solve a batch with per-sequence times on the union of its times (the
            earlier behaviour) instead of each sequence on its own times (``per_sample``).
            ``gradient="checkpoint"`` always uses the union grid (per-sample solves are
            differentiated by backprop or the adjoint).
        regularizers: ``neuralode.regularizers`` objects integrated along every training
            solve of the latent ODE (training mode, gradients enabled) without driving its
            step size; ``last_regularization`` then holds ``{name: (B,) integral}`` and
            :meth:`regularization_loss` their weighted mean (:meth:`elbo` does not add it).

    ``nfe`` counts calls of the latent dynamics (forward solves; :meth:`reset_nfe` zeroes it).
    """

    def __init__(self, obs_dim: int = 2, latent_dim: int = 4, *, encoder: str = "gru",
                 enc_hidden: int = 25, ode_hidden: int = 20, dec_hidden: int = 0,
                 readout_act: str = "relu", obs_std: float = 0.1, t0: float = 0.0,
                 method: str = "dopri5", rtol: float = 1e-3, atol: float = 1e-4,
                 options: dict | None = None,
                 gradient: str | Gradient = "backprop", union_grid: bool = False,
                 regularizers: Sequence[Regularizer] | None = None) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; valid encoders are: "
                             f"{', '.join(ENCODERS)}")
        for name, v in (("obs_dim", obs_dim), ("latent_dim", latent_dim),
                        ("enc_hidden", enc_hidden), ("ode_hidden", ode_hidden)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(dec_hidden, int) or dec_hidden < 0:
            raise ValueError(f"dec_hidden must be an int >= 0 (0: linear readout), got "
                             f"{dec_hidden!r}")
        if readout_act not in READOUT_ACTS:
            raise ValueError(f"unknown readout_act {readout_act!r}; valid: "
                             f"{', '.join(READOUT_ACTS)}")
        if not (isinstance(obs_std, (int, float)) and math.isfinite(obs_std) and obs_std > 0):
            raise ValueError(f"obs_std must be a positive number, got {obs_std!r}")
        self.obs_dim, self.latent_dim, self.t0 = obs_dim, latent_dim, float(t0)
        self.obs_std = float(obs_std)
        if encoder == "gru":
            self.encoder: nn.Module = GRUEncoder(obs_dim, latent_dim, enc_hidden, t0=self.t0)
        else:
            self.encoder = ODERNNEncoder(obs_dim, latent_dim, enc_hidden, enc_hidden,
                                         t0=self.t0)
        self.dynamics = LatentDynamics(latent_dim, ode_hidden)
        self.readout = (nn.Linear(latent_dim, obs_dim) if dec_hidden == 0 else
                        mlp([latent_dim, dec_hidden, obs_dim], READOUT_ACTS[readout_act]))
        self.method, self.rtol, self.atol = method, rtol, atol
        self.options = options
        self.gradient = gradient_strategy(gradient)
        self.union_grid = union_grid or isinstance(self.gradient, Checkpoint)
        self.regularizers = list(regularizers or [])
        if self.regularizers:  # validated once (types, unique names)
            RegularizedFunc(self.dynamics, self.regularizers)
        self.last_regularization: dict[str, Tensor] | None = None
        self.nfe = 0
        self.dynamics.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if not torch.compiler.is_compiling():  # (a compiled solve counts its own calls)
            self.nfe += 1

    def reset_nfe(self) -> None:
        """Zero ``nfe``."""
        self.nfe = 0

    def regularization_loss(self) -> Tensor:
        """``sum weight * mean(integral)`` of the last training solve (a zero when none)."""
        zero = self.readout.weight.new_zeros(()) if isinstance(self.readout, nn.Linear) \
            else next(self.parameters()).new_zeros(())
        if not self.last_regularization:
            return zero
        return sum((r.weight * self.last_regularization[r.name].mean()
                    for r in self.regularizers), zero)

    def _odeint(self, z0: Tensor, ts: Tensor, per_sample: bool = False) -> Tensor:
        """The latent solve; with regularisers in training, also their integrals."""
        kwargs = dict(rtol=self.rtol, atol=self.atol, method=self.method, options=self.options,
                      gradient=self.gradient, per_sample=per_sample)
        self.last_regularization = None
        if self.regularizers and self.training and torch.is_grad_enabled():
            out = regularized_solve(self.dynamics, z0, ts, self.regularizers, **kwargs)
            self.last_regularization = out.integrals
            return out.ys
        return odeint(self.dynamics, z0, ts, **kwargs)

    def encode(self, times: Tensor, values: Tensor,
               mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Posterior ``(mu, logvar)`` of ``z0``, each ``(B, latent_dim)``."""
        return self.encoder(times, values, mask)

    def latent_trajectory(self, z0: Tensor, t: Tensor) -> Tensor:
        """``z(t)`` for every sequence: ``(B, T, latent_dim)`` at strictly increasing ``t``
        ``(T,)`` with ``t[0] >= t0``."""
        t = _check_query_times(t, self.t0).to(z0.dtype)
        prepend = float(t[0]) > self.t0
        ts = torch.cat([t.new_tensor([self.t0]), t]) if prepend else t
        zs = self._odeint(z0, ts)
        if prepend:
            zs = zs[1:]
        return zs.transpose(0, 1)

    def decode(self, z0: Tensor, t: Tensor) -> Tensor:
        """Mean of ``p(x(t) | z0)``: ``(B, T, obs_dim)`` at shared times ``t`` ``(T,)``."""
        return self.readout(self.latent_trajectory(z0, t))

    def decode_at(self, z0: Tensor, times: Tensor, mask: Tensor) -> Tensor:
        """Mean of ``p(x | z0)`` at per-sequence times ``(B, K)`` (entries where ``mask`` is
        False are filled with some value and should be ignored).

        Each sequence is solved on its own observation times (``per_sample=True``: its own
        steps, no union grid); with ``union_grid=True`` (the earlier behaviour, kept for
        comparison) one solve covers the union of the batch's times."""
        if self.union_grid:
            grid = torch.unique(times[mask])
            out = self.decode(z0, grid)  # (B, U, D)
            pos = torch.searchsorted(grid, times.contiguous()).clamp(max=grid.numel() - 1)
            return out.gather(1, pos[..., None].expand(*pos.shape, self.obs_dim))
        return self.readout(self.latent_at(z0, times, mask))

    def latent_at(self, z0: Tensor, times: Tensor, mask: Tensor) -> Tensor:
        """``z`` at per-sequence times ``(B, K)``: ``(B, K, latent_dim)`` from one per-sample
        solve whose row b holds t0, then filler times strictly between t0 and the sequence's
        first observation after t0 (for its unobserved entries: outputs cost no steps), then
        its observed times after t0."""
        b, k = times.shape
        t0 = self.t0
        tt = times.detach().to(torch.float64)
        after = mask & (tt > t0)
        n_pad = k - after.sum(1)  # entries without an output of their own after t0
        key = torch.where(after, tt, -math.inf)
        order = torch.argsort(key, dim=1, stable=True)
        sorted_t = key.gather(1, order)
        first = torch.where(after, tt, math.inf).amin(1)
        first = torch.where(torch.isfinite(first), first, t0 + 1.0)  # nothing after t0
        j = torch.arange(1, k + 1, device=times.device, dtype=torch.float64)[None]
        pads = t0 + (first - t0)[:, None] * j / (n_pad[:, None] + 1)
        row = torch.where(j <= n_pad[:, None], pads, sorted_t)
        ts = torch.cat([torch.full((b, 1), t0, dtype=torch.float64, device=times.device), row],
                       1)
        zs = self._odeint(z0, ts, per_sample=True)
        # the output of entry (b, j): 1 + its sorted position if observed after t0, else z0
        pos = torch.empty_like(order)
        pos.scatter_(1, order, torch.arange(k, device=times.device).expand(b, k))
        idx = torch.where(after, pos + 1, 0)  # (B, K)
        zs = zs.transpose(0, 1)  # (B, K + 1, L)
        return zs.gather(1, idx[..., None].expand(b, k, zs.shape[-1]))

    def elbo(self, times: Tensor, values: Tensor, mask: Tensor | None = None, *,
             kl_weight: float = 1.0, noise: Tensor | None = None) -> ELBOTerms:
        """One-sample reparameterised ELBO of the observations, averaged over the batch.

        ``log_lik`` sums ``log N(x; readout(z(t)), obs_std^2)`` over the observed points and
        dims of each sequence; ``elbo = log_lik - kl_weight * kl``. ``noise`` (B, latent_dim)
        is the standard normal sample of the reparameterisation (default: drawn with
        ``torch.randn``).
        """
        times, values, mask = check_sequences(times, values, mask, obs_dim=self.obs_dim,
                                              t0=self.t0)
        mu, logvar = self.encode(times, values, mask)
        if noise is None:
            noise = torch.randn_like(mu)
        elif noise.shape != mu.shape:
            raise ValueError(f"noise must have shape {tuple(mu.shape)}, got {tuple(noise.shape)}")
        z0 = mu + noise.to(mu) * (0.5 * logvar).exp()
        x_hat = self.decode_at(z0, times, mask)
        var = self.obs_std ** 2
        log_p = -0.5 * ((values - x_hat) ** 2 / var + math.log(2 * math.pi * var))
        log_lik = (log_p * mask[..., None].to(log_p.dtype)).sum(dim=(1, 2))
        kl = gaussian_kl(mu, logvar)
        elbo = log_lik - kl_weight * kl
        return ELBOTerms(elbo.mean(), log_lik.mean(), kl.mean())

    def predict(self, times: Tensor, values: Tensor, mask: Tensor | None, t_out: Tensor
                ) -> Tensor:
        """Posterior-mean prediction ``(B, T, obs_dim)`` at shared times ``t_out`` ``(T,)``
        from the observations; ``t_out`` may run past the last observation (extrapolation)."""
        mu, _ = self.encode(times, values, mask)
        return self.decode(mu, t_out)


# ----------------------------------------------------------------------------
# RNN baseline
# ----------------------------------------------------------------------------


class RNNBaseline(nn.Module):
    """GRU forecaster with time gaps as input (the baseline of the paper's Table 2).

    It reads the observations forward in time (step input ``[x_k, t_k - t_{k-1}]``, with
    ``t_{-1} = t0``) and predicts the value at a later time ``t`` from its state after the last
    observation before ``t`` and the gap: ``x̂(t) = readout([h, t - t_last])``. It is trained
    by one-step-ahead prediction of each observation (:meth:`loss`). Past the last
    observation it rolls forward autoregressively, feeding back its own forecasts at the
    sequence's mean observation spacing (:meth:`predict`).
    """

    def __init__(self, obs_dim: int = 2, hidden: int = 25, readout_hidden: int = 20,
                 t0: float = 0.0) -> None:
        super().__init__()
        if obs_dim < 1 or hidden < 1 or readout_hidden < 1:
            raise ValueError(f"obs_dim, hidden and readout_hidden must be >= 1, got "
                             f"{obs_dim}, {hidden}, {readout_hidden}")
        self.obs_dim, self.hidden, self.t0 = obs_dim, hidden, float(t0)
        self.h0 = nn.Parameter(torch.zeros(hidden))
        self.cell = nn.GRUCell(obs_dim + 1, hidden)
        self.readout = mlp([hidden + 1, readout_hidden, obs_dim], nn.Tanh)

    def _forecast(self, h: Tensor, gap: Tensor) -> Tensor:
        return self.readout(torch.cat([h, gap[:, None]], dim=-1))

    def _run(self, times: Tensor, values: Tensor, mask: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced pass: one-step predictions ``(B, K, D)`` and the states / last
        observed times *before* each position, ``(B, K+1, H)`` and ``(B, K+1)`` (index
        ``K`` is the state after the whole sequence)."""
        b, k, _ = values.shape
        h = self.h0.expand(b, self.hidden)
        t_last = times.new_full((b,), self.t0)
        preds, states, lasts = [], [h], [t_last]
        for j in range(k):
            m = mask[:, j]
            gap = times[:, j] - t_last
            preds.append(self._forecast(h, gap))
            inp = torch.cat([values[:, j], gap[:, None]], dim=-1)
            h = torch.where(m[:, None], self.cell(inp, h), h)
            t_last = torch.where(m, times[:, j], t_last)
            states.append(h)
            lasts.append(t_last)
        return torch.stack(preds, 1), torch.stack(states, 1), torch.stack(lasts, 1)

    def loss(self, times: Tensor, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean squared one-step-ahead error over the observed points (and dims)."""
        times, values, mask = check_sequences(times, values, mask, obs_dim=self.obs_dim,
                                              t0=self.t0)
        preds, _, _ = self._run(times, values, mask)
        w = mask[..., None].to(values.dtype)
        return (((preds - values) ** 2) * w).sum() / (w.sum() * self.obs_dim)

    def predict(self, times: Tensor, values: Tensor, mask: Tensor | None, t_out: Tensor
                ) -> Tensor:
        """Predictions ``(B, T, obs_dim)`` at shared times ``t_out`` ``(T,)``.

        Up to a sequence's last observation: forecast from the state after the last
        observation strictly before the query time. After it: roll forward
        autoregressively, feeding back its own forecasts every ``stride`` time units (the
        sequence's mean gap between observations, i.e. the spacing it was trained on), and
        forecast each query time from the latest roll-out state before it.
        """
        times, values, mask = check_sequences(times, values, mask, obs_dim=self.obs_dim,
                                              t0=self.t0)
        t_out = _check_query_times(t_out, self.t0).to(values.dtype)
        _, states, lasts = self._run(times, values, mask)
        b, k, _ = values.shape
        rows = torch.arange(b, device=mask.device)
        last_obs = lasts[:, -1]
        n_obs = mask.sum(dim=1)
        first_obs = torch.where(mask, times, torch.full_like(times, math.inf)).min(dim=1).values
        stride = torch.where(n_obs > 1, (last_obs - first_obs) / (n_obs - 1).clamp(min=1),
                             last_obs - self.t0).clamp(min=1e-3)
        pos_ids = torch.arange(1, k + 1, device=mask.device)
        roll_h, roll_t = states[:, -1], last_obs
        out = []
        for q in range(t_out.numel()):
            tq = t_out[q].expand(b)
            inside = tq <= last_obs
            # advance the roll-out of extrapolating sequences until tq is within one stride
            while True:
                adv = ~inside & (roll_t + stride < tq)
                if not bool(adv.any()):
                    break
                step = self._forecast(roll_h, stride)
                new_h = self.cell(torch.cat([step, stride[:, None]], dim=-1), roll_h)
                roll_h = torch.where(adv[:, None], new_h, roll_h)
                roll_t = torch.where(adv, roll_t + stride, roll_t)
            before = mask & (times < tq[:, None])
            p = (before * pos_ids).max(dim=1).values  # states index; 0 = no observation yet
            pred_in = self._forecast(states[rows, p], tq - lasts[rows, p])
            pred_ex = self._forecast(roll_h, tq - roll_t)
            out.append(torch.where(inside[:, None], pred_in, pred_ex))
        return torch.stack(out, 1)
