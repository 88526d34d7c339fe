"""``torch.func.vmap`` over ``odeint``: the mapped axis becomes a per-sample solve.

A solve has data-dependent control flow (step acceptance, the number of steps), which
``vmap`` cannot trace. What a vmapped user means is one solve per sample, each with its own
steps: ``odeint`` sees that ``y0`` (or ``t``) is a tensor batched by ``vmap`` and runs
``odeint(torch.vmap(func), y0_batch, t, per_sample=True)`` on the batch (the rule of an
autograd ``Function`` with a custom ``vmap`` staticmethod). ``func`` keeps seeing one sample
(``y`` without the mapped axis, ``t`` a 0-d tensor).

Supported: ``y0`` (tensor or tuple) and ``t`` mapped, every method ``per_sample`` supports,
``rtol``/``atol``/``method``/``options``/``gradient``. Gradients of the mapped result by
ordinary autograd (``loss.backward()`` outside ``vmap``) are those of the per-sample solve.
Not supported, with a clear error: event mode, ``return_stats``, ``per_sample=True`` inside
``vmap``, nested ``vmap``, and ``torch.func`` gradient transforms (``grad``, ``jacrev``,
``vjp``) inside the ``vmap``. Tensors that ``func`` closes over must not be mapped.
"""

from __future__ import annotations

from typing import Any

import torch

from neuralode.errors import ODEInputError


def _batched(x) -> bool:
    """A tensor batched by vmap, also beneath other torch.func wrappers (grad in vmap)."""
    if not isinstance(x, torch.Tensor):
        return False
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(x):
        if ft.is_batchedtensor(x):
            return True
        x = ft.get_unwrapped(x)
    return False


def is_vmapped(y0, t) -> bool:
    """Whether ``y0`` (a tensor or tuple) or ``t`` is a tensor batched by ``torch.vmap``."""
    items = list(y0) if isinstance(y0, (tuple, list)) else [y0]
    return any(_batched(v) for v in items) or _batched(t)


class _VmappedSolve(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(cfg: dict, t: torch.Tensor, *items: torch.Tensor):
        raise RuntimeError("neuralode's vmapped solve runs only under torch.vmap")

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "torch.func gradient transforms (grad, jacrev, vjp) inside vmap(odeint) are not "
            "supported; differentiate the vmapped result with ordinary autograd (e.g. "
            "loss.backward() outside vmap), or use odeint(..., per_sample=True) directly")

    @staticmethod
    def vmap(info, in_dims, cfg: dict, t: torch.Tensor, *items: torch.Tensor):
        B = info.batch_size
        if any(_batched(v) for v in (t, *items)):
            raise ODEInputError("nested torch.vmap over odeint is not supported (one mapped "
                                "axis becomes the per-sample batch); flatten the mapped axes "
                                "into one")
        dt, dys = in_dims[1], in_dims[2:]
        batch = [v.movedim(d, 0) if d is not None else v.expand(B, *v.shape)
                 for v, d in zip(items, dys)]
        tb = t.movedim(dt, 0) if dt is not None else t
        y0 = tuple(batch) if cfg["is_tuple"] else batch[0]
        fb = torch.vmap(cfg["func"], in_dims=(0, 0))
        ys = cfg["odeint"](fb, y0, tb, rtol=cfg["rtol"], atol=cfg["atol"], method=cfg["method"],
                    options=cfg["options"], gradient=cfg["gradient"], per_sample=True)
        if cfg["is_tuple"]:
            return tuple(ys), tuple(1 for _ in ys)
        return ys, 1


def vmapped_odeint(odeint, func, y0, t, *, rtol: Any, atol: Any, method, options, gradient):
    """``odeint(func, y0, t, ...)`` of a vmapped ``y0``/``t`` as ``odeint``'s per-sample solve
    (see the module doc; ``odeint`` is the front door, passed in by it)."""
    is_tuple = isinstance(y0, (tuple, list))
    items = list(y0) if is_tuple else [y0]
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)
    cfg = {"odeint": odeint, "func": func, "is_tuple": is_tuple, "rtol": rtol, "atol": atol,
           "method": method, "options": options, "gradient": gradient}
    out = _VmappedSolve.apply(cfg, t, *items)
    return tuple(out) if is_tuple else out


__all__ = ["is_vmapped", "vmapped_odeint"]
