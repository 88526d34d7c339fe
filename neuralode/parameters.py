"""The one parameter finder: which tensors a solve differentiates besides y0 and t, for
every gradient strategy (the adjoint's and the checkpoint's parameter adjoint) and both
drivers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from neuralode.errors import ODEInputError


def unique(tensors) -> tuple[torch.Tensor, ...]:
    """Each tensor once (shared modules), in order: no double-counted gradient."""
    seen, out = set(), []
    for p in tensors:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return tuple(out)


def graph_leaves(evaluate: Callable[[], object]) -> tuple[torch.Tensor, ...]:
    """The leaf tensors that require grad in the graph of one evaluation of ``func``
    (parameters of an nn.Module and tensors a closure uses alike)."""
    with torch.enable_grad():
        out = evaluate()
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    found, stack, visited = [], [], set()
    for o in outs:
        if isinstance(o, torch.Tensor) and o.grad_fn is not None:
            stack.append(o.grad_fn)
        elif isinstance(o, torch.Tensor) and o.requires_grad:
            found.append(o)  # func returned a leaf itself
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            found.append(var)
            continue
        stack.extend(nf for nf, _ in node.next_functions if nf is not None)
    return unique(found)


def as_tensors(value, what: str) -> tuple[torch.Tensor, ...]:
    """``value`` (a tensor, or an iterable of tensors) as a tuple of tensors, or a clear
    error naming ``what``."""
    if isinstance(value, torch.Tensor):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ODEInputError(f"{what} must be an iterable of tensors, got "
                            f"{type(value).__name__}") from None
    for k, v in enumerate(items):
        if not isinstance(v, torch.Tensor):
            raise ODEInputError(f"{what}[{k}] must be a tensor, got {type(v).__name__}")
    return items


def find_params(func, given=None, *, probe: Callable[[], object] | None = None,
                who: str = "odeint_adjoint", arg: str = "adjoint_params"
                ) -> tuple[torch.Tensor, ...]:
    """The tensors to differentiate: ``given`` (an iterable of tensors, or one tensor),
    else the parameters of an ``nn.Module`` func, else the leaves of one evaluation
    (``probe``); without a probe a plain callable is an error naming ``arg``. Only those
    that require grad, each once."""
    if given is not None:
        params = as_tensors(given, arg)
    elif isinstance(func, nn.Module):
        params = tuple(func.parameters())
    elif probe is not None:
        params = graph_leaves(probe)
    else:
        raise ODEInputError(
            f"{who} needs func to be an nn.Module (to find the parameters to differentiate), "
            f"got {type(func).__name__}; pass {arg}=(tensors...) to differentiate a plain "
            f"callable")
    return unique(p for p in params if p.requires_grad)


def module_names(func, params) -> tuple[str, ...] | None:
    """The names under which ``func``, an ``nn.Module``, owns each tensor of ``params`` (its
    parameters and buffers), for ``torch.func.functional_call``; None when func is not a
    module or a tensor is not one of its own (a compiled function cannot swap it in)."""
    if not isinstance(func, torch.nn.Module):
        return None
    own = {id(v): k for k, v in [*func.named_parameters(), *func.named_buffers()]}
    names = tuple(own.get(id(p)) for p in params)
    return None if any(n is None for n in names) else names  # type: ignore[return-value]


def functional_flat(func, names: tuple[str, ...], layout) -> Callable:
    """``func`` on the flat state with its own tensors ``names`` swapped for ``ps``:
    ``(t, y_flat, ps) -> f flat`` (``torch.func.functional_call``; what a compiled function
    can trace and differentiate with ``torch.func.vjp``)."""
    def f(t, y, ps):
        out = torch.func.functional_call(func, dict(zip(names, ps)), (t, layout.unflatten(y)))
        return layout.flatten(out)
    return f


__all__ = ["as_tensors", "find_params", "functional_flat", "graph_leaves", "module_names",
           "unique"]
