"""``neuralode analyze cnf-compare``: density matching, planar flows vs CNFs (paper's Fig. 4).

For each target p(z) ∝ exp(-U(z)) of Rezende & Mohamed (2015) and each capacity, a planar flow
with K layers and a CNF with M hypernetwork units (:class:`HyperNetDynamics`) are trained to
minimise

    KL(q || p) = E_{z0 ~ N(0, I)} [ log q(x) + U(x) ] + log Z,        x = flow(z0),

with Adam on fresh base samples every iteration. ``u2``..``u4`` do not decay along z1, so, as
in the paper's pictures, the target lives on the box [-4, 4]^2: U gets a soft wall
``sum_i relu(|z_i| - 4)^2 / (2 * 0.1^2)`` outside it. log Z is computed by quadrature on a fine
grid, so the reported ``kl`` is an estimate of the KL divergence itself (>= 0 up to Monte
Carlo error; 0 is a perfect fit).

Output in ``--out DIR``:
  results.json   one record per (target, model, size): kl, loss (kl - log Z), params, time
  table.md       KL (nats) per target, planar K vs CNF M
  compare.png    target densities and every learned density
  kl_vs_size.png KL against K / M per target (paper's Fig. 4a)
  models/        the trained flows (state dicts), used for the plots and by --resume

``--resume`` keeps the finished runs of ``results.json`` and trains only the missing ones.
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

from neuralode.data.toy2d import POTENTIALS, potential_energy
from neuralode.errors import MaxStepsError, StepSizeError
from neuralode.experiments.cnf import parse_int_list
from neuralode.experiments.runner import (
    UsageError,
    add_method_argument,
    add_tolerance_arguments,
    atomic_write_text,
    check_rtol,
    load_checkpoint,
    parse_device,
    progress_bar,
    pyplot,
    save_checkpoint,
    save_figure,
    solver_options,
)
from neuralode.experiments.runner import nonnegative_int as _nonnegative_int
from neuralode.experiments.runner import positive_float as _positive_float
from neuralode.experiments.runner import positive_int as _positive_int
from neuralode.experiments.runner import threads as _threads
from neuralode.models.classifiers import count_parameters
from neuralode.models.cnf import CNF, HyperNetDynamics
from neuralode.models.planar import PlanarFlow

BOX = 4.0
WALL = 0.1
MODELS = ("planar", "cnf")


def boxed_energy(name: str, z: torch.Tensor) -> torch.Tensor:
    """U(z) plus the soft wall that confines the target to [-4, 4]^2."""
    outside = torch.relu(z.abs() - BOX)
    return potential_energy(name, z) + (outside**2).sum(-1) / (2 * WALL**2)


def log_partition(name: str, lim: float = 6.0, n: int = 1201) -> float:
    """log Z = log int exp(-U_box) over the plane, by the midpoint-style grid sum (float64)."""
    xs = torch.linspace(-lim, lim, n, dtype=torch.float64)
    gy, gx = torch.meshgrid(xs, xs, indexing="ij")
    energy = boxed_energy(name, torch.stack([gx, gy], -1))
    cell = float(xs[1] - xs[0]) ** 2
    return float(torch.logsumexp(-energy.reshape(-1), 0)) + math.log(cell)


def build_flow(model: str, size: int, args: argparse.Namespace) -> nn.Module:
    if model == "planar":
        return PlanarFlow(2, size, mode="generative")
    dyn = HyperNetDynamics(2, width=size, hidden=args.hyper_hidden)
    return CNF(dyn, t1=args.t1, estimator="exact", method=args.method, rtol=args.rtol,
               atol=args.atol, options=solver_options(args.method, args.max_num_steps))


def _loss(flow: nn.Module, target: str, n: int, gen: torch.Generator, device) -> torch.Tensor:
    """Monte Carlo E_q[log q(x) + U_box(x)] (the KL up to log Z)."""
    if isinstance(flow, CNF):
        x, log_q = flow.sample(n, generator=gen, device=device, return_log_prob=True)
    else:
        x, log_q = flow.sample(n, generator=gen, return_log_prob=True)
    return (log_q + boxed_energy(target, x)).mean()


def build_parser(parser: argparse.ArgumentParser, name: str) -> None:
    parser.description = ("Density matching (paper's Fig. 4): planar flows with K layers vs "
                          "CNFs with M units, minimising KL(q || p) for p ∝ exp(-U).")
    parser.add_argument("--targets", default=",".join(POTENTIALS),
                        help=f"comma-separated potentials from: {', '.join(POTENTIALS)}")
    parser.add_argument("--sizes", type=parse_int_list, default=(1, 32, 64),
                        help="K (planar layers) and M (CNF units), comma-separated")
    parser.add_argument("--models", default="planar,cnf",
                        help=f"comma-separated from: {', '.join(MODELS)}")
    parser.add_argument("--iters-planar", type=_positive_int, default=5000,
                        help="training iterations of each planar flow (default 5000)")
    parser.add_argument("--iters-cnf", type=_positive_int, default=1000,
                        help="training iterations of each CNF (default 1000)")
    parser.add_argument("--lr-planar", type=_positive_float, default=1e-2,
                        help="Adam learning rate of the planar flows (default 1e-2)")
    parser.add_argument("--lr-cnf", type=_positive_float, default=3e-3,
                        help="Adam learning rate of the CNFs (default 3e-3)")
    parser.add_argument("--batch-size", type=_positive_int, default=256,
                        help="base samples per iteration (default 256)")
    parser.add_argument("--eval-samples", type=_positive_int, default=8192,
                        help="base samples for the final KL estimate")
    parser.add_argument("--hyper-hidden", type=_positive_int, default=32,
                        help="hidden width of the CNF's hypernetwork")
    parser.add_argument("--t1", type=_positive_float, default=1.0,
                        help="integration time T of the CNFs (default 1)")
    add_method_argument(parser, "dopri5", "ODE solver of the CNFs")
    add_tolerance_arguments(parser, "the CNF solves", "1e-5", "1e-5")
    parser.add_argument("--seed", type=_nonnegative_int, default=0,
                        help="random seed (default 0)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, cuda:N or mps (default cpu)")
    parser.add_argument("--threads", type=_threads, default=None,
                        help="torch CPU threads, 1 to the CPUs available (default: torch's)")
    parser.add_argument("--max-num-steps", type=_positive_int, default=10_000,
                        help="step cap of every adaptive CNF solve (default 10000)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (required)")
    parser.add_argument("--resume", action="store_true",
                        help="keep finished runs from OUT/results.json, train the rest")
    parser.add_argument("--no-plot", action="store_true", help="do not write plots")
    parser.add_argument("--grid", type=_positive_int, default=100,
                        help="plot grid resolution (default 100)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _split_choices(text: str, valid: tuple[str, ...], flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in valid]
    if not items or bad:
        raise ValueError(f"{flag}: unknown {bad or text!r}; valid choices are: "
                         f"{', '.join(valid)}")
    return items


def run(args: argparse.Namespace) -> int:
    name = getattr(args, "command_name", "cnf-compare")
    try:
        return _run(args)
    except (UsageError, ValueError) as err:  # CheckpointError is a UsageError
        print(f"neuralode analyze {name}: error: {err}", file=sys.stderr)
        return 2
    except (MaxStepsError, StepSizeError, FloatingPointError) as err:
        print(f"neuralode analyze {name}: error: a flow's dynamics became stiff or blew up "
              f"({str(err).split(';')[0]}); lower --lr-cnf or raise --max-num-steps",
              file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    targets = _split_choices(args.targets, POTENTIALS, "--targets")
    models = _split_choices(args.models, MODELS, "--models")
    check_rtol(args.rtol)
    device = parse_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory; choose a directory")
    (out / "models").mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results: dict[str, dict] = {}
    if args.resume and results_path.exists():
        results = json.loads(results_path.read_text())["runs"]
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                if k in ("iters_planar", "iters_cnf", "lr_planar", "lr_cnf", "batch_size",
                         "eval_samples", "hyper_hidden", "t1", "method", "rtol", "atol", "seed")}
    log_z = {t: log_partition(t) for t in targets}

    for target in targets:
        for model in models:
            for size in args.sizes:
                key = f"{target}/{model}/{size}"
                if key in results and _model_path(out, key).exists():
                    continue
                results[key] = _train_one(target, model, size, args, device, log_z[target], out)
                atomic_write_text(results_path, json.dumps(
                    {"settings": settings, "log_z": log_z, "runs": results}, indent=2) + "\n")

    table = results_table(results, targets, models, args.sizes)
    atomic_write_text(out / "table.md", table)
    print(table)
    if not args.no_plot:
        plot_compare(out, results, targets, models, args, device)
        plot_kl_vs_size(out / "kl_vs_size.png", results, targets, models, args.sizes)
    return 0


def _model_path(out: Path, key: str) -> Path:
    """Where the flow of the run ``TARGET/MODEL/SIZE`` is kept."""
    return out / "models" / f"{key.replace('/', '_')}.pt"


def _size_label(model: str, size: int) -> str:  # planar K=SIZE or CNF M=SIZE
    return f"{'planar K' if model == 'planar' else 'CNF M'}={size}"


def _train_one(target: str, model: str, size: int, args, device, log_z: float,
               out: Path) -> dict:
    # Each run gets its own seed from (seed, target, model, size) so runs are independent of
    # which others were requested or resumed.
    offset = (POTENTIALS.index(target) * 1000 + MODELS.index(model) * 100000 + size)
    torch.manual_seed(args.seed * 1_000_003 + offset)
    gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + offset + 1)
    flow = build_flow(model, size, args).to(device)
    iters = args.iters_planar if model == "planar" else args.iters_cnf
    lr = args.lr_planar if model == "planar" else args.lr_cnf
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    label = f"{target} {model} {'K' if model == 'planar' else 'M'}={size} "
    bar = progress_bar(iters, desc=label, enabled=not args.quiet)
    t0 = time.perf_counter()
    nfe = []
    for it in range(1, iters + 1):
        loss = _loss(flow, target, args.batch_size, gen, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label}: loss became {float(loss)} at iteration {it}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if isinstance(flow, CNF):
            nfe.append(flow.last_stats.nfe)
        bar.set_postfix(kl=f"{float(loss.detach()) + log_z:.4g}", refresh=False)
        bar.update(1)
    bar.close()
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        eval_gen = torch.Generator(device=device).manual_seed(12345)
        losses = [float(_loss(flow, target, n, eval_gen, device))
                  for n in _chunks(args.eval_samples, 4096)]
        sizes = _chunks(args.eval_samples, 4096)
        loss = sum(v * n for v, n in zip(losses, sizes)) / sum(sizes)
    save_checkpoint(flow.state_dict(), _model_path(out, f"{target}/{model}/{size}"))
    return {"target": target, "model": model, "size": size, "params": count_parameters(flow),
            "iters": iters, "loss": loss, "kl": loss + log_z, "train_time_s": train_s,
            "sec_per_iter": train_s / iters,
            "mean_nfe_forward": (sum(nfe) / len(nfe)) if nfe else None}


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - k) for k in range(0, total, size)]


def results_table(results: dict, targets, models, sizes) -> str:
    head = ["target"] + [_size_label(m, s) for m in models for s in sizes]
    lines = ["KL(q || p) in nats (lower is better; 0 is a perfect fit)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in targets:
        cells = [t]
        for m in models:
            for s in sizes:
                r = results.get(f"{t}/{m}/{s}")
                cells.append("" if r is None else f"{r['kl']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | params | s/iter |", "|---|---|---|"]
    for m in models:
        for s in sizes:
            rs = [results[f"{t}/{m}/{s}"] for t in targets if f"{t}/{m}/{s}" in results]
            if rs:
                spi = sum(r["sec_per_iter"] for r in rs) / len(rs)
                lines.append(f"| {_size_label(m, s)} | {rs[0]['params']} | {spi:.4f} |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def plot_compare(out: Path, results: dict, targets, models, args, device) -> None:
    from neuralode.experiments.cnf import _density_panel

    plt = pyplot()
    cols = [(m, s) for m in models for s in args.sizes]
    fig, axes = plt.subplots(len(targets), 1 + len(cols),
                             figsize=(1.9 * (1 + len(cols)), 1.9 * len(targets)), squeeze=False)
    n = args.grid
    for i, target in enumerate(targets):
        xs = torch.linspace(-BOX, BOX, n, dtype=torch.float64)
        gy, gx = torch.meshgrid(xs, xs, indexing="ij")
        logp = -boxed_energy(target, torch.stack([gx, gy], -1)) - log_partition(target)
        _density_panel(axes[i, 0], xs, xs, logp, BOX, f"{target} target")
        for j, (m, s) in enumerate(cols, start=1):
            key = f"{target}/{m}/{s}"
            path = _model_path(out, key)
            ax = axes[i, j]
            if key not in results or not path.exists():
                ax.axis("off")
                continue
            flow = build_flow(m, s, args).to(device)
            flow.load_state_dict(load_checkpoint(path, map_location=device))
            gxs, gys, lp = flow.log_prob_grid(BOX, n)
            _density_panel(ax, gxs, gys, lp, BOX,
                           f"{_size_label(m, s)}\nKL {results[key]['kl']:.2f}")
    save_figure(fig, out / "compare.png", dpi=70)


def plot_kl_vs_size(path: Path, results: dict, targets, models, sizes) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets), 3), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for m in models:
            pts = [(s, results[f"{target}/{m}/{s}"]["kl"]) for s in sizes
                   if f"{target}/{m}/{s}" in results]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                        label="planar (K)" if m == "planar" else "CNF (M)")
        ax.set_title(target)
        ax.set_xlabel("K / M")
        ax.set_ylabel("KL (nats)")
        ax.legend(fontsize=8)
    save_figure(fig, path)
