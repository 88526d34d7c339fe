"""Stiff kinetics: recover Robertson's three rate constants from noisy observations.

``neuralode train stiff --method rodas5p --iters 150``

Robertson's reactions A -> B (k1 = 0.04), B + B -> C + B (k2 = 3e7), B + C -> A + C
(k3 = 1e4) are the classic stiff system: its time scales span 1e-4 to 1e5. The model is the
same ODE (``neuralode.problems.Robertson``) with unknown constants, parameterised by
their logarithms, and every training step integrates it over the whole span with a stiff
solver (``--method``) and differentiates the solve as ``--gradient`` says (``backprop``: the
discrete solution's gradient, the default; ``checkpoint``: the same in little memory;
``adjoint``: the adjoint method).

1. Data: the true solution (scipy Radau at rtol 1e-10) at ``--n-obs`` times spaced evenly
   in log t over [``--t-min``, ``--t-max``] (default 1e-4 to 1e5), every species observed
   with multiplicative log-normal noise, ``obs = y * exp(noise * eps)`` (``--noise``,
   default 1%; a private generator seeded with ``--seed``).
2. Start: every constant off by a random factor of up to 10^``--init-spread`` (default 1:
   up to 10x too large or too small; seeded with ``--seed``).
3. Loss: the mean of squared normalised log residuals ``((log pred - log obs) / noise)^2``
   (the negative log-likelihood of the log-normal noise, up to constants; about 1 at the
   noise level; with ``--noise 0`` the plain squared log residuals). Log residuals keep the
   loss nearly quadratic in log k (concentrations follow powers of the constants, e.g.
   y2 ~ sqrt(k1 / k2) early on). Adam on log k, cosine-decayed learning rate.
4. Result: the recovered constants against the truth (relative errors); and, to judge them
   against what the noise allows, the maximum-likelihood estimate (Gauss-Newton on the
   reference solver, started from the trained constants) with its standard errors (from the
   residuals' sensitivities to log k by central differences): the truth's distance from
   the MLE in standard errors shows the noise, the trained constants' distance from the
   MLE shows how far training got.

Outputs in ``--out``: ``metrics.csv`` (per iteration: loss, constants, relative errors,
NFE), ``metrics.json`` (final), ``checkpoint.pt`` (atomic; ``--resume`` continues exactly)
and ``stiff.png`` (observations, truth and fit over log t; the constants during training).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from neuralode import odeint
from neuralode.experiments import runner
from neuralode.experiments.runner import (
    DistEnv,
    Experiment,
    StepOutput,
    UsageError,
    check_rtol,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    pyplot,
    save_figure,
)
from neuralode.problems import Robertson

# The stiff method used unless --method says otherwise (one line to switch).
DEFAULT_METHOD = "rodas5p"
TRUE_K = Robertson.defaults
TRUE_LOG_K = torch.log(torch.tensor(TRUE_K, dtype=torch.float64))
K_NAMES = Robertson.constant_names
RUN_KEYS = ("method", "gradient", "rtol", "atol", "iters", "lr", "n_obs", "t_min", "t_max", "noise",
            "init_spread", "seed")
F64 = torch.float64
_TRUTH = Robertson()  # its reference solutions are cached in memory


@dataclass(frozen=True)
class Observations:
    """``t`` (T,) observation times, ``clean`` and ``noisy`` (T, 3) species, float64."""

    t: Tensor
    clean: Tensor
    noisy: Tensor


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    runner.add_method_argument(parser, DEFAULT_METHOD, "stiff ODE solver for training")
    runner.add_gradient_argument(parser, "backprop")
    runner.add_tolerance_arguments(parser, "the training solves", "1e-6", "1e-12",
                                   "absolute tolerance (default 1e-12: y2 is about 1e-5 to 1e-7)")
    a("--iters", type=positive_int, default=150,
      help="training iterations (default 150); --resume with a larger value extends a "
           "finished run")
    a("--lr", type=positive_float, default=0.1,
      help="Adam learning rate on log k, cosine-decayed to 5%% of it (default 0.1)")
    a("--n-obs", type=positive_int, default=46, help="observation times (default 46)")
    a("--t-min", type=positive_float, default=1e-4, help="first observation time")
    a("--t-max", type=positive_float, default=1e5, help="last observation time (end of the "
                                                         "span)")
    a("--noise", type=nonnegative_float, default=0.01,
      help="relative (log-normal) observation noise (default 0.01)")
    a("--init-spread", type=nonnegative_float, default=1.0,
      help="initial guess: each constant off by 10^u, u ~ U(-spread, spread) (default 1)")
    a("--mle-steps", type=nonnegative_int, default=6,
      help="Gauss-Newton steps of the maximum-likelihood check at the end (0: skip it; "
           "default 6)")
    a("--eval-every", type=positive_int, default=25,
      help="also log the NFE and steps of the training solve every N iterations")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    if args.t_min >= args.t_max:
        raise UsageError(f"--t-min ({args.t_min:g}) must be smaller than --t-max "
                         f"({args.t_max:g})")
    if args.n_obs < 2:
        raise UsageError(f"--n-obs must be >= 2, got {args.n_obs}")
    check_rtol(args.rtol, F64)
    if DistEnv.from_env().world_size > 1:
        raise UsageError("train stiff fits one trajectory with three parameters; run it in "
                         "one process (not under torchrun)")
    return {k: getattr(args, k) for k in RUN_KEYS}


def make_observations(n_obs: int = 46, t_min: float = 1e-4, t_max: float = 1e5,
                      noise: float = 0.01, seed: int = 0) -> Observations:
    """The true Robertson solution at ``n_obs`` log-spaced times in [t_min, t_max]
    (scipy Radau, rtol 1e-10) times ``exp(noise * eps)``, eps ~ N(0, 1) per value."""
    if not 0 < t_min < t_max or n_obs < 2:
        raise ValueError(f"need 0 < t_min < t_max and n_obs >= 2, got t_min={t_min}, "
                         f"t_max={t_max}, n_obs={n_obs}")
    t = torch.logspace(math.log10(t_min), math.log10(t_max), n_obs, dtype=F64)
    clean = _TRUTH.reference(t, rtol=1e-10)
    g = torch.Generator().manual_seed(seed)
    noisy = clean * torch.exp(noise * torch.randn(clean.shape, generator=g, dtype=F64))
    return Observations(t=t, clean=clean, noisy=noisy)


def initial_guess(spread: float, seed: int) -> Tensor:
    """log k of the start: the true log k plus ln(10) * U(-spread, spread) per constant."""
    g = torch.Generator().manual_seed(seed + 1)
    u = 2 * torch.rand(3, generator=g, dtype=F64) - 1
    return TRUE_LOG_K + math.log(10.0) * spread * u


LOG_FLOOR = 1e-30  # a solver's non-positive concentration counts as this (not as nan)


def normalised_residuals(pred: Tensor, obs: Tensor, noise: float) -> Tensor:
    """(log pred - log obs) / noise (noise 0: plain log residuals)."""
    return (pred.clamp_min(LOG_FLOOR).log() - obs.log()) / (noise if noise > 0 else 1.0)


def _sensitivities(log_k: Tensor, data: Observations, noise: float, h: float = 1e-3,
                   with_residuals: bool = False) -> tuple[Tensor, Tensor | None]:
    """J (3 columns): the sensitivities of the normalised log residuals to log k, by central
    differences of the reference solution (scipy Radau, rtol 1e-9: the differences are then
    accurate to about 1e-6 relative); and the residuals at ``log_k`` if asked."""
    times = torch.cat([torch.zeros(1, dtype=F64), data.t])
    scale = noise if noise > 0 else 1.0

    def log_solution(lk: Tensor) -> Tensor:
        return Robertson(*lk.exp().unbind()).reference(times, rtol=1e-9)[1:].log()

    cols = []
    for i in range(3):
        ys = []
        for s in (1.0, -1.0):
            lk = log_k.detach().clone()
            lk[i] += s * h
            ys.append(log_solution(lk))
        cols.append(((ys[0] - ys[1]) / (2 * h * scale)).reshape(-1))
    res = None
    if with_residuals:
        res = ((log_solution(log_k.detach()) - data.noisy.log()) / scale).reshape(-1)
    return torch.stack(cols, 1), res


def std_errors(log_k: Tensor, data: Observations, noise: float, h: float = 1e-3) -> Tensor:
    """Gauss-Newton standard errors of log k: sqrt(diag((J^T J)^-1)), J from
    :func:`_sensitivities`."""
    J, _ = _sensitivities(log_k, data, noise, h)
    return torch.linalg.inv(J.T @ J).diagonal().sqrt()


def maximum_likelihood(log_k: Tensor, data: Observations, noise: float, steps: int = 6,
                       tol: float = 1e-7) -> tuple[Tensor, Tensor, float]:
    """The maximum-likelihood log k (what the data allow, independent of how training went):
    Gauss-Newton on the normalised log residuals of the reference solver, from ``log_k``.
    Returns (log k, its standard errors, the mean squared residual there)."""
    lk = log_k.detach().clone().to(F64)
    for _ in range(steps):
        J, r = _sensitivities(lk, data, noise, with_residuals=True)
        step = torch.linalg.lstsq(J, -r[:, None]).solution[:, 0]
        if not bool(torch.isfinite(step).all()):
            raise ValueError("Gauss-Newton produced a non-finite step (the residuals' "
                             "sensitivities are singular or non-finite)")
        step = step / max(1.0, float(step.abs().max()))  # at most a factor e per step
        lk = lk + step
        if float(step.abs().max()) < tol:
            break
    J, r = _sensitivities(lk, data, noise, with_residuals=True)
    return lk, torch.linalg.inv(J.T @ J).diagonal().sqrt(), float(r.pow(2).mean())


class StiffExperiment(Experiment):
    """``neuralode train stiff`` on the shared runner."""

    name = "stiff"
    description = (
        "Recover the three rate constants of Robertson's reactions, the classic stiff system "
        "(time scales from 1e-4 to 1e5), from noisy observations of its three species. Every "
        "iteration integrates the model over the whole span with a stiff solver (--method) "
        "and takes an Adam step on the log constants. At the end it reports the recovered "
        "constants against the truth, with the maximum-likelihood estimate and its standard "
        "errors to judge them by, and writes metrics, a checkpoint and stiff.png to --out.")
    run_keys = RUN_KEYS
    length_key = "iters"
    default_threads = 1
    default_ckpt_every = 25

    add_arguments = staticmethod(_add_arguments)
    configure = staticmethod(_config)

    def progress_label(self, steps_done: int) -> str:
        return f"stiff {self.run.config['method']}"

    def setup(self) -> None:
        run, cfg = self.run, self.run.config
        self.data = make_observations(cfg["n_obs"], cfg["t_min"], cfg["t_max"], cfg["noise"],
                                      seed=cfg["seed"])
        self.log_k0 = initial_guess(cfg["init_spread"], cfg["seed"])
        self.model = Robertson(*self.log_k0.exp().unbind(), log=True, learnable=True)
        self.model.to(run.device)
        self.times = torch.cat([torch.zeros(1, dtype=F64), self.data.t]).to(run.device)
        self.obs = self.data.noisy.to(run.device)
        self.adam_cosine(0.05)

    def _solve(self, with_stats: bool = False):
        cfg = self.run.config
        y0 = self.model.initial_state()
        kwargs = {"rtol": cfg["rtol"], "atol": cfg["atol"], "method": cfg["method"],
                  "options": self.run.options(cfg["method"]), "gradient": cfg["gradient"]}
        if with_stats:
            ys, stats = odeint(self.model, y0, self.times, return_stats=True, **kwargs)
            return ys[1:], stats
        return odeint(self.model, y0, self.times, **kwargs)[1:], None

    def _row_constants(self) -> dict[str, float]:
        k = self.model.constants.detach().cpu()
        row: dict[str, Any] = {}
        for name, v, true in zip(K_NAMES, k.tolist(), TRUE_K):
            row[name] = v
            row[f"{name}_rel_err"] = abs(v / true - 1)
        return row

    def train_step(self, step: int) -> StepOutput:
        it = step + 1
        pred, stats = self._solve(with_stats=self.eval_due(it) or it == 1)
        value = self.optimizer_step(
            normalised_residuals(pred, self.obs, self.run.config["noise"]).pow(2).mean())
        row = self.metrics_row(it, value)
        row.update(self._row_constants())
        if stats is not None:
            row.update(nfe=stats.nfe, steps=stats.n_steps)
        worst = max(row[f"{n}_rel_err"] for n in K_NAMES)
        return StepOutput(value, row, {"loss": value, "max_rel_err": worst})

    def finish(self) -> dict[str, Any]:
        cfg, rows = self.run.config, self.run.history
        with torch.no_grad():
            pred, stats = self._solve(with_stats=True)
            loss = normalised_residuals(pred, self.obs, cfg["noise"]).pow(2).mean().item()
            clean = self.data.clean.to(pred.device)
            fit_err = ((pred - clean) / clean).abs().max().item()
        log_k = self.model.constants_param.detach().cpu()
        final: dict[str, Any] = {
            "iters": cfg["iters"], "train_time_s": round(self.run.elapsed(), 2),
            "final_loss": loss, "fit_max_rel_err_vs_truth": fit_err,
            "nfe_final_solve": stats.nfe, "steps_final_solve": stats.n_steps,
            "true_k": list(TRUE_K), "initial_k": self.log_k0.exp().tolist(),
            "k": log_k.exp().tolist(), "config": cfg}
        final.update(self._row_constants())
        if cfg["noise"] > 0 and self.run.args.mle_steps > 0:
            try:
                mle, se, mle_loss = maximum_likelihood(log_k, self.data, cfg["noise"],
                                                       steps=self.run.args.mle_steps)
            except (RuntimeError, ValueError) as e:  # a singular J^T J: say so, don't fail
                final["std_err_log_k"] = None
                final["std_err_note"] = str(e).splitlines()[0]
            else:
                final["std_err_log_k"] = se.tolist()
                final["z_scores"] = ((log_k - TRUE_LOG_K) / se).tolist()
                final["mle_k"] = mle.exp().tolist()
                final["mle_loss"] = mle_loss
                final["mle_rel_err"] = (mle - TRUE_LOG_K).exp().sub(1).abs().tolist()
                final["mle_z_scores"] = ((mle - TRUE_LOG_K) / se).tolist()
                final["trained_vs_mle_z"] = ((log_k - mle) / se).tolist()
        final["history_loss_first_last"] = [rows[0]["loss"], rows[-1]["loss"]] if rows else None
        return final

    def plot(self, final: dict[str, Any]) -> list[str]:
        plt = pyplot()
        cfg, rows = self.run.config, self.run.history
        with torch.no_grad():
            pred = self._solve()[0].cpu()
        t, clean, noisy = self.data.t, self.data.clean, self.data.noisy
        fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.4))
        ax = axes[0]
        scale = (1.0, 1e4, 1.0)
        for i, (s, c) in enumerate(zip(scale, ("C0", "C1", "C2"))):
            label = f"y{i + 1}" + (" x 1e4" if s != 1.0 else "")
            ax.plot(t, noisy[:, i] * s, "o", ms=3, c=c, alpha=0.6, label=f"{label} observed")
            ax.plot(t, clean[:, i] * s, "-", c=c, lw=1.0)
            ax.plot(t, pred[:, i] * s, "--", c="k", lw=0.9)
        ax.set_xscale("log")
        ax.set_xlabel("t")
        ax.set_title("Robertson: observations, truth (lines), fit (dashed)")
        ax.legend(fontsize=7, loc="center left")
        ax = axes[1]
        its = [r["iter"] for r in rows]
        for name, true, c in zip(K_NAMES, TRUE_K, ("C0", "C1", "C2")):
            ax.plot(its, [math.log10(r[name] / true) for r in rows], c=c, label=name)
        ax.axhline(0.0, c="0.5", lw=0.8)
        ax.set_xlabel("iteration")
        ax.set_ylabel("log10(k / k_true)")
        ax.set_title(f"rate constants during training ({cfg['method']}, {cfg['gradient']})")
        ax.legend(fontsize=8)
        save_figure(fig, self.run.out / "stiff.png", dpi=90)
        return ["stiff.png"]

    def report(self, final: dict[str, Any]) -> str:
        return summary(final)


def summary(m: dict[str, Any]) -> str:
    """The recovered constants against the truth."""
    cfg = m["config"]
    lines = [f"Robertson rate constants, {cfg['method']} ({cfg['gradient']}), {m['iters']} "
             f"iterations, {m['train_time_s']:.1f}s; noise {cfg['noise']:g}, {cfg['n_obs']} "
             f"times x 3 species; final loss {m['final_loss']:.3g}"
             + (" (about 1 at the noise level)" if cfg["noise"] > 0 else ""),
             "  constant      true    initial  recovered  rel. error" +
             ("  std. err (log k)  z" if m.get("std_err_log_k") else "")]
    for i, name in enumerate(K_NAMES):
        line = (f"  {name:<8} {m['true_k'][i]:>9.4g} {m['initial_k'][i]:>10.4g} "
                f"{m['k'][i]:>10.5g} {m[f'{name}_rel_err']:>11.2%}")
        if m.get("std_err_log_k"):
            line += f"  {m['std_err_log_k'][i]:>16.2e}  {m['z_scores'][i]:+.2f}"
        lines.append(line)
    if m.get("mle_k"):
        lines.append("  maximum likelihood (Gauss-Newton on the reference solver): "
                     + ", ".join(f"{n} {v:.5g} ({e:.2%}, z {z:+.2f})" for n, v, e, z in
                                 zip(K_NAMES, m["mle_k"], m["mle_rel_err"], m["mle_z_scores"]))
                     + f"; its loss {m['mle_loss']:.3f}")
        lines.append("  trained minus MLE, in standard errors: "
                     + ", ".join(f"{n} {z:+.2f}" for n, z in zip(K_NAMES, m["trained_vs_mle_z"])))
    return "\n".join(lines)


build_parser, run = runner.entry_points(StiffExperiment)
