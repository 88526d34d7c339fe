"""Rosenbrock (linearly implicit) methods: ``rodas4`` and ``rodas5p``.

One step of an s-stage Rosenbrock method in the transformed variables of Hairer & Wanner
(Solving ODEs II, IV.7, eq. (7.25)) needs one Jacobian J = df/dy, one time derivative
f_t = df/dt and one LU factorisation of ``I - h gamma J``, and no Newton iteration:

    (I / (h gamma) - J) k_i = f(t + c_i h, y + sum_j a_ij k_j) + d_i h f_t
                              + sum_j (C_ij / h) k_j,                  i = 1..s,
    y1 = y + sum_i b_i k_i.

Both methods are stiffly accurate with the structure of Hairer's RODAS: the last stages are
evaluated at the running solution (``a`` rows equal to ``b`` up to that stage), the error
estimate is the last stage ``k_s`` (y1 minus the embedded solution), and the dense output is

    y(t + theta h) = (1 - theta) y + theta y1 + theta (1 - theta) sum_m theta^m D_m,
    D_m = sum_j H_mj k_j.

* ``rodas4``: Hairer & Wanner's RODAS (coefficients of ROCOE, method 1), 6 stages, order
  4(3), L-stable, dense output of order 3.
* ``rodas5p``: Steinebach's Rodas5P (2023), 8 stages, order 5(4), L-stable, dense output of
  order 4.

The time derivative f_t is computed by forward-mode autograd on t (a dual number for t,
giving f(t, y) and f_t in one evaluation); for functions without forward-mode support, by
reverse-mode autograd (the double-vjp identity, one evaluation and two backward passes).
The Jacobian comes from ``JacobianSource`` (autograd dense, block
diagonal, matrix-free with GMRES, or the user's callable).

Gradients (backpropagation through the solve): J and f_t are built with a graph and the
linear systems are solved with a differentiable LU, so autograd gives the exact gradient of
the discrete solution (the step sizes, chosen without a graph, are constants, as for the
explicit methods). Matrix-free Jacobians cannot be backpropagated through (GMRES).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD

from neuralode.errors import ODEInputError
from neuralode.solvers.base import StepFailure
from neuralode.solvers.elementwise import column, divisor
from neuralode.solvers.gustafsson import GustafssonController
from neuralode.solvers.jacobian import (
    JACOBIAN_OPTIONS,
    JacobianSource,
    NewtonMatrix,
    check_jacobian_option,
    identity_minus,
    lu_solve,
)
from neuralode.solvers.methods import (
    IMPLICIT_ADAPTIVE_OPTIONS,
    STIFF_OUTPUT_OPTIONS,
    AdaptiveRK,
)
from neuralode.solvers.timekeeping import time_dtype


@dataclass(frozen=True, eq=False)
class RosenbrockTableau:
    """Coefficients of a Rosenbrock method in transformed variables (see the module
    docstring); rows of ``a`` and ``C`` list the coefficients of k_1..k_{i-1}."""

    name: str
    order: int
    error_order: int
    dense_order: int
    gamma: float
    a: tuple
    C: tuple
    c: tuple
    d: tuple
    b: tuple
    H: tuple
    dense_name: str
    fsal: bool = False

    @property
    def stages(self) -> int:
        return len(self.b)


def _rodas_structure(name, order, error_order, dense_order, gamma, a_rows, C_rows, c_free,
                     d_free, H, dense_name) -> RosenbrockTableau:
    """The RODAS layout: the rows of ``a`` given for the stages up to the first one at
    c = 1; the remaining stages add one k each to the running solution."""
    s = len(C_rows) + 1
    a = [()] + [tuple(r) for r in a_rows]
    while len(a) < s:
        a.append(tuple(a[-1]) + (1.0,))
    b = tuple(a[-1]) + (1.0,)
    c = (0.0, *c_free) + (1.0,) * (s - 1 - len(c_free))
    d = tuple(d_free) + (0.0,) * (s - len(d_free))
    return RosenbrockTableau(name, order, error_order, dense_order, gamma, tuple(a),
                             ((),) + tuple(tuple(r) for r in C_rows), c, d, b,
                             tuple(tuple(r) for r in H), dense_name)


# Hairer & Wanner's RODAS (ROCOE, METH = 1)
RODAS4 = _rodas_structure(
    "rodas4", 4, 3, 3, 0.25,
    a_rows=[
        [1.544],
        [0.9466785280815826, 0.2557011698983284],
        [3.314825187068521, 2.896124015972201, 0.9986419139977817],
        [1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950],
    ],
    C_rows=[
        [-5.6688],
        [-2.430093356833875, -0.2063599157091915],
        [-0.1073529058151375, -9.594562251023355, -20.47028614809616],
        [7.496443313967647, -10.24680431464352, -33.99990352819905, 11.70890893206160],
        [8.083246795921522, -7.981132988064893, -31.52159432874371, 16.31930543123136,
         -6.058818238834054],
    ],
    c_free=[0.386, 0.21, 0.63],
    d_free=[0.25, -0.1043, 0.1035, -0.03620000000000023],
    H=[
        [10.12623508344586, -7.487995877610167, -34.80091861555747, -7.992771707568823,
         1.025137723295662, 0.0],
        [-0.6762803392801253, 6.087714651680015, 16.43084320892478, 24.76722511418386,
         -6.594389125716872, 0.0],
    ],
    dense_name="RODAS dense output (order 3)")

# Steinebach (2023), "Construction of Rosenbrock-Wanner method Rodas5P and numerical
# benchmarks within the Julia Differential Equations package", BIT Numer. Math. 63:27
RODAS5P = _rodas_structure(
    "rodas5p", 5, 4, 4, 0.21193756319429014,
    a_rows=[
        [3.0],
        [2.849394379747939, 0.45842242204463923],
        [-6.954028509809101, 2.489845061869568, -10.358996098473584],
        [2.8029986275628964, 0.5072464736228206, -0.3988312541770524, -0.04721187230404641],
        [-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256,
         0.030198172008377946],
    ],
    C_rows=[
        [-14.155112264123755],
        [-17.97296035885952, -2.859693295451294],
        [147.12150275711716, -1.41221402718213, 71.68940251302358],
        [165.43517024871676, -0.4592823456491126, 42.90938336958603, -5.961986721573306],
        [24.854864614690072, -3.0009227002832186, 47.4931110020768, 5.5814197821558125,
         -0.6610691825249471],
        [30.91273214028599, -3.1208243349937974, 77.79954646070892, 34.28646028294783,
         -19.097331116725623, -28.087943162872662],
        [37.80277123390563, -3.2571969029072276, 112.26918849496327, 66.9347231244047,
         -40.06618937091002, -54.66780262877968, -9.48861652309627],
    ],
    c_free=[0.6358126895828704, 0.4095798393397535, 0.9769306725060716, 0.4288403609558664],
    d_free=[0.21193756319429014, -0.42387512638858027, -0.3384627126235924,
            1.8046452872882734, 2.325825639765069],
    H=[
        [25.948786856663858, -2.5579724845846235, 10.433815404888879, -2.3679251022685204,
         0.524948541321073, 1.1241088310450404, 0.4272876194431874, -0.17202221070155493],
        [-9.91568850695171, -0.9689944594115154, 3.0438037242978453, -24.495224566215796,
         20.176138334709044, 15.98066361424651, -6.789040303419874, -6.710236069923372],
        [11.419903575922262, 2.8879645146136994, 72.92137995996029, 80.12511834622643,
         -52.072871366152654, -59.78993625266729, -0.15582684282751913, 4.883087185713722],
    ],
    dense_name="Rodas5P dense output (order 4)")

TABLEAUX = {"rodas4": RODAS4, "rodas5p": RODAS5P}


class _LUSolve(torch.autograd.Function):
    """x = M^{-1} b with M's LU factors computed once per step (M = I - hg J carries the
    graph of J). Backward: g_b = M^{-T} g, g_M = -g_b x^T (per block for (B, m, m) M)."""

    @staticmethod
    def forward(ctx, M, b, lu, piv):
        x = lu_solve(lu, piv, b)
        ctx.save_for_backward(lu, piv, x)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        lu, piv, x = ctx.saved_tensors
        gb = lu_solve(lu, piv, g, adjoint=True)
        if lu.dim() == 3:
            B, m = lu.shape[0], lu.shape[1]
            gM = -(gb.reshape(B, m, 1) * x.reshape(B, 1, m))
        else:
            gM = -torch.outer(gb, x)
        return gM, gb, None, None


class _DifferentiableMatrix:
    """``I - hg J`` factorised once, with solves differentiable with respect to J (so to y
    and the parameters of f) and the right-hand side: dense (n, n) or (B, m, m) blocks
    (per sample: hg a (B,) tensor)."""

    def __init__(self, J, hg, stats):
        stats.n_lu += 1
        self.M = identity_minus(J, hg)
        self.lu, self.piv = torch.linalg.lu_factor(self.M.detach())

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        return _LUSolve.apply(self.M, b, self.lu, self.piv)


class RosenbrockSegment:
    """The dense output of one accepted step, kept for a dense solution."""

    __slots__ = ("D", "y0", "y1")

    def __init__(self, y0, y1, D):
        self.y0, self.y1, self.D = y0, y1, D

    def evaluate(self, thetas) -> torch.Tensor:
        return torch.stack(_dense(self.y0, self.y1, self.D, thetas))


def _dense_rows(y0, y1, D, theta: torch.Tensor) -> torch.Tensor:
    """``_dense`` per row: y0, y1 and the D_m (R, n), theta (R, m) float64 -> (R, m, n)."""
    th = theta.to(y0.dtype)[..., None]
    acc = D[-1].unsqueeze(1)
    for Dm in reversed(D[:-1]):
        acc = torch.addcmul(Dm.unsqueeze(1), th, acc)
    lin = torch.addcmul(y0.unsqueeze(1) * (1.0 - th), th, y1.unsqueeze(1))
    return torch.addcmul(lin, th * (1.0 - th), acc)


def _dense(y0, y1, D, thetas) -> list[torch.Tensor]:
    out = []
    for th in thetas:
        if th == 0.0:
            out.append(y0)
            continue
        if th == 1.0:
            out.append(y1)
            continue
        acc = D[-1]
        for Dm in reversed(D[:-1]):
            acc = torch.add(Dm, acc, alpha=th)
        lin = torch.add(y0 * (1.0 - th), y1, alpha=th)
        out.append(torch.add(lin, acc, alpha=th * (1.0 - th)))
    return out


@functools.lru_cache(maxsize=64)
def _tensor_tableau(tab: RosenbrockTableau, dtype: torch.dtype, device: torch.device,
                    tdtype: torch.dtype):
    """The tableau as tensors of the state's dtype, made once per (tableau, dtype, device,
    time dtype) (a checkpoint replay starts a stepper every step); read-only. The rows of
    ``a`` and of gamma C (the stage equations multiplied by h gamma: the C_ij / h terms
    become gamma C_ij, free of h), ``b``, the dense output's H, and d in the time dtype
    ``tdtype`` (float64, or float32 on a device without it: ``timekeeping.time_dtype``)."""
    def tensor(rows):
        return torch.tensor(rows, dtype=dtype, device=device)
    a = [tensor(tab.a[i]) for i in range(tab.stages)]
    gC = [tensor([tab.gamma * v for v in tab.C[i]]) for i in range(tab.stages)]
    d = torch.tensor(tab.d, dtype=tdtype, device=device)
    return a, gC, tensor(tab.b), tensor(tab.H), d


class RosenbrockStepper:
    """One step of a Rosenbrock method on the flat state (the drivers' stepper interface;
    see ``rk.RKStepper``). f(t, y), f_t and J at the step's start are computed once per
    accepted point and reused by rejected attempts; each attempt factorises
    ``I - h gamma J`` once.

    One problem: y (n,), t and h floats. Per sample: y (B, n), t and h (B,) float64
    tensors, J the (B, n, n) blocks of each row's own Jacobian, one batched LU per attempt
    (a row with h = 0, a finished sample, is left unchanged); f, f_t and J are recomputed
    for every row after each attempt (a rejected row's are the same values again)."""

    fsal = False

    def __init__(self, tab: RosenbrockTableau, jacobian, gmres_rtol: float, name: str):
        self.tab = tab
        self.order = tab.order
        self.error_order = tab.error_order
        self.jacobian_spec = jacobian
        self.gmres_rtol = gmres_rtol
        self.name = name
        self.s = tab.stages

    # -- per solve --------------------------------------------------------------------
    def start(self, rhs, y0: torch.Tensor, f0: torch.Tensor, graph: bool) -> None:
        self.rhs = rhs
        self.graph = graph
        self.batch = y0.dim() == 2
        self.stats = rhs.stats
        self.jac = JacobianSource(self.jacobian_spec, rhs, y0.numel(), name=self.name)
        if graph and self.jac.matrix_free:
            raise ODEInputError(
                f"{self.name}: options['jacobian']='matrix_free' cannot be backpropagated "
                f"through (the linear systems are solved by GMRES); for gradients use "
                f"jacobian='autograd' or 'block', or odeint_adjoint")
        self.f0 = f0
        self.from_right = False
        self.J = None
        self.ft = None
        self._forward_mode = True
        self.D = None
        self.a_t, self.gC_t, self.b_t, self.H_t, self.d64 = _tensor_tableau(
            self.tab, y0.dtype, y0.device, time_dtype(y0.device))
        self._buffer(None if graph else y0.new_empty(self.s, *y0.shape))

    # -- the step's start point -------------------------------------------------------
    def _f_and_ft(self, tt: torch.Tensor, y: torch.Tensor):
        """f(t, y) and df/dt(t, y) at the time tensor ``tt``."""
        call_at = self.rhs.call_at
        graph = self.graph
        yy = y if graph else y.detach()
        if self._forward_mode:
            try:
                # torch's forward-mode AD scripts helpers on first use and warns that
                # torch.jit.script is deprecated: torch's own business, not the caller's
                with torch.set_grad_enabled(graph), warnings.catch_warnings(), \
                        fwAD.dual_level():
                    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
                    f, ft = fwAD.unpack_dual(call_at(fwAD.make_dual(tt, torch.ones_like(tt)),
                                                     yy))
                if ft is None:  # f does not depend on t
                    return f, torch.zeros_like(f)
                # (the tangent of a float32 state's f can come back in float64)
                return f, ft.to(f.dtype)
            except (RuntimeError, NotImplementedError, TypeError):
                # an op without forward-mode AD, .item() / Python control flow on t, ...
                self._forward_mode = False
        with torch.enable_grad():
            s = tt.detach().requires_grad_(True)
            out = call_at(s, yy)
            ft = None
            if out.requires_grad:
                u = torch.zeros_like(out, requires_grad=True)
                (g,) = torch.autograd.grad(out, s, u, create_graph=True, allow_unused=True)
                if g is not None and g.requires_grad:
                    (ft,) = torch.autograd.grad(g, u, create_graph=graph, allow_unused=True)
        if ft is None:
            ft = torch.zeros_like(out)
        if not graph:
            out, ft = out.detach(), ft.detach()
        return out, ft

    def _prepare_point(self, t, y: torch.Tensor, h) -> None:
        rhs = self.rhs
        if not self.batch:
            tt = rhs.toward(t, t + h) if self.from_right else rhs.time(t)
            f, ft = self._f_and_ft(tt, y)
        elif rhs.time_arg == "none":  # func ignores t: f_t = 0
            with torch.set_grad_enabled(self.graph):
                f = rhs.call(t, y if self.graph else y.detach())
            ft = torch.zeros_like(f)
        else:
            f, ft = self._f_and_ft(t.to(rhs.dtype), y)
        if self.f0 is None:
            self.f0 = f
        self.ft = ft
        self.J = self.jac(t, y, graph=self.graph)

    def _matrix(self, hg):
        if self.graph:
            return _DifferentiableMatrix(self.J, hg, self.stats)
        return NewtonMatrix(self.J, hg, 1.0, self.stats, gmres_rtol=self.gmres_rtol)

    # -- one attempt ------------------------------------------------------------------
    def _buffer(self, K: torch.Tensor | None) -> None:
        """The stage buffer (s, *state shape) (None: with a graph, the stages are a list)
        and its transposed views K[:i]^T, made once."""
        self.K = K
        self.KT = None if K is None else [K.view(self.s, -1)[:i].t() for i in range(self.s + 1)]

    def _stages_t(self, K, i: int) -> torch.Tensor:
        """The first i stages as the columns of a (state size, i) matrix: a view of the
        stage buffer, or (with a graph) the stages stacked."""
        if self.KT is not None:
            return self.KT[i]
        return torch.stack(K[:i]).view(i, -1).t()

    def step(self, t, y: torch.Tensor, h, left_end=None) -> torch.Tensor:
        """One attempt. The stage equations are multiplied by h gamma (the matrix is
        I - h gamma J): k_i = M^-1 (h gamma (f_i + d_i h f_t) + sum_j gamma C_ij k_j); each
        sum over the stages is one matrix-vector product with the stacked stages (per
        sample over all rows at once: the coefficients are the same for every row, only
        h gamma and d_i h are per row)."""
        if self.J is None:
            self._prepare_point(t, y, h)
        tab = self.tab
        hg = h * tab.gamma
        matrix = self._matrix(hg)
        rhs = self.rhs
        ft, c, d = self.ft, tab.c, tab.d
        matfree = self.jac.matrix_free
        batch, shape = self.batch, y.shape
        flat = y.view(-1) if batch else y
        # h gamma and the d_i h as tensors of the state's dtype, the products formed in
        # float64 and rounded once (per sample: one column per row); the same kernels serve
        # one problem and a batch, so that a sample's arithmetic is its solo solve's
        if batch:
            hg_row = column(hg, y)
            dh = (self.d64.unsqueeze(-1) * h).to(y.dtype).unsqueeze(-1).unbind(0)
        else:
            hg_row = y.new_tensor(hg)
            dh = (self.d64 * h).to(y.dtype).unbind(0)
        K = self.K if self.K is not None else []
        for i in range(self.s):
            if i == 0:
                fi = self.f0
            else:
                KT = self._stages_t(K, i)
                yi = torch.addmv(flat, KT, self.a_t[i])
                yi = yi.view(shape) if batch else yi
                ti = t + c[i] * h
                fi = rhs.call(ti, yi) if left_end is None else rhs.call_at(left_end(ti), yi)
            if d[i] != 0.0:
                fi = torch.addcmul(fi, ft, dh[i])
            if i == 0:
                r = fi * hg_row
            else:
                comb = torch.mv(KT, self.gC_t[i])
                r = torch.addcmul(comb.view(shape) if batch else comb, fi, hg_row)
            if matfree:
                before = self.stats.extra.get("gmres_not_converged", 0)
            k = matrix.solve(r)
            if matfree and self.stats.extra.get("gmres_not_converged", 0) > before:
                raise StepFailure(f"GMRES did not solve the linear system of stage {i + 1} "
                                  f"to relative residual {self.gmres_rtol:.1e}", factor=0.5)
            if self.K is not None:
                K[i].copy_(k)
            else:
                K.append(k)
        self.Ks = K
        self._h = h
        self.D = None
        # the increment is summed first and added once (one rounding at |y|'s magnitude)
        incr = torch.mv(self._stages_t(K, self.s), self.b_t)
        self.y1 = y1 = y + (incr.view(shape) if batch else incr)
        return y1

    def error(self) -> torch.Tensor:
        """The last stage (y1 minus the embedded solution) divided by h (the controller
        multiplies the norm by h); a finished row (h = 0, zero stages) gives zero."""
        last = self.Ks[-1].detach()
        return last / column(divisor(self._h), last)

    # -- after an accepted step ---------------------------------------------------------
    def end_derivative(self, t1_time, y1: torch.Tensor):
        """Nothing: f(t1, y1) comes with f_t at the next step's start (one evaluation)."""
        return

    def prepare_interp(self, t1_time, y1) -> None:
        if self.D is None:
            D = (self.H_t @ self._stages_t(self.Ks, self.s).t()).view(-1, *self.y1.shape)
            self.D = list(D.unbind(0))

    def interpolate(self, y: torch.Tensor, h, thetas, row: int | None = None):
        """States at t + theta h on the accepted step (see ``rk.RKStepper.interpolate``):
        a list of fractions -> a list of states; per sample (B, m) fractions -> (B, m, n);
        ``row`` b: one sample's step as one problem's."""
        self.prepare_interp(None, None)
        if not isinstance(thetas, list):
            return _dense_rows(y, self.y1, self.D, thetas)
        if row is not None:
            return _dense(y, self.y1[row], [Dm[row] for Dm in self.D], thetas)
        return _dense(y, self.y1, self.D, thetas)

    # -- per sample: the recorded steps of a dense solution (``batched.BatchedDense``) --
    def record_stages(self) -> torch.Tensor:
        """The last attempt's interpolation data, (number of D_m, B, n)."""
        self.prepare_interp(None, None)
        return torch.stack(self.D)

    @staticmethod
    def dense_rows(y, y1, h, stages, theta) -> torch.Tensor:
        """Rows of recorded steps at the fractions ``theta`` (R,): y, y1 (R, n), stages
        (R, number of D_m, n) from ``record_stages`` -> (R, n)."""
        return _dense_rows(y, y1, list(stages.unbind(1)), theta[:, None])[:, 0]

    def take(self, idx) -> None:
        """Keep the rows ``idx`` (a per-sample batch shrinks)."""
        for name in ("f0", "ft", "J", "y1"):
            v = getattr(self, name, None)
            if v is not None:
                setattr(self, name, v[idx])
        if self.K is not None:
            self._buffer(self.K[:, idx].contiguous())
        if getattr(self, "Ks", None) is not None:  # (the buffer, or with a graph a list)
            self.Ks = self.K if self.K is not None else [k[idx] for k in self.Ks]
        if self.D is not None:
            self.D = [k[idx] for k in self.D]

    def segment(self, y: torch.Tensor, h: float):
        self.prepare_interp(None, None)
        return RosenbrockSegment(y, self.y1, self.D)

    def restart(self) -> None:
        """Nothing carried across steps but the start point (reset by ``advance``)."""

    def advance(self, f_next: torch.Tensor | None = None, accept=None) -> None:
        """The next step starts at the accepted point: f (``f_next``: from the right of a
        discontinuity, or None to evaluate it with f_t), f_t and J are recomputed there.
        Per sample (``accept``: the rows that moved) every row's are recomputed."""
        self.f0 = f_next
        self.from_right = f_next is not None
        self.J = None
        self.ft = None

    # -- replay (gradient="checkpoint") -------------------------------------------------
    def carry(self):
        """(tensors, plain data) the next step depends on besides its start state: f from
        the right of a discontinuity when it was given (else f, f_t and J are recomputed at
        the start, with a graph) and whether f_t is taken in forward mode."""
        f0 = self.f0 if self.J is None else (self.f0 if self.from_right else None)
        return ([f0] if f0 is not None else []), (self.from_right, self._forward_mode)

    def resume(self, rhs, y, carry, graph) -> None:
        tensors, (from_right, forward_mode) = carry
        self.start(rhs, y, tensors[0] if tensors else None, graph)
        self.from_right, self._forward_mode = from_right, forward_mode


class RosenbrockMethod(AdaptiveRK):
    """Rosenbrock method with error control and dense output. ``step_to_outputs``: see
    ``methods.STEP_TO_OUTPUTS_DOC``."""
    tensor_clock = True  # per sample: batched, each row its own Jacobian block and LU

    tableau: RosenbrockTableau
    OPTIONS: ClassVar[dict[str, Any]] = dict(IMPLICIT_ADAPTIVE_OPTIONS, **JACOBIAN_OPTIONS,
                                             **STIFF_OUTPUT_OPTIONS)
    # odeint_adjoint's backward solve by default (first one registered): its stages need
    # the exact Jacobian of the backward system, with second derivatives of func; an ESDIRK
    # method (Newton, where an approximate Jacobian costs iterations, not order) does not
    adjoint_method: ClassVar[tuple[str, ...]] = ("kvaerno5", "dopri5")

    @classmethod
    def describe(cls) -> str:
        t = cls.tableau
        return (f"Rosenbrock, adaptive, order {t.order}({t.error_order}), {t.stages} stages, "
                f"one LU per step, L-stable, dense output of order {t.dense_order}")

    @classmethod
    def check(cls, o: dict) -> None:
        super().check(o)
        check_jacobian_option(cls.name, o["jacobian"])

    @classmethod
    def make_stepper(cls, o: dict, norm):
        rtol = norm.rtol if isinstance(norm.rtol, float) else float(norm.rtol.min())
        # a linear solve inexact by ~rtol/10 keeps the stages within the local tolerance
        gmres_rtol = min(1e-3, max(0.1 * rtol, 1e-13))
        return RosenbrockStepper(cls.tableau, o["jacobian"], gmres_rtol, cls.name)


class Rodas4(RosenbrockMethod):
    """Hairer & Wanner's RODAS: Rosenbrock 4(3), 6 stages, L-stable, stiffly accurate."""

    name = "rodas4"
    tableau = RODAS4
    order = 4


class Rodas5P(RosenbrockMethod):
    """Steinebach's Rodas5P: Rosenbrock 5(4), 8 stages, L-stable, stiffly accurate."""

    name = "rodas5p"
    tableau = RODAS5P
    order = 5
    # Gustafsson's predictive controller (as Hairer's RODAS) by default: on Van der Pol,
    # HIRES and OREGO at rtol 1e-4/1e-6/1e-8 it rejected 2-25x fewer steps than the PID
    # controller, for 2-23% fewer evaluations of f on Van der Pol and OREGO (up to 3% more
    # on HIRES), and its worst output error was within 3x the tolerance in 11 of the 12
    # problem x tolerance cells against 10 of 12 (``benchmarks/stiff_controllers.py
    # --controller pid|gustafsson``, BENCHMARKS.md); PID coefficients in the options select
    # the PID controller
    default_controller = GustafssonController()


METHODS = {"rodas4": Rodas4, "rodas5p": Rodas5P}

__all__ = ["METHODS", "RODAS4", "RODAS5P", "Rodas4", "Rodas5P", "RosenbrockMethod",
           "RosenbrockStepper", "RosenbrockTableau"]
