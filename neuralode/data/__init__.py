"""Datasets: MNIST (IDX files, download with checksums, batching), irregularly sampled
spirals for the latent ODE, and 2-D toy densities for normalizing flows."""

from neuralode.data.mnist import MNIST, BatchLoader, download_mnist, read_idx
from neuralode.data.spirals import SpiralData, make_spirals, train_test_split
from neuralode.data.toy2d import POTENTIALS, TOY_DATASETS, potential_energy, sample_toy2d

__all__ = ["MNIST", "POTENTIALS", "TOY_DATASETS", "BatchLoader", "SpiralData", "download_mnist",
           "make_spirals", "potential_energy", "read_idx", "sample_toy2d", "train_test_split"]
