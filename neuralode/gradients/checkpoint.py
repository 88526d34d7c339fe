"""Checkpointed differentiation of a solve: the exact gradient of what the solver computed
(as backpropagation through it) in memory that does not grow with the number of steps.

The forward solve runs without a graph, on the one integration loop, through a
``_Recorder`` (a stand-in for the stepper that records, per accepted step, its start and end
times, whether the step ended at a discontinuity, whether the history was restarted after it
and how the next step's first derivative was obtained; with no budget also each step's start
state and the stepper's carried state, ``stepper.carry()``; for a step preceded by rejected
attempts, the plain part of ``carry()`` just before its accepted attempt, as rejected
attempts may change it (a Jacobian evaluated there, Newton matrices, the order asked for);
and the stepper's ``decision()`` at acceptance where it has one, e.g. the next order a
multistep controller chose, redone with ``redo_decision``). The backward pass redoes steps
from there through the stepper interface (``resume``/``step``/``advance``): each step once
more with autograd, and backpropagates through it alone (one step's graph in memory at a
time). Accepted step sizes are constants of the graph, as in backpropagation through the
solver: the error control decided them, it is not differentiated.

With a ``budget`` (a number of checkpoints), nothing but the initial state is kept by the
forward pass; the backward pass reverses the recorded steps by binomial checkpointing
(Griewank 1992; Griewank & Walther 2000, "revolve"): with s free checkpoints, reversing l
steps takes the minimal number of recomputed steps,
    r l - C(s + r + 1, r - 1),   r the least integer with C(s + 1 + r, s + 1) >= l
(the initial state held besides the s checkpoints), at most ``budget`` states alive at once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from neuralode.errors import ODEInputError
from neuralode.gradients.backprop import SolverGradient
from neuralode.gradients.compiled_replay import fallback_reasons, reverse_compiled, warn_fallback
from neuralode.parameters import as_tensors, find_params
from neuralode.solvers.base import RHS, SolverStats
from neuralode.solvers.loop import EVENT, SUCCESS, LoopResult, integrate


@dataclass(frozen=True)
class Checkpoint(SolverGradient):
    """Checkpointed backprop (see the module doc).

    budget: None keeps every accepted step's start state (backward: each step redone once);
        an int k >= 1 keeps at most k states at a time (binomial schedule, more steps
        redone; the recomputation factor is in ``stats.extra["checkpoint"]``).
    params: the tensors to differentiate besides y0 and t; default: an nn.Module's
        parameters (as ``odeint_adjoint``), for any other callable the leaf tensors its
        graph reaches in one evaluation at the start (tensors a closure uses).
    compile: True (or a torch.compile backend name): the backward pass as one compiled loop
        over the recorded steps (``gradients.compiled_replay``; the forward solve stays
        eager); ``options={"compile": True}`` with gradient="checkpoint" asks for the same.
    Per sample, each sample is solved alone (the float clock)."""

    budget: int | None = None
    params: Any = None
    compile: bool | str = False
    name = "checkpoint"

    def __post_init__(self):
        c = self.compile
        if not isinstance(c, (bool, str)):
            raise ODEInputError(f"Checkpoint compile must be True, False or a torch.compile "
                                f"backend name (e.g. 'inductor'), got {c!r}")
        b = self.budget
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ODEInputError(f"Checkpoint budget must be None (keep every step) or an int >= 1 "
                                f"(checkpoints kept at once), got {b!r}")
        if self.params is not None:
            object.__setattr__(self, "params", as_tensors(self.params, "Checkpoint params"))

    def integrator(self):
        return functools.partial(integrate_checkpointed, self)

    def solve(self, func, y0, t, *, per_sample: bool = False, **kwargs):
        if per_sample and self.compile:  # (each sample alone, through a wrapper of func)
            warn_fallback(["per sample"], stacklevel=5)
            return replace(self, compile=False).solve(func, y0, t, per_sample=True, **kwargs)
        return super().solve(func, y0, t, per_sample=per_sample, **kwargs)

    def bind_params(self, func, probe) -> Checkpoint:
        if self.params is not None:
            return self
        return replace(self, params=find_params(func, None, probe=probe,
                                                who="gradient='checkpoint'",
                                                arg="Checkpoint params"))


@dataclass
class CheckpointStats:
    """What the backward pass of a checkpointed solve did (``SolverStats.extra
    ["checkpoint"]``, filled in by ``.backward()``).

    steps: accepted steps of the forward solve; recomputed: steps redone without a graph to
    rebuild states (0 without a budget); replayed: steps redone with autograd (each step
    once, up to the last one an output with a gradient depends on); max_stored: the most
    step states kept at once (without a budget: every step's); from_start: replays that
    began at the initial state (each evaluates f(t0, y0) once); nfe: evaluations of f in the
    backward pass; recompute_factor: (steps + recomputed + replayed) / steps, step
    computations relative to backpropagation's one (unbounded: 2). compiled: the backward
    pass ran as one compiled loop (``Checkpoint(compile=True)``); compile_s, n_compiles: the
    seconds and compilations of that call (0 when the compiled loop was reused)."""

    budget: int | None = None
    steps: int = 0
    recomputed: int = 0
    replayed: int = 0
    max_stored: int = 0
    from_start: int = 0
    nfe: int = 0
    compiled: bool = False
    compile_s: float = 0.0
    n_compiles: int = 0

    @property
    def recompute_factor(self) -> float:
        return (self.steps + self.recomputed + self.replayed) / max(self.steps, 1)


# -- the binomial schedule -----------------------------------------------------------------
def _beta(s: int, r: int) -> int:
    return math.comb(s + r, s) if r >= 0 else 0


def _repetitions(steps: int, snaps: int) -> int:
    r = 0
    while _beta(snaps, r) < steps:
        r += 1
    return r


def binomial_cost(steps: int, free: int) -> int:
    """Minimal number of steps recomputed (without a graph) to reverse ``steps`` steps from a
    held initial state with ``free`` further checkpoints (Griewank's formula, with the
    initial state as one of his s + 1 snapshots)."""
    if steps <= 1:
        return 0
    if free == 0:
        return steps * (steps - 1) // 2
    s = free + 1
    r = _repetitions(steps, s)
    return r * steps - _beta(s + 1, r - 1)


def binomial_split(steps: int, free: int) -> int:
    """Where to put the first checkpoint (steps from the start) so that the total
    recomputation is ``binomial_cost``: the least m with m >= C(s + r - 2, s) and
    steps - m <= C(s - 1 + r, s - 1) (s = free + 1; checked against the brute-force
    optimum in the tests)."""
    s = free + 1
    r = _repetitions(steps, s)
    return min(steps - 1, max(1, _beta(s, r - 2), steps - _beta(s - 1, r)))


# -- the forward record -----------------------------------------------------------------------
@dataclass
class _Step:
    t: float
    t1: float = math.nan
    left: bool = False          # the step ended at a discontinuity (stage times from the left)
    restart: bool = False       # the stepper's history was restarted after it
    toward: bool = False        # the next first derivative was f at t1 from the right
    advanced: bool = False      # the next step started from it (False: the last step)
    retry: Any = None           # plain carried data before the accepted attempt, when
    #                             rejected attempts at this step changed it (else None)
    decision: Any = None        # the stepper's ``decision()`` at acceptance (e.g. the next
    #                             order a multistep controller chose), redone by the replay
    outs: list = field(default_factory=list)  # (slot, theta or None for y1)


class _Recorder:
    """The stepper, seen by the loop, recording every accepted step (see module doc)."""

    def __init__(self, stepper, keep_states: bool):
        self._inner = stepper
        self.fsal = stepper.fsal
        self.keep = keep_states
        self.steps: list[_Step] = []
        self.states: list[tuple[torch.Tensor, Any]] = []  # start of step k >= 1: (y, carry)
        self._pending: _Step | None = None

    def __getattr__(self, name):  # error(), interpolate(), segment(), order, ...
        return getattr(self._inner, name)

    def start(self, rhs, y0, f0, graph):
        # the arithmetic of backpropagation (out of place), without a graph (no_grad): the
        # same values bit for bit, so the error control takes the same steps
        self._inner.start(rhs, y0, f0, True)
        self.carry0 = self._inner.carry()  # what a pass from y0 without a graph starts from

    def step(self, t, y, h, left_end=None):
        retry = None
        if self._pending is not None and self._pending.t == t:
            # a retry after a rejected attempt, which may have changed the stepper's plain
            # state (a Jacobian evaluated here, Newton matrices, a lower order asked for):
            # the replay restores it before redoing the accepted attempt
            retry = self._inner.carry()[1]
        self._pending = _Step(t, t + h, left=left_end is not None, retry=retry)
        return self._inner.step(t, y, h, left_end)

    def prepare_interp(self, t1_time, y1):
        if isinstance(t1_time, float) and self._pending is not None:
            self._pending.t1 = t1_time
        self._inner.prepare_interp(t1_time, y1)

    def end_derivative(self, t1_time, y1):
        return self._inner.end_derivative(t1_time, y1)

    def restart(self):
        self._pending.restart = True
        self._inner.restart()

    def advance(self, f_next):
        st = self._pending
        st.toward = f_next is not None
        st.advanced = True
        decision = getattr(self._inner, "decision", None)
        st.decision = decision() if callable(decision) else None
        self.steps.append(st)
        self._pending = None
        self._inner.advance(f_next)
        if self.keep:
            self.states.append(None)  # filled by the next step's start state
            self._carry = self._inner.carry()

    def finish(self, n_accepted: int, res: LoopResult) -> None:
        """After the loop: the last accepted step, when it was not followed by another
        (``n_accepted``: the steps this solve accepted)."""
        if self._pending is not None and len(self.steps) < n_accepted:
            st = self._pending
            if res.status == SUCCESS:
                st.t1 = res.t_final  # the end time itself
            self.steps.append(st)
        for k in range(len(self.steps) - 1):
            self.steps[k].t1 = self.steps[k + 1].t
        self._pending = None


class _KeepingRecorder(_Recorder):
    """Also keeps every step's start state and carried state (no budget)."""

    def step(self, t, y, h, left_end=None):
        if self.states and self.states[-1] is None:
            self.states[-1] = (y, self._carry)
        return super().step(t, y, h, left_end)


# -- replaying steps ------------------------------------------------------------------------
class _Tape:
    """Everything the backward pass needs to redo steps of one solve."""

    def __init__(self, rec: _Recorder, make_stepper, rhs: RHS, direction: float, perturb: bool,
                 t0: float, params, budget):
        self.steps = rec.steps
        self.states = [s for s in rec.states if s is not None]
        self.carry0 = rec.carry0
        self.make_stepper = make_stepper
        self.rhs = rhs
        self.direction = direction
        self.perturb = perturb
        self.t0 = t0
        self.params = params
        self.budget = budget
        self.compile: bool | str | None = None  # the compiled backward pass's backend
        self.stats = CheckpointStats(budget=budget, steps=len(rec.steps))

    def run(self, k0: int, k1: int, y, carry, graph: bool, slots: bool):
        """Steps k0..k1-1 from (y, carry) (carry None: the solve's start at y). Returns
        (y, carry after the last step or None when it was not advanced, {slot: state})."""
        rhs, st = self.rhs, self.make_stepper()
        # always the out-of-place arithmetic of backpropagation (``graph`` only says whether
        # autograd records it): recomputed states equal the forward solve's bit for bit
        if carry is None:
            self.stats.from_start += 1
            if self.perturb:
                f0 = rhs.call_at(rhs.toward(self.t0, self.t0 + self.direction), y)
            else:
                f0 = rhs.call(self.t0, y)
            st.start(rhs, y, f0, True)
        else:
            st.resume(rhs, y, carry, True)
        outs = {}
        carry_out = None
        for k in range(k0, k1):
            rec = self.steps[k]
            t, t1 = rec.t, rec.t1
            h = t1 - t
            left_end = rhs.left_limit(t1, t) if rec.left else None
            if rec.retry is not None:
                st.resume(rhs, y, (st.carry()[0], rec.retry), True)
            y1 = st.step(t, y, h, left_end)
            t1_eval = left_end(t1) if left_end is not None else t1
            if slots and rec.outs:
                inner = [(i, th) for i, th in rec.outs if th is not None]
                if inner:
                    st.prepare_interp(t1_eval, y1)
                    for (i, _), v in zip(inner, st.interpolate(y, h, [th for _, th in inner])):
                        outs[i] = v
                for i, th in rec.outs:
                    if th is None:
                        outs[i] = y1
            if not rec.advanced:
                y = y1
                break
            if rec.restart:
                st.restart()
            f_next = rhs.call_at(rhs.toward(t1, t1 + self.direction), y1) if rec.toward else None
            if f_next is None and not st.fsal:
                st.end_derivative(t1_eval, y1)
            if rec.decision is not None:
                st.redo_decision(rec.decision)
            st.advance(f_next)
            y = y1
            carry_out = st.carry() if k == k1 - 1 else None
        return y, carry_out, outs


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(True)


class _Reverser:
    """Reverses the recorded steps, one replayed step at a time, accumulating the adjoint
    of the state (``a_y``), of the carried state (``a_c``) and of the parameters."""

    def __init__(self, tape: _Tape, y0: torch.Tensor, grads: list):
        self.tape = tape
        self.y0 = y0
        self.grads = grads  # per output slot (None: no gradient)
        self.a_y: torch.Tensor | None = None
        self.a_c: list[torch.Tensor | None] | None = None
        self.g_par: list[torch.Tensor | None] = [None] * len(tape.params)
        self.slot_step = {}
        for k, rec in enumerate(tape.steps):
            for i, _ in rec.outs:
                self.slot_step[i] = k
        needed = [self.slot_step[i] for i, g in enumerate(grads) if g is not None
                  and i in self.slot_step]
        self.last = max(needed) if needed else -1

    def backprop_step(self, k: int, y, carry) -> None:
        """Redo step k with autograd from (y, carry) and pull the adjoints through it."""
        tape = self.tape
        rec = tape.steps[k]
        with torch.enable_grad():
            y_in = _leaf(y)
            c_in = None if carry is None else ([_leaf(v) for v in carry[0]], carry[1])
            y1, c1, outs = tape.run(k, k + 1, y_in, c_in, True, True)
            tape.stats.replayed += 1
            ys, cots = [], []
            if rec.advanced and self.a_y is not None:
                ys.append(y1)
                cots.append(self.a_y)
                if self.a_c is not None and c1 is not None:
                    for v, a in zip(c1[0], self.a_c):
                        if a is not None:
                            ys.append(v)
                            cots.append(a)
            for i, v in outs.items():
                g = self.grads[i]
                if g is not None:
                    ys.append(v)
                    cots.append(g)
            keep = [j for j, v in enumerate(ys) if v.requires_grad]
            inputs = [y_in] + (c_in[0] if c_in is not None else []) + list(tape.params)
            if keep:
                # retain_graph: func may reach the parameters through tensors computed
                # outside it, a graph every step shares (this step's graph goes with ys)
                got = torch.autograd.grad([ys[j] for j in keep], inputs,
                                          [cots[j] for j in keep], allow_unused=True,
                                          retain_graph=True)
            else:
                got = (None,) * len(inputs)  # type: ignore[assignment]
        self.a_y = got[0] if got[0] is not None else torch.zeros_like(y)
        n_c = len(c_in[0]) if c_in is not None else 0
        self.a_c = list(got[1:1 + n_c]) if n_c else None
        for j, g in enumerate(got[1 + n_c:]):
            if g is not None:
                prev = self.g_par[j]
                self.g_par[j] = g if prev is None else prev + g

    # -- schedules ----------------------------------------------------------------------
    def reverse_all_kept(self) -> None:
        """No budget: every step's start state was kept by the forward solve."""
        states = self.tape.states
        for k in range(self.last, -1, -1):
            if k == 0:
                self.backprop_step(0, self.y0, None)
            else:
                y, carry = states[k - 1]
                self.backprop_step(k, y, carry)

    def advance(self, k0: int, m: int, y, carry):
        if carry is None:  # from y0: the forward solve's first derivative, no evaluation
            carry = self.tape.carry0
        with torch.no_grad():
            y, carry, _ = self.tape.run(k0, k0 + m, y, carry, False, False)
        self.tape.stats.recomputed += m
        return y, carry

    def reverse(self, k0: int, steps: int, y, carry, free: int, stored: int) -> None:
        """Reverse steps k0..k0+steps-1 from the held state (y, carry) at k0 with ``free``
        further checkpoints (binomial schedule)."""
        stats = self.tape.stats
        while steps > 0:
            if steps == 1:
                self.backprop_step(k0, y, carry)
                return
            if free == 0:
                for j in range(steps - 1, -1, -1):
                    if j == 0:
                        self.backprop_step(k0, y, carry)
                    else:
                        yj, cj = self.advance(k0, j, y, carry)
                        self.backprop_step(k0 + j, yj, cj)
                return
            m = binomial_split(steps, free)
            ym, cm = self.advance(k0, m, y, carry)
            stats.max_stored = max(stats.max_stored, stored + 1)
            self.reverse(k0 + m, steps - m, ym, cm, free - 1, stored + 1)
            del ym, cm
            steps = m


class _CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tape: _Tape, values: list, y0: torch.Tensor, *params):
        ctx.tape = tape
        kept = [y0]
        for y, (tensors, _) in tape.states:
            kept.append(y)
            kept.extend(tensors)
        ctx.save_for_backward(*kept)
        seen = set()
        outs = []
        for v in values:  # distinct tensors (one state can be two outputs)
            outs.append(v.clone() if id(v) in seen else v)
            seen.add(id(v))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError("double backward (create_graph=True, or higher-order gradients) "
                               "through a checkpointed solve is not supported; use "
                               "gradient='backprop' for higher-order gradients")
        tape: _Tape = ctx.tape
        saved = ctx.saved_tensors
        y0 = saved[0]
        # restore the kept states from the saved tensors (so saved-tensor hooks see them)
        pos, states = 1, []
        for _, (tensors, meta) in tape.states:
            y = saved[pos]
            c = list(saved[pos + 1:pos + 1 + len(tensors)])
            pos += 1 + len(tensors)
            states.append((y, (c, meta)))
        tape.states = states
        stats0 = tape.rhs.stats.nfe
        rev = _Reverser(tape, y0, list(grads))
        done = None
        if tape.budget is None:
            tape.stats.max_stored = len(states)
        if rev.last >= 0 and tape.compile is not None:
            done = reverse_compiled(tape, y0, list(grads), rev.last, tape.compile)
        if done is not None:
            rev.a_y, rev.g_par = done
        elif rev.last >= 0:
            if tape.budget is None:
                rev.reverse_all_kept()
            else:
                rev.reverse(0, rev.last + 1, y0, None, tape.budget, 0)
        tape.stats.nfe += tape.rhs.stats.nfe - stats0
        a_y = rev.a_y if rev.a_y is not None else torch.zeros_like(y0)
        g_par = [g if g is not None else torch.zeros_like(p)
                 for g, p in zip(rev.g_par, tape.params)]
        return (None, None, a_y, *g_par)


# -- the entry point ----------------------------------------------------------------------------
def integrate_checkpointed(strategy: Checkpoint, p, y0: torch.Tensor, ts: list[float],
                           stepper, controller, *, perturb: bool, record: bool,
                           **loop_kwargs) -> LoopResult:
    """``loop.integrate`` of the prepared problem ``p`` differentiated by checkpointing (see
    the module doc): the same result, whose output states (``outs[1:]``, ``event_y``,
    ``y_final`` where it is an output) carry the gradient of backpropagation through the
    solver. (``problem.run``'s integrator.)"""
    rhs, func = p.rhs, p.func

    def make_stepper():
        return p.method.make_stepper(p.opts, p.norm)
    if not torch.is_grad_enabled():
        return integrate(rhs, y0, ts, stepper, controller, perturb=perturb, record=record,
                         **loop_kwargs)
    with torch.no_grad():
        y_user = rhs.user_state(y0.detach())
    params = find_params(func, strategy.params, probe=lambda: func(rhs.time(ts[0]), y_user),
                         who="gradient='checkpoint'", arg="Checkpoint params")
    if not (y0.requires_grad or params):
        return integrate(rhs, y0, ts, make_stepper(), controller, perturb=perturb,
                         record=record, **loop_kwargs)
    if record:
        raise ODEInputError("dense=True cannot be combined with gradient='checkpoint' (the "
                            "dense output would not be differentiable); use "
                            "gradient='backprop' for a differentiable dense solution")
    budget = strategy.budget
    stepper = make_stepper()
    name = loop_kwargs.get("name", "this method")
    if getattr(stepper, "forward_only", False):
        raise ODEInputError(f"method='{name}' is forward only (its steps cannot be redone "
                            f"with autograd), so gradient='checkpoint' is not available for "
                            f"it. For gradients use odeint_adjoint(..., method='{name}') or "
                            f"a differentiable method such as 'rodas5p' (stiff) or 'dopri5'")
    if not (callable(getattr(stepper, "carry", None)) and callable(getattr(stepper, "resume",
                                                                             None))):
        raise ODEInputError(f"{loop_kwargs.get('name', 'this method')}: its stepper "
                            f"({type(stepper).__name__}) cannot be replayed (it has no carry()/"
                            f"resume()), so gradient='checkpoint' is not available for it; use "
                            f"gradient='backprop' or 'adjoint'")
    rec = (_KeepingRecorder if budget is None else _Recorder)(stepper, budget is None)
    n_before = rhs.stats.n_accepted
    with torch.no_grad():
        res = integrate(rhs, y0.detach(), ts, rec, controller, perturb=perturb, record=False,
                        **loop_kwargs)
    rec.finish(rhs.stats.n_accepted - n_before, res)
    steps = rec.steps
    direction = 1.0 if len(ts) < 2 or ts[-1] > ts[0] else -1.0

    # which step gives which output: outs[i] (i >= 1) and the event state
    k = 0

    def slot_of(time: float, event: bool) -> tuple[int, float | None]:
        nonlocal k
        while k < len(steps) and direction * (time - steps[k].t1) > 0:
            k += 1
        if k >= len(steps):
            return -1, None
        st = steps[k]
        if time == st.t1 and not event:
            return k, None
        if event and time == st.t:
            return (k - 1, None) if k > 0 else (-1, None)
        return k, (time - st.t) / (st.t1 - st.t)

    n_outs = len(res.outs)
    targets = [(ts[i], False) for i in range(1, n_outs)]
    if res.status == EVENT and res.event_y is not None and res.event_t is not None:
        targets.append((res.event_t, True))
    found = [res.outs[i] for i in range(1, n_outs)]
    if res.status == EVENT and res.event_y is not None:
        found.append(res.event_y)
    values: list[torch.Tensor] = []
    where: list[int] = []  # where[j]: index into values, or -1 for the start state
    for (time, event), v in zip(targets, found):
        kk, th = slot_of(time, event)
        if kk < 0:
            where.append(-1)
            continue
        steps[kk].outs.append((len(values), th))
        where.append(len(values))
        values.append(v)

    bstats = SolverStats(method=rhs.stats.method)
    replay_rhs = RHS(rhs.func, rhs.layout, rhs.user_dtype, rhs.device, bstats)
    tape = _Tape(rec, make_stepper, replay_rhs, direction, perturb, ts[0], params, budget)
    if strategy.compile:
        reasons = fallback_reasons(tape, stepper)
        if reasons:
            warn_fallback(reasons)
        else:
            tape.compile = strategy.compile
    rhs.stats.extra["checkpoint"] = tape.stats
    got = _CheckpointFunction.apply(tape, values, y0, *params) if values else ()
    outs = [y0 if j < 0 else got[j] for j in where]
    n_main = n_outs - 1
    res.outs = [y0] + outs[:n_main]
    if res.status == EVENT and res.event_y is not None:
        res.event_y = outs[n_main]
        res.y_final = res.event_y
    elif n_main and res.t_final == ts[n_outs - 1]:
        res.y_final = res.outs[-1]
    return res
