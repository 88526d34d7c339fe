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


def find_params(func, given=None, *, probe: Callable[[], object] | None = None,
                who: str = "odeint_adjoint", arg: str = "adjoint_params"
                ) -> tuple[torch.Tensor, ...]:
    """The tensors to differentiate: ``given`` (an iterable of tensors, or one tensor),
    else the parameters of an ``nn.Module`` func, else the leaves of one evaluation
    (``probe``); without a probe a plain callable is an error naming ``arg``. Only those
    that require grad, each once."""
    if given is not None:
        if isinstance(given, torch.Tensor):
            given = (given,)
        try:
            params = tuple(given)
        except TypeError:
            raise ODEInputError(f"{arg} must be an iterable of tensors, got "
                                f"{type(given).__name__}") from None
        for k, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise ODEInputError(f"{arg}[{k}] must be a tensor, got {type(p).__name__}")
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


__all__ = ["find_params", "graph_leaves", "unique"]
