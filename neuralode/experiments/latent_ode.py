"""Latent ODE vs RNN on irregularly sampled noisy spirals (Chen et al. 2018, Table 2).

``neuralode train latent-ode --model {latent-ode,rnn} --n-obs {30,50,100} --iters N``

Data: :func:`neuralode.data.spirals.make_spirals` (1000 noisy 2-D spirals, half clockwise,
``--n-obs`` irregular observations in the first half of each trajectory; default data seed 0
for every run, so all models see the same data) split 80/20 into train/test.

Training uses only the observed points of the training spirals:

* ``latent-ode``: maximise the ELBO (known noise std ``--noise-std``) of minibatches with a
  GRU (or ODE-RNN, ``--encoder ode-rnn``) recognition network and an MLP latent ODE.
* ``rnn``: a GRU with time gaps as input, trained by one-step-ahead prediction.

Evaluation on the test spirals, from their observed points only, against the clean
trajectories: ``rmse_interp`` (unobserved points inside the observation window),
``rmse_extrap`` (every point after it) and ``test_rmse`` (all held-out points: both). The
latent ODE predicts with the posterior mean of ``z0``. RMSE is over points and both
coordinates. Curves are monitored on the test set every ``--eval-every`` iterations; the
reported numbers are those of the final iterate (no model selection).

Outputs in ``--out``: ``metrics.csv``, ``metrics.json``, ``checkpoint.pt`` (atomic; ``--resume``
continues exactly), ``reconstructions.png``, ``training_curves.png`` and, for the latent ODE,
``latent_interpolation.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neuralode.data.spirals import SpiralData, gather_points, make_spirals, train_test_split
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
    StepOutput,
    UsageError,
    add_gradient_argument,
    add_method_argument,
    add_tolerance_arguments,
    check_batch_size,
    check_rtol,
    fraction,
    nonnegative_int,
    positive_float,
    positive_int,
    pyplot,
    save_figure,
)
from neuralode.models.latent_ode import LatentODE, RNNBaseline

MODELS = ("latent-ode", "rnn")
RUN_KEYS = ("model", "encoder", "n_obs", "n_spirals", "n_total", "noise_std", "data_seed",
            "test_fraction", "iters", "batch_size", "lr", "latent_dim", "enc_hidden",
            "ode_hidden", "dec_hidden", "readout_act", "rnn_hidden", "method", "rtol", "atol",
            "gradient", "kl_warmup", "seed", "kinetic", "jacobian_frobenius",
            "jacobian_estimator", "second_derivative")
CSV_FIELDS = ["iter", "loss", "lr", "elapsed_s", "test_rmse", "rmse_interp", "rmse_extrap",
              "rmse_obs"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", choices=MODELS, default="latent-ode",
      help="latent-ode: a latent ODE trained on the ELBO; rnn: a GRU baseline trained by "
           "one-step-ahead prediction (default latent-ode)")
    a("--encoder", choices=("gru", "ode-rnn"), default="gru",
      help="latent ODE recognition network (default gru)")
    a("--n-obs", type=positive_int, default=100,
      help="observed points per spiral (the paper: 30, 50, 100)")
    a("--n-spirals", type=positive_int, default=1000,
      help="spirals in the data set, half clockwise (default 1000)")
    a("--n-total", type=positive_int, default=500, help="dense grid points per spiral")
    a("--noise-std", type=positive_float, default=0.1, help="observation noise (known to the ELBO)")
    a("--data-seed", type=nonnegative_int, default=0, help="seed of the data set and split")
    a("--test-fraction", type=fraction, default=0.2,
      help="fraction of the spirals held out for testing (default 0.2)")
    a("--iters", type=positive_int, default=1000,
      help="training iterations (default 1000); --resume with a larger value extends a "
           "finished run")
    a("--batch-size", type=positive_int, default=50,
      help="spirals per minibatch, over all processes (default 50)")
    a("--lr", type=positive_float, default=0.01, help="Adam learning rate, cosine-decayed")
    a("--latent-dim", type=positive_int, default=4,
      help="dimension of the latent state z (default 4)")
    a("--enc-hidden", type=positive_int, default=25,
      help="hidden size of the recognition network (default 25)")
    a("--ode-hidden", type=positive_int, default=20,
      help="hidden width of the latent ODE's MLP (default 20)")
    a("--dec-hidden", type=nonnegative_int, default=0,
      help="latent ODE readout MLP width (default 0: linear readout, which extrapolates "
           "better than a ReLU MLP here)")
    a("--readout-act", choices=("relu", "elu", "tanh"), default="relu",
      help="activation of the readout MLP")
    a("--rnn-hidden", type=positive_int, default=25,
      help="RNN baseline: GRU hidden size and readout MLP width")
    add_method_argument(parser, "dopri5", "ODE solver of the latent ODE")
    add_tolerance_arguments(parser, "the latent ODE solves", "1e-3", "1e-4")
    add_gradient_argument(parser, "backprop", " of the latent ODE")
    a("--kl-warmup", type=nonnegative_int, default=0,
      help="iterations over which the KL weight ramps from 0 to 1 (0: always 1)")
    a("--eval-every", type=positive_int, default=250,
      help="evaluate on the test spirals every N iterations and after the last "
           "(default 250)")
    a("--n-plot", type=positive_int, default=6, help="test spirals in reconstructions.png")
    # no STEER (the solve ends at the observation times) and no augmented dimensions (the
    # latent dimension is already free: --latent-dim)
    add_regularization_arguments(parser, steer=False, augment=False)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    if args.model == "rnn" and args.encoder != "gru":
        raise UsageError(f"--encoder {args.encoder} applies to --model latent-ode only")
    check_rtol(args.rtol)
    check_batch_size(args.batch_size)
    if args.model == "rnn" and (args.kinetic or args.jacobian_frobenius
                                or args.second_derivative):
        raise UsageError("--kinetic/--jacobian-frobenius/--second-derivative apply to --model "
                         "latent-ode (the RNN solves no ODE)")
    cfg = {k: getattr(args, k) for k in RUN_KEYS}
    check_compile(cfg, args)
    return cfg


def load_data(cfg: dict[str, Any]) -> tuple[SpiralData, SpiralData]:
    """The (train, test) spirals of a run; deterministic in ``data_seed``."""
    data = make_spirals(cfg["n_spirals"], cfg["n_total"], cfg["n_obs"], cfg["noise_std"],
                        seed=cfg["data_seed"])
    return train_test_split(data, cfg["test_fraction"], seed=cfg["data_seed"])


def build_model(cfg: dict[str, Any], options: dict | None = None) -> nn.Module:
    """The model of a run's config; ``options`` go to the latent ODE's solver."""
    if cfg["model"] == "rnn":
        return RNNBaseline(2, hidden=cfg["rnn_hidden"], readout_hidden=cfg["rnn_hidden"])
    return LatentODE(2, cfg["latent_dim"], encoder=cfg["encoder"], enc_hidden=cfg["enc_hidden"],
                     ode_hidden=cfg["ode_hidden"], dec_hidden=cfg["dec_hidden"],
                     readout_act=cfg["readout_act"], obs_std=cfg["noise_std"],
                     method=cfg["method"], rtol=cfg["rtol"], atol=cfg["atol"],
                     options=options, gradient=cfg["gradient"],
                     regularizers=build_regularizers(cfg))


def training_loss(model: nn.Module, data: SpiralData, idx: Tensor, kl_weight: float,
                  part: slice = slice(None)) -> Tensor:
    """Minibatch loss on the observed points of spirals ``idx``: the negative ELBO per
    sequence (latent ODE) or the one-step-ahead MSE (RNN). With ``part``, the share of the
    spirals ``idx[part]`` in that loss (the shares of a partition of ``idx`` sum to it)."""
    b = gather_points(data, "obs", idx[part])
    if isinstance(model, LatentODE):
        noise = torch.randn(len(idx), model.latent_dim)  # for the whole batch, on every rank
        terms = model.elbo(b.times, b.values, b.mask, kl_weight=kl_weight, noise=noise[part])
        return (-terms.elbo + model.regularization_loss()) * (len(b.times) / len(idx))
    return model.loss(b.times, b.values, b.mask) * (b.mask.sum() / data.obs_mask[idx].sum())


@torch.no_grad()
def predict(model: nn.Module, data: SpiralData, index: Tensor | None = None,
            chunk: int = 100) -> Tensor:
    """Predictions ``(N, n_total, 2)`` on the whole grid from each spiral's observations."""
    n = len(data) if index is None else len(index)
    ids = torch.arange(len(data)) if index is None else torch.as_tensor(index)
    out = []
    for s in range(0, n, chunk):
        b = gather_points(data, "obs", ids[s:s + chunk])
        out.append(model.predict(b.times, b.values, b.mask, data.t))
    return torch.cat(out)


def rmse_scores(pred: Tensor, data: SpiralData) -> dict[str, float]:
    """RMSE against the clean trajectories over obs / interp / extrap / held-out points."""
    sq = ((pred - data.clean) ** 2).mean(-1)  # (N, T), mean over the 2 coordinates

    def rmse(mask: Tensor) -> float:
        return float(sq[mask].mean().sqrt()) if bool(mask.any()) else math.nan

    return {"test_rmse": rmse(data.interp_mask | data.extrap_mask),
            "rmse_interp": rmse(data.interp_mask), "rmse_extrap": rmse(data.extrap_mask),
            "rmse_obs": rmse(data.obs_mask)}


def evaluate(model: nn.Module, test: SpiralData) -> dict[str, float]:
    was = model.training
    model.eval()
    scores = rmse_scores(predict(model, test), test)
    model.train(was)
    return scores


# ----------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------


def _by_direction(test: SpiralData) -> tuple[list[int], list[int]]:
    """Indices of the clockwise and of the counter-clockwise test spirals."""
    return ((test.direction < 0).nonzero().flatten().tolist(),
            (test.direction > 0).nonzero().flatten().tolist())


def plot_reconstructions(model: nn.Module, test: SpiralData, path: Path, n: int = 6,
                         title: str = "") -> None:
    plt = pyplot()
    cw, ccw = _by_direction(test)  # up to 3 of each
    idx = (cw[:3] + ccw[:3])[:n] or list(range(min(n, len(test))))
    pred = predict(model, test, torch.tensor(idx))
    w = test.n_window
    cols = min(3, len(idx))
    rows = math.ceil(len(idx) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.5 * rows), squeeze=False)
    for a, (i, p) in enumerate(zip(idx, pred)):
        ax = axes[a // cols][a % cols]
        clean, obs = test.clean[i], test.noisy[i][test.obs_mask[i]]
        ax.plot(clean[:, 0], clean[:, 1], "-", c="0.75", lw=2.5, label="truth")
        ax.plot(obs[:, 0], obs[:, 1], "k.", ms=3, label="observed")
        ax.plot(p[:w, 0], p[:w, 1], "-", c="C0", lw=1.3, label="reconstruction")
        ax.plot(p[w - 1:, 0], p[w - 1:, 1], "--", c="C3", lw=1.3, label="extrapolation")
        ax.set_title(f"test spiral {i} ({'cw' if test.direction[i] < 0 else 'ccw'})",
                     fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=7)
    for a in range(len(idx), rows * cols):
        axes[a // cols][a % cols].axis("off")
    axes[0][0].legend(fontsize=7, loc="best")
    save_figure(fig, path, title=title)


@torch.no_grad()
def plot_latent_interpolation(model: LatentODE, test: SpiralData, path: Path,
                              steps: int = 7) -> None:
    """Decode ``(1 - a) mu_cw + a mu_ccw`` for ``a`` in [0, 1]: the paper's 'homotopy' between a
    clockwise and a counter-clockwise spiral."""
    plt = pyplot()
    cw, ccw = _by_direction(test)
    if not cw or not ccw:
        return
    pair = torch.tensor([cw[0], ccw[0]])
    b = gather_points(test, "obs", pair)
    mu, _ = model.encode(b.times, b.values, b.mask)
    alphas = torch.linspace(0, 1, steps)
    z0 = (1 - alphas)[:, None] * mu[0] + alphas[:, None] * mu[1]
    traj = model.decode(z0, test.t)  # (steps, T, 2)
    fig, axes = plt.subplots(1, steps, figsize=(2.1 * steps, 2.4))
    cmap = plt.get_cmap("plasma")
    for s in range(steps):
        ax = axes[s]
        x = traj[s]
        ax.plot(x[:, 0], x[:, 1], c=cmap(0.85 * float(alphas[s])), lw=1.4)
        ax.plot(x[:1, 0], x[:1, 1], "ko", ms=3)
        ax.set_title(f"a = {float(alphas[s]):.2f}", fontsize=8)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path, fontsize=9,
                title=f"latent interpolation z0 = (1-a) mu(spiral {int(pair[0])}, cw) + "
                      f"a mu(spiral {int(pair[1])}, ccw), decoded on t in "
                      f"[0, {float(test.t[-1]):g}] (dot: t = 0)")


def plot_training_curves(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    its = [r["iter"] for r in rows]
    ax1.plot(its, [r["loss"] for r in rows], lw=0.6)
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("training loss")
    if rows and min(r["loss"] for r in rows) > 0:
        ax1.set_yscale("log")
    ev = [r for r in rows if r.get("test_rmse") is not None]
    for key, style in (("rmse_interp", "C0-o"), ("rmse_extrap", "C3-s"), ("test_rmse", "k-^")):
        ax2.plot([r["iter"] for r in ev], [r[key] for r in ev], style, ms=3, label=key)
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("test RMSE")
    ax2.legend(fontsize=8)
    save_figure(fig, path, title=title)


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------


class LatentODEExperiment(Experiment):
    """``neuralode train latent-ode`` on the shared runner."""

    name = "latent-ode"
    description = (
        "Latent ODE vs RNN on irregularly sampled noisy spirals (Chen et al. 2018, Table 2). "
        "The data are noisy 2-D spirals (--n-spirals) with --n-obs irregular observations "
        "each, split into training and test spirals. The latent ODE (a GRU or ODE-RNN recognition "
        "network and an MLP latent ODE) maximises the ELBO; the RNN baseline learns "
        "one-step-ahead prediction. At the end it reports the RMSE of interpolation and "
        "extrapolation on the test spirals against their clean trajectories, and writes "
        "metrics, a checkpoint and plots of the reconstructions to --out.")
    run_keys = RUN_KEYS
    length_key = "iters"
    default_ckpt_every = 250
    default_threads = 1
    generators = ("sampler",)

    def default_out(self, args: argparse.Namespace) -> str:
        return "runs/latent_ode"

    add_arguments = staticmethod(_add_arguments)
    configure = staticmethod(_config)

    def progress_label(self, steps_done: int) -> str:
        cfg = self.run.config
        label = cfg["model"] + (f"/{cfg['encoder']}" if cfg["model"] == "latent-ode" else "")
        return f"{label} n_obs={cfg['n_obs']}"

    def setup(self) -> None:
        run, cfg = self.run, self.run.config
        if run.device.type != "cpu":
            raise UsageError(f"--device {run.device}: this experiment runs on cpu only (its "
                             f"models are tiny; valid choice: cpu)")
        self.train_set, self.test_set = load_data(cfg)
        self.model = build_model(cfg, run.options(cfg["method"]))
        run.dist.broadcast_parameters(self.model)
        self.adam_cosine(0.02)
        self.sampler = torch.Generator().manual_seed(cfg["seed"] + 1)

    def train_step(self, step: int) -> StepOutput:
        run, cfg = self.run, self.run.config
        it = step + 1
        idx = torch.randperm(len(self.train_set), generator=self.sampler)[:cfg["batch_size"]]
        kl_w = min(1.0, it / cfg["kl_warmup"]) if cfg["kl_warmup"] else 1.0
        is_ode = isinstance(self.model, LatentODE)
        if is_ode:
            self.model.reset_nfe()
        loss = training_loss(self.model, self.train_set, idx, kl_w, run.dist.shard(len(idx)))
        nfe = self.model.nfe if is_ode else None  # the forward solve's calls of the dynamics
        regs = self.model.last_regularization if is_ode else None
        total = self.optimizer_step(loss)
        row = self.metrics_row(it, total)
        row["nfe_forward"] = nfe
        for name, value in (regs or {}).items():
            row[name] = float(value.detach().mean())
        if self.eval_due(it):
            row.update(evaluate(self.model, self.test_set))
        show = {"loss": total}
        if "test_rmse" in row:
            show["test_rmse"] = row["test_rmse"]
        return StepOutput(total, row, show)

    def finish(self) -> dict[str, Any]:
        cfg, rows = self.run.config, self.run.history
        final: dict[str, Any] = dict(evaluate(self.model, self.test_set))
        final.update({"model": cfg["model"], "encoder": cfg["encoder"], "n_obs": cfg["n_obs"],
                      "seed": cfg["seed"], "iters": cfg["iters"],
                      "train_time_s": round(self.run.elapsed(), 2),
                      "final_loss": rows[-1]["loss"] if rows else math.nan,
                      "n_params": sum(p.numel() for p in self.model.parameters()),
                      "n_train": len(self.train_set), "n_test": len(self.test_set),
                      "config": cfg})
        return final

    def plot(self, final: dict[str, Any]) -> list[str]:
        out, cfg = self.run.out, self.run.config
        title = (f"{self.progress_label(0).split(' ')[0]}, n_obs={cfg['n_obs']}: test RMSE "
                 f"{final['test_rmse']:.3f} (interp {final['rmse_interp']:.3f}, extrap "
                 f"{final['rmse_extrap']:.3f})")
        plot_reconstructions(self.model, self.test_set, out / "reconstructions.png",
                             self.run.args.n_plot, title)
        plot_training_curves(self.run.history, out / "training_curves.png", title)
        names = ["reconstructions.png", "training_curves.png"]
        if plot_nfe_per_step(self.run.history, out / "nfe.png",
                             title=f"{title}\nregularisation: {regularization_label(cfg)}"):
            names.append("nfe.png")
        if isinstance(self.model, LatentODE):
            plot_latent_interpolation(self.model, self.test_set, out / "latent_interpolation.png")
            names.append("latent_interpolation.png")
        return names

    def report(self, m: dict[str, Any]) -> str:
        return (f"{m['model']} n_obs={m['n_obs']} seed={m['seed']} iters={m['iters']} "
                f"({m['train_time_s']:.0f}s): test RMSE {m['test_rmse']:.4f} "
                f"(interp {m['rmse_interp']:.4f}, extrap {m['rmse_extrap']:.4f}, "
                f"obs {m['rmse_obs']:.4f})")


build_parser, run = runner.entry_points(LatentODEExperiment)


# ----------------------------------------------------------------------------
# Table 2 summary over runs
# ----------------------------------------------------------------------------


def summarize(root: str | Path) -> str:
    """Markdown table of mean ± sample std over seeds of every ``ROOT/*/metrics.json``,
    grouped by model and ``n_obs`` (the Table 2 analogue)."""
    import json
    import statistics

    runs = [json.loads(p.read_text()) for p in sorted(Path(root).glob("*/metrics.json"))]
    if not runs:
        raise FileNotFoundError(f"no */metrics.json under {root}")
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for m in runs:
        groups.setdefault((m["model"], m["n_obs"]), []).append(m)

    def stat(ms: list[dict[str, Any]], key: str) -> str:
        vals = [m[key] for m in ms]
        if len(vals) == 1:
            return f"{vals[0]:.4f}"
        return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"

    lines = [("| model | n_obs | seeds | test RMSE (held-out) | interpolation | extrapolation "
             "| observed (recon.) | train time / run |"),
             "|---|---|---|---|---|---|---|---|"]
    for (model, n_obs), ms in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        seeds = ",".join(str(m["seed"]) for m in sorted(ms, key=lambda m: m["seed"]))
        t = statistics.mean(m["train_time_s"] for m in ms)
        lines.append(f"| {model} | {n_obs} | {seeds} | {stat(ms, 'test_rmse')} | "
                     f"{stat(ms, 'rmse_interp')} | {stat(ms, 'rmse_extrap')} | "
                     f"{stat(ms, 'rmse_obs')} | {t:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m neuralode.experiments.latent_ode summarize ROOT
    if len(sys.argv) != 3 or sys.argv[1] != "summarize":
        print("usage: python -m neuralode.experiments.latent_ode summarize RUNS_ROOT",
              file=sys.stderr)
        raise SystemExit(2)
    print(summarize(sys.argv[2]))
