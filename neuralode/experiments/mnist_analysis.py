"""``neuralode analyze mnist-table1`` and ``neuralode analyze mnist-fig3``: the paper's Table 1
and Figure 3 from runs of ``neuralode train mnist``.

mnist-table1
    For each model: test error and parameters (from ``RUNS/MODEL/metrics.json``, written by
    ``neuralode train mnist --out RUNS/MODEL``), and the peak memory and time of one training
    step at ``--batch-size``, each measured in a fresh Python process: the resident set size
    before the step, then ``/proc/self/clear_refs`` is reset (``5``) and the peak
    (``VmHWM`` in ``/proc/self/status``) read after the step. Writes ``table1.md``,
    ``table1.csv`` and ``table1.png``.

mnist-fig3
    For a trained ODE-Net (``--run DIR``): test error, forward NFE and wall time at each
    tolerance of ``--tols``, forward and backward NFE of training steps at each tolerance, and
    NFE over the training epochs (from the run's ``metrics.csv``). Writes ``fig3.png`` (four
    panels), ``fig3.csv`` and ``fig3.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neuralode.data.mnist import BatchLoader
from neuralode.experiments.mnist import (
    CHECKPOINT_NAME,
    evaluate,
    load_split,
    model_from_checkpoint,
    model_kwargs,
    subset,
)
from neuralode.experiments.runner import (
    UsageError,
    atomic_write_text,
    format_table,
    load_checkpoint,
    parse_device,
    pyplot,
    save_figure,
    write_csv,
)
from neuralode.experiments.runner import positive_int as _positive_int
from neuralode.experiments.runner import threads as _threads
from neuralode.models.classifiers import (
    MODEL_NAMES,
    PAPER_TABLE1,
    build_classifier,
    count_parameters,
)

__all__ = ["build_parser", "measure_training_step", "run"]

COMMANDS = ("mnist-table1", "mnist-fig3")
DEFAULT_TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


def _float_list(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive numbers such as 1e-1,1e-3, got {text!r}"
        ) from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _model_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in MODEL_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(bad) or text!r}; valid "
                                         f"models are: {', '.join(MODEL_NAMES)}")
    return names


def build_parser(parser: argparse.ArgumentParser, name: str) -> None:
    """Options of ``neuralode analyze mnist-table1`` / ``mnist-fig3``."""
    if name not in COMMANDS:
        raise ValueError(f"unknown analysis {name!r}; valid names are: {', '.join(COMMANDS)}")
    parser.add_argument("--out", default=None,
                        help="output directory (default runs/mnist/analysis)")
    parser.add_argument("--threads", type=_threads, default=1,
                        help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--data-dir", default=None, help="MNIST directory (as for train)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    if name == "mnist-table1":
        parser.description = ("Table 1: test error, parameters, peak memory and time of a "
                              "training step for the four MNIST models.")
        parser.add_argument("--runs", default="runs/mnist",
                            help="directory with one run per model, RUNS/MODEL (default "
                                 "runs/mnist); models without a run get no test error")
        parser.add_argument("--models", type=_model_list, default=list(MODEL_NAMES),
                            help=f"comma-separated subset of {','.join(MODEL_NAMES)}")
        parser.add_argument("--batch-size", type=_positive_int, default=128,
                            help="batch size of the measured training step (default 128)")
        parser.add_argument("--steps", type=_positive_int, default=3,
                            help="training steps timed after the first (default 3)")
    else:
        parser.description = "Figure 3: statistics of a trained ODE-Net."
        parser.add_argument("--run", default="runs/mnist/odenet",
                            help="the ODE-Net run directory (default runs/mnist/odenet)")
        parser.add_argument("--tols", type=_float_list, default=list(DEFAULT_TOLS),
                            help="tolerances (rtol = atol) to evaluate at (default "
                                 f"{','.join(f'{t:g}' for t in DEFAULT_TOLS)})")
        parser.add_argument("--test-limit", type=_positive_int, default=None,
                            help="evaluate on the first N test images (default all 10,000)")
        parser.add_argument("--batch-size", type=_positive_int, default=500,
                            help="evaluation batch size (default 500)")
        parser.add_argument("--backward-batches", type=_positive_int, default=2,
                            help="training steps (batch 128) per tolerance for backward NFE "
                                 "(default 2)")


# --------------------------------------------------------------------------- memory / time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_training_step(model: str, config: dict[str, Any], batch_size: int, steps: int,
                          checkpoint: str | None = None, data_dir: str | None = None
                          ) -> dict[str, Any]:
    """Peak memory and time of SGD training steps on a batch of real test images, in this
    process (run it in a fresh one: see ``_measure_in_subprocess``). Linux only."""
    if checkpoint:
        net, _ = model_from_checkpoint(checkpoint)
    else:
        defaults = {"method": "dopri5", "tol": 1e-3, "step_size": None, "gradient": None,
                    "width": 64}
        net = build_classifier(model, **model_kwargs({**defaults, **config, "model": model}))
    net.train()
    test = load_split("test", data_dir)
    loader = BatchLoader(test, batch_size, shuffle=False)
    x, y = next(iter(loader))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    block = net.ode_block

    def step() -> tuple[float, int, int]:
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if block is None:
            return dt, 0, 0
        return dt, block.nfe_forward, block.nfe_backward

    import gc

    gc.collect()
    base_kb = _status_kb("VmRSS")
    _reset_peak_rss()
    first_time, nfe_f, nfe_b = step()
    peak_kb = _status_kb("VmHWM")
    times = sorted(step()[0] for _ in range(steps))  # sorted, for the median below
    return {"model": model, "params": count_parameters(net), "batch_size": batch_size,
            "base_rss_mib": base_kb / 1024, "peak_rss_mib": peak_kb / 1024,
            "step_memory_mib": (peak_kb - base_kb) / 1024, "first_step_s": first_time,
            "time_per_step_s": times[len(times) // 2], "nfe_forward": nfe_f,
            "nfe_backward": nfe_b, "threads": torch.get_num_threads()}


def _measure_in_subprocess(model: str, config: dict[str, Any], batch_size: int, steps: int,
                           threads: int, checkpoint: str | None, data_dir: str | None
                           ) -> dict[str, Any]:
    request = {"model": model, "config": config, "batch_size": batch_size, "steps": steps,
               "checkpoint": checkpoint, "data_dir": data_dir}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", "neuralode.experiments.mnist_analysis",
                           "--measure-step", json.dumps(request), "--threads", str(threads)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {model} failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def _table1(args: argparse.Namespace, out: Path) -> int:
    runs = Path(args.runs)
    rows: list[dict[str, Any]] = []
    for model in args.models:
        run_dir = runs / model
        metrics = _read_json(run_dir / "metrics.json")
        ckpt = run_dir / CHECKPOINT_NAME
        checkpoint = str(ckpt) if ckpt.is_file() else None
        if checkpoint:
            load_checkpoint(ckpt)  # refuse a damaged or unsafe file here, in one line
        print(f"measuring a training step of {model} in a fresh process"
              + (f" (weights of {ckpt})" if checkpoint else " (initial weights)"),
              file=sys.stderr)
        m = _measure_in_subprocess(model, {}, args.batch_size, args.steps, args.threads,
                                   checkpoint, args.data_dir)
        paper = PAPER_TABLE1[model]
        rows.append({
            "model": model,
            "test_error_pct": None if not metrics or metrics.get("test_error") is None
            else 100 * metrics["test_error"],
            "epochs": metrics.get("epochs") if metrics else None,
            "params": m["params"],
            "step_memory_mib": m["step_memory_mib"], "peak_rss_mib": m["peak_rss_mib"],
            "time_per_step_s": m["time_per_step_s"], "nfe_forward": m["nfe_forward"],
            "nfe_backward": m["nfe_backward"],
            "paper_test_error_pct": paper["test_error_pct"], "paper_params_m": paper["params_m"],
            "paper_memory": paper["memory"], "batch_size": args.batch_size,
            "threads": m["threads"]})
    headers = ["model", "test error %", "params (M)", "step memory (MiB)", "peak RSS (MiB)",
               "time/step (s)", "NFE f/b", "epochs", "paper error %", "paper params (M)",
               "paper memory"]
    table_rows = [[r["model"],
                   "n/a" if r["test_error_pct"] is None else f"{r['test_error_pct']:.2f}",
                   f"{r['params'] / 1e6:.3f}", f"{r['step_memory_mib']:.0f}",
                   f"{r['peak_rss_mib']:.0f}", f"{r['time_per_step_s']:.3f}",
                   "-" if r["model"] in ("mlp", "resnet")
                   else f"{r['nfe_forward']}/{r['nfe_backward']}",
                   r["epochs"] if r["epochs"] is not None else "n/a",
                   f"{r['paper_test_error_pct']:.2f}", f"{r['paper_params_m']:.2f}",
                   r["paper_memory"]] for r in rows]
    _write_results(out, "table1", rows, table_rows, headers,
                   None if args.no_plot else lambda path: _plot_table1(path, rows))
    return 0


def _write_results(out: Path, stem: str, rows: list[dict[str, Any]], table_rows: list[list],
                   headers: list[str], plot: Any) -> None:
    """``OUT/STEM.csv`` (the rows), ``OUT/STEM.md`` (the table, also printed as text) and,
    with ``plot`` (``plot(path)``), ``OUT/STEM.png``; then names them on stderr."""
    write_csv(out / f"{stem}.csv", rows)
    atomic_write_text(out / f"{stem}.md", format_table(table_rows, headers, markdown=True) + "\n")
    print(format_table(table_rows, headers))
    if plot is not None:
        plot(out / f"{stem}.png")
    print(f"wrote {out / f'{stem}.md'}, {out / f'{stem}.csv'}"
          + ("" if plot is None else f", {out / f'{stem}.png'}"), file=sys.stderr)


def _plot_table1(path: Path, rows: list[dict[str, Any]]) -> None:
    plt = pyplot()
    names = [r["model"] for r in rows]
    panels = [("test error (%)", [r["test_error_pct"] or 0.0 for r in rows]),
              ("parameters (M)", [r["params"] / 1e6 for r in rows]),
              ("training-step memory (MiB)", [r["step_memory_mib"] for r in rows]),
              ("time per step (s)", [r["time_per_step_s"] for r in rows])]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3))
    for ax, (label, values) in zip(axes, panels):
        ax.bar(names, values, color=["C0", "C1", "C2", "C3"][:len(names)])
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    save_figure(fig, path)


# --------------------------------------------------------------------------- figure 3


def _fig3(args: argparse.Namespace, out: Path) -> int:
    device = parse_device(args.device)
    run_dir = Path(args.run)
    net, ckpt = model_from_checkpoint(run_dir, device)
    block = net.ode_block
    if block is None:
        raise ValueError(f"{run_dir} holds a {ckpt['config']['model']!r} run; Figure 3 needs an "
                         f"ODE model (odenet or rknet)")
    test = load_split("test", args.data_dir)
    images, labels = subset(test, args.test_limit, random_subset=False)
    n = len(labels)
    train_loader = BatchLoader((images, labels), 128, shuffle=True, seed=1)
    trained_tol = block.rtol
    rows: list[dict[str, Any]] = []
    for tol in sorted(args.tols, reverse=True):
        block.set_tolerance(tol)
        t0 = time.perf_counter()
        res = evaluate(net, images, labels, args.batch_size, device)
        wall = time.perf_counter() - t0
        n_batches = math.ceil(n / args.batch_size)
        fwd, bwd = [], []
        net.train()
        for b, (x, y) in enumerate(train_loader):
            if b >= args.backward_batches:
                break
            F.cross_entropy(net(x.to(device)), y.to(device)).backward()
            fwd.append(block.nfe_forward)
            bwd.append(block.nfe_backward)
            net.zero_grad(set_to_none=True)
        net.eval()
        rows.append({"tol": tol, "test_error_pct": 100 * res["test_error"],
                     "nfe_forward": res["test_nfe_forward"],
                     "eval_time_per_batch_s": wall / n_batches, "eval_time_s": wall,
                     "train_nfe_forward": sum(fwd) / len(fwd),
                     "train_nfe_backward": sum(bwd) / len(bwd), "n_test": n,
                     "batch_size": args.batch_size})
        r = rows[-1]
        print(f"tol {tol:g}: test error {r['test_error_pct']:.2f}%, NFE {r['nfe_forward']:.1f}, "
              f"{r['eval_time_per_batch_s']:.2f} s/batch, train NFE forward "
              f"{r['train_nfe_forward']:.1f} backward {r['train_nfe_backward']:.1f}",
              file=sys.stderr)
    block.set_tolerance(trained_tol)
    history = _read_history(run_dir / "metrics.csv")
    headers = ["tol", "test error %", "NFE forward", "time/batch (s)", "train NFE fwd",
               "train NFE bwd"]
    table_rows = [[f"{r['tol']:g}", f"{r['test_error_pct']:.2f}", f"{r['nfe_forward']:.1f}",
                   f"{r['eval_time_per_batch_s']:.3f}", f"{r['train_nfe_forward']:.1f}",
                   f"{r['train_nfe_backward']:.1f}"] for r in rows]
    _write_results(out, "fig3", rows, table_rows, headers, None if args.no_plot else
                   lambda path: _plot_fig3(path, rows, history, trained_tol))
    return 0


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def _plot_fig3(path: Path, rows: list[dict[str, Any]], history: list[dict[str, float]],
               trained_tol: float) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
    nfe = [r["nfe_forward"] for r in rows]
    ax = axes[0]
    ax.plot(nfe, [r["test_error_pct"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"{r['tol']:g}", (r["nfe_forward"], r["test_error_pct"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel="NFE forward", ylabel="test error (%)", title="(a) error vs NFE (tol)")
    ax = axes[1]
    ax.plot(nfe, [r["eval_time_per_batch_s"] for r in rows], "o-")
    ax.set(xlabel="NFE forward", ylabel="time per batch (s)", title="(b) time vs NFE")
    ax = axes[2]
    f = [r["train_nfe_forward"] for r in rows]
    ax.plot(f, [r["train_nfe_backward"] for r in rows], "o", label="measured")
    lim = max(f) if f else 1.0
    ax.plot([0, lim], [0, lim], "--", color="gray", lw=0.8, label="backward = forward")
    ax.plot([0, lim], [0, lim / 2], ":", color="gray", lw=0.8, label="backward = forward / 2")
    ax.set(xlabel="NFE forward", ylabel="NFE backward", title="(c) backward vs forward")
    ax.legend(fontsize=7)
    ax = axes[3]
    if history:
        ax.plot([h["epoch"] for h in history], [h["nfe_forward"] for h in history], "o-",
                label="forward")
        if all("nfe_backward" in h for h in history):
            ax.plot([h["epoch"] for h in history], [h["nfe_backward"] for h in history], "s-",
                    label="backward")
        ax.legend(fontsize=7)
    ax.set(xlabel="training epoch", ylabel="NFE per step",
           title=f"(d) NFE during training (tol {trained_tol:g})")
    save_figure(fig, path)


# --------------------------------------------------------------------------- entry points


def run(args: argparse.Namespace) -> int:
    name = getattr(args, "command_name", None)
    if name not in COMMANDS:
        print(f"neuralode analyze: unknown analysis {name!r}; valid names are: "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("runs") / "mnist" / "analysis"
    if out.exists() and not out.is_dir():
        print(f"neuralode analyze {name}: error: --out {out} is a file, not a directory",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _table1(args, out) if name == "mnist-table1" else _fig3(args, out)
    except (FileNotFoundError, ValueError, RuntimeError, UsageError) as e:
        print(f"neuralode analyze {name}: error: {e}", file=sys.stderr)
        return 2


def _worker(argv: list[str]) -> int:
    """``python -m neuralode.experiments.mnist_analysis --measure-step JSON --threads N``:
    measure one model's training step in this fresh process and print the result as JSON."""
    parser = argparse.ArgumentParser(prog="mnist_analysis worker")
    parser.add_argument("--measure-step", required=True)
    parser.add_argument("--threads", type=_positive_int, default=1)
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    req = json.loads(a.measure_step)
    result = measure_training_step(req["model"], req.get("config", {}), req["batch_size"],
                                   req["steps"], req.get("checkpoint"), req.get("data_dir"))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker(sys.argv[1:]))
