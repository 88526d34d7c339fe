"""The MNIST classifiers of the paper's Table 1 (Chen et al. 2018, section 3).

All but the MLP share a downsampling stem and a classification head (as in torchdiffeq's
``odenet_mnist.py``)::

    stem:  Conv(1, 64, 3x3) -> GN -> ReLU -> Conv(64, 64, 4x4, stride 2, pad 1) -> GN -> ReLU
           -> Conv(64, 64, 4x4, stride 2, pad 1)                 # 1x28x28 -> 64x6x6
    body:  resnet: 6 residual blocks  |  odenet / rknet: one ODE block over t in [0, 1]
    head:  GN -> ReLU -> global average pool -> Linear(64, 10)

GN is ``GroupNorm(min(32, dim), dim)``. The ODE block's function is
GN -> ReLU -> ConcatConv2d(3x3) -> GN -> ReLU -> ConcatConv2d(3x3) -> GN. ``odenet`` computes
gradients with the adjoint method, ``rknet`` by backpropagating through the solver. ``mlp`` is
the 1-hidden-layer MLP (784-300-10) of LeCun et al. (1998) that the paper quotes.

Inputs are ``(N, 1, 28, 28)`` normalized images; outputs are ``(N, 10)`` logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from neuralode.gradients import Adjoint, Gradient, gradient_strategy
from neuralode.nn import ConcatConv2d, ODEBlock, ODEFunc
from neuralode.regularizers import Regularizer

__all__ = ["MODEL_NAMES", "PAPER_TABLE1", "ConvClassifier", "ConvODEFunc", "MLPClassifier",
           "ResBlock", "build_classifier", "classifier_head", "count_parameters", "downsampling",
           "group_norm"]

MODEL_NAMES = ("odenet", "rknet", "resnet", "mlp")

# The paper's Table 1: test error (%) and parameters (millions); memory and time as O(.).
PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "mlp": {"test_error_pct": 1.60, "params_m": 0.24, "memory": "-", "time": "-"},
    "resnet": {"test_error_pct": 0.41, "params_m": 0.60, "memory": "O(L)", "time": "O(L)"},
    "rknet": {"test_error_pct": 0.47, "params_m": 0.22, "memory": "O(L~)", "time": "O(L~)"},
    "odenet": {"test_error_pct": 0.42, "params_m": 0.22, "memory": "O(1)", "time": "O(L~)"},
}


def group_norm(dim: int) -> nn.GroupNorm:
    """``GroupNorm(gcd(32, dim), dim)``: 32 groups for the usual widths (multiples of 32),
    fewer where ``dim`` is not a multiple (augmented widths)."""
    return nn.GroupNorm(math.gcd(32, dim), dim)


def downsampling(width: int = 64) -> nn.Sequential:
    """The shared stem: ``(N, 1, 28, 28)`` -> ``(N, width, 6, 6)``."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1),
        group_norm(width), nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 4, 2, 1),
        group_norm(width), nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 4, 2, 1),
    )


def classifier_head(width: int = 64, n_classes: int = 10) -> nn.Sequential:
    """GN -> ReLU -> global average pool -> Linear: ``(N, width, H, W)`` -> ``(N, n_classes)``."""
    return nn.Sequential(group_norm(width), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, n_classes))


class ResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(relu(gn(conv(relu(gn(x))))))``, 3x3 convs
    without bias (torchdiffeq's MNIST ResBlock with stride 1)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.norm1 = group_norm(width)
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.norm2 = group_norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.norm1(x)))
        out = self.conv2(torch.relu(self.norm2(out)))
        return x + out


ACTIVATIONS = {"relu": torch.relu, "softplus": nn.functional.softplus, "tanh": torch.tanh}


class ConvODEFunc(ODEFunc):
    """``f(t, h)`` of the ODE block: GN -> ReLU -> ConcatConv2d -> GN -> ReLU -> ConcatConv2d
    -> GN, on ``(N, width, H, W)``. ``activation`` may replace ReLU by a smooth function
    (``softplus``, ``tanh``): ReLU's kinks make ``f`` non-smooth, which limits how closely
    solutions (and gradients) computed by different solvers agree."""

    def __init__(self, width: int = 64, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid activations are: "
                             f"{', '.join(ACTIVATIONS)}")
        self.activation = activation
        self._act = ACTIVATIONS[activation]
        self.norm1 = group_norm(width)
        self.conv1 = ConcatConv2d(width, width, 3, 1, 1)
        self.norm2 = group_norm(width)
        self.conv2 = ConcatConv2d(width, width, 3, 1, 1)
        self.norm3 = group_norm(width)

    def forward(self, t, h: torch.Tensor) -> torch.Tensor:
        out = self.conv1(t, self._act(self.norm1(h)))
        out = self.conv2(t, self._act(self.norm2(out)))
        return self.norm3(out)


class ConvClassifier(nn.Module):
    """``head(body(stem(x)))``; ``body`` is an :class:`ODEBlock` or a stack of blocks.
    ``head_width``: channels the head reads (default ``width``; more for an augmented ODE
    block that keeps its extra channels)."""

    def __init__(self, body: nn.Module, width: int = 64, n_classes: int = 10,
                 head_width: int | None = None):
        super().__init__()
        self.downsample = downsampling(width)
        self.body = body
        self.head = classifier_head(width if head_width is None else head_width, n_classes)

    @property
    def ode_block(self) -> ODEBlock | None:
        """The ODE block (``None`` for a ResNet)."""
        return self.body if isinstance(self.body, ODEBlock) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.downsample(x)))


class MLPClassifier(nn.Module):
    """Flatten -> Linear(784, hidden) -> ReLU -> Linear(hidden, n_classes)."""

    def __init__(self, hidden: int = 300, n_classes: int = 10, in_features: int = 28 * 28):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_classes))

    ode_block = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_classifier(name: str, *, width: int = 64, n_blocks: int = 6, hidden: int = 300,
                     method: str = "dopri5", rtol: float = 1e-3, atol: float | None = None,
                     options: dict[str, Any] | None = None,
                     gradient: str | Gradient | None = None,
                     activation: str = "relu", per_sample: bool = False,
                     regularizers: Sequence[Regularizer] | None = None, steer: float = 0.0,
                     augment: int = 0) -> nn.Module:
    """One of :data:`MODEL_NAMES`.

    ``width``: channels of the conv models; ``n_blocks``: residual blocks of ``resnet``;
    ``hidden``: hidden units of ``mlp``. ``method``, ``rtol``, ``atol`` (default ``rtol``),
    ``options``: the ODE block's solver (``odenet``/``rknet``). ``gradient``
    (``neuralode.gradients``) defaults to "adjoint" for ``odenet`` and "backprop" for
    ``rknet``, whose gradient is the solver's own (backprop, or "checkpoint": the same
    gradient in little memory; the adjoint is refused for it). ``activation``: of the ODE
    function (see :class:`ConvODEFunc`; the paper's is ``relu``). ``per_sample``: the ODE
    block solves each image as its own problem (its result does not depend on the rest of
    the batch). ``regularizers``, ``steer``: of the ODE block (see ``neuralode.nn``; add
    ``model.ode_block.regularization_loss()`` to the training loss); ``augment``: extra zero
    channels of the ODE block's state (augmented neural ODE, Dupont et al. 2019), kept and
    read by the head (which then has ``width + augment`` inputs).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid models are: {', '.join(MODEL_NAMES)}")
    if name == "mlp":
        return MLPClassifier(hidden=hidden)
    if name == "resnet":
        if int(n_blocks) != n_blocks or n_blocks < 1:
            raise ValueError(f"n_blocks must be a positive integer, got {n_blocks!r}")
        return ConvClassifier(nn.Sequential(*[ResBlock(width) for _ in range(int(n_blocks))]),
                              width)
    if gradient is None:
        gradient = "adjoint" if name == "odenet" else "backprop"
    if name == "rknet" and isinstance(gradient_strategy(gradient), Adjoint):
        raise ValueError("rknet's gradient is the solver's own (gradient 'backprop' or "
                         "'checkpoint'); for the adjoint method use the model 'odenet'")
    if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
        raise ValueError(f"augment must be an int >= 0 (extra channels), got {augment!r}")
    block = ODEBlock(ConvODEFunc(width + augment, activation), 0.0, 1.0, method=method,
                     rtol=rtol, atol=rtol if atol is None else atol, options=options,
                     gradient=gradient, per_sample=per_sample, regularizers=regularizers,
                     steer=steer, augment=augment)
    return ConvClassifier(block, width, head_width=width + augment)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
