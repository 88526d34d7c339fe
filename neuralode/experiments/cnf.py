"""``neuralode train cnf``: maximum-likelihood training of a CNF or a planar flow on 2-D toys.

    neuralode train cnf --data moons --model cnf --estimator exact --iters 2000 --out runs/m

Each iteration draws a fresh batch from the toy distribution (``neuralode.data.toy2d``) and
takes one Adam step on the negative log-likelihood. A fixed test set (the same points for every
run, independent of ``--seed``) gives ``test_nll`` in nats, always with the exact trace.

Output in ``--out DIR``:
  metrics.csv       one row per iteration: loss, NFE (forward and, with --adjoint, backward),
                    seconds, learning rate; test NLL on evaluation rows
  metrics.json      final summary: test_nll, NFE and time per iteration, parameter count...
  checkpoint.pt     model, optimizer, schedule, iteration and RNG states (atomic, regular)
  density.png       data, learned density and model samples
  evolution.png     (CNF) samples and density at 5 times from t=0 to T (paper's Figure 6)

``--resume`` continues from ``DIR/checkpoint.pt`` and reproduces the uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from neuralode.data.toy2d import TOY_DATASETS, sample_toy2d, toy2d_log_density
from neuralode.experiments._common import atomic_save as atomic_torch_save
from neuralode.experiments._common import atomic_write_text, pyplot
from neuralode.experiments._common import positive_float as _positive_float
from neuralode.experiments._common import positive_int as _positive_int
from neuralode.experiments._training_io import ProgressBar, write_csv
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
CHECKPOINT = "checkpoint.pt"
# Settings that must agree between a checkpoint and a --resume call.
_RESUME_KEYS = ("data", "model", "dynamics", "width", "hyper_hidden", "hidden", "activation",
                "layers", "estimator", "noise", "t1", "train_time", "method", "rtol", "atol",
                "adjoint", "batch_size", "lr", "lr_schedule", "seed", "test_size", "dtype")


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


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device: invalid device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


# ---------------------------------------------------------------------------------------------
# model construction
# ---------------------------------------------------------------------------------------------


def build_model(cfg: dict) -> nn.Module:
    """The flow described by a config dict (the parsed arguments, see ``build_parser``)."""
    if cfg["model"] == "planar":
        return PlanarFlow(2, cfg["layers"], mode="normalizing")
    if cfg["dynamics"] == "hypernet":
        dyn = HyperNetDynamics(2, width=cfg["width"], hidden=cfg["hyper_hidden"])
    else:
        dyn = ConcatMLPDynamics(2, hidden=tuple(cfg["hidden"]), activation=cfg["activation"])
    return CNF(dyn, t1=cfg["t1"], train_time=cfg["train_time"], estimator=cfg["estimator"],
               noise=cfg["noise"], method=cfg["method"], rtol=cfg["rtol"], atol=cfg["atol"],
               adjoint=cfg["adjoint"])


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


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Maximum-likelihood training of a continuous normalizing flow (or a "
                          "planar flow baseline) on a 2-D toy density.")
    parser.add_argument("--data", choices=TOY_DATASETS, default="moons", help="toy dataset")
    parser.add_argument("--model", choices=MODELS, default="cnf")
    g = parser.add_argument_group("CNF")
    g.add_argument("--dynamics", choices=DYNAMICS, default="concat",
                   help="hypernet: the paper's gated time-dependent units (width --width); "
                        "concat: MLP with t appended to every layer (--hidden)")
    g.add_argument("--width", type=_positive_int, default=32, help="M, hypernet units")
    g.add_argument("--hyper-hidden", type=_positive_int, default=32,
                   help="hidden width of the hypernetwork of t")
    g.add_argument("--hidden", type=parse_int_list, default=(64, 64, 64),
                   help="concat-MLP hidden widths, comma-separated")
    g.add_argument("--activation", choices=tuple(ACTIVATIONS), default="tanh")
    g.add_argument("--estimator", choices=ESTIMATORS, default="exact",
                   help="divergence: exact trace or Hutchinson's estimator")
    g.add_argument("--noise", choices=NOISE_KINDS, default="gaussian",
                   help="Hutchinson probe distribution")
    g.add_argument("--t1", type=_positive_float, default=0.5, help="integration time T")
    g.add_argument("--train-time", action="store_true", help="learn T")
    g.add_argument("--method", default="dopri5", help="ODE solver (see `neuralode methods`)")
    g.add_argument("--rtol", type=_positive_float, default=1e-5)
    g.add_argument("--atol", type=_positive_float, default=1e-5)
    g.add_argument("--adjoint", action="store_true", help="gradients by the adjoint method")
    p = parser.add_argument_group("planar flow")
    p.add_argument("--layers", type=_positive_int, default=64, help="K, planar layers")
    t = parser.add_argument_group("training")
    t.add_argument("--iters", type=_positive_int, default=1000)
    t.add_argument("--batch-size", type=_positive_int, default=512)
    t.add_argument("--lr", type=_positive_float, default=1e-3)
    t.add_argument("--lr-schedule", choices=SCHEDULES, default="constant")
    t.add_argument("--test-size", type=_positive_int, default=5000)
    t.add_argument("--eval-every", type=_positive_int, default=None,
                   help="iterations between test evaluations (default: iters/5)")
    t.add_argument("--ckpt-every", type=_positive_int, default=100,
                   help="iterations between checkpoints")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", type=Path, required=True, help="output folder")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (must have the same settings)")
    t.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    t.add_argument("--grid", type=_positive_int, default=100, help="plot grid resolution")
    t.add_argument("--plot-samples", type=_positive_int, default=20000,
                   help="samples drawn for the sample histograms")
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


_CSV_COLUMNS = ["iter", "loss", "nfe_forward", "nfe_backward", "iter_time_s", "lr", "end_time",
                "test_nll"]


def _config(args: argparse.Namespace) -> dict:
    keys = list(_RESUME_KEYS) + ["iters"]
    cfg = {k: getattr(args, k) for k in keys}
    cfg["hidden"] = list(cfg["hidden"])
    return cfg


def _make_scheduler(opt: torch.optim.Optimizer, cfg: dict):
    if cfg["lr_schedule"] == "cosine":
        total = cfg["iters"]
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, total) / total)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)


def _check_resume(saved: dict, cfg: dict) -> None:
    keys = list(_RESUME_KEYS) + (["iters"] if cfg["lr_schedule"] == "cosine" else [])
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {cfg.get(k)!r}" for k in keys
            if saved.get(k) != cfg.get(k)]
    if diff:
        raise SystemExit("--resume: the checkpoint was made with different settings; use the "
                         "same ones or a new --out folder:\n  " + "\n  ".join(diff))


def run(args: argparse.Namespace) -> int:
    try:
        return train(args)
    except ValueError as err:  # bad model settings (e.g. an unknown --method)
        print(f"neuralode train cnf: {err}", file=sys.stderr)
        return 2


def train(args: argparse.Namespace) -> int:
    if args.model == "cnf" and args.method is not None:
        from neuralode.solvers import ALIASES, SOLVERS

        if args.method not in SOLVERS and args.method not in ALIASES:
            raise ValueError(f"unknown --method {args.method!r}; valid methods are: "
                             f"{', '.join(sorted(SOLVERS) + sorted(ALIASES))}")
    if args.adjoint:
        try:
            from neuralode.adjoint import odeint_adjoint  # noqa: F401
        except ImportError:
            raise ValueError("--adjoint needs neuralode.odeint_adjoint, not in this install")
    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = _config(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    eval_every = args.eval_every or max(args.iters // 5, 1)

    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device=device, dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = _make_scheduler(opt, cfg)
    data_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    test_x = sample_toy2d(args.data, args.test_size, torch.Generator().manual_seed(TEST_SEED),
                          dtype=dtype).to(device)
    history: list[dict] = []
    start, elapsed = 0, 0.0

    if args.resume:
        if ckpt_path.exists():
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            _check_resume(state["config"], cfg)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            data_gen.set_state(state["data_gen"])
            noise_gen.set_state(state["noise_gen"])
            torch.set_rng_state(state["torch_rng"])
            history, start, elapsed = state["history"], state["iteration"], state["elapsed_s"]
            print(f"resuming from {ckpt_path} at iteration {start}", file=sys.stderr)
        else:
            print(f"--resume: no checkpoint at {ckpt_path}; starting from scratch",
                  file=sys.stderr)
    if start > args.iters:
        raise ValueError(f"the checkpoint is at iteration {start}, beyond --iters {args.iters}")

    def save_checkpoint(iteration: int) -> None:
        atomic_torch_save({
            "config": cfg, "iteration": iteration, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "data_gen": data_gen.get_state(), "noise_gen": noise_gen.get_state(),
            "torch_rng": torch.get_rng_state(), "history": history, "elapsed_s": elapsed,
        }, ckpt_path)
        write_csv(out / "metrics.csv", history, _CSV_COLUMNS)

    is_cnf = isinstance(model, CNF)
    bar = None if args.quiet else ProgressBar(args.iters, start=start, label=f"{args.data} ")
    model.train()
    for it in range(start + 1, args.iters + 1):
        t0 = time.perf_counter()
        x = sample_toy2d(args.data, args.batch_size, data_gen, dtype=dtype).to(device)
        if is_cnf:
            loss = -model.log_prob(x, generator=noise_gen).mean()
            nfe_fwd = model.last_stats.nfe
        else:
            loss = -model.log_prob(x).mean()
            nfe_fwd = None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nfe_bwd = None
        if is_cnf and args.adjoint:
            nfe_bwd = model.last_nfe - nfe_fwd
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at iteration {it}; try a "
                                     f"smaller --lr or tighter --rtol/--atol")
        opt.step()
        sched.step()
        dt = time.perf_counter() - t0
        elapsed += dt
        row = {"iter": it, "loss": float(loss.detach()), "nfe_forward": nfe_fwd, "nfe_backward": nfe_bwd,
               "iter_time_s": round(dt, 5), "lr": opt.param_groups[0]["lr"],
               "end_time": float(model.end_time.detach()) if is_cnf else None, "test_nll": None}
        if it % eval_every == 0 or it == args.iters:
            model.eval()
            row["test_nll"] = evaluate_nll(model, test_x)
            model.train()
        history.append(row)
        if it % args.ckpt_every == 0 or it == args.iters:
            save_checkpoint(it)
        if bar:
            info = {"loss": row["loss"]}
            if nfe_fwd is not None:
                info["nfe"] = nfe_fwd
            last_test = next((r["test_nll"] for r in reversed(history)
                              if r["test_nll"] is not None), None)
            if last_test is not None:
                info["test_nll"] = last_test
            bar.update(it, **info)

    if not history:
        raise ValueError("no iterations were run")
    summary = _summary(model, cfg, history, test_x, elapsed)
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    write_csv(out / "metrics.csv", history, _CSV_COLUMNS)
    if not args.no_plot:
        model.eval()
        plot_density_figure(model, args.data, out / "density.png", n=args.grid,
                            n_samples=args.plot_samples,
                            title=f"{model_label(cfg)} on {args.data}: test NLL "
                                  f"{summary['test_nll']:.3f} nats")
        if is_cnf:
            plot_evolution_figure(model, out / "evolution.png", n=args.grid,
                                  n_samples=args.plot_samples)
    print(f"test NLL {summary['test_nll']:.4f} nats; wrote {out}", file=sys.stderr)
    return 0


def _summary(model, cfg, history, test_x, elapsed) -> dict:
    final = history[-1]
    nfe = [r["nfe_forward"] for r in history if r["nfe_forward"] is not None]
    nfe_b = [r["nfe_backward"] for r in history if r["nfe_backward"] is not None]
    times = [r["iter_time_s"] for r in history]
    summary = {
        "test_nll": final["test_nll"],
        "train_loss_last100": sum(r["loss"] for r in history[-100:]) / len(history[-100:]),
        "iters": final["iter"],
        "params": parameter_count(model),
        "model": model_label(cfg),
        "mean_nfe_forward": sum(nfe) / len(nfe) if nfe else None,
        "mean_nfe_forward_last100": (sum(nfe[-100:]) / len(nfe[-100:])) if nfe else None,
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
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
