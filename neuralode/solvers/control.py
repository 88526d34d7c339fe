"""Step-size control (Hairer, Norsett & Wanner, Solving ODEs I, II.4).

* error norm: mixed absolute/relative RMS, ``||err / (atol + rtol * max(|y0|, |y1|))||``;
* initial step from two evaluations of f;
* an I controller (the classic ``safety * ratio**(-1/k)``) generalised to PID
  (``pcoeff``, ``icoeff``, ``dcoeff`` in the convention of Söderlind / diffrax), with the
  growth and shrink of one step bounded by ``ifactor`` and ``dfactor``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class ErrorNorm:
    """Turns an error estimate into the scalar ratio that the controller compares with 1.

    ``norm`` is None (RMS over the whole state, or for tuple states the max over elements
    of each element's RMS) or a user callable that receives the scaled error in the user's
    structure (a tensor, or a tuple of tensors) and returns a number or a 0-d tensor.
    """

    def __init__(self, layout, rtol, atol, norm: Callable | None):
        self.layout = layout
        self.rtol = rtol  # float or 1-D tensor (n,)
        self.atol = atol
        self.user_norm = norm
        self.scalar_tol = not isinstance(rtol, torch.Tensor) and not isinstance(atol, torch.Tensor)
        self.inv_sqrt_n = 1.0 / math.sqrt(max(layout.n, 1))

    def scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """atol + rtol * absmax, elementwise."""
        if self.scalar_tol:
            return absmax * self.rtol + self.atol
        return torch.addcmul(self.atol_vec(absmax), self.rtol_vec(absmax), absmax)

    def rtol_vec(self, like):
        return self.rtol if isinstance(self.rtol, torch.Tensor) else torch.full_like(like, self.rtol)

    def atol_vec(self, like):
        return self.atol if isinstance(self.atol, torch.Tensor) else torch.full_like(like, self.atol)

    def __call__(self, err: torch.Tensor, scale: torch.Tensor, factor: float = 1.0) -> float:
        """The norm of ``factor * err / scale`` as a Python float."""
        ratio = err / scale
        if self.user_norm is not None:
            if factor != 1.0:
                ratio = ratio * factor
            value = self.user_norm(self.layout.unflatten(ratio))
            return float(value)
        if not self.layout.is_tuple or len(self.layout.shapes) == 1:
            return torch.linalg.vector_norm(ratio).item() * self.inv_sqrt_n * abs(factor)
        # mixed norm: max over tuple elements of the RMS of each element
        vals = []
        for a, b in zip(self.layout.offsets[:-1], self.layout.offsets[1:]):
            if b > a:
                vals.append(torch.linalg.vector_norm(ratio[a:b]) / math.sqrt(b - a))
        return torch.stack(vals).max().item() * abs(factor)


def initial_step(rhs, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: float,
                 order: int, norm: ErrorNorm) -> float:
    """Hairer's starting step size (Solving ODEs I, II.4, p. 169); returns a signed step.

    Uses one extra evaluation of f (f0 is given)."""
    scale = norm.scale(y0.abs())
    d0 = norm(y0, scale)
    d1 = norm(f0, scale)
    if d0 < 1e-5 or d1 < 1e-5:
        h0 = 1e-6
    else:
        h0 = 0.01 * d0 / d1
    y1 = y0 + (direction * h0) * f0
    f1 = rhs(t0 + direction * h0, y1)
    d2 = norm(f1 - f0, scale) / h0
    if not math.isfinite(d2):
        h0 = h0 * 1e-3  # a derivative that blows up nearby: start tiny and let control work
        return direction * h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return direction * min(100 * h0, h1)


class PIDController:
    """Proposes the next step size from the error ratios of the last steps.

    factor = safety * r_n^(-b1/k) * r_{n-1}^(-b2/k) * r_{n-2}^(-b3/k), with
    b1 = pcoeff + icoeff + dcoeff, b2 = -(pcoeff + 2 dcoeff), b3 = dcoeff, and k the order
    of the error estimate plus one. pcoeff = dcoeff = 0, icoeff = 1 is the I controller.
    After an accepted step the step never shrinks; after a rejected one it never grows.
    """

    def __init__(self, error_order: int, safety=0.9, ifactor=10.0, dfactor=0.2,
                 pcoeff=0.0, icoeff=1.0, dcoeff=0.0):
        k = error_order + 1.0
        self.safety = safety
        self.ifactor = ifactor
        self.dfactor = dfactor
        self.b1 = (pcoeff + icoeff + dcoeff) / k
        self.b2 = -(pcoeff + 2 * dcoeff) / k
        self.b3 = dcoeff / k
        self.prev1 = 1.0
        self.prev2 = 1.0

    def factor(self, ratio: float, accepted: bool) -> float:
        if ratio == 0.0:
            f = self.ifactor
        else:
            f = self.safety * ratio ** (-self.b1)
            if self.b2:
                f *= self.prev1 ** (-self.b2)
            if self.b3:
                f *= self.prev2 ** (-self.b3)
        if accepted:
            f = min(self.ifactor, max(1.0, f))
            self.prev2, self.prev1 = self.prev1, max(ratio, 1e-10)
        else:
            f = min(1.0, max(self.dfactor, f))
        return f
