"""The tensor-clock driver: a per-sample batch of problems, time and step size as (B,)
tensors.

A batch of B independent problems y_b' = f(t_b, y_b) is advanced together: one call of the
user's function per stage for the whole batch, but every sample has its own time, step
size, error norm, acceptance, output times, statistics and status. It runs the same
stepper (``rk.RKStepper``), controllers (``controllers.PIDRun`` and its subclasses,
``controllers.PerSampleGrid``), error norm, events (``event_location``) and statuses
(``status``) as the float-clock driver (``loop.integrate``); the formulas are written once
over floats and (B,) tensors (``elementwise``). What is its own: the bookkeeping of a batch
(masks instead of branches, outputs written with one indexed store per step, an optional
compaction of finished rows), and at most one host synchronisation per adaptive step, none
per fixed-grid step. Why two clocks: the float clock costs a few microseconds per step in
Python floats (guarded by ``benchmarks/loop.py``); on tensors every branch is a masked
update.

States are flat (B, n) tensors (n: the per-sample element count); times are float64 (B,)
tensors on the state's device.

Finished samples: the batch is masked, not shrunk, by default (a finished row takes zero
steps: its f-evaluations are wasted, its values unchanged); ``shrink`` (a fraction in
(0, 1]) compacts the batch to its running rows when they fall to that fraction or below,
which needs a ``func`` that treats rows independently and accepts any batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from neuralode.errors import EventError
from neuralode.solvers.controllers import PerSampleGrid
from neuralode.solvers.elementwise import divisor, ulp
from neuralode.solvers.event_location import (
    EventFunction,
    interior_check,
    locate_event,
    nonfinite_event_message,
)
from neuralode.solvers.status import (
    CODE,
    CONVERGENCE,
    ERRORS,
    EVENT,
    MAX_STEPS,
    NAMES,
    NONFINITE,
    RUNNING,
    STEP_SIZE,
    STIFF,
    SUCCESS,
    convergence_message,
    max_steps_message,
    nonfinite_grid_message,
    nonfinite_message,
    progress,
    start_scale_message,
    step_size_message,
)
from neuralode.solvers.stiffness import CHECK_EVERY, StiffnessCheck, stiff_message

_RUNNING, _SUCCESS, _EVENT = CODE[RUNNING], CODE[SUCCESS], CODE[EVENT]
_CONVERGENCE, _STIFF = CODE[CONVERGENCE], CODE[STIFF]
_MAX_STEPS, _STEP_SIZE, _NONFINITE = CODE[MAX_STEPS], CODE[STEP_SIZE], CODE[NONFINITE]


class BatchedDense:
    """The continuous solution of a per-sample solve: every sample's accepted steps and their
    interpolants. ``sol(t)``: t (m,) shared or (B, m) per sample -> (m, B, n) flat states.
    Non-finite values (NaN) where a time lies outside what a sample solved."""

    def __init__(self, steps: list, stepper, t0: torch.Tensor, t_final: torch.Tensor):
        self.t_lo = torch.stack([s[0] for s in steps])  # (S, B)
        self.t_hi = torch.stack([s[1] for s in steps])
        self.h = torch.stack([s[2] for s in steps])
        self.acc = torch.stack([s[3] for s in steps])
        self.y = torch.stack([s[4] for s in steps])  # (S, B, n)
        self.y1 = torch.stack([s[5] for s in steps])
        self.K = torch.stack([s[6] for s in steps])  # (S, stages, B, n): the stepper's record
        self.stepper = stepper
        self.t0, self.t_final = t0, t_final

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        B = self.t_lo.shape[1]
        q = q.to(torch.float64).to(self.t_lo.device)
        q = q[None].expand(B, -1) if q.dim() == 1 else q  # (B, m)
        dirn = torch.where(self.t_final >= self.t0, 1.0, -1.0).to(torch.float64)[:, None]
        lo, hi = self.t_lo.T[:, None, :], self.t_hi.T[:, None, :]  # (B, 1, S)
        inside = self.acc.T[:, None, :] & (dirn[..., None] * (q[..., None] - lo) >= 0) & \
            (dirn[..., None] * (q[..., None] - hi) <= 0)  # (B, m, S)
        found = inside.any(-1)
        k = inside.to(torch.int8).argmax(-1)  # (B, m): the first step holding the time
        b = torch.arange(B, device=q.device)[:, None].expand_as(k)
        h = self.h[k, b]
        theta = torch.where(found, (q - self.t_lo[k, b]) / divisor(h), 0.0)
        y, y1 = self.y[k, b], self.y1[k, b]  # (B, m, n)
        # each (sample, time) as a row of its own step's interpolant
        n, m = y.shape[-1], theta.shape[1]
        K = self.K.permute(0, 2, 1, 3)[k, b]  # (B, m, stages, n)
        val = self.stepper.dense_rows(y.reshape(B * m, n), y1.reshape(B * m, n),
                                      h.reshape(B * m), K.reshape(B * m, -1, n),
                                      theta.reshape(B * m)).reshape(B, m, n)
        val = torch.where((q == self.t_hi[k, b])[..., None], y1, val)
        return torch.where(found[..., None], val, math.nan).transpose(0, 1)


@dataclass
class BatchedResult:
    ys: torch.Tensor  # (T, B, n); NaN at the output times a failed sample did not reach
    status: torch.Tensor  # (B,) int codes
    t_final: torch.Tensor  # (B,) float64
    y_final: torch.Tensor  # (B, n)
    n_accepted: torch.Tensor
    n_rejected: torch.Tensor
    reached: torch.Tensor  # (B,) number of outputs written (the first is y0)
    h_next: torch.Tensor | None = None  # (B,) the step each sample would take next
    event_t: torch.Tensor | None = None  # (B,) float64, NaN for samples without an event


def _messages(res: BatchedResult, name: str, max_num_steps: int, ts: torch.Tensor,
              stiff: dict | None = None, adaptive: bool = True) -> list[str]:
    """One message per sample ("" where it succeeded), the float-clock driver's texts."""
    codes = res.status.tolist()
    if all(code == _SUCCESS for code in codes):
        return [""] * len(codes)
    out = []
    steps = (res.n_accepted + res.n_rejected).tolist()
    for b, (code, tf, hf, t0, t1) in enumerate(zip(
            codes, res.t_final.tolist(), res.h_next.tolist(),
            ts[:, 0].tolist(), ts[:, -1].tolist())):
        st = NAMES[code]
        where = progress(tf, t0, t1)
        if st == NONFINITE and not adaptive and steps[b] > 0:
            # a fixed grid's non-finite state: where it was last finite
            out.append(nonfinite_grid_message(f"sample {b}: {name}", tf, tf + hf, hf))
            continue
        if st == MAX_STEPS:
            msg = max_steps_message(name, max_num_steps, tf, hf, where)
        elif st == STEP_SIZE:
            msg = (f"{name}: {start_scale_message()}" if steps[b] == 0
                   else step_size_message(name, tf, hf, "", where))
        elif st == NONFINITE:
            msg = nonfinite_message(name, tf, where, at_start=steps[b] == 0)
        elif st == STIFF and stiff is not None:
            msg = stiff_message(name, *stiff[b])
        elif st == CONVERGENCE:
            msg = convergence_message(name, tf, tf + hf, hf, "Newton iterations did not "
                                                             "converge")
        else:
            msg = ""
        out.append(f"sample {b}: {msg}" if msg else "")
    return out


def integrate_batched(rhs, y0: torch.Tensor, ts: torch.Tensor, stepper, controller,
                      *, max_num_steps: int, throw: bool = True, name: str = "",
                      shrink: float | None = None, sync_counter: list | None = None,
                      h0: torch.Tensor | None = None, on_step: Callable | None = None,
                      event_fn: Callable | None = None,
                      record: list | None = None, event_interior_points: int = 0,
                      step_to_outputs: bool = False, stiffness: StiffnessCheck | None = None
                      ) -> tuple[BatchedResult, list[str]]:
    """Integrate every row of ``y0`` (B, n) from ts[b, 0] through the times ts[b] (B, T).

    ``rhs``: a per-sample ``RHS`` (``batch=True``); ``stepper``: an ``RKStepper``;
    ``controller``: a bound adaptive controller (``PIDController(...).bind(...)``) or a
    ``PerSampleGrid``.
    ``sync_counter``: a list; one entry is appended per host synchronisation of the loop.
    ``h0``: (B,) first step sizes (adaptive; default: Hairer's estimate).
    ``on_step(t, y, h, accept, stepper)``: called after every attempt, before the stepper
    moves on (the adjoint's parameter quadrature reads the attempt's stages there).
    ``event_fn`` (adaptive methods): each sample stops at its own first sign change,
    located as the float-clock driver locates it (``event_location``).
    ``record``: a list that receives every attempt's interpolant data (``BatchedDense``).
    ``step_to_outputs`` (adaptive): every output time is a step end, as the float clock's
    stops (each row's next output is its stop, ``StepBounds.propose``).
    ``stiffness``: the explicit methods' stiffness test, every ``CHECK_EVERY`` attempts
    (and at each while a row is suspect), each row counted as alone."""
    B, T = ts.shape
    n = y0.shape[1]
    device = y0.device
    adaptive = controller.adaptive
    dirn = torch.where(ts[:, -1] >= ts[:, 0], 1.0, -1.0).to(torch.float64)
    if T == 1:
        z = torch.zeros(B, dtype=torch.long, device=device)
        return BatchedResult(y0[None], torch.full_like(z, _SUCCESS), ts[:, 0].clone(), y0, z,
                             z.clone(), torch.ones_like(z),
                             torch.zeros(B, dtype=torch.float64, device=device)), [""] * B
    out = y0.new_zeros(T + 1, B, n)  # row T takes the writes of absent outputs
    out[0] = y0
    pieces = []  # (rows, status, t, y, n_acc, n_rej, i_out) of rows that left the batch

    def sync(x: torch.Tensor):
        if sync_counter is not None:
            sync_counter.append(1)
        return x.tolist()

    # per-row running state (the batch may shrink: ``rows`` are the rows' global indices)
    rows = torch.arange(B, device=device)
    t = ts[:, 0].clone()
    t_end = ts[:, -1]
    key = ts * dirn[:, None]  # increasing in each row
    y = y0
    f0 = rhs.call(t, y)
    graph = torch.is_grad_enabled() and (y0.requires_grad or f0.requires_grad)
    status = torch.zeros(B, dtype=torch.long, device=device)
    bad0 = ~torch.isfinite(f0.detach()).all(1)
    status = torch.where(bad0, _NONFINITE, status)
    stepper.start(rhs, y, f0, graph)
    if adaptive:
        if h0 is None:
            h = controller.first_step(rhs.call, t, y, f0, dirn)
        else:
            controller.absy = y.detach().abs()
            h = controller.clamp(h0, dirn)
            controller.init_history(h)
        status = torch.where((status == _RUNNING) & ~torch.isfinite(h), _STEP_SIZE, status)
    else:
        k_grid = torch.zeros(B, dtype=torch.long, device=device)
        h = controller.point(k_grid + 1) - t
        n_iter = sync(controller.n.max())  # fixed grids: synchronised before the loop only
    running = status == _RUNNING
    n_att = torch.zeros(B, dtype=torch.long, device=device)
    n_acc = torch.zeros(B, dtype=torch.long, device=device)
    n_rej = torch.zeros(B, dtype=torch.long, device=device)
    i_out = torch.ones(B, dtype=torch.long, device=device)
    m_fixed = None if adaptive else _max_outputs_per_step(controller, ts, n_iter, sync)
    pending = None  # the last step's outputs, written before the stages are overwritten
    it = 0

    def write_outputs(p, m: int):
        """The outputs in each row's last step, all at once: (B, m) step fractions, one
        interpolation, one indexed write (entries past a row's count go to a spare row T)."""
        y_s, y1_s, h_s, t_s, t1_s, cnt, i0, rows_s, _ = p
        j = torch.arange(m, device=device)[None, :]
        valid = j < cnt[:, None]
        idx = torch.where(valid, i0[:, None] + j, T)
        t_o = ts[rows_s].gather(1, idx.clamp(max=T - 1))
        hs = torch.where(h_s != 0, h_s, 1.0)[:, None]
        theta = torch.where(valid, (t_o - t_s[:, None]) / hs, 0.0)
        val = stepper.interpolate(y_s, h_s, theta)
        val = torch.where((t_o == t1_s[:, None])[..., None], y1_s[:, None], val)
        out.index_put_((idx, rows_s[:, None].expand(-1, m)), val)

    no_outputs = torch.zeros(B, dtype=torch.long, device=device)
    batch_step = BatchStep(stepper, controller, max_num_steps)
    propose, attempt = batch_step.propose, batch_step.attempt

    if not adaptive:
        k_grid_ = k_grid
    else:
        k_grid_ = torch.zeros((), dtype=torch.long, device=device)
    event_t = torch.full((B,), math.nan, dtype=torch.float64, device=device)
    ev = ev_bad = no_ev = torch.zeros(B, dtype=torch.bool, device=device)
    event = (EventFunction(event_fn, rhs, t, y, event_interior_points)
             if event_fn is not None else None)
    state_at = h_ev = g_ev = None  # the last step's interpolant and where its event lies
    stiff_at: dict = {}  # rows stopped by the stiffness test: their message's values
    while True:
        if adaptive:
            t1, hh, status, running, flags = propose(
                t, h, t_end, dirn, running, status, n_att, controller.nonfinite,
                pending[5] if pending is not None else no_outputs, ev.sum(), ev_bad.sum(),
                next_output(key, i_out, dirn) if step_to_outputs else t_end)
            n_run, m, n_ev, n_bad = sync(flags)  # the one synchronisation per step
            if n_bad:
                b = int(ev_bad.nonzero()[0, 0])
                raise EventError(f"sample {int(rows[b])}: " + nonfinite_event_message(
                    name, float(pending[4][b]), pending[1][b]))
            if n_ev:
                # rows whose step crossed their event: locate it, keep the outputs before it
                y_s, y1_s, h_s, t_s, t1_s, cnt, i0, rows_s, acc_s = pending
                hs = torch.where(h_s != 0, h_s, 1.0)
                t_ev = t1_s.clone()
                with torch.no_grad():
                    yd = y_s.detach()
                    for b in ev.nonzero()[:, 0].tolist():  # each as a one-problem solve
                        tb, hb = float(t_s[b]), float(h_s[b])

                        def row_at(tm, b=b, tb=tb, hb=hb, yb=yd[b]):
                            return stepper.interpolate(yb, hb, [(tm - tb) / hb], row=b)[0]
                        t_ev[b] = locate_event(event.row(b), row_at, tb, yd[b],
                                               float(h_ev[b]), float(g_ev[b]))
                theta = torch.where(ev, (t_ev - t_s) / hs, 0.0)
                y_ev = stepper.interpolate(y_s, h_s, theta[:, None])[:, 0]
                upto = torch.searchsorted(key, (dirn * t_ev)[:, None], right=True)[:, 0]
                cnt = torch.where(ev, upto - i0, cnt)
                i_out = torch.where(ev, i0 + cnt, i_out)
                pending = (y_s, y1_s, h_s, t_s, t1_s, cnt, i0, rows_s, acc_s)
                y = torch.where(ev[:, None], y_ev, y)
                t = torch.where(ev, t_ev, t)
                event_t = event_t.index_put((rows,), torch.where(ev, t_ev, event_t[rows]))
                ev = no_ev
            if pending is not None:
                if m > 0:
                    write_outputs(pending, m)
                stepper.advance(accept=pending[8])
            if n_run == 0:
                break
            if shrink is not None and n_run <= shrink * rows.numel():
                idx = running.nonzero()[:, 0]
                gone = ~running
                pieces.append((rows[gone], status[gone], t[gone], y[gone], n_acc[gone],
                               n_rej[gone], i_out[gone], h[gone]))
                rows, t, t_end, y, h, hh, t1 = (rows[idx], t[idx], t_end[idx], y[idx], h[idx],
                                                hh[idx], t1[idx])
                dirn, key, status, running = dirn[idx], key[idx], status[idx], running[idx]
                n_att, n_acc, n_rej, i_out = n_att[idx], n_acc[idx], n_rej[idx], i_out[idx]
                controller.take(idx)
                stepper.take(idx)
                if stiffness is not None:
                    stiffness.take(idx)
        else:
            if pending is not None:
                if m_fixed > 0:
                    write_outputs(pending, m_fixed)
                stepper.advance(accept=pending[8])
            if it >= n_iter:
                break
            t1 = controller.point(k_grid_ + 1)
            running = running & (k_grid_ < controller.n)
            hh = t1 - t
        it += 1
        t_old, y_old, i_old = t, y, i_out
        (y1, hm, t1m, cnt, accept, t, y, h, status, running, n_att, n_acc, n_rej, i_out,
         k_grid_) = attempt(t, y, h, hh, t1, t_end, dirn, key, running, status, n_att, n_acc,
                            n_rej, i_out, k_grid_)
        if stiffness is not None and adaptive and (it % CHECK_EVERY == 0 or stiffness.suspect):
            fire, info = stiffness.test_rows(stepper.stages(), accept, t, hm, t_end)
            if info is not None:
                status = torch.where(fire, _STIFF, status)
                running = status == _RUNNING
                for b in fire.nonzero()[:, 0].tolist():
                    stiff_at[int(rows[b])] = (float(t[b]), float(hm[b]), float(info[0][b]),
                                              stiffness.boundary, float(info[1][b]))
        if on_step is not None:
            on_step(t_old, y_old, hm, accept, stepper)
        if record is not None:
            record.append((t_old, t1m, hm, accept, y_old, y1, stepper.record_stages()))
        if event is not None:
            with torch.no_grad():
                g1 = event(t1m, y1)
                yd, hs = y_old.detach(), torch.where(hm != 0, hm, 1.0)

                def state_at(tm, yd=yd, hm=hm, t_old=t_old, hs=hs):
                    return stepper.interpolate(yd, hm, ((tm - t_old) / hs)[:, None])[:, 0]
                h_ev, g_ev = interior_check(event, state_at, t_old, hm, g1) if event.interior \
                    else (hm, g1)
            ev = accept & (g_ev <= 0)
            ev_bad = accept & ~torch.isfinite(g1)
            status = torch.where(ev, _EVENT, status)
            running = status == _RUNNING
        pending = (y_old, y1, hm, t_old, t1m, cnt, i_old, rows, accept)
    pieces.append((rows, status, t, y, n_acc, n_rej, i_out, h))
    status_full = torch.zeros(B, dtype=torch.long, device=device)
    t_final = torch.empty(B, dtype=torch.float64, device=device)
    n_acc_full = torch.zeros(B, dtype=torch.long, device=device)
    n_rej_full = torch.zeros(B, dtype=torch.long, device=device)
    reached = torch.zeros(B, dtype=torch.long, device=device)
    h_final = torch.empty(B, dtype=torch.float64, device=device)
    y_final = y0.new_zeros(B, n)
    for r, st, tf, yf, na, nr, io, hf in pieces:
        status_full[r], t_final[r], n_acc_full[r], n_rej_full[r], reached[r] = st, tf, na, nr, io
        h_final[r] = hf
        y_final = y_final.index_put((r,), yf)
    mask = torch.arange(T, device=device)[:, None] < reached[None, :]
    ys = torch.where(mask[:, :, None], out[:T], math.nan)
    res = BatchedResult(ys, status_full, t_final, y_final, n_acc_full, n_rej_full, reached,
                        h_final, event_t)
    msgs = _messages(res, name, max_num_steps, ts, stiff_at, adaptive)
    if throw:
        raise_failures(res, msgs)
    return res, msgs


def raise_failures(res: BatchedResult, msgs: list[str]) -> None:
    """Raise the first failed sample's error (its status's class), saying how many failed."""
    bad = [b for b, s in enumerate(res.status.tolist()) if NAMES[s] in ERRORS]
    if bad:
        code = int(res.status[bad[0]])
        more = f" ({len(bad)} of {len(msgs)} samples failed)" if len(bad) > 1 else ""
        raise ERRORS[NAMES[code]](msgs[bad[0]] + more)


class BatchStep:
    """One step of every row of a batch, without host synchronisation: where each running
    row's attempt ends (``propose``) and the attempt with its verdict and bookkeeping
    (``attempt``). The eager driver (``integrate_batched``) and the compiled one
    (``compiled.integrate_compiled``) run these same two functions."""

    def __init__(self, stepper, controller, max_num_steps: int, fused: bool = False,
                 ends: bool = True):
        self.stepper, self.controller = stepper, controller
        self.max_num_steps = max_num_steps
        self.adaptive = controller.adaptive
        self.fused = fused  # compiled: the outputs in a step counted by comparisons
        self.ends = ends  # False: no f(t1, y1) after the attempt (the next step evaluates it)

    def propose(self, t, h, t_end, dirn, running, status, n_att, nonfinite, n_out, n_ev,
                n_bad, stop):
        """Where each running row's attempt ends, the per-row stop checks, and the values
        of the step's one synchronisation (rows running, outputs of the last step)."""
        t1 = self.controller.propose(t, h, stop, dirn)
        hh = t1 - t
        tiny = ~torch.isfinite(hh) | (hh.abs() <= 4 * ulp(torch.maximum(t.abs(), t1.abs())))
        status = torch.where(running & tiny, torch.where(nonfinite, _NONFINITE, _STEP_SIZE),
                             status)
        status = torch.where(running & ~tiny & (n_att >= self.max_num_steps), _MAX_STEPS,
                             status)
        running = status == _RUNNING
        return t1, hh, status, running, torch.stack([running.sum(), n_out.max(), n_ev, n_bad])

    def attempt(self, t, y, h, hh, t1, t_end, dirn, key, running, status, n_att, n_acc,
                n_rej, i_out, k_grid):
        """One attempt of every running row: the stepper's step, the controller's verdict,
        and the per-row bookkeeping (no host synchronisation)."""
        stepper, controller, adaptive = self.stepper, self.controller, self.adaptive
        hm = torch.where(running, hh, 0.0)
        y1 = stepper.step(t, y, hm)
        t1m = torch.where(running, t1, t)
        if adaptive:
            # an implicit stepper's rows whose Newton solve failed: retried with a shorter
            # step, as the float clock retries after a ``StepFailure``
            failed = getattr(stepper, "failed", None)
            live = running if failed is None else running & ~failed
            accept, h_next = controller.judge(y1, stepper.error(), hm, dirn, live)
            if failed is not None:
                h_next = torch.where(failed, controller.shrink(hm, stepper.failure_factor,
                                                               dirn), h_next)
            n_rej = n_rej + (running & ~accept)
        else:
            ok = torch.isfinite(y1.detach()).all(1)
            status = torch.where(running & ~ok, _NONFINITE, status)
            failed = getattr(stepper, "failed", None)
            if failed is not None:  # an implicit step not solved: the row ends there
                status = torch.where(running & failed, _CONVERGENCE, status)
                ok = ok & ~failed
            accept = running & ok
            k_grid = k_grid + running
            h_next = hh
        n_att = n_att + running
        n_acc = n_acc + accept
        if self.ends:
            stepper.prepare_interp(t1m, y1)  # every row's f(t1, y1) (non-FSAL methods)
        # outputs in (t, t1] of the accepted rows
        upto = ((key <= (dirn * t1m)[:, None]).sum(1) if self.fused else
                torch.searchsorted(key, (dirn * t1m)[:, None], right=True)[:, 0])
        cnt = torch.where(accept, upto - i_out, 0)
        i_new = i_out + cnt
        status = torch.where(accept & (t1m == t_end), _SUCCESS, status)
        t_new = torch.where(accept, t1m, t)
        y_new = torch.where(accept[:, None], y1, y)
        h = torch.where(running, h_next if adaptive else hh, h)
        return (y1, hm, t1m, cnt, accept, t_new, y_new, h, status, status == _RUNNING, n_att,
                n_acc, n_rej, i_new, k_grid)


def next_output(key: torch.Tensor, i_out: torch.Tensor, dirn: torch.Tensor) -> torch.Tensor:
    """Each row's next output time (its last once all are written)."""
    i = i_out.clamp(max=key.shape[1] - 1)[:, None]
    return key.gather(1, i)[:, 0] * dirn


def _max_outputs_per_step(grid: PerSampleGrid, ts: torch.Tensor, n_max: int, sync) -> int:
    """The most output times any row has in one step of its fixed grid (computed once)."""
    if grid.h is None:
        return 1
    k = torch.arange(n_max + 1, device=ts.device)
    pts = torch.where(k[None, :] >= grid.n[:, None], grid.t1[:, None],
                      grid.t0[:, None] + grid.h[:, None] * k[None, :])
    dirn = torch.where(grid.t1 >= grid.t0, 1.0, -1.0).to(torch.float64)[:, None]
    # step of each output: the first grid point at or beyond it
    step = torch.searchsorted((pts * dirn).contiguous(), (ts[:, 1:] * dirn).contiguous())
    counts = torch.zeros(ts.shape[0], n_max + 2, dtype=torch.long, device=ts.device)
    counts.scatter_add_(1, step, torch.ones_like(step))
    return sync(counts.max())
