"""The one training runner behind every ``neuralode train NAME`` command.

An experiment (one module, one :class:`Experiment` subclass) supplies its arguments, its
configuration, model, data, one training step, its evaluation, final metrics and plots. The
runner does the rest, the same way for every experiment:

* command-line checks in one place (argparse types below, method names, the threads range,
  tolerances the dtype can resolve); the library's own checks of solver options are left to
  it;
* seed, device, threads, and ``torchrun`` data parallelism (each rank takes its slice of
  every global batch; gradients are summed over ranks, so N processes follow 1 process);
* the run directory: never overwritten without ``--resume`` or ``--overwrite``; stale
  temporary files are removed;
* safe checkpoints: tensors and plain Python values only, loaded with
  ``torch.load(weights_only=True)`` behind a SHA-256 header that detects truncation and
  corruption; exact resume (parameters, optimizer, schedule, data order, RNG states);
* Ctrl-C / SIGTERM: finish the current step, save, print the command that resumes, exit
  130 / 143;
* bounded work: every solve gets a step cap (``--max-num-steps``); a stiff field or a
  non-finite loss stops the run with a clear message and keeps the last good checkpoint;
* metrics (``metrics.csv``, ``metrics.json``, TensorBoard with ``--tensorboard``), tqdm
  progress bars, plots.

Experiments only; the library never imports this module.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import random
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from neuralode.errors import MaxStepsError, StepSizeError

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "DistEnv", "Experiment", "Run", "StepOutput",
           "UsageError", "add_method_argument", "atomic_write_text", "format_table",
           "load_checkpoint", "method_choice", "nonnegative_float", "nonnegative_int",
           "parse_device", "positive_float", "positive_int", "pyplot", "save_checkpoint",
           "solver_options", "write_json"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_MAGIC = b"NEURALODE-CHECKPOINT 1"
TMP_SUFFIX = ".neuralode-tmp"
RUN_FILES = (CHECKPOINT_NAME, "metrics.csv", "metrics.json")
DEFAULT_MAX_NUM_STEPS = 10_000
EXIT_USAGE, EXIT_FAILED = 2, 1
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class UsageError(Exception):
    """A bad command-line value or run directory: reported in one line, exit status 2."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, truncated, corrupted or holds code: never loaded."""


class TrainingFailed(Exception):
    """The run cannot continue (stiff dynamics, non-finite loss): exit status 1."""


# --------------------------------------------------------------------------- argparse types


def _number(text: str, kind, what: str, ok) -> Any:
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if (kind is float and not math.isfinite(v)) or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a positive finite number", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    return _number(text, float, "a finite number >= 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    return _number(text, float, "a number in (0, 1)", lambda v: 0 < v < 1)


def max_threads() -> int:
    """The largest ``--threads`` accepted: the CPUs this process may run on. More threads
    than CPUs only slow torch down (and absurd counts crash its thread pool)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads(text: str) -> int:
    limit = max_threads()
    return _number(text, int, f"a thread count from 1 to {limit} (the CPUs available here)",
                   lambda v: 1 <= v <= limit)


def check_rtol(rtol: float, dtype: torch.dtype = torch.float32, flag: str = "--rtol") -> None:
    """Refuse a relative tolerance the state's dtype cannot resolve (below 10 eps)."""
    floor = 10 * torch.finfo(dtype).eps
    if rtol < floor:
        raise UsageError(f"{flag} {rtol:g} is below what {str(dtype).replace('torch.', '')} "
                         f"can resolve (10 x eps = {floor:.3g}); use {flag} >= {floor:.2g}")


def compile_backend(name: str) -> str:
    """``--compile BACKEND``: a ``torch.compile`` backend this torch has."""
    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise argparse.ArgumentTypeError(f"unknown torch.compile backend {name!r}; this torch "
                                         f"has: {', '.join(known)}")
    return name


def check_batch_size(batch_size: int) -> None:
    """Refuse a global batch smaller than the number of processes (a rank without samples)."""
    if batch_size < DistEnv.from_env().world_size:
        raise UsageError(f"--batch-size {batch_size} is smaller than the number of processes")


GRADIENT_HELP = ("how the solve is differentiated: backprop (through the solver), checkpoint "
                 "(the same gradient in little memory), checkpoint:N (at most N states kept), "
                 "adjoint, interpolated_adjoint")


def gradient_choice(text: str) -> str:
    """A ``--gradient`` value, in its canonical spelling (``neuralode.gradients``)."""
    from neuralode.errors import ODEInputError
    from neuralode.gradients import describe

    try:
        return describe(text)
    except ODEInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_gradient_argument(parser, default: str | None, extra: str = "",
                          default_text: str | None = None) -> None:
    """The one ``--gradient`` option of every training command."""
    parser.add_argument("--gradient", type=gradient_choice, default=default,
                        metavar="{backprop,checkpoint,checkpoint:N,adjoint,interpolated_adjoint}",
                        help=f"{GRADIENT_HELP} (default: {default_text or default}){extra}")


def add_tolerance_arguments(parser, solves: str, rtol: str, atol: str,
                            atol_help: str | None = None) -> None:
    """``--rtol`` and ``--atol`` of ``solves``, their defaults written as the help shows them."""
    parser.add_argument("--rtol", type=positive_float, default=float(rtol),
                        help=f"relative tolerance of {solves} (default {rtol})")
    parser.add_argument("--atol", type=positive_float, default=float(atol),
                        help=atol_help or f"absolute tolerance of {solves} (default {atol})")


def method_choice(text: str) -> str:
    """A ``--method`` value: a name or alias of ``neuralode.SOLVERS``, checked while the
    arguments are parsed, before any work or output."""
    import difflib

    from neuralode.solvers import ALIASES, SOLVERS

    if text in SOLVERS or text in ALIASES:
        return text
    names = [*SOLVERS, *ALIASES]
    close = difflib.get_close_matches(text, names, n=3)
    maybe = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise argparse.ArgumentTypeError(
        f"unknown method {text!r}{maybe}; valid methods are: {', '.join(SOLVERS)}; aliases: "
        f"{', '.join(f'{a} = {n}' for a, n in sorted(ALIASES.items()))} "
        f"('neuralode methods' describes them)")


def add_method_argument(parser, default: str, what: str) -> None:
    """The ``--method`` option: ``what`` the solver is for; the name is checked on parsing."""
    parser.add_argument("--method", type=method_choice, default=default, metavar="METHOD",
                        help=f"{what} (default {default}; 'neuralode methods' lists them)")


def solver_options(method: str, max_num_steps: int, options: Mapping[str, Any] | None = None
                   ) -> dict[str, Any] | None:
    """``options`` plus the step cap where ``method`` takes one (adaptive methods; fixed-grid
    methods do a known number of steps). An unknown method is left to ``odeint`` to report."""
    from neuralode.solvers import ALIASES, SOLVERS

    out = dict(options or {})
    solver = SOLVERS.get(ALIASES.get(method, method))
    if solver is not None and solver.adaptive:
        out["max_num_steps"] = int(max_num_steps)
    return out or None


def stretch_schedule(sched: Any, total: int) -> None:
    """Make a learning-rate schedule loaded from a checkpoint continue as that of a run of
    ``total`` steps: its next steps take the rates a ``total``-step run has there (a finished
    cosine schedule that had decayed steps up to the longer schedule's value). For
    ``CosineAnnealingLR`` and ``LambdaLR`` (whose functions come from the new config)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR

    step = sched.last_epoch
    if isinstance(sched, CosineAnnealingLR):
        sched.T_max = total
        lrs = [sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * step / total)) / 2
               for base in sched.base_lrs]
    elif isinstance(sched, LambdaLR):
        lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    else:
        raise TypeError(f"cannot stretch a {type(sched).__name__} schedule")
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs  # what get_last_lr() reports until the next step


# --------------------------------------------------------------------------- devices


def parse_device(spec: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` as a ``torch.device`` that exists here;
    :class:`UsageError` naming the valid devices otherwise."""
    valid = ["cpu"]
    if torch.cuda.is_available():
        valid += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        valid.append("mps")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UsageError(f"invalid device {spec!r}; valid devices here are: "
                         f"{', '.join(valid)}") from None
    name = device.type if device.index is None else f"{device.type}:{device.index}"
    if name not in valid:
        raise UsageError(f"device {spec!r} is not available; valid devices here are: "
                         f"{', '.join(valid)}")
    return device


# --------------------------------------------------------------------------- randomness


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))


def get_rng_state() -> dict[str, Any]:
    """Every global generator's state, as tensors and plain lists (checkpoint-safe)."""
    np_state = cast("tuple[str, np.ndarray, int, int, float]",
                    np.random.get_state(legacy=True))  # MT19937: always the legacy tuple
    kind, keys, pos, has_gauss, gauss = np_state
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss),
                                       float(gauss)],
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- files


def _atomic_replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (temporary file, then rename)."""
    _atomic_replace(Path(path), text.encode("utf-8"))


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporary files a killed run left in ``directory``; returns them."""
    stale = sorted(directory.glob(f".*{TMP_SUFFIX}")) if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _check_plain(obj: Any, where: str = "checkpoint") -> None:
    if isinstance(obj, (torch.Tensor, str, int, float, bool, type(None))):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} holds a {type(obj).__name__}; checkpoints hold only tensors and "
                    f"plain values (dict, list, str, numbers, None)")


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``obj`` (tensors and plain values only) atomically, behind a header with the
    payload's size and SHA-256, so that truncation or corruption is detected on loading."""
    _check_plain(obj)
    buf = io.BytesIO()
    torch.save(dict(obj), buf)
    payload = buf.getvalue()
    header = (CHECKPOINT_MAGIC + b" sha256=" + hashlib.sha256(payload).hexdigest().encode()
              + b" size=" + str(len(payload)).encode() + b"\n")
    _atomic_replace(Path(path), header + payload)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`: the size and SHA-256 in its
    header must match, and the payload is unpickled with ``weights_only=True`` (tensors and
    plain values; anything that would run code is refused). Raises :class:`CheckpointError`
    naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    data = path.read_bytes()
    head, sep, payload = data.partition(b"\n")
    fields = dict(f.split(b"=", 1) for f in head[len(CHECKPOINT_MAGIC):].split() if b"=" in f)
    if not sep or not head.startswith(CHECKPOINT_MAGIC) or not {b"sha256", b"size"} <= set(fields):
        what = "is empty" if not data else "is not a neuralode checkpoint (no checksum header)"
        raise CheckpointError(f"checkpoint {path} {what}; refusing to load it")
    if str(len(payload)).encode() != fields[b"size"]:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({len(payload)} of "
                              f"{fields[b'size'].decode()} bytes); refusing to load it")
    if hashlib.sha256(payload).hexdigest().encode() != fields[b"sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupted (SHA-256 mismatch); refusing "
                              f"to load it")
    try:
        obj = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain "
                              f"values (refused, nothing was run): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:  # unreadable payload
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON, atomically; non-finite floats as NaN/Infinity."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows as CSV with the union of their keys (first-seen order) as columns, atomically."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in fields})
    atomic_write_text(path, buf.getvalue())


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(rows: Iterable[Sequence[Any]], headers: Sequence[str],
                 markdown: bool = False) -> str:
    """Rows as an aligned text table (or a Markdown table with ``markdown=True``)."""
    body = [[_fmt(c) for c in row] for row in rows]
    cols = [list(headers)] + body
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    if markdown:
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in body]
    else:
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (imported on first use)."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'neuralode[apps]' (or pass "
                         "--no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 80, title: str = "",
                fontsize: int = 10) -> None:
    """Title ``fig`` (where ``title`` is given), lay it out, write it to ``path`` and close it."""
    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def progress_bar(total: int, initial: int = 0, desc: str = "", enabled: bool = True,
                 leave: bool = True):
    """A tqdm bar on stderr (redrawn on a terminal, a line every 10 s in a log file)."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, file=sys.stderr,
                mininterval=0.1 if tty else 10.0, dynamic_ncols=tty, leave=leave)


# --------------------------------------------------------------------------- distributed


@dataclass
class DistEnv:
    """The process group ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``); a single process when those are absent."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistEnv:
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as e:
            raise UsageError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}"
                             ) from None
        return cls(rank=rank, world_size=world, local_rank=local)

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` items."""
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def init(self, device: torch.device) -> torch.device:
        """Join the process group (gloo on CPU, nccl on CUDA) if there is more than one
        process; return the device this rank uses (``cuda:LOCAL_RANK`` for CUDA)."""
        if device.type == "cuda" and self.distributed:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if self.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend, rank=self.rank,
                                                 world_size=self.world_size)
        self.device = device
        return device

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Element-wise sum (or max) over ranks in float64; the values themselves alone."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        ops = torch.distributed.ReduceOp
        reduce_op = ops.MAX if op == "max" else ops.SUM
        torch.distributed.all_reduce(t, op=reduce_op)
        return t.tolist()

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over ranks (one flat all-reduce). Each rank's loss
        is its share of the global batch mean, so the sum is the global gradient."""
        if not self.distributed:
            return
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        if self.distributed:
            for t in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(t.data, 0)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self, barrier: bool = True) -> None:
        """Leave the process group, together with ``barrier`` (a rank that tears down gloo
        while rank 0 still writes can abort at exit); without it after a failure, where the
        other ranks may be stuck elsewhere and torchrun stops them."""
        if self.distributed and torch.distributed.is_initialized():
            if barrier:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- experiments


@dataclass
class StepOutput:
    """What one training step reports: its loss (checked for finiteness), optionally a row
    for ``metrics.csv`` and values for the progress bar."""

    loss: float
    row: dict[str, Any] | None = None
    show: dict[str, Any] = field(default_factory=dict)


class Experiment:
    """One training command. Subclasses set the class attributes and implement the methods;
    ``self.run`` (the :class:`Run`) is available from :meth:`setup` on."""

    name = ""
    description = ""
    #: config keys a resumed run must share with its checkpoint
    run_keys: tuple[str, ...] = ()
    default_ckpt_every = 100
    default_threads: int | None = None
    #: the config key that sets the run's length, where a finished run may be extended by
    #: ``--resume`` with a larger value (see :meth:`extend`); None: never
    length_key: str | None = None
    #: add ``--max-num-steps`` (the step cap of the adaptive solves)
    uses_solver = True
    #: the ``torch.Generator`` attributes a checkpoint holds (under their names), besides the
    #: model, the optimizer ``opt`` and the schedule ``sched`` (see :meth:`state_dict`)
    generators: tuple[str, ...] = ()
    run: Run
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The experiment's own options."""

    def default_out(self, args: argparse.Namespace) -> str | None:
        """``--out`` when it is not given (``None``: required)."""
        return f"runs/{self.name}"

    def configure(self, args: argparse.Namespace) -> dict[str, Any]:
        """Check the arguments together (raise :class:`UsageError`); return the config, a
        dict of plain values."""
        raise NotImplementedError

    def setup(self) -> None:
        """Build data, model and optimizer from ``self.run.config``."""
        raise NotImplementedError

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (default: the config's ``iters``)."""
        return self.run.config["iters"]

    def train_step(self, step: int) -> StepOutput:
        """Optimizer step number ``step + 1`` (``step`` is 0-based)."""
        raise NotImplementedError

    def checkpoint_due(self, steps_done: int) -> bool:
        """Whether to checkpoint after ``steps_done`` steps besides ``--ckpt-every``."""
        return False

    def progress_label(self, steps_done: int) -> str:
        return self.name

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the global RNGs needed to continue exactly (``model`` first);
        by default the model, the optimizer, the schedule (if any) and the
        :attr:`generators`."""
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
        if self.sched is not None:
            state["scheduler"] = self.sched.state_dict()
        state.update({name: getattr(self, name).get_state() for name in self.generators})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(state["scheduler"])
        for name in self.generators:
            getattr(self, name).set_state(state[name])

    def extend(self, done: int) -> None:
        """Prepare to continue a finished run of ``done`` steps to :attr:`total_steps` (the
        config is the new one, the state the checkpoint's); by default the schedule is
        stretched to the new ``iters`` (see :func:`stretch_schedule`)."""
        stretch_schedule(self.sched, self.run.config["iters"])

    # helpers of the experiments that train ``model`` with ``opt`` for ``iters`` iterations
    def adam_cosine(self, floor: float) -> None:
        """``opt``: Adam at the config's ``lr``; ``sched``: cosine decay over ``iters``
        iterations to ``floor`` times that rate."""
        cfg = self.run.config
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"])
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, T_max=cfg["iters"], eta_min=floor * cfg["lr"])

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """Backpropagate this rank's ``loss`` (its share of the global loss), sum the
        gradients over ranks and step ``opt``; returns the global loss."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.run.dist.sum_gradients(self.model.parameters())
        self.opt.step()
        (total,) = self.run.dist.all_reduce([loss.item()])
        return total

    def metrics_row(self, it: int, loss: float) -> dict[str, Any]:
        """The metrics row of iteration ``it``: its loss and learning rate (then the schedule
        steps) and the training time so far."""
        row: dict[str, Any] = {"iter": it, "loss": loss, "lr": self.sched.get_last_lr()[0]}
        self.sched.step()
        row["elapsed_s"] = round(self.run.elapsed(), 3)
        return row

    def eval_due(self, it: int) -> bool:
        """Whether iteration ``it`` is evaluated: every ``--eval-every`` and the last."""
        return it % self.run.args.eval_every == 0 or it == self.run.config["iters"]

    def finish(self) -> dict[str, Any]:
        """Final metrics (every rank calls it; collective evaluations are allowed)."""
        raise NotImplementedError

    def plot(self, final: dict[str, Any]) -> list[str]:
        """Write the plots (rank 0 only); returns their file names."""
        return []

    def report(self, final: dict[str, Any]) -> str:
        """The summary printed at the end."""
        return ""


def _out_help(exp: Experiment) -> str:
    default = exp.default_out(argparse.Namespace(model="MODEL"))
    return f"output directory (default {default})" if default else "output directory (required)"


def add_run_arguments(parser: argparse.ArgumentParser, exp: Experiment) -> None:
    """The options every training command shares."""
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=None,
                   help=_out_help(exp))
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, exactly")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without this, an existing run is "
                        "never overwritten)")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    default = exp.default_threads
    g.add_argument("--threads", type=threads, default=default,
                   help=f"torch CPU threads, 1 to the CPUs available "
                        f"(default {default or 'torch default'})")
    g.add_argument("--ckpt-every", "--checkpoint-every", dest="ckpt_every",
                   type=nonnegative_int, default=exp.default_ckpt_every,
                   help=f"checkpoint every N steps (default {exp.default_ckpt_every}; also "
                        f"at the end, on --stop-after and on Ctrl-C)")
    g.add_argument("--stop-after", "--max-steps", dest="stop_after", type=positive_int,
                   default=None, help="stop (with a checkpoint) once this many steps are done; "
                                      "--resume continues")
    if exp.uses_solver:
        g.add_argument("--max-num-steps", type=positive_int, default=DEFAULT_MAX_NUM_STEPS,
                       help=f"step cap of every adaptive solve (default "
                            f"{DEFAULT_MAX_NUM_STEPS}); a solve that needs more stops the run")
        g.add_argument("--compile", nargs="?", const=True, default=False, type=compile_backend,
                       metavar="BACKEND",
                       help="run every solve as one compiled graph (options={'compile': True}, "
                            "or the torch.compile backend named, e.g. aot_eager"
                            ": explicit Runge-Kutta methods; training needs --gradient "
                            "adjoint, whose forward solves are compiled, or checkpoint, whose "
                            "backward passes are compiled; the first solve of "
                            "each shape compiles, for seconds to minutes; what torch.compile "
                            "cannot capture runs eagerly with a warning)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log the metrics to OUT/tensorboard (needs tensorboard)")
    g.add_argument("--no-plot", dest="no_plot", action="store_true",
                   help="do not write plots")
    g.add_argument("--no-plots", dest="no_plot", action="store_true",
                   help=argparse.SUPPRESS)  # the old spelling, kept working
    g.add_argument("--quiet", action="store_true", help="no progress bar")


class _SignalFlag:
    """SIGINT/SIGTERM set a flag that the loop checks after each step; a second signal
    interrupts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: saving a checkpoint after this step (again to stop now)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Run:
    """One execution of a training command: directory, checkpoint, loop, metrics."""

    def __init__(self, exp: Experiment, args: argparse.Namespace):
        self.exp, self.args = exp, args
        exp.run = self
        # how the command was run: ``neuralode train NAME`` or ``python -m neuralode ...``
        self.command = [getattr(args, "invocation", "neuralode"),
                        *getattr(args, "command_words", ["train", exp.name])]
        self.prog = " ".join(self.command)
        self.dist = DistEnv()
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.saved_step: int | None = None
        self.final: dict[str, Any] | None = None
        self._elapsed_before = 0.0
        self._t0 = time.perf_counter()
        self._tb: Any = None  # a TensorBoard SummaryWriter with --tensorboard

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def elapsed(self) -> float:
        """Training seconds so far, over interruptions."""
        return self._elapsed_before + time.perf_counter() - self._t0

    def options(self, method: str, options: Mapping[str, Any] | None = None) -> dict | None:
        """Solver options with this run's step cap (see :func:`solver_options`)."""
        if getattr(self.args, "compile", False):
            options = {**(options or {}), "compile": self.args.compile}
        return solver_options(method, self.args.max_num_steps, options)

    def _now_lr(self) -> str:
        lr = self.config.get("lr")
        return f" (now {lr:g})" if isinstance(lr, (int, float)) else ""

    def log(self, text: str) -> None:
        """A message on stderr (rank 0), above the progress bar."""
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)

    def resume_command(self) -> str:
        """The command that resumes this run, spelled the way this one was started."""
        argv = [a for a in getattr(self.args, "argv", []) if a not in ("--overwrite", "--resume")]
        head, *words = self.command  # ``head`` is already a shell word (or words)
        if self.dist.distributed:
            head = f"torchrun --nproc_per_node={self.dist.world_size} -m neuralode"
        return " ".join([head, *(shlex.quote(a) for a in [*words, *argv, "--resume"])])

    # ------------------------------------------------------------------ directory
    def _prepare_out(self) -> Path:
        args = self.args
        out = args.out or self.exp.default_out(args)
        if out is None:
            raise UsageError("--out DIR is required")
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file, not a directory; choose a directory")
        if args.resume and args.overwrite:
            raise UsageError("--resume continues the run in --out and --overwrite replaces it; "
                             "pass one of them")
        ckpt = out / CHECKPOINT_NAME
        if args.resume and not ckpt.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt}; start without --resume")
        held = [n for n in RUN_FILES if (out / n).exists()]
        if not args.resume and held and not args.overwrite:
            raise UsageError(f"{out} already holds a run ({', '.join(held)}); pass --resume to "
                             f"continue it, --overwrite to replace it, or choose another --out")
        return out

    # ------------------------------------------------------------------ checkpoint
    def save(self) -> None:
        state = self.exp.state_dict()
        bad = [k for k, v in state.get("model", {}).items() if torch.is_tensor(v)
               and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise TrainingFailed(f"the parameters became non-finite ({bad[0]}) at iteration "
                                 f"{self.step}; lower --lr{self._now_lr()}")
        if self.is_main:
            save_checkpoint({"format": 2, "experiment": self.exp.name, "config": self.config,
                             "step": self.step, "history": self.history,
                             "rng": get_rng_state(), "world_size": self.dist.world_size,
                             "threads": torch.get_num_threads(), "elapsed_s": self.elapsed(),
                             **state}, self.out / CHECKPOINT_NAME)
            write_csv(self.out / "metrics.csv", self.history)
        self.saved_step = self.step

    def _write_status(self, status: str, error: str | None = None) -> None:
        if not self.is_main:
            return
        if self.history:
            write_csv(self.out / "metrics.csv", self.history)
        write_json(self.out / "metrics.json", {
            "finished": False, "status": status, "error": error, "step": self.step,
            "steps_planned": self._total, "checkpoint_step": self.saved_step,
            "last": self.history[-1] if self.history else None, "config": self.config})

    def _resume(self, ck: dict[str, Any]) -> None:
        if ck.get("experiment") != self.exp.name or ck.get("format") != 2:
            raise CheckpointError(f"{self.out / CHECKPOINT_NAME} is not a checkpoint of "
                                  f"'{self.prog}' (format {ck.get('format')!r}, experiment "
                                  f"{ck.get('experiment')!r})")
        saved, done = ck["config"], int(ck["step"])
        changed = [k for k in self.exp.run_keys if saved.get(k) != self.config.get(k)]
        # a larger run length (--iters) is no change of settings, but an extension
        key, old, new, longer = self.exp.length_key, None, None, False
        if key is not None and key in changed:
            old, new = saved.get(key), self.config.get(key)
            longer = isinstance(old, int) and isinstance(new, int) and new > old
            if longer:
                changed.remove(key)
        flag = f"--{key.replace('_', '-')}" if key is not None else ""
        if changed:
            diffs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> "
                              f"{self.config.get(k)!r}" for k in changed)
            more = f" (a larger {flag} extends a finished run)" if key in changed else ""
            raise UsageError(f"--resume: the run in {self.out} was started with different "
                             f"settings ({diffs}); resume with the same ones{more}")
        extending = longer and isinstance(old, int) and done >= old
        if longer and not extending:
            raise UsageError(f"--resume: the run in {self.out} stopped at iteration {done} of "
                             f"{old}; finish it first (--resume with {flag} {old}), then "
                             f"extend it with {flag} {new}")
        inexact = []
        if ck["world_size"] != self.dist.world_size:
            inexact.append(f"{ck['world_size']} process(es), now {self.dist.world_size}")
        if ck["threads"] != torch.get_num_threads():
            inexact.append(f"--threads {ck['threads']}, now {torch.get_num_threads()}")
        if inexact:
            raise UsageError(f"--resume: the checkpoint was written with {'; '.join(inexact)}; "
                             f"resuming exactly needs the same (float sums are ordered by "
                             f"them), so run with the checkpoint's settings")
        self.exp.load_state_dict(ck)
        set_rng_state(ck["rng"])
        self.history, self.step = list(ck["history"]), done
        self.saved_step = self.step
        if "extended_from" in saved:
            self.config["extended_from"] = list(saved["extended_from"])
        if extending:
            self.exp.extend(done)
            self.config["extended_from"] = [*self.config.get("extended_from", []), old]
            self.log(f"{self.prog}: extending the finished run of {old} iterations to {new}")
        self._elapsed_before = float(ck["elapsed_s"])

    # ------------------------------------------------------------------ main
    def main(self) -> int:
        args = self.args
        try:
            self.config = self.exp.configure(args)
            self.out = self._prepare_out()
            self.dist = DistEnv.from_env()
            if args.threads:
                torch.set_num_threads(args.threads)
            self.device = self.dist.init(parse_device(args.device))
            if args.tensorboard:
                try:
                    importlib.import_module("torch.utils.tensorboard")
                except ImportError:
                    raise UsageError("--tensorboard needs the tensorboard package "
                                     "(pip install tensorboard)") from None
            # a damaged checkpoint is reported before any work is done
            self._checkpoint = load_checkpoint(self.out / CHECKPOINT_NAME) if args.resume else None
        except UsageError as e:
            print(f"{self.prog}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        self._total: int | None = None
        clean = False  # ranks leave the process group together only after a normal end
        try:
            rc = self._main()
            clean = True
            return rc
        except (UsageError, ValueError, FileNotFoundError) as e:
            print(f"{self.prog}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as e:  # a full disk, a read-only folder, ...
            print(f"{self.prog}: error: {e}", file=sys.stderr)
            return EXIT_FAILED
        except TrainingFailed as e:
            self._write_status("failed", str(e))
            kept = (f"the last good checkpoint (iteration {self.saved_step}) is kept in "
                    f"{self.out}" if self.saved_step else "no checkpoint was written")
            print(f"{self.prog}: error: {e}; {kept}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            kept = (f"the last checkpoint (iteration {self.saved_step}) is kept; resume with:\n"
                    f"  {self.resume_command()}" if self.saved_step else "nothing was saved")
            print(f"\n{self.prog}: interrupted; {kept}", file=sys.stderr)
            return EXIT_SIGNAL[signal.SIGINT]
        finally:
            if self._tb is not None:
                self._tb.close()
            self.dist.close(barrier=clean)

    def _main(self) -> int:
        args, exp = self.args, self.exp
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for p in remove_stale_temporaries(self.out):
                print(f"removed a stale temporary file {p.name} (left by a killed run)",
                      file=sys.stderr)
            if args.overwrite:
                for name in RUN_FILES:
                    (self.out / name).unlink(missing_ok=True)
        self.dist.barrier()
        seed_everything(self.config.get("seed", args.seed))
        exp.setup()
        if self._checkpoint is not None:
            self._resume(self._checkpoint)
            self._checkpoint = None
        self._total = total = exp.total_steps
        if self.step > total:
            raise UsageError(f"the checkpoint is at iteration {self.step}, beyond the "
                             f"{total} this run has")
        if args.tensorboard and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        self.log(f"{self.prog}: {self.dist.world_size} process(es) on {self.device}, "
                 f"{torch.get_num_threads()} thread(s); writing to {self.out}"
                 + (f"; resuming at iteration {self.step}" if args.resume else ""))
        self._t0 = time.perf_counter()
        bar = progress_bar(total, self.step, exp.progress_label(self.step),
                           enabled=self.is_main and not args.quiet)
        with _SignalFlag() as flag, bar:
            while self.step < total:
                try:
                    res = exp.train_step(self.step)
                except (MaxStepsError, StepSizeError) as e:
                    raise TrainingFailed(
                        f"the learned dynamics became stiff at iteration {self.step + 1} "
                        f"({str(e).split(';')[0]}); lower --lr{self._now_lr()}, "
                        f"or loosen the tolerances, or raise --max-num-steps") from None
                except FloatingPointError as e:
                    raise TrainingFailed(
                        f"the learned dynamics blew up at iteration {self.step + 1} "
                        f"({str(e).split(';')[0]}); lower --lr{self._now_lr()}"
                    ) from None
                self.step += 1
                bad, signum = self.dist.all_reduce(
                    [0.0 if math.isfinite(res.loss) else 1.0, float(flag.signum)], op="max")
                if bad:
                    raise TrainingFailed(f"the training loss became non-finite ({res.loss}) at "
                                         f"iteration {self.step}; lower --lr{self._now_lr()}")
                if res.row is not None:
                    self.history.append(res.row)
                    if self._tb is not None:
                        for k, v in res.row.items():
                            if isinstance(v, (int, float)) and not isinstance(v, bool):
                                self._tb.add_scalar(k, v, self.step)
                bar.set_description(exp.progress_label(self.step), refresh=False)
                if res.show:
                    bar.set_postfix({k: _fmt(v) for k, v in res.show.items()}, refresh=False)
                bar.update(1)
                stopping = args.stop_after is not None and self.step >= args.stop_after
                if (signum or stopping or self.step == total or exp.checkpoint_due(self.step)
                        or (args.ckpt_every and self.step % args.ckpt_every == 0)):
                    self.save()
                if signum:
                    bar.close()
                    self._write_status("interrupted")
                    name = signal.Signals(int(signum)).name
                    self.log(f"{self.prog}: stopped by {name} at iteration {self.step}; "
                             f"checkpoint saved in {self.out}. Resume with:\n"
                             f"  {self.resume_command()}")
                    return EXIT_SIGNAL.get(signal.Signals(int(signum)), 128 + int(signum))
                if stopping and self.step < total:
                    bar.close()
                    self._write_status("stopped")
                    self.log(f"stopped at iteration {self.step} (--stop-after); continue with "
                             f"--resume")
                    return 0
        final = exp.finish()
        final.update(finished=True, world_size=self.dist.world_size,
                     torch_threads=torch.get_num_threads())
        self.final = final
        if self.is_main:
            write_json(self.out / "metrics.json", final)
            write_csv(self.out / "metrics.csv", self.history)
            plots = [] if args.no_plot else exp.plot(final)
            text = exp.report(final)
            if text:
                print(text)
            print(f"wrote {self.out}: metrics.json, metrics.csv, {CHECKPOINT_NAME}"
                  + "".join(f", {p}" for p in plots))
        return 0


def build_parser(exp: Experiment, parser: argparse.ArgumentParser) -> None:
    """The experiment's options and the runner's."""
    parser.description = exp.description
    exp.add_arguments(parser)
    add_run_arguments(parser, exp)


def run(exp: Experiment, args: argparse.Namespace) -> int:
    """Run ``exp`` as ``args`` say; returns the exit status."""
    return Run(exp, args).main()


def entry_points(cls: type[Experiment]) -> tuple[Any, Any]:
    """The ``build_parser(parser)`` and ``run(args)`` of the module of a training command
    (what ``neuralode train NAME`` calls), for the experiment class ``cls``."""

    def build_parser_(parser: argparse.ArgumentParser) -> None:
        build_parser(cls(), parser)

    def run_(args: argparse.Namespace) -> int:
        return run(cls(), args)

    build_parser_.__doc__ = (f"Arguments of ``neuralode train {cls.name}`` (the experiment's "
                             f"and the runner's).")
    run_.__doc__ = f"Run ``neuralode train {cls.name}`` as ``args`` say; returns the exit status."
    return build_parser_, run_
