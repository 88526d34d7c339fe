"""The compiled driver: a whole solve of the tensor clock as one compiled graph.

``integrate_compiled`` runs the loop of ``batched.integrate_batched`` (every sample its own
time, step size, acceptance, outputs, statistics and status) inside one
``torch._higher_order_ops.while_loop`` compiled by ``torch.compile(fullgraph=True)``: the
steps, the accept/reject decisions, the step-size control, the outputs written into a
preallocated buffer, termination, statistics and status all stay in the graph, with no host
synchronisation between the first step and the last. The attempt is the same code as the
eager driver's (``batched.BatchStep``: the stepper's ``step``, the controller's ``propose``
and ``judge``, the per-row bookkeeping); what is this module's own is how their state is
carried through the loop (as tensors, since a compiled loop body cannot change objects that
live outside it) and how outputs are written without a host-side count. The first step
(Hairer's estimate, one more evaluation of f) is computed in the graph too, before the loop:
as eager operations it cost as much as a quarter of a small problem's solve.

Outputs: a solve whose only output after y0 is at the end (``t = [t0, t1]``, the common
case of a model's forward pass) carries no output buffer: a row that gets there ends its
last step at t1 exactly, and its final state is that output. Otherwise, after each
accepted step its output times are interpolated on that step, at most
``window`` of them per row and iteration; a row with more output times in one step than the
window writes the rest in the next iterations before it attempts its next step (its own
steps are unchanged: a row that does not attempt keeps its time, state, step size and
controller history, as a finished row does in the eager driver). Where the state is large
(its size bounds the window), an iteration in which no row attempts a step (they all write
outputs) skips the attempt (``torch.cond``) and evaluates nothing; on small states the
masked attempt costs less than the branch.

A carried tensor is copied at every iteration (a compiled loop's body cannot write into its
input), so the output buffer a call carries holds at most about ``CHUNK_ELEMENTS`` numbers:
a solve with more outputs calls the compiled loop once per chunk of output times, each call
going on from the carried state until no row can go on without writing past its chunk (a
row that reaches the chunk's end waits), with one host synchronisation between calls, not
one per step. Such a solve takes its first step before the first call.

Served: the explicit Runge–Kutta methods, adaptive and on fixed grids, float32 and float64
states, tensors and tuples (flat rows), the stiffness test of the explicit methods (on the
loop's step count). Not served (a clear error): autograd through the loop (see
``BACKPROP_REFUSED``), events, dense output, ``shrink``, callbacks, the implicit and
Rosenbrock methods (their Newton iterations and Jacobian reuse branch on the host).

Compilation: the loop is compiled once per structure (method, controller settings, state
shape and dtype, number of output times, ``func``'s code); the tolerances (scalar ``rtol``/
``atol``), the output times, ``y0`` and ``func``'s parameters enter as tensors, so changing
them does not recompile. ``COMPILES`` counts the compilations of this process; a structure
that torch.compile could not capture is remembered (``FAILED``) and solved eagerly, with the
warning, without tracing it again.
"""

from __future__ import annotations

import functools
import math
import time
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch._higher_order_ops import while_loop

from neuralode.errors import ODEInputError
from neuralode.solvers.batched import (
    BatchedResult,
    BatchStep,
    _messages,
    integrate_batched,
    raise_failures,
)
from neuralode.solvers.elementwise import divisor
from neuralode.solvers.status import CODE, NONFINITE, RUNNING, STEP_SIZE, STIFF, SUCCESS
from neuralode.solvers.stiffness import CHECK_EVERY, StiffnessCheck

_RUNNING, _STIFF = CODE[RUNNING], CODE[STIFF]


# torch 2.13's autograd of while_loop returns wrong gradients for a loop like this one (the
# gradient of a captured parameter when no carried input requires grad, and the gradient
# through values written into a carried output buffer: tests/test_compiled.py reproduces
# both), so the compiled solve is not differentiated by autograd
BACKPROP_REFUSED = (
    "{name}: the compiled solve (options['compile']) is not differentiated by backprop: "
    "torch's autograd of a compiled while_loop (torch 2.13) gives wrong gradients for it. "
    "Use gradient='adjoint' (odeint_adjoint: the forward solve compiled) or "
    "gradient='checkpoint' (one problem: the backward pass compiled), or solve without "
    "'compile' for backprop, or run the compiled solve under torch.no_grad()")


class BackpropRefused(ODEInputError):
    """``BACKPROP_REFUSED``: the compiled solve would need autograd through its loop."""


class CompileFallbackWarning(UserWarning):
    """A compiled solve that torch.compile could not capture ran eagerly."""

# the output window: at most MAX_WINDOW output times per row and iteration, and about
# WINDOW_ELEMENTS interpolated numbers
MAX_WINDOW = 16
WINDOW_ELEMENTS = 1 << 16
# the output buffer a call of the compiled loop carries holds about CHUNK_ELEMENTS numbers
# (at least a window): a carried buffer is copied at every iteration (a compiled loop's
# body cannot write into its input), so a solve whose outputs are larger runs the loop in
# several calls, each writing the next outputs, with one host synchronisation between them
CHUNK_ELEMENTS = 1 << 18
WRITE_ALWAYS_ELEMENTS = 1 << 12
COMPILES: list[float] = []  # seconds of each compilation (inductor) of this process
# inductor: C++ host code around the kernels (the loop's iterations would otherwise each run
# tens of Python-level buffer checks), small matrix products written as fused arithmetic
INDUCTOR_SETTINGS = {"cpp_wrapper": True, "decompose_mem_bound_mm": True}
# small states: the stacked carried tensors written by one pointwise kernel (a concatenation
# kernel hands each stacked part a tensor of its own, a heap allocation per part and
# iteration); with many rows its where-chain recomputes each part for every row instead
POINTWISE_CAT = {"force_pointwise_cat": True}
POINTWISE_CAT_ROWS = 32


def _fork(obj, **attrs):
    """A shallow copy of ``obj`` with ``attrs`` set: the loop body's own stepper or
    controller, carrying the tensors of one iteration (the originals stay untouched)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(attrs)
    return new


def _counting_backend(backend: str, settings: dict):
    """The backend (inductor with ``INDUCTOR_SETTINGS`` and ``settings``), timing each
    compilation into ``COMPILES``."""
    if backend != "inductor":
        inner: Any = backend
    else:  # (imported here: torch's compiler takes seconds to import, most solves skip it)
        from torch._inductor.compile_fx import compile_fx
        inner = compile_fx

    def compile_graph(gm, example_inputs):
        start = time.perf_counter()
        if callable(inner):
            with torch._inductor.config.patch({**INDUCTOR_SETTINGS, **settings}):
                fn = inner(gm, example_inputs)
        else:
            fn = torch._dynamo.lookup_backend(inner)(gm, example_inputs)
        COMPILES.append(time.perf_counter() - start)
        return fn
    return compile_graph


class CompileFailure(RuntimeError):
    """torch.compile could not capture a solve that has no eager fallback here (one with
    ``jumps``): the caller solves eagerly its own way."""


def lru_get(cache: OrderedDict, key, make, limit: int = 64):
    """``cache[key]``, made by ``make()`` when absent; past ``limit`` entries the least
    recently used is dropped (the compiled loops, the adjoint's backward systems, the
    checkpoint sweep's step functions: each keeps what its key's ids refer to alive)."""
    if key not in cache:
        cache[key] = make()
        while len(cache) > limit:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


# (function, backend, structure) -> why torch.compile failed on it: not tried again (a
# training loop would otherwise pay the failed tracing at every call)
FAILED: dict = {}
_LOOPS: OrderedDict = OrderedDict()  # (function, backend, structure) -> its compiled copy
_GROUPS: OrderedDict = OrderedDict()  # structure -> its carried state's layout (``_groups``)
# (settings key, shapes, ...) -> the plan its solves share (``integrate_compiled``)
_PLANS: OrderedDict = OrderedDict()
MAX_LOOPS = 64  # structures kept compiled (least recently used dropped)


def compiled_function(fn, backend: str, structure: tuple, settings: dict | None = None,
                      fixed: Callable[[], tuple] | None = None):
    """``fn`` (a loop: this module's ``_loop``, the checkpoint's reverse sweep) compiled for
    one structure. Each structure gets a code object of its own: torch.compile keeps its
    compilations per code object, checks them in turn on every call and stops compiling
    past a few (8 in torch 2.13), so one shared code object would slow down, then fall back
    to running uncompiled, as a process meets more structures. ``fixed()``: the sources
    (``spec.out``, ``spec.stepper.__dict__['c']``, ...) whose values ``structure`` fixes;
    torch.compile's guards on them are dropped (checked once per call by the structure's
    lookup, not again by dynamo; a few hundred guards on a tableau's coefficients)."""
    def make():
        copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                  fn.__defaults__, fn.__closure__)
        options = {"guard_filter_fn": _guard_filter(fixed())} if fixed else None
        compiled = torch.compile(copy, fullgraph=True, dynamic=False, options=options,
                                 backend=_counting_backend(backend, settings or {}))
        compiled.__dict__.update(neuralode_code=copy.__code__, neuralode_compiles=0)
        return compiled
    return lru_get(_LOOPS, (fn, backend, structure), make, MAX_LOOPS)


# guards on these globals are dropped: this package's own (its functions and constants;
# ``G['name']`` is this module's global ``name``), torch's functions and modules, and Python's
# builtins, none of which a solve changes (a user's globals keep theirs; hooks keep theirs)
OWN_GLOBALS = ("G['__import_neuralode_dot_", "G['__import_torch_dot_", "G['__builtins_dict_")
OWN_GLOBAL_CHECKS = ("BUILTIN_MATCH", "CLOSURE_MATCH", "MODULE_MATCH", "CLASS_MATCH",
                     "CONSTANT_MATCH", "EQUALS_MATCH", "SEQUENCE_LENGTH", "DUPLICATE_INPUT",
                     "ID_MATCH")


def _own_global(name: str, kind: str) -> bool:
    return kind in OWN_GLOBAL_CHECKS and "hook" not in name and name.startswith("G['") and (
        name.startswith(OWN_GLOBALS) or not name.startswith("G['__"))


def _guard_filter(fixed: tuple):
    """torch.compile's ``guard_filter_fn``: keep every guard but those on the sources in
    ``fixed`` (and what lies below them), tensors' guards excepted; those on torch's pytree
    registry (``while_loop`` and ``cond`` flatten their operands with it; the loop's
    operands are tuples of tensors, whose flattening no registration changes); those on
    the package's, torch's and Python's own globals (``_own_global``); and the repeats of a
    guard (the same check of the same source, made again by each evaluation of f the loop
    traces: 40-60% of what is left). At every call dynamo checks what is kept."""
    def keep(entries) -> list[bool]:
        seen: set = set()
        out = []
        for e in entries:
            cf = e.orig_guard.create_fn
            sig = (e.name, e.guard_type, repr(getattr(cf, "args", ())),
                   repr(sorted(getattr(cf, "keywords", {}).items())), getattr(cf, "func", cf))
            out.append(sig not in seen and (
                e.guard_type == "TENSOR_MATCH"
                or not ("_pytree" in e.name or _own_global(e.name, e.guard_type)
                        or any(e.name == p or e.name.startswith((p + ".", p + "["))
                               for p in fixed))))
            seen.add(sig)
        return out
    return keep


class tracing_autograd:  # (lower case: used as ``with tracing_autograd()``)
    """``torch.autograd.grad`` inside func traced into the graph, for the block: dynamo's
    ``trace_autograd_ops``, set and reset by hand (``config.patch`` costs ~25 us, a
    generator-based context manager ~5 us, at every call of a compiled solve)."""

    __slots__ = ("was",)

    def __enter__(self):
        cfg = torch._dynamo.config
        self.was, cfg.trace_autograd_ops = cfg.trace_autograd_ops, True

    def __exit__(self, *exc):
        torch._dynamo.config.trace_autograd_ops = self.was


def traced(compiled, run: Callable):
    """``run()``, which calls ``compiled`` (a ``compiled_function``). torch.compile traces
    ``torch.autograd.grad`` inside func only under ``tracing_autograd``, a global setting
    that costs tens of microseconds to set and reset at every call, and that matters only
    while it traces: a loop is run without it
    until its tracing needed it once (then always with it)."""
    if getattr(compiled, "neuralode_autograd", False):
        with tracing_autograd():
            return run()
    try:
        return run()
    except torch._dynamo.exc.TorchDynamoException as e:
        if "trace_autograd_ops" not in str(e):
            raise
    compiled.neuralode_autograd = True
    with tracing_autograd():
        return run()


MAX_COMPILES = 6  # compilations of one structure's loop (torch stops at 8) before it fails


def recompiled(key: tuple, compiled, new: int) -> str:
    """After a call of ``compiled`` (``compiled_function``'s, for ``key``) that compiled
    ``new`` times: "" or, where the loop keeps being compiled again, why; ``key`` is then
    marked ``FAILED`` (its later calls run eagerly). A guard of torch.compile failed: a
    Python value the loop reads changed since it was compiled. Where the same guard fails
    twice in a row, the value changes at every call (a counter in func, ``self.nfe += 1``):
    every call would compile again (seconds each), so the third compilation is the last."""
    if not new:
        return ""
    n = compiled.neuralode_compiles = getattr(compiled, "neuralode_compiles", 0) + new
    code = getattr(compiled, "neuralode_code", None)
    fails = [" ".join(r.split("User stack trace")[0].split()).split(": ", 1)[-1]
             for r in torch._dynamo.utils.guard_failures.get(code, [])]
    same = len(fails) >= 2 and fails[-1].split(" == ")[0] == fails[-2].split(" == ")[0]
    if n < (3 if same else MAX_COMPILES):
        return ""
    what = fails[-1].split(" # ", 1)[-1].split("(HINT")[0].strip() if fails else "?"
    FAILED[key] = reason = (
        f"its loop was compiled {n} times, again at each call: a Python value it reads "
        f"changed ({what[:200]}); a counter or flag that func changes (self.nfe += 1) does "
        f"this: skip it while torch.compiler.is_compiling() and read the solution's stats, "
        f"or keep such values in tensors")
    return reason


class _Outputs:
    """How a solve's T output times are written (fixed per structure): ``window`` outputs
    per row and iteration, ``chunk`` per call of the compiled loop, and what follows."""

    def __init__(self, T: int, B: int, n: int, s_ext: int, write: bool = True):
        # the only output after y0 is at the end (or the caller needs none: ``write``
        # False, the adjoint's backward solve): no output buffer is carried (it would be
        # copied at every iteration) and nothing is written in the loop; a row that gets to
        # the end ends its last step at t1 exactly, and its final state is that output
        self.final_only = T == 2 or not write
        window = max(1, min(T - 1, MAX_WINDOW,
                            max(4, WINDOW_ELEMENTS // max(1, B * n * s_ext))))
        self.chunk = T - 1 if T * B * n <= CHUNK_ELEMENTS or self.final_only else \
            min(T - 1, max(window, CHUNK_ELEMENTS // max(1, B * n)))
        self.window = min(window, self.chunk)
        self.one_call = self.chunk == T - 1
        # iterations in which every row only writes outputs skip the attempt: where a step
        # can hold more outputs than the window, and the state is large enough (the window
        # is bounded by its size) that a masked attempt costs more than the branch
        self.skip_idle = self.window < min(T - 1, MAX_WINDOW) and not self.final_only
        # every step's outputs fit in one window: they are written from the step itself,
        # in its iteration (no segment is carried for later iterations)
        self.direct = self.window >= T - 1 or self.final_only
        # one small problem writes its window at every iteration (with nothing to write, into
        # the spare row): cheaper than the branch that would skip it. (With many rows the
        # unconditional write costs more than the branch: 256 Van der Pol per sample, 2.4x
        # slower; 32, 1.6x.)
        self.write_always = B == 1 and self.window * n * s_ext <= WRITE_ALWAYS_ELEMENTS


class _Spec:
    """What the loop body needs besides its carried tensors (fixed per structure)."""

    def __init__(self, stepper, controller, stiffness, max_num_steps: int, outputs: _Outputs,
                 hist_names: tuple, groups: tuple, T: int, f0_in_graph: bool, hist0: dict,
                 k1_in_step: bool = False):
        self.stepper, self.controller, self.stiffness = stepper, controller, stiffness
        self.max_num_steps = max_num_steps
        self.hist_names, self.groups, self.T = hist_names, groups, T
        self.out = outputs  # (the output layout: window, chunk, one call, ...)
        self.f0_in_graph = f0_in_graph  # f(t0, y0) evaluated in the graph (one call)
        # a step's first stage f(t, y) evaluated in it, not carried from the step before:
        # (a fixed grid of a method without FSAL, only the final state wanted) no f(t1, y1)
        # after the last step (its evaluation is the step's first; one in all fewer)
        self.k1_in_step = k1_in_step
        self.adaptive = controller.adaptive
        # the controller's starting history (but absy): a solve in one call builds its
        # starting state in the graph (``_start``)
        self.hist0 = hist0


class _Plan:
    """What the solves of one structure share (``integrate_compiled``): the loop's templates
    (the stepper's without a right-hand side: each solve forks the templates with its own),
    and the structure that keys its compiled loop. Made from the first solve's stepper
    (started here) and controller."""

    def __init__(self, rhs, y0, ts, f0, stepper, controller, stiffness, layout: _Outputs,
                 max_num_steps: int, f0_in_graph: bool, jumps: bool, tol_tensors: bool,
                 func):
        B, T = ts.shape
        # the stepper's stage list (its autograd form: sums of scaled stages), with or
        # without a graph: inside a compiled loop those sums fuse, where the buffer's
        # matrix-vector products would each be a kernel of their own
        stepper.start(rhs, y0, f0, True)
        self.names = names = tuple(controller.history()) + ("absy",) \
            if controller.adaptive else ()
        hist0 = {k: getattr(controller, k) for k in names[:-1]}
        # the loop's templates hold no per-solve tensors: those travel in the carry (a
        # template that still held them would hand the loop aliased inputs)
        st_proto = _fork(stepper, fused=True)
        for k in ("ks", "f0", "rhs"):  # (the stage list's start, the form ``start(..., True)``
            st_proto.__dict__.pop(k, None)  # made; the solve's right-hand side)
        ctl_proto, stiff_proto = self._templates(controller, stiffness, y0.device)
        k1_in_step = f0_in_graph and layout.final_only and not controller.adaptive and \
            not stepper.fsal and stiffness is None and not jumps
        self.spec = _Spec(st_proto, ctl_proto, stiff_proto, max_num_steps, layout, names, (),
                          T, f0_in_graph, hist0, k1_in_step)
        structure = (B, y0.shape[1], T, y0.dtype, str(y0.device), stepper.tab,
                     type(controller).__name__, layout.window, layout.chunk,
                     layout.final_only, stiffness is not None, not tol_tensors, jumps,
                     getattr(func, "__code__", type(func)), max_num_steps, f0_in_graph,
                     k1_in_step, _settings(st_proto, ctl_proto, stiff_proto))
        if layout.one_call:  # (several calls: the layout of the state built for them)
            self.spec.groups = groups = lru_get(_GROUPS, structure, lambda: _groups(
                self.start_state(self.spec_for(rhs, controller, stiffness), controller, ts,
                                 y0, f0, jumps)),
                MAX_LOOPS)
            structure += (groups,)
        self.structure = structure

    def _templates(self, controller, stiffness, device) -> tuple:
        """The controller's and the stiffness check's templates: a solve's own, without its
        history (it travels in the carry). (Each solve forks its own, as its norm and its
        right-hand side share the solve's state layout: torch.compile checks that they do.)"""
        ctl = _fork(controller)
        for k in self.names:
            ctl.__dict__.pop(k, None)
        if not controller.adaptive:  # a grid: its tensors made from ts in the graph (``_loop``)
            for k in ("ts", "h", "n", "t0", "t1"):
                ctl.__dict__.pop(k, None)
            if isinstance(controller.step, (int, float)):
                ctl.step = _scalar_tensor(float(controller.step), device)
        stiff = None
        if stiffness is not None:
            stiff = _fork(stiffness)
            stiff.__dict__.pop("stiff", None)
            stiff.__dict__.pop("calm", None)
        return ctl, stiff

    def spec_for(self, rhs, controller, stiffness) -> _Spec:
        """The loop's templates for a solve of ``rhs`` with its ``controller`` and
        ``stiffness`` check."""
        spec = _fork(self.spec)
        spec.stepper = _fork(spec.stepper, rhs=rhs)
        spec.controller, spec.stiffness = self._templates(controller, stiffness,
                                                          rhs.device)
        return spec

    def start_state(self, spec: _Spec, controller, ts, y0, f0, jumps: bool) -> dict:
        """A solve's starting state, eagerly (``controller``: the solve's own)."""
        status = torch.zeros(y0.shape[0], dtype=torch.long, device=y0.device)
        if not spec.out.one_call:  # (one call: f0 checked in the graph)
            status = _f0_status(f0, status)
        if controller.adaptive:
            controller.absy = y0.detach().abs()  # (what ``first_step`` sets, there too)
        return _start(spec, _on_times(controller, ts), ts, y0,
                      None if spec.k1_in_step else f0, status,
                      {k: getattr(controller, k) for k in self.names}, jumps)


def _tolerances(ctl, tol) -> dict:
    """The controller's norm with the tolerance tensors ``tol`` (rtol, atol), or as it is."""
    return {} if not ctl.adaptive else {
        "norm": _fork(ctl.norm, rtol=tol[0], atol=tol[1]) if tol is not None else ctl.norm}


def _settings(*templates) -> tuple:
    """The plain settings (bool, int, float, str and None attributes) of the loop's
    templates, part of its structure: a solve with other controller settings (safety,
    max_step, ...) gets a loop of its own, compiled once, rather than compiling the same
    loop again (which ``recompiled`` would take for a value changing at every call). (The
    norm is not among them: its scalar tolerances enter the loop as tensors.)"""
    return tuple(tuple((k, repr(v) if isinstance(v, float) else v) for k, v in _plain(o))
                 for o in templates if o is not None)


def _plain(o) -> list:
    """(name, value) of ``o``'s plain attributes (bool, int, float, str, None)."""
    return [(k, v) for k, v in vars(o).items()
            if v is None or isinstance(v, (bool, int, float, str))]


# what a structure key fixes besides the templates' plain settings: the loop's layout, and
# the coefficients that a template derives from its tableau (the key holds the tableau)
FIXED_SPEC = ("spec.T", "spec.adaptive", "spec.f0_in_graph", "spec.k1_in_step",
              "spec.max_num_steps", "spec.out",
              "spec.groups", "spec.hist_names")
FROM_TABLEAU = {"stepper": ("tab", "c", "a_nz", "b_nz", "berr_nz"), "stiffness": ("d",)}


def _fixed_sources(spec) -> tuple:
    """The sources of ``spec`` that its structure key fixes (``compiled_function``)."""
    out = list(FIXED_SPEC)
    for role in ("stepper", "controller", "stiffness"):
        o = getattr(spec, role)
        if o is not None:
            for k in [k for k, _ in _plain(o)] + list(FROM_TABLEAU.get(role, ())):
                out += [f"spec.{role}.__dict__[{k!r}]", f"spec.{role}.{k}"]
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _scalar_tensor(v: float, device) -> torch.Tensor:
    """A tolerance or a step size as the 0-d float64 tensor the compiled loop takes (it
    only reads it: one tensor per value and device serves every solve; a normal tensor,
    also when the first solve runs under ``torch.inference_mode``)."""
    with torch.inference_mode(False):
        return torch.tensor(v, dtype=torch.float64, device=device)


def _f0_status(f0: torch.Tensor, status: torch.Tensor) -> torch.Tensor:
    """The rows whose f(t0, y0) is not finite fail before their first step."""
    return torch.where(~torch.isfinite(f0.detach()).all(1), CODE[NONFINITE], status)


def _on_times(ctl, ts):
    """The controller on the output times ``ts``: a fixed grid's tensors made from them
    (``PerSampleGrid.at``; its template holds only the step size), an adaptive controller
    as it is."""
    return ctl if ctl.adaptive else ctl.at(ts)


def _clock(ts):
    """(the direction of each row's time (B,), the times in it (B, T) (increasing), the
    rows' end times (B,)) of the output times ``ts`` (B, T)."""
    dirn = torch.where(ts[:, -1] >= ts[:, 0], 1.0, -1.0).to(torch.float64)
    return dirn, ts * dirn[:, None], ts[:, -1].clone()


def _start(spec: _Spec, ctl, ts, y0, f0, status, hist: dict, jumps: bool) -> dict:
    """The state a solve starts from (eagerly; in the graph of a solve in one call):
    ``ctl`` the controller (its first grid point), ``hist`` its starting history."""
    B, device = y0.shape[0], y0.device
    t = ts[:, 0].detach().clone()
    zl = torch.zeros(B, dtype=torch.long, device=device)
    nan = torch.full((B,), math.nan, dtype=torch.float64, device=device)
    h = nan.clone() if spec.adaptive else \
        ctl.point(torch.ones(B, dtype=torch.long, device=device)).detach() - t
    zero = torch.zeros((), dtype=torch.long, device=device)
    state = {"it": zero, "it_step": zero.clone(), "status": status, "i_w": zl + 1,
             "i_out": zl + 1, "t": t, "y": y0, "h": h, "n_att": zl, "n_acc": zl, "n_rej": zl,
             "k_grid": zl}
    if f0 is not None:  # (else each step evaluates its first stage: ``k1_in_step``)
        state["f0"] = f0
    if not spec.out.direct:  # (the segment the outputs are written from, carried)
        state.update(seg_y=y0, seg_y1=y0, seg_h=torch.zeros_like(nan), seg_t=t, seg_t1=t,
                     **{f"seg_K{i}": torch.zeros_like(y0) for i in range(spec.stepper.s_ext)})
    for k, v in hist.items():
        state["hist_" + k] = v.detach() if isinstance(v, torch.Tensor) else torch.full(
            (B,), v, dtype=torch.bool if isinstance(v, bool) else torch.float64, device=device)
    if spec.stiffness is not None:
        state.update(stiff=zl, calm=zl, stiff_t=nan, stiff_h=nan, stiff_ratio=nan,
                     stiff_remaining=nan)
    if spec.out.skip_idle:  # (the count of iterations that attempted a step)
        state["evals"] = zero.clone()
    if jumps:
        state["i_stop"] = zl + 1
        state["jump_evals"] = zero.clone()
    return state


def _first_step(spec: _Spec, c: dict, tol, dirn) -> None:
    """Hairer's first step (one more evaluation of f) and the controller's history, into the
    state ``c``: in the graph before the loop, or eagerly before the first of several calls."""
    ctl = _fork(spec.controller, **_tolerances(spec.controller, tol))
    h = ctl.first_step(spec.stepper.rhs.call, c["t"], c["y"], c["f0"], dirn)
    c["h"] = h
    c["status"] = torch.where((c["status"] == _RUNNING) & ~torch.isfinite(h), CODE[STEP_SIZE],
                              c["status"])
    c.update({"hist_" + n: getattr(ctl, n) for n in spec.hist_names})


PACK_ELEMENTS = 4096  # carried tensors up to this size travel packed with others


# a small problem's carried state travels as one flat vector: up to FLAT_ROWS rows and
# FLAT_ELEMENTS numbers (scratch A/B against the stacked layout: the spiral 0.85, Lorenz 0.92,
# 4 and 8 Van der Pol rows 0.89 and 0.87, one 100-element state 0.93-0.99; but 16 rows 1.15,
# 32 rows 1.35, one 1,000-element state 1.25)
FLAT_ROWS, FLAT_ELEMENTS = 8, 512


def _groups(state: dict) -> tuple:
    """The carried state's layout. Every carried tensor costs an allocation and a handle
    per iteration, so small tensors travel packed: for a small problem, all of them as
    one float64 vector (float64 holds every value of the smaller dtypes, and integers
    below 2^53, exactly); else stacked by dtype and shape. A large tensor travels alone.
    Each group: (names, how, ((dtype, shape), ...)), how one of "alone", "stack",
    "flat"."""
    small = {n: v for n, v in state.items() if v.numel() <= PACK_ELEMENTS}
    rows = state["t"].shape[0]
    flat = rows <= FLAT_ROWS and sum(v.numel() for v in small.values()) <= FLAT_ELEMENTS
    groups: dict = {}
    for name, v in state.items():
        key = name if name not in small else "flat" if flat else (v.dtype, tuple(v.shape))
        groups.setdefault(key, []).append(name)
    return tuple((tuple(g), "flat" if k == "flat" else "alone" if isinstance(k, str)
                  else "stack", tuple((state[n].dtype, tuple(state[n].shape)) for n in g))
                 for k, g in groups.items())


def _pack(state: dict, groups: tuple, before: dict | None = None) -> tuple:
    """The packed carry; ``before``: the iteration's input state (a large tensor handed on
    unchanged is copied: a loop's output may not be its input)."""
    out = []
    for names, how, _ in groups:
        if how == "alone":
            v = state[names[0]]
            out.append(v.clone() if before is not None and v is before[names[0]] else v)
        elif how == "stack":
            out.append(torch.stack([state[n] for n in names]))
        else:
            out.append(torch.cat([state[n].reshape(-1).to(torch.float64) for n in names]))
    return tuple(out)


def _unpack(packs: tuple, groups: tuple, only: tuple | None = None) -> dict:
    """The carried state by name (``only``: just these names)."""
    out = {}
    for p, (names, how, metas) in zip(packs, groups):
        at = 0
        for k, (n, (dtype, shape)) in enumerate(zip(names, metas)):
            size = math.prod(shape)
            if only is None or n in only:
                out[n] = p if how == "alone" else p[k] if how == "stack" else \
                    p[at:at + size].view(shape).to(dtype)
            at += size
    return out


# what is read of the state a call of the compiled loop ends with
RESULT = ("status", "i_w", "i_out", "it", "evals", "t", "y", "h", "n_acc", "n_rej",
          "jump_evals", "stiff_t", "stiff_h", "stiff_ratio", "stiff_remaining")


def _segment_names(s_ext: int) -> tuple:
    """The carried segment's parts (``attempt``): y, y1, h, t, t1 and the stages."""
    return ("y", "y1", "h", "t", "t1", *(f"K{i}" for i in range(s_ext)))


def _loop(spec: _Spec, ts, tol, base, carry, jumps=None):
    """The solve, or the part of it that writes the outputs ``base`` .. ``base`` + chunk - 1
    (``base`` a 0-d tensor; 0 when one call writes them all, its out holding y0 in row 0
    and chunk = T: the outputs' indices are its rows): ``while_loop`` over
    iterations, each one attempt of the rows that may step and one window of output writes;
    it ends when no row can go on without writing past the chunk. ``carry``: (out (chunk + 1,
    B, n), *packed state); out's row chunk takes the writes that are not this call's; in
    one call, (y0,) or (y0, f0): the graph builds out and the state.
    ``jumps``: None, or (J (T, B, n), keep (n,)) (see ``integrate_compiled``)."""
    stepper0, stiff0 = spec.stepper, spec.stiffness
    ctl0 = _on_times(spec.controller, ts)
    if not spec.adaptive:  # (the loop's body may take no views of its inputs)
        ctl0.t0, ctl0.t1 = ctl0.t0.clone(), ctl0.t1.clone()
    dirn, key, t_end = _clock(ts)
    T, W, C, adaptive, groups = spec.T, spec.out.window, spec.out.chunk, spec.adaptive, \
        spec.groups
    names = spec.hist_names
    SEGMENT = _segment_names(stepper0.s_ext)
    j = torch.arange(W, device=ts.device)[None, :]
    extra = _tolerances(ctl0, tol)
    one_call = spec.out.one_call  # (then every output is this call's: no chunk bounds)
    if one_call:  # (out: y0, the T - 1 outputs, a row for absent writes)
        C = T
    end = base + C  # the first output past this call's

    final_only = spec.out.final_only

    def cond(*carried):
        c = _unpack(carried if final_only else carried[1:], groups)
        backlog = c["i_w"] < c["i_out"]
        if one_call:
            return ((c["status"] == _RUNNING) | backlog).any()
        return (((c["status"] == _RUNNING) & ~backlog) | (backlog & (c["i_w"] < end))).any()

    def write_carried(out, i_w, *packs):  # from the rows' carried segments
        d = _unpack(packs, groups)
        return write(out, i_w, d["i_out"], *(d["seg_" + k] for k in SEGMENT))

    def write_direct(out, i_w, *rest):
        """From this iteration's step: ``rest`` is the new packed state, the old one, and
        y1, h, t1 and the stages after the first (the first is the old state's f0). (torch.cond
        takes no operands that share memory: the packs are passed whole.)"""
        n_p = len(groups)
        d, o = _unpack(rest[:n_p], groups), _unpack(rest[n_p:2 * n_p], groups)
        y1, hm, t1m = rest[2 * n_p:2 * n_p + 3]
        return write(out, i_w, d["i_out"], o["y"], y1, hm, o["t"], t1m, o["f0"],
                     *rest[2 * n_p + 3:])

    def write(out, i_w, i_out, seg_y, seg_y1, seg_h, seg_t, seg_t1, *seg_K):
        """The outputs i_w .. i_w + W - 1 (those below i_out and in the chunk) of each row's
        segment: its last accepted step, from y at t to y1 at t1 (size h, stages K)."""
        idx = i_w[:, None] + j
        valid = idx < (i_out if one_call else i_out.clamp(max=end))[:, None]
        t_o = ts.gather(1, idx.clamp(max=T - 1))
        hs = divisor(seg_h)[:, None]
        theta = torch.where(valid, (t_o - seg_t[:, None]) / hs, 0.0)
        seg = _fork(stepper0, f0=None, ks=list(seg_K), y1=seg_y1)
        val = seg.interpolate(seg_y, seg_h, theta)
        val = torch.where((t_o == seg_t1[:, None])[..., None], seg_y1[:, None], val)
        rows = torch.arange(out.shape[1], device=out.device)[:, None].expand_as(idx)
        at = torch.where(valid, idx if one_call else idx - base, C)  # (row C: no output)
        return out.index_put((at, rows), val)

    def keep(out, *rest):
        return out.clone()

    def refresh_f(landed, t, y, f0):  # (jumps) f at the rows that jumped
        return torch.where(landed[:, None], stepper0.rhs.call(t, y), f0)

    def same_f(landed, t, y, f0):
        return f0.clone()

    if one_call:  # the starting state from y0, f0 and its check, the first step: in the graph
        y0 = carry_y0 = carry[0]
        hist = {**spec.hist0, "absy": y0.detach().abs()} if adaptive else {}
        B = y0.shape[0]
        status = torch.zeros(B, dtype=torch.long, device=y0.device)
        f0 = None
        if not spec.k1_in_step:
            f0 = stepper0.rhs.call(ts[:, 0], y0) if spec.f0_in_graph else carry[1]
            status = _f0_status(f0, status)
        c = _start(spec, ctl0, ts, y0, f0, status, hist, jumps is not None)
        if adaptive:
            _first_step(spec, c, tol, dirn)
        carry = _pack(c, groups)
        if not final_only:
            carry = (torch.cat([y0[None], y0.new_empty((T, *y0.shape))]), *carry)

    def writes(c: dict, new: dict) -> dict:
        """``new`` with the count of iterations and i_w past the outputs this iteration
        writes (a row past the chunk keeps its i_w: it writes in a later call)."""
        i_w, i_out = c["i_w"], new.get("i_out", c["i_out"])
        i_w1 = torch.minimum(i_w + W, i_out)
        new.update(it=c["it"] + 1,
                   i_w=i_w1 if one_call else torch.maximum(i_w, i_w1.clamp(max=end)))
        return new

    def idle(*packs):  # no row attempts a step (they write outputs): f is not evaluated
        c = _unpack(packs, groups)
        return _pack({**c, **writes(c, {})}, groups, c)

    def step_rows(c: dict):
        """The rows that may step attempt one: (the new state, the step as a segment: y, y1,
        h, t, t1, stages, and the rows that accepted it)."""
        t, y = c["t"], c["y"]
        f0 = stepper0.rhs.call(t, y) if spec.k1_in_step else c["f0"]
        stepper = _fork(stepper0, f0=f0, ks=None)
        ctl = _fork(ctl0, **extra, **{n: c["hist_" + n] for n in names})
        step = BatchStep(stepper, ctl, spec.max_num_steps, fused=True,
                         ends=not spec.k1_in_step)
        status, i_w, i_out = c["status"], c["i_w"], c["i_out"]
        h, k_grid = c["h"], c["k_grid"]
        backlog = i_w < i_out
        go = (status == _RUNNING) & ~backlog
        none = torch.zeros_like(status)
        stop = t_end
        if jumps is not None:  # the next output time strictly inside: a step ends there
            inside = c["i_stop"] < T - 1
            stop = torch.where(inside, ts.gather(1, c["i_stop"].clamp(max=T - 1)[:, None])[:, 0],
                               t_end)
        if adaptive:
            t1, hh, status, _, _ = step.propose(t, h, t_end, dirn, go, status, c["n_att"],
                                                ctl.nonfinite, none, none[0], none[0], stop)
            go = (status == _RUNNING) & ~backlog
        else:
            t1 = ctl.point(k_grid + 1)
            go = go & (k_grid < ctl.n)
            hh = t1 - t
        t_old, y_old = t, y
        (y1, hm, t1m, _, accept, t, y, h, status, _, n_att, n_acc, n_rej, i_out,
         k_grid) = step.attempt(t, y, h, hh, t1, t_end, dirn, key, go, status, c["n_att"],
                                c["n_acc"], c["n_rej"], i_out, k_grid)
        new = {"it_step": c["it_step"] + go.any(), "t": t, "y": y,
               "h": h, "n_att": n_att, "n_acc": n_acc, "n_rej": n_rej, "k_grid": k_grid}
        stages = stepper.stages()
        if stiff0 is not None:
            # the explicit methods' stiffness test (eager: every CHECK_EVERY attempts of the
            # batch and at each while a row is suspect), here on the step count
            due = (new["it_step"] % CHECK_EVERY == 0) | (c["stiff"] > 0).any()
            test = _fork(stiff0, stiff=c["stiff"], calm=c["calm"])
            ratio, fire, remaining = test._update(stages, t, hm, t_end, accept & due)
            new["stiff"], new["calm"] = test.stiff, test.calm
            fire = fire & due & (status == _RUNNING)
            status = torch.where(fire, _STIFF, status)
            for k, v in zip(("stiff_t", "stiff_h", "stiff_ratio", "stiff_remaining"),
                            (t, hm, ratio, remaining)):
                new[k] = torch.where(fire, v, c[k])
        # (the stages: as evaluated where they are written at once, else the stacked ones)
        ks = stepper.ks[:stepper0.s_ext] if spec.out.direct else stages.unbind(0)
        seg = (y_old, y1, hm, t_old, t1m, *ks)
        if not spec.k1_in_step:
            stepper.advance(accept=accept)
            new["f0"] = stepper.f0
        if jumps is not None:
            # a row that stepped onto its next stop jumps there (y <- keep y + J), and its
            # f (the next step's first stage) is evaluated at the new state
            J, keep_mask = jumps
            landed = accept & inside & (t == stop)
            rows = torch.arange(J.shape[1], device=J.device)
            jumped = torch.where(landed[:, None],
                                 keep_mask * y + J[c["i_stop"].clamp(max=T - 1), rows], y)
            new["y"] = jumped
            new["i_stop"] = c["i_stop"] + landed
            new["jump_evals"] = c["jump_evals"] + landed.any()
            new["f0"] = torch.cond(landed.any(), refresh_f, same_f,
                                   (landed, t, jumped, new["f0"]))
        new.update(status=status, i_out=i_out)
        new.update({"hist_" + n: getattr(ctl, n) for n in names})
        if jumps is not None and adaptive:  # the next step's |y| in the norm: the new state's
            new["hist_absy"] = torch.where(landed[:, None], jumped.abs(), new["hist_absy"])
        return new, seg, accept

    def attempt_new(c: dict) -> dict:
        """``step_rows``, the accepted step kept as the rows' segment (carried: their
        outputs are written from it in this and later iterations): the new state."""
        new, seg, accept = step_rows(c)
        if spec.out.skip_idle:  # (the attempts: else every iteration's)
            new["evals"] = c["evals"] + 1
        for k, v in zip(SEGMENT, seg):
            new["seg_" + k] = torch.where(accept.view(-1, *[1] * (v.dim() - 1)), v,
                                          c["seg_" + k])
        return writes(c, new)

    def attempt(*packs):  # (a branch of torch.cond)
        c = _unpack(packs, groups)
        return _pack({**c, **attempt_new(c)}, groups, c)

    def body_final(*packs):  # (no outputs written in the loop)
        c = _unpack(packs, groups)
        new, _, _ = step_rows(c)
        return _pack({**c, **writes(c, new)}, groups, c)

    def body(out, *packs):
        c = _unpack(packs, groups)
        i_w = c["i_w"]
        write_fn = write_carried
        if spec.out.direct:  # the step's outputs, from the step itself
            new, seg, _ = step_rows(c)
            new = writes(c, new)
            old, packs = packs, _pack({**c, **new}, groups, c)
            write_fn, operands = write_direct, (*packs, *old, seg[1], seg[2], seg[4], *seg[6:])
        elif spec.out.skip_idle:
            go = (c["status"] == _RUNNING) & (i_w >= c["i_out"])
            operands = packs = torch.cond(go.any(), attempt, idle, packs)
            new = {"i_w": _unpack(packs, groups)["i_w"]}
        else:
            new = attempt_new(c)
            operands = packs = _pack({**c, **new}, groups, c)
        # one window of output writes per row (from the old i_w), in the iterations that
        # have any
        if spec.out.write_always:
            out = write_fn(out, i_w, *operands)
        else:
            out = torch.cond((new["i_w"] > i_w).any(), write_fn, keep,
                             (out, i_w.clone(), *operands))
        return (out, *packs)

    if final_only:
        c = _unpack(while_loop(cond, body_final, carry), groups, RESULT)
        # (a row that did not get there: its output is masked by the caller)
        return torch.stack([carry_y0, c["y"]]), {**c, "summary": _summary(c, T)}
    res = while_loop(cond, body, carry)
    if not one_call:  # (the state goes on to the next call)
        return res
    c = _unpack(res[1:], groups, RESULT)
    return res[0][:T], {**c, "summary": _summary(c, T)}


def _summary(c: dict, T: int) -> torch.Tensor:
    """(iterations, iterations that evaluated f, evaluations after jumps, every row reached
    its last output) of the final state ``c``: read on the host at once."""
    zero = torch.zeros_like(c["it"])
    return torch.stack([c["it"], c.get("evals", c["it"]), c.get("jump_evals", zero),
                        (c["i_out"] == T).all().long()])


def _calls(loop, spec: _Spec, ts, tol, y0, f0, state: dict | None, jumps):
    """Run the compiled ``loop`` until the solve ends: one call when its output buffer
    holds every output, else one call per chunk of outputs (each starting at the first
    output a row has not written), each chunk copied into the result. ``state``: the
    starting state, None where the graph builds it (one call). Returns (outputs (T, B, n),
    the final state)."""
    T, C, groups = spec.T, spec.out.chunk, spec.groups
    if state is None:  # (one call)
        return loop(spec, ts, tol, 0, (y0,) if spec.f0_in_graph else (y0, f0), jumps)
    carry = _pack(state, groups, state)
    ys = y0.new_zeros(T, *y0.shape)
    ys[0] = y0
    base, i_w = 1, state["i_w"]
    while True:
        res = loop(spec, ts, tol, torch.tensor(base, device=ts.device),
                   (y0.new_zeros(C + 1, *y0.shape), *carry), jumps)
        carry, c = res[1:], _unpack(res[1:], groups, RESULT)
        m = min(C, T - base)
        pos = torch.arange(base, base + m, device=ts.device)[:, None]
        wrote = (pos >= i_w) & (pos < c["i_w"])  # (m, B): the outputs this call wrote
        ys[base:base + m] = torch.where(wrote[..., None], res[0][:m], ys[base:base + m])
        i_w = c["i_w"]
        pending = (c["status"] == _RUNNING) | (i_w < c["i_out"])
        if not bool(pending.any()):
            return ys, {**c, "summary": _summary(c, T)}
        # every row that goes on is at or past this chunk's end (else the loop went on)
        nxt = int(i_w[pending].min())
        if nxt < base + C:
            raise RuntimeError(f"compiled solve: no progress past output {nxt} (internal error)")
        base = nxt


def integrate_compiled(rhs, y0: torch.Tensor, ts: torch.Tensor, stepper, controller, *,
                       max_num_steps: int, throw: bool = True, name: str = "",
                       backend: str = "inductor", stiffness: StiffnessCheck | None = None,
                       tolerances: tuple | None = None, info: dict | None = None,
                       jumps: tuple | None = None, outputs: bool = True,
                       settings_key: tuple | None = None
                       ) -> tuple[BatchedResult, list[str]]:
    """``integrate_batched`` (the same arguments and result) as one compiled graph.

    ``tolerances``: (rtol, atol) floats, handed to the graph as tensors (changing them does
    not recompile); None where the norm has per-element tolerance tensors. ``info``: a dict
    that receives "compile_s" (seconds of the call when it compiled, 0.0 when the loop was
    already compiled), "compiles" (the compilations it triggered) and "iterations" (of the
    compiled loop). ``jumps``: (J (T, B, n), keep (n,)): every row steps exactly onto its
    output times strictly between the first and the last, and there its state jumps,
    y <- keep * y + J[i] (the output written there is the state before the jump); the
    adjoint's backward solve resets y and adds the loss's gradient to the adjoint this way
    (``gradients.adjoint``). ``outputs`` False: the caller reads the final state only,
    and the result's ys holds y0 and the final state (2, B, n) (that solve's loop writes
    no outputs). ``settings_key``: a hashable key that fixes the stepper's, the controller's
    and the stiffness check's settings besides this solve's shapes (the method and its
    given options: ``problem.checked_options``), or None."""
    B, T = ts.shape
    n = y0.shape[1]
    device = y0.device
    if T == 1:
        z = torch.zeros(B, dtype=torch.long, device=device)
        return BatchedResult(y0[None], torch.full_like(z, CODE[SUCCESS]), ts[:, 0].clone(),
                             y0, z, z.clone(), torch.ones_like(z),
                             torch.zeros(B, dtype=torch.float64, device=device)), [""] * B
    nfe0, rows0 = rhs.stats.nfe, rhs.stats.batch_rows
    # no output time strictly inside: nothing jumps (the loop then writes no outputs either)
    jumping = jumps is not None
    if T == 2:
        jumps = None
    if stiffness is not None and not stiffness.active:
        stiffness = None
    func = getattr(rhs, "func", None)
    func = getattr(func, "__wrapped__", func)  # (one problem: the user's, not its batch form)
    # the solves of one structure share a plan: the key holds what fixes it (the settings
    # through ``settings_key``; a solve without one gets a plan of its own)
    pkey = None if settings_key is None else (
        settings_key, B, n, T, y0.dtype, device, stepper.tab, type(controller), outputs,
        stiffness is not None, tolerances is None, jumps is not None,
        getattr(func, "__code__", type(func)), max_num_steps, torch.is_grad_enabled())
    plan = _PLANS.get(pkey) if pkey is not None else None
    if plan is not None:
        _PLANS.move_to_end(pkey)
    layout = plan.spec.out if plan is not None else _Outputs(T, B, n, stepper.s_ext, outputs)
    # one call without autograd: f(t0, y0) is evaluated in the graph (``_loop``), else here
    # (before the calls, or to see whether autograd would need the graph: refused)
    f0_in_graph = layout.one_call and not torch.is_grad_enabled()
    if f0_in_graph:
        f0 = y0  # (its place in the carried state: only its shape and dtype are read)
    else:
        f0 = rhs.call(ts[:, 0].clone(), y0)
        if torch.is_grad_enabled() and (y0.requires_grad or f0.requires_grad):
            raise BackpropRefused(BACKPROP_REFUSED.format(name=name))
    if plan is None:
        plan = _Plan(rhs, y0, ts, f0, stepper, controller, stiffness, layout, max_num_steps,
                     f0_in_graph, jumps is not None, tolerances is not None, func)
        if pkey is not None:
            lru_get(_PLANS, pkey, lambda: plan, MAX_LOOPS)
    spec = plan.spec_for(rhs, controller, stiffness)
    tol = None
    if tolerances is not None:
        tol = tuple(_scalar_tensor(float(v), device) for v in tolerances)
    # a solve in one call builds its starting state in the graph (its dozens of small
    # tensors would each cost an eager operation here); the carried state's layout is fixed
    # per structure, found once from a state built here
    state = None
    if layout.one_call:
        structure = plan.structure
    else:
        state = plan.start_state(spec, controller, ts, y0, f0, jumps is not None)
        spec.groups = groups = _groups(state)
        structure = plan.structure + (groups,)
    fkey = (_loop, backend, structure)
    loop = None
    if fkey not in FAILED:
        small = B <= POINTWISE_CAT_ROWS and B * n <= PACK_ELEMENTS
        loop = compiled_function(_loop, backend, structure, POINTWISE_CAT if small else None,
                                 fixed=lambda: _fixed_sources(spec))
    run = Lane(loop, fkey, spec, controller, stiffness, name, max_num_steps, tolerances)
    got = run.attempt(ts, tol, y0, f0, state, jumps)
    if got is None and jumping:  # (the eager driver has no jumps: the caller's)
        raise CompileFailure(FAILED[fkey])
    if got is None:
        # what torch.compile cannot capture (in func, most often): the eager driver, announced
        warnings.warn(f"{name}: the compiled solve could not compile this problem "
                      f"({FAILED[fkey]}); it was solved eagerly instead (the same steps and "
                      f"results)", CompileFallbackWarning, stacklevel=2)
        rhs.stats.nfe, rhs.stats.batch_rows = nfe0, rows0
        if info is not None:
            info.update(compile_s=0.0, compiles=0, iterations=0, fallback=FAILED[fkey])
        return integrate_batched(rhs, y0, ts, stepper, _on_times(controller, ts),
                                 max_num_steps=max_num_steps, throw=throw, name=name,
                                 stiffness=stiffness)
    res, wall, compiles = got
    result, msgs, iterations = run.finish(res, ts, rhs.stats, throw)
    if info is not None:
        info.update(compile_s=wall if compiles else 0.0, compiles=compiles,
                    iterations=iterations)
        # a solve in one call that built its start state in the graph: its later solves
        # can call the loop again as it is (``neuralode.compiled.CompiledSolver``)
        if state is None and spec.f0_in_graph and not jumping and tolerances is not None:
            info["lane"] = run
    return result, msgs


class Lane:
    """A structure's compiled loop with one solve's templates (``spec``: its stepper holds
    that solve's right-hand side): ``attempt`` runs the loop, ``finish`` turns what it
    carried out into the result. ``integrate_compiled`` makes one per solve; one of a solve
    in one call that built its start state in the graph runs again for a later solve of the
    same right-hand side and kind, from that solve's times, tolerances and y0 (``rerun``)."""

    def __init__(self, loop, fkey: tuple, spec: _Spec, controller, stiffness, name: str,
                 max_num_steps: int, tolerances: tuple | None):
        self.loop, self.fkey, self.spec = loop, fkey, spec
        self.controller, self.stiffness = controller, stiffness
        self.name, self.max_num_steps = name, max_num_steps
        self.tolerances = tolerances  # (rtol, atol) floats of the solve it was made for

    def attempt(self, ts, tol, y0, f0, state, jumps) -> tuple | None:
        """Call the compiled loop: ((outputs, final state), seconds, compilations), or None
        where torch.compile could not capture it (``FAILED`` says why, and the structure is
        not traced again)."""
        if self.fkey in FAILED:
            return None
        before, start = len(COMPILES), time.perf_counter()
        loop, spec, controller = self.loop, self.spec, self.controller
        rhs = spec.stepper.rhs
        rhs.counting = False  # (the evaluations are counted from the iterations)
        try:
            if controller.adaptive and state is not None:  # the first step before the calls
                _first_step(spec, state, tol, _clock(ts)[0])
            res = traced(loop, lambda: _calls(loop, spec, ts, tol, y0, f0, state, jumps))
        except (torch._dynamo.exc.TorchDynamoException,
                torch._dynamo.exc.FailOnRecompileLimitHit) as e:
            FAILED[self.fkey] = " ".join(str(e).split())[:400]
            return None
        finally:
            rhs.counting = True
        new = len(COMPILES) - before
        again = recompiled(self.fkey, loop, new)
        if again:  # (this solve's result stands; the structure's later solves run eagerly)
            warnings.warn(f"{self.name}: the compiled solve: {again}; this problem's later "
                          f"solves run eagerly", CompileFallbackWarning, stacklevel=3)
        return res, time.perf_counter() - start, new

    def finish(self, res, ts, stats, throw: bool, event_t: bool = True
               ) -> tuple[BatchedResult, list[str], int]:
        """The result, the messages and the loop's iterations, from what the loop gave;
        the evaluations of f counted into ``stats``. ``event_t``: the result has the rows'
        event times (NaN: the compiled solve has no events; a per-sample solution shows
        them), else None."""
        spec, controller, stiffness = self.spec, self.controller, self.stiffness
        out, c = res
        status, i_out = c["status"], c["i_out"]
        B, T, device = status.shape[0], ts.shape[1], status.device
        # (attempts: the iterations that evaluated f)
        iterations, attempts, calls_after_jumps, reached = c["summary"].tolist()
        stepper = spec.stepper
        calls = stepper.s - 1 + (0 if stepper.fsal else 1)
        # Hairer's estimate, and f(t0, y0) where the graph evaluated it
        first_calls = int(controller.adaptive and controller.first is None) + \
            int(spec.f0_in_graph and not spec.k1_in_step)
        evaluations = calls_after_jumps + attempts * calls + first_calls
        stats.nfe += evaluations
        stats.batch_rows += evaluations * B
        ys = out
        if not reached:  # (the outputs a row did not reach: NaN)
            # (the output times out's rows stand for: every one, or y0's and the last)
            idx = torch.arange(T, device=device) if len(out) == T else \
                torch.tensor([0, T - 1], device=device)
            mask = idx[:, None] < i_out[None, :]
            ys = torch.where(mask[:, :, None], out, math.nan)
        result = BatchedResult(ys, status, c["t"], c["y"], c["n_acc"], c["n_rej"], i_out,
                               c["h"], torch.full((B,), math.nan, dtype=torch.float64,
                                                  device=device) if event_t else None)
        stiff_at = {}
        if stiffness is not None:
            for b in [b for b, code in enumerate(status.tolist()) if code == _STIFF]:
                stiff_at[b] = (float(c["stiff_t"][b]), float(c["stiff_h"][b]),
                               float(c["stiff_ratio"][b]), stiffness.boundary,
                               float(c["stiff_remaining"][b]))
        msgs = _messages(result, self.name, self.max_num_steps, ts, stiff_at,
                         controller.adaptive)
        if throw:
            raise_failures(result, msgs)
        return result, msgs, iterations

    def rerun(self, ts, y0, stats, throw: bool) -> tuple[BatchedResult, list[str]] | None:
        """The solve of y0 (its rows' times ``ts``) with this lane's loop, templates and
        tolerances, its evaluations and compile time in ``stats``; None where the loop now
        fails (solve it the first way: that says why). (For one problem's solution: the
        result has no event times.)"""
        assert self.tolerances is not None  # (only such lanes are offered: ``info["lane"]``)
        tol = tuple(_scalar_tensor(float(v), y0.device) for v in self.tolerances)
        got = self.attempt(ts, tol, y0, y0, None, None)
        if got is None:
            return None
        res, wall, compiles = got
        result, msgs, _ = self.finish(res, ts, stats, throw, event_t=False)
        stats.compile_s, stats.n_compiles = (wall if compiles else 0.0), compiles
        return result, msgs


__all__ = ["COMPILES", "FAILED", "BackpropRefused", "CompileFailure", "CompileFallbackWarning",
           "Lane", "compiled_function", "integrate_compiled", "lru_get", "recompiled",
           "tracing_autograd"]
