"""Shared helpers for the benchmark scripts (timing, interleaving, optional libraries, the
baseline copy of neuralode)."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import warnings
from io import BytesIO
from pathlib import Path

from torch import nn

REPO = Path(__file__).resolve().parent.parent


def loadavg() -> str:
    """The machine's 1/5/15-minute load averages, as ``uptime`` prints them."""
    try:
        return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "load average unknown"


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int, inner: int = 1, warm: bool = False,
                rotate: bool = False) -> dict:
    """Median seconds per call of each function, alternating between them every round so
    that machine noise hits all of them alike.

    warm: call each function once more, untimed, right before its timed call(s), so that
    it is not timed just after another library's code. Without it the function timed
    after torchdiffeq in a round was systematically slower: on loop.py's (a) (2-D spiral,
    dopri5, ~8 ms) the same neuralode code ran 20-30% slower in that position (ratio of
    two copies of c1709e5: 0.79 / 1.30 / 0.76 for the orders neuralode-base-torchdiffeq /
    base-neuralode-torchdiffeq / torchdiffeq-neuralode-base; rotating the order each round
    left it, as the predecessors stay; with warm: 0.99 / 1.01 / 1.00). Doubles the run
    time.

    rotate: every other round runs the functions in reverse order (with warm as well, the
    place in the round still moved compiled solves: two revisions whose generated code was
    the same differed by 4-7% on compiled.py's (a) and (r), see BENCHMARKS.md)."""
    samples = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in (reversed(fns.items()) if rotate and r % 2 else fns.items()):
            if warm:
                fn()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def torchdiffeq_or_none():
    try:
        import torchdiffeq

        return torchdiffeq
    except ImportError:
        return None


class Counting(nn.Module):
    """Wraps f (module or function) and counts its evaluations in ``n``; keeps f's
    parameters."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.n = 0

    def forward(self, t, y):
        self.n += 1
        return self.f(t, y)


def optional(name):
    """Import a library for a side-by-side column, or print why not and return None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception as exc:
        print(f"# {name} not available: {type(exc).__name__}: {exc}")
        return None


# --------------------------------------------------------------------------- the baseline

def add_baseline_args(ap, default_rev: str) -> None:
    """``--baseline-rev REV`` / ``--baseline ROOT`` / ``--no-baseline`` on an argparse parser."""
    ap.add_argument("--baseline-rev", default=default_rev,
                    help="git revision of this repository whose neuralode package is the "
                         f"'base' (default {default_rev})")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="directory holding the baseline neuralode package (instead of git)")
    ap.add_argument("--no-baseline", action="store_true", help="no 'base' rows")


def baseline_label(args) -> str:
    if args.no_baseline:
        return "none"
    return str(args.baseline) if args.baseline is not None else args.baseline_rev


def load_libs(args, tmp: Path, libs: dict | None = None) -> dict:
    """``libs`` with "base" (``load_baseline``, unless ``--no-baseline``) and the importable
    libraries named in ``--libs``."""
    libs = dict(libs or {})
    if not args.no_baseline:
        libs["base"] = load_baseline(args.baseline_rev, args.baseline, tmp)
    for name in filter(None, args.libs.split(",")):
        mod = optional(name)
        if mod is not None:
            libs[name] = mod
    return libs


def load_baseline(rev: str | None, root: Path | None, tmp: Path):
    """Copy the baseline ``neuralode`` package to ``tmp/neuralode_base`` and import it.

    The package comes from ``root/neuralode`` when ``root`` is given, else from revision
    ``rev`` of this repository (``git archive``; worktrees share the object database, so any
    branch or commit of the repository works). Absolute imports of ``neuralode`` inside the
    copy (lines starting with ``from``/``import``) are renamed to ``neuralode_base``, so both
    packages live in one process without sharing module state.
    """
    dst = tmp / "neuralode_base"
    if dst.exists():
        raise RuntimeError(f"{dst} exists: one baseline per temporary directory")
    if root is not None:
        shutil.copytree(root / "neuralode", dst,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        proc = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev,
                               "neuralode"], check=False, capture_output=True)
        if proc.returncode != 0:
            raise SystemExit(f"git archive {rev} neuralode failed: "
                             f"{proc.stderr.decode().strip()}")
        with tarfile.open(fileobj=BytesIO(proc.stdout)) as tar:
            tar.extractall(tmp / "_archive", filter="data")
        shutil.move(str(tmp / "_archive" / "neuralode"), dst)
    pattern = re.compile(r"\bneuralode\b(?=[.\s]|$)")
    for py in dst.rglob("*.py"):
        text = py.read_text()
        new = "\n".join(pattern.sub("neuralode_base", ln)
                        if re.match(r"\s*(from|import)\s", ln) else ln
                        for ln in text.splitlines())
        py.write_text(new + "\n")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("neuralode_base")
