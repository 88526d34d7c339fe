"""Dynamics recovery: fit a Neural ODE to one noisy trajectory (Chen et al. 2018).

``neuralode train dynamics --field {spiral,two-regime} --model {linear,mlp}``

1. The true trajectory ``z(t)`` of the chosen field is computed with our own solver (dopri5,
   tight tolerances) on a uniform grid, and Gaussian noise is added.
2. Each iteration draws a minibatch of random sub-trajectories (``--batch-time`` noisy
   points, every ``--batch-stride``-th grid point from a random start), integrates the
   learned field from each sub-trajectory's first noisy point, differentiated as
   ``--gradient`` says (``adjoint``, the default; ``backprop`` through the solver;
   ``checkpoint``, backprop's gradient in little memory), and minimises the mean squared
   error against the noisy points.
3. Evaluation integrates the learned field from the true ``z(0)`` over the whole time span
   and reports the trajectory MSE against the clean trajectory (``traj_mse``) and against
   the noisy observations (``traj_mse_obs``; ≈ 2 noise_std² at a perfect fit), and the error
   of the learned vector field on a 25x25 grid over the trajectory's bounding box
   (``field_rel_err`` = RMS |f_learned − f_true| / RMS |f_true|), also restricted to the grid
   points within 0.25 of the true path (``field_rel_err_near``), where the data constrains it.

Outputs in ``--out``: ``metrics.csv`` (per iteration), ``metrics.json`` (final),
``checkpoint.pt`` (every ``--ckpt-every`` iterations, atomic; ``--resume`` continues
exactly) and ``dynamics.png`` (three panels: the phase plane with the observations, the true
and the learned trajectory; the time series; the true and the learned vector field).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from neuralode import odeint
from neuralode.experiments import runner
from neuralode.experiments.regularization import (
    add_regularization_arguments,
    build_regularizers,
    check_compile,
    plot_nfe_per_step,
    regularization_label,
)
from neuralode.experiments.runner import (
    Experiment,
    Run,
    StepOutput,
    UsageError,
    add_gradient_argument,
    add_method_argument,
    add_tolerance_arguments,
    check_batch_size,
    check_rtol,
    nonnegative_float,
    positive_float,
    positive_int,
    pyplot,
    save_figure,
)
from neuralode.models.dynamics import (
    FIELD_MODELS,
    TRUE_FIELDS,
    LinearODEFunc,
    box_grid,
    make_field_model,
    make_true_field,
    vector_field_error,
)
from neuralode.regularizers import regularization_loss, regularized_solve

# Initial state and time span of the data trajectory, per true field.
FIELD_SETUPS: dict[str, dict[str, Any]] = {
    "spiral": {"z0": (2.0, 0.0), "t_max": 25.0},
    "two-regime": {"z0": (1.0, 3.0), "t_max": 25.0},
}
# Settings that define a run; --resume refuses to continue with different values.
RUN_KEYS = ("field", "model", "iters", "batch_size", "batch_time", "batch_stride", "n_points",
            "t_max", "noise_std", "lr", "hidden", "gradient", "method", "rtol", "atol", "seed",
            "kinetic", "jacobian_frobenius", "jacobian_estimator", "second_derivative")
CSV_FIELDS = ["iter", "loss", "lr", "elapsed_s", "traj_mse", "traj_mse_obs", "field_rel_err",
              "field_rel_err_near"]


@dataclass(frozen=True)
class Trajectory:
    """One observed trajectory: ``t`` (T,), ``clean`` and ``noisy`` (T, 2), ``z0`` (2,)."""

    t: Tensor
    clean: Tensor
    noisy: Tensor
    z0: Tensor


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--field", choices=sorted(TRUE_FIELDS), default="spiral",
                        help="true vector field that generates the data (default: spiral)")
    parser.add_argument("--model", choices=sorted(FIELD_MODELS), default="mlp",
                        help="learned field: linear dz/dt = W z, or an MLP (default: mlp)")
    parser.add_argument("--iters", type=positive_int, default=1000,
                        help="training iterations (default 1000); --resume with a larger "
                             "value extends a finished run")
    parser.add_argument("--batch-size", type=positive_int, default=20,
                        help="sub-trajectories per minibatch")
    parser.add_argument("--batch-time", type=positive_int, default=10,
                        help="points per sub-trajectory (>= 2)")
    parser.add_argument("--batch-stride", type=positive_int, default=8,
                        help="use every k-th point of a sub-trajectory (longer windows at the "
                             "same cost; the adjoint's cost grows with the points per window)")
    parser.add_argument("--n-points", type=positive_int, default=1000,
                        help="observations on the uniform time grid")
    parser.add_argument("--t-max", type=positive_float, default=None,
                        help="length of the trajectory (default: 25 for both fields)")
    parser.add_argument("--noise-std", type=nonnegative_float, default=0.05,
                        help="standard deviation of the Gaussian noise added to the "
                             "observations (default 0.05)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="Adam learning rate, cosine-decayed (default: 0.02 linear, "
                             "0.01 mlp)")
    parser.add_argument("--hidden", type=positive_int, default=64, help="MLP width")
    add_gradient_argument(parser, "adjoint")
    add_method_argument(parser, "dopri5", "ODE solver for training")
    add_tolerance_arguments(parser, "the training solves", "1e-5", "1e-6")
    parser.add_argument("--eval-every", type=positive_int, default=100,
                        help="evaluate the fit (trajectory and field errors) every N "
                             "iterations and after the last (default 100)")
    # no STEER (the solves end at observation times) and no augmented dimensions (the learned
    # field is compared with the true 2-D field)
    add_regularization_arguments(parser, steer=False, augment=False)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    if args.batch_time < 2:
        raise UsageError(f"--batch-time must be >= 2, got {args.batch_time}")
    span = (args.batch_time - 1) * args.batch_stride + 1
    if span > args.n_points:
        raise UsageError(f"--batch-time ({args.batch_time}) with --batch-stride "
                         f"({args.batch_stride}) spans {span} points, more than --n-points "
                         f"({args.n_points})")
    check_rtol(args.rtol)
    check_batch_size(args.batch_size)
    cfg = {k: getattr(args, k) for k in RUN_KEYS if hasattr(args, k)}
    cfg["t_max"] = args.t_max if args.t_max is not None else FIELD_SETUPS[args.field]["t_max"]
    cfg["lr"] = args.lr if args.lr is not None else (0.02 if args.model == "linear" else 0.01)
    check_compile(cfg, args)
    return cfg


def make_trajectory(field: str, n_points: int = 1000, t_max: float | None = None,
                    noise_std: float = 0.05, seed: int = 0) -> Trajectory:
    """The true trajectory of ``field`` on ``linspace(0, t_max, n_points)`` plus noise.

    Solved with dopri5 at rtol=1e-9, atol=1e-10 in float64; the noise comes from a private
    generator seeded with ``seed``.
    """
    setup = FIELD_SETUPS.get(field)
    if setup is None:
        raise ValueError(f"unknown field {field!r}; valid fields are: {', '.join(FIELD_SETUPS)}")
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    t_max = setup["t_max"] if t_max is None else t_max
    true = make_true_field(field).double()
    t = torch.linspace(0.0, t_max, n_points, dtype=torch.float64)
    z0 = torch.tensor(setup["z0"], dtype=torch.float64)
    with torch.no_grad():
        clean = odeint(true, z0, t, rtol=1e-9, atol=1e-10)
    g = torch.Generator().manual_seed(seed)
    noisy = clean + noise_std * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    return Trajectory(t=t.float(), clean=clean.float(), noisy=noisy.float(), z0=z0.float())


def sample_batch(data: Trajectory, batch_size: int, batch_time: int,
                 generator: torch.Generator, stride: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Random sub-trajectories: ``y0`` (B, 2), relative times (batch_time,), targets
    (batch_time, B, 2), all from the noisy observations; each takes every ``stride``-th
    point, so it spans ``(batch_time - 1) * stride`` grid intervals."""
    n = data.t.shape[0]
    span = (batch_time - 1) * stride + 1
    if span > n:
        raise ValueError(f"a sub-trajectory of {batch_time} points with stride {stride} spans "
                         f"{span} grid points, more than the {n} observed")
    start = torch.randint(0, n - span + 1, (batch_size,), generator=generator)
    offsets = torch.arange(batch_time) * stride
    idx = start[None, :] + offsets[:, None]  # (batch_time, B)
    t_rel = data.t[offsets] - data.t[0]  # uniform grid: every window has these times
    return data.noisy[start], t_rel, data.noisy[idx]


@torch.no_grad()
def predict(model: torch.nn.Module, data: Trajectory, method: str = "dopri5",
            options: dict | None = None) -> Tensor:
    """The learned field's trajectory from the true ``z(0)`` on the data's times (rtol 1e-6,
    atol 1e-8, ``method`` and ``options``, default a cap of 100,000 steps), on the CPU."""
    dev = next(model.parameters()).device
    return odeint(model, data.z0.to(dev), data.t.to(dev), rtol=1e-6, atol=1e-8,
                  method=method, options=options or {"max_num_steps": 100_000}).cpu()


@torch.no_grad()
def evaluate(model: torch.nn.Module, field: str, data: Trajectory,
             method: str = "dopri5", options: dict | None = None) -> dict[str, float]:
    """Trajectory MSE (vs clean and vs noisy) and vector-field error of a learned field
    (solved as :func:`predict` says)."""
    pred = predict(model, data, method, options)
    low, high = _field_box(data)
    err = vector_field_error(model, make_true_field(field), low, high, near=data.clean)
    out = {"traj_mse": float(((pred - data.clean) ** 2).sum(-1).mean()),
           "traj_mse_obs": float(((pred - data.noisy) ** 2).sum(-1).mean()),
           "field_rmse": err["rmse"], "field_rel_err": err["rel_rmse"],
           "field_rel_err_near": err["near_rel_rmse"]}
    if isinstance(model, LinearODEFunc):
        out["learned_A"] = model.matrix.detach().cpu().tolist()
    return out


def _field_box(data: Trajectory) -> tuple[Tensor, Tensor]:
    low, high = data.clean.min(0).values, data.clean.max(0).values
    pad = 0.1 * (high - low)
    return low - pad, high + pad


def plot(model: torch.nn.Module, field: str, data: Trajectory, path: str | Path,
         title: str = "", options: dict | None = None) -> None:
    """Three panels: the phase plane (noisy observations, true and learned trajectory); the
    time series of both coordinates; the true (grey) and learned (red) vector field
    directions on the trajectory's box."""
    plt = pyplot()
    dev = next(model.parameters()).device
    pred = predict(model, data, options=options)
    grid = box_grid(*_field_box(data), 17)
    with torch.no_grad():
        f_true = make_true_field(field)(torch.zeros(()), grid)
        f_learn = model(torch.zeros((), device=dev), grid.to(dev)).cpu()

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.3))
    ax = axes[0]
    ax.scatter(data.noisy[:, 0], data.noisy[:, 1], s=3, c="0.6", label="noisy observations")
    ax.plot(data.clean[:, 0], data.clean[:, 1], "k-", lw=1.0, label="true trajectory")
    ax.plot(pred[:, 0], pred[:, 1], "r--", lw=1.3, label="learned ODE from z(0)")
    ax.set_title("phase plane")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.legend(fontsize=7, loc="best")
    ax.set_aspect("equal", adjustable="datalim")

    ax = axes[1]
    ax.plot(data.t, data.noisy[:, 0], ".", ms=1.5, c="C0", alpha=0.4)
    ax.plot(data.t, data.noisy[:, 1], ".", ms=1.5, c="C1", alpha=0.4)
    ax.plot(data.t, data.clean[:, 0], "-", c="C0", lw=0.8, label="z1 true")
    ax.plot(data.t, data.clean[:, 1], "-", c="C1", lw=0.8, label="z2 true")
    ax.plot(data.t, pred[:, 0], "--", c="k", lw=1.0, label="learned")
    ax.plot(data.t, pred[:, 1], "--", c="k", lw=1.0)
    ax.set_title("time series")
    ax.set_xlabel("t")
    ax.legend(fontsize=7, loc="best")

    ax = axes[2]
    gx, gy = grid[:, 0].numpy(), grid[:, 1].numpy()

    def unit(f):
        return (f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()

    ax.quiver(gx, gy, *unit(f_true).T, color="0.55", width=0.004, label="true field")
    ax.quiver(gx, gy, *unit(f_learn).T, color="r", width=0.0025, label="learned field")
    ax.set_title("vector field (directions)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=7, loc="upper right")
    save_figure(fig, path, dpi=90, title=title)


class DynamicsExperiment(Experiment):
    """``neuralode train dynamics`` on the shared runner."""

    name = "dynamics"
    description = (
        "Fit a Neural ODE to one noisy 2-D trajectory (Chen et al. 2018). The data come from "
        "a known vector field (--field) with Gaussian noise; the learned field is linear or "
        "an MLP (--model). Each iteration integrates random sub-trajectories from their "
        "first noisy point and minimises the squared error to the noisy points. At the end "
        "it reports the error of the learned trajectory against the clean one and of the "
        "learned vector field against the true one, and writes metrics.csv, metrics.json, "
        "checkpoint.pt and dynamics.png to --out.")
    run_keys = RUN_KEYS
    length_key = "iters"
    default_threads = 1
    generators = ("sampler",)

    add_arguments = staticmethod(_add_arguments)
    configure = staticmethod(_config)

    def progress_label(self, steps_done: int) -> str:
        cfg = self.run.config
        return f"dynamics {cfg['field']}/{cfg['model']}"

    def setup(self) -> None:
        run, cfg = self.run, self.run.config
        device = run.device
        self.data = make_trajectory(cfg["field"], cfg["n_points"], cfg["t_max"],
                                    cfg["noise_std"], seed=cfg["seed"])
        self.model = make_field_model(cfg["model"], 2, hidden=cfg["hidden"]).to(device)
        run.dist.broadcast_parameters(self.model)
        self.adam_cosine(0.05)
        self.sampler = torch.Generator().manual_seed(cfg["seed"] + 1)
        self.gradient = cfg["gradient"]
        self.regularizers = build_regularizers(cfg)
        self.data_dev = Trajectory(t=self.data.t.to(device), clean=self.data.clean.to(device),
                                   noisy=self.data.noisy.to(device), z0=self.data.z0.to(device))
        self.eval_options = run.options("dopri5")
        self.initial_traj_mse = self._evaluate()["traj_mse"]

    def _evaluate(self) -> dict[str, Any]:
        return evaluate(self.model, self.run.config["field"], self.data,
                        options=self.eval_options)

    def train_step(self, step: int) -> StepOutput:
        run, cfg = self.run, self.run.config
        y0, t_rel, target = sample_batch(self.data_dev, cfg["batch_size"], cfg["batch_time"],
                                         self.sampler, cfg["batch_stride"])
        mine = run.dist.shard(cfg["batch_size"])  # this rank's sub-trajectories
        kwargs = dict(rtol=cfg["rtol"], atol=cfg["atol"], method=cfg["method"],
                      options=run.options(cfg["method"]), gradient=self.gradient)
        integrals = None
        if self.regularizers:
            out = regularized_solve(self.model, y0[mine], t_rel, self.regularizers, **kwargs)
            pred, stats, integrals = out.ys, out.stats, out.integrals
        else:
            pred, stats = odeint(self.model, y0[mine], t_rel, return_stats=True, **kwargs)
        loss = ((pred - target[:, mine]) ** 2).sum() / target.numel()
        if integrals is not None:  # this rank's share of the batch mean of the integrals
            loss = loss + regularization_loss(integrals, self.regularizers) * \
                (pred.shape[1] / cfg["batch_size"])
        total = self.optimizer_step(loss)
        it = step + 1
        row = self.metrics_row(it, total)
        row["nfe_forward"] = stats.nfe
        for name, value in (integrals or {}).items():
            row[name] = float(value.detach().mean())
        if self.eval_due(it):
            ev = self._evaluate()
            row.update({k: ev[k] for k in CSV_FIELDS[4:]})
        show = {"loss": total, **({"traj_mse": row["traj_mse"]} if "traj_mse" in row else {})}
        return StepOutput(total, row, show)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial_traj_mse": self.initial_traj_mse}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.initial_traj_mse = state["initial_traj_mse"]

    def finish(self) -> dict[str, Any]:
        cfg, rows = self.run.config, self.run.history
        final = self._evaluate()
        final.update({"iters": cfg["iters"], "train_time_s": round(self.run.elapsed(), 2),
                      "final_loss": rows[-1]["loss"] if rows else math.nan,
                      "noise_var": cfg["noise_std"] ** 2, "true_A": None, "config": cfg,
                      "initial_traj_mse": self.initial_traj_mse})
        true = make_true_field(cfg["field"])
        if hasattr(true, "A") and cfg["field"] == "spiral":
            final["true_A"] = true.A.tolist()
        return final

    def plot(self, final: dict[str, Any]) -> list[str]:
        cfg = self.run.config
        plot(self.model, cfg["field"], self.data, self.run.out / "dynamics.png",
             title=f"{cfg['field']} field, {cfg['model']} model: trajectory MSE "
                   f"{final['traj_mse']:.2e}, field rel. error {final['field_rel_err']:.1%}",
             options=self.eval_options)
        names = ["dynamics.png"]
        if plot_nfe_per_step(self.run.history, self.run.out / "nfe.png",
                             title=f"{cfg['field']} field, {cfg['model']} model, "
                                   f"regularisation: {regularization_label(cfg)}"):
            names.append("nfe.png")
        return names

    def report(self, final: dict[str, Any]) -> str:
        return summary(final)


build_parser, run = runner.entry_points(DynamicsExperiment)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) one run as ``args`` say; the final metrics, with the trained model
    under ``"model_obj"``. Raises ``RuntimeError`` when the run did not finish."""
    exp = DynamicsExperiment()
    run = Run(exp, args)
    rc = run.main()
    if rc != 0 or run.final is None:
        raise RuntimeError(f"the training run did not finish (exit status {rc})")
    final = dict(run.final)
    final["model_obj"] = exp.model
    return final


def summary(m: dict[str, Any]) -> str:
    """Human-readable fit summary."""
    cfg = m["config"]
    lines = [
        (f"field={cfg['field']} model={cfg['model']} iters={m['iters']} "
        f"train time {m['train_time_s']:.1f}s"),
        f"  trajectory MSE vs clean truth : {m['traj_mse']:.3e}",
        (f"  trajectory MSE vs noisy data  : {m['traj_mse_obs']:.3e}  "
        f"(noise variance x2 dims = {2 * m['noise_var']:.3e})"),
        (f"  vector field relative error   : {m['field_rel_err']:.2%} (RMS over a 25x25 grid "
        f"on the trajectory's box), {m['field_rel_err_near']:.2%} within 0.25 of the path"),
    ]
    def matrix(a: list[list[float]]) -> str:
        return f"[[{a[0][0]:+.3f}, {a[0][1]:+.3f}], [{a[1][0]:+.3f}, {a[1][1]:+.3f}]]"

    if m.get("learned_A") is not None:
        lines.append(f"  learned A = {matrix(m['learned_A'])}")
        if m.get("true_A") is not None:
            lines.append(f"  true A    = {matrix(m['true_A'])}")
    return "\n".join(lines)
