"""The Jacobian of ``odeint_adjoint``'s backward system for implicit methods.

The backward state is (y, a, g) with

    dy/dt = f(t, y),    da/dt = -a^T df/dy,    dg/dt = -a^T df/dtheta.

Its exact Jacobian with respect to the (y, a) head is [[J, 0], [-d(a^T J)/dy, -J^T]]; g is a
quadrature (nothing depends on it), integrated explicitly from the converged stages
(``head = 2n``). The augmented right-hand side calls ``torch.autograd.grad``, so its Jacobian
cannot come from ``jacrev`` of it; it is built here from the user's f, in whatever form the
solve asked for (``options['jacobian']``): dense, block-diagonal, matrix-free, or the user's
callable, which is then read as df/dy of the *forward* state.

Newton uses the block-diagonal part [[J, 0], [0, -J^T]]. The dropped block is strictly lower
triangular, so the simplified-Newton error map M_approx^{-1} (M_approx - M) is nilpotent of
index 2 for a linear problem: one extra iteration at most, and Newton's convergence test
makes the converged stages as exact as with the full matrix. The second derivative
d(a^T J)/dy (a Hessian-vector product per column) is never formed.
"""

from __future__ import annotations

import torch

from neuralode.solvers.base import RHS, StateLayout
from neuralode.solvers.jacobian import JacobianSource, MatrixFree


class AugmentedMatrixFree(MatrixFree):
    """v -> [J v_y; -J^T v_a] for the (y, a) head of the backward state."""

    def __init__(self, J: MatrixFree, n: int):
        super().__init__(J.f, J.y)
        self.J, self.n = J, n

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        n = self.n
        return torch.cat([self.J.mv(v[:n]), -self.J.vjp(v[n:2 * n])])


class AdjointJacobian:
    """The ``JacobianSource`` of the backward system: called as ``(t, state, graph=False)``
    on the flat backward state, returns the block-diagonal [[J, 0], [0, -J^T]] of its
    (y, a) head as a dense (2n, 2n) tensor, (2B, m, m) blocks, or a matrix-free operator."""

    def __init__(self, spec, func, layout: StateLayout, rhs: RHS, name: str):
        self.n = layout.n
        self.rhs = rhs
        # the user's f on its own state, counted in the backward solve's statistics
        self.forward_rhs = RHS(func, layout, rhs.user_dtype, rhs.device, rhs.stats)
        self.source = JacobianSource(spec, self.forward_rhs, self.n, name=name)
        self.matrix_free = self.source.matrix_free
        self.stats = rhs.stats

    def __call__(self, t: float, y: torch.Tensor, graph: bool = False):
        n = self.n
        J = self.source(t, y[:n].detach())
        if isinstance(J, MatrixFree):
            return AugmentedMatrixFree(J, n)
        if J.dim() == 2:
            return torch.block_diag(J, -J.t())
        return torch.cat([J, -J.transpose(1, 2)])


__all__ = ["AdjointJacobian", "AugmentedMatrixFree"]
