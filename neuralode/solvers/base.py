"""Pieces shared by every solver: statistics, the flat-state layout and the right-hand side.

Solvers work on a flat 1-D state tensor ``y`` of ``n`` elements and Python-float (float64)
times. The front door (``neuralode.odeint``) flattens tensors and tuples of tensors into
this form and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from neuralode.errors import ODEFuncError
from neuralode.solvers.status import FINISHED_WELL


@dataclass
class SolverStats:
    """Statistics of one solve.

    nfe: evaluations of the user's function; n_accepted / n_rejected: step attempts
    (fixed-grid methods only accept); status: "success" once the final time is reached,
    "event" when an event ended the solve, or (with ``throw=False``) "max_steps_reached",
    "step_size_underflow", "nonfinite", "convergence_failure", "stiff" (an explicit
    method found the problem stiff, see ``solvers.stiffness``); message: what happened, for a
    failure. Implicit methods also count ``n_jac`` (Jacobian evaluations), ``n_lu`` (matrix
    factorisations), ``n_newton`` (Newton iterations) and ``n_newton_fail`` (Newton solves
    that did not converge; each rejects the step in an adaptive solve).
    """

    method: str = ""
    nfe: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    status: str = "running"
    message: str = ""
    t_final: float = math.nan
    h_next: float = math.nan  # adaptive methods: the step the controller proposed last
    n_jac: int = 0
    n_lu: int = 0
    n_newton: int = 0
    n_newton_fail: int = 0
    compile_s: float = 0.0
    n_compiles: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return self.n_accepted + self.n_rejected

    def __str__(self) -> str:
        implicit = (f" jac={self.n_jac} lu={self.n_lu} newton={self.n_newton} "
                    f"newton_fail={self.n_newton_fail}" if self.n_jac or self.n_lu
                    or self.n_newton else "")
        return (f"{self.method}: nfe={self.nfe} accepted={self.n_accepted} "
                f"rejected={self.n_rejected}{implicit} status={self.status}")


@dataclass
class PerSampleStats:
    """Statistics of a per-sample solve.

    nfe: calls of the user's function (each call evaluates the whole running batch; a
    sample-by-sample solve counts each sample's calls); n_accepted, n_rejected: (B,) int64
    tensors, each sample's own step attempts; status: one status name per sample
    ("success", "event", or with ``throw=False`` "max_steps_reached",
    "step_size_underflow", "nonfinite", "convergence_failure"); message: one per sample (""
    on success); t_final: (B,) float64 tensor, where each sample stopped; batch_rows: the
    sum over calls of the rows evaluated (with ``shrink`` below B * nfe); driver:
    "batched" (the tensor clock, one call of func per stage for the batch) or
    "sample_by_sample" (the float clock, each sample alone); n_jac, n_lu, n_newton
    (batched Rosenbrock and ESDIRK methods): batched Jacobian evaluations, factorisations
    and Newton iterations (each covers every row), n_newton_fail: rows whose Newton solve
    failed.
    """

    method: str = ""
    nfe: int = 0
    n_accepted: torch.Tensor | None = None
    n_rejected: torch.Tensor | None = None
    status: list[str] = field(default_factory=list)
    message: list[str] = field(default_factory=list)
    t_final: torch.Tensor | None = None
    batch_rows: int = 0
    driver: str = "batched"
    compile_s: float = 0.0
    n_compiles: int = 0
    n_jac: int = 0
    n_lu: int = 0
    n_newton: int = 0
    n_newton_fail: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> torch.Tensor:
        return self.n_accepted + self.n_rejected

    @property
    def success(self) -> bool:
        return all(s in FINISHED_WELL for s in self.status)

    def __str__(self) -> str:
        bad = sum(s not in FINISHED_WELL for s in self.status)
        acc = self.n_accepted
        return (f"{self.method}: nfe={self.nfe} ({self.driver}), accepted per sample "
                f"min/max={int(acc.min())}/{int(acc.max())}, failed samples={bad}")


class StepFailure(Exception):
    """Raised by a stepper's ``step`` when the attempt cannot produce a state (an implicit
    method's Newton iterations failed). An adaptive solve rejects the attempt and retries
    with the step multiplied by ``factor``; a fixed-grid solve ends with a
    ``ConvergenceError`` (status "convergence_failure") whose message includes ``reason``."""

    def __init__(self, reason: str, factor: float = 0.25):
        super().__init__(reason)
        self.reason = reason
        self.factor = factor


def _complex_view(x: torch.Tensor) -> torch.Tensor:
    """A real (..., 2) tensor as complex (...) without a copy where its strides allow."""
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(
            st % 2 for sz, st in zip(x.shape[:-1], x.stride()[:-1]) if sz > 1):
        x = x.clone(memory_format=torch.contiguous_format)
    return torch.view_as_complex(x)


class StateLayout:
    """How a user state (tensor or tuple of tensors, any shape including 0-dim) maps to the
    flat solver state: (n,) for one problem, (B, n) for a per-sample batch (the user's
    tensors then have a leading batch dimension).

    A complex state (``complex_dtype`` complex64/complex128; every tensor of a tuple has it)
    is solved as the real state of its real and imaginary parts (``torch.view_as_real``,
    interleaved): n counts real numbers, the flat state is real, and ``unflatten`` gives the
    user's complex tensors back (views where the memory allows)."""

    def __init__(self, shapes: list[torch.Size], is_tuple: bool,
                 complex_dtype: torch.dtype | None = None):
        self.shapes = [torch.Size(s) for s in shapes]
        self.is_tuple = is_tuple
        self.complex_dtype = complex_dtype
        per = 1 if complex_dtype is None else 2  # real numbers per element
        self.numels = [per * math.prod(s) for s in self.shapes]
        self.n = sum(self.numels)
        offsets = [0]
        for k in self.numels:
            offsets.append(offsets[-1] + k)
        self.offsets = offsets

    def unflatten(self, y: torch.Tensor):
        """(..., n) flat -> the user's structure with leading dims preserved."""
        lead = tuple(y.shape[:-1])
        if self.complex_dtype is not None:
            if not self.is_tuple:
                return _complex_view(y.reshape(lead + tuple(self.shapes[0]) + (2,)))
            return tuple(
                _complex_view(y[..., a:b].reshape(lead + tuple(s) + (2,)))
                for a, b, s in zip(self.offsets[:-1], self.offsets[1:], self.shapes))
        if not self.is_tuple:
            return y.reshape(lead + tuple(self.shapes[0]))
        return tuple(
            y[..., a:b].reshape(lead + tuple(s))
            for a, b, s in zip(self.offsets[:-1], self.offsets[1:], self.shapes)
        )

    def flatten(self, value, batch: int | None = None) -> torch.Tensor:
        """The user's structure -> (n,) flat, or (B, n) keeping a leading batch of B."""
        lead = (-1,) if batch is None else (batch, -1)
        if self.complex_dtype is not None:
            if not self.is_tuple:
                return torch.view_as_real(value.resolve_conj()).reshape(lead)
            return torch.cat([torch.view_as_real(v.resolve_conj()).reshape(lead)
                              for v in value], dim=-1)
        if not self.is_tuple:
            return value.reshape(lead)
        return torch.cat([v.reshape(lead) for v in value], dim=-1)

    def per_real(self, flat: torch.Tensor) -> torch.Tensor:
        """Values per user element, flat (..., n / 2) for a complex state, as values per
        real number (..., n): each for the real and the imaginary part."""
        return flat if self.complex_dtype is None else flat.repeat_interleave(2, dim=-1)


class RHS:
    """The user's ``func(t, y)`` seen on the flat state, with evaluation counting.

    One problem: ``t`` is handed to ``func`` as a 0-d tensor of the state's dtype on its
    device (as torchdiffeq does; float32 for float16/bfloat16 states). Per sample
    (``batch=True``): y is (B, ...) and ``t`` a (B,) tensor of each row's time, or with
    ``time_arg="none"`` a 0-d NaN (for functions that do not use t: one that does turns the
    state into NaN, which is reported, never silently wrong). Every call checks the
    result's shape and dtype (cheap attribute compares); the first one also its type and
    device.

    A float16/bfloat16 state is integrated in float32 (``compute_dtype``): ``func`` still
    receives and returns the user's dtype, the solver accumulates in float32.

    A complex layout: the flat state is real (``user_dtype`` and ``dtype`` are the real
    dtype, ``dtype`` may be given as either), ``func`` receives and must return the complex
    ``state_dtype``; t is real.
    """

    def __init__(self, func: Callable, layout: StateLayout, dtype: torch.dtype,
                 device: torch.device, stats, *, batch: bool = False,
                 time_arg: str = "batch"):
        self.func = func
        self.layout = layout
        if layout.complex_dtype is not None:
            self.state_dtype = layout.complex_dtype  # what func receives and returns
            dtype = layout.complex_dtype.to_real()
        else:
            self.state_dtype = dtype
        self.user_dtype = dtype
        self.dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.device = device
        self.stats = stats
        self.batch = batch
        self.time_arg = time_arg
        self.counting = True  # off inside a compiled step (the driver counts its calls)
        self._checked = False
        self.call_at, self.call = self._make_batch_call() if batch else self._make_call()

    def _make_batch_call(self):
        """f of a (B, n) batch at (B,) times."""
        func, layout = self.func, self.layout
        udt, cdt, sdt = self.user_dtype, self.dtype, self.state_dtype
        cast = udt != cdt
        check = self._check
        nan_t = torch.full((), math.nan, dtype=cdt, device=self.device) \
            if self.time_arg == "none" else None
        shape0 = None if layout.is_tuple else tuple(layout.shapes[0])

        def call_at(tt, y):
            B = y.shape[0]
            if self.counting:
                self.stats.nfe += 1
                self.stats.batch_rows += B
            out = func(tt, layout.unflatten(y.to(udt) if cast else y))
            if layout.is_tuple or not self._checked or out.dtype != sdt \
                    or tuple(out.shape[1:]) != shape0 or out.shape[0] != B:
                check(out, tt, B)
            flat = layout.flatten(out, B)
            return flat.to(cdt) if cast else flat

        def call(t, y):
            return call_at(t.to(cdt) if self.time_arg == "batch" else nan_t, y)
        return call_at, call

    def _make_call(self):
        """Closures specialised to the state layout (the solver's hot path): f at a time
        tensor (``call_at``) and at a float time (``call``)."""
        func, stats, layout = self.func, self.stats, self.layout
        udt, cdt, device = self.user_dtype, self.dtype, self.device
        cast = udt != cdt
        shapes = layout.shapes
        check = self._check
        scalar = torch.scalar_tensor  # a 0-d time tensor (faster than torch.full)
        if layout.complex_dtype is not None:  # complex func on the real flat state
            sdt = self.state_dtype

            def call_at(tt, y):
                stats.nfe += 1
                out = func(tt, layout.unflatten(y))
                if layout.is_tuple or not self._checked or out.shape != shapes[0] \
                        or out.dtype != sdt:
                    check(out, tt)
                return layout.flatten(out)

            def call(t, y):
                return call_at(scalar(t, dtype=cdt, device=device), y)
            return call_at, call
        if not layout.is_tuple and tuple(shapes[0]) == (layout.n,) and not cast:
            shape = shapes[0]

            def call_at(tt, y):
                stats.nfe += 1
                out = func(tt, y)
                if not self._checked or out.shape != shape or out.dtype != udt:
                    check(out, tt)
                return out

            def call(t, y):
                stats.nfe += 1
                tt = scalar(t, dtype=cdt, device=device)
                out = func(tt, y)
                if not self._checked or out.shape != shape or out.dtype != udt:
                    check(out, tt)
                return out
            return call_at, call
        if not layout.is_tuple and not cast:
            shape = shapes[0]

            def call_at(tt, y):
                stats.nfe += 1
                out = func(tt, y.view(shape))
                if not self._checked or out.shape != shape or out.dtype != udt:
                    check(out, tt)
                return out.reshape(-1)

            def call(t, y):
                stats.nfe += 1
                tt = scalar(t, dtype=cdt, device=device)
                out = func(tt, y.view(shape))
                if not self._checked or out.shape != shape or out.dtype != udt:
                    check(out, tt)
                return out.reshape(-1)
            return call_at, call
        if not layout.is_tuple:
            shape = shapes[0]

            def call_at(tt, y):
                stats.nfe += 1
                out = func(tt, y.to(udt).view(shape))
                if not self._checked or out.shape != shape or out.dtype != udt:
                    check(out, tt)
                return out.to(cdt).reshape(-1)
        else:
            def call_at(tt, y):
                stats.nfe += 1
                out = func(tt, layout.unflatten(y.to(udt) if cast else y))
                check(out, tt)
                flat = torch.cat([o.reshape(-1) for o in out])
                return flat.to(cdt) if cast else flat

        def call(t, y):
            return call_at(scalar(t, dtype=cdt, device=device), y)
        return call_at, call

    def at(self, t, y):
        """f at a float time (per sample: at (B,) times) or at a time tensor (a one-sided
        limit at a discontinuity, see ``left_limit``)."""
        return self.call(t, y) if self.batch or isinstance(t, float) else self.call_at(t, y)

    # -- times handed to func -----------------------------------------------------------
    def time(self, t: float) -> torch.Tensor:
        return torch.scalar_tensor(t, dtype=self.dtype, device=self.device)

    def toward(self, t: float, toward: float) -> torch.Tensor:
        """The time-tensor value (in the state's dtype) nearest to t strictly on the side of
        ``toward``: f evaluated there sees the one-sided limit at a discontinuity at t,
        also in float32 (a float64 nudge would be lost in the cast)."""
        tt = self.time(t)
        v = tt.item()
        if (toward > t and v <= t) or (toward < t and v >= t):
            tt = torch.nextafter(tt, self.time(toward))
        return tt

    def left_limit(self, t1: float, t: float) -> Callable[[float], torch.Tensor]:
        """For a step from t ending at a discontinuity at t1: times of the step as tensors,
        strictly on t's side of t1 in the state's dtype (stage times that round onto t1 in
        float32 are moved off it)."""
        edge = self.toward(t1, t)
        e = edge.item()
        fwd = t1 > t

        def at(ti: float) -> torch.Tensor:
            if (fwd and ti >= e) or (not fwd and ti <= e):
                return edge
            tt = self.time(ti)
            v = tt.item()
            return edge if (fwd and v > e) or (not fwd and v < e) else tt
        return at

    def user_state(self, y: torch.Tensor):
        """The flat state in the user's structure and dtype."""
        if y.dtype != self.user_dtype:
            y = y.to(self.user_dtype)
        return self.layout.unflatten(y)

    def callback_args(self, t: float, y: torch.Tensor, h: float):
        return (torch.tensor(t, dtype=torch.float64), self.user_state(y),
                torch.tensor(h, dtype=torch.float64))

    def _check(self, out, tt, batch: int | None = None) -> None:
        layout = self.layout

        def where(k=None) -> str:  # (the message's subject, made only for an error: the
            # time's float() would wait for the device at every call of a tuple state's f)
            what = "func(t, y)" if batch is not None else f"func(t, y) at t={float(tt):g}"
            return what + (f", element {k}," if k is not None else "")
        if layout.is_tuple:
            if not isinstance(out, (tuple, list)) or len(out) != len(layout.shapes):
                raise ODEFuncError(
                    f"{where()} must return a tuple of {len(layout.shapes)} tensors matching "
                    f"the tuple state y0, got {type(out).__name__}"
                    + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
            items = list(out)
        else:
            items = [out]
        lead = () if batch is None else (batch,)
        for k, (o, shape) in enumerate(zip(items, layout.shapes)):
            kk = k if layout.is_tuple else None
            if not isinstance(o, torch.Tensor):
                raise ODEFuncError(f"{where(kk)} must return a tensor, got {type(o).__name__}")
            if (o.shape != shape) if batch is None else (tuple(o.shape) != (batch, *shape)):
                raise ODEFuncError(
                    f"{where(kk)} returned shape {tuple(o.shape)}, but the state has shape "
                    f"{lead + tuple(shape)}; dy/dt must have the same shape as y"
                    + (" (it had it in earlier calls)" if self._checked else "")
                    + (" (per_sample=True: the first dimension is the batch)" if lead else ""))
            if o.dtype != self.state_dtype:
                raise ODEFuncError(
                    f"{where(kk)} returned dtype {o.dtype}, but the state has dtype "
                    f"{self.state_dtype}; dy/dt must have the same dtype as y0"
                    + (" (it had it in earlier calls)" if self._checked else ""))
            if o.device != self.device:
                raise ODEFuncError(
                    f"{where(kk)} returned a tensor on {o.device}, but the state is on "
                    f"{self.device}")
        if not torch.compiler.is_compiling():  # (a compiled loop's body mutates nothing)
            self._checked = True
