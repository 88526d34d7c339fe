"""Shared test setup: under pytest-xdist (``make test`` runs ``-n auto``), each worker
takes its share of the machine's cores for torch's threads, so that the workers do not
oversubscribe them."""

import os

import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
