"""Small utilities shared by the training commands: device parsing, seeding, RNG state,
atomic checkpoints, a plain-text progress bar, CSV/JSON metrics, text tables, a lazily
imported matplotlib, and the ``torch.distributed`` environment set up by ``torchrun``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DistEnv",
    "MetricsWriter",
    "ProgressBar",
    "atomic_save",
    "atomic_write_text",
    "format_table",
    "get_rng_state",
    "load_checkpoint",
    "nonnegative_int",
    "parse_device",
    "positive_float",
    "positive_int",
    "pyplot",
    "seed_everything",
    "set_rng_state",
]


# --------------------------------------------------------------------------- devices


def parse_device(spec: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` as a ``torch.device``, checking that it
    exists here. Raises ``ValueError`` naming the bad value and the valid choices."""
    valid = ["cpu"]
    if torch.cuda.is_available():
        valid += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        valid.append("mps")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"invalid device {spec!r}; valid devices here are: "
                         f"{', '.join(valid)}") from None
    name = device.type if device.index is None else f"{device.type}:{device.index}"
    if name not in valid:
        raise ValueError(f"device {spec!r} is not available; valid devices here are: "
                         f"{', '.join(valid)}")
    return device


# --------------------------------------------------------------------------- argparse types


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


# --------------------------------------------------------------------------- randomness


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))


def get_rng_state() -> dict[str, Any]:
    """The state of every global generator (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- files


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to a temporary file beside ``path``, then rename it over ``path``:
    a crash leaves either the old file or the new one, never a partial one."""
    _atomic_replace(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _atomic_replace(Path(path), lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` (it holds RNG states and plain Python
    objects, so it is loaded with ``weights_only=False``: load only files you trust)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


class MetricsWriter:
    """Writes a list of metric rows to ``out_dir/csv_name`` and a dict to
    ``out_dir/metrics.json``, each atomically (the CSV is rewritten whole, so a resumed run
    that restores its rows produces the same file)."""

    def __init__(self, out_dir: str | os.PathLike, csv_name: str = "metrics.csv"):
        self.out_dir = Path(out_dir)
        self.csv_path = self.out_dir / csv_name
        self.json_path = self.out_dir / "metrics.json"

    def write_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        fields: list[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in fields})
        atomic_write_text(self.csv_path, buf.getvalue())

    def write_json(self, metrics: Mapping[str, Any]) -> None:
        atomic_write_text(self.json_path, json.dumps(metrics, indent=2, default=str) + "\n")


def _csv_value(v):
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


# --------------------------------------------------------------------------- output


class ProgressBar:
    """A plain-text progress bar on stderr: ``desc  37% |#######       | 15/40 k=v ...``.

    On a terminal it redraws one line (at most ``refresh`` times a second); otherwise (a log
    file) it prints a line every ``log_every`` seconds and at the end. ``enabled=False``
    prints nothing.
    """

    def __init__(self, total: int, desc: str = "", stream=None, enabled: bool = True,
                 width: int = 24, refresh: float = 10.0, log_every: float = 10.0,
                 start: int = 0):
        self.total = max(int(total), 0)
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.width = width
        self.n = int(start)
        self.postfix: dict[str, Any] = {}
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._min_interval = 1.0 / refresh if self._tty else log_every
        self._last = -math.inf
        self._t0 = time.perf_counter()

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        self.postfix.update(postfix)
        now = time.perf_counter()
        if now - self._last >= self._min_interval or self.n >= self.total:
            self._last = now
            self._draw(final=False)

    def close(self) -> None:
        self._draw(final=True)

    def render(self) -> str:
        frac = min(self.n / self.total, 1.0) if self.total else 1.0
        filled = round(frac * self.width)
        bar = "#" * filled + " " * (self.width - filled)
        elapsed = time.perf_counter() - self._t0
        post = " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        return (f"{self.desc} {100 * frac:3.0f}% |{bar}| {self.n}/{self.total} "
                f"[{elapsed:.0f}s] {post}").rstrip()

    def _draw(self, final: bool) -> None:
        if not self.enabled:
            return
        line = self.render()
        if self._tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        elif final or self.n < self.total:
            self.stream.write(line + "\n")
        self.stream.flush()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


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
        raise RuntimeError("plots need matplotlib: pip install 'neuralode[apps]' "
                           "(or pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- distributed


@dataclass
class DistEnv:
    """The process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``); a single process when those are absent."""

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
            raise ValueError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}"
                             ) from None
        return cls(rank=rank, world_size=world, local_rank=local)

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
        return device

    def all_reduce_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (float64); the values themselves for one process."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group together: without the barrier a rank that finishes first
        tears down its gloo threads while rank 0 is still writing files, and can abort at exit
        ("terminate called without an active exception")."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
