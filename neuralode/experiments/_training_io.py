"""Training-run plumbing for the dynamics, latent-ODE and demo experiments: a text progress
bar with absolute positions, device checking, resume-config checks and CSV/JSON writers.
Seeding, RNG state, atomic checkpoints and the lazy matplotlib import come from
``_common`` (shared with the MNIST and CNF commands). Experiments only; the library never
imports this.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import torch

from neuralode.experiments import _common
from neuralode.experiments._common import (
    atomic_save,
    atomic_write_text,
    get_rng_state,
    pyplot,
    seed_everything,
    set_rng_state,
)

__all__ = [
    "ProgressBar",
    "atomic_save",
    "check_resume_config",
    "get_rng_state",
    "load_checkpoint",
    "pyplot",
    "resolve_device",
    "seed_everything",
    "set_rng_state",
    "write_csv",
    "write_json",
]


class ProgressBar:
    """A plain-text progress bar on stderr: ``label [#####.....] 50/100 12.3it/s eta 4s k=v``.

    On a terminal it redraws one line; otherwise it prints a line every ``every_s`` seconds
    (and at the end) so logs stay short.
    """

    def __init__(self, total: int, *, start: int = 0, label: str = "", width: int = 28,
                 stream: TextIO | None = None, every_s: float | None = None) -> None:
        self.total = max(int(total), 0)
        self.start = self.done = int(start)
        self.label = label
        self.width = width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if every_s is not None else (0.1 if self.tty else 10.0)
        self.t0 = time.perf_counter()
        self._last = -math.inf
        self.info: dict[str, Any] = {}

    def _line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        fill = round(self.width * frac)
        elapsed = time.perf_counter() - self.t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.nan
        eta_s = f"eta {eta:.0f}s" if math.isfinite(eta) else "eta ?"
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self.info.items())
        head = f"{self.label} " if self.label else ""
        return (f"{head}[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} "
                f"{rate:.2f}it/s {eta_s} {extra}").rstrip()

    def update(self, done: int, **info: Any) -> None:
        """Set the number of finished iterations and the values shown after the bar."""
        self.done = int(done)
        self.info.update(info)
        now = time.perf_counter()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            if self.tty:
                self.stream.write("\r" + self._line() + "\033[K")
            else:
                self.stream.write(self._line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self._line() + "\033[K\n")
            self.stream.flush()
        elif self._last < 0 or self.done < self.total:
            self.stream.write(self._line() + "\n")
            self.stream.flush()


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``, checked for availability."""
    valid = "cpu, cuda, cuda:N, mps"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; valid choices: {valid}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps")
                                  and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} requested but MPS is not available; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; valid choices: {valid}")
    return dev


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``_common.load_checkpoint`` with the message the ``--resume`` flag needs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; train without --resume first")
    return _common.load_checkpoint(path)


def check_resume_config(saved: dict[str, Any], current: dict[str, Any],
                        keys: Iterable[str]) -> None:
    """Raise if a setting that defines the run differs between checkpoint and command line."""
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError("--resume with different settings than the checkpoint: "
                         + "; ".join(diff))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def write_csv(path: str | Path, rows: list[dict[str, Any]], fieldnames: list[str]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fieldnames, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fieldnames})
    os.replace(tmp, path)
