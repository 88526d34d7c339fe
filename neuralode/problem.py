"""A validated solve on the float clock: input checks where the input enters, the
``Problem`` (flat state, right-hand side, method, options, error norm, statistics), and
running it on the loop (``run``, ``solve_problem``, ``event_solve``).

The front door (``neuralode.odeint``), the adjoint and the per-sample front all build on
this module; it imports none of them. The checks are written once for one problem and for
a per-sample batch (``batch=True``: a leading batch dimension B, times (T,) or (B, T)).
"""

from __future__ import annotations

import cmath
import functools
import math
import operator
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neuralode.errors import EventError, ODEFuncError, ODEInputError, user_stacklevel
from neuralode.solution import DenseSolution, Solution
from neuralode.solvers.base import RHS, PerSampleStats, SolverStats, StateLayout
from neuralode.solvers.controllers import ErrorNorm
from neuralode.solvers.loop import Callbacks, LoopResult, Stop, integrate
from neuralode.solvers.methods import Method, controller_or_default, make_controller, times_inside
from neuralode.solvers.registry import ALIASES, DEFAULT_METHOD, SOLVERS
from neuralode.solvers.timekeeping import time_dtype

Tolerance = float | torch.Tensor | Sequence[float]
CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")
# event mode searches this many steps by default (seconds, not minutes: dopri5 takes about
# 0.2 ms per step on a small state); options['max_num_steps'] searches further
EVENT_MAX_STEPS = 20_000

def check_func(func) -> None:
    if not callable(func):
        raise ODEInputError(f"func must be a callable func(t, y) returning dy/dt, got "
                            f"{type(func).__name__}")


def all_finite(v: torch.Tensor) -> bool:
    """No nan or inf in ``v``. A finite sum settles it in one reduction (nan and inf reach
    the sum); only a sum that overflowed is checked element by element."""
    s = v.sum().item()
    if cmath.isfinite(s):
        return True
    return bool(torch.isfinite(v).all())


def check_y0(y0, batch: bool = False, finite: bool = True) -> tuple[list[torch.Tensor], bool]:
    """The tensors of ``y0`` (a tensor or a tuple of them) and whether it is a tuple.
    ``batch``: every tensor has a leading batch dimension, the same B >= 1 for all.
    ``finite`` False: the values are not read (a caller whose ``prepare`` checks them
    next: each check is a read from the device)."""
    is_tuple = isinstance(y0, (tuple, list))
    items = list(y0) if is_tuple else [y0]
    if is_tuple and not items:
        raise ODEInputError("y0 is an empty tuple; give a tensor or a non-empty tuple of tensors")
    for k, v in enumerate(items):
        name = f"y0[{k}]" if is_tuple else "y0"
        if not isinstance(v, torch.Tensor):
            raise ODEInputError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if v.dtype == torch.complex32:
            raise ODEInputError(f"{name} is {v.dtype}; complex states must be complex64 or "
                                f"complex128 (e.g. use y0.to(torch.complex64))")
        if not (v.is_floating_point() or v.is_complex()):
            raise ODEInputError(f"{name} must have a floating or complex dtype (float16/"
                                f"bfloat16/float32/float64/complex64/complex128), got "
                                f"{v.dtype}; e.g. use y0.float()")
        if v.is_meta:
            raise ODEInputError(f"{name} is on the meta device (a shape without values); "
                                f"give it real data on a CPU or GPU device")
        if batch and (v.dim() < 1 or v.shape[0] == 0):
            raise ODEInputError(f"per_sample=True: {name} must have a leading batch dimension "
                                f"(B, ...) with B >= 1, got shape {tuple(v.shape)}")
    if is_tuple:
        d0, dev0 = items[0].dtype, items[0].device
        for k, v in enumerate(items):
            if v.dtype != d0 or v.device != dev0 or (batch and v.shape[0] != items[0].shape[0]):
                def shape(x):
                    return f" with shape {tuple(x.shape)}" if batch else ""
                raise ODEInputError(
                    f"all tensors of a tuple y0 must share dtype and device"
                    f"{' and batch size (per_sample=True)' if batch else ''}: y0[0] is "
                    f"{d0} on {dev0}{shape(items[0])}, y0[{k}] is {v.dtype} on "
                    f"{v.device}{shape(v)}")
    if finite:
        check_finite(items, is_tuple)
    return items, is_tuple


def check_finite(items: list[torch.Tensor], is_tuple: bool) -> None:
    """The values of checked ``y0`` tensors are finite."""
    for k, v in enumerate(items):
        if v.numel() and not all_finite(v):
            raise ODEInputError(f"{f'y0[{k}]' if is_tuple else 'y0'} contains non-finite "
                                f"values (nan or inf)")


def state_layout(items: list[torch.Tensor], is_tuple: bool, batch: bool = False
                 ) -> StateLayout:
    """The flat layout of checked ``y0`` tensors (a complex state: its real and imaginary
    parts)."""
    dtype = items[0].dtype
    return StateLayout([v.shape[1:] if batch else v.shape for v in items], is_tuple,
                       dtype if dtype.is_complex else None)


def check_t(t, batch: int | None = None) -> torch.Tensor:
    """``t`` as a tensor of times: 1-D, or per sample (``batch`` = B) (T,) or (B, T)."""
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ODEInputError(f"t must be a 1-D tensor of times, got "
                                f"{type(t).__name__}") from None
    if t.is_complex() or t.dtype == torch.bool:
        raise ODEInputError(f"t must be real, got dtype {t.dtype}")
    if t.is_meta:
        raise ODEInputError("t is on the meta device (a shape without values); give it real "
                            "times on a CPU or GPU device")
    if batch is None and t.dim() != 1:
        raise ODEInputError(f"t must be a 1-D tensor of times, got shape {tuple(t.shape)}")
    if batch is not None and not (t.dim() == 1 or (t.dim() == 2 and t.shape[0] == batch)):
        raise ODEInputError(f"per_sample=True: t must have shape (T,) (shared) or (B, T) = "
                            f"({batch}, T) (one row per sample), got {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ODEInputError("t is empty; give at least one time (t[0] is the time of y0)")
    return t


def check_time_rows(rows: list[list[float]]) -> None:
    """Each row of times (float64 values) finite and strictly monotonic."""
    for r, ts in enumerate(rows):
        if all(map(math.isfinite, ts)) and (len(ts) < 2 or all(
                map(operator.lt if ts[1] > ts[0] else operator.gt, ts, ts[1:]))):
            continue  # (the common case, at C speed; the loop below says what is wrong)
        bad = [x for x in ts if not math.isfinite(x)]
        if bad:
            raise ODEInputError(f"t contains non-finite values: {bad[:5]}")
        direction = 1.0 if len(ts) < 2 or ts[1] > ts[0] else -1.0
        for k in range(1, len(ts)):
            if direction * (ts[k] - ts[k - 1]) <= 0:
                row = f" (in row {r} of the per-sample times)" if len(rows) > 1 else ""
                raise ODEInputError(
                    f"t must be strictly increasing or strictly decreasing{row}; t[{k - 1}]="
                    f"{ts[k - 1]!r} and t[{k}]={ts[k]!r} break the order set by t[0], t[1]")


def times_of(t: torch.Tensor) -> list[float]:
    """The checked times of a 1-D ``t`` as float64 Python floats (read on the host: no
    float64 tensor is made, so ``t`` may live on a device without float64)."""
    ts = t.detach().tolist()
    if not t.is_floating_point():
        ts = [float(v) for v in ts]
    check_time_rows([ts])
    return ts


def batch_times(t: torch.Tensor, B: int, device) -> torch.Tensor:
    """(B, T) checked times on ``device`` from per-sample t of shape (T,) or (B, T): float64,
    or float32 on a device without float64 (``timekeeping.time_dtype``)."""
    def best(dev) -> torch.dtype:
        tdt = time_dtype(dev)
        return torch.promote_types(t.dtype, tdt) if t.is_floating_point() else tdt

    if t.dim() == 1:  # (exactly the times: float64 holds any float type's)
        row = times_of(t)
        if B * len(row) > SHARED_TIMES:
            return _times_tensor(row, B, best(device), device)
        # (their bits key the tensor, so that -0.0 is not 0.0)
        return _shared_times(struct.pack(f"{len(row)}d", *row), B, best(device), device)
    tt = t.detach().to(best(t.device))  # checked where t is (no extra transfer)
    check_time_rows(tt.tolist())
    return tt.to(device=device, dtype=best(device)).contiguous()


SHARED_TIMES = 4096  # batches' times up to this many numbers are kept (``_shared_times``)


def _times_tensor(row, B: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The (B, T) times of a batch that shares the times ``row``."""
    return torch.tensor(row, dtype=dtype, device=device).expand(B, -1).contiguous()


@functools.lru_cache(maxsize=64)
def _shared_times(row: bytes, B: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``_times_tensor`` of the times ``row`` (float64s packed), kept: one tensor per times,
    batch size, dtype and device serves every solve (the drivers only read it; a normal
    tensor, also when the first solve runs under ``torch.inference_mode``)."""
    with torch.inference_mode(False):
        return _times_tensor(struct.unpack(f"{len(row) // 8}d", row), B, dtype, device)


def tolerance_value(name: str, tol, layout: StateLayout, dtype, device):
    """A float, or a flat (n,) tensor for per-element tolerances: a tensor broadcastable to
    the state (or, for a tuple state, one value or tensor per element)."""
    if isinstance(tol, (int, float)) and not isinstance(tol, bool):  # the common case, fast
        v = float(tol)
        if not (v >= 0 and math.isfinite(v)):
            raise ODEInputError(f"{name} must be a non-negative finite number, got {tol!r}")
        return v

    def tensor_of(v, shape, where):
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                raise ODEInputError(f"{where} must not require grad")
            v = v.detach()
        try:
            v = torch.as_tensor(v, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ODEInputError(f"{where} must be a non-negative finite number, got {v!r} "
                                f"(tolerances are numbers or tensors of them)") from None
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            shown = v.item() if v.numel() == 1 else v
            raise ODEInputError(f"{where} must be a non-negative finite number, got {shown!r} "
                                f"(tolerances are numbers or tensors of them)")
        try:
            return torch.broadcast_to(v.cpu(), shape).reshape(-1)
        except RuntimeError:
            raise ODEInputError(f"{where} of shape {tuple(v.shape)} does not broadcast to the "
                                f"state's shape {tuple(shape)}") from None

    if isinstance(tol, (tuple, list)) and layout.is_tuple:
        if len(tol) != len(layout.shapes):
            raise ODEInputError(f"{name} given as a sequence of {len(tol)} values; a tuple state "
                                f"needs one per element ({len(layout.shapes)} here)")
        flat = torch.cat([tensor_of(v, s, f"{name}[{k}]")
                          for k, (v, s) in enumerate(zip(tol, layout.shapes))])
    elif layout.is_tuple:
        v = tensor_of(tol, (), name)
        if v.numel() != 1:
            raise ODEInputError(f"{name} for a tuple state must be a number or a sequence with "
                                f"one value (or tensor) per element")
        flat = v.expand(layout.n // (2 if layout.complex_dtype is not None else 1))
    else:
        flat = tensor_of(tol, layout.shapes[0], name)
    flat = layout.per_real(flat)  # a complex state: one value for both parts
    if flat.numel() == 0:
        return 0.0
    first = flat[0].item()
    if bool((flat == first).all()):
        return first
    return flat.to(dtype=dtype, device=device)


def resolve_method(method, options) -> tuple[str, dict]:
    if options is not None and not isinstance(options, dict):
        raise ODEInputError(f"options must be a dict, got {type(options).__name__}")
    if method is None:  # as torchdiffeq: options without a method are the default's
        method = DEFAULT_METHOD
    if not isinstance(method, str):
        raise ODEInputError(f"method must be a string, got {type(method).__name__}")
    name = ALIASES.get(method, method)
    if name not in SOLVERS:
        raise ODEInputError(f"unknown method {method!r}; valid methods are: "
                            f"{sorted(SOLVERS) + sorted(ALIASES)}")
    return name, dict(options or {})


# (method, the given options) -> the checked options, for options of plain values that
# passed without a warning (a training loop checks the same options at every solve)
_CHECKED: dict = {}
PLAIN_VALUES = (type(None), bool, int, float, str)


def plain_key(given: dict) -> tuple | None:
    """A hashable form of options whose values are all plain (``PLAIN_VALUES``), else None.
    (The type too: 1, 1.0 and True are equal keys, and a check may take one only; a float
    by its repr: -0.0 is not 0.0.)"""
    key = []
    for k, v in given.items():
        if type(v) not in PLAIN_VALUES:
            return None
        key.append((k, type(v), repr(v) if type(v) is float else v))
    return tuple(key)


def method_options(name: str, given: dict) -> dict:
    """The method's options with defaults filled in and values checked. Options the method
    does not use are ignored with a warning that names them and the valid ones (as
    torchdiffeq does), at the user's line. Options of plain values (None, bool, int, float,
    str) that passed without a warning are checked once: the result is kept (a copy is
    returned)."""
    return checked_options(name, given)[0]


def checked_options(name: str, given: dict) -> tuple[dict, tuple | None]:
    """``method_options``, and a key that fixes them (a hashable form of the method and
    the given options; None where an option is not a plain value, or where they warned)."""
    plain = plain_key(given)
    if plain is None:  # (checked at every solve, warnings as they come)
        return _check_options(name, given), None
    key = (name, plain)
    hit = _CHECKED.get(key)
    if hit is not None:
        return dict(hit), key
    # (the warnings recorded, to know whether the result may be kept; ``catch_warnings``
    # swaps the process's warning state, so only until the options are kept, and not on the
    # path above)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opts = _check_options(name, given)
    for w in caught:  # (emitted at the user's line, and the result not kept)
        warnings.warn(w.message, stacklevel=user_stacklevel())
    if caught:
        return opts, None
    if len(_CHECKED) < 256:
        _CHECKED[key] = dict(opts)
    return opts, key


def _check_options(name: str, given: dict) -> dict:
    cls = SOLVERS[name]
    unknown = sorted(set(given) - set(cls.OPTIONS))
    if unknown:
        warnings.warn(f"method {name!r} does not use the option(s) {unknown}; they are ignored. "
                      f"Its options are: {sorted(cls.OPTIONS)}", stacklevel=user_stacklevel())
    opts = dict(cls.OPTIONS)
    opts.update({k: v for k, v in given.items() if k in cls.OPTIONS})
    mns = opts["max_num_steps"]
    if not isinstance(mns, int) or isinstance(mns, bool) or mns < 1:
        raise ODEInputError(f"option 'max_num_steps' of {name!r} must be a positive int, got "
                            f"{mns!r}")
    k = opts["event_interior_points"]
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 100:
        raise ODEInputError(f"option 'event_interior_points' of {name!r} must be an int in "
                            f"0..100 (points per step where the interpolant is also checked "
                            f"for an event), got {k!r}")
    cls.check(opts)
    return opts


def _eps(dtype) -> float:
    return torch.finfo(dtype).eps


def check_resolvable(name, rtol, atol, y0_flat, dtype) -> None:
    """Tolerances the dtype cannot resolve would make the step size crawl or fail: refuse
    them with the limit (rtol >= eps/1000 of the dtype the solver accumulates in: rtol=1e-9
    passes in float32, as torchdiffeq users ask for reference solutions, 1e-12 does not;
    the embedded error estimate scales with the step, so a tolerance near eps/1000 costs
    steps but does not stall)."""
    eps = _eps(dtype)
    floor = eps / 1000
    r = rtol if isinstance(rtol, float) else float(rtol.min())
    a = atol if isinstance(atol, float) else float(atol.min())
    if r == 0 and a == 0:
        raise ODEInputError(f"{name}: rtol and atol are both zero; no error is small enough. "
                            f"Give rtol > 0 and/or atol > 0")
    if 0 < r < floor:
        raise ODEInputError(
            f"{name}: rtol={r:g} is below what {str(dtype).replace('torch.', '')} resolves "
            f"(machine epsilon {eps:.3g}); use rtol >= {floor:.3g}, or a float64 state")
    if r == 0:
        ymax = float(y0_flat.detach().abs().max()) if y0_flat.numel() else 0.0
        if a < floor * ymax:
            raise ODEInputError(
                f"{name}: with rtol=0, atol={a:g} is below what "
                f"{str(dtype).replace('torch.', '')} resolves for |y0| up to {ymax:g}; use a "
                f"larger atol, rtol > 0, or a float64 state")


def callback_of(func, name: str):
    """``getattr(func, name, None)`` where it is callable, else None. (An ``nn.Module``
    is read without its ``__getattr__``, which raises, slowly, for a missing name: only
    its submodules are callable there.)"""
    d = func.__dict__ if getattr(type(func), "__getattr__", None) is \
        torch.nn.Module.__getattr__ else None
    if d is not None and name not in d and not hasattr(type(func), name):
        v = d["_modules"].get(name)
    else:
        v = getattr(func, name, None)
    return v if callable(v) else None


_ALL_CALLBACK_NAMES = frozenset(n + s for n in CALLBACK_NAMES for s in ("", "_adjoint"))


def _none_of(func, names: frozenset) -> bool:
    """Surely no attribute of ``func`` is named in ``names``: not in its own dict, its
    class's or a base's, nor (an ``nn.Module``) among its submodules, and no custom
    attribute lookup could make one. (A few set operations, where ``getattr`` of each
    missing name costs an exception or an ``nn.Module.__getattr__``.)"""
    d = getattr(func, "__dict__", None)
    if d is None or not d.keys().isdisjoint(names):
        return False
    for c in type(func).__mro__:
        if c is object:  # (its lookup is the plain one)
            continue
        own = c.__dict__.keys()
        if not own.isdisjoint(names):
            return False
        if not own.isdisjoint(_LOOKUPS) and (c is not torch.nn.Module or not d.get(
                "_modules", {}).keys().isdisjoint(names)):
            return False
    return True


_LOOKUPS = frozenset(("__getattr__", "__getattribute__"))


def first_callback(func) -> str | None:
    """The name of a torchdiffeq callback (or its _adjoint form) that ``func`` has."""
    if _none_of(func, _ALL_CALLBACK_NAMES):
        return None
    for n in CALLBACK_NAMES:
        for name in (n, n + "_adjoint"):
            if callback_of(func, name) is not None:
                return name
    return None


def find_callbacks(func, method_cls: type[Method], names=CALLBACK_NAMES) -> Callbacks | None:
    """torchdiffeq's callbacks found on ``func``; a warning for those the method cannot
    honour (fixed-grid methods have no accept/reject)."""
    if _none_of(func, _ALL_CALLBACK_NAMES):
        return None
    found = {n: v for n in names if (v := callback_of(func, n)) is not None}
    if not found:
        return None
    base = [n.replace("_adjoint", "") for n in found]
    if not method_cls.adaptive:
        bad = sorted(n for n, b in zip(found, base) if b != "callback_step")
        if bad:
            warnings.warn(f"method {method_cls.name!r} is a fixed-grid method and does not "
                          f"support the callbacks {bad} (it has no step rejection); only "
                          f"callback_step is called", stacklevel=4)
    cb = dict(zip(base, found.values()))
    accept = cb.get("callback_accept_step") if method_cls.adaptive else None
    reject = cb.get("callback_reject_step") if method_cls.adaptive else None
    return Callbacks(step=cb.get("callback_step"), accept=accept, reject=reject)


@dataclass
class Problem:
    """A validated solve: everything the loop needs except the output times."""

    func: Callable
    y0_user: Any
    items: list[torch.Tensor]
    layout: StateLayout
    rhs: RHS
    y0_flat: torch.Tensor
    method: type[Method]
    name: str
    opts: dict
    norm: ErrorNorm
    stats: Any  # SolverStats, or PerSampleStats for a per-sample batch
    y0_version: int = 0  # y0_flat's version counter when prepared (``check_y_unchanged``)
    # the method and its given options in a hashable form (``checked_options``), or None
    opts_key: tuple | None = None


def prepare(func, y0, *, rtol, atol, method, options, stats=None, batch: bool = False,
            time_arg: str = "batch") -> Problem:
    """Validate everything that does not depend on the output times. ``batch``: y0 is a
    per-sample batch (B, ...): the layout, tolerances and error norm are a sample's, the flat
    state is (B, n) and the right-hand side is called on the batch (``time_arg``: see
    ``RHS``)."""
    check_func(func)
    items, is_tuple = check_y0(y0, batch)
    name, given = resolve_method(method, options)
    opts, opts_key = checked_options(name, given)
    cls = SOLVERS[name]
    dtype, device = items[0].dtype, items[0].device
    B = items[0].shape[0] if batch else None
    layout = state_layout(items, is_tuple, batch)
    if stats is None:
        stats = PerSampleStats(method=name) if batch else SolverStats(method=name)
    stats.method = name
    rhs = RHS(func, layout, dtype, device, stats, batch=batch, time_arg=time_arg)
    ctrl = controller_or_default(opts, cls) if cls.adaptive else None
    rtol = ctrl.rtol if ctrl is not None and ctrl.rtol is not None else rtol
    atol = ctrl.atol if ctrl is not None and ctrl.atol is not None else atol
    rtol_v = tolerance_value("rtol", rtol, layout, rhs.dtype, device)
    atol_v = tolerance_value("atol", atol, layout, rhs.dtype, device)
    y0_flat = flat_y0(layout, items, is_tuple, B, rhs.dtype)
    if cls.adaptive:
        check_resolvable(name, rtol_v, atol_v, y0_flat, rhs.dtype)
    norm = ErrorNorm(layout, rtol_v, atol_v, opts.get("norm"))
    return Problem(func, y0, items, layout, rhs, y0_flat, cls, name, opts, norm, stats,
                   y0_flat._version, opts_key)


def flat_y0(layout: StateLayout, items: list[torch.Tensor], is_tuple: bool, B: int | None,
            dtype: torch.dtype) -> torch.Tensor:
    """Checked ``y0`` tensors as the flat state ((B, n) for a batch), in ``dtype``, the
    right-hand side's (the dtype the solver accumulates in)."""
    y = layout.flatten(tuple(items) if is_tuple else items[0], B)
    return y if y.dtype == dtype else y.to(dtype)


def integrate_plain(p: Problem, y0_flat: torch.Tensor, ts: list[float], stepper, controller,
                    **loop_kwargs) -> LoopResult:
    """The float-clock loop on a prepared problem, differentiable by backprop (autograd
    records the solver's operations). A gradient strategy may pass ``run`` another
    integrator with this signature (checkpointing does)."""
    return integrate(p.rhs, y0_flat, ts, stepper, controller, **loop_kwargs)


def run(p: Problem, ts: list[float], y0_flat: torch.Tensor | None = None, *,
        open_end=False, event_fn=None, stops=(), callbacks: Callbacks | None = None,
        record=False, throw=True, grid=None, integrator: Callable | None = None
        ) -> LoopResult:
    """Run the loop for a prepared problem (``integrator``: see ``integrate_plain``)."""
    o = p.opts
    cls = p.method
    stepper = cls.make_stepper(o, p.norm)  # before the controller: scipy_solver's share
    direction = 1.0 if len(ts) < 2 or ts[-1] > ts[0] else -1.0
    stops = list(stops)
    if cls.adaptive:
        end = direction * math.inf if open_end else ts[-1]
        stops += [Stop(v) for v in times_inside(cls.name, "step_t", o["step_t"], ts[0], end,
                                                direction)]
        jumps = times_inside(cls.name, "jump_t", o["jump_t"], ts[0], end, direction)
        stops += [Stop(v, "jump") for v in jumps]  # the loop merges stops at equal times
        if o.get("step_to_outputs") and not open_end:
            # implicit methods on stiff problems: outputs at step ends, not interpolated
            stops += [Stop(v) for v in ts[1:-1]]
    controller = make_controller(cls, o, p.norm, ts, p.func, p.y0_user, open_end, grid,
                                 [s.time for s in stops]) if len(ts) > 1 else None
    y_start = p.y0_flat if y0_flat is None else y0_flat
    res = (integrator or integrate_plain)(
        p, y_start, ts, stepper, controller, stops=stops, open_end=open_end, event_fn=event_fn,
        callbacks=callbacks, perturb=bool(o.get("perturb", False)),
        max_num_steps=o["max_num_steps"], record=record, throw=throw, name=p.name,
        event_interior_points=o["event_interior_points"], stiffness=cls.stiffness_check(o))
    p.stats.status = res.status
    p.stats.message = res.message
    p.stats.t_final = res.t_final
    p.stats.h_next = res.h_next
    return res


def start_carrying_t0(p: Problem, t: torch.Tensor, ts: list[float]):
    """(y0 plus a zero-valued term that carries d y(t_i)/d t_0 = -Phi f(t_0, y_0), the
    zero-valued time offsets t - t.detach() in the state's dtype)."""
    t_state = t.to(p.rhs.dtype)
    dt = t_state - t_state.detach()
    with torch.no_grad():
        f_start = p.rhs.call(ts[0], p.y0_flat.detach())
    return p.y0_flat - dt[0] * f_start, dt


def solve_problem(p: Problem, t: torch.Tensor, *, event_fn: Callable | None = None,
                  dense: bool = False, throw: bool = True, integrator: Callable | None = None,
                  callbacks: Callbacks | None = None) -> Solution:
    """Solve a prepared problem at the output times ``t`` (checked) and return the
    ``Solution``; differentiable by backprop, or as ``integrator`` differentiates (see
    ``integrate_plain``). See ``neuralode.solve``."""
    ts = times_of(t)
    if event_fn is not None and not callable(event_fn):
        raise ODEInputError(f"event_fn must be a callable event_fn(t, y), got "
                            f"{type(event_fn).__name__}")
    func = p.func
    t_grad = t.requires_grad and torch.is_grad_enabled()
    y0_flat = p.y0_flat
    dt: torch.Tensor | None = None
    y0_solve = y0_flat
    if t_grad:
        y0_solve, dt = start_carrying_t0(p, t, ts)
    res = run(p, ts, y0_solve, event_fn=event_fn,
              callbacks=callbacks if callbacks is not None else find_callbacks(func, p.method),
              record=dense, throw=throw, integrator=integrator)
    check_y_unchanged(p)
    outs = res.outs
    outs[0] = y0_flat
    ys = torch.stack(outs)
    if dt is not None and len(outs) > 1:
        with torch.no_grad():
            f_out = torch.stack([p.rhs.call(ts[i], outs[i].detach()) for i in range(1, len(outs))])
        ys = torch.cat([ys[:1], ys[1:] + dt[1:len(outs), None] * f_out])
    ys = to_user_dtype(ys, p)
    dense_sol = None
    if dense:
        dense_sol = DenseSolution(res.segments, p.layout, ts[0], res.t_final, p.rhs.user_dtype)
    event_t = event_y = None
    if res.event_t is not None and res.event_y is not None:
        event_t = torch.tensor(res.event_t, dtype=t.dtype)
        event_y = to_user_dtype(res.event_y, p)
    return Solution(ys=p.layout.unflatten(ys), ts=t, stats=p.stats, status=res.status,
                    message=res.message, event_t=event_t, event_y=event_y,
                    t_final=res.t_final, y_final=p.layout.unflatten(to_user_dtype(res.y_final, p)),
                    dense=dense_sol)


def check_y_unchanged(p: Problem) -> None:
    """``func`` must not change its input y in place: the initial state it was given (a
    view of the caller's y0, or the solver's copy of it) has not been written since
    ``prepare`` (its version counter, which every in-place operation on it or on a view of
    it advances; no copy, no comparison)."""
    if p.y0_flat._version != p.y0_version:
        raise ODEFuncError(
            "func changed its input y in place (the initial state it was given changed during "
            "the solve, and with it the caller's y0 where it is the same memory); compute "
            "dy/dt without modifying y (e.g. y = y * 2, not y *= 2): the solver's states are "
            "shared with func, so the solution would be wrong")


def to_user_dtype(y: torch.Tensor, p: Problem) -> torch.Tensor:
    return y if y.dtype == p.rhs.user_dtype else y.to(p.rhs.user_dtype)


def event_solve(func, y0, t, *, rtol, atol, method, options, event_fn, callbacks=None,
                stats=None, integrator: Callable | None = None):
    """torchdiffeq's event mode; returns (event_t, solution of y0 and y(event_t), stats)."""
    if not callable(event_fn):
        raise ODEInputError(f"event_fn must be a callable event_fn(t, y), got "
                            f"{type(event_fn).__name__}")
    opts = dict(options or {})
    p = prepare(func, y0, rtol=rtol, atol=atol, method=method, options=opts, stats=stats)
    if "max_num_steps" not in opts:
        p.opts["max_num_steps"] = EVENT_MAX_STEPS
    t = check_t(t)
    ts = times_of(t)
    if len(ts) < 2:
        raise ODEInputError("event mode needs t with at least two times: t[0] is the start, "
                            "t[1] gives the direction of integration")
    y0_solve = p.y0_flat
    if t.requires_grad and torch.is_grad_enabled():
        y0_solve, _ = start_carrying_t0(p, t, ts)  # y(t*) at a fixed t* moves with t0
    res = run(p, ts[:2], y0_solve, open_end=True, event_fn=event_fn,
              callbacks=callbacks if callbacks is not None else find_callbacks(func, p.method),
              throw=False, integrator=integrator)
    check_y_unchanged(p)
    if res.status != "event" or res.event_y is None:
        limit = ("" if "max_num_steps" in opts else
                 f"; event mode searches at most {EVENT_MAX_STEPS} steps unless "
                 f"options['max_num_steps'] says otherwise (t[1] only gives the direction)")
        raise EventError(f"{p.name}: event_fn never changed sign: the search from t0={ts[0]} "
                         f"stopped at t={res.t_final:.10g} without an event ({res.message})"
                         f"{limit}")
    ys = torch.stack([p.y0_flat, res.event_y])
    ys = p.layout.unflatten(to_user_dtype(ys, p))
    event_t = torch.tensor(res.event_t, dtype=t.dtype)
    return event_t, ys, p.stats


