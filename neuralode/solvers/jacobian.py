"""Jacobians of the right-hand side and the linear algebra of implicit methods.

Every implicit method (implicit Runge–Kutta, ESDIRK, Rosenbrock, BDF) needs J = df/dy and
solves linear systems with a Newton matrix ``I - h (A ⊗ J)`` (``A`` a scalar for one stage
at a time, an s x s matrix for fully implicit Runge–Kutta stages). This module is the one
place that knows how J is obtained and how those systems are solved:

* ``options={"jacobian": "autograd"}`` (default): the dense n x n matrix by reverse-mode
  autograd (one evaluation of f and one backward pass batched over the rows' cotangents,
  ``is_grads_batched``; a row-by-row ``torch.autograd.grad`` loop for functions whose
  backward cannot be batched); LU factorisation.
* ``"block"``: the state is a batch of B independent systems along its first dimension
  (a tensor state of shape (B, ...)); J is block diagonal with B blocks of m x m
  (m = numel / B), all obtained by one batched backward pass of the batch-summed f;
  batched LU.
* ``"matrix_free"``: J is never formed; products J v come from forward-mode autograd
  (``torch.func.jvp``, one evaluation of f each) and the systems are solved by restarted
  GMRES (Newton–Krylov), for large states.
* a callable ``jacobian(t, y) -> J`` in the flat layout: a (n, n) tensor, or a (B, m, m)
  tensor of diagonal blocks (B * m = n); ``y`` is handed over in the user's structure.

``head``: only the first ``head`` components of the flat state enter the implicit solve;
the rest are quadratures (f does not depend on them, as the parameter adjoint of
``odeint_adjoint``), which a stepper integrates explicitly from the converged stages.

Statistics go to the solve's ``SolverStats``: ``n_jac`` per Jacobian, ``n_lu`` per
factorisation (or GMRES set-up), ``n_newton`` per Newton iteration, ``n_newton_fail`` per
Newton solve that did not converge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from neuralode.errors import ODEFuncError, ODEInputError
from neuralode.solvers.elementwise import isfinite, maximum, where

JACOBIAN_MODES = ("autograd", "block", "matrix_free")
JACOBIAN_OPTIONS = {"jacobian": "autograd"}
# a dense autograd Jacobian larger than this is refused before it is built (its LU copy and
# the batched backward's intermediates need as much again)
DENSE_JACOBIAN_LIMIT_BYTES = 2**30


def check_jacobian_option(method: str, value) -> None:
    if callable(value) or value in JACOBIAN_MODES:
        return
    raise ODEInputError(
        f"option 'jacobian' of {method!r} must be one of {JACOBIAN_MODES} or a callable "
        f"jacobian(t, y) returning the (n, n) matrix df/dy in the flat layout (n = y0.numel()) "
        f"or (B, m, m) diagonal blocks; got {value!r}")


class MatrixFree:
    """J at (t, y) as an operator: ``mv(v)`` = J v by forward-mode autograd."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor):
        self.f, self.y = f, y
        self._forward_ok = True

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        if self._forward_ok:
            try:
                return torch.func.jvp(self.f, (self.y,), (v,))[1]
            except (RuntimeError, NotImplementedError, TypeError):
                self._forward_ok = False  # an op without forward-mode AD: double-vjp trick
        with torch.enable_grad():
            y = self.y.detach().requires_grad_(True)
            out = self.f(y)
            u = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, y, u, create_graph=True)
            (jv,) = torch.autograd.grad(g, u, v)
        return jv


    def vjp(self, w: torch.Tensor) -> torch.Tensor:
        """w^T J (= J^T w) by reverse-mode autograd."""
        try:
            return torch.func.vjp(self.f, self.y)[1](w)[0]
        except (RuntimeError, NotImplementedError, TypeError):
            with torch.enable_grad():
                y = self.y.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.f(y), y, w, allow_unused=True)
            return torch.zeros_like(self.y) if g is None else g


class JacobianSource:
    """df/dy of the flat right-hand side ``rhs`` at (t, y), restricted to the first ``head``
    components (rows and columns)."""

    def __init__(self, spec, rhs, n: int, head: int | None = None, name: str = ""):
        self.spec = spec
        self.rhs = rhs
        self.n = n
        self.head = n if head is None else head
        self.name = name
        self.stats = rhs.stats
        self._batched_grad = True
        self.size_checked = False
        self.blocks = None
        if spec == "block":
            shapes = rhs.layout.shapes
            if rhs.layout.is_tuple or len(shapes[0]) == 0 or shapes[0][0] < 1:
                raise ODEInputError(
                    f"{name}: options['jacobian']='block' needs a tensor state whose first "
                    f"dimension indexes independent systems, got shapes "
                    f"{[tuple(s) for s in shapes]}")
            if self.head != n:
                raise ODEInputError(f"{name}: options['jacobian']='block' cannot be combined "
                                    f"with quadrature components (e.g. odeint_adjoint); use "
                                    f"'autograd' or 'matrix_free'")
            self.blocks = shapes[0][0]

    def _check_size(self, y: torch.Tensor) -> None:
        """Refuse a dense Jacobian past ``DENSE_JACOBIAN_LIMIT_BYTES`` before building it."""
        rows = y.shape[0] if y.dim() == 2 else 1  # per sample: one (n, n) block per row
        m = y.shape[-1] if y.dim() == 2 else self.head
        size = rows * m * m * y.element_size()
        if size > DENSE_JACOBIAN_LIMIT_BYTES:
            raise ODEInputError(
                f"{self.name}: the dense Jacobian df/dy of this {m:,}-element state would take "
                f"{size / 2**30:.3g} GiB (and as much again for its factorisation), above the "
                f"limit of {DENSE_JACOBIAN_LIMIT_BYTES / 2**30:.3g} GiB. Use options="
                f"{{'jacobian': 'matrix_free'}} (Newton–Krylov: products J v only), "
                f"'block' (a state (B, ...) of B independent systems: B blocks), a callable "
                f"returning df/dy or its (B, m, m) diagonal blocks, or an explicit method")
        self.size_checked = True

    @property
    def matrix_free(self) -> bool:
        return self.spec == "matrix_free"

    def _f(self, t: float, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """y_head -> f(t, y)_head with the quadrature tail of y held fixed."""
        call, head, n = self.rhs.call, self.head, self.n
        if head == n:
            return lambda yh: call(t, yh)
        tail = y[head:].detach()
        return lambda yh: call(t, torch.cat([yh, tail]))[:head]

    def __call__(self, t, y: torch.Tensor, graph: bool = False):
        """J at (t, y): a (head, head) tensor, (B, m, m) blocks, or a ``MatrixFree``.
        ``graph``: keep J differentiable with respect to y and f's parameters (a
        Rosenbrock method's gradient needs it); otherwise J is computed without a graph.
        Per sample (``rhs`` in batch mode, y (B, n), t (B,)): each row's own (n, n) block,
        (B, n, n), by the "block" mode's one ``jacrev``."""
        self.stats.n_jac += 1
        if self.spec == "autograd" and not self.size_checked:
            self._check_size(y)
        if y.dim() == 2:
            call = self.rhs.call
            with torch.set_grad_enabled(graph):
                return self._block(lambda v: call(t, v), y if graph else y.detach(),
                                   y.shape[0])
        yh = y[: self.head] if graph else y[: self.head].detach()
        if callable(self.spec):
            return self._user(t, y, graph)
        f = self._f(t, y)
        if self.spec == "matrix_free":
            return MatrixFree(f, yh)
        with torch.set_grad_enabled(graph):
            if self.spec == "block":
                return self._block(f, yh, self.blocks)
            return self._dense(f, yh, graph)

    def _rows(self, g, y: torch.Tensor, graph: bool):
        """The rows d g_i / dy of g's Jacobian, (g's size, *y.shape): one evaluation of g
        and one backward pass batched over the rows' cotangents (faster than
        ``torch.func.jacrev`` on small states by about 2x, measured); row by row where the
        backward cannot be batched (e.g. func calls torch.autograd.grad, .item() or
        in-place ops on inputs)."""
        with torch.enable_grad():
            # with a graph, a view recorded here (the rows are taken with respect to it,
            # and stay connected to y's own graph); y itself may be a view made without
            # grad mode, with respect to which autograd gives no gradient
            v = y.view_as(y) if graph and y.requires_grad else y.detach().requires_grad_(True)
            out = g(v)
            m = out.numel()
            if not out.requires_grad:  # g does not depend on y (nor on a parameter)
                return torch.zeros(m, *v.shape, dtype=v.dtype, device=v.device)
            if self._batched_grad:
                eye = torch.eye(m, dtype=out.dtype, device=out.device).view(m, *out.shape)
                try:
                    (rows,) = torch.autograd.grad(out, v, eye, is_grads_batched=True,
                                                  retain_graph=True, create_graph=graph,
                                                  allow_unused=True)
                    return torch.zeros(m, *v.shape, dtype=v.dtype, device=v.device) \
                        if rows is None else rows
                except (RuntimeError, NotImplementedError, TypeError):
                    self._batched_grad = False
            rows = []
            for i in range(m):
                (r,) = torch.autograd.grad(out.reshape(-1)[i], v, retain_graph=True,
                                           create_graph=graph, allow_unused=True)
                rows.append(torch.zeros_like(v) if r is None else r)
        return torch.stack(rows)

    def _dense(self, f, yh, graph):
        return self._rows(f, yh, graph).reshape(-1, yh.numel())

    def _block(self, f, y, b: int):
        """The b diagonal blocks (b, m, m) of df/dy for a state of b independent systems of
        m elements each (flat (b m,) or per sample (b, m)): the rows of the Jacobian of the
        sum of f over the systems (row i = d(sum_b f_bi)/dy)."""
        m = y.numel() // b

        def summed(v):
            return f(v).reshape(b, m).sum(0)
        return self._rows(summed, y, torch.is_grad_enabled()).reshape(m, b, m).permute(1, 0, 2)

    def _user(self, t, y, graph):
        with torch.set_grad_enabled(graph):
            J = self.spec(self.rhs.time(t), self.rhs.user_state(y if graph else y.detach()))
        if not isinstance(J, torch.Tensor):
            raise ODEFuncError(f"{self.name}: options['jacobian'](t, y) must return a tensor, "
                               f"got {type(J).__name__}")
        n = self.head
        square = J.dim() == 2 and tuple(J.shape) == (n, n)
        blocks = J.dim() == 3 and J.shape[1] == J.shape[2] and J.shape[0] * J.shape[1] == n
        if not (square or blocks) and J.numel() == n * n:
            J = J.reshape(n, n)  # the user's structure twice, e.g. (d, d) for a (d,) state
        elif not (square or blocks):
            raise ODEFuncError(
                f"{self.name}: options['jacobian'](t, y) returned shape {tuple(J.shape)}; "
                f"expected ({n}, {n}) (df/dy in the flat layout) or (B, m, m) diagonal blocks "
                f"with B * m = {n}")
        return J.to(self.rhs.dtype)


def gmres(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, rtol: float,
          restart: int = 30, max_restarts: int = 10) -> tuple[torch.Tensor, bool]:
    """Solve ``matvec(x) = b`` (1-D) by restarted GMRES from x = 0; stops when the residual is
    at most ``rtol * ||b||``. Returns (x, converged)."""
    x = torch.zeros_like(b)
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return x, True
    target = rtol * bnorm
    n = b.numel()
    m = min(restart, n)
    for _ in range(max_restarts):
        r = b - matvec(x) if x.abs().sum() > 0 else b.clone()
        beta = float(torch.linalg.vector_norm(r))
        if beta <= target:
            return x, True
        V = [r / beta]
        H = torch.zeros(m + 1, m, dtype=torch.float64)
        k_used = 0
        for k in range(m):
            w = matvec(V[k])
            for i in range(k + 1):  # modified Gram–Schmidt
                H[i, k] = torch.dot(w, V[i]).double()
                w = w - H[i, k].to(w.dtype) * V[i]
            H[k + 1, k] = torch.linalg.vector_norm(w).double()
            k_used = k + 1
            # residual of the least-squares problem so far
            e1 = torch.zeros(k + 2, dtype=torch.float64)
            e1[0] = beta
            yk = torch.linalg.lstsq(H[: k + 2, : k + 1], e1.unsqueeze(1)).solution[:, 0]
            res = float(torch.linalg.vector_norm(H[: k + 2, : k + 1] @ yk - e1))
            if res <= target or H[k + 1, k] <= 1e-300:
                break
            V.append(w / H[k + 1, k].to(w.dtype))
        x = x + torch.stack(V[:k_used], 1) @ yk.to(b.dtype)
        if res <= target:
            return x, True
    return x, False


def identity_minus(J: torch.Tensor, c) -> torch.Tensor:
    """I - c J for a dense (n, n) J and a float c, or for (B, m, m) blocks and a float or a
    (B,) tensor of per-block factors (per sample: c = h gamma, one h per row; a row with
    c = 0, a finished sample, gets I whatever its J holds)."""
    eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
    if not isinstance(c, torch.Tensor):
        return eye - c * J
    c = c.to(J.dtype).reshape(-1, 1, 1)
    return eye - torch.where(c != 0, c * J, 0.0)


class NewtonMatrix:
    """The factorised matrix ``I - h (A ⊗ J)`` of a Newton iteration, for J as returned by
    ``JacobianSource`` (dense, blocks, or matrix-free), ``A`` a scalar gamma or an (s, s)
    matrix of stage coefficients (fully implicit Runge–Kutta).

    ``solve(b)``: b of shape (n,) for a scalar A, (s, n) for a matrix A (stage-major),
    returns x of the same shape. Per sample: J (B, n, n) blocks, h a (B,) tensor, b (B, n).
    Gradients do not flow through the matrix: it is an iteration matrix (for exact
    gradients a stepper applies the implicit function theorem with the Jacobian at the
    converged stages)."""

    def __init__(self, J, h, A, stats, *, gmres_rtol: float = 1e-3):
        self.h, self.stats = h, stats
        self.scalar = not isinstance(A, torch.Tensor)
        self.A = A
        self.J = J
        self.gmres_rtol = gmres_rtol
        stats.n_lu += 1
        if isinstance(J, MatrixFree):
            self.kind = "matfree"
            return
        J = J.detach().contiguous()  # (the rows of f = A @ y can come as a transposed view)
        if self.scalar:
            self.kind = "dense" if J.dim() == 2 else "block"
            M = identity_minus(J, h * A)
        else:
            A = A.to(J.dtype).to(J.device)
            s = A.shape[0]
            if J.dim() == 2:
                self.kind = "dense"
                n = J.shape[0]
                # stage-major unknowns: z = (z_1, ..., z_s), each of length n
                M = torch.eye(s * n, dtype=J.dtype, device=J.device) - h * torch.kron(A, J)
            else:
                self.kind = "block"
                B, m, _ = J.shape
                # per system b: unknowns (z_1b, ..., z_sb) of length s*m
                kr = (A[None, :, None, :, None] * J[:, None, :, None, :]).reshape(B, s * m,
                                                                                 s * m)
                M = identity_minus(kr, h)
        self.lu, self.piv = torch.linalg.lu_factor(M)
        if not bool(torch.isfinite(self.lu).all()):
            raise ODEFuncError("the Jacobian df/dy is not finite (nan/inf) at the current state")

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        if self.kind == "matfree":
            return self._solve_matfree(b)
        # dense, or blocks: b (n,) or (s, n) with n = B * m; per sample (h per row) b (B, m)
        # or row by row stage-major (B, s m): each row's unknowns are one block's
        by_row = self.scalar or isinstance(self.h, torch.Tensor)
        return lu_solve(self.lu, self.piv, b, stages=not by_row)

    def _solve_matfree(self, b: torch.Tensor) -> torch.Tensor:
        h, A, J = self.h, self.A, self.J
        if self.scalar:
            def mv(v):
                return v - (h * A) * J.mv(v)
        else:
            s = A.shape[0]
            Ad = A.to(b.dtype).to(b.device)

            def mv(v):
                V = v.reshape(s, -1)
                JV = torch.stack([J.mv(V[i]) for i in range(s)])
                return (V - h * (Ad @ JV)).reshape(-1)
        x, ok = gmres(mv, b.reshape(-1), rtol=self.gmres_rtol)
        if not ok:
            # an inexact Newton direction: the Newton iteration's own convergence test
            # decides whether the step can be used
            self.stats.extra["gmres_not_converged"] = \
                self.stats.extra.get("gmres_not_converged", 0) + 1
        return x.reshape(b.shape)


def lu_solve(lu: torch.Tensor, piv: torch.Tensor, b: torch.Tensor, *,
             stages: bool = False, adjoint: bool = False) -> torch.Tensor:
    """M^{-1} b (``adjoint``: M^{-T} b) from M's LU factors (``torch.linalg.lu_factor``;
    differentiable with respect to b): a dense M, b any shape holding its size; or B
    diagonal blocks (B, p, p) of M, b holding B * p numbers: ``stages`` False, block by
    block ((B * p,), (B, p)); True, stage-major, (s, B * m) or (s, B, m) with p = s m, each
    block one system's s stages."""
    if lu.dim() == 2:
        return torch.linalg.lu_solve(lu, piv, b.reshape(-1, 1),
                                     adjoint=adjoint).reshape(b.shape)
    B, sm = lu.shape[0], lu.shape[1]
    if not stages:
        return torch.linalg.lu_solve(lu, piv, b.reshape(B, sm, 1),
                                     adjoint=adjoint).reshape(b.shape)
    s = b.shape[0]
    m = sm // s
    rhs = b.reshape(s, B, m).permute(1, 0, 2).reshape(B, sm, 1)
    x = torch.linalg.lu_solve(lu, piv, rhs)
    return x.reshape(B, s, m).permute(1, 0, 2).reshape(b.shape)


@dataclass
class NewtonResult:
    z: torch.Tensor
    converged: Any  # bool; per sample a (B,) bool tensor
    iterations: int
    rate: Any  # the last observed contraction factor (nan after one iteration); per row
    reason: str = ""


# the verdict of one Newton iteration (``_newton_verdict``)
_GOING, _CONVERGED, _NONFINITE, _DIVERGE, _SLOW = 0, 1, 2, 3, 4


def _newton_verdict(k: int, nrm, prev, eta_k, tol: float, max_iters: int,
                    min_iters: int = 1, floor: float = 0.0):
    """After iteration k with scaled correction norm ``nrm`` (the previous one ``prev``):
    (theta, eta_k, verdict) on floats or per-row (B,) tensors. Hairer & Wanner's test: the
    rate theta = nrm / prev, eta = theta / (1 - theta); converged when eta nrm <= tol; a
    failure when the correction is not finite, theta >= 1, or theta^remaining eta nrm
    predicts no convergence in the iterations left.

    ``min_iters``: before that many iterations only a correction at the rounding ``floor``
    converges (the rate of the next one shows whether the first was accurate: scipy's BDF
    asks for two). ``floor``: a correction of at most this norm (what rounding leaves, e.g.
    2 eps / rtol: the iterate no longer moves) converges whatever its rate: a rate measured
    from rounding noise is noise, not divergence."""
    theta = math.nan
    verdict = where(isfinite(nrm), _GOING, _NONFINITE)
    noise, above = nrm <= floor, nrm > floor  # (nan: neither; already _NONFINITE)
    if k > 0:
        theta = where(prev > 0, nrm / where(prev > 0, prev, 1.0), 0.0)
        diverge = theta >= 1.0
        verdict = where((verdict == _GOING) & diverge & above, _DIVERGE, verdict)
        eta_k = where(diverge, eta_k, theta / where(diverge, 1.0, 1.0 - theta))
        remaining = max_iters - 1 - k
        if remaining > 0:
            slow = theta ** remaining * eta_k * nrm > tol
            verdict = where((verdict == _GOING) & slow & above, _SLOW, verdict)
    done = noise | (nrm == 0.0)
    if k + 1 >= min_iters:
        done = done | (eta_k * nrm <= tol)
    verdict = where((verdict == _GOING) & done, _CONVERGED, verdict)
    return theta, eta_k, verdict


def newton_tolerance(rtol: float, eps: float) -> float:
    """Newton's tolerance kappa, a fraction of the error scale atol + rtol |y| (RADAU5's
    FNEWT, Hairer & Wanner, Solving ODEs II, IV.8): min(0.03, sqrt(rtol)), and at least
    2 eps / rtol (what the dtype can resolve; RADAU5 has 10 eps). A fixed 0.03 is loose at
    tight tolerances: the Newton error of every stage stays in the step and the embedded
    estimate does not see it (measured: kvaerno5 on Van der Pol at rtol 1e-6, 7,900x the
    tolerance with 0.03, 6.9x with 1e-3)."""
    if not rtol > 0:
        return 0.03
    return max(rounding_floor(rtol, eps), min(0.03, math.sqrt(rtol)))


def rounding_floor(rtol: float, eps: float) -> float:
    """2 eps / rtol: a Newton correction of this size in units of atol + rtol |y| is at the
    resolution of y (about two units in the last place): below it an iterate no longer moves
    and a correction, or a rate measured from it, is rounding noise (``newton``'s
    ``floor``)."""
    return 2 * eps / rtol if rtol > 0 else 0.0


def _first_eta(eta):
    """The contraction estimate for a first iteration: eta carried from the previous solve
    (a float or per row; None or nan: none) to the power 0.8."""
    if eta is None:
        return 1.0
    return where(eta != eta, 1.0, maximum(eta, 1e-16) ** 0.8)  # eta != eta: nan


def newton(residual: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor,
           matrix: NewtonMatrix, scale: torch.Tensor, *, tol: float, max_iters: int,
           stats, eta=None, active: torch.Tensor | None = None, min_iters: int = 1,
           floor: float = 0.0) -> NewtonResult:
    """Simplified Newton for ``residual(z) = 0`` with the factorised ``matrix`` ~ d residual/dz:
    z <- z - matrix^{-1} residual(z).

    Convergence is measured in the RMS norm of dz / ``scale`` (``scale`` = atol + rtol |y|,
    the step's error tolerances) with the contraction-rate test of Hairer & Wanner (Solving
    ODEs II, IV.8; ``_newton_verdict``): converged when eta * ||dz|| <= tol, eta = theta /
    (1 - theta) from the observed rate theta (``eta``, carried from the previous solve,
    serves the first iteration). Fails (never raises) when the rate is >= 1, the iterate is
    not finite, or the predicted error after ``max_iters`` exceeds ``tol``.

    Per sample (``active``: a (B,) mask of the rows to solve; z (B, m), ``eta`` a (B,)
    tensor, nan for none): every row iterates as it would alone and stops at its own
    verdict (a row that stopped keeps its iterate); ``converged`` and ``rate`` are (B,).

    ``min_iters``, ``floor``: see ``_newton_verdict`` (defaults: one iteration may converge;
    no rounding floor)."""
    if active is not None:
        return _newton_rows(residual, z0, matrix, scale, tol, max_iters, stats, eta, active,
                            min_iters, floor)
    z = z0
    inv_sqrt = 1.0 / math.sqrt(max(z.numel(), 1))
    prev = math.nan
    theta = math.nan
    eta_k = _first_eta(eta)
    for k in range(max_iters):
        stats.n_newton += 1
        r = residual(z)
        dz = matrix.solve(-r)
        nrm = float(torch.linalg.vector_norm(dz / scale)) * inv_sqrt
        theta, eta_k, verdict = _newton_verdict(k, nrm, prev, eta_k, tol, max_iters,
                                                min_iters, floor)
        if verdict == _NONFINITE:
            stats.n_newton_fail += 1
            return NewtonResult(z, False, k + 1, theta, "the Newton iterate became non-finite")
        z = z + dz
        if verdict == _DIVERGE:
            stats.n_newton_fail += 1
            return NewtonResult(z, False, k + 1, theta,
                                f"Newton iterations diverge (contraction rate {theta:.3g})")
        if verdict == _SLOW:
            stats.n_newton_fail += 1
            return NewtonResult(z, False, k + 1, theta,
                                f"Newton iterations converge too slowly (rate {theta:.3g}, "
                                f"would not reach the tolerance in {max_iters} iterations)")
        if verdict == _CONVERGED:
            return NewtonResult(z, True, k + 1, theta)
        prev = nrm
    stats.n_newton_fail += 1
    return NewtonResult(z, False, max_iters, theta,
                        f"Newton iterations did not converge in {max_iters} iterations "
                        f"(last scaled correction {prev:.3g}, tolerance {tol:.3g})")


def _newton_rows(residual, z0, matrix, scale, tol, max_iters, stats, eta, active,
                 min_iters=1, floor=0.0):
    """``newton`` per row: the residual and the solves run on the whole batch, each row
    moves until its own verdict (one host synchronisation per iteration: whether a row
    still iterates)."""
    z = z0
    inv_sqrt = 1.0 / math.sqrt(max(z.shape[-1], 1))
    nan = torch.full(active.shape, math.nan, dtype=torch.float64, device=z.device)
    prev, rate = nan, nan
    eta_k = _first_eta(eta)
    if isinstance(eta_k, float):
        eta_k = torch.full_like(nan, eta_k)
    going = active.clone()
    converged = torch.zeros_like(active)
    for k in range(max_iters):
        stats.n_newton += 1
        r = residual(z)
        dz = matrix.solve(-r)
        nrm = (torch.linalg.vector_norm(dz / scale, dim=-1) * inv_sqrt).to(torch.float64)
        theta, eta_new, verdict = _newton_verdict(k, nrm, prev, eta_k, tol, max_iters,
                                                  min_iters, floor)
        z = torch.where((going & (verdict != _NONFINITE))[:, None], z + dz, z)
        if k > 0:
            rate = torch.where(going, theta, rate)
        eta_k = torch.where(going, eta_new, eta_k)
        converged = converged | (going & (verdict == _CONVERGED))
        going = going & (verdict == _GOING)
        prev = nrm
        if not bool(going.any()):
            break
    fails = int((active & ~converged).sum())
    stats.n_newton_fail += fails
    return NewtonResult(z, converged, k + 1, rate,
                        "Newton iterations did not converge" if fails else "")


__all__ = ["JACOBIAN_MODES", "JACOBIAN_OPTIONS", "JacobianSource", "MatrixFree", "NewtonMatrix",
           "NewtonResult", "check_jacobian_option", "gmres", "identity_minus", "lu_solve",
           "newton", "newton_tolerance", "rounding_floor"]
