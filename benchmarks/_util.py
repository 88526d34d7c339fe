"""Shared helpers for the benchmark scripts (timing, interleaving, optional torchdiffeq)."""

from __future__ import annotations

import statistics
import time

from torch import nn


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int, inner: int = 1) -> dict:
    """Median seconds per call of each function, alternating between them every round so
    that machine noise hits all of them alike."""
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
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
