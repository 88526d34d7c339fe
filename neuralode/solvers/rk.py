"""One generic explicit Runge–Kutta stepper, driven by a ``ButcherTableau``.

The stepper takes one step of the method; it knows nothing of step-size control, outputs,
events or statistics (the drivers own those). One stepper serves both drivers: one problem
(a flat (n,) state, a float step h) and a per-sample batch (a (B, n) state, a (B,) tensor of
steps, each row its own step); the formulas are the same, only the kernels that apply a
per-row h differ.

Two evaluation modes share the same tableau data:

* no autograd (inference, and every solve inside ``odeint_adjoint``): the stages live in one
  preallocated ``(s_ext, n)`` buffer and each stage costs one ``addmv`` plus one copy;
* autograd enabled (backpropagation through the solver): stages are combined with
  out-of-place ops only, so the graph holds the stage values and nothing is overwritten.

Dense output (``tableau.dense``) gives every method's interpolant as weights over the
extended stages ``k_1..k_s, f(t1, y1)``, so outputs between steps never shorten steps.
"""

from __future__ import annotations

import functools

import torch

from neuralode.solvers.elementwise import axpy, column
from neuralode.solvers.tableau import ButcherTableau
from neuralode.solvers.timekeeping import time_dtype


@functools.cache
def _python_coefficients(tab: ButcherTableau):
    """Stage times and the non-zero coefficients of a tableau (the stages, the solution's
    weights, the error estimate's) as Python floats, made once per tableau (tuples: shared
    by every stepper of the tableau)."""
    def nonzero(row):
        return tuple((j, float(x)) for j, x in enumerate(row) if x != 0.0)
    a_nz = tuple(nonzero(tab.a[i, :i]) for i in range(tab.stages))
    berr = () if tab.b_err is None else nonzero(tab.b_err)
    return tuple(float(x) for x in tab.c), a_nz, nonzero(tab.b), berr


def _tensor_coefficients(tab: ButcherTableau, dtype: torch.dtype, device: torch.device):
    """A tableau's coefficients as tensors of the state's dtype and device, made once per
    (tableau, dtype, device, time dtype). Read-only: nothing writes into them."""
    return _coefficients(tab, dtype, device, time_dtype(device))


@functools.lru_cache(maxsize=64)
def _coefficients(tab: ButcherTableau, dtype: torch.dtype, device: torch.device,
                  tdtype: torch.dtype):
    s = tab.stages
    a_rows = [torch.tensor(tab.a[i, :i], dtype=dtype, device=device) for i in range(s)]
    b = torch.tensor(tab.b, dtype=dtype, device=device)
    b_err = None if tab.b_err is None else torch.tensor(tab.b_err, dtype=dtype, device=device)
    # the interpolant's weights are polynomials in theta with large coefficients of both
    # signs (dopri8): they are formed in float64 and cast, or float32 loses ~1e-5 to them;
    # on a device without float64 (timekeeping.time_dtype) in float32
    dense_t = torch.tensor(tab.dense.T, dtype=tdtype, device=device)  # (deg, s_ext)
    return a_rows, b, b_err, dense_t


def dense_weights(dense_t: torch.Tensor, thetas, degree: int, dtype, fused: bool = False
                  ) -> torch.Tensor:
    """Weights of the extended stages at the step fractions ``thetas``, computed in
    ``dense_t``'s dtype (float64, or float32 on a device without it) and returned in
    ``dtype``: (m, s_ext) for a list of m fractions, (..., m, s_ext) for a tensor (..., m)
    of them (per sample). ``fused``: the product with ``dense_t`` as a sum of products,
    which a compiler fuses with its neighbours (a matrix product is a kernel of its own)."""
    wdt = dense_t.dtype
    if isinstance(thetas, list):
        powers = torch.tensor([[th ** (k + 1) for k in range(degree)] for th in thetas],
                              dtype=wdt, device=dense_t.device)
    else:
        powers = thetas.to(wdt)[..., None] ** torch.arange(1, degree + 1,
                                                           device=thetas.device, dtype=wdt)
    w = (powers[..., None] * dense_t).sum(-2) if fused else powers @ dense_t
    return w if dtype == wdt else w.to(dtype)


def dense_combine(y: torch.Tensor, h, w: torch.Tensor, K: torch.Tensor, fused: bool = False
                  ) -> torch.Tensor:
    """The interpolant y + h sum_s w_s K_s. One problem: y (n,), h a float, w (m, s_ext),
    K (s_ext, n) -> (m, n). Per sample: y (B, n), h (B,), w (B, m, s_ext), K (B, s_ext, n)
    -> (B, m, n) (``fused``: as in ``dense_weights``)."""
    if isinstance(h, float):
        if y.dtype == torch.float64:
            return torch.addmm(y.unsqueeze(0), w, K, alpha=h)
        # below float64 the product is formed first and added once (one rounding)
        return axpy(y.unsqueeze(0), torch.mm(w, K), h)
    comb = (w[..., None] * K[:, None]).sum(-2) if fused else torch.bmm(w, K)
    return torch.addcmul(y.unsqueeze(-2), column(h, comb), comb)


def add_terms(y, terms, h, precise: bool):
    """y + h * sum_j c_j k_j for ``terms`` = [(k_j, c_j), ...], out of place (autograd keeps
    the stages). ``precise``: the terms are summed first and added to y once (one rounding
    at |y|'s magnitude); otherwise they are added into y one by one (below float64 that
    drifts: use it for values that only feed f). ``h``: a float, or (B,) per row."""
    if not terms:
        return y
    if not isinstance(h, float):
        return torch.addcmul(y, column(h, y), combine(terms))
    if precise:
        # sum_j (c_j / c_p) k_j with p the largest |c_p| (the pivot's term unscaled: one
        # kernel fewer than scaling every term), then y + (h c_p) * that sum
        p = max(range(len(terms)), key=lambda m: abs(terms[m][1]))
        s, cp = terms[p]
        for j, (k, c) in enumerate(terms):
            if j != p:
                s = axpy(s, k, c / cp)
        return axpy(y, s, h * cp)
    out = y
    for k, c in terms:
        out = axpy(out, k, h * c)
    return out


def combine(terms) -> torch.Tensor:
    """sum_j c_j k_j for ``terms`` = [(k_j, c_j), ...] (not empty; elementwise, so that it
    fuses when compiled)."""
    (k0, c0), rest = terms[0], terms[1:]
    out = k0 * c0
    for k, c in rest:
        out = axpy(out, k, c)
    return out


def _mv_then_add(y, mat, vec, alpha):
    """y + alpha * (mat @ vec), rounding y's sum once."""
    return axpy(y, torch.mv(mat, vec), alpha)


def graph_step(st: RKStepper, y, f0, t, h, call):
    """One step of ``st``'s method out of place (autograd keeps the stages): (y1, [k_1..k_s]).
    ``call(t_i, y_i)`` evaluates f; t and h are floats (the eager step) or 0-d tensors (the
    compiled replay of a checkpointed solve, ``gradients.compiled_replay``)."""
    ks = [f0]
    c = st.c
    low = y.dtype != torch.float64
    yi = y
    for i in range(1, st.s):
        # the stage that is y1 (FSAL) is summed precisely; the others only feed f
        yi = add_terms(y, [(ks[j], a) for j, a in st.a_nz[i]], h,
                       low and st.fsal and i == st.s - 1)
        ks.append(call(t + c[i] * h, yi))
    if st.fsal:
        return yi, ks
    return add_terms(y, [(ks[j], b) for j, b in st.b_nz], h, low), ks


class RKSegment:
    """The interpolant of one accepted RK step, kept for a dense solution."""

    __slots__ = ("K", "degree", "dense_t", "h", "y")

    def __init__(self, y, h, K, dense_t, degree):
        self.y, self.h, self.K, self.dense_t, self.degree = y, h, K, dense_t, degree

    def evaluate(self, thetas) -> torch.Tensor:
        w = dense_weights(self.dense_t, thetas, self.degree, self.K.dtype)
        return dense_combine(self.y, self.h, w, self.K)


def chord(y0, y1, thetas):
    """Linear interpolation between the ends of a step (torchdiffeq's ``interp='linear'``):
    a list of fractions -> a list of states; per sample (y0, y1 (B, n), thetas (B, m)
    float64) -> (B, m, n)."""
    if isinstance(thetas, torch.Tensor):
        return torch.addcmul(y0.unsqueeze(1), thetas.to(y0.dtype)[..., None],
                             (y1 - y0).unsqueeze(1))
    d = y1 - y0
    return [y0 if th == 0 else (y1 if th == 1 else axpy(y0, d, th)) for th in thetas]


class ChordSegment:
    __slots__ = ("y0", "y1")

    def __init__(self, y0, y1):
        self.y0, self.y1 = y0, y1

    def evaluate(self, thetas) -> torch.Tensor:
        return torch.stack(chord(self.y0, self.y1, thetas))


class RKStepper:
    """One step of an explicit RK method.

    Per solve: ``start(rhs, y0, f0, graph)``; then for each attempt ``step(t, y, h)`` ->
    ``y1``; ``error()`` -> the embedded error estimate of the last attempt; after an
    accepted step ``interpolate``/``end_derivative``/``segment`` use that step's stages,
    and ``advance(f)`` makes ``f`` (or f(t1, y1)) the first stage of the next step.

    One problem: y (n,), t and h floats. Per sample: y (B, n), t and h (B,) float64
    tensors; ``prepare_interp`` after every attempt gives every row its f(t1, y1), and
    ``advance(accept=mask)`` moves on the accepted rows only.
    """

    def __init__(self, tab: ButcherTableau, linear: bool = False):
        self.tab = tab
        self.linear = linear  # interp='linear': outputs between steps on the chord
        self.s = tab.stages
        self.s_ext = tab.dense.shape[0]
        self.degree = tab.dense.shape[1]
        self.fsal = tab.fsal
        self.order = tab.order
        self.error_order = tab.error_order
        self.c, self.a_nz, self.b_nz, self.berr_nz = _python_coefficients(tab)
        # the compiled driver's form of the per-sample step: sums of scaled stages (they
        # fuse under the compiler), where the eager step uses matrix-vector products
        self.fused = False

    # -- per solve --------------------------------------------------------------------
    def start(self, rhs, y0: torch.Tensor, f0: torch.Tensor, graph: bool) -> None:
        self.rhs = rhs
        self.graph = graph
        self.batch = y0.dim() == 2
        self.a_rows, self.b, self.b_err, self.dense_t = _tensor_coefficients(
            self.tab, y0.dtype, y0.device)
        self.f1_known = False
        if graph:
            self.f0 = f0
            self.ks = None
            return
        self._buffer(torch.empty(self.s_ext, *y0.shape, dtype=y0.dtype, device=y0.device))
        self.k0.copy_(f0)

    def _buffer(self, K: torch.Tensor) -> None:
        """The stage buffer (s_ext, *state shape) and the views the step works on."""
        self.K = K
        K2 = K.view(self.s_ext, -1)  # per sample: (s_ext, B n), stage sums as one mv
        # y1 = y + h * K^T b: one fused addmv in float64; below float64 the product is formed
        # first and added once, because the fused kernel adds each stage's term into y
        # separately (s roundings at |y|'s magnitude per step: a visible drift in float32).
        # Intermediate stage states only feed f, so they keep the fused kernel, except where
        # the embedded error estimate is of order 7 or more (dopri8) in float64: it is then
        # ~1e-12 of the stages, and the last bits in which the fused kernel differs from the
        # per-row step's product-then-add (``_step_rows``) move it by ~1e-4, and a sample's
        # steps in a per-sample batch by ~1e-5 from its solo solve's; there every stage is
        # formed as the per-row step forms it (one kernel more per stage), and the two
        # drivers agree. (Not in float32: there the product-then-add made dopri8's error on
        # the damped oscillator of ``test_float32_accuracy`` 5.1e-6 against 1.8e-6.)
        # (one nonzero weight, as Euler's or the midpoint rule's, is one rounding anyway)
        as_rows = (self.error_order or 0) >= 7 and K.dtype == torch.float64
        precise = as_rows or (K.dtype != torch.float64 and len(self.b_nz) > 1)
        self.addmv = _mv_then_add if precise else torch.addmv
        stage_sum = _mv_then_add if as_rows else torch.addmv
        # transposed views K[:i]^T, made once; addmv(y, K[:i]^T, a_i) = y + K[:i]^T a_i
        self.KT = [K2[:i].t() for i in range(self.s + 1)]
        # per stage: how its state is summed (FSAL: the last stage's state is y1), the
        # views, c_i, and where its derivative goes
        self.stage_plan = [(self.addmv if self.fsal and i == self.s - 1 else stage_sum,
                            self.KT[i], self.a_rows[i], self.c[i], K[i])
                           for i in range(1, self.s)]
        self.f1 = K[self.s - 1] if self.fsal else None  # FSAL: f(t1, y1) is the last stage
        self.k0 = K[0]  # the first stage, written by ``advance``
        self.ext_filled = self.fsal

    def take(self, idx) -> None:
        """Keep the rows ``idx`` (a per-sample batch shrinks)."""
        if self.graph:
            self.f0 = self.f0[idx]
            self.ks = [k[idx] for k in self.ks] if self.ks is not None else None
        else:
            self._buffer(self.K[:, idx].contiguous())

    # -- one attempt ------------------------------------------------------------------
    def step(self, t, y: torch.Tensor, h, left_end=None) -> torch.Tensor:
        """y1 after one step of size h from (t, y). ``left_end`` (a callable time -> time
        tensor) is given when the step ends at a discontinuity: stage times are then handed
        to f strictly before t + h, in the state's time dtype."""
        self.f1_known = self.fsal
        if self.graph:
            self.y1 = y1 = self._step_graph(t, y, h, left_end)
            return y1
        if self.batch:
            return self._step_rows(t, y, h)
        yi = y
        if left_end is None:
            call = self.rhs.call
            for add, kt, a, c, k in self.stage_plan:
                yi = add(y, kt, a, alpha=h)
                k.copy_(call(t + c * h, yi))
        else:
            call_at = self.rhs.call_at
            for add, kt, a, c, k in self.stage_plan:
                yi = add(y, kt, a, alpha=h)
                k.copy_(call_at(left_end(t + c * h), yi))
        if not self.fsal:
            yi = self.addmv(y, self.KT[self.s], self.b, alpha=h)
        self.y1 = yi  # FSAL: the last stage is evaluated at y1 itself
        return yi

    def _step_rows(self, t, y, h) -> torch.Tensor:
        """``step`` per sample: the same stage sums, each row scaled by its own h."""
        hc = column(h, y)
        call, shape = self.rhs.call, y.shape
        yi = y
        for _, kt, a, c, k in self.stage_plan:
            yi = torch.addcmul(y, hc, torch.mv(kt, a).view(shape))
            k.copy_(call(t + c * h, yi))
        if not self.fsal:
            yi = torch.addcmul(y, hc, torch.mv(self.KT[self.s], self.b).view(shape))
        self.y1 = yi
        return yi

    def _step_graph(self, t, y, h, left_end):
        rhs = self.rhs
        call = rhs.call if left_end is None else (lambda ti, yi: rhs.call_at(left_end(ti), yi))
        y1, self.ks = graph_step(self, y, self.f0, t, h, call)
        return y1

    def error(self) -> torch.Tensor:
        """sum_i b_err_i k_i of the last attempt (no graph); the local error estimate is h
        times this (the controller applies the factor h to the norm)."""
        if self.graph:
            with torch.no_grad():
                if self.fused:
                    return combine([(self.ks[j], c) for j, c in self.berr_nz])
                return torch.tensordot(self.b_err, torch.stack(self.ks[: self.s]), dims=1)
        err = torch.mv(self.KT[self.s], self.b_err)
        return err.view(self.K.shape[1:]) if self.batch else err

    # -- after an accepted step ---------------------------------------------------------
    def end_derivative(self, t1_time, y1: torch.Tensor) -> torch.Tensor:
        """f(t1, y1): the FSAL stage, or one evaluation. ``t1_time`` is a float, a time
        tensor (a left limit at a discontinuity), or per sample the (B,) float64 times."""
        if self.f1_known:
            return self.ks[self.s_ext - 1] if self.graph else self.f1
        f1 = self.rhs.at(t1_time, y1)
        self.f1_known = True
        if self.graph:
            self.ks = self.ks + [f1]
        else:
            self.f1 = f1
            self.ext_filled = False
        return f1

    def prepare_interp(self, t1_time, y1) -> None:
        """Make the accepted step's interpolant available (may evaluate f(t1, y1))."""
        if self.linear and not self.batch:
            return
        self.end_derivative(t1_time, y1)
        if not self.graph and not self.ext_filled:
            self.K[self.s_ext - 1].copy_(self.f1)  # the extended stage
            self.ext_filled = True

    def stages(self) -> torch.Tensor:
        """The last attempt's extended stages (s_ext, ...) (the buffer itself, no graph)."""
        return torch.stack(self.ks[: self.s_ext]) if self.graph else self.K

    def interpolate(self, y: torch.Tensor, h, thetas, row: int | None = None):
        """States at t + theta h on the accepted step (after ``prepare_interp``). One
        problem: ``thetas`` a list of floats -> a list of (n,) states. Per sample: ``y``
        (B, n), ``h`` (B,), ``thetas`` (B, m) float64 -> (B, m, n); or one sample's step as
        one problem's: ``row`` b, ``y`` (n,), ``h`` a float, ``thetas`` a list."""
        if not isinstance(thetas, list):
            if self.linear:
                return chord(y, self.y1, thetas)
            w = dense_weights(self.dense_t, thetas, self.degree, y.dtype, self.fused)
            return dense_combine(y, h, w, self.stages().transpose(0, 1), self.fused)
        if self.linear:
            return chord(y, self.y1 if row is None else self.y1[row], thetas)
        w = dense_weights(self.dense_t, thetas, self.degree, y.dtype)
        K = (torch.stack(self.ks[: self.s_ext]) if self.graph else self.K) if row is None \
            else self.stages()[:, row]
        if len(thetas) == 1:
            return [torch.addmv(y, K.t(), w[0], alpha=h) if y.dtype == torch.float64
                    else _mv_then_add(y, K.t(), w[0], alpha=h)]
        if y.dtype == torch.float64:  # dense_combine's one-problem kernel, inline (hot path)
            return list(torch.addmm(y.unsqueeze(0), w, K, alpha=h).unbind(0))
        return list(dense_combine(y, h, w, K).unbind(0))

    # -- per sample: the recorded steps of a dense solution (``batched.BatchedDense``) --
    def record_stages(self) -> torch.Tensor:
        """The last attempt's extended stages (s_ext, B, n), a copy."""
        stages = self.stages()
        return stages if self.graph else stages.clone()

    def dense_rows(self, y, y1, h, stages, theta) -> torch.Tensor:
        """Rows of recorded steps at the fractions ``theta`` (R,): y, y1 (R, n), h (R,),
        stages (R, s_ext, n) from ``record_stages`` -> (R, n)."""
        if self.linear:
            return chord(y, y1, theta[:, None])[:, 0]
        w = dense_weights(self.dense_t, theta[:, None], self.degree, y.dtype)
        return dense_combine(y, h, w, stages)[:, 0]

    def segment(self, y: torch.Tensor, h: float):
        if self.linear:
            return ChordSegment(y, self.y1)
        K = torch.stack(self.ks[: self.s_ext]) if self.graph else self.K.clone()
        return RKSegment(y, h, K, self.dense_t, self.degree)

    def restart(self) -> None:
        """Forget carried history (nothing for a one-step method)."""

    def advance(self, f_next: torch.Tensor | None = None, accept=None) -> None:
        """Make ``f_next`` (default: f(t1, y1) of the accepted step, see
        ``end_derivative``) the next first stage; per sample only in the rows ``accept``."""
        if self.graph:
            new = f_next if f_next is not None else self.ks[self.s_ext - 1]
            self.f0 = new if accept is None else torch.where(accept[:, None], new, self.f0)
            return
        new = f_next if f_next is not None else self.f1
        k0 = self.k0
        k0.copy_(new if accept is None else torch.where(accept[:, None], new, k0))

    # -- checkpointing (neuralode.checkpoint) ---------------------------------------------
    def carry(self) -> tuple[list[torch.Tensor], object]:
        """What the next step needs besides its start state, after ``advance``: (tensors,
        plain data). Here the first stage f(t, y) (a copy when it lives in the buffer)."""
        return ([self.f0] if self.graph else [self.k0.clone()]), None

    def resume(self, rhs, y: torch.Tensor, carry: tuple[list[torch.Tensor], object],
               graph: bool) -> None:
        """``start`` from a state and what ``carry`` returned there (the step from it is
        the same function of (t, y, h, carry) as in the solve that recorded it)."""
        self.start(rhs, y, carry[0][0], graph)
