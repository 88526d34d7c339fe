"""``neuralode train mnist``: ODE-Net, RK-Net, ResNet and MLP on MNIST (paper's Table 1).

Training follows torchdiffeq's ``odenet_mnist.py``: SGD with momentum 0.9, learning rate
0.1 x batch/128, decayed x0.1 at epochs 60, 100 and 140 of 160 (scaled to ``--epochs``),
random 28x28 crops of the 4-pixel zero-padded images, cross-entropy loss. The test set is
evaluated after every epoch.

Files in ``--out DIR`` (rank 0 only): ``metrics.csv`` (one row per epoch), ``metrics.json``
(final metrics: ``test_error``, ``params``, ``epochs``...), ``checkpoint.pt`` (written
atomically after every epoch, every ``--checkpoint-every`` steps and at ``--max-steps``;
``--resume`` continues from it exactly: parameters, optimizer, schedule position, data order and
RNG state) and ``training.png``.

Runs under ``torchrun --nproc_per_node=N`` with DistributedDataParallel (gloo on CPU, nccl on
CUDA): every rank takes its slice of each global batch of ``--batch-size`` images, and the
loss is scaled so that the averaged gradient is the gradient of the mean over the global batch.
With a fixed-grid solver (or ResNet/MLP) N processes therefore follow the 1-process run up to
float rounding; an adaptive solver controls its error over each rank's own slice, so its steps
(and the result, within the tolerance) can differ from the 1-process run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuralode.data.mnist import MNIST, SPLITS, BatchLoader, default_root, shared_data_dir
from neuralode.experiments._common import (
    DistEnv,
    MetricsWriter,
    ProgressBar,
    atomic_save,
    format_table,
    get_rng_state,
    load_checkpoint,
    parse_device,
    pyplot,
    seed_everything,
    set_rng_state,
)
from neuralode.experiments._common import (
    nonnegative_int as _nonneg_int,
)
from neuralode.experiments._common import (
    positive_float as _positive_float,
)
from neuralode.experiments._common import (
    positive_int as _positive_int,
)
from neuralode.models.classifiers import MODEL_NAMES, build_classifier, count_parameters
from neuralode.solvers import ALIASES, SOLVERS

__all__ = [
    "CHECKPOINT_NAME",
    "build_parser",
    "evaluate",
    "learning_rate",
    "load_split",
    "model_from_checkpoint",
    "model_kwargs",
    "run",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
PAPER_DECAY_EPOCHS = (60, 100, 140)
PAPER_EPOCHS = 160
TRAIN_SPLITS = ("train", "train-5k")
# Arguments that define the model and the run; a resumed run must not change them.
RUN_DEFINING = ("model", "epochs", "method", "tol", "step_size", "adjoint", "width", "batch_size", "lr",
                "momentum", "weight_decay", "decay_epochs", "decay_factor", "augment",
                "train_split", "train_limit", "seed")


# --------------------------------------------------------------------------- arguments


def _epoch_list(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated epochs such as 60,100,140, got {text!r}") from None
    if any(v < 0 for v in values) or values != sorted(values):
        raise argparse.ArgumentTypeError(f"decay epochs must be increasing and >= 0, got {text!r}")
    return values


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``neuralode train mnist`` to ``parser``."""
    parser.description = ("Train ODE-Net / RK-Net / ResNet / MLP on MNIST (Chen et al. 2018, "
                          "Table 1). Also runs under torchrun --nproc_per_node=N.")
    methods = sorted(set(SOLVERS) | set(ALIASES))
    m = parser.add_argument_group("model")
    m.add_argument("--model", choices=MODEL_NAMES, default="odenet",
                   help="odenet: ODE block + adjoint; rknet: ODE block, backprop through the "
                        "solver; resnet: 6 residual blocks; mlp: 784-300-10 (default odenet)")
    m.add_argument("--method", choices=methods, default="dopri5", metavar="METHOD",
                   help=f"ODE solver of the ODE block (default dopri5); one of {', '.join(methods)}")
    m.add_argument("--tol", type=_positive_float, default=1e-3,
                   help="rtol = atol of the ODE block's solver (default 1e-3)")
    m.add_argument("--step-size", type=_positive_float, default=None,
                   help="step size for fixed-grid methods (euler, rk4, ...)")
    m.add_argument("--adjoint", action=argparse.BooleanOptionalAction, default=None,
                   help="gradients by the adjoint method (default: on for odenet; rknet never)")
    m.add_argument("--width", type=_positive_int, default=64,
                   help="channels of the convolutional models (default 64)")
    t = parser.add_argument_group("training")
    t.add_argument("--epochs", type=_positive_int, default=PAPER_EPOCHS,
                   help=f"epochs (default {PAPER_EPOCHS}, the paper's)")
    t.add_argument("--batch-size", type=_positive_int, default=128,
                   help="global batch size over all processes (default 128)")
    t.add_argument("--test-batch-size", type=_positive_int, default=1000,
                   help="evaluation batch size (default 1000)")
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="initial learning rate (default 0.1 * batch_size / 128)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay (default 0)")
    t.add_argument("--decay-epochs", type=_epoch_list, default=None,
                   help="epochs (may be fractional) at which the learning rate is multiplied by "
                        "--decay-factor (default 60,100,140 scaled by epochs/160)")
    t.add_argument("--decay-factor", type=_positive_float, default=0.1,
                   help="learning-rate decay factor (default 0.1)")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random 28x28 crops of the 4-pixel padded images (default on)")
    t.add_argument("--eval-every", type=_positive_int, default=1,
                   help="evaluate on the test set every N epochs and after the last (default 1)")
    t.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop (with a checkpoint) once this many optimizer steps are done in "
                        "total; --resume continues")
    d = parser.add_argument_group("data")
    d.add_argument("--data-dir", default=None,
                   help=f"directory of the MNIST IDX files (default $NEURALODE_DATA or "
                        f"{default_root()}); the offline copy in shared/data/mnist is used for "
                        f"files missing there")
    d.add_argument("--download", action="store_true",
                   help="download the official train/test files into --data-dir if missing")
    d.add_argument("--train-split", choices=TRAIN_SPLITS, default="train",
                   help="train: the official 60,000 images; train-5k: the 5,000-image offline "
                        "subset (default train)")
    d.add_argument("--train-limit", type=_positive_int, default=None,
                   help="train on a fixed random subset of this many images (for quick runs)")
    d.add_argument("--test-limit", type=_positive_int, default=None,
                   help="evaluate on the first N test images (default: all 10,000)")
    o = parser.add_argument_group("run")
    o.add_argument("--out", default=None, help="output directory (default runs/mnist/MODEL)")
    o.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint")
    o.add_argument("--checkpoint-every", type=_nonneg_int, default=0,
                   help="also checkpoint every N optimizer steps (default 0: once per epoch)")
    o.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default 0)")
    o.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    o.add_argument("--threads", type=_nonneg_int, default=0,
                   help="torch CPU threads (default 0: torch's default)")
    o.add_argument("--no-plot", action="store_true", help="do not write training.png")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------- model


def model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``build_classifier`` keyword arguments from a run's arguments."""
    kw: dict[str, Any] = {"width": config.get("width", 64)}
    if config["model"] in ("odenet", "rknet"):
        options = {"step_size": config["step_size"]} if config.get("step_size") else None
        kw.update(method=config["method"], rtol=config["tol"], atol=config["tol"],
                  options=options, adjoint=config.get("adjoint"))
    return kw


def model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                          ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a run directory or its ``checkpoint.pt``; returns
    ``(model in eval mode, checkpoint dict)``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    ckpt = load_checkpoint(path, map_location=device)
    config = ckpt["config"]
    model = build_classifier(config["model"], **model_kwargs(config))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- data


def _subset(ds: MNIST, limit: int | None, random_subset: bool) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    images, labels = ds.images, ds.labels
    if limit is None or limit >= len(labels):
        return images, labels
    if random_subset:  # a fixed subset: the 5k split is sorted by digit
        index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(4))[:limit]
        index = index.sort().values
    else:
        index = torch.arange(limit)
    return images[index], labels[index]


def load_split(split: str, data_dir: str | None, download: bool = False,
               env: DistEnv | None = None) -> MNIST:
    """The MNIST split from ``data_dir`` (default per-user cache), downloading missing official
    files if ``download`` (rank 0 only, the others wait), else falling back to the offline
    copy in shared/data/mnist when it holds the files."""
    env = env or DistEnv()
    root = Path(data_dir).expanduser() if data_dir else default_root()
    if download and split in ("train", "test"):
        if env.is_main:
            MNIST(root, split, download=True)
        env.barrier()
    try:
        return MNIST(root, split)
    except FileNotFoundError:
        shared = shared_data_dir()
        if all((shared / name).is_file() for name in SPLITS[split][:2]):
            return MNIST(shared, split)
        raise


# --------------------------------------------------------------------------- schedule


def decay_epochs(config: dict[str, Any]) -> list[float]:
    if config.get("decay_epochs") is not None:
        return list(config["decay_epochs"])
    return [e * config["epochs"] / PAPER_EPOCHS for e in PAPER_DECAY_EPOCHS]


def base_lr(config: dict[str, Any]) -> float:
    return config["lr"] if config.get("lr") else 0.1 * config["batch_size"] / 128


def learning_rate(step: int, steps_per_epoch: int, config: dict[str, Any]) -> float:
    """Learning rate of optimizer step ``step`` (0-based): piecewise constant, multiplied by
    ``decay_factor`` at every decay epoch passed."""
    boundaries = [round(e * steps_per_epoch) for e in decay_epochs(config)]
    passed = sum(step >= b for b in boundaries)
    return base_lr(config) * config["decay_factor"] ** passed


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             device: torch.device, env: DistEnv | None = None, progress: bool = False
             ) -> dict[str, float]:
    """Test loss, error and mean forward NFE per batch over ``(images, labels)`` (uint8 or
    normalized float images); each rank evaluates its contiguous shard and the sums are
    all-reduced."""
    env = env or DistEnv()
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    n = len(labels)
    lo, hi = env.rank * n // env.world_size, (env.rank + 1) * n // env.world_size
    loader = BatchLoader((images[lo:hi], labels[lo:hi]), batch_size, shuffle=False)
    bar = ProgressBar(len(loader), "  eval", enabled=progress)
    loss_sum = correct = nfe_sum = batches = 0.0
    block = getattr(net, "ode_block", None)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = net(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
        batches += 1
        if block is not None:
            nfe_sum += block.nfe_forward
        bar.update(1)
    bar.close()
    net.train(was_training)
    loss_sum, correct, nfe_sum, batches, count = env.all_reduce_sum(
        [loss_sum, correct, nfe_sum, batches, hi - lo], device)
    return {"test_loss": loss_sum / count, "test_error": 1.0 - correct / count,
            "test_nfe_forward": nfe_sum / batches if block is not None else float("nan")}


# --------------------------------------------------------------------------- training


class _UsageError(Exception):
    """A problem with the arguments or the run directory, reported without a traceback."""


def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k != "command_name"}
    if args.model == "rknet" and args.adjoint:
        raise _UsageError("--model rknet backpropagates through the solver; --adjoint is for "
                          "--model odenet (or leave --adjoint out)")
    if args.model in ("resnet", "mlp") and (args.adjoint or args.step_size is not None):
        raise _UsageError(f"--adjoint/--step-size apply to the ODE models (odenet, rknet), not "
                          f"to --model {args.model}")
    return config


def _batch_sizes(n: int, batch_size: int, drop_last: bool) -> list[int]:
    full, rest = divmod(n, batch_size)
    return [batch_size] * full + ([rest] if rest and not drop_last else [])


def _history_row(epoch: int, step: int, lr: float, acc: dict[str, float], test: dict[str, float],
                 train_time: float, has_block: bool) -> dict[str, Any]:
    steps = max(acc["steps"], 1)
    return {"epoch": epoch, "step": step, "lr": lr,
            "train_loss": acc["loss"] / max(acc["count"], 1),
            "train_error": 1.0 - acc["correct"] / max(acc["count"], 1),
            "test_loss": test["test_loss"], "test_error": test["test_error"],
            "nfe_forward": acc["nfe_f"] / steps if has_block else math.nan,
            "nfe_backward": acc["nfe_b"] / steps if has_block else math.nan,
            "test_nfe_forward": test["test_nfe_forward"],
            "epoch_time_s": acc["time"], "images_per_s": acc["count"] / max(acc["time"], 1e-9),
            "train_time_s": train_time}


def _new_acc() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "count": 0.0, "nfe_f": 0.0, "nfe_b": 0.0,
            "steps": 0.0, "time": 0.0}


def _plot(out: Path, history: list[dict[str, Any]], title: str) -> None:
    if not history:
        return
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    has_nfe = not all(math.isnan(r["nfe_forward"]) for r in history)
    fig, axes = plt.subplots(1, 3 if has_nfe else 2, figsize=(12 if has_nfe else 8, 3.2))
    axes[0].plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    axes[0].plot(epochs, [r["test_loss"] for r in history], "s-", label="test")
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", yscale="log")
    axes[0].legend()
    axes[1].plot(epochs, [100 * r["train_error"] for r in history], "o-", label="train")
    axes[1].plot(epochs, [100 * r["test_error"] for r in history], "s-", label="test")
    axes[1].set(xlabel="epoch", ylabel="error (%)", yscale="log")
    axes[1].legend()
    if has_nfe:
        axes[2].plot(epochs, [r["nfe_forward"] for r in history], "o-", label="forward (train)")
        axes[2].plot(epochs, [r["nfe_backward"] for r in history], "s-", label="backward")
        axes[2].set(xlabel="epoch", ylabel="NFE per step")
        axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; returns the exit status."""
    try:
        return _train(args)
    except (_UsageError, FileNotFoundError, ValueError) as e:
        print(f"neuralode train mnist: error: {e}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    env = DistEnv.from_env()
    device = env.init(parse_device(args.device))
    try:
        return _train_loop(args, config, env, device)
    finally:
        env.close()


def _train_loop(args, config: dict[str, Any], env: DistEnv, device: torch.device) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size % env.world_size:
        raise _UsageError(f"--batch-size {args.batch_size} must be divisible by the number of "
                          f"processes ({env.world_size})")
    out = Path(args.out) if args.out else Path("runs") / "mnist" / args.model
    ckpt_path = out / CHECKPOINT_NAME
    ckpt = None
    if args.resume:
        if not ckpt_path.is_file():
            raise _UsageError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise _UsageError(f"{ckpt_path}: unknown checkpoint format {ckpt.get('format')!r}")
        changed = [k for k in RUN_DEFINING if ckpt["config"].get(k) != config.get(k)]
        if changed:
            diffs = ", ".join(f"--{k.replace('_', '-')} {ckpt['config'].get(k)!r} -> "
                              f"{config.get(k)!r}" for k in changed)
            raise _UsageError(f"--resume: the run in {out} was started with different settings "
                              f"({diffs}); resume with the same ones")
    elif ckpt_path.exists():
        raise _UsageError(f"{out} already holds a run ({ckpt_path}); pass --resume to continue "
                          f"it or choose another --out")
    progress = env.is_main and not args.quiet

    # data
    train_ds = load_split(args.train_split, args.data_dir, args.download, env)
    test_ds = load_split("test", args.data_dir, args.download, env)
    train_images, train_labels = _subset(train_ds, args.train_limit, random_subset=True)
    test_images, test_labels = _subset(test_ds, args.test_limit, random_subset=False)
    n_train = len(train_labels)
    # Every rank needs at least one image of every batch: drop a too-small last batch.
    drop_last = 0 < n_train % args.batch_size < env.world_size
    loader = BatchLoader((train_images, train_labels), args.batch_size, shuffle=True,
                         augment=args.augment, seed=args.seed, drop_last=drop_last,
                         rank=env.rank, world_size=env.world_size)
    sizes = _batch_sizes(n_train, args.batch_size, drop_last)
    steps_per_epoch = len(sizes)
    if steps_per_epoch == 0:
        raise _UsageError(f"no training batches: {n_train} images, batch size {args.batch_size}")

    # model and optimizer
    seed_everything(args.seed)
    net = build_classifier(args.model, **model_kwargs(config)).to(device)
    n_params = count_parameters(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=base_lr(config), momentum=args.momentum,
                                weight_decay=args.weight_decay)
    epoch, batch, step, train_time = 0, 0, 0, 0.0
    history: list[dict[str, Any]] = []
    acc = _new_acc()
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, batch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        train_time, history, acc = ckpt["train_time"], ckpt["history"], ckpt["acc"]
        set_rng_state(ckpt["rng"])
    model: nn.Module = net
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    block = net.ode_block
    writer = MetricsWriter(out)

    def save_checkpoint() -> None:
        if env.is_main:
            atomic_save({"format": CHECKPOINT_FORMAT, "config": config, "model": net.state_dict(),
                         "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": batch,
                         "step": step, "train_time": train_time, "history": history,
                         "acc": acc, "rng": get_rng_state(), "params": n_params,
                         "world_size": env.world_size}, ckpt_path)

    def write_metrics(finished: bool) -> None:
        if not env.is_main:
            return
        if history:
            writer.write_rows(history)
        evaluated = [r for r in history if not math.isnan(r["test_error"])]
        last = history[-1] if history else {}
        last_eval = evaluated[-1] if evaluated else {}
        writer.write_json({
            "model": args.model, "params": n_params, "epochs": len(history),
            "epochs_planned": args.epochs, "step": step, "finished": finished,
            "test_error": last_eval.get("test_error"), "test_loss": last_eval.get("test_loss"),
            "test_error_epoch": last_eval.get("epoch"),
            "train_loss": last.get("train_loss"), "train_error": last.get("train_error"),
            "nfe_forward": last.get("nfe_forward"), "nfe_backward": last.get("nfe_backward"),
            "test_nfe_forward": last_eval.get("test_nfe_forward"),
            "best_test_error": min((r["test_error"] for r in evaluated), default=None),
            "train_time_s": train_time, "images_per_s": last.get("images_per_s"),
            "method": args.method if block is not None else None,
            "tol": args.tol if block is not None else None,
            "adjoint": block.adjoint if block is not None else None,
            "train_split": args.train_split, "n_train": n_train, "n_test": len(test_labels),
            "batch_size": args.batch_size, "world_size": env.world_size, "seed": args.seed,
            "device": str(device), "torch_threads": torch.get_num_threads(),
            "data_dirs": sorted({str(train_ds.root), str(test_ds.root)})})

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        kind = f"{args.model} ({n_params:,} parameters"
        if block is not None:
            kind += f", {args.method} tol {args.tol:g}, adjoint {block.adjoint}"
        print(f"{kind}); {n_train} training images ({args.train_split}), {len(test_labels)} "
              f"test images, {env.world_size} process(es) on {device}; writing to {out}"
              + (f"; resuming at epoch {epoch + 1}, step {step}" if ckpt else ""),
              file=sys.stderr)

    net.train()
    while epoch < args.epochs:
        bar = ProgressBar(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", enabled=progress,
                          start=batch)
        for x, y in loader.iter_epoch(epoch, start_batch=batch):
            t_start = time.perf_counter()
            lr = learning_rate(step, steps_per_epoch, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum = F.cross_entropy(logits, y, reduction="sum")
            # DDP averages gradients over ranks: scale so that this is the global batch mean.
            (loss_sum * (env.world_size / sizes[batch])).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t_start
            train_time += elapsed
            acc["time"] += elapsed
            acc["loss"] += float(loss_sum.detach())
            acc["correct"] += float((logits.argmax(1) == y).sum())
            acc["count"] += len(y)
            acc["steps"] += 1
            postfix: dict[str, Any] = {"loss": float(loss_sum.detach()) / max(len(y), 1),
                                       "acc": acc["correct"] / acc["count"]}
            if block is not None:
                acc["nfe_f"] += block.nfe_forward
                acc["nfe_b"] += block.nfe_backward
                postfix.update(nfe_f=block.nfe_forward, nfe_b=block.nfe_backward)
            postfix["img/s"] = round(acc["count"] * env.world_size / max(acc["time"], 1e-9))
            bar.update(1, **postfix)
            batch += 1
            step += 1
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                save_checkpoint()
            if args.max_steps is not None and step >= args.max_steps and batch < steps_per_epoch:
                bar.close()
                save_checkpoint()
                write_metrics(finished=False)
                if env.is_main:
                    print(f"stopped at step {step} (--max-steps); continue with --resume",
                          file=sys.stderr)
                return 0
        bar.close()
        # epoch done: gather the training sums over ranks and evaluate
        totals = env.all_reduce_sum([acc[k] for k in ("loss", "correct", "count", "nfe_f",
                                                      "nfe_b", "steps")], device)
        epoch_acc = dict(zip(("loss", "correct", "count", "nfe_f", "nfe_b", "steps"), totals))
        epoch_acc["time"] = acc["time"]
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            test = evaluate(model, test_images, test_labels, args.test_batch_size, device, env,
                            progress=progress)
        else:
            test = {"test_loss": math.nan, "test_error": math.nan, "test_nfe_forward": math.nan}
        history.append(_history_row(epoch + 1, step, lr, epoch_acc, test, train_time,
                                    block is not None))
        if block is not None:
            block.reset_nfe()
        epoch, batch, acc = epoch + 1, 0, _new_acc()
        save_checkpoint()
        write_metrics(finished=epoch >= args.epochs)
        if env.is_main:
            r = history[-1]
            nfe = (f", NFE forward {r['nfe_forward']:.1f} backward {r['nfe_backward']:.1f}"
                   if block is not None else "")
            test_text = ("" if math.isnan(r["test_error"])
                         else f", test error {100 * r['test_error']:.2f}%")
            print(f"epoch {epoch}: train loss {r['train_loss']:.4f}{test_text}{nfe}",
                  file=sys.stderr)
        if args.max_steps is not None and step >= args.max_steps and epoch < args.epochs:
            if env.is_main:
                print(f"stopped at step {step} (--max-steps); continue with --resume",
                      file=sys.stderr)
            return 0

    if env.is_main:
        if not args.no_plot:
            _plot(out, history, f"MNIST {args.model} ({n_params:,} parameters)")
        headers = ["epoch", "train loss", "train err %", "test err %", "NFE fwd", "NFE bwd",
                   "img/s", "time s"]
        rows = [[r["epoch"], round(r["train_loss"], 4), round(100 * r["train_error"], 2),
                 round(100 * r["test_error"], 2),
                 "-" if block is None else round(r["nfe_forward"], 1),
                 "-" if block is None else round(r["nfe_backward"], 1),
                 round(r["images_per_s"]), round(r["train_time_s"], 1)] for r in history]
        print(format_table(rows, headers))
        print(f"{args.model}: test error {100 * history[-1]['test_error']:.2f}% with "
              f"{n_params:,} parameters after {len(history)} epochs; metrics in "
              f"{writer.json_path}")
    return 0
