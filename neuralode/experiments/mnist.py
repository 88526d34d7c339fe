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

Runs under ``torchrun --nproc_per_node=N`` (gloo on CPU, nccl on CUDA), like every training
command of the shared runner: every rank takes its slice of each global batch of
``--batch-size`` images, its loss is its share of the global batch mean, and the gradients are
summed over ranks. With a fixed-grid solver (or ResNet/MLP) N processes therefore follow the
1-process run up to float rounding; an adaptive solver controls its error over each rank's own
slice, so its steps (and the result, within the tolerance) can differ from the 1-process run.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuralode.data.mnist import MNIST, BatchLoader, default_root, resolve_data_dir
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
    CHECKPOINT_NAME,
    DistEnv,
    Experiment,
    StepOutput,
    UsageError,
    add_gradient_argument,
    add_method_argument,
    check_rtol,
    format_table,
    load_checkpoint,
    nonnegative_float,
    positive_float,
    positive_int,
    progress_bar,
    pyplot,
    save_figure,
    write_csv,
)
from neuralode.gradients import describe
from neuralode.models.classifiers import MODEL_NAMES, build_classifier, count_parameters

__all__ = ["CHECKPOINT_NAME", "build_parser", "evaluate", "learning_rate", "load_split",
           "model_from_checkpoint", "model_kwargs", "run"]

PAPER_DECAY_EPOCHS = (60, 100, 140)
PAPER_EPOCHS = 160
TRAIN_SPLITS = ("train", "train-5k")
# Arguments that define the model and the run; a resumed run must not change them.
RUN_DEFINING = ("model", "epochs", "method", "tol", "step_size", "gradient", "width",
                "batch_size", "lr", "momentum", "weight_decay", "decay_epochs", "decay_factor",
                "augment", "train_split", "train_limit", "seed", *REGULARIZATION_KEYS)


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


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model")
    m.add_argument("--model", choices=MODEL_NAMES, default="odenet",
                   help="odenet: ODE block + adjoint; rknet: ODE block, the solver's own "
                        "gradient (backprop or checkpoint); resnet: 6 residual blocks; mlp: "
                        "784-300-10 (default odenet)")
    add_method_argument(m, "dopri5", "ODE solver of the ODE block")
    m.add_argument("--tol", type=positive_float, default=1e-3,
                   help="rtol = atol of the ODE block's solver (default 1e-3)")
    m.add_argument("--step-size", type=positive_float, default=None,
                   help="step size for fixed-grid methods (euler, rk4, ...)")
    add_gradient_argument(m, None, default_text="adjoint for odenet, backprop for rknet",
                          extra="; rknet takes backprop or checkpoint")
    m.add_argument("--per-sample", action=argparse.BooleanOptionalAction, default=False,
                   help="solve each image as its own problem (own adaptive steps): results "
                        "independent of the batch and of how it is split across processes")
    m.add_argument("--width", type=positive_int, default=64,
                   help="channels of the convolutional models (default 64)")
    add_regularization_arguments(parser, steer_help="the ODE block's end time (T = 1)")
    t = parser.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int, default=PAPER_EPOCHS,
                   help=f"epochs (default {PAPER_EPOCHS}, the paper's)")
    t.add_argument("--batch-size", type=positive_int, default=128,
                   help="global batch size over all processes (default 128)")
    t.add_argument("--test-batch-size", type=positive_int, default=1000,
                   help="evaluation batch size (default 1000)")
    t.add_argument("--lr", type=positive_float, default=None,
                   help="initial learning rate (default 0.1 * batch_size / 128)")
    t.add_argument("--momentum", type=nonnegative_float, default=0.9,
                   help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=nonnegative_float, default=0.0,
                   help="SGD weight decay (default 0)")
    t.add_argument("--decay-epochs", type=_epoch_list, default=None,
                   help="epochs (may be fractional) at which the learning rate is multiplied by "
                        "--decay-factor (default 60,100,140 scaled by epochs/160)")
    t.add_argument("--decay-factor", type=positive_float, default=0.1,
                   help="learning-rate decay factor (default 0.1)")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random 28x28 crops of the 4-pixel padded images (default on)")
    t.add_argument("--eval-every", type=positive_int, default=1,
                   help="evaluate on the test set every N epochs and after the last (default 1)")
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
    d.add_argument("--train-limit", type=positive_int, default=None,
                   help="train on a fixed random subset of this many images (for quick runs)")
    d.add_argument("--test-limit", type=positive_int, default=None,
                   help="evaluate on the first N test images (default: all 10,000)")


# --------------------------------------------------------------------------- model


def model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``build_classifier`` keyword arguments from a run's arguments."""
    kw: dict[str, Any] = {"width": config.get("width", 64)}
    if config["model"] in ("odenet", "rknet"):
        regs = build_regularizers(config)
        if regs:
            kw["regularizers"] = regs
        if config.get("steer"):
            kw["steer"] = config["steer"]
        if config.get("augment_dims"):
            kw["augment"] = config["augment_dims"]
    if config["model"] in ("odenet", "rknet"):
        options = {"step_size": config["step_size"]} if config.get("step_size") else None
        gradient = config.get("gradient")
        if gradient is None and config.get("adjoint") is not None:  # runs saved before --gradient
            gradient = "adjoint" if config["adjoint"] else "backprop"
        kw.update(method=config["method"], rtol=config["tol"], atol=config["tol"],
                  options=options, gradient=gradient)
        if config.get("per_sample"):
            kw["per_sample"] = True
    return kw


def model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                          ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a run directory or its ``checkpoint.pt``; returns
    ``(model in eval mode, checkpoint dict)``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    ckpt = load_checkpoint(path, map_location=device)  # tensors and plain values only
    config = ckpt["config"]
    model = build_classifier(config["model"], **model_kwargs(config))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- data


def subset(ds: MNIST, limit: int | None, random_subset: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``limit`` images of ``ds`` and their labels (all where ``limit`` is None or not
    smaller): a fixed random subset (``random_subset``), else the first ``limit``."""
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
    """The MNIST split from ``data_dir``, downloading missing official files if ``download``
    (rank 0 only, the others wait). Without ``--data-dir`` the per-user cache is used, or the
    offline copy in shared/data/mnist when the cache lacks the files; a given ``--data-dir``
    is used alone (a missing or incomplete one is an error, never silently replaced)."""
    env = env or DistEnv()
    root = resolve_data_dir(split, data_dir, download)
    if download and split in ("train", "test"):
        if env.is_main:
            MNIST(root, split, download=True)
        env.barrier()
    return MNIST(root, split)


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
    mine = env.shard(len(labels))
    loader = BatchLoader((images[mine], labels[mine]), batch_size, shuffle=False)
    bar = progress_bar(len(loader), desc="  eval", enabled=progress, leave=False)
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
    loss_sum, correct, nfe_sum, batches, count = env.all_reduce(
        [loss_sum, correct, nfe_sum, batches, mine.stop - mine.start])
    return {"test_loss": loss_sum / count, "test_error": 1.0 - correct / count,
            "test_nfe_forward": nfe_sum / batches if block is not None else float("nan")}


# --------------------------------------------------------------------------- training


def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in ("command_name", "argv")}
    if args.model == "rknet" and args.gradient in ("adjoint", "interpolated_adjoint"):
        raise UsageError("--model rknet's gradient is the solver's own: --gradient backprop or "
                         "checkpoint[:N]; the adjoint is for --model odenet")
    if args.model in ("resnet", "mlp") and (args.gradient is not None
                                             or args.step_size is not None):
        raise UsageError(f"--gradient/--step-size apply to the ODE models (odenet, rknet), not "
                         f"to --model {args.model}")
    if args.model in ("resnet", "mlp") and (build_regularizers(config) or args.steer
                                             or args.augment_dims):
        raise UsageError(f"--kinetic/--jacobian-frobenius/--second-derivative/--steer/"
                         f"--augment-dims apply to the ODE models (odenet, rknet), not to "
                         f"--model {args.model}")
    if args.steer >= 1.0:
        raise UsageError(f"--steer must be smaller than the ODE block's end time 1, got "
                         f"{args.steer:g}")
    if args.model in ("odenet", "rknet") and args.gradient is None:
        config["gradient"] = "adjoint" if args.model == "odenet" else "backprop"
    check_rtol(args.tol, flag="--tol")
    world = DistEnv.from_env().world_size
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of "
                         f"processes ({world})")
    check_compile(config, args)
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
    save_figure(fig, out / "training.png", dpi=90)


class MNISTExperiment(Experiment):
    """``neuralode train mnist`` on the shared runner: one step is one optimizer step; the
    test set is evaluated (and a checkpoint written) at the end of every epoch."""

    name = "mnist"
    description = ("Train ODE-Net / RK-Net / ResNet / MLP on MNIST (Chen et al. 2018, Table 1). "
                   "Also runs under torchrun --nproc_per_node=N.")
    run_keys = RUN_DEFINING
    default_ckpt_every = 0

    def default_out(self, args: argparse.Namespace) -> str:
        return f"runs/mnist/{args.model}"

    add_arguments = staticmethod(_add_arguments)
    configure = staticmethod(_config_from_args)

    def setup(self) -> None:
        run, args, config = self.run, self.run.args, self.run.config
        env, device = run.dist, run.device
        self.train_ds = load_split(args.train_split, args.data_dir, args.download, env)
        self.test_ds = load_split("test", args.data_dir, args.download, env)
        train_images, train_labels = subset(self.train_ds, args.train_limit, random_subset=True)
        self.test_images, self.test_labels = subset(self.test_ds, args.test_limit,
                                                     random_subset=False)
        self.n_train = n_train = len(train_labels)
        # Every rank needs at least one image of every batch: drop a too-small last batch.
        drop_last = 0 < n_train % args.batch_size < env.world_size
        self.loader = BatchLoader((train_images, train_labels), args.batch_size, shuffle=True,
                                  augment=args.augment, seed=args.seed, drop_last=drop_last,
                                  rank=env.rank, world_size=env.world_size)
        self.sizes = _batch_sizes(n_train, args.batch_size, drop_last)
        self.steps_per_epoch = len(self.sizes)
        if self.steps_per_epoch == 0:
            raise UsageError(f"no training batches: {n_train} images, batch size "
                             f"{args.batch_size}")
        kw = model_kwargs(config)
        if "method" in kw:
            kw["options"] = run.options(config["method"], kw.get("options"))
        self.model = build_classifier(args.model, **kw).to(device)
        env.broadcast_parameters(self.model)
        self.n_params = count_parameters(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=base_lr(config),
                                         momentum=args.momentum, weight_decay=args.weight_decay)
        self.block = self.model.ode_block
        self.acc, self.train_time = _new_acc(), 0.0
        self.step_nfe: list[dict[str, int]] = []  # NFE of every training step
        self._batches = None  # the data iterator of the current epoch
        self._next_step = -1
        kind = f"{args.model} ({self.n_params:,} parameters"
        if self.block is not None:
            kind += f", {args.method} tol {args.tol:g}, gradient {describe(self.block.gradient)}"
        run.log(f"{kind}); {n_train} training images ({args.train_split}), "
                f"{len(self.test_labels)} test images")
        self.model.train()

    @property
    def total_steps(self) -> int:
        return self.run.args.epochs * self.steps_per_epoch

    def progress_label(self, steps_done: int) -> str:
        epoch = min(steps_done // self.steps_per_epoch, self.run.args.epochs - 1)
        return f"epoch {epoch + 1}/{self.run.args.epochs}"

    def checkpoint_due(self, steps_done: int) -> bool:
        return steps_done % self.steps_per_epoch == 0

    def train_step(self, step: int) -> StepOutput:
        run, args, env, block = self.run, self.run.args, self.run.dist, self.block
        epoch, batch = divmod(step, self.steps_per_epoch)
        if self._batches is None or batch == 0 or step != self._next_step:
            self._batches = self.loader.iter_epoch(epoch, start_batch=batch)
        x, y = next(self._batches)
        self._next_step = step + 1
        acc, config = self.acc, run.config
        t_start = time.perf_counter()
        lr = learning_rate(step, self.steps_per_epoch, config)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = x.to(run.device), y.to(run.device)
        logits = self.model(x)
        loss_sum = F.cross_entropy(logits, y, reduction="sum")
        # each rank's share of the global batch mean; the runner sums gradients over ranks
        objective = loss_sum / self.sizes[batch]
        if block is not None and block.regularizers:
            # the integrals' batch mean, weighted by this rank's share of the batch
            objective = objective + block.regularization_loss() * (len(y) / self.sizes[batch])
        objective.backward()
        env.sum_gradients(self.model.parameters())
        loss_value = float(loss_sum.detach())
        (global_loss,) = env.all_reduce([loss_value / self.sizes[batch]])
        if math.isfinite(global_loss):  # the runner stops the run on a non-finite loss
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t_start
        self.train_time += elapsed
        acc["time"] += elapsed
        acc["loss"] += loss_value
        acc["correct"] += float((logits.argmax(1) == y).sum())
        acc["count"] += len(y)
        acc["steps"] += 1
        show: dict[str, Any] = {"loss": global_loss, "acc": acc["correct"] / acc["count"]}
        if block is not None:
            acc["nfe_f"] += block.nfe_forward
            acc["nfe_b"] += block.nfe_backward
            show.update(nfe_f=block.nfe_forward, nfe_b=block.nfe_backward)
            self.step_nfe.append({"step": step + 1, "nfe_forward": block.nfe_forward,
                                  "nfe_backward": block.nfe_backward})
        show["img/s"] = round(acc["count"] * env.world_size / max(acc["time"], 1e-9))
        if batch + 1 < self.steps_per_epoch:
            return StepOutput(global_loss, None, show)
        # epoch done: gather the training sums over ranks and evaluate
        keys = ("loss", "correct", "count", "nfe_f", "nfe_b", "steps")
        epoch_acc = dict(zip(keys, env.all_reduce([acc[k] for k in keys])))
        epoch_acc["time"] = acc["time"]
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            test = evaluate(self.model, self.test_images, self.test_labels, args.test_batch_size,
                            run.device, env, progress=run.is_main and not args.quiet)
        else:
            test = {"test_loss": math.nan, "test_error": math.nan, "test_nfe_forward": math.nan}
        row = _history_row(epoch + 1, step + 1, lr, epoch_acc, test, self.train_time,
                           block is not None)
        if block is not None:
            block.reset_nfe()
        self.acc = _new_acc()
        nfe = (f", NFE forward {row['nfe_forward']:.1f} backward {row['nfe_backward']:.1f}"
               if block is not None else "")
        test_text = ("" if math.isnan(row["test_error"])
                     else f", test error {100 * row['test_error']:.2f}%")
        run.log(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}{test_text}{nfe}")
        return StepOutput(global_loss, row, show)

    def state_dict(self) -> dict[str, Any]:
        step = self.run.step
        return {**super().state_dict(), "epoch": step // self.steps_per_epoch,
                "batch": step % self.steps_per_epoch, "train_time": self.train_time,
                "acc": dict(self.acc), "params": self.n_params,
                "step_nfe": list(self.step_nfe)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.train_time, self.acc = state["train_time"], dict(state["acc"])
        self.step_nfe = list(state.get("step_nfe", []))

    def finish(self) -> dict[str, Any]:
        args, history, block = self.run.args, self.run.history, self.block
        if self.step_nfe and self.run.is_main:
            write_csv(self.run.out / "nfe_steps.csv", self.step_nfe)
        evaluated = [r for r in history if not math.isnan(r["test_error"])]
        last = history[-1] if history else {}
        last_eval = evaluated[-1] if evaluated else {}
        return {
            "model": args.model, "params": self.n_params, "epochs": len(history),
            "epochs_planned": args.epochs, "step": self.run.step,
            "test_error": last_eval.get("test_error"), "test_loss": last_eval.get("test_loss"),
            "test_error_epoch": last_eval.get("epoch"),
            "train_loss": last.get("train_loss"), "train_error": last.get("train_error"),
            "nfe_forward": last.get("nfe_forward"), "nfe_backward": last.get("nfe_backward"),
            "nfe_forward_last10_steps": (sum(r["nfe_forward"] for r in self.step_nfe[-10:])
                                         / len(self.step_nfe[-10:]) if self.step_nfe else None),
            "regularization": regularization_label(self.run.config),
            "test_nfe_forward": last_eval.get("test_nfe_forward"),
            "best_test_error": min((r["test_error"] for r in evaluated), default=None),
            "train_time_s": self.train_time, "images_per_s": last.get("images_per_s"),
            "method": args.method if block is not None else None,
            "tol": args.tol if block is not None else None,
            "gradient": describe(block.gradient) if block is not None else None,
            "train_split": args.train_split, "n_train": self.n_train,
            "n_test": len(self.test_labels), "batch_size": args.batch_size,
            "seed": args.seed, "device": str(self.run.device),
            "data_dirs": sorted({str(self.train_ds.root), str(self.test_ds.root)})}

    def plot(self, final: dict[str, Any]) -> list[str]:
        title = f"MNIST {self.run.args.model} ({self.n_params:,} parameters)"
        _plot(self.run.out, self.run.history, title)
        if not self.step_nfe:
            return ["training.png"]
        plot_nfe_per_step(self.step_nfe, self.run.out / "nfe.png", x_key="step",
                          title=f"{title}, regularisation: "
                                f"{regularization_label(self.run.config)}")
        return ["training.png", "nfe.png"]

    def report(self, final: dict[str, Any]) -> str:
        history, block = self.run.history, self.block
        headers = ["epoch", "train loss", "train err %", "test err %", "NFE fwd", "NFE bwd",
                   "img/s", "time s"]
        rows = [[r["epoch"], round(r["train_loss"], 4), round(100 * r["train_error"], 2),
                 round(100 * r["test_error"], 2),
                 "-" if block is None else round(r["nfe_forward"], 1),
                 "-" if block is None else round(r["nfe_backward"], 1),
                 round(r["images_per_s"]), round(r["train_time_s"], 1)] for r in history]
        return (format_table(rows, headers) + f"\n{self.run.args.model}: test error "
                f"{100 * history[-1]['test_error']:.2f}% with {self.n_params:,} parameters "
                f"after {len(history)} epochs")


build_parser, run = runner.entry_points(MNISTExperiment)
