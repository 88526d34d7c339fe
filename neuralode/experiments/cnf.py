"""``neuralode train cnf``: maximum-likelihood training of a CNF or a planar flow on 2-D toys.

    neuralode train cnf --data moons --model cnf --estimator exact --iters 2000 --out runs/m
    neuralode train cnf --data moons --kinetic 0.01 --jacobian-frobenius 0.01 --out runs/r

``--kinetic``, ``--jacobian-frobenius``, ``--second-derivative`` add regularisation integrals
to the loss (``neuralode.regularizers``; computed on z along the training solve, from the data
at T back to the base); ``--steer B`` draws each training solve's end time from [T-B, T+B].

Each iteration draws a fresh batch from the toy distribution (``neuralode.data.toy2d``) and
takes one Adam step on the negative log-likelihood. A fixed test set (the same points for every
run, independent of ``--seed``) gives ``test_nll`` in nats, always with the exact trace.

Output in ``--out DIR``:
  metrics.csv       one row per iteration: loss (NLL plus regularisation), NLL, regularisation
                    integrals, NFE (forward and, with --gradient other than backprop, backward),
                    seconds, learning rate; test NLL on evaluation rows
  metrics.json      final summary: test_nll, NFE and time per iteration, parameter count...
  checkpoint.pt     model, optimizer, schedule, iteration and RNG states (atomic, regular)
  density.png       data, learned density and model samples
  evolution.png     (CNF) samples and density at 5 times from t=0 to T (paper's Figure 6)
  nfe.png           (CNF) NFE per training step over the iterations

``--resume`` continues from ``DIR/checkpoint.pt`` and reproduces the uninterrupted run.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from neuralode.data.toy2d import TOY_DATASETS, sample_toy2d, toy2d_log_density
from neuralode.experiments import runner
from neuralode.experiments.regularization import (
    REGULARIZATION_KEYS,
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
    positive_float,
    positive_int,
    pyplot,
    save_figure,
)
from neuralode.models.classifiers import count_parameters
from neuralode.models.cnf import (
    ACTIVATIONS,
    CNF,
    ESTIMATORS,
    NOISE_KINDS,
    ConcatMLPDynamics,
    HyperNetDynamics,
)
from neuralode.models.planar import PlanarFlow

MODELS = ("cnf", "planar")
DYNAMICS = ("hypernet", "concat")
SCHEDULES = ("constant", "cosine")
TEST_SEED = 20190101  # the test set is the same for every run, whatever --seed
# Settings that must agree between a checkpoint and a --resume call.
RUN_KEYS = ("data", "model", "dynamics", "width", "hyper_hidden", "hidden", "activation",
            "layers", "estimator", "noise", "t1", "train_time", "method", "rtol", "atol",
            "gradient", "batch_size", "lr", "lr_schedule", "seed", "test_size", "dtype",
            *(k for k in REGULARIZATION_KEYS if k != "augment_dims"))


# ---------------------------------------------------------------------------------------------
# small shared pieces (also used by cnf_compare)
# ---------------------------------------------------------------------------------------------


def parse_int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints such as 64,64,64, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints such as 64,64,64, got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------
# model construction
# ---------------------------------------------------------------------------------------------


def build_model(cfg: dict, options: dict | None = None) -> nn.Module:
    """The flow described by a config dict (the parsed arguments, see ``build_parser``);
    ``options`` go to the CNF's solver."""
    if cfg["model"] == "planar":
        return PlanarFlow(2, cfg["layers"], mode="normalizing")
    if cfg["dynamics"] == "hypernet":
        dyn = HyperNetDynamics(2, width=cfg["width"], hidden=cfg["hyper_hidden"])
    else:
        dyn = ConcatMLPDynamics(2, hidden=tuple(cfg["hidden"]), activation=cfg["activation"])
    return CNF(dyn, t1=cfg["t1"], train_time=cfg["train_time"], estimator=cfg["estimator"],
               noise=cfg["noise"], method=cfg["method"], rtol=cfg["rtol"], atol=cfg["atol"],
               options=options, gradient=cfg["gradient"], regularizers=build_regularizers(cfg),
               steer=cfg.get("steer", 0.0))


def model_label(cfg: dict) -> str:
    if cfg["model"] == "planar":
        return f"planar K={cfg['layers']}"
    if cfg["dynamics"] == "hypernet":
        return f"CNF hypernet M={cfg['width']}"
    return f"CNF concat {'-'.join(map(str, cfg['hidden']))}"


@torch.no_grad()
def evaluate_nll(model: nn.Module, x: torch.Tensor, batch_size: int = 2500) -> float:
    """Mean negative log-likelihood (nats) of ``x`` under ``model``, exact trace for CNFs."""
    total = 0.0
    for chunk in x.split(batch_size):
        if isinstance(model, CNF):
            logp = model.log_prob(chunk, estimator="exact")
        else:
            logp = model.log_prob(chunk)
        total += float(logp.sum())
    return -total / x.shape[0]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=TOY_DATASETS, default="moons", help="toy dataset")
    parser.add_argument("--model", choices=MODELS, default="cnf",
                        help="cnf: a continuous normalizing flow; planar: a planar flow of "
                             "--layers layers, the discrete baseline (default cnf)")
    g = parser.add_argument_group("CNF")
    g.add_argument("--dynamics", choices=DYNAMICS, default="concat",
                   help="hypernet: the paper's gated time-dependent units (width --width); "
                        "concat: MLP with t appended to every layer (--hidden)")
    g.add_argument("--width", type=positive_int, default=32, help="M, hypernet units")
    g.add_argument("--hyper-hidden", type=positive_int, default=32,
                   help="hidden width of the hypernetwork of t")
    g.add_argument("--hidden", type=parse_int_list, default=(64, 64, 64),
                   help="concat-MLP hidden widths, comma-separated")
    g.add_argument("--activation", choices=tuple(ACTIVATIONS), default="tanh",
                   help="activation of the CNF's dynamics network (default tanh)")
    g.add_argument("--estimator", choices=ESTIMATORS, default="exact",
                   help="divergence: exact trace or Hutchinson's estimator")
    g.add_argument("--noise", choices=NOISE_KINDS, default="gaussian",
                   help="Hutchinson probe distribution")
    g.add_argument("--t1", type=positive_float, default=0.5, help="integration time T")
    g.add_argument("--train-time", action="store_true", help="learn T")
    add_method_argument(g, "dopri5", "ODE solver of the CNF")
    add_tolerance_arguments(g, "the CNF solves", "1e-5", "1e-5")
    add_gradient_argument(g, "backprop")
    add_regularization_arguments(parser, augment=False, default_estimator="exact",
                                 steer_help="the end time of the solve from the data back to "
                                            "the base")
    p = parser.add_argument_group("planar flow")
    p.add_argument("--layers", type=positive_int, default=64, help="K, planar layers")
    t = parser.add_argument_group("training")
    t.add_argument("--iters", type=positive_int, default=1000,
                   help="training iterations (default 1000); --resume with a larger value "
                        "extends the run")
    t.add_argument("--batch-size", type=positive_int, default=512,
                   help="samples per minibatch, over all processes (default 512)")
    t.add_argument("--lr", type=positive_float, default=1e-3,
                   help="Adam learning rate (default 1e-3)")
    t.add_argument("--lr-schedule", choices=SCHEDULES, default="constant",
                   help="constant, or cosine: decayed to 0 over --iters (default constant)")
    t.add_argument("--test-size", type=positive_int, default=5000,
                   help="points of the fixed test set that gives test_nll (default 5000)")
    t.add_argument("--eval-every", type=positive_int, default=None,
                   help="iterations between test evaluations (default: iters/5)")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the model and the data (default float32)")
    t.add_argument("--grid", type=positive_int, default=100, help="plot grid resolution")
    t.add_argument("--plot-samples", type=positive_int, default=20000,
                   help="samples drawn for the sample histograms")


def _config(args: argparse.Namespace) -> dict:
    check_rtol(args.rtol, getattr(torch, args.dtype))
    check_batch_size(args.batch_size)
    cfg = {k: getattr(args, k) for k in (*RUN_KEYS, "iters")}
    cfg["hidden"] = list(cfg["hidden"])
    if cfg["model"] == "planar" and (build_regularizers(cfg) or cfg["steer"]):
        raise UsageError("--kinetic, --jacobian-frobenius, --second-derivative and --steer are "
                         "for --model cnf (a planar flow solves no ODE)")
    if cfg["steer"] >= cfg["t1"]:
        raise UsageError(f"--steer must be smaller than --t1 ({cfg['t1']:g}), got "
                         f"{cfg['steer']:g}")
    check_compile(cfg, args)
    return cfg


def _make_scheduler(opt: torch.optim.Optimizer, cfg: dict):
    if cfg["lr_schedule"] == "cosine":
        total = cfg["iters"]
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, total) / total)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)


class CNFExperiment(Experiment):
    """``neuralode train cnf`` on the shared runner."""

    name = "cnf"
    description = ("Maximum-likelihood training of a continuous normalizing flow (or a planar "
                   "flow baseline) on a 2-D toy density.")
    length_key = "iters"
    generators = ("data_gen", "noise_gen")

    def default_out(self, args: argparse.Namespace) -> None:
        return None  # --out is required

    add_arguments = staticmethod(_add_arguments)

    def configure(self, args: argparse.Namespace) -> dict:
        cfg = _config(args)
        # a cosine schedule depends on --iters; a constant one may be extended on resume
        self.run_keys = RUN_KEYS + (("iters",) if cfg["lr_schedule"] == "cosine" else ())
        return cfg

    def progress_label(self, steps_done: int) -> str:
        return self.run.config["data"]

    def setup(self) -> None:
        run, cfg, device = self.run, self.run.config, self.run.device
        self.dtype = getattr(torch, cfg["dtype"])
        torch.manual_seed(cfg["seed"])
        self.model = build_model(cfg, run.options(cfg["method"])).to(device=device,
                                                                      dtype=self.dtype)
        run.dist.broadcast_parameters(self.model)
        self.is_cnf = isinstance(self.model, CNF)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"])
        self.sched = _make_scheduler(self.opt, cfg)
        self.data_gen = torch.Generator().manual_seed(cfg["seed"])
        self.noise_gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 1)
        self.test_x = sample_toy2d(cfg["data"], cfg["test_size"],
                                   torch.Generator().manual_seed(TEST_SEED),
                                   dtype=self.dtype).to(device)
        self.eval_every = run.args.eval_every or max(cfg["iters"] // 5, 1)
        self.model.train()

    def train_step(self, step: int) -> StepOutput:
        run, cfg, model = self.run, self.run.config, self.model
        it = step + 1
        t0 = time.perf_counter()
        x = sample_toy2d(cfg["data"], cfg["batch_size"], self.data_gen, dtype=self.dtype)
        mine = run.dist.shard(len(x))  # this rank's share of the batch
        x = x[mine].to(run.device)
        share = x.shape[0] / cfg["batch_size"]
        if self.is_cnf:
            gen = self.noise_gen
            if run.dist.distributed and cfg["estimator"] == "hutchinson":
                # independent probes per rank, from a seed every rank draws alike (so the
                # generator in the checkpoint is every rank's)
                seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
                gen = torch.Generator(device=gen.device).manual_seed(seed + run.dist.rank)
            nll = -model.log_prob(x, generator=gen).mean() * share
            loss = nll + model.regularization_loss() * share
            nfe_fwd = model.last_stats.nfe
        else:
            loss = nll = -model.log_prob(x).mean() * share
            nfe_fwd = None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.dist.sum_gradients(model.parameters())
        nfe_bwd = (model.last_nfe - nfe_fwd if self.is_cnf and cfg["gradient"] != "backprop"
                   else None)
        (total, nll_total) = run.dist.all_reduce([float(loss.detach()), float(nll.detach())])
        if math.isfinite(total):  # the runner stops the run on a non-finite loss
            self.opt.step()
            self.sched.step()
        dt = time.perf_counter() - t0
        row = {"iter": it, "loss": total, "nll": nll_total, "nfe_forward": nfe_fwd,
               "nfe_backward": nfe_bwd, "iter_time_s": round(dt, 5),
               "lr": self.opt.param_groups[0]["lr"],
               "end_time": float(model.end_time.detach()) if self.is_cnf else None,
               "solve_end_time": model.last_end_time if self.is_cnf else None,
               "test_nll": None}
        regs = model.last_regularization if self.is_cnf else None
        for r in build_regularizers(cfg):
            row[r.name] = float(regs[r.name].detach().mean()) if regs else None
        if it % self.eval_every == 0 or it == cfg["iters"]:
            model.eval()
            row["test_nll"] = evaluate_nll(model, self.test_x)
            model.train()
            self.last_test = row["test_nll"]
        show: dict = {"loss": total}
        if nfe_fwd is not None:
            show["nfe"] = nfe_fwd
        if getattr(self, "last_test", None) is not None:
            show["test_nll"] = self.last_test
        return StepOutput(total, row, show)

    def finish(self) -> dict:
        return _summary(self.model, self.run.config, self.run.history, self.test_x,
                        self.run.elapsed())

    def plot(self, final: dict) -> list[str]:
        cfg, args, out = self.run.config, self.run.args, self.run.out
        self.model.eval()
        plot_density_figure(self.model, cfg["data"], out / "density.png", n=args.grid,
                            n_samples=args.plot_samples,
                            title=f"{model_label(cfg)} on {cfg['data']}: test NLL "
                                  f"{final['test_nll']:.3f} nats")
        if not self.is_cnf:
            return ["density.png"]
        plot_evolution_figure(self.model, out / "evolution.png", n=args.grid,
                              n_samples=args.plot_samples)
        plot_nfe_per_step(self.run.history, out / "nfe.png",
                          title=f"{model_label(cfg)} on {cfg['data']}, regularisation: "
                                f"{regularization_label(cfg)}")
        return ["density.png", "evolution.png", "nfe.png"]

    def report(self, final: dict) -> str:
        return f"test NLL {final['test_nll']:.4f} nats"


build_parser, run = runner.entry_points(CNFExperiment)


def _summary(model, cfg, history, test_x, elapsed) -> dict:
    final = history[-1]
    nfe = [r["nfe_forward"] for r in history if r["nfe_forward"] is not None]
    nfe_b = [r["nfe_backward"] for r in history if r["nfe_backward"] is not None]
    times = [r["iter_time_s"] for r in history]
    summary = {
        "test_nll": final["test_nll"],
        "train_loss_last100": sum(r["loss"] for r in history[-100:]) / len(history[-100:]),
        "iters": final["iter"],
        "params": count_parameters(model),
        "model": model_label(cfg),
        "mean_nfe_forward": sum(nfe) / len(nfe) if nfe else None,
        "mean_nfe_forward_last100": (sum(nfe[-100:]) / len(nfe[-100:])) if nfe else None,
        "mean_nfe_forward_last10": (sum(nfe[-10:]) / len(nfe[-10:])) if nfe else None,
        "regularization": regularization_label(cfg),
        "mean_nfe_backward": sum(nfe_b) / len(nfe_b) if nfe_b else None,
        "sec_per_iter": sum(times) / len(times),
        "sec_per_iter_last100": sum(times[-100:]) / len(times[-100:]),
        "train_time_s": elapsed,
        "end_time": float(model.end_time.detach()) if isinstance(model, CNF) else None,
        "config": cfg,
    }
    if cfg["data"] in ("8gaussians", "checkerboard"):
        # The data's own entropy: the best NLL any model can reach on this test set.
        summary["true_nll"] = -float(toy2d_log_density(cfg["data"], test_x.double()).mean())
    return summary


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def _hist_panel(ax, pts: torch.Tensor, lim: float, bins: int, title: str) -> None:
    p = pts.detach().cpu().double().numpy()
    ax.hist2d(p[:, 0], p[:, 1], bins=bins, range=[[-lim, lim], [-lim, lim]], cmap="viridis")
    _style(ax, title, lim)


def _density_panel(ax, xs, ys, logp, lim: float, title: str) -> None:
    dens = logp.detach().cpu().double().exp().nan_to_num(0.0).numpy()
    ax.pcolormesh(xs.cpu().numpy(), ys.cpu().numpy(), dens, cmap="viridis", shading="auto")
    _style(ax, title, lim)


def _style(ax, title: str, lim: float) -> None:
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


@torch.no_grad()
def plot_density_figure(model, data: str, path: Path, n: int = 100, lim: float = 4.0,
                        n_samples: int = 20000, title: str = "") -> None:
    """Three panels: data samples, the model's density on a grid, the model's samples."""
    plt = pyplot()
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    data_pts = sample_toy2d(data, n_samples, gen, dtype=dtype)
    xs, ys, logp = model.log_prob_grid(lim, n)
    samples = model.sample(n_samples, generator=torch.Generator().manual_seed(1))
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    _hist_panel(axes[0], data_pts, lim, n, "data samples")
    _density_panel(axes[1], xs, ys, logp, lim, "learned density")
    _hist_panel(axes[2], samples, lim, n, "model samples")
    save_figure(fig, path, title=title)


@torch.no_grad()
def plot_evolution_figure(model: CNF, path: Path, n: int = 100, lim: float = 4.0,
                          n_samples: int = 20000, n_times: int = 5) -> None:
    """The paper's Figure 6 style: samples (top) and density (bottom) at times 0..T."""
    plt = pyplot()
    dtype = next(model.parameters()).dtype
    z0 = torch.randn(n_samples, 2, generator=torch.Generator().manual_seed(1), dtype=dtype)
    times, zs, _ = model.trajectory(z0, n_times)
    fig, axes = plt.subplots(2, n_times, figsize=(2.2 * n_times, 4.6))
    for k in range(n_times):
        s = float(times[k])
        _hist_panel(axes[0, k], zs[k], lim, n, f"samples, t={s:.2f}")
        xs, ys, logp = model.log_prob_grid(lim, n, time=s)
        _density_panel(axes[1, k], xs, ys, logp, lim, f"density, t={s:.2f}")
    save_figure(fig, path)
