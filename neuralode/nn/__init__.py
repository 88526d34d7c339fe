"""Building blocks for neural ODEs.

Time-aware layers take ``(t, x)``: :class:`ConcatLinear`, :class:`ConcatConv2d` (time as an
extra input feature / channel), :class:`ConcatSquashLinear`, :class:`ConcatSquashConv2d`
(output gated and shifted by functions of time) and :class:`TimeSequential` to chain them.
:class:`ODEFunc` is the base class of right-hand sides (counts evaluations);
:class:`ODEBlock` integrates one over ``[t0, t1]`` and returns the final state;
:class:`NeuralODE` returns the trajectory at given times. Both take the solver and its
tolerances and ``gradient`` (backprop, checkpoint, adjoint; see ``neuralode.gradients``), and
options for dynamics that stay cheap to solve: ``regularizers`` (``neuralode.regularizers``),
``steer`` (random end times in training) and ``augment`` (zero-padded extra channels).
"""

from neuralode.nn.blocks import CountedFunc, NeuralODE, ODEBlock, ODEFunc
from neuralode.nn.layers import (
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashConv2d,
    ConcatSquashLinear,
    TimeLayer,
    TimeSequential,
)

__all__ = ["ConcatConv2d", "ConcatLinear", "ConcatSquashConv2d", "ConcatSquashLinear",
           "CountedFunc", "NeuralODE", "ODEBlock", "ODEFunc", "TimeLayer", "TimeSequential"]
