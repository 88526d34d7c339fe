"""The paper's models, built on the public ``odeint`` (its ``gradient`` choice) and
``neuralode.nn``.

- ``classifiers``: ODE-Net, RK-Net, ResNet and MLP for MNIST (``build_classifier``);
- ``dynamics``: vector fields for learning dynamics from trajectories;
- ``latent_ode``: the latent ODE (GRU or ODE-RNN encoder) and the RNN baseline;
- ``cnf``: continuous normalizing flows (exact trace or Hutchinson's estimator);
- ``planar``: the planar normalizing flow baseline.
"""

from neuralode.models.classifiers import (
    MODEL_NAMES,
    ConvClassifier,
    MLPClassifier,
    build_classifier,
    count_parameters,
)
from neuralode.models.cnf import CNF, ConcatMLPDynamics, HyperNetDynamics
from neuralode.models.dynamics import LinearODEFunc, MLPODEFunc, vector_field_error
from neuralode.models.latent_ode import GRUEncoder, LatentODE, ODERNNEncoder, RNNBaseline
from neuralode.models.planar import PlanarFlow

__all__ = ["CNF", "MODEL_NAMES", "ConcatMLPDynamics", "ConvClassifier", "GRUEncoder",
           "HyperNetDynamics", "LatentODE", "LinearODEFunc", "MLPClassifier", "MLPODEFunc",
           "ODERNNEncoder", "PlanarFlow", "RNNBaseline", "build_classifier", "count_parameters",
           "vector_field_error"]
