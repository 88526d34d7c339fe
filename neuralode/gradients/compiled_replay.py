"""The compiled backward pass of a checkpointed solve: ``Checkpoint(compile=True)``, or
``gradient="checkpoint"`` with ``options={"compile": True}``.

The forward solve runs eagerly and keeps every accepted step's start state and first stage
(``gradients.checkpoint`` without a budget). The backward pass is one compiled
``while_loop`` over the recorded steps, last to first: each iteration redoes one step as a
pure function of (y, f(t, y), parameters) (``rk.graph_step``, the formulas of the eager
step) and pulls the adjoints through it with ``torch.func.vjp``: the vector-Jacobian
products of the eager replay's autograd pass, without a Python-level graph per step. The
outputs' gradients enter as per-step cotangents, formed before the loop: an output at a
step's end adds its gradient to y1's; an output inside a step, the interpolant
y + h sum_s w_s k_s (linear in y and the stages), adds its gradient g to y's and
h w_s g to stage s's (the chord y + theta (y1 - y): (1 - theta) g to y's, theta g to y1's).

Served: one problem solved by an explicit Runge–Kutta method (adaptive or on a fixed grid),
``func`` an ``nn.Module`` owning every parameter it is differentiated by, a real float32 or
float64 state (tensor or tuple), every output and event state. Otherwise (a checkpoint
budget, steps that end at a discontinuity of ``jump_t``, ``perturb``, complex or
half-precision states, other methods, per sample) the eager replay runs, announced by a
``CompileFallbackWarning``.

Compilation: once per structure (method, state size and dtype, number of outputs, the
module and its parameters' names, the step buffer's capacity: the number of steps rounded
up to a power of two, so a solve that takes a few more steps does not recompile). The step
states are copied into that buffer for the backward pass: it holds up to twice the states
the forward solve kept, for the duration of the backward pass.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict

import torch
from torch._higher_order_ops import while_loop

from neuralode.parameters import functional_flat, module_names
from neuralode.solvers.compiled import (
    COMPILES,
    FAILED,
    CompileFallbackWarning,
    compiled_function,
    lru_get,
    recompiled,
    tracing_autograd,
)
from neuralode.solvers.rk import RKStepper, _tensor_coefficients, dense_weights, graph_step
from neuralode.solvers.timekeeping import time_dtype


def fallback_reasons(tape, stepper) -> list[str]:
    """Why the compiled backward pass cannot serve this recorded solve (empty: it can)."""
    rhs = tape.rhs
    checks = (
        ("a checkpoint budget (the compiled pass keeps every step's state)",
         tape.budget is not None),
        ("a method other than an explicit Runge-Kutta one", type(stepper) is not RKStepper),
        ("func is not an nn.Module owning every parameter",
         module_names(rhs.func, tape.params) is None),
        ("perturb", tape.perturb),
        ("a complex or half-precision state",
         rhs.layout.complex_dtype is not None or rhs.user_dtype != rhs.dtype),
        ("steps ending at a discontinuity (jump_t)",
         any(r.left or r.toward or r.decision is not None for r in tape.steps)),
    )
    return [why for why, bad in checks if bad]


def warn_fallback(reasons: list[str], stacklevel: int = 4) -> None:
    warnings.warn(f"gradient='checkpoint': the compiled backward pass cannot serve this solve "
                  f"({'; '.join(reasons)}); its steps are replayed eagerly",
                  CompileFallbackWarning, stacklevel=stacklevel)


# (id(func), structure) -> the step as a function of (y, f0, t, t1, h, params); each entry
# keeps its func alive through its closure (so its id is not reused), at most MAX_STEPS
_STEPS: OrderedDict = OrderedDict()
MAX_STEPS = 64


def _step_function(func, names, params, layout, stepper: RKStepper, dtype):
    key = (id(func), names, tuple(id(p) for p in params), tuple(map(tuple, layout.shapes)),
           layout.is_tuple, stepper.tab.name, dtype)
    return lru_get(_STEPS, key, lambda: _make_step(func, names, layout, stepper, dtype),
                   MAX_STEPS)


def _make_step(func, names, layout, st: RKStepper, dtype):
    s_ext = st.s_ext
    f_flat = functional_flat(func, names, layout)

    def step(y, f0, t, t1, h, ps):
        def call(ti, yi):
            return f_flat(ti.to(dtype), yi, ps)
        y1, ks = graph_step(st, y, f0, t, h, call)
        if not st.fsal:  # f(t1, y1): the next step's first stage and the extended stage
            ks = ks + [call(t1, y1)]
        return y1, torch.stack(ks[:s_ext])
    return step


def _sweep(step, Y, F, T, T1, H, slot, G1, GY, GK, n_steps, a_y, a_f, params):
    """The reverse sweep: steps n_steps - 1 .. 0, adjoints of (y, f0, parameters)."""
    s_ext = GK.shape[1]
    last_stage = (torch.arange(s_ext, device=Y.device) == s_ext - 1).to(Y.dtype)[:, None]

    def cond(k, a_y, a_f, *gp):
        return k >= 0

    def body(k, a_y, a_f, *gp):
        # (rows by index_select: an index read from a tensor has no value at trace time)
        i = k.reshape(1)
        r = slot.index_select(0, i)
        t, t1, h = T.index_select(0, i)[0], T1.index_select(0, i)[0], H.index_select(0, i)[0]
        _, vjp = torch.func.vjp(lambda y, f0, *ps: step(y, f0, t, t1, h, ps),
                                Y.index_select(0, i)[0], F.index_select(0, i)[0], *params)
        dy, df, *dps = vjp((a_y + G1.index_select(0, r)[0],
                            GK.index_select(0, r)[0] + last_stage * a_f))
        # (df can be a view of the cotangent stack: while_loop's outputs may not alias)
        return (k - 1, dy + GY.index_select(0, r)[0], df.clone(),
                *(g + d for g, d in zip(gp, dps)))

    gp0 = tuple(torch.zeros_like(p) for p in params)
    out = while_loop(cond, body, (n_steps - 1, a_y, a_f, *gp0))
    return out[1], out[2], tuple(out[3:])


def reverse_compiled(tape, y0: torch.Tensor, grads: list, last: int, backend):
    """The adjoints (of y0, of each parameter) of the outputs' gradients ``grads`` through
    steps 0..last, or None (with a ``CompileFallbackWarning``) when torch.compile cannot
    capture the sweep: the caller replays eagerly."""
    steps = tape.steps[:last + 1]
    N = len(steps)
    st: RKStepper = tape.make_stepper()
    rhs, params = tape.rhs, tuple(tape.params)
    func = rhs.func
    names = module_names(func, params)
    n, dtype, device = y0.numel(), y0.dtype, y0.device
    cap = max(16, 1 << (N - 1).bit_length())
    Y = y0.new_zeros(cap, n)
    F = y0.new_zeros(cap, n)
    Y[0] = y0.detach().reshape(-1)
    F[0] = tape.carry0[0][0]
    if N > 1:
        Y[1:N] = torch.stack([tape.states[k][0] for k in range(N - 1)])
        F[1:N] = torch.stack([tape.states[k][1][0][0] for k in range(N - 1)])
    times = torch.zeros(3, cap, dtype=torch.float64)
    times[0, :N] = torch.tensor([r.t for r in steps], dtype=torch.float64)
    times[1, :N] = torch.tensor([r.t1 for r in steps], dtype=torch.float64)
    times[2, :N] = times[1, :N] - times[0, :N]  # h = t1 - t, as the eager replay's
    # (three tensors, not views of one: a compiled loop's inputs may not alias; in the time
    # dtype of the device: float64 where it has it)
    T, T1, H = (v.to(device, time_dtype(device), copy=True) for v in times.unbind(0))
    # the outputs' cotangents, per step that has outputs (row M: none)
    M = len(grads)
    slot = torch.full((cap,), M, dtype=torch.long)
    G1, GY = y0.new_zeros(M + 1, n), y0.new_zeros(M + 1, n)
    GK = y0.new_zeros(M + 1, st.s_ext, n)
    dense_t = _tensor_coefficients(st.tab, dtype, device)[3]
    row = 0
    for k, rec in enumerate(steps):
        outs = [(grads[i], th) for i, th in rec.outs if grads[i] is not None]
        if not outs:
            continue
        slot[k] = row
        h = rec.t1 - rec.t
        for g, th in outs:
            g = g.reshape(-1)
            if th is None:
                G1[row] += g
            elif st.linear:
                G1[row].add_(g, alpha=th)
                GY[row].add_(g, alpha=1.0 - th)
            else:
                w = dense_weights(dense_t, [th], st.degree, dtype)[0]
                GK[row].add_(w[:, None] * g, alpha=h)
                GY[row] += g
        row += 1
    step = _step_function(func, names, params, rhs.layout, st, dtype)
    structure = (cap, n, M, dtype, str(device), st.tab.name, st.linear, names,
                 tuple(tuple(p.shape) for p in params), getattr(func, "__code__", type(func)))
    backend = backend if isinstance(backend, str) else "inductor"
    key = (_sweep, backend, structure)
    reason = FAILED.get(key, "")
    if not reason:
        sweep = compiled_function(_sweep, backend, structure)
        before, start = len(COMPILES), time.perf_counter()
        try:
            with tracing_autograd(), torch.no_grad():
                a_y, a_f, g_par = sweep(step, Y, F, T, T1, H, slot.to(device), G1, GY, GK,
                                        torch.tensor(N, device=device), y0.new_zeros(n),
                                        y0.new_zeros(n), params)
            reason = ""
        except Exception as e:  # (dynamo's internal errors are not all of its own exception
            # class; an error of func itself shows again in the eager replay)
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            FAILED[key] = reason
        again = "" if reason else recompiled(key, sweep, len(COMPILES) - before)
        if again:  # (this pass's gradients stand)
            warnings.warn(f"gradient='checkpoint': the compiled backward pass: {again}; later "
                          f"passes replay their steps eagerly", CompileFallbackWarning,
                          stacklevel=4)
    if reason:
        warnings.warn(f"gradient='checkpoint': the compiled backward pass could not be "
                      f"compiled ({reason}); its steps are replayed eagerly",
                      CompileFallbackWarning, stacklevel=4)
        return None
    stats = tape.stats
    stats.compiled = True
    new = COMPILES[before:]
    stats.compile_s, stats.n_compiles = (time.perf_counter() - start if new else 0.0), len(new)
    rhs.stats.nfe += N * (st.s - 1 + (0 if st.fsal else 1))
    stats.replayed += N
    stats.from_start += 1
    # the first stage f(t0, y0) of step 0, eagerly (as the eager replay from y0 makes it)
    with torch.enable_grad():
        y_in = y0.detach().reshape(-1).requires_grad_(True)
        f0 = rhs.call(tape.t0, y_in)
        got = torch.autograd.grad(f0, [y_in, *params], a_f, allow_unused=True)
    a_y = a_y + got[0] if got[0] is not None else a_y
    g_par = [g if d is None else g + d for g, d in zip(g_par, got[1:])]
    return a_y.view_as(y0), g_par
